//! High availability for redundancy pairs (docs/ha.md). So far: the recovery state machine
//! ([`state`]), node leases on the database clock ([`lease`]), a recovery manager that records
//! transitions and keeps the lease alive ([`recovery`]), and the authenticated node link with
//! heartbeats ([`link`]); takeover and fallback build on them.

pub mod lease;
pub mod link;
pub mod recovery;
pub mod state;
