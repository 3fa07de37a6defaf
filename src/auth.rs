//! Users and sessions: argon2 password hashes, SCRAM credentials, session tokens, guest login
//! in dev mode.
//!
//! Setting a password stores its argon2 hash (PLAIN and v1 logins check it) and, per hash, the
//! SCRAM credentials of the same password ([`scram`]: salt, iterations, StoredKey,
//! ServerKey) for XMPP's SASL SCRAM-SHA-1 and SCRAM-SHA-256. A user whose password was set
//! before SCRAM credentials were kept has none: it logs in with PLAIN until its password is
//! set again (`stoa user passwd`).
//!
//! A session token is 32 random bytes (hex); the store keeps only its SHA-256, so a leaked
//! database does not leak live sessions. Tokens live in the shared store, so a client can
//! resume on any node of its group with the token from `welcome`.

pub mod scram;

use crate::store::{ScramRow, Store, StoreError, UserScram, now_ms};

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Why a login or registration failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong password, unknown or expired token, or guest login not allowed.
    #[error("{0}")]
    Denied(&'static str),
    /// The user name is not acceptable.
    #[error("{0}")]
    InvalidName(String),
    /// The user exists already.
    #[error("user already exists")]
    Exists,
    /// No registered user has this name.
    #[error("no user `{0}`")]
    NoSuchUser(String),
    /// The password breaks the rule ([`validate_password`]).
    #[error("{0}")]
    WeakPassword(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing failed (should not happen with valid parameters).
    #[error("password hashing: {0}")]
    Hash(String),
}

/// A successful login.
#[derive(Clone, Debug)]
pub struct LoggedIn {
    pub user: String,
    pub guest: bool,
    /// The session token to give the client (new, or the one it logged in with).
    pub token: String,
}

/// Longest user name.
pub const MAX_USER_CHARS: usize = 64;

/// Check a user name: 1 to 64 of letters, digits, `.`, `_`, `-`.
pub fn validate_user_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_USER_CHARS
        && name.chars().all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::InvalidName(format!(
            "user names are 1 to {MAX_USER_CHARS} letters, digits, '.', '_' or '-'"
        )))
    }
}

/// Longest name a guest may ask for (the server adds [`GUEST_SUFFIX_CHARS`] + 1).
pub const MAX_GUEST_CHARS: usize = MAX_USER_CHARS - GUEST_SUFFIX_CHARS - 1;

/// Random characters after the `~` of a guest's user name.
pub const GUEST_SUFFIX_CHARS: usize = 6;

/// A guest's user name: the name asked for, `~`, and random characters. `~` is in no name a
/// login may ask for, so no other connection can ever log in as this guest (only its session
/// token resumes it).
fn guest_name(asked: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut rng = rand::rng();
    let suffix: String = (0..GUEST_SUFFIX_CHARS).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("{asked}~{suffix}")
}

/// Check a user name as a request may name someone (an affiliation's target): a registered
/// name, a guest's `name~suffix`, or a user of another XMPP server by its bare JID
/// (`user@example.com`: occupants that reach Stoa through a server it is a component of).
pub fn validate_user_ref(name: &str) -> Result<(), AuthError> {
    if name.contains('@') {
        return match xmpp_parsers::jid::BareJid::new(name) {
            Ok(jid) if jid.node().is_some() && jid.as_str() == name => Ok(()),
            _ => Err(AuthError::InvalidName(format!("`{name}` is no bare JID (user@domain) of another server's user"))),
        };
    }
    match name.split_once('~') {
        Some((asked, suffix))
            if suffix.chars().count() == GUEST_SUFFIX_CHARS && suffix.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            validate_user_name(asked)
        }
        Some(_) => validate_user_name("~"),
        None => validate_user_name(name),
    }
}

/// Shortest password a registered user may have, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Longest password, in bytes (argon2 takes any length; this bounds the work of one login).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Check a new password: at least [`MIN_PASSWORD_CHARS`] characters, at most
/// [`MAX_PASSWORD_BYTES`] bytes, no NUL.
pub fn validate_password(password: &str) -> Result<(), AuthError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(AuthError::WeakPassword(format!("passwords must be at least {MIN_PASSWORD_CHARS} characters")));
    }
    if password.len() > MAX_PASSWORD_BYTES || password.contains('\0') {
        return Err(AuthError::WeakPassword(format!("passwords must be at most {MAX_PASSWORD_BYTES} bytes, without NUL")));
    }
    Ok(())
}

/// How many hex digits of a session's token hash make its id (`stoa session list`).
pub const SESSION_ID_HEX: usize = 16;

/// The id operators see for a session: the first [`SESSION_ID_HEX`] hex digits of the SHA-256
/// of its token. It names the session without being able to resume it.
pub fn session_id(token_hash: &str) -> &str {
    &token_hash[..SESSION_ID_HEX.min(token_hash.len())]
}

/// Check a session id given by an operator: exactly [`SESSION_ID_HEX`] lower-case hex digits.
pub fn validate_session_id(id: &str) -> Result<(), String> {
    if id.len() == SESSION_ID_HEX && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("a session id is {SESSION_ID_HEX} lower-case hex digits, as `stoa session list` shows it"))
    }
}

/// Hash a password (argon2id, random salt) to a PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// The argon2 hash and the SCRAM credentials of a new password (slow: run it off the async
/// threads).
fn password_rows(password: &str) -> Result<(String, UserScram), AuthError> {
    let hash = hash_password(password)?;
    let row = |h: scram::Hash| {
        scram::Credentials::new(h, password).map(|c| ScramRow {
            salt: B64.encode(&c.salt),
            iterations: c.iterations,
            stored_key: B64.encode(&c.stored_key),
            server_key: B64.encode(&c.server_key),
        })
    };
    Ok((hash, UserScram { sha1: row(scram::Hash::Sha1), sha256: row(scram::Hash::Sha256) }))
}

/// Stored SCRAM credentials, decoded; `None` if a field is not base64.
fn decode_scram(row: &ScramRow) -> Option<scram::Credentials> {
    Some(scram::Credentials {
        salt: B64.decode(&row.salt).ok()?,
        iterations: row.iterations,
        stored_key: B64.decode(&row.stored_key).ok()?,
        server_key: B64.decode(&row.server_key).ok()?,
    })
}

/// Check a password against a PHC string.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
        .unwrap_or(false)
}

/// The SHA-256 of a session token, hex: what the store keeps instead of the token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Logs users in against the store.
#[derive(Clone)]
pub struct Auth {
    store: Store,
    allow_guests: bool,
    session_ttl_ms: i64,
}

impl Auth {
    pub fn new(store: Store, allow_guests: bool, session_ttl_s: u64) -> Self {
        Auth { store, allow_guests, session_ttl_ms: (session_ttl_s as i64).saturating_mul(1000) }
    }

    /// [`password_rows`] on a blocking thread.
    async fn hash_off_thread(password: &str) -> Result<(String, UserScram), AuthError> {
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || password_rows(&password)).await.map_err(|e| AuthError::Hash(e.to_string()))?
    }

    /// Register a user (its password's argon2 hash and SCRAM credentials).
    /// A name that looks like a registered one (same [`crate::names::comparison_key`]:
    /// `ANN`, Cyrillic `аnn` or `ann.` beside `ann`) is refused.
    pub async fn add_user(&self, name: &str, password: &str) -> Result<(), AuthError> {
        validate_user_name(name)?;
        validate_password(password)?;
        let key = crate::names::comparison_key(name);
        if let Some((existing, _)) = self.store.list_users().await?.into_iter().find(|(u, _)| crate::names::comparison_key(u) == key) {
            return Err(if existing == name {
                AuthError::Exists
            } else {
                AuthError::InvalidName(format!("`{name}` looks like the registered user `{existing}`; choose a name that does not"))
            });
        }
        let (hash, scram) = Self::hash_off_thread(password).await?;
        match self.store.add_user(name, &hash, &scram).await {
            Err(StoreError::Conflict) => Err(AuthError::Exists),
            other => Ok(other?),
        }
    }

    /// Give a registered user a new password (argon2 hash and SCRAM credentials, which a user
    /// registered before SCRAM gets this way). Its sessions stay valid (`stoa session kick
    /// --user` ends them).
    pub async fn set_password(&self, name: &str, password: &str) -> Result<(), AuthError> {
        validate_user_name(name)?;
        validate_password(password)?;
        if self.store.user_password_hash(name).await?.is_none() {
            return Err(AuthError::NoSuchUser(name.to_owned()));
        }
        let (hash, scram) = Self::hash_off_thread(password).await?;
        match self.store.set_password_hash(name, &hash, &scram).await? {
            true => Ok(()),
            false => Err(AuthError::NoSuchUser(name.to_owned())),
        }
    }

    /// The SCRAM credentials of the registered user `name` for `hash` (SASL SCRAM's first
    /// step); `None` for an unknown user and for one whose password was set before SCRAM
    /// credentials were kept.
    pub async fn scram_credentials(&self, name: &str, hash: scram::Hash) -> Result<Option<scram::Credentials>, AuthError> {
        validate_user_name(name)?;
        let Some(stored) = self.store.user_scram(name).await? else { return Ok(None) };
        let row = match hash {
            scram::Hash::Sha1 => stored.sha1,
            scram::Hash::Sha256 => stored.sha256,
        };
        let credentials = row.as_ref().and_then(decode_scram).filter(|c| c.fits(hash));
        if row.is_some() && credentials.is_none() {
            tracing::warn!(user = name, mechanism = hash.mechanism(), "stored SCRAM credentials are unusable; set the password again");
        }
        Ok(credentials)
    }

    /// Log in the registered user `name`, whose password was checked without being sent
    /// (SASL SCRAM's proof): `verified` is that check's outcome. Denied like a wrong password
    /// if it is false or `name` is not (or no longer) registered; else a new session.
    pub async fn login_verified(&self, name: &str, verified: bool) -> Result<LoggedIn, AuthError> {
        validate_user_name(name)?;
        if !verified || self.store.user_password_hash(name).await?.is_none() {
            return Err(AuthError::Denied("wrong user name or password"));
        }
        self.new_session(name.to_owned(), false).await
    }

    /// Store a new session of `user` and hand out its token.
    async fn new_session(&self, user: String, guest: bool) -> Result<LoggedIn, AuthError> {
        let token = new_token();
        self.store.create_session(&token_hash(&token), &user, guest, now_ms() + self.session_ttl_ms).await?;
        Ok(LoggedIn { user, guest, token })
    }

    /// Log in with a token, a password, or (if allowed) as a guest with an unregistered name.
    pub async fn login(&self, user: Option<&str>, password: Option<&str>, token: Option<&str>) -> Result<LoggedIn, AuthError> {
        if let Some(token) = token {
            if password.is_some() {
                // A password beside a token would be ignored; say so rather than log in.
                return Err(AuthError::Denied("give either `token` or `password`, not both"));
            }
            let (name, guest) = self
                .store
                .lookup_session(&token_hash(token))
                .await?
                .ok_or(AuthError::Denied("unknown or expired session token"))?;
            if user.is_some_and(|u| u != name) {
                return Err(AuthError::Denied("token belongs to another user"));
            }
            return Ok(LoggedIn { user: name, guest, token: token.to_owned() });
        }
        let user = user.ok_or(AuthError::Denied("hello needs `user` (with `password`) or `token`"))?;
        validate_user_name(user)?;
        let stored = self.store.user_password_hash(user).await?;
        let guest = match (stored, password) {
            (Some(hash), Some(password)) => {
                let password = password.to_owned();
                let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
                    .await
                    .unwrap_or(false);
                if !ok {
                    return Err(AuthError::Denied("wrong user name or password"));
                }
                false
            }
            (Some(_), None) => return Err(AuthError::Denied("this user name is registered: a password is required")),
            (None, _) if self.allow_guests => {
                if user.chars().count() > MAX_GUEST_CHARS {
                    return Err(AuthError::InvalidName(format!("guest names are at most {MAX_GUEST_CHARS} characters")));
                }
                true
            }
            (None, _) => return Err(AuthError::Denied("wrong user name or password")),
        };
        let user = if guest { guest_name(user) } else { user.to_owned() };
        self.new_session(user, guest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "wrong"));
        assert!(!verify_password("not a hash", "x"));
    }

    #[test]
    fn a_password_leaves_scram_credentials_that_log_in() {
        let (hash, scram_rows) = password_rows("correct horse").unwrap();
        assert!(verify_password(&hash, "correct horse"));
        for (h, row) in [(scram::Hash::Sha1, &scram_rows.sha1), (scram::Hash::Sha256, &scram_rows.sha256)] {
            let row = row.as_ref().expect("SCRAM credentials for every hash");
            assert_eq!(row.iterations, scram::DEFAULT_ITERATIONS);
            let stored = decode_scram(row).unwrap();
            assert_eq!(stored.salt.len(), scram::SALT_BYTES);
            assert_eq!(Some(stored.clone()), scram::Credentials::derive(h, "correct horse", &stored.salt, stored.iterations));
        }
        assert_ne!(scram_rows.sha1.unwrap().salt, scram_rows.sha256.unwrap().salt, "a salt per hash");
        // A password SASLprep refuses keeps its argon2 hash, without SCRAM credentials.
        let (_, none) = password_rows("bell\u{7}bell\u{7}").unwrap();
        assert_eq!(none, UserScram::default());
        assert_eq!(decode_scram(&ScramRow { salt: "***".into(), iterations: 1, stored_key: String::new(), server_key: String::new() }), None);
    }

    #[test]
    fn user_names() {
        assert!(validate_user_name("ann.b-c_9").is_ok());
        assert!(validate_user_name("").is_err());
        assert!(validate_user_name("a b").is_err());
        assert!(validate_user_name("a@b").is_err());
        assert!(validate_user_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn guest_names_cannot_be_asked_for_but_can_be_named() {
        let g = guest_name("erin");
        assert!(g.starts_with("erin~") && g.len() == "erin~".len() + GUEST_SUFFIX_CHARS, "{g}");
        assert_ne!(g, guest_name("erin"));
        assert!(validate_user_name(&g).is_err(), "no hello may ask for a guest's name");
        assert!(validate_user_ref(&g).is_ok() && validate_user_ref("erin").is_ok());
        assert!(validate_user_ref("erin~").is_err() && validate_user_ref("erin~abc").is_err() && validate_user_ref("~abcdef").is_err());
        assert!(guest_name(&"e".repeat(MAX_GUEST_CHARS)).chars().count() <= MAX_USER_CHARS);
    }

    #[test]
    fn passwords_need_eight_characters() {
        assert!(validate_password("1234567").unwrap_err().to_string().contains("at least 8 characters"));
        validate_password("12345678").unwrap();
        // Characters, not bytes: seven two-byte characters are still too short.
        assert!(validate_password("ééééééé").is_err());
        assert!(validate_password(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_err());
        assert!(validate_password("abcdefgh\0").is_err());
    }

    #[test]
    fn session_ids_are_a_prefix_of_the_token_hash() {
        let hash = token_hash(&new_token());
        let id = session_id(&hash);
        assert_eq!(id.len(), SESSION_ID_HEX);
        assert!(hash.starts_with(id));
        validate_session_id(id).unwrap();
        assert!(validate_session_id("ABCDEF0123456789").is_err());
        assert!(validate_session_id("abc").is_err());
        assert!(validate_session_id("abcdef012345678%").is_err());
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_ne!(token_hash(&a), a);
    }
}
