//! Tenant credentials at the entry: who a client is, checked before it is
//! served.
//!
//! A `[[tenants]]` entry may carry `password_hash`, an Argon2id hash in the
//! PHC string format (`$argon2id$v=19$m=19456,t=2,p=1$…`, what `ferry tenant
//! add` prints). The `argon2` crate (RustCrypto) hashes and verifies; it
//! compares in constant time, and an unknown tenant name costs a
//! verification against a tenant's hash (its result thrown away), so
//! neither the name's existence nor where a password differs shows in the
//! time an answer takes. On an entry with no passwords (tokens only), every
//! check is a SHA-256 and an unknown name is refused at once.
//!
//! With credentials, the SOCKS5 password is the tenant's password,
//! optionally followed by `|` and the connection's routing options
//! (`s3cret|exclude=PK;exit_in=CA`); the last `|` splits them (options never
//! contain one). A tenant without `password_hash`, and anonymous clients
//! (username empty or `-`), put the options in the password as before.
//!
//! A tenant may instead (or also) carry `token_hash`: the SHA-256 of a
//! bearer token (`sha256:` and 64 hex digits; `ferry tenant add --token`
//! makes a token of 32 random bytes and prints both). An HTTP CONNECT
//! client sends `Proxy-Authorization: Bearer TOKEN` and needs no name; a
//! SOCKS5 (or HTTP Basic) client sends the tenant's name and the token as
//! its password. A token has 256 bits of entropy, so a fast hash suffices
//! (no Argon2 cost); digests are compared with `subtle` in constant time.
//!
//! An entry any of whose tenants has credentials requires authentication:
//! anonymous clients are refused unless `[routing] allow_anonymous = true`
//! (they get `anonymous_class`). An unknown tenant name is always refused:
//! it never silently becomes "no tenant".

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// A checked client: its tenant (empty: anonymous) and its options text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The tenant's name; empty for an anonymous client.
    pub tenant: String,
    /// The connection's routing options (see `routing::ConnOptions`).
    pub options: String,
}

/// What a client presented.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A username and password (SOCKS5 RFC 1929, HTTP Basic).
    Basic(String, String),
    /// A bearer token (HTTP `Proxy-Authorization: Bearer`).
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    /// Never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic(user, _) => write!(f, "Basic({user:?}, ..)"),
            Credentials::Bearer(_) => f.write_str("Bearer(..)"),
        }
    }
}

/// Why a client was refused; carries no secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    /// The username names no tenant.
    #[error("unknown tenant")]
    UnknownTenant,
    /// The password does not match the tenant's hash.
    #[error("wrong password")]
    BadPassword,
    /// The bearer token (or the token sent as a password) is no tenant's.
    #[error("unknown token")]
    BadToken,
    /// This entry requires credentials and the client sent none.
    #[error("this entry requires a tenant's credentials")]
    Anonymous,
    /// Too many password checks are running and this one waited too long
    /// for its turn, so a flood of logins cannot pile up memory and CPU
    /// (each check takes ~19 MiB).
    #[error("too many credential checks waiting")]
    Busy,
}

impl AuthRefusal {
    /// A bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthRefusal::UnknownTenant => "unknown_tenant",
            AuthRefusal::BadPassword => "bad_password",
            AuthRefusal::BadToken => "bad_token",
            AuthRefusal::Anonymous => "anonymous",
            AuthRefusal::Busy => "busy",
        }
    }
}

/// Hashes a password for `[[tenants]] password_hash` (Argon2id, the
/// crate's default parameters, a fresh random salt).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

/// The prefix of a token, so one is recognisable in a config or a leak
/// scanner.
pub const TOKEN_PREFIX: &str = "ferry_";

/// A new bearer token (32 random bytes from the OS, base64url) and its
/// `token_hash` line value.
pub fn new_token() -> (String, String) {
    use base64::Engine;
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let hash = format!("sha256:{}", hex::encode(token_digest(&token)));
    (token, hash)
}

/// The SHA-256 of a token.
pub fn token_digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Parses a `token_hash` value: `sha256:` and 64 hex digits.
pub fn parse_token_hash(s: &str) -> anyhow::Result<[u8; 32]> {
    let hex = s.strip_prefix("sha256:").ok_or_else(|| {
        anyhow::anyhow!("must be `sha256:` and 64 hex digits (ferry tenant add --token prints one)")
    })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out)
        .map_err(|_| anyhow::anyhow!("must be `sha256:` and 64 hex digits"))?;
    Ok(out)
}

/// Whether `token` hashes to `digest` (compared in constant time).
pub fn verify_token(token: &str, digest: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    token_digest(token).ct_eq(digest).into()
}

/// Checks that `hash` is a PHC string Argon2 can verify against.
pub fn check_hash(hash: &str) -> anyhow::Result<()> {
    let h = PasswordHash::new(hash).map_err(|e| anyhow::anyhow!("not a PHC hash string: {e}"))?;
    if h.algorithm.as_str() != "argon2id" {
        anyhow::bail!(
            "algorithm `{}`: use argon2id (`ferry tenant add` prints one)",
            h.algorithm
        );
    }
    // Each check holds `m` KiB while it runs, two per core at once: bound
    // what a config can make a login cost. (An unknown name is checked
    // against one tenant's hash, so tenants whose hashes have other
    // parameters answer in another time: `ferry tenant add` makes all
    // alike.)
    let params =
        argon2::Params::try_from(&h).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    if params.m_cost() > 65_536 || params.t_cost() > 16 || params.p_cost() > 8 {
        anyhow::bail!(
            "argon2 parameters m={} t={} p={} are above m=65536 (64 MiB), t=16, p=8",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        );
    }
    Ok(())
}

/// Verifies `password` against the PHC string `hash` (constant time in
/// where they differ: the crate compares whole digests).
pub fn verify(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The longest token a client may present (a made one is 49 bytes): a
/// longer one is refused before it is hashed.
pub const TOKEN_MAX: usize = 256;
