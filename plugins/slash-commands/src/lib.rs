//! Chat commands answered by the plugin's bot:
//!
//! - `/roll [N]`: the bot posts a die roll from 1 to N (default 6); the command is stored too.
//! - `/me does something`: rewritten to `* nick does something`.
//! - `/topic`: the bot posts the room's subject and how many are present.
//! - `/time`: the bot posts the server time (ms since the Unix epoch).
//!
//! Any other message is accepted untouched.
use stoa_plugin_sdk::{Message, Plugin, RoomCtx, Verdict, export_plugin, now, room_info, send};

#[derive(Default)]
struct SlashCommands {
    rolls: u64,
}

impl SlashCommands {
    fn reply(ctx: &RoomCtx, body: &str) -> Verdict {
        match send(&ctx.room, body) {
            Ok(()) => Verdict::Accept,
            Err(e) => Verdict::Reject(format!("command failed: {e}")),
        }
    }
}

impl Plugin for SlashCommands {
    fn on_message(&mut self, ctx: &RoomCtx, m: &Message) -> Verdict {
        let body = m.body.trim();
        let (command, rest) = body.split_once(' ').unwrap_or((body, ""));
        match command {
            "/roll" => {
                let sides: u64 = rest.trim().parse().unwrap_or(6).clamp(2, 1_000_000);
                self.rolls += 1;
                // Not cryptographic: a mix of the clock and a per-instance counter is plenty for dice.
                let mut x = now() ^ (self.rolls.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                x ^= x >> 33;
                x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
                x ^= x >> 33;
                let roll = x % sides + 1;
                Self::reply(ctx, &format!("{} rolled {roll} (1-{sides})", m.nick))
            }
            "/me" if !rest.trim().is_empty() => Verdict::Rewrite(format!("* {} {}", m.nick, rest.trim())),
            "/topic" => {
                let info = room_info();
                let subject = if info.subject.is_empty() { "(no subject)".to_string() } else { info.subject };
                Self::reply(ctx, &format!("topic of {}: {subject} ({} present, last seq {})", info.room, info.occupants.len(), info.last_seq))
            }
            "/time" => Self::reply(ctx, &format!("server time {} ms", now())),
            _ => Verdict::Accept,
        }
    }
}

export_plugin!(SlashCommands);
