//! The gateway: the protocol-neutral session API every front end (protocol v1 over WebSocket,
//! XMPP) is a codec over.
//!
//! One method per operation (login, create, join, leave, send, history, subject, configure,
//! affiliate, kick, destroy, list). Each validates its request (names, sizes, cids, config),
//! checks the budgets that are not per connection (failed logins, rooms created), calls the
//! room or the store, and returns a typed result or a [`Failure`] with a documented error code.
//! Answers that rooms send themselves (a join's `joined` and replay, a post's ack) reach the
//! session through its [`crate::session::Wire`], in room order.
//!
//! Operations on a room are [`RoomOp`]s. In a pair, one whose room the peer hosts is passed to
//! the peer as it is ([`Remote::request`], over the node link) and served there by
//! [`Gateway::serve`] for a stand-in of the session; the peer's answers and room events come
//! back typed and reach the session's wire as if the room were here. So every front end
//! reaches every room of the pair, and knows nothing of where it is.
//!
//! The gateway also keeps the node's table of live sessions (for `goaway` on failover, the
//! admin's session list and kick) and whether the node takes logins at all.

use crate::ids::{NodeId, RoomAddr, SessionId};
use crate::auth::{Auth, AuthError, LoggedIn};
use crate::config::Settings;
use crate::event::ChatMessage;
use crate::protocol::{Affiliation, ClientMsgId, ErrorCode, RequestId, RoomConfig, RoomConfigPatch, RoomSummary};
use crate::registry::RoomRegistry;
use crate::room::{self, RoomError};
use crate::session::{KillReason, Session, Wire};
use crate::store::Store;
use crate::auth::scram::{Credentials, Hash};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Default `limit` of a `history` request.
pub const HISTORY_DEFAULT_LIMIT: u32 = 50;

/// Most rooms a `list` answer holds (and its default `limit`).
pub const LIST_MAX_ROOMS: u64 = 1000;

/// Longest subject, room password, and kick reason.
pub const MAX_TEXT_CHARS: usize = 1024;

/// How long a login waits for a node that does not serve clients yet (it may be taking its
/// rooms back right now) before it is refused.
const ACCEPT_WAIT: Duration = Duration::from_secs(2);

/// Rooms another node hosts, as a session reaches them (`crate::forward` over the node link of
/// a pair). Defined here, where it is used, so the gateway needs no import of its
/// implementation.
pub trait Remote: Send + Sync {
    /// May a room hosted by `host` be forwarded now?
    fn can_forward(&self, host: &NodeId) -> bool;
    /// `host` cannot serve now: wait for this node to take its rooms over; true if it did.
    fn await_takeover<'a>(&'a self, host: &'a NodeId) -> futures_util::future::BoxFuture<'a, bool>;
    /// Does `session` use `room` on the other node?
    fn is_forwarded(&self, session: SessionId, room: &RoomAddr) -> bool;
    /// Serve `op` of `session` on the other node and wait for its outcome. Answers and events
    /// of the room reach the session's wire meanwhile, in the room's order. Fails with
    /// `unavailable` (never hangs) when the other node goes away or does not answer in time.
    fn request<'a>(&'a self, session: &'a Arc<Session>, op: RoomOp) -> futures_util::future::BoxFuture<'a, Outcome<Reply>>;
    /// A session of this node ended.
    fn session_closed(&self, session: SessionId);
}

/// An operation on a room: what [`Gateway::serve`] does here and [`Remote::request`] asks of
/// the room's host.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RoomOp {
    Create { room: RoomAddr, patch: RoomConfigPatch },
    Join(JoinRequest),
    Leave { re: RequestId, room: RoomAddr },
    Send { re: RequestId, room: RoomAddr, body: String, cid: ClientMsgId },
    History { room: RoomAddr, query: HistoryQuery },
    Subject { room: RoomAddr, subject: String },
    Configure { room: RoomAddr, patch: RoomConfigPatch },
    Affiliate { room: RoomAddr, target: String, affiliation: Affiliation },
    Kick { room: RoomAddr, nick: String, reason: Option<String> },
    Destroy { room: RoomAddr, reason: Option<String> },
    Archive { room: RoomAddr, query: ArchiveQuery },
    AdminView { room: RoomAddr },
}

impl RoomOp {
    /// The room it is about.
    pub fn room(&self) -> &RoomAddr {
        match self {
            RoomOp::Join(j) => &j.room,
            RoomOp::Create { room, .. }
            | RoomOp::Leave { room, .. }
            | RoomOp::Send { room, .. }
            | RoomOp::History { room, .. }
            | RoomOp::Subject { room, .. }
            | RoomOp::Configure { room, .. }
            | RoomOp::Affiliate { room, .. }
            | RoomOp::Kick { room, .. }
            | RoomOp::Destroy { room, .. }
            | RoomOp::Archive { room, .. }
            | RoomOp::AdminView { room } => room,
        }
    }
}

/// The outcome of a [`RoomOp`] that succeeded.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done; anything the client sees next comes from the room (`joined`, an ack).
    Done,
    History(HistoryPage),
    Archive(ArchivePage),
    AdminView(room::RoomAdminView),
}

/// Why a request failed: a documented error code and a message for the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    /// A spent budget: when to try again.
    pub retry_after_ms: Option<u64>,
    /// The room is hosted by this other node (a front end may forward the request there).
    pub hosted_by: Option<NodeId>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure { code, message: message.into(), retry_after_ms: None, hosted_by: None }
    }
}

impl From<RoomError> for Failure {
    fn from(e: RoomError) -> Self {
        if let RoomError::Internal(detail) = &e {
            tracing::error!(%detail, "internal room error");
        }
        let mut failure = Failure::new(e.code(), e.client_message());
        if let RoomError::HostedBy(node) = e {
            failure.hosted_by = Some(node);
        }
        failure
    }
}

/// The result of a gateway operation.
pub type Outcome<T> = Result<T, Failure>;

fn fail<T>(code: ErrorCode, message: impl Into<String>) -> Outcome<T> {
    Err(Failure::new(code, message))
}

/// Which messages a `history` request asks for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistoryQuery {
    /// Only messages with a smaller seq.
    pub before: Option<u64>,
    /// Only messages with a greater seq (then the oldest first are taken, not the newest).
    pub after: Option<u64>,
    /// At most this many (default [`HISTORY_DEFAULT_LIMIT`], capped by the config).
    pub limit: Option<u32>,
}

/// A page of history, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryPage {
    pub messages: Vec<ChatMessage>,
    /// There are more messages in the direction asked for.
    pub truncated: bool,
    /// The page was read from the newest end (no `after`): more are older.
    pub newest_first: bool,
}

/// A page of the rooms list, by name.
#[derive(Clone, Debug)]
pub struct RoomPage {
    pub rooms: Vec<RoomSummary>,
    pub truncated: bool,
}

/// An archive search (XMPP MAM with RSM paging).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ArchiveQuery {
    /// Messages after the one with this id.
    pub after_id: Option<String>,
    /// Messages before the one with this id; `Some("")`: the last page.
    pub before_id: Option<String>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    /// Only messages sent under this nick.
    pub nick: Option<String>,
    /// At most this many (default [`HISTORY_DEFAULT_LIMIT`], capped by `rooms.history_max_limit`).
    pub max: Option<u32>,
}

/// A page of an archive search, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchivePage {
    pub messages: Vec<ChatMessage>,
    /// No more messages in the direction asked for.
    pub complete: bool,
    /// How many messages match the search's filters, all pages together.
    pub count: u64,
}

/// A room's public facts.
#[derive(Clone, Debug)]
pub struct RoomFacts {
    pub public: bool,
    pub password_protected: bool,
    pub subject: String,
}

/// A join request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub re: RequestId,
    pub room: RoomAddr,
    pub nick: String,
    /// Replay messages after this seq.
    pub since: Option<u64>,
    pub password: Option<String>,
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket { rate: rate as f64, burst, tokens: burst, at: Instant::now() }
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the node's sessions share, and the operations they perform.
pub struct Gateway {
    pub settings: Arc<Settings>,
    pub registry: RoomRegistry,
    pub store: Store,
    pub auth: Auth,
    next_session: AtomicU64,
    connections: AtomicI64,
    /// Logged-in sessions, so the node can send them all `goaway` (failover).
    sessions: Mutex<HashMap<SessionId, Weak<Session>>>,
    /// Whether logins are taken (off while the `router` service is stopped or the node is
    /// failed over).
    accepting: tokio::sync::watch::Sender<bool>,
    /// Forwarding to the peer over the node link (HA pairs).
    forwarder: Option<Arc<dyn Remote>>,
    /// Since when every `accept` on the client listener has failed (the `router` probe).
    accept_failing_since: Mutex<Option<Instant>>,
    /// Failed logins per user name and source address, across connections.
    login_failures: crate::throttle::Throttle,
    /// Rooms created per user name and source address.
    room_creations: crate::throttle::Throttle,
}

impl Gateway {
    /// The gateway of a node; `forwarder` serves rooms hosted by the peer (in a pair).
    pub fn new(settings: Arc<Settings>, registry: RoomRegistry, store: Store, auth: Auth, forwarder: Option<Arc<dyn Remote>>) -> Self {
        use crate::throttle::{Policy, Throttle};
        let window = Duration::from_secs(settings.auth.login_failure_window_s);
        let login_failures = Throttle::new(
            "login_failures",
            Policy { burst: settings.auth.login_failures_per_user, window },
            Policy { burst: settings.auth.login_failures_per_address, window },
        );
        let hour = Duration::from_secs(3600);
        let room_creations = Throttle::new(
            "room_creations",
            Policy { burst: settings.limits.rooms_created_per_user_per_hour, window: hour },
            Policy { burst: settings.limits.rooms_created_per_address_per_hour, window: hour },
        );
        Gateway {
            login_failures,
            room_creations,
            settings,
            registry,
            store,
            auth,
            next_session: AtomicU64::new(1),
            connections: Default::default(),
            sessions: Default::default(),
            accepting: tokio::sync::watch::Sender::new(true),
            forwarder,
            accept_failing_since: Mutex::new(None),
        }
    }

    /// The request budget of one connection.
    pub fn request_bucket(&self) -> TokenBucket {
        let limits = &self.settings.limits;
        TokenBucket::new(limits.requests_per_second, limits.request_burst)
    }

    // --- connections and the node's state ---------------------------------------------------

    /// Open client connections right now.
    pub fn connection_count(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Count a connection in (`+1`) or out (`-1`).
    pub fn count_connection(&self, delta: i64) {
        self.connections.fetch_add(delta, Ordering::Relaxed);
        metrics::gauge!("stoa_connections").set(self.connection_count() as f64);
    }

    /// Record the outcome of an `accept` on the client listener.
    pub fn accept_result(&self, ok: bool) {
        let mut since = self.accept_failing_since.lock().expect("accept probe lock");
        match (ok, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// The `router` critical service's probe: the client listener is not failing every
    /// `accept` (out of file descriptors, say) for longer than a second.
    pub fn probe(&self) -> bool {
        self.accept_failing_since.lock().expect("accept probe lock").is_none_or(|t| t.elapsed() < Duration::from_secs(1))
    }

    /// Forwarding to the peer, in a pair.
    pub fn forwarder(&self) -> Option<&Arc<dyn Remote>> {
        self.forwarder.as_ref()
    }

    /// Take logins (again), or refuse them with `unavailable` (clients then try the peer).
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.send_replace(accepting);
    }

    pub fn is_accepting(&self) -> bool {
        *self.accepting.borrow()
    }

    /// Wait up to `limit` for logins to be taken; true if they are.
    async fn await_accepting(&self, limit: Duration) -> bool {
        let mut rx = self.accepting.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|a| *a)).await, Ok(Ok(_)))
    }

    // --- the session table ------------------------------------------------------------------

    /// Open a session of `user` writing through `wire` (after a login, or for the peer's
    /// forwarded sessions) and enter it in the node's table.
    pub fn open_session(&self, user: String, token_hash: Option<String>, address: Option<std::net::IpAddr>, wire: Box<dyn Wire>, kill: CancellationToken) -> Arc<Session> {
        let id = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        let mut session = Session::new(id, user, wire, kill).with_address(address);
        if let Some(hash) = token_hash {
            session = session.with_token_hash(hash);
        }
        let session = Arc::new(session);
        self.sessions.lock().expect("sessions lock").insert(id, Arc::downgrade(&session));
        session
    }

    /// The session's connection ended: leave every room, forget it.
    pub fn close_session(&self, session: &Session) {
        self.sessions.lock().expect("sessions lock").remove(&session.id);
        if let Some(f) = self.forwarder() {
            f.session_closed(session.id);
        }
        for room in session.rooms() {
            if let Some(addr) = self.registry.lookup(&room) {
                addr.do_send(room::Leave { session: session.id, re: None });
            }
        }
    }

    /// A logged-in session of this node, by id.
    pub fn session(&self, id: SessionId) -> Option<Arc<Session>> {
        self.sessions.lock().expect("sessions lock").get(&id).and_then(Weak::upgrade)
    }

    /// Send these sessions `goaway` (naming `to`) and close them shortly after.
    pub fn goaway_sessions(&self, ids: &[SessionId], reason: &str, to: Option<String>) {
        let sessions: Vec<Arc<Session>> = ids.iter().filter_map(|id| self.session(*id)).collect();
        Self::goaway(sessions, reason, to);
    }

    fn goaway(sessions: Vec<Arc<Session>>, reason: &str, to: Option<String>) {
        for s in &sessions {
            s.goaway(reason, to.as_deref());
        }
        tokio::spawn(async move {
            // Let the writers flush the frame before the sockets close.
            tokio::time::sleep(Duration::from_millis(100)).await;
            for s in sessions {
                s.kill(KillReason::Moved);
            }
        });
    }

    /// The logged-in sessions of this node that `which` names.
    pub fn sessions_matching(&self, which: &crate::store::SessionFilter) -> Vec<Arc<Session>> {
        use crate::store::SessionFilter;
        let map = self.sessions.lock().expect("sessions lock");
        map.values()
            .filter_map(Weak::upgrade)
            .filter(|s| match which {
                SessionFilter::User(u) => &s.user == u,
                SessionFilter::HashPrefix(p) => s.token_hash().is_some_and(|h| h.starts_with(p.as_str())),
            })
            .collect()
    }

    /// End the live connections of the sessions `which` names; returns how many. The caller
    /// deletes the stored sessions first, so that the tokens cannot resume.
    pub fn kick_sessions(&self, which: &crate::store::SessionFilter) -> usize {
        let sessions = self.sessions_matching(which);
        for s in &sessions {
            tracing::info!(session = %s.id, user = %s.user, "session ended by an administrator");
            s.kill(KillReason::Kicked);
        }
        sessions.len()
    }

    /// Send every logged-in session `goaway` (naming `to`, where to resume) and close it
    /// shortly after, once the frame is written. Returns how many were told.
    pub fn goaway_all(&self, reason: &str, to: Option<String>) -> usize {
        let sessions: Vec<Arc<Session>> = {
            let mut map = self.sessions.lock().expect("sessions lock");
            let live = map.values().filter_map(Weak::upgrade).collect();
            map.clear();
            live
        };
        let n = sessions.len();
        Self::goaway(sessions, reason, to);
        n
    }

    // --- validation -------------------------------------------------------------------------

    /// A room address this node serves: `name@service`, the service this node's or its peer's.
    pub fn check_room(&self, room: &RoomAddr) -> Outcome<()> {
        let limits = &self.settings.limits;
        let Some((name, service)) = room.0.split_once('@') else {
            return fail(ErrorCode::BadRequest, "room addresses are name@service");
        };
        let name_ok = !name.is_empty()
            && name.chars().count() <= limits.max_room_name_chars
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if !name_ok {
            return fail(
                ErrorCode::BadRequest,
                format!("room names are 1 to {} characters of a-z, 0-9, '.', '_' or '-'", limits.max_room_name_chars),
            );
        }
        let service_ok = !service.is_empty()
            && service.len() <= 253
            && service.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'));
        if !service_ok {
            return fail(ErrorCode::BadRequest, "invalid room service");
        }
        // This node's rooms, and its peer's (which it serves after a takeover).
        let settings = &self.settings;
        if service != settings.node.service && settings.peer().is_none_or(|p| p.service != service) {
            return fail(ErrorCode::NotFound, format!("unknown room service `{service}`"));
        }
        Ok(())
    }

    pub fn check_nick(&self, nick: &str) -> Outcome<()> {
        let max = self.settings.limits.max_nick_chars;
        let ok = !nick.is_empty()
            && nick.chars().count() <= max
            && nick.trim() == nick
            && nick.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
        if ok {
            Ok(())
        } else {
            fail(ErrorCode::BadRequest, format!("nicks are 1 to {max} letters, digits, '_', '-', '.' or inner spaces"))
        }
    }

    fn check_text(&self, what: &str, text: &str) -> Outcome<()> {
        if text.chars().count() > MAX_TEXT_CHARS {
            return fail(ErrorCode::TooLarge, format!("{what} is longer than {MAX_TEXT_CHARS} characters"));
        }
        Ok(())
    }

    fn check_config(&self, patch: &RoomConfigPatch) -> Outcome<()> {
        if patch.persistent == Some(false) {
            return fail(ErrorCode::BadRequest, "non-persistent rooms are not supported: every Stoa room is persistent");
        }
        let max = self.settings.rooms.history_max_limit;
        if patch.history_on_join.is_some_and(|h| h > max) {
            return fail(ErrorCode::BadRequest, format!("history_on_join is at most {max}"));
        }
        if let Some(p) = &patch.password {
            self.check_text("password", p)?;
        }
        if let Some(s) = &patch.subject {
            self.check_text("subject", s)?;
        }
        Ok(())
    }

    /// The `rate_limited` failure of a spent budget (`what`: "failed logins", "rooms created").
    fn throttled(t: crate::throttle::Throttled, what: &str) -> Failure {
        let secs = t.retry_after.as_secs().max(1);
        let mut failure = Failure::new(ErrorCode::RateLimited, format!("too many {what} for this {}; retry in {secs} s", t.by));
        failure.retry_after_ms = Some(t.retry_after.as_millis() as u64);
        failure
    }

    /// The actor of a room `session` occupies (`not_in` if it does not; `gone` if the room's
    /// incarnation is stopping, as when its mailbox is closed).
    fn occupied(&self, session: &Session, room: &RoomAddr, not_in: &str, gone: &str) -> Outcome<actix::Addr<room::Room>> {
        if !session.occupies(room) {
            return fail(ErrorCode::Forbidden, not_in);
        }
        self.registry.lookup(room).ok_or_else(|| Failure::new(ErrorCode::Unavailable, gone))
    }

    // --- room operations, here or on the room's host ----------------------------------------

    /// Create a room owned by the session's user.
    pub async fn create(&self, session: &Arc<Session>, room: &RoomAddr, patch: &RoomConfigPatch) -> Outcome<()> {
        self.route(session, RoomOp::Create { room: room.clone(), patch: patch.clone() }).await.map(drop)
    }

    /// Enter a room. On success the room has queued `joined` and the replay on the session.
    pub async fn join(&self, session: &Arc<Session>, join: JoinRequest) -> Outcome<()> {
        self.route(session, RoomOp::Join(join)).await.map(drop)
    }

    /// Leave a room. On success the room has queued `left` on the session.
    pub async fn leave(&self, session: &Arc<Session>, re: RequestId, room: &RoomAddr) -> Outcome<()> {
        self.route(session, RoomOp::Leave { re, room: room.clone() }).await.map(drop)
    }

    /// Post a message. The room answers on the session after commit (an ack) or with an error.
    pub async fn send(&self, session: &Arc<Session>, re: RequestId, room: &RoomAddr, body: String, cid: ClientMsgId) -> Outcome<()> {
        self.route(session, RoomOp::Send { re, room: room.clone(), body, cid }).await.map(drop)
    }

    /// Read a room's history (members and occupants, as the room's config says).
    pub async fn history(&self, session: &Arc<Session>, room: &RoomAddr, query: HistoryQuery) -> Outcome<HistoryPage> {
        match self.route(session, RoomOp::History { room: room.clone(), query }).await? {
            Reply::History(page) => Ok(page),
            other => Err(mismatched(other)),
        }
    }

    pub async fn subject(&self, session: &Arc<Session>, room: &RoomAddr, subject: String) -> Outcome<()> {
        self.route(session, RoomOp::Subject { room: room.clone(), subject }).await.map(drop)
    }

    pub async fn configure(&self, session: &Arc<Session>, room: &RoomAddr, patch: RoomConfigPatch) -> Outcome<()> {
        self.route(session, RoomOp::Configure { room: room.clone(), patch }).await.map(drop)
    }

    pub async fn affiliate(&self, session: &Arc<Session>, room: &RoomAddr, target: String, affiliation: Affiliation) -> Outcome<()> {
        self.route(session, RoomOp::Affiliate { room: room.clone(), target, affiliation }).await.map(drop)
    }

    pub async fn kick(&self, session: &Arc<Session>, room: &RoomAddr, nick: String, reason: Option<String>) -> Outcome<()> {
        self.route(session, RoomOp::Kick { room: room.clone(), nick, reason }).await.map(drop)
    }

    pub async fn destroy(&self, session: &Arc<Session>, room: &RoomAddr, reason: Option<String>) -> Outcome<()> {
        self.route(session, RoomOp::Destroy { room: room.clone(), reason }).await.map(drop)
    }

    /// Search a room's archive (XMPP MAM over RSM): messages after or before one named by its
    /// unique id, within a time range, of one nick. Readers as for `history`.
    pub async fn archive(&self, session: &Arc<Session>, room: &RoomAddr, query: ArchiveQuery) -> Outcome<ArchivePage> {
        match self.route(session, RoomOp::Archive { room: room.clone(), query }).await? {
            Reply::Archive(page) => Ok(page),
            other => Err(mismatched(other)),
        }
    }

    /// The room's whole configuration and affiliations, for its owners and admins.
    pub async fn admin_view(&self, session: &Arc<Session>, room: &RoomAddr) -> Outcome<room::RoomAdminView> {
        match self.route(session, RoomOp::AdminView { room: room.clone() }).await? {
            Reply::AdminView(view) => Ok(view),
            other => Err(mismatched(other)),
        }
    }

    /// Serve `op` here, or on the node that hosts its room: a room this session already uses
    /// there goes straight over the link; a room found to be hosted there is forwarded; a room
    /// whose host cannot serve it now waits for this node to take it over, and is tried again.
    async fn route(&self, session: &Arc<Session>, op: RoomOp) -> Outcome<Reply> {
        let Some(remote) = self.forwarder() else { return self.serve(session, op).await };
        if session.uses_peer() && remote.is_forwarded(session.id, op.room()) {
            return remote.request(session, op).await;
        }
        // Kept for a second try, except a post: its room must be joined first, here or (above)
        // on the host, so it never learns of the host from its own failure.
        let again = (!matches!(op, RoomOp::Send { .. })).then(|| op.clone());
        let result = self.serve(session, op).await;
        let (Err(Failure { hosted_by: Some(host), .. }), Some(op)) = (&result, again) else { return result };
        if remote.can_forward(host) {
            return remote.request(session, op).await;
        }
        // The host looks down: rather than have every client of it retry, wait.
        if remote.await_takeover(host).await {
            return self.serve(session, op).await;
        }
        result
    }

    /// Serve `op` on this node, never forwarding it: the node link's requests from the peer
    /// come here (a room that moved meanwhile gets its `hosted_by` failure, not a loop).
    pub async fn serve(&self, session: &Arc<Session>, op: RoomOp) -> Outcome<Reply> {
        match op {
            RoomOp::Create { room, patch } => self.create_here(session, &room, &patch).await.map(|()| Reply::Done),
            RoomOp::Join(join) => self.join_here(session, join).await.map(|()| Reply::Done),
            RoomOp::Leave { re, room } => self.leave_here(session, re, &room).await.map(|()| Reply::Done),
            RoomOp::Send { re, room, body, cid } => self.send_here(session, re, &room, body, cid).await.map(|()| Reply::Done),
            RoomOp::History { room, query } => self.history_here(session, &room, query).await.map(Reply::History),
            RoomOp::Subject { room, subject } => self.subject_here(session, &room, subject).await.map(|()| Reply::Done),
            RoomOp::Configure { room, patch } => self.configure_here(session, &room, patch).await.map(|()| Reply::Done),
            RoomOp::Affiliate { room, target, affiliation } => {
                self.affiliate_here(session, &room, target, affiliation).await.map(|()| Reply::Done)
            }
            RoomOp::Kick { room, nick, reason } => self.kick_here(session, &room, nick, reason).await.map(|()| Reply::Done),
            RoomOp::Destroy { room, reason } => self.destroy_here(session, &room, reason).await.map(|()| Reply::Done),
            RoomOp::Archive { room, query } => self.archive_here(session, &room, query).await.map(Reply::Archive),
            RoomOp::AdminView { room } => self.admin_view_here(session, &room).await.map(Reply::AdminView),
        }
    }

    // --- operations -------------------------------------------------------------------------

    /// Log in with a password, a session token, or as a guest (no credentials), from `address`.
    pub async fn login(&self, user: Option<&str>, password: Option<&str>, token: Option<&str>, address: Option<std::net::IpAddr>) -> Outcome<LoggedIn> {
        self.login_gate(user, address).await?;
        let result = self.auth.login(user, password, token).await;
        self.login_outcome(result, user, address)
    }

    /// The stored SCRAM credentials of `user` for `hash` (SASL SCRAM's first step, before the
    /// client proves its password), `None` if it has none (unknown, or a password set before
    /// SCRAM). Refused as [`Gateway::login`] is when the node takes no logins or `user` or
    /// `address` spent its failed-login budget; nothing is spent here.
    pub async fn scram_credentials(&self, user: &str, hash: Hash, address: Option<std::net::IpAddr>) -> Outcome<Option<Credentials>> {
        self.login_gate(Some(user), address).await?;
        match self.auth.scram_credentials(user, hash).await {
            Ok(c) => Ok(c),
            Err(AuthError::InvalidName(m)) => fail(ErrorCode::BadRequest, m),
            Err(e) => {
                tracing::warn!(error = %e, "SCRAM credentials failed on the store");
                fail(ErrorCode::Unavailable, "login service unavailable; retry")
            }
        }
    }

    /// Complete the login of `user` from `address` whose password was checked without being
    /// sent (SASL SCRAM's proof): `verified` is that check's outcome. As [`Gateway::login`]:
    /// refused when the node takes no logins or the failed-login budget is spent; a wrong
    /// proof spends the budget, a right one forgets the user's and stores a new session.
    pub async fn login_verified(&self, user: &str, verified: bool, address: Option<std::net::IpAddr>) -> Outcome<LoggedIn> {
        self.login_gate(Some(user), address).await?;
        let result = self.auth.login_verified(user, verified).await;
        self.login_outcome(result, Some(user), address)
    }

    /// Before any login: the node takes logins (waiting up to [`ACCEPT_WAIT`] for it), and
    /// `user` and `address` have failed-login budget left.
    async fn login_gate(&self, user: Option<&str>, address: Option<std::net::IpAddr>) -> Outcome<()> {
        if !self.is_accepting() && !self.await_accepting(ACCEPT_WAIT).await {
            let peer = self.settings.peer().map(|p| p.client.clone());
            return fail(
                ErrorCode::Unavailable,
                match peer {
                    Some(p) => format!("this node does not serve clients now (failed over); connect to {p}"),
                    None => "this node does not serve clients now; retry later".to_owned(),
                },
            );
        }
        if let Err(t) = self.login_failures.check(user, address, Instant::now()) {
            return Err(Self::throttled(t, "failed logins"));
        }
        Ok(())
    }

    /// A login's outcome: a denial spends the failed-login budget of `user` and `address`, a
    /// registered user's success forgets the user's.
    fn login_outcome(&self, result: Result<LoggedIn, AuthError>, user: Option<&str>, address: Option<std::net::IpAddr>) -> Outcome<LoggedIn> {
        let throttle = &self.login_failures;
        let logged_in = match result {
            Ok(l) => l,
            Err(AuthError::Denied(m)) => {
                metrics::counter!("stoa_login_failures_total").increment(1);
                throttle.spend(user, address, Instant::now());
                return fail(ErrorCode::Unauthorized, m);
            }
            Err(AuthError::InvalidName(m)) => return fail(ErrorCode::BadRequest, m),
            Err(e) => {
                tracing::warn!(error = %e, "login failed on the store");
                return fail(ErrorCode::Unavailable, "login service unavailable; retry");
            }
        };
        if !logged_in.guest {
            throttle.forget(&logged_in.user);
        }
        Ok(logged_in)
    }

    /// Create a room owned by the session's user.
    async fn create_here(&self, session: &Session, room: &RoomAddr, patch: &RoomConfigPatch) -> Outcome<()> {
        self.check_room(room)?;
        self.check_config(patch)?;
        let user = &session.user;
        // Guests have a new name per login: the address's budget is what holds them.
        if let Err(t) = self.room_creations.check(Some(user), session.address, Instant::now()) {
            return Err(Self::throttled(t, "rooms created"));
        }
        let config = RoomConfig::default().patched(patch);
        self.registry.create(room, &config, user).await?;
        self.room_creations.spend(Some(user), session.address, Instant::now());
        tracing::info!(room = %room, owner = %user, "room created");
        self.registry.room_created(!self.settings.plugins.enabled.is_empty(), room, &config).await;
        Ok(())
    }

    /// Enter a room. On success the room has queued `joined` and the replay on the session.
    async fn join_here(&self, session: &Arc<Session>, join: JoinRequest) -> Outcome<()> {
        let JoinRequest { re, room, nick, since, password } = join;
        self.check_room(&room)?;
        self.check_nick(&nick)?;
        check_seq("since", since)?;
        let max = self.settings.limits.max_rooms_per_connection;
        if !session.occupies(&room) && session.room_count() >= max {
            return fail(ErrorCode::TooLarge, format!("a connection may occupy at most {max} rooms"));
        }
        let check = room::plugin::PluginChain { session: session.id, user: session.user.clone(), nick: nick.clone(), password: password.clone() };
        self.registry.check_join(&room, check).await?;
        let join = room::Join { session: session.clone(), re, nick, since, password };
        self.registry.call(&room, join).await.and_then(|r| r)?;
        Ok(())
    }

    /// Leave a room. On success the room has queued `left` on the session.
    async fn leave_here(&self, session: &Session, re: RequestId, room: &RoomAddr) -> Outcome<()> {
        self.check_room(room)?;
        let addr = self.occupied(session, room, "not in this room", "room unavailable; retry")?;
        addr.send(room::Leave { session: session.id, re: Some(re) })
            .await
            .map_err(|_| Failure::new(ErrorCode::Unavailable, "room unavailable; retry"))??;
        Ok(())
    }

    /// Post a message. The room answers on the session after commit (an ack) or with an error.
    async fn send_here(&self, session: &Session, re: RequestId, room: &RoomAddr, body: String, cid: ClientMsgId) -> Outcome<()> {
        self.check_room(room)?;
        let limits = &self.settings.limits;
        if body.len() > limits.max_body_bytes {
            return fail(ErrorCode::TooLarge, format!("body is over {} bytes", limits.max_body_bytes));
        }
        if body.is_empty() {
            return fail(ErrorCode::BadRequest, "body is empty");
        }
        if cid.0.is_empty() || cid.0.chars().count() > limits.max_cid_chars {
            return fail(ErrorCode::BadRequest, format!("cid must be 1 to {} characters", limits.max_cid_chars));
        }
        let addr = self.occupied(session, room, "join the room first", "room unavailable; retry with the same cid")?;
        addr.send(room::Post { session: session.id, re, body, client_msg_id: cid.0 })
            .await
            .map_err(|_| Failure::new(ErrorCode::Unavailable, "room unavailable; retry with the same cid"))??;
        Ok(())
    }

    /// Read a room's history (members and occupants, as the room's config says).
    async fn history_here(&self, session: &Session, room: &RoomAddr, query: HistoryQuery) -> Outcome<HistoryPage> {
        self.check_room(room)?;
        let HistoryQuery { before, after, limit } = query;
        check_seq("before", before)?;
        check_seq("after", after)?;
        let limit = limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
        if limit == 0 {
            return fail(ErrorCode::BadRequest, "limit must be at least 1");
        }
        let limit = limit.min(self.settings.rooms.history_max_limit) as u64;
        let room_id = self.registry.call(room, room::CheckRead { session: session.id, user: session.user.clone() }).await.and_then(|r| r)?;
        // Without `after`, the newest `limit` before `before`; with it, the oldest after.
        let newest_first = after.is_none();
        let mut rows = self
            .store
            .messages(room_id, after.unwrap_or(0), before, limit + 1, newest_first)
            .await
            .map_err(|e| Failure::from(RoomError::from(e)))?;
        let truncated = rows.len() as u64 > limit;
        if truncated {
            if newest_first {
                rows.remove(0);
            } else {
                rows.pop();
            }
        }
        let messages = rows
            .into_iter()
            .map(|m| ChatMessage { room: room.clone(), seq: m.seq, id: m.id, from: m.sender, nick: m.nick, body: m.body, cid: m.client_msg_id, ts: m.created_at })
            .collect();
        Ok(HistoryPage { messages, truncated, newest_first })
    }

    async fn subject_here(&self, session: &Session, room: &RoomAddr, subject: String) -> Outcome<()> {
        self.check_room(room)?;
        self.check_text("subject", &subject)?;
        let msg = room::SetSubject { session: session.id, user: session.user.clone(), subject };
        self.registry.call(room, msg).await.and_then(|r| r)?;
        Ok(())
    }

    async fn configure_here(&self, session: &Session, room: &RoomAddr, patch: RoomConfigPatch) -> Outcome<()> {
        self.check_room(room)?;
        self.check_config(&patch)?;
        self.registry.call(room, room::Configure { user: session.user.clone(), patch }).await.and_then(|r| r)?;
        Ok(())
    }

    async fn affiliate_here(&self, session: &Session, room: &RoomAddr, target: String, affiliation: Affiliation) -> Outcome<()> {
        self.check_room(room)?;
        crate::auth::validate_user_ref(&target).map_err(|e| Failure::new(ErrorCode::BadRequest, e.to_string()))?;
        let msg = room::Affiliate { user: session.user.clone(), target, affiliation };
        self.registry.call(room, msg).await.and_then(|r| r)?;
        Ok(())
    }

    async fn kick_here(&self, session: &Session, room: &RoomAddr, nick: String, reason: Option<String>) -> Outcome<()> {
        self.check_room(room)?;
        if let Some(r) = &reason {
            self.check_text("reason", r)?;
        }
        self.registry.call(room, room::Kick { user: session.user.clone(), nick, reason }).await.and_then(|r| r)?;
        Ok(())
    }

    async fn destroy_here(&self, session: &Session, room: &RoomAddr, reason: Option<String>) -> Outcome<()> {
        self.check_room(room)?;
        if let Some(r) = &reason {
            self.check_text("reason", r)?;
        }
        self.registry.call(room, room::Destroy { user: session.user.clone(), reason }).await.and_then(|r| r)?;
        tracing::info!(room = %room, "room destroyed");
        Ok(())
    }

    /// Search a room's archive (XMPP MAM over RSM): messages after or before one named by its
    /// unique id, within a time range, of one nick. Readers as for `history`.
    async fn archive_here(&self, session: &Session, room: &RoomAddr, query: ArchiveQuery) -> Outcome<ArchivePage> {
        self.check_room(room)?;
        let room_id = self.registry.call(room, room::CheckRead { session: session.id, user: session.user.clone() }).await.and_then(|r| r)?;
        let store_err = |e: crate::store::StoreError| Failure::from(RoomError::from(e));
        let seq_of = async |id: &str| match self.store.message_seq(room_id, id).await.map_err(store_err)? {
            Some(seq) => Ok(seq),
            None => fail(ErrorCode::NotFound, format!("no message `{id}` in this room")),
        };
        let after = match &query.after_id {
            Some(id) => seq_of(id).await?,
            None => 0,
        };
        let before = match query.before_id.as_deref() {
            Some("") | None => None,
            Some(id) => Some(seq_of(id).await?),
        };
        // Paging backwards (`before`, even empty: the last page) takes the newest first.
        let newest_first = query.before_id.is_some();
        let limit = query.max.unwrap_or(HISTORY_DEFAULT_LIMIT).min(self.settings.rooms.history_max_limit) as u64;
        let range = crate::store::ArchiveRange { after, before, start_ms: query.start_ms, end_ms: query.end_ms, nick: query.nick };
        let (mut rows, count) = self.store.archive(room_id, &range, limit + 1, newest_first).await.map_err(store_err)?;
        let complete = rows.len() as u64 <= limit;
        if !complete {
            if newest_first {
                rows.remove(0);
            } else {
                rows.pop();
            }
        }
        let messages = rows
            .into_iter()
            .map(|m| ChatMessage { room: room.clone(), seq: m.seq, id: m.id, from: m.sender, nick: m.nick, body: m.body, cid: m.client_msg_id, ts: m.created_at })
            .collect();
        Ok(ArchivePage { messages, complete, count })
    }

    /// The room's whole configuration and affiliations, for its owners and admins.
    async fn admin_view_here(&self, session: &Session, room: &RoomAddr) -> Outcome<room::RoomAdminView> {
        self.check_room(room)?;
        Ok(self.registry.call(room, room::AdminView { user: session.user.clone() }).await.and_then(|r| r)?)
    }

    /// What anyone may know of a room without joining it (XMPP disco#info): whether it is
    /// public (not members-only) and password-protected, and its subject.
    pub async fn describe(&self, room: &RoomAddr) -> Outcome<RoomFacts> {
        self.check_room(room)?;
        let row = self.store.load_room(room).await.map_err(|e| Failure::from(RoomError::from(e)))?;
        let Some(row) = row else { return fail(ErrorCode::NotFound, "no such room") };
        let c = row.config;
        Ok(RoomFacts { public: c.public, password_protected: c.password.is_some(), subject: c.subject })
    }

    /// The rooms the session's user may see, by name after `after`.
    pub async fn list(&self, session: &Session, after: Option<&RoomAddr>, limit: Option<u32>) -> Outcome<RoomPage> {
        let limit = match limit {
            Some(0) => return fail(ErrorCode::BadRequest, "limit must be at least 1"),
            Some(l) => u64::from(l).min(LIST_MAX_ROOMS),
            None => LIST_MAX_ROOMS,
        };
        let mut rooms = self
            .store
            .list_rooms_for(&session.user, after.map(|a| a.0.as_str()), limit + 1)
            .await
            .map_err(|e| Failure::from(RoomError::from(e)))?;
        let truncated = rooms.len() as u64 > limit;
        rooms.truncate(limit as usize);
        Ok(RoomPage { rooms, truncated })
    }
}

/// A reply of the wrong kind for its request (a peer of another version, say).
fn mismatched(reply: Reply) -> Failure {
    tracing::error!(?reply, "a reply of the wrong kind for its request");
    Failure::new(ErrorCode::Internal, "internal error")
}

/// Sequence numbers are stored as signed 64-bit integers: larger cursors are refused rather
/// than wrapped.
fn check_seq(what: &str, seq: Option<u64>) -> Outcome<()> {
    match seq {
        Some(s) if s > i64::MAX as u64 => fail(ErrorCode::BadRequest, format!("{what} is at most {}", i64::MAX)),
        _ => Ok(()),
    }
}
