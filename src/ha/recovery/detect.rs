//! What the control loop watches and decides: the starting state, the loop itself, the node's
//! critical services, the peer (link, lease, presence lock) and, on a failed-over node, its home.

use super::*;
use crate::ha::link::next_change;

impl Control {
    /// Start-up: normal, unless the peer serves this node's rooms (then wait for fallback), or
    /// reclaim them if that peer is gone too (both nodes failed; this one came back first).
    /// A node that finds itself serving its peer's service (the pair was stopped while it
    /// backed the peer up) runs in backup mode and returns it once the peer is up.
    pub(super) async fn initial_state(&mut self) -> Result<(), ClusterError> {
        let inner = self.inner();
        let served_by = inner.store.service_host(self.me()).await?;
        if &served_by == self.me() {
            self.host(true).await?;
            let backing_up = match self.peer() {
                Some(peer) => &inner.store.service_host(&peer.id).await? == self.me(),
                None => false,
            };
            if backing_up {
                tracing::info!(node = %self.me(), "this node serves its peer's rooms since before it started: backup mode until the peer is up");
                self.return_on_peer_start = true;
                self.enter(NodeState::RunningInBackupMode, Reason::Initializing).await;
            } else {
                self.enter(NodeState::Normal, Reason::Initializing).await;
            }
            return Ok(());
        }
        if let Some(peer) = self.peer() {
            let peer_lease = inner.store.lease(&peer.id).await?;
            let peer_gone = peer_lease.is_none_or(|l| l.expired) && !inner.store.is_present(&peer.id).await?;
            if peer_gone {
                let moved = inner.store.return_home(self.me(), &peer.id).await?;
                tracing::info!(node = %self.me(), peer = %peer.id, rooms = moved, "peer is down too: reclaimed this node's rooms");
                self.host(true).await?;
                self.enter(NodeState::Normal, Reason::Initializing).await;
                return Ok(());
            }
        }
        tracing::info!(node = %self.me(), by = %served_by, "this node's rooms are served by its peer: failed over, waiting for fallback");
        self.enter(NodeState::FailedOver, Reason::Initializing).await;
        Ok(())
    }

    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner().config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_lease_look = Instant::now();
        // A link going down is looked at at once, not at the next tick.
        let mut link_changes = self.inner().link.as_ref().map(|l| l.host_changes());
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = next_change(&mut link_changes) => {}
                command = commands.recv() => match command {
                    Some(Command::Admin(request, reply)) => {
                        let answer = self.admin(request).await;
                        match &answer {
                            Ok(Outcome::Done(m)) => tracing::info!(node = %self.me(), "{m}"),
                            Ok(Outcome::Forward(c)) => tracing::info!(node = %self.me(), ?c, "passing the request to the peer"),
                            Err(m) => tracing::warn!(node = %self.me(), "admin request refused: {m}"),
                        }
                        if let Some(reply) = reply {
                            let _ = reply.send(answer);
                        }
                    }
                    Some(Command::LeaseLost) => self.step_down().await,
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.watch_services().await {
                tracing::warn!(error = %e, "service check failed");
            }
            let look_at_lease = Instant::now() >= next_lease_look;
            if look_at_lease {
                next_lease_look = Instant::now() + self.inner().config.renew;
            }
            if let Err(e) = self.watch_peer(look_at_lease).await {
                tracing::warn!(error = %e, "peer check failed");
            }
            if let Err(e) = self.watch_home().await {
                tracing::warn!(error = %e, "fallback check failed");
            }
        }
    }

    /// Critical services: restart what came back; fail over when one stays down too long.
    async fn watch_services(&mut self) -> Result<(), ClusterError> {
        {
            // The store's probe is the lease renewal; rooms and router are probed by `probe_task`.
            let store_ok = self.inner().status.lock().expect("ha status lock").store_ok;
            self.inner().services.lock().expect("services lock")[Service::Store.index()].probe_ok = store_ok;
        }
        let down_longest = {
            let mut flags = self.inner().services.lock().expect("services lock");
            let mut longest: Option<Duration> = None;
            for service in Service::ALL {
                let f = &mut flags[service.index()];
                let down = f.admin_stopped || !f.probe_ok;
                match (down, f.down_since) {
                    (true, None) => f.down_since = Some(Instant::now()),
                    (false, Some(_)) => f.down_since = None,
                    _ => {}
                }
                if let Some(t) = f.down_since {
                    longest = Some(longest.unwrap_or_default().max(t.elapsed()));
                }
            }
            longest
        };
        match (self.state(), down_longest) {
            // Only to a peer that can take the rooms: with the peer gone too, limping on is
            // better than going dark.
            (NodeState::Normal, Some(d))
                if d >= self.inner().config.service_down_delay && self.peer_status().is_some_and(|p| p.reachable) =>
            {
                self.fail_over(Reason::OnCriticalServiceDown).await;
            }
            (NodeState::FailedOverCriticalServicesNotRunning, None) => {
                self.enter(NodeState::FailedOver, Reason::OnCriticalServiceDown).await;
            }
            (NodeState::FailedOver, Some(_)) => {
                self.enter(NodeState::FailedOverCriticalServicesNotRunning, Reason::OnCriticalServiceDown).await;
            }
            _ => {}
        }
        Ok(())
    }

    /// Take over the peer's rooms when the store says it is gone: its lease expired (or was
    /// released), or its link closed and its presence lock vanished (a dead process).
    async fn watch_peer(&mut self, look_at_lease: bool) -> Result<(), ClusterError> {
        let Some(peer) = self.peer().cloned() else { return Ok(()) };
        let status = self.peer_status();
        if status.as_ref().is_some_and(|p| p.reachable) {
            self.peer_seen_alive = true;
        }
        let state = self.state();
        let may_take_over = matches!(state, NodeState::Normal | NodeState::FailedOver | NodeState::RunningInFailedMode);
        if !may_take_over {
            return Ok(());
        }
        let suspicious = match &status {
            None => true,
            Some(p) => {
                !p.reachable
                    || matches!(
                        p.state,
                        Some(NodeState::FailingOver | NodeState::FailedOver | NodeState::FailedOverCriticalServicesNotRunning)
                    )
            }
        };
        if !suspicious && !look_at_lease {
            return Ok(());
        }
        let store = &self.inner().store;
        let peer_lease = store.lease(&peer.id).await?;
        // Nothing to take: the peer hosts no room, and it has never run (a new pair) or its
        // service is served elsewhere already.
        if store.rooms_hosted_by(&peer.id).await? == 0
            && (peer_lease.is_none() || store.service_host(&peer.id).await? != peer.id)
        {
            return Ok(());
        }
        let expired = peer_lease.as_ref().is_none_or(|l| l.expired);
        let link_down = status.as_ref().is_none_or(|p| !p.link_up);
        let dead = !expired && link_down && !store.is_present(&peer.id).await?;
        if expired || dead {
            tracing::warn!(node = %self.me(), peer = %peer.id, lease_expired = expired, process_gone = dead, "peer is down: taking over its rooms");
            self.take_over(&peer).await;
        }
        Ok(())
    }
}
