//! Mesh membership over libp2p, signed rulings and the RocksDB store, with
//! real `ferry` processes on loopback that find each other from one
//! bootstrap address.

use ferry_tests::rulings::{authority, publish, sign_file};
use ferry_tests::{Mesh, Options, Proc, Spec, run_ferry};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIX: [Spec; 6] = [
    Spec::new("DE", "relay"),
    Spec::new("CH", "relay,exit"),
    Spec::new("IS", "relay,exit"),
    Spec::new("CA", "relay,exit"),
    Spec::new("SG", "relay"),
    Spec::new("PK", "relay"),
];

/// Writes, signs (with each key) and returns the path of a signed ruling.
fn signed_ruling(
    dir: &Path,
    key_dirs: &[&Path],
    id: &str,
    version: u64,
    region: &str,
) -> std::path::PathBuf {
    let src = dir.join(format!("{id}-v{version}.toml"));
    std::fs::write(
        &src,
        format!(
            "id = \"{id}\"\nversion = {version}\nregion = \"{region}\"\nblocked_from = \"2030-01-01T00:00:00Z\"\n\
             exit_by = \"2030-02-01T00:00:00Z\"\nreason = \"test order\"\n"
        ),
    )
    .unwrap();
    let out = dir.join(format!("{id}-v{version}-{}.signed.json", key_dirs.len()));
    let mut input = src;
    for k in key_dirs {
        sign_file(k, &input, &out, &[]);
        input = out.clone();
    }
    out
}

fn peers_of(v: &Value) -> Vec<(String, String)> {
    v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or_default().to_string(),
                p["jurisdiction"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until every process of `mesh` has version `version` of ruling
/// `id` in force (20 s at most each).
fn wait_ruling(mesh: &Mesh, id: &str, version: u64) {
    for p in mesh.all() {
        p.wait_status(
            &format!("ruling {id} v{version} in force"),
            Duration::from_secs(20),
            |v| ruling_version(v, id) == Some(version),
        )
        .unwrap();
    }
}

/// A gossip mesh (3 hops, adverts for 30 s) whose nodes trust the rulings
/// authority key `public`.
fn trusting(public: String) -> Options {
    Options {
        gossip: true,
        authority_keys: vec![public],
        ..Options::default()
    }
}

fn ruling_version(v: &Value, id: &str) -> Option<u64> {
    v["rulings"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == id)
        .and_then(|r| r["version"].as_u64())
}

async fn echo_once(mesh: &Mesh) {
    let port = ferry_tests::echo_server().await.unwrap().port();
    let s = mesh.open(port, "").await.expect("SOCKS success");
    let (mut r, mut w) = s.into_split();
    w.write_all(b"across an advertised mesh").await.unwrap();
    w.shutdown().await.unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"across an advertised mesh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_nodes_find_each_other_from_one_bootstrap_address() {
    let mesh = Mesh::start(
        &SIX,
        &Options {
            gossip: true,
            ..Options::default()
        },
    )
    .unwrap();
    let t = Instant::now();
    mesh.wait_converged().unwrap();
    eprintln!("7 processes converged in {:?}", t.elapsed());
    // Links are accepted from keys that adverts bind: a circuit works.
    echo_once(&mesh).await;
    let by = &mesh.nodes[0].status().unwrap()["peers_by_jurisdiction"];
    for cc in ["CH", "IS", "CA", "SG", "PK", "NL"] {
        assert_eq!(by[cc].as_array().map(Vec::len), Some(1), "{cc} in {by}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rulings_spread_and_bad_ones_are_refused_everywhere() {
    let keys = tempfile::tempdir().unwrap();
    let (trusted, public) = authority(keys.path(), "trusted");
    let (stranger, _) = authority(keys.path(), "stranger");
    let mesh = Mesh::start(&SIX[..4], &trusting(public)).unwrap();
    mesh.wait_converged().unwrap();
    let all = mesh.all();

    let v2 = signed_ruling(keys.path(), &[&trusted], "pk-order", 2, "PK");
    assert_eq!(publish(&mesh.nodes[0], &v2).unwrap().trim(), "in force");
    let t = Instant::now();
    wait_ruling(&mesh, "pk-order", 2);
    eprintln!("ruling in force at all 5 processes in {:?}", t.elapsed());

    // Forged: a body that the signatures do not cover.
    let v3 = signed_ruling(keys.path(), &[&trusted], "pk-order", 3, "PK");
    let v4 = signed_ruling(keys.path(), &[&stranger], "pk-order", 4, "PK");
    let mut forged: Value = serde_json::from_str(&std::fs::read_to_string(&v3).unwrap()).unwrap();
    let other: Value = serde_json::from_str(&std::fs::read_to_string(&v4).unwrap()).unwrap();
    forged["body_hex"] = other["body_hex"].clone();
    let forged_path = keys.path().join("forged.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let v1 = signed_ruling(keys.path(), &[&trusted], "pk-order", 1, "PK");
    for p in &all {
        let e = publish(p, &forged_path).unwrap_err();
        assert!(e.contains("bad_signature"), "{e}");
        let e = publish(p, &v4).unwrap_err();
        assert!(e.contains("unknown_key"), "{e}");
        let e = publish(p, &v1).unwrap_err();
        assert!(e.contains("rollback"), "{e}");
    }
    for p in &all {
        let v = p.status().unwrap();
        assert_eq!(
            ruling_version(&v, "pk-order"),
            Some(2),
            "the last good state stays"
        );
        for reason in ["bad_signature", "unknown_key", "rollback"] {
            assert!(
                v["ruling_rejections"][reason].as_u64() >= Some(1),
                "{reason} not counted: {}",
                v["ruling_rejections"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_restart_keeps_identity_rulings_and_peers() {
    let keys = tempfile::tempdir().unwrap();
    let (trusted, public) = authority(keys.path(), "trusted");
    let mut mesh = Mesh::start(&SIX[..3], &trusting(public)).unwrap();
    mesh.wait_converged().unwrap();
    let r = signed_ruling(keys.path(), &[&trusted], "gcc", 1, "GCC");
    publish(&mesh.nodes[0], &r).unwrap();
    wait_ruling(&mesh, "gcc", 1);
    let node = &mut mesh.nodes[1];
    // A second process on the same data dir is told why it cannot start.
    let cfg = node.dir.join("ferry.toml");
    let second = std::process::Command::new(ferry_tests::ferry_bin().unwrap())
        .args(["node", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("is in use by another ferry process"), "{err}");
    // `ferry status` shows it readably.
    let text = run_ferry(&["status", "--admin", &node.admin.to_string()]).unwrap();
    assert!(
        text.contains("peers: 3") && text.contains("gcc v1  GCC"),
        "{text}"
    );
    let before = node.status().unwrap();
    node.kill9_and_restart().unwrap();
    // Straight from the store, before any gossip could have refilled it.
    let log = node
        .wait_log("state recovered from the store", Duration::from_secs(10))
        .unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("state recovered from the store"))
        .unwrap();
    assert!(
        line.contains("peers=3") && line.contains("rulings=1"),
        "{line}"
    );
    let after = node.status().unwrap();
    assert_eq!(after["node_id"], before["node_id"], "same identity");
    assert_eq!(ruling_version(&after, "gcc"), Some(1), "same rulings");
    assert_eq!(peers_of(&after).len(), 3, "peers recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_node_leaves_every_peers_candidates_within_the_bound() {
    let ttl = 3;
    let opts = Options {
        gossip: true,
        advert_ttl_secs: ttl,
        ..Options::default()
    };
    let mut mesh = Mesh::start(&SIX[..4], &opts).unwrap();
    mesh.wait_converged().unwrap();
    let gone_id = mesh.nodes[3].id.clone();
    mesh.nodes[3].kill9().unwrap();
    let t = Instant::now();
    // Its last advert lives at most `ttl` seconds after the kill; polling
    // four processes every 100 ms adds the observation slack.
    let bound = Duration::from_secs(ttl + 2);
    let observers: Vec<&Proc> = mesh.nodes[..3].iter().chain([&mesh.entry]).collect();
    let mut dropped_at: Vec<Option<Duration>> = vec![None; observers.len()];
    while dropped_at.iter().any(Option::is_none) && t.elapsed() < bound + Duration::from_secs(10) {
        for (i, p) in observers.iter().enumerate() {
            if dropped_at[i].is_none()
                && p.status()
                    .is_ok_and(|v| !peers_of(&v).iter().any(|(id, _)| *id == gone_id))
            {
                dropped_at[i] = Some(t.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("vanished node dropped by each peer after {dropped_at:?} (advert_ttl_secs = {ttl})");
    for (p, at) in observers.iter().zip(&dropped_at) {
        let at = at.unwrap_or_else(|| panic!("{} still lists the vanished node", p.jurisdiction));
        assert!(
            at <= bound,
            "{} dropped it only after {at:?}",
            p.jurisdiction
        );
    }
}

/// Junk published to one node is dropped and counted there, and goes no
/// further: nodes check gossip before forwarding it. (Before, every node
/// counted the junk: the first hop forwarded it unchecked mesh-wide.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_gossip_topic_is_dropped_and_counted() {
    let keys = tempfile::tempdir().unwrap();
    let (trusted, public) = authority(keys.path(), "trusted");
    let mesh = Mesh::start(&SIX[..3], &trusting(public)).unwrap();
    mesh.wait_converged().unwrap();
    let all = mesh.all();

    let forged_advert = {
        // A well-formed advert for one key, signed by another.
        let victim = ferry_node::identity::Keys::generate();
        let liar = ferry_node::identity::Keys::generate();
        let good = ferry_node::directory::OwnAdvert {
            key: &victim.identity,
            noise_public: victim.noise_public(),
            link: Some("127.0.0.1:9".parse().unwrap()),
            p2p_addrs: vec![],
            jurisdiction: ferry_router::Jurisdiction(*b"FR"),
            roles: ferry_router::Roles {
                entry: false,
                relay: true,
                exit: false,
            },
            family: String::new(),
            capacity_mbps: 1,
            load: 0.0,
            state: ferry_router::NodeState::Active,
            certificate: Vec::new(),
            retiring: (Vec::new(), 0),
        }
        .sign(1, u64::MAX / 2);
        let mut signed =
            <ferry_proto::pb::SignedAdvert as prost::Message>::decode(good.as_slice()).unwrap();
        use ed25519_dalek::Signer;
        signed.signature = liar.identity.sign(b"something else").to_bytes().to_vec();
        prost::Message::encode_to_vec(&signed)
    };
    let junk: Vec<Vec<u8>> = vec![
        b"\xff\xfe not protobuf".to_vec(),
        vec![0x0a; 5000],
        forged_advert,
    ];
    ferry_tests::gossip::publish_until(
        mesh.nodes[0].mesh,
        ferry_node::control::ADVERTS,
        &junk,
        Duration::from_secs(30),
        || {
            mesh.nodes[0].status().is_ok_and(|v| {
                let r = &v["advert_rejections"];
                ["undecodable", "oversized", "bad_signature"]
                    .iter()
                    .all(|k| r[k].as_u64() >= Some(1))
            })
        },
    )
    .await
    .unwrap();
    // The mesh keeps working: a ruling published where the junk arrived
    // still spreads (over the same gossip the junk would have taken), and
    // a circuit still carries.
    let r = signed_ruling(keys.path(), &[&trusted], "after-junk", 1, "AE");
    publish(&mesh.nodes[0], &r).unwrap();
    wait_ruling(&mesh, "after-junk", 1);
    for p in all.iter().filter(|p| p.id != mesh.nodes[0].id) {
        let r = &p.status().unwrap()["advert_rejections"];
        for k in ["undecodable", "oversized", "bad_signature"] {
            assert_eq!(
                r[k].as_u64().unwrap_or(0),
                0,
                "{}: junk ({k}) was forwarded to it: {r}",
                p.jurisdiction
            );
        }
    }
    echo_once(&mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_load_follows_traffic() {
    // Nodes advertise 10 Mbit/s and re-advertise every second.
    let opts = Options {
        gossip: true,
        advert_ttl_secs: 3,
        capacity_mbps: 10,
        ..Options::default()
    };
    let mesh = Mesh::start(&ferry_tests::THREE, &opts).unwrap();
    mesh.wait_converged().unwrap();
    let loads = |v: &Value| -> Vec<f64> {
        v["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["load"].as_f64())
            .collect()
    };
    assert!(
        loads(&mesh.entry.status().unwrap())
            .iter()
            .all(|l| *l < 0.5),
        "idle mesh reports load"
    );
    // 8 MiB through the circuit: far above 10 Mbit/s for the second it takes.
    let target = ferry_tests::echo_server().await.unwrap();
    let s = mesh.open(target.port(), "").await.expect("SOCKS success");
    let (mut r, mut w) = s.into_split();
    let data = vec![7u8; 8 << 20];
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), 8 << 20);
    mesh.entry
        .wait_status("a relay advertises load", Duration::from_secs(10), |v| {
            loads(v).iter().any(|l| *l > 0.5)
        })
        .unwrap();
}
