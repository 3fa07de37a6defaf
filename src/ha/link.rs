//! The node link: an authenticated WebSocket between the two nodes of a pair. Each node dials
//! its peer's link address and sends, on that connection, a heartbeat (with its recovery state)
//! every `cluster.heartbeat_ms`, the list of its active rooms every few heartbeats (so the peer
//! knows which rooms to activate at once if it takes over), and admin requests meant for the
//! peer (fallback, failover). Each node's listener records what it receives. The peer counts as
//! unreachable when its connection closes or three heartbeats are missed. This is detection
//! only: whether a peer may be taken over is decided in the store (docs/ha.md).
//!
//! Authentication: the dialer's first frame carries an HMAC-SHA256, keyed with
//! `cluster.secret`, over `stoa-link|from|to|timestamp_ms`; the listener refuses a wrong MAC, a
//! node it does not know, or a timestamp more than 30 s off.

use super::state::NodeState;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// How far a link hello's timestamp may be from the listener's clock.
const MAX_CLOCK_SKEW_MS: i64 = 30_000;

/// Missed heartbeats after which the peer counts as unreachable.
const MISSED_HEARTBEATS: u32 = 3;

/// Frames on the node link.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum LinkFrame {
    LinkHello { from: String, to: String, ts: i64, mac: String },
    Heartbeat {
        from: String,
        state: NodeState,
        seq: u64,
        /// Whether the sender serves rooms right now (false while its `rooms` service is down).
        #[serde(default = "yes")]
        hosting: bool,
    },
    /// The sender's active rooms (addresses), sent when the set changed.
    Rooms { rooms: Vec<String> },
    /// An admin request for the receiver (it owns the action).
    Command { command: PeerCommand },
    /// A client frame from a session on the sender, for a room the receiver hosts.
    Client { session: u64, user: String, frame: String },
    /// That session ended on the sender.
    ClientGone { session: u64 },
    /// A server frame for a session on the receiver (answers and events of forwarded rooms).
    ToClient { session: u64, frame: String },
}

/// What a node does with what its peer sends it over the link.
pub trait Inbound: Send + Sync + 'static {
    /// An admin request from the peer.
    fn command(&self, command: PeerCommand);
    /// A client frame from session `session` of `user` on the peer.
    fn client(&self, session: u64, user: String, frame: String);
    /// Session `session` on the peer ended.
    fn client_gone(&self, session: u64);
    /// A frame for this node's session `session`.
    fn to_client(&self, session: u64, frame: String);
    /// The peer's link connection closed (it died, restarted, or the network broke).
    fn peer_lost(&self);
}

fn yes() -> bool {
    true
}

/// An admin request one node passes to its peer over the link.
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

fn mac(secret: &str, from: &str, to: &str, ts: i64) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    m.update(format!("stoa-link|{from}|{to}|{ts}").as_bytes());
    hex::encode(m.finalize().into_bytes())
}

fn mac_ok(secret: &str, from: &str, to: &str, ts: i64, given: &str) -> bool {
    let Ok(given) = hex::decode(given) else { return false };
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    m.update(format!("stoa-link|{from}|{to}|{ts}").as_bytes());
    m.verify_slice(&given).is_ok()
}

/// What this node knows about its peer from the link.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub id: String,
    /// A heartbeat arrived within the last three intervals on an open link.
    pub reachable: bool,
    /// The state the peer last reported.
    pub state: Option<NodeState>,
    /// Whether the peer serves rooms right now (as of its last heartbeat).
    pub hosting: bool,
    /// Milliseconds since the last heartbeat, if any arrived.
    pub last_heartbeat_ms_ago: Option<u64>,
    /// The peer's link connection to this node is open (it closes at once when the peer's
    /// process dies; silence alone is judged by `reachable`).
    pub link_up: bool,
}

struct PeerView {
    connected: bool,
    last: Option<Instant>,
    state: Option<NodeState>,
    hosting: bool,
    rooms: Vec<String>,
}

/// The link of one node: its listener and its dialer to the peer.
#[derive(Clone)]
pub struct Link {
    peer_id: String,
    heartbeat: Duration,
    view: Arc<Mutex<PeerView>>,
    outbox: tokio::sync::mpsc::UnboundedSender<LinkFrame>,
}

/// Node link settings for [`start`].
pub struct LinkConfig {
    pub me: String,
    pub peer_id: String,
    pub peer_link: String,
    pub secret: String,
    pub heartbeat: Duration,
}

impl Link {
    /// The peer as seen from here now.
    pub fn peer(&self) -> PeerStatus {
        let v = self.view.lock().expect("peer view lock");
        let ago = v.last.map(|t| t.elapsed());
        let fresh = ago.is_some_and(|a| a < self.heartbeat * MISSED_HEARTBEATS);
        PeerStatus {
            id: self.peer_id.clone(),
            reachable: v.connected && fresh,
            state: v.state,
            hosting: v.hosting,
            last_heartbeat_ms_ago: ago.map(|a| a.as_millis() as u64),
            link_up: v.connected,
        }
    }

    /// The peer's active rooms, as it last reported them.
    pub fn peer_rooms(&self) -> Vec<String> {
        self.view.lock().expect("peer view lock").rooms.clone()
    }

    /// Send `command` to the peer (dropped if the link is down).
    pub fn send(&self, command: PeerCommand) {
        let _ = self.outbox.send(LinkFrame::Command { command });
    }

    /// Pass a client frame of this node's session to the peer, which hosts its room.
    pub fn forward_client(&self, session: u64, user: &str, frame: &str) {
        let _ = self.outbox.send(LinkFrame::Client { session, user: user.to_owned(), frame: frame.to_owned() });
    }

    /// Tell the peer a session whose frames it served has ended.
    pub fn client_gone(&self, session: u64) {
        let _ = self.outbox.send(LinkFrame::ClientGone { session });
    }

    /// Send a server frame to the peer's session `session`.
    pub fn to_client(&self, session: u64, frame: String) {
        let _ = self.outbox.send(LinkFrame::ToClient { session, frame });
    }

    /// Whether the link to the peer is up in both directions as far as this node knows.
    pub fn is_up(&self) -> bool {
        self.peer().reachable
    }
}

/// What a node tells its peer about itself, read for every heartbeat.
pub trait LocalView: Send + Sync + 'static {
    fn state(&self) -> NodeState;
    fn hosting(&self) -> bool;
    fn active_rooms(&self) -> Vec<String>;
}

/// Start the link: serve `listener` and keep dialing the peer, until `shutdown`.
/// `my_state` is read for every heartbeat.
/// `local` is read for every heartbeat; what the peer sends goes to `inbound`.
pub fn start(
    listener: TcpListener,
    config: LinkConfig,
    local: Arc<dyn LocalView>,
    inbound: Arc<dyn Inbound>,
    shutdown: CancellationToken,
) -> Link {
    let view = Arc::new(Mutex::new(PeerView { connected: false, last: None, state: None, hosting: false, rooms: Vec::new() }));
    let (outbox, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
    let link = Link { peer_id: config.peer_id.clone(), heartbeat: config.heartbeat, view: view.clone(), outbox };
    let config = Arc::new(config);
    tokio::spawn(serve(listener, config.clone(), view, inbound, shutdown.clone()));
    tokio::spawn(dial(config, local, outbox_rx, shutdown));
    link
}

async fn serve(
    listener: TcpListener,
    config: Arc<LinkConfig>,
    view: Arc<Mutex<PeerView>>,
    inbound: Arc<dyn Inbound>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let (config, view, inbound, shutdown) = (config.clone(), view.clone(), inbound.clone(), shutdown.clone());
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
            // The first frame must be a valid hello from our peer.
            let hello = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            let Ok(Some(Ok(Message::Text(text)))) = hello else { return };
            match serde_json::from_str::<LinkFrame>(text.as_str()) {
                Ok(LinkFrame::LinkHello { from, to, ts, mac }) => {
                    let skew = (crate::store::now_ms() - ts).abs();
                    if from != config.peer_id || to != config.me || skew > MAX_CLOCK_SKEW_MS || !mac_ok(&config.secret, &from, &to, ts, &mac) {
                        tracing::warn!(%from, "node link refused: bad hello");
                        let _ = ws.close(None).await;
                        return;
                    }
                }
                _ => return,
            }
            view.lock().expect("peer view lock").connected = true;
            tracing::info!(peer = %config.peer_id, "node link up");
            loop {
                let next = tokio::select! {
                    n = ws.next() => n,
                    _ = shutdown.cancelled() => break,
                };
                match next {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<LinkFrame>(text.as_str()) {
                        Ok(LinkFrame::Heartbeat { state, hosting, .. }) => {
                            let mut v = view.lock().expect("peer view lock");
                            v.last = Some(Instant::now());
                            v.state = Some(state);
                            v.hosting = hosting;
                        }
                        Ok(LinkFrame::Rooms { rooms }) => view.lock().expect("peer view lock").rooms = rooms,
                        Ok(LinkFrame::Command { command }) => {
                            tracing::info!(peer = %config.peer_id, ?command, "request from the peer");
                            inbound.command(command);
                        }
                        Ok(LinkFrame::Client { session, user, frame }) => inbound.client(session, user, frame),
                        Ok(LinkFrame::ClientGone { session }) => inbound.client_gone(session),
                        Ok(LinkFrame::ToClient { session, frame }) => inbound.to_client(session, frame),
                        Ok(LinkFrame::LinkHello { .. }) | Err(_) => tracing::warn!(peer = %config.peer_id, "unexpected node-link frame"),
                    },
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            view.lock().expect("peer view lock").connected = false;
            tracing::warn!(peer = %config.peer_id, "node link down");
            inbound.peer_lost();
        });
    }
}

async fn dial(
    config: Arc<LinkConfig>,
    local: Arc<dyn LocalView>,
    mut outbox: tokio::sync::mpsc::UnboundedReceiver<LinkFrame>,
    shutdown: CancellationToken,
) {
    let url = format!("ws://{}/link", config.peer_link);
    let mut seq = 0u64;
    let encode = |f: &LinkFrame| Message::Text(serde_json::to_string(f).expect("link frames serialize").into());
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if let Ok(Ok((mut ws, _))) = tokio::time::timeout(Duration::from_secs(2), tokio_tungstenite::connect_async(&url)).await {
            let ts = crate::store::now_ms();
            let hello = LinkFrame::LinkHello {
                from: config.me.clone(),
                to: config.peer_id.clone(),
                ts,
                mac: mac(&config.secret, &config.me, &config.peer_id, ts),
            };
            let mut ok = ws.send(encode(&hello)).await.is_ok();
            // A new connection always gets the room list.
            let mut sent_rooms: Option<Vec<String>> = None;
            let mut next_beat = tokio::time::Instant::now();
            while ok {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_beat) => {
                        seq += 1;
                        next_beat += config.heartbeat;
                        let beat = LinkFrame::Heartbeat { from: config.me.clone(), state: local.state(), seq, hosting: local.hosting() };
                        ok = ws.send(encode(&beat)).await.is_ok();
                        if ok && (seq % ROOMS_EVERY == 1 || sent_rooms.is_none()) {
                            let mut rooms = local.active_rooms();
                            rooms.sort_unstable();
                            if sent_rooms.as_ref() != Some(&rooms) {
                                ok = ws.send(encode(&LinkFrame::Rooms { rooms: rooms.clone() })).await.is_ok();
                                sent_rooms = Some(rooms);
                            }
                        }
                    }
                    frame = outbox.recv() => match frame {
                        Some(frame) => ok = ws.send(encode(&frame)).await.is_ok(),
                        None => return,
                    },
                    _ = shutdown.cancelled() => { let _ = ws.close(None).await; return; }
                }
            }
        }
        // Whatever was queued for a link that is gone is stale now (forwarded client frames are
        // resent by their clients; admin requests are answered by the node that got them).
        while outbox.try_recv().is_ok() {}
        // Peer not there (yet): try again after one heartbeat interval.
        tokio::select! {
            _ = tokio::time::sleep(config.heartbeat) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_mac_binds_secret_direction_and_time() {
        let m = mac("secret-0123456789", "1a", "1b", 42);
        assert!(mac_ok("secret-0123456789", "1a", "1b", 42, &m));
        assert!(!mac_ok("another-secret-xx", "1a", "1b", 42, &m), "wrong secret");
        assert!(!mac_ok("secret-0123456789", "1b", "1a", 42, &m), "wrong direction");
        assert!(!mac_ok("secret-0123456789", "1a", "1b", 43, &m), "other timestamp");
        assert!(!mac_ok("secret-0123456789", "1a", "1b", 42, "zz"), "not hex");
    }
}
