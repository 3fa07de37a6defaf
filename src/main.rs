//! `stoa`: the command line. Thin: parse, load settings, init tracing, call into the library.

use anyhow::Context;

/// jemalloc instead of glibc malloc: measured +20–40 % throughput and less fragmentation
/// (smaller idle rooms); see docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use stoa::config::Settings;
use stoa::protocol::{RoomAddr, RoomConfig};
use stoa::store::{NodeId, Store};

#[derive(Parser)]
#[command(name = "stoa", version, about = "Persistent chat rooms on a SQL store")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a node (with no --config: dev mode, SQLite in ./stoa-data, loopback only).
    Serve(ConfigArg),
    /// Apply pending database migrations and exit.
    Migrate(ConfigArg),
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage rooms directly in the store.
    Room {
        #[command(subcommand)]
        command: RoomCommand,
    },
    /// Load generator and benchmarks (see docs/benchmarks.md).
    Bench(stoa::bench::BenchArgs),
    /// Talk to a running node's admin API: status, failover, fallback, critical services.
    Admin(AdminArgs),
    /// Manage the Wasm plugins of a running node (through its admin API; docs/plugins.md).
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
        /// The node's admin address: `host:port`, `http://…` or `https://…` (default:
        /// `listen.admin` of the config, https when it has `[tls]`).
        #[arg(long, global = true, value_name = "HOST:PORT")]
        admin: Option<String>,
        /// PEM trust anchors for an https admin API (default: `tls.ca_file` of the config).
        #[arg(long, global = true, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Admin bearer token (default: `auth.admin_token` of the config).
        #[arg(long, global = true, env = "STOA_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// List loaded plugins (or show one) with their calls, faults and state.
    List { name: Option<String> },
    /// Load `<plugins.dir>/<name>.wasm` (or replace the loaded version).
    Load { name: String },
    /// Swap a loaded plugin for the file's current version, without dropping connections.
    Reload { name: String },
    /// Unload a plugin: rooms skip its hooks from their next event on.
    Unload { name: String },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The node's admin address: `host:port`, `http://host:port` or `https://host:port`;
    /// default: `listen.admin` of --config (https when it has `[tls]`).
    #[arg(long)]
    admin: Option<String>,
    /// PEM trust anchors for an https admin API; default: `tls.ca_file` of --config, else the
    /// Mozilla roots.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Bearer token; default: `auth.admin_token` of --config.
    #[arg(long, env = "STOA_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    config: ConfigArg,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Every node of the topology: state, reason, since, rooms, users, services, lease.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// One node, as JSON.
    Node { node: String },
    /// Fail NODE over to its peer (maintenance; reason on_admin_request).
    Failover { node: String },
    /// Hand NODE's rooms back from its backup.
    Fallback { node: String },
    /// Stop or start a critical service (rooms, router, store) of a node.
    Service {
        /// stop or start
        #[arg(value_parser = ["stop", "start"])]
        action: String,
        /// rooms, router or store
        #[arg(value_parser = ["rooms", "router", "store"])]
        service: String,
        #[arg(long)]
        node: String,
    },
    /// Re-read the node's TLS certificate and key (like SIGHUP); the old one stays on error.
    TlsReload,
    /// The admin audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
}

#[derive(clap::Args)]
struct ConfigArg {
    /// TOML config file; `STOA__SECTION__KEY` variables override it.
    #[arg(long, short, env = "STOA_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Register a user; the password comes from --password-file or a prompt.
    Add {
        name: String,
        /// Read the password from this file (first line) instead of prompting.
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List registered users.
    List(ConfigArg),
}

#[derive(Subcommand)]
enum RoomCommand {
    /// Create a room homed on this node.
    Create {
        /// `name@service` (the service must be this node's).
        room: String,
        /// The owner's user name.
        #[arg(long, default_value = "admin")]
        owner: String,
        /// Members-only instead of public.
        #[arg(long)]
        members_only: bool,
        #[arg(long)]
        subject: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List rooms.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u64,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show one room.
    Show {
        room: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn init_tracing(settings: &Settings) {
    init_tracing_to(settings, stoa::logfile::LogSink::stderr());
}

/// Log through `sink` (stderr, or `log.file` for `serve`); a failed write never breaks the
/// node (stoa::logfile).
fn init_tracing_to(settings: &Settings, sink: stoa::logfile::LogSink) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("STOA_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{},sqlx=warn,sea_orm=warn", settings.log.level)));
    // Colours only for a person at a terminal, never into a file or a pipe.
    let ansi = sink.path().is_none() && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(sink).with_ansi(ansi);
    if settings.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load(config: &ConfigArg) -> anyhow::Result<Settings> {
    Settings::load(config.config.as_deref()).context("loading settings")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")
}

async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let url = settings.store_url();
    let store = Store::connect(&url, 4, &settings.store.sqlite_synchronous)
        .await
        .with_context(|| format!("connecting to {}", stoa::node::redact(&url)))?;
    store.migrate().await.context("running migrations")?;
    Ok(store)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(ConfigArg { config: None }));
    match command {
        Command::Serve(config) => {
            let settings = load(&config)?;
            // `log.file` as given: relative to the working directory, like the other paths.
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
        Command::Migrate(config) => {
            let settings = load(&config)?;
            init_tracing(&settings);
            runtime()?.block_on(async {
                open_store(&settings).await?;
                println!("migrations applied to {}", stoa::node::redact(&settings.store_url()));
                Ok(())
            })
        }
        Command::Admin(args) => runtime()?.block_on(admin(args)),
        Command::User { command } => match command {
            UserCommand::Add { name, password_file, config } => {
                let settings = load(&config)?;
                init_tracing(&settings);
                let password = match password_file {
                    Some(path) => std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    None => {
                        let p = rpassword::prompt_password(format!("password for {name}: "))?;
                        let again = rpassword::prompt_password("again: ")?;
                        anyhow::ensure!(p == again, "passwords differ");
                        p
                    }
                };
                anyhow::ensure!(password.len() >= 8, "passwords must be at least 8 characters");
                runtime()?.block_on(async {
                    let store = open_store(&settings).await?;
                    let auth = stoa::auth::Auth::new(store, false, settings.auth.session_ttl_s);
                    auth.add_user(&name, &password).await.with_context(|| format!("adding user {name}"))?;
                    println!("user {name} added");
                    Ok(())
                })
            }
            UserCommand::List(config) => {
                let settings = load(&config)?;
                init_tracing(&settings);
                runtime()?.block_on(async {
                    let store = open_store(&settings).await?;
                    for (name, created) in store.list_users().await? {
                        println!("{name}\tcreated_at_ms={created}");
                    }
                    Ok(())
                })
            }
        },
        Command::Room { command } => match command {
            RoomCommand::Create { room, owner, members_only, subject, config } => {
                let settings = load(&config)?;
                init_tracing(&settings);
                let addr = RoomAddr(room);
                anyhow::ensure!(
                    addr.service() == settings.node.service,
                    "room {addr} is not on this node's service `{}`",
                    settings.node.service
                );
                let cfg = RoomConfig { public: !members_only, subject: subject.unwrap_or_default(), ..RoomConfig::default() };
                runtime()?.block_on(async {
                    let store = open_store(&settings).await?;
                    store.create_room(&addr, &cfg, &owner, &NodeId(settings.node.id.clone())).await.with_context(|| format!("creating {addr}"))?;
                    println!("room {addr} created, owner {owner}");
                    Ok(())
                })
            }
            RoomCommand::List { limit, offset, config } => {
                let settings = load(&config)?;
                init_tracing(&settings);
                runtime()?.block_on(async {
                    let store = open_store(&settings).await?;
                    println!("{} rooms", store.count_rooms().await?);
                    for r in store.list_rooms(offset, limit).await? {
                        println!("{}\tlast_seq={}\thost={}\tepoch={}\tpublic={}", r.address, r.last_seq, r.host_node, r.epoch.0, r.config.public);
                    }
                    Ok(())
                })
            }
            RoomCommand::Show { room, config } => {
                let settings = load(&config)?;
                init_tracing(&settings);
                runtime()?.block_on(async {
                    let store = open_store(&settings).await?;
                    let row = store.load_room(&RoomAddr(room.clone())).await?.with_context(|| format!("no room {room}"))?;
                    let affs = store.load_affiliations(row.id).await?;
                    let out = serde_json::json!({
                        "room": row.address, "last_seq": row.last_seq, "home_node": row.home_node.0,
                        "host_node": row.host_node.0, "epoch": row.epoch.0, "created_at": row.created_at,
                        "config": row.config.public_view(), "affiliations": affs,
                    });
                    println!("{}", serde_json::to_string_pretty(&out)?);
                    Ok(())
                })
            }
        },
        Command::Plugin { command, admin, ca, token, config } => {
            let settings = load(&config)?;
            use stoa::plugin::cli::Op;
            let (op, name) = match command {
                PluginCommand::List { name } => (Op::List, name),
                PluginCommand::Load { name } => (Op::Load, Some(name)),
                PluginCommand::Reload { name } => (Op::Reload, Some(name)),
                PluginCommand::Unload { name } => (Op::Unload, Some(name)),
            };
            let admin = admin.unwrap_or_else(|| settings.listen.admin.to_string());
            let ca = ca.or_else(|| settings.tls.ca_file.clone());
            let (addr, tls) = stoa::admin_client::target(&admin, settings.tls.enabled(), ca.as_deref())?;
            let token = token.unwrap_or_else(|| settings.auth.admin_token.clone());
            let answer = runtime()?.block_on(stoa::plugin::cli::run(&addr, tls.as_ref(), &token, op, name.as_deref()))?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
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

async fn admin(args: AdminArgs) -> anyhow::Result<()> {
    let settings = match (&args.admin, &args.config.config) {
        (Some(_), None) => None,
        _ => Some(load(&args.config)?),
    };
    let admin = args.admin.clone().unwrap_or_else(|| settings.as_ref().map(|s| s.listen.admin.to_string()).unwrap_or_default());
    let ca = args.ca.clone().or_else(|| settings.as_ref().and_then(|s| s.tls.ca_file.clone()));
    let tls_by_default = settings.as_ref().is_some_and(|s| s.tls.enabled());
    let (addr, tls) = stoa::admin_client::target(&admin, tls_by_default, ca.as_deref())?;
    let token = args.token.clone().or_else(|| settings.as_ref().map(|s| s.auth.admin_token.clone()));
    let timeout = std::time::Duration::from_secs(60);
    let call = |method: &'static str, path: String| {
        let (addr, tls, token) = (addr.clone(), tls.clone(), token.clone());
        async move { stoa::admin_client::request_with(&addr, tls.as_ref(), method, &path, token.as_deref(), timeout).await }
    };
    let answer = match &args.command {
        AdminCommand::Status { .. } => call("GET", "/api/topology".into()).await?,
        AdminCommand::Node { node } => call("GET", format!("/api/nodes/{node}")).await?,
        AdminCommand::Failover { node } => call("POST", format!("/api/nodes/{node}/failover")).await?,
        AdminCommand::Fallback { node } => call("POST", format!("/api/nodes/{node}/fallback")).await?,
        AdminCommand::Service { action, service, node } => call("POST", format!("/api/nodes/{node}/services/{service}/{action}")).await?,
        AdminCommand::Audit { limit } => call("GET", format!("/api/audit?limit={limit}")).await?,
        AdminCommand::TlsReload => call("POST", "/api/tls/reload".into()).await?,
    };
    let json = answer.json();
    match &args.command {
        AdminCommand::Status { json: false } if answer.status == 200 => print_status(&json),
        AdminCommand::Failover { .. } | AdminCommand::Fallback { .. } | AdminCommand::Service { .. } | AdminCommand::TlsReload if answer.status == 200 => {
            println!("{}", json["message"].as_str().unwrap_or(&answer.body));
        }
        _ if answer.status == 200 => println!("{}", serde_json::to_string_pretty(&json).unwrap_or(answer.body.clone())),
        _ => {
            let message = json["message"].as_str().map(str::to_owned).unwrap_or(answer.body.clone());
            anyhow::bail!("{} ({}): {message}", json["error"].as_str().unwrap_or("error"), answer.status);
        }
    }
    Ok(())
}

/// A duration for people: `42s`, `7m03s`, `5h12m`, `3d04h`.
fn readable_age(ms: i64) -> String {
    let s = (ms.max(0) / 1000) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn print_status(topology: &serde_json::Value) {
    // 99 columns at most; the JSON (`--json`) has everything.
    println!("{:<8} {:<26} {:<22} {:>7} {:>6} {:>6} {:<10} {:>7}", "NODE", "STATE", "REASON", "SINCE", "ROOMS", "USERS", "SERVICES", "LEASE");
    let groups = topology["groups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        println!("(no [cluster] topology configured on this node)");
    }
    for group in groups {
        for n in group["nodes"].as_array().cloned().unwrap_or_default() {
            // `ok`, or the services that are down.
            // (the peer's, as its heartbeats report them)
            let down: Option<Vec<&str>> = match n["services"].as_array() {
                Some(s) => Some(s.iter().filter(|x| x["running"] != true).filter_map(|x| x["service"].as_str()).collect()),
                None if n["link"]["reachable"] == true => n["link"]["services_down"].as_array().map(|d| d.iter().filter_map(|x| x.as_str()).collect()),
                None => None,
            };
            let services = match down {
                Some(d) if d.is_empty() => "ok".to_owned(),
                Some(d) => format!("DOWN:{}", d.join(",")),
                None => "-".to_owned(),
            };
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            let since = n["since_ms"].as_i64().map_or("-".to_owned(), |at| readable_age(now_ms - at));
            // A lease the peer took over (`taken-by/…`) is as dead as an expired one.
            let taken = n["lease"]["holder"].as_str().is_some_and(|h| h.starts_with("taken-by/"));
            let lease = match (n["lease"]["expired"].as_bool(), n["lease"]["remaining_ms"].as_i64()) {
                _ if taken => "taken".to_owned(),
                (Some(true), _) => "expired".to_owned(),
                (_, Some(ms)) => format!("{:.1}s", ms as f64 / 1000.0),
                _ => "-".to_owned(),
            };
            let show = |v: &serde_json::Value| match v {
                serde_json::Value::Null => "-".to_owned(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            // The longest state name does not fit a column: the table abbreviates it.
            let state = show(&n["state"]).replace("failed_over_critical_services_not_running", "failed_over_critical");
            println!(
                "{:<8} {:<26} {:<22} {:>7} {:>6} {:>6} {:<10} {:>7}",
                show(&n["id"]),
                state,
                show(&n["reason"]),
                since,
                show(&n["rooms_hosted"]),
                show(&n["users_connected"]),
                services,
                lease,
            );
        }
    }
}
