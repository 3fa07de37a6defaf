//! A group commit on PostgreSQL as one statement: one round trip, no explicit transaction, and
//! one of two fixed texts for every batch, so each connection prepares each once.
//!
//! The general path (`Store::try_append`) builds `BEGIN`, the fenced `UPDATE … CASE`, the
//! `INSERT`s and `COMMIT` for every batch: four round trips or more, and SQL text that differs
//! with the number of rooms and rows, which sea-query builds and PostgreSQL parses each time.
//! Here the batch travels as arrays, and data-modifying CTEs do the same work atomically:
//! in a batch with requests marked [`AppendRequest::maybe_resent`] (a resumed session's resend
//! the room had no memory of: after a restart or a takeover), [`APPEND_CHECKED`]'s `stored`
//! finds their `(room, sender, cid)` already in the log (a batch without one takes [`APPEND`],
//! without that lookup, which cost PostgreSQL about a tenth of its saturated rate even when it
//! looked nothing up, docs/benchmarks.md); `moved` is the fenced `UPDATE` (a room whose row
//! no longer shows this node's host, epoch and the expected `last_seq` is skipped, exactly as by
//! the general path's `WHERE`, including the re-check after a concurrent takeover's row lock
//! under READ COMMITTED; so is a room with a stored cid), and `written` inserts only the
//! messages of the rooms `moved` returned. The rooms with a stored cid are then written by a
//! second statement with the seqs [`plan`] gives (the stored ones answered with their original
//! seq), and the rest of the batch is committed already: a resend costs its own room a second
//! round trip, not the whole batch a failed statement and a redo.
//!
//! A unique violation is still possible (a resend in an unmarked request, the same cid twice in
//! one request, or a row committed between the statement's snapshot and its insert); a
//! statement is atomic, so it writes nothing, and the batch is redone by
//! [`Store::append_postgres_resent`]: one lookup of every cid of the batch, and this statement
//! again for the messages not stored.

use super::*;
use sqlx::Arguments as _;
use sqlx::postgres::PgArguments;

/// Rows of `messages` as PostgreSQL arrays, one per column in table order (`room_id, seq, id,
/// sender, nick, body, client_msg_id, epoch, created_at`), added to a statement's arguments in
/// that order: how the group commit and the merge (`store::merge`) insert many rows with one
/// statement whose text does not depend on the row count.
pub(in crate::store) struct MessageArrays<'a> {
    room_id: Vec<i64>,
    seq: Vec<i64>,
    id: Vec<&'a str>,
    sender: Vec<&'a str>,
    nick: Vec<&'a str>,
    body: Vec<&'a str>,
    client_msg_id: Vec<&'a str>,
    epoch: Vec<i64>,
    created_at: Vec<i64>,
}

impl<'a> MessageArrays<'a> {
    pub(in crate::store) fn with_capacity(n: usize) -> Self {
        MessageArrays {
            room_id: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            id: Vec::with_capacity(n),
            sender: Vec::with_capacity(n),
            nick: Vec::with_capacity(n),
            body: Vec::with_capacity(n),
            client_msg_id: Vec::with_capacity(n),
            epoch: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
        }
    }

    /// One row, its columns in table order.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::store) fn push(&mut self, room_id: i64, seq: i64, epoch: i64, id: &'a str, sender: &'a str, nick: &'a str, body: &'a str, client_msg_id: &'a str, created_at: i64) {
        self.room_id.push(room_id);
        self.seq.push(seq);
        self.id.push(id);
        self.sender.push(sender);
        self.nick.push(nick);
        self.body.push(body);
        self.client_msg_id.push(client_msg_id);
        self.epoch.push(epoch);
        self.created_at.push(created_at);
    }

    /// The nine arrays, in table order, as the next nine arguments of `args` (in SQL:
    /// `unnest($n::bigint[], $n+1::bigint[], $n+2::text[] … $n+6::text[], $n+7::bigint[], $n+8::bigint[])`).
    pub(in crate::store) fn add_to(self, args: &mut PgArguments) -> Result<(), sqlx::error::BoxDynError> {
        args.add(self.room_id)?;
        args.add(self.seq)?;
        args.add(self.id)?;
        args.add(self.sender)?;
        args.add(self.nick)?;
        args.add(self.body)?;
        args.add(self.client_msg_id)?;
        args.add(self.epoch)?;
        args.add(self.created_at)
    }
}

/// `$1…$6`: one element per append (room, host, epoch, base seq, new last seq, new last time);
/// `$7…$15`: one per message. Rows: each room moved.
const APPEND: &str = "\
WITH batch AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
        AS b(room_id, host, epoch, base, last_seq, last_ts)
), moved AS (
    UPDATE rooms AS r SET last_seq = b.last_seq, last_ts = b.last_ts
    FROM batch AS b
    WHERE r.id = b.room_id AND r.host_node = b.host AND r.epoch = b.epoch AND r.last_seq = b.base
    RETURNING r.id
), written AS (
    INSERT INTO messages (room_id, seq, id, sender, nick, body, client_msg_id, epoch, created_at)
    SELECT m.room_id, m.seq, m.id, m.sender, m.nick, m.body, m.client_msg_id, m.epoch, m.created_at
    FROM unnest($7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                $14::bigint[], $15::bigint[])
        AS m(room_id, seq, id, sender, nick, body, client_msg_id, epoch, created_at)
    WHERE m.room_id IN (SELECT id FROM moved)
)
SELECT id FROM moved";

/// [`APPEND`] for a batch with requests marked [`AppendRequest::maybe_resent`]: `$16` names
/// their rooms, whose cids are looked up first. Rows: each room moved (`sender` NULL), then
/// each message of those rooms found stored (room, sender, cid, its seq and time), whose room
/// was not moved. Only such batches take it: the lookup's CTEs cost a batch without a marked
/// request about a tenth of PostgreSQL's saturated rate (86.6 % and 87.9 % in two alternated
/// measurements, docs/benchmarks.md).
const APPEND_CHECKED: &str = "\
WITH batch AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
        AS b(room_id, host, epoch, base, last_seq, last_ts)
), stored AS (
    SELECT s.room_id, s.sender, s.client_msg_id, s.seq, s.created_at
    FROM unnest($7::bigint[], $10::text[], $13::text[]) AS k(room_id, sender, client_msg_id)
    JOIN messages AS s ON s.room_id = k.room_id AND s.sender = k.sender AND s.client_msg_id = k.client_msg_id
    WHERE k.room_id = ANY($16::bigint[])
), moved AS (
    UPDATE rooms AS r SET last_seq = b.last_seq, last_ts = b.last_ts
    FROM batch AS b
    WHERE r.id = b.room_id AND r.host_node = b.host AND r.epoch = b.epoch AND r.last_seq = b.base
      AND b.room_id NOT IN (SELECT room_id FROM stored)
    RETURNING r.id
), written AS (
    INSERT INTO messages (room_id, seq, id, sender, nick, body, client_msg_id, epoch, created_at)
    SELECT m.room_id, m.seq, m.id, m.sender, m.nick, m.body, m.client_msg_id, m.epoch, m.created_at
    FROM unnest($7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                $14::bigint[], $15::bigint[])
        AS m(room_id, seq, id, sender, nick, body, client_msg_id, epoch, created_at)
    WHERE m.room_id IN (SELECT id FROM moved)
)
SELECT id AS room_id, NULL::text AS sender, NULL::text AS client_msg_id, NULL::bigint AS seq, NULL::bigint AS created_at FROM moved
UNION ALL
SELECT room_id, sender, client_msg_id, seq, created_at FROM stored";

/// `$1…$3`: one element per message looked up (room, sender, cid).
const STORED_CIDS: &str = "\
SELECT m.room_id, m.sender, m.client_msg_id, m.seq, m.created_at
FROM unnest($1::bigint[], $2::text[], $3::text[]) AS k(room_id, sender, cid)
JOIN messages AS m ON m.room_id = k.room_id AND m.sender = k.sender AND m.client_msg_id = k.cid";

impl Store {
    /// [`Store::append_batch`] on PostgreSQL for a batch in which some cid is stored already
    /// and the first statement hit the unique key instead of finding it (a resend in an
    /// unmarked request, the same cid twice in one request, or a row committed meanwhile):
    /// every cid of the batch is looked up in one statement, and the messages not stored go as
    /// on the fast path, with the seqs after their base ([`plan`] gives them the same). A room
    /// whose messages are all stored writes nothing. (The general path took a lookup per room
    /// and a `CASE` update.)
    pub(in crate::store) async fn append_postgres_resent(&self, requests: &[AppendRequest]) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let existing = self.stored_cids_postgres(requests).await?;
        self.append_postgres_planned(requests, existing).await
    }

    /// Write `requests`, of which `existing` are stored already (by request): each stored cid
    /// is answered with its original seq, and the others get the seqs after their room's base.
    async fn append_postgres_planned(&self, requests: &[AppendRequest], existing: Vec<StoredCids>) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let plans: Vec<Vec<MessageOutcome>> = requests.iter().zip(&existing).map(|(r, e)| plan(r, e, true)).collect();
        let writing: Vec<usize> = (0..requests.len()).filter(|&i| plans[i].iter().any(|o| !o.duplicate)).collect();
        let new_only: Vec<AppendRequest> = writing
            .iter()
            .map(|&i| AppendRequest {
                fence: requests[i].fence.clone(),
                base_seq: requests[i].base_seq,
                messages: requests[i].messages.iter().zip(&plans[i]).filter(|(_, o)| !o.duplicate).map(|(m, _)| m.clone()).collect(),
                // Looked up just now.
                maybe_resent: false,
            })
            .collect();
        let written = match new_only.is_empty() {
            true => Vec::new(),
            // No request of `new_only` is marked, so the statement looks nothing up.
            false => match self.append_statement(&new_only).await {
                Ok((moved, _)) => self.outcomes(&new_only, 0..new_only.len(), &moved).await?,
                // A cid stored since the lookup (not by this node's rooms, which wait for
                // their appends): the general path, in a transaction of its own.
                Err(StoreError::Conflict) => return self.try_append(requests, true).await,
                Err(e) => return Err(e),
            },
        };
        let refused = writing.into_iter().zip(written).filter_map(|(i, result)| result.err().map(|e| (i, e))).collect();
        Ok(answers(requests, plans, refused))
    }

    /// Already-stored `(sender, cid)` of each request's messages, in one statement.
    async fn stored_cids_postgres(&self, requests: &[AppendRequest]) -> Result<Vec<StoredCids>, StoreError> {
        let keys = lookup_keys(requests);
        let (mut rooms, mut senders, mut cids) = (Vec::with_capacity(keys.len()), Vec::with_capacity(keys.len()), Vec::with_capacity(keys.len()));
        for (room, sender, cid) in keys {
            rooms.push(room);
            senders.push(sender);
            cids.push(cid);
        }
        let mut args = PgArguments::default();
        let added: Result<(), sqlx::error::BoxDynError> = (|| {
            args.add(rooms)?;
            args.add(senders)?;
            args.add(cids)
        })();
        added.map_err(|e| StoreError::Sqlx(sqlx::Error::Encode(e)))?;
        let stored: Vec<StoredCid> = sqlx::query_as_with(STORED_CIDS, args).fetch_all(self.db.get_postgres_connection_pool()).await.map_err(StoreError::Sqlx)?;
        Ok(by_request(requests, stored))
    }

    /// [`Store::append_batch`] on PostgreSQL (the caller redoes the batch on
    /// [`StoreError::Conflict`]). Every request must carry at least one message. The rooms in
    /// which the statement found a stored cid wrote nothing: they are written by a second
    /// statement, with the stored cids answered by their original seqs.
    pub(in crate::store) async fn append_postgres(&self, requests: &[AppendRequest]) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let (moved, stored) = self.append_statement(requests).await?;
        if stored.is_empty() {
            return self.outcomes(requests, 0..requests.len(), &moved).await;
        }
        metrics::counter!("stoa_store_resent_found_total").increment(stored.len() as u64);
        let resent: HashSet<i64> = stored.iter().map(|s| s.0).collect();
        let (again, first): (Vec<usize>, Vec<usize>) = (0..requests.len()).partition(|&i| resent.contains(&requests[i].fence.room.0));
        // Only the few rooms with a resend are copied, to be planned and written again.
        let again_requests: Vec<AppendRequest> = again.iter().map(|&i| requests[i].clone()).collect();
        let existing = by_request(&again_requests, stored);
        let mut answered: Vec<Option<Result<Appended, AppendError>>> = (0..requests.len()).map(|_| None).collect();
        for (i, answer) in first.iter().copied().zip(self.outcomes(requests, first.iter().copied(), &moved).await?) {
            answered[i] = Some(answer);
        }
        for (i, answer) in again.into_iter().zip(self.append_postgres_planned(&again_requests, existing).await?) {
            answered[i] = Some(answer);
        }
        Ok(answered.into_iter().map(|a| a.expect("every request answered")).collect())
    }

    /// The append statement for `requests` (each with at least one message): the rooms it
    /// moved (and wrote), and the messages of the batch it found stored, whose rooms it skipped.
    async fn append_statement(&self, requests: &[AppendRequest]) -> Result<(HashSet<i64>, Vec<StoredCid>), StoreError> {
        let rows: usize = requests.iter().map(|r| r.messages.len()).sum();
        let (mut rooms, mut hosts, mut epochs) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bases, mut last_seqs, mut last_ts) = (Vec::new(), Vec::new(), Vec::new());
        let mut messages = MessageArrays::with_capacity(rows);
        let checked: Vec<i64> = requests.iter().filter(|r| r.maybe_resent).map(|r| r.fence.room.0).collect();
        let check = !checked.is_empty();
        for r in requests {
            let last = r.messages.last().expect("a request carries messages");
            rooms.push(r.fence.room.0);
            hosts.push(r.fence.host.0.as_str());
            epochs.push(r.fence.epoch.0);
            bases.push(r.base_seq as i64);
            last_seqs.push((r.base_seq + r.messages.len() as u64) as i64);
            last_ts.push(last.created_at);
            for (k, m) in r.messages.iter().enumerate() {
                messages.push(r.fence.room.0, (r.base_seq + 1 + k as u64) as i64, r.fence.epoch.0, m.id.as_str(), m.sender.as_str(), m.nick.as_str(), m.body.as_str(), m.client_msg_id.as_str(), m.created_at);
            }
        }
        let mut args = PgArguments::default();
        let added: Result<(), sqlx::error::BoxDynError> = (|| {
            args.add(rooms)?;
            args.add(hosts)?;
            args.add(epochs)?;
            args.add(bases)?;
            args.add(last_seqs)?;
            args.add(last_ts)?;
            messages.add_to(&mut args)?;
            if check {
                args.add(checked)?;
            }
            Ok(())
        })();
        added.map_err(|e| StoreError::Sqlx(sqlx::Error::Encode(e)))?;
        let pool = self.db.get_postgres_connection_pool();
        let failed = |e: sqlx::Error| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
            _ => StoreError::Sqlx(e),
        };
        if !check {
            let moved: Vec<i64> = sqlx::query_scalar_with(APPEND, args).fetch_all(pool).await.map_err(failed)?;
            return Ok((moved.into_iter().collect(), Vec::new()));
        }
        type Row = (i64, Option<String>, Option<String>, Option<i64>, Option<i64>);
        let rows: Vec<Row> = sqlx::query_as_with(APPEND_CHECKED, args).fetch_all(pool).await.map_err(failed)?;
        let (mut moved, mut stored) = (HashSet::new(), Vec::new());
        for row in rows {
            match row {
                (room, Some(sender), Some(cid), Some(seq), Some(created_at)) => stored.push((room, sender, cid, seq, created_at)),
                (room, ..) => {
                    moved.insert(room);
                }
            }
        }
        Ok((moved, stored))
    }

    /// The answer of each request `requests[i]`, `i` of `which` in its order, after the append
    /// statement `moved` its rooms: its messages' seqs, or, for a room it did not move, why (by
    /// the room's row now).
    async fn outcomes(
        &self,
        requests: &[AppendRequest],
        which: impl Iterator<Item = usize> + Clone,
        moved: &HashSet<i64>,
    ) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let refused: Vec<(usize, u64)> = which
            .clone()
            .filter(|&i| !moved.contains(&requests[i].fence.room.0))
            .map(|i| (i, requests[i].base_seq + requests[i].messages.len() as u64))
            .collect();
        let mut why: HashMap<usize, AppendError> = HashMap::new();
        if !refused.is_empty() {
            for (i, e) in refusals(&self.db, requests, refused.into_iter()).await? {
                // A row that shows this append's outcome, yet was not moved by it: another
                // writer got there; this append wrote nothing, so the room must resync.
                let e = e.unwrap_or(AppendError::Stale { last_seq: requests[i].base_seq + requests[i].messages.len() as u64 });
                why.insert(i, e);
            }
        }
        Ok(which
            .map(|i| {
                let r = &requests[i];
                match why.remove(&i) {
                    Some(e) => Err(e),
                    None => Ok(Appended {
                        outcomes: r
                            .messages
                            .iter()
                            .enumerate()
                            .map(|(k, m)| MessageOutcome { seq: r.base_seq + 1 + k as u64, created_at: m.created_at, duplicate: false })
                            .collect(),
                        last_seq: r.base_seq + r.messages.len() as u64,
                    }),
                }
            })
            .collect())
    }
}
