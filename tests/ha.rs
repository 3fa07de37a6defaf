//! Redundancy-pair building blocks, tested against the real stores.

use crate::harness::{Backend, DEADLINE, TestDb};
use std::time::{Duration, Instant};
use stoa::store::cluster::ClusterError;
use stoa::ids::NodeId;

/// A lease renewed on the database clock is live, expires on that clock after its TTL, and a
/// released lease is expired at once; a new incarnation takes the lease over. SQLite (single
/// node only) refuses leases with a clear error.
pub async fn leases_live_and_expire_on_the_database_clock(db: &TestDb) {
    let store = db.store().await;
    store.migrate().await.expect("migrations");
    let node = NodeId("1a".into());
    if db.backend == Backend::Sqlite {
        let err = store.renew_lease(&node, 1, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, ClusterError::Unsupported), "{err}");
        assert!(err.to_string().contains("SQLite"), "{err}");
        return;
    }
    assert_eq!(store.lease(&node).await.unwrap(), None, "no lease before the first renewal");

    store.renew_lease(&node, 1, Duration::from_secs(30)).await.unwrap();
    let live = store.lease(&node).await.unwrap().expect("lease after renewal");
    assert!(!live.expired, "{live:?}");
    assert_eq!((live.holder.as_str(), live.incarnation), ("1a/1", 1));
    assert!((25_000..=30_000).contains(&live.remaining_ms), "remaining {} ms of a 30 s lease", live.remaining_ms);

    // A short lease runs out on the database clock.
    store.renew_lease(&node, 1, Duration::from_millis(200)).await.unwrap();
    let started = Instant::now();
    loop {
        let l = store.lease(&node).await.unwrap().expect("lease");
        if l.expired {
            assert!(l.remaining_ms <= 0, "{l:?}");
            break;
        }
        assert!(started.elapsed() < DEADLINE, "a 200 ms lease did not expire: {l:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
    assert!(started.elapsed() >= Duration::from_millis(100), "expired too early");

    // Renewal by a restarted process (new incarnation) takes over the same row.
    store.renew_lease(&node, 2, Duration::from_secs(30)).await.unwrap();
    let taken = store.lease(&node).await.unwrap().expect("lease");
    assert_eq!((taken.incarnation, taken.expired), (2, false));

    // Release: expired at once, so a peer need not wait for the TTL.
    store.release_lease(&node).await.unwrap();
    assert!(store.lease(&node).await.unwrap().expect("lease").expired);
    // Another node's lease is untouched by all of this.
    assert_eq!(store.lease(&NodeId("1b".into())).await.unwrap(), None);
}

/// A takeover moves every room the failed node hosts, and only those, to a new epoch, once.
pub async fn a_takeover_moves_the_failed_nodes_rooms_to_a_new_epoch(db: &TestDb) {
    use stoa::ids::RoomAddr;
    use stoa::protocol::RoomConfig;
    let store = db.store().await;
    store.migrate().await.expect("migrations");
    let (a, b) = (NodeId("1a".into()), NodeId("1b".into()));
    if db.backend == Backend::Sqlite {
        assert!(matches!(store.take_over(&a, &b).await, Err(ClusterError::Unsupported)));
        return;
    }
    let mut on_a = Vec::new();
    for i in 0..3 {
        on_a.push(store.create_room(&RoomAddr(format!("t{i}@conference-1a.localhost")), &RoomConfig::default(), "ann", &a).await.unwrap());
    }
    let elsewhere = store.create_room(&RoomAddr("home@conference-1b.localhost".into()), &RoomConfig::default(), "cy", &b).await.unwrap();

    assert_eq!(store.take_over(&a, &b).await.unwrap(), 3);
    assert_eq!(store.rooms_hosted_by(&a).await.unwrap(), 0);
    assert_eq!(store.rooms_hosted_by(&b).await.unwrap(), 4);
    for row in &on_a {
        let now = store.load_room(&row.address).await.unwrap().expect("the room");
        assert_eq!((now.host_node.clone(), now.epoch.0), (b.clone(), row.epoch.0 + 1), "{}", row.address);
    }
    assert_eq!(store.load_room(&elsewhere.address).await.unwrap().unwrap().epoch, elsewhere.epoch, "another node's room keeps its epoch");
    // Nothing is left to move a second time.
    assert_eq!(store.take_over(&a, &b).await.unwrap(), 0);
}

/// A node in a pair tells its clients where to resume: `welcome.peers` holds the peer's client
/// URL from the topology, and the session token works on any node sharing the store.
pub async fn welcome_names_the_peer_and_tokens_work_across_the_group(db: &TestDb) {
    use stoa::config::{GroupSettings, PeerSettings};
    let peer_url = "ws://127.0.0.1:1/ws";
    let mut settings = db.settings("1a");
    settings.cluster.groups = vec![GroupSettings {
        name: "pair-1".into(),
        ha: false,
        nodes: vec![
            PeerSettings { id: "1a".into(), client: "ws://127.0.0.1:0/ws".into(), link: "127.0.0.1:1".into(), service: settings.node.service.clone(), ..Default::default() },
            PeerSettings { id: "1b".into(), client: peer_url.into(), link: "127.0.0.1:2".into(), service: "conference-1b.localhost".into(), ..Default::default() },
        ],
    }];
    let node = crate::harness::TestNode::start(settings).await;
    let mut raw = crate::harness::Client::connect_raw(node.client_addr).await;
    let welcome = raw.hello("ann").await;
    assert_eq!(welcome["peers"], serde_json::json!([peer_url]), "{welcome}");
    let user = welcome["user"].as_str().expect("user").to_owned();
    assert!(user.starts_with("ann~"), "a guest's user name is its own: {welcome}");
    let token = welcome["session"].as_str().expect("session token").to_owned();

    // The token logs in again (as on the peer after a failover: same store).
    let mut again = crate::harness::Client::connect_raw(node.client_addr).await;
    let w = again.request(serde_json::json!({"op": "hello", "v": 1, "token": token})).await;
    assert_eq!((w["op"].as_str(), w["user"].as_str()), (Some("welcome"), Some(user.as_str())), "{w}");
}

use crate::harness::free_port;

/// An HA pair `1a` + `1b` on the test database: settings for `me`, with short timings.
pub fn pair_settings(db: &TestDb, me: &str, links: (u16, u16)) -> stoa::config::Settings {
    use stoa::config::{GroupSettings, PeerSettings};
    let mut settings = db.settings(me);
    settings.node.service = format!("conference-{me}.localhost");
    settings.cluster.secret = "a-secret-of-sixteen+".into();
    settings.cluster.lease_ttl_ms = 2000;
    settings.cluster.lease_renew_ms = 200;
    settings.cluster.heartbeat_ms = 100;
    let node = |id: &str, link: u16| PeerSettings {
        id: id.into(),
        client: format!("ws://127.0.0.1:{}/ws", link + 1),
        link: format!("127.0.0.1:{link}"),
        service: format!("conference-{id}.localhost"),
        xmpp: String::new(),
    };
    settings.cluster.groups =
        vec![GroupSettings { name: "pair-1".into(), ha: true, nodes: vec![node("1a", links.0), node("1b", links.1)] }];
    settings
}

/// A node in an HA group records `initializing` then `normal` in `node_states`, holds a live
/// lease while it runs (shown by `/api/topology`), and releases it when it stops, so a peer
/// would not have to wait for the TTL. On SQLite such a node refuses to start.
pub async fn an_ha_node_records_its_states_and_holds_its_lease(db: &TestDb) {
    use sea_orm::sea_query::{Alias, Expr, ExprTrait, Order, Query};
    use sea_orm::ConnectionTrait;
    let settings = pair_settings(db, "1a", (free_port(), free_port()));
    if db.backend == Backend::Sqlite {
        let err = tokio::task::spawn_blocking(move || stoa::node::Node::start(settings).err()).await.unwrap();
        let err = format!("{:#}", err.expect("an HA node on SQLite must not start"));
        assert!(err.contains("SQLite") && err.contains("pair-1"), "{err}");
        return;
    }
    let node = crate::harness::TestNode::start(settings).await;
    let topo = node.admin_json("/api/topology").await;
    assert_eq!(topo["status"]["state"], "normal", "{topo}");
    assert_eq!(topo["groups"][0]["nodes"][0]["lease"]["expired"], false, "{topo}");
    assert_eq!(topo["groups"][0]["nodes"][1]["lease"], serde_json::Value::Null, "the absent peer never held a lease: {topo}");

    let store = db.store().await;
    let q = Query::select()
        .column(Alias::new("state"))
        .column(Alias::new("reason"))
        .from(Alias::new("node_states"))
        .and_where(Expr::col(Alias::new("node_id")).eq("1a"))
        .order_by(Alias::new("id"), Order::Asc)
        .to_owned();
    let rows = store.connection().query_all(&q).await.expect("node_states");
    let states: Vec<(String, String)> =
        rows.iter().map(|r| (r.try_get("", "state").unwrap(), r.try_get("", "reason").unwrap())).collect();
    assert_eq!(
        states,
        vec![("initializing".into(), "initializing".into()), ("normal".into(), "initializing".into())],
    );

    node.stop().await;
    let l = store.lease(&NodeId("1a".into())).await.unwrap().expect("lease");
    assert!(l.expired, "the lease must be released on shutdown: {l:?}");
}

/// The two nodes of a pair find each other over the authenticated node link (each sees the
/// other reachable and `normal`), and a node notices when its peer stops. A node with the wrong
/// cluster secret is never seen as reachable.
pub async fn peers_see_each_other_over_the_link_and_notice_a_stop(db: &TestDb) {
    let links = (free_port(), free_port());
    let a = crate::harness::TestNode::start(pair_settings(db, "1a", links)).await;
    let b = crate::harness::TestNode::start(pair_settings(db, "1b", links)).await;
    let peer_up = |t: &serde_json::Value| t["peer"]["reachable"] == true && t["peer"]["state"] == "normal";
    crate::harness::await_admin(a.admin_addr, None, "/api/topology", "1a to see 1b", peer_up).await;
    crate::harness::await_admin(b.admin_addr, None, "/api/topology", "1b to see 1a", peer_up).await;

    let stopped = Instant::now();
    b.stop().await;
    crate::harness::await_admin(a.admin_addr, None, "/api/topology", "1a to see 1b gone", |t| t["peer"]["reachable"] == false).await;
    eprintln!("peer loss noticed {} ms after the stop", stopped.elapsed().as_millis());

    // An impostor with another secret never gets a link.
    let mut impostor = pair_settings(db, "1b", links);
    impostor.cluster.secret = "not-the-cluster-secret".into();
    let impostor = crate::harness::TestNode::start(impostor).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // five heartbeat intervals of the impostor
    let t = a.admin_json("/api/topology").await;
    assert_eq!(t["peer"]["reachable"], false, "a node with the wrong secret was accepted: {t}");
    drop(impostor);
}

/// A group with HA off (two nodes, here on one shared store so each can see the other's
/// rooms): a room of node 2a answers `unavailable` naming 2a to a client on 2b, whether 2a is
/// up or down (no takeover, no forwarding without HA), and comes back intact when 2a returns.
pub async fn without_ha_a_down_nodes_rooms_are_unavailable_then_intact(db: &TestDb) {
    use stoa::config::{GroupSettings, PeerSettings};
    let settings = |me: &str| {
        let mut s = db.settings(me);
        s.node.service = format!("conference-{me}.localhost");
        let node = |id: &str| PeerSettings {
            id: id.into(),
            client: "ws://127.0.0.1:1/ws".into(),
            link: "127.0.0.1:1".into(),
            service: format!("conference-{id}.localhost"),
            xmpp: String::new(),
        };
        s.cluster.groups = vec![GroupSettings { name: "pair-2".into(), ha: false, nodes: vec![node("2a"), node("2b")] }];
        s
    };
    let room = "ops@conference-2a.localhost";
    let a = crate::harness::TestNode::start(settings("2a")).await;
    let mut ann = a.client("ann").await;
    ann.create(room, serde_json::json!({})).await;
    ann.join(room, "ann").await;
    let seq = ann.send_acked(room, "before the outage", "c1").await;
    a.stop().await;

    let b = crate::harness::TestNode::start(settings("2b")).await;
    let mut bob = b.client("bob").await;
    let answer = bob.request(serde_json::json!({"op": "join", "room": room, "nick": "bob"})).await;
    crate::harness::assert_error(&answer, "unavailable", "a room of a down node without HA");
    assert!(answer["message"].as_str().unwrap_or("").contains("2a"), "the error names the host: {answer}");

    let a = crate::harness::TestNode::start(settings("2a")).await;
    let mut ann = a.client("ann").await;
    ann.join(room, "ann").await;
    let history = ann.history_all(room).await;
    assert_eq!(crate::harness::seqs(&history), vec![seq], "the room is back intact: {history:?}");
    drop(b);
}

/// Manual failover of a healthy node (maintenance, reason `on_admin_request`), then automatic
/// fallback once the failed-over node has been healthy for `auto_fallback_after_s`; the room's
/// log is continuous across both moves.
pub async fn admin_failover_then_automatic_fallback(db: &TestDb) {
    let links = (free_port(), free_port());
    let mut sa = pair_settings(db, "1a", links);
    let mut sb = pair_settings(db, "1b", links);
    sa.cluster.auto_fallback_after_s = 1;
    sb.cluster.auto_fallback_after_s = 1;
    let a = crate::harness::TestNode::start(sa).await;
    let b = crate::harness::TestNode::start(sb).await;
    crate::harness::await_admin(a.admin_addr, None, "/api/topology", "1a to see 1b", |t| t["peer"]["reachable"] == true).await;
    // And 1b 1a: a backup that never saw its peer alive treats a released lease as a cold start
    // and hands the rooms back at once (docs/ha.md), which is not what this test is about.
    crate::harness::await_admin(b.admin_addr, None, "/api/topology", "1b to see 1a", |t| t["peer"]["reachable"] == true).await;
    let room = "ops@conference-1a.localhost";
    let mut ann = a.client("ann").await;
    ann.create(room, serde_json::json!({})).await;
    ann.join(room, "ann").await;
    ann.send_acked(room, "before", "c1").await;

    let answer = stoa::admin_client::request(&a.admin_addr.to_string(), "POST", "/api/nodes/1a/failover", None, DEADLINE).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let status = |t: &serde_json::Value| t["status"].clone();
    let s = crate::harness::await_admin(b.admin_addr, None, "/api/topology", "1b in backup mode", |t| status(t)["state"] == "running_in_backup_mode").await;
    eprintln!("1b: {}", status(&s));
    // 1a is failed over (not critical) for a second: 1b falls back by itself.
    let s = crate::harness::await_admin(a.admin_addr, None, "/api/topology", "1a normal again", |t| status(t)["state"] == "normal").await;
    assert_eq!(status(&s)["reason"], "automatic_fallback", "{s}");
    crate::harness::await_admin(b.admin_addr, None, "/api/topology", "1b normal again", |t| status(t)["state"] == "normal").await;

    let store = db.store().await;
    let recorded = store.last_node_state(&NodeId("1b".into())).await.unwrap().unwrap();
    assert_eq!((recorded.state.as_str(), recorded.reason.as_str()), ("normal", "automatic_fallback"));
    let mut bob = a.client("bob").await;
    bob.join(room, "bob").await;
    bob.send_acked(room, "after", "c2").await;
    let seqs: Vec<u64> = db.stored_messages(room).await.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    drop(b);
}

/// The state of a node, as its admin API says.
async fn state_of(node: &crate::harness::TestNode) -> String {
    node.admin_json("/api/topology").await["status"]["state"].as_str().unwrap_or("").to_owned()
}

async fn await_state(node: &crate::harness::TestNode, name: &str, state: &str) {
    crate::harness::await_admin(node.admin_addr, None, "/api/topology", &format!("{name} {state}"), |t| t["status"]["state"] == state).await;
}

/// Issue 9, bug 3b: the whole pair is stopped (1a first, so 1b holds every room) and started
/// again, in either order, and comes back normal/normal by itself with every room intact. The
/// first node up serves everything while its peer is away (it reclaims its own rooms from a
/// peer that is gone, or starts holding the peer's), and gives the peer's rooms back as soon
/// as the peer is up: a cold start is not a failover, so no operator is needed.
pub async fn whole_pair_stop_and_start_comes_back_normal(db: &TestDb) {
    use crate::harness::TestNode;
    let links = (free_port(), free_port());
    let start = |me: &'static str| TestNode::start(pair_settings(db, me, links));
    let a = start("1a").await;
    let b = start("1b").await;
    crate::harness::await_admin(b.admin_addr, None, "/api/topology", "1b to see 1a", |t| t["peer"]["reachable"] == true).await;
    let (ra, rb) = ("ops@conference-1a.localhost", "dev@conference-1b.localhost");
    let mut ann = a.client("ann").await;
    ann.create(ra, serde_json::json!({})).await;
    ann.join(ra, "ann").await;
    ann.send_acked(ra, "a1", "a1").await;
    let mut bob = b.client("bob").await;
    bob.create(rb, serde_json::json!({})).await;
    bob.join(rb, "bob").await;
    bob.send_acked(rb, "b1", "b1").await;

    // Round 1: stop 1a (1b takes its rooms), stop 1b; start 1a first, then 1b.
    a.stop().await;
    await_state(&b, "1b", "running_in_backup_mode").await;
    b.stop().await;
    let a = start("1a").await;
    // 1b is gone too: 1a reclaims its rooms and serves 1b's while 1b is away.
    await_state(&a, "1a", "running_in_backup_mode").await;
    let mut ann = a.client("ann").await;
    ann.join(ra, "ann").await;
    ann.send_acked(ra, "a2", "a2").await;
    let b = start("1b").await;
    await_state(&b, "1b", "normal").await;
    await_state(&a, "1a", "normal").await;
    assert_eq!(b.admin_json("/api/topology").await["status"]["reason"], "automatic_fallback", "no operator gave 1b its rooms back");
    let mut bob = b.client("bob").await;
    bob.join(rb, "bob").await;
    bob.send_acked(rb, "b2", "b2").await;

    // Round 2: the same stops; start 1b first (it holds 1a's rooms from before), then 1a.
    drop((ann, bob));
    a.stop().await;
    await_state(&b, "1b", "running_in_backup_mode").await;
    b.stop().await;
    let b = start("1b").await;
    let t = b.admin_json("/api/topology").await;
    assert_eq!((t["status"]["state"].as_str(), t["status"]["reason"].as_str()), (Some("running_in_backup_mode"), Some("initializing")), "{t}");
    let a = start("1a").await;
    await_state(&a, "1a", "normal").await;
    await_state(&b, "1b", "normal").await;
    let mut ann = a.client("ann").await;
    ann.join(ra, "ann").await;
    ann.send_acked(ra, "a3", "a3").await;
    let mut bob = b.client("bob").await;
    bob.join(rb, "bob").await;
    bob.send_acked(rb, "b3", "b3").await;
    for room in [ra, rb] {
        let seqs: Vec<u64> = db.stored_messages(room).await.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3], "{room}");
    }
    // Every admin verb works again: a maintenance failover and its fallback, asked through 1a.
    crate::harness::await_admin(a.admin_addr, None, "/api/topology", "1a to see 1b", |t| t["peer"]["reachable"] == true).await;
    let post = |path: String| async move { stoa::admin_client::request(&a.admin_addr.to_string(), "POST", &path, None, DEADLINE).await.unwrap() };
    let answer = post("/api/nodes/1b/failover".into()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    await_state(&b, "1b", "failed_over").await;
    let answer = post("/api/nodes/1b/fallback".into()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    await_state(&b, "1b", "normal").await;
    await_state(&a, "1a", "normal").await;
}

/// Issue 9, bug 3a: a maintenance failover of a node that hosts no rooms is a failover all
/// the same: the node stays `failed_over` (it used to take itself back 63 ms later, with no
/// fallback asked for), its peer runs in backup mode, and a fallback ends both.
pub async fn failover_of_a_node_without_rooms_stays_until_fallback(db: &TestDb) {
    use crate::harness::TestNode;
    let links = (free_port(), free_port());
    let a = TestNode::start(pair_settings(db, "1a", links)).await;
    let b = TestNode::start(pair_settings(db, "1b", links)).await;
    crate::harness::await_admin(b.admin_addr, None, "/api/topology", "1b to see 1a", |t| t["peer"]["reachable"] == true).await;
    let post = |path: &'static str| async move { stoa::admin_client::request(&b.admin_addr.to_string(), "POST", path, None, DEADLINE).await.unwrap() };
    let answer = post("/api/nodes/1b/failover").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    await_state(&b, "1b", "failed_over").await;
    await_state(&a, "1a", "running_in_backup_mode").await;
    // Many control-loop ticks and lease renewals later, nothing has undone it.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(state_of(&b).await, "failed_over", "1b must wait for a fallback");
        assert_eq!(state_of(&a).await, "running_in_backup_mode");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling interval, not a wait
    }
    let answer = post("/api/nodes/1b/fallback").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    await_state(&b, "1b", "normal").await;
    await_state(&a, "1a", "normal").await;
    let store = db.store().await;
    let audit = store.audit_lines(10).await.unwrap();
    let actions: Vec<(&str, &str)> = audit.iter().map(|l| (l.action.as_str(), l.outcome.as_str())).collect();
    assert!(actions.contains(&("failover", "done")) && actions.contains(&("fallback", "done")), "{audit:?}");
}
