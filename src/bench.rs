//! `stoa bench`: a load generator over real WebSocket connections, and the figures quoted in
//! `docs/benchmarks.md`.
//!
//! By default the bench starts the server itself: the current executable runs `serve --config`
//! with a generated config in a temp dir (SQLite there unless `--store` names PostgreSQL or
//! MySQL), on free loopback ports, and is killed at the end whatever happens. `--url` targets a
//! server that is already running instead (`--server-pid` lets the bench read its RSS).
//!
//! Modes (each prints a human table on stderr and a JSON summary on stdout):
//!
//! - `throughput`: durable messages per second (acks arrive only after commit).
//! - `fanout`: deliveries per second to many occupants of a few rooms.
//! - `latency`: end-to-end and ack latency at a fixed rate (half the measured saturation rate
//!   unless `--total-rate` is given).
//! - `idle-rooms`: server memory per activated idle room.
//! - `connections`: server memory per WebSocket connection (19,000 by default), idle and with a
//!   message per connection per minute.
//! - `cold-activation`: join latency of never-activated rooms with a million rooms in the store.
//! - `failover`: a redundancy pair under probe load; detection, failover, client resume and
//!   fallback times over repeated faults, and a check that no acked probe was lost or doubled.
//! - `cluster`: the cluster of `examples/cluster/` (3 pairs + 1 single node, 7 processes):
//!   server CPU and latency of forwarded against local rooms, and failover of one pair's host
//!   under load with every acked message checked in its group's store.
//! - `xmpp`: the same MUC load over XMPP against Stoa and against Prosody 0.12 (both started by
//!   the bench), alternated round by round: messages/s, deliveries/s, latency, and deliveries
//!   per server CPU-second of each.
//!
//! The generator shares the machine with the server, so it is frugal: raw `tokio-tungstenite`
//! connections with small buffers, no per-delivery shared state (each message body starts with
//! its send time, and each worker thread keeps its own histograms, merged at the end).

mod cluster;
mod connections;
mod failover;
mod load;
mod rooms;
mod server;
mod stats;
mod wire;
mod xmpp;

use anyhow::Context as _;
use std::time::Duration;

/// Arguments of `stoa bench`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Every option is documented in docs/benchmarks.md.")]
pub struct BenchArgs {
    /// What to measure (default: `throughput` with its defaults).
    #[command(subcommand)]
    pub mode: Option<Mode>,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// The benchmark to run.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Mode {
    /// Durable messages/s: R rooms, S senders each, a bounded window of unacked sends.
    Throughput(LoadArgs),
    /// Deliveries/s: a few rooms with many occupants, one sender per room.
    Fanout(LoadArgs),
    /// Latency percentiles at a fixed rate (default: half the saturation rate, probed first).
    Latency(LatencyArgs),
    /// Server memory per loaded idle room (bulk-created rooms, activated by join + leave).
    IdleRooms(IdleArgs),
    /// Join latency of never-activated rooms with many rooms (default 1,000,000) in the store.
    ColdActivation(ColdArgs),
    /// Server memory per WebSocket connection (default 19,000 guests over 1,000 rooms): idle,
    /// then with a message per connection per minute.
    Connections(connections::ConnectionsArgs),
    /// A redundancy pair under probe load: kill -9 (or a critical service stop) of the host,
    /// failover, restart, fallback, repeated; needs --store postgres://… or mysql://….
    Failover(failover::FailoverArgs),
    /// The cluster of `examples/cluster/` (3 PostgreSQL pairs + 1 SQLite node, fresh databases
    /// on --pg-url): forwarded against local rooms (msg/s, latency, server CPU per message),
    /// then kill -9 of pair 2's host under load (failover times, acked_lost, duplicates).
    Cluster(cluster::ClusterArgs),
    /// The same MUC load over XMPP against Stoa and against Prosody 0.12 (started by the bench,
    /// needs Debian's `prosody` and `lua-dbi-sqlite3`), alternated: msg/s, deliveries/s,
    /// latency, deliveries per server CPU-second.
    Xmpp(xmpp::XmppArgs),
}

/// Which server to load, and how to configure the one the bench starts.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Store of the spawned server: `sqlite://…`, `postgres://…` or `mysql://…`
    /// (default: SQLite in the bench's temp dir). With `--url`: the running server's store,
    /// needed by `idle-rooms` and `cold-activation` to bulk-insert rooms.
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,
    /// Load a running server at this WebSocket URL (loopback only) instead of spawning one.
    #[arg(long, global = true, value_name = "WS_URL")]
    pub url: Option<String>,
    /// PID of the server given by `--url`, to report its RSS.
    #[arg(long, global = true, value_name = "PID", requires = "url")]
    pub server_pid: Option<u32>,
    /// The `stoa` binary to spawn (default: this executable).
    #[arg(long, global = true, value_name = "PATH")]
    pub server_bin: Option<std::path::PathBuf>,
    /// `store.sqlite_synchronous` of the spawned server: full (durable, default), normal, extra, off.
    #[arg(long, global = true, default_value = "full")]
    pub sqlite_synchronous: String,
    /// `committer.max_batch_rows` of the spawned server (default: the server's).
    #[arg(long, global = true)]
    pub batch_rows: Option<usize>,
    /// `committer.max_batch_delay_us` of the spawned server.
    #[arg(long, global = true, value_name = "US")]
    pub batch_delay_us: Option<u64>,
    /// `committer.max_in_flight` of the spawned server (forced to 1 on SQLite).
    #[arg(long, global = true)]
    pub in_flight: Option<usize>,
    /// `store.max_connections` (pool size) of the spawned server.
    #[arg(long, global = true)]
    pub store_connections: Option<u32>,
    /// `rooms.arbiters` of the spawned server (0 = one per core).
    #[arg(long, global = true)]
    pub arbiters: Option<usize>,
    /// Any other setting of the spawned server, as `section.key=value` (repeatable).
    #[arg(long = "server-set", global = true, value_name = "SECTION.KEY=VALUE")]
    pub server_set: Vec<String>,
    /// An environment variable for the spawned server only, as `KEY=VALUE` (repeatable), e.g.
    /// `--server-env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`.
    #[arg(long = "server-env", global = true, value_name = "KEY=VALUE")]
    pub server_env: Vec<String>,
    /// Keep the temp dir (config, server log, SQLite database) and print its path.
    #[arg(long, global = true)]
    pub keep: bool,
    /// What to print: `both` (table on stderr, JSON on stdout), `json` or `table`.
    #[arg(long, global = true, default_value = "both", value_parser = ["both", "json", "table"])]
    pub format: String,
}

/// The shape of a message load. Unset options take the mode's defaults (docs/benchmarks.md).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LoadArgs {
    /// Rooms.
    #[arg(long)]
    pub rooms: Option<usize>,
    /// Occupants (connections) per room, senders included.
    #[arg(long)]
    pub occupants: Option<usize>,
    /// Senders per room (the first occupants).
    #[arg(long)]
    pub senders: Option<usize>,
    /// Messages per second per room, split over its senders; 0 = as fast as the window allows.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Most unacknowledged sends per sender.
    #[arg(long)]
    pub window: Option<usize>,
    /// Message body size in bytes (at least 21: the send timestamp leads the body).
    #[arg(long)]
    pub size: Option<usize>,
    /// Measured time (e.g. `10s`, `500ms`, `1m`).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Load before the measured window starts (not counted).
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Connections set up at once.
    #[arg(long)]
    pub connect_concurrency: Option<usize>,
}

/// `latency`: a load at a fixed rate.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Total messages per second over all rooms (overrides `--rate`). Default: `--fraction` of
    /// the saturation rate measured by a probe run of the same shape.
    #[arg(long)]
    pub total_rate: Option<f64>,
    /// Fraction of the probed saturation rate to run at.
    #[arg(long, default_value_t = 0.5)]
    pub fraction: f64,
    /// Measured time of the saturation probe.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub probe_duration: Duration,
}

/// `idle-rooms`: memory per activated idle room.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// Rooms to activate and measure (M).
    #[arg(long, default_value_t = 20_000)]
    pub rooms: usize,
    /// Rooms activated before the baseline RSS reading (warms pools and allocator arenas).
    #[arg(long, default_value_t = 2_000)]
    pub warm_rooms: usize,
    /// Connections doing the join + leave.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Joins in flight per connection.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Wait this long after activating before reading RSS.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub settle: Duration,
}

/// `cold-activation`: joins of never-activated rooms in a big store.
#[derive(clap::Args, Debug, Clone)]
pub struct ColdArgs {
    /// Rooms bulk-inserted into the store before the server starts.
    #[arg(long, default_value_t = 1_000_000)]
    pub store_rooms: usize,
    /// Rooms per bulk-insert transaction.
    #[arg(long, default_value_t = 20_000)]
    pub insert_batch: usize,
    /// Never-activated rooms to join (each once), timed from `join` to `joined`.
    #[arg(long, default_value_t = 2_000)]
    pub samples: usize,
    /// Connections joining at once (1 = pure latency, no queueing).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
}

/// Parse `10s`, `250ms`, `2m`, `1.5s` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "sec" => n,
        "m" | "min" => n * 60.0,
        "us" | "µs" => n / 1e6,
        _ => return Err(format!("unknown unit `{unit}` in `{s}` (use ms, s or m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Run a benchmark: start (or find) the server, load it, print the summary, stop the server.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mode = args.mode.clone().unwrap_or(Mode::Throughput(LoadArgs::default()));
    let target = args.target.clone();
    // Ctrl-C / SIGTERM end the run; dropping the future kills the spawned server.
    let outcome = tokio::select! {
        r = run_mode(mode, &target) => r,
        s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}")),
    };
    let summary = outcome?;
    print_summary(&summary, &target.format)
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn run_mode(mode: Mode, target: &TargetArgs) -> anyhow::Result<Summary> {
    let mut summary = match mode {
        Mode::Throughput(a) => load::throughput(load::Kind::Throughput, &a, target).await,
        Mode::Fanout(a) => load::throughput(load::Kind::Fanout, &a, target).await,
        Mode::Latency(a) => load::latency(&a, target).await,
        Mode::IdleRooms(a) => rooms::idle_rooms(&a, target).await,
        Mode::ColdActivation(a) => rooms::cold_activation(&a, target).await,
        Mode::Connections(a) => connections::connections(&a, target).await,
        Mode::Failover(a) => failover::failover(&a, target).await,
        Mode::Cluster(a) => cluster::cluster(&a, target).await,
        Mode::Xmpp(a) => xmpp::xmpp(&a, target).await,
    }?;
    summary.insert_front("command", std::env::args().collect::<Vec<_>>().join(" "));
    summary.insert_front("date", utc_now());
    summary.push("machine", machine());
    Ok(summary)
}

/// An ordered list of results: the JSON object and the human table show them in this order.
#[derive(Debug, Default)]
pub struct Summary {
    fields: Vec<(String, serde_json::Value)>,
    /// A mode's own table for stderr, shown after the scalar fields (which then stand alone).
    human: Option<String>,
}

impl Summary {
    pub(crate) fn push(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.fields.push((key.to_owned(), value.into()));
    }
    fn insert_front(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.fields.insert(0, (key.to_owned(), value.into()));
    }
    /// Show `table` on stderr instead of the nested fields (arrays and objects).
    pub(crate) fn set_human(&mut self, table: String) {
        self.human = Some(table);
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(self.fields.iter().cloned().collect())
    }
}

fn print_summary(summary: &Summary, format: &str) -> anyhow::Result<()> {
    if format != "json" {
        let width = summary.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut table = String::new();
        for (k, v) in &summary.fields {
            if summary.human.is_some() && (v.is_array() || v.is_object()) && k != "machine" {
                continue;
            }
            let shown = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(f) if n.is_f64() => format_float(f),
                    _ => n.to_string(),
                },
                other => other.to_string(),
            };
            table.push_str(&format!("{k:<width$}  {shown}\n"));
        }
        if let Some(human) = &summary.human {
            table.push_str(human);
        }
        eprint!("{table}");
    }
    if format != "table" {
        println!("{}", serde_json::to_string_pretty(&summary.to_json()).context("serializing the summary")?);
    }
    Ok(())
}

fn format_float(f: f64) -> String {
    if f.abs() >= 1000.0 { format!("{f:.0}") } else if f.abs() >= 1.0 { format!("{f:.2}") } else { format!("{f:.3}") }
}

/// Round to 3 decimals (milliseconds with microsecond resolution), for the JSON summary.
fn round3(f: f64) -> f64 {
    (f * 1000.0).round() / 1000.0
}

/// Number of CPUs and the CPU model, so every figure carries the machine it was measured on.
fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_owned()))
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    serde_json::json!({ "cpus": cpus, "cpu": model, "mem_bytes": mem_kib.map(|k| k * 1024) })
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn utc_dates_look_right() {
        let d = utc_now();
        assert_eq!(d.len(), 20);
        assert!(d.starts_with("20") && d.ends_with('Z'), "{d}");
    }
}
