//! Budgets per user name and per source address, across connections: token buckets that
//! refill continuously (`burst` per `window`). An attempt whose user or address has no token
//! left is refused (`rate_limited`, with when to retry).
//!
//! Two budgets use it: failed logins (every failure spends; a login is refused before its
//! password is even checked, so guessing costs the same over one connection or a thousand,
//! and the right password does not get in while the budget is empty; a successful login
//! forgets its user's failures, not the address's) and room creations (every creation
//! spends).
//!
//! The state is per node and in memory: a client that alternates between the two nodes of a
//! pair gets twice the budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most buckets kept; past this, refilled buckets are dropped, and if that is not enough the
/// user buckets are (address buckets carry the flood itself).
const MAX_BUCKETS: usize = 100_000;

/// How many failures, per how long.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub burst: u32,
    pub window: Duration,
}

impl Policy {
    fn per_second(&self) -> f64 {
        self.burst as f64 / self.window.as_secs_f64().max(0.001)
    }
}

/// Why an attempt is refused before it is tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttled {
    /// What ran out: `"user"` or `"address"`.
    pub by: &'static str,
    /// When one more attempt will be allowed.
    pub retry_after: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    User(String),
    Address(IpAddr),
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of one budget of one node.
pub struct Throttle {
    /// What is budgeted (`login_failures`, `room_creations`), for metrics.
    what: &'static str,
    per_user: Policy,
    per_address: Policy,
    buckets: Mutex<HashMap<Key, Bucket>>,
}

impl Throttle {
    pub fn new(what: &'static str, per_user: Policy, per_address: Policy) -> Self {
        Throttle { what, per_user, per_address, buckets: Mutex::new(HashMap::new()) }
    }

    fn policy(&self, key: &Key) -> Policy {
        match key {
            Key::User(_) => self.per_user,
            Key::Address(_) => self.per_address,
        }
    }

    fn keys(user: Option<&str>, address: Option<IpAddr>) -> impl Iterator<Item = Key> {
        user.map(|u| Key::User(u.to_lowercase())).into_iter().chain(address.map(Key::Address))
    }

    /// The bucket's tokens at `now` (a missing bucket is full).
    fn tokens(&self, key: &Key, bucket: Option<&Bucket>, now: Instant) -> f64 {
        let policy = self.policy(key);
        match bucket {
            None => policy.burst as f64,
            Some(b) => (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * policy.per_second()).min(policy.burst as f64),
        }
    }

    /// May `user` from `address` try now?
    pub fn check(&self, user: Option<&str>, address: Option<IpAddr>, now: Instant) -> Result<(), Throttled> {
        let buckets = self.buckets.lock().expect("throttle lock");
        for key in Self::keys(user, address) {
            let tokens = self.tokens(&key, buckets.get(&key), now);
            if tokens < 1.0 {
                let wait = (1.0 - tokens) / self.policy(&key).per_second();
                let by = if matches!(key, Key::User(_)) { "user" } else { "address" };
                metrics::counter!("stoa_throttled_total", "what" => self.what, "by" => by).increment(1);
                return Err(Throttled { by, retry_after: Duration::from_secs_f64(wait) });
            }
        }
        Ok(())
    }

    /// `user` from `address` spent one token (a failed login, a room created).
    pub fn spend(&self, user: Option<&str>, address: Option<IpAddr>, now: Instant) {
        let mut buckets = self.buckets.lock().expect("throttle lock");
        if buckets.len() >= MAX_BUCKETS {
            self.prune(&mut buckets, now);
        }
        for key in Self::keys(user, address) {
            let tokens = self.tokens(&key, buckets.get(&key), now);
            buckets.insert(key, Bucket { tokens: (tokens - 1.0).max(0.0), at: now });
        }
    }

    /// Forget what `user` spent (a login succeeded).
    pub fn forget(&self, user: &str) {
        self.buckets.lock().expect("throttle lock").remove(&Key::User(user.to_lowercase()));
    }

    fn prune(&self, buckets: &mut HashMap<Key, Bucket>, now: Instant) {
        buckets.retain(|k, b| self.tokens(k, Some(b), now) < self.policy(k).burst as f64);
        if buckets.len() >= MAX_BUCKETS {
            tracing::warn!(what = self.what, buckets = buckets.len(), "throttle full: forgetting per-user budgets");
            buckets.retain(|k, _| matches!(k, Key::Address(_)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new("test", Policy { burst: 3, window: Duration::from_secs(30) }, Policy { burst: 5, window: Duration::from_secs(10) })
    }

    #[test]
    fn failures_per_user_refuse_then_refill() {
        let t = throttle();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..3 {
            t.check(Some("ann"), Some(ip), now).unwrap();
            t.spend(Some("ann"), Some(ip), now);
        }
        let refused = t.check(Some("ANN"), None, now).unwrap_err();
        assert_eq!(refused.by, "user", "user names are compared without case");
        assert!((9..=10).contains(&refused.retry_after.as_secs()), "{refused:?}");
        t.check(Some("bob"), Some(ip), now).unwrap();
        t.check(Some("ann"), None, now + Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn failures_per_address_span_user_names() {
        let t = throttle();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let now = Instant::now();
        for i in 0..5 {
            t.spend(Some(&format!("user{i}")), Some(ip), now);
        }
        assert_eq!(t.check(Some("someone"), Some(ip), now).unwrap_err().by, "address");
        t.check(Some("someone"), Some("10.1.2.4".parse().unwrap()), now).unwrap();
    }

    #[test]
    fn success_forgets_the_users_failures() {
        let t = throttle();
        let now = Instant::now();
        for _ in 0..2 {
            t.spend(Some("ann"), None, now);
        }
        t.forget("ann");
        for _ in 0..3 {
            t.check(Some("ann"), None, now).unwrap();
            t.spend(Some("ann"), None, now);
        }
        assert!(t.check(Some("ann"), None, now).is_err());
    }
}
