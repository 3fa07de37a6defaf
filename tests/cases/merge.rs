//! `stoa db merge` (issue 15, docs/merge.md): the seed's scenario with real nodes on every
//! backend pair, each conflict rule, refusal while a node runs, a dry run that writes nothing,
//! and kill -9 in the middle of a merge, resumed, giving the same store as an uninterrupted one.

use crate::harness::{Backend, DEADLINE, NodeProcess, TestDb, http_get, room};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};
use std::process::Stdio;
use stoa::ids::{Epoch, NodeId, RoomAddr};
use stoa::store::entity::{affiliation, message, room as room_entity, user};
use stoa::store::{AppendRequest, Fence, NewMessage, Store};
use tokio::io::{AsyncBufReadExt, BufReader};

/// `stoa ARGS`: (success, stdout, stderr).
async fn stoa(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), out).await.expect("stoa finishes in 120 s").expect("running stoa");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `stoa db merge --source … --target … EXTRA`.
async fn merge(sources: &[&TestDb], target: &TestDb, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["db", "merge"];
    for s in sources {
        args.extend(["--source", s.url.as_str()]);
    }
    args.extend(["--target", target.url.as_str()]);
    args.extend(extra);
    stoa(&args).await
}

/// A store handle that the test closes before the next `stoa db merge` (an open one would be
/// "another session").
async fn with_store<T>(db: &TestDb, f: impl AsyncFnOnce(&Store) -> T) -> T {
    let store = db.store().await;
    let out = f(&store).await;
    store.close().await;
    out
}

/// Fill a source through the store: rooms with `n` messages each (sender `ann` or the room's
/// owner, created at `t0 + i·step`), the given affiliations and users.
struct Fill<'a> {
    node: &'a str,
    rooms: &'a [(&'a str, usize, &'a str)],
    affiliations: &'a [(&'a str, &'a str, stoa::protocol::Affiliation)],
    users: &'a [(&'a str, &'a str, i64)],
    t0: i64,
    step: i64,
    /// Extra messages: (room, sender, cid, at).
    extra: &'a [(&'a str, &'a str, &'a str, i64)],
}

async fn fill(db: &TestDb, f: Fill<'_>) {
    with_store(db, async |store: &Store| {
        store.migrate().await.expect("migrating a source");
        let node = NodeId(f.node.into());
        for (name, n, owner) in f.rooms {
            let addr = RoomAddr(room(name));
            let row = store.create_room(&addr, &Default::default(), owner, &node).await.expect("creating a room");
            let fence = Fence { room: row.id, host: node.clone(), epoch: Epoch(row.epoch.0) };
            let mut messages: Vec<NewMessage> = (0..*n)
                .map(|i| NewMessage {
                    id: format!("{}-{name}-{i}", f.node),
                    sender: owner.to_string(),
                    nick: owner.to_string(),
                    body: format!("{} says {i} in {name}", f.node),
                    client_msg_id: format!("{}-{i}", f.node),
                    created_at: f.t0 + i as i64 * f.step,
                })
                .collect();
            for (r, sender, cid, at) in f.extra.iter().filter(|e| e.0 == *name) {
                let _ = r;
                messages.push(NewMessage { id: format!("{}-{cid}", f.node), sender: sender.to_string(), nick: sender.to_string(), body: format!("{sender} {cid}"), client_msg_id: cid.to_string(), created_at: *at });
            }
            messages.sort_by_key(|m| m.created_at);
            for part in messages.chunks(200) {
                let last = store.load_room(&addr).await.unwrap().unwrap().last_seq;
                let r = store.append_batch([AppendRequest { fence: fence.clone(), base_seq: last, messages: part.to_vec(), maybe_resent: false }]).await.expect("appending");
                r[0].as_ref().expect("appended");
            }
            for (room_name, who, aff) in f.affiliations.iter().filter(|a| a.0 == *name) {
                let _ = room_name;
                store.set_affiliation(&fence, who, *aff).await.expect("affiliating");
            }
        }
        for (name, hash, at) in f.users {
            user::Entity::insert(user::ActiveModel {
                name: sea_orm::Set(name.to_string()),
                password_hash: sea_orm::Set(hash.to_string()),
                created_at: sea_orm::Set(*at),
                ..Default::default()
            })
            .exec(store.connection())
            .await
            .expect("adding a user");
        }
    })
    .await
}

/// Everything a merge writes, read back in a fixed order (room ids left out: each target
/// assigns its own).
async fn dump(db: &TestDb) -> Value {
    with_store(db, async |store: &Store| {
        let c = store.connection();
        let rooms = room_entity::Entity::find().order_by_asc(room_entity::Column::Address).all(c).await.expect("rooms");
        let mut out = Vec::new();
        for r in rooms {
            let messages: Vec<Value> = message::Entity::find()
                .filter(message::Column::RoomId.eq(r.id))
                .order_by_asc(message::Column::Seq)
                .all(c)
                .await
                .expect("messages")
                .into_iter()
                .map(|m| json!([m.seq, m.id, m.sender, m.nick, m.body, m.client_msg_id, m.epoch, m.created_at]))
                .collect();
            let affs: Vec<Value> = affiliation::Entity::find()
                .filter(affiliation::Column::RoomId.eq(r.id))
                .order_by_asc(affiliation::Column::UserName)
                .all(c)
                .await
                .expect("affiliations")
                .into_iter()
                .map(|a| json!([a.user_name, a.affiliation]))
                .collect();
            out.push(json!({"room": [r.address, r.config, r.public, r.home_node, r.host_node, r.epoch, r.last_seq, r.last_ts, r.created_at], "messages": messages, "affiliations": affs}));
        }
        let users: Vec<Value> = user::Entity::find().order_by_asc(user::Column::Name).all(c).await.expect("users").into_iter().map(|u| json!([u.name, u.password_hash, u.created_at])).collect();
        json!({"rooms": out, "users": users})
    })
    .await
}

fn parse(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The seed's scenario on one backend pair: two nodes, each with its own store, fill rooms
/// (one room on both); a merge is refused while they run; they stop; a dry run writes nothing;
/// the merge runs and verifies; the finished job run again changes nothing; the jobs are listed
/// (CLI and admin API); a node on the merged store serves every message, in order, per room.
async fn seed_scenario(target: &TestDb, a: Backend, b: Backend) {
    let sources = [TestDb::new(a, "merge_seed_a").await, TestDb::new(b, "merge_seed_b").await];
    let mut nodes = vec![
        NodeProcess::start(&sources[0].write_config("1a", ""), "1a").await,
        NodeProcess::start(&sources[1].write_config("1b", ""), "1b").await,
    ];
    let (shared, ops, dev) = (room("shared"), room("ops"), room("dev"));
    let mut ann = nodes[0].client("ann").await;
    let mut bob = nodes[1].client("bob").await;
    for r in [&ops, &shared] {
        ann.create(r, json!({})).await;
        ann.join(r, "ann").await;
    }
    for r in [&dev, &shared] {
        bob.create(r, json!({})).await;
        bob.join(r, "bob").await;
    }
    for i in 0..20 {
        ann.send_acked(&shared, &format!("a{i}"), &format!("ca{i}")).await;
        bob.send_acked(&shared, &format!("b{i}"), &format!("cb{i}")).await;
    }
    for i in 0..30 {
        ann.send_acked(&ops, &format!("ops {i}"), &format!("o{i}")).await;
        bob.send_acked(&dev, &format!("dev {i}"), &format!("d{i}")).await;
    }
    drop((ann, bob));

    let src: Vec<&TestDb> = sources.iter().collect();
    let (ok, out, err) = merge(&src, target, &["--migrate-target", "--yes"]).await;
    assert!(!ok, "a merge while the nodes run is refused: {out}{err}");
    assert!(err.contains("is in use") && err.contains("source 1") && err.contains("Stop the rooms service"), "{err}");
    assert!(!with_store(target, async |s: &Store| s.has_table("rooms").await.unwrap()).await, "a refused merge does not even migrate the target");

    for n in &mut nodes {
        n.stop().await;
    }
    // What the sources hold, ordered as the merge orders them: by time, then source, then seq.
    let mut expected: Vec<(i64, usize, u64, String)> = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        for m in s.stored_messages(&shared).await {
            expected.push((m.created_at, i, m.seq, m.body));
        }
    }
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|e| e.3).collect();

    let (ok, out, err) = merge(&src, target, &["--validate"]).await;
    assert!(!ok && err.contains("is not at this binary's schema") && err.contains("--migrate-target"), "{out}{err}");
    let (ok, out, err) = merge(&src, target, &["--validate", "--migrate-target"]).await;
    assert!(ok && out.contains("validation passed"), "{out}{err}");

    let (ok, out, err) = merge(&src, target, &["--migrate-target", "--dry-run"]).await;
    assert!(ok, "dry run: {out}{err}");
    assert!(out.contains(&format!("room {shared} (sources 1 and 2), rule union")), "{out}");
    assert!(out.contains("source 1: 2 rooms, 50 messages") && out.contains("source 2: 2 rooms, 50 messages"), "{out}");
    assert!(out.contains("target gets: 3 rooms (1 from several sources)"), "{out}");
    assert!(!with_store(target, async |s: &Store| s.has_table("rooms").await.unwrap()).await, "a dry run writes nothing");

    let (ok, out, err) = merge(&src, target, &["--migrate-target", "--yes", "--format", "json"]).await;
    assert!(ok, "merge: {out}{err}");
    let job = parse(&out);
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["verification"]["ok"], true, "{job}");
    assert_eq!(job["counts"]["messages"], 100, "{job}");
    assert_eq!(job["counts"]["rooms"], 3, "{job}");
    let id = job["id"].as_str().expect("job id").to_owned();

    let before = dump(target).await;
    let (ok, out, err) = merge(&src, target, &["--job", &id, "--yes"]).await;
    assert!(ok && out.contains("had finished: nothing to do"), "{out}{err}");
    assert_eq!(dump(target).await, before, "running a finished job again changes nothing");

    let (ok, out, err) = stoa(&["db", "jobs", "--store", &target.url, "--format", "json"]).await;
    assert!(ok, "{out}{err}");
    let jobs = parse(&out);
    assert_eq!(jobs.as_array().map(|j| j.len()), Some(1), "{jobs}");
    assert_eq!(jobs[0]["id"], id.as_str());
    let (ok, out, err) = stoa(&["db", "job", &id, "--store", &target.url]).await;
    assert!(ok && out.contains("every room matches its sources") && out.contains("conflicts: 1"), "{out}{err}");

    let epoch = with_store(target, async |s: &Store| s.load_room(&RoomAddr(shared.clone())).await.unwrap().unwrap().epoch.0).await;
    assert_eq!(epoch, 2, "the merged room's epoch is above both sources' (1)");

    // The pair's nodes on the merged store, one after the other (each serves the rooms it is
    // the home of; as an HA pair they would also reach each other's over the link).
    let mut node = NodeProcess::start(&target.write_config("1a", ""), "1a-merged").await;
    let mut carol = node.client("carol").await;
    carol.join(&shared, "carol").await;
    let history = carol.history_all(&shared).await;
    let bodies: Vec<&str> = history.iter().map(|m| m["body"].as_str().unwrap_or_default()).collect();
    assert_eq!(bodies, expected.iter().map(String::as_str).collect::<Vec<_>>(), "every message, in the merge's order");
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    let a: Vec<&str> = bodies.iter().copied().filter(|b| b.starts_with('a')).collect();
    assert_eq!(a, (0..20).map(|i| format!("a{i}")).collect::<Vec<_>>(), "each node's own order is kept");
    let b: Vec<&str> = bodies.iter().copied().filter(|b| b.starts_with('b')).collect();
    assert_eq!(b, (0..20).map(|i| format!("b{i}")).collect::<Vec<_>>(), "each node's own order is kept");
    carol.join(&ops, "carol").await;
    let got: Vec<String> = carol.history_all(&ops).await.iter().map(|m| m["body"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(got, (0..30).map(|i| format!("ops {i}")).collect::<Vec<_>>());
    assert_eq!(carol.send_acked(&shared, "after the merge", "c-after").await, 41);
    let (status, body) = http_get(node.admin_addr, "/api/db/jobs", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&id) && body.contains("\"state\":\"done\""), "{body}");
    let (status, body) = http_get(node.admin_addr, &format!("/api/db/jobs/{id}"), None).await;
    assert!(status == 200 && body.contains("\"verification\""), "{body}");
    assert_eq!(http_get(node.admin_addr, "/api/db/jobs/nope", None).await.0, 404);
    drop(carol);
    node.stop().await;

    let node = NodeProcess::start(&target.write_config("1b", ""), "1b-merged").await;
    let mut dan = node.client("dan").await;
    dan.join(&dev, "dan").await;
    let got: Vec<String> = dan.history_all(&dev).await.iter().map(|m| m["body"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(got, (0..30).map(|i| format!("dev {i}")).collect::<Vec<_>>());
}

/// SQLite + SQLite → PostgreSQL (the target is the case's database).
pub async fn sqlite_pair_merges_into_postgres(db: &TestDb) {
    seed_scenario(db, Backend::Sqlite, Backend::Sqlite).await;
}

/// PostgreSQL + PostgreSQL → PostgreSQL.
pub async fn postgres_pair_merges_into_postgres(db: &TestDb) {
    seed_scenario(db, Backend::Postgres, Backend::Postgres).await;
}

/// MariaDB + MariaDB → MariaDB.
pub async fn mariadb_pair_merges_into_mariadb(db: &TestDb) {
    seed_scenario(db, Backend::MySql, Backend::MySql).await;
}

/// PostgreSQL + MariaDB → PostgreSQL.
pub async fn postgres_and_mariadb_merge_into_postgres(db: &TestDb) {
    seed_scenario(db, Backend::Postgres, Backend::MySql).await;
}

/// Two SQLite sources that conflict in every way: the same room with one duplicate message
/// (ann's `dup`), bob a member in one and admin in the other, user `ann` with two passwords
/// and `dup` with the same one.
async fn conflicting_sources() -> [TestDb; 2] {
    use stoa::protocol::Affiliation::{Admin, Member};
    let sources = [TestDb::new(Backend::Sqlite, "merge_conflict_a").await, TestDb::new(Backend::Sqlite, "merge_conflict_b").await];
    fill(&sources[0], Fill {
        node: "1a",
        rooms: &[("shared", 5, "ann"), ("one", 3, "ann")],
        affiliations: &[("shared", "bob", Member)],
        users: &[("ann", "hash-1", 100), ("dup", "same", 100)],
        t0: 1000,
        step: 10,
        extra: &[("shared", "ann", "dup", 1001)],
    })
    .await;
    fill(&sources[1], Fill {
        node: "1b",
        rooms: &[("shared", 5, "carl"), ("two", 3, "carl")],
        affiliations: &[("shared", "bob", Admin)],
        users: &[("ann", "hash-2", 200), ("dup", "same", 50)],
        t0: 1005,
        step: 10,
        extra: &[("shared", "ann", "dup", 1002)],
    })
    .await;
    sources
}

/// Each conflict rule: refusals write no data (and are recorded as refused jobs); users=newer
/// keeps the newer account; the same hash is one account; the stronger affiliation wins; a
/// duplicate message is kept once; rooms=rename keeps both rooms whole.
pub async fn each_conflict_rule_applies(db: &TestDb) {
    let sources = conflicting_sources().await;
    let src: Vec<&TestDb> = sources.iter().collect();
    for (rules, what) in [
        (vec![], "conflict: user ann (sources 1 and 2), rule refuse"),
        (vec!["users=newer", "rooms=refuse"], &format!("conflict: room {} (sources 1 and 2), rule refuse", room("shared"))),
        (vec!["users=newer", "affiliations=refuse"], &format!("conflict: affiliation {} bob", room("shared"))),
        (vec!["users=newer", "messages=refuse"], &format!("conflict: message {} ann dup", room("shared"))),
    ] {
        let mut args = vec!["--migrate-target", "--yes"];
        for r in &rules {
            args.extend(["--on-conflict", r]);
        }
        let (ok, out, err) = merge(&src, db, &args).await;
        assert!(!ok, "{rules:?} refuses: {out}{err}");
        assert!(err.contains(what), "{rules:?}: expected `{what}` in:\n{err}");
        let rooms = with_store(db, async |s: &Store| s.count_rooms().await.unwrap()).await;
        assert_eq!(rooms, 0, "{rules:?}: a refusal writes no data");
    }
    let jobs = with_store(db, async |s: &Store| s.merge_jobs().await.unwrap()).await;
    assert!(jobs.len() == 4 && jobs.iter().all(|j| j.state == "refused" && j.error.is_some()), "{jobs:?}");

    let (ok, out, err) = merge(&src, db, &["--yes", "--on-conflict", "users=newer", "--format", "json"]).await;
    assert!(ok, "{out}{err}");
    let job = parse(&out);
    assert_eq!(job["counts"]["duplicates_dropped"], 1, "{job}");
    let d = dump(db).await;
    let users = d["users"].as_array().unwrap();
    assert_eq!(users.len(), 2, "{d}");
    assert_eq!(users[0], json!(["ann", "hash-2", 200]), "the newer account");
    assert_eq!(users[1][0], "dup", "the same hash: one account");
    let shared = d["rooms"].as_array().unwrap().iter().find(|r| r["room"][0] == room("shared")).unwrap().clone();
    assert_eq!(shared["affiliations"], json!([["ann", "owner"], ["bob", "admin"], ["carl", "owner"]]), "the stronger wins");
    let messages = shared["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 11, "5 + 5 + one duplicate kept once: {shared}");
    assert_eq!(messages.iter().filter(|m| m[5] == "dup").count(), 1);
    let times: Vec<i64> = messages.iter().map(|m| m[7].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "created_at never decreases: {times:?}");
    assert_eq!(messages.iter().map(|m| m[0].as_i64().unwrap()).collect::<Vec<_>>(), (1..=11).collect::<Vec<_>>());

    let renamed = TestDb::new(db.backend, "merge_conflict_rename").await;
    let (ok, out, err) = merge(&src, &renamed, &["--migrate-target", "--yes", "--on-conflict", "users=newer", "--on-conflict", "rooms=rename"]).await;
    assert!(ok, "{out}{err}");
    let d = dump(&renamed).await;
    let rooms: Vec<(String, usize)> = d["rooms"].as_array().unwrap().iter().map(|r| (r["room"][0].as_str().unwrap().to_owned(), r["messages"].as_array().unwrap().len())).collect();
    assert_eq!(rooms, vec![(room("one"), 3), (room("shared-2"), 6), (room("shared"), 6), (room("two"), 3)]);
}

/// A merge killed with kill -9 after some chunks, resumed with its job id, gives exactly the
/// store an uninterrupted merge gives; running the finished job again changes nothing.
pub async fn kill9_mid_merge_then_resume_gives_the_same_store(db: &TestDb) {
    let sources = [TestDb::new(Backend::Sqlite, "merge_kill_a").await, TestDb::new(Backend::Sqlite, "merge_kill_b").await];
    fill(&sources[0], Fill { node: "1a", rooms: &[("r1", 300, "ann"), ("r2", 250, "ann"), ("both", 200, "ann")], affiliations: &[], users: &[("ann", "h", 1)], t0: 10_000, step: 3, extra: &[] }).await;
    fill(&sources[1], Fill { node: "1b", rooms: &[("r3", 300, "bob"), ("both", 200, "bob")], affiliations: &[], users: &[("bob", "h", 1)], t0: 10_001, step: 3, extra: &[] }).await;
    let src: Vec<&TestDb> = sources.iter().collect();
    let reference = TestDb::new(db.backend, "merge_kill_reference").await;
    let (ok, out, err) = merge(&src, &reference, &["--migrate-target", "--yes", "--chunk-rows", "40"]).await;
    assert!(ok, "{out}{err}");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
        .args(["db", "merge", "--source", &sources[0].url, "--source", &sources[1].url, "--target", &db.url])
        .args(["--migrate-target", "--yes", "--chunk-rows", "40", "--chunk-pause-ms", "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning stoa db merge");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let id = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("merge job ") {
                return rest.split(' ').next().unwrap_or_default().to_owned();
            }
        }
        panic!("stoa db merge ended before it started a job");
    })
    .await
    .expect("the job starts");
    // Keep reading what the merge says, so that it never blocks on a full pipe, and to show it
    // if the merge stalls.
    let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let said = said.clone();
        let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
        tokio::spawn(async move {
            let stdout = async {
                while let Ok(Some(line)) = out.next_line().await {
                    said.lock().unwrap().push(format!("stdout: {line}"));
                }
            };
            let stderr = async {
                while let Ok(Some(line)) = lines.next_line().await {
                    said.lock().unwrap().push(line);
                }
            };
            tokio::join!(stdout, stderr);
        })
    };
    let store = db.store().await;
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let done = store.merge_chunks_done(&id).await.expect("reading chunks");
        if done.keys().filter(|k| k.contains("/m/")).count() >= 6 {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let job = store.merge_job(&id).await.map(|j| j.map(|j| (j.state, j.error, j.counts)));
            let exit = child.try_wait();
            panic!("the merge recorded no chunks in time ({done:?}; job {job:?}; process {exit:?}); it said: {:?}", said.lock().unwrap());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.start_kill().expect("kill -9");
    child.wait().await.expect("reaping the merge");
    reader.abort();
    let job = store.merge_job(&id).await.unwrap().expect("the job is recorded");
    assert_eq!(job.state, "running", "killed in the middle");
    store.close().await;
    assert_ne!(dump(db).await, dump(&reference).await, "the killed merge had not finished");

    // The killed process's sessions go away on their own; until then the merge says the
    // target is in use.
    let deadline = std::time::Instant::now() + DEADLINE;
    let (out, err) = loop {
        let (ok, out, err) = merge(&src, db, &["--job", &id, "--yes", "--format", "json"]).await;
        if ok {
            break (out, err);
        }
        assert!(err.contains("other session") && std::time::Instant::now() < deadline, "resume: {out}{err}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let resumed = parse(&out);
    assert_eq!(resumed["state"], "done", "{resumed} {err}");
    assert!(resumed["counts"]["chunks_already_done"].as_u64().unwrap() >= 6, "{resumed}");
    assert_eq!(dump(db).await, dump(&reference).await, "resumed = uninterrupted");
    let (ok, out, err) = merge(&src, db, &["--job", &id, "--yes"]).await;
    assert!(ok && out.contains("nothing to do"), "{out}{err}");
    assert_eq!(dump(db).await, dump(&reference).await);
}

/// A store whose HA node runs is refused for its lease and its presence lock (beside its
/// sessions), and nothing is written; once the node has stopped (lease released, lock and
/// sessions gone) the same merge runs.
pub async fn a_store_with_a_running_ha_node_is_refused(db: &TestDb) {
    use crate::cases::ha::pair_settings;
    use crate::harness::{TestNode, free_port};
    let source = TestDb::new(db.backend, "merge_ha_source").await;
    let node = TestNode::start(pair_settings(&source, "1a", (free_port(), free_port()))).await;
    let (ok, out, err) = merge(&[&source], db, &["--migrate-target", "--yes"]).await;
    assert!(!ok, "{out}{err}");
    assert!(err.contains("node 1a holds a live lease") && err.contains("presence lock") && err.contains("other session"), "{err}");
    assert!(!with_store(db, async |s: &Store| s.has_table("rooms").await.unwrap()).await, "nothing written");
    node.stop().await;
    let (ok, out, err) = merge(&[&source], db, &["--migrate-target", "--yes"]).await;
    assert!(ok, "after the node stopped: {out}{err}");
}

/// A target whose user may read but not write is refused at validation, naming the missing
/// privilege, and nothing is written (PostgreSQL: a role of the test's own).
pub async fn a_target_user_without_write_privileges_is_refused(db: &TestDb) {
    use sqlx::Connection as _;
    let source = TestDb::new(Backend::Sqlite, "merge_priv_source").await;
    fill(&source, Fill { node: "1a", rooms: &[("r", 3, "ann")], affiliations: &[], users: &[], t0: 1, step: 1, extra: &[] }).await;
    with_store(db, async |s: &Store| s.migrate().await.expect("migrating the target")).await;
    let role = format!("stoa_ro_{:08x}", rand::random::<u32>());
    let mut admin = sqlx::PgConnection::connect(&db.url).await.expect("connecting to the target");
    for sql in [format!("CREATE ROLE {role} LOGIN"), format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.expect("setting up the read-only role");
    }
    admin.close().await.ok();
    let mut url = url::Url::parse(&db.url).expect("target URL");
    url.set_username(&role).expect("a user name");
    let (ok, out, err) = stoa(&["db", "merge", "--source", &source.url, "--target", url.as_str(), "--yes"]).await;
    let mut admin = sqlx::PgConnection::connect(&db.url).await.expect("connecting to the target");
    for sql in [format!("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"), format!("DROP ROLE {role}")] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.expect("dropping the read-only role");
    }
    admin.close().await.ok();
    assert!(!ok, "{out}{err}");
    assert!(err.contains("the user lacks a privilege the merge needs") && err.contains("permission denied"), "{err}");
    assert_eq!(with_store(db, async |s: &Store| s.count_rooms().await.unwrap()).await, 0);
}

/// The seed's last step with the pair running: each node of a pair had its own store (1a's
/// rooms in one, 1b's in the other, and one room both nodes wrote to); the stores are merged
/// into the pair's shared store, and the pair starts on it as an HA pair (1a first, which holds
/// 1b's rooms until 1b is up and then hands them over by itself): a client on 1b reads
/// 1a's rooms over the node link in the merge's order, writes to them, and after a kill -9 of
/// 1a finds every message on 1b, which took the rooms over (epochs above the sources').
pub async fn merged_stores_serve_an_ha_pair(db: &TestDb) {
    use stoa::client::{Client, Login, new_cid};
    let sources = [TestDb::new(Backend::Postgres, "merge_pair_a").await, TestDb::new(Backend::Postgres, "merge_pair_b").await];
    let (shared, own_a, own_b) = ("shared@conference-1a.localhost", "own@conference-1a.localhost", "own@conference-1b.localhost");
    // Source i: times 1000 + 2k + i, so the merged `shared` alternates a0 b0 a1 b1 ...
    for (i, src) in sources.iter().enumerate() {
        let store = src.store().await;
        store.migrate().await.expect("source schema");
        let mut rooms = vec![(shared, NodeId("1a".into()))];
        rooms.push(if i == 0 { (own_a, NodeId("1a".into())) } else { (own_b, NodeId("1b".into())) });
        for (addr, home) in rooms {
            let row = store.create_room(&RoomAddr(addr.into()), &Default::default(), "ann", &home).await.expect("source room");
            let fence = Fence { room: row.id, host: home, epoch: row.epoch };
            let messages = (0..10)
                .map(|k| {
                    let at = 1_800_000_001_000 + 2 * k + i as i64;
                    let who = ["a", "b"][i];
                    NewMessage { id: stoa::ids::message_id(at), created_at: at, ..NewMessage::unstamped(format!("user-{who}"), who.into(), format!("{who}{k}"), format!("c{who}{k}")) }
                })
                .collect();
            let answer = store.append_batch([AppendRequest { fence, base_seq: 0, messages, maybe_resent: false }]).await.expect("source append");
            assert!(answer[0].is_ok(), "{answer:?}");
        }
        store.close().await;
    }
    let src: Vec<&TestDb> = sources.iter().collect();
    let (ok, out, err) = merge(&src, db, &["--migrate-target", "--yes"]).await;
    assert!(ok, "merge: {out}{err}");

    // 1a comes up first and, its peer never having run, serves 1b's rooms too (a cold start);
    // 1b comes up and gets them back by itself: both normal.
    let mut pair = crate::cases::failover::Pair::configure_with(db, None, None, "");
    pair.start(0).await;
    pair.start(1).await;
    for i in [0, 1] {
        pair.await_state(i, "normal", DEADLINE).await;
        let addr = pair.admin(i).parse().expect("admin address");
        crate::harness::await_admin(addr, None, "/api/topology", "the peer reachable", |t| t["peer"]["reachable"] == true).await;
    }
    let (reader, _) = Client::connect(&pair.url(1), Login::guest("reader")).await.expect("a client on 1b");
    let bodies = |page: stoa::client::HistoryPage| page.messages.into_iter().map(|m| m.body).collect::<Vec<_>>();
    let merged: Vec<String> = (0..10).flat_map(|k| [format!("a{k}"), format!("b{k}")]).collect();
    let page = reader.history(shared, None, None, Some(100)).await.expect("1a's room read on 1b over the link");
    assert_eq!(bodies(page), merged, "the merged room, in the merge's order");
    let page = reader.history(own_b, None, None, Some(100)).await.expect("1b's own room");
    assert_eq!(bodies(page), (0..10).map(|k| format!("b{k}")).collect::<Vec<_>>());
    reader.join(shared, "reader", None, None).await.expect("joining over the link");
    assert_eq!(reader.send(shared, "after the merge", new_cid()).await.expect("posting over the link").seq, 21);
    reader.close().await;

    pair.kill(0);
    pair.await_state(1, "running_in_backup_mode", DEADLINE).await;
    let (reader, _) = Client::connect(&pair.url(1), Login::guest("reader2")).await.expect("a client on 1b");
    reader.join(shared, "reader2", None, None).await.expect("joining the room 1b took over");
    let mut expected = merged.clone();
    expected.push("after the merge".into());
    assert_eq!(bodies(reader.history(shared, None, None, Some(100)).await.expect("history on 1b")), expected);
    assert_eq!(reader.send(shared, "after the takeover", new_cid()).await.expect("posting on 1b").seq, 22);
    reader.close().await;
    let epoch = with_store(db, async |s: &Store| s.load_room(&RoomAddr(shared.into())).await.unwrap().unwrap().epoch.0).await;
    assert!(epoch >= 3, "merged at 2 (above the sources' 1), then taken over: {epoch}");
}
