//! Node start-up and shutdown, read top to bottom.
//!
//! A node runs in its own thread with an actix `System` over a multi-threaded tokio runtime
//! (store, committer, node link, XMPP c2s, admin) plus arbiter threads for room actors and the
//! WebSocket client connections (`transport::ws::serve`); by default the two share
//! the cores half and half (`node.io_threads`, `rooms.arbiters`). [`Node::start`]
//! returns once the listeners are bound, so tests and the CLI get the real addresses (port 0
//! works). [`Node::stop`] shuts down in order: listeners and connections, then the committer
//! drains its in-flight transactions, then the arbiters stop.

use crate::ids::NodeId;
use crate::admin;
use crate::auth::Auth;
use crate::committer::Committer;
use crate::ha::gate::WriteGate;
use crate::ha::recovery::{PeerRef, RecoveryConfig};
use crate::ha::state::NodeState;
use crate::config::Settings;
use crate::registry::RoomRegistry;
use crate::room::{RoomDeps, RoomLimits};
use crate::gateway::Gateway;
use crate::store::Store;
use crate::transport;
use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Store connections of the recovery manager (lease, node states, moves), apart from the
/// node's pool; the presence lock holds one more of its own.
const RECOVERY_CONNECTIONS: u32 = 2;

/// A running node.
pub struct Node {
    /// Where the WebSocket listener is bound.
    pub client_addr: SocketAddr,
    /// Where the admin HTTP listener is bound.
    pub admin_addr: SocketAddr,
    /// Where the XMPP client-to-server listener is bound (`xmpp.c2s`), if it is on.
    pub xmpp_addr: Option<SocketAddr>,
    /// Where the direct-TLS c2s listener is bound (`xmpp.c2s_tls`), if it is on.
    pub xmpp_tls_addr: Option<SocketAddr>,
    /// The listeners' TLS (`[tls]`), for reloading the certificate (SIGHUP).
    tls: Option<crate::tls::ServerTls>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    /// Start a node with `settings`; returns when it accepts connections.
    pub fn start(settings: Settings) -> anyhow::Result<Node> {
        settings.check().context("checking the settings")?;
        let tls = match (&settings.tls.cert_file, &settings.tls.key_file) {
            (Some(cert), Some(key)) => Some(crate::tls::ServerTls::load(cert, key).context("loading the TLS certificate ([tls])")?),
            _ => None,
        };
        let shutdown = CancellationToken::new();
        let node_tls = tls.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let token = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("stoa-node-{}", settings.node.id))
            .spawn(move || -> anyhow::Result<()> {
                let threads = threads(&settings);
                let workers = threads.io;
                let system = actix::System::with_tokio_rt(move || {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(workers)
                        .thread_name("stoa-io")
                        .enable_all()
                        .build()
                        .expect("tokio runtime builds")
                });
                let result = system.block_on(run(settings, threads, tls, token, ready_tx.clone()));
                if let Err(e) = &result {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                }
                result
            })
            .context("spawning the node thread")?;
        match ready_rx.recv() {
            Ok(Ok(Listening { client_addr, admin_addr, xmpp_addr, xmpp_tls_addr })) => {
                Ok(Node { client_addr, admin_addr, xmpp_addr, xmpp_tls_addr, tls: node_tls, shutdown, thread: Some(thread) })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow::anyhow!("node thread ended during start-up")),
            },
        }
    }

    /// The listeners' TLS, if `[tls]` is configured: [`crate::tls::ServerTls::reload`] swaps
    /// the certificate for new connections.
    pub fn tls(&self) -> Option<&crate::tls::ServerTls> {
        self.tls.as_ref()
    }

    /// The token that stops the node when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stop the node and wait until it has shut down.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.join()
    }

    /// Wait until the node stops (after its shutdown token is cancelled).
    pub fn join(&mut self) -> anyhow::Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("node thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = self.join();
    }
}

/// How many threads a node runs its I/O runtime and its room arbiters on.
#[derive(Debug)]
struct Threads {
    io: usize,
    arbiters: usize,
}

/// By default the two share the cores, half each (at least one of each), rather than each
/// taking one thread per core: a message crosses from the room's arbiter to the committer on
/// the I/O runtime and back, and with twice as many busy threads as cores each crossing is
/// more often a sleep and a wake-up. On two cores, one of each against two of each cost 14 %
/// less CPU per message at 8,000 msg/s and gave 16 % more fan-out, alternated (measured in one
/// build with the message ids' change, which alone showed no difference; docs/benchmarks.md),
/// when the client connections still ran on the I/O runtime; by default they run on the
/// arbiters now (`node.client_connections_on_arbiters`).
fn threads(settings: &Settings) -> Threads {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    split_threads(cores, settings.node.io_threads, settings.rooms.arbiters)
}

fn split_threads(cores: usize, io: usize, arbiters: usize) -> Threads {
    let io = match io {
        0 => (cores / 2).max(1),
        n => n,
    };
    let arbiters = match arbiters {
        0 => cores.saturating_sub(io).max(1),
        n => n,
    };
    Threads { io, arbiters }
}

/// Where a started node listens.
struct Listening {
    client_addr: SocketAddr,
    admin_addr: SocketAddr,
    xmpp_addr: Option<SocketAddr>,
    xmpp_tls_addr: Option<SocketAddr>,
}

type Ready = std::sync::mpsc::Sender<anyhow::Result<Listening>>;

async fn run(settings: Settings, threads: Threads, tls: Option<crate::tls::ServerTls>, shutdown: CancellationToken, ready: Ready) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let node_id = NodeId(settings.node.id.clone());
    if settings.dev_mode {
        tracing::warn!(
            "dev mode: no config file, so guest login is on and every listener is loopback-only; \
             give --config for a real deployment"
        );
    }
    tracing::info!(node = %node_id, service = %settings.node.service, "starting node");
    match &tls {
        Some(tls) => {
            let cert = tls.certificate();
            tracing::info!(
                cert_file = %tls.files().0.display(),
                fingerprint_sha256 = %cert.fingerprint_sha256,
                serial = %cert.serial,
                "TLS on every listener (client wss://, admin https://, node link wss://)"
            );
        }
        None => {
            for l in settings.plaintext_exposed() {
                tracing::warn!(
                    listener = l.listener,
                    addr = %l.addr,
                    "plaintext {} listener on a non-loopback address, allowed by {} = true: anyone on that network can read and alter its traffic",
                    l.listener,
                    l.insecure_key
                );
            }
        }
    }
    // The node link dials its peer with TLS when this node's listeners have it (both nodes of a
    // pair share the [tls] shape), trusting tls.ca_file.
    let link_client_tls = match &tls {
        Some(_) => Some(settings.tls_client_config().context("loading the TLS trust anchors (tls.ca_file)")?),
        None => None,
    };

    // Every listener is bound before the store is touched: a port in use is reported at once,
    // naming the key to change, not after connecting and migrating.
    let client_listener = bind(&settings.listen.client.to_string(), "client", "listen.client").await?;
    let admin_listener = bind(&settings.listen.admin.to_string(), "admin", "listen.admin").await?;
    let xmpp_listener = match &settings.xmpp.c2s {
        Some(addr) => Some(bind(&addr.to_string(), "XMPP c2s", "xmpp.c2s").await?),
        None => None,
    };
    let xmpp_tls_listener = match &settings.xmpp.c2s_tls {
        Some(addr) => Some(bind(&addr.to_string(), "XMPP c2s (direct TLS)", "xmpp.c2s_tls").await?),
        None => None,
    };
    let mut link_listener = match settings.group().filter(|_| settings.has_links()).and_then(|g| g.nodes.iter().find(|n| n.id == settings.node.id)) {
        Some(me) => Some(bind(&me.link, "node link", &format!("`link` of node {} in [cluster]", me.id)).await?),
        None => None,
    };

    let url = settings.store_url();
    let store = Store::connect_with(&url, &settings.store)
        .await
        .with_context(|| format!("connecting to the store ({})", redact(&url)))?;
    tracing::info!(store = store.kind().as_str(), "store connected");
    if settings.store.migrate_on_start {
        store.migrate().await.context("running migrations")?;
        tracing::info!("migrations applied");
    }

    let committer_stop = CancellationToken::new();
    let ha_group = settings.group().filter(|g| g.ha).is_some();
    // In an HA group the node writes only while its lease is fresh (the recovery manager
    // opens the gate); a node without a peer has no lease to lose.
    let gate = if ha_group { WriteGate::closed() } else { WriteGate::always_open() };
    let (committer, committer_task) = Committer::start(store.clone(), &settings.committer, gate.clone(), committer_stop.clone());
    tracing::info!(
        max_batch_rows = settings.committer.max_batch_rows,
        max_batch_delay_us = settings.committer.max_batch_delay_us,
        max_in_flight = settings.committer.max_in_flight,
        overlap_min_rows = settings.committer.overlap_min_rows,
        "group committer started"
    );

    let plugins = crate::plugin::PluginHost::for_node(&settings.plugins, &settings.node.data_dir, settings.limits.max_body_bytes).context("starting the plugin host")?;
    tracing::info!(dir = %plugins.dir().display(), loaded = plugins.list().len(), "plugin host started");
    let plugins = Some(plugins);

    let arbiters: Vec<actix::Arbiter> = (0..threads.arbiters).map(|_| actix::Arbiter::new()).collect();
    let deps = Arc::new(RoomDeps {
        store: store.clone(),
        committer,
        limits: RoomLimits {
            join_replay_limit: settings.rooms.join_replay_limit,
            max_occupants: settings.rooms.max_occupants,
            recent_cache: settings.rooms.recent_cache,
        },
        io: tokio::runtime::Handle::current(),
        peer_client: settings.peer().map(|p| p.client.clone()),
        plugins: plugins.clone(),
    });
    let registry = RoomRegistry::new(node_id.clone(), store.clone(), arbiters.iter().map(|a| a.handle()).collect(), deps);
    registry.start_sweeper(settings.passivate_after(), shutdown.clone());
    tracing::info!(arbiters = threads.arbiters, io_threads = threads.io, "room registry ready");

    // A pair or a cluster: the node link's handle first (its runner starts once what it hands
    // things to exists), then what sends through it, in the order each part needs the one before.
    let link = settings.has_links().then(|| {
        let me = settings.node.id.as_str();
        crate::ha::link::new(crate::ha::link::LinkConfig {
            me: me.to_owned(),
            my_service: settings.node.service.clone(),
            peer_id: settings.peer().filter(|_| ha_group).map(|p| p.id.clone()),
            nodes: settings
                .linked_nodes()
                .filter(|(n, _)| n.id != me)
                .map(|(n, peering)| crate::ha::link::LinkNode {
                    id: n.id.clone(),
                    link: n.link.clone(),
                    service: n.service.clone(),
                    peering: peering.map(|p| (p.name.clone(), p.secret.clone())),
                })
                .collect(),
            secret: settings.cluster.secret.clone(),
            heartbeat: Duration::from_millis(settings.cluster.heartbeat_ms),
            tls: tls.clone(),
            client_tls: link_client_tls.clone(),
            directory: Some(Arc::new(crate::home::Directory::new(settings.clone(), store.clone()))),
        })
    });
    let (link, link_runner) = link.unzip();
    let state_watch = crate::ha::recovery::StateWatch::default();
    let forwarder = link.as_ref().map(|link| crate::forward::Forwarder::new(link.clone(), state_watch.clone()));

    let auth = Auth::new(store.clone(), settings.auth.allow_guests, settings.auth.session_ttl_s);
    let remote = forwarder.clone().map(|f| f as Arc<dyn crate::gateway::Remote>);
    let mut gateway = Gateway::new(settings.clone(), registry.clone(), store.clone(), auth, remote);
    // Users' home nodes take effect in a cluster of two groups or more; a lone pair serves
    // every login where it lands (docs/clusters.md, *Users' home nodes*).
    if let Some(link) = link.as_ref().filter(|_| settings.cluster.groups.len() > 1) {
        let directory = crate::home::Directory::new(settings.clone(), store.clone());
        gateway = gateway.with_homes(Arc::new(crate::home::Placer::new(directory, link.clone())));
    }
    let gateway = Arc::new(gateway);

    let recovery = if ha_group {
        let config = RecoveryConfig {
            me: node_id.clone(),
            peer: settings.peer().map(|p| PeerRef { id: NodeId(p.id.clone()), client: p.client.clone() }),
            ttl: Duration::from_millis(settings.cluster.lease_ttl_ms),
            renew: Duration::from_millis(settings.cluster.lease_renew_ms),
            service_down_delay: Duration::from_millis(settings.cluster.critical_service_down_delay_ms),
            auto_fallback_after: (settings.cluster.auto_fallback_after_s > 0).then(|| Duration::from_secs(settings.cluster.auto_fallback_after_s)),
            tick: Duration::from_millis((settings.cluster.heartbeat_ms / 5).clamp(20, 200)),
        };
        // The lease, the node's states and the moves go through connections of their own: a
        // burst of room activations or commits that keeps every connection of the node's pool
        // busy for seconds (10,000 clients coming back at a fallback) must not starve the lease
        // renewal, or the peer takes over a node that is only busy.
        let recovery_store = Store::connect_with(&url, &crate::config::StoreSettings { max_connections: RECOVERY_CONNECTIONS, ..settings.store.clone() })
            .await
            .with_context(|| format!("connecting the recovery manager to the store ({})", redact(&url)))?;
        let parts = crate::ha::recovery::RecoveryParts {
            store: recovery_store,
            gate,
            registry: registry.clone(),
            gateway: gateway.clone(),
            link: link.clone(),
            watch: state_watch.clone(),
        };
        let (recovery, task) = crate::ha::recovery::start(config, parts, shutdown.clone()).await.context("starting the recovery manager")?;
        tracing::info!(state = %recovery.state(), "recovery manager started");
        Some((recovery, task))
    } else {
        None
    };

    if let (Some(runner), Some(forwarder)) = (link_runner, forwarder) {
        let me = settings.group().and_then(|g| g.nodes.iter().find(|n| n.id == settings.node.id)).expect("settings checked: this node is in its group");
        let listener = link_listener.take().expect("bound above for a node with links");
        let recovery = recovery.as_ref().map(|(r, _)| r.clone());
        let side = crate::forward::LinkSide::new(forwarder, gateway.clone(), recovery.clone(), me.client.clone());
        let local: Arc<dyn crate::ha::link::LocalView> = match recovery {
            Some(recovery) => Arc::new(recovery),
            None => Arc::new(Standalone { registry: registry.clone(), gateway: gateway.clone() }),
        };
        runner.start(listener, local, side, shutdown.clone());
        tracing::info!(link = %me.link, peer = ?settings.peer().filter(|_| ha_group).map(|p| &p.id), "node link started");
    }

    let client_addr = client_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    // XMPP sessions parked for stream management resumption (both XMPP transports).
    let resumption = Arc::new(crate::xmpp::sm::Resumption::default());
    let clients = tokio::spawn(transport::ws::serve(
        client_listener,
        gateway.clone(),
        tls.clone(),
        resumption.clone(),
        if settings.node.client_connections_on_arbiters { arbiters.iter().map(|a| a.handle()).collect() } else { Vec::new() },
        shutdown.clone(),
    ));
    let admin_state = admin::AdminState::new(settings.clone(), store.clone(), registry.clone(), gateway.clone())
        .with_recovery(recovery.as_ref().map(|(r, _)| r.clone()), link)
        .with_plugins(plugins)
        .with_tls(tls.clone());
    let admin = tokio::spawn(admin::serve(admin_listener, admin_state, shutdown.clone()));
    let xmpp_addr = xmpp_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let xmpp = xmpp_listener.map(|l| tokio::spawn(crate::xmpp::c2s::serve(l, gateway.clone(), tls.clone(), false, resumption.clone(), shutdown.clone())));
    let xmpp_tls_addr = xmpp_tls_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let xmpp_tls = xmpp_tls_listener.map(|l| tokio::spawn(crate::xmpp::c2s::serve(l, gateway.clone(), tls.clone(), true, resumption.clone(), shutdown.clone())));
    if let Some(addr) = xmpp_tls_addr {
        tracing::info!(%addr, "xmpp: clients at {addr} (c2s, direct TLS) for the domain {}", settings.xmpp.domain);
    }
    if let Some(addr) = xmpp_addr {
        let starttls = if tls.is_some() { ", STARTTLS" } else { "" };
        tracing::info!(%addr, "xmpp: clients at {addr} (c2s{starttls}) for the domain {}, rooms at {}", settings.xmpp.domain, settings.node.service);
    }
    // Stoa as the MUC service of another XMPP server: the node that hosts a service's rooms
    // holds that service's component link (its own while it serves its rooms; its peer's too
    // in backup mode, in a pair).
    let component = settings.xmpp.component.clone().map(|c| {
        let always = tokio::sync::watch::Sender::new(true);
        let (own, peers) = match (&recovery, settings.peer()) {
            (Some(_), Some(peer)) => (
                component_wanted(state_watch.states(), NodeState::hosts_rooms, shutdown.clone()),
                Some((
                    crate::config::ComponentSettings { domain: peer.service.clone(), ..c.clone() },
                    component_wanted(state_watch.states(), |s| s == NodeState::RunningInBackupMode, shutdown.clone()),
                )),
            ),
            _ => (always.subscribe(), None),
        };
        let mut tasks = vec![tokio::spawn(crate::xmpp::component::run(gateway.clone(), c, own, shutdown.clone()))];
        if let Some((settings, wanted)) = peers {
            tasks.push(tokio::spawn(crate::xmpp::component::run(gateway.clone(), settings, wanted, shutdown.clone())));
        }
        (always, tasks)
    });
    let (ws, http) = if tls.is_some() { ("wss", "https") } else { ("ws", "http") };
    tracing::info!(%client_addr, %admin_addr, "listening: clients at {ws}://{client_addr}/ws, admin at {http}://{admin_addr}/");
    let _ = ready.send(Ok(Listening { client_addr, admin_addr, xmpp_addr, xmpp_tls_addr }));
    crate::systemd::serving(
        &format!("serving: clients at {ws}://{client_addr}/ws, admin at {http}://{admin_addr}/"),
        gateway.clone(),
        registry.clone(),
        recovery.as_ref().map(|(r, _)| r.clone()),
        shutdown.clone(),
    );

    shutdown.cancelled().await;
    crate::systemd::stopping("stopping: closing connections, draining commits");
    tracing::info!("shutting down: closing connections");
    let _ = clients.await;
    if let Some((_always, tasks)) = component {
        for task in tasks {
            let _ = task.await;
        }
    }
    if let Some(xmpp) = xmpp_tls {
        let _ = xmpp.await;
    }
    if let Some(xmpp) = xmpp {
        let _ = xmpp.await;
    }
    resumption.close_all(&gateway);
    let _ = admin.await;
    tracing::info!("draining the committer");
    committer_stop.cancel();
    let _ = committer_task.await;
    if let Some((_, task)) = recovery {
        let _ = task.await; // releases the lease
    }
    for arbiter in &arbiters {
        arbiter.stop();
    }
    for arbiter in arbiters {
        let _ = arbiter.join();
    }
    store.close().await;
    tracing::info!("node stopped");
    actix::System::current().stop();
    Ok(())
}

/// What a node without a peer (a single-node group of a cluster) tells the other nodes in its
/// heartbeats: it serves its rooms whenever its `rooms` service runs.
struct Standalone {
    registry: RoomRegistry,
    gateway: Arc<Gateway>,
}

impl crate::ha::link::LocalView for Standalone {
    fn state(&self) -> NodeState {
        NodeState::Normal
    }

    fn hosting(&self) -> bool {
        self.registry.is_hosting()
    }

    fn active_rooms(&self) -> Vec<String> {
        Vec::new() // only a peer reads them, to take over
    }

    fn services_down(&self) -> Vec<String> {
        Vec::new()
    }

    fn connections(&self) -> i64 {
        self.gateway.connection_count()
    }
}

/// Bind `addr` for the `what` listener; the error names the address and the config `key`.
async fn bind(addr: &str, what: &str, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the {what} listener on {addr} ({key})"))
}

/// A store URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A watch of `wanted(state)` over this node's HA state: whether to hold a component link. The
/// server keeps the newer of two links for one domain (Prosody's
/// `component_conflict_resolve = "kick_old"`, ejabberd by default), so the short overlap of a
/// handover does no harm.
fn component_wanted(mut states: tokio::sync::watch::Receiver<NodeState>, wanted: fn(NodeState) -> bool, shutdown: CancellationToken) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(wanted(*states.borrow_and_update()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = states.changed() => if changed.is_err() { return },
            }
            let now = wanted(*states.borrow_and_update());
            tx.send_if_modified(|w| std::mem::replace(w, now) != now);
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_io_threads_and_the_arbiters_share_the_cores_unless_set() {
        let split = |cores, io, arbiters| {
            let t = split_threads(cores, io, arbiters);
            (t.io, t.arbiters)
        };
        assert_eq!(split(1, 0, 0), (1, 1), "at least one of each");
        assert_eq!(split(2, 0, 0), (1, 1));
        assert_eq!(split(3, 0, 0), (1, 2));
        assert_eq!(split(8, 0, 0), (4, 4));
        assert_eq!(split(8, 6, 0), (6, 2), "the arbiters take what the I/O threads leave");
        assert_eq!(split(8, 8, 0), (8, 1));
        assert_eq!(split(2, 0, 4), (1, 4), "a setting is taken as it is");
        assert_eq!(split(2, 3, 5), (3, 5));
    }
}
