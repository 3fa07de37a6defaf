//! A typed async client for protocol v1 (`docs/protocol.md`), used by the examples, the load
//! generator and the tests.
//!
//! One [`Client`] is one logical session: a socket, two small tasks (a reader that routes answers
//! to the waiting request by `re` and everything else to the event channel, and a writer that
//! batches frames into the socket), and the state a resume needs: the session token, the rooms
//! joined with the last `seq` seen in each, and the sends not yet acknowledged.
//!
//! With [`ClientOptions::reconnect`] set, a lost connection is resumed without the application's
//! help: the client logs in again with the session token (trying its node and the peers named in
//! `welcome`), re-joins every room with `since = last seq seen`, resends every unacknowledged
//! `send` with its original `cid` (the server answers a duplicate with the original `seq`), and
//! reports it on the event channel ([`ClientEvent::Reconnected`], [`ClientEvent::Rejoined`]).
//! A pending [`Client::send`] simply resolves with the ack from the new connection.
//!
//! Per-client cost is kept small for load generation: no threads, a 4 KiB socket read buffer,
//! a short write queue, and no per-request tasks.
//!
//! The parts, one concern each: the [`Client`] handle with one method per request (`api`), the
//! typed answers and events it hands out (`events`), how it logs in and reconnects (`options`),
//! the state one session shares between the handle and its tasks, with the routing of answers
//! to waiting requests (`session`), a connection's life from taking a socket into use to
//! resuming on the next one (`resume`), and the socket itself: connecting, TLS, the writer,
//! frame encoding, request ids (`wire`). The public items are re-exported here.

mod api;
mod events;
mod options;
mod resume;
mod session;
mod wire;

pub use api::{Client, IntoRoomAddr, PendingAck, new_cid};
pub use events::{Ack, ClientEvent, EventStream, HistoryPage, Joined, JoinedRoom, Welcome};
pub use options::{ClientOptions, Login, ReconnectPolicy};
pub use wire::peer_url;

use tokio_tungstenite::tungstenite;

use crate::protocol::ErrorCode;

/// Everything that can go wrong with a client request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket could not be opened, or failed while in use.
    #[error("websocket: {0}")]
    WebSocket(Box<tungstenite::Error>),
    /// Connecting and logging in did not finish within [`ClientOptions::connect_timeout`].
    #[error("timed out connecting")]
    Timeout,
    /// The server answered the request with an `error` frame.
    #[error("server error {}: {message}", .code.as_str())]
    Server {
        /// The protocol error code.
        code: ErrorCode,
        /// The server's human-readable explanation.
        message: String,
    },
    /// The connection was lost before the answer arrived, or there is no connection now.
    /// The request may or may not have been executed; a `send` can be retried with its `cid`.
    #[error("disconnected")]
    Disconnected,
    /// The client was closed or dropped.
    #[error("client closed")]
    Closed,
    /// [`Client::reconnect`] was called while a reconnect is already running.
    #[error("a reconnect is already in progress")]
    ReconnectInProgress,
    /// The server sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl From<tungstenite::Error> for ClientError {
    fn from(e: tungstenite::Error) -> Self {
        ClientError::WebSocket(Box::new(e))
    }
}

impl ClientError {
    /// The server's error code, when this is a [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}
