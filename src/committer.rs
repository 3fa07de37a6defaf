//! The group committer: batches appends from many rooms into one transaction.
//!
//! Room actors hand it one [`AppendRequest`] at a time per room (a room never has two in
//! flight, which is what keeps its seq contiguous). The committer collects requests until the
//! batch holds `max_batch_rows` rows or its first request has waited `max_batch_delay_us`, then
//! commits it while it already collects the next one, with up to `max_in_flight` transactions at
//! once (one on SQLite). Each request's answer is sent only after its transaction committed.

use crate::config::CommitterSettings;
use crate::store::{AppendError, AppendRequest, Appended, Store, StoreKind};
use std::sync::Arc;
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
}

struct Job {
    request: AppendRequest,
    reply: oneshot::Sender<Result<Appended, CommitError>>,
}

/// Handle to the group committer; cheap to clone, one per room actor.
#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
}

/// Jobs waiting for the committer; beyond this room actors wait (backpressure).
const QUEUE_CAPACITY: usize = 16 * 1024;

impl Committer {
    /// Start the committer task on the current tokio runtime.
    pub fn start(store: Store, settings: &CommitterSettings, shutdown: CancellationToken) -> (Committer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let in_flight = if store.kind() == StoreKind::Sqlite { 1 } else { settings.max_in_flight };
        let task = tokio::spawn(run(
            store,
            rx,
            settings.max_batch_rows,
            Duration::from_micros(settings.max_batch_delay_us),
            in_flight,
            shutdown,
        ));
        (Committer { jobs: tx }, task)
    }

    /// Append one room's messages; resolves after the commit (or its failure).
    pub async fn append(&self, request: AppendRequest) -> Result<Appended, CommitError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { request, reply }).await.map_err(|_| CommitError::Stopped)?;
        answer.await.unwrap_or(Err(CommitError::Stopped))
    }
}

async fn run(
    store: Store,
    mut jobs: mpsc::Receiver<Job>,
    max_rows: usize,
    max_delay: Duration,
    in_flight: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    loop {
        let first = tokio::select! {
            job = jobs.recv() => match job { Some(job) => job, None => break },
            _ = shutdown.cancelled() => break,
        };
        let started = Instant::now();
        let mut rows = first.request.messages.len();
        let mut batch = vec![first];
        // Take whatever is already queued; then, if a gather delay is configured, wait for more
        // until the row cap or the delay. With no delay a batch goes as soon as a transaction
        // slot is free, and batches still grow under load while every slot is busy (below).
        while rows < max_rows {
            match jobs.try_recv() {
                Ok(job) => {
                    rows += job.request.messages.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        while rows < max_rows && !max_delay.is_zero() {
            let left = max_delay.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => { rows += job.request.messages.len(); batch.push(job); }
                    None => break,
                },
                _ = tokio::time::sleep(left) => break,
            }
        }
        // While every transaction slot is busy, keep growing the batch: that is group commit.
        let permit = loop {
            if let Ok(p) = permits.clone().try_acquire_owned() {
                break p;
            }
            tokio::select! {
                p = permits.clone().acquire_owned() => break p.expect("semaphore never closed"),
                job = jobs.recv(), if rows < max_rows => match job {
                    Some(job) => { rows += job.request.messages.len(); batch.push(job); }
                    None => break permits.clone().acquire_owned().await.expect("semaphore never closed"),
                },
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            commit(&store, batch, rows).await;
            drop(permit);
        });
    }
    // Drain: answer what is queued, then wait for every transaction in flight.
    jobs.close();
    while let Some(job) = jobs.recv().await {
        let _ = job.reply.send(Err(CommitError::Stopped));
    }
    let _ = permits.acquire_many(in_flight as u32).await;
}

async fn commit(store: &Store, batch: Vec<Job>, rows: usize) {
    let started = Instant::now();
    let (requests, replies): (Vec<AppendRequest>, Vec<_>) = batch.into_iter().map(|j| (j.request, j.reply)).unzip();
    metrics::histogram!("stoa_commit_batch_rows").record(rows as f64);
    match store.append_batch(&requests).await {
        Ok(results) => {
            metrics::histogram!("stoa_commit_seconds").record(started.elapsed().as_secs_f64());
            let mut committed = 0u64;
            for (result, reply) in results.into_iter().zip(replies) {
                if let Ok(a) = &result {
                    committed += a.outcomes.iter().filter(|o| !o.duplicate).count() as u64;
                }
                let _ = reply.send(result.map_err(CommitError::from));
            }
            metrics::counter!("stoa_messages_committed_total").increment(committed);
        }
        Err(e) => {
            tracing::warn!(error = %e, rooms = requests.len(), rows, "group commit failed");
            metrics::counter!("stoa_commit_failures_total").increment(1);
            for reply in replies {
                let _ = reply.send(Err(CommitError::Failed(e.to_string())));
            }
        }
    }
}
