//! `cluster`: issue 14's benchmark, on the cluster of `examples/cluster/` (three HA pairs on
//! PostgreSQL, one database per pair, and a single node on SQLite: seven `stoa serve`
//! processes, every node linked to every other).
//!
//! The bench spawns that layout (same ids, groups, services, store kinds and HA timings, the
//! bench's lifted limits, free loopback ports, and fresh databases `stoa_bench_cluster_<tag>_gN`
//! on the PostgreSQL server of `--pg-url`, dropped at the end: a cluster started by hand from
//! the example files is never touched), waits until every node sees every other over its link,
//! then:
//!
//! 1. **Forwarding overhead.** The same paced load (R rooms of pair 2, one sender per room, N
//!    occupants) runs `--rounds` times with the clients on pair 1's nodes (every request
//!    forwarded to pair 2's host) and with the clients on 2a itself (local), alternated. Per
//!    run: msg/s, ack and end-to-end latency, and server CPU per message summed over all seven
//!    processes, also net of the idle cluster's CPU (measured first: heartbeats and lease
//!    renewals of seven nodes are not the messages' cost); `forwarded_cpu_ratio` is the median
//!    forwarded net CPU per message over the median local one.
//! 2. **Failover under load.** Pair 2's host holds `--failover-rooms` rooms and pairs 1 and 3
//!    `--other-rooms` each, probed once per `--probe-interval` by `--clients` clients spread over
//!    all seven nodes (the failover bench's probers: each probe resent with its cid until
//!    acked). kill -9 of 2a; per room of pair 2, the time until it takes a probe again (p50,
//!    max); per client, until its first ack. At the end every acked probe is looked up in its
//!    group's store: `acked_lost` and `duplicates` must be zero.

use super::failover::{Probers, await_all, check_store, percentile};
use super::load::{self, Servers, Shape};
use super::server::{NodeSpec, Target, Tuning, Workspace, loopback_port, spawn_node};
use super::stats::{self, Stats};
use super::wire::Endpoint;
use super::{LoadArgs, Summary, TargetArgs, round3};
use anyhow::{Context as _, bail};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `cluster` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// PostgreSQL server of the pairs' stores: the bench creates a fresh database per pair
    /// there and drops it at the end.
    #[arg(long, value_name = "URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_url: String,
    /// Rooms (of pair 2) of the forwarding-overhead load.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Occupants per room of the overhead load (the first sends).
    #[arg(long, default_value_t = 2)]
    pub occupants: usize,
    /// Messages per second per room of the overhead load.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Measured time of each overhead run.
    #[arg(long, value_parser = super::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Load before each overhead run's window (not counted).
    #[arg(long, value_parser = super::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Overhead rounds (each: a forwarded and a local run, in alternating order).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Rooms of pair 2's host that fail over (0: no failover phase).
    #[arg(long, default_value_t = 10_000)]
    pub failover_rooms: usize,
    /// Rooms of pairs 1 and 3 each, probed by the same clients during the failover.
    #[arg(long, default_value_t = 1_000)]
    pub other_rooms: usize,
    /// Clients of the failover phase, spread round robin over the seven nodes.
    #[arg(long, default_value_t = 1_000)]
    pub clients: usize,
    /// Pause between two probes of one room in the failover phase.
    #[arg(long, value_parser = super::parse_duration, default_value = "1s")]
    pub probe_interval: Duration,
    /// Steady probing before the kill and after every room is writable again.
    #[arg(long, value_parser = super::parse_duration, default_value = "2s")]
    pub settle: Duration,
}

/// The groups of `examples/cluster/`: name and whether it is an HA pair (the pairs on
/// PostgreSQL, the single node on SQLite).
const GROUPS: [(&str, bool); 4] = [("g1", true), ("g2", true), ("g3", true), ("g4", false)];
/// Its nodes: id and group index.
const LAYOUT: [(&str, usize); 7] = [("1a", 0), ("1b", 0), ("2a", 1), ("2b", 1), ("3a", 2), ("3b", 2), ("4a", 3)];
/// The node killed in the failover phase (2a, host of pair 2's rooms), and its backup (2b).
const HOST: usize = 2;
const BACKUP: usize = 3;

fn service_of(id: &str) -> String {
    format!("conference-{id}.localhost")
}

/// The seven spawned nodes and their stores.
struct Cluster {
    specs: Vec<NodeSpec>,
    targets: Vec<Option<Target>>,
    /// Per group: its store URL.
    stores: Vec<String>,
    /// The PostgreSQL databases created for the pairs (dropped at the end).
    databases: Vec<String>,
    pg_url: String,
}

impl Cluster {
    /// Create the pairs' databases and configure the nodes (not started).
    async fn create(pg_url: &str, dir: &std::path::Path) -> anyhow::Result<Cluster> {
        let tag = super::rooms::run_tag();
        let mut cluster = Cluster { specs: Vec::new(), targets: Vec::new(), stores: Vec::new(), databases: Vec::new(), pg_url: pg_url.to_owned() };
        for (name, ha) in GROUPS {
            if ha {
                let db = format!("stoa_bench_cluster_{tag}_{name}");
                pg_admin(pg_url, &format!("CREATE DATABASE {db}")).await.with_context(|| format!("creating {db} on {}", crate::node::redact(pg_url)))?;
                cluster.databases.push(db.clone());
                let mut url = url::Url::parse(pg_url).context("--pg-url is not a URL")?;
                url.set_path(&format!("/{db}"));
                cluster.stores.push(url.to_string());
            } else {
                cluster.stores.push(format!("sqlite://{}/data/{name}.db", dir.display()));
            }
        }
        let links: Vec<u16> = LAYOUT.iter().map(|_| loopback_port()).collect::<anyhow::Result<_>>()?;
        let mut specs: Vec<NodeSpec> = LAYOUT.iter().map(|(id, _)| NodeSpec::on_free_ports(id, &service_of(id))).collect::<anyhow::Result<_>>()?;
        let mut topology = String::new();
        for (g, (name, ha)) in GROUPS.iter().enumerate() {
            topology += &format!("\n[[cluster.groups]]\nname = \"{name}\"\nha = {ha}\n");
            for (n, (id, _)) in LAYOUT.iter().enumerate().filter(|(_, (_, group))| *group == g) {
                topology += &format!(
                    "\n[[cluster.groups.nodes]]\nid = \"{id}\"\nclient = \"ws://{client}/ws\"\nlink = \"127.0.0.1:{link}\"\nservice = \"{service}\"\n",
                    client = specs[n].client,
                    link = links[n],
                    service = service_of(id),
                );
            }
        }
        for spec in &mut specs {
            spec.extra_toml = topology.clone();
        }
        cluster.targets = specs.iter().map(|_| None).collect();
        cluster.specs = specs;
        Ok(cluster)
    }

    fn index(id: &str) -> usize {
        LAYOUT.iter().position(|(n, _)| *n == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    fn endpoint(&self, n: usize) -> anyhow::Result<Endpoint> {
        Endpoint::parse(&self.url(n))
    }

    fn url(&self, n: usize) -> String {
        format!("ws://{}/ws", self.specs[n].client)
    }

    /// The client URLs a user of node `n` resumes on: its own node, then its peer.
    fn urls_of(&self, n: usize) -> Vec<String> {
        let group = LAYOUT[n].1;
        let mut urls = vec![self.url(n)];
        urls.extend((0..LAYOUT.len()).filter(|&m| m != n && LAYOUT[m].1 == group).map(|m| self.url(m)));
        urls
    }

    fn pids(&self) -> Vec<u32> {
        self.targets.iter().flatten().filter_map(|t| t.pid).collect()
    }

    /// Fail if a node died.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (n, t) in self.targets.iter_mut().enumerate() {
            if let Some(t) = t {
                t.check_alive().with_context(|| format!("node {}", LAYOUT[n].0))?;
            }
        }
        Ok(())
    }

    async fn state(&self, on: usize, id: &str) -> Option<String> {
        let a = crate::admin_client::request(&self.specs[on].admin.to_string(), "GET", &format!("/api/nodes/{id}"), None, Duration::from_secs(2)).await.ok()?;
        a.json()["state"].as_str().map(str::to_owned)
    }

    /// The sum over the running nodes of counter `name` on their `/metrics` (0 where absent).
    async fn metric_sum(&self, name: &str) -> u64 {
        let mut sum = 0;
        for (n, spec) in self.specs.iter().enumerate() {
            if self.targets[n].is_none() {
                continue;
            }
            let Ok(a) = crate::admin_client::request(&spec.admin.to_string(), "GET", "/metrics", None, Duration::from_secs(2)).await else { continue };
            sum += crate::admin_client::metric(&a.body, name) as u64;
        }
        sum
    }

    /// Poll until node `on` sees node `id` in a state that satisfies `pred`; returns the time it took.
    async fn await_state(&self, on: usize, id: &str, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if let Some(s) = self.state(on, id).await
                && pred(&s)
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("node {} did not see {id} {what} within 120 s (last: {:?})", LAYOUT[on].0, self.state(on, id).await);
            }
            tokio::time::sleep(Duration::from_millis(5)).await; // polling interval
        }
    }

    /// Start the first node of every group, each pair's first node until `normal`, then the
    /// others; wait until every node sees every other over its link.
    async fn start(&mut self, dir: &std::path::Path, args: &TargetArgs, tuning: &Tuning) -> anyhow::Result<()> {
        let first: Vec<usize> = (0..GROUPS.len()).filter_map(|g| LAYOUT.iter().position(|(_, group)| *group == g)).collect();
        let order: Vec<usize> = first.iter().copied().chain((0..LAYOUT.len()).filter(|n| !first.contains(n))).collect();
        for n in order {
            let store = &self.stores[LAYOUT[n].1];
            self.targets[n] = Some(spawn_node(dir, store, args, tuning, &self.specs[n]).await.with_context(|| format!("starting node {}", LAYOUT[n].0))?);
            if first.contains(&n) && GROUPS[LAYOUT[n].1].1 {
                self.await_state(n, LAYOUT[n].0, "normal", |s| s == "normal").await?;
            }
        }
        let started = Instant::now();
        for (n, (id, _)) in LAYOUT.iter().enumerate() {
            loop {
                self.check_alive()?;
                let topology = crate::admin_client::request(&self.specs[n].admin.to_string(), "GET", "/api/topology", None, Duration::from_secs(2)).await;
                let sees_all = topology.is_ok_and(|a| {
                    let t = a.json();
                    let nodes: Vec<&serde_json::Value> = t["groups"].as_array().into_iter().flatten().flat_map(|g| g["nodes"].as_array().into_iter().flatten()).collect();
                    nodes.len() == LAYOUT.len() && nodes.iter().all(|n| n["this_node"] == true || n["link"]["reachable"] == true)
                });
                if sees_all {
                    break;
                }
                if started.elapsed() > Duration::from_secs(120) {
                    bail!("node {id} did not see every other node over its link within 120 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await; // polling interval
            }
        }
        Ok(())
    }

    /// Stop every node, then drop the databases.
    async fn stop(&mut self) {
        for t in self.targets.iter_mut() {
            if let Some(t) = t.take() {
                t.stop().await;
            }
        }
        for db in std::mem::take(&mut self.databases) {
            if let Err(e) = pg_admin(&self.pg_url, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await {
                eprintln!("could not drop database {db}: {e:#}");
            }
        }
    }
}

/// Run one statement on the PostgreSQL server of `url` (CREATE/DROP DATABASE).
async fn pg_admin(url: &str, statement: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned())).execute(&mut c).await?;
    c.close().await.ok();
    Ok(())
}

/// One overhead run's figures.
struct Run {
    forwarded: bool,
    msg_per_s: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    /// Server CPU (all seven processes) per committed message, in microseconds.
    cpu_us_per_msg: f64,
    /// The same without the cluster's idle CPU (heartbeats, lease renewals): what the messages
    /// themselves cost.
    net_cpu_us_per_msg: f64,
    cpu_cores_server: f64,
    errors: u64,
}

impl Run {
    fn of(forwarded: bool, out: &load::Outcome, idle_cores: f64) -> Run {
        let s = &out.stats;
        let cores = out.cpu.server.unwrap_or(0.0);
        let per_msg = |cores: f64| if s.acks > 0 { cores * out.window_s / s.acks as f64 * 1e6 } else { 0.0 };
        Run {
            forwarded,
            msg_per_s: s.acks as f64 / out.window_s,
            ack_p50_ms: Stats::ms(&s.ack, 0.50),
            ack_p99_ms: Stats::ms(&s.ack, 0.99),
            e2e_p50_ms: Stats::ms(&s.e2e, 0.50),
            e2e_p99_ms: Stats::ms(&s.e2e, 0.99),
            cpu_us_per_msg: per_msg(cores),
            net_cpu_us_per_msg: per_msg((cores - idle_cores).max(0.0)),
            cpu_cores_server: cores,
            errors: s.errors.values().sum(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "clients": if self.forwarded { "forwarded" } else { "local" },
            "msg_per_s": round3(self.msg_per_s),
            "ack_p50_ms": round3(self.ack_p50_ms),
            "ack_p99_ms": round3(self.ack_p99_ms),
            "e2e_p50_ms": round3(self.e2e_p50_ms),
            "e2e_p99_ms": round3(self.e2e_p99_ms),
            "cpu_us_per_msg": round3(self.cpu_us_per_msg),
            "net_cpu_us_per_msg": round3(self.net_cpu_us_per_msg),
            "cpu_cores_server": round3(self.cpu_cores_server),
            "errors": self.errors,
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the cluster bench.
pub async fn cluster(args: &ClusterArgs, target_args: &TargetArgs) -> anyhow::Result<Summary> {
    if target_args.url.is_some() || target_args.store.is_some() {
        bail!("cluster spawns its own seven nodes and stores: --url and --store are not supported (see --pg-url)");
    }
    if args.rounds == 0 || (args.failover_rooms > 0 && args.clients == 0) {
        bail!("--rounds and --clients must be at least 1");
    }
    let shape = Shape::resolve(
        load::Kind::Latency,
        &LoadArgs {
            rooms: Some(args.rooms),
            occupants: Some(args.occupants),
            senders: Some(1),
            rate: Some(args.rate),
            duration: Some(args.duration),
            warmup: Some(args.warmup),
            ..LoadArgs::default()
        },
    )?;
    if args.rate <= 0.0 {
        bail!("--rate must be positive: the overhead runs compare the same paced load");
    }
    let workspace = Workspace::new(target_args)?;
    let dir = workspace.dir().context("the bench needs its temp dir")?.to_owned();
    let mut cluster = Cluster::create(&args.pg_url, &dir).await?;
    let result = run(args, target_args, &shape, &dir, &mut cluster).await;
    cluster.stop().await;
    let (idle_cores, runs, failover) = result?;

    let mut summary = Summary::default();
    summary.push("mode", "cluster");
    summary.push("store", "postgres (3 pairs) + sqlite (single node)");
    summary.push("nodes", LAYOUT.len());
    let pick = |forwarded: bool, f: fn(&Run) -> f64| median(runs.iter().filter(|r| r.forwarded == forwarded).map(f).collect());
    let (fwd_cpu, local_cpu) = (pick(true, |r| r.net_cpu_us_per_msg), pick(false, |r| r.net_cpu_us_per_msg));
    summary.push("rooms", args.rooms);
    summary.push("occupants_per_room", args.occupants);
    summary.push("rate_per_room", round3(args.rate));
    summary.push("rounds", args.rounds);
    summary.push("duration_s", args.duration.as_secs_f64());
    for (side, forwarded) in [("forwarded", true), ("local", false)] {
        summary.push(&format!("{side}_msg_per_s"), round3(pick(forwarded, |r| r.msg_per_s)));
        summary.push(&format!("{side}_ack_p50_ms"), round3(pick(forwarded, |r| r.ack_p50_ms)));
        summary.push(&format!("{side}_ack_p99_ms"), round3(pick(forwarded, |r| r.ack_p99_ms)));
        summary.push(&format!("{side}_e2e_p50_ms"), round3(pick(forwarded, |r| r.e2e_p50_ms)));
        summary.push(&format!("{side}_e2e_p99_ms"), round3(pick(forwarded, |r| r.e2e_p99_ms)));
        summary.push(&format!("{side}_cpu_us_per_msg"), round3(pick(forwarded, |r| r.cpu_us_per_msg)));
        summary.push(&format!("{side}_net_cpu_us_per_msg"), round3(pick(forwarded, |r| r.net_cpu_us_per_msg)));
    }
    summary.push("idle_cpu_cores_server", round3(idle_cores));
    summary.push("forwarded_extra_e2e_p50_ms", round3(pick(true, |r| r.e2e_p50_ms) - pick(false, |r| r.e2e_p50_ms)));
    summary.push("forwarded_cpu_ratio", round3(if local_cpu > 0.0 { fwd_cpu / local_cpu } else { 0.0 }));
    summary.push("overhead_errors", runs.iter().map(|r| r.errors).sum::<u64>());
    let mut human = String::from("\noverhead runs (median above):\nclients     msg/s   ack p50  e2e p50  e2e p99  cpu µs/msg  net µs/msg\n");
    for r in &runs {
        human += &format!(
            "{:<9} {:>7.1} {:>8.3} {:>8.3} {:>8.3} {:>11.1} {:>11.1}\n",
            if r.forwarded { "forwarded" } else { "local" },
            r.msg_per_s,
            r.ack_p50_ms,
            r.e2e_p50_ms,
            r.e2e_p99_ms,
            r.cpu_us_per_msg,
            r.net_cpu_us_per_msg
        );
    }
    summary.push("overhead_runs", runs.iter().map(Run::json).collect::<Vec<_>>());
    summary.set_human(human);
    let f = failover.unwrap_or_default();
    summary.push("failover_rooms", args.failover_rooms);
    summary.push("other_rooms_per_pair", if args.failover_rooms > 0 { args.other_rooms } else { 0 });
    summary.push("clients", f.clients);
    summary.push("exit_ms", f.exit_ms);
    summary.push("detect_ms", f.detect_ms);
    summary.push("failover_ms_p50", percentile(&f.room_ms, 0.5));
    summary.push("failover_ms_max", f.room_ms.iter().copied().max().unwrap_or(0));
    // Pair 2's rooms by the node their prober's client is on (room r's prober is client
    // r mod C, on node c mod 7): 2a's clients resume on 2b, the others follow the rooms there.
    let by_node: serde_json::Map<String, serde_json::Value> = LAYOUT
        .iter()
        .enumerate()
        .map(|(n, (id, _))| {
            let ms: Vec<u64> = f.room_ms.iter().enumerate().filter(|(r, _)| (r % f.clients.max(1)) % LAYOUT.len() == n).map(|(_, ms)| *ms).collect();
            let max = ms.iter().copied().max().unwrap_or(0);
            ((*id).to_owned(), serde_json::json!({ "rooms": ms.len(), "p50": percentile(&ms, 0.5), "max": max }))
        })
        .collect();
    summary.push("failover_ms_by_client_node", serde_json::Value::Object(by_node));
    summary.push("other_pairs_first_ack_ms_max", f.other_ms.iter().copied().max().unwrap_or(0));
    summary.push("client_resume_ms_p50", percentile(&f.client_ms, 0.5));
    summary.push("client_resume_ms_p99", percentile(&f.client_ms, 0.99));
    summary.push("client_resume_ms_max", f.client_ms.iter().copied().max().unwrap_or(0));
    // Where the slowest clients were connected (client c is on node c mod 7).
    let mut slowest: Vec<(usize, u64)> = f.client_ms.iter().copied().enumerate().collect();
    slowest.sort_by_key(|(_, ms)| std::cmp::Reverse(*ms));
    let slowest: Vec<serde_json::Value> =
        slowest.iter().take(5).map(|(c, ms)| serde_json::json!({ "client": c, "node": LAYOUT[c % LAYOUT.len()].0, "ms": ms })).collect();
    summary.push("slowest_clients", slowest);
    summary.push("probe_resends", serde_json::to_value(&f.resends).expect("a map of counts"));
    summary.push("rooms_followed", f.rooms_followed);
    summary.push("follow_retries", f.follow_retries);
    summary.push("resent_found", f.resent_found);
    summary.push("appends_redone", f.appends_redone);
    summary.push("acked", f.acked);
    summary.push("acked_lost", f.lost);
    summary.push("duplicates", f.duplicates);
    Ok(summary)
}

/// The failover phase's figures.
#[derive(Default)]
struct Failover {
    clients: usize,
    /// Kill → the killed process reaped (its sockets closed).
    exit_ms: u64,
    /// The process reaped → its backup's state out of `normal` (as its admin API answers).
    detect_ms: u64,
    /// Per room of pair 2: kill → first probe acked after it.
    room_ms: Vec<u64>,
    /// The same for the rooms of pairs 1 and 3 (at most a probe interval plus latency when
    /// they are not disturbed).
    other_ms: Vec<u64>,
    client_ms: Vec<u64>,
    /// Probes sent again from the kill until every room was writable, by what failed them.
    resends: std::collections::BTreeMap<String, u64>,
    /// Rooms the other groups' nodes followed to 2b, and their joins sent again (the nodes'
    /// counters, summed, read when every room was writable).
    rooms_followed: u64,
    follow_retries: u64,
    /// Resent probes the stores found stored as they wrote (the sessions resumed), and
    /// batches redone after the unique key refused a resend (the nodes' counters, summed).
    resent_found: u64,
    appends_redone: u64,
    acked: usize,
    lost: u64,
    duplicates: u64,
}

/// Run both phases; returns the cluster's idle CPU (cores), the overhead runs and the failover.
async fn run(args: &ClusterArgs, target_args: &TargetArgs, shape: &Shape, dir: &std::path::Path, cluster: &mut Cluster) -> anyhow::Result<(f64, Vec<Run>, Option<Failover>)> {
    // The failover phase's rooms, inserted straight into their groups' stores before the
    // nodes start: pair 2's on 2a, then pair 1's on 1a and pair 3's on 3a.
    let prefix = format!("c{}-", super::rooms::run_tag());
    let homes = [(HOST, args.failover_rooms), (Cluster::index("1a"), args.other_rooms), (Cluster::index("3a"), args.other_rooms)];
    let mut rooms = Vec::new();
    if args.failover_rooms > 0 {
        for (n, count) in homes {
            let (id, group) = LAYOUT[n];
            super::rooms::fill_store_at(&cluster.stores[group], &format!("{prefix}{id}-"), count, 20_000, id, &service_of(id)).await?;
            rooms.extend((0..count).map(|i| format!("{prefix}{id}-{i}@{}", service_of(id))));
        }
    }

    let secret = format!("bench-secret-{}", super::rooms::run_tag());
    let mut tuning = Tuning { settings: vec![("rooms.passivate_after_ms", "86400000".into()), ("cluster.secret", format!("{secret:?}"))] };
    if target_args.store_connections.is_none() {
        // Six nodes share one PostgreSQL server (100 connections by default).
        tuning.settings.push(("store.max_connections", "8".into()));
    }
    cluster.start(dir, target_args, &tuning).await?;
    eprintln!("cluster: seven nodes up, every node sees every other");
    // The idle cluster's CPU (heartbeats, lease renewals), to tell the messages' own cost.
    let idle_cores = stats::measure_window(&cluster.pids(), Duration::from_secs(1), args.warmup.max(Duration::from_secs(2)), || cluster.check_alive()).await?.server.unwrap_or(0.0);
    eprintln!("cluster: idle, the seven nodes use {idle_cores:.3} cores");

    // 1. Forwarding overhead: the same load of pair 2's rooms from pair 1's nodes and from 2a.
    let service = service_of(LAYOUT[HOST].0);
    let forwarded = Servers { endpoints: vec![cluster.endpoint(0)?, cluster.endpoint(1)?], service: Some(service.clone()), pids: cluster.pids() };
    let local = Servers { endpoints: vec![cluster.endpoint(HOST)?], service: Some(service), pids: cluster.pids() };
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for fwd in order {
            let servers = if fwd { &forwarded } else { &local };
            let out = load::run_on(servers, shape, &mut || cluster.check_alive(), &mut || {}).await?;
            let run = Run::of(fwd, &out, idle_cores);
            eprintln!(
                "round {round} {}: {:.0} msg/s, e2e p50 {:.3} ms p99 {:.3} ms, {:.1} µs server CPU per message",
                if fwd { "forwarded" } else { "local" },
                run.msg_per_s,
                run.e2e_p50_ms,
                run.e2e_p99_ms,
                run.cpu_us_per_msg
            );
            runs.push(run);
        }
    }
    if args.failover_rooms == 0 {
        return Ok((idle_cores, runs, None));
    }

    // 2. Failover of pair 2 under load: clients on every node, round robin.
    let clients_n = args.clients.min(rooms.len());
    let urls: Vec<Vec<String>> = (0..clients_n).map(|c| cluster.urls_of(c % LAYOUT.len())).collect();
    let rooms = Arc::new(rooms);
    let probers = Probers::start(&urls, rooms.clone(), args.probe_interval).await?;
    let probes = probers.probes.clone();
    eprintln!("cluster: {clients_n} probers connected; kill -9 of 2a in {} ms", args.settle.as_millis());
    let phase = async {
        tokio::time::sleep(args.settle).await;
        // A line at the kill: a profiler or a log reader started from the bench's output
        // needs the moment (it follows the probers' connection and the settle).
        eprintln!("cluster: kill -9 of 2a now");
        let t0 = Instant::now();
        {
            let mut p = probes.lock().expect("probes lock");
            p.forget_before(t0 - Duration::from_secs(1));
            p.resends.clear();
        }
        if let Some(t) = cluster.targets[HOST].take() {
            t.stop().await;
        }
        // Until the process is gone its sockets stay open: the other nodes see its link drop
        // only then (the kernel frees a process's memory before it closes its files).
        let exited = t0.elapsed();
        probers.probe_now();
        let detect = cluster.await_state(BACKUP, LAYOUT[BACKUP].0, "out of normal", |s| s != "normal").await?;
        let (room_ms, client_ms) = await_all(&probes, t0, rooms.len(), Duration::from_secs(300)).await?;
        let resends = probes.lock().expect("probes lock").resends.clone();
        let follows = (cluster.metric_sum("stoa_forwarded_rooms_followed_total").await, cluster.metric_sum("stoa_forwarded_follow_retries_total").await);
        let resent = (cluster.metric_sum("stoa_store_resent_found_total").await, cluster.metric_sum("stoa_store_appends_redone_total").await);
        eprintln!(
            "kill -9 of 2a: gone after {} ms, detect {} ms after that, pair 2's rooms writable again p50 {} ms max {} ms (from the kill)",
            exited.as_millis(),
            detect.as_millis(),
            percentile(&room_ms[..args.failover_rooms], 0.5),
            room_ms[..args.failover_rooms].iter().max().unwrap_or(&0)
        );
        tokio::time::sleep(args.settle).await;
        anyhow::Ok((exited, detect, room_ms, client_ms, resends, follows, resent))
    }
    .await;
    let acked = probers.finish().await;
    let (exited, detect, mut room_ms, client_ms, resends, (rooms_followed, follow_retries), (resent_found, appends_redone)) = phase?;
    for t in cluster.targets.iter_mut() {
        if let Some(t) = t.take() {
            t.stop().await;
        }
    }
    // Every acked probe, looked up in its group's store.
    let (mut lost, mut duplicates, mut start) = (0, 0, 0);
    for (n, count) in homes {
        let range = start..start + count;
        let mine: Vec<(usize, String, u64)> = acked.iter().filter(|(r, _, _)| range.contains(r)).map(|(r, cid, seq)| (r - start, cid.clone(), *seq)).collect();
        let (l, d) = check_store(&cluster.stores[LAYOUT[n].1], &rooms[range.clone()], &mine).await?;
        (lost, duplicates, start) = (lost + l, duplicates + d, range.end);
    }
    let other_ms = room_ms.split_off(args.failover_rooms);
    let failover = Failover { clients: clients_n, exit_ms: exited.as_millis() as u64, detect_ms: detect.as_millis() as u64, room_ms, other_ms, client_ms, resends, rooms_followed, follow_retries, resent_found, appends_redone, acked: acked.len(), lost, duplicates };
    Ok((idle_cores, runs, Some(failover)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench runs the layout of `examples/cluster/`: the same groups, nodes, services and
    /// HA timings (the defaults, which the bench keeps), one store kind per group.
    #[test]
    fn the_bench_layout_is_the_example_cluster() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster");
        let defaults = crate::config::Settings::default().cluster;
        for (id, group) in LAYOUT {
            let s = crate::config::Settings::load(Some(&root.join(format!("{id}.toml")))).unwrap_or_else(|e| panic!("{id}.toml: {e:#}"));
            assert_eq!((s.node.id.as_str(), s.node.service.clone()), (id, service_of(id)));
            let groups: Vec<(&str, bool, Vec<&str>)> =
                s.cluster.groups.iter().map(|g| (g.name.as_str(), g.ha, g.nodes.iter().map(|n| n.id.as_str()).collect())).collect();
            let expected: Vec<(&str, bool, Vec<&str>)> =
                GROUPS.iter().enumerate().map(|(g, (name, ha))| (*name, *ha, LAYOUT.iter().filter(|(_, n)| *n == g).map(|(id, _)| *id).collect())).collect();
            assert_eq!(groups, expected, "{id}.toml");
            for n in s.cluster.groups.iter().flat_map(|g| &g.nodes) {
                assert_eq!(n.service, service_of(&n.id), "{id}.toml");
            }
            let c = &s.cluster;
            assert_eq!(
                (c.lease_ttl_ms, c.lease_renew_ms, c.heartbeat_ms, c.critical_service_down_delay_ms),
                (defaults.lease_ttl_ms, defaults.lease_renew_ms, defaults.heartbeat_ms, defaults.critical_service_down_delay_ms),
                "{id}.toml"
            );
            let store = s.store_url();
            assert_eq!(store.starts_with("postgres://"), GROUPS[group].1, "{id}.toml: {store}");
        }
    }
}
