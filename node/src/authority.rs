//! Jurisdiction rulings as the authority writes, signs and nodes verify them.
//!
//! An operator writes a ruling file (TOML or JSON, the router's model with
//! RFC 3339 dates), signs it with `ferry policy sign` (once per authority key
//! for k-of-n), and publishes the signed file to any node. Nodes verify it
//! against the authority public keys in their config before it touches the
//! router; every refusal has a bounded reason that is counted.

use crate::identity::parse_key_hex;
use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use ferry_proto::pb;
use ferry_router::{Blocs, Region, Ruling, Scope, Time};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Domain separation for ruling signatures.
pub const RULING_CONTEXT: &[u8] = b"ferry/ruling/1";
/// The largest signed ruling a node accepts, in bytes.
pub const MAX_SIGNED_RULING: usize = 16 * 1024;
/// Most signatures one signed statement (ruling, certificate, revocation)
/// may carry.
pub const MAX_SIGNATURES: usize = 16;

/// Milliseconds since the UNIX epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A ruling file as an operator writes it.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RulingFile {
    /// Stable id across versions.
    pub id: String,
    /// Monotonic per id.
    pub version: u64,
    /// Country code or bloc name.
    pub region: String,
    /// RFC 3339, for example `2026-12-01T00:00:00Z`.
    pub blocked_from: String,
    /// RFC 3339.
    pub exit_by: String,
    /// Service classes it covers (empty with no tenants: all traffic).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Tenants it covers.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// This version lifts the ruling.
    #[serde(default)]
    pub lifted: bool,
}

fn parse_time(key: &str, s: &str) -> Result<u64> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| anyhow!("{key} = `{s}`: not an RFC 3339 time ({e})"))?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map_err(|_| anyhow!("{key} is before 1970"))?
        .as_millis() as u64)
}

/// RFC 3339 (seconds) for a time in ms since the UNIX epoch.
pub fn fmt_time(ms: u64) -> String {
    // RFC 3339 ends at year 9999, and so does `humantime` (it panics past
    // it): a later time (only a signed or persisted input could hold one)
    // prints as the last second it can write.
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms.min(MAX_TIME_MS)))
        .to_string()
}

/// The last millisecond RFC 3339 can write: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

impl RulingFile {
    /// Parses TOML or JSON (by the first non-blank character).
    pub fn parse(text: &str) -> Result<Self> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).context("ruling JSON")
        } else {
            toml::from_str(text).map_err(|e| anyhow!("ruling TOML: {e}"))
        }
    }

    /// The body to sign, valid for receipt for `valid_for`.
    pub fn to_body(&self, now: u64, valid_for: Duration) -> Result<pb::RulingBody> {
        let body = pb::RulingBody {
            id: self.id.clone(),
            version: self.version,
            region: self.region.clone(),
            blocked_from_ms: parse_time("blocked_from", &self.blocked_from)?,
            exit_by_ms: parse_time("exit_by", &self.exit_by)?,
            classes: self.classes.clone(),
            tenants: self.tenants.clone(),
            reason: self.reason.clone(),
            lifted: self.lifted,
            signed_at_ms: now,
            expires_at_ms: now + valid_for.as_millis() as u64,
        };
        to_ruling(&body)?.validate(&Blocs::builtin())?;
        Ok(body)
    }

    /// The file form of a body.
    pub fn from_body(b: &pb::RulingBody) -> Self {
        Self {
            id: b.id.clone(),
            version: b.version,
            region: b.region.clone(),
            blocked_from: fmt_time(b.blocked_from_ms),
            exit_by: fmt_time(b.exit_by_ms),
            classes: b.classes.clone(),
            tenants: b.tenants.clone(),
            reason: b.reason.clone(),
            lifted: b.lifted,
        }
    }
}

/// The router's ruling for a body.
pub fn to_ruling(b: &pb::RulingBody) -> Result<Ruling> {
    let scope = match (b.classes.is_empty(), b.tenants.is_empty()) {
        (true, true) => Scope::All,
        (false, true) => Scope::Classes(b.classes.clone()),
        (true, false) => Scope::Tenants(b.tenants.clone()),
        (false, false) => bail!("a ruling covers classes or tenants, not both"),
    };
    Ok(Ruling {
        id: b.id.clone(),
        version: b.version,
        region: Region::parse(&b.region)?,
        blocked_from: Time(b.blocked_from_ms),
        exit_by: Time(b.exit_by_ms),
        scope,
        reason: b.reason.clone(),
        lifted: b.lifted,
    })
}

/// Refuses to co-sign a file whose readable copy does not say what its
/// `body_hex` (the bytes signed) says: a key holder reads the copy, so a
/// doctored copy must not collect their signature for other terms. Names
/// the fields that differ.
pub fn check_readable<T: Serialize>(what: &str, shown: &T, signed: &T) -> Result<()> {
    let (a, b) = (serde_json::to_value(shown)?, serde_json::to_value(signed)?);
    if a == b {
        return Ok(());
    }
    let differ: Vec<String> = match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a
            .keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        _ => vec!["the whole copy".into()],
    };
    bail!(
        "the readable {what} does not match body_hex (the bytes signed) in: {}; refusing to sign",
        differ.join(", ")
    )
}

/// A signed ruling file: the exact signed bytes plus a readable copy.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignedFile {
    /// For people; nodes use `body_hex`.
    pub ruling: RulingFile,
    /// The signed `RulingBody`, hex.
    pub body_hex: String,
    /// Authority signatures.
    pub signatures: Vec<SignatureFile>,
}

/// One signature in a signed file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Authority public key, hex.
    pub key: String,
    /// Ed25519 signature, hex.
    pub signature: String,
}

impl SignedFile {
    /// The wire form.
    pub fn to_signed(&self) -> Result<pb::SignedRuling> {
        Ok(pb::SignedRuling {
            body: hex::decode(&self.body_hex).context("body_hex")?,
            signatures: SignatureFile::to_wire(&self.signatures)?,
        })
    }

    /// The file form of a signed ruling.
    pub fn from_signed(s: &pb::SignedRuling) -> Result<Self> {
        let body = pb::RulingBody::decode(s.body.as_slice()).context("ruling body")?;
        Ok(Self {
            ruling: RulingFile::from_body(&body),
            body_hex: hex::encode(&s.body),
            signatures: SignatureFile::from_wire(&s.signatures),
        })
    }
}

impl SignatureFile {
    /// The file form of signatures (rulings, certificates, revocations).
    pub fn from_wire(s: &[pb::AuthoritySignature]) -> Vec<Self> {
        s.iter()
            .map(|x| Self {
                key: hex::encode(&x.key),
                signature: hex::encode(&x.signature),
            })
            .collect()
    }

    /// The wire form of signatures.
    pub fn to_wire(s: &[Self]) -> Result<Vec<pb::AuthoritySignature>> {
        s.iter()
            .map(|s| {
                Ok(pb::AuthoritySignature {
                    key: hex::decode(&s.key).context("signature key")?,
                    signature: hex::decode(&s.signature).context("signature")?,
                })
            })
            .collect()
    }
}

/// Creates an authority key pair in `dir`: `authority.key` (hex seed, mode
/// 0600) and `authority.pub`; refuses to overwrite either. Returns the key
/// and the paths of both files.
pub fn write_keypair(dir: &Path) -> Result<(SigningKey, PathBuf, PathBuf)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (kp, pp) = (dir.join("authority.key"), dir.join("authority.pub"));
    if kp.exists() || pp.exists() {
        bail!(
            "{} already holds an authority key; refusing to overwrite it",
            dir.display()
        );
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&kp)?;
    writeln!(f, "{}", hex::encode(key.to_bytes()))?;
    std::fs::write(
        &pp,
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )?;
    Ok((key, kp, pp))
}

/// Loads an authority private key file, refusing one others can read.
pub fn load_key(path: &Path) -> Result<SigningKey> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {:o}: others can read it; run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let seed = parse_key_hex(std::fs::read_to_string(path)?.trim())
        .with_context(|| format!("key file {}", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Adds `key`'s signature (replacing an earlier one by the same key).
pub fn sign(signed: &mut pb::SignedRuling, key: &SigningKey) {
    sign_with(RULING_CONTEXT, &signed.body, &mut signed.signatures, key);
}

/// Adds `key`'s signature over `context` then `body` to `signatures`,
/// replacing an earlier one by the same key.
pub fn sign_with(
    context: &[u8],
    body: &[u8],
    signatures: &mut Vec<pb::AuthoritySignature>,
    key: &SigningKey,
) {
    let public = key.verifying_key().to_bytes().to_vec();
    signatures.retain(|s| s.key != public);
    let mut msg = context.to_vec();
    msg.extend_from_slice(body);
    signatures.push(pb::AuthoritySignature {
        key: public,
        signature: key.sign(&msg).to_bytes().to_vec(),
    });
}

/// Why a ruling was refused: a bounded label (for counting) and a detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct Refusal {
    /// `malformed`, `oversized`, `unsigned`, `unknown_key`, `bad_signature`,
    /// `threshold`, `expired`, `invalid`, `rollback`.
    pub kind: &'static str,
    /// For the log and the admin API's answer.
    pub detail: String,
}

pub(crate) fn refuse(kind: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal {
        kind,
        detail: detail.into(),
    }
}

/// The authority keys a node trusts, and how many must sign.
#[derive(Debug, Clone, Default)]
pub struct Authority {
    /// Trusted public keys.
    pub keys: Vec<VerifyingKey>,
    /// Signatures needed (k of n).
    pub threshold: usize,
}

impl Authority {
    /// Parses hex public keys.
    pub fn new<S: AsRef<str>>(keys: &[S], threshold: usize) -> Result<Self> {
        let keys = keys
            .iter()
            .map(|k| {
                let b = parse_key_hex(k.as_ref())?;
                VerifyingKey::from_bytes(&b).map_err(|e| anyhow!("authority key: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        if !keys.is_empty() && !(1..=keys.len()).contains(&threshold) {
            bail!(
                "authority.threshold = {threshold}: must be 1 to {} (the number of keys)",
                keys.len()
            );
        }
        Ok(Self { keys, threshold })
    }

    /// Whether one signature is by a trusted key and verifies.
    pub fn signature_valid(
        &self,
        context: &[u8],
        body: &[u8],
        sig: &pb::AuthoritySignature,
    ) -> bool {
        let Some(k) = self
            .keys
            .iter()
            .find(|k| k.as_bytes().as_slice() == sig.key.as_slice())
        else {
            return false;
        };
        let mut msg = context.to_vec();
        msg.extend_from_slice(body);
        ed25519_dalek::Signature::from_slice(&sig.signature)
            .is_ok_and(|s| k.verify(&msg, &s).is_ok())
    }

    /// Adds to `held` those of `more` that are by a trusted key not yet in
    /// `held` and verify over `context` then `body` (up to
    /// [`MAX_SIGNATURES`]): a statement cosigned later keeps its new
    /// signatures, so it outlives the retirement of an authority key.
    /// Whether any was added.
    pub fn merge_signatures(
        &self,
        context: &[u8],
        body: &[u8],
        held: &mut Vec<pb::AuthoritySignature>,
        more: Vec<pb::AuthoritySignature>,
    ) -> bool {
        let before = held.len();
        for s in more {
            if held.len() < MAX_SIGNATURES
                && !held.iter().any(|h| h.key == s.key)
                && self.signature_valid(context, body, &s)
            {
                held.push(s);
            }
        }
        held.len() > before
    }

    /// Checks that at least `threshold` distinct trusted keys signed
    /// `context` followed by `body`. Shared by rulings, node certificates
    /// and revocations (each with its own context string).
    pub fn check_signatures(
        &self,
        context: &[u8],
        body: &[u8],
        signatures: &[pb::AuthoritySignature],
    ) -> Result<(), Refusal> {
        if signatures.is_empty() {
            return Err(refuse("unsigned", "it carries no authority signature"));
        }
        if self.keys.is_empty() {
            return Err(refuse(
                "unknown_key",
                "this node trusts no authority key (authority.keys is empty)",
            ));
        }
        if signatures.len() > MAX_SIGNATURES {
            return Err(refuse(
                "malformed",
                format!(
                    "{} signatures, the limit is {MAX_SIGNATURES}",
                    signatures.len()
                ),
            ));
        }
        let mut msg = context.to_vec();
        msg.extend_from_slice(body);
        let mut good: Vec<&VerifyingKey> = Vec::new();
        let (mut unknown, mut bad) = (0, 0);
        // At most one verification per trusted key, and none once the
        // threshold is met: a statement padded with signatures that name a
        // trusted key costs no more than an honest one.
        let mut tried: Vec<&VerifyingKey> = Vec::new();
        for s in signatures {
            if good.len() >= self.threshold {
                break;
            }
            let Some(k) = self
                .keys
                .iter()
                .find(|k| k.as_bytes().as_slice() == s.key.as_slice())
            else {
                unknown += 1;
                continue;
            };
            if tried.contains(&k) {
                continue;
            }
            tried.push(k);
            let ok = ed25519_dalek::Signature::from_slice(&s.signature)
                .is_ok_and(|sig| k.verify(&msg, &sig).is_ok());
            if ok {
                if !good.contains(&k) {
                    good.push(k);
                }
            } else {
                bad += 1;
            }
        }
        if good.len() >= self.threshold {
            return Ok(());
        }
        Err(if bad > 0 {
            refuse(
                "bad_signature",
                format!("{bad} signature(s) by trusted keys do not verify"),
            )
        } else if unknown > 0 && good.is_empty() {
            refuse(
                "unknown_key",
                "signed only by keys this node does not trust",
            )
        } else {
            refuse(
                "threshold",
                format!(
                    "{} valid signature(s), {} needed",
                    good.len(),
                    self.threshold
                ),
            )
        })
    }

    /// Verifies a signed ruling's bytes: size, signatures (k of n), and,
    /// with `window_at`, that the signature's receipt window is open at
    /// that time. Returns the body; the caller applies it (where rollbacks
    /// are caught).
    ///
    /// What the window means: it bounds when a ruling may be *introduced*
    /// into the mesh (`ferry policy publish` through a node's admin API).
    /// Once a ruling is in force somewhere, nodes pass it on (gossip, and
    /// the sync every node runs when it connects) with no window, so a node
    /// that joins a year later still learns it; replays are caught by the
    /// version (a held or older version of an id is a duplicate or a
    /// rollback), not by age.
    pub fn verify(
        &self,
        bytes: &[u8],
        window_at: Option<u64>,
    ) -> Result<(pb::SignedRuling, pb::RulingBody, Ruling), Refusal> {
        if bytes.len() > MAX_SIGNED_RULING {
            return Err(refuse(
                "oversized",
                format!("{} bytes, the limit is {MAX_SIGNED_RULING}", bytes.len()),
            ));
        }
        let signed =
            pb::SignedRuling::decode(bytes).map_err(|e| refuse("malformed", e.to_string()))?;
        self.check_signatures(RULING_CONTEXT, &signed.body, &signed.signatures)?;
        let body = pb::RulingBody::decode(signed.body.as_slice())
            .map_err(|e| refuse("malformed", e.to_string()))?;
        if let Some(now) = window_at
            && body.expires_at_ms < now
        {
            return Err(refuse(
                "expired",
                format!(
                    "ruling {} v{}: its signature's window to be published has passed; sign a new version",
                    body.id, body.version
                ),
            ));
        }
        let ruling = to_ruling(&body).map_err(|e| refuse("invalid", format!("{e:#}")))?;
        ruling
            .validate(&Blocs::builtin())
            .map_err(|e| refuse("invalid", e.to_string()))?;
        Ok((signed, body, ruling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn body(id: &str, version: u64) -> pb::SignedRuling {
        let f = RulingFile {
            id: id.into(),
            version,
            region: "PK".into(),
            blocked_from: "2026-12-01T00:00:00Z".into(),
            exit_by: "2026-12-15T00:00:00Z".into(),
            classes: vec![],
            tenants: vec![],
            reason: "order".into(),
            lifted: false,
        };
        pb::SignedRuling {
            body: f
                .to_body(now_ms(), Duration::from_secs(3600))
                .unwrap()
                .encode_to_vec(),
            signatures: vec![],
        }
    }

    #[test]
    fn k_of_n_signatures_are_required_and_forgeries_refused() {
        let (a, b, c) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        let keys: Vec<String> = [&a, &b]
            .iter()
            .map(|k| hex::encode(k.verifying_key().as_bytes()))
            .collect();
        let auth = Authority::new(&keys, 2).unwrap();
        let mut s = body("r", 1);
        assert_eq!(
            auth.verify(&s.encode_to_vec(), Some(now_ms()))
                .unwrap_err()
                .kind,
            "unsigned"
        );
        sign(&mut s, &a);
        assert_eq!(
            auth.verify(&s.encode_to_vec(), Some(now_ms()))
                .unwrap_err()
                .kind,
            "threshold"
        );
        sign(&mut s, &b);
        let (_, body_ok, ruling) = auth.verify(&s.encode_to_vec(), Some(now_ms())).unwrap();
        assert_eq!((ruling.id.as_str(), body_ok.version), ("r", 1));
        // Forged: the body changed after signing.
        let mut forged = s.clone();
        forged.body = body("r", 2).body;
        assert_eq!(
            auth.verify(&forged.encode_to_vec(), Some(now_ms()))
                .unwrap_err()
                .kind,
            "bad_signature"
        );
        // Signed by an unknown key only.
        let mut stranger = body("r", 3);
        sign(&mut stranger, &c);
        assert_eq!(
            auth.verify(&stranger.encode_to_vec(), Some(now_ms()))
                .unwrap_err()
                .kind,
            "unknown_key"
        );
        // Expired.
        assert_eq!(
            auth.verify(&s.encode_to_vec(), Some(now_ms() + 7_200_000))
                .unwrap_err()
                .kind,
            "expired"
        );
        // Junk.
        assert_eq!(
            auth.verify(&[0xff; 40], Some(now_ms())).unwrap_err().kind,
            "malformed"
        );
        assert_eq!(
            auth.verify(&vec![0; MAX_SIGNED_RULING + 1], Some(now_ms()))
                .unwrap_err()
                .kind,
            "oversized"
        );
    }

    #[test]
    fn signed_file_round_trips() {
        let k = SigningKey::generate(&mut OsRng);
        let mut s = body("r", 1);
        sign(&mut s, &k);
        let file = SignedFile::from_signed(&s).unwrap();
        let text = serde_json::to_string_pretty(&file).unwrap();
        let back: SignedFile = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_signed().unwrap(), s);
        assert_eq!(back.ruling.blocked_from, "2026-12-01T00:00:00Z");
    }
}
