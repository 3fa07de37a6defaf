//! The WebSocket listener (`ws://HOST:PORT/ws`, or `wss://` with `[tls]`: the TLS handshake comes
//! first, within the same handshake deadline): accepts connections, enforces the transport
//! rules (text frames only, UTF-8, frame size, idle timeout, login timeout), and runs one reader
//! (feeding the [`Connection`]) and one writer (draining the session queue, coalescing every
//! frame already queued into one flush) per connection.

use crate::protocol::close_code;
use crate::gateway::Gateway;
use crate::v1::{Connection, Flow, Outbound};
use crate::session::KillReason;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use super::upgrade::{self, HeadError, Prefixed};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most frames written per flush: bounds the latency of the first frame in a burst.
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// Bytes of outgoing frames gathered before a socket write.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// How long the writer may take to push one batch into the socket before the client counts as
/// a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest frame the server writes. A `joined` of a full room is the largest frame there is
/// (answers are paged by `limits.max_answer_bytes`); this equals the largest frame common
/// WebSocket clients accept (tungstenite's default), and bounds what one stuck connection can
/// hold in its write buffer.
const MAX_SERVER_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Serve clients on `listener` until `shutdown`; returns once every connection has ended.
///
/// A connection holds a *handshake slot* (`limits.max_pending_handshakes`) from TCP accept
/// until its WebSocket upgrade is done or `limits.handshake_timeout_ms` runs out, and a
/// *connection slot* (`limits.max_connections`) only once a whole upgrade request has arrived:
/// sockets that trickle bytes (slow-loris) cannot keep real clients out.
/// With `tls` the TLS handshake runs first, in the same slot and under the same deadline.
///
/// Each connection runs on one of `arbiters` (in turn) when there are any: the threads of the
/// room actors, so that a post reaches its room, and the room's answers and events reach the
/// connection's writer, without waking another thread (on two cores, with one arbiter, that is
/// every room). Against connections on the I/O runtime (no `arbiters`,
/// `node.client_connections_on_arbiters = false`): 8–15 % less CPU per message at 8,000 msg/s,
/// 2.3 times the fan-out, and 0–20 % more for a message forwarded to another group over the
/// node link, which stays on the I/O runtime (docs/benchmarks.md).
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<crate::tls::ServerTls>,
    resumption: Arc<crate::xmpp::sm::Resumption>,
    arbiters: Vec<actix::dev::ArbiterHandle>,
    shutdown: CancellationToken,
) {
    let mut turn = 0usize;
    let limits = &gateway.settings.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_pending_handshakes));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    gateway.accept_result(true);
                    a
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    gateway.accept_result(false);
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            metrics::counter!("stoa_connections_refused_total", "reason" => "handshakes").increment(1);
            tracing::debug!(%peer, "refused: too many connections in their handshake");
            continue; // dropping the socket closes it
        };
        let arbiter = (!arbiters.is_empty()).then(|| &arbiters[turn % arbiters.len()]);
        turn = turn.wrapping_add(1);
        let stream = match arbiter {
            None => Accepted::Here(stream),
            // Off this runtime's reactor, onto the arbiter's (inside the task, on its thread).
            Some(_) => match stream.into_std() {
                Ok(s) => Accepted::Moving(s),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "closed: the socket could not be moved to its thread");
                    continue;
                }
            },
        };
        let gateway = gateway.clone();
        let shutdown = shutdown.clone();
        let slots = slots.clone();
        let tls = tls.clone();
        let resumption = resumption.clone();
        let connection = tracker.track_future(async move {
            let stream = match stream.settle() {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "closed: the socket could not be registered on its thread");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let timeout = Duration::from_millis(gateway.settings.limits.handshake_timeout_ms);
            // The handshake's state (TLS, the request head, tungstenite's handshake) is boxed, so
            // that it is freed once the connection is up rather than sized into this task for
            // the connection's whole life; the same for each protocol's connection, which would
            // otherwise size every connection's task to the larger of the two.
            let upgraded = match tokio::time::timeout(timeout, Box::pin(upgrade_maybe_tls(stream, tls.as_ref(), &gateway, &slots))).await {
                Ok(upgraded) => upgraded,
                Err(_) => {
                    metrics::counter!("stoa_connections_refused_total", "reason" => "handshake_timeout").increment(1);
                    tracing::debug!(%peer, "closed: no WebSocket upgrade in time");
                    None
                }
            };
            drop(handshake);
            let Some((ws, endpoint, slot)) = upgraded else { return };
            gateway.count_connection(1);
            match endpoint {
                Endpoint::V1 => Box::pin(run_connection(ws, peer.ip(), gateway.clone(), shutdown)).await,
                Endpoint::Xmpp => Box::pin(crate::xmpp::websocket::serve_connection(ws, peer, tls.is_some(), gateway.clone(), resumption, shutdown)).await,
            }
            gateway.count_connection(-1);
            tracing::trace!(%peer, "connection ended");
            drop(slot);
        });
        match arbiter {
            // Dropped unrun (and the socket closed) if the arbiter has stopped.
            Some(arbiter) => {
                arbiter.spawn(connection);
            }
            None => {
                tokio::spawn(connection);
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// An accepted socket: on the reactor of the runtime that serves it, or taken off the
/// accepting one for an arbiter's.
enum Accepted {
    Here(TcpStream),
    Moving(std::net::TcpStream),
}

impl Accepted {
    /// The socket on the reactor of the thread this runs on.
    fn settle(self) -> std::io::Result<TcpStream> {
        match self {
            Accepted::Here(s) => Ok(s),
            Accepted::Moving(s) => TcpStream::from_std(s),
        }
    }
}

type Ws<S> = tokio_tungstenite::WebSocketStream<Prefixed<S>>;

/// Which protocol a WebSocket speaks, by its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    /// `/ws`: protocol v1.
    V1,
    /// `/xmpp-websocket`: XMPP (RFC 7395, subprotocol `xmpp`).
    Xmpp,
}

/// [`upgrade`] after the TLS handshake, when the listener has `[tls]`.
async fn upgrade_maybe_tls(
    stream: tokio::net::TcpStream,
    tls: Option<&crate::tls::ServerTls>,
    gateway: &Gateway,
    slots: &Arc<Semaphore>,
) -> Option<(Ws<crate::tls::MaybeTls<tokio::net::TcpStream>>, Endpoint, OwnedSemaphorePermit)> {
    let stream = match crate::tls::MaybeTls::accept(stream, tls).await {
        Ok(s) => s,
        Err(e) => {
            metrics::counter!("stoa_tls_handshake_failures_total", "listener" => "client").increment(1);
            tracing::debug!(error = %e, "client TLS handshake failed");
            return None;
        }
    };
    upgrade(stream, gateway, slots).await
}

/// Read the request, answer what is not an upgrade at `/ws` or `/xmpp-websocket` (or finds
/// every slot taken) with an HTTP error, and upgrade the rest; returns the WebSocket, what it
/// speaks and its connection slot.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, gateway: &Gateway, slots: &Arc<Semaphore>) -> Option<(Ws<S>, Endpoint, OwnedSemaphorePermit)> {
    let limits = &gateway.settings.limits;
    let (head, read) = match upgrade::read_head(&mut stream).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "no WebSocket upgrade request");
            if matches!(e, HeadError::TooLarge | HeadError::Malformed) {
                upgrade::refuse(&mut stream, 400, "Bad Request", "not an HTTP request Stoa can serve\n").await;
            }
            return None;
        }
    };
    let endpoint = match head.path.as_str() {
        "/ws" => Endpoint::V1,
        crate::xmpp::websocket::PATH => Endpoint::Xmpp,
        path if !head.websocket && chat_enabled(gateway) && let Some(asset) = crate::web::find(crate::web::CHAT, path) => {
            if head.method == "GET" || head.method == "HEAD" {
                upgrade::serve_file(&mut stream, asset, &chat_csp(gateway), head.method == "HEAD").await;
            } else {
                upgrade::refuse(&mut stream, 405, "Method Not Allowed", "the chat page answers GET only\n").await;
            }
            return None;
        }
        _ => {
            upgrade::refuse(&mut stream, 404, "Not Found", "Stoa speaks WebSocket at /ws (protocol v1) and /xmpp-websocket (XMPP)\n").await;
            return None;
        }
    };
    if !head.websocket {
        let body = match endpoint {
            Endpoint::V1 => "this is Stoa's WebSocket endpoint: connect with a WebSocket client and speak protocol v1 (docs/protocol.md)\n",
            Endpoint::Xmpp => "this is Stoa's XMPP over WebSocket endpoint (RFC 7395): connect with an XMPP client (docs/xmpp.md)\n",
        };
        upgrade::refuse(&mut stream, 426, "Upgrade Required", body).await;
        return None;
    }
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        metrics::counter!("stoa_connections_refused_total", "reason" => "max_connections").increment(1);
        upgrade::refuse(&mut stream, 503, "Service Unavailable", "too many connections\n").await;
        return None;
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        // Frames accumulate up to this much before a write; the writer flushes after each batch,
        // so a burst of queued frames becomes one syscall (coalescing).
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WRITE_BUFFER_BYTES + MAX_SERVER_FRAME_BYTES)
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes));
    // RFC 7395: an XMPP client asks for the `xmpp` subprotocol, and the answer names it.
    // (The error type is tungstenite's `ErrorResponse`, which the callback must return.)
    #[allow(clippy::result_large_err)]
    let subprotocol = |request: &Request, mut response: Response| {
        let asked = request.headers().get_all("sec-websocket-protocol").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
        if endpoint == Endpoint::Xmpp && asked.map(str::trim).any(|p| p == "xmpp") {
            response.headers_mut().insert("sec-websocket-protocol", "xmpp".parse().expect("a valid header value"));
        }
        Ok(response)
    };
    match tokio_tungstenite::accept_hdr_async_with_config(Prefixed::new(read, stream), subprotocol, Some(config)).await {
        Ok(ws) => Some((ws, endpoint, slot)),
        Err(e) => {
            tracing::debug!(error = %e, "websocket handshake failed");
            None
        }
    }
}

/// Whether this listener serves the chat page (`web.chat`, by default in dev mode only).
fn chat_enabled(gateway: &Gateway) -> bool {
    gateway.settings.web.chat_enabled(gateway.settings.dev_mode)
}

/// The chat page's CSP: its WebSockets may go to this node and to every client URL of the
/// cluster (where it resumes after a failover).
fn chat_csp(gateway: &Gateway) -> String {
    let nodes = gateway.settings.cluster.groups.iter().flat_map(|g| &g.nodes);
    crate::web::chat_csp(nodes.filter_map(|n| crate::web::origin_of(&n.client)))
}

async fn run_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(ws: Ws<S>, address: std::net::IpAddr, gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let limits = gateway.settings.limits.clone();
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = crate::v1::outbound::queue(limits.outbound_queue);
    let kill = CancellationToken::new();
    let mut conn = Connection::new(gateway.clone(), tx, kill.clone()).from_address(address);

    // Writer: everything the client receives goes through here, in queue order.
    let writer_kill = kill.clone();
    let close_with: Arc<std::sync::Mutex<Option<(u16, &'static str)>>> = Arc::default();
    let writer_close = close_with.clone();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = writer_kill.cancelled() => break,
                batch = rx.recv_batch(MAX_FRAMES_PER_FLUSH) => match batch {
                    None => break,
                    Some(batch) => {
                        // The batch takes the queue's buffer with it: an idle connection keeps none.
                        let write = async {
                            for item in batch {
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
                            Err(_) => {
                                metrics::counter!("stoa_slow_consumers_total").increment(1);
                                tracing::info!("disconnecting a slow consumer: a write took over {WRITE_TIMEOUT:?}");
                                writer_kill.cancel();
                                break;
                            }
                            Ok(Err(e)) => {
                                // The socket is gone or cannot take the frame: end the connection
                                // (the reader leaves its rooms) rather than leave it half dead.
                                metrics::counter!("stoa_write_failures_total").increment(1);
                                tracing::debug!(error = %e, "write failed; closing the connection");
                                writer_kill.cancel();
                                return;
                            }
                        }
                    }
                },
            }
        }
        let deliberate = writer_close.lock().expect("close lock").take();
        if deliberate.is_some() {
            // The connection closes on purpose (a redirect to the user's home node, too many
            // failed logins): the frames that say why, queued just before, go out first.
            let last = async {
                for item in rx.take_queued(MAX_FRAMES_PER_FLUSH) {
                    if let Outbound::Frame(text) = item {
                        sink.feed(Message::Text(text)).await?;
                    }
                }
                sink.flush().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), last).await;
        }
        let (code, reason) = deliberate.unwrap_or((close_code::POLICY, "slow consumer"));
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
                match conn.session().and_then(|s| s.killed_for()) {
                    Some(KillReason::Moved) => close(close_code::GOING_AWAY, "node failed over; resume on its peer"),
                    Some(KillReason::Kicked) => close(close_code::POLICY, "session ended by an administrator"),
                    _ => {}
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
                // Frame-level violations are counted by kind; a client that just went away
                // (reset, no close handshake) is no violation.
                let violation = match e {
                    WsError::Capacity(_) => Some((close_code::TOO_BIG, "frame too large", "too_large")),
                    WsError::Utf8(_) => Some((close_code::INVALID_PAYLOAD, "invalid UTF-8", "utf8")),
                    WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
                    WsError::Protocol(_) => Some((close_code::PROTOCOL_ERROR, "protocol error", "protocol")),
                    _ => None,
                };
                match violation {
                    Some((code, reason, kind)) => {
                        metrics::counter!("stoa_transport_errors_total", "kind" => kind).increment(1);
                        close(code, reason);
                    }
                    None => metrics::counter!("stoa_connections_lost_total").increment(1),
                }
                break;
            }
            Ok(Some(Ok(msg))) => msg,
        };
        pinged = false;
        match msg {
            Message::Text(text) => {
                // Boxed: a request's future (a login, a join, …) is several times the size of
                // everything else here, and an idle connection should not carry it.
                if let Flow::Close(code, reason) = Box::pin(conn.handle_text(text.as_str())).await {
                    close(code, reason);
                    break;
                }
            }
            Message::Binary(_) => {
                metrics::counter!("stoa_transport_errors_total", "kind" => "binary").increment(1);
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
