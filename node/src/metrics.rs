//! Prometheus metrics (the `prometheus` crate, without its protobuf
//! feature): one struct per subsystem, registered into one registry that
//! the node's start-up builds and passes down — never the crate's global
//! default, so several nodes in one process (the demo) keep theirs apart.
//! This module imports nothing of the node: each subsystem owns its struct
//! and fills its scrape-time gauges itself, where its data lives
//! (`Switch::observe`, `Origin::observe`, `Rulings::observe`, ...), when
//! `/metrics` is scraped; counters fed from monotonic sources (bytes,
//! migrations, refusals of gossip) are [advanced](advance) to the source's
//! value then. Names are `ferry_<name>_<unit>[_total]` and every label takes
//! bounded values: jurisdictions, states, reasons, ruling ids — never peer
//! ids or client addresses.

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// Why a stream ended, as a metric label: `done` when both directions
/// finished normally, else the first cause seen.
pub type CloseReason = &'static str;

/// Every value of the `reason` label of `ferry_streams_closed_total`.
pub const CLOSE_REASONS: [CloseReason; 6] = [
    "done",
    "reset",
    "circuit_closed",
    "exit_left",
    "protocol",
    "other",
];

/// Data-plane links.
#[derive(Clone)]
pub struct LinkMetrics {
    /// Links open (scrape time).
    pub active: IntGauge,
    /// Bytes of forwarded cells waiting for congested links (scrape time).
    pub queued: IntGauge,
    /// Links opened.
    pub opened: IntCounter,
    /// Links closed, by reason (`error`, `normal`).
    pub closed: IntCounterVec,
    /// Link handshake time.
    pub handshake_seconds: Histogram,
    /// Ciphertext bytes written (advanced at scrape time).
    pub sent: IntCounter,
    /// Ciphertext bytes read.
    pub received: IntCounter,
}

/// Circuits: carried, built, closed, moved.
#[derive(Clone)]
pub struct CircuitMetrics {
    /// Circuits carried for others (scrape time).
    pub active: IntGauge,
    /// Circuits this entry built (scrape time).
    pub origin_active: IntGauge,
    /// Circuits opened here.
    pub opened: IntCounter,
    /// Circuits closed here, by reason.
    pub closed: IntCounterVec,
    /// Circuit build time at the entry.
    pub build_seconds: Histogram,
    /// Circuit sides next to a leaving jurisdiction (scrape time).
    pub blocked: IntGaugeVec,
    /// Moves off leaving nodes, by result.
    pub migrations: IntCounterVec,
    /// Streams moved.
    pub streams_moved: IntCounter,
    /// Streams of lost circuits, moved or lost.
    pub rescued: IntCounterVec,
    /// Circuits closed because their exit left.
    pub exit_closed: IntCounter,
}

/// Client streams.
#[derive(Clone)]
pub struct StreamMetrics {
    /// Streams on this entry's circuits (scrape time).
    pub active: IntGauge,
    /// Streams connected.
    pub opened: IntCounter,
    /// Streams ended, by [`CLOSE_REASONS`].
    pub closed: IntCounterVec,
    /// Seconds entry streams waited for their byte rates (scrape time).
    pub paced: Counter,
    /// Client connections open, by entry listener (scrape time).
    pub connections: IntGaugeVec,
    /// Streams crossing a ruled region, by the ruling's phase (scrape
    /// time).
    pub ruled: IntGaugeVec,
    /// Streams the audit trail had no room for (advanced at scrape time).
    pub audit_dropped: IntCounter,
}

/// The node as a whole: identity, state, admission, refusals, peers.
#[derive(Clone)]
pub struct NodeMetrics {
    /// Version (always 1).
    pub build_info: IntGaugeVec,
    /// Jurisdiction and roles (always 1).
    pub info: IntGaugeVec,
    /// 1 for the current state.
    pub state: IntGaugeVec,
    /// 1 while ready.
    pub ready: IntGauge,
    /// 1 if peers need this node's certificate.
    pub cert_required: IntGauge,
    /// Seconds until the certificate ends.
    pub cert_expiry: IntGauge,
    /// Seconds until the exit date while draining.
    pub exit_seconds: IntGauge,
    /// Requests refused, by reason: ruling (a new circuit through a node a
    /// ruling drains), draining (the operator's or SIGTERM's drain),
    /// constraint, capacity, auth, malformed, timeout, and the entry's
    /// limits: rate, concurrency, connections.
    pub refusals: IntCounterVec,
    /// Live known nodes by jurisdiction.
    pub peers: IntGaugeVec,
    /// The async runtime's worker threads.
    pub workers: IntGauge,
}

/// The control plane: rulings, adverts, revocations.
#[derive(Clone)]
pub struct ControlMetrics {
    /// Version of each ruling in force.
    pub ruling_version: IntGaugeVec,
    /// Rulings refused, by reason.
    pub ruling_rejections: IntCounterVec,
    /// Adverts dropped, by reason.
    pub advert_rejections: IntCounterVec,
    /// Revoked nodes known.
    pub revoked: IntGauge,
    /// Revocations refused, by reason.
    pub revocation_rejections: IntCounterVec,
    /// Nodes quarantined on a landmark's evidence.
    pub quarantined: IntGauge,
    /// Landmark reports taken, by result (plausible, refuted, or why one
    /// was refused).
    pub reports: IntCounterVec,
}

/// A node's metrics: every subsystem's, in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Links.
    pub link: LinkMetrics,
    /// Circuits.
    pub circuit: CircuitMetrics,
    /// Streams.
    pub stream: StreamMetrics,
    /// The node.
    pub node: NodeMetrics,
    /// The control plane.
    pub control: ControlMetrics,
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
pub fn advance(c: &IntCounter, to: u64) {
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

fn seed(v: &IntCounterVec, labels: &[&str]) {
    for l in labels {
        v.with_label_values(&[l]);
    }
}

impl LinkMetrics {
    fn new(r: &Registry) -> Self {
        let bytes = counter_vec(
            r,
            "ferry_link_bytes_total",
            "Bytes on data-plane links (ciphertext), by direction (sent, received).",
            "direction",
        );
        let m = Self {
            active: gauge(r, "ferry_links_active", "Data-plane links open."),
            queued: gauge(
                r,
                "ferry_link_queued_bytes",
                "Bytes of forwarded cells waiting, with their circuits, for congested links.",
            ),
            opened: counter(r, "ferry_links_opened_total", "Data-plane links opened."),
            closed: counter_vec(
                r,
                "ferry_links_closed_total",
                "Data-plane links closed, by reason (error, normal, dead: the peer went silent, stalled: the peer stopped reading).",
                "reason",
            ),
            handshake_seconds: histogram(
                r,
                "ferry_link_handshake_seconds",
                "Time to complete a link's Noise handshake.",
            ),
            sent: bytes.with_label_values(&["sent"]),
            received: bytes.with_label_values(&["received"]),
        };
        seed(&m.closed, &["error", "normal", "dead", "stalled"]);
        m
    }
}

impl CircuitMetrics {
    fn new(r: &Registry) -> Self {
        let m = Self {
            active: gauge(
                r,
                "ferry_circuits_active",
                "Circuits this node carries for others (relayed, or as their exit).",
            ),
            origin_active: gauge(
                r,
                "ferry_origin_circuits_active",
                "Circuits this node built as an entry.",
            ),
            opened: counter(
                r,
                "ferry_circuits_opened_total",
                "Circuits opened on this node.",
            ),
            closed: counter_vec(
                r,
                "ferry_circuits_closed_total",
                "Circuits closed on this node, by reason.",
                "reason",
            ),
            build_seconds: histogram(
                r,
                "ferry_circuit_build_seconds",
                "Time for this entry to build a circuit, hop by hop.",
            ),
            blocked: reg(
                r,
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
                r,
                "ferry_migrations_total",
                "Circuit moves off leaving nodes, by result (started, succeeded, failed).",
                "result",
            ),
            streams_moved: counter(
                r,
                "ferry_streams_moved_total",
                "Streams moved to another circuit.",
            ),
            rescued: counter_vec(
                r,
                "ferry_streams_rescued_total",
                "Streams of circuits lost without warning (a hop died, a link was cut), by result: moved to a new circuit to the same exit, or lost.",
                "result",
            ),
            exit_closed: counter(
                r,
                "ferry_exit_circuits_closed_total",
                "Circuits closed because their exit left the mesh.",
            ),
        };
        seed(&m.migrations, &["started", "succeeded", "failed"]);
        seed(&m.rescued, &["moved", "lost"]);
        for r in (1..=9).filter_map(|i| ferry_proto::pb::DestroyReason::try_from(i).ok()) {
            m.closed.with_label_values(&[&destroy_label(r)]);
        }
        m
    }
}

impl StreamMetrics {
    fn new(r: &Registry) -> Self {
        let m = Self {
            active: gauge(
                r,
                "ferry_streams_active",
                "Client streams on this entry's circuits.",
            ),
            opened: counter(r, "ferry_streams_opened_total", "Streams connected."),
            closed: counter_vec(
                r,
                "ferry_streams_closed_total",
                "Streams ended, by reason (done, reset, circuit_closed, exit_left, protocol, other).",
                "reason",
            ),
            paced: reg(
                r,
                Counter::with_opts(Opts::new(
                    "ferry_streams_paced_seconds_total",
                    "Seconds entry streams waited for their client's or tenant's byte rate.",
                ))
                .expect("valid metric"),
            ),
            connections: gauge_vec(
                r,
                "ferry_entry_connections",
                "Client connections open, by entry listener (socks, http).",
                "listener",
            ),
            ruled: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "ferry_ruled_region_sessions",
                        "Streams on this entry's circuits that cross a region a ruling in force covers, for the ruling's scope, by its phase now: before (blocked_from still to come), draining, after_exit (must be 0). Regions are the rulings' own (a country or a bloc).",
                    ),
                    &["region", "phase"],
                )
                .expect("valid metric"),
            ),
            audit_dropped: reg(
                r,
                IntCounter::new(
                    "ferry_audit_records_dropped_total",
                    "Streams the jurisdiction trail did not record: its writer's queue was full.",
                )
                .expect("valid metric"),
            ),
        };
        seed(&m.closed, &CLOSE_REASONS);
        m
    }
}

impl NodeMetrics {
    fn new(r: &Registry) -> Self {
        let m = Self {
            build_info: gauge_vec(
                r,
                "ferry_build_info",
                "Ferry's version (always 1).",
                "version",
            ),
            info: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "ferry_node_info",
                        "The node's jurisdiction and roles (always 1); join on instance to group other series by jurisdiction.",
                    ),
                    &["jurisdiction", "roles"],
                )
                .expect("valid metric"),
            ),
            state: gauge_vec(
                r,
                "ferry_node_state",
                "1 for the node's state (active, draining, exited), 0 for the others.",
                "state",
            ),
            ready: gauge(
                r,
                "ferry_node_ready",
                "1 while the node takes new circuits (/readyz): admitted, active and joined; 0 while unadmitted, joining, draining or exited.",
            ),
            cert_required: gauge(
                r,
                "ferry_certificate_required",
                "1 if peers need this node's certificate to route through it (it joins by gossip under an authority), else 0.",
            ),
            cert_expiry: gauge(
                r,
                "ferry_certificate_expiry_seconds",
                "Seconds until this node's certificate ends; 0 if it has none, or it is refused or expired.",
            ),
            exit_seconds: gauge(
                r,
                "ferry_node_exit_seconds",
                "Seconds until the node's exit date while draining; 0 otherwise.",
            ),
            workers: gauge(
                r,
                "ferry_runtime_worker_threads",
                "Worker threads of the node's async runtime, which carry its traffic: node.threads, or if that is 0 one per CPU (or TOKIO_WORKER_THREADS).",
            ),
            refusals: counter_vec(
                r,
                "ferry_refusals_total",
                "Requests refused, by reason (ruling, draining, constraint, capacity, auth, malformed, timeout, rate, concurrency, connections, loop, dns, policy, control: a control-plane connection past its limits).",
                "reason",
            ),
            peers: gauge_vec(
                r,
                "ferry_peers",
                "Live known nodes by jurisdiction.",
                "jurisdiction",
            ),
        };
        seed(
            &m.refusals,
            &[
                "ruling",
                "draining",
                "constraint",
                "capacity",
                "auth",
                "malformed",
                "timeout",
                "rate",
                "concurrency",
                "connections",
                "loop",
                "dns",
                "policy",
                "control",
            ],
        );
        m
    }
}

impl ControlMetrics {
    fn new(r: &Registry) -> Self {
        let m = Self {
            ruling_version: gauge_vec(
                r,
                "ferry_ruling_version",
                "Version of each ruling in force.",
                "ruling",
            ),
            ruling_rejections: counter_vec(
                r,
                "ferry_ruling_rejections_total",
                "Rulings refused, by reason.",
                "reason",
            ),
            advert_rejections: counter_vec(
                r,
                "ferry_advert_rejections_total",
                "Node adverts dropped, by reason.",
                "reason",
            ),
            revoked: gauge(
                r,
                "ferry_revoked_nodes",
                "Nodes the authority revoked that this node knows of.",
            ),
            revocation_rejections: counter_vec(
                r,
                "ferry_revocation_rejections_total",
                "Revocations refused (not signed k of n by trusted authority keys, malformed), by reason.",
                "reason",
            ),
            quarantined: gauge(
                r,
                "ferry_quarantined_nodes",
                "Nodes quarantined here: a landmark's signed round trip refutes their jurisdiction.",
            ),
            reports: counter_vec(
                r,
                "ferry_measurement_reports_total",
                "Landmark measurement reports, by result (plausible, refuted, malformed, not_landmark, bad_signature, stale, future, unknown_node, claim_changed).",
                "result",
            ),
        };
        seed(
            &m.reports,
            &[
                "plausible",
                "refuted",
                "malformed",
                "not_landmark",
                "bad_signature",
                "stale",
                "future",
                "unknown_node",
                "claim_changed",
            ],
        );
        seed(
            &m.ruling_rejections,
            &[
                "malformed",
                "oversized",
                "unsigned",
                "unknown_key",
                "bad_signature",
                "threshold",
                "expired",
                "invalid",
                "rollback",
            ],
        );
        seed(
            &m.advert_rejections,
            &[
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
            ],
        );
        seed(
            &m.revocation_rejections,
            &[
                "malformed",
                "oversized",
                "unsigned",
                "unknown_key",
                "bad_signature",
                "threshold",
            ],
        );
        m
    }
}

impl Metrics {
    /// A fresh registry with every subsystem's metrics registered, and
    /// every known label value of the counters present at 0 (so queries
    /// and alerts see a series before the first event).
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            link: LinkMetrics::new(&registry),
            circuit: CircuitMetrics::new(&registry),
            stream: StreamMetrics::new(&registry),
            node: NodeMetrics::new(&registry),
            control: ControlMetrics::new(&registry),
            registry,
        };
        // The runtime the node runs on, fixed for its life (a registry
        // made outside one, in a unit test, says 0).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            m.node.workers.set(rt.metrics().num_workers() as i64);
        }
        m
    }

    /// Encodes every metric in the text exposition format (after the
    /// subsystems have observed their gauges).
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
