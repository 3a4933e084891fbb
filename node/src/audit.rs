//! The entry's jurisdiction trail: a record of every stream it carried —
//! tenant, class, start and end, bytes each way, how it ended, and every
//! circuit it used in order, each hop's node id and jurisdiction, with when
//! and why it moved there — kept in the node's store (column family
//! `audit`) for `[audit] retention_secs`, and read back with
//! `GET /v1/audit` and `ferry audit export`. Targets are recorded only with
//! `[audit] record_targets = true`.
//!
//! A stream's [`Trail`] travels with its handle while it is open (the
//! origin adds a leg when it opens, moves or rescues the stream) and is
//! written once, when the stream ends: one small write per stream, off the
//! path its bytes take, to RocksDB's log without waiting for the disk (a
//! process killed with `kill -9` keeps it; a machine that loses power may
//! lose the last moments, and a disk flush per stream would cap how many
//! short streams an entry can carry). A stream still open when the process
//! dies is not recorded.
//!
//! Keys are the end time (ms, big-endian) then a sequence number, so a
//! `since` query is one range scan and retention one range delete.
//!
//! Not in this module: the exit report built from the trail.

use crate::store::{Store, cf};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// An RFC 3339 time with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(ms.min(crate::authority::MAX_TIME_MS)),
    )
    .to_string()
}

/// One hop of a circuit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// The node id, hex.
    pub node: String,
    /// Its jurisdiction as this entry knew it then (`??` if unknown).
    pub jurisdiction: String,
}

/// One circuit a stream used, from when it was put on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    /// When the stream was put on this circuit.
    pub at: String,
    /// Why: `opened`, `moved: ...` (off a leaving node) or `rescued: ...`
    /// (its circuit was lost).
    pub why: String,
    /// The hops, entry side first, exit last.
    pub hops: Vec<Hop>,
}

/// A stream's trail while it is open.
#[derive(Clone, Debug)]
pub struct Trail {
    /// Tenant ("" for an anonymous client).
    pub tenant: String,
    /// Service class.
    pub class: String,
    /// `host:port`, when targets are recorded.
    pub target: Option<String>,
    /// When it opened (ms).
    pub started_ms: u64,
    /// Its circuits, in order.
    pub legs: Vec<Leg>,
}

/// One finished stream, as stored and exported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Tenant ("" for an anonymous client).
    pub tenant: String,
    /// Service class.
    pub class: String,
    /// `host:port`, only with `[audit] record_targets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// When it opened.
    pub started: String,
    /// When it ended.
    pub ended: String,
    /// Bytes from the client into the mesh.
    pub bytes_up: u64,
    /// Bytes from the mesh to the client.
    pub bytes_down: u64,
    /// How it ended (`done`, `reset`, `exit_left`, ...: the
    /// `ferry_streams_closed_total` reasons).
    pub end: String,
    /// Its circuits, in order, with each move.
    pub circuits: Vec<Leg>,
}

/// The trail's store and settings.
#[derive(Debug)]
pub struct Audit {
    store: Option<Arc<Store>>,
    retention_ms: u64,
    record_targets: bool,
    seq: AtomicU64,
}

/// Most records one export returns.
pub const MAX_EXPORT: usize = 100_000;

impl Audit {
    /// A trail in `store` (none: nothing is kept, as for a node without a
    /// store), with its settings.
    pub fn new(store: Option<Arc<Store>>, settings: crate::config::AuditSettings) -> Self {
        Self {
            store,
            retention_ms: settings.retention.as_millis() as u64,
            record_targets: settings.record_targets,
            // Unique across restarts within one millisecond of end time.
            seq: AtomicU64::new(crate::authority::now_ms() << 16),
        }
    }

    /// Whether records name targets.
    pub fn records_targets(&self) -> bool {
        self.record_targets
    }

    /// Stores a finished stream's record under its end time.
    pub fn record(&self, ended_ms: u64, r: &Record) -> Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let mut key = ended_ms.to_be_bytes().to_vec();
        key.extend_from_slice(&self.seq.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        store.put_cache(cf::AUDIT, &key, &serde_json::to_vec(r)?)
    }

    /// Records of streams that ended at or after `since_ms`, oldest first,
    /// of `tenant` if given, at most `limit`.
    pub fn export(&self, since_ms: u64, tenant: Option<&str>, limit: usize) -> Result<Vec<Record>> {
        let Some(store) = &self.store else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut from = since_ms.to_be_bytes().to_vec();
        // Scanned in pages, so a tenant filter cannot make one scan hold
        // the whole trail.
        loop {
            let page = store.scan_from(cf::AUDIT, &from, 1024)?;
            let last = page.last().map(|(k, _)| k.clone());
            for (_, v) in &page {
                let r: Record = serde_json::from_slice(v).context("an audit record")?;
                if tenant.is_none_or(|t| t == r.tenant) {
                    out.push(r);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            match last {
                Some(mut k) if page.len() == 1024 => {
                    // The next key after the last one read.
                    k.push(0);
                    from = k;
                }
                _ => return Ok(out),
            }
        }
    }

    /// Deletes what ages out, now and then every quarter of the
    /// retention (at most ten minutes apart), until `shutdown`.
    pub async fn run_sweeps(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let every = std::time::Duration::from_millis(self.retention_ms / 4).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(600),
        );
        loop {
            if let Err(e) = self.sweep(crate::authority::now_ms()) {
                tracing::warn!(error = %format!("{e:#}"), "could not delete old audit records");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Deletes the records older than the retention at `now_ms`.
    pub fn sweep(&self, now_ms: u64) -> Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let cut = now_ms.saturating_sub(self.retention_ms);
        store.delete_range(cf::AUDIT, &0u64.to_be_bytes(), &cut.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(tenant: &str, ended: u64) -> Record {
        Record {
            tenant: tenant.into(),
            class: "enterprise".into(),
            target: None,
            started: rfc3339_ms(ended - 1_000),
            ended: rfc3339_ms(ended),
            bytes_up: 10,
            bytes_down: 20,
            end: "done".into(),
            circuits: vec![Leg {
                at: rfc3339_ms(ended - 1_000),
                why: "opened".into(),
                hops: vec![Hop {
                    node: "ab".repeat(32),
                    jurisdiction: "DE".into(),
                }],
            }],
        }
    }

    #[test]
    fn records_read_back_by_time_and_tenant_survive_a_reopen_and_age_out() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::config::AuditSettings {
            retention: Duration::from_secs(3_600),
            record_targets: false,
        };
        let day = 86_400_000u64;
        {
            let a = Audit::new(Some(Arc::new(Store::open(dir.path()).unwrap())), settings);
            for (t, at) in [
                ("acme", day),
                ("globex", day + 1),
                ("acme", day + 2),
                ("acme", day),
            ] {
                a.record(at, &record(t, at)).unwrap();
            }
            assert_eq!(
                a.export(0, None, 10).unwrap().len(),
                4,
                "two in one ms both kept"
            );
        }
        let a = Audit::new(Some(Arc::new(Store::open(dir.path()).unwrap())), settings);
        let acme = a.export(day + 1, Some("acme"), 10).unwrap();
        assert_eq!(acme, [record("acme", day + 2)], "since and tenant");
        assert_eq!(a.export(0, None, 2).unwrap().len(), 2, "the limit");
        // An hour's retention, two hours on: only what ended in the last hour.
        a.record(day + 7_000_000, &record("acme", day + 7_000_000))
            .unwrap();
        a.sweep(day + 7_200_000).unwrap();
        assert_eq!(
            a.export(0, None, 10).unwrap(),
            [record("acme", day + 7_000_000)]
        );
    }

    #[test]
    fn a_page_boundary_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::config::AuditSettings {
            retention: Duration::from_secs(3_600),
            record_targets: false,
        };
        let a = Audit::new(Some(Arc::new(Store::open(dir.path()).unwrap())), settings);
        for i in 0..2_500u64 {
            let t = if i % 2 == 0 { "acme" } else { "globex" };
            a.record(1_000_000 + i, &record(t, 1_000_000 + i)).unwrap();
        }
        assert_eq!(
            a.export(0, Some("globex"), MAX_EXPORT).unwrap().len(),
            1_250
        );
        assert_eq!(a.export(0, None, MAX_EXPORT).unwrap().len(), 2_500);
    }
}
