//! Logins through the gateway: password, token, SCRAM and guest, each behind the node's
//! accepting gate and the failed-login budgets; in a cluster, a registered user's login is
//! served on its home node (others are told to log in there), and every node serves at most
//! `auth.logins_per_second` (docs/clusters.md, *Users' home nodes*).

use super::*;

impl Gateway {
    /// Log in with a password, a session token, or as a guest (no credentials), from `address`.
    pub async fn login(&self, user: Option<&str>, password: Option<&str>, token: Option<&str>, address: Option<std::net::IpAddr>) -> Outcome<LoggedIn> {
        self.login_gate(user, address).await?;
        // A resume by session token is served where it lands: the client aims it at a node
        // of its session's group itself (the token is unknown elsewhere). So is a guest (no
        // password): it has no account, hence no home, and asks no other node.
        if token.is_none()
            && password.is_some()
            && let Some(user) = user
        {
            self.login_home(user).await?;
        }
        self.login_paced()?;
        let result = self.auth.login(user, password, token).await;
        self.login_outcome(result, user, address)
    }

    /// The stored SCRAM credentials of `user` for `hash` (SASL SCRAM's first step, before the
    /// client proves its password), `None` if it has none (unknown, or a password set before
    /// SCRAM). Refused as [`Gateway::login`] is when the node takes no logins or `user` or
    /// `address` spent its failed-login budget; nothing is spent here.
    pub async fn scram_credentials(&self, user: &str, hash: Hash, address: Option<std::net::IpAddr>) -> Outcome<Option<Credentials>> {
        self.login_gate(Some(user), address).await?;
        self.login_home(user).await?;
        self.login_paced()?;
        match self.auth.scram_credentials(user, hash).await {
            Ok(c) => Ok(c),
            Err(AuthError::InvalidName(m)) => fail(ErrorCode::BadRequest, m),
            Err(e) => {
                tracing::warn!(error = %e, "SCRAM credentials failed on the store");
                fail(ErrorCode::Unavailable, "login service unavailable; retry")
            }
        }
    }

    /// Complete the login of `user` from `address` whose password was checked without being
    /// sent (SASL SCRAM's proof): `verified` is that check's outcome. As [`Gateway::login`]:
    /// refused when the node takes no logins or the failed-login budget is spent; a wrong
    /// proof spends the budget, a right one forgets the user's and stores a new session.
    pub async fn login_verified(&self, user: &str, verified: bool, address: Option<std::net::IpAddr>) -> Outcome<LoggedIn> {
        self.login_gate(Some(user), address).await?;
        let result = self.auth.login_verified(user, verified).await;
        self.login_outcome(result, Some(user), address)
    }

    /// Before any login: the node takes logins (waiting up to [`ACCEPT_WAIT`] for it), and
    /// `user` and `address` have failed-login budget left.
    async fn login_gate(&self, user: Option<&str>, address: Option<std::net::IpAddr>) -> Outcome<()> {
        if !self.is_accepting() && !self.await_accepting(ACCEPT_WAIT).await {
            let peer = self.settings.peer().map(|p| p.client.clone());
            return fail(
                ErrorCode::Unavailable,
                match peer {
                    Some(p) => format!("this node does not serve clients now (failed over); connect to {p}"),
                    None => "this node does not serve clients now; retry later".to_owned(),
                },
            );
        }
        if let Err(t) = self.login_failures.check(user, address, Instant::now()) {
            return Err(Self::throttled(t, "failed logins"));
        }
        Ok(())
    }

    /// In a cluster: `user` is served here, or the login fails naming the node that serves it
    /// ([`Failure::login_on`]; v1 answers with a redirect, XMPP with `see-other-host`).
    async fn login_home(&self, user: &str) -> Outcome<()> {
        let Some(homes) = &self.homes else { return Ok(()) };
        match homes.place(user).await {
            Ok(Placement::Here) => Ok(()),
            Ok(Placement::Elsewhere(node)) => {
                metrics::counter!("stoa_logins_redirected_total").increment(1);
                let mut failure = Failure::new(ErrorCode::Unavailable, format!("`{user}` logs in on node {node}"));
                failure.login_on = Some(node);
                Err(failure)
            }
            Ok(Placement::HomeDown(home)) => {
                fail(ErrorCode::Unavailable, format!("the home node of `{user}` ({home}) and its group serve no logins now; retry later"))
            }
            Err(e) => {
                tracing::warn!(error = %e, "finding a user's home failed on the store");
                fail(ErrorCode::Unavailable, "login service unavailable; retry")
            }
        }
    }

    /// Within the node's login budget, or `rate_limited` with the time to come back.
    fn login_paced(&self) -> Outcome<()> {
        let Err(wait) = self.login_pace.lock().expect("login pace lock").admit(Instant::now()) else { return Ok(()) };
        metrics::counter!("stoa_logins_refused_total").increment(1);
        let ms = wait.as_millis().max(1) as u64;
        let mut failure = Failure::new(ErrorCode::RateLimited, format!("this node takes no more logins now; retry after {ms} ms"));
        failure.retry_after_ms = Some(ms);
        Err(failure)
    }

    /// A login's outcome: a denial spends the failed-login budget of `user` and `address`, a
    /// registered user's success forgets the user's.
    fn login_outcome(&self, result: Result<LoggedIn, AuthError>, user: Option<&str>, address: Option<std::net::IpAddr>) -> Outcome<LoggedIn> {
        let throttle = &self.login_failures;
        let logged_in = match result {
            Ok(l) => l,
            Err(AuthError::Denied(m)) => {
                metrics::counter!("stoa_login_failures_total").increment(1);
                throttle.spend(user, address, Instant::now());
                return fail(ErrorCode::Unauthorized, m);
            }
            Err(AuthError::InvalidName(m)) => return fail(ErrorCode::BadRequest, m),
            Err(e) => {
                tracing::warn!(error = %e, "login failed on the store");
                return fail(ErrorCode::Unavailable, "login service unavailable; retry");
            }
        };
        if !logged_in.guest {
            throttle.forget(&logged_in.user);
        }
        Ok(logged_in)
    }
}
