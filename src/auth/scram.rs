//! SASL SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677), server side, without channel
//! binding: the credentials a password leaves in the store, the parsing of the client's two
//! messages, and the check of its proof.
//!
//! A password leaves, per hash, a random salt, an iteration count, `StoredKey = H(ClientKey)`
//! and `ServerKey`: enough to check a client's proof and to prove the server knows them, not to
//! log in as the user. The exchange:
//!
//! 1. client-first `n,,n=user,r=cnonce` ([`parse_client_first`]);
//! 2. server-first `r=cnonce+snonce,s=salt,i=4096` ([`Exchange::start`]);
//! 3. client-final `c=biws,r=cnonce+snonce,p=proof` and, if the proof is right, server-final
//!    `v=ServerSignature` ([`Exchange::finish`]).
//!
//! A user without credentials (unknown, or whose password was set before SCRAM) gets a salt
//! derived from its name and a server secret at step 2, the same every time as a real one is,
//! and fails at step 3: the first step does not tell who exists.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Iterations of the salted password (`i=`) for new credentials: RFC 7677's minimum for
/// SCRAM-SHA-256, and RFC 5802's example for SCRAM-SHA-1.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Bytes of a new salt.
pub const SALT_BYTES: usize = 16;

/// Random bytes of the server's part of the nonce (base64: 24 characters).
const SERVER_NONCE_BYTES: usize = 18;

/// The hash of a SCRAM mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    /// Every hash, strongest first: the order in which `<mechanisms>` offers them.
    pub const ALL: [Hash; 2] = [Hash::Sha256, Hash::Sha1];

    /// The SASL mechanism name.
    pub fn mechanism(self) -> &'static str {
        match self {
            Hash::Sha1 => "SCRAM-SHA-1",
            Hash::Sha256 => "SCRAM-SHA-256",
        }
    }

    /// The hash of a SASL mechanism name (not the `-PLUS` variants: no channel binding).
    pub fn from_mechanism(name: &str) -> Option<Hash> {
        Hash::ALL.into_iter().find(|h| h.mechanism() == name)
    }

    /// Bytes of the hash's output (and of every key and proof).
    pub fn output_len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
        }
    }

    /// `H(data)`.
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => Sha1::digest(data).to_vec(),
            Hash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    /// `HMAC(key, data)`.
    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &[u8]) -> Vec<u8> {
            let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            Hash::Sha1 => run::<Hmac<Sha1>>(key, data),
            Hash::Sha256 => run::<Hmac<Sha256>>(key, data),
        }
    }

    /// `Hi(password, salt, i)`: PBKDF2 with HMAC of this hash.
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.output_len()];
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out),
        }
        out
    }
}

/// What the server keeps of a password for one hash (RFC 5802 §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub salt: Vec<u8>,
    pub iterations: u32,
    /// `H(ClientKey)`: checks the client's proof.
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`: signs the server's final message.
    pub server_key: Vec<u8>,
}

impl Credentials {
    /// New credentials for `password`: a random salt, [`DEFAULT_ITERATIONS`]. `None` when
    /// SASLprep (RFC 4013) refuses the password (a control or unassigned character): a client
    /// could not log in with it over SCRAM anyway.
    pub fn new(hash: Hash, password: &str) -> Option<Credentials> {
        let mut salt = vec![0u8; SALT_BYTES];
        rand::rng().fill_bytes(&mut salt);
        Credentials::derive(hash, password, &salt, DEFAULT_ITERATIONS)
    }

    /// The credentials of `password` with `salt` and `iterations` (at least 1); `None` when
    /// SASLprep refuses the password or `iterations` is 0.
    pub fn derive(hash: Hash, password: &str, salt: &[u8], iterations: u32) -> Option<Credentials> {
        if iterations == 0 {
            return None;
        }
        let password = stringprep::saslprep(password).ok()?;
        let salted = hash.salted_password(password.as_bytes(), salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        Some(Credentials {
            salt: salt.to_vec(),
            iterations,
            stored_key: hash.digest(&client_key),
            server_key: hash.hmac(&salted, b"Server Key"),
        })
    }

    /// Credentials for a user that has none: a salt derived from `user` and the server's
    /// `secret` (the same at every attempt, as a real user's is), [`DEFAULT_ITERATIONS`], and
    /// keys no proof matches.
    fn fake(hash: Hash, secret: &[u8], user: &str) -> Credentials {
        let mut label = format!("stoa scram fake salt\0{}\0", hash.mechanism()).into_bytes();
        label.extend_from_slice(user.as_bytes());
        let mut salt = Hash::Sha256.hmac(secret, &label);
        salt.truncate(SALT_BYTES);
        let mut stored_key = vec![0u8; hash.output_len()];
        rand::rng().fill_bytes(&mut stored_key);
        Credentials { salt, iterations: DEFAULT_ITERATIONS, server_key: stored_key.clone(), stored_key }
    }

    /// Credentials with usable fields: a salt, at least one iteration, keys of the hash's size.
    pub fn fits(&self, hash: Hash) -> bool {
        !self.salt.is_empty() && self.iterations > 0 && self.stored_key.len() == hash.output_len() && self.server_key.len() == hash.output_len()
    }
}

/// Why a SCRAM exchange failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// Not a message of RFC 5802's grammar (or one with a mandatory extension `m=`).
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for channel binding (`p=`): no `-PLUS` mechanism is offered.
    #[error("channel binding is not supported (no -PLUS mechanism is offered)")]
    ChannelBinding,
    /// The client-final message does not continue this exchange (its channel binding or nonce
    /// differ from the first messages').
    #[error("{0}")]
    Mismatch(&'static str),
    /// The proof is wrong, or the user has no SCRAM credentials.
    #[error("wrong user name or password")]
    InvalidProof,
}

/// The client's first message (RFC 5802 §7 `client-first-message`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFirst {
    /// The authorization identity (`a=`), decoded, if the client gave one.
    pub authzid: Option<String>,
    /// The user name (`n=`), decoded.
    pub user: String,
    /// The GS2 header as sent (`n,,`): the client-final's `c=` repeats it.
    gs2_header: String,
    /// The client's nonce (`r=`).
    nonce: String,
    /// `client-first-message-bare`: the start of the AuthMessage.
    bare: String,
}

/// Parse the client's first message: `n,,n=user,r=nonce` (or `y,,…`, or with `a=authzid`).
pub fn parse_client_first(message: &[u8]) -> Result<ClientFirst, ScramError> {
    let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    if text.contains('\0') {
        return Err(ScramError::Malformed("a NUL character"));
    }
    let mut parts = text.splitn(3, ',');
    let (Some(flag), Some(authz), Some(bare)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ScramError::Malformed("expected a GS2 header `n,,` and `n=user,r=nonce`"));
    };
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("the GS2 header starts with `n`, `y` or `p=`")),
    }
    let authzid = match authz {
        "" => None,
        a => Some(saslname(a.strip_prefix("a=").ok_or(ScramError::Malformed("the GS2 header's second field is `a=authzid` or empty"))?)?),
    };
    let gs2_header = text[..flag.len() + authz.len() + 2].to_owned();
    let mut attrs = bare.split(',');
    let first = attrs.next().unwrap_or_default();
    if first.starts_with("m=") {
        return Err(ScramError::Malformed("mandatory extensions (`m=`) are not supported"));
    }
    let user = saslname(first.strip_prefix("n=").ok_or(ScramError::Malformed("expected `n=user`"))?)?;
    let nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(ScramError::Malformed("expected `r=nonce` after the user name"))?;
    check_nonce(nonce)?;
    attrs.try_for_each(extension)?;
    Ok(ClientFirst { authzid, user, gs2_header, nonce: nonce.to_owned(), bare: bare.to_owned() })
}

/// Decode a `saslname`: `=2C` is `,`, `=3D` is `=`; any other `=` is malformed.
fn saslname(text: &str) -> Result<String, ScramError> {
    if text.is_empty() {
        return Err(ScramError::Malformed("an empty name"));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let escaped = rest.get(at + 1..at + 3);
        match escaped {
            Some("2C") => out.push(','),
            Some("3D") => out.push('='),
            _ => return Err(ScramError::Malformed("`=` in a name is `=2C` or `=3D`")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A nonce is printable ASCII without `,`, at least one character.
fn check_nonce(nonce: &str) -> Result<(), ScramError> {
    if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
        return Err(ScramError::Malformed("a nonce is printable ASCII without `,`"));
    }
    Ok(())
}

/// An optional extension `x=value`: ignored, but it must be well-formed.
fn extension(attr: &str) -> Result<(), ScramError> {
    let mut chars = attr.chars();
    match (chars.next(), chars.next(), chars.next()) {
        (Some(c), Some('='), Some(_)) if c.is_ascii_alphabetic() => Ok(()),
        _ => Err(ScramError::Malformed("an attribute is a letter, `=` and a value")),
    }
}

/// An exchange after the server's first message, waiting for the client's final one.
#[derive(Debug)]
pub struct Exchange {
    hash: Hash,
    /// The client's GS2 header, which `c=` must repeat.
    gs2_header: String,
    /// The client's and the server's nonce together.
    nonce: String,
    /// `client-first-message-bare "," server-first-message ","`: the AuthMessage before the
    /// client's final message.
    auth_prefix: String,
    credentials: Credentials,
    /// The credentials are the user's (not a stand-in for a user that has none).
    known: bool,
}

impl Exchange {
    /// Answer `first` with the server-first-message. `credentials`: the user's, or `None` for
    /// a user without (then a stand-in derived from the user name and `secret`, and the proof
    /// fails at [`Exchange::finish`]).
    pub fn start(hash: Hash, first: &ClientFirst, credentials: Option<Credentials>, secret: &[u8]) -> (Exchange, String) {
        let mut nonce = [0u8; SERVER_NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        Exchange::start_with_nonce(hash, first, credentials, secret, &B64.encode(nonce))
    }

    fn start_with_nonce(hash: Hash, first: &ClientFirst, credentials: Option<Credentials>, secret: &[u8], server_nonce: &str) -> (Exchange, String) {
        let known = credentials.as_ref().is_some_and(|c| c.fits(hash));
        let credentials = match credentials {
            Some(c) if known => c,
            _ => Credentials::fake(hash, secret, &first.user),
        };
        let nonce = format!("{}{server_nonce}", first.nonce);
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&credentials.salt), credentials.iterations);
        let auth_prefix = format!("{},{server_first},", first.bare);
        let exchange = Exchange { hash, gs2_header: first.gs2_header.clone(), nonce, auth_prefix, credentials, known };
        (exchange, server_first)
    }

    /// Check the client's final message `c=…,r=…,p=proof`: on success, the
    /// server-final-message (`v=ServerSignature`) for `<success/>`.
    pub fn finish(&self, message: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("expected `p=proof` last"))?;
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed("the proof is not base64"))?;
        if proof.len() != self.hash.output_len() {
            return Err(ScramError::Malformed("the proof has the wrong length for this hash"));
        }
        let mut attrs = without_proof.split(',');
        let binding = attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or(ScramError::Malformed("expected `c=` first"))?;
        let binding = B64.decode(binding).map_err(|_| ScramError::Malformed("`c=` is not base64"))?;
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(ScramError::Malformed("expected `r=nonce` after `c=`"))?;
        attrs.try_for_each(extension)?;
        if binding != self.gs2_header.as_bytes() {
            return Err(ScramError::Mismatch("`c=` does not repeat the GS2 header of the first message"));
        }
        if nonce != self.nonce {
            return Err(ScramError::Mismatch("the nonce is not this exchange's"));
        }
        let auth_message = format!("{}{without_proof}", self.auth_prefix);
        let signature = self.hash.hmac(&self.credentials.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        if !(constant_time_eq(&self.hash.digest(&client_key), &self.credentials.stored_key) && self.known) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = self.hash.hmac(&self.credentials.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// `a == b`, in a time that depends on the length only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run an exchange with a fixed server nonce, as the RFCs' examples do.
    fn exchange(hash: Hash, password: &str, salt_b64: &str, client_first: &str, server_nonce: &str) -> (Exchange, String) {
        let salt = B64.decode(salt_b64).unwrap();
        let credentials = Credentials::derive(hash, password, &salt, 4096).unwrap();
        let first = parse_client_first(client_first.as_bytes()).unwrap();
        Exchange::start_with_nonce(hash, &first, Some(credentials), b"secret", server_nonce)
    }

    #[test]
    fn rfc_5802_scram_sha_1_example() {
        let (ex, server_first) = exchange(Hash::Sha1, "pencil", "QSXCR+Q6sek8bf92", "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL", "3rfcNHYJY1ZVvWVs7j");
        assert_eq!(server_first, "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096");
        let client_final = "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
        assert_eq!(ex.finish(client_final.as_bytes()).unwrap(), "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=");
    }

    #[test]
    fn rfc_7677_scram_sha_256_example() {
        let (ex, server_first) =
            exchange(Hash::Sha256, "pencil", "W22ZaJ0SNY7soEsUEjb6gQ==", "n,,n=user,r=rOprNGfwEbeRWgbNEkqO", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        assert_eq!(server_first, "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096");
        let client_final = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(ex.finish(client_final.as_bytes()).unwrap(), "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    /// The client side of an exchange, to test what the RFCs do not show.
    fn client_final(hash: Hash, password: &str, gs2_header: &str, client_first_bare: &str, server_first: &str) -> String {
        let attr = |name: &str| server_first.split(',').find_map(|a| a.strip_prefix(name)).unwrap().to_owned();
        let (nonce, salt, iterations) = (attr("r="), B64.decode(attr("s=")).unwrap(), attr("i=").parse().unwrap());
        let salted = hash.salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        let without_proof = format!("c={},r={nonce}", B64.encode(gs2_header));
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hash.hmac(&hash.digest(&client_key), auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&signature).map(|(k, s)| k ^ s).collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    #[test]
    fn new_credentials_log_in_and_a_wrong_password_does_not() {
        for hash in Hash::ALL {
            let credentials = Credentials::new(hash, "correct horse").unwrap();
            assert_eq!((credentials.salt.len(), credentials.iterations), (SALT_BYTES, DEFAULT_ITERATIONS));
            assert!(credentials.fits(hash));
            assert_ne!(Credentials::new(hash, "correct horse").unwrap().salt, credentials.salt, "a new salt each time");
            for (header, password, ok) in [("n,,", "correct horse", true), ("y,,", "correct horse", true), ("n,,", "wrong horse", false)] {
                let bare = "n=ann,r=abcdef";
                let first = parse_client_first(format!("{header}{bare}").as_bytes()).unwrap();
                let (ex, server_first) = Exchange::start(hash, &first, Some(credentials.clone()), b"secret");
                let answer = ex.finish(client_final(hash, password, header, bare, &server_first).as_bytes());
                assert_eq!(answer.is_ok(), ok, "{hash:?} {header} {password}: {answer:?}");
                if !ok {
                    assert_eq!(answer, Err(ScramError::InvalidProof));
                }
            }
        }
    }

    #[test]
    fn saslprep_applies_to_the_password() {
        // U+00AD (soft hyphen) maps to nothing: the client sends "pencil".
        let salt = b"salt";
        assert_eq!(Credentials::derive(Hash::Sha256, "pen\u{AD}cil", salt, 4096), Credentials::derive(Hash::Sha256, "pencil", salt, 4096));
        assert_eq!(Credentials::derive(Hash::Sha256, "bell\u{7}bell", salt, 4096), None, "a control character is prohibited");
        assert_eq!(Credentials::derive(Hash::Sha256, "pencil", salt, 0), None);
    }

    #[test]
    fn a_user_without_credentials_gets_a_stable_salt_and_fails_at_the_proof() {
        let first = parse_client_first(b"n,,n=nobody,r=abc").unwrap();
        let (ex, server_first) = Exchange::start(Hash::Sha256, &first, None, b"secret");
        let (_, again) = Exchange::start(Hash::Sha256, &first, None, b"secret");
        let salt = |s: &str| s.split(',').nth(1).unwrap().to_owned();
        assert_eq!(salt(&server_first), salt(&again), "the same salt at every attempt");
        assert!(server_first.ends_with(",i=4096"), "{server_first}");
        let (_, other_secret) = Exchange::start(Hash::Sha256, &first, None, b"another secret");
        assert_ne!(salt(&server_first), salt(&other_secret));
        let (_, sha1) = Exchange::start(Hash::Sha1, &first, None, b"secret");
        assert_ne!(salt(&server_first), salt(&sha1));
        let answer = ex.finish(client_final(Hash::Sha256, "any password", "n,,", "n=nobody,r=abc", &server_first).as_bytes());
        assert_eq!(answer, Err(ScramError::InvalidProof));
        // Credentials of the wrong size are as good as none.
        let broken = Credentials { salt: vec![1], iterations: 1, stored_key: vec![0; 20], server_key: vec![0; 20] };
        let (ex, _) = Exchange::start(Hash::Sha256, &first, Some(broken), b"secret");
        assert!(!ex.known);
    }

    #[test]
    fn client_first_fields() {
        let first = parse_client_first(b"n,a=ann@localhost,n=a=2Cb=3Dc,r=xyz,x=ext").unwrap();
        assert_eq!(first.authzid.as_deref(), Some("ann@localhost"));
        assert_eq!(first.user, "a,b=c");
        assert_eq!(first.gs2_header, "n,a=ann@localhost,");
        assert_eq!(first.bare, "n=a=2Cb=3Dc,r=xyz,x=ext");
        assert_eq!(first.nonce, "xyz");
    }

    #[test]
    fn malformed_client_first_messages_are_refused() {
        let malformed: &[&[u8]] = &[
            b"",
            b"n",
            b"n,,",
            b"biws",
            b"x,,n=user,r=abc",
            b"n,,n=user",
            b"n,,r=abc,n=user",
            b"n,,n=,r=abc",
            b"n,,n=user,r=",
            b"n,,n=user,r=a b",
            b"n,,n=us=er,r=abc",
            b"n,,n=user=2,r=abc",
            b"n,,n=user=,r=abc",
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=user,r=abc,junk",
            b"n,,n=user,r=abc,=x",
            b"n,a=,n=user,r=abc",
            b"n,b=ann,n=user,r=abc",
            b"n,,n=us\0er,r=abc",
            b"n,,n=\xff\xfe,r=abc",
        ];
        for m in malformed {
            assert!(matches!(parse_client_first(m), Err(ScramError::Malformed(_))), "{:?}", String::from_utf8_lossy(m));
        }
        assert_eq!(parse_client_first(b"p=tls-unique,,n=user,r=abc"), Err(ScramError::ChannelBinding));
    }

    #[test]
    fn malformed_or_foreign_client_final_messages_are_refused() {
        let (ex, server_first) = exchange(Hash::Sha1, "pencil", "QSXCR+Q6sek8bf92", "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL", "3rfcNHYJY1ZVvWVs7j");
        let nonce = server_first.split(',').next().unwrap();
        let proof = "p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
        for m in [
            String::new(),
            "c=biws".into(),
            format!("c=biws,{nonce}"),
            format!("c=biws,{nonce},p=***"),
            format!("c=biws,{nonce},p=AAAA"),
            format!("c=biws,{nonce},{proof},x=y"),
            format!("{nonce},c=biws,{proof}"),
            format!("c=***,{nonce},{proof}"),
            format!("c=biws,{nonce},junk,{proof}"),
        ] {
            assert!(matches!(ex.finish(m.as_bytes()), Err(ScramError::Malformed(_))), "{m}");
        }
        assert!(matches!(ex.finish(b"\xff,p=AAAA"), Err(ScramError::Malformed(_))));
        assert!(matches!(ex.finish(format!("c=eSws,{nonce},{proof}").as_bytes()), Err(ScramError::Mismatch(_))), "c= of `y,,`");
        assert!(matches!(ex.finish(format!("c=biws,r=fyko+d2lbbFgONRv9qkxdawL,{proof}").as_bytes()), Err(ScramError::Mismatch(_))));
        // An extension before the proof is allowed (and ignored), but it is part of the
        // AuthMessage, so the RFC's proof no longer matches.
        assert_eq!(ex.finish(format!("c=biws,{nonce},x=y,{proof}").as_bytes()), Err(ScramError::InvalidProof));
    }

    #[test]
    fn mechanism_names() {
        assert_eq!(Hash::from_mechanism("SCRAM-SHA-256"), Some(Hash::Sha256));
        assert_eq!(Hash::from_mechanism("SCRAM-SHA-1"), Some(Hash::Sha1));
        assert_eq!(Hash::from_mechanism("SCRAM-SHA-1-PLUS"), None);
        assert_eq!(Hash::ALL.map(Hash::mechanism), ["SCRAM-SHA-256", "SCRAM-SHA-1"]);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
