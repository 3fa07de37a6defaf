//! The store: SeaORM over PostgreSQL, MySQL/MariaDB or SQLite, and the fenced write path.
//!
//! Every statement that mutates a room checks the room row's `host_node` and `epoch` in the same
//! transaction ([`Fence`]); zero matching rows means the caller no longer hosts the room
//! ([`AppendError::Fenced`]). Appends additionally check `last_seq`, so a room actor whose idea of
//! the log is stale (after an ambiguous commit) learns it instead of writing a gap or a clash.

pub mod audit;
pub mod bulk;
pub mod entity;
pub mod plugin_state;

use crate::protocol::{Affiliation, RoomAddr, RoomConfig, RoomSummary};
use entity::{affiliation, message, room, session, user};
use sea_orm::sea_query::{CaseStatement, Cond, Expr, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, SqlErr, TransactionTrait,
};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A node's id (`node.id`), as recorded in `home_node` / `host_node`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A room's fencing token: bumped every time its host changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub i64);

/// The primary key of a room row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoomId(pub i64);

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
}

impl StoreError {
    /// The database answered and refused a statement (bad data, a constraint, a lock
    /// timeout), as opposed to a lost connection or an exhausted pool: the same statement
    /// with other rows may well succeed.
    pub fn is_refused_statement(&self) -> bool {
        let sqlx = match self {
            StoreError::Db(DbErr::Exec(sea_orm::RuntimeErr::SqlxError(e)) | DbErr::Query(sea_orm::RuntimeErr::SqlxError(e))) => e.as_ref(),
            StoreError::Sqlx(e) => e,
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
        })
    }
}

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    /// The message's unique id (XMPP's stanza-id and MAM id).
    pub id: String,
    pub sender: String,
    pub nick: String,
    pub body: String,
    pub client_msg_id: String,
    pub created_at: i64,
}

impl From<message::Model> for StoredMessage {
    fn from(m: message::Model) -> Self {
        StoredMessage { seq: m.seq as u64, id: m.id, sender: m.sender, nick: m.nick, body: m.body, client_msg_id: m.client_msg_id, created_at: m.created_at }
    }
}

/// Which messages of a room an archive query (XMPP MAM) asks for.
#[derive(Clone, Debug, Default)]
pub struct ArchiveRange {
    /// Only seqs above this (0: from the first).
    pub after: u64,
    /// Only seqs below this.
    pub before: Option<u64>,
    /// Only messages committed at or after this time (Unix ms).
    pub start_ms: Option<i64>,
    /// Only messages committed at or before this time (Unix ms).
    pub end_ms: Option<i64>,
    /// Only messages sent under this nick.
    pub nick: Option<String>,
}

/// A message a room actor wants appended; the store assigns its seq.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// A unique id (a UUIDv7 the room makes): XMPP's stanza-id, kept with the message.
    pub id: String,
    pub sender: String,
    pub nick: String,
    pub body: String,
    pub client_msg_id: String,
    pub created_at: i64,
}

/// One room's appends in a group commit: written only if the room row still matches
/// `fence` and `base_seq` (the last seq the actor knows).
#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub fence: Fence,
    pub base_seq: u64,
    pub messages: Vec<NewMessage>,
}

/// What became of one message of an [`AppendRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageOutcome {
    pub seq: u64,
    pub created_at: i64,
    /// The `(room, sender, cid)` was already stored: `seq` is the original one.
    pub duplicate: bool,
}

/// A committed [`AppendRequest`]: one outcome per message, in order, and the room's new last seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub outcomes: Vec<MessageOutcome>,
    pub last_seq: u64,
}

/// Why one room's part of a group commit was not written (the rest of the batch was).
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another node (or a newer epoch) hosts the room now.
    #[error("room is fenced: hosted by {host} at epoch {epoch}")]
    Fenced { host: String, epoch: i64 },
    /// The room's log is ahead of what the actor knew; it must resync from `last_seq`.
    #[error("room log moved on to seq {last_seq}")]
    Stale { last_seq: u64 },
    /// The room row is gone (destroyed).
    #[error("room no longer exists")]
    Gone,
}

/// Most rows in one INSERT: keeps every backend under its bind-parameter limit.
const INSERT_CHUNK_ROWS: usize = 500;

/// Attempts to open a SQLite database that another process is initialising at the same moment.
const SQLITE_OPEN_RETRIES: u32 = 25;

/// Key of the advisory lock / named lock that serializes migrations across processes.
const MIGRATION_LOCK_KEY: i64 = 0x5374_6f61; // "Stoa"

/// The store of one redundancy group.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
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
        let max_connections = settings.max_connections;
        let sqlite_synchronous = settings.sqlite_synchronous.as_str();
        let (db, kind) = if url.starts_with("sqlite:") {
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
            (sea_orm::SqlxSqliteConnector::from_sqlx_sqlite_pool(pool), StoreKind::Sqlite)
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
            (sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool), StoreKind::Postgres)
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url.replacen("mariadb:", "mysql:", 1);
            // Whole seconds, at least 1 when on.
            let idle_timeout_s = settings.idle_in_transaction_timeout_ms.div_ceil(1000);
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        // The fencing argument (DESIGN.md) is made for READ COMMITTED.
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
            (sea_orm::SqlxMySqlConnector::from_sqlx_mysql_pool(pool), StoreKind::MySql)
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        Ok(Store { db, kind, url: url.to_owned() })
    }

    /// The URL this store was opened with (it may hold a password: never log it as is).
    pub fn url(&self) -> &str {
        &self.url
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

    // ---- rooms ---------------------------------------------------------------------------

    /// Create a room hosted by `home` at epoch 1, with `owner` as its owner.
    /// [`StoreError::Conflict`] if the address is taken.
    pub async fn create_room(
        &self,
        address: &RoomAddr,
        config: &RoomConfig,
        owner: &str,
        home: &NodeId,
    ) -> Result<RoomRow, StoreError> {
        let now = now_ms();
        let config_json = serde_json::to_string(config).expect("room config serializes");
        let txn = self.begin_write().await?;
        let inserted = room::Entity::insert(room::ActiveModel {
            address: Set(address.0.clone()),
            config: Set(config_json),
            public: Set(config.public),
            home_node: Set(home.0.clone()),
            host_node: Set(home.0.clone()),
            epoch: Set(1),
            last_seq: Set(0),
            created_at: Set(now),
            ..Default::default()
        })
        .exec(&txn)
        .await
        .map_err(StoreError::classify)?;
        let id = inserted.last_insert_id;
        affiliation::Entity::insert(affiliation::ActiveModel {
            room_id: Set(id),
            user_name: Set(owner.to_owned()),
            affiliation: Set(Affiliation::Owner.as_str().to_owned()),
        })
        .exec(&txn)
        .await
        .map_err(StoreError::classify)?;
        txn.commit().await?;
        Ok(RoomRow {
            id: RoomId(id),
            address: address.clone(),
            config: config.clone(),
            home_node: home.clone(),
            host_node: home.clone(),
            epoch: Epoch(1),
            last_seq: 0,
            created_at: now,
        })
    }

    /// The room at `address`, if it exists.
    pub async fn load_room(&self, address: &RoomAddr) -> Result<Option<RoomRow>, StoreError> {
        room::Entity::find()
            .filter(room::Column::Address.eq(address.as_str()))
            .one(&self.db)
            .await?
            .map(RoomRow::try_from)
            .transpose()
    }

    /// The room with primary key `id`, if it exists.
    pub async fn load_room_by_id(&self, id: RoomId) -> Result<Option<RoomRow>, StoreError> {
        room::Entity::find_by_id(id.0).one(&self.db).await?.map(RoomRow::try_from).transpose()
    }

    /// The rooms at `addresses` hosted by `host`, with their affiliations, in one round trip
    /// per table (bulk activation after a takeover or a fallback).
    pub async fn load_rooms_hosted(
        &self,
        addresses: &[RoomAddr],
        host: &NodeId,
    ) -> Result<Vec<(RoomRow, HashMap<String, Affiliation>)>, StoreError> {
        let rows = room::Entity::find()
            .filter(room::Column::Address.is_in(addresses.iter().map(|a| a.as_str())))
            .filter(room::Column::HostNode.eq(host.0.as_str()))
            .all(&self.db)
            .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let mut affiliations: HashMap<i64, HashMap<String, Affiliation>> = HashMap::new();
        if !ids.is_empty() {
            for r in affiliation::Entity::find().filter(affiliation::Column::RoomId.is_in(ids)).all(&self.db).await? {
                let a = Affiliation::parse(&r.affiliation)
                    .ok_or_else(|| StoreError::Corrupt(format!("affiliation `{}`", r.affiliation)))?;
                affiliations.entry(r.room_id).or_default().insert(r.user_name, a);
            }
        }
        rows.into_iter()
            .map(|r| {
                let affs = affiliations.remove(&r.id).unwrap_or_default();
                Ok((RoomRow::try_from(r)?, affs))
            })
            .collect()
    }

    /// Every affiliation of a room other than `none`.
    pub async fn load_affiliations(&self, id: RoomId) -> Result<HashMap<String, Affiliation>, StoreError> {
        let rows = affiliation::Entity::find()
            .filter(affiliation::Column::RoomId.eq(id.0))
            .all(&self.db)
            .await?;
        rows.into_iter()
            .map(|r| {
                let a = Affiliation::parse(&r.affiliation)
                    .ok_or_else(|| StoreError::Corrupt(format!("affiliation `{}`", r.affiliation)))?;
                Ok((r.user_name, a))
            })
            .collect()
    }

    /// Check the fence inside `txn`: locks the room row; zero rows means fenced.
    async fn check_fence<C: ConnectionTrait>(&self, txn: &C, fence: &Fence) -> Result<(), StoreError> {
        let stmt = Query::update()
            .table(room::Entity)
            .value(room::Column::Epoch, Expr::col(room::Column::Epoch))
            .and_where(room::Column::Id.eq(fence.room.0))
            .and_where(room::Column::HostNode.eq(fence.host.0.as_str()))
            .and_where(room::Column::Epoch.eq(fence.epoch.0))
            .to_owned();
        if txn.execute(&stmt).await?.rows_affected() == 1 {
            return Ok(());
        }
        Err(self.fenced_error(txn, fence.room).await)
    }

    async fn fenced_error<C: ConnectionTrait>(&self, conn: &C, id: RoomId) -> StoreError {
        match room::Entity::find_by_id(id.0).one(conn).await {
            Ok(Some(row)) => StoreError::Fenced { host: row.host_node, epoch: row.epoch },
            Ok(None) => StoreError::Fenced { host: String::new(), epoch: 0 },
            Err(e) => StoreError::Db(e),
        }
    }

    /// Store a new room config (fenced).
    pub async fn update_config(&self, fence: &Fence, config: &RoomConfig) -> Result<(), StoreError> {
        let stmt = Query::update()
            .table(room::Entity)
            .value(room::Column::Config, serde_json::to_string(config).expect("room config serializes"))
            .value(room::Column::Public, config.public)
            .and_where(room::Column::Id.eq(fence.room.0))
            .and_where(room::Column::HostNode.eq(fence.host.0.as_str()))
            .and_where(room::Column::Epoch.eq(fence.epoch.0))
            .to_owned();
        if self.db.execute(&stmt).await?.rows_affected() == 1 {
            Ok(())
        } else {
            Err(self.fenced_error(&self.db, fence.room).await)
        }
    }

    /// Set (or, with `Affiliation::None`, remove) a user's affiliation (fenced).
    pub async fn set_affiliation(&self, fence: &Fence, user: &str, affiliation: Affiliation) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        self.check_fence(&txn, fence).await?;
        if affiliation == Affiliation::None {
            affiliation::Entity::delete_many()
                .filter(affiliation::Column::RoomId.eq(fence.room.0))
                .filter(affiliation::Column::UserName.eq(user))
                .exec(&txn)
                .await?;
        } else {
            affiliation::Entity::insert(affiliation::ActiveModel {
                room_id: Set(fence.room.0),
                user_name: Set(user.to_owned()),
                affiliation: Set(affiliation.as_str().to_owned()),
            })
            .on_conflict(
                OnConflict::columns([affiliation::Column::RoomId, affiliation::Column::UserName])
                    .update_column(affiliation::Column::Affiliation)
                    .to_owned(),
            )
            .exec(&txn)
            .await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Delete a room, its log and its affiliations (fenced).
    pub async fn destroy_room(&self, fence: &Fence) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        self.check_fence(&txn, fence).await?;
        message::Entity::delete_many().filter(message::Column::RoomId.eq(fence.room.0)).exec(&txn).await?;
        affiliation::Entity::delete_many()
            .filter(affiliation::Column::RoomId.eq(fence.room.0))
            .exec(&txn)
            .await?;
        self.plugin_state_delete_room(&txn, fence.room).await?;
        room::Entity::delete_by_id(fence.room.0).exec(&txn).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Rooms `user` may see: public ones and those where the user has an affiliation (at most `limit`).
    pub async fn list_rooms_for(&self, user: &str, after: Option<&str>, limit: u64) -> Result<Vec<RoomSummary>, StoreError> {
        let affiliated: HashMap<i64, Affiliation> = affiliation::Entity::find()
            .filter(affiliation::Column::UserName.eq(user))
            .all(&self.db)
            .await?
            .into_iter()
            .filter_map(|a| Affiliation::parse(&a.affiliation).map(|aff| (a.room_id, aff)))
            .collect();
        let visible_ids: Vec<i64> = affiliated
            .iter()
            .filter(|(_, a)| **a != Affiliation::Outcast)
            .map(|(id, _)| *id)
            .collect();
        let mut cond = Cond::any().add(room::Column::Public.eq(true));
        if !visible_ids.is_empty() {
            cond = cond.add(room::Column::Id.is_in(visible_ids));
        }
        let outcast: Vec<i64> = affiliated.iter().filter(|(_, a)| **a == Affiliation::Outcast).map(|(id, _)| *id).collect();
        let mut query = room::Entity::find().filter(cond);
        if !outcast.is_empty() {
            // In SQL, so a page holds `limit` rooms the user may see.
            query = query.filter(room::Column::Id.is_not_in(outcast));
        }
        if let Some(after) = after {
            query = query.filter(room::Column::Address.gt(after));
        }
        let rows = query
            .order_by_asc(room::Column::Address)
            .limit(limit)
            .all(&self.db)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for m in rows {
            let aff = affiliated.get(&m.id).copied();
            if aff == Some(Affiliation::Outcast) {
                continue;
            }
            let r = RoomRow::try_from(m)?;
            out.push(RoomSummary {
                room: r.address,
                subject: r.config.subject,
                public: r.config.public,
                last_seq: r.last_seq,
                affiliation: aff,
            });
        }
        Ok(out)
    }

    /// Every room, for the admin API and `stoa room list` (ordered by address, paged).
    pub async fn list_rooms(&self, offset: u64, limit: u64) -> Result<Vec<RoomRow>, StoreError> {
        room::Entity::find()
            .order_by_asc(room::Column::Address)
            .offset(offset)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(RoomRow::try_from)
            .collect()
    }

    /// Number of rooms in the store.
    pub async fn count_rooms(&self) -> Result<u64, StoreError> {
        use sea_orm::PaginatorTrait;
        Ok(room::Entity::find().count(&self.db).await?)
    }

    // ---- messages ------------------------------------------------------------------------

    /// Messages of a room with `after < seq < before`, ascending, at most `limit`. With
    /// `newest_first` the *last* `limit` of that range are returned (still ascending).
    pub async fn messages(
        &self,
        room: RoomId,
        after: u64,
        before: Option<u64>,
        limit: u64,
        newest_first: bool,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut q = message::Entity::find()
            .filter(message::Column::RoomId.eq(room.0))
            .filter(message::Column::Seq.gt(after as i64));
        if let Some(before) = before {
            q = q.filter(message::Column::Seq.lt(before as i64));
        }
        q = if newest_first {
            q.order_by_desc(message::Column::Seq)
        } else {
            q.order_by_asc(message::Column::Seq)
        };
        let mut rows: Vec<StoredMessage> = q
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(StoredMessage::from)
            .collect();
        if newest_first {
            rows.reverse();
        }
        Ok(rows)
    }

    /// The seq of the message whose unique id is `id` in `room`, if it is there.
    pub async fn message_seq(&self, room: RoomId, id: &str) -> Result<Option<u64>, StoreError> {
        let row = message::Entity::find()
            .filter(message::Column::RoomId.eq(room.0))
            .filter(message::Column::Id.eq(id))
            .one(&self.db)
            .await?;
        Ok(row.map(|m| m.seq as u64))
    }

    /// Messages of `room` in `range` (seq after/before, time from/until, one nick): at most
    /// `limit`, from the oldest, or from the newest when `newest_first`; ascending either way.
    /// And how many messages the range holds, ignoring its seq bounds (a MAM result's count).
    pub async fn archive(&self, room: RoomId, range: &ArchiveRange, limit: u64, newest_first: bool) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        let filtered = || {
            let mut q = message::Entity::find().filter(message::Column::RoomId.eq(room.0));
            if let Some(t) = range.start_ms {
                q = q.filter(message::Column::CreatedAt.gte(t));
            }
            if let Some(t) = range.end_ms {
                q = q.filter(message::Column::CreatedAt.lte(t));
            }
            if let Some(nick) = &range.nick {
                q = q.filter(message::Column::Nick.eq(nick.as_str()));
            }
            q
        };
        let count = sea_orm::PaginatorTrait::count(filtered(), &self.db).await?;
        let mut q = filtered().filter(message::Column::Seq.gt(range.after as i64));
        if let Some(before) = range.before {
            q = q.filter(message::Column::Seq.lt(before as i64));
        }
        q = if newest_first { q.order_by_desc(message::Column::Seq) } else { q.order_by_asc(message::Column::Seq) };
        let mut rows: Vec<StoredMessage> = q.limit(limit).all(&self.db).await?.into_iter().map(StoredMessage::from).collect();
        if newest_first {
            rows.reverse();
        }
        Ok((rows, count))
    }

    /// One group commit: every request's messages in one transaction. Each room's part is
    /// written only if its row still matches its fence and `base_seq`; the others are answered
    /// with an [`AppendError`] and the rest still commit. Messages whose `(room, sender, cid)`
    /// is already stored are answered with the original seq and not stored again.
    ///
    /// `Err` means the whole transaction failed (and nothing of it is visible).
    pub async fn append_batch(&self, requests: &[AppendRequest]) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        match self.try_append(requests, false).await {
            // A unique violation means some cid is already stored (a resend the room actor had
            // no memory of, e.g. after a restart): redo the batch looking every cid up first.
            Err(StoreError::Conflict) => self.try_append(requests, true).await,
            other => other,
        }
    }

    async fn try_append(
        &self,
        requests: &[AppendRequest],
        check_duplicates: bool,
    ) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {
        let txn = self.begin_write().await?;
        match self.append_in(&txn, requests, check_duplicates).await {
            Ok(answers) => {
                txn.commit().await?;
                Ok(answers)
            }
            Err(e) => {
                // Roll back now, not lazily on the connection's next use: on SQLite the failed
                // transaction would otherwise keep the write lock from the retry.
                let _ = txn.rollback().await;
                Err(e)
            }
        }
    }

    /// Start a transaction that will write. On SQLite it takes the write lock at BEGIN
    /// (`BEGIN IMMEDIATE`), so it waits for the lock (busy timeout) instead of failing when a
    /// read snapshot cannot be upgraded.
    async fn begin_write(&self) -> Result<sea_orm::DatabaseTransaction, StoreError> {
        if self.kind == StoreKind::Sqlite {
            let options = sea_orm::TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            };
            Ok(self.db.begin_with_options(options).await?)
        } else {
            Ok(self.db.begin().await?)
        }
    }

    async fn append_in(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        requests: &[AppendRequest],
        check_duplicates: bool,
    ) -> Result<Vec<Result<Appended, AppendError>>, StoreError> {

        // Plan: which messages of each request are new, and the seq each one gets.
        let mut plans: Vec<Vec<MessageOutcome>> = Vec::with_capacity(requests.len());
        for req in requests {
            let existing = if check_duplicates { self.stored_cids(txn, req).await? } else { HashMap::new() };
            let mut next = req.base_seq;
            let mut seen_in_request: HashMap<(&str, &str), MessageOutcome> = HashMap::new();
            let mut plan = Vec::with_capacity(req.messages.len());
            for m in &req.messages {
                let outcome = if let Some(o) = existing.get(&(m.sender.clone(), m.client_msg_id.clone())) {
                    *o
                } else if let Some(o) = seen_in_request
                    .get(&(m.sender.as_str(), m.client_msg_id.as_str()))
                    .filter(|_| check_duplicates)
                {
                    MessageOutcome { duplicate: true, ..*o }
                } else {
                    next += 1;
                    let o = MessageOutcome { seq: next, created_at: m.created_at, duplicate: false };
                    seen_in_request.insert((m.sender.as_str(), m.client_msg_id.as_str()), o);
                    o
                };
                plan.push(outcome);
            }
            plans.push(plan);
        }

        // Fence + advance last_seq for every room that has new rows, in one statement.
        let writing: Vec<usize> = (0..requests.len())
            .filter(|&i| plans[i].iter().any(|o| !o.duplicate))
            .collect();
        let mut rejected: HashMap<usize, AppendError> = HashMap::new();
        if !writing.is_empty() {
            let new_last: HashMap<usize, u64> = writing.iter().map(|&i| (i, last_new_seq(&plans[i], requests[i].base_seq))).collect();
            let mut case = CaseStatement::new();
            let mut any = Cond::any();
            for &i in &writing {
                let r = &requests[i];
                case = case.case(room::Column::Id.eq(r.fence.room.0), Expr::val(new_last[&i] as i64));
                any = any.add(
                    Cond::all()
                        .add(room::Column::Id.eq(r.fence.room.0))
                        .add(room::Column::HostNode.eq(r.fence.host.0.as_str()))
                        .add(room::Column::Epoch.eq(r.fence.epoch.0))
                        .add(room::Column::LastSeq.eq(r.base_seq as i64)),
                );
            }
            let case = case.finally(Expr::col(room::Column::LastSeq));
            let stmt = Query::update().table(room::Entity).value(room::Column::LastSeq, case).cond_where(any).to_owned();
            let updated = txn.execute(&stmt).await?.rows_affected();
            if updated != writing.len() as u64 {
                // Find which rooms failed: their rows do not show our new last_seq under our fence.
                let ids: Vec<i64> = writing.iter().map(|&i| requests[i].fence.room.0).collect();
                let rows: HashMap<i64, room::Model> = room::Entity::find()
                    .filter(room::Column::Id.is_in(ids))
                    .all(txn)
                    .await?
                    .into_iter()
                    .map(|m| (m.id, m))
                    .collect();
                for &i in &writing {
                    let r = &requests[i];
                    let err = match rows.get(&r.fence.room.0) {
                        None => Some(AppendError::Gone),
                        Some(row) if row.host_node != r.fence.host.0 || row.epoch != r.fence.epoch.0 => {
                            Some(AppendError::Fenced { host: row.host_node.clone(), epoch: row.epoch })
                        }
                        Some(row) if row.last_seq as u64 != new_last[&i] => Some(AppendError::Stale { last_seq: row.last_seq as u64 }),
                        Some(_) => None,
                    };
                    if let Some(err) = err {
                        rejected.insert(i, err);
                    }
                }
            }
        }

        // Insert the new rows of every room that passed its fence.
        let columns = [
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
        let mut rows: Vec<(&Fence, &NewMessage, MessageOutcome)> = Vec::new();
        for &i in writing.iter().filter(|i| !rejected.contains_key(i)) {
            let r = &requests[i];
            for (m, o) in r.messages.iter().zip(&plans[i]) {
                if !o.duplicate {
                    rows.push((&r.fence, m, *o));
                }
            }
        }
        let mut insert = Query::insert().into_table(message::Entity).columns(columns).to_owned();
        let mut pending = 0;
        for (fence, m, o) in rows {
            insert.values_panic([
                fence.room.0.into(),
                (o.seq as i64).into(),
                m.id.clone().into(),
                m.sender.clone().into(),
                m.nick.clone().into(),
                m.body.clone().into(),
                m.client_msg_id.clone().into(),
                fence.epoch.0.into(),
                m.created_at.into(),
            ]);
            pending += 1;
            if pending == INSERT_CHUNK_ROWS {
                txn.execute(&insert).await.map_err(StoreError::classify)?;
                insert = Query::insert().into_table(message::Entity).columns(columns).to_owned();
                pending = 0;
            }
        }
        if pending > 0 {
            txn.execute(&insert).await.map_err(StoreError::classify)?;
        }

        Ok(plans
            .into_iter()
            .enumerate()
            .map(|(i, outcomes)| match rejected.remove(&i) {
                Some(err) => Err(err),
                None => {
                    let last_seq = last_new_seq(&outcomes, requests[i].base_seq);
                    Ok(Appended { outcomes, last_seq })
                }
            })
            .collect())
    }

    /// Already-stored `(sender, cid)` of a request's messages, with their original outcome.
    async fn stored_cids<C: ConnectionTrait>(
        &self,
        conn: &C,
        req: &AppendRequest,
    ) -> Result<HashMap<(String, String), MessageOutcome>, StoreError> {
        let cids: HashSet<&str> = req.messages.iter().map(|m| m.client_msg_id.as_str()).collect();
        let rows = message::Entity::find()
            .filter(message::Column::RoomId.eq(req.fence.room.0))
            .filter(message::Column::ClientMsgId.is_in(cids))
            .all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|m| {
                let o = MessageOutcome { seq: m.seq as u64, created_at: m.created_at, duplicate: true };
                ((m.sender, m.client_msg_id), o)
            })
            .collect())
    }

    // ---- users and sessions --------------------------------------------------------------

    /// Register a user with its password's argon2 hash and SCRAM credentials.
    /// [`StoreError::Conflict`] if the name is taken.
    pub async fn add_user(&self, name: &str, password_hash: &str, scram: &UserScram) -> Result<(), StoreError> {
        let mut row = user::ActiveModel {
            name: Set(name.to_owned()),
            password_hash: Set(password_hash.to_owned()),
            created_at: Set(now_ms()),
            ..Default::default()
        };
        scram.set_on(&mut row);
        user::Entity::insert(row).exec(&self.db).await.map_err(StoreError::classify)?;
        Ok(())
    }

    /// A registered user's password hash.
    pub async fn user_password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(user::Entity::find_by_id(name.to_owned()).one(&self.db).await?.map(|u| u.password_hash))
    }

    /// A registered user's SCRAM credentials (`None`: no such user).
    pub async fn user_scram(&self, name: &str) -> Result<Option<UserScram>, StoreError> {
        Ok(user::Entity::find_by_id(name.to_owned()).one(&self.db).await?.map(|u| UserScram::of(&u)))
    }

    /// Every registered user name with its creation time, by name.
    pub async fn list_users(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(user::Entity::find()
            .order_by_asc(user::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|u| (u.name, u.created_at))
            .collect())
    }

    /// The registered users without SCRAM credentials for some hash (their password was set
    /// before they were kept, or SASLprep refused it), by name.
    pub async fn users_without_scram(&self) -> Result<Vec<String>, StoreError> {
        Ok(user::Entity::find()
            .filter(Cond::any().add(user::Column::ScramSha1StoredKey.is_null()).add(user::Column::ScramSha256StoredKey.is_null()))
            .order_by_asc(user::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|u| u.name)
            .collect())
    }

    /// Record a session (by token hash).
    pub async fn create_session(&self, token_hash: &str, user: &str, guest: bool, expires_at: i64) -> Result<(), StoreError> {
        session::Entity::insert(session::ActiveModel {
            token_hash: Set(token_hash.to_owned()),
            user_name: Set(user.to_owned()),
            guest: Set(guest),
            created_at: Set(now_ms()),
            expires_at: Set(expires_at),
        })
        .exec(&self.db)
        .await
        .map_err(StoreError::classify)?;
        Ok(())
    }

    /// The (user, guest) of an unexpired session.
    pub async fn lookup_session(&self, token_hash: &str) -> Result<Option<(String, bool)>, StoreError> {
        Ok(session::Entity::find_by_id(token_hash.to_owned())
            .filter(session::Column::ExpiresAt.gt(now_ms()))
            .one(&self.db)
            .await?
            .map(|s| (s.user_name, s.guest)))
    }

    /// Delete a registered user and every session of it, in one transaction. `None` if there
    /// is no such user; else how many sessions ended. Affiliations are room state (written
    /// through the room's fenced path) and stay.
    pub async fn delete_user(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin().await?;
        let deleted = user::Entity::delete_by_id(name.to_owned()).exec(&txn).await?.rows_affected;
        if deleted == 0 {
            txn.rollback().await?;
            return Ok(None);
        }
        let sessions = session::Entity::delete_many().filter(session::Column::UserName.eq(name)).exec(&txn).await?.rows_affected;
        txn.commit().await?;
        Ok(Some(sessions))
    }

    /// Replace a registered user's password hash and SCRAM credentials (all of them: a hash
    /// `scram` lacks is cleared); false if there is no such user.
    pub async fn set_password_hash(&self, name: &str, password_hash: &str, scram: &UserScram) -> Result<bool, StoreError> {
        let mut update = user::Entity::update_many().col_expr(user::Column::PasswordHash, Expr::value(password_hash.to_owned()));
        for (column, value) in scram.columns() {
            update = update.col_expr(column, Expr::value(value));
        }
        let result = update
            .filter(user::Column::Name.eq(name))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected > 0)
    }

    /// Unexpired sessions, oldest first; only `user`'s when given.
    pub async fn list_sessions(&self, user: Option<&str>) -> Result<Vec<SessionRow>, StoreError> {
        let mut q = session::Entity::find().filter(session::Column::ExpiresAt.gt(now_ms()));
        if let Some(u) = user {
            q = q.filter(session::Column::UserName.eq(u));
        }
        Ok(q.order_by_asc(session::Column::CreatedAt)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|s| SessionRow { token_hash: s.token_hash, user: s.user_name, guest: s.guest, created_at: s.created_at, expires_at: s.expires_at })
            .collect())
    }

    /// Delete the sessions `which` names; returns them.
    pub async fn delete_sessions(&self, which: &SessionFilter) -> Result<Vec<SessionRow>, StoreError> {
        let cond = match which {
            SessionFilter::User(u) => session::Column::UserName.eq(u.as_str()),
            SessionFilter::HashPrefix(p) => session::Column::TokenHash.starts_with(p.as_str()),
        };
        let txn = self.db.begin().await?;
        let rows = session::Entity::find().filter(cond.clone()).all(&txn).await?;
        session::Entity::delete_many().filter(cond).exec(&txn).await?;
        txn.commit().await?;
        Ok(rows
            .into_iter()
            .map(|s| SessionRow { token_hash: s.token_hash, user: s.user_name, guest: s.guest, created_at: s.created_at, expires_at: s.expires_at })
            .collect())
    }

    /// Round-trip to the database (health probe).
    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }
}

/// A stored login session (the token itself is never stored, only its SHA-256).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub token_hash: String,
    pub user: String,
    pub guest: bool,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub expires_at: i64,
}

/// A user's SCRAM credentials for one hash (RFC 5802), as stored: the salt, StoredKey and
/// ServerKey in base64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramRow {
    pub salt: String,
    pub iterations: u32,
    pub stored_key: String,
    pub server_key: String,
}

impl ScramRow {
    /// The row of four columns, if all are set (and the count fits).
    fn of(salt: &Option<String>, iterations: Option<i32>, stored_key: &Option<String>, server_key: &Option<String>) -> Option<ScramRow> {
        Some(ScramRow {
            salt: salt.clone()?,
            iterations: u32::try_from(iterations?).ok()?,
            stored_key: stored_key.clone()?,
            server_key: server_key.clone()?,
        })
    }
}

/// A user's SCRAM credentials, per hash; `None` where there are none (the password was set
/// before SCRAM credentials were kept, or SASLprep refused it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserScram {
    pub sha1: Option<ScramRow>,
    pub sha256: Option<ScramRow>,
}

impl UserScram {
    fn of(u: &user::Model) -> UserScram {
        UserScram {
            sha1: ScramRow::of(&u.scram_sha1_salt, u.scram_sha1_iterations, &u.scram_sha1_stored_key, &u.scram_sha1_server_key),
            sha256: ScramRow::of(&u.scram_sha256_salt, u.scram_sha256_iterations, &u.scram_sha256_stored_key, &u.scram_sha256_server_key),
        }
    }

    /// Every SCRAM column with its value (NULL for a hash without credentials).
    fn columns(&self) -> Vec<(user::Column, sea_orm::Value)> {
        use user::Column as C;
        let mut out = Vec::with_capacity(8);
        for (row, [salt, iterations, stored_key, server_key]) in [
            (&self.sha1, [C::ScramSha1Salt, C::ScramSha1Iterations, C::ScramSha1StoredKey, C::ScramSha1ServerKey]),
            (&self.sha256, [C::ScramSha256Salt, C::ScramSha256Iterations, C::ScramSha256StoredKey, C::ScramSha256ServerKey]),
        ] {
            let text = |f: fn(&ScramRow) -> &String| sea_orm::Value::from(row.as_ref().map(|r| f(r).clone()));
            out.push((salt, text(|r| &r.salt)));
            out.push((iterations, sea_orm::Value::from(row.as_ref().map(|r| i32::try_from(r.iterations).unwrap_or(i32::MAX)))));
            out.push((stored_key, text(|r| &r.stored_key)));
            out.push((server_key, text(|r| &r.server_key)));
        }
        out
    }

    /// Set the SCRAM columns of a new row.
    fn set_on(&self, row: &mut user::ActiveModel) {
        use sea_orm::ActiveModelTrait as _;
        for (column, value) in self.columns() {
            row.set(column, value);
        }
    }
}

/// Which sessions [`Store::delete_sessions`] ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionFilter {
    /// Every session of this user.
    User(String),
    /// The sessions whose token hash starts with this (lower-case hex) prefix.
    HashPrefix(String),
}

/// The highest seq a plan stores, or `base` if it stores nothing new.
fn last_new_seq(plan: &[MessageOutcome], base: u64) -> u64 {
    plan.iter().filter(|o| !o.duplicate).map(|o| o.seq).max().unwrap_or(base)
}

fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}
