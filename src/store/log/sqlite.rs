//! A group commit on SQLite as one hand-off to a writer thread of the store's own.
//!
//! sqlx runs each SQLite connection on a worker thread and sends it every statement as a
//! message: the general path (`Store::try_append`: `BEGIN`, the fenced `UPDATE … CASE`, the
//! `INSERT`, `COMMIT`) costs four round trips per batch, each waking the worker and then the
//! waiting task. On a busy two-core machine those wake-ups, not SQLite, were most of a
//! commit's cost (a 40-message batch took 4.7 ms at 8,000 msg/s, fsync 0.3 ms). Here the whole
//! batch goes to one thread in one message and its answer comes back in one: the thread runs
//! the transaction with statements prepared once (`BEGIN IMMEDIATE`, one fixed-shape `UPDATE`
//! per room, one `INSERT` per row, `COMMIT`, all cached), on one connection of its own.
//!
//! The rules are the general path's, statement for statement: a room's part is written only
//! if its row still shows the append's host, epoch and base seq; a refused room gets its
//! [`AppendError`] and the rest of the batch commits; a unique violation (a resent cid the
//! room did not remember) fails the attempt, which is redone looking every cid up first.
//! SQLite has one writer: this connection takes the write lock at `BEGIN IMMEDIATE`, waiting
//! for the store's other connections (room creation, sessions) up to the busy timeout.
//!
//! The thread runs a tokio runtime of one thread ([`SqliteWriter::runtime`]) whose one task of
//! its own serves the jobs, a transaction at a time, on the thread itself. The group committer
//! runs on that runtime too (`committer::Committer::start`), so a batch goes from the committer
//! to its transaction and the answers back to the rooms without waking another thread: on the
//! I/O runtime it cost two more thread wake-ups per commit (the committer woke this thread,
//! and this thread woke the committer).

mod wal_writes;

use super::*;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::Path;
use tokio::sync::{mpsc, oneshot};

/// WAL pages after which a commit of this connection copies the WAL back into the database
/// (SQLite's default is 1,000). A checkpoint copies each page once however often it changed
/// since the last one, and a chat store rewrites the same few pages (the `rooms` rows, the
/// newest leaves of `messages` and of its cid index) in every commit: ten times fewer
/// checkpoints gave +19 % throughput (68,739 → 81,797 msg/s in one alternated run), at the
/// price of a WAL file of up to about 40 MiB between checkpoints. The checkpoint runs on this
/// thread, and the commits queued behind it wait: at 16,668 msg/s 7.7-9.2 ms about every
/// 200 ms, the database file's sync 5.0-8.4 ms of it. A thread of its own for it cut the wait
/// to a third, but it copied about twice the pages, and the CPU per message rose 7 % and 11 %
/// in the medians on two cores (docs/benchmarks.md, *Checkpoints on a thread of their own*).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// The answer to one batch.
type Answer = Result<Vec<Result<Appended, AppendError>>, StoreError>;

enum Job {
    Append { requests: Arc<[AppendRequest]>, reply: oneshot::Sender<Answer> },
    /// Close the connection, answer, and end the thread (and the tasks left on its runtime).
    Close(oneshot::Sender<()>),
}

/// The writer thread's handle; the thread ends when the last handle is dropped, or at
/// [`SqliteWriter::close`].
pub(in crate::store) struct SqliteWriter {
    jobs: mpsc::UnboundedSender<Job>,
    runtime: tokio::runtime::Handle,
}

impl SqliteWriter {
    /// Open a connection of its own to the database at `path` (already in WAL mode: the pool
    /// set it) and start the thread.
    pub(in crate::store) fn start(path: &Path, synchronous: &str, busy_timeout: Duration) -> Result<SqliteWriter, StoreError> {
        let conn = if wal_writes::coalesces(synchronous) {
            // Its WAL writes gathered into one per commit (sound only when commits sync).
            wal_writes::register().map_err(StoreError::Lock)?;
            Connection::open_with_flags_and_vfs(path, OpenFlags::default(), wal_writes::VFS_NAME)?
        } else {
            Connection::open(path)?
        };
        conn.busy_timeout(busy_timeout)?;
        // The values were checked by the pool's options; pragmas take no bind parameters.
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES};"
        ))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        // Time for the committer's optional gather; no I/O driver: nothing here waits on a socket.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| StoreError::Lock(format!("starting the SQLite commit thread's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("stoa-sqlite-commit".into())
            .spawn(move || {
                let mut conn = conn;
                runtime.block_on(async move {
                    // Each job runs to its end before the next task on this thread runs.
                    while let Some(job) = rx.recv().await {
                        match job {
                            Job::Append { requests, reply } => {
                                let _ = reply.send(append(&mut conn, &requests));
                            }
                            Job::Close(done) => {
                                drop(conn);
                                let _ = done.send(());
                                return;
                            }
                        }
                    }
                });
            })
            .map_err(|e| StoreError::Lock(format!("starting the SQLite commit thread: {e}")))?;
        Ok(SqliteWriter { jobs: tx, runtime: handle })
    }

    /// The runtime on the commit thread: a task spawned here that appends (the group committer)
    /// hands each batch over and gets its answer on the same thread.
    pub(in crate::store) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Commit `requests` as one transaction on the writer thread.
    pub(in crate::store) async fn append_batch(&self, requests: Arc<[AppendRequest]>) -> Answer {
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(Job::Append { requests, reply }).is_err() {
            return Err(StoreError::Closed);
        }
        answer.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Close the connection (the file is no longer open here once this returns) and end the
    /// thread; appends after it fail.
    pub(in crate::store) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.jobs.send(Job::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

/// One batch: as it comes, or, after a unique violation, looking every cid up first.
fn append(conn: &mut Connection, requests: &[AppendRequest]) -> Answer {
    match attempt_or_discard(conn, requests, false) {
        Err(StoreError::Conflict) => {
            metrics::counter!("stoa_store_appends_redone_total").increment(1);
            attempt_or_discard(conn, requests, true)
        }
        other => other,
    }
}

/// An [`attempt`]; if it did not commit, the WAL writes it left unwritten are dropped (they
/// must never reach the file once the write lock is gone: `wal_writes`' module doc).
fn attempt_or_discard(conn: &mut Connection, requests: &[AppendRequest], check_duplicates: bool) -> Answer {
    let answer = attempt(conn, requests, check_duplicates);
    if answer.is_err() {
        wal_writes::discard_pending(conn);
    }
    answer
}

/// One transaction. `BEGIN IMMEDIATE` and `COMMIT` are statements prepared once: rusqlite's
/// `Transaction` runs them through `execute_batch`, which parses them anew every time (the two
/// cost 3,100 instructions more per transaction that way, callgrind: 6 % of a commit of one
/// message).
fn attempt(conn: &mut Connection, requests: &[AppendRequest], check_duplicates: bool) -> Answer {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let outcome = write(conn, requests, check_duplicates).and_then(|answers| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(answers)
    });
    // A failed statement or commit leaves the transaction open: roll it back at once, as
    // dropping a rusqlite `Transaction` would.
    if outcome.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    outcome
}

/// Every request's part of one transaction, with the two statements looked up once.
fn write(txn: &Connection, requests: &[AppendRequest], check_duplicates: bool) -> Answer {
    let mut update =
        txn.prepare_cached("UPDATE rooms SET last_seq = ?1, last_ts = ?2 WHERE id = ?3 AND host_node = ?4 AND epoch = ?5 AND last_seq = ?6")?;
    let mut insert = txn.prepare_cached(
        "INSERT INTO messages (room_id, seq, id, sender, nick, body, client_msg_id, epoch, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    let mut answers = Vec::with_capacity(requests.len());
    for req in requests {
        let existing = if check_duplicates { stored_cids(txn, req)? } else { HashMap::new() };
        let outcomes = plan(req, &existing, check_duplicates);
        let last_seq = last_new_seq(&outcomes, req.base_seq);
        if last_seq == req.base_seq {
            // Nothing new (every message a resend): nothing to fence or write.
            answers.push(Ok(Appended { outcomes, last_seq }));
            continue;
        }
        let fence = &req.fence;
        let last_ts = outcomes.iter().filter(|o| !o.duplicate).map(|o| o.created_at).max().unwrap_or_default();
        let moved = update.execute(params![last_seq as i64, last_ts, fence.room.0, fence.host.0, fence.epoch.0, req.base_seq as i64])?;
        if moved != 1 {
            answers.push(Err(refusal(txn, req)?));
            continue;
        }
        for (m, o) in req.messages.iter().zip(&outcomes).filter(|(_, o)| !o.duplicate) {
            insert
                .execute(params![fence.room.0, o.seq as i64, m.id, m.sender, m.nick, m.body, m.client_msg_id, fence.epoch.0, m.created_at])
                .map_err(classify)?;
        }
        answers.push(Ok(Appended { outcomes, last_seq }));
    }
    Ok(answers)
}

/// Already-stored `(sender, cid)` of a request's messages, with their original outcome.
fn stored_cids(conn: &Connection, req: &AppendRequest) -> Result<HashMap<(String, String), MessageOutcome>, StoreError> {
    let mut find = conn.prepare_cached("SELECT seq, created_at FROM messages WHERE room_id = ?1 AND sender = ?2 AND client_msg_id = ?3")?;
    let mut found = HashMap::new();
    for m in &req.messages {
        let row: Option<(i64, i64)> = find.query_row(params![req.fence.room.0, m.sender, m.client_msg_id], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        if let Some((seq, created_at)) = row {
            found.insert((m.sender.clone(), m.client_msg_id.clone()), MessageOutcome { seq: seq as u64, created_at, duplicate: true });
        }
    }
    Ok(found)
}

/// Why the fenced `UPDATE` of `req`'s room changed nothing, by its row now.
fn refusal(conn: &Connection, req: &AppendRequest) -> Result<AppendError, StoreError> {
    let row: Option<(String, i64, i64)> = conn
        .prepare_cached("SELECT host_node, epoch, last_seq FROM rooms WHERE id = ?1")?
        .query_row(params![req.fence.room.0], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    // The fenced `UPDATE` found no row at the base seq under the fence, so the row cannot show
    // it: `refused` names why (the fallback is never taken).
    let row = row.as_ref().map(|(host, epoch, last_seq)| (host.as_str(), *epoch, *last_seq as u64));
    Ok(refused(&req.fence, row, req.base_seq).unwrap_or(AppendError::Stale { last_seq: req.base_seq }))
}

/// A unique violation is a resent cid ([`StoreError::Conflict`]); anything else as it is.
fn classify(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::Conflict
        }
        _ => StoreError::Sqlite(e),
    }
}
