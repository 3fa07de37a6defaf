//! Greets people and remembers visits: an example of the room-life hooks and of state.
//!
//! - `on-room-created`: the bot posts `room created`.
//! - `on-join`: nicks listed in `deny_nicks` are refused; everyone else is welcomed with their
//!   visit count, kept in state (`visits:<user>`).
//! - `on-leave`: the bot says goodbye.
//! - `on-config-changed`: the bot posts the new subject.
//! - A message `/forget` deletes the sender's visit count (and is not stored).
//!
//! Config: `{"deny_nicks": ["root"]}`.
use serde::Deserialize;
use stoa_plugin_sdk::{Admission, Message, Occupant, Plugin, RoomCtx, Verdict, export_plugin, send, state_delete, state_get, state_set};

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Greeter {
    deny_nicks: Vec<String>,
}

impl Plugin for Greeter {
    fn init(&mut self, config: &str) -> Result<(), String> {
        *self = serde_json::from_str(config).map_err(|e| format!("greeter config: {e}"))?;
        Ok(())
    }

    fn on_join(&mut self, ctx: &RoomCtx, who: &Occupant) -> Admission {
        if self.deny_nicks.iter().any(|n| n.eq_ignore_ascii_case(&who.nick)) {
            return Admission::Deny(format!("the nick `{}` is not welcome here", who.nick));
        }
        let key = format!("visits:{}", who.user);
        let visits = state_get(&key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
        let _ = state_set(&key, &visits.to_string());
        let _ = send(&ctx.room, &format!("welcome {} (visit {visits})", who.nick));
        Admission::Allow
    }

    fn on_leave(&mut self, ctx: &RoomCtx, who: &Occupant) {
        let _ = send(&ctx.room, &format!("bye {}", who.nick));
    }

    fn on_room_created(&mut self, ctx: &RoomCtx) {
        let _ = send(&ctx.room, "room created");
    }

    fn on_config_changed(&mut self, ctx: &RoomCtx, config: &str) {
        let subject = serde_json::from_str::<serde_json::Value>(config)
            .ok()
            .and_then(|v| v["subject"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = send(&ctx.room, &format!("config changed; subject: {subject}"));
    }

    fn on_message(&mut self, _ctx: &RoomCtx, m: &Message) -> Verdict {
        if m.body.trim() == "/forget" {
            state_delete(&format!("visits:{}", m.sender));
            return Verdict::Reject("your visits are forgotten".into());
        }
        Verdict::Accept
    }
}

export_plugin!(Greeter);
