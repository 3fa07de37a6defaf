//! The `stoa` command line: the verbs' arguments ([`Cli`]) and what they do, one module per verb
//! group (`cli::user`, `cli::room`, `cli::session`, `cli::admin`, `cli::db`); `main.rs` parses, runs the
//! node (`serve`) and dispatches here. Also: error text with each cause once, loading settings
//! with the file named, `stoa config check`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub mod admin;
pub mod db;
pub mod room;
pub mod session;
pub mod user;

use crate::protocol::RoomPlugin;

#[derive(Parser)]
#[command(name = "stoa", version, about = "Persistent chat rooms on a SQL store")]
pub struct Cli {
    /// TOML config file, before or after the verb (default: $STOA_CONFIG; none = dev mode).
    /// Relative paths in it resolve against its folder; `STOA__SECTION__KEY` variables override it.
    #[arg(long, short, global = true, env = "STOA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
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
    /// Stores: merge several into one (`db merge`, a validated, resumable job; docs/merge.md)
    /// and the merge jobs a store records (`db jobs`, `db job ID`).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Load generator and benchmarks (see docs/benchmarks.md).
    Bench(crate::bench::BenchArgs),
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
pub struct AdminTarget {
    /// The node's admin address: `host:port`, `http://…` or `https://…` (default:
    /// `listen.admin` of the config, https when it has `[tls]`).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub admin: Option<String>,
    /// PEM trust anchors for an https admin API (default: `tls.ca_file` of the config, else
    /// the Mozilla roots).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Admin bearer token (default: `auth.admin_token` of the config).
    #[arg(long, global = true, env = "STOA_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Load the config file as `stoa serve` would (parse, unknown keys, values, secret files,
    /// TLS files, the start-up checks); prints `ok: FILE` or the error, and exits non-zero on error.
    Check,
}

#[derive(Subcommand)]
pub enum PluginCommand {
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
pub enum AdminCommand {
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
pub struct PasswordSource {
    /// Read the password from this file (first line) instead of STOA_PASSWORD or a prompt.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Register a user; the password (at least 8 characters) comes from --password-file,
    /// STOA_PASSWORD or a prompt.
    Add {
        name: String,
        #[command(flatten)]
        password: PasswordSource,
        /// The node of this node's group the user logs in on (default: assigned at its first
        /// login, docs/clusters.md).
        #[arg(long)]
        home: Option<String>,
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
    /// Make NODE (a node of this node's group, whose store has the account) the user's home
    /// node; its next login is served there (docs/clusters.md, *Users' home nodes*).
    Home { name: String, node: String },
}

#[derive(Subcommand)]
pub enum RoomCommand {
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
        #[arg(long = "plugin", value_name = "NAME[=JSON]", value_parser = room::parse_plugin)]
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
        #[arg(long = "plugin", value_name = "NAME[=JSON]", value_parser = room::parse_plugin, conflicts_with = "no_plugins")]
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
pub enum DbCommand {
    /// Merge the sources into the target: validate, plan, copy in chunks recorded in the
    /// target (resumable with --job), verify every room. The nodes on every store must be
    /// stopped. Exits non-zero on any refusal or failure.
    Merge(DbMerge),
    /// The merge jobs recorded in a store (default: the config's `[store] url`).
    Jobs {
        /// The store to read (a store URL).
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// One merge job: its state, counts, validation report, conflicts, verification, error.
    Job {
        id: String,
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
}

/// `stoa db merge`'s arguments.
#[derive(clap::Args)]
pub struct DbMerge {
    /// A store to merge (`sqlite://PATH`, `postgres://…`, `mysql://…`): once per store, in
    /// order (an earlier source wins ties in time). Never written.
    #[arg(long, required = true, value_name = "URL")]
    pub source: Vec<String>,
    /// The store to merge into.
    #[arg(long, value_name = "URL")]
    pub target: String,
    /// Show what would be merged and every conflict with the rule that applies; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Validate the stores only; write nothing.
    #[arg(long, conflicts_with = "dry_run")]
    pub validate: bool,
    /// A conflict rule, KIND=RULE, repeatable: rooms=union|rename|refuse (default union),
    /// users=refuse|newer (refuse), affiliations=stronger|refuse (stronger),
    /// messages=once|refuse (once).
    #[arg(long, value_name = "KIND=RULE")]
    pub on_conflict: Vec<String>,
    /// Do not ask before writing (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Resume this job (or confirm it finished); it keeps the conflict rules it started with.
    #[arg(long, value_name = "ID")]
    pub job: Option<String>,
    /// Bring the target to this binary's schema first (the sources are never migrated).
    #[arg(long)]
    pub migrate_target: bool,
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    pub format: String,
    /// Messages per chunk (one transaction of the target each).
    #[arg(long, default_value_t = crate::merge::DEFAULT_CHUNK_ROWS, hide = true)]
    pub chunk_rows: usize,
    /// A pause after each chunk, in ms (tests kill a merge in the middle).
    #[arg(long, default_value_t = 0, hide = true)]
    pub chunk_pause_ms: u64,
}

#[derive(Subcommand)]
pub enum SessionCommand {
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

/// What every verb gets from `main`: the config file, and how to start logging once the
/// settings are known (the binary owns the subscriber).
pub struct Env<'a> {
    pub config: Option<&'a Path>,
    pub init_tracing: &'a dyn Fn(&crate::config::Settings),
}

impl Env<'_> {
    /// The settings (see [`load_settings`]), with logging started.
    pub fn settings(&self) -> anyhow::Result<crate::config::Settings> {
        let settings = load_settings(self.config)?;
        (self.init_tracing)(&settings);
        Ok(settings)
    }
}

/// An error and its causes on one line, `outer: cause: root`, each cause once. Errors that
/// print their source in their own message (`configuration: <the crate's error>`) would
/// otherwise repeat it: a cause whose text the line already holds is left out.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Settings from `file` (or dev mode without one). The error is one line that names the file
/// once: config errors spell their causes out in their own text.
pub fn load_settings(file: Option<&Path>) -> anyhow::Result<crate::config::Settings> {
    crate::config::Settings::load(file).map_err(|e| {
        let text = e.to_string();
        // `Values` names its origin (the file or the environment) itself.
        let named = matches!(e, crate::config::ConfigError::Values { .. });
        match file {
            Some(f) if !named && !text.contains(&f.display().to_string()) => anyhow::anyhow!("{}: {text}", f.display()),
            Some(_) => anyhow::anyhow!(text),
            None => anyhow::anyhow!("settings (dev mode, no config file): {text}"),
        }
    })
}

/// Connect to the store of `settings` and apply pending migrations.
pub async fn open_store(settings: &crate::config::Settings) -> anyhow::Result<crate::store::Store> {
    let url = settings.store_url();
    let store = crate::store::Store::connect(&url, 4, &settings.store.sqlite_synchronous)
        .await
        .with_context(|| format!("connecting to {}", crate::node::redact(&url)))?;
    store.migrate().await.context("running migrations")?;
    Ok(store)
}

/// `stoa config check`: load `file` as `stoa serve` would (parse, unknown keys, values,
/// secret files, the start-up checks) and read the TLS files; returns the file checked.
pub fn check_config(file: Option<&Path>) -> anyhow::Result<PathBuf> {
    let file = file.context("no config file to check: give --config FILE or set STOA_CONFIG")?;
    let settings = load_settings(Some(file))?;
    settings.check_tls_files().map_err(|e| anyhow::anyhow!("{}: [tls]: {e}", file.display()))?;
    Ok(file.to_path_buf())
}

/// A JSON value as a table cell: strings bare, `null` as `-`.
pub(crate) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// A cause that the message above it already spells out is printed once.
    #[test]
    fn each_cause_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read secret file /x: {source}")]
        struct Secret {
            source: std::io::Error,
        }
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let e = anyhow::Error::new(Secret { source: io }).context("loading settings");
        assert_eq!(error_text(&e), "loading settings: cannot read secret file /x: No such file or directory (os error 2)");
        let plain = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(error_text(&plain), "top: middle: root");
    }

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
