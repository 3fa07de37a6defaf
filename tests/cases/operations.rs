//! Operations (issue 9): the node always stops and never breaks for reasons outside it.

use crate::harness::{DEADLINE, TestDb};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Issue 9, bug 1: a node whose stderr reader has gone (`stoa serve 2>&1 | cat`, then the
/// `cat` dies) keeps serving, and stops on SIGTERM. A failed log write used to panic every
/// task that logged, the signal handler among them, so the node ignored SIGTERM and dropped
/// clients as slow consumers.
pub async fn a_node_whose_log_reader_has_gone_serves_and_stops_on_sigterm(db: &TestDb) {
    let config = db.write_config("n1", "");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("STOA_LOG", "debug,sqlx=warn,sea_orm=warn") // plenty of log lines to fail
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning stoa serve");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let (client_addr, _admin) = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addrs) = crate::harness::parse_listening(&line) {
                return addrs;
            }
        }
        panic!("stoa serve ended before it listened");
    })
    .await
    .expect("the node listens in time");
    drop(lines); // the log's reader is gone: every later log write fails with EPIPE

    let mut ann = crate::harness::Client::connect(client_addr, "ann").await;
    let r = crate::harness::room("nolog");
    ann.create(&r, serde_json::json!({})).await;
    ann.join(&r, "ann").await;
    ann.send_acked(&r, "still served", "c1").await;

    let pid = child.id().expect("running") as i32;
    // SAFETY: signalling a child process this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("the node stops on SIGTERM").expect("wait");
    assert!(status.success(), "the node exits cleanly: {status:?}");
}

/// Issue 9, bug 5: `/health` is liveness and stays 200 on a node that refuses clients;
/// `/ready` answers 503 (with why) while the node's `router` service is stopped, and 200
/// again once it runs; `/metrics` has the HA state and the peer's reachability as gauges.
pub async fn ready_is_not_health(db: &TestDb) {
    use crate::cases::ha::pair_settings;
    use crate::harness::{TestNode, await_admin, free_port, http_get};
    let links = (free_port(), free_port());
    let a = TestNode::start(pair_settings(db, "1a", links)).await;
    let b = TestNode::start(pair_settings(db, "1b", links)).await;
    await_admin(a.admin_addr, None, "/api/topology", "1a to see 1b", |t| t["peer"]["reachable"] == true).await;
    let (status, body) = http_get(a.admin_addr, "/ready", None).await;
    assert_eq!(status, 200, "{body}");

    let post = |path: &'static str| async move { stoa::admin_client::request(&a.admin_addr.to_string(), "POST", path, None, DEADLINE).await.unwrap() };
    assert_eq!(post("/api/nodes/1a/services/router/stop").await.status, 200);
    let (status, body) = http_get(a.admin_addr, "/ready", None).await;
    assert_eq!(status, 503, "a node that refuses clients is not ready: {body}");
    assert!(body.contains("\"accepting_clients\":false"), "{body}");
    assert_eq!(http_get(a.admin_addr, "/health", None).await.0, 200, "but it is alive");
    assert_eq!(post("/api/nodes/1a/services/router/start").await.status, 200);
    let (status, body) = http_get(a.admin_addr, "/ready", None).await;
    assert_eq!(status, 200, "{body}");

    let metrics = http_get(a.admin_addr, "/metrics", None).await.1;
    assert!(metrics.lines().any(|l| l.starts_with("stoa_ha_state{state=\"normal\"} 1")), "{metrics}");
    assert!(metrics.lines().any(|l| l == "stoa_peer_reachable 1"), "{metrics}");
    drop(b);
}

/// An operator looks at a pair while its store is busy (a takeover's fence and bulk load keep
/// it so for about a second): `GET /api/nodes/{node}`, `/api/topology` and `stoa admin status`
/// answer within the store wait (250 ms, not the store's time), with the live state and
/// `store_busy`, and without the store's figures; polling them does not pile up reads on the
/// store (at most 4 in flight); once the store answers, the figures are back. The store is
/// made busy by another connection holding a lock on `rooms`.
pub async fn admin_views_answer_while_the_store_is_busy(db: &TestDb) {
    use crate::cases::ha::pair_settings;
    use crate::harness::{TestNode, await_admin, free_port};
    use sqlx::Connection as _;
    let links = (free_port(), free_port());
    let a = TestNode::start(pair_settings(db, "1a", links)).await;
    let b = TestNode::start(pair_settings(db, "1b", links)).await;
    await_admin(a.admin_addr, None, "/api/topology", "1a to see 1b", |t| t["peer"]["reachable"] == true).await;
    let quiet = a.admin_json("/api/nodes/1a").await;
    assert_eq!((quiet["store_busy"].as_bool(), quiet["state"].as_str()), (Some(false), Some("normal")), "{quiet}");
    assert!(quiet["rooms_hosted"].is_u64(), "a store that answers gives the rooms hosted: {quiet}");

    let mut lock = sqlx::PgConnection::connect(&db.url).await.expect("a connection of the test's own");
    sqlx::raw_sql("BEGIN; LOCK TABLE rooms IN ACCESS EXCLUSIVE MODE").execute(&mut lock).await.expect("locking rooms");
    for path in ["/api/nodes/1a", "/api/topology"] {
        let started = std::time::Instant::now();
        let answer = stoa::admin_client::request(&a.admin_addr.to_string(), "GET", path, None, DEADLINE).await.expect("the admin API answers");
        let took = started.elapsed();
        let view = answer.json();
        assert!(took < std::time::Duration::from_secs(2), "GET {path} waited for the store: {took:?}");
        assert_eq!(view["store_busy"], true, "GET {path}: {view}");
        let me = if path == "/api/topology" { view["groups"][0]["nodes"][0].clone() } else { view.clone() };
        assert_eq!((me["id"].as_str(), me["state"].as_str()), (Some("1a"), Some("normal")), "the state is live: {view}");
        assert!(me["rooms_hosted"].is_null(), "no figure from a busy store: {view}");
    }
    let (ok, out) = crate::harness::run_stoa(&["admin", "--admin", &a.admin_addr.to_string(), "status"]).await;
    assert!(ok && out.contains("store busy"), "{out}");
    // Someone polling meanwhile: the reads the views gave up on wait for the lock, each on a
    // pool connection, but no more than 4 of them (the pool has 16; the same query of each
    // node's recovery manager, one at a time, may wait beside them).
    for _ in 0..10 {
        assert_eq!(a.admin_json("/api/nodes/1a").await["store_busy"], true);
    }
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'SELECT COUNT(*) FROM rooms WHERE host_node%'")
        .fetch_one(&mut lock)
        .await
        .expect("pg_stat_activity");
    assert!((1..=4 + 2).contains(&waiting), "the views' reads waiting for the store: {waiting}");
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.expect("releasing rooms");

    // The reads given up on finish as the lock goes, and may still hold their slots for the
    // first poll after it (seen once: `store_busy` one poll longer): poll until the store answers.
    let again = await_admin(a.admin_addr, None, "/api/nodes/1a", "the store's figures back", |v| v["store_busy"] == false).await;
    assert!(again["rooms_hosted"].is_u64(), "{again}");
    drop(b);
}
