//! An interactive terminal chat client for Stoa, built on `stoa::client`.
//!
//! ```text
//! cargo run --example chat                               # guest login on the dev node
//! cargo run --example chat -- --user ann --password pw   # registered user
//! cargo run --example chat -- --url ws://10.0.0.5:7450/ws --user ann
//! cargo run --example chat -- --url wss://chat.example.com:7450/ws --user ann   # TLS, public CA
//! cargo run --example chat -- --url wss://127.0.0.1:7450/ws --ca ca.pem          # TLS, private CA
//! ```
//!
//! Type `/help` for the commands; any other line is sent to the current room. Incoming
//! messages print as `[room #seq] nick: body`. The client resumes by itself when the
//! connection drops (re-joining its rooms with `since`, so nothing is missed).

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::process::ExitCode;

use stoa::client::{Client, ClientEvent, ClientOptions, EventStream, Joined, Login, new_cid};
use stoa::protocol::{RoomAddr, RoomConfigPatch};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The dev node's WebSocket endpoint (`stoa serve` with no config).
const DEFAULT_URL: &str = "ws://127.0.0.1:7450/ws";
/// Messages `/history` shows when no count is given.
const DEFAULT_HISTORY: u64 = 20;

const HELP: &str = "\
commands:
  /join ROOM[@SERVICE] [NICK]   join a room (and make it the current one)
  /create ROOM[@SERVICE]        create a room, then join it
  /leave                        leave the current room
  /room ROOM[@SERVICE]          switch the current room among the joined ones
  /history [N]                  show the last N messages of the current room (default 20)
  /list                         list the rooms you can see
  /who                          who is in the current room
  /subject TEXT                 set the current room's subject
  /quit                         leave
  /help                         this text
any other line is sent to the current room";

const USAGE: &str = "\
usage: chat [--url URL] [--ca FILE] [--user NAME] [--password PASSWORD]
  --url        WebSocket endpoint, ws:// or wss:// (default ws://127.0.0.1:7450/ws)
  --ca         PEM trust anchors for a wss:// server (default: the Mozilla roots)
  --user       user name (default: a guest name; guest login works on a dev node only)
  --password   password of a registered user (or env STOA_PASSWORD); without it, guest login";

/// Command-line arguments.
struct Args {
    url: String,
    ca: Option<std::path::PathBuf>,
    user: Option<String>,
    password: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { url: DEFAULT_URL.to_owned(), ca: None, user: None, password: std::env::var("STOA_PASSWORD").ok() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--ca" => args.ca = Some(value()?.into()),
            "--user" => args.user = Some(value()?),
            "--password" => args.password = Some(value()?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

/// What the terminal session keeps between lines.
struct Session {
    client: Client,
    user: String,
    service: String,
    current: Option<RoomAddr>,
    /// Occupants per joined room, nick → user, kept from `joined` and presence events.
    occupants: HashMap<RoomAddr, BTreeMap<String, String>>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let login = match (&args.user, &args.password) {
        (Some(user), Some(password)) => Login::password(user.clone(), password.clone()),
        (Some(user), None) => Login::guest(user.clone()),
        (None, Some(_)) => return Err("--password needs --user".into()),
        (None, None) => Login::guest(format!("guest{}", std::process::id() % 10_000)),
    };
    let mut options = ClientOptions::reconnecting();
    if let Some(ca) = &args.ca {
        options = options.trust_ca_file(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
    }
    let (client, welcome) = Client::connect_with(&args.url, login, options)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.url))?;
    println!(
        "* connected to node {} as {}{}; rooms here are NAME@{}. /help for commands.",
        welcome.node,
        welcome.user,
        if welcome.guest { " (guest)" } else { "" },
        welcome.service
    );
    let mut events: EventStream = client.events().ok_or("event stream already taken")?;
    let mut session = Session {
        client,
        user: welcome.user,
        service: welcome.service,
        current: None,
        occupants: HashMap::new(),
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if !session.line(line.trim()).await {
                    break;
                }
            }
            event = events.recv() => {
                let Some(event) = event else { break };
                session.event(event);
            }
        }
    }
    session.client.close().await;
    Ok(())
}

impl Session {
    /// Handle one input line; `false` ends the program.
    async fn line(&mut self, line: &str) -> bool {
        if line.is_empty() {
            return true;
        }
        let Some(command) = line.strip_prefix('/') else {
            self.say(line).await;
            return true;
        };
        let (name, rest) = command.split_once(' ').map_or((command, ""), |(n, r)| (n, r.trim()));
        match name {
            "quit" | "exit" => return false,
            "help" => println!("{HELP}"),
            "join" => self.join(rest).await,
            "create" => self.create(rest).await,
            "leave" => self.leave().await,
            "room" => self.switch(rest),
            "history" => self.history(rest).await,
            "list" => self.list().await,
            "who" => self.who(),
            "subject" => self.subject(rest).await,
            other => println!("! unknown command /{other}; /help lists them"),
        }
        true
    }

    /// `name` or `name@service`, completed with this node's room service.
    fn room(&self, arg: &str) -> RoomAddr {
        if arg.contains('@') { RoomAddr(arg.to_owned()) } else { RoomAddr(format!("{arg}@{}", self.service)) }
    }

    fn current(&self) -> Option<RoomAddr> {
        if self.current.is_none() {
            println!("! no current room: /join one first");
        }
        self.current.clone()
    }

    async fn say(&mut self, body: &str) {
        let Some(room) = self.current() else { return };
        // The message prints when its `message` event comes back, with its seq.
        if let Err(e) = self.client.send(&room, body, new_cid()).await {
            println!("! not sent: {e}");
        }
    }

    async fn join(&mut self, rest: &str) {
        let mut words = rest.split_whitespace();
        let Some(room) = words.next() else {
            println!("! usage: /join ROOM[@SERVICE] [NICK]");
            return;
        };
        let room = self.room(room);
        let nick = words.next().map_or_else(|| self.user.clone(), str::to_owned);
        match self.client.join(&room, nick, None, None).await {
            Ok(joined) => {
                println!(
                    "* joined {} as {} ({} here, last #{}){}",
                    joined.room,
                    joined.nick,
                    joined.occupants.len(),
                    joined.last_seq,
                    if joined.subject.is_empty() { String::new() } else { format!("; subject: {}", joined.subject) }
                );
                self.track(&joined);
                self.current = Some(joined.room);
            }
            Err(e) => println!("! cannot join {room}: {e}"),
        }
    }

    async fn create(&mut self, rest: &str) {
        if rest.is_empty() {
            println!("! usage: /create ROOM[@SERVICE]");
            return;
        }
        let room = self.room(rest);
        match self.client.create(&room, RoomConfigPatch::default()).await {
            Ok(room) => {
                println!("* created {room}");
                self.join(room.as_str()).await;
            }
            Err(e) => println!("! cannot create {room}: {e}"),
        }
    }

    async fn leave(&mut self) {
        let Some(room) = self.current() else { return };
        match self.client.leave(&room).await {
            Ok(()) => {
                println!("* left {room}");
                self.occupants.remove(&room);
                self.current = self.client.rooms().into_iter().next().map(|r| r.room);
                if let Some(next) = &self.current {
                    println!("* current room is now {next}");
                }
            }
            Err(e) => println!("! cannot leave {room}: {e}"),
        }
    }

    fn switch(&mut self, rest: &str) {
        let room = self.room(rest);
        if self.client.last_seq(&room).is_some() {
            println!("* current room is now {room}");
            self.current = Some(room);
        } else {
            let joined: Vec<String> = self.client.rooms().into_iter().map(|r| r.room.0).collect();
            println!("! not in {room}; joined: {}", joined.join(", "));
        }
    }

    async fn history(&mut self, rest: &str) {
        let Some(room) = self.current() else { return };
        let count = if rest.is_empty() { Ok(DEFAULT_HISTORY) } else { rest.parse::<u64>() };
        let Ok(count) = count else {
            println!("! usage: /history [N]");
            return;
        };
        // `after` is exclusive: the last N messages are those after last_seq − N.
        let last = self.client.last_seq(&room).unwrap_or(0);
        let limit = u32::try_from(count).unwrap_or(u32::MAX);
        match self.client.history(&room, None, Some(last.saturating_sub(count)), Some(limit)).await {
            Ok(page) => {
                if page.messages.is_empty() {
                    println!("* no messages in {room}");
                }
                for m in &page.messages {
                    println!("[{} #{}] {}: {}", m.room.name(), m.seq, m.nick, m.body);
                }
            }
            Err(e) => println!("! no history: {e}"),
        }
    }

    async fn list(&mut self) {
        match self.client.list().await {
            Ok(rooms) if rooms.is_empty() => println!("* no rooms yet: /create one"),
            Ok(rooms) => {
                for r in rooms {
                    let visibility = if r.public { "public" } else { "members-only" };
                    let affiliation = r.affiliation.map(|a| format!(", {}", a.as_str())).unwrap_or_default();
                    println!("  {} ({visibility}, last #{}{affiliation}) {}", r.room, r.last_seq, r.subject);
                }
            }
            Err(e) => println!("! cannot list: {e}"),
        }
    }

    fn who(&self) {
        let Some(room) = self.current() else { return };
        let occupants = self.occupants.get(&room).cloned().unwrap_or_default();
        println!("* {} in {room}:", occupants.len());
        for (nick, user) in occupants {
            println!("  {nick} ({user})");
        }
    }

    async fn subject(&mut self, rest: &str) {
        let Some(room) = self.current() else { return };
        // The new subject prints when the `subject` event arrives.
        if let Err(e) = self.client.subject(&room, rest).await {
            println!("! cannot set the subject: {e}");
        }
    }

    fn track(&mut self, joined: &Joined) {
        let occupants = joined.occupants.iter().map(|o| (o.nick.clone(), o.user.clone())).collect();
        self.occupants.insert(joined.room.clone(), occupants);
    }

    fn forget(&mut self, room: &RoomAddr) {
        self.occupants.remove(room);
        if self.current.as_ref() == Some(room) {
            self.current = self.client.rooms().into_iter().next().map(|r| r.room);
        }
    }

    fn event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::Message(m) => println!("[{} #{}] {}: {}", m.room.name(), m.seq, m.nick, m.body),
            ClientEvent::Presence { room, user, nick, status, reason } => {
                let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
                println!("* [{}] {nick} {status}{reason}", room.name());
                let occupants = self.occupants.entry(room.clone()).or_default();
                if status == "joined" {
                    occupants.insert(nick, user);
                } else {
                    occupants.remove(&nick);
                    if self.client.last_seq(&room).is_none() {
                        self.forget(&room);
                    }
                }
            }
            ClientEvent::Subject { room, subject, by } => println!("* [{}] {by} set the subject: {subject}", room.name()),
            ClientEvent::Configured { room, config } => println!("* [{}] configuration changed: {config}", room.name()),
            ClientEvent::Destroyed { room, reason } => {
                println!("* {room} was destroyed{}", reason.map(|r| format!(": {r}")).unwrap_or_default());
                self.forget(&room);
            }
            ClientEvent::Moved { room, to } => println!("* {room} moved to {to}"),
            ClientEvent::Goaway { reason, to } => match to {
                Some(to) => println!("* the server is going away ({reason}); resuming on {to}"),
                None => println!("* the server is going away: {reason}"),
            },
            ClientEvent::Error { code, message, room } => {
                let room = room.map(|r| format!(" [{r}]")).unwrap_or_default();
                println!("! {}{room}: {message}", code.as_str());
            }
            ClientEvent::Disconnected { reason } => println!("* disconnected ({reason}); reconnecting…"),
            ClientEvent::Reconnected { url, welcome } => println!("* reconnected to node {} ({url})", welcome.node),
            ClientEvent::Rejoined(joined) => {
                println!("* rejoined {}", joined.room);
                self.track(&joined);
            }
            ClientEvent::RejoinFailed { room, code, message } => {
                println!("! could not rejoin {room}: {} {message}", code.as_str());
                self.forget(&room);
            }
            ClientEvent::ReconnectFailed { reason } => println!("! gave up reconnecting: {reason}; /quit and retry"),
        }
    }
}
