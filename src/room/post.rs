//! The write path of a room: a post is queued, handed to the group committer as part of an
//! append (at most two in flight), and only after the commit acked and fanned out; a failed or
//! fenced commit acks nobody. The plugin hooks that may rewrite or refuse a post first are in
//! [`super::plugin`].

use super::*;

impl Room {
    /// The event of a committed message (its strings move into it).
    fn message_event(&self, seq: u64, m: NewMessage, ts: i64) -> Arc<Delivery> {
        Delivery::new(RoomEvent::Message(ChatMessage {
            room: self.addr.clone(),
            seq,
            id: m.id,
            from: m.sender,
            nick: m.nick,
            body: m.body,
            cid: m.client_msg_id,
            ts,
        }))
    }

    pub(super) fn stored_event(&self, m: &StoredMessage) -> Arc<Delivery> {
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

    /// Give a message its time and its id as it goes to the committer, in log order: the time
    /// is the room's clock, which never goes back, so a later seq never has an earlier time;
    /// the id carries that time ([`crate::ids::message_id`]), which is how the store finds a
    /// message by id without an index. A post sent again after a `Stale` answer is stamped
    /// again (nothing of it was stored).
    fn stamp(&mut self, message: &mut NewMessage) {
        self.clock = self.clock.max(now_ms());
        message.created_at = self.clock;
        message.id = crate::ids::message_id(self.clock);
    }

    /// Run [`Room::flush`] once the room has handled the messages and plugin decisions ready now,
    /// so that posts arriving together go to the committer as one append. Flushing at each
    /// post made the first post after an answer an append of its own whenever a pipeline slot
    /// was free, and the posts behind it waited for the next slot.
    pub(super) fn flush_soon(&mut self, ctx: &mut Context<Self>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.spawn(actix::fut::ready(()).map(|(), room: &mut Room, ctx| {
                room.flush_scheduled = false;
                room.flush(ctx);
            }));
        }
    }

    /// Hand queued posts to the committer, up to [`PIPELINE_DEPTH`] appends in flight. Each
    /// append assumes the previous ones will commit in full (`next_base`); the store checks
    /// that assumption (`last_seq = base_seq`), so a wrong guess comes back as `Stale`.
    pub(super) fn flush(&mut self, ctx: &mut Context<Self>) {
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
            let mut posts: Vec<PendingPost> = self.queue.drain(..take).collect();
            for post in &mut posts {
                self.stamp(&mut post.message);
            }
            let request = AppendRequest {
                fence: self.fence.clone(),
                base_seq: self.next_base,
                messages: posts.iter().map(|p| p.message.clone()).collect(),
                maybe_resent: posts.iter().any(|p| p.maybe_resent),
            };
            self.next_base += posts.len() as u64;
            let ticket = self.in_flight.submit(posts);
            let answer = self.deps.committer.submit(request);
            ctx.spawn(answer.into_actor(self).map(move |result, room, ctx| room.answered(ticket, result, ctx)));
        }
    }

    /// The committer's answer to append `ticket`: applied once every older append's answer has
    /// been (actix may poll the answers' futures newest first; see `room::pipeline`).
    pub(super) fn answered(&mut self, ticket: u64, result: Result<Appended, CommitError>, ctx: &mut Context<Self>) {
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
        if self.in_flight.is_empty()
            && self.queue.is_empty()
            && self.hooks.len() == 0
            && let Some(cids) = &mut self.cids
        {
            cids.clear_pending();
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
                    self.cids().answered(post.cid);
                    for (session, re) in &post.waiters {
                        session.answer(RoomAnswer::Ack {
                            re: re.clone(),
                            room: self.addr.clone(),
                            seq: outcome.seq,
                            ts: outcome.created_at,
                            duplicate: outcome.duplicate,
                        });
                    }
                    if post.maybe_resent && !outcome.duplicate {
                        // Stored as new: what its sessions send after it in this room is new
                        // too (a room's posts are stored in order, so a resend stored by the
                        // failed node came before it).
                        for (session, _) in &post.waiters {
                            if let Some(o) = self.state.occupants.get_mut(&session.id()) {
                                o.resumed = false;
                            }
                        }
                    }
                    if deliver {
                        self.cids().remember(post.cid, outcome.seq, outcome.created_at);
                        if !outcome.duplicate {
                            let event = self.message_event(outcome.seq, post.message, outcome.created_at);
                            self.broadcast(&event);
                            self.remember(outcome.seq, event);
                        }
                    }
                }
                if deliver {
                    self.last_seq = appended.last_seq;
                    // Resent posts already stored take no seq: with nothing else in flight,
                    // the next append goes on from where this one left the log.
                    if self.in_flight.is_empty() {
                        self.next_base = self.last_seq;
                    }
                }
            }
            Err(CommitError::Append(AppendError::Stale { last_seq })) => {
                // Nothing of this append was written: back in the queue, ahead of every post
                // that was never sent, behind the ones requeued before it.
                let n = posts.len();
                for (i, p) in posts.into_iter().enumerate() {
                    self.queue.insert(self.requeued + i, p);
                }
                self.requeued += n;
                if last_seq == self.last_seq && self.in_flight.is_empty() && !self.needs_resync {
                    // The log ends where this room knows it does (the row is under this
                    // room's fence, so nobody else wrote it): the append before this one
                    // stored fewer messages than this one assumed (resends stored already).
                    // Nothing to read; send again from there.
                    tracing::debug!(room = %self.addr, last_seq, "append behind a shorter one; sent again");
                    self.next_base = last_seq;
                } else {
                    tracing::info!(room = %self.addr, known = self.last_seq, stored = last_seq, "room log moved on; resyncing");
                    self.needs_resync = true;
                }
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

    pub(super) fn fail_posts(&self, posts: Vec<PendingPost>, code: ErrorCode, message: &str) {
        for post in posts {
            for (session, re) in post.waiters {
                session.answer(RoomAnswer::Error { re: Some(re), room: self.addr.clone(), code, message: message.into() });
            }
        }
    }

    /// Answer every post in flight or queued with an error (the room is stopping).
    pub(super) fn fail_all(&mut self, code: ErrorCode, message: &str) {
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
                        let cids = room.cids();
                        cids.remember(cids.key(&m.sender, &m.client_msg_id), m.seq, m.created_at);
                    }
                    room.last_seq = row.last_seq;
                    room.clock = room.clock.max(row.last_ts);
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
}

/// An occupant posts a message. The ack (after commit) or the error goes to the occupant's
/// answers: the sender does not wait for the room to take the post, which spares a
/// connection a round trip (and a thread crossing) per message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Post {
    pub session: Arc<dyn Occupant>,
    pub re: RequestId,
    pub body: String,
    pub client_msg_id: String,
}

impl Handler<Post> for Room {
    type Result = ();

    fn handle(&mut self, msg: Post, ctx: &mut Context<Self>) {
        let Post { session, re, body, client_msg_id } = msg;
        if let Err(e) = self.post(&session, re.clone(), body, client_msg_id, ctx) {
            session.answer(RoomAnswer::Error { re: Some(re), room: self.addr.clone(), code: e.code(), message: e.client_message() });
        }
    }
}

impl Room {
    fn post(&mut self, sender: &Arc<dyn Occupant>, re: RequestId, body: String, client_msg_id: String, ctx: &mut Context<Self>) -> Result<(), RoomError> {
        self.check_alive()?;
        // The room's own entry: a session that left meanwhile is refused.
        let session = self.occupant(sender.id())?.clone();
        let user = session.user().to_owned();
        let (nick, maybe_resent) = self.state.occupants.get(&session.id()).map(|o| (o.nick.clone(), o.resumed)).unwrap_or_default();
        self.touch();
        let cids = self.cids();
        let cid = cids.key(&user, &client_msg_id);
        if let Some((seq, ts)) = cids.committed(cid) {
            session.answer(RoomAnswer::Ack { re, room: self.addr.clone(), seq, ts, duplicate: true });
            return Ok(());
        }
        if !cids.add_pending(cid) {
            let mut pending = self.in_flight.iter_mut().flatten().chain(self.queue.iter_mut()).chain(self.hooks.posts_mut());
            if let Some(p) = pending.find(|p| p.message.sender == user && p.message.client_msg_id == client_msg_id) {
                // A resend of a post not yet committed: answer both with the one commit.
                p.waiters.push((session, re));
                return Ok(());
            }
        }
        let post = PendingPost {
            message: NewMessage::unstamped(user, nick, body, client_msg_id),
            cid,
            waiters: vec![(session, re)],
            maybe_resent,
        };
        self.enqueue_post(post, false, ctx);
        Ok(())
    }
}
