//! The checks every front end's requests go through: room names, nicks, text and config sizes,
//! and the request budget of one connection.

use super::*;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket { rate: rate as f64, burst, tokens: burst, at: Instant::now() }
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Gateway {
    /// A room address this node serves: `name@service`, the service this node's or its peer's.
    pub fn check_room(&self, room: &RoomAddr) -> Outcome<()> {
        let limits = &self.settings.limits;
        let Some((name, service)) = room.0.split_once('@') else {
            return fail(ErrorCode::BadRequest, "room addresses are name@service");
        };
        let name_ok = !name.is_empty()
            && name.chars().count() <= limits.max_room_name_chars
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if !name_ok {
            return fail(
                ErrorCode::BadRequest,
                format!("room names are 1 to {} characters of a-z, 0-9, '.', '_' or '-'", limits.max_room_name_chars),
            );
        }
        let service_ok = !service.is_empty()
            && service.len() <= 253
            && service.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'));
        if !service_ok {
            return fail(ErrorCode::BadRequest, "invalid room service");
        }
        // Rooms of the cluster's services (this node's, its peer's, other groups').
        if !self.settings.is_room_service(service) {
            return fail(ErrorCode::NotFound, format!("unknown room service `{service}`"));
        }
        Ok(())
    }

    pub fn check_nick(&self, nick: &str) -> Outcome<()> {
        let max = self.settings.limits.max_nick_chars;
        let ok = !nick.is_empty()
            && nick.chars().count() <= max
            && nick.trim() == nick
            && nick.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
        if ok {
            Ok(())
        } else {
            fail(ErrorCode::BadRequest, format!("nicks are 1 to {max} letters, digits, '_', '-', '.' or inner spaces"))
        }
    }

    pub(super) fn check_text(&self, what: &str, text: &str) -> Outcome<()> {
        if text.chars().count() > MAX_TEXT_CHARS {
            return fail(ErrorCode::TooLarge, format!("{what} is longer than {MAX_TEXT_CHARS} characters"));
        }
        Ok(())
    }

    pub(super) fn check_config(&self, patch: &RoomConfigPatch) -> Outcome<()> {
        if patch.persistent == Some(false) {
            return fail(ErrorCode::BadRequest, "non-persistent rooms are not supported: every Stoa room is persistent");
        }
        let max = self.settings.rooms.history_max_limit;
        if patch.history_on_join.is_some_and(|h| h > max) {
            return fail(ErrorCode::BadRequest, format!("history_on_join is at most {max}"));
        }
        if let Some(p) = &patch.password {
            self.check_text("password", p)?;
        }
        if let Some(s) = &patch.subject {
            self.check_text("subject", s)?;
        }
        Ok(())
    }

    /// The `rate_limited` failure of a spent budget (`what`: "failed logins", "rooms created").
    pub(super) fn throttled(t: crate::throttle::Throttled, what: &str) -> Failure {
        let secs = t.retry_after.as_secs().max(1);
        let mut failure = Failure::new(ErrorCode::RateLimited, format!("too many {what} for this {}; retry in {secs} s", t.by));
        failure.retry_after_ms = Some(t.retry_after.as_millis() as u64);
        failure
    }

    /// The actor of a room `session` occupies (`not_in` if it does not; `gone` if the room's
    /// incarnation is stopping, as when its mailbox is closed).
    pub(super) fn occupied(&self, session: &Session, room: &RoomAddr, not_in: &str, gone: &str) -> Outcome<actix::Addr<room::Room>> {
        if !session.occupies(room) {
            return fail(ErrorCode::Forbidden, not_in);
        }
        self.registry.lookup(room).ok_or_else(|| Failure::new(ErrorCode::Unavailable, gone))
    }

    // --- room operations, here or on the room's host ----------------------------------------
}
