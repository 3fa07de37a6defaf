//! The operator's command line (issue 9, "conventions an operator expects"): config paths,
//! `--config` anywhere and `STOA_CONFIG`, `stoa config check`, a port in use reported before
//! migrations, users, the audit log, rooms and sessions of a running node.

use crate::harness::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Run `stoa ARGS` with `env` (and no inherited `STOA_CONFIG`, `STOA_PASSWORD` or
/// `STOA_ADMIN_TOKEN`) in `cwd`; returns (success, stdout, stderr).
async fn stoa(args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"));
    cmd.args(args)
        .env_remove("STOA_CONFIG")
        .env_remove("STOA_PASSWORD")
        .env_remove("STOA_ADMIN_TOKEN")
        .env("NO_COLOR", "1")
        .env("STOA_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("stoa {args:?} did not finish in 60 s"))
        .expect("running the stoa binary");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `stoa ARGS` must succeed; returns its stdout.
async fn stoa_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let (ok, out, err) = stoa(args, env, None).await;
    assert!(ok, "stoa {args:?} failed:\n{out}{err}");
    out
}

/// `stoa ARGS` must fail; returns its stderr.
async fn stoa_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let (ok, out, err) = stoa(args, env, None).await;
    assert!(!ok, "stoa {args:?} should have failed:\n{out}{err}");
    err
}

/// A `stoa serve` process started from `cwd` with `env`; killed when dropped.
struct Served {
    child: tokio::process::Child,
    admin_addr: std::net::SocketAddr,
    log: Vec<String>,
}

async fn serve_in(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Served {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(args)
        .env_remove("STOA_CONFIG")
        .env("NO_COLOR", "1")
        .env("STOA_LOG", "info,sqlx=warn,sea_orm=warn")
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning stoa");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut log = Vec::new();
    let found = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let addrs = parse_listening(&line);
            log.push(line);
            if let Some((_, admin)) = addrs {
                return Some(admin);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(admin_addr)) => {
            // Keep draining the log so the node never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Served { child, admin_addr, log }
        }
        _ => panic!("stoa {args:?} (in {}) did not listen:\n{}", cwd.display(), log.join("\n")),
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("---- start of the stoa log ----\n{}", self.log.join("\n"));
        }
    }
}

/// A config with a token for the admin API, on this test's database.
fn config_with_token(db: &TestDb, node_id: &str, token: &str, admin_port: u16) -> std::path::PathBuf {
    let path = db.dir().join(format!("{node_id}.toml"));
    let text = format!(
        "[node]\nid = \"{node_id}\"\ndata_dir = \"data\"\n\n\
         [listen]\nclient = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:{admin_port}\"\n\n\
         [store]\nurl = \"{url}\"\nmax_connections = 4\n\n\
         [auth]\nallow_guests = true\nadmin_token = \"{token}\"\n",
        url = db.url,
    );
    std::fs::write(&path, text).expect("writing the config");
    path
}

/// Issue 9: relative paths in a config file (`data_dir`, `secret_file`, `admin_token_file`)
/// are read beside the file, whatever the working directory, so `stoa serve --config
/// /etc/stoa/1a.toml` works from anywhere; a relative path from a `STOA__…` variable follows
/// the working directory. Before, the node looked in the working directory and failed with
/// `cannot read secret file`.
pub async fn relative_paths_in_a_config_file_follow_the_file(db: &TestDb) {
    let etc = db.dir().join("etc/stoa");
    let elsewhere = db.dir().join("elsewhere");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(etc.join("admin-token"), "token-from-a-file\n").unwrap();
    std::fs::write(etc.join("cluster-secret"), "0123456789abcdef0123\n").unwrap();
    let config = etc.join("n1.toml");
    std::fs::write(
        &config,
        "[node]\nid = \"n1\"\ndata_dir = \"data\"\n\n[listen]\nclient = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [auth]\nadmin_token_file = \"admin-token\"\n\n[cluster]\nsecret_file = \"cluster-secret\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let node = serve_in(&["serve", "--config", config], &[], &elsewhere).await;
    let (status, body) = http_get(node.admin_addr, "/api/node", Some("token-from-a-file")).await;
    assert_eq!(status, 200, "the admin token was read from beside the config: {body}");
    drop(node);
    assert!(etc.join("data/stoa.db").exists(), "the SQLite store lives under the config's folder");
    assert!(!elsewhere.join("data").exists(), "nothing is written to the working directory");

    // A relative path from the environment follows the working directory.
    let (ok, out, err) = stoa(&["migrate", "--config", config], &[("STOA__NODE__DATA_DIR", "env-data")], Some(&elsewhere)).await;
    assert!(ok, "{out}{err}");
    assert!(elsewhere.join("env-data/stoa.db").exists(), "STOA__NODE__DATA_DIR=env-data is relative to the working directory");
}

/// Issue 9: `--config` is taken after the verb too, and every verb (bare `stoa` included)
/// reads `STOA_CONFIG` when `--config` is absent.
pub async fn config_comes_after_the_verb_or_from_stoa_config(db: &TestDb) {
    let admin_port = free_port();
    let config = config_with_token(db, "envnode", "tok-envnode", admin_port);
    let config = config.to_str().unwrap();
    let pw = [("STOA_PASSWORD", "correct horse")];
    stoa_ok(&["user", "add", "ann", "--config", config], &pw).await;
    let listed = stoa_ok(&["user", "list"], &[("STOA_CONFIG", config)]).await;
    assert!(listed.lines().any(|l| l.starts_with("ann ")), "STOA_CONFIG names the store: {listed}");

    // Bare `stoa` serves the STOA_CONFIG node.
    let node = serve_in(&[], &[("STOA_CONFIG", config)], db.dir()).await;
    assert_eq!(node.admin_addr.port(), admin_port, "bare stoa used STOA_CONFIG");
    let status = stoa_ok(&["admin", "status", "--json", "--config", config], &[]).await;
    let status: Value = serde_json::from_str(&status).unwrap_or_else(|e| panic!("{e}: {status}"));
    assert_eq!(status["node"], "envnode", "{status}");
    let via_env = stoa_ok(&["admin", "node", "envnode"], &[("STOA_CONFIG", config)]).await;
    assert!(via_env.contains("\"envnode\""), "{via_env}");
    let plugins = stoa_ok(&["plugin", "list", "--config", config], &[]).await;
    assert!(plugins.contains("plugins"), "{plugins}");
}

/// Issue 9: `stoa config check` loads a file as `serve` would without starting anything:
/// `ok: FILE` for a good one; for a bad one the error names the file and the problem, each
/// cause once, and the exit status is non-zero.
pub async fn config_check_says_ok_or_names_the_problem_once(db: &TestDb) {
    let good = db.write_config("chk", "");
    let good = good.to_str().unwrap();
    let out = stoa_ok(&["config", "check", "--config", good], &[]).await;
    assert_eq!(out.trim(), format!("ok: {good}"));
    stoa_ok(&["config", "check"], &[("STOA_CONFIG", good)]).await;

    let write = |name: &str, text: &str| {
        let path = db.dir().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let unknown = write("unknown.toml", "[node]\nid = \"x\"\ncolour = \"red\"\n");
    let err = stoa_fails(&["config", "check", "--config", &unknown], &[]).await;
    assert!(err.contains("unknown.toml") && err.contains("colour"), "{err}");
    assert_eq!(err.matches("colour").count(), 1, "the cause is printed once: {err}");

    let secret = write("secret.toml", "[cluster]\nsecret_file = \"missing-secret\"\n");
    let err = stoa_fails(&["config", "check", "--config", &secret], &[]).await;
    assert!(err.contains("cannot read secret file") && err.contains(&db.dir().join("missing-secret").display().to_string()), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "the cause is printed once: {err}");

    std::fs::write(db.dir().join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(db.dir().join("key.pem"), "not a key").unwrap();
    let tls = write("tls.toml", "[tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n");
    let err = stoa_fails(&["config", "check", "--config", &tls], &[]).await;
    assert!(err.contains("[tls]") && err.contains("cert.pem"), "{err}");

    let err = stoa_fails(&["config", "check"], &[]).await;
    assert!(err.contains("--config") && err.contains("STOA_CONFIG"), "{err}");
}

/// Issue 9: a listener's port in use is reported before the node touches the store: the
/// error names the address and the key, and the fresh database stays unmigrated.
pub async fn a_port_in_use_is_reported_before_migrations(db: &TestDb) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port to take");
    let port = taken.local_addr().unwrap().port();
    let path = db.dir().join("busy.toml");
    std::fs::write(
        &path,
        format!("[node]\nid = \"busy\"\n\n[listen]\nclient = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:{port}\"\n\n[store]\nurl = \"{}\"\n", db.url),
    )
    .unwrap();
    let err = stoa_fails(&["serve", "--config", path.to_str().unwrap()], &[]).await;
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("listen.admin"), "{err}");
    let store = db.store().await;
    assert!(store.count_rooms().await.is_err(), "no migration ran before the port was found taken");
}

/// Log in with a password; the answer frame.
async fn login(addr: std::net::SocketAddr, hello: Value) -> Value {
    let mut c = Client::connect_raw(addr).await;
    let mut hello = hello;
    hello["op"] = json!("hello");
    hello["v"] = json!(1);
    c.request(hello).await
}

/// Issue 9: `stoa user passwd` (from a file or `STOA_PASSWORD`) replaces the password;
/// `stoa user delete` removes the user and its sessions (its token stops working); the
/// 8-character rule is enforced and said; `user list` shows UTC times.
pub async fn users_get_new_passwords_and_are_deleted(db: &TestDb) {
    let config = db.write_config("usr", "");
    let config = config.to_str().unwrap();
    let err = stoa_fails(&["user", "add", "rita", "--config", config], &[("STOA_PASSWORD", "short")]).await;
    assert!(err.contains("at least 8 characters"), "{err}");
    stoa_ok(&["user", "add", "rita", "--config", config], &[("STOA_PASSWORD", "correct horse")]).await;
    let listed = stoa_ok(&["user", "list", "--config", config], &[]).await;
    assert!(listed.contains("CREATED (UTC)"), "{listed}");
    let rita = listed.lines().find(|l| l.starts_with("rita ")).unwrap_or_else(|| panic!("{listed}"));
    let year = rita.split_whitespace().nth(1).unwrap_or_default();
    assert!(year.len() == 10 && year.starts_with("20") && year.as_bytes()[4] == b'-', "a UTC date: {rita}");

    let node = TestNode::start(db.settings("usr")).await;
    let welcome = login(node.client_addr, json!({"user": "rita", "password": "correct horse"})).await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    let token = welcome["session"].as_str().unwrap().to_owned();

    let file = db.dir().join("new-password");
    std::fs::write(&file, "battery staple 2\n").unwrap();
    stoa_ok(&["user", "passwd", "rita", "--password-file", file.to_str().unwrap(), "--config", config], &[]).await;
    let old = login(node.client_addr, json!({"user": "rita", "password": "correct horse"})).await;
    assert_error(&old, "unauthorized", "the old password");
    let new = login(node.client_addr, json!({"user": "rita", "password": "battery staple 2"})).await;
    assert_eq!(new["op"], "welcome", "{new}");
    let err = stoa_fails(&["user", "passwd", "nobody", "--config", config], &[("STOA_PASSWORD", "long enough")]).await;
    assert!(err.contains("no user `nobody`"), "{err}");

    let out = stoa_ok(&["user", "delete", "rita", "--config", config], &[]).await;
    assert!(out.contains("2 stored session(s) ended"), "{out}");
    let resumed = login(node.client_addr, json!({"token": token})).await;
    assert_error(&resumed, "unauthorized", "a deleted user's token");
    let err = stoa_fails(&["user", "delete", "rita", "--config", config], &[]).await;
    assert!(err.contains("no user `rita`"), "{err}");
    let listed = stoa_ok(&["user", "list", "--config", config], &[]).await;
    assert!(!listed.contains("rita"), "{listed}");
}

/// `--admin ADDR --token T` for the CLI against an in-process node.
fn api(node: &TestNode) -> Vec<String> {
    vec!["--admin".into(), node.admin_addr.to_string(), "--token".into(), node.token.clone().expect("the node has a token")]
}

async fn stoa_api(node: &TestNode, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    let target = api(node);
    all.extend(target.iter().map(String::as_str));
    stoa(&all, &[], None).await
}

/// Issue 9: `stoa room configure` and `stoa room destroy` go through the node hosting the
/// room: occupants see the new subject and the destruction at once; bad input and unknown
/// rooms get clear errors; each action is in the audit log with the admin token's
/// fingerprint as the actor, readable as a table (UTC times, fields) and as JSON.
pub async fn rooms_are_configured_and_destroyed_and_audited(db: &TestDb) {
    let mut settings = db.settings("rms");
    settings.auth.admin_token = "room-admin-token".into();
    let node = TestNode::start(settings).await;
    let r = room("ops");
    let mut ann = node.client("ann").await;
    ann.create(&r, json!({"subject": "old"})).await;
    ann.join(&r, "ann").await;

    let (ok, out, err) = stoa_api(&node, &["room", "configure", &r, "--subject", "new topic", "--members-only"]).await;
    assert!(ok, "{out}{err}");
    let subject = ann.wait_for("the new subject", |f| f["op"] == "subject").await;
    assert_eq!(subject["subject"], "new topic", "{subject}");
    let shown = node.admin_json(&format!("/api/rooms/{r}")).await;
    assert_eq!((shown["config"]["subject"].as_str(), shown["config"]["public"].as_bool()), (Some("new topic"), Some(false)), "{shown}");

    let (ok, _, err) = stoa_api(&node, &["room", "configure", &r]).await;
    assert!(!ok && err.contains("nothing to change"), "{err}");
    let (ok, _, err) = stoa_api(&node, &["room", "configure", &r, "--plugin", "Not A Name"]).await;
    assert!(!ok && err.contains("plugin name"), "{err}");
    let (ok, _, err) = stoa_api(&node, &["room", "destroy", &room("ghost")]).await;
    assert!(!ok && err.contains("not_found") && err.contains("no room"), "{err}");
    let (ok, _, err) = stoa(&["room", "destroy", &r, "--admin", &node.admin_addr.to_string(), "--token", "wrong"], &[], None).await;
    assert!(!ok && err.contains("unauthorized"), "{err}");

    let (ok, out, err) = stoa_api(&node, &["room", "destroy", &r, "--reason", "moving on"]).await;
    assert!(ok, "{out}{err}");
    let destroyed = ann.wait_for("destroyed", |f| f["op"] == "destroyed").await;
    assert_eq!(destroyed["reason"], "moving on", "{destroyed}");
    assert!(db.store().await.load_room(&stoa::protocol::RoomAddr(r.clone())).await.unwrap().is_none(), "the room is gone from the store");

    let actor = stoa::store::audit::admin_actor(Some("room-admin-token"));
    let (ok, table, err) = stoa_api(&node, &["admin", "audit"]).await;
    assert!(ok, "{err}");
    let destroy_line = table.lines().find(|l| l.contains("room_destroy") && l.contains(" done ")).unwrap_or_else(|| panic!("{table}"));
    assert!(destroy_line.contains(&actor) && destroy_line.contains(r#"reason="moving on""#), "{table}");
    assert!(destroy_line.starts_with("20") && destroy_line.as_bytes()[10] == b' ', "a UTC time first: {table}");
    assert!(table.lines().any(|l| l.contains("room_configure") && l.contains("subject=\"new topic\"")), "{table}");
    let (ok, json_text, err) = stoa_api(&node, &["admin", "audit", "--format", "json"]).await;
    assert!(ok, "{err}");
    let audit: Value = serde_json::from_str(&json_text).unwrap_or_else(|e| panic!("{e}: {json_text}"));
    let newest = &audit["entries"][0];
    assert_eq!((newest["action"].as_str(), newest["actor"].as_str()), (Some("room_destroy"), Some(actor.as_str())), "{audit}");
    assert_eq!(newest["detail"]["reason"], "moving on", "detail is fields: {audit}");
    assert!(newest["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{audit}");
}

/// Issue 9: `stoa session list` shows the live sessions; `stoa session kick ID` (or `--user`)
/// closes the session's connections (1008) and its token no longer resumes, while other
/// sessions keep working; unknown and malformed ids get clear errors.
pub async fn a_kicked_session_loses_its_connection_and_its_token(db: &TestDb) {
    let mut settings = db.settings("kick");
    settings.auth.admin_token = "kick-admin-token".into();
    let node = TestNode::start(settings).await;
    let mut ann = Client::connect_raw(node.client_addr).await;
    let ann_token = ann.hello("ann").await["session"].as_str().unwrap().to_owned();
    let mut bob = Client::connect_raw(node.client_addr).await;
    bob.hello("bob").await;
    let r = room("kickroom");
    ann.create(&r, json!({})).await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;

    let (ok, table, err) = stoa_api(&node, &["session", "list"]).await;
    assert!(ok, "{err}");
    assert!(table.contains(&ann.user) && table.contains(&bob.user), "{table}");
    let (ok, listed, err) = stoa_api(&node, &["session", "list", "--user", &ann.user, "--json"]).await;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{listed}");
    assert_eq!(sessions[0]["connections_here"], 1, "{listed}");
    let id = sessions[0]["id"].as_str().unwrap().to_owned();

    let (ok, out, err) = stoa_api(&node, &["session", "kick", &id]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("1 connection(s) closed"), "{out}");
    assert_eq!(ann.await_close().await, Some(1008), "a kicked connection closes with 1008");
    let resumed = login(node.client_addr, json!({"token": ann_token})).await;
    assert_error(&resumed, "unauthorized", "a kicked session's token");
    bob.send_acked(&r, "still here", "b1").await;

    let (ok, _, err) = stoa_api(&node, &["session", "kick", "--user", &bob.user]).await;
    assert!(ok, "{err}");
    assert_eq!(bob.await_close().await, Some(1008));

    let (ok, _, err) = stoa_api(&node, &["session", "kick", "0123456789abcdef"]).await;
    assert!(!ok && err.contains("not_found"), "{err}");
    let (ok, _, err) = stoa_api(&node, &["session", "kick", "nope"]).await;
    assert!(!ok && err.contains("16 lower-case hex digits"), "{err}");
    let (status, body) = http_post(node.admin_addr, "/api/sessions/nope/kick", node.token.as_deref()).await;
    assert_eq!(status, 400, "the API validates too: {body}");
    let audit = node.admin_json("/api/audit").await;
    assert!(audit["entries"].as_array().unwrap().iter().any(|e| e["action"] == "session_kick" && e["outcome"] == "done"), "{audit}");
}

/// A POST with no body through the admin client.
async fn http_post(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let answer = stoa::admin_client::request(&addr.to_string(), "POST", path, token, DEADLINE).await.expect("POST to the admin API");
    (answer.status, answer.body)
}
