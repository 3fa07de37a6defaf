//! The socket: opening it (plain or TLS) and logging in with `hello`, the writer task that
//! batches queued frames into it, frame encoding, request ids, and peer addresses as URLs.
//! Nothing here knows a session's state: that is `session`, and a socket's reader is `resume`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::ClientError;
use super::events::Welcome;
use super::options::{ClientOptions, Login};
use crate::protocol::{ClientFrame, ErrorCode, ServerFrame};

/// A client's WebSocket, over TLS for `wss://` URLs.
pub(super) type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Socket read buffer per connection: small, because a load generator opens thousands of
/// clients and chat frames are small; large frames are still read, in several chunks.
const READ_BUFFER_SIZE: usize = 4096;
/// Bytes the socket writer gathers before a write: pipelined sends share a syscall.
const WRITE_BUFFER_SIZE: usize = 4096;

/// Hands out request ids: a counter, so ids are unique for the client's whole life (across
/// reconnects) and their order is the order of submission.
#[derive(Debug)]
pub(super) struct IdGen(AtomicU64);

impl IdGen {
    pub(super) fn new() -> Self {
        IdGen(AtomicU64::new(1))
    }
    pub(super) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// A peer address as a WebSocket URL: full URLs pass through, `host:port` gets `ws://…/ws`.
pub fn peer_url(addr: &str) -> String {
    if addr.contains("://") { addr.to_owned() } else { format!("ws://{addr}/ws") }
}

/// The TLS config for a `wss://` URL: the options', or one shared config with the Mozilla roots.
fn tls_config(options: &ClientOptions) -> Arc<rustls::ClientConfig> {
    static DEFAULT: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    options.tls.clone().unwrap_or_else(|| {
        DEFAULT.get_or_init(|| crate::tls::client_config(None).expect("the built-in roots make a valid config")).clone()
    })
}

/// Redirects to a user's home node a login follows before it gives up (a loop, say two nodes
/// with different views during a takeover, must end).
const MAX_REDIRECTS: usize = 3;

/// `rate_limited` answers to `hello` (a node's login budget, after a failover) a login waits
/// out before it gives up.
const MAX_LOGIN_RETRIES: usize = 30;

/// Open the socket and log in, following a `welcome` that redirects to the user's home node
/// and waiting out a `rate_limited` answer's `retry_after_ms` (docs/protocol.md); answers the
/// stream, the `welcome`, and the URL that served it.
pub(super) async fn handshake(
    url: &str,
    login: &Login,
    options: &ClientOptions,
) -> Result<(WsStream, Welcome, String), ClientError> {
    let mut url = url.to_owned();
    let (mut redirects, mut retries) = (0, 0);
    loop {
        match handshake_once(&url, login, options).await? {
            Hello::Welcome(ws, welcome) => return Ok((*ws, welcome, url)),
            Hello::Redirect(to) if redirects < MAX_REDIRECTS => {
                redirects += 1;
                url = to;
            }
            Hello::Redirect(to) => {
                return Err(ClientError::Protocol(format!("more than {MAX_REDIRECTS} redirects (last to {to}): the nodes disagree on this user's home")));
            }
            Hello::RetryAfter(wait, _) if retries < MAX_LOGIN_RETRIES => {
                retries += 1;
                tokio::time::sleep(wait).await;
            }
            Hello::RetryAfter(_, message) => return Err(ClientError::Server { code: ErrorCode::RateLimited, message }),
        }
    }
}

/// How one `hello` was answered.
enum Hello {
    Welcome(Box<WsStream>, Welcome),
    /// Log in at this URL instead.
    Redirect(String),
    /// The node's login budget is spent: try again after this long.
    RetryAfter(std::time::Duration, String),
}

/// One connection and `hello`, bounded by the connect timeout.
async fn handshake_once(url: &str, login: &Login, options: &ClientOptions) -> Result<Hello, ClientError> {
    let attempt = async {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_SIZE)
            .write_buffer_size(WRITE_BUFFER_SIZE);
        let connector = url.starts_with("wss://").then(|| tokio_tungstenite::Connector::Rustls(tls_config(options)));
        let (mut ws, _response) = tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, connector).await?;
        ws.send(Message::text(encode(&login.hello()))).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                    Ok(ServerFrame::Welcome { redirect: Some(to), .. }) => return Ok(Hello::Redirect(to)),
                    Ok(ServerFrame::Welcome { user, node, session, service, guest, peers, .. }) => {
                        return Ok(Hello::Welcome(Box::new(ws), Welcome { user, node, session, service, guest, peers }));
                    }
                    Ok(ServerFrame::Error { code: ErrorCode::RateLimited, message, retry_after_ms: Some(ms), .. }) => {
                        // Capped: a server's answer must not park the client for long.
                        return Ok(Hello::RetryAfter(std::time::Duration::from_millis(ms.min(30_000)), message));
                    }
                    Ok(ServerFrame::Error { code, message, .. }) => {
                        return Err(ClientError::Server { code, message });
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(ClientError::Protocol(format!("unreadable frame before welcome: {e}"))),
                },
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Protocol(format!("closed before welcome: {}", close_reason(frame.as_ref()))));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ClientError::Disconnected),
            }
        }
    };
    tokio::time::timeout(options.connect_timeout, attempt).await.unwrap_or(Err(ClientError::Timeout))
}

/// How a close frame reads in a reason: its code and text.
pub(super) fn close_reason(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
        None => "close".to_owned(),
    }
}

/// The socket writer: writes the frames queued in `rx`, flushing once per batch, until every
/// sender is gone; then closes the socket.
pub(super) async fn write_loop(mut sink: SplitSink<WsStream, Message>, mut rx: mpsc::Receiver<Message>) {
    while let Some(first) = rx.recv().await {
        // Feed everything already queued, then flush once: pipelined frames share writes.
        let mut next = Some(first);
        while let Some(msg) = next {
            if sink.feed(msg).await.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    // Every sender is gone: the client closed or dropped this connection.
    let _ = sink.close().await;
}

/// A client frame as JSON text.
pub(super) fn encode(frame: &ClientFrame) -> String {
    serde_json::to_string(frame).expect("client frames always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request ids are unique, increasing, and never reused, even across threads.
    #[test]
    fn request_ids_are_unique_and_increasing() {
        let ids = Arc::new(IdGen::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids = Arc::clone(&ids);
                std::thread::spawn(move || (0..1000).map(|_| ids.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        for chunk in all.chunks(1000) {
            assert!(chunk.windows(2).all(|w| w[0] < w[1]));
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
        assert_eq!(all[0], 1);
    }
}
