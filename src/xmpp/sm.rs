//! XEP-0198 stream management: acks both ways, and resumption on the same node.
//!
//! Counting: the server counts the stanzas (`<message/>`, `<presence/>`, `<iq/>`) it has handled
//! and answers `<r/>` with `<a h='…'/>`; it keeps every stanza it sent until the client's `<a/>`
//! covers it, and asks with `<r/>` every few stanzas.
//!
//! Resumption: a session that enabled it and whose connection drops without `</stream>` is
//! *parked* for `xmpp.resume_timeout_s`: it stays in its rooms, and what they send queues up. A
//! new connection of the same user that sends `<resume previd='…' h='…'/>` instead of binding
//! takes it over: the stanzas the client did not acknowledge are sent again, then the queue.
//! Parked sessions live in this node's memory only: after a failover the peer does not know
//! the id and answers `<failed/>` (`item-not-found`); the client binds anew, rejoins its rooms
//! and catches up from MAM.

use super::muc::XmppState;
use crate::gateway::Gateway;
use crate::session::{KillReason, Session};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The stream management namespace (version 3).
pub const NS: &str = "urn:xmpp:sm:3";

/// Ask the client for an ack after this many unacknowledged stanzas.
const REQUEST_EVERY: u32 = 5;

/// Whether `element` (a queued element's text) is a stanza, which XEP-0198 counts.
pub fn is_stanza(element: &str) -> bool {
    element.starts_with("<message") || element.starts_with("<presence") || element.starts_with("<iq")
}

/// One session's stream management state, shared by its reader and its writer.
#[derive(Debug, Default)]
pub struct Sm {
    /// Enabled by the client (`<enable/>`).
    pub enabled: bool,
    /// The id to resume with, when resumption was asked for.
    pub id: Option<String>,
    /// Stanzas received from the client and handled (XEP-0198's inbound `h`).
    pub handled: u32,
    /// Stanzas sent to the client, counted (the outbound `h` of the last one).
    sent: u32,
    /// Sent stanzas not acknowledged yet, oldest first, with their count.
    unacked: VecDeque<(u32, String)>,
    /// Sent since the last `<r/>`.
    since_request: u32,
}

impl Sm {
    /// A stanza went out: keep it until acknowledged. True when it is time to ask for an ack.
    pub fn sent(&mut self, stanza: &str) -> bool {
        if !self.enabled || !is_stanza(stanza) {
            return false;
        }
        self.sent = self.sent.wrapping_add(1);
        self.unacked.push_back((self.sent, stanza.to_owned()));
        self.since_request += 1;
        if self.since_request >= REQUEST_EVERY {
            self.since_request = 0;
            true
        } else {
            false
        }
    }

    /// The client acknowledged every stanza up to `h` (counts wrap at 2^32).
    pub fn acked(&mut self, h: u32) {
        while let Some((n, _)) = self.unacked.front() {
            if h.wrapping_sub(*n) < u32::MAX / 2 {
                self.unacked.pop_front();
            } else {
                break;
            }
        }
    }

    /// How many sent stanzas wait for an ack.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// The stanzas to send again after a resumption that acknowledged up to `h`: taken out and
    /// the count set back to `h`, so that sending them counts them again with the same numbers.
    pub fn resend_after(&mut self, h: u32) -> Vec<String> {
        self.acked(h);
        self.sent = h;
        self.since_request = 0;
        self.unacked.drain(..).map(|(_, s)| s).collect()
    }
}

/// A session waiting for its client to resume it.
pub struct Parked {
    pub user: String,
    pub resource: String,
    pub session: Arc<Session>,
    pub state: Arc<XmppState>,
    pub queue: mpsc::Receiver<String>,
    pub sm: Arc<Mutex<Sm>>,
    pub kill: CancellationToken,
}

/// This node's parked sessions, by resumption id.
#[derive(Default)]
pub struct Resumption {
    parked: Mutex<HashMap<String, Parked>>,
}

impl Resumption {
    /// Park `p` under its id for `timeout`; after it (or when the session is killed meanwhile)
    /// the session is closed for good.
    pub fn park(self: &Arc<Self>, id: String, p: Parked, gateway: Arc<Gateway>, timeout: Duration) {
        let (kill, session) = (p.kill.clone(), p.session.clone());
        self.parked.lock().expect("parked lock").insert(id.clone(), p);
        metrics::gauge!("stoa_xmpp_parked_sessions").increment(1.0);
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {}
                _ = kill.cancelled() => {}
            }
            if let Some(p) = me.take(&id) {
                tracing::debug!(session = %p.session.id, "parked xmpp session not resumed; closing it");
                gateway.close_session(&session);
                p.session.kill(KillReason::Shutdown);
            }
        });
    }

    /// Take the parked session `id` (`None`: unknown, expired, or another node's).
    fn take(&self, id: &str) -> Option<Parked> {
        let p = self.parked.lock().expect("parked lock").remove(id);
        if p.is_some() {
            metrics::gauge!("stoa_xmpp_parked_sessions").decrement(1.0);
        }
        p
    }

    /// Take the parked session `id` for `user` (a session is only resumed by its own user).
    pub fn resume(&self, id: &str, user: &str) -> Option<Parked> {
        let mut parked = self.parked.lock().expect("parked lock");
        if parked.get(id).is_some_and(|p| p.user == user) {
            metrics::gauge!("stoa_xmpp_parked_sessions").decrement(1.0);
            parked.remove(id)
        } else {
            None
        }
    }

    /// Close every parked session (the node stops).
    pub fn close_all(&self, gateway: &Gateway) {
        let all: Vec<Parked> = self.parked.lock().expect("parked lock").drain().map(|(_, p)| p).collect();
        for p in all {
            gateway.close_session(&p.session);
            p.session.kill(KillReason::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_drop_what_they_cover_and_resumption_resends_the_rest() {
        let mut sm = Sm { enabled: true, ..Sm::default() };
        let mut requests = 0;
        for i in 0..7 {
            if sm.sent(&format!("<message id='{i}'/>")) {
                requests += 1;
            }
        }
        assert!(!sm.sent("<r xmlns='urn:xmpp:sm:3'/>"), "nonzas are not counted");
        assert_eq!(requests, 1);
        assert_eq!(sm.unacked_count(), 7);
        sm.acked(3);
        assert_eq!(sm.unacked_count(), 4);
        sm.acked(2); // an old ack changes nothing
        assert_eq!(sm.unacked_count(), 4);
        let again = sm.resend_after(5);
        assert_eq!(again, ["<message id='5'/>", "<message id='6'/>"]);
        assert_eq!(sm.unacked_count(), 0);
        // Sent again, they count as 6 and 7, as the first time.
        for s in &again {
            sm.sent(s);
        }
        sm.acked(6);
        assert_eq!(sm.resend_after(6), ["<message id='6'/>"]);
    }

    #[test]
    fn counts_wrap_at_two_to_the_32() {
        let mut sm = Sm { enabled: true, sent: u32::MAX - 1, ..Sm::default() };
        sm.sent("<iq id='a'/>"); // u32::MAX
        sm.sent("<iq id='b'/>"); // 0
        sm.sent("<iq id='c'/>"); // 1
        sm.acked(0);
        assert_eq!(sm.resend_after(0), ["<iq id='c'/>"]);
    }
}
