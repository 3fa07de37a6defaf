//! Pure room state: occupants, affiliations, config, and the permission rules.
//! No I/O here, so every rule is unit-tested beside it.

use crate::ids::SessionId;
use crate::protocol::{Affiliation, OccupantInfo, RoomConfig};
use std::collections::HashMap;

/// Why a room refused an operation (before any I/O).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Forbidden(&'static str),
    Conflict(&'static str),
    TooLarge(&'static str),
    NotFound(&'static str),
    BadRequest(&'static str),
}

/// One connected occupant (a session may be in many rooms; a user may have many sessions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OccupantState {
    pub user: String,
    pub nick: String,
    /// The nick's [`crate::names::comparison_key`]: lookalike nicks clash.
    nick_key: String,
    /// The session joined with `since` (a resume, or a room followed to its new host) and none
    /// of its posts here has been stored as new since: it may be sending again posts that
    /// were stored before this room's memory of cids began (by the failed node, or before a
    /// restart), so the store looks them up as it writes them ([`crate::store::AppendRequest`]).
    pub resumed: bool,
}

impl OccupantState {
    pub fn new(user: String, nick: String) -> Self {
        let nick_key = crate::names::comparison_key(&nick);
        OccupantState { user, nick, nick_key, resumed: false }
    }
}

/// The state of one room that the permission rules read.
#[derive(Clone, Debug)]
pub struct RoomState {
    pub config: RoomConfig,
    /// Non-`none` affiliations by user name.
    pub affiliations: HashMap<String, Affiliation>,
    /// Occupants by session id.
    pub occupants: HashMap<SessionId, OccupantState>,
}

impl RoomState {
    pub fn new(config: RoomConfig, affiliations: HashMap<String, Affiliation>) -> Self {
        RoomState { config, affiliations, occupants: HashMap::new() }
    }

    /// A user's affiliation (`none` if unlisted).
    pub fn affiliation(&self, user: &str) -> Affiliation {
        self.affiliations.get(user).copied().unwrap_or(Affiliation::None)
    }

    /// May `user` read this room (history, join) without a password check?
    pub fn may_enter(&self, user: &str) -> Result<Affiliation, Denied> {
        let aff = self.affiliation(user);
        if aff == Affiliation::Outcast {
            return Err(Denied::Forbidden("you are banned from this room"));
        }
        if !self.config.public && aff < Affiliation::Member {
            return Err(Denied::Forbidden("this room is members-only"));
        }
        Ok(aff)
    }

    /// Check a join by `session` of `user` as `nick`, with `password`, against a node-wide
    /// occupant cap. Returns the user's affiliation.
    pub fn check_join(
        &self,
        session: SessionId,
        user: &str,
        nick: &str,
        password: Option<&str>,
        node_max_occupants: u32,
    ) -> Result<Affiliation, Denied> {
        let aff = self.may_enter(user)?;
        if let Some(expected) = &self.config.password
            && aff < Affiliation::Admin && password != Some(expected.as_str()) {
                return Err(Denied::Forbidden("wrong or missing room password"));
            }
        let key = crate::names::comparison_key(nick);
        if self.occupants.values().any(|o| o.nick_key == key && o.user != user) {
            return Err(Denied::Conflict("nick is taken in this room"));
        }
        let already_in = self.occupants.contains_key(&session);
        let cap = match self.config.max_occupants {
            0 => node_max_occupants,
            n => n.min(node_max_occupants),
        };
        if !already_in && self.occupants.len() as u64 >= cap as u64 {
            return Err(Denied::TooLarge("room is full"));
        }
        Ok(aff)
    }

    /// The occupant list as shown in `joined`.
    pub fn occupant_list(&self) -> Vec<OccupantInfo> {
        let mut list: Vec<OccupantInfo> =
            self.occupants.values().map(|o| OccupantInfo { user: o.user.clone(), nick: o.nick.clone() }).collect();
        list.sort_by(|a, b| a.nick.cmp(&b.nick).then(a.user.cmp(&b.user)));
        list.dedup();
        list
    }

    /// Check that `actor` may change the subject.
    pub fn check_subject(&self, actor: &str) -> Result<(), Denied> {
        if self.affiliation(actor) >= Affiliation::Admin {
            Ok(())
        } else {
            Err(Denied::Forbidden("only owners and admins may change the subject"))
        }
    }

    /// Check that `actor` may read the room's configuration and affiliation lists.
    pub fn check_admin(&self, actor: &str) -> Result<(), Denied> {
        if self.affiliation(actor) >= Affiliation::Admin {
            Ok(())
        } else {
            Err(Denied::Forbidden("only owners and admins may read this"))
        }
    }

    /// Check that `actor` may configure or destroy the room.
    pub fn check_owner(&self, actor: &str) -> Result<(), Denied> {
        if self.affiliation(actor) == Affiliation::Owner {
            Ok(())
        } else {
            Err(Denied::Forbidden("only owners may do this"))
        }
    }

    /// Check that `actor` may set `target`'s affiliation to `to`.
    pub fn check_affiliate(&self, actor: &str, target: &str, to: Affiliation) -> Result<(), Denied> {
        let mine = self.affiliation(actor);
        let theirs = self.affiliation(target);
        match mine {
            Affiliation::Owner => {
                let owners = self.affiliations.values().filter(|a| **a == Affiliation::Owner).count();
                if theirs == Affiliation::Owner && to != Affiliation::Owner && owners == 1 {
                    return Err(Denied::Conflict("a room needs at least one owner"));
                }
                Ok(())
            }
            Affiliation::Admin => {
                if theirs >= Affiliation::Admin || to >= Affiliation::Admin {
                    Err(Denied::Forbidden("admins may only change affiliations below admin"))
                } else {
                    Ok(())
                }
            }
            _ => Err(Denied::Forbidden("only owners and admins may change affiliations")),
        }
    }

    /// Check that `actor` may kick the occupant(s) using `nick`; returns their session ids.
    pub fn check_kick(&self, actor: &str, nick: &str) -> Result<Vec<SessionId>, Denied> {
        let mine = self.affiliation(actor);
        if mine < Affiliation::Admin {
            return Err(Denied::Forbidden("only owners and admins may kick"));
        }
        let targets: Vec<(SessionId, &OccupantState)> =
            self.occupants.iter().filter(|(_, o)| o.nick == nick).map(|(s, o)| (*s, o)).collect();
        if targets.is_empty() {
            return Err(Denied::NotFound("no occupant with that nick"));
        }
        if targets.iter().any(|(_, o)| self.affiliation(&o.user) >= mine) {
            return Err(Denied::Forbidden("you may only kick occupants below your affiliation"));
        }
        Ok(targets.into_iter().map(|(s, _)| s).collect())
    }

    /// Sessions that may no longer stay after `user` became `aff` (banned, or no longer a
    /// member of a members-only room).
    pub fn evicted_by(&self, user: &str, aff: Affiliation) -> Vec<SessionId> {
        let must_leave = aff == Affiliation::Outcast || (!self.config.public && aff < Affiliation::Member);
        if !must_leave {
            return Vec::new();
        }
        self.occupants.iter().filter(|(_, o)| o.user == user).map(|(s, _)| *s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(public: bool) -> RoomState {
        let mut affs = HashMap::new();
        affs.insert("olga".to_string(), Affiliation::Owner);
        affs.insert("adam".to_string(), Affiliation::Admin);
        affs.insert("mia".to_string(), Affiliation::Member);
        affs.insert("otto".to_string(), Affiliation::Outcast);
        RoomState::new(RoomConfig { public, ..RoomConfig::default() }, affs)
    }

    #[test]
    fn outcasts_never_enter_and_members_only_needs_membership() {
        let r = room(true);
        assert_eq!(r.check_join(SessionId(1), "otto", "o", None, 10), Err(Denied::Forbidden("you are banned from this room")));
        assert!(r.check_join(SessionId(1), "guest", "g", None, 10).is_ok());
        let r = room(false);
        assert_eq!(r.check_join(SessionId(1), "guest", "g", None, 10), Err(Denied::Forbidden("this room is members-only")));
        assert_eq!(r.check_join(SessionId(1), "mia", "m", None, 10), Ok(Affiliation::Member));
    }

    #[test]
    fn room_password_binds_everyone_below_admin() {
        let mut r = room(true);
        r.config.password = Some("s3".into());
        assert!(r.check_join(SessionId(1), "mia", "m", None, 10).is_err());
        assert!(r.check_join(SessionId(1), "mia", "m", Some("nope"), 10).is_err());
        assert!(r.check_join(SessionId(1), "mia", "m", Some("s3"), 10).is_ok());
        assert!(r.check_join(SessionId(1), "adam", "a", None, 10).is_ok());
    }

    #[test]
    fn nick_clash_and_capacity() {
        let mut r = room(true);
        r.occupants.insert(SessionId(7), OccupantState::new("mia".into(), "m".into()));
        assert_eq!(r.check_join(SessionId(8), "guest", "m", None, 10), Err(Denied::Conflict("nick is taken in this room")));
        assert_eq!(r.check_join(SessionId(8), "guest", "M.", None, 10), Err(Denied::Conflict("nick is taken in this room")), "a lookalike");
        assert!(r.check_join(SessionId(8), "mia", "m", None, 10).is_ok(), "same user may use its nick twice");
        assert_eq!(r.check_join(SessionId(8), "guest", "g", None, 1), Err(Denied::TooLarge("room is full")));
        assert!(r.check_join(SessionId(7), "mia", "m", None, 1).is_ok(), "a rejoin does not count twice");
        r.config.max_occupants = 1;
        assert_eq!(r.check_join(SessionId(8), "guest", "g", None, 10), Err(Denied::TooLarge("room is full")));
    }

    #[test]
    fn affiliation_rules() {
        let r = room(true);
        assert!(r.check_affiliate("olga", "mia", Affiliation::Admin).is_ok());
        assert_eq!(r.check_affiliate("olga", "olga", Affiliation::Member), Err(Denied::Conflict("a room needs at least one owner")));
        assert!(r.check_affiliate("adam", "mia", Affiliation::Outcast).is_ok());
        assert!(r.check_affiliate("adam", "mia", Affiliation::Admin).is_err());
        assert!(r.check_affiliate("adam", "olga", Affiliation::Outcast).is_err());
        assert!(r.check_affiliate("mia", "guest", Affiliation::Member).is_err());
        assert!(r.check_owner("olga").is_ok() && r.check_owner("adam").is_err());
        assert!(r.check_subject("adam").is_ok() && r.check_subject("mia").is_err());
    }

    #[test]
    fn kick_needs_a_higher_affiliation() {
        let mut r = room(true);
        r.occupants.insert(SessionId(1), OccupantState::new("mia".into(), "m".into()));
        r.occupants.insert(SessionId(2), OccupantState::new("adam".into(), "a".into()));
        assert_eq!(r.check_kick("adam", "m"), Ok(vec![SessionId(1)]));
        assert!(r.check_kick("adam", "a").is_err());
        assert!(r.check_kick("mia", "a").is_err());
        assert_eq!(r.check_kick("olga", "zz"), Err(Denied::NotFound("no occupant with that nick")));
        assert_eq!(r.evicted_by("mia", Affiliation::Outcast), vec![SessionId(1)]);
        assert!(r.evicted_by("mia", Affiliation::None).is_empty(), "public room keeps non-members");
    }
}
