//! The pages built into the binary (docs/operations.md, "Console" and "Chat page"): the rules
//! of the console's session (cookie, CSRF token, Content-Security-Policy) over raw HTTP, the
//! chat page's files on the client listener, and both pages in headless Debian Chromium
//! (playwright-core, tests/browser/console.mjs and chat.mjs) against a real pair.

use crate::cases::failover::Pair;
use crate::harness::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One HTTP/1.1 answer, read whole.
pub(crate) struct Answer {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

/// `method path` with `headers` (and a JSON `body`) over a fresh connection.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> Answer {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    exchange(s, method, path, headers, body).await
}

/// One request and its whole answer over `s` (plain TCP, or TLS: tests/cases/tls.rs).
pub(crate) async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Answer {
    let addr = "127.0.0.1";
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify: what arrived before counts.
    let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw)).await.expect("an answer in time");
    assert!(read.is_ok() || !raw.is_empty(), "no answer: {read:?}");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    // axum answers JSON with Content-Length: no chunked bodies to undo here.
    Answer { status, headers, body: body.to_owned() }
}

const TOKEN: &str = "console-test-token";

/// The console's rules, without a browser: its page and files come with a strict CSP (no
/// inline script) and the other security headers; a wrong token is refused (no cookie); the
/// right one gives an `HttpOnly`, `SameSite=Strict` cookie (not `Secure` without TLS) and a
/// CSRF token; with the cookie, reads work and a state-changing call without the CSRF token
/// (or with a wrong one) is refused 403, with it it runs and is audited under the console's
/// name; bearer-token calls work as before without any CSRF token; the event stream opens
/// with the topology (and ends when the node stops); logout needs the CSRF token and ends the
/// session.
pub async fn console_sessions_need_the_cookie_and_the_csrf_token(db: &TestDb) {
    let mut settings = db.settings("web1");
    settings.auth.admin_token = TOKEN.into();
    let node = TestNode::start(settings).await;
    let admin = node.admin_addr;

    let page = http(admin, "GET", "/", &[], None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(page.body.contains("<script type=\"module\" src=\"console.js\">"), "{}", page.body);
    let csp = page.header("content-security-policy").expect("a CSP").to_owned();
    for rule in ["default-src 'none'", "script-src 'self';", "connect-src 'self'", "frame-ancestors 'none'"] {
        assert!(csp.contains(rule), "the CSP lacks {rule}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    let js = http(admin, "GET", "/console.js", &[], None).await;
    assert_eq!((js.status, js.header("content-type")), (200, Some("text/javascript; charset=utf-8")));
    assert_eq!(http(admin, "GET", "/common.js", &[], None).await.status, 200);

    let wrong = http(admin, "POST", "/api/console/login", &[], Some(&json!({"token": "nope", "name": "eve"}))).await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(wrong.header("set-cookie").is_none(), "a refused sign-in sets no cookie");

    let ok = http(admin, "POST", "/api/console/login", &[], Some(&json!({"token": TOKEN, "name": "ann"}))).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let set = ok.header("set-cookie").expect("a session cookie").to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "the cookie lacks {attribute}: {set}");
    }
    assert!(!set.contains("Secure"), "no TLS, no Secure: {set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("stoa_console_web1="), "{cookie}");
    let csrf = ok.json()["csrf"].as_str().expect("a CSRF token").to_owned();
    assert_eq!(ok.json()["actor"], "console:ann (token:".to_owned() + &stoa::store::audit::admin_actor(Some(TOKEN))[6..] + ")");

    let read = http(admin, "GET", "/api/node", &[("Cookie", &cookie)], None).await;
    assert_eq!(read.status, 200, "a read with the cookie: {}", read.body);
    let session = http(admin, "GET", "/api/console/session", &[("Cookie", &cookie)], None).await;
    assert_eq!(session.json()["csrf"], csrf.as_str(), "a reloaded page gets its CSRF token back");

    // An audited action that needs no pair: ending the sessions of a user who has none.
    let path = "/api/users/nobody/kick";
    let no_csrf = http(admin, "POST", path, &[("Cookie", &cookie)], None).await;
    assert_eq!(no_csrf.status, 403, "a state-changing call without the CSRF token: {}", no_csrf.body);
    let bad_csrf = http(admin, "POST", path, &[("Cookie", &cookie), ("X-CSRF-Token", "0123")], None).await;
    assert_eq!(bad_csrf.status, 403, "with a wrong CSRF token: {}", bad_csrf.body);
    let with = http(admin, "POST", path, &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)], None).await;
    assert_eq!(with.status, 404, "with the CSRF token the call runs (and finds no session): {}", with.body);
    let other_cookie = http(admin, "POST", path, &[("Cookie", "stoa_console_web1=forged"), ("X-CSRF-Token", &csrf)], None).await;
    assert_eq!(other_cookie.status, 401, "a forged cookie is no session: {}", other_cookie.body);

    // The bearer token works as before: no cookie, no CSRF token.
    let bearer = format!("Bearer {TOKEN}");
    let plain = http(admin, "POST", path, &[("Authorization", &bearer)], None).await;
    assert_eq!(plain.status, 404, "{}", plain.body);
    let audit = http(admin, "GET", "/api/audit", &[("Authorization", &bearer)], None).await.json();
    let actors: Vec<String> = audit["entries"].as_array().unwrap().iter().map(|e| format!("{} {} {}", e["action"], e["actor"], e["outcome"])).collect();
    assert!(actors.iter().any(|a| a.starts_with("\"session_kick\" \"console:ann (token:")), "the console's action is audited under its name: {actors:?}");
    assert!(actors.iter().any(|a| a.starts_with("\"console_login\" \"console:eve") && a.ends_with("\"refused\"")), "{actors:?}");

    // The event stream opens with the topology.
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET /api/events HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n").as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("event: topology") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf)).await.expect("events in time").unwrap();
        assert!(n > 0, "the event stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200") && seen.contains("text/event-stream"), "{seen}");
    let events = s; // left open: the node's shutdown must end it (below)

    let out = http(admin, "POST", "/api/console/logout", &[("Cookie", &cookie)], None).await;
    assert_eq!(out.status, 403, "logout without the CSRF token: {}", out.body);
    let out = http(admin, "POST", "/api/console/logout", &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)], None).await;
    assert_eq!(out.status, 200, "{}", out.body);
    assert!(out.header("set-cookie").is_some_and(|c| c.contains("Max-Age=0")), "logout clears the cookie");
    let after = http(admin, "GET", "/api/node", &[("Cookie", &cookie)], None).await;
    assert_eq!(after.status, 401, "the session ended: {}", after.body);
    tokio::time::timeout(DEADLINE, node.stop()).await.expect("the node stops with an event stream open");
    drop(events);
}

/// The chat page on the client listener: with `web.chat` on, `/` and its files are served with
/// their content types and a CSP whose `connect-src` names the cluster's client URLs; other
/// methods get 405; `/ws` without an upgrade still gets 426 and an unknown path 404; with
/// `web.chat = false` the page is not served.
pub async fn the_client_listener_serves_the_chat_page_when_asked(db: &TestDb) {
    let mut settings = db.settings("chat1");
    settings.web.chat = Some(true);
    settings.cluster.groups = vec![stoa::config::GroupSettings {
        name: "g".into(),
        ha: false,
        nodes: vec![stoa::config::PeerSettings {
            id: "chat1".into(),
            client: "ws://127.0.0.1:1/ws".into(),
            link: "127.0.0.1:2".into(),
            service: settings.node.service.clone(),
            ..Default::default()
        }],
    }];
    let node = TestNode::start(settings).await;
    let client = node.client_addr;
    let page = http(client, "GET", "/", &[], None).await;
    assert_eq!((page.status, page.header("content-type")), (200, Some("text/html; charset=utf-8")), "{}", page.body);
    assert!(page.body.contains("src=\"chat.js\""), "{}", page.body);
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("script-src 'self';") && csp.contains("connect-src 'self' ws://127.0.0.1:1;"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    for (path, kind) in [("/chat.js", "text/javascript; charset=utf-8"), ("/chat.css", "text/css; charset=utf-8"), ("/common.js", "text/javascript; charset=utf-8")] {
        let a = http(client, "GET", path, &[], None).await;
        assert_eq!((a.status, a.header("content-type")), (200, Some(kind)), "{path}");
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"), "{path}");
    }
    assert_eq!(http(client, "POST", "/", &[], None).await.status, 405);
    assert_eq!(http(client, "GET", "/ws", &[], None).await.status, 426);
    assert_eq!(http(client, "GET", "/console.js", &[], None).await.status, 404);
    node.stop().await;

    let mut settings = db.settings("chat2");
    settings.web.chat = Some(false);
    let node = TestNode::start(settings).await;
    assert_eq!(http(node.client_addr, "GET", "/", &[], None).await.status, 404, "web.chat = false");
    node.stop().await;
}

/// A page driver (tests/browser/*.mjs) in headless Chromium: one JSON command, one event.
struct Browser {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    script: &'static str,
}

impl Browser {
    /// Run `tests/browser/<script>` against `url`.
    fn start(script: &'static str, url: &str) -> Browser {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
        assert!(dir.join("node_modules/playwright-core").exists(), "the browser tests need playwright-core: `cd tests/browser && npm ci` (.ci/run does)");
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(std::path::Path::new(&chromium).exists(), "the browser tests need Chromium at {chromium} (Debian: apt-get install chromium; .ci/run does), or CHROMIUM=path");
        let mut child = tokio::process::Command::new("node")
            .arg(dir.join(script))
            .args(["--url", url])
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("STOA_TEST_BROWSER_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
            .kill_on_drop(true)
            .spawn()
            .expect("running node (is Node.js installed?)");
        let stdin = child.stdin.take().unwrap();
        let events = BufReader::new(child.stdout.take().unwrap()).lines();
        Browser { child, stdin, events, script }
    }

    /// Send `cmd` and return its event; a failed command fails the test.
    async fn ask(&mut self, cmd: Value) -> Value {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await.expect("writing to the page driver");
        let line = tokio::time::timeout(Duration::from_secs(90), self.events.next_line())
            .await
            .unwrap_or_else(|_| panic!("{}: no answer to {cmd} in 90 s", self.script))
            .expect("reading the page driver")
            .unwrap_or_else(|| panic!("{} ended before answering {cmd}", self.script));
        let event: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{} printed {line}", self.script));
        assert_ne!(event["event"], "error", "{} failed at {cmd}: {event}", self.script);
        event
    }

    async fn quit(mut self) {
        let _ = self.stdin.write_all(b"{\"op\":\"quit\"}\n").await;
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Where the browser tests leave their screenshots (test artefacts, not committed).
fn screenshot(name: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).expect("creating the screenshot folder");
    dir.join(name).display().to_string()
}

/// A pair 1a + 1b with an admin token and the chat page on, both running and linked.
async fn web_pair(db: &TestDb) -> Pair {
    let mut pair = Pair::configure_with(db, None, Some(TOKEN), "[web]\nchat = true\n");
    crate::cases::failover::start_both(&mut pair).await;
    pair
}

/// The console in Chromium on node 1a of a real pair: a wrong token is refused; the topology
/// shows both nodes `normal`; stopping the `rooms` service of 1a in the console (its
/// confirmation says what will happen, to how many rooms) turns 1a
/// `failed_over_critical_services_not_running` and 1b `running_in_backup_mode` live, with the
/// transitions listed; starting the service and falling back from the console brings both back
/// to `normal`; a room is found by search and shown with its host; the audit log (in the page,
/// and through the API) shows both actions with the console's user; a merge refused because the
/// pair serves its store is listed under the merge jobs. Screenshots go to target/tmp/browser (STOA_REFRESH_DOCS=1 also copies the
/// console's to docs/console.png).
pub async fn console_in_chromium_stops_a_service_and_falls_back(db: &TestDb) {
    let pair = web_pair(db).await;
    let rooms = crate::cases::failover::create_rooms(&pair, 3).await;
    let mut b = Browser::start("console.mjs", &format!("http://{}/", pair.admin(0)));
    b.ask(json!({"op": "open"})).await;

    let refused = b.ask(json!({"op": "signin", "token": "not-the-token", "name": "mallory"})).await;
    assert_eq!(refused["event"], "refused", "{refused}");
    assert!(refused["text"].as_str().unwrap().contains("wrong admin token"), "{refused}");
    let signed = b.ask(json!({"op": "signin", "token": TOKEN, "name": "alice"})).await;
    assert_eq!(signed["event"], "signed_in", "{signed}");
    assert!(signed["who"].as_str().unwrap().starts_with("console:alice"), "{signed}");

    for node in ["1a", "1b"] {
        b.ask(json!({"op": "wait_state", "node": node, "state": "normal"})).await;
    }
    let topology = b.ask(json!({"op": "topology"})).await;
    let nodes = topology["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{topology}");
    assert_eq!(nodes[0]["rooms_hosted"], rooms.len().to_string(), "1a hosts the test rooms: {topology}");
    assert!(nodes[1]["text"].as_str().unwrap().contains("reachable"), "1a sees 1b over the link: {topology}");
    b.ask(json!({"op": "screenshot", "path": screenshot("console-normal.png")})).await;

    let stop = b.ask(json!({"op": "action", "action": "service_stop", "node": "1a", "service": "rooms"})).await;
    let confirm = stop["confirm"].as_str().unwrap();
    assert!(confirm.contains("node 1a fails over") && confirm.contains("its 3 rooms move to node 1b"), "the confirmation says what happens: {stop}");
    assert!(stop["outcome"].as_str().unwrap().contains("done"), "{stop}");
    b.ask(json!({"op": "wait_state", "node": "1a", "state": "failed_over_critical_services_not_running"})).await;
    b.ask(json!({"op": "wait_state", "node": "1b", "state": "running_in_backup_mode"})).await;
    let history = b.ask(json!({"op": "history"})).await;
    let items: Vec<&str> = history["items"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(items.iter().any(|i| i.contains("node 1a: failed_over_critical_services_not_running")), "the transitions: {items:?}");
    assert!(items.iter().any(|i| i.contains("node 1b: running_in_backup_mode")), "the transitions: {items:?}");
    b.ask(json!({"op": "screenshot", "path": screenshot("console-failed-over.png")})).await;
    assert_eq!(crate::cases::failover::hosted(db, "1a").await, 0, "1b hosts every room now");

    let start = b.ask(json!({"op": "action", "action": "service_start", "node": "1a", "service": "rooms"})).await;
    assert!(start["outcome"].as_str().unwrap().contains("done"), "{start}");
    b.ask(json!({"op": "wait_state", "node": "1a", "state": "failed_over"})).await;
    let back = b.ask(json!({"op": "action", "action": "fallback", "node": "1a"})).await;
    assert!(back["confirm"].as_str().unwrap().contains("return to 1a"), "{back}");
    assert!(back["outcome"].as_str().unwrap().contains("done"), "the fallback's real outcome: {back}");
    b.ask(json!({"op": "wait_state", "node": "1a", "state": "normal"})).await;
    b.ask(json!({"op": "wait_state", "node": "1b", "state": "normal"})).await;
    let shot = screenshot("console.png");
    b.ask(json!({"op": "screenshot", "path": shot})).await;
    if std::env::var_os("STOA_REFRESH_DOCS").is_some() {
        std::fs::copy(&shot, std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console.png")).expect("copying the screenshot");
    }

    let room = b.ask(json!({"op": "room", "search": "r1@", "room": rooms[1]})).await;
    assert_eq!(room["list"].as_array().unwrap().len(), 1, "the search finds one room: {room}");
    let text = room["text"].as_str().unwrap();
    assert!(text.contains(&rooms[1]) && text.contains("1a / 1a") && text.contains("No messages."), "the room's detail: {room}");

    let audit = b.ask(json!({"op": "audit"})).await;
    let rows = audit["rows"].as_array().unwrap();
    let by_alice = |action: &str| rows.iter().any(|r| r["action"] == action && r["outcome"] == "done" && r["actor"].as_str().unwrap().starts_with("console:alice"));
    assert!(by_alice("service_stop") && by_alice("fallback"), "the audit log shows both actions by alice: {audit}");
    assert!(rows.iter().any(|r| r["action"] == "console_login" && r["outcome"] == "refused"), "{audit}");
    let filtered = b.ask(json!({"op": "audit", "filter": "fallback"})).await;
    assert!(filtered["rows"].as_array().unwrap().iter().all(|r| r["action"] == "fallback"), "{filtered}");
    // Traffic for the charts: 30 messages through 1a.
    let (writer, _) = stoa::client::Client::connect(&pair.url(0), stoa::client::Login::guest("writer")).await.expect("writer connects");
    writer.join(rooms[0].as_str(), "writer", None, None).await.expect("writer joins");
    for i in 0..30 {
        writer.send(rooms[0].as_str(), format!("m{i}"), stoa::client::new_cid()).await.expect("send");
    }
    let until = r"Messages committed / s: [\d.]+ \(max [1-9]";
    let metrics = b.ask(json!({"op": "tab", "tab": "metrics", "wait": "#charts figure svg", "until": until})).await;
    writer.close().await;
    for chart in ["Messages committed / s", "Deliveries / s", "Commit latency", "Client connections"] {
        assert!(metrics["text"].as_str().unwrap().contains(chart), "{chart} is charted: {metrics}");
    }
    b.ask(json!({"op": "screenshot", "path": screenshot("console-metrics.png")})).await;

    // A merge into this pair's store is refused while its nodes serve it, and the refused job
    // is listed in the console's merge jobs.
    let dir = tempfile::tempdir().unwrap();
    let source = format!("sqlite://{}/other-node.db", dir.path().display());
    let other = stoa::store::Store::connect(&source, 1, "full").await.expect("creating the other node's store");
    other.migrate().await.expect("its schema");
    other.close().await;
    let (merged, text) = crate::harness::run_stoa(&["db", "merge", "--source", &source, "--target", &db.url, "--yes"]).await;
    assert!(!merged, "a merge into a served store is refused: {text}");
    let jobs = b.ask(json!({"op": "tab", "tab": "jobs", "wait": "#jobs table", "until": "refused"})).await;
    assert!(jobs["text"].as_str().unwrap().contains("other-node.db"), "the job names its source: {jobs}");
    b.quit().await;

    let api = pair.call(0, "GET", "/api/audit").await.json();
    let entries = api["entries"].as_array().unwrap();
    for action in ["service_stop", "service_start", "fallback"] {
        assert!(
            entries.iter().any(|e| e["action"] == action && e["actor"].as_str().unwrap().starts_with("console:alice (token:")),
            "{action} by the console's user in the audit log: {api}"
        );
    }
}

/// The chat page in Chromium, two browser contexts on node 1a of a pair: Ann logs in as a
/// guest and creates a room; Bob, a registered user, is refused with a wrong password, logs in
/// with his own and joins the room from the list; they exchange messages; 1a is killed (-9)
/// while Ann keeps sending; both pages resume on 1b by themselves and show every message once,
/// in order, with contiguous seqs (no gap), the ones sent during the outage included. Carol
/// then opens the page of 1b and gets the room's history on joining.
pub async fn chat_page_in_chromium_survives_kill9_of_its_node(db: &TestDb) {
    let mut pair = web_pair(db).await;
    stoa::auth::Auth::new(db.store().await, false, 3600).add_user("bob", "correct horse battery").await.expect("registering bob");
    let mut b = Browser::start("chat.mjs", &format!("http://127.0.0.1:{}/", pair.client_port(0)));
    assert_eq!(b.ask(json!({"op": "open", "who": "ann", "user": "ann"})).await["event"], "logged_in");
    let joined = b.ask(json!({"op": "create", "who": "ann", "room": "lobby"})).await;
    let room = joined["room"].as_str().unwrap().to_owned();
    assert_eq!(room, "lobby@conference-1a.localhost");
    let refused = b.ask(json!({"op": "open", "who": "bob", "user": "bob", "password": "wrong password"})).await;
    assert_eq!(refused["event"], "refused", "{refused}");
    let bob = b.ask(json!({"op": "open", "who": "bob", "user": "bob", "password": "correct horse battery"})).await;
    assert_eq!(bob["event"], "logged_in", "{bob}");
    assert!(bob["status"].as_str().unwrap().ends_with("as bob"), "a registered user, not a guest: {bob}");
    b.ask(json!({"op": "join", "who": "bob", "room": room})).await;

    b.ask(json!({"op": "send", "who": "ann", "body": "hello bob"})).await;
    b.ask(json!({"op": "wait_text", "who": "bob", "text": "hello bob"})).await;
    b.ask(json!({"op": "send", "who": "bob", "body": "hello ann"})).await;
    b.ask(json!({"op": "wait_text", "who": "ann", "text": "hello ann"})).await;
    for i in 1..=3 {
        b.ask(json!({"op": "send", "who": "ann", "body": format!("before {i}")})).await;
    }
    b.ask(json!({"op": "wait_text", "who": "bob", "text": "before 3"})).await;

    let killed = std::time::Instant::now();
    pair.kill(0);
    for i in 1..=3 {
        b.ask(json!({"op": "send", "who": "ann", "body": format!("during {i}")})).await;
    }
    for who in ["ann", "bob"] {
        b.ask(json!({"op": "wait_status", "who": who, "text": "connected to node 1b"})).await;
        b.ask(json!({"op": "wait_text", "who": who, "text": "during 3"})).await;
        eprintln!("chat page: {who} resumed on 1b and sees the messages sent during the outage {} ms after kill -9", killed.elapsed().as_millis());
    }
    b.ask(json!({"op": "send", "who": "bob", "body": "after"})).await;
    b.ask(json!({"op": "wait_text", "who": "ann", "text": "after"})).await;
    b.ask(json!({"op": "wait_text", "who": "bob", "text": "after"})).await;
    b.ask(json!({"op": "screenshot", "who": "ann", "path": screenshot("chat-after-failover.png")})).await;

    let expected = ["hello bob", "hello ann", "before 1", "before 2", "before 3", "during 1", "during 2", "during 3", "after"];
    for who in ["ann", "bob"] {
        let m = b.ask(json!({"op": "messages", "who": who})).await;
        let list = m["list"].as_array().unwrap();
        let seqs: Vec<u64> = list.iter().map(|x| x["seq"].as_u64().unwrap()).collect();
        let bodies: Vec<&str> = list.iter().map(|x| x["body"].as_str().unwrap()).collect();
        assert_eq!(seqs, (1..=expected.len() as u64).collect::<Vec<_>>(), "{who} saw every seq once, in order: {m}");
        assert_eq!(bodies, expected, "{who}'s page: {m}");
        assert_eq!(m["outbox"], json!([]), "nothing left unsent on {who}'s page: {m}");
        assert_eq!(m["problems"], json!([]), "no script error on {who}'s page: {m}");
    }
    // A page of the surviving node: the room's history comes with the join.
    b.ask(json!({"op": "open", "who": "carol", "user": "carol", "url": format!("http://127.0.0.1:{}/", pair.client_port(1))})).await;
    b.ask(json!({"op": "join", "who": "carol", "room": room})).await;
    b.ask(json!({"op": "wait_text", "who": "carol", "text": "after"})).await;
    let m = b.ask(json!({"op": "messages", "who": "carol"})).await;
    let bodies: Vec<&str> = m["list"].as_array().unwrap().iter().map(|x| x["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, expected, "carol's history: {m}");
    let older = b.ask(json!({"op": "older", "who": "carol"})).await;
    assert_eq!(older["button"], "This is the beginning of the room.", "{older}");
    b.quit().await;
    let stored: Vec<String> = db.stored_messages(&room).await.into_iter().map(|m| m.body).collect();
    assert_eq!(stored, expected, "the store has each message once");
}
