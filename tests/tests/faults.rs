//! Streams that survive faults, with real processes: a relay killed
//! (`kill -9`) or cut off (frozen with SIGSTOP: its sockets stay open and
//! silent, as behind a partition) under 20 long checksummed streams, and a
//! rolling crash-restart of every relay. The entry moves each stream of a
//! lost circuit onto a new circuit to the same exit, which kept it parked:
//! every byte arrives, once, both ways. (Before, a relay's crash reset
//! every stream on its circuits.)

use ferry_tests::{
    Mesh, Options, Proc, Spec, Uploads, entry_circuits, finish_transfers, pattern_server_paced,
    spawn_transfer,
};
use std::net::SocketAddr;
use std::time::Duration;

const MIB: usize = 1024 * 1024;
/// Each way, per stream: 8 s at the pace below.
const LEN: usize = 8 * MIB;
const RATE: u64 = MIB as u64;
const STREAMS: u64 = 20;

/// Two relays (CH, DE) and an exit (CA); circuits of two hops.
fn mesh() -> Mesh {
    Mesh::start(
        &[
            Spec::new("CA", "exit"),
            Spec::new("CH", "relay"),
            Spec::new("DE", "relay"),
        ],
        &Options {
            hops: 2,
            ..Options::default()
        },
    )
    .unwrap()
}

/// 20 long paced transfers through the entry.
struct Load {
    target: SocketAddr,
    uploads: Uploads,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    seeds: Vec<u64>,
}

impl Load {
    async fn start(mesh: &Mesh) -> Self {
        let (target, uploads) = pattern_server_paced(Some(RATE)).await.unwrap();
        let seeds: Vec<u64> = (1..=STREAMS).collect();
        let tasks = seeds
            .iter()
            .map(|s| spawn_transfer(mesh.socks(), target, *s, LEN, Some(RATE), None))
            .collect();
        Self {
            target,
            uploads,
            tasks,
            seeds,
        }
    }

    /// Every transfer finished, every byte checked both ways (or the
    /// nodes' logs, to see why not).
    async fn finish(mut self, mesh: &Mesh) {
        let _ = self.target;
        if let Err(e) = finish_transfers(self.tasks, &mut self.uploads, &self.seeds, LEN).await {
            let logs: Vec<String> = std::iter::once(&mesh.entry)
                .chain(&mesh.nodes)
                .map(|n| format!("--- {}\n{}", n.jurisdiction, n.log()))
                .collect();
            panic!("{e:#}\n{}", logs.join("\n"));
        }
    }
}

/// The relay the entry's circuit carrying all the streams goes through,
/// once all `STREAMS` are on it.
fn carrying_relay(mesh: &Mesh) -> String {
    let v = mesh
        .entry
        .wait_status("the streams on one circuit", Duration::from_secs(30), |v| {
            entry_circuits(v).iter().any(|(_, n, _)| *n == STREAMS)
        })
        .unwrap();
    entry_circuits(&v)
        .into_iter()
        .find(|(_, n, _)| *n == STREAMS)
        .map(|(p, ..)| p[0].clone())
        .unwrap()
}

fn node<'a>(mesh: &'a mut Mesh, jurisdiction: &str) -> &'a mut Proc {
    mesh.nodes
        .iter_mut()
        .find(|n| n.jurisdiction == jurisdiction)
        .unwrap()
}

fn rescued(mesh: &Mesh, result: &str) -> f64 {
    mesh.entry
        .metric(&format!(
            "ferry_streams_rescued_total{{result=\"{result}\"}}"
        ))
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_under_twenty_streams_loses_no_byte() {
    let mut mesh = mesh();
    let load = Load::start(&mesh).await;
    let relay = carrying_relay(&mesh);
    tokio::time::sleep(Duration::from_secs(1)).await;
    node(&mut mesh, &relay).kill9().unwrap();
    println!("killed {relay} under {STREAMS} streams");
    load.finish(&mesh).await;
    assert_eq!(rescued(&mesh, "moved"), STREAMS as f64);
    assert_eq!(rescued(&mesh, "lost"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_for_five_seconds_loses_no_byte() {
    let mut mesh = mesh();
    let load = Load::start(&mesh).await;
    let relay = carrying_relay(&mesh);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = node(&mut mesh, &relay);
    n.signal("STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;
    n.signal("CONT");
    println!("{relay} cut off for 5 s under {STREAMS} streams");
    load.finish(&mesh).await;
    assert_eq!(rescued(&mesh, "moved"), STREAMS as f64);
    assert!(node(&mut mesh, &relay).alive(), "the relay carries on");
}

/// Every relay crashes and restarts in turn under load; the streams go
/// from one to the other and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_crash_restart_of_every_relay_loses_no_byte() {
    let mut mesh = mesh();
    let load = Load::start(&mesh).await;
    let first = carrying_relay(&mesh);
    let second = if first == "CH" { "DE" } else { "CH" };
    tokio::time::sleep(Duration::from_secs(1)).await;
    node(&mut mesh, &first).kill9_and_restart().unwrap();
    // The streams moved to the other relay; now it goes down too.
    let now = carrying_relay(&mesh);
    assert_eq!(now, second, "the streams moved to the other relay");
    node(&mut mesh, second).kill9_and_restart().unwrap();
    load.finish(&mesh).await;
    assert_eq!(rescued(&mesh, "moved"), 2.0 * STREAMS as f64);
    assert_eq!(rescued(&mesh, "lost"), 0.0);
}
