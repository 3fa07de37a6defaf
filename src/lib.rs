//! Stoa: a persistent chat-room runtime.
//!
//! The data path is front end → gateway → room actor → committer → store → fan-out:
//!
//! ```text
//! transport::ws ─frames─▶ v1::Connection ─ops─▶ gateway::Gateway ─actix msg─▶ room::Room ─AppendRequest─▶ committer
//!       ▲                                                                         │                          │
//!       └── v1::V1Wire ◀── session::Session ◀── event::Occupant ◀── typed events ◀── after commit ◀── store (fenced txn)
//!           (v1 encoding, once per event)
//! ```
//!
//! Imports point down (`scripts/import-cycles.py` checks that there is no circle): the room
//! delivers to the [`event::Occupant`] trait, which the session implements, and tells the
//! registry it stops through [`room::Registrar`], which the registry implements. A front end
//! is a codec over [`gateway::Gateway`]: it parses its protocol, calls one gateway method per
//! operation, and encodes answers and room events through its [`session::Wire`].
//!
//! Module map:
//!
//! - [`ids`]: the ids that cross modules as newtypes (`RoomAddr`, `Seq`, `NodeId`, `Epoch`,
//!   `RoomId`, `SessionId`); a leaf that imports nothing of Stoa.
//! - [`protocol`]: wire frames of protocol v1 (serde), error codes, close codes.
//! - [`config`]: `Settings` from defaults, a TOML file and `STOA__SECTION__KEY` variables; dev mode;
//!   relative paths resolved against the config file's folder.
//! - [`clock`]: the monotonic clock of activity stamps; Unix milliseconds as UTC dates for people
//!   and JSON.
//! - [`event`]: what a room tells its occupants, protocol-neutral (`RoomEvent`, `RoomAnswer`), the
//!   `Occupant` trait it delivers through, and `Delivery` (an event with its encoding cached per
//!   protocol, so fan-out serializes once per event and protocol).
//! - [`cli`]: the `stoa` verbs' arguments and bodies, one module per group (`cli::user`,
//!   `cli::room`, `cli::session`, `cli::admin`, `cli::db`); `main.rs` parses, runs `serve` and dispatches.
//! - [`ha`]: redundancy pairs (docs/ha.md), the decisions: state machine, write gate, node link
//!   (a full mesh in a cluster: heartbeats with the services each node serves, commands and
//!   forwarded room requests to any node; a handle made before its runner starts), and the
//!   recovery manager (failover, takeover,
//!   fallback; `detect`, `moves`, `admin`), which publishes its state on a `StateWatch`. The
//!   statements it runs are `store::cluster`'s.
//! - [`node`]: start-up and ordered shutdown of one node (actix System, arbiters, listeners).
//! - [`transport`]: client transports; `transport::ws` is the WebSocket listener at `/ws` (each
//!   connection served on a room arbiter's thread unless `node.client_connections_on_arbiters`
//!   is off), `transport::upgrade` reads the HTTP request
//!   before the upgrade (plain HTTP answers, handshake slots).
//! - [`gateway`]: the protocol-neutral session API (login, create, join, leave, send, history,
//!   subject, configure, affiliate, kick, destroy, list): validation, budgets, typed results and
//!   documented error codes; the node's table of live sessions and whether it takes logins.
//!   Parts: `gateway::ops` (room operations, routed here or to the peer), `login`, `checks`.
//! - [`v1`]: protocol v1, the JSON codec over the gateway: a connection's frames, its request
//!   budget, paging answers by size; `V1Wire` encodes room events once per event;
//!   `v1::outbound` is a connection's bounded queue of frames for its writer.
//! - [`forward`]: room operations (`gateway::RoomOp`) of a session on one node served by another
//!   (its peer, or a node of another group) for a stand-in session, over the node link; answers
//!   and events come back typed; a room of another group is followed to its new host across a
//!   takeover there (docs/clusters.md).
//! - [`home`]: users' home nodes: where a registered user's login is served (a pure decision
//!   over the node link's view), home assignment at the first login, and the answers to the
//!   other nodes' `home_of` questions (docs/clusters.md, *Users' home nodes*).
//! - [`session`]: a logged-in session of any protocol as rooms see it (it implements
//!   `event::Occupant`): the rooms it is in, how it ended, and its front end's `Wire`.
//! - [`registry`]: room address → room actor; activation, passivation, spreading over arbiters;
//!   the plugin checks around a join and a creation that run outside the room actor.
//! - [`room`]: the room actor (typed events to its occupants, a replay cache of events), one file
//!   per part: `post` (the write path, a post to its ack), `occupants` (joins, leaves, replay),
//!   `moderation`, `stopping` (passivation, hand-off, fencing), `plugin` (hooks), `pipeline`
//!   (appends in flight), `cids` (the `(sender, cid)` pairs pending and last committed, as
//!   keyed hashes; made at a room's first post), `state` (pure rules).
//! - [`committer`]: the group committer: many rooms' appends per transaction, answers after commit
//!   (on SQLite it runs on the store's commit thread, `Store::commit_runtime`).
//! - [`store`]: every SQL statement of the node: SeaORM entities, migrations under a lock, and by
//!   what is stored: `rooms`, `log` (the fenced group-commit append, on SQLite on a commit thread
//!   of its own whose WAL writes a VFS shim gathers into one call per commit; reads, archive),
//!   `accounts`
//!   (users, SCRAM, sessions), `cluster` (a pair's leases, room moves, node states, presence
//!   lock), `audit`, `plugin_state`.
//! - [`auth`]: argon2 users, session tokens, guest login.
//! - [`throttle`]: budgets per user name and source address (failed logins, room creations).
//! - [`names`]: when two nicks or user names clash (a confusable-skeleton comparison key).
//! - [`plugin`]: Wasm plugins (wasmtime components of a frozen WIT version under `wit/`, one
//!   host module per version, `plugin::v0_1` for `stoa:plugin@0.1.0`): limits, per-room workers,
//!   fault counting; the room side is `room::plugin` (docs/plugins.md).
//! - [`xmpp`]: XMPP, the second codec over the gateway: the c2s listener (RFC 6120 streams,
//!   STARTTLS, SASL, binding), MUC over Stoa rooms (`xmpp::muc`), the stream parser with its
//!   limits (`xmpp::stream`); docs/xmpp.md.
//! - [`admin`]: admin HTTP API (`/health`, `/api/...`, HA verbs, audit log) and Prometheus `/metrics`;
//!   `admin::manage` has the operator's verbs on sessions and rooms of a running node;
//!   `admin::console` serves the operators' console (sign-in to a cookie session with a CSRF
//!   token, server-sent events of the node's state).
//! - [`web`]: the browser pages built into the binary (the console, and the chat page that
//!   `transport::ws` serves at `/` of the client listener): plain JavaScript modules and CSS
//!   under `src/web/`, and the Content-Security-Policy they are served with; imports nothing.
//! - [`admin_client`]: the one HTTP(S) client of the admin API: `stoa admin …`, the bench, the tests.
//! - [`tls`]: rustls (ring) for every listener and dialer: a reloadable server certificate,
//!   a bounded handshake, trust anchors from `tls.ca_file` or the Mozilla roots.
//! - [`client`]: a Rust client library (request/answer matching, reconnect and resume), one file
//!   per part: `api` (the `Client` handle), `events`, `options`, `session` (shared state, routing
//!   answers by `re`), `resume` (a connection's loss and the resume), `wire` (socket, TLS, frames).
//! - [`bench`](mod@bench): `stoa bench`, the load generator behind docs/benchmarks.md.
//! - [`merge`]: `stoa db merge`, several stores into one as a validated, resumable job:
//!   validation (`merge::validate`), the pure plan and re-sequencing (`merge::plan`), the
//!   job's chunks and verification (`merge::run`); docs/merge.md. Its statements are
//!   `store::merge`'s.
//! - [`systemd`]: `Type=notify` readiness, stopping, status and watchdog pings (sd_notify).
//! - [`logfile`]: where log lines go (stderr or `log.file`, reopened on SIGHUP), never failing;
//!   sqlx's slow-acquire warnings thinned out to one per 10 s.

pub mod admin;
pub mod admin_client;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod committer;
pub mod config;
pub mod event;
pub mod forward;
pub mod gateway;
pub mod ha;
pub mod home;
pub mod ids;
pub mod logfile;
pub mod merge;
pub mod names;
pub mod node;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod room;
pub mod session;
pub mod store;
pub mod systemd;
pub mod throttle;
pub mod tls;
pub mod transport;
pub mod v1;
pub mod web;
pub mod xmpp;
