//! `connections`: the server's memory per WebSocket connection, idle and under a slow message
//! load (the issue's 19,000 concurrent connections at ≤ 16 KiB each).
//!
//! The bench creates `--rooms` rooms (one setup connection, closed again) and reads the
//! server's RSS with no client connected. Then `--connections` connections each log in as a
//! guest and join one room (connection `i` joins room `i mod rooms`, so 19,000 over 1,000 rooms
//! is 19 occupants a room, a small group chat), and after `--settle` the RSS is read again:
//! `bytes_per_connection_idle = (idle − before) / connections`. Then every connection sends
//! `--per-minute` messages a minute for `--duration`, the sends spread evenly over the minute
//! (connection `i` starts at `i / connections` of the interval), so 19,000 connections at one a
//! minute are 317 messages and about 6,000 deliveries a second. The RSS is sampled every 500 ms
//! meanwhile: `bytes_per_connection_active = (highest sample − before) / connections`.
//!
//! The rooms themselves are loaded before the baseline (their memory is `idle-rooms`'s figure,
//! not this one's); what a login writes to the store (a session row, and whatever the store's
//! client caches grow by) counts, which makes the figures upper bounds.
//!
//! Each connection is one small task (1 KiB read buffer on the bench's side); both processes
//! need an open file per connection, so the bench checks `ulimit -n` first (raising the soft
//! limit to the hard one when that is enough; the spawned server inherits it).

use super::load::{on_frame, progress_bar};
use super::server::{Target, Tuning, Workspace};
use super::stats::{self, CpuSnapshot, Stats};
use super::wire::{self, Endpoint};
use super::{Summary, TargetArgs, parse_duration, round3};
use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// `connections` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionsArgs {
    /// Connections to open and hold; each logs in as a guest and joins one room.
    #[arg(long, default_value_t = 19_000)]
    pub connections: usize,
    /// Rooms the connections are dealt over (connection i joins room i mod R).
    #[arg(long, default_value_t = 1_000)]
    pub rooms: usize,
    /// Messages each connection sends per minute in the active phase, spread evenly over the
    /// minute; 0 = no active phase (idle figures only).
    #[arg(long, default_value_t = 1.0)]
    pub per_minute: f64,
    /// Length of the active phase.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// Wait before each idle RSS reading (after start-up, and after the last connection joined).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub settle: Duration,
    /// Message body size in bytes (at least 21: the send time leads the body).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Connections set up at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
}

/// Open files a process needs besides its client connections (listeners, the store's files and
/// pool, epoll, pipes, the log).
const FD_SLACK: u64 = 256;

/// How often the RSS is sampled during the active phase.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// Read buffer of a bench connection: frames here are small (a `joined` of a 19-occupant room
/// is about 2 KiB and grows the buffer for that one read), and 19,000 connections of the
/// default 4 KiB would double the bench's memory.
const BENCH_READ_BUFFER: usize = 1024;

/// Server settings: room joins must not wait for activation, and nothing may time out while
/// connections idle.
fn tuning(args: &ConnectionsArgs) -> Tuning {
    let connections = (args.connections + 64).to_string();
    Tuning {
        settings: vec![
            ("rooms.passivate_after_ms", "86400000".into()),
            ("limits.max_connections", connections.clone()),
            ("limits.max_pending_handshakes", connections),
            ("limits.idle_timeout_ms", "3600000".into()),
            ("limits.hello_timeout_ms", "600000".into()),
        ],
    }
}

/// Make sure `connections` sockets fit in this process's open-file limit (raising the soft
/// limit up to the hard one if needed, which a spawned server inherits) and in the running
/// server's; returns the limit in force here.
fn ensure_open_files(connections: usize, server_pid: Option<u32>, spawned: bool) -> anyhow::Result<u64> {
    let need = connections as u64 + FD_SLACK;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("reading the open-file limit: {}", std::io::Error::last_os_error());
    }
    if limit.rlim_cur < need && limit.rlim_max >= need {
        let raised = libc::rlimit { rlim_cur: need, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = need;
        }
    }
    let who = if spawned { "the bench and the server it spawns (which inherits the limit)" } else { "the bench" };
    if limit.rlim_cur < need {
        bail!(
            "{connections} connections need {need} open files in {who} ({FD_SLACK} beside the sockets), but `ulimit -n` is {} (hard limit {}): use --connections {} or fewer, or raise the limit",
            limit.rlim_cur,
            limit.rlim_max,
            limit.rlim_cur.saturating_sub(FD_SLACK)
        );
    }
    if !spawned {
        match server_pid.and_then(server_open_files) {
            Some(server) if server < need => bail!(
                "{connections} connections need {need} open files in the server, but its limit (/proc/PID/limits) is {server}: use --connections {} or fewer",
                server.saturating_sub(FD_SLACK)
            ),
            Some(_) => {}
            None => eprintln!("connections: cannot read the server's open-file limit; it needs {need}"),
        }
    }
    Ok(limit.rlim_cur)
}

/// The soft `Max open files` of process `pid`.
fn server_open_files(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// This process's RSS in bytes.
fn own_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What every connection task shares.
struct Ctx {
    endpoint: Endpoint,
    /// Room addresses, by index.
    rooms: Vec<String>,
    tag: String,
    connections: usize,
    /// Between two sends of one connection; zero when nobody sends.
    interval_ns: u64,
    /// Body padding after the 20-digit send time.
    pad: String,
    /// `Some(start_ns)` once the active phase starts.
    start: watch::Receiver<Option<u64>>,
    stop: CancellationToken,
}

/// The RSS figures of one run.
struct Readings {
    before: u64,
    idle: u64,
    /// Samples of the active phase.
    active: Vec<u64>,
    setup_s: f64,
    idle_cpu: stats::CpuCores,
    active_cpu: Option<stats::CpuCores>,
    bench_rss: Option<u64>,
}

/// `connections`: open, idle, then a message per connection per minute.
pub async fn connections(args: &ConnectionsArgs, target_args: &TargetArgs) -> anyhow::Result<Summary> {
    if args.connections == 0 || args.rooms == 0 || args.connect_concurrency == 0 {
        bail!("--connections, --rooms and --connect-concurrency must be at least 1");
    }
    if args.rooms > args.connections {
        bail!("--rooms ({}) cannot exceed --connections ({}): every room needs an occupant", args.rooms, args.connections);
    }
    if !(args.per_minute >= 0.0 && args.per_minute.is_finite()) {
        bail!("--per-minute must be 0 (idle only) or a positive number");
    }
    if args.size < 21 {
        bail!("--size must be at least 21 bytes (the body starts with a 20-digit send time)");
    }
    let open_files = ensure_open_files(args.connections, target_args.server_pid, target_args.url.is_none())?;
    let workspace = Workspace::new(target_args)?;
    let mut target = workspace.start(target_args, &tuning(args)).await?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let result = measure(args, &mut target, &stop, &mut tasks).await;
    // Connections end first (nothing counts as a disconnect after `stop`), the server is killed
    // before it works through 19,000 departures.
    stop.cancel();
    let peak = target.peak_rss_bytes();
    target.stop().await;
    if tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await.is_err() {
        tasks.abort_all();
    }
    let r = result?;
    let s = stats::collect();
    let n = args.connections as f64;
    let mut sorted = r.active.clone();
    sorted.sort_unstable();
    let active_peak = sorted.last().copied();
    let active_median = sorted.get(sorted.len().saturating_sub(1) / 2).copied().filter(|_| !sorted.is_empty());
    let per_conn = |rss: u64| round3((rss as f64 - r.before as f64) / n);
    let measured_s = args.duration.as_secs_f64();
    let mut summary = Summary::default();
    summary.push("mode", "connections");
    summary.push("store", super::server::store_kind(workspace.store_url.as_deref().or(target_args.store.as_deref()).unwrap_or("")));
    summary.push("connections", args.connections);
    summary.push("rooms", args.rooms);
    summary.push("per_minute", round3(args.per_minute));
    summary.push("duration_s", measured_s);
    summary.push("settle_s", args.settle.as_secs_f64());
    summary.push("size_bytes", args.size);
    summary.push("bytes_per_connection_idle", per_conn(r.idle));
    summary.push("bytes_per_connection_active", active_peak.map_or(serde_json::Value::Null, |p| per_conn(p).into()));
    summary.push("bytes_per_connection_active_median", active_median.map_or(serde_json::Value::Null, |m| per_conn(m).into()));
    summary.push("server_rss_before_bytes", r.before);
    summary.push("server_rss_idle_bytes", r.idle);
    summary.push("server_rss_active_peak_bytes", active_peak.map_or(serde_json::Value::Null, Into::into));
    summary.push("server_rss_active_median_bytes", active_median.map_or(serde_json::Value::Null, Into::into));
    summary.push("server_peak_rss_bytes", peak.map_or(serde_json::Value::Null, Into::into));
    summary.push("connect_per_s", round3(n / r.setup_s));
    summary.push("setup_s", round3(r.setup_s));
    summary.push("sent", s.sent);
    summary.push("acks", s.acks);
    summary.push("sent_per_s", round3(s.sent as f64 / measured_s));
    summary.push("deliveries_per_s", round3(s.deliveries as f64 / measured_s));
    summary.push("ack_p50_ms", round3(Stats::ms(&s.ack, 0.50)));
    summary.push("ack_p99_ms", round3(Stats::ms(&s.ack, 0.99)));
    summary.push("e2e_p50_ms", round3(Stats::ms(&s.e2e, 0.50)));
    summary.push("e2e_p99_ms", round3(Stats::ms(&s.e2e, 0.99)));
    summary.push("errors", serde_json::to_value(&s.errors).expect("a map of counts serializes"));
    summary.push("cpu_cores_server_idle", r.idle_cpu.server.map_or(serde_json::Value::Null, |c| round3(c).into()));
    let active = r.active_cpu.unwrap_or_default();
    summary.push("cpu_cores_server", active.server.map_or(serde_json::Value::Null, |c| round3(c).into()));
    summary.push("cpu_cores_bench", round3(active.bench));
    summary.push("cpu_cores_other", round3(active.other));
    summary.push("bench_rss_bytes", r.bench_rss.map_or(serde_json::Value::Null, Into::into));
    summary.push("open_files_limit", open_files);
    Ok(summary)
}

/// Create the rooms, read the baseline, connect everyone, read the idle RSS, run the active
/// phase sampling the RSS.
async fn measure(args: &ConnectionsArgs, target: &mut Target, stop: &CancellationToken, tasks: &mut JoinSet<()>) -> anyhow::Result<Readings> {
    if target.pid.is_none() {
        bail!("connections reads the server's RSS: with --url, give --server-pid");
    }
    stats::reset();
    let tag: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(6).map(|b| (b as char).to_ascii_lowercase()).collect();
    let mut setup = wire::connect(&target.endpoint).await?;
    let welcome = wire::hello(&mut setup, &format!("b{tag}setup")).await?;
    let rooms: Vec<String> = (0..args.rooms).map(|r| format!("b{tag}-{r}@{}", welcome.service)).collect();
    create_rooms(&mut setup, &rooms).await?;
    setup.close(None).await.ok();
    drop(setup);
    tokio::time::sleep(args.settle).await;
    target.check_alive()?;
    let before = target.rss_bytes().context("reading the server's RSS")?;

    let interval_ns = if args.per_minute > 0.0 { (60e9 / args.per_minute) as u64 } else { 0 };
    let (start_tx, start_rx) = watch::channel(None);
    let ctx = Arc::new(Ctx {
        endpoint: target.endpoint.clone(),
        rooms,
        tag,
        connections: args.connections,
        interval_ns,
        pad: "x".repeat(args.size - 20),
        start: start_rx,
        stop: stop.clone(),
    });
    let setup_started = Instant::now();
    let progress = progress_bar(args.connections as u64, "connections");
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(1024);
    let slots = Arc::new(Semaphore::new(args.connect_concurrency));
    for i in 0..args.connections {
        let (ctx, ready, slots) = (ctx.clone(), ready_tx.clone(), slots.clone());
        tasks.spawn(async move { connection(ctx, i, ready, slots).await });
    }
    drop(ready_tx);
    for _ in 0..args.connections {
        match tokio::time::timeout(Duration::from_secs(300), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => progress.inc(1),
            Ok(Some(Err(e))) => {
                target.check_alive()?;
                return Err(e);
            }
            Ok(None) => bail!("connection tasks ended during set-up"),
            Err(_) => {
                target.check_alive()?;
                bail!("set-up stalled: no connection got ready for 300 s")
            }
        }
    }
    progress.finish_and_clear();
    let setup_s = setup_started.elapsed().as_secs_f64();

    let cpu_before = CpuSnapshot::take(target.pid.as_slice());
    tokio::time::sleep(args.settle).await;
    target.check_alive()?;
    let idle = target.rss_bytes().context("reading the server's RSS")?;
    let idle_cpu = cpu_before.cores_until(&CpuSnapshot::take(target.pid.as_slice()), args.settle.as_secs_f64());

    let mut active = Vec::new();
    let mut active_cpu = None;
    if interval_ns > 0 && !args.duration.is_zero() {
        let start = stats::now_ns() + 10_000_000;
        stats::set_window(start, start + args.duration.as_nanos() as u64);
        start_tx.send(Some(start)).ok();
        let mut last_sample = Instant::now();
        let cpu = stats::measure_window(&target.pid.into_iter().collect::<Vec<_>>(), Duration::ZERO, args.duration, || {
            target.check_alive()?;
            if last_sample.elapsed() >= RSS_SAMPLE_INTERVAL - Duration::from_millis(50) {
                last_sample = Instant::now();
                active.extend(target.rss_bytes());
            }
            Ok(())
        })
        .await?;
        active.extend(target.rss_bytes());
        active_cpu = Some(cpu);
    }
    Ok(Readings { before, idle, active, setup_s, idle_cpu, active_cpu, bench_rss: own_rss_bytes() })
}

/// Create every room from one connection, 64 requests in flight.
async fn create_rooms(ws: &mut wire::Ws, rooms: &[String]) -> anyhow::Result<()> {
    for (c, chunk) in rooms.chunks(64).enumerate() {
        for (i, room) in chunk.iter().enumerate() {
            ws.feed(Message::text(format!(r#"{{"op":"create","id":"c{c}-{i}","room":"{room}"}}"#))).await?;
        }
        ws.flush().await?;
        for (i, room) in chunk.iter().enumerate() {
            wire::answer(ws, &format!("c{c}-{i}")).await.with_context(|| format!("creating {room}"))?;
        }
    }
    Ok(())
}

/// One connection: connect, log in, join, report ready, then read everything and send on its
/// schedule until stop.
async fn connection(ctx: Arc<Ctx>, i: usize, ready: mpsc::Sender<anyhow::Result<()>>, slots: Arc<Semaphore>) {
    let permit = slots.acquire_owned().await.expect("semaphore never closed");
    let room = &ctx.rooms[i % ctx.rooms.len()];
    let setup = async {
        let mut ws = wire::connect_with_read_buffer(&ctx.endpoint, BENCH_READ_BUFFER).await?;
        wire::hello(&mut ws, &format!("b{}c{i}", ctx.tag)).await?;
        let join = format!(r#"{{"op":"join","id":"j","room":"{room}","nick":"n{i}"}}"#);
        wire::request(&mut ws, join, "j").await.with_context(|| format!("joining {room}"))?;
        anyhow::Ok(ws)
    };
    let mut ws = match tokio::select! { r = setup => r, _ = ctx.stop.cancelled() => return } {
        Ok(ws) => ws,
        Err(e) => {
            let _ = ready.send(Err(e.context(format!("connection {i}")))).await;
            return;
        }
    };
    drop(permit);
    if ready.send(Ok(())).await.is_err() {
        return;
    }
    drop(ready);
    if run(&ctx, i, &mut ws, room).await.is_err() && !ctx.stop.is_cancelled() {
        stats::error("disconnected");
    }
}

/// Read until stop; once the active phase starts, send every `interval_ns` until its end, the
/// first send at `i / connections` of an interval after the start.
async fn run(ctx: &Ctx, i: usize, ws: &mut wire::Ws, room: &str) -> anyhow::Result<()> {
    let mut start = ctx.start.clone();
    // Listening for the start until it comes (or cannot come any more).
    let mut waiting = ctx.interval_ns > 0;
    let mut next_due: Option<u64> = None;
    let mut cid = 0u64;
    let mut in_flight = 0usize;
    loop {
        let sleep = async {
            match next_due {
                Some(at) => tokio::time::sleep(Duration::from_nanos(at.saturating_sub(stats::now_ns()))).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => return Ok(()),
            changed = start.changed(), if waiting => {
                if changed.is_err() {
                    waiting = false;
                } else if let Some(begin) = *start.borrow() {
                    waiting = false;
                    next_due = Some(begin + (ctx.interval_ns as u128 * i as u128 / ctx.connections as u128) as u64);
                }
            }
            msg = ws.next() => on_frame(msg, &mut in_flight)?,
            _ = sleep => {
                let now = stats::now_ns();
                if now >= stats::window_end() {
                    next_due = None;
                    continue;
                }
                cid += 1;
                ws.send(Message::text(wire::send_frame(room, now, cid, &ctx.pad))).await?;
                stats::sent(now, 1);
                next_due = next_due.map(|d| d + ctx.interval_ns);
            }
        }
    }
}
