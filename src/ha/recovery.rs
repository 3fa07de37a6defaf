//! The recovery manager of a node in a redundancy group (docs/ha.md, docs/operations.md).
//!
//! It owns the node's recovery state (Cisco's states and reasons, [`super::state`]) and records
//! every transition in `node_states`. Two tasks:
//!
//! - the **lease task** renews this node's lease on the database clock every `lease_renew_ms`
//!   and keeps the [`WriteGate`] open until `last renewal + ttl − margin`; a renewal that finds
//!   another holder means the peer took this node's rooms: the node steps down;
//! - the **control loop** watches the critical services, the peer (link heartbeats, its lease,
//!   its presence lock) and carries out failover, takeover and fallback, including the admin
//!   requests ([`Recovery::request`]).
//!
//! Every room move is one epoch-bumping statement (`store::cluster`); nothing here is needed
//! for safety, only for liveness.
//!
//! This file holds the handle, the status, start-up and the two tasks' shared state; the
//! control loop is in `detect` (what it watches and decides), `moves` (the transitions and
//! room moves it carries out) and `admin` (admin requests).

mod admin;
mod detect;
mod moves;

use super::gate::WriteGate;
use super::link::{Link, PeerCommand, PeerStatus};
use super::state::{NodeState, Reason};
use crate::ids::NodeId;
use crate::registry::RoomRegistry;
use crate::gateway::Gateway;
use crate::store::cluster::ClusterError;
use crate::store::{Store, now_ms};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The critical services of a node (Cisco: the services whose failure triggers a failover).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    /// Room actors: joins, posts, history.
    Rooms,
    /// Client logins and connections.
    Router,
    /// The store connection (probed by the lease renewal).
    Store,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Rooms, Service::Router, Service::Store];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Rooms => "rooms",
            Service::Router => "router",
            Service::Store => "store",
        }
    }

    pub fn parse(s: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|x| x.as_str() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One critical service as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatus {
    pub service: Service,
    pub running: bool,
    /// Stopped by an admin (`stoa admin service stop`), as opposed to failing a probe.
    pub stopped_by_admin: bool,
    /// Milliseconds it has been down, if it is.
    pub down_for_ms: Option<u64>,
}

/// What the recovery manager reports (admin API, `stoa admin status`).
#[derive(Clone, Debug, Serialize)]
pub struct HaStatus {
    pub node: String,
    pub state: NodeState,
    pub reason: Reason,
    /// When the node entered `state`, ms since the Unix epoch.
    pub since_ms: i64,
    /// Whether the last lease renewal succeeded (the `store` critical service's probe).
    pub store_ok: bool,
    /// Milliseconds the node may still write on its own clock (its write gate).
    pub lease_remaining_ms: i64,
    pub services: Vec<ServiceStatus>,
    /// The last takeover this node did: rooms moved and how long the fencing statement took.
    pub last_takeover: Option<TakeoverReport>,
}

/// Figures of one takeover (also logged).
#[derive(Clone, Debug, Serialize)]
pub struct TakeoverReport {
    pub from: String,
    pub rooms: u64,
    /// From the decision to take over until the fencing statement committed.
    pub fence_ms: u64,
    /// Rooms the peer had active, activated here right after.
    pub activated: usize,
    pub activate_ms: u64,
    pub at_ms: i64,
}

/// An admin request the recovery manager carries out.
#[derive(Debug)]
pub enum Request {
    /// Fail `node` over to its peer (maintenance; reason `on_admin_request`).
    Failover { node: String },
    /// Hand `node`'s rooms back to it.
    Fallback { node: String },
    /// Stop or start a critical service of `node`.
    Service { node: String, service: Service, start: bool },
}

/// What the control loop did with an admin request.
enum Outcome {
    /// Done here; the message says what happened.
    Done(String),
    /// The peer's to do: the caller passes it over the link and waits for the peer's outcome
    /// (off the control loop, which the peer's action may need, as in a failover).
    Forward(PeerCommand),
}

type Reply = oneshot::Sender<Result<Outcome, String>>;

enum Command {
    Admin(Request, Option<Reply>),
    /// The lease task found the lease held by someone else: the peer took over.
    LeaseLost,
}

/// Settings of the recovery manager.
#[derive(Clone, Debug)]
pub struct RecoveryConfig {
    pub me: NodeId,
    pub peer: Option<PeerRef>,
    pub ttl: Duration,
    pub renew: Duration,
    pub service_down_delay: Duration,
    pub auto_fallback_after: Option<Duration>,
    /// The control loop's tick (and the pace of peer checks while the peer looks down).
    pub tick: Duration,
}

/// The peer as the recovery manager needs it.
#[derive(Clone, Debug)]
pub struct PeerRef {
    pub id: NodeId,
    /// Its client URL, where clients of moved rooms go.
    pub client: String,
}

struct ServiceFlags {
    admin_stopped: bool,
    /// The service's health probe passed last time (rooms: every arbiter answers; router: the
    /// client listener accepts; store: the lease renewal succeeds).
    probe_ok: bool,
    down_since: Option<Instant>,
}

struct Inner {
    config: RecoveryConfig,
    store: Store,
    gate: WriteGate,
    registry: RoomRegistry,
    gateway: Arc<Gateway>,
    status: Mutex<HaStatus>,
    services: Mutex<[ServiceFlags; 3]>,
    /// The lease incarnation this process holds (a new one after each step-down).
    incarnation: AtomicI64,
    /// Whether the lease task should renew (not while failing over: the lease is released).
    lease_wanted: AtomicBool,
    /// The node link to the peer (none without a peer).
    link: Option<Link>,
    commands: mpsc::UnboundedSender<Command>,
    /// The state and takeovers, published for the parts that wait on them.
    watch: StateWatch,
}

/// The recovery manager's state and the number of takeovers it has done, published for the
/// parts of the node that wait on them (forwarding waits for a takeover of a down peer's
/// rooms; the XMPP component link follows the state). Made at start-up before those parts and
/// before the recovery manager, which is the only writer; cheap to clone.
#[derive(Clone)]
pub struct StateWatch {
    state: Arc<tokio::sync::watch::Sender<NodeState>>,
    takeovers: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for StateWatch {
    fn default() -> Self {
        StateWatch {
            state: Arc::new(tokio::sync::watch::Sender::new(NodeState::Initializing)),
            takeovers: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl StateWatch {
    /// The node's recovery state now.
    pub fn state(&self) -> NodeState {
        *self.state.borrow()
    }

    /// Follows the node's recovery state.
    pub fn states(&self) -> tokio::sync::watch::Receiver<NodeState> {
        self.state.subscribe()
    }

    /// Changes whenever this node completes a takeover.
    pub fn takeovers(&self) -> tokio::sync::watch::Receiver<u64> {
        self.takeovers.subscribe()
    }

    /// Wait up to `limit` for this node's next takeover (only while it may take over); true if
    /// one happened, or if this node already runs in backup mode (the caller's attempt raced
    /// with the takeover).
    pub async fn await_takeover(&self, limit: Duration) -> bool {
        let mut rx = self.takeovers.subscribe();
        rx.mark_unchanged();
        match self.state() {
            // The takeover finished between the caller's attempt and now: retry at once.
            NodeState::RunningInBackupMode => true,
            NodeState::Normal | NodeState::TakingOver | NodeState::FailedOver => {
                matches!(tokio::time::timeout(limit, rx.changed()).await, Ok(Ok(())))
            }
            _ => false,
        }
    }
}

/// Handle to a running recovery manager.
#[derive(Clone)]
pub struct Recovery {
    inner: Arc<Inner>,
}

impl Recovery {
    /// The current status.
    pub fn status(&self) -> HaStatus {
        let mut s = self.inner.status.lock().expect("ha status lock").clone();
        s.lease_remaining_ms = self.inner.gate.remaining().as_millis() as i64;
        s.services = self.services();
        s
    }

    /// The node's current state.
    pub fn state(&self) -> NodeState {
        self.inner.watch.state()
    }

    fn services(&self) -> Vec<ServiceStatus> {
        let flags = self.inner.services.lock().expect("services lock");
        Service::ALL
            .into_iter()
            .map(|service| {
                let f = &flags[service.index()];
                ServiceStatus {
                    service,
                    running: !f.admin_stopped && f.probe_ok,
                    stopped_by_admin: f.admin_stopped,
                    down_for_ms: f.down_since.map(|t| t.elapsed().as_millis() as u64),
                }
            })
            .collect()
    }

    /// The node link, if this node has a peer.
    pub fn link(&self) -> Option<&Link> {
        self.inner.link.as_ref()
    }

    /// Carry out an admin request (here, or by passing it to the peer over the link) and
    /// answer what was done.
    pub async fn request(&self, request: Request) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.inner.commands.send(Command::Admin(request, Some(tx))).map_err(|_| "the recovery manager has stopped".to_owned())?;
        match rx.await.unwrap_or_else(|_| Err("the recovery manager has stopped".to_owned()))? {
            Outcome::Done(message) => Ok(message),
            Outcome::Forward(command) => match self.link().and_then(|l| Some((l, l.peer_id()?))) {
                Some((link, peer)) => link.request(peer, command).await,
                None => Err("no node link to the peer".to_owned()),
            },
        }
    }

    /// A request node `from` passed over the link (an admin asked that node, its peer or any
    /// node of the cluster, for something only this node can do). It is carried out only if it
    /// is this node's to do: fail this node over, stop or start one of its services, or hand
    /// the peer's rooms back to it; anything else is refused. Either way it lands in the audit
    /// log with its outcome, and the outcome goes back to `from`.
    pub fn from_node(&self, from: &NodeId, id: u64, command: PeerCommand) {
        let me = self.inner.config.me.0.clone();
        let peer = self.inner.config.peer.as_ref().map(|p| p.id.0.clone()).unwrap_or_default();
        let from = from.clone();
        let (action, target, request) = match command {
            PeerCommand::Failover { node } if node == me => ("failover", node.clone(), Ok(Request::Failover { node })),
            PeerCommand::Fallback { node } if node == peer => ("fallback", node.clone(), Ok(Request::Fallback { node })),
            PeerCommand::Service { node, service, start } if node == me => {
                let action = if start { "service_start" } else { "service_stop" };
                let target = format!("{node}/{service}");
                match Service::parse(&service) {
                    Some(service) => (action, target, Ok(Request::Service { node, service, start })),
                    None => (action, target, Err(format!("unknown service `{service}`"))),
                }
            }
            other => ("peer_command", format!("{other:?}"), Err(format!("not node {me}'s to do"))),
        };
        let this = self.clone();
        tokio::spawn(async move {
            let answer = match request {
                Ok(request) => this.request(request).await,
                Err(refusal) => Err(refusal),
            };
            let (outcome, message) = match &answer {
                Ok(m) => ("done", m.as_str()),
                Err(m) => ("refused", m.as_str()),
            };
            tracing::info!(target: "stoa::audit", action, target, outcome, message, asked_by = %from, "admin action from another node over the node link");
            let actor = format!("node-link:{from}");
            let detail = serde_json::Map::from_iter([
                ("asked_by".to_owned(), serde_json::Value::String(from.0.clone())),
                ("message".to_owned(), serde_json::Value::String(message.to_owned())),
            ]);
            let entry = crate::store::audit::AuditEntry { node: &this.inner.config.me.0, actor: &actor, action, target: &target, detail, outcome };
            if let Err(e) = this.inner.store.audit(&entry).await {
                tracing::warn!(error = %e, "could not write the audit log");
            }
            if let Some(link) = this.link() {
                link.answer(&from, id, &answer);
            }
        });
    }
}

impl super::link::LocalView for Recovery {
    fn state(&self) -> NodeState {
        Recovery::state(self)
    }

    fn hosting(&self) -> bool {
        self.inner.registry.is_hosting()
    }

    fn active_rooms(&self) -> Vec<String> {
        self.inner.registry.active_addresses().into_iter().map(|r| r.0).collect()
    }

    fn services_down(&self) -> Vec<String> {
        self.services().into_iter().filter(|s| !s.running).map(|s| s.service.as_str().to_owned()).collect()
    }

    fn connections(&self) -> i64 {
        self.inner.gateway.connection_count()
    }

    fn state_changes(&self) -> Option<tokio::sync::watch::Receiver<NodeState>> {
        Some(self.inner.watch.states())
    }
}

/// The parts of the node the recovery manager works with.
pub struct RecoveryParts {
    pub store: Store,
    /// Opened while this node's lease is fresh.
    pub gate: WriteGate,
    pub registry: RoomRegistry,
    pub gateway: Arc<Gateway>,
    /// The node link to the peer (its runner starts after the recovery manager, which it
    /// reads for heartbeats).
    pub link: Option<Link>,
    /// Where the recovery manager publishes its state and takeovers.
    pub watch: StateWatch,
}

/// Start the recovery manager: hold the presence lock, decide the starting state (`normal`,
/// or `failed_over` if the peer serves this node's rooms), and run the lease task and the
/// control loop until `shutdown`, when the lease is released so a peer need not wait for it.
pub async fn start(config: RecoveryConfig, parts: RecoveryParts, shutdown: CancellationToken) -> anyhow::Result<(Recovery, tokio::task::JoinHandle<()>)> {
    use anyhow::Context as _;
    let RecoveryParts { store, gate, registry, gateway, link, watch } = parts;
    let me = config.me.clone();
    let incarnation = now_ms();
    store.record_node_state(&me, NodeState::Initializing.as_str(), Reason::Initializing.as_str(), incarnation).await.context("recording the initial state")?;

    // The presence lock first: while this node's lease is alive, a missing presence lock then
    // means the process is gone (docs/ha.md, check 3).
    let (present_tx, mut present_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(store.hold_presence(me.clone(), present_tx, shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(15), present_rx.wait_for(|held| *held))
        .await
        .map_err(|_| anyhow::anyhow!("could not take the presence lock within 15 s"))?
        .map_err(|_| anyhow::anyhow!("the presence task ended"))?;

    // Registry and router stay closed until the starting state is known.
    registry.set_hosting(false);
    gateway.set_accepting(false);
    store.renew_lease(&me, incarnation, config.ttl).await.context("taking the node lease")?;
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        status: Mutex::new(HaStatus {
            node: me.0.clone(),
            state: NodeState::Initializing,
            reason: Reason::Initializing,
            since_ms: now_ms(),
            store_ok: true,
            lease_remaining_ms: 0,
            services: Vec::new(),
            last_takeover: None,
        }),
        services: Mutex::new(std::array::from_fn(|_| ServiceFlags { admin_stopped: false, probe_ok: true, down_since: None })),
        incarnation: AtomicI64::new(incarnation),
        lease_wanted: AtomicBool::new(true),
        link,
        commands,
        watch,
        config,
        store,
        gate,
        registry,
        gateway,
    });
    let recovery = Recovery { inner: inner.clone() };
    let mut control = Control { r: recovery.clone(), awaiting_takeover: false, healthy_since: None, peer_seen_alive: false, return_on_peer_start: false };
    tokio::spawn(probe_task(recovery.clone(), shutdown.clone()));
    control.initial_state().await.context("deciding the starting state")?;

    let lease_task = tokio::spawn(lease_task(recovery.clone(), shutdown.clone()));
    let task = tokio::spawn(async move {
        control.run(commands_rx, shutdown).await;
        let _ = lease_task.await;
        let me = &inner.config.me;
        if let Err(e) = inner.store.release_lease(me).await {
            tracing::warn!(node = %me, error = %e, "could not release the lease on shutdown");
        } else {
            tracing::info!(node = %me, "node lease released");
        }
    });
    Ok((recovery, task))
}

/// The write-gate margin: stop writing this long before the lease could expire.
fn margin(ttl: Duration) -> Duration {
    (ttl / 5).min(Duration::from_secs(1))
}

/// Renew the lease every `renew` while wanted; keep the write gate open accordingly.
async fn lease_task(r: Recovery, shutdown: CancellationToken) {
    let inner = &r.inner;
    let (ttl, renew) = (inner.config.ttl, inner.config.renew);
    let me = inner.config.me.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(renew) => {}
            _ = shutdown.cancelled() => return,
        }
        let store_stopped = inner.services.lock().expect("services lock")[Service::Store.index()].admin_stopped;
        if !inner.lease_wanted.load(Ordering::Acquire) || store_stopped {
            continue;
        }
        let started = Instant::now();
        let incarnation = inner.incarnation.load(Ordering::Acquire);
        let result = inner.store.extend_lease(&me, incarnation, ttl).await;
        match result {
            Ok(true) => {
                inner.status.lock().expect("ha status lock").store_ok = true;
                if inner.registry.is_hosting() && inner.lease_wanted.load(Ordering::Acquire) {
                    inner.gate.open_until(started + ttl - margin(ttl));
                }
            }
            Ok(false) => {
                if inner.incarnation.load(Ordering::Acquire) == incarnation && inner.lease_wanted.load(Ordering::Acquire) {
                    tracing::warn!(node = %me, "lease held by another incarnation: the peer took this node's rooms");
                    let _ = inner.commands.send(Command::LeaseLost);
                }
            }
            Err(e) => {
                inner.status.lock().expect("ha status lock").store_ok = false;
                tracing::warn!(node = %me, error = %e, left_ms = inner.gate.remaining().as_millis() as u64, "lease renewal failed");
            }
        }
    }
}

/// The control loop's own state.
struct Control {
    r: Recovery,
    /// Failing over: waiting for the peer to take the rooms.
    awaiting_takeover: bool,
    /// Failed over with every service running since then (automatic fallback's quiet period,
    /// judged on the backup from the peer's reported state).
    healthy_since: Option<Instant>,
    /// This process has seen the peer alive over the link.
    peer_seen_alive: bool,
    /// The peer's service is held here only because the peer was not running when this node
    /// started (a cold start of the pair, or a restart of the backup): hand it back as soon as
    /// the peer is up and failed over, without waiting for an operator or the quiet period.
    /// A takeover of a peer this process saw fail is a failover proper: fallback is manual, or
    /// automatic after `auto_fallback_after_s` (docs/ha.md, "Whole-pair stop and start").
    return_on_peer_start: bool,
}

/// How often the `rooms` and `router` services are probed, and how long the rooms probe may
/// take (generous: a heavily loaded arbiter is slow, not dead).
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_LIMIT: Duration = Duration::from_secs(5);

/// Probe the `rooms` and `router` critical services every [`PROBE_EVERY`] (off the control
/// loop: a wedged arbiter must not stall failover decisions).
async fn probe_task(r: Recovery, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        let rooms_ok = r.inner.registry.probe(PROBE_LIMIT).await;
        let router_ok = r.inner.gateway.probe();
        let mut flags = r.inner.services.lock().expect("services lock");
        for (service, ok) in [(Service::Rooms, rooms_ok), (Service::Router, router_ok)] {
            let f = &mut flags[service.index()];
            if f.probe_ok != ok {
                tracing::warn!(service = service.as_str(), ok, "critical service probe changed");
            }
            f.probe_ok = ok;
        }
    }
}

impl Control {
    fn inner(&self) -> &Inner {
        &self.r.inner
    }

    fn me(&self) -> &NodeId {
        &self.inner().config.me
    }

    fn state(&self) -> NodeState {
        self.r.state()
    }
}
