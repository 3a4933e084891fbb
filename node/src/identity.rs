//! The node's long-term keys: an Ed25519 identity (its node id) and an X25519
//! Noise static key. Each lives in its own file, hex-encoded, mode 0600.

use anyhow::{Context, Result, bail};
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

/// A node's keys, loaded.
pub struct Keys {
    /// Ed25519 signing key; its public half is the node id.
    pub identity: ed25519_dalek::SigningKey,
    /// X25519 Noise static private key.
    pub noise_private: [u8; 32],
    /// Its public half.
    pub noise_public: [u8; 32],
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
        let secret = x25519_dalek::StaticSecret::from(noise_private);
        let noise_public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Self {
            identity,
            noise_private,
            noise_public,
        }
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
        write_secret(&dir.join(NOISE_FILE), &self.noise_private)?;
        Ok(())
    }

    /// Loads both key files from `dir`.
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
    pub fn load(dir: &Path) -> Result<Self> {
        let identity = read_secret(&dir.join(IDENTITY_FILE))?;
        let noise = read_secret(&dir.join(NOISE_FILE))?;
        Ok(Self::from_parts(
            ed25519_dalek::SigningKey::from_bytes(&identity),
            noise,
        ))
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

fn read_secret(path: &PathBuf) -> Result<[u8; 32]> {
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
        assert_eq!(loaded.noise_public, keys.noise_public);
        let err = keys.write_new(dir.path()).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
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
