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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::protocol::{
    Affiliation, ClientFrame, ClientMsgId, ErrorCode, MessageEvent, OccupantInfo, PROTOCOL_VERSION,
    RequestId, RoomAddr, RoomConfigPatch, RoomSummary, ServerFrame,
};

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Answer = Result<ServerFrame, ClientError>;

/// Socket read buffer per connection: small, because a load generator opens thousands of
/// clients and chat frames are small; large frames are still read, in several chunks.
const READ_BUFFER_SIZE: usize = 4096;
/// Bytes the socket writer gathers before a write: pipelined sends share a syscall.
const WRITE_BUFFER_SIZE: usize = 4096;
/// The request id of `hello`; answers to later requests use ids from the counter, from 1.
const HELLO_ID: &str = "hello";

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

/// How to log in with `hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// A registered user with a password.
    Password {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// Resume a session with the token from an earlier `welcome`.
    Token {
        /// The user name, when known (sent along with the token).
        user: Option<String>,
        /// The `session` token of an earlier `welcome`.
        token: String,
    },
    /// A guest login (dev mode only): a user name and no credentials.
    Guest {
        /// The wanted user name; `None` lets the server choose.
        user: Option<String>,
    },
}

impl Login {
    /// A password login.
    pub fn password(user: impl Into<String>, password: impl Into<String>) -> Self {
        Login::Password { user: user.into(), password: password.into() }
    }

    /// A guest login under `user` (dev mode only).
    pub fn guest(user: impl Into<String>) -> Self {
        Login::Guest { user: Some(user.into()) }
    }

    /// A session-token login.
    pub fn token(user: Option<String>, token: impl Into<String>) -> Self {
        Login::Token { user, token: token.into() }
    }

    /// The `hello` frame for this login.
    fn hello(&self) -> ClientFrame {
        let (user, password, token) = match self {
            Login::Password { user, password } => (Some(user.clone()), Some(password.clone()), None),
            Login::Token { user, token } => (user.clone(), None, Some(token.clone())),
            Login::Guest { user } => (user.clone(), None, None),
        };
        ClientFrame::Hello {
            v: PROTOCOL_VERSION,
            user,
            password,
            token,
            id: Some(RequestId(HELLO_ID.to_owned())),
        }
    }
}

/// When and where to reconnect after a lost connection.
#[derive(Clone, Debug)]
pub struct ReconnectPolicy {
    /// More URLs to try, after the node connected to and the peers it named in `welcome`.
    pub extra_urls: Vec<String>,
    /// Wait after the first failed attempt; doubled after each further failure.
    pub initial_backoff: Duration,
    /// Upper bound of the wait between attempts.
    pub max_backoff: Duration,
    /// Stop trying after this long without a connection (`None`: never stop).
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            extra_urls: Vec::new(),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            give_up_after: Some(Duration::from_secs(120)),
        }
    }
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bound on opening the socket plus `hello` → `welcome`, per attempt.
    pub connect_timeout: Duration,
    /// Frames queued for the socket writer before a request waits for room.
    pub write_queue: usize,
    /// Resume automatically after a lost connection; `None` leaves it to [`Client::reconnect`].
    pub reconnect: Option<ReconnectPolicy>,
    /// TLS for `wss://` URLs: the trust anchors and settings (see [`ClientOptions::trust_ca_file`]).
    /// `None`: the Mozilla roots (`webpki-roots`). Plain `ws://` URLs ignore it.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            write_queue: 64,
            reconnect: None,
            tls: None,
        }
    }
}

impl ClientOptions {
    /// Default options with automatic reconnect under the default [`ReconnectPolicy`].
    pub fn reconnecting() -> Self {
        ClientOptions { reconnect: Some(ReconnectPolicy::default()), ..Default::default() }
    }

    /// Trust the PEM certificates in `ca_file` (and only them) for `wss://` servers: a private
    /// CA, or a node's self-signed certificate.
    pub fn trust_ca_file(mut self, ca_file: &std::path::Path) -> Result<Self, crate::tls::TlsError> {
        self.tls = Some(crate::tls::client_config(Some(ca_file))?);
        Ok(self)
    }
}

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
    /// The connection was lost; a reconnect follows when [`ClientOptions::reconnect`] is set.
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

/// Hands out request ids: a counter, so ids are unique for the client's whole life (across
/// reconnects) and their order is the order of submission.
#[derive(Debug)]
struct IdGen(AtomicU64);

impl IdGen {
    fn new() -> Self {
        IdGen(AtomicU64::new(1))
    }
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// What a waiting request needs when its answer arrives.
#[derive(Debug)]
enum PendingKind {
    /// Nothing beyond resolving the waiter.
    Plain,
    /// A join: on `joined` the room is recorded for resumes.
    Join { room: RoomAddr, password: Option<String>, since: Option<u64>, rejoin: bool },
    /// A send, kept until acked: on a reconnect it is written again, same id and `cid`.
    Send { text: Utf8Bytes },
}

#[derive(Debug)]
struct Pending {
    kind: PendingKind,
    /// Dropped by the application (e.g. a timed-out future) is fine: the answer is discarded.
    tx: oneshot::Sender<Answer>,
    /// The connection generation it was written on; `0` = not written yet.
    written_on: u64,
}

#[derive(Debug)]
struct RoomState {
    nick: String,
    password: Option<String>,
    last_seq: u64,
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Connected; requests go straight to the socket.
    Ready,
    /// A reconnect runs: sends wait for it, other requests fail with `Disconnected`.
    Resuming,
    /// Disconnected and nothing will reconnect unless [`Client::reconnect`] is called.
    Down,
    /// Closed for good.
    Closed,
}

#[derive(Debug)]
struct Conn {
    generation: u64,
    writer: mpsc::Sender<Message>,
    writer_task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Bumped for every new connection; frames and failures of an older one are ignored.
    generation: u64,
    conn: Option<Conn>,
    reader: Option<JoinHandle<()>>,
    resume_task: Option<JoinHandle<()>>,
    /// A reconnect (automatic or [`Client::reconnect`]) is running.
    resuming: bool,
    welcome: Welcome,
    /// URLs to resume on: the one connected to first, then peers and extras.
    urls: Vec<String>,
    url_index: usize,
    pending: BTreeMap<u64, Pending>,
    rooms: HashMap<RoomAddr, RoomState>,
}

#[derive(Debug)]
struct Shared {
    ids: IdGen,
    state: Mutex<State>,
    events: mpsc::UnboundedSender<ClientEvent>,
    options: ClientOptions,
}

/// A connected, logged-in protocol v1 session. Dropping it closes the connection.
///
/// Requests take `&self`, so one client may be shared (`Arc<Client>`) by several tasks and many
/// requests may be in flight at once. Events must be drained ([`Client::events`] or
/// [`Client::next_event`]) or the receiver dropped: they are buffered without bound so that a
/// slow reader never stalls the answers to its own requests.
#[derive(Debug)]
pub struct Client {
    shared: Arc<Shared>,
    events: tokio::sync::Mutex<Option<EventStream>>,
}

/// A `send` in flight: await it for the [`Ack`]. Returned by [`Client::send_nowait`] so that a
/// load generator can pipeline many sends on one connection.
#[derive(Debug)]
pub struct PendingAck {
    rx: oneshot::Receiver<Answer>,
    cid: ClientMsgId,
}

impl PendingAck {
    /// The `cid` of this send.
    pub fn cid(&self) -> &ClientMsgId {
        &self.cid
    }
}

impl Future for PendingAck {
    type Output = Result<Ack, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| r.unwrap_or(Err(ClientError::Closed)).and_then(ack_from))
    }
}

/// Anything that names a room: `&str`, `String`, [`RoomAddr`].
pub trait IntoRoomAddr {
    /// The room address.
    fn into_room_addr(self) -> RoomAddr;
}

impl IntoRoomAddr for RoomAddr {
    fn into_room_addr(self) -> RoomAddr {
        self
    }
}
impl IntoRoomAddr for &RoomAddr {
    fn into_room_addr(self) -> RoomAddr {
        self.clone()
    }
}
impl IntoRoomAddr for &str {
    fn into_room_addr(self) -> RoomAddr {
        RoomAddr(self.to_owned())
    }
}
impl IntoRoomAddr for String {
    fn into_room_addr(self) -> RoomAddr {
        RoomAddr(self)
    }
}
impl IntoRoomAddr for &String {
    fn into_room_addr(self) -> RoomAddr {
        RoomAddr(self.clone())
    }
}

/// A fresh client message id (UUID v7: unique, and sortable by creation time).
pub fn new_cid() -> ClientMsgId {
    ClientMsgId(uuid::Uuid::now_v7().to_string())
}

/// A peer address as a WebSocket URL: full URLs pass through, `host:port` gets `ws://…/ws`.
pub fn peer_url(addr: &str) -> String {
    if addr.contains("://") { addr.to_owned() } else { format!("ws://{addr}/ws") }
}

impl Client {
    /// Connect to `url` (e.g. `ws://127.0.0.1:7450/ws`) and log in, with default options.
    pub async fn connect(url: &str, login: Login) -> Result<(Client, Welcome), ClientError> {
        Client::connect_with(url, login, ClientOptions::default()).await
    }

    /// Connect to `url` and log in.
    pub async fn connect_with(
        url: &str,
        login: Login,
        options: ClientOptions,
    ) -> Result<(Client, Welcome), ClientError> {
        let (ws, welcome) = handshake(url, &login, &options).await?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let urls = candidate_urls(url, &welcome, &options);
        let shared = Arc::new(Shared {
            ids: IdGen::new(),
            state: Mutex::new(State {
                phase: Phase::Ready,
                generation: 0,
                conn: None,
                reader: None,
                resume_task: None,
                resuming: false,
                welcome: welcome.clone(),
                urls,
                url_index: 0,
                pending: BTreeMap::new(),
                rooms: HashMap::new(),
            }),
            events: events_tx,
            options,
        });
        shared.install(ws, Phase::Ready);
        let client = Client { shared, events: tokio::sync::Mutex::new(Some(events_rx)) };
        Ok((client, welcome))
    }

    /// The `welcome` of the current (or last) connection.
    pub fn welcome(&self) -> Welcome {
        self.shared.state().welcome.clone()
    }

    /// True while a connection is up and not resuming.
    pub fn is_connected(&self) -> bool {
        self.shared.state().phase == Phase::Ready
    }

    /// The event receiver, handed out once; `None` after that.
    pub fn events(&self) -> Option<EventStream> {
        self.events.try_lock().ok().and_then(|mut g| g.take())
    }

    /// The next event, while the receiver has not been taken with [`Client::events`].
    /// `None` once the receiver was taken or the client is closed.
    pub async fn next_event(&self) -> Option<ClientEvent> {
        self.events.lock().await.as_mut()?.recv().await
    }

    /// The rooms this client is in, with the last `seq` seen in each.
    pub fn rooms(&self) -> Vec<JoinedRoom> {
        let st = self.shared.state();
        let mut rooms: Vec<JoinedRoom> = st
            .rooms
            .iter()
            .map(|(room, r)| JoinedRoom { room: room.clone(), nick: r.nick.clone(), last_seq: r.last_seq })
            .collect();
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        rooms
    }

    /// The last `seq` seen in `room`, if we are in it.
    pub fn last_seq(&self, room: impl IntoRoomAddr) -> Option<u64> {
        self.shared.state().rooms.get(&room.into_room_addr()).map(|r| r.last_seq)
    }

    /// Create a room; the creator becomes its owner. Answers the room's address.
    pub async fn create(&self, room: impl IntoRoomAddr, config: RoomConfigPatch) -> Result<RoomAddr, ClientError> {
        let room = room.into_room_addr();
        match self.request(PendingKind::Plain, |id| ClientFrame::Create { id, room, config }).await? {
            ServerFrame::Created { room, .. } => Ok(room),
            other => Err(unexpected("created", &other)),
        }
    }

    /// Join a room under `nick`. Without `since` the room's last `history_on_join` messages
    /// follow as events; with `since` every message after it does (up to the join limit, see
    /// [`Joined::truncated`]). Answers when `joined` arrives, before those messages.
    pub async fn join(
        &self,
        room: impl IntoRoomAddr,
        nick: impl Into<String>,
        since: Option<u64>,
        password: Option<String>,
    ) -> Result<Joined, ClientError> {
        let (room, nick) = (room.into_room_addr(), nick.into());
        let kind = PendingKind::Join { room: room.clone(), password: password.clone(), since, rejoin: false };
        let answer = self.request(kind, |id| ClientFrame::Join { id, room, nick, since, password }).await?;
        joined_from(answer)
    }

    /// Leave a room.
    pub async fn leave(&self, room: impl IntoRoomAddr) -> Result<(), ClientError> {
        let room = room.into_room_addr();
        match self.request(PendingKind::Plain, |id| ClientFrame::Leave { id, room }).await? {
            ServerFrame::Left { .. } => Ok(()),
            other => Err(unexpected("left", &other)),
        }
    }

    /// Send a message and wait until it is committed. Resending the same `cid` (e.g. after an
    /// `unavailable` answer) is safe: the server answers the original `seq`, `duplicate: true`.
    pub async fn send(
        &self,
        room: impl IntoRoomAddr,
        body: impl Into<String>,
        cid: ClientMsgId,
    ) -> Result<Ack, ClientError> {
        self.send_nowait(room, body, cid).await?.await
    }

    /// Queue a message for sending and return at once with a future of its [`Ack`]: many
    /// sends may be in flight on one connection. Waits only when the write queue is full.
    pub async fn send_nowait(
        &self,
        room: impl IntoRoomAddr,
        body: impl Into<String>,
        cid: ClientMsgId,
    ) -> Result<PendingAck, ClientError> {
        let (room, body) = (room.into_room_addr(), body.into());
        let id = self.shared.ids.next();
        let frame = ClientFrame::Send { id: RequestId(id.to_string()), room, body, cid: cid.clone() };
        let text = Utf8Bytes::from(encode(&frame));
        let rx = self.shared.submit(id, PendingKind::Send { text: text.clone() }, text).await?;
        Ok(PendingAck { rx, cid })
    }

    /// Read stored messages, ascending. `before` / `after` are exclusive `seq` bounds; `limit`
    /// defaults to 50 on the server.
    pub async fn history(
        &self,
        room: impl IntoRoomAddr,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ClientError> {
        let room = room.into_room_addr();
        match self.request(PendingKind::Plain, |id| ClientFrame::History { id, room, before, after, limit }).await? {
            ServerFrame::History { room, messages, truncated, .. } => Ok(HistoryPage { room, messages, truncated }),
            other => Err(unexpected("history", &other)),
        }
    }

    /// Set the room's subject (admins and owners).
    pub async fn subject(&self, room: impl IntoRoomAddr, subject: impl Into<String>) -> Result<(), ClientError> {
        let (room, subject) = (room.into_room_addr(), subject.into());
        self.request_ok(|id| ClientFrame::Subject { id, room, subject }).await
    }

    /// Change the room's configuration (owners).
    pub async fn configure(&self, room: impl IntoRoomAddr, config: RoomConfigPatch) -> Result<(), ClientError> {
        let room = room.into_room_addr();
        self.request_ok(|id| ClientFrame::Configure { id, room, config }).await
    }

    /// Set a user's affiliation with the room.
    pub async fn affiliate(
        &self,
        room: impl IntoRoomAddr,
        user: impl Into<String>,
        affiliation: Affiliation,
    ) -> Result<(), ClientError> {
        let (room, user) = (room.into_room_addr(), user.into());
        self.request_ok(|id| ClientFrame::Affiliate { id, room, user, affiliation }).await
    }

    /// Kick an occupant by nick (admins and owners).
    pub async fn kick(
        &self,
        room: impl IntoRoomAddr,
        nick: impl Into<String>,
        reason: Option<String>,
    ) -> Result<(), ClientError> {
        let (room, nick) = (room.into_room_addr(), nick.into());
        self.request_ok(|id| ClientFrame::Kick { id, room, nick, reason }).await
    }

    /// Destroy the room (owners).
    pub async fn destroy(&self, room: impl IntoRoomAddr, reason: Option<String>) -> Result<(), ClientError> {
        let room = room.into_room_addr();
        self.request_ok(|id| ClientFrame::Destroy { id, room, reason }).await
    }

    /// Public rooms plus the rooms the user is affiliated with.
    pub async fn list(&self) -> Result<Vec<RoomSummary>, ClientError> {
        match self.request(PendingKind::Plain, |id| ClientFrame::List { id, after: None, limit: None }).await? {
            ServerFrame::Rooms { rooms, .. } => Ok(rooms),
            other => Err(unexpected("rooms", &other)),
        }
    }

    /// Round trip to the server; answers the time it took.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.request(PendingKind::Plain, |id| ClientFrame::Ping { id }).await? {
            ServerFrame::Pong { .. } => Ok(start.elapsed()),
            other => Err(unexpected("pong", &other)),
        }
    }

    /// Drop the current connection (if any) and resume on a new one now: log in with the
    /// session token on the next URL (the node, then its peers), re-join every room with
    /// `since = last seq seen`, and resend unacknowledged sends with their `cid`. Requests
    /// other than sends that were in flight fail with [`ClientError::Disconnected`].
    pub async fn reconnect(&self) -> Result<Welcome, ClientError> {
        let shared = &self.shared;
        {
            let mut st = shared.state();
            match st.phase {
                Phase::Closed => return Err(ClientError::Closed),
                _ if st.resuming => return Err(ClientError::ReconnectInProgress),
                _ => {}
            }
            st.resuming = true;
            st.phase = Phase::Resuming;
            let generation = st.generation;
            shared.drop_connection(&mut st, generation, true);
        }
        let mut last = ClientError::Disconnected;
        let attempts = shared.state().urls.len();
        for _ in 0..attempts {
            match shared.resume_once().await {
                Ok(welcome) => return Ok(welcome),
                Err(ClientError::Closed) => return Err(ClientError::Closed),
                Err(e) => last = e,
            }
        }
        let auto = shared.options.reconnect.is_some();
        let mut st = shared.state();
        if auto && st.phase != Phase::Closed {
            // Keep the sends waiting: the automatic loop carries on where this gave up.
            let task = tokio::spawn(Arc::clone(shared).resume_loop());
            st.resume_task = Some(task);
        } else {
            st.resuming = false;
            shared.give_up(&mut st);
        }
        Err(last)
    }

    /// Close the connection gracefully: queued frames are written, then a close frame.
    pub async fn close(self) {
        let writer = self.shared.shutdown();
        if let Some(task) = writer {
            // The writer ends by itself once its queue is drained; an error is moot now.
            let _ = task.await;
        }
    }

    async fn request(
        &self,
        kind: PendingKind,
        frame: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        let id = self.shared.ids.next();
        let text = Utf8Bytes::from(encode(&frame(RequestId(id.to_string()))));
        let rx = self.shared.submit(id, kind, text).await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    async fn request_ok(&self, frame: impl FnOnce(RequestId) -> ClientFrame) -> Result<(), ClientError> {
        match self.request(PendingKind::Plain, frame).await? {
            ServerFrame::Ok { .. } => Ok(()),
            other => Err(unexpected("ok", &other)),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The writer task finishes on its own: it writes what is queued and a close frame.
        drop(self.shared.shutdown());
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if one did, the state is still consistent
        // enough to fail the remaining requests.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: ClientEvent) {
        // A dropped receiver means the application does not want events.
        let _ = self.events.send(event);
    }

    /// Register a request and write it, or (a send while resuming) park it for the resume.
    async fn submit(&self, id: u64, kind: PendingKind, text: Utf8Bytes) -> Result<oneshot::Receiver<Answer>, ClientError> {
        let is_send = matches!(kind, PendingKind::Send { .. });
        let (tx, rx) = oneshot::channel();
        loop {
            let (generation, writer) = {
                let mut st = self.state();
                match (st.phase, &st.conn) {
                    (Phase::Ready, Some(conn)) => (conn.generation, conn.writer.clone()),
                    (Phase::Closed, _) => return Err(ClientError::Closed),
                    (Phase::Resuming, _) if is_send => {
                        st.pending.insert(id, Pending { kind, tx, written_on: 0 });
                        return Ok(rx);
                    }
                    _ => return Err(ClientError::Disconnected),
                }
            };
            let permit = match writer.reserve().await {
                Ok(permit) => permit,
                Err(_) => {
                    // The writer is gone: the socket broke. Sends wait for the resume (if one
                    // comes, the reader's loss handling decides); the rest fail now.
                    if is_send && self.options.reconnect.is_some() {
                        let mut st = self.state();
                        if st.phase != Phase::Closed {
                            st.pending.insert(id, Pending { kind, tx, written_on: 0 });
                            return Ok(rx);
                        }
                    }
                    return Err(ClientError::Disconnected);
                }
            };
            let mut st = self.state();
            let same = st.phase == Phase::Ready && st.conn.as_ref().is_some_and(|c| c.generation == generation);
            if !same {
                // The connection changed while we waited for room: decide again.
                continue;
            }
            st.pending.insert(id, Pending { kind, tx, written_on: generation });
            permit.send(Message::Text(text));
            return Ok(rx);
        }
    }

    /// Take a fresh, logged-in socket into use: spawn its writer and reader.
    fn install(self: &Arc<Self>, ws: WsStream, phase: Phase) -> Option<(u64, mpsc::Sender<Message>)> {
        let (sink, stream) = ws.split();
        let (writer, rx) = mpsc::channel(self.options.write_queue.max(1));
        let writer_task = tokio::spawn(write_loop(sink, rx));
        let mut st = self.state();
        if st.phase == Phase::Closed {
            // Dropping the writer's sender closes the socket.
            return None;
        }
        st.generation += 1;
        let generation = st.generation;
        st.conn = Some(Conn { generation, writer: writer.clone(), writer_task });
        st.phase = phase;
        // Spawned under the lock so the handle is in place before any loss handling reads it.
        st.reader = Some(tokio::spawn(read_loop(Arc::clone(self), generation, stream)));
        Some((generation, writer))
    }

    /// Forget connection `generation`: close it, stop its reader, and fail what was waiting on
    /// it. Sends survive when `keep_sends` (a resume will write them again); the rest fail.
    fn drop_connection(&self, st: &mut State, generation: u64, keep_sends: bool) {
        if st.generation != generation {
            return;
        }
        if let Some(conn) = st.conn.take() {
            drop(conn.writer);
        }
        if let Some(reader) = st.reader.take() {
            reader.abort();
        }
        let ids: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| !(keep_sends && matches!(p.kind, PendingKind::Send { .. })))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(p) = st.pending.remove(&id) {
                let _ = p.tx.send(Err(ClientError::Disconnected));
            }
        }
    }

    /// The reader of `generation` saw its socket end.
    fn connection_lost(self: &Arc<Self>, generation: u64, reason: String) {
        let mut st = self.state();
        if st.generation != generation || st.phase == Phase::Closed {
            return;
        }
        tracing::debug!(%reason, user = %st.welcome.user, "connection lost");
        let auto = self.options.reconnect.is_some();
        // The reader calling us is ending by itself; aborting it would cut this very call.
        st.reader = None;
        let keep_sends = auto || st.resuming;
        self.drop_connection(&mut st, generation, keep_sends);
        self.emit(ClientEvent::Disconnected { reason });
        if st.resuming {
            // The running resume sees its requests fail and moves on to the next URL.
            return;
        }
        if auto {
            st.phase = Phase::Resuming;
            st.resuming = true;
            st.resume_task = Some(tokio::spawn(Arc::clone(self).resume_loop()));
        } else {
            st.phase = Phase::Down;
        }
    }

    /// No more reconnects: fail the parked sends and stay down.
    fn give_up(&self, st: &mut State) {
        if st.phase != Phase::Closed {
            st.phase = Phase::Down;
        }
        for (_, p) in std::mem::take(&mut st.pending) {
            let _ = p.tx.send(Err(ClientError::Disconnected));
        }
    }

    /// Retry [`Shared::resume_once`] with backoff until it works, the policy gives up, or
    /// the client is closed.
    async fn resume_loop(self: Arc<Self>) {
        let policy = self.options.reconnect.clone().unwrap_or_default();
        let started = Instant::now();
        let mut backoff = policy.initial_backoff;
        loop {
            match self.resume_once().await {
                Ok(_) => return,
                Err(ClientError::Closed) => return,
                Err(e) => {
                    let out_of_time = policy.give_up_after.is_some_and(|limit| started.elapsed() >= limit);
                    if out_of_time {
                        let mut st = self.state();
                        st.resuming = false;
                        st.resume_task = None;
                        self.give_up(&mut st);
                        self.emit(ClientEvent::ReconnectFailed { reason: e.to_string() });
                        return;
                    }
                    tracing::debug!(error = %e, ?backoff, "reconnect attempt failed");
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(policy.max_backoff);
                }
            }
        }
    }

    /// One resume attempt on the next URL: token login, re-join every room with `since`, then
    /// write every unacknowledged send again. Leaves the client `Ready` on success.
    async fn resume_once(self: &Arc<Self>) -> Result<Welcome, ClientError> {
        let (url, login) = {
            let mut st = self.state();
            if st.phase == Phase::Closed {
                return Err(ClientError::Closed);
            }
            st.url_index = (st.url_index + 1) % st.urls.len().max(1);
            let url = st.urls.get(st.url_index).cloned().unwrap_or_default();
            let login = Login::token(Some(st.welcome.user.clone()), st.welcome.session.clone());
            (url, login)
        };
        let (ws, welcome) = handshake(&url, &login, &self.options).await?;
        let Some((generation, writer)) = self.install(ws, Phase::Resuming) else {
            return Err(ClientError::Closed);
        };
        let result = tokio::time::timeout(
            self.options.connect_timeout,
            self.resume_on(generation, &writer, &url, &welcome),
        )
        .await
        .unwrap_or(Err(ClientError::Timeout));
        if result.is_err() {
            let mut st = self.state();
            self.drop_connection(&mut st, generation, true);
        }
        result.map(|()| welcome)
    }

    async fn resume_on(
        self: &Arc<Self>,
        generation: u64,
        writer: &mpsc::Sender<Message>,
        url: &str,
        welcome: &Welcome,
    ) -> Result<(), ClientError> {
        let mut joins = Vec::new();
        let mut frames = Vec::new();
        {
            let mut st = self.state();
            if st.generation != generation {
                return Err(ClientError::Disconnected);
            }
            st.welcome = welcome.clone();
            let mut urls = candidate_urls(url, welcome, &self.options);
            // Keep earlier candidates too: a peer that is down now may be the one back later.
            for u in std::mem::take(&mut st.urls) {
                if !urls.contains(&u) {
                    urls.push(u);
                }
            }
            st.urls = urls;
            st.url_index = 0;
            self.emit(ClientEvent::Reconnected { url: url.to_owned(), welcome: welcome.clone() });
            let rooms: Vec<(RoomAddr, String, Option<String>, u64)> = st
                .rooms
                .iter()
                .map(|(room, r)| (room.clone(), r.nick.clone(), r.password.clone(), r.last_seq))
                .collect();
            for (room, nick, password, last_seq) in rooms {
                let id = self.ids.next();
                let (tx, rx) = oneshot::channel();
                let since = Some(last_seq);
                let kind = PendingKind::Join { room: room.clone(), password: password.clone(), since, rejoin: true };
                st.pending.insert(id, Pending { kind, tx, written_on: generation });
                frames.push(encode(&ClientFrame::Join { id: RequestId(id.to_string()), room, nick, since, password }));
                joins.push(rx);
            }
        }
        for text in frames {
            writer.send(Message::text(text)).await.map_err(|_| ClientError::Disconnected)?;
        }
        for rx in joins {
            match rx.await {
                // A room that cannot be served right now (moving between nodes): try again.
                Ok(Err(e @ ClientError::Server { code: ErrorCode::Unavailable, .. })) => return Err(e),
                // A refused re-join was reported by the reader (RejoinFailed); carry on.
                Ok(Ok(_)) | Ok(Err(ClientError::Server { .. })) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(ClientError::Disconnected),
            }
        }
        // Resend in submission order until none is left unwritten, then open the gate; sends
        // submitted meanwhile were parked and are picked up by the next round.
        loop {
            let batch: Vec<Utf8Bytes> = {
                let mut st = self.state();
                if st.generation != generation || st.conn.is_none() {
                    return Err(ClientError::Disconnected);
                }
                let batch: Vec<Utf8Bytes> = st
                    .pending
                    .values_mut()
                    .filter(|p| p.written_on != generation)
                    .filter_map(|p| match &p.kind {
                        PendingKind::Send { text } => {
                            p.written_on = generation;
                            Some(text.clone())
                        }
                        _ => None,
                    })
                    .collect();
                if batch.is_empty() {
                    st.phase = Phase::Ready;
                    st.resuming = false;
                    st.resume_task = None;
                    return Ok(());
                }
                batch
            };
            for text in batch {
                writer.send(Message::Text(text)).await.map_err(|_| ClientError::Disconnected)?;
            }
        }
    }

    /// Route one server frame: answers to their waiting request, everything else to events.
    /// Also keeps the resume state: rooms joined and the last `seq` seen in each.
    ///
    /// Returns where to move the connection to when the server says the node no longer serves
    /// it (`goaway` with a URL, or `moved` to another node) and the client reconnects by itself.
    fn route(&self, frame: ServerFrame) -> Option<String> {
        let relocate = match (&frame, self.options.reconnect.is_some()) {
            (ServerFrame::Goaway { to: Some(to), .. }, true) => Some(peer_url(to)),
            (ServerFrame::Moved { to, .. }, true) => Some(peer_url(to)),
            _ => None,
        };
        let mut st = self.state();
        if let Some(to) = &relocate {
            let current = st.urls.get(st.url_index).cloned();
            if current.as_deref() == Some(to.as_str()) && matches!(frame, ServerFrame::Moved { .. }) {
                self.route_locked(st, frame);
                return None;
            }
            // Resume there first: `resume_once` takes the URL after `url_index`.
            st.urls.retain(|u| u != to);
            st.urls.insert(0, to.clone());
            st.url_index = st.urls.len() - 1;
        }
        self.route_locked(st, frame);
        relocate
    }

    fn route_locked(&self, mut st: MutexGuard<'_, State>, frame: ServerFrame) {
        let pending = frame
            .re()
            .and_then(|re| re.0.parse::<u64>().ok())
            .and_then(|id| st.pending.remove(&id));
        match pending {
            Some(p) => self.answer(&mut st, p, frame),
            None => self.event(&mut st, frame),
        }
    }

    fn answer(&self, st: &mut State, p: Pending, frame: ServerFrame) {
        let result = match (p.kind, frame) {
            (kind, ServerFrame::Error { code, message, .. }) => {
                // A room that is moving (`unavailable`) is kept: the resume fails and is retried.
                if let PendingKind::Join { room, rejoin: true, .. } = kind
                    && code != ErrorCode::Unavailable
                {
                    st.rooms.remove(&room);
                    self.emit(ClientEvent::RejoinFailed { room, code, message: message.clone() });
                }
                Err(ClientError::Server { code, message })
            }
            (PendingKind::Join { password, since, rejoin, .. }, frame @ ServerFrame::Joined { .. }) => {
                let answer = joined_from(frame.clone());
                if let Ok(joined) = &answer {
                    let previous = st.rooms.get(&joined.room).map_or(0, |r| r.last_seq);
                    let last_seq = match since {
                        Some(s) if rejoin => s.max(previous),
                        Some(s) => s,
                        None => joined.last_seq,
                    };
                    st.rooms.insert(joined.room.clone(), RoomState { nick: joined.nick.clone(), password, last_seq });
                    if rejoin {
                        self.emit(ClientEvent::Rejoined(joined.clone()));
                    }
                }
                Ok(frame)
            }
            (_, frame @ ServerFrame::Left { .. }) => {
                if let ServerFrame::Left { room, .. } = &frame {
                    st.rooms.remove(room);
                }
                Ok(frame)
            }
            (_, other) => Ok(other),
        };
        // The waiter may have given up (dropped its future); the answer is then moot.
        let _ = p.tx.send(result);
    }

    fn event(&self, st: &mut State, frame: ServerFrame) {
        let event = match frame {
            ServerFrame::Message(m) => {
                if let Some(r) = st.rooms.get_mut(&m.room) {
                    r.last_seq = r.last_seq.max(m.seq);
                }
                ClientEvent::Message(m)
            }
            ServerFrame::Presence { room, user, nick, status, reason } => {
                let me = st.rooms.get(&room).is_some_and(|r| r.nick == nick) && user == st.welcome.user;
                if me && status == "kicked" {
                    st.rooms.remove(&room);
                }
                ClientEvent::Presence { room, user, nick, status, reason }
            }
            ServerFrame::Subject { room, subject, by } => ClientEvent::Subject { room, subject, by },
            ServerFrame::Configured { room, config } => ClientEvent::Configured { room, config },
            ServerFrame::Destroyed { room, reason } => {
                st.rooms.remove(&room);
                ClientEvent::Destroyed { room, reason }
            }
            ServerFrame::Moved { room, to } => ClientEvent::Moved { room, to },
            ServerFrame::Goaway { reason, to } => ClientEvent::Goaway { reason, to },
            ServerFrame::Error { code, message, room, .. } => ClientEvent::Error { code, message, room },
            other => {
                tracing::debug!(frame = %other.to_json(), "answer to no pending request");
                return;
            }
        };
        self.emit(event);
    }

    /// Close for good: no reconnects, connection closed, every waiter answered `Closed`.
    /// Returns the writer task, which finishes writing and closes the socket.
    fn shutdown(&self) -> Option<JoinHandle<()>> {
        let mut st = self.state();
        st.phase = Phase::Closed;
        if let Some(task) = st.resume_task.take() {
            task.abort();
        }
        if let Some(reader) = st.reader.take() {
            reader.abort();
        }
        let writer = st.conn.take().map(|conn| conn.writer_task);
        for (_, p) in std::mem::take(&mut st.pending) {
            let _ = p.tx.send(Err(ClientError::Closed));
        }
        writer
    }
}

/// The TLS config for a `wss://` URL: the options', or one shared config with the Mozilla roots.
fn tls_config(options: &ClientOptions) -> Arc<rustls::ClientConfig> {
    static DEFAULT: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    options.tls.clone().unwrap_or_else(|| {
        DEFAULT.get_or_init(|| crate::tls::client_config(None).expect("the built-in roots make a valid config")).clone()
    })
}

/// Open the socket and log in; answers the stream and the `welcome`.
async fn handshake(url: &str, login: &Login, options: &ClientOptions) -> Result<(WsStream, Welcome), ClientError> {
    let attempt = async {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_SIZE)
            .write_buffer_size(WRITE_BUFFER_SIZE);
        let connector = url.starts_with("wss://").then(|| tokio_tungstenite::Connector::Rustls(tls_config(options)));
        let (mut ws, _response) = tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, connector).await?;
        ws.send(Message::text(encode(&login.hello()))).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                    Ok(ServerFrame::Welcome { user, node, session, service, guest, peers, .. }) => {
                        return Ok((ws, Welcome { user, node, session, service, guest, peers }));
                    }
                    Ok(ServerFrame::Error { code, message, .. }) => {
                        return Err(ClientError::Server { code, message });
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(ClientError::Protocol(format!("unreadable frame before welcome: {e}"))),
                },
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Protocol(format!("closed before welcome: {}", close_reason(frame.as_ref()))));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ClientError::Disconnected),
            }
        }
    };
    tokio::time::timeout(options.connect_timeout, attempt).await.unwrap_or(Err(ClientError::Timeout))
}

/// The URLs a session may resume on, in order: where it is, its peers, configured extras.
fn candidate_urls(url: &str, welcome: &Welcome, options: &ClientOptions) -> Vec<String> {
    let extras = options.reconnect.iter().flat_map(|p| p.extra_urls.iter());
    let mut urls = vec![url.to_owned()];
    for u in welcome.peers.iter().map(|p| peer_url(p)).chain(extras.cloned()) {
        if !urls.contains(&u) {
            urls.push(u);
        }
    }
    urls
}

/// Spread reconnects of many clients over time: the wait is 50–100% of `backoff`.
fn jittered(backoff: Duration) -> Duration {
    let ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms / 2 + rand::random_range(0..=ms / 2))
}

fn close_reason(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
        None => "close".to_owned(),
    }
}

async fn read_loop(shared: Arc<Shared>, generation: u64, mut stream: SplitStream<WsStream>) {
    let reason = loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(frame) => {
                    if let Some(to) = shared.route(frame) {
                        break format!("moved to {to}");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable server frame ignored"),
            },
            Some(Ok(Message::Close(frame))) => break close_reason(frame.as_ref()),
            Some(Ok(Message::Binary(_))) => tracing::warn!("binary server frame ignored"),
            // Pings are answered by tungstenite itself.
            Some(Ok(_)) => {}
            Some(Err(e)) => break e.to_string(),
            None => break "connection closed".to_owned(),
        }
    };
    shared.connection_lost(generation, reason);
}

async fn write_loop(mut sink: SplitSink<WsStream, Message>, mut rx: mpsc::Receiver<Message>) {
    while let Some(first) = rx.recv().await {
        // Feed everything already queued, then flush once: pipelined frames share writes.
        let mut next = Some(first);
        while let Some(msg) = next {
            if sink.feed(msg).await.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    // Every sender is gone: the client closed or dropped this connection.
    let _ = sink.close().await;
}

fn encode(frame: &ClientFrame) -> String {
    serde_json::to_string(frame).expect("client frames always serialize")
}

fn unexpected(wanted: &str, got: &ServerFrame) -> ClientError {
    let op = serde_json::to_value(got)
        .ok()
        .and_then(|v| v.get("op").and_then(|op| op.as_str()).map(str::to_owned))
        .unwrap_or_default();
    ClientError::Protocol(format!("expected `{wanted}`, got `{op}`"))
}

fn joined_from(frame: ServerFrame) -> Result<Joined, ClientError> {
    match frame {
        ServerFrame::Joined { room, nick, last_seq, occupants, subject, affiliation, truncated, .. } => {
            Ok(Joined { room, nick, last_seq, occupants, subject, affiliation, truncated })
        }
        other => Err(unexpected("joined", &other)),
    }
}

fn ack_from(frame: ServerFrame) -> Result<Ack, ClientError> {
    match frame {
        ServerFrame::Ack { room, seq, ts, duplicate, .. } => Ok(Ack { room, seq, ts, duplicate }),
        other => Err(unexpected("ack", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(reconnect: bool) -> (Arc<Shared>, EventStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let welcome = Welcome {
            user: "ann".into(),
            node: "n1".into(),
            session: "tok".into(),
            service: "conference.localhost".into(),
            guest: false,
            peers: vec![],
        };
        let options = if reconnect { ClientOptions::reconnecting() } else { ClientOptions::default() };
        let shared = Arc::new(Shared {
            ids: IdGen::new(),
            state: Mutex::new(State {
                phase: Phase::Ready,
                generation: 1,
                conn: None,
                reader: None,
                resume_task: None,
                resuming: false,
                welcome,
                urls: vec!["ws://a/ws".into()],
                url_index: 0,
                pending: BTreeMap::new(),
                rooms: HashMap::new(),
            }),
            events: tx,
            options,
        });
        (shared, rx)
    }

    fn park(s: &Shared, kind: PendingKind) -> (u64, oneshot::Receiver<Answer>) {
        let id = s.ids.next();
        let (tx, rx) = oneshot::channel();
        s.state().pending.insert(id, Pending { kind, tx, written_on: 1 });
        (id, rx)
    }

    fn room() -> RoomAddr {
        RoomAddr("ops@conference.localhost".into())
    }

    fn msg(seq: u64) -> ServerFrame {
        ServerFrame::Message(MessageEvent {
            room: room(),
            seq,
            from: "bob".into(),
            nick: "bob".into(),
            body: "hi".into(),
            cid: format!("c{seq}"),
            ts: 1,
        })
    }

    fn joined(re: u64, last_seq: u64) -> ServerFrame {
        ServerFrame::Joined {
            re: RequestId(re.to_string()),
            room: room(),
            nick: "ann".into(),
            last_seq,
            occupants: vec![],
            subject: String::new(),
            affiliation: Affiliation::None,
            truncated: false,
        }
    }

    /// Request ids are unique, increasing, and never reused, even across threads.
    #[test]
    fn request_ids_are_unique_and_increasing() {
        let ids = Arc::new(IdGen::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids = Arc::clone(&ids);
                std::thread::spawn(move || (0..1000).map(|_| ids.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        for chunk in all.chunks(1000) {
            assert!(chunk.windows(2).all(|w| w[0] < w[1]));
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
        assert_eq!(all[0], 1);
    }

    /// `hello` has the documented shape for each login kind; guests send no credentials.
    #[test]
    fn hello_frames_match_the_protocol() {
        let v = |l: Login| serde_json::to_value(l.hello()).unwrap();
        assert_eq!(
            v(Login::password("ann", "pw")),
            serde_json::json!({"op":"hello","v":1,"user":"ann","password":"pw","id":"hello"})
        );
        assert_eq!(v(Login::guest("g")), serde_json::json!({"op":"hello","v":1,"user":"g","id":"hello"}));
        assert_eq!(
            v(Login::token(Some("ann".into()), "t")),
            serde_json::json!({"op":"hello","v":1,"user":"ann","token":"t","id":"hello"})
        );
    }

    /// An answer goes to the request whose id is its `re`, and nowhere else.
    #[test]
    fn answers_are_routed_by_re() {
        let (s, mut events) = shared(false);
        let (a, mut rx_a) = park(&s, PendingKind::Plain);
        let (b, mut rx_b) = park(&s, PendingKind::Plain);
        s.route(ServerFrame::Pong { re: RequestId(b.to_string()) });
        assert_eq!(rx_b.try_recv().unwrap().unwrap(), ServerFrame::Pong { re: RequestId(b.to_string()) });
        assert!(rx_a.try_recv().is_err());
        s.route(ServerFrame::error(Some(RequestId(a.to_string())), ErrorCode::Forbidden, "no"));
        match rx_a.try_recv().unwrap() {
            Err(ClientError::Server { code: ErrorCode::Forbidden, message }) => assert_eq!(message, "no"),
            other => panic!("{other:?}"),
        }
        assert!(s.state().pending.is_empty());
        assert!(events.try_recv().is_err());
    }

    /// Frames without a matching `re` are events; an error without `re` is an event too.
    #[test]
    fn frames_without_re_become_events() {
        let (s, mut events) = shared(false);
        s.route(msg(1));
        s.route(ServerFrame::error(None, ErrorCode::RateLimited, "slow"));
        s.route(ServerFrame::Goaway { reason: "bye".into(), to: None });
        assert!(matches!(events.try_recv().unwrap(), ClientEvent::Message(m) if m.seq == 1));
        assert!(matches!(events.try_recv().unwrap(), ClientEvent::Error { code: ErrorCode::RateLimited, .. }));
        assert_eq!(events.try_recv().unwrap(), ClientEvent::Goaway { reason: "bye".into(), to: None });
    }

    /// A join without `since` starts the resume point at the room's last seq; message events
    /// move it forward and never back.
    #[test]
    fn joined_rooms_track_the_last_seq_seen() {
        let (s, _events) = shared(false);
        let (id, mut rx) = park(&s, PendingKind::Join { room: room(), password: None, since: None, rejoin: false });
        s.route(joined(id, 7));
        assert!(rx.try_recv().unwrap().is_ok());
        assert_eq!(s.state().rooms[&room()].last_seq, 7);
        s.route(msg(5)); // replayed history
        s.route(msg(9));
        s.route(msg(8));
        assert_eq!(s.state().rooms[&room()].last_seq, 9);
        s.route(ServerFrame::Left { re: RequestId("999".into()), room: room() });
        assert!(s.state().rooms.contains_key(&room()), "a `left` answering nothing is ignored");
        let (id, _rx) = park(&s, PendingKind::Plain);
        s.route(ServerFrame::Left { re: RequestId(id.to_string()), room: room() });
        assert!(!s.state().rooms.contains_key(&room()));
    }

    /// A join with `since` resumes from `since`, so the replayed messages are counted as seen.
    #[test]
    fn join_with_since_starts_from_since() {
        let (s, _events) = shared(false);
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: Some("pw".into()), since: Some(3), rejoin: false });
        s.route(joined(id, 10));
        let st = s.state();
        assert_eq!(st.rooms[&room()].last_seq, 3);
        assert_eq!(st.rooms[&room()].password.as_deref(), Some("pw"));
    }

    /// Re-joins are reported as events; a refused re-join removes the room.
    #[test]
    fn rejoins_are_reported() {
        let (s, mut events) = shared(true);
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: None, since: Some(4), rejoin: true });
        s.route(joined(id, 6));
        assert!(matches!(events.try_recv().unwrap(), ClientEvent::Rejoined(j) if j.last_seq == 6));
        assert_eq!(s.state().rooms[&room()].last_seq, 4);
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: None, since: Some(4), rejoin: true });
        s.route(ServerFrame::Error {
            re: Some(RequestId(id.to_string())),
            code: ErrorCode::Forbidden,
            message: "outcast".into(),
            room: Some(room()),
            retry_after_ms: None,
        });
        assert!(matches!(events.try_recv().unwrap(), ClientEvent::RejoinFailed { code: ErrorCode::Forbidden, .. }));
        assert!(s.state().rooms.is_empty());
    }

    /// Being kicked or the room being destroyed ends membership, so no resume re-joins it.
    #[test]
    fn kick_and_destroy_forget_the_room() {
        let (s, _events) = shared(false);
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: None, since: None, rejoin: false });
        s.route(joined(id, 0));
        let presence = |nick: &str, status: &str| ServerFrame::Presence {
            room: room(),
            user: "ann".into(),
            nick: nick.into(),
            status: status.into(),
            reason: None,
        };
        s.route(presence("other", "kicked"));
        assert!(s.state().rooms.contains_key(&room()));
        s.route(presence("ann", "kicked"));
        assert!(s.state().rooms.is_empty());
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: None, since: None, rejoin: false });
        s.route(joined(id, 0));
        s.route(ServerFrame::Destroyed { room: room(), reason: None });
        assert!(s.state().rooms.is_empty());
    }

    /// A lost connection fails waiting requests; sends survive it only when a resume follows.
    #[tokio::test]
    async fn connection_loss_keeps_sends_only_for_a_resume() {
        let text = Utf8Bytes::from("{}");
        let (s, mut events) = shared(false);
        let (_, mut plain) = park(&s, PendingKind::Plain);
        let (_, mut send) = park(&s, PendingKind::Send { text: text.clone() });
        s.connection_lost(1, "gone".into());
        assert!(matches!(plain.try_recv().unwrap(), Err(ClientError::Disconnected)));
        assert!(matches!(send.try_recv().unwrap(), Err(ClientError::Disconnected)));
        assert_eq!(s.state().phase, Phase::Down);
        assert_eq!(events.try_recv().unwrap(), ClientEvent::Disconnected { reason: "gone".into() });

        let (s, _events) = shared(true);
        let (_, mut plain) = park(&s, PendingKind::Plain);
        let (_, mut send) = park(&s, PendingKind::Send { text });
        s.connection_lost(1, "gone".into());
        assert!(matches!(plain.try_recv().unwrap(), Err(ClientError::Disconnected)));
        assert!(send.try_recv().is_err(), "the send waits for the resume");
        let st = s.state();
        assert_eq!(st.phase, Phase::Resuming);
        assert!(st.resuming);
        drop(st);
        drop(s.shutdown());
        assert!(matches!(send.try_recv().unwrap(), Err(ClientError::Closed)));
    }

    /// A loss reported by the reader of an older connection changes nothing.
    #[test]
    fn stale_connection_loss_is_ignored() {
        let (s, _events) = shared(false);
        let (_, mut plain) = park(&s, PendingKind::Plain);
        s.connection_lost(0, "old".into());
        assert!(plain.try_recv().is_err());
        assert_eq!(s.state().phase, Phase::Ready);
    }

    /// Resumes try the node, then its peers (given as `host:port` or URLs), then extras.
    #[test]
    fn candidate_urls_put_peers_after_the_node() {
        let welcome = Welcome {
            user: "u".into(),
            node: "n".into(),
            session: "s".into(),
            service: "c".into(),
            guest: true,
            peers: vec!["10.0.0.2:7450".into(), "ws://a/ws".into()],
        };
        let mut options = ClientOptions::reconnecting();
        options.reconnect.as_mut().unwrap().extra_urls = vec!["ws://x/ws".into()];
        assert_eq!(
            candidate_urls("ws://a/ws", &welcome, &options),
            vec!["ws://a/ws", "ws://10.0.0.2:7450/ws", "ws://x/ws"]
        );
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

    /// A pending ack resolves from the routed answer; a dropped client resolves it `Closed`.
    #[tokio::test]
    async fn pending_ack_resolves_from_the_answer() {
        let (s, _events) = shared(false);
        let (id, rx) = park(&s, PendingKind::Send { text: Utf8Bytes::from("{}") });
        let pending = PendingAck { rx, cid: ClientMsgId("c".into()) };
        s.route(ServerFrame::Ack { re: RequestId(id.to_string()), room: room(), seq: 1, ts: 2, duplicate: false });
        assert_eq!(pending.await.unwrap().seq, 1);
        let (_, rx) = park(&s, PendingKind::Send { text: Utf8Bytes::from("{}") });
        drop(s.shutdown());
        let pending = PendingAck { rx, cid: ClientMsgId("d".into()) };
        assert!(matches!(pending.await, Err(ClientError::Closed)));
    }

    /// Client message ids are fresh every time.
    #[test]
    fn new_cids_are_distinct() {
        assert_ne!(new_cid(), new_cid());
    }
}
