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
