//! The HTTP side of a client connection before it is a WebSocket: read the request head
//! (bounded in size; the caller bounds it in time), answer anything that is not a WebSocket
//! upgrade of a known path with a plain HTTP error, and hand the head back to tungstenite
//! through [`Prefixed`] so it performs the upgrade itself.
//!
//! Reading the head here, rather than letting tungstenite do it, is what lets a plain
//! `GET /ws` (a browser, curl, a health checker) get a readable `426` instead of a silently
//! closed socket, and lets the connection slot be taken only once a whole request has
//! arrived: a client that trickles its headers holds a handshake slot for at most the
//! handshake timeout, never a connection slot.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Headers parsed at most.
const MAX_HEADERS: usize = 32;

/// What the request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// The method (`GET`, …).
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The request carries `Upgrade: websocket` (the rest of the upgrade tungstenite checks).
    pub websocket: bool,
}

/// Why no head could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("the connection closed before a whole request arrived")]
    Closed,
    #[error("request head over {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("not an HTTP request")]
    Malformed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Read one request head from `stream`; returns it and every byte read so far (the head and
/// anything after it), to be replayed to the WebSocket handshake.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Head, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path.unwrap_or("/").split('?').next().unwrap_or("/").to_owned();
                let websocket = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("upgrade") && std::str::from_utf8(h.value).is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
                });
                let method = req.method.unwrap_or("GET").to_owned();
                return Ok((Head { method, path, websocket }, buf));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

/// Answer with a plain-text HTTP error and close.
pub async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, status: u16, reason: &str, body: &str) {
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Answer with one of the chat page's files (`crate::web::CHAT`) under `csp`, and close;
/// `HEAD` gets the headers only.
pub async fn serve_file<S: AsyncWrite + Unpin>(stream: &mut S, asset: &crate::web::Asset, csp: &str, head_only: bool) {
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nContent-Security-Policy: {csp}\r\nConnection: close\r\n",
        asset.content_type,
        asset.body.len()
    );
    for (name, value) in crate::web::HEADERS {
        answer.push_str(&format!("{name}: {value}\r\n"));
    }
    answer.push_str("\r\n");
    let mut bytes = answer.into_bytes();
    if !head_only {
        bytes.extend_from_slice(asset.body);
    }
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

/// A stream that first yields `prefix` (bytes already read from `inner`), then reads `inner`;
/// writes go straight to `inner`.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new(); // the head is not kept for the connection's life
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_head_is_read_and_replayed_whole() {
        let request = b"GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\nextra";
        let mut input: &[u8] = request;
        let (head, read) = read_head(&mut input).await.unwrap();
        assert_eq!(head, Head { method: "GET".into(), path: "/ws".into(), websocket: true });
        let mut replay = Prefixed::new(read, &b"more"[..]);
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, [&request[..], b"more"].concat());
    }

    #[tokio::test]
    async fn plain_get_oversized_and_garbage_heads() {
        let mut plain: &[u8] = b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(!read_head(&mut plain).await.unwrap().0.websocket);
        let big = format!("GET /ws HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(read_head(&mut big.as_bytes()).await, Err(HeadError::TooLarge)));
        assert!(matches!(read_head(&mut &b"\x16\x03\x01 binary"[..]).await, Err(HeadError::Malformed)));
        assert!(matches!(read_head(&mut &b"GET /ws HTTP/1.1\r\nHo"[..]).await, Err(HeadError::Closed)));
    }
}
