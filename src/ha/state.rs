//! The recovery state machine of one node (Cisco's states and reasons, snake_case in the API).
//!
//! Pure: `NodeState::next` says which transitions are legal, so the recovery manager cannot
//! reach a state by accident, and every transition can be recorded with its reason.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's recovery state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Starting up: connecting to the store and the peer.
    Initializing,
    /// Serving its own rooms; the peer (if any) is healthy.
    Normal,
    /// Handing its rooms to the peer (critical service down, or admin request).
    FailingOver,
    /// Fencing and loading the peer's rooms.
    TakingOver,
    /// Serving its own rooms and the failed peer's.
    RunningInBackupMode,
    /// Its rooms are served by the peer; it waits for fallback.
    FailedOver,
    /// Failed over because a critical service is down, which is still down.
    FailedOverCriticalServicesNotRunning,
    /// Running without rooms (HA off and peer-less, or administratively idle).
    Idle,
    /// Backup: draining and handing the peer's rooms back.
    FallingBack,
    /// Home node: taking its rooms back from the backup.
    TakingBack,
    /// Both nodes failed and this one came back alone: it serves what it can.
    RunningInFailedMode,
    /// The state of a peer that cannot be reached.
    Unknown,
}

/// Why a transition happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    OnAdminRequest,
    OnCriticalServiceDown,
    OnPeerDown,
    Initializing,
    AutomaticFallback,
}

impl NodeState {
    /// Every state, for per-state gauges.
    pub const ALL: [NodeState; 12] = [
        NodeState::Initializing,
        NodeState::Normal,
        NodeState::FailingOver,
        NodeState::TakingOver,
        NodeState::RunningInBackupMode,
        NodeState::FailedOver,
        NodeState::FailedOverCriticalServicesNotRunning,
        NodeState::Idle,
        NodeState::FallingBack,
        NodeState::TakingBack,
        NodeState::RunningInFailedMode,
        NodeState::Unknown,
    ];

    /// The snake_case name used in the API, the logs and the `node_states` table.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Initializing => "initializing",
            NodeState::Normal => "normal",
            NodeState::FailingOver => "failing_over",
            NodeState::TakingOver => "taking_over",
            NodeState::RunningInBackupMode => "running_in_backup_mode",
            NodeState::FailedOver => "failed_over",
            NodeState::FailedOverCriticalServicesNotRunning => "failed_over_critical_services_not_running",
            NodeState::Idle => "idle",
            NodeState::FallingBack => "falling_back",
            NodeState::TakingBack => "taking_back",
            NodeState::RunningInFailedMode => "running_in_failed_mode",
            NodeState::Unknown => "unknown",
        }
    }

    /// Whether this node may host rooms (its own or the peer's) in this state.
    pub fn hosts_rooms(self) -> bool {
        matches!(
            self,
            NodeState::Normal
                | NodeState::TakingOver
                | NodeState::RunningInBackupMode
                | NodeState::FallingBack
                | NodeState::TakingBack
                | NodeState::RunningInFailedMode
        )
    }

    /// Whose rooms a node in this state serves: (its own, its peer's). Heartbeats carry it to
    /// every node of the cluster, which route room requests by it (docs/clusters.md).
    pub fn serves(self) -> (bool, bool) {
        let peers = matches!(
            self,
            NodeState::TakingOver | NodeState::RunningInBackupMode | NodeState::FallingBack | NodeState::RunningInFailedMode
        );
        (self.hosts_rooms(), peers)
    }

    /// Is `to` a legal next state from `self`?
    pub fn can_become(self, to: NodeState) -> bool {
        use NodeState::*;
        matches!(
            (self, to),
            (Initializing, Normal | FailedOver | FailedOverCriticalServicesNotRunning | RunningInFailedMode | Idle)
                // A node that starts holding its peer's service (the pair stopped while it backed the peer up).
                | (Initializing, RunningInBackupMode)
                | (Normal, FailingOver | TakingOver | Idle)
                // A node that finds its rooms taken (paused past its lease) steps down.
                | (RunningInBackupMode | FallingBack | TakingBack | RunningInFailedMode, FailingOver)
                | (FailingOver, FailedOver | FailedOverCriticalServicesNotRunning)
                // A failed-over node whose backup dies takes everything over.
                | (FailedOver | FailedOverCriticalServicesNotRunning | RunningInFailedMode, TakingOver)
                | (TakingOver, RunningInBackupMode | Normal | FailedOver)
                | (RunningInBackupMode, FallingBack | Normal)
                | (FallingBack, Normal | RunningInBackupMode)
                | (FailedOver | FailedOverCriticalServicesNotRunning, TakingBack | FailedOver)
                | (FailedOverCriticalServicesNotRunning, FailedOverCriticalServicesNotRunning)
                | (TakingBack, Normal | FailedOver)
                | (RunningInFailedMode, Normal | RunningInBackupMode)
                | (Idle, Normal | Initializing)
                | (Unknown, _)
                | (_, Unknown)
        )
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OnAdminRequest => "on_admin_request",
            Reason::OnCriticalServiceDown => "on_critical_service_down",
            Reason::OnPeerDown => "on_peer_down",
            Reason::Initializing => "initializing",
            Reason::AutomaticFallback => "automatic_fallback",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::NodeState::*;
    use super::*;

    #[test]
    fn failover_and_fallback_paths_are_legal() {
        // The peer dies: the survivor takes over, later falls back.
        for (a, b) in [(Initializing, Normal), (Normal, TakingOver), (TakingOver, RunningInBackupMode), (RunningInBackupMode, FallingBack), (FallingBack, Normal)] {
            assert!(a.can_become(b), "{a} -> {b}");
        }
        // A critical service fails: the node fails over, later takes its rooms back.
        for (a, b) in [(Normal, FailingOver), (FailingOver, FailedOverCriticalServicesNotRunning), (FailedOverCriticalServicesNotRunning, TakingBack), (TakingBack, Normal)] {
            assert!(a.can_become(b), "{a} -> {b}");
        }
        // The pair was stopped while this node backed its peer up: it starts in backup mode.
        assert!(Initializing.can_become(RunningInBackupMode));
    }

    #[test]
    fn shortcuts_are_refused() {
        assert!(!Normal.can_become(RunningInBackupMode), "backup mode only after taking over");
        assert!(!FailedOver.can_become(Normal), "a failed-over node must take its rooms back first");
        assert!(!FailingOver.can_become(Normal), "a node that gave its rooms away must take them back");
        assert!(!Initializing.can_become(TakingBack), "a starting node takes nothing back by itself");
    }

    #[test]
    fn names_are_snake_case_everywhere() {
        assert_eq!(serde_json::to_string(&FailedOverCriticalServicesNotRunning).unwrap(), "\"failed_over_critical_services_not_running\"");
        assert_eq!(serde_json::to_string(&Reason::OnPeerDown).unwrap(), "\"on_peer_down\"");
        assert!(RunningInBackupMode.hosts_rooms() && !FailedOver.hosts_rooms());
    }
}
