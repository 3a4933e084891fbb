//! The entry's jurisdiction trail: a record of every stream it carried —
//! tenant, class, start and end, bytes each way, how it ended, and every
//! circuit it used in order, each hop's node id and jurisdiction, with when
//! and why it moved there — kept in the node's store (column family
//! `audit`) for `[audit] retention_secs`, and read back with
//! `GET /v1/audit` and `ferry audit export`. Targets are recorded only with
//! `[audit] record_targets = true`.
//!
//! A stream's [`Trail`] travels with its handle while it is open (the
//! origin adds a [`RawLeg`] when it opens, moves or rescues the stream:
//! node ids, jurisdictions and a time, nothing formatted) and is handed to
//! [`Audit::submit`] when the stream ends. A writer task of its own turns
//! what gathered into records and writes them in one batch, to RocksDB's
//! log without waiting for the disk: the stream's task only queues (a
//! first build that serialized and wrote from the stream's task cost the
//! entry 16% more CPU a stream on a churn load). A process killed with
//! `kill -9` keeps what was written; one that loses power may lose the
//! last moments, and a disk flush per stream would cap how many short
//! streams an entry can carry. A stream still open when the process dies
//! is not recorded, and neither is one the queue had no room for (a WARN
//! says how many).
//!
//! Keys are the end time (ms, big-endian) then a sequence number, so a
//! `since` query is one range scan and retention one range delete.
//!
//! The exit report ([`ExitReport`], [`sign_report`], [`verify_report`]):
//! from the trail, every session of a ruling's scope that crossed its
//! region, by phase (before `blocked_from`, while draining, after
//! `exit_by`: which must be none), with the moves made and the sessions
//! closed; signed with the node's identity key so a regulator or a customer
//! can check it with `ferry audit verify`.

use crate::store::{Store, cf};
use anyhow::{Context, Result};
use ferry_proto::pb;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;
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

/// A circuit a stream was put on, as the stream's task notes it.
#[derive(Clone, Debug)]
pub struct RawLeg {
    /// When (ms).
    pub at_ms: u64,
    /// Why (see [`Leg::why`]).
    pub why: Arc<str>,
    /// Each hop and its jurisdiction as this node knew it then.
    pub hops: Vec<(ferry_router::NodeId, Option<ferry_router::Jurisdiction>)>,
}

impl RawLeg {
    fn stored(&self) -> pb::AuditLeg {
        pb::AuditLeg {
            at_ms: self.at_ms,
            why: self.why.to_string(),
            hops: self
                .hops
                .iter()
                .map(|(id, j)| pb::AuditHop {
                    node_id: id.0.to_vec(),
                    jurisdiction: j.map(|j| j.0.to_vec()).unwrap_or_default(),
                })
                .collect(),
        }
    }
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
    /// Its circuits, in order (at most [`MAX_LEGS`]).
    pub legs: Vec<RawLeg>,
    /// Circuits past [`MAX_LEGS`], counted only.
    pub legs_left_out: u32,
}

/// Most circuits one stream's trail lists: a hostile exit that keeps
/// dropping circuits (each rescue adds one) cannot grow a trail without
/// bound; the rest are counted.
pub const MAX_LEGS: usize = 64;

impl Trail {
    /// Adds a circuit the stream was put on.
    pub fn push(&mut self, leg: RawLeg) {
        if self.legs.len() < MAX_LEGS {
            self.legs.push(leg);
        } else {
            self.legs_left_out = self.legs_left_out.saturating_add(1);
        }
    }
}

/// A stream that ended, queued for the writer.
#[derive(Debug)]
pub struct Ended {
    /// Its trail.
    pub trail: Trail,
    /// When it ended (ms).
    pub ended_ms: u64,
    /// Bytes up and down.
    pub bytes: (u64, u64),
    /// How it ended.
    pub end: &'static str,
}

impl Ended {
    /// What is stored: compact (protobuf, node ids as bytes, times as
    /// numbers); the JSON form is made on export. (JSON stored costs the
    /// writer several times as much, and the store three times the room.)
    fn stored(self) -> pb::AuditRecord {
        let t = self.trail;
        pb::AuditRecord {
            tenant: t.tenant,
            class: t.class,
            target: t.target.unwrap_or_default(),
            started_ms: t.started_ms,
            ended_ms: self.ended_ms,
            bytes_up: self.bytes.0,
            bytes_down: self.bytes.1,
            end: self.end.to_string(),
            circuits: t.legs.iter().map(RawLeg::stored).collect(),
            circuits_left_out: t.legs_left_out,
        }
    }
}

impl Record {
    /// The export form of a stored record.
    fn from_stored(r: pb::AuditRecord) -> Self {
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or("??")
                .to_string()
        };
        Record {
            tenant: r.tenant,
            class: r.class,
            target: (!r.target.is_empty()).then_some(r.target),
            started: rfc3339_ms(r.started_ms),
            ended: rfc3339_ms(r.ended_ms),
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
            end: r.end,
            circuits: r
                .circuits
                .into_iter()
                .map(|l| Leg {
                    at: rfc3339_ms(l.at_ms),
                    why: l.why,
                    hops: l
                        .hops
                        .iter()
                        .map(|h| Hop {
                            node: hex::encode(&h.node_id),
                            jurisdiction: text(&h.jurisdiction),
                        })
                        .collect(),
                })
                .collect(),
            circuits_left_out: r.circuits_left_out,
        }
    }
}

/// Most records the writer writes at once.
const BATCH: usize = 4_096;

/// How long the writer gathers records before it writes them.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Streams the writer's queue holds; past it, a record is dropped (and
/// counted in a WARN).
pub const QUEUE: usize = 16_384;

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
    /// Its circuits, in order, with each move (the first hop is the
    /// entry itself).
    pub circuits: Vec<Leg>,
    /// Circuits past the most a trail keeps, counted only.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub circuits_left_out: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Context of an exit report's signature.
pub const REPORT_CONTEXT: &[u8] = b"ferry/exit-report/1";

/// An exit report for a ruling, built record by record ([`ExitReport::add`])
/// from the trail: a session counts in a phase when any stretch of it on a
/// circuit with a hop in the region (from the leg's time to the next leg's,
/// or the session's end) overlaps that phase. Pure: the caller signs it.
#[derive(Debug)]
pub struct ExitReport {
    ruling: ferry_router::Ruling,
    region: ferry_router::JurisdictionSet,
    sessions: u64,
    before: u64,
    draining: u64,
    after: u64,
    moved_out: u64,
    closed: u64,
    unknown: u64,
    after_exit: Vec<serde_json::Value>,
    earliest: Option<u64>,
}

/// How a stream ends when a drain closes it (its exit left).
const CLOSED_BY_DRAIN: [&str; 2] = ["exit_left", "circuit_closed"];

/// Most sessions after the exit date a report lists one by one (all are
/// counted).
pub const MAX_LISTED: usize = 1_000;

impl ExitReport {
    /// A report on `ruling`, its region resolved to `region`.
    pub fn new(ruling: ferry_router::Ruling, region: ferry_router::JurisdictionSet) -> Self {
        Self {
            ruling,
            region,
            sessions: 0,
            before: 0,
            draining: 0,
            after: 0,
            moved_out: 0,
            closed: 0,
            unknown: 0,
            after_exit: Vec::new(),
            earliest: None,
        }
    }

    /// Weighs one stored record.
    pub fn add(&mut self, r: &pb::AuditRecord) {
        use ferry_router::{Jurisdiction, TrafficScope};
        let (from, exit) = (self.ruling.blocked_from.0, self.ruling.exit_by.0);
        self.earliest = Some(self.earliest.map_or(r.started_ms, |e| e.min(r.started_ms)));
        let scope = TrafficScope {
            class: r.class.clone(),
            tenant: r.tenant.clone(),
        };
        if !self.ruling.scope.covers(&scope) {
            return;
        }
        let region = &self.region;
        // A hop whose jurisdiction was unknown counts as outside, and the
        // session is counted apart, so a reader can tell.
        if r.circuits.iter().flat_map(|l| &l.hops).any(|h| {
            !(h.jurisdiction.len() == 2 && h.jurisdiction.iter().all(u8::is_ascii_uppercase))
        }) {
            self.unknown += 1;
        }
        let inside = |l: &pb::AuditLeg| {
            l.hops.iter().any(|h| {
                <[u8; 2]>::try_from(h.jurisdiction.as_slice())
                    .is_ok_and(|j| region.contains(Jurisdiction(j)))
            })
        };
        let spans: Vec<(u64, u64)> = r
            .circuits
            .iter()
            .enumerate()
            .filter(|(_, l)| inside(l))
            .map(|(i, l)| {
                let end = r.circuits.get(i + 1).map_or(r.ended_ms, |n| n.at_ms);
                (l.at_ms, end.max(l.at_ms + 1))
            })
            .collect();
        if spans.is_empty() {
            return;
        }
        self.sessions += 1;
        let overlaps = |lo: u64, hi: u64| spans.iter().any(|&(a, b)| a < hi && lo < b);
        self.before += u64::from(overlaps(0, from));
        self.draining += u64::from(overlaps(from, exit));
        if overlaps(exit, u64::MAX) {
            self.after += 1;
            if self.after_exit.len() < MAX_LISTED {
                self.after_exit.push(serde_json::json!({
                    "tenant": r.tenant,
                    "class": r.class,
                    "started": rfc3339_ms(r.started_ms),
                    "ended": rfc3339_ms(r.ended_ms),
                }));
            }
        }
        // Closed by the drain: it ended inside, from the drain on, the way
        // a drain ends streams.
        if r.circuits.last().is_some_and(inside)
            && r.ended_ms >= from
            && CLOSED_BY_DRAIN.contains(&r.end.as_str())
        {
            self.closed += 1;
        }
        // Moved out by it: a move, from the drain on, from a circuit inside
        // to one outside.
        if r.circuits.windows(2).any(|w| {
            w[1].at_ms >= from && w[1].why.starts_with("moved") && inside(&w[0]) && !inside(&w[1])
        }) {
            self.moved_out += 1;
        }
    }

    /// The report's body, made at `now` (ms).
    pub fn finish(self, now: u64) -> serde_json::Value {
        let r = &self.ruling;
        let scope = crate::rulings::scope_json(&r.scope);
        serde_json::json!({
            "kind": "ferry exit report",
            "made_at": rfc3339_ms(now),
            "ruling": {
                "id": r.id,
                "version": r.version,
                "region": r.region.to_string(),
                "jurisdictions": self.region.iter().map(|j| j.to_string()).collect::<Vec<_>>(),
                "blocked_from": rfc3339_ms(r.blocked_from.0),
                "exit_by": rfc3339_ms(r.exit_by.0),
                "scope": scope,
                "lifted": r.lifted,
            },
            "earliest_session_kept": self.earliest.map(rfc3339_ms),
            "sessions_with_unknown_hops": self.unknown,
            "sessions": self.sessions,
            "crossed": { "before": self.before, "draining": self.draining, "after_exit": self.after },
            "moved_out": self.moved_out,
            "closed": self.closed,
            "after_exit_sessions": self.after_exit,
        })
    }
}

/// A report signed by `key`: `{"body", "node_id", "signature"}`, where
/// `body` is the report's JSON as a string and the signature is over
/// [`REPORT_CONTEXT`] then exactly those bytes (nothing is re-serialized
/// to check it, so key order, duplicate keys or number formats cannot
/// make two readings of one signature). `jq -r .body` shows it.
pub fn sign_report(body: &serde_json::Value, key: &ed25519_dalek::SigningKey) -> serde_json::Value {
    use ed25519_dalek::Signer;
    let text = serde_json::to_string_pretty(body).expect("a JSON value serializes");
    let mut msg = REPORT_CONTEXT.to_vec();
    msg.extend_from_slice(text.as_bytes());
    serde_json::json!({
        "body": text,
        "node_id": hex::encode(key.verifying_key().as_bytes()),
        "signature": hex::encode(key.sign(&msg).to_bytes()),
    })
}

/// Checks a signed report (its file's text); returns the node that signed
/// it and the report's body. With `expected`, any other signer is refused.
/// Fields the signature does not cover are refused.
pub fn verify_report(text: &str, expected: Option<&str>) -> Result<(String, serde_json::Value)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Signed {
        body: String,
        node_id: String,
        signature: String,
    }
    let s: Signed = serde_json::from_str(text).context("not a signed report")?;
    if let Some(e) = expected
        && !e.eq_ignore_ascii_case(&s.node_id)
    {
        anyhow::bail!("signed by node {}, not by {e}", s.node_id);
    }
    let key: [u8; 32] = hex::decode(&s.node_id)
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("node_id is not 64 hex digits")?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).context("node_id is no Ed25519 key")?;
    let sig: [u8; 64] = hex::decode(&s.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("signature is not 128 hex digits")?;
    let mut msg = REPORT_CONTEXT.to_vec();
    msg.extend_from_slice(s.body.as_bytes());
    key.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| {
            anyhow::anyhow!(
                "the signature does not match the report: it was changed, or not signed by {}",
                s.node_id
            )
        })?;
    let body = serde_json::from_str(&s.body).context("the signed body")?;
    Ok((s.node_id, body))
}

/// The trail's store and settings.
#[derive(Debug)]
pub struct Audit {
    store: Option<Arc<Store>>,
    retention_ms: u64,
    record_targets: bool,
    seq: AtomicU64,
    queue: tokio::sync::mpsc::Sender<Ended>,
    queued: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Ended>>>,
    /// Set (under its lock) once the writer has stopped: later streams
    /// (those a shutdown ends) are written at once.
    stopped: std::sync::Mutex<bool>,
    dropped: AtomicU64,
    warned: crate::log_limit::LogLimit,
}

/// Most records one export page returns (about 5 MB of JSON).
pub const MAX_EXPORT: usize = 10_000;

impl Audit {
    /// A trail in `store` (none: nothing is kept, as for a node without a
    /// store), with its settings.
    pub fn new(store: Option<Arc<Store>>, settings: crate::config::AuditSettings) -> Self {
        let (queue, rx) = tokio::sync::mpsc::channel(QUEUE);
        Self {
            store,
            retention_ms: settings.retention.as_millis() as u64,
            record_targets: settings.record_targets,
            // Unique across restarts within one millisecond of end time.
            seq: AtomicU64::new(crate::authority::now_ms() << 16),
            queue,
            queued: std::sync::Mutex::new(Some(rx)),
            stopped: std::sync::Mutex::new(false),
            dropped: AtomicU64::new(0),
            warned: crate::log_limit::LogLimit::per_minute(),
        }
    }

    /// Queues an ended stream for the writer ([`Audit::run_writer`]);
    /// nothing without a store.
    pub fn submit(&self, ended: Ended) {
        if self.store.is_none() {
            return;
        }
        let stopped = self.stopped.lock().expect("audit stop lock");
        if *stopped {
            self.write(vec![ended]);
            return;
        }
        if self.queue.try_send(ended).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            crate::warn_limited!(
                self.warned,
                "audit queue full",
                dropped = n,
                "a stream was not recorded in the audit trail: its writer is behind"
            );
        }
    }

    /// Streams not recorded because the writer's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes what [`Audit::submit`] queues, in batches (off the async
    /// workers: a RocksDB write can stall), until `shutdown`; then what is
    /// left, and from then on [`Audit::submit`] writes at once, so the
    /// streams a shutdown ends are recorded too. Runs once per node.
    pub async fn run_writer(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let Some(mut rx) = self.queued.lock().expect("audit queue lock").take() else {
            return;
        };
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
                _ = shutdown.cancelled() => break,
            };
            // Gather a while: one hand-off to a blocking thread and one
            // write a batch, not a stream (a hand-off a few streams cost
            // the entry a fifth more CPU a stream on a churn load).
            tokio::select! {
                _ = tokio::time::sleep(BATCH_WAIT) => {}
                _ = shutdown.cancelled() => {}
            }
            while batch.len() < BATCH
                && let Ok(e) = rx.try_recv()
            {
                batch.push(e);
            }
            let me = self.clone();
            let b = std::mem::take(&mut batch);
            let _ = tokio::task::spawn_blocking(move || me.write(b)).await;
        }
        let mut stopped = self.stopped.lock().expect("audit stop lock");
        *stopped = true;
        while let Ok(e) = rx.try_recv() {
            batch.push(e);
        }
        self.write(batch);
    }

    fn write(&self, ended: Vec<Ended>) {
        let Some(store) = &self.store else {
            return;
        };
        if ended.is_empty() {
            return;
        }
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = ended
            .into_iter()
            .map(|e| (self.key(e.ended_ms), e.stored().encode_to_vec()))
            .collect();
        if let Err(e) = store.put_many(cf::AUDIT, &pairs) {
            crate::warn_limited!(self.warned, "audit write", error = %format!("{e:#}"), records = pairs.len(), "could not write to the audit trail");
        }
    }

    fn key(&self, ended_ms: u64) -> Vec<u8> {
        let mut key = ended_ms.to_be_bytes().to_vec();
        key.extend_from_slice(&self.seq.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        key
    }

    /// Whether records name targets.
    pub fn records_targets(&self) -> bool {
        self.record_targets
    }

    /// Records of streams that ended at or after `since_ms`, oldest first,
    /// of `tenant` if given, at most `limit`.
    pub fn export(&self, since_ms: u64, tenant: Option<&str>, limit: usize) -> Result<Vec<Record>> {
        Ok(self.page(&since_ms.to_be_bytes(), tenant, limit)?.0)
    }

    /// Up to `limit` records from the store key `from` on (an end time in
    /// ms, big-endian, or a cursor this returned), of `tenant` if given;
    /// and where the next page starts, when the limit stopped it.
    pub fn page(
        &self,
        from: &[u8],
        tenant: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Record>, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        let next = self.scan(from, |r| {
            if out.len() >= limit {
                return ControlFlow::Break(());
            }
            if tenant.is_none_or(|t| t == r.tenant) {
                out.push(Record::from_stored(r));
            }
            ControlFlow::Continue(())
        })?;
        Ok((out, next))
    }

    /// Hands every stored record to `f`, oldest first.
    pub fn each(&self, mut f: impl FnMut(&pb::AuditRecord)) -> Result<()> {
        self.scan(&[], |r| {
            f(&r);
            ControlFlow::Continue(())
        })?;
        Ok(())
    }

    /// Hands the stored records from the key `from` on to `f`, oldest
    /// first, reading the store a page at a time (so a filter cannot make
    /// one read hold the whole trail), until `f` breaks: then the key of
    /// the record it broke at.
    fn scan(
        &self,
        from: &[u8],
        mut f: impl FnMut(pb::AuditRecord) -> ControlFlow<()>,
    ) -> Result<Option<Vec<u8>>> {
        const PAGE: usize = 1024;
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let mut from = from.to_vec();
        loop {
            let page = store.scan_from(cf::AUDIT, &from, PAGE)?;
            for (k, v) in &page {
                let r = pb::AuditRecord::decode(v.as_slice()).context("an audit record")?;
                if f(r).is_break() {
                    return Ok(Some(k.clone()));
                }
            }
            match page.last() {
                Some((k, _)) if page.len() == PAGE => {
                    // The next key after the last one read.
                    from = k.clone();
                    from.push(0);
                }
                _ => return Ok(None),
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

    fn settings() -> crate::config::AuditSettings {
        crate::config::AuditSettings {
            retention: Duration::from_secs(3_600),
            record_targets: false,
        }
    }

    fn ended(tenant: &str, ended_ms: u64) -> Ended {
        Ended {
            trail: Trail {
                tenant: tenant.into(),
                class: "enterprise".into(),
                target: None,
                started_ms: ended_ms - 1_000,
                legs: vec![RawLeg {
                    at_ms: ended_ms - 1_000,
                    why: Arc::from("opened"),
                    hops: vec![(
                        ferry_router::NodeId([0xab; 32]),
                        Some(ferry_router::Jurisdiction(*b"DE")),
                    )],
                }],
                legs_left_out: 0,
            },
            ended_ms,
            bytes: (10, 20),
            end: "done",
        }
    }

    /// What [`ended`] exports as.
    fn record(tenant: &str, ended_ms: u64) -> Record {
        Record {
            tenant: tenant.into(),
            class: "enterprise".into(),
            target: None,
            started: rfc3339_ms(ended_ms - 1_000),
            ended: rfc3339_ms(ended_ms),
            bytes_up: 10,
            bytes_down: 20,
            end: "done".into(),
            circuits: vec![Leg {
                at: rfc3339_ms(ended_ms - 1_000),
                why: "opened".into(),
                hops: vec![Hop {
                    node: "ab".repeat(32),
                    jurisdiction: "DE".into(),
                }],
            }],
            circuits_left_out: 0,
        }
    }

    #[test]
    fn a_trail_keeps_its_first_circuits_and_counts_the_rest() {
        let mut t = ended("acme", 5_000).trail;
        for _ in 0..MAX_LEGS + 10 {
            t.push(t.legs[0].clone());
        }
        assert_eq!((t.legs.len(), t.legs_left_out), (MAX_LEGS, 11));
    }

    #[test]
    fn records_read_back_by_time_and_tenant_survive_a_reopen_and_age_out() {
        let dir = tempfile::tempdir().unwrap();
        let day = 86_400_000u64;
        {
            let a = Audit::new(Some(Arc::new(Store::open(dir.path()).unwrap())), settings());
            let four = [
                ("acme", day),
                ("globex", day + 1),
                ("acme", day + 2),
                ("acme", day),
            ];
            a.write(four.iter().map(|(t, at)| ended(t, *at)).collect());
            assert_eq!(
                a.export(0, None, 10).unwrap().len(),
                4,
                "two in one ms both kept"
            );
        }
        let a = Audit::new(Some(Arc::new(Store::open(dir.path()).unwrap())), settings());
        let acme = a.export(day + 1, Some("acme"), 10).unwrap();
        assert_eq!(
            acme,
            [record("acme", day + 2)],
            "since and tenant, in export form"
        );
        assert_eq!(a.export(0, None, 2).unwrap().len(), 2, "the limit");
        // An hour's retention, two hours on: only what ended in the last hour.
        a.write(vec![ended("acme", day + 7_000_000)]);
        a.sweep(day + 7_200_000).unwrap();
        assert_eq!(
            a.export(0, None, 10).unwrap(),
            [record("acme", day + 7_000_000)]
        );
    }

    #[tokio::test]
    async fn the_writer_writes_what_streams_queue_and_a_full_queue_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(Audit::new(
            Some(Arc::new(Store::open(dir.path()).unwrap())),
            settings(),
        ));
        // No writer yet: the queue fills, and the next one is counted.
        for i in 0..QUEUE as u64 + 1 {
            a.submit(ended("acme", 2_000 + i));
        }
        assert_eq!(a.dropped(), 1);
        let stop = tokio_util::sync::CancellationToken::new();
        let writer = tokio::spawn(a.clone().run_writer(stop.clone()));
        stop.cancel();
        writer.await.unwrap();
        let all = a.export(0, None, usize::MAX).unwrap();
        assert_eq!(
            all.len(),
            QUEUE,
            "everything queued is written, on shutdown too"
        );
        assert_eq!(all[0], record("acme", 2_000));
    }

    fn stored(
        class: &str,
        legs: &[(u64, &[u8; 2], &str)],
        ended_ms: u64,
        end: &str,
    ) -> pb::AuditRecord {
        pb::AuditRecord {
            tenant: "acme".into(),
            class: class.into(),
            started_ms: legs[0].0,
            ended_ms,
            end: end.into(),
            circuits: legs
                .iter()
                .map(|(at, j, why)| pb::AuditLeg {
                    at_ms: *at,
                    why: why.to_string(),
                    hops: vec![pb::AuditHop {
                        node_id: vec![1; 32],
                        jurisdiction: j.to_vec(),
                    }],
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_exit_report_counts_each_session_in_the_phases_it_crossed_the_region() {
        use ferry_router::{Blocs, Region, Ruling, Scope, Time};
        let ruling = Ruling {
            id: "gb".into(),
            version: 1,
            region: Region::parse("GB").unwrap(),
            blocked_from: Time(1_000),
            exit_by: Time(2_000),
            scope: Scope::Classes(vec!["enterprise".into()]),
            reason: "test".into(),
            lifted: false,
        };
        let region = Blocs::builtin().resolve(&ruling.region).unwrap();
        let mut r = ExitReport::new(ruling, region);
        let e = "enterprise";
        // Through GB from 500, moved to DE at 1,500: before and draining,
        // and moved out.
        r.add(&stored(
            e,
            &[(500, b"GB", "opened"), (1_500, b"DE", "moved: off leaving")],
            3_000,
            "done",
        ));
        // Through GB, ended by its client at 900: before only.
        r.add(&stored(e, &[(100, b"GB", "opened")], 900, "done"));
        // Through GB until the drain closed it at 1,900 (its exit left).
        r.add(&stored(e, &[(1_200, b"GB", "opened")], 1_900, "exit_left"));
        // Through GB past the exit date: counted and listed.
        r.add(&stored(e, &[(1_200, b"GB", "opened")], 2_500, "done"));
        // A move long before the ruling is no move out; a hop unknown.
        r.add(&stored(
            e,
            &[(10, b"GB", "opened"), (20, b"??", "moved")],
            900,
            "done",
        ));
        // Another class through GB, and an enterprise session around it.
        r.add(&stored(
            "consumer",
            &[(1_200, b"GB", "opened")],
            2_500,
            "done",
        ));
        r.add(&stored(e, &[(1_200, b"DE", "opened")], 2_500, "done"));
        let b = r.finish(5_000);
        assert_eq!(b["sessions"], 5, "{b:#}");
        assert_eq!(
            b["crossed"],
            serde_json::json!({ "before": 3, "draining": 3, "after_exit": 1 })
        );
        assert_eq!(
            (b["moved_out"].as_u64(), b["closed"].as_u64()),
            (Some(1), Some(1)),
            "{b:#}"
        );
        assert_eq!(b["sessions_with_unknown_hops"], 1);
        assert_eq!(b["after_exit_sessions"].as_array().unwrap().len(), 1);
        assert_eq!(b["made_at"], rfc3339_ms(5_000));
        // Signed, it verifies; changed, it does not; nor with an unsigned
        // field added.
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let signed = sign_report(&b, &key);
        let text = serde_json::to_string_pretty(&signed).unwrap();
        let node = hex::encode(key.verifying_key().as_bytes());
        let (by, body) = verify_report(&text, Some(&node)).unwrap();
        assert_eq!((by, body), (node.clone(), b));
        let mut changed = signed.clone();
        changed["body"] = changed["body"]
            .as_str()
            .unwrap()
            .replacen("\"after_exit\": 1", "\"after_exit\": 0", 1)
            .into();
        assert_ne!(changed, signed);
        assert!(verify_report(&changed.to_string(), None).is_err());
        let mut extra = signed.clone();
        extra["note"] = "all clear".into();
        assert!(verify_report(&extra.to_string(), None).is_err());
        assert!(
            verify_report(&text, Some(&"00".repeat(32))).is_err(),
            "another node"
        );
    }

    #[test]
    fn a_page_boundary_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::new(Some(Arc::new(Store::open(dir.path()).unwrap())), settings());
        let t = |i: u64| if i % 2 == 0 { "acme" } else { "globex" };
        a.write((0..2_500u64).map(|i| ended(t(i), 1_000_000 + i)).collect());
        assert_eq!(
            a.export(0, Some("globex"), usize::MAX).unwrap().len(),
            1_250
        );
        assert_eq!(a.export(0, None, usize::MAX).unwrap().len(), 2_500);
    }
}
