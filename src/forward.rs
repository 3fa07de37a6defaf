//! Forwarding room operations between the two nodes of a pair, over the node link.
//!
//! A client on node B, whatever protocol it speaks, may join, read and post in a room hosted by
//! its peer A. B's gateway tries the room locally first; when the registry answers that A
//! hosts it (and the link to A is up), the gateway passes the operation, typed (a
//! [`RoomOp`]), to A through this module (`Remote::request`). A serves it with
//! [`Gateway::serve`] for a *stand-in* session: an ordinary [`Session`] of the same user (the
//! link is authenticated, and B did the login) whose wire is the link. What the room tells the
//! stand-in (answers such as `joined` and acks, room events, `goaway`) travels back typed
//! (`Down`) and reaches the client's own session on B, whose front end encodes it as if the
//! room were local. The operation's outcome comes back as a `Down::Reply`. Later operations
//! of that session on that room go straight to A.
//!
//! So the room's actor, its order, its fencing and its acks are A's, unchanged; B adds one hop,
//! and neither the room nor any front end knows. A stand-in serves its session's operations one
//! at a time, in the order B sent them, as a connection does. When the link drops (A died, or
//! the network broke), A drops its stand-ins (the rooms see their occupants leave), B fails
//! the operations still waiting with `unavailable` and sends its forwarding sessions `goaway`
//! naming B itself: the clients resume (rejoin, resend by `cid` or origin-id), and find the
//! rooms local after a takeover, or forwarded again once the link is back.

use crate::ids::{NodeId, RoomAddr, SessionId};
use crate::event::{Delivery, Occupant, Protocol, RoomAnswer, RoomEvent};
use crate::gateway::{Failure, Gateway, Outcome, Reply, RoomOp};
use crate::ha::link::{Inbound, Link, PeerCommand};
use crate::ha::recovery::{Recovery, StateWatch};
use crate::protocol::ErrorCode;
use crate::session::{Queued, Session, Wire};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How long a request for a room of a peer that looks down (or whose `rooms` service is down)
/// waits for the takeover: more than the default lease TTL plus critical-service delay.
const TAKEOVER_WAIT: Duration = Duration::from_secs(12);

/// How long a forwarded operation waits for the host's reply before it fails `unavailable`.
/// Long enough for a room's activation from the store and a commit under load.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a session sends the node that hosts its rooms.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
enum Up {
    /// Serve this operation; reply with the same `id`.
    Request { id: u64, op: RoomOp },
}

/// What the host sends a session about its rooms.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
enum Down {
    /// The outcome of request `id`.
    Reply { id: u64, result: Outcome<Reply> },
    /// A room event for everyone in the room.
    Event { event: RoomEvent },
    /// A room's answer to one of the session's requests, or its word about itself.
    Answer { answer: RoomAnswer },
    /// The host stops serving the session: go elsewhere (`to`, a client URL), and why.
    Goaway { reason: String, to: Option<String> },
}

/// A forwarded operation waiting for its reply: the session that sent it, and where to put it.
struct Waiting {
    session: SessionId,
    reply: oneshot::Sender<Outcome<Reply>>,
}

/// This node's sessions' side of forwarding: the operations it sends the peer and the
/// sessions using rooms there. It is the gateway's [`crate::gateway::Remote`]; what the peer
/// sends back arrives through [`PeerSide`].
pub struct Forwarder {
    peer: NodeId,
    link: Link,
    /// Whether and when this node takes the peer's rooms over.
    watch: StateWatch,
    /// This node's sessions using rooms on the peer: session id → those rooms.
    forwarding: Mutex<HashMap<SessionId, HashSet<RoomAddr>>>,
    /// Forwarded operations waiting for their reply, by request id.
    waiting: Mutex<HashMap<u64, Waiting>>,
    next_request: AtomicU64,
}

impl Forwarder {
    pub fn new(peer: NodeId, link: Link, watch: StateWatch) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            peer,
            link,
            watch,
            forwarding: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
        })
    }

    /// May a room hosted by `host` be forwarded now (the host is the peer, reachable, and
    /// serving rooms)?
    fn can_forward_now(&self, host: &NodeId) -> bool {
        let p = self.link.peer();
        *host == self.peer && p.reachable && p.hosting
    }

    /// Forget every forwarding and fail the operations waiting for the peer; returns the
    /// sessions that used rooms on the peer (they are to be sent `goaway`).
    fn cut_off(&self) -> Vec<SessionId> {
        // Dropping the reply senders fails the waiting operations with `unavailable`.
        self.waiting.lock().expect("waiting lock").clear();
        self.forwarding.lock().expect("forwarding lock").drain().map(|(id, _)| id).collect()
    }
}

/// Send `down` to the peer's session `session`.
fn send_down(link: &Link, session: SessionId, down: &Down) {
    match serde_json::to_string(down) {
        Ok(msg) => link.to_session(session, msg),
        Err(e) => tracing::error!(error = %e, "a message for the peer's session does not serialize"),
    }
}

impl crate::gateway::Remote for Forwarder {
    fn can_forward(&self, host: &NodeId) -> bool {
        self.can_forward_now(host)
    }

    /// `host` is the peer and cannot serve (its link is down, or it does not host rooms now):
    /// wait until this node has taken over. True if a takeover happened meanwhile.
    fn await_takeover<'a>(&'a self, host: &'a NodeId) -> futures_util::future::BoxFuture<'a, bool> {
        Box::pin(async move {
            if *host != self.peer || self.can_forward_now(host) {
                return false;
            }
            self.watch.await_takeover(TAKEOVER_WAIT).await
        })
    }

    /// Does `session` use `room` on the peer?
    fn is_forwarded(&self, session: SessionId, room: &RoomAddr) -> bool {
        self.forwarding.lock().expect("forwarding lock").get(&session).is_some_and(|rooms| rooms.contains(room))
    }

    /// Serve `op` of `session` on the peer and wait for the reply.
    fn request<'a>(&'a self, session: &'a Arc<Session>, op: RoomOp) -> futures_util::future::BoxFuture<'a, Outcome<Reply>> {
        Box::pin(async move {
            let gone = || Failure::new(ErrorCode::Unavailable, "the node serving this room went away; retry");
            let id = self.next_request.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.waiting.lock().expect("waiting lock").insert(id, Waiting { session: session.id, reply: tx });
            self.forwarding.lock().expect("forwarding lock").entry(session.id).or_default().insert(op.room().clone());
            session.mark_uses_peer();
            metrics::counter!("stoa_forwarded_requests_total").increment(1);
            let msg = serde_json::to_string(&Up::Request { id, op }).map_err(|e| {
                tracing::error!(error = %e, "a room operation does not serialize");
                Failure::new(ErrorCode::Internal, "internal error")
            })?;
            self.link.to_host(session.id, &session.user, msg);
            match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(gone()),
                Err(_) => {
                    self.waiting.lock().expect("waiting lock").remove(&id);
                    Err(Failure::new(ErrorCode::Unavailable, "the node serving this room did not answer in time; retry"))
                }
            }
        })
    }

    /// A session of this node ended: the peer may drop its stand-in.
    fn session_closed(&self, session: SessionId) {
        let had = self.forwarding.lock().expect("forwarding lock").remove(&session).is_some();
        self.waiting.lock().expect("waiting lock").retain(|_, w| w.session != session);
        if had {
            self.link.session_gone(session);
        }
    }
}

/// The wire of a stand-in: what rooms tell it goes to the peer's session over the link.
struct LinkWire {
    link: Link,
    /// The session's id on the peer.
    session: SessionId,
}

impl Wire for LinkWire {
    fn deliver(&self, delivery: &Arc<Delivery>) -> Queued {
        // Serialized once per event, however many of the peer's sessions are in the room.
        let msg: Arc<str> = delivery.encoded(Protocol::Link, |event| {
            serde_json::to_string(&Down::Event { event: event.clone() }).unwrap_or_default().into()
        });
        self.link.to_session(self.session, msg.to_string());
        Queued::Yes
    }

    fn answer(&self, answer: RoomAnswer) -> Queued {
        send_down(&self.link, self.session, &Down::Answer { answer });
        Queued::Yes
    }

    fn goaway(&self, reason: &str, to: Option<&str>) -> Queued {
        send_down(&self.link, self.session, &Down::Goaway { reason: reason.to_owned(), to: to.map(str::to_owned) });
        Queued::Yes
    }
}

/// What the peer sends this node, served: operations of the peer's sessions on rooms hosted
/// here (each session gets a stand-in), replies and events for this node's own sessions, and
/// the peer's admin requests. The link's [`Inbound`]; made after the gateway and the recovery
/// manager, which it hands things to.
pub struct PeerSide {
    me: Weak<PeerSide>,
    forwarder: Arc<Forwarder>,
    gateway: Arc<Gateway>,
    recovery: Recovery,
    /// This node's client URL, named in `goaway` when forwarded rooms are cut off.
    my_url: String,
    /// The peer's sessions this node serves rooms for: peer session id → its stand-in's queue.
    hosted: Mutex<HashMap<SessionId, mpsc::UnboundedSender<(u64, RoomOp)>>>,
}

impl PeerSide {
    /// After each takeover by this node, forwarding is reset: the rooms are local now.
    pub fn new(forwarder: Arc<Forwarder>, gateway: Arc<Gateway>, recovery: Recovery, my_url: String) -> Arc<PeerSide> {
        let mut takeovers = forwarder.watch.takeovers();
        let side = Arc::new_cyclic(|me| PeerSide { me: me.clone(), forwarder, gateway, recovery, my_url, hosted: Mutex::new(HashMap::new()) });
        let me = Arc::downgrade(&side);
        tokio::spawn(async move {
            while takeovers.changed().await.is_ok() {
                match me.upgrade() {
                    Some(side) => side.reset("this node took over the rooms you used through its peer; resume"),
                    None => return,
                }
            }
        });
        side
    }

    /// Drop the peer's stand-ins here, fail the operations waiting for the peer, and send this
    /// node's sessions that use rooms on the peer `goaway` naming this node, so they resume
    /// cleanly.
    fn reset(&self, reason: &str) {
        self.hosted.lock().expect("hosted lock").clear();
        let sessions = self.forwarder.cut_off();
        if !sessions.is_empty() {
            tracing::info!(sessions = sessions.len(), "forwarding reset: sessions with rooms on the peer resume here");
            self.gateway.goaway_sessions(&sessions, reason, Some(self.my_url.clone()));
        }
    }

    /// Start serving the peer's session `session` of `user`: a stand-in session whose wire is
    /// the link, serving the operations it is sent one at a time and replying over the link.
    fn open_stand_in(&self, session: SessionId, user: String, link: Link) -> mpsc::UnboundedSender<(u64, RoomOp)> {
        let (ops_tx, mut ops) = mpsc::unbounded_channel::<(u64, RoomOp)>();
        let kill = CancellationToken::new();
        let wire = Box::new(LinkWire { link: link.clone(), session });
        let stand_in = self.gateway.open_session(user, None, None, wire, kill.clone());
        let gateway = self.gateway.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    op = ops.recv() => match op {
                        Some((id, op)) => {
                            let result = gateway.serve(&stand_in, op).await;
                            send_down(&link, session, &Down::Reply { id, result });
                        }
                        None => break,
                    },
                    _ = kill.cancelled() => {
                        // Ended here (an administrator's kick, a shutdown): the session must
                        // not think it is still in its rooms.
                        if stand_in.killed_for() != Some(crate::session::KillReason::Moved) {
                            let reason = "the node serving your rooms ended your session there; resume";
                            send_down(&link, session, &Down::Goaway { reason: reason.to_owned(), to: None });
                        }
                        break;
                    }
                }
            }
            gateway.close_session(&stand_in);
            if let Some(me) = me.upgrade() {
                let mut hosted = me.hosted.lock().expect("hosted lock");
                if hosted.get(&session).is_some_and(|tx| tx.is_closed()) {
                    hosted.remove(&session);
                }
            }
        });
        ops_tx
    }

    /// Hand `msg` from the peer's session to its stand-in (opened on first use).
    fn serve_peer_session(&self, session: SessionId, user: String, msg: &str) {
        let Up::Request { id, op } = match serde_json::from_str::<Up>(msg) {
            Ok(up) => up,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable request from the peer's session");
                return;
            }
        };
        let mut hosted = self.hosted.lock().expect("hosted lock");
        let tx = match hosted.get(&session) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let tx = self.open_stand_in(session, user, self.forwarder.link.clone());
                hosted.insert(session, tx.clone());
                tx
            }
        };
        let _ = tx.send((id, op));
    }

    /// Hand `msg` from the peer (about the rooms it hosts) to this node's session.
    fn to_own_session(&self, session: SessionId, msg: &str) {
        let down = match serde_json::from_str::<Down>(msg) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable message from the peer for a session");
                return;
            }
        };
        if let Down::Reply { id, result } = down {
            if let Some(w) = self.forwarder.waiting.lock().expect("waiting lock").remove(&id) {
                let _ = w.reply.send(result);
            }
            return;
        }
        let Some(s) = self.gateway.session(session) else {
            // The session is gone here: the peer may drop its stand-in.
            self.forwarder.link.session_gone(session);
            return;
        };
        match down {
            Down::Event { event } => s.deliver(&Delivery::new(event)),
            Down::Answer { answer } => s.answer(answer),
            Down::Goaway { reason, to } => {
                self.forwarder.forwarding.lock().expect("forwarding lock").remove(&session);
                self.gateway.goaway_sessions(&[session], &reason, Some(to.unwrap_or_else(|| self.my_url.clone())));
            }
            Down::Reply { .. } => unreachable!("handled above"),
        }
    }
}

impl Inbound for PeerSide {
    fn command(&self, id: u64, command: PeerCommand) {
        self.recovery.from_peer(id, command);
    }

    fn to_host(&self, session: SessionId, user: String, msg: String) {
        self.serve_peer_session(session, user, &msg);
    }

    fn session_gone(&self, session: SessionId) {
        // Dropping the sender ends the stand-in (it leaves its rooms).
        self.hosted.lock().expect("hosted lock").remove(&session);
    }

    fn to_session(&self, session: SessionId, msg: String) {
        self.to_own_session(session, &msg);
    }

    fn peer_lost(&self) {
        self.reset("the node serving some of your rooms went away; resume");
    }
}
