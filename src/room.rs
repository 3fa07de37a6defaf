//! The room actor: one per active room, on one of the node's arbiters.
//!
//! A room owns its ordering. Posts are queued in the actor and handed to the group committer
//! as appends (everything queued goes in the next one), at most two in flight, which the
//! committer commits strictly in order; the store assigns seqs from each append's expected
//! base and refuses a wrong base, so the room's seq stays contiguous. Only after the commit does the room
//! ack the senders and fan the messages out; a failed commit acks nobody and shows nothing.
//! The room emits typed events ([`crate::event`]) to its occupants through the [`Occupant`]
//! trait, in order; it knows no wire format. Its replay cache holds those events.
//!
//! This file holds the actor and what every part of it uses; the parts: `post` (the write
//! path, a post to its ack), `occupants` (joins, leaves, replay), `moderation` (what owners and
//! admins do), `stopping` (passivation, hand-off, fencing), `plugin` (the plugin hooks around
//! posts, joins and creation), `pipeline` (appends in flight, in order), `cids` (which
//! `(sender, cid)` pairs are pending or were committed lately: resends) and `state` (the pure
//! rules: permissions, nicks, configuration).

mod cids;
mod moderation;
mod occupants;
mod pipeline;
pub mod plugin;
mod post;
pub mod state;
mod stopping;

pub use moderation::{AdminView, Affiliate, Configure, Destroy, Kick, RoomAdminView, SetSubject};
pub use occupants::{CheckRead, Join, Leave};
pub use post::Post;
pub use stopping::{HandOff, PassivateIfIdle};

use crate::ids::{RoomAddr, SessionId};
use crate::committer::{CommitError, Committer};
use crate::event::{ChatMessage, Delivery, Occupant, RoomAnswer, RoomEvent};
use crate::protocol::{Affiliation, ErrorCode, RequestId, RoomConfig, RoomConfigPatch};
use crate::store::{AppendError, AppendRequest, Appended, Fence, NewMessage, RoomRow, Store, StoredMessage, now_ms};
use actix::prelude::*;
use state::{Denied, OccupantState, RoomState};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Why a room refused or failed a request. Mapped to protocol codes by [`RoomError::code`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum RoomError {
    /// The room does not exist.
    #[error("no such room")]
    NotFound,
    /// The caller lacks the right (membership, password, affiliation, occupancy).
    #[error("{0}")]
    Forbidden(String),
    /// The state does not allow it (nick taken, last owner).
    #[error("{0}")]
    Conflict(String),
    /// A count or size is over its limit (room full).
    #[error("{0}")]
    TooLarge(String),
    /// The request is malformed for this room.
    #[error("{0}")]
    BadRequest(String),
    /// The room cannot serve now (store down, room moved, commit failed); retry later.
    #[error("{0}")]
    Unavailable(String),
    /// This incarnation is stopping; the caller should resolve the room again (never sent to clients).
    #[error("room is passivating")]
    Passivating,
    /// Another node hosts the room (the router may forward to it over the node link).
    #[error("room is hosted by node {0}")]
    HostedBy(crate::ids::NodeId),
    /// Unexpected fault; details are logged, not sent.
    #[error("{0}")]
    Internal(String),
    /// A plugin refused the request (the reason is the plugin's).
    #[error("{0}")]
    Rejected(String),
}

impl RoomError {
    /// The protocol error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomError::NotFound => ErrorCode::NotFound,
            RoomError::Forbidden(_) => ErrorCode::Forbidden,
            RoomError::Conflict(_) => ErrorCode::Conflict,
            RoomError::TooLarge(_) => ErrorCode::TooLarge,
            RoomError::BadRequest(_) => ErrorCode::BadRequest,
            RoomError::Unavailable(_) | RoomError::Passivating | RoomError::HostedBy(_) => ErrorCode::Unavailable,
            RoomError::Internal(_) => ErrorCode::Internal,
            RoomError::Rejected(_) => ErrorCode::Rejected,
        }
    }

    /// The message a client may see (internal details stay in the log).
    pub fn client_message(&self) -> String {
        match self {
            RoomError::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

impl From<Denied> for RoomError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Forbidden(m) => RoomError::Forbidden(m.into()),
            Denied::Conflict(m) => RoomError::Conflict(m.into()),
            Denied::TooLarge(m) => RoomError::TooLarge(m.into()),
            Denied::NotFound(m) => RoomError::BadRequest(m.into()),
            Denied::BadRequest(m) => RoomError::BadRequest(m.into()),
        }
    }
}

impl From<crate::store::StoreError> for RoomError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Fenced { .. } => RoomError::Unavailable("room moved to another node; retry".into()),
            StoreError::Conflict => RoomError::Conflict("already exists".into()),
            other => {
                tracing::warn!(error = %other, "store error in room");
                RoomError::Unavailable("store unavailable; retry".into())
            }
        }
    }
}

/// Node-wide room settings every room reads.
#[derive(Clone, Debug)]
pub struct RoomLimits {
    pub join_replay_limit: u32,
    pub max_occupants: u32,
    pub recent_cache: usize,
}

/// Most messages in one append: bounds one room's share of a batch and its bind parameters.
const MAX_APPEND_MESSAGES: usize = 500;

/// Appends a room may have in flight at once. Two is enough: while one commits, the next is
/// already waiting in the committer, so a post waits for at most one commit before its own.
const PIPELINE_DEPTH: usize = 2;

/// When a room last saw traffic, in [`crate::clock::monotonic_ms`]; shared with the registry,
/// whose sweeper asks rooms that look idle to passivate (one timer per node, not per room).
pub type Activity = Arc<std::sync::atomic::AtomicU64>;

/// A post waiting for its commit, with everyone to ack (a resend joins the original).
struct PendingPost {
    message: NewMessage,
    /// `message`'s `(sender, cid)` in [`cids::Cids`].
    cid: cids::CidKey,
    waiters: Vec<(Arc<dyn Occupant>, RequestId)>,
    /// Sent by a resumed session (`OccupantState::resumed`): possibly stored already.
    maybe_resent: bool,
}

/// A committed message as this room caches it: the event, with the encodings made so far.
struct Recent {
    seq: u64,
    event: Arc<Delivery>,
}

/// What a stopping room tells each occupant before it lets them go.
enum Farewell {
    /// An event for all (`moved`).
    Event(Arc<Delivery>),
    /// An answer without a request (the room cannot serve here any more).
    Answer(RoomAnswer),
}

/// The actor of one active room.
pub struct Room {
    addr: RoomAddr,
    fence: Fence,
    incarnation: u64,
    state: RoomState,
    /// Highest committed seq.
    last_seq: u64,
    /// The room's clock: the time (Unix ms) of the last message handed to the committer. It
    /// never goes back, here or on the next host (it starts at the stored `last_ts`), so a
    /// room's messages are in time order as well as seq order (see `Room::stamp`).
    clock: i64,
    /// Posts not yet handed to the committer.
    queue: VecDeque<PendingPost>,
    /// Posts of the appends in flight, oldest first (at most [`PIPELINE_DEPTH`]).
    in_flight: pipeline::Pipeline<Vec<PendingPost>, Result<Appended, CommitError>>,
    /// The `last_seq` the next append assumes: `last_seq` plus everything in flight.
    next_base: u64,
    /// Posts put back at the head of `queue` after `Stale` answers (keeps them in order).
    requeued: usize,
    /// An append failed or was stale: submit nothing more until the appends in flight are
    /// answered, then reload `last_seq` from the store (`resync`).
    needs_resync: bool,
    resyncing: bool,
    /// A flush is scheduled for when the room has handled what is ready now (`flush_soon`).
    flush_scheduled: bool,
    /// The last committed messages, newest last; `None` until first needed.
    recent: Option<VecDeque<Recent>>,
    /// The `(sender, cid)` pairs pending and the last committed ones: resends. Made at the
    /// room's first post ([`Room::cids`]): a room that is only joined does without it, which
    /// keeps its task in a smaller allocation (the test at the end of this file).
    cids: Option<Box<cids::Cids>>,
    /// Connected occupants' sessions by session id (their nicks are in `state.occupants`).
    occupants: HashMap<SessionId, Arc<dyn Occupant>>,
    passivating: bool,
    /// The node whose room this is (`home_node`): fallback hands rooms back by home.
    home: crate::ids::NodeId,
    /// Set by [`HandOff`]: take no new posts, finish the appends in flight, then tell the
    /// occupants `moved` and stop.
    handoff: Option<Box<(String, tokio::sync::oneshot::Sender<bool>)>>,
    activity: Activity,
    /// Plugins of this room and the posts waiting for their decisions.
    hooks: plugin::RoomHooks,
    deps: Arc<RoomDeps>,
    /// Told when this room stops.
    registrar: Arc<dyn Registrar>,
}

/// The registry as a room sees it: the room tells it when it stops. Implemented by the
/// registry, which starts rooms and hands each one this (so the room does not import it).
pub trait Registrar: Send + Sync {
    /// Forget `room` if `incarnation` is still its current one (the room is stopping).
    fn passivated(&self, room: &RoomAddr, incarnation: u64);
}

/// What every room of a node shares.
pub struct RoomDeps {
    pub store: Store,
    pub committer: Committer,
    pub limits: RoomLimits,
    /// The I/O runtime: store reads run there, never on an arbiter thread.
    pub io: tokio::runtime::Handle,
    /// The peer's client address (`host:port`), where a fenced room has most likely gone.
    pub peer_client: Option<String>,
    /// The node's plugin host (`None`: no plugin runs on this node).
    pub plugins: Option<crate::plugin::PluginHost>,
}

impl Room {
    /// A room actor for a loaded row (`row.host_node` must be this node).
    pub fn new(
        row: RoomRow,
        affiliations: HashMap<String, Affiliation>,
        incarnation: u64,
        activity: Activity,
        deps: Arc<RoomDeps>,
        registrar: Arc<dyn Registrar>,
    ) -> Room {
        Room {
            fence: Fence { room: row.id, host: row.host_node.clone(), epoch: row.epoch },
            addr: row.address,
            incarnation,
            state: RoomState::new(row.config, affiliations),
            last_seq: row.last_seq,
            clock: row.last_ts,
            queue: VecDeque::new(),
            in_flight: pipeline::Pipeline::default(),
            next_base: row.last_seq,
            requeued: 0,
            needs_resync: false,
            resyncing: false,
            flush_scheduled: false,
            recent: None,
            cids: None,
            occupants: HashMap::new(),
            passivating: false,
            home: row.home_node,
            handoff: None,
            activity,
            hooks: Default::default(),
            deps,
            registrar,
        }
    }

    /// Record traffic (keeps the room from passivating).
    fn touch(&self) {
        self.activity.store(crate::clock::monotonic_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The room's memory of `(sender, cid)` pairs, made at first use.
    fn cids(&mut self) -> &mut cids::Cids {
        self.cids.get_or_insert_with(Default::default)
    }

    fn check_alive(&self) -> Result<(), RoomError> {
        if self.passivating {
            Err(RoomError::Passivating)
        } else if self.handoff.is_some() {
            Err(RoomError::Unavailable("room is moving to another node; retry".into()))
        } else {
            Ok(())
        }
    }

    fn occupant(&self, session: SessionId) -> Result<&Arc<dyn Occupant>, RoomError> {
        self.occupants.get(&session).ok_or_else(|| RoomError::Forbidden("join the room first".into()))
    }

    /// Run a store operation on the I/O runtime.
    fn on_io<T, F>(&self, f: F) -> impl Future<Output = Result<T, RoomError>> + use<T, F>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, crate::store::StoreError>> + Send + 'static,
    {
        let task = self.deps.io.spawn(f);
        async move {
            match task.await {
                Ok(r) => r.map_err(RoomError::from),
                Err(e) => Err(RoomError::Internal(format!("store task failed: {e}"))),
            }
        }
    }

    /// Deliver `event` to every occupant (encoded at most once per protocol).
    fn broadcast(&self, event: &Arc<Delivery>) {
        for session in self.occupants.values() {
            session.deliver(event);
        }
        metrics::counter!("stoa_deliveries_total").increment(self.occupants.len() as u64);
    }

    fn broadcast_event(&self, event: RoomEvent) {
        self.broadcast(&Delivery::new(event));
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        self.start_plugins(ctx);
    }
}

/// A snapshot for the admin API.
#[derive(Message, Clone)]
#[rtype(result = "RoomSnapshot")]
pub struct Inspect;

/// What an active room reports about itself.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RoomSnapshot {
    pub room: RoomAddr,
    pub epoch: i64,
    pub host_node: String,
    pub last_seq: u64,
    pub occupants: usize,
    /// Who they are (the console's room view).
    pub occupant_list: Vec<crate::protocol::OccupantInfo>,
    pub queued: usize,
    pub config: serde_json::Value,
}

impl Handler<Inspect> for Room {
    type Result = MessageResult<Inspect>;

    fn handle(&mut self, _msg: Inspect, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(RoomSnapshot {
            room: self.addr.clone(),
            epoch: self.fence.epoch.0,
            host_node: self.fence.host.0.clone(),
            last_seq: self.last_seq,
            occupants: self.occupants.len(),
            occupant_list: self.state.occupant_list(),
            queued: self.queue.len() + self.hooks.len() + self.in_flight.iter().map(Vec::len).sum::<usize>(),
            config: self.state.config.public_view(),
        })
    }
}

#[cfg(test)]
mod tests {
    /// A loaded room is one tokio task holding its actix context future, which holds the
    /// `Room`. By tokio's source the task adds its header and trailer (about 100 bytes) and is
    /// aligned to 128 bytes, so jemalloc serves it from its 1,024-byte class only while the
    /// future stays small: at 1,056 bytes an idle room measured 2,094–2,102 bytes, over issue
    /// 13's 2 KiB; at 904 bytes (the cid memory made at the first post), 1,783–1,873
    /// (docs/benchmarks.md, "An idle room's task"). A field that grows it past what was
    /// measured to fit should find room elsewhere (a box made when needed).
    #[test]
    fn a_room_task_fits_the_allocation_class_measured() {
        let size = std::mem::size_of::<actix::dev::ContextFut<super::Room, actix::Context<super::Room>>>();
        assert!(size <= 904, "a room's context future is {size} bytes; 904 was measured to fit 1,024-byte tasks");
    }
}
