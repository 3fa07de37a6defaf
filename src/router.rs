//! The router: one [`Connection`] per client connection turns protocol frames into room
//! operations and answers. It validates every request (shape, sizes, charsets, rate) before it
//! reaches a room, maps every failure to a documented error code, and never lets one bad
//! request end the connection (only transport violations do, in `transport::ws`).

use crate::auth::{Auth, AuthError};
use crate::config::Settings;
use crate::protocol::{
    ClientFrame, ErrorCode, FrameError, PROTOCOL_VERSION, RequestId, RoomAddr, RoomConfig, RoomConfigPatch, ServerFrame,
    parse_client_frame,
};
use crate::registry::RoomRegistry;
use crate::room::{self, RoomError};
use crate::session::{Outbound, SessionHandle};
use crate::store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

/// Default `limit` of a `history` request.
pub const HISTORY_DEFAULT_LIMIT: u32 = 50;

/// Most rooms a `list` answer holds (and its default `limit`).
pub const LIST_MAX_ROOMS: u64 = 1000;

/// Longest subject, room password, and kick reason.
pub const MAX_TEXT_CHARS: usize = 1024;

/// Failed logins after which a connection is closed.
pub const MAX_FAILED_LOGINS: u32 = 5;

/// Rooms another node hosts, as a connection reaches them (`crate::forward` over the node
/// link of a pair). Defined here, where it is used, so the router needs no import of its
/// implementation.
pub trait Remote: Send + Sync {
    /// May a room hosted by `host` be forwarded now?
    fn can_forward(&self, host: &crate::store::NodeId) -> bool;
    /// `host` cannot serve now: wait for this node to take its rooms over; true if it did.
    fn await_takeover<'a>(&'a self, host: &'a crate::store::NodeId) -> futures_util::future::BoxFuture<'a, bool>;
    /// Does `session` use `room` on the other node?
    fn is_forwarded(&self, session: u64, room: &RoomAddr) -> bool;
    /// Pass `frame` (a client frame about `room`) of `session` to the other node.
    fn forward(&self, session: &SessionHandle, room: &RoomAddr, frame: &str);
    /// A session of this node ended.
    fn session_closed(&self, session: u64);
}

/// What the node's connections share.
pub struct Router {
    pub settings: Arc<Settings>,
    pub registry: RoomRegistry,
    pub store: Store,
    pub auth: Auth,
    next_session: AtomicU64,
    connections: std::sync::atomic::AtomicI64,
    /// Logged-in sessions, so the node can send them all `goaway` (failover).
    sessions: std::sync::Mutex<std::collections::HashMap<u64, std::sync::Weak<SessionHandle>>>,
    /// Whether logins are taken (off while the `router` service is stopped or the node is
    /// failed over).
    accepting: tokio::sync::watch::Sender<bool>,
    /// Forwarding to the peer over the node link (HA pairs), set once at start-up.
    forwarder: std::sync::OnceLock<std::sync::Weak<dyn Remote>>,
    /// Since when every `accept` on the client listener has failed (the `router` probe).
    accept_failing_since: std::sync::Mutex<Option<Instant>>,
    /// Failed logins per user name and source address, across connections.
    login_failures: crate::throttle::Throttle,
    /// Rooms created per user name and source address.
    room_creations: crate::throttle::Throttle,
}

/// How long a login waits for a node that does not serve clients yet (it may be taking its
/// rooms back right now) before it is refused.
const ACCEPT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Router {
    /// Open client connections right now.
    pub fn connection_count(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Count a connection in (`+1`) or out (`-1`).
    pub fn count_connection(&self, delta: i64) {
        self.connections.fetch_add(delta, Ordering::Relaxed);
        metrics::gauge!("stoa_connections").set(self.connection_count() as f64);
    }

    pub fn new(settings: Arc<Settings>, registry: RoomRegistry, store: Store, auth: Auth) -> Self {
        use crate::throttle::{Policy, Throttle};
        let window = std::time::Duration::from_secs(settings.auth.login_failure_window_s);
        let login_failures = Throttle::new(
            "login_failures",
            Policy { burst: settings.auth.login_failures_per_user, window },
            Policy { burst: settings.auth.login_failures_per_address, window },
        );
        let hour = std::time::Duration::from_secs(3600);
        let room_creations = Throttle::new(
            "room_creations",
            Policy { burst: settings.limits.rooms_created_per_user_per_hour, window: hour },
            Policy { burst: settings.limits.rooms_created_per_address_per_hour, window: hour },
        );
        Router {
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
            forwarder: std::sync::OnceLock::new(),
            accept_failing_since: std::sync::Mutex::new(None),
        }
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
        self.accept_failing_since.lock().expect("accept probe lock").is_none_or(|t| t.elapsed() < std::time::Duration::from_secs(1))
    }

    /// Attach the forwarder (once, at start-up: it needs this router for its virtual
    /// connections, and this router needs it for rooms of the peer).
    pub fn set_forwarder(&self, forwarder: std::sync::Weak<dyn Remote>) {
        let _ = self.forwarder.set(forwarder);
    }

    fn forwarder(&self) -> Option<Arc<dyn Remote>> {
        self.forwarder.get().and_then(std::sync::Weak::upgrade)
    }

    /// A logged-in session of this node, by id.
    pub fn session(&self, id: u64) -> Option<Arc<SessionHandle>> {
        self.sessions.lock().expect("sessions lock").get(&id).and_then(std::sync::Weak::upgrade)
    }

    /// Send these sessions `goaway` (naming `to`) and close them shortly after.
    pub fn goaway_sessions(&self, ids: &[u64], reason: &str, to: Option<String>) {
        let sessions: Vec<Arc<SessionHandle>> = ids.iter().filter_map(|id| self.session(*id)).collect();
        Self::goaway(sessions, reason, to);
    }

    fn goaway(sessions: Vec<Arc<SessionHandle>>, reason: &str, to: Option<String>) {
        let frame = ServerFrame::Goaway { reason: reason.to_owned(), to };
        for s in &sessions {
            s.send(&frame);
        }
        tokio::spawn(async move {
            // Let the writers flush the frame before the sockets close.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            for s in sessions {
                s.kill(crate::session::KillReason::Moved);
            }
        });
    }

    /// The logged-in sessions of this node that `which` names.
    pub fn sessions_matching(&self, which: &crate::store::SessionFilter) -> Vec<Arc<SessionHandle>> {
        use crate::store::SessionFilter;
        let map = self.sessions.lock().expect("sessions lock");
        map.values()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|s| match which {
                SessionFilter::User(u) => &s.user == u,
                SessionFilter::HashPrefix(p) => s.token_hash().is_some_and(|h| h.starts_with(p.as_str())),
            })
            .collect()
    }

    /// End the live connections of the sessions `which` names (closed with 1008); returns how
    /// many. The caller deletes the stored sessions first, so that the tokens cannot resume.
    pub fn kick(&self, which: &crate::store::SessionFilter) -> usize {
        let sessions = self.sessions_matching(which);
        for s in &sessions {
            tracing::info!(session = s.id, user = %s.user, "session ended by an administrator");
            s.kill(crate::session::KillReason::Kicked);
        }
        sessions.len()
    }

    /// Take logins (again), or refuse them with `unavailable` (clients then try the peer).
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.send_replace(accepting);
    }

    pub fn is_accepting(&self) -> bool {
        *self.accepting.borrow()
    }

    /// Wait up to `limit` for logins to be taken; true if they are.
    async fn await_accepting(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.accepting.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|a| *a)).await, Ok(Ok(_)))
    }

    /// Send every logged-in session `goaway` (naming `to`, where to resume) and close it
    /// shortly after, once the frame is written. Returns how many were told.
    pub fn goaway_all(&self, reason: &str, to: Option<String>) -> usize {
        let sessions: Vec<Arc<SessionHandle>> = {
            let mut map = self.sessions.lock().expect("sessions lock");
            let live = map.values().filter_map(std::sync::Weak::upgrade).collect();
            map.clear();
            live
        };
        let n = sessions.len();
        Self::goaway(sessions, reason, to);
        n
    }
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

/// Sequence numbers are stored as signed 64-bit integers: larger cursors are refused rather
/// than wrapped.
fn check_seq(what: &str, seq: Option<u64>) -> Result<(), (ErrorCode, String)> {
    match seq {
        Some(s) if s > i64::MAX as u64 => err(ErrorCode::BadRequest, format!("{what} is at most {}", i64::MAX)),
        _ => Ok(()),
    }
}

/// How many of `items` (from the end when `from_end`) fit in `budget` bytes of JSON; at least
/// one, so a page always moves on (one item always fits: the settings check guarantees it).
fn fitting<T: serde::Serialize>(items: &[T], budget: usize, from_end: bool) -> usize {
    let mut used = 512; // the answer's own fields
    let mut take = |item: &T| {
        used += serde_json::to_string(item).map_or(0, |j| j.len()) + 1;
        used <= budget
    };
    let fit = if from_end { items.iter().rev().take_while(|i| take(i)).count() } else { items.iter().take_while(|i| take(i)).count() };
    fit.max(1).min(items.len())
}

/// What the transport should do after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close the connection with this WebSocket close code and reason.
    Close(u16, &'static str),
}

/// One client connection's protocol state.
pub struct Connection {
    router: Arc<Router>,
    outbound: mpsc::Sender<Outbound>,
    kill: CancellationToken,
    session: Option<Arc<SessionHandle>>,
    bucket: TokenBucket,
    failed_logins: u32,
    /// Set by a room request that found the room hosted by another node (it may be forwarded).
    hosted_elsewhere: Option<crate::store::NodeId>,
    /// This connection has forwarded a room request to the peer (so later frames may have to).
    forwards: bool,
    /// The client's address, for login throttling (none for the peer's forwarded sessions).
    address: Option<std::net::IpAddr>,
    /// When the answer being built refuses a throttled login: how long to wait.
    retry_after_ms: Option<u64>,
}

/// An answer to send, `None` when the room answers through the session queue itself.
type Answer = Result<Option<ServerFrame>, (ErrorCode, String)>;

fn err<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, (ErrorCode, String)> {
    Err((code, message.into()))
}

fn room_err(e: RoomError) -> (ErrorCode, String) {
    if let RoomError::Internal(detail) = &e {
        tracing::error!(%detail, "internal room error");
    }
    (e.code(), e.client_message())
}

impl Connection {
    /// A connection writing its frames to `outbound`; `kill` ends it.
    pub fn new(router: Arc<Router>, outbound: mpsc::Sender<Outbound>, kill: CancellationToken) -> Self {
        let limits = &router.settings.limits;
        let bucket = TokenBucket::new(limits.requests_per_second, limits.request_burst);
        Connection { router, outbound, kill, session: None, bucket, failed_logins: 0, hosted_elsewhere: None, forwards: false, address: None, retry_after_ms: None }
    }

    /// The client connects from `address` (its failed logins count against it).
    pub fn from_address(mut self, address: std::net::IpAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// A connection already logged in as `user`: the peer's session whose room operations this
    /// node serves over the node link (the link is authenticated; the peer did the login).
    pub fn trusted(router: Arc<Router>, outbound: mpsc::Sender<Outbound>, kill: CancellationToken, user: String) -> Self {
        let mut conn = Connection::new(router, outbound, kill);
        let id = conn.router.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(SessionHandle::new(id, user, conn.outbound.clone(), conn.kill.clone()));
        conn.router.sessions.lock().expect("sessions lock").insert(id, Arc::downgrade(&session));
        conn.session = Some(session);
        conn
    }

    /// The logged-in session, if any.
    pub fn session(&self) -> Option<&Arc<SessionHandle>> {
        self.session.as_ref()
    }

    fn push(&self, frame: &ServerFrame) {
        match &self.session {
            Some(s) => s.send(frame),
            None => {
                crate::session::count_error(frame);
                let _ = self.outbound.try_send(Outbound::Frame(Utf8Bytes::from(frame.to_json())));
            }
        }
    }

    /// Handle one text frame.
    pub async fn handle_text(&mut self, text: &str) -> Flow {
        if !self.bucket.take(Instant::now()) {
            let re = parse_client_frame(text).ok().and_then(|f| f.id().cloned());
            self.push(&ServerFrame::error(re, ErrorCode::RateLimited, "too many requests; slow down"));
            return Flow::Continue;
        }
        let frame = match parse_client_frame(text) {
            Ok(f) => f,
            Err(FrameError { re, message }) => {
                self.push(&ServerFrame::error(re, ErrorCode::BadRequest, message));
                return Flow::Continue;
            }
        };
        let re = frame.id().cloned();
        let answer = match frame {
            ClientFrame::Hello { v, user, password, token, id } => {
                let answer = self.hello(v, user, password, token, id).await;
                if answer.is_err() && self.session.is_none() {
                    self.failed_logins += 1;
                }
                answer
            }
            other => match self.session.clone() {
                None => err(ErrorCode::Unauthorized, "send `hello` first"),
                Some(session) => match self.router.forwarder() {
                    // A room this session already uses on the peer: straight over the link.
                    Some(f) if self.forwards && other.room().is_some_and(|room| f.is_forwarded(session.id, room)) => {
                        f.forward(&session, other.room().expect("checked above"), text);
                        Ok(None)
                    }
                    _ => self.request_or_forward(&session, other, text).await,
                },
            },
        };
        match answer {
            Ok(Some(frame)) => self.push(&frame),
            Ok(None) => {}
            Err((code, message)) => {
                let retry_after_ms = self.retry_after_ms.take();
                self.push(&ServerFrame::Error { re, code, message, room: None, retry_after_ms })
            }
        }
        if self.session.is_none() && self.failed_logins >= MAX_FAILED_LOGINS {
            return Flow::Close(crate::protocol::close_code::POLICY, "too many failed logins");
        }
        Flow::Continue
    }

    async fn hello(
        &mut self,
        v: u32,
        user: Option<String>,
        password: Option<String>,
        token: Option<String>,
        id: Option<RequestId>,
    ) -> Answer {
        if self.session.is_some() {
            return err(ErrorCode::BadRequest, "already logged in");
        }
        if v != PROTOCOL_VERSION {
            return err(ErrorCode::BadRequest, format!("unsupported protocol version {v}; this server speaks {PROTOCOL_VERSION}"));
        }
        if !self.router.is_accepting() && !self.router.await_accepting(ACCEPT_WAIT).await {
            let peer = self.router.settings.peer().map(|p| p.client.clone());
            return err(
                ErrorCode::Unavailable,
                match peer {
                    Some(p) => format!("this node does not serve clients now (failed over); connect to {p}"),
                    None => "this node does not serve clients now; retry later".to_owned(),
                },
            );
        }
        let router = self.router.clone();
        let throttle = &router.login_failures;
        if let Err(t) = throttle.check(user.as_deref(), self.address, Instant::now()) {
            return Err(self.throttled(t, "failed logins"));
        }
        let logged_in = match self.router.auth.login(user.as_deref(), password.as_deref(), token.as_deref()).await {
            Ok(l) => l,
            Err(AuthError::Denied(m)) => {
                metrics::counter!("stoa_login_failures_total").increment(1);
                throttle.spend(user.as_deref(), self.address, Instant::now());
                return err(ErrorCode::Unauthorized, m);
            }
            Err(AuthError::InvalidName(m)) => return err(ErrorCode::BadRequest, m),
            Err(e) => {
                tracing::warn!(error = %e, "login failed on the store");
                return err(ErrorCode::Unavailable, "login service unavailable; retry");
            }
        };
        if !logged_in.guest {
            throttle.forget(&logged_in.user);
        }
        let id_num = self.router.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(
            SessionHandle::new(id_num, logged_in.user.clone(), self.outbound.clone(), self.kill.clone())
                .with_token_hash(crate::auth::token_hash(&logged_in.token)),
        );
        tracing::debug!(session = id_num, user = %logged_in.user, guest = logged_in.guest, "logged in");
        self.router.sessions.lock().expect("sessions lock").insert(id_num, Arc::downgrade(&session));
        self.session = Some(session);
        let s = &self.router.settings;
        Ok(Some(ServerFrame::Welcome {
            v: PROTOCOL_VERSION,
            user: logged_in.user,
            node: s.node.id.clone(),
            session: logged_in.token,
            service: s.node.service.clone(),
            guest: logged_in.guest,
            // Where to resume if this node goes away (the session token is valid there too).
            peers: s.peer().map(|p| p.client.clone()).into_iter().collect(),
            re: id,
        }))
    }

    /// Serve `frame` here; if its room turns out to be hosted by the peer, forward it (or, when
    /// the peer cannot serve it, wait for this node's takeover and try once more).
    async fn request_or_forward(&mut self, session: &Arc<SessionHandle>, frame: ClientFrame, text: &str) -> Answer {
        let answer = self.request(session, frame).await;
        // Rare path (a room hosted elsewhere): the frame is read again rather than cloned
        // ahead of every request.
        let Some(host) = self.hosted_elsewhere.take() else { return answer };
        let (Some(f), Ok(again)) = (self.router.forwarder(), parse_client_frame(text)) else { return answer };
        let Some(room) = again.room().cloned() else { return answer };
        if f.can_forward(&host) {
            f.forward(session, &room, text);
            self.forwards = true;
            return Ok(None);
        }
        // The host looks down: rather than have every client of it retry, wait.
        if f.await_takeover(&host).await {
            return self.request(session, again).await;
        }
        answer
    }

    /// The `rate_limited` answer of a spent budget (`what`: "failed logins", "rooms created");
    /// the error frame will carry `retry_after_ms`.
    fn throttled(&mut self, t: crate::throttle::Throttled, what: &str) -> (ErrorCode, String) {
        self.retry_after_ms = Some(t.retry_after.as_millis() as u64);
        let secs = t.retry_after.as_secs().max(1);
        (ErrorCode::RateLimited, format!("too many {what} for this {}; retry in {secs} s", t.by))
    }

    /// [`room_err`], remembering a room hosted by another node (for forwarding).
    fn room_err(&mut self, e: RoomError) -> (ErrorCode, String) {
        if let RoomError::HostedBy(node) = &e {
            self.hosted_elsewhere = Some(node.clone());
        }
        room_err(e)
    }

    /// The actor of a room `session` occupies (`not_in` if it does not; `gone` if the room's
    /// incarnation is stopping, as when its mailbox is closed).
    fn occupied(&self, session: &SessionHandle, room: &RoomAddr, not_in: &str, gone: &str) -> Result<actix::Addr<room::Room>, (ErrorCode, String)> {
        if !session.occupies(room) {
            return Err((ErrorCode::Forbidden, not_in.to_string()));
        }
        self.router.registry.lookup(room).ok_or_else(|| (ErrorCode::Unavailable, gone.to_string()))
    }

    fn check_room(&self, room: &RoomAddr) -> Result<(), (ErrorCode, String)> {
        let limits = &self.router.settings.limits;
        let Some((name, service)) = room.0.split_once('@') else {
            return err(ErrorCode::BadRequest, "room addresses are name@service");
        };
        let name_ok = !name.is_empty()
            && name.chars().count() <= limits.max_room_name_chars
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if !name_ok {
            return err(
                ErrorCode::BadRequest,
                format!("room names are 1 to {} characters of a-z, 0-9, '.', '_' or '-'", limits.max_room_name_chars),
            );
        }
        let service_ok = !service.is_empty()
            && service.len() <= 253
            && service.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'));
        if !service_ok {
            return err(ErrorCode::BadRequest, "invalid room service");
        }
        // This node's rooms, and its peer's (which it serves after a takeover).
        let settings = &self.router.settings;
        if service != settings.node.service && settings.peer().is_none_or(|p| p.service != service) {
            return err(ErrorCode::NotFound, format!("unknown room service `{service}`"));
        }
        Ok(())
    }

    fn check_nick(&self, nick: &str) -> Result<(), (ErrorCode, String)> {
        let max = self.router.settings.limits.max_nick_chars;
        let ok = !nick.is_empty()
            && nick.chars().count() <= max
            && nick.trim() == nick
            && nick.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
        if ok {
            Ok(())
        } else {
            err(ErrorCode::BadRequest, format!("nicks are 1 to {max} letters, digits, '_', '-', '.' or inner spaces"))
        }
    }

    fn check_text(&self, what: &str, text: &str) -> Result<(), (ErrorCode, String)> {
        if text.chars().count() > MAX_TEXT_CHARS {
            return err(ErrorCode::TooLarge, format!("{what} is longer than {MAX_TEXT_CHARS} characters"));
        }
        Ok(())
    }

    fn check_config(&self, patch: &RoomConfigPatch) -> Result<(), (ErrorCode, String)> {
        if patch.persistent == Some(false) {
            return err(ErrorCode::BadRequest, "non-persistent rooms are not supported: every Stoa room is persistent");
        }
        if patch.history_on_join.is_some_and(|h| h > self.router.settings.rooms.history_max_limit) {
            return err(
                ErrorCode::BadRequest,
                format!("history_on_join is at most {}", self.router.settings.rooms.history_max_limit),
            );
        }
        if let Some(p) = &patch.password {
            self.check_text("password", p)?;
        }
        if let Some(s) = &patch.subject {
            self.check_text("subject", s)?;
        }
        Ok(())
    }

    async fn request(&mut self, session: &Arc<SessionHandle>, frame: ClientFrame) -> Answer {
        let router = self.router.clone();
        let registry = &router.registry;
        let limits = &router.settings.limits;
        let user = session.user.clone();
        match frame {
            ClientFrame::Hello { .. } => err(ErrorCode::BadRequest, "already logged in"),
            ClientFrame::Ping { id } => Ok(Some(ServerFrame::Pong { re: id })),
            ClientFrame::Create { id, room, config } => {
                self.check_room(&room)?;
                self.check_config(&config)?;
                // Guests have a new name per login: the address's budget is what holds them.
                if let Err(t) = router.room_creations.check(Some(&user), self.address, Instant::now()) {
                    return Err(self.throttled(t, "rooms created"));
                }
                let config = RoomConfig::default().patched(&config);
                registry.create(&room, &config, &user).await.map_err(room_err)?;
                router.room_creations.spend(Some(&user), self.address, Instant::now());
                tracing::info!(room = %room, owner = %user, "room created");
                registry.room_created(!router.settings.plugins.enabled.is_empty(), &room, &config).await;
                Ok(Some(ServerFrame::Created { re: id, room }))
            }
            ClientFrame::Join { id, room, nick, since, password } => {
                self.check_room(&room)?;
                self.check_nick(&nick)?;
                check_seq("since", since)?;
                if !session.occupies(&room) && session.room_count() >= limits.max_rooms_per_connection {
                    return err(
                        ErrorCode::TooLarge,
                        format!("a connection may occupy at most {} rooms", limits.max_rooms_per_connection),
                    );
                }
                let check = room::plugin::PluginChain { session: session.id, user: user.clone(), nick: nick.clone(), password: password.clone() };
                registry.check_join(&room, check).await.map_err(|e| self.room_err(e))?;
                let join = room::Join { session: session.clone(), re: id, nick, since, password };
                registry.call(&room, join).await.and_then(|r| r).map_err(|e| self.room_err(e))?;
                // `joined` and the replay were queued by the room itself, in order.
                Ok(None)
            }
            ClientFrame::Leave { id, room } => {
                self.check_room(&room)?;
                let addr = self.occupied(session, &room, "not in this room", "room unavailable; retry")?;
                addr.send(room::Leave { session: session.id, re: Some(id) })
                    .await
                    .map_err(|_| (ErrorCode::Unavailable, "room unavailable; retry".to_string()))?
                    .map_err(room_err)?;
                Ok(None)
            }
            ClientFrame::Send { id, room, body, cid } => {
                self.check_room(&room)?;
                if body.len() > limits.max_body_bytes {
                    return err(ErrorCode::TooLarge, format!("body is over {} bytes", limits.max_body_bytes));
                }
                if body.is_empty() {
                    return err(ErrorCode::BadRequest, "body is empty");
                }
                if cid.0.is_empty() || cid.0.chars().count() > limits.max_cid_chars {
                    return err(ErrorCode::BadRequest, format!("cid must be 1 to {} characters", limits.max_cid_chars));
                }
                let addr = self.occupied(session, &room, "join the room first", "room unavailable; retry with the same cid")?;
                addr.send(room::Post { session: session.id, re: id, body, client_msg_id: cid.0 })
                    .await
                    .map_err(|_| (ErrorCode::Unavailable, "room unavailable; retry with the same cid".to_string()))?
                    .map_err(room_err)?;
                // The ack (after commit) or the error comes from the room.
                Ok(None)
            }
            ClientFrame::History { id, room, before, after, limit } => {
                self.check_room(&room)?;
                check_seq("before", before)?;
                check_seq("after", after)?;
                let limit = limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
                if limit == 0 {
                    return err(ErrorCode::BadRequest, "limit must be at least 1");
                }
                let limit = limit.min(router.settings.rooms.history_max_limit) as u64;
                let room_id = registry
                    .call(&room, room::CheckRead { session: session.id, user: user.clone() })
                    .await
                    .and_then(|r| r)
                    .map_err(|e| self.room_err(e))?;
                // Without `after`, the newest `limit` before `before`; with it, the oldest after.
                let newest_first = after.is_none();
                let mut rows = router
                    .store
                    .messages(room_id, after.unwrap_or(0), before, limit + 1, newest_first)
                    .await
                    .map_err(|e| room_err(e.into()))?;
                let mut truncated = rows.len() as u64 > limit;
                if truncated {
                    if newest_first {
                        rows.remove(0);
                    } else {
                        rows.pop();
                    }
                }
                let mut messages: Vec<_> = rows
                    .into_iter()
                    .map(|m| crate::protocol::MessageEvent {
                        room: room.clone(),
                        seq: m.seq,
                        from: m.sender,
                        nick: m.nick,
                        body: m.body,
                        cid: m.client_msg_id,
                        ts: m.created_at,
                    })
                    .collect();
                // Page by bytes too: keep the messages nearest the cursor that fit.
                let kept = fitting(&messages, limits.max_answer_bytes, newest_first);
                if kept < messages.len() {
                    truncated = true;
                    if newest_first {
                        messages.drain(..messages.len() - kept);
                    } else {
                        messages.truncate(kept);
                    }
                }
                Ok(Some(ServerFrame::History { re: id, room, messages, truncated }))
            }
            ClientFrame::Subject { id, room, subject } => {
                self.check_room(&room)?;
                self.check_text("subject", &subject)?;
                let msg = room::SetSubject { session: session.id, user, subject };
                registry.call(&room, msg).await.and_then(|r| r).map_err(room_err)?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::Configure { id, room, config } => {
                self.check_room(&room)?;
                self.check_config(&config)?;
                registry.call(&room, room::Configure { user, patch: config }).await.and_then(|r| r).map_err(room_err)?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::Affiliate { id, room, user: target, affiliation } => {
                self.check_room(&room)?;
                crate::auth::validate_user_ref(&target).map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
                let msg = room::Affiliate { user, target, affiliation };
                registry.call(&room, msg).await.and_then(|r| r).map_err(room_err)?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::Kick { id, room, nick, reason } => {
                self.check_room(&room)?;
                if let Some(r) = &reason {
                    self.check_text("reason", r)?;
                }
                registry.call(&room, room::Kick { user, nick, reason }).await.and_then(|r| r).map_err(room_err)?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::Destroy { id, room, reason } => {
                self.check_room(&room)?;
                if let Some(r) = &reason {
                    self.check_text("reason", r)?;
                }
                registry.call(&room, room::Destroy { user, reason }).await.and_then(|r| r).map_err(room_err)?;
                tracing::info!(room = %room, "room destroyed");
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::List { id, after, limit } => {
                let limit = match limit {
                    Some(0) => return err(ErrorCode::BadRequest, "limit must be at least 1"),
                    Some(l) => u64::from(l).min(LIST_MAX_ROOMS),
                    None => LIST_MAX_ROOMS,
                };
                let mut rooms = router
                    .store
                    .list_rooms_for(&user, after.as_ref().map(|a| a.0.as_str()), limit + 1)
                    .await
                    .map_err(|e| room_err(e.into()))?;
                let mut truncated = rooms.len() as u64 > limit;
                rooms.truncate(limit as usize);
                let kept = fitting(&rooms, limits.max_answer_bytes, false);
                if kept < rooms.len() {
                    truncated = true;
                    rooms.truncate(kept);
                }
                Ok(Some(ServerFrame::Rooms { re: id, rooms, truncated }))
            }
        }
    }

    /// Queue a WebSocket ping (idle check).
    pub fn ping(&self) {
        let _ = self.outbound.try_send(Outbound::Ping);
    }

    /// The connection ended: leave every room.
    pub fn closed(&mut self) {
        if let Some(session) = self.session.take() {
            self.router.sessions.lock().expect("sessions lock").remove(&session.id);
            if let Some(f) = self.router.forwarder() {
                f.session_closed(session.id);
            }
            for room in session.rooms() {
                if let Some(addr) = self.router.registry.lookup(&room) {
                    addr.do_send(room::Leave { session: session.id, re: None });
                }
            }
        }
    }
}
