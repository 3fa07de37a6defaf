//! Host side of WIT `stoa:plugin@0.1.0` (`wit/0.1.0/`, frozen): the generated bindings, the
//! host imports, and the conversions between the generated types and the plugin module's own,
//! which are all the rest of Stoa sees. The next WIT version gets a module of its own beside
//! this one; the dispatcher in `plugin.rs` picks one per component (docs/plugins.md,
//! "Versioning").

use super::{CallState, PluginCtx};
use crate::plugin;
use std::time::Duration;
use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

wasmtime::component::bindgen!({
    world: "room-plugin",
    path: "wit/0.1.0",
    imports: { default: async | trappable },
    exports: { default: async },
});

use self::stoa::plugin::types::{Level, RoomSnapshot};

/// The WIT package of this module, as component import names carry it (`stoa:plugin/host@0.1.0`).
pub const PACKAGE: &str = "stoa:plugin@0.1.0";

/// Add this version's host imports to `linker` (which holds WASI already).
pub fn add_to_linker(linker: &mut Linker<PluginCtx>) -> wasmtime::Result<()> {
    RoomPlugin::add_to_linker::<PluginCtx, HasSelf<PluginCtx>>(linker, |c| c)
}

/// The hooks of one instance, and what every hook is told about where it runs.
pub struct Hooks {
    bindings: RoomPlugin,
    ctx: RoomCtx,
}

impl Hooks {
    /// Instantiate `pre` in `store`; the hooks' `room-ctx` is the store's room and plugin.
    pub async fn instantiate(pre: &RoomPluginPre<PluginCtx>, store: &mut Store<PluginCtx>) -> wasmtime::Result<Hooks> {
        let ctx = RoomCtx { room: store.data().room.0.clone(), plugin: store.data().plugin.to_string() };
        Ok(Hooks { bindings: pre.instantiate_async(store).await?, ctx })
    }

    /// `init`.
    pub async fn init(&self, store: &mut Store<PluginCtx>, config: &str) -> wasmtime::Result<Result<(), String>> {
        self.bindings.call_init(store, config).await
    }

    /// `on-message`. The message's strings move into the generated record for the call and
    /// back (the hot path: no copy per call); it comes back unchanged.
    pub async fn on_message(&self, store: &mut Store<PluginCtx>, message: &mut plugin::Message) -> wasmtime::Result<plugin::Verdict> {
        let lent = Message {
            sender: std::mem::take(&mut message.sender),
            nick: std::mem::take(&mut message.nick),
            body: std::mem::take(&mut message.body),
            cid: std::mem::take(&mut message.client_msg_id),
        };
        let verdict = self.bindings.call_on_message(store, &self.ctx, &lent).await;
        *message = plugin::Message { sender: lent.sender, nick: lent.nick, body: lent.body, client_msg_id: lent.cid };
        Ok(match verdict? {
            Verdict::Accept => plugin::Verdict::Accept,
            Verdict::Reject(reason) => plugin::Verdict::Reject(reason),
            Verdict::Rewrite(body) => plugin::Verdict::Rewrite(body),
        })
    }

    /// `on-join`.
    pub async fn on_join(&self, store: &mut Store<PluginCtx>, occupant: &plugin::Occupant) -> wasmtime::Result<plugin::Admission> {
        Ok(match self.bindings.call_on_join(store, &self.ctx, &occupant.into()).await? {
            Admission::Allow => plugin::Admission::Allow,
            Admission::Deny(reason) => plugin::Admission::Deny(reason),
        })
    }

    /// `on-leave`.
    pub async fn on_leave(&self, store: &mut Store<PluginCtx>, occupant: &plugin::Occupant) -> wasmtime::Result<()> {
        self.bindings.call_on_leave(store, &self.ctx, &occupant.into()).await
    }

    /// `on-room-created`.
    pub async fn on_room_created(&self, store: &mut Store<PluginCtx>) -> wasmtime::Result<()> {
        self.bindings.call_on_room_created(store, &self.ctx).await
    }

    /// `on-config-changed`.
    pub async fn on_config_changed(&self, store: &mut Store<PluginCtx>, config: &str) -> wasmtime::Result<()> {
        self.bindings.call_on_config_changed(store, &self.ctx, config).await
    }
}

impl From<&plugin::Occupant> for Occupant {
    fn from(o: &plugin::Occupant) -> Occupant {
        Occupant { user: o.user.clone(), nick: o.nick.clone() }
    }
}

/// Longest key of `state-set`.
pub const MAX_STATE_KEY_BYTES: usize = 255;
/// Largest value of `state-set`.
pub const MAX_STATE_VALUE_BYTES: usize = 64 * 1024;
/// Most keys one plugin may keep per room.
pub const MAX_STATE_KEYS: usize = 10_000;

/// How long `room-info` waits for the room actor (it answers at once unless it is stopping).
const ROOM_INFO_TIMEOUT: Duration = Duration::from_secs(1);

impl PluginCtx {
    /// Count one host call; past the budget the guest traps.
    fn host_call(&mut self) -> wasmtime::Result<&mut CallState> {
        let call = &mut self.call;
        call.host_calls += 1;
        if call.host_calls > call.max_host_calls {
            call.host_calls_exceeded = true;
            return Err(wasmtime::Error::msg("host-call budget of this hook call exceeded"));
        }
        Ok(call)
    }
}

impl self::stoa::plugin::types::Host for PluginCtx {}

impl self::stoa::plugin::host::Host for PluginCtx {
    async fn log(&mut self, level: Level, msg: String) -> wasmtime::Result<()> {
        self.host_call()?;
        let msg: String = msg.chars().take(1024).collect();
        let (plugin, room) = (&*self.plugin, self.room.as_str());
        match level {
            Level::Trace => tracing::trace!(target: "stoa::plugin", plugin, room, "{msg}"),
            Level::Debug => tracing::debug!(target: "stoa::plugin", plugin, room, "{msg}"),
            Level::Info => tracing::info!(target: "stoa::plugin", plugin, room, "{msg}"),
            Level::Warn => tracing::warn!(target: "stoa::plugin", plugin, room, "{msg}"),
            Level::Error => tracing::error!(target: "stoa::plugin", plugin, room, "{msg}"),
        }
        Ok(())
    }

    async fn send(&mut self, room: String, body: String) -> wasmtime::Result<Result<(), String>> {
        self.host_call()?;
        if room != self.room.as_str() {
            return Ok(Err(format!("a plugin may only send to the room of the current event ({})", self.room)));
        }
        if body.is_empty() || body.len() > self.max_body_bytes {
            return Ok(Err(format!("body must be 1 to {} bytes", self.max_body_bytes)));
        }
        if body.contains('\0') {
            return Ok(Err("body may not contain U+0000 (NUL)".into()));
        }
        match &self.link {
            Some(link) => {
                link.send(&self.plugin, body);
                Ok(Ok(()))
            }
            None => Ok(Err("this instance is not attached to a room".into())),
        }
    }

    async fn state_get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        self.host_call()?;
        Ok(self.state.get(&key).cloned())
    }

    async fn state_set(&mut self, key: String, value: String) -> wasmtime::Result<Result<(), String>> {
        self.host_call()?;
        if key.is_empty() || key.len() > MAX_STATE_KEY_BYTES {
            return Ok(Err(format!("keys are 1 to {MAX_STATE_KEY_BYTES} bytes")));
        }
        if value.len() > MAX_STATE_VALUE_BYTES {
            return Ok(Err(format!("values are at most {MAX_STATE_VALUE_BYTES} bytes")));
        }
        if key.contains('\0') || value.contains('\0') {
            // No store keeps U+0000 in text; refused here, not at the commit.
            return Ok(Err("keys and values may not contain U+0000 (NUL)".into()));
        }
        if !self.state.contains_key(&key) && self.state.len() >= MAX_STATE_KEYS {
            return Ok(Err(format!("at most {MAX_STATE_KEYS} keys per plugin and room")));
        }
        self.state.insert(key.clone(), value.clone());
        self.dirty.insert(key, Some(value));
        Ok(Ok(()))
    }

    async fn state_delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.host_call()?;
        if self.state.remove(&key).is_some() {
            self.dirty.insert(key, None);
        }
        Ok(())
    }

    async fn now(&mut self) -> wasmtime::Result<u64> {
        self.host_call()?;
        Ok(crate::store::now_ms().max(0) as u64)
    }

    async fn room_info(&mut self) -> wasmtime::Result<RoomSnapshot> {
        self.host_call()?;
        let empty = RoomSnapshot { room: self.room.0.clone(), subject: String::new(), last_seq: 0, occupants: Vec::new() };
        let Some(link) = self.link.clone() else { return Ok(empty) };
        match tokio::time::timeout(ROOM_INFO_TIMEOUT, link.info()).await {
            Ok(Some(info)) => Ok(RoomSnapshot {
                room: self.room.0.clone(),
                subject: info.subject,
                last_seq: info.last_seq,
                occupants: info.occupants.iter().map(Occupant::from).collect(),
            }),
            _ => Ok(empty),
        }
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};
    use std::path::Path;

    /// SHA-256 over the name and bytes of every file in `wit/0.1.0/`, in name order.
    const FROZEN_WIT_SHA256: &str = "368ff93064f0e85d2e5d5c992a549af57ba1fb3c5fc57c45e45c31790cbbdccb";

    /// `wit/0.1.0/` is exactly what was released: no file changed, added or removed.
    #[test]
    fn the_released_wit_folder_is_frozen() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("wit/0.1.0");
        let mut files: Vec<_> = std::fs::read_dir(&dir).expect("reading wit/0.1.0").map(|e| e.expect("a directory entry").path()).collect();
        files.sort();
        let mut hash = Sha256::new();
        for file in &files {
            hash.update(file.file_name().expect("a file name").as_encoded_bytes());
            hash.update([0]);
            hash.update(std::fs::read(file).expect("reading a WIT file"));
            hash.update([0]);
        }
        let digest = hex::encode(hash.finalize());
        assert_eq!(
            digest, FROZEN_WIT_SHA256,
            "wit/0.1.0/ changed. A released WIT version must never change: plugins built against it rely on every \
             function, field and case as released. Put the change in a new package version in a new folder \
             (wit/0.2.0/) with a host module of its own (src/plugin/v0_2.rs) beside v0_1.rs; see docs/plugins.md, \
             \"Versioning\"."
        );
    }
}
