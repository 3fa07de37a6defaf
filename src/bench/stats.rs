//! Measurements without shared hot state: every worker thread records into its own histograms
//! (a mutex only that thread takes, until the merge at the end), and only what happens inside
//! the measured window counts.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Highest latency a histogram records: 120 s, in microseconds (longer ones saturate).
const MAX_LATENCY_US: u64 = 120_000_000;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the process's shared time base: what a message body carries.
pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// The measured window `[start, end)` in [`now_ns`] time; empty until [`set_window`].
static WINDOW_START: AtomicU64 = AtomicU64::new(u64::MAX);
static WINDOW_END: AtomicU64 = AtomicU64::new(u64::MAX);

/// Count what happens in `[start_ns, end_ns)` from now on.
pub fn set_window(start_ns: u64, end_ns: u64) {
    WINDOW_END.store(end_ns, Ordering::Relaxed);
    WINDOW_START.store(start_ns, Ordering::Relaxed);
}

/// True when `now_ns` falls in the measured window.
pub fn in_window(now_ns: u64) -> bool {
    now_ns >= WINDOW_START.load(Ordering::Relaxed) && now_ns < WINDOW_END.load(Ordering::Relaxed)
}

/// The window's end (`u64::MAX` until set).
pub fn window_end() -> u64 {
    WINDOW_END.load(Ordering::Relaxed)
}

/// What one thread (or, merged, the whole generator) measured.
pub struct Stats {
    /// `send` → `ack`, microseconds.
    pub ack: Histogram<u64>,
    /// `send` → `message` at an occupant, microseconds.
    pub e2e: Histogram<u64>,
    /// Acks of new (non-duplicate) messages.
    pub acks: u64,
    /// `message` frames received.
    pub deliveries: u64,
    /// `send` frames written.
    pub sent: u64,
    /// Due sends skipped because the window of unacked sends was full (fixed-rate runs).
    pub skipped: u64,
    /// Errors by protocol code (or `disconnected`).
    pub errors: BTreeMap<String, u64>,
}

impl Stats {
    fn new() -> Stats {
        let h = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds");
        Stats { ack: h(), e2e: h(), acks: 0, deliveries: 0, sent: 0, skipped: 0, errors: BTreeMap::new() }
    }

    fn reset(&mut self) {
        self.ack.reset();
        self.e2e.reset();
        self.acks = 0;
        self.deliveries = 0;
        self.sent = 0;
        self.skipped = 0;
        self.errors.clear();
    }

    fn merge(&mut self, other: &Stats) {
        self.ack.add(&other.ack).expect("same histogram bounds");
        self.e2e.add(&other.e2e).expect("same histogram bounds");
        self.acks += other.acks;
        self.deliveries += other.deliveries;
        self.sent += other.sent;
        self.skipped += other.skipped;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    /// A percentile in milliseconds.
    pub fn ms(h: &Histogram<u64>, quantile: f64) -> f64 {
        if h.is_empty() { 0.0 } else { h.value_at_quantile(quantile) as f64 / 1000.0 }
    }
}

fn registry() -> &'static Mutex<Vec<Arc<Mutex<Stats>>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Arc<Mutex<Stats>>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

thread_local! {
    static LOCAL: Arc<Mutex<Stats>> = {
        let s = Arc::new(Mutex::new(Stats::new()));
        registry().lock().expect("stats registry").push(s.clone());
        s
    };
}

fn with_local(f: impl FnOnce(&mut Stats)) {
    LOCAL.with(|s| f(&mut s.lock().expect("thread stats")));
}

/// A `message` received at `now`, sent at `sent_ns`.
pub fn delivery(now: u64, sent_ns: Option<u64>) {
    if in_window(now) {
        with_local(|s| {
            s.deliveries += 1;
            if let Some(sent) = sent_ns {
                s.e2e.saturating_record(now.saturating_sub(sent) / 1000);
            }
        });
    }
}

/// An `ack` received at `now` for a send at `sent_ns`.
pub fn ack(now: u64, sent_ns: u64, duplicate: bool) {
    if in_window(now) {
        with_local(|s| {
            if !duplicate {
                s.acks += 1;
            }
            s.ack.saturating_record(now.saturating_sub(sent_ns) / 1000);
        });
    }
}

/// `n` sends written at `now`.
pub fn sent(now: u64, n: u64) {
    if in_window(now) {
        with_local(|s| s.sent += n);
    }
}

/// `n` due sends skipped at `now` (window full).
pub fn skipped(now: u64, n: u64) {
    if in_window(now) {
        with_local(|s| s.skipped += n);
    }
}

/// An error, counted whenever it happens (errors matter outside the window too).
pub fn error(code: &str) {
    with_local(|s| *s.errors.entry(code.to_owned()).or_default() += 1);
}

/// Forget everything recorded so far and close the window (before a new run).
pub fn reset() {
    WINDOW_START.store(u64::MAX, Ordering::Relaxed);
    WINDOW_END.store(u64::MAX, Ordering::Relaxed);
    for s in registry().lock().expect("stats registry").iter() {
        s.lock().expect("thread stats").reset();
    }
}

/// Every thread's measurements merged.
pub fn collect() -> Stats {
    let mut total = Stats::new();
    for s in registry().lock().expect("stats registry").iter() {
        total.merge(&s.lock().expect("thread stats"));
    }
    total
}

/// Wait out `warmup` (plus 10 ms), then measure the CPU of the server processes `pids` (summed)
/// over `duration`, checking every 500 ms that they are still alive (`alive` fails the run if not).
pub async fn measure_window(pids: &[u32], warmup: std::time::Duration, duration: std::time::Duration, mut alive: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<CpuCores> {
    let mut alive_check = tokio::time::interval(std::time::Duration::from_millis(500));
    let measure_from = tokio::time::Instant::now() + warmup + std::time::Duration::from_millis(10);
    let end = measure_from + duration;
    let mut cpu_start = None;
    loop {
        let phase_end = if cpu_start.is_none() { measure_from } else { end };
        tokio::select! {
            _ = tokio::time::sleep_until(phase_end) => {
                if cpu_start.is_none() {
                    cpu_start = Some(CpuSnapshot::take(pids));
                } else {
                    break;
                }
            }
            _ = alive_check.tick() => alive()?,
        }
    }
    let cpu_end = CpuSnapshot::take(pids);
    Ok(cpu_start.expect("taken at the window start").cores_until(&cpu_end, duration.as_secs_f64()))
}

/// CPU time used so far by the whole machine (busy, all cores), the server (the sum over its
/// processes: one, or a cluster's nodes) and this process,
/// in seconds: two snapshots give who used how many cores during the measured window, which
/// says whether the figure was CPU-bound and whether anything else was running.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSnapshot {
    pub machine_busy_s: f64,
    pub server_s: Option<f64>,
    pub bench_s: f64,
    /// Every local database server process (postgres, mariadbd, mysqld).
    pub db_s: f64,
}

impl CpuSnapshot {
    pub fn take(server_pids: &[u32]) -> CpuSnapshot {
        // SAFETY: sysconf has no preconditions.
        let tick = (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64;
        let machine_busy_s = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_owned();
                let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal: busy = all - idle - iowait.
                let all: f64 = v.iter().take(8).sum();
                Some((all - v.get(3)? - v.get(4).copied().unwrap_or(0.0)) / tick)
            })
            .unwrap_or(0.0);
        let proc_s = |path: String| -> Option<f64> {
            let s = std::fs::read_to_string(path).ok()?;
            // Fields after the parenthesised command name: utime is the 12th, stime the 13th.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick)
        };
        let mut db_s = 0.0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if matches!(comm.trim(), "postgres" | "mariadbd" | "mysqld") {
                db_s += proc_s(format!("/proc/{pid}/stat")).unwrap_or(0.0);
            }
        }
        CpuSnapshot {
            machine_busy_s,
            // None when a process is unknown or gone (its time is no longer countable).
            server_s: if server_pids.is_empty() { None } else { server_pids.iter().map(|p| proc_s(format!("/proc/{p}/stat"))).sum() },
            bench_s: proc_s("/proc/self/stat".into()).unwrap_or(0.0),
            db_s,
        }
    }

    /// Cores used between `self` and `later` over `secs`.
    pub fn cores_until(&self, later: &CpuSnapshot, secs: f64) -> CpuCores {
        let server = match (self.server_s, later.server_s) {
            (Some(a), Some(b)) => Some((b - a) / secs),
            _ => None,
        };
        let bench = (later.bench_s - self.bench_s) / secs;
        // A database process that exited in between makes the difference meaningless.
        let db = ((later.db_s - self.db_s) / secs).max(0.0);
        let machine = (later.machine_busy_s - self.machine_busy_s) / secs;
        CpuCores { server, bench, db, other: (machine - bench - db - server.unwrap_or(0.0)).max(0.0) }
    }
}

/// Cores used during a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuCores {
    /// The server under test (when its pid is known).
    pub server: Option<f64>,
    /// This load generator.
    pub bench: f64,
    /// Local database servers.
    pub db: f64,
    /// Everything else on the machine (other work sharing it).
    pub other: f64,
}
