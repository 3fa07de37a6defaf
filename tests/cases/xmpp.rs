//! XMPP clients (issue 11): a real client, slixmpp (tests/xmpp/client.py, pinned in
//! tests/xmpp/requirements.txt, installed into `.venv-xmpp` by `.ci/run`), logs in to a node's
//! c2s listener, joins Stoa rooms and chats with protocol v1 clients in the same rooms; raw
//! sockets send what no well-behaved client would.

use crate::harness::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The Python with slixmpp: `STOA_TEST_PYTHON`, or `.venv-xmpp/bin/python` of the checkout.
fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("STOA_TEST_PYTHON") {
        return p.into();
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-xmpp/bin/python");
    assert!(
        venv.exists(),
        "the XMPP tests drive slixmpp from {}: create it with `python3 -m venv .venv-xmpp && .venv-xmpp/bin/pip install -r tests/xmpp/requirements.txt` (.ci/run does), or set STOA_TEST_PYTHON",
        venv.display()
    );
    venv
}

/// A slixmpp client process, driven by JSON lines (tests/xmpp/client.py).
pub struct XmppClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Events read while waiting for another.
    seen: Vec<Value>,
    pub jid: String,
}

impl XmppClient {
    /// Log in as `user` with `password` (SASL PLAIN on loopback), or as a guest (ANONYMOUS)
    /// when `password` is `None`.
    pub async fn connect(addr: SocketAddr, user: &str, password: Option<&str>) -> XmppClient {
        XmppClient::connect_with(addr, user, password, "PLAIN").await
    }

    /// [`XmppClient::connect`] with the SASL mechanism of a password login: `PLAIN`,
    /// `SCRAM-SHA-256` or `SCRAM-SHA-1`.
    pub async fn connect_with(addr: SocketAddr, user: &str, password: Option<&str>, mechanism: &str) -> XmppClient {
        match XmppClient::try_connect_with(addr, user, password, mechanism).await {
            Ok(c) => c,
            Err(event) => panic!("{user} could not log in over XMPP with {mechanism}: {event}"),
        }
    }

    /// [`XmppClient::connect_with`] that may fail: the first event that is not
    /// `session_start` (`failed_auth`, `disconnected`).
    pub async fn try_connect_with(addr: SocketAddr, user: &str, password: Option<&str>, mechanism: &str) -> Result<XmppClient, Value> {
        let mut cmd = tokio::process::Command::new(python());
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/xmpp/client.py")).args(["--port", &addr.port().to_string()]);
        match password {
            Some(p) => cmd.args(["--jid", &format!("{user}@localhost/test"), "--password", p, "--mech", mechanism]),
            None => cmd.args(["--jid", "localhost", "--anonymous"]),
        };
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true).spawn().expect("starting tests/xmpp/client.py");
        let stdin = child.stdin.take().expect("piped");
        let events = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut c = XmppClient { child, stdin, events, seen: Vec::new(), jid: String::new() };
        let start = c.event("session start", |e| e["event"] == "session_start" || e["event"] == "failed_auth" || e["event"] == "disconnected").await;
        if start["event"] != "session_start" {
            return Err(start);
        }
        c.jid = start["jid"].as_str().expect("jid").to_owned();
        Ok(c)
    }

    pub async fn command(&mut self, cmd: Value) {
        let line = format!("{cmd}\n");
        self.stdin.write_all(line.as_bytes()).await.expect("writing to client.py");
    }

    /// The next event `pred` accepts (others are kept for later), within 20 s.
    pub async fn event(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        if let Some(i) = self.seen.iter().position(&mut pred) {
            return self.seen.remove(i);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let line = tokio::time::timeout_at(deadline, self.events.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {what} from the XMPP client in 20 s; seen: {:?}", self.seen))
                .expect("reading client.py")
                .unwrap_or_else(|| panic!("client.py ended while waiting for {what}; seen: {:?}", self.seen));
            let event: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("client.py printed {line}"));
            if pred(&event) {
                return event;
            }
            self.seen.push(event);
        }
    }

    pub async fn join(&mut self, room: &str, nick: &str, extra: Value) -> Value {
        let mut cmd = json!({"op": "join", "room": room, "nick": nick});
        if let (Some(cmd), Some(extra)) = (cmd.as_object_mut(), extra.as_object()) {
            cmd.extend(extra.clone());
        }
        self.command(cmd).await;
        self.event(&format!("join answer for {nick}"), |e| (e["event"] == "joined" || e["event"] == "join_error") && e["room"] == room).await
    }

    pub async fn iq(&mut self, to: &str, xml: &str) -> Value {
        self.command(json!({"op": "iq", "to": to, "xml": xml})).await;
        self.event("iq answer", |e| matches!(e["event"].as_str(), Some("iq_result" | "iq_error" | "iq_timeout"))).await
    }

    /// An IQ `set` (`iq` sends a `get`).
    pub async fn iq_set(&mut self, to: &str, xml: &str) -> Value {
        self.command(json!({"op": "iq", "to": to, "type": "set", "xml": xml})).await;
        self.event("iq answer", |e| matches!(e["event"].as_str(), Some("iq_result" | "iq_error" | "iq_timeout"))).await
    }

    pub async fn groupchat(&mut self, body: &str) -> Value {
        self.event(&format!("groupchat `{body}`"), |e| e["event"] == "groupchat" && e["body"] == body).await
    }

    /// Whether an event `event` arrived and was passed over by [`XmppClient::event`] so far.
    pub fn seen_event(&self, event: &str) -> bool {
        self.seen.iter().any(|e| e["event"] == event)
    }

    /// Ask the client to log out and end (it may have ended already: its stream was cut).
    pub async fn quit(mut self) {
        let _ = self.stdin.write_all(b"{\"op\":\"quit\"}\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// A node on `db` serving XMPP c2s on a loopback port of its own, with user ann registered.
async fn xmpp_node(db: &TestDb) -> TestNode {
    let mut s = db.settings("x1");
    s.xmpp.c2s = Some("127.0.0.1:0".parse().expect("literal"));
    let node = TestNode::start(s).await;
    stoa::auth::Auth::new(db.store().await, false, 3600).add_user("ann", "correct horse battery").await.expect("registering ann");
    node
}

/// slixmpp and v1 clients in one room: same messages, same order, one stored copy of a resent
/// origin-id, stanza-id = the stored message id; history on join with XEP-0203 delay and the
/// subject last; disco, ping, self-ping and an unsupported IQ.
pub async fn xmpp_and_v1_clients_share_a_room(db: &TestDb) {
    let node = xmpp_node(db).await;
    let xmpp_addr = node.xmpp_addr.expect("c2s listener");
    let room = room("lobby");
    let mut ann = XmppClient::connect(xmpp_addr, "ann", Some("correct horse battery")).await;
    assert!(ann.jid.starts_with("ann@localhost/"), "{}", ann.jid);
    // slixmpp enables stream management (XEP-0198) where offered; acks flow all along.
    ann.event("stream management", |e| e["event"] == "sm_enabled").await;

    // Joining a room that does not exist creates it (201), with 110 and 100 on the self-presence.
    let joined = ann.join(&room, "Ann", json!({})).await;
    assert_eq!(joined["event"], "joined", "{joined}");
    assert_eq!(joined["status"], json!([100, 110, 201]), "{joined}");

    // A v1 client joins the same room and sees Ann.
    let mut bob = node.client("bob").await;
    let j = bob.join(&room, "Bob").await;
    assert_eq!(j["op"], "joined", "{j}");
    assert!(j["occupants"].as_array().unwrap().iter().any(|o| o["nick"] == "Ann"), "{j}");
    let p = ann.event("Bob's presence", |e| e["event"] == "presence" && e["nick"] == "Bob").await;
    assert_eq!(p["type"], "available", "{p}");

    // v1 → XMPP, and XMPP → v1 (origin-id is the cid), each side in the same order.
    let seq1 = bob.send_acked(&room, "hello from v1", "b1").await;
    let m = ann.groupchat("hello from v1").await;
    assert_eq!(m["nick"], "Bob");
    assert!(m["stanza_id"].as_str().is_some_and(|s| !s.is_empty()), "{m}");
    assert!(m["occupant_id"].as_str().is_some(), "{m}");
    ann.command(json!({"op": "send", "room": room, "body": "hello from xmpp", "origin_id": "ann-1"})).await;
    let reflected = ann.groupchat("hello from xmpp").await;
    assert_eq!(reflected["origin_id"], "ann-1", "{reflected}");
    let v1 = bob.wait_for("Ann's message", |f| f["op"] == "message" && f["body"] == "hello from xmpp").await;
    assert_eq!(v1["cid"], "ann-1");
    assert_eq!(v1["seq"].as_u64(), Some(seq1 + 1), "{v1}");

    // A resend with the same origin-id is stored once and reflected again.
    ann.command(json!({"op": "send", "room": room, "body": "hello from xmpp", "origin_id": "ann-1"})).await;
    let again = ann.groupchat("hello from xmpp").await;
    assert_eq!(again["origin_id"], "ann-1");
    let seq3 = bob.send_acked(&room, "after the resend", "b2").await;
    assert_eq!(seq3, seq1 + 2, "the resend was stored again");
    ann.groupchat("after the resend").await;

    // stanza-id is the stored message's id.
    let stored = db.stored_messages(&room).await;
    assert_eq!(stored.len(), 3);
    assert_eq!(Some(stored[0].id.as_str()), m["stanza_id"].as_str());
    assert_eq!(Some(stored[1].id.as_str()), reflected["stanza_id"].as_str());

    // A guest joins with maxstanzas=2: the last two messages, delayed, in order, then the subject.
    let mut guest = XmppClient::connect(xmpp_addr, "guest", None).await;
    assert!(guest.jid.starts_with("guest~"), "{}", guest.jid);
    let g = guest.join(&room, "Guest", json!({"maxstanzas": 2})).await;
    assert_eq!(g["event"], "joined", "{g}");
    assert_eq!(g["status"], json!([100, 110]), "{g}");
    assert_eq!(g["occupants"], json!(["Ann", "Bob", "Guest"]), "{g}");
    let history: Vec<&str> = g["history"].as_array().unwrap().iter().map(|h| h["body"].as_str().unwrap()).collect();
    assert_eq!(history, ["hello from xmpp", "after the resend"], "{g}");
    assert!(g["history"].as_array().unwrap().iter().all(|h| h["delay"] == true), "{g}");

    // Nick conflicts are refused with `conflict`.
    let mut ann2 = XmppClient::connect(xmpp_addr, "ann", Some("correct horse battery")).await;
    let c = ann2.join(&room, "Bob", json!({})).await;
    assert_eq!(c["event"], "join_error", "{c}");
    assert_eq!(c["condition"], "conflict", "{c}");

    // Disco and ping: the server, the room service, the room; self-ping (XEP-0410).
    let info = ann.iq(&room, "<query xmlns='http://jabber.org/protocol/disco#info'/>").await;
    assert_eq!(info["event"], "iq_result", "{info}");
    let xml = info["xml"].as_str().unwrap();
    assert!(xml.contains("http://jabber.org/protocol/muc") && xml.contains("muc_persistent") && xml.contains("urn:xmpp:sid:0"), "{xml}");
    let items = ann.iq("conference.localhost", "<query xmlns='http://jabber.org/protocol/disco#items'/>").await;
    assert!(items["xml"].as_str().unwrap().contains("lobby@conference.localhost"), "{items}");
    let server = ann.iq("localhost", "<query xmlns='http://jabber.org/protocol/disco#info'/>").await;
    assert!(server["xml"].as_str().unwrap().contains("urn:xmpp:ping"), "{server}");
    ann.command(json!({"op": "ping", "to": format!("{room}/Ann")})).await;
    ann.event("self-ping", |e| e["event"] == "pong").await;
    ann.command(json!({"op": "ping", "to": format!("{room}/Nobody")})).await;
    let e = ann.event("ping of another nick", |e| e["event"] == "iq_error").await;
    assert_eq!(e["condition"], "not-acceptable", "{e}");
    let unknown = ann.iq("localhost", "<query xmlns='urn:example:unknown'/>").await;
    assert_eq!(unknown["condition"], "service-unavailable", "{unknown}");
    let missing = ann.iq("nosuchroom@conference.localhost", "<query xmlns='http://jabber.org/protocol/disco#info'/>").await;
    assert_eq!(missing["condition"], "item-not-found", "{missing}");

    // MAM (XEP-0313): the archive paged forwards and backwards by stanza-id, filtered by nick.
    for i in 0..5 {
        bob.send_acked(&room, &format!("archived {i}"), &format!("arch-{i}")).await;
    }
    let stored = db.stored_messages(&room).await;
    let ids: Vec<&str> = stored.iter().map(|m| m.id.as_str()).collect();
    ann.command(json!({"op": "mam", "room": room, "max": 3})).await;
    let page1 = ann.event("MAM page 1", |e| e["event"] == "mam" || e["event"] == "iq_error").await;
    assert_eq!(page1["event"], "mam", "{page1}");
    let got: Vec<&str> = page1["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids[..3], "{page1}");
    assert_eq!(page1["complete"], false, "{page1}");
    assert_eq!(page1["count"], 8, "{page1}");
    assert_eq!(page1["last"], ids[2], "{page1}");
    assert_eq!(page1["results"][0]["body"], "hello from v1");
    assert!(page1["results"].as_array().unwrap().iter().all(|r| r["delay"] == true), "{page1}");
    ann.command(json!({"op": "mam", "room": room, "max": 100, "after": ids[2]})).await;
    let page2 = ann.event("MAM page 2", |e| e["event"] == "mam" || e["event"] == "iq_error").await;
    let got: Vec<&str> = page2["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids[3..], "{page2}");
    assert_eq!(page2["complete"], true, "{page2}");
    ann.command(json!({"op": "mam", "room": room, "max": 2, "before": ids[7]})).await;
    let back = ann.event("MAM page before the last", |e| e["event"] == "mam" || e["event"] == "iq_error").await;
    let got: Vec<&str> = back["results"].as_array().expect("results").iter().map(|r| r["body"].as_str().unwrap()).collect();
    assert_eq!(got, ["archived 2", "archived 3"], "{back}");
    assert_eq!(back["complete"], false, "{back}");
    ann.command(json!({"op": "mam", "room": room, "with": format!("{room}/Ann")})).await;
    let mine = ann.event("MAM of Ann", |e| e["event"] == "mam" || e["event"] == "iq_error").await;
    let got: Vec<&str> = mine["results"].as_array().unwrap().iter().map(|r| r["body"].as_str().unwrap()).collect();
    assert_eq!(got, ["hello from xmpp"], "{mine}");
    ann.command(json!({"op": "mam", "room": room, "after": "no-such-id"})).await;
    let missing = ann.event("MAM after an unknown id", |e| e["event"] == "mam" || e["event"] == "iq_error").await;
    assert_eq!(missing["condition"], "item-not-found", "{missing}");

    // Leaving shows as a `left` presence to v1.
    ann.command(json!({"op": "leave", "room": room, "nick": "Ann"})).await;
    let left = bob.wait_for("Ann's leave", |f| f["op"] == "presence" && f["nick"] == "Ann" && f["status"] == "left").await;
    assert_eq!(left["room"], room.as_str());

    // The room still works for everyone after all that.
    bob.send_acked(&room, "still here", "b3").await;
    guest.groupchat("still here").await;

    ann.quit().await;
    ann2.quit().await;
    guest.quit().await;
    node.stop().await;
}

/// Read from `s` until `needle` shows up or the stream ends; returns what was read.
pub async fn read_until(s: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if text.contains(needle) {
            return text;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return text,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no `{needle}` in 10 s; got: {text}"),
        }
    }
}

const OPEN: &str = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

/// Send `text` on a fresh c2s connection and expect the stream error `condition`, then the
/// stream's end and a closed socket.
async fn expect_stream_error(addr: SocketAddr, text: &str, condition: &str) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connecting to c2s");
    s.write_all(text.as_bytes()).await.expect("writing");
    let got = read_until(&mut s, "</stream:stream>").await;
    assert!(got.contains(&format!("<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>")), "expected {condition} for {text:.80}: {got}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the socket stayed open after the stream error");
}

/// Bad input on the c2s listener: XML bombs, DTDs, wrong domains, over-long and over-deep
/// stanzas, stanzas before authentication, bad SASL. Each gets its stream error or SASL
/// failure, and the node (and a client in a room) keeps working.
pub async fn xmpp_bad_input_gets_stream_errors_and_the_node_keeps_working(db: &TestDb) {
    let node = xmpp_node(db).await;
    let addr = node.xmpp_addr.expect("c2s listener");
    let room = room("steady");
    let mut bob = node.client("bob").await;
    bob.create(&room, json!({})).await;
    bob.join(&room, "Bob").await;

    let bomb = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol1 '&lol;&lol;&lol;&lol;'>]><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
    expect_stream_error(addr, bomb, "not-well-formed").await;
    expect_stream_error(addr, &format!("{OPEN}<message><body>&lol;</body></message>"), "not-well-formed").await;
    expect_stream_error(addr, &OPEN.replace("'localhost'", "'example.org'"), "host-unknown").await;
    expect_stream_error(addr, &OPEN.replace("to='localhost' version='1.0'", "to='localhost' version='0.9'"), "unsupported-version").await;
    expect_stream_error(addr, &format!("{OPEN}<message to='x@localhost'><body>hi</body></message>"), "not-authorized").await;
    expect_stream_error(addr, &format!("{OPEN}<a>{}", "x".repeat(300 * 1024)), "policy-violation").await;
    expect_stream_error(addr, &format!("{OPEN}{}", "<a>".repeat(40)), "policy-violation").await;
    expect_stream_error(addr, &format!("{OPEN}<a></b>"), "not-well-formed").await;

    // SASL: a wrong password is a failure, the stream goes on; a third ends it.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(OPEN.as_bytes()).await.unwrap();
    let features = read_until(&mut s, "</stream:features>").await;
    assert!(features.contains("<mechanism>PLAIN</mechanism>") && features.contains("<mechanism>ANONYMOUS</mechanism>"), "{features}");
    use base64::Engine as _;
    let bad = base64::engine::general_purpose::STANDARD.encode(b"\0ann\0wrong password");
    let mut got = String::new();
    for attempt in 1..=3 {
        s.write_all(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{bad}</auth>").as_bytes()).await.unwrap();
        got = read_until(&mut s, "</failure>").await;
        assert!(got.contains("<not-authorized/>"), "attempt {attempt}: {got}");
    }
    if !got.contains("</stream:stream>") {
        got = read_until(&mut s, "</stream:stream>").await;
    }
    assert!(got.contains("policy-violation"), "{got}");
    // An unknown mechanism and garbage base64.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(OPEN.as_bytes()).await.unwrap();
    read_until(&mut s, "</stream:features>").await;
    s.write_all(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='X-MAGIC'>AA==</auth>").await.unwrap();
    assert!(read_until(&mut s, "</failure>").await.contains("<invalid-mechanism/>"));
    s.write_all(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>***</auth>").await.unwrap();
    assert!(read_until(&mut s, "</failure>").await.contains("<incorrect-encoding/>"));
    drop(s);

    // A logged-in client sending junk stanzas gets stanza errors and stays connected.
    let mut ann = XmppClient::connect(addr, "ann", Some("correct horse battery")).await;
    assert_eq!(ann.join(&room, "Ann", json!({})).await["event"], "joined");
    ann.command(json!({"op": "raw", "xml": "<message to='not a jid@@' type='groupchat'><body>x</body></message>"})).await;
    let e = ann.event("jid-malformed", |e| e["event"] == "message_error").await;
    assert_eq!(e["condition"], "jid-malformed", "{e}");
    ann.command(json!({"op": "raw", "xml": format!("<message to='{room}/Bob' type='chat'><body>psst</body></message>")})).await;
    let e = ann.event("private message refused", |e| e["event"] == "message_error").await;
    assert_eq!(e["condition"], "not-acceptable", "{e}");
    ann.command(json!({"op": "raw", "xml": format!("<message to='{room}' type='groupchat'><body>{}</body></message>", "y".repeat(20_000))})).await;
    let e = ann.event("too large", |e| e["event"] == "message_error").await;
    assert_eq!(e["condition"], "not-acceptable", "{e}");
    assert!(e["text"].as_str().unwrap().contains("16384 bytes"), "{e}");
    ann.command(json!({"op": "send", "room": room, "body": "still fine"})).await;
    ann.groupchat("still fine").await;
    bob.wait_for("Ann's message", |f| f["op"] == "message" && f["body"] == "still fine").await;

    ann.quit().await;
    node.stop().await;
}

/// The next text message of a WebSocket, within 10 s.
async fn next_text<S>(ws: &mut S) -> String
where
    S: futures_util::Stream<Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a message in 10 s").expect("open").expect("frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return t.to_string();
        }
    }
}

/// XMPP over WebSocket (RFC 7395) at /xmpp-websocket on the client listener: the subprotocol
/// echoed, `<open/>`, SASL, the restart, binding, a MUC join and a groupchat message that a v1
/// client in the room sees, one element per message with its namespaces, and `<close/>`.
pub async fn xmpp_over_websocket_joins_and_chats(db: &TestDb) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let node = xmpp_node(db).await;
    let room = room("wsroom");
    let mut bob = node.client("bob").await;
    bob.create(&room, json!({})).await;
    bob.join(&room, "Bob").await;

    let mut request = format!("ws://{}/xmpp-websocket", node.client_addr).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "xmpp".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.expect("XMPP WebSocket upgrade");
    assert_eq!(response.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap()), Some("xmpp"));
    let open = "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>";
    ws.send(Message::text(open)).await.unwrap();
    assert!(next_text(&mut ws).await.starts_with("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'"));
    let features = next_text(&mut ws).await;
    assert!(features.starts_with("<stream:features xmlns:stream='http://etherx.jabber.org/streams'>") && features.contains("PLAIN"), "{features}");
    use base64::Engine as _;
    let plain = base64::engine::general_purpose::STANDARD.encode(b"\0ann\0correct horse battery");
    ws.send(Message::text(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"))).await.unwrap();
    assert!(next_text(&mut ws).await.contains("<success"));
    ws.send(Message::text(open)).await.unwrap();
    assert!(next_text(&mut ws).await.starts_with("<open"));
    assert!(next_text(&mut ws).await.contains("urn:ietf:params:xml:ns:xmpp-bind"));
    ws.send(Message::text("<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>web</resource></bind></iq>")).await.unwrap();
    let bound = next_text(&mut ws).await;
    assert!(bound.starts_with("<iq xmlns='jabber:client'") && bound.contains("<jid>ann@localhost/web</jid>"), "{bound}");

    ws.send(Message::text(format!("<presence xmlns='jabber:client' to='{room}/Ann'><x xmlns='http://jabber.org/protocol/muc'/></presence>"))).await.unwrap();
    let mut got = Vec::new();
    while !got.iter().any(|m: &String| m.contains("<subject")) {
        let m = next_text(&mut ws).await;
        assert!(m.starts_with("<presence xmlns='jabber:client'") || m.starts_with("<message xmlns='jabber:client'"), "{m}");
        got.push(m);
    }
    assert!(got.iter().any(|m| m.contains("status code='110'")), "{got:?}");
    ws.send(Message::text(format!("<message xmlns='jabber:client' to='{room}' type='groupchat' id='w1'><body>over websocket</body></message>"))).await.unwrap();
    let f = bob.wait_for("Ann's message", |f| f["op"] == "message" && f["body"] == "over websocket").await;
    assert_eq!(f["cid"], "w1");
    loop {
        let m = next_text(&mut ws).await;
        if m.contains("over websocket") {
            assert!(m.contains("urn:xmpp:sid:0"), "{m}");
            break;
        }
    }
    // Not well-formed input ends the stream with a stream error, then <close/>.
    ws.send(Message::text("<message><body>unclosed</wrong></message>")).await.unwrap();
    let error = next_text(&mut ws).await;
    assert!(error.starts_with("<stream:error xmlns:stream='http://etherx.jabber.org/streams'>") && error.contains("not-well-formed"), "{error}");
    assert!(next_text(&mut ws).await.starts_with("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'"));
    bob.wait_for("Ann's leave", |f| f["op"] == "presence" && f["nick"] == "Ann" && f["status"] == "left").await;
    node.stop().await;
}

/// Converse.js 12 (tests/browser, npm, pinned with its lockfile) in headless Debian Chromium
/// (playwright-core), over /xmpp-websocket: logs in, joins, sees a v1 client's message, sends
/// one the v1 client sees, and after a reload in a fresh browser context (no cached state) sees
/// both again, in order, from the server.
pub async fn converse_js_in_chromium_chats_with_v1_and_reloads(db: &TestDb) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/converse.js").exists() && dir.join("node_modules/playwright-core").exists(),
        "the browser test needs Converse.js and playwright-core: `cd tests/browser && npm ci` (.ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(std::path::Path::new(&chromium).exists(), "the browser test needs Chromium at {chromium} (Debian: apt-get install chromium; .ci/run does), or CHROMIUM=path");
    let node = xmpp_node(db).await;
    let room = room("browser");
    let mut bob = node.client("bob").await;
    bob.create(&room, json!({})).await;
    bob.join(&room, "Bob").await;

    let mut child = tokio::process::Command::new("node")
        .arg(dir.join("converse.mjs"))
        .args(["--ws", &format!("ws://{}/xmpp-websocket", node.client_addr)])
        .args(["--jid", "ann@localhost", "--password", "correct horse battery", "--room", &room, "--nick", "Ann"])
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("running node tests/browser/converse.mjs (is Node.js installed?)");
    let mut stdin = child.stdin.take().unwrap();
    let mut events = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut event = async |what: &str| -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), events.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {what} from Converse.js in 60 s"))
            .expect("reading converse.mjs")
            .unwrap_or_else(|| panic!("converse.mjs ended before {what}"));
        let e: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("converse.mjs printed {line}"));
        assert_ne!(e["event"], "error", "Converse.js failed at {what}: {e}");
        e
    };
    assert_eq!(event("the join").await["event"], "joined");
    bob.wait_for("Ann's presence", |f| f["op"] == "presence" && f["nick"] == "Ann" && f["status"] == "joined").await;

    bob.send_acked(&room, "hello from v1", "b1").await;
    stdin.write_all(b"{\"op\":\"wait_text\",\"text\":\"hello from v1\"}\n").await.unwrap();
    assert_eq!(event("v1's message").await["event"], "text");
    stdin.write_all(b"{\"op\":\"send\",\"body\":\"hello from the browser\"}\n").await.unwrap();
    let m = bob.wait_for("the browser's message", |f| f["op"] == "message" && f["body"] == "hello from the browser").await;
    assert_eq!(m["nick"], "Ann");

    stdin.write_all(b"{\"op\":\"reload\"}\n").await.unwrap();
    assert_eq!(event("the join after a reload").await["event"], "joined");
    stdin.write_all(b"{\"op\":\"wait_text\",\"text\":\"hello from the browser\"}\n").await.unwrap();
    event("history after the reload").await;
    stdin.write_all(b"{\"op\":\"messages\"}\n").await.unwrap();
    let texts = event("the messages").await;
    let texts: Vec<&str> = texts["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(texts, ["hello from v1", "hello from the browser"], "after the reload");

    stdin.write_all(b"{\"op\":\"quit\"}\n").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    node.stop().await;
}

/// XEP-0045 owner and admin use cases from slixmpp: the configuration form (get, submit),
/// kick (307 to the kicked occupant), affiliations by JID and their lists, a members-only room
/// refusing a guest, destroy.
pub async fn xmpp_owners_configure_kick_affiliate_and_destroy(db: &TestDb) {
    let node = xmpp_node(db).await;
    let addr = node.xmpp_addr.expect("c2s listener");
    let room = room("modroom");
    let mut ann = XmppClient::connect(addr, "ann", Some("correct horse battery")).await;
    assert_eq!(ann.join(&room, "Ann", json!({})).await["status"], json!([100, 110, 201]));

    let form = ann.iq(&room, "<query xmlns='http://jabber.org/protocol/muc#owner'/>").await;
    assert_eq!(form["event"], "iq_result", "{form}");
    assert!(form["xml"].as_str().unwrap().contains("muc#roomconfig_membersonly"), "{form}");

    let mut guest = XmppClient::connect(addr, "guest", None).await;
    assert_eq!(guest.join(&room, "Guest", json!({})).await["event"], "joined");
    let kick = ann.iq_set(&room, "<query xmlns='http://jabber.org/protocol/muc#admin'><item nick='Guest' role='none'><reason>bye</reason></item></query>").await;
    assert_eq!(kick["event"], "iq_result", "{kick}");
    let kicked = guest.event("the kick", |e| e["event"] == "presence" && e["nick"] == "Guest" && e["type"] == "unavailable").await;
    assert_eq!(kicked["status"], json!([110, 307]), "{kicked}");
    let denied = guest.iq(&room, "<query xmlns='http://jabber.org/protocol/muc#owner'/>").await;
    assert_eq!(denied["condition"], "forbidden", "a guest reads no config: {denied}");

    let set = ann.iq_set(&room, "<query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='rita@localhost'/></query>").await;
    assert_eq!(set["event"], "iq_result", "{set}");
    let members = ann.iq(&room, "<query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member'/></query>").await;
    assert!(members["xml"].as_str().unwrap().contains("rita@localhost"), "{members}");

    let submit = "<query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'>\
        <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
        <field var='muc#roomconfig_membersonly'><value>1</value></field></x></query>";
    let configured = ann.iq_set(&room, submit).await;
    assert_eq!(configured["event"], "iq_result", "{configured}");
    let mut other = XmppClient::connect(addr, "guest", None).await;
    let refused = other.join(&room, "Other", json!({})).await;
    assert_eq!(refused["event"], "join_error", "a members-only room refuses a guest: {refused}");
    let bad = ann.iq_set(&room, &submit.replace("muc#roomconfig_membersonly'><value>1", "muc#roomconfig_persistentroom'><value>0")).await;
    assert_eq!(bad["condition"], "not-acceptable", "{bad}");

    let destroy = ann.iq_set(&room, "<query xmlns='http://jabber.org/protocol/muc#owner'><destroy><reason>done</reason></destroy></query>").await;
    assert_eq!(destroy["event"], "iq_result", "{destroy}");
    ann.event("the destroy presence", |e| e["event"] == "presence" && e["type"] == "unavailable").await;
    let gone = ann.iq(&room, "<query xmlns='http://jabber.org/protocol/disco#info'/>").await;
    assert_eq!(gone["event"], "iq_error", "{gone}");

    ann.quit().await;
    guest.quit().await;
    other.quit().await;
    node.stop().await;
}

/// A raw c2s login as ann (PLAIN), up to the features after the restart; returns the socket.
async fn raw_login(addr: SocketAddr) -> tokio::net::TcpStream {
    use base64::Engine as _;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connecting to c2s");
    s.write_all(OPEN.as_bytes()).await.unwrap();
    read_until(&mut s, "</stream:features>").await;
    let plain = base64::engine::general_purpose::STANDARD.encode(b"\0ann\0correct horse battery");
    s.write_all(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>").as_bytes()).await.unwrap();
    assert!(read_until(&mut s, "<success").await.contains("<success"));
    s.write_all(OPEN.as_bytes()).await.unwrap();
    let features = read_until(&mut s, "</stream:features>").await;
    assert!(features.contains("<sm xmlns='urn:xmpp:sm:3'/>"), "{features}");
    s
}

/// XEP-0198: acks (`<r/>` answered with the count of handled stanzas), and resumption: the
/// connection drops without `</stream>`, a message arrives meanwhile, and a new connection
/// resumes the session with `<resume/>`: the unacknowledged stanzas and the queued message
/// come, and the session is still in its room. An unknown id fails and the client binds anew.
pub async fn xmpp_stream_management_acks_and_resumes(db: &TestDb) {
    let node = xmpp_node(db).await;
    let addr = node.xmpp_addr.expect("c2s listener");
    let room = room("smroom");
    let mut bob = node.client("bob").await;
    bob.create(&room, json!({})).await;
    bob.join(&room, "Bob").await;

    let mut s = raw_login(addr).await;
    s.write_all(b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>sm</resource></bind></iq>").await.unwrap();
    read_until(&mut s, "</iq>").await;
    s.write_all(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>").await.unwrap();
    let enabled = read_until(&mut s, "<enabled").await;
    let id = enabled.split("id='").nth(1).and_then(|r| r.split('\'').next()).expect("a resumption id").to_owned();
    s.write_all(format!("<presence to='{room}/Ann'><x xmlns='http://jabber.org/protocol/muc'/></presence>").as_bytes()).await.unwrap();
    read_until(&mut s, "</subject>").await;
    s.write_all(b"<r xmlns='urn:xmpp:sm:3'/>").await.unwrap();
    assert!(read_until(&mut s, "<a xmlns='urn:xmpp:sm:3' h='1'/>").await.contains("h='1'"), "one stanza handled (the join)");
    bob.send_acked(&room, "before the drop", "d1").await;
    read_until(&mut s, "before the drop").await;
    // The client acknowledges nothing and the connection drops (no </stream>).
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.send_acked(&room, "while parked", "d2").await;
    let p = bob.take(|f| f["op"] == "presence" && f["nick"] == "Ann" && f["status"] == "left");
    assert!(p.is_empty(), "a parked session stays in its room: {p:?}");

    let mut s = raw_login(addr).await;
    s.write_all(format!("<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>").as_bytes()).await.unwrap();
    let resumed = read_until(&mut s, "while parked").await;
    assert!(resumed.contains("<resumed xmlns='urn:xmpp:sm:3'") && resumed.contains("h='1'"), "{resumed}");
    let first = resumed.find("before the drop").expect("the unacknowledged message again");
    assert!(first < resumed.find("while parked").unwrap(), "in order: {resumed}");
    // The resumed session is in the room: it can post.
    s.write_all(format!("<message to='{room}' type='groupchat' id='r1'><body>after resuming</body></message>").as_bytes()).await.unwrap();
    bob.wait_for("the resumed session's message", |f| f["op"] == "message" && f["body"] == "after resuming").await;

    // An unknown id (another node's, or expired): <failed/>, then binding works.
    let mut t = raw_login(addr).await;
    t.write_all(b"<resume xmlns='urn:xmpp:sm:3' previd='not-a-session' h='0'/>").await.unwrap();
    assert!(read_until(&mut t, "</failed>").await.contains("<item-not-found"));
    t.write_all(b"<iq type='set' id='b2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>").await.unwrap();
    assert!(read_until(&mut t, "</iq>").await.contains("<jid>ann@localhost/"));
    drop(t);
    drop(s);
    node.stop().await;
}

/// A raw c2s stream, read up to its features (returned).
async fn sasl_stream(addr: SocketAddr) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connecting to c2s");
    s.write_all(OPEN.as_bytes()).await.expect("writing");
    let features = read_until(&mut s, "</stream:features>").await;
    (s, features)
}

/// Send a SASL element with base64 `data` (`=` when empty) and read up to `until`.
async fn sasl_step(s: &mut tokio::net::TcpStream, element: &str, attrs: &str, data: &[u8], until: &str) -> String {
    use base64::Engine as _;
    let data = if data.is_empty() { "=".to_owned() } else { base64::engine::general_purpose::STANDARD.encode(data) };
    s.write_all(format!("<{element} xmlns='urn:ietf:params:xml:ns:xmpp-sasl'{attrs}>{data}</{element}>").as_bytes()).await.expect("writing");
    read_until(s, until).await
}

/// The decoded text of the last `<challenge/>` in `got`.
fn challenge_text(got: &str) -> String {
    use base64::Engine as _;
    let start = got.rfind("<challenge").expect("a challenge");
    let body = &got[start..];
    let body = &body[body.find('>').expect("tag end") + 1..body.find("</challenge>").expect("challenge end")];
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(body).expect("base64 challenge")).expect("UTF-8 challenge")
}

/// SASL SCRAM-SHA-256 and SCRAM-SHA-1 with slixmpp, for users registered after the node
/// started: each logs in (slixmpp checks the server's signature), joins a room and chats; a
/// wrong password fails. A user whose password predates SCRAM credentials logs in with PLAIN
/// only, until its password is set again. On raw sockets: the mechanisms list offers SCRAM
/// before PLAIN, malformed first messages and channel binding are refused, an empty initial
/// response gets an empty challenge, `<abort/>` gets `<aborted/>`, and an unknown user gets a
/// challenge like a registered one (a stable salt), then `not-authorized`, counted in the
/// login throttle.
pub async fn xmpp_scram_logins_and_bad_scram_input(db: &TestDb) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let node = xmpp_node(db).await;
    let addr = node.xmpp_addr.expect("c2s listener");
    let auth = stoa::auth::Auth::new(db.store().await, false, 3600);
    auth.add_user("carol", "pencil sharpener").await.expect("registering carol");
    let room = room("scram");
    let mut bob = node.client("bob").await;
    bob.create(&room, json!({})).await;
    bob.join(&room, "Bob").await;

    for (mechanism, nick) in [("SCRAM-SHA-256", "Carol256"), ("SCRAM-SHA-1", "Carol1")] {
        let mut carol = XmppClient::connect_with(addr, "carol", Some("pencil sharpener"), mechanism).await;
        assert!(carol.jid.starts_with("carol@localhost/"), "{}", carol.jid);
        let joined = carol.join(&room, nick, json!({})).await;
        assert_eq!(joined["event"], "joined", "{joined}");
        let body = format!("hello over {mechanism}");
        carol.command(json!({"op": "send", "room": room, "body": body})).await;
        carol.groupchat(&body).await;
        let m = bob.wait_for("Carol's message", |f| f["op"] == "message" && f["body"] == body.as_str()).await;
        assert_eq!(m["nick"], nick, "{m}");
        carol.quit().await;
    }
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-1"] {
        let refused = XmppClient::try_connect_with(addr, "carol", Some("pencil sharpened"), mechanism).await.err().expect("a wrong password is refused");
        assert_eq!(refused["event"], "failed_auth", "{refused}");
    }

    // A user whose password was set before SCRAM credentials were kept: PLAIN only, until its
    // password is set again.
    let hash = stoa::auth::hash_password("older password").expect("hashing");
    auth.add_user("dora", "placeholder password").await.expect("registering dora");
    let store = db.store().await;
    assert!(store.set_password_hash("dora", &hash, &stoa::store::UserScram::default()).await.expect("clearing SCRAM"));
    assert_eq!(store.users_without_scram().await.expect("listing"), ["dora"], "`stoa user list` shows who needs a new password");
    let refused = XmppClient::try_connect_with(addr, "dora", Some("older password"), "SCRAM-SHA-256").await.err().expect("no SCRAM credentials");
    assert_eq!(refused["event"], "failed_auth", "{refused}");
    XmppClient::connect_with(addr, "dora", Some("older password"), "PLAIN").await.quit().await;
    auth.set_password("dora", "newer password").await.expect("setting dora's password");
    assert!(store.users_without_scram().await.expect("listing").is_empty());
    XmppClient::connect_with(addr, "dora", Some("newer password"), "SCRAM-SHA-1").await.quit().await;

    // The offer: SCRAM first, strongest first, then PLAIN (loopback) and ANONYMOUS (guests).
    let (mut s, features) = sasl_stream(addr).await;
    assert!(
        features.contains("<mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism><mechanism>ANONYMOUS</mechanism>"),
        "{features}"
    );
    assert!(!features.contains("-PLUS"), "{features}");
    // Malformed client-first messages, and channel binding, which is not offered.
    let got = sasl_step(&mut s, "auth", " mechanism='SCRAM-SHA-256'", b"n,,n=carol", "</failure>").await;
    assert!(got.contains("<malformed-request/>"), "{got}");
    let got = sasl_step(&mut s, "auth", " mechanism='SCRAM-SHA-1'", b"p=tls-unique,,n=carol,r=abc", "</failure>").await;
    assert!(got.contains("<invalid-mechanism/>"), "{got}");
    drop(s);
    // No initial response: an empty challenge asks for it. Then `<abort/>`.
    let (mut s, _) = sasl_stream(addr).await;
    let got = sasl_step(&mut s, "auth", " mechanism='SCRAM-SHA-1'", b"", "</challenge>").await;
    assert_eq!(challenge_text(&got), "", "{got}");
    let got = sasl_step(&mut s, "response", "", b"n,,n=carol,r=abcdef", "</challenge>").await;
    let first = challenge_text(&got);
    assert!(first.starts_with("r=abcdef") && first.contains(",s=") && first.ends_with(",i=4096"), "{first}");
    s.write_all(b"<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>").await.unwrap();
    let got = read_until(&mut s, "</failure>").await;
    assert!(got.contains("<aborted/>"), "{got}");
    // A malformed client-final message.
    sasl_step(&mut s, "auth", " mechanism='SCRAM-SHA-256'", b"n,,n=carol,r=abcdef", "</challenge>").await;
    let got = sasl_step(&mut s, "response", "", b"c=biws,p=AAAA", "</failure>").await;
    assert!(got.contains("<malformed-request/>"), "{got}");
    drop(s);

    // An unknown user gets a challenge like a registered user's (the same salt each time),
    // then `not-authorized`; each failure counts in the login throttle (5 per user name), and
    // once it is spent even the first step is refused.
    let mut salt = None;
    let mut failures = 0;
    for _connection in 0..2 {
        let (mut s, _) = sasl_stream(addr).await;
        for _attempt in 0..(if failures == 0 { 3 } else { 2 }) {
            let got = sasl_step(&mut s, "auth", " mechanism='SCRAM-SHA-256'", b"n,,n=nobody,r=xyz", "</challenge>").await;
            let first = challenge_text(&got);
            let fields: Vec<&str> = first.split(',').collect();
            assert!(fields.len() == 3 && fields[0].starts_with("r=xyz") && fields[2] == "i=4096", "{first}");
            assert_eq!(*salt.get_or_insert(fields[1].to_owned()), fields[1], "the salt is stable");
            let last = format!("c=biws,{},p={}", fields[0], b64.encode([0u8; 32]));
            let got = sasl_step(&mut s, "response", "", last.as_bytes(), "</failure>").await;
            assert!(got.contains("<not-authorized/>"), "{got}");
            failures += 1;
        }
    }
    assert_eq!(failures, 5);
    let (mut s, _) = sasl_stream(addr).await;
    let got = sasl_step(&mut s, "auth", " mechanism='SCRAM-SHA-256'", b"n,,n=nobody,r=xyz", "</failure>").await;
    assert!(got.contains("<temporary-auth-failure/>") && got.contains("too many failed logins"), "{got}");
    drop(s);

    // The node is fine: carol still logs in.
    XmppClient::connect_with(addr, "carol", Some("pencil sharpener"), "SCRAM-SHA-256").await.quit().await;
    node.stop().await;
}
