//! Test harness: a fresh database per test ([`TestDb`]), in-process nodes ([`TestNode`]), real
//! `stoa` processes ([`NodeProcess`]), a raw WebSocket client ([`Client`]) that can send any
//! frame, and a tiny HTTP client for the admin API ([`http_get`]).
//!
//! Nothing here sleeps to wait for something: every wait is for a frame or a state, with a
//! deadline, and a missed deadline panics with what was seen instead.

#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use stoa::config::Settings;
use stoa::node::Node;
use stoa::store::{Store, StoredMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// How long any single wait may take before the test fails (debug builds are slow, and two
/// test threads share two cores with the nodes they start).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The room service of a node with default settings.
pub const SERVICE: &str = "conference.localhost";

/// `name@conference.localhost`.
/// The name a guest asked for: its user name without the server's `~suffix`.
pub fn asked_name(user: &str) -> &str {
    user.split_once('~').map_or(user, |(asked, _)| asked)
}

pub fn room(name: &str) -> String {
    format!("{name}@{SERVICE}")
}

/// Route the in-process nodes' logs to the test output (shown for failing tests only).
/// `STOA_TEST_LOG` overrides the filter.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("STOA_TEST_LOG").unwrap_or_else(|_| "info,sqlx=warn,sea_orm=warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}

// ---- databases -------------------------------------------------------------------------------

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
        store.connection().clone().close().await.ok();
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
        store.connection().clone().close().await.ok();
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

// ---- nodes -----------------------------------------------------------------------------------

/// A free loopback port for a listener a test must name in advance (a pair's configs name each
/// other's addresses). Taken *below* the kernel's ephemeral range (32768–60999 here): a port
/// from that range, released and bound again later, can meanwhile become the source port of an
/// outgoing connection (even a TCP self-connect of a node dialing a peer that is down), and
/// the bind then fails. Each call returns a different port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Start at a per-process offset so concurrent test binaries rarely meet.
    let _ = NEXT.compare_exchange(0, 20_000 + (std::process::id() % 1000) as u16 * 12, Ordering::Relaxed, Ordering::Relaxed);
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = if port >= 32_000 { 20_000 + port % 12_000 } else { port };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// An in-process node (stopped when dropped).
pub struct TestNode {
    node: Option<Node>,
    /// Its store: guests of one store resume with their tokens ([`Client::connect_guest`]).
    identity: String,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The XMPP c2s listener, when the settings turn it on.
    pub xmpp_addr: Option<SocketAddr>,
    /// The direct-TLS XMPP c2s listener (`xmpp.c2s_tls`), when the settings turn it on.
    pub xmpp_tls_addr: Option<SocketAddr>,
    pub token: Option<String>,
}

impl TestNode {
    /// Start a node with `settings` (start-up runs off the test's runtime threads).
    pub async fn start(settings: Settings) -> TestNode {
        let token = (!settings.auth.admin_token.is_empty()).then(|| settings.auth.admin_token.clone());
        let identity = settings.store_url();
        let node = tokio::task::spawn_blocking(move || Node::start(settings))
            .await
            .expect("node start-up task")
            .unwrap_or_else(|e| panic!("node failed to start: {e:#}"));
        TestNode {
            client_addr: node.client_addr,
            admin_addr: node.admin_addr,
            xmpp_addr: node.xmpp_addr,
            xmpp_tls_addr: node.xmpp_tls_addr,
            node: Some(node),
            token,
            identity,
        }
    }

    /// Stop the node and wait until it has shut down.
    pub async fn stop(mut self) {
        if let Some(node) = self.node.take() {
            tokio::task::spawn_blocking(move || node.stop()).await.expect("node stop task").expect("node stops cleanly");
        }
    }

    /// A logged-in guest client: guest `user` of this node's store (the same guest every time).
    pub async fn client(&self, user: &str) -> Client {
        Client::connect_guest(self.client_addr, user, &self.identity).await
    }

    /// GET an admin path (with the node's admin token, if any) and parse the JSON answer.
    pub async fn admin_json(&self, path: &str) -> Value {
        let (status, body) = http_get(self.admin_addr, path, self.token.as_deref()).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {body}"))
    }

    /// Poll `/api/node` until `pred` holds, or fail after [`DEADLINE`].
    pub async fn await_node_state(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        await_admin(self.admin_addr, self.token.as_deref(), "/api/node", what, pred).await
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            // Node's own Drop cancels and joins its thread.
            drop(node);
        }
    }
}

/// Poll an admin JSON endpoint until `pred` holds, or fail after [`DEADLINE`].
pub async fn await_admin(addr: SocketAddr, token: Option<&str>, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let (status, body) = http_get(addr, path, token).await;
        if status == 200 {
            last = serde_json::from_str(&body).unwrap_or(Value::Null);
            if pred(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval, not a wait
    }
    panic!("timed out waiting for {what} on GET {path}; last answer: {last}");
}

/// A real `stoa serve` process. Killed (SIGKILL) when dropped; its log is printed if the test
/// is failing.
pub struct NodeProcess {
    child: Child,
    /// Its store URL, as for [`TestNode`].
    identity: String,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    label: String,
}

impl NodeProcess {
    /// Run `stoa serve --config config` and wait until it logs its listening addresses.
    pub async fn start(config: &Path, label: &str) -> NodeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stoa"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .env("STOA_LOG", "info,sqlx=warn,sea_orm=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the stoa binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addrs) = parse_listening(&line)
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(addrs);
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        let config_text = std::fs::read_to_string(config).unwrap_or_default();
        let identity = config_text
            .lines()
            .find_map(|l| l.trim().strip_prefix("url = \"").and_then(|u| u.strip_suffix('"')))
            .unwrap_or_default()
            .to_owned();
        let mut process = NodeProcess {
            identity,
            child,
            client_addr: "0.0.0.0:0".parse().expect("literal"),
            admin_addr: "0.0.0.0:0".parse().expect("literal"),
            log,
            label: label.into(),
        };
        match tokio::time::timeout(DEADLINE, ready_rx).await {
            Ok(Ok((client, admin))) => {
                process.client_addr = client;
                process.admin_addr = admin;
                process
            }
            _ => {
                let status = process.child.try_wait().ok().flatten();
                panic!("stoa process {label} did not report listening addresses (exit: {status:?}):\n{}", process.log_text());
            }
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// The process id (for SIGSTOP / SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A logged-in guest client: guest `user` of this node's store (the same guest every time).
    pub async fn client(&self, user: &str) -> Client {
        Client::connect_guest(self.client_addr, user, &self.identity).await
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // Whether it was still running tells a crash (or a signal's default action) from a hang.
        let exited = self.child.try_wait().ok().flatten();
        self.kill();
        if std::thread::panicking() {
            let state = exited.map_or("still running when the test ended".to_owned(), |s| format!("had exited: {s}"));
            eprintln!("---- log of stoa process {} ({state}) ----\n{}\n---- end of log ----", self.label, self.log_text());
        }
    }
}

/// The addresses in the node's "listening: clients at ws://A/ws, admin at http://B/" line.
pub fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let after = |marker: &str, end: char| -> Option<SocketAddr> {
        let rest = &line[line.find(marker)? + marker.len()..];
        rest[..rest.find(end)?].parse().ok()
    };
    // `wss://` and `https://` when the node has [tls].
    let client = after("clients at ws://", '/').or_else(|| after("clients at wss://", '/'))?;
    Some((client, after("admin at http://", '/').or_else(|| after("admin at https://", '/'))?))
}

/// Run `stoa ARGS` to completion; returns (success, combined output).
pub async fn run_stoa(args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(args)
        .env("NO_COLOR", "1")
        .env("STOA_LOG", "info,sqlx=warn,sea_orm=warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap_or_else(|_| panic!("stoa {args:?} did not finish in 60 s"))
        .expect("running the stoa binary");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

// ---- admin HTTP ------------------------------------------------------------------------------

/// A plain HTTP/1.1 GET (`Connection: close`); returns the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(DEADLINE, work)
        .await
        .unwrap_or_else(|_| panic!("GET {path} on {addr} timed out"))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("GET {path}: no header end"));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: bad status line in {head}"));
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, String::from_utf8(body).unwrap_or_else(|e| panic!("GET {path}: body is not UTF-8: {e}")))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

// ---- the raw client --------------------------------------------------------------------------

/// A raw protocol client: sends any JSON (or any WebSocket frame), keeps every frame it has
/// received but not yet consumed, and waits for frames with a deadline.
pub struct Client {
    ws: WebSocketStream<TcpStream>,
    /// The logged-in user (empty before `hello`).
    pub user: String,
    /// Frames received and not consumed yet, in arrival order.
    pending: VecDeque<Value>,
    /// Set once the server closed the connection: its close code, if it sent one.
    pub closed: Option<Option<u16>>,
    next_id: u64,
}

/// What a read produced.
enum Read {
    Frame(Value),
    Closed(Option<u16>),
}

impl Client {
    /// Open a WebSocket to a node without logging in.
    pub async fn connect_raw(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        Self::handshake(addr, stream).await
    }

    /// Open a WebSocket whose socket has a tiny receive buffer (for slow-consumer tests).
    pub async fn connect_small_buffer(addr: SocketAddr, user: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let mut c = Self::handshake(addr, stream).await;
        c.hello(user).await;
        c
    }

    async fn handshake(addr: SocketAddr, stream: TcpStream) -> Client {
        stream.set_nodelay(true).ok();
        let url = format!("ws://{addr}/ws");
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url.as_str(), stream))
            .await
            .unwrap_or_else(|_| panic!("WebSocket handshake with {url} timed out"))
            .unwrap_or_else(|e| panic!("WebSocket handshake with {url}: {e}"));
        Client { ws, user: String::new(), pending: VecDeque::new(), closed: None, next_id: 0 }
    }

    /// Connect and log in as guest `user`.
    pub async fn connect(addr: SocketAddr, user: &str) -> Client {
        let mut c = Self::connect_raw(addr).await;
        c.hello(user).await;
        c
    }

    /// Connect as guest `user` of the store `identity`: the first time a fresh guest, later
    /// the same guest again through its session token (a guest's user name is unique, so
    /// "the same guest" is a token, not a name).
    pub async fn connect_guest(addr: SocketAddr, user: &str, identity: &str) -> Client {
        static TOKENS: std::sync::LazyLock<Mutex<std::collections::HashMap<(String, String), String>>> = std::sync::LazyLock::new(Default::default);
        let key = (identity.to_owned(), user.to_owned());
        let mut c = Self::connect_raw(addr).await;
        let token = TOKENS.lock().unwrap().get(&key).cloned();
        if let Some(token) = token {
            let w = c.request(json!({"op": "hello", "v": 1, "token": token})).await;
            if w["op"] == "welcome" {
                c.user = w["user"].as_str().unwrap_or(user).into();
                return c;
            }
            c = Self::connect_raw(addr).await; // the token expired: a new guest
        }
        let w = c.hello(user).await;
        TOKENS.lock().unwrap().insert(key, w["session"].as_str().expect("a session token").to_owned());
        c
    }

    /// Log in as guest `user`; panics unless welcomed.
    pub async fn hello(&mut self, user: &str) -> Value {
        let w = self.request(json!({"op": "hello", "v": 1, "user": user})).await;
        assert_eq!(w["op"], "welcome", "hello as {user}: {w}");
        // A guest's user name is the one asked for plus a server-chosen `~suffix`.
        self.user = w["user"].as_str().unwrap_or(user).into();
        w
    }

    /// A fresh request id.
    pub fn id(&mut self) -> String {
        self.next_id += 1;
        format!("r{}", self.next_id)
    }

    /// Send a text frame as is.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.ws.send(Message::text(text)).await.expect("sending a text frame");
    }

    /// Send any WebSocket message (binary, raw frames ...). Errors are returned, not panics:
    /// the server may close the connection while we write.
    pub async fn send_message(&mut self, msg: Message) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(msg).await
    }

    /// Send a text frame whose payload is not valid UTF-8 (raw frame, bypassing the type check).
    pub async fn send_invalid_utf8(&mut self) {
        let frame = Frame::message(vec![b'{', 0xff, 0xfe, 0xfd, b'}'], OpCode::Data(Data::Text), true);
        let _ = self.ws.send(Message::Frame(frame)).await;
    }

    /// Send a JSON request, giving it an `id` if it has none; returns the id.
    pub async fn send_json(&mut self, mut v: Value) -> String {
        let id = match v.get("id").and_then(|i| i.as_str()) {
            Some(id) => id.to_owned(),
            None => {
                let id = self.id();
                v["id"] = json!(id);
                id
            }
        };
        self.send_text(v.to_string()).await;
        id
    }

    /// Send a request and wait for the frame answering it.
    pub async fn request(&mut self, v: Value) -> Value {
        let id = self.send_json(v.clone()).await;
        self.answer(&id).await
    }

    /// Wait for the frame answering request `id`.
    pub async fn answer(&mut self, id: &str) -> Value {
        self.wait_for(&format!("the answer to {id}"), |f| f["re"] == id).await
    }

    async fn read(&mut self, deadline: Instant) -> Option<Read> {
        if let Some(code) = self.closed {
            return Some(Read::Closed(code));
        }
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(n) => n,
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {t}"));
                    return Some(Read::Frame(v));
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code));
                    self.closed = Some(code);
                    return Some(Read::Closed(code));
                }
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue, // ping / pong
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return Some(Read::Closed(None));
                }
            }
        }
    }

    /// Take the first pending frame matching `pred`, reading more frames until one arrives.
    /// Panics on a deadline or a closed connection, listing what was received instead.
    pub async fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&mut pred) {
            return self.pending.remove(i).expect("index is in range");
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.read(deadline).await {
                Some(Read::Frame(f)) if pred(&f) => return f,
                Some(Read::Frame(f)) => self.pending.push_back(f),
                Some(Read::Closed(code)) => {
                    panic!("{}: connection closed (code {code:?}) while waiting for {what}; pending: {}", self.user, self.pending_summary())
                }
                None => panic!("{}: timed out waiting for {what}; pending: {}", self.user, self.pending_summary()),
            }
        }
    }

    /// Like [`Client::wait_for`], but `None` when the connection closes first.
    pub async fn wait_for_or_close(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Option<Value> {
        if let Some(i) = self.pending.iter().position(&mut pred) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.read(deadline).await {
                Some(Read::Frame(f)) if pred(&f) => return Some(f),
                Some(Read::Frame(f)) => self.pending.push_back(f),
                Some(Read::Closed(_)) => return None,
                None => panic!("{}: timed out waiting for a frame or a close; pending: {}", self.user, self.pending_summary()),
            }
        }
    }

    /// Read until the server closes the connection; returns its close code. Frames received
    /// meanwhile are kept.
    pub async fn await_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.read(deadline).await {
                Some(Read::Frame(f)) => self.pending.push_back(f),
                Some(Read::Closed(code)) => return code,
                None => panic!("{}: the server did not close the connection; pending: {}", self.user, self.pending_summary()),
            }
        }
    }

    /// Take every pending frame matching `pred`, in arrival order.
    pub fn take(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let (taken, kept): (VecDeque<Value>, VecDeque<Value>) = self.pending.drain(..).partition(|f| pred(f));
        self.pending = kept;
        taken.into()
    }

    /// Every frame received and not consumed yet.
    pub fn pending(&self) -> &VecDeque<Value> {
        &self.pending
    }

    fn pending_summary(&self) -> String {
        let n = self.pending.len();
        let shown: Vec<String> = self.pending.iter().rev().take(8).rev().map(|f| f.to_string()).collect();
        format!("{n} frames, last: [{}]", shown.join(", "))
    }

    /// Read until `message` events of `room` up to seq `last` have arrived; returns every
    /// `message` event of `room` received so far (consumed), in arrival order.
    pub async fn messages_through(&mut self, room: &str, last: u64) -> Vec<Value> {
        let seen = |c: &Client| c.pending.iter().any(|f| is_message(f, room) && f["seq"].as_u64() >= Some(last));
        if !seen(self) {
            let deadline = Instant::now() + DEADLINE;
            loop {
                match self.read(deadline).await {
                    Some(Read::Frame(f)) => {
                        let done = is_message(&f, room) && f["seq"].as_u64() >= Some(last);
                        self.pending.push_back(f);
                        if done {
                            break;
                        }
                    }
                    Some(Read::Closed(code)) => panic!(
                        "{}: closed (code {code:?}) waiting for message {last} of {room}; pending: {}",
                        self.user,
                        self.pending_summary()
                    ),
                    None => panic!("{}: timed out waiting for message {last} of {room}; pending: {}", self.user, self.pending_summary()),
                }
            }
        }
        self.take(|f| is_message(f, room))
    }

    // ---- protocol helpers (each panics unless the expected answer comes) --------------------

    /// Create a room with `config`; panics unless `created`.
    pub async fn create(&mut self, room: &str, config: Value) -> Value {
        let a = self.request(json!({"op": "create", "room": room, "config": config})).await;
        assert_eq!(a["op"], "created", "{} create {room}: {a}", self.user);
        a
    }

    /// Join a room as `nick`; panics unless `joined`.
    pub async fn join(&mut self, room: &str, nick: &str) -> Value {
        let a = self.request(json!({"op": "join", "room": room, "nick": nick})).await;
        assert_eq!(a["op"], "joined", "{} join {room}: {a}", self.user);
        a
    }

    /// Join with `since`; panics unless `joined`.
    pub async fn join_since(&mut self, room: &str, nick: &str, since: u64) -> Value {
        let a = self.request(json!({"op": "join", "room": room, "nick": nick, "since": since})).await;
        assert_eq!(a["op"], "joined", "{} join {room} since {since}: {a}", self.user);
        a
    }

    /// Send a message and return the answer (an `ack` or an `error`).
    pub async fn send(&mut self, room: &str, body: &str, cid: &str) -> Value {
        self.request(json!({"op": "send", "room": room, "body": body, "cid": cid})).await
    }

    /// Send a message; panics unless acked. Returns the seq.
    pub async fn send_acked(&mut self, room: &str, body: &str, cid: &str) -> u64 {
        let a = self.send(room, body, cid).await;
        assert_eq!(a["op"], "ack", "{} send {cid} to {room}: {a}", self.user);
        a["seq"].as_u64().expect("ack carries a seq")
    }

    /// Every message of a room from the store, through `history` (paged).
    pub async fn history_all(&mut self, room: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        loop {
            let after = out.last().and_then(|m| m["seq"].as_u64()).unwrap_or(0);
            let a = self.request(json!({"op": "history", "room": room, "after": after, "limit": 500})).await;
            assert_eq!(a["op"], "history", "{} history {room}: {a}", self.user);
            let page = a["messages"].as_array().expect("messages array").clone();
            let truncated = a["truncated"].as_bool().unwrap_or(false);
            out.extend(page);
            if !truncated {
                return out;
            }
        }
    }
}

/// Is `f` a `message` event of `room`?
pub fn is_message(f: &Value, room: &str) -> bool {
    f["op"] == "message" && f["room"] == room
}

/// Assert that `answer` is an error with `code`.
#[track_caller]
pub fn assert_error(answer: &Value, code: &str, context: &str) {
    assert_eq!(answer["op"], "error", "{context}: expected error {code}, got {answer}");
    assert_eq!(answer["code"], code, "{context}: expected error {code}, got {answer}");
}

/// The seqs of a list of `message` frames.
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().expect("message has a seq")).collect()
}

/// Assert `seqs` is exactly `1..=n`.
#[track_caller]
pub fn assert_contiguous(seqs: &[u64], n: u64, context: &str) {
    let expected: Vec<u64> = (1..=n).collect();
    if seqs != expected.as_slice() {
        let first_bad = seqs.iter().zip(&expected).position(|(a, b)| a != b);
        panic!("{context}: seqs are not 1..={n}: got {} seqs, first mismatch at index {first_bad:?}", seqs.len());
    }
}

/// Both clients are in `room`: `a` sends, gets an ack and `b` receives it, then the other way.
pub async fn assert_room_works(a: &mut Client, b: &mut Client, room: &str, tag: &str) {
    one_way(a, b, room, tag).await;
    one_way(b, a, room, tag).await;
}

async fn one_way(from: &mut Client, to: &mut Client, room: &str, tag: &str) {
    let cid = format!("check-{tag}-{}", from.user);
    let seq = from.send_acked(room, &format!("still works ({tag})"), &cid).await;
    let got = to.wait_for(&format!("message {cid}"), |f| is_message(f, room) && f["cid"] == cid.as_str()).await;
    assert_eq!(got["seq"].as_u64(), Some(seq), "{tag}: {} got {cid} with another seq", to.user);
    assert_eq!(got["from"], from.user.as_str());
}
