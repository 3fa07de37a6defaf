//! How a client logs in ([`Login`]) and how it connects and reconnects ([`ClientOptions`],
//! [`ReconnectPolicy`]): what an application chooses before the first connection.

use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{ClientFrame, PROTOCOL_VERSION, RequestId};

/// The request id of `hello`; answers to later requests use ids from the counter, from 1.
const HELLO_ID: &str = "hello";

/// How to log in with `hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// A registered user with a password.
    Password {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// Resume a session with the token from an earlier `welcome`.
    Token {
        /// The user name, when known (sent along with the token).
        user: Option<String>,
        /// The `session` token of an earlier `welcome`.
        token: String,
    },
    /// A guest login (dev mode only): a user name and no credentials.
    Guest {
        /// The wanted user name; `None` lets the server choose.
        user: Option<String>,
    },
}

impl Login {
    /// A password login.
    pub fn password(user: impl Into<String>, password: impl Into<String>) -> Self {
        Login::Password { user: user.into(), password: password.into() }
    }

    /// A guest login under `user` (dev mode only).
    pub fn guest(user: impl Into<String>) -> Self {
        Login::Guest { user: Some(user.into()) }
    }

    /// A session-token login.
    pub fn token(user: Option<String>, token: impl Into<String>) -> Self {
        Login::Token { user, token: token.into() }
    }

    /// The `hello` frame for this login.
    pub(super) fn hello(&self) -> ClientFrame {
        let (user, password, token) = match self {
            Login::Password { user, password } => (Some(user.clone()), Some(password.clone()), None),
            Login::Token { user, token } => (user.clone(), None, Some(token.clone())),
            Login::Guest { user } => (user.clone(), None, None),
        };
        ClientFrame::Hello {
            v: PROTOCOL_VERSION,
            user,
            password,
            token,
            id: Some(RequestId(HELLO_ID.to_owned())),
        }
    }
}

/// When and where to reconnect after a lost connection.
#[derive(Clone, Debug)]
pub struct ReconnectPolicy {
    /// More URLs to try, after the node connected to and the peers it named in `welcome`.
    pub extra_urls: Vec<String>,
    /// Wait after the first failed attempt; doubled after each further failure.
    pub initial_backoff: Duration,
    /// Upper bound of the wait between attempts.
    pub max_backoff: Duration,
    /// Stop trying after this long without a connection (`None`: never stop).
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            extra_urls: Vec::new(),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            give_up_after: Some(Duration::from_secs(120)),
        }
    }
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bound on opening the socket plus `hello` → `welcome`, per attempt.
    pub connect_timeout: Duration,
    /// Frames queued for the socket writer before a request waits for room.
    pub write_queue: usize,
    /// Resume automatically after a lost connection; `None` leaves it to
    /// [`Client::reconnect`](super::Client::reconnect).
    pub reconnect: Option<ReconnectPolicy>,
    /// TLS for `wss://` URLs: the trust anchors and settings (see [`ClientOptions::trust_ca_file`]).
    /// `None`: the Mozilla roots (`webpki-roots`). Plain `ws://` URLs ignore it.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            write_queue: 64,
            reconnect: None,
            tls: None,
        }
    }
}

impl ClientOptions {
    /// Default options with automatic reconnect under the default [`ReconnectPolicy`].
    pub fn reconnecting() -> Self {
        ClientOptions { reconnect: Some(ReconnectPolicy::default()), ..Default::default() }
    }

    /// Trust the PEM certificates in `ca_file` (and only them) for `wss://` servers: a private
    /// CA, or a node's self-signed certificate.
    pub fn trust_ca_file(mut self, ca_file: &std::path::Path) -> Result<Self, crate::tls::TlsError> {
        self.tls = Some(crate::tls::client_config(Some(ca_file))?);
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hello` has the documented shape for each login kind; guests send no credentials.
    #[test]
    fn hello_frames_match_the_protocol() {
        let v = |l: Login| serde_json::to_value(l.hello()).unwrap();
        assert_eq!(
            v(Login::password("ann", "pw")),
            serde_json::json!({"op":"hello","v":1,"user":"ann","password":"pw","id":"hello"})
        );
        assert_eq!(v(Login::guest("g")), serde_json::json!({"op":"hello","v":1,"user":"g","id":"hello"}));
        assert_eq!(
            v(Login::token(Some("ann".into()), "t")),
            serde_json::json!({"op":"hello","v":1,"user":"ann","token":"t","id":"hello"})
        );
    }
}
