//! XMPP over WebSocket (RFC 7395) at `/xmpp-websocket` on the client listener (subprotocol
//! `xmpp`): the same negotiation and session as c2s over TCP, framed one element per message.
//!
//! The client opens with `<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='…'
//! version='1.0'/>` and ends with `<close/>`; there is no STARTTLS (the listener's TLS is
//! `wss://`). Each message is parsed as a child of an implicit stream in `jabber:client`, with
//! the same size and depth limits as TCP. Each element Stoa sends is its own message and
//! declares its namespaces (`jabber:client` on stanzas, the streams namespace on
//! `<stream:features/>` and `<stream:error/>`).

use super::c2s::{negotiate_in_time, run};
use super::channel::{Channel, End, ItemSource, TextSink};
use super::sm::Resumption;
use super::stream::{Item, StreamReader};
use super::{escape, ns};
use crate::gateway::Gateway;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The RFC 7395 framing namespace (`<open/>`, `<close/>`).
pub use super::ns::FRAMING;

/// The path of XMPP over WebSocket on the client listener.
pub const PATH: &str = "/xmpp-websocket";

/// Serve one upgraded WebSocket connection as an XMPP client stream; `secure` when it runs
/// over TLS (`wss://`).
pub async fn serve_connection<S>(ws: WebSocketStream<S>, peer: SocketAddr, secure: bool, gateway: Arc<Gateway>, resumption: Arc<Resumption>, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut channel = WsChannel::new(ws, secure, &gateway.settings.xmpp);
    match negotiate_in_time(&mut channel, &gateway, None, peer, &resumption, &shutdown).await {
        Ok(bound) => run(channel, peer, bound, gateway, resumption, shutdown).await,
        Err(end) => channel.end(end).await,
    }
}

/// A fresh reader with the implicit stream every message is read in.
fn framed_reader(settings: &crate::config::XmppSettings) -> StreamReader {
    let mut reader = StreamReader::new(settings.max_stanza_bytes, settings.max_depth);
    let mut header = Vec::new();
    let implicit = format!("<stream:stream xmlns='{}' xmlns:stream='{}'>", ns::CLIENT, ns::STREAM);
    reader.feed(implicit.as_bytes(), &mut header).expect("the implicit stream header is well-formed");
    reader
}

/// The element of one message as an item: `<open/>` and `<close/>` are the stream's ends.
fn framed_item(item: Item) -> Item {
    match item {
        Item::Stanza(el) if el.is("open", FRAMING) => Item::Open(el),
        Item::Stanza(el) if el.is("close", FRAMING) => Item::Close,
        other => other,
    }
}

/// Read messages until one completes an item.
async fn next_framed<R>(source: &mut R, reader: &mut StreamReader, items: &mut VecDeque<Item>) -> Result<Item, End>
where
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        if let Some(item) = items.pop_front() {
            return Ok(framed_item(item));
        }
        match source.next().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(End::Gone),
            Some(Ok(Message::Text(text))) => {
                let mut out = Vec::new();
                reader.feed(text.as_bytes(), &mut out)?;
                items.extend(out);
            }
            Some(Ok(Message::Binary(_))) => return Err(End::Stream("bad-format", "RFC 7395 frames are text".into())),
            Some(Ok(_)) => {}
        }
    }
}

/// One element as its own message: top-level elements declare their namespaces.
pub fn framed_element(text: &str) -> String {
    let name_end = text.find([' ', '>', '/']).unwrap_or(text.len());
    let tag_end = text.find('>').unwrap_or(text.len());
    let declares = text[..tag_end].contains("xmlns=");
    match &text[..name_end] {
        "<stream:features" | "<stream:error" => format!("{} xmlns:stream='{}'{}", &text[..name_end], ns::STREAM, &text[name_end..]),
        "<iq" | "<message" | "<presence" if !declares => format!("{} xmlns='{}'{}", &text[..name_end], ns::CLIENT, &text[name_end..]),
        _ => text.to_owned(),
    }
}

/// A WebSocket carrying an XMPP stream, during negotiation.
struct WsChannel<S> {
    ws: WebSocketStream<S>,
    reader: StreamReader,
    items: VecDeque<Item>,
    secure: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsChannel<S> {
    fn new(ws: WebSocketStream<S>, secure: bool, settings: &crate::config::XmppSettings) -> Self {
        WsChannel { ws, reader: framed_reader(settings), items: VecDeque::new(), secure }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Channel for WsChannel<S> {
    type Reader = WsReader<S>;
    type Writer = WsWriter<S>;

    async fn next(&mut self) -> Result<Item, End> {
        next_framed(&mut self.ws, &mut self.reader, &mut self.items).await
    }

    async fn write(&mut self, text: &str) -> Result<(), End> {
        let send = self.ws.send(Message::text(framed_element(text)));
        tokio::time::timeout(Duration::from_secs(10), send).await.map_err(|_| End::Gone)?.map_err(|_| End::Gone)
    }

    async fn header(&mut self, domain: &str) -> Result<(), End> {
        let id = uuid::Uuid::new_v4();
        self.write(&format!("<open xmlns='{FRAMING}' id='{id}' from='{}' version='1.0' xml:lang='en'/>", escape(domain))).await
    }

    fn restart(&mut self) {
        self.items.clear();
    }

    fn can_starttls(&self) -> bool {
        false
    }

    async fn starttls(&mut self, _tls: &crate::tls::ServerTls) -> Result<(), End> {
        Err(End::Stream("unsupported-feature", "no STARTTLS over WebSocket: use wss://".into()))
    }

    fn secure(&self) -> bool {
        self.secure
    }

    async fn end(mut self, end: End) {
        if let Some(error) = end.error_element() {
            tracing::debug!(%error, "xmpp stream error");
            let _ = self.write(&error).await;
        }
        if !matches!(end, End::Gone) {
            let _ = self.write(&format!("<close xmlns='{FRAMING}'/>")).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }

    fn split(self) -> (WsReader<S>, WsWriter<S>) {
        let (sink, source) = self.ws.split();
        (WsReader { source, reader: self.reader, items: self.items }, WsWriter { sink })
    }
}

/// A bound WebSocket session's reading half.
struct WsReader<S> {
    source: SplitStream<WebSocketStream<S>>,
    reader: StreamReader,
    items: VecDeque<Item>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> ItemSource for WsReader<S> {
    async fn next(&mut self) -> Result<Item, End> {
        next_framed(&mut self.source, &mut self.reader, &mut self.items).await
    }
}

/// A bound WebSocket session's writing half: one message per element, one flush per batch.
struct WsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TextSink for WsWriter<S> {
    async fn send(&mut self, batch: &[String]) -> std::io::Result<()> {
        for element in batch {
            self.sink.feed(Message::text(framed_element(element))).await.map_err(std::io::Error::other)?;
        }
        self.sink.flush().await.map_err(std::io::Error::other)
    }

    async fn close(&mut self, tail: &str) {
        if !tail.is_empty() {
            let _ = self.sink.feed(Message::text(framed_element(tail))).await;
        }
        let _ = self.sink.send(Message::text(format!("<close xmlns='{FRAMING}'/>"))).await;
        let _ = self.sink.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_declares_its_namespaces() {
        assert_eq!(framed_element("<message to='a'><body>x</body></message>"), "<message xmlns='jabber:client' to='a'><body>x</body></message>");
        assert_eq!(framed_element("<iq type='result' id='1'/>"), "<iq xmlns='jabber:client' type='result' id='1'/>");
        assert!(framed_element("<stream:features><bind/></stream:features>").starts_with("<stream:features xmlns:stream='http://etherx.jabber.org/streams'>"));
        assert_eq!(framed_element("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"), "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
        assert_eq!(framed_element("<message xmlns='jabber:client' to='a'/>"), "<message xmlns='jabber:client' to='a'/>");
    }

    #[test]
    fn open_and_close_frame_the_stream() {
        let settings = crate::config::XmppSettings::default();
        let mut reader = framed_reader(&settings);
        let mut out = Vec::new();
        reader.feed(b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>", &mut out).unwrap();
        reader.feed(b"<message xmlns='jabber:client' to='r@s' type='groupchat'><body>hi</body></message>", &mut out).unwrap();
        reader.feed(b"<presence/>", &mut out).unwrap();
        reader.feed(b"<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>", &mut out).unwrap();
        let items: Vec<Item> = out.into_iter().map(framed_item).collect();
        assert!(matches!(&items[0], Item::Open(o) if o.attr("to") == Some("localhost")));
        assert!(matches!(&items[1], Item::Stanza(m) if m.is("message", ns::CLIENT)));
        assert!(matches!(&items[2], Item::Stanza(p) if p.is("presence", ns::CLIENT)));
        assert!(matches!(items[3], Item::Close));
    }
}
