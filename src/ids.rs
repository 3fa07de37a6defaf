//! The ids that cross modules, as newtypes: a leaf module (it imports nothing of Stoa), so the
//! room, the store, the gateway, the node link and the front ends can all name them without
//! depending on each other.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A room address, `name@service` (e.g. `ops@conference.localhost`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoomAddr(pub String);

impl RoomAddr {
    /// The part before `@`.
    pub fn name(&self) -> &str {
        self.0.split_once('@').map_or(&self.0, |(n, _)| n)
    }
    /// The part after `@`: the alias of the room's home node.
    pub fn service(&self) -> &str {
        self.0.split_once('@').map_or("", |(_, s)| s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message's unique id (XMPP's stanza-id and MAM result id, kept across failovers and merges):
/// a UUIDv7 whose millisecond timestamp is the message's `created_at`. Since a room's times never
/// go back as its seqs grow, the id says where in the room's log the message is, and the store
/// finds it through the log's primary key with no index of ids (`Store::message_seq`).
/// Its 74 random bits come from the thread's RNG (`rand::rng`, reseeded from the OS now and
/// then), not from a `getrandom` system call per id as `Uuid::new_v7` makes them.
pub fn message_id(created_at_ms: i64) -> String {
    use rand::RngCore;
    let mut random = [0u8; 10];
    rand::rng().fill_bytes(&mut random);
    uuid::Builder::from_unix_timestamp_millis(created_at_ms.max(0) as u64, &random).into_uuid().to_string()
}

/// The `created_at` a [`message_id`] carries (`None`: not a UUIDv7, so no message's id).
pub fn message_id_time(id: &str) -> Option<i64> {
    let id = uuid::Uuid::try_parse(id).ok()?;
    if id.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    Some(secs as i64 * 1000 + (nanos / 1_000_000) as i64)
}

/// A room sequence number: contiguous from 1 per room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Seq(pub u64);

/// A node's id (`node.id`), as recorded in `home_node` / `host_node`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A room's fencing token: bumped every time its host changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub i64);

/// The primary key of a room row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoomId(pub i64);

/// A live session on this node (any protocol, and the stand-ins the node link opens for the
/// peer's sessions): numbered from 1 per process, never reused while the process runs. The
/// peer's session ids are the peer's own numbers; they name sessions on the link only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_id_carries_its_time() {
        for at in [0, 1, 999, 1_000, 1_764_892_800_123, 4_102_444_800_999] {
            let a = message_id(at);
            let b = message_id(at);
            assert_ne!(a, b, "ids of one millisecond still differ");
            assert_eq!(message_id_time(&a), Some(at), "{a}");
        }
        assert_eq!(message_id_time("not-a-uuid"), None);
        assert_eq!(message_id_time(&uuid::Uuid::new_v4().to_string()), None, "only v7 ids carry a time");
    }
}
