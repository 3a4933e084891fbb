//! Running a node: bind, serve links and the SOCKS5 entry, stop on a signal.

use crate::admin::{self, AdminState};
use crate::cert::OwnCert;
use crate::config::NodeConfig;
use crate::control::{self, Command, GossipCounters};
use crate::directory::Directory;
use crate::identity::Keys;
use crate::link;
use crate::metrics::Metrics;
use crate::origin::Origin;
use crate::rulings::{Revocations, Rulings};
use crate::socks;
use crate::state::NodeStateCtl;
use crate::store::{Store, cf};
use crate::switch::{Parts, Switch};
use anyhow::{Context, Result};
use ferry_proto::pb::DestroyReason;
use ferry_router::NodeState;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

/// Bound listeners for a node. Binding happens before `run`, so a caller
/// (a test, the demo) can bind port 0 and learn the address first.
#[derive(Default)]
pub struct Listeners {
    /// Data-plane links.
    pub link: Option<TcpListener>,
    /// SOCKS5 entry.
    pub socks: Option<TcpListener>,
    /// HTTP CONNECT entry.
    pub http: Option<TcpListener>,
    /// Admin API.
    pub admin: Option<TcpListener>,
    /// Prometheus metrics.
    pub metrics: Option<TcpListener>,
}

/// Binds a listener, naming the address and the config key on failure.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} on {addr} (is another process using it?)"))
}

impl Listeners {
    /// Binds what the config asks for. `links` false skips the link listener
    /// (for `ferry connect`).
    pub async fn bind_config(cfg: &NodeConfig, links: bool) -> Result<Self> {
        let link = match (links, cfg.link_listen) {
            (true, Some(a)) => Some(bind(a, "listen.link").await?),
            _ => None,
        };
        let socks = match cfg.socks_listen {
            Some(a) if cfg.roles.entry => Some(bind(a, "listen.socks").await?),
            _ => None,
        };
        let http = match cfg.http_listen {
            Some(a) if cfg.roles.entry => Some(bind(a, "listen.http").await?),
            _ => None,
        };
        let admin = match cfg.admin_listen {
            Some(a) => Some(bind(a, "admin.listen").await?),
            None => None,
        };
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(bind(a, "metrics.listen").await?),
            None => None,
        };
        Ok(Self {
            link,
            socks,
            http,
            admin,
            metrics,
        })
    }
}

/// A running node's handle.
pub struct Running {
    /// The switch (for status and tests).
    pub switch: Arc<Switch>,
    /// The origin, if the node is an entry.
    pub origin: Option<Arc<Origin>>,
}

/// Starts a node with a static mesh only: no store, no control plane.
pub fn start(
    cfg: NodeConfig,
    keys: Keys,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Running {
    let directory = Arc::new(Directory::new(
        cfg.authority.clone(),
        cfg.advert_ttl,
        &cfg.peers,
    ));
    let rulings =
        Arc::new(Rulings::load(cfg.authority.clone(), None).expect("rulings without a store load"));
    let state = Arc::new(
        NodeStateCtl::load(cfg.jurisdiction, rulings.clone(), None)
            .expect("state without a store loads"),
    );
    let audit = Arc::new(crate::audit::Audit::new(None, cfg.audit));
    let switch = Switch::new(Parts {
        keys: Arc::new(keys),
        cfg: Arc::new(cfg),
        directory,
        rulings,
        state,
        certificate: None,
        metrics: Arc::new(Metrics::new()),
        shutdown: shutdown.clone(),
        audit,
    });
    start_data_plane(switch, listeners, shutdown, None)
}

/// Starts a full node: the control plane, the admin API and the data plane,
/// over its store. Open the store (`Store::open(&cfg.data_dir)`) before
/// binding listeners, so a second process on the same data dir is told so
/// before anything else.
pub fn start_full(
    mut cfg: NodeConfig,
    keys: Keys,
    store: Arc<Store>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<Running> {
    store.put(cf::META, b"node_id", &keys.node_id().0)?;
    let directory = Arc::new(Directory::new(
        cfg.authority.clone(),
        cfg.advert_ttl,
        &cfg.peers,
    ));
    let now = crate::authority::now_ms();
    let me = keys.node_id();
    // Revocations first, so no revoked node's stored advert comes back.
    let revocations = Arc::new(Revocations::load(
        cfg.authority.clone(),
        Some(store.clone()),
    )?);
    for id in revocations.revoked() {
        directory.revoke(id);
    }
    let certificate = OwnCert::load(&cfg.key_dir, &cfg.authority, &me)?;
    match certificate.as_ref().map(|c| &c.verified) {
        Some(Ok(c)) => {
            info!(
                jurisdiction = %c.jurisdiction,
                roles = %c.roles,
                capacity_max_mbps = c.capacity_max_mbps,
                not_after = %crate::authority::fmt_time(c.not_after_ms),
                "certificate loaded"
            );
            // The node takes on only the roles it was admitted for (peers
            // select it for no others anyway).
            let granted = crate::cert::roles_of(
                crate::cert::roles_bits(cfg.roles) & crate::cert::roles_bits(c.roles),
            );
            if granted != cfg.roles {
                warn!(configured = %cfg.roles, certified = %c.roles, "roles the certificate does not grant are off");
                cfg.roles = granted;
            }
            if c.jurisdiction != cfg.jurisdiction {
                warn!(configured = %cfg.jurisdiction, certified = %c.jurisdiction, "the certificate names another jurisdiction; this node goes by it, as its peers do");
                cfg.jurisdiction = c.jurisdiction;
            }
        }
        Some(Err(e)) => {
            warn!(reason = %e, "this node's certificate is refused under its own [authority]; peers will refuse its adverts")
        }
        None if cfg.needs_certificate() => warn!(
            "no certificate ({}): peers will refuse this node's adverts until the authority admits it",
            cfg.key_dir.join(crate::cert::CERT_FILE).display()
        ),
        None => {}
    }
    let mut recovered = 0;
    for (_, bytes) in store.all(cf::PEERS)? {
        if directory
            .accept(&bytes, &me, now)
            .is_ok_and(|e| e.is_some())
        {
            recovered += 1;
        }
    }
    let rulings = Arc::new(Rulings::load(cfg.authority.clone(), Some(store.clone()))?);
    let state = Arc::new(NodeStateCtl::load(
        cfg.jurisdiction,
        rulings.clone(),
        Some(store.clone()),
    )?);
    let held_rulings = rulings.snapshot().iter().count();
    let held_state = state.current().name();
    // A fresh store recovers nothing: not news.
    if recovered > 0 || held_rulings > 0 || held_state != "active" {
        tracing::info!(
            peers = recovered,
            rulings = held_rulings,
            state = held_state,
            "state recovered from the store"
        );
    } else {
        tracing::debug!("a fresh store: nothing to recover");
    }
    let counters = Arc::new(GossipCounters::default());
    let keys = Arc::new(keys);
    let cfg = Arc::new(cfg);
    let link_addr = cfg
        .link_advertise
        .or_else(|| listeners.link.as_ref().and_then(|l| l.local_addr().ok()));
    let switch = Switch::new(Parts {
        keys: keys.clone(),
        cfg: cfg.clone(),
        directory: directory.clone(),
        rulings: rulings.clone(),
        state,
        certificate,
        metrics: Arc::new(Metrics::new()),
        shutdown: shutdown.clone(),
        audit: Arc::new(crate::audit::Audit::new(Some(store.clone()), cfg.audit)),
    });
    switch.tasks.spawn(
        switch
            .audit
            .clone()
            .run_sweeps(shutdown.clone())
            .in_current_span(),
    );
    switch.tasks.spawn(
        switch
            .audit
            .clone()
            .run_writer(shutdown.clone())
            .in_current_span(),
    );
    let signer = control::advert_signer(keys.clone(), cfg.clone(), link_addr, switch.clone());
    let settings = control::Settings {
        listen: cfg.mesh_listen,
        bootstrap: cfg.bootstrap.clone(),
        advert_ttl: cfg.advert_ttl,
    };
    let shared = control::Shared {
        directory,
        rulings: rulings.clone(),
        revocations: revocations.clone(),
        counters: counters.clone(),
        store: store.clone(),
        quarantine: switch.quarantine.clone(),
        own: switch
            .certificate
            .as_ref()
            .and_then(|c| c.verified.clone().ok())
            .map(|c| (keys.node_id(), c)),
    };
    let landmark_shared = shared.clone();
    let control = control::start(&keys, settings, shared, signer, shutdown.clone())?;
    switch.tasks.spawn(
        crate::landmark::run(
            switch.clone(),
            control.clone(),
            landmark_shared,
            shutdown.clone(),
        )
        .in_current_span(),
    );
    let running = start_data_plane(
        switch.clone(),
        Listeners {
            link: listeners.link,
            socks: listeners.socks,
            http: listeners.http,
            admin: None,
            metrics: None,
        },
        shutdown.clone(),
        Some(control.clone()),
    );
    let state = Arc::new(AdminState {
        switch,
        rulings,
        revocations,
        store,
        counters,
        control,
        origin: running.origin.clone(),
    });
    if let Some(l) = listeners.admin {
        tokio::spawn(admin::serve(l, state.clone(), shutdown.clone()).in_current_span());
    }
    if let Some(l) = listeners.metrics {
        tokio::spawn(admin::serve_metrics(l, state, shutdown).in_current_span());
    }
    Ok(running)
}

fn start_data_plane(
    switch: Arc<Switch>,
    listeners: Listeners,
    shutdown: CancellationToken,
    control: Option<mpsc::UnboundedSender<Command>>,
) -> Running {
    if let Some(l) = listeners.link {
        switch
            .tasks
            .spawn(accept_links(l, switch.clone(), shutdown.clone()).in_current_span());
    }
    if let Some(exit) = switch.exit() {
        switch
            .tasks
            .spawn(exit.sweep_parked(shutdown.clone()).in_current_span());
    }
    switch
        .tasks
        .spawn(switch.clone().sweep_idle().in_current_span());
    let origin = (listeners.socks.is_some() || listeners.http.is_some()).then(|| {
        let origin = Origin::new(switch.clone());
        let entry_listeners =
            u32::from(listeners.socks.is_some()) + u32::from(listeners.http.is_some());
        if entry_listeners > 0 {
            crate::entry::raise_fd_limit(entry_listeners, origin.limits().settings().connections);
        }
        if let Some(l) = listeners.socks {
            switch
                .tasks
                .spawn(socks::serve(l, origin.clone(), shutdown.clone()).in_current_span());
        }
        if let Some(l) = listeners.http {
            switch.tasks.spawn(
                crate::http_proxy::serve(l, origin.clone(), shutdown.clone()).in_current_span(),
            );
        }
        switch.tasks.spawn(
            origin
                .clone()
                .run_drains(shutdown.clone())
                .in_current_span(),
        );
        switch
            .tasks
            .spawn(origin.clone().run_idle(shutdown.clone()).in_current_span());
        switch.tasks.spawn(
            origin
                .clone()
                .run_rescues(shutdown.clone())
                .in_current_span(),
        );
        origin
    });
    switch
        .tasks
        .spawn(watch_state(switch.clone(), control, shutdown).in_current_span());
    Running { switch, origin }
}

/// Re-evaluates the node's state every 200 ms and acts on changes:
/// draining → notices to circuit owners (new circuits are refused by the
/// switch); exited → every circuit destroyed; any change → a fresh advert.
async fn watch_state(
    switch: Arc<Switch>,
    control: Option<mpsc::UnboundedSender<Command>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let st = &switch.state;
    let first = st.current();
    if first.state != NodeState::Active {
        info!(state = first.name(), reason = %first.reason, "node is leaving the mesh");
    }
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = crate::authority::now_ms();
        if let Some(cur) = st.tick(now) {
            match cur.state {
                NodeState::Active => info!("node is active again"),
                NodeState::Draining { until } => {
                    info!(
                        until = %crate::authority::fmt_time(until.0),
                        reason = %cur.reason,
                        circuits = switch.circuit_count(),
                        "node draining: no new circuits; owners are moving theirs"
                    );
                    switch.notify_drain(until.0, &cur.reason);
                }
                NodeState::Exited => {
                    let n = switch.destroy_all(DestroyReason::Exited);
                    info!(circuits_closed = n, reason = %cur.reason, "node exited: it carries nothing");
                }
            }
            if let Some(c) = &control {
                let _ = c.send(Command::Advertise);
            }
        } else if st.current().state == NodeState::Exited && switch.circuit_count() > 0 {
            switch.destroy_all(DestroyReason::Exited);
        }
        switch.close_revoked();
        match switch.keys.noise.expire(now) {
            Ok(true) => {
                info!("the retired Noise key's grace is over: erased");
                if let Some(c) = &control {
                    let _ = c.send(Command::Advertise);
                }
            }
            Ok(false) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "could not erase the retired Noise key"),
        }
    }
}

/// How long a stop waits for the data plane's tasks to end.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Running {
    /// Tears everything down (after `shutdown` was cancelled), and waits
    /// up to five seconds for every data-plane task to end.
    pub async fn stop(&self) {
        if let Some(o) = &self.origin {
            o.close_all().await;
        }
        self.switch.shutdown_all();
        let tasks = &self.switch.tasks;
        tasks.close();
        if tokio::time::timeout(STOP_WAIT, tasks.wait()).await.is_err() {
            warn!(
                left = tasks.len(),
                "data-plane tasks still running after {}s; stopping anyway",
                STOP_WAIT.as_secs()
            );
        }
    }
}

/// Accepts links: at most `[limits] link_handshakes` in their handshake at
/// once (the next connection waits in the kernel's backlog until one
/// ends), and none past `[limits] links` (closed at once, counted as
/// `capacity`).
async fn accept_links(listener: TcpListener, switch: Arc<Switch>, shutdown: CancellationToken) {
    let mut n = 0u64;
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        switch.cfg.carry.link_handshakes as usize,
    ));
    loop {
        let permit = tokio::select! {
            p = handshakes.clone().acquire_owned() => p.expect("never closed"),
            _ = shutdown.cancelled() => return,
        };
        let sock = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    crate::warn_limited!(switch.warned, "link accept failed", error = %e, "link accept failed");
                    // Out of file descriptors, say: let some close.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        n += 1;
        if switch.link_total() >= switch.cfg.carry.links as usize {
            switch
                .refused_link("link refused: this node holds its limit of links ([limits] links)");
            continue;
        }
        let sw = switch.clone();
        let warned = switch.warned.clone();
        let span = tracing::info_span!("inbound", n);
        switch.tasks.spawn(
            async move {
                let r = link::accept(sw, sock).await;
                drop(permit);
                if let Err(e) = r {
                    let kind = e.downcast_ref::<link::Refused>().map_or("other", |r| r.kind);
                    crate::warn_limited!(warned, ("link refused", kind), reason = %format!("{e:#}"), "link refused");
                }
            }
            .instrument(span),
        );
    }
}
