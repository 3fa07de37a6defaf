//! A group commit on PostgreSQL as one statement: one round trip, no explicit transaction, and
//! the same text for every batch, so each connection prepares it once.
//!
//! The general path (`Store::try_append`) builds `BEGIN`, the fenced `UPDATE … CASE`, the
//! `INSERT`s and `COMMIT` for every batch: four round trips or more, and SQL text that differs
//! with the number of rooms and rows, which sea-query builds and PostgreSQL parses each time.
//! Here the batch travels as arrays, and data-modifying CTEs do the same work atomically:
//! `moved` is the fenced `UPDATE` (a room whose row no longer shows this node's host, epoch and
//! the expected `last_seq` is skipped, exactly as by the general path's `WHERE`, including the
//! re-check after a concurrent takeover's row lock under READ COMMITTED), and `written` inserts
//! only the messages of the rooms `moved` returned. A statement is atomic, so a unique violation
//! (a resent cid) writes nothing, and the caller redoes the batch on the general path, which
//! looks every cid up first.

use super::*;

/// `$1…$6`: one element per append (room, host, epoch, base seq, new last seq, new last time);
/// `$7…$15`: one per message.
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

impl Store {
    /// [`Store::append_batch`] on PostgreSQL for a batch with no resent cid (the caller falls
    /// back on [`StoreError::Conflict`]). Every request must carry at least one message.
    pub(in crate::store) async fn append_postgres(&self, requests: &[AppendRequest]) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let rows: usize = requests.iter().map(|r| r.messages.len()).sum();
        let mut appends = (Vec::with_capacity(requests.len()), Vec::with_capacity(requests.len()), Vec::with_capacity(requests.len()));
        let mut heads = (Vec::with_capacity(requests.len()), Vec::with_capacity(requests.len()), Vec::with_capacity(requests.len()));
        let mut keys = (Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows));
        let mut content = (Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows));
        for r in requests {
            let last = r.messages.last().expect("a request carries messages");
            appends.0.push(r.fence.room.0);
            appends.1.push(r.fence.host.0.as_str());
            appends.2.push(r.fence.epoch.0);
            heads.0.push(r.base_seq as i64);
            heads.1.push((r.base_seq + r.messages.len() as u64) as i64);
            heads.2.push(last.created_at);
            for (k, m) in r.messages.iter().enumerate() {
                keys.0.push(r.fence.room.0);
                keys.1.push((r.base_seq + 1 + k as u64) as i64);
                keys.2.push(m.id.as_str());
                keys.3.push(m.sender.as_str());
                content.0.push(m.nick.as_str());
                content.1.push(m.body.as_str());
                content.2.push(m.client_msg_id.as_str());
                content.3.push(r.fence.epoch.0);
                content.4.push(m.created_at);
            }
        }
        let moved: Vec<i64> = sqlx::query_scalar(APPEND)
            .bind(appends.0)
            .bind(appends.1)
            .bind(appends.2)
            .bind(heads.0)
            .bind(heads.1)
            .bind(heads.2)
            .bind(keys.0)
            .bind(keys.1)
            .bind(keys.2)
            .bind(keys.3)
            .bind(content.0)
            .bind(content.1)
            .bind(content.2)
            .bind(content.3)
            .bind(content.4)
            .fetch_all(self.db.get_postgres_connection_pool())
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
                _ => StoreError::Sqlx(e),
            })?;
        let moved: HashSet<i64> = moved.into_iter().collect();
        let refused = requests.iter().enumerate().filter(|(_, r)| !moved.contains(&r.fence.room.0));
        let mut why: HashMap<usize, AppendError> = HashMap::new();
        if moved.len() < requests.len() {
            let refused = refused.map(|(i, r)| (i, r.base_seq + r.messages.len() as u64));
            for (i, e) in refusals(&self.db, requests, refused).await? {
                // A row that shows this append's outcome, yet was not moved by it: another
                // writer got there; this append wrote nothing, so the room must resync.
                let e = e.unwrap_or(AppendError::Stale { last_seq: requests[i].base_seq + requests[i].messages.len() as u64 });
                why.insert(i, e);
            }
        }
        Ok(requests
            .iter()
            .enumerate()
            .map(|(i, r)| match why.remove(&i) {
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
            })
            .collect())
    }
}
