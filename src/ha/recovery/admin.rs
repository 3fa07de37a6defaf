//! Admin requests the recovery manager carries out: failover, fallback, critical services
//! stopped and started; or passes to the peer when they are the peer's to do.

use super::*;

impl Control {
    pub(super) async fn admin(&mut self, request: Request) -> Result<Outcome, String> {
        let me = self.me().0.clone();
        let peer = self.peer().cloned();
        let is_peer = |node: &str| peer.as_ref().is_some_and(|p| p.id.0 == node);
        let forward = |command: PeerCommand| Ok(Outcome::Forward(command));
        match request {
            Request::Failover { node } if node == me => {
                if self.state() != NodeState::Normal {
                    return Err(format!("node {me} is {}; only a normal node can fail over", self.state()));
                }
                if self.peer_status().is_none_or(|p| !p.reachable) {
                    return Err(format!("node {me}'s peer is not reachable; failing over now would leave its rooms unserved"));
                }
                self.fail_over(Reason::OnAdminRequest).await;
                Ok(Outcome::Done(format!("node {me} is failing over to its peer")))
            }
            Request::Failover { node } if is_peer(&node) => forward(PeerCommand::Failover { node }),
            Request::Fallback { node } if is_peer(&node) => {
                let peer = peer.expect("is_peer");
                self.fall_back(&peer, Reason::OnAdminRequest).await.map(Outcome::Done)
            }
            Request::Fallback { node } if node == me => match self.state() {
                NodeState::FailedOver => forward(PeerCommand::Fallback { node }),
                NodeState::FailedOverCriticalServicesNotRunning => {
                    let down: Vec<&str> = self.r.services().iter().filter(|s| !s.running).map(|s| s.service.as_str()).collect();
                    Err(format!(
                        "node {me} still has its critical service {} down: start it first (stoa admin service start {} {me})",
                        down.join(", "),
                        down.first().copied().unwrap_or("SERVICE")
                    ))
                }
                s => Err(format!("node {me} is {s}, not failed over: nothing to fall back")),
            },
            Request::Service { node, service, start } if node == me => {
                self.set_service(service, start).await;
                Ok(Outcome::Done(format!("service {} on node {me} {}", service.as_str(), if start { "started" } else { "stopped" })))
            }
            Request::Service { node, service, start } if is_peer(&node) => {
                forward(PeerCommand::Service { node, service: service.as_str().to_owned(), start })
            }
            Request::Failover { node } | Request::Fallback { node } | Request::Service { node, .. } => {
                Err(format!("node {node} is neither this node ({me}) nor its peer"))
            }
        }
    }

    /// Stop or start a critical service. Stopping takes effect at once (rooms stop, logins are
    /// refused, or the lease stops being renewed); failover follows after the delay.
    async fn set_service(&mut self, service: Service, start: bool) {
        let inner = self.inner();
        inner.services.lock().expect("services lock")[service.index()].admin_stopped = !start;
        let hosting = self.state().hosts_rooms();
        match (service, start) {
            (Service::Rooms, false) => {
                inner.registry.set_hosting(false);
                let to = self.peer().map(|p| p.client.clone()).unwrap_or_default();
                inner.registry.hand_off(None, &to, Duration::from_secs(10)).await;
            }
            (Service::Rooms, true) => inner.registry.set_hosting(hosting),
            (Service::Router, false) => {
                inner.gateway.set_accepting(false);
                let to = self.peer().map(|p| p.client.clone());
                inner.gateway.goaway_all("the router service was stopped", to);
            }
            (Service::Router, true) => inner.gateway.set_accepting(hosting),
            // The lease task stops renewing; the write gate closes by itself.
            (Service::Store, _) => {}
        }
    }
}
