//! Forwarding room operations between the two nodes of a pair, over the node link.
//!
//! A client on node B may join, read and post in a room hosted by its peer A. B's gateway tries
//! the room locally first; when the registry answers that A hosts it (and the link to A is up),
//! B passes the client's frame, as it came, to A ([`Forwarder::forward`]). A serves it on a
//! *virtual connection*: an ordinary [`Connection`] logged in as the same user (the link is
//! authenticated, and B did the login), whose outbound frames (answers, acks, messages,
//! presence, `moved`) travel back over the link and are pushed, as they are, into the client's
//! queue on B. Later frames of that session for that room go straight to A.
//!
//! So the room's actor, its order, its fencing and its acks are A's, unchanged; B adds one hop.
//! When the link drops (A died, or the network broke), A drops its virtual connections (the
//! rooms see their occupants leave) and B sends its forwarding sessions `goaway` naming B
//! itself: the clients resume (rejoin with `since`, resend by `cid`), and find the rooms local
//! after a takeover, or forwarded again once the link is back.

use crate::ha::link::{Inbound, Link, PeerCommand};
use crate::ha::recovery::Recovery;
use crate::protocol::RoomAddr;
use crate::gateway::Gateway;
use crate::v1::{Connection, Outbound};
use crate::session::Session;
use crate::store::NodeId;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a request for a room of a peer that looks down (or whose `rooms` service is down)
/// waits for the takeover: more than the default lease TTL plus critical-service delay.
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(12);

/// Both directions of forwarding for one node.
pub struct Forwarder {
    me: Weak<Forwarder>,
    gateway: Arc<Gateway>,
    peer: NodeId,
    /// This node's client URL, named in `goaway` when forwarded rooms are cut off.
    my_url: String,
    link: OnceLock<Link>,
    recovery: OnceLock<Recovery>,
    /// The peer's sessions this node serves rooms for: peer session id → its virtual connection.
    hosted: Mutex<HashMap<u64, mpsc::UnboundedSender<String>>>,
    /// This node's sessions using rooms on the peer: session id → those rooms.
    forwarding: Mutex<HashMap<u64, HashSet<RoomAddr>>>,
}

impl Forwarder {
    pub fn new(gateway: Arc<Gateway>, peer: NodeId, my_url: String) -> Arc<Forwarder> {
        Arc::new_cyclic(|me| Forwarder {
            me: me.clone(),
            gateway,
            peer,
            my_url,
            link: OnceLock::new(),
            recovery: OnceLock::new(),
            hosted: Mutex::new(HashMap::new()),
            forwarding: Mutex::new(HashMap::new()),
        })
    }

    /// Attach the link and the recovery manager (once, at start-up). After each takeover by
    /// this node, forwarding is reset: the rooms are local now.
    pub fn attach(&self, link: Link, recovery: Recovery) {
        let mut takeovers = recovery.takeovers();
        let _ = self.link.set(link);
        let _ = self.recovery.set(recovery);
        let me = self.me.clone();
        tokio::spawn(async move {
            while takeovers.changed().await.is_ok() {
                match me.upgrade() {
                    Some(f) => f.reset("this node took over the rooms you used through its peer; resume"),
                    None => return,
                }
            }
        });
    }

    /// May a room hosted by `host` be forwarded now (the host is the peer, reachable, and
    /// serving rooms)?
    fn can_forward_now(&self, host: &NodeId) -> bool {
        *host == self.peer && self.link.get().is_some_and(|l| {
            let p = l.peer();
            p.reachable && p.hosting
        })
    }

    /// Drop the peer's virtual connections here and send this node's sessions that use rooms
    /// on the peer `goaway` naming this node, so they resume cleanly.
    fn reset(&self, reason: &str) {
        self.hosted.lock().expect("hosted lock").clear();
        let sessions: Vec<u64> = self.forwarding.lock().expect("forwarding lock").drain().map(|(id, _)| id).collect();
        if !sessions.is_empty() {
            tracing::info!(sessions = sessions.len(), "forwarding reset: sessions with rooms on the peer resume here");
            self.gateway.goaway_sessions(&sessions, reason, Some(self.my_url.clone()));
        }
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
            let Some(recovery) = self.recovery.get() else { return false };
            recovery.await_takeover(TAKEOVER_WAIT).await
        })
    }

    /// Does `session` use `room` on the peer?
    fn is_forwarded(&self, session: u64, room: &RoomAddr) -> bool {
        self.forwarding.lock().expect("forwarding lock").get(&session).is_some_and(|rooms| rooms.contains(room))
    }

    /// Pass `frame` (a client frame about `room`) of `session` to the peer.
    fn forward(&self, session: &Session, room: &RoomAddr, frame: &str) {
        let Some(link) = self.link.get() else { return };
        self.forwarding.lock().expect("forwarding lock").entry(session.id).or_default().insert(room.clone());
        metrics::counter!("stoa_forwarded_frames_total").increment(1);
        link.forward_client(session.id, &session.user, frame);
    }

    /// A session of this node ended: the peer may drop its virtual connection.
    fn session_closed(&self, session: u64) {
        let had = self.forwarding.lock().expect("forwarding lock").remove(&session).is_some();
        if had && let Some(link) = self.link.get() {
            link.client_gone(session);
        }
    }
}

impl Forwarder {
    /// Start serving the peer's session `session` of `user`: a virtual connection fed from
    /// the link, answering over it.
    fn open_virtual(&self, session: u64, user: String) -> mpsc::UnboundedSender<String> {
        let (frames_tx, mut frames) = mpsc::unbounded_channel::<String>();
        let (out_tx, mut out) = mpsc::channel::<Outbound>(self.gateway.settings.limits.outbound_queue);
        let kill = CancellationToken::new();
        let mut conn = Connection::trusted(self.gateway.clone(), out_tx, kill.clone(), user);
        if let Some(link) = self.link.get().cloned() {
            tokio::spawn(async move {
                while let Some(o) = out.recv().await {
                    if let Outbound::Frame(f) = o {
                        link.to_client(session, f.to_string());
                    }
                }
            });
        }
        let me = self.me.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    frame = frames.recv() => match frame {
                        Some(text) => {
                            let _ = conn.handle_text(&text).await;
                        }
                        None => break,
                    },
                    _ = kill.cancelled() => break,
                }
            }
            conn.closed();
            if let Some(me) = me.upgrade() {
                me.hosted.lock().expect("hosted lock").remove(&session);
            }
        });
        frames_tx
    }
}

impl Inbound for Forwarder {
    fn command(&self, id: u64, command: PeerCommand) {
        if let Some(r) = self.recovery.get() {
            r.from_peer(id, command);
        }
    }

    fn client(&self, session: u64, user: String, frame: String) {
        let mut hosted = self.hosted.lock().expect("hosted lock");
        let tx = match hosted.get(&session) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let tx = self.open_virtual(session, user);
                hosted.insert(session, tx.clone());
                tx
            }
        };
        let _ = tx.send(frame);
    }

    fn client_gone(&self, session: u64) {
        // Dropping the sender ends the virtual connection (it leaves its rooms).
        self.hosted.lock().expect("hosted lock").remove(&session);
    }

    fn to_client(&self, session: u64, frame: String) {
        match self.gateway.session(session) {
            Some(s) => s.forwarded(frame),
            None => {
                if let Some(link) = self.link.get() {
                    link.client_gone(session);
                }
            }
        }
    }

    fn peer_lost(&self) {
        self.reset("the node serving some of your rooms went away; resume");
    }
}
