//! The XML stream of RFC 6120 as a sequence of items: the stream header, each stanza (a
//! depth-1 element, as a `minidom::Element`), and the stream's end.
//!
//! Bytes are pushed in as they arrive ([`StreamReader::feed`]); rxml parses them (restricted
//! XML: no DTD, no entity declarations, no processing instructions, so no XML bomb gets in),
//! and minidom's tree builder turns the events of one stanza into an element. Limits hold at
//! every byte: a stanza longer than `max_stanza_bytes` or nested deeper than `max_depth` ends
//! the stream with `policy-violation` before it is buffered whole.

use xmpp_parsers::minidom::Element;
use xmpp_parsers::minidom::rxml::error::EndOrError;
use xmpp_parsers::minidom::rxml::{Parse, RawEvent, RawParser};
use xmpp_parsers::minidom::tree_builder::TreeBuilder;

/// One item of an XML stream.
#[derive(Debug)]
pub enum Item {
    /// The stream header (`<stream:stream …>`): an element with its attributes and no children.
    Open(Element),
    /// A complete first-level element: a stanza or a negotiation element (auth, starttls, …).
    Stanza(Element),
    /// `</stream:stream>`.
    Close,
}

/// Why a stream cannot go on (each maps to a stream error condition of RFC 6120 §4.9.3).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamFault {
    /// Not well-formed XML or not namespace-well-formed (`not-well-formed`).
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    /// A stanza over the size or depth limit (`policy-violation`).
    #[error("{0}")]
    PolicyViolation(String),
}

/// Pushes bytes through rxml and minidom's tree builder.
pub struct StreamReader {
    parser: RawParser,
    tree: TreeBuilder,
    max_stanza_bytes: usize,
    max_depth: usize,
    /// Open elements right now (1 = inside the stream header only).
    depth: usize,
    /// Bytes of the stanza being read.
    stanza_bytes: usize,
}

impl StreamReader {
    pub fn new(max_stanza_bytes: usize, max_depth: usize) -> Self {
        StreamReader { parser: RawParser::new(), tree: TreeBuilder::new(), max_stanza_bytes, max_depth, depth: 0, stanza_bytes: 0 }
    }

    /// Parse `data`, appending every item it completes to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<Item>) -> Result<(), StreamFault> {
        loop {
            let before = data.len();
            let parsed = self.parser.parse(&mut data, false);
            // Bytes count toward the stanza they are read in (the parser may hold a partial
            // token: counted as consumed, so a stanza cannot grow unseen).
            let opens_stanza = self.depth == 1 && matches!(parsed, Ok(Some(RawEvent::ElementHeadOpen(..))));
            if self.depth >= 2 || opens_stanza {
                self.stanza_bytes += before - data.len();
                if self.stanza_bytes > self.max_stanza_bytes {
                    return Err(StreamFault::PolicyViolation(format!("a stanza is longer than {} bytes", self.max_stanza_bytes)));
                }
            }
            let event = match parsed {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                Err(EndOrError::NeedMoreData) => return Ok(()),
                Err(EndOrError::Error(e)) => return Err(StreamFault::NotWellFormed(e.to_string())),
            };
            self.event(event, out)?;
        }
    }

    fn event(&mut self, event: RawEvent, out: &mut Vec<Item>) -> Result<(), StreamFault> {
        match event {
            RawEvent::ElementHeadOpen(..) => {
                self.depth += 1;
                // The stream header is depth 1; a stanza's own depth starts at 1 below it.
                if self.depth > self.max_depth + 1 {
                    return Err(StreamFault::PolicyViolation(format!("a stanza is nested deeper than {} elements", self.max_depth)));
                }
                self.build(event)
            }
            RawEvent::ElementHeadClose(_) => {
                self.build(event)?;
                if self.depth == 1 {
                    let header = self.tree.top().cloned().expect("the stream header is open");
                    out.push(Item::Open(header));
                }
                Ok(())
            }
            RawEvent::ElementFoot(_) => {
                self.depth -= 1;
                if self.depth == 0 {
                    out.push(Item::Close);
                    return Ok(());
                }
                self.build(event)?;
                if self.depth == 1 {
                    self.stanza_bytes = 0;
                    if let Some(stanza) = self.tree.unshift_child() {
                        out.push(Item::Stanza(stanza));
                    }
                }
                Ok(())
            }
            // Whitespace between stanzas (keepalives) is not kept on the stream header.
            RawEvent::Text(..) if self.depth <= 1 => Ok(()),
            RawEvent::XmlDeclaration(..) => Ok(()),
            other => self.build(other),
        }
    }

    fn build(&mut self, event: RawEvent) -> Result<(), StreamFault> {
        self.tree.process_event(event).map_err(|e| StreamFault::NotWellFormed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

    fn items(chunks: &[&str]) -> Result<Vec<Item>, StreamFault> {
        let mut r = StreamReader::new(1024, 8);
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c.as_bytes(), &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn a_stream_reads_as_header_stanzas_and_close_in_any_chunking() {
        let text = format!("{HEADER} <message to='r@s' type='groupchat'><body>hi &amp; bye</body></message>\n<presence/></stream:stream>");
        for split in [1, 3, 7, text.len()] {
            let chunks: Vec<String> = text.as_bytes().chunks(split).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
            // chunks() may cut a UTF-8 sequence; this text is ASCII.
            let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let out = items(&refs).unwrap();
            assert_eq!(out.len(), 4, "split {split}: {out:?}");
            let Item::Open(h) = &out[0] else { panic!("{out:?}") };
            assert_eq!(h.attr("to"), Some("localhost"));
            let Item::Stanza(m) = &out[1] else { panic!("{out:?}") };
            assert!(m.is("message", "jabber:client"));
            assert_eq!(m.get_child("body", "jabber:client").unwrap().text(), "hi & bye");
            assert!(matches!(&out[2], Item::Stanza(p) if p.is("presence", "jabber:client")));
            assert!(matches!(out[3], Item::Close));
        }
    }

    #[test]
    fn dtds_entities_and_processing_instructions_are_refused() {
        let bomb = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]><stream:stream/>";
        assert!(matches!(items(&[bomb]), Err(StreamFault::NotWellFormed(_))));
        let undeclared = format!("{HEADER}<message><body>&lol;</body></message>");
        assert!(matches!(items(&[&undeclared]), Err(StreamFault::NotWellFormed(_))));
        let pi = format!("{HEADER}<?evil?>");
        assert!(matches!(items(&[&pi]), Err(StreamFault::NotWellFormed(_))));
    }

    #[test]
    fn size_and_depth_limits_end_the_stream_before_the_stanza_is_whole() {
        let long = format!("{HEADER}<message><body>{}", "x".repeat(2000));
        assert!(matches!(items(&[&long]), Err(StreamFault::PolicyViolation(_))));
        let deep = format!("{HEADER}{}", "<a>".repeat(9));
        assert!(matches!(items(&[&deep]), Err(StreamFault::PolicyViolation(_))));
        let ok = format!("{HEADER}{}{}", "<a>".repeat(8), "</a>".repeat(8));
        assert_eq!(items(&[&ok]).unwrap().len(), 2);
        // Many small stanzas are fine: the size counts per stanza.
        let many = format!("{HEADER}{}", "<presence/>".repeat(500));
        assert_eq!(items(&[&many]).unwrap().len(), 501);
    }

    #[test]
    fn undeclared_prefixes_and_mismatched_tags_are_not_well_formed() {
        assert!(items(&[&format!("{HEADER}<foo:bar/>")]).is_err());
        assert!(items(&[&format!("{HEADER}<a></b>")]).is_err());
    }
}
