//! Stoa: a persistent chat-room runtime.
//!
//! Module map (the data path is client → router → room actor → committer → store → fan-out):
//!
//! - [`protocol`]: wire frames of protocol v1 (serde), id newtypes, error codes.
//! - [`config`]: `Settings` from defaults, a TOML file and `STOA__*` environment variables.
//! - [`committer`]: the group committer, many rooms' appends per transaction, acks after commit.
//! - [`store`]: SeaORM entities, migrations under a lock, the fenced write path (`append_batch`).

pub mod admin;
pub mod auth;
pub mod bench;
pub mod client;
pub mod committer;
pub mod config;
pub mod protocol;
pub mod node;
pub mod registry;
pub mod room;
pub mod router;
pub mod session;
pub mod store;
pub mod transport;
