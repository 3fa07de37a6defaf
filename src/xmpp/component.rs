//! Stoa as an external component (XEP-0114) of another XMPP server: the MUC service of an
//! existing Prosody or ejabberd, so that its users (and federated servers' users) join Stoa
//! rooms with the clients they have (docs/xmpp.md, "Stoa behind Prosody / ejabberd").
//!
//! Stoa dials the server's component port, opens a `jabber:component:accept` stream to its
//! domain (this node's room service), and proves the shared secret with the handshake
//! (`SHA-1(stream id ‖ secret)`, hex). From then on the server routes every stanza for the
//! domain and its rooms to Stoa, each with the sender's full JID in `from`. The link is kept up:
//! a broken or refused link is dialed again with a growing backoff (0.5 s to 30 s).
//!
//! Each sender (full JID) is an occupant of its own: a [`Session`](crate::session::Session) of
//! the user its bare JID names ([`super::user_of_jid`]), with the same stanza handler and MUC
//! wire as a c2s session, writing into the link's one outbound queue. Its stanzas are served in
//! order by a task of its own, so one slow join never holds the others up. An occupant ends when
//! it is in no room any more (a last `unavailable`), and with the link. Bad input from the
//! server (a stanza of another namespace, for another domain, without a sender, over the
//! limits of a sender's queue) gets a stanza error or is dropped with a warning: it never ends
//! the link. Only XML that is not well-formed does (the stream cannot go on), and the link is
//! dialed again.

use super::handler::Handler;
use super::muc::{XmppState, XmppWire};
use super::stream::{Item, StreamReader};
use super::{escape, ns};
use crate::config::ComponentSettings;
use crate::gateway::Gateway;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::minidom::Element;

/// How long dialing the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to open its stream and to accept the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait before dialing again, doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A link that stayed up this long starts its next backoff from [`BACKOFF_MIN`] again.
const STABLE: Duration = Duration::from_secs(60);
/// Stanzas of one sender waiting to be served; more are refused (`resource-constraint`).
const SENDER_QUEUE: usize = 64;
/// How long one write to the server may take before the link counts as broken.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keep the component link for `settings` up while `wanted` says so, until `shutdown`. The node
/// that hosts a service's rooms holds its link: its own while it serves its rooms, its peer's
/// in backup mode (node.rs decides, docs/xmpp.md).
pub async fn run(gateway: Arc<Gateway>, settings: ComponentSettings, mut wanted: watch::Receiver<bool>, shutdown: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            w = wanted.wait_for(|w| *w) => if w.is_err() { return },
        }
        // This attempt ends with the node, or when the link is no longer wanted.
        let attempt = shutdown.child_token();
        let unwanted = {
            let (attempt, mut wanted) = (attempt.clone(), wanted.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = attempt.cancelled() => {}
                    _ = wanted.wait_for(|w| !*w) => attempt.cancel(),
                }
            })
        };
        let started = Instant::now();
        let outcome = serve_once(&gateway, &settings, &attempt).await;
        attempt.cancel();
        let _ = unwanted.await;
        metrics::gauge!("stoa_xmpp_component_up", "domain" => settings.domain.clone()).set(0.0);
        if shutdown.is_cancelled() {
            return;
        }
        if !*wanted.borrow() {
            tracing::info!(domain = %settings.domain, "xmpp component: link closed (this node does not serve the rooms of {} now)", settings.domain);
            backoff = BACKOFF_MIN;
            continue;
        }
        match &outcome {
            Ok(()) => tracing::warn!(server = %settings.server, domain = %settings.domain, "xmpp component: the server closed the link; dialing again"),
            Err(e) => tracing::warn!(server = %settings.server, domain = %settings.domain, error = %e, "xmpp component: link failed; dialing again"),
        }
        if started.elapsed() > STABLE {
            backoff = BACKOFF_MIN;
        }
        // Jitter, so that many links of one server do not dial in step.
        let wait = backoff.mul_f64(rand::random_range(0.75..1.25));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The handshake's proof of the secret (XEP-0114 §3): hex SHA-1 of the stream id and the secret.
fn handshake_digest(stream_id: &str, secret: &str) -> String {
    use sha1::{Digest, Sha1};
    hex::encode(Sha1::new().chain_update(stream_id.as_bytes()).chain_update(secret.as_bytes()).finalize())
}

/// Either side of the connection to the server (TCP, or TLS over it).
type ReadSide = Box<dyn AsyncRead + Send + Unpin>;
type WriteSide = Box<dyn AsyncWrite + Send + Unpin>;

/// Items of the server's stream, read as they arrive.
struct Incoming {
    tcp: ReadSide,
    reader: StreamReader,
    ready: std::collections::VecDeque<Item>,
    buf: Vec<u8>,
}

impl Incoming {
    async fn next(&mut self) -> Result<Item, String> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Ok(item);
            }
            let n = self.tcp.read(&mut self.buf).await.map_err(|e| format!("reading from the server: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            let mut items = Vec::new();
            self.reader.feed(&self.buf[..n], &mut items).map_err(|e| format!("the server's stream: {e}"))?;
            self.ready.extend(items);
        }
    }
}

/// The text of a stream error element (`<stream:error>`): its condition and text.
fn stream_error_text(el: &Element) -> String {
    let condition = el.children().find(|c| c.ns() == ns::STREAM_ERRORS && c.name() != "text").map(|c| c.name().to_owned()).unwrap_or_default();
    let text = el.get_child("text", ns::STREAM_ERRORS).map(|t| t.text()).unwrap_or_default();
    format!("{condition} {text}").trim().to_owned()
}

/// TLS over `tcp`, verifying the server's certificate for the host of `cfg.server` against the
/// node's trust anchors (`tls.ca_file`, or the Mozilla roots).
async fn tls_connect(gateway: &Gateway, cfg: &ComponentSettings, tcp: TcpStream) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = gateway.settings.tls_client_config().map_err(|e| format!("the TLS trust anchors: {e}"))?;
    let host = cfg.server.rsplit_once(':').map_or(cfg.server.as_str(), |(h, _)| h).trim_matches(['[', ']']);
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| format!("`{host}` is no TLS server name: {e}"))?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| format!("no TLS handshake with {} in {HANDSHAKE_TIMEOUT:?}", cfg.server))?
        .map_err(|e| format!("TLS with {}: {e}", cfg.server))
}

/// Dial, authenticate and serve one link until it ends (or `shutdown`).
async fn serve_once(gateway: &Arc<Gateway>, cfg: &ComponentSettings, shutdown: &CancellationToken) -> Result<(), String> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&cfg.server))
        .await
        .map_err(|_| format!("no connection to {} in {CONNECT_TIMEOUT:?}", cfg.server))?
        .map_err(|e| format!("connecting to {}: {e}", cfg.server))?;
    let _ = tcp.set_nodelay(true);
    let (rd, mut wr): (ReadSide, WriteSide) = if cfg.tls {
        let tls = tls_connect(gateway, cfg, tcp).await?;
        let (rd, wr) = tokio::io::split(tls);
        (Box::new(rd), Box::new(wr))
    } else {
        let (rd, wr) = tcp.into_split();
        (Box::new(rd), Box::new(wr))
    };
    let xmpp = &gateway.settings.xmpp;
    let mut incoming =
        Incoming { tcp: rd, reader: StreamReader::new(xmpp.max_stanza_bytes, xmpp.max_depth), ready: Default::default(), buf: vec![0; 16 * 1024] };
    let header = format!(
        "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' to='{}'>",
        ns::COMPONENT,
        ns::STREAM,
        escape(&cfg.domain)
    );
    wr.write_all(header.as_bytes()).await.map_err(|e| format!("writing the stream header: {e}"))?;
    let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming.next()).await.map_err(|_| "the server opened no stream".to_owned())??;
    let Item::Open(opened) = opened else { return Err("the server sent no stream header".into()) };
    let Some(id) = opened.attr("id") else { return Err("the server's stream header has no id".into()) };
    let proof = format!("<handshake>{}</handshake>", handshake_digest(id, &cfg.secret));
    wr.write_all(proof.as_bytes()).await.map_err(|e| format!("writing the handshake: {e}"))?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming.next()).await.map_err(|_| "the server did not answer the handshake".to_owned())?? {
        Item::Stanza(el) if el.name() == "handshake" => {}
        Item::Stanza(el) if el.name() == "error" => {
            return Err(format!("the server refused the component {}: {} (check the domain and secret it was given)", cfg.domain, stream_error_text(&el)));
        }
        other => return Err(format!("the server answered the handshake with {other:?}")),
    }
    tracing::info!(server = %cfg.server, domain = %cfg.domain, "xmpp component: link up; rooms at {}", cfg.domain);
    metrics::gauge!("stoa_xmpp_component_up", "domain" => cfg.domain.clone()).set(1.0);

    // Everything for the server goes through one queue, written in batches.
    let (out_tx, mut out_rx) = mpsc::channel::<String>(gateway.settings.limits.outbound_queue.saturating_mul(64));
    let broken = CancellationToken::new();
    let writer = {
        let broken = broken.clone();
        tokio::spawn(async move {
            let mut batch = String::new();
            while let Some(first) = out_rx.recv().await {
                batch.clear();
                batch.push_str(&first);
                while batch.len() < 64 * 1024 {
                    match out_rx.try_recv() {
                        Ok(s) => batch.push_str(&s),
                        Err(_) => break,
                    }
                }
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(batch.as_bytes())).await {
                    Ok(Ok(())) => {}
                    _ => {
                        broken.cancel();
                        return wr;
                    }
                }
            }
            wr
        })
    };

    let (roomless_tx, mut roomless) = mpsc::unbounded_channel();
    let mut link = Link { gateway: gateway.clone(), cfg: cfg.clone(), out: out_tx, senders: HashMap::new(), opened: 0, roomless: roomless_tx };
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(jid) = roomless.recv() => link.roomless(&jid),
            _ = broken.cancelled() => break Err("writing to the server failed or timed out".to_owned()),
            item = incoming.next() => match item {
                Ok(Item::Stanza(el)) if el.is("error", ns::STREAM) => {
                    break Err(format!("the server ended the stream: {}", stream_error_text(&el)));
                }
                Ok(Item::Stanza(el)) => link.route(el),
                Ok(Item::Close) => break Ok(()),
                Ok(Item::Open(_)) => break Err("the server opened a second stream".to_owned()),
                Err(e) => break Err(e),
            },
        }
    };
    // The occupants' tasks end with their queues: their sessions leave their rooms.
    let Link { out, .. } = link;
    if shutdown.is_cancelled() {
        let _ = out.try_send("</stream:stream>".to_owned());
    }
    drop(out);
    if let Ok(Ok(mut wr)) = tokio::time::timeout(Duration::from_secs(1), writer).await {
        let _ = wr.shutdown().await;
    }
    outcome
}

/// One sender's task, as the link's reader sees it.
struct Sender {
    /// Its stanzas, in order.
    queue: mpsc::Sender<Element>,
    /// Its session's MUC state (the rooms it is in).
    state: Arc<XmppState>,
    /// Stanzas queued and not yet fully served: counted up here, down by the task when it has
    /// served one.
    unserved: Arc<AtomicUsize>,
}

/// One authenticated link: its outbound queue and its senders.
struct Link {
    gateway: Arc<Gateway>,
    cfg: ComponentSettings,
    out: mpsc::Sender<String>,
    /// Each sender (full JID), served by its own task.
    senders: HashMap<String, Sender>,
    /// Senders opened, for pruning the ended ones now and then.
    opened: u64,
    /// Where senders' tasks report that they are in no room.
    roomless: mpsc::UnboundedSender<String>,
}

impl Link {
    /// Answer `el` with a stanza error from the address it was sent to.
    fn refuse(&self, el: &Element, from: &str, kind: &str, cond: &str, text: &str) {
        if el.attr("type") == Some("error") {
            return;
        }
        let id = el.attr("id").map(|i| format!(" id='{}'", escape(i))).unwrap_or_default();
        let to_attr = el.attr("to").filter(|t| Jid::new(t).is_ok()).unwrap_or(&self.cfg.domain);
        let stanza = format!(
            "<{name} to='{}' from='{}'{id} type='error'>{}</{name}>",
            escape(from),
            escape(to_attr),
            super::muc::error_element(kind, cond, text),
            name = el.name()
        );
        let _ = self.out.try_send(stanza);
    }

    /// Hand one stanza from the server to its sender's task.
    fn route(&mut self, el: Element) {
        if el.ns() != ns::COMPONENT || !matches!(el.name(), "iq" | "message" | "presence") {
            tracing::warn!(element = el.name(), ns = el.ns(), "xmpp component: dropped an element that is no stanza");
            return;
        }
        let Some(from) = el.attr("from").and_then(|f| Jid::new(f).ok()) else {
            tracing::warn!(element = el.name(), "xmpp component: dropped a stanza without a valid `from`");
            return;
        };
        let from_text = from.to_string();
        let to_domain = el.attr("to").and_then(|t| Jid::new(t).ok()).map(|j| j.domain().as_str().to_owned());
        if to_domain.as_deref() != Some(self.cfg.domain.as_str()) {
            let text = format!("this service is {}; nothing else is served here", self.cfg.domain);
            return self.refuse(&el, &from_text, "cancel", "item-not-found", &text);
        }
        if from.node().is_none() && el.name() != "iq" {
            return self.refuse(&el, &from_text, "cancel", "not-allowed", "only users join rooms and send messages");
        }
        let el = match self.senders.get(&from_text) {
            Some(sender) => match sender.queue.try_send(el) {
                Ok(()) => {
                    sender.unserved.fetch_add(1, Ordering::AcqRel);
                    return;
                }
                Err(mpsc::error::TrySendError::Full(el)) => {
                    return self.refuse(&el, &from_text, "wait", "resource-constraint", "too many stanzas waiting; slow down");
                }
                // Its task ended (its session was killed): a new one.
                Err(mpsc::error::TrySendError::Closed(el)) => el,
            },
            None => el,
        };
        let sender = self.open(&from);
        if sender.queue.try_send(el).is_ok() {
            sender.unserved.fetch_add(1, Ordering::AcqRel); // a new queue has room
        }
        self.senders.insert(from_text, sender);
    }

    /// A sender's task reported that it was in no room: forget it if it still is and has
    /// served every stanza it was given (dropping the queue ends the task, which ends the
    /// session). Decided here, where the queue is fed: no stanza is queued to a task that is
    /// ending, and the sender's next stanza goes to a new task only after the last one was
    /// served, so one sender's stanzas are served in order. A report that is out of date (the
    /// sender joined a room since, or has stanzas waiting) changes nothing.
    fn roomless(&mut self, jid: &str) {
        let idle = self.senders.get(jid).is_some_and(|s| s.unserved.load(Ordering::Acquire) == 0 && s.state.rooms().is_empty());
        if idle {
            self.senders.remove(jid);
        }
    }

    /// A task serving `jid`'s stanzas as an occupant of its own.
    fn open(&mut self, jid: &Jid) -> Sender {
        self.opened += 1;
        if self.opened.is_multiple_of(1024) {
            self.senders.retain(|_, s| !s.queue.is_closed());
        }
        let settings = &self.gateway.settings;
        let bare = jid.to_bare().to_string();
        // A server (no user part) only asks (disco, ping); `@domain` is no user's name.
        let user = if jid.node().is_some() { super::user_of_jid(&bare, &settings.xmpp.domain) } else { format!("@{bare}") };
        let state = XmppState::for_component(jid.to_string(), user.clone(), settings.xmpp.domain.clone(), self.cfg.domain.clone(), self.out.clone());
        let wire = Box::new(XmppWire { state: state.clone(), settings: settings.clone() });
        let kill = CancellationToken::new();
        let session = self.gateway.open_session(user, None, None, wire, kill.clone());
        let mut handler = Handler::new(self.gateway.clone(), session.clone(), state.clone());
        let (tx, mut rx) = mpsc::channel::<Element>(SENDER_QUEUE);
        let unserved = Arc::new(AtomicUsize::new(0));
        let sender = Sender { queue: tx, state: state.clone(), unserved: unserved.clone() };
        let (gateway, roomless, jid) = (self.gateway.clone(), self.roomless.clone(), jid.to_string());
        tokio::spawn(async move {
            loop {
                let el = tokio::select! {
                    _ = kill.cancelled() => break,
                    el = rx.recv() => match el {
                        Some(el) => el,
                        None => break,
                    },
                };
                let served = handler.stanza(el).await;
                unserved.fetch_sub(1, Ordering::AcqRel);
                if let Err(end) = served {
                    tracing::debug!(%jid, ?end, "xmpp component: a sender broke the rules; its session ends");
                    break;
                }
                if state.rooms().is_empty() {
                    let _ = roomless.send(jid.clone());
                }
            }
            drop(handler);
            gateway.close_session(&session);
        });
        sender
    }
}
