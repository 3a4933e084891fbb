//! Tenant credentials at the entry: who a client is, checked before it is
//! served.
//!
//! A `[[tenants]]` entry may carry `password_hash`, an Argon2id hash in the
//! PHC string format (`$argon2id$v=19$m=19456,t=2,p=1$…`, what `ferry tenant
//! add` prints). The `argon2` crate (RustCrypto) hashes and verifies; it
//! compares in constant time, and an unknown tenant name is checked against a
//! fixed dummy hash, so neither the name's existence nor where a password
//! differs shows in the time an answer takes.
//!
//! With credentials, the SOCKS5 password is the tenant's password,
//! optionally followed by `|` and the connection's routing options
//! (`s3cret|exclude=PK;exit_in=CA`); the last `|` splits them (options never
//! contain one). A tenant without `password_hash`, and anonymous clients
//! (username empty or `-`), put the options in the password as before.
//!
//! An entry any of whose tenants has a password requires authentication:
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

/// Why a client was refused; carries no secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    /// The username names no tenant.
    #[error("unknown tenant")]
    UnknownTenant,
    /// The password does not match the tenant's hash.
    #[error("wrong password")]
    BadPassword,
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

/// Checks that `hash` is a PHC string Argon2 can verify against.
pub fn check_hash(hash: &str) -> anyhow::Result<()> {
    let h = PasswordHash::new(hash).map_err(|e| anyhow::anyhow!("not a PHC hash string: {e}"))?;
    if h.algorithm.as_str() != "argon2id" {
        anyhow::bail!(
            "algorithm `{}`: use argon2id (`ferry tenant add` prints one)",
            h.algorithm
        );
    }
    Ok(())
}

/// A fixed hash that no password matches quickly: what an unknown tenant's
/// password is checked against, so it costs what a known one does.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::encode_b64(b"ferry-dummy-salt").expect("a valid salt");
        Argon2::default()
            .hash_password(b"no tenant has this password", &salt)
            .expect("hashing a constant")
            .to_string()
    })
}

/// Verifies `password` against the PHC string `hash` (constant time in
/// where they differ: the crate compares whole digests).
pub fn verify(password: &str, hash: Option<&str>) -> bool {
    let (hash, real) = match hash {
        Some(h) => (h, true),
        None => (dummy_hash(), false),
    };
    let ok = PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false);
    ok && real
}
