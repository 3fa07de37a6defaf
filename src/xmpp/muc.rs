//! XEP-0045 over Stoa rooms: what an XMPP session receives from its rooms.
//!
//! [`XmppWire`] is the XMPP side of a [`crate::session::Session`]: it turns room events and
//! answers into MUC stanzas on the connection's queue. A stanza for many occupants is made once
//! per event ([`Delivery::encoded`] with [`Protocol::Xmpp`]) without its `to`, which each
//! occupant adds (`<message to='…'` + the cached rest).
//!
//! A join is answered, in this order (XEP-0045 §7.2): the presence of every other occupant,
//! the joiner's own presence (status 110, 100 = the room shows real JIDs, 201 = just
//! created), the history (with XEP-0203 delay, filtered by the join's `<history/>`), and the
//! subject (always, maybe empty). Groupchat messages carry the stored message's id as the
//! XEP-0359 `stanza-id`, the sender's `origin-id` (Stoa's cid), and XEP-0421 `occupant-id`.

use super::{escape, ns};
use crate::ids::RoomAddr;
use crate::event::{ChatMessage, Delivery, Protocol, RoomAnswer, RoomEvent};
use crate::protocol::{Affiliation, ErrorCode};
use crate::session::{Queued, Wire};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use xmpp_parsers::minidom;

/// Which history a join asks for (XEP-0045 §7.2.13); applied to the room's replay.
#[derive(Clone, Debug, Default)]
pub struct HistoryFilter {
    pub max_stanzas: Option<usize>,
    pub max_chars: Option<usize>,
    /// Only messages newer than this (Unix ms), from `seconds` or `since`.
    pub newer_than_ms: Option<i64>,
}

impl HistoryFilter {
    /// The `<history/>` of a join's `<x xmlns='…muc'/>`, if any.
    pub fn from_join(x: Option<&minidom::Element>, now_ms: i64) -> Self {
        let Some(history) = x.and_then(|x| x.get_child("history", ns::MUC)) else { return HistoryFilter::default() };
        let num = |name: &str| history.attr(name).and_then(|v| v.parse::<u64>().ok());
        let seconds = num("seconds").map(|s| now_ms - (s.min(10 * 365 * 86_400) as i64) * 1000);
        let since = history.attr("since").and_then(parse_xep82);
        HistoryFilter {
            max_stanzas: num("maxstanzas").map(|n| n as usize),
            max_chars: num("maxchars").map(|n| n as usize),
            newer_than_ms: seconds.max(since),
        }
    }

    /// The messages of `replay` (oldest first) this filter keeps: the newest ones that fit.
    fn keep<'a>(&self, replay: &'a [Arc<Delivery>]) -> &'a [Arc<Delivery>] {
        let mut start = replay.len();
        let mut chars = 0usize;
        for (i, d) in replay.iter().enumerate().rev() {
            let RoomEvent::Message(m) = &d.event else { break };
            if self.max_stanzas.is_some_and(|n| replay.len() - i > n) || self.newer_than_ms.is_some_and(|t| m.ts <= t) {
                break;
            }
            chars += m.body.len() + 200;
            if self.max_chars.is_some_and(|n| chars > n) {
                break;
            }
            start = i;
        }
        &replay[start..]
    }
}

/// An XEP-0082 date-time (`2026-12-04T21:34:10Z`, fractions and offsets allowed) as Unix ms.
/// Every part is its fixed number of ASCII digits (the year four), so no arithmetic below can
/// overflow whatever a client sends (the `xmpp_stream` fuzz target found an offset of 40 digits).
pub fn parse_xep82(text: &str) -> Option<i64> {
    let (date, time) = text.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, mo, day) = (digits(d.next()?, 4)?, digits(d.next()?, 2)?, digits(d.next()?, 2)?);
    let (clock, offset_min) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (h, m) = off[1..].split_once(':')?;
        let (h, m) = (digits(h, 2)?, digits(m, 2)?);
        if h > 23 || m > 59 {
            return None;
        }
        (c, sign * (h * 60 + m))
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, s) = (digits(t.next()?, 2)?, digits(t.next()?, 2)?, digits(t.next()?, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ms_frac = frac.chars().chain("000".chars()).take(3).collect::<String>().parse::<i64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let (yy, mm) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + s) - offset_min * 60) * 1000 + ms_frac)
}

/// `text` as a number of exactly `len` ASCII digits.
fn digits(text: &str, len: usize) -> Option<i64> {
    (text.len() == len && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
}

/// A request of this session a room will answer later, by its request id.
#[derive(Clone, Debug)]
pub enum Pending {
    Join { room: RoomAddr, nick: String, id: Option<String>, history: HistoryFilter, created: bool },
    Send { room: RoomAddr, id: Option<String>, origin: String, body: String },
}

/// What the c2s connection and the wire share about one XMPP session.
pub struct XmppState {
    /// The session's full JID (`user@domain/resource`).
    pub jid: String,
    /// The session's Stoa user name.
    pub user: String,
    /// The XMPP domain of this node's users ([`super::jid_of_user`]).
    pub domain: String,
    /// The address the stream speaks for: the server's domain (c2s), or the component's.
    pub server: String,
    /// A session of the component link (it shares the stream with every other occupant from
    /// that server: it never ends the stream).
    pub component: bool,
    out: mpsc::Sender<String>,
    /// My nick in each room I am in (or joining).
    nicks: Mutex<HashMap<RoomAddr, String>>,
    pending: Mutex<HashMap<String, Pending>>,
    next_request: AtomicU64,
    /// The stream is ending: nothing more is queued (a stream error is the last element).
    ended: std::sync::atomic::AtomicBool,
}

impl XmppState {
    /// A client-to-server session of `user`, bound as `jid`.
    pub fn new(jid: String, user: String, domain: String, out: mpsc::Sender<String>) -> Arc<Self> {
        let server = domain.clone();
        XmppState::with(jid, user, domain, server, false, out)
    }

    /// An occupant `jid` (of another server) of the component `server`.
    pub fn for_component(jid: String, user: String, domain: String, server: String, out: mpsc::Sender<String>) -> Arc<Self> {
        XmppState::with(jid, user, domain, server, true, out)
    }

    fn with(jid: String, user: String, domain: String, server: String, component: bool, out: mpsc::Sender<String>) -> Arc<Self> {
        Arc::new(XmppState {
            jid,
            user,
            domain,
            server,
            component,
            out,
            nicks: Mutex::default(),
            pending: Mutex::default(),
            next_request: AtomicU64::new(1),
            ended: Default::default(),
        })
    }

    /// Queue a stanza.
    pub fn send(&self, stanza: String) -> Queued {
        if self.ended.load(Ordering::Acquire) {
            return Queued::Closed;
        }
        match self.out.try_send(stanza) {
            Ok(()) => Queued::Yes,
            Err(mpsc::error::TrySendError::Full(_)) => Queued::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Queued::Closed,
        }
    }

    /// End the stream: queue `last` (a stream error, or nothing) and then nothing more.
    pub fn end(&self, last: Option<String>) {
        if !self.ended.swap(true, Ordering::AcqRel)
            && let Some(last) = last
        {
            let _ = self.out.try_send(last);
        }
    }

    /// Remember `pending` under a new request id, which the room will answer with.
    pub fn expect(&self, pending: Pending) -> crate::protocol::RequestId {
        let re = format!("x{}", self.next_request.fetch_add(1, Ordering::Relaxed));
        self.pending.lock().expect("pending lock").insert(re.clone(), pending);
        crate::protocol::RequestId(re)
    }

    /// Forget a request the gateway refused (the room will not answer it).
    pub fn forget(&self, re: &crate::protocol::RequestId) -> Option<Pending> {
        self.pending.lock().expect("pending lock").remove(&re.0)
    }

    /// My nick in `room`, if I am in it.
    pub fn nick(&self, room: &RoomAddr) -> Option<String> {
        self.nicks.lock().expect("nicks lock").get(room).cloned()
    }

    /// The rooms I am in, with my nick in each.
    pub fn rooms(&self) -> Vec<(RoomAddr, String)> {
        self.nicks.lock().expect("nicks lock").iter().map(|(r, n)| (r.clone(), n.clone())).collect()
    }
}

/// The XMPP side of a session.
pub struct XmppWire {
    pub state: Arc<XmppState>,
    /// The node's settings: the topology names where `see-other-host` sends a client.
    pub settings: Arc<crate::config::Settings>,
}

/// An occupant's XEP-0421 id: stable per user and room, reveals neither.
pub fn occupant_id(room: &RoomAddr, user: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new().chain_update(b"stoa occupant-id\0").chain_update(room.0.as_bytes()).chain_update(b"\0").chain_update(user.as_bytes()).finalize();
    hex::encode(&digest[..16])
}

/// The MUC role an affiliation gets in a Stoa room.
fn role(a: Affiliation) -> &'static str {
    match a {
        Affiliation::Owner | Affiliation::Admin => "moderator",
        Affiliation::Outcast => "none",
        _ => "participant",
    }
}

/// `<message … type='groupchat'>` of a stored message, without `<message` and `to`.
pub(super) fn message_rest(m: &ChatMessage, delay: bool) -> String {
    let room = escape(&m.room.0);
    let mut s = format!(" from='{room}/{}' type='groupchat' id='{}'>", escape(&m.nick), escape(&m.cid));
    let _ = write!(s, "<body>{}</body>", escape(&m.body));
    let _ = write!(s, "<stanza-id xmlns='{}' id='{}' by='{room}'/>", ns::SID, escape(&m.id));
    let _ = write!(s, "<origin-id xmlns='{}' id='{}'/>", ns::SID, escape(&m.cid));
    let _ = write!(s, "<occupant-id xmlns='{}' id='{}'/>", ns::OCCUPANT_ID, occupant_id(&m.room, &m.from));
    if delay {
        let _ = write!(s, "<delay xmlns='{}' from='{room}' stamp='{}'/>", ns::DELAY, super::xep82(m.ts));
    }
    s.push_str("</message>");
    s
}

/// An occupant's presence as this session is told it.
struct OccupantPresence<'a> {
    room: &'a RoomAddr,
    nick: &'a str,
    user: &'a str,
    affiliation: Affiliation,
    /// `unavailable` (left, kicked, gone).
    gone: bool,
    /// MUC status codes (110 = yourself, 307 = kicked, …).
    codes: &'a [u16],
    reason: Option<&'a str>,
}

impl OccupantPresence<'_> {
    /// The stanza without `<presence` and `to`; real JIDs of this node's users are
    /// `user@domain`.
    fn rest(&self, domain: &str) -> String {
        let mut s = format!(" from='{}/{}'", escape(&self.room.0), escape(self.nick));
        if self.gone {
            s.push_str(" type='unavailable'");
        }
        let _ = write!(
            s,
            "><x xmlns='{}'><item affiliation='{}' role='{}' jid='{}'",
            ns::MUC_USER,
            self.affiliation.as_str(),
            if self.gone { "none" } else { role(self.affiliation) },
            escape(&super::jid_of_user(self.user, domain)),
        );
        match self.reason {
            Some(r) => {
                let _ = write!(s, "><reason>{}</reason></item>", escape(r));
            }
            None => s.push_str("/>"),
        }
        for code in self.codes {
            let _ = write!(s, "<status code='{code}'/>");
        }
        let _ = write!(s, "</x><occupant-id xmlns='{}' id='{}'/></presence>", ns::OCCUPANT_ID, occupant_id(self.room, self.user));
        s
    }
}

/// A stanza error's type and condition for a gateway or room error code.
pub fn condition(code: ErrorCode) -> (&'static str, &'static str) {
    match code {
        ErrorCode::BadRequest => ("modify", "bad-request"),
        ErrorCode::Unauthorized => ("auth", "not-authorized"),
        ErrorCode::Forbidden => ("auth", "forbidden"),
        ErrorCode::NotFound => ("cancel", "item-not-found"),
        ErrorCode::Conflict => ("cancel", "conflict"),
        // RFC 6120's `policy-violation` is unknown to RFC 3920 clients (slixmpp, for one).
        ErrorCode::TooLarge => ("modify", "not-acceptable"),
        ErrorCode::RateLimited => ("wait", "resource-constraint"),
        ErrorCode::Unavailable => ("wait", "service-unavailable"),
        ErrorCode::Internal => ("cancel", "internal-server-error"),
        ErrorCode::Rejected => ("modify", "not-acceptable"),
    }
}

/// `<error …>` with a condition and a text.
pub fn error_element(kind: &str, cond: &str, text: &str) -> String {
    format!(
        "<error type='{kind}'><{cond} xmlns='{}'/><text xmlns='{}'>{}</text></error>",
        ns::STANZA_ERRORS,
        ns::STANZA_ERRORS,
        escape(text)
    )
}

impl XmppWire {
    /// `<name to='my full JID'` and `rest`: a stanza addressed to this session.
    fn to(&self, rest: &str, name: &str) -> String {
        // Once per delivery, so by hand rather than through `format!`.
        let jid = escape(&self.state.jid);
        let mut stanza = String::with_capacity(name.len() + jid.len() + rest.len() + 6);
        for part in ["<", name, " to='", &jid, "'", rest] {
            stanza.push_str(part);
        }
        stanza
    }

    /// The answer to a join (`RoomAnswer::Joined`), in XEP-0045 order.
    fn joined(&self, answer: RoomAnswer, pending: Option<Pending>) -> Queued {
        let RoomAnswer::Joined { room, nick, occupants, subject, affiliation, replay, .. } = answer else { return Queued::Yes };
        let st = &self.state;
        let (id, history, created) = match pending {
            Some(Pending::Join { id, history, created, .. }) => (id, history, created),
            _ => (None, HistoryFilter::default(), false),
        };
        st.nicks.lock().expect("nicks lock").insert(room.clone(), nick.clone());
        let mut q = Queued::Yes;
        let mut send = |stanza: String| {
            if q == Queued::Yes {
                q = st.send(stanza);
            }
        };
        for o in occupants.iter().filter(|o| o.nick != nick) {
            let p = OccupantPresence { room: &room, nick: &o.nick, user: &o.user, affiliation: Affiliation::None, gone: false, codes: &[], reason: None };
            send(self.to(&p.rest(&st.domain), "presence"));
        }
        let codes: &[u16] = if created { &[100, 110, 201] } else { &[100, 110] };
        let mut me = OccupantPresence { room: &room, nick: &nick, user: &st.user, affiliation, gone: false, codes, reason: None }.rest(&st.domain);
        if let Some(id) = id {
            me = format!(" id='{}'{me}", escape(&id));
        }
        send(self.to(&me, "presence"));
        for d in history.keep(&replay) {
            if let RoomEvent::Message(m) = &d.event {
                send(self.to(&message_rest(m, true), "message"));
            }
        }
        send(self.to(&format!(" from='{}' type='groupchat'><subject>{}</subject></message>", escape(&room.0), escape(&subject)), "message"));
        q
    }

    fn error_answer(&self, room: RoomAddr, code: ErrorCode, message: &str, pending: Option<Pending>) -> Queued {
        let (kind, cond) = condition(code);
        let error = error_element(kind, cond, message);
        match pending {
            Some(Pending::Join { room, nick, id, .. }) => {
                self.state.nicks.lock().expect("nicks lock").remove(&room);
                let id = id.map(|i| format!(" id='{}'", escape(&i))).unwrap_or_default();
                self.state.send(self.to(&format!("{id} from='{}/{}' type='error'><x xmlns='{}'/>{error}</presence>", escape(&room.0), escape(&nick), ns::MUC), "presence"))
            }
            Some(Pending::Send { room, id, body, .. }) => {
                let id = id.map(|i| format!(" id='{}'", escape(&i))).unwrap_or_default();
                self.state.send(self.to(&format!("{id} from='{}' type='error'><body>{}</body>{error}</message>", escape(&room.0), escape(&body)), "message"))
            }
            // The room cannot serve me any more.
            None => {
                let nick = self.state.nicks.lock().expect("nicks lock").remove(&room);
                match nick {
                    Some(nick) => {
                        let p = OccupantPresence { room: &room, nick: &nick, user: &self.state.user, affiliation: Affiliation::None, gone: true, codes: &[110, 332], reason: Some(message) };
                        self.state.send(self.to(&p.rest(&self.state.domain), "presence"))
                    }
                    None => Queued::Yes,
                }
            }
        }
    }
}

impl Wire for XmppWire {
    fn deliver(&self, delivery: &Arc<Delivery>) -> Queued {
        let st = &self.state;
        match &delivery.event {
            RoomEvent::Message(_) | RoomEvent::Subject { .. } | RoomEvent::Configured { .. } => {
                let (name, rest): (&str, Arc<str>) = delivery.encoded(Protocol::Xmpp, |event| match event {
                    RoomEvent::Message(m) => ("message", message_rest(m, false).into()),
                    RoomEvent::Subject { room, subject, .. } => {
                        ("message", format!(" from='{}' type='groupchat'><subject>{}</subject></message>", escape(&room.0), escape(subject)).into())
                    }
                    RoomEvent::Configured { room, .. } => (
                        "message",
                        format!(" from='{}' type='groupchat'><x xmlns='{}'><status code='104'/></x></message>", escape(&room.0), ns::MUC_USER).into(),
                    ),
                    _ => unreachable!("only these are cached"),
                });
                st.send(self.to(&rest, name))
            }
            RoomEvent::Presence { room, user, nick, status, reason } => {
                let gone = status != "joined";
                let mine = st.nick(room).is_some_and(|n| &n == nick) && *user == st.user;
                let mut codes: Vec<u16> = Vec::new();
                if status == "kicked" {
                    codes.push(307);
                }
                if mine {
                    codes.push(110);
                    if gone {
                        st.nicks.lock().expect("nicks lock").remove(room);
                    }
                }
                let p = OccupantPresence { room, nick, user, affiliation: Affiliation::None, gone, codes: &codes, reason: reason.as_deref() };
                st.send(self.to(&p.rest(&st.domain), "presence"))
            }
            RoomEvent::Destroyed { room, reason } => {
                let Some(nick) = st.nicks.lock().expect("nicks lock").remove(room) else { return Queued::Yes };
                let reason = reason.as_deref().map(|r| format!("<reason>{}</reason>", escape(r))).unwrap_or_default();
                st.send(self.to(
                    &format!(
                        " from='{}/{}' type='unavailable'><x xmlns='{}'><item affiliation='none' role='none'/><destroy>{reason}</destroy><status code='110'/></x></presence>",
                        escape(&room.0),
                        escape(&nick),
                        ns::MUC_USER
                    ),
                    "presence",
                ))
            }
            RoomEvent::Moved { room, .. } => {
                let Some(nick) = st.nicks.lock().expect("nicks lock").remove(room) else { return Queued::Yes };
                // 332: removed because the room's service went away here; rejoining finds it
                // where it is served now.
                let reason = Some("the room moved to another node; rejoin");
                let p = OccupantPresence { room, nick: &nick, user: &st.user, affiliation: Affiliation::None, gone: true, codes: &[110, 332], reason };
                st.send(self.to(&p.rest(&st.domain), "presence"))
            }
        }
    }

    fn answer(&self, answer: RoomAnswer) -> Queued {
        match answer {
            RoomAnswer::Joined { ref re, .. } => {
                let pending = self.state.forget(re);
                self.joined(answer, pending)
            }
            // The room also sends the presence of the leave, which is what XMPP shows.
            RoomAnswer::Left { .. } => Queued::Yes,
            RoomAnswer::Ack { re, room, seq: _, ts: _, duplicate } => {
                let pending = self.state.forget(&re);
                if !duplicate {
                    return Queued::Yes;
                }
                // A resent origin-id: stored once, reflected again so the client sees it went.
                let Some(Pending::Send { id, origin, body, .. }) = pending else { return Queued::Yes };
                let Some(nick) = self.state.nick(&room) else { return Queued::Yes };
                let id = id.unwrap_or_else(|| origin.clone());
                self.state.send(self.to(
                    &format!(
                        " from='{}/{}' type='groupchat' id='{}'><body>{}</body><origin-id xmlns='{}' id='{}'/></message>",
                        escape(&room.0),
                        escape(&nick),
                        escape(&id),
                        escape(&body),
                        ns::SID,
                        escape(&origin)
                    ),
                    "message",
                ))
            }
            RoomAnswer::Error { re, room, code, message } => {
                let pending = re.as_ref().and_then(|re| self.state.forget(re));
                self.error_answer(room, code, &message, pending)
            }
        }
    }

    fn goaway(&self, reason: &str, to: Option<&str>) -> Queued {
        if self.state.component {
            // The stream is the server's, shared with every other occupant: the occupant leaves
            // each room (332: a system shutdown here) and rejoins where the rooms are served now.
            let rooms: Vec<(RoomAddr, String)> = self.state.nicks.lock().expect("nicks lock").drain().collect();
            let mut q = Queued::Yes;
            for (room, nick) in rooms {
                let p = OccupantPresence { room: &room, nick: &nick, user: &self.state.user, affiliation: Affiliation::None, gone: true, codes: &[110, 332], reason: Some(reason) };
                if q == Queued::Yes {
                    q = self.state.send(self.to(&p.rest(&self.state.domain), "presence"));
                }
            }
            return q;
        }
        // RFC 6120 §4.9.3.19: the client reconnects to the named host (and port). `to` is a
        // node's v1 client URL: its XMPP address where the topology gives one, else its host
        // (the client keeps its own XMPP port).
        let host = to.map(|to| match self.settings.xmpp_address_of(to) {
            Some(xmpp) => xmpp.to_owned(),
            None => url::Url::parse(to).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_else(|| to.to_owned()),
        });
        let (cond, text) = match host {
            Some(host) => (format!("<see-other-host xmlns='{}'>{}</see-other-host>", ns::STREAM_ERRORS, escape(&host)), reason),
            None => (format!("<system-shutdown xmlns='{}'/>", ns::STREAM_ERRORS), reason),
        };
        self.state.end(Some(format!("<stream:error>{cond}<text xmlns='{}'>{}</text></stream:error>", ns::STREAM_ERRORS, escape(text))));
        Queued::Yes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xep82_dates_parse_with_fractions_and_offsets() {
        assert_eq!(parse_xep82("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_xep82("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_xep82("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_xep82(&super::super::xep82(1_780_000_123_456)), Some(1_780_000_123_456));
        assert_eq!(parse_xep82("yesterday"), None);
        // Found by the xmpp_stream fuzz target: a long offset overflowed the arithmetic.
        assert_eq!(parse_xep82("2026-12-02T01:00:00+00000000000000000000000000000000001:00"), None);
        assert_eq!(parse_xep82("99999999999-12-02T01:00:00Z"), None);
        assert_eq!(parse_xep82("2026-12-02T-1:00:00Z"), None);
        assert_eq!(parse_xep82("2026-12-02T01:00:00.5x5Z"), None);
        assert_eq!(parse_xep82("2026-13-01T00:00:00Z"), None);
    }

    fn message(seq: u64, ts: i64, body: &str) -> Arc<Delivery> {
        Delivery::new(RoomEvent::Message(ChatMessage {
            room: RoomAddr("r@s".into()),
            seq,
            id: format!("id{seq}"),
            from: "ann".into(),
            nick: "Ann".into(),
            body: body.into(),
            cid: format!("c{seq}"),
            ts,
        }))
    }

    #[test]
    fn the_history_filter_keeps_the_newest_messages_that_fit() {
        let replay: Vec<_> = (1..=10).map(|i| message(i, i as i64 * 1000, "hello")).collect();
        let all = HistoryFilter::default();
        assert_eq!(all.keep(&replay).len(), 10);
        let three = HistoryFilter { max_stanzas: Some(3), ..Default::default() };
        let kept = three.keep(&replay);
        assert_eq!(kept.len(), 3);
        assert!(matches!(&kept[0].event, RoomEvent::Message(m) if m.seq == 8));
        let none = HistoryFilter { max_stanzas: Some(0), ..Default::default() };
        assert!(none.keep(&replay).is_empty());
        let recent = HistoryFilter { newer_than_ms: Some(7000), ..Default::default() };
        assert_eq!(recent.keep(&replay).len(), 3);
        let chars = HistoryFilter { max_chars: Some(450), ..Default::default() };
        assert_eq!(chars.keep(&replay).len(), 2);
    }

    #[test]
    fn a_message_stanza_is_escaped_and_carries_its_ids() {
        let d = message(7, 0, "<b>&'\"\u{0}");
        let RoomEvent::Message(m) = &d.event else { unreachable!() };
        let text = format!("<message to='x'{}", message_rest(m, true));
        let parsed: minidom::Element = text.replace("<message ", "<message xmlns='jabber:client' ").parse().expect("well-formed");
        assert_eq!(parsed.get_child("body", ns::CLIENT).unwrap().text(), "<b>&'\"\u{FFFD}");
        assert_eq!(parsed.get_child("stanza-id", ns::SID).unwrap().attr("id"), Some("id7"));
        assert_eq!(parsed.get_child("origin-id", ns::SID).unwrap().attr("id"), Some("c7"));
        assert!(parsed.get_child("delay", ns::DELAY).is_some());
    }
}
