//! High availability for redundancy pairs (docs/ha.md). So far: the recovery state machine
//! ([`state`]) and node leases on the database clock ([`lease`]); the node link, the recovery
//! manager and takeover build on them.

pub mod lease;
pub mod state;
