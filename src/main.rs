//! `stoa`: the command line. Thin: parse, load settings, init tracing, call into the library.

use anyhow::Context;

/// jemalloc instead of glibc malloc: measured +20–40 % throughput and less fragmentation
/// (smaller idle rooms); see docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use stoa::config::Settings;
use stoa::protocol::{RoomAddr, RoomConfig, RoomPlugin};
use stoa::store::{NodeId, Store};

#[derive(Parser)]
#[command(name = "stoa", version, about = "Persistent chat rooms on a SQL store")]
struct Cli {
    /// TOML config file, before or after the verb (default: $STOA_CONFIG; none = dev mode).
    /// Relative paths in it resolve against its folder; `STOA__SECTION__KEY` variables override it.
    #[arg(long, short, global = true, env = "STOA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a node (with no config: dev mode, SQLite in ./stoa-data, loopback only).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Check a config file without starting anything.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage users (in the store; works with the nodes down).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage rooms: create, list and show in the store; configure and destroy through the
    /// admin API of the node that hosts the room.
    Room {
        #[command(subcommand)]
        command: RoomCommand,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List and end login sessions (through a running node's admin API).
    Session {
        #[command(subcommand)]
        command: SessionCommand,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Load generator and benchmarks (see docs/benchmarks.md).
    Bench(stoa::bench::BenchArgs),
    /// Talk to a running node's admin API: status, failover, fallback, critical services, audit.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Manage the Wasm plugins of a running node (through its admin API; docs/plugins.md).
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// Where a verb that talks to a running node finds its admin API.
#[derive(clap::Args)]
struct AdminTarget {
    /// The node's admin address: `host:port`, `http://…` or `https://…` (default:
    /// `listen.admin` of the config, https when it has `[tls]`).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    admin: Option<String>,
    /// PEM trust anchors for an https admin API (default: `tls.ca_file` of the config, else
    /// the Mozilla roots).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Admin bearer token (default: `auth.admin_token` of the config).
    #[arg(long, global = true, env = "STOA_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load the config file as `stoa serve` would (parse, unknown keys, values, secret files,
    /// TLS files, the start-up checks); prints `ok: FILE` or the error, and exits non-zero on error.
    Check,
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
    /// The admin audit log, newest first: time (UTC), node, actor, action, target, outcome, details.
    Audit {
        /// How many lines (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        /// `table` for people, `json` for programs.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
}

/// Where a new password comes from (`user add`, `user passwd`): this file's first line, else
/// `STOA_PASSWORD`, else a prompt. Passwords are at least 8 characters.
#[derive(clap::Args)]
struct PasswordSource {
    /// Read the password from this file (first line) instead of STOA_PASSWORD or a prompt.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Register a user; the password (at least 8 characters) comes from --password-file,
    /// STOA_PASSWORD or a prompt.
    Add {
        name: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Give a user a new password (--password-file, STOA_PASSWORD or a prompt). Its sessions
    /// stay valid: `stoa session kick --user NAME` ends them.
    Passwd {
        name: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Delete a user and its stored sessions (tokens stop working). Connections open on a
    /// running node stay until `stoa session kick --user NAME`.
    Delete { name: String },
    /// List registered users with their creation time (UTC).
    List,
}

#[derive(Subcommand)]
enum RoomCommand {
    /// Create a room homed on this node (in the store).
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
        /// A plugin the room runs: `NAME` or `NAME={"json":"config"}`; repeat for several, in order.
        #[arg(long = "plugin", value_name = "NAME[=JSON]", value_parser = stoa::cli::parse_plugin)]
        plugins: Vec<RoomPlugin>,
    },
    /// Change a room's subject, membership or plugins (through the admin API of the node
    /// hosting it: occupants see the change at once).
    Configure {
        room: String,
        #[arg(long)]
        subject: Option<String>,
        /// Make the room members-only.
        #[arg(long, conflicts_with = "public")]
        members_only: bool,
        /// Make the room public.
        #[arg(long)]
        public: bool,
        /// Replace the room's plugins: `NAME` or `NAME={"json":"config"}`, repeated, in order.
        #[arg(long = "plugin", value_name = "NAME[=JSON]", value_parser = stoa::cli::parse_plugin, conflicts_with = "no_plugins")]
        plugins: Vec<RoomPlugin>,
        /// Remove every plugin of the room.
        #[arg(long)]
        no_plugins: bool,
    },
    /// Destroy a room: its occupants are told, its log and affiliations are deleted (through
    /// the admin API of the node hosting it).
    Destroy {
        room: String,
        /// Told to the occupants in `destroyed`.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List rooms.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u64,
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Show one room.
    Show { room: String },
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Unexpired sessions (of the whole group: the store is shared), with their connections
    /// on the node asked.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// End a session (its id from `session list`) or every session of a user: the tokens stop
    /// working and the connections on the node asked close (1008).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["session", "user"])))]
    Kick {
        /// The session id (16 hex digits, from `stoa session list`).
        session: Option<String>,
        /// Every session of this user instead.
        #[arg(long)]
        user: Option<String>,
    },
}

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

async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let url = settings.store_url();
    let store = Store::connect(&url, 4, &settings.store.sqlite_synchronous)
        .await
        .with_context(|| format!("connecting to {}", stoa::node::redact(&url)))?;
    store.migrate().await.context("running migrations")?;
    Ok(store)
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
                open_store(&settings).await?;
                println!("migrations applied to {}", stoa::node::redact(&settings.store_url()));
                Ok(())
            })
        }
        Command::Config { command: ConfigCommand::Check } => {
            let file = stoa::cli::check_config(config)?;
            println!("ok: {}", file.display());
            Ok(())
        }
        Command::Admin { command, target } => runtime()?.block_on(admin(config, &target, command)),
        Command::User { command } => {
            let settings = load(config)?;
            init_tracing(&settings);
            runtime()?.block_on(user(&settings, command))
        }
        Command::Room { command, target } => runtime()?.block_on(room(config, &target, command)),
        Command::Session { command, target } => runtime()?.block_on(session(config, &target, command)),
        Command::Plugin { command, target } => {
            use stoa::plugin::cli::Op;
            let (op, name) = match command {
                PluginCommand::List { name } => (Op::List, name),
                PluginCommand::Load { name } => (Op::Load, Some(name)),
                PluginCommand::Reload { name } => (Op::Reload, Some(name)),
                PluginCommand::Unload { name } => (Op::Unload, Some(name)),
            };
            let node = AdminApi::new(config, &target)?;
            let answer = runtime()?.block_on(stoa::plugin::cli::run(&node.addr, node.tls.as_ref(), node.token.as_deref().unwrap_or_default(), op, name.as_deref()))?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        Command::Bench(args) => {
            let settings = Settings::default();
            init_tracing(&Settings { log: stoa::config::LogSettings { level: "warn".into(), json: false }, ..settings });
            runtime()?.block_on(stoa::bench::run(args))
        }
    }
}

/// Write a line of the audit log for a verb that changed the store directly.
async fn audit_cli(store: &Store, settings: &Settings, action: &str, target: &str, detail: Value) {
    let entry = stoa::store::audit::AuditEntry {
        node: &settings.node.id,
        actor: &stoa::store::audit::cli_actor(),
        action,
        target,
        detail: detail.as_object().cloned().unwrap_or_default(),
        outcome: "done",
    };
    if let Err(e) = store.audit(&entry).await {
        tracing::warn!(error = %e, "could not write the audit log");
    }
}

async fn user(settings: &Settings, command: UserCommand) -> anyhow::Result<()> {
    let auth = |store: Store| stoa::auth::Auth::new(store, false, settings.auth.session_ttl_s);
    match command {
        UserCommand::Add { name, password } => {
            stoa::auth::validate_user_name(&name)?;
            let password = stoa::cli::password(&name, password.password_file.as_deref())?;
            let store = open_store(settings).await?;
            auth(store.clone()).add_user(&name, &password).await.with_context(|| format!("adding user {name}"))?;
            audit_cli(&store, settings, "user_add", &name, json!({})).await;
            println!("user {name} added");
        }
        UserCommand::Passwd { name, password } => {
            stoa::auth::validate_user_name(&name)?;
            let password = stoa::cli::password(&name, password.password_file.as_deref())?;
            let store = open_store(settings).await?;
            auth(store.clone()).set_password(&name, &password).await.with_context(|| format!("changing the password of {name}"))?;
            audit_cli(&store, settings, "user_passwd", &name, json!({})).await;
            println!("password of {name} changed; its sessions stay valid (`stoa session kick --user {name}` ends them)");
        }
        UserCommand::Delete { name } => {
            stoa::auth::validate_user_name(&name)?;
            let store = open_store(settings).await?;
            let sessions = store.delete_user(&name).await.with_context(|| format!("deleting user {name}"))?;
            let Some(sessions) = sessions else { anyhow::bail!("no user `{name}`") };
            audit_cli(&store, settings, "user_delete", &name, json!({"sessions_ended": sessions})).await;
            println!("user {name} deleted, {sessions} stored session(s) ended");
        }
        UserCommand::List => {
            let store = open_store(settings).await?;
            print!("{}", stoa::cli::users_table(&store.list_users().await?));
        }
    }
    Ok(())
}

async fn room(config: Option<&Path>, target: &AdminTarget, command: RoomCommand) -> anyhow::Result<()> {
    match command {
        RoomCommand::Configure { room, subject, members_only, public, plugins, no_plugins } => {
            let plugins = if no_plugins { Some(Vec::new()) } else { (!plugins.is_empty()).then_some(plugins) };
            let members_only = if members_only { Some(true) } else { public.then_some(false) };
            anyhow::ensure!(
                subject.is_some() || members_only.is_some() || plugins.is_some(),
                "nothing to change: give --subject, --members-only, --public, --plugin or --no-plugins"
            );
            let body = json!({"subject": subject, "members_only": members_only, "plugins": plugins});
            let path = format!("/api/rooms/{}/configure", path_segment(&room));
            let answer = AdminApi::new(config, target)?.call("POST", &path, Some(&body)).await?;
            println!("{}", answer["message"].as_str().unwrap_or("configured"));
        }
        RoomCommand::Destroy { room, reason } => {
            let path = format!("/api/rooms/{}/destroy", path_segment(&room));
            let answer = AdminApi::new(config, target)?.call("POST", &path, Some(&json!({"reason": reason}))).await?;
            println!("{}", answer["message"].as_str().unwrap_or("destroyed"));
        }
        RoomCommand::Create { room, owner, members_only, subject, plugins } => {
            let settings = load(config)?;
            init_tracing(&settings);
            let addr = RoomAddr(room);
            anyhow::ensure!(
                addr.service() == settings.node.service,
                "room {addr} is not on this node's service `{}`",
                settings.node.service
            );
            let cfg = RoomConfig { public: !members_only, subject: subject.unwrap_or_default(), plugins, ..RoomConfig::default() };
            let store = open_store(&settings).await?;
            store.create_room(&addr, &cfg, &owner, &NodeId(settings.node.id.clone())).await.with_context(|| format!("creating {addr}"))?;
            audit_cli(&store, &settings, "room_create", addr.as_str(), json!({"owner": owner, "public": cfg.public})).await;
            println!("room {addr} created, owner {owner}");
        }
        RoomCommand::List { limit, offset } => {
            let settings = load(config)?;
            init_tracing(&settings);
            let store = open_store(&settings).await?;
            println!("{} rooms", store.count_rooms().await?);
            for r in store.list_rooms(offset, limit).await? {
                println!("{}\tlast_seq={}\thost={}\tepoch={}\tpublic={}", r.address, r.last_seq, r.host_node, r.epoch.0, r.config.public);
            }
        }
        RoomCommand::Show { room } => {
            let settings = load(config)?;
            init_tracing(&settings);
            let store = open_store(&settings).await?;
            let row = store.load_room(&RoomAddr(room.clone())).await?.with_context(|| format!("no room {room}"))?;
            let affs = store.load_affiliations(row.id).await?;
            let out = json!({
                "room": row.address, "last_seq": row.last_seq, "home_node": row.home_node.0,
                "host_node": row.host_node.0, "epoch": row.epoch.0, "created_at": stoa::clock::iso_utc(row.created_at),
                "config": row.config.public_view(), "affiliations": affs,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}

async fn session(config: Option<&Path>, target: &AdminTarget, command: SessionCommand) -> anyhow::Result<()> {
    let node = AdminApi::new(config, target)?;
    match command {
        SessionCommand::List { user, json } => {
            let path = match &user {
                Some(u) => {
                    stoa::auth::validate_user_ref(u)?;
                    format!("/api/sessions?user={}", path_segment(u))
                }
                None => "/api/sessions".to_owned(),
            };
            let answer = node.call("GET", &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", stoa::cli::sessions_table(answer["sessions"].as_array().map_or(&[][..], Vec::as_slice)));
            }
        }
        SessionCommand::Kick { session, user } => {
            let path = match (session, user) {
                (Some(id), None) => {
                    stoa::auth::validate_session_id(&id).map_err(anyhow::Error::msg)?;
                    format!("/api/sessions/{id}/kick")
                }
                (None, Some(u)) => {
                    stoa::auth::validate_user_ref(&u)?;
                    format!("/api/users/{}/kick", path_segment(&u))
                }
                _ => anyhow::bail!("give a session id or --user, not both"),
            };
            let answer = node.call("POST", &path, None).await?;
            println!("{}", answer["message"].as_str().unwrap_or("done"));
        }
    }
    Ok(())
}

/// `s` percent-encoded as one URL path segment or query value (the node decodes it and
/// validates what it names).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'@' | b'.' | b'_' | b'-' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running node's admin API, as the config or the flags name it.
struct AdminApi {
    addr: String,
    tls: Option<stoa::admin_client::AdminTls>,
    token: Option<String>,
}

impl AdminApi {
    /// From `--admin`/`--ca`/`--token`, defaulting to the config (loaded unless `--admin` is
    /// given without one).
    fn new(config: Option<&Path>, target: &AdminTarget) -> anyhow::Result<AdminApi> {
        let settings = match (&target.admin, config) {
            (Some(_), None) => None,
            _ => Some(load(config)?),
        };
        let admin = target.admin.clone().unwrap_or_else(|| settings.as_ref().map(|s| s.listen.admin.to_string()).unwrap_or_default());
        let ca = target.ca.clone().or_else(|| settings.as_ref().and_then(|s| s.tls.ca_file.clone()));
        let tls_by_default = settings.as_ref().is_some_and(|s| s.tls.enabled());
        let (addr, tls) = stoa::admin_client::target(&admin, tls_by_default, ca.as_deref())?;
        let token = target.token.clone().or_else(|| settings.as_ref().map(|s| s.auth.admin_token.clone()));
        Ok(AdminApi { addr, tls, token })
    }

    /// The raw answer to `method path` (with a JSON body, if any).
    async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<stoa::admin_client::Answer> {
        let timeout = std::time::Duration::from_secs(60);
        let token = self.token.as_deref();
        match body {
            Some(b) => stoa::admin_client::request_json(&self.addr, self.tls.as_ref(), method, path, token, b, timeout).await,
            None => stoa::admin_client::request_with(&self.addr, self.tls.as_ref(), method, path, token, timeout).await,
        }
    }

    /// The JSON answer to `method path`; a status other than 200 is an error with the node's reason.
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let answer = self.request(method, path, body).await?;
        refusal(&answer)?;
        Ok(answer.json())
    }
}

/// A non-200 answer as an error: `code (status): message`.
fn refusal(answer: &stoa::admin_client::Answer) -> anyhow::Result<()> {
    if answer.status == 200 {
        return Ok(());
    }
    let json = answer.json();
    let message = json["message"].as_str().map(str::to_owned).unwrap_or(answer.body.clone());
    anyhow::bail!("{} ({}): {message}", json["error"].as_str().unwrap_or("error"), answer.status)
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

async fn admin(config: Option<&Path>, target: &AdminTarget, command: AdminCommand) -> anyhow::Result<()> {
    let node = AdminApi::new(config, target)?;
    let answer = match &command {
        AdminCommand::Status { .. } => node.request("GET", "/api/topology", None).await?,
        AdminCommand::Node { node: n } => node.request("GET", &format!("/api/nodes/{n}"), None).await?,
        AdminCommand::Failover { node: n } => node.request("POST", &format!("/api/nodes/{n}/failover"), None).await?,
        AdminCommand::Fallback { node: n } => node.request("POST", &format!("/api/nodes/{n}/fallback"), None).await?,
        AdminCommand::Service { action, service, node: n } => node.request("POST", &format!("/api/nodes/{n}/services/{service}/{action}"), None).await?,
        AdminCommand::Audit { limit, .. } => node.request("GET", &format!("/api/audit?limit={limit}"), None).await?,
        AdminCommand::TlsReload => node.request("POST", "/api/tls/reload", None).await?,
    };
    refusal(&answer)?;
    let json = answer.json();
    match &command {
        AdminCommand::Status { json: false } => print_status(&json),
        AdminCommand::Failover { .. } | AdminCommand::Fallback { .. } | AdminCommand::Service { .. } | AdminCommand::TlsReload => {
            println!("{}", json["message"].as_str().unwrap_or(&answer.body));
        }
        AdminCommand::Audit { format, .. } if format == "table" => {
            print!("{}", stoa::cli::audit_table(json["entries"].as_array().map_or(&[][..], Vec::as_slice)));
        }
        _ => println!("{}", serde_json::to_string_pretty(&json).unwrap_or(answer.body.clone())),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `--config` goes before or after the verb (docs write `stoa plugin load NAME --config F`).
    #[test]
    fn config_is_accepted_before_and_after_the_verb() {
        for args in [
            &["stoa", "--config", "f.toml", "admin", "status"][..],
            &["stoa", "admin", "status", "--config", "f.toml"],
            &["stoa", "plugin", "load", "wf", "--config", "f.toml"],
            &["stoa", "user", "list", "-c", "f.toml"],
            &["stoa", "serve", "--config", "f.toml"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.config.as_deref(), Some(Path::new("f.toml")), "{args:?}");
        }
        assert!(Cli::try_parse_from(["stoa", "session", "kick"]).is_err(), "a kick names a session or a user");
        assert!(Cli::try_parse_from(["stoa", "room", "configure", "r@s", "--public", "--members-only"]).is_err());
    }
}
