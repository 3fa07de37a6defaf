//! What an XMPP stream runs over: a TCP connection carrying one XML document (RFC 6120), or a
//! WebSocket carrying one element per message (RFC 7395). Negotiation and the bound session
//! (`super::c2s`) are written once against these traits.

use super::stream::{Item, StreamFault};
use super::{escape, ns};

/// How a stream ends.
#[derive(Debug)]
pub enum End {
    /// The connection is gone: nothing more to write.
    Gone,
    /// Close with a stream error (a condition of RFC 6120 §4.9.3) and a text.
    Stream(&'static str, String),
    /// Close with `see-other-host` naming this host (`host:port`): the client logs in there
    /// (a user's home node, docs/clusters.md), and a text.
    SeeOtherHost(String, String),
    /// Close normally.
    Close,
}

impl End {
    /// The stream error to send before the stream's end, if any.
    pub fn error_element(&self) -> Option<String> {
        match self {
            End::Stream(condition, text) => Some(stream_error(condition, text)),
            End::SeeOtherHost(host, text) => Some(format!(
                "<stream:error><see-other-host xmlns='{0}'>{1}</see-other-host><text xmlns='{0}'>{2}</text></stream:error>",
                ns::STREAM_ERRORS,
                escape(host),
                escape(text)
            )),
            End::Gone | End::Close => None,
        }
    }
}

impl From<StreamFault> for End {
    fn from(f: StreamFault) -> Self {
        metrics::counter!("stoa_transport_errors_total", "kind" => "xmpp").increment(1);
        match f {
            StreamFault::NotWellFormed(m) => End::Stream("not-well-formed", m),
            StreamFault::PolicyViolation(m) => End::Stream("policy-violation", m),
        }
    }
}

/// A stream error element.
pub fn stream_error(condition: &str, text: &str) -> String {
    format!("<stream:error><{condition} xmlns='{0}'/><text xmlns='{0}'>{1}</text></stream:error>", ns::STREAM_ERRORS, escape(text))
}

/// A stream being negotiated: items in, elements out, one task.
pub trait Channel: Send + Sized {
    type Reader: ItemSource;
    type Writer: TextSink;
    /// The next item (stream header, element, end).
    fn next(&mut self) -> impl Future<Output = Result<Item, End>> + Send;
    /// Write whole elements.
    fn write(&mut self, text: &str) -> impl Future<Output = Result<(), End>> + Send;
    /// Our stream header (`<stream:stream>`, or `<open/>` on a WebSocket).
    fn header(&mut self, domain: &str) -> impl Future<Output = Result<(), End>> + Send;
    /// A new stream begins (after STARTTLS or SASL): nothing read so far counts.
    fn restart(&mut self);
    /// Whether STARTTLS can be offered (TCP without TLS yet).
    fn can_starttls(&self) -> bool;
    /// Switch to TLS after `<proceed/>`.
    fn starttls(&mut self, tls: &crate::tls::ServerTls) -> impl Future<Output = Result<(), End>> + Send;
    /// The traffic is encrypted (TLS, or a WebSocket over `wss://`).
    fn secure(&self) -> bool;
    /// End the stream: the error (if any), the stream's end, the connection closed.
    fn end(self, end: End) -> impl Future<Output = ()> + Send;
    /// The bound session's halves: stanzas in, the writer task's text out.
    fn split(self) -> (Self::Reader, Self::Writer);
}

/// Where a bound session's items come from.
pub trait ItemSource: Send {
    fn next(&mut self) -> impl Future<Output = Result<Item, End>> + Send;
}

/// Where a bound session's writer task writes.
pub trait TextSink: Send + 'static {
    /// Write `batch` (whole elements, in order), in as few writes as the transport allows.
    fn send(&mut self, batch: &[String]) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Write `tail` (a stream error, or nothing), then the stream's end, and close.
    fn close(&mut self, tail: &str) -> impl Future<Output = ()> + Send;
}
