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
//! Operations on a room are [`RoomOp`]s. One whose room another node hosts (the peer in a pair,
//! or any node of another group of the cluster) is passed to that node as it is
//! ([`Remote::request`], over the node link) and served there by [`Gateway::serve`] for a
//! stand-in of the session; that node's answers and room events come back typed and reach the
//! session's wire as if the room were here. So every front end reaches every room of the
//! cluster, and knows nothing of where it is.
//!
//! The gateway also keeps the node's table of live sessions (for `goaway` on failover, the
//! admin's session list and kick) and whether the node takes logins at all.
//!
//! This file holds the gateway, its session table and [`Failure`]; the parts: `ops` (the room
//! operations, their routing and serving), `login`, `checks` (names, sizes, budgets).

mod checks;
mod login;
mod ops;

pub use checks::TokenBucket;
pub use ops::{ArchivePage, ArchiveQuery, HistoryPage, HistoryQuery, JoinRequest, Reply, RoomFacts, RoomOp, RoomPage};

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

/// Rooms other nodes host, as a session reaches them (`crate::forward` over the node links).
/// Defined here, where it is used, so the gateway needs no import of its implementation.
pub trait Remote: Send + Sync {
    /// May a room hosted by `host` be forwarded now?
    fn can_forward(&self, host: &NodeId) -> bool;
    /// `host` (this node's peer) cannot serve now: wait for this node to take its rooms over;
    /// true if it did.
    fn await_takeover<'a>(&'a self, host: &'a NodeId) -> futures_util::future::BoxFuture<'a, bool>;
    /// Is this node taking its peer's rooms over right now (fencing them)?
    fn taking_over(&self) -> bool;
    /// Hold `op` if it is a post for a room the session is following to a new host (it is
    /// sent there after the join, and acked then); true if held.
    fn hold_post(&self, session: SessionId, op: &RoomOp) -> bool;
    /// The node that serves `room` for `session`, if the session uses it on another node
    /// (waiting, bounded, while the session follows the room to a new host).
    fn forwarded_to<'a>(&'a self, session: SessionId, room: &'a RoomAddr) -> futures_util::future::BoxFuture<'a, Option<NodeId>>;
    /// The node of another group serving the rooms of `service` now; waits a bounded time
    /// (a takeover there) while none does.
    fn locate<'a>(&'a self, service: &'a str) -> futures_util::future::BoxFuture<'a, Option<NodeId>>;
    /// Serve `op` of `session` on node `node` and wait for its outcome. Answers and events of
    /// the room reach the session's wire meanwhile, in the room's order. Fails with
    /// `unavailable` (never hangs) when that node goes away or does not answer in time.
    fn request<'a>(&'a self, session: &'a Arc<Session>, node: &'a NodeId, op: RoomOp) -> futures_util::future::BoxFuture<'a, Outcome<Reply>>;
    /// A session of this node ended.
    fn session_closed(&self, session: SessionId);
}

/// Which node of the cluster serves a registered user's logins (docs/clusters.md, *Users' home
/// nodes*). Defined here, where it is used; `crate::home` implements it over the node link.
pub trait Homes: Send + Sync {
    /// Where the logins of `user` are served now, from the name alone (its credentials are
    /// checked where it is served). `Err`: the store failed.
    fn place<'a>(&'a self, user: &'a str) -> futures_util::future::BoxFuture<'a, Result<Placement, String>>;
}

/// Where a login is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On this node.
    Here,
    /// On this other node (the user's home, or its peer after a takeover there).
    Elsewhere(NodeId),
    /// The user's home (this node) is in a group that serves nothing now.
    HomeDown(NodeId),
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
    /// A login: log in on this node instead (the user's home; docs/clusters.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_on: Option<NodeId>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure { code, message: message.into(), retry_after_ms: None, hosted_by: None, login_on: None }
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
    /// Forwarding to other nodes over the node links (pairs, clusters).
    forwarder: Option<Arc<dyn Remote>>,
    /// Since when every `accept` on the client listener has failed (the `router` probe).
    accept_failing_since: Mutex<Option<Instant>>,
    /// Failed logins per user name and source address, across connections.
    login_failures: crate::throttle::Throttle,
    /// Rooms created per user name and source address.
    room_creations: crate::throttle::Throttle,
    /// Users' home nodes, in a cluster of two groups or more.
    homes: Option<Arc<dyn Homes>>,
    /// The logins this node serves per second (`auth.logins_per_second`).
    login_pace: Mutex<checks::LoginPace>,
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
        let login_pace = Mutex::new(checks::LoginPace::new(settings.auth.logins_per_second, Instant::now()));
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
            login_pace,
            forwarder,
            accept_failing_since: Mutex::new(None),
            homes: None,
        }
    }

    /// Serve registered users' logins on their home nodes (a cluster of two groups or more).
    pub fn with_homes(mut self, homes: Arc<dyn Homes>) -> Self {
        self.homes = Some(homes);
        self
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

}
