//! The worker of one plugin in one room: a task that owns the instance's `Store` and serves
//! its queue one call at a time.
//!
//! The worker re-instantiates after a fault and whenever the plugin was reloaded (a new
//! generation), runs `init` with the room's config for the plugin, keeps the plugin's state
//! for the room (loaded from the store once, written back fenced after each call that changed
//! it), and turns every outcome into a decision the room applies: the plugin's verdict, or
//! what the failure policy says when the plugin faulted, is disabled, or is overloaded.

use super::instance::PluginInstance;
use super::{Admission, FailurePolicy, Lookup, Message, Occupant, PluginCtx, PluginHost, RoomLink, Verdict};
use crate::ids::RoomAddr;
use crate::store::{Fence, Store};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Where a worker's instance lives: its room, and where its state is stored.
pub struct Attachment {
    pub room: RoomAddr,
    /// The room's store and fence (the room incarnation's). `None` keeps state in memory only
    /// (benchmarks).
    pub store: Option<(Store, Fence)>,
    pub link: Option<Arc<dyn RoomLink>>,
    /// Where state reads and writes run (the node's I/O runtime) when the worker itself runs
    /// on a room's arbiter; `None` = in the worker's own task.
    pub io: Option<tokio::runtime::Handle>,
}

/// Where a worker task runs.
pub enum Runner<'a> {
    /// On this runtime (benchmarks, tools).
    Runtime(&'a tokio::runtime::Handle),
    /// On the current actix arbiter, beside the room that owns it: no thread hop per call.
    /// The guest yields to the arbiter every epoch tick, so other rooms of the arbiter keep
    /// being served while it runs (a plugin holds the thread at most one tick at a time).
    CurrentArbiter,
}

enum Call {
    /// `chain[next..]` are the plugins after this one in the room's chain: the worker hands the
    /// message on to the next one itself, so every plugin sees a room's messages in arrival order.
    Message { message: Message, rewritten: bool, chain: Chain, next: usize, reply: DecisionTo },
    Join { occupant: Occupant, reply: oneshot::Sender<Admission> },
    Leave { occupant: Occupant },
    RoomCreated,
    ConfigChanged { config: String },
}

impl Call {
    fn hook_index(&self) -> usize {
        match self {
            Call::Message { .. } => 0,
            Call::Join { .. } => 1,
            Call::Leave { .. } => 2,
            Call::RoomCreated => 3,
            Call::ConfigChanged { .. } => 4,
        }
    }

    /// Answer without running the plugin: `None` = as if it were not there.
    fn answer_without(self, name: &str, failed: Option<(FailurePolicy, String)>) {
        let closed = failed.filter(|(p, _)| *p == FailurePolicy::FailClosed).map(|(_, why)| why);
        match self {
            Call::Message { message, rewritten, chain, next, reply } => match closed {
                None => pass_on(message, rewritten, chain, next, reply),
                Some(why) => {
                    reply.send(Verdict::Reject(format!("plugin `{name}` could not check this message ({why})")));
                }
            },
            Call::Join { reply, .. } => {
                let _ = reply.send(match closed {
                    None => Admission::Allow,
                    Some(why) => Admission::Deny(format!("plugin `{name}` could not check this join ({why})")),
                });
            }
            _ => {}
        }
    }
}

/// A room's handle on one plugin's worker. Dropping every clone ends the worker.
#[derive(Clone)]
pub struct PluginHandle {
    pub name: Arc<str>,
    /// The JSON config the instance is initialised with.
    pub config: String,
    host: PluginHost,
    tx: mpsc::Sender<Call>,
}

impl PluginHandle {
    fn enqueue(&self, call: Call) {
        match self.tx.try_send(call) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(call)) => {
                metrics::counter!("stoa_plugin_overloaded_total", "plugin" => self.name.to_string()).increment(1);
                let policy = self.host.settings().policy(&self.name);
                call.answer_without(&self.name, Some((policy, "its queue is full".into())));
            }
            Err(mpsc::error::TrySendError::Closed(call)) => {
                let policy = self.host.settings().policy(&self.name);
                call.answer_without(&self.name, Some((policy, "its worker stopped".into())));
            }
        }
    }

    /// Run `on-message` through a room's chain of plugins (`chain[0]` first). The message is
    /// queued at once, so calls made in arrival order are served in arrival order by every
    /// plugin of the chain; the decision comes when the last plugin is done or one rejects.
    pub fn run_chain(chain: &Chain, message: Message) -> impl Future<Output = Verdict> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        pass_on(message, false, chain.clone(), 0, DecisionTo::Oneshot(reply));
        async move { rx.await.unwrap_or(Verdict::Accept) }
    }

    /// Run `on-join`.
    pub fn on_join(&self, occupant: Occupant) -> impl Future<Output = Admission> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        self.enqueue(Call::Join { occupant, reply });
        async move { rx.await.unwrap_or(Admission::Allow) }
    }

    /// Queue `on-leave` (nobody waits for it).
    pub fn on_leave(&self, occupant: Occupant) {
        self.enqueue(Call::Leave { occupant });
    }

    /// Queue `on-room-created`.
    pub fn on_room_created(&self) {
        self.enqueue(Call::RoomCreated);
    }

    /// Queue `on-config-changed`.
    pub fn on_config_changed(&self, config: String) {
        self.enqueue(Call::ConfigChanged { config });
    }
}

/// Hand a message to the next plugin of its chain, or answer if none is left.
fn pass_on(message: Message, rewritten: bool, chain: Chain, next: usize, reply: DecisionTo) {
    let Some(handle) = chain.get(next) else {
        reply.send(if rewritten { Verdict::Rewrite(message.body) } else { Verdict::Accept });
        return;
    };
    handle.enqueue(Call::Message { message, rewritten, chain: chain.clone(), next: next + 1, reply });
}

/// Where the decision on a message goes.
pub enum DecisionTo {
    /// To one waiting future.
    Oneshot(oneshot::Sender<Verdict>),
    /// To the room's one stream of decisions, tagged with the post's ticket: a room with many
    /// posts in its plugins then has one stream in its actor context, not one future per post.
    Room { ticket: u64, decisions: mpsc::UnboundedSender<(u64, Verdict)> },
}

impl DecisionTo {
    fn send(self, decision: Verdict) {
        match self {
            DecisionTo::Oneshot(tx) => {
                let _ = tx.send(decision);
            }
            DecisionTo::Room { ticket, decisions } => {
                let _ = decisions.send((ticket, decision));
            }
        }
    }
}

/// Start a message through `chain`; its decision goes to `to`.
pub fn start_chain(chain: &Chain, message: Message, to: DecisionTo) {
    pass_on(message, false, chain.clone(), 0, to);
}

/// A room's plugins in order, shared by every message on its way through them.
pub type Chain = Arc<[PluginHandle]>;

/// Start the worker of plugin `name` for a room, on runtime `rt`.
pub fn spawn(host: &PluginHost, name: &str, config: String, attachment: Attachment, runner: Runner<'_>) -> PluginHandle {
    let (tx, rx) = mpsc::channel(host.settings().queue_depth);
    let name: Arc<str> = name.into();
    // Metric handles resolved once per worker, not per call.
    let counter = |hook: &'static str| metrics::counter!("stoa_plugin_calls_total", "plugin" => name.to_string(), "hook" => hook);
    let metrics = WorkerMetrics {
        calls: [counter("on_message"), counter("on_join"), counter("on_leave"), counter("on_room_created"), counter("on_config_changed")],
        seconds: metrics::histogram!("stoa_plugin_call_seconds", "plugin" => name.to_string()),
    };
    let worker = Worker {
        host: host.clone(),
        name: name.clone(),
        config: config.clone(),
        attachment,
        state: None,
        instance: None,
        metrics,
    };
    match runner {
        Runner::Runtime(rt) => drop(rt.spawn(worker.run(rx))),
        Runner::CurrentArbiter => drop(actix_rt::spawn(worker.run(rx))),
    }
    PluginHandle { name, config, host: host.clone(), tx }
}

struct WorkerMetrics {
    /// `stoa_plugin_calls_total` per hook, in the order of [`Call::hook_index`].
    calls: [metrics::Counter; 5],
    seconds: metrics::Histogram,
}

struct Worker {
    metrics: WorkerMetrics,
    host: PluginHost,
    name: Arc<str>,
    config: String,
    attachment: Attachment,
    /// The plugin's committed state in this room (`None` until loaded).
    state: Option<HashMap<String, String>>,
    instance: Option<PluginInstance>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Call>) {
        while let Some(call) = rx.recv().await {
            self.serve(call).await;
        }
    }

    async fn serve(&mut self, call: Call) {
        let (loaded, policy, calls) = match self.host.lookup(&self.name, &self.attachment.room) {
            Lookup::Missing => {
                self.instance = None;
                return call.answer_without(&self.name, None);
            }
            Lookup::Disabled(policy) => {
                self.instance = None;
                return call.answer_without(&self.name, Some((policy, "it is disabled in this room after repeated faults".into())));
            }
            Lookup::Ready(loaded, policy, calls) => (loaded, policy, calls),
        };
        if self.state.is_none() {
            match on_io(self.attachment.io.as_ref(), load_state(self.attachment.store.clone(), self.name.clone())).await {
                Ok(state) => self.state = Some(state),
                Err(e) => {
                    tracing::warn!(plugin = %self.name, room = %self.attachment.room, error = %e, "plugin state unavailable");
                    return call.answer_without(&self.name, Some((policy, "its state is unavailable".into())));
                }
            }
        }
        if self.instance.as_ref().is_some_and(|i| i.generation != loaded.generation) {
            self.instance = None; // reloaded: the next call runs the new component
        }
        if self.instance.is_none() {
            let mut ctx = PluginCtx::new(
                self.name.clone(),
                self.attachment.room.clone(),
                self.host.settings(),
                self.host.max_body_bytes(),
                self.attachment.link.clone(),
            );
            ctx.state = self.state.clone().unwrap_or_default();
            match PluginInstance::start(&loaded, ctx, &self.config, self.host.settings()).await {
                Ok(instance) => self.instance = Some(instance),
                Err(fault) => {
                    self.host.record_fault(&self.name, &self.attachment.room, &fault);
                    return call.answer_without(&self.name, Some((policy, fault.to_string())));
                }
            }
        }
        let instance = self.instance.as_mut().expect("instantiated above");
        calls.fetch_add(1, Ordering::Relaxed);
        self.metrics.calls[call.hook_index()].increment(1);
        let started = Instant::now();
        let outcome = match call {
            Call::Message { mut message, rewritten, chain, next, reply } => match instance.on_message(&mut message).await {
                Ok(v) => Ok(Reply::Message { message, rewritten, chain, next, reply, verdict: v }),
                Err(f) => Err((f, Call::Message { message, rewritten, chain, next, reply })),
            },
            Call::Join { occupant, reply } => match instance.on_join(&occupant).await {
                Ok(a) => Ok(Reply::Join(reply, a)),
                Err(f) => Err((f, Call::Join { occupant, reply })),
            },
            Call::Leave { occupant } => instance.on_leave(&occupant).await.map(|_| Reply::None).map_err(|f| (f, Call::RoomCreated)),
            Call::RoomCreated => instance.on_room_created().await.map(|_| Reply::None).map_err(|f| (f, Call::RoomCreated)),
            Call::ConfigChanged { config } => instance.on_config_changed(&config).await.map(|_| Reply::None).map_err(|f| (f, Call::RoomCreated)),
        };
        self.metrics.seconds.record(started.elapsed().as_secs_f64());
        let reply = match outcome {
            Ok(reply) => reply,
            Err((fault, call)) => {
                // A trapped instance cannot be entered again; its state changes are dropped.
                self.instance = None;
                self.host.record_fault(&self.name, &self.attachment.room, &fault);
                return call.answer_without(&self.name, Some((policy, fault.to_string())));
            }
        };
        let dirty = instance.take_dirty();
        if !dirty.is_empty()
            && let Err(e) = self.store_state(&dirty).await
        {
            tracing::warn!(plugin = %self.name, room = %self.attachment.room, error = %e, "plugin state not stored");
            // Forget the call's changes: the instance sees the committed state again.
            if let Some(i) = self.instance.as_mut() {
                *i.state_mut() = self.state.clone().unwrap_or_default();
            }
            return reply.fail(&self.name, policy, "its state could not be stored");
        }
        reply.send();
    }

    async fn store_state(&mut self, dirty: &HashMap<String, Option<String>>) -> Result<(), crate::store::StoreError> {
        if let Some((store, fence)) = self.attachment.store.clone() {
            let (name, changes) = (self.name.clone(), dirty.clone());
            on_io(self.attachment.io.as_ref(), async move { store.plugin_state_apply(&fence, &name, &changes).await }).await?;
        }
        let state = self.state.get_or_insert_with(HashMap::new);
        for (k, v) in dirty {
            match v {
                Some(v) => state.insert(k.clone(), v.clone()),
                None => state.remove(k),
            };
        }
        Ok(())
    }
}

/// Run a store operation on the I/O runtime if one is given (never on an arbiter thread).
async fn on_io<T: Send + 'static>(
    io: Option<&tokio::runtime::Handle>,
    f: impl Future<Output = Result<T, crate::store::StoreError>> + Send + 'static,
) -> Result<T, crate::store::StoreError> {
    match io {
        Some(io) => io
            .spawn(f)
            .await
            .unwrap_or_else(|e| Err(crate::store::StoreError::Db(sea_orm::DbErr::Custom(format!("plugin state task failed: {e}"))))),
        None => f.await,
    }
}

async fn load_state(store: Option<(Store, Fence)>, plugin: Arc<str>) -> Result<HashMap<String, String>, crate::store::StoreError> {
    match store {
        Some((store, fence)) => store.plugin_state_load(fence.room, &plugin).await,
        None => Ok(HashMap::new()),
    }
}

/// A successful call's answer, held until its state is stored.
enum Reply {
    Message { message: Message, rewritten: bool, chain: Chain, next: usize, reply: DecisionTo, verdict: Verdict },
    Join(oneshot::Sender<Admission>, Admission),
    None,
}

impl Reply {
    fn send(self) {
        match self {
            Reply::Message { mut message, rewritten, chain, next, reply, verdict } => match verdict {
                Verdict::Accept => pass_on(message, rewritten, chain, next, reply),
                Verdict::Rewrite(body) => {
                    message.body = body;
                    pass_on(message, true, chain, next, reply);
                }
                Verdict::Reject(reason) => reply.send(Verdict::Reject(reason)),
            },
            Reply::Join(tx, admission) => {
                let _ = tx.send(admission);
            }
            Reply::None => {}
        }
    }

    fn fail(self, name: &str, policy: FailurePolicy, why: &str) {
        let call = match self {
            Reply::Message { message, rewritten, chain, next, reply, .. } => Call::Message { message, rewritten, chain, next, reply },
            Reply::Join(reply, _) => Call::Join { occupant: Occupant::default(), reply },
            Reply::None => return,
        };
        call.answer_without(name, Some((policy, why.into())));
    }
}
