//! Node state in RocksDB, under the node's data dir: one column family each
//! for identity metadata, peers (signed adverts), rulings (signed), node
//! state and drain progress, plus a schema version. A data dir written by a
//! newer schema is refused rather than guessed at; a second process opening
//! the same data dir gets a clear error (RocksDB's lock).

use anyhow::{Context, Result, bail};
use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteOptions};
use std::path::{Path, PathBuf};

/// The schema this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";

/// Column families.
pub mod cf {
    /// Identity metadata and the schema version.
    pub const META: &str = "meta";
    /// Signed node adverts, by node id.
    pub const PEERS: &str = "peers";
    /// Signed rulings in force, by ruling id.
    pub const RULINGS: &str = "rulings";
    /// The node's own state (active / draining / exited, advert sequence).
    pub const STATE: &str = "state";
    /// Drain progress of circuits this node owns.
    pub const DRAIN: &str = "drain";
    /// Signed revocations of nodes, by node id (added after schema 1
    /// without a version change: an older store simply gains it).
    pub const REVOCATIONS: &str = "revocations";
    /// The entry's jurisdiction trail: a record per stream, by end time
    /// (ms, big-endian) and a sequence number (added without a schema
    /// change, as revocations were).
    pub const AUDIT: &str = "audit";
    /// All of them.
    pub const ALL: [&str; 7] = [META, PEERS, RULINGS, STATE, DRAIN, REVOCATIONS, AUDIT];
}

/// The node's store.
pub struct Store {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(2);
        opts.set_max_total_wal_size(16 << 20);
        let cfs = cf::ALL
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("lock") || msg.contains("Resource temporarily unavailable") {
                anyhow::anyhow!(
                    "data dir {} is in use by another ferry process (its RocksDB lock is held); \
                     stop that process or give this node its own data dir",
                    dir.display()
                )
            } else {
                anyhow::anyhow!("opening the store in {}: {msg}", dir.display())
            }
        })?;
        let store = Self {
            db,
            path: dir.to_path_buf(),
        };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<()> {
        match self.get(cf::META, SCHEMA_KEY)? {
            None => self.put(cf::META, SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()),
            Some(v) => {
                let v: [u8; 4] = v
                    .as_slice()
                    .try_into()
                    .context("schema version is not 4 bytes")?;
                let v = u32::from_be_bytes(v);
                if v > SCHEMA_VERSION {
                    bail!(
                        "data dir {} has store schema {v}, newer than this ferry's {SCHEMA_VERSION}; \
                         upgrade ferry rather than let it guess",
                        self.path.display()
                    );
                }
                if v < SCHEMA_VERSION {
                    bail!(
                        "data dir {} has store schema {v}, and no migration to {SCHEMA_VERSION} exists",
                        self.path.display()
                    );
                }
                Ok(())
            }
        }
    }

    fn handle(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .with_context(|| format!("column family {name} missing"))
    }

    /// Writes one key, synced to the log (survives `kill -9`).
    pub fn put(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.db
            .put_cf_opt(self.handle(cf)?, key, value, &w)
            .context("store write")
    }

    /// Writes one key without waiting for the log to reach the disk: for
    /// what the mesh can tell the node again (a peer's advert), where a
    /// write a `kill -9` loses costs nothing and a synced write per
    /// advert would cost one disk flush each.
    pub fn put_cache(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.db
            .put_cf(self.handle(cf)?, key, value)
            .context("store write")
    }

    /// Writes several keys at once, without waiting for the disk (as
    /// [`Store::put_cache`]).
    pub fn put_many(&self, cf: &str, pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let h = self.handle(cf)?;
        let mut batch = rocksdb::WriteBatch::default();
        for (k, v) in pairs {
            batch.put_cf(h, k, v);
        }
        self.db.write(batch).context("store write")
    }

    /// Reads one key.
    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.handle(cf)?, key).context("store read")
    }

    /// Deletes one key.
    pub fn delete(&self, cf: &str, key: &[u8]) -> Result<()> {
        self.db
            .delete_cf(self.handle(cf)?, key)
            .context("store delete")
    }

    /// Up to `limit` (key, value) pairs of a column family from `from` on,
    /// in key order.
    pub fn scan_from(
        &self,
        cf: &str,
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.db
            .iterator_cf(
                self.handle(cf)?,
                rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward),
            )
            .take(limit)
            .map(|kv| {
                kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .context("store scan")
            })
            .collect()
    }

    /// Deletes every key in `[from, to)` of a column family.
    pub fn delete_range(&self, cf: &str, from: &[u8], to: &[u8]) -> Result<()> {
        self.db
            .delete_range_cf(self.handle(cf)?, from, to)
            .context("store delete")
    }

    /// Every (key, value) of a column family.
    pub fn all(&self, cf: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.db
            .iterator_cf(self.handle(cf)?, rocksdb::IteratorMode::Start)
            .map(|kv| {
                kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .context("store scan")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_reopen_and_a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(cf::RULINGS, b"r1", b"signed").unwrap();
            let err = Store::open(dir.path()).unwrap_err();
            assert!(
                err.to_string().contains("in use by another ferry process"),
                "{err}"
            );
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.get(cf::RULINGS, b"r1").unwrap().as_deref(),
            Some(&b"signed"[..])
        );
        assert_eq!(s.all(cf::RULINGS).unwrap().len(), 1);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(cf::META, SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
        }
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("newer than this ferry's"), "{err}");
    }
}
