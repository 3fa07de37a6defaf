//! Users and sessions: argon2 password hashes, session tokens, guest login in dev mode.
//!
//! A session token is 32 random bytes (hex); the store keeps only its SHA-256, so a leaked
//! database does not leak live sessions. Tokens live in the shared store, so a client can
//! resume on any node of its group with the token from `welcome`.

use crate::store::{Store, StoreError, now_ms};
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
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
/// name, or a guest's `name~suffix`.
pub fn validate_user_ref(name: &str) -> Result<(), AuthError> {
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

    /// Register a user.
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
        let password = password.to_owned();
        let hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| AuthError::Hash(e.to_string()))??;
        match self.store.add_user(name, &hash).await {
            Err(StoreError::Conflict) => Err(AuthError::Exists),
            other => Ok(other?),
        }
    }

    /// Give a registered user a new password. Its sessions stay valid (`stoa session kick
    /// --user` ends them).
    pub async fn set_password(&self, name: &str, password: &str) -> Result<(), AuthError> {
        validate_user_name(name)?;
        validate_password(password)?;
        if self.store.user_password_hash(name).await?.is_none() {
            return Err(AuthError::NoSuchUser(name.to_owned()));
        }
        let password = password.to_owned();
        let hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| AuthError::Hash(e.to_string()))??;
        match self.store.set_password_hash(name, &hash).await? {
            true => Ok(()),
            false => Err(AuthError::NoSuchUser(name.to_owned())),
        }
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
        let token = new_token();
        self.store.create_session(&token_hash(&token), &user, guest, now_ms() + self.session_ttl_ms).await?;
        Ok(LoggedIn { user, guest, token })
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
