//! What a client hands to the application: the typed answers to requests ([`Welcome`],
//! [`Joined`], [`Ack`], [`HistoryPage`]), the rooms it is in ([`JoinedRoom`]), and the events
//! that answer no request ([`ClientEvent`]); and the conversion of answer frames to those types.

use tokio::sync::mpsc;

use super::ClientError;
use crate::protocol::{Affiliation, ErrorCode, MessageEvent, OccupantInfo, RoomAddr, ServerFrame};

/// What `welcome` said: who we are, where we are, and how to resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The logged-in user.
    pub user: String,
    /// The id of the node the socket is connected to.
    pub node: String,
    /// The session token for a resume (`hello` with `token`).
    pub session: String,
    /// The room service of that node: rooms created there are `name@service`.
    pub service: String,
    /// True for a guest login.
    pub guest: bool,
    /// Addresses of the peer nodes this session may resume on.
    pub peers: Vec<String>,
}

/// The answer to `join`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The room joined.
    pub room: RoomAddr,
    /// Our nick in it.
    pub nick: String,
    /// The room's last sequence number at the time of the join.
    pub last_seq: u64,
    /// Everyone in the room, us included.
    pub occupants: Vec<OccupantInfo>,
    /// The room's subject.
    pub subject: String,
    /// Our affiliation with the room.
    pub affiliation: Affiliation,
    /// More messages followed `since` than the join replays: page on with `history`.
    pub truncated: bool,
}

/// The answer to `send`: the message is committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The room.
    pub room: RoomAddr,
    /// The message's sequence number in the room.
    pub seq: u64,
    /// Commit timestamp, milliseconds since the Unix epoch.
    pub ts: i64,
    /// The `cid` was already stored: `seq` is the original one and nothing new was stored.
    pub duplicate: bool,
}

/// The answer to `history`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    /// The room.
    pub room: RoomAddr,
    /// Messages in ascending `seq` order.
    pub messages: Vec<MessageEvent>,
    /// `limit` cut the answer: ask again from the last `seq` returned.
    pub truncated: bool,
}

/// A room this client is in, with what a resume needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinedRoom {
    /// The room.
    pub room: RoomAddr,
    /// Our nick in it.
    pub nick: String,
    /// The highest `seq` seen (or skipped on purpose by a join without `since`).
    pub last_seq: u64,
}

/// Frames the server sends without a request (no `re`), and the client's own happenings.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientEvent {
    /// A message in a joined room (live, or replayed after `joined`).
    Message(MessageEvent),
    /// Someone joined, left, or was kicked.
    Presence {
        /// The room.
        room: RoomAddr,
        /// The occupant's user.
        user: String,
        /// The occupant's nick.
        nick: String,
        /// `joined`, `left`, or `kicked`.
        status: String,
        /// Why (kicks).
        reason: Option<String>,
    },
    /// The subject changed.
    Subject {
        /// The room.
        room: RoomAddr,
        /// The new subject.
        subject: String,
        /// Who set it.
        by: String,
    },
    /// The room's configuration changed (public view: no password, `password_protected`).
    Configured {
        /// The room.
        room: RoomAddr,
        /// The new configuration.
        config: serde_json::Value,
    },
    /// The room was destroyed; we are no longer in it.
    Destroyed {
        /// The room.
        room: RoomAddr,
        /// Why.
        reason: Option<String>,
    },
    /// The room is now hosted elsewhere.
    Moved {
        /// The room.
        room: RoomAddr,
        /// Where it went.
        to: String,
    },
    /// The server is about to close this connection (shutdown, failover).
    Goaway {
        /// Why.
        reason: String,
        /// Where to resume, if the server said.
        to: Option<String>,
    },
    /// An `error` frame that answers no request (e.g. `rate_limited` on a dropped frame).
    Error {
        /// The error code.
        code: ErrorCode,
        /// The explanation.
        message: String,
        /// The room concerned, if any.
        room: Option<RoomAddr>,
    },
    /// The connection was lost; a reconnect follows when
    /// [`ClientOptions::reconnect`](super::ClientOptions::reconnect) is set.
    Disconnected {
        /// What ended it.
        reason: String,
    },
    /// A new connection is logged in with the session token; re-joins follow.
    Reconnected {
        /// The URL connected to.
        url: String,
        /// The new `welcome`.
        welcome: Welcome,
    },
    /// A room was re-joined after a reconnect; the messages after `since` follow as events.
    Rejoined(Joined),
    /// A room could not be re-joined after a reconnect; we are no longer in it.
    RejoinFailed {
        /// The room.
        room: RoomAddr,
        /// The error code.
        code: ErrorCode,
        /// The explanation.
        message: String,
    },
    /// Automatic reconnect gave up; the client stays disconnected.
    ReconnectFailed {
        /// The last error.
        reason: String,
    },
}

/// The receiving end of a client's events.
pub type EventStream = mpsc::UnboundedReceiver<ClientEvent>;

/// The error for an answer of another kind than the request's (`wanted`).
pub(super) fn unexpected(wanted: &str, got: &ServerFrame) -> ClientError {
    let op = serde_json::to_value(got)
        .ok()
        .and_then(|v| v.get("op").and_then(|op| op.as_str()).map(str::to_owned))
        .unwrap_or_default();
    ClientError::Protocol(format!("expected `{wanted}`, got `{op}`"))
}

/// The answer to a `join`, typed.
pub(super) fn joined_from(frame: ServerFrame) -> Result<Joined, ClientError> {
    match frame {
        ServerFrame::Joined { room, nick, last_seq, occupants, subject, affiliation, truncated, .. } => {
            Ok(Joined { room, nick, last_seq, occupants, subject, affiliation, truncated })
        }
        other => Err(unexpected("joined", &other)),
    }
}

/// The answer to a `send`, typed.
pub(super) fn ack_from(frame: ServerFrame) -> Result<Ack, ClientError> {
    match frame {
        ServerFrame::Ack { room, seq, ts, duplicate, .. } => Ok(Ack { room, seq, ts, duplicate }),
        other => Err(unexpected("ack", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RequestId;

    fn room() -> RoomAddr {
        RoomAddr("ops@conference.localhost".into())
    }

    /// Acks and other answers convert to their typed form; the wrong op is a protocol error.
    #[test]
    fn answers_convert_to_typed_results() {
        let ack = ServerFrame::Ack { re: RequestId("1".into()), room: room(), seq: 3, ts: 5, duplicate: true };
        assert_eq!(ack_from(ack).unwrap(), Ack { room: room(), seq: 3, ts: 5, duplicate: true });
        let err = ack_from(ServerFrame::Pong { re: RequestId("1".into()) }).unwrap_err();
        assert_eq!(err.to_string(), "protocol violation: expected `ack`, got `pong`");
        let server = ClientError::Server { code: ErrorCode::TooLarge, message: "body".into() };
        assert_eq!(server.to_string(), "server error too_large: body");
        assert_eq!(server.code(), Some(ErrorCode::TooLarge));
    }
}
