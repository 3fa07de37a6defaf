//! Process integration (issue 9): systemd `Type=notify` (READY, STATUS, WATCHDOG, STOPPING),
//! the log file that SIGHUP reopens, and the `process_*` metrics, on real `stoa serve`
//! processes.

use crate::harness::{Client, DEADLINE, NodeProcess, TestDb, http_get, parse_listening, room};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::UnixDatagram;
use tokio::time::Instant;

/// A `stoa serve` process started with extra environment variables, its stderr kept (and
/// printed if the test fails). Killed when dropped.
struct Serve {
    child: tokio::process::Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Serve {
    fn start(config: &Path, env: &[(&str, &str)]) -> Serve {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"));
        command
            .args(["serve", "--config"])
            .arg(config)
            .env("NO_COLOR", "1")
            .env("STOA_LOG", "info,sqlx=warn,sea_orm=warn")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawning stoa serve");
        let mut pipe = child.stderr.take().expect("piped stderr");
        let stderr: Arc<Mutex<String>> = Arc::default();
        let sink = stderr.clone();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Serve { child, stderr, reader: Some(reader) }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("the process is running") as i32;
        // SAFETY: signalling a child process this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill({pid}, {signal})");
    }

    /// Wait for the process to exit (after a signal); asserts a clean exit. Returns its stderr.
    async fn exits_cleanly(&mut self) -> String {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("stoa serve did not exit in time; stderr:\n{}", self.stderr()))
            .expect("wait");
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(DEADLINE, reader).await;
        }
        assert!(status.success(), "stoa serve exits cleanly: {status:?}; stderr:\n{}", self.stderr());
        self.stderr()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- stderr of stoa serve ----\n{}\n---- end ----", self.stderr());
        }
    }
}

/// A notify socket like systemd's: a Unix datagram socket the node sends its states to.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every datagram received so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        NotifySocket { socket, path, seen: Vec::new() }
    }

    /// The next datagram whose lines include `line`, or a panic listing what came instead.
    async fn wait_for(&mut self, line: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                Ok(n) => n.expect("receiving on the notify socket"),
                Err(_) => panic!("no {line} on the notify socket in time; received: {:?}", self.seen),
            };
            let datagram = String::from_utf8(buf[..n].to_vec()).expect("notify datagrams are text");
            self.seen.push(datagram.clone());
            if datagram.lines().any(|l| l == line) {
                return datagram;
            }
        }
    }
}

impl NotifySocket {
    /// Take every datagram already queued, without waiting.
    fn drain(&mut self) {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = self.socket.try_recv(&mut buf) {
            self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// Receive for `period`, failing if a datagram has `line`.
    async fn none_for(&mut self, period: Duration, line: &str) {
        let until = Instant::now() + period;
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = tokio::time::timeout_at(until, self.socket.recv(&mut buf)).await {
            let datagram = String::from_utf8_lossy(&buf[..n.expect("receiving on the notify socket")]).into_owned();
            assert!(!datagram.lines().any(|l| l == line), "unexpected {line}: {datagram:?}");
            self.seen.push(datagram);
        }
    }
}

/// The `STATUS=` line of a datagram.
fn status(datagram: &str) -> &str {
    datagram.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_else(|| panic!("no STATUS= in {datagram:?}"))
}

/// Under systemd (`NOTIFY_SOCKET`, `WATCHDOG_USEC`): the first datagram is `READY=1`, sent when
/// the node already serves (its `STATUS=` names the client listener, and a client gets a
/// message committed there at once); then `WATCHDOG=1` every half `WATCHDOG_USEC` with the
/// node's figures as `STATUS=`; on SIGTERM `STOPPING=1`, and the process exits cleanly.
pub async fn under_systemd_the_node_notifies_ready_watchdog_and_stopping(db: &TestDb) {
    let mut notify = NotifySocket::bind(db.dir());
    let config = db.write_config("sd1", "");
    let socket = notify.path.display().to_string();
    let mut node = Serve::start(&config, &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")]);

    let ready = notify.wait_for("READY=1").await;
    assert_eq!(notify.seen.len(), 1, "READY=1 comes first: {:?}", notify.seen);
    let client_addr = status(&ready)
        .split_once("clients at ws://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .and_then(|(addr, _)| addr.parse().ok())
        .unwrap_or_else(|| panic!("READY's STATUS names the client listener: {ready:?}"));
    // It serves right away: a client connects, creates a room and gets a message committed.
    let mut ann = Client::connect(client_addr, "ann").await;
    let r = room("systemd");
    ann.create(&r, json!({})).await;
    ann.join(&r, "ann").await;
    assert_eq!(ann.send_acked(&r, "ready means serving", "c1").await, 1);

    // Pings sent meanwhile are queued: measure the cadence on fresh ones.
    notify.drain();
    notify.wait_for("WATCHDOG=1").await;
    let first = Instant::now();
    let mut last = String::new();
    for _ in 0..3 {
        last = notify.wait_for("WATCHDOG=1").await;
    }
    // Three intervals of 200 ms (half of 400 ms), give or take a slow tick.
    let three = first.elapsed();
    assert!(three >= Duration::from_millis(450), "pings every WATCHDOG_USEC/2, not faster: 3 in {three:?}");
    assert!(status(&last).contains("1 connections, 1 active rooms"), "the pings' STATUS has the node's figures: {last:?}");

    node.signal(libc::SIGTERM);
    let stopping = notify.wait_for("STOPPING=1").await;
    assert!(status(&stopping).starts_with("stopping"), "{stopping:?}");
    node.exits_cleanly().await;
    let readies = notify.seen.iter().filter(|d| d.lines().any(|l| l == "READY=1")).count();
    assert_eq!(readies, 1, "READY=1 once: {:?}", notify.seen);
}

/// With `NOTIFY_SOCKET` but no `WatchdogSec=` (no `WATCHDOG_USEC`, or one meant for another
/// process: `WATCHDOG_PID`), the node sends `READY=1` and `STOPPING=1` and no watchdog ping.
pub async fn without_watchdog_sec_the_node_sends_no_pings(db: &TestDb) {
    for (i, env) in [vec![], vec![("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")]].into_iter().enumerate() {
        let dir = db.dir().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut notify = NotifySocket::bind(&dir);
        let config = db.write_config("sd2", "");
        let socket = notify.path.display().to_string();
        let mut all = vec![("NOTIFY_SOCKET", socket.as_str())];
        all.extend(env.iter().copied());
        let mut node = Serve::start(&config, &all);
        notify.wait_for("READY=1").await;
        // Ten intervals of the 100 ms a watchdog would ping at.
        notify.none_for(Duration::from_secs(1), "WATCHDOG=1").await;
        node.signal(libc::SIGTERM);
        notify.wait_for("STOPPING=1").await;
        node.exits_cleanly().await;
        assert!(!notify.seen.iter().any(|d| d.contains("WATCHDOG=1")), "no pings with {env:?}: {:?}", notify.seen);
    }
}

/// Poll `path` until its text satisfies `pred` (or fail after [`DEADLINE`]); returns the text.
async fn await_file(path: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what} in {}; it has:\n{text}", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval, not a wait
    }
}

/// `[log] file = …`: the node logs there instead of stderr; after the file is renamed (logrotate's
/// `create` style) the node keeps writing to the renamed file until SIGHUP, then writes to a
/// new file at the configured path, and keeps serving.
pub async fn sighup_reopens_the_log_file_after_rotation(db: &TestDb) {
    let log = db.dir().join("stoa.log");
    let config = db.write_config("log1", "");
    let text = std::fs::read_to_string(&config).unwrap();
    let with_file = text.replacen("[log]\n", &format!("[log]\nfile = \"{}\"\n", log.display()), 1);
    assert_ne!(text, with_file, "the harness config has a [log] table");
    std::fs::write(&config, with_file).unwrap();
    let mut node = Serve::start(&config, &[]);

    let before = await_file(&log, "the listening line", |t| t.lines().any(|l| parse_listening(l).is_some())).await;
    let (client_addr, _) = before.lines().find_map(parse_listening).expect("checked above");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o007, 0, "the log is not world-readable");

    let rotated = db.dir().join("stoa.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    node.signal(libc::SIGHUP);
    // What SIGHUP does after the reopen (the TLS step) is logged to the new file too.
    await_file(&log, "the reopen and TLS lines", |t| t.contains("SIGHUP: log file reopened") && t.contains("no [tls] configured")).await;

    // Still serving, and logging to the new file.
    let mut ann = Client::connect(client_addr, "ann").await;
    ann.create(&room("rotated"), json!({})).await;
    node.signal(libc::SIGTERM);
    let stderr = node.exits_cleanly().await;
    let new = std::fs::read_to_string(&log).unwrap();
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(new.contains("node stopped"), "lines after the reopen go to the new file:\n{new}");
    assert!(old.lines().any(|l| parse_listening(l).is_some()), "lines before it stay in the rotated one:\n{old}");
    assert!(!old.contains("SIGHUP") && !old.contains("node stopped"), "nothing after the reopen goes to the rotated file:\n{old}");
    assert!(!stderr.contains("listening"), "with log.file nothing is logged to stderr:\n{stderr}");
}

/// The value of an unlabelled metric in Prometheus text, after checking its `# HELP` line.
fn metric(text: &str, name: &str) -> f64 {
    assert!(text.lines().any(|l| l.starts_with(&format!("# HELP {name} "))), "/metrics has no HELP for {name}:\n{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no value for {name}:\n{text}"))
}

/// `/metrics` has the standard process metrics of the node's own process: CPU seconds, resident
/// memory, open file descriptors (which grow with client connections) and start time.
pub async fn metrics_report_the_process_cpu_memory_fds_and_start_time(db: &TestDb) {
    let spawned_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let config = db.write_config("pm1", "");
    let node = NodeProcess::start(&config, "pm1").await;
    let scrape = || async { http_get(node.admin_addr, "/metrics", None).await };
    let (status, before) = scrape().await;
    assert_eq!(status, 200, "{before}");

    let start = metric(&before, "process_start_time_seconds");
    assert!(start >= spawned_at.floor() - 1.0 && start <= spawned_at + DEADLINE.as_secs_f64(), "start time {start}, spawned at {spawned_at}");
    assert!(metric(&before, "process_resident_memory_bytes") > 1e6, "{before}");
    // Whole seconds (the `metrics` crate's counters are integers): a node just started may be at 0.
    let cpu = metric(&before, "process_cpu_seconds_total");
    assert!(cpu >= 0.0 && cpu <= 2.0 * DEADLINE.as_secs_f64(), "{cpu}");
    assert!(before.contains("# TYPE process_cpu_seconds_total counter"), "{before}");
    let fds = metric(&before, "process_open_fds");

    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(Client::connect(node.client_addr, &format!("u{i}")).await);
    }
    let (_, after) = scrape().await;
    let more = metric(&after, "process_open_fds");
    assert!(more >= fds + 10.0, "10 more connections, 10 more fds: {fds} then {more}");
    drop(clients);
}
