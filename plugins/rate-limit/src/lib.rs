//! A per-user message budget per time window, kept in plugin state (so it survives restarts,
//! reloads and failover): `{"budget": 5, "window_ms": 60000}`.
//!
//! State: key `u:<user>` = `<window start ms> <count>`. A window that has expired is deleted
//! and started afresh.
use serde::Deserialize;
use stoa_plugin_sdk::{Message, Plugin, RoomCtx, Verdict, export_plugin, now, state_delete, state_get, state_set};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RateLimit {
    budget: u64,
    window_ms: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit { budget: 5, window_ms: 60_000 }
    }
}

impl Plugin for RateLimit {
    fn init(&mut self, config: &str) -> Result<(), String> {
        *self = serde_json::from_str(config).map_err(|e| format!("rate-limit config: {e}"))?;
        if self.budget == 0 || self.window_ms == 0 {
            return Err("rate-limit: budget and window_ms must be at least 1".into());
        }
        Ok(())
    }

    fn on_message(&mut self, _ctx: &RoomCtx, m: &Message) -> Verdict {
        let key = format!("u:{}", m.sender);
        let t = now();
        let (mut start, mut count) = state_get(&key)
            .and_then(|v| {
                let (a, b) = v.split_once(' ')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            })
            .unwrap_or((t, 0));
        if t.saturating_sub(start) >= self.window_ms {
            state_delete(&key);
            start = t;
            count = 0;
        }
        if count >= self.budget {
            return Verdict::Reject(format!(
                "rate limit: at most {} messages per {} s; try again in {} s",
                self.budget,
                self.window_ms / 1000,
                (start + self.window_ms).saturating_sub(t).div_ceil(1000)
            ));
        }
        match state_set(&key, &format!("{start} {}", count + 1)) {
            Ok(()) => Verdict::Accept,
            Err(e) => Verdict::Reject(format!("rate limit state unavailable: {e}")),
        }
    }
}

export_plugin!(RateLimit);
