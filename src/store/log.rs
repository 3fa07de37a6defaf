//! A room's log: the fenced group-commit append (`append_batch`: many rooms' messages in one
//! transaction, each room's part written only if its fence and base seq still match), reads
//! by seq, and the archive queries of XMPP MAM.

use super::*;

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    /// The message's unique id (XMPP's stanza-id and MAM id).
    pub id: String,
    pub sender: String,
    pub nick: String,
    pub body: String,
    pub client_msg_id: String,
    pub created_at: i64,
}

impl From<message::Model> for StoredMessage {
    fn from(m: message::Model) -> Self {
        StoredMessage { seq: m.seq as u64, id: m.id, sender: m.sender, nick: m.nick, body: m.body, client_msg_id: m.client_msg_id, created_at: m.created_at }
    }
}

/// Which messages of a room an archive query (XMPP MAM) asks for.
#[derive(Clone, Debug, Default)]
pub struct ArchiveRange {
    /// Only seqs above this (0: from the first).
    pub after: u64,
    /// Only seqs below this.
    pub before: Option<u64>,
    /// Only messages committed at or after this time (Unix ms).
    pub start_ms: Option<i64>,
    /// Only messages committed at or before this time (Unix ms).
    pub end_ms: Option<i64>,
    /// Only messages sent under this nick.
    pub nick: Option<String>,
}

/// A message a room actor wants appended; the store assigns its seq.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// A unique id (a UUIDv7 the room makes): XMPP's stanza-id, kept with the message.
    pub id: String,
    pub sender: String,
    pub nick: String,
    pub body: String,
    pub client_msg_id: String,
    pub created_at: i64,
}

/// One room's appends in a group commit: written only if the room row still matches
/// `fence` and `base_seq` (the last seq the actor knows).
#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub fence: Fence,
    pub base_seq: u64,
    pub messages: Vec<NewMessage>,
}

/// What became of one message of an [`AppendRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageOutcome {
    pub seq: u64,
    pub created_at: i64,
    /// The `(room, sender, cid)` was already stored: `seq` is the original one.
    pub duplicate: bool,
}

/// A committed [`AppendRequest`]: one outcome per message, in order, and the room's new last seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub outcomes: Vec<MessageOutcome>,
    pub last_seq: u64,
}

/// Why one room's part of a group commit was not written (the rest of the batch was).
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another node (or a newer epoch) hosts the room now.
    #[error("room is fenced: hosted by {host} at epoch {epoch}")]
    Fenced { host: String, epoch: i64 },
    /// The room's log is ahead of what the actor knew; it must resync from `last_seq`.
    #[error("room log moved on to seq {last_seq}")]
    Stale { last_seq: u64 },
    /// The room row is gone (destroyed).
    #[error("room no longer exists")]
    Gone,
}

/// Most rows in one INSERT: keeps every backend under its bind-parameter limit.
const INSERT_CHUNK_ROWS: usize = 500;

impl Store {
    /// Messages of a room with `after < seq < before`, ascending, at most `limit`. With
    /// `newest_first` the *last* `limit` of that range are returned (still ascending).
    pub async fn messages(
        &self,
        room: RoomId,
        after: u64,
        before: Option<u64>,
        limit: u64,
        newest_first: bool,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut q = message::Entity::find()
            .filter(message::Column::RoomId.eq(room.0))
            .filter(message::Column::Seq.gt(after as i64));
        if let Some(before) = before {
            q = q.filter(message::Column::Seq.lt(before as i64));
        }
        q = if newest_first {
            q.order_by_desc(message::Column::Seq)
        } else {
            q.order_by_asc(message::Column::Seq)
        };
        let mut rows: Vec<StoredMessage> = q
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(StoredMessage::from)
            .collect();
        if newest_first {
            rows.reverse();
        }
        Ok(rows)
    }

    /// The seq of the message whose unique id is `id` in `room`, if it is there.
    pub async fn message_seq(&self, room: RoomId, id: &str) -> Result<Option<u64>, StoreError> {
        let row = message::Entity::find()
            .filter(message::Column::RoomId.eq(room.0))
            .filter(message::Column::Id.eq(id))
            .one(&self.db)
            .await?;
        Ok(row.map(|m| m.seq as u64))
    }

    /// Messages of `room` in `range` (seq after/before, time from/until, one nick): at most
    /// `limit`, from the oldest, or from the newest when `newest_first`; ascending either way.
    /// And how many messages the range holds, ignoring its seq bounds (a MAM result's count).
    pub async fn archive(&self, room: RoomId, range: &ArchiveRange, limit: u64, newest_first: bool) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        let filtered = || {
            let mut q = message::Entity::find().filter(message::Column::RoomId.eq(room.0));
            if let Some(t) = range.start_ms {
                q = q.filter(message::Column::CreatedAt.gte(t));
            }
            if let Some(t) = range.end_ms {
                q = q.filter(message::Column::CreatedAt.lte(t));
            }
            if let Some(nick) = &range.nick {
                q = q.filter(message::Column::Nick.eq(nick.as_str()));
            }
            q
        };
        let count = sea_orm::PaginatorTrait::count(filtered(), &self.db).await?;
        let mut q = filtered().filter(message::Column::Seq.gt(range.after as i64));
        if let Some(before) = range.before {
            q = q.filter(message::Column::Seq.lt(before as i64));
        }
        q = if newest_first { q.order_by_desc(message::Column::Seq) } else { q.order_by_asc(message::Column::Seq) };
        let mut rows: Vec<StoredMessage> = q.limit(limit).all(&self.db).await?.into_iter().map(StoredMessage::from).collect();
        if newest_first {
            rows.reverse();
        }
        Ok((rows, count))
    }

    /// One group commit: every request's messages in one transaction. Each room's part is
    /// written only if its row still matches its fence and `base_seq`; the others are answered
    /// with an [`AppendError`] and the rest still commit. Messages whose `(room, sender, cid)`
    /// is already stored are answered with the original seq and not stored again.
    ///
    /// `Err` means the whole transaction failed (and nothing of it is visible).
    pub async fn append_batch(&self, requests: &[AppendRequest]) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        match self.try_append(requests, false).await {
            // A unique violation means some cid is already stored (a resend the room actor had
            // no memory of, e.g. after a restart): redo the batch looking every cid up first.
            Err(StoreError::Conflict) => self.try_append(requests, true).await,
            other => other,
        }
    }

    async fn try_append(
        &self,
        requests: &[AppendRequest],
        check_duplicates: bool,
    ) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let txn = self.begin_write().await?;
        match self.append_in(&txn, requests, check_duplicates).await {
            Ok(answers) => {
                txn.commit().await?;
                Ok(answers)
            }
            Err(e) => {
                // Roll back now, not lazily on the connection's next use: on SQLite the failed
                // transaction would otherwise keep the write lock from the retry.
                let _ = txn.rollback().await;
                Err(e)
            }
        }
    }

    /// Start a transaction that will write. On SQLite it takes the write lock at BEGIN
    /// (`BEGIN IMMEDIATE`), so it waits for the lock (busy timeout) instead of failing when a
    /// read snapshot cannot be upgraded.
    pub(super) async fn begin_write(&self) -> Result<sea_orm::DatabaseTransaction, StoreError> {
        if self.kind == StoreKind::Sqlite {
            let options = sea_orm::TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            };
            Ok(self.db.begin_with_options(options).await?)
        } else {
            Ok(self.db.begin().await?)
        }
    }

    async fn append_in(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        requests: &[AppendRequest],
        check_duplicates: bool,
    ) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {

        // Plan: which messages of each request are new, and the seq each one gets.
        let mut plans: Vec<Vec<MessageOutcome>> = Vec::with_capacity(requests.len());
        for req in requests {
            let existing = if check_duplicates { self.stored_cids(txn, req).await? } else { HashMap::new() };
            let mut next = req.base_seq;
            let mut seen_in_request: HashMap<(&str, &str), MessageOutcome> = HashMap::new();
            let mut plan = Vec::with_capacity(req.messages.len());
            for m in &req.messages {
                let outcome = if let Some(o) = existing.get(&(m.sender.clone(), m.client_msg_id.clone())) {
                    *o
                } else if let Some(o) = seen_in_request
                    .get(&(m.sender.as_str(), m.client_msg_id.as_str()))
                    .filter(|_| check_duplicates)
                {
                    MessageOutcome { duplicate: true, ..*o }
                } else {
                    next += 1;
                    let o = MessageOutcome { seq: next, created_at: m.created_at, duplicate: false };
                    seen_in_request.insert((m.sender.as_str(), m.client_msg_id.as_str()), o);
                    o
                };
                plan.push(outcome);
            }
            plans.push(plan);
        }

        // Fence + advance last_seq for every room that has new rows, in one statement.
        let writing: Vec<usize> = (0..requests.len())
            .filter(|&i| plans[i].iter().any(|o| !o.duplicate))
            .collect();
        let mut rejected: HashMap<usize, AppendError> = HashMap::new();
        if !writing.is_empty() {
            let new_last: HashMap<usize, u64> = writing.iter().map(|&i| (i, last_new_seq(&plans[i], requests[i].base_seq))).collect();
            let mut case = CaseStatement::new();
            let mut any = Cond::any();
            for &i in &writing {
                let r = &requests[i];
                case = case.case(room::Column::Id.eq(r.fence.room.0), Expr::val(new_last[&i] as i64));
                any = any.add(
                    Cond::all()
                        .add(room::Column::Id.eq(r.fence.room.0))
                        .add(room::Column::HostNode.eq(r.fence.host.0.as_str()))
                        .add(room::Column::Epoch.eq(r.fence.epoch.0))
                        .add(room::Column::LastSeq.eq(r.base_seq as i64)),
                );
            }
            let case = case.finally(Expr::col(room::Column::LastSeq));
            let stmt = Query::update().table(room::Entity).value(room::Column::LastSeq, case).cond_where(any).to_owned();
            let updated = txn.execute(&stmt).await?.rows_affected();
            if updated != writing.len() as u64 {
                // Find which rooms failed: their rows do not show our new last_seq under our fence.
                let ids: Vec<i64> = writing.iter().map(|&i| requests[i].fence.room.0).collect();
                let rows: HashMap<i64, room::Model> = room::Entity::find()
                    .filter(room::Column::Id.is_in(ids))
                    .all(txn)
                    .await?
                    .into_iter()
                    .map(|m| (m.id, m))
                    .collect();
                for &i in &writing {
                    let r = &requests[i];
                    let err = match rows.get(&r.fence.room.0) {
                        None => Some(AppendError::Gone),
                        Some(row) if row.host_node != r.fence.host.0 || row.epoch != r.fence.epoch.0 => {
                            Some(AppendError::Fenced { host: row.host_node.clone(), epoch: row.epoch })
                        }
                        Some(row) if row.last_seq as u64 != new_last[&i] => Some(AppendError::Stale { last_seq: row.last_seq as u64 }),
                        Some(_) => None,
                    };
                    if let Some(err) = err {
                        rejected.insert(i, err);
                    }
                }
            }
        }

        // Insert the new rows of every room that passed its fence.
        let columns = [
            message::Column::RoomId,
            message::Column::Seq,
            message::Column::Id,
            message::Column::Sender,
            message::Column::Nick,
            message::Column::Body,
            message::Column::ClientMsgId,
            message::Column::Epoch,
            message::Column::CreatedAt,
        ];
        let mut rows: Vec<(&Fence, &NewMessage, MessageOutcome)> = Vec::new();
        for &i in writing.iter().filter(|i| !rejected.contains_key(i)) {
            let r = &requests[i];
            for (m, o) in r.messages.iter().zip(&plans[i]) {
                if !o.duplicate {
                    rows.push((&r.fence, m, *o));
                }
            }
        }
        let mut insert = Query::insert().into_table(message::Entity).columns(columns).to_owned();
        let mut pending = 0;
        for (fence, m, o) in rows {
            insert.values_panic([
                fence.room.0.into(),
                (o.seq as i64).into(),
                m.id.clone().into(),
                m.sender.clone().into(),
                m.nick.clone().into(),
                m.body.clone().into(),
                m.client_msg_id.clone().into(),
                fence.epoch.0.into(),
                m.created_at.into(),
            ]);
            pending += 1;
            if pending == INSERT_CHUNK_ROWS {
                txn.execute(&insert).await.map_err(StoreError::classify)?;
                insert = Query::insert().into_table(message::Entity).columns(columns).to_owned();
                pending = 0;
            }
        }
        if pending > 0 {
            txn.execute(&insert).await.map_err(StoreError::classify)?;
        }

        Ok(plans
            .into_iter()
            .enumerate()
            .map(|(i, outcomes)| match rejected.remove(&i) {
                Some(err) => Err(err),
                None => {
                    let last_seq = last_new_seq(&outcomes, requests[i].base_seq);
                    Ok(Appended { outcomes, last_seq })
                }
            })
            .collect())
    }

    /// Already-stored `(sender, cid)` of a request's messages, with their original outcome.
    async fn stored_cids<C: ConnectionTrait>(
        &self,
        conn: &C,
        req: &AppendRequest,
    ) -> Result<HashMap<(String, String), MessageOutcome>, StoreError> {
        let cids: HashSet<&str> = req.messages.iter().map(|m| m.client_msg_id.as_str()).collect();
        let rows = message::Entity::find()
            .filter(message::Column::RoomId.eq(req.fence.room.0))
            .filter(message::Column::ClientMsgId.is_in(cids))
            .all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|m| {
                let o = MessageOutcome { seq: m.seq as u64, created_at: m.created_at, duplicate: true };
                ((m.sender, m.client_msg_id), o)
            })
            .collect())
    }
}

/// The highest seq a plan stores, or `base` if it stores nothing new.
fn last_new_seq(plan: &[MessageOutcome], base: u64) -> u64 {
    plan.iter().filter(|o| !o.duplicate).map(|o| o.seq).max().unwrap_or(base)
}
