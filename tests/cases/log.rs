//! The room log: durability across crashes, contiguous per-room order, dedupe by cid, and
//! ack-after-commit when the store fails.

use crate::harness::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use stoa::store::StoredMessage;
use tokio::time::Instant;

/// Send every `(body, cid)` without waiting; returns request id → cid.
async fn pipeline(c: &mut Client, room: &str, cids: &[String]) -> HashMap<String, String> {
    let mut ids = HashMap::new();
    for cid in cids {
        let id = c.send_json(json!({"op": "send", "room": room, "body": format!("body of {cid}"), "cid": cid})).await;
        ids.insert(id, cid.clone());
    }
    ids
}

/// Wait for the answer to every request in `ids`; returns cid → answer.
async fn answers(c: &mut Client, ids: &HashMap<String, String>) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    while out.len() < ids.len() {
        let a = c.wait_for("answers to pipelined sends", |f| f["re"].as_str().is_some_and(|re| ids.contains_key(re))).await;
        let re = a["re"].as_str().expect("re").to_owned();
        // A request id is answered once: remove it from consideration by recording it.
        assert!(out.insert(ids[&re].clone(), a.clone()).is_none(), "request {re} answered twice: {a}");
    }
    out
}

/// The (sender, cid) → seq map of a stored log, asserting no (sender, cid) is stored twice.
fn stored_index(stored: &[StoredMessage]) -> HashMap<(String, String), u64> {
    let mut index = HashMap::new();
    for m in stored {
        let key = (m.sender.clone(), m.client_msg_id.clone());
        if let Some(first) = index.insert(key.clone(), m.seq) {
            panic!("{key:?} is stored twice, at seq {first} and {}", m.seq);
        }
    }
    index
}

/// Acked messages survive a kill -9 of a real `stoa` process: after a restart on the same
/// store, every acked message is there with its acked seq, in order, and the log is
/// contiguous from 1, including sends that were in flight when the process died.
pub async fn acked_messages_survive_kill_and_restart(db: &TestDb) {
    let config = db.write_config("solo", "");
    let mut first = NodeProcess::start(&config, "first run").await;
    let r = room("persist");
    let mut ann = first.client("ann").await;
    let mut bob = first.client("bob").await;
    ann.create(&r, json!({})).await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;

    // cid → acked seq, per sender.
    let mut acked: HashMap<(String, String), u64> = HashMap::new();
    let record = |user: &str, cid: &str, answer: &Value, acked: &mut HashMap<(String, String), u64>| {
        if answer["op"] == "ack" {
            acked.insert((user.to_owned(), cid.to_owned()), answer["seq"].as_u64().expect("seq"));
        }
    };

    // Phase 1: 2 × 25 pipelined sends, all acked.
    let a_cids: Vec<String> = (0..25).map(|i| format!("a{i}")).collect();
    let b_cids: Vec<String> = (0..25).map(|i| format!("b{i}")).collect();
    let a_ids = pipeline(&mut ann, &r, &a_cids).await;
    let b_ids = pipeline(&mut bob, &r, &b_cids).await;
    for (cid, a) in answers(&mut ann, &a_ids).await {
        assert_eq!(a["op"], "ack", "ann {cid}: {a}");
        record("ann", &cid, &a, &mut acked);
    }
    for (cid, a) in answers(&mut bob, &b_ids).await {
        assert_eq!(a["op"], "ack", "bob {cid}: {a}");
        record("bob", &cid, &a, &mut acked);
    }
    assert_eq!(acked.len(), 50);

    // Phase 2: 2 × 40 more in flight; kill -9 as soon as a few of them are acked.
    let a_cids: Vec<String> = (0..40).map(|i| format!("a-late{i}")).collect();
    let b_cids: Vec<String> = (0..40).map(|i| format!("b-late{i}")).collect();
    let a_ids = pipeline(&mut ann, &r, &a_cids).await;
    let b_ids = pipeline(&mut bob, &r, &b_cids).await;
    let mut late_acks = 0;
    while late_acks < 3 {
        let a = ann.wait_for("a late answer", |f| f["re"].as_str().is_some_and(|re| a_ids.contains_key(re))).await;
        assert_eq!(a["op"], "ack", "{a}");
        record("ann", &a_ids[a["re"].as_str().expect("re")], &a, &mut acked);
        late_acks += 1;
    }
    first.kill();
    // Acks already on the wire were committed: collect them too.
    for (c, ids) in [(&mut ann, &a_ids), (&mut bob, &b_ids)] {
        while let Some(a) = c.wait_for_or_close(|f| f["op"] == "ack").await {
            let re = a["re"].as_str().expect("re");
            if let Some(cid) = ids.get(re) {
                let user = crate::harness::asked_name(&c.user).to_owned();
                record(&user, cid, &a, &mut acked);
            }
        }
    }
    drop((ann, bob));

    let second = NodeProcess::start(&config, "second run").await;
    let mut cat = second.client("cat").await;
    let joined = cat.join_since(&r, "cat", 0).await;
    let last = joined["last_seq"].as_u64().expect("last_seq");
    assert!(last >= acked.len() as u64, "log ends at {last} but {} messages were acked", acked.len());
    let replay = if last > 0 { cat.messages_through(&r, last).await } else { Vec::new() };
    assert_contiguous(&seqs(&replay), last, "replay after restart");
    let history = cat.history_all(&r).await;
    assert_eq!(seqs(&history), seqs(&replay), "history and replay disagree");
    let stored = db.stored_messages(&r).await;
    let index = stored_index(&stored);
    assert_eq!(stored.len() as u64, last);
    for ((user, cid), seq) in &acked {
        assert_eq!(index.get(&(user.clone(), cid.clone())), Some(seq), "acked {user}/{cid} at seq {seq} is not stored there");
        let m = &replay[(*seq - 1) as usize];
        let from = m["from"].as_str().map(crate::harness::asked_name);
        assert_eq!((from, m["cid"].as_str()), (Some(user.as_str()), Some(cid.as_str())), "replay at seq {seq}");
        assert_eq!(m["body"], format!("body of {cid}"));
    }
    // Per sender, the log keeps each client's send order.
    for user in ["ann", "bob"] {
        let order: Vec<String> = stored.iter().filter(|m| m.sender == user).map(|m| m.client_msg_id.clone()).collect();
        let prefix = if user == "ann" { "a" } else { "b" };
        let mut expected: Vec<String> = (0..25).map(|i| format!("{prefix}{i}")).collect();
        expected.extend((0..40).map(|i| format!("{prefix}-late{i}")));
        assert_eq!(order, expected[..order.len()], "{user}'s messages are stored out of order");
    }
    // The restarted node carries on after the stored log.
    let seq = cat.send_acked(&r, "after restart", "c1").await;
    assert_eq!(seq, last + 1);
}

/// 8 clients × 50 pipelined sends into one room: the acks are exactly 1..=400 with no
/// repeats, every occupant sees all 400 messages in seq order with no gap, and the store's
/// history agrees with what was acked and delivered.
pub async fn seq_is_contiguous_under_concurrent_senders(db: &TestDb) {
    seq_is_contiguous_with(db, db.settings("n1")).await;
}

/// The same with the committer gathering each batch for 2 ms: the gather waits on a timer of
/// the runtime the committer runs on (on SQLite the commit thread's, which must have one).
pub async fn seq_is_contiguous_with_a_committer_gather(db: &TestDb) {
    let mut settings = db.settings("n1");
    settings.committer.max_batch_delay_us = 2_000;
    seq_is_contiguous_with(db, settings).await;
}

async fn seq_is_contiguous_with(db: &TestDb, settings: stoa::config::Settings) {
    const SENDERS: usize = 8;
    const EACH: usize = 50;
    const TOTAL: u64 = (SENDERS * EACH) as u64;
    let node = TestNode::start(settings).await;
    let r = room("busy");
    let mut watcher = node.client("watcher").await;
    watcher.create(&r, json!({})).await;
    watcher.join(&r, "watcher").await;
    let mut clients = Vec::new();
    for i in 0..SENDERS {
        let mut c = node.client(&format!("user{i}")).await;
        c.join(&r, &format!("user{i}")).await;
        clients.push(c);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let r = r.clone();
            tokio::spawn(async move {
                let cids: Vec<String> = (0..EACH).map(|j| format!("{}-{j}", c.user)).collect();
                let ids = pipeline(&mut c, &r, &cids).await;
                let answers = answers(&mut c, &ids).await;
                let messages = c.messages_through(&r, TOTAL).await;
                (crate::harness::asked_name(&c.user).to_owned(), answers, messages)
            })
        })
        .collect();
    let mut acks: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let mut views = Vec::new();
    for t in tasks {
        let (user, answers, messages) = t.await.expect("sender task");
        for (cid, a) in answers {
            assert_eq!(a["op"], "ack", "{user} {cid}: {a}");
            assert!(a.get("duplicate").is_none(), "fresh cid acked as duplicate: {a}");
            let seq = a["seq"].as_u64().expect("seq");
            if let Some(other) = acks.insert(seq, (user.clone(), cid.clone())) {
                panic!("seq {seq} acked twice: to {other:?} and to {user}/{cid}");
            }
        }
        views.push((user, messages));
    }
    views.push(("watcher".into(), watcher.messages_through(&r, TOTAL).await));
    assert_contiguous(&acks.keys().copied().collect::<Vec<_>>(), TOTAL, "acked seqs");
    for (user, messages) in &views {
        assert_contiguous(&seqs(messages), TOTAL, &format!("messages seen by {user}"));
        for m in messages {
            let (from, cid) = &acks[&m["seq"].as_u64().expect("seq")];
            let sender = m["from"].as_str().map(crate::harness::asked_name);
            assert_eq!((sender, m["cid"].as_str()), (Some(from.as_str()), Some(cid.as_str())), "{user} saw {m}");
        }
    }
    let history = watcher.history_all(&r).await;
    assert_contiguous(&seqs(&history), TOTAL, "history");
    let stored = db.stored_messages(&r).await;
    stored_index(&stored);
    for m in &stored {
        let (from, cid) = &acks[&m.seq];
        assert_eq!((&m.sender, &m.client_msg_id), (from, cid), "stored seq {}", m.seq);
    }
    assert_eq!(stored.len() as u64, TOTAL);
}

/// A resend of (room, sender, cid) is answered with the original seq and `duplicate`, and is
/// stored once; this holds after a node restart too (the store dedupes, not the actor's
/// memory), and different senders may use the same cid, even in the same commit.
pub async fn resends_are_deduplicated_by_cid(db: &TestDb) {
    let r = room("dedupe");
    let node = TestNode::start(db.settings("n1")).await;
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    ann.create(&r, json!({})).await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;

    assert_eq!(ann.send_acked(&r, "hello", "c1").await, 1);
    let again = ann.send(&r, "hello (resent)", "c1").await;
    assert_eq!((again["op"].as_str(), again["seq"].as_u64(), again["duplicate"].as_bool()), (Some("ack"), Some(1), Some(true)), "{again}");
    let bobs = bob.send(&r, "bob's own c1", "c1").await;
    assert_eq!((bobs["op"].as_str(), bobs["seq"].as_u64()), (Some("ack"), Some(2)), "another sender's c1 is a new message: {bobs}");
    assert!(bobs.get("duplicate").is_none(), "{bobs}");
    // Back-to-back resend while the first may still be in flight: one seq.
    let ids = [
        ann.send_json(json!({"op": "send", "room": r, "body": "twice", "cid": "c2"})).await,
        ann.send_json(json!({"op": "send", "room": r, "body": "twice", "cid": "c2"})).await,
    ];
    let (x, y) = (ann.answer(&ids[0]).await, ann.answer(&ids[1]).await);
    assert_eq!((x["op"].as_str(), x["seq"].as_u64()), (Some("ack"), Some(3)), "{x}");
    assert_eq!((y["op"].as_str(), y["seq"].as_u64()), (Some("ack"), Some(3)), "{y}");
    let seen = bob.messages_through(&r, 3).await;
    assert_eq!(seqs(&seen), vec![1, 2, 3], "a duplicate must not be delivered again");
    drop((ann, bob));
    node.stop().await;

    let node = TestNode::start(db.settings("n1")).await;
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;
    for (who, cid, seq) in [("ann", "c1", 1), ("bob", "c1", 2), ("ann", "c2", 3)] {
        let c = if who == "ann" { &mut ann } else { &mut bob };
        let a = c.send(&r, "resent after restart", cid).await;
        assert_eq!(
            (a["op"].as_str(), a["seq"].as_u64(), a["duplicate"].as_bool()),
            (Some("ack"), Some(seq), Some(true)),
            "{} resending {cid} after a restart: {a}",
            c.user
        );
    }
    // A forgotten resend and a new message in one pipeline.
    let resend = ann.send_json(json!({"op": "send", "room": r, "body": "again", "cid": "c1"})).await;
    let fresh = ann.send_json(json!({"op": "send", "room": r, "body": "new", "cid": "c3"})).await;
    let (resend, fresh) = (ann.answer(&resend).await, ann.answer(&fresh).await);
    assert_eq!((resend["seq"].as_u64(), resend["duplicate"].as_bool()), (Some(1), Some(true)), "{resend}");
    assert_eq!((fresh["op"].as_str(), fresh["seq"].as_u64()), (Some("ack"), Some(4)), "{fresh}");
    assert!(fresh.get("duplicate").is_none(), "{fresh}");
    let seen = bob.messages_through(&r, 4).await;
    assert_eq!(seqs(&seen), vec![1, 2, 3, 4], "bob sees the join replay and the one new message, no duplicate");

    let stored = db.stored_messages(&r).await;
    let index = stored_index(&stored);
    assert_contiguous(&stored.iter().map(|m| m.seq).collect::<Vec<_>>(), 4, "stored log");
    assert_eq!(index[&("ann".to_string(), "c1".to_string())], 1);
    assert_eq!(index[&("bob".to_string(), "c1".to_string())], 2);
    assert_eq!(index[&("ann".to_string(), "c2".to_string())], 3);
    assert_eq!(index[&("ann".to_string(), "c3".to_string())], 4);
}

/// After a restart (as after a takeover) the room has no memory of its cids. A session that
/// comes back with `since` (a resume) and writes its posts again has them found by the append
/// itself (`stoa_store_resent_found_total`), with no batch refused by the unique key and
/// redone (`stoa_store_appends_redone_total`), and its new post goes on from the log's end; a
/// session that joins without `since` and sends an old cid again is still answered with the
/// stored seq, through the redo. (PostgreSQL only: the other stores always take the redo.)
pub async fn a_resumed_sessions_resends_take_no_redo(db: &TestDb) {
    let config = db.write_config("solo", "");
    let r = room("resumed");
    let mut first = NodeProcess::start(&config, "first run").await;
    let mut ann = first.client("ann").await;
    let mut bob = first.client("bob").await;
    ann.create(&r, json!({})).await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;
    assert_eq!(ann.send_acked(&r, "one", "a1").await, 1);
    assert_eq!(ann.send_acked(&r, "two", "a2").await, 2);
    assert_eq!(bob.send_acked(&r, "three", "b1").await, 3);
    drop((ann, bob));
    first.kill();

    let second = NodeProcess::start(&config, "second run").await;
    let metrics = || async { http_get(second.admin_addr, "/metrics", None).await.1 };
    let mut ann = second.client("ann").await;
    ann.join_since(&r, "ann", 3).await;
    // The resends and a new post, written at once as a resuming client does.
    let ids = pipeline(&mut ann, &r, &["a1".into(), "a2".into(), "a3".into()]).await;
    let answers = answers(&mut ann, &ids).await;
    for (cid, seq, duplicate) in [("a1", 1, Some(true)), ("a2", 2, Some(true)), ("a3", 4, None)] {
        let a = &answers[cid];
        assert_eq!((a["op"].as_str(), a["seq"].as_u64(), a["duplicate"].as_bool()), (Some("ack"), Some(seq), duplicate), "{cid}: {a}");
    }
    let text = metrics().await;
    // Found at least once each: an append planned behind a resend (the room assumed it took a
    // seq) is refused as stale and sent again, and finds its resend again.
    assert!(stoa::admin_client::metric(&text, "stoa_store_resent_found_total") >= 2.0, "{text}");
    assert_eq!(stoa::admin_client::metric(&text, "stoa_store_appends_redone_total"), 0.0, "{text}");

    let mut bob = second.client("bob").await;
    bob.join(&r, "bob").await;
    let a = bob.send(&r, "three", "b1").await;
    assert_eq!((a["op"].as_str(), a["seq"].as_u64(), a["duplicate"].as_bool()), (Some("ack"), Some(3), Some(true)), "{a}");
    assert_eq!(stoa::admin_client::metric(&metrics().await, "stoa_store_appends_redone_total"), 1.0);
    let stored = db.stored_messages(&r).await;
    assert_eq!(stored.iter().map(|m| (m.seq, m.client_msg_id.as_str())).collect::<Vec<_>>(), [(1, "a1"), (2, "a2"), (3, "b1"), (4, "a3")]);
}

/// Two senders' messages with the same cid are two messages even when they share one
/// commit with a resend the room actor has forgotten (the store's duplicate check then runs
/// for the whole append): both are acked as new with their own seqs and both are stored.
pub async fn one_cid_from_two_senders_in_one_commit_is_two_messages(db: &TestDb) {
    let r = room("shared-cid");
    let node = TestNode::start(db.settings("n1")).await;
    let mut ann = node.client("ann").await;
    ann.create(&r, json!({})).await;
    ann.join(&r, "ann").await;
    // Old cids the restarted actor will not remember.
    for i in 0..5 {
        ann.send_acked(&r, "old", &format!("old{i}")).await;
    }
    drop(ann);
    node.stop().await;

    let node = TestNode::start(db.settings("n1")).await;
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    let mut cat = node.client("cat").await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;
    cat.join(&r, "cat").await;
    let mut last = 5;
    // While ann's `busy` append is in flight, her forgotten resend and bob's and cat's
    // `same` queue up behind it and go out as the room's next append.
    for i in 0..5 {
        let busy = ann.send_json(json!({"op": "send", "room": r, "body": "busy", "cid": format!("busy{i}")})).await;
        let resend = ann.send_json(json!({"op": "send", "room": r, "body": "old", "cid": format!("old{i}")})).await;
        let same = format!("same{i}");
        let b = bob.send_json(json!({"op": "send", "room": r, "body": "from bob", "cid": same})).await;
        let c = cat.send_json(json!({"op": "send", "room": r, "body": "from cat", "cid": same})).await;
        let busy = ann.answer(&busy).await;
        let resend = ann.answer(&resend).await;
        let b = bob.answer(&b).await;
        let c = cat.answer(&c).await;
        assert_eq!(busy["op"], "ack", "{busy}");
        assert_eq!((resend["op"].as_str(), resend["duplicate"].as_bool()), (Some("ack"), Some(true)), "forgotten resend old{i}: {resend}");
        assert_eq!((b["op"].as_str(), b.get("duplicate")), (Some("ack"), None), "bob's {same}: {b}");
        assert_eq!((c["op"].as_str(), c.get("duplicate")), (Some("ack"), None), "cat's {same} is its own message, not bob's: {c}");
        assert_ne!(b["seq"], c["seq"], "bob's and cat's {same} got one seq: {b} {c}");
        last += 3;
    }
    let seen = ann.messages_through(&r, last).await;
    assert_contiguous(&seqs(&seen), last, "messages ann saw");
    let stored = db.stored_messages(&r).await;
    let index = stored_index(&stored);
    assert_contiguous(&stored.iter().map(|m| m.seq).collect::<Vec<_>>(), last, "stored log");
    for i in 0..5 {
        assert!(index.contains_key(&("bob".to_string(), format!("same{i}"))), "bob's same{i} is not stored");
        assert!(index.contains_key(&("cat".to_string(), format!("same{i}"))), "cat's same{i} is not stored");
    }
}

/// When the store fails under traffic (connections killed on PostgreSQL / MariaDB, the write
/// lock held past the busy timeout on SQLite), the sender gets `unavailable` instead of an ack;
/// every acked cid is stored exactly once at its acked seq; no occupant sees a message that is
/// not stored; and once the store is back the room works again with a contiguous log.
pub async fn nothing_is_acked_when_the_commit_fails(db: &TestDb) {
    let mut settings = db.settings("n1");
    // The sender keeps 8 sends in flight for as long as the faults take to bite.
    settings.limits.requests_per_second = 100_000;
    settings.limits.request_burst = 100_000;
    // SQLite: a commit gives up on the held write lock after this long.
    settings.store.sqlite_busy_timeout_ms = 300;
    let node = TestNode::start(settings).await;
    let r = room("flaky");
    let mut ann = node.client("ann").await;
    let mut bob = node.client("bob").await;
    ann.create(&r, json!({})).await;
    ann.join(&r, "ann").await;
    bob.join(&r, "bob").await;

    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut failed: Vec<String> = Vec::new();
    let note = |cid: &str, a: &Value, acked: &mut HashMap<String, u64>, failed: &mut Vec<String>| match a["op"].as_str() {
        Some("ack") => {
            assert!(acked.insert(cid.to_owned(), a["seq"].as_u64().expect("seq")).is_none(), "{cid} acked twice");
        }
        Some("error") => {
            assert_eq!(a["code"], "unavailable", "a failed commit must answer unavailable: {a}");
            failed.push(cid.to_owned());
        }
        _ => panic!("unexpected answer to a send: {a}"),
    };
    for i in 0..5 {
        let cid = format!("before{i}");
        let a = ann.send(&r, "before", &cid).await;
        assert_eq!(a["op"], "ack", "{a}");
        note(&cid, &a, &mut acked, &mut failed);
    }

    if db.backend == Backend::Sqlite {
        // Hold the write lock until a commit has given up on it (busy timeout), then let go.
        use sqlx::Connection;
        let mut lock = sqlx::SqliteConnection::connect(&db.url).await.expect("second SQLite connection");
        sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut lock).await.expect("BEGIN EXCLUSIVE");
        let cids: Vec<String> = (0..3).map(|i| format!("locked{i}")).collect();
        let ids = pipeline(&mut ann, &r, &cids).await;
        let first = ann.wait_for("a send failing on the locked store", |f| f["re"].as_str().is_some_and(|re| ids.contains_key(re))).await;
        assert_error(&first, "unavailable", "send while the store is locked");
        sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.expect("ROLLBACK");
        lock.close().await.ok();
        note(&ids[first["re"].as_str().expect("re")], &first, &mut acked, &mut failed);
        let rest: HashMap<String, String> = ids.into_iter().filter(|(id, _)| first["re"] != id.as_str()).collect();
        for (cid, a) in answers(&mut ann, &rest).await {
            note(&cid, &a, &mut acked, &mut failed);
        }
    } else {
        // Keep 8 sends in flight while another task keeps killing the node's connections,
        // until a few sends have failed.
        let stop = Arc::new(AtomicBool::new(false));
        let killer = db.connection_killer();
        let stop_killing = stop.clone();
        let chaos = tokio::spawn(async move {
            let mut rounds = 0usize;
            while !stop_killing.load(Ordering::Relaxed) {
                killer.kill().await;
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(15)).await; // pacing of the fault injection
            }
            rounds
        });
        let started = Instant::now();
        let mut in_flight: HashMap<String, String> = HashMap::new();
        let mut next = 0;
        loop {
            let stopping = failed.len() >= 3 || started.elapsed() > Duration::from_secs(15);
            if stopping {
                stop.store(true, Ordering::Relaxed);
            }
            while !stopping && in_flight.len() < 8 {
                let cid = format!("chaos{next}");
                next += 1;
                let id = ann.send_json(json!({"op": "send", "room": r, "body": format!("body of {cid}"), "cid": cid})).await;
                in_flight.insert(id, cid);
            }
            if in_flight.is_empty() {
                break;
            }
            let a = ann.wait_for("an answer during the store faults", |f| f["re"].as_str().is_some_and(|re| in_flight.contains_key(re))).await;
            let cid = in_flight.remove(a["re"].as_str().expect("re")).expect("in flight");
            note(&cid, &a, &mut acked, &mut failed);
        }
        let rounds = chaos.await.expect("chaos task");
        eprintln!("killed the node's connections {rounds} times");
    }
    assert!(!failed.is_empty(), "no commit failed: the fault injection did not bite ({} sends acked)", acked.len());
    eprintln!("store faults: {} sends acked, {} answered unavailable", acked.len(), failed.len());

    // The store is back: a send goes through (retrying the same cid while the pool recovers),
    // then every further send is acked at once.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let a = ann.send(&r, "after", "after0").await;
        if a["op"] == "ack" {
            note("after0", &a, &mut acked, &mut failed);
            break;
        }
        assert_error(&a, "unavailable", "send after the store recovered");
        assert!(Instant::now() < deadline, "the room did not recover: {a}");
        tokio::time::sleep(Duration::from_millis(100)).await; // retry pacing
    }
    let mut previous = acked["after0"];
    for i in 1..10 {
        let cid = format!("after{i}");
        let seq = ann.send_acked(&r, "after", &cid).await;
        assert_eq!(seq, previous + 1, "seq not contiguous after recovery");
        previous = seq;
        acked.insert(cid, seq);
    }

    let stored = db.stored_messages(&r).await;
    let index = stored_index(&stored);
    assert_contiguous(&stored.iter().map(|m| m.seq).collect::<Vec<_>>(), previous, "stored log");
    for (cid, seq) in &acked {
        assert_eq!(index.get(&("ann".to_string(), cid.clone())), Some(seq), "acked {cid} is not stored at its seq");
    }
    let stored_cids: HashSet<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
    for (who, c) in [("bob", &mut bob), ("ann", &mut ann)] {
        let seen = c.messages_through(&r, previous).await;
        for m in &seen {
            let cid = m["cid"].as_str().expect("cid");
            assert!(stored_cids.contains(cid), "{who} received {cid}, which is not stored: {m}");
            assert_eq!(index.get(&("ann".to_string(), cid.to_owned())), m["seq"].as_u64().as_ref(), "{who} got {m}");
        }
        assert_contiguous(&seqs(&seen), previous, &format!("messages {who} received"));
    }
}

/// The store's group commit judges each room of a batch on its own: a room with a stale epoch,
/// one on another host, one whose log moved on and a destroyed one are refused with the reason
/// and write nothing, while the rest of the same batch commits; a batch with a resent cid
/// stores it once and the rest after it. (PostgreSQL commits a batch in one statement, SQLite
/// on its commit thread, MariaDB in a transaction of several: this holds for all three.)
pub async fn a_group_commit_fences_each_room_on_its_own(db: &TestDb) {
    use stoa::ids::{Epoch, NodeId, message_id};
    use stoa::store::{AppendError, AppendRequest, Fence, NewMessage};
    let store = db.store().await;
    store.migrate().await.expect("migrations");
    let home = NodeId("n1".into());
    let mut rows = Vec::new();
    for name in ["ok", "epoch", "host", "stale", "gone", "ok2"] {
        rows.push(store.create_room(&stoa::protocol::RoomAddr(room(name)), &Default::default(), "ann", &home).await.expect("creating a room"));
    }
    let fence = |i: usize| Fence { room: rows[i].id, host: home.clone(), epoch: rows[i].epoch };
    store.destroy_room(&fence(4)).await.expect("destroying a room");
    let message = |n: u32, cid: &str| {
        let at = 1_800_000_000_000 + n as i64;
        NewMessage { id: message_id(at), created_at: at, ..NewMessage::unstamped("ann".into(), "Ann".into(), format!("m{n}"), cid.into()) }
    };
    // One room's append of `cids`, their times from `first` on. Unmarked requests (`request`):
    // a resend among them is found by the redo after the unique key refused the batch; marked
    // ones (`later`, `newest`: a resumed session's) by the append itself.
    let append = |fence: Fence, base_seq: u64, cids: &[&str], first: u32, maybe_resent: bool| AppendRequest {
        fence,
        base_seq,
        messages: cids.iter().enumerate().map(|(n, c)| message(first + n as u32, c)).collect(),
        maybe_resent,
    };
    let request = |fence: Fence, base_seq: u64, cids: &[&str]| append(fence, base_seq, cids, 0, false);
    let batch = [
        request(fence(0), 0, &["a", "b"]),
        request(Fence { epoch: Epoch(rows[1].epoch.0 + 1), ..fence(1) }, 0, &["a"]),
        request(Fence { host: NodeId("n2".into()), ..fence(2) }, 0, &["a"]),
        request(fence(3), 5, &["a"]),
        request(fence(4), 0, &["a"]),
        request(fence(5), 0, &["a", "b", "c"]),
    ];
    let answers = store.append_batch(batch).await.expect("the batch commits");
    let last: Vec<Option<u64>> = answers.iter().map(|a| a.as_ref().ok().map(|a| a.last_seq)).collect();
    assert_eq!(last, [Some(2), None, None, None, None, Some(3)], "{answers:?}");
    assert!(matches!(answers[1], Err(AppendError::Fenced { epoch, .. }) if epoch == rows[1].epoch.0), "{:?}", answers[1]);
    assert!(matches!(&answers[2], Err(AppendError::Fenced { host, .. }) if host == "n1"), "{:?}", answers[2]);
    assert!(matches!(answers[3], Err(AppendError::Stale { last_seq: 0 })), "{:?}", answers[3]);
    assert!(matches!(answers[4], Err(AppendError::Gone)), "{:?}", answers[4]);
    for (i, stored) in [(0, 2), (1, 0), (2, 0), (3, 0), (5, 3)] {
        assert_eq!(db.stored_messages(&room(["ok", "epoch", "host", "stale", "gone", "ok2"][i])).await.len(), stored, "room {i}");
    }

    // A resent cid among new ones: stored once, answered with its first seq, the rest after it.
    let again = store.append_batch([request(fence(0), 2, &["b", "c", "d"])]).await.expect("the batch commits");
    let appended = again[0].as_ref().expect("the room's append commits");
    let outcomes: Vec<(u64, bool)> = appended.outcomes.iter().map(|o| (o.seq, o.duplicate)).collect();
    assert_eq!(outcomes, [(2, true), (3, false), (4, false)]);
    assert_eq!(appended.last_seq, 4);
    let stored = db.stored_messages(&room("ok")).await;
    assert_eq!(stored.iter().map(|m| m.client_msg_id.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);

    // Several rooms' resends in one batch (looked up together): each room's own, and a cid
    // stored in another room is new here.
    let later = |fence: Fence, base_seq: u64, cids: &[&str]| append(fence, base_seq, cids, 10, true);
    let batch = [later(fence(0), 4, &["a", "e"]), later(fence(5), 3, &["c", "a", "f"]), later(fence(3), 0, &["b"])];
    let answers = store.append_batch(batch).await.expect("the batch commits");
    let outcomes: Vec<Vec<(u64, bool)>> =
        answers.iter().map(|a| a.as_ref().expect("every room's append commits").outcomes.iter().map(|o| (o.seq, o.duplicate)).collect()).collect();
    assert_eq!(outcomes, [vec![(1, true), (5, false)], vec![(3, true), (1, true), (4, false)], vec![(1, false)]]);
    let last: Vec<u64> = answers.iter().map(|a| a.as_ref().map(|a| a.last_seq).unwrap_or_default()).collect();
    assert_eq!(last, [5, 4, 1]);
    for (name, cids) in [("ok", &["a", "b", "c", "d", "e"][..]), ("ok2", &["a", "b", "c", "f"]), ("stale", &["b"])] {
        let stored = db.stored_messages(&room(name)).await;
        assert_eq!(stored.iter().map(|m| m.client_msg_id.as_str()).collect::<Vec<_>>(), cids, "room {name}");
    }

    // A resend in a room fenced meanwhile is still refused (its new message is not written),
    // and a room of only new messages beside it commits.
    let newest = |fence: Fence, base_seq: u64, cids: &[&str]| append(fence, base_seq, cids, 20, true);
    let batch = [newest(Fence { epoch: Epoch(rows[0].epoch.0 + 1), ..fence(0) }, 5, &["a", "g"]), newest(fence(3), 1, &["c"])];
    let answers = store.append_batch(batch).await.expect("the batch commits");
    assert!(matches!(answers[0], Err(AppendError::Fenced { epoch, .. }) if epoch == rows[0].epoch.0), "{:?}", answers[0]);
    let outcomes: Vec<(u64, bool)> = answers[1].as_ref().expect("the other room's append commits").outcomes.iter().map(|o| (o.seq, o.duplicate)).collect();
    assert_eq!(outcomes, [(2, false)]);
    // One cid twice in one request is one message.
    let again = store.append_batch([newest(fence(5), 4, &["h", "h"])]).await.expect("the batch commits");
    let outcomes: Vec<(u64, bool)> = again[0].as_ref().expect("the room's append commits").outcomes.iter().map(|o| (o.seq, o.duplicate)).collect();
    assert_eq!(outcomes, [(5, false), (5, true)]);
    for (name, cids) in [("ok", &["a", "b", "c", "d", "e"][..]), ("ok2", &["a", "b", "c", "f", "h"]), ("stale", &["b", "c"])] {
        let stored = db.stored_messages(&room(name)).await;
        assert_eq!(stored.iter().map(|m| m.client_msg_id.as_str()).collect::<Vec<_>>(), cids, "room {name}");
    }
}

/// PostgreSQL runs several group commits at once (`committer.max_in_flight`), but while one is
/// in flight a further one starts only with a batch of `overlap_min_rows`, or once that one has
/// run `overlap_after_us`: smaller batches wait for a transaction to end and go as one
/// (docs/design-notes.md, *Group commit*). A row lock held by the test keeps one room's append
/// in flight for as long as the test needs.
pub async fn small_batches_wait_for_the_transaction_in_flight(db: &TestDb) {
    use sqlx::Connection as _;
    use stoa::committer::Committer;
    use stoa::config::CommitterSettings;
    use stoa::ha::gate::WriteGate;
    use stoa::ids::{NodeId, message_id};
    use stoa::store::{AppendRequest, Fence, NewMessage};
    let store = db.store().await;
    store.migrate().await.expect("migrations");
    let home = NodeId("n1".into());
    let mut rows = Vec::new();
    for i in 0..8 {
        rows.push(store.create_room(&stoa::protocol::RoomAddr(room(&format!("overlap{i}"))), &Default::default(), "ann", &home).await.expect("creating a room"));
    }
    let append = |i: usize, base_seq: u64| {
        let at = 1_800_000_000_000 + base_seq as i64;
        let cid = format!("c{base_seq}");
        AppendRequest {
            fence: Fence { room: rows[i].id, host: home.clone(), epoch: rows[i].epoch },
            base_seq,
            messages: vec![NewMessage { id: message_id(at), created_at: at, ..NewMessage::unstamped("ann".into(), "Ann".into(), "hi".into(), cid) }],
            maybe_resent: false,
        }
    };
    let mut lock = sqlx::PgConnection::connect(&db.url).await.expect("a connection of the test's own");
    let mut probe = sqlx::PgConnection::connect(&db.url).await.expect("another connection of the test's own");
    let hold_room_0 = format!("BEGIN; SELECT 1 FROM rooms WHERE id = {} FOR UPDATE", rows[0].id.0);
    // A committer with these settings, whose append of room 0 (after `base_seq`) waits for the
    // test's lock on that room's row: returned once it does.
    let held = async |overlap_min_rows: usize, overlap_after_us: u64, base_seq: u64, lock: &mut sqlx::PgConnection, probe: &mut sqlx::PgConnection| {
        let settings = CommitterSettings { max_in_flight: 4, overlap_min_rows, overlap_after_us, ..CommitterSettings::default() };
        let committer = Committer::start(store.clone(), &settings, WriteGate::always_open(), tokio_util::sync::CancellationToken::new()).0;
        sqlx::raw_sql(sqlx::AssertSqlSafe(hold_room_0.clone())).execute(&mut *lock).await.expect("locking room 0");
        let first = tokio::spawn(committer.submit(append(0, base_seq)));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut *probe)
            .await
            .expect("reading pg_stat_activity");
            if waiting > 0 {
                return (committer, first);
            }
            assert!(Instant::now() < deadline, "room 0's append never waited for the test's lock");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // Releases room 0; its append then commits as the room's `last_seq`-th message.
    let release = async |first: tokio::task::JoinHandle<_>, last_seq: u64, lock: &mut sqlx::PgConnection| {
        assert!(!first.is_finished(), "room 0's append is held by the test");
        sqlx::raw_sql("ROLLBACK").execute(&mut *lock).await.expect("releasing room 0");
        let answer: Result<stoa::store::Appended, stoa::committer::CommitError> = first.await.expect("task");
        assert_eq!(answer.expect("room 0's append commits").last_seq, last_seq);
    };
    // `small` (first appends of their rooms, `rows` rows in all) is not committed while room 0
    // is held, and is once room 0's append has committed as its `last_seq`-th message.
    let waits_for_room_0 = async |small: Vec<tokio::task::JoinHandle<_>>, rows: usize, first, last_seq, lock: &mut sqlx::PgConnection| {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(small.iter().all(|t| !t.is_finished()), "a batch of {rows} rows started beside the transaction in flight");
        release(first, last_seq, lock).await;
        for t in small {
            let answer: Result<stoa::store::Appended, stoa::committer::CommitError> = t.await.expect("task");
            assert_eq!(answer.expect("the waiting append commits").last_seq, 1);
        }
    };

    // Batches under the bar: rooms 1–5's one-row appends wait behind room 0's, then go as one.
    let (committer, first) = held(64, 60_000_000, 0, &mut lock, &mut probe).await;
    let small: Vec<_> = (1..=5).map(|i| tokio::spawn(committer.submit(append(i, 0)))).collect();
    waits_for_room_0(small, 5, first, 1, &mut lock).await;

    // A batch at the bar (rooms 1–4, which only goes once it has all four rows) starts beside
    // the transaction in flight; the one after it, under the bar again, waits.
    let (committer, first) = held(4, 60_000_000, 1, &mut lock, &mut probe).await;
    let big: Vec<_> = (1..=4).map(|i| committer.submit(append(i, 1))).collect();
    for answer in futures_util::future::join_all(big).await {
        assert_eq!(answer.expect("a batch at the bar commits beside the held one").last_seq, 2);
    }
    let small: Vec<_> = (6..=7).map(|i| tokio::spawn(committer.submit(append(i, 0)))).collect();
    waits_for_room_0(small, 2, first, 2, &mut lock).await;

    // A transaction in flight for `overlap_after_us` holds the small batches back no longer:
    // rooms 5–7's go while room 0's is still held.
    let (committer, first) = held(64, 100_000, 2, &mut lock, &mut probe).await;
    let small: Vec<_> = (5..=7).map(|i| committer.submit(append(i, 1))).collect();
    let answers = tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(small)).await;
    for answer in answers.expect("the small batch waited for room 0's append past the bound") {
        assert_eq!(answer.expect("a small batch goes once the held transaction is overdue").last_seq, 2);
    }
    release(first, 3, &mut lock).await;
    for i in 0..8 {
        let expected = if i == 0 { 3 } else { 2 };
        assert_eq!(db.stored_messages(&room(&format!("overlap{i}"))).await.len(), expected, "room {i}");
    }
}
