//! Room actors come and go: passivation when idle, re-activation from the store; and they serve
//! their occupants alike wherever the occupants' connections run.

use crate::harness::*;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// An idle, empty room passivates (the node's `active_rooms` drops to 0) and the next join
/// re-activates it from the store with its history intact and its seq continuing, twice over.
pub async fn idle_room_passivates_and_reactivates_intact(db: &TestDb) {
    let mut settings = db.settings("n1");
    settings.rooms.passivate_after_ms = 300;
    let node = TestNode::start(settings).await;
    let r = room("sleepy");
    let mut ann = node.client("ann").await;
    ann.create(&r, json!({"subject": "naps"})).await;
    let mut expected_last = 0;
    for round in 0..3 {
        let joined = ann.join_since(&r, "ann", 0).await;
        assert_eq!(joined["last_seq"].as_u64(), Some(expected_last), "round {round}: {joined}");
        assert_eq!(joined["subject"], "naps", "the config survives passivation");
        if expected_last > 0 {
            let replay = ann.messages_through(&r, expected_last).await;
            assert_contiguous(&seqs(&replay), expected_last, &format!("replay in round {round}"));
        }
        node.await_node_state("the room to be active", |n| n["active_rooms"] == 1).await;
        for i in 0..3 {
            let seq = ann.send_acked(&r, "zzz", &format!("r{round}-{i}")).await;
            expected_last += 1;
            assert_eq!(seq, expected_last, "seq continues after re-activation");
        }
        ann.messages_through(&r, expected_last).await;
        let left = ann.request(json!({"op": "leave", "room": r})).await;
        assert_eq!(left["op"], "left", "{left}");
        node.await_node_state("the idle room to passivate", |n| n["active_rooms"] == 0).await;
        let detail = node.admin_json(&format!("/api/rooms/{r}")).await;
        assert_eq!(detail["active"], false, "{detail}");
        assert_eq!(detail["last_seq"].as_u64(), Some(expected_last), "{detail}");
    }
    // A history read re-activates too, and sees everything.
    let history = ann.history_all(&r).await;
    assert_contiguous(&seqs(&history), expected_last, "history after passivation");
}

/// In a room just re-activated (its cache of recent messages empty), each join gets exactly
/// the replay it asks for: nothing for one that has seen the whole log (served without a store
/// read), the gap for one behind, the room's `history_on_join` tail for one without `since`.
pub async fn joins_into_a_reactivated_room_replay_exactly_what_they_miss(db: &TestDb) {
    let mut settings = db.settings("n1");
    settings.rooms.passivate_after_ms = 300;
    let node = TestNode::start(settings).await;
    let r = room("rejoin");
    let mut ann = node.client("ann").await;
    ann.create(&r, json!({"history_on_join": 2})).await;
    ann.join(&r, "ann").await;
    for i in 1..=5 {
        assert_eq!(ann.send_acked(&r, "m", &format!("m{i}")).await, i);
    }
    ann.messages_through(&r, 5).await;
    let left = ann.request(json!({"op": "leave", "room": r})).await;
    assert_eq!(left["op"], "left", "{left}");
    node.await_node_state("the idle room to passivate", |n| n["active_rooms"] == 0).await;

    // At the log's end: nothing replayed; the next live message is the first one seen.
    let joined = ann.join_since(&r, "ann", 5).await;
    assert_eq!(joined["last_seq"].as_u64(), Some(5), "{joined}");
    assert_eq!(ann.send_acked(&r, "m", "m6").await, 6);
    assert_eq!(seqs(&ann.messages_through(&r, 6).await), vec![6], "a join at the log's end replays nothing");

    // Behind: the gap, read from the store (the cache is still cold).
    let mut bob = node.client("bob").await;
    bob.join_since(&r, "bob", 3).await;
    assert_eq!(seqs(&bob.messages_through(&r, 6).await), vec![4, 5, 6], "a join since 3 replays the gap");

    // No `since`: the configured tail.
    let mut cat = node.client("cat").await;
    cat.join(&r, "cat").await;
    assert_eq!(seqs(&cat.messages_through(&r, 6).await), vec![5, 6], "history_on_join = 2");

    // Far ahead of the log (a client that saw a newer incarnation's seqs): nothing, no error.
    let mut dan = node.client("dan").await;
    let joined = dan.join_since(&r, "dan", 1_000).await;
    assert_eq!(joined["last_seq"].as_u64(), Some(6), "{joined}");
    assert_eq!(ann.send_acked(&r, "m", "m7").await, 7);
    assert_eq!(seqs(&dan.messages_through(&r, 7).await), vec![7]);
}

/// Clients join, send and leave two rooms in a loop while the rooms passivate again and
/// again (50 ms idle): every request is answered with success, and each room's log is
/// contiguous and matches the acks exactly.
pub async fn churn_with_repeated_passivation_drops_no_request(db: &TestDb) {
    const CLIENTS: usize = 4;
    const ROUNDS: usize = 25;
    let mut settings = db.settings("n1");
    settings.rooms.passivate_after_ms = 50;
    let node = TestNode::start(settings).await;
    let rooms = [room("churn-a"), room("churn-b")];
    let mut owner = node.client("owner").await;
    for r in &rooms {
        owner.create(r, json!({})).await;
    }
    drop(owner);

    // Count passivations as the admin API sees them.
    let stop = Arc::new(AtomicBool::new(false));
    let passivations = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, passivations, admin) = (stop.clone(), passivations.clone(), node.admin_addr);
        tokio::spawn(async move {
            let mut previous = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = http_get(admin, "/api/node", None).await;
                if status == 200 {
                    let now = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["active_rooms"].as_u64()).unwrap_or(0);
                    if now < previous {
                        passivations.fetch_add((previous - now) as usize, Ordering::Relaxed);
                    }
                    previous = now;
                }
                tokio::time::sleep(Duration::from_millis(5)).await; // sampling interval
            }
        })
    };

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let rooms = rooms.clone();
            let addr = node.client_addr;
            tokio::spawn(async move {
                let user = format!("churner{i}");
                let mut c = Client::connect(addr, &user).await;
                let mut acks: Vec<(String, u64, String)> = Vec::new();
                for round in 0..ROUNDS {
                    let r = &rooms[(i + round) % 2];
                    let joined = c.request(json!({"op": "join", "room": r, "nick": user})).await;
                    assert_eq!(joined["op"], "joined", "{user} round {round}: {joined}");
                    for k in 0..2 {
                        let cid = format!("{user}-{round}-{k}");
                        let seq = c.send_acked(r, "churn", &cid).await;
                        acks.push((r.clone(), seq, cid));
                    }
                    let left = c.request(json!({"op": "leave", "room": r})).await;
                    assert_eq!(left["op"], "left", "{user} round {round}: {left}");
                    // Let rooms go idle between rounds, for a varying while.
                    let pause = (rand::random::<u64>() % 90) as u64;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                acks
            })
        })
        .collect();
    let mut acked: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
    for t in tasks {
        for (r, seq, cid) in t.await.expect("churn task") {
            if let Some(other) = acked.entry(r.clone()).or_default().insert(seq, cid.clone()) {
                panic!("{r}: seq {seq} acked to both {other} and {cid}");
            }
        }
    }
    node.await_node_state("every room to passivate", |n| n["active_rooms"] == 0).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    let seen = passivations.load(Ordering::Relaxed);
    eprintln!("rooms passivated {seen} times during the churn");
    assert!(seen >= 3, "rooms passivated only {seen} times during the churn: the test did not exercise passivation");

    let mut total = 0;
    for r in &rooms {
        let acks = &acked[r];
        total += acks.len();
        assert_contiguous(&acks.keys().copied().collect::<Vec<_>>(), acks.len() as u64, &format!("acked seqs of {r}"));
        let stored = db.stored_messages(r).await;
        assert_eq!(stored.len(), acks.len(), "{r}: stored vs acked");
        for m in stored {
            assert_eq!(acks.get(&m.seq), Some(&m.client_msg_id), "{r}: stored seq {}", m.seq);
        }
    }
    assert_eq!(total, CLIENTS * ROUNDS * 2);
}

/// Clients chat the same wherever their connections run: on the I/O runtime
/// (`node.client_connections_on_arbiters = false`) and spread over two room arbiters, where a
/// room's occupants sit on different threads from it and from each other.
pub async fn connections_on_the_io_runtime_or_on_several_arbiters_serve_alike(db: &TestDb) {
    for (on_arbiters, arbiters) in [(false, 1), (true, 2)] {
        let context = format!("client_connections_on_arbiters = {on_arbiters}, {arbiters} arbiters");
        let mut settings = db.settings(&format!("n{arbiters}"));
        settings.node.client_connections_on_arbiters = on_arbiters;
        settings.rooms.arbiters = arbiters;
        let node = TestNode::start(settings).await;
        let r = room(&format!("placed{arbiters}"));
        let names = ["ann", "bob", "cy"];
        let mut clients = Vec::new();
        for name in names {
            clients.push(node.client(name).await);
        }
        clients[0].create(&r, json!({})).await;
        for (client, name) in clients.iter_mut().zip(names) {
            client.join(&r, name).await;
        }
        for i in 1..=20u64 {
            let k = i as usize % names.len();
            assert_eq!(clients[k].send_acked(&r, names[k], &format!("c{i}")).await, i, "{context}");
        }
        for client in &mut clients {
            let got = client.messages_through(&r, 20).await;
            assert_contiguous(&seqs(&got), 20, &context);
        }
    }
}
