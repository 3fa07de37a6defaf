//! How a room stops: passivation when idle, a hand-off to another node (failover, fallback),
//! and stopping once fenced; each tells every occupant before it lets them go.

use super::*;

impl Room {
    /// This incarnation may no longer write: tell the occupants and stop. The next request
    /// for the room activates a fresh incarnation from the store (or finds it moved).
    pub(super) fn stop_fenced(&mut self, ctx: &mut Context<Self>) {
        self.passivating = true;
        self.fail_all(ErrorCode::Unavailable, "room is no longer served here; retry");
        let farewell = match &self.deps.peer_client {
            // In a pair, a fenced room has moved to the peer: say so.
            Some(peer) => Farewell::Event(Delivery::new(RoomEvent::Moved { room: self.addr.clone(), to: peer.clone() })),
            None => Farewell::Answer(RoomAnswer::Error {
                re: None,
                room: self.addr.clone(),
                code: ErrorCode::Unavailable,
                message: "room is no longer served here; join again".into(),
            }),
        };
        self.dismiss_all_and_stop(farewell, ctx);
    }

    /// Tell every occupant `farewell` (they are no longer in the room here), deregister, stop.
    fn dismiss_all_and_stop(&mut self, farewell: Farewell, ctx: &mut Context<Self>) {
        for session in self.occupants.values() {
            match &farewell {
                Farewell::Event(event) => session.deliver(event),
                Farewell::Answer(answer) => session.answer(answer.clone()),
            }
            session.exited(&self.addr);
        }
        self.occupants.clear();
        self.registrar.passivated(&self.addr, self.incarnation);
        ctx.stop();
    }

    /// During a [`HandOff`]: once no append is in flight, refuse what is queued (nothing of it
    /// was acked; clients resend with the same `cid` on the new host), tell every occupant
    /// `moved`, and stop.
    pub(super) fn finish_handoff_if_drained(&mut self, ctx: &mut Context<Self>) {
        if !self.in_flight.is_empty() || self.resyncing || self.passivating {
            return;
        }
        let Some(handoff) = self.handoff.take() else { return };
        let (to, done) = *handoff;
        self.passivating = true;
        let mut queued: Vec<PendingPost> = self.queue.drain(..).collect();
        queued.extend(self.hooks.drain_posts());
        self.fail_posts(queued, ErrorCode::Unavailable, "room is moving to another node; resend with the same cid");
        let farewell = Farewell::Event(Delivery::new(RoomEvent::Moved { room: self.addr.clone(), to }));
        self.dismiss_all_and_stop(farewell, ctx);
        let _ = done.send(true);
    }
}

/// The registry's sweeper thinks this room has been idle for `after`: stop if it is empty and
/// has nothing queued or in flight.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct PassivateIfIdle {
    pub after: Duration,
}

impl Handler<PassivateIfIdle> for Room {
    type Result = ();

    fn handle(&mut self, msg: PassivateIfIdle, ctx: &mut Context<Self>) {
        let idle_ms = crate::clock::monotonic_ms().saturating_sub(self.activity.load(std::sync::atomic::Ordering::Relaxed));
        let idle = self.occupants.is_empty() && self.queue.is_empty() && self.in_flight.is_empty() && self.hooks.len() == 0 && !self.resyncing;
        if idle && idle_ms >= msg.after.as_millis() as u64 && !self.passivating {
            self.passivating = true;
            tracing::debug!(room = %self.addr, "passivating idle room");
            self.registrar.passivated(&self.addr, self.incarnation);
            ctx.stop();
        }
    }
}

/// Move this room away (failover of its host, or fallback to its home): stop taking posts,
/// let the appends in flight finish (their acks go out), then tell the occupants `moved` to
/// `to` and stop. `done` gets `true` once stopped, `false` if the room is not `only_home`'s.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HandOff {
    /// Hand off only a room whose home is this node (`None`: any room).
    pub only_home: Option<crate::ids::NodeId>,
    /// The client address (`host:port`) the room is moving to.
    pub to: String,
    pub done: tokio::sync::oneshot::Sender<bool>,
}

impl Handler<HandOff> for Room {
    type Result = ();

    fn handle(&mut self, msg: HandOff, ctx: &mut Context<Self>) {
        if msg.only_home.as_ref().is_some_and(|home| *home != self.home) || self.passivating {
            let _ = msg.done.send(false);
            return;
        }
        self.handoff = Some(Box::new((msg.to, msg.done)));
        self.flush(ctx);
    }
}
