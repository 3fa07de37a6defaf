//! The node link: an authenticated WebSocket from each node to every other node of the cluster
//! (a full mesh; in a single pair, the two nodes of the pair). Each node dials every other
//! node's link address and sends, on that connection, a heartbeat every `cluster.heartbeat_ms`
//! (its recovery state, and the room services it serves right now, by which other groups route
//! room requests to it: docs/clusters.md), the list of its active rooms every few heartbeats to
//! its peer only (so the peer knows which rooms to activate at once if it takes over), admin
//! requests for the receiver, `home_of` questions (where a user's home node is, asked by a node
//! whose store lacks the account: docs/clusters.md), and forwarded room operations with their
//! answers. Each node's
//! listener records what it receives, per sending node. A node counts as unreachable when its
//! connection closes or three heartbeats are missed. This is detection only: whether a peer may
//! be taken over is decided in the store (docs/ha.md).
//!
//! Authentication is a challenge-response keyed with `cluster.secret` (for a node of a peering
//! cluster, that peering's own secret), so a hello captured off the wire is worth nothing a
//! second time:
//!
//! 1. the listener sends `challenge { nonce: N_l }` (32 fresh random bytes) right after the
//!    upgrade;
//! 2. the dialer answers `link_hello { from, to, nonce: N_d, mac }` with
//!    `mac = HMAC-SHA256(secret, "stoa-link-v2|hello|from|to|N_l|N_d")`;
//! 3. the listener checks it (`from` must be a node of the topology, `to` itself) and answers
//!    `link_welcome { mac }` with `HMAC-SHA256(secret, "stoa-link-v2|welcome|from|to|N_l|N_d")`,
//!    which proves to the dialer that the listener knows the secret too (the dialer sends
//!    commands and client frames, so it must not talk to an impostor).
//!
//! Only then does either side act on a frame. A newer authenticated connection from a node
//! (it restarted, or the old TCP connection is half-open) replaces the older one; the older
//! one's end is then not taken for the node going away. Unauthenticated connections change
//! nothing, and at most `MAX_PENDING_HANDSHAKES` of them are served at once, each for at most
//! `HANDSHAKE_TIMEOUT`. What travels after the handshake is protected on the wire by TLS
//! (`[tls]`), which a node requires for a link off loopback (docs/operations.md#security).

use crate::ids::{NodeId, SessionId};
use super::state::NodeState;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// How long an incoming link connection has to upgrade and authenticate; after that it is
/// dropped (a slow or silent dialer must not hold the listener).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Incoming link connections that may be in their handshake at once, besides one per node of
/// the topology; more are closed at once.
const MAX_PENDING_HANDSHAKES: usize = 8;

/// Bytes a link connection reads at a time. tungstenite zero-fills this much of its buffer
/// before every read, even one that finds nothing (its default is 128 KiB, which cost the
/// forwarded path a 128 KiB `memset` per read); a larger frame still arrives whole, in more reads.
const LINK_READ_BUFFER: usize = 16 * 1024;

/// The next change `changes` sees; never, when there is nothing to watch or its sender is gone
/// (then `changes` becomes `None`).
pub(in crate::ha) async fn next_change<T>(changes: &mut Option<tokio::sync::watch::Receiver<T>>) {
    if let Some(rx) = changes {
        if rx.changed().await.is_ok() {
            return;
        }
        *changes = None;
    }
    std::future::pending().await
}

/// The WebSocket settings of both ends of a link connection.
fn link_ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(LINK_READ_BUFFER)
}

/// Missed heartbeats after which the peer counts as unreachable.
const MISSED_HEARTBEATS: u32 = 3;

/// Frames on the node link.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum LinkFrame {
    /// The listener's fresh nonce (hex), its first frame.
    Challenge { nonce: String },
    /// The dialer's answer: who it is, its own fresh nonce, and the MAC over both nonces.
    LinkHello { from: String, to: String, nonce: String, mac: String },
    /// The listener's proof that it knows the secret too.
    LinkWelcome { mac: String },
    Heartbeat {
        from: String,
        state: NodeState,
        seq: u64,
        /// Whether the sender serves rooms right now (false while its `rooms` service is down).
        #[serde(default = "yes")]
        hosting: bool,
        /// The sender's critical services that are down now.
        #[serde(default)]
        down: Vec<String>,
        /// Client connections open on the sender.
        #[serde(default)]
        connections: i64,
        /// The room services whose rooms the sender serves now (its own; its peer's too in
        /// backup mode).
        #[serde(default)]
        services: Vec<String>,
    },
    /// The sender's active rooms (addresses), sent to its peer when the set changed.
    Rooms { rooms: Vec<String> },
    /// The sender, in backup mode, is handing the receiver's rooms back: these were active on
    /// it. The receiver loads them in bulk when it takes its rooms back (by then they are gone
    /// from the sender's `rooms` list, which follows its active rooms).
    HandBack { rooms: Vec<String> },
    /// An admin request for the receiver (it owns the action); `id` pairs it with its answer.
    Command {
        #[serde(default)]
        id: u64,
        command: PeerCommand,
    },
    /// The outcome of the sender's peer's `command` `id`, as the admin who asked should see it.
    CommandDone { id: u64, ok: bool, message: String },
    /// That session ended on the sender.
    SessionGone { session: SessionId },
    /// Which node is `user`'s home, if the receiver's store has the account? Answered with
    /// `command_done` `id`: the node id, or empty (docs/clusters.md, *Users' home nodes*).
    HomeOf { id: u64, user: String },
}

/// Answers `home_of` questions from the other nodes: the home node of a user whose account is
/// in this node's store (assigning one if it has none), `None` if it has no such user.
pub trait HomeDirectory: Send + Sync + 'static {
    fn home_of(&self, user: String) -> futures_util::future::BoxFuture<'static, Option<String>>;
}

/// `{"op":"to_host","session":S,"user":U,"msg":M}`: a message from session `S` of user `U` on
/// the sender to the receiver, which hosts rooms it uses (a room request: `crate::forward`
/// defines `M`, JSON carried as it is). Session ids are the sender's.
#[derive(Deserialize)]
struct ToHost {
    session: SessionId,
    user: String,
    msg: Box<RawValue>,
}

/// `{"op":"to_sessions","sessions":[S…],"msg":M}`: one message for one or more sessions on the
/// receiver (replies, answers and events of the rooms the sender hosts for them), so a room
/// event for several of the receiver's sessions travels once.
#[derive(Deserialize)]
struct ToSessions {
    sessions: Vec<SessionId>,
    msg: Box<RawValue>,
}

/// A frame as the listener reads it: the two that carry a message keep it as raw JSON (a
/// `RawValue` cannot sit in the internally tagged [`LinkFrame`]).
enum Incoming {
    Frame(LinkFrame),
    ToHost(ToHost),
    ToSessions(ToSessions),
}

fn parse_incoming(text: &str) -> Option<Incoming> {
    #[derive(Deserialize)]
    struct Op<'a> {
        #[serde(borrow)]
        op: std::borrow::Cow<'a, str>,
    }
    let op: Op = serde_json::from_str(text).ok()?;
    match op.op.as_ref() {
        "to_host" => serde_json::from_str(text).ok().map(Incoming::ToHost),
        "to_sessions" => serde_json::from_str(text).ok().map(Incoming::ToSessions),
        _ => serde_json::from_str(text).ok().map(Incoming::Frame),
    }
}

/// What waits in a node's outbox: a frame, or a message for one of that node's sessions (kept
/// as text, and sent once for consecutive sessions that get the same message).
enum Outgoing {
    Frame(LinkFrame),
    ToHost { session: SessionId, user: String, msg: String },
    ToSession { session: SessionId, msg: Arc<str> },
}

/// At most this many queued frames are written before the connection is flushed.
const FLUSH_EVERY: usize = 64;

/// What a node does with what the other nodes send it over their links; `from` is the
/// authenticated sender.
pub trait Inbound: Send + Sync + 'static {
    /// An admin request from node `from`; its outcome goes back with [`Link::answer`] and `id`.
    fn command(&self, from: &NodeId, id: u64, command: PeerCommand);
    /// A message from session `session` of `user` on node `from`.
    fn to_host(&self, from: &NodeId, session: SessionId, user: String, msg: &str);
    /// Session `session` on node `from` ended.
    fn session_gone(&self, from: &NodeId, session: SessionId);
    /// A message from node `from` for these sessions of this node.
    fn to_sessions(&self, from: &NodeId, sessions: &[SessionId], msg: &str);
    /// Node `node`'s link connection closed (it died, restarted, or the network broke).
    fn node_lost(&self, node: &NodeId);
}

fn yes() -> bool {
    true
}

/// An admin request one node passes to another over the link (the receiver owns the action).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PeerCommand {
    /// Hand `node`'s rooms back to it (sent to the backup).
    Fallback { node: String },
    /// Fail `node` (the receiver) over to the sender.
    Failover { node: String },
    /// Stop or start a critical service of `node` (the receiver).
    Service { node: String, service: String, start: bool },
}

/// How often (in heartbeats) the active-room list is checked for changes and re-sent.
const ROOMS_EVERY: u64 = 4;

/// Which message of the handshake a MAC is for (a hello MAC is no welcome MAC).
#[derive(Clone, Copy)]
enum Step {
    Hello,
    Welcome,
}

/// The handshake transcript both sides MAC: the direction (`from` dials `to`) and both nonces.
struct Transcript<'a> {
    from: &'a str,
    to: &'a str,
    listener_nonce: &'a str,
    dialer_nonce: &'a str,
}

impl Transcript<'_> {
    fn hmac(&self, secret: &str, step: Step) -> Hmac<Sha256> {
        let step = match step {
            Step::Hello => "hello",
            Step::Welcome => "welcome",
        };
        let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        m.update(format!("stoa-link-v2|{step}|{}|{}|{}|{}", self.from, self.to, self.listener_nonce, self.dialer_nonce).as_bytes());
        m
    }

    fn mac(&self, secret: &str, step: Step) -> String {
        hex::encode(self.hmac(secret, step).finalize().into_bytes())
    }

    /// Constant-time check of `given` (hex).
    fn verify(&self, secret: &str, step: Step, given: &str) -> bool {
        let Ok(given) = hex::decode(given) else { return false };
        self.hmac(secret, step).verify_slice(&given).is_ok()
    }
}

/// 32 fresh random bytes, hex.
fn nonce() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A nonce as [`nonce`] makes them: 64 hex digits.
fn nonce_ok(n: &str) -> bool {
    n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What this node knows about another node from its link.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub id: String,
    /// The node is this node's peer (the other node of its redundancy group).
    pub peer: bool,
    /// A heartbeat arrived within the last three intervals on an open link.
    pub reachable: bool,
    /// The state the peer last reported.
    pub state: Option<NodeState>,
    /// Whether the peer serves rooms right now (as of its last heartbeat).
    pub hosting: bool,
    /// The peer's critical services that are down (as of its last heartbeat).
    pub services_down: Vec<String>,
    /// Client connections open on the peer (as of its last heartbeat).
    pub connections: i64,
    /// The room services whose rooms the node serves (as of its last heartbeat).
    pub services: Vec<String>,
    /// Milliseconds since the last heartbeat, if any arrived.
    pub last_heartbeat_ms_ago: Option<u64>,
    /// The peer's link connection to this node is open (it closes at once when the peer's
    /// process dies; silence alone is judged by `reachable`).
    pub link_up: bool,
}

#[derive(Default)]
struct PeerView {
    /// The authenticated connection from the node that counts now: its generation, and the
    /// token that ends it when a newer one replaces it.
    current: Option<(u64, CancellationToken)>,
    /// Generations handed out so far.
    generations: u64,
    last: Option<Instant>,
    state: Option<NodeState>,
    hosting: bool,
    down: Vec<String>,
    connections: i64,
    services: Vec<String>,
    rooms: Vec<String>,
    /// The rooms of its last `hand_back`, until taken.
    handed_back: Vec<String>,
}

impl PeerView {
    fn connected(&self) -> bool {
        self.current.is_some()
    }
}

/// How long an admin request passed to another node waits for that node's outcome.
const COMMAND_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Admin requests passed to other nodes that wait for their outcome, by id.
type PendingCommands = Arc<Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Result<String, String>>>>>;

/// One other node as the link sees it: what it last said, and the queue of frames for it.
struct Remote {
    id: NodeId,
    /// Its own room service (from the topology).
    service: String,
    /// The peering cluster it belongs to (none: a node of this cluster).
    peering: Option<String>,
    view: Mutex<PeerView>,
    outbox: tokio::sync::mpsc::UnboundedSender<Outgoing>,
}

/// The links of one node to every other node: the handle the rest of the node sends through
/// and reads the other nodes' states from.
#[derive(Clone)]
pub struct Link {
    peer_id: Option<NodeId>,
    heartbeat: Duration,
    remotes: Arc<std::collections::HashMap<NodeId, Arc<Remote>>>,
    pending: PendingCommands,
    next_command: Arc<std::sync::atomic::AtomicU64>,
    directory: Option<Arc<dyn HomeDirectory>>,
    /// Bumped when a heartbeat says something new about who serves what (a node that became
    /// reachable, or changed its hosting or its services), and when a node's link goes down.
    hosts: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Another node of the topology, as [`LinkConfig`] names it.
#[derive(Clone, Debug)]
pub struct LinkNode {
    pub id: String,
    /// Its node-link address (`host:port`).
    pub link: String,
    /// Its room service alias.
    pub service: String,
    /// The peering cluster it belongs to, with that peering's secret (none: a node of this
    /// cluster, keyed by `cluster.secret`). A peering node's link carries room requests only.
    pub peering: Option<(String, String)>,
}

impl LinkConfig {
    /// The secret that keys the link with node `id`: its peering's, or the cluster's.
    fn secret_for(&self, id: &str) -> Option<&str> {
        let node = self.nodes.iter().find(|n| n.id == id)?;
        Some(node.peering.as_ref().map_or(self.secret.as_str(), |(_, secret)| secret.as_str()))
    }
}

/// Node link settings for [`new`].
pub struct LinkConfig {
    pub me: String,
    /// This node's room service alias.
    pub my_service: String,
    /// The other node of this node's redundancy group, if it has one with `ha = true`: the one
    /// that gets the active-room lists and whose loss may lead to a takeover.
    pub peer_id: Option<String>,
    /// Every other node of the cluster.
    pub nodes: Vec<LinkNode>,
    pub secret: String,
    pub heartbeat: Duration,
    /// `[tls]`: the listener accepts TLS only (before the WebSocket upgrade).
    pub tls: Option<crate::tls::ServerTls>,
    /// `[tls]`: dial the other nodes with `wss://`, verifying each one's certificate for the
    /// host of its `link` address against these trust anchors (`tls.ca_file`).
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
    /// Answers the other nodes' `home_of` questions (none: they get no answer and time out).
    pub directory: Option<Arc<dyn HomeDirectory>>,
}

impl Link {
    /// A heartbeat arrived within the last three intervals on an open link.
    fn reachable(&self, v: &PeerView) -> bool {
        v.connected() && v.last.is_some_and(|t| t.elapsed() < self.heartbeat * MISSED_HEARTBEATS)
    }

    fn status_of(&self, r: &Remote) -> PeerStatus {
        let v = r.view.lock().expect("peer view lock");
        let ago = v.last.map(|t| t.elapsed());
        PeerStatus {
            id: r.id.0.clone(),
            peer: self.peer_id.as_ref() == Some(&r.id),
            reachable: self.reachable(&v),
            state: v.state,
            hosting: v.hosting,
            services_down: v.down.clone(),
            connections: v.connections,
            services: v.services.clone(),
            last_heartbeat_ms_ago: ago.map(|a| a.as_millis() as u64),
            link_up: v.connected(),
        }
    }

    /// This node's peer (the other node of its HA group), if it has one.
    pub fn peer_id(&self) -> Option<&NodeId> {
        self.peer_id.as_ref()
    }

    /// The peer as seen from here now (none without a peer).
    pub fn peer(&self) -> Option<PeerStatus> {
        self.status(self.peer_id.as_ref()?)
    }

    /// Node `node` as seen from here now (none: not a node of the topology).
    pub fn status(&self, node: &NodeId) -> Option<PeerStatus> {
        self.remotes.get(node).map(|r| self.status_of(r))
    }

    /// Every other node as seen from here now, by id.
    pub fn statuses(&self) -> Vec<PeerStatus> {
        let mut all: Vec<PeerStatus> = self.remotes.values().map(|r| self.status_of(r)).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// A reachable node that says it serves the rooms of `service` now: the service's own node
    /// if it does, else another (its peer in backup mode). The view may be a heartbeat old;
    /// the node that gets a request for a room it no longer hosts says who does (fencing
    /// judges, never this view).
    pub fn host_of(&self, service: &str) -> Option<NodeId> {
        let serving = |r: &&Arc<Remote>| {
            let v = r.view.lock().expect("peer view lock");
            self.reachable(&v) && v.hosting && v.services.iter().any(|x| x == service)
        };
        let mut candidates: Vec<&Arc<Remote>> = self.remotes.values().filter(serving).collect();
        candidates.sort_by_key(|r| (r.service != service, r.id.0.clone()));
        candidates.first().map(|r| r.id.clone())
    }

    /// Changes whenever [`Link::host_of`] may answer differently: a heartbeat (a node came
    /// up, or now serves other rooms) or a node's link going down. What waits for a new host,
    /// or for a node to go, waits on this.
    pub fn host_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.hosts.subscribe()
    }

    /// Tell whoever waits on [`Link::host_changes`] to look again.
    fn hosts_changed(&self) {
        self.hosts.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The peering cluster node `node` belongs to (none: a node of this cluster, or unknown).
    pub fn peering_of(&self, node: &NodeId) -> Option<&str> {
        self.remotes.get(node).and_then(|r| r.peering.as_deref())
    }

    /// The peer's active rooms, as it last reported them.
    pub fn peer_rooms(&self) -> Vec<String> {
        let Some(peer) = self.peer_id.as_ref().and_then(|p| self.remotes.get(p)) else { return Vec::new() };
        peer.view.lock().expect("peer view lock").rooms.clone()
    }

    /// Tell the peer which of its rooms were active here, as this node hands them back.
    pub fn hand_back(&self, rooms: Vec<String>) {
        if let Some(peer) = &self.peer_id {
            self.send(peer, LinkFrame::HandBack { rooms });
        }
    }

    /// The rooms the peer said it was handing back (see [`Link::hand_back`]), once.
    pub fn take_handed_back(&self) -> Vec<String> {
        let Some(peer) = self.peer_id.as_ref().and_then(|p| self.remotes.get(p)) else { return Vec::new() };
        std::mem::take(&mut peer.view.lock().expect("peer view lock").handed_back)
    }

    fn send(&self, node: &NodeId, frame: LinkFrame) {
        self.queue(node, Outgoing::Frame(frame));
    }

    fn queue(&self, node: &NodeId, out: Outgoing) {
        if let Some(r) = self.remotes.get(node) {
            let _ = r.outbox.send(out);
        }
    }

    /// Pass `command` to node `node` and wait for its outcome (that node's own words, as its
    /// admin API would answer them).
    pub async fn request(&self, node: &NodeId, command: PeerCommand) -> Result<String, String> {
        if !self.is_up(node) {
            return Err(format!("node {node} cannot be reached over the node link; ask it directly"));
        }
        let id = self.next_command.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending.lock().expect("pending commands lock").insert(id, tx);
        self.send(node, LinkFrame::Command { id, command });
        let answer = tokio::time::timeout(COMMAND_ANSWER_TIMEOUT, rx).await;
        self.pending.lock().expect("pending commands lock").remove(&id);
        match answer {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(format!("node {node}: the node link closed before it answered; it may have carried the request out")),
            Err(_) => Err(format!("node {node} did not answer within {COMMAND_ANSWER_TIMEOUT:?}; it may still carry the request out")),
        }
    }

    /// Send the outcome of node `node`'s command `id` back to it.
    pub fn answer(&self, node: &NodeId, id: u64, outcome: &Result<String, String>) {
        let (ok, message) = match outcome {
            Ok(m) => (true, m.clone()),
            Err(m) => (false, m.clone()),
        };
        self.send(node, LinkFrame::CommandDone { id, ok, message });
    }

    /// Pass a message (JSON) of this node's session `session` of `user` to node `node`, which
    /// hosts rooms it uses.
    pub fn to_host(&self, node: &NodeId, session: SessionId, user: &str, msg: String) {
        self.queue(node, Outgoing::ToHost { session, user: user.to_owned(), msg });
    }

    /// Tell node `node` a session whose rooms it served has ended.
    pub fn session_gone(&self, node: &NodeId, session: SessionId) {
        self.send(node, LinkFrame::SessionGone { session });
    }

    /// Send a message (JSON) to node `node`'s session `session`. The same `msg` (one `Arc`)
    /// queued for several sessions of that node in a row travels once.
    pub fn to_session(&self, node: &NodeId, session: SessionId, msg: Arc<str>) {
        self.queue(node, Outgoing::ToSession { session, msg });
    }

    /// Ask node `node` for the home node of `user` (see [`HomeDirectory`]); `None` if it has no
    /// such user, cannot be reached, or does not answer within `wait`.
    pub async fn home_of(&self, node: &NodeId, user: &str, wait: Duration) -> Option<String> {
        if !self.is_up(node) {
            return None;
        }
        let id = self.next_command.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending.lock().expect("pending commands lock").insert(id, tx);
        self.send(node, LinkFrame::HomeOf { id, user: user.to_owned() });
        let answer = tokio::time::timeout(wait, rx).await;
        self.pending.lock().expect("pending commands lock").remove(&id);
        answer.ok()?.ok()?.ok().filter(|home| !home.is_empty())
    }

    /// Answer node `node`'s `home_of` question `id` from this node's directory.
    fn answer_home_of(&self, node: &NodeId, id: u64, user: String) {
        let Some(directory) = self.directory.clone() else { return };
        let (link, node) = (self.clone(), node.clone());
        tokio::spawn(async move {
            let home = directory.home_of(user).await;
            link.send(&node, LinkFrame::CommandDone { id, ok: true, message: home.unwrap_or_default() });
        });
    }

    /// Whether the link to `node` is up in both directions as far as this node knows.
    pub fn is_up(&self, node: &NodeId) -> bool {
        self.remotes.get(node).is_some_and(|r| self.reachable(&r.view.lock().expect("peer view lock")))
    }

    /// Whether `node` is up (as [`Link::is_up`]) and serves rooms (as of its last heartbeat):
    /// read for every forwarded request, so without building a [`PeerStatus`].
    pub fn is_serving(&self, node: &NodeId) -> bool {
        self.remotes.get(node).is_some_and(|r| {
            let v = r.view.lock().expect("peer view lock");
            self.reachable(&v) && v.hosting
        })
    }
}

/// What a node tells the other nodes about itself, read for every heartbeat.
pub trait LocalView: Send + Sync + 'static {
    fn state(&self) -> NodeState;
    fn hosting(&self) -> bool;
    fn active_rooms(&self) -> Vec<String>;
    /// Critical services that are down now.
    fn services_down(&self) -> Vec<String>;
    /// Client connections open now.
    fn connections(&self) -> i64;
    /// Follows the node's recovery state, if it changes: each change goes out in a heartbeat
    /// at once (the other nodes learn of a takeover without waiting out an interval).
    fn state_changes(&self) -> Option<tokio::sync::watch::Receiver<NodeState>> {
        None
    }
}

/// The link of a node before it runs: [`new`] makes it with its [`Link`] handle, so the parts
/// that send through the link (recovery, forwarding) are built before the ones that handle
/// what arrives, and [`LinkRunner::start`] runs it with those.
pub struct LinkRunner {
    config: LinkConfig,
    link: Link,
    outboxes: Vec<(Arc<Remote>, tokio::sync::mpsc::UnboundedReceiver<Outgoing>)>,
}

/// The link's handle (frames sent through it wait until the link runs and the receiving node
/// is connected) and its runner.
pub fn new(config: LinkConfig) -> (Link, LinkRunner) {
    let mut remotes = std::collections::HashMap::new();
    let mut outboxes = Vec::new();
    for n in &config.nodes {
        let (outbox, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
        let peering = n.peering.as_ref().map(|(name, _)| name.clone());
        let remote = Arc::new(Remote { id: NodeId(n.id.clone()), service: n.service.clone(), peering, view: Mutex::default(), outbox });
        remotes.insert(remote.id.clone(), remote.clone());
        outboxes.push((remote, outbox_rx));
    }
    let link = Link {
        peer_id: config.peer_id.clone().map(NodeId),
        heartbeat: config.heartbeat,
        remotes: Arc::new(remotes),
        pending: PendingCommands::default(),
        next_command: Arc::default(),
        directory: config.directory.clone(),
        hosts: Arc::new(tokio::sync::watch::Sender::new(0)),
    };
    (link.clone(), LinkRunner { config, link, outboxes })
}

impl LinkRunner {
    /// Serve `listener` and keep dialing every other node, until `shutdown`. `local` is read
    /// for every heartbeat; what the other nodes send goes to `inbound`.
    pub fn start(self, listener: TcpListener, local: Arc<dyn LocalView>, inbound: Arc<dyn Inbound>, shutdown: CancellationToken) {
        let config = Arc::new(self.config);
        tokio::spawn(serve(listener, config.clone(), self.link.clone(), inbound, shutdown.clone()));
        for (remote, outbox) in self.outboxes {
            tokio::spawn(dial(config.clone(), remote, local.clone(), outbox, shutdown.clone()));
        }
    }
}

fn encode(frame: &LinkFrame) -> Message {
    Message::Text(serde_json::to_string(frame).expect("link frames serialize").into())
}

/// The next frames to write from `first` and what is queued behind it (up to [`FLUSH_EVERY`]):
/// a message for several sessions in a row becomes one `to_sessions` frame. Messages are JSON
/// already and are written as they are, not escaped into a string.
fn next_frames(first: Outgoing, queue: &mut tokio::sync::mpsc::UnboundedReceiver<Outgoing>) -> Vec<Message> {
    let mut frames = Vec::new();
    let mut pending: Option<(Vec<SessionId>, Arc<str>)> = None;
    let mut next = Some(first);
    while let Some(out) = next.take() {
        match out {
            Outgoing::ToSession { session, msg } => match &mut pending {
                Some((sessions, same)) if Arc::ptr_eq(same, &msg) => sessions.push(session),
                _ => {
                    frames.extend(pending.take().map(|(sessions, msg)| to_sessions_frame(&sessions, &msg)));
                    pending = Some((vec![session], msg));
                }
            },
            other => {
                frames.extend(pending.take().map(|(sessions, msg)| to_sessions_frame(&sessions, &msg)));
                frames.push(match other {
                    Outgoing::Frame(frame) => encode(&frame),
                    Outgoing::ToHost { session, user, msg } => {
                        let user = serde_json::to_string(&user).expect("a string serializes");
                        Message::Text(format!(r#"{{"op":"to_host","session":{session},"user":{user},"msg":{msg}}}"#).into())
                    }
                    Outgoing::ToSession { .. } => unreachable!("matched above"),
                });
            }
        }
        if frames.len() < FLUSH_EVERY {
            next = queue.try_recv().ok();
        }
    }
    frames.extend(pending.map(|(sessions, msg)| to_sessions_frame(&sessions, &msg)));
    frames
}

fn to_sessions_frame(sessions: &[SessionId], msg: &str) -> Message {
    let ids: Vec<String> = sessions.iter().map(|s| s.0.to_string()).collect();
    Message::Text(format!(r#"{{"op":"to_sessions","sessions":[{}],"msg":{msg}}}"#, ids.join(",")).into())
}

/// The next text frame as a link frame (`None`: closed, not text, or not a link frame).
async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Option<LinkFrame> {
    match ws.next().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str()).ok(),
        _ => None,
    }
}

/// Why a link handshake failed (logged and counted; never told to the other side).
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("the connection closed or sent something else")]
    Closed,
    #[error("hello from `{from}` to `{to}`: not another node of this cluster to this node")]
    WrongNodes { from: String, to: String },
    #[error("the MAC does not match (wrong cluster.secret, or a replayed hello)")]
    BadMac,
}

/// The listener's side of the handshake: challenge, check the hello, prove the secret; returns
/// the authenticated dialer.
async fn accept_handshake<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, config: &LinkConfig) -> Result<NodeId, HandshakeError> {
    let listener_nonce = nonce();
    ws.send(encode(&LinkFrame::Challenge { nonce: listener_nonce.clone() })).await.map_err(|_| HandshakeError::Closed)?;
    let Some(LinkFrame::LinkHello { from, to, nonce: dialer_nonce, mac }) = next_frame(ws).await else {
        return Err(HandshakeError::Closed);
    };
    let Some(secret) = config.secret_for(&from).filter(|_| to == config.me) else {
        return Err(HandshakeError::WrongNodes { from, to });
    };
    let transcript = Transcript { from: &from, to: &to, listener_nonce: &listener_nonce, dialer_nonce: &dialer_nonce };
    if !nonce_ok(&dialer_nonce) || dialer_nonce == listener_nonce || !transcript.verify(secret, Step::Hello, &mac) {
        return Err(HandshakeError::BadMac);
    }
    let welcome = LinkFrame::LinkWelcome { mac: transcript.mac(secret, Step::Welcome) };
    ws.send(encode(&welcome)).await.map_err(|_| HandshakeError::Closed)?;
    Ok(NodeId(from))
}

/// The dialer's side: answer the challenge, check the listener's (node `to`'s) proof.
async fn dial_handshake<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, config: &LinkConfig, to: &NodeId) -> Result<(), HandshakeError> {
    let Some(LinkFrame::Challenge { nonce: listener_nonce }) = next_frame(ws).await else {
        return Err(HandshakeError::Closed);
    };
    if !nonce_ok(&listener_nonce) {
        return Err(HandshakeError::BadMac);
    }
    let secret = config.secret_for(&to.0).expect("dialing a node of the topology");
    let dialer_nonce = nonce();
    let transcript = Transcript { from: &config.me, to: &to.0, listener_nonce: &listener_nonce, dialer_nonce: &dialer_nonce };
    let hello = LinkFrame::LinkHello {
        from: config.me.clone(),
        to: to.0.clone(),
        nonce: dialer_nonce.clone(),
        mac: transcript.mac(secret, Step::Hello),
    };
    ws.send(encode(&hello)).await.map_err(|_| HandshakeError::Closed)?;
    match next_frame(ws).await {
        Some(LinkFrame::LinkWelcome { mac }) if transcript.verify(secret, Step::Welcome, &mac) => Ok(()),
        Some(LinkFrame::LinkWelcome { .. }) => Err(HandshakeError::BadMac),
        _ => Err(HandshakeError::Closed),
    }
}

async fn serve(listener: TcpListener, config: Arc<LinkConfig>, link: Link, inbound: Arc<dyn Inbound>, shutdown: CancellationToken) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES + config.nodes.len()));
    loop {
        let (stream, remote) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            metrics::counter!("stoa_link_handshakes_refused_total", "reason" => "busy").increment(1);
            tracing::warn!(%remote, "node link refused: too many connections in their handshake");
            continue;
        };
        let (config, link, inbound, shutdown) = (config.clone(), link.clone(), inbound.clone(), shutdown.clone());
        tokio::spawn(async move {
            let handshake = async {
                let stream = crate::tls::MaybeTls::accept(stream, config.tls.as_ref()).await.map_err(|e| {
                    tracing::debug!(%remote, error = %e, "node link: TLS handshake failed");
                    HandshakeError::Closed
                })?;
                let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(link_ws_config())).await.map_err(|_| HandshakeError::Closed)?;
                accept_handshake(&mut ws, &config).await.map(|from| (ws, from))
            };
            let (ws, from) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => {
                    metrics::counter!("stoa_link_handshakes_refused_total", "reason" => "auth").increment(1);
                    tracing::warn!(%remote, error = %e, "node link refused");
                    return;
                }
                Err(_) => {
                    metrics::counter!("stoa_link_handshakes_refused_total", "reason" => "timeout").increment(1);
                    tracing::warn!(%remote, "node link refused: no handshake in time");
                    return;
                }
            };
            drop(permit);
            let node = link.remotes.get(&from).expect("the handshake admits nodes of the topology only").clone();
            receive(ws, node, link, inbound, shutdown).await;
        });
    }
}

/// Record and hand on what node `node` sends on its authenticated connection, until it closes.
async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: WebSocketStream<S>,
    node: Arc<Remote>,
    link: Link,
    inbound: Arc<dyn Inbound>,
    shutdown: CancellationToken,
) {
    let from = &node.id;
    // This connection is the node's now; an older one (half-open, or from before the node
    // restarted) ends without counting as the node going away.
    let ended = CancellationToken::new();
    let generation = {
        let mut v = node.view.lock().expect("peer view lock");
        v.generations += 1;
        let generation = v.generations;
        if let Some((_, older)) = v.current.replace((generation, ended.clone())) {
            older.cancel();
        }
        generation
    };
    tracing::info!(node = %from, generation, "node link up");
    loop {
        let next = tokio::select! {
            n = ws.next() => n,
            _ = ended.cancelled() => break,
            _ = shutdown.cancelled() => break,
        };
        match next {
            Some(Ok(Message::Text(text))) => match parse_incoming(text.as_str()) {
                Some(Incoming::Frame(LinkFrame::Heartbeat { state, hosting, down, connections, services, .. })) => {
                    let mut v = node.view.lock().expect("peer view lock");
                    if !link.reachable(&v) || v.hosting != hosting || v.services != services {
                        link.hosts_changed();
                    }
                    v.last = Some(Instant::now());
                    v.state = Some(state);
                    v.hosting = hosting;
                    v.down = down;
                    v.connections = connections;
                    v.services = services;
                }
                Some(Incoming::Frame(LinkFrame::Rooms { rooms })) => node.view.lock().expect("peer view lock").rooms = rooms,
                Some(Incoming::Frame(LinkFrame::HandBack { rooms })) => node.view.lock().expect("peer view lock").handed_back = rooms,
                Some(Incoming::Frame(LinkFrame::Command { id, command })) if node.peering.is_some() => {
                    // A peering carries room requests only: another cluster's operators act on
                    // their own nodes.
                    tracing::warn!(node = %from, ?command, "admin request from a peering cluster's node refused");
                    link.answer(from, id, &Err(format!("node {from} is of another cluster: admin requests are not taken over a peering")));
                }
                Some(Incoming::Frame(LinkFrame::Command { id, command })) => {
                    tracing::info!(node = %from, ?command, "request from another node");
                    inbound.command(from, id, command);
                }
                Some(Incoming::Frame(LinkFrame::CommandDone { id, ok, message })) => {
                    if let Some(waiter) = link.pending.lock().expect("pending commands lock").remove(&id) {
                        let _ = waiter.send(if ok { Ok(message) } else { Err(message) });
                    }
                }
                Some(Incoming::ToHost(ToHost { session, user, msg })) => inbound.to_host(from, session, user, msg.get()),
                Some(Incoming::Frame(LinkFrame::SessionGone { session })) => inbound.session_gone(from, session),
                Some(Incoming::ToSessions(ToSessions { sessions, msg })) => inbound.to_sessions(from, &sessions, msg.get()),
                // Homes are this cluster's business: a peering cluster's node learns none.
                Some(Incoming::Frame(LinkFrame::HomeOf { id, .. })) if node.peering.is_some() => link.answer(from, id, &Ok(String::new())),
                Some(Incoming::Frame(LinkFrame::HomeOf { id, user })) => link.answer_home_of(from, id, user),
                Some(Incoming::Frame(LinkFrame::Challenge { .. } | LinkFrame::LinkHello { .. } | LinkFrame::LinkWelcome { .. })) | None => {
                    tracing::warn!(node = %from, "unexpected node-link frame")
                }
            },
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    let replaced = {
        let mut v = node.view.lock().expect("peer view lock");
        match &v.current {
            Some((g, _)) if *g == generation => {
                v.current = None;
                false
            }
            _ => true,
        }
    };
    if replaced {
        tracing::info!(node = %from, generation, "older node link connection closed (a newer one serves)");
    } else if !shutdown.is_cancelled() {
        tracing::warn!(node = %from, "node link down");
        // The node is unreachable now: whoever waits on `host_changes` looks again at once
        // (the recovery manager decides on a takeover without waiting for its next tick).
        link.hosts_changed();
        inbound.node_lost(from);
    }
}

/// The services whose rooms a node in `state` serves: its own and, in backup mode, its
/// peer's; none while it does not host rooms at all.
fn services_served(config: &LinkConfig, state: NodeState, hosting: bool) -> Vec<String> {
    let (own, peers) = state.serves();
    let mut services = Vec::new();
    if hosting && own {
        services.push(config.my_service.clone());
    }
    if hosting
        && peers
        && let Some(peer) = config.peer_id.as_ref().and_then(|p| config.nodes.iter().find(|n| &n.id == p))
    {
        services.push(peer.service.clone());
    }
    services
}

/// Keep a connection to node `to`: dial, authenticate, then send heartbeats and whatever is
/// queued for it, until `shutdown`.
async fn dial(
    config: Arc<LinkConfig>,
    to: Arc<Remote>,
    local: Arc<dyn LocalView>,
    mut outbox: tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
    shutdown: CancellationToken,
) {
    let address = &config.nodes.iter().find(|n| n.id == to.id.0).expect("a remote of the topology").link;
    let scheme = if config.client_tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{address}/link");
    let is_peer = config.peer_id.as_deref() == Some(to.id.0.as_str());
    let connector = config.client_tls.clone().map(tokio_tungstenite::Connector::Rustls);
    // A TLS failure (untrusted or wrong certificate) repeats on every attempt: log each new one once.
    let mut last_tls_error = String::new();
    let mut seq = 0u64;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let connect = async {
            // No Nagle: the link carries small frames one at a time, and the other end only
            // reads (its acknowledgements are delayed), so a frame sent behind an unacknowledged
            // one would wait up to the delayed-ACK timeout (40 ms).
            let dialed = tokio_tungstenite::connect_async_tls_with_config(&url, Some(link_ws_config()), true, connector.clone()).await;
            let (mut ws, _) = dialed.map_err(|e| {
                // rustls reports a refused certificate as an I/O error wrapping a rustls::Error.
                let tls_error = match &e {
                    tokio_tungstenite::tungstenite::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).map(|e| e.to_string()),
                    tokio_tungstenite::tungstenite::Error::Tls(e) => Some(e.to_string()),
                    _ => None,
                };
                if let Some(e) = tls_error
                    && e != last_tls_error
                {
                    tracing::warn!(node = %to.id, url = %url, error = %e, "node link: TLS to the node failed");
                    last_tls_error = e;
                }
                HandshakeError::Closed
            })?;
            last_tls_error.clear(); // a later failure is news again
            dial_handshake(&mut ws, &config, &to.id).await.map(|()| ws)
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
            Ok(Ok(mut ws)) => {
                let mut ok = true;
                // A new connection to the peer always gets the room list.
                let mut sent_rooms: Option<Vec<String>> = None;
                let mut next_beat = tokio::time::Instant::now();
                let mut changes = local.state_changes();
                while ok {
                    tokio::select! {
                        _ = next_change(&mut changes) => next_beat = tokio::time::Instant::now(),
                        _ = tokio::time::sleep_until(next_beat) => {
                            seq += 1;
                            next_beat += config.heartbeat;
                            let (state, hosting) = (local.state(), local.hosting());
                            let beat = LinkFrame::Heartbeat {
                                from: config.me.clone(),
                                state,
                                seq,
                                hosting,
                                down: local.services_down(),
                                connections: local.connections(),
                                services: services_served(&config, state, hosting),
                            };
                            ok = ws.send(encode(&beat)).await.is_ok();
                            if ok && is_peer && (seq % ROOMS_EVERY == 1 || sent_rooms.is_none()) {
                                let mut rooms = local.active_rooms();
                                rooms.sort_unstable();
                                if sent_rooms.as_ref() != Some(&rooms) {
                                    ok = ws.send(encode(&LinkFrame::Rooms { rooms: rooms.clone() })).await.is_ok();
                                    sent_rooms = Some(rooms);
                                }
                            }
                        }
                        out = outbox.recv() => match out {
                            // What queued up meanwhile goes in the same write.
                            Some(out) => {
                                for frame in next_frames(out, &mut outbox) {
                                    ok = ok && ws.feed(frame).await.is_ok();
                                }
                                ok = ok && ws.flush().await.is_ok();
                            }
                            None => return,
                        },
                        _ = shutdown.cancelled() => { let _ = ws.close(None).await; return; }
                    }
                }
            }
            Ok(Err(HandshakeError::Closed)) | Err(_) => {} // the node is not there (yet)
            Ok(Err(e)) => {
                metrics::counter!("stoa_link_handshakes_refused_total", "reason" => "peer_auth").increment(1);
                tracing::warn!(node = %to.id, error = %e, "node link: the node failed to prove the shared secret");
            }
        }
        // Whatever was queued for a link that is gone is stale now (forwarded client frames are
        // resent by their clients; admin requests are answered by the node that got them).
        while outbox.try_recv().is_ok() {}
        // Node not there (yet): try again after one heartbeat interval.
        tokio::select! {
            _ = tokio::time::sleep(config.heartbeat) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Whether `text` is a node-link frame, parsed as the listener parses what arrives; a hook for
/// the `link_frame` fuzz target and its corpus replay (fuzz/). Any text gets an answer, never a
/// panic.
#[doc(hidden)]
pub fn parse_link_frame(text: &str) -> bool {
    parse_incoming(text).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(from: &'a str, to: &'a str, l: &'a str, d: &'a str) -> Transcript<'a> {
        Transcript { from, to, listener_nonce: l, dialer_nonce: d }
    }

    #[test]
    fn link_mac_binds_secret_direction_nonces_and_step() {
        let (l, d) = (nonce(), nonce());
        let t = transcript("1a", "1b", &l, &d);
        let m = t.mac("secret-0123456789", Step::Hello);
        assert!(t.verify("secret-0123456789", Step::Hello, &m));
        assert!(!t.verify("another-secret-xx", Step::Hello, &m), "wrong secret");
        assert!(!t.verify("secret-0123456789", Step::Welcome, &m), "a hello MAC is no welcome MAC");
        assert!(!transcript("1b", "1a", &l, &d).verify("secret-0123456789", Step::Hello, &m), "wrong direction");
        let other = nonce();
        assert!(!transcript("1a", "1b", &other, &d).verify("secret-0123456789", Step::Hello, &m), "another challenge (a replay)");
        assert!(!transcript("1a", "1b", &l, &other).verify("secret-0123456789", Step::Hello, &m), "another dialer nonce");
        assert!(!t.verify("secret-0123456789", Step::Hello, "zz"), "not hex");
    }

    /// Messages for several sessions in a row travel once, in order, as raw JSON, and read
    /// back as they were sent; a message with quotes and escapes is not escaped again.
    #[test]
    fn queued_messages_merge_per_run_and_read_back() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (a, b): (Arc<str>, Arc<str>) = (r#"{"m":"event","text":"a \"quoted\" word"}"#.into(), r#"{"m":"other"}"#.into());
        let to = |session: u64, msg: &Arc<str>| Outgoing::ToSession { session: SessionId(session), msg: msg.clone() };
        for out in [to(2, &a), to(3, &b), Outgoing::Frame(LinkFrame::SessionGone { session: SessionId(4) }), to(5, &b)] {
            tx.send(out).unwrap();
        }
        tx.send(Outgoing::ToHost { session: SessionId(6), user: "ann \"x\"".into(), msg: r#"{"m":"request"}"#.into() }).unwrap();
        let frames = next_frames(to(1, &a), &mut rx);
        let read: Vec<String> = frames
            .iter()
            .map(|f| match parse_incoming(f.to_text().unwrap()) {
                Some(Incoming::ToSessions(t)) => format!("{:?} {}", t.sessions.iter().map(|s| s.0).collect::<Vec<_>>(), t.msg.get()),
                Some(Incoming::ToHost(t)) => format!("host {} {} {}", t.session.0, t.user, t.msg.get()),
                Some(Incoming::Frame(f)) => format!("{f:?}"),
                None => panic!("unreadable: {f}"),
            })
            .collect();
        assert_eq!(
            read,
            [
                format!("[1, 2] {a}"),
                format!("[3] {b}"),
                "SessionGone { session: SessionId(4) }".to_owned(),
                format!("[5] {b}"),
                r#"host 6 ann "x" {"m":"request"}"#.to_owned(),
            ]
        );
        assert!(parse_incoming(r#"{"op":"to_sessions","sessions":[1],"msg":}"#).is_none(), "bad JSON is no frame");
    }

    /// A node as the other end of a link in these tests: normal, hosting nothing, and
    /// ignoring whatever arrives.
    struct Quiet;

    impl LocalView for Quiet {
        fn state(&self) -> NodeState {
            NodeState::Normal
        }
        fn hosting(&self) -> bool {
            false
        }
        fn active_rooms(&self) -> Vec<String> {
            Vec::new()
        }
        fn services_down(&self) -> Vec<String> {
            Vec::new()
        }
        fn connections(&self) -> i64 {
            0
        }
    }

    impl Inbound for Quiet {
        fn command(&self, _: &NodeId, _: u64, _: PeerCommand) {}
        fn to_host(&self, _: &NodeId, _: SessionId, _: String, _: &str) {}
        fn session_gone(&self, _: &NodeId, _: SessionId) {}
        fn to_sessions(&self, _: &NodeId, _: &[SessionId], _: &str) {}
        fn node_lost(&self, _: &NodeId) {}
    }

    /// Two nodes `a` and `b` linked on loopback; `b` stops when its token is cancelled.
    async fn two_nodes(heartbeat: Duration) -> (Link, Link, CancellationToken, CancellationToken) {
        let listeners = [TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap()];
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let config = |me: usize| LinkConfig {
            me: ["a", "b"][me].to_owned(),
            my_service: format!("conference-{}.localhost", ["a", "b"][me]),
            peer_id: Some(["b", "a"][me].to_owned()),
            nodes: vec![LinkNode { id: ["b", "a"][me].to_owned(), link: addrs[1 - me].clone(), service: format!("conference-{}.localhost", ["b", "a"][me]), peering: None }],
            secret: "a link secret for the tests".to_owned(),
            heartbeat,
            tls: None,
            client_tls: None,
            directory: None,
        };
        let [la, lb] = listeners;
        let (a, run_a) = new(config(0));
        let (b, run_b) = new(config(1));
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        run_a.start(la, Arc::new(Quiet), Arc::new(Quiet), stop_a.clone());
        run_b.start(lb, Arc::new(Quiet), Arc::new(Quiet), stop_b.clone());
        (a, b, stop_a, stop_b)
    }

    /// The recovery manager decides on a takeover when the peer's link goes down, not at its
    /// next tick: the link tells whoever waits on `host_changes` at once. (The heartbeat here is
    /// a minute, so nothing else could say it within the test's wait.)
    #[tokio::test]
    async fn a_link_going_down_is_told_at_once() {
        let (a, _b, stop_a, stop_b) = two_nodes(Duration::from_secs(60)).await;
        let peer = NodeId("b".to_owned());
        let mut changes = a.host_changes();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !a.is_up(&peer) {
                changes.changed().await.unwrap();
            }
        })
        .await
        .expect("a sees b within 10 s");
        changes.mark_unchanged();
        stop_b.cancel();
        tokio::time::timeout(Duration::from_secs(5), changes.changed()).await.expect("a is told b's link went down").unwrap();
        assert!(!a.is_up(&peer));
        stop_a.cancel();
    }

    #[test]
    fn nonces_are_fresh_and_well_formed() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        assert!(nonce_ok(&a) && nonce_ok(&b));
        assert!(!nonce_ok("") && !nonce_ok(&"g".repeat(64)) && !nonce_ok(&"a".repeat(63)));
    }
}
