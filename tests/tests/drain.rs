//! Jurisdiction-aware routing and graceful drains, with real processes:
//! rulings signed with the CLI and published through the admin API, gossip
//! carrying them, long checksummed streams moving off a leaving relay, exits
//! in a blocked jurisdiction closing at the deadline, amended and lifted
//! rulings, SIGTERM, and per-connection constraints in SOCKS5 auth.

use ferry_node::authority::now_ms;
use ferry_tests::rulings::{self, Ruling, sign};
use ferry_tests::{
    CA_PK_DE, Mesh, Options, Proc, Spec, Uploads, entry_circuits, finish_transfers,
    pattern_server_paced, pattern_transfer, read_until_end, run_ferry, socks_connect_as,
    spawn_transfer,
};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const MIB: usize = 1024 * 1024;

/// Blocks PK for all traffic from `from` to `exit` (version 1), through
/// the first node's admin API.
fn block_pk(dir: &Path, key: &Path, mesh: &Mesh, from: u64, exit: u64) {
    publish(
        &mesh.nodes[0],
        &sign(dir, key, &Ruling::block("PK", from, exit)),
    );
}

fn publish(node: &Proc, file: &Path) {
    rulings::publish(node, file).unwrap();
}

fn authority(dir: &Path) -> (PathBuf, String) {
    rulings::authority(dir, "authority")
}

/// A circuit's path in a status, by jurisdiction.
fn path_of(circuit: &Value) -> Vec<&str> {
    circuit["path"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_str())
        .collect()
}

fn gossip_opts(public: String, drain_secs: (u64, u64, u64), hold: Vec<usize>) -> Options {
    Options {
        drain_secs,
        hold,
        ..Options::gossip(public)
    }
}

/// Long paced transfers (50 MiB each way) to a pattern server.
struct LongStreams {
    /// The pattern server.
    target: SocketAddr,
    uploads: Uploads,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    seeds: Vec<u64>,
}

impl LongStreams {
    /// Waits for the transfers and checks every byte both ways.
    async fn finish(mut self) {
        finish_transfers(self.tasks, &mut self.uploads, &self.seeds, LONG)
            .await
            .unwrap();
    }
}

const LONG: usize = 50 * MIB;

/// A gossip mesh where `first` is the only relay while `seeds` start long
/// streams through it; then `second` joins, so the streams have somewhere
/// to move.
async fn long_streams(
    public: String,
    drain_secs: (u64, u64, u64),
    first: &'static str,
    second: &'static str,
    seeds: &[u64],
) -> (Mesh, LongStreams) {
    let specs = [
        Spec::new("CA", "exit"),
        Spec::new(first, "relay"),
        Spec::new(second, "relay"),
    ];
    let mut mesh = Mesh::start(&specs, &gossip_opts(public, drain_secs, vec![2])).unwrap();
    // The exit and the first relay.
    mesh.wait_entry_knows_all().unwrap();
    let rate = Some(4 * MIB as u64);
    let (target, uploads) = pattern_server_paced(rate).await.unwrap();
    let tasks: Vec<_> = seeds
        .iter()
        .map(|s| spawn_transfer(mesh.socks(), target, *s, LONG, rate, None))
        .collect();
    mesh.entry
        .wait_status(
            "streams run through the relay",
            Duration::from_secs(20),
            |v| {
                entry_circuits(v)
                    .iter()
                    .any(|(p, n, _)| p == &[first, "CA"] && *n == seeds.len() as u64)
            },
        )
        .unwrap();
    mesh.start_held().unwrap();
    // The second relay too.
    mesh.wait_entry_knows_all().unwrap();
    let streams = LongStreams {
        target,
        uploads,
        tasks,
        seeds: seeds.to_vec(),
    };
    (mesh, streams)
}

/// A checked transfer of 1 MiB each way through the entry (with SOCKS5
/// credentials `auth`, if given), 60 s at most.
async fn short_transfer(mesh: &Mesh, target: SocketAddr, seed: u64, auth: Option<(&str, &str)>) {
    let t = pattern_transfer(mesh.socks(), target, seed, MIB, None, auth);
    tokio::time::timeout(Duration::from_secs(60), t)
        .await
        .expect("the transfer finished in time")
        .unwrap();
}

/// Waits until `t` (ms since the epoch).
async fn until(t: u64) {
    let now = now_ms();
    if t > now {
        tokio::time::sleep(Duration::from_millis(t - now)).await;
    }
}

/// After the exit date, no node has a circuit touching PK, PK holds none,
/// says it exited, and forwards nothing.
fn assert_pk_left(mesh: &Mesh) {
    let pk = mesh.node("PK");
    let v = pk
        .wait_status("PK exited with no circuits", Duration::from_secs(5), |v| {
            v["state"] == "exited" && v["circuits"] == 0
        })
        .unwrap();
    let before = v["link_bytes_out"].as_u64().unwrap();
    for p in mesh.all() {
        let v = p.status().unwrap();
        assert!(
            v["circuit_neighbours"].get("PK").is_none(),
            "{}: circuits still touch PK: {}",
            p.jurisdiction,
            v["circuit_neighbours"]
        );
        for (path, ..) in entry_circuits(&v) {
            assert!(!path.contains(&"PK".to_string()), "entry circuit {path:?}");
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = pk.status().unwrap()["link_bytes_out"].as_u64().unwrap();
    assert_eq!(before, after, "PK forwarded data after its exit date");
    assert_eq!(pk.status().unwrap()["state"], "exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_move_off_a_blocked_relay_without_losing_a_byte() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = authority(keys.path());
    // PK is the only relay at first, so the streams start through it; DE
    // joins later and takes them over.
    let (mesh, long) = long_streams(public, (30, 2, 2), "PK", "DE", &[0, 10]).await;
    let target = long.target;
    let now = now_ms();
    let (from, exit) = (now + 1_500, now + 10_000);
    block_pk(keys.path(), &key, &mesh, from, exit);
    // New connections after blocked_from never use PK.
    until(from + 300).await;
    short_transfer(&mesh, target, 100, None).await;
    until(exit + 500).await;
    let v = mesh.entry.status().unwrap();
    for (path, _, built) in entry_circuits(&v) {
        assert!(
            built < from || !path.contains(&"PK".to_string()),
            "{path:?} built after blocked_from"
        );
    }
    assert_pk_left(&mesh);
    long.finish().await;
    let v = mesh.entry.status().unwrap();
    assert!(
        v["origin"]["streams_moved"].as_u64().unwrap() >= 2,
        "{}",
        v["origin"]
    );
    let log = mesh.entry.log();
    let moves: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("streams moved to a new circuit"))
        .collect();
    assert!(!moves.is_empty(), "{log}");
    // Shown with --nocapture: how long each move took.
    for m in moves {
        eprintln!("{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_in_a_blocked_jurisdiction_closes_at_the_deadline() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = authority(keys.path());
    let specs = [
        Spec::new("CA", "exit"),
        Spec::new("PK", "exit"),
        Spec::new("DE", "relay"),
    ];
    let mesh = Mesh::start(&specs, &gossip_opts(public, (30, 2, 2), vec![])).unwrap();
    mesh.wait_entry_knows_all().unwrap();
    let (target, _uploads) = pattern_server_paced(Some(MIB as u64)).await.unwrap();
    // A long download through an exit in PK.
    let s = mesh
        .open(target.port(), "exit_in=PK")
        .await
        .expect("SOCKS success");
    let (mut r, mut w) = s.into_split();
    let mut head = 7u64.to_be_bytes().to_vec();
    head.extend_from_slice(&(1000 * MIB as u64).to_be_bytes());
    w.write_all(&head).await.unwrap();
    let download = tokio::spawn(async move {
        let (got, end) = read_until_end(&mut r).await;
        (got, end, now_ms())
    });
    let now = now_ms();
    let (from, exit) = (now + 1_000, now + 5_000);
    block_pk(keys.path(), &key, &mesh, from, exit);
    until(from + 300).await;
    // No new streams to a draining exit: the constraint now has no path.
    let refused = mesh.connect(target.port(), "exit_in=PK").await.unwrap();
    assert_eq!(refused.err(), Some(2), "a new stream to an exit in PK");
    let (got, end, closed_at) = tokio::time::timeout(Duration::from_secs(30), download)
        .await
        .unwrap()
        .unwrap();
    assert!(got > 0 && got < 1000 * MIB, "got {got} bytes");
    // Cut short: the client sees a reset, never a clean end (I10).
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "a truncated download must not end cleanly"
    );
    assert!(
        closed_at <= exit + 1_500,
        "closed {} ms after the exit date",
        closed_at.saturating_sub(exit)
    );
    let log = mesh.entry.log();
    assert!(
        log.contains("its exit is leaving the mesh") || log.contains("EXIT_LEFT"),
        "no reason in the entry's log:\n{log}"
    );
    // Reconnecting gets an allowed exit.
    short_transfer(&mesh, target, 20, None).await;
    until(exit + 300).await;
    assert_pk_left(&mesh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_exit_date_is_met_and_lifting_brings_nodes_back() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = authority(keys.path());
    let (mesh, long) = long_streams(public, (30, 2, 2), "PK", "DE", &[30]).await;
    let target = long.target;
    let now = now_ms();
    let r1 = Ruling {
        version: 1,
        region: "PK",
        from_ms: now + 500,
        exit_ms: now + 300_000,
        classes: &[],
        lifted: false,
    };
    publish(&mesh.nodes[0], &sign(keys.path(), &key, &r1));
    mesh.node("PK")
        .wait_state("draining", Duration::from_secs(10))
        .unwrap();
    // Amended: the exit date moves to 7 s from now.
    let exit = now_ms() + 7_000;
    let r2 = Ruling {
        version: 2,
        exit_ms: exit,
        ..r1
    };
    publish(&mesh.nodes[0], &sign(keys.path(), &key, &r2));
    until(exit + 500).await;
    assert_pk_left(&mesh);
    long.finish().await;
    // Lifted: PK serves again.
    let r3 = Ruling {
        version: 3,
        lifted: true,
        ..r2
    };
    publish(&mesh.nodes[0], &sign(keys.path(), &key, &r3));
    let pk = mesh.node("PK");
    pk.wait_state("active", Duration::from_secs(10)).unwrap();
    let ready = ureq::get(&format!("http://{}/readyz", pk.admin)).call();
    assert!(ready.is_ok(), "readyz after the lift: {ready:?}");
    mesh.entry
        .wait_knows([pk], Duration::from_secs(15))
        .unwrap();
    // Through PK again (DE excluded).
    short_transfer(&mesh, target, 40, Some(("", "exclude=DE"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_relay_moves_its_circuits_and_the_transfer_completes() {
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = authority(keys.path());
    let (mut mesh, long) = long_streams(public, (8, 2, 2), "DE", "IS", &[50]).await;
    let de = mesh
        .nodes
        .iter()
        .position(|p| p.jurisdiction == "DE")
        .unwrap();
    let signalled = Instant::now();
    mesh.nodes[de].signal("TERM");
    long.finish().await;
    let v = mesh.entry.status().unwrap();
    assert!(
        v["origin"]["streams_moved"].as_u64().unwrap() >= 1,
        "{}",
        v["origin"]
    );
    // DE stops by itself once nothing is left, within its grace.
    let stopped = loop {
        if !mesh.nodes[de].alive() {
            break true;
        }
        if signalled.elapsed() > Duration::from_secs(12) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stopped,
        "DE still running after its grace:\n{}",
        mesh.nodes[de].log()
    );
    let log = mesh.nodes[de].log();
    assert!(log.contains("SIGTERM: draining"), "{log}");
    assert!(log.contains("drain finished"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_ruling_leaves_other_traffic_alone() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = authority(keys.path());
    // The tenant `acme` is of class enterprise; its connections cannot
    // change that (nor take fewer hops than the entry builds).
    let opts = Options {
        entry_toml: "[[tenants]]\nname = \"acme\"\nclass = \"enterprise\"\n".into(),
        ..gossip_opts(public, (30, 2, 2), vec![])
    };
    let mesh = Mesh::start(&CA_PK_DE, &opts).unwrap();
    mesh.wait_entry_knows_all().unwrap();
    let (target, _uploads) = pattern_server_paced(None).await.unwrap();
    let now = now_ms();
    let from = now + 500;
    let file = sign(
        keys.path(),
        &key,
        &Ruling {
            version: 1,
            region: "PK",
            from_ms: from,
            exit_ms: now + 120_000,
            classes: &["enterprise"],
            lifted: false,
        },
    );
    publish(&mesh.nodes[0], &file);
    mesh.entry
        .wait_status("ruling at the entry", Duration::from_secs(10), |v| {
            v["rulings"].as_array().is_some_and(|r| !r.is_empty())
        })
        .unwrap();
    until(from + 200).await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(spawn_transfer(
            mesh.socks(),
            target,
            200 + i,
            MIB,
            None,
            Some(("acme", "")),
        ));
        // Other traffic may still cross PK: with DE excluded it must.
        tasks.push(spawn_transfer(
            mesh.socks(),
            target,
            300 + i,
            MIB,
            None,
            Some(("", "exclude=DE")),
        ));
    }
    let v = mesh
        .entry
        .wait_status("both kinds of circuits", Duration::from_secs(20), |v| {
            v["origin"]["circuits"]
                .as_array()
                .is_some_and(|c| c.len() >= 2)
        })
        .unwrap();
    for c in v["origin"]["circuits"].as_array().unwrap() {
        let path = path_of(c);
        if c["class"] == "enterprise" {
            assert!(
                !path.contains(&"PK"),
                "enterprise traffic through PK: {path:?}"
            );
        } else {
            assert_eq!(path, ["PK", "CA"]);
        }
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }
    let pk = mesh.node("PK").status().unwrap();
    assert_eq!(
        pk["state"], "active",
        "a scoped ruling does not drain the node"
    );
    // The attack: the enterprise tenant renames its class, or lowers its
    // hops, to get a path through PK (with DE excluded, PK is the only
    // relay). Both are refused (SOCKS 0x02), and the entry says why.
    for opts in ["class=consumer;exclude=DE", "hops=1;exclude=DE"] {
        let r = socks_connect_as(
            mesh.socks(),
            "127.0.0.1",
            target.port(),
            Some(("acme", opts)),
        )
        .await
        .unwrap();
        assert_eq!(r.err(), Some(2), "acme with `{opts}`");
    }
    // Its own class and no widening: no path avoids both DE and PK.
    let r = socks_connect_as(
        mesh.socks(),
        "127.0.0.1",
        target.port(),
        Some(("acme", "exclude=DE")),
    )
    .await
    .unwrap();
    assert_eq!(r.err(), Some(2), "no enterprise path through PK");
    let log = mesh.entry.log();
    assert!(
        log.contains("may not change its traffic class") && log.contains("at least 2 hops"),
        "the refusals' reasons in the entry's log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_constraints_are_honoured_and_impossible_ones_refused() {
    let specs = [
        Spec::new("CH", "relay,exit"),
        Spec::new("DE", "relay"),
        Spec::new("CA", "exit"),
        Spec::new("IS", "relay,exit"),
    ];
    let mesh = Mesh::start(
        &specs,
        &Options {
            hops: 2,
            ..Options::default()
        },
    )
    .unwrap();
    let (target, _uploads) = pattern_server_paced(None).await.unwrap();
    type PathOk = fn(&[&str]) -> bool;
    let cases: [(&'static str, PathOk); 3] = [
        ("exit_in=CA", |p| p.last() == Some(&"CA")),
        ("exclude=DE,IS", |p| {
            !p.contains(&"DE") && !p.contains(&"IS")
        }),
        ("avoid=EU;exit=IS,CH", |p| {
            p[0] != "DE" && matches!(p.last(), Some(&"IS") | Some(&"CH"))
        }),
    ];
    for (opts, ok) in cases {
        let mut held = Vec::new();
        for _ in 0..3 {
            let s = socks_connect_as(mesh.socks(), "127.0.0.1", target.port(), Some(("-", opts)))
                .await
                .unwrap()
                .unwrap_or_else(|code| {
                    let log = mesh.entry.log();
                    let last = log
                        .lines()
                        .rev()
                        .find(|l| l.contains("refused"))
                        .unwrap_or("");
                    panic!("{opts}: reply {code}: {last}")
                });
            held.push(s);
        }
        let v = mesh.entry.status().unwrap();
        for c in v["origin"]["circuits"].as_array().unwrap() {
            let path = path_of(c);
            if c["streams"].as_u64() > Some(0) {
                assert!(ok(&path), "{opts}: path {path:?}");
            }
        }
        drop(held);
        mesh.entry
            .wait_status("streams closed", Duration::from_secs(10), |v| {
                v["origin"]["circuits"]
                    .as_array()
                    .is_some_and(|c| c.iter().all(|c| c["streams"] == 0))
            })
            .unwrap();
    }
    for (opts, named) in [
        ("exit_in=JP", "exit_in=JP"),
        ("colour=red", "option 1 has an unknown key"),
    ] {
        let r = mesh.connect(target.port(), opts).await.unwrap();
        assert_eq!(r.err(), Some(2), "{opts}");
        mesh.entry.wait_log(named, Duration::from_secs(5)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_drain_survives_kill_9_and_can_be_cancelled() {
    let specs = [Spec::new("CA", "exit"), Spec::new("DE", "relay")];
    let mut mesh = Mesh::start(
        &specs,
        &Options {
            hops: 2,
            ..Options::default()
        },
    )
    .unwrap();
    let admin = mesh.nodes[1].admin.to_string();
    let readyz = |admin: &str| {
        ureq::get(&format!("http://{admin}/readyz"))
            .call()
            .map(|r| r.status().as_u16())
            .unwrap_or_else(|e| match e {
                ureq::Error::StatusCode(c) => c,
                e => panic!("readyz: {e}"),
            })
    };
    assert_eq!(readyz(&admin), 200);
    let said = run_ferry(&[
        "drain",
        "--admin",
        &admin,
        "--in",
        "10m",
        "--reason",
        "maintenance",
    ])
    .unwrap();
    assert!(said.contains("draining; exit by"), "{said}");
    mesh.nodes[1]
        .wait_state("draining", Duration::from_secs(5))
        .unwrap();
    assert_eq!(readyz(&admin), 503);
    // The container health check: alive, but not ready, and it says why.
    run_ferry(&["healthcheck", "--admin", &admin]).unwrap();
    let hc = std::process::Command::new(ferry_tests::ferry_bin().unwrap())
        .args(["healthcheck", "--admin", &admin, "--ready"])
        .output()
        .unwrap();
    assert!(!hc.status.success());
    let why = String::from_utf8_lossy(&hc.stderr);
    assert!(
        why.contains("not ready: draining") && why.contains("maintenance"),
        "{why}"
    );
    // New circuits avoid it: DE is the only relay, so there is no path.
    let (target, _uploads) = pattern_server_paced(None).await.unwrap();
    let r = mesh.connect(target.port(), "").await.unwrap();
    assert_eq!(r.err(), Some(2), "a circuit through a draining relay");
    mesh.nodes[1].kill9_and_restart().unwrap();
    let v = mesh.nodes[1]
        .wait_state("draining", Duration::from_secs(10))
        .unwrap();
    assert!(
        v["state_reason"].as_str().unwrap().contains("maintenance"),
        "{v}"
    );
    assert_eq!(readyz(&admin), 503);
    let said = run_ferry(&["drain", "--admin", &admin, "--cancel"]).unwrap();
    assert!(said.contains("cancelled"), "{said}");
    mesh.nodes[1]
        .wait_state("active", Duration::from_secs(5))
        .unwrap();
    assert_eq!(readyz(&admin), 200);
    run_ferry(&["healthcheck", "--admin", &admin, "--ready"]).unwrap();
    let bad = std::process::Command::new(ferry_tests::ferry_bin().unwrap())
        .args(["drain", "--admin", &admin, "--exit-by", "yesterday"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Quiet logs while all is well: for a minute, a gossip mesh (adverts
/// renewed every second) carries long streams through a ruling that drains
/// PK by its exit date, then a lift, then a transfer through PK every two
/// seconds, and no node logs a line at WARN or above (the log convention:
/// docs/LOGGING.md). A forged ruling then gets exactly one WARN, at the
/// node it was handed to, naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_is_well_logs_no_warning_and_a_forged_ruling_one() {
    let t0 = Instant::now();
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = authority(keys.path());
    let (mesh, long) = long_streams(public, (30, 2, 2), "PK", "DE", &[0, 10]).await;
    let target = long.target;
    let now = now_ms();
    let (from, exit) = (now + 1_500, now + 15_000);
    block_pk(keys.path(), &key, &mesh, from, exit);
    until(from + 300).await;
    short_transfer(&mesh, target, 100, None).await;
    until(exit + 500).await;
    assert_pk_left(&mesh);
    long.finish().await;
    let lift = Ruling {
        version: 2,
        lifted: true,
        ..Ruling::block("PK", from, exit)
    };
    publish(&mesh.nodes[0], &sign(keys.path(), &key, &lift));
    let pk = mesh.node("PK");
    pk.wait_state("active", Duration::from_secs(10)).unwrap();
    mesh.entry
        .wait_knows([pk], Duration::from_secs(15))
        .unwrap();
    let mut seed = 40;
    while t0.elapsed() < Duration::from_secs(60) {
        short_transfer(&mesh, target, seed, Some(("", "exclude=DE"))).await;
        seed += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for p in mesh.all() {
        let w = p.warnings();
        assert!(
            w.is_empty(),
            "{} warned with all well:\n{}",
            p.jurisdiction,
            w.join("\n")
        );
    }

    let (stranger, _) = rulings::authority(keys.path(), "stranger");
    let forged = sign(
        keys.path(),
        &stranger,
        &Ruling::block("DE", now_ms() + 500, now_ms() + 600_000),
    );
    assert!(rulings::publish(&mesh.nodes[0], &forged).is_err());
    mesh.nodes[0]
        .wait_log("ruling refused", Duration::from_secs(5))
        .unwrap();
    let all: Vec<String> = mesh.all().iter().flat_map(|p| p.warnings()).collect();
    assert_eq!(all.len(), 1, "one WARN for the forged ruling: {all:#?}");
    assert!(
        all[0].contains("ruling refused") && all[0].contains("reason="),
        "{}",
        all[0]
    );
}
