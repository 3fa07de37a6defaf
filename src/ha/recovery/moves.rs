//! The moves: entering a state, holding the lease, taking the peer's rooms over, failing over,
//! stepping down, taking rooms back and falling back (automatically or on request).

use super::*;

/// How long a fallback waits for a peer recorded as `failing_over` to be recorded as
/// `failed_over` (its recorded state lags its own by one store write).
const FAILING_OVER_SETTLE: Duration = Duration::from_secs(2);

impl Control {
    /// Enter `state` (if legal from the current one), record it and log it.
    pub(super) async fn enter(&self, state: NodeState, reason: Reason) {
        let from = {
            let mut s = self.inner().status.lock().expect("ha status lock");
            let from = s.state;
            if from == state && s.reason == reason {
                return;
            }
            if !from.can_become(state) {
                tracing::error!(node = %self.me(), %from, to = %state, "illegal recovery transition refused");
                return;
            }
            s.state = state;
            s.reason = reason;
            s.since_ms = now_ms();
            // Published under the status lock: the watch never disagrees with the status.
            self.inner().watch.state.send_replace(state);
            from
        };
        metrics::counter!("stoa_ha_transitions_total", "state" => state.as_str()).increment(1);
        tracing::info!(node = %self.me(), %from, to = %state, %reason, "recovery state");
        let incarnation = self.inner().incarnation.load(Ordering::Acquire);
        if let Err(e) = self.inner().store.record_node_state(self.me(), state.as_str(), reason.as_str(), incarnation).await {
            tracing::warn!(error = %e, "could not record the transition in node_states");
        }
    }

    /// Serve rooms and clients (after a fresh lease renewal opened the gate), or stop.
    pub(super) async fn host(&self, on: bool) -> Result<(), ClusterError> {
        let inner = self.inner();
        if on {
            let started = Instant::now();
            let incarnation = inner.incarnation.load(Ordering::Acquire);
            if !inner.store.extend_lease(self.me(), incarnation, inner.config.ttl).await? {
                self.new_lease().await?;
            }
            inner.gate.open_until(started + inner.config.ttl - margin(inner.config.ttl));
            let services = inner.services.lock().expect("services lock");
            inner.registry.set_hosting(!services[Service::Rooms.index()].admin_stopped);
            inner.gateway.set_accepting(!services[Service::Router.index()].admin_stopped);
        } else {
            inner.gate.close();
            inner.registry.set_hosting(false);
            inner.gateway.set_accepting(false);
        }
        Ok(())
    }

    /// Take the lease again under a new incarnation (after stepping down or failing over).
    async fn new_lease(&self) -> Result<(), ClusterError> {
        let inner = self.inner();
        let incarnation = now_ms().max(inner.incarnation.load(Ordering::Acquire) + 1);
        inner.store.renew_lease(self.me(), incarnation, inner.config.ttl).await?;
        inner.incarnation.store(incarnation, Ordering::Release);
        inner.lease_wanted.store(true, Ordering::Release);
        Ok(())
    }

    pub(super) fn peer(&self) -> Option<&PeerRef> {
        self.inner().config.peer.as_ref()
    }

    pub(super) fn peer_status(&self) -> Option<PeerStatus> {
        self.r.link().and_then(|l| l.peer())
    }


    /// Fence every room the peer hosts with one statement, activate the ones it had active,
    /// and run in backup mode.
    pub(super) async fn take_over(&mut self, peer: &PeerRef) {
        let was = self.state();
        let decided = Instant::now();
        self.enter(NodeState::TakingOver, Reason::OnPeerDown).await;
        let inner = self.inner();
        // Our own lease must be good before we serve anything.
        if let Err(e) = self.host(true).await {
            tracing::error!(error = %e, "cannot renew this node's lease; not taking over");
            self.host(false).await.ok();
            self.enter(was, Reason::OnPeerDown).await;
            return;
        }
        let moved = match inner.store.take_over(&peer.id, self.me()).await {
            Ok(n) => n,
            Err(e) => {
                // Nothing moved (the statement is one transaction): back to where we were, and
                // the next check tries again.
                tracing::warn!(error = %e, "takeover statement failed; will retry");
                if !was.hosts_rooms() {
                    self.host(false).await.ok();
                }
                self.enter(was, Reason::OnPeerDown).await;
                return;
            }
        };
        let fence_ms = decided.elapsed().as_millis() as u64;
        refresh_room_statistics(inner.store.clone());
        metrics::counter!("stoa_ha_takeovers_total").increment(1);
        metrics::histogram!("stoa_ha_takeover_fence_seconds").record(decided.elapsed().as_secs_f64());
        let return_on_peer_start = !self.peer_seen_alive;
        self.return_on_peer_start = return_on_peer_start;
        let inner = self.inner();
        tracing::info!(
            node = %self.me(),
            peer = %peer.id,
            rooms = moved,
            fence_ms,
            return_on_peer_start,
            "peer's rooms fenced and taken over"
        );
        // Activate what the peer had active, so its clients' rejoins find warm rooms: reserved
        // before anyone learns of the takeover, so that their requests wait for the bulk load
        // instead of each reading its room.
        let rooms = self.r.link().map(|l| l.peer_rooms()).unwrap_or_default();
        let reserved = inner.registry.reserve(rooms.into_iter().map(crate::ids::RoomAddr).collect());
        self.enter(NodeState::RunningInBackupMode, Reason::OnPeerDown).await;
        inner.watch.takeovers.send_modify(|n| *n += 1);
        let started = Instant::now();
        let activated = activate_reserved(&inner.registry, reserved).await;
        let activate_ms = started.elapsed().as_millis() as u64;
        tracing::info!(node = %self.me(), activated, activate_ms, "peer's active rooms activated");
        inner.status.lock().expect("ha status lock").last_takeover =
            Some(TakeoverReport { from: peer.id.0.clone(), rooms: moved, fence_ms, activated, activate_ms, at_ms: now_ms() });
    }

    /// This node gives its rooms to the peer: stop serving, finish what is in flight, tell
    /// clients where to go, release the lease, and wait until the peer has fenced the rooms.
    pub(super) async fn fail_over(&mut self, reason: Reason) {
        let Some(peer) = self.peer().cloned() else { return };
        self.enter(NodeState::FailingOver, reason).await;
        let inner = self.inner();
        self.host(false).await.ok();
        let handed = inner.registry.hand_off(None, &peer.client, Duration::from_secs(10)).await;
        inner.lease_wanted.store(false, Ordering::Release);
        if let Err(e) = inner.store.release_lease(self.me()).await {
            tracing::warn!(error = %e, "could not release the lease; the peer waits for it to expire");
        }
        let told = inner.gateway.goaway_all("node is failing over; resume on its peer", Some(peer.client.clone()));
        tracing::info!(node = %self.me(), rooms = handed, sessions = told, "failing over: rooms handed off, clients sent to the peer");
        self.awaiting_takeover = true;
    }

    /// The peer took this node's rooms while it was not looking (paused, or cut off from the
    /// store): stop serving at once and wait for fallback.
    pub(super) async fn step_down(&mut self) {
        let state = self.state();
        if !state.hosts_rooms() {
            return;
        }
        let inner = self.inner();
        self.host(false).await.ok();
        let to = self.peer().map(|p| p.client.clone()).unwrap_or_default();
        let told = inner.gateway.goaway_all("this node's rooms moved to its peer", Some(to.clone()));
        let handed = inner.registry.hand_off(None, &to, Duration::from_secs(10)).await;
        tracing::warn!(node = %self.me(), rooms = handed, sessions = told, "stepped down: the peer serves this node's rooms");
        self.enter(NodeState::FailingOver, Reason::OnPeerDown).await;
        if let Err(e) = self.new_lease().await {
            tracing::warn!(error = %e, "could not take a new lease");
        }
        self.enter(NodeState::FailedOver, Reason::OnPeerDown).await;
    }

    /// Failed over: notice the takeover (failing over) and the fallback (rooms came home).
    pub(super) async fn watch_home(&mut self) -> Result<(), ClusterError> {
        let store = &self.inner().store;
        match self.state() {
            NodeState::FailingOver if self.awaiting_takeover => {
                // Taken over when the peer serves this node's service (rooms or none) and no
                // room is left here.
                let taken = &store.service_host(self.me()).await? != self.me() && store.rooms_hosted_by(self.me()).await? == 0;
                if taken {
                    self.awaiting_takeover = false;
                    self.new_lease().await?;
                    let critical = self.r.services().iter().any(|s| !s.running);
                    let (state, reason) = {
                        let s = self.inner().status.lock().expect("ha status lock");
                        (if critical { NodeState::FailedOverCriticalServicesNotRunning } else { NodeState::FailedOver }, s.reason)
                    };
                    self.enter(state, reason).await;
                }
            }
            NodeState::FailedOver => self.take_back_if_returned().await?,
            NodeState::RunningInBackupMode => {
                let peer = self.peer().map(|p| p.id.clone());
                let still_backing_up = match &peer {
                    Some(peer) => &store.service_host(peer).await? == self.me(),
                    None => false,
                };
                if still_backing_up {
                    self.maybe_auto_fallback().await;
                } else {
                    // The peer reclaimed its service itself (it started while this node was
                    // down, or both started at once): nothing is backed up here any more.
                    tracing::info!(node = %self.me(), "the peer serves its own rooms again: back to normal");
                    self.return_on_peer_start = false;
                    let reason = self.inner().status.lock().expect("ha status lock").reason;
                    self.enter(NodeState::Normal, reason).await;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Failed over: once this node's service is its own again (the backup gave it back, or a
    /// recovery returned it), take the lease and serve, with the reason the backup gave the
    /// rooms back for (an operator's fallback, or automatic).
    async fn take_back_if_returned(&mut self) -> Result<(), ClusterError> {
        if &self.inner().store.service_host(self.me()).await? != self.me() {
            return Ok(());
        }
        let backup_reason = match self.peer() {
            Some(peer) => self.inner().store.last_node_state(&peer.id).await?.map(|r| r.reason),
            None => None,
        };
        let reason = match backup_reason.as_deref() {
            Some("automatic_fallback") => Reason::AutomaticFallback,
            _ => Reason::OnAdminRequest,
        };
        self.enter(NodeState::TakingBack, reason).await;
        if let Err(e) = self.host(true).await {
            tracing::warn!(error = %e, "cannot take the lease back yet");
            self.enter(NodeState::FailedOver, reason).await;
            return Ok(());
        }
        // Warm up the rooms that were active on the backup, for the clients it is sending here:
        // the list it sent as it handed them back (its active-room list no longer has them),
        // else its last active-room list. Reserved at once, so that those clients' requests
        // wait for the bulk load instead of each reading its room.
        let service = self.inner().gateway.settings.node.service.clone();
        let mine: Vec<crate::ids::RoomAddr> = self
            .r
            .link()
            .map(|l| Some(l.take_handed_back()).filter(|r| !r.is_empty()).unwrap_or_else(|| l.peer_rooms()))
            .unwrap_or_default()
            .into_iter()
            .map(crate::ids::RoomAddr)
            .filter(|r| r.service() == service.as_str())
            .collect();
        let registry = &self.inner().registry;
        let reserved = registry.reserve(mine);
        let started = Instant::now();
        let n = activate_reserved(registry, reserved).await;
        tracing::info!(node = %self.me(), activated = n, activate_ms = started.elapsed().as_millis() as u64, "rooms taken back and activated");
        self.enter(NodeState::Normal, reason).await;
        Ok(())
    }

    async fn maybe_auto_fallback(&mut self) {
        let after = if self.return_on_peer_start { Some(Duration::ZERO) } else { self.inner().config.auto_fallback_after };
        let Some(after) = after else { return };
        let Some(peer) = self.peer().cloned() else { return };
        let healthy = self.peer_status().is_some_and(|p| p.reachable && p.state == Some(NodeState::FailedOver));
        if !healthy {
            self.healthy_since = None;
            return;
        }
        let since = *self.healthy_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= after {
            self.healthy_since = None;
            if let Err(e) = self.fall_back(&peer, Reason::AutomaticFallback).await {
                tracing::warn!("automatic fallback not done: {e}");
            }
        }
    }

    /// On the backup: hand `peer`'s rooms back. Rooms finish their appends in flight, their
    /// occupants are told `moved`, then one statement gives them back with a new epoch.
    pub(super) async fn fall_back(&mut self, peer: &PeerRef, reason: Reason) -> Result<String, String> {
        if self.state() != NodeState::RunningInBackupMode {
            return Err(format!("node {} is {}, not running_in_backup_mode: nothing to fall back", self.me(), self.state()));
        }
        let store = &self.inner().store;
        let peer_lease = store.lease(&peer.id).await.map_err(|e| e.to_string())?;
        if peer_lease.is_none_or(|l| l.expired) {
            return Err(format!("node {} is not running (its lease has expired): start it first", peer.id));
        }
        // The peer's recorded state (written before its heartbeats can tell). It lags the peer's
        // own view by one store write (`enter` publishes, then records): a fallback asked the
        // moment the peer reports `failed_over` can still read `failing_over`, so that
        // passing state is read again for a little while before it counts as the answer.
        let mut recorded = store.last_node_state(&peer.id).await.map_err(|e| e.to_string())?.map(|r| r.state);
        let settle = Instant::now() + FAILING_OVER_SETTLE;
        while recorded.as_deref() == Some("failing_over") && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(50)).await;
            recorded = store.last_node_state(&peer.id).await.map_err(|e| e.to_string())?.map(|r| r.state);
        }
        match recorded.as_deref() {
            Some("failed_over") => {}
            Some("failed_over_critical_services_not_running") => {
                let down = self.peer_status().map(|p| p.services_down).unwrap_or_default();
                let named = if down.is_empty() { "a critical service".to_owned() } else { format!("its critical service {}", down.join(", ")) };
                let first = down.first().map_or("SERVICE", String::as_str);
                return Err(format!(
                    "node {} still has {named} down: start it first (stoa admin service start {first} {})",
                    peer.id, peer.id
                ));
            }
            other => return Err(format!("node {} is {}, not failed_over: it cannot take its rooms back now", peer.id, other.unwrap_or("unknown"))),
        }
        let started = Instant::now();
        self.enter(NodeState::FallingBack, reason).await;
        let inner = self.inner();
        inner.registry.block_home(&peer.id);
        // The peer's rooms active here, for it to load in bulk as it takes them back.
        if let (Some(link), Some(service)) = (self.r.link(), inner.gateway.settings.peer().map(|p| p.service.as_str())) {
            link.hand_back(inner.registry.active_addresses().into_iter().filter(|r| r.service() == service).map(|r| r.0).collect());
        }
        let handed = inner.registry.hand_off(Some(&peer.id), &peer.client, Duration::from_secs(10)).await;
        let mut attempts = 0;
        let moved = loop {
            match store.return_home(&peer.id, self.me()).await {
                Ok(n) => break n,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    tracing::warn!(error = %e, "fallback statement failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    // The rooms never left: serve them here again.
                    inner.registry.unblock_home(&peer.id);
                    self.enter(NodeState::RunningInBackupMode, reason).await;
                    return Err(format!("fallback failed, the rooms stay on {}: {e}", self.me()));
                }
            }
        };
        inner.registry.unblock_home(&peer.id);
        refresh_room_statistics(store.clone());
        self.return_on_peer_start = false;
        self.enter(NodeState::Normal, reason).await;
        let ms = started.elapsed().as_millis();
        metrics::counter!("stoa_ha_fallbacks_total").increment(1);
        Ok(format!("fell back: {moved} rooms returned to node {} ({handed} were active here) in {ms} ms", peer.id))
    }
}

/// After a statement moved many rooms: refresh the store's statistics of them in the
/// background (the commits that follow are planned with them; nothing waits for this).
fn refresh_room_statistics(store: crate::store::Store) {
    tokio::spawn(async move {
        let started = Instant::now();
        match store.refresh_room_statistics().await {
            Ok(()) => tracing::info!(ms = started.elapsed().as_millis() as u64, "the store's statistics of rooms refreshed"),
            Err(e) => tracing::warn!(error = %e, "could not refresh the store's statistics of rooms"),
        }
    });
}

/// Load the rooms `reserved` for a bulk activation (takeover, take-back); returns how many
/// were started. Rooms left out activate on first use.
async fn activate_reserved(registry: &RoomRegistry, reserved: Result<Vec<crate::ids::RoomAddr>, crate::room::RoomError>) -> usize {
    match reserved {
        Ok(reserved) => registry.activate_reserved(reserved).await,
        Err(e) => Err(e),
    }
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "bulk activation stopped early; the rest activate on first use");
        0
    })
}
