//! The room-facing side of a client session: where a room pushes frames for one connection.
//!
//! Every frame a client receives (answers, events, replayed history) goes through the
//! session's one bounded outbound queue, so a room can write `joined`, the history and live
//! messages in exactly the order the client must see them. A session that lets its queue fill
//! is a slow consumer: it is disconnected and nobody else waits for it.

use crate::protocol::{RoomAddr, ServerFrame};
use crate::room::Room;
use actix::Addr;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

/// Something for the connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// A serialized server frame.
    Frame(Utf8Bytes),
    /// A WebSocket ping (idle connection check).
    Ping,
}

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

/// A connected, logged-in session as seen by rooms. Shared (`Arc`) between the connection
/// and every room it occupies.
#[derive(Debug)]
pub struct SessionHandle {
    /// Unique per node process.
    pub id: u64,
    /// The logged-in user name.
    pub user: String,
    outbound: mpsc::Sender<Outbound>,
    kill: CancellationToken,
    killed_for: Mutex<Option<KillReason>>,
    /// Rooms this session occupies, kept by the rooms themselves (join, leave, kick, destroy).
    rooms: Mutex<HashMap<RoomAddr, Addr<Room>>>,
    /// The SHA-256 of the session token it logged in with (none for sessions forwarded by the
    /// peer), so an administrator can end the connections of one stored session.
    token_hash: Option<String>,
}

impl SessionHandle {
    /// A handle writing to `outbound`; `kill` is cancelled to disconnect the session.
    pub fn new(id: u64, user: String, outbound: mpsc::Sender<Outbound>, kill: CancellationToken) -> Self {
        SessionHandle { id, user, outbound, kill, killed_for: Mutex::new(None), rooms: Mutex::new(HashMap::new()), token_hash: None }
    }

    /// Record the hash of the session token this connection logged in with.
    pub fn with_token_hash(mut self, token_hash: String) -> Self {
        self.token_hash = Some(token_hash);
        self
    }

    /// The hash of the session token this connection logged in with, if any.
    pub fn token_hash(&self) -> Option<&str> {
        self.token_hash.as_deref()
    }

    /// Queue a pre-serialized frame. A full queue disconnects the session (slow consumer).
    pub fn push(&self, frame: Utf8Bytes) {
        match self.outbound.try_send(Outbound::Frame(frame)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.kill(KillReason::SlowConsumer),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Queue a frame (error answers are counted in `stoa_errors_total` by code).
    pub fn send(&self, frame: &ServerFrame) {
        count_error(frame);
        self.push(Utf8Bytes::from(frame.to_json()));
    }

    /// Disconnect this session.
    pub fn kill(&self, reason: KillReason) {
        let mut slot = self.killed_for.lock().expect("kill lock poisoned");
        if slot.is_none() {
            *slot = Some(reason);
            if reason == KillReason::SlowConsumer {
                metrics::counter!("stoa_slow_consumers_total").increment(1);
                tracing::info!(session = self.id, user = %self.user, "disconnecting slow consumer");
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

    /// Record that this session now occupies `room` (called by the room).
    pub fn entered(&self, room: RoomAddr, addr: Addr<Room>) {
        self.rooms.lock().expect("rooms lock poisoned").insert(room, addr);
    }

    /// Record that this session no longer occupies `room` (called by the room).
    pub fn exited(&self, room: &RoomAddr) {
        self.rooms.lock().expect("rooms lock poisoned").remove(room);
    }

    /// The actor of a room this session occupies.
    pub fn room(&self, room: &RoomAddr) -> Option<Addr<Room>> {
        self.rooms.lock().expect("rooms lock poisoned").get(room).cloned()
    }

    /// Every room this session occupies.
    pub fn rooms(&self) -> Vec<(RoomAddr, Addr<Room>)> {
        self.rooms.lock().expect("rooms lock poisoned").iter().map(|(r, a)| (r.clone(), a.clone())).collect()
    }

    /// How many rooms this session occupies.
    pub fn room_count(&self) -> usize {
        self.rooms.lock().expect("rooms lock poisoned").len()
    }
}

/// Count an error frame in `stoa_errors_total{code}`.
pub fn count_error(frame: &ServerFrame) {
    if let ServerFrame::Error { code, .. } = frame {
        metrics::counter!("stoa_errors_total", "code" => code.as_str()).increment(1);
    }
}
