//! The recovery manager of a node in a redundancy group (docs/ha.md). So far it owns the
//! node's state machine, records every transition in `node_states`, and keeps the node's lease
//! alive on the database clock; watching the peer and taking over come next.

use super::lease;
use super::state::{NodeState, Reason};
use crate::store::{NodeId, Store, now_ms};
use sea_orm::sea_query::{Alias, Expr, Query};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What the recovery manager reports (admin API).
#[derive(Clone, Debug, Serialize)]
pub struct HaStatus {
    pub node: String,
    pub state: NodeState,
    pub reason: Reason,
    /// When the node entered `state`, ms since the Unix epoch.
    pub since_ms: i64,
    /// Whether the last lease renewal succeeded (the `store` critical service).
    pub store_ok: bool,
    /// Milliseconds the lease has left, as of the last renewal (on the database clock).
    pub lease_remaining_ms: Option<i64>,
}

/// Handle to a running recovery manager.
#[derive(Clone)]
pub struct Recovery {
    status: Arc<Mutex<HaStatus>>,
}

impl Recovery {
    /// The current status.
    pub fn status(&self) -> HaStatus {
        self.status.lock().expect("ha status lock").clone()
    }
}

/// Record a transition in `node_states` (time on the database clock).
pub async fn record_transition(store: &Store, node: &NodeId, state: NodeState, reason: Reason) -> Result<(), crate::store::StoreError> {
    let stmt = Query::insert()
        .into_table(Alias::new("node_states"))
        .columns([Alias::new("node_id"), Alias::new("state"), Alias::new("reason"), Alias::new("epoch"), Alias::new("at")])
        .values_panic([
            node.0.clone().into(),
            state.as_str().into(),
            reason.as_str().into(),
            0i64.into(),
            Expr::current_timestamp(),
        ])
        .to_owned();
    store.connection().execute(&stmt).await?;
    Ok(())
}

/// Start the recovery manager: `initializing`, first lease renewal, then `normal`, and keep
/// the lease alive every `renew` until `shutdown`, when the lease is released so a peer need
/// not wait for it to expire.
pub async fn start(
    store: Store,
    node: NodeId,
    ttl: Duration,
    renew: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<(Recovery, tokio::task::JoinHandle<()>)> {
    use anyhow::Context as _;
    let incarnation = now_ms();
    record_transition(&store, &node, NodeState::Initializing, Reason::Initializing).await.context("recording the initial state")?;
    lease::renew(&store, &node, incarnation, ttl).await.context("taking the node lease")?;
    record_transition(&store, &node, NodeState::Normal, Reason::Initializing).await.context("recording the normal state")?;
    tracing::info!(node = %node, state = %NodeState::Normal, ttl_ms = ttl.as_millis() as u64, "node lease taken");
    let status = Arc::new(Mutex::new(HaStatus {
        node: node.0.clone(),
        state: NodeState::Normal,
        reason: Reason::Initializing,
        since_ms: now_ms(),
        store_ok: true,
        lease_remaining_ms: Some(ttl.as_millis() as i64),
    }));
    let shared = status.clone();
    let task = tokio::spawn(async move {
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(renew) => {}
                _ = shutdown.cancelled() => break,
            }
            let result = lease::renew(&store, &node, incarnation, ttl).await;
            let mut s = shared.lock().expect("ha status lock");
            match result {
                Ok(()) => {
                    last_renewal = Instant::now();
                    s.store_ok = true;
                    s.lease_remaining_ms = Some(ttl.as_millis() as i64);
                }
                Err(e) => {
                    s.store_ok = false;
                    let left = ttl.saturating_sub(last_renewal.elapsed());
                    s.lease_remaining_ms = Some(left.as_millis() as i64);
                    tracing::warn!(node = %node, error = %e, left_ms = left.as_millis() as u64, "lease renewal failed");
                }
            }
        }
        if let Err(e) = lease::release(&store, &node).await {
            tracing::warn!(node = %node, error = %e, "could not release the lease on shutdown");
        } else {
            tracing::info!(node = %node, "node lease released");
        }
    });
    Ok((Recovery { status }, task))
}
