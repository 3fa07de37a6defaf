//! The admin HTTP API and start-up migrations.

use crate::harness::*;
use serde_json::{Value, json};
use stoa::store::Store;

/// `/health` answers 200 without a token; `/api/node`, `/api/rooms`, `/api/rooms/{room}` and
/// `/metrics` need the bearer token when one is set (401 without it) and report the node,
/// rooms with their occupant counts and log positions, and the documented metrics.
pub async fn admin_api_reports_health_rooms_and_metrics(db: &TestDb) {
    let mut settings = db.settings("adm1");
    settings.auth.admin_token = "t0k3n-for-tests".into();
    let node = TestNode::start(settings).await;
    let admin = node.admin_addr;

    let (status, body) = http_get(admin, "/health", None).await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).expect("health JSON");
    assert_eq!(health["status"], "ok", "{health}");
    for path in ["/api/node", "/api/rooms", "/metrics", &format!("/api/rooms/{}", room("x"))] {
        let (status, body) = http_get(admin, path, None).await;
        assert_eq!(status, 401, "GET {path} without a token: {body}");
        let (status, _) = http_get(admin, path, Some("not-the-token")).await;
        assert_eq!(status, 401, "GET {path} with a wrong token");
    }

    let r = room("lobby");
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    ann.create(&r, json!({"subject": "welcome"})).await;
    ann.create(&room("quiet"), json!({"public": false})).await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;
    for i in 0..3 {
        ann.send_acked(&r, "hi", &format!("m{i}")).await;
    }
    bob.send_text("not json").await;
    bob.wait_for("the bad_request", |f| f["op"] == "error").await;

    let info = node.admin_json("/api/node").await;
    assert_eq!(info["node"], "adm1", "{info}");
    assert_eq!(info["service"], SERVICE, "{info}");
    assert_eq!(info["active_rooms"], 1, "{info}");
    assert!(info["connections"].as_u64() >= Some(2), "{info}");
    assert!(["sqlite", "postgres", "mysql"].contains(&info["store"].as_str().unwrap_or("")), "{info}");

    let rooms = node.admin_json("/api/rooms").await;
    assert_eq!(rooms["total"], 2, "{rooms}");
    let list = rooms["rooms"].as_array().expect("rooms array");
    let lobby = list.iter().find(|x| x["room"] == r.as_str()).unwrap_or_else(|| panic!("{r} not listed: {rooms}"));
    assert_eq!((lobby["occupants"].as_u64(), lobby["last_seq"].as_u64(), lobby["active"].as_bool()), (Some(2), Some(3), Some(true)), "{lobby}");
    assert_eq!(lobby["host_node"], "adm1");
    let quiet = list.iter().find(|x| x["room"] == room("quiet").as_str()).expect("the quiet room is listed");
    assert_eq!((quiet["occupants"].as_u64(), quiet["active"].as_bool(), quiet["public"].as_bool()), (Some(0), Some(false), Some(false)), "{quiet}");

    let detail = node.admin_json(&format!("/api/rooms/{r}")).await;
    assert_eq!(detail["last_seq"], 3, "{detail}");
    assert_eq!(detail["live"]["occupants"], 2, "{detail}");
    assert_eq!(detail["config"]["subject"], "welcome", "{detail}");
    assert_eq!(detail["affiliations"][&ann.user], "owner", "{detail}");
    let (status, _) = http_get(admin, &format!("/api/rooms/{}", room("ghost")), node.token.as_deref()).await;
    assert_eq!(status, 404);

    let (status, metrics) = http_get(admin, "/metrics", node.token.as_deref()).await;
    assert_eq!(status, 200);
    for name in [
        "stoa_messages_committed_total",
        "stoa_connections",
        "stoa_rooms_active",
        "stoa_commit_batch_rows",
        "stoa_commit_seconds",
        "stoa_errors_total",
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(name)), "/metrics has no {name}:\n{metrics}");
        assert!(metrics.lines().any(|l| l.starts_with(&format!("# HELP {name} "))), "/metrics has no HELP for {name}");
    }
    // Issue 9: the build is in the metrics.
    assert!(metrics.lines().any(|l| l.starts_with("stoa_build_info{version=") && l.ends_with(" 1")), "{metrics}");
    assert!(metrics.contains("code=\"bad_request\""), "stoa_errors_total is labelled by code");
}

/// Two processes migrating one fresh database at once both succeed (the migration lock
/// serializes them), in-process through `Store::migrate` and as two `stoa migrate` processes,
/// and the schema they leave works.
pub async fn concurrent_migrations_both_succeed(db: &TestDb) {
    let migrate = |url: String| async move {
        let store = Store::connect(&url, 2, "full").await.map_err(|e| format!("connect: {e}"))?;
        store.migrate().await.map_err(|e| format!("migrate: {e}"))?;
        store.count_rooms().await.map_err(|e| format!("schema unusable: {e}"))
    };
    let (a, b) = tokio::join!(migrate(db.url.clone()), migrate(db.url.clone()));
    assert_eq!(a, Ok(0), "first concurrent migration");
    assert_eq!(b, Ok(0), "second concurrent migration");
    assert_eq!(migrate(db.url.clone()).await, Ok(0), "migrating an up-to-date schema is a no-op");

    let fresh = TestDb::new(db.backend, "migrate_cli").await;
    let config = fresh.write_config("mig", "");
    let config = config.to_str().expect("UTF-8 path");
    let args = ["migrate", "--config", config];
    let (x, y) = tokio::join!(run_stoa(&args), run_stoa(&args));
    assert!(x.0, "first `stoa migrate` failed:\n{}", x.1);
    assert!(y.0, "second `stoa migrate` failed:\n{}", y.1);
    // The migrated database serves a node.
    let node = TestNode::start(fresh.settings("mig")).await;
    let mut c = node.client("ann").await;
    c.create(&room("fresh"), json!({})).await;
    c.join(&room("fresh"), "ann").await;
    assert_eq!(c.send_acked(&room("fresh"), "hello", "c1").await, 1);
}
