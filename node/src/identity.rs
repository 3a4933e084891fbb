//! The node's long-term keys: an Ed25519 identity (its node id) and an X25519
//! Noise static key. Each lives in its own file, hex-encoded, mode 0600.
//!
//! The Noise key can be rotated while the node runs ([`NoiseRing::rotate`],
//! `ferry keys rotate-noise`): the new key answers and makes every new
//! handshake, the old one is kept in `noise.retiring.key` (with the time it
//! stops being accepted) so handshakes peers started with it still
//! succeed, and it is erased after its grace. Links and circuits made on the
//! old key carry on: their sessions no longer need it.

use anyhow::{Context, Result, bail};
use ferry_circuit::crypto::StaticKey;
use ferry_router::NodeId;
use rand::rngs::OsRng;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File name of the Ed25519 identity seed.
pub const IDENTITY_FILE: &str = "identity.key";
/// File name of the X25519 Noise static private key.
pub const NOISE_FILE: &str = "noise.key";
/// File name of a Noise key being retired after a rotation: the key, then
/// on a second line when it stops being accepted (ms since the epoch).
pub const RETIRING_NOISE_FILE: &str = "noise.retiring.key";

/// A node's keys, loaded.
pub struct Keys {
    /// Ed25519 signing key; its public half is the node id.
    pub identity: ed25519_dalek::SigningKey,
    /// The Noise static keys: current, and one being retired.
    pub noise: NoiseRing,
}

/// A node's Noise static keys: the current one, and one being retired
/// until a time (ms since the epoch).
pub struct NoiseRing {
    dir: Option<PathBuf>,
    keys: std::sync::RwLock<Ring>,
}

/// The keys of a [`NoiseRing`].
struct Ring {
    current: StaticKey,
    /// The retiring pair, and until when (ms).
    retiring: Option<(StaticKey, u64)>,
    /// When this process rotated (unknown after a restart).
    rotated_at: Option<u64>,
}

impl NoiseRing {
    fn new(dir: Option<PathBuf>, current: [u8; 32], retiring: Option<([u8; 32], u64)>) -> Self {
        Self {
            dir,
            keys: std::sync::RwLock::new(Ring {
                current: StaticKey::new(current),
                retiring: retiring.map(|(k, until)| (StaticKey::new(k), until)),
                rotated_at: None,
            }),
        }
    }

    /// The current private key (every new handshake this node makes).
    pub fn private(&self) -> [u8; 32] {
        self.keys.read().expect("noise keys").current.private()
    }

    /// The current public key (advertised).
    pub fn public(&self) -> [u8; 32] {
        self.keys.read().expect("noise keys").current.public()
    }

    /// The private keys a responder tries, current first.
    pub fn responder_keys(&self, now: u64) -> Vec<StaticKey> {
        let g = self.keys.read().expect("noise keys");
        let mut out = vec![g.current.clone()];
        if let Some((k, until)) = &g.retiring
            && now < *until
        {
            out.push(k.clone());
        }
        out
    }

    /// The private key this node dials with: during the first half of a
    /// rotation's grace the retiring one (peers that have not seen the
    /// advert with the new key yet still know it), then the current one
    /// (every peer has had the new advert for half the grace).
    pub fn dial_private(&self, now: u64) -> [u8; 32] {
        let g = self.keys.read().expect("noise keys");
        match (&g.retiring, g.rotated_at) {
            (Some((old, until)), Some(since))
                if now < since + (until.saturating_sub(since)) / 2 =>
            {
                old.private()
            }
            _ => g.current.private(),
        }
    }

    /// The public key being retired and until when, to advertise.
    pub fn retiring(&self, now: u64) -> (Vec<[u8; 32]>, u64) {
        match &self.keys.read().expect("noise keys").retiring {
            Some((k, until)) if now < *until => (vec![k.public()], *until),
            _ => (Vec::new(), 0),
        }
    }

    /// Switches to a fresh key; the current one is retired until
    /// `now + grace`. Written to the key dir first (the current key into
    /// the retiring file, then the new key over it), so a crash leaves
    /// either the old key alone or both.
    /// Refused while an earlier rotation's key is still being retired.
    /// Returns the new public key.
    pub fn rotate(&self, grace: std::time::Duration, now: u64) -> Result<[u8; 32]> {
        let mut g = self.keys.write().expect("noise keys");
        if let Some(&(_, until)) = g.retiring.as_ref()
            && now < until
        {
            bail!(
                "a key is still being retired until {}; rotate again after that",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(until)
                )
            );
        }
        let fresh = x25519_dalek::StaticSecret::random_from_rng(OsRng).to_bytes();
        let until = now + grace.as_millis() as u64;
        if let Some(dir) = &self.dir {
            let retiring = format!("{}\n{until}\n", hex::encode(g.current.private()));
            replace_secret(&dir.join(RETIRING_NOISE_FILE), &retiring)?;
            replace_secret(&dir.join(NOISE_FILE), &format!("{}\n", hex::encode(fresh)))?;
        }
        let old = g.current.clone();
        *g = Ring {
            current: StaticKey::new(fresh),
            retiring: Some((old, until)),
            rotated_at: Some(now),
        };
        Ok(g.current.public())
    }

    /// Erases a retired key whose grace has passed (memory and file).
    /// Returns whether one was erased.
    pub fn expire(&self, now: u64) -> Result<bool> {
        let mut g = self.keys.write().expect("noise keys");
        match g.retiring.as_ref() {
            Some(&(_, until)) if now >= until => {
                if let Some(dir) = &self.dir {
                    let p = dir.join(RETIRING_NOISE_FILE);
                    if p.exists() {
                        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                    }
                }
                g.retiring = None;
                g.rotated_at = None;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Writes a secret file atomically (a temporary file, then a rename).
fn replace_secret(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("id", &self.node_id())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Fresh random keys.
    pub fn generate() -> Self {
        let identity = ed25519_dalek::SigningKey::generate(&mut OsRng);
        let secret = x25519_dalek::StaticSecret::random_from_rng(OsRng);
        Self::from_parts(identity, secret.to_bytes())
    }

    fn from_parts(identity: ed25519_dalek::SigningKey, noise_private: [u8; 32]) -> Self {
        Self {
            identity,
            noise: NoiseRing::new(None, noise_private, None),
        }
    }

    /// The current Noise private key.
    pub fn noise_private(&self) -> [u8; 32] {
        self.noise.private()
    }

    /// The current Noise public key.
    pub fn noise_public(&self) -> [u8; 32] {
        self.noise.public()
    }

    /// The node id: the Ed25519 public key.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.identity.verifying_key().to_bytes())
    }

    /// Writes both key files into `dir`, refusing to overwrite existing keys.
    pub fn write_new(&self, dir: &Path) -> Result<()> {
        for name in [IDENTITY_FILE, NOISE_FILE] {
            let p = dir.join(name);
            if p.exists() {
                bail!(
                    "{} already exists; refusing to overwrite a node's keys",
                    p.display()
                );
            }
        }
        write_secret(&dir.join(IDENTITY_FILE), &self.identity.to_bytes())?;
        write_secret(&dir.join(NOISE_FILE), &self.noise_private())?;
        Ok(())
    }

    /// Loads the keys in `dir`, or creates them (and `dir`, mode 0700) if
    /// neither file exists yet: a container's first start on an empty
    /// volume. One file without the other is an error, never a new key.
    /// Returns whether they were created.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool)> {
        let (id, noise) = (dir.join(IDENTITY_FILE), dir.join(NOISE_FILE));
        if id.exists() || noise.exists() {
            return Ok((Self::load(dir)?, false));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let keys = Self::generate();
        keys.write_new(dir)?;
        Ok((keys, true))
    }

    /// Loads the keys in `dir`.
    /// A Noise key being retired (`noise.retiring.key`) is loaded with it.
    pub fn load(dir: &Path) -> Result<Self> {
        let identity = read_secret(&dir.join(IDENTITY_FILE))?;
        let noise = read_secret(&dir.join(NOISE_FILE))?;
        let retiring_path = dir.join(RETIRING_NOISE_FILE);
        let retiring = if retiring_path.exists() {
            check_mode(&retiring_path)?;
            let text = fs::read_to_string(&retiring_path)?;
            let mut lines = text.lines();
            let key = parse_key_hex(lines.next().unwrap_or("").trim())
                .with_context(|| format!("key file {}", retiring_path.display()))?;
            let until: u64 = lines
                .next()
                .and_then(|l| l.trim().parse().ok())
                .with_context(|| format!("{}: no retirement time", retiring_path.display()))?;
            Some((key, until))
        } else {
            None
        };
        Ok(Self {
            identity: ed25519_dalek::SigningKey::from_bytes(&identity),
            noise: NoiseRing::new(Some(dir.to_path_buf()), noise, retiring),
        })
    }
}

fn write_secret(path: &PathBuf, key: &[u8; 32]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{}", hex::encode(key)).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

fn check_mode(path: &Path) -> Result<()> {
    let meta =
        fs::metadata(path).with_context(|| format!("reading key file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "key file {} has mode {mode:o}: others can read it; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

fn read_secret(path: &PathBuf) -> Result<[u8; 32]> {
    check_mode(path)?;
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_key_hex(text.trim()).with_context(|| format!("key file {}", path.display()))
}

/// Parses a 32-byte key written as 64 hex digits.
pub fn parse_key_hex(s: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|e| anyhow::anyhow!("expected 64 hex digits: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::generate();
        keys.write_new(dir.path()).unwrap();
        for name in [IDENTITY_FILE, NOISE_FILE] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let loaded = Keys::load(dir.path()).unwrap();
        assert_eq!(loaded.node_id(), keys.node_id());
        assert_eq!(loaded.noise_public(), keys.noise_public());
        let err = keys.write_new(dir.path()).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    }

    #[test]
    fn a_rotated_noise_key_is_retired_across_a_restart_then_erased() {
        let dir = tempfile::tempdir().unwrap();
        Keys::generate().write_new(dir.path()).unwrap();
        let keys = Keys::load(dir.path()).unwrap();
        let old = keys.noise_private();
        let new_public = keys
            .noise
            .rotate(std::time::Duration::from_secs(10), 1_000)
            .unwrap();
        assert_eq!(keys.noise_public(), new_public);
        assert_eq!(
            keys.noise.responder_keys(5_000),
            vec![StaticKey::new(keys.noise_private()), StaticKey::new(old)]
        );
        assert!(
            keys.noise
                .rotate(std::time::Duration::from_secs(1), 2_000)
                .is_err(),
            "one rotation at a time"
        );
        // A restart (kill -9) in the grace keeps both keys.
        let again = Keys::load(dir.path()).unwrap();
        assert_eq!(again.noise_public(), new_public);
        assert_eq!(again.noise.retiring(5_000).1, 11_000);
        assert_eq!(again.noise.responder_keys(5_000).len(), 2);
        assert_eq!(
            again.noise.responder_keys(11_000).len(),
            1,
            "not after the grace"
        );
        let mode = fs::metadata(dir.path().join(RETIRING_NOISE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!again.noise.expire(10_999).unwrap());
        assert!(again.noise.expire(11_000).unwrap());
        assert!(!dir.path().join(RETIRING_NOISE_FILE).exists(), "erased");
        assert_eq!(
            Keys::load(dir.path())
                .unwrap()
                .noise
                .responder_keys(0)
                .len(),
            1
        );
    }

    #[test]
    fn keys_are_created_once_and_a_lone_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        let (a, created) = Keys::load_or_create(&sub).unwrap();
        assert!(created);
        let mode = fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let (b, created) = Keys::load_or_create(&sub).unwrap();
        assert!(!created);
        assert_eq!(a.node_id(), b.node_id());
        fs::remove_file(sub.join(NOISE_FILE)).unwrap();
        let err = Keys::load_or_create(&sub).unwrap_err();
        assert!(format!("{err:#}").contains("noise.key"), "{err:#}");
        assert!(sub.join(IDENTITY_FILE).exists(), "the identity was kept");
    }

    #[test]
    fn readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Keys::generate().write_new(dir.path()).unwrap();
        let p = dir.path().join(NOISE_FILE);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keys::load(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
    }
}
