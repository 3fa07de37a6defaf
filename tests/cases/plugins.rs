//! Wasm plugins through real nodes, real WebSocket clients and the real example plugins
//! (built once per test run with `cargo build --release --target wasm32-wasip2` in `plugins/`).

use crate::harness::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use stoa::config::Settings;

/// Build the example plugins once per test process (a file lock keeps concurrent test
/// processes from building at the same time). Needs `rustup target add wasm32-wasip2`.
fn built_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
        let target = workspace.join("target");
        std::fs::create_dir_all(&target).expect("creating plugins/target");
        let lock = std::fs::File::create(target.join(".stoa-test-build.lock")).expect("creating the build lock file");
        lock.lock().expect("locking the plugin build");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .current_dir(&workspace)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"])
            .arg(&target)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .output()
            .expect("running cargo to build the example plugins");
        assert!(
            out.status.success(),
            "building the example plugins failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("wasm32-wasip2/release")
    })
}

/// A plugin directory for one test holding `names` (copied from the build, `-` names).
async fn plugin_dir(db: &TestDb, names: &[&str]) -> PathBuf {
    let built = tokio::task::spawn_blocking(|| built_plugins().to_path_buf()).await.expect("plugin build task");
    let dir = db.dir().join("plugins");
    std::fs::create_dir_all(&dir).expect("creating the plugin dir");
    for name in names {
        install(&built, &dir, name, name);
    }
    dir
}

/// Copy built plugin `from` into `dir` as `<as_name>.wasm`.
fn install(built: &Path, dir: &Path, from: &str, as_name: &str) {
    let src = built.join(format!("{}.wasm", from.replace('-', "_")));
    std::fs::copy(&src, dir.join(format!("{as_name}.wasm"))).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
}

/// Node settings with `names` in the plugin dir and a compile cache shared by the tests.
async fn plugin_settings(db: &TestDb, names: &[&str]) -> Settings {
    let mut s = db.settings("n1");
    s.plugins.dir = plugin_dir(db, names).await;
    s.plugins.cache_dir = std::env::temp_dir().join("stoa-test-plugin-cache");
    s
}

/// `bytes` with every `from` replaced by `to` (of the same length).
fn replace_all(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

/// POST to the admin API; returns the status and the JSON body.
async fn admin_post(addr: SocketAddr, path: &str) -> (u16, Value) {
    let answer = stoa::admin_client::request(&addr.to_string(), "POST", path, None, DEADLINE).await.expect("admin POST");
    (answer.status, serde_json::from_str(&answer.body).unwrap_or(Value::String(answer.body)))
}

/// Create `room` of `owner` on node `n1` straight in the store, with `config` unchecked.
async fn create_in_store(db: &TestDb, room: &str, owner: &str, config: Value) {
    let config: stoa::protocol::RoomConfig = serde_json::from_value(config).expect("a room config");
    let store = db.store().await;
    let (room, node) = (stoa::protocol::RoomAddr(room.to_owned()), stoa::ids::NodeId("n1".into()));
    store.create_room(&room, &config, owner, &node).await.expect("room created in the store");
}

async fn plugin_info(node: &TestNode, name: &str) -> Value {
    node.admin_json(&format!("/api/plugins/{name}")).await
}

/// Wait for a bot message of `plugin` in `room` whose body satisfies `pred`.
async fn bot_message(c: &mut Client, room: &str, plugin: &str, pred: impl Fn(&str) -> bool) -> Value {
    let sender = format!("bot:{plugin}");
    c.wait_for(&format!("a message of {sender}"), |f| is_message(f, room) && f["from"] == sender.as_str() && f["body"].as_str().is_some_and(&pred))
        .await
}

/// `on-message` with the example plugins: word-filter rewrites (what is stored and broadcast
/// is the rewritten body) or rejects (error `rejected`, nothing stored); slash-commands answers
/// through its bot (`send`), reads the room (`room-info`) and the clock (`now`), and rewrites
/// `/me`. Messages from two plugins in a chain are seen in order.
pub async fn message_hooks_filter_rewrite_and_answer_commands(db: &TestDb) {
    let node = TestNode::start(plugin_settings(db, &["word-filter", "slash-commands"]).await).await;
    let r = room("hooked");
    let strict = room("strict");
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    ann.create(&r, json!({"subject": "plugins", "plugins": [
        {"name": "word-filter", "config": {"words": ["darn", "heck"]}},
        {"name": "slash-commands"}
    ]}))
    .await;
    ann.create(&strict, json!({"plugins": [{"name": "word-filter", "config": {"words": ["darn"], "reject": true}}]})).await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;

    let seq = ann.send_acked(&r, "well DARN it, heck", "c1").await;
    let got = bob.wait_for("the rewritten message", |f| is_message(f, &r) && f["cid"] == "c1").await;
    assert_eq!(got["body"], "well **** it, ****", "{got}");
    assert_eq!(got["seq"].as_u64(), Some(seq));

    ann.send_acked(&r, "/me waves", "c2").await;
    let got = bob.wait_for("the /me message", |f| is_message(f, &r) && f["cid"] == "c2").await;
    assert_eq!(got["body"], "* ann waves", "{got}");

    let roll_seq = ann.send_acked(&r, "/roll 20", "c3").await;
    let roll = bot_message(&mut bob, &r, "slash-commands", |b| b.starts_with("ann rolled ")).await;
    let n: u64 = roll["body"].as_str().unwrap()["ann rolled ".len()..].split(' ').next().unwrap().parse().expect("a number");
    assert!((1..=20).contains(&n), "{roll}");
    assert!(roll["seq"].as_u64().unwrap() > roll_seq, "the bot answers after the command: {roll}");

    ann.send_acked(&r, "/topic", "c4").await;
    let topic = bot_message(&mut bob, &r, "slash-commands", |b| b.starts_with("topic of")).await;
    assert!(topic["body"].as_str().unwrap().contains(&format!("topic of {r}: plugins (2 present")), "{topic}");

    ann.send_acked(&r, "/time", "c5").await;
    let time = bot_message(&mut bob, &r, "slash-commands", |b| b.starts_with("server time")).await;
    let ms: i64 = time["body"].as_str().unwrap().split(' ').nth(2).unwrap().parse().unwrap();
    assert!((ms - stoa::store::now_ms()).abs() < 60_000, "now() is wall-clock ms: {time}");

    // Rejected: error `rejected` with the plugin's reason, nothing stored.
    ann.join(&strict, "ann").await;
    let answer = ann.send(&strict, "darn", "s1").await;
    assert_error(&answer, "rejected", "a filtered word in a rejecting room");
    assert_eq!(answer["message"], "message contains a filtered word");
    ann.send_acked(&strict, "fine words", "s2").await;
    let stored = db.stored_messages(&strict).await;
    assert_eq!(stored.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), vec!["fine words"]);

    // What was stored is what was broadcast.
    let history = ann.history_all(&r).await;
    let bodies: Vec<&str> = history.iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(bodies[0], "well **** it, ****");
    assert_eq!(bodies[1], "* ann waves");
    let calls = plugin_info(&node, "word-filter").await;
    assert!(calls["calls"].as_u64().unwrap() >= 7, "{calls}");
    assert_eq!(calls["faults"], 0, "{calls}");
}

/// The room-life hooks and state: `on-room-created`, `on-join` (a denial is error
/// `rejected`), `on-leave`, `on-config-changed`, and `state-get` / `state-set` /
/// `state-delete` (visit counts).
pub async fn join_leave_created_and_config_hooks_run(db: &TestDb) {
    let node = TestNode::start(plugin_settings(db, &["greeter"]).await).await;
    let r = room("lobby");
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    ann.create(&r, json!({"plugins": [{"name": "greeter", "config": {"deny_nicks": ["root"]}}]})).await;
    bob.join(&r, "bob").await;
    // Created before bob joined: in his replay or live.
    bot_message(&mut bob, &r, "greeter", |b| b == "room created").await;

    let denied = ann.request(json!({"op": "join", "room": r, "nick": "root"})).await;
    assert_error(&denied, "rejected", "a denied nick");
    assert_eq!(denied["message"], "the nick `root` is not welcome here");
    // A join the room itself refuses (nick taken) never reaches the plugin: no visit counted.
    let taken = ann.request(json!({"op": "join", "room": r, "nick": "bob"})).await;
    assert_error(&taken, "conflict", "a taken nick");

    ann.join(&r, "ann").await;
    bot_message(&mut bob, &r, "greeter", |b| b == "welcome ann (visit 1)").await;
    let left = ann.request(json!({"op": "leave", "room": r})).await;
    assert_eq!(left["op"], "left", "{left}");
    bot_message(&mut bob, &r, "greeter", |b| b == "bye ann").await;
    ann.join(&r, "ann").await;
    bot_message(&mut bob, &r, "greeter", |b| b == "welcome ann (visit 2)").await;

    let configured = ann.request(json!({"op": "configure", "room": r, "config": {"subject": "tea"}})).await;
    assert_ne!(configured["op"], "error", "{configured}");
    bot_message(&mut bob, &r, "greeter", |b| b == "config changed; subject: tea").await;

    let forget = ann.send(&r, "/forget", "f1").await;
    assert_error(&forget, "rejected", "/forget");
    ann.request(json!({"op": "leave", "room": r})).await;
    ann.join(&r, "ann").await;
    bot_message(&mut bob, &r, "greeter", |b| b == "welcome ann (visit 1)").await;
    // bob's count was never deleted.
    let store = db.store().await;
    let row = store.load_room(&stoa::protocol::RoomAddr(r.clone())).await.unwrap().unwrap();
    let state = store.plugin_state_load(row.id, "greeter").await.unwrap();
    assert_eq!(state.get(&format!("visits:{}", bob.user)).map(String::as_str), Some("1"), "{state:?}");
    assert_eq!(state.get(&format!("visits:{}", ann.user)).map(String::as_str), Some("1"), "{state:?}");
}

/// rate-limit keeps its per-user budget in plugin state, written fenced with the room: after
/// a node restart the budget is still spent (the plugin instance and its memory are new).
pub async fn plugin_state_survives_a_node_restart(db: &TestDb) {
    let mut settings = plugin_settings(db, &["rate-limit"]).await;
    settings.plugins.enabled = vec![stoa::plugin::EnabledPlugin { name: "rate-limit".into(), config: json!({"budget": 2, "window_ms": 3_600_000}) }];
    let r = room("metered");
    {
        let node = TestNode::start(settings.clone()).await;
        let mut ann = node.client("ann").await;
        ann.create(&r, json!({})).await;
        ann.join(&r, "ann").await;
        ann.send_acked(&r, "one", "m1").await;
        ann.send_acked(&r, "two", "m2").await;
        let third = ann.send(&r, "three", "m3").await;
        assert_error(&third, "rejected", "over budget");
        assert!(third["message"].as_str().unwrap().starts_with("rate limit: at most 2 messages"), "{third}");
        node.stop().await;
    }
    let node = TestNode::start(settings).await;
    let info = plugin_info(&node, "rate-limit").await;
    assert_eq!(info["cached"], true, "the second start takes the compiled component from the disk cache: {info}");
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;
    assert_error(&ann.send(&r, "four", "m4").await, "rejected", "still over budget after a restart");
    bob.send_acked(&r, "bob has a budget of his own", "b1").await;
    let bodies: Vec<String> = db.stored_messages(&r).await.into_iter().map(|m| m.body).collect();
    assert_eq!(bodies, vec!["one", "two", "bob has a budget of his own"]);
}

/// Every fault of `misbehave` is stopped by its limit (deadline, memory cap, stack, result
/// size, host-call budget, trap), counted with its kind, and answered by the failure policy
/// (fail_open: the message is stored), while the same room and another room keep serving.
pub async fn misbehaving_plugins_are_stopped_and_the_room_keeps_working(db: &TestDb) {
    let mut settings = plugin_settings(db, &["misbehave"]).await;
    settings.plugins.fault_limit = 100;
    // Long enough to act inside the room while the loop runs, even in a slow debug build.
    settings.plugins.call_deadline_ms = 1000;
    let node = TestNode::start(settings).await;
    let mut ann = node.client("ann").await;
    let mut carl = node.client("carl").await;
    let mut bob = node.client("bob").await;
    let calm = room("calm");
    bob.create(&calm, json!({})).await;
    bob.join(&calm, "bob").await;
    // (fault, metric kind, how `last_fault` names it)
    let cases = [
        ("loop", "deadline", "deadline of 1000 ms exceeded"),
        ("alloc", "memory", "memory cap of 33554432 bytes exceeded"),
        ("recursion", "trap", "trap: "),
        ("trap", "trap", "trap: wasm trap: wasm `unreachable` instruction executed"),
        ("huge", "result_size", "result of 4194304 bytes over the limit of 16384"),
        ("storm", "host_calls", "host-call budget of 1000 exceeded"),
        ("init", "init", "init failed: misbehave: failing init on purpose"),
    ];
    for (i, (fault, kind, named)) in cases.iter().enumerate() {
        let r = room(&format!("bad-{fault}"));
        let plugins = json!({"plugins": [{"name": "misbehave", "config": {"fault": fault}}]});
        if *fault == "init" {
            // `create` refuses a config the plugin's `init` refuses; a room can still have one
            // (created before that check, or by `stoa room create`, or before a plugin upgrade).
            create_in_store(db, &r, &ann.user, plugins).await;
        } else {
            ann.create(&r, plugins).await;
        }
        ann.join(&r, "ann").await;
        let before = plugin_info(&node, "misbehave").await["faults"].as_u64().unwrap();
        let started = Instant::now();
        let fault_id = ann.send_json(json!({"op": "send", "room": r, "body": "!fault now", "cid": "f"})).await;
        // Another room is served while the plugin misbehaves.
        bob.send_acked(&calm, &format!("calm {fault}"), &format!("calm-{i}")).await;
        let mut carl_send = None;
        if *fault == "loop" {
            // The room itself is not blocked: it answers a history read at once, and takes a
            // post that will be stored after the faulting one (arrival order).
            carl.join(&r, "carl").await;
            let read = Instant::now();
            let history = carl.request(json!({"op": "history", "room": r})).await;
            assert_eq!(history["op"], "history", "{history}");
            assert!(read.elapsed() < Duration::from_millis(500), "history waited {:?} for the plugin", read.elapsed());
            carl_send = Some(carl.send_json(json!({"op": "send", "room": r, "body": "meanwhile", "cid": "m"})).await);
        }
        let answer = ann.answer(&fault_id).await;
        let took = started.elapsed();
        if let Some(id) = carl_send {
            let carl_ack = carl.answer(&id).await;
            assert_eq!(carl_ack["seq"].as_u64(), answer["seq"].as_u64().map(|s| s + 1), "stored in arrival order: {carl_ack} after {answer}");
        }
        assert_eq!(answer["op"], "ack", "{fault}: fail_open stores the message: {answer}");
        // Debug builds, two cores shared with other tests: generous, but far from unbounded.
        assert!(took < Duration::from_secs(6), "{fault}: stopped only after {took:?}");
        if *fault == "loop" {
            assert!(took >= Duration::from_millis(1000), "the loop ran its full deadline: {took:?}");
        }
        // The same room serves the next message (the plugin was re-instantiated).
        ann.send_acked(&r, "an ordinary message", "ok").await;
        let info = plugin_info(&node, "misbehave").await;
        let after = info["faults"].as_u64().unwrap();
        let expected = if *fault == "init" { 2 } else { 1 }; // init fails for every call
        assert_eq!(after - before, expected, "{fault}: {info}");
        assert!(info["last_fault"].as_str().is_some_and(|f| f.starts_with(named) && f.ends_with(&format!("(room {r})"))), "{fault}: {info}");
        let metrics = node.admin_json("/api/node").await;
        assert!(metrics["connections"].as_u64().unwrap() >= 2, "{metrics}");
        let prom = http_get(node.admin_addr, "/metrics", None).await.1;
        assert!(prom.contains(&format!("kind=\"{kind}\"")), "{fault}: no {kind} fault in /metrics");
        let stored = db.stored_messages(&r).await;
        let mut expected = vec!["!fault now", "an ordinary message"];
        if *fault == "loop" {
            expected.insert(1, "meanwhile");
        }
        assert_eq!(stored.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), expected, "{fault}");
    }
}

/// After `fault_limit` faults within the window the plugin is disabled: its hooks no longer
/// run and the failure policy decides (fail_open: accepted). `stoa plugin reload` (the CLI,
/// through the admin API) re-enables it; `unload` removes it; bad loads get clear errors.
pub async fn plugin_is_disabled_after_repeated_faults_and_reload_restores_it(db: &TestDb) {
    let mut settings = plugin_settings(db, &["misbehave"]).await;
    settings.plugins.fault_limit = 3;
    let node = TestNode::start(settings).await;
    let admin = node.admin_addr.to_string();
    let r = room("flaky");
    let mut ann = node.client("ann").await;
    ann.create(&r, json!({"plugins": [{"name": "misbehave", "config": {"fault": "trap"}}]})).await;
    ann.join(&r, "ann").await;
    for i in 0..3 {
        ann.send_acked(&r, "!fault", &format!("f{i}")).await;
    }
    let info = plugin_info(&node, "misbehave").await;
    assert_eq!(info["disabled_rooms"], 1, "{info}");
    assert_eq!(info["disabled_in"][0]["room"], r.as_str(), "{info}");
    assert!(info["disabled_in"][0]["reason"].as_str().is_some_and(|d| d.contains("3 faults")), "{info}");
    let calls = info["calls"].as_u64().unwrap();
    ann.send_acked(&r, "!fault while disabled", "d1").await;
    let info = plugin_info(&node, "misbehave").await;
    assert_eq!(info["calls"].as_u64().unwrap(), calls, "a disabled plugin is not called: {info}");
    assert_eq!(info["faults"], 3, "{info}");

    let (ok, out) = run_stoa(&["plugin", "reload", "misbehave", "--admin", &admin]).await;
    assert!(ok, "stoa plugin reload: {out}");
    assert!(out.contains("\"disabled_rooms\": 0"), "{out}");
    ann.send_acked(&r, "!fault after reload", "r1").await;
    assert_eq!(plugin_info(&node, "misbehave").await["faults"], 4);

    let (ok, out) = run_stoa(&["plugin", "list", "--admin", &admin]).await;
    assert!(ok && out.contains("\"misbehave\""), "stoa plugin list: {out}");
    let (ok, out) = run_stoa(&["plugin", "unload", "misbehave", "--admin", &admin]).await;
    assert!(ok, "stoa plugin unload: {out}");
    ann.send_acked(&r, "!fault after unload", "u1").await;
    let (ok, out) = run_stoa(&["plugin", "reload", "misbehave", "--admin", &admin]).await;
    assert!(!ok && out.contains("404") && out.contains("no plugin `misbehave` is loaded"), "reload of an unloaded plugin: {out}");

    // Bad input gets clear errors and the node keeps working.
    let (status, body) = admin_post(node.admin_addr, "/api/plugins/nope/load").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["message"].as_str().unwrap().contains("cannot read"), "{body}");
    let dir = db.dir().join("plugins");
    std::fs::write(dir.join("garbage.wasm"), b"\0asm but not really").unwrap();
    let (status, body) = admin_post(node.admin_addr, "/api/plugins/garbage/load").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("not a valid stoa:plugin component"), "{body}");
    // The noop plugin as if built against a WIT version this host does not have: the same
    // bytes with every `stoa:plugin/...@0.1.0` name saying 0.2.0 (same length, still valid).
    let noop = std::fs::read(built_plugins().join("noop.wasm")).expect("reading the built noop plugin");
    let future = replace_all(&noop, b"stoa:plugin/types@0.1.0", b"stoa:plugin/types@0.2.0");
    assert_ne!(future, noop, "noop imports stoa:plugin/types@0.1.0");
    std::fs::write(dir.join("future.wasm"), future).unwrap();
    let (status, body) = admin_post(node.admin_addr, "/api/plugins/future/load").await;
    assert_eq!(status, 400, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("built for stoa:plugin@0.2.0") && message.contains("(supported: stoa:plugin@0.1.0)"), "{body}");
    let (status, body) = admin_post(node.admin_addr, "/api/plugins/Bad.Name/load").await;
    assert_eq!(status, 400, "{body}");
    let (ok, out) = run_stoa(&["plugin", "load", "misbehave", "--admin", &admin]).await;
    assert!(ok && out.contains("\"generation\""), "stoa plugin load: {out}");
    ann.send_acked(&r, "still works", "w1").await;
}

/// With `fail_closed`, a faulting plugin's message is refused with error `rejected` naming
/// the plugin and is not stored; other messages go through.
pub async fn fail_closed_refuses_what_a_faulting_plugin_could_not_check(db: &TestDb) {
    let mut settings = plugin_settings(db, &["misbehave"]).await;
    settings.plugins.policies.insert("misbehave".into(), stoa::plugin::FailurePolicy::FailClosed);
    settings.plugins.fault_limit = 2;
    let node = TestNode::start(settings).await;
    let r = room("closed");
    let mut ann = node.client("ann").await;
    ann.create(&r, json!({"plugins": [{"name": "misbehave", "config": {"fault": "loop"}}]})).await;
    ann.join(&r, "ann").await;
    ann.send_acked(&r, "before", "b").await;
    let answer = ann.send(&r, "!fault", "f1").await;
    assert_error(&answer, "rejected", "fail_closed fault");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("plugin `misbehave` could not check this message") && message.contains("deadline"), "{answer}");
    ann.send_acked(&r, "after", "a").await;
    // Disabled (second fault): fail_closed refuses everything until a reload.
    assert_error(&ann.send(&r, "!fault", "f2").await, "rejected", "second fault");
    let answer = ann.send(&r, "harmless", "h").await;
    assert_error(&answer, "rejected", "disabled fail_closed plugin");
    assert!(answer["message"].as_str().unwrap().contains("disabled"), "{answer}");
    let bodies: Vec<String> = db.stored_messages(&r).await.into_iter().map(|m| m.body).collect();
    assert_eq!(bodies, vec!["before", "after"]);
}

/// Reloading a plugin (even swapping it for another component) while clients send loses
/// nothing: every message is acked once, the log is contiguous, connections stay up, and
/// messages after the swap run the new component.
pub async fn reload_under_traffic_loses_nothing(db: &TestDb) {
    const PER_SENDER: usize = 150;
    let mut settings = plugin_settings(db, &["word-filter"]).await;
    settings.plugins.enabled = vec![stoa::plugin::EnabledPlugin { name: "word-filter".into(), config: json!({"words": ["darn"]}) }];
    let node = TestNode::start(settings).await;
    let r = room("busy");
    let mut owner = node.client("owner").await;
    owner.create(&r, json!({})).await;
    owner.join(&r, "owner").await;
    let mut senders = Vec::new();
    for who in ["ann", "bob"] {
        let mut c = node.client(who).await;
        c.join(&r, who).await;
        let room = r.clone();
        senders.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..PER_SENDER {
                seqs.push(c.send_acked(&room, &format!("darn {who} {i}"), &format!("{who}-{i}")).await);
            }
            assert!(c.closed.is_none(), "{who}'s connection was closed");
            seqs
        }));
    }
    // Reload again and again until both senders are done.
    let mut during_traffic = 0;
    while !senders.iter().all(|s| s.is_finished()) {
        let (status, body) = admin_post(node.admin_addr, "/api/plugins/word-filter/reload").await;
        assert_eq!(status, 200, "{body}");
        during_traffic += 1;
        tokio::time::sleep(Duration::from_millis(10)).await; // spread the reloads over the traffic
    }
    assert!(during_traffic >= 3, "only {during_traffic} reloads happened during the traffic");
    let info = plugin_info(&node, "word-filter").await;
    assert!(info["generation"].as_u64().unwrap() > during_traffic, "{info}");
    let mut all = Vec::new();
    for s in senders {
        all.extend(s.await.expect("sender task"));
    }
    all.sort();
    assert_contiguous(&all, (2 * PER_SENDER) as u64, "acked seqs");
    let stored = db.stored_messages(&r).await;
    assert_eq!(stored.len(), 2 * PER_SENDER);
    assert!(stored.iter().all(|m| m.body.starts_with("**** ")), "every message ran the filter");

    // Swap in another component under the same name: the next message runs it.
    install(built_plugins(), &db.dir().join("plugins"), "noop", "word-filter");
    let (status, body) = admin_post(node.admin_addr, "/api/plugins/word-filter/reload").await;
    assert_eq!(status, 200, "{body}");
    owner.send_acked(&r, "darn, unfiltered now", "swap").await;
    let last = db.stored_messages(&r).await.pop().unwrap();
    assert_eq!(last.body, "darn, unfiltered now");
}

/// Plugin state is written under the room's fence: a writer holding an old epoch (or another
/// node id) is refused with `Fenced` and changes nothing, so after a failover only the new host
/// writes it; deletes and sets of one call land together.
pub async fn plugin_state_writes_are_fenced(db: &TestDb) {
    use std::collections::HashMap;
    use stoa::ids::{Epoch, NodeId};
    use stoa::store::{Fence, StoreError};
    let store = db.store().await;
    store.migrate().await.expect("migrations");
    let home = NodeId("n1".into());
    let row = store
        .create_room(&stoa::protocol::RoomAddr(room("fenced")), &Default::default(), "ann", &home)
        .await
        .expect("creating the room");
    let fence = Fence { room: row.id, host: home.clone(), epoch: row.epoch };
    let set = |pairs: &[(&str, Option<&str>)]| -> HashMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.map(str::to_owned))).collect()
    };
    store.plugin_state_apply(&fence, "p", &set(&[("a", Some("1")), ("b", Some("2"))])).await.expect("a fenced write by the host");
    let stale = Fence { epoch: Epoch(row.epoch.0 + 1), ..fence.clone() };
    let err = store.plugin_state_apply(&stale, "p", &set(&[("a", Some("stale"))])).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    let other = Fence { host: NodeId("n2".into()), ..fence.clone() };
    assert!(matches!(store.plugin_state_apply(&other, "p", &set(&[("c", Some("3"))])).await, Err(StoreError::Fenced { .. })));
    store.plugin_state_apply(&fence, "p", &set(&[("a", None), ("b", Some("22"))])).await.expect("delete + update");
    let state = store.plugin_state_load(row.id, "p").await.unwrap();
    assert_eq!(state, HashMap::from([("b".to_owned(), "22".to_owned())]));
    assert!(store.plugin_state_load(row.id, "other").await.unwrap().is_empty(), "state is per plugin");
    store.destroy_room(&fence).await.expect("destroying the room");
    assert!(store.plugin_state_load(row.id, "p").await.unwrap().is_empty(), "destroying a room deletes its plugin state");
}

/// Plugin state moves with the room on failover: rate-limit's spent budget, written fenced on
/// node 1a, is what 1b's plugin instance reads after it takes the room over.
pub async fn plugin_state_moves_with_the_room_on_failover(db: &TestDb) {
    let base = plugin_settings(db, &["rate-limit"]).await;
    let links = (crate::harness::free_port(), crate::harness::free_port());
    let pair = |me: &str| {
        let mut s = crate::cases::ha::pair_settings(db, me, links);
        s.plugins = base.plugins.clone();
        s.plugins.enabled = vec![stoa::plugin::EnabledPlugin { name: "rate-limit".into(), config: json!({"budget": 2, "window_ms": 3_600_000}) }];
        s
    };
    let r = "metered@conference-1a.localhost";
    let a = TestNode::start(pair("1a")).await;
    let b = TestNode::start(pair("1b")).await;
    crate::harness::await_admin(b.admin_addr, None, "/api/topology", "1b to see 1a", |t| t["peer"]["reachable"] == true).await;
    let mut ann = a.client("ann").await;
    ann.create(r, json!({})).await;
    ann.join(r, "ann").await;
    ann.send_acked(r, "one", "m1").await;
    ann.send_acked(r, "two", "m2").await;
    assert_error(&ann.send(r, "three", "m3").await, "rejected", "over budget on 1a");
    a.stop().await; // releases its lease: 1b takes the room over
    crate::harness::await_admin(b.admin_addr, None, "/api/topology", "1b in backup mode", |t| t["status"]["state"] == "running_in_backup_mode").await;

    let mut ann = b.client("ann").await;
    let mut bob = b.client("bob").await;
    ann.join(r, "ann").await;
    bob.join(r, "bob").await;
    assert_error(&ann.send(r, "four", "m4").await, "rejected", "the budget spent on 1a is spent on 1b");
    bob.send_acked(r, "bob on 1b", "b1").await;
    let bodies: Vec<String> = db.stored_messages(r).await.into_iter().map(|m| m.body).collect();
    assert_eq!(bodies, vec!["one", "two", "bob on 1b"]);
}

/// Issue 9, bug 6: a plugin config its `init` refuses is refused at `create` and `configure`
/// (`bad_request` with the plugin's reason; nothing changes), and faults count per room: a
/// room whose stored config breaks the plugin disables it there only, while a correctly
/// configured room keeps being filtered. Plugin names read `_` as `-`, whichever the built
/// file (`word_filter.wasm`, as cargo names it) or the config uses, and a node makes its
/// plugin directory when it is missing.
pub async fn a_room_with_a_bad_plugin_config_only_breaks_itself(db: &TestDb) {
    let built = tokio::task::spawn_blocking(|| built_plugins().to_path_buf()).await.expect("plugin build task");
    let mut settings = db.settings("n1");
    settings.plugins.dir = db.dir().join("fresh-plugin-dir");
    settings.plugins.cache_dir = std::env::temp_dir().join("stoa-test-plugin-cache");
    settings.plugins.fault_limit = 3;
    let node = TestNode::start(settings.clone()).await;
    assert!(settings.plugins.dir.is_dir(), "the node makes its plugin directory");
    // Installed under cargo's file name; loaded and configured as `word-filter`.
    std::fs::copy(built.join("word_filter.wasm"), settings.plugins.dir.join("word_filter.wasm")).expect("copying word_filter.wasm");
    let (status, body) = admin_post(node.admin_addr, "/api/plugins/word-filter/load").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "word-filter", "{body}");

    let mut ann = node.client("ann").await;
    let good = room("good-filter");
    ann.create(&good, json!({"plugins": [{"name": "word-filter", "config": {"words": ["darn"]}}]})).await;
    ann.join(&good, "ann").await;
    let typo = json!({"plugins": [{"name": "word-filter", "config": {"wrds": ["darn"]}}]});
    let refused = ann.request(json!({"op": "create", "room": room("typo"), "config": typo})).await;
    assert_error(&refused, "bad_request", "create with a config init refuses");
    assert!(refused["message"].as_str().is_some_and(|m| m.contains("plugin `word-filter` refused its config") && m.contains("wrds")), "{refused}");
    let refused = ann.request(json!({"op": "configure", "room": good, "config": typo})).await;
    assert_error(&refused, "bad_request", "configure with a config init refuses");
    let refused = ann.request(json!({"op": "configure", "room": good, "config": {"plugins": [{"name": "nope", "config": {}}]}})).await;
    assert!(refused["message"].as_str().is_some_and(|m| m.contains("plugin `nope` is not loaded")), "{refused}");
    ann.send_acked(&good, "well darn", "g0").await;
    assert_eq!(db.stored_messages(&good).await.last().unwrap().body, "well ****", "the good config is still in force");

    // A room whose stored config the plugin refuses (from before the check) breaks only itself.
    let broken = room("broken-filter");
    create_in_store(db, &broken, &ann.user, json!({"plugins": [{"name": "word_filter", "config": {"wrds": ["darn"]}}]})).await;
    ann.join(&broken, "ann").await;
    for i in 0..4 {
        ann.send_acked(&broken, "darn it", &format!("b{i}")).await; // fail_open: stored as sent
    }
    let info = plugin_info(&node, "word-filter").await;
    assert_eq!(info["disabled_rooms"], 1, "{info}");
    assert_eq!(info["disabled_in"][0]["room"], broken.as_str(), "{info}");
    ann.send_acked(&good, "darn again", "g1").await;
    assert_eq!(db.stored_messages(&good).await.last().unwrap().body, "**** again", "the good room is still filtered");
    // Its owner mends the config: the room runs the plugin again (its faults were the old
    // config's), with no reload.
    let answer = ann.request(json!({"op": "configure", "room": broken, "config": {"plugins": [{"name": "word-filter", "config": {"words": ["darn"]}}]}})).await;
    assert_eq!(answer["op"], "ok", "{answer}");
    ann.send_acked(&broken, "darn fixed", "b9").await;
    assert_eq!(db.stored_messages(&broken).await.last().unwrap().body, "**** fixed");
    assert_eq!(plugin_info(&node, "word_filter").await["disabled_rooms"], 0);
    let (status, body) = admin_post(node.admin_addr, "/api/plugins/word_filter/reload").await;
    assert_eq!((status, body["name"].as_str()), (200, Some("word-filter")), "{body}");
}
