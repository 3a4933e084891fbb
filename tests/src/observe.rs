//! Watching processes as an operator would: `GET /v1/status` from the
//! admin API, the log, and waits until either shows what a test needs,
//! down to a whole mesh having converged.

use crate::mesh::Mesh;
use crate::node::Proc;
use anyhow::{Result, bail};
use serde_json::Value;
use std::time::{Duration, Instant};

/// How long a mesh gets to learn of all its members by gossip.
const CONVERGE: Duration = Duration::from_secs(30);

/// Opens `n` TCP connections to `addr` at once that send nothing, and
/// keeps those that connect within 2 s (past a listener's bound and its
/// backlog, the rest wait for the handshake).
async fn idle_connections(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let tries: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                    .await
            })
        })
        .collect();
    let mut open = Vec::new();
    for t in tries {
        if let Ok(Ok(Ok(s))) = t.await {
            open.push(s);
        }
    }
    open
}

impl Proc {
    /// Opens `n` idle connections to `addr` (one of its listeners) with
    /// [`idle_connections`], and checks it holds at most `limit` (and
    /// `slack`) more descriptors for them; the connections.
    pub async fn flood_within(
        &self,
        addr: std::net::SocketAddr,
        n: usize,
        limit: usize,
        slack: usize,
    ) -> Vec<tokio::net::TcpStream> {
        let before = self.open_fds().unwrap();
        let idle = idle_connections(addr, n).await;
        let held = self.settled_fds().await;
        println!(
            "descriptors: {before} before, {held} with {} connections opened",
            idle.len()
        );
        assert!(
            held <= before + limit + slack,
            "{held} descriptors open, {before} before: the listener took more than {limit}"
        );
        idle
    }

    /// Its open descriptors once they stop changing (sampled every 100 ms,
    /// for at most 2 s): what it holds after a burst of connections.
    pub async fn settled_fds(&self) -> usize {
        let mut held = 0;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.open_fds().unwrap_or(0);
            if now == held {
                break;
            }
            held = now;
        }
        held
    }

    /// The value of one sample (`name` or `name{labels}`) on its metrics
    /// listener, if the series is there.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = ureq::get(&format!("http://{}/metrics", self.metrics))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// `ferry paths --admin … --n N --json` (an entry): how `n` freshly
    /// picked paths spread, as (node id, jurisdiction, paths) per node.
    pub fn paths(&self, n: usize) -> Result<Vec<(String, String, u64)>> {
        let out = crate::node::run_ferry(&[
            "paths",
            "--admin",
            &self.admin.to_string(),
            "--n",
            &n.to_string(),
            "--json",
        ])?;
        let v: Value = serde_json::from_str(&out)?;
        Ok(v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["id"].as_str().unwrap_or("").to_string(),
                    n["jurisdiction"].as_str().unwrap_or("").to_string(),
                    n["paths"].as_u64().unwrap_or(0),
                )
            })
            .collect())
    }

    /// `GET /v1/status` from its admin API.
    pub fn status(&self) -> Result<Value> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut r = agent
            .get(&format!("http://{}/v1/status", self.admin))
            .call()?;
        Ok(r.body_mut().read_json()?)
    }

    /// Polls its status until `pred` holds, up to `within`; returns the
    /// status that satisfied it.
    pub fn wait_status(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let last = self.status();
            if let Ok(v) = &last
                && pred(v)
            {
                return Ok(v.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} never reached: {what}; last status: {last:?}",
                    self.jurisdiction
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls its status until its state is `state` (`active`, `draining`
    /// or `exited`), up to `within`; returns that status.
    pub fn wait_state(&self, state: &str, within: Duration) -> Result<Value> {
        self.wait_status(&format!("state {state}"), within, |v| v["state"] == state)
    }

    /// Polls its status until it lists each of `nodes` as an active peer,
    /// up to `within`; returns the status that did.
    pub fn wait_knows<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a Proc>,
        within: Duration,
    ) -> Result<Value> {
        let want: Vec<&Proc> = nodes.into_iter().collect();
        let names: Vec<&str> = want.iter().map(|p| p.jurisdiction.as_str()).collect();
        let what = format!("knows {} as active peers", names.join(", "));
        self.wait_status(&what, within, |v| {
            want.iter()
                .all(|p| peer(v, &p.id).is_some_and(|x| x["state"] == "active"))
        })
    }

    /// Waits until its log contains `needle`, up to `within`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} never logged {needle:?}; log:\n{log}",
                    self.jurisdiction
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An entry's own circuits in its status: (path by jurisdiction, streams, built at).
pub fn entry_circuits(v: &Value) -> Vec<(Vec<String>, u64, u64)> {
    v["origin"]["circuits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let path = c["path"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            (
                path,
                c["streams"].as_u64().unwrap_or(0),
                c["built_at_ms"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The peer with node id `id` (hex) in a status, if it lists one.
pub fn peer<'a>(status: &'a Value, id: &str) -> Option<&'a Value> {
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"].as_str() == Some(id))
}

impl Mesh {
    /// Waits until the entry lists every running node as an active peer
    /// (30 s at most); returns the entry's status then.
    pub fn wait_entry_knows_all(&self) -> Result<Value> {
        self.entry.wait_knows(&self.nodes, CONVERGE)
    }

    /// Waits until every running process, the entry too, lists every other
    /// one with its jurisdiction (30 s at most for each).
    pub fn wait_converged(&self) -> Result<()> {
        let all = self.all();
        for p in &all {
            let want: Vec<(&str, &str)> = all
                .iter()
                .filter(|o| o.id != p.id)
                .map(|o| (o.id.as_str(), o.jurisdiction.as_str()))
                .collect();
            p.wait_status("all peers known", CONVERGE, |v| {
                want.iter()
                    .all(|(id, j)| peer(v, id).is_some_and(|x| x["jurisdiction"] == *j))
            })?;
        }
        Ok(())
    }
}
