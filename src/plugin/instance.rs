//! One plugin instance in its own `Store`, and the limits applied around every call.

use super::{Admission, Fault, Hooks, LoadedPlugin, Message, Occupant, PluginCtx, PluginSettings, TickHold, Ticker, Verdict};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use wasmtime::{Store, UpdateDeadline};

/// A live instance. After a [`Fault`] it must be dropped: a trapped component instance cannot
/// be entered again.
pub struct PluginInstance {
    store: Store<PluginCtx>,
    hooks: Hooks,
    /// The [`LoadedPlugin::generation`] it was made from.
    pub generation: u64,
    deadline: Duration,
    max_result: usize,
    ticker: Ticker,
    /// Held while a call runs: the epoch ticker ticks only then.
    ticking: Option<TickHold>,
}

impl PluginInstance {
    /// Instantiate `plugin` with `ctx` (its state already loaded) and run `init(config)`, under
    /// the same limits as any call. Its hooks are told `ctx`'s room and plugin name.
    pub async fn start(plugin: &LoadedPlugin, ctx: PluginCtx, config: &str, limits: &PluginSettings) -> Result<PluginInstance, Fault> {
        let engine = plugin.pre.engine().clone();
        let mut store = Store::new(&engine, ctx);
        store.limiter(|c| &mut c.memory);
        store.epoch_deadline_callback(|mut cx| {
            let call = &mut cx.data_mut().call;
            match call.started {
                Some(started) if started.elapsed() >= call.deadline => {
                    call.deadline_hit = true;
                    Ok(UpdateDeadline::Interrupt)
                }
                // Give the executor its thread back every tick, then carry on.
                _ => Ok(UpdateDeadline::Yield(1)),
            }
        });
        let deadline = Duration::from_millis(limits.call_deadline_ms);
        let max_result = limits.max_result_bytes.min(store.data().max_body_bytes.max(1));
        let ticking = Some(plugin.ticker.hold());
        begin(&mut store, deadline);
        let hooks = match plugin.pre.instantiate(&mut store).await {
            Ok(h) => h,
            Err(e) => return Err(classify(&store, e, deadline).into_init()),
        };
        let ticker = plugin.ticker.clone();
        let mut instance = PluginInstance { store, hooks, generation: plugin.generation, deadline, max_result, ticker, ticking };
        let result = instance.hooks.init(&mut instance.store, config).await;
        match instance.finish(result)? {
            Ok(()) => {
                instance.store.data_mut().dirty.clear();
                Ok(instance)
            }
            Err(reason) => Err(Fault::Init(reason.chars().take(512).collect())),
        }
    }

    fn begin(&mut self) {
        self.ticking = Some(self.ticker.hold());
        begin(&mut self.store, self.deadline);
    }

    fn finish<T>(&mut self, result: wasmtime::Result<T>) -> Result<T, Fault> {
        self.ticking = None;
        self.store.data_mut().call.started = None;
        result.map_err(|e| classify(&self.store, e, self.deadline))
    }

    fn check_len(&self, s: &str) -> Result<(), Fault> {
        if s.len() > self.max_result {
            return Err(Fault::ResultTooLarge { got: s.len(), limit: self.max_result });
        }
        Ok(())
    }

    /// `on-message`. A rewrite must be a valid body (1 byte up to the result limit).
    /// `message` is lent to the call and comes back unchanged.
    pub async fn on_message(&mut self, message: &mut Message) -> Result<Verdict, Fault> {
        self.begin();
        let result = self.hooks.on_message(&mut self.store, message).await;
        let verdict = self.finish(result)?;
        match &verdict {
            Verdict::Accept => {}
            Verdict::Reject(reason) => self.check_len(reason)?,
            Verdict::Rewrite(body) => {
                self.check_len(body)?;
                if body.is_empty() {
                    return Err(Fault::Trap("rewrote the message to an empty body".into()));
                }
                if body.contains('\0') {
                    return Err(Fault::Trap("rewrote the message to a body with U+0000 (NUL)".into()));
                }
            }
        }
        Ok(verdict)
    }

    /// `on-join`.
    pub async fn on_join(&mut self, occupant: &Occupant) -> Result<Admission, Fault> {
        self.begin();
        let result = self.hooks.on_join(&mut self.store, occupant).await;
        let admission = self.finish(result)?;
        if let Admission::Deny(reason) = &admission {
            self.check_len(reason)?;
        }
        Ok(admission)
    }

    /// `on-leave`.
    pub async fn on_leave(&mut self, occupant: &Occupant) -> Result<(), Fault> {
        self.begin();
        let result = self.hooks.on_leave(&mut self.store, occupant).await;
        self.finish(result)
    }

    /// `on-room-created`.
    pub async fn on_room_created(&mut self) -> Result<(), Fault> {
        self.begin();
        let result = self.hooks.on_room_created(&mut self.store).await;
        self.finish(result)
    }

    /// `on-config-changed`.
    pub async fn on_config_changed(&mut self, config: &str) -> Result<(), Fault> {
        self.begin();
        let result = self.hooks.on_config_changed(&mut self.store, config).await;
        self.finish(result)
    }

    /// State changes of the last call (`None` = deleted), to be written to the store.
    pub fn take_dirty(&mut self) -> HashMap<String, Option<String>> {
        std::mem::take(&mut self.store.data_mut().dirty)
    }

    /// The instance's view of its state (after a failed write, reset it from the store).
    pub fn state_mut(&mut self) -> &mut HashMap<String, String> {
        &mut self.store.data_mut().state
    }

    /// Give back the store data (state and link) to build the next instance from.
    pub fn into_ctx(self) -> PluginCtx {
        self.store.into_data()
    }
}

/// Arm the limits for one call.
fn begin(store: &mut Store<PluginCtx>, deadline: Duration) {
    let call = &mut store.data_mut().call;
    call.started = Some(Instant::now());
    call.deadline = deadline;
    call.deadline_hit = false;
    call.host_calls = 0;
    call.host_calls_exceeded = false;
    store.data_mut().memory.hit = false;
    store.data_mut().dirty.clear();
    store.set_epoch_deadline(1);
}

/// Name the limit behind a failed call.
fn classify(store: &Store<PluginCtx>, e: wasmtime::Error, deadline: Duration) -> Fault {
    let data = store.data();
    if data.call.deadline_hit {
        Fault::Deadline(deadline.as_millis() as u64)
    } else if data.call.host_calls_exceeded {
        Fault::HostCalls(data.call.max_host_calls)
    } else if data.memory.hit {
        Fault::Memory(data.memory.max_bytes)
    } else if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        Fault::Trap(trap.to_string())
    } else {
        let text = format!("{e:#}");
        Fault::Trap(text.chars().take(512).collect())
    }
}

impl Fault {
    fn into_init(self) -> Fault {
        match self {
            Fault::Trap(t) => Fault::Init(t),
            other => other,
        }
    }
}
