//! The [`Client`] handle: connecting, one method per protocol request with its typed result,
//! and [`PendingAck`] for pipelined sends. A request is written through the session
//! (`Shared::submit`) and answered by `re`; this file only builds frames and reads answers.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::ClientError;
use super::events::{
    Ack, ClientEvent, EventStream, HistoryPage, Joined, JoinedRoom, Welcome, ack_from, joined_from, unexpected,
};
use super::options::{ClientOptions, Login};
use super::resume::candidate_urls;
use super::session::{Answer, PendingKind, Phase, Shared, State};
use super::wire::{IdGen, encode, handshake};
use crate::protocol::{
    Affiliation, ClientFrame, ClientMsgId, RequestId, RoomAddr, RoomConfigPatch, RoomSummary, ServerFrame,
};

/// A connected, logged-in protocol v1 session. Dropping it closes the connection.
///
/// Requests take `&self`, so one client may be shared (`Arc<Client>`) by several tasks and many
/// requests may be in flight at once. Events must be drained ([`Client::events`] or
/// [`Client::next_event`]) or the receiver dropped: they are buffered without bound so that a
/// slow reader never stalls the answers to its own requests.
#[derive(Debug)]
pub struct Client {
    shared: Arc<Shared>,
    events: tokio::sync::Mutex<Option<EventStream>>,
}

/// A `send` in flight: await it for the [`Ack`]. Returned by [`Client::send_nowait`] so that a
/// load generator can pipeline many sends on one connection.
#[derive(Debug)]
pub struct PendingAck {
    rx: oneshot::Receiver<Answer>,
    cid: ClientMsgId,
}

impl PendingAck {
    /// The `cid` of this send.
    pub fn cid(&self) -> &ClientMsgId {
        &self.cid
    }
}

impl Future for PendingAck {
    type Output = Result<Ack, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| r.unwrap_or(Err(ClientError::Closed)).and_then(ack_from))
    }
}

/// Anything that names a room: `&str`, `String`, [`RoomAddr`].
pub trait IntoRoomAddr {
    /// The room address.
    fn into_room_addr(self) -> RoomAddr;
}

impl IntoRoomAddr for RoomAddr {
    fn into_room_addr(self) -> RoomAddr {
        self
    }
}
impl IntoRoomAddr for &RoomAddr {
    fn into_room_addr(self) -> RoomAddr {
        self.clone()
    }
}
impl IntoRoomAddr for &str {
    fn into_room_addr(self) -> RoomAddr {
        RoomAddr(self.to_owned())
    }
}
impl IntoRoomAddr for String {
    fn into_room_addr(self) -> RoomAddr {
        RoomAddr(self)
    }
}
impl IntoRoomAddr for &String {
    fn into_room_addr(self) -> RoomAddr {
        RoomAddr(self.clone())
    }
}

/// A fresh client message id (UUID v7: unique, and sortable by creation time).
pub fn new_cid() -> ClientMsgId {
    ClientMsgId(uuid::Uuid::now_v7().to_string())
}

impl Client {
    /// Connect to `url` (e.g. `ws://127.0.0.1:7450/ws`) and log in, with default options.
    pub async fn connect(url: &str, login: Login) -> Result<(Client, Welcome), ClientError> {
        Client::connect_with(url, login, ClientOptions::default()).await
    }

    /// Connect to `url` and log in.
    pub async fn connect_with(
        url: &str,
        login: Login,
        options: ClientOptions,
    ) -> Result<(Client, Welcome), ClientError> {
        // The URL that served the login (the user's home node, after a redirect).
        let (ws, welcome, url) = handshake(url, &login, &options).await?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let urls = candidate_urls(&url, &welcome, &options);
        let shared = Arc::new(Shared {
            ids: IdGen::new(),
            state: Mutex::new(State {
                phase: Phase::Ready,
                generation: 0,
                conn: None,
                reader: None,
                resume_task: None,
                resuming: false,
                welcome: welcome.clone(),
                urls,
                url_index: 0,
                pending: BTreeMap::new(),
                rooms: HashMap::new(),
            }),
            events: events_tx,
            options,
        });
        shared.install(ws, Phase::Ready);
        let client = Client { shared, events: tokio::sync::Mutex::new(Some(events_rx)) };
        Ok((client, welcome))
    }

    /// The `welcome` of the current (or last) connection.
    pub fn welcome(&self) -> Welcome {
        self.shared.state().welcome.clone()
    }

    /// True while a connection is up and not resuming.
    pub fn is_connected(&self) -> bool {
        self.shared.state().phase == Phase::Ready
    }

    /// The event receiver, handed out once; `None` after that.
    pub fn events(&self) -> Option<EventStream> {
        self.events.try_lock().ok().and_then(|mut g| g.take())
    }

    /// The next event, while the receiver has not been taken with [`Client::events`].
    /// `None` once the receiver was taken or the client is closed.
    pub async fn next_event(&self) -> Option<ClientEvent> {
        self.events.lock().await.as_mut()?.recv().await
    }

    /// The rooms this client is in, with the last `seq` seen in each.
    pub fn rooms(&self) -> Vec<JoinedRoom> {
        let st = self.shared.state();
        let mut rooms: Vec<JoinedRoom> = st
            .rooms
            .iter()
            .map(|(room, r)| JoinedRoom { room: room.clone(), nick: r.nick.clone(), last_seq: r.last_seq })
            .collect();
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        rooms
    }

    /// The last `seq` seen in `room`, if we are in it.
    pub fn last_seq(&self, room: impl IntoRoomAddr) -> Option<u64> {
        self.shared.state().rooms.get(&room.into_room_addr()).map(|r| r.last_seq)
    }

    /// Create a room; the creator becomes its owner. Answers the room's address.
    pub async fn create(&self, room: impl IntoRoomAddr, config: RoomConfigPatch) -> Result<RoomAddr, ClientError> {
        let room = room.into_room_addr();
        match self.request(PendingKind::Plain, |id| ClientFrame::Create { id, room, config }).await? {
            ServerFrame::Created { room, .. } => Ok(room),
            other => Err(unexpected("created", &other)),
        }
    }

    /// Join a room under `nick`. Without `since` the room's last `history_on_join` messages
    /// follow as events; with `since` every message after it does (up to the join limit, see
    /// [`Joined::truncated`]). Answers when `joined` arrives, before those messages.
    pub async fn join(
        &self,
        room: impl IntoRoomAddr,
        nick: impl Into<String>,
        since: Option<u64>,
        password: Option<String>,
    ) -> Result<Joined, ClientError> {
        let (room, nick) = (room.into_room_addr(), nick.into());
        let kind = PendingKind::Join { room: room.clone(), password: password.clone(), since, rejoin: false };
        let answer = self.request(kind, |id| ClientFrame::Join { id, room, nick, since, password }).await?;
        joined_from(answer)
    }

    /// Leave a room.
    pub async fn leave(&self, room: impl IntoRoomAddr) -> Result<(), ClientError> {
        let room = room.into_room_addr();
        match self.request(PendingKind::Plain, |id| ClientFrame::Leave { id, room }).await? {
            ServerFrame::Left { .. } => Ok(()),
            other => Err(unexpected("left", &other)),
        }
    }

    /// Send a message and wait until it is committed. Resending the same `cid` (e.g. after an
    /// `unavailable` answer) is safe: the server answers the original `seq`, `duplicate: true`.
    pub async fn send(
        &self,
        room: impl IntoRoomAddr,
        body: impl Into<String>,
        cid: ClientMsgId,
    ) -> Result<Ack, ClientError> {
        self.send_nowait(room, body, cid).await?.await
    }

    /// Queue a message for sending and return at once with a future of its [`Ack`]: many
    /// sends may be in flight on one connection. Waits only when the write queue is full.
    pub async fn send_nowait(
        &self,
        room: impl IntoRoomAddr,
        body: impl Into<String>,
        cid: ClientMsgId,
    ) -> Result<PendingAck, ClientError> {
        let (room, body) = (room.into_room_addr(), body.into());
        let id = self.shared.ids.next();
        let frame = ClientFrame::Send { id: RequestId(id.to_string()), room, body, cid: cid.clone() };
        let text = Utf8Bytes::from(encode(&frame));
        let rx = self.shared.submit(id, PendingKind::Send { text: text.clone() }, text).await?;
        Ok(PendingAck { rx, cid })
    }

    /// Read stored messages, ascending. `before` / `after` are exclusive `seq` bounds; `limit`
    /// defaults to 50 on the server.
    pub async fn history(
        &self,
        room: impl IntoRoomAddr,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ClientError> {
        let room = room.into_room_addr();
        match self.request(PendingKind::Plain, |id| ClientFrame::History { id, room, before, after, limit }).await? {
            ServerFrame::History { room, messages, truncated, .. } => Ok(HistoryPage { room, messages, truncated }),
            other => Err(unexpected("history", &other)),
        }
    }

    /// Set the room's subject (admins and owners).
    pub async fn subject(&self, room: impl IntoRoomAddr, subject: impl Into<String>) -> Result<(), ClientError> {
        let (room, subject) = (room.into_room_addr(), subject.into());
        self.request_ok(|id| ClientFrame::Subject { id, room, subject }).await
    }

    /// Change the room's configuration (owners).
    pub async fn configure(&self, room: impl IntoRoomAddr, config: RoomConfigPatch) -> Result<(), ClientError> {
        let room = room.into_room_addr();
        self.request_ok(|id| ClientFrame::Configure { id, room, config }).await
    }

    /// Set a user's affiliation with the room.
    pub async fn affiliate(
        &self,
        room: impl IntoRoomAddr,
        user: impl Into<String>,
        affiliation: Affiliation,
    ) -> Result<(), ClientError> {
        let (room, user) = (room.into_room_addr(), user.into());
        self.request_ok(|id| ClientFrame::Affiliate { id, room, user, affiliation }).await
    }

    /// Kick an occupant by nick (admins and owners).
    pub async fn kick(
        &self,
        room: impl IntoRoomAddr,
        nick: impl Into<String>,
        reason: Option<String>,
    ) -> Result<(), ClientError> {
        let (room, nick) = (room.into_room_addr(), nick.into());
        self.request_ok(|id| ClientFrame::Kick { id, room, nick, reason }).await
    }

    /// Destroy the room (owners).
    pub async fn destroy(&self, room: impl IntoRoomAddr, reason: Option<String>) -> Result<(), ClientError> {
        let room = room.into_room_addr();
        self.request_ok(|id| ClientFrame::Destroy { id, room, reason }).await
    }

    /// Public rooms plus the rooms the user is affiliated with.
    pub async fn list(&self) -> Result<Vec<RoomSummary>, ClientError> {
        match self.request(PendingKind::Plain, |id| ClientFrame::List { id, after: None, limit: None }).await? {
            ServerFrame::Rooms { rooms, .. } => Ok(rooms),
            other => Err(unexpected("rooms", &other)),
        }
    }

    /// Round trip to the server; answers the time it took.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.request(PendingKind::Plain, |id| ClientFrame::Ping { id }).await? {
            ServerFrame::Pong { .. } => Ok(start.elapsed()),
            other => Err(unexpected("pong", &other)),
        }
    }

    /// Drop the current connection (if any) and resume on a new one now: log in with the
    /// session token on the next URL (the node, then its peers), re-join every room with
    /// `since = last seq seen`, and resend unacknowledged sends with their `cid`. Requests
    /// other than sends that were in flight fail with [`ClientError::Disconnected`].
    pub async fn reconnect(&self) -> Result<Welcome, ClientError> {
        self.shared.reconnect().await
    }

    /// Close the connection gracefully: queued frames are written, then a close frame.
    pub async fn close(self) {
        let writer = self.shared.shutdown();
        if let Some(task) = writer {
            // The writer ends by itself once its queue is drained; an error is moot now.
            let _ = task.await;
        }
    }

    async fn request(
        &self,
        kind: PendingKind,
        frame: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        let id = self.shared.ids.next();
        let text = Utf8Bytes::from(encode(&frame(RequestId(id.to_string()))));
        let rx = self.shared.submit(id, kind, text).await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    async fn request_ok(&self, frame: impl FnOnce(RequestId) -> ClientFrame) -> Result<(), ClientError> {
        match self.request(PendingKind::Plain, frame).await? {
            ServerFrame::Ok { .. } => Ok(()),
            other => Err(unexpected("ok", &other)),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The writer task finishes on its own: it writes what is queued and a close frame.
        drop(self.shared.shutdown());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::session::fixtures::{park, room, shared};

    /// A pending ack resolves from the routed answer; a dropped client resolves it `Closed`.
    #[tokio::test]
    async fn pending_ack_resolves_from_the_answer() {
        let (s, _events) = shared(false);
        let (id, rx) = park(&s, PendingKind::Send { text: Utf8Bytes::from("{}") });
        let pending = PendingAck { rx, cid: ClientMsgId("c".into()) };
        s.route(ServerFrame::Ack { re: RequestId(id.to_string()), room: room(), seq: 1, ts: 2, duplicate: false });
        assert_eq!(pending.await.unwrap().seq, 1);
        let (_, rx) = park(&s, PendingKind::Send { text: Utf8Bytes::from("{}") });
        drop(s.shutdown());
        let pending = PendingAck { rx, cid: ClientMsgId("d".into()) };
        assert!(matches!(pending.await, Err(ClientError::Closed)));
    }

    /// Client message ids are fresh every time.
    #[test]
    fn new_cids_are_distinct() {
        assert_ne!(new_cid(), new_cid());
    }
}
