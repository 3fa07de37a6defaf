//! A v1 connection's one bounded outbound queue: many producers (the session's wire, which
//! rooms write to, and the codec's own answers), one consumer (the connection's writer).
//!
//! Why not `tokio::sync::mpsc`: a bounded tokio channel keeps a 32-slot block and about 500
//! bytes of cache-padded state for as long as it lives, 1.5 KiB per connection whether or not
//! anything is queued. Here the writer takes the whole queue at once ([`Receiver::recv_batch`]),
//! so the queue's buffer leaves with the batch and an idle connection holds none.
//! The semantics are the channel's: `try_send` never blocks and says `Full` at `capacity`
//! queued items and `Closed` once the receiver is gone; `recv_batch` returns `None` once
//! every sender is gone and the queue is empty; items come out in the order they went in.

use super::Outbound;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Why `try_send` did not queue an item.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// `capacity` items are queued already.
    Full,
    /// The receiver is gone.
    Closed,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the receiver when the queue stops being empty, or the last sender goes.
    ready: Notify,
    capacity: usize,
}

struct State {
    items: VecDeque<Outbound>,
    senders: usize,
    receiver: bool,
}

/// A queue of at most `capacity` items.
pub fn queue(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), senders: 1, receiver: true }),
        ready: Notify::new(),
        capacity,
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// The producing side; clones share the queue.
pub struct Sender(Arc<Shared>);

/// The consuming side (one, the writer).
pub struct Receiver(Arc<Shared>);

impl Sender {
    /// Queue `item` unless the queue is full or its receiver gone.
    pub fn try_send(&self, item: Outbound) -> Result<(), TrySendError> {
        let mut state = self.0.state.lock().expect("outbound queue lock");
        if !state.receiver {
            return Err(TrySendError::Closed);
        }
        if state.items.len() >= self.0.capacity {
            return Err(TrySendError::Full);
        }
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        drop(state);
        // The receiver only waits after finding the queue empty.
        if was_empty {
            self.0.ready.notify_one();
        }
        Ok(())
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.0.state.lock().expect("outbound queue lock").senders += 1;
        Sender(self.0.clone())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().expect("outbound queue lock");
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.0.ready.notify_one();
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("outbound::Sender").finish_non_exhaustive()
    }
}

impl Receiver {
    /// Wait for items and take up to `max` of them, oldest first (all of them, and the queue's
    /// buffer with them, when there are no more than `max`); `None` once every sender is gone
    /// and nothing is left.
    pub async fn recv_batch(&mut self, max: usize) -> Option<VecDeque<Outbound>> {
        loop {
            {
                let mut state = self.0.state.lock().expect("outbound queue lock");
                if !state.items.is_empty() {
                    if state.items.len() <= max {
                        return Some(std::mem::take(&mut state.items));
                    }
                    return Some(state.items.drain(..max).collect());
                }
                if state.senders == 0 {
                    return None;
                }
            }
            self.0.ready.notified().await;
        }
    }
}

impl Receiver {
    /// Take up to `max` queued items without waiting (a deliberate close sends them first).
    pub fn take_queued(&mut self, max: usize) -> VecDeque<Outbound> {
        let mut state = self.0.state.lock().expect("outbound queue lock");
        let n = state.items.len().min(max);
        state.items.drain(..n).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().expect("outbound queue lock");
        state.receiver = false;
        // Nothing queued is ever written now.
        state.items = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::Utf8Bytes;

    fn frame(s: &str) -> Outbound {
        Outbound::Frame(Utf8Bytes::from(s.to_owned()))
    }

    fn texts(batch: VecDeque<Outbound>) -> Vec<String> {
        batch
            .into_iter()
            .map(|o| match o {
                Outbound::Frame(t) => t.as_str().to_owned(),
                Outbound::Ping => "ping".to_owned(),
            })
            .collect()
    }

    #[tokio::test]
    async fn items_come_out_in_order_in_batches_of_at_most_max() {
        let (tx, mut rx) = queue(10);
        for s in ["a", "b", "c"] {
            tx.try_send(frame(s)).unwrap();
        }
        tx.try_send(Outbound::Ping).unwrap();
        assert_eq!(texts(rx.recv_batch(2).await.unwrap()), ["a", "b"]);
        assert_eq!(texts(rx.recv_batch(2).await.unwrap()), ["c", "ping"]);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_until_the_receiver_takes_items() {
        let (tx, mut rx) = queue(2);
        tx.try_send(frame("a")).unwrap();
        tx.try_send(frame("b")).unwrap();
        assert_eq!(tx.try_send(frame("c")), Err(TrySendError::Full));
        assert_eq!(texts(rx.recv_batch(1).await.unwrap()), ["a"]);
        tx.try_send(frame("c")).unwrap();
        assert_eq!(texts(rx.recv_batch(8).await.unwrap()), ["b", "c"]);
    }

    #[tokio::test]
    async fn the_receiver_waits_for_a_sender_and_ends_when_all_are_gone() {
        let (tx, mut rx) = queue(4);
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { rx.recv_batch(4).await.map(texts) });
        tokio::task::yield_now().await;
        tx2.try_send(frame("late")).unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), ["late"]);
        let (tx, mut rx) = queue(4);
        let tx2 = tx.clone();
        tx.try_send(frame("kept")).unwrap();
        drop(tx);
        drop(tx2);
        assert_eq!(texts(rx.recv_batch(4).await.unwrap()), ["kept"], "what was queued still comes out");
        assert!(rx.recv_batch(4).await.is_none());
    }

    #[tokio::test]
    async fn sending_after_the_receiver_is_gone_says_closed() {
        let (tx, rx) = queue(4);
        drop(rx);
        assert_eq!(tx.try_send(frame("a")), Err(TrySendError::Closed));
    }
}
