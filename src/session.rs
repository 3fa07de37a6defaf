//! The room-facing side of a v1 client session: where rooms deliver for one connection, and
//! the v1 encoder of room events and answers.
//!
//! Every frame a client receives (answers, events, replayed history) goes through the
//! session's one bounded outbound queue, so a room can write `joined`, the history and live
//! messages in exactly the order the client must see them. A session that lets its queue fill
//! is a slow consumer: it is disconnected and nobody else waits for it.
//!
//! Rooms see a session only as an [`Occupant`]; an event delivered to many v1 sessions is
//! turned into its JSON frame once ([`Delivery::encoded`]), and each session queues a clone.

use crate::event::{ChatMessage, Delivery, Occupant, Protocol, RoomAnswer, RoomEvent};
use crate::protocol::{MessageEvent, RoomAddr, ServerFrame};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
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
    rooms: Mutex<HashSet<RoomAddr>>,
    /// The SHA-256 of the session token it logged in with (none for sessions forwarded by the
    /// peer), so an administrator can end the connections of one stored session.
    token_hash: Option<String>,
}

impl SessionHandle {
    /// A handle writing to `outbound`; `kill` is cancelled to disconnect the session.
    pub fn new(id: u64, user: String, outbound: mpsc::Sender<Outbound>, kill: CancellationToken) -> Self {
        SessionHandle { id, user, outbound, kill, killed_for: Mutex::new(None), rooms: Mutex::new(HashSet::new()), token_hash: None }
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

impl Occupant for SessionHandle {
    fn id(&self) -> u64 {
        self.id
    }

    fn user(&self) -> &str {
        &self.user
    }

    fn deliver(&self, event: &Arc<Delivery>) {
        self.push(v1_frame(event));
    }

    fn answer(&self, answer: RoomAnswer) {
        match answer {
            RoomAnswer::Joined { re, room, nick, last_seq, occupants, subject, affiliation, truncated, replay } => {
                self.send(&ServerFrame::Joined { re, room, nick, last_seq, occupants, subject, affiliation, truncated });
                for event in &replay {
                    self.push(v1_frame(event));
                }
            }
            RoomAnswer::Left { re, room } => self.send(&ServerFrame::Left { re, room }),
            RoomAnswer::Ack { re, room, seq, ts, duplicate } => self.send(&ServerFrame::Ack { re, room, seq, ts, duplicate }),
            RoomAnswer::Error { re, room, code, message } => {
                self.send(&ServerFrame::Error { re, code, message, room: Some(room), retry_after_ms: None })
            }
        }
    }

    fn entered(&self, room: &RoomAddr) {
        self.rooms.lock().expect("rooms lock poisoned").insert(room.clone());
    }

    fn exited(&self, room: &RoomAddr) {
        self.rooms.lock().expect("rooms lock poisoned").remove(room);
    }
}

/// The v1 frame of a delivery, serialized once per delivery however many sessions get it.
fn v1_frame(delivery: &Delivery) -> Utf8Bytes {
    delivery.encoded(Protocol::V1, |event| Utf8Bytes::from(event_frame(event).to_json()))
}

/// The v1 frame of a room event.
pub fn event_frame(event: &RoomEvent) -> ServerFrame {
    match event {
        RoomEvent::Message(m) => ServerFrame::Message(message_event(m)),
        RoomEvent::Presence { room, user, nick, status, reason } => ServerFrame::Presence {
            room: room.clone(),
            user: user.clone(),
            nick: nick.clone(),
            status: status.clone(),
            reason: reason.clone(),
        },
        RoomEvent::Subject { room, subject, by } => ServerFrame::Subject { room: room.clone(), subject: subject.clone(), by: by.clone() },
        RoomEvent::Configured { room, config } => ServerFrame::Configured { room: room.clone(), config: config.public_view() },
        RoomEvent::Destroyed { room, reason } => ServerFrame::Destroyed { room: room.clone(), reason: reason.clone() },
        RoomEvent::Moved { room, to } => ServerFrame::Moved { room: room.clone(), to: to.clone() },
    }
}

/// The v1 form of a message.
pub fn message_event(m: &ChatMessage) -> MessageEvent {
    MessageEvent {
        room: m.room.clone(),
        seq: m.seq,
        from: m.from.clone(),
        nick: m.nick.clone(),
        body: m.body.clone(),
        cid: m.cid.clone(),
        ts: m.ts,
    }
}

/// Count an error frame in `stoa_errors_total{code}`.
pub fn count_error(frame: &ServerFrame) {
    if let ServerFrame::Error { code, .. } = frame {
        metrics::counter!("stoa_errors_total", "code" => code.as_str()).increment(1);
    }
}
