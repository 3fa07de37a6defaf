//! The store: SeaORM over PostgreSQL, MySQL/MariaDB or SQLite, and the fenced write path.
//!
//! Every statement that mutates a room checks the room row's `host_node` and `epoch` in the same
//! transaction ([`Fence`]); zero matching rows means the caller no longer hosts the room
//! ([`AppendError::Fenced`]). Appends additionally check `last_seq`, so a room actor whose idea of
//! the log is stale (after an ambiguous commit) learns it instead of writing a gap or a clash.
//!
//! Every SQL statement of the node is here. This file connects and migrates; the rest by what
//! it stores: `rooms` (rooms, affiliations), `log` (messages: the fenced append, reads,
//! archive), `accounts` (users, SCRAM credentials, login sessions), [`cluster`] (a pair's
//! leases, room moves, node states, presence lock), [`audit`] (the admin audit log),
//! [`plugin_state`] (plugins' per-room state), [`bulk`] (bulk room creation for benchmarks and
//! imports), [`merge`] (what `stoa db merge` reads and writes, the job tables) and [`entity`] (the SeaORM entities).

mod accounts;
pub mod audit;
pub mod bulk;
pub mod cluster;
pub mod entity;
mod log;
pub mod merge;
pub mod plugin_state;
mod rooms;

pub use accounts::{ScramRow, SessionFilter, SessionRow, UserScram};
pub use log::{AppendError, AppendRequest, Appended, ArchiveRange, MessageOutcome, NewMessage, StoredMessage};

use crate::ids::{Epoch, NodeId, RoomAddr, RoomId};
use crate::protocol::{Affiliation, RoomConfig, RoomSummary};
use entity::{affiliation, message, room, session, user};
use sea_orm::sea_query::{CaseStatement, Cond, Expr, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, SqlErr, TransactionTrait,
};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Who may write a room: the host node at an epoch. Carried by every room mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub room: RoomId,
    pub host: NodeId,
    pub epoch: Epoch,
}

/// Which database a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
    MySql,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
            StoreKind::MySql => "mysql",
        }
    }
}

/// Errors at the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported backend.
    #[error("unsupported store URL `{0}` (use sqlite://, postgres:// or mysql://)")]
    UnsupportedUrl(String),
    /// A uniqueness rule was violated (room exists, user exists, cid stored).
    #[error("already exists")]
    Conflict,
    /// The caller does not hold the room at its epoch any more.
    #[error("room is fenced: hosted by {host} at epoch {epoch}")]
    Fenced { host: String, epoch: i64 },
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The migration lock could not be taken or released.
    #[error("migration lock: {0}")]
    Lock(String),
    /// Any other database error (connection lost, timeout, SQL error).
    #[error("database: {0}")]
    Db(#[from] DbErr),
    /// A raw sqlx error (pool set-up, migration lock connection).
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// An error of the SQLite group commit's own connection (`store::log::sqlite`).
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store was closed ([`Store::close`]).
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// The database answered and refused a statement (bad data, a constraint, a lock
    /// timeout), as opposed to a lost connection or an exhausted pool: the same statement
    /// with other rows may well succeed.
    pub fn is_refused_statement(&self) -> bool {
        let sqlx = match self {
            StoreError::Db(DbErr::Exec(sea_orm::RuntimeErr::SqlxError(e)) | DbErr::Query(sea_orm::RuntimeErr::SqlxError(e))) => e.as_ref(),
            StoreError::Sqlx(e) => e,
            StoreError::Sqlite(e) => return matches!(e, rusqlite::Error::SqliteFailure(..)),
            _ => return false,
        };
        matches!(sqlx, sqlx::Error::Database(_))
    }

    fn classify(e: DbErr) -> StoreError {
        match e.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => StoreError::Conflict,
            _ => StoreError::Db(e),
        }
    }
}

/// A room as stored.
#[derive(Clone, Debug)]
pub struct RoomRow {
    pub id: RoomId,
    pub address: RoomAddr,
    pub config: RoomConfig,
    pub home_node: NodeId,
    pub host_node: NodeId,
    pub epoch: Epoch,
    pub last_seq: u64,
    pub created_at: i64,
    /// The time of the message at `last_seq` (0: none): a room's messages never go back in
    /// time, so its actor stamps the next one no earlier than this.
    pub last_ts: i64,
}

impl TryFrom<room::Model> for RoomRow {
    type Error = StoreError;
    fn try_from(m: room::Model) -> Result<Self, StoreError> {
        let config = serde_json::from_str(&m.config)
            .map_err(|e| StoreError::Corrupt(format!("config of room {}: {e}", m.address)))?;
        Ok(RoomRow {
            id: RoomId(m.id),
            address: RoomAddr(m.address),
            config,
            home_node: NodeId(m.home_node),
            host_node: NodeId(m.host_node),
            epoch: Epoch(m.epoch),
            last_seq: m.last_seq as u64,
            created_at: m.created_at,
            last_ts: m.last_ts,
        })
    }
}

/// `sql` written with `?` placeholders, numbered (`$1`, `$2`, …) for PostgreSQL.
fn placeholders(db: sea_orm::DbBackend, sql: &str) -> String {
    if db != sea_orm::DbBackend::Postgres {
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

/// A statement for `db` from `sql` with `?` placeholders (see [`placeholders`]).
fn stmt(db: sea_orm::DbBackend, sql: &str, values: Vec<sea_orm::Value>) -> sea_orm::Statement {
    sea_orm::Statement::from_sql_and_values(db, placeholders(db, sql), values)
}

/// End `txn` by `result`: commit it when the work succeeded, roll it back now when it failed (not
/// lazily on the connection's next use: on SQLite a failed transaction would keep the write lock
/// from the retry).
async fn settle<T>(txn: sea_orm::DatabaseTransaction, result: Result<T, StoreError>) -> Result<T, StoreError> {
    match result {
        Ok(value) => {
            txn.commit().await?;
            Ok(value)
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Err(e)
        }
    }
}

/// The columns of a stored message, in the order the bulk inserts (the group commit's
/// transaction path, the merge) give their values.
const MESSAGE_COLUMNS: [message::Column; 9] = [
    message::Column::RoomId,
    message::Column::Seq,
    message::Column::Id,
    message::Column::Sender,
    message::Column::Nick,
    message::Column::Body,
    message::Column::ClientMsgId,
    message::Column::Epoch,
    message::Column::CreatedAt,
];

/// Attempts to open a SQLite database that another process is initialising at the same moment.
const SQLITE_OPEN_RETRIES: u32 = 25;

/// Key of the advisory lock / named lock that serializes migrations across processes.
const MIGRATION_LOCK_KEY: i64 = 0x5374_6f61; // "Stoa"

/// The store of one redundancy group.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// SQLite in a file: the group commit's own connection and thread (`store::log::sqlite`).
    sqlite_writer: Option<Arc<log::SqliteWriter>>,
    kind: StoreKind,
    url: String,
}

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Connect to the store named by `url`. SQLite databases (and their directory) are created
    /// if missing, in WAL mode with the given `synchronous` level.
    pub async fn connect(url: &str, max_connections: u32, sqlite_synchronous: &str) -> Result<Store, StoreError> {
        let settings = crate::config::StoreSettings {
            max_connections,
            sqlite_synchronous: sqlite_synchronous.to_owned(),
            ..Default::default()
        };
        Store::connect_with(url, &settings).await
    }

    /// Connect with every store setting (pool size, SQLite `synchronous` and busy timeout).
    pub async fn connect_with(url: &str, settings: &crate::config::StoreSettings) -> Result<Store, StoreError> {
        Store::open(url, settings, true).await
    }

    /// [`Store::connect_with`]; a SQLite file gets its group-commit thread only if `appends`
    /// (a store that never appends to room logs, such as a merge's target, goes without).
    pub(crate) async fn open(url: &str, settings: &crate::config::StoreSettings, appends: bool) -> Result<Store, StoreError> {
        let max_connections = settings.max_connections;
        let sqlite_synchronous = settings.sqlite_synchronous.as_str();
        let (db, sqlite_writer, kind) = if url.starts_with("sqlite:") {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
            let sync = SqliteSynchronous::from_str(sqlite_synchronous)
                .map_err(|_| StoreError::UnsupportedUrl(format!("synchronous={sqlite_synchronous}")))?;
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(sync)
                .busy_timeout(Duration::from_millis(settings.sqlite_busy_timeout_ms));
            if let Some(dir) = sqlite_path(url).and_then(|p| p.parent().map(|d| d.to_path_buf()))
                && !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(&dir).map_err(|e| StoreError::Lock(format!("create {}: {e}", dir.display())))?;
                }
            let pool_options = SqlitePoolOptions::new()
                .max_connections(max_connections.clamp(1, 8))
                .acquire_timeout(Duration::from_secs(10));
            // Switching a new file to WAL needs a moment of exclusive access and fails at once
            // (without honouring busy_timeout) if another process does the same: retry briefly.
            let mut attempt = 0;
            let pool = loop {
                match pool_options.clone().connect_with(opts.clone()).await {
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("5") && attempt < SQLITE_OPEN_RETRIES => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                    }
                    other => break other?,
                }
            };
            // An in-memory database is the pool's alone: its appends take the general path.
            let writer = match sqlite_path(url).filter(|_| appends) {
                Some(path) => {
                    let busy = Duration::from_millis(settings.sqlite_busy_timeout_ms);
                    Some(Arc::new(log::SqliteWriter::start(&path, sqlite_synchronous, busy)?))
                }
                None => None,
            };
            (sea_orm::SqlxSqliteConnector::from_sqlx_sqlite_pool(pool), writer, StoreKind::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let mut options = sqlx::postgres::PgConnectOptions::from_str(url)?;
            if settings.idle_in_transaction_timeout_ms > 0 {
                let ms = settings.idle_in_transaction_timeout_ms.to_string();
                options = options.options([("idle_in_transaction_session_timeout", ms.as_str())]);
            }
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await?;
            (sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool), None, StoreKind::Postgres)
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url.replacen("mariadb:", "mysql:", 1);
            // Whole seconds, at least 1 when on.
            let idle_timeout_s = settings.idle_in_transaction_timeout_ms.div_ceil(1000);
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        // The fencing argument (docs/ha.md) is made for READ COMMITTED.
                        sqlx::Executor::execute(&mut *conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED").await?;
                        if idle_timeout_s > 0 {
                            // MariaDB only (MySQL has no such variable): ignore a refusal.
                            let set = format!("SET SESSION idle_transaction_timeout = {idle_timeout_s}");
                            let _ = sqlx::Executor::execute(&mut *conn, sqlx::AssertSqlSafe(set)).await;
                        }
                        Ok(())
                    })
                })
                .connect(&url)
                .await?;
            (sea_orm::SqlxMySqlConnector::from_sqlx_mysql_pool(pool), None, StoreKind::MySql)
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        Ok(Store { db, sqlite_writer, kind, url: url.to_owned() })
    }

    /// Close every connection of the store (its pool, and on SQLite the group commit's own).
    pub async fn close(&self) {
        if let Some(writer) = &self.sqlite_writer {
            writer.close().await;
        }
        self.db.clone().close().await.ok();
    }

    /// The URL this store was opened with (it may hold a password: never log it as is).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the group committer should run: on SQLite in a file, the commit thread's runtime,
    /// where its transactions run (`store/log/sqlite.rs`); elsewhere, any runtime (`None`).
    pub fn commit_runtime(&self) -> Option<tokio::runtime::Handle> {
        self.sqlite_writer.as_ref().map(|writer| writer.runtime().clone())
    }

    /// Which backend this store runs on.
    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The SeaORM connection (for tests and tools).
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Run pending migrations under a cross-process lock, so two nodes starting at once never
    /// race: PostgreSQL advisory lock, MySQL `GET_LOCK`, or an exclusive file lock for SQLite.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        use migration::MigratorTrait;
        match self.kind {
            StoreKind::Postgres => {
                use sqlx::Connection;
                let mut lock = sqlx::PgConnection::connect(&self.url).await?;
                sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATION_LOCK_KEY).execute(&mut lock).await?;
                let result = migration::Migrator::up(&self.db, None).await;
                sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK_KEY).execute(&mut lock).await?;
                lock.close().await?;
                result?;
            }
            StoreKind::MySql => {
                use sqlx::{Connection, Row};
                let url = self.url.replacen("mariadb:", "mysql:", 1);
                let mut lock = sqlx::MySqlConnection::connect(&url).await?;
                let got: Option<i64> = sqlx::query("SELECT GET_LOCK(?, 300)")
                    .bind(format!("stoa_migrate_{MIGRATION_LOCK_KEY}"))
                    .fetch_one(&mut lock)
                    .await?
                    .try_get(0)?;
                if got != Some(1) {
                    return Err(StoreError::Lock("GET_LOCK timed out after 300 s".into()));
                }
                let result = migration::Migrator::up(&self.db, None).await;
                sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(format!("stoa_migrate_{MIGRATION_LOCK_KEY}"))
                    .execute(&mut lock)
                    .await?;
                lock.close().await?;
                result?;
            }
            StoreKind::Sqlite => {
                let lock_path = sqlite_path(&self.url)
                    .map(|p| p.with_extension("migrate-lock"))
                    .unwrap_or_else(|| PathBuf::from("stoa.migrate-lock"));
                let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
                    file.lock()?;
                    Ok(file)
                })
                .await
                .map_err(|e| StoreError::Lock(e.to_string()))?
                .map_err(|e| StoreError::Lock(e.to_string()))?;
                let result = migration::Migrator::up(&self.db, None).await;
                drop(file); // closing the file releases the lock
                result?;
            }
        }
        Ok(())
    }

    /// Round-trip to the database (health probe).
    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }
}

fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}
