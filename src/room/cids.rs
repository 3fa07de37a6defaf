//! Which `(sender, cid)` pairs a room has seen: the posts still pending (a resend joins the
//! original) and the last [`CID_MEMORY`] committed ones (a resend is acked with the stored seq
//! without the store).
//!
//! A pair is known by a [`CidKey`]: 128 bits of SipHash under a key random per room, computed
//! once when the post arrives and carried with it, so the commit path hashes and allocates
//! nothing (it used to clone both strings twice and hash them five times per message: 4 % of
//! the server's CPU at half saturation). A false match of the committed memory would ack a
//! message that was never stored, so it compares all 128 bits: for two different pairs that is
//! a chance of 2^-128, for a lookup among 1,024 remembered pairs 2^-118, far below the rate at
//! which memory flips bits. The key is secret and per room, so no sender can aim for a clash.
//! Pending posts are looked up by 64 bits only: there a match only means "scan the pending posts
//! and compare the strings", and a clash costs a scan.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

/// Committed pairs a room remembers, to answer resends without the store. Older resends are
/// still caught by the store's unique key.
pub(super) const CID_MEMORY: usize = 1024;

/// A `(sender, cid)` pair as two independent 64-bit keyed hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CidKey {
    /// Indexes the tables (already uniformly spread: they do not hash it again).
    lo: u64,
    /// Compared on a match of `lo`.
    hi: u64,
}

#[derive(Clone, Copy)]
struct Committed {
    hi: u64,
    seq: u64,
    ts: i64,
}

/// A room's pending and committed pairs.
#[derive(Default)]
pub(super) struct Cids {
    hasher: RandomState,
    /// `lo` of every pair that may still be pending (waiting for plugins, queued or in
    /// flight). A post whose `lo` is not here is certainly not a resend of a pending one, so
    /// only a likely resend scans the pending posts (under a backlog, scanning for every post
    /// cost more than the rest of `Post`). An entry leaves when its append is answered, and all
    /// of them when nothing is pending; one left behind only costs a scan.
    pending: HashSet<u64, Prehashed>,
    committed: HashMap<u64, Committed, Prehashed>,
    /// `(lo, seq)` of the committed pairs, oldest first: who goes when the memory is full.
    order: VecDeque<(u64, u64)>,
}

impl Cids {
    /// The key of `(sender, cid)` in this room.
    pub(super) fn key(&self, sender: &str, cid: &str) -> CidKey {
        // Two outputs of one keyed function on inputs that differ in their first byte:
        // independent as long as SipHash is a pseudo-random function.
        CidKey { lo: self.hasher.hash_one((0u8, sender, cid)), hi: self.hasher.hash_one((1u8, sender, cid)) }
    }

    /// The stored `(seq, ts)` of a committed pair still remembered.
    pub(super) fn committed(&self, key: CidKey) -> Option<(u64, i64)> {
        self.committed.get(&key.lo).filter(|c| c.hi == key.hi).map(|c| (c.seq, c.ts))
    }

    /// Remember a committed pair, forgetting the oldest beyond [`CID_MEMORY`]. A pair
    /// remembered already keeps its place; another pair with the same `lo` (a 2^-64 chance)
    /// gives way, forgotten (its resends are caught by the store).
    pub(super) fn remember(&mut self, key: CidKey, seq: u64, ts: i64) {
        if self.committed(key).is_some() {
            return;
        }
        self.committed.insert(key.lo, Committed { hi: key.hi, seq, ts });
        self.order.push_back((key.lo, seq));
        // The oldest entry goes unless its `lo` now names a newer pair.
        if self.order.len() > CID_MEMORY
            && let Some((lo, seq)) = self.order.pop_front()
            && self.committed.get(&lo).is_some_and(|c| c.seq == seq)
        {
            self.committed.remove(&lo);
        }
    }

    /// Note a pair as pending; false if it may be pending already (compare the strings).
    pub(super) fn add_pending(&mut self, key: CidKey) -> bool {
        self.pending.insert(key.lo)
    }

    /// A pending pair was answered.
    pub(super) fn answered(&mut self, key: CidKey) {
        self.pending.remove(&key.lo);
    }

    /// Nothing is pending any more.
    pub(super) fn clear_pending(&mut self) {
        self.pending.clear();
    }
}

/// Tables keyed by a hash already: the key is its own hash.
type Prehashed = BuildHasherDefault<KeyIsHash>;

#[derive(Default)]
struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; any other input still hashes consistently.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_pair_is_found_by_its_key_only() {
        let mut cids = Cids::default();
        let ann = cids.key("ann", "c1");
        assert_eq!(ann, cids.key("ann", "c1"), "the same pair, the same key");
        assert_ne!(ann, cids.key("bob", "c1"));
        assert_ne!(cids.key("an", "nc1"), cids.key("ann", "c1"), "the strings' boundary counts");
        cids.remember(ann, 7, 70);
        assert_eq!(cids.committed(ann), Some((7, 70)));
        assert_eq!(cids.committed(cids.key("ann", "c2")), None);
    }

    #[test]
    fn a_clash_of_the_low_half_never_matches_and_never_evicts_the_newer_pair() {
        let mut cids = Cids::default();
        let old = CidKey { lo: 1, hi: 10 };
        let clash = CidKey { lo: 1, hi: 11 };
        cids.remember(old, 1, 100);
        assert_eq!(cids.committed(clash), None, "the same low half is not the same pair");
        cids.remember(clash, 2, 200);
        assert_eq!(cids.committed(clash), Some((2, 200)));
        assert_eq!(cids.committed(old), None, "the older pair gave way");
        // Push `old`'s entry out of the order: `clash`, newer, stays.
        for i in 0..CID_MEMORY as u64 - 1 {
            cids.remember(CidKey { lo: 1000 + i, hi: i }, 10 + i, 0);
        }
        assert_eq!(cids.committed(clash), Some((2, 200)));
        cids.remember(CidKey { lo: 5000, hi: 0 }, 5000, 0);
        assert_eq!(cids.committed(clash), None, "its own turn came");
    }

    #[test]
    fn the_memory_keeps_the_newest_pairs() {
        let mut cids = Cids::default();
        let keys: Vec<CidKey> = (0..CID_MEMORY + 10).map(|i| cids.key("ann", &format!("c{i}"))).collect();
        for (i, k) in keys.iter().enumerate() {
            cids.remember(*k, i as u64 + 1, 0);
            cids.remember(*k, i as u64 + 1, 0);
        }
        assert_eq!(cids.committed.len(), CID_MEMORY);
        assert_eq!(cids.order.len(), CID_MEMORY, "a pair remembered twice takes one place");
        assert!(keys[..10].iter().all(|k| cids.committed(*k).is_none()));
        assert!(keys[10..].iter().enumerate().all(|(i, k)| cids.committed(*k) == Some((i as u64 + 11, 0))));
    }

    #[test]
    fn pending_pairs_are_noted_until_answered() {
        let mut cids = Cids::default();
        let k = cids.key("ann", "c1");
        assert!(cids.add_pending(k));
        assert!(!cids.add_pending(k), "a likely resend");
        cids.answered(k);
        assert!(cids.add_pending(k));
        cids.clear_pending();
        assert!(cids.add_pending(k));
    }
}
