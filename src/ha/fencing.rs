//! The store statements that move rooms between the nodes of a pair (docs/ha.md), and the
//! presence lock that tells a dead peer from a paused one.
//!
//! Each move is one epoch-bumping `UPDATE` on `rooms`: every later write of the old host fails
//! its `host_node = me AND epoch = my_epoch` check in the same transaction, so no timing is
//! involved in safety. PostgreSQL and MySQL/MariaDB only (SQLite backs a single node).

use super::lease::LeaseError;
use crate::store::{NodeId, Store, StoreKind};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn backend(store: &Store) -> Result<DbBackend, LeaseError> {
    match store.kind() {
        StoreKind::Postgres => Ok(DbBackend::Postgres),
        StoreKind::MySql => Ok(DbBackend::MySql),
        StoreKind::Sqlite => Err(LeaseError::Unsupported),
    }
}

/// `sql` written with `?` placeholders, numbered (`$1`, `$2`, …) for PostgreSQL.
fn placeholders(db: DbBackend, sql: &str) -> String {
    if db != DbBackend::Postgres {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

fn stmt(db: DbBackend, sql: &str, values: Vec<sea_orm::Value>) -> Statement {
    Statement::from_sql_and_values(db, placeholders(db, sql), values)
}

/// Take over every room `failed` hosts: one statement that makes `me` the host with a new
/// epoch, and, in the same transaction, mark `failed`'s lease as taken so that node steps
/// down if it was only paused (its next conditional renewal finds another incarnation), and
/// record `me` as the host of every room service `failed` served ([`service_host`]), rooms or
/// none. Returns how many rooms moved.
pub async fn take_over(store: &Store, failed: &NodeId, me: &NodeId) -> Result<u64, LeaseError> {
    let db = backend(store)?;
    let txn = store.connection().begin().await?;
    // A paused node may hold room rows locked (a commit in flight): do not wait on it for long;
    // the caller retries, and the server ends such a session after
    // `store.idle_in_transaction_timeout_ms`.
    let update = match db {
        DbBackend::Postgres => {
            txn.execute_raw(Statement::from_string(db, "SET LOCAL lock_timeout = '2s'")).await?;
            "UPDATE rooms SET host_node = ?, epoch = epoch + 1 WHERE host_node = ?"
        }
        _ => "SET STATEMENT innodb_lock_wait_timeout = 2 FOR UPDATE rooms SET host_node = ?, epoch = epoch + 1 WHERE host_node = ?",
    };
    let moved = txn.execute_raw(stmt(db, update, vec![me.0.clone().into(), failed.0.clone().into()])).await?.rows_affected();
    txn.execute_raw(stmt(
        db,
        "UPDATE node_leases SET incarnation = -1, holder = ? WHERE node_id = ?",
        vec![format!("taken-by/{me}").into(), failed.0.clone().into()],
    ))
    .await?;
    // The services `failed` served (its own, and any it was backing up) are now `me`'s.
    txn.execute_raw(stmt(
        db,
        "UPDATE service_hosts SET host_node = ? WHERE host_node = ?",
        vec![me.0.clone().into(), failed.0.clone().into()],
    ))
    .await?;
    set_service_host(&txn, db, failed, me).await?;
    txn.commit().await?;
    Ok(moved)
}

/// Record that `host` serves `home`'s room service (part of a move's transaction).
async fn set_service_host(conn: &impl ConnectionTrait, db: DbBackend, home: &NodeId, host: &NodeId) -> Result<(), LeaseError> {
    let upsert = match db {
        DbBackend::Postgres => {
            "INSERT INTO service_hosts (home_node, host_node) VALUES (?, ?) \
             ON CONFLICT (home_node) DO UPDATE SET host_node = EXCLUDED.host_node"
        }
        _ => "INSERT INTO service_hosts (home_node, host_node) VALUES (?, ?) ON DUPLICATE KEY UPDATE host_node = VALUES(host_node)",
    };
    conn.execute_raw(stmt(db, upsert, vec![home.0.clone().into(), host.0.clone().into()])).await?;
    Ok(())
}

/// The node serving `home`'s room service: its `service_hosts` row; without one, the host of
/// any of `home`'s rooms that is away (a takeover made before that table existed); else `home`.
pub async fn service_host(store: &Store, home: &NodeId) -> Result<NodeId, LeaseError> {
    let db = backend(store)?;
    let conn = store.connection();
    let row = conn.query_one_raw(stmt(db, "SELECT host_node FROM service_hosts WHERE home_node = ?", vec![home.0.clone().into()])).await?;
    if let Some(row) = row {
        return Ok(NodeId(row.try_get_by_index(0)?));
    }
    let away = stmt(
        db,
        "SELECT host_node FROM rooms WHERE home_node = ? AND host_node <> ? LIMIT 1",
        vec![home.0.clone().into(), home.0.clone().into()],
    );
    match conn.query_one_raw(away).await? {
        Some(row) => Ok(NodeId(row.try_get_by_index(0)?)),
        None => Ok(home.clone()),
    }
}

/// Send `home`'s rooms that `from` hosts back to `home`, with a new epoch: fallback (the
/// backup `from` returns them) and recovery (a node reclaiming its rooms from a peer that is
/// gone, `home` = itself), and `home` serves its room service again, in one transaction.
/// Returns how many rooms moved.
pub async fn return_home(store: &Store, home: &NodeId, from: &NodeId) -> Result<u64, LeaseError> {
    let db = backend(store)?;
    let txn = store.connection().begin().await?;
    let r = txn
        .execute_raw(stmt(
            db,
            "UPDATE rooms SET host_node = ?, epoch = epoch + 1 WHERE home_node = ? AND host_node = ?",
            vec![home.0.clone().into(), home.0.clone().into(), from.0.clone().into()],
        ))
        .await?;
    set_service_host(&txn, db, home, home).await?;
    txn.commit().await?;
    Ok(r.rows_affected())
}

async fn count(store: &Store, sql: &str, values: Vec<sea_orm::Value>) -> Result<u64, LeaseError> {
    let db = backend(store)?;
    let row = store.connection().query_one_raw(stmt(db, sql, values)).await?;
    let n: i64 = match row {
        Some(row) => row.try_get_by_index(0)?,
        None => 0,
    };
    Ok(n as u64)
}

/// How many rooms `node` hosts.
pub async fn hosted_by(store: &Store, node: &NodeId) -> Result<u64, LeaseError> {
    count(store, "SELECT COUNT(*) FROM rooms WHERE host_node = ?", vec![node.0.clone().into()]).await
}

/// How many of `home`'s rooms another node hosts (non-zero while `home` is failed over).
pub async fn hosted_elsewhere(store: &Store, home: &NodeId) -> Result<u64, LeaseError> {
    count(
        store,
        "SELECT COUNT(*) FROM rooms WHERE home_node = ? AND host_node <> ?",
        vec![home.0.clone().into(), home.0.clone().into()],
    )
    .await
}

/// `node`'s last recorded transition: (state, reason, ms since the Unix epoch).
pub async fn last_state(store: &Store, node: &NodeId) -> Result<Option<(String, String, i64)>, LeaseError> {
    let db = backend(store)?;
    let at_ms = match db {
        DbBackend::Postgres => "CAST(EXTRACT(EPOCH FROM at) * 1000 AS BIGINT)",
        _ => "CAST(UNIX_TIMESTAMP(at) * 1000 AS SIGNED)",
    };
    let sql = format!("SELECT state, reason, {at_ms} AS at_ms FROM node_states WHERE node_id = ? ORDER BY id DESC LIMIT 1");
    let row = store.connection().query_one_raw(stmt(db, &sql, vec![node.0.clone().into()])).await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some((row.try_get("", "state")?, row.try_get("", "reason")?, row.try_get("", "at_ms")?)))
}

/// The name of `node`'s presence lock.
fn presence_name(node: &NodeId) -> String {
    format!("stoa-presence/{node}")
}

/// PostgreSQL advisory locks take two int4 keys: a fixed class ('ST') and the name's hash.
const PG_PRESENCE_CLASS: i32 = 0x5354;

/// Does `node` hold its presence lock, i.e. does a live process of it have a session in the
/// store? A SIGKILLed process loses its sockets at once and with them its sessions and locks;
/// a paused or partitioned one keeps them. Used only to confirm a death faster than the lease
/// (liveness); safety never depends on it.
pub async fn is_present(store: &Store, node: &NodeId) -> Result<bool, LeaseError> {
    let db = backend(store)?;
    let sql = match db {
        DbBackend::Postgres => {
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = ?::oid AND objid = (hashtext(?) & 2147483647)::oid AND objsubid = 2"
        }
        _ => "SELECT COUNT(*) FROM (SELECT IS_USED_LOCK(?) AS holder) l WHERE holder IS NOT NULL",
    };
    let values = match db {
        DbBackend::Postgres => vec![PG_PRESENCE_CLASS.into(), presence_name(node).into()],
        _ => vec![presence_name(node).into()],
    };
    Ok(count(store, sql, values).await? > 0)
}

/// Hold this node's presence lock on a dedicated connection until `shutdown`, re-taking it
/// whenever the connection is lost. Runs as a task.
/// `held` turns true once the lock is held (and false while it is being re-taken).
pub async fn hold_presence(url: String, kind: StoreKind, node: NodeId, held: tokio::sync::watch::Sender<bool>, shutdown: CancellationToken) {
    use sqlx::Connection as _;
    let name = presence_name(&node);
    loop {
        let outcome = async {
            match kind {
                StoreKind::Postgres => {
                    let mut conn = sqlx::PgConnection::connect(&url).await?;
                    loop {
                        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2) & 2147483647)")
                            .bind(PG_PRESENCE_CLASS)
                            .bind(&name)
                            .fetch_one(&mut conn)
                            .await?;
                        if got {
                            break;
                        }
                        // The previous incarnation's session has not gone yet.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    tracing::debug!(node = %node, "presence lock held");
                    let _ = held.send(true);
                    // Keep the session busy enough to notice its loss.
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok::<(), sqlx::Error>(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        sqlx::query("SELECT 1").execute(&mut conn).await?;
                    }
                }
                _ => {
                    let mut conn = sqlx::MySqlConnection::connect(&url.replacen("mariadb:", "mysql:", 1)).await?;
                    loop {
                        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)").bind(&name).fetch_one(&mut conn).await?;
                        if got == Some(1) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    tracing::debug!(node = %node, "presence lock held");
                    let _ = held.send(true);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        sqlx::query("SELECT 1").execute(&mut conn).await?;
                    }
                }
            }
        }
        .await;
        match outcome {
            Ok(()) => return,
            Err(e) => {
                let _ = held.send(false);
                tracing::warn!(node = %node, error = %e, "presence lock lost; taking it again");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        assert_eq!(placeholders(DbBackend::Postgres, "a = ? AND b = ?"), "a = $1 AND b = $2");
        assert_eq!(placeholders(DbBackend::MySql, "a = ? AND b = ?"), "a = ? AND b = ?");
    }
}
