//! Protocol v1 (docs/protocol.md): the JSON codec over the [`Gateway`].
//!
//! One [`Connection`] per WebSocket connection reads client frames, calls the gateway operation
//! each names, and writes the answer; [`V1Wire`] is the session's v1 side, encoding room events
//! and answers into server frames on the connection's one bounded queue. The codec owns only
//! what is v1's: frame parsing, the request budget of the connection, failed logins per
//! connection, and paging answers by their JSON size. Rooms the peer hosts are the gateway's
//! business (it forwards their operations), not the codec's.

use crate::event::{ChatMessage, Delivery, Protocol, RoomAnswer, RoomEvent};
use crate::gateway::{Failure, Gateway, HistoryQuery, JoinRequest, Outcome, TokenBucket};
use crate::protocol::{ClientFrame, ErrorCode, FrameError, MessageEvent, PROTOCOL_VERSION, RequestId, ServerFrame, parse_client_frame};
use crate::session::{Queued, Session, Wire};
use std::sync::Arc;
use std::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

pub mod outbound;

/// Failed logins after which a connection is closed.
pub const MAX_FAILED_LOGINS: u32 = 5;

/// Something for the connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// A serialized server frame.
    Frame(Utf8Bytes),
    /// A WebSocket ping (idle connection check).
    Ping,
}

/// What the transport should do after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close the connection with this WebSocket close code and reason.
    Close(u16, &'static str),
}

/// Queue `frame` on `outbound`.
fn queue(outbound: &outbound::Sender, frame: Utf8Bytes) -> Queued {
    match outbound.try_send(Outbound::Frame(frame)) {
        Ok(()) => Queued::Yes,
        Err(outbound::TrySendError::Full) => Queued::Full,
        Err(outbound::TrySendError::Closed) => Queued::Closed,
    }
}

/// Queue a server frame (error answers are counted in `stoa_errors_total` by code).
fn send(outbound: &outbound::Sender, frame: &ServerFrame) -> Queued {
    count_error(frame);
    queue(outbound, Utf8Bytes::from(frame.to_json()))
}

/// A v1 session's side: room events and answers as v1 frames on the connection's queue.
pub struct V1Wire {
    outbound: outbound::Sender,
}

impl V1Wire {
    pub fn new(outbound: outbound::Sender) -> Box<Self> {
        Box::new(V1Wire { outbound })
    }
}

impl Wire for V1Wire {
    fn deliver(&self, event: &Arc<Delivery>) -> Queued {
        queue(&self.outbound, v1_frame(event))
    }

    fn answer(&self, answer: RoomAnswer) -> Queued {
        let out = &self.outbound;
        match answer {
            RoomAnswer::Joined { re, room, nick, last_seq, occupants, subject, affiliation, truncated, replay } => {
                let mut q = send(out, &ServerFrame::Joined { re, room, nick, last_seq, occupants, subject, affiliation, truncated });
                for event in &replay {
                    if q == Queued::Yes {
                        q = queue(out, v1_frame(event));
                    }
                }
                q
            }
            RoomAnswer::Left { re, room } => send(out, &ServerFrame::Left { re, room }),
            RoomAnswer::Ack { re, room, seq, ts, duplicate } => send(out, &ServerFrame::Ack { re, room, seq, ts, duplicate }),
            RoomAnswer::Error { re, room, code, message } => {
                send(out, &ServerFrame::Error { re, code, message, room: Some(room), retry_after_ms: None })
            }
        }
    }

    fn goaway(&self, reason: &str, to: Option<&str>) -> Queued {
        send(&self.outbound, &ServerFrame::Goaway { reason: reason.to_owned(), to: to.map(str::to_owned) })
    }
}

/// The v1 frame of a delivery, serialized once per delivery however many sessions get it.
fn v1_frame(delivery: &Delivery) -> Utf8Bytes {
    delivery.encoded(Protocol::V1, |event| Utf8Bytes::from(event_frame(event).to_json()))
}

/// The v1 frame of a room event.
pub fn event_frame(event: &RoomEvent) -> ServerFrame {
    match event {
        RoomEvent::Message(m) => ServerFrame::Message(message_event(m)),
        RoomEvent::Presence { room, user, nick, status, reason } => ServerFrame::Presence {
            room: room.clone(),
            user: user.clone(),
            nick: nick.clone(),
            status: status.clone(),
            reason: reason.clone(),
        },
        RoomEvent::Subject { room, subject, by } => ServerFrame::Subject { room: room.clone(), subject: subject.clone(), by: by.clone() },
        RoomEvent::Configured { room, config } => ServerFrame::Configured { room: room.clone(), config: config.public_view() },
        RoomEvent::Destroyed { room, reason } => ServerFrame::Destroyed { room: room.clone(), reason: reason.clone() },
        RoomEvent::Moved { room, to } => ServerFrame::Moved { room: room.clone(), to: to.clone() },
    }
}

/// The v1 form of a message.
pub fn message_event(m: &ChatMessage) -> MessageEvent {
    MessageEvent {
        room: m.room.clone(),
        seq: m.seq,
        from: m.from.clone(),
        nick: m.nick.clone(),
        body: m.body.clone(),
        cid: m.cid.clone(),
        ts: m.ts,
    }
}

/// Count an error frame in `stoa_errors_total{code}`.
pub fn count_error(frame: &ServerFrame) {
    if let ServerFrame::Error { code, .. } = frame {
        metrics::counter!("stoa_errors_total", "code" => code.as_str()).increment(1);
    }
}

/// How many of `items` (from the end when `from_end`) fit in `budget` bytes of JSON; at least
/// one, so a page always moves on (one item always fits: the settings check guarantees it).
fn fitting<T: serde::Serialize>(items: &[T], budget: usize, from_end: bool) -> usize {
    let mut used = 512; // the answer's own fields
    let mut take = |item: &T| {
        used += serde_json::to_string(item).map_or(0, |j| j.len()) + 1;
        used <= budget
    };
    let fit = if from_end { items.iter().rev().take_while(|i| take(i)).count() } else { items.iter().take_while(|i| take(i)).count() };
    fit.max(1).min(items.len())
}

/// An answer to send, `None` when the room answers through the session queue itself.
type Answer = Outcome<Option<ServerFrame>>;

/// One client connection's protocol state.
pub struct Connection {
    gateway: Arc<Gateway>,
    outbound: outbound::Sender,
    kill: CancellationToken,
    session: Option<Arc<Session>>,
    bucket: TokenBucket,
    failed_logins: u32,
    /// The client's address, for login throttling.
    address: Option<std::net::IpAddr>,
}

impl Connection {
    /// A connection writing its frames to `outbound`; `kill` ends it.
    pub fn new(gateway: Arc<Gateway>, outbound: outbound::Sender, kill: CancellationToken) -> Self {
        let bucket = gateway.request_bucket();
        Connection { gateway, outbound, kill, session: None, bucket, failed_logins: 0, address: None }
    }

    /// The client connects from `address` (its failed logins count against it).
    pub fn from_address(mut self, address: std::net::IpAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// The logged-in session, if any.
    pub fn session(&self) -> Option<&Arc<Session>> {
        self.session.as_ref()
    }

    fn push(&self, frame: &ServerFrame) {
        let queued = send(&self.outbound, frame);
        if queued == Queued::Full
            && let Some(s) = &self.session
        {
            s.kill(crate::session::KillReason::SlowConsumer);
        }
    }

    /// Handle one text frame.
    pub async fn handle_text(&mut self, text: &str) -> Flow {
        if !self.bucket.take(Instant::now()) {
            let re = parse_client_frame(text).ok().and_then(|f| f.id().cloned());
            self.push(&ServerFrame::error(re, ErrorCode::RateLimited, "too many requests; slow down"));
            return Flow::Continue;
        }
        let frame = match parse_client_frame(text) {
            Ok(f) => f,
            Err(FrameError { re, message }) => {
                self.push(&ServerFrame::error(re, ErrorCode::BadRequest, message));
                return Flow::Continue;
            }
        };
        let re = frame.id().cloned();
        let answer = match frame {
            ClientFrame::Hello { v, user, password, token, id } => {
                let answer = self.hello(v, user.clone(), password, token, id.clone()).await;
                if let Err(Failure { login_on: Some(node), .. }) = &answer {
                    return self.redirect(node, user.unwrap_or_default(), id);
                }
                if answer.is_err() && self.session.is_none() {
                    self.failed_logins += 1;
                }
                answer
            }
            other => match self.session.clone() {
                None => Err(Failure::new(ErrorCode::Unauthorized, "send `hello` first")),
                Some(session) => self.request(&session, other).await,
            },
        };
        match answer {
            Ok(Some(frame)) => self.push(&frame),
            Ok(None) => {}
            Err(Failure { code, message, retry_after_ms, .. }) => self.push(&ServerFrame::Error { re, code, message, room: None, retry_after_ms }),
        }
        if self.session.is_none() && self.failed_logins >= MAX_FAILED_LOGINS {
            return Flow::Close(crate::protocol::close_code::POLICY, "too many failed logins");
        }
        Flow::Continue
    }

    /// Tell the client to log in on `node` (its home) with a `welcome` that carries `redirect`
    /// and no session, then close.
    fn redirect(&self, node: &crate::ids::NodeId, user: String, re: Option<RequestId>) -> Flow {
        let s = &self.gateway.settings;
        let Some(target) = s.node_of_topology(&node.0) else {
            self.push(&ServerFrame::error(re, ErrorCode::Unavailable, format!("log in on node {node}")));
            return Flow::Continue;
        };
        self.push(&ServerFrame::Welcome {
            v: PROTOCOL_VERSION,
            user,
            node: node.0.clone(),
            session: String::new(),
            service: target.service.clone(),
            guest: false,
            peers: Vec::new(),
            redirect: Some(target.client.clone()),
            re,
        });
        Flow::Close(crate::protocol::close_code::NORMAL, "log in on your home node")
    }

    async fn hello(&mut self, v: u32, user: Option<String>, password: Option<String>, token: Option<String>, id: Option<RequestId>) -> Answer {
        if self.session.is_some() {
            return Err(Failure::new(ErrorCode::BadRequest, "already logged in"));
        }
        if v != PROTOCOL_VERSION {
            return Err(Failure::new(ErrorCode::BadRequest, format!("unsupported protocol version {v}; this server speaks {PROTOCOL_VERSION}")));
        }
        let logged_in = self.gateway.login(user.as_deref(), password.as_deref(), token.as_deref(), self.address).await?;
        let wire = V1Wire::new(self.outbound.clone());
        let hash = crate::auth::token_hash(&logged_in.token);
        let session = self.gateway.open_session(logged_in.user.clone(), Some(hash), self.address, wire, self.kill.clone());
        tracing::debug!(session = %session.id, user = %logged_in.user, guest = logged_in.guest, "logged in");
        self.session = Some(session);
        let s = &self.gateway.settings;
        Ok(Some(ServerFrame::Welcome {
            v: PROTOCOL_VERSION,
            user: logged_in.user,
            node: s.node.id.clone(),
            session: logged_in.token,
            service: s.node.service.clone(),
            guest: logged_in.guest,
            // Where to resume if this node goes away (the session token is valid there too).
            peers: s.peer().map(|p| p.client.clone()).into_iter().collect(),
            redirect: None,
            re: id,
        }))
    }

    async fn request(&mut self, session: &Arc<Session>, frame: ClientFrame) -> Answer {
        let gateway = self.gateway.clone();
        let max_answer = gateway.settings.limits.max_answer_bytes;
        match frame {
            ClientFrame::Hello { .. } => Err(Failure::new(ErrorCode::BadRequest, "already logged in")),
            ClientFrame::Ping { id } => Ok(Some(ServerFrame::Pong { re: id })),
            ClientFrame::Create { id, room, config } => {
                gateway.create(session, &room, &config).await?;
                Ok(Some(ServerFrame::Created { re: id, room }))
            }
            ClientFrame::Join { id, room, nick, since, password } => {
                gateway.join(session, JoinRequest { re: id, room, nick, since, password }).await?;
                // `joined` and the replay were queued by the room itself, in order.
                Ok(None)
            }
            ClientFrame::Leave { id, room } => {
                gateway.leave(session, id, &room).await?;
                Ok(None)
            }
            ClientFrame::Send { id, room, body, cid } => {
                // The ack (after commit) or the error comes from the room.
                gateway.send(session, id, &room, body, cid).await?;
                Ok(None)
            }
            ClientFrame::History { id, room, before, after, limit } => {
                let page = gateway.history(session, &room, HistoryQuery { before, after, limit }).await?;
                let mut truncated = page.truncated;
                let mut messages: Vec<MessageEvent> = page.messages.iter().map(message_event).collect();
                // Page by bytes too: keep the messages nearest the cursor that fit.
                let kept = fitting(&messages, max_answer, page.newest_first);
                if kept < messages.len() {
                    truncated = true;
                    if page.newest_first {
                        messages.drain(..messages.len() - kept);
                    } else {
                        messages.truncate(kept);
                    }
                }
                Ok(Some(ServerFrame::History { re: id, room, messages, truncated }))
            }
            ClientFrame::Subject { id, room, subject } => {
                gateway.subject(session, &room, subject).await?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::Configure { id, room, config } => {
                gateway.configure(session, &room, config).await?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::Affiliate { id, room, user, affiliation } => {
                gateway.affiliate(session, &room, user, affiliation).await?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::Kick { id, room, nick, reason } => {
                gateway.kick(session, &room, nick, reason).await?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::Destroy { id, room, reason } => {
                gateway.destroy(session, &room, reason).await?;
                Ok(Some(ServerFrame::Ok { re: id }))
            }
            ClientFrame::List { id, after, limit } => {
                let page = gateway.list(session, after.as_ref(), limit).await?;
                let (mut rooms, mut truncated) = (page.rooms, page.truncated);
                let kept = fitting(&rooms, max_answer, false);
                if kept < rooms.len() {
                    truncated = true;
                    rooms.truncate(kept);
                }
                Ok(Some(ServerFrame::Rooms { re: id, rooms, truncated }))
            }
        }
    }

    /// Queue a WebSocket ping (idle check).
    pub fn ping(&self) {
        let _ = self.outbound.try_send(Outbound::Ping);
    }

    /// The connection ended: leave every room.
    pub fn closed(&mut self) {
        if let Some(session) = self.session.take() {
            self.gateway.close_session(&session);
        }
    }
}
