//! A logged-in client session as rooms and the gateway see it, whatever protocol it speaks.
//!
//! A [`Session`] holds what every front end shares: the session id and user, the rooms it
//! occupies (kept by the rooms themselves), how it was ended, and its [`Wire`]: the front end's
//! side, which encodes room events and answers into that protocol's frames and queues them on
//! the connection's one bounded outbound queue. So a room writes `joined`, the history and live
//! messages in exactly the order the client must see them. A session that lets its queue fill
//! is a slow consumer: it is disconnected and nobody else waits for it.
//!
//! Rooms see a session only as an [`Occupant`].

use crate::ids::{RoomAddr, SessionId};
use crate::event::{Delivery, Occupant, RoomAnswer};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Why a session was ended by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// The outbound queue was full.
    SlowConsumer,
    /// The node is shutting down.
    Shutdown,
    /// The node no longer serves this session (failover): it was told `goaway`.
    Moved,
    /// An administrator ended the session (`stoa session kick`); its token no longer works.
    Kicked,
}

/// Whether a frame made it onto a connection's outbound queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    Yes,
    /// The queue is full: the session is a slow consumer.
    Full,
    /// The connection is gone.
    Closed,
}

/// A front end's side of a session: it encodes what rooms and the node tell the session in its
/// protocol and queues it. Calls never block.
pub trait Wire: Send + Sync {
    /// An event for everyone in a room.
    fn deliver(&self, event: &Arc<Delivery>) -> Queued;
    /// The answer to one of the session's requests (or a room's word about itself).
    fn answer(&self, answer: RoomAnswer) -> Queued;
    /// The node stops serving this session: where to go (a client address), and why.
    fn goaway(&self, reason: &str, to: Option<&str>) -> Queued;
}

/// A connected, logged-in session. Shared (`Arc`) between its connection, the gateway's
/// session table and every room it occupies.
pub struct Session {
    /// Unique per node process.
    pub id: SessionId,
    /// The logged-in user name.
    pub user: String,
    /// The client's address (its rooms created count against it); none for the stand-ins of
    /// the peer's sessions (`crate::forward`).
    pub address: Option<std::net::IpAddr>,
    wire: Box<dyn Wire>,
    kill: CancellationToken,
    killed_for: Mutex<Option<KillReason>>,
    /// Rooms this session occupies, kept by the rooms themselves (join, leave, kick, destroy).
    rooms: Mutex<HashSet<RoomAddr>>,
    /// The session has sent a room operation to another node (`crate::forward`): only then
    /// may a room of it be served there, so the others skip that lookup.
    uses_other_nodes: std::sync::atomic::AtomicBool,
    /// The SHA-256 of the session token it logged in with (none for the stand-ins of the
    /// peer's sessions), so an administrator can end the connections of one stored session.
    token_hash: Option<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id).field("user", &self.user).finish_non_exhaustive()
    }
}

impl Session {
    /// A session writing through `wire`; `kill` is cancelled to disconnect it.
    pub fn new(id: SessionId, user: String, wire: Box<dyn Wire>, kill: CancellationToken) -> Self {
        Session {
            id,
            user,
            address: None,
            wire,
            kill,
            killed_for: Mutex::new(None),
            rooms: Mutex::new(HashSet::new()),
            uses_other_nodes: Default::default(),
            token_hash: None,
        }
    }

    /// Record the hash of the session token this connection logged in with.
    pub fn with_token_hash(mut self, token_hash: String) -> Self {
        self.token_hash = Some(token_hash);
        self
    }

    /// Record the client's address.
    pub fn with_address(mut self, address: Option<std::net::IpAddr>) -> Self {
        self.address = address;
        self
    }

    /// The hash of the session token this connection logged in with, if any.
    pub fn token_hash(&self) -> Option<&str> {
        self.token_hash.as_deref()
    }

    /// A full queue disconnects the session (slow consumer).
    fn queued(&self, q: Queued) {
        if q == Queued::Full {
            self.kill(KillReason::SlowConsumer);
        }
    }

    /// Tell the session to go elsewhere (`goaway` in v1); the caller closes it shortly after.
    pub fn goaway(&self, reason: &str, to: Option<&str>) {
        self.queued(self.wire.goaway(reason, to));
    }

    /// Record that the session sent a room operation to another node.
    pub fn mark_uses_other_nodes(&self) {
        self.uses_other_nodes.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the session ever sent a room operation to another node.
    pub fn uses_other_nodes(&self) -> bool {
        self.uses_other_nodes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Disconnect this session.
    pub fn kill(&self, reason: KillReason) {
        let mut slot = self.killed_for.lock().expect("kill lock poisoned");
        if slot.is_none() {
            *slot = Some(reason);
            if reason == KillReason::SlowConsumer {
                metrics::counter!("stoa_slow_consumers_total").increment(1);
                tracing::info!(session = %self.id, user = %self.user, "disconnecting slow consumer");
            }
        }
        self.kill.cancel();
    }

    /// Why the session was killed, if it was.
    pub fn killed_for(&self) -> Option<KillReason> {
        *self.killed_for.lock().expect("kill lock poisoned")
    }

    /// The token cancelled when the session is killed.
    pub fn kill_token(&self) -> &CancellationToken {
        &self.kill
    }

    /// Does this session occupy `room`?
    pub fn occupies(&self, room: &RoomAddr) -> bool {
        self.rooms.lock().expect("rooms lock poisoned").contains(room)
    }

    /// Every room this session occupies.
    pub fn rooms(&self) -> Vec<RoomAddr> {
        self.rooms.lock().expect("rooms lock poisoned").iter().cloned().collect()
    }

    /// How many rooms this session occupies.
    pub fn room_count(&self) -> usize {
        self.rooms.lock().expect("rooms lock poisoned").len()
    }
}

impl Occupant for Session {
    fn id(&self) -> SessionId {
        self.id
    }

    fn user(&self) -> &str {
        &self.user
    }

    fn deliver(&self, event: &Arc<Delivery>) {
        self.queued(self.wire.deliver(event));
    }

    fn answer(&self, answer: RoomAnswer) {
        self.queued(self.wire.answer(answer));
    }

    fn entered(&self, room: &RoomAddr) {
        self.rooms.lock().expect("rooms lock poisoned").insert(room.clone());
    }

    fn exited(&self, room: &RoomAddr) {
        self.rooms.lock().expect("rooms lock poisoned").remove(room);
    }
}
