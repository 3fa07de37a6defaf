//! The checks every front end's requests go through: room names, nicks, text and config sizes,
//! the request budget of one connection, and the node's login pace.

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

/// The node's login budget (`auth.logins_per_second`, docs/clusters.md): a bucket of one
/// second's worth. A login over it is told when to come back, each refusal at the next free
/// slot after those promised before, so a re-login storm drains at the rate instead of coming
/// back all at once.
#[derive(Debug)]
pub struct LoginPace {
    /// Logins per second; 0 = no bound.
    rate: f64,
    tokens: f64,
    at: Instant,
    /// The latest slot promised to a refused login.
    promised: Option<Instant>,
}

/// A login that comes back this much early (a fraction of a slot) is still served: clients'
/// timers and the network round trip are not exact, and an early return must not go to the
/// back of the queue.
const PACE_EARLY: f64 = 0.25;

impl LoginPace {
    pub fn new(per_second: u32, now: Instant) -> Self {
        let rate = per_second as f64;
        LoginPace { rate, tokens: rate, at: now, promised: None }
    }

    /// Serve a login now (`Ok`), or come back after the wait (`Err`).
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 - PACE_EARLY {
            self.tokens -= 1.0;
            return Ok(());
        }
        let slot = Duration::from_secs_f64(1.0 / self.rate);
        let next_token = now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate);
        let promise = match self.promised {
            Some(p) if p >= next_token => p + slot,
            _ => next_token,
        };
        self.promised = Some(promise);
        Err(promise - now)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 30 logins at once at 5 per second: a second's worth served, the rest told to come back
    /// one slot (200 ms) apart; when each comes back at its time, it is served.
    #[test]
    fn a_login_storm_is_spread_at_the_rate_and_drains() {
        let t0 = Instant::now();
        let mut pace = LoginPace::new(5, t0);
        let waits: Vec<Option<Duration>> = (0..30).map(|_| pace.admit(t0).err()).collect();
        assert_eq!(waits.iter().filter(|w| w.is_none()).count(), 5);
        let mut promised: Vec<Duration> = waits.into_iter().flatten().collect();
        for pair in promised.windows(2) {
            assert_eq!((pair[1] - pair[0]).as_millis(), 200);
        }
        assert_eq!(promised[0].as_millis(), 200);
        promised.sort();
        for wait in &promised {
            assert!(pace.admit(t0 + *wait).is_ok(), "a login back at its slot {wait:?} is served");
        }
        assert!(pace.admit(t0 + promised[promised.len() - 1]).is_err(), "and the budget is spent again");
        assert!(LoginPace::new(0, t0).admit(t0).is_ok());
    }
}
