//! The statements of a redundancy pair (docs/ha.md): node leases on the database clock, the
//! one-statement room moves, which node serves each room service, the node-state log and the
//! presence lock. `ha/` decides when to run them; this module is how.
//!
//! Leases are liveness, not safety. A node renews `alive_until = now() + ttl` on the
//! **database clock**, so no two machines' clocks are ever compared; its peer may take over once
//! the lease has expired on that same clock, or once the node released it.
//!
//! Each move is one epoch-bumping `UPDATE` on `rooms`: every later write of the old host fails
//! its `host_node = me AND epoch = my_epoch` check in the same transaction, so no timing is
//! involved in safety.
//!
//! All of it needs a store shared by a pair: PostgreSQL or MySQL/MariaDB. SQLite (one node
//! only) has none of it and answers [`ClusterError::Unsupported`].

use super::{Store, StoreError, StoreKind, stmt};
use crate::ids::NodeId;
use sea_orm::sea_query::{Alias, Expr, Query};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

/// A node's last recorded state transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedState {
    pub state: String,
    pub reason: String,
    /// When, in ms since the Unix epoch (database clock).
    pub at_ms: i64,
}

/// One row of the node-state log, for the console's history of transitions.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StateTransition {
    /// The row's id: later transitions have larger ids.
    pub id: i64,
    pub node: String,
    pub state: String,
    pub reason: String,
    /// When, in ms since the Unix epoch (database clock).
    pub at_ms: i64,
}

/// Why a pair statement could not run.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// SQLite backs a single node; a pair needs a shared server database.
    #[error("leases need PostgreSQL or MySQL/MariaDB; SQLite backs a single node only")]
    Unsupported,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sea_orm::DbErr> for ClusterError {
    fn from(e: sea_orm::DbErr) -> Self {
        ClusterError::Store(StoreError::Db(e))
    }
}

/// The name of `node`'s presence lock in the store at `url`. PostgreSQL advisory locks belong
/// to one database already; MySQL/MariaDB named locks are server-wide, so there the name holds
/// the database too (two pairs, or two test runs, with the same node ids on one server must not
/// take each other's locks), hashed when it would pass the 64-character limit.
pub(super) fn presence_name(url: &str, kind: StoreKind, node: &NodeId) -> String {
    let plain = format!("stoa-presence/{node}");
    if kind != StoreKind::MySql {
        return plain;
    }
    let database = url::Url::parse(url).map(|u| u.path().trim_start_matches('/').to_owned()).unwrap_or_default();
    let name = format!("{plain}/{database}");
    if name.len() <= 64 {
        return name;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{node}\0{database}").as_bytes());
    format!("stoa-presence/{}", hex::encode(&digest[..16]))
}

/// PostgreSQL advisory locks take two int4 keys: a fixed class ('ST') and the name's hash.
pub(super) const PG_PRESENCE_CLASS: i32 = 0x5354;

impl Store {
    fn pair_backend(&self) -> Result<DbBackend, ClusterError> {
        match self.kind() {
            StoreKind::Postgres => Ok(DbBackend::Postgres),
            StoreKind::MySql => Ok(DbBackend::MySql),
            StoreKind::Sqlite => Err(ClusterError::Unsupported),
        }
    }

    async fn count(&self, sql: &str, values: Vec<sea_orm::Value>) -> Result<u64, ClusterError> {
        let db = self.pair_backend()?;
        let row = self.connection().query_one_raw(stmt(db, sql, values)).await?;
        let n: i64 = match row {
            Some(row) => row.try_get_by_index(0)?,
            None => 0,
        };
        Ok(n as u64)
    }
    /// Renew (or take) `node`'s lease for `ttl` from now on the database clock.
    pub async fn renew_lease(&self, node: &NodeId, incarnation: i64, ttl: Duration) -> Result<(), ClusterError> {
        let db = self.pair_backend()?;
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
        self.connection().execute_raw(stmt).await?;
        Ok(())
    }

    /// Extend `node`'s lease for `ttl` from now, but only while `incarnation` still holds it.
    /// `Ok(false)` means it does not: the peer took this node's rooms over (it marks the lease as
    /// taken in the same transaction), so this node must step down.
    pub async fn extend_lease(&self, node: &NodeId, incarnation: i64, ttl: Duration) -> Result<bool, ClusterError> {
        let db = self.pair_backend()?;
        let micros = ttl.as_micros() as i64;
        let sql = match db {
            DbBackend::Postgres => {
                "UPDATE node_leases SET alive_until = now() + make_interval(secs => $1::double precision / 1000000) \
                 WHERE node_id = $2 AND incarnation = $3"
            }
            _ => "UPDATE node_leases SET alive_until = NOW(6) + INTERVAL ? MICROSECOND WHERE node_id = ? AND incarnation = ?",
        };
        let stmt = Statement::from_sql_and_values(db, sql, [micros.into(), node.0.clone().into(), incarnation.into()]);
        let r = self.connection().execute_raw(stmt).await?;
        Ok(r.rows_affected() == 1)
    }

    /// Give the lease up now (the peer may take over at once).
    pub async fn release_lease(&self, node: &NodeId) -> Result<(), ClusterError> {
        let db = self.pair_backend()?;
        let sql = match db {
            DbBackend::Postgres => "UPDATE node_leases SET alive_until = now() - interval '1 second' WHERE node_id = $1",
            _ => "UPDATE node_leases SET alive_until = NOW(6) - INTERVAL 1 SECOND WHERE node_id = ?",
        };
        self.connection().execute_raw(Statement::from_sql_and_values(db, sql, [node.0.clone().into()])).await?;
        Ok(())
    }

    /// `node`'s lease, judged on the database clock; `None` if it never held one.
    pub async fn lease(&self, node: &NodeId) -> Result<Option<LeaseState>, ClusterError> {
        let db = self.pair_backend()?;
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
        let row = self.connection().query_one_raw(Statement::from_sql_and_values(db, sql, [node.0.clone().into()])).await?;
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

    /// Take over every room `failed` hosts: one statement that makes `me` the host with a new
    /// epoch, and, in the same transaction, mark `failed`'s lease as taken so that node steps
    /// down if it was only paused (its next conditional renewal finds another incarnation), and
    /// record `me` as the host of every room service `failed` served (`service_host`), rooms or
    /// none. Returns how many rooms moved.
    pub async fn take_over(&self, failed: &NodeId, me: &NodeId) -> Result<u64, ClusterError> {
        let db = self.pair_backend()?;
        let txn = self.connection().begin().await?;
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
        Self::set_service_host(&txn, db, failed, me).await?;
        txn.commit().await?;
        Ok(moved)
    }

    /// Record that `host` serves `home`'s room service (part of a move's transaction).
    async fn set_service_host(conn: &impl ConnectionTrait, db: DbBackend, home: &NodeId, host: &NodeId) -> Result<(), ClusterError> {
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
    pub async fn service_host(&self, home: &NodeId) -> Result<NodeId, ClusterError> {
        let db = self.pair_backend()?;
        let conn = self.connection();
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
    pub async fn return_home(&self, home: &NodeId, from: &NodeId) -> Result<u64, ClusterError> {
        let db = self.pair_backend()?;
        let txn = self.connection().begin().await?;
        let r = txn
            .execute_raw(stmt(
                db,
                "UPDATE rooms SET host_node = ?, epoch = epoch + 1 WHERE home_node = ? AND host_node = ?",
                vec![home.0.clone().into(), home.0.clone().into(), from.0.clone().into()],
            ))
            .await?;
        Self::set_service_host(&txn, db, home, home).await?;
        txn.commit().await?;
        Ok(r.rows_affected())
    }

    /// Bring the planner's statistics of `rooms` up to date, after a takeover or a fallback
    /// moved many rooms at once. Until the next automatic analyze, the statistics still say the
    /// new host hosts few rooms, which likely makes `idx_rooms_host_node` look selective to a
    /// statement that checks `host_node` (the commit's fence, on its path for resent posts):
    /// commits of 1–4 s each were seen after a takeover of 100,000 rooms (docs/ha.md,
    /// *Takeover*).
    pub async fn refresh_room_statistics(&self) -> Result<(), ClusterError> {
        let db = self.pair_backend()?;
        let sql = if db == DbBackend::Postgres { "ANALYZE rooms" } else { "ANALYZE TABLE rooms" };
        self.connection().execute_raw(Statement::from_string(db, sql)).await?;
        Ok(())
    }

    /// How many rooms `node` hosts.
    pub async fn rooms_hosted_by(&self, node: &NodeId) -> Result<u64, ClusterError> {
        self.count("SELECT COUNT(*) FROM rooms WHERE host_node = ?", vec![node.0.clone().into()]).await
    }

    /// How many of `home`'s rooms another node hosts (non-zero while `home` is failed over).
    pub async fn rooms_hosted_elsewhere(&self, home: &NodeId) -> Result<u64, ClusterError> {
        self.count(
            "SELECT COUNT(*) FROM rooms WHERE home_node = ? AND host_node <> ?",
            vec![home.0.clone().into(), home.0.clone().into()],
        )
        .await
    }

    /// `node`'s last recorded transition.
    pub async fn last_node_state(&self, node: &NodeId) -> Result<Option<RecordedState>, ClusterError> {
        let db = self.pair_backend()?;
        let at_ms = match db {
            DbBackend::Postgres => "CAST(EXTRACT(EPOCH FROM at) * 1000 AS BIGINT)",
            _ => "CAST(UNIX_TIMESTAMP(at) * 1000 AS SIGNED)",
        };
        let sql = format!("SELECT state, reason, {at_ms} AS at_ms FROM node_states WHERE node_id = ? ORDER BY id DESC LIMIT 1");
        let row = self.connection().query_one_raw(stmt(db, &sql, vec![node.0.clone().into()])).await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(RecordedState { state: row.try_get("", "state")?, reason: row.try_get("", "reason")?, at_ms: row.try_get("", "at_ms")? }))
    }

    /// The transitions of every node recorded after row `after` (0: from the start), the last
    /// `limit` of them, oldest first.
    pub async fn state_transitions(&self, after: i64, limit: u64) -> Result<Vec<StateTransition>, ClusterError> {
        let db = self.pair_backend()?;
        let at_ms = match db {
            DbBackend::Postgres => "CAST(EXTRACT(EPOCH FROM at) * 1000 AS BIGINT)",
            _ => "CAST(UNIX_TIMESTAMP(at) * 1000 AS SIGNED)",
        };
        let sql = format!(
            "SELECT id, node_id, state, reason, {at_ms} AS at_ms FROM node_states WHERE id > ? ORDER BY id DESC LIMIT {}",
            limit.min(i64::MAX as u64)
        );
        let rows = self.connection().query_all_raw(stmt(db, &sql, vec![after.into()])).await?;
        let mut list = rows
            .into_iter()
            .map(|r| {
                Ok(StateTransition {
                    id: r.try_get("", "id")?,
                    node: r.try_get("", "node_id")?,
                    state: r.try_get("", "state")?,
                    reason: r.try_get("", "reason")?,
                    at_ms: r.try_get("", "at_ms")?,
                })
            })
            .collect::<Result<Vec<_>, sea_orm::DbErr>>()?;
        list.reverse();
        Ok(list)
    }

    /// Does `node` hold its presence lock, i.e. does a live process of it have a session in the
    /// store? A SIGKILLed process loses its sockets at once and with them its sessions and locks;
    /// a paused or partitioned one keeps them. Used only to confirm a death faster than the lease
    /// (liveness); safety never depends on it.
    pub async fn is_present(&self, node: &NodeId) -> Result<bool, ClusterError> {
        let db = self.pair_backend()?;
        let sql = match db {
            DbBackend::Postgres => {
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND classid = ?::oid AND objid = (hashtext(?) & 2147483647)::oid AND objsubid = 2"
            }
            _ => "SELECT COUNT(*) FROM (SELECT IS_USED_LOCK(?) AS holder) l WHERE holder IS NOT NULL",
        };
        let name = presence_name(self.url(), self.kind(), node);
        let values = match db {
            DbBackend::Postgres => vec![PG_PRESENCE_CLASS.into(), name.into()],
            _ => vec![name.into()],
        };
        Ok(self.count(sql, values).await? > 0)
    }

    /// Record a transition in `node_states` (time on the database clock; `epoch` holds the
    /// node's lease incarnation).
    pub async fn record_node_state(&self, node: &NodeId, state: &str, reason: &str, incarnation: i64) -> Result<(), StoreError> {
        let stmt = Query::insert()
            .into_table(Alias::new("node_states"))
            .columns([Alias::new("node_id"), Alias::new("state"), Alias::new("reason"), Alias::new("epoch"), Alias::new("at")])
            .values_panic([node.0.clone().into(), state.into(), reason.into(), incarnation.into(), Expr::current_timestamp()])
            .to_owned();
        self.connection().execute(&stmt).await?;
        Ok(())
    }

    /// A task that holds `node`'s presence lock on a dedicated connection until `shutdown`,
    /// re-taking it whenever the connection is lost. `held` turns true once the lock is held
    /// (and false while it is being re-taken).
    pub fn hold_presence(&self, node: NodeId, held: tokio::sync::watch::Sender<bool>, shutdown: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        hold_presence(self.url().to_owned(), self.kind(), node, held, shutdown)
    }
}

async fn hold_presence(url: String, kind: StoreKind, node: NodeId, held: tokio::sync::watch::Sender<bool>, shutdown: CancellationToken) {
    use sqlx::Connection as _;
    let name = presence_name(&url, kind, &node);
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
    fn mysql_presence_locks_name_their_database() {
        let node = NodeId("1a".into());
        assert_eq!(presence_name("postgres://u@h/db1", StoreKind::Postgres, &node), "stoa-presence/1a");
        let (one, two) = (presence_name("mysql://u@h:3306/db1", StoreKind::MySql, &node), presence_name("mysql://u@h:3306/db2", StoreKind::MySql, &node));
        assert_eq!(one, "stoa-presence/1a/db1");
        assert_ne!(one, two);
        let long = presence_name(&format!("mysql://u@h/{}", "d".repeat(64)), StoreKind::MySql, &node);
        assert!(long.len() <= 64 && long.starts_with("stoa-presence/"), "{long}");
    }

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        assert_eq!(crate::store::placeholders(DbBackend::Postgres, "a = ? AND b = ?"), "a = $1 AND b = $2");
        assert_eq!(crate::store::placeholders(DbBackend::MySql, "a = ? AND b = ?"), "a = ? AND b = ?");
    }
}
