//! `xmpp`: one MUC workload against Stoa's XMPP listener and against Prosody 0.12, in one run,
//! alternated round by round, so that the two are measured side by side on the same machine.
//!
//! The load: R rooms of N occupants, each occupant its own XMPP client-to-server connection
//! (plain TCP on loopback, SASL ANONYMOUS, a bound resource, a MUC join by presence to
//! `room@conference.localhost/nick`). The first occupant of each room sends groupchat messages
//! whose body starts with the send time (20 digits of [`stats::now_ns`]); every occupant, the
//! sender included, counts the messages it receives and their end-to-end latency. The
//! reflection of a message to its sender is the sender's ack: both servers reflect only after
//! the message is archived (Stoa: after its commit; Prosody: `mod_muc_mam` appends it to the
//! archive before the broadcast). Saturation mode keeps `--window` unreflected messages per
//! sender; `--rate` paces the senders to a total rate instead.
//!
//! The bench starts both servers on free loopback ports and kills them at the end whatever
//! happens: Stoa as in every mode (this executable, a generated config, SQLite with
//! `synchronous = full` by default, `[xmpp] c2s` on a free port, guests allowed), Prosody as
//! `prosody -F --config FILE` with a config generated in the bench's temp dir (anonymous
//! logins, `mod_muc` with `mod_muc_mam`, storage `sql` on SQLite in WAL mode with the library's
//! default `synchronous = FULL`: the durability of Stoa's store). Server CPU is read from
//! `/proc/PID/stat` at the start and the end of the measured window.

use super::server::{self, SERVICE, Target, Tuning, Workspace};
use super::stats::{self, CpuCores, Stats};
use super::{Summary, TargetArgs, parse_duration, round3};
use crate::xmpp::ns;
use crate::xmpp::stream::{Item, StreamReader};
use anyhow::{Context as _, bail};
use rand::Rng;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use xmpp_parsers::minidom::Element;

/// The XMPP domain both servers serve (users are `…@localhost`).
const DOMAIN: &str = "localhost";

/// How long connecting, logging in and joining may take for one occupant.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a spawned server may take to accept connections on its c2s port.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for a server to go idle after its run.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The bench's own limits on what servers send (far above any stanza of this load).
const MAX_STANZA_BYTES: usize = 1 << 20;
const MAX_DEPTH: usize = 32;

/// Most connections the generator opens (each side of a loopback connection is a file
/// descriptor, and this machine caps a process at 20,000).
const MAX_CONNECTIONS: usize = 18_000;

/// `stoa bench xmpp`: the same MUC load against Stoa and Prosody, alternated.
#[derive(clap::Args, Debug, Clone)]
pub struct XmppArgs {
    /// Rooms.
    #[arg(long, default_value_t = 20)]
    pub rooms: usize,
    /// Occupants (connections) per room, the sender included.
    #[arg(long, default_value_t = 10)]
    pub occupants: usize,
    /// Total messages per second over all rooms, paced (unset: saturation, each sender keeps
    /// its window of unreflected messages full).
    #[arg(long, value_name = "MSGS")]
    pub rate: Option<f64>,
    /// Most unreflected messages per sender (default: 32 at saturation, as `throughput`; 1000
    /// when paced).
    #[arg(long)]
    pub window: Option<usize>,
    /// Message body size in bytes (at least 21: the send time leads the body).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Measured time of each run (e.g. `10s`, `500ms`, `1m`).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Load before each measured window (not counted).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Which servers to load: `stoa`, `prosody`, or `both` (each round runs Stoa, then Prosody).
    #[arg(long, default_value = "both", value_parser = ["stoa", "prosody", "both"])]
    pub server: String,
    /// Rounds (every round loads each server once; the summary gives medians over rounds).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Prosody's storage: `sql` (SQLite in WAL mode, `synchronous = FULL`: every archived
    /// message is committed before its broadcast, as durable as Stoa's acks) or `internal`
    /// (Prosody's flat files, written without fsync: not durable, for comparison only).
    #[arg(long, default_value = "sql", value_parser = ["sql", "internal"])]
    pub prosody_storage: String,
    /// The Prosody executable (Debian's `prosody` package, 0.12).
    #[arg(long, value_name = "PATH", default_value = "prosody")]
    pub prosody_bin: PathBuf,
    /// Connections set up at once.
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
}

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Stoa,
    Prosody,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Stoa => "stoa",
            Kind::Prosody => "prosody",
        }
    }
}

/// The load with every option resolved.
#[derive(Clone, Debug)]
struct Shape {
    rooms: usize,
    occupants: usize,
    /// Total messages per second; `None` = saturation.
    rate: Option<f64>,
    window: usize,
    size: usize,
    duration: Duration,
    warmup: Duration,
    connect_concurrency: usize,
}

impl Shape {
    fn resolve(args: &XmppArgs) -> anyhow::Result<Shape> {
        let rate = args.rate.filter(|r| *r > 0.0);
        let s = Shape {
            rooms: args.rooms,
            occupants: args.occupants,
            rate,
            window: args.window.unwrap_or(if rate.is_some() { 1000 } else { 32 }),
            size: args.size,
            duration: args.duration,
            warmup: args.warmup,
            connect_concurrency: args.connect_concurrency.max(1),
        };
        if s.rooms == 0 || s.occupants == 0 || s.window == 0 || args.rounds == 0 {
            bail!("--rooms, --occupants, --window and --rounds must be at least 1");
        }
        if s.rooms * s.occupants > MAX_CONNECTIONS {
            bail!("{} rooms × {} occupants is more than {MAX_CONNECTIONS} connections", s.rooms, s.occupants);
        }
        if s.size < 21 {
            bail!("--size must be at least 21 bytes (the body starts with a 20-digit send time)");
        }
        if args.rate.is_some_and(|r| !r.is_finite() || r < 0.0) {
            bail!("--rate must be a positive number of messages per second");
        }
        if s.duration.is_zero() {
            bail!("--duration must be positive");
        }
        Ok(s)
    }

    /// Nanoseconds between two sends of one sender (0 = saturation).
    fn interval_ns(&self) -> u64 {
        match self.rate {
            Some(total) => (1e9 * self.rooms as f64 / total) as u64,
            None => 0,
        }
    }
}

/// `stoa bench xmpp`.
pub async fn xmpp(args: &XmppArgs, target_args: &TargetArgs) -> anyhow::Result<Summary> {
    if target_args.url.is_some() {
        bail!("bench xmpp starts both servers itself: --url is not supported");
    }
    let shape = Shape::resolve(args)?;
    let kinds: Vec<Kind> = match args.server.as_str() {
        "stoa" => vec![Kind::Stoa],
        "prosody" => vec![Kind::Prosody],
        _ => vec![Kind::Stoa, Kind::Prosody],
    };
    let prosody_bin = if kinds.contains(&Kind::Prosody) { Some(find_prosody(&args.prosody_bin)?) } else { None };
    let workspace = Workspace::new(target_args)?;
    let dir = workspace.dir().context("the bench's temp dir")?.to_owned();
    let mut nodes: Vec<Node> = Vec::new();
    let result = async {
        for kind in &kinds {
            let node = match kind {
                Kind::Stoa => start_stoa(&workspace, target_args).await?,
                Kind::Prosody => start_prosody(&dir, prosody_bin.as_deref().expect("found above"), args.prosody_storage == "sql").await?,
            };
            nodes.push(node);
        }
        let mut runs = Vec::new();
        for round in 1..=args.rounds {
            for node in nodes.iter_mut() {
                let figures = run_round(node, &shape, round).await.with_context(|| format!("round {round}, {}", node.kind.name()))?;
                eprintln!("{}", figures.line());
                runs.push(figures);
                // The other server's run starts once this one is idle again (a server behind
                // the load still works through its backlog after the clients are gone).
                settle(node).await;
            }
        }
        anyhow::Ok(runs)
    }
    .await;
    let prosody_version = nodes.iter().find_map(|n| n.version.clone());
    for node in nodes {
        node.stop().await;
    }
    let runs = result?;
    Ok(summarize(&shape, args, target_args, &workspace, &kinds, prosody_version, &runs))
}

/// One load run against `node`, with the figures of the measured window.
async fn run_round(node: &mut Node, shape: &Shape, round: usize) -> anyhow::Result<Figures> {
    let archived_before = node.archived().await?;
    let out = run(node, shape).await?;
    node.check_log()?;
    let archived = match (archived_before, node.archived().await?) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    // Every reflection counted must be of an archived message (the round archived more: its
    // warm-up and the messages in flight at the end).
    if let Some(archived) = archived
        && archived < out.stats.acks
    {
        bail!("{} reflected {} messages in the window but archived only {archived} in the round", node.kind.name(), out.stats.acks);
    }
    Ok(Figures::new(round, node.kind, &out, archived))
}

// ---------------------------------------------------------------------------------------------
// The servers.

/// A server under load: where its c2s listener is, and its process.
struct Node {
    kind: Kind,
    c2s: SocketAddr,
    pid: Option<u32>,
    /// Prosody's version (from its installation).
    version: Option<String>,
    process: Process,
}

enum Process {
    Stoa(Target),
    Prosody(Prosody),
}

/// A `prosody -F` child process and its files.
struct Prosody {
    child: tokio::process::Child,
    log: PathBuf,
    /// The SQLite database (storage `sql`).
    db: Option<PathBuf>,
}

impl Node {
    /// Fail if the server has exited (with the tail of its log).
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match &mut self.process {
            Process::Stoa(t) => t.check_alive(),
            Process::Prosody(p) => {
                if let Ok(Some(status)) = p.child.try_wait() {
                    bail!("prosody exited ({status}); its log ends with:\n{}", log_tail(&p.log));
                }
                Ok(())
            }
        }
    }

    /// Errors in Prosody's log (a failed archive write, a missing storage driver) end the bench:
    /// figures of a Prosody that does not archive would not compare.
    fn check_log(&self) -> anyhow::Result<()> {
        if let Process::Prosody(p) = &self.process {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let errors: Vec<&str> = text.lines().filter(|l| l.contains("\terror\t")).take(20).collect();
            if !errors.is_empty() {
                bail!("prosody logged errors ({}):\n{}", p.log.display(), errors.join("\n"));
            }
        }
        Ok(())
    }

    /// Messages in Prosody's MUC archive (`None` for Stoa).
    async fn archived(&self) -> anyhow::Result<Option<u64>> {
        let Process::Prosody(Prosody { db: Some(path), .. }) = &self.process else { return Ok(None) };
        use sqlx::Connection as _;
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path).read_only(true);
        let mut db = sqlx::sqlite::SqliteConnection::connect_with(&opts).await.context("opening Prosody's database")?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM prosodyarchive WHERE store = 'muc_log'")
            .fetch_one(&mut db)
            .await
            .unwrap_or(0);
        db.close().await.ok();
        Ok(Some(n.max(0) as u64))
    }

    fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Kill the server and wait for it.
    async fn stop(self) {
        match self.process {
            Process::Stoa(t) => t.stop().await,
            Process::Prosody(mut p) => {
                let _ = p.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await;
            }
        }
    }
}

/// Stoa: this executable with the bench's generated config, plus a c2s listener.
async fn start_stoa(workspace: &Workspace, args: &TargetArgs) -> anyhow::Result<Node> {
    let c2s: SocketAddr = format!("127.0.0.1:{}", server::loopback_port()?).parse()?;
    let tuning = Tuning {
        settings: vec![
            ("rooms.passivate_after_ms", "3600000".into()),
            ("xmpp.c2s", format!("{:?}", c2s.to_string())),
            ("xmpp.domain", format!("{DOMAIN:?}")),
        ],
    };
    let target = workspace.start(args, &tuning).await?;
    let mut node = Node { kind: Kind::Stoa, c2s, pid: target.pid, version: None, process: Process::Stoa(target) };
    wait_listening(&mut node).await?;
    Ok(node)
}

/// The Prosody executable: `bin` itself, or found on `PATH`; a clear error if it is missing.
fn find_prosody(bin: &Path) -> anyhow::Result<PathBuf> {
    let found = if bin.components().count() > 1 {
        bin.is_file().then(|| bin.to_owned())
    } else {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).map(|d| d.join(bin)).find(|p| p.is_file()))
            .unwrap_or_default()
    };
    found.with_context(|| {
        format!(
            "prosody is not installed ({} not found): install Debian's Prosody 0.12 and its SQLite driver \
             with `apt-get install -y prosody lua-dbi-sqlite3`, or give --prosody-bin, or run --server stoa",
            bin.display()
        )
    })
}

/// Prosody's version, from the `prosody.version` file beside its sources (the executable is a
/// Lua script naming that directory in `CFG_SOURCEDIR`).
fn prosody_version(bin: &Path) -> Option<String> {
    let script = std::fs::read_to_string(bin).ok()?;
    let line = script.lines().find(|l| l.starts_with("CFG_SOURCEDIR"))?;
    let dir = line.split(['\'', '"']).nth(1)?;
    let version = std::fs::read_to_string(Path::new(dir).join("prosody.version")).ok()?;
    Some(version.trim().to_owned())
}

/// The generated Prosody config: loopback only, no TLS, no s2s, anonymous logins on
/// `localhost`, MUC with MAM on `conference.localhost`, everything in `dir`.
fn prosody_config(dir: &Path, c2s: SocketAddr, db: Option<&Path>) -> String {
    let p = |name: &str| format!("{:?}", dir.join(name).display().to_string());
    let storage = match db {
        Some(db) => format!(
            "-- Archive and rooms in SQLite (created by the bench in WAL mode; synchronous stays FULL).\n\
             storage = \"sql\"\nsql = {{ driver = \"SQLite3\", database = {:?} }}",
            db.display().to_string()
        ),
        None => "-- Archive and rooms in Prosody's files (no fsync).\nstorage = \"internal\"".to_owned(),
    };
    format!(
        r#"-- generated by stoa bench xmpp
run_as_root = true -- the bench may run as root; Prosody refuses to unless told
pidfile = {pid}
data_path = {data}
certificates = {certs}
log = {{ warn = {log} }}
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_require_encryption = false
modules_enabled = {{ "saslauth"; "disco"; "ping"; }}
modules_disabled = {{ "s2s"; "s2s_auth_certs"; "offline"; }}
{storage}

VirtualHost "{DOMAIN}"
    authentication = "anonymous"

Component "{SERVICE}" "muc"
    modules_enabled = {{ "muc_mam" }}
    muc_room_default_persistent = true
    muc_room_locking = false
    muc_log_all_rooms = true
    muc_log_by_default = true
"#,
        pid = p("prosody.pid"),
        data = p("data"),
        certs = p("certs"),
        log = p("prosody.log"),
        port = c2s.port(),
    )
}

/// Start `prosody -F --config FILE` in `dir/prosody` and wait until it accepts connections.
async fn start_prosody(dir: &Path, bin: &Path, sql: bool) -> anyhow::Result<Node> {
    let dir = dir.join("prosody");
    for sub in ["data", "certs"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let db = sql.then(|| dir.join("prosody.sqlite"));
    if let Some(db) = &db {
        create_wal_database(db).await?;
    }
    let c2s: SocketAddr = format!("127.0.0.1:{}", server::loopback_port()?).parse()?;
    let config = dir.join("prosody.cfg.lua");
    std::fs::write(&config, prosody_config(&dir, c2s, db.as_deref())).with_context(|| format!("writing {}", config.display()))?;
    let log = dir.join("prosody.log");
    let console = std::fs::File::create(dir.join("console.log")).context("creating Prosody's console log")?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("-F")
        .arg("--config")
        .arg(&config)
        .current_dir(&dir)
        .env_remove("PROSODY_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .kill_on_drop(true);
    server::die_with_the_bench(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let version = prosody_version(bin);
    if let Some(v) = &version
        && !v.starts_with("0.12")
    {
        eprintln!("xmpp: warning: Prosody {v} is not the 0.12 the figures in docs/benchmarks.md were measured with");
    }
    let mut node = Node { kind: Kind::Prosody, c2s, pid, version, process: Process::Prosody(Prosody { child, log, db }) };
    wait_listening(&mut node).await.map_err(|e| {
        let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        e.context(format!("Prosody did not start; its console said:\n{console}"))
    })?;
    node.check_log()?;
    Ok(node)
}

/// An empty SQLite database in WAL mode (a persistent setting of the file): Prosody opens it
/// with the library's defaults, so its commits are `synchronous = FULL` in WAL mode, as Stoa's.
async fn create_wal_database(path: &Path) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    let opts = SqliteConnectOptions::new().filename(path).create_if_missing(true).journal_mode(SqliteJournalMode::Wal);
    let db = sqlx::sqlite::SqliteConnection::connect_with(&opts).await.with_context(|| format!("creating {}", path.display()))?;
    db.close().await.ok();
    Ok(())
}

/// Wait (at most [`SETTLE_TIMEOUT`]) until the server uses less than a tenth of a core.
async fn settle(node: &Node) {
    let started = Instant::now();
    let tick = Duration::from_millis(500);
    loop {
        let before = stats::CpuSnapshot::take(node.pid.as_slice());
        tokio::time::sleep(tick).await;
        let busy = before.cores_until(&stats::CpuSnapshot::take(node.pid.as_slice()), tick.as_secs_f64()).server.unwrap_or(0.0);
        if busy < 0.1 {
            return;
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            eprintln!("xmpp: {} still uses {busy:.2} cores {SETTLE_TIMEOUT:?} after its run; going on", node.kind.name());
            return;
        }
    }
}

/// Wait until the server accepts TCP connections on its c2s port.
async fn wait_listening(node: &mut Node) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        node.check_alive()?;
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(node.c2s)).await {
            return Ok(());
        }
        if started.elapsed() > LISTEN_TIMEOUT {
            bail!("{} did not listen on {} within {LISTEN_TIMEOUT:?}", node.kind.name(), node.c2s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The XMPP client.

/// One client connection: TCP, and a push parser over what the server sends.
struct Conn {
    tcp: TcpStream,
    reader: StreamReader,
    items: VecDeque<Item>,
    buf: Box<[u8]>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        Ok(Conn { tcp, reader: StreamReader::new(MAX_STANZA_BYTES, MAX_DEPTH), items: VecDeque::new(), buf: vec![0; 16 * 1024].into() })
    }

    /// Read once from the socket and parse what came (cancel-safe: a read that completed is
    /// parsed in the same poll).
    async fn fill(&mut self) -> anyhow::Result<()> {
        let n = self.tcp.read(&mut self.buf).await.context("reading from the server")?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        let mut out = Vec::new();
        self.reader.feed(&self.buf[..n], &mut out).map_err(|e| anyhow::anyhow!("the server's stream: {e}"))?;
        self.items.extend(out);
        Ok(())
    }

    async fn next(&mut self) -> anyhow::Result<Item> {
        loop {
            if let Some(item) = self.items.pop_front() {
                return Ok(item);
            }
            self.fill().await?;
        }
    }

    /// The next first-level element (a stream error or the stream's end fails).
    async fn next_stanza(&mut self) -> anyhow::Result<Element> {
        match self.next().await? {
            Item::Stanza(el) if el.is("error", ns::STREAM) => bail!("stream error: {}", describe_error(&el)),
            Item::Stanza(el) => Ok(el),
            Item::Open(_) => bail!("unexpected stream header"),
            Item::Close => bail!("the server ended the stream"),
        }
    }

    async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        self.tcp.write_all(text.as_bytes()).await.context("writing to the server")
    }

    /// Open (or restart) the stream; returns the server's `<stream:features/>`.
    async fn open_stream(&mut self) -> anyhow::Result<Element> {
        self.reader = StreamReader::new(MAX_STANZA_BYTES, MAX_DEPTH);
        self.items.clear();
        self.send(&format!(
            "<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' xml:lang='en' xmlns='{}' xmlns:stream='{}'>",
            ns::CLIENT,
            ns::STREAM
        ))
        .await?;
        match self.next().await? {
            Item::Open(_) => {}
            _ => bail!("expected the server's stream header"),
        }
        let features = self.next_stanza().await?;
        if !features.is("features", ns::STREAM) {
            bail!("expected <stream:features/>, got <{}/>", features.name());
        }
        Ok(features)
    }

    /// SASL ANONYMOUS, the stream restart and resource binding; returns the bound JID.
    async fn login(&mut self) -> anyhow::Result<String> {
        let features = self.open_stream().await?;
        let anonymous = features
            .get_child("mechanisms", ns::SASL)
            .is_some_and(|m| m.children().any(|c| c.is("mechanism", ns::SASL) && c.text().trim() == "ANONYMOUS"));
        if !anonymous {
            bail!("the server does not offer SASL ANONYMOUS");
        }
        self.send(&format!("<auth xmlns='{}' mechanism='ANONYMOUS'/>", ns::SASL)).await?;
        let answer = self.next_stanza().await?;
        if !answer.is("success", ns::SASL) {
            bail!("SASL ANONYMOUS refused: {}", String::from(&answer));
        }
        let features = self.open_stream().await?;
        if !features.has_child("bind", ns::BIND) {
            bail!("the server offers no resource binding");
        }
        self.send(&format!("<iq type='set' id='bind'><bind xmlns='{}'><resource>bench</resource></bind></iq>", ns::BIND)).await?;
        loop {
            let el = self.next_stanza().await?;
            if !(el.is("iq", ns::CLIENT) && el.attr("id") == Some("bind")) {
                continue;
            }
            if el.attr("type") != Some("result") {
                bail!("resource binding refused: {}", describe_error(&el));
            }
            let jid = el.get_child("bind", ns::BIND).and_then(|b| b.get_child("jid", ns::BIND)).map(|j| j.text());
            return jid.context("the bind result has no JID");
        }
    }

    /// Join `room` as `nick` (no history) and wait for the self presence.
    async fn join(&mut self, room: &str, nick: &str) -> anyhow::Result<()> {
        let occupant = format!("{room}/{nick}");
        self.send(&format!("<presence to='{occupant}'><x xmlns='{}'><history maxstanzas='0'/></x></presence>", ns::MUC)).await?;
        loop {
            let el = self.next_stanza().await?;
            if el.is("presence", ns::CLIENT) && el.attr("from") == Some(occupant.as_str()) {
                if el.attr("type") == Some("error") {
                    bail!("joining {occupant} refused: {}", describe_error(&el));
                }
                return Ok(());
            }
        }
    }
}

/// The condition (and text) of a stanza or stream error.
fn describe_error(el: &Element) -> String {
    let error = if el.is("error", ns::STREAM) { Some(el) } else { el.get_child("error", ns::CLIENT) };
    let Some(error) = error else { return String::from(el) };
    let condition = error.children().find(|c| c.name() != "text").map(|c| c.name().to_owned()).unwrap_or_else(|| "unknown".into());
    let text = error.children().find(|c| c.name() == "text").map(|t| t.text()).unwrap_or_default();
    if text.is_empty() { condition } else { format!("{condition}: {text}") }
}

/// The send time at the start of a body (`None` if it is not one of ours).
fn sent_ns(body: &str) -> Option<u64> {
    body.get(..20)?.parse().ok()
}

/// A groupchat message to `room` whose body starts with the send time.
fn message_stanza(room: &str, cid: u64, now_ns: u64, pad: &str) -> String {
    format!("<message to='{room}' type='groupchat' id='b{cid}'><body>{now_ns:020}{pad}</body></message>")
}

// ---------------------------------------------------------------------------------------------
// The load.

/// What one measured run produced.
struct Outcome {
    stats: Stats,
    window_s: f64,
    setup_s: f64,
    server_rss: Option<u64>,
    cpu: CpuCores,
}

/// What every occupant task shares.
struct Ctx {
    addr: SocketAddr,
    tag: String,
    shape: Shape,
    pad: String,
    /// `Some(start_ns)` once the load starts.
    start: watch::Receiver<Option<u64>>,
    stop: CancellationToken,
}

impl Ctx {
    fn room(&self, room: usize) -> String {
        format!("x{}-{room}@{SERVICE}", self.tag)
    }
}

/// Set up every connection (room creators first), run warm-up + duration, and collect.
async fn run(node: &mut Node, shape: &Shape) -> anyhow::Result<Outcome> {
    stats::reset();
    let setup_started = Instant::now();
    let (start_tx, start_rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let ctx = Arc::new(Ctx {
        addr: node.c2s,
        tag: super::rooms::run_tag(),
        shape: shape.clone(),
        pad: "x".repeat(shape.size - 20),
        start: start_rx,
        stop: stop.clone(),
    });
    let _stop_guard = stop.clone().drop_guard();
    let mut tasks = JoinSet::new();
    let progress = super::load::progress_bar((shape.rooms * shape.occupants) as u64, &format!("{} connections", node.kind.name()));
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(1024);
    let slots = Arc::new(Semaphore::new(shape.connect_concurrency));
    let spawn = |room: usize, index: usize, tasks: &mut JoinSet<()>| {
        let (ctx, ready, slots) = (ctx.clone(), ready_tx.clone(), slots.clone());
        tasks.spawn(async move { occupant(ctx, room, index, ready, slots).await });
    };
    // The first occupant of a room creates it; everyone else joins once it exists.
    for room in 0..shape.rooms {
        spawn(room, 0, &mut tasks);
    }
    wait_ready(shape.rooms, &mut ready_rx, node, &progress).await?;
    for index in 1..shape.occupants {
        for room in 0..shape.rooms {
            spawn(room, index, &mut tasks);
        }
    }
    wait_ready(shape.rooms * (shape.occupants - 1), &mut ready_rx, node, &progress).await?;
    progress.finish_and_clear();
    let setup_s = setup_started.elapsed().as_secs_f64();

    // Let the join presences drain before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = stats::now_ns() + 10_000_000;
    let window_start = start + shape.warmup.as_nanos() as u64;
    stats::set_window(window_start, window_start + shape.duration.as_nanos() as u64);
    start_tx.send(Some(start)).ok();
    let cpu = stats::measure_window(&node.pid.into_iter().collect::<Vec<_>>(), shape.warmup, shape.duration, || node.check_alive()).await?;
    let server_rss = node.rss_bytes();
    stop.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
        tasks.abort_all();
    }
    Ok(Outcome { stats: stats::collect(), window_s: shape.duration.as_secs_f64(), setup_s, server_rss, cpu })
}

/// Wait until `n` occupants are set up; the first failure (or a dead server) ends the run.
async fn wait_ready(n: usize, rx: &mut mpsc::Receiver<anyhow::Result<()>>, node: &mut Node, progress: &indicatif::ProgressBar) -> anyhow::Result<()> {
    for _ in 0..n {
        match tokio::time::timeout(SETUP_TIMEOUT, rx.recv()).await {
            Ok(Some(Ok(()))) => progress.inc(1),
            Ok(Some(Err(e))) => {
                node.check_alive()?;
                return Err(e);
            }
            Ok(None) => bail!("occupant tasks ended during set-up"),
            Err(_) => {
                node.check_alive()?;
                bail!("set-up stalled: no connection got ready for {SETUP_TIMEOUT:?}")
            }
        }
    }
    Ok(())
}

/// One occupant: connect, log in, join, report ready, then read (and send) until stop.
async fn occupant(ctx: Arc<Ctx>, room: usize, index: usize, ready: mpsc::Sender<anyhow::Result<()>>, slots: Arc<Semaphore>) {
    let Ok(permit) = slots.acquire_owned().await else { return };
    let room = ctx.room(room);
    let nick = format!("n{index}");
    let setup = async {
        let mut conn = Conn::connect(ctx.addr).await?;
        conn.login().await.context("logging in")?;
        conn.join(&room, &nick).await?;
        anyhow::Ok(conn)
    };
    let setup = async { tokio::time::timeout(SETUP_TIMEOUT, setup).await.unwrap_or_else(|_| Err(anyhow::anyhow!("set-up took over {SETUP_TIMEOUT:?}"))) };
    let mut conn = match tokio::select! { r = setup => r, _ = ctx.stop.cancelled() => return } {
        Ok(conn) => conn,
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return;
        }
    };
    drop(permit);
    if ready.send(Ok(())).await.is_err() {
        return;
    }
    drop(ready);
    let result = if index == 0 { send_loop(&ctx, &mut conn, &room, &format!("{room}/{nick}")).await } else { read_loop(&ctx, &mut conn).await };
    if let Err(e) = result
        && !ctx.stop.is_cancelled()
    {
        tracing::debug!(error = %e, "xmpp bench connection ended");
        stats::error("disconnected");
    }
}

/// Read and count until stop.
async fn read_loop(ctx: &Ctx, conn: &mut Conn) -> anyhow::Result<()> {
    let mut in_flight = 0;
    loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => return Ok(()),
            r = conn.fill() => r?,
        }
        while let Some(item) = conn.items.pop_front() {
            on_item(item, None, &mut in_flight)?;
        }
    }
}

/// What an incoming stanza means to the load.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A groupchat message with a body (`sent_ns` when the body is one of ours); `mine` when it
    /// is the reflection of this sender's own message: its ack.
    Delivery { sent_ns: Option<u64>, mine: bool },
    /// A message error (its condition).
    Error(String),
    /// Anything else: presences, the subject, IQs.
    Other,
}

/// Classify one item; `own` is the sender's occupant JID (`room/nick`).
fn classify(item: Item, own: Option<&str>) -> anyhow::Result<Seen> {
    let el = match item {
        Item::Stanza(el) => el,
        Item::Close => bail!("the server ended the stream"),
        Item::Open(_) => bail!("a second stream header"),
    };
    if el.is("error", ns::STREAM) {
        bail!("stream error: {}", describe_error(&el));
    }
    if !el.is("message", ns::CLIENT) {
        return Ok(Seen::Other);
    }
    Ok(match el.attr("type") {
        // Subject messages (at the end of every join) have no body.
        Some("groupchat") => match el.get_child("body", ns::CLIENT) {
            Some(body) => Seen::Delivery { sent_ns: sent_ns(&body.text()), mine: own.is_some() && el.attr("from") == own },
            None => Seen::Other,
        },
        Some("error") => Seen::Error(describe_error(&el).split(':').next().unwrap_or("error").to_owned()),
        _ => Seen::Other,
    })
}

/// Count one item; a sender's own reflections (and its message errors) free window slots.
fn on_item(item: Item, own: Option<&str>, in_flight: &mut usize) -> anyhow::Result<()> {
    let now = stats::now_ns();
    match classify(item, own)? {
        Seen::Delivery { sent_ns, mine } => {
            stats::delivery(now, sent_ns);
            if mine {
                *in_flight = in_flight.saturating_sub(1);
                if let Some(sent) = sent_ns {
                    stats::ack(now, sent, false);
                }
            }
        }
        Seen::Error(condition) => {
            if own.is_some() {
                *in_flight = in_flight.saturating_sub(1);
            }
            stats::error(&condition);
        }
        Seen::Other => {}
    }
    Ok(())
}

/// Send (window-bound or paced) and read until stop; stop sending at the window's end.
async fn send_loop(ctx: &Ctx, conn: &mut Conn, room: &str, own: &str) -> anyhow::Result<()> {
    let shape = &ctx.shape;
    let interval_ns = shape.interval_ns();
    let mut start = ctx.start.clone();
    let mut started: Option<u64> = *start.borrow();
    let mut next_due: u64 = 0;
    let mut in_flight = 0usize;
    let mut cid = 0u64;
    let mut out = String::new();
    loop {
        let mut deadline = None;
        if let Some(begin) = started {
            let now = stats::now_ns();
            if now < stats::window_end() && now >= begin {
                out.clear();
                let mut fed = 0u64;
                if interval_ns == 0 {
                    while in_flight < shape.window {
                        cid += 1;
                        out.push_str(&message_stanza(room, cid, now, &ctx.pad));
                        in_flight += 1;
                        fed += 1;
                    }
                } else {
                    while next_due <= now && in_flight < shape.window {
                        cid += 1;
                        out.push_str(&message_stanza(room, cid, now, &ctx.pad));
                        in_flight += 1;
                        fed += 1;
                        next_due += interval_ns;
                    }
                    if next_due <= now {
                        // Window full: skip what is due rather than burst later (and say so).
                        let missed = (now - next_due) / interval_ns + 1;
                        stats::skipped(now, missed);
                        next_due += missed * interval_ns;
                    }
                    deadline = Some(next_due);
                }
                if fed > 0 {
                    conn.send(&out).await?;
                    stats::sent(now, fed);
                }
            } else if now < begin {
                deadline = Some(begin);
            }
        }
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep(Duration::from_nanos(at.saturating_sub(stats::now_ns()))).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => return Ok(()),
            changed = start.changed(), if started.is_none() => {
                if changed.is_err() {
                    return Ok(());
                }
                started = *start.borrow();
                if let Some(begin) = started {
                    // Spread the senders' phases over one interval.
                    let phase = if interval_ns > 0 { rand::rng().random_range(0..interval_ns) } else { 0 };
                    next_due = begin + phase;
                }
            }
            r = conn.fill() => {
                r?;
                while let Some(item) = conn.items.pop_front() {
                    on_item(item, Some(own), &mut in_flight)?;
                }
            }
            _ = sleep => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The figures.

/// One server's figures in one round.
#[derive(Clone, Debug)]
struct Figures {
    round: usize,
    server: Kind,
    messages_per_s: f64,
    deliveries_per_s: f64,
    sent_per_s: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    e2e_p999_ms: f64,
    e2e_max_ms: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    /// Cores the server used during the window (`None` without its pid).
    server_cores: Option<f64>,
    deliveries_per_cpu_s: Option<f64>,
    bench_cores: f64,
    other_cores: f64,
    server_rss_bytes: Option<u64>,
    skipped: u64,
    errors: std::collections::BTreeMap<String, u64>,
    setup_s: f64,
    /// Messages Prosody archived during the round (warm-up and drain included).
    archived: Option<u64>,
}

impl Figures {
    fn new(round: usize, server: Kind, out: &Outcome, archived: Option<u64>) -> Figures {
        let s = &out.stats;
        let per_s = |n: u64| n as f64 / out.window_s;
        let deliveries_per_s = per_s(s.deliveries);
        let server_cores = out.cpu.server;
        Figures {
            round,
            server,
            messages_per_s: per_s(s.acks),
            deliveries_per_s,
            sent_per_s: per_s(s.sent),
            e2e_p50_ms: Stats::ms(&s.e2e, 0.50),
            e2e_p99_ms: Stats::ms(&s.e2e, 0.99),
            e2e_p999_ms: Stats::ms(&s.e2e, 0.999),
            e2e_max_ms: s.e2e.max() as f64 / 1000.0,
            ack_p50_ms: Stats::ms(&s.ack, 0.50),
            ack_p99_ms: Stats::ms(&s.ack, 0.99),
            server_cores,
            deliveries_per_cpu_s: server_cores.filter(|c| *c > 0.0).map(|c| deliveries_per_s / c),
            bench_cores: out.cpu.bench,
            other_cores: out.cpu.other,
            server_rss_bytes: out.server_rss,
            skipped: s.skipped,
            errors: s.errors.clone(),
            setup_s: out.setup_s,
            archived,
        }
    }

    /// One line for stderr as the round ends.
    fn line(&self) -> String {
        format!(
            "round {} {:<7}  {:>8.0} msg/s  {:>9.0} deliveries/s  p50 {:.2} ms  p99 {:.2} ms  server {:.2} cores  {:>8.0} deliveries/CPU-s  (bench {:.2}, other {:.2} cores{})",
            self.round,
            self.server.name(),
            self.messages_per_s,
            self.deliveries_per_s,
            self.e2e_p50_ms,
            self.e2e_p99_ms,
            self.server_cores.unwrap_or(f64::NAN),
            self.deliveries_per_cpu_s.unwrap_or(f64::NAN),
            self.bench_cores,
            self.other_cores,
            if self.skipped > 0 { format!(", {} sends skipped", self.skipped) } else { String::new() },
        )
    }

    fn to_json(&self) -> serde_json::Value {
        let opt = |v: Option<f64>| v.map_or(serde_json::Value::Null, |v| round3(v).into());
        serde_json::json!({
            "round": self.round,
            "server": self.server.name(),
            "messages_per_s": round3(self.messages_per_s),
            "deliveries_per_s": round3(self.deliveries_per_s),
            "sent_per_s": round3(self.sent_per_s),
            "e2e_p50_ms": round3(self.e2e_p50_ms),
            "e2e_p99_ms": round3(self.e2e_p99_ms),
            "e2e_p999_ms": round3(self.e2e_p999_ms),
            "e2e_max_ms": round3(self.e2e_max_ms),
            "ack_p50_ms": round3(self.ack_p50_ms),
            "ack_p99_ms": round3(self.ack_p99_ms),
            "cpu_cores_server": opt(self.server_cores),
            "deliveries_per_cpu_s": opt(self.deliveries_per_cpu_s),
            "cpu_cores_bench": round3(self.bench_cores),
            "cpu_cores_other": round3(self.other_cores),
            "server_rss_bytes": self.server_rss_bytes,
            "sends_skipped_window_full": self.skipped,
            "errors": self.errors,
            "setup_s": round3(self.setup_s),
            "archived_messages": self.archived,
        })
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

/// A field of the figures: its name, and its value in one run.
type Field = (&'static str, fn(&Figures) -> Option<f64>);

/// Named values (medians or ratios), in the order of [`MEDIAN_FIELDS`].
type Named = Vec<(&'static str, Option<f64>)>;

/// The fields with medians over rounds.
const MEDIAN_FIELDS: &[Field] = &[
    ("messages_per_s", |f| Some(f.messages_per_s)),
    ("deliveries_per_s", |f| Some(f.deliveries_per_s)),
    ("e2e_p50_ms", |f| Some(f.e2e_p50_ms)),
    ("e2e_p99_ms", |f| Some(f.e2e_p99_ms)),
    ("e2e_p999_ms", |f| Some(f.e2e_p999_ms)),
    ("cpu_cores_server", |f| f.server_cores),
    ("deliveries_per_cpu_s", |f| f.deliveries_per_cpu_s),
    ("cpu_cores_bench", |f| Some(f.bench_cores)),
    ("cpu_cores_other", |f| Some(f.other_cores)),
];

/// The ratios Stoa / Prosody reported (of the medians).
const RATIO_FIELDS: &[&str] = &["messages_per_s", "deliveries_per_s", "deliveries_per_cpu_s", "e2e_p50_ms", "e2e_p99_ms"];

/// Medians over rounds of one server's runs, by field name.
fn medians(runs: &[Figures], kind: Kind) -> Named {
    let mine: Vec<&Figures> = runs.iter().filter(|f| f.server == kind).collect();
    MEDIAN_FIELDS.iter().map(|(name, get)| (*name, median(mine.iter().filter_map(|f| get(f)).collect()))).collect()
}

fn summarize(
    shape: &Shape,
    args: &XmppArgs,
    target_args: &TargetArgs,
    workspace: &Workspace,
    kinds: &[Kind],
    prosody_version: Option<String>,
    runs: &[Figures],
) -> Summary {
    let mut summary = Summary::default();
    summary.push("mode", "xmpp");
    summary.push("servers", kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "));
    if kinds.contains(&Kind::Stoa) {
        let store = server::store_kind(workspace.store_url.as_deref().unwrap_or(""));
        summary.push("stoa_store", format!("{store} (sqlite_synchronous = {})", target_args.sqlite_synchronous));
    }
    if kinds.contains(&Kind::Prosody) {
        summary.push("prosody_version", prosody_version.unwrap_or_else(|| "unknown".into()));
        summary.push(
            "prosody_storage",
            if args.prosody_storage == "sql" {
                "sql: SQLite, WAL, synchronous = FULL (mod_muc_mam archives every message before the broadcast)"
            } else {
                "internal: flat files without fsync (not durable)"
            },
        );
    }
    summary.push("rooms", shape.rooms);
    summary.push("occupants_per_room", shape.occupants);
    summary.push("senders_per_room", 1);
    summary.push("rate_per_s", shape.rate.map_or(serde_json::Value::from("saturation"), |r| round3(r).into()));
    summary.push("window", shape.window);
    summary.push("size_bytes", shape.size);
    summary.push("duration_s", shape.duration.as_secs_f64());
    summary.push("warmup_s", shape.warmup.as_secs_f64());
    summary.push("rounds", args.rounds);
    summary.push("runs", runs.iter().map(Figures::to_json).collect::<Vec<_>>());
    let mut all = Vec::new();
    for &kind in kinds {
        let m = medians(runs, kind);
        let obj: serde_json::Map<String, serde_json::Value> =
            m.iter().map(|(k, v)| (k.to_string(), v.map_or(serde_json::Value::Null, |v| round3(v).into()))).collect();
        summary.push(&format!("{}_median", kind.name()), serde_json::Value::Object(obj));
        all.push((kind, m));
    }
    let (Some((_, stoa)), Some((_, prosody))) = (all.iter().find(|(k, _)| *k == Kind::Stoa), all.iter().find(|(k, _)| *k == Kind::Prosody))
    else {
        summary.set_human(human_table(shape, args, runs, &all, None));
        return summary;
    };
    let get = |m: &Named, name: &str| m.iter().find(|(k, _)| *k == name).and_then(|(_, v)| *v);
    let ratios: Vec<(&str, Option<f64>)> = RATIO_FIELDS
        .iter()
        .map(|name| (*name, get(stoa, name).zip(get(prosody, name)).filter(|(_, p)| *p > 0.0).map(|(s, p)| s / p)))
        .collect();
    let obj: serde_json::Map<String, serde_json::Value> =
        ratios.iter().map(|(k, v)| (k.to_string(), v.map_or(serde_json::Value::Null, |v| round3(v).into()))).collect();
    summary.push("ratio_stoa_over_prosody", serde_json::Value::Object(obj));
    summary.set_human(human_table(shape, args, runs, &all, Some(&ratios)));
    summary
}

/// The human table: one row per run, the medians, the ratios.
fn human_table(
    shape: &Shape,
    args: &XmppArgs,
    runs: &[Figures],
    medians: &[(Kind, Named)],
    ratios: Option<&[(&str, Option<f64>)]>,
) -> String {
    use std::fmt::Write as _;
    let load = match shape.rate {
        Some(r) => format!("{r:.0} msg/s in total (window {})", shape.window),
        None => format!("saturation (window {} per sender)", shape.window),
    };
    let mut t = format!(
        "\n{} rooms × {} occupants, 1 sender per room, {load}, {}-byte bodies, {} s measured after {} s, {} rounds\n\n",
        shape.rooms,
        shape.occupants,
        shape.size,
        shape.duration.as_secs_f64(),
        shape.warmup.as_secs_f64(),
        args.rounds
    );
    let n = |v: Option<f64>| v.map_or("-".to_owned(), super::format_float);
    let _ = writeln!(t, "{:<16} {:>9} {:>12} {:>8} {:>8} {:>9} {:>8} {:>13}", "", "msg/s", "deliveries/s", "p50 ms", "p99 ms", "p99.9 ms", "cores", "deliv/CPU-s");
    for f in runs {
        let _ = writeln!(
            t,
            "{:<16} {:>9} {:>12} {:>8} {:>8} {:>9} {:>8} {:>13}",
            format!("{} {}", f.round, f.server.name()),
            n(Some(f.messages_per_s)),
            n(Some(f.deliveries_per_s)),
            n(Some(f.e2e_p50_ms)),
            n(Some(f.e2e_p99_ms)),
            n(Some(f.e2e_p999_ms)),
            n(f.server_cores),
            n(f.deliveries_per_cpu_s)
        );
    }
    let row = |label: String, get: &dyn Fn(&str) -> String| {
        let cols = ["messages_per_s", "deliveries_per_s", "e2e_p50_ms", "e2e_p99_ms", "e2e_p999_ms", "cpu_cores_server", "deliveries_per_cpu_s"]
            .map(get);
        format!(
            "{:<16} {:>9} {:>12} {:>8} {:>8} {:>9} {:>8} {:>13}\n",
            label, cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6]
        )
    };
    for (kind, m) in medians {
        t.push_str(&row(format!("median {}", kind.name()), &|name| n(m.iter().find(|(k, _)| *k == name).and_then(|(_, v)| *v))));
    }
    if let Some(r) = ratios {
        // Only the ratios that mean something (no ratio of p99.9 or of cores).
        let ratio = |name: &str| match r.iter().find(|(k, _)| *k == name) {
            Some((_, Some(v))) => format!("{v:.2}×"),
            Some((_, None)) => "-".to_owned(),
            None => String::new(),
        };
        t.push_str(&row("stoa / prosody".into(), &ratio));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_send_times() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let body = format!("{:020}xxxx", 1_234_567u64);
        assert_eq!(sent_ns(&body), Some(1_234_567));
        assert_eq!(sent_ns("hello"), None);
    }

    #[test]
    fn the_prosody_config_stays_on_loopback_with_a_sqlite_archive() {
        let dir = Path::new("/tmp/b");
        let text = prosody_config(dir, "127.0.0.1:15222".parse().unwrap(), Some(&dir.join("p.sqlite")));
        assert!(text.contains("interfaces = { \"127.0.0.1\" }"), "{text}");
        assert!(text.contains("c2s_ports = { 15222 }"), "{text}");
        assert!(text.contains("driver = \"SQLite3\", database = \"/tmp/b/p.sqlite\""), "{text}");
        assert!(text.contains("modules_enabled = { \"muc_mam\" }"), "{text}");
        assert!(text.contains("authentication = \"anonymous\""), "{text}");
    }

    #[test]
    fn stanzas_classify_into_deliveries_acks_and_errors() {
        let header = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='localhost' version='1.0'>";
        let own = "r@conference.localhost/n0";
        let msg = |from: &str| format!("<message from='{from}' to='a@localhost/b' type='groupchat' id='b1'><body>{:020}x</body></message>", 42);
        let text = format!(
            "{header}{}{}<message from='r@conference.localhost' type='groupchat'><subject/></message>\
             <message from='r@conference.localhost' type='error'><error type='cancel'><not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>\
             <presence from='r@conference.localhost/n3'/></stream:stream>",
            msg(own),
            msg("r@conference.localhost/n3")
        );
        let mut reader = StreamReader::new(MAX_STANZA_BYTES, MAX_DEPTH);
        let mut items = Vec::new();
        reader.feed(text.as_bytes(), &mut items).unwrap();
        let mut items = items.into_iter().skip(1);
        let mut next = || classify(items.next().unwrap(), Some(own));
        assert_eq!(next().unwrap(), Seen::Delivery { sent_ns: Some(42), mine: true });
        assert_eq!(next().unwrap(), Seen::Delivery { sent_ns: Some(42), mine: false });
        assert_eq!(next().unwrap(), Seen::Other);
        assert_eq!(next().unwrap(), Seen::Error("not-acceptable".into()));
        assert_eq!(next().unwrap(), Seen::Other);
        assert!(next().is_err(), "the stream's end ends the connection");
    }
}
