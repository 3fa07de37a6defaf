//! Settings: defaults → TOML file → environment (`STOA__SECTION__KEY`), through the `config` crate.
//!
//! With no file the node runs in *dev mode*: one node, SQLite under `./stoa-data`, loopback
//! listeners and guest login. [`Settings::check`] refuses to start a node that would expose
//! guest login (or an admin API without a token) on anything but loopback, and a listener off
//! loopback without TLS unless that listener's `*_insecure` flag says so.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why settings could not be loaded or are unsafe to run with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment override could not be read or parsed.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A secret file named by a `*_file` key could not be read.
    #[error("cannot read secret file {path}: {source}")]
    SecretFile { path: PathBuf, source: std::io::Error },
    /// The settings are consistent but unsafe or contradictory.
    #[error("{0}")]
    Invalid(String),
    /// The file's (or the environment's) values do not fit the settings: an unknown key, a
    /// wrong type. `origin` names where the value came from.
    #[error("{origin}: {source}")]
    Values { origin: String, source: config::ConfigError },
}

/// Where dev mode (no config file) serves XMPP clients.
pub const XMPP_DEV_C2S: &str = "127.0.0.1:5222";

/// Everything a node needs to run.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// True when no config file was given (dev mode: loopback only, guests allowed).
    #[serde(skip)]
    pub dev_mode: bool,
    pub node: NodeSettings,
    pub listen: ListenSettings,
    pub store: StoreSettings,
    pub committer: CommitterSettings,
    pub rooms: RoomSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub log: LogSettings,
    pub cluster: ClusterSettings,
    pub plugins: crate::plugin::settings::PluginSettings,
    pub tls: TlsSettings,
    pub xmpp: XmppSettings,
    pub web: WebSettings,
}

/// The pages built into the binary (docs/operations.md, "Console" and "Chat page").
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSettings {
    /// Serve the operators' console at `/` of the admin listener.
    pub console: bool,
    /// Serve the chat page at `/` of the client listener; unset = only in dev mode.
    pub chat: Option<bool>,
    /// A console session ends this long after its sign-in.
    pub console_session_ttl_s: u64,
}

impl Default for WebSettings {
    fn default() -> Self {
        WebSettings { console: true, chat: None, console_session_ttl_s: 12 * 3600 }
    }
}

impl WebSettings {
    /// Whether the client listener serves the chat page (`chat`, else dev mode).
    pub fn chat_enabled(&self, dev_mode: bool) -> bool {
        self.chat.unwrap_or(dev_mode)
    }
}

/// XMPP for clients (docs/xmpp.md): users log in as `user@domain`; rooms are
/// `name@node.service` (the MUC service).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct XmppSettings {
    /// The XMPP domain of this node's users (`ann@localhost`).
    pub domain: String,
    /// The client-to-server listener (RFC 6120 over TCP, STARTTLS when `[tls]` is set); unset:
    /// no c2s listener. Dev mode (no config file) listens on `127.0.0.1:5222`.
    pub c2s: Option<SocketAddr>,
    /// Let the c2s listener serve without TLS on a non-loopback address (no `[tls]`).
    pub c2s_insecure: bool,
    /// A second client-to-server listener speaking TLS from the first byte (XEP-0368 direct
    /// TLS, conventionally port 5223), with the `[tls]` certificate; unset: none.
    pub c2s_tls: Option<SocketAddr>,
    /// Longest stanza in bytes (a longer one ends the stream with `policy-violation`).
    pub max_stanza_bytes: usize,
    /// Deepest element nesting of a stanza.
    pub max_depth: usize,
    /// How long a session that enabled stream management resumption (XEP-0198) waits for
    /// its client after the connection drops.
    pub resume_timeout_s: u64,
    /// Serve the rooms as an external component (XEP-0114) of another XMPP server.
    pub component: Option<ComponentSettings>,
}

impl Default for XmppSettings {
    fn default() -> Self {
        XmppSettings {
            domain: "localhost".into(),
            c2s: None,
            c2s_insecure: false,
            c2s_tls: None,
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            resume_timeout_s: 300,
            component: None,
        }
    }
}

/// Stoa as the MUC service of an existing XMPP server (Prosody, ejabberd): an external
/// component (XEP-0114) that the server's users, and federated servers' users, reach at
/// `domain` (docs/xmpp.md, "Stoa behind Prosody / ejabberd").
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComponentSettings {
    /// The server's component port (`host:port`, e.g. `127.0.0.1:5347`).
    pub server: String,
    /// The component's domain: this node's room service (`node.service`), which is what the
    /// server must route to Stoa. Empty: `node.service`.
    pub domain: String,
    /// The component secret the server was given for `domain`.
    pub secret: String,
    /// A file holding `secret` (first line), instead of `secret`.
    pub secret_file: Option<PathBuf>,
    /// Dial the component port with TLS (direct TLS, as ejabberd's `ejabberd_service` offers
    /// with `tls: true`), verifying the server's certificate for the host of `server` against
    /// `tls.ca_file` (or the Mozilla roots).
    pub tls: bool,
    /// Allow a plaintext link (`tls = false`) to a `server` off loopback: the secret itself
    /// never travels, only a SHA-1 of it with the stream id, but every stanza does.
    pub insecure: bool,
}

impl ComponentSettings {
    /// `server` is a loopback address (`127.0.0.0/8`, `::1`, `localhost`).
    pub fn server_is_loopback(&self) -> bool {
        let host = self.server.rsplit_once(':').map_or(self.server.as_str(), |(h, _)| h).trim_matches(['[', ']']);
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// TLS for every listener (client `wss://`, admin `https://`, node link `wss://`) and the trust
/// anchors this node's dialers use. Relative paths resolve like every path of the settings
/// (see [`Settings::load`]).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first. With `key_file`, every listener speaks TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the leaf (PKCS#8, RSA or EC).
    pub key_file: Option<PathBuf>,
    /// PEM trust anchors for what this node (and `stoa admin`) dials: the peer's node link, the
    /// admin API. Unset = the Mozilla roots (`webpki-roots`).
    pub ca_file: Option<PathBuf>,
}

impl TlsSettings {
    /// Whether the listeners speak TLS (a certificate and a key are configured).
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }
}

/// A listener that serves plaintext on a non-loopback address (see [`Settings::plaintext_exposed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaintextListener {
    /// `client`, `admin` or `node link`.
    pub listener: &'static str,
    /// The address it binds.
    pub addr: String,
    /// The key that allows it (`listen.client_insecure`, ...).
    pub insecure_key: &'static str,
    /// Whether that key is set.
    pub allowed: bool,
}

/// The cluster topology: redundancy groups (pairs) of nodes. Empty = a standalone node.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// Shared secret that authenticates node links (required when any group has `ha = true`).
    pub secret: String,
    pub secret_file: Option<PathBuf>,
    pub groups: Vec<GroupSettings>,
    /// Other clusters whose users may use this cluster's rooms, and whose rooms this
    /// cluster's users may use (docs/clusters.md, "Between clusters").
    pub peering: Vec<PeeringSettings>,
    /// Let the node link listen in plaintext on a non-loopback address (no `[tls]`): only on a
    /// network that is itself encrypted and private to the pair.
    pub link_insecure: bool,
    /// A node's lease lasts this long on the database clock after each renewal.
    pub lease_ttl_ms: u64,
    /// How often a node renews its lease.
    pub lease_renew_ms: u64,
    /// How often a node sends its peer a heartbeat over the node link; three missed = down.
    pub heartbeat_ms: u64,
    /// A critical service (`rooms`, `router`, `store`) down this long makes the node fail over
    /// to its peer (Cisco uses 90 s; 5 s is the default here).
    pub critical_service_down_delay_ms: u64,
    /// Fall back automatically once the failed-over node has been healthy this long
    /// (Cisco uses 30 minutes); 0 = fallback only on an admin's request.
    pub auto_fallback_after_s: u64,
    /// Users' home nodes by user name (`ann = "1b"`), for users without one when they log in;
    /// the node must be of the group whose store has the account (docs/clusters.md).
    pub homes: std::collections::BTreeMap<String, String>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            secret: String::new(),
            secret_file: None,
            groups: Vec::new(),
            peering: Vec::new(),
            link_insecure: false,
            lease_ttl_ms: 5000,
            lease_renew_ms: 1000,
            heartbeat_ms: 500,
            critical_service_down_delay_ms: 5000,
            auto_fallback_after_s: 0,
            homes: Default::default(),
        }
    }
}

/// One redundancy group: one node, or two that back each other up and share one store.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupSettings {
    pub name: String,
    /// Automatic failover between the two nodes (needs a PostgreSQL or MySQL/MariaDB store).
    pub ha: bool,
    pub nodes: Vec<PeerSettings>,
}

/// Another cluster this one peers with: its nodes, reached over node links keyed by a secret of
/// the peering's own (not either cluster's). Its users reach this cluster's rooms, and this
/// cluster's users its rooms; nothing else (no admin requests, no takeovers).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeeringSettings {
    /// The other cluster's name: its users appear here as `user@NAME`.
    pub name: String,
    /// The peering's shared secret (at least 16 characters; the same in both clusters' entries).
    pub secret: String,
    pub secret_file: Option<PathBuf>,
    /// The other cluster's nodes (`id`, `client`, `link`, `service`; `xmpp` unused).
    pub nodes: Vec<PeerSettings>,
}

/// How the cluster reaches one node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PeerSettings {
    pub id: String,
    /// The client WebSocket URL, as clients should dial it (`ws://host:port/ws`).
    pub client: String,
    /// The node-link address (`host:port`).
    pub link: String,
    /// The node's room service alias.
    pub service: String,
    /// The node's XMPP client-to-server address as clients should dial it (`host:port`),
    /// named in `see-other-host` when XMPP sessions must move to it. Empty: clients are sent
    /// to the host of `client` and keep their own XMPP port.
    pub xmpp: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSettings {
    /// This node's id; rooms record it as `home_node` / `host_node`, so keep it stable.
    pub id: String,
    /// Room service alias: rooms of this node are `name@service`.
    pub service: String,
    /// Where SQLite and other local state live.
    pub data_dir: PathBuf,
    /// Threads of the I/O runtime (node-link and XMPP c2s sockets, the store's connections, the
    /// committer); 0 = half the cores, at least one ([`crate::node`]).
    pub io_threads: usize,
    /// Run WebSocket client connections on the room arbiters (true, the default: no thread
    /// crossing between a connection and its rooms) or on the I/O runtime (false: no crossing
    /// between a connection and the node link, for clusters whose users are mostly in other
    /// groups' rooms). docs/operations.md has the measured difference.
    pub client_connections_on_arbiters: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenSettings {
    /// WebSocket listener for clients (`/ws`).
    pub client: SocketAddr,
    /// Admin HTTP listener (`/health`, `/api/...`, `/metrics`).
    pub admin: SocketAddr,
    /// Let the client listener serve plaintext `ws://` on a non-loopback address (no `[tls]`),
    /// e.g. behind a TLS-terminating proxy.
    pub client_insecure: bool,
    /// Let the admin listener serve plaintext `http://` on a non-loopback address (no `[tls]`).
    pub admin_insecure: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `sqlite://path`, `postgres://...` or `mysql://...`. Empty = `sqlite://{data_dir}/stoa.db`.
    pub url: String,
    /// Read the URL from this file instead (keeps passwords out of the config).
    pub url_file: Option<PathBuf>,
    pub max_connections: u32,
    /// SQLite `synchronous`: `full` (default, durable on power loss) or `normal`.
    pub sqlite_synchronous: String,
    /// Run migrations at start-up.
    pub migrate_on_start: bool,
    /// SQLite: how long a writer waits for the database lock before the write fails.
    pub sqlite_busy_timeout_ms: u64,
    /// PostgreSQL / MariaDB: the server ends a session of this node that sits in an open
    /// transaction this long (`idle_in_transaction_session_timeout` /
    /// `idle_transaction_timeout`). A paused node (SIGSTOP, VM freeze) cannot then hold room
    /// rows locked against its peer's takeover for longer than this. 0 = off.
    pub idle_in_transaction_timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommitterSettings {
    /// Flush a batch when it holds this many message rows.
    pub max_batch_rows: usize,
    /// Gather for up to this long before sending a batch (0 = send as soon as a transaction
    /// slot is free; batches still grow while all slots are busy).
    pub max_batch_delay_us: u64,
    /// Transactions in flight at once (forced to 1 on SQLite, which has one writer).
    pub max_in_flight: usize,
    /// PostgreSQL: while a transaction is in flight, a further one starts only with a batch of
    /// at least this many rows (capped at `max_batch_rows`); a smaller batch keeps filling until
    /// a transaction ends. With no transaction in flight a batch goes at once, whatever its
    /// size. 1 = start one whenever a slot is free (always so on MariaDB and SQLite).
    pub overlap_min_rows: usize,
    /// ...but once the oldest transaction in flight has run this long, a batch of any size
    /// starts beside it (a slow or blocked transaction holds the others back no longer; 0 =
    /// none waits).
    pub overlap_after_us: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomSettings {
    /// Passivate an active room after this long with no occupants and no traffic.
    pub passivate_after_ms: u64,
    /// Arbiter threads for room actors; 0 = the cores the I/O threads leave, at least one.
    pub arbiters: usize,
    /// Most messages replayed on a `join` with `since` before `truncated` is set.
    pub join_replay_limit: u32,
    /// Largest `limit` a `history` request may ask for.
    pub history_max_limit: u32,
    /// Node-wide cap on occupants per room (a room's `max_occupants` may only lower it).
    pub max_occupants: u32,
    /// Recent messages each active room keeps in memory to serve joins without the store.
    pub recent_cache: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Allow `hello` with a user name and no password (not for registered names).
    pub allow_guests: bool,
    /// Bearer token for the admin API; empty = admin API open (refused off loopback).
    pub admin_token: String,
    pub admin_token_file: Option<PathBuf>,
    /// Session tokens expire after this long.
    pub session_ttl_s: u64,
    /// Failed logins allowed per user name (across connections) per `login_failure_window_s`;
    /// then logins for that name are refused with `rate_limited` until the budget refills.
    pub login_failures_per_user: u32,
    /// The same per source address, over every user name it tries.
    pub login_failures_per_address: u32,
    pub login_failure_window_s: u64,
    /// Logins a node serves per second (a re-login storm after a failover); over it a login is
    /// refused with `rate_limited` and a `retry_after_ms` (docs/clusters.md). 0 = no bound.
    pub logins_per_second: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    pub max_frame_bytes: usize,
    pub max_body_bytes: usize,
    pub max_nick_chars: usize,
    pub max_room_name_chars: usize,
    pub max_cid_chars: usize,
    pub max_rooms_per_connection: usize,
    /// Token bucket per connection: sustained requests per second ...
    pub requests_per_second: u32,
    /// ... and burst size.
    pub request_burst: u32,
    /// A connection that sends nothing for this long gets a ping; twice this, it is closed.
    pub idle_timeout_ms: u64,
    /// A connection must send `hello` within this long.
    pub hello_timeout_ms: u64,
    /// Frames queued for one connection; a connection that lets it fill is disconnected.
    pub outbound_queue: usize,
    /// Max connections the client listener accepts at once (a slot is taken once a whole
    /// WebSocket upgrade request has arrived).
    pub max_connections: usize,
    /// Connections that may be in their handshake (TCP accepted, upgrade not done) at once;
    /// more are closed at accept.
    pub max_pending_handshakes: usize,
    /// A connection must complete its WebSocket upgrade within this long.
    pub handshake_timeout_ms: u64,
    /// Rooms one user may create per hour (a budget that refills continuously) ...
    pub rooms_created_per_user_per_hour: u32,
    /// ... and one source address, over every user it logs in as.
    pub rooms_created_per_address_per_hour: u32,
    /// Largest answer a request gets, in bytes of JSON: `history` and `list` pages stop
    /// before it and say `truncated`.
    pub max_answer_bytes: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `tracing` filter directive, e.g. `info,stoa=debug`.
    pub level: String,
    pub json: bool,
    /// `stoa serve` appends its log lines to this file instead of stderr, and opens it again on
    /// SIGHUP (after logrotate renamed it). Unset or empty: stderr.
    pub file: Option<PathBuf>,
}


/// Most threads `node.io_threads` or `rooms.arbiters` may ask for: more is a typo, not a tuning.
const MAX_THREADS: usize = 1024;

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            id: "local".into(),
            service: "conference.localhost".into(),
            data_dir: PathBuf::from("./stoa-data"),
            io_threads: 0,
            client_connections_on_arbiters: true,
        }
    }
}

impl Default for ListenSettings {
    fn default() -> Self {
        ListenSettings {
            client: "127.0.0.1:7450".parse().expect("literal address"),
            admin: "127.0.0.1:7451".parse().expect("literal address"),
            client_insecure: false,
            admin_insecure: false,
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            url: String::new(),
            url_file: None,
            max_connections: 16,
            sqlite_synchronous: "full".into(),
            migrate_on_start: true,
            sqlite_busy_timeout_ms: 10_000,
            idle_in_transaction_timeout_ms: 5_000,
        }
    }
}

impl Default for CommitterSettings {
    fn default() -> Self {
        CommitterSettings { max_batch_rows: 1000, max_batch_delay_us: 0, max_in_flight: 4, overlap_min_rows: 64, overlap_after_us: 10_000 }
    }
}

impl Default for RoomSettings {
    fn default() -> Self {
        RoomSettings {
            passivate_after_ms: 120_000,
            arbiters: 0,
            join_replay_limit: 500,
            history_max_limit: 500,
            max_occupants: 10_000,
            recent_cache: 64,
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            allow_guests: false,
            admin_token: String::new(),
            admin_token_file: None,
            session_ttl_s: 7 * 24 * 3600,
            login_failures_per_user: 5,
            login_failures_per_address: 30,
            login_failure_window_s: 60,
            logins_per_second: 0,
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024,
            max_nick_chars: 32,
            max_room_name_chars: 64,
            max_cid_chars: 128,
            max_rooms_per_connection: 100,
            requests_per_second: 100,
            request_burst: 200,
            idle_timeout_ms: 60_000,
            hello_timeout_ms: 10_000,
            outbound_queue: 4096,
            max_connections: 15_000,
            max_pending_handshakes: 1024,
            handshake_timeout_ms: 5_000,
            max_answer_bytes: 256 * 1024,
            rooms_created_per_user_per_hour: 100,
            rooms_created_per_address_per_hour: 500,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { level: "info".into(), json: false, file: None }
    }
}

/// Refuse a TOML file whose top-level keys are not plain names before the `config` crate reads
/// it: the crate takes a top-level key for a path, and an index in one (`"a[9999999999]" = 1`,
/// found by the `config` fuzz target) makes it allocate that many entries, which aborts the
/// process. Every section name is plain; a file that is not TOML is the crate's to report.
fn plain_top_level_keys(text: &str) -> Result<(), ConfigError> {
    let Ok(table) = toml::de::DeTable::parse(text) else { return Ok(()) };
    let plain = |key: &str| !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match table.get_ref().keys().find(|key| !plain(key.get_ref())) {
        Some(key) => Err(ConfigError::Invalid(format!(
            "top-level key `{}` is not a section name (letters, digits, _ and -); write nested keys as TOML tables",
            key.get_ref().escape_debug()
        ))),
        None => Ok(()),
    }
}

/// Whether the environment sets `name` (the `config` crate matches names without regard to case).
fn env_sets(name: &str) -> bool {
    std::env::vars_os().any(|(k, _)| k.to_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
}

/// `path` against `base` when it is relative and not empty (empty = unset, or "the default
/// under data_dir").
fn resolve_against(base: &Path, path: &mut PathBuf) {
    if !path.as_os_str().is_empty() && path.is_relative() {
        let relative = path.strip_prefix(".").unwrap_or(path);
        *path = base.join(relative);
    }
}

/// A `sqlite://` URL with a relative path, made relative to `base`; any other URL unchanged.
fn resolve_sqlite_url(base: &Path, url: &str) -> String {
    for prefix in ["sqlite://", "sqlite:"] {
        if let Some(rest) = url.strip_prefix(prefix) {
            let (path, query) = rest.split_once('?').map_or((rest, None), |(p, q)| (p, Some(q)));
            if path.is_empty() || path == ":memory:" || Path::new(path).is_absolute() {
                return url.to_owned();
            }
            let joined = base.join(path);
            return match query {
                Some(q) => format!("sqlite://{}?{q}", joined.display()),
                None => format!("sqlite://{}", joined.display()),
            };
        }
    }
    url.to_owned()
}

impl Settings {
    /// Load settings: defaults, then `file` (if any), then `STOA__SECTION__KEY` variables.
    /// Without a file the node is in dev mode (guests allowed, loopback only).
    ///
    /// With a file, every relative path (`node.data_dir`, the `*_file` keys, the plugin
    /// directories, a `sqlite://` store URL), whether written in the file or left at its
    /// default, resolves against the file's folder, so the node finds them whatever its
    /// working directory. A relative path given by an environment variable resolves against
    /// the working directory, as do all paths in dev mode.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            // An unreadable file is the config crate's to report, with its name.
            if let Ok(text) = std::fs::read_to_string(file) {
                plain_top_level_keys(&text)?;
            }
            builder = builder.add_source(config::File::from(file).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("STOA")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let mut settings: Settings = match builder.build().and_then(|c| c.try_deserialize()) {
            Ok(s) => s,
            Err(e) => return Err(Settings::origin_of(file, e)),
        };
        if let Some(file) = file {
            let folder = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            // Absolute, so that logs and errors say where a file was looked for.
            let folder = std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf());
            settings.resolve_paths(&folder, env_sets);
        }
        Settings::finish(settings, file.is_none())
    }

    /// Make the relative paths that did not come from the environment (`from_env` says which
    /// variables are set) relative to `base`.
    fn resolve_paths(&mut self, base: &Path, from_env: impl Fn(&str) -> bool) {
        let resolve = |var: &str, path: &mut PathBuf| {
            if !from_env(var) {
                resolve_against(base, path);
            }
        };
        resolve("STOA__NODE__DATA_DIR", &mut self.node.data_dir);
        resolve("STOA__PLUGINS__DIR", &mut self.plugins.dir);
        resolve("STOA__PLUGINS__CACHE_DIR", &mut self.plugins.cache_dir);
        let optional = [
            ("STOA__STORE__URL_FILE", &mut self.store.url_file),
            ("STOA__AUTH__ADMIN_TOKEN_FILE", &mut self.auth.admin_token_file),
            ("STOA__CLUSTER__SECRET_FILE", &mut self.cluster.secret_file),
            ("STOA__TLS__CERT_FILE", &mut self.tls.cert_file),
            ("STOA__TLS__KEY_FILE", &mut self.tls.key_file),
            ("STOA__TLS__CA_FILE", &mut self.tls.ca_file),
            ("STOA__LOG__FILE", &mut self.log.file),
        ];
        for (var, path) in optional {
            if let Some(path) = path {
                resolve(var, path);
            }
        }
        if let Some(path) = self.xmpp.component.as_mut().and_then(|c| c.secret_file.as_mut()) {
            resolve("STOA__XMPP__COMPONENT__SECRET_FILE", path);
        }
        for path in self.cluster.peering.iter_mut().filter_map(|p| p.secret_file.as_mut()) {
            resolve_against(base, path);
        }
        if !from_env("STOA__STORE__URL") {
            self.store.url = resolve_sqlite_url(base, &self.store.url);
        }
    }

    /// Which source a deserialization error comes from: the file when the file alone fails
    /// too, else the environment.
    fn origin_of(file: Option<&Path>, e: config::ConfigError) -> ConfigError {
        let named = file.is_some_and(|f| e.to_string().contains(&f.display().to_string()));
        if named || matches!(e, config::ConfigError::NotFound(_) | config::ConfigError::FileParse { .. } | config::ConfigError::Foreign(_)) {
            return ConfigError::Load(e);
        }
        let file_alone = file.map(|f| {
            config::Config::builder().add_source(config::File::from(f).required(true)).build().and_then(|c| c.try_deserialize::<Settings>())
        });
        let origin = match (file, file_alone) {
            (Some(f), Some(Err(_))) => f.display().to_string(),
            _ => "the environment (a STOA__… variable)".to_owned(),
        };
        ConfigError::Values { origin, source: e }
    }

    /// Load settings from TOML text alone: defaults, then `text`, then the same secret files and
    /// [`Settings::check`] as [`Settings::load`] with a file, but no environment variables. Any
    /// text gets an answer, never a panic (the `config` fuzz target, fuzz/, feeds it arbitrary
    /// text).
    pub fn from_toml_str(text: &str) -> Result<Settings, ConfigError> {
        plain_top_level_keys(text)?;
        let builder = config::Config::builder().add_source(config::File::from_str(text, config::FileFormat::Toml));
        let settings: Settings = builder.build()?.try_deserialize()?;
        Settings::finish(settings, false)
    }

    /// The pipeline after the sources: dev-mode defaults, secret files, checks.
    fn finish(mut settings: Settings, dev_mode: bool) -> Result<Settings, ConfigError> {
        if dev_mode {
            settings.dev_mode = true;
            if std::env::var_os("STOA__AUTH__ALLOW_GUESTS").is_none() {
                settings.auth.allow_guests = true;
            }
            if settings.xmpp.c2s.is_none() && std::env::var_os("STOA__XMPP__C2S").is_none() {
                settings.xmpp.c2s = Some(XMPP_DEV_C2S.parse().expect("literal address"));
            }
        }
        settings.resolve_secrets()?;
        settings.check()?;
        Ok(settings)
    }

    fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .map_err(|source| ConfigError::SecretFile { path: path.clone(), source })
        };
        if let Some(path) = &self.store.url_file {
            self.store.url = read(path)?;
        }
        if let Some(path) = &self.auth.admin_token_file {
            self.auth.admin_token = read(path)?;
        }
        if let Some(path) = &self.cluster.secret_file {
            self.cluster.secret = read(path)?;
        }
        for peering in &mut self.cluster.peering {
            if let Some(path) = &peering.secret_file {
                peering.secret = read(path)?;
            }
        }
        if let Some(c) = &mut self.xmpp.component {
            if let Some(path) = &c.secret_file {
                c.secret = read(path)?;
            }
            if c.domain.is_empty() {
                c.domain = self.node.service.clone();
            }
        }
        // An empty path (e.g. `STOA__TLS__CERT_FILE=`) means unset.
        for path in [&mut self.tls.cert_file, &mut self.tls.key_file, &mut self.tls.ca_file, &mut self.log.file] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *path = None;
            }
        }
        Ok(())
    }

    /// Read and parse the `[tls]` files (certificate and key together, trust anchors) as a
    /// node would at start-up, without serving anything (`stoa config check`).
    pub fn check_tls_files(&self) -> Result<(), crate::tls::TlsError> {
        if let (Some(cert), Some(key)) = (&self.tls.cert_file, &self.tls.key_file) {
            crate::tls::ServerTls::load(cert, key)?;
        }
        if self.tls.ca_file.is_some() {
            self.tls_client_config()?;
        }
        Ok(())
    }

    /// The store URL, defaulting to SQLite under the data directory.
    pub fn store_url(&self) -> String {
        if self.store.url.is_empty() {
            format!("sqlite://{}/stoa.db", self.node.data_dir.display())
        } else {
            self.store.url.clone()
        }
    }

    /// Refuse settings that are unsafe or meaningless.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let exposed = |a: &SocketAddr| !a.ip().is_loopback();
        let xmpp_exposed = self.xmpp.c2s.as_ref().is_some_and(exposed) || self.xmpp.c2s_tls.as_ref().is_some_and(exposed);
        if self.dev_mode && (exposed(&self.listen.client) || exposed(&self.listen.admin) || xmpp_exposed) {
            return invalid(format!(
                "dev mode (no config file) only binds loopback, but a listener is set to {} / {}; \
                 write a config file with [auth] set up to listen elsewhere",
                self.listen.client, self.listen.admin
            ));
        }
        if self.auth.allow_guests && (exposed(&self.listen.client) || xmpp_exposed) {
            return invalid(format!(
                "refusing to offer guest login on non-loopback address {}: set auth.allow_guests = false \
                 and add users with `stoa user add`",
                self.listen.client
            ));
        }
        if self.auth.admin_token.is_empty() && exposed(&self.listen.admin) {
            return invalid(format!(
                "refusing to open the admin API on non-loopback address {} without auth.admin_token",
                self.listen.admin
            ));
        }
        if self.node.id.is_empty() || self.node.id.len() > 64 {
            return invalid("node.id must be 1 to 64 characters".into());
        }
        if self.node.service.is_empty() || self.node.service.contains('@') {
            return invalid("node.service must be a domain-like alias without '@'".into());
        }
        if self.xmpp.c2s_tls.is_some() && !self.tls.enabled() {
            return invalid("xmpp.c2s_tls (direct TLS) needs [tls] cert_file and key_file".into());
        }
        if let Some(c) = &self.xmpp.component {
            let port_ok = c.server.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return invalid(format!("xmpp.component.server is `{}`, not host:port (the server's component port)", c.server));
            }
            if c.domain != self.node.service {
                return invalid(format!(
                    "xmpp.component.domain is `{}`, but rooms of this node are name@{}: the component's domain is node.service",
                    c.domain, self.node.service
                ));
            }
            if c.secret.is_empty() {
                return invalid("xmpp.component needs secret or secret_file (the server's component_secret)".into());
            }
            if !c.tls && !c.insecure && !c.server_is_loopback() {
                return invalid(format!(
                    "xmpp.component.server {} is not on loopback and the link would be plaintext: set \
                     xmpp.component.tls = true (the server must offer TLS on that port), or run Stoa beside \
                     the server, or set xmpp.component.insecure = true on a private network",
                    c.server
                ));
            }
        }
        if self.node.io_threads > MAX_THREADS || self.rooms.arbiters > MAX_THREADS {
            return invalid(format!("node.io_threads and rooms.arbiters must be at most {MAX_THREADS} (0 = share the cores)"));
        }
        if self.committer.max_batch_rows == 0 || self.committer.max_in_flight == 0 || self.committer.overlap_min_rows == 0 {
            return invalid("committer.max_batch_rows, max_in_flight and overlap_min_rows must be at least 1".into());
        }
        if self.limits.max_body_bytes > self.limits.max_frame_bytes {
            return invalid("limits.max_body_bytes cannot exceed limits.max_frame_bytes".into());
        }
        if !matches!(self.store.sqlite_synchronous.as_str(), "full" | "normal" | "extra" | "off") {
            return invalid("store.sqlite_synchronous must be full, normal, extra or off".into());
        }
        if self.limits.max_answer_bytes < self.limits.max_body_bytes.saturating_mul(6).saturating_add(4096) {
            // A body of control characters is six times longer as JSON; one message must
            // always fit in an answer.
            return invalid("limits.max_answer_bytes must be at least 6 × limits.max_body_bytes + 4096".into());
        }
        if self.auth.login_failures_per_user == 0 || self.auth.login_failures_per_address == 0 || self.auth.login_failure_window_s == 0 {
            return invalid("auth.login_failures_per_user, login_failures_per_address and login_failure_window_s must be at least 1".into());
        }
        if self.limits.rooms_created_per_user_per_hour == 0 || self.limits.rooms_created_per_address_per_hour == 0 {
            return invalid("limits.rooms_created_per_user_per_hour and rooms_created_per_address_per_hour must be at least 1".into());
        }
        if self.limits.max_pending_handshakes == 0 || self.limits.handshake_timeout_ms == 0 {
            return invalid("limits.max_pending_handshakes and handshake_timeout_ms must be at least 1".into());
        }
        if self.limits.outbound_queue == 0 || self.limits.requests_per_second == 0 {
            return invalid("limits.outbound_queue and requests_per_second must be at least 1".into());
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return invalid("tls.cert_file and tls.key_file go together: set both (TLS on every listener) or neither".into());
        }
        if let Some(l) = self.plaintext_exposed().into_iter().find(|l| !l.allowed) {
            return invalid(format!(
                "refusing to serve the {} listener in plaintext on non-loopback address {}: set tls.cert_file and \
                 tls.key_file, or {} = true if the network or a TLS proxy in front of it protects the traffic",
                l.listener, l.addr, l.insecure_key
            ));
        }
        let domain_ok = |d: &str| {
            !d.is_empty() && d.len() <= 253 && d.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        };
        if !domain_ok(&self.xmpp.domain) {
            return invalid("xmpp.domain must be a lower-case domain name (a-z, 0-9, '.', '-')".into());
        }
        if self.xmpp.domain == self.node.service {
            return invalid("xmpp.domain and node.service must differ: users are user@domain, rooms name@service".into());
        }
        if self.xmpp.max_stanza_bytes < self.limits.max_body_bytes.saturating_mul(6).saturating_add(4096) || self.xmpp.max_depth < 8 {
            return invalid("xmpp.max_stanza_bytes must be at least 6 × limits.max_body_bytes + 4096, and xmpp.max_depth at least 8".into());
        }
        self.plugins.check().map_err(ConfigError::Invalid)?;
        self.check_cluster()
    }

    /// The listeners that would serve plaintext on a non-loopback address: none when `[tls]`
    /// is on. [`Settings::check`] refuses those whose insecure flag is off; the node warns
    /// about the others at start-up. The node link counts only where a node runs one (a node
    /// in an HA group), at this node's `link` address of the topology.
    pub fn plaintext_exposed(&self) -> Vec<PlaintextListener> {
        if self.tls.enabled() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut add = |listener, addr: String, exposed: bool, insecure_key, allowed| {
            if exposed {
                out.push(PlaintextListener { listener, addr, insecure_key, allowed });
            }
        };
        let exposed = |a: &SocketAddr| !a.ip().is_loopback();
        add("client", self.listen.client.to_string(), exposed(&self.listen.client), "listen.client_insecure", self.listen.client_insecure);
        add("admin", self.listen.admin.to_string(), exposed(&self.listen.admin), "listen.admin_insecure", self.listen.admin_insecure);
        if let Some(c2s) = &self.xmpp.c2s {
            add("xmpp c2s", c2s.to_string(), exposed(c2s), "xmpp.c2s_insecure", self.xmpp.c2s_insecure);
        }
        if let Some(group) = self.group().filter(|_| self.has_links())
            && let Some(me) = group.nodes.iter().find(|n| n.id == self.node.id)
        {
            add("node link", me.link.clone(), !link_is_loopback(&me.link), "cluster.link_insecure", self.cluster.link_insecure);
        }
        out
    }

    /// This node's redundancy group, if a topology is configured.
    pub fn group(&self) -> Option<&GroupSettings> {
        self.cluster.groups.iter().find(|g| g.nodes.iter().any(|n| n.id == self.node.id))
    }

    /// Node `id` of the topology.
    pub fn node_of_topology(&self, id: &str) -> Option<&PeerSettings> {
        self.cluster.groups.iter().flat_map(|g| &g.nodes).find(|n| n.id == id)
    }

    /// The other node of this node's group, if it has one.
    pub fn peer(&self) -> Option<&PeerSettings> {
        self.group()?.nodes.iter().find(|n| n.id != self.node.id)
    }

    /// Whether `service` is the room service of this node or of its peer: rooms whose records
    /// are in this node's store.
    pub fn is_group_service(&self, service: &str) -> bool {
        service == self.node.service || self.peer().is_some_and(|p| p.service == service)
    }

    /// Whether `service` is the room service of any node of the cluster (or this node's), or
    /// of a peering cluster's node.
    pub fn is_room_service(&self, service: &str) -> bool {
        self.is_group_service(service) || self.linked_nodes().any(|(n, _)| n.service == service)
    }

    /// Every node of the topology and of the peering clusters, with the peering it belongs to
    /// (none: a node of this cluster).
    pub fn linked_nodes(&self) -> impl Iterator<Item = (&PeerSettings, Option<&PeeringSettings>)> {
        let own = self.cluster.groups.iter().flat_map(|g| &g.nodes).map(|n| (n, None));
        own.chain(self.cluster.peering.iter().flat_map(|p| p.nodes.iter().map(move |n| (n, Some(p)))))
    }

    /// Whether this node keeps node links: to its peer in an HA group, to every other node
    /// when the cluster has more than one group, and to the nodes of peering clusters
    /// (docs/clusters.md).
    pub fn has_links(&self) -> bool {
        self.group().is_some_and(|g| g.ha) || self.cluster.groups.len() > 1 || !self.cluster.peering.is_empty()
    }

    /// The XMPP address (`host:port`) of the node whose client URL is `client`, where the
    /// topology names one.
    pub fn xmpp_address_of(&self, client: &str) -> Option<&str> {
        self.cluster.groups.iter().flat_map(|g| &g.nodes).find(|n| n.client == client && !n.xmpp.is_empty()).map(|n| n.xmpp.as_str())
    }

    fn check_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.cluster.groups.is_empty() {
            return Ok(());
        }
        if self.cluster.lease_renew_ms == 0 || self.cluster.lease_renew_ms.saturating_mul(2) > self.cluster.lease_ttl_ms {
            return invalid("cluster.lease_renew_ms must be at least 1 and at most half of cluster.lease_ttl_ms".into());
        }
        let mut ids = std::collections::HashSet::new();
        let mut services = std::collections::HashSet::new();
        for g in &self.cluster.groups {
            if g.nodes.is_empty() || g.nodes.len() > 2 {
                return invalid(format!("group `{}` must have one or two nodes", g.name));
            }
            if g.ha && g.nodes.len() != 2 {
                return invalid(format!("group `{}` has ha = true but no second node to fail over to", g.name));
            }
            for n in &g.nodes {
                if !ids.insert(n.id.as_str()) {
                    return invalid(format!("node `{}` appears twice in the topology", n.id));
                }
                if n.service.is_empty() || n.client.is_empty() || n.link.is_empty() {
                    return invalid(format!("node `{}` needs client, link and service", n.id));
                }
                // A room's service names its group: nodes route requests by it.
                if !services.insert(n.service.as_str()) {
                    return invalid(format!("service `{}` appears twice in the topology (node `{}`)", n.service, n.id));
                }
                let host_port = |a: &str| a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !n.xmpp.is_empty() && !host_port(&n.xmpp) {
                    return invalid(format!("node `{}`: xmpp is `{}`, not host:port", n.id, n.xmpp));
                }
            }
        }
        for p in &self.cluster.peering {
            if p.name.is_empty() || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                return invalid(format!("cluster.peering `{}`: name must be letters, digits, '-' or '.'", p.name));
            }
            if p.secret.len() < 16 || p.secret == self.cluster.secret {
                return invalid(format!(
                    "cluster.peering `{}` needs a secret of its own (at least 16 characters, not cluster.secret)",
                    p.name
                ));
            }
            if p.nodes.is_empty() {
                return invalid(format!("cluster.peering `{}` lists no nodes", p.name));
            }
            for n in &p.nodes {
                if n.service.is_empty() || n.link.is_empty() {
                    return invalid(format!("node `{}` of peering `{}` needs link and service", n.id, p.name));
                }
                if !ids.insert(n.id.as_str()) {
                    return invalid(format!("node `{}` appears twice in the topology and its peerings", n.id));
                }
                if !services.insert(n.service.as_str()) {
                    return invalid(format!("service `{}` appears twice in the topology and its peerings (node `{}`)", n.service, n.id));
                }
            }
        }
        for (user, node) in &self.cluster.homes {
            if !self.cluster.groups.iter().flat_map(|g| &g.nodes).any(|n| &n.id == node) {
                return invalid(format!("cluster.homes: `{user}` is homed on `{node}`, which is no node of the topology"));
            }
        }
        let Some(group) = self.group() else {
            return invalid(format!("this node (`{}`) is not in any group of [cluster]", self.node.id));
        };
        let me = group.nodes.iter().find(|n| n.id == self.node.id).expect("group() found this node");
        if me.service != self.node.service {
            return invalid(format!(
                "node.service is `{}` but the topology says `{}` for node `{}`",
                self.node.service, me.service, me.id
            ));
        }
        if group.ha && self.store_url().starts_with("sqlite:") {
            return invalid(format!(
                "group `{}` has ha = true, but its store is SQLite, which only one process can use: \
                 give both nodes the same PostgreSQL or MySQL/MariaDB store.url",
                group.name
            ));
        }
        if self.has_links() && self.cluster.secret.len() < 16 {
            let what = if group.ha { "a redundancy group" } else { "a cluster of several groups (its nodes link up)" };
            return invalid(format!("cluster.secret (at least 16 characters) is required for {what}"));
        }
        Ok(())
    }

    /// The trust anchors for this node's TLS dialers (`tls.ca_file`, or the Mozilla roots).
    pub fn tls_client_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, crate::tls::TlsError> {
        crate::tls::client_config(self.tls.ca_file.as_deref())
    }

    /// Passivation delay as a duration.
    pub fn passivate_after(&self) -> Duration {
        Duration::from_millis(self.rooms.passivate_after_ms)
    }
}

/// Whether a node-link address (`host:port`) is on loopback: a loopback IP or `localhost`.
fn link_is_loopback(link: &str) -> bool {
    if let Ok(addr) = link.parse::<SocketAddr>() {
        return addr.ip().is_loopback();
    }
    let host = link.rsplit_once(':').map_or(link, |(h, _)| h);
    host.eq_ignore_ascii_case("localhost")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[node]\nid = \"n1\"\n[limits]\nmax_body_bytes = 1000\n[auth]\nadmin_token = \"t\"").unwrap();
        let path = f.path().with_extension("toml");
        std::fs::copy(f.path(), &path).unwrap();
        // SAFETY: this test is the only one that touches these variables.
        unsafe { std::env::set_var("STOA__LIMITS__MAX_BODY_BYTES", "2000") };
        let s = Settings::load(Some(&path)).unwrap();
        unsafe { std::env::remove_var("STOA__LIMITS__MAX_BODY_BYTES") };
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.node.id, "n1");
        assert_eq!(s.limits.max_body_bytes, 2000);
        assert_eq!(s.limits.max_frame_bytes, 64 * 1024);
        assert!(!s.dev_mode && !s.auth.allow_guests);
    }

    #[test]
    fn thread_counts_are_bounded() {
        let mut s = Settings::default();
        s.node.io_threads = 4096;
        assert!(s.check().unwrap_err().to_string().contains("node.io_threads"));
        s.node.io_threads = 2;
        s.rooms.arbiters = 1025;
        assert!(s.check().unwrap_err().to_string().contains("rooms.arbiters"));
        s.rooms.arbiters = 1024;
        s.check().unwrap();
    }

    #[test]
    fn guests_on_a_public_address_are_refused() {
        let mut s = Settings::default();
        s.auth.allow_guests = true;
        s.auth.admin_token = "t".into();
        s.listen.client = "0.0.0.0:7450".parse().unwrap();
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("refusing to offer guest login"), "{err}");
        s.auth.allow_guests = false;
        s.listen.client_insecure = true;
        s.check().unwrap();
        s.auth.admin_token.clear();
        s.listen.admin = "0.0.0.0:7451".parse().unwrap();
        s.listen.admin_insecure = true;
        assert!(s.check().unwrap_err().to_string().contains("admin_token"));
    }

    /// Each listener off loopback needs TLS or its insecure flag: the refusal names the
    /// listener and the key; with the flag the node may start (and warns); with `[tls]` no
    /// flag is needed; loopback never needs either.
    #[test]
    fn plaintext_off_loopback_needs_tls_or_the_insecure_flag() {
        let mut s = Settings::default();
        s.auth.admin_token = "t".into();
        s.check().unwrap();
        assert!(s.plaintext_exposed().is_empty(), "loopback is fine in plaintext");

        s.listen.client = "0.0.0.0:7450".parse().unwrap();
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("client listener") && err.contains("listen.client_insecure") && err.contains("0.0.0.0:7450"), "{err}");
        s.listen.client_insecure = true;
        s.check().unwrap();
        assert_eq!(s.plaintext_exposed().len(), 1);
        assert!(s.plaintext_exposed()[0].allowed);

        s.listen.admin = "10.1.2.3:7451".parse().unwrap();
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("admin listener") && err.contains("listen.admin_insecure"), "{err}");
        s.listen.admin_insecure = true;
        s.check().unwrap();

        let mut s = pair(true);
        s.store.url = "postgres://stoa@db/stoa".into();
        s.cluster.groups[0].nodes[0].link = "10.0.0.1:7460".into();
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("node link listener") && err.contains("cluster.link_insecure") && err.contains("10.0.0.1:7460"), "{err}");
        s.cluster.link_insecure = true;
        s.check().unwrap();
        s.cluster.link_insecure = false;
        s.cluster.groups[0].nodes[0].link = "node-1a.internal:7460".into();
        assert!(s.check().is_err(), "a host name is not loopback");
        s.cluster.groups[0].nodes[0].link = "localhost:7460".into();
        s.check().unwrap();
        // Without HA there is no link listener to refuse.
        let mut s = pair(false);
        s.cluster.groups[0].nodes[0].link = "10.0.0.1:7460".into();
        s.check().unwrap();

        // With TLS every listener may bind anywhere, no flag needed.
        let mut s = pair(true);
        s.store.url = "postgres://stoa@db/stoa".into();
        s.auth.admin_token = "t".into();
        s.cluster.groups[0].nodes[0].link = "10.0.0.1:7460".into();
        s.listen.client = "0.0.0.0:7450".parse().unwrap();
        s.listen.admin = "0.0.0.0:7451".parse().unwrap();
        s.tls.cert_file = Some("cert.pem".into());
        assert!(s.check().unwrap_err().to_string().contains("go together"));
        s.tls.key_file = Some("key.pem".into());
        s.check().unwrap();
        assert!(s.plaintext_exposed().is_empty());
    }

    #[test]
    fn dev_mode_is_loopback_only() {
        let mut s = Settings { dev_mode: true, ..Settings::default() };
        s.check().unwrap();
        s.listen.client = "10.0.0.1:7450".parse().unwrap();
        assert!(s.check().unwrap_err().to_string().contains("dev mode"));
    }

    fn pair(ha: bool) -> Settings {
        let mut s = Settings::default();
        s.node.id = "1a".into();
        s.node.service = "conference-1a.example.com".into();
        s.cluster.secret = "0123456789abcdef".into();
        s.cluster.groups = vec![GroupSettings {
            name: "pair-1".into(),
            ha,
            nodes: vec![
                PeerSettings { id: "1a".into(), client: "ws://127.0.0.1:7450/ws".into(), link: "127.0.0.1:7460".into(), service: "conference-1a.example.com".into(), xmpp: String::new() },
                PeerSettings { id: "1b".into(), client: "ws://127.0.0.1:7550/ws".into(), link: "127.0.0.1:7560".into(), service: "conference-1b.example.com".into(), xmpp: String::new() },
            ],
        }];
        s
    }

    #[test]
    fn an_ha_group_on_sqlite_is_refused() {
        let s = pair(true);
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("SQLite") && err.contains("pair-1"), "{err}");
        let mut s = pair(true);
        s.store.url = "postgres://stoa@db/stoa".into();
        s.check().unwrap();
        assert_eq!(s.peer().map(|p| p.id.as_str()), Some("1b"));
        pair(false).check().unwrap();
    }

    /// Clusters: a second group makes links (and a secret) necessary; services are unique
    /// across the topology and its peerings; a peering needs a secret of its own.
    #[test]
    fn clusters_and_peerings_are_checked() {
        let node = |id: &str| PeerSettings {
            id: id.into(),
            client: format!("ws://127.0.0.1:1/{id}"),
            link: "127.0.0.1:2".into(),
            service: format!("conference-{id}.example.com"),
            xmpp: String::new(),
        };
        let mut s = pair(false);
        assert!(!s.has_links(), "one group without HA: no links");
        s.cluster.groups.push(GroupSettings { name: "single".into(), ha: false, nodes: vec![node("2a")] });
        assert!(s.has_links());
        s.check().unwrap();
        assert!(s.is_room_service("conference-2a.example.com") && !s.is_group_service("conference-2a.example.com"));
        s.cluster.secret = "short".into();
        assert!(s.check().unwrap_err().to_string().contains("cluster of several groups"));
        s.cluster.secret = "0123456789abcdef".into();
        s.cluster.groups[1].nodes[0].service = "conference-1b.example.com".into();
        assert!(s.check().unwrap_err().to_string().contains("appears twice"));
        s.cluster.groups[1].nodes[0].service = "conference-2a.example.com".into();

        let mut peering = PeeringSettings { name: "cluster-2".into(), secret: "0123456789abcdef".into(), secret_file: None, nodes: vec![node("9a")] };
        s.cluster.peering.push(peering.clone());
        assert!(s.check().unwrap_err().to_string().contains("secret of its own"), "the cluster's secret is not the peering's");
        peering.secret = "another-secret-0123".into();
        s.cluster.peering = vec![peering.clone()];
        s.check().unwrap();
        assert!(s.is_room_service("conference-9a.example.com"));
        assert_eq!(s.linked_nodes().filter(|(_, p)| p.is_some()).count(), 1);
        peering.nodes.push(node("2a"));
        s.cluster.peering = vec![peering.clone()];
        assert!(s.check().unwrap_err().to_string().contains("appears twice"), "node ids are unique across clusters");
        peering.nodes.pop();
        peering.name = "bad name".into();
        s.cluster.peering = vec![peering];
        assert!(s.check().unwrap_err().to_string().contains("name"));
    }

    #[test]
    fn topology_mistakes_are_refused() {
        let mut s = pair(true);
        s.store.url = "postgres://stoa@db/stoa".into();
        s.cluster.secret = "short".into();
        assert!(s.check().unwrap_err().to_string().contains("cluster.secret"));
        let mut s = pair(false);
        s.node.id = "9z".into();
        assert!(s.check().unwrap_err().to_string().contains("not in any group"));
        let mut s = pair(false);
        s.node.service = "other.example.com".into();
        assert!(s.check().unwrap_err().to_string().contains("node.service"));
        let mut s = pair(true);
        s.store.url = "postgres://stoa@db/stoa".into();
        s.cluster.groups[0].nodes.pop();
        assert!(s.check().unwrap_err().to_string().contains("no second node"));
        let mut s = pair(false);
        s.cluster.homes.insert("ann".into(), "1b".into());
        s.check().unwrap();
        s.cluster.homes.insert("bob".into(), "9z".into());
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("cluster.homes") && err.contains("`bob`") && err.contains("`9z`"), "{err}");
    }

    /// A top-level key that the config crate would read as a path with an index gets an
    /// answer (the crate allocated that many entries and aborted the process); plain files load.
    #[test]
    fn an_index_in_a_top_level_key_is_refused() {
        let err = Settings::from_toml_str("\"a[9999999999]\" = 1").unwrap_err().to_string();
        assert!(err.contains("top-level key"), "{err}");
        assert_eq!(Settings::from_toml_str("[node]\nid = \"n1\"").unwrap().node.id, "n1");
    }

    /// Limits near the top of the integer range get an answer from the checks, not an
    /// overflow panic.
    #[test]
    fn huge_limits_are_refused_without_overflow() {
        let text = "[limits]\nmax_body_bytes = 9223372036854775807\nmax_frame_bytes = 9223372036854775807";
        let err = Settings::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains("max_answer_bytes"), "{err}");
        let mut s = pair(false);
        s.cluster.lease_renew_ms = u64::MAX;
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("lease_renew_ms"), "{err}");
    }

    /// Relative paths from a config file (and the defaults) resolve against its folder; those
    /// from the environment and absolute ones are left as they are; unset ones stay unset.
    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let mut s = Settings::default();
        s.cluster.secret_file = Some("secret".into());
        s.tls.cert_file = Some("/abs/cert.pem".into());
        s.tls.key_file = Some("tls/key.pem".into());
        s.plugins.dir = "plugins".into();
        s.auth.admin_token_file = Some("from-env".into());
        let base = Path::new("/etc/stoa");
        s.resolve_paths(base, |var| var == "STOA__AUTH__ADMIN_TOKEN_FILE");
        assert_eq!(s.node.data_dir, Path::new("/etc/stoa/stoa-data"), "the default too");
        assert_eq!(s.cluster.secret_file.as_deref(), Some(Path::new("/etc/stoa/secret")));
        assert_eq!(s.tls.cert_file.as_deref(), Some(Path::new("/abs/cert.pem")));
        assert_eq!(s.tls.key_file.as_deref(), Some(Path::new("/etc/stoa/tls/key.pem")));
        assert_eq!(s.plugins.dir, Path::new("/etc/stoa/plugins"));
        assert_eq!(s.plugins.cache_dir, Path::new(""), "empty = under data_dir, which moved already");
        assert_eq!(s.auth.admin_token_file.as_deref(), Some(Path::new("from-env")), "the environment's path stays");
        assert!(s.store.url_file.is_none() && s.tls.ca_file.is_none(), "unset stays unset");
        assert_eq!(s.store_url(), "sqlite:///etc/stoa/stoa-data/stoa.db");

        assert_eq!(resolve_sqlite_url(base, "sqlite://db/x.db?mode=rwc"), "sqlite:///etc/stoa/db/x.db?mode=rwc");
        assert_eq!(resolve_sqlite_url(base, "sqlite:///var/x.db"), "sqlite:///var/x.db");
        assert_eq!(resolve_sqlite_url(base, "sqlite::memory:"), "sqlite::memory:");
        assert_eq!(resolve_sqlite_url(base, "postgres://h/db"), "postgres://h/db");
    }

    /// A config file in another folder finds its secret file beside it, whatever the working
    /// directory (issue 9: `cannot read secret file` when started elsewhere).
    #[test]
    fn a_secret_file_beside_the_config_is_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "0123456789abcdef\n").unwrap();
        let file = dir.path().join("n.toml");
        std::fs::write(&file, "[auth]\nadmin_token = \"t\"\n[cluster]\nsecret_file = \"secret\"\n").unwrap();
        let s = Settings::load(Some(&file)).unwrap();
        assert_eq!(s.cluster.secret, "0123456789abcdef");
        assert_eq!(s.node.data_dir, dir.path().join("stoa-data"));
    }

    /// `[xmpp.component]`: the secret from a file beside the config, the domain defaulting to
    /// node.service; a mismatched domain, no secret, and a plaintext link off loopback refused.
    #[test]
    fn the_xmpp_component_settings_load_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("component-secret"), "s3cret\n").unwrap();
        let file = dir.path().join("n.toml");
        let base = "[node]\nservice = \"conference.example.com\"\n[xmpp.component]\nserver = \"127.0.0.1:5347\"\n";
        std::fs::write(&file, format!("{base}secret_file = \"component-secret\"\n")).unwrap();
        let s = Settings::load(Some(&file)).unwrap();
        let c = s.xmpp.component.as_ref().unwrap();
        assert_eq!((c.secret.as_str(), c.domain.as_str(), c.tls), ("s3cret", "conference.example.com", false));
        let err = |text: String| Settings::from_toml_str(&text).unwrap_err().to_string();
        assert!(err(format!("{base}secret = \"x\"\ndomain = \"rooms.example.com\"\n")).contains("node.service"));
        assert!(err(base.to_owned()).contains("secret"));
        let remote = "[node]\nservice = \"c.example.com\"\n[xmpp.component]\nserver = \"10.0.0.5:5347\"\nsecret = \"x\"\n";
        assert!(err(remote.to_owned()).contains("tls = true"));
        Settings::from_toml_str(&format!("{remote}tls = true\n")).unwrap();
        Settings::from_toml_str(&format!("{remote}insecure = true\n")).unwrap();
        assert!(err(format!("{base}secret = \"x\"\n").replace("127.0.0.1:5347", "nowhere")).contains("host:port"));
    }

    /// An unknown key is reported with the file it is in.
    #[test]
    fn an_unknown_key_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("odd.toml");
        std::fs::write(&file, "[node]\ncolour = \"red\"\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("odd.toml") && err.contains("colour"), "{err}");
    }

    #[test]
    fn default_store_is_sqlite_in_the_data_dir() {
        assert_eq!(Settings::default().store_url(), "sqlite://./stoa-data/stoa.db");
    }
}

#[cfg(test)]
mod example_config {
    /// The annotated example config loads and equals the built-in defaults, so it stays true.
    #[test]
    fn examples_stoa_toml_matches_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/stoa.toml");
        let loaded: super::Settings = config::Config::builder()
            .add_source(config::File::from(path.as_path()))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(
            serde_json::to_value(&loaded).unwrap(),
            serde_json::to_value(super::Settings::default()).unwrap()
        );
    }

    /// The pair examples load and pass the start-up checks (HA on PostgreSQL; HA off on SQLite).
    #[test]
    fn pair_examples_load_and_pass_the_checks() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        // The secret file path in the example is relative to the example's folder.
        for (file, ha, peer) in [
            ("examples/ha-pair/1a.toml", true, "1b"),
            ("examples/ha-pair/1b.toml", true, "1a"),
            ("examples/non-ha-pair/2a.toml", false, "2b"),
            ("examples/non-ha-pair/2b.toml", false, "2a"),
        ] {
            let s = super::Settings::load(Some(&root.join(file))).unwrap_or_else(|e| panic!("{file}: {e}"));
            s.check().unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(s.group().map(|g| g.ha), Some(ha), "{file}");
            assert_eq!(s.peer().map(|p| p.id.as_str()), Some(peer), "{file}");
            if ha {
                assert!(s.cluster.secret.len() >= 16, "{file}: the secret file was read");
                assert!(s.store_url().starts_with("postgres://"), "{file}");
            }
        }
    }
}
