//! The pure half of a merge: which target room each source room becomes, which account each
//! user keeps, how two rooms' affiliations, plugin state and histories combine, and the
//! checksum of a log. No I/O: the same sources give the same plan, byte for byte, which is
//! what lets a killed job resume to the identical result (docs/merge.md).

use super::{Conflict, Rules, RoomRule, UserRule, AffiliationRule, MessageRule};
use crate::store::entity::{affiliation, message, room, user};
use crate::store::merge::SourceRoom;
use sha2::Digest as _;
use std::collections::{BTreeMap, BTreeSet};

/// One target room: its address and the source rooms that make it, in source order.
#[derive(Clone, Debug)]
pub struct PlannedRoom {
    pub address: String,
    /// (source index, the room row there).
    pub parts: Vec<(usize, room::Model)>,
}

/// What a merge will write, decided from the sources alone.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// By address.
    pub rooms: Vec<PlannedRoom>,
    /// By name: the accounts kept.
    pub users: Vec<user::Model>,
    pub conflicts: Vec<Conflict>,
}

/// The rooms and users of one source, as read.
#[derive(Clone, Debug)]
pub struct SourceInventory {
    pub rooms: Vec<room::Model>,
    pub users: Vec<user::Model>,
}

/// Decide the target rooms and accounts of `sources` (in the order given on the command line).
pub fn plan(sources: &[SourceInventory], rules: &Rules) -> Plan {
    let mut conflicts = Vec::new();
    let mut rooms: BTreeMap<String, PlannedRoom> = BTreeMap::new();
    let every_address: BTreeSet<&str> = sources.iter().flat_map(|s| s.rooms.iter().map(|r| r.address.as_str())).collect();
    for (i, source) in sources.iter().enumerate() {
        for row in &source.rooms {
            let Some(existing) = rooms.get_mut(&row.address) else {
                rooms.insert(row.address.clone(), PlannedRoom { address: row.address.clone(), parts: vec![(i, row.clone())] });
                continue;
            };
            let first = existing.parts[0].0;
            match rules.rooms {
                RoomRule::Union => {
                    existing.parts.push((i, row.clone()));
                    conflicts.push(Conflict::new("room", &row.address, vec![first, i], rules.rooms.name(), "one room: the union of both histories, by time, numbered again"));
                }
                RoomRule::Refuse => {
                    conflicts.push(Conflict::refused("room", &row.address, vec![first, i], rules.rooms.name(), "the room is in more than one source"));
                }
                RoomRule::Rename => {
                    let renamed = free_address(&row.address, i, &every_address, &rooms);
                    conflicts.push(Conflict::new("room", &row.address, vec![first, i], rules.rooms.name(), &format!("source {}'s room becomes {renamed}", i + 1)));
                    rooms.insert(renamed.clone(), PlannedRoom { address: renamed, parts: vec![(i, row.clone())] });
                }
            }
        }
    }

    let mut users: BTreeMap<String, (usize, user::Model)> = BTreeMap::new();
    for (i, source) in sources.iter().enumerate() {
        for u in &source.users {
            let Some((first, kept)) = users.get(&u.name).cloned() else {
                users.insert(u.name.clone(), (i, u.clone()));
                continue;
            };
            if kept.password_hash == u.password_hash {
                conflicts.push(Conflict::new("user", &u.name, vec![first, i], "same-password", "the same password: one account"));
                continue;
            }
            match rules.users {
                UserRule::Refuse => conflicts.push(Conflict::refused("user", &u.name, vec![first, i], rules.users.name(), "different passwords")),
                UserRule::Newer => {
                    let newer = u.created_at > kept.created_at;
                    let (from, outcome) = if newer { (i, i) } else { (first, first) };
                    conflicts.push(Conflict::new("user", &u.name, vec![first, i], rules.users.name(), &format!("different passwords: source {}'s account (the newer) is kept", outcome + 1)));
                    if newer {
                        users.insert(u.name.clone(), (from, u.clone()));
                    }
                }
            }
        }
    }
    Plan { rooms: rooms.into_values().collect(), users: users.into_values().map(|(_, u)| u).collect(), conflicts }
}

/// `local-N@service` for source index `i` (N = i + 1), with a further `-k` while taken.
fn free_address(address: &str, i: usize, every: &BTreeSet<&str>, planned: &BTreeMap<String, PlannedRoom>) -> String {
    let (local, service) = address.split_once('@').unwrap_or((address, ""));
    let at = if service.is_empty() { String::new() } else { format!("@{service}") };
    let mut candidate = format!("{local}-{}{at}", i + 1);
    let mut k = 2;
    while every.contains(candidate.as_str()) || planned.contains_key(&candidate) {
        candidate = format!("{local}-{}-{k}{at}", i + 1);
        k += 1;
    }
    candidate
}

/// How strong a standing is: owner > admin > member > outcast > none (an explicit standing beats
/// none; a privilege beats a ban).
fn strength(affiliation: &str) -> u8 {
    match affiliation {
        "owner" => 4,
        "admin" => 3,
        "member" => 2,
        "outcast" => 1,
        _ => 0,
    }
}

/// A target room's row, affiliations and plugin state from its source parts (in source order),
/// and the conflicts met. The row's `id` and `last_seq` are placeholders (0): the target
/// assigns the id, the room's end sets the last seq and `last_ts`.
pub fn combine_room(address: &str, parts: &[(usize, SourceRoom)], rules: &Rules) -> (room::Model, Vec<affiliation::Model>, Vec<crate::store::plugin_state::entity::Model>, Vec<Conflict>) {
    let mut conflicts = Vec::new();
    let (first_source, first) = &parts[0];
    let mut row = first.row.clone();
    row.id = 0;
    row.address = address.to_owned();
    row.last_seq = 0;
    row.last_ts = 0;
    row.host_node = row.home_node.clone();
    row.created_at = parts.iter().map(|(_, p)| p.row.created_at).min().unwrap_or(row.created_at);
    row.epoch = new_epoch(parts.iter().map(|(_, p)| p.row.epoch));
    for (i, p) in &parts[1..] {
        if p.row.config != first.row.config {
            conflicts.push(Conflict::new("room_config", address, vec![*first_source, *i], "first", &format!("source {}'s configuration is kept", first_source + 1)));
        }
    }

    let mut affs: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (i, p) in parts {
        for a in &p.affiliations {
            match affs.get(&a.user_name) {
                None => {
                    affs.insert(a.user_name.clone(), (*i, a.affiliation.clone()));
                }
                Some((j, kept)) if *kept != a.affiliation => {
                    let subject = format!("{address} {}", a.user_name);
                    match rules.affiliations {
                        AffiliationRule::Refuse => conflicts.push(Conflict::refused("affiliation", &subject, vec![*j, *i], rules.affiliations.name(), &format!("{kept} against {}", a.affiliation))),
                        AffiliationRule::Stronger => {
                            let (j, kept) = (*j, kept.clone());
                            let wins = if strength(&a.affiliation) > strength(&kept) { a.affiliation.clone() } else { kept.clone() };
                            conflicts.push(Conflict::new("affiliation", &subject, vec![j, *i], rules.affiliations.name(), &format!("{kept} against {}: {wins}", a.affiliation)));
                            if wins != kept {
                                affs.insert(a.user_name.clone(), (*i, wins));
                            }
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }
    let affiliations = affs.into_iter().map(|(user_name, (_, affiliation))| affiliation::Model { room_id: 0, user_name, affiliation }).collect();

    let mut state: BTreeMap<(String, String), (usize, String)> = BTreeMap::new();
    for (i, p) in parts {
        for s in &p.plugin_state {
            let key = (s.plugin.clone(), s.key.clone());
            match state.get(&key) {
                None => {
                    state.insert(key, (*i, s.value.clone()));
                }
                Some((j, v)) if *v != s.value => {
                    conflicts.push(Conflict::new("plugin_state", &format!("{address} {} {}", s.plugin, s.key), vec![*j, *i], "first", &format!("source {}'s value is kept", j + 1)));
                }
                Some(_) => {}
            }
        }
    }
    let plugin_state = state
        .into_iter()
        .map(|((plugin, key), (_, value))| crate::store::plugin_state::entity::Model { room_id: 0, plugin, key, value })
        .collect();
    (row, affiliations, plugin_state, conflicts)
}

/// The epoch of a merged room: above every source's, so no fence taken on a source matches it.
pub fn new_epoch(epochs: impl Iterator<Item = i64>) -> i64 {
    epochs.max().unwrap_or(0) + 1
}

/// One room's history from its sources' histories (each by seq, in source order): ordered by
/// (created_at, source index, original seq), a (sender, client_msg_id) kept once (its first
/// in that order), numbered 1..n. Ids, bodies and times are kept. Returns the history and the
/// duplicates dropped (source index, original seq) — or, under `messages=refuse`, the
/// duplicates as refusals and nothing dropped.
pub fn resequence(histories: Vec<(usize, Vec<message::Model>)>, address: &str, rules: &Rules) -> (Vec<message::Model>, Vec<Conflict>) {
    let mut all: Vec<(usize, message::Model)> = histories.into_iter().flat_map(|(i, h)| h.into_iter().map(move |m| (i, m))).collect();
    all.sort_by_key(|(i, m)| (m.created_at, *i, m.seq));
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(all.len());
    let mut conflicts = Vec::new();
    let mut dropped = 0u64;
    let mut first_dup: Option<(usize, usize)> = None;
    for (i, mut m) in all {
        let key = (m.sender.clone(), m.client_msg_id.clone());
        if let Some(&j) = seen.get(&key) {
            dropped += 1;
            first_dup.get_or_insert((j, i));
            if rules.messages == MessageRule::Refuse {
                conflicts.push(Conflict::refused("message", &format!("{address} {} {}", m.sender, m.client_msg_id), vec![j, i], rules.messages.name(), "the same sender and client message id twice"));
            }
            continue;
        }
        seen.insert(key, i);
        m.seq = out.len() as i64 + 1;
        out.push(m);
    }
    if dropped > 0 && rules.messages == MessageRule::Once {
        let (j, i) = first_dup.expect("set with the first duplicate");
        let sources = if i == j { vec![i] } else { vec![j, i] };
        conflicts.push(Conflict::new("message", address, sources, rules.messages.name(), &format!("{dropped} duplicate(s) (same sender and client message id) stored once")));
    }
    (out, conflicts)
}

/// The checksum of a room's log: SHA-256 over (seq, sender, body) of every message by seq,
/// first 16 bytes in hex.
pub fn checksum<'a>(rows: impl Iterator<Item = (i64, &'a str, &'a str)>) -> String {
    let mut h = sha2::Sha256::new();
    for (seq, sender, body) in rows {
        h.update(seq.to_string().as_bytes());
        h.update([0x1f]);
        h.update(sender.as_bytes());
        h.update([0x1f]);
        h.update(body.as_bytes());
        h.update([0x1e]);
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: i64, at: i64, sender: &str, cid: &str) -> message::Model {
        message::Model { room_id: 7, seq, id: format!("id-{sender}-{cid}"), sender: sender.into(), nick: sender.into(), body: format!("{sender} {cid}"), client_msg_id: cid.into(), epoch: 1, created_at: at }
    }

    fn room(address: &str, epoch: i64) -> room::Model {
        room::Model { id: 1, address: address.into(), config: "{}".into(), public: true, home_node: "n1".into(), host_node: "n1".into(), epoch, last_seq: 0, last_ts: 0, created_at: 5 }
    }

    /// Two histories interleave by time; ties go to the lower source, then the lower seq;
    /// a (sender, cid) already kept is dropped; seqs are 1..n and ids are kept.
    #[test]
    fn histories_interleave_by_time_and_duplicates_are_kept_once() {
        let a = vec![msg(1, 10, "ann", "a1"), msg(2, 20, "ann", "a2"), msg(3, 30, "bob", "same")];
        let b = vec![msg(1, 10, "cy", "c1"), msg(2, 15, "cy", "c2"), msg(3, 40, "bob", "same")];
        let (out, conflicts) = resequence(vec![(0, a), (1, b)], "r@s", &Rules::default());
        let got: Vec<(i64, &str, &str)> = out.iter().map(|m| (m.seq, m.sender.as_str(), m.client_msg_id.as_str())).collect();
        assert_eq!(got, vec![(1, "ann", "a1"), (2, "cy", "c1"), (3, "cy", "c2"), (4, "ann", "a2"), (5, "bob", "same")]);
        assert_eq!(out[4].id, "id-bob-same");
        assert!(out.windows(2).all(|w| w[0].created_at <= w[1].created_at));
        assert_eq!(conflicts.len(), 1);
        assert!(!conflicts[0].refused);
        let refuse = Rules { messages: MessageRule::Refuse, ..Rules::default() };
        let (_, conflicts) = resequence(vec![(0, vec![msg(1, 1, "x", "c")]), (1, vec![msg(1, 2, "x", "c")])], "r@s", &refuse);
        assert!(conflicts[0].refused);
    }

    /// The same input always gives the same output (the resumability argument rests on it),
    /// whatever order the histories are handed in.
    #[test]
    fn resequencing_is_deterministic() {
        let h = || vec![(1, vec![msg(1, 5, "b", "1"), msg(2, 5, "b", "2")]), (0, vec![msg(1, 5, "a", "1")])];
        let (x, _) = resequence(h(), "r", &Rules::default());
        let mut reversed = h();
        reversed.reverse();
        let (y, _) = resequence(reversed, "r", &Rules::default());
        assert_eq!(x, y);
        assert_eq!(x[0].sender, "a");
    }

    /// Each room rule: union makes one room of two; rename gives the second `-2`; refuse refuses.
    #[test]
    fn room_rules() {
        let s = |addrs: &[&str]| SourceInventory { rooms: addrs.iter().map(|a| room(a, 1)).collect(), users: vec![] };
        let sources = [s(&["a@x", "b@x"]), s(&["b@x", "c@x"])];
        let union = plan(&sources, &Rules::default());
        assert_eq!(union.rooms.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(), ["a@x", "b@x", "c@x"]);
        assert_eq!(union.rooms[1].parts.len(), 2);
        let rename = plan(&sources, &Rules { rooms: RoomRule::Rename, ..Rules::default() });
        assert_eq!(rename.rooms.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(), ["a@x", "b-2@x", "b@x", "c@x"]);
        let refuse = plan(&sources, &Rules { rooms: RoomRule::Refuse, ..Rules::default() });
        assert!(refuse.conflicts.iter().any(|c| c.refused && c.subject == "b@x"));
    }

    /// Users: the same hash is one account; different hashes are refused or the newer is kept.
    #[test]
    fn user_rules() {
        let u = |name: &str, hash: &str, at: i64| user::Model {
            name: name.into(),
            password_hash: hash.into(),
            created_at: at,
            scram_sha1_salt: None,
            scram_sha1_iterations: None,
            scram_sha1_stored_key: None,
            scram_sha1_server_key: None,
            scram_sha256_salt: None,
            scram_sha256_iterations: None,
            scram_sha256_stored_key: None,
            scram_sha256_server_key: None,
            home_node: None,
        };
        let sources = [
            SourceInventory { rooms: vec![], users: vec![u("ann", "h1", 1), u("bob", "h2", 1)] },
            SourceInventory { rooms: vec![], users: vec![u("ann", "h1", 2), u("bob", "h3", 9)] },
        ];
        let refuse = plan(&sources, &Rules::default());
        assert!(refuse.conflicts.iter().any(|c| c.refused && c.subject == "bob"));
        assert!(refuse.conflicts.iter().any(|c| !c.refused && c.subject == "ann"));
        let newer = plan(&sources, &Rules { users: UserRule::Newer, ..Rules::default() });
        assert!(newer.conflicts.iter().all(|c| !c.refused));
        assert_eq!(newer.users.iter().find(|u| u.name == "bob").unwrap().password_hash, "h3");
    }

    /// Affiliations: the stronger wins; the epoch is above every source's.
    #[test]
    fn the_stronger_affiliation_wins_and_the_epoch_is_bumped() {
        let aff = |u: &str, a: &str| affiliation::Model { room_id: 1, user_name: u.into(), affiliation: a.into() };
        let part = |epoch, affs| SourceRoom { row: room("r@x", epoch), affiliations: affs, plugin_state: vec![] };
        let parts = vec![(0, part(3, vec![aff("ann", "member"), aff("bob", "owner")])), (1, part(7, vec![aff("ann", "admin"), aff("bob", "outcast")]))];
        let (row, affs, _, conflicts) = combine_room("r@x", &parts, &Rules::default());
        assert_eq!(row.epoch, 8);
        let got: Vec<(&str, &str)> = affs.iter().map(|a| (a.user_name.as_str(), a.affiliation.as_str())).collect();
        assert_eq!(got, vec![("ann", "admin"), ("bob", "owner")]);
        assert_eq!(conflicts.len(), 2);
    }
}
