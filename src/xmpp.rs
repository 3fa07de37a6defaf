//! XMPP, the second front end over the [`crate::gateway::Gateway`] (docs/xmpp.md).
//!
//! - [`stream`]: bytes → stream header, stanzas, end (rxml + minidom, with size and depth
//!   limits);
//! - [`c2s`]: the client-to-server listener: RFC 6120 negotiation (STARTTLS, SASL
//!   SCRAM-SHA-256, SCRAM-SHA-1 (`crate::auth::scram`), PLAIN and ANONYMOUS, resource binding,
//!   XEP-0198 resumption), then the bound session over a channel;
//! - `handler`: a bound session's stanzas: IQs of the server, the room service and the rooms
//!   (disco, ping, MAM, owner and admin), MUC presence and groupchat messages;
//! - [`websocket`]: XMPP over WebSocket (RFC 7395) at `/xmpp-websocket` on the client
//!   listener, the same negotiation and session framed one element per message;
//! - [`component`]: Stoa as an external component (XEP-0114) of another XMPP server (Prosody,
//!   ejabberd): one link, each remote sender an occupant of its own over the same handler;
//! - [`channel`]: what both run over (TCP or WebSocket), and how a stream ends;
//! - [`forms`]: the room configuration form and affiliations of XEP-0045's owner and admin
//!   use cases, in Stoa's terms;
//! - [`sm`]: XEP-0198 stream management: acks, and resumption of parked sessions;
//! - [`muc`]: XEP-0045 over Stoa rooms: the session's [`crate::session::Wire`], which turns
//!   room events and answers into MUC stanzas (occupant presences with status codes, reflected
//!   messages with XEP-0359 stanza-id and origin-id, XEP-0421 occupant-id, history with
//!   XEP-0203 delay, the subject last).
//!
//! Addresses: users are `user@domain` (`xmpp.domain`); the rooms of a node are
//! `name@service` (`node.service`), the same address as in protocol v1.

pub mod c2s;
pub mod channel;
pub mod component;
pub mod forms;
mod handler;
pub mod muc;
pub mod sm;
pub mod stream;
pub mod websocket;

/// Namespaces Stoa reads or writes.
pub mod ns {
    pub const CLIENT: &str = "jabber:client";
    pub const COMPONENT: &str = "jabber:component:accept";
    pub const STREAM: &str = "http://etherx.jabber.org/streams";
    pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
    pub const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
    pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
    pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
    pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
    pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
    pub const PING: &str = "urn:xmpp:ping";
    pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
    pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
    pub const ROSTER: &str = "jabber:iq:roster";
    pub const MUC: &str = "http://jabber.org/protocol/muc";
    pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
    pub const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
    pub const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
    pub const SID: &str = "urn:xmpp:sid:0";
    pub const OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
    pub const DELAY: &str = "urn:xmpp:delay";
    pub const MAM: &str = "urn:xmpp:mam:2";
    pub const RSM: &str = "http://jabber.org/protocol/rsm";
    pub const FORWARD: &str = "urn:xmpp:forward:0";
    pub const DATA: &str = "jabber:x:data";
    /// RFC 7395 framing on a WebSocket (`<open/>`, `<close/>`).
    pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
}

/// The JID of a Stoa user: a user of this node (registered, or a guest) is `user@domain`
/// (`xmpp.domain`); a user of another XMPP server (an occupant that reaches Stoa through a
/// server it serves as a component) is named by its bare JID already.
pub fn jid_of_user(user: &str, domain: &str) -> String {
    if user.contains('@') { user.to_owned() } else { format!("{user}@{domain}") }
}

/// The Stoa user of a bare JID: `user@domain` of this node's domain (`xmpp.domain`) is `user`;
/// any other is the bare JID itself (docs/xmpp.md, "Stoa behind Prosody / ejabberd").
pub fn user_of_jid(bare: &str, domain: &str) -> String {
    match bare.split_once('@') {
        Some((user, d)) if d == domain => user.to_owned(),
        _ => bare.to_owned(),
    }
}

/// `text` escaped for XML character data and attribute values (quotes included), with the
/// characters XML 1.0 cannot carry at all (most C0 controls, lone surrogates cannot occur in a
/// Rust string) replaced by U+FFFD: a v1 client may send them in a body; an XMPP client must
/// still get a well-formed stanza.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| matches!(c, '&' | '<' | '>' | '"' | '\'') || !xml_char(c);
    if !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if !xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A character XML 1.0 allows (the `Char` production).
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// Unix milliseconds as an XEP-0082 date-time (`2026-12-04T21:34:10.123Z`).
pub fn xep82(ms: i64) -> String {
    crate::clock::iso_utc_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_makes_any_string_safe_xml() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a<b & 'c' \"d\">"), "a&lt;b &amp; &apos;c&apos; &quot;d&quot;&gt;");
        assert_eq!(escape("nul\u{0}bell\u{7}"), "nul\u{FFFD}bell\u{FFFD}");
        assert_eq!(escape("tab\tnl\n"), "tab\tnl\n");
    }
}
