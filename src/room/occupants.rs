//! Who is in a room: joins (admission, `joined` and the replay from the cache or the store),
//! leaves, and the read check history requests make.

use super::*;

impl Room {
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
    /// A join that has seen the whole log (a resume with `since` at the room's last seq, the
    /// common case after a failover) needs neither, even in a room activated a moment ago.
    fn replay_from_cache(&self, since: Option<u64>) -> Option<(Vec<Arc<Delivery>>, bool)> {
        let from = match since {
            Some(since) => since.saturating_add(1),
            None => self.last_seq.saturating_sub(self.state.config.history_on_join as u64) + 1,
        };
        if from > self.last_seq {
            return Some((Vec::new(), false));
        }
        let recent = self.recent.as_ref()?;
        let oldest_cached = recent.front().map_or(self.last_seq + 1, |r| r.seq);
        if from < oldest_cached && oldest_cached != 1 {
            return None;
        }
        let events = recent.iter().filter(|r| r.seq >= from).map(|r| r.event.clone());
        Some(match since {
            None => (events.collect(), false),
            Some(_) => {
                let limit = self.deps.limits.join_replay_limit as usize;
                let mut replay: Vec<Arc<Delivery>> = events.take(limit.saturating_add(1)).collect();
                let truncated = replay.len() > limit;
                replay.truncate(limit);
                (replay, truncated)
            }
        })
    }

    /// `resumed`: the join came with `since` (see [`OccupantState::resumed`]).
    fn admit(&mut self, session: Arc<dyn Occupant>, nick: String, resumed: bool) {
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
        let mut occupant = OccupantState::new(session.user().to_owned(), nick);
        occupant.resumed = resumed;
        self.state.occupants.insert(session.id(), occupant);
        session.entered(&self.addr);
        self.occupants.insert(session.id(), session);
        self.touch();
    }

    pub(super) fn remove_occupant(&mut self, session_id: SessionId, status: &str, reason: Option<String>) {
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
            self.admit(msg.session.clone(), msg.nick.clone(), msg.since.is_some());
            self.send_join_replay(&*msg.session, msg.re, msg.nick, aff, replay, truncated);
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        }
        // Not cached: read the replay (and warm the cache) while holding the room's mailbox,
        // so no live message can slip between the replay and the admission. The log position
        // is taken inside the wait, not here: between this handler and the wait's first poll,
        // actix still polls the room's spawned futures once, and an append's answer applied
        // there would move the log past a position taken now.
        metrics::counter!("stoa_join_store_reads_total").increment(1);
        let since = msg.since;
        let load = fut::ready(()).then(move |(), room: &mut Room, _ctx| {
            let store = room.deps.store.clone();
            let id = room.fence.room;
            let last = room.last_seq;
            let cache = room.deps.limits.recent_cache as u64;
            let limit = room.deps.limits.join_replay_limit as u64;
            let want_tail = (room.state.config.history_on_join as u64).max(cache);
            let read = room.on_io(async move {
                let tail = store.messages(id, last.saturating_sub(want_tail), Some(last + 1), want_tail, true).await?;
                let replay = match since {
                    Some(since) if since < last.saturating_sub(want_tail) => {
                        Some(store.messages(id, since, Some(last + 1), limit + 1, false).await?)
                    }
                    _ => None,
                };
                Ok((tail, replay, last, limit))
            });
            read.into_actor(room)
        });
        AtomicResponse::new(Box::pin(load.map(move |result, room, _ctx| {
            let (tail, replay, last, limit) = result?;
            room.check_alive()?;
            if room.last_seq != last {
                // Cannot happen: nothing of the room runs while the wait holds it; but a
                // replay built on a moved log would have a gap.
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
            room.admit(msg.session.clone(), msg.nick.clone(), since.is_some());
            room.send_join_replay(&*msg.session, msg.re, msg.nick, aff, events, truncated);
            Ok(())
        })))
    }
}

/// A session leaves the room (`re` is `None` when the connection closed).
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Leave {
    pub session: SessionId,
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

/// May this user read the room's history? Answers the room's id and log position.
#[derive(Message, Clone)]
#[rtype(result = "Result<crate::ids::RoomId, RoomError>")]
pub struct CheckRead {
    pub session: SessionId,
    pub user: String,
}

impl Handler<CheckRead> for Room {
    type Result = Result<crate::ids::RoomId, RoomError>;

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
