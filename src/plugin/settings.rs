//! `[plugins]`: where plugins load from, which run on every room, and the limits of one call.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Is `name` usable as a plugin name (and file name)?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The name a plugin is known by: `_` reads as `-`, so `word_filter` (the file cargo builds
/// for the crate `word-filter`) and `word-filter` are one plugin, whichever a file, a config
/// or an admin call uses.
pub fn canonical_name(name: &str) -> String {
    name.replace('_', "-")
}

/// What happens to an event when its plugin faults or is disabled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// The event proceeds as if the plugin were not there (messages are accepted, joins allowed).
    #[default]
    FailOpen,
    /// The event is refused: the message or join gets error `rejected` naming the plugin.
    FailClosed,
}

impl FailurePolicy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::FailOpen => "fail_open",
            FailurePolicy::FailClosed => "fail_closed",
        }
    }
}

/// A plugin enabled on every room of the node, with its JSON config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnabledPlugin {
    pub name: String,
    /// Passed to the plugin's `init` as JSON (`{}` when absent).
    pub config: serde_json::Value,
}

/// The `[plugins]` section.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PluginSettings {
    /// Directory of `<name>.wasm` components, all loaded at start-up. Empty = `{data_dir}/plugins`.
    pub dir: PathBuf,
    /// Compiled components are cached here. Empty = `{data_dir}/plugin-cache`.
    pub cache_dir: PathBuf,
    /// Plugins that run on every room (before the room's own list), in order.
    pub enabled: Vec<EnabledPlugin>,
    /// Failure policy of plugins not named in `policies`.
    pub failure_policy: FailurePolicy,
    /// Failure policy per plugin name.
    pub policies: BTreeMap<String, FailurePolicy>,
    /// Linear memory one instance may grow to.
    pub max_memory_bytes: u64,
    /// Wall time one hook call may take, host calls included.
    pub call_deadline_ms: u64,
    /// Granularity of the deadline: the epoch ticker's period (one thread per node).
    pub epoch_tick_ms: u64,
    /// Largest string a hook may return (a rewrite, a reason).
    pub max_result_bytes: usize,
    /// Host calls (log, send, state, now, room-info) one hook call may make.
    pub max_host_calls: u32,
    /// Native stack one call may use.
    pub max_stack_bytes: usize,
    /// This many faults within `fault_window_ms` disable a plugin until it is reloaded.
    pub fault_limit: u32,
    pub fault_window_ms: u64,
    /// Calls queued for one plugin instance (one per room and plugin); a full queue counts as
    /// the plugin being unavailable for that event (its failure policy applies).
    pub queue_depth: usize,
}

impl Default for PluginSettings {
    fn default() -> Self {
        PluginSettings {
            dir: PathBuf::new(),
            cache_dir: PathBuf::new(),
            enabled: Vec::new(),
            failure_policy: FailurePolicy::FailOpen,
            policies: BTreeMap::new(),
            max_memory_bytes: 32 << 20,
            call_deadline_ms: 100,
            epoch_tick_ms: 5,
            max_result_bytes: 16 * 1024,
            max_host_calls: 1000,
            max_stack_bytes: 512 * 1024,
            fault_limit: 5,
            fault_window_ms: 60_000,
            queue_depth: 1024,
        }
    }
}

impl PluginSettings {
    /// The failure policy of plugin `name`.
    pub fn policy(&self, name: &str) -> FailurePolicy {
        let name = canonical_name(name);
        let named = self.policies.iter().find(|(n, _)| canonical_name(n) == name);
        named.map_or(self.failure_policy, |(_, p)| *p)
    }

    /// Refuse limits that cannot work.
    pub fn check(&self) -> Result<(), String> {
        if self.call_deadline_ms == 0 || self.epoch_tick_ms == 0 || self.epoch_tick_ms > self.call_deadline_ms {
            return Err("plugins.call_deadline_ms and epoch_tick_ms must be at least 1, the tick at most the deadline".into());
        }
        if self.max_memory_bytes < (1 << 20) {
            return Err("plugins.max_memory_bytes must be at least 1 MiB".into());
        }
        if self.fault_limit == 0 || self.queue_depth == 0 || self.max_stack_bytes < 64 * 1024 {
            return Err("plugins.fault_limit and queue_depth must be at least 1, max_stack_bytes at least 64 KiB".into());
        }
        for p in &self.enabled {
            if !valid_name(&p.name) {
                return Err(format!("plugins.enabled: `{}` is not a valid plugin name (a-z, 0-9, - and _, at most 64)", p.name));
            }
        }
        Ok(())
    }
}
