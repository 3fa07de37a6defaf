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
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("STOA_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{},sqlx=warn,sea_orm=warn", settings.log.level)));
    // Colours only for a person at a terminal, never into a file or a pipe.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| LogSink).with_ansi(ansi);
    if settings.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Where log lines go: stderr, never failing. A log write that fails (the reader of a piped
/// stderr has gone: EPIPE) drops the line; tracing would otherwise report the failure with
/// `eprintln!`, which panics on the same broken pipe, in whatever task was logging (the signal
/// handler's first `info!` among them), so logging must never be able to stop or break a node.
struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
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
            init_tracing(&settings);
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
                signals.wait(tls.as_ref()).await;
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
        Command::Bench(args) => {
            let settings = Settings::default();
            init_tracing(&Settings { log: stoa::config::LogSettings { level: "warn".into(), json: false }, ..settings });
            runtime()?.block_on(stoa::bench::run(args))
        }
    }
}

/// The node's signal handlers: SIGINT and SIGTERM stop it, SIGHUP reloads the TLS certificate.
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

    /// Wait for SIGINT or SIGTERM; on SIGHUP reload the TLS certificate and keep waiting.
    async fn wait(mut self, tls: Option<&stoa::tls::ServerTls>) {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return,
                _ = self.terminate.recv() => return,
                _ = self.hangup.recv() => match tls {
                    // The outcome is logged either way; a failed reload keeps the old certificate.
                    Some(tls) => { let _ = stoa::tls::reload_logged(tls, "SIGHUP"); }
                    None => tracing::info!("SIGHUP: no [tls] configured, nothing to reload"),
                },
            }
        }
    }
}
