//! A room's log: the fenced group-commit append (`append_batch`: many rooms' messages in one
//! transaction, each room's part written only if its fence and base seq still match), reads
//! by seq, and the archive queries of XMPP MAM.

use super::*;

mod postgres;
mod sqlite;

pub(super) use postgres::MessageArrays;
pub(super) use sqlite::SqliteWriter;

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
    /// A unique id: XMPP's stanza-id, kept with the message; a UUIDv7 carrying `created_at`
    /// ([`crate::ids::message_id`]).
    pub id: String,
    pub sender: String,
    pub nick: String,
    pub body: String,
    pub client_msg_id: String,
    /// Unix ms; within a room never less than an earlier seq's.
    pub created_at: i64,
}

impl NewMessage {
    /// A message without its time and id yet: the room stamps both as it hands the message to
    /// the committer, in log order.
    pub fn unstamped(sender: String, nick: String, body: String, client_msg_id: String) -> NewMessage {
        NewMessage { id: String::new(), sender, nick, body, client_msg_id, created_at: 0 }
    }
}

/// One room's appends in a group commit: written only if the room row still matches
/// `fence` and `base_seq` (the last seq the actor knows).
#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub fence: Fence,
    pub base_seq: u64,
    pub messages: Vec<NewMessage>,
    /// Some message may be stored already, unknown to the room (a resumed session's resend
    /// after a takeover or a restart): on PostgreSQL the append statement then looks the
    /// room's cids up as it writes, instead of failing on the unique key and redoing the
    /// whole batch. Only a hint for speed: a resend in a request without it is still
    /// stored once, by the redo.
    pub maybe_resent: bool,
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

/// Messages whose `(room, sender, cid)` one duplicate lookup asks for (three bound values
/// each; PostgreSQL's resend path asks for all in one statement with arrays).
const CID_LOOKUP_CHUNK: usize = 1000;

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
    ///
    /// There is no index of ids (it cost every commit a quarter of SQLite's throughput): the id
    /// carries the message's time ([`crate::ids::message_id`]), and the messages of that
    /// millisecond are found by `Store::first_seq_at` through the primary key.
    pub async fn message_seq(&self, room: RoomId, id: &str) -> Result<Option<u64>, StoreError> {
        let Some(at) = crate::ids::message_id_time(id) else { return Ok(None) };
        let end = self.end_seq(room).await?;
        let from = self.first_seq_at(room, at, 0, end).await?;
        let to = self.first_seq_at(room, at.saturating_add(1), from, end).await?;
        if from == to {
            return Ok(None);
        }
        let seq: Option<i64> = message::Entity::find()
            .select_only()
            .column(message::Column::Seq)
            .filter(message::Column::RoomId.eq(room.0))
            .filter(message::Column::Seq.gte(from as i64))
            .filter(message::Column::Seq.lt(to as i64))
            .filter(message::Column::Id.eq(id))
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(seq.map(|s| s as u64))
    }

    /// One past the highest seq stored for `room` (1 if it has no message).
    async fn end_seq(&self, room: RoomId) -> Result<u64, StoreError> {
        let last: Option<Option<i64>> = message::Entity::find()
            .select_only()
            .column_as(message::Column::Seq.max(), "last")
            .filter(message::Column::RoomId.eq(room.0))
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(last.flatten().map_or(1, |s| s as u64 + 1))
    }

    /// The lowest seq of `room` from `from` on whose message is from `at` (Unix ms) or later, or
    /// `end` (one past the last seq) if none is; every message below `from` must be older than
    /// `at`. A binary search over the primary key, about log2(end - from) point reads: right
    /// because a room's `created_at` never decreases as its seq grows (the room actor's clock,
    /// `room::post`, resumed from `rooms.last_ts`), and seqs may have gaps.
    async fn first_seq_at(&self, room: RoomId, at: i64, from: u64, end: u64) -> Result<u64, StoreError> {
        // Every message below `lo` is older than `at`; none from `hi` on is.
        let (mut lo, mut hi) = (from, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let probe: Option<(i64, i64)> = message::Entity::find()
                .select_only()
                .column(message::Column::Seq)
                .column(message::Column::CreatedAt)
                .filter(message::Column::RoomId.eq(room.0))
                .filter(message::Column::Seq.gte(mid as i64))
                .filter(message::Column::Seq.lt(hi as i64))
                .order_by_asc(message::Column::Seq)
                .into_tuple()
                .one(&self.db)
                .await?;
            match probe {
                None => hi = mid,
                Some((seq, created_at)) if created_at >= at => hi = seq as u64,
                Some((seq, _)) => lo = seq as u64 + 1,
            }
        }
        Ok(hi)
    }

    /// Messages of `room` in `range` (seq after/before, time from/until, one nick): at most
    /// `limit`, from the oldest, or from the newest when `newest_first`; ascending either way.
    /// And how many messages the range holds, ignoring its seq bounds (a MAM result's count).
    /// The time bounds become seq bounds (`Store::first_seq_at`), so every query reads a
    /// range of the primary key.
    pub async fn archive(&self, room: RoomId, range: &ArchiveRange, limit: u64, newest_first: bool) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        // The time bounds as seqs: `since < seq < until`.
        let (mut since, mut until) = (0u64, None);
        if range.start_ms.is_some() || range.end_ms.is_some() {
            let end = self.end_seq(room).await?;
            if let Some(t) = range.start_ms {
                since = self.first_seq_at(room, t, 0, end).await?.saturating_sub(1);
            }
            if let Some(t) = range.end_ms {
                // Messages up to `since` are older than `start`; if `end` < `start`, none match.
                let from = if range.start_ms.is_some_and(|s| s <= t) { since } else { 0 };
                until = Some(self.first_seq_at(room, t.saturating_add(1), from, end).await?);
            }
        }
        let filtered = |after: u64, before: Option<u64>| {
            let mut q = message::Entity::find()
                .filter(message::Column::RoomId.eq(room.0))
                .filter(message::Column::Seq.gt(after as i64));
            if let Some(before) = before {
                q = q.filter(message::Column::Seq.lt(before as i64));
            }
            if let Some(nick) = &range.nick {
                q = q.filter(message::Column::Nick.eq(nick.as_str()));
            }
            q
        };
        let count = sea_orm::PaginatorTrait::count(filtered(since, until), &self.db).await?;
        let before = match (range.before, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut q = filtered(range.after.max(since), before);
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
    /// `Err` means the whole transaction failed (and nothing of it is visible). The batch is
    /// shared, not copied, with SQLite's commit thread.
    pub async fn append_batch(&self, requests: impl Into<Arc<[AppendRequest]>>) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let requests = requests.into();
        if let Some(writer) = &self.sqlite_writer {
            return writer.append_batch(requests).await;
        }
        let requests = &requests[..];
        let first = if self.kind == StoreKind::Postgres && requests.iter().all(|r| !r.messages.is_empty()) {
            self.append_postgres(requests).await
        } else {
            self.try_append(requests, false).await
        };
        match first {
            // A unique violation means some cid is already stored (a resend the room actor had
            // no memory of, e.g. after a restart or a takeover): redo the batch looking every
            // cid up first.
            Err(StoreError::Conflict) => {
                metrics::counter!("stoa_store_appends_redone_total").increment(1);
                match self.kind {
                    StoreKind::Postgres => self.append_postgres_resent(requests).await,
                    _ => self.try_append(requests, true).await,
                }
            }
            other => other,
        }
    }

    async fn try_append(
        &self,
        requests: &[AppendRequest],
        check_duplicates: bool,
    ) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let txn = self.begin_write().await?;
        let result = self.append_in(&txn, requests, check_duplicates).await;
        super::settle(txn, result).await
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
        let existing = match check_duplicates {
            true => self.stored_cids(txn, requests).await?,
            false => vec![HashMap::new(); requests.len()],
        };
        let plans: Vec<Vec<MessageOutcome>> = requests.iter().zip(&existing).map(|(req, existing)| plan(req, existing, check_duplicates)).collect();

        // Fence + advance last_seq for every room that has new rows, in one statement.
        let writing: Vec<usize> = (0..requests.len())
            .filter(|&i| plans[i].iter().any(|o| !o.duplicate))
            .collect();
        let mut rejected: HashMap<usize, AppendError> = HashMap::new();
        if !writing.is_empty() {
            let new_last: HashMap<usize, u64> = writing.iter().map(|&i| (i, last_new_seq(&plans[i], requests[i].base_seq))).collect();
            let mut case = CaseStatement::new();
            let mut clock = CaseStatement::new();
            let mut any = Cond::any();
            for &i in &writing {
                let r = &requests[i];
                case = case.case(room::Column::Id.eq(r.fence.room.0), Expr::val(new_last[&i] as i64));
                let last_ts = plans[i].iter().filter(|o| !o.duplicate).map(|o| o.created_at).max().unwrap_or_default();
                clock = clock.case(room::Column::Id.eq(r.fence.room.0), Expr::val(last_ts));
                any = any.add(
                    Cond::all()
                        .add(room::Column::Id.eq(r.fence.room.0))
                        .add(room::Column::HostNode.eq(r.fence.host.0.as_str()))
                        .add(room::Column::Epoch.eq(r.fence.epoch.0))
                        .add(room::Column::LastSeq.eq(r.base_seq as i64)),
                );
            }
            let case = case.finally(Expr::col(room::Column::LastSeq));
            let clock = clock.finally(Expr::col(room::Column::LastTs));
            let stmt = Query::update()
                .table(room::Entity)
                .value(room::Column::LastSeq, case)
                .value(room::Column::LastTs, clock)
                .cond_where(any)
                .to_owned();
            let updated = txn.execute(&stmt).await?.rows_affected();
            if updated != writing.len() as u64 {
                // Find which rooms failed: their rows do not show our new last_seq under our fence.
                let written = writing.iter().map(|&i| (i, new_last[&i]));
                rejected = refusals(txn, requests, written).await?.into_iter().filter_map(|(i, e)| Some((i, e?))).collect();
            }
        }

        // Insert the new rows of every room that passed its fence.
        let mut rows: Vec<(&Fence, &NewMessage, MessageOutcome)> = Vec::new();
        for &i in writing.iter().filter(|i| !rejected.contains_key(i)) {
            let r = &requests[i];
            for (m, o) in r.messages.iter().zip(&plans[i]) {
                if !o.duplicate {
                    rows.push((&r.fence, m, *o));
                }
            }
        }
        let mut insert = Query::insert().into_table(message::Entity).columns(super::MESSAGE_COLUMNS).to_owned();
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
                insert = Query::insert().into_table(message::Entity).columns(super::MESSAGE_COLUMNS).to_owned();
                pending = 0;
            }
        }
        if pending > 0 {
            txn.execute(&insert).await.map_err(StoreError::classify)?;
        }

        Ok(answers(requests, plans, rejected))
    }

    /// Already-stored `(sender, cid)` of each request's messages, with their original outcome:
    /// one lookup per [`CID_LOOKUP_CHUNK`] messages of the whole batch (after a takeover a
    /// batch holds many rooms' resends; a lookup per room was a round trip each).
    async fn stored_cids<C: ConnectionTrait>(&self, conn: &C, requests: &[AppendRequest]) -> Result<Vec<StoredCids>, StoreError> {
        use sea_orm::sea_query::ExprTrait as _;
        let keys: Vec<(i64, String, String)> = lookup_keys(requests).into_iter().map(|(room, sender, cid)| (room, sender.to_owned(), cid.to_owned())).collect();
        let mut stored = Vec::new();
        for chunk in keys.chunks(CID_LOOKUP_CHUNK) {
            let key = Expr::tuple([Expr::col(message::Column::RoomId), Expr::col(message::Column::Sender), Expr::col(message::Column::ClientMsgId)]);
            let rows: Vec<StoredCid> = message::Entity::find()
                .select_only()
                .columns([message::Column::RoomId, message::Column::Sender, message::Column::ClientMsgId, message::Column::Seq, message::Column::CreatedAt])
                .filter(key.in_tuples(chunk.iter().cloned()))
                .into_tuple()
                .all(conn)
                .await?;
            stored.extend(rows);
        }
        Ok(by_request(requests, stored))
    }
}

/// A request's messages already stored, by `(sender, cid)`, with their original outcome.
type StoredCids = HashMap<(String, String), MessageOutcome>;

/// A stored message as a duplicate lookup reads it: room, sender, cid, seq, time.
type StoredCid = (i64, String, String, i64, i64);

/// What a duplicate lookup of `requests` asks for: each message's room, sender and cid, once.
fn lookup_keys(requests: &[AppendRequest]) -> HashSet<(i64, &str, &str)> {
    requests.iter().flat_map(|r| r.messages.iter().map(|m| (r.fence.room.0, m.sender.as_str(), m.client_msg_id.as_str()))).collect()
}

/// The `stored` messages found by a lookup, to each request of their room.
fn by_request(requests: &[AppendRequest], stored: Vec<StoredCid>) -> Vec<StoredCids> {
    let mut of_room: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, r) in requests.iter().enumerate() {
        of_room.entry(r.fence.room.0).or_default().push(i);
    }
    let mut found = vec![HashMap::new(); requests.len()];
    for (room, sender, cid, seq, created_at) in stored {
        for &i in of_room.get(&room).into_iter().flatten() {
            let outcome = MessageOutcome { seq: seq as u64, created_at, duplicate: true };
            found[i].insert((sender.clone(), cid.clone()), outcome);
        }
    }
    found
}

/// Why each of `requests` (index, and the last seq its append would have left) was refused, by
/// its room row as `conn` sees it now: gone, fenced (another host or epoch), or stale (its log
/// moved on). `None`: the row shows that append's last seq under its fence.
async fn refusals<C: ConnectionTrait>(
    conn: &C,
    requests: &[AppendRequest],
    appends: impl Iterator<Item = (usize, u64)>,
) -> Result<Vec<(usize, Option<AppendError>)>, StoreError> {
    let appends: Vec<(usize, u64)> = appends.collect();
    let ids: Vec<i64> = appends.iter().map(|&(i, _)| requests[i].fence.room.0).collect();
    let rows: HashMap<i64, room::Model> =
        room::Entity::find().filter(room::Column::Id.is_in(ids)).all(conn).await?.into_iter().map(|m| (m.id, m)).collect();
    Ok(appends
        .into_iter()
        .map(|(i, last_seq)| {
            let fence = &requests[i].fence;
            let row = rows.get(&fence.room.0).map(|r| (r.host_node.as_str(), r.epoch, r.last_seq as u64));
            (i, refused(fence, row, last_seq))
        })
        .collect())
}

/// Why an append under `fence` that should leave the room at `last_seq` does not hold, by the
/// room's row (`host_node`, `epoch`, `last_seq`) as it is now: gone, fenced (another host or
/// epoch), or stale (its log is elsewhere). `None`: the row shows `last_seq` under the fence.
fn refused(fence: &Fence, row: Option<(&str, i64, u64)>, last_seq: u64) -> Option<AppendError> {
    match row {
        None => Some(AppendError::Gone),
        Some((host, epoch, _)) if host != fence.host.0 || epoch != fence.epoch.0 => Some(AppendError::Fenced { host: host.to_owned(), epoch }),
        Some((_, _, stored)) if stored != last_seq => Some(AppendError::Stale { last_seq: stored }),
        Some(_) => None,
    }
}

/// The seq each message of `req` gets: the next one after its base, or, for a `(sender, cid)`
/// already stored (`existing`) or, when `check_duplicates`, met earlier in the same request,
/// the original's.
fn plan(req: &AppendRequest, existing: &HashMap<(String, String), MessageOutcome>, check_duplicates: bool) -> Vec<MessageOutcome> {
    let mut next = req.base_seq;
    // The same cid twice in one request, which only a check for duplicates looks for (without
    // it, the store's unique key refuses the second and the batch is redone with the check).
    let mut seen: HashMap<(&str, &str), MessageOutcome> = HashMap::new();
    let mut outcomes = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let key = (m.sender.as_str(), m.client_msg_id.as_str());
        let stored = if existing.is_empty() { None } else { existing.get(&(m.sender.clone(), m.client_msg_id.clone())) };
        let outcome = if let Some(o) = stored {
            *o
        } else if let Some(o) = seen.get(&key) {
            MessageOutcome { duplicate: true, ..*o }
        } else {
            next += 1;
            let o = MessageOutcome { seq: next, created_at: m.created_at, duplicate: false };
            if check_duplicates {
                seen.insert(key, o);
            }
            o
        };
        outcomes.push(outcome);
    }
    outcomes
}

/// Each request's answer: its refusal, or its plan's outcomes.
fn answers(requests: &[AppendRequest], plans: Vec<Vec<MessageOutcome>>, mut refused: HashMap<usize, AppendError>) -> Vec<Result<Appended, AppendError>> {
    plans
        .into_iter()
        .enumerate()
        .map(|(i, outcomes)| match refused.remove(&i) {
            Some(e) => Err(e),
            None => {
                let last_seq = last_new_seq(&outcomes, requests[i].base_seq);
                Ok(Appended { outcomes, last_seq })
            }
        })
        .collect()
}

/// The highest seq a plan stores, or `base` if it stores nothing new.
fn last_new_seq(plan: &[MessageOutcome], base: u64) -> u64 {
    plan.iter().filter(|o| !o.duplicate).map(|o| o.seq).max().unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::message_id;

    /// A message is found by its id, and an archive by its time bounds, through the primary key
    /// alone: many messages in one millisecond, long runs of one time, times that jump.
    #[tokio::test]
    async fn ids_and_time_bounds_are_found_through_the_room_clock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}/log.db", dir.path().display()), 2, "normal").await.unwrap();
        store.migrate().await.unwrap();
        let home = NodeId("n1".into());
        let row = store.create_room(&RoomAddr("r@conference.localhost".into()), &RoomConfig::default(), "ann", &home).await.unwrap();
        let other = store.create_room(&RoomAddr("s@conference.localhost".into()), &RoomConfig::default(), "ann", &home).await.unwrap();
        // Times of seq 1..=N: runs of equal times and jumps, non-decreasing.
        let times: Vec<i64> = (0..300).map(|i: i64| 1_000_000 + (i / 7) * 3 + if i > 200 { 10_000 } else { 0 }).collect();
        let fence = Fence { room: row.id, host: home.clone(), epoch: row.epoch };
        let mut ids = Vec::new();
        for (n, chunk) in times.chunks(64).enumerate() {
            let messages: Vec<NewMessage> = chunk
                .iter()
                .enumerate()
                .map(|(i, &t)| NewMessage { id: message_id(t), created_at: t, ..NewMessage::unstamped("ann".into(), "Ann".into(), format!("m{n}.{i}"), format!("c{n}.{i}")) })
                .collect();
            ids.extend(messages.iter().map(|m| m.id.clone()));
            let answer = store.append_batch([AppendRequest { fence: fence.clone(), base_seq: (n * 64) as u64, messages, maybe_resent: false }]).await.unwrap();
            assert!(answer[0].is_ok(), "{:?}", answer[0]);
        }
        assert_eq!(store.load_room_by_id(row.id).await.unwrap().unwrap().last_ts, *times.last().unwrap(), "rooms.last_ts follows the appends");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(store.message_seq(row.id, id).await.unwrap(), Some(i as u64 + 1), "id of seq {}", i + 1);
            assert_eq!(store.message_seq(other.id, id).await.unwrap(), None, "an id is found in its own room only");
        }
        for unknown in [message_id(times[10]), message_id(1_000_001), message_id(5), message_id(9_000_000), "no-such-id".into()] {
            assert_eq!(store.message_seq(row.id, &unknown).await.unwrap(), None, "{unknown}");
        }
        // Time bounds, inclusive at both ends, as the filter over all messages would give them.
        let all = store.messages(row.id, 0, None, 1000, false).await.unwrap();
        for (start, end) in [(None, None), (Some(1_000_003), None), (None, Some(1_000_003)), (Some(1_000_004), Some(1_000_020)), (Some(1_000_500), Some(1_010_000)), (Some(2_000_000), None), (Some(0), Some(10))] {
            let expect: Vec<u64> = all.iter().filter(|m| start.is_none_or(|s| m.created_at >= s) && end.is_none_or(|e| m.created_at <= e)).map(|m| m.seq).collect();
            let range = ArchiveRange { start_ms: start, end_ms: end, ..Default::default() };
            let (rows, count) = store.archive(row.id, &range, 1000, false).await.unwrap();
            assert_eq!(rows.iter().map(|m| m.seq).collect::<Vec<_>>(), expect, "{start:?}..{end:?}");
            assert_eq!(count, expect.len() as u64, "count of {start:?}..{end:?}");
            let (last_two, _) = store.archive(row.id, &range, 2, true).await.unwrap();
            assert_eq!(last_two.iter().map(|m| m.seq).collect::<Vec<_>>(), expect[expect.len().saturating_sub(2)..], "newest of {start:?}..{end:?}");
            let after = expect.get(1).copied().unwrap_or(0);
            let (rest, count) = store.archive(row.id, &ArchiveRange { after, ..range.clone() }, 1000, false).await.unwrap();
            assert_eq!(rest.iter().map(|m| m.seq).collect::<Vec<_>>(), expect.iter().copied().filter(|&s| s > after).collect::<Vec<_>>());
            assert_eq!(count, expect.len() as u64, "the count ignores the seq bounds");
        }
    }
}
