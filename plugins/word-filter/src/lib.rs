//! Rewrites configured words to a mask (or rejects the message, with `"reject": true`).
//!
//! Config: `{"words": ["darn", "heck"], "mask": "****", "reject": false}`. Words match whole
//! words, case-insensitively.
use serde::Deserialize;
use stoa_plugin_sdk::{Message, Plugin, RoomCtx, Verdict, export_plugin, info};

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WordFilter {
    words: Vec<String>,
    mask: Option<String>,
    reject: bool,
}

impl Plugin for WordFilter {
    fn init(&mut self, config: &str) -> Result<(), String> {
        *self = serde_json::from_str(config).map_err(|e| format!("word-filter config: {e}"))?;
        self.words.iter_mut().for_each(|w| *w = w.to_lowercase());
        info(&format!("word-filter: {} words", self.words.len()));
        Ok(())
    }

    fn on_message(&mut self, _ctx: &RoomCtx, message: &Message) -> Verdict {
        let mask = self.mask.as_deref().unwrap_or("****");
        let mut changed = false;
        let mut out = String::with_capacity(message.body.len());
        let mut word = String::new();
        let flush = |word: &mut String, out: &mut String, changed: &mut bool| {
            if !word.is_empty() {
                if self.words.contains(&word.to_lowercase()) {
                    out.push_str(mask);
                    *changed = true;
                } else {
                    out.push_str(word);
                }
                word.clear();
            }
        };
        for c in message.body.chars() {
            if c.is_alphanumeric() || c == '\'' {
                word.push(c);
            } else {
                flush(&mut word, &mut out, &mut changed);
                out.push(c);
            }
        }
        flush(&mut word, &mut out, &mut changed);
        match (changed, self.reject) {
            (false, _) => Verdict::Accept,
            (true, true) => Verdict::Reject("message contains a filtered word".into()),
            (true, false) => Verdict::Rewrite(out),
        }
    }
}

export_plugin!(WordFilter);
