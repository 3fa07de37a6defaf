//! Wire protocol v1: JSON text frames over WebSocket (`docs/protocol.md` documents every op).
//!
//! Client frames are requests carrying a client-chosen `id`; server answers echo it as `re`.
//! Events (`message`, `presence`, `subject`, `moved`, `goaway`, `destroyed`) carry no `re`.
//! Parsing is two-step ([`parse_client_frame`]) so that every malformed frame gets a precise
//! `bad_request` answer that still echoes the request id when one could be read.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks (`"v"` in `hello` and `welcome`).
pub const PROTOCOL_VERSION: u32 = 1;

/// The ids frames carry, re-exported for clients of the wire types.
pub use crate::ids::{RoomAddr, Seq};

/// A client-chosen request id, echoed as `re` in the answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub String);

/// A client message id (`cid`): the dedupe key of a send, unique per (room, sender).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientMsgId(pub String);

/// A user's standing in a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Affiliation {
    Outcast,
    None,
    Member,
    Admin,
    Owner,
}

impl Affiliation {
    pub fn as_str(self) -> &'static str {
        match self {
            Affiliation::Outcast => "outcast",
            Affiliation::None => "none",
            Affiliation::Member => "member",
            Affiliation::Admin => "admin",
            Affiliation::Owner => "owner",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "outcast" => Affiliation::Outcast,
            "none" => Affiliation::None,
            "member" => Affiliation::Member,
            "admin" => Affiliation::Admin,
            "owner" => Affiliation::Owner,
            _ => return None,
        })
    }
}

/// Room configuration as stored and as reported. Unknown fields are refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomConfig {
    /// Visible in `list` to everyone and joinable without membership. `false` = members-only.
    pub public: bool,
    /// Required on `join` (except for owners and admins) when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Maximum simultaneous occupants; `0` = the node's limit.
    pub max_occupants: u32,
    /// Messages replayed on a `join` without `since`.
    pub history_on_join: u32,
    /// The room's subject (topic).
    pub subject: String,
    /// Kept in the store forever (always true in v1; non-persistent rooms are refused).
    pub persistent: bool,
    /// Plugins this room runs after the node-wide ones (docs/plugins.md), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<RoomPlugin>,
}

/// A plugin enabled on one room, with its JSON config (passed to the plugin's `init`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomPlugin {
    pub name: String,
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            public: true,
            password: None,
            max_occupants: 0,
            history_on_join: 20,
            subject: String::new(),
            persistent: true,
            plugins: Vec::new(),
        }
    }
}

/// A partial room configuration, as sent in `create` and `configure`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomConfigPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    /// `""` clears the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_occupants: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_on_join: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Replaces the room's plugin list (`[]` removes them all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Vec<RoomPlugin>>,
}

impl RoomConfig {
    /// This config with `patch` applied.
    pub fn patched(&self, patch: &RoomConfigPatch) -> RoomConfig {
        let mut c = self.clone();
        if let Some(v) = patch.public {
            c.public = v;
        }
        if let Some(v) = &patch.password {
            c.password = if v.is_empty() { None } else { Some(v.clone()) };
        }
        if let Some(v) = patch.max_occupants {
            c.max_occupants = v;
        }
        if let Some(v) = patch.history_on_join {
            c.history_on_join = v;
        }
        if let Some(v) = &patch.subject {
            c.subject = v.clone();
        }
        if let Some(v) = patch.persistent {
            c.persistent = v;
        }
        if let Some(v) = &patch.plugins {
            c.plugins = v.clone();
        }
        c
    }

    /// The config as shown to clients: the password is replaced by `password_protected`.
    pub fn public_view(&self) -> serde_json::Value {
        serde_json::json!({
            "public": self.public,
            "password_protected": self.password.is_some(),
            "max_occupants": self.max_occupants,
            "history_on_join": self.history_on_join,
            "subject": self.subject,
            "persistent": self.persistent,
            "plugins": self.plugins.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        })
    }
}

/// Every request a client may send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// First frame of a connection: log in with a password, a session token, or as a guest.
    Hello {
        v: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Create {
        id: RequestId,
        room: RoomAddr,
        #[serde(default)]
        config: RoomConfigPatch,
    },
    Join {
        id: RequestId,
        room: RoomAddr,
        nick: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<String>,
    },
    Leave {
        id: RequestId,
        room: RoomAddr,
    },
    Send {
        id: RequestId,
        room: RoomAddr,
        body: String,
        cid: ClientMsgId,
    },
    History {
        id: RequestId,
        room: RoomAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Subject {
        id: RequestId,
        room: RoomAddr,
        subject: String,
    },
    Configure {
        id: RequestId,
        room: RoomAddr,
        config: RoomConfigPatch,
    },
    Affiliate {
        id: RequestId,
        room: RoomAddr,
        user: String,
        affiliation: Affiliation,
    },
    Kick {
        id: RequestId,
        room: RoomAddr,
        nick: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Destroy {
        id: RequestId,
        room: RoomAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    List {
        id: RequestId,
        /// Rooms whose address sorts after this one (the last of the previous page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<RoomAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Ping {
        id: RequestId,
    },
}

/// The ops a client may send, for the `unknown op` check.
pub const CLIENT_OPS: &[&str] = &[
    "hello", "create", "join", "leave", "send", "history", "subject", "configure", "affiliate",
    "kick", "destroy", "list", "ping",
];

impl ClientFrame {
    /// The request id, if the frame carries one.
    pub fn id(&self) -> Option<&RequestId> {
        match self {
            ClientFrame::Hello { id, .. } => id.as_ref(),
            ClientFrame::Create { id, .. }
            | ClientFrame::Join { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Subject { id, .. }
            | ClientFrame::Configure { id, .. }
            | ClientFrame::Affiliate { id, .. }
            | ClientFrame::Kick { id, .. }
            | ClientFrame::Destroy { id, .. }
            | ClientFrame::List { id, .. }
            | ClientFrame::Ping { id } => Some(id),
        }
    }

    /// The room a room-scoped request is about.
    pub fn room(&self) -> Option<&RoomAddr> {
        match self {
            ClientFrame::Join { room, .. }
            | ClientFrame::Leave { room, .. }
            | ClientFrame::Send { room, .. }
            | ClientFrame::History { room, .. }
            | ClientFrame::Subject { room, .. }
            | ClientFrame::Configure { room, .. }
            | ClientFrame::Affiliate { room, .. }
            | ClientFrame::Kick { room, .. }
            | ClientFrame::Destroy { room, .. } => Some(room),
            ClientFrame::Hello { .. } | ClientFrame::Create { .. } | ClientFrame::List { .. } | ClientFrame::Ping { .. } => None,
        }
    }
}

/// A frame that could not be parsed: the answer's `re` (when the id was readable) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub re: Option<RequestId>,
    pub message: String,
}

/// Rules a frame's JSON must follow beyond its shape: no key twice in one object (which value
/// counts would be a guess), and no U+0000 in any string (no store keeps it in text, and it
/// hides the rest of a string from C-based tools).
mod strict {
    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::borrow::Cow;
    use std::fmt;

    /// Check `text` (already known to be JSON); the error is the client's message.
    pub fn check(text: &str) -> Result<(), String> {
        let mut de = serde_json::Deserializer::from_str(text);
        Walk.deserialize(&mut de).map_err(|e| {
            // serde_json appends " at line L column C"; the rule is the useful part.
            let m = e.to_string();
            m.split(" at line ").next().unwrap_or(&m).to_owned()
        })
    }

    struct Walk;

    impl<'de> DeserializeSeed<'de> for Walk {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    fn no_nul<E: de::Error>(s: &str) -> Result<(), E> {
        if s.contains('\0') { Err(E::custom("strings may not contain U+0000 (NUL)")) } else { Ok(()) }
    }

    impl<'de> Visitor<'de> for Walk {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
            no_nul(s)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Walk)?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut keys: Vec<Cow<'de, str>> = Vec::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                no_nul(&key)?;
                if keys.contains(&key) {
                    return Err(de::Error::custom(format!("duplicate key `{key}`")));
                }
                keys.push(key);
                map.next_value_seed(Walk)?;
            }
            Ok(())
        }
    }
}

/// Parse a client text frame. Errors say which rule the frame broke: not JSON, not an object,
/// no `op`, unknown op, or a missing / mistyped / unknown field.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    // Well-formed frames (nearly all of them) parse in one pass; only a failure pays for the
    // second, diagnosing pass below.
    if let Ok(frame) = serde_json::from_str::<ClientFrame>(text) {
        // A `send`, most frames by far, skips the second pass when it cannot fail: its fields
        // are strings, so the parse above has refused a duplicate key already (serde's own
        // rule for a struct's fields and for the tag; unknown keys are denied), and a NUL can
        // only be written as the escape `\u0000`. The check cost 4 % of a message's
        // instructions (docs/benchmarks.md).
        if matches!(frame, ClientFrame::Send { .. }) && !text.contains("\\u0000") {
            return Ok(frame);
        }
        return match strict::check(text) {
            Ok(()) => Ok(frame),
            Err(message) => Err(FrameError { re: frame.id().cloned(), message }),
        };
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FrameError {
        re: None,
        message: format!("invalid JSON: {e}"),
    })?;
    let obj = value.as_object().ok_or_else(|| FrameError {
        re: None,
        message: "a frame must be a JSON object".into(),
    })?;
    let id = || obj.get("id").and_then(|v| v.as_str()).map(|s| RequestId(s.to_owned()));
    strict::check(text).map_err(|message| FrameError { re: id(), message })?;
    let re = obj
        .get("id")
        .and_then(|v| v.as_str())
        .map(|s| RequestId(s.to_owned()));
    let op = match obj.get("op") {
        Some(serde_json::Value::String(op)) => op.clone(),
        Some(_) => {
            return Err(FrameError { re, message: "field `op` must be a string".into() });
        }
        None => return Err(FrameError { re, message: "missing field `op`".into() }),
    };
    if !CLIENT_OPS.contains(&op.as_str()) {
        return Err(FrameError { re, message: format!("unknown op `{op}`") });
    }
    let has_id = matches!(obj.get("id"), Some(serde_json::Value::String(_)));
    if op != "hello" && !has_id {
        return Err(FrameError {
            re: None,
            message: format!("op `{op}` needs a string field `id`"),
        });
    }
    serde_json::from_value(value).map_err(|e| FrameError {
        re,
        message: format!("invalid `{op}` frame: {e}"),
    })
}

/// Every error code a server may send (`docs/protocol.md` says when each is sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is malformed: invalid JSON, unknown op, missing or mistyped field, bad value.
    BadRequest,
    /// Not logged in, or wrong credentials.
    Unauthorized,
    /// Logged in, but not allowed: membership, password, affiliation, or not joined.
    Forbidden,
    /// The room (or user, or nick) does not exist.
    NotFound,
    /// The thing already exists or the state does not allow it (room exists, nick taken).
    Conflict,
    /// A frame, body, or count is over its limit.
    TooLarge,
    /// The connection sends faster than its budget.
    RateLimited,
    /// The room or the store cannot serve now; the request may be retried.
    Unavailable,
    /// An unexpected server fault; details are in the server log only.
    Internal,
    /// A plugin refused the message or join (the message says why); nothing was stored.
    Rejected,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Rejected => "rejected",
        }
    }
    /// All codes, for metrics and docs.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Rejected,
    ];
}

/// One occupant as listed in `joined`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OccupantInfo {
    pub user: String,
    pub nick: String,
}

/// A stored message as delivered in `message` events and `history` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvent {
    pub room: RoomAddr,
    pub seq: u64,
    pub from: String,
    pub nick: String,
    pub body: String,
    pub cid: String,
    /// Commit-side timestamp, milliseconds since the Unix epoch.
    pub ts: i64,
}

/// One entry of a `rooms` answer to `list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub room: RoomAddr,
    pub subject: String,
    pub public: bool,
    pub last_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affiliation: Option<Affiliation>,
}

/// Every frame a server sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        v: u32,
        user: String,
        node: String,
        session: String,
        /// The room service alias of this node (`name@service`).
        service: String,
        guest: bool,
        /// Addresses of the peer nodes a client may resume on (empty on a single node).
        peers: Vec<String>,
        /// Not logged in: this user logs in on the node at this client URL (its home node,
        /// docs/clusters.md); the server closes the connection after this frame.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        redirect: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        re: Option<RequestId>,
    },
    Created {
        re: RequestId,
        room: RoomAddr,
    },
    Joined {
        re: RequestId,
        room: RoomAddr,
        nick: String,
        last_seq: u64,
        occupants: Vec<OccupantInfo>,
        subject: String,
        affiliation: Affiliation,
        /// True when more messages than the join limit followed `since`: page on with `history`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    Left {
        re: RequestId,
        room: RoomAddr,
    },
    Ack {
        re: RequestId,
        room: RoomAddr,
        seq: u64,
        ts: i64,
        /// True when this `cid` was already stored: `seq` is the original one.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    Message(MessageEvent),
    History {
        re: RequestId,
        room: RoomAddr,
        messages: Vec<MessageEvent>,
        /// True when `limit` cut the answer: ask again from the last seq returned.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    Presence {
        room: RoomAddr,
        user: String,
        nick: String,
        /// `joined`, `left`, or `kicked`.
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Subject {
        room: RoomAddr,
        subject: String,
        by: String,
    },
    Configured {
        room: RoomAddr,
        config: serde_json::Value,
    },
    Rooms {
        re: RequestId,
        rooms: Vec<RoomSummary>,
        /// True when there are more: ask again with `after` = the last room returned.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// Generic success for `subject`, `configure`, `affiliate`, `kick`, `destroy`.
    Ok {
        re: RequestId,
    },
    Destroyed {
        room: RoomAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Moved {
        room: RoomAddr,
        to: String,
    },
    Goaway {
        reason: String,
        /// Where to resume (the peer's client URL), if the server knows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    Pong {
        re: RequestId,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        re: Option<RequestId>,
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<RoomAddr>,
        /// With `rate_limited`: how long to wait before trying again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame {
    /// Serialize to the JSON text sent on the wire.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    /// An error answer.
    pub fn error(re: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error { re, code, message: message.into(), room: None, retry_after_ms: None }
    }

    /// The `re` of an answer, if this frame is one.
    pub fn re(&self) -> Option<&RequestId> {
        match self {
            ServerFrame::Welcome { re, .. } | ServerFrame::Error { re, .. } => re.as_ref(),
            ServerFrame::Created { re, .. }
            | ServerFrame::Joined { re, .. }
            | ServerFrame::Left { re, .. }
            | ServerFrame::Ack { re, .. }
            | ServerFrame::History { re, .. }
            | ServerFrame::Rooms { re, .. }
            | ServerFrame::Ok { re }
            | ServerFrame::Pong { re } => Some(re),
            _ => None,
        }
    }
}

/// WebSocket close codes the server uses.
pub mod close_code {
    /// Normal close (logout, server shutdown).
    pub const NORMAL: u16 = 1000;
    /// Server going away (shutdown, node failover).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Binary frames are not part of protocol v1.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy: the client did not log in in time, or was too slow to read (slow consumer).
    pub const POLICY: u16 = 1008;
    /// A frame was over the size limit.
    pub const TOO_BIG: u16 = 1009;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_and_nul_characters_are_refused() {
        let dup = r#"{"op":"send","id":"1","room":"a@b","body":"x","body":"y","cid":"c"}"#;
        let e = parse_client_frame(dup).unwrap_err();
        assert!(e.message.contains("duplicate key `body`"), "{}", e.message);
        assert_eq!(e.re, Some(RequestId("1".into())), "the error answers the request");
        // Every key of a send twice (the send's one-pass path relies on serde refusing these).
        for key in ["op", "id", "room", "body", "cid"] {
            let value = if key == "op" { "send" } else { "z" };
            let dup = format!(r#"{{"op":"send","id":"1","room":"a@b","body":"x","cid":"c","{key}":"{value}"}}"#);
            let e = parse_client_frame(&dup).unwrap_err();
            assert!(e.message.contains(&format!("duplicate key `{key}`")), "{dup}: {}", e.message);
        }
        let nested = r#"{"op":"create","id":"2","room":"a@b","config":{"public":true,"public":false}}"#;
        assert!(parse_client_frame(nested).unwrap_err().message.contains("duplicate key"));
        for nul in [
            r#"{"op":"send","id":"3","room":"a@b","body":"a\u0000b","cid":"c"}"#,
            r#"{"op":"send","id":"3","room":"a@b","body":"ab","cid":"\u0000"}"#,
        ] {
            assert!(parse_client_frame(nul).unwrap_err().message.contains("U+0000"), "{nul}");
        }
        // An escaped backslash before `u0000` is no NUL.
        let fine = r#"{"op":"send","id":"4","room":"a@b","body":"a\\u0000b","cid":"c"}"#;
        assert!(parse_client_frame(fine).is_ok());
    }

    #[test]
    fn every_client_frame_round_trips() {
        let frames = vec![
            ClientFrame::Hello { v: 1, user: Some("ann".into()), password: Some("pw".into()), token: None, id: None },
            ClientFrame::Create {
                id: RequestId("1".into()),
                room: RoomAddr("ops@conference.localhost".into()),
                config: RoomConfigPatch { public: Some(false), ..Default::default() },
            },
            ClientFrame::Join { id: RequestId("2".into()), room: RoomAddr("a@b".into()), nick: "ann".into(), since: Some(4), password: None },
            ClientFrame::Send { id: RequestId("3".into()), room: RoomAddr("a@b".into()), body: "hi".into(), cid: ClientMsgId("c1".into()) },
            ClientFrame::History { id: RequestId("4".into()), room: RoomAddr("a@b".into()), before: None, after: Some(2), limit: Some(10) },
            ClientFrame::Affiliate { id: RequestId("5".into()), room: RoomAddr("a@b".into()), user: "bob".into(), affiliation: Affiliation::Outcast },
            ClientFrame::List { id: RequestId("6".into()), after: Some(RoomAddr("a@b".into())), limit: Some(10) },
        ];
        for f in frames {
            let text = serde_json::to_string(&f).unwrap();
            assert_eq!(parse_client_frame(&text).unwrap(), f, "{text}");
        }
    }

    #[test]
    fn send_frame_matches_the_documented_shape() {
        let f = parse_client_frame(r#"{"op":"send","id":"7","room":"r@s","body":"B","cid":"C"}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::Send { id: RequestId("7".into()), room: RoomAddr("r@s".into()), body: "B".into(), cid: ClientMsgId("C".into()) }
        );
    }

    #[test]
    fn malformed_frames_say_why_and_keep_the_id() {
        assert!(parse_client_frame("{nope").unwrap_err().message.starts_with("invalid JSON"));
        assert_eq!(parse_client_frame("[1]").unwrap_err().message, "a frame must be a JSON object");
        let e = parse_client_frame(r#"{"id":"9"}"#).unwrap_err();
        assert_eq!((e.re, e.message.as_str()), (Some(RequestId("9".into())), "missing field `op`"));
        let e = parse_client_frame(r#"{"op":"dance","id":"9"}"#).unwrap_err();
        assert_eq!(e.message, "unknown op `dance`");
        let e = parse_client_frame(r#"{"op":"send","id":"9","room":"r@s","body":5,"cid":"c"}"#).unwrap_err();
        assert_eq!(e.re, Some(RequestId("9".into())));
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = parse_client_frame(r#"{"op":"send","id":"9","room":"r@s","cid":"c"}"#).unwrap_err();
        assert!(e.message.contains("missing field `body`"), "{}", e.message);
        let e = parse_client_frame(r#"{"op":"list"}"#).unwrap_err();
        assert!(e.message.contains("needs a string field `id`"));
    }

    #[test]
    fn server_frames_round_trip_with_op_tags() {
        let ack = ServerFrame::Ack { re: RequestId("1".into()), room: RoomAddr("r@s".into()), seq: 3, ts: 5, duplicate: false };
        assert_eq!(ack.to_json(), r#"{"op":"ack","re":"1","room":"r@s","seq":3,"ts":5}"#);
        let msg = ServerFrame::Message(MessageEvent {
            room: RoomAddr("r@s".into()), seq: 1, from: "u".into(), nick: "n".into(), body: "b".into(), cid: "c".into(), ts: 9,
        });
        let text = msg.to_json();
        assert!(text.starts_with(r#"{"op":"message","room":"r@s","seq":1"#), "{text}");
        assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), msg);
        let err = ServerFrame::error(None, ErrorCode::RateLimited, "slow down");
        assert_eq!(err.to_json(), r#"{"op":"error","code":"rate_limited","message":"slow down"}"#);
    }

    #[test]
    fn config_patch_applies_and_clears_password() {
        let c = RoomConfig::default().patched(&RoomConfigPatch { password: Some("x".into()), ..Default::default() });
        assert_eq!(c.password.as_deref(), Some("x"));
        let c = c.patched(&RoomConfigPatch { password: Some(String::new()), ..Default::default() });
        assert_eq!(c.password, None);
        assert!(serde_json::from_str::<RoomConfigPatch>(r#"{"colour":"red"}"#).is_err());
    }
}
