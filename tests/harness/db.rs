//! Databases for tests: a fresh one per test on each backend ([`TestDb`]), dropped at the end,
//! and a handle that kills its connections ([`ConnectionKiller`]) for store-failure tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stoa::config::Settings;
use stoa::store::{Store, StoredMessage};

use super::{asked_name, init_logging};

/// The store backends the suite runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    fn env_var(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("STOA_TEST_PG_URL"),
            Backend::MySql => Some("STOA_TEST_MYSQL_URL"),
        }
    }
}

/// A fresh, empty database for one test, named after it, dropped (best effort) at the end.
/// PostgreSQL and MariaDB come from `STOA_TEST_PG_URL` / `STOA_TEST_MYSQL_URL`; a test that
/// needs one and cannot get it panics, it is never skipped. SQLite lives in a temp dir.
pub struct TestDb {
    pub backend: Backend,
    /// The store URL a node uses.
    pub url: String,
    /// The database name (PostgreSQL / MariaDB).
    pub name: String,
    /// The server URL the database was created through.
    admin_url: Option<String>,
    dir: tempfile::TempDir,
}

impl TestDb {
    /// Create the database for test `test` on `backend`.
    pub async fn new(backend: Backend, test: &str) -> TestDb {
        init_logging();
        let dir = tempfile::Builder::new().prefix(&format!("stoa-{test}-")).tempdir().expect("creating a temp dir");
        let short: String = test.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(36).collect();
        let name = format!("stoa_t_{}_{:08x}", short.to_lowercase(), rand::random::<u32>());
        let Some(var) = backend.env_var() else {
            let url = format!("sqlite://{}/stoa.db", dir.path().display());
            return TestDb { backend, url, name, admin_url: None, dir };
        };
        let admin_url = std::env::var(var).unwrap_or_else(|_| {
            panic!(
                "{var} is not set: test `{test}` needs a {backend:?} server. Set it, e.g. \
                 STOA_TEST_PG_URL=postgres://postgres@127.0.0.1:5432/postgres \
                 STOA_TEST_MYSQL_URL=mysql://root@127.0.0.1:3306/mysql"
            )
        });
        let create = format!("CREATE DATABASE {name}");
        let result = match backend {
            Backend::Postgres => {
                use sqlx::Connection;
                match sqlx::PgConnection::connect(&admin_url).await {
                    Ok(mut c) => sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&mut c).await.map(|_| ()),
                    Err(e) => Err(e),
                }
            }
            Backend::MySql => {
                use sqlx::Connection;
                match sqlx::MySqlConnection::connect(&admin_url).await {
                    Ok(mut c) => sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&mut c).await.map(|_| ()),
                    Err(e) => Err(e),
                }
            }
            Backend::Sqlite => unreachable!(),
        };
        if let Err(e) = result {
            panic!(
                "{var}={} is unreachable or refuses CREATE DATABASE (test `{test}` needs {backend:?}): {e}",
                stoa::node::redact(&admin_url)
            );
        }
        let mut url = url::Url::parse(&admin_url).unwrap_or_else(|e| panic!("{var} is not a URL: {e}"));
        url.set_path(&format!("/{name}"));
        TestDb { backend, url: url.to_string(), name, admin_url: Some(admin_url), dir }
    }

    /// A scratch directory that lives as long as the database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh store handle on this database (for checks the test makes behind the node's back).
    pub async fn store(&self) -> Store {
        Store::connect(&self.url, 2, "full").await.unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url))
    }

    /// Every stored message of `room`, by seq, read straight from the store.
    pub async fn stored_messages(&self, room: &str) -> Vec<StoredMessage> {
        let store = self.store().await;
        let row = store
            .load_room(&stoa::protocol::RoomAddr(room.to_owned()))
            .await
            .expect("loading the room row")
            .unwrap_or_else(|| panic!("room {room} is not in the store"));
        let messages = store.messages(row.id, 0, None, 1_000_000, false).await.expect("reading messages");
        assert_eq!(
            messages.last().map_or(0, |m| m.seq),
            row.last_seq,
            "rooms.last_seq of {room} disagrees with its last stored message"
        );
        assert_eq!(
            messages.last().map_or(0, |m| m.created_at),
            row.last_ts,
            "rooms.last_ts of {room} disagrees with its last stored message"
        );
        // The room's clock: times never go back along the log, and each id carries its time
        // (how the store finds a message by id, `Store::message_seq`).
        for w in messages.windows(2) {
            assert!(w[0].created_at <= w[1].created_at, "room {room}: seq {} is older than seq {}", w[1].seq, w[0].seq);
        }
        for m in &messages {
            assert_eq!(stoa::ids::message_id_time(&m.id), Some(m.created_at), "room {room}: the id of seq {} does not carry its time", m.seq);
        }
        store.close().await;
        // Tests name guests by the name they asked for; the store keeps `name~suffix`.
        messages.into_iter().map(|m| StoredMessage { sender: asked_name(&m.sender).to_owned(), ..m }).collect()
    }

    /// The epoch each stored message of `room` was committed under, by seq.
    pub async fn stored_epochs(&self, room: &str) -> Vec<(u64, i64)> {
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
        use stoa::store::entity::message;
        let store = self.store().await;
        let row = store.load_room(&stoa::protocol::RoomAddr(room.to_owned())).await.expect("room row").expect("room exists");
        let rows = message::Entity::find()
            .filter(message::Column::RoomId.eq(row.id.0))
            .order_by_asc(message::Column::Seq)
            .all(store.connection())
            .await
            .expect("reading message epochs");
        store.close().await;
        rows.into_iter().map(|m| (m.seq as u64, m.epoch)).collect()
    }

    /// Settings for an in-process node on this database: loopback, port 0, guests allowed.
    pub fn settings(&self, node_id: &str) -> Settings {
        let mut s = Settings::default();
        s.node.id = node_id.into();
        s.node.data_dir = self.dir().join("data");
        s.listen.client = "127.0.0.1:0".parse().expect("literal");
        s.listen.admin = "127.0.0.1:0".parse().expect("literal");
        s.store.url = self.url.clone();
        s.store.max_connections = 8;
        s.auth.allow_guests = true;
        s.rooms.arbiters = 2;
        s
    }

    /// A TOML config file for a `stoa` process on this database (`extra` is appended).
    pub fn write_config(&self, node_id: &str, extra: &str) -> PathBuf {
        let path = self.dir().join(format!("{node_id}.toml"));
        let text = format!(
            "[node]\nid = \"{node_id}\"\ndata_dir = \"{data}\"\n\n\
             [listen]\nclient = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
             [store]\nurl = \"{url}\"\nmax_connections = 8\n\n\
             [auth]\nallow_guests = true\n\n\
             [log]\nlevel = \"info\"\n\n{extra}\n",
            data = self.dir().join("data").display(),
            url = self.url,
        );
        std::fs::write(&path, text).expect("writing the config file");
        path
    }

    /// A handle that kills this database's connections (PostgreSQL, MariaDB), usable from
    /// another task.
    pub fn connection_killer(&self) -> ConnectionKiller {
        ConnectionKiller {
            backend: self.backend,
            admin_url: self.admin_url.clone().expect("only server databases have connections to kill"),
            name: self.name.clone(),
        }
    }
}

/// Kills every connection to one test database except its own.
#[derive(Clone)]
pub struct ConnectionKiller {
    backend: Backend,
    admin_url: String,
    name: String,
}

impl ConnectionKiller {
    /// Kill every connection to the database except the caller's; returns how many.
    pub async fn kill(&self) -> usize {
        use sqlx::{Connection, Row};
        match self.backend {
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.admin_url).await.expect("admin connection to PostgreSQL");
                let rows = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&self.name)
                .fetch_all(&mut c)
                .await
                .expect("pg_terminate_backend");
                c.close().await.ok();
                rows.len()
            }
            Backend::MySql => {
                let mut c = sqlx::MySqlConnection::connect(&self.admin_url).await.expect("admin connection to MariaDB");
                let ids: Vec<u64> = sqlx::query("SELECT id FROM information_schema.processlist WHERE db = ? AND id <> CONNECTION_ID()")
                    .bind(&self.name)
                    .fetch_all(&mut c)
                    .await
                    .expect("reading the process list")
                    .iter()
                    .map(|r| r.try_get::<u64, _>(0).or_else(|_| r.try_get::<i64, _>(0).map(|v| v as u64)).expect("process id"))
                    .collect();
                let mut killed = 0;
                for id in ids {
                    // The id is an integer read from the server: nothing to inject.
                    if sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL {id}"))).execute(&mut c).await.is_ok() {
                        killed += 1;
                    }
                }
                c.close().await.ok();
                killed
            }
            Backend::Sqlite => unreachable!("SQLite has no server connections"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin) = self.admin_url.clone() else { return };
        if std::env::var_os("STOA_TEST_KEEP_DB").is_some() {
            eprintln!("keeping database {} (STOA_TEST_KEEP_DB)", self.name);
            return;
        }
        let (backend, name) = (self.backend, self.name.clone());
        // Drop runs inside the test's runtime: do the async clean-up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("cleanup runtime");
            rt.block_on(async move {
                use sqlx::Connection;
                let work = async {
                    match backend {
                        Backend::Postgres => {
                            let mut c = sqlx::PgConnection::connect(&admin).await?;
                            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut c).await?;
                        }
                        Backend::MySql => {
                            let mut c = sqlx::MySqlConnection::connect(&admin).await?;
                            let sql = format!("DROP DATABASE IF EXISTS {name}");
                            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut c).await?;
                        }
                        Backend::Sqlite => {}
                    }
                    Ok::<(), sqlx::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(20), work).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("could not drop test database {name}: {e}"),
                    Err(_) => eprintln!("dropping test database {name} timed out"),
                }
            });
        });
        let _ = cleanup.join();
    }
}
