//! A test fixture that misbehaves on purpose, to prove the host's limits.
//!
//! Config: `{"fault": F, "trigger": "!fault"}`. A message whose body starts with the trigger
//! sets off fault F; every other message is accepted, so a room can show it keeps working.
//! F is one of:
//!
//! - `loop`: spin forever (stopped by the per-call deadline),
//! - `alloc`: allocate without bound (stopped by the memory cap),
//! - `recursion`: recurse without bound (stopped by the stack limit),
//! - `trap`: execute `unreachable`,
//! - `huge`: answer a 4 MiB rewrite (refused by the maximum result size),
//! - `storm`: call the host in a loop (stopped by the host-call budget),
//! - `init`: fail `init` (the plugin never serves the room).
use serde::Deserialize;
use std::hint::black_box;
use stoa_plugin_sdk::{Message, Plugin, RoomCtx, Verdict, export_plugin, now};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Misbehave {
    fault: String,
    trigger: String,
}

impl Default for Misbehave {
    fn default() -> Self {
        Misbehave { fault: "trap".into(), trigger: "!fault".into() }
    }
}

#[inline(never)]
fn recurse(depth: u64, pad: [u64; 16]) -> u64 {
    let mut local = black_box(pad);
    local[(depth % 16) as usize] = depth;
    if black_box(depth) == u64::MAX {
        return local[1];
    }
    black_box(recurse(depth + 1, local)) + local[0]
}

impl Plugin for Misbehave {
    fn init(&mut self, config: &str) -> Result<(), String> {
        *self = serde_json::from_str(config).map_err(|e| format!("misbehave config: {e}"))?;
        if self.fault == "init" {
            return Err("misbehave: failing init on purpose".into());
        }
        Ok(())
    }

    fn on_message(&mut self, _ctx: &RoomCtx, m: &Message) -> Verdict {
        if !m.body.starts_with(&self.trigger) {
            return Verdict::Accept;
        }
        match self.fault.as_str() {
            "loop" => {
                let mut i: u64 = 0;
                loop {
                    i = black_box(i.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let chunk = vec![black_box(1u8); 1 << 20];
                    hoard.push(black_box(chunk));
                    black_box(&hoard);
                }
            }
            "recursion" => Verdict::Rewrite(format!("{}", recurse(0, [1; 16]))),
            "trap" => core::arch::wasm32::unreachable(),
            "huge" => Verdict::Rewrite("x".repeat(4 << 20)),
            "storm" => {
                let mut sum = 0u64;
                loop {
                    sum = black_box(sum.wrapping_add(now()));
                }
            }
            other => Verdict::Reject(format!("misbehave: unknown fault `{other}`")),
        }
    }
}

export_plugin!(Misbehave);
