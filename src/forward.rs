//! Forwarding room operations to the node that hosts the room, over the node link: the peer
//! of a pair, or any node of another group of the cluster (docs/clusters.md).
//!
//! A client on node B, whatever protocol it speaks, may join, read and post in a room hosted by
//! another node A. B's gateway finds A one of two ways: a room of B's own group is tried
//! locally first, and the registry answers that A (B's peer) hosts it; a room of another
//! group's service is located by the heartbeats of that group's nodes (each says which services
//! it serves now). The gateway passes the operation, typed (a [`RoomOp`]), to A through this
//! module (`Remote::request`). A serves it with [`Gateway::serve`] for a *stand-in* session:
//! an ordinary [`Session`] of the same user (the link is authenticated, and B did the login)
//! whose wire is the link. What the room tells the stand-in (answers such as `joined` and
//! acks, room events, `goaway`) travels back typed (`Down`) and reaches the client's own
//! session on B, whose front end encodes it as if the room were local. The operation's outcome
//! comes back as a `Down::Reply`, except a post's: like a local post it is answered by the
//! room (its ack, or an error answer), so it crosses the link once each way and the client's
//! connection does not wait for A. Later operations of that session on that room go straight
//! to A.
//!
//! So the room's actor, its order, its fencing and its acks are A's, unchanged; B adds one hop,
//! and neither the room nor any front end knows. A stand-in serves its session's operations one
//! at a time, in the order B sent them, as a connection does. When a link drops (A died, or
//! the network broke), A drops B's stand-ins (the rooms see their occupants leave), B fails
//! the operations still waiting for A with `unavailable` and sends its sessions that used
//! rooms on A `goaway` naming B itself: the clients resume (rejoin, resend by `cid` or
//! origin-id), and find the rooms local after a takeover by B, forwarded to A's peer after a
//! takeover there, or forwarded again once the link is back.

use crate::ids::{NodeId, RoomAddr, SessionId};
use crate::event::{Delivery, Occupant, Protocol, RoomAnswer, RoomEvent};
use crate::gateway::{Failure, Gateway, JoinRequest, Outcome, Remote, Reply, RoomOp};
use crate::ha::link::{Inbound, Link, PeerCommand};
use crate::ha::recovery::{Recovery, StateWatch};
use crate::protocol::{ErrorCode, RequestId};
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
    /// Serve this operation; reply with the same `id`. A `quiet` one (a post) gets no reply
    /// when it succeeds: the room's ack answers it; a failure comes back as the room's error
    /// answer to it. (A node that does not know `quiet` replies anyway; the reply is dropped.)
    Request {
        id: u64,
        op: RoomOp,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
}

/// What the host sends a session about its rooms.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// A forwarded operation waiting for its reply: the session that sent it, the node it went to,
/// and where to put the reply.
struct Waiting {
    session: SessionId,
    node: NodeId,
    reply: oneshot::Sender<Outcome<Reply>>,
}

/// A room a session of this node uses on another node.
struct Used {
    /// The node serving it; none while the session follows the room to its new host.
    node: Option<NodeId>,
    /// The session follows the room to a new host: its requests wait until that is done.
    following: bool,
    /// The join that entered it, to enter it again where it moves (rooms of other groups).
    join: Option<JoinRequest>,
    /// The last message seq the session was given from it.
    last_seq: u64,
    /// Posts sent and not yet acknowledged (or refused) by the room, oldest first: sent again
    /// with the same cid where the room moves (stored once: the cid is the dedupe key).
    unacked: Vec<RoomOp>,
    /// Posts the session sent while the room was being followed: sent after the join (and the
    /// unacknowledged ones), in order; its connection goes on meanwhile.
    held: Vec<RoomOp>,
}

impl Used {
    fn at(node: NodeId) -> Used {
        Used { node: Some(node), following: false, join: None, last_seq: 0, unacked: Vec::new(), held: Vec::new() }
    }
}

/// The request id of a post.
fn post_re(op: &RoomOp) -> Option<&RequestId> {
    match op {
        RoomOp::Send { re, .. } => Some(re),
        _ => None,
    }
}

/// A room of another group a session follows to its new host: joined again there with `since`
/// its last seq, and its unacknowledged posts sent again, without the client seeing it.
struct Follow {
    session: SessionId,
    room: RoomAddr,
    join: JoinRequest,
}

/// This node's sessions' side of forwarding: the operations it sends other nodes and the
/// sessions using rooms there. It is the gateway's [`crate::gateway::Remote`]; what the other
/// nodes send back arrives through [`LinkSide`].
pub struct Forwarder {
    link: Link,
    /// Whether and when this node takes its peer's rooms over.
    watch: StateWatch,
    /// This node's sessions using rooms on other nodes: session id → room → how.
    forwarding: Mutex<HashMap<SessionId, HashMap<RoomAddr, Used>>>,
    /// Forwarded operations waiting for their reply, by request id.
    waiting: Mutex<HashMap<u64, Waiting>>,
    next_request: AtomicU64,
}

impl Forwarder {
    pub fn new(link: Link, watch: StateWatch) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            link,
            watch,
            forwarding: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
        })
    }

    /// Whether `session` is following `room` to a new host: the `joined` of its join there is
    /// not the client's (it is still in the room), only its replay is.
    fn is_following(&self, session: SessionId, room: &RoomAddr) -> bool {
        self.forwarding.lock().expect("forwarding lock").get(&session).and_then(|rooms| rooms.get(room)).is_some_and(|used| used.following)
    }

    /// `sessions` were given message `seq` of `room`.
    fn seen(&self, sessions: &[SessionId], room: &RoomAddr, seq: u64) {
        let mut forwarding = self.forwarding.lock().expect("forwarding lock");
        for session in sessions {
            if let Some(used) = forwarding.get_mut(session).and_then(|rooms| rooms.get_mut(room)) {
                used.last_seq = used.last_seq.max(seq);
            }
        }
    }

    /// The room answered the session's post `re` (an ack or a refusal): nothing to send again.
    fn answered(&self, session: SessionId, room: &RoomAddr, re: &RequestId) {
        if let Some(used) = self.forwarding.lock().expect("forwarding lock").get_mut(&session).and_then(|rooms| rooms.get_mut(room)) {
            used.unacked.retain(|op| post_re(op) != Some(re));
        }
    }

    /// The posts to send to the room's new host (after the join), with that host: first the
    /// ones never acknowledged (`first`), then the held ones. When none is left the room is
    /// settled, in the same step (so a post is either held and sent here, or goes its usual
    /// way), and the session's requests for it go on.
    fn to_send(&self, session: SessionId, room: &RoomAddr, first: bool) -> (Option<NodeId>, Vec<RoomOp>) {
        let mut forwarding = self.forwarding.lock().expect("forwarding lock");
        let Some(used) = forwarding.get_mut(&session).and_then(|rooms| rooms.get_mut(room)) else { return (None, Vec::new()) };
        let mut posts = if first { std::mem::take(&mut used.unacked) } else { Vec::new() };
        posts.append(&mut used.held);
        if posts.is_empty() {
            used.following = false;
        }
        (used.node.clone(), posts)
    }

    /// The session's `room` is between hosts again (an attempt to follow it failed): its
    /// requests wait.
    fn moving(&self, session: SessionId, room: &RoomAddr) {
        if let Some(used) = self.forwarding.lock().expect("forwarding lock").get_mut(&session).and_then(|rooms| rooms.get_mut(room)) {
            used.node = None;
        }
    }

    /// The session's rooms on node `node` that it can follow to a new host (it joined them);
    /// each is marked as moving (its requests wait) and returned with the join to send there.
    fn to_follow(&self, session: SessionId, node: &NodeId) -> Vec<Follow> {
        let mut forwarding = self.forwarding.lock().expect("forwarding lock");
        let Some(rooms) = forwarding.get_mut(&session) else { return Vec::new() };
        let mut follow = Vec::new();
        rooms.retain(|room, used| {
            if used.node.as_ref() != Some(node) {
                return true;
            }
            match &used.join {
                Some(join) => {
                    used.node = None;
                    used.following = true;
                    let join = JoinRequest { since: Some(used.last_seq), ..join.clone() };
                    follow.push(Follow { session, room: room.clone(), join });
                    true
                }
                None => false,
            }
        });
        follow
    }

    /// Node `node` went away: fail the operations waiting for it, and sort out the sessions
    /// that used rooms there. Rooms of the peer are this node's to take over: those sessions
    /// are returned to be sent `goaway` (they resume here). Rooms of another group move to
    /// that group's other node: the joined ones are returned to be followed there.
    fn cut_off(&self, node: &NodeId) -> (Vec<SessionId>, Vec<Follow>) {
        // Dropping the reply senders fails the waiting operations with `unavailable`.
        self.waiting.lock().expect("waiting lock").retain(|_, w| w.node != *node);
        let sessions: Vec<SessionId> = {
            let forwarding = self.forwarding.lock().expect("forwarding lock");
            forwarding.iter().filter(|(_, rooms)| rooms.values().any(|u| u.node.as_ref() == Some(node))).map(|(s, _)| *s).collect()
        };
        if self.link.peer_id() == Some(node) {
            let mut forwarding = self.forwarding.lock().expect("forwarding lock");
            for s in &sessions {
                if let Some(rooms) = forwarding.get_mut(s) {
                    rooms.retain(|_, u| u.node.as_ref() != Some(node));
                }
            }
            return (sessions, Vec::new());
        }
        (Vec::new(), sessions.into_iter().flat_map(|s| self.to_follow(s, node)).collect())
    }

    /// `session` uses `room` on `node` from now on; `also` updates the rest of its record.
    fn use_at(&self, session: SessionId, room: &RoomAddr, node: &NodeId, also: impl FnOnce(&mut Used)) {
        let mut forwarding = self.forwarding.lock().expect("forwarding lock");
        let used = forwarding.entry(session).or_default().entry(room.clone()).or_insert_with(|| Used::at(node.clone()));
        used.node = Some(node.clone());
        also(used);
    }

    /// Send post `op` of `session` to node `node`, without waiting: like a local post, it is
    /// answered by the room (its ack after commit, or an error answer), which saves a reply
    /// over the link per post and lets the connection go on. Kept as unacknowledged first, so
    /// that if the link drops from here on, the post is sent again where the room goes (or
    /// the client resends it by `cid` as it resumes); if the link is down already, it fails.
    fn post(&self, session: &Arc<Session>, node: &NodeId, op: RoomOp) -> Outcome<Reply> {
        let (room, re) = (op.room().clone(), post_re(&op).cloned().expect("a post"));
        self.use_at(session.id, &room, node, |used| {
            if !used.unacked.iter().any(|op| post_re(op) == Some(&re)) {
                used.unacked.push(op.clone());
            }
        });
        if !self.link.is_up(node) {
            self.answered(session.id, &room, &re);
            return Err(Failure::new(ErrorCode::Unavailable, "the node serving this room went away; retry"));
        }
        session.mark_uses_other_nodes();
        metrics::counter!("stoa_forwarded_requests_total").increment(1);
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let msg = serde_json::to_string(&Up::Request { id, op, quiet: true }).map_err(|e| {
            tracing::error!(error = %e, "a room operation does not serialize");
            Failure::new(ErrorCode::Internal, "internal error")
        })?;
        self.link.to_host(node, session.id, &session.user, msg);
        Ok(Reply::Done)
    }

    /// May a room hosted by `host` be forwarded there now (another node, reachable, serving
    /// rooms)?
    fn can_forward_now(&self, host: &NodeId) -> bool {
        self.link.is_serving(host)
    }
}

/// Send `down` to node `node`'s session `session`.
fn send_down(link: &Link, node: &NodeId, session: SessionId, down: &Down) {
    match serde_json::to_string(down) {
        Ok(msg) => link.to_session(node, session, msg.into()),
        Err(e) => tracing::error!(error = %e, "a message for another node's session does not serialize"),
    }
}

/// How often a request for a room whose group no node serves now looks again (heartbeats name
/// the new host).
const LOCATE_POLL: Duration = Duration::from_millis(50);

impl crate::gateway::Remote for Forwarder {
    fn can_forward(&self, host: &NodeId) -> bool {
        self.can_forward_now(host)
    }

    /// `host` is the peer and cannot serve (its link is down, or it does not host rooms now):
    /// wait until this node has taken over. True if a takeover happened meanwhile.
    fn await_takeover<'a>(&'a self, host: &'a NodeId) -> futures_util::future::BoxFuture<'a, bool> {
        Box::pin(async move {
            if self.link.peer_id() != Some(host) || self.can_forward_now(host) {
                return false;
            }
            self.watch.await_takeover(TAKEOVER_WAIT).await
        })
    }

    fn taking_over(&self) -> bool {
        self.watch.state() == crate::ha::state::NodeState::TakingOver
    }

    /// Hold `op` if it is a post for a room `session` is following to a new host: it goes
    /// there after the join, in order, and the session's connection goes on meanwhile (its
    /// other rooms do not wait). True if held.
    fn hold_post(&self, session: SessionId, op: &RoomOp) -> bool {
        if post_re(op).is_none() {
            return false;
        }
        let mut forwarding = self.forwarding.lock().expect("forwarding lock");
        match forwarding.get_mut(&session).and_then(|rooms| rooms.get_mut(op.room())) {
            Some(used) if used.following => {
                used.held.push(op.clone());
                true
            }
            _ => false,
        }
    }

    /// The node serving `room` for `session`; while the session follows the room to a new
    /// host, wait (bounded) until it is there, so its requests reach the room after the join.
    fn forwarded_to<'a>(&'a self, session: SessionId, room: &'a RoomAddr) -> futures_util::future::BoxFuture<'a, Option<NodeId>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT + REPLY_TIMEOUT;
            loop {
                let node = match self.forwarding.lock().expect("forwarding lock").get(&session).and_then(|rooms| rooms.get(room)) {
                    None => return None,
                    Some(used) => used.node.clone().filter(|_| !used.following),
                };
                if node.is_some() || tokio::time::Instant::now() >= deadline {
                    return node;
                }
                tokio::time::sleep(LOCATE_POLL).await;
            }
        })
    }

    /// The node of another group that serves the rooms of `service` now, as its heartbeats say;
    /// while none does (its host died and the takeover is under way, or a partition), wait for
    /// one up to the takeover bound: woken by the heartbeat that names one (after a takeover,
    /// every session following a room of that group waits here at once).
    fn locate<'a>(&'a self, service: &'a str) -> futures_util::future::BoxFuture<'a, Option<NodeId>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
            let mut changes = self.link.host_changes();
            loop {
                if let Some(node) = self.link.host_of(service) {
                    return Some(node);
                }
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return None;
                }
                // The poll only bounds a wake-up lost to a lagging view.
                let _ = tokio::time::timeout_at(deadline.min(now + LOCATE_POLL * 10), changes.changed()).await;
            }
        })
    }

    /// Serve `op` of `session` on node `node` and wait for the reply; a post is only sent (see
    /// [`Forwarder::post`]).
    fn request<'a>(&'a self, session: &'a Arc<Session>, node: &'a NodeId, op: RoomOp) -> futures_util::future::BoxFuture<'a, Outcome<Reply>> {
        Box::pin(async move {
            if post_re(&op).is_some() {
                return self.post(session, node, op);
            }
            let gone = || Failure::new(ErrorCode::Unavailable, "the node serving this room went away; retry");
            let id = self.next_request.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.waiting.lock().expect("waiting lock").insert(id, Waiting { session: session.id, node: node.clone(), reply: tx });
            // The link went down before this was registered, so its cut-off missed it: a frame
            // queued now would be dropped, and this would wait out its whole timeout.
            if !self.link.is_up(node) {
                self.waiting.lock().expect("waiting lock").remove(&id);
                return Err(gone());
            }
            let room = op.room().clone();
            let (join, leave) = match &op {
                RoomOp::Join(join) => (Some(join.clone()), false),
                RoomOp::Leave { .. } => (None, true),
                _ => (None, false),
            };
            self.use_at(session.id, &room, node, |_| {});
            session.mark_uses_other_nodes();
            metrics::counter!("stoa_forwarded_requests_total").increment(1);
            let msg = serde_json::to_string(&Up::Request { id, op, quiet: false }).map_err(|e| {
                tracing::error!(error = %e, "a room operation does not serialize");
                Failure::new(ErrorCode::Internal, "internal error")
            })?;
            self.link.to_host(node, session.id, &session.user, msg);
            let result = match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(gone()),
                Err(_) => {
                    self.waiting.lock().expect("waiting lock").remove(&id);
                    Err(Failure::new(ErrorCode::Unavailable, "the node serving this room did not answer in time; retry"))
                }
            };
            // What the room needs to be followed elsewhere: the join that entered it.
            if result.is_ok() && (join.is_some() || leave) {
                let mut forwarding = self.forwarding.lock().expect("forwarding lock");
                if let Some(rooms) = forwarding.get_mut(&session.id) {
                    match join {
                        Some(join) => {
                            if let Some(used) = rooms.get_mut(&room) {
                                used.join = Some(join);
                            }
                        }
                        None => {
                            rooms.remove(&room);
                        }
                    }
                }
            }
            result
        })
    }

    /// A session of this node ended: the nodes that served it rooms may drop its stand-ins.
    fn session_closed(&self, session: SessionId) {
        let rooms = self.forwarding.lock().expect("forwarding lock").remove(&session);
        self.waiting.lock().expect("waiting lock").retain(|_, w| w.session != session);
        let nodes: HashSet<NodeId> = rooms.into_iter().flat_map(|r| r.into_values()).filter_map(|u| u.node).collect();
        for node in nodes {
            self.link.session_gone(&node, session);
        }
    }
}

/// The wire of a stand-in: what rooms tell it goes to its session on node `node` over the link.
struct LinkWire {
    link: Link,
    node: NodeId,
    /// The session's id on that node.
    session: SessionId,
}

impl Wire for LinkWire {
    fn deliver(&self, delivery: &Arc<Delivery>) -> Queued {
        // Serialized once per event, however many other nodes' sessions are in the room.
        let msg: Arc<str> = delivery.encoded(Protocol::Link, |event| {
            serde_json::to_string(&Down::Event { event: event.clone() }).unwrap_or_default().into()
        });
        self.link.to_session(&self.node, self.session, msg);
        Queued::Yes
    }

    fn answer(&self, answer: RoomAnswer) -> Queued {
        send_down(&self.link, &self.node, self.session, &Down::Answer { answer });
        Queued::Yes
    }

    fn goaway(&self, reason: &str, to: Option<&str>) -> Queued {
        send_down(&self.link, &self.node, self.session, &Down::Goaway { reason: reason.to_owned(), to: to.map(str::to_owned) });
        Queued::Yes
    }
}

/// Another node's session, as this node serves rooms for it.
type RemoteSession = (NodeId, SessionId);

/// What the other nodes send this node, served: operations of their sessions on rooms hosted
/// here (each session gets a stand-in), replies and events for this node's own sessions, and
/// admin requests. The link's [`Inbound`]; made after the gateway and the recovery manager,
/// which it hands things to.
pub struct LinkSide {
    me: Weak<LinkSide>,
    forwarder: Arc<Forwarder>,
    gateway: Arc<Gateway>,
    /// This node's recovery manager (none for a node without a peer).
    recovery: Option<Recovery>,
    /// This node's client URL, named in `goaway` when forwarded rooms are cut off.
    my_url: String,
    /// Other nodes' sessions this node serves rooms for → each one's stand-in's queue.
    hosted: Mutex<HashMap<RemoteSession, mpsc::UnboundedSender<StandInOp>>>,
}

/// An operation for a stand-in to serve: request `id` of its session (see [`Up::Request`]).
struct StandInOp {
    id: u64,
    op: RoomOp,
    quiet: bool,
}

impl LinkSide {
    /// After each takeover by this node, forwarding to the peer is reset: its rooms are local now.
    pub fn new(forwarder: Arc<Forwarder>, gateway: Arc<Gateway>, recovery: Option<Recovery>, my_url: String) -> Arc<LinkSide> {
        let mut takeovers = forwarder.watch.takeovers();
        let peer = forwarder.link.peer_id().cloned();
        let side = Arc::new_cyclic(|me| LinkSide { me: me.clone(), forwarder, gateway, recovery, my_url, hosted: Mutex::new(HashMap::new()) });
        let me = Arc::downgrade(&side);
        if let Some(peer) = peer {
            tokio::spawn(async move {
                while takeovers.changed().await.is_ok() {
                    match me.upgrade() {
                        Some(side) => side.reset(&peer, "this node took over the rooms you used through its peer; resume"),
                        None => return,
                    }
                }
            });
        }
        side
    }

    /// Drop node `node`'s stand-ins here, fail the operations waiting for it, and send this
    /// node's sessions that use rooms on it `goaway` naming this node, so they resume cleanly.
    fn reset(&self, node: &NodeId, reason: &str) {
        self.hosted.lock().expect("hosted lock").retain(|(n, _), _| n != node);
        let (sessions, follow) = self.forwarder.cut_off(node);
        if !sessions.is_empty() {
            tracing::info!(node = %node, sessions = sessions.len(), "forwarding reset: sessions with rooms on that node resume here");
            self.gateway.goaway_sessions(&sessions, reason, Some(self.my_url.clone()));
        }
        if !follow.is_empty() {
            tracing::info!(node = %node, rooms = follow.len(), "rooms of another group lost their host: following them to the new one");
            self.follow(follow, reason);
        }
    }

    /// Join each room again where its group serves it now (after a takeover there), with
    /// `since` the last seq its session was given: the session stays in the room and gets what
    /// it missed, in order, and its requests for the room wait for this. A room that cannot be
    /// followed (its group stays down past the takeover bound, or the join is refused) ends
    /// the session with `goaway`, so its client resumes by itself and is told why.
    fn follow(&self, rooms: Vec<Follow>, reason: &str) {
        for Follow { session, room, join } in rooms {
            let Some(s) = self.gateway.session(session) else { continue };
            let (gateway, forwarder, my_url, reason) = (self.gateway.clone(), self.forwarder.clone(), self.my_url.clone(), reason.to_owned());
            tokio::spawn(async move {
                metrics::counter!("stoa_forwarded_rooms_followed_total").increment(1);
                // The room may be between the group's nodes for a moment (a fallback there
                // answers "moving back; retry"): try again until the takeover bound.
                let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
                let result = loop {
                    match gateway.follow(&s, join.clone()).await {
                        Err(f) if f.code == ErrorCode::Unavailable && tokio::time::Instant::now() < deadline => {
                            metrics::counter!("stoa_forwarded_follow_retries_total").increment(1);
                            forwarder.moving(session, &room);
                            tokio::time::sleep(LOCATE_POLL).await;
                        }
                        other => break other,
                    }
                };
                match result {
                    // In the room again: its unacknowledged posts go first, then the held ones,
                    // in their order; then the session's requests go on.
                    Ok(()) => {
                        let mut first = true;
                        while let (Some(node), posts) = forwarder.to_send(session, &room, std::mem::take(&mut first)) {
                            if posts.is_empty() {
                                break;
                            }
                            for post in posts {
                                let re = post_re(&post).cloned();
                                if let (Err(f), Some(re)) = (forwarder.request(&s, &node, post).await, re) {
                                    s.answer(RoomAnswer::Error { re: Some(re), room: room.clone(), code: f.code, message: f.message });
                                }
                            }
                        }
                    }
                    Err(failure) => {
                        tracing::info!(session = %session, room = %room, error = %failure.message, "could not follow a room to its new host; the session resumes");
                        if let Some(rooms) = forwarder.forwarding.lock().expect("forwarding lock").get_mut(&session) {
                            rooms.remove(&room);
                        }
                        gateway.goaway_sessions(&[session], &reason, Some(my_url));
                    }
                }
            });
        }
    }

    /// Start serving session `session` of `user` on node `node`: a stand-in session whose wire
    /// is the link, serving the operations it is sent one at a time and replying over the link.
    fn open_stand_in(&self, node: NodeId, session: SessionId, user: String) -> mpsc::UnboundedSender<StandInOp> {
        let (ops_tx, mut ops) = mpsc::unbounded_channel::<StandInOp>();
        let kill = CancellationToken::new();
        let link = self.forwarder.link.clone();
        let wire = Box::new(LinkWire { link: link.clone(), node: node.clone(), session });
        let stand_in = self.gateway.open_session(user, None, None, wire, kill.clone());
        let gateway = self.gateway.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    op = ops.recv() => match op {
                        Some(StandInOp { id, op, quiet }) => {
                            // A quiet post is answered by its room, or here if it fails first.
                            let quiet_post = post_re(&op).filter(|_| quiet).map(|re| (re.clone(), op.room().clone()));
                            let result = gateway.serve(&stand_in, op).await;
                            match (quiet_post, result) {
                                (Some(_), Ok(_)) => {}
                                (Some((re, room)), Err(f)) => {
                                    let answer = RoomAnswer::Error { re: Some(re), room, code: f.code, message: f.message };
                                    send_down(&link, &node, session, &Down::Answer { answer });
                                }
                                (None, result) => send_down(&link, &node, session, &Down::Reply { id, result }),
                            }
                        }
                        None => break,
                    },
                    _ = kill.cancelled() => {
                        // Ended here (an administrator's kick, a shutdown): the session must
                        // not think it is still in its rooms.
                        if stand_in.killed_for() != Some(crate::session::KillReason::Moved) {
                            let reason = "the node serving your rooms ended your session there; resume";
                            send_down(&link, &node, session, &Down::Goaway { reason: reason.to_owned(), to: None });
                        }
                        break;
                    }
                }
            }
            gateway.close_session(&stand_in);
            if let Some(me) = me.upgrade() {
                let mut hosted = me.hosted.lock().expect("hosted lock");
                let key = (node, session);
                if hosted.get(&key).is_some_and(|tx| tx.is_closed()) {
                    hosted.remove(&key);
                }
            }
        });
        ops_tx
    }

    /// Hand `msg` from node `node`'s session to its stand-in (opened on first use).
    fn serve_remote_session(&self, node: &NodeId, session: SessionId, user: String, msg: &str) {
        let Up::Request { id, op, quiet } = match serde_json::from_str::<Up>(msg) {
            Ok(up) => up,
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "unreadable request from another node's session");
                return;
            }
        };
        let mut hosted = self.hosted.lock().expect("hosted lock");
        let key = (node.clone(), session);
        let tx = match hosted.get(&key) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                // Another cluster's users are its own, not this cluster's users of the same name.
                let user = match self.forwarder.link.peering_of(node) {
                    Some(cluster) => format!("{user}@{cluster}"),
                    None => user,
                };
                let tx = self.open_stand_in(node.clone(), session, user);
                hosted.insert(key, tx.clone());
                tx
            }
        };
        let _ = tx.send(StandInOp { id, op, quiet });
    }

    /// Hand `msg` from node `node` (about the rooms it hosts) to these sessions of this node.
    fn to_own_sessions(&self, node: &NodeId, sessions: &[SessionId], msg: &str) {
        let down = match serde_json::from_str::<Down>(msg) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "unreadable message from another node for a session");
                return;
            }
        };
        match down {
            Down::Reply { id, result } => {
                if let Some(w) = self.forwarder.waiting.lock().expect("waiting lock").remove(&id) {
                    let _ = w.reply.send(result);
                }
            }
            // A room event for several sessions: one delivery, so each front end encodes it once.
            Down::Event { event } if !matches!(event, RoomEvent::Moved { .. }) => {
                let delivery = Delivery::new(event);
                if let RoomEvent::Message(m) = &delivery.event {
                    self.forwarder.seen(sessions, &m.room, m.seq);
                }
                for &session in sessions {
                    match self.gateway.session(session) {
                        Some(s) => s.deliver(&delivery),
                        None => self.forwarder.link.session_gone(node, session),
                    }
                }
            }
            down => {
                for &session in sessions {
                    self.to_own_session(node, session, down.clone());
                }
            }
        }
    }

    /// Hand `down` from node `node` (about the rooms it hosts) to this node's session.
    fn to_own_session(&self, node: &NodeId, session: SessionId, down: Down) {
        let Some(s) = self.gateway.session(session) else {
            // The session is gone here: that node may drop its stand-in.
            self.forwarder.link.session_gone(node, session);
            return;
        };
        match down {
            Down::Event { event: RoomEvent::Moved { room, .. } } if self.forwarder.link.peer_id() != Some(node) => {
                // A room of another group moved within its group: follow it there.
                let follow: Vec<Follow> = self.forwarder.to_follow(session, node).into_iter().filter(|f| f.room == room).collect();
                self.follow(follow, "the room moved and could not be followed; resume");
            }
            Down::Event { event } => {
                if let RoomEvent::Message(m) = &event {
                    self.forwarder.seen(&[session], &m.room, m.seq);
                }
                s.deliver(&Delivery::new(event))
            }
            Down::Answer { answer: RoomAnswer::Joined { room, replay, .. } } if self.forwarder.is_following(session, &room) => {
                // Followed to its new host: the client is still in the room; it gets what it missed.
                for d in &replay {
                    if let RoomEvent::Message(m) = &d.event {
                        self.forwarder.seen(&[session], &m.room, m.seq);
                    }
                    s.deliver(d);
                }
            }
            Down::Answer { answer } => {
                match &answer {
                    RoomAnswer::Joined { replay, .. } => {
                        for d in replay {
                            if let RoomEvent::Message(m) = &d.event {
                                self.forwarder.seen(&[session], &m.room, m.seq);
                            }
                        }
                    }
                    RoomAnswer::Ack { re, room, .. } | RoomAnswer::Error { re: Some(re), room, .. } => self.forwarder.answered(session, room, re),
                    _ => {}
                }
                s.answer(answer)
            }
            Down::Goaway { reason, .. } if self.forwarder.link.peer_id() != Some(node) => {
                // That node drops this session's stand-in (it fails over, or stops): let it go
                // now, and follow the session's rooms there to where their group serves them
                // next (a fresh stand-in if that is the same node).
                self.forwarder.link.session_gone(node, session);
                let follow = self.forwarder.to_follow(session, node);
                self.follow(follow, &reason);
            }
            Down::Goaway { reason, to } => {
                self.forwarder.forwarding.lock().expect("forwarding lock").remove(&session);
                self.gateway.goaway_sessions(&[session], &reason, Some(to.unwrap_or_else(|| self.my_url.clone())));
            }
            Down::Reply { .. } => unreachable!("handled by to_own_sessions"),
        }
    }
}

impl Inbound for LinkSide {
    fn command(&self, from: &NodeId, id: u64, command: PeerCommand) {
        match &self.recovery {
            Some(recovery) => recovery.from_node(from, id, command),
            None => {
                let me = &self.gateway.settings.node.id;
                let refusal = format!("node {me} has no redundancy peer: it neither fails over nor takes rooms over");
                self.forwarder.link.answer(from, id, &Err(refusal));
            }
        }
    }

    fn to_host(&self, from: &NodeId, session: SessionId, user: String, msg: &str) {
        self.serve_remote_session(from, session, user, msg);
    }

    fn session_gone(&self, from: &NodeId, session: SessionId) {
        // Dropping the sender ends the stand-in (it leaves its rooms).
        self.hosted.lock().expect("hosted lock").remove(&(from.clone(), session));
    }

    fn to_sessions(&self, from: &NodeId, sessions: &[SessionId], msg: &str) {
        self.to_own_sessions(from, sessions, msg);
    }

    fn node_lost(&self, node: &NodeId) {
        self.reset(node, "the node serving some of your rooms went away; resume");
    }
}
