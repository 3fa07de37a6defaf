//! The WebSocket listener (`ws://HOST:PORT/ws`, or `wss://` with `[tls]`: the TLS handshake runs
//! first, bounded by [`crate::tls::HANDSHAKE_TIMEOUT`]): accepts connections, enforces the transport
//! rules (text frames only, UTF-8, frame size, idle timeout, login timeout), and runs one reader
//! (feeding the [`Connection`]) and one writer (draining the session queue, coalescing every
//! frame already queued into one flush) per connection.

use crate::protocol::close_code;
use crate::router::{Connection, Flow, Router};
use crate::session::{KillReason, Outbound};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most frames written per flush: bounds the latency of the first frame in a burst.
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// Bytes of outgoing frames gathered before a socket write.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// How long the writer may take to push one batch into the socket before the client counts as
/// a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve clients on `listener` (over TLS when `tls` is given) until `shutdown`; returns once
/// every connection has ended.
pub async fn serve(listener: TcpListener, router: Arc<Router>, tls: Option<crate::tls::ServerTls>, shutdown: CancellationToken) {
    let limits = &router.settings.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    router.accept_result(true);
                    a
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    router.accept_result(false);
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let permit = slots.clone().try_acquire_owned().ok();
        let router = router.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            router.count_connection(1);
            match tls {
                None => run_connection(stream, router.clone(), shutdown, permit.is_some()).await,
                Some(tls) => {
                    let accepted = tokio::select! {
                        a = tls.accept(stream) => Some(a),
                        _ = shutdown.cancelled() => None,
                    };
                    match accepted {
                        Some(Ok(stream)) => run_connection(stream, router.clone(), shutdown, permit.is_some()).await,
                        Some(Err(e)) => {
                            metrics::counter!("stoa_tls_handshake_failures_total", "listener" => "client").increment(1);
                            tracing::debug!(%peer, error = %e, "client TLS handshake failed");
                        }
                        None => {}
                    }
                }
            }
            router.count_connection(-1);
            tracing::trace!(%peer, "connection ended");
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn run_connection<S>(stream: S, router: Arc<Router>, shutdown: CancellationToken, admitted: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = router.settings.limits.clone();
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        // Frames accumulate up to this much before a write; the writer flushes after each batch,
        // so a burst of queued frames becomes one syscall (coalescing).
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(limits.max_frame_bytes * 4 + 65536)
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes));
    // tungstenite's handshake callback fixes this signature, large error variant and all.
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, body: &str| {
            let mut r = ErrorResponse::new(Some(body.to_owned()));
            *r.status_mut() = status;
            Err(r)
        };
        if req.uri().path() != "/ws" {
            return refuse(StatusCode::NOT_FOUND, "Stoa speaks WebSocket at /ws\n");
        }
        if !admitted {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
        }
        Ok(resp)
    };
    let ws = match tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "websocket handshake failed");
            return;
        }
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Outbound>(limits.outbound_queue);
    let kill = CancellationToken::new();
    let mut conn = Connection::new(router.clone(), tx, kill.clone());

    // Writer: everything the client receives goes through here, in queue order.
    let writer_kill = kill.clone();
    let close_with: Arc<std::sync::Mutex<Option<(u16, &'static str)>>> = Arc::default();
    let writer_close = close_with.clone();
    let writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(16);
        loop {
            tokio::select! {
                biased;
                _ = writer_kill.cancelled() => break,
                first = rx.recv() => match first {
                    None => break,
                    Some(item) => {
                        batch.push(item);
                        while batch.len() < MAX_FRAMES_PER_FLUSH {
                            match rx.try_recv() { Ok(item) => batch.push(item), Err(_) => break }
                        }
                        let write = async {
                            for item in batch.drain(..) {
                                let msg = match item {
                                    Outbound::Frame(text) => Message::Text(text),
                                    Outbound::Ping => Message::Ping(Default::default()),
                                };
                                sink.feed(msg).await?;
                            }
                            sink.flush().await
                        };
                        let result = tokio::select! {
                            r = tokio::time::timeout(WRITE_TIMEOUT, write) => r,
                            _ = writer_kill.cancelled() => break,
                        };
                        match result {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return, // the socket is gone
                            Err(_) => { writer_kill.cancel(); break; }
                        }
                    }
                },
            }
        }
        let (code, reason) = writer_close.lock().expect("close lock").take().unwrap_or((close_code::POLICY, "slow consumer"));
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    });

    let close = |code: u16, reason: &'static str| {
        *close_with.lock().expect("close lock") = Some((code, reason));
        kill.cancel();
    };
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let hello_deadline = tokio::time::Instant::now() + Duration::from_millis(limits.hello_timeout_ms);
    let mut pinged = false;
    loop {
        let wait = if conn.session().is_none() {
            hello_deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            idle
        };
        let next = tokio::select! {
            _ = kill.cancelled() => {
                if conn.session().and_then(|s| s.killed_for()) == Some(KillReason::Moved) {
                    close(close_code::GOING_AWAY, "node failed over; resume on its peer");
                }
                break;
            }
            _ = shutdown.cancelled() => {
                if let Some(s) = conn.session() { s.kill(KillReason::Shutdown); }
                close(close_code::GOING_AWAY, "server shutting down");
                break;
            }
            next = tokio::time::timeout(wait, source.next()) => next,
        };
        let msg = match next {
            Err(_) if conn.session().is_none() => {
                close(close_code::POLICY, "no hello in time");
                break;
            }
            Err(_) if !pinged => {
                pinged = true;
                conn.ping();
                continue;
            }
            Err(_) => {
                close(close_code::GOING_AWAY, "idle timeout");
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                match e {
                    WsError::Capacity(_) => close(close_code::TOO_BIG, "frame too large"),
                    WsError::Utf8(_) => close(close_code::INVALID_PAYLOAD, "invalid UTF-8"),
                    WsError::Protocol(_) => close(close_code::PROTOCOL_ERROR, "protocol error"),
                    _ => {}
                }
                metrics::counter!("stoa_transport_errors_total").increment(1);
                break;
            }
            Ok(Some(Ok(msg))) => msg,
        };
        pinged = false;
        match msg {
            Message::Text(text) => {
                if let Flow::Close(code, reason) = conn.handle_text(text.as_str()).await {
                    close(code, reason);
                    break;
                }
            }
            Message::Binary(_) => {
                close(close_code::UNSUPPORTED_DATA, "binary frames are not supported; send JSON text");
                break;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    conn.closed();
    if !kill.is_cancelled() {
        close(close_code::NORMAL, "bye");
    }
    let _ = writer.await;
}
