//! Fair limits at the entry: what one client or one tenant may take, so
//! that a client that misbehaves (or a tenant's fleet of them) cannot starve
//! the others on the same entry.
//!
//! An entry connection (SOCKS5 or HTTP CONNECT) is one stream, so limits on
//! streams are limits on connections:
//!
//! | limit | client (an IPv4 address, an IPv6 /64) | tenant (anonymous clients are one) | refused as |
//! | --- | --- | --- | --- |
//! | streams at once | `client_streams` (512) | `tenant_streams` (2048) | `concurrency` |
//! | new streams per second, and at once | `client_streams_per_sec` (100), `client_burst` (300) | `tenant_streams_per_sec` (1000), `tenant_burst` (2000) | `rate` |
//! | bytes per second, each way | `client_bytes_per_sec` (0: none) | `tenant_bytes_per_sec` (0: none) | paced, not refused |
//! | connections at once, per listener | `connections` (4096) | | `connections` |
//!
//! A client's limits are checked when its connection is accepted, before
//! its handshake is read: a client over them costs no credential check
//! (Argon2id) and no circuit. Beyond those, one client may have at most
//! [`HANDSHAKES`] connections still in their handshake and [`CHECKS`]
//! password checks running, so a few addresses cannot fill the listener
//! with slow handshakes or the bounded pool of password checks with wrong
//! passwords. A tenant's limits are checked once its credentials are, so no
//! tenant (anonymous clients are one) takes more than `tenant_streams` of
//! the listener. A `[[tenants]]` entry may set its own `streams`,
//! `streams_per_sec` (its burst is twice that) and `bytes_per_sec`.
//! Refusals are counted in
//! `ferry_refusals_total{reason="rate"|"concurrency"|"connections"}` and
//! answered in each protocol's terms (SOCKS reply 0x02; HTTP 429 with
//! `Retry-After`, 503 when the listener is full). Bytes over a rate wait
//! (the stream is paced, its window fills, and the sender is slowed by TCP
//! itself); the time spent waiting is `ferry_streams_paced_seconds_total`.
//! Waiters on one bucket are not served in order (`governor` wakes them to
//! race), so a tenant's streams share its rate roughly, not exactly.
//!
//! Rates are token buckets (GCRA) from `governor`, a maintained crate that
//! is lock-free per key; hand-written buckets would be Ferry's code to get
//! right for no gain. The per-client buckets are keyed by address and
//! swept every 1024 admissions of the keys whose buckets are full again
//! (idle for `burst / rate` seconds), so they hold memory only for recent
//! clients; the counts of streams at once hold an entry per client or
//! tenant with a stream open, and no more. A reload keeps the buckets of
//! shares it does not change; open streams keep the byte rate they were
//! admitted under.
//!
//! Byte rates are off by default: at one entry, streams share links and
//! circuits through per-stream windows and per-circuit queues, so a bulk
//! transfer slows others rather than stopping them (`tests/limits.rs` runs
//! a bulk stream and a flood of new streams beside a paced tenant's
//! stream); an operator who sells bandwidth sets them.

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Connections of one client still in their handshake (not yet past its
/// credential check) at once; more are closed at once.
pub const HANDSHAKES: u32 = 32;

/// Password checks (Argon2id) of one client running or waiting at once;
/// more are refused as busy.
pub const CHECKS: u32 = 1;

/// The most a rate or a burst may be set to (new streams per second).
pub const MAX_RATE: u32 = 1_000_000;

/// What this node takes on for others, as a relay and exit (`[limits]`;
/// a restart changes them). Every one has a bound: a hostile peer or
/// origin can fill a limit, not the node's memory or its file table.
/// Refusals are counted in `ferry_refusals_total` by reason (`capacity`
/// for the first four, `dns` for lookups).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carry {
    /// Links at once, inbound and outbound (an inbound one past it is
    /// closed before its handshake; a dial past it fails).
    pub links: u32,
    /// Inbound link handshakes in progress at once (each may take up to
    /// the handshake timeout); more connections wait to be accepted.
    pub link_handshakes: u32,
    /// Circuit sides this node holds at once, in all.
    pub circuits: u32,
    /// Circuit sides at once on one link: one neighbour cannot take them
    /// all.
    pub circuits_per_link: u32,
    /// Streams at once on one circuit, at the exit.
    pub streams_per_circuit: u32,
    /// Names the exit resolves at once (each holds a resolver thread
    /// until the system resolver answers, even after the stream gave up
    /// on it); a BEGIN past it ends with `capacity`.
    pub dns_lookups: u32,
    /// A circuit with no cell either way for this long is closed, at the
    /// relays, the exit and the entry (0: never).
    pub idle_circuit_secs: u32,
    /// MiB of forwarded cells that may wait for congested links, in all
    /// (each circuit's own share is at most
    /// [`crate::link::CIRCUIT_QUEUE_MAX`]); a circuit whose cell finds
    /// either full is destroyed (`capacity`).
    pub forward_queue_mb: u32,
}

impl Default for Carry {
    fn default() -> Self {
        Self {
            links: 2048,
            link_handshakes: 64,
            circuits: 20_000,
            circuits_per_link: 4096,
            streams_per_circuit: 512,
            dns_lookups: 64,
            idle_circuit_secs: 600,
            forward_queue_mb: 512,
        }
    }
}

/// What one client or one tenant may take (0: no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Streams open at once.
    pub streams: u32,
    /// New streams per second.
    pub streams_per_sec: u32,
    /// New streams at once, before the rate applies (at least 1).
    pub burst: u32,
    /// Bytes per second, each way.
    pub bytes_per_sec: u32,
}

/// The `[limits]` of an entry, with the overrides of its tenants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Connections at once on each listener.
    pub connections: u32,
    /// Each client address.
    pub client: Share,
    /// Each tenant, unless it has its own.
    pub tenant: Share,
    /// Tenants with their own shares, by name.
    pub tenants: HashMap<String, Share>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            connections: 4096,
            client: Share {
                streams: 512,
                streams_per_sec: 100,
                burst: 300,
                bytes_per_sec: 0,
            },
            tenant: Share {
                streams: 2048,
                streams_per_sec: 1000,
                burst: 2000,
                bytes_per_sec: 0,
            },
            tenants: HashMap::new(),
        }
    }
}

/// Why a stream was refused by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Limited {
    /// The client has as many streams open as it may.
    #[error("this client has {0} streams open, its limit")]
    ClientStreams(u32),
    /// The client opens streams faster than it may.
    #[error("this client opens streams faster than {0} per second")]
    ClientRate(u32),
    /// The client has as many connections in their handshake as it may.
    #[error("this client has {0} connections in their handshake, its limit")]
    ClientHandshakes(u32),
    /// The tenant has as many streams open as it may.
    #[error("this tenant has {0} streams open, its limit")]
    TenantStreams(u32),
    /// The tenant opens streams faster than it may.
    #[error("this tenant opens streams faster than {0} per second")]
    TenantRate(u32),
}

impl Limited {
    /// The `ferry_refusals_total` reason: `rate` or `concurrency`.
    pub fn kind(&self) -> &'static str {
        match self {
            Limited::ClientRate(_) | Limited::TenantRate(_) => "rate",
            Limited::ClientStreams(_)
            | Limited::ClientHandshakes(_)
            | Limited::TenantStreams(_) => "concurrency",
        }
    }
}

/// A client's key: its IPv4 address, or the /64 its IPv6 address is in
/// (one host commonly holds a whole /64). IPv4-mapped IPv6 is IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    /// The key for `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey(u32::from(v4) as u128),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(u32::from(v4) as u128),
                None => ClientKey((u128::from(v6) & !((1u128 << 64) - 1)) | (1 << 32)),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Who {
    Client(ClientKey),
    Handshake(ClientKey),
    Check(ClientKey),
    Tenant(String),
}

/// The byte buckets of one tenant or of all clients, one per direction.
struct Bytes<L> {
    up: L,
    down: L,
    burst: u32,
}

impl<L> Bytes<L> {
    /// Buckets for `per_sec` bytes a second each way, made by `make`
    /// (keyed or direct); `None` for no limit.
    fn new(per_sec: u32, make: fn(Quota) -> L) -> Option<Arc<Self>> {
        let burst = byte_burst(per_sec);
        quota(per_sec, burst).map(|q| {
            Arc::new(Self {
                up: make(q),
                down: make(q),
                burst,
            })
        })
    }
}

/// The limiters built from one [`Settings`] (rebuilt on a reload).
struct Rules {
    settings: Settings,
    client_rate: Option<Arc<DefaultKeyedRateLimiter<ClientKey>>>,
    client_bytes: Option<Arc<Bytes<DefaultKeyedRateLimiter<ClientKey>>>>,
    tenants: Mutex<HashMap<String, Arc<TenantRules>>>,
}

struct TenantRules {
    share: Share,
    rate: Option<DefaultDirectRateLimiter>,
    bytes: Option<Arc<Bytes<DefaultDirectRateLimiter>>>,
}

fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1")))
}

/// A byte bucket's burst: a tenth of a second at the rate, at least 4 KiB
/// (and never more than the rate): small enough that pacing is smooth,
/// large enough that a chunk rarely needs two turns.
fn byte_burst(per_sec: u32) -> u32 {
    (per_sec / 10).max(4096).min(per_sec).max(1)
}

impl TenantRules {
    fn new(share: Share) -> Self {
        Self {
            share,
            rate: quota(share.streams_per_sec, share.burst).map(RateLimiter::direct),
            bytes: Bytes::new(share.bytes_per_sec, RateLimiter::direct),
        }
    }
}

impl Rules {
    /// Rules under `settings`, keeping `old`'s buckets where their share
    /// is unchanged (a reload does not refill them, nor split a tenant's
    /// byte rate between old and new streams).
    fn carried(settings: Settings, old: &Rules) -> Self {
        let mut new = Rules::new(settings);
        if new.settings.client == old.settings.client {
            new.client_rate = old.client_rate.clone();
            new.client_bytes = old.client_bytes.clone();
        }
        let kept = old.tenants.lock().expect("tenants lock");
        let mut tenants = new.tenants.lock().expect("tenants lock");
        for (name, rules) in kept.iter() {
            if new.share_of(name) == rules.share {
                tenants.insert(name.clone(), rules.clone());
            }
        }
        drop(tenants);
        new
    }

    fn share_of(&self, tenant: &str) -> Share {
        self.settings
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or(self.settings.tenant)
    }

    fn new(settings: Settings) -> Self {
        let c = settings.client;
        Self {
            client_rate: quota(c.streams_per_sec, c.burst).map(|q| Arc::new(RateLimiter::keyed(q))),
            client_bytes: Bytes::new(c.bytes_per_sec, RateLimiter::keyed),
            tenants: Mutex::new(HashMap::new()),
            settings,
        }
    }

    /// A tenant's rules, made when it first opens a stream (anonymous: "").
    fn tenant(&self, name: &str) -> Arc<TenantRules> {
        let mut t = self.tenants.lock().expect("tenants lock");
        if let Some(r) = t.get(name) {
            return r.clone();
        }
        // Only configured tenants and "" get here (credentials come first),
        // so the map is bounded by the config.
        let r = Arc::new(TenantRules::new(self.share_of(name)));
        t.insert(name.to_string(), r.clone());
        r
    }
}

/// An entry's limits and what they count.
pub struct Limits {
    rules: RwLock<Arc<Rules>>,
    listeners: Mutex<Vec<(&'static str, Arc<tokio::sync::Semaphore>, u32)>>,
    open: Counts<Who>,
    admitted: AtomicU64,
    paced_nanos: Arc<AtomicU64>,
}

impl Limits {
    /// Limits under `settings`.
    pub fn new(settings: Settings) -> Self {
        Self {
            rules: RwLock::new(Arc::new(Rules::new(settings))),
            listeners: Mutex::new(Vec::new()),
            open: Counts::default(),
            admitted: AtomicU64::new(0),
            paced_nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Replaces the settings (a reload). Counts of open streams carry over,
    /// and so do the buckets of shares that did not change.
    pub fn configure(&self, settings: Settings) {
        let mut r = self.rules.write().expect("rules lock");
        if r.settings != settings {
            let new = Rules::carried(settings, &r);
            *r = Arc::new(new);
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        self.rules.read().expect("rules lock").settings.clone()
    }

    /// The connection slots of the listener `name` (`connections` of them,
    /// as configured when it starts: a reload does not resize them).
    pub fn listener(&self, name: &'static str) -> Arc<tokio::sync::Semaphore> {
        let cap = self.settings().connections;
        let sem = Arc::new(tokio::sync::Semaphore::new(cap as usize));
        self.listeners
            .lock()
            .expect("listeners lock")
            .push((name, sem.clone(), cap));
        sem
    }

    /// Connections open now on each listener.
    pub fn connections(&self) -> Vec<(&'static str, u32)> {
        self.listeners
            .lock()
            .expect("listeners lock")
            .iter()
            .map(|(n, s, cap)| (*n, cap - s.available_permits() as u32))
            .collect()
    }

    /// Seconds streams have waited for byte budget, in all.
    pub fn paced_seconds(&self) -> f64 {
        self.paced_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().expect("rules lock").clone()
    }

    /// Admits a new connection from the client at `ip`, checked against
    /// the client's limits. Over its streams at once: refused, to be closed
    /// at once. Over its rate: a pass that holds its place while the
    /// connection is told why ([`Pass::refused`]); it is counted among the
    /// client's streams until dropped either way, so the connections one
    /// client keeps busy, refusals included, stay bounded.
    pub fn admit_client(&self, ip: IpAddr) -> Result<Pass, Limited> {
        let rules = self.rules();
        let key = ClientKey::of(ip);
        let share = rules.settings.client;
        // Sweep idle keys now and then, so the buckets hold only recent
        // clients (a flood of addresses costs sweeps, not memory).
        if self.admitted.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            let buckets = rules
                .client_rate
                .iter()
                .map(|r| &**r)
                .chain(rules.client_bytes.iter().flat_map(|b| [&b.up, &b.down]));
            for b in buckets {
                b.retain_recent();
                b.shrink_to_fit();
            }
        }
        let held = self.hold(Who::Client(key), share.streams, Limited::ClientStreams)?;
        let handshake = self.hold(Who::Handshake(key), HANDSHAKES, Limited::ClientHandshakes)?;
        let refused = rules
            .client_rate
            .as_ref()
            .is_some_and(|r| r.check_key(&key).is_err())
            .then_some(Limited::ClientRate(share.streams_per_sec));
        Ok(Pass {
            key,
            refused,
            handshake: Some(handshake),
            held: vec![held],
            pace: Pace {
                client: rules.client_bytes.clone().map(|b| (b, key)),
                tenant: None,
                paced_nanos: self.paced_nanos.clone(),
            },
        })
    }

    /// Admits the pass's stream for `tenant` (empty: anonymous), checked
    /// against the tenant's limits.
    pub fn admit_tenant(&self, pass: &mut Pass, tenant: &str) -> Result<(), Limited> {
        let rules = self.rules();
        let t = rules.tenant(tenant);
        let held = self.hold(
            Who::Tenant(tenant.to_string()),
            t.share.streams,
            Limited::TenantStreams,
        )?;
        if let Some(r) = &t.rate
            && r.check().is_err()
        {
            return Err(Limited::TenantRate(t.share.streams_per_sec));
        }
        pass.held.push(held);
        pass.pace.tenant = t.bytes.clone();
        Ok(())
    }

    /// A place for one of the pass's client's password checks, if it has
    /// fewer than [`CHECKS`] running.
    pub fn hold_check(&self, pass: &Pass) -> Option<impl Drop + Send + 'static> {
        self.hold(Who::Check(pass.key), CHECKS, Limited::ClientHandshakes)
            .ok()
    }

    fn hold(&self, who: Who, max: u32, over: fn(u32) -> Limited) -> Result<Held, Limited> {
        self.open.take(who, max).map_err(|_| over(max))
    }
}

/// One place in a count of open streams.
type Held = Place<Who>;

/// Places open at once, counted by key (streams by client and tenant
/// here, connections by address on the admin listeners); a count at 0
/// is forgotten, so the map holds only keys with something open.
pub struct Counts<K: Eq + std::hash::Hash>(Arc<Mutex<HashMap<K, u32>>>);

impl<K: Eq + std::hash::Hash> Default for Counts<K> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(HashMap::new())))
    }
}

impl<K: Eq + std::hash::Hash + Clone> Counts<K> {
    /// A place for `key` if it has fewer than `max` open (0: no limit),
    /// else `Err` with how many it has; given back when dropped.
    pub fn take(&self, key: K, max: u32) -> Result<Place<K>, u32> {
        let mut open = self.0.lock().expect("counts lock");
        // Never 0 here (a count at 0 is removed), so a refusal leaves the
        // map as it was.
        let n = open.get(&key).copied().unwrap_or(0);
        if max != 0 && n >= max {
            return Err(n);
        }
        open.insert(key.clone(), n + 1);
        Ok(Place {
            open: self.0.clone(),
            key,
        })
    }

    /// How many `key` has open.
    pub fn get(&self, key: &K) -> Option<u32> {
        self.0.lock().expect("counts lock").get(key).copied()
    }

    /// Whether nothing is open.
    pub fn is_empty(&self) -> bool {
        self.0.lock().expect("counts lock").is_empty()
    }
}

/// One place in a [`Counts`], given back when dropped.
pub struct Place<K: Eq + std::hash::Hash> {
    open: Arc<Mutex<HashMap<K, u32>>>,
    key: K,
}

impl<K: Eq + std::hash::Hash> Drop for Place<K> {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("counts lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// An admitted stream: its places in the counts, and its byte pacing.
pub struct Pass {
    key: ClientKey,
    refused: Option<Limited>,
    handshake: Option<Held>,
    held: Vec<Held>,
    pace: Pace,
}

impl Pass {
    /// The handshake is over (credentials checked): the connection no
    /// longer counts among its client's handshakes.
    pub fn handshake_done(&mut self) {
        self.handshake = None;
    }

    /// Set when the stream is to be refused (its client is over its rate):
    /// the connection is only told why.
    pub fn refused(&self) -> Option<Limited> {
        self.refused
    }

    /// The stream's byte pacing.
    pub fn pace(&self) -> &Pace {
        &self.pace
    }
}

/// Which way bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// From the client into the mesh.
    Up,
    /// From the mesh to the client.
    Down,
}

/// Byte pacing of one stream: its client's and its tenant's buckets.
#[derive(Default)]
pub struct Pace {
    client: Option<(Arc<Bytes<DefaultKeyedRateLimiter<ClientKey>>>, ClientKey)>,
    tenant: Option<Arc<Bytes<DefaultDirectRateLimiter>>>,
    paced_nanos: Arc<AtomicU64>,
}

impl Pace {
    /// No pacing.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether anything paces this stream.
    pub fn is_active(&self) -> bool {
        self.client.is_some() || self.tenant.is_some()
    }

    /// Waits until `n` bytes may go `way`.
    pub async fn take(&self, way: Way, n: usize) {
        if !self.is_active() || n == 0 {
            return;
        }
        let start = Instant::now();
        if let Some((b, key)) = &self.client {
            let l = if way == Way::Up { &b.up } else { &b.down };
            for piece in pieces(n, b.burst) {
                // `piece` is at most the burst: the bucket can hold it.
                let _ = l.until_key_n_ready(key, piece).await;
            }
        }
        if let Some(b) = &self.tenant {
            let l = if way == Way::Up { &b.up } else { &b.down };
            for piece in pieces(n, b.burst) {
                let _ = l.until_n_ready(piece).await;
            }
        }
        let waited = start.elapsed().as_nanos() as u64;
        self.paced_nanos.fetch_add(waited, Ordering::Relaxed);
    }
}

/// `n` split into pieces of at most `burst`.
fn pieces(n: usize, burst: u32) -> impl Iterator<Item = NonZeroU32> {
    let burst = burst.max(1) as usize;
    (0..n.div_ceil(burst)).filter_map(move |i| {
        let len = burst.min(n - i * burst);
        NonZeroU32::new(len as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(client: Share, tenant: Share) -> Settings {
        Settings {
            connections: 16,
            client,
            tenant,
            tenants: HashMap::new(),
        }
    }

    const NONE: Share = Share {
        streams: 0,
        streams_per_sec: 0,
        burst: 0,
        bytes_per_sec: 0,
    };

    #[test]
    fn streams_at_once_are_counted_and_given_back() {
        let l = Limits::new(settings(Share { streams: 2, ..NONE }, NONE));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = l.admit_client(ip).unwrap();
        let b = l.admit_client(ip).unwrap();
        assert_eq!(l.admit_client(ip).err(), Some(Limited::ClientStreams(2)));
        // Another client is not affected.
        let other = l.admit_client("10.0.0.2".parse().unwrap()).unwrap();
        drop(a);
        let c = l.admit_client(ip).unwrap();
        drop((b, c, other));
        assert!(l.open.is_empty(), "counts are forgotten at 0");
    }

    /// One client keeps at most HANDSHAKES connections in their handshake
    /// and CHECKS password checks at once, whatever its other limits.
    #[test]
    fn handshakes_and_checks_are_bounded_per_client() {
        let l = Limits::new(settings(NONE, NONE));
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let mut passes: Vec<Pass> = (0..HANDSHAKES)
            .map(|_| l.admit_client(ip).unwrap())
            .collect();
        assert_eq!(
            l.admit_client("2001:db8::2".parse().unwrap()).err(),
            Some(Limited::ClientHandshakes(HANDSHAKES)),
            "the same /64"
        );
        passes[0].handshake_done();
        let last = l.admit_client(ip).unwrap();
        let check = l.hold_check(&last).expect("a first check");
        assert!(l.hold_check(&passes[1]).is_none(), "one check at a time");
        drop(check);
        assert!(l.hold_check(&passes[1]).is_some());
        drop((passes, last));
        assert!(l.open.is_empty());
    }

    /// A reload keeps the buckets of shares it does not change: a client
    /// over its rate stays over it; a changed share starts afresh.
    #[test]
    fn a_reload_keeps_unchanged_buckets() {
        let one = Share {
            streams_per_sec: 1,
            burst: 1,
            ..NONE
        };
        let l = Limits::new(settings(one, NONE));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(l.admit_client(ip).unwrap().refused(), None);
        let mut s = settings(one, Share { streams: 7, ..NONE });
        l.configure(s.clone());
        assert!(l.admit_client(ip).unwrap().refused().is_some(), "kept");
        s.client.burst = 2;
        l.configure(s);
        assert_eq!(l.admit_client(ip).unwrap().refused(), None, "afresh");
    }

    #[test]
    fn new_streams_over_the_rate_are_refused_as_rate() {
        let l = Limits::new(settings(
            Share {
                streams_per_sec: 1,
                burst: 3,
                ..NONE
            },
            NONE,
        ));
        let ip: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.admit_client(ip).unwrap().refused(), None);
        }
        let e = l
            .admit_client("10.0.0.1".parse().unwrap())
            .unwrap()
            .refused()
            .unwrap();
        assert_eq!((e, e.kind()), (Limited::ClientRate(1), "rate"));
        assert_eq!(
            l.admit_client("10.0.0.2".parse().unwrap())
                .unwrap()
                .refused(),
            None
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let k = |s: &str| ClientKey::of(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
        assert_ne!(k("::"), k("0.0.0.0"), "v4 and v6 keys never meet");
    }

    #[test]
    fn tenants_have_their_own_shares_and_overrides() {
        let mut s = settings(NONE, Share { streams: 1, ..NONE });
        s.tenants.insert("big".into(), Share { streams: 3, ..NONE });
        let l = Limits::new(s);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut keep = Vec::new();
        let mut p = l.admit_client(ip).unwrap();
        l.admit_tenant(&mut p, "small").unwrap();
        keep.push(p);
        let mut p = l.admit_client(ip).unwrap();
        assert_eq!(
            l.admit_tenant(&mut p, "small").err(),
            Some(Limited::TenantStreams(1))
        );
        for _ in 0..3 {
            let mut p = l.admit_client(ip).unwrap();
            l.admit_tenant(&mut p, "big").unwrap();
            keep.push(p);
        }
        let open = |t: &str| l.open.get(&Who::Tenant(t.into()));
        assert_eq!(open("big"), Some(3));
        drop(keep);
        assert_eq!(open("big"), None, "counts are forgotten at 0");
    }

    #[test]
    fn pieces_cover_the_count_within_the_burst() {
        let p: Vec<u32> = pieces(10_000, 4096).map(|n| n.get()).collect();
        assert_eq!(p, [4096, 4096, 1808]);
        assert_eq!(pieces(0, 4096).count(), 0);
        assert_eq!(byte_burst(1000), 1000);
        assert_eq!(byte_burst(100_000_000), 10_000_000);
    }

    /// Pacing holds a stream to its rate: 64 KiB at 32 KiB/s takes at
    /// least the 2 s the rate allows, less the one burst that goes at once.
    #[tokio::test]
    async fn bytes_are_paced_to_the_rate() {
        let l = Limits::new(settings(
            NONE,
            Share {
                bytes_per_sec: 32 * 1024,
                ..NONE
            },
        ));
        let mut p = l.admit_client("10.0.0.1".parse().unwrap()).unwrap();
        l.admit_tenant(&mut p, "t").unwrap();
        assert!(p.pace().is_active());
        let start = Instant::now();
        for _ in 0..16 {
            p.pace().take(Way::Up, 4096).await;
        }
        let took = start.elapsed().as_secs_f64();
        // 64 KiB; the first burst (4 KiB) is free: at least 60/32 s.
        assert!(took >= 1.8, "64 KiB at 32 KiB/s took only {took:.2}s");
        assert!(l.paced_seconds() > 1.0);
    }
}
