//! The server under test: a `stoa serve` child process the bench starts (generated config,
//! free loopback ports, readiness by `/health`, killed at the end whatever happens), or a
//! server that is already running (`--url`).

use super::TargetArgs;
use super::wire::Endpoint;
use anyhow::{Context as _, bail};
use rand::Rng;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Node id and room service of a spawned server.
pub const NODE_ID: &str = "bench";
pub const SERVICE: &str = "conference.localhost";

/// How long a spawned server may take to answer `/health` (a fresh PostgreSQL database needs
/// its migrations first).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Server settings a mode needs beyond the defaults (on top of the bench's own: no rate limit,
/// deep outbound queues, many connections).
#[derive(Default)]
pub struct Tuning {
    /// `section.key` → TOML literal.
    pub settings: Vec<(&'static str, String)>,
}

/// Where the bench works: its temp dir and the store the server will use.
pub struct Workspace {
    dir: Option<PathBuf>,
    keep: bool,
    /// The store URL (the spawned server's, or `--store` for a running one).
    pub store_url: Option<String>,
}

impl Workspace {
    /// A temp dir (unless `--url`) and the store URL.
    pub fn new(args: &TargetArgs) -> anyhow::Result<Workspace> {
        if args.url.is_some() {
            return Ok(Workspace { dir: None, keep: args.keep, store_url: args.store.clone() });
        }
        let tag: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(8).map(char::from).collect();
        let dir = std::env::temp_dir().join(format!("stoa-bench-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).with_context(|| format!("creating {}", dir.display()))?;
        let store_url = args.store.clone().unwrap_or_else(|| format!("sqlite://{}/data/stoa.db", dir.display()));
        Ok(Workspace { dir: Some(dir), keep: args.keep, store_url: Some(store_url) })
    }

    /// Start the server (or reach the running one).
    pub async fn start(&self, args: &TargetArgs, tuning: &Tuning) -> anyhow::Result<Target> {
        match (&args.url, &self.dir) {
            (Some(url), _) => Ok(Target {
                endpoint: Endpoint::parse(url)?,
                pid: args.server_pid,
                child: None,
            }),
            (None, Some(dir)) => spawn(dir, self.store_url.as_deref().expect("spawned servers have a store"), args, tuning).await,
            (None, None) => unreachable!("a workspace without --url has a dir"),
        }
    }
}

impl Workspace {
    /// The temp dir (absent with `--url`).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            if self.keep {
                eprintln!("bench files kept in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// The server under test.
pub struct Target {
    pub endpoint: Endpoint,
    /// Its process id, when known (for RSS).
    pub pid: Option<u32>,
    child: Option<Child>,
}

struct Child {
    process: tokio::process::Child,
    log: PathBuf,
}

impl Target {
    /// The server's resident set size now (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_of(self.pid).0
    }

    /// The server's peak resident set size (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        rss_of(self.pid).1
    }

    /// Kill a spawned server and wait for it (a running one is left alone).
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.process.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.process.wait()).await;
        }
    }

    /// Fail if a spawned server has died (with the tail of its log).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.process.try_wait()
        {
            bail!("the server exited ({status}); its log ends with:\n{}", log_tail(&child.log));
        }
        Ok(())
    }
}

/// `sqlite`, `postgres` or `mysql` for a store URL.
pub fn store_kind(url: &str) -> &'static str {
    if url.starts_with("postgres") {
        "postgres"
    } else if url.starts_with("mysql") || url.starts_with("mariadb") {
        "mysql"
    } else if url.starts_with("sqlite") {
        "sqlite"
    } else {
        "unknown"
    }
}

/// The resident set size (VmRSS) and its peak (VmHWM) of process `pid`, in bytes.
pub fn rss_of(pid: Option<u32>) -> (Option<u64>, Option<u64>) {
    let kib = |key| pid.and_then(|p| proc_status_kib(p, key)).map(|k| k * 1024);
    (kib("VmRSS:"), kib("VmHWM:"))
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// A free loopback port, taken *below* the kernel's ephemeral range (32768–60999 on Linux): a
/// port from that range, released and bound again later, can meanwhile become the source port
/// of an outgoing connection (the nodes of a pair or a cluster dial each other while they start),
/// and the node's bind then fails. Each call returns a different port; the start depends on the
/// process id, so concurrent benches (and test binaries, which do the same) rarely meet.
fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(0, 20_000 + (std::process::id() % 1000) as u16 * 12, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..12_000 {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = if port >= 32_000 { 20_000 + port % 12_000 } else { port };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between 20000 and 32000")
}

/// A TOML value: numbers, booleans, arrays and inline tables as they are, anything else as a
/// quoted string.
fn toml_literal(v: &str) -> String {
    if v == "true" || v == "false" || v.parse::<i64>().is_ok() || v.parse::<f64>().is_ok() || v.starts_with(['"', '[', '{']) {
        v.to_owned()
    } else {
        format!("{v:?}")
    }
}

/// The generated config: the bench's settings, then the mode's, then `--server-set`.
fn config_toml(dir: &Path, store_url: &str, spec: &NodeSpec, args: &TargetArgs, tuning: &Tuning) -> anyhow::Result<String> {
    let (client, admin) = (spec.client, spec.admin);
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut set = |key: &str, value: String| -> anyhow::Result<()> {
        let (section, name) = key.split_once('.').with_context(|| format!("server setting `{key}` is not section.key"))?;
        sections.entry(section.to_owned()).or_default().insert(name.to_owned(), value);
        Ok(())
    };
    let q = |s: &str| format!("{s:?}");
    set("node.id", q(&spec.id))?;
    set("node.service", q(&spec.service))?;
    set("node.data_dir", q(&dir.join(format!("data-{}", spec.id)).display().to_string()))?;
    set("listen.client", q(&client.to_string()))?;
    set("listen.admin", q(&admin.to_string()))?;
    set("store.url", q(store_url))?;
    set("store.sqlite_synchronous", q(&args.sqlite_synchronous))?;
    set("auth.allow_guests", "true".into())?;
    // The bench measures the server, not its abuse limits.
    set("limits.requests_per_second", "1000000".into())?;
    set("limits.request_burst", "1000000".into())?;
    set("limits.outbound_queue", "65536".into())?;
    set("limits.max_connections", "19000".into())?;
    set("limits.max_rooms_per_connection", "1000".into())?;
    set("limits.idle_timeout_ms", "600000".into())?;
    set("limits.hello_timeout_ms", "120000".into())?;
    set("limits.max_pending_handshakes", "19000".into())?;
    set("limits.handshake_timeout_ms", "120000".into())?;
    set("limits.rooms_created_per_user_per_hour", "100000000".into())?;
    set("limits.rooms_created_per_address_per_hour", "100000000".into())?;
    set("auth.login_failures_per_address", "1000000".into())?;
    set("log.level", q("warn"))?;
    if let Some(v) = args.batch_rows {
        set("committer.max_batch_rows", v.to_string())?;
    }
    if let Some(v) = args.batch_delay_us {
        set("committer.max_batch_delay_us", v.to_string())?;
    }
    if let Some(v) = args.in_flight {
        set("committer.max_in_flight", v.to_string())?;
    }
    if let Some(v) = args.store_connections {
        set("store.max_connections", v.to_string())?;
    }
    if let Some(v) = args.arbiters {
        set("rooms.arbiters", v.to_string())?;
    }
    for (k, v) in &tuning.settings {
        set(k, v.clone())?;
    }
    for kv in &args.server_set {
        let (k, v) = kv.split_once('=').with_context(|| format!("--server-set `{kv}` is not section.key=value"))?;
        set(k.trim(), toml_literal(v.trim()))?;
    }
    let mut out = String::from("# generated by stoa bench\n");
    for (section, keys) in sections {
        out.push_str(&format!("\n[{section}]\n"));
        for (k, v) in keys {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out.push_str(&spec.extra_toml);
    Ok(out)
}

/// One server to spawn: its id, room service, loopback addresses, and TOML appended to the
/// generated config (e.g. `[[cluster.groups]]` tables).
pub struct NodeSpec {
    pub id: String,
    pub service: String,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    pub extra_toml: String,
}

impl NodeSpec {
    /// A node on free loopback ports.
    pub fn on_free_ports(id: &str, service: &str) -> anyhow::Result<NodeSpec> {
        Ok(NodeSpec {
            id: id.to_owned(),
            service: service.to_owned(),
            client: format!("127.0.0.1:{}", free_port()?).parse()?,
            admin: format!("127.0.0.1:{}", free_port()?).parse()?,
            extra_toml: String::new(),
        })
    }
}

/// A free loopback port.
pub fn loopback_port() -> anyhow::Result<u16> {
    free_port()
}

async fn spawn(dir: &Path, store_url: &str, args: &TargetArgs, tuning: &Tuning) -> anyhow::Result<Target> {
    spawn_node(dir, store_url, args, tuning, &NodeSpec::on_free_ports(NODE_ID, SERVICE)?).await
}

/// Spawn `stoa serve` for `spec` and wait until `/health` answers.
pub async fn spawn_node(dir: &Path, store_url: &str, args: &TargetArgs, tuning: &Tuning, spec: &NodeSpec) -> anyhow::Result<Target> {
    let (client, admin) = (spec.client, spec.admin);
    let config = dir.join(format!("{}.toml", spec.id));
    std::fs::write(&config, config_toml(dir, store_url, spec, args, tuning)?)
        .with_context(|| format!("writing {}", config.display()))?;
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("finding the stoa executable")?,
    };
    let log = dir.join(format!("{}.log", spec.id));
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("STOA_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true);
    for kv in &args.server_env {
        let (k, v) = kv.split_once('=').with_context(|| format!("--server-env `{kv}` is not KEY=VALUE"))?;
        cmd.env(k, v);
    }
    die_with_the_bench(&mut cmd);
    let process = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let pid = process.id();
    let mut target = Target {
        endpoint: Endpoint::parse(&format!("ws://{client}/ws"))?,
        pid,
        child: Some(Child { process, log }),
    };
    let started = Instant::now();
    loop {
        target.check_alive()?;
        if health_ok(admin).await {
            break;
        }
        if started.elapsed() > READY_TIMEOUT {
            let tail = target.child.as_ref().map(|c| log_tail(&c.log)).unwrap_or_default();
            bail!("the server did not become healthy within {READY_TIMEOUT:?}; its log ends with:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(target)
}

/// `GET /health` answers 200.
async fn health_ok(admin: SocketAddr) -> bool {
    let answer = crate::admin_client::request(&admin.to_string(), "GET", "/health", None, Duration::from_secs(2)).await;
    answer.is_ok_and(|a| a.status == 200)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Have the kernel SIGKILL the server `cmd` starts when the thread that spawns it (the bench's
/// main thread, which lives as long as the bench) dies: a bench killed with SIGKILL leaves no
/// server behind.
pub fn die_with_the_bench(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe, and this closure does nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        target: TargetArgs,
    }

    #[test]
    fn generated_config_loads_and_lifts_the_limits() {
        let cli = Cli::parse_from(["x", "--batch-rows", "2000", "--server-set", "rooms.recent_cache=8", "--server-set", "log.level=error"]);
        let dir = std::env::temp_dir().join(format!("stoa-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tuning = Tuning { settings: vec![("rooms.passivate_after_ms", "3600000".into())] };
        let mut spec = NodeSpec::on_free_ports("n1", "conference.localhost").unwrap();
        spec.extra_toml = "\n[cluster]\nheartbeat_ms = 250\n".into();
        let text = config_toml(&dir, "sqlite:///tmp/x.db", &spec, &cli.target, &tuning).unwrap();
        let path = dir.join("stoa.toml");
        std::fs::write(&path, text).unwrap();
        let s = crate::config::Settings::load(Some(&path)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s.committer.max_batch_rows, 2000);
        assert_eq!(s.rooms.recent_cache, 8);
        assert_eq!(s.rooms.passivate_after_ms, 3_600_000);
        assert_eq!(s.log.level, "error");
        assert!(s.auth.allow_guests);
        assert_eq!(s.limits.requests_per_second, 1_000_000);
        assert_eq!(s.store.sqlite_synchronous, "full");
        assert_eq!((s.node.id.as_str(), s.cluster.heartbeat_ms), ("n1", 250));
    }
}
