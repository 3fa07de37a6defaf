//! Message loads: `throughput`, `fanout` and `latency`.
//!
//! Every occupant is one connection and one task. The first occupant of a room creates it;
//! everyone joins with a nick; the first `senders` occupants of each room send. A sender keeps
//! at most `window` sends unacknowledged, and either fills that window (rate 0) or paces itself
//! to its share of the room's rate. Every occupant reads everything the server sends and counts
//! `message` frames (and their end-to-end latency, from the send time in the body) that arrive
//! inside the measured window.

use super::server::{Target, Tuning, Workspace};
use super::stats::{self, Stats};
use super::wire::{self, Endpoint, Incoming};
use super::{LatencyArgs, LoadArgs, Summary, TargetArgs, round3};
use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Which load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Throughput,
    Fanout,
    Latency,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Throughput => "throughput",
            Kind::Fanout => "fanout",
            Kind::Latency => "latency",
        }
    }
}

/// Most connections the generator opens: each side of a connection holds a file descriptor,
/// and this machine caps a process at 20,000.
const MAX_CONNECTIONS: usize = 18_000;

/// A load with every option resolved.
#[derive(Clone, Debug)]
pub struct Shape {
    pub rooms: usize,
    pub occupants: usize,
    pub senders: usize,
    /// Messages per second per room; 0 = window-bound.
    pub rate: f64,
    pub window: usize,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub connect_concurrency: usize,
}

impl Shape {
    /// `args` over the defaults of `kind`.
    pub fn resolve(kind: Kind, args: &LoadArgs) -> anyhow::Result<Shape> {
        let d = match kind {
            Kind::Throughput => Shape {
                rooms: 100,
                occupants: 1,
                senders: 1,
                rate: 0.0,
                window: 32,
                size: 100,
                duration: Duration::from_secs(10),
                warmup: Duration::from_secs(2),
                connect_concurrency: 64,
            },
            Kind::Fanout => Shape {
                rooms: 10,
                occupants: 800,
                senders: 1,
                rate: 0.0,
                window: 8,
                size: 100,
                duration: Duration::from_secs(10),
                warmup: Duration::from_secs(3),
                connect_concurrency: 64,
            },
            Kind::Latency => Shape {
                rooms: 100,
                occupants: 2,
                senders: 1,
                rate: 0.0,
                window: 1000,
                size: 100,
                duration: Duration::from_secs(10),
                warmup: Duration::from_secs(2),
                connect_concurrency: 64,
            },
        };
        let s = Shape {
            rooms: args.rooms.unwrap_or(d.rooms),
            occupants: args.occupants.unwrap_or(d.occupants),
            senders: args.senders.unwrap_or(d.senders),
            rate: args.rate.unwrap_or(d.rate),
            window: args.window.unwrap_or(d.window),
            size: args.size.unwrap_or(d.size),
            duration: args.duration.unwrap_or(d.duration),
            warmup: args.warmup.unwrap_or(d.warmup),
            connect_concurrency: args.connect_concurrency.unwrap_or(d.connect_concurrency).max(1),
        };
        if s.rooms == 0 || s.occupants == 0 || s.senders == 0 || s.window == 0 {
            bail!("--rooms, --occupants, --senders and --window must be at least 1");
        }
        if s.senders > s.occupants {
            bail!("--senders ({}) cannot exceed --occupants ({})", s.senders, s.occupants);
        }
        if s.rooms * s.occupants > MAX_CONNECTIONS {
            bail!(
                "{} rooms × {} occupants = {} connections; keep it under {MAX_CONNECTIONS} (20,000 open files per process here)",
                s.rooms,
                s.occupants,
                s.rooms * s.occupants
            );
        }
        if s.size < 21 {
            bail!("--size must be at least 21 bytes (the body starts with a 20-digit send time)");
        }
        if !(s.rate >= 0.0 && s.rate.is_finite()) {
            bail!("--rate must be 0 (as fast as possible) or a positive number");
        }
        if s.duration.is_zero() {
            bail!("--duration must be positive");
        }
        Ok(s)
    }

    fn connections(&self) -> usize {
        self.rooms * self.occupants
    }
}

/// What one measured run produced.
pub struct Outcome {
    pub stats: Stats,
    pub window_s: f64,
    pub setup_s: f64,
    pub server_rss: Option<u64>,
    pub server_peak_rss: Option<u64>,
    /// Cores used during the window by the server, the generator, and everything else.
    pub cpu: stats::CpuCores,
}

impl Outcome {
    fn committed_per_s(&self) -> f64 {
        self.stats.acks as f64 / self.window_s
    }
}

/// Server settings for message loads: messages must not wait for a passivation check.
fn tuning() -> Tuning {
    Tuning { settings: vec![("rooms.passivate_after_ms", "3600000".into())] }
}

/// `throughput` and `fanout`.
pub async fn throughput(kind: Kind, args: &LoadArgs, target_args: &TargetArgs) -> anyhow::Result<Summary> {
    let shape = Shape::resolve(kind, args)?;
    let workspace = Workspace::new(target_args)?;
    let mut target = workspace.start(target_args, &tuning()).await?;
    let result = run(&mut target, &shape).await;
    target.stop().await;
    let outcome = result?;
    let mut summary = Summary::default();
    summary.push("mode", kind.name());
    summary.push("store", target_store(&workspace, target_args));
    describe(&mut summary, &shape, target_args);
    report(&mut summary, &outcome);
    Ok(summary)
}

/// `latency`: probe the saturation rate (unless `--total-rate`), then run at a fraction of it.
pub async fn latency(args: &LatencyArgs, target_args: &TargetArgs) -> anyhow::Result<Summary> {
    let mut shape = Shape::resolve(Kind::Latency, &args.load)?;
    let workspace = Workspace::new(target_args)?;
    let mut target = workspace.start(target_args, &tuning()).await?;
    let result = async {
        let (total, probed) = match (args.total_rate, args.load.rate) {
            (Some(total), _) => (total, None),
            (None, Some(rate)) if rate > 0.0 => (rate * shape.rooms as f64, None),
            _ => {
                let probe = Shape { rate: 0.0, window: 32, duration: args.probe_duration, ..shape.clone() };
                eprintln!("latency: probing the saturation rate for {:?}", probe.duration);
                let out = run(&mut target, &probe).await.context("saturation probe")?;
                let saturation = out.committed_per_s();
                eprintln!("latency: saturation {saturation:.0} msg/s; running at {:.0}%", args.fraction * 100.0);
                (saturation * args.fraction, Some(saturation))
            }
        };
        if total <= 0.0 {
            bail!("the target rate is 0 msg/s: nothing would be measured");
        }
        shape.rate = total / shape.rooms as f64;
        let out = run(&mut target, &shape).await?;
        Ok((total, probed, out))
    }
    .await;
    target.stop().await;
    let (total, probed, outcome) = result?;
    let mut summary = Summary::default();
    summary.push("mode", "latency");
    summary.push("store", target_store(&workspace, target_args));
    if let Some(s) = probed {
        summary.push("saturation_per_s", round3(s));
    }
    summary.push("target_rate_per_s", round3(total));
    describe(&mut summary, &shape, target_args);
    report(&mut summary, &outcome);
    Ok(summary)
}

fn target_store(workspace: &Workspace, args: &TargetArgs) -> String {
    workspace.store_url.as_deref().or(args.store.as_deref()).map(super::server::store_kind).unwrap_or("unknown").to_owned()
}

fn describe(summary: &mut Summary, shape: &Shape, args: &TargetArgs) {
    summary.push("rooms", shape.rooms);
    summary.push("occupants_per_room", shape.occupants);
    summary.push("senders_per_room", shape.senders);
    summary.push("rate_per_room", round3(shape.rate));
    summary.push("window", shape.window);
    summary.push("size_bytes", shape.size);
    summary.push("duration_s", shape.duration.as_secs_f64());
    summary.push("warmup_s", shape.warmup.as_secs_f64());
    if args.url.is_none() {
        let mut server = serde_json::Map::new();
        server.insert("sqlite_synchronous".into(), args.sqlite_synchronous.clone().into());
        if let Some(v) = args.batch_rows {
            server.insert("max_batch_rows".into(), v.into());
        }
        if let Some(v) = args.batch_delay_us {
            server.insert("max_batch_delay_us".into(), v.into());
        }
        if let Some(v) = args.in_flight {
            server.insert("max_in_flight".into(), v.into());
        }
        if let Some(v) = args.store_connections {
            server.insert("store_connections".into(), v.into());
        }
        for kv in args.server_set.iter().chain(&args.server_env) {
            if let Some((k, v)) = kv.split_once('=') {
                server.insert(k.into(), v.into());
            }
        }
        summary.push("server_config", serde_json::Value::Object(server));
    }
}

fn report(summary: &mut Summary, out: &Outcome) {
    let s = &out.stats;
    summary.push("committed_per_s", round3(out.committed_per_s()));
    summary.push("deliveries_per_s", round3(s.deliveries as f64 / out.window_s));
    summary.push("sent_per_s", round3(s.sent as f64 / out.window_s));
    summary.push("ack_p50_ms", round3(Stats::ms(&s.ack, 0.50)));
    summary.push("ack_p99_ms", round3(Stats::ms(&s.ack, 0.99)));
    summary.push("ack_p999_ms", round3(Stats::ms(&s.ack, 0.999)));
    summary.push("e2e_p50_ms", round3(Stats::ms(&s.e2e, 0.50)));
    summary.push("e2e_p99_ms", round3(Stats::ms(&s.e2e, 0.99)));
    summary.push("e2e_p999_ms", round3(Stats::ms(&s.e2e, 0.999)));
    summary.push("e2e_max_ms", round3(s.e2e.max() as f64 / 1000.0));
    summary.push("server_rss_bytes", out.server_rss.map_or(serde_json::Value::Null, Into::into));
    summary.push("server_peak_rss_bytes", out.server_peak_rss.map_or(serde_json::Value::Null, Into::into));
    summary.push("acks", s.acks);
    summary.push("deliveries", s.deliveries);
    if s.skipped > 0 {
        summary.push("sends_skipped_window_full", s.skipped);
    }
    summary.push("errors", serde_json::to_value(&s.errors).expect("a map of counts serializes"));
    let cpu = out.cpu;
    summary.push("cpu_cores_server", cpu.server.map_or(serde_json::Value::Null, |c| round3(c).into()));
    summary.push("cpu_cores_bench", round3(cpu.bench));
    summary.push("cpu_cores_db", round3(cpu.db));
    summary.push("cpu_cores_other", round3(cpu.other));
    summary.push("setup_s", round3(out.setup_s));
    summary.push("measured_s", round3(out.window_s));
}

/// What every occupant task shares.
struct Ctx {
    /// Occupant `index` of room `room` connects to endpoint `(room + index) % len` (senders and
    /// readers of a room on different endpoints when there are several).
    endpoints: Vec<Endpoint>,
    service: String,
    tag: String,
    shape: Shape,
    /// Body padding after the 20-digit timestamp.
    pad: String,
    /// `Some(start_ns)` once the load starts.
    start: watch::Receiver<Option<u64>>,
    stop: CancellationToken,
}

struct Occupant {
    room: usize,
    index: usize,
}

impl Occupant {
    fn is_sender(&self, shape: &Shape) -> bool {
        self.index < shape.senders
    }
}

/// Set up every connection, run the load for warm-up + duration, and collect.
pub async fn run(target: &mut Target, shape: &Shape) -> anyhow::Result<Outcome> {
    let servers = Servers { endpoints: vec![target.endpoint.clone()], service: None, pids: target.pid.into_iter().collect() };
    let (pid, mut rss) = (target.pid, (None, None));
    let out = run_on(&servers, shape, &mut || target.check_alive(), &mut || rss = super::server::rss_of(pid)).await?;
    Ok(Outcome { server_rss: rss.0, server_peak_rss: rss.1, ..out })
}

/// Where a load runs: the client endpoints its connections are spread over (round robin), the
/// room service (default: the first endpoint's own), and the server processes whose CPU is
/// summed (one server, or every node of a cluster).
pub struct Servers {
    pub endpoints: Vec<Endpoint>,
    pub service: Option<String>,
    pub pids: Vec<u32>,
}

/// [`run`] over `servers`: `alive` fails the run when a server died, `at_window_end` is called
/// once the window closes, before the connections do (e.g. to read RSS).
pub async fn run_on(
    servers: &Servers,
    shape: &Shape,
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
    at_window_end: &mut dyn FnMut(),
) -> anyhow::Result<Outcome> {
    stats::reset();
    let setup_started = Instant::now();
    let tag: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(6).map(|b| (b as char).to_ascii_lowercase()).collect();
    let endpoints = servers.endpoints.clone();
    let service = match &servers.service {
        Some(s) => s.clone(),
        None => {
            let mut probe = wire::connect(endpoints.first().context("a load needs an endpoint")?).await?;
            wire::hello(&mut probe, &format!("b{tag}probe")).await?.service
        }
    };
    let (start_tx, start_rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let ctx = Arc::new(Ctx {
        endpoints,
        service,
        tag,
        shape: shape.clone(),
        pad: "x".repeat(shape.size - 20),
        start: start_rx,
        stop: stop.clone(),
    });
    // Stop every task whatever happens below (they also stop when this guard drops).
    let _stop_guard = stop.clone().drop_guard();
    let mut tasks = JoinSet::new();
    let progress = progress_bar(shape.connections() as u64, "connections");
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(1024);

    // Creators first, so every other join finds its room.
    let slots = Arc::new(Semaphore::new(shape.connect_concurrency));
    let spawn_occupants = |range: &mut dyn Iterator<Item = Occupant>, tasks: &mut JoinSet<()>| {
        let mut n = 0;
        for occ in range {
            let (ctx, ready, slots) = (ctx.clone(), ready_tx.clone(), slots.clone());
            tasks.spawn(async move { occupant(ctx, occ, ready, slots).await });
            n += 1;
        }
        n
    };
    let creators = spawn_occupants(&mut (0..shape.rooms).map(|room| Occupant { room, index: 0 }), &mut tasks);
    wait_ready(creators, &mut ready_rx, alive, &progress).await?;
    let others = spawn_occupants(
        &mut (1..shape.occupants).flat_map(|index| (0..shape.rooms).map(move |room| Occupant { room, index })),
        &mut tasks,
    );
    wait_ready(others, &mut ready_rx, alive, &progress).await?;
    progress.finish_and_clear();
    let setup_s = setup_started.elapsed().as_secs_f64();

    // Let the join presence storm drain before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = stats::now_ns() + 10_000_000;
    let window_start = start + shape.warmup.as_nanos() as u64;
    let window_end = window_start + shape.duration.as_nanos() as u64;
    stats::set_window(window_start, window_end);
    start_tx.send(Some(start)).ok();
    let total = shape.warmup + shape.duration + Duration::from_millis(10);
    let bar = progress_bar(total.as_millis() as u64, "ms");
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bar.set_position(t0.elapsed().as_millis() as u64);
            }
        })
    };
    let cpu = stats::measure_window(&servers.pids, shape.warmup, shape.duration, &mut *alive).await?;
    ticker.abort();
    bar.finish_and_clear();
    at_window_end();
    stop.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
        tasks.abort_all();
    }
    Ok(Outcome { stats: stats::collect(), window_s: shape.duration.as_secs_f64(), setup_s, server_rss: None, server_peak_rss: None, cpu })
}

/// Wait until `n` occupants are set up; the first failure (or a dead server) ends the run.
async fn wait_ready(
    n: usize,
    rx: &mut mpsc::Receiver<anyhow::Result<()>>,
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(300), rx.recv()).await {
            Ok(Some(Ok(()))) => progress.inc(1),
            Ok(Some(Err(e))) => {
                alive()?;
                return Err(e);
            }
            Ok(None) => bail!("occupant tasks ended during set-up"),
            Err(_) => {
                alive()?;
                bail!("set-up stalled: no connection got ready for 300 s")
            }
        }
    }
    Ok(())
}

pub(super) fn progress_bar(len: u64, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!("{{elapsed:>4}} [{{bar:40}}] {{pos}}/{{len}} {unit}"))
        .expect("valid progress template")
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// One occupant: connect, log in, (create,) join, report ready, then read (and send) until stop.
async fn occupant(ctx: Arc<Ctx>, occ: Occupant, ready: mpsc::Sender<anyhow::Result<()>>, slots: Arc<Semaphore>) {
    let permit = slots.acquire_owned().await.expect("semaphore never closed");
    let room = format!("b{}-{}@{}", ctx.tag, occ.room, ctx.service);
    let setup = async {
        let endpoint = &ctx.endpoints[(occ.room + occ.index) % ctx.endpoints.len()];
        let mut ws = wire::connect(endpoint).await?;
        let user = format!("b{}r{}o{}", ctx.tag, occ.room, occ.index);
        wire::hello(&mut ws, &user).await?;
        if occ.index == 0 {
            let create = format!(r#"{{"op":"create","id":"c","room":"{room}"}}"#);
            match wire::request(&mut ws, create, "c").await {
                Ok(_) => {}
                Err(e) if e.to_string().starts_with("conflict") => {}
                Err(e) => return Err(e).with_context(|| format!("creating {room}")),
            }
        }
        let join = format!(r#"{{"op":"join","id":"j","room":"{room}","nick":"n{}"}}"#, occ.index);
        wire::request(&mut ws, join, "j").await.with_context(|| format!("joining {room}"))?;
        anyhow::Ok(ws)
    };
    let mut ws = match tokio::select! { r = setup => r, _ = ctx.stop.cancelled() => return } {
        Ok(ws) => ws,
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
    let sender = occ.is_sender(&ctx.shape);
    let result = if sender { send_loop(&ctx, &mut ws, &room).await } else { read_loop(&ctx, &mut ws).await };
    if result.is_err() && !ctx.stop.is_cancelled() {
        stats::error("disconnected");
    }
}

/// Read and count until stop.
async fn read_loop(ctx: &Ctx, ws: &mut wire::Ws) -> anyhow::Result<()> {
    loop {
        let msg = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => return Ok(()),
            m = ws.next() => m,
        };
        on_frame(msg, &mut 0)?;
    }
}

/// Handle one frame; frees a window slot for every answer to a send.
pub(super) fn on_frame(msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>, in_flight: &mut usize) -> anyhow::Result<()> {
    let text = match msg {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(Message::Close(_))) | None => bail!("closed by the server"),
        Some(Ok(_)) => return Ok(()),
        Some(Err(e)) => return Err(e.into()),
    };
    let now = stats::now_ns();
    match wire::classify(text.as_str()) {
        Incoming::Message { sent_ns } => stats::delivery(now, sent_ns),
        Incoming::Ack { sent_ns, duplicate } => {
            *in_flight = in_flight.saturating_sub(1);
            if let Some(sent) = sent_ns {
                stats::ack(now, sent, duplicate);
            }
        }
        Incoming::Error { re, code } => {
            if re.is_some() {
                *in_flight = in_flight.saturating_sub(1);
            }
            stats::error(&code);
        }
        Incoming::Other => {}
    }
    Ok(())
}

/// Send (window-bound or paced) and read until stop; stop sending at the window's end.
async fn send_loop(ctx: &Ctx, ws: &mut wire::Ws, room: &str) -> anyhow::Result<()> {
    let shape = &ctx.shape;
    let per_sender = shape.rate / shape.senders as f64;
    let interval_ns = if per_sender > 0.0 { (1e9 / per_sender) as u64 } else { 0 };
    let mut start = ctx.start.clone();
    let mut started: Option<u64> = *start.borrow();
    let mut next_due: u64 = 0;
    let mut in_flight = 0usize;
    let mut cid = 0u64;
    loop {
        let mut deadline = None;
        if let Some(begin) = started {
            let now = stats::now_ns();
            if now < stats::window_end() && now >= begin {
                let mut fed = 0u64;
                if interval_ns == 0 {
                    while in_flight < shape.window {
                        cid += 1;
                        ws.feed(Message::text(wire::send_frame(room, now, cid, &ctx.pad))).await?;
                        in_flight += 1;
                        fed += 1;
                    }
                } else {
                    while next_due <= now && in_flight < shape.window {
                        cid += 1;
                        ws.feed(Message::text(wire::send_frame(room, now, cid, &ctx.pad))).await?;
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
                    ws.flush().await?;
                    stats::sent(now, fed);
                }
            } else if now < begin {
                deadline = Some(begin);
            }
        }
        let sleep = async {
            match deadline {
                Some(at) => {
                    let wait = Duration::from_nanos(at.saturating_sub(stats::now_ns()));
                    tokio::time::sleep(wait).await
                }
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
            msg = ws.next() => on_frame(msg, &mut in_flight)?,
            _ = sleep => {}
        }
    }
}
