//! A bound XMPP session's stanzas: IQs of the server, the room service and the rooms (disco,
//! ping, roster, MAM, the instant-room form), MUC presence (join, leave) and groupchat
//! messages, each turned into a gateway call; refused requests get stanza errors.

use super::forms;
use super::muc::{HistoryFilter, Pending, XmppState, condition, error_element, message_rest, parse_xep82};
use super::channel::End;
use super::{escape, ns};
use crate::ids::RoomAddr;
use crate::gateway::{ArchiveQuery, Failure, Gateway, JoinRequest, TokenBucket};
use crate::protocol::{ClientMsgId, ErrorCode, RoomConfigPatch};
use crate::session::{KillReason, Session};
use std::sync::Arc;
use std::time::Instant;
use xmpp_parsers::minidom::Element;

/// Where a stanza is addressed.
enum Target {
    /// This server (no `to`, the domain, or the user's own JID).
    Server,
    /// The room service (this node's, or its peer's).
    Service,
    Room(RoomAddr),
    Occupant(RoomAddr, String),
    /// Anyone else (other users, other servers: no 1:1 chat, no federation here).
    Other,
}

/// A bound session's stanza handler.
pub(super) struct Handler {
    gateway: Arc<Gateway>,
    session: Arc<Session>,
    state: Arc<XmppState>,
    bucket: TokenBucket,
    pings: u64,
}

impl Handler {
    pub fn new(gateway: Arc<Gateway>, session: Arc<Session>, state: Arc<XmppState>) -> Self {
        let bucket = gateway.request_bucket();
        Handler { gateway, session, state, bucket, pings: 0 }
    }

    fn send(&self, stanza: String) {
        if self.state.send(stanza) == crate::session::Queued::Full {
            self.session.kill(KillReason::SlowConsumer);
        }
    }

    /// XEP-0199: is the idle client still there?
    pub(super) fn ping_client(&mut self) {
        self.pings += 1;
        self.send(format!(
            "<iq type='get' id='stoa-ping-{}' from='{}' to='{}'><ping xmlns='{}'/></iq>",
            self.pings,
            escape(&self.state.server),
            escape(&self.state.jid),
            ns::PING
        ));
    }

    fn target(&self, to: Option<&str>) -> Result<Target, ()> {
        let Some(to) = to else { return Ok(Target::Server) };
        let jid = xmpp_parsers::jid::Jid::new(to).map_err(|_| ())?;
        let domain = jid.domain().as_str();
        let settings = &self.gateway.settings;
        let service = settings.is_room_service(domain);
        let Some(node) = jid.node() else {
            return Ok(if domain == settings.xmpp.domain {
                Target::Server
            } else if service && jid.resource().is_none() {
                Target::Service
            } else {
                Target::Other
            });
        };
        if domain == settings.xmpp.domain && node.as_str() == self.session.user {
            return Ok(Target::Server);
        }
        if !service {
            return Ok(Target::Other);
        }
        let room = RoomAddr(format!("{}@{domain}", node.as_str()));
        Ok(match jid.resource() {
            Some(nick) => Target::Occupant(room, nick.as_str().to_owned()),
            None => Target::Room(room),
        })
    }

    /// Reply to `el` (an iq, message or presence) with a stanza error.
    fn error_reply(&self, el: &Element, kind: &str, cond: &str, text: &str) {
        if el.attr("type") == Some("error") {
            return; // never answer an error with an error
        }
        let id = el.attr("id").map(|i| format!(" id='{}'", escape(i))).unwrap_or_default();
        // From whom the stanza was for; from the server when that is no valid address.
        let from = el.attr("to").filter(|t| xmpp_parsers::jid::Jid::new(t).is_ok()).unwrap_or(&self.state.server);
        let from = format!(" from='{}'", escape(from));
        // A refused MUC join echoes the <x/> (XEP-0045 §7.2.6): clients match on it.
        let x = if el.name() == "presence" && el.has_child("x", ns::MUC) { format!("<x xmlns='{}'/>", ns::MUC) } else { String::new() };
        self.send(format!("<{} to='{}'{from}{id} type='error'>{x}{}</{}>", el.name(), escape(&self.state.jid), error_element(kind, cond, text), el.name()));
    }

    fn failure_reply(&self, el: &Element, f: &Failure) {
        let (kind, cond) = condition(f.code);
        self.error_reply(el, kind, cond, &f.message);
    }

    /// Serve one stanza; a stream-level violation ends the stream.
    pub(super) async fn stanza(&mut self, el: Element) -> Result<(), End> {
        let stanza_ns = if self.state.component { ns::COMPONENT } else { ns::CLIENT };
        if el.ns() != stanza_ns || !matches!(el.name(), "iq" | "message" | "presence") {
            return Err(End::Stream("unsupported-stanza-type", format!("<{}/> in {} is not served here", el.name(), el.ns())));
        }
        if let Some(from) = el.attr("from") {
            let me = &self.state.jid;
            if from != me && Some(from) != me.split_once('/').map(|(bare, _)| bare) {
                return Err(End::Stream("invalid-from", "stanzas go out from the bound JID".into()));
            }
        }
        if !self.bucket.take(Instant::now()) {
            self.error_reply(&el, "wait", "resource-constraint", "too many requests; slow down");
            return Ok(());
        }
        let Ok(target) = self.target(el.attr("to")) else {
            self.error_reply(&el, "modify", "jid-malformed", "the `to` address is not a valid JID");
            return Ok(());
        };
        match el.name() {
            "iq" => self.iq(&el, target).await,
            "presence" => self.presence(&el, target).await,
            _ => self.message(&el, target).await,
        }
        Ok(())
    }

    async fn iq(&mut self, el: &Element, target: Target) {
        let kind = el.attr("type").unwrap_or("");
        if matches!(kind, "result" | "error") {
            return; // answers to our pings
        }
        let Some(id) = el.attr("id") else { return self.error_reply(el, "modify", "bad-request", "an iq needs an id") };
        let mut children = el.children();
        let (Some(payload), None, true) = (children.next(), children.next(), matches!(kind, "get" | "set")) else {
            return self.error_reply(el, "modify", "bad-request", "an iq get or set has exactly one payload");
        };
        let from = el.attr("to").map(|t| format!(" from='{}'", escape(t))).unwrap_or_default();
        let head = format!("<iq type='result' id='{}' to='{}'{from}>", escape(id), escape(&self.state.jid));
        let result = |body: &str| format!("{head}{body}</iq>");
        let (name, pns) = (payload.name(), payload.ns());
        match (&target, name, pns.as_str(), kind) {
            (_, "ping", ns::PING, "get") => match &target {
                // XEP-0410: a joined client pings itself in the room.
                Target::Occupant(room, nick) if self.state.nick(room).as_deref() != Some(nick.as_str()) => {
                    self.error_reply(el, "cancel", "not-acceptable", "you are not in this room with that nick")
                }
                Target::Other => self.error_reply(el, "cancel", "service-unavailable", "no such entity here"),
                _ => self.send(result("")),
            },
            (Target::Server, "query", ns::DISCO_INFO, "get") => self.send(result(&format!(
                "<query xmlns='{}'><identity category='server' type='im' name='Stoa'/>{}</query>",
                ns::DISCO_INFO,
                features(&[ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PING])
            ))),
            (Target::Server, "query", ns::DISCO_ITEMS, "get") => self.send(result(&format!(
                "<query xmlns='{}'><item jid='{}' name='Chat rooms'/></query>",
                ns::DISCO_ITEMS,
                escape(&self.gateway.settings.node.service)
            ))),
            (Target::Server, "query", ns::ROSTER, "get") => self.send(result(&format!("<query xmlns='{}'/>", ns::ROSTER))),
            (Target::Server, "session", ns::SESSION, "set") => self.send(result("")),
            (Target::Service, "query", ns::DISCO_INFO, "get") => self.send(result(&format!(
                "<query xmlns='{}'><identity category='conference' type='text' name='Stoa rooms'/>{}</query>",
                ns::DISCO_INFO,
                features(&[ns::DISCO_INFO, ns::DISCO_ITEMS, ns::MUC, ns::PING])
            ))),
            (Target::Service, "query", ns::DISCO_ITEMS, "get") => match self.gateway.list(&self.session, None, None).await {
                Ok(page) => {
                    let items: String = page.rooms.iter().map(|r| format!("<item jid='{}'/>", escape(&r.room.0))).collect();
                    self.send(result(&format!("<query xmlns='{}'>{items}</query>", ns::DISCO_ITEMS)));
                }
                Err(f) => self.failure_reply(el, &f),
            },
            (Target::Room(room), "query", ns::DISCO_INFO, "get") => match self.gateway.describe(room).await {
                Ok(facts) => {
                    let mut fs = vec![ns::DISCO_INFO, ns::MUC, ns::MAM, ns::PING, ns::SID, ns::OCCUPANT_ID, "muc_persistent", "muc_nonanonymous"];
                    fs.push(if facts.public { "muc_open" } else { "muc_membersonly" });
                    fs.push(if facts.password_protected { "muc_passwordprotected" } else { "muc_unsecured" });
                    let name = room.0.split('@').next().unwrap_or_default();
                    self.send(result(&format!(
                        "<query xmlns='{}'><identity category='conference' type='text' name='{}'/>{}</query>",
                        ns::DISCO_INFO,
                        escape(name),
                        features(&fs)
                    )));
                }
                Err(f) => self.failure_reply(el, &f),
            },
            (Target::Room(room), "query", ns::MAM, "set") => {
                let room = room.clone();
                self.mam(el, id, &room, payload).await
            }
            (Target::Room(_), "query", ns::MAM, "get") => self.send(result(&format!(
                "<query xmlns='{}'><x xmlns='{}' type='form'><field type='hidden' var='FORM_TYPE'><value>{}</value></field>\
                 <field type='text-single' var='with'/><field type='text-single' var='start'/><field type='text-single' var='end'/></x></query>",
                ns::MAM,
                ns::DATA,
                ns::MAM
            ))),
            (Target::Room(_), "query", ns::DISCO_ITEMS, "get") => self.send(result(&format!("<query xmlns='{}'/>", ns::DISCO_ITEMS))),
            (Target::Room(room), "query", ns::MUC_OWNER, _) => {
                let room = room.clone();
                self.owner(el, kind, &room, payload, &head).await
            }
            (Target::Room(room), "query", ns::MUC_ADMIN, _) => {
                let room = room.clone();
                self.admin(el, kind, &room, payload, &head).await
            }
            (Target::Other, ..) => self.error_reply(el, "cancel", "service-unavailable", "no such entity here"),
            _ => self.error_reply(el, "cancel", "service-unavailable", &format!("<{name} xmlns='{pns}'/> is not served here")),
        }
    }

    /// XEP-0313: a room's archive, paged with XEP-0059 RSM. Each match is a `<result/>`
    /// message with the forwarded groupchat message; the IQ result's `<fin/>` says whether the
    /// page is the last, its first and last ids, and the count.
    async fn mam(&mut self, el: &Element, id: &str, room: &RoomAddr, query: &Element) {
        let mut q = ArchiveQuery::default();
        let field = |var: &str| {
            query
                .get_child("x", ns::DATA)
                .and_then(|x| x.children().find(|f| f.attr("var") == Some(var)))
                .and_then(|f| f.get_child("value", ns::DATA))
                .map(|v| v.text())
        };
        for (var, slot) in [("start", &mut q.start_ms), ("end", &mut q.end_ms)] {
            if let Some(text) = field(var) {
                match parse_xep82(&text) {
                    Some(ms) => *slot = Some(ms),
                    None => return self.error_reply(el, "modify", "bad-request", &format!("`{var}` is not an XEP-0082 date-time")),
                }
            }
        }
        // In a room's archive, `with` names an occupant: room@service/nick.
        if let Some(with) = field("with") {
            match with.split_once('/') {
                Some((bare, nick)) if bare == room.0 && !nick.is_empty() => q.nick = Some(nick.to_owned()),
                _ => return self.error_reply(el, "modify", "bad-request", "`with` in a room's archive is room@service/nick"),
            }
        }
        if let Some(set) = query.get_child("set", ns::RSM) {
            let text = |name: &str| set.get_child(name, ns::RSM).map(|c| c.text());
            if let Some(max) = text("max") {
                match max.trim().parse::<u32>() {
                    Ok(n) => q.max = Some(n),
                    Err(_) => return self.error_reply(el, "modify", "bad-request", "`max` is a number"),
                }
            }
            q.after_id = text("after").filter(|a| !a.is_empty());
            q.before_id = text("before");
        }
        let page = match self.gateway.archive(&self.session, room, q).await {
            Ok(page) => page,
            Err(f) => return self.failure_reply(el, &f),
        };
        let queryid = query.attr("queryid").map(|q| format!(" queryid='{}'", escape(q))).unwrap_or_default();
        let to = escape(&self.state.jid).into_owned();
        for m in &page.messages {
            let stamp = super::xep82(m.ts);
            self.send(format!(
                "<message to='{to}' from='{}'><result xmlns='{}'{queryid} id='{}'><forwarded xmlns='{}'><delay xmlns='{}' stamp='{stamp}'/><message xmlns='{}'{}</forwarded></result></message>",
                escape(&room.0),
                ns::MAM,
                escape(&m.id),
                ns::FORWARD,
                ns::DELAY,
                ns::CLIENT,
                message_rest(m, false)
            ));
        }
        let mut set = String::new();
        if let (Some(first), Some(last)) = (page.messages.first(), page.messages.last()) {
            set = format!("<first>{}</first><last>{}</last>", escape(&first.id), escape(&last.id));
        }
        self.send(format!(
            "<iq type='result' id='{}' to='{to}' from='{}'><fin xmlns='{}' complete='{}'><set xmlns='{}'>{set}<count>{}</count></set></fin></iq>",
            escape(id),
            escape(&room.0),
            ns::MAM,
            page.complete,
            ns::RSM,
            page.count
        ));
    }

    /// `muc#owner` (XEP-0045 §10): the configuration form (get), a submitted or cancelled
    /// form (set; an empty one accepts an instant room), and destroy.
    /// (`head` is the result IQ's start tag.)
    async fn owner(&mut self, el: &Element, kind: &str, room: &RoomAddr, query: &Element, head: &str) {
        if kind == "get" {
            return match self.gateway.admin_view(&self.session, room).await {
                Ok(view) => self.send(format!("{head}<query xmlns='{}'>{}</query></iq>", ns::MUC_OWNER, forms::config_form(&view.config))),
                Err(f) => self.failure_reply(el, &f),
            };
        }
        let outcome = if let Some(destroy) = query.get_child("destroy", ns::MUC_OWNER) {
            let reason = destroy.get_child("reason", ns::MUC_OWNER).map(|r| r.text());
            self.gateway.destroy(&self.session, room, reason).await
        } else if let Some(x) = query.get_child("x", ns::DATA) {
            let fields = x.children().filter(|f| f.attr("var").is_some_and(|v| v != "FORM_TYPE")).count();
            match x.attr("type") {
                Some("cancel") => Ok(()),
                Some("submit") if fields == 0 => Ok(()),
                Some("submit") => match forms::patch_from_form(x) {
                    Ok(patch) => self.gateway.configure(&self.session, room, patch).await,
                    Err(text) => return self.error_reply(el, "modify", "not-acceptable", &text),
                },
                _ => return self.error_reply(el, "modify", "bad-request", "submit or cancel the form"),
            }
        } else {
            return self.error_reply(el, "modify", "bad-request", "a muc#owner set holds a form or <destroy/>");
        };
        match outcome {
            Ok(()) => self.send(format!("{head}</iq>")),
            Err(f) => self.failure_reply(el, &f),
        }
    }

    /// `muc#admin` (XEP-0045 §8, §9): kick (role none by nick), affiliations set by bare JID,
    /// and affiliation lists.
    async fn admin(&mut self, el: &Element, kind: &str, room: &RoomAddr, query: &Element, head: &str) {
        let items: Vec<&Element> = query.children().filter(|i| i.is("item", ns::MUC_ADMIN)).collect();
        if items.is_empty() {
            return self.error_reply(el, "modify", "bad-request", "a muc#admin query holds <item/>s");
        }
        if kind == "get" {
            let Some(wanted) = items[0].attr("affiliation").and_then(forms::affiliation) else {
                return self.error_reply(el, "modify", "bad-request", "ask for a list by affiliation (owner, admin, member, outcast)");
            };
            return match self.gateway.admin_view(&self.session, room).await {
                Ok(view) => {
                    let list: String = view
                        .affiliations
                        .iter()
                        .filter(|(_, a)| *a == wanted)
                        .map(|(user, a)| format!("<item affiliation='{}' jid='{}'/>", a.as_str(), escape(&super::jid_of_user(user, &self.state.domain))))
                        .collect();
                    self.send(format!("{head}<query xmlns='{}'>{list}</query></iq>", ns::MUC_ADMIN));
                }
                Err(f) => self.failure_reply(el, &f),
            };
        }
        for item in items {
            let reason = item.get_child("reason", ns::MUC_ADMIN).map(|r| r.text());
            let outcome = match (item.attr("role"), item.attr("nick"), item.attr("affiliation"), item.attr("jid")) {
                (Some("none"), Some(nick), _, _) => self.gateway.kick(&self.session, room, nick.to_owned(), reason).await,
                (Some(_), ..) => return self.error_reply(el, "cancel", "feature-not-implemented", "roles follow affiliations in Stoa rooms; only role='none' (kick) is served"),
                (None, _, Some(a), Some(jid)) => {
                    let Some(aff) = forms::affiliation(a) else { return self.error_reply(el, "modify", "bad-request", "unknown affiliation") };
                    let bare = jid.split('/').next().unwrap_or(jid);
                    let user = super::user_of_jid(bare, &self.state.domain);
                    self.gateway.affiliate(&self.session, room, user, aff).await
                }
                _ => return self.error_reply(el, "modify", "bad-request", "an item sets role='none' by nick, or an affiliation by jid"),
            };
            if let Err(f) = outcome {
                return self.failure_reply(el, &f);
            }
        }
        self.send(format!("{head}</iq>"));
    }

    async fn presence(&mut self, el: &Element, target: Target) {
        let kind = el.attr("type");
        match (target, kind) {
            (Target::Occupant(room, nick), None) => self.join(el, room, nick).await,
            (Target::Occupant(room, _), Some("unavailable")) => self.leave(&room).await,
            (Target::Room(_), None) => self.error_reply(el, "modify", "jid-malformed", "join a room as room@service/nick"),
            // Broadcast presence: unavailable leaves every room (the rooms saw it as directed).
            (Target::Server, Some("unavailable")) => {
                for (room, _) in self.state.rooms() {
                    self.leave(&room).await;
                }
            }
            _ => {}
        }
    }

    async fn join(&mut self, el: &Element, room: RoomAddr, nick: String) {
        match self.state.nick(&room) {
            Some(mine) if mine == nick => return, // a presence update in the room
            Some(_) => return self.error_reply(el, "modify", "not-acceptable", "nick changes are not supported; leave and join again"),
            None => {}
        }
        let x = el.get_child("x", ns::MUC);
        let password = x.and_then(|x| x.get_child("password", ns::MUC)).map(|p| p.text());
        let history = HistoryFilter::from_join(x, crate::clock::now_ms());
        let id = el.attr("id").map(str::to_owned);
        let mut created = false;
        for attempt in 0..2 {
            let pending = Pending::Join { room: room.clone(), nick: nick.clone(), id: id.clone(), history: history.clone(), created };
            let re = self.state.expect(pending);
            let join = JoinRequest { re: re.clone(), room: room.clone(), nick: nick.clone(), since: None, password: password.clone() };
            match self.gateway.join(&self.session, join).await {
                Ok(()) => return,
                Err(f) => {
                    self.state.forget(&re);
                    // Joining a room that does not exist creates it (an instant room).
                    if f.code == ErrorCode::NotFound && attempt == 0 && f.hosted_by.is_none() {
                        match self.gateway.create(&self.session, &room, &RoomConfigPatch::default()).await {
                            Ok(()) => {
                                created = true;
                                continue;
                            }
                            Err(f) if f.code == ErrorCode::Conflict => continue,
                            Err(f) => return self.failure_reply(el, &f),
                        }
                    }
                    let f = match f.code {
                        ErrorCode::Conflict => Failure::new(ErrorCode::Conflict, "that nick is in use in this room"),
                        _ => f,
                    };
                    return self.failure_reply(el, &f);
                }
            }
        }
    }

    async fn leave(&mut self, room: &RoomAddr) {
        if self.state.nick(room).is_none() {
            return;
        }
        let re = crate::protocol::RequestId(format!("leave-{}", uuid::Uuid::now_v7().simple()));
        if let Err(f) = self.gateway.leave(&self.session, re, room).await {
            tracing::debug!(room = %room, message = %f.message, "xmpp leave failed");
        }
    }

    async fn message(&mut self, el: &Element, target: Target) {
        if el.attr("type") == Some("error") {
            return;
        }
        // Body and subject are in the stanza's own namespace (jabber:client, or the component's).
        let body = el.get_child("body", el.ns().as_str()).map(|b| b.text());
        let room = match (target, el.attr("type")) {
            (Target::Room(room), Some("groupchat")) => room,
            (Target::Occupant(..), _) => return self.error_reply(el, "cancel", "not-acceptable", "private messages in rooms are not supported"),
            (Target::Room(_), _) => return self.error_reply(el, "modify", "bad-request", "messages to a room are type='groupchat'"),
            _ if body.is_none() => return, // chat states, receipts and the like
            _ => return self.error_reply(el, "cancel", "service-unavailable", "this server serves rooms only"),
        };
        if self.state.nick(&room).is_none() {
            return self.error_reply(el, "cancel", "not-acceptable", "join the room first");
        }
        let Some(body) = body else {
            if let Some(subject) = el.get_child("subject", el.ns().as_str())
                && let Err(f) = self.gateway.subject(&self.session, &room, subject.text()).await
            {
                self.failure_reply(el, &f);
            }
            return; // chat states and the like
        };
        let id = el.attr("id").map(str::to_owned);
        let origin = el
            .get_child("origin-id", ns::SID)
            .and_then(|o| o.attr("id"))
            .map(str::to_owned)
            .or_else(|| id.clone())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let re = self.state.expect(Pending::Send { room: room.clone(), id, origin: origin.clone(), body: body.clone() });
        if let Err(f) = self.gateway.send(&self.session, re.clone(), &room, body, ClientMsgId(origin)).await {
            self.state.forget(&re);
            self.failure_reply(el, &f);
        }
    }
}

/// `<feature var='…'/>` for each.
fn features(vars: &[&str]) -> String {
    vars.iter().map(|v| format!("<feature var='{}'/>", escape(v))).collect()
}
