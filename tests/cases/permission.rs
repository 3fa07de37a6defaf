//! Who may do what in a room.

use crate::harness::*;
use serde_json::{Value, json};

fn listed(rooms: &Value) -> Vec<String> {
    assert_eq!(rooms["op"], "rooms", "{rooms}");
    rooms["rooms"].as_array().expect("rooms array").iter().map(|r| r["room"].as_str().expect("room").to_owned()).collect()
}

/// Membership, bans, room passwords, owner/admin rights, nick clashes, unknown and destroyed
/// rooms, and `list` visibility are enforced with the documented error codes.
pub async fn room_permissions_are_enforced(db: &TestDb) {
    let node = TestNode::start(db.settings("n1")).await;
    let (club, open, secret, locked) = (room("club"), room("open"), room("secret"), room("locked"));
    let mut olga = node.client("olga").await; // owner of everything
    let mut mia = node.client("mia").await;
    let mia_user = mia.user.clone();
    let mut adam = node.client("adam").await;
    let mut gus = node.client("gus").await;
    let gus_user = gus.user.clone();

    olga.create(&club, json!({"public": false})).await;
    olga.create(&open, json!({})).await;
    olga.create(&secret, json!({"public": false})).await;
    olga.create(&locked, json!({"password": "s3cret"})).await;

    // Members-only: refused until affiliated as member.
    let a = mia.request(json!({"op": "join", "room": club, "nick": "mia"})).await;
    assert_error(&a, "forbidden", "non-member joins a members-only room");
    let a = mia.request(json!({"op": "history", "room": club})).await;
    assert_error(&a, "forbidden", "non-member reads a members-only room");
    let a = olga.request(json!({"op": "affiliate", "room": club, "user": mia.user, "affiliation": "member"})).await;
    assert_eq!(a["op"], "ok", "{a}");
    let joined = mia.join(&club, "mia").await;
    assert_eq!(joined["affiliation"], "member", "{joined}");

    // list: public rooms plus members-only rooms the user is affiliated with.
    let mia_list = listed(&mia.request(json!({"op": "list"})).await);
    assert!(mia_list.contains(&open) && mia_list.contains(&club) && mia_list.contains(&locked), "{mia_list:?}");
    assert!(!mia_list.contains(&secret), "mia may not see {secret}: {mia_list:?}");
    let gus_list = listed(&gus.request(json!({"op": "list"})).await);
    assert!(gus_list.contains(&open), "{gus_list:?}");
    assert!(!gus_list.contains(&club) && !gus_list.contains(&secret), "gus sees members-only rooms: {gus_list:?}");
    let olga_list = listed(&olga.request(json!({"op": "list"})).await);
    assert!(olga_list.contains(&secret), "the owner sees her members-only room: {olga_list:?}");

    // Room password: missing or wrong → forbidden; right → joined; the owner needs none.
    let a = mia.request(json!({"op": "join", "room": locked, "nick": "mia"})).await;
    assert_error(&a, "forbidden", "join without the room password");
    let a = mia.request(json!({"op": "join", "room": locked, "nick": "mia", "password": "guess"})).await;
    assert_error(&a, "forbidden", "join with a wrong room password");
    let a = mia.request(json!({"op": "join", "room": locked, "nick": "mia", "password": "s3cret"})).await;
    assert_eq!(a["op"], "joined", "{a}");
    olga.join(&locked, "olga").await;

    // Only owners configure and destroy.
    let a = mia.request(json!({"op": "configure", "room": club, "config": {"subject": "mine now"}})).await;
    assert_error(&a, "forbidden", "member configures");
    let a = mia.request(json!({"op": "destroy", "room": club})).await;
    assert_error(&a, "forbidden", "member destroys");
    let a = mia.request(json!({"op": "subject", "room": club, "subject": "mine now"})).await;
    assert_error(&a, "forbidden", "member sets the subject");
    let a = olga.request(json!({"op": "configure", "room": club, "config": {"subject": "club news"}})).await;
    assert_eq!(a["op"], "ok", "{a}");

    // Admins kick, members do not.
    let a = olga.request(json!({"op": "affiliate", "room": open, "user": adam.user, "affiliation": "admin"})).await;
    assert_eq!(a["op"], "ok", "{a}");
    let a = mia.request(json!({"op": "affiliate", "room": open, "user": gus.user, "affiliation": "member"})).await;
    assert_error(&a, "forbidden", "unaffiliated user sets an affiliation");
    adam.join(&open, "adam").await;
    mia.join(&open, "mia").await;
    let a = mia.request(json!({"op": "kick", "room": open, "nick": "adam"})).await;
    assert_error(&a, "forbidden", "plain occupant kicks an admin");
    let a = adam.request(json!({"op": "kick", "room": open, "nick": "mia", "reason": "test"})).await;
    assert_eq!(a["op"], "ok", "{a}");
    let kicked = mia.wait_for("mia's own kick", |f| f["op"] == "presence" && f["room"] == open && f["user"] == mia_user.as_str()).await;
    assert_eq!(kicked["status"], "kicked", "{kicked}");
    let a = mia.send(&open, "still here?", "k1").await;
    assert_error(&a, "forbidden", "a kicked occupant sends");

    // Sending without joining.
    let a = gus.send(&open, "hi", "g1").await;
    assert_error(&a, "forbidden", "send without joining");

    // Nick taken by another user; the same user may reuse it.
    gus.join(&open, "gus").await;
    let a = mia.request(json!({"op": "join", "room": open, "nick": "gus"})).await;
    assert_error(&a, "conflict", "nick taken by another user");

    // Outcasts: a present outcast is kicked, and cannot come back.
    let a = olga.request(json!({"op": "affiliate", "room": open, "user": gus.user, "affiliation": "outcast"})).await;
    assert_eq!(a["op"], "ok", "{a}");
    let banned = gus.wait_for("gus's ban", |f| f["op"] == "presence" && f["room"] == open && f["user"] == gus_user.as_str()).await;
    assert_eq!(banned["status"], "kicked", "{banned}");
    let seen = adam.wait_for("gus leaving, as others see it", |f| f["op"] == "presence" && f["user"] == gus_user.as_str() && f["status"] != "joined").await;
    assert_eq!(seen["status"], "kicked", "{seen}");
    let a = gus.request(json!({"op": "join", "room": open, "nick": "gus"})).await;
    assert_error(&a, "forbidden", "outcast joins");
    let gus_list = listed(&gus.request(json!({"op": "list"})).await);
    assert!(!gus_list.contains(&open), "an outcast does not see the room: {gus_list:?}");

    // Existing and unknown rooms.
    let a = mia.request(json!({"op": "create", "room": open})).await;
    assert_error(&a, "conflict", "create an existing room");
    let nowhere = room("nowhere");
    let a = mia.request(json!({"op": "join", "room": nowhere, "nick": "mia"})).await;
    assert_error(&a, "not_found", "join an unknown room");
    let a = mia.request(json!({"op": "history", "room": nowhere})).await;
    assert_error(&a, "not_found", "history of an unknown room");

    // Destroy: occupants are told, the room is gone.
    let a = adam.request(json!({"op": "destroy", "room": open})).await;
    assert_error(&a, "forbidden", "admin destroys");
    olga.join(&open, "olga").await;
    let a = olga.request(json!({"op": "destroy", "room": open, "reason": "done"})).await;
    assert_eq!(a["op"], "ok", "{a}");
    let gone = adam.wait_for("the destroyed event", |f| f["op"] == "destroyed").await;
    assert_eq!(gone["room"], open.as_str(), "{gone}");
    let a = adam.request(json!({"op": "join", "room": open, "nick": "adam"})).await;
    assert_error(&a, "not_found", "join a destroyed room");
    let a = adam.send(&open, "hello?", "d1").await;
    assert_error(&a, "forbidden", "send to a destroyed room");
    assert!(!listed(&olga.request(json!({"op": "list"})).await).contains(&open));

    // The rooms that were not destroyed still work.
    mia.send_acked(&club, "club still works", "m1").await;
}
