//! XMPP client-to-server (RFC 6120) on a TCP listener: negotiation, then stanzas.
//!
//! A connection holds a *handshake slot* (`limits.max_pending_handshakes`) from TCP accept
//! until resource binding is done, all within `limits.hello_timeout_ms`; only then does it take
//! a connection slot (`limits.max_connections`). Negotiation: the stream header (`to` must be
//! `xmpp.domain`), STARTTLS when the node has `[tls]` (required off loopback), SASL
//! SCRAM-SHA-256 and SCRAM-SHA-1 ([`super::scram`]: they send no password, so wherever STARTTLS
//! is not required first), PLAIN (only under TLS, on loopback, or where `xmpp.c2s_insecure`
//! allows it) and ANONYMOUS (where PLAIN is offered and guests are allowed), the stream
//! restart, and resource binding. Then every stanza goes to [`Handler`], which calls the
//! gateway; what rooms send comes through [`super::muc::XmppWire`].
//!
//! Bad input: a stream that is not well-formed XML, a DTD or an entity, an over-long or
//! over-deep stanza, or a stanza before authentication ends the stream with the RFC 6120
//! stream error; a stanza the server cannot serve gets a stanza error, and the session goes on.

use super::muc::{HistoryFilter, Pending, XmppState, XmppWire, condition, error_element, message_rest, parse_xep82};
use super::scram;
use super::stream::{Item, StreamFault, StreamReader};
use super::{escape, ns};
use crate::auth::LoggedIn;
use crate::gateway::{ArchiveQuery, Failure, Gateway, JoinRequest, TokenBucket};
use crate::protocol::{ClientMsgId, ErrorCode, RoomAddr, RoomConfigPatch};
use crate::session::{KillReason, Session};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xmpp_parsers::minidom::Element;

/// A byte stream: TCP, or TLS over it after STARTTLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Failed SASL attempts after which the stream is closed.
const MAX_AUTH_FAILURES: u32 = 3;

/// How long a write to the client may take before it counts as a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve XMPP clients on `listener` until `shutdown`; returns once every connection ended.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, tls: Option<crate::tls::ServerTls>, shutdown: CancellationToken) {
    let limits = &gateway.settings.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_pending_handshakes));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "xmpp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            metrics::counter!("stoa_connections_refused_total", "reason" => "handshakes").increment(1);
            continue;
        };
        let (gateway, shutdown, slots, tls) = (gateway.clone(), shutdown.clone(), slots.clone(), tls.clone());
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            let deadline = Duration::from_millis(gateway.settings.limits.hello_timeout_ms);
            let mut xio = XmlIo::new(Box::new(stream), &gateway.settings.xmpp);
            let negotiated = tokio::select! {
                n = tokio::time::timeout(deadline, negotiate(&mut xio, &gateway, tls.as_ref(), peer)) => match n {
                    Ok(n) => n,
                    Err(_) => Err(End::Stream("connection-timeout", "negotiation took too long".into())),
                },
                _ = shutdown.cancelled() => Err(End::Stream("system-shutdown", "server shutting down".into())),
            };
            drop(handshake);
            let (logged_in, resource) = match negotiated {
                Ok(n) => n,
                Err(end) => return xio.end(end).await,
            };
            let Ok(slot) = slots.try_acquire_owned() else {
                metrics::counter!("stoa_connections_refused_total", "reason" => "connections").increment(1);
                return xio.end(End::Stream("resource-constraint", "too many connections".into())).await;
            };
            gateway.count_connection(1);
            run(xio, peer, logged_in, resource, gateway.clone(), shutdown).await;
            gateway.count_connection(-1);
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// How a stream ends.
#[derive(Debug)]
enum End {
    /// The socket is gone: nothing more to write.
    Gone,
    /// Close with a stream error (a condition of RFC 6120 §4.9.3) and a text.
    Stream(&'static str, String),
    /// Close normally.
    Close,
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
fn stream_error(condition: &str, text: &str) -> String {
    format!("<stream:error><{condition} xmlns='{0}'/><text xmlns='{0}'>{1}</text></stream:error>", ns::STREAM_ERRORS, escape(text))
}

/// The XML stream over the socket during negotiation.
struct XmlIo {
    io: Box<dyn Io>,
    reader: StreamReader,
    items: VecDeque<Item>,
    settings: crate::config::XmppSettings,
    /// Our stream header went out (a stream error needs one first).
    header_sent: bool,
}

impl XmlIo {
    fn new(io: Box<dyn Io>, settings: &crate::config::XmppSettings) -> Self {
        XmlIo { io, reader: StreamReader::new(settings.max_stanza_bytes, settings.max_depth), items: VecDeque::new(), settings: settings.clone(), header_sent: false }
    }

    /// A new stream on the same socket (after STARTTLS or SASL): nothing read so far counts.
    fn restart(&mut self) {
        self.reader = StreamReader::new(self.settings.max_stanza_bytes, self.settings.max_depth);
        self.items.clear();
        self.header_sent = false;
    }

    async fn next(&mut self) -> Result<Item, End> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(item) = self.items.pop_front() {
                return Ok(item);
            }
            let n = self.io.read(&mut buf).await.map_err(|_| End::Gone)?;
            if n == 0 {
                return Err(End::Gone);
            }
            let mut out = Vec::new();
            self.reader.feed(&buf[..n], &mut out)?;
            self.items.extend(out);
        }
    }

    async fn write(&mut self, text: &str) -> Result<(), End> {
        let write = async {
            self.io.write_all(text.as_bytes()).await?;
            self.io.flush().await
        };
        tokio::time::timeout(WRITE_TIMEOUT, write).await.map_err(|_| End::Gone)?.map_err(|_| End::Gone)
    }

    async fn header(&mut self, domain: &str) -> Result<(), End> {
        let id = uuid::Uuid::new_v4();
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' id='{id}' from='{}' version='1.0' xml:lang='en'>",
            ns::CLIENT,
            ns::STREAM,
            escape(domain)
        );
        self.write(&header).await?;
        self.header_sent = true;
        Ok(())
    }

    /// End the stream (with its error, if any) and close the socket.
    async fn end(mut self, end: End) {
        let tail = match &end {
            End::Gone => return,
            End::Stream(condition, text) => {
                tracing::debug!(condition, text, "xmpp stream error");
                stream_error(condition, text)
            }
            End::Close => String::new(),
        };
        if !self.header_sent {
            let _ = self.header(&self.settings.domain.clone()).await;
        }
        let _ = self.write(&format!("{tail}</stream:stream>")).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }
}

/// The stream header must name this node's domain and XMPP 1.0.
fn check_header(header: &Element, domain: &str) -> Result<(), End> {
    if header.name() != "stream" || header.ns() != ns::STREAM {
        return Err(End::Stream("invalid-namespace", "expected <stream:stream xmlns:stream='http://etherx.jabber.org/streams'>".into()));
    }
    if header.attr("to") != Some(domain) {
        return Err(End::Stream("host-unknown", format!("this server serves the domain {domain}")));
    }
    let major = |v: &str| v.split('.').next().and_then(|m| m.parse::<u32>().ok());
    if header.attr("version").and_then(major).is_none_or(|m| m < 1) {
        return Err(End::Stream("unsupported-version", "XMPP 1.0 streams only".into()));
    }
    Ok(())
}

/// RFC 6120 negotiation up to a bound resource.
async fn negotiate(xio: &mut XmlIo, gateway: &Gateway, tls: Option<&crate::tls::ServerTls>, peer: SocketAddr) -> Result<(LoggedIn, String), End> {
    let settings = &gateway.settings;
    let domain = settings.xmpp.domain.clone();
    let loopback = peer.ip().is_loopback();
    let mut secure = false;
    let mut logged_in: Option<LoggedIn> = None;
    let mut failures = 0;
    loop {
        let Item::Open(header) = xio.next().await? else {
            return Err(End::Stream("bad-format", "expected a stream header".into()));
        };
        check_header(&header, &domain)?;
        xio.header(&domain).await?;
        let Some(user) = &logged_in else {
            let offer_tls = tls.is_some() && !secure;
            let plain_ok = secure || loopback || settings.xmpp.c2s_insecure;
            // SCRAM sends no password, so it needs no TLS of its own; where STARTTLS is
            // required (off loopback with `[tls]`), it still comes first.
            let scram_ok = plain_ok || tls.is_none();
            let mut mechanisms: Vec<&str> = Vec::new();
            if scram_ok {
                mechanisms.extend(scram::Hash::ALL.map(scram::Hash::mechanism));
            }
            if plain_ok {
                mechanisms.push("PLAIN");
                if settings.auth.allow_guests {
                    mechanisms.push("ANONYMOUS");
                }
            }
            let mut features = String::from("<stream:features>");
            if offer_tls {
                let required = if loopback { "" } else { "<required/>" };
                features.push_str(&format!("<starttls xmlns='{}'>{required}</starttls>", ns::TLS));
            }
            if !mechanisms.is_empty() {
                features.push_str(&format!("<mechanisms xmlns='{}'>", ns::SASL));
                for m in &mechanisms {
                    features.push_str(&format!("<mechanism>{m}</mechanism>"));
                }
                features.push_str("</mechanisms>");
            }
            features.push_str("</stream:features>");
            xio.write(&features).await?;
            loop {
                let Item::Stanza(el) = xio.next().await? else { return Err(End::Close) };
                if el.is("starttls", ns::TLS) && offer_tls {
                    xio.write(&format!("<proceed xmlns='{}'/>", ns::TLS)).await?;
                    let io = std::mem::replace(&mut xio.io, Box::new(tokio::io::duplex(1).0));
                    let tls = tls.expect("offered only with [tls]");
                    xio.io = Box::new(tls.accept(io).await.map_err(|_| End::Gone)?);
                    secure = true;
                    xio.restart();
                    break;
                }
                if !el.is("auth", ns::SASL) || mechanisms.is_empty() {
                    let why = if offer_tls { "negotiate TLS first (STARTTLS)" } else { "authenticate first (SASL)" };
                    return Err(End::Stream(if offer_tls { "policy-violation" } else { "not-authorized" }, why.into()));
                }
                match sasl(xio, gateway, &el, &mechanisms, peer).await {
                    Ok((user, data)) => {
                        let data = data.map(|d| B64.encode(d)).unwrap_or_default();
                        xio.write(&format!("<success xmlns='{}'>{data}</success>", ns::SASL)).await?;
                        logged_in = Some(user);
                        xio.restart();
                        break;
                    }
                    Err(SaslError::End(end)) => return Err(end),
                    Err(SaslError::Failure(condition, text)) => {
                        failures += 1;
                        xio.write(&format!("<failure xmlns='{}'><{condition}/><text>{}</text></failure>", ns::SASL, escape(&text))).await?;
                        if failures >= MAX_AUTH_FAILURES {
                            return Err(End::Stream("policy-violation", "too many failed logins".into()));
                        }
                    }
                }
            }
            continue;
        };
        xio.write(&format!(
            "<stream:features><bind xmlns='{}'/><session xmlns='{}'><optional/></session></stream:features>",
            ns::BIND,
            ns::SESSION
        ))
        .await?;
        let Item::Stanza(el) = xio.next().await? else { return Err(End::Close) };
        let bind = el.get_child("bind", ns::BIND);
        let (true, Some(id), Some(bind)) = (el.is("iq", ns::CLIENT) && el.attr("type") == Some("set"), el.attr("id"), bind) else {
            return Err(End::Stream("not-authorized", "bind a resource first".into()));
        };
        let asked = bind.get_child("resource", ns::BIND).map(|r| r.text()).unwrap_or_default();
        let resource = if asked.is_empty() || asked.len() > 256 || asked.chars().any(|c| c.is_control()) {
            format!("stoa-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
        } else {
            asked
        };
        let jid = format!("{}@{domain}/{resource}", user.user);
        xio.write(&format!("<iq type='result' id='{}'><bind xmlns='{}'><jid>{}</jid></bind></iq>", escape(id), ns::BIND, escape(&jid)))
            .await?;
        return Ok((logged_in.take().expect("logged in"), resource));
    }
}

/// Why a SASL exchange logged no one in.
#[derive(Debug)]
enum SaslError {
    /// `<failure/>` with this condition and text; the stream goes on.
    Failure(&'static str, String),
    /// The stream ends.
    End(End),
}

impl From<End> for SaslError {
    fn from(end: End) -> Self {
        SaslError::End(end)
    }
}

impl From<(&'static str, String)> for SaslError {
    fn from((condition, text): (&'static str, String)) -> Self {
        SaslError::Failure(condition, text)
    }
}

/// One SASL exchange, from its `<auth/>`, with a mechanism of `offered`: SCRAM-SHA-256 or
/// SCRAM-SHA-1 (a registered user proves its password), PLAIN (a registered user and password)
/// or ANONYMOUS (a guest). On success, the session and the additional data for `<success/>`
/// (SCRAM's server-final-message).
async fn sasl(xio: &mut XmlIo, gateway: &Gateway, auth: &Element, offered: &[&str], peer: SocketAddr) -> Result<(LoggedIn, Option<String>), SaslError> {
    let mechanism = auth.attr("mechanism").filter(|m| offered.contains(m));
    let Some(mechanism) = mechanism else {
        return Err(SaslError::Failure("invalid-mechanism", format!("offered: {}", offered.join(", "))));
    };
    let data = sasl_data(&auth.text())?;
    match scram::Hash::from_mechanism(mechanism) {
        Some(hash) => scram_login(xio, gateway, hash, data, peer).await,
        None => Ok((plain_or_anonymous(gateway, mechanism, &data, peer).await?, None)),
    }
}

/// The bytes of an `<auth/>` or `<response/>`: base64, or `=` for none.
fn sasl_data(text: &str) -> Result<Vec<u8>, SaslError> {
    match text.trim() {
        "=" => Ok(Vec::new()),
        t => B64.decode(t).map_err(|_| SaslError::Failure("incorrect-encoding", "not base64".into())),
    }
}

/// The `<failure/>` condition and text of a login the gateway refused.
fn refused(f: Failure) -> (&'static str, String) {
    let condition = match f.code {
        ErrorCode::Unauthorized | ErrorCode::BadRequest => "not-authorized",
        _ => "temporary-auth-failure",
    };
    (condition, f.message)
}

/// PLAIN (`data` is authzid NUL user NUL password) or ANONYMOUS.
async fn plain_or_anonymous(gateway: &Gateway, mechanism: &str, data: &[u8], peer: SocketAddr) -> Result<LoggedIn, (&'static str, String)> {
    if mechanism == "ANONYMOUS" {
        return gateway.login(Some("guest"), None, None, Some(peer.ip())).await.map_err(refused);
    }
    let mut parts = data.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(("malformed-request", "PLAIN is authzid NUL user NUL password".into()));
    };
    let (Ok(authz), Ok(user), Ok(password)) = (std::str::from_utf8(authz), std::str::from_utf8(user), std::str::from_utf8(password)) else {
        return Err(("malformed-request", "not UTF-8".into()));
    };
    let domain = &gateway.settings.xmpp.domain;
    if !authz.is_empty() && authz != format!("{user}@{domain}") {
        return Err(("invalid-authzid", "log in as yourself".into()));
    }
    let user = user.strip_suffix(&format!("@{domain}")).unwrap_or(user);
    let logged_in = gateway.login(Some(user), Some(password), None, Some(peer.ip())).await.map_err(refused)?;
    if logged_in.guest {
        // An unregistered name logs in as a guest in v1; in XMPP that is ANONYMOUS.
        return Err(("not-authorized", "wrong user name or password".into()));
    }
    Ok(logged_in)
}

/// SCRAM-SHA-256 or SCRAM-SHA-1 (RFC 5802, RFC 7677; no channel binding) from the client's
/// first message (`first`, the `<auth/>`'s data; if empty, asked for with an empty challenge)
/// to the server's final one. A user without SCRAM credentials (unknown, or a password set
/// before SCRAM) gets a stand-in salt and fails at the proof, as a wrong password does: both
/// spend the failed-login budget, through the gateway as PLAIN's failures do.
async fn scram_login(xio: &mut XmlIo, gateway: &Gateway, hash: scram::Hash, first: Vec<u8>, peer: SocketAddr) -> Result<(LoggedIn, Option<String>), SaslError> {
    let first = if first.is_empty() { challenge(xio, "").await? } else { first };
    let first = scram::parse_client_first(&first).map_err(scram_failure)?;
    let domain = &gateway.settings.xmpp.domain;
    let user = first.user.strip_suffix(&format!("@{domain}")).unwrap_or(&first.user);
    if first.authzid.as_ref().is_some_and(|a| *a != format!("{user}@{domain}")) {
        return Err(SaslError::Failure("invalid-authzid", "log in as yourself".into()));
    }
    let address = Some(peer.ip());
    let credentials = gateway.scram_credentials(user, hash, address).await.map_err(refused)?;
    let (exchange, server_first) = scram::Exchange::start(hash, &first, credentials, &scram_secret(&gateway.settings));
    let last = challenge(xio, &server_first).await?;
    let server_final = match exchange.finish(&last) {
        Ok(server_final) => Some(server_final),
        Err(scram::ScramError::InvalidProof) => None,
        Err(e) => return Err(scram_failure(e)),
    };
    let logged_in = gateway.login_verified(user, server_final.is_some(), address).await.map_err(refused)?;
    Ok((logged_in, server_final))
}

/// Send a SASL `<challenge/>` with `data` and read the client's `<response/>`, decoded; an
/// `<abort/>` is the `aborted` failure.
async fn challenge(xio: &mut XmlIo, data: &str) -> Result<Vec<u8>, SaslError> {
    xio.write(&format!("<challenge xmlns='{}'>{}</challenge>", ns::SASL, B64.encode(data))).await?;
    let Item::Stanza(el) = xio.next().await? else { return Err(End::Close.into()) };
    if el.is("abort", ns::SASL) {
        return Err(SaslError::Failure("aborted", "the client aborted the exchange".into()));
    }
    if !el.is("response", ns::SASL) {
        return Err(SaslError::Failure("malformed-request", "expected <response/> or <abort/>".into()));
    }
    sasl_data(&el.text())
}

/// The `<failure/>` of a SCRAM message that does not fit.
fn scram_failure(e: scram::ScramError) -> SaslError {
    let condition = match e {
        scram::ScramError::Malformed(_) => "malformed-request",
        scram::ScramError::ChannelBinding => "invalid-mechanism",
        scram::ScramError::Mismatch(_) | scram::ScramError::InvalidProof => "not-authorized",
    };
    SaslError::Failure(condition, e.to_string())
}

/// The secret SCRAM's stand-in salts are derived from: `cluster.secret` where it is set (both
/// nodes of a pair answer alike, across restarts), else random, once per process.
fn scram_secret(settings: &crate::config::Settings) -> Vec<u8> {
    static RANDOM: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    if settings.cluster.secret.is_empty() {
        RANDOM.get_or_init(rand::random).to_vec()
    } else {
        settings.cluster.secret.as_bytes().to_vec()
    }
}

/// The bound session: stanzas in, the queue out.
async fn run(xio: XmlIo, peer: SocketAddr, logged_in: LoggedIn, resource: String, gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let XmlIo { io, mut reader, items, settings, .. } = xio;
    let domain = settings.domain.clone();
    let (mut rd, mut wr) = tokio::io::split(io);
    let (tx, mut rx) = mpsc::channel::<String>(gateway.settings.limits.outbound_queue);
    let kill = CancellationToken::new();
    let jid = format!("{}@{domain}/{resource}", logged_in.user);
    let state = XmppState::new(jid, domain.clone(), tx.clone());
    let wire = Box::new(XmppWire { state: state.clone() });
    let hash = crate::auth::token_hash(&logged_in.token);
    let session = gateway.open_session(logged_in.user.clone(), Some(hash), Some(peer.ip()), wire, kill.clone());
    tracing::debug!(session = session.id, jid = %state.jid, "xmpp session bound");

    // Writer: everything the client receives, in queue order, then the stream's end.
    let writer_kill = kill.clone();
    let writer = tokio::spawn(async move {
        let mut batch = String::new();
        loop {
            tokio::select! {
                biased;
                _ = writer_kill.cancelled() => break,
                first = rx.recv() => match first {
                    None => break,
                    Some(stanza) => {
                        batch.clear();
                        batch.push_str(&stanza);
                        while batch.len() < 64 * 1024 {
                            match rx.try_recv() { Ok(s) => batch.push_str(&s), Err(_) => break }
                        }
                        let write = async { wr.write_all(batch.as_bytes()).await?; wr.flush().await };
                        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => { writer_kill.cancel(); return; }
                            Err(_) => {
                                metrics::counter!("stoa_slow_consumers_total").increment(1);
                                writer_kill.cancel();
                                return;
                            }
                        }
                    }
                },
            }
        }
        // Whatever is still queued (a stream error, say), then the end of the stream.
        let mut tail = String::new();
        while let Ok(s) = rx.try_recv() {
            tail.push_str(&s);
        }
        tail.push_str("</stream:stream>");
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = wr.write_all(tail.as_bytes()).await;
            let _ = wr.shutdown().await;
        })
        .await;
    });

    let mut handler = Handler { gateway: gateway.clone(), session: session.clone(), state: state.clone(), bucket: gateway.request_bucket(), pings: 0 };
    let idle = Duration::from_millis(gateway.settings.limits.idle_timeout_ms);
    let mut pending: VecDeque<Item> = items;
    let mut pinged = false;
    let mut buf = vec![0u8; 8192];
    let end = 'outer: loop {
        while let Some(item) = pending.pop_front() {
            match item {
                Item::Stanza(el) => {
                    if let Err(end) = handler.stanza(el).await {
                        break 'outer end;
                    }
                }
                Item::Close => break 'outer End::Close,
                Item::Open(_) => break 'outer End::Stream("bad-format", "a second stream header".into()),
            }
        }
        let read = tokio::select! {
            _ = kill.cancelled() => Err(match session.killed_for() {
                Some(KillReason::Kicked) => End::Stream("policy-violation", "session ended by an administrator".into()),
                Some(KillReason::SlowConsumer) => End::Stream("policy-violation", "slow consumer".into()),
                // `goaway` queued its own stream error.
                _ => End::Gone,
            }),
            _ = shutdown.cancelled() => {
                session.kill(KillReason::Shutdown);
                Err(End::Stream("system-shutdown", "server shutting down".into()))
            }
            read = tokio::time::timeout(idle, rd.read(&mut buf)) => Ok(read),
        };
        let read = match read {
            Ok(read) => read,
            Err(end) => break end,
        };
        match read {
            Err(_) if !pinged => {
                pinged = true;
                handler.ping_client();
            }
            Err(_) => break End::Stream("connection-timeout", "idle".into()),
            Ok(Err(_)) | Ok(Ok(0)) => break End::Gone,
            Ok(Ok(n)) => {
                pinged = false;
                let mut out = Vec::new();
                if let Err(f) = reader.feed(&buf[..n], &mut out) {
                    break End::from(f);
                }
                pending.extend(out);
            }
        }
    };
    if let End::Stream(condition, text) = end {
        let _ = tx.try_send(stream_error(condition, &text));
    }
    gateway.close_session(&session);
    // The writer sends what is queued (the stream error, if any), then the stream's end.
    kill.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// Where a stanza is addressed.
enum Target {
    /// This server (no `to`, the domain, or the user's own JID).
    Server,
    /// The room service (this node's, or its peer's).
    Service,
    Room(RoomAddr),
    Occupant(RoomAddr, String),
    /// Anyone else (other users, other servers: no 1:1 chat, no federation here).
    Other,
}

/// A bound session's stanza handler.
struct Handler {
    gateway: Arc<Gateway>,
    session: Arc<Session>,
    state: Arc<XmppState>,
    bucket: TokenBucket,
    pings: u64,
}

impl Handler {
    fn send(&self, stanza: String) {
        if self.state.send(stanza) == crate::session::Queued::Full {
            self.session.kill(KillReason::SlowConsumer);
        }
    }

    fn ping_client(&mut self) {
        self.pings += 1;
        self.send(format!(
            "<iq type='get' id='stoa-ping-{}' from='{}' to='{}'><ping xmlns='{}'/></iq>",
            self.pings,
            escape(&self.state.domain),
            escape(&self.state.jid),
            ns::PING
        ));
    }

    fn target(&self, to: Option<&str>) -> Result<Target, ()> {
        let Some(to) = to else { return Ok(Target::Server) };
        let jid = xmpp_parsers::jid::Jid::new(to).map_err(|_| ())?;
        let domain = jid.domain().as_str();
        let settings = &self.gateway.settings;
        let service = domain == settings.node.service || settings.peer().is_some_and(|p| p.service == domain);
        let Some(node) = jid.node() else {
            return Ok(if domain == settings.xmpp.domain {
                Target::Server
            } else if service && jid.resource().is_none() {
                Target::Service
            } else {
                Target::Other
            });
        };
        if domain == settings.xmpp.domain && node.as_str() == self.session.user {
            return Ok(Target::Server);
        }
        if !service {
            return Ok(Target::Other);
        }
        let room = RoomAddr(format!("{}@{domain}", node.as_str()));
        Ok(match jid.resource() {
            Some(nick) => Target::Occupant(room, nick.as_str().to_owned()),
            None => Target::Room(room),
        })
    }

    /// Reply to `el` (an iq, message or presence) with a stanza error.
    fn error_reply(&self, el: &Element, kind: &str, cond: &str, text: &str) {
        if el.attr("type") == Some("error") {
            return; // never answer an error with an error
        }
        let id = el.attr("id").map(|i| format!(" id='{}'", escape(i))).unwrap_or_default();
        // From whom the stanza was for; from the server when that is no valid address.
        let from = el.attr("to").filter(|t| xmpp_parsers::jid::Jid::new(t).is_ok()).unwrap_or(&self.state.domain);
        let from = format!(" from='{}'", escape(from));
        // A refused MUC join echoes the <x/> (XEP-0045 §7.2.6): clients match on it.
        let x = if el.name() == "presence" && el.has_child("x", ns::MUC) { format!("<x xmlns='{}'/>", ns::MUC) } else { String::new() };
        self.send(format!("<{} to='{}'{from}{id} type='error'>{x}{}</{}>", el.name(), escape(&self.state.jid), error_element(kind, cond, text), el.name()));
    }

    fn failure_reply(&self, el: &Element, f: &Failure) {
        let (kind, cond) = condition(f.code);
        self.error_reply(el, kind, cond, &f.message);
    }

    async fn stanza(&mut self, el: Element) -> Result<(), End> {
        if el.ns() != ns::CLIENT || !matches!(el.name(), "iq" | "message" | "presence") {
            return Err(End::Stream("unsupported-stanza-type", format!("<{}/> in {} is not served here", el.name(), el.ns())));
        }
        if let Some(from) = el.attr("from") {
            let me = &self.state.jid;
            if from != me && Some(from) != me.split_once('/').map(|(bare, _)| bare) {
                return Err(End::Stream("invalid-from", "stanzas go out from the bound JID".into()));
            }
        }
        if !self.bucket.take(Instant::now()) {
            self.error_reply(&el, "wait", "resource-constraint", "too many requests; slow down");
            return Ok(());
        }
        let Ok(target) = self.target(el.attr("to")) else {
            self.error_reply(&el, "modify", "jid-malformed", "the `to` address is not a valid JID");
            return Ok(());
        };
        match el.name() {
            "iq" => self.iq(&el, target).await,
            "presence" => self.presence(&el, target).await,
            _ => self.message(&el, target).await,
        }
        Ok(())
    }

    async fn iq(&mut self, el: &Element, target: Target) {
        let kind = el.attr("type").unwrap_or("");
        if matches!(kind, "result" | "error") {
            return; // answers to our pings
        }
        let Some(id) = el.attr("id") else { return self.error_reply(el, "modify", "bad-request", "an iq needs an id") };
        let mut children = el.children();
        let (Some(payload), None, true) = (children.next(), children.next(), matches!(kind, "get" | "set")) else {
            return self.error_reply(el, "modify", "bad-request", "an iq get or set has exactly one payload");
        };
        let from = el.attr("to").map(|t| format!(" from='{}'", escape(t))).unwrap_or_default();
        let result = |body: &str| format!("<iq type='result' id='{}' to='{}'{from}>{body}</iq>", escape(id), escape(&self.state.jid));
        let (name, pns) = (payload.name(), payload.ns());
        match (&target, name, pns.as_str(), kind) {
            (_, "ping", ns::PING, "get") => match &target {
                // XEP-0410: a joined client pings itself in the room.
                Target::Occupant(room, nick) if self.state.nick(room).as_deref() != Some(nick.as_str()) => {
                    self.error_reply(el, "cancel", "not-acceptable", "you are not in this room with that nick")
                }
                Target::Other => self.error_reply(el, "cancel", "service-unavailable", "no such entity here"),
                _ => self.send(result("")),
            },
            (Target::Server, "query", ns::DISCO_INFO, "get") => self.send(result(&format!(
                "<query xmlns='{}'><identity category='server' type='im' name='Stoa'/>{}</query>",
                ns::DISCO_INFO,
                features(&[ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PING])
            ))),
            (Target::Server, "query", ns::DISCO_ITEMS, "get") => self.send(result(&format!(
                "<query xmlns='{}'><item jid='{}' name='Chat rooms'/></query>",
                ns::DISCO_ITEMS,
                escape(&self.gateway.settings.node.service)
            ))),
            (Target::Server, "query", ns::ROSTER, "get") => self.send(result(&format!("<query xmlns='{}'/>", ns::ROSTER))),
            (Target::Server, "session", ns::SESSION, "set") => self.send(result("")),
            (Target::Service, "query", ns::DISCO_INFO, "get") => self.send(result(&format!(
                "<query xmlns='{}'><identity category='conference' type='text' name='Stoa rooms'/>{}</query>",
                ns::DISCO_INFO,
                features(&[ns::DISCO_INFO, ns::DISCO_ITEMS, ns::MUC, ns::PING])
            ))),
            (Target::Service, "query", ns::DISCO_ITEMS, "get") => match self.gateway.list(&self.session, None, None).await {
                Ok(page) => {
                    let items: String = page.rooms.iter().map(|r| format!("<item jid='{}'/>", escape(&r.room.0))).collect();
                    self.send(result(&format!("<query xmlns='{}'>{items}</query>", ns::DISCO_ITEMS)));
                }
                Err(f) => self.failure_reply(el, &f),
            },
            (Target::Room(room), "query", ns::DISCO_INFO, "get") => match self.gateway.describe(room).await {
                Ok(facts) => {
                    let mut fs = vec![ns::DISCO_INFO, ns::MUC, ns::MAM, ns::PING, ns::SID, ns::OCCUPANT_ID, "muc_persistent", "muc_nonanonymous"];
                    fs.push(if facts.public { "muc_open" } else { "muc_membersonly" });
                    fs.push(if facts.password_protected { "muc_passwordprotected" } else { "muc_unsecured" });
                    let name = room.0.split('@').next().unwrap_or_default();
                    self.send(result(&format!(
                        "<query xmlns='{}'><identity category='conference' type='text' name='{}'/>{}</query>",
                        ns::DISCO_INFO,
                        escape(name),
                        features(&fs)
                    )));
                }
                Err(f) => self.failure_reply(el, &f),
            },
            (Target::Room(room), "query", ns::MAM, "set") => {
                let room = room.clone();
                self.mam(el, id, &room, payload).await
            }
            (Target::Room(_), "query", ns::MAM, "get") => self.send(result(&format!(
                "<query xmlns='{}'><x xmlns='{}' type='form'><field type='hidden' var='FORM_TYPE'><value>{}</value></field>\
                 <field type='text-single' var='with'/><field type='text-single' var='start'/><field type='text-single' var='end'/></x></query>",
                ns::MAM,
                ns::DATA,
                ns::MAM
            ))),
            (Target::Room(_), "query", ns::DISCO_ITEMS, "get") => self.send(result(&format!("<query xmlns='{}'/>", ns::DISCO_ITEMS))),
            // An instant room (XEP-0045 §10.1.2): the empty submitted form keeps the defaults.
            (Target::Room(_), "query", ns::MUC_OWNER, "set")
                if payload.get_child("x", "jabber:x:data").is_some_and(|x| x.attr("type") == Some("submit") && x.children().all(|f| f.attr("var") == Some("FORM_TYPE"))) =>
            {
                self.send(result(""))
            }
            (Target::Other, ..) => self.error_reply(el, "cancel", "service-unavailable", "no such entity here"),
            _ => self.error_reply(el, "cancel", "service-unavailable", &format!("<{name} xmlns='{pns}'/> is not served here")),
        }
    }

    /// XEP-0313: a room's archive, paged with XEP-0059 RSM. Each match is a `<result/>`
    /// message with the forwarded groupchat message; the IQ result's `<fin/>` says whether the
    /// page is the last, its first and last ids, and the count.
    async fn mam(&mut self, el: &Element, id: &str, room: &RoomAddr, query: &Element) {
        let mut q = ArchiveQuery::default();
        let field = |var: &str| {
            query
                .get_child("x", ns::DATA)
                .and_then(|x| x.children().find(|f| f.attr("var") == Some(var)))
                .and_then(|f| f.get_child("value", ns::DATA))
                .map(|v| v.text())
        };
        for (var, slot) in [("start", &mut q.start_ms), ("end", &mut q.end_ms)] {
            if let Some(text) = field(var) {
                match parse_xep82(&text) {
                    Some(ms) => *slot = Some(ms),
                    None => return self.error_reply(el, "modify", "bad-request", &format!("`{var}` is not an XEP-0082 date-time")),
                }
            }
        }
        // In a room's archive, `with` names an occupant: room@service/nick.
        if let Some(with) = field("with") {
            match with.split_once('/') {
                Some((bare, nick)) if bare == room.0 && !nick.is_empty() => q.nick = Some(nick.to_owned()),
                _ => return self.error_reply(el, "modify", "bad-request", "`with` in a room's archive is room@service/nick"),
            }
        }
        if let Some(set) = query.get_child("set", ns::RSM) {
            let text = |name: &str| set.get_child(name, ns::RSM).map(|c| c.text());
            if let Some(max) = text("max") {
                match max.trim().parse::<u32>() {
                    Ok(n) => q.max = Some(n),
                    Err(_) => return self.error_reply(el, "modify", "bad-request", "`max` is a number"),
                }
            }
            q.after_id = text("after").filter(|a| !a.is_empty());
            q.before_id = text("before");
        }
        let page = match self.gateway.archive(&self.session, room, q).await {
            Ok(page) => page,
            Err(f) => return self.failure_reply(el, &f),
        };
        let queryid = query.attr("queryid").map(|q| format!(" queryid='{}'", escape(q))).unwrap_or_default();
        let to = escape(&self.state.jid).into_owned();
        for m in &page.messages {
            let stamp = super::xep82(m.ts);
            self.send(format!(
                "<message to='{to}' from='{}'><result xmlns='{}'{queryid} id='{}'><forwarded xmlns='{}'><delay xmlns='{}' stamp='{stamp}'/><message xmlns='{}'{}</forwarded></result></message>",
                escape(&room.0),
                ns::MAM,
                escape(&m.id),
                ns::FORWARD,
                ns::DELAY,
                ns::CLIENT,
                message_rest(m, false)
            ));
        }
        let mut set = String::new();
        if let (Some(first), Some(last)) = (page.messages.first(), page.messages.last()) {
            set = format!("<first>{}</first><last>{}</last>", escape(&first.id), escape(&last.id));
        }
        self.send(format!(
            "<iq type='result' id='{}' to='{to}' from='{}'><fin xmlns='{}' complete='{}'><set xmlns='{}'>{set}<count>{}</count></set></fin></iq>",
            escape(id),
            escape(&room.0),
            ns::MAM,
            page.complete,
            ns::RSM,
            page.count
        ));
    }

    async fn presence(&mut self, el: &Element, target: Target) {
        let kind = el.attr("type");
        match (target, kind) {
            (Target::Occupant(room, nick), None) => self.join(el, room, nick).await,
            (Target::Occupant(room, _), Some("unavailable")) => self.leave(&room).await,
            (Target::Room(_), None) => self.error_reply(el, "modify", "jid-malformed", "join a room as room@service/nick"),
            // Broadcast presence: unavailable leaves every room (the rooms saw it as directed).
            (Target::Server, Some("unavailable")) => {
                for (room, _) in self.state.rooms() {
                    self.leave(&room).await;
                }
            }
            _ => {}
        }
    }

    async fn join(&mut self, el: &Element, room: RoomAddr, nick: String) {
        match self.state.nick(&room) {
            Some(mine) if mine == nick => return, // a presence update in the room
            Some(_) => return self.error_reply(el, "modify", "not-acceptable", "nick changes are not supported; leave and join again"),
            None => {}
        }
        let x = el.get_child("x", ns::MUC);
        let password = x.and_then(|x| x.get_child("password", ns::MUC)).map(|p| p.text());
        let history = HistoryFilter::from_join(x, crate::clock::now_ms());
        let id = el.attr("id").map(str::to_owned);
        let mut created = false;
        for attempt in 0..2 {
            let pending = Pending::Join { room: room.clone(), nick: nick.clone(), id: id.clone(), history: history.clone(), created };
            let re = self.state.expect(pending);
            let join = JoinRequest { re: re.clone(), room: room.clone(), nick: nick.clone(), since: None, password: password.clone() };
            match self.gateway.join(&self.session, join).await {
                Ok(()) => return,
                Err(f) => {
                    self.state.forget(&re);
                    // Joining a room that does not exist creates it (an instant room).
                    if f.code == ErrorCode::NotFound && attempt == 0 && f.hosted_by.is_none() {
                        match self.gateway.create(&self.session, &room, &RoomConfigPatch::default()).await {
                            Ok(()) => {
                                created = true;
                                continue;
                            }
                            Err(f) if f.code == ErrorCode::Conflict => continue,
                            Err(f) => return self.failure_reply(el, &f),
                        }
                    }
                    let f = match f.code {
                        ErrorCode::Conflict => Failure::new(ErrorCode::Conflict, "that nick is in use in this room"),
                        _ => f,
                    };
                    return self.failure_reply(el, &f);
                }
            }
        }
    }

    async fn leave(&mut self, room: &RoomAddr) {
        if self.state.nick(room).is_none() {
            return;
        }
        let re = crate::protocol::RequestId(format!("leave-{}", uuid::Uuid::now_v7().simple()));
        if let Err(f) = self.gateway.leave(&self.session, re, room).await {
            tracing::debug!(room = %room, message = %f.message, "xmpp leave failed");
        }
    }

    async fn message(&mut self, el: &Element, target: Target) {
        if el.attr("type") == Some("error") {
            return;
        }
        let body = el.get_child("body", ns::CLIENT).map(|b| b.text());
        let room = match (target, el.attr("type")) {
            (Target::Room(room), Some("groupchat")) => room,
            (Target::Occupant(..), _) => return self.error_reply(el, "cancel", "not-acceptable", "private messages in rooms are not supported"),
            (Target::Room(_), _) => return self.error_reply(el, "modify", "bad-request", "messages to a room are type='groupchat'"),
            _ if body.is_none() => return, // chat states, receipts and the like
            _ => return self.error_reply(el, "cancel", "service-unavailable", "this server serves rooms only"),
        };
        if self.state.nick(&room).is_none() {
            return self.error_reply(el, "cancel", "not-acceptable", "join the room first");
        }
        let Some(body) = body else {
            if let Some(subject) = el.get_child("subject", ns::CLIENT)
                && let Err(f) = self.gateway.subject(&self.session, &room, subject.text()).await
            {
                self.failure_reply(el, &f);
            }
            return; // chat states and the like
        };
        let id = el.attr("id").map(str::to_owned);
        let origin = el
            .get_child("origin-id", ns::SID)
            .and_then(|o| o.attr("id"))
            .map(str::to_owned)
            .or_else(|| id.clone())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let re = self.state.expect(Pending::Send { room: room.clone(), id, origin: origin.clone(), body: body.clone() });
        if let Err(f) = self.gateway.send(&self.session, re.clone(), &room, body, ClientMsgId(origin)).await {
            self.state.forget(&re);
            self.failure_reply(el, &f);
        }
    }
}

/// `<feature var='…'/>` for each.
fn features(vars: &[&str]) -> String {
    vars.iter().map(|v| format!("<feature var='{}'/>", escape(v))).collect()
}
