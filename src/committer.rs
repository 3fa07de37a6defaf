//! The group committer: batches appends from many rooms into one transaction.
//!
//! Room actors submit [`AppendRequest`]s (a room may have two in flight). The committer keeps
//! each room's appends in submission order and never puts two of one room in the same or in
//! concurrent transactions: a later one is deferred until the earlier one is answered, which is
//! what lets the store's `last_seq = base_seq` check keep every room's seq contiguous. A batch
//! holds at most `max_batch_rows` rows; it is sent when a transaction slot is free (after an
//! optional `max_batch_delay_us` gather), with up to `max_in_flight` transactions at once (one on
//! SQLite, where the committer waits for it in its own loop rather than in a task of its own).
//! On PostgreSQL a batch goes at once when no transaction is in flight, whatever its size;
//! while one is in flight, a further one starts only with at least `overlap_min_rows` rows, or
//! once the oldest in flight has run `overlap_after_us`, and a smaller batch keeps filling
//! until then (docs/design-notes.md, *Group commit*).
//! Each request's answer is sent only after its transaction committed.
//!
//! On SQLite in a file the committer runs on the store's commit thread
//! ([`Store::commit_runtime`]), beside the transactions it sends; elsewhere on the runtime that
//! starts it (the node's I/O runtime).

use crate::ids::RoomId;
use crate::config::CommitterSettings;
use crate::ha::gate::WriteGate;
use crate::store::{AppendError, AppendRequest, Appended, Store, StoreKind};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Why an append was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The store refused this room's part: fenced, stale, or gone.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// The transaction failed; nothing of it is visible (or, if the connection died during
    /// COMMIT, the room's next append finds out through its `last_seq` check).
    #[error("commit failed: {0}")]
    Failed(String),
    /// The committer is shutting down.
    #[error("committer stopped")]
    Stopped,
    /// The node's write gate is closed: its lease may have run out (docs/ha.md), or it is
    /// failing over. Nothing was written.
    #[error("this node may not write now: {0}")]
    Gated(&'static str),
}

struct Job {
    request: AppendRequest,
    reply: oneshot::Sender<Result<Appended, CommitError>>,
}

impl Job {
    fn room(&self) -> RoomId {
        self.request.fence.room
    }
}

/// Handle to the group committer; cheap to clone, one per room actor.
#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Committer {
    /// Start the committer task: on the store's commit runtime if it has one, otherwise on the
    /// current tokio runtime.
    /// Transactions start only while `gate` is open (always, for a node without a peer).
    pub fn start(
        store: Store,
        settings: &CommitterSettings,
        gate: WriteGate,
        shutdown: CancellationToken,
    ) -> (Committer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let in_flight = if store.kind() == StoreKind::Sqlite { 1 } else { settings.max_in_flight };
        // The bar is PostgreSQL's: on MariaDB it cost more latency than it saved CPU
        // (docs/benchmarks.md, *A further transaction only for a batch worth it*).
        let overlap_rows = match store.kind() {
            StoreKind::Postgres => settings.overlap_min_rows.clamp(1, settings.max_batch_rows.max(1)),
            StoreKind::Sqlite | StoreKind::MySql => 1,
        };
        let runtime = store.commit_runtime();
        let batcher = Batcher {
            store,
            gate,
            jobs: rx,
            max_rows: settings.max_batch_rows,
            max_delay: Duration::from_micros(settings.max_batch_delay_us),
            overlap_rows,
            overlap_after: Duration::from_micros(settings.overlap_after_us),
            running: Vec::with_capacity(in_flight),
            permits: Arc::new(Semaphore::new(in_flight)),
            in_flight,
            busy: Arc::default(),
            deferred: VecDeque::new(),
            deferred_rooms: HashMap::new(),
        }
        .run(shutdown);
        let task = match runtime {
            Some(runtime) => runtime.spawn(batcher),
            None => tokio::spawn(batcher),
        };
        (Committer { jobs: tx }, task)
    }

    /// Queue one room's append; the answer resolves after its commit (or its failure).
    ///
    /// Queuing is synchronous, so a room's appends reach the committer in the order the room
    /// submitted them, and the committer keeps that order: a room's next append never shares a
    /// transaction with, nor runs concurrently with, its previous one. That is what lets a room
    /// pipeline appends (each based on the previous one's expected `last_seq`) safely.
    /// The queue is unbounded; rooms bound it by limiting their appends in flight.
    pub fn submit(&self, request: AppendRequest) -> impl Future<Output = Result<Appended, CommitError>> + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.jobs.send(Job { request, reply }).is_ok();
        async move {
            if !queued {
                return Err(CommitError::Stopped);
            }
            answer.await.unwrap_or(Err(CommitError::Stopped))
        }
    }
}

/// The committer task's state.
struct Batcher {
    store: Store,
    gate: WriteGate,
    jobs: mpsc::UnboundedReceiver<Job>,
    max_rows: usize,
    max_delay: Duration,
    /// Rows a batch needs to start while another transaction is in flight...
    overlap_rows: usize,
    /// ...unless the oldest of them has been in flight this long.
    overlap_after: Duration,
    /// When each transaction in flight began (up to date whenever a batch may start: the
    /// ends are read first).
    running: Vec<Instant>,
    permits: Arc<Semaphore>,
    in_flight: usize,
    /// Rooms with an append in a transaction now.
    busy: Arc<Mutex<HashSet<RoomId>>>,
    /// Jobs whose room is busy (or already in the batch being built), in arrival order.
    deferred: VecDeque<Job>,
    /// How many deferred jobs each room has.
    deferred_rooms: HashMap<RoomId, usize>,
}

/// A batch being built.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    rows: usize,
    rooms: HashSet<RoomId>,
}

impl Batcher {
    async fn run(mut self, shutdown: CancellationToken) {
        // Each transaction's start, sent when it has ended.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Instant>();
        'serve: loop {
            let mut batch = Batch::default();
            // Wait for at least one job that may go now.
            while batch.jobs.is_empty() {
                self.take_deferred(&mut batch);
                if !batch.jobs.is_empty() {
                    break;
                }
                tokio::select! {
                    job = self.jobs.recv() => match job {
                        Some(job) => self.offer(job, &mut batch),
                        None => break 'serve,
                    },
                    Some(started) = done_rx.recv() => self.ended(started),
                    _ = shutdown.cancelled() => break 'serve,
                }
            }
            let started = Instant::now();
            // Take whatever is already queued; then, if a gather delay is configured, wait for
            // more until the row cap or the delay. With no delay a batch goes as soon as a
            // transaction slot is free; while every slot is busy it keeps growing (below).
            while batch.rows < self.max_rows {
                match self.jobs.try_recv() {
                    Ok(job) => self.offer(job, &mut batch),
                    Err(_) => break,
                }
            }
            while batch.rows < self.max_rows && !self.max_delay.is_zero() {
                let left = self.max_delay.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break;
                }
                tokio::select! {
                    job = self.jobs.recv() => match job {
                        Some(job) => self.offer(job, &mut batch),
                        None => break,
                    },
                    _ = tokio::time::sleep(left) => break,
                }
            }
            // While no transaction may start, keep growing the batch: that is group commit. One
            // may start when a slot is free and none is in flight, or the batch is worth a
            // transaction of its own beside them (small batches overlapping each other cost the
            // store a statement each), or the oldest in flight has run so long that it should
            // hold nobody back (docs/design-notes.md, *Group commit*).
            let permit = loop {
                while let Ok(started) = done_rx.try_recv() {
                    self.ended(started);
                }
                let now = Instant::now();
                let idle = self.permits.available_permits() == self.in_flight;
                // When the oldest transaction in flight stops holding small batches back.
                let overdue_at = self.running.iter().min().map(|&t| t + self.overlap_after);
                let stalled = overdue_at.is_some_and(|at| at <= now);
                if (idle || stalled || batch.rows >= self.overlap_rows)
                    && let Ok(p) = self.permits.clone().try_acquire_owned()
                {
                    break p;
                }
                let wake = overdue_at.filter(|_| !stalled);
                tokio::select! {
                    // A transaction ended (its permit is back, its rooms are free): look again.
                    Some(started) = done_rx.recv() => {
                        self.ended(started);
                        self.take_deferred(&mut batch);
                    }
                    job = self.jobs.recv(), if batch.rows < self.max_rows => match job {
                        Some(job) => self.offer(job, &mut batch),
                        None => break self.permits.clone().acquire_owned().await.expect("semaphore never closed"),
                    },
                    _ = tokio::time::sleep_until(wake.unwrap_or(now).into()), if wake.is_some() => {}
                }
            };
            self.busy.lock().expect("busy lock").extend(batch.rooms.iter().copied());
            let (store, busy, done) = (self.store.clone(), self.busy.clone(), done_tx.clone());
            let gate = self.gate.clone();
            let began = Instant::now();
            self.running.push(began);
            let transaction = async move {
                let rooms = batch.rooms;
                if gate.is_open() {
                    commit(&store, batch.jobs, batch.rows).await;
                } else {
                    metrics::counter!("stoa_commits_gated_total").increment(1);
                    for job in batch.jobs {
                        let _ = job.reply.send(Err(CommitError::Gated("its lease is not renewed, or it is failing over")));
                    }
                }
                // Answers are sent; only now may these rooms' next appends go.
                let mut busy = busy.lock().expect("busy lock");
                for room in &rooms {
                    busy.remove(room);
                }
                drop(busy);
                drop(permit);
                let _ = done.send(began);
            };
            if self.in_flight == 1 {
                // One transaction at a time (always on SQLite): wait for it here. The next batch is what
                // queued meanwhile, as with a task, but a room's append arriving during the
                // commit need not wake this loop: it waits in the queue until the loop takes it.
                transaction.await;
            } else {
                tokio::spawn(transaction);
            }
        }
        // Drain: answer what is queued, then wait for every transaction in flight.
        self.jobs.close();
        self.deferred_rooms.clear();
        for job in self.deferred.drain(..) {
            let _ = job.reply.send(Err(CommitError::Stopped));
        }
        while let Some(job) = self.jobs.recv().await {
            let _ = job.reply.send(Err(CommitError::Stopped));
        }
        let _ = self.permits.acquire_many(self.in_flight as u32).await;
    }

    /// The transaction that began at `started` has ended.
    fn ended(&mut self, started: Instant) {
        if let Some(i) = self.running.iter().position(|&t| t == started) {
            self.running.swap_remove(i);
        }
    }

    /// Put a new job in the batch, or defer it behind its room's earlier append.
    fn offer(&mut self, job: Job, batch: &mut Batch) {
        let room = job.room();
        let waits = batch.rooms.contains(&room)
            || self.deferred_rooms.contains_key(&room)
            || self.busy.lock().expect("busy lock").contains(&room);
        if waits {
            *self.deferred_rooms.entry(room).or_default() += 1;
            self.deferred.push_back(job);
        } else {
            batch.add(job);
        }
    }

    /// Move deferred jobs whose room is free into the batch, keeping each room's order.
    fn take_deferred(&mut self, batch: &mut Batch) {
        if self.deferred.is_empty() {
            return;
        }
        let busy = self.busy.lock().expect("busy lock");
        let mut blocked: HashSet<RoomId> = HashSet::new();
        let mut keep = VecDeque::with_capacity(self.deferred.len());
        for job in self.deferred.drain(..) {
            let room = job.room();
            if batch.rows >= self.max_rows || blocked.contains(&room) || busy.contains(&room) || batch.rooms.contains(&room) {
                blocked.insert(room);
                keep.push_back(job);
            } else {
                if let Some(n) = self.deferred_rooms.get_mut(&room) {
                    *n -= 1;
                    if *n == 0 {
                        self.deferred_rooms.remove(&room);
                    }
                }
                batch.add(job);
            }
        }
        self.deferred = keep;
    }
}

impl Batch {
    fn add(&mut self, job: Job) {
        self.rows += job.request.messages.len();
        self.rooms.insert(job.room());
        self.jobs.push(job);
    }
}

async fn commit(store: &Store, batch: Vec<Job>, rows: usize) {
    let started = Instant::now();
    let (requests, replies): (Vec<AppendRequest>, Vec<_>) = batch.into_iter().map(|j| (j.request, j.reply)).unzip();
    metrics::histogram!("stoa_commit_batch_rows").record(rows as f64);
    let results = commit_isolating(store, requests.into()).await;
    metrics::histogram!("stoa_commit_seconds").record(started.elapsed().as_secs_f64());
    let mut committed = 0u64;
    for (result, reply) in results.into_iter().zip(replies) {
        if let Ok(a) = &result {
            committed += a.outcomes.iter().filter(|o| !o.duplicate).count() as u64;
        }
        let _ = reply.send(result);
    }
    metrics::counter!("stoa_messages_committed_total").increment(committed);
}

/// Commit `requests` in one transaction; if the database refuses it (one room's rows it will
/// not take), commit each half on its own, down to the request it refuses, so one bad row
/// never fails another sender's message. A failed connection fails the whole batch: nothing
/// is gained by retrying its parts.
async fn commit_isolating(store: &Store, requests: Arc<[AppendRequest]>) -> Vec<Result<Appended, CommitError>> {
    match store.append_batch(requests.clone()).await {
        Ok(results) => results.into_iter().map(|r| r.map_err(CommitError::from)).collect(),
        Err(e) if requests.len() > 1 && e.is_refused_statement() => {
            tracing::debug!(error = %e, rooms = requests.len(), "group commit refused; committing its halves apart");
            let (left, right) = requests.split_at(requests.len() / 2);
            let mut results = Box::pin(commit_isolating(store, left.into())).await;
            results.extend(Box::pin(commit_isolating(store, right.into())).await);
            results
        }
        Err(e) => {
            tracing::warn!(error = %e, rooms = requests.len(), "group commit failed");
            metrics::counter!("stoa_commit_failures_total").increment(1);
            requests.iter().map(|_| Err(CommitError::Failed(e.to_string()))).collect()
        }
    }
}
