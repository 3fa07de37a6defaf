//! Raw protocol v1 connections for the load generator: small buffers, hand-built request
//! frames, and a fast path that reads `message` and `ack` frames without a full JSON parse.

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// One client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// How long a setup request (hello, create, join) may take before the bench gives up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the server listens: a loopback `ws://` URL and its socket address.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: String,
    pub addr: SocketAddr,
}

impl Endpoint {
    /// Check `url` is `ws://<loopback>:<port>/…` (the bench never loads a remote host).
    pub fn parse(url: &str) -> anyhow::Result<Endpoint> {
        let parsed = url::Url::parse(url).with_context(|| format!("invalid URL {url}"))?;
        if parsed.scheme() != "ws" {
            bail!("--url must be ws://… (the bench speaks plain WebSocket on loopback), got {url}");
        }
        let host = parsed.host_str().context("--url has no host")?;
        let port = parsed.port().unwrap_or(80);
        let ip: std::net::IpAddr = match host {
            "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
            h => h.trim_matches(['[', ']']).parse().with_context(|| format!("--url host {h} must be a loopback IP"))?,
        };
        if !ip.is_loopback() {
            bail!("the bench only loads loopback servers; {ip} is not loopback");
        }
        Ok(Endpoint { url: url.to_owned(), addr: SocketAddr::new(ip, port) })
    }
}

/// Open a WebSocket with small buffers (tungstenite's default read buffer is 128 KiB per
/// connection, which thousands of connections cannot afford).
pub async fn connect(ep: &Endpoint) -> anyhow::Result<Ws> {
    connect_with_read_buffer(ep, 4096).await
}

/// [`connect`] with a read buffer of `read_buffer` bytes (it grows for a larger frame).
pub async fn connect_with_read_buffer(ep: &Endpoint, read_buffer: usize) -> anyhow::Result<Ws> {
    let stream = TcpStream::connect(ep.addr).await.with_context(|| format!("connecting to {}", ep.addr))?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, _) = tokio_tungstenite::client_async_with_config(ep.url.as_str(), stream, Some(config))
        .await
        .with_context(|| format!("WebSocket handshake with {}", ep.url))?;
    Ok(ws)
}

/// What `welcome` told us.
#[derive(Clone, Debug)]
pub struct Welcome {
    pub node: String,
    pub service: String,
}

/// Log in as guest `user`.
pub async fn hello(ws: &mut Ws, user: &str) -> anyhow::Result<Welcome> {
    let frame = format!(r#"{{"op":"hello","v":1,"user":"{user}","id":"h"}}"#);
    let answer = request(ws, frame, "h").await.with_context(|| format!("hello as {user}"))?;
    let field = |k: &str| answer.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    Ok(Welcome { node: field("node"), service: field("service") })
}

/// Send a request and wait for the answer whose `re` is `re`, skipping events. An `error`
/// answer becomes `Err` with its code first (`conflict: …`).
pub async fn request(ws: &mut Ws, frame: String, re: &str) -> anyhow::Result<serde_json::Value> {
    ws.send(Message::text(frame)).await.context("sending a request")?;
    tokio::time::timeout(SETUP_TIMEOUT, answer(ws, re)).await.context("no answer in time")?
}

/// Wait for the answer to `re`.
pub async fn answer(ws: &mut Ws, re: &str) -> anyhow::Result<serde_json::Value> {
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(c))) => bail!("server closed the connection: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading from the server"),
            None => bail!("server closed the connection"),
        };
        let head = match Head::parse(text.as_str()) {
            Some(h) => h,
            None => continue,
        };
        if head.re.as_deref() != Some(re) {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text.as_str()).context("parsing an answer")?;
        if head.op == "error" {
            let code = value.get("code").and_then(|v| v.as_str()).unwrap_or("?");
            let message = value.get("message").and_then(|v| v.as_str()).unwrap_or("");
            bail!("{code}: {message}");
        }
        return Ok(value);
    }
}

/// The `op` and `re` of a server frame.
#[derive(Deserialize)]
pub struct Head<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    #[serde(default, borrow)]
    pub re: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
}

impl<'a> Head<'a> {
    pub fn parse(text: &'a str) -> Option<Head<'a>> {
        serde_json::from_str(text).ok()
    }
}

/// A server frame as the load loop needs it.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A `message`; the send time when its body starts with one.
    Message { sent_ns: Option<u64> },
    /// An `ack` of the send whose id (its send time) is `re`.
    Ack { sent_ns: Option<u64>, duplicate: bool },
    /// An `error` answer (`re` is the failed request's id, if any).
    Error { re: Option<Cow<'a, str>>, code: Cow<'a, str> },
    /// Anything else (presence, joined, …).
    Other,
}

const MESSAGE_PREFIX: &str = r#"{"op":"message","#;
const ACK_PREFIX: &str = r#"{"op":"ack","re":""#;

/// Classify a frame. `message` and `ack` frames (the server writes `op` first) are read by
/// prefix; everything else goes through serde.
pub fn classify(text: &str) -> Incoming<'_> {
    if text.starts_with(MESSAGE_PREFIX) {
        let sent_ns = text.find(r#","body":""#).and_then(|i| leading_number(&text[i + 9..]));
        return Incoming::Message { sent_ns };
    }
    if let Some(rest) = text.strip_prefix(ACK_PREFIX) {
        return Incoming::Ack { sent_ns: leading_number(rest), duplicate: text.contains(r#""duplicate":true"#) };
    }
    match Head::parse(text) {
        Some(h) if h.op == "error" => Incoming::Error { re: h.re, code: h.code.unwrap_or(Cow::Borrowed("unknown")) },
        Some(h) if h.op == "message" => Incoming::Message { sent_ns: None },
        _ => Incoming::Other,
    }
}

/// The decimal number at the start of `s`, if any.
fn leading_number(s: &str) -> Option<u64> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

/// A `send` frame: the id and the body's first 20 characters are the send time, the body is
/// padded with `pad` to its size.
pub fn send_frame(room: &str, now_ns: u64, cid: u64, pad: &str) -> String {
    format!(r#"{{"op":"send","id":"{now_ns}","room":"{room}","body":"{now_ns:020}{pad}","cid":"{cid}"}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RoomAddr;
    use crate::protocol::{MessageEvent, RequestId, ServerFrame};

    #[test]
    fn messages_and_acks_are_read_by_prefix() {
        let msg = ServerFrame::Message(MessageEvent {
            room: RoomAddr("r@s".into()),
            seq: 7,
            from: "b1".into(),
            nick: "n1".into(),
            body: format!("{:020}xxxx", 123_456_789u64),
            cid: "1".into(),
            ts: 5,
        })
        .to_json();
        assert_eq!(classify(&msg), Incoming::Message { sent_ns: Some(123_456_789) });
        let ack = ServerFrame::Ack { re: RequestId("42".into()), room: RoomAddr("r@s".into()), seq: 1, ts: 2, duplicate: false }.to_json();
        assert_eq!(classify(&ack), Incoming::Ack { sent_ns: Some(42), duplicate: false });
        let dup = ServerFrame::Ack { re: RequestId("42".into()), room: RoomAddr("r@s".into()), seq: 1, ts: 2, duplicate: true }.to_json();
        assert_eq!(classify(&dup), Incoming::Ack { sent_ns: Some(42), duplicate: true });
        let err = ServerFrame::error(Some(RequestId("9".into())), crate::protocol::ErrorCode::RateLimited, "slow").to_json();
        assert!(matches!(classify(&err), Incoming::Error { re: Some(r), code } if r == "9" && code == "rate_limited"));
    }

    #[test]
    fn send_frames_are_valid_client_frames() {
        let text = send_frame("r@conference.localhost", 99, 3, "xx");
        let frame = crate::protocol::parse_client_frame(&text).unwrap();
        match frame {
            crate::protocol::ClientFrame::Send { body, cid, .. } => {
                assert_eq!(body.len(), 22);
                assert_eq!(cid.0, "3");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_loopback_urls_are_accepted() {
        assert!(Endpoint::parse("ws://127.0.0.1:7450/ws").is_ok());
        assert!(Endpoint::parse("ws://localhost:7450/ws").is_ok());
        assert!(Endpoint::parse("ws://[::1]:7450/ws").is_ok());
        assert!(Endpoint::parse("ws://10.1.2.3:7450/ws").is_err());
        assert!(Endpoint::parse("wss://127.0.0.1/ws").is_err());
    }
}
