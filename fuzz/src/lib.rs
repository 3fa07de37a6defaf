//! The properties the fuzz targets check, one function per target. They depend only on `stoa`
//! and `serde_json`, so the main crate's corpus replay (tests/fuzz_corpus.rs) includes this file
//! and checks every corpus and artifact input the same way without libFuzzer.

use stoa::protocol::{ClientFrame, parse_client_frame};

/// `v1_frame`: any text gets a parse or an error, never a panic; a frame that parses, written
/// out with serde_json and parsed again, is the same frame.
pub fn v1_frame(text: &str) {
    let Ok(frame) = parse_client_frame(text) else { return };
    let _ = (frame.id(), frame.room().map(|r| (r.name(), r.service())));
    let json = serde_json::to_string(&frame).expect("a parsed frame serializes");
    let again: ClientFrame = parse_client_frame(&json)
        .unwrap_or_else(|e| panic!("the re-serialized frame {json} does not parse: {}", e.message));
    assert_eq!(again, frame, "round trip through {json}");
}

/// `config`: any text as a TOML config file gets settings or a `ConfigError`, never a panic
/// (that includes `Settings::check`, which a node runs at start-up).
pub fn config(text: &str) {
    if let Ok(settings) = stoa::config::Settings::from_toml_str(text) {
        let _ = (settings.store_url(), settings.group(), settings.peer(), settings.passivate_after());
    }
}

/// `link_frame`: any text arriving on a node link is a link frame or not, never a panic.
pub fn link_frame(text: &str) {
    let _ = stoa::ha::link::parse_link_frame(text);
}
