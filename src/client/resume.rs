//! A connection's life, and a session's across connections: a logged-in socket is taken into
//! use (its reader routes frames into the session), its loss is noticed, and the session is
//! resumed on a new one: a token login on the node or a peer, re-joins with `since`, and the
//! unacknowledged sends written again, with backoff between attempts. This is one cycle, kept
//! in one file: a reader's end starts a resume, and a resume installs the next reader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::ClientError;
use super::events::{ClientEvent, Welcome};
use super::options::{ClientOptions, Login};
use super::session::{Conn, Pending, PendingKind, Phase, Shared, State};
use super::wire::{WsStream, close_reason, encode, handshake, peer_url, write_loop};
use crate::protocol::{ClientFrame, ErrorCode, RequestId, RoomAddr, ServerFrame};

impl Shared {
    /// Take a fresh, logged-in socket into use: spawn its writer and reader.
    pub(super) fn install(self: &Arc<Self>, ws: WsStream, phase: Phase) -> Option<(u64, mpsc::Sender<Message>)> {
        let (sink, stream) = ws.split();
        let (writer, rx) = mpsc::channel(self.options.write_queue.max(1));
        let writer_task = tokio::spawn(write_loop(sink, rx));
        let mut st = self.state();
        if st.phase == Phase::Closed {
            // Dropping the writer's sender closes the socket.
            return None;
        }
        st.generation += 1;
        let generation = st.generation;
        st.conn = Some(Conn { generation, writer: writer.clone(), writer_task });
        st.phase = phase;
        // Spawned under the lock so the handle is in place before any loss handling reads it.
        st.reader = Some(tokio::spawn(read_loop(Arc::clone(self), generation, stream)));
        Some((generation, writer))
    }

    /// Forget connection `generation`: close it, stop its reader, and fail what was waiting on
    /// it. Sends survive when `keep_sends` (a resume will write them again); the rest fail.
    fn drop_connection(&self, st: &mut State, generation: u64, keep_sends: bool) {
        if st.generation != generation {
            return;
        }
        if let Some(conn) = st.conn.take() {
            drop(conn.writer);
        }
        if let Some(reader) = st.reader.take() {
            reader.abort();
        }
        let ids: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| !(keep_sends && matches!(p.kind, PendingKind::Send { .. })))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(p) = st.pending.remove(&id) {
                let _ = p.tx.send(Err(ClientError::Disconnected));
            }
        }
    }

    /// The reader of `generation` saw its socket end.
    fn connection_lost(self: &Arc<Self>, generation: u64, reason: String) {
        let mut st = self.state();
        if st.generation != generation || st.phase == Phase::Closed {
            return;
        }
        tracing::debug!(%reason, user = %st.welcome.user, "connection lost");
        let auto = self.options.reconnect.is_some();
        // The reader calling us is ending by itself; aborting it would cut this very call.
        st.reader = None;
        let keep_sends = auto || st.resuming;
        self.drop_connection(&mut st, generation, keep_sends);
        self.emit(ClientEvent::Disconnected { reason });
        if st.resuming {
            // The running resume sees its requests fail and moves on to the next URL.
            return;
        }
        if auto {
            st.phase = Phase::Resuming;
            st.resuming = true;
            st.resume_task = Some(tokio::spawn(Arc::clone(self).resume_loop()));
        } else {
            st.phase = Phase::Down;
        }
    }

    /// No more reconnects: fail the parked sends and stay down.
    fn give_up(&self, st: &mut State) {
        if st.phase != Phase::Closed {
            st.phase = Phase::Down;
        }
        for (_, p) in std::mem::take(&mut st.pending) {
            let _ = p.tx.send(Err(ClientError::Disconnected));
        }
    }

    /// [`Client::reconnect`](super::Client::reconnect): drop the connection and resume now, trying
    /// each URL once; if all fail, the automatic loop (when configured) carries on, else the
    /// client stays down.
    pub(super) async fn reconnect(self: &Arc<Self>) -> Result<Welcome, ClientError> {
        {
            let mut st = self.state();
            match st.phase {
                Phase::Closed => return Err(ClientError::Closed),
                _ if st.resuming => return Err(ClientError::ReconnectInProgress),
                _ => {}
            }
            st.resuming = true;
            st.phase = Phase::Resuming;
            let generation = st.generation;
            self.drop_connection(&mut st, generation, true);
        }
        let mut last = ClientError::Disconnected;
        let attempts = self.state().urls.len();
        for _ in 0..attempts {
            match self.resume_once().await {
                Ok(welcome) => return Ok(welcome),
                Err(ClientError::Closed) => return Err(ClientError::Closed),
                Err(e) => last = e,
            }
        }
        let auto = self.options.reconnect.is_some();
        let mut st = self.state();
        if auto && st.phase != Phase::Closed {
            // Keep the sends waiting: the automatic loop carries on where this gave up.
            let task = tokio::spawn(Arc::clone(self).resume_loop());
            st.resume_task = Some(task);
        } else {
            st.resuming = false;
            self.give_up(&mut st);
        }
        Err(last)
    }

    /// Retry [`Shared::resume_once`] with backoff until it works, the policy gives up, or
    /// the client is closed.
    async fn resume_loop(self: Arc<Self>) {
        let policy = self.options.reconnect.clone().unwrap_or_default();
        let started = Instant::now();
        let mut backoff = policy.initial_backoff;
        loop {
            match self.resume_once().await {
                Ok(_) => return,
                Err(ClientError::Closed) => return,
                Err(e) => {
                    let out_of_time = policy.give_up_after.is_some_and(|limit| started.elapsed() >= limit);
                    if out_of_time {
                        let mut st = self.state();
                        st.resuming = false;
                        st.resume_task = None;
                        self.give_up(&mut st);
                        self.emit(ClientEvent::ReconnectFailed { reason: e.to_string() });
                        return;
                    }
                    tracing::debug!(error = %e, ?backoff, "reconnect attempt failed");
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(policy.max_backoff);
                }
            }
        }
    }

    /// One resume attempt on the next URL: token login, re-join every room with `since`, then
    /// write every unacknowledged send again. Leaves the client `Ready` on success.
    async fn resume_once(self: &Arc<Self>) -> Result<Welcome, ClientError> {
        let (url, login) = {
            let mut st = self.state();
            if st.phase == Phase::Closed {
                return Err(ClientError::Closed);
            }
            st.url_index = (st.url_index + 1) % st.urls.len().max(1);
            let url = st.urls.get(st.url_index).cloned().unwrap_or_default();
            let login = Login::token(Some(st.welcome.user.clone()), st.welcome.session.clone());
            (url, login)
        };
        let (ws, welcome, _) = handshake(&url, &login, &self.options).await?;
        let Some((generation, writer)) = self.install(ws, Phase::Resuming) else {
            return Err(ClientError::Closed);
        };
        let result = tokio::time::timeout(
            self.options.connect_timeout,
            self.resume_on(generation, &writer, &url, &welcome),
        )
        .await
        .unwrap_or(Err(ClientError::Timeout));
        if result.is_err() {
            let mut st = self.state();
            self.drop_connection(&mut st, generation, true);
        }
        result.map(|()| welcome)
    }

    /// The resume proper, on the new connection `generation`: take its `welcome`, re-join every
    /// room with `since`, then write the unacknowledged sends; `Ready` once none is left.
    async fn resume_on(
        self: &Arc<Self>,
        generation: u64,
        writer: &mpsc::Sender<Message>,
        url: &str,
        welcome: &Welcome,
    ) -> Result<(), ClientError> {
        let mut joins = Vec::new();
        let mut frames = Vec::new();
        {
            let mut st = self.state();
            if st.generation != generation {
                return Err(ClientError::Disconnected);
            }
            st.welcome = welcome.clone();
            let mut urls = candidate_urls(url, welcome, &self.options);
            // Keep earlier candidates too: a peer that is down now may be the one back later.
            for u in std::mem::take(&mut st.urls) {
                if !urls.contains(&u) {
                    urls.push(u);
                }
            }
            st.urls = urls;
            st.url_index = 0;
            self.emit(ClientEvent::Reconnected { url: url.to_owned(), welcome: welcome.clone() });
            let rooms: Vec<(RoomAddr, String, Option<String>, u64)> = st
                .rooms
                .iter()
                .map(|(room, r)| (room.clone(), r.nick.clone(), r.password.clone(), r.last_seq))
                .collect();
            for (room, nick, password, last_seq) in rooms {
                let id = self.ids.next();
                let (tx, rx) = oneshot::channel();
                let since = Some(last_seq);
                let kind = PendingKind::Join { room: room.clone(), password: password.clone(), since, rejoin: true };
                st.pending.insert(id, Pending { kind, tx, written_on: generation });
                frames.push(encode(&ClientFrame::Join { id: RequestId(id.to_string()), room, nick, since, password }));
                joins.push(rx);
            }
        }
        for text in frames {
            writer.send(Message::text(text)).await.map_err(|_| ClientError::Disconnected)?;
        }
        for rx in joins {
            match rx.await {
                // A room that cannot be served right now (moving between nodes): try again.
                Ok(Err(e @ ClientError::Server { code: ErrorCode::Unavailable, .. })) => return Err(e),
                // A refused re-join was reported by the reader (RejoinFailed); carry on.
                Ok(Ok(_)) | Ok(Err(ClientError::Server { .. })) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(ClientError::Disconnected),
            }
        }
        // Resend in submission order until none is left unwritten, then open the gate; sends
        // submitted meanwhile were parked and are picked up by the next round.
        loop {
            let batch: Vec<Utf8Bytes> = {
                let mut st = self.state();
                if st.generation != generation || st.conn.is_none() {
                    return Err(ClientError::Disconnected);
                }
                let batch: Vec<Utf8Bytes> = st
                    .pending
                    .values_mut()
                    .filter(|p| p.written_on != generation)
                    .filter_map(|p| match &p.kind {
                        PendingKind::Send { text } => {
                            p.written_on = generation;
                            Some(text.clone())
                        }
                        _ => None,
                    })
                    .collect();
                if batch.is_empty() {
                    st.phase = Phase::Ready;
                    st.resuming = false;
                    st.resume_task = None;
                    return Ok(());
                }
                batch
            };
            for text in batch {
                writer.send(Message::Text(text)).await.map_err(|_| ClientError::Disconnected)?;
            }
        }
    }
}

/// The URLs a session may resume on, in order: where it is, its peers, configured extras.
pub(super) fn candidate_urls(url: &str, welcome: &Welcome, options: &ClientOptions) -> Vec<String> {
    let extras = options.reconnect.iter().flat_map(|p| p.extra_urls.iter());
    let mut urls = vec![url.to_owned()];
    for u in welcome.peers.iter().map(|p| peer_url(p)).chain(extras.cloned()) {
        if !urls.contains(&u) {
            urls.push(u);
        }
    }
    urls
}

/// Spread reconnects of many clients over time: the wait is 50–100% of `backoff`.
fn jittered(backoff: Duration) -> Duration {
    let ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms / 2 + rand::random_range(0..=ms / 2))
}

/// The socket reader of connection `generation`: routes every frame into the session until the
/// socket ends or the server moves the session elsewhere, then reports the loss.
async fn read_loop(shared: Arc<Shared>, generation: u64, mut stream: SplitStream<WsStream>) {
    let reason = loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(frame) => {
                    if let Some(to) = shared.route(frame) {
                        break format!("moved to {to}");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable server frame ignored"),
            },
            Some(Ok(Message::Close(frame))) => break close_reason(frame.as_ref()),
            Some(Ok(Message::Binary(_))) => tracing::warn!("binary server frame ignored"),
            // Pings are answered by tungstenite itself.
            Some(Ok(_)) => {}
            Some(Err(e)) => break e.to_string(),
            None => break "connection closed".to_owned(),
        }
    };
    shared.connection_lost(generation, reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::session::fixtures::{park, shared};

    /// A lost connection fails waiting requests; sends survive it only when a resume follows.
    #[tokio::test]
    async fn connection_loss_keeps_sends_only_for_a_resume() {
        let text = Utf8Bytes::from("{}");
        let (s, mut events) = shared(false);
        let (_, mut plain) = park(&s, PendingKind::Plain);
        let (_, mut send) = park(&s, PendingKind::Send { text: text.clone() });
        s.connection_lost(1, "gone".into());
        assert!(matches!(plain.try_recv().unwrap(), Err(ClientError::Disconnected)));
        assert!(matches!(send.try_recv().unwrap(), Err(ClientError::Disconnected)));
        assert_eq!(s.state().phase, Phase::Down);
        assert_eq!(events.try_recv().unwrap(), ClientEvent::Disconnected { reason: "gone".into() });

        let (s, _events) = shared(true);
        let (_, mut plain) = park(&s, PendingKind::Plain);
        let (_, mut send) = park(&s, PendingKind::Send { text });
        s.connection_lost(1, "gone".into());
        assert!(matches!(plain.try_recv().unwrap(), Err(ClientError::Disconnected)));
        assert!(send.try_recv().is_err(), "the send waits for the resume");
        let st = s.state();
        assert_eq!(st.phase, Phase::Resuming);
        assert!(st.resuming);
        drop(st);
        drop(s.shutdown());
        assert!(matches!(send.try_recv().unwrap(), Err(ClientError::Closed)));
    }

    /// A loss reported by the reader of an older connection changes nothing.
    #[test]
    fn stale_connection_loss_is_ignored() {
        let (s, _events) = shared(false);
        let (_, mut plain) = park(&s, PendingKind::Plain);
        s.connection_lost(0, "old".into());
        assert!(plain.try_recv().is_err());
        assert_eq!(s.state().phase, Phase::Ready);
    }

    /// Resumes try the node, then its peers (given as `host:port` or URLs), then extras.
    #[test]
    fn candidate_urls_put_peers_after_the_node() {
        let welcome = Welcome {
            user: "u".into(),
            node: "n".into(),
            session: "s".into(),
            service: "c".into(),
            guest: true,
            peers: vec!["10.0.0.2:7450".into(), "ws://a/ws".into()],
        };
        let mut options = ClientOptions::reconnecting();
        options.reconnect.as_mut().unwrap().extra_urls = vec!["ws://x/ws".into()];
        assert_eq!(
            candidate_urls("ws://a/ws", &welcome, &options),
            vec!["ws://a/ws", "ws://10.0.0.2:7450/ws", "ws://x/ws"]
        );
    }
}
