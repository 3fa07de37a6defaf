//! What a room tells its occupants, protocol-neutral, and the trait it tells them through.
//!
//! A room emits [`RoomEvent`]s (to everyone in it) and [`RoomAnswer`]s (to one occupant, about
//! one request) to [`Occupant`]s; it knows no wire format. Each front end implements
//! `Occupant` for its sessions and turns events into its own frames. An event on its way to
//! many occupants travels as one [`Delivery`], which caches its encoding per [`Protocol`]: a
//! room of 1,000 v1 occupants serializes a message once, not 1,000 times.
//!
//! A leaf module: ids and data types only, so the room (below the front ends) can name it and
//! every front end (above the room) can implement it.

use crate::ids::{RoomAddr, SessionId};
use crate::protocol::{Affiliation, ErrorCode, OccupantInfo, RequestId, RoomConfig};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::sync::{Arc, OnceLock};

/// A committed message as occupants see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub room: RoomAddr,
    pub seq: u64,
    /// The message's unique id (XMPP's stanza-id), stable wherever the message is stored.
    pub id: String,
    /// The sender's user name.
    pub from: String,
    pub nick: String,
    pub body: String,
    /// The sender's client message id.
    pub cid: String,
    /// Commit-side timestamp, milliseconds since the Unix epoch.
    pub ts: i64,
}

/// What a room tells everyone in it (and, for a presence change, the occupant it is about).
/// Serializable: the node link carries events to the peer's sessions (`crate::forward`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A committed message (live, or replayed on a join).
    Message(ChatMessage),
    /// Someone entered or left the room.
    Presence {
        room: RoomAddr,
        user: String,
        nick: String,
        /// `joined`, `left`, or `kicked`.
        status: String,
        reason: Option<String>,
    },
    /// The subject changed.
    Subject { room: RoomAddr, subject: String, by: String },
    /// The configuration changed; front ends show only its public part.
    Configured { room: RoomAddr, config: Box<RoomConfig> },
    /// The room was destroyed; nobody is in it any more.
    Destroyed { room: RoomAddr, reason: Option<String> },
    /// The room moved to another node (its client address, `host:port`); nobody is in it here.
    Moved { room: RoomAddr, to: String },
}

/// The protocols a [`Delivery`] caches an encoding for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// WebSocket protocol v1 (JSON text frames).
    V1,
    /// XMPP (a stanza without its `to`, which differs per occupant).
    Xmpp,
    /// The node link, to the peer's sessions in this node's rooms (`crate::forward`).
    Link,
}

/// How many [`Protocol`]s there are (one cache slot each).
const PROTOCOLS: usize = 3;

/// One event on its way to many occupants, with its encoding cached per protocol.
pub struct Delivery {
    pub event: RoomEvent,
    /// Each protocol's encoding, made by the first occupant of that protocol that needs it.
    /// Type-erased so that this module names no wire type; a protocol always stores the same
    /// type in its slot.
    encoded: [OnceLock<Box<dyn Any + Send + Sync>>; PROTOCOLS],
}

impl Delivery {
    /// A delivery of `event`, not encoded yet.
    pub fn new(event: RoomEvent) -> Arc<Delivery> {
        Arc::new(Delivery { event, encoded: Default::default() })
    }

    /// The event's encoding for `protocol`, made by `encode` the first time it is asked for.
    pub fn encoded<T: Clone + Send + Sync + 'static>(&self, protocol: Protocol, encode: impl FnOnce(&RoomEvent) -> T) -> T {
        let slot = &self.encoded[protocol as usize];
        slot.get_or_init(|| Box::new(encode(&self.event)))
            .downcast_ref::<T>()
            .expect("a protocol caches one encoding type")
            .clone()
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("event", &self.event).finish_non_exhaustive()
    }
}

/// What a room answers one occupant about one of its requests (or, with no `re`, about itself).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum RoomAnswer {
    /// The occupant entered: its view of the room, then the replayed messages, oldest first.
    Joined {
        re: RequestId,
        room: RoomAddr,
        nick: String,
        last_seq: u64,
        occupants: Vec<OccupantInfo>,
        subject: String,
        affiliation: Affiliation,
        /// More messages than the join limit followed `since`.
        truncated: bool,
        #[serde(with = "replay")]
        replay: Vec<Arc<Delivery>>,
    },
    /// The occupant left.
    Left { re: RequestId, room: RoomAddr },
    /// A post was committed (or had been: `duplicate`, with the original seq).
    Ack { re: RequestId, room: RoomAddr, seq: u64, ts: i64, duplicate: bool },
    /// A request failed after the room took it (a post not stored), or the room cannot serve
    /// the occupant any more (`re` is `None`).
    Error { re: Option<RequestId>, room: RoomAddr, code: ErrorCode, message: String },
}

/// A join's replay serialized as its events (each side encodes them again for its protocols).
mod replay {
    use super::{Delivery, RoomEvent};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(replay: &[Arc<Delivery>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(replay.iter().map(|d| &d.event))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Arc<Delivery>>, D::Error> {
        Ok(Vec::<RoomEvent>::deserialize(d)?.into_iter().map(Delivery::new).collect())
    }
}

/// Where a room delivers: implemented by each front end's session (and so by the node link's
/// virtual sessions, whose wire is the link). Calls never block: a session queues, and a
/// session whose queue is full disconnects itself (slow consumer).
pub trait Occupant: Send + Sync {
    /// The session's id, unique per node process.
    fn id(&self) -> SessionId;
    /// The logged-in user name.
    fn user(&self) -> &str;
    /// An event for everyone in the room.
    fn deliver(&self, event: &Arc<Delivery>);
    /// The answer to one of this occupant's requests.
    fn answer(&self, answer: RoomAnswer);
    /// The room now counts this occupant in (a join).
    fn entered(&self, room: &RoomAddr);
    /// The room no longer counts this occupant in (leave, kick, destroy, move, fence).
    fn exited(&self, room: &RoomAddr);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Many occupants of one protocol get one encoding: the encoder runs once per delivery.
    #[test]
    fn a_delivery_is_encoded_once_per_protocol() {
        let d = Delivery::new(RoomEvent::Moved { room: RoomAddr("r@s".into()), to: "peer:1".into() });
        let runs = AtomicUsize::new(0);
        for _ in 0..100 {
            let text: Arc<str> = d.encoded(Protocol::V1, |e| {
                runs.fetch_add(1, Ordering::Relaxed);
                format!("{e:?}").into()
            });
            assert!(text.contains("peer:1"));
        }
        assert_eq!(runs.load(Ordering::Relaxed), 1);
    }
}
