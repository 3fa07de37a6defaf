//! Wasm plugins: sandboxed hooks on room events (docs/plugins.md).
//!
//! A plugin is a WebAssembly component for the WIT world `room-plugin` of a version of the
//! package `stoa:plugin` this host supports ([`WitVersion`]; each frozen in `wit/<version>/`).
//! The node compiles each one once (cached on disk by content hash and engine), links it with
//! the host module of the WIT version it was built for, keeps that
//! [`InstancePre`](wasmtime::component::InstancePre) ([`Pre`]) per loaded plugin version, and
//! instantiates it per room and plugin. Every instance is driven by its own worker task
//! ([`worker`]): one call at a time, fed by a bounded queue, owning its `Store`; rooms run their
//! workers on their own arbiter, which the guest gives back at every epoch tick.
//!
//! Limits of one call: a wall-clock deadline enforced by epoch interruption (one [`Ticker`]
//! thread per node, ticking only while a call runs; the guest yields to the executor on every
//! tick, so it never holds a runtime thread longer than a tick), a linear-memory cap, a stack cap, a host-call budget and a
//! maximum result size. WASI is linked with an empty context: no files, no network, no
//! environment, no clocks beyond `now`. A call that breaks a limit or traps is a *fault*: the
//! instance is dropped (re-instantiated for the next call), the fault is counted, and after
//! `fault_limit` faults within `fault_window_ms` the plugin is disabled until it is reloaded.
//! While faulting or disabled, the plugin's failure policy decides the event.
//!
//! - [`settings`]: the `[plugins]` section.
//! - [`cli`]: `stoa plugin ...` (through the admin API, whose routes are `admin::plugins`).
//! - [`v0_1`]: bindings and host imports of WIT `stoa:plugin@0.1.0`, and the conversions
//!   between its generated types and this module's [`Message`], [`Occupant`], [`Verdict`],
//!   [`Admission`] and [`RoomInfo`], which are all the room sees.
//! - [`instance`]: one instance in one store, with the limits applied to every call.
//! - [`worker`]: the per-room, per-plugin task and the decisions it hands rooms.

pub mod cli;
pub mod instance;
pub mod settings;
pub mod v0_1;
pub mod worker;

pub use settings::{EnabledPlugin, FailurePolicy, PluginSettings, canonical_name, valid_name};

use crate::ids::RoomAddr;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Errors of loading and managing plugins (calls fail with [`Fault`] instead).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The name is not `[a-z0-9_-]{1,64}`.
    #[error("`{0}` is not a valid plugin name (a-z, 0-9, - and _, at most 64 characters)")]
    BadName(String),
    /// No `<name>.wasm` in the plugin directory.
    #[error("plugin `{name}`: cannot read {path}: {source}")]
    Read { name: String, path: PathBuf, source: std::io::Error },
    /// The file is not a component of the `room-plugin` world of WIT package `wit` (a supported
    /// `stoa:plugin@<version>`, or just `stoa:plugin` when it is not a component at all).
    #[error("plugin `{name}` is not a valid {wit} component: {detail}")]
    Invalid { name: String, wit: &'static str, detail: String },
    /// The component was built for no WIT version this host supports: `found` names the
    /// packages it uses instead.
    #[error("plugin `{name}` is built for {found}, which this host does not run (supported: {})", supported())]
    Unsupported { name: String, found: String },
    /// No plugin of that name is loaded.
    #[error("no plugin `{0}` is loaded")]
    NotLoaded(String),
    /// The wasm engine could not be set up.
    #[error("wasm engine: {0}")]
    Engine(String),
}

/// Why one hook call failed. Every fault is counted against the plugin.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The call ran past `call_deadline_ms`.
    #[error("deadline of {0} ms exceeded")]
    Deadline(u64),
    /// The guest tried to grow its memory past `max_memory_bytes`.
    #[error("memory cap of {0} bytes exceeded")]
    Memory(u64),
    /// The guest made more than `max_host_calls` host calls.
    #[error("host-call budget of {0} exceeded")]
    HostCalls(u32),
    /// A returned string was over `max_result_bytes` (or not a valid body).
    #[error("result of {got} bytes over the limit of {limit}")]
    ResultTooLarge { got: usize, limit: usize },
    /// The guest trapped (unreachable, stack overflow, out-of-bounds access, ...).
    #[error("trap: {0}")]
    Trap(String),
    /// `init` returned an error or the component could not be instantiated.
    #[error("init failed: {0}")]
    Init(String),
}

impl Fault {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Deadline(_) => "deadline",
            Fault::Memory(_) => "memory",
            Fault::HostCalls(_) => "host_calls",
            Fault::ResultTooLarge { .. } => "result_size",
            Fault::Trap(_) => "trap",
            Fault::Init(_) => "init",
        }
    }
}



/// A message an occupant posts, as plugins see it before it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sender's user name.
    pub sender: String,
    /// The sender's nick in the room.
    pub nick: String,
    pub body: String,
    /// The client's message id (deduplication key).
    pub client_msg_id: String,
}

/// Someone entering or leaving a room.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Occupant {
    pub user: String,
    pub nick: String,
}

/// What becomes of a message: one plugin's answer to `on-message`, and the answer of a room's
/// whole chain of plugins (with the failure policy's where one failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Store and broadcast it as is.
    Accept,
    /// Refused with this reason (sent to the sender with code `rejected`); nothing is stored.
    Reject(String),
    /// Store and broadcast this body instead.
    Rewrite(String),
}

/// What becomes of a join: one plugin's answer to `on-join`, and the chain's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Allow,
    /// Refused with code `rejected` and this reason.
    Deny(String),
}

/// A room as a plugin's host imports see it: where `send` posts and what `room-info` reads.
pub trait RoomLink: Send + Sync {
    /// Queue `body` as a message from the plugin's bot (through the room's write path).
    fn send(&self, plugin: &str, body: String);
    /// The room's subject, last seq and occupants; `None` if the room is gone.
    fn info(&self) -> futures_util::future::BoxFuture<'static, Option<RoomInfo>>;
}

/// What [`RoomLink::info`] reports (a plugin's `room-info`).
#[derive(Clone, Debug, Default)]
pub struct RoomInfo {
    pub subject: String,
    /// Highest committed seq of the room log.
    pub last_seq: u64,
    /// Occupants present now, in order.
    pub occupants: Vec<Occupant>,
}

/// Per-call bookkeeping in the store, reset before every call.
#[derive(Debug, Default)]
pub struct CallState {
    pub started: Option<Instant>,
    pub deadline: Duration,
    pub deadline_hit: bool,
    pub host_calls: u32,
    pub max_host_calls: u32,
    pub host_calls_exceeded: bool,
}

/// Caps linear memory and remembers whether the cap was hit (the guest then traps with
/// `unreachable` when its allocator gives up, which alone would not say why).
#[derive(Debug)]
pub struct MemoryCap {
    pub max_bytes: u64,
    pub hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The data of one instance's `Store`.
pub struct PluginCtx {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) memory: MemoryCap,
    pub(crate) call: CallState,
    pub(crate) plugin: Arc<str>,
    pub(crate) room: RoomAddr,
    /// This plugin's state in this room (loaded from the store when the worker starts).
    pub(crate) state: HashMap<String, String>,
    /// Keys changed by the current call: `None` = deleted. Written after the call returns.
    pub(crate) dirty: HashMap<String, Option<String>>,
    pub(crate) link: Option<Arc<dyn RoomLink>>,
    pub(crate) max_body_bytes: usize,
}

impl WasiView for PluginCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl PluginCtx {
    /// Store data for plugin `plugin` serving `room`, with no WASI capabilities at all.
    pub fn new(plugin: Arc<str>, room: RoomAddr, limits: &PluginSettings, max_body_bytes: usize, link: Option<Arc<dyn RoomLink>>) -> Self {
        PluginCtx {
            // Empty: no preopened directories, no sockets, no environment or arguments,
            // stdin empty, stdout/stderr discarded.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            memory: MemoryCap { max_bytes: limits.max_memory_bytes, hit: false },
            call: CallState { max_host_calls: limits.max_host_calls, ..Default::default() },
            plugin,
            room,
            state: HashMap::new(),
            dirty: HashMap::new(),
            link,
            max_body_bytes,
        }
    }
}

/// One loaded version of a plugin, ready to instantiate.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    /// Bumped on every load/reload of any plugin: instances compare it before each call.
    pub generation: u64,
    pub pre: Pre,
    /// SHA-256 of the wasm bytes.
    pub digest: String,
    pub size: usize,
    pub path: PathBuf,
    /// Whether the compiled form came from the disk cache.
    pub cached: bool,
    /// The node's epoch ticker: a call holds it running ([`Ticker::hold`]).
    pub ticker: Ticker,
}

/// The epoch ticker: one thread per node that advances the engine's epoch every
/// `epoch_tick_ms` while at least one plugin call runs, and is parked otherwise, so a node with
/// no call in flight (or no plugin at all) has no thread waking up. Deadlines are counted from
/// each call's start, so a ticker that starts with the call measures them alike.
#[derive(Clone)]
pub struct Ticker {
    state: Arc<TickerState>,
    thread: std::thread::Thread,
}

struct TickerState {
    /// Calls in flight.
    calls: std::sync::atomic::AtomicUsize,
    stop: AtomicBool,
}

/// Keeps the ticker ticking while it lives: one per call in flight.
pub struct TickHold(Arc<TickerState>);

impl Drop for TickHold {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> std::io::Result<Ticker> {
        let state = Arc::new(TickerState { calls: Default::default(), stop: AtomicBool::new(false) });
        let shared = state.clone();
        let thread = std::thread::Builder::new().name("stoa-plugin-epoch".into()).spawn(move || {
            while !shared.stop.load(Ordering::Acquire) {
                if shared.calls.load(Ordering::Acquire) == 0 {
                    // Woken by the next call's hold (or by stop); a wake-up before the park
                    // makes it return at once.
                    std::thread::park();
                    continue;
                }
                std::thread::sleep(tick);
                engine.increment_epoch();
            }
        })?;
        Ok(Ticker { state, thread: thread.thread().clone() })
    }

    /// Tick until the returned hold is dropped.
    pub fn hold(&self) -> TickHold {
        if self.state.calls.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        TickHold(self.state.clone())
    }

    /// Whether the ticker is ticking (a call is in flight).
    pub fn ticking(&self) -> bool {
        self.state.calls.load(Ordering::Acquire) > 0
    }

    fn stop(&self) {
        self.state.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// A version of WIT package `stoa:plugin` this host runs components of. Each has a frozen
/// folder (`wit/0.1.0/`), a host module (`v0_1`), a linker, and a case of [`Pre`] and [`Hooks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitVersion {
    V0_1,
}

impl WitVersion {
    /// Every supported version, oldest first.
    pub const ALL: [WitVersion; 1] = [WitVersion::V0_1];

    /// The package with its version, as component import names carry it (`stoa:plugin@0.1.0`).
    pub fn package(self) -> &'static str {
        match self {
            WitVersion::V0_1 => v0_1::PACKAGE,
        }
    }
}

/// The supported packages, for messages: `stoa:plugin@0.1.0, ...`.
pub fn supported() -> String {
    WitVersion::ALL.map(WitVersion::package).join(", ")
}

/// A component pre-linked against the host module of the WIT version it was built for.
pub enum Pre {
    V0_1(v0_1::RoomPluginPre<PluginCtx>),
}

impl Pre {
    /// The engine it was compiled for.
    pub fn engine(&self) -> &Engine {
        match self {
            Pre::V0_1(pre) => pre.engine(),
        }
    }

    /// A new instance in `store` (whose room and plugin the hooks are told).
    pub async fn instantiate(&self, store: &mut Store<PluginCtx>) -> wasmtime::Result<Hooks> {
        match self {
            Pre::V0_1(pre) => Ok(Hooks::V0_1(v0_1::Hooks::instantiate(pre, store).await?)),
        }
    }
}

/// The hooks of one instance, called through the bindings of its WIT version: they take and
/// give this module's types, whatever the version.
pub enum Hooks {
    V0_1(v0_1::Hooks),
}

impl Hooks {
    /// `init(config)`: `Err` is the plugin refusing its config.
    pub async fn init(&self, store: &mut Store<PluginCtx>, config: &str) -> wasmtime::Result<Result<(), String>> {
        match self {
            Hooks::V0_1(hooks) => hooks.init(store, config).await,
        }
    }

    /// `on-message`; `message` comes back unchanged.
    pub async fn on_message(&self, store: &mut Store<PluginCtx>, message: &mut Message) -> wasmtime::Result<Verdict> {
        match self {
            Hooks::V0_1(hooks) => hooks.on_message(store, message).await,
        }
    }

    /// `on-join`.
    pub async fn on_join(&self, store: &mut Store<PluginCtx>, occupant: &Occupant) -> wasmtime::Result<Admission> {
        match self {
            Hooks::V0_1(hooks) => hooks.on_join(store, occupant).await,
        }
    }

    /// `on-leave`.
    pub async fn on_leave(&self, store: &mut Store<PluginCtx>, occupant: &Occupant) -> wasmtime::Result<()> {
        match self {
            Hooks::V0_1(hooks) => hooks.on_leave(store, occupant).await,
        }
    }

    /// `on-room-created`.
    pub async fn on_room_created(&self, store: &mut Store<PluginCtx>) -> wasmtime::Result<()> {
        match self {
            Hooks::V0_1(hooks) => hooks.on_room_created(store).await,
        }
    }

    /// `on-config-changed` with the room's public config as JSON.
    pub async fn on_config_changed(&self, store: &mut Store<PluginCtx>, config: &str) -> wasmtime::Result<()> {
        match self {
            Hooks::V0_1(hooks) => hooks.on_config_changed(store, config).await,
        }
    }
}

/// One linker per supported WIT version, each with WASI and that version's host imports.
struct Linkers {
    v0_1: Linker<PluginCtx>,
}

impl Linkers {
    fn new(engine: &Engine) -> Result<Linkers, PluginError> {
        let linker = |add: fn(&mut Linker<PluginCtx>) -> wasmtime::Result<()>| {
            let mut linker = Linker::new(engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| PluginError::Engine(format!("linking WASI: {e:#}")))?;
            add(&mut linker).map_err(|e| PluginError::Engine(format!("linking the host API: {e:#}")))?;
            Ok::<_, PluginError>(linker)
        };
        Ok(Linkers { v0_1: linker(v0_1::add_to_linker)? })
    }

    /// Pre-link `component` of plugin `name` with the host module of the WIT version it was
    /// built for (the `stoa:plugin` package its imports and exports name).
    fn pre(&self, name: &str, engine: &Engine, component: &Component) -> Result<Pre, PluginError> {
        let packages = wit_packages(engine, component);
        let Some(version) = WitVersion::ALL.into_iter().find(|v| packages.contains(v.package())) else {
            let found = if packages.is_empty() { "no WIT package but WASI".to_owned() } else { Vec::from_iter(packages).join(", ") };
            return Err(PluginError::Unsupported { name: name.into(), found });
        };
        let invalid = |e: wasmtime::Error| PluginError::Invalid { name: name.into(), wit: version.package(), detail: format!("{e:#}") };
        match version {
            WitVersion::V0_1 => {
                let pre = self.v0_1.instantiate_pre(component).map_err(invalid)?;
                Ok(Pre::V0_1(v0_1::RoomPluginPre::new(pre).map_err(invalid)?))
            }
        }
    }
}

/// The WIT packages (`namespace:name@version`) that `component`'s imports and exports are
/// interfaces of, but WASI's (every version links WASI): `stoa:plugin/host@0.1.0` is package
/// `stoa:plugin@0.1.0`; plain function names such as `on-message` name none.
fn wit_packages(engine: &Engine, component: &Component) -> std::collections::BTreeSet<String> {
    let ty = component.component_type();
    let names = ty.imports(engine).map(|(name, _)| name).chain(ty.exports(engine).map(|(name, _)| name));
    names
        .filter_map(|name| {
            let (package, rest) = name.split_once('/')?;
            let version = rest.split_once('@').map(|(_, v)| v);
            Some(match version {
                Some(v) => format!("{package}@{v}"),
                None => package.to_owned(),
            })
        })
        .filter(|package| !package.starts_with("wasi:"))
        .collect()
}

/// A loaded plugin's bookkeeping.
struct Entry {
    loaded: Arc<LoadedPlugin>,
    fault_total: u64,
    last_fault: Option<String>,
    /// Fault windows of the rooms it faulted in lately: faults count per room, so a room can
    /// only disable the plugin for itself (say, with a config its `init` refuses).
    rooms: HashMap<RoomAddr, RoomFaults>,
    calls: Arc<AtomicU64>,
}

#[derive(Default)]
struct RoomFaults {
    recent: VecDeque<Instant>,
    /// Why the plugin is disabled in this room, if it is.
    disabled: Option<String>,
}

/// Rooms with fault windows kept per plugin before windows with nothing recent are dropped.
const MAX_FAULT_WINDOWS: usize = 10_000;

/// A room where a plugin is disabled, as the admin API lists it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DisabledIn {
    pub room: String,
    pub reason: String,
}

/// How many rooms a plugin summary lists by name in `disabled_in`.
const MAX_LISTED_DISABLED: usize = 100;

/// What a worker needs to know about its plugin before a call.
#[derive(Clone)]
pub enum Lookup {
    /// Not loaded (never, or unloaded): the hook is skipped.
    Missing,
    /// Disabled in this room after repeated faults there: the failure policy decides.
    Disabled(FailurePolicy),
    /// Serve the call with this version.
    Ready(Arc<LoadedPlugin>, FailurePolicy, Arc<AtomicU64>),
}

/// A plugin as `stoa plugin list` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PluginSummary {
    pub name: String,
    pub generation: u64,
    pub digest: String,
    pub size: usize,
    pub path: String,
    pub cached: bool,
    pub policy: FailurePolicy,
    pub calls: u64,
    pub faults: u64,
    /// Faults within the fault window, over every room.
    pub recent_faults: usize,
    pub last_fault: Option<String>,
    /// How many rooms the plugin is disabled in (after `fault_limit` faults there).
    pub disabled_rooms: usize,
    /// Up to 100 of those rooms, with why.
    pub disabled_in: Vec<DisabledIn>,
}

struct HostInner {
    engine: Engine,
    linkers: Linkers,
    settings: PluginSettings,
    dir: PathBuf,
    cache_dir: PathBuf,
    max_body_bytes: usize,
    plugins: RwLock<HashMap<String, Entry>>,
    generation: AtomicU64,
    ticker: Ticker,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// The node's plugin host: engine, epoch ticker, loaded plugins and their fault windows.
/// Cheap to clone.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<HostInner>,
}

/// The engine configuration every plugin is compiled for.
fn engine_config(settings: &PluginSettings) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.max_wasm_stack(settings.max_stack_bytes);
    // Fibers run the guest; their stack must hold the wasm stack plus host frames.
    config.async_stack_size(settings.max_stack_bytes + (1 << 20));
    config
}

impl PluginHost {
    /// A host for plugins under `settings` (dirs already resolved against the data dir).
    /// Starts the epoch ticker thread (parked until a call runs); it stops when the last clone
    /// is dropped.
    pub fn new(settings: PluginSettings, dir: PathBuf, cache_dir: PathBuf, max_body_bytes: usize) -> Result<PluginHost, PluginError> {
        settings.check().map_err(PluginError::Engine)?;
        let engine = Engine::new(&engine_config(&settings)).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let linkers = Linkers::new(&engine)?;
        let ticker = Ticker::start(engine.clone(), Duration::from_millis(settings.epoch_tick_ms))
            .map_err(|e| PluginError::Engine(format!("starting the epoch ticker: {e}")))?;
        Ok(PluginHost {
            inner: Arc::new(HostInner {
                engine,
                linkers,
                settings,
                dir,
                cache_dir,
                max_body_bytes,
                plugins: RwLock::new(HashMap::new()),
                generation: AtomicU64::new(0),
                ticker,
            }),
        })
    }

    /// The host for a node with data directory `data_dir`: the plugin dirs default to
    /// `{data_dir}/plugins` and `{data_dir}/plugin-cache`; every `*.wasm` in the plugin
    /// directory is loaded (failures are logged, not fatal). Bot messages are at most
    /// `max_body_bytes` (`limits.max_body_bytes`).
    pub fn for_node(p: &PluginSettings, data_dir: &Path, max_body_bytes: usize) -> Result<PluginHost, PluginError> {
        let or_data = |dir: &Path, default: &str| if dir.as_os_str().is_empty() { data_dir.join(default) } else { dir.to_path_buf() };
        let host = PluginHost::new(p.clone(), or_data(&p.dir, "plugins"), or_data(&p.cache_dir, "plugin-cache"), max_body_bytes)?;
        // The directory is made if missing, so `stoa plugin load` has a place to look.
        if let Err(e) = std::fs::create_dir_all(&host.inner.dir) {
            tracing::warn!(dir = %host.inner.dir.display(), error = %e, "cannot create the plugin directory");
        }
        let mut names: Vec<String> = match std::fs::read_dir(&host.inner.dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".wasm")).map(str::to_owned))
                .filter(|n| valid_name(n))
                .map(|n| canonical_name(&n))
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names.dedup();
        for name in names {
            match host.load(&name) {
                Ok(s) => tracing::info!(plugin = %name, digest = %&s.digest[..12], cached = s.cached, "plugin loaded"),
                Err(e) => tracing::warn!(plugin = %name, error = %e, "plugin not loaded"),
            }
        }
        for p in &p.enabled {
            if !host.is_loaded(&p.name) {
                tracing::warn!(plugin = %p.name, dir = %host.inner.dir.display(), "plugin enabled on every room but not loaded");
            }
        }
        Ok(host)
    }

    /// The limits every call runs under.
    pub fn settings(&self) -> &PluginSettings {
        &self.inner.settings
    }

    /// Largest message body (what a rewrite and a bot message may be).
    pub fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    /// The plugins every room runs, before its own.
    pub fn enabled_everywhere(&self) -> &[EnabledPlugin] {
        &self.inner.settings.enabled
    }

    /// The directory `load` reads `<name>.wasm` from.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The wasm engine (for benches and tests that drive an instance directly).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The node's epoch ticker.
    pub fn ticker(&self) -> &Ticker {
        &self.inner.ticker
    }

    fn plugins_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.inner.plugins.read().expect("plugin table lock poisoned")
    }

    fn plugins_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.inner.plugins.write().expect("plugin table lock poisoned")
    }

    /// Is a plugin of this name loaded?
    pub fn is_loaded(&self, name: &str) -> bool {
        self.plugins_read().contains_key(&canonical_name(name))
    }

    /// Compile a component (or take it from the disk cache) and pre-link it.
    fn compile(&self, name: &str, path: &Path) -> Result<LoadedPlugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read { name: name.into(), path: path.to_path_buf(), source })?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.inner.engine.precompile_compatibility_hash().hash(&mut engine_hash);
        let cache_file = self.inner.cache_dir.join(format!("{}-{:016x}.cwasm", &digest[..32], engine_hash.finish()));
        let invalid = |e: wasmtime::Error| PluginError::Invalid { name: name.into(), wit: "stoa:plugin", detail: format!("{e:#}") };
        // SAFETY: the cache directory is this node's own; a file there was written by
        // `Component::serialize` of an engine with the same compatibility hash (it is in the
        // file name), and wasmtime re-checks version and settings on load.
        let cached = cache_file.exists().then(|| unsafe { Component::deserialize_file(&self.inner.engine, &cache_file) }).and_then(Result::ok);
        let was_cached = cached.is_some();
        let component = match cached {
            Some(c) => c,
            None => {
                let started = Instant::now();
                let c = Component::new(&self.inner.engine, &bytes).map_err(invalid)?;
                tracing::info!(plugin = name, ms = started.elapsed().as_millis() as u64, "plugin compiled");
                if let Ok(serialized) = c.serialize() {
                    let tmp = cache_file.with_extension(format!("tmp{}", std::process::id()));
                    let written = std::fs::create_dir_all(&self.inner.cache_dir)
                        .and_then(|_| std::fs::write(&tmp, serialized))
                        .and_then(|_| std::fs::rename(&tmp, &cache_file));
                    if let Err(e) = written {
                        tracing::warn!(plugin = name, error = %e, "could not cache the compiled plugin");
                    }
                }
                c
            }
        };
        let pre = self.inner.linkers.pre(name, &self.inner.engine, &component)?;
        Ok(LoadedPlugin {
            name: name.into(),
            generation: self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1,
            pre,
            digest,
            size: bytes.len(),
            path: path.to_path_buf(),
            cached: was_cached,
            ticker: self.inner.ticker.clone(),
        })
    }

    /// Load (or reload) `<dir>/<name>.wasm`. A reload swaps the component for the next call of
    /// every instance (each re-instantiates and re-runs `init`); queued calls are not lost.
    /// It also clears the fault window and re-enables a disabled plugin.
    pub fn load(&self, name: &str) -> Result<PluginSummary, PluginError> {
        if !valid_name(name) {
            return Err(PluginError::BadName(name.into()));
        }
        let name = canonical_name(name);
        // `word-filter.wasm`, or `word_filter.wasm` as cargo names the build of `word-filter`.
        let path = self.inner.dir.join(format!("{name}.wasm"));
        let underscored = self.inner.dir.join(format!("{}.wasm", name.replace('-', "_")));
        let path = if !path.exists() && underscored.exists() { underscored } else { path };
        let loaded = Arc::new(self.compile(&name, &path)?);
        let mut plugins = self.plugins_write();
        let calls = plugins.get(&name).map(|e| e.calls.clone()).unwrap_or_default();
        let fault_total = plugins.get(&name).map_or(0, |e| e.fault_total);
        plugins.insert(name.clone(), Entry { loaded, fault_total, last_fault: None, rooms: HashMap::new(), calls });
        metrics::gauge!("stoa_plugin_disabled", "plugin" => name.clone()).set(0.0);
        let summary = self.summary(&name, &plugins[&name]);
        drop(plugins);
        Ok(summary)
    }

    /// Forget a plugin: rooms skip its hooks from their next event on.
    pub fn unload(&self, name: &str) -> Result<(), PluginError> {
        match self.plugins_write().remove(&canonical_name(name)) {
            Some(_) => Ok(()),
            None => Err(PluginError::NotLoaded(name.into())),
        }
    }

    /// Would a room run plugin `name` with `config`? A throwaway instance runs `init(config)`
    /// under the usual limits (no state, nothing stored, no fault counted); `Err` says why
    /// not: the plugin is not loaded, its `init` refused the config, or it faulted.
    pub async fn check_config(&self, name: &str, room: &RoomAddr, config: &str) -> Result<(), String> {
        let loaded = match self.plugins_read().get(&canonical_name(name)) {
            Some(e) => e.loaded.clone(),
            None => return Err(format!("plugin `{name}` is not loaded on this node")),
        };
        let ctx = PluginCtx::new(loaded.name.clone(), room.clone(), &self.inner.settings, self.inner.max_body_bytes, None);
        match instance::PluginInstance::start(&loaded, ctx, config, &self.inner.settings).await {
            Ok(_) => Ok(()),
            Err(Fault::Init(reason)) => Err(format!("plugin `{name}` refused its config: {reason}")),
            Err(fault) => Err(format!("plugin `{name}` could not start with its config: {fault}")),
        }
    }

    fn summary(&self, name: &str, e: &Entry) -> PluginSummary {
        PluginSummary {
            name: name.into(),
            generation: e.loaded.generation,
            digest: e.loaded.digest.clone(),
            size: e.loaded.size,
            path: e.loaded.path.display().to_string(),
            cached: e.loaded.cached,
            policy: self.inner.settings.policy(name),
            calls: e.calls.load(Ordering::Relaxed),
            faults: e.fault_total,
            recent_faults: e.rooms.values().map(|r| r.recent.len()).sum(),
            last_fault: e.last_fault.clone(),
            disabled_rooms: e.rooms.values().filter(|r| r.disabled.is_some()).count(),
            disabled_in: {
                let mut rooms: Vec<DisabledIn> = e
                    .rooms
                    .iter()
                    .filter_map(|(room, r)| r.disabled.as_ref().map(|why| DisabledIn { room: room.0.clone(), reason: why.clone() }))
                    .collect();
                rooms.sort_by(|a, b| a.room.cmp(&b.room));
                rooms.truncate(MAX_LISTED_DISABLED);
                rooms
            },
        }
    }

    /// Every loaded plugin, by name.
    pub fn list(&self) -> Vec<PluginSummary> {
        let plugins = self.plugins_read();
        let mut out: Vec<PluginSummary> = plugins.iter().map(|(n, e)| self.summary(n, e)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One plugin's summary.
    pub fn get(&self, name: &str) -> Option<PluginSummary> {
        let name = canonical_name(name);
        self.plugins_read().get(&name).map(|e| self.summary(&name, e))
    }

    /// What a worker of plugin `name` in `room` should do with its next call.
    pub fn lookup(&self, name: &str, room: &RoomAddr) -> Lookup {
        let name = canonical_name(name);
        let policy = self.inner.settings.policy(&name);
        match self.plugins_read().get(&name) {
            None => Lookup::Missing,
            Some(e) if e.rooms.get(room).is_some_and(|r| r.disabled.is_some()) => Lookup::Disabled(policy),
            Some(e) => Lookup::Ready(e.loaded.clone(), policy, e.calls.clone()),
        }
    }

    /// Forget `room`'s faults of plugin `name` (the room's config for it changed), enabling
    /// it there again.
    pub fn clear_room_faults(&self, name: &str, room: &RoomAddr) {
        let name = canonical_name(name);
        let mut plugins = self.plugins_write();
        let Some(entry) = plugins.get_mut(&name) else { return };
        if entry.rooms.remove(room).is_some_and(|r| r.disabled.is_some()) {
            tracing::info!(plugin = %name, room = %room, "plugin enabled again in this room: its config changed");
            let disabled = entry.rooms.values().filter(|r| r.disabled.is_some()).count();
            metrics::gauge!("stoa_plugin_disabled", "plugin" => name.clone()).set(disabled as f64);
        }
    }

    /// Count a fault of plugin `name` in `room`; disables the plugin *in that room* when the
    /// room's window is full. Faults of an older generation (before a reload) still count.
    pub fn record_fault(&self, name: &str, room: &RoomAddr, fault: &Fault) {
        let name = canonical_name(name);
        metrics::counter!("stoa_plugin_faults_total", "plugin" => name.clone(), "kind" => fault.kind()).increment(1);
        let window = Duration::from_millis(self.inner.settings.fault_window_ms);
        let limit = self.inner.settings.fault_limit as usize;
        let mut plugins = self.plugins_write();
        let Some(entry) = plugins.get_mut(&name) else { return };
        let now = Instant::now();
        entry.fault_total += 1;
        entry.last_fault = Some(format!("{fault} (room {room})"));
        let fresh = |r: &mut RoomFaults| {
            while r.recent.front().is_some_and(|t| now.duration_since(*t) > window) {
                r.recent.pop_front();
            }
        };
        if entry.rooms.len() >= MAX_FAULT_WINDOWS && !entry.rooms.contains_key(room) {
            entry.rooms.retain(|_, r| {
                fresh(r);
                r.disabled.is_some() || !r.recent.is_empty()
            });
        }
        let faults = entry.rooms.entry(room.clone()).or_default();
        faults.recent.push_back(now);
        fresh(faults);
        tracing::warn!(plugin = %name, room = %room, fault = %fault, recent = faults.recent.len(), "plugin fault");
        if faults.disabled.is_none() && faults.recent.len() >= limit {
            let why = format!("{} faults within {} ms; last: {fault}", faults.recent.len(), window.as_millis());
            tracing::error!(plugin = %name, room = %room, reason = %why, "plugin disabled in this room until it is reloaded");
            faults.disabled = Some(why);
            let disabled = entry.rooms.values().filter(|r| r.disabled.is_some()).count();
            metrics::gauge!("stoa_plugin_disabled", "plugin" => name.clone()).set(disabled as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dir: &Path) -> PluginHost {
        PluginHost::new(PluginSettings::default(), dir.to_path_buf(), dir.join("cache"), 16 * 1024).expect("plugin host")
    }

    /// Threads of this process named `stoa-plugin-epoch`, with their voluntary context switches.
    fn epoch_threads() -> HashMap<String, u64> {
        let mut found = HashMap::new();
        for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
            let path = task.path();
            // The kernel keeps 15 bytes of a thread name.
            if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == &"stoa-plugin-epoch"[..15]) {
                let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
                let switches = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).and_then(|v| v.trim().parse().ok());
                found.insert(task.file_name().to_string_lossy().into_owned(), switches.unwrap_or(0));
            }
        }
        found
    }

    #[test]
    fn the_epoch_ticker_sleeps_while_no_call_runs() {
        let before = epoch_threads();
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        std::thread::sleep(Duration::from_millis(50));
        let tid = epoch_threads().into_keys().find(|t| !before.contains_key(t)).expect("the new host's ticker thread");
        let switches = || epoch_threads().get(&tid).copied().expect("ticker thread alive");
        let idle = switches();
        std::thread::sleep(Duration::from_millis(300));
        assert!(switches() <= idle + 1, "an idle ticker must stay parked (a 5 ms tick would wake it ~60 times)");
        assert!(!host.ticker().ticking());
        let hold = host.ticker().hold();
        assert!(host.ticker().ticking());
        let running = switches();
        std::thread::sleep(Duration::from_millis(300));
        assert!(switches() >= running + 10, "a ticker held by a call ticks every epoch_tick_ms");
        drop(hold);
        assert!(!host.ticker().ticking());
    }

    #[test]
    fn plugin_names_are_file_safe() {
        for ok in ["noop", "word-filter", "rate_limit", "a1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Word", "a.b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    /// Missing files, files that are not components and bad names get distinct errors, and
    /// nothing is registered.
    #[test]
    fn bad_loads_are_refused_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        assert!(matches!(host.load("absent"), Err(PluginError::Read { .. })));
        std::fs::write(dir.path().join("junk.wasm"), b"\0asm\x0d\0\x01\0garbage").unwrap();
        let err = host.load("junk").unwrap_err();
        assert!(matches!(err, PluginError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("not a valid stoa:plugin component"), "{err}");
        assert!(matches!(host.load("../etc/passwd"), Err(PluginError::BadName(_))));
        assert!(matches!(host.unload("junk"), Err(PluginError::NotLoaded(_))));
        assert!(host.list().is_empty());
        assert!(matches!(host.lookup("junk", &RoomAddr("r@conference.localhost".into())), Lookup::Missing));
    }

    /// A component that imports one instance named `import`, with nothing in it. Component
    /// binary format: the preamble, a type section with one empty instance type, an import
    /// section with `import` of that type.
    fn component_importing(import: &str) -> Vec<u8> {
        assert!(import.len() < 100, "lengths here are one-byte LEB128");
        let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
        // Section 7 (types), 3 bytes: one type, an instance type (0x42) with no declarations.
        bytes.extend([7, 3, 1, 0x42, 0]);
        // Section 10 (imports): one import, a plain name (0x00), its length and bytes, and an
        // instance (0x05) of type 0.
        let name = import.as_bytes();
        bytes.extend([10, name.len() as u8 + 5, 1, 0, name.len() as u8]);
        bytes.extend(name);
        bytes.extend([5, 0]);
        bytes
    }

    /// A component built for a WIT version the host does not run, or for another package
    /// altogether, is refused at load by the dispatcher, with an error (the admin API's
    /// `plugin load` answer) naming what it is built for and the versions this host supports.
    #[test]
    fn components_of_unsupported_wit_versions_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        let cases = [
            ("future", "stoa:plugin/host@0.2.0", "is built for stoa:plugin@0.2.0, which this host does not run (supported: stoa:plugin@0.1.0)"),
            ("other", "acme:chat/hooks@1.0.0", "is built for acme:chat@1.0.0, which this host does not run (supported: stoa:plugin@0.1.0)"),
            ("bare", "wasi:io/error@0.2.6", "is built for no WIT package but WASI, which this host does not run (supported: stoa:plugin@0.1.0)"),
        ];
        for (name, import, why) in cases {
            std::fs::write(dir.path().join(format!("{name}.wasm")), component_importing(import)).unwrap();
            let err = host.load(name).unwrap_err();
            assert!(matches!(err, PluginError::Unsupported { .. }), "{name}: {err}");
            assert_eq!(err.to_string(), format!("plugin `{name}` {why}"));
        }
        // A component that names the supported version is linked by that version's host
        // module, which says what does not fit (here: it exports no hooks).
        std::fs::write(dir.path().join("hollow.wasm"), component_importing("stoa:plugin/host@0.1.0")).unwrap();
        let err = host.load("hollow").unwrap_err();
        assert!(matches!(err, PluginError::Invalid { wit: "stoa:plugin@0.1.0", .. }), "{err}");
        assert!(err.to_string().starts_with("plugin `hollow` is not a valid stoa:plugin@0.1.0 component: "), "{err}");
        assert!(host.list().is_empty());
    }

    #[test]
    fn limits_that_cannot_work_are_refused() {
        let mut s = PluginSettings { epoch_tick_ms: 200, ..PluginSettings::default() };
        assert!(s.check().is_err(), "a tick longer than the deadline");
        s.epoch_tick_ms = 5;
        s.check().unwrap();
        s.enabled.push(EnabledPlugin { name: "Not Valid".into(), config: serde_json::json!({}) });
        assert!(s.check().unwrap_err().contains("Not Valid"));
        let s = PluginSettings { policies: [("strict".to_owned(), FailurePolicy::FailClosed)].into(), ..PluginSettings::default() };
        assert_eq!(s.policy("strict"), FailurePolicy::FailClosed);
        assert_eq!(s.policy("other"), FailurePolicy::FailOpen);
    }
}
