//! Nodes for tests: in-process ones ([`TestNode`]), real `stoa serve` processes for kill -9
//! and signal tests ([`NodeProcess`]), one-shot `stoa` runs ([`run_stoa`]), and free ports for
//! configs that must name their listeners in advance.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use stoa::config::Settings;
use stoa::node::Node;

use super::DEADLINE;
use super::admin::{await_admin, http_get};
use super::client::Client;

/// A free loopback port for a listener a test must name in advance (a pair's configs name each
/// other's addresses). Taken *below* the kernel's ephemeral range (32768–60999 here): a port
/// from that range, released and bound again later, can meanwhile become the source port of an
/// outgoing connection (even a TCP self-connect of a node dialing a peer that is down), and
/// the bind then fails. Each call returns a different port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Start at a per-process offset so concurrent test binaries rarely meet.
    let _ = NEXT.compare_exchange(0, 20_000 + (std::process::id() % 1000) as u16 * 12, Ordering::Relaxed, Ordering::Relaxed);
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = if port >= 32_000 { 20_000 + port % 12_000 } else { port };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// An in-process node (stopped when dropped).
pub struct TestNode {
    node: Option<Node>,
    /// Its store: guests of one store resume with their tokens ([`Client::connect_guest`]).
    identity: String,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The XMPP c2s listener, when the settings turn it on.
    pub xmpp_addr: Option<SocketAddr>,
    /// The direct-TLS XMPP c2s listener (`xmpp.c2s_tls`), when the settings turn it on.
    pub xmpp_tls_addr: Option<SocketAddr>,
    pub token: Option<String>,
}

impl TestNode {
    /// Start a node with `settings` (start-up runs off the test's runtime threads).
    pub async fn start(settings: Settings) -> TestNode {
        let token = (!settings.auth.admin_token.is_empty()).then(|| settings.auth.admin_token.clone());
        let identity = settings.store_url();
        let node = tokio::task::spawn_blocking(move || Node::start(settings))
            .await
            .expect("node start-up task")
            .unwrap_or_else(|e| panic!("node failed to start: {e:#}"));
        TestNode {
            client_addr: node.client_addr,
            admin_addr: node.admin_addr,
            xmpp_addr: node.xmpp_addr,
            xmpp_tls_addr: node.xmpp_tls_addr,
            node: Some(node),
            token,
            identity,
        }
    }

    /// Stop the node and wait until it has shut down.
    pub async fn stop(mut self) {
        if let Some(node) = self.node.take() {
            tokio::task::spawn_blocking(move || node.stop()).await.expect("node stop task").expect("node stops cleanly");
        }
    }

    /// A logged-in guest client: guest `user` of this node's store (the same guest every time).
    pub async fn client(&self, user: &str) -> Client {
        Client::connect_guest(self.client_addr, user, &self.identity).await
    }

    /// GET an admin path (with the node's admin token, if any) and parse the JSON answer.
    pub async fn admin_json(&self, path: &str) -> Value {
        let (status, body) = http_get(self.admin_addr, path, self.token.as_deref()).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {body}"))
    }

    /// Poll `/api/node` until `pred` holds, or fail after [`DEADLINE`].
    pub async fn await_node_state(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        await_admin(self.admin_addr, self.token.as_deref(), "/api/node", what, pred).await
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            // Node's own Drop cancels and joins its thread.
            drop(node);
        }
    }
}

/// A real `stoa serve` process. Killed (SIGKILL) when dropped; its log is printed if the test
/// is failing.
pub struct NodeProcess {
    child: Child,
    /// Its store URL, as for [`TestNode`].
    identity: String,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    label: String,
}

impl NodeProcess {
    /// Run `stoa serve --config config` and wait until it logs its listening addresses.
    pub async fn start(config: &Path, label: &str) -> NodeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stoa"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .env("STOA_LOG", "info,sqlx=warn,sea_orm=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the stoa binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addrs) = parse_listening(&line)
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(addrs);
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        let config_text = std::fs::read_to_string(config).unwrap_or_default();
        let identity = config_text
            .lines()
            .find_map(|l| l.trim().strip_prefix("url = \"").and_then(|u| u.strip_suffix('"')))
            .unwrap_or_default()
            .to_owned();
        let mut process = NodeProcess {
            identity,
            child,
            client_addr: "0.0.0.0:0".parse().expect("literal"),
            admin_addr: "0.0.0.0:0".parse().expect("literal"),
            log,
            label: label.into(),
        };
        match tokio::time::timeout(DEADLINE, ready_rx).await {
            Ok(Ok((client, admin))) => {
                process.client_addr = client;
                process.admin_addr = admin;
                process
            }
            _ => {
                let status = process.child.try_wait().ok().flatten();
                panic!("stoa process {label} did not report listening addresses (exit: {status:?}):\n{}", process.log_text());
            }
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// The last line of the log containing `text`, once one is there (the log comes through a
    /// pipe and may trail what the process did); `None` if none came within `within`.
    pub async fn log_line(&self, text: &str, within: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(line) = self.log.lock().expect("log lock").iter().rfind(|l| l.contains(text)) {
                return Some(line.clone());
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // polling interval, not a wait
        }
    }

    /// The process id (for SIGSTOP / SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and wait (up to [`DEADLINE`]) until it has exited: a clean stop that closes its
    /// store connections and releases its lease.
    pub async fn stop(&mut self) {
        // SAFETY: signalling a child process this harness started and still owns.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + DEADLINE;
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(std::time::Instant::now() < deadline, "stoa process {} did not stop on SIGTERM:\n{}", self.label, self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A logged-in guest client: guest `user` of this node's store (the same guest every time).
    pub async fn client(&self, user: &str) -> Client {
        Client::connect_guest(self.client_addr, user, &self.identity).await
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // Whether it was still running tells a crash (or a signal's default action) from a hang.
        let exited = self.child.try_wait().ok().flatten();
        self.kill();
        if std::thread::panicking() {
            let state = exited.map_or("still running when the test ended".to_owned(), |s| format!("had exited: {s}"));
            eprintln!("---- log of stoa process {} ({state}) ----\n{}\n---- end of log ----", self.label, self.log_text());
        }
    }
}

/// The addresses in the node's "listening: clients at ws://A/ws, admin at http://B/" line.
pub fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let after = |marker: &str, end: char| -> Option<SocketAddr> {
        let rest = &line[line.find(marker)? + marker.len()..];
        rest[..rest.find(end)?].parse().ok()
    };
    // `wss://` and `https://` when the node has [tls].
    let client = after("clients at ws://", '/').or_else(|| after("clients at wss://", '/'))?;
    Some((client, after("admin at http://", '/').or_else(|| after("admin at https://", '/'))?))
}

/// Run `stoa ARGS` to completion; returns (success, combined output).
pub async fn run_stoa(args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(args)
        .env("NO_COLOR", "1")
        .env("STOA_LOG", "info,sqlx=warn,sea_orm=warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap_or_else(|_| panic!("stoa {args:?} did not finish in 60 s"))
        .expect("running the stoa binary");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}
