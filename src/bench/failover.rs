//! `failover`: a redundancy pair under probe load, a fault injected again and again.
//!
//! The bench bulk-inserts R rooms homed on node `1a`, spawns `1a` and `1b` on the given shared
//! store (PostgreSQL or MySQL/MariaDB), and connects C clients (the `stoa::client` library, which
//! resumes on the peer by itself), each joined to R / C rooms, with one prober per room sending a
//! probe every `--probe-interval` and resending it with its `cid` until acked. Each cycle:
//!
//! 1. fault: `kill -9` of `1a` (or `--fault service`: stop its `rooms` critical service);
//! 2. failover figures: `detect` (fault → `1b` leaves `normal`), per-room fault → first probe
//!    acked after it (`failover_ms_*`, every room writable on the peer), per-client fault →
//!    first ack (`client_resume_ms_*`);
//! 3. `1a` restarted (or its service started) and back as `failed_over`; then fallback, timed
//!    the same way (`fallback_ms_*`: the pause of the moved rooms while clients keep posting).
//!
//! At the end every acked probe is looked up in the store: `acked_lost` and `duplicates` must
//! be zero.

use super::Summary;
use super::server::{NodeSpec, Target, Tuning, Workspace, loopback_port, spawn_node};
use super::TargetArgs;
use crate::client::{Client, ClientOptions, Login, ReconnectPolicy, new_cid};
use crate::store::Store;
use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `failover` options.
#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Rooms homed on the node that fails.
    #[arg(long, default_value_t = 10_000)]
    pub rooms: usize,
    /// Client connections (each probes rooms / clients rooms round robin).
    #[arg(long, default_value_t = 1_000)]
    pub clients: usize,
    /// Fault cycles (each: fault, failover, restart, fallback).
    #[arg(long, default_value_t = 10)]
    pub cycles: usize,
    /// `kill` (kill -9 of the host) or `service` (stop its `rooms` critical service).
    #[arg(long, default_value = "kill", value_parser = ["kill", "service"])]
    pub fault: String,
    /// Steady probing between phases.
    #[arg(long, value_parser = super::parse_duration, default_value = "2s")]
    pub settle: Duration,
    /// Pause between two probes of one room (every room has a prober; probes in flight or
    /// sent during the outage are acked as soon as their room is writable again). At a kill
    /// every prober sends at once, so the failover figures do not depend on it; the fallback
    /// figures are at most this much late.
    #[arg(long, value_parser = super::parse_duration, default_value = "1s")]
    pub probe_interval: Duration,
}

const IDS: [&str; 2] = ["1a", "1b"];

fn service_of(id: &str) -> String {
    format!("conference-{id}.localhost")
}

/// Acks per room and per client, stamped.
#[derive(Default)]
pub(super) struct Probes {
    /// (room index, cid, seq)
    acked: Vec<(usize, String, u64)>,
    /// Per room: the time of every ack (kept short: only the latest few matter).
    room_acks: Vec<Vec<Instant>>,
    client_acks: Vec<Vec<Instant>>,
    /// Failed sends that were resent, by what failed them (`disconnected`, or the server's
    /// error code): how much work the fault cost the clients and the nodes.
    pub(super) resends: std::collections::BTreeMap<String, u64>,
}

impl Probes {
    /// For each of `n` items: the first ack at or after `t`, as a delay.
    fn first_after(acks: &[Vec<Instant>], t: Instant) -> Vec<Option<Duration>> {
        acks.iter().map(|v| v.iter().find(|a| **a >= t).map(|a| *a - t)).collect()
    }

    /// Drop ack times older than `t` (keeps memory flat over many cycles).
    pub(super) fn forget_before(&mut self, t: Instant) {
        for v in self.room_acks.iter_mut().chain(self.client_acks.iter_mut()) {
            v.retain(|a| *a >= t);
        }
    }
}

/// Clients probing rooms: client `c` connects to `urls[c][0]` (resuming on any of `urls[c]` by
/// itself), joins rooms `c`, `c + C`, `c + 2C`, … (C clients), and keeps one prober per room
/// that sends a probe every `interval` and resends it with its `cid` until acked.
pub(super) struct Probers {
    pub(super) probes: Arc<Mutex<Probes>>,
    tasks: Vec<tokio::task::JoinHandle<Arc<Client>>>,
    stop: CancellationToken,
    /// Bumped at a fault: every prober waiting out its interval sends at once.
    kick: tokio::sync::watch::Sender<u64>,
}

impl Probers {
    /// Connect and join every client (64 at a time), and start probing.
    pub(super) async fn start(urls: &[Vec<String>], rooms: Arc<Vec<String>>, interval: Duration) -> anyhow::Result<Probers> {
        use futures_util::StreamExt;
        let clients_n = urls.len();
        let probes = Arc::new(Mutex::new(Probes {
            room_acks: vec![Vec::new(); rooms.len()],
            client_acks: vec![Vec::new(); clients_n],
            ..Default::default()
        }));
        let mut probers =
            Probers { probes, tasks: Vec::with_capacity(rooms.len()), stop: CancellationToken::new(), kick: tokio::sync::watch::Sender::new(0) };
        let bar = indicatif::ProgressBar::new(clients_n as u64);
        bar.set_style(indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:40}] {pos}/{len} clients joined").expect("valid template"));
        let connect = futures_util::stream::iter(urls.iter().cloned().enumerate()).map(|(c, urls)| {
            let rooms = rooms.clone();
            async move {
                let options = ClientOptions {
                    connect_timeout: Duration::from_secs(30),
                    reconnect: Some(ReconnectPolicy {
                        extra_urls: urls.clone(),
                        initial_backoff: Duration::from_millis(20),
                        max_backoff: Duration::from_millis(500),
                        give_up_after: Some(Duration::from_secs(300)),
                    }),
                    ..ClientOptions::default()
                };
                let (client, _) = Client::connect_with(&urls[0], Login::guest(format!("p{c}")), options).await?;
                let mine: Vec<usize> = (c..rooms.len()).step_by(clients_n).collect();
                for &r in &mine {
                    client.join(rooms[r].as_str(), format!("p{c}"), None, None).await.with_context(|| format!("joining {}", rooms[r]))?;
                }
                anyhow::Ok((c, client, mine))
            }
        });
        let mut connect = connect.buffer_unordered(64);
        while let Some(joined) = connect.next().await {
            let (c, client, mine) = match joined {
                Ok(j) => j,
                Err(e) => {
                    probers.stop.cancel();
                    return Err(e);
                }
            };
            bar.inc(1);
            // One prober per room: a room's probe in flight (or parked while the client resumes)
            // is acked as soon as that room is writable again, whatever its neighbours do.
            let client = Arc::new(client);
            for r in mine {
                let (probes, stop, rooms, client) = (probers.probes.clone(), probers.stop.clone(), rooms.clone(), client.clone());
                let mut kick = probers.kick.subscribe();
                probers.tasks.push(tokio::spawn(async move {
                    // Spread the probes of all rooms over the interval.
                    tokio::time::sleep(interval.mul_f64(rand::random::<f64>())).await;
                    while !stop.is_cancelled() {
                        let cid = new_cid();
                        loop {
                            match client.send(rooms[r].as_str(), "probe", cid.clone()).await {
                                Ok(ack) => {
                                    let now = Instant::now();
                                    let mut p = probes.lock().expect("probes lock");
                                    p.acked.push((r, cid.0.clone(), ack.seq));
                                    p.room_acks[r].push(now);
                                    p.client_acks[c].push(now);
                                    break;
                                }
                                Err(crate::client::ClientError::Closed) => return client,
                                Err(_) if stop.is_cancelled() => return client,
                                Err(e) => {
                                    let kind = match &e {
                                        crate::client::ClientError::Server { code, .. } => code.as_str().to_owned(),
                                        other => other.to_string(),
                                    };
                                    *probes.lock().expect("probes lock").resends.entry(kind).or_default() += 1;
                                    tokio::time::sleep(Duration::from_millis(20)).await // resend pace
                                }
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(interval) => {}
                            _ = kick.changed() => {}
                        }
                    }
                    client
                }));
            }
        }
        bar.finish_and_clear();
        Ok(probers)
    }

    /// Every room probed now (at a fault): a room's failover figure is then the time until it
    /// takes a probe sent at the fault, not late by up to one probe interval.
    pub(super) fn probe_now(&self) {
        self.kick.send_modify(|n| *n += 1);
    }

    /// Stop probing, close the clients, and return every acked probe (room index, cid, seq).
    pub(super) async fn finish(self) -> Vec<(usize, String, u64)> {
        self.stop.cancel();
        let mut clients = Vec::new();
        for t in self.tasks {
            if let Ok(client) = t.await {
                clients.push(client);
            }
        }
        for client in clients {
            if let Ok(client) = Arc::try_unwrap(client) {
                client.close().await;
            }
        }
        std::mem::take(&mut self.probes.lock().expect("probes lock").acked)
    }
}

struct Pair {
    targets: [Option<Target>; 2],
    specs: [NodeSpec; 2],
}

impl Pair {
    fn admin(&self, i: usize) -> String {
        self.specs[i].admin.to_string()
    }

    async fn state(&self, i: usize) -> Option<String> {
        let a = crate::admin_client::request(&self.admin(i), "GET", &format!("/api/nodes/{}", IDS[i]), None, Duration::from_secs(2)).await.ok()?;
        a.json()["state"].as_str().map(str::to_owned)
    }

    /// Poll until node `i`'s state satisfies `pred`; returns the time it took.
    async fn await_state(&self, i: usize, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if let Some(s) = self.state(i).await
                && pred(&s)
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!("node {} did not become {what} within {within:?} (last: {:?})", IDS[i], self.state(i).await);
            }
            tokio::time::sleep(Duration::from_millis(5)).await; // polling interval
        }
    }

    async fn post(&self, i: usize, path: &str) -> anyhow::Result<()> {
        let a = crate::admin_client::request(&self.admin(i), "POST", path, None, Duration::from_secs(120)).await?;
        if a.status != 200 {
            bail!("POST {path} on {}: {} {}", IDS[i], a.status, a.body);
        }
        Ok(())
    }
}

fn pair_specs() -> anyhow::Result<[NodeSpec; 2]> {
    let mut specs = [NodeSpec::on_free_ports(IDS[0], &service_of(IDS[0]))?, NodeSpec::on_free_ports(IDS[1], &service_of(IDS[1]))?];
    let links = [loopback_port()?, loopback_port()?];
    let mut nodes = String::new();
    for i in 0..2 {
        nodes.push_str(&format!(
            "\n[[cluster.groups.nodes]]\nid = \"{id}\"\nclient = \"ws://{client}/ws\"\nlink = \"127.0.0.1:{link}\"\nservice = \"{service}\"\n",
            id = IDS[i],
            client = specs[i].client,
            link = links[i],
            service = service_of(IDS[i]),
        ));
    }
    for spec in &mut specs {
        spec.extra_toml = format!("\n[[cluster.groups]]\nname = \"bench-pair\"\nha = true\n{nodes}");
    }
    Ok(specs)
}

/// Run the failover bench.
pub async fn failover(args: &FailoverArgs, target_args: &TargetArgs) -> anyhow::Result<Summary> {
    if target_args.url.is_some() {
        bail!("failover spawns and kills its own pair of nodes: --url is not supported");
    }
    let store_url = target_args.store.clone().context("failover needs a shared store: give --store postgres://… or mysql://…")?;
    if store_url.starts_with("sqlite") {
        bail!("a redundancy pair needs PostgreSQL or MySQL/MariaDB, not SQLite");
    }
    if args.rooms == 0 || args.clients == 0 || args.cycles == 0 {
        bail!("--rooms, --clients and --cycles must be at least 1");
    }
    let clients_n = args.clients.min(args.rooms);
    let workspace = Workspace::new(target_args)?;
    let dir = workspace.dir().context("the bench needs its temp dir")?.to_owned();

    // Rooms homed on 1a, inserted straight into the store.
    let prefix = format!("f{}-", super::rooms::run_tag());
    super::rooms::fill_store(&workspace, &prefix, args.rooms, 20_000, IDS[0], &service_of(IDS[0])).await?;
    let rooms: Vec<String> = (0..args.rooms).map(|i| format!("{prefix}{i}@{}", service_of(IDS[0]))).collect();

    // The secret goes through the environment-free config: generated, loopback only.
    let secret: String = format!("bench-secret-{}", super::rooms::run_tag());
    let mut tuning = Tuning { settings: vec![("rooms.passivate_after_ms", "86400000".into())] };
    tuning.settings.push(("cluster.secret", format!("{secret:?}")));
    tuning.settings.push(("log.level", "\"info\"".into()));
    let specs = pair_specs()?;
    let mut pair = Pair { targets: [None, None], specs };
    for i in 0..2 {
        pair.targets[i] = Some(spawn_node(&dir, &store_url, target_args, &tuning, &pair.specs[i]).await?);
        pair.await_state(i, "normal", Duration::from_secs(60), |s| s == "normal").await?;
    }

    // Clients: each on 1a, resuming anywhere in the pair.
    let urls = vec![format!("ws://{}/ws", pair.specs[0].client), format!("ws://{}/ws", pair.specs[1].client)];
    let rooms = Arc::new(rooms);
    let probers = Probers::start(&vec![urls; clients_n], rooms.clone(), args.probe_interval).await?;
    let probes = probers.probes.clone();

    let mut failover_h = Vec::new();
    let mut fallback_h = Vec::new();
    let mut detect = Vec::new();
    let mut resume = new_histogram();
    let mut fallback_resume = new_histogram();
    let result = async {
        for cycle in 0..args.cycles {
            tokio::time::sleep(args.settle).await;
            // Fault.
            let t0 = Instant::now();
            probes.lock().expect("probes lock").forget_before(t0 - Duration::from_secs(1));
            match args.fault.as_str() {
                "kill" => {
                    if let Some(t) = pair.targets[0].take() {
                        t.stop().await;
                    }
                    // The node is dead: no probe sent from now on can be acked before the
                    // failover. (A stopped service keeps its rooms writable through its delay,
                    // so there a kick would only measure the delay's start.)
                    probers.probe_now();
                }
                _ => pair.post(0, "/api/nodes/1a/services/rooms/stop").await?,
            }
            let d = pair.await_state(1, "out of normal", Duration::from_secs(120), |s| s != "normal").await?;
            detect.push(d.as_millis() as u64);
            let (room_ms, client_ms) = await_all(&probes, t0, rooms.len(), Duration::from_secs(300)).await?;
            for ms in &client_ms {
                resume.saturating_record(*ms);
            }
            eprintln!(
                "cycle {cycle}: detect {} ms, failover p50 {} ms max {} ms, client resume p99 {} ms",
                d.as_millis(),
                percentile(&room_ms, 0.5),
                room_ms.iter().max().unwrap_or(&0),
                percentile(&client_ms, 0.99)
            );
            failover_h.push(room_ms);

            // Back: restart (or start the service), wait for failed_over.
            match args.fault.as_str() {
                "kill" => pair.targets[0] = Some(spawn_node(&dir, &store_url, target_args, &tuning, &pair.specs[0]).await?),
                _ => pair.post(0, "/api/nodes/1a/services/rooms/start").await?,
            }
            pair.await_state(0, "failed_over", Duration::from_secs(120), |s| s == "failed_over").await?;
            tokio::time::sleep(args.settle).await;

            // Fallback, clients posting all along.
            let t1 = Instant::now();
            pair.post(1, "/api/nodes/1a/fallback").await?;
            pair.await_state(0, "normal", Duration::from_secs(120), |s| s == "normal").await?;
            let (room_ms, client_ms) = await_all(&probes, t1, rooms.len(), Duration::from_secs(300)).await?;
            for ms in &client_ms {
                fallback_resume.saturating_record(*ms);
            }
            eprintln!("cycle {cycle}: fallback p50 {} ms max {} ms", percentile(&room_ms, 0.5), room_ms.iter().max().unwrap_or(&0));
            fallback_h.push(room_ms);
        }
        anyhow::Ok(())
    }
    .await;
    let acked = probers.finish().await;
    for t in pair.targets.iter_mut() {
        if let Some(t) = t.take() {
            t.stop().await;
        }
    }
    result?;

    let (lost, duplicates) = check_store(&store_url, &rooms, &acked).await?;
    let all = |v: &[Vec<u64>]| v.iter().flatten().copied().collect::<Vec<u64>>();
    let maxes = |v: &[Vec<u64>]| v.iter().map(|x| x.iter().copied().max().unwrap_or(0)).collect::<Vec<u64>>();
    let mut summary = Summary::default();
    summary.push("mode", "failover");
    summary.push("store", super::server::store_kind(&store_url));
    summary.push("fault", args.fault.clone());
    summary.push("rooms", args.rooms);
    summary.push("clients", clients_n);
    summary.push("cycles", args.cycles);
    summary.push("detect_ms", percentile(&detect, 0.5));
    summary.push("detect_ms_max", detect.iter().copied().max().unwrap_or(0));
    summary.push("failover_ms_p50", percentile(&all(&failover_h), 0.5));
    summary.push("failover_ms_max", all(&failover_h).into_iter().max().unwrap_or(0));
    summary.push("failover_ms_max_p50_over_cycles", percentile(&maxes(&failover_h), 0.5));
    summary.push("client_resume_ms_p50", resume.value_at_quantile(0.5));
    summary.push("client_resume_ms_p99", resume.value_at_quantile(0.99));
    summary.push("fallback_ms_p50", percentile(&all(&fallback_h), 0.5));
    summary.push("fallback_ms_max", all(&fallback_h).into_iter().max().unwrap_or(0));
    summary.push("fallback_client_resume_ms_p50", fallback_resume.value_at_quantile(0.5));
    summary.push("fallback_client_resume_ms_p99", fallback_resume.value_at_quantile(0.99));
    summary.push("acked", acked.len());
    summary.push("acked_lost", lost);
    summary.push("duplicates", duplicates);
    Ok(summary)
}

pub(super) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds")
}

pub(super) fn percentile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Wait until every room and every client has an ack after `t`; returns the delays (ms).
pub(super) async fn await_all(probes: &Mutex<Probes>, t: Instant, rooms: usize, within: Duration) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    loop {
        let (room, client) = {
            let p = probes.lock().expect("probes lock");
            (Probes::first_after(&p.room_acks, t), Probes::first_after(&p.client_acks, t))
        };
        let waiting = room.iter().filter(|x| x.is_none()).count();
        if waiting == 0 && client.iter().all(Option::is_some) {
            let ms = |v: Vec<Option<Duration>>| v.into_iter().map(|d| d.expect("all present").as_millis() as u64).collect();
            return Ok((ms(room), ms(client)));
        }
        if t.elapsed() > within {
            bail!("{waiting} of {rooms} rooms took no probe within {within:?} of the fault");
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // polling interval
    }
}

/// Every acked probe must be stored once under its seq. Returns (lost, duplicates).
pub(super) async fn check_store(url: &str, rooms: &[String], acked: &[(usize, String, u64)]) -> anyhow::Result<(u64, u64)> {
    let store = Store::connect(url, 2, "normal").await.context("connecting to the store to check")?;
    let mut by_room: HashMap<usize, Vec<(&str, u64)>> = HashMap::new();
    for (r, cid, seq) in acked {
        by_room.entry(*r).or_default().push((cid.as_str(), *seq));
    }
    let (mut lost, mut duplicates) = (0u64, 0u64);
    for (r, expected) in by_room {
        let row = store.load_room(&crate::ids::RoomAddr(rooms[r].clone())).await?.context("bench room vanished")?;
        let stored = store.messages(row.id, 0, None, 10_000_000, false).await?;
        let mut seen: HashMap<&str, Vec<u64>> = HashMap::new();
        for m in &stored {
            seen.entry(m.client_msg_id.as_str()).or_default().push(m.seq);
        }
        duplicates += seen.values().filter(|s| s.len() > 1).count() as u64;
        for (cid, seq) in expected {
            if seen.get(cid).is_none_or(|s| !s.contains(&seq)) {
                lost += 1;
            }
        }
    }
    store.close().await;
    Ok((lost, duplicates))
}
