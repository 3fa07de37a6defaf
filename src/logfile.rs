//! Where the node's log lines go: stderr, or the file `log.file`, which SIGHUP reopens
//! (logrotate's `create` style: rotate renames the file, then signals the node, which then
//! writes to a fresh file at the configured path).
//!
//! sqlx's warning about a slow pool acquire, one per acquire, is thinned out to one per 10 s
//! ([`SlowAcquires`]).
//!
//! A log write never fails and never blocks the node on an error: a line that cannot be
//! written (a full disk, a stderr pipe whose reader has gone: EPIPE) is dropped. tracing would
//! otherwise report the failure with `eprintln!`, which panics on that same broken pipe in
//! whatever task was logging (the signal handler's first `info!` among them), so logging must
//! never be able to stop or break a node.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why the log file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the log file {path}: {source}")]
pub struct LogFileError {
    /// The configured path.
    pub path: PathBuf,
    /// What the system said.
    pub source: std::io::Error,
}

/// The destination of log lines, shared by every writer tracing makes: cheap to clone.
#[derive(Clone, Default)]
pub struct LogSink {
    /// `None`: stderr.
    file: Option<Arc<LogFile>>,
}

/// The open log file and its path, for reopening.
struct LogFile {
    path: PathBuf,
    /// Swapped by [`LogSink::reopen`]; writers take a clone of the `Arc` and write outside the lock.
    current: Mutex<Arc<File>>,
}

impl LogSink {
    /// Log to stderr.
    pub fn stderr() -> LogSink {
        LogSink { file: None }
    }

    /// Log to `path`, appended to (created with mode 0640 if missing).
    pub fn file(path: &Path) -> Result<LogSink, LogFileError> {
        let file = open(path)?;
        Ok(LogSink { file: Some(Arc::new(LogFile { path: path.to_owned(), current: Mutex::new(Arc::new(file)) })) })
    }

    /// The log file's path, if logging to a file.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Open the configured path again and write there from now on (after a rotation renamed
    /// the file); returns that path. Stderr needs no reopening: `Ok(None)`. On an error the
    /// old file stays in use.
    pub fn reopen(&self) -> Result<Option<&Path>, LogFileError> {
        let Some(log) = &self.file else { return Ok(None) };
        let fresh = Arc::new(open(&log.path)?);
        *log.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        Ok(Some(&log.path))
    }
}

fn open(path: &Path) -> Result<File, LogFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| LogFileError { path: path.to_owned(), source })
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.file {
            Some(log) => {
                let file = log.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
                // One `write_all` per line (tracing formats a whole event first); O_APPEND
                // keeps concurrent lines whole.
                let _ = (&*file).write_all(buf);
            }
            None => {
                let _ = std::io::stderr().write_all(buf);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.file.is_none() {
            let _ = std::io::stderr().flush();
        }
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> LogSink {
        self.clone()
    }
}

/// Thins out sqlx's warning about a slow pool acquire, which it logs once per acquire that
/// waited over 2 s: while a node's pool is saturated (10,000 clients resuming after a failover)
/// that was 36,733 lines in 8 seconds. One such warning goes through per [`SlowAcquires::EVERY`];
/// every one is counted in `stoa_store_slow_acquires_total`.
#[derive(Default)]
pub struct SlowAcquires {
    /// When the last warning went through.
    last: Mutex<Option<std::time::Instant>>,
}

impl SlowAcquires {
    /// At most one warning per this long.
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(10);
    const TARGET: &str = "sqlx::pool::acquire";
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SlowAcquires {
    fn event_enabled(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) -> bool {
        let meta = event.metadata();
        if meta.target() != Self::TARGET || *meta.level() != tracing::Level::WARN {
            return true;
        }
        metrics::counter!("stoa_store_slow_acquires_total").increment(1);
        let mut last = self.last.lock().expect("slow acquires lock");
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// A flood of slow-acquire warnings leaves one line; other lines, sqlx's included, all pass.
    #[test]
    fn slow_acquire_warnings_are_thinned_out() {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let fmt = tracing_subscriber::fmt::layer().with_writer(move || writer.clone()).with_ansi(false);
        let subscriber = tracing_subscriber::registry().with(SlowAcquires::default()).with(fmt);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..1000 {
                tracing::warn!(target: "sqlx::pool::acquire", acquired_after_secs = i, "acquired connection, but time to acquire exceeded slow threshold");
            }
            tracing::warn!(target: "sqlx::query", "slow statement");
            tracing::info!(target: "sqlx::pool::acquire", "acquired connection");
            tracing::warn!("a warning of Stoa's own");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("exceeded slow threshold").count(), 1, "{text}");
        assert!(text.contains("acquired_after_secs=0"), "the first goes through: {text}");
        assert!(text.contains("slow statement") && text.contains("a warning of Stoa's own"), "{text}");
        assert_eq!(text.matches("acquired connection").count(), 2, "the info line is kept: {text}");
    }

    /// Lines go to the file; after the file is renamed, they follow it until `reopen`, then
    /// go to a new file at the configured path.
    #[test]
    fn reopen_after_a_rename_writes_to_a_new_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stoa.log");
        let sink = LogSink::file(&path).expect("opening the log file");
        let mut w = sink.clone();
        w.write_all(b"one\n").unwrap();
        let rotated = dir.path().join("stoa.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        w.write_all(b"two\n").unwrap();
        assert_eq!(sink.reopen().expect("reopening"), Some(path.as_path()));
        let mut w2 = sink.clone();
        w2.write_all(b"three\n").unwrap();
        w.write_all(b"four\n").unwrap(); // an older writer handle follows the reopen too
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\nfour\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640 & !umask());
    }

    /// A reopen that fails (the directory is gone) says why and keeps the old file.
    #[test]
    fn a_failed_reopen_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sub = dir.path().join("logs");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("stoa.log");
        let sink = LogSink::file(&path).expect("opening the log file");
        let moved = dir.path().join("old-logs");
        std::fs::rename(&sub, &moved).unwrap();
        let err = sink.reopen().expect_err("the directory is gone");
        assert!(err.to_string().contains("stoa.log"), "{err}");
        sink.clone().write_all(b"kept\n").unwrap();
        assert_eq!(std::fs::read_to_string(moved.join("stoa.log")).unwrap(), "kept\n");
        assert_eq!(LogSink::stderr().reopen().unwrap(), None, "stderr is not reopened");
    }

    /// The process's umask, read without changing it (`Umask:` in /proc/self/status).
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).expect("a Umask line");
        u32::from_str_radix(line.trim(), 8).expect("an octal umask")
    }
}
