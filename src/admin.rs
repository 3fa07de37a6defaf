//! The admin HTTP API on its own listener: `/health`, `/api/node`, `/api/rooms`,
//! `/api/rooms/{room}`, `/api/plugins...` (`admin::plugins`), `/api/db/jobs` (`admin::db`, merge jobs), `POST /api/tls/reload`, the
//! operator's verbs on rooms and sessions (`admin::manage`), the audit log, and `/metrics`
//! (Prometheus), and the operators' console (`admin::console`: its page at `/`, sign-in,
//! server-sent events). Everything but `/health`, `/ready` and the console's page and sign-in
//! needs `Authorization: Bearer <auth.admin_token>` when a token is configured, or a console
//! session (with its CSRF token for a state-changing call), and every action is audited with
//! the credential that asked ([`Actor`]). With `[tls]` the listener speaks https only.

mod console;
mod db;
mod manage;
mod plugins;

use crate::config::Settings;
use crate::registry::RoomRegistry;
use crate::room::Inspect;
use crate::gateway::Gateway;
use crate::store::Store;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::json;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The process-wide Prometheus recorder (one per process, shared by in-process nodes).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
        let rows = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), seconds)
            .and_then(|b| b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_rows".into()), rows))
            .expect("bucket lists are non-empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests embedding Stoa): then ours stays unused.
        let _ = metrics::set_global_recorder(recorder);
        describe_metrics();
        handle
    })
}

/// `# HELP` lines for every metric the node exports (docs/operations.md#metrics), and
/// `stoa_build_info`.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("stoa_build_info", "always 1; the labels name the version");
    metrics::gauge!("stoa_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_gauge!("stoa_connections", "open client connections");
    describe_gauge!("stoa_rooms_active", "room actors in memory");
    describe_counter!("stoa_room_activations_total", "cold loads of a room from the store");
    describe_histogram!("stoa_room_activation_seconds", "time to load a room from the store");
    describe_counter!("stoa_messages_committed_total", "messages durably stored");
    describe_counter!("stoa_deliveries_total", "message frames queued to occupants");
    describe_counter!("stoa_join_store_reads_total", "joins whose replay was read from the store (not covered by the room's recent cache)");
    describe_histogram!("stoa_commit_batch_rows", "rows per group commit");
    describe_histogram!("stoa_commit_seconds", "group-commit transaction latency");
    describe_counter!("stoa_commit_failures_total", "group commits that failed (senders got unavailable)");
    describe_counter!("stoa_errors_total", "error answers sent, by protocol code");
    describe_counter!("stoa_forwarded_requests_total", "room operations sent to another node (the peer, or another group's) that hosts their rooms");
    describe_counter!("stoa_forwarded_rooms_followed_total", "rooms of another group followed to its new host after a takeover or fallback there");
    describe_counter!("stoa_forwarded_follow_retries_total", "follow joins sent again because the room's group answered unavailable");
    describe_gauge!("stoa_xmpp_parked_sessions", "XMPP sessions waiting to be resumed (XEP-0198)");
    describe_counter!("stoa_xmpp_resumptions_total", "XMPP sessions resumed (XEP-0198)");
    describe_gauge!("stoa_xmpp_component_up", "1 while the XMPP component link for the domain is up");
    describe_counter!("stoa_slow_consumers_total", "connections closed because their queue filled or a write took too long");
    describe_counter!("stoa_write_failures_total", "connections closed because a socket write failed");
    describe_counter!("stoa_transport_errors_total", "connections closed for frame-level violations, by kind");
    describe_counter!("stoa_connections_lost_total", "connections that ended without a close");
    describe_counter!("stoa_connections_refused_total", "sockets closed before they became connections, by reason");
    describe_counter!("stoa_login_failures_total", "failed logins");
    describe_counter!("stoa_logins_refused_total", "logins refused over auth.logins_per_second (told to retry later)");
    describe_counter!("stoa_logins_redirected_total", "logins told to log in on the user's home node");
    describe_counter!("stoa_throttled_total", "attempts refused by a budget across connections (what, by)");
    describe_counter!("stoa_link_handshakes_refused_total", "node-link connections refused, by reason");
    describe_gauge!("stoa_ha_state", "1 for the node's HA state now, 0 for the others");
    describe_gauge!("stoa_peer_reachable", "1 while the peer's heartbeats arrive over the node link");
    describe_gauge!("stoa_node_reachable", "1 while that node's heartbeats arrive over its node link (every other node of the cluster)");
    describe_gauge!("stoa_ready", "1 while /ready answers 200");
    process_metrics().describe();
}

/// The standard `process_*` metrics (CPU seconds, resident and virtual memory, open and
/// maximum fds, threads, start time), read from /proc at every scrape.
fn process_metrics() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// What the admin API reads.
#[derive(Clone)]
pub struct AdminState {
    settings: Arc<Settings>,
    store: Store,
    registry: RoomRegistry,
    gateway: Arc<Gateway>,
    started: Instant,
    recovery: Option<crate::ha::recovery::Recovery>,
    link: Option<crate::ha::link::Link>,
    plugins: Option<crate::plugin::PluginHost>,
    tls: Option<crate::tls::ServerTls>,
    console: console::Sessions,
    /// The listener's shutdown, which ends the console's event streams.
    shutdown: CancellationToken,
    /// The views' store reads in flight, at most [`STORE_READS`] (see [`StoreReads`]).
    store_reads: Arc<tokio::sync::Semaphore>,
}

impl AdminState {
    pub fn new(settings: Arc<Settings>, store: Store, registry: RoomRegistry, gateway: Arc<Gateway>) -> Self {
        prometheus();
        AdminState { settings, store, registry, gateway, started: Instant::now(), recovery: None, link: None, plugins: None, tls: None,
            console: console::Sessions::default(), shutdown: CancellationToken::new(),
            store_reads: Arc::new(tokio::sync::Semaphore::new(STORE_READS)) }
    }

    /// Report this node's recovery manager and node link (nodes in an HA group).
    pub fn with_recovery(mut self, recovery: Option<crate::ha::recovery::Recovery>, link: Option<crate::ha::link::Link>) -> Self {
        self.recovery = recovery;
        self.link = link;
        self
    }

    /// Serve the plugin routes for this node's plugin host.
    pub fn with_plugins(mut self, plugins: Option<crate::plugin::PluginHost>) -> Self {
        self.plugins = plugins;
        self
    }

    /// Serve https with this node's TLS (and its certificate reload), if it has one.
    pub fn with_tls(mut self, tls: Option<crate::tls::ServerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The node's plugin host, if it runs one.
    pub fn plugins(&self) -> Option<&crate::plugin::PluginHost> {
        self.plugins.as_ref()
    }
}

/// Serve the admin API until `shutdown`.
pub async fn serve(listener: TcpListener, mut state: AdminState, shutdown: CancellationToken) {
    state.shutdown = shutdown.clone();
    let protected = Router::new()
        .route("/api/node", get(node))
        .route("/api/rooms", get(rooms))
        .route("/api/topology", get(topology))
        .route("/api/rooms/{room}", get(room))
        .route("/api/rooms/{room}/messages", get(room_messages))
        .route("/api/nodes/{node}", get(node_status))
        .route("/api/nodes/{node}/failover", post(failover))
        .route("/api/nodes/{node}/fallback", post(fallback))
        .route("/api/nodes/{node}/services/{service}/{action}", post(service))
        .route("/api/audit", get(audit))
        .merge(manage::routes())
        .route("/api/tls/reload", post(tls_reload))
        .route("/metrics", get(metrics_text))
        .merge(plugins::routes())
        .merge(console::routes())
        .merge(db::routes())
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    let tls = state.tls.clone();
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(console::open_routes(&state))
        .merge(protected)
        .layer(middleware::from_fn(console::security_headers))
        .with_state(state);
    let result = match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned()).await,
        Some(tls) => match crate::tls::TlsListener::new(listener, tls, "admin", shutdown.clone()) {
            Ok(listener) => axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// Who made an admin request, for the audit log: the fingerprint of the admin token it
/// presented (`token:1a2b3c4d`), or `open` when the API has no token.
#[derive(Clone, Debug)]
pub struct Actor(pub String);

async fn require_token(State(state): State<AdminState>, mut request: Request, next: Next) -> Response {
    let expected = &state.settings.auth.admin_token;
    if expected.is_empty() {
        // An open API (loopback only): a console session still names its actor, and still
        // needs its CSRF token.
        let actor = match console::authenticate(&state, &request) {
            Some(Ok(actor)) => actor,
            Some(Err(refused)) => return refused,
            None => Actor(crate::store::audit::admin_actor(None)),
        };
        request.extensions_mut().insert(actor);
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
        let actor = Actor(crate::store::audit::admin_actor(given));
        request.extensions_mut().insert(actor);
        next.run(request).await
    } else if given.is_none()
        && let Some(console) = console::authenticate(&state, &request)
    {
        match console {
            Ok(actor) => {
                request.extensions_mut().insert(actor);
                next.run(request).await
            }
            Err(refused) => refused,
        }
    } else {
        (StatusCode::UNAUTHORIZED, Json(json!({"error": "unauthorized", "message": "missing or wrong bearer token"})))
            .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(state): State<AdminState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(json!({"status": "ok", "node": state.settings.node.id, "store": "ok"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health: store unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "degraded", "store": "unreachable"}))).into_response()
        }
    }
}

/// Readiness, beside liveness (`/health`): 200 when this node takes clients and hosts rooms
/// now, 503 (with the reason) when it does not: failed over, a critical service stopped, or
/// starting up. A load balancer sends clients only to ready nodes.
async fn ready(State(state): State<AdminState>) -> Response {
    let accepting = state.gateway.is_accepting();
    let hosting = state.registry.is_hosting();
    let ha_state = state.recovery.as_ref().map(|r| r.state());
    let serving = ha_state.is_none_or(|s| s.hosts_rooms());
    let body = json!({
        "ready": accepting && hosting && serving,
        "node": state.settings.node.id,
        "state": ha_state.map(|s| s.as_str()),
        "accepting_clients": accepting,
        "hosting_rooms": hosting && serving,
    });
    let status = if accepting && hosting && serving { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn node(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let s = &state.settings;
    Json(json!({
        "node": s.node.id,
        "service": s.node.service,
        "version": env!("CARGO_PKG_VERSION"),
        "store": state.store.kind().as_str(),
        "dev_mode": s.dev_mode,
        "uptime_s": state.started.elapsed().as_secs(),
        "connections": state.gateway.connection_count(),
        "active_rooms": state.registry.active_count(),
        "listen": {"client": s.listen.client.to_string(), "admin": s.listen.admin.to_string()},
        "tls": state.tls.as_ref().map(|t| t.certificate()),
    }))
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    offset: u64,
    #[serde(default = "default_page")]
    limit: u64,
}

fn default_page() -> u64 {
    100
}

/// Largest `limit` of a paged admin list.
const MAX_PAGE: u64 = 1000;

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": "bad_request", "message": message}))).into_response()
}

/// A query string that parsed, or why not (for a 400).
fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, String> {
    q.map(|Query(t)| t).map_err(|e| e.body_text())
}

/// `limit` in 1..=[`MAX_PAGE`], `offset` a position the store can seek to; else why not.
fn check_page(offset: u64, limit: u64) -> Result<(), String> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(format!("limit must be 1 to {MAX_PAGE}"));
    }
    if offset > i64::MAX as u64 {
        return Err(format!("offset must be at most {}", i64::MAX));
    }
    Ok(())
}

async fn rooms(State(state): State<AdminState>, page: Result<Query<Page>, axum::extract::rejection::QueryRejection>) -> Response {
    let page = match query(page).and_then(|p| check_page(p.offset, p.limit).map(|()| p)) {
        Ok(p) => p,
        Err(why) => return bad_request(why),
    };
    let limit = page.limit;
    let (total, rows) = match tokio::try_join!(state.store.count_rooms(), state.store.list_rooms(page.offset, limit)) {
        Ok(r) => r,
        Err(e) => return store_down(e),
    };
    let mut list = Vec::with_capacity(rows.len());
    for row in rows {
        let occupants = match state.registry.lookup(&row.address) {
            Some(addr) => addr.send(Inspect).await.ok().map(|s| s.occupants),
            None => None,
        };
        list.push(json!({
            "room": row.address,
            "last_seq": row.last_seq,
            "home_node": row.home_node.0,
            "host_node": row.host_node.0,
            "epoch": row.epoch.0,
            "public": row.config.public,
            "active": occupants.is_some(),
            "occupants": occupants.unwrap_or(0),
        }));
    }
    Json(json!({"total": total, "offset": page.offset, "rooms": list, "active_rooms": state.registry.active_count()}))
        .into_response()
}

async fn room(State(state): State<AdminState>, Path(room): Path<String>) -> Response {
    let addr = crate::ids::RoomAddr(room);
    let row = match state.store.load_room(&addr).await {
        Ok(Some(row)) => row,
        Ok(None) => return (StatusCode::NOT_FOUND, Json(json!({"error": "not_found"}))).into_response(),
        Err(e) => return store_down(e),
    };
    let live = match state.registry.lookup(&addr) {
        Some(a) => a.send(Inspect).await.ok(),
        None => None,
    };
    let affiliations = state.store.load_affiliations(row.id).await.unwrap_or_default();
    Json(json!({
        "room": row.address,
        "last_seq": row.last_seq,
        "home_node": row.home_node.0,
        "host_node": row.host_node.0,
        "epoch": row.epoch.0,
        "created_at": row.created_at,
        "config": row.config.public_view(),
        "affiliations": affiliations,
        "active": live.is_some(),
        "live": live,
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesQuery {
    limit: Option<u64>,
}

/// `GET /api/rooms/{room}/messages[?limit=N]`: the room's last messages (20 by default, at
/// most [`MAX_PAGE`]), oldest first, as stored.
async fn room_messages(
    State(state): State<AdminState>,
    Path(room): Path<String>,
    q: Result<Query<MessagesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let limit = match query(q).and_then(|q| check_page(0, q.limit.unwrap_or(20)).map(|()| q.limit.unwrap_or(20))) {
        Ok(l) => l,
        Err(why) => return bad_request(why),
    };
    let row = match state.store.load_room(&crate::ids::RoomAddr(room)).await {
        Ok(Some(row)) => row,
        Ok(None) => return (StatusCode::NOT_FOUND, Json(json!({"error": "not_found"}))).into_response(),
        Err(e) => return store_down(e),
    };
    match state.store.messages(row.id, 0, None, limit, true).await {
        Ok(list) => {
            let messages: Vec<serde_json::Value> = list
                .iter()
                .map(|m| json!({"seq": m.seq, "from": m.sender, "nick": m.nick, "body": m.body, "ts": m.created_at}))
                .collect();
            Json(json!({"room": row.address, "last_seq": row.last_seq, "messages": messages})).into_response()
        }
        Err(e) => store_down(e),
    }
}

async fn topology(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(topology_view(&state).await)
}

/// How long an admin view waits for the store. A node's state is live (its own from memory,
/// the others' from their heartbeats); what the views read from the store (rooms hosted,
/// recorded states, leases) is left out when the store does not answer in this time. During a
/// takeover the store serves the fence and the bulk load first, and the views' reads waited
/// behind them for 0.5–0.7 s (docs/benchmarks.md, the cluster's failover), just when an
/// operator looks.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// How many of the views' store reads may be in flight at once on a node. A read the view
/// stopped waiting for runs on to its end (a query under way holds its pool connection until
/// then), so someone polling the views while the store is busy would otherwise take ever more
/// of the pool the takeover needs.
const STORE_READS: usize = 4;

/// The store reads of one admin answer: each waits at most [`STORE_WAIT`]; once one has not
/// answered in time, or [`STORE_READS`] are in flight already, the store is busy and the rest
/// are not tried.
struct StoreReads {
    store: Store,
    gate: Arc<tokio::sync::Semaphore>,
    busy: bool,
}

impl StoreReads {
    fn new(state: &AdminState) -> StoreReads {
        StoreReads { store: state.store.clone(), gate: state.store_reads.clone(), busy: false }
    }

    /// The outcome of `read` (given the store and node `node`), or `None` if the store is busy.
    async fn read<T, F>(&mut self, node: &str, read: impl FnOnce(Store, crate::ids::NodeId) -> F) -> Option<T>
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        if self.busy {
            return None;
        }
        let Ok(permit) = self.gate.clone().try_acquire_owned() else {
            self.busy = true;
            return None;
        };
        let read = read(self.store.clone(), crate::ids::NodeId(node.to_owned()));
        // On a task of its own, which keeps the permit until the read is done.
        let task = tokio::spawn(async move {
            let outcome = read.await;
            drop(permit);
            outcome
        });
        let outcome = tokio::time::timeout(STORE_WAIT, task).await.ok().and_then(Result::ok);
        self.busy = outcome.is_none();
        outcome
    }
}

/// Node `id`'s lease as the views show it: null for a node of another group (its lease is in
/// its group's store), for none, and when the store is busy.
async fn lease_view(state: &AdminState, reads: &mut StoreReads, id: &str) -> serde_json::Value {
    if !in_my_group(state, id) {
        return serde_json::Value::Null;
    }
    match reads.read(id, |store, node| async move { store.lease(&node).await }).await {
        Some(Ok(Some(l))) => json!({"holder": l.holder, "expired": l.expired, "remaining_ms": l.remaining_ms}),
        Some(Err(e)) => json!({"error": e.to_string()}),
        Some(Ok(None)) | None => serde_json::Value::Null,
    }
}

/// What `/api/topology` answers: every group and node as this node sees them; `store_busy`
/// if the store's figures were left out (see [`STORE_WAIT`]).
async fn topology_view(state: &AdminState) -> serde_json::Value {
    let mut reads = StoreReads::new(state);
    let mut groups = Vec::new();
    for g in &state.settings.cluster.groups {
        let mut nodes = Vec::new();
        for n in &g.nodes {
            let lease = lease_view(state, &mut reads, &n.id).await;
            let mut view = node_view(state, &n.id, &mut reads).await;
            view["client"] = json!(n.client);
            view["service"] = json!(n.service);
            view["lease"] = lease;
            nodes.push(view);
        }
        groups.push(json!({"name": g.name, "ha": g.ha, "nodes": nodes}));
    }
    // Peering clusters: their nodes as their heartbeats say (their stores are theirs).
    let peering: Vec<serde_json::Value> = state
        .settings
        .cluster
        .peering
        .iter()
        .map(|p| {
            let nodes: Vec<serde_json::Value> = p
                .nodes
                .iter()
                .map(|n| json!({"id": n.id, "service": n.service, "link": state.link.as_ref().and_then(|l| l.status(&crate::ids::NodeId(n.id.clone())))}))
                .collect();
            json!({"name": p.name, "nodes": nodes})
        })
        .collect();
    json!({
        "node": state.settings.node.id,
        "status": state.recovery.as_ref().map(|r| r.status()),
        "peer": state.link.as_ref().and_then(|l| l.peer()),
        "groups": groups,
        "peering": peering,
        "store_busy": reads.busy,
    })
}

/// Whether node `id` is this node or its peer: its records are in this node's store.
fn in_my_group(state: &AdminState, id: &str) -> bool {
    id == state.settings.node.id || state.settings.group().is_some_and(|g| g.nodes.iter().any(|n| n.id == id))
}

/// One node as this node sees it: its recovery state (its own status for this node; the
/// heartbeat and the store's record for the others), rooms it hosts (in this node's group),
/// users connected to it.
async fn node_view(state: &AdminState, id: &str, reads: &mut StoreReads) -> serde_json::Value {
    let node = crate::ids::NodeId(id.to_owned());
    let own_store = in_my_group(state, id);
    let (hosted, recorded) = match own_store {
        true => (
            reads.read(id, |store, node| async move { store.rooms_hosted_by(&node).await }).await.and_then(Result::ok),
            reads.read(id, |store, node| async move { store.last_node_state(&node).await }).await.and_then(|r| r.ok().flatten()),
        ),
        false => (None, None),
    };
    let me = id == state.settings.node.id;
    let (recovery_state, reason, since_ms) = match (me, state.recovery.as_ref(), &recorded) {
        (true, Some(r), _) => {
            let s = r.status();
            (json!(s.state), json!(s.reason), json!(s.since_ms))
        }
        (_, _, Some(r)) => (json!(r.state), json!(r.reason), json!(r.at_ms)),
        // A single-node group of a cluster: no recovery manager; it serves its rooms, as its
        // heartbeats tell the other nodes.
        (true, None, _) if state.link.is_some() => (json!(crate::ha::state::NodeState::Normal), json!(null), json!(null)),
        _ => (json!(null), json!(null), json!(null)),
    };
    let peer = state.link.as_ref().and_then(|l| l.status(&node));
    // Another node's state is what it says over the link; one that cannot be reached is `unknown`
    // (Cisco's name), whatever it last recorded before it went away.
    let unreachable = peer.as_ref().is_some_and(|p| !p.reachable);
    let current = match &peer {
        Some(p) if p.reachable => p.state.map_or(recovery_state.clone(), |s| json!(s)),
        Some(_) => json!(crate::ha::state::NodeState::Unknown),
        None => recovery_state.clone(),
    };
    // The recorded reason explains the recorded state, not `unknown`.
    let reason = if unreachable { json!(null) } else { reason };
    json!({
        "id": id,
        "this_node": me,
        "state": current,
        "recorded_state": recovery_state,
        "reason": reason,
        "since_ms": since_ms,
        "rooms_hosted": hosted,
        "active_rooms": me.then(|| state.registry.active_count()),
        // The peer's figures come with its heartbeats.
        "users_connected": if me { Some(state.gateway.connection_count()) } else { peer.as_ref().filter(|p| p.reachable).map(|p| p.connections) },
        "services": if me { state.recovery.as_ref().map(|r| json!(r.status().services)) } else { None },
        "write_gate_ms": if me { state.recovery.as_ref().map(|r| r.status().lease_remaining_ms) } else { None },
        "last_takeover": if me { state.recovery.as_ref().map(|r| json!(r.status().last_takeover)) } else { None },
        "link": peer,
    })
}

async fn node_status(State(state): State<AdminState>, Path(node): Path<String>) -> Response {
    if !state.settings.linked_nodes().any(|(n, _)| n.id == node) && node != state.settings.node.id {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "not_found", "message": format!("no node {node} in the topology")})))
            .into_response();
    }
    let mut reads = StoreReads::new(&state);
    let mut view = node_view(&state, &node, &mut reads).await;
    let lease = lease_view(&state, &mut reads, &node).await;
    if !lease.is_null() {
        view["lease"] = lease;
    }
    view["store_busy"] = json!(reads.busy);
    Json(view).into_response()
}

/// Write one line of the audit log (and the `stoa::audit` log target); a failed write is
/// logged, never fails the action that was done.
async fn write_audit(state: &AdminState, actor: &Actor, action: &str, target: &str, detail: serde_json::Value, outcome: &str) {
    let detail = match detail {
        serde_json::Value::Object(fields) => fields,
        other => serde_json::Map::from_iter([("message".to_owned(), other)]),
    };
    let entry = crate::store::audit::AuditEntry { node: &state.settings.node.id, actor: &actor.0, action, target, detail, outcome };
    if let Err(e) = state.store.audit(&entry).await {
        tracing::warn!(error = %e, "could not write the audit log");
    }
    tracing::info!(target: "stoa::audit", action, target, outcome, actor = %actor.0, "admin action");
}

/// Carry out an HA admin request, answer it, and write it to the audit log.
async fn ha_request(state: &AdminState, actor: &Actor, action: &str, target: &str, request: crate::ha::recovery::Request) -> Response {
    use crate::ha::recovery::Request;
    let mut detail = match &request {
        Request::Failover { node } | Request::Fallback { node } => json!({"node": node}),
        Request::Service { node, service, start } => {
            json!({"node": node, "service": service.as_str(), "action": if *start { "start" } else { "stop" }})
        }
    };
    let answer = match other_groups_command(state, &request) {
        // A node of another group: the node whose action it is carries it out and answers.
        Some(Ok((node, command))) => match &state.link {
            Some(link) => link.request(&node, command).await,
            None => Err("this node has no node links".to_owned()),
        },
        Some(Err(refusal)) => Err(refusal),
        None => match &state.recovery {
            Some(recovery) => recovery.request(request).await,
            None => {
                let message = "this node is not in an HA group (cluster.groups with ha = true)";
                return (StatusCode::CONFLICT, Json(json!({"error": "conflict", "message": message}))).into_response();
            }
        },
    };
    let (outcome, status, body) = match &answer {
        Ok(m) => ("done", StatusCode::OK, json!({"ok": true, "message": m})),
        Err(m) => ("refused", StatusCode::CONFLICT, json!({"error": "conflict", "message": m})),
    };
    detail["message"] = body["message"].clone();
    write_audit(state, actor, action, target, detail, outcome).await;
    (status, Json(body)).into_response()
}

/// An admin verb for a node of another group of the cluster: the node that carries it out
/// (the node itself; for a fallback, its peer, which holds its rooms) and the command to pass
/// it. `None`: the node is this node or its peer (the recovery manager's to do) or unknown.
fn other_groups_command(state: &AdminState, request: &crate::ha::recovery::Request) -> Option<Result<(crate::ids::NodeId, crate::ha::link::PeerCommand), String>> {
    use crate::ha::link::PeerCommand;
    use crate::ha::recovery::Request;
    let node = match request {
        Request::Failover { node } | Request::Fallback { node } | Request::Service { node, .. } => node,
    };
    let settings = &state.settings;
    if settings.group().is_some_and(|g| g.nodes.iter().any(|n| &n.id == node)) {
        return None;
    }
    let group = settings.cluster.groups.iter().find(|g| g.nodes.iter().any(|n| &n.id == node))?;
    let to = |id: &str| crate::ids::NodeId(id.to_owned());
    Some(match request {
        Request::Failover { node } => Ok((to(node), PeerCommand::Failover { node: node.clone() })),
        Request::Service { node, service, start } => {
            Ok((to(node), PeerCommand::Service { node: node.clone(), service: service.as_str().to_owned(), start: *start }))
        }
        Request::Fallback { node } => match group.nodes.iter().find(|n| &n.id != node).filter(|_| group.ha) {
            Some(backup) => Ok((to(&backup.id), PeerCommand::Fallback { node: node.clone() })),
            None => Err(format!("node {node} is not in an HA group: it has no peer to fall back from")),
        },
    })
}

async fn failover(State(state): State<AdminState>, Extension(actor): Extension<Actor>, Path(node): Path<String>) -> Response {
    ha_request(&state, &actor, "failover", &node, crate::ha::recovery::Request::Failover { node: node.clone() }).await
}

async fn fallback(State(state): State<AdminState>, Extension(actor): Extension<Actor>, Path(node): Path<String>) -> Response {
    ha_request(&state, &actor, "fallback", &node, crate::ha::recovery::Request::Fallback { node: node.clone() }).await
}

async fn service(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Path((node, service, action)): Path<(String, String, String)>,
) -> Response {
    let bad = |m: String| (StatusCode::BAD_REQUEST, Json(json!({"error": "bad_request", "message": m}))).into_response();
    let Some(svc) = crate::ha::recovery::Service::parse(&service) else {
        return bad(format!("unknown service `{service}`; the critical services are rooms, router and store"));
    };
    let start = match action.as_str() {
        "start" => true,
        "stop" => false,
        _ => return bad(format!("unknown action `{action}`; use start or stop")),
    };
    let request = crate::ha::recovery::Request::Service { node: node.clone(), service: svc, start };
    ha_request(&state, &actor, &format!("service_{action}"), &format!("{node}/{service}"), request).await
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<u64>,
}

async fn audit(State(state): State<AdminState>, q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let limit = match query(q).and_then(|q| check_page(0, q.limit.unwrap_or(100)).map(|()| q.limit.unwrap_or(100))) {
        Ok(l) => l,
        Err(why) => return bad_request(why),
    };
    match state.store.audit_lines(limit).await {
        Ok(rows) => Json(json!({"entries": rows})).into_response(),
        Err(e) => store_down(e),
    }
}

/// Re-read the TLS certificate and key: new connections get the new certificate, open ones
/// keep theirs; on an error the old certificate stays and the answer says why. Audited.
async fn tls_reload(State(state): State<AdminState>, Extension(actor): Extension<Actor>) -> Response {
    let Some(tls) = &state.tls else {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": "conflict", "message": "TLS is not configured on this node (tls.cert_file, tls.key_file)"})),
        )
            .into_response();
    };
    let (outcome, detail, status, body) = match crate::tls::reload_logged(tls, "admin API") {
        Ok(info) => (
            "done",
            json!({"fingerprint_sha256": info.fingerprint_sha256, "serial": info.serial}),
            StatusCode::OK,
            json!({"ok": true, "message": "TLS certificate reloaded", "certificate": info}),
        ),
        Err(e) => (
            "failed",
            json!({"message": e.to_string()}),
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({
                "error": "tls_reload_failed",
                "message": format!("{e}; the previous certificate stays in use"),
                "certificate": tls.certificate(),
            }),
        ),
    };
    write_audit(&state, &actor, "tls_reload", &state.settings.node.id, detail, outcome).await;
    (status, Json(body)).into_response()
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    // Gauges of the HA state, read now rather than kept up to date at every transition.
    if let Some(recovery) = &state.recovery {
        let now = recovery.state();
        for s in crate::ha::state::NodeState::ALL {
            metrics::gauge!("stoa_ha_state", "state" => s.as_str()).set(if s == now { 1.0 } else { 0.0 });
        }
    }
    if let Some(link) = &state.link {
        if let Some(peer) = link.peer() {
            metrics::gauge!("stoa_peer_reachable").set(if peer.reachable { 1.0 } else { 0.0 });
        }
        for node in link.statuses() {
            metrics::gauge!("stoa_node_reachable", "node" => node.id).set(if node.reachable { 1.0 } else { 0.0 });
        }
    }
    process_metrics().collect();
    metrics::gauge!("stoa_ready").set(if state.gateway.is_accepting() && state.registry.is_hosting() { 1.0 } else { 0.0 });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus().render())
}

fn store_down(e: crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "admin: store error");
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "unavailable", "message": "store unavailable"}))).into_response()
}
