//! Node leases: liveness, not safety (docs/ha.md). A node renews `alive_until = now() + ttl`
//! on the **database clock**, so no two machines' clocks are ever compared; its peer may take
//! over once the lease has expired on that same clock, or once the node released it.
//!
//! Leases need a store shared by a pair: PostgreSQL or MySQL/MariaDB. SQLite (one node only)
//! has no leases.

use crate::store::{NodeId, Store, StoreError, StoreKind};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use std::time::Duration;

/// A lease as the store sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// Who renewed it last (`node_id/incarnation`).
    pub holder: String,
    /// The holder's process incarnation (a restart gets a new one).
    pub incarnation: i64,
    /// `alive_until < now()` on the database clock.
    pub expired: bool,
    /// Milliseconds until it expires on the database clock (negative once expired).
    pub remaining_ms: i64,
}

/// Why a lease operation could not run.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// SQLite backs a single node; a pair needs a shared server database.
    #[error("leases need PostgreSQL or MySQL/MariaDB; SQLite backs a single node only")]
    Unsupported,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sea_orm::DbErr> for LeaseError {
    fn from(e: sea_orm::DbErr) -> Self {
        LeaseError::Store(StoreError::Db(e))
    }
}

fn backend(store: &Store) -> Result<DbBackend, LeaseError> {
    match store.kind() {
        StoreKind::Postgres => Ok(DbBackend::Postgres),
        StoreKind::MySql => Ok(DbBackend::MySql),
        StoreKind::Sqlite => Err(LeaseError::Unsupported),
    }
}

/// Renew (or take) `node`'s lease for `ttl` from now on the database clock.
pub async fn renew(store: &Store, node: &NodeId, incarnation: i64, ttl: Duration) -> Result<(), LeaseError> {
    let db = backend(store)?;
    let holder = format!("{node}/{incarnation}");
    let micros = ttl.as_micros() as i64;
    let sql = match db {
        DbBackend::Postgres => {
            "INSERT INTO node_leases (node_id, holder, alive_until, incarnation) \
             VALUES ($1, $2, now() + make_interval(secs => $3::double precision / 1000000), $4) \
             ON CONFLICT (node_id) DO UPDATE SET holder = EXCLUDED.holder, \
             alive_until = EXCLUDED.alive_until, incarnation = EXCLUDED.incarnation"
        }
        _ => {
            "INSERT INTO node_leases (node_id, holder, alive_until, incarnation) \
             VALUES (?, ?, NOW(6) + INTERVAL ? MICROSECOND, ?) \
             ON DUPLICATE KEY UPDATE holder = VALUES(holder), \
             alive_until = VALUES(alive_until), incarnation = VALUES(incarnation)"
        }
    };
    let stmt = Statement::from_sql_and_values(db, sql, [node.0.clone().into(), holder.into(), micros.into(), incarnation.into()]);
    store.connection().execute_raw(stmt).await?;
    Ok(())
}

/// Extend `node`'s lease for `ttl` from now, but only while `incarnation` still holds it.
/// `Ok(false)` means it does not: the peer took this node's rooms over (it marks the lease as
/// taken in the same transaction), so this node must step down.
pub async fn extend(store: &Store, node: &NodeId, incarnation: i64, ttl: Duration) -> Result<bool, LeaseError> {
    let db = backend(store)?;
    let micros = ttl.as_micros() as i64;
    let sql = match db {
        DbBackend::Postgres => {
            "UPDATE node_leases SET alive_until = now() + make_interval(secs => $1::double precision / 1000000) \
             WHERE node_id = $2 AND incarnation = $3"
        }
        _ => "UPDATE node_leases SET alive_until = NOW(6) + INTERVAL ? MICROSECOND WHERE node_id = ? AND incarnation = ?",
    };
    let stmt = Statement::from_sql_and_values(db, sql, [micros.into(), node.0.clone().into(), incarnation.into()]);
    let r = store.connection().execute_raw(stmt).await?;
    Ok(r.rows_affected() == 1)
}

/// Give the lease up now (the peer may take over at once).
pub async fn release(store: &Store, node: &NodeId) -> Result<(), LeaseError> {
    let db = backend(store)?;
    let sql = match db {
        DbBackend::Postgres => "UPDATE node_leases SET alive_until = now() - interval '1 second' WHERE node_id = $1",
        _ => "UPDATE node_leases SET alive_until = NOW(6) - INTERVAL 1 SECOND WHERE node_id = ?",
    };
    store.connection().execute_raw(Statement::from_sql_and_values(db, sql, [node.0.clone().into()])).await?;
    Ok(())
}

/// `node`'s lease, judged on the database clock; `None` if it never held one.
pub async fn read(store: &Store, node: &NodeId) -> Result<Option<LeaseState>, LeaseError> {
    let db = backend(store)?;
    let sql = match db {
        DbBackend::Postgres => {
            "SELECT holder, incarnation, alive_until < now() AS expired, \
             CAST(EXTRACT(EPOCH FROM (alive_until - now())) * 1000 AS BIGINT) AS remaining_ms \
             FROM node_leases WHERE node_id = $1"
        }
        _ => {
            "SELECT holder, incarnation, alive_until < NOW(6) AS expired, \
             CAST(TIMESTAMPDIFF(MICROSECOND, NOW(6), alive_until) / 1000 AS SIGNED) AS remaining_ms \
             FROM node_leases WHERE node_id = ?"
        }
    };
    let row = store.connection().query_one_raw(Statement::from_sql_and_values(db, sql, [node.0.clone().into()])).await?;
    let Some(row) = row else { return Ok(None) };
    let expired: bool = match db {
        DbBackend::Postgres => row.try_get("", "expired")?,
        _ => row.try_get::<i64>("", "expired")? != 0,
    };
    Ok(Some(LeaseState {
        holder: row.try_get("", "holder")?,
        incarnation: row.try_get("", "incarnation")?,
        expired,
        remaining_ms: row.try_get("", "remaining_ms")?,
    }))
}
