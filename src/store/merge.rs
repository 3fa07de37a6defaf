//! The statements of `stoa db merge` (docs/merge.md): opening a source read-only, reading it
//! whole (rooms, users, affiliations, plugin state, messages by seq), the checks that no node
//! serves a store, and in the target the job tables and the chunk writes. `merge` decides; this
//! is how.
//!
//! A chunk write is one transaction: the rows the chunk copies and the chunk's row in
//! `merge_chunks` commit together or not at all, so the set of recorded chunks is exactly what
//! the target holds of the job.

use super::entity::{affiliation, message, room, user};
use super::plugin_state::entity as plugin_state;
use super::{Store, StoreError, StoreKind, stmt};
use sea_orm::sea_query::{Alias, Expr, ExprTrait as _, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};
use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

/// Rows per multi-row INSERT: 9 bind parameters a message keeps a statement under SQLite's
/// 32,766 (and PostgreSQL's and MySQL's 65,535) while amortising the round trip.
const INSERT_ROWS: usize = 3000;

/// Messages read from a source per query.
const READ_PAGE_ROWS: u64 = 20_000;

/// A room as a merge reads it from a source: the row as stored, its affiliations and its
/// plugins' state.
#[derive(Clone, Debug)]
pub struct SourceRoom {
    pub row: room::Model,
    pub affiliations: Vec<affiliation::Model>,
    pub plugin_state: Vec<plugin_state::Model>,
}

/// Rows per kind in one store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreCounts {
    pub rooms: u64,
    pub messages: u64,
    pub users: u64,
    pub affiliations: u64,
    pub plugin_state: u64,
}

/// One merge job as recorded in the target's `merge_jobs`.
#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct JobRow {
    pub id: String,
    /// `running`, `done`, `failed`, `refused`.
    pub state: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// JSON.
    pub sources: String,
    /// JSON.
    pub options: String,
    /// JSON.
    pub report: String,
    /// JSON.
    pub counts: String,
    /// JSON.
    pub verification: Option<String>,
    pub error: Option<String>,
}

/// What one chunk writes into the target, with its row in `merge_chunks`.
#[derive(Debug)]
pub enum ChunkWrite<'a> {
    /// Accounts (`users` rows, copied as they are).
    Users(&'a [user::Model]),
    /// A room row (its `id` is the target's), its affiliations and its plugins' state; `room_id`
    /// of the other rows is ignored.
    Room { row: &'a room::Model, affiliations: &'a [affiliation::Model], plugin_state: &'a [plugin_state::Model] },
    /// Messages of the room at `address` (`room_id` is ignored; seqs are final).
    Messages { address: &'a str, messages: &'a [message::Model] },
    /// The room's end: its last seq, the time of its last message (`last_ts`) and its new
    /// epoch.
    RoomEnd { address: &'a str, last_seq: i64, last_ts: i64, epoch: i64 },
}

impl ChunkWrite<'_> {
    /// Rows this chunk writes (recorded with it).
    pub fn rows(&self) -> u64 {
        match self {
            ChunkWrite::Users(u) => u.len() as u64,
            ChunkWrite::Room { affiliations, plugin_state, .. } => 1 + affiliations.len() as u64 + plugin_state.len() as u64,
            ChunkWrite::Messages { messages, .. } => messages.len() as u64,
            ChunkWrite::RoomEnd { .. } => 1,
        }
    }
}

impl Store {
    fn backend(&self) -> DbBackend {
        match self.kind {
            StoreKind::Postgres => DbBackend::Postgres,
            StoreKind::MySql => DbBackend::MySql,
            StoreKind::Sqlite => DbBackend::Sqlite,
        }
    }

    /// Open `url` for reading only, on one connection: a SQLite file must exist and is opened
    /// read-only; PostgreSQL sessions are `default_transaction_read_only`; MySQL/MariaDB
    /// sessions are `TRANSACTION READ ONLY`. A merge never writes a source, and the database
    /// refuses it should a bug try.
    pub async fn open_read_only(url: &str) -> Result<Store, StoreError> {
        let timeout = Duration::from_secs(10);
        let (db, kind) = if url.starts_with("sqlite:") {
            use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
            let path = super::sqlite_path(url).ok_or_else(|| StoreError::UnsupportedUrl(url.to_owned()))?;
            if !path.is_file() {
                return Err(StoreError::Lock(format!("no SQLite database at {}", path.display())));
            }
            let opts = SqliteConnectOptions::from_str(url)?.read_only(true).create_if_missing(false);
            let pool = SqlitePoolOptions::new().max_connections(1).acquire_timeout(timeout).connect_with(opts).await?;
            (sea_orm::SqlxSqliteConnector::from_sqlx_sqlite_pool(pool), StoreKind::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options = sqlx::postgres::PgConnectOptions::from_str(url)?
                .application_name("stoa db merge")
                .options([("default_transaction_read_only", "on")]);
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).acquire_timeout(timeout).connect_with(options).await?;
            (sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool), StoreKind::Postgres)
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(timeout)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::Executor::execute(&mut *conn, "SET SESSION TRANSACTION READ ONLY").await?;
                        Ok(())
                    })
                })
                .connect(&url)
                .await?;
            (sea_orm::SqlxMySqlConnector::from_sqlx_mysql_pool(pool), StoreKind::MySql)
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        Ok(Store { db, sqlite_writer: None, kind, url: url.to_owned() })
    }

    /// The merge's target: like [`Store::connect`], but on one connection (so the check for
    /// other sessions knows its own: every other one, another merge's included, is someone
    /// else's), named `stoa db merge` on PostgreSQL.
    pub async fn open_merge_target(url: &str) -> Result<Store, StoreError> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options = sqlx::postgres::PgConnectOptions::from_str(url)?.application_name("stoa db merge");
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).acquire_timeout(Duration::from_secs(10)).connect_with(options).await?;
            return Ok(Store { db: sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool), sqlite_writer: None, kind: StoreKind::Postgres, url: url.to_owned() });
        }
        // The merge writes its chunks through the pool and never appends to a room's log: no
        // group-commit thread.
        let settings = crate::config::StoreSettings { max_connections: 1, sqlite_synchronous: "normal".into(), ..Default::default() };
        Store::open(url, &settings, false).await
    }

    /// The migrations this store has applied (`seaql_migrations`), by name; empty for an
    /// empty database. Read only: the sources are never migrated.
    pub async fn applied_migrations(&self) -> Result<Vec<String>, StoreError> {
        if !self.has_table("seaql_migrations").await? {
            return Ok(Vec::new());
        }
        let rows = self.db.query_all_raw(stmt(self.backend(), "SELECT version FROM seaql_migrations ORDER BY version", vec![])).await?;
        rows.iter().map(|r| Ok(r.try_get_by_index::<String>(0)?)).collect()
    }

    /// The migrations this binary knows, oldest first.
    pub fn known_migrations() -> Vec<String> {
        use migration::MigratorTrait;
        migration::Migrator::migrations().iter().map(|m| m.name().to_owned()).collect()
    }

    /// Whether `table` exists in this store's database.
    pub async fn has_table(&self, table: &str) -> Result<bool, StoreError> {
        let db = self.backend();
        let sql = match self.kind {
            StoreKind::Postgres => "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?",
            StoreKind::MySql => "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
            StoreKind::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
        };
        let row = self.db.query_one_raw(stmt(db, sql, vec![table.into()])).await?;
        Ok(row.map(|r| r.try_get_by_index::<i64>(0)).transpose()?.unwrap_or(0) > 0)
    }

    /// What shows that a node serves this store now, one line each (empty: none): live node
    /// leases, held presence locks, node states recorded in the last `recent` by a node whose
    /// lease has not ended (one starting up: a stopped node released its lease), and other
    /// sessions on the database (a node without HA holds its pool open); for SQLite, another
    /// process with the database open.
    pub async fn serving_evidence(&self, recent: Duration) -> Result<Vec<String>, StoreError> {
        let mut found = Vec::new();
        let db = self.backend();
        if self.kind == StoreKind::Sqlite {
            if let Some(path) = super::sqlite_path(&self.url)
                && sqlite_open_elsewhere(&path)
            {
                found.push(format!("another process has {} open", path.display()));
            }
            return Ok(found);
        }
        let conn = &self.db;
        if self.has_table("node_leases").await? {
            let sql = match self.kind {
                StoreKind::Postgres => "SELECT node_id, holder FROM node_leases WHERE alive_until > now() AND incarnation <> -1 ORDER BY node_id",
                _ => "SELECT node_id, holder FROM node_leases WHERE alive_until > NOW(6) AND incarnation <> -1 ORDER BY node_id",
            };
            for row in conn.query_all_raw(stmt(db, sql, vec![])).await? {
                let (node, holder): (String, String) = (row.try_get_by_index(0)?, row.try_get_by_index(1)?);
                found.push(format!("node {node} holds a live lease ({holder})"));
            }
            let ms = recent.as_millis() as i64;
            let sql = match self.kind {
                StoreKind::Postgres => "SELECT s.node_id, s.state FROM node_states s WHERE s.at > now() - make_interval(secs => ?::double precision / 1000) \
                     AND NOT EXISTS (SELECT 1 FROM node_leases l WHERE l.node_id = s.node_id AND l.alive_until < now()) ORDER BY s.id",
                _ => "SELECT s.node_id, s.state FROM node_states s WHERE s.at > NOW(6) - INTERVAL ? MICROSECOND \
                      AND NOT EXISTS (SELECT 1 FROM node_leases l WHERE l.node_id = s.node_id AND l.alive_until < NOW(6)) ORDER BY s.id",
            };
            let value: sea_orm::Value = if self.kind == StoreKind::Postgres { ms.into() } else { (ms * 1000).into() };
            let mut seen = HashSet::new();
            for row in conn.query_all_raw(stmt(db, sql, vec![value])).await? {
                let (node, state): (String, String) = (row.try_get_by_index(0)?, row.try_get_by_index(1)?);
                if seen.insert(node.clone()) {
                    found.push(format!("node {node} recorded state {state} less than {} s ago", recent.as_secs()));
                }
            }
        }
        match self.kind {
            StoreKind::Postgres => {
                let sql = "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                           AND classid = ?::oid AND objsubid = 2";
                let n: i64 = conn
                    .query_one_raw(stmt(db, sql, vec![super::cluster::PG_PRESENCE_CLASS.into()]))
                    .await?
                    .map(|r| r.try_get_by_index(0))
                    .transpose()?
                    .unwrap_or(0);
                if n > 0 {
                    found.push(format!("{n} node(s) hold their presence lock"));
                }
                let sql = "SELECT COALESCE(application_name, ''), COALESCE(host(client_addr), 'local') FROM pg_stat_activity \
                           WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'";
                let rows = conn.query_all_raw(stmt(db, sql, vec![])).await?;
                if !rows.is_empty() {
                    let mut who = BTreeMap::<String, usize>::new();
                    for r in &rows {
                        let (app, host): (String, String) = (r.try_get_by_index(0)?, r.try_get_by_index(1)?);
                        *who.entry(format!("{}@{host}", if app.is_empty() { "?" } else { &app })).or_default() += 1;
                    }
                    let list: Vec<String> = who.iter().map(|(w, n)| format!("{n} from {w}")).collect();
                    found.push(format!("{} other session(s) are connected to the database ({})", rows.len(), list.join(", ")));
                }
            }
            _ => {
                let mut nodes: Vec<String> = Vec::new();
                if self.has_table("node_leases").await? {
                    for r in conn.query_all_raw(stmt(db, "SELECT node_id FROM node_leases UNION SELECT DISTINCT node_id FROM node_states", vec![])).await? {
                        nodes.push(r.try_get_by_index(0)?);
                    }
                }
                for node in nodes {
                    let name = super::cluster::presence_name(&self.url, self.kind, &crate::ids::NodeId(node.clone()));
                    let used = conn.query_one_raw(stmt(db, "SELECT IS_USED_LOCK(?) IS NOT NULL", vec![name.into()])).await?;
                    if used.map(|r| r.try_get_by_index::<i64>(0)).transpose()?.unwrap_or(0) != 0 {
                        found.push(format!("node {node} holds its presence lock"));
                    }
                }
                let sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND ID <> CONNECTION_ID()";
                let n: i64 = conn.query_one_raw(stmt(db, sql, vec![])).await?.map(|r| r.try_get_by_index(0)).transpose()?.unwrap_or(0);
                if n > 0 {
                    found.push(format!("{n} other session(s) are connected to the database"));
                }
            }
        }
        Ok(found)
    }

    /// The database's size in bytes, where the backend tells it.
    pub async fn database_bytes(&self) -> Result<Option<u64>, StoreError> {
        let db = self.backend();
        let sql = match self.kind {
            StoreKind::Postgres => "SELECT CAST(pg_database_size(current_database()) AS BIGINT)",
            StoreKind::MySql => "SELECT CAST(COALESCE(SUM(data_length + index_length), 0) AS SIGNED) FROM information_schema.tables WHERE table_schema = DATABASE()",
            StoreKind::Sqlite => "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        };
        let row = self.db.query_one_raw(stmt(db, sql, vec![])).await?;
        Ok(row.map(|r| r.try_get_by_index::<i64>(0)).transpose()?.map(|b| Ord::max(b, 0) as u64))
    }

    /// The directory the database server keeps its files in, where the server tells it (its
    /// free space is then read when that directory is on this machine).
    pub async fn data_directory(&self) -> Result<Option<std::path::PathBuf>, StoreError> {
        let db = self.backend();
        let sql = match self.kind {
            StoreKind::Postgres => "SELECT setting FROM pg_settings WHERE name = 'data_directory'",
            StoreKind::MySql => "SELECT @@datadir",
            StoreKind::Sqlite => return Ok(super::sqlite_path(&self.url).and_then(|p| p.parent().map(|d| d.to_path_buf()))),
        };
        let row = self.db.query_one_raw(stmt(db, sql, vec![])).await.ok().flatten();
        Ok(row.and_then(|r| r.try_get_by_index::<String>(0).ok()).map(std::path::PathBuf::from))
    }

    /// Try, in a transaction rolled back at once, a write of every kind the merge makes; the
    /// error says which privilege is missing.
    pub async fn probe_merge_privileges(&self) -> Result<(), StoreError> {
        let db = self.backend();
        let txn = self.db.begin().await?;
        let result = async {
            txn.execute_raw(stmt(db, "INSERT INTO merge_chunks (job_id, chunk, row_count, done_at) VALUES (?, ?, 0, 0)", vec!["probe".into(), "probe".into()])).await?;
            txn.execute_raw(stmt(db, "DELETE FROM merge_chunks WHERE job_id = ?", vec!["probe".into()])).await?;
            txn.execute_raw(stmt(db, "UPDATE rooms SET epoch = epoch WHERE id < 0", vec![])).await?;
            for table in ["rooms", "messages", "affiliations", "users", "plugin_state", "merge_jobs"] {
                txn.execute_raw(stmt(db, &format!("INSERT INTO {table} SELECT * FROM {table} WHERE 1 = 0"), vec![])).await?;
            }
            Ok::<(), StoreError>(())
        }
        .await;
        txn.rollback().await?;
        result
    }

    /// Every room, by address.
    pub async fn merge_rooms(&self) -> Result<Vec<room::Model>, StoreError> {
        Ok(room::Entity::find().order_by_asc(room::Column::Address).all(&self.db).await?)
    }

    /// How many rows of each kind a merge copies from this store.
    pub async fn merge_counts(&self) -> Result<StoreCounts, StoreError> {
        use sea_orm::PaginatorTrait;
        Ok(StoreCounts {
            rooms: room::Entity::find().count(&self.db).await?,
            messages: message::Entity::find().count(&self.db).await?,
            users: user::Entity::find().count(&self.db).await?,
            affiliations: affiliation::Entity::find().count(&self.db).await?,
            plugin_state: plugin_state::Entity::find().count(&self.db).await?,
        })
    }

    /// Every user, by name.
    pub async fn merge_users(&self) -> Result<Vec<user::Model>, StoreError> {
        Ok(user::Entity::find().order_by_asc(user::Column::Name).all(&self.db).await?)
    }

    /// Messages per room id.
    pub async fn merge_message_counts(&self) -> Result<BTreeMap<i64, u64>, StoreError> {
        let rows: Vec<(i64, i64)> = message::Entity::find()
            .select_only()
            .column(message::Column::RoomId)
            .column_as(Expr::col(message::Column::Seq).count(), "n")
            .group_by(message::Column::RoomId)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|(r, n)| (r, n as u64)).collect())
    }

    /// A room's affiliations (by user) and plugin state (by plugin, key).
    pub async fn merge_room_parts(&self, row: room::Model) -> Result<SourceRoom, StoreError> {
        let affiliations = affiliation::Entity::find()
            .filter(affiliation::Column::RoomId.eq(row.id))
            .order_by_asc(affiliation::Column::UserName)
            .all(&self.db)
            .await?;
        let plugin_state = plugin_state::Entity::find()
            .filter(plugin_state::Column::RoomId.eq(row.id))
            .order_by_asc(plugin_state::Column::Plugin)
            .order_by_asc(plugin_state::Column::Key)
            .all(&self.db)
            .await?;
        Ok(SourceRoom { row, affiliations, plugin_state })
    }

    /// Every message of room `room_id`, by seq (read in pages).
    pub async fn merge_messages(&self, room_id: i64) -> Result<Vec<message::Model>, StoreError> {
        let mut out: Vec<message::Model> = Vec::new();
        loop {
            let after = out.last().map_or(0, |m| m.seq);
            let page = message::Entity::find()
                .filter(message::Column::RoomId.eq(room_id))
                .filter(message::Column::Seq.gt(after))
                .order_by_asc(message::Column::Seq)
                .limit(READ_PAGE_ROWS)
                .all(&self.db)
                .await?;
            let short = (page.len() as u64) < READ_PAGE_ROWS;
            out.extend(page);
            if short {
                return Ok(out);
            }
        }
    }

    /// Which of `addresses` are rooms here.
    pub async fn existing_rooms(&self, addresses: &[String]) -> Result<HashSet<String>, StoreError> {
        let mut found = HashSet::new();
        for chunk in addresses.chunks(1000) {
            let rows: Vec<String> = room::Entity::find()
                .select_only()
                .column(room::Column::Address)
                .filter(room::Column::Address.is_in(chunk.iter().cloned()))
                .into_tuple()
                .all(&self.db)
                .await?;
            found.extend(rows);
        }
        Ok(found)
    }

    /// Which of `names` are users here.
    pub async fn existing_users(&self, names: &[String]) -> Result<HashSet<String>, StoreError> {
        let mut found = HashSet::new();
        for chunk in names.chunks(1000) {
            let rows: Vec<String> = user::Entity::find()
                .select_only()
                .column(user::Column::Name)
                .filter(user::Column::Name.is_in(chunk.iter().cloned()))
                .into_tuple()
                .all(&self.db)
                .await?;
            found.extend(rows);
        }
        Ok(found)
    }

    /// The room at `address` here (its row) and (seq, sender, body) of its every message, by seq.
    pub async fn merge_room_log(&self, address: &str) -> Result<Option<(room::Model, Vec<(i64, String, String)>)>, StoreError> {
        let Some(row) = room::Entity::find().filter(room::Column::Address.eq(address)).one(&self.db).await? else {
            return Ok(None);
        };
        let mut out: Vec<(i64, String, String)> = Vec::new();
        loop {
            let after = out.last().map_or(0, |m| m.0);
            let page: Vec<(i64, String, String)> = message::Entity::find()
                .select_only()
                .columns([message::Column::Seq, message::Column::Sender, message::Column::Body])
                .filter(message::Column::RoomId.eq(row.id))
                .filter(message::Column::Seq.gt(after))
                .order_by_asc(message::Column::Seq)
                .limit(READ_PAGE_ROWS)
                .into_tuple()
                .all(&self.db)
                .await?;
            let short = (page.len() as u64) < READ_PAGE_ROWS;
            out.extend(page);
            if short {
                return Ok(Some((row, out)));
            }
        }
    }

    /// Record a new job.
    pub async fn insert_merge_job(&self, job: &JobRow) -> Result<(), StoreError> {
        let q = Query::insert()
            .into_table(Alias::new("merge_jobs"))
            .columns(["id", "state", "started_at", "finished_at", "sources", "options", "report", "counts", "verification", "error"].map(Alias::new))
            .values_panic([
                job.id.clone().into(),
                job.state.clone().into(),
                job.started_at.into(),
                job.finished_at.into(),
                job.sources.clone().into(),
                job.options.clone().into(),
                job.report.clone().into(),
                job.counts.clone().into(),
                job.verification.clone().into(),
                job.error.clone().into(),
            ])
            .to_owned();
        self.db.execute(&q).await.map_err(StoreError::classify)?;
        Ok(())
    }

    /// Update a job's state, counts, verification, error and end.
    pub async fn update_merge_job(&self, job: &JobRow) -> Result<(), StoreError> {
        let q = Query::update()
            .table(Alias::new("merge_jobs"))
            .value(Alias::new("state"), job.state.clone())
            .value(Alias::new("finished_at"), job.finished_at)
            .value(Alias::new("report"), job.report.clone())
            .value(Alias::new("counts"), job.counts.clone())
            .value(Alias::new("verification"), job.verification.clone())
            .value(Alias::new("error"), job.error.clone())
            .and_where(Expr::col(Alias::new("id")).eq(job.id.clone()))
            .to_owned();
        self.db.execute(&q).await?;
        Ok(())
    }

    /// One job (none when the store has no job tables yet).
    pub async fn merge_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        if !self.has_table("merge_jobs").await? {
            return Ok(None);
        }
        let db = self.backend();
        let sql = "SELECT id, state, started_at, finished_at, sources, options, report, counts, verification, error FROM merge_jobs WHERE id = ?";
        Ok(JobRow::find_by_statement(stmt(db, sql, vec![id.into()])).one(&self.db).await?)
    }

    /// Every job, newest first (none when the store has no job tables yet).
    pub async fn merge_jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        if !self.has_table("merge_jobs").await? {
            return Ok(Vec::new());
        }
        let db = self.backend();
        let sql = "SELECT id, state, started_at, finished_at, sources, options, report, counts, verification, error FROM merge_jobs ORDER BY started_at DESC, id DESC";
        Ok(JobRow::find_by_statement(stmt(db, sql, vec![])).all(&self.db).await?)
    }

    /// The chunks of `job` done so far, with their rows.
    pub async fn merge_chunks_done(&self, job: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        let db = self.backend();
        let rows = self.db.query_all_raw(stmt(db, "SELECT chunk, row_count FROM merge_chunks WHERE job_id = ?", vec![job.into()])).await?;
        let mut out = BTreeMap::new();
        for r in rows {
            out.insert(r.try_get_by_index::<String>(0)?, r.try_get_by_index::<i64>(1)? as u64);
        }
        Ok(out)
    }

    /// Write one chunk and record it, in one transaction.
    pub async fn write_merge_chunk(&self, job: &str, chunk: &str, write: &ChunkWrite<'_>) -> Result<(), StoreError> {
        if let (StoreKind::Postgres, ChunkWrite::Messages { address, messages }) = (self.kind, write) {
            return self.write_messages_chunk_pg(job, chunk, address, messages).await;
        }
        let txn = self.db.begin().await?;
        let result = async {
            write_chunk(&txn, write).await?;
            let record = Query::insert()
                .into_table(Alias::new("merge_chunks"))
                .columns(["job_id", "chunk", "row_count", "done_at"].map(Alias::new))
                .values_panic([job.into(), chunk.into(), (write.rows() as i64).into(), super::now_ms().into()])
                .to_owned();
            txn.execute(&record).await.map_err(StoreError::classify)?;
            Ok::<(), StoreError>(())
        }
        .await;
        super::settle(txn, result).await
    }
}

async fn room_id(txn: &DatabaseTransaction, address: &str) -> Result<i64, StoreError> {
    let id: Option<i64> = room::Entity::find()
        .select_only()
        .column(room::Column::Id)
        .filter(room::Column::Address.eq(address))
        .into_tuple()
        .one(txn)
        .await?;
    id.ok_or_else(|| StoreError::Corrupt(format!("room {address} is not in the target")))
}

async fn write_chunk(txn: &DatabaseTransaction, write: &ChunkWrite<'_>) -> Result<(), StoreError> {
    match write {
        ChunkWrite::Users(users) => {
            for part in users.chunks(INSERT_ROWS / 4) {
                let mut q = Query::insert()
                    .into_table(user::Entity)
                    .columns([
                        user::Column::Name,
                        user::Column::PasswordHash,
                        user::Column::CreatedAt,
                        user::Column::ScramSha1Salt,
                        user::Column::ScramSha1Iterations,
                        user::Column::ScramSha1StoredKey,
                        user::Column::ScramSha1ServerKey,
                        user::Column::ScramSha256Salt,
                        user::Column::ScramSha256Iterations,
                        user::Column::ScramSha256StoredKey,
                        user::Column::ScramSha256ServerKey,
                    ])
                    .to_owned();
                for u in part {
                    q.values_panic([
                        u.name.clone().into(),
                        u.password_hash.clone().into(),
                        u.created_at.into(),
                        u.scram_sha1_salt.clone().into(),
                        u.scram_sha1_iterations.into(),
                        u.scram_sha1_stored_key.clone().into(),
                        u.scram_sha1_server_key.clone().into(),
                        u.scram_sha256_salt.clone().into(),
                        u.scram_sha256_iterations.into(),
                        u.scram_sha256_stored_key.clone().into(),
                        u.scram_sha256_server_key.clone().into(),
                    ]);
                }
                txn.execute(&q).await.map_err(StoreError::classify)?;
            }
        }
        ChunkWrite::Room { row, affiliations, plugin_state } => {
            let q = Query::insert()
                .into_table(room::Entity)
                .columns([
                    room::Column::Address,
                    room::Column::Config,
                    room::Column::Public,
                    room::Column::HomeNode,
                    room::Column::HostNode,
                    room::Column::Epoch,
                    room::Column::LastSeq,
                    room::Column::LastTs,
                    room::Column::CreatedAt,
                ])
                .values_panic([
                    row.address.clone().into(),
                    row.config.clone().into(),
                    row.public.into(),
                    row.home_node.clone().into(),
                    row.host_node.clone().into(),
                    row.epoch.into(),
                    row.last_seq.into(),
                    row.last_ts.into(),
                    row.created_at.into(),
                ])
                .to_owned();
            txn.execute(&q).await.map_err(StoreError::classify)?;
            let id = room_id(txn, &row.address).await?;
            if !affiliations.is_empty() {
                let mut q = Query::insert()
                    .into_table(affiliation::Entity)
                    .columns([affiliation::Column::RoomId, affiliation::Column::UserName, affiliation::Column::Affiliation])
                    .to_owned();
                for a in affiliations.iter() {
                    q.values_panic([id.into(), a.user_name.clone().into(), a.affiliation.clone().into()]);
                }
                txn.execute(&q).await.map_err(StoreError::classify)?;
            }
            if !plugin_state.is_empty() {
                let mut q = Query::insert()
                    .into_table(plugin_state::Entity)
                    .columns([plugin_state::Column::RoomId, plugin_state::Column::Plugin, plugin_state::Column::Key, plugin_state::Column::Value])
                    .to_owned();
                for p in plugin_state.iter() {
                    q.values_panic([id.into(), p.plugin.clone().into(), p.key.clone().into(), p.value.clone().into()]);
                }
                txn.execute(&q).await.map_err(StoreError::classify)?;
            }
        }
        ChunkWrite::Messages { address, messages } => {
            let id = room_id(txn, address).await?;
            for part in messages.chunks(INSERT_ROWS) {
                let mut q = Query::insert().into_table(message::Entity).columns(super::MESSAGE_COLUMNS).to_owned();
                for m in part {
                    q.values_panic([
                        id.into(),
                        m.seq.into(),
                        m.id.clone().into(),
                        m.sender.clone().into(),
                        m.nick.clone().into(),
                        m.body.clone().into(),
                        m.client_msg_id.clone().into(),
                        m.epoch.into(),
                        m.created_at.into(),
                    ]);
                }
                txn.execute(&q).await.map_err(StoreError::classify)?;
            }
        }
        ChunkWrite::RoomEnd { address, last_seq, last_ts, epoch } => {
            let q = Query::update()
                .table(room::Entity)
                .value(room::Column::LastSeq, *last_seq)
                .value(room::Column::LastTs, *last_ts)
                .value(room::Column::Epoch, *epoch)
                .and_where(room::Column::Address.eq(*address))
                .to_owned();
            txn.execute(&q).await?;
        }
    }
    Ok(())
}

/// PostgreSQL: the messages through one `INSERT … SELECT * FROM UNNEST(arrays)`: nine bind
/// parameters whatever the row count, parsed once.
async fn insert_messages_pg(conn: &mut sqlx::PgConnection, room_id: i64, messages: &[message::Model]) -> Result<(), sqlx::Error> {
    let mut arrays = super::log::MessageArrays::with_capacity(messages.len());
    for m in messages {
        arrays.push(room_id, m.seq, m.epoch, &m.id, &m.sender, &m.nick, &m.body, &m.client_msg_id, m.created_at);
    }
    let mut args = sqlx::postgres::PgArguments::default();
    arrays.add_to(&mut args).map_err(sqlx::Error::Encode)?;
    sqlx::query_with(
        "INSERT INTO messages (room_id, seq, id, sender, nick, body, client_msg_id, epoch, created_at) \
         SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[])",
        args,
    )
    .execute(conn)
    .await?;
    Ok(())
}

impl Store {
    /// PostgreSQL's chunk of messages, on sqlx directly (arrays bind there): the room's id, the
    /// rows, the chunk's record, one transaction.
    async fn write_messages_chunk_pg(&self, job: &str, chunk: &str, address: &str, messages: &[message::Model]) -> Result<(), StoreError> {
        let pool = self.db.get_postgres_connection_pool();
        let mut txn = pool.begin().await?;
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM rooms WHERE address = $1").bind(address).fetch_optional(&mut *txn).await?;
        let id = id.ok_or_else(|| StoreError::Corrupt(format!("room {address} is not in the target")))?;
        insert_messages_pg(&mut txn, id, messages).await?;
        sqlx::query("INSERT INTO merge_chunks (job_id, chunk, row_count, done_at) VALUES ($1, $2, $3, $4)")
            .bind(job)
            .bind(chunk)
            .bind(messages.len() as i64)
            .bind(super::now_ms())
            .execute(&mut *txn)
            .await?;
        txn.commit().await?;
        Ok(())
    }
}

/// SQLite in WAL mode: every connection that has the database open holds a shared lock on the
/// "DMS" byte (128) of the `-shm` file for as long as it is open; `F_GETLK` reports such a
/// lock of another process (never the caller's own).
///
/// The descriptor this opens stays open until the process ends (one per call; a merge calls
/// this once per store): closing any descriptor of a file drops every POSIX lock the process
/// holds on that file, SQLite's own DMS lock included. With that lock gone, the next process
/// to open the database takes itself for the first, truncates the `-shm` file, and this
/// process, which has it mapped, dies of SIGBUS (seen in
/// `kill9_mid_merge_then_resume_gives_the_same_store`; the test below checks the lock stays).
fn sqlite_open_elsewhere(db: &std::path::Path) -> bool {
    use std::os::fd::IntoRawFd;
    let shm = std::path::PathBuf::from(format!("{}-shm", db.display()));
    let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(&shm) else { return false };
    let fd = file.into_raw_fd();
    // SAFETY: a zeroed `flock` is a valid value, filled in below; `fcntl(F_GETLK)` reads and
    // writes only that struct, on the descriptor opened above (never closed: see above).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as _;
    lock.l_whence = libc::SEEK_SET as _;
    lock.l_start = 128;
    lock.l_len = 1;
    // SAFETY: see above.
    let r = unsafe { libc::fcntl(fd, libc::F_GETLK, &mut lock) };
    r == 0 && lock.l_type != libc::F_UNLCK as libc::c_short
}

/// (Linux: the test reads `/proc/locks`.)
#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// This process's POSIX locks on the file at `path` that cover byte 128, from `/proc/locks`.
    fn own_locks_on_byte_128(path: &std::path::Path) -> usize {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(path).unwrap().ino().to_string();
        let me = std::process::id().to_string();
        // "1: POSIX  ADVISORY  READ 1234 fd:01:5507074 128 128"
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() == 8 && f[1] == "POSIX" && f[4] == me && f[5].rsplit(':').next() == Some(ino.as_str()))
            .filter(|f| f[6].parse::<u64>().is_ok_and(|s| s <= 128) && (f[7] == "EOF" || f[7].parse::<u64>().is_ok_and(|e| e >= 128)))
            .count()
    }

    /// Looking for other processes with a SQLite store open must not drop this process's own
    /// hold on it: without its DMS lock, another process truncates the `-shm` file this one
    /// has mapped (SIGBUS).
    #[tokio::test]
    async fn looking_for_other_users_of_a_sqlite_file_keeps_this_process_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("target.db");
        let store = Store::connect(&format!("sqlite://{}", db.display()), 1, "normal").await.unwrap();
        store.migrate().await.unwrap();
        let shm = std::path::PathBuf::from(format!("{}-shm", db.display()));
        assert!(own_locks_on_byte_128(&shm) > 0, "SQLite holds its DMS lock while the store is open");
        let evidence = store.serving_evidence(Duration::from_secs(60)).await.unwrap();
        assert!(evidence.is_empty(), "no other process has it open: {evidence:?}");
        assert!(own_locks_on_byte_128(&shm) > 0, "the check dropped this process's DMS lock");
    }
}
