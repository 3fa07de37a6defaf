//! XEP-0045 owner and admin use cases in Stoa's terms: the room configuration form
//! (`muc#roomconfig`, XEP-0004 data forms) and the affiliation items of `muc#admin`.
//!
//! | form field | Stoa |
//! |---|---|
//! | `muc#roomconfig_membersonly` | `public = false` |
//! | `muc#roomconfig_passwordprotectedroom` + `muc#roomconfig_roomsecret` | `password` |
//! | `muc#roomconfig_maxusers` | `max_occupants` (0 = the node's limit) |
//! | `muc#maxhistoryfetch` | `history_on_join` |
//! | `muc#roomconfig_subject` | `subject` |
//! | `muc#roomconfig_persistentroom` | always true (refused if false) |
//! | `muc#roomconfig_whois` | always `anyone` (Stoa rooms show who is who) |

use super::{escape, ns};
use crate::protocol::{Affiliation, RoomConfig, RoomConfigPatch};
use xmpp_parsers::minidom::Element;

/// The `muc#roomconfig` form type.
pub const ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";

/// A `<x type='form'/>` with the room's configuration.
pub fn config_form(c: &RoomConfig) -> String {
    let boolean = |b: bool| if b { "1" } else { "0" };
    let mut f = format!("<x xmlns='{}' type='form'><title>Room configuration</title>", ns::DATA);
    f.push_str(&format!("<field var='FORM_TYPE' type='hidden'><value>{ROOMCONFIG}</value></field>"));
    let mut field = |var: &str, kind: &str, label: &str, value: &str| {
        f.push_str(&format!("<field var='{var}' type='{kind}' label='{}'><value>{}</value></field>", escape(label), escape(value)));
    };
    field("muc#roomconfig_subject", "text-single", "Subject", &c.subject);
    field("muc#roomconfig_membersonly", "boolean", "Only members may enter", boolean(!c.public));
    field("muc#roomconfig_passwordprotectedroom", "boolean", "Password required", boolean(c.password.is_some()));
    field("muc#roomconfig_roomsecret", "text-private", "Password", c.password.as_deref().unwrap_or(""));
    field("muc#roomconfig_maxusers", "text-single", "Most occupants (0: the server's limit)", &c.max_occupants.to_string());
    field("muc#maxhistoryfetch", "text-single", "Messages sent on join", &c.history_on_join.to_string());
    field("muc#roomconfig_persistentroom", "boolean", "Persistent (always)", "1");
    field("muc#roomconfig_whois", "list-single", "Real JIDs shown to (always anyone)", "anyone");
    f.push_str("</x>");
    f
}

/// The configuration change a submitted form asks for; a text for a field Stoa cannot take.
pub fn patch_from_form(x: &Element) -> Result<RoomConfigPatch, String> {
    let mut patch = RoomConfigPatch::default();
    let mut protected: Option<bool> = None;
    let mut secret: Option<String> = None;
    for field in x.children().filter(|c| c.is("field", ns::DATA)) {
        let Some(var) = field.attr("var") else { continue };
        let value = field.get_child("value", ns::DATA).map(|v| v.text()).unwrap_or_default();
        let boolean = || match value.trim() {
            "1" | "true" => Ok(true),
            "0" | "false" | "" => Ok(false),
            other => Err(format!("{var}: `{other}` is not a boolean")),
        };
        let number = || value.trim().parse::<u32>().map_err(|_| format!("{var}: `{value}` is not a number"));
        match var {
            "muc#roomconfig_subject" => patch.subject = Some(value.clone()),
            "muc#roomconfig_membersonly" => patch.public = Some(!boolean()?),
            "muc#roomconfig_passwordprotectedroom" => protected = Some(boolean()?),
            "muc#roomconfig_roomsecret" => secret = Some(value.clone()),
            "muc#roomconfig_maxusers" => patch.max_occupants = Some(if value.trim() == "none" { 0 } else { number()? }),
            "muc#maxhistoryfetch" | "muc#roomconfig_historylength" => patch.history_on_join = Some(number()?),
            "muc#roomconfig_persistentroom" if !boolean()? => return Err("every Stoa room is persistent".into()),
            // Kept as Stoa has them, or not Stoa's to set.
            _ => {}
        }
    }
    patch.password = match (protected, secret) {
        (Some(false), _) => Some(String::new()),
        (_, Some(s)) if !s.is_empty() => Some(s),
        (Some(true), _) => return Err("a password-protected room needs muc#roomconfig_roomsecret".into()),
        _ => None,
    };
    Ok(patch)
}

/// An affiliation as MUC names it.
pub fn affiliation(name: &str) -> Option<Affiliation> {
    Some(match name {
        "owner" => Affiliation::Owner,
        "admin" => Affiliation::Admin,
        "member" => Affiliation::Member,
        "outcast" => Affiliation::Outcast,
        "none" => Affiliation::None,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted(fields: &[(&str, &str)]) -> Element {
        let body: String = fields.iter().map(|(v, x)| format!("<field var='{v}'><value>{x}</value></field>")).collect();
        format!("<x xmlns='jabber:x:data' type='submit'>{body}</x>").parse().unwrap()
    }

    #[test]
    fn a_submitted_form_becomes_a_patch() {
        let p = patch_from_form(&submitted(&[
            ("FORM_TYPE", ROOMCONFIG),
            ("muc#roomconfig_membersonly", "1"),
            ("muc#roomconfig_passwordprotectedroom", "1"),
            ("muc#roomconfig_roomsecret", "s3cret"),
            ("muc#roomconfig_maxusers", "20"),
            ("muc#maxhistoryfetch", "5"),
        ]))
        .unwrap();
        assert_eq!((p.public, p.password.as_deref(), p.max_occupants, p.history_on_join), (Some(false), Some("s3cret"), Some(20), Some(5)));
        let off = patch_from_form(&submitted(&[("muc#roomconfig_passwordprotectedroom", "0"), ("muc#roomconfig_roomsecret", "x")])).unwrap();
        assert_eq!(off.password.as_deref(), Some(""));
        assert!(patch_from_form(&submitted(&[("muc#roomconfig_persistentroom", "0")])).is_err());
        assert!(patch_from_form(&submitted(&[("muc#roomconfig_maxusers", "many")])).is_err());
        assert!(patch_from_form(&submitted(&[("muc#roomconfig_passwordprotectedroom", "1")])).is_err());
    }

    #[test]
    fn the_form_reads_back_as_the_same_config() {
        let c = RoomConfig { public: false, password: Some("pw".into()), max_occupants: 7, history_on_join: 3, ..RoomConfig::default() };
        let form: Element = config_form(&c).parse().unwrap();
        let p = patch_from_form(&form).unwrap();
        assert_eq!(RoomConfig::default().patched(&p), RoomConfig { subject: String::new(), ..c });
    }
}
