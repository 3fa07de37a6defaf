//! Bad input of every kind gets its documented answer (an error code, or a close code for
//! transport violations), and nothing else breaks: the same connection (where it stays
//! open) and the other occupants of the room keep working.

use crate::harness::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// A node, a room, and two occupants `ann` (owner) and `bob`.
async fn room_with_two(node: &TestNode, name: &str) -> (String, Client, Client) {
    let r = room(name);
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    ann.create(&r, json!({})).await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;
    (r, ann, bob)
}

/// Malformed and refused requests (invalid JSON, unknown op, missing or mistyped fields, bad
/// names, oversized bodies, unknown rooms, missing rights) each get their documented error,
/// echoing the request id when it was readable; after each one the same connection and the
/// other occupant still send and receive.
pub async fn malformed_requests_get_errors_and_the_room_keeps_working(db: &TestDb) {
    let node = TestNode::start(db.settings("n1")).await;
    let (r, mut ann, mut bob) = room_with_two(&node, "robust").await;
    let members = room("members");
    ann.create(&members, json!({"public": false, "password": "pw"})).await;
    let max_body = db.settings("n1").limits.max_body_bytes;

    // (label, raw frame, expected code, echoes the id "x")
    let cases: Vec<(&str, String, &str, bool)> = vec![
        ("invalid JSON", "{\"op\": \"send\", ".into(), "bad_request", false),
        ("not an object", "[1, 2, 3]".into(), "bad_request", false),
        ("unknown op", json!({"op": "dance", "id": "x"}).to_string(), "bad_request", true),
        ("missing op", json!({"id": "x", "room": r}).to_string(), "bad_request", true),
        ("missing field", json!({"op": "send", "id": "x", "room": r, "cid": "c"}).to_string(), "bad_request", true),
        ("mistyped field", json!({"op": "send", "id": "x", "room": r, "body": 5, "cid": "c"}).to_string(), "bad_request", true),
        ("mistyped id", json!({"op": "ping", "id": 7}).to_string(), "bad_request", false),
        ("unknown field", json!({"op": "ping", "id": "x", "colour": "red"}).to_string(), "bad_request", true),
        ("second hello", json!({"op": "hello", "id": "x", "v": 1, "user": "ann"}).to_string(), "bad_request", true),
        ("empty body", json!({"op": "send", "id": "x", "room": r, "body": "", "cid": "c"}).to_string(), "bad_request", true),
        ("empty cid", json!({"op": "send", "id": "x", "room": r, "body": "b", "cid": ""}).to_string(), "bad_request", true),
        (
            "body over max_body_bytes",
            json!({"op": "send", "id": "x", "room": r, "body": "b".repeat(max_body + 1), "cid": "big"}).to_string(),
            "too_large",
            true,
        ),
        ("room name charset", json!({"op": "join", "id": "x", "room": "Bad Room!@conference.localhost", "nick": "n"}).to_string(), "bad_request", true),
        ("room without service", json!({"op": "join", "id": "x", "room": "plain", "nick": "n"}).to_string(), "bad_request", true),
        ("create with a bad name", json!({"op": "create", "id": "x", "room": "UPPER@conference.localhost"}).to_string(), "bad_request", true),
        ("nick charset", json!({"op": "join", "id": "x", "room": r, "nick": "<script>"}).to_string(), "bad_request", true),
        ("nick with outer space", json!({"op": "join", "id": "x", "room": r, "nick": " ann"}).to_string(), "bad_request", true),
        ("unknown config field", json!({"op": "configure", "id": "x", "room": r, "config": {"colour": "red"}}).to_string(), "bad_request", true),
        ("unknown room", json!({"op": "join", "id": "x", "room": room("ghost"), "nick": "n"}).to_string(), "not_found", true),
        ("unknown service", json!({"op": "join", "id": "x", "room": "ops@elsewhere.example", "nick": "n"}).to_string(), "not_found", true),
        ("history of an unknown room", json!({"op": "history", "id": "x", "room": room("ghost")}).to_string(), "not_found", true),
        ("members-only without membership", json!({"op": "join", "id": "x", "room": members, "nick": "b", "password": "pw"}).to_string(), "forbidden", true),
        ("send without joining", json!({"op": "send", "id": "x", "room": members, "body": "b", "cid": "c"}).to_string(), "forbidden", true),
        ("leave without joining", json!({"op": "leave", "id": "x", "room": members}).to_string(), "forbidden", true),
        ("configure without rights", json!({"op": "configure", "id": "x", "room": r, "config": {"public": false}}).to_string(), "forbidden", true),
        ("kick without rights", json!({"op": "kick", "id": "x", "room": r, "nick": "ann"}).to_string(), "forbidden", true),
        ("affiliate without rights", json!({"op": "affiliate", "id": "x", "room": r, "user": "bob", "affiliation": "owner"}).to_string(), "forbidden", true),
    ];
    for (i, (label, frame, code, echoes)) in cases.into_iter().enumerate() {
        bob.send_text(frame).await;
        let answer = bob.wait_for(&format!("the error for {label}"), |f| f["op"] == "error").await;
        assert_error(&answer, code, label);
        if echoes {
            assert_eq!(answer["re"], "x", "{label}: the error must echo the request id: {answer}");
        }
        assert_room_works(&mut bob, &mut ann, &r, &format!("after-{i}")).await;
    }
    // Wrong room password, as the owner's guest (not the owner) sees it.
    ann.request(json!({"op": "affiliate", "room": members, "user": bob.user, "affiliation": "member"})).await;
    let a = bob.request(json!({"op": "join", "room": members, "nick": "bob", "password": "nope"})).await;
    assert_error(&a, "forbidden", "wrong room password");
    let a = bob.request(json!({"op": "join", "room": members, "nick": "bob", "password": "pw"})).await;
    assert_eq!(a["op"], "joined", "{a}");
    assert_room_works(&mut bob, &mut ann, &r, "end").await;
}

/// Requests before `hello` are `unauthorized`, and so are a wrong or missing password for a
/// registered user; the connection stays usable and then logs in, and the room keeps working.
pub async fn failed_logins_answer_unauthorized(db: &TestDb) {
    let node = TestNode::start(db.settings("n1")).await;
    let store = db.store().await;
    stoa::auth::Auth::new(store, false, 3600).add_user("rita", "correct horse battery").await.expect("registering rita");
    let (r, mut ann, mut bob) = room_with_two(&node, "doors").await;

    let mut c = Client::connect_raw(node.client_addr).await;
    let a = c.request(json!({"op": "list"})).await;
    assert_error(&a, "unauthorized", "list before hello");
    let a = c.request(json!({"op": "join", "room": r, "nick": "early"})).await;
    assert_error(&a, "unauthorized", "join before hello");
    let a = c.request(json!({"op": "hello", "v": 1, "user": "rita", "password": "wrong horse"})).await;
    assert_error(&a, "unauthorized", "wrong password");
    let a = c.request(json!({"op": "hello", "v": 1, "user": "rita"})).await;
    assert_error(&a, "unauthorized", "registered user without password");
    let a = c.request(json!({"op": "hello", "v": 1, "user": "rita", "token": "00ff"})).await;
    assert_error(&a, "unauthorized", "unknown session token");
    let a = c.request(json!({"op": "hello", "v": 7, "user": "rita", "password": "correct horse battery"})).await;
    assert_error(&a, "bad_request", "unsupported protocol version");
    let welcome = c.request(json!({"op": "hello", "v": 1, "user": "rita", "password": "correct horse battery"})).await;
    assert_eq!((welcome["op"].as_str(), welcome["guest"].as_bool()), (Some("welcome"), Some(false)), "{welcome}");
    c.user = "rita".into();
    c.join(&r, "rita").await;
    assert_room_works(&mut c, &mut ann, &r, "rita").await;

    // A session token logs in on a new connection.
    let token = welcome["session"].as_str().expect("session token");
    let mut again = Client::connect_raw(node.client_addr).await;
    let w = again.request(json!({"op": "hello", "v": 1, "token": token})).await;
    assert_eq!((w["op"].as_str(), w["user"].as_str()), (Some("welcome"), Some("rita")), "{w}");
    assert_room_works(&mut ann, &mut bob, &r, "after-logins").await;
}

/// Transport violations close the connection with their documented close code (binary frame
/// 1003, invalid UTF-8 1007, frame over `max_frame_bytes` 1009) and the room's other
/// occupants keep working.
pub async fn transport_violations_close_with_documented_codes(db: &TestDb) {
    let node = TestNode::start(db.settings("n1")).await;
    let (r, mut ann, mut bob) = room_with_two(&node, "wire").await;
    let max_frame = db.settings("n1").limits.max_frame_bytes;

    for (label, expected) in [("binary frame", 1003u16), ("invalid UTF-8", 1007), ("oversized frame", 1009)] {
        let mut c = node.client("mallory").await;
        c.join(&r, "mallory").await;
        match expected {
            1003 => {
                let _ = c.send_message(Message::binary(vec![1u8, 2, 3])).await;
            }
            1007 => c.send_invalid_utf8().await,
            _ => {
                let big = json!({"op": "send", "id": "x", "room": r, "body": "b".repeat(max_frame), "cid": "big"}).to_string();
                let _ = c.send_message(Message::text(big)).await;
            }
        }
        let code = c.await_close().await;
        assert_eq!(code, Some(expected), "{label}: close code");
        let gone = ann.wait_for(&format!("mallory leaving after the {label}"), |f| {
            f["op"] == "presence" && f["user"] == c.user.as_str() && f["status"] == "left"
        }).await;
        assert_eq!(gone["room"], r.as_str());
        assert_room_works(&mut ann, &mut bob, &r, label).await;
    }
    let stored = db.stored_messages(&r).await;
    assert!(stored.iter().all(|m| m.sender != "mallory"), "nothing of the bad frames was stored");
}

/// A connection that sends faster than `limits.requests_per_second` gets `rate_limited`
/// answers (echoing the request id), is served again once its budget refills, and the other
/// occupants are not limited by it.
pub async fn request_floods_are_rate_limited(db: &TestDb) {
    let mut settings = db.settings("n1");
    settings.limits.requests_per_second = 5;
    settings.limits.request_burst = 10;
    let node = TestNode::start(settings).await;
    let (r, mut ann, mut bob) = room_with_two(&node, "calm").await;
    // ann has spent 3 of her 10 (hello, create, join): 30 pings overrun the bucket.
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..30 {
            ids.push(ann.send_json(json!({"op": "ping"})).await);
        }
        ids
    };
    let (mut pongs, mut limited) = (0, 0);
    for id in &ids {
        let a = ann.answer(id).await;
        match a["op"].as_str() {
            Some("pong") => pongs += 1,
            _ => {
                assert_error(&a, "rate_limited", "flooded ping");
                limited += 1;
            }
        }
    }
    assert!(limited >= 15 && pongs >= 5, "pongs {pongs}, rate_limited {limited}");
    // bob has his own budget.
    bob.send_acked(&r, "not limited", "b1").await;
    // ann is served again once her bucket refills (retry the same cid with a deadline).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let seq = loop {
        let a = ann.send(&r, "served again", "a1").await;
        if a["op"] == "ack" {
            break a["seq"].as_u64().expect("seq");
        }
        assert_error(&a, "rate_limited", "send while the bucket refills");
        assert!(tokio::time::Instant::now() < deadline, "the rate limit never lifted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await; // refill pacing
    };
    let got = bob.wait_for("ann's message", |f| is_message(f, &r) && f["cid"] == "a1").await;
    assert_eq!(got["seq"].as_u64(), Some(seq));
}

/// A client that never reads while the room is flooded is disconnected once its outbound
/// queue fills (limits.outbound_queue), and every other occupant still receives every message
/// in order, with every send acked.
pub async fn slow_consumer_is_disconnected_and_others_are_unaffected(db: &TestDb) {
    let mut settings = db.settings("n1");
    settings.limits.outbound_queue = 256;
    settings.limits.requests_per_second = 100_000;
    settings.limits.request_burst = 100_000;
    let node = TestNode::start(settings).await;
    let (r, mut ann, mut bob) = room_with_two(&node, "flood").await;
    let mut sloth = Client::connect_small_buffer(node.client_addr, "sloth").await;
    sloth.join(&r, "sloth").await;
    let occupants = |detail: &serde_json::Value| detail["live"]["occupants"].as_u64();
    assert_eq!(occupants(&node.admin_json(&format!("/api/rooms/{r}")).await), Some(3));

    // bob reads everything concurrently; ann floods in windows of 50 until sloth is gone.
    let reader = {
        let r = r.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let f = bob.wait_for("flood traffic", |f| is_message(f, &r)).await;
                let seq = f["seq"].as_u64().expect("seq");
                seen.push(seq);
                if f["cid"] == "last" {
                    return (bob, seen);
                }
            }
        })
    };
    let body = "x".repeat(8 * 1024);
    let mut sent = 0u64;
    let mut gone = false;
    for window in 0..200 {
        let mut ids = Vec::new();
        for k in 0..50 {
            ids.push(ann.send_json(json!({"op": "send", "room": r, "body": body, "cid": format!("f{window}-{k}")})).await);
        }
        for id in &ids {
            let a = ann.answer(id).await;
            assert_eq!(a["op"], "ack", "flood send: {a}");
            sent += 1;
        }
        ann.take(|f| is_message(f, &r));
        if occupants(&node.admin_json(&format!("/api/rooms/{r}")).await) == Some(2) {
            gone = true;
            break;
        }
    }
    assert!(gone, "the slow consumer was never disconnected after {sent} messages of 8 KiB");
    eprintln!("slow consumer cut off after {sent} messages of 8 KiB");
    let last = ann.send_acked(&r, "done", "last").await;
    let (mut bob, seen) = reader.await.expect("reader task");
    assert_contiguous(&seen, last, "what bob received during the flood");
    // The slow client finds its connection closed once it reads (policy close, or just closed).
    let code = sloth.await_close().await;
    assert!(matches!(code, Some(1008) | None), "slow consumer close code {code:?}");
    let got = sloth.pending().iter().filter(|f| is_message(f, &r)).count() as u64;
    assert!(got < last, "the slow consumer received everything ({got}): it was not cut off");
    assert_room_works(&mut ann, &mut bob, &r, "after-flood").await;
}
