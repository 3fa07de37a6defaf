//! The room actor: one per active room, on one of the node's arbiters.
//!
//! A room owns its ordering. Posts are queued in the actor and handed to the group committer
//! as appends (everything queued goes in the next one), at most two in flight, which the
//! committer commits strictly in order; the store assigns seqs from each append's expected
//! base and refuses a wrong base, so the room's seq stays contiguous. Only after the commit does the room
//! ack the senders and fan the messages out; a failed commit acks nobody and shows nothing.
//! The room emits typed events ([`crate::event`]) to its occupants through the [`Occupant`]
//! trait, in order; it knows no wire format. Its replay cache holds those events.

mod pipeline;
pub mod plugin;
pub mod state;

use crate::committer::{CommitError, Committer};
use crate::event::{ChatMessage, Delivery, Occupant, RoomAnswer, RoomEvent};
use crate::protocol::{Affiliation, ErrorCode, RequestId, RoomAddr, RoomConfig, RoomConfigPatch};
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
    HostedBy(crate::store::NodeId),
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

/// Committed `(sender, cid)` pairs a room remembers, to answer resends without the store.
/// Older resends are still caught by the store's unique key.
const CID_MEMORY: usize = 1024;

/// When a room last saw traffic, in [`crate::clock::monotonic_ms`]; shared with the registry,
/// whose sweeper asks rooms that look idle to passivate (one timer per node, not per room).
pub type Activity = Arc<std::sync::atomic::AtomicU64>;

/// A post waiting for its commit, with everyone to ack (a resend joins the original).
struct PendingPost {
    message: NewMessage,
    waiters: Vec<(Arc<dyn Occupant>, RequestId)>,
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
    /// The last committed messages, newest last; `None` until first needed.
    recent: Option<VecDeque<Recent>>,
    committed_cids: HashMap<(String, String), (u64, i64)>,
    cid_order: VecDeque<(String, String)>,
    /// Connected occupants' sessions by session id (their nicks are in `state.occupants`).
    occupants: HashMap<u64, Arc<dyn Occupant>>,
    passivating: bool,
    /// The node whose room this is (`home_node`): fallback hands rooms back by home.
    home: crate::store::NodeId,
    /// Set by [`HandOff`]: take no new posts, finish the appends in flight, then tell the
    /// occupants `moved` and stop.
    handoff: Option<(String, tokio::sync::oneshot::Sender<bool>)>,
    activity: Activity,
    /// Plugins of this room and the posts waiting for their decisions.
    hooks: plugin::RoomHooks,
    deps: Arc<RoomDeps>,
}

/// The registry as a room sees it: the room tells it when it stops. Implemented by
/// [`crate::registry::RoomRegistry`], which starts rooms (so the room does not import it).
pub trait Registrar: Send + Sync {
    /// Forget `room` if `incarnation` is still its current one (the room is stopping).
    fn passivated(&self, room: &RoomAddr, incarnation: u64);
}

/// What every room of a node shares.
pub struct RoomDeps {
    pub store: Store,
    pub committer: Committer,
    pub registry: Arc<dyn Registrar>,
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
    ) -> Room {
        Room {
            fence: Fence { room: row.id, host: row.host_node.clone(), epoch: row.epoch },
            addr: row.address,
            incarnation,
            state: RoomState::new(row.config, affiliations),
            last_seq: row.last_seq,
            queue: VecDeque::new(),
            in_flight: pipeline::Pipeline::default(),
            next_base: row.last_seq,
            requeued: 0,
            needs_resync: false,
            resyncing: false,
            recent: None,
            committed_cids: HashMap::new(),
            cid_order: VecDeque::new(),
            occupants: HashMap::new(),
            passivating: false,
            home: row.home_node,
            handoff: None,
            activity,
            hooks: Default::default(),
            deps,
        }
    }

    /// Record traffic (keeps the room from passivating).
    fn touch(&self) {
        self.activity.store(crate::clock::monotonic_ms(), std::sync::atomic::Ordering::Relaxed);
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

    fn occupant(&self, session: u64) -> Result<&Arc<dyn Occupant>, RoomError> {
        self.occupants.get(&session).ok_or_else(|| RoomError::Forbidden("join the room first".into()))
    }

    /// Run a store operation on the I/O runtime.
    fn on_io<T, F>(&self, f: F) -> impl Future<Output = Result<T, RoomError>> + 'static
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

    fn message_event(&self, seq: u64, m: &NewMessage, ts: i64) -> Arc<Delivery> {
        Delivery::new(RoomEvent::Message(ChatMessage {
            room: self.addr.clone(),
            seq,
            id: m.id.clone(),
            from: m.sender.clone(),
            nick: m.nick.clone(),
            body: m.body.clone(),
            cid: m.client_msg_id.clone(),
            ts,
        }))
    }

    fn stored_event(&self, m: &StoredMessage) -> Arc<Delivery> {
        Delivery::new(RoomEvent::Message(ChatMessage {
            room: self.addr.clone(),
            seq: m.seq,
            id: m.id.clone(),
            from: m.sender.clone(),
            nick: m.nick.clone(),
            body: m.body.clone(),
            cid: m.client_msg_id.clone(),
            ts: m.created_at,
        }))
    }

    fn remember(&mut self, seq: u64, event: Arc<Delivery>) {
        if let Some(recent) = &mut self.recent {
            recent.push_back(Recent { seq, event });
            while recent.len() > self.deps.limits.recent_cache.max(1) {
                recent.pop_front();
            }
        }
    }

    fn remember_cid(&mut self, sender: String, cid: String, seq: u64, ts: i64) {
        let key = (sender, cid);
        if self.committed_cids.insert(key.clone(), (seq, ts)).is_none() {
            self.cid_order.push_back(key);
            if self.cid_order.len() > CID_MEMORY
                && let Some(old) = self.cid_order.pop_front() {
                    self.committed_cids.remove(&old);
                }
        }
    }

    // ---- write path ----------------------------------------------------------------------

    /// Hand queued posts to the committer, up to [`PIPELINE_DEPTH`] appends in flight. Each
    /// append assumes the previous ones will commit in full (`next_base`); the store checks
    /// that assumption (`last_seq = base_seq`), so a wrong guess comes back as `Stale`.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.handoff.is_some() {
            self.finish_handoff_if_drained(ctx);
            return;
        }
        while !self.queue.is_empty() && self.in_flight.len() < PIPELINE_DEPTH && !self.resyncing {
            if self.needs_resync {
                if self.in_flight.is_empty() {
                    self.resync(ctx);
                }
                return;
            }
            let take = self.queue.len().min(MAX_APPEND_MESSAGES);
            let posts: Vec<PendingPost> = self.queue.drain(..take).collect();
            let request = AppendRequest {
                fence: self.fence.clone(),
                base_seq: self.next_base,
                messages: posts.iter().map(|p| p.message.clone()).collect(),
            };
            self.next_base += posts.len() as u64;
            let ticket = self.in_flight.submit(posts);
            let answer = self.deps.committer.submit(request);
            ctx.spawn(answer.into_actor(self).map(move |result, room, ctx| room.answered(ticket, result, ctx)));
        }
    }

    /// The committer's answer to append `ticket`: applied once every older append's answer has
    /// been (actix may poll the answers' futures newest first; see `room::pipeline`).
    fn answered(&mut self, ticket: u64, result: Result<Appended, CommitError>, ctx: &mut Context<Self>) {
        // `None`: an older append is still waiting, or the room stopped and answered these
        // posts already.
        let mut ready = self.in_flight.answered(ticket, result);
        while let Some((posts, result)) = ready {
            if !self.committed(posts, result, ctx) {
                return;
            }
            ready = self.in_flight.next_ready();
        }
        if self.in_flight.is_empty() {
            self.requeued = 0;
        }
        self.flush(ctx);
    }

    /// Apply the answer to the oldest append in flight, whose posts are `posts`. Returns false
    /// when the room is stopping (nothing more is applied).
    fn committed(&mut self, posts: Vec<PendingPost>, result: Result<Appended, CommitError>, ctx: &mut Context<Self>) -> bool {
        match result {
            Ok(appended) => {
                // After an earlier failure the log may hold messages this room never showed:
                // ack now, but leave delivery to the resync, which shows everything in order.
                let deliver = !self.needs_resync;
                for (post, outcome) in posts.into_iter().zip(appended.outcomes) {
                    for (session, re) in &post.waiters {
                        session.answer(RoomAnswer::Ack {
                            re: re.clone(),
                            room: self.addr.clone(),
                            seq: outcome.seq,
                            ts: outcome.created_at,
                            duplicate: outcome.duplicate,
                        });
                    }
                    if deliver {
                        let NewMessage { sender, client_msg_id, .. } = &post.message;
                        self.remember_cid(sender.clone(), client_msg_id.clone(), outcome.seq, outcome.created_at);
                        if !outcome.duplicate {
                            let event = self.message_event(outcome.seq, &post.message, outcome.created_at);
                            self.broadcast(&event);
                            self.remember(outcome.seq, event);
                        }
                    }
                }
                if deliver {
                    self.last_seq = appended.last_seq;
                }
            }
            Err(CommitError::Append(AppendError::Stale { last_seq })) => {
                tracing::info!(room = %self.addr, known = self.last_seq, stored = last_seq, "room log moved on; resyncing");
                // Nothing of this append was written: back in the queue, ahead of every post
                // that was never sent, behind the ones requeued before it.
                let n = posts.len();
                for (i, p) in posts.into_iter().enumerate() {
                    self.queue.insert(self.requeued + i, p);
                }
                self.requeued += n;
                self.needs_resync = true;
            }
            Err(CommitError::Append(AppendError::Fenced { host, epoch })) => {
                tracing::warn!(room = %self.addr, %host, epoch, "room fenced; stopping this incarnation");
                self.fail_posts(posts, ErrorCode::Unavailable, "room moved to another node; retry");
                self.stop_fenced(ctx);
                return false;
            }
            Err(CommitError::Append(AppendError::Gone)) => {
                self.fail_posts(posts, ErrorCode::NotFound, "room was destroyed");
                self.stop_fenced(ctx);
                return false;
            }
            Err(e) => {
                tracing::warn!(room = %self.addr, error = %e, "append not committed");
                self.fail_posts(posts, ErrorCode::Unavailable, "message not stored; retry with the same cid");
                // The commit may have landed after all (connection lost during COMMIT).
                self.needs_resync = true;
            }
        }
        true
    }

    fn fail_posts(&self, posts: Vec<PendingPost>, code: ErrorCode, message: &str) {
        for post in posts {
            for (session, re) in post.waiters {
                session.answer(RoomAnswer::Error { re: Some(re), room: self.addr.clone(), code, message: message.into() });
            }
        }
    }

    /// Answer every post in flight or queued with an error (the room is stopping).
    fn fail_all(&mut self, code: ErrorCode, message: &str) {
        let mut posts: Vec<PendingPost> = self.in_flight.drain().flatten().collect();
        posts.extend(self.queue.drain(..));
        posts.extend(self.hooks.drain_posts());
        self.fail_posts(posts, code, message);
    }

    /// Reload the room's log position from the store and deliver whatever was committed that
    /// this incarnation has not shown yet, then carry on with the queue. Runs only with no
    /// append in flight.
    fn resync(&mut self, ctx: &mut Context<Self>) {
        self.resyncing = true;
        let store = self.deps.store.clone();
        let id = self.fence.room;
        let known = self.last_seq;
        let load = self.on_io(async move {
            let row = store.load_room_by_id(id).await?;
            let missing = match &row {
                Some(row) if row.last_seq > known => store.messages(id, known, None, row.last_seq - known, false).await?,
                _ => Vec::new(),
            };
            Ok((row, missing))
        });
        ctx.spawn(load.into_actor(self).map(|result, room, ctx| {
            room.resyncing = false;
            match result {
                Ok((Some(row), missing)) if row.host_node == room.fence.host && row.epoch == room.fence.epoch => {
                    for m in &missing {
                        let event = room.stored_event(m);
                        room.broadcast(&event);
                        room.remember(m.seq, event);
                        room.remember_cid(m.sender.clone(), m.client_msg_id.clone(), m.seq, m.created_at);
                    }
                    room.last_seq = row.last_seq;
                    room.next_base = row.last_seq;
                    room.needs_resync = false;
                    room.flush(ctx);
                }
                Ok((Some(_), _)) => {
                    room.fail_all(ErrorCode::Unavailable, "room moved to another node; retry");
                    room.stop_fenced(ctx);
                }
                Ok((None, _)) => {
                    room.fail_all(ErrorCode::NotFound, "room was destroyed");
                    room.stop_fenced(ctx);
                }
                Err(e) => {
                    // Store still unreachable: fail what is queued; try again on the next post.
                    room.fail_all(e.code(), &e.client_message());
                }
            }
        }));
    }

    /// This incarnation may no longer write: tell the occupants and stop. The next request
    /// for the room activates a fresh incarnation from the store (or finds it moved).
    fn stop_fenced(&mut self, ctx: &mut Context<Self>) {
        self.passivating = true;
        self.fail_all(ErrorCode::Unavailable, "room is no longer served here; retry");
        let farewell = match &self.deps.peer_client {
            // In a pair, a fenced room has moved to the peer: say so.
            Some(peer) => Farewell::Event(Delivery::new(RoomEvent::Moved { room: self.addr.clone(), to: peer.clone() })),
            None => Farewell::Answer(RoomAnswer::Error {
                re: None,
                room: self.addr.clone(),
                code: ErrorCode::Unavailable,
                message: "room is no longer served here; join again".into(),
            }),
        };
        self.dismiss_all_and_stop(farewell, ctx);
    }

    /// Tell every occupant `farewell` (they are no longer in the room here), deregister, stop.
    fn dismiss_all_and_stop(&mut self, farewell: Farewell, ctx: &mut Context<Self>) {
        for session in self.occupants.values() {
            match &farewell {
                Farewell::Event(event) => session.deliver(event),
                Farewell::Answer(answer) => session.answer(answer.clone()),
            }
            session.exited(&self.addr);
        }
        self.occupants.clear();
        self.deps.registry.passivated(&self.addr, self.incarnation);
        ctx.stop();
    }

    /// During a [`HandOff`]: once no append is in flight, refuse what is queued (nothing of it
    /// was acked; clients resend with the same `cid` on the new host), tell every occupant
    /// `moved`, and stop.
    fn finish_handoff_if_drained(&mut self, ctx: &mut Context<Self>) {
        if !self.in_flight.is_empty() || self.resyncing || self.passivating {
            return;
        }
        let Some((to, done)) = self.handoff.take() else { return };
        self.passivating = true;
        let mut queued: Vec<PendingPost> = self.queue.drain(..).collect();
        queued.extend(self.hooks.drain_posts());
        self.fail_posts(queued, ErrorCode::Unavailable, "room is moving to another node; resend with the same cid");
        let farewell = Farewell::Event(Delivery::new(RoomEvent::Moved { room: self.addr.clone(), to }));
        self.dismiss_all_and_stop(farewell, ctx);
        let _ = done.send(true);
    }

    // ---- joins ---------------------------------------------------------------------------

    /// Send `joined` and the replay to a session that was just admitted.
    fn send_join_replay(&self, session: &dyn Occupant, re: RequestId, nick: String, aff: Affiliation, replay: Vec<Arc<Delivery>>, truncated: bool) {
        session.answer(RoomAnswer::Joined {
            re,
            room: self.addr.clone(),
            nick,
            last_seq: self.last_seq,
            occupants: self.state.occupant_list(),
            subject: self.state.config.subject.clone(),
            affiliation: aff,
            truncated,
            replay,
        });
    }

    /// The replay for a join, from the cache if it covers it. `None` = the store must be read.
    fn replay_from_cache(&self, since: Option<u64>) -> Option<(Vec<Arc<Delivery>>, bool)> {
        let recent = self.recent.as_ref()?;
        let oldest_cached = recent.front().map_or(self.last_seq + 1, |r| r.seq);
        match since {
            None => {
                let want = self.state.config.history_on_join as u64;
                let from = self.last_seq.saturating_sub(want) + 1; // first seq to send
                (from >= oldest_cached || from > self.last_seq || oldest_cached == 1).then(|| {
                    (recent.iter().filter(|r| r.seq >= from).map(|r| r.event.clone()).collect(), false)
                })
            }
            Some(since) => {
                if since >= self.last_seq {
                    return Some((Vec::new(), false));
                }
                let limit = self.deps.limits.join_replay_limit as u64;
                (since + 1 >= oldest_cached || oldest_cached == 1).then(|| {
                    let all: Vec<&Recent> = recent.iter().filter(|r| r.seq > since).collect();
                    let truncated = all.len() as u64 > limit;
                    (all.into_iter().take(limit as usize).map(|r| r.event.clone()).collect(), truncated)
                })
            }
        }
    }

    fn admit(&mut self, session: Arc<dyn Occupant>, nick: String) {
        let was_in = self.occupants.contains_key(&session.id());
        if !was_in {
            self.broadcast_event(RoomEvent::Presence {
                room: self.addr.clone(),
                user: session.user().to_owned(),
                nick: nick.clone(),
                status: "joined".into(),
                reason: None,
            });
        }
        self.state.occupants.insert(session.id(), OccupantState::new(session.user().to_owned(), nick));
        session.entered(&self.addr);
        self.occupants.insert(session.id(), session);
        self.touch();
    }

    fn remove_occupant(&mut self, session_id: u64, status: &str, reason: Option<String>) {
        if let Some(session) = self.occupants.remove(&session_id) {
            let nick = self.state.occupants.remove(&session_id).map(|s| s.nick).unwrap_or_default();
            session.exited(&self.addr);
            self.plugins_left(session.user(), &nick);
            let event = Delivery::new(RoomEvent::Presence {
                room: self.addr.clone(),
                user: session.user().to_owned(),
                nick,
                status: status.into(),
                reason,
            });
            session.deliver(&event);
            self.broadcast(&event);
            self.touch();
            if self.occupants.is_empty() {
                // An empty room may stay loaded for a long time: give back the tables.
                self.occupants.shrink_to_fit();
                self.state.occupants.shrink_to_fit();
            }
        }
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        self.start_plugins(ctx);
    }
}

/// The registry's sweeper thinks this room has been idle for `after`: stop if it is empty and
/// has nothing queued or in flight.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct PassivateIfIdle {
    pub after: Duration,
}

impl Handler<PassivateIfIdle> for Room {
    type Result = ();

    fn handle(&mut self, msg: PassivateIfIdle, ctx: &mut Context<Self>) {
        let idle_ms = crate::clock::monotonic_ms().saturating_sub(self.activity.load(std::sync::atomic::Ordering::Relaxed));
        let idle = self.occupants.is_empty() && self.queue.is_empty() && self.in_flight.is_empty() && self.hooks.len() == 0 && !self.resyncing;
        if idle && idle_ms >= msg.after.as_millis() as u64 && !self.passivating {
            self.passivating = true;
            tracing::debug!(room = %self.addr, "passivating idle room");
            self.deps.registry.passivated(&self.addr, self.incarnation);
            ctx.stop();
        }
    }
}

/// Move this room away (failover of its host, or fallback to its home): stop taking posts,
/// let the appends in flight finish (their acks go out), then tell the occupants `moved` to
/// `to` and stop. `done` gets `true` once stopped, `false` if the room is not `only_home`'s.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HandOff {
    /// Hand off only a room whose home is this node (`None`: any room).
    pub only_home: Option<crate::store::NodeId>,
    /// The client address (`host:port`) the room is moving to.
    pub to: String,
    pub done: tokio::sync::oneshot::Sender<bool>,
}

impl Handler<HandOff> for Room {
    type Result = ();

    fn handle(&mut self, msg: HandOff, ctx: &mut Context<Self>) {
        if msg.only_home.as_ref().is_some_and(|home| *home != self.home) || self.passivating {
            let _ = msg.done.send(false);
            return;
        }
        self.handoff = Some((msg.to, msg.done));
        self.flush(ctx);
    }
}

/// A session asks to enter the room. The room answers with `joined` + replay through the
/// session's queue; the handler's result only carries refusals.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Join {
    pub session: Arc<dyn Occupant>,
    pub re: RequestId,
    pub nick: String,
    pub since: Option<u64>,
    pub password: Option<String>,
}

impl Handler<Join> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Join, _ctx: &mut Context<Self>) -> Self::Result {
        let checked = self.check_alive().and_then(|_| {
            self.state
                .check_join(msg.session.id(), msg.session.user(), &msg.nick, msg.password.as_deref(), self.deps.limits.max_occupants)
                .map_err(RoomError::from)
        });
        let aff = match checked {
            Ok(aff) => aff,
            Err(e) => return AtomicResponse::new(Box::pin(fut::ready(Err(e)))),
        };
        if let Some((replay, truncated)) = self.replay_from_cache(msg.since) {
            self.admit(msg.session.clone(), msg.nick.clone());
            self.send_join_replay(&*msg.session, msg.re, msg.nick, aff, replay, truncated);
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        }
        // Not cached: read the replay (and warm the cache) while holding the room's mailbox,
        // so no live message can slip between the replay and the admission.
        let store = self.deps.store.clone();
        let id = self.fence.room;
        let last = self.last_seq;
        let cache = self.deps.limits.recent_cache as u64;
        let limit = self.deps.limits.join_replay_limit as u64;
        let want_tail = (self.state.config.history_on_join as u64).max(cache);
        let since = msg.since;
        let load = self.on_io(async move {
            let tail = store.messages(id, last.saturating_sub(want_tail), Some(last + 1), want_tail, true).await?;
            let replay = match since {
                Some(since) if since < last.saturating_sub(want_tail) => {
                    Some(store.messages(id, since, Some(last + 1), limit + 1, false).await?)
                }
                _ => None,
            };
            Ok((tail, replay))
        });
        AtomicResponse::new(Box::pin(load.into_actor(self).map(move |result, room, _ctx| {
            let (tail, replay) = result?;
            room.check_alive()?;
            if room.last_seq != last {
                // Cannot happen while the mailbox is held (actix pauses spawned futures during
                // an atomic response), but a replay built on a moved log would have a gap.
                return Err(RoomError::Unavailable("room busy; retry the join".into()));
            }
            if room.recent.is_none() && room.last_seq == last {
                let mut recent = VecDeque::with_capacity(tail.len());
                for m in tail.iter().skip(tail.len().saturating_sub(room.deps.limits.recent_cache)) {
                    recent.push_back(Recent { seq: m.seq, event: room.stored_event(m) });
                }
                room.recent = Some(recent);
            }
            let (events, truncated) = match (replay, room.replay_from_cache(since)) {
                (_, Some(cached)) => cached,
                (Some(mut rows), None) => {
                    let truncated = rows.len() as u64 > limit;
                    rows.truncate(limit as usize);
                    (rows.iter().map(|m| room.stored_event(m)).collect(), truncated)
                }
                (None, None) => {
                    // since without a replay read (covered by tail), or no since: use the tail.
                    let from = match since {
                        Some(s) => s + 1,
                        None => last.saturating_sub(room.state.config.history_on_join as u64) + 1,
                    };
                    (tail.iter().filter(|m| m.seq >= from).map(|m| room.stored_event(m)).collect(), false)
                }
            };
            room.admit(msg.session.clone(), msg.nick.clone());
            room.send_join_replay(&*msg.session, msg.re, msg.nick, aff, events, truncated);
            Ok(())
        })))
    }
}

/// A session leaves the room (`re` is `None` when the connection closed).
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Leave {
    pub session: u64,
    pub re: Option<RequestId>,
}

impl Handler<Leave> for Room {
    type Result = Result<(), RoomError>;

    fn handle(&mut self, msg: Leave, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(session) = self.occupants.get(&msg.session).cloned() else {
            return if msg.re.is_some() { Err(RoomError::Forbidden("not in this room".into())) } else { Ok(()) };
        };
        self.remove_occupant(msg.session, "left", None);
        if let Some(re) = msg.re {
            session.answer(RoomAnswer::Left { re, room: self.addr.clone() });
        }
        Ok(())
    }
}

/// An occupant posts a message. The ack (after commit) or the error goes to its queue.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Post {
    pub session: u64,
    pub re: RequestId,
    pub body: String,
    pub client_msg_id: String,
}

impl Handler<Post> for Room {
    type Result = Result<(), RoomError>;

    fn handle(&mut self, msg: Post, ctx: &mut Context<Self>) -> Self::Result {
        self.check_alive()?;
        let session = self.occupant(msg.session)?.clone();
        let user = session.user().to_owned();
        let nick = self.state.occupants.get(&msg.session).map(|o| o.nick.clone()).unwrap_or_default();
        self.touch();
        let key = (user, msg.client_msg_id);
        if let Some(&(seq, ts)) = self.committed_cids.get(&key) {
            session.answer(RoomAnswer::Ack { re: msg.re, room: self.addr.clone(), seq, ts, duplicate: true });
            return Ok(());
        }
        {
            let mut pending = self.in_flight.iter_mut().flatten().chain(self.queue.iter_mut()).chain(self.hooks.posts_mut());
            if let Some(p) = pending.find(|p| p.message.sender == key.0 && p.message.client_msg_id == key.1) {
                // A resend of a post not yet committed: answer both with the one commit.
                p.waiters.push((session, msg.re));
                return Ok(());
            }
        }
        let (sender, client_msg_id) = key;
        let post = PendingPost {
            message: NewMessage { id: uuid::Uuid::now_v7().to_string(), sender, nick, body: msg.body, client_msg_id, created_at: now_ms() },
            waiters: vec![(session, msg.re)],
        };
        self.enqueue_post(post, false, ctx);
        Ok(())
    }
}

/// May this user read the room's history? Answers the room's id and log position.
#[derive(Message, Clone)]
#[rtype(result = "Result<crate::store::RoomId, RoomError>")]
pub struct CheckRead {
    pub session: u64,
    pub user: String,
}

impl Handler<CheckRead> for Room {
    type Result = Result<crate::store::RoomId, RoomError>;

    fn handle(&mut self, msg: CheckRead, _ctx: &mut Context<Self>) -> Self::Result {
        self.check_alive()?;
        self.touch();
        if !self.occupants.contains_key(&msg.session) {
            let aff = self.state.may_enter(&msg.user)?;
            if self.state.config.password.is_some() && aff < Affiliation::Admin {
                return Err(RoomError::Forbidden("join this password-protected room to read its history".into()));
            }
        }
        Ok(self.fence.room)
    }
}

/// Owners and admins change the subject.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct SetSubject {
    pub session: u64,
    pub user: String,
    pub subject: String,
}

impl Handler<SetSubject> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: SetSubject, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.check_alive().and_then(|_| self.state.check_subject(&msg.user).map_err(RoomError::from)) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let config = RoomConfig { subject: msg.subject.clone(), ..self.state.config.clone() };
        AtomicResponse::new(self.store_config(config, move |room| {
            room.broadcast_event(RoomEvent::Subject { room: room.addr.clone(), subject: msg.subject, by: msg.user });
        }))
    }
}

/// Owners change the room configuration.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Configure {
    pub user: String,
    pub patch: RoomConfigPatch,
}

impl Handler<Configure> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Configure, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.check_alive().and_then(|_| self.state.check_owner(&msg.user).map_err(RoomError::from)) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let config = self.state.config.patched(&msg.patch);
        let subject_changed = config.subject != self.state.config.subject;
        let then = move |room: &mut Room| {
            room.broadcast_event(RoomEvent::Configured { room: room.addr.clone(), config: Box::new(room.state.config.clone()) });
            if subject_changed {
                room.broadcast_event(RoomEvent::Subject {
                    room: room.addr.clone(),
                    subject: room.state.config.subject.clone(),
                    by: msg.user,
                });
            }
        };
        let Some(plugins) = msg.patch.plugins.clone() else {
            return AtomicResponse::new(self.store_config(config, then));
        };
        // A new plugin list is run by each plugin's `init` before it is stored (the room waits:
        // configure is rare, and its order with the room's other requests is kept).
        let host = self.deps.plugins.clone();
        let addr = self.addr.clone();
        let check = async move { plugin::check_room_plugins(host.as_ref(), &addr, &plugins).await };
        AtomicResponse::new(Box::pin(check.into_actor(self).then(move |checked, room, _ctx| -> ResponseActFuture<Room, Result<(), RoomError>> {
            match checked {
                Ok(()) => room.store_config(config, then),
                Err(e) => Box::pin(fut::ready(Err(e))),
            }
        })))
    }
}

impl Room {
    /// Store `config` (fenced); on success adopt it and run `then`.
    fn store_config(&mut self, config: RoomConfig, then: impl FnOnce(&mut Room) + 'static) -> ResponseActFuture<Self, Result<(), RoomError>> {
        let store = self.deps.store.clone();
        let fence = self.fence.clone();
        let stored = config.clone();
        let write = self.on_io(async move { store.update_config(&fence, &stored).await });
        Box::pin(write.into_actor(self).map(move |result, room, ctx| {
            result?;
            room.state.config = config;
            then(room);
            room.plugins_config_changed(ctx);
            Ok(())
        }))
    }
}

/// Owners and admins set a user's affiliation.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Affiliate {
    pub user: String,
    pub target: String,
    pub affiliation: Affiliation,
}

impl Handler<Affiliate> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Affiliate, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self
            .check_alive()
            .and_then(|_| self.state.check_affiliate(&msg.user, &msg.target, msg.affiliation).map_err(RoomError::from))
        {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let store = self.deps.store.clone();
        let fence = self.fence.clone();
        let (target, aff) = (msg.target.clone(), msg.affiliation);
        let write = self.on_io(async move { store.set_affiliation(&fence, &target, aff).await });
        AtomicResponse::new(Box::pin(write.into_actor(self).map(move |result, room, _ctx| {
            result?;
            if msg.affiliation == Affiliation::None {
                room.state.affiliations.remove(&msg.target);
            } else {
                room.state.affiliations.insert(msg.target.clone(), msg.affiliation);
            }
            let reason = if msg.affiliation == Affiliation::Outcast { "banned" } else { "membership removed" };
            for session in room.state.evicted_by(&msg.target, msg.affiliation) {
                room.remove_occupant(session, "kicked", Some(reason.into()));
            }
            Ok(())
        })))
    }
}

/// Owners and admins remove an occupant by nick.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Kick {
    pub user: String,
    pub nick: String,
    pub reason: Option<String>,
}

impl Handler<Kick> for Room {
    type Result = Result<(), RoomError>;

    fn handle(&mut self, msg: Kick, _ctx: &mut Context<Self>) -> Self::Result {
        self.check_alive()?;
        let targets = self.state.check_kick(&msg.user, &msg.nick).map_err(|d| match d {
            Denied::NotFound(m) => RoomError::Conflict(m.into()),
            other => RoomError::from(other),
        })?;
        for session in targets {
            self.remove_occupant(session, "kicked", msg.reason.clone());
        }
        Ok(())
    }
}

/// Owners destroy the room: its log, affiliations and row are deleted.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Destroy {
    pub user: String,
    pub reason: Option<String>,
}

impl Handler<Destroy> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Destroy, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.check_alive().and_then(|_| self.state.check_owner(&msg.user).map_err(RoomError::from)) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let store = self.deps.store.clone();
        let fence = self.fence.clone();
        let write = self.on_io(async move { store.destroy_room(&fence).await });
        AtomicResponse::new(Box::pin(write.into_actor(self).map(move |result, room, ctx| {
            result?;
            room.passivating = true;
            room.broadcast_event(RoomEvent::Destroyed { room: room.addr.clone(), reason: msg.reason });
            for session in room.occupants.values() {
                session.exited(&room.addr);
            }
            room.occupants.clear();
            room.fail_all(ErrorCode::NotFound, "room was destroyed");
            room.deps.registry.passivated(&room.addr, room.incarnation);
            ctx.stop();
            Ok(())
        })))
    }
}

/// What the room's owners and admins may read: its whole configuration and its affiliations.
#[derive(Message, Clone)]
#[rtype(result = "Result<RoomAdminView, RoomError>")]
pub struct AdminView {
    pub user: String,
}

/// The answer to [`AdminView`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RoomAdminView {
    pub config: RoomConfig,
    /// Every user with an affiliation other than none, by name.
    pub affiliations: Vec<(String, Affiliation)>,
}

impl Handler<AdminView> for Room {
    type Result = Result<RoomAdminView, RoomError>;

    fn handle(&mut self, msg: AdminView, _ctx: &mut Context<Self>) -> Self::Result {
        self.check_alive()?;
        self.state.check_admin(&msg.user)?;
        let mut affiliations: Vec<(String, Affiliation)> = self.state.affiliations.iter().map(|(u, a)| (u.clone(), *a)).collect();
        affiliations.sort();
        Ok(RoomAdminView { config: self.state.config.clone(), affiliations })
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
            queued: self.queue.len() + self.hooks.len() + self.in_flight.iter().map(Vec::len).sum::<usize>(),
            config: self.state.config.public_view(),
        })
    }
}
