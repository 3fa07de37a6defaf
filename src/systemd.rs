//! systemd `Type=notify` (sd_notify(3)): the node says `READY=1` once its listeners serve,
//! `STOPPING=1` when a stop begins, a short `STATUS=` line, and `WATCHDOG=1` every half
//! `WatchdogSec=` while its runtime and room threads answer.
//!
//! Everything here does nothing unless the service manager set `NOTIFY_SOCKET` (and
//! `WATCHDOG_USEC` for the pings): a node started by hand, by a test or embedded sends nothing.
//! The datagrams go through the `sd-notify` crate (no libsystemd); it speaks to a socket
//! path, which is what systemd gives services (`/run/systemd/notify`).

use crate::ha::recovery::Recovery;
use crate::registry::RoomRegistry;
use crate::gateway::Gateway;
use sd_notify::NotifyState;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Send `states`; a failure is logged once (a manager that went away must not flood the log
/// or stop the node) and otherwise ignored.
fn notify(states: &[NotifyState]) {
    static FAILED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states)
        && !FAILED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET); further failures are not logged");
    }
}

/// `READY=1` with a status line: the listeners are bound and serving.
pub fn ready(status: &str) {
    if enabled() {
        notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }
}

/// The node serves: `READY=1` with `status` (where it listens), and, when the unit has
/// `WatchdogSec=`, the [`watchdog`] task on the current (the node's) runtime, whose pings
/// carry the node's figures as `STATUS=`.
pub fn serving(status: &str, gateway: Arc<Gateway>, registry: RoomRegistry, recovery: Option<Recovery>, shutdown: CancellationToken) {
    ready(status);
    if let Some(interval) = watchdog_interval() {
        let probe = registry.clone();
        let status = move || status_line(&gateway, &registry, recovery.as_ref());
        tokio::spawn(watchdog(interval, probe, status, shutdown));
    }
}

/// `serving: 3 connections, 12 active rooms` (and `, HA normal` on an HA node): short, for
/// `systemctl status`.
fn status_line(gateway: &Gateway, registry: &RoomRegistry, recovery: Option<&Recovery>) -> String {
    let ha = recovery.map(|r| format!(", HA {}", r.state().as_str())).unwrap_or_default();
    format!("serving: {} connections, {} active rooms{ha}", gateway.connection_count(), registry.active_count())
}

/// `STOPPING=1`: the node has begun its ordered shutdown.
pub fn stopping(status: &str) {
    if enabled() {
        notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC` (as sd_watchdog_enabled(3)
/// recommends), or `None` when the unit has no `WatchdogSec=` (or the variable is meant for
/// another process: `WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2)
}

/// Ping the watchdog every `interval` until `shutdown`, each time only after every room
/// arbiter has run a task within `interval` ([`RoomRegistry::probe`]): this task runs on the
/// node's I/O runtime, so a ping proves that runtime and the room threads are alive. A missed
/// probe skips the ping (and says so); `WatchdogSec=` later systemd restarts the node. Each
/// ping refreshes `STATUS=` with `status()`.
pub async fn watchdog(interval: Duration, registry: RoomRegistry, status: impl Fn() -> String, shutdown: CancellationToken) {
    tracing::info!(interval_ms = interval.as_millis() as u64, "systemd watchdog on (WatchdogSec=)");
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if registry.probe(interval).await {
            notify(&[NotifyState::Watchdog, NotifyState::Status(&status())]);
        } else {
            tracing::warn!("systemd watchdog: a room thread did not answer in time; no ping sent");
        }
    }
}
