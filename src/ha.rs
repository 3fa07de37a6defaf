//! High availability for redundancy pairs (docs/ha.md, docs/operations.md): the recovery state
//! machine ([`state`]), node leases on the database clock ([`lease`]), the one-statement room
//! moves and the presence lock ([`fencing`]), the write gate that stops a node whose lease may
//! have run out ([`gate`]), the authenticated node link ([`link`]), and the recovery manager
//! that detects failures and runs failover, takeover and fallback ([`recovery`]).

pub mod fencing;
pub mod gate;
pub mod lease;
pub mod link;
pub mod recovery;
pub mod state;
