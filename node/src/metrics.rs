//! Prometheus metrics (the `prometheus` crate, without its protobuf
//! feature), one registry per node — never the crate's global default, so
//! several nodes in one process (the demo) keep theirs apart.
//!
//! Most values are read from the node's own state when `/metrics` is
//! scraped (links, circuits, state, rulings, drain progress, peers), so the
//! data path carries no extra bookkeeping for them; counters fed from
//! monotonic sources (bytes, migrations, refusals of gossip) are advanced to
//! the source's value at each scrape. Names are `ferry_<name>_<unit>[_total]`
//! and every label takes bounded values: jurisdictions, states, reasons,
//! ruling ids — never peer ids or client addresses.

use crate::authority::now_ms;
use crate::control::GossipCounters;
use crate::origin::Origin;
use crate::rulings::Rulings;
use crate::switch::Switch;
use ferry_router::{NodeState, Status, Time, TrafficScope};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::sync::atomic::Ordering;

/// A node's metrics.
pub struct Metrics {
    registry: Registry,
    build_info: IntGaugeVec,
    node_info: IntGaugeVec,
    links: IntGauge,
    circuits: IntGauge,
    origin_circuits: IntGauge,
    streams: IntGauge,
    link_sent: IntCounter,
    state: IntGaugeVec,
    ready: IntGauge,
    cert_required: IntGauge,
    cert_expiry: IntGauge,
    revoked: IntGauge,
    revocation_rejections: IntCounterVec,
    exit_seconds: IntGauge,
    blocked_circuits: IntGaugeVec,
    migrations: IntCounterVec,
    streams_moved: IntCounter,
    exit_closed: IntCounter,
    ruling_version: IntGaugeVec,
    ruling_rejections: IntCounterVec,
    advert_rejections: IntCounterVec,
    peers: IntGaugeVec,
    /// Links opened.
    pub links_opened: IntCounter,
    /// Links closed, by reason (`error`, `normal`).
    pub links_closed: IntCounterVec,
    /// Link handshake time.
    pub handshake_seconds: Histogram,
    /// Circuits opened here (as a hop, or built as an entry).
    pub circuits_opened: IntCounter,
    /// Circuits closed, by reason (the DESTROY reason, `link_lost`, ...).
    pub circuits_closed: IntCounterVec,
    /// Circuit build time at the entry.
    pub build_seconds: Histogram,
    /// Streams opened (connected at the exit, or at the entry).
    pub streams_opened: IntCounter,
    /// Streams closed, by reason (see `endpoint::CLOSE_REASONS`).
    pub streams_closed: IntCounterVec,
    /// Refusals by reason: ruling (a new circuit through a node a ruling
    /// drains), draining (the operator's or SIGTERM's drain), constraint,
    /// capacity, auth, malformed.
    pub refusals: IntCounterVec,
    /// Bytes read from data-plane links (ciphertext): the `received`
    /// child of `ferry_link_bytes_total`.
    pub link_received: IntCounter,
}

fn histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    reg(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric"),
    )
}

/// The label for a DESTROY reason: `DESTROY_REASON_LINK_LOST` → `link_lost`.
pub fn destroy_label(r: ferry_proto::pb::DestroyReason) -> String {
    r.as_str_name()
        .trim_start_matches("DESTROY_REASON_")
        .to_ascii_lowercase()
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::new(name, help).expect("valid metric"))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
    )
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(r, IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
    )
}

/// Advances a counter to `to` (sources only grow).
fn advance(c: &IntCounter, to: u64) {
    let now = c.get();
    if to > now {
        c.inc_by(to - now);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered, and every known
    /// label value of the counters present at 0 (so queries and alerts see
    /// a series before the first event).
    pub fn new() -> Self {
        let m = Self::bare();
        for reason in [
            "ruling",
            "draining",
            "constraint",
            "capacity",
            "auth",
            "malformed",
            "timeout",
        ] {
            m.refusals.with_label_values(&[reason]);
        }
        for reason in ["error", "normal"] {
            m.links_closed.with_label_values(&[reason]);
        }
        for result in ["started", "succeeded", "failed"] {
            m.migrations.with_label_values(&[result]);
        }
        for r in [
            "malformed",
            "oversized",
            "unsigned",
            "unknown_key",
            "bad_signature",
            "threshold",
            "expired",
            "invalid",
            "rollback",
        ] {
            m.ruling_rejections.with_label_values(&[r]);
        }
        for r in [
            "oversized",
            "undecodable",
            "bad_signature",
            "expired",
            "invalid",
            "stale",
            "revoked",
            "no_certificate",
            "cert_oversized",
            "cert_malformed",
            "cert_unsigned",
            "cert_unknown_key",
            "cert_bad_signature",
            "cert_threshold",
            "cert_mismatch",
            "cert_not_yet_valid",
            "cert_expired",
            "cert_invalid",
        ] {
            m.advert_rejections.with_label_values(&[r]);
        }
        for r in [
            "malformed",
            "oversized",
            "unsigned",
            "unknown_key",
            "bad_signature",
            "threshold",
        ] {
            m.revocation_rejections.with_label_values(&[r]);
        }
        for r in crate::endpoint::CLOSE_REASONS {
            m.streams_closed.with_label_values(&[r]);
        }
        for r in (1..=7).filter_map(|i| ferry_proto::pb::DestroyReason::try_from(i).ok()) {
            m.circuits_closed.with_label_values(&[&destroy_label(r)]);
        }
        m
    }

    fn bare() -> Self {
        let r = Registry::new();
        let link_bytes = counter_vec(
            &r,
            "ferry_link_bytes_total",
            "Bytes on data-plane links (ciphertext), by direction (sent, received).",
            "direction",
        );
        Self {
            build_info: gauge_vec(
                &r,
                "ferry_build_info",
                "Ferry's version (always 1).",
                "version",
            ),
            node_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "ferry_node_info",
                        "The node's jurisdiction and roles (always 1); join on instance to group other series by jurisdiction.",
                    ),
                    &["jurisdiction", "roles"],
                )
                .expect("valid metric"),
            ),
            links: gauge(&r, "ferry_links_active", "Data-plane links open."),
            circuits: gauge(
                &r,
                "ferry_circuits_active",
                "Circuits this node carries for others (relayed, or as their exit).",
            ),
            origin_circuits: gauge(
                &r,
                "ferry_origin_circuits_active",
                "Circuits this node built as an entry.",
            ),
            streams: gauge(
                &r,
                "ferry_streams_active",
                "Client streams on this entry's circuits.",
            ),
            link_sent: link_bytes.with_label_values(&["sent"]),
            link_received: link_bytes.with_label_values(&["received"]),
            ready: gauge(
                &r,
                "ferry_node_ready",
                "1 while the node takes new circuits (/readyz): admitted, active and joined; 0 while unadmitted, joining, draining or exited.",
            ),
            cert_required: gauge(
                &r,
                "ferry_certificate_required",
                "1 if peers need this node's certificate to route through it (it joins by gossip under an authority), else 0.",
            ),
            cert_expiry: gauge(
                &r,
                "ferry_certificate_expiry_seconds",
                "Seconds until this node's certificate ends; 0 if it has none, or it is refused or expired.",
            ),
            revoked: gauge(
                &r,
                "ferry_revoked_nodes",
                "Nodes the authority revoked that this node knows of.",
            ),
            revocation_rejections: counter_vec(
                &r,
                "ferry_revocation_rejections_total",
                "Revocations refused (not signed k of n by trusted authority keys, malformed), by reason.",
                "reason",
            ),
            state: gauge_vec(
                &r,
                "ferry_node_state",
                "1 for the node's state (active, draining, exited), 0 for the others.",
                "state",
            ),
            exit_seconds: gauge(
                &r,
                "ferry_node_exit_seconds",
                "Seconds until the node's exit date while draining; 0 otherwise.",
            ),
            blocked_circuits: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "ferry_blocked_jurisdiction_circuits",
                        "Circuit sides on this node whose neighbour is in a jurisdiction a ruling drains or blocks, plus this entry's circuits crossing it; status is draining (before the exit date) or blocked (after it).",
                    ),
                    &["jurisdiction", "status"],
                )
                .expect("valid metric"),
            ),
            migrations: counter_vec(
                &r,
                "ferry_migrations_total",
                "Circuit moves off leaving nodes, by result (started, succeeded, failed).",
                "result",
            ),
            streams_moved: counter(
                &r,
                "ferry_streams_moved_total",
                "Streams moved to another circuit.",
            ),
            exit_closed: counter(
                &r,
                "ferry_exit_circuits_closed_total",
                "Circuits closed because their exit left the mesh.",
            ),
            ruling_version: gauge_vec(
                &r,
                "ferry_ruling_version",
                "Version of each ruling in force.",
                "ruling",
            ),
            ruling_rejections: counter_vec(
                &r,
                "ferry_ruling_rejections_total",
                "Rulings refused, by reason.",
                "reason",
            ),
            advert_rejections: counter_vec(
                &r,
                "ferry_advert_rejections_total",
                "Node adverts dropped, by reason.",
                "reason",
            ),
            peers: gauge_vec(
                &r,
                "ferry_peers",
                "Live known nodes by jurisdiction.",
                "jurisdiction",
            ),
            links_opened: counter(&r, "ferry_links_opened_total", "Data-plane links opened."),
            links_closed: counter_vec(
                &r,
                "ferry_links_closed_total",
                "Data-plane links closed, by reason (error, normal).",
                "reason",
            ),
            handshake_seconds: histogram(
                &r,
                "ferry_link_handshake_seconds",
                "Time to complete a link's Noise handshake.",
            ),
            circuits_opened: counter(
                &r,
                "ferry_circuits_opened_total",
                "Circuits opened on this node.",
            ),
            circuits_closed: counter_vec(
                &r,
                "ferry_circuits_closed_total",
                "Circuits closed on this node, by reason.",
                "reason",
            ),
            build_seconds: histogram(
                &r,
                "ferry_circuit_build_seconds",
                "Time for this entry to build a circuit, hop by hop.",
            ),
            streams_opened: counter(&r, "ferry_streams_opened_total", "Streams connected."),
            streams_closed: counter_vec(
                &r,
                "ferry_streams_closed_total",
                "Streams ended, by reason (done, reset, circuit_closed, exit_left, protocol, other).",
                "reason",
            ),
            refusals: counter_vec(
                &r,
                "ferry_refusals_total",
                "Requests refused, by reason (ruling, draining, constraint, capacity, auth, malformed, timeout).",
                "reason",
            ),
            registry: r,
        }
    }

    /// Reads the node's state into the metrics and encodes them in the text
    /// exposition format.
    pub async fn render(
        &self,
        sw: &Switch,
        origin: Option<&Origin>,
        rulings: &Rulings,
        revocations: &crate::rulings::Revocations,
        gossip: &GossipCounters,
    ) -> String {
        let now = now_ms();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        self.node_info
            .with_label_values(&[sw.cfg.jurisdiction.as_str(), &sw.cfg.roles.to_string()])
            .set(1);
        self.links.set(sw.link_count() as i64);
        self.circuits.set(sw.circuit_count() as i64);
        advance(&self.link_sent, sw.bytes_out());
        self.ready.set(i64::from(sw.readiness(now).ready));
        self.cert_required.set(i64::from(sw.needs_certificate()));
        self.cert_expiry.set(match &sw.certificate {
            Some(c) if c.problem(now).is_none() => c
                .verified
                .as_ref()
                .map_or(0, |c| (c.not_after_ms.saturating_sub(now) / 1000) as i64),
            _ => 0,
        });
        self.revoked.set(revocations.revoked().len() as i64);
        for (reason, n) in revocations.rejections() {
            advance(&self.revocation_rejections.with_label_values(&[reason]), n);
        }
        let cur = sw.state.current();
        for name in ["active", "draining", "exited"] {
            self.state
                .with_label_values(&[name])
                .set(i64::from(cur.name() == name));
        }
        self.exit_seconds.set(match cur.state {
            NodeState::Draining { until } => (until.0.saturating_sub(now) / 1000) as i64,
            _ => 0,
        });
        let set = rulings.snapshot();
        // `draining` or `blocked` for a jurisdiction a ruling covers now.
        let leaving = |j: &str| -> Option<&'static str> {
            let j = crate::config::parse_jurisdiction(j).ok()?;
            match set.status(Some(j), &TrafficScope::default(), Time(now)).0 {
                Status::Allowed => None,
                Status::Draining { .. } => Some("draining"),
                Status::Blocked => Some("blocked"),
            }
        };
        self.blocked_circuits.reset();
        for (j, n) in sw.circuit_neighbours() {
            if let Some(st) = leaving(&j) {
                self.blocked_circuits
                    .with_label_values(&[&j, st])
                    .add(n as i64);
            }
        }
        if let Some(o) = origin {
            let circuits = o.circuits().await;
            self.origin_circuits.set(circuits.len() as i64);
            self.streams
                .set(circuits.iter().map(|c| c.stream_count()).sum::<usize>() as i64);
            for c in &circuits {
                for j in c.jurisdictions(sw) {
                    if let Some(st) = leaving(&j) {
                        self.blocked_circuits.with_label_values(&[&j, st]).inc();
                    }
                }
            }
            let s = &o.stats;
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            for (result, v) in [
                ("started", get(&s.migrations_started)),
                ("succeeded", get(&s.migrations_done)),
                ("failed", get(&s.migrations_failed)),
            ] {
                advance(&self.migrations.with_label_values(&[result]), v);
            }
            advance(&self.streams_moved, get(&s.streams_moved));
            advance(&self.exit_closed, get(&s.exit_closed));
        }
        self.ruling_version.reset();
        for r in set.iter().filter(|r| !r.lifted) {
            self.ruling_version
                .with_label_values(&[&r.id])
                .set(r.version.min(i64::MAX as u64) as i64);
        }
        for (reason, n) in rulings.rejections() {
            advance(&self.ruling_rejections.with_label_values(&[reason]), n);
        }
        for (reason, n) in gossip.advert_rejections() {
            advance(&self.advert_rejections.with_label_values(&[reason]), n);
        }
        self.peers.reset();
        for e in sw.directory.live(now) {
            self.peers
                .with_label_values(&[&e.peer.jurisdiction.to_string()])
                .inc();
        }
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
