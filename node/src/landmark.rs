//! A landmark's side of the plausibility check (see [`crate::plausibility`]):
//! a node whose certificate makes it a landmark links to every node it
//! knows that takes links, and every [`REPORT_EVERY`] signs a report of
//! each link's least round trip, checks it as any node would (it is
//! quarantined here too if it refutes) and gossips it. A report is renewed
//! sooner when the least round trip falls by a tenth. Dials are bounded to
//! [`DIALS_PER_ROUND`] a round, one at a time per node, starting each round
//! where the last left off, and a node whose dial failed is tried again
//! only after a backoff (10 s, doubling to 10 min): a node advertising an
//! address that never answers costs a dial now and then, not every round
//! (and holds up dials to that node alone: the switch's dial locks are per
//! peer).

use crate::authority::now_ms;
use crate::control::{Command, Shared};
use crate::switch::Switch;
use ferry_router::NodeId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

/// How often a landmark looks at its links.
pub const ROUND: Duration = Duration::from_secs(2);

/// How often a landmark renews each report (well within
/// [`crate::plausibility::REPORT_LIFETIME`]).
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

/// Links a landmark opens per round.
pub const DIALS_PER_ROUND: usize = 8;

/// Samples a link needs before it is reported.
pub const MIN_SAMPLES: u64 = 3;

/// Runs the landmark's rounds until `shutdown` (returns at once if this
/// node is no landmark).
pub async fn run(
    switch: Arc<Switch>,
    control: mpsc::UnboundedSender<Command>,
    shared: Shared,
    shutdown: CancellationToken,
) {
    let Some((me, cert)) = shared.own.clone() else {
        return;
    };
    let Some(place) = cert.landmark.clone() else {
        return;
    };
    tracing::info!(at = %place, "this node is a landmark: it measures the nodes it links to");
    let mut sent: HashMap<NodeId, (u64, Duration)> = HashMap::new();
    // Dials: when a node may be dialled again, and the backoff after that.
    let mut backoff: HashMap<NodeId, (u64, u64)> = HashMap::new();
    let in_flight = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut start = 0usize;
    let mut tick = tokio::time::interval(ROUND);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = now_ms();
        let mut dials = 0;
        let mut live = switch.directory.live(now);
        live.sort_by_key(|e| e.peer.id);
        start = if live.is_empty() {
            0
        } else {
            start % live.len()
        };
        live.rotate_left(start);
        start += DIALS_PER_ROUND;
        for e in live {
            let id = e.peer.id;
            if id == me || e.peer.addr.is_none() {
                continue;
            }
            let Some(rtt) = switch.link_rtt(&id) else {
                let (next, wait) = backoff.get(&id).copied().unwrap_or((0, 5_000));
                if dials < DIALS_PER_ROUND
                    && now >= next
                    && in_flight.lock().expect("dials lock").insert(id)
                {
                    dials += 1;
                    let wait = (wait * 2).min(600_000);
                    backoff.insert(id, (now + wait, wait));
                    let (sw, in_flight) = (switch.clone(), in_flight.clone());
                    switch.tasks.spawn(async move {
                        match tokio::time::timeout(Duration::from_secs(10), sw.link_to(id)).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => {
                                debug!(peer = %id.short(), error = %format!("{e:#}"), "landmark dial failed")
                            }
                            Err(_) => debug!(peer = %id.short(), "landmark dial timed out"),
                        }
                        in_flight.lock().expect("dials lock").remove(&id);
                    }.in_current_span());
                }
                continue;
            };
            backoff.remove(&id);
            let Some(min) = rtt.min.filter(|_| rtt.samples >= MIN_SAMPLES) else {
                continue;
            };
            let due = sent.get(&id).is_none_or(|(at, last)| {
                now >= at + REPORT_EVERY.as_millis() as u64 || min < *last * 9 / 10
            });
            if !due {
                continue;
            }
            let Some(report) = crate::plausibility::report(me, id, e.peer.jurisdiction, rtt, now)
            else {
                continue;
            };
            let signed = crate::plausibility::sign(&switch.keys, &report);
            crate::control::on_measurement(&shared, &signed, now);
            let _ = control.send(Command::PublishMeasurement(signed));
            sent.insert(id, (now, min));
        }
        sent.retain(|id, _| switch.directory.get(id, now).is_some());
        backoff.retain(|id, _| switch.directory.get(id, now).is_some());
    }
}
