//! The node's own operating state: active → draining → exited.
//!
//! Two things drive it, and the stricter wins:
//! - rulings in force for the node's jurisdiction that cover all traffic
//!   (rulings scoped to classes or tenants leave the node active; entries
//!   route that traffic around it);
//! - its operator: `ferry drain --exit-by TIME` or `POST /v1/drain`
//!   (persisted in the store's `drain` column family, so a draining node
//!   that restarts stays draining), or SIGTERM (drains for
//!   `drain.grace_secs`, not persisted: a restarted process serves again).
//!
//! [`NodeStateCtl::tick`] re-evaluates the state (the node runs it every
//! 200 ms) and reports transitions; the switch acts on them (notices to
//! circuit owners, refusing new circuits, destroying what is left at the
//! exit date) and the control plane re-advertises at once.

use crate::authority::fmt_time;
use crate::rulings::Rulings;
use crate::store::{Store, cf};
use anyhow::Result;
use ferry_router::{Jurisdiction, NodeState, Status, Time, TrafficScope};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

const OPERATOR_KEY: &[u8] = b"operator";

/// An operator's drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorDrain {
    /// The exit date, ms since the epoch.
    pub until_ms: u64,
    /// Why (shown in status and logs).
    pub reason: String,
    /// Whether it is in the store (SIGTERM drains are not).
    #[serde(skip)]
    pub persisted: bool,
}

/// The state now and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    /// The state.
    pub state: NodeState,
    /// Why it is not active (empty when active).
    pub reason: String,
    /// A ruling (not the operator) made it leave.
    pub by_ruling: bool,
}

impl Current {
    /// `active`, `draining` or `exited`.
    pub fn name(&self) -> &'static str {
        match self.state {
            NodeState::Active => "active",
            NodeState::Draining { .. } => "draining",
            NodeState::Exited => "exited",
        }
    }
}

/// Owns the node's state.
pub struct NodeStateCtl {
    jurisdiction: Jurisdiction,
    rulings: Arc<Rulings>,
    store: Option<Arc<Store>>,
    operator: Mutex<Option<OperatorDrain>>,
    current: Mutex<Current>,
}

impl NodeStateCtl {
    /// Loads the operator's drain from the store, if any.
    pub fn load(
        jurisdiction: Jurisdiction,
        rulings: Arc<Rulings>,
        store: Option<Arc<Store>>,
    ) -> Result<Self> {
        let operator = match &store {
            Some(s) => s
                .get(cf::DRAIN, OPERATOR_KEY)?
                .map(|b| serde_json::from_slice::<OperatorDrain>(&b))
                .transpose()?
                .map(|mut d| {
                    d.persisted = true;
                    d
                }),
            None => None,
        };
        let ctl = Self {
            jurisdiction,
            rulings,
            store,
            operator: Mutex::new(operator),
            current: Mutex::new(Current {
                state: NodeState::Active,
                reason: String::new(),
                by_ruling: false,
            }),
        };
        let now = crate::authority::now_ms();
        *ctl.current.lock().expect("state lock") = ctl.evaluate(now);
        Ok(ctl)
    }

    /// The state as of the last tick.
    pub fn current(&self) -> Current {
        self.current.lock().expect("state lock").clone()
    }

    /// The operator's drain, if one is set.
    pub fn operator(&self) -> Option<OperatorDrain> {
        self.operator.lock().expect("operator lock").clone()
    }

    /// The state at `now`.
    pub fn evaluate(&self, now: u64) -> Current {
        let set = self.rulings.snapshot();
        let mut cur = Current {
            state: NodeState::Active,
            reason: String::new(),
            by_ruling: false,
        };
        match set.status(Some(self.jurisdiction), &TrafficScope::default(), Time(now)) {
            (Status::Allowed, _) => {}
            (s, r) => {
                let (id, version, why, exit_by) = r
                    .map(|r| (r.id.clone(), r.version, r.reason.clone(), r.exit_by))
                    .unwrap_or_default();
                cur.state = match s {
                    Status::Draining { until } => NodeState::Draining { until },
                    _ => NodeState::Exited,
                };
                cur.by_ruling = true;
                cur.reason = format!(
                    "ruling {id} v{version} blocks {} (exit by {}){}",
                    self.jurisdiction,
                    fmt_time(exit_by.0),
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(": {why}")
                    }
                );
            }
        }
        if let Some(d) = self.operator() {
            let st = if now < d.until_ms {
                NodeState::Draining {
                    until: Time(d.until_ms),
                }
            } else {
                NodeState::Exited
            };
            let stricter = cur.state.stricter(st);
            if stricter != cur.state {
                cur.state = stricter;
                cur.by_ruling = false;
                cur.reason = format!(
                    "operator drain (exit by {}){}",
                    fmt_time(d.until_ms),
                    if d.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", d.reason)
                    }
                );
            }
        }
        cur
    }

    /// Re-evaluates; returns the new state if it changed.
    pub fn tick(&self, now: u64) -> Option<Current> {
        let next = self.evaluate(now);
        let mut cur = self.current.lock().expect("state lock");
        if *cur == next {
            return None;
        }
        *cur = next.clone();
        Some(next)
    }

    /// Starts an operator drain to `until_ms`; `persist` keeps it across
    /// restarts. An earlier drain already set is kept if it is stricter.
    pub fn drain(&self, until_ms: u64, reason: &str, persist: bool) -> Result<OperatorDrain> {
        let mut op = self.operator.lock().expect("operator lock");
        if let Some(d) = op.as_ref()
            && d.until_ms <= until_ms
            && (d.persisted || !persist)
        {
            return Ok(d.clone());
        }
        let d = OperatorDrain {
            until_ms,
            reason: reason.to_string(),
            persisted: persist && self.store.is_some(),
        };
        if d.persisted
            && let Some(s) = &self.store
        {
            s.put(cf::DRAIN, OPERATOR_KEY, &serde_json::to_vec(&d)?)?;
        }
        *op = Some(d.clone());
        Ok(d)
    }

    /// Cancels the operator's drain; whether there was one.
    pub fn undrain(&self) -> Result<bool> {
        let had = self
            .operator
            .lock()
            .expect("operator lock")
            .take()
            .is_some();
        if let Some(s) = &self.store {
            s.delete(cf::DRAIN, OPERATOR_KEY)?;
        }
        Ok(had)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_drain_survives_a_restart_and_sigterm_drain_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let j = ferry_router::Jurisdiction::parse("DE").unwrap();
        let rulings =
            || Arc::new(Rulings::load(crate::authority::Authority::default(), None).unwrap());
        let now = crate::authority::now_ms();
        {
            let store = Arc::new(Store::open(dir.path()).unwrap());
            let ctl = NodeStateCtl::load(j, rulings(), Some(store)).unwrap();
            assert_eq!(ctl.current().state, NodeState::Active);
            ctl.drain(now + 60_000, "maintenance", true).unwrap();
            let c = ctl.tick(now).unwrap();
            assert_eq!(
                c.state,
                NodeState::Draining {
                    until: Time(now + 60_000)
                }
            );
            assert!(c.reason.contains("maintenance"), "{}", c.reason);
            assert_eq!(ctl.tick(now + 60_000).unwrap().state, NodeState::Exited);
        }
        {
            let store = Arc::new(Store::open(dir.path()).unwrap());
            let ctl = NodeStateCtl::load(j, rulings(), Some(store)).unwrap();
            assert_eq!(
                ctl.evaluate(now).state,
                NodeState::Draining {
                    until: Time(now + 60_000)
                }
            );
            assert!(ctl.undrain().unwrap());
            assert_eq!(ctl.evaluate(now).state, NodeState::Active);
            ctl.drain(now + 5_000, "SIGTERM", false).unwrap();
            assert_eq!(ctl.evaluate(now).name(), "draining");
        }
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let ctl = NodeStateCtl::load(j, rulings(), Some(store)).unwrap();
        assert_eq!(ctl.evaluate(now).state, NodeState::Active);
    }
}
