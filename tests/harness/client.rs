//! The raw protocol client of the tests: sends any JSON or WebSocket frame, keeps what it has
//! received and not consumed, and waits for frames with a deadline; plus helpers that panic
//! unless the expected answer comes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use super::DEADLINE;

/// A raw protocol client: sends any JSON (or any WebSocket frame), keeps every frame it has
/// received but not yet consumed, and waits for frames with a deadline.
pub struct Client {
    ws: WebSocketStream<TcpStream>,
    /// The logged-in user (empty before `hello`).
    pub user: String,
    /// Frames received and not consumed yet, in arrival order.
    pending: VecDeque<Value>,
    /// Set once the server closed the connection: its close code, if it sent one.
    pub closed: Option<Option<u16>>,
    next_id: u64,
}

/// What a read produced.
enum Read {
    Frame(Value),
    Closed(Option<u16>),
}

impl Client {
    /// Open a WebSocket to a node without logging in.
    pub async fn connect_raw(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        Self::handshake(addr, stream).await
    }

    /// Open a WebSocket whose socket has a tiny receive buffer (for slow-consumer tests).
    pub async fn connect_small_buffer(addr: SocketAddr, user: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let mut c = Self::handshake(addr, stream).await;
        c.hello(user).await;
        c
    }

    async fn handshake(addr: SocketAddr, stream: TcpStream) -> Client {
        stream.set_nodelay(true).ok();
        let url = format!("ws://{addr}/ws");
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url.as_str(), stream))
            .await
            .unwrap_or_else(|_| panic!("WebSocket handshake with {url} timed out"))
            .unwrap_or_else(|e| panic!("WebSocket handshake with {url}: {e}"));
        Client { ws, user: String::new(), pending: VecDeque::new(), closed: None, next_id: 0 }
    }

    /// Connect and log in as guest `user`.
    pub async fn connect(addr: SocketAddr, user: &str) -> Client {
        let mut c = Self::connect_raw(addr).await;
        c.hello(user).await;
        c
    }

    /// Connect as guest `user` of the store `identity`: the first time a fresh guest, later
    /// the same guest again through its session token (a guest's user name is unique, so
    /// "the same guest" is a token, not a name).
    pub async fn connect_guest(addr: SocketAddr, user: &str, identity: &str) -> Client {
        static TOKENS: std::sync::LazyLock<Mutex<std::collections::HashMap<(String, String), String>>> = std::sync::LazyLock::new(Default::default);
        let key = (identity.to_owned(), user.to_owned());
        let mut c = Self::connect_raw(addr).await;
        let token = TOKENS.lock().unwrap().get(&key).cloned();
        if let Some(token) = token {
            let w = c.request(json!({"op": "hello", "v": 1, "token": token})).await;
            if w["op"] == "welcome" {
                c.user = w["user"].as_str().unwrap_or(user).into();
                return c;
            }
            c = Self::connect_raw(addr).await; // the token expired: a new guest
        }
        let w = c.hello(user).await;
        TOKENS.lock().unwrap().insert(key, w["session"].as_str().expect("a session token").to_owned());
        c
    }

    /// Log in as guest `user`; panics unless welcomed.
    pub async fn hello(&mut self, user: &str) -> Value {
        let w = self.request(json!({"op": "hello", "v": 1, "user": user})).await;
        assert_eq!(w["op"], "welcome", "hello as {user}: {w}");
        // A guest's user name is the one asked for plus a server-chosen `~suffix`.
        self.user = w["user"].as_str().unwrap_or(user).into();
        w
    }

    /// A fresh request id.
    pub fn id(&mut self) -> String {
        self.next_id += 1;
        format!("r{}", self.next_id)
    }

    /// Send a text frame as is.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.ws.send(Message::text(text)).await.expect("sending a text frame");
    }

    /// Send any WebSocket message (binary, raw frames ...). Errors are returned, not panics:
    /// the server may close the connection while we write.
    pub async fn send_message(&mut self, msg: Message) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(msg).await
    }

    /// Send a text frame whose payload is not valid UTF-8 (raw frame, bypassing the type check).
    pub async fn send_invalid_utf8(&mut self) {
        let frame = Frame::message(vec![b'{', 0xff, 0xfe, 0xfd, b'}'], OpCode::Data(Data::Text), true);
        let _ = self.ws.send(Message::Frame(frame)).await;
    }

    /// Send a JSON request, giving it an `id` if it has none; returns the id.
    pub async fn send_json(&mut self, mut v: Value) -> String {
        let id = match v.get("id").and_then(|i| i.as_str()) {
            Some(id) => id.to_owned(),
            None => {
                let id = self.id();
                v["id"] = json!(id);
                id
            }
        };
        self.send_text(v.to_string()).await;
        id
    }

    /// Send a request and wait for the frame answering it.
    pub async fn request(&mut self, v: Value) -> Value {
        let id = self.send_json(v.clone()).await;
        self.answer(&id).await
    }

    /// Wait for the frame answering request `id`.
    pub async fn answer(&mut self, id: &str) -> Value {
        self.wait_for(&format!("the answer to {id}"), |f| f["re"] == id).await
    }

    async fn read(&mut self, deadline: Instant) -> Option<Read> {
        if let Some(code) = self.closed {
            return Some(Read::Closed(code));
        }
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(n) => n,
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {t}"));
                    return Some(Read::Frame(v));
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code));
                    self.closed = Some(code);
                    return Some(Read::Closed(code));
                }
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue, // ping / pong
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return Some(Read::Closed(None));
                }
            }
        }
    }

    /// Take the first pending frame matching `pred`, reading more frames until one arrives.
    /// Panics on a deadline or a closed connection, listing what was received instead.
    pub async fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&mut pred) {
            return self.pending.remove(i).expect("index is in range");
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.read(deadline).await {
                Some(Read::Frame(f)) if pred(&f) => return f,
                Some(Read::Frame(f)) => self.pending.push_back(f),
                Some(Read::Closed(code)) => {
                    panic!("{}: connection closed (code {code:?}) while waiting for {what}; pending: {}", self.user, self.pending_summary())
                }
                None => panic!("{}: timed out waiting for {what}; pending: {}", self.user, self.pending_summary()),
            }
        }
    }

    /// Like [`Client::wait_for`], but `None` when the connection closes first.
    pub async fn wait_for_or_close(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Option<Value> {
        if let Some(i) = self.pending.iter().position(&mut pred) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.read(deadline).await {
                Some(Read::Frame(f)) if pred(&f) => return Some(f),
                Some(Read::Frame(f)) => self.pending.push_back(f),
                Some(Read::Closed(_)) => return None,
                None => panic!("{}: timed out waiting for a frame or a close; pending: {}", self.user, self.pending_summary()),
            }
        }
    }

    /// Read until the server closes the connection; returns its close code. Frames received
    /// meanwhile are kept.
    pub async fn await_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.read(deadline).await {
                Some(Read::Frame(f)) => self.pending.push_back(f),
                Some(Read::Closed(code)) => return code,
                None => panic!("{}: the server did not close the connection; pending: {}", self.user, self.pending_summary()),
            }
        }
    }

    /// Take every pending frame matching `pred`, in arrival order.
    pub fn take(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let (taken, kept): (VecDeque<Value>, VecDeque<Value>) = self.pending.drain(..).partition(|f| pred(f));
        self.pending = kept;
        taken.into()
    }

    /// Every frame received and not consumed yet.
    pub fn pending(&self) -> &VecDeque<Value> {
        &self.pending
    }

    fn pending_summary(&self) -> String {
        let n = self.pending.len();
        let shown: Vec<String> = self.pending.iter().rev().take(8).rev().map(|f| f.to_string()).collect();
        format!("{n} frames, last: [{}]", shown.join(", "))
    }

    /// Read until `message` events of `room` up to seq `last` have arrived; returns every
    /// `message` event of `room` received so far (consumed), in arrival order.
    pub async fn messages_through(&mut self, room: &str, last: u64) -> Vec<Value> {
        let seen = |c: &Client| c.pending.iter().any(|f| is_message(f, room) && f["seq"].as_u64() >= Some(last));
        if !seen(self) {
            let deadline = Instant::now() + DEADLINE;
            loop {
                match self.read(deadline).await {
                    Some(Read::Frame(f)) => {
                        let done = is_message(&f, room) && f["seq"].as_u64() >= Some(last);
                        self.pending.push_back(f);
                        if done {
                            break;
                        }
                    }
                    Some(Read::Closed(code)) => panic!(
                        "{}: closed (code {code:?}) waiting for message {last} of {room}; pending: {}",
                        self.user,
                        self.pending_summary()
                    ),
                    None => panic!("{}: timed out waiting for message {last} of {room}; pending: {}", self.user, self.pending_summary()),
                }
            }
        }
        self.take(|f| is_message(f, room))
    }

    // ---- protocol helpers (each panics unless the expected answer comes) --------------------

    /// Create a room with `config`; panics unless `created`.
    pub async fn create(&mut self, room: &str, config: Value) -> Value {
        let a = self.request(json!({"op": "create", "room": room, "config": config})).await;
        assert_eq!(a["op"], "created", "{} create {room}: {a}", self.user);
        a
    }

    /// Join a room as `nick`; panics unless `joined`.
    pub async fn join(&mut self, room: &str, nick: &str) -> Value {
        let a = self.request(json!({"op": "join", "room": room, "nick": nick})).await;
        assert_eq!(a["op"], "joined", "{} join {room}: {a}", self.user);
        a
    }

    /// Join with `since`; panics unless `joined`.
    pub async fn join_since(&mut self, room: &str, nick: &str, since: u64) -> Value {
        let a = self.request(json!({"op": "join", "room": room, "nick": nick, "since": since})).await;
        assert_eq!(a["op"], "joined", "{} join {room} since {since}: {a}", self.user);
        a
    }

    /// Send a message and return the answer (an `ack` or an `error`).
    pub async fn send(&mut self, room: &str, body: &str, cid: &str) -> Value {
        self.request(json!({"op": "send", "room": room, "body": body, "cid": cid})).await
    }

    /// Send a message; panics unless acked. Returns the seq.
    pub async fn send_acked(&mut self, room: &str, body: &str, cid: &str) -> u64 {
        let a = self.send(room, body, cid).await;
        assert_eq!(a["op"], "ack", "{} send {cid} to {room}: {a}", self.user);
        a["seq"].as_u64().expect("ack carries a seq")
    }

    /// Every message of a room from the store, through `history` (paged).
    pub async fn history_all(&mut self, room: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        loop {
            let after = out.last().and_then(|m| m["seq"].as_u64()).unwrap_or(0);
            let a = self.request(json!({"op": "history", "room": room, "after": after, "limit": 500})).await;
            assert_eq!(a["op"], "history", "{} history {room}: {a}", self.user);
            let page = a["messages"].as_array().expect("messages array").clone();
            let truncated = a["truncated"].as_bool().unwrap_or(false);
            out.extend(page);
            if !truncated {
                return out;
            }
        }
    }
}

/// Is `f` a `message` event of `room`?
pub fn is_message(f: &Value, room: &str) -> bool {
    f["op"] == "message" && f["room"] == room
}
