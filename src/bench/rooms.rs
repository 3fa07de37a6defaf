//! Room-count benchmarks: `idle-rooms` (server memory per activated idle room) and
//! `cold-activation` (join latency of never-activated rooms with a big store).
//!
//! Both fill the store with [`Store::bulk_create_rooms`] before (or, with `--url`, while) the
//! server runs, then activate rooms through the protocol: `join` loads a room from the store
//! and starts its actor, `leave` leaves it empty but active until it passivates.

use super::server::{NODE_ID, SERVICE, Tuning, Workspace};
use super::wire::{self, Endpoint, Head};
use super::{ColdArgs, IdleArgs, Summary, TargetArgs, round3};
use crate::ids::{NodeId, RoomAddr};
use crate::protocol::RoomConfig;
use crate::store::Store;
use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use rand::seq::SliceRandom;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Owner of the bulk-created rooms (a user nobody logs in as).
const BULK_OWNER: &str = "bench-owner";

/// Server settings for room benchmarks: rooms must stay loaded while they are measured.
fn tuning() -> Tuning {
    Tuning { settings: vec![("rooms.passivate_after_ms", "86400000".into())] }
}

pub(super) fn run_tag() -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(6).map(|b| (b as char).to_ascii_lowercase()).collect()
}

/// Node id and service the rooms must carry: the spawned server's, or asked of the running one.
async fn home_of(target_args: &TargetArgs) -> anyhow::Result<(String, String)> {
    match &target_args.url {
        None => Ok((NODE_ID.to_owned(), SERVICE.to_owned())),
        Some(url) => {
            let mut ws = wire::connect(&Endpoint::parse(url)?).await?;
            let w = wire::hello(&mut ws, &format!("b{}probe", run_tag())).await?;
            Ok((w.node, w.service))
        }
    }
}

/// Bulk-insert `count` rooms `{prefix}{i}@{service}` in transactions of `batch`.
pub(super) async fn fill_store(
    workspace: &Workspace,
    prefix: &str,
    count: usize,
    batch: usize,
    node: &str,
    service: &str,
) -> anyhow::Result<f64> {
    let url = workspace
        .store_url
        .as_deref()
        .context("this mode bulk-inserts rooms: give --store with the running server's store URL")?;
    fill_store_at(url, prefix, count, batch, node, service).await
}

/// [`fill_store`] into the store at `url`.
pub(super) async fn fill_store_at(url: &str, prefix: &str, count: usize, batch: usize, node: &str, service: &str) -> anyhow::Result<f64> {
    let store = Store::connect(url, 2, "normal").await.with_context(|| format!("connecting to {}", crate::node::redact(url)))?;
    store.migrate().await.context("running migrations")?;
    let config = RoomConfig::default();
    let home = NodeId(node.to_owned());
    let bar = indicatif::ProgressBar::new(count as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:40}] {pos}/{len} rooms inserted ({per_sec})")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut next = 0;
    while next < count {
        let end = (next + batch.max(1)).min(count);
        let addrs: Vec<RoomAddr> = (next..end).map(|i| RoomAddr(format!("{prefix}{i}@{service}"))).collect();
        store.bulk_create_rooms(&addrs, &config, BULK_OWNER, &home).await.context("bulk-inserting rooms")?;
        bar.inc((end - next) as u64);
        next = end;
    }
    bar.finish_and_clear();
    let rate = count as f64 / started.elapsed().as_secs_f64();
    store.close().await;
    Ok(rate)
}

/// `idle-rooms`: RSS growth per activated (joined, then left) room.
pub async fn idle_rooms(args: &IdleArgs, target_args: &TargetArgs) -> anyhow::Result<Summary> {
    if args.rooms == 0 || args.connections == 0 || args.window == 0 {
        bail!("--rooms, --connections and --window must be at least 1");
    }
    let workspace = Workspace::new(target_args)?;
    let (node, service) = home_of(target_args).await?;
    let tag = run_tag();
    let prefix = format!("i{tag}-");
    let total = args.warm_rooms + args.rooms;
    let insert_rate = fill_store(&workspace, &prefix, total, 20_000, &node, &service).await?;
    let mut target = workspace.start(target_args, &tuning()).await?;
    let result = async {
        if target.pid.is_none() {
            bail!("idle-rooms reads the server's RSS: with --url, give --server-pid");
        }
        let mut conns = Vec::with_capacity(args.connections);
        for i in 0..args.connections {
            let mut ws = wire::connect(&target.endpoint).await?;
            wire::hello(&mut ws, &format!("b{tag}idle{i}")).await?;
            conns.push(ws);
        }
        let room = |i: usize| format!("{prefix}{i}@{service}");
        let warm: Vec<String> = (0..args.warm_rooms).map(room).collect();
        activate_all(&mut conns, &warm, args.window).await.context("activating the warm-up rooms")?;
        tokio::time::sleep(args.settle).await;
        let before = target.rss_bytes().context("reading the server's RSS")?;
        let measured: Vec<String> = (args.warm_rooms..total).map(room).collect();
        let started = Instant::now();
        activate_all(&mut conns, &measured, args.window).await.context("activating rooms")?;
        let activation_s = started.elapsed().as_secs_f64();
        tokio::time::sleep(args.settle).await;
        target.check_alive()?;
        let after = target.rss_bytes().context("reading the server's RSS")?;
        Ok((before, after, activation_s))
    }
    .await;
    let peak = target.peak_rss_bytes();
    target.stop().await;
    let (before, after, activation_s) = result?;
    let per_room = (after as f64 - before as f64) / args.rooms as f64;
    let mut summary = Summary::default();
    summary.push("mode", "idle-rooms");
    summary.push("store", super::server::store_kind(workspace.store_url.as_deref().unwrap_or("")));
    summary.push("rooms", args.rooms);
    summary.push("warm_rooms", args.warm_rooms);
    summary.push("bytes_per_idle_room", round3(per_room));
    summary.push("server_rss_before_bytes", before);
    summary.push("server_rss_after_bytes", after);
    summary.push("server_rss_bytes", after);
    summary.push("server_peak_rss_bytes", peak.map_or(serde_json::Value::Null, Into::into));
    summary.push("activations_per_s", round3(args.rooms as f64 / activation_s));
    summary.push("bulk_insert_rooms_per_s", round3(insert_rate));
    Ok(summary)
}

/// Join and leave every room, `window` joins in flight per connection, rooms dealt round-robin.
async fn activate_all(conns: &mut [wire::Ws], rooms: &[String], window: usize) -> anyhow::Result<()> {
    let n = conns.len();
    let bar = indicatif::ProgressBar::new(rooms.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:40}] {pos}/{len} rooms activated ({per_sec})")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    let jobs = conns.iter_mut().enumerate().map(|(c, ws)| {
        let mine: Vec<&String> = rooms.iter().skip(c).step_by(n).collect();
        let bar = bar.clone();
        async move { activate(ws, &mine, window, &bar).await }
    });
    let results = futures_util::future::join_all(jobs).await;
    bar.finish_and_clear();
    results.into_iter().collect()
}

/// One connection's share: pipelined join → (joined) → leave → (left).
async fn activate(ws: &mut wire::Ws, rooms: &[&String], window: usize, bar: &indicatif::ProgressBar) -> anyhow::Result<()> {
    let mut next = 0;
    let mut outstanding = 0;
    let mut done = 0;
    while done < rooms.len() {
        let mut fed = false;
        while outstanding < window && next < rooms.len() {
            let frame = format!(r#"{{"op":"join","id":"j{next}","room":"{}","nick":"n"}}"#, rooms[next]);
            ws.feed(Message::text(frame)).await?;
            next += 1;
            outstanding += 1;
            fed = true;
        }
        if fed {
            ws.flush().await?;
        }
        let text = match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Err(_) => bail!("no answer from the server for 60 s"),
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(c)))) => bail!("server closed the connection: {c:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => bail!("server closed the connection"),
        };
        let Some(head) = Head::parse(text.as_str()) else { continue };
        let Some(re) = head.re.as_deref() else { continue };
        match (head.op.as_ref(), re.split_at(1)) {
            ("joined", ("j", i)) => {
                let i: usize = i.parse().context("bad join id")?;
                ws.send(Message::text(format!(r#"{{"op":"leave","id":"l{i}","room":"{}"}}"#, rooms[i]))).await?;
            }
            ("left", ("l", _)) => {
                outstanding -= 1;
                done += 1;
                bar.inc(1);
            }
            ("error", _) => bail!("the server refused {re}: {}", text.as_str()),
            _ => {}
        }
    }
    Ok(())
}

/// `cold-activation`: fill the store, then time joins of rooms no one has touched.
pub async fn cold_activation(args: &ColdArgs, target_args: &TargetArgs) -> anyhow::Result<Summary> {
    if args.store_rooms == 0 || args.samples == 0 || args.concurrency == 0 {
        bail!("--store-rooms, --samples and --concurrency must be at least 1");
    }
    let samples = args.samples.min(args.store_rooms);
    let workspace = Workspace::new(target_args)?;
    let (node, service) = home_of(target_args).await?;
    let tag = run_tag();
    let prefix = format!("c{tag}-");
    let insert_started = Instant::now();
    let insert_rate = fill_store(&workspace, &prefix, args.store_rooms, args.insert_batch, &node, &service).await?;
    let insert_s = insert_started.elapsed().as_secs_f64();
    let mut target = workspace.start(target_args, &tuning()).await?;
    let result = async {
        let mut picks: Vec<usize> = (0..args.store_rooms).collect();
        picks.shuffle(&mut rand::rng());
        picks.truncate(samples);
        let rooms: Vec<String> = picks.iter().map(|i| format!("{prefix}{i}@{service}")).collect();
        let mut conns = Vec::with_capacity(args.concurrency);
        for i in 0..args.concurrency {
            let mut ws = wire::connect(&target.endpoint).await?;
            wire::hello(&mut ws, &format!("b{tag}cold{i}")).await?;
            conns.push(ws);
        }
        let n = conns.len();
        let share = |c: usize, limit: usize| -> Vec<&String> { rooms.iter().skip(c).step_by(n).take(limit).collect() };
        let cold = futures_util::future::join_all(
            conns.iter_mut().enumerate().map(|(c, ws)| {
                let mine = share(c, usize::MAX);
                async move { timed_joins(ws, &mine).await }
            }),
        )
        .await;
        let mut cold_h = new_histogram();
        for h in cold {
            cold_h.add(h?).expect("same bounds");
        }
        // The first rooms again, now active: what a join costs without the activation.
        let warm = futures_util::future::join_all(
            conns.iter_mut().enumerate().map(|(c, ws)| {
                let mine = share(c, 100);
                async move { timed_joins(ws, &mine).await }
            }),
        )
        .await;
        let mut warm_h = new_histogram();
        for h in warm {
            warm_h.add(h?).expect("same bounds");
        }
        target.check_alive()?;
        anyhow::Ok((cold_h, warm_h))
    }
    .await;
    let rss = target.rss_bytes();
    target.stop().await;
    let (cold, warm) = result?;
    let ms = |h: &Histogram<u64>, q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
    let mut summary = Summary::default();
    summary.push("mode", "cold-activation");
    summary.push("store", super::server::store_kind(workspace.store_url.as_deref().unwrap_or("")));
    summary.push("store_rooms", args.store_rooms);
    summary.push("samples", samples);
    summary.push("concurrency", args.concurrency);
    summary.push("cold_join_p50_ms", ms(&cold, 0.50));
    summary.push("cold_join_p90_ms", ms(&cold, 0.90));
    summary.push("cold_join_p99_ms", ms(&cold, 0.99));
    summary.push("cold_join_p999_ms", ms(&cold, 0.999));
    summary.push("cold_join_max_ms", round3(cold.max() as f64 / 1000.0));
    summary.push("warm_join_p50_ms", ms(&warm, 0.50));
    summary.push("warm_join_p99_ms", ms(&warm, 0.99));
    summary.push("server_rss_bytes", rss.map_or(serde_json::Value::Null, Into::into));
    summary.push("bulk_insert_rooms_per_s", round3(insert_rate));
    summary.push("bulk_insert_s", round3(insert_s));
    Ok(summary)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

/// Join each room (timed until `joined`), then leave it (not timed). Microseconds.
async fn timed_joins(ws: &mut wire::Ws, rooms: &[&String]) -> anyhow::Result<Histogram<u64>> {
    let mut h = new_histogram();
    for (i, room) in rooms.iter().enumerate() {
        let t0 = Instant::now();
        let join = format!(r#"{{"op":"join","id":"j{i}","room":"{room}","nick":"n"}}"#);
        wire::request(ws, join, &format!("j{i}")).await.with_context(|| format!("joining {room}"))?;
        h.saturating_record(t0.elapsed().as_micros() as u64);
        let leave = format!(r#"{{"op":"leave","id":"l{i}","room":"{room}"}}"#);
        wire::request(ws, leave, &format!("l{i}")).await.with_context(|| format!("leaving {room}"))?;
    }
    Ok(h)
}
