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
//! Every room move is one epoch-bumping statement ([`super::fencing`]); nothing here is needed
//! for safety, only for liveness.

use super::fencing;
use super::gate::WriteGate;
use super::lease;
use super::link::{Link, PeerCommand, PeerStatus};
use super::state::{NodeState, Reason};
use crate::registry::RoomRegistry;
use crate::gateway::Gateway;
use crate::store::{NodeId, Store, now_ms};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Alias, Expr, Query};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    link: OnceLock<Link>,
    commands: mpsc::UnboundedSender<Command>,
    /// Counts the takeovers this node has done (requests for a down peer's rooms wait on it).
    takeovers: tokio::sync::watch::Sender<u64>,
}

/// Handle to a running recovery manager.
#[derive(Clone)]
pub struct Recovery {
    inner: Arc<Inner>,
}

/// Record a transition in `node_states` (time on the database clock; `epoch` holds the
/// node's lease incarnation).
pub async fn record_transition(store: &Store, node: &NodeId, state: NodeState, reason: Reason, incarnation: i64) -> Result<(), crate::store::StoreError> {
    let stmt = Query::insert()
        .into_table(Alias::new("node_states"))
        .columns([Alias::new("node_id"), Alias::new("state"), Alias::new("reason"), Alias::new("epoch"), Alias::new("at")])
        .values_panic([
            node.0.clone().into(),
            state.as_str().into(),
            reason.as_str().into(),
            incarnation.into(),
            Expr::current_timestamp(),
        ])
        .to_owned();
    store.connection().execute(&stmt).await?;
    Ok(())
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
        self.inner.status.lock().expect("ha status lock").state
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

    /// Wait up to `limit` for this node's next takeover (only while it may take over); true if
    /// one happened, or if this node already runs in backup mode (the caller's attempt raced
    /// with the takeover).
    pub async fn await_takeover(&self, limit: Duration) -> bool {
        let mut rx = self.inner.takeovers.subscribe();
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

    /// Changes whenever this node completes a takeover.
    pub fn takeovers(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.takeovers.subscribe()
    }

    /// The node link, once started.
    pub fn link(&self) -> Option<&Link> {
        self.inner.link.get()
    }

    /// Attach the node link (once, right after it starts).
    pub fn set_link(&self, link: Link) {
        let _ = self.inner.link.set(link);
    }

    /// Carry out an admin request (here, or by passing it to the peer over the link) and
    /// answer what was done.
    pub async fn request(&self, request: Request) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.inner.commands.send(Command::Admin(request, Some(tx))).map_err(|_| "the recovery manager has stopped".to_owned())?;
        match rx.await.unwrap_or_else(|_| Err("the recovery manager has stopped".to_owned()))? {
            Outcome::Done(message) => Ok(message),
            Outcome::Forward(command) => match self.link() {
                Some(link) => link.request(command).await,
                None => Err("no node link to the peer".to_owned()),
            },
        }
    }

    /// A request the peer passed over the link (an admin asked the peer for something only
    /// this node can do). It is carried out only if it is this node's to do: fail this node
    /// over, stop or start one of its services, or hand the peer's rooms back to it; anything
    /// else is refused. Either way it lands in the audit log with its outcome.
    pub fn from_peer(&self, id: u64, command: PeerCommand) {
        let me = self.inner.config.me.0.clone();
        let peer = self.inner.config.peer.as_ref().map(|p| p.id.0.clone()).unwrap_or_default();
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
            tracing::info!(target: "stoa::audit", action, target, outcome, message, "admin action from the peer over the node link");
            let actor = format!("node-link:{peer}");
            let detail = serde_json::Map::from_iter([
                ("asked_by".to_owned(), serde_json::Value::String(peer.clone())),
                ("message".to_owned(), serde_json::Value::String(message.to_owned())),
            ]);
            let entry = crate::store::audit::AuditEntry { node: &this.inner.config.me.0, actor: &actor, action, target: &target, detail, outcome };
            if let Err(e) = this.inner.store.audit(&entry).await {
                tracing::warn!(error = %e, "could not write the audit log");
            }
            if let Some(link) = this.link() {
                link.answer(id, &answer);
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
}

/// Start the recovery manager: hold the presence lock, decide the starting state (`normal`,
/// or `failed_over` if the peer serves this node's rooms), and run the lease task and the
/// control loop until `shutdown`, when the lease is released so a peer need not wait for it.
pub async fn start(
    config: RecoveryConfig,
    store: Store,
    gate: WriteGate,
    registry: RoomRegistry,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
) -> anyhow::Result<(Recovery, tokio::task::JoinHandle<()>)> {
    use anyhow::Context as _;
    let me = config.me.clone();
    let incarnation = now_ms();
    record_transition(&store, &me, NodeState::Initializing, Reason::Initializing, incarnation).await.context("recording the initial state")?;

    // The presence lock first: while this node's lease is alive, a missing presence lock then
    // means the process is gone (docs/ha.md, check 3).
    let (present_tx, mut present_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(fencing::hold_presence(store.url().to_owned(), store.kind(), me.clone(), present_tx, shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(15), present_rx.wait_for(|held| *held))
        .await
        .map_err(|_| anyhow::anyhow!("could not take the presence lock within 15 s"))?
        .map_err(|_| anyhow::anyhow!("the presence task ended"))?;

    // Registry and router stay closed until the starting state is known.
    registry.set_hosting(false);
    gateway.set_accepting(false);
    lease::renew(&store, &me, incarnation, config.ttl).await.context("taking the node lease")?;
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
        link: OnceLock::new(),
        commands,
        takeovers: tokio::sync::watch::Sender::new(0),
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
        if let Err(e) = lease::release(&inner.store, me).await {
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
        let result = lease::extend(&inner.store, &me, incarnation, ttl).await;
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

    /// Enter `state` (if legal from the current one), record it and log it.
    async fn enter(&self, state: NodeState, reason: Reason) {
        let from = {
            let mut s = self.inner().status.lock().expect("ha status lock");
            let from = s.state;
            if from == state && s.reason == reason {
                return;
            }
            if !from.can_become(state) {
                tracing::error!(node = %self.me(), %from, to = %state, "illegal recovery transition refused");
                return;
            }
            s.state = state;
            s.reason = reason;
            s.since_ms = now_ms();
            from
        };
        metrics::counter!("stoa_ha_transitions_total", "state" => state.as_str()).increment(1);
        tracing::info!(node = %self.me(), %from, to = %state, %reason, "recovery state");
        let incarnation = self.inner().incarnation.load(Ordering::Acquire);
        if let Err(e) = record_transition(&self.inner().store, self.me(), state, reason, incarnation).await {
            tracing::warn!(error = %e, "could not record the transition in node_states");
        }
    }

    /// Serve rooms and clients (after a fresh lease renewal opened the gate), or stop.
    async fn host(&self, on: bool) -> Result<(), lease::LeaseError> {
        let inner = self.inner();
        if on {
            let started = Instant::now();
            let incarnation = inner.incarnation.load(Ordering::Acquire);
            if !lease::extend(&inner.store, self.me(), incarnation, inner.config.ttl).await? {
                self.new_lease().await?;
            }
            inner.gate.open_until(started + inner.config.ttl - margin(inner.config.ttl));
            let services = inner.services.lock().expect("services lock");
            inner.registry.set_hosting(!services[Service::Rooms.index()].admin_stopped);
            inner.gateway.set_accepting(!services[Service::Router.index()].admin_stopped);
        } else {
            inner.gate.close();
            inner.registry.set_hosting(false);
            inner.gateway.set_accepting(false);
        }
        Ok(())
    }

    /// Take the lease again under a new incarnation (after stepping down or failing over).
    async fn new_lease(&self) -> Result<(), lease::LeaseError> {
        let inner = self.inner();
        let incarnation = now_ms().max(inner.incarnation.load(Ordering::Acquire) + 1);
        lease::renew(&inner.store, self.me(), incarnation, inner.config.ttl).await?;
        inner.incarnation.store(incarnation, Ordering::Release);
        inner.lease_wanted.store(true, Ordering::Release);
        Ok(())
    }

    fn peer(&self) -> Option<&PeerRef> {
        self.inner().config.peer.as_ref()
    }

    fn peer_status(&self) -> Option<PeerStatus> {
        self.r.link().map(|l| l.peer())
    }

    /// Start-up: normal, unless the peer serves this node's rooms (then wait for fallback), or
    /// reclaim them if that peer is gone too (both nodes failed; this one came back first).
    /// A node that finds itself serving its peer's service (the pair was stopped while it
    /// backed the peer up) runs in backup mode and returns it once the peer is up.
    async fn initial_state(&mut self) -> Result<(), lease::LeaseError> {
        let inner = self.inner();
        let served_by = fencing::service_host(&inner.store, self.me()).await?;
        if &served_by == self.me() {
            self.host(true).await?;
            let backing_up = match self.peer() {
                Some(peer) => &fencing::service_host(&inner.store, &peer.id).await? == self.me(),
                None => false,
            };
            if backing_up {
                tracing::info!(node = %self.me(), "this node serves its peer's rooms since before it started: backup mode until the peer is up");
                self.return_on_peer_start = true;
                self.enter(NodeState::RunningInBackupMode, Reason::Initializing).await;
            } else {
                self.enter(NodeState::Normal, Reason::Initializing).await;
            }
            return Ok(());
        }
        if let Some(peer) = self.peer() {
            let peer_lease = lease::read(&inner.store, &peer.id).await?;
            let peer_gone = peer_lease.is_none_or(|l| l.expired) && !fencing::is_present(&inner.store, &peer.id).await?;
            if peer_gone {
                let moved = fencing::return_home(&inner.store, self.me(), &peer.id).await?;
                tracing::info!(node = %self.me(), peer = %peer.id, rooms = moved, "peer is down too: reclaimed this node's rooms");
                self.host(true).await?;
                self.enter(NodeState::Normal, Reason::Initializing).await;
                return Ok(());
            }
        }
        tracing::info!(node = %self.me(), by = %served_by, "this node's rooms are served by its peer: failed over, waiting for fallback");
        self.enter(NodeState::FailedOver, Reason::Initializing).await;
        Ok(())
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner().config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_lease_look = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                command = commands.recv() => match command {
                    Some(Command::Admin(request, reply)) => {
                        let answer = self.admin(request).await;
                        match &answer {
                            Ok(Outcome::Done(m)) => tracing::info!(node = %self.me(), "{m}"),
                            Ok(Outcome::Forward(c)) => tracing::info!(node = %self.me(), ?c, "passing the request to the peer"),
                            Err(m) => tracing::warn!(node = %self.me(), "admin request refused: {m}"),
                        }
                        if let Some(reply) = reply {
                            let _ = reply.send(answer);
                        }
                    }
                    Some(Command::LeaseLost) => self.step_down().await,
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.watch_services().await {
                tracing::warn!(error = %e, "service check failed");
            }
            let look_at_lease = Instant::now() >= next_lease_look;
            if look_at_lease {
                next_lease_look = Instant::now() + self.inner().config.renew;
            }
            if let Err(e) = self.watch_peer(look_at_lease).await {
                tracing::warn!(error = %e, "peer check failed");
            }
            if let Err(e) = self.watch_home().await {
                tracing::warn!(error = %e, "fallback check failed");
            }
        }
    }

    /// Critical services: restart what came back; fail over when one stays down too long.
    async fn watch_services(&mut self) -> Result<(), lease::LeaseError> {
        {
            // The store's probe is the lease renewal; rooms and router are probed by `probe_task`.
            let store_ok = self.inner().status.lock().expect("ha status lock").store_ok;
            self.inner().services.lock().expect("services lock")[Service::Store.index()].probe_ok = store_ok;
        }
        let down_longest = {
            let mut flags = self.inner().services.lock().expect("services lock");
            let mut longest: Option<Duration> = None;
            for service in Service::ALL {
                let f = &mut flags[service.index()];
                let down = f.admin_stopped || !f.probe_ok;
                match (down, f.down_since) {
                    (true, None) => f.down_since = Some(Instant::now()),
                    (false, Some(_)) => f.down_since = None,
                    _ => {}
                }
                if let Some(t) = f.down_since {
                    longest = Some(longest.unwrap_or_default().max(t.elapsed()));
                }
            }
            longest
        };
        match (self.state(), down_longest) {
            // Only to a peer that can take the rooms: with the peer gone too, limping on is
            // better than going dark.
            (NodeState::Normal, Some(d))
                if d >= self.inner().config.service_down_delay && self.peer_status().is_some_and(|p| p.reachable) =>
            {
                self.fail_over(Reason::OnCriticalServiceDown).await;
            }
            (NodeState::FailedOverCriticalServicesNotRunning, None) => {
                self.enter(NodeState::FailedOver, Reason::OnCriticalServiceDown).await;
            }
            (NodeState::FailedOver, Some(_)) => {
                self.enter(NodeState::FailedOverCriticalServicesNotRunning, Reason::OnCriticalServiceDown).await;
            }
            _ => {}
        }
        Ok(())
    }

    /// Take over the peer's rooms when the store says it is gone: its lease expired (or was
    /// released), or its link closed and its presence lock vanished (a dead process).
    async fn watch_peer(&mut self, look_at_lease: bool) -> Result<(), lease::LeaseError> {
        let Some(peer) = self.peer().cloned() else { return Ok(()) };
        let status = self.peer_status();
        if status.as_ref().is_some_and(|p| p.reachable) {
            self.peer_seen_alive = true;
        }
        let state = self.state();
        let may_take_over = matches!(state, NodeState::Normal | NodeState::FailedOver | NodeState::RunningInFailedMode);
        if !may_take_over {
            return Ok(());
        }
        let suspicious = match &status {
            None => true,
            Some(p) => {
                !p.reachable
                    || matches!(
                        p.state,
                        Some(NodeState::FailingOver | NodeState::FailedOver | NodeState::FailedOverCriticalServicesNotRunning)
                    )
            }
        };
        if !suspicious && !look_at_lease {
            return Ok(());
        }
        let store = &self.inner().store;
        let peer_lease = lease::read(store, &peer.id).await?;
        // Nothing to take: the peer hosts no room, and it has never run (a new pair) or its
        // service is served elsewhere already.
        if fencing::hosted_by(store, &peer.id).await? == 0
            && (peer_lease.is_none() || fencing::service_host(store, &peer.id).await? != peer.id)
        {
            return Ok(());
        }
        let expired = peer_lease.as_ref().is_none_or(|l| l.expired);
        let link_down = status.as_ref().is_none_or(|p| !p.link_up);
        let dead = !expired && link_down && !fencing::is_present(store, &peer.id).await?;
        if expired || dead {
            tracing::warn!(node = %self.me(), peer = %peer.id, lease_expired = expired, process_gone = dead, "peer is down: taking over its rooms");
            self.take_over(&peer).await;
        }
        Ok(())
    }

    /// Fence every room the peer hosts with one statement, activate the ones it had active,
    /// and run in backup mode.
    async fn take_over(&mut self, peer: &PeerRef) {
        let was = self.state();
        let decided = Instant::now();
        self.enter(NodeState::TakingOver, Reason::OnPeerDown).await;
        let inner = self.inner();
        // Our own lease must be good before we serve anything.
        if let Err(e) = self.host(true).await {
            tracing::error!(error = %e, "cannot renew this node's lease; not taking over");
            self.host(false).await.ok();
            self.enter(was, Reason::OnPeerDown).await;
            return;
        }
        let moved = match fencing::take_over(&inner.store, &peer.id, self.me()).await {
            Ok(n) => n,
            Err(e) => {
                // Nothing moved (the statement is one transaction): back to where we were, and
                // the next check tries again.
                tracing::warn!(error = %e, "takeover statement failed; will retry");
                if !was.hosts_rooms() {
                    self.host(false).await.ok();
                }
                self.enter(was, Reason::OnPeerDown).await;
                return;
            }
        };
        let fence_ms = decided.elapsed().as_millis() as u64;
        metrics::counter!("stoa_ha_takeovers_total").increment(1);
        metrics::histogram!("stoa_ha_takeover_fence_seconds").record(decided.elapsed().as_secs_f64());
        let return_on_peer_start = !self.peer_seen_alive;
        self.return_on_peer_start = return_on_peer_start;
        let inner = self.inner();
        tracing::info!(
            node = %self.me(),
            peer = %peer.id,
            rooms = moved,
            fence_ms,
            return_on_peer_start,
            "peer's rooms fenced and taken over"
        );
        self.enter(NodeState::RunningInBackupMode, Reason::OnPeerDown).await;
        inner.takeovers.send_modify(|n| *n += 1);
        // Activate what the peer had active, so its clients' rejoins find warm rooms.
        let rooms = self.r.link().map(|l| l.peer_rooms()).unwrap_or_default();
        let started = Instant::now();
        let activated = activate_all(&inner.registry, rooms).await;
        let activate_ms = started.elapsed().as_millis() as u64;
        tracing::info!(node = %self.me(), activated, activate_ms, "peer's active rooms activated");
        inner.status.lock().expect("ha status lock").last_takeover =
            Some(TakeoverReport { from: peer.id.0.clone(), rooms: moved, fence_ms, activated, activate_ms, at_ms: now_ms() });
    }

    /// This node gives its rooms to the peer: stop serving, finish what is in flight, tell
    /// clients where to go, release the lease, and wait until the peer has fenced the rooms.
    async fn fail_over(&mut self, reason: Reason) {
        let Some(peer) = self.peer().cloned() else { return };
        self.enter(NodeState::FailingOver, reason).await;
        let inner = self.inner();
        self.host(false).await.ok();
        let handed = inner.registry.hand_off(None, &peer.client, Duration::from_secs(10)).await;
        inner.lease_wanted.store(false, Ordering::Release);
        if let Err(e) = lease::release(&inner.store, self.me()).await {
            tracing::warn!(error = %e, "could not release the lease; the peer waits for it to expire");
        }
        let told = inner.gateway.goaway_all("node is failing over; resume on its peer", Some(peer.client.clone()));
        tracing::info!(node = %self.me(), rooms = handed, sessions = told, "failing over: rooms handed off, clients sent to the peer");
        self.awaiting_takeover = true;
    }

    /// The peer took this node's rooms while it was not looking (paused, or cut off from the
    /// store): stop serving at once and wait for fallback.
    async fn step_down(&mut self) {
        let state = self.state();
        if !state.hosts_rooms() {
            return;
        }
        let inner = self.inner();
        self.host(false).await.ok();
        let to = self.peer().map(|p| p.client.clone()).unwrap_or_default();
        let told = inner.gateway.goaway_all("this node's rooms moved to its peer", Some(to.clone()));
        let handed = inner.registry.hand_off(None, &to, Duration::from_secs(10)).await;
        tracing::warn!(node = %self.me(), rooms = handed, sessions = told, "stepped down: the peer serves this node's rooms");
        self.enter(NodeState::FailingOver, Reason::OnPeerDown).await;
        if let Err(e) = self.new_lease().await {
            tracing::warn!(error = %e, "could not take a new lease");
        }
        self.enter(NodeState::FailedOver, Reason::OnPeerDown).await;
    }

    /// Failed over: notice the takeover (failing over) and the fallback (rooms came home).
    async fn watch_home(&mut self) -> Result<(), lease::LeaseError> {
        let store = &self.inner().store;
        match self.state() {
            NodeState::FailingOver if self.awaiting_takeover => {
                // Taken over when the peer serves this node's service (rooms or none) and no
                // room is left here.
                let taken = &fencing::service_host(store, self.me()).await? != self.me() && fencing::hosted_by(store, self.me()).await? == 0;
                if taken {
                    self.awaiting_takeover = false;
                    self.new_lease().await?;
                    let critical = self.r.services().iter().any(|s| !s.running);
                    let (state, reason) = {
                        let s = self.inner().status.lock().expect("ha status lock");
                        (if critical { NodeState::FailedOverCriticalServicesNotRunning } else { NodeState::FailedOver }, s.reason)
                    };
                    self.enter(state, reason).await;
                }
            }
            NodeState::FailedOver => self.take_back_if_returned().await?,
            NodeState::RunningInBackupMode => {
                let peer = self.peer().map(|p| p.id.clone());
                let still_backing_up = match &peer {
                    Some(peer) => &fencing::service_host(store, peer).await? == self.me(),
                    None => false,
                };
                if still_backing_up {
                    self.maybe_auto_fallback().await;
                } else {
                    // The peer reclaimed its service itself (it started while this node was
                    // down, or both started at once): nothing is backed up here any more.
                    tracing::info!(node = %self.me(), "the peer serves its own rooms again: back to normal");
                    self.return_on_peer_start = false;
                    let reason = self.inner().status.lock().expect("ha status lock").reason;
                    self.enter(NodeState::Normal, reason).await;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Failed over: once this node's service is its own again (the backup gave it back, or a
    /// recovery returned it), take the lease and serve, with the reason the backup gave the
    /// rooms back for (an operator's fallback, or automatic).
    async fn take_back_if_returned(&mut self) -> Result<(), lease::LeaseError> {
        if &fencing::service_host(&self.inner().store, self.me()).await? != self.me() {
            return Ok(());
        }
        let backup_reason = match self.peer() {
            Some(peer) => fencing::last_state(&self.inner().store, &peer.id).await?.map(|(_, reason, _)| reason),
            None => None,
        };
        let reason = match backup_reason.as_deref() {
            Some("automatic_fallback") => Reason::AutomaticFallback,
            _ => Reason::OnAdminRequest,
        };
        self.enter(NodeState::TakingBack, reason).await;
        if let Err(e) = self.host(true).await {
            tracing::warn!(error = %e, "cannot take the lease back yet");
            self.enter(NodeState::FailedOver, reason).await;
            return Ok(());
        }
        // Warm up the rooms that were active on the backup, for the clients it is sending here.
        let service = format!("@{}", self.inner().gateway.settings.node.service);
        let mine: Vec<String> =
            self.r.link().map(|l| l.peer_rooms()).unwrap_or_default().into_iter().filter(|r| r.ends_with(&service)).collect();
        let started = Instant::now();
        let n = activate_all(&self.inner().registry, mine).await;
        tracing::info!(node = %self.me(), activated = n, activate_ms = started.elapsed().as_millis() as u64, "rooms taken back and activated");
        self.enter(NodeState::Normal, reason).await;
        Ok(())
    }

    async fn maybe_auto_fallback(&mut self) {
        let after = if self.return_on_peer_start { Some(Duration::ZERO) } else { self.inner().config.auto_fallback_after };
        let Some(after) = after else { return };
        let Some(peer) = self.peer().cloned() else { return };
        let healthy = self.peer_status().is_some_and(|p| p.reachable && p.state == Some(NodeState::FailedOver));
        if !healthy {
            self.healthy_since = None;
            return;
        }
        let since = *self.healthy_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= after {
            self.healthy_since = None;
            if let Err(e) = self.fall_back(&peer, Reason::AutomaticFallback).await {
                tracing::warn!("automatic fallback not done: {e}");
            }
        }
    }

    /// On the backup: hand `peer`'s rooms back. Rooms finish their appends in flight, their
    /// occupants are told `moved`, then one statement gives them back with a new epoch.
    async fn fall_back(&mut self, peer: &PeerRef, reason: Reason) -> Result<String, String> {
        if self.state() != NodeState::RunningInBackupMode {
            return Err(format!("node {} is {}, not running_in_backup_mode: nothing to fall back", self.me(), self.state()));
        }
        let store = &self.inner().store;
        let peer_lease = lease::read(store, &peer.id).await.map_err(|e| e.to_string())?;
        if peer_lease.is_none_or(|l| l.expired) {
            return Err(format!("node {} is not running (its lease has expired): start it first", peer.id));
        }
        // The peer's recorded state (written before its heartbeats can tell).
        let recorded = fencing::last_state(store, &peer.id).await.map_err(|e| e.to_string())?.map(|(s, _, _)| s);
        match recorded.as_deref() {
            Some("failed_over") => {}
            Some("failed_over_critical_services_not_running") => {
                let down = self.peer_status().map(|p| p.services_down).unwrap_or_default();
                let named = if down.is_empty() { "a critical service".to_owned() } else { format!("its critical service {}", down.join(", ")) };
                let first = down.first().map_or("SERVICE", String::as_str);
                return Err(format!(
                    "node {} still has {named} down: start it first (stoa admin service start {first} {})",
                    peer.id, peer.id
                ));
            }
            other => return Err(format!("node {} is {}, not failed_over: it cannot take its rooms back now", peer.id, other.unwrap_or("unknown"))),
        }
        let started = Instant::now();
        self.enter(NodeState::FallingBack, reason).await;
        let inner = self.inner();
        inner.registry.block_home(&peer.id);
        let handed = inner.registry.hand_off(Some(&peer.id), &peer.client, Duration::from_secs(10)).await;
        let mut attempts = 0;
        let moved = loop {
            match fencing::return_home(store, &peer.id, self.me()).await {
                Ok(n) => break n,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    tracing::warn!(error = %e, "fallback statement failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    // The rooms never left: serve them here again.
                    inner.registry.unblock_home(&peer.id);
                    self.enter(NodeState::RunningInBackupMode, reason).await;
                    return Err(format!("fallback failed, the rooms stay on {}: {e}", self.me()));
                }
            }
        };
        inner.registry.unblock_home(&peer.id);
        self.return_on_peer_start = false;
        self.enter(NodeState::Normal, reason).await;
        let ms = started.elapsed().as_millis();
        metrics::counter!("stoa_ha_fallbacks_total").increment(1);
        Ok(format!("fell back: {moved} rooms returned to node {} ({handed} were active here) in {ms} ms", peer.id))
    }

    async fn admin(&mut self, request: Request) -> Result<Outcome, String> {
        let me = self.me().0.clone();
        let peer = self.peer().cloned();
        let is_peer = |node: &str| peer.as_ref().is_some_and(|p| p.id.0 == node);
        let forward = |command: PeerCommand| Ok(Outcome::Forward(command));
        match request {
            Request::Failover { node } if node == me => {
                if self.state() != NodeState::Normal {
                    return Err(format!("node {me} is {}; only a normal node can fail over", self.state()));
                }
                if self.peer_status().is_none_or(|p| !p.reachable) {
                    return Err(format!("node {me}'s peer is not reachable; failing over now would leave its rooms unserved"));
                }
                self.fail_over(Reason::OnAdminRequest).await;
                Ok(Outcome::Done(format!("node {me} is failing over to its peer")))
            }
            Request::Failover { node } if is_peer(&node) => forward(PeerCommand::Failover { node }),
            Request::Fallback { node } if is_peer(&node) => {
                let peer = peer.expect("is_peer");
                self.fall_back(&peer, Reason::OnAdminRequest).await.map(Outcome::Done)
            }
            Request::Fallback { node } if node == me => match self.state() {
                NodeState::FailedOver => forward(PeerCommand::Fallback { node }),
                NodeState::FailedOverCriticalServicesNotRunning => {
                    let down: Vec<&str> = self.r.services().iter().filter(|s| !s.running).map(|s| s.service.as_str()).collect();
                    Err(format!(
                        "node {me} still has its critical service {} down: start it first (stoa admin service start {} {me})",
                        down.join(", "),
                        down.first().copied().unwrap_or("SERVICE")
                    ))
                }
                s => Err(format!("node {me} is {s}, not failed over: nothing to fall back")),
            },
            Request::Service { node, service, start } if node == me => {
                self.set_service(service, start).await;
                Ok(Outcome::Done(format!("service {} on node {me} {}", service.as_str(), if start { "started" } else { "stopped" })))
            }
            Request::Service { node, service, start } if is_peer(&node) => {
                forward(PeerCommand::Service { node, service: service.as_str().to_owned(), start })
            }
            Request::Failover { node } | Request::Fallback { node } | Request::Service { node, .. } => {
                Err(format!("node {node} is neither this node ({me}) nor its peer"))
            }
        }
    }

    /// Stop or start a critical service. Stopping takes effect at once (rooms stop, logins are
    /// refused, or the lease stops being renewed); failover follows after the delay.
    async fn set_service(&mut self, service: Service, start: bool) {
        let inner = self.inner();
        inner.services.lock().expect("services lock")[service.index()].admin_stopped = !start;
        let hosting = self.state().hosts_rooms();
        match (service, start) {
            (Service::Rooms, false) => {
                inner.registry.set_hosting(false);
                let to = self.peer().map(|p| p.client.clone()).unwrap_or_default();
                inner.registry.hand_off(None, &to, Duration::from_secs(10)).await;
            }
            (Service::Rooms, true) => inner.registry.set_hosting(hosting),
            (Service::Router, false) => {
                inner.gateway.set_accepting(false);
                let to = self.peer().map(|p| p.client.clone());
                inner.gateway.goaway_all("the router service was stopped", to);
            }
            (Service::Router, true) => inner.gateway.set_accepting(hosting),
            // The lease task stops renewing; the write gate closes by itself.
            (Service::Store, _) => {}
        }
    }
}

/// Activate `rooms` on this node in bulk; returns how many were started.
async fn activate_all(registry: &RoomRegistry, rooms: Vec<String>) -> usize {
    let rooms = rooms.into_iter().map(crate::protocol::RoomAddr).collect();
    match registry.activate_many(rooms).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "bulk activation stopped early; the rest activate on first use");
            0
        }
    }
}
