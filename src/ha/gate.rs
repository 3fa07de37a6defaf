//! The write gate: a node stops committing on its own when its lease may have run out.
//!
//! Courtesy, not safety (docs/ha.md): the store's epoch check refuses a fenced node's writes
//! whatever this gate says. The gate only makes a node that cannot renew its lease stop
//! *before* its peer is allowed to take over, so its clients get a clear `unavailable` instead
//! of commits that the store would refuse anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shared by the recovery manager (which moves the deadline) and the committer (which reads it).
#[derive(Clone, Debug)]
pub struct WriteGate {
    origin: Instant,
    /// Milliseconds after `origin` until which writes are allowed.
    deadline_ms: Arc<AtomicU64>,
}

impl WriteGate {
    /// A gate that is always open (a node without a peer has no lease to lose).
    pub fn always_open() -> Self {
        WriteGate { origin: Instant::now(), deadline_ms: Arc::new(AtomicU64::new(u64::MAX)) }
    }

    /// A gate that is closed until [`WriteGate::open_until`] is called.
    pub fn closed() -> Self {
        WriteGate { origin: Instant::now(), deadline_ms: Arc::new(AtomicU64::new(0)) }
    }

    /// Allow writes until `deadline` (monotonic).
    pub fn open_until(&self, deadline: Instant) {
        let ms = deadline.saturating_duration_since(self.origin).as_millis() as u64;
        self.deadline_ms.store(ms, Ordering::Release);
    }

    /// Refuse writes from now on.
    pub fn close(&self) {
        self.deadline_ms.store(0, Ordering::Release);
    }

    /// May the node commit now?
    pub fn is_open(&self) -> bool {
        let now = self.origin.elapsed().as_millis() as u64;
        now < self.deadline_ms.load(Ordering::Acquire)
    }

    /// How long writes stay allowed from now (zero when closed).
    pub fn remaining(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(self.deadline_ms.load(Ordering::Acquire).saturating_sub(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_closes_at_its_deadline() {
        let gate = WriteGate::closed();
        assert!(!gate.is_open());
        gate.open_until(Instant::now() + Duration::from_millis(50));
        assert!(gate.is_open());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!gate.is_open(), "a lease not renewed closes the gate by itself");
        gate.open_until(Instant::now() + Duration::from_secs(5));
        gate.close();
        assert!(!gate.is_open());
        assert!(WriteGate::always_open().is_open());
    }
}
