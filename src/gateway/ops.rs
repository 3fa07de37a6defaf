//! The room operations: what each takes and returns ([`RoomOp`], [`Reply`], the queries and
//! pages), one public method per operation, the routing of an operation to here or the peer
//! that hosts its room, and serving it here.

use super::*;

/// An operation on a room: what [`Gateway::serve`] does here and [`Remote::request`] asks of
/// the room's host.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RoomOp {
    Create { room: RoomAddr, patch: RoomConfigPatch },
    Join(JoinRequest),
    Leave { re: RequestId, room: RoomAddr },
    Send { re: RequestId, room: RoomAddr, body: String, cid: ClientMsgId },
    History { room: RoomAddr, query: HistoryQuery },
    Subject { room: RoomAddr, subject: String },
    Configure { room: RoomAddr, patch: RoomConfigPatch },
    Affiliate { room: RoomAddr, target: String, affiliation: Affiliation },
    Kick { room: RoomAddr, nick: String, reason: Option<String> },
    Destroy { room: RoomAddr, reason: Option<String> },
    Archive { room: RoomAddr, query: ArchiveQuery },
    AdminView { room: RoomAddr },
}

impl RoomOp {
    /// The room it is about.
    pub fn room(&self) -> &RoomAddr {
        match self {
            RoomOp::Join(j) => &j.room,
            RoomOp::Create { room, .. }
            | RoomOp::Leave { room, .. }
            | RoomOp::Send { room, .. }
            | RoomOp::History { room, .. }
            | RoomOp::Subject { room, .. }
            | RoomOp::Configure { room, .. }
            | RoomOp::Affiliate { room, .. }
            | RoomOp::Kick { room, .. }
            | RoomOp::Destroy { room, .. }
            | RoomOp::Archive { room, .. }
            | RoomOp::AdminView { room } => room,
        }
    }
}

/// The outcome of a [`RoomOp`] that succeeded.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done; anything the client sees next comes from the room (`joined`, an ack).
    Done,
    History(HistoryPage),
    Archive(ArchivePage),
    AdminView(room::RoomAdminView),
}


/// Which messages a `history` request asks for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistoryQuery {
    /// Only messages with a smaller seq.
    pub before: Option<u64>,
    /// Only messages with a greater seq (then the oldest first are taken, not the newest).
    pub after: Option<u64>,
    /// At most this many (default [`HISTORY_DEFAULT_LIMIT`], capped by the config).
    pub limit: Option<u32>,
}

/// A page of history, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryPage {
    pub messages: Vec<ChatMessage>,
    /// There are more messages in the direction asked for.
    pub truncated: bool,
    /// The page was read from the newest end (no `after`): more are older.
    pub newest_first: bool,
}

/// A page of the rooms list, by name.
#[derive(Clone, Debug)]
pub struct RoomPage {
    pub rooms: Vec<RoomSummary>,
    pub truncated: bool,
}

/// An archive search (XMPP MAM with RSM paging).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ArchiveQuery {
    /// Messages after the one with this id.
    pub after_id: Option<String>,
    /// Messages before the one with this id; `Some("")`: the last page.
    pub before_id: Option<String>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    /// Only messages sent under this nick.
    pub nick: Option<String>,
    /// At most this many (default [`HISTORY_DEFAULT_LIMIT`], capped by `rooms.history_max_limit`).
    pub max: Option<u32>,
}

/// A page of an archive search, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchivePage {
    pub messages: Vec<ChatMessage>,
    /// No more messages in the direction asked for.
    pub complete: bool,
    /// How many messages match the search's filters, all pages together.
    pub count: u64,
}

/// A room's public facts.
#[derive(Clone, Debug)]
pub struct RoomFacts {
    pub public: bool,
    pub password_protected: bool,
    pub subject: String,
}

/// A join request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub re: RequestId,
    pub room: RoomAddr,
    pub nick: String,
    /// Replay messages after this seq.
    pub since: Option<u64>,
    pub password: Option<String>,
}

impl Gateway {
    /// Create a room owned by the session's user.
    pub async fn create(&self, session: &Arc<Session>, room: &RoomAddr, patch: &RoomConfigPatch) -> Outcome<()> {
        self.route(session, RoomOp::Create { room: room.clone(), patch: patch.clone() }).await.map(drop)
    }

    /// Enter a room. On success the room has queued `joined` and the replay on the session.
    pub async fn join(&self, session: &Arc<Session>, join: JoinRequest) -> Outcome<()> {
        self.route(session, RoomOp::Join(join)).await.map(drop)
    }

    /// Leave a room. On success the room has queued `left` on the session.
    pub async fn leave(&self, session: &Arc<Session>, re: RequestId, room: &RoomAddr) -> Outcome<()> {
        self.route(session, RoomOp::Leave { re, room: room.clone() }).await.map(drop)
    }

    /// Post a message. The room answers on the session after commit (an ack) or with an error.
    pub async fn send(&self, session: &Arc<Session>, re: RequestId, room: &RoomAddr, body: String, cid: ClientMsgId) -> Outcome<()> {
        self.route(session, RoomOp::Send { re, room: room.clone(), body, cid }).await.map(drop)
    }

    /// Read a room's history (members and occupants, as the room's config says).
    pub async fn history(&self, session: &Arc<Session>, room: &RoomAddr, query: HistoryQuery) -> Outcome<HistoryPage> {
        match self.route(session, RoomOp::History { room: room.clone(), query }).await? {
            Reply::History(page) => Ok(page),
            other => Err(mismatched(other)),
        }
    }

    pub async fn subject(&self, session: &Arc<Session>, room: &RoomAddr, subject: String) -> Outcome<()> {
        self.route(session, RoomOp::Subject { room: room.clone(), subject }).await.map(drop)
    }

    pub async fn configure(&self, session: &Arc<Session>, room: &RoomAddr, patch: RoomConfigPatch) -> Outcome<()> {
        self.route(session, RoomOp::Configure { room: room.clone(), patch }).await.map(drop)
    }

    pub async fn affiliate(&self, session: &Arc<Session>, room: &RoomAddr, target: String, affiliation: Affiliation) -> Outcome<()> {
        self.route(session, RoomOp::Affiliate { room: room.clone(), target, affiliation }).await.map(drop)
    }

    pub async fn kick(&self, session: &Arc<Session>, room: &RoomAddr, nick: String, reason: Option<String>) -> Outcome<()> {
        self.route(session, RoomOp::Kick { room: room.clone(), nick, reason }).await.map(drop)
    }

    pub async fn destroy(&self, session: &Arc<Session>, room: &RoomAddr, reason: Option<String>) -> Outcome<()> {
        self.route(session, RoomOp::Destroy { room: room.clone(), reason }).await.map(drop)
    }

    /// Search a room's archive (XMPP MAM over RSM): messages after or before one named by its
    /// unique id, within a time range, of one nick. Readers as for `history`.
    pub async fn archive(&self, session: &Arc<Session>, room: &RoomAddr, query: ArchiveQuery) -> Outcome<ArchivePage> {
        match self.route(session, RoomOp::Archive { room: room.clone(), query }).await? {
            Reply::Archive(page) => Ok(page),
            other => Err(mismatched(other)),
        }
    }

    /// The room's whole configuration and affiliations, for its owners and admins.
    pub async fn admin_view(&self, session: &Arc<Session>, room: &RoomAddr) -> Outcome<room::RoomAdminView> {
        match self.route(session, RoomOp::AdminView { room: room.clone() }).await? {
            Reply::AdminView(view) => Ok(view),
            other => Err(mismatched(other)),
        }
    }

    /// Serve `op` here, or on the node that hosts its room: a room this session already uses
    /// on another node goes straight over the link; a room of another group goes to the node
    /// serving that group's rooms now; a room of this group found to be hosted by the peer is
    /// forwarded; a room whose host cannot serve it now waits for this node to take it over,
    /// and is tried again.
    async fn route(&self, session: &Arc<Session>, op: RoomOp) -> Outcome<Reply> {
        let Some(remote) = self.forwarder() else { return self.serve(session, op).await };
        if session.uses_other_nodes() {
            // A post for a room being followed waits for the room, not the connection.
            if remote.hold_post(session.id, &op) {
                return Ok(Reply::Done);
            }
            if let Some(node) = remote.forwarded_to(session.id, op.room()).await {
                return remote.request(session, &node, op).await;
            }
        }
        let service = op.room().service();
        if !self.settings.is_group_service(service) && self.settings.is_room_service(service) {
            return self.route_to_group(remote.as_ref(), session, op).await;
        }
        // A room of the peer's service is created by the peer while it serves its rooms, so a
        // room's service names its home node (what other groups route by).
        if let RoomOp::Create { room, .. } = &op
            && let Some(peer) = self.settings.peer().filter(|p| p.service == room.service())
        {
            let peer = NodeId(peer.id.clone());
            if remote.can_forward(&peer) {
                return remote.request(session, &peer, op).await;
            }
        }
        // Kept for a second try, except a post: its room must be joined first, here or (above)
        // on the host, so it never learns of the host from its own failure.
        let again = (!matches!(op, RoomOp::Send { .. })).then(|| op.clone());
        let result = self.serve(session, op).await;
        let (Err(Failure { hosted_by: Some(host), .. }), Some(op)) = (&result, again) else { return result };
        if remote.can_forward(host) {
            return remote.request(session, host, op).await;
        }
        // The host looks down: rather than have every client of it retry, wait.
        if remote.await_takeover(host).await {
            return self.serve(session, op).await;
        }
        result
    }

    /// Enter again a room of another group that moved to its group's other node (the node
    /// link's follow-up of a takeover there): joined where the group serves it now.
    pub async fn follow(&self, session: &Arc<Session>, join: JoinRequest) -> Outcome<()> {
        let Some(remote) = self.forwarder() else { return fail(ErrorCode::Unavailable, "this node forwards nothing") };
        self.route_to_group(remote.as_ref(), session, RoomOp::Join(join)).await.map(drop)
    }

    /// Serve `op` on a room of another group: at the node its heartbeats name as serving the
    /// room's service (after waiting a bounded time for one, during a takeover there); if that
    /// node answers that the other node of its group hosts the room now (the view was a
    /// heartbeat old), there, once.
    async fn route_to_group(&self, remote: &dyn Remote, session: &Arc<Session>, op: RoomOp) -> Outcome<Reply> {
        self.check_room(op.room())?;
        let service = op.room().service().to_owned();
        let Some(node) = remote.locate(&service).await else {
            return fail(ErrorCode::Unavailable, format!("no node serves the rooms of {service} now (its group is down or cut off from this node); retry later"));
        };
        let again = op.clone();
        let result = remote.request(session, &node, op).await;
        match &result {
            Err(Failure { hosted_by: Some(host), .. }) if *host != node && remote.can_forward(host) => remote.request(session, host, again).await,
            _ => result,
        }
    }

    /// Serve `op` on this node, never forwarding it: the node link's requests from other nodes
    /// come here (a room that moved meanwhile gets its `hosted_by` failure, not a loop). A
    /// room of the peer waits first while this node is taking the peer's rooms over.
    pub async fn serve(&self, session: &Arc<Session>, op: RoomOp) -> Outcome<Reply> {
        self.await_peer_takeover(op.room()).await;
        match op {
            RoomOp::Create { room, patch } => self.create_here(session, &room, &patch).await.map(|()| Reply::Done),
            RoomOp::Join(join) => self.join_here(session, join).await.map(|()| Reply::Done),
            RoomOp::Leave { re, room } => self.leave_here(session, re, &room).await.map(|()| Reply::Done),
            RoomOp::Send { re, room, body, cid } => self.send_here(session, re, &room, body, cid).await.map(|()| Reply::Done),
            RoomOp::History { room, query } => self.history_here(session, &room, query).await.map(Reply::History),
            RoomOp::Subject { room, subject } => self.subject_here(session, &room, subject).await.map(|()| Reply::Done),
            RoomOp::Configure { room, patch } => self.configure_here(session, &room, patch).await.map(|()| Reply::Done),
            RoomOp::Affiliate { room, target, affiliation } => {
                self.affiliate_here(session, &room, target, affiliation).await.map(|()| Reply::Done)
            }
            RoomOp::Kick { room, nick, reason } => self.kick_here(session, &room, nick, reason).await.map(|()| Reply::Done),
            RoomOp::Destroy { room, reason } => self.destroy_here(session, &room, reason).await.map(|()| Reply::Done),
            RoomOp::Archive { room, query } => self.archive_here(session, &room, query).await.map(Reply::Archive),
            RoomOp::AdminView { room } => self.admin_view_here(session, &room).await.map(Reply::AdminView),
        }
    }

    /// A room of the peer while this node fences the peer's rooms: wait for the takeover
    /// rather than read who hosts the room (the peer, until the fence commits). Every client of
    /// the peer resumes here at that moment, and every other group's node following the peer's
    /// rooms sends their joins here: answered "hosted by the peer", each would be retried
    /// until the fence commits, and each try reads the store the fence is writing.
    async fn await_peer_takeover(&self, room: &RoomAddr) {
        let Some(remote) = self.forwarder() else { return };
        if remote.taking_over()
            && let Some(peer) = self.settings.peer().filter(|p| p.service == room.service())
        {
            remote.await_takeover(&NodeId(peer.id.clone())).await;
        }
    }

    // --- operations -------------------------------------------------------------------------


    /// Create a room owned by the session's user.
    async fn create_here(&self, session: &Session, room: &RoomAddr, patch: &RoomConfigPatch) -> Outcome<()> {
        self.check_room(room)?;
        self.check_config(patch)?;
        let user = &session.user;
        // Guests have a new name per login: the address's budget is what holds them.
        if let Err(t) = self.room_creations.check(Some(user), session.address, Instant::now()) {
            return Err(Self::throttled(t, "rooms created"));
        }
        let config = RoomConfig::default().patched(patch);
        self.registry.create(room, &config, user).await?;
        self.room_creations.spend(Some(user), session.address, Instant::now());
        tracing::info!(room = %room, owner = %user, "room created");
        self.registry.room_created(!self.settings.plugins.enabled.is_empty(), room, &config).await;
        Ok(())
    }

    /// Enter a room. On success the room has queued `joined` and the replay on the session.
    async fn join_here(&self, session: &Arc<Session>, join: JoinRequest) -> Outcome<()> {
        let JoinRequest { re, room, nick, since, password } = join;
        self.check_room(&room)?;
        self.check_nick(&nick)?;
        check_seq("since", since)?;
        let max = self.settings.limits.max_rooms_per_connection;
        if !session.occupies(&room) && session.room_count() >= max {
            return fail(ErrorCode::TooLarge, format!("a connection may occupy at most {max} rooms"));
        }
        let check = room::plugin::PluginChain { session: session.id, user: session.user.clone(), nick: nick.clone(), password: password.clone() };
        self.registry.check_join(&room, check).await?;
        let join = room::Join { session: session.clone(), re, nick, since, password };
        self.registry.call(&room, join).await.and_then(|r| r)?;
        Ok(())
    }

    /// Leave a room. On success the room has queued `left` on the session.
    async fn leave_here(&self, session: &Session, re: RequestId, room: &RoomAddr) -> Outcome<()> {
        self.check_room(room)?;
        let addr = self.occupied(session, room, "not in this room", "room unavailable; retry")?;
        addr.send(room::Leave { session: session.id, re: Some(re) })
            .await
            .map_err(|_| Failure::new(ErrorCode::Unavailable, "room unavailable; retry"))??;
        Ok(())
    }

    /// Post a message. The room answers on the session after commit (an ack) or with an error.
    async fn send_here(&self, session: &Arc<Session>, re: RequestId, room: &RoomAddr, body: String, cid: ClientMsgId) -> Outcome<()> {
        self.check_room(room)?;
        let limits = &self.settings.limits;
        if body.len() > limits.max_body_bytes {
            return fail(ErrorCode::TooLarge, format!("body is over {} bytes", limits.max_body_bytes));
        }
        if body.is_empty() {
            return fail(ErrorCode::BadRequest, "body is empty");
        }
        if cid.0.is_empty() || cid.0.chars().count() > limits.max_cid_chars {
            return fail(ErrorCode::BadRequest, format!("cid must be 1 to {} characters", limits.max_cid_chars));
        }
        let addr = self.occupied(session, room, "join the room first", "room unavailable; retry with the same cid")?;
        let post = room::Post { session: session.clone(), re, body, client_msg_id: cid.0 };
        // Only a full mailbox waits (backpressure); the room answers the post on the session.
        let unavailable = || Failure::new(ErrorCode::Unavailable, "room unavailable; retry with the same cid");
        match addr.try_send(post) {
            Ok(()) => Ok(()),
            Err(actix::dev::SendError::Full(post)) => addr.send(post).await.map_err(|_| unavailable()),
            Err(actix::dev::SendError::Closed(_)) => Err(unavailable()),
        }
    }

    /// Read a room's history (members and occupants, as the room's config says).
    async fn history_here(&self, session: &Session, room: &RoomAddr, query: HistoryQuery) -> Outcome<HistoryPage> {
        self.check_room(room)?;
        let HistoryQuery { before, after, limit } = query;
        check_seq("before", before)?;
        check_seq("after", after)?;
        let limit = limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
        if limit == 0 {
            return fail(ErrorCode::BadRequest, "limit must be at least 1");
        }
        let limit = limit.min(self.settings.rooms.history_max_limit) as u64;
        let room_id = self.registry.call(room, room::CheckRead { session: session.id, user: session.user.clone() }).await.and_then(|r| r)?;
        // Without `after`, the newest `limit` before `before`; with it, the oldest after.
        let newest_first = after.is_none();
        let mut rows = self
            .store
            .messages(room_id, after.unwrap_or(0), before, limit + 1, newest_first)
            .await
            .map_err(|e| Failure::from(RoomError::from(e)))?;
        let truncated = rows.len() as u64 > limit;
        if truncated {
            if newest_first {
                rows.remove(0);
            } else {
                rows.pop();
            }
        }
        let messages = rows
            .into_iter()
            .map(|m| ChatMessage { room: room.clone(), seq: m.seq, id: m.id, from: m.sender, nick: m.nick, body: m.body, cid: m.client_msg_id, ts: m.created_at })
            .collect();
        Ok(HistoryPage { messages, truncated, newest_first })
    }

    async fn subject_here(&self, session: &Session, room: &RoomAddr, subject: String) -> Outcome<()> {
        self.check_room(room)?;
        self.check_text("subject", &subject)?;
        let msg = room::SetSubject { session: session.id, user: session.user.clone(), subject };
        self.registry.call(room, msg).await.and_then(|r| r)?;
        Ok(())
    }

    async fn configure_here(&self, session: &Session, room: &RoomAddr, patch: RoomConfigPatch) -> Outcome<()> {
        self.check_room(room)?;
        self.check_config(&patch)?;
        self.registry.call(room, room::Configure { user: session.user.clone(), patch }).await.and_then(|r| r)?;
        Ok(())
    }

    async fn affiliate_here(&self, session: &Session, room: &RoomAddr, target: String, affiliation: Affiliation) -> Outcome<()> {
        self.check_room(room)?;
        crate::auth::validate_user_ref(&target).map_err(|e| Failure::new(ErrorCode::BadRequest, e.to_string()))?;
        let msg = room::Affiliate { user: session.user.clone(), target, affiliation };
        self.registry.call(room, msg).await.and_then(|r| r)?;
        Ok(())
    }

    async fn kick_here(&self, session: &Session, room: &RoomAddr, nick: String, reason: Option<String>) -> Outcome<()> {
        self.check_room(room)?;
        if let Some(r) = &reason {
            self.check_text("reason", r)?;
        }
        self.registry.call(room, room::Kick { user: session.user.clone(), nick, reason }).await.and_then(|r| r)?;
        Ok(())
    }

    async fn destroy_here(&self, session: &Session, room: &RoomAddr, reason: Option<String>) -> Outcome<()> {
        self.check_room(room)?;
        if let Some(r) = &reason {
            self.check_text("reason", r)?;
        }
        self.registry.call(room, room::Destroy { user: session.user.clone(), reason }).await.and_then(|r| r)?;
        tracing::info!(room = %room, "room destroyed");
        Ok(())
    }

    /// Search a room's archive (XMPP MAM over RSM): messages after or before one named by its
    /// unique id, within a time range, of one nick. Readers as for `history`.
    async fn archive_here(&self, session: &Session, room: &RoomAddr, query: ArchiveQuery) -> Outcome<ArchivePage> {
        self.check_room(room)?;
        let room_id = self.registry.call(room, room::CheckRead { session: session.id, user: session.user.clone() }).await.and_then(|r| r)?;
        let store_err = |e: crate::store::StoreError| Failure::from(RoomError::from(e));
        let seq_of = async |id: &str| match self.store.message_seq(room_id, id).await.map_err(store_err)? {
            Some(seq) => Ok(seq),
            None => fail(ErrorCode::NotFound, format!("no message `{id}` in this room")),
        };
        let after = match &query.after_id {
            Some(id) => seq_of(id).await?,
            None => 0,
        };
        let before = match query.before_id.as_deref() {
            Some("") | None => None,
            Some(id) => Some(seq_of(id).await?),
        };
        // Paging backwards (`before`, even empty: the last page) takes the newest first.
        let newest_first = query.before_id.is_some();
        let limit = query.max.unwrap_or(HISTORY_DEFAULT_LIMIT).min(self.settings.rooms.history_max_limit) as u64;
        let range = crate::store::ArchiveRange { after, before, start_ms: query.start_ms, end_ms: query.end_ms, nick: query.nick };
        let (mut rows, count) = self.store.archive(room_id, &range, limit + 1, newest_first).await.map_err(store_err)?;
        let complete = rows.len() as u64 <= limit;
        if !complete {
            if newest_first {
                rows.remove(0);
            } else {
                rows.pop();
            }
        }
        let messages = rows
            .into_iter()
            .map(|m| ChatMessage { room: room.clone(), seq: m.seq, id: m.id, from: m.sender, nick: m.nick, body: m.body, cid: m.client_msg_id, ts: m.created_at })
            .collect();
        Ok(ArchivePage { messages, complete, count })
    }

    /// The room's whole configuration and affiliations, for its owners and admins.
    async fn admin_view_here(&self, session: &Session, room: &RoomAddr) -> Outcome<room::RoomAdminView> {
        self.check_room(room)?;
        Ok(self.registry.call(room, room::AdminView { user: session.user.clone() }).await.and_then(|r| r)?)
    }

    /// What anyone may know of a room without joining it (XMPP disco#info): whether it is
    /// public (not members-only) and password-protected, and its subject.
    pub async fn describe(&self, room: &RoomAddr) -> Outcome<RoomFacts> {
        self.check_room(room)?;
        let row = self.store.load_room(room).await.map_err(|e| Failure::from(RoomError::from(e)))?;
        let Some(row) = row else { return fail(ErrorCode::NotFound, "no such room") };
        let c = row.config;
        Ok(RoomFacts { public: c.public, password_protected: c.password.is_some(), subject: c.subject })
    }

    /// The rooms the session's user may see, by name after `after`.
    pub async fn list(&self, session: &Session, after: Option<&RoomAddr>, limit: Option<u32>) -> Outcome<RoomPage> {
        let limit = match limit {
            Some(0) => return fail(ErrorCode::BadRequest, "limit must be at least 1"),
            Some(l) => u64::from(l).min(LIST_MAX_ROOMS),
            None => LIST_MAX_ROOMS,
        };
        let mut rooms = self
            .store
            .list_rooms_for(&session.user, after.map(|a| a.0.as_str()), limit + 1)
            .await
            .map_err(|e| Failure::from(RoomError::from(e)))?;
        let truncated = rooms.len() as u64 > limit;
        rooms.truncate(limit as usize);
        Ok(RoomPage { rooms, truncated })
    }
}

/// A reply of the wrong kind for its request (a peer of another version, say).
fn mismatched(reply: Reply) -> Failure {
    tracing::error!(?reply, "a reply of the wrong kind for its request");
    Failure::new(ErrorCode::Internal, "internal error")
}

/// Sequence numbers are stored as signed 64-bit integers: larger cursors are refused rather
/// than wrapped.
fn check_seq(what: &str, seq: Option<u64>) -> Outcome<()> {
    match seq {
        Some(s) if s > i64::MAX as u64 => fail(ErrorCode::BadRequest, format!("{what} is at most {}", i64::MAX)),
        _ => Ok(()),
    }
}
