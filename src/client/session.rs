//! One session's state, shared by the [`Client`](super::Client) handle and its tasks: the
//! requests waiting for an answer, the rooms joined with the last `seq` seen in each, and the
//! connection in use. Submitting a request and routing each server frame (an answer to its
//! waiter by `re`, anything else to the events) happen here, under the one lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::ClientError;
use super::events::{ClientEvent, Welcome, joined_from};
use super::options::ClientOptions;
use super::wire::{IdGen, peer_url};
use crate::protocol::{ErrorCode, RoomAddr, ServerFrame};

/// What a waiting request is answered with.
pub(super) type Answer = Result<ServerFrame, ClientError>;

/// What a waiting request needs when its answer arrives.
#[derive(Debug)]
pub(super) enum PendingKind {
    /// Nothing beyond resolving the waiter.
    Plain,
    /// A join: on `joined` the room is recorded for resumes.
    Join { room: RoomAddr, password: Option<String>, since: Option<u64>, rejoin: bool },
    /// A send, kept until acked: on a reconnect it is written again, same id and `cid`.
    Send { text: Utf8Bytes },
}

/// A request waiting for its answer.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) kind: PendingKind,
    /// Dropped by the application (e.g. a timed-out future) is fine: the answer is discarded.
    pub(super) tx: oneshot::Sender<Answer>,
    /// The connection generation it was written on; `0` = not written yet.
    pub(super) written_on: u64,
}

/// A room we are in, with what a re-join needs.
#[derive(Debug)]
pub(super) struct RoomState {
    pub(super) nick: String,
    pub(super) password: Option<String>,
    pub(super) last_seq: u64,
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Connected; requests go straight to the socket.
    Ready,
    /// A reconnect runs: sends wait for it, other requests fail with `Disconnected`.
    Resuming,
    /// Disconnected and nothing will reconnect unless
    /// [`Client::reconnect`](super::Client::reconnect) is called.
    Down,
    /// Closed for good.
    Closed,
}

/// The connection in use: its generation and its writer task with the queue that feeds it.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) generation: u64,
    pub(super) writer: mpsc::Sender<Message>,
    pub(super) writer_task: JoinHandle<()>,
}

/// Everything about the session that changes, under one lock.
#[derive(Debug)]
pub(super) struct State {
    pub(super) phase: Phase,
    /// Bumped for every new connection; frames and failures of an older one are ignored.
    pub(super) generation: u64,
    pub(super) conn: Option<Conn>,
    pub(super) reader: Option<JoinHandle<()>>,
    pub(super) resume_task: Option<JoinHandle<()>>,
    /// A reconnect (automatic or [`Client::reconnect`](super::Client::reconnect)) is running.
    pub(super) resuming: bool,
    pub(super) welcome: Welcome,
    /// URLs to resume on: the one connected to first, then peers and extras.
    pub(super) urls: Vec<String>,
    pub(super) url_index: usize,
    pub(super) pending: BTreeMap<u64, Pending>,
    pub(super) rooms: HashMap<RoomAddr, RoomState>,
}

/// One session, shared by the [`Client`](super::Client) handle, the socket reader and the
/// resume task.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) ids: IdGen,
    pub(super) state: Mutex<State>,
    pub(super) events: mpsc::UnboundedSender<ClientEvent>,
    pub(super) options: ClientOptions,
}

impl Shared {
    /// The session state, locked.
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if one did, the state is still consistent
        // enough to fail the remaining requests.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hand an event to the application.
    pub(super) fn emit(&self, event: ClientEvent) {
        // A dropped receiver means the application does not want events.
        let _ = self.events.send(event);
    }

    /// Register a request and write it, or (a send while resuming) park it for the resume.
    pub(super) async fn submit(
        &self,
        id: u64,
        kind: PendingKind,
        text: Utf8Bytes,
    ) -> Result<oneshot::Receiver<Answer>, ClientError> {
        let is_send = matches!(kind, PendingKind::Send { .. });
        let (tx, rx) = oneshot::channel();
        loop {
            let (generation, writer) = {
                let mut st = self.state();
                match (st.phase, &st.conn) {
                    (Phase::Ready, Some(conn)) => (conn.generation, conn.writer.clone()),
                    (Phase::Closed, _) => return Err(ClientError::Closed),
                    (Phase::Resuming, _) if is_send => {
                        st.pending.insert(id, Pending { kind, tx, written_on: 0 });
                        return Ok(rx);
                    }
                    _ => return Err(ClientError::Disconnected),
                }
            };
            let permit = match writer.reserve().await {
                Ok(permit) => permit,
                Err(_) => {
                    // The writer is gone: the socket broke. Sends wait for the resume (if one
                    // comes, the reader's loss handling decides); the rest fail now.
                    if is_send && self.options.reconnect.is_some() {
                        let mut st = self.state();
                        if st.phase != Phase::Closed {
                            st.pending.insert(id, Pending { kind, tx, written_on: 0 });
                            return Ok(rx);
                        }
                    }
                    return Err(ClientError::Disconnected);
                }
            };
            let mut st = self.state();
            let same = st.phase == Phase::Ready && st.conn.as_ref().is_some_and(|c| c.generation == generation);
            if !same {
                // The connection changed while we waited for room: decide again.
                continue;
            }
            st.pending.insert(id, Pending { kind, tx, written_on: generation });
            permit.send(Message::Text(text));
            return Ok(rx);
        }
    }

    /// Route one server frame: answers to their waiting request, everything else to events.
    /// Also keeps the resume state: rooms joined and the last `seq` seen in each.
    ///
    /// Returns where to move the connection to when the server says the node no longer serves
    /// it (`goaway` with a URL, or `moved` to another node) and the client reconnects by itself.
    pub(super) fn route(&self, frame: ServerFrame) -> Option<String> {
        let relocate = match (&frame, self.options.reconnect.is_some()) {
            (ServerFrame::Goaway { to: Some(to), .. }, true) => Some(peer_url(to)),
            (ServerFrame::Moved { to, .. }, true) => Some(peer_url(to)),
            _ => None,
        };
        let mut st = self.state();
        if let Some(to) = &relocate {
            let current = st.urls.get(st.url_index).cloned();
            if current.as_deref() == Some(to.as_str()) && matches!(frame, ServerFrame::Moved { .. }) {
                self.route_locked(st, frame);
                return None;
            }
            // Resume there first: `resume_once` takes the URL after `url_index`.
            st.urls.retain(|u| u != to);
            st.urls.insert(0, to.clone());
            st.url_index = st.urls.len() - 1;
        }
        self.route_locked(st, frame);
        relocate
    }

    fn route_locked(&self, mut st: MutexGuard<'_, State>, frame: ServerFrame) {
        let pending = frame
            .re()
            .and_then(|re| re.0.parse::<u64>().ok())
            .and_then(|id| st.pending.remove(&id));
        match pending {
            Some(p) => self.answer(&mut st, p, frame),
            None => self.event(&mut st, frame),
        }
    }

    fn answer(&self, st: &mut State, p: Pending, frame: ServerFrame) {
        let result = match (p.kind, frame) {
            (kind, ServerFrame::Error { code, message, .. }) => {
                // A room that is moving (`unavailable`) is kept: the resume fails and is retried.
                if let PendingKind::Join { room, rejoin: true, .. } = kind
                    && code != ErrorCode::Unavailable
                {
                    st.rooms.remove(&room);
                    self.emit(ClientEvent::RejoinFailed { room, code, message: message.clone() });
                }
                Err(ClientError::Server { code, message })
            }
            (PendingKind::Join { password, since, rejoin, .. }, frame @ ServerFrame::Joined { .. }) => {
                let answer = joined_from(frame.clone());
                if let Ok(joined) = &answer {
                    let previous = st.rooms.get(&joined.room).map_or(0, |r| r.last_seq);
                    let last_seq = match since {
                        Some(s) if rejoin => s.max(previous),
                        Some(s) => s,
                        None => joined.last_seq,
                    };
                    st.rooms.insert(joined.room.clone(), RoomState { nick: joined.nick.clone(), password, last_seq });
                    if rejoin {
                        self.emit(ClientEvent::Rejoined(joined.clone()));
                    }
                }
                Ok(frame)
            }
            (_, frame @ ServerFrame::Left { .. }) => {
                if let ServerFrame::Left { room, .. } = &frame {
                    st.rooms.remove(room);
                }
                Ok(frame)
            }
            (_, other) => Ok(other),
        };
        // The waiter may have given up (dropped its future); the answer is then moot.
        let _ = p.tx.send(result);
    }

    fn event(&self, st: &mut State, frame: ServerFrame) {
        let event = match frame {
            ServerFrame::Message(m) => {
                if let Some(r) = st.rooms.get_mut(&m.room) {
                    r.last_seq = r.last_seq.max(m.seq);
                }
                ClientEvent::Message(m)
            }
            ServerFrame::Presence { room, user, nick, status, reason } => {
                let me = st.rooms.get(&room).is_some_and(|r| r.nick == nick) && user == st.welcome.user;
                if me && status == "kicked" {
                    st.rooms.remove(&room);
                }
                ClientEvent::Presence { room, user, nick, status, reason }
            }
            ServerFrame::Subject { room, subject, by } => ClientEvent::Subject { room, subject, by },
            ServerFrame::Configured { room, config } => ClientEvent::Configured { room, config },
            ServerFrame::Destroyed { room, reason } => {
                st.rooms.remove(&room);
                ClientEvent::Destroyed { room, reason }
            }
            ServerFrame::Moved { room, to } => ClientEvent::Moved { room, to },
            ServerFrame::Goaway { reason, to } => ClientEvent::Goaway { reason, to },
            ServerFrame::Error { code, message, room, .. } => ClientEvent::Error { code, message, room },
            other => {
                tracing::debug!(frame = %other.to_json(), "answer to no pending request");
                return;
            }
        };
        self.emit(event);
    }

    /// Close for good: no reconnects, connection closed, every waiter answered `Closed`.
    /// Returns the writer task, which finishes writing and closes the socket.
    pub(super) fn shutdown(&self) -> Option<JoinHandle<()>> {
        let mut st = self.state();
        st.phase = Phase::Closed;
        if let Some(task) = st.resume_task.take() {
            task.abort();
        }
        if let Some(reader) = st.reader.take() {
            reader.abort();
        }
        let writer = st.conn.take().map(|conn| conn.writer_task);
        for (_, p) in std::mem::take(&mut st.pending) {
            let _ = p.tx.send(Err(ClientError::Closed));
        }
        writer
    }
}

/// Sessions and frames for the unit tests of the client's parts.
#[cfg(test)]
pub(super) mod fixtures {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::{Arc, Mutex};

    use tokio::sync::{mpsc, oneshot};

    use super::{Answer, Pending, PendingKind, Phase, Shared, State};
    use crate::client::events::{EventStream, Welcome};
    use crate::client::options::ClientOptions;
    use crate::client::wire::IdGen;
    use crate::protocol::{Affiliation, MessageEvent, RequestId, RoomAddr, ServerFrame};

    pub(in crate::client) fn shared(reconnect: bool) -> (Arc<Shared>, EventStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let welcome = Welcome {
            user: "ann".into(),
            node: "n1".into(),
            session: "tok".into(),
            service: "conference.localhost".into(),
            guest: false,
            peers: vec![],
        };
        let options = if reconnect { ClientOptions::reconnecting() } else { ClientOptions::default() };
        let shared = Arc::new(Shared {
            ids: IdGen::new(),
            state: Mutex::new(State {
                phase: Phase::Ready,
                generation: 1,
                conn: None,
                reader: None,
                resume_task: None,
                resuming: false,
                welcome,
                urls: vec!["ws://a/ws".into()],
                url_index: 0,
                pending: BTreeMap::new(),
                rooms: HashMap::new(),
            }),
            events: tx,
            options,
        });
        (shared, rx)
    }

    pub(in crate::client) fn park(s: &Shared, kind: PendingKind) -> (u64, oneshot::Receiver<Answer>) {
        let id = s.ids.next();
        let (tx, rx) = oneshot::channel();
        s.state().pending.insert(id, Pending { kind, tx, written_on: 1 });
        (id, rx)
    }

    pub(in crate::client) fn room() -> RoomAddr {
        RoomAddr("ops@conference.localhost".into())
    }

    pub(in crate::client) fn msg(seq: u64) -> ServerFrame {
        ServerFrame::Message(MessageEvent {
            room: room(),
            seq,
            from: "bob".into(),
            nick: "bob".into(),
            body: "hi".into(),
            cid: format!("c{seq}"),
            ts: 1,
        })
    }

    pub(in crate::client) fn joined(re: u64, last_seq: u64) -> ServerFrame {
        ServerFrame::Joined {
            re: RequestId(re.to_string()),
            room: room(),
            nick: "ann".into(),
            last_seq,
            occupants: vec![],
            subject: String::new(),
            affiliation: Affiliation::None,
            truncated: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{joined, msg, park, room, shared};
    use super::*;
    use crate::protocol::RequestId;

    /// An answer goes to the request whose id is its `re`, and nowhere else.
    #[test]
    fn answers_are_routed_by_re() {
        let (s, mut events) = shared(false);
        let (a, mut rx_a) = park(&s, PendingKind::Plain);
        let (b, mut rx_b) = park(&s, PendingKind::Plain);
        s.route(ServerFrame::Pong { re: RequestId(b.to_string()) });
        assert_eq!(rx_b.try_recv().unwrap().unwrap(), ServerFrame::Pong { re: RequestId(b.to_string()) });
        assert!(rx_a.try_recv().is_err());
        s.route(ServerFrame::error(Some(RequestId(a.to_string())), ErrorCode::Forbidden, "no"));
        match rx_a.try_recv().unwrap() {
            Err(ClientError::Server { code: ErrorCode::Forbidden, message }) => assert_eq!(message, "no"),
            other => panic!("{other:?}"),
        }
        assert!(s.state().pending.is_empty());
        assert!(events.try_recv().is_err());
    }

    /// Frames without a matching `re` are events; an error without `re` is an event too.
    #[test]
    fn frames_without_re_become_events() {
        let (s, mut events) = shared(false);
        s.route(msg(1));
        s.route(ServerFrame::error(None, ErrorCode::RateLimited, "slow"));
        s.route(ServerFrame::Goaway { reason: "bye".into(), to: None });
        assert!(matches!(events.try_recv().unwrap(), ClientEvent::Message(m) if m.seq == 1));
        assert!(matches!(events.try_recv().unwrap(), ClientEvent::Error { code: ErrorCode::RateLimited, .. }));
        assert_eq!(events.try_recv().unwrap(), ClientEvent::Goaway { reason: "bye".into(), to: None });
    }

    /// A join without `since` starts the resume point at the room's last seq; message events
    /// move it forward and never back.
    #[test]
    fn joined_rooms_track_the_last_seq_seen() {
        let (s, _events) = shared(false);
        let (id, mut rx) = park(&s, PendingKind::Join { room: room(), password: None, since: None, rejoin: false });
        s.route(joined(id, 7));
        assert!(rx.try_recv().unwrap().is_ok());
        assert_eq!(s.state().rooms[&room()].last_seq, 7);
        s.route(msg(5)); // replayed history
        s.route(msg(9));
        s.route(msg(8));
        assert_eq!(s.state().rooms[&room()].last_seq, 9);
        s.route(ServerFrame::Left { re: RequestId("999".into()), room: room() });
        assert!(s.state().rooms.contains_key(&room()), "a `left` answering nothing is ignored");
        let (id, _rx) = park(&s, PendingKind::Plain);
        s.route(ServerFrame::Left { re: RequestId(id.to_string()), room: room() });
        assert!(!s.state().rooms.contains_key(&room()));
    }

    /// A join with `since` resumes from `since`, so the replayed messages are counted as seen.
    #[test]
    fn join_with_since_starts_from_since() {
        let (s, _events) = shared(false);
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: Some("pw".into()), since: Some(3), rejoin: false });
        s.route(joined(id, 10));
        let st = s.state();
        assert_eq!(st.rooms[&room()].last_seq, 3);
        assert_eq!(st.rooms[&room()].password.as_deref(), Some("pw"));
    }

    /// Re-joins are reported as events; a refused re-join removes the room.
    #[test]
    fn rejoins_are_reported() {
        let (s, mut events) = shared(true);
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: None, since: Some(4), rejoin: true });
        s.route(joined(id, 6));
        assert!(matches!(events.try_recv().unwrap(), ClientEvent::Rejoined(j) if j.last_seq == 6));
        assert_eq!(s.state().rooms[&room()].last_seq, 4);
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: None, since: Some(4), rejoin: true });
        s.route(ServerFrame::Error {
            re: Some(RequestId(id.to_string())),
            code: ErrorCode::Forbidden,
            message: "outcast".into(),
            room: Some(room()),
            retry_after_ms: None,
        });
        assert!(matches!(events.try_recv().unwrap(), ClientEvent::RejoinFailed { code: ErrorCode::Forbidden, .. }));
        assert!(s.state().rooms.is_empty());
    }

    /// Being kicked or the room being destroyed ends membership, so no resume re-joins it.
    #[test]
    fn kick_and_destroy_forget_the_room() {
        let (s, _events) = shared(false);
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: None, since: None, rejoin: false });
        s.route(joined(id, 0));
        let presence = |nick: &str, status: &str| ServerFrame::Presence {
            room: room(),
            user: "ann".into(),
            nick: nick.into(),
            status: status.into(),
            reason: None,
        };
        s.route(presence("other", "kicked"));
        assert!(s.state().rooms.contains_key(&room()));
        s.route(presence("ann", "kicked"));
        assert!(s.state().rooms.is_empty());
        let (id, _rx) = park(&s, PendingKind::Join { room: room(), password: None, since: None, rejoin: false });
        s.route(joined(id, 0));
        s.route(ServerFrame::Destroyed { room: room(), reason: None });
        assert!(s.state().rooms.is_empty());
    }
}
