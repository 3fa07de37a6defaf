//! Test harness: a fresh database per test ([`TestDb`], `db`), in-process nodes ([`TestNode`])
//! and real `stoa` processes ([`NodeProcess`], `node`), a raw WebSocket client ([`Client`],
//! `client`) that can send any frame, the admin API through `stoa::admin_client` ([`http_get`],
//! [`await_admin`], `admin`), and checks on frames and rooms (`assert`). Everything is
//! re-exported here, so a test names it `crate::harness::X`.
//!
//! Nothing here sleeps to wait for something: every wait is for a frame or a state, with a
//! deadline, and a missed deadline panics with what was seen instead.

#![allow(dead_code)]

mod admin;
mod assert;
mod client;
mod db;
mod node;

pub use admin::{await_admin, counter, http_get};
pub use assert::{assert_contiguous, assert_error, assert_room_works, seqs};
pub use client::{Client, is_message};
pub use db::{Backend, TestDb};
pub use node::{NodeProcess, TestNode, free_port, parse_listening, run_stoa};

use std::sync::Once;
use std::time::Duration;

/// How long any single wait may take before the test fails (debug builds are slow, and two
/// test threads share two cores with the nodes they start).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The room service of a node with default settings.
pub const SERVICE: &str = "conference.localhost";

/// The name a guest asked for: its user name without the server's `~suffix`.
pub fn asked_name(user: &str) -> &str {
    user.split_once('~').map_or(user, |(asked, _)| asked)
}

/// `name@conference.localhost`.
pub fn room(name: &str) -> String {
    format!("{name}@{SERVICE}")
}

/// Route the in-process nodes' logs to the test output (shown for failing tests only).
/// `STOA_TEST_LOG` overrides the filter.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("STOA_TEST_LOG").unwrap_or_else(|_| "info,sqlx=warn,sea_orm=warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}
