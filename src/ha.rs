//! High availability for redundancy pairs (docs/ha.md, docs/operations.md): the recovery state
//! machine ([`state`]), the write gate that stops a node whose lease may have run out
//! ([`gate`]), the authenticated node link ([`link`]), and the recovery manager
//! that detects failures and runs failover, takeover and fallback ([`recovery`]).
//! The statements they run (leases, room moves, node states, the presence lock) are the
//! store's: `store::cluster`.

pub mod gate;
pub mod link;
pub mod recovery;
pub mod state;
