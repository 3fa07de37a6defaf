//! XMPP client-to-server (RFC 6120) on a TCP listener: negotiation, then stanzas.
//!
//! A connection holds a *handshake slot* (`limits.max_pending_handshakes`) from TCP accept
//! until resource binding is done, all within `limits.hello_timeout_ms`; only then does it take
//! a connection slot (`limits.max_connections`). Negotiation: the stream header (`to` must be
//! `xmpp.domain`), STARTTLS when the node has `[tls]` (required off loopback), SASL
//! SCRAM-SHA-256 and SCRAM-SHA-1 ([`crate::auth::scram`]: they send no password, so wherever STARTTLS
//! is not required first), PLAIN (only under TLS, on loopback, or where `xmpp.c2s_insecure`
//! allows it) and ANONYMOUS (where PLAIN is offered and guests are allowed), the stream
//! restart, and resource binding. Then every stanza goes to `Handler`, which calls the
//! gateway; what rooms send comes through [`super::muc::XmppWire`].
//!
//! Bad input: a stream that is not well-formed XML, a DTD or an entity, an over-long or
//! over-deep stanza, or a stanza before authentication ends the stream with the RFC 6120
//! stream error; a stanza the server cannot serve gets a stanza error, and the session goes on.

use super::channel::{Channel, End, ItemSource, TextSink};
use super::handler::Handler;
use super::muc::{XmppState, XmppWire};
use super::sm::{self, Parked, Resumption, Sm};
use super::stream::{Item, StreamReader};
use crate::auth::scram;
use super::{escape, ns};
use crate::auth::LoggedIn;
use crate::gateway::{Failure, Gateway};
use crate::protocol::ErrorCode;
use crate::session::KillReason;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
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
/// Serve the c2s listener. With `direct`, every connection speaks TLS from its first byte
/// (XEP-0368, `xmpp.c2s_tls`) and then negotiates as over STARTTLS, without offering it again.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, tls: Option<crate::tls::ServerTls>, direct: bool, resumption: Arc<Resumption>, shutdown: CancellationToken) {
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
        let (gateway, shutdown, slots, tls, resumption) = (gateway.clone(), shutdown.clone(), slots.clone(), tls.clone(), resumption.clone());
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut xio = match (direct, &tls) {
                (true, Some(tls)) => match tls.accept(stream).await {
                    Ok(stream) => XmlIo::new(Box::new(stream), &gateway.settings.xmpp).secured(),
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "xmpp direct TLS handshake failed");
                        metrics::counter!("stoa_transport_errors_total", "kind" => "tls").increment(1);
                        return;
                    }
                },
                (true, None) => return, // refused by the config check: direct TLS needs [tls]
                (false, _) => XmlIo::new(Box::new(stream), &gateway.settings.xmpp),
            };
            let bound = match negotiate_in_time(&mut xio, &gateway, tls.as_ref(), peer, &resumption, &shutdown).await {
                Ok(bound) => bound,
                Err(end) => return xio.end(end).await,
            };
            drop(handshake);
            let Ok(slot) = slots.try_acquire_owned() else {
                metrics::counter!("stoa_connections_refused_total", "reason" => "connections").increment(1);
                return xio.end(End::Stream("resource-constraint", "too many connections".into())).await;
            };
            gateway.count_connection(1);
            run(xio, peer, bound, gateway.clone(), resumption, shutdown).await;
            gateway.count_connection(-1);
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// An XML stream over a TCP connection (TLS after STARTTLS).
struct XmlIo {
    io: Box<dyn Io>,
    reader: StreamReader,
    items: VecDeque<Item>,
    settings: crate::config::XmppSettings,
    secure: bool,
    /// Our stream header went out (a stream error needs one first).
    header_sent: bool,
}

impl XmlIo {
    fn new(io: Box<dyn Io>, settings: &crate::config::XmppSettings) -> Self {
        let reader = StreamReader::new(settings.max_stanza_bytes, settings.max_depth);
        XmlIo { io, reader, items: VecDeque::new(), settings: settings.clone(), secure: false, header_sent: false }
    }

    /// The connection is TLS already (direct TLS): no STARTTLS to offer.
    fn secured(mut self) -> Self {
        self.secure = true;
        self
    }
}

/// Read from `io` until `reader` completes an item.
async fn next_item<R: AsyncRead + Unpin>(io: &mut R, reader: &mut StreamReader, items: &mut VecDeque<Item>) -> Result<Item, End> {
    let mut buf = [0u8; 8192];
    loop {
        if let Some(item) = items.pop_front() {
            return Ok(item);
        }
        let n = io.read(&mut buf).await.map_err(|_| End::Gone)?;
        if n == 0 {
            return Err(End::Gone);
        }
        let mut out = Vec::new();
        reader.feed(&buf[..n], &mut out)?;
        items.extend(out);
    }
}

impl Channel for XmlIo {
    type Reader = TcpReader;
    type Writer = TcpWriter;

    async fn next(&mut self) -> Result<Item, End> {
        next_item(&mut self.io, &mut self.reader, &mut self.items).await
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

    fn restart(&mut self) {
        self.reader = StreamReader::new(self.settings.max_stanza_bytes, self.settings.max_depth);
        self.items.clear();
        self.header_sent = false;
    }

    fn can_starttls(&self) -> bool {
        !self.secure
    }

    async fn starttls(&mut self, tls: &crate::tls::ServerTls) -> Result<(), End> {
        let io = std::mem::replace(&mut self.io, Box::new(tokio::io::duplex(1).0));
        self.io = Box::new(tls.accept(io).await.map_err(|_| End::Gone)?);
        self.secure = true;
        self.restart();
        Ok(())
    }

    fn secure(&self) -> bool {
        self.secure
    }

    async fn end(mut self, end: End) {
        if matches!(end, End::Gone) {
            return;
        }
        let tail = end.error_element().unwrap_or_default();
        if !tail.is_empty() {
            tracing::debug!(error = %tail, "xmpp stream error");
        }
        if !self.header_sent {
            let _ = self.header(&self.settings.domain.clone()).await;
        }
        let _ = self.write(&format!("{tail}</stream:stream>")).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }

    fn split(self) -> (TcpReader, TcpWriter) {
        let (rd, wr) = tokio::io::split(self.io);
        (TcpReader { rd, reader: self.reader, items: self.items }, TcpWriter { wr })
    }
}

/// A bound TCP session's reading half.
struct TcpReader {
    rd: ReadHalf<Box<dyn Io>>,
    reader: StreamReader,
    items: VecDeque<Item>,
}

impl ItemSource for TcpReader {
    async fn next(&mut self) -> Result<Item, End> {
        next_item(&mut self.rd, &mut self.reader, &mut self.items).await
    }
}

/// A bound TCP session's writing half: a batch of stanzas is one write.
struct TcpWriter {
    wr: WriteHalf<Box<dyn Io>>,
}

impl TextSink for TcpWriter {
    async fn send(&mut self, batch: &[String]) -> std::io::Result<()> {
        self.wr.write_all(batch.concat().as_bytes()).await?;
        self.wr.flush().await
    }

    async fn close(&mut self, tail: &str) {
        let _ = self.wr.write_all(format!("{tail}</stream:stream>").as_bytes()).await;
        let _ = self.wr.shutdown().await;
    }
}

/// The stream header must name this node's domain and XMPP 1.0.
fn check_header(header: &Element, domain: &str) -> Result<(), End> {
    if !header.is("stream", ns::STREAM) && !header.is("open", ns::FRAMING) {
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

/// How negotiation ended: a new session bound, or a parked one resumed (XEP-0198).
pub(super) enum Bound {
    New { logged_in: LoggedIn, resource: String },
    /// The client acknowledged the parked session's stanzas up to `h`.
    Resumed { parked: Parked, h: u32 },
}

/// [`negotiate`] within `limits.hello_timeout_ms`, or until the node shuts down.
pub(super) async fn negotiate_in_time<C: Channel>(
    xio: &mut C,
    gateway: &Gateway,
    tls: Option<&crate::tls::ServerTls>,
    peer: SocketAddr,
    resumption: &Resumption,
    shutdown: &CancellationToken,
) -> Result<Bound, End> {
    let deadline = Duration::from_millis(gateway.settings.limits.hello_timeout_ms);
    tokio::select! {
        n = tokio::time::timeout(deadline, negotiate(xio, gateway, tls, peer, resumption)) => match n {
            Ok(n) => n,
            Err(_) => Err(End::Stream("connection-timeout", "negotiation took too long".into())),
        },
        _ = shutdown.cancelled() => Err(End::Stream("system-shutdown", "server shutting down".into())),
    }
}

/// RFC 6120 negotiation up to a bound resource (or a resumed session).
async fn negotiate<C: Channel>(xio: &mut C, gateway: &Gateway, tls: Option<&crate::tls::ServerTls>, peer: SocketAddr, resumption: &Resumption) -> Result<Bound, End> {
    let settings = &gateway.settings;
    let domain = settings.xmpp.domain.clone();
    let loopback = peer.ip().is_loopback();
    let mut logged_in: Option<LoggedIn> = None;
    let mut failures = 0;
    loop {
        let Item::Open(header) = xio.next().await? else {
            return Err(End::Stream("bad-format", "expected a stream header".into()));
        };
        check_header(&header, &domain)?;
        xio.header(&domain).await?;
        let Some(user) = &logged_in else {
            let offer_tls = tls.is_some() && xio.can_starttls();
            let plain_ok = xio.secure() || loopback || settings.xmpp.c2s_insecure;
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
                    xio.starttls(tls.expect("offered only with [tls]")).await?;
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
            "<stream:features><bind xmlns='{}'/><session xmlns='{}'><optional/></session><sm xmlns='{}'/></stream:features>",
            ns::BIND,
            ns::SESSION,
            sm::NS
        ))
        .await?;
        loop {
            let Item::Stanza(el) = xio.next().await? else { return Err(End::Close) };
            if el.is("resume", sm::NS) {
                let h = el.attr("h").and_then(|h| h.parse::<u32>().ok());
                let parked = el.attr("previd").zip(h).and_then(|(id, _)| resumption.resume(id, &user.user));
                match (parked, h) {
                    (Some(parked), Some(h)) => return Ok(Bound::Resumed { parked, h }),
                    _ => {
                        // Unknown here (expired, or parked on a node that failed over): bind anew.
                        xio.write(&format!("<failed xmlns='{}'><item-not-found xmlns='{}'/></failed>", sm::NS, ns::STANZA_ERRORS)).await?;
                        continue;
                    }
                }
            }
            if el.is("enable", sm::NS) {
                xio.write(&format!("<failed xmlns='{}'><unexpected-request xmlns='{}'/></failed>", sm::NS, ns::STANZA_ERRORS)).await?;
                continue;
            }
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
            return Ok(Bound::New { logged_in: logged_in.take().expect("logged in"), resource });
        }
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
async fn sasl<C: Channel>(xio: &mut C, gateway: &Gateway, auth: &Element, offered: &[&str], peer: SocketAddr) -> Result<(LoggedIn, Option<String>), SaslError> {
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

/// The `<failure/>` condition and text of a login the gateway refused (over the login budget:
/// `temporary-auth-failure`, the text saying `retry after N ms`), or, for a user whose home is
/// another node, the stream error `see-other-host` naming that node's XMPP address
/// (docs/xmpp.md).
fn refused(gateway: &Gateway, f: Failure) -> SaslError {
    if let Some(node) = &f.login_on {
        let host = gateway.settings.node_of_topology(&node.0).map(|n| {
            if n.xmpp.is_empty() {
                url::Url::parse(&n.client).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_else(|| n.client.clone())
            } else {
                n.xmpp.clone()
            }
        });
        if let Some(host) = host {
            return SaslError::End(End::SeeOtherHost(host, f.message));
        }
    }
    let condition = match f.code {
        ErrorCode::Unauthorized | ErrorCode::BadRequest => "not-authorized",
        _ => "temporary-auth-failure",
    };
    SaslError::Failure(condition, f.message)
}

/// PLAIN (`data` is authzid NUL user NUL password) or ANONYMOUS.
async fn plain_or_anonymous(gateway: &Gateway, mechanism: &str, data: &[u8], peer: SocketAddr) -> Result<LoggedIn, SaslError> {
    if mechanism == "ANONYMOUS" {
        return gateway.login(Some("guest"), None, None, Some(peer.ip())).await.map_err(|f| refused(gateway, f));
    }
    let mut parts = data.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(("malformed-request", "PLAIN is authzid NUL user NUL password".to_owned()).into());
    };
    let (Ok(authz), Ok(user), Ok(password)) = (std::str::from_utf8(authz), std::str::from_utf8(user), std::str::from_utf8(password)) else {
        return Err(("malformed-request", "not UTF-8".to_owned()).into());
    };
    let domain = &gateway.settings.xmpp.domain;
    if !authz.is_empty() && authz != format!("{user}@{domain}") {
        return Err(("invalid-authzid", "log in as yourself".to_owned()).into());
    }
    let user = user.strip_suffix(&format!("@{domain}")).unwrap_or(user);
    let logged_in = gateway.login(Some(user), Some(password), None, Some(peer.ip())).await.map_err(|f| refused(gateway, f))?;
    if logged_in.guest {
        // An unregistered name logs in as a guest in v1; in XMPP that is ANONYMOUS.
        return Err(("not-authorized", "wrong user name or password".to_owned()).into());
    }
    Ok(logged_in)
}

/// SCRAM-SHA-256 or SCRAM-SHA-1 (RFC 5802, RFC 7677; no channel binding) from the client's
/// first message (`first`, the `<auth/>`'s data; if empty, asked for with an empty challenge)
/// to the server's final one. A user without SCRAM credentials (unknown, or a password set
/// before SCRAM) gets a stand-in salt and fails at the proof, as a wrong password does: both
/// spend the failed-login budget, through the gateway as PLAIN's failures do.
async fn scram_login<C: Channel>(xio: &mut C, gateway: &Gateway, hash: scram::Hash, first: Vec<u8>, peer: SocketAddr) -> Result<(LoggedIn, Option<String>), SaslError> {
    let first = if first.is_empty() { challenge(xio, "").await? } else { first };
    let first = scram::parse_client_first(&first).map_err(scram_failure)?;
    let domain = &gateway.settings.xmpp.domain;
    let user = first.user.strip_suffix(&format!("@{domain}")).unwrap_or(&first.user);
    if first.authzid.as_ref().is_some_and(|a| *a != format!("{user}@{domain}")) {
        return Err(SaslError::Failure("invalid-authzid", "log in as yourself".into()));
    }
    let address = Some(peer.ip());
    let credentials = gateway.scram_credentials(user, hash, address).await.map_err(|f| refused(gateway, f))?;
    let (exchange, server_first) = scram::Exchange::start(hash, &first, credentials, &scram_secret(&gateway.settings));
    let last = challenge(xio, &server_first).await?;
    let server_final = match exchange.finish(&last) {
        Ok(server_final) => Some(server_final),
        Err(scram::ScramError::InvalidProof) => None,
        Err(e) => return Err(scram_failure(e)),
    };
    let logged_in = gateway.login_verified(user, server_final.is_some(), address).await.map_err(|f| refused(gateway, f))?;
    Ok((logged_in, server_final))
}

/// Send a SASL `<challenge/>` with `data` and read the client's `<response/>`, decoded; an
/// `<abort/>` is the `aborted` failure.
async fn challenge<C: Channel>(xio: &mut C, data: &str) -> Result<Vec<u8>, SaslError> {
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

/// The bound session: stanzas in, the queue out; parked instead of closed when the
/// connection drops and the client asked for resumption (XEP-0198).
pub(super) async fn run<C: Channel>(channel: C, peer: SocketAddr, bound: Bound, gateway: Arc<Gateway>, resumption: Arc<Resumption>, shutdown: CancellationToken) {
    let domain = gateway.settings.xmpp.domain.clone();
    let (mut reader, mut writer) = channel.split();
    let (session, state, mut rx, sm, kill, resource, mut first) = match bound {
        Bound::New { logged_in, resource } => {
            let (tx, rx) = mpsc::channel::<String>(gateway.settings.limits.outbound_queue);
            let kill = CancellationToken::new();
            let jid = format!("{}@{domain}/{resource}", logged_in.user);
            let state = XmppState::new(jid, logged_in.user.clone(), domain.clone(), tx);
            let wire = Box::new(XmppWire { state: state.clone(), settings: gateway.settings.clone() });
            let hash = crate::auth::token_hash(&logged_in.token);
            let session = gateway.open_session(logged_in.user.clone(), Some(hash), Some(peer.ip()), wire, kill.clone());
            tracing::debug!(session = %session.id, jid = %state.jid, "xmpp session bound");
            (session, state, rx, Arc::new(Mutex::new(Sm::default())), kill, resource, Vec::new())
        }
        Bound::Resumed { parked, h } => {
            let Parked { session, state, queue, sm, kill, resource, .. } = parked;
            let first = {
                let mut sm = sm.lock().expect("sm lock");
                let resumed = format!("<resumed xmlns='{}' previd='{}' h='{}'/>", sm::NS, escape(sm.id.as_deref().unwrap_or_default()), sm.handled);
                let mut first = vec![resumed];
                first.extend(sm.resend_after(h));
                first
            };
            tracing::debug!(session = %session.id, jid = %state.jid, "xmpp session resumed");
            metrics::counter!("stoa_xmpp_resumptions_total").increment(1);
            (session, state, queue, sm, kill, resource, first)
        }
    };

    // Writer: everything the client receives, in queue order; at the end, the stream's end (or
    // nothing, when the session is parked: its queue goes back to the reader for parking).
    let connection_over = CancellationToken::new();
    let parking = Arc::new(AtomicBool::new(false));
    let writer = {
        let (over, parking, sm, session) = (connection_over.clone(), parking.clone(), sm.clone(), session.clone());
        let max_unacked = gateway.settings.limits.outbound_queue;
        tokio::spawn(async move {
            let mut batch: Vec<String> = std::mem::take(&mut first);
            loop {
                if !batch.is_empty() {
                    let request = {
                        let mut sm = sm.lock().expect("sm lock");
                        let request = batch.iter().fold(false, |r, s| sm.sent(s) | r);
                        if sm.unacked_count() > max_unacked {
                            session.kill(KillReason::SlowConsumer);
                        }
                        request
                    };
                    if request {
                        batch.push(format!("<r xmlns='{}'/>", sm::NS));
                    }
                    match tokio::time::timeout(WRITE_TIMEOUT, writer.send(&batch)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => {
                            over.cancel();
                            return rx;
                        }
                        Err(_) => {
                            metrics::counter!("stoa_slow_consumers_total").increment(1);
                            over.cancel();
                            return rx;
                        }
                    }
                    batch.clear();
                }
                tokio::select! {
                    biased;
                    _ = over.cancelled() => break,
                    next = rx.recv() => match next {
                        None => break,
                        Some(stanza) => {
                            batch.push(stanza);
                            while batch.len() < 64 {
                                match rx.try_recv() { Ok(s) => batch.push(s), Err(_) => break }
                            }
                        }
                    },
                }
            }
            if parking.load(Ordering::Acquire) {
                return rx;
            }
            // Whatever is still queued (a stream error, say), then the end of the stream.
            let mut tail = Vec::new();
            while let Ok(s) = rx.try_recv() {
                tail.push(s);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = writer.send(&tail).await;
                writer.close("").await;
            })
            .await;
            rx
        })
    };

    let mut handler = Handler::new(gateway.clone(), session.clone(), state.clone());
    let idle = Duration::from_millis(gateway.settings.limits.idle_timeout_ms);
    let mut pinged = false;
    let end = loop {
        let next = tokio::select! {
            _ = kill.cancelled() => Err(match session.killed_for() {
                Some(KillReason::Kicked) => End::Stream("policy-violation", "session ended by an administrator".into()),
                Some(KillReason::SlowConsumer) => End::Stream("policy-violation", "slow consumer".into()),
                // `goaway` queued its own stream error.
                _ => End::Gone,
            }),
            _ = connection_over.cancelled() => Err(End::Gone),
            _ = shutdown.cancelled() => {
                session.kill(KillReason::Shutdown);
                Err(End::Stream("system-shutdown", "server shutting down".into()))
            }
            next = tokio::time::timeout(idle, reader.next()) => Ok(next),
        };
        let item = match next {
            Err(end) => break end,
            Ok(Err(_)) if !pinged => {
                pinged = true;
                handler.ping_client();
                continue;
            }
            Ok(Err(_)) => break End::Stream("connection-timeout", "idle".into()),
            Ok(Ok(Err(end))) => break end,
            Ok(Ok(Ok(item))) => item,
        };
        pinged = false;
        match item {
            Item::Stanza(el) if el.ns() == sm::NS => {
                if let Err(end) = stream_management(&el, &sm, &state, &gateway) {
                    break end;
                }
            }
            Item::Stanza(el) => {
                let counted = sm::is_stanza(&format!("<{}", el.name()));
                if let Err(end) = handler.stanza(el).await {
                    break end;
                }
                let mut sm = sm.lock().expect("sm lock");
                if sm.enabled && counted {
                    sm.handled = sm.handled.wrapping_add(1);
                }
            }
            Item::Close => break End::Close,
            Item::Open(_) => break End::Stream("bad-format", "a second stream header".into()),
        }
    };
    drop(handler);
    let resumable = sm.lock().expect("sm lock").id.clone().filter(|_| matches!(end, End::Gone) && !kill.is_cancelled() && !shutdown.is_cancelled());
    if let Some(id) = resumable {
        parking.store(true, Ordering::Release);
        connection_over.cancel();
        if let Ok(queue) = writer.await {
            let user = session.user.clone();
            tracing::debug!(session = %session.id, "xmpp connection lost; session parked for resumption");
            let timeout = Duration::from_secs(gateway.settings.xmpp.resume_timeout_s);
            let parked = Parked { user, resource, session, state, queue, sm, kill };
            resumption.park(id, parked, gateway, timeout);
            return;
        }
        gateway.close_session(&session);
        return;
    }
    state.end(end.error_element());
    gateway.close_session(&session);
    // The writer sends what is queued (the stream error, if any), then the stream's end.
    kill.cancel();
    connection_over.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// A stream management element from the client: `<enable/>`, `<r/>`, `<a/>`.
fn stream_management(el: &Element, sm: &Mutex<Sm>, state: &XmppState, gateway: &Gateway) -> Result<(), End> {
    let mut sm = sm.lock().expect("sm lock");
    match el.name() {
        "enable" if sm.enabled => {
            state.send(format!("<failed xmlns='{}'><unexpected-request xmlns='{}'/></failed>", sm::NS, ns::STANZA_ERRORS));
        }
        "enable" => {
            sm.enabled = true;
            let resume = matches!(el.attr("resume"), Some("true" | "1"));
            let mut enabled = format!("<enabled xmlns='{}'", sm::NS);
            if resume {
                let id = uuid::Uuid::new_v4().simple().to_string();
                enabled.push_str(&format!(" id='{id}' resume='true' max='{}'", gateway.settings.xmpp.resume_timeout_s));
                sm.id = Some(id);
            }
            enabled.push_str("/>");
            state.send(enabled);
        }
        "r" => {
            state.send(format!("<a xmlns='{}' h='{}'/>", sm::NS, sm.handled));
        }
        "a" => match el.attr("h").and_then(|h| h.parse::<u32>().ok()) {
            Some(h) => sm.acked(h),
            None => return Err(End::Stream("undefined-condition", "<a/> needs a number h".into())),
        },
        other => return Err(End::Stream("unsupported-stanza-type", format!("<{other}/> of stream management is not served"))),
    }
    Ok(())
}
