//! High availability for redundancy pairs (docs/ha.md). So far: the recovery state machine
//! ([`state`]), node leases on the database clock ([`lease`]), and a recovery manager that
//! records transitions and keeps the lease alive ([`recovery`]); the node link, peer watching
//! and takeover build on them.

pub mod lease;
pub mod recovery;
pub mod state;
