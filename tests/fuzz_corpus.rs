//! The fuzz corpus, replayed without libFuzzer (docs/fuzzing.md): every input in
//! `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` goes through the property its fuzz
//! target checks (`fuzz/src/lib.rs`, included here as is), so an input that once crashed a
//! target keeps being checked by the normal test suite.

#[path = "../fuzz/src/lib.rs"]
mod properties;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// Run `property` on every input of `target`; the inputs that panicked, with why.
fn replay(target: &str, property: fn(&str)) -> usize {
    replay_bytes(target, property, |bytes| std::str::from_utf8(bytes).ok())
}

/// [`replay`] for a property of any input: `convert` says what it gets (`None`: skipped).
fn replay_bytes<T: ?Sized>(target: &str, property: fn(&T), convert: fn(&[u8]) -> Option<&T>) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    let mut failed = Vec::new();
    for dir in [fuzz.join("corpus").join(target), fuzz.join("artifacts").join(target)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.expect("a readable corpus directory").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // The text targets skip input that is not UTF-8 the same way.
            let Some(text) = convert(&bytes) else { continue };
            replayed += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| property(text))) {
                let why = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                failed.push(format!("{}: {}", path.display(), why.unwrap_or_default()));
            }
        }
    }
    assert!(failed.is_empty(), "{target}: {} input(s) panicked:\n{}", failed.len(), failed.join("\n"));
    replayed
}

/// Every v1 frame of the corpus parses or gets an error, and a frame that parses survives a
/// round trip through serde_json unchanged.
#[test]
fn v1_frame_corpus_parses_without_panic_and_round_trips() {
    assert!(replay("v1_frame", properties::v1_frame) > 0, "the v1_frame seed corpus is there");
}

/// Every config file of the corpus loads or gets a `ConfigError` (checks included), never a panic.
#[test]
fn config_corpus_loads_or_is_refused_without_panic() {
    assert!(replay("config", properties::config) > 0, "the config seed corpus is there");
}

/// Every node-link frame of the corpus is a link frame or not, never a panic.
#[test]
fn link_frame_corpus_parses_without_panic() {
    assert!(replay("link_frame", properties::link_frame) > 0, "the link_frame seed corpus is there");
}

/// Every byte stream of the corpus reads as XMPP stream items or a stream fault, never a panic,
/// and what it reads serializes to XML that reads again.
#[test]
fn xmpp_stream_corpus_reads_without_panic() {
    assert!(replay_bytes("xmpp_stream", properties::xmpp_stream, |bytes| Some(bytes)) > 0, "the xmpp_stream seed corpus is there");
}
