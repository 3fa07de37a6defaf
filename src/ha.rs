//! High availability for redundancy pairs (docs/ha.md): the recovery state machine so far;
//! leases, the node link and takeover build on it.

pub mod state;
