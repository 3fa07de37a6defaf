//! Clusters of redundancy groups (issue 14, docs/clusters.md): real `stoa` processes, one
//! store per group, users on every node in rooms of every group, kill -9 of one pair's host
//! under load, and the history checker of the pair tests.
//!
//! The cluster of these tests is three pairs (`g1`: 1a+1b, `g2`: 2a+2b, `g3`: 3a+3b, each on
//! its own PostgreSQL database) and one single node (`g4`: 4a, on SQLite): seven processes,
//! with the short HA timings of the pair tests.

use super::failover::{Traffic, check_histories};
use super::xmpp::XmppClient;
use serde_json::json;
use crate::harness::{Backend, DEADLINE, NodeProcess, TestDb, await_admin, counter, free_port};
use serde_json::Value;
use std::time::{Duration, Instant};
use stoa::client::{Client, Login};

const SECRET: &str = "a-cluster-secret-of-20";

/// One node of the test cluster.
struct Member {
    id: &'static str,
    /// Index of its group in [`Cluster::groups`].
    group: usize,
    client: u16,
    admin: u16,
    link: u16,
    xmpp: u16,
    config: std::path::PathBuf,
    process: Option<NodeProcess>,
}

/// A group: its name, whether it is an HA pair, and its store.
struct Group {
    name: &'static str,
    ha: bool,
    db: TestDb,
}

/// A proxy on node `from`'s way to node `to`'s link.
struct Proxy {
    from: &'static str,
    to: &'static str,
    port: u16,
    target: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// (The processes stop before their databases are dropped: fields drop in order.)
pub(crate) struct Cluster {
    members: Vec<Member>,
    groups: Vec<Group>,
    proxies: Vec<Proxy>,
}

impl Cluster {
    /// Three PostgreSQL pairs (the first on `db`) and one single SQLite node, configured (not
    /// started).
    async fn three_pairs_and_a_single_node(db: &TestDb) -> Cluster {
        let groups = [("g1", true, Backend::Postgres), ("g2", true, Backend::Postgres), ("g3", true, Backend::Postgres), ("g4", false, Backend::Sqlite)];
        let layout = [("1a", 0), ("1b", 0), ("2a", 1), ("2b", 1), ("3a", 2), ("3b", 2), ("4a", 3)];
        Cluster::configure(db, &groups, &layout, &[]).await
    }

    /// `groups` (name, HA, store backend; each gets a database of its own) with the nodes of
    /// `layout` (id, group index), configured (not started). Each `(from, to)` of `via` makes
    /// node `from` dial node `to`'s link through a proxy ([`Cluster::proxy`]), so a test can cut
    /// that link.
    async fn configure(db: &TestDb, groups: &[(&'static str, bool, Backend)], layout: &[(&'static str, usize)], via: &[(&'static str, &'static str)]) -> Cluster {
        assert_eq!(db.backend, Backend::Postgres, "the cluster tests run on PostgreSQL");
        let mut stores = Vec::new();
        for (name, ha, backend) in groups {
            stores.push(Group { name, ha: *ha, db: TestDb::new(*backend, &format!("cluster_{name}")).await });
        }
        let members: Vec<Member> = layout
            .iter()
            .map(|&(id, group)| Member {
                id,
                group,
                client: free_port(),
                admin: free_port(),
                link: free_port(),
                xmpp: free_port(),
                config: db.dir().join(format!("{id}.toml")),
                process: None,
            })
            .collect();
        let proxies: Vec<Proxy> = via
            .iter()
            .map(|&(from, to)| {
                let target = members.iter().find(|m| m.id == to).expect("a node of the layout").link;
                Proxy { from, to, port: free_port(), target, task: None }
            })
            .collect();
        for m in &members {
            let mut topology = String::new();
            for (g, group) in stores.iter().enumerate() {
                topology += &format!("[[cluster.groups]]\nname = \"{}\"\nha = {}\n", group.name, group.ha);
                for n in members.iter().filter(|n| n.group == g) {
                    let link = proxies.iter().find(|p| p.from == m.id && p.to == n.id).map_or(n.link, |p| p.port);
                    topology += &format!(
                        "[[cluster.groups.nodes]]\nid = \"{id}\"\nclient = \"ws://127.0.0.1:{c}/ws\"\nlink = \"127.0.0.1:{link}\"\nservice = \"conference-{id}.localhost\"\nxmpp = \"127.0.0.1:{x}\"\n",
                        id = n.id,
                        c = n.client,
                        x = n.xmpp,
                    );
                }
            }
            let text = format!(
                "[node]\nid = \"{id}\"\nservice = \"conference-{id}.localhost\"\ndata_dir = \"{data}\"\n\n\
                 [listen]\nclient = \"127.0.0.1:{c}\"\nadmin = \"127.0.0.1:{a}\"\n\n\
                 [store]\nurl = \"{url}\"\nmax_connections = 4\nidle_in_transaction_timeout_ms = 2000\n\n\
                 [auth]\nallow_guests = true\n\n[log]\nlevel = \"info\"\n\n[xmpp]\nc2s = \"127.0.0.1:{x}\"\n\n\
                 [cluster]\nsecret = \"{SECRET}\"\nlease_ttl_ms = 2000\nlease_renew_ms = 200\nheartbeat_ms = 100\n\
                 critical_service_down_delay_ms = 1000\n\n{topology}",
                id = m.id,
                data = db.dir().join(format!("data-{}", m.id)).display(),
                c = m.client,
                a = m.admin,
                x = m.xmpp,
                url = stores[m.group].db.url,
            );
            std::fs::write(&m.config, text).expect("writing a node config");
        }
        Cluster { members, groups: stores, proxies }
    }

    /// Make `other` a peering cluster of this one, named `name`, keyed by `secret`: an entry
    /// appended to every node's config (call it on both clusters, before they start).
    fn add_peering(&self, name: &str, secret: &str, other: &Cluster) {
        let mut entry = format!("\n[[cluster.peering]]\nname = \"{name}\"\nsecret = \"{secret}\"\n");
        for n in &other.members {
            entry += &format!(
                "[[cluster.peering.nodes]]\nid = \"{id}\"\nclient = \"ws://127.0.0.1:{c}/ws\"\nlink = \"127.0.0.1:{l}\"\nservice = \"conference-{id}.localhost\"\n",
                id = n.id,
                c = n.client,
                l = n.link
            );
        }
        for m in &self.members {
            let mut text = std::fs::read_to_string(&m.config).expect("reading a node config");
            text += &entry;
            std::fs::write(&m.config, text).expect("writing a node config");
        }
    }

    /// Run (`up`) or stop every proxy of `via`; stopping one closes the connections through it.
    async fn proxies(&mut self, up: bool) {
        for p in &mut self.proxies {
            if let Some(task) = p.task.take() {
                task.abort();
                let _ = task.await;
            }
            if up {
                p.task = Some(super::failover::link_proxy(p.port, p.target));
            }
        }
    }

    fn index(&self, id: &str) -> usize {
        self.members.iter().position(|m| m.id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    fn url(&self, id: &str) -> String {
        format!("ws://127.0.0.1:{}/ws", self.members[self.index(id)].client)
    }

    /// Node `id`'s XMPP c2s listener.
    fn xmpp(&self, id: &str) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.members[self.index(id)].xmpp))
    }

    fn admin(&self, id: &str) -> String {
        format!("127.0.0.1:{}", self.members[self.index(id)].admin)
    }

    /// The client URLs a user of node `id` resumes on: its own node, then its peer.
    fn urls_of(&self, id: &str) -> Vec<String> {
        let me = &self.members[self.index(id)];
        let mut urls = vec![self.url(id)];
        urls.extend(self.members.iter().filter(|m| m.group == me.group && m.id != id).map(|m| self.url(m.id)));
        urls
    }

    async fn start(&mut self, id: &str) {
        let i = self.index(id);
        let m = &mut self.members[i];
        m.process = Some(NodeProcess::start(&m.config, m.id).await);
    }

    fn kill(&mut self, id: &str) {
        let i = self.index(id);
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
        }
    }

    async fn call(&self, id: &str, method: &str, path: &str) -> stoa::admin_client::Answer {
        stoa::admin_client::request(&self.admin(id), method, path, None, DEADLINE).await.expect("admin API answers")
    }

    /// Wait until node `on` sees node `id` in `state`.
    async fn await_state(&self, on: &str, id: &str, state: &str) -> Duration {
        let started = Instant::now();
        let mut last = Value::Null;
        while started.elapsed() < DEADLINE {
            if let Ok(a) = stoa::admin_client::request(&self.admin(on), "GET", &format!("/api/nodes/{id}"), None, Duration::from_secs(2)).await {
                last = a.json();
                if last["state"] == state {
                    return started.elapsed();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
        }
        panic!("node {on} did not see {id} {state} within {DEADLINE:?}; last view: {last}");
    }

    /// Start the proxies and every node (the first node of each group first) and wait until
    /// each node sees every other over its link.
    async fn start_all(&mut self) {
        self.proxies(true).await;
        let first: Vec<&'static str> = (0..self.groups.len()).filter_map(|g| self.members.iter().find(|m| m.group == g)).map(|m| m.id).collect();
        for id in &first {
            self.start(id).await;
        }
        for id in first.iter().filter(|id| self.groups[self.members[self.index(id)].group].ha) {
            self.await_state(id, id, "normal").await;
        }
        let rest: Vec<&'static str> = self.members.iter().map(|m| m.id).filter(|id| !first.contains(id)).collect();
        for id in rest {
            self.start(id).await;
        }
        let all: Vec<&str> = self.members.iter().map(|m| m.id).collect();
        for m in &self.members {
            let addr = m.process.as_ref().expect("started").admin_addr;
            let what = format!("{} to see every other node over its link", m.id);
            await_admin(addr, None, "/api/topology", &what, |t| {
                let nodes: Vec<&Value> = t["groups"].as_array().into_iter().flatten().flat_map(|g| g["nodes"].as_array().into_iter().flatten()).collect();
                nodes.len() == all.len() && nodes.iter().all(|n| n["this_node"] == true || n["link"]["reachable"] == true)
            })
            .await;
        }
    }

    /// Wait until node `on` sees node `other` over its link (`reachable`), or no longer.
    async fn await_link(&self, on: &str, other: &str, reachable: bool) {
        let what = format!("{on} to see {other} {}", if reachable { "over its link" } else { "cut off" });
        let addr = self.admin(on).parse().expect("admin address");
        await_admin(addr, None, &format!("/api/nodes/{other}"), &what, |n| n["link"]["reachable"] == reachable).await;
    }

    /// Rooms hosted by `node` in its group's store.
    async fn hosted(&self, node: &str) -> u64 {
        let db = &self.groups[self.members[self.index(node)].group].db;
        crate::cases::failover::hosted(db, node).await
    }
}

/// Three pairs and a single node, users on every node in rooms of every group (created from
/// nodes of other groups, so over the links), kill -9 of pair 2's host under load: pair 2's
/// backup takes over; every acked message is stored once, in order, in its group's store;
/// users on the other groups' nodes keep their sessions (no reconnect) and see no gap. Every
/// node shows the whole cluster, and a fallback of 2a asked of the single node 4a is carried
/// out by 2b and reported with 2b's own words.
pub async fn three_pairs_and_a_single_node_survive_a_kill9(db: &TestDb) {
    let mut cluster = Cluster::three_pairs_and_a_single_node(db).await;
    cluster.start_all().await;

    // One room per group, created from a node of another group.
    let rooms: Vec<(String, &str)> = vec![
        ("r1@conference-1a.localhost".to_owned(), "4a"),
        ("r2@conference-2a.localhost".to_owned(), "1b"),
        ("r3@conference-3a.localhost".to_owned(), "2b"),
        ("r4@conference-4a.localhost".to_owned(), "3a"),
    ];
    for (room, from) in &rooms {
        let (owner, _) = Client::connect(&cluster.url(from), Login::guest(format!("owner-{from}"))).await.expect("owner connects");
        owner.create(room.as_str(), Default::default()).await.unwrap_or_else(|e| panic!("creating {room} from {from}: {e}"));
        owner.close().await;
    }
    let room_names: Vec<String> = rooms.iter().map(|(r, _)| r.clone()).collect();

    // Two writers on every node, each in a room of another group and its own group's room.
    let ids: Vec<&str> = cluster.members.iter().map(|m| m.id).collect();
    let mut writers = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        for j in 0..2 {
            writers.push((cluster.urls_of(id), room_names[(k + j) % room_names.len()].clone()));
        }
    }
    let writer_nodes: Vec<&str> = ids.iter().flat_map(|id| [*id, *id]).collect();
    let traffic = Traffic::start_writers(writers).await;
    // An XMPP user on the single node, in pair 2's room.
    let mut ann = XmppClient::connect(cluster.xmpp("4a"), "guest", None).await;
    let joined = ann.join(&room_names[1], "Ann", json!({})).await;
    assert_eq!(joined["event"], "joined", "an XMPP client on 4a joins a room of pair 2: {joined}");
    ann.command(json!({"op": "send", "room": room_names[1], "body": "ann before", "origin_id": "ann-1"})).await;
    ann.groupchat("ann before").await;
    tokio::time::sleep(Duration::from_millis(700)).await; // traffic before the fault
    assert!(traffic.acked_count() > 0, "no traffic before the fault");

    let killed = Instant::now();
    cluster.kill("2a");
    let detect = cluster.await_state("2b", "2b", "running_in_backup_mode").await;
    let writable = traffic.await_all_rooms_writable(&room_names, killed, DEADLINE).await;
    eprintln!("kill -9 of 2a → 2b in backup mode after {} ms, every room writable after {} ms", detect.as_millis(), writable.as_millis());
    assert_eq!(cluster.hosted("2a").await, 0, "2b must host every room of 2a");

    // The XMPP user is still in the room, now on 2b, on the same stream.
    ann.command(json!({"op": "send", "room": room_names[1], "body": "ann after", "origin_id": "ann-2"})).await;
    let after = ann.groupchat("ann after").await;
    assert_eq!(after["origin_id"], "ann-2", "{after}");

    // Every node shows the whole cluster: 4a sees 2a unreachable and 2b in backup mode.
    cluster.await_state("4a", "2b", "running_in_backup_mode").await;
    cluster.await_state("4a", "2a", "unknown").await;
    let (ok, status) = crate::harness::run_stoa(&["admin", "--admin", &cluster.admin("4a"), "status"]).await;
    assert!(ok, "{status}");
    let line = |id: &str| status.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_default().to_owned();
    assert!(status.contains("group g2 (ha)") && status.contains("group g4"), "{status}");
    assert!(line("2a").contains("unknown") && line("2b").contains("running_in_backup_mode"), "`stoa admin status` on 4a:\n{status}");
    let topology = cluster.call("1a", "GET", "/api/topology").await.json();
    let groups: Vec<&str> = topology["groups"].as_array().expect("groups").iter().map(|g| g["name"].as_str().unwrap_or_default()).collect();
    assert_eq!(groups, ["g1", "g2", "g3", "g4"], "{topology}");

    // 2a comes back failed over; a fallback asked of 4a is carried out by 2b.
    cluster.start("2a").await;
    cluster.await_state("2a", "2a", "failed_over").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // traffic on the backup
    let answer = cluster.call("4a", "POST", "/api/nodes/2a/fallback").await;
    assert_eq!(answer.status, 200, "fallback of 2a asked of 4a: {}", answer.body);
    cluster.await_state("2a", "2a", "normal").await;
    cluster.await_state("2b", "2b", "normal").await;
    let fell_back = Instant::now();
    traffic.await_all_rooms_writable(&room_names, fell_back, DEADLINE).await;
    assert_eq!(cluster.hosted("2b").await, 0, "after the fallback 2a hosts its rooms again");
    let refused = cluster.call("1a", "POST", "/api/nodes/4a/failover").await;
    assert_eq!(refused.status, 409, "4a has no peer: {}", refused.body);
    assert!(refused.json()["message"].as_str().unwrap_or_default().contains("no redundancy peer"), "{}", refused.body);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let history = tokio::time::timeout(DEADLINE, traffic.finish()).await.expect("every writer's last send answered");
    let stores: Vec<(&TestDb, Vec<String>)> = cluster.groups.iter().map(|g| (&g.db, room_names.iter().filter(|r| r.contains(&format!("-{}", &g.name[1..]))).cloned().collect())).collect();
    let stores: Vec<(&TestDb, &[String])> = stores.iter().map(|(db, rooms)| (*db, rooms.as_slice())).collect();
    check_histories(&stores, &history).await;
    let stored = cluster.groups[1].db.stored_messages(&room_names[1]).await;
    let ann_ids: Vec<&str> = stored.iter().filter(|m| m.client_msg_id.starts_with("ann-")).map(|m| m.id.as_str()).collect();
    assert_eq!(ann_ids.len(), 2, "each of Ann's messages stored once");
    assert_eq!(Some(ann_ids[1]), after["stanza_id"].as_str(), "stanza-id is the stored id, across the takeover");
    assert!(!ann.seen_event("disconnected"), "Ann's stream survived the takeover of her room's host");
    ann.quit().await;
    let moved: Vec<(&str, usize)> = writer_nodes.iter().zip(&history.disconnects).map(|(n, d)| (*n, *d)).collect();
    eprintln!("disconnects per writer (node, count): {moved:?}");
    // Users of the other groups followed pair 2's room without a reconnect (2a's own users
    // resumed on 2b: their node died).
    let reconnected: Vec<&(&str, usize)> = moved.iter().filter(|(n, d)| !n.starts_with('2') && *d > 0).collect();
    assert!(reconnected.is_empty(), "users of other groups' nodes had to reconnect: {reconnected:?}");
}

/// A partition between two groups' nodes (pair g1: 1a+1b on PostgreSQL; single node g2: 2a on
/// SQLite; the link 1a↔2a through proxies, then cut): no node changes state (there is no
/// failure, and no group decides anything about another); the sessions on 1a and 2a using the
/// other side's room wait while the cut is shorter than the takeover bound, then go on with no
/// reconnect and no gap, while 1b's users keep writing both rooms. A cut longer than the bound
/// fails a request clearly (`unavailable`, naming the room's service), never hangs.
pub async fn a_partition_between_groups_waits_then_fails_clearly(db: &TestDb) {
    let groups = [("g1", true, Backend::Postgres), ("g2", false, Backend::Sqlite)];
    let layout = [("1a", 0), ("1b", 0), ("2a", 1)];
    let mut cluster = Cluster::configure(db, &groups, &layout, &[("1a", "2a"), ("2a", "1a")]).await;
    cluster.start_all().await;
    let (r1, r2) = ("p1@conference-1a.localhost".to_owned(), "p2@conference-2a.localhost".to_owned());
    for (room, from) in [(&r1, "1b"), (&r2, "1b")] {
        let (owner, _) = Client::connect(&cluster.url(from), Login::guest("owner")).await.expect("owner connects");
        owner.create(room.as_str(), Default::default()).await.unwrap_or_else(|e| panic!("creating {room}: {e}"));
        owner.close().await;
    }
    let writers = vec![
        (cluster.urls_of("1a"), r2.clone()),
        (cluster.urls_of("2a"), r1.clone()),
        (cluster.urls_of("1b"), r1.clone()),
        (cluster.urls_of("1b"), r2.clone()),
    ];
    let traffic = Traffic::start_writers(writers).await;
    // Carol on 1a is in a room of each side.
    let (carol, _) = Client::connect(&cluster.url("1a"), Login::guest("carol")).await.expect("carol connects");
    for room in [&r1, &r2] {
        carol.join(room.as_str(), "carol", None, None).await.unwrap_or_else(|e| panic!("carol joins {room}: {e}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // traffic before the cut

    // A short cut: 1a and 2a lose each other; 1b still sees both.
    cluster.proxies(false).await;
    let cut = Instant::now();
    cluster.await_link("1a", "2a", false).await;
    cluster.await_link("2a", "1a", false).await;
    // Carol's post to 2a's room waits for the link; her post to 1a's room, sent after it on
    // the same connection, does not wait behind it.
    let held = carol.send_nowait(r2.as_str(), "while cut off", stoa::client::new_cid()).await.expect("queued");
    let held = tokio::spawn(held);
    let local = tokio::time::timeout(Duration::from_secs(2), carol.send(r1.as_str(), "meanwhile, here", stoa::client::new_cid())).await;
    local.expect("carol's post to 1a's room is not held up by her post to 2a's").expect("acked");
    assert!(!held.is_finished(), "the post to 2a's room cannot be acked while 1a is cut off from 2a");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (on, id) in [("1a", "1a"), ("1b", "1b"), ("1a", "2a"), ("2a", "2a")] {
        let state = cluster.call(on, "GET", &format!("/api/nodes/{id}")).await.json()["state"].clone();
        let expected = if on != id { "unknown" } else { "normal" };
        assert_eq!(state, expected, "{on}'s view of {id} during the cut");
    }
    assert_eq!(cluster.call("1b", "GET", "/api/nodes/2a").await.json()["state"], "normal", "1b still sees 2a");
    let during = traffic.await_all_rooms_writable(&[r1.clone(), r2.clone()], cut, DEADLINE).await;
    eprintln!("during the cut both rooms took posts (through 1b) within {} ms", during.as_millis());
    cluster.proxies(true).await;
    let healed = Instant::now();
    cluster.await_link("1a", "2a", true).await;
    cluster.await_link("2a", "1a", true).await;
    let ack = tokio::time::timeout(DEADLINE, held).await.expect("the held post acked once the link is back").expect("task").expect("acked");
    assert!(ack.seq > 0);
    carol.close().await;
    traffic.await_all_rooms_writable(&[r1.clone(), r2.clone()], healed, DEADLINE).await;
    for id in ["1a", "1b"] {
        assert_eq!(cluster.call(id, "GET", &format!("/api/nodes/{id}")).await.json()["state"], "normal", "{id} after the cut");
    }
    assert_eq!(cluster.hosted("1b").await, 0, "no room of 1a moved");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let history = tokio::time::timeout(DEADLINE, traffic.finish()).await.expect("every writer's last send answered");
    check_histories(&[(&cluster.groups[0].db, &[r1.clone()][..]), (&cluster.groups[1].db, &[r2.clone()][..])], &history).await;
    assert_eq!(history.disconnects, [0, 0, 0, 0], "nobody reconnected: the requests waited for the link");

    // A cut longer than the takeover bound: a request for the other side's room fails
    // clearly, in bounded time.
    let (reader, _) = Client::connect(&cluster.url("1a"), Login::guest("reader")).await.expect("reader connects");
    cluster.proxies(false).await;
    cluster.await_link("1a", "2a", false).await;
    let asked = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(20), reader.history(r2.as_str(), None, None, Some(10))).await.expect("a bounded answer");
    let err = answer.expect_err("no node serves 2a's rooms for 1a now");
    assert!(err.to_string().contains("unavailable") && err.to_string().contains("conference-2a.localhost"), "{err}");
    eprintln!("history of {r2} during a long cut: `{err}` after {} ms", asked.elapsed().as_millis());
    reader.close().await;
}

/// A takeover whose fence is slow (another transaction holds the failed node's room rows):
/// the backup lists the failed node's rooms as soon as it starts taking over, so other groups'
/// nodes send it their sessions' follow joins at once. They must wait there for the fence, not
/// be answered "hosted by the dead node" and sent again every 50 ms, each try reading the
/// store the fence is writing (23 to 1,217 such tries per failover in the cluster bench).
/// Pair g1 (1a, 1b) on PostgreSQL, single node 2a on SQLite; Carol on 2a in 1a's room.
pub async fn followers_wait_for_a_slow_fence_instead_of_retrying(db: &TestDb) {
    use sqlx::Connection as _;
    let groups = [("g1", true, Backend::Postgres), ("g2", false, Backend::Sqlite)];
    let mut cluster = Cluster::configure(db, &groups, &[("1a", 0), ("1b", 0), ("2a", 1)], &[]).await;
    cluster.start_all().await;
    let room = "slow@conference-1a.localhost";
    let (owner, _) = Client::connect(&cluster.url("1a"), Login::guest("owner")).await.expect("owner connects");
    owner.create(room, Default::default()).await.expect("room created");
    owner.close().await;
    let (carol, _) = Client::connect(&cluster.url("2a"), Login::guest("carol")).await.expect("carol connects");
    carol.join(room, "carol", None, None).await.expect("carol joins 1a's room from 2a");
    carol.send(room, "before", stoa::client::new_cid()).await.expect("acked before the fault");

    // The fence (`UPDATE rooms … WHERE host_node = '1a'`) waits for this lock, up to its own
    // 2 s lock timeout.
    let mut lock = sqlx::PgConnection::connect(&cluster.groups[0].db.url).await.expect("a connection of the test's own");
    sqlx::raw_sql("BEGIN; SELECT 1 FROM rooms WHERE host_node = '1a' FOR UPDATE").execute(&mut lock).await.expect("locking 1a's rooms");
    cluster.kill("1a");
    cluster.await_state("1b", "1b", "taking_over").await;
    let held = tokio::spawn(carol.send_nowait(room, "during the fence", stoa::client::new_cid()).await.expect("queued"));
    tokio::time::sleep(Duration::from_millis(1000)).await; // the fence waits; so must 2a's follow join
    assert!(!held.is_finished(), "nothing is acked in 1a's room before the fence commits");
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.expect("releasing 1a's rooms");
    cluster.await_state("1b", "1b", "running_in_backup_mode").await;
    let ack = tokio::time::timeout(DEADLINE, held).await.expect("the post is acked after the takeover").expect("task").expect("acked");
    assert!(ack.seq > 0);
    carol.send(room, "after", stoa::client::new_cid()).await.expect("acked on 1b, same connection");
    carol.close().await;

    let admin_2a = cluster.admin("2a").parse().expect("admin address");
    assert_eq!(counter(admin_2a, "stoa_forwarded_rooms_followed_total").await, 1.0, "2a followed Carol's room to 1b");
    assert_eq!(counter(admin_2a, "stoa_forwarded_follow_retries_total").await, 0.0, "2a's follow join waited on 1b for the fence, never sent again");
}

/// Two clusters with their own configs, peered with a secret of their own: cluster A is a
/// PostgreSQL pair (1a, 1b), cluster B a single SQLite node (9a). B's users join and post in a
/// room of A through their own node (and appear there as `user@cluster-b`); kill -9 of A's
/// host: they follow the room to 1b without a reconnect or a gap, and every acked message is
/// stored once. B's node cannot act on A's nodes. With cluster A down, a request from B fails
/// clearly (`unavailable`, naming the service) in bounded time.
pub async fn a_peering_cluster_uses_rooms_across_a_failover(db: &TestDb) {
    let mut a = Cluster::configure(db, &[("g1", true, Backend::Postgres)], &[("1a", 0), ("1b", 0)], &[]).await;
    let mut b = Cluster::configure(db, &[("g9", false, Backend::Sqlite)], &[("9a", 0)], &[]).await;
    const PEERING_SECRET: &str = "a-peering-secret-of-its-own";
    a.add_peering("cluster-b", PEERING_SECRET, &b);
    b.add_peering("cluster-a", PEERING_SECRET, &a);
    a.start_all().await;
    b.start_all().await;
    for (on, other) in [("9a", "1a"), ("9a", "1b"), ("1a", "9a"), ("1b", "9a")] {
        let (cluster, id) = if on == "9a" { (&b, on) } else { (&a, on) };
        cluster.await_link(id, other, true).await;
    }
    let topology = b.call("9a", "GET", "/api/topology").await.json();
    assert_eq!(topology["peering"][0]["name"], "cluster-a", "{topology}");

    let room = "x@conference-1a.localhost".to_owned();
    let (owner, _) = Client::connect(&a.url("1a"), Login::guest("owner")).await.expect("owner connects");
    owner.create(room.as_str(), Default::default()).await.expect("creating the room");
    owner.close().await;
    let traffic = Traffic::start_writers(vec![(b.urls_of("9a"), room.clone()), (b.urls_of("9a"), room.clone()), (a.urls_of("1b"), room.clone())]).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // traffic before the fault
    assert!(traffic.acked_count() > 0, "no traffic before the fault");

    // B's node is not one of A's operators.
    let refused = b.call("9a", "POST", "/api/nodes/1a/failover").await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(a.call("1a", "GET", "/api/nodes/1a").await.json()["state"], "normal");

    let killed = Instant::now();
    a.kill("1a");
    a.await_state("1b", "1b", "running_in_backup_mode").await;
    let writable = traffic.await_all_rooms_writable(std::slice::from_ref(&room), killed, DEADLINE).await;
    eprintln!("kill -9 of 1a: the room took posts again after {} ms", writable.as_millis());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let history = tokio::time::timeout(DEADLINE, traffic.finish()).await.expect("every writer's last send answered");
    check_histories(&[(&a.groups[0].db, std::slice::from_ref(&room))], &history).await;
    assert_eq!(&history.disconnects[..2], [0, 0], "cluster B's users followed the room without a reconnect");
    let store = a.groups[0].db.store().await;
    let row = store.load_room(&stoa::ids::RoomAddr(room.clone())).await.expect("loading the room").expect("the room is stored");
    let senders: std::collections::BTreeSet<String> = store.messages(row.id, 0, None, 100_000, false).await.expect("reading messages").into_iter().map(|m| m.sender).collect();
    store.close().await;
    assert_eq!(senders.iter().filter(|s| s.ends_with("@cluster-b")).count(), 2, "B's users are B's, named so in A: {senders:?}");

    // Cluster A down: a clear error from B, not a hang.
    a.kill("1b");
    b.await_link("9a", "1b", false).await;
    let (reader, _) = Client::connect(&b.url("9a"), Login::guest("reader")).await.expect("reader connects");
    let answer = tokio::time::timeout(Duration::from_secs(20), reader.history(room.as_str(), None, None, Some(10))).await.expect("a bounded answer");
    let err = answer.expect_err("cluster A is down");
    assert!(err.to_string().contains("unavailable") && err.to_string().contains("conference-1a.localhost"), "{err}");
    reader.close().await;
}

impl Cluster {
    /// Add `line` to node `id`'s `[auth]` section (before it starts).
    fn auth_setting(&self, id: &str, line: &str) {
        let path = &self.members[self.index(id)].config;
        let text = std::fs::read_to_string(path).expect("a node config");
        std::fs::write(path, text.replacen("[auth]\n", &format!("[auth]\n{line}\n"), 1)).expect("writing a node config");
    }

    /// `stoa ARGS --config <node id's config>` must succeed (with `STOA_PASSWORD` = `password`).
    async fn stoa(&self, id: &str, args: &[&str], password: &str) {
        let config = self.members[self.index(id)].config.display().to_string();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
            .args(args)
            .args(["--config", &config])
            .env_remove("STOA_CONFIG")
            .env("STOA_PASSWORD", password)
            .env("STOA_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("running the stoa binary");
        assert!(out.status.success(), "stoa {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}

/// The node that served a login of `login` that arrived at node `at` (the client follows
/// redirects).
async fn served_by(cluster: &Cluster, at: &str, login: Login) -> String {
    let (client, welcome) = Client::connect(&cluster.url(at), login).await.unwrap_or_else(|e| panic!("login at {at}: {e}"));
    client.close().await;
    welcome.node
}

/// Users' home nodes (docs/clusters.md) in a pair g1 (1a+1b, PostgreSQL) and a single node g2
/// (2a, SQLite): a user homed on 1a who logs in on 2a or on 1b is redirected to 1a (v1
/// `welcome` with `redirect`, then the server closes) and served there; the admin verb moves the
/// home and the next login follows; guests are served where they land; after kill -9 of 1a the
/// same logins are served by 1b. With `auth.logins_per_second = 5` on 2a, 30 logins at once:
/// some are told `rate_limited` with `retry_after_ms`, all get in through the client's retry,
/// and the storm takes the time the rate says.
pub async fn users_log_in_on_their_home_node(db: &TestDb) {
    let groups = [("g1", true, Backend::Postgres), ("g2", false, Backend::Sqlite)];
    let layout = [("1a", 0), ("1b", 0), ("2a", 1)];
    let mut cluster = Cluster::configure(db, &groups, &layout, &[]).await;
    cluster.auth_setting("2a", "logins_per_second = 5");
    let c2s_2a = cluster.xmpp("2a").port();
    cluster.start_all().await;
    let pw = "ann's password";
    cluster.stoa("1b", &["user", "add", "ann", "--home", "1a"], pw).await;
    cluster.stoa("1b", &["user", "add", "bob"], pw).await;
    let ann = || Login::password("ann", pw);

    // The redirect as it is on the wire: a welcome naming 1a's client URL, then a close.
    let (mut ws, _) = tokio_tungstenite::connect_async(cluster.url("2a")).await.expect("a socket to 2a");
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(r#"{"op":"hello","v":1,"user":"ann","password":"wrong","id":"h"}"#)).await.expect("hello");
    let frame = tokio::time::timeout(DEADLINE, ws.next()).await.expect("an answer").expect("a frame").expect("a frame");
    let welcome: Value = serde_json::from_str(frame.to_text().expect("text")).unwrap_or_else(|e| panic!("{e}: {frame:?}"));
    assert_eq!((welcome["op"].as_str(), welcome["redirect"].as_str(), welcome["node"].as_str()), (Some("welcome"), Some(cluster.url("1a").as_str()), Some("1a")), "{welcome}");
    assert_eq!(welcome["session"], "", "a redirect logs no one in: {welcome}");
    let next = tokio::time::timeout(DEADLINE, ws.next()).await.expect("the close");
    assert!(matches!(next, Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None | Some(Err(_))), "{next:?}");

    for at in ["2a", "1b", "1a"] {
        assert_eq!(served_by(&cluster, at, ann()).await, "1a", "ann's login at {at}");
    }
    // Over XMPP: SASL PLAIN as ann at 2a gets `see-other-host` naming 1a's XMPP address (the
    // topology's `xmpp`), and the stream ends.
    {
        use base64::Engine as _;
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", c2s_2a)).await.expect("connecting to 2a's c2s");
        s.write_all(b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>").await.unwrap();
        super::xmpp::read_until(&mut s, "</stream:features>").await;
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0ann\0{pw}"));
        s.write_all(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>").as_bytes()).await.unwrap();
        let end = super::xmpp::read_until(&mut s, "</stream:stream>").await;
        let home = cluster.xmpp("1a");
        assert!(end.contains(&format!("<see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>{home}</see-other-host>")), "{end}");
    }
    // bob had no home: his first login (at 2a, another group) gives him the node of g1 with the
    // fewest users (1b: ann is on 1a), and every later login goes there.
    assert_eq!(served_by(&cluster, "2a", Login::password("bob", pw)).await, "1b", "bob's first login");
    assert_eq!(served_by(&cluster, "1a", Login::password("bob", pw)).await, "1b", "bob's next login");
    // A wrong password is judged by the home node.
    let wrong = Client::connect(&cluster.url("2a"), Login::password("ann", "not the password")).await;
    assert!(wrong.as_ref().is_err_and(|e| e.to_string().contains("unauthorized")), "{:?}", wrong.map(|w| w.1));
    // Guests are served where they land.
    for at in ["2a", "1b"] {
        assert_eq!(served_by(&cluster, at, Login::guest("visitor")).await, at, "a guest at {at}");
    }

    // The admin verb moves the home; the next login follows it, and back.
    cluster.stoa("1a", &["user", "home", "ann", "1b"], pw).await;
    assert_eq!(served_by(&cluster, "2a", ann()).await, "1b", "ann moved to 1b");
    assert_eq!(served_by(&cluster, "1a", ann()).await, "1b", "ann moved to 1b");
    let moved = cluster.call("1b", "POST", "/api/users/ann/home/1a").await;
    assert_eq!(moved.status, 200, "the admin API moves ann back: {}", moved.body);
    assert_eq!(cluster.call("2a", "POST", "/api/users/ann/home/1a").await.status, 400, "2a's group has no node 1a");
    assert_eq!(served_by(&cluster, "2a", ann()).await, "1a", "ann back on 1a");

    // 1a dies: its peer serves its users, wherever they log in.
    cluster.kill("1a");
    cluster.await_state("1b", "1b", "running_in_backup_mode").await;
    let started = Instant::now();
    loop {
        // 2a's view of 1b's services follows 1b's heartbeats; until then 2a refuses with
        // `unavailable` (the home's group serves nothing) or names 1b.
        match Client::connect(&cluster.url("2a"), ann()).await {
            Ok((client, welcome)) => {
                client.close().await;
                assert_eq!(welcome.node, "1b", "ann's login at 2a after 1a died");
                break;
            }
            Err(e) if started.elapsed() < DEADLINE && e.to_string().contains("unavailable") => {
                tokio::time::sleep(Duration::from_millis(100)).await; // 2a's view of g1 catching up
            }
            Err(e) => panic!("ann's login at 2a after 1a died: {e}"),
        }
    }
    assert_eq!(served_by(&cluster, "1b", ann()).await, "1b", "ann's login at 1b after 1a died");

    // The re-login storm on 2a (5 logins/s): 30 at once.
    let admin_2a = cluster.admin("2a").parse().expect("admin address");
    let refused_before = counter(admin_2a, "stoa_logins_refused_total").await;
    let storm = Instant::now();
    let url_2a = cluster.url("2a");
    let logins: Vec<_> = (0..30)
        .map(|k| {
            let url = url_2a.clone();
            tokio::spawn(async move { Client::connect(&url, Login::guest(format!("storm{k}"))).await })
        })
        .collect();
    for login in logins {
        let (client, welcome) = login.await.expect("a login task").expect("every login gets in through the client's retry");
        assert_eq!(welcome.node, "2a");
        client.close().await;
    }
    let took = storm.elapsed();
    let refused = counter(admin_2a, "stoa_logins_refused_total").await - refused_before;
    eprintln!("30 logins at once at 5/s on 2a: all in after {} ms, {refused} refusals (rate_limited) on the way", took.as_millis());
    assert!(refused >= 25.0, "25 logins over the first second's budget are refused at least once: {refused}");
    assert!(took >= Duration::from_millis(4000) && took < Duration::from_secs(15), "30 logins at 5/s with 5 at once take about 5 s: {took:?}");
}
