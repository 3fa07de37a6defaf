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

/// `xmpp_stream`: any bytes on an XMPP connection, cut into chunks of any size, give stream
/// items or a stream fault, never a panic; the parsers the stanza handler applies to attributes
/// and children (XEP-0082 dates, the MUC `<history/>`) and the WebSocket framing of a text
/// message never panic either.
///
/// Elements read are not written out again: Stoa never serializes an element it read (it
/// writes stanzas of its own), and minidom's writer panics on prefix declarations its reader
/// accepts (the corpus input `crash-minidom-writer-prefix`, found by this target when it
/// checked that round trip).
pub fn xmpp_stream(data: &[u8]) {
    use stoa::xmpp::stream::{Item, StreamReader};
    let Some((&first, data)) = data.split_first() else { return };
    let chunk = usize::from(first % 64) + 1;
    let mut reader = StreamReader::new(4096, 16);
    let mut items = Vec::new();
    for piece in data.chunks(chunk) {
        if reader.feed(piece, &mut items).is_err() {
            break;
        }
    }
    for item in items {
        let el = match item {
            Item::Open(el) | Item::Stanza(el) => el,
            Item::Close => continue,
        };
        for (_, value) in el.attrs() {
            let _ = stoa::xmpp::muc::parse_xep82(value);
        }
        let _ = stoa::xmpp::muc::HistoryFilter::from_join(Some(&el), 0);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = stoa::xmpp::websocket::framed_element(text);
    }
}
