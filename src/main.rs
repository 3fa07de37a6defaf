//! `stoa`: the command line. Thin: parse, run the node (`serve`), init tracing, and hand every
//! other verb to `stoa::cli`.

use anyhow::Context;

/// jemalloc instead of glibc malloc: measured +20–40 % throughput and less fragmentation
/// (smaller idle rooms); see docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use clap::Parser;
use std::path::Path;
use stoa::cli::{Cli, Command, ConfigCommand};
use stoa::config::Settings;

fn init_tracing(settings: &Settings) {
    init_tracing_to(settings, stoa::logfile::LogSink::stderr());
}

/// Log through `sink` (stderr, or `log.file` for `serve`); a failed write never breaks the
/// node (stoa::logfile).
fn init_tracing_to(settings: &Settings, sink: stoa::logfile::LogSink) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_env("STOA_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{},sqlx=warn,sea_orm=warn", settings.log.level)));
    // Colours only for a person at a terminal, never into a file or a pipe.
    let ansi = sink.path().is_none() && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let lines = tracing_subscriber::fmt::layer().with_writer(sink).with_ansi(ansi);
    let subscriber = tracing_subscriber::registry().with(filter).with(stoa::logfile::SlowAcquires::default());
    if settings.log.json {
        subscriber.with(lines.json()).init();
    } else {
        subscriber.with(lines).init();
    }
}

fn load(config: Option<&Path>) -> anyhow::Result<Settings> {
    stoa::cli::load_settings(config)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", stoa::cli::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.as_deref();
    let command = cli.command.unwrap_or(Command::Serve);
    match command {
        Command::Serve => {
            let settings = load(config)?;
            let log = match &settings.log.file {
                Some(path) => stoa::logfile::LogSink::file(path)?,
                None => stoa::logfile::LogSink::stderr(),
            };
            init_tracing_to(&settings, log.clone());
            // The handlers are in place before the node says it listens: a SIGHUP sent as soon
            // as it does must reload the certificate, not end the process (the default action).
            let rt = runtime()?;
            let signals = {
                let _runtime = rt.enter();
                Signals::install()?
            };
            let mut node = stoa::node::Node::start(settings)?;
            let token = node.shutdown_token();
            let tls = node.tls().cloned();
            rt.spawn(async move {
                signals.wait(tls.as_ref(), &log).await;
                tracing::info!("signal received");
                token.cancel();
            });
            node.join()
        }
        Command::Migrate => {
            let settings = load(config)?;
            init_tracing(&settings);
            runtime()?.block_on(async {
                stoa::cli::open_store(&settings).await?;
                println!("migrations applied to {}", stoa::node::redact(&settings.store_url()));
                Ok(())
            })
        }
        Command::Config { command: ConfigCommand::Check } => {
            let file = stoa::cli::check_config(config)?;
            println!("ok: {}", file.display());
            Ok(())
        }
        Command::Admin { command, target } => runtime()?.block_on(stoa::cli::admin::run(config, &target, command)),
        Command::Plugin { command, target } => runtime()?.block_on(stoa::cli::admin::plugin(config, &target, command)),
        Command::User { command } => {
            let settings = load(config)?;
            init_tracing(&settings);
            runtime()?.block_on(stoa::cli::user::run(&settings, command))
        }
        Command::Room { command, target } => {
            let env = stoa::cli::Env { config, init_tracing: &init_tracing };
            runtime()?.block_on(stoa::cli::room::run(&env, &target, command))
        }
        Command::Session { command, target } => runtime()?.block_on(stoa::cli::session::run(config, &target, command)),
        Command::Db { command } => {
            let settings = Settings { log: stoa::config::LogSettings { level: "warn".into(), json: false, file: None }, ..Settings::default() };
            init_tracing(&settings);
            let store_url = || Ok(load(config)?.store_url());
            runtime()?.block_on(stoa::cli::db::run(store_url, command))
        }
        Command::Bench(args) => {
            let settings = Settings::default();
            init_tracing(&Settings { log: stoa::config::LogSettings { level: "warn".into(), json: false, file: None }, ..settings });
            runtime()?.block_on(stoa::bench::run(args))
        }
    }
}

/// The node's signal handlers: SIGINT and SIGTERM stop it, SIGHUP reopens the log file and
/// reloads the TLS certificate.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Register the handlers now (inside a runtime context), so that no signal arriving from
    /// here on takes its default action.
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }

    /// Wait for SIGINT or SIGTERM; on SIGHUP reopen the log file (first, so that what follows
    /// is in the new one), reload the TLS certificate and keep waiting.
    async fn wait(mut self, tls: Option<&stoa::tls::ServerTls>, log: &stoa::logfile::LogSink) {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return,
                _ = self.terminate.recv() => return,
                _ = self.hangup.recv() => {
                    match log.reopen() {
                        Ok(Some(path)) => tracing::info!(file = %path.display(), "SIGHUP: log file reopened"),
                        Ok(None) => {}
                        // The old file stays in use.
                        Err(e) => tracing::error!(error = %e, "SIGHUP: the log file stays the old one"),
                    }
                    match tls {
                        // The outcome is logged either way; a failed reload keeps the old certificate.
                        Some(tls) => { let _ = stoa::tls::reload_logged(tls, "SIGHUP"); }
                        None => tracing::info!("SIGHUP: no [tls] configured, nothing to reload"),
                    }
                }
            }
        }
    }
}
