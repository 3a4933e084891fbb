//! Trust, with real processes: only nodes the authority admitted carry
//! traffic, and every claim a path depends on comes from their certificate;
//! a squatted Noise key gets nothing; revocation takes effect everywhere in
//! seconds; a node that joins late (even after a ruling's signature window)
//! has the rulings before it is ready; a relay's Noise key rotates under a
//! long stream without losing a byte.

use ferry_node::authority::now_ms;
use ferry_tests::rulings;
use ferry_tests::{
    CA_PK_DE, Mesh, Options, Pattern, Proc, Spec, echo_server, pattern_server_paced, peer,
    run_ferry, socks_connect_as, spawn_transfer,
};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn peer_ids(v: &Value) -> Vec<String> {
    v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_str().map(str::to_string))
        .collect()
}

/// Every node id on the entry's circuits.
fn circuit_nodes(v: &Value) -> Vec<String> {
    v["origin"]["circuits"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["path_ids"].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// One echo round trip through `socks` with SOCKS5 options `opts`: Ok if
/// the bytes came back intact, Err(reply code) if the entry refused.
async fn echo(socks: SocketAddr, target: SocketAddr, opts: &str, n: u8) -> Result<(), u8> {
    echo_as(socks, target, "-", opts, n).await
}

/// [`echo`] as the tenant `user`.
async fn echo_as(
    socks: SocketAddr,
    target: SocketAddr,
    user: &str,
    opts: &str,
    n: u8,
) -> Result<(), u8> {
    let auth = (!opts.is_empty() || user != "-").then_some((user, opts));
    let mut s = socks_connect_as(socks, "127.0.0.1", target.port(), auth)
        .await
        .unwrap()?;
    let msg: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ n).collect();
    s.write_all(&msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg, "echo {n} came back intact");
    Ok(())
}

/// `ferry_links_active` on a node's metrics listener.
fn links_of(p: &Proc) -> u64 {
    p.metric("ferry_links_active").unwrap() as u64
}

fn counted(v: &Value, key: &str, reason: &str) -> u64 {
    v[key][reason].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_claim_above_the_certificate_buys_no_more_than_a_fair_share() {
    // Four relays admitted with a ceiling of 1000 Mbit/s; DE advertises
    // 100000 (before certificates it sat on every circuit: 42 of 42).
    let specs = [
        Spec::new("DE", "relay"),
        Spec::new("CH", "relay"),
        Spec::new("IS", "relay"),
        Spec::new("SG", "relay"),
        Spec::new("CA", "exit"),
    ];
    let opts = Options {
        gossip: true,
        hops: 2,
        advert_ttl_secs: 3,
        capacity_of: vec![(0, 100_000)],
        ..Options::default()
    };
    let mesh = Mesh::start(&specs, &opts).unwrap();
    let greedy = mesh.nodes[0].id.clone();
    let v = mesh.wait_entry_knows_all().unwrap();
    let out = run_ferry(&[
        "paths",
        "--admin",
        &mesh.entry.admin.to_string(),
        "--n",
        "1000",
        "--json",
    ])
    .unwrap();
    let paths: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(paths["picked"], 1000, "{paths}");
    let on = |id: &str| {
        paths["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .and_then(|n| n["paths"].as_u64())
            .unwrap_or(0)
    };
    let share = on(&greedy);
    eprintln!("relay advertising 100x its ceiling: on {share} of 1000 paths (fair share 250)");
    assert_eq!(
        peer(&v, &greedy).unwrap()["capacity_mbps"],
        1000,
        "capacity is capped at the certificate's ceiling"
    );
    // Fair share of the relay slot is 250 (binomial sd ~14): 325 is > 5 sd.
    assert!(share <= 325, "the greedy relay is on {share} of 1000 paths");
    assert!(
        share >= 150,
        "the greedy relay still carries its share: {share}"
    );
    // The human-readable form says the same.
    let text = run_ferry(&["paths", "--admin", &mesh.entry.admin.to_string()]).unwrap();
    assert!(text.contains("1000 paths picked"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatted_noise_key_gains_no_circuit_and_the_victim_keeps_working() {
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let specs = [Spec::new("DE", "relay"), Spec::new("CA", "exit")];
    let opts = Options {
        admit_with: Some(kd.clone()),
        ..Options::gossip(public)
    };
    let mut mesh = Mesh::start(&specs, &opts).unwrap();
    let target = echo_server().await.unwrap();
    let victim_id = mesh.nodes[0].id.clone();
    mesh.wait_entry_knows_all().unwrap();

    // A hostile operator the authority admitted in PK builds an advert that
    // carries the victim's Noise key and link address, and claims CH.
    let hostile = ferry_node::identity::Keys::generate();
    let now = now_ms();
    let cert = ferry_node::cert::admit(
        &hostile,
        &ferry_node::cert::Admission {
            jurisdiction: ferry_node::config::parse_jurisdiction("PK").unwrap(),
            family: "hostile".into(),
            roles: ferry_node::cert::parse_role_list("relay").unwrap(),
            capacity_max_mbps: 1000,
            not_before_ms: now - 60_000,
            not_after_ms: now + 3_600_000,
            landmark: None,
        },
        &[ferry_node::authority::load_key(&kd.join("authority.key")).unwrap()],
    )
    .unwrap();
    let squat = ferry_node::directory::OwnAdvert {
        key: &hostile.identity,
        noise_public: mesh.nodes[0].noise_key,
        link: mesh.nodes[0].link,
        p2p_addrs: vec![],
        jurisdiction: ferry_router::Jurisdiction(*b"CH"),
        roles: ferry_node::cert::parse_role_list("relay").unwrap(),
        family: "hostile".into(),
        capacity_mbps: 1000,
        load: 0.0,
        state: ferry_router::NodeState::Active,
        certificate: prost::Message::encode_to_vec(&cert),
        retiring: (Vec::new(), 0),
    }
    .sign(now, now + 60_000);
    let hostile_id = hex::encode(hostile.node_id().0);

    // The attack of the issue: the victim restarts (its advert lapses at
    // the entry only after its lifetime, but its process is gone) while
    // the squatting advert spreads.
    mesh.nodes[0].kill9().unwrap();
    let entry = &mesh.entry;
    ferry_tests::gossip::publish_until(
        mesh.nodes[1].mesh,
        ferry_node::control::ADVERTS,
        std::slice::from_ref(&squat),
        Duration::from_secs(30),
        || {
            entry
                .status()
                .is_ok_and(|v| peer_ids(&v).contains(&hostile_id))
        },
    )
    .await
    .unwrap();
    mesh.nodes[0].kill9_and_restart().unwrap();
    let v = mesh
        .entry
        .wait_status(
            "the victim's fresh advert is accepted again",
            Duration::from_secs(30),
            |v| peer(v, &victim_id).is_some_and(|p| p["expires_in_secs"].as_u64() > Some(0)),
        )
        .unwrap();
    // The squatter's claim of CH is ignored: its certificate says PK.
    assert_eq!(peer(&v, &hostile_id).unwrap()["jurisdiction"], "PK");
    assert_eq!(peer(&v, &victim_id).unwrap()["jurisdiction"], "DE");

    // Routes that can only use the squatter fail: the key's holder answers
    // as itself, not as the node the entry meant.
    for n in 0..3u8 {
        let r = echo(mesh.socks(), target, "exclude=DE", n).await;
        assert!(r.is_err(), "a circuit through the squatter opened");
    }
    mesh.entry
        .wait_log("the key's holder is node", Duration::from_secs(10))
        .unwrap();
    // The victim keeps working, and no circuit lists the squatter.
    for n in 0..3u8 {
        echo(mesh.socks(), target, "exclude=PK", n)
            .await
            .expect("a circuit through the victim");
    }
    let v = mesh.entry.status().unwrap();
    let on = circuit_nodes(&v);
    assert!(!on.contains(&hostile_id), "a circuit lists the squatter");
    assert!(on.contains(&victim_id), "no circuit through the victim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unadmitted_expired_and_revoked_nodes_carry_nothing() {
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let specs = [
        Spec::new("DE", "relay"),      // no certificate
        Spec::new("CH", "relay"),      // a certificate that ends in 25 s
        Spec::new("IS", "relay"),      // revoked below
        Spec::new("SG", "relay,exit"), // admitted as a relay only
        Spec::new("CA", "exit"),
    ];
    let opts = Options {
        admit_with: Some(kd.clone()),
        hops: 2,
        unadmitted: vec![0],
        admit_args: vec![
            (1, vec!["--valid-for".into(), "25s".into()]),
            (3, vec!["--roles".into(), "relay".into()]),
        ],
        ..Options::gossip(public)
    };
    let admitted_at = Instant::now();
    let mesh = Mesh::start(&specs, &opts).unwrap();
    let ids: Vec<String> = mesh.nodes.iter().map(|p| p.id.clone()).collect();
    let target = echo_server().await.unwrap();
    let all = mesh.all();
    // All but the unadmitted DE.
    mesh.entry
        .wait_knows(&mesh.nodes[1..], Duration::from_secs(30))
        .unwrap();

    // Roles are what the certificate grants: SG, configured relay and
    // exit, is a relay to its peers and to itself.
    let v = mesh.entry.status().unwrap();
    assert_eq!(peer(&v, &ids[3]).unwrap()["roles"], "relay");
    assert_eq!(mesh.nodes[3].status().unwrap()["roles"], "relay");

    // Unadmitted: its adverts are refused everywhere, with the reason, and
    // it says why it is not ready.
    for p in &all[1..] {
        p.wait_status("no_certificate counted", Duration::from_secs(15), |v| {
            counted(v, "advert_rejections", "no_certificate") >= 1 && !peer_ids(v).contains(&ids[0])
        })
        .unwrap();
    }
    let de = mesh.nodes[0].status().unwrap();
    assert_eq!(de["ready"], false);
    assert!(
        de["certificate"]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("no certificate")),
        "{}",
        de["certificate"]
    );
    let out = std::process::Command::new(ferry_tests::ferry_bin().unwrap())
        .args([
            "healthcheck",
            "--ready",
            "--admin",
            &mesh.nodes[0].admin.to_string(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unadmitted"), "{err}");

    // Traffic through IS first, so it holds links (entry -> IS -> CA).
    echo(mesh.socks(), target, "exclude=SG,CH", 0)
        .await
        .expect("a circuit through IS");
    assert!(links_of(&mesh.nodes[2]) >= 2, "IS holds its links");

    // Revoked: signed with the CLI, published to one node; within seconds
    // no node routes through it and its links are closed.
    let revocation = keys.path().join("revoke-is.json");
    run_ferry(&[
        "authority",
        "revoke",
        "--key",
        kd.join("authority.key").to_str().unwrap(),
        "--node",
        &ids[2],
        "--reason",
        "operator lost its keys",
        "--out",
        revocation.to_str().unwrap(),
    ])
    .unwrap();
    let t = Instant::now();
    let said = rulings::publish(&mesh.nodes[4], &revocation).unwrap();
    assert!(said.contains("revoked"), "{said}");
    for p in all.iter().filter(|p| p.id != ids[2]) {
        p.wait_status("revocation in force", Duration::from_secs(10), |v| {
            v["revoked"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x == &ids[2]))
                && !peer_ids(v).contains(&ids[2])
        })
        .unwrap();
    }
    let took = t.elapsed();
    eprintln!("revocation in force at every node in {took:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while links_of(&mesh.nodes[2]) > 0 {
        assert!(
            Instant::now() < deadline,
            "links to the revoked node stay open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(took < Duration::from_secs(5), "revocation took {took:?}");
    // Its control-plane connections are dropped too (its later adverts
    // would be refused as `revoked`: see the directory's unit tests), so it
    // soon knows no peer at all.
    mesh.nodes[2]
        .wait_status(
            "the revoked node is cut off",
            Duration::from_secs(20),
            |v| peer_ids(v).is_empty(),
        )
        .unwrap();
    // A forged revocation is refused with its reason.
    let mut forged: Value =
        serde_json::from_str(&std::fs::read_to_string(&revocation).unwrap()).unwrap();
    let mut sig = forged["signatures"][0]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    sig.replace_range(0..2, if &sig[0..2] == "00" { "01" } else { "00" });
    forged["signatures"][0]["signature"] = sig.into();
    forged["body_hex"] = Value::from(hex::encode(prost::Message::encode_to_vec(
        &ferry_proto::pb::RevocationBody {
            node_id: hex::decode(&ids[3]).unwrap(),
            revoked_at_ms: now_ms(),
            reason: "forged".into(),
        },
    )));
    let forged_path = keys.path().join("forged.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let e = rulings::publish(&mesh.nodes[4], &forged_path).unwrap_err();
    assert!(e.contains("bad_signature"), "{e}");

    // Expired: once the certificate ends, its node leaves every peer.
    for p in all.iter().filter(|p| p.id != ids[1]) {
        p.wait_status(
            "expired certificate refused",
            Duration::from_secs(30).saturating_sub(admitted_at.elapsed()) + Duration::from_secs(10),
            |v| !peer_ids(v).contains(&ids[1]),
        )
        .unwrap();
    }
    mesh.entry
        .wait_status("cert_expired counted", Duration::from_secs(10), |v| {
            counted(v, "advert_rejections", "cert_expired") >= 1
        })
        .unwrap();
    assert_eq!(mesh.nodes[1].status().unwrap()["ready"], false);

    // Traffic flows, only through the one node left admitted.
    for n in 0..6u8 {
        echo(mesh.socks(), target, "", n).await.expect("echo");
    }
    let on = circuit_nodes(&mesh.entry.status().unwrap());
    for bad in &ids[..3] {
        assert!(!on.contains(bad), "a circuit uses {bad}");
    }
    assert!(on.contains(&ids[3]), "circuits go through SG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_late_has_the_rulings_before_it_is_ready() {
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let opts = Options {
        admit_with: Some(kd.clone()),
        hops: 2,
        // Entries' tenant of the class the ruling below is scoped to.
        entry_toml: "[[tenants]]\nname = \"acme\"\nclass = \"enterprise\"\n".into(),
        ..Options::gossip(public)
    };
    let mesh = Mesh::start(&CA_PK_DE, &opts).unwrap();
    let all = mesh.all();
    mesh.wait_entry_knows_all().unwrap();

    // PK is blocked for the `enterprise` class from now on (its node does
    // not drain: other traffic may still cross it, so only an entry that
    // knows the ruling keeps enterprise circuits off it); the signature may
    // be published for 3 s only.
    let now = now_ms();
    let plain = keys.path().join("pk.toml");
    std::fs::write(
        &plain,
        format!(
            "id = \"pk\"\nversion = 1\nregion = \"PK\"\nblocked_from = \"{}\"\nexit_by = \"{}\"\nclasses = [\"enterprise\"]\nreason = \"order\"\n",
            ferry_node::authority::fmt_time(now - 1_000),
            ferry_node::authority::fmt_time(now + 1_200_000),
        ),
    )
    .unwrap();
    let short = keys.path().join("pk-short.signed.json");
    // A second ruling, signed at the same time, that nobody publishes in
    // its window.
    let other = keys.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "id = \"ae\"\nversion = 1\nregion = \"AE\"\nblocked_from = \"{}\"\nexit_by = \"{}\"\nreason = \"order\"\n",
            ferry_node::authority::fmt_time(now + 600_000),
            ferry_node::authority::fmt_time(now + 1_200_000),
        ),
    )
    .unwrap();
    let other_signed = keys.path().join("other.signed.json");
    rulings::sign_file(&kd, &other, &other_signed, &["--valid-for", "3s"]);
    rulings::sign_file(&kd, &plain, &short, &["--valid-for", "3s"]);
    let signed_at = now_ms();
    rulings::publish(&mesh.nodes[0], &short).unwrap();
    for p in &all {
        p.wait_status("ruling in force", Duration::from_secs(15), |v| {
            v["rulings"].as_array().is_some_and(|r| !r.is_empty())
        })
        .unwrap();
    }
    // Past the window, an operator can no longer introduce it...
    while now_ms() < signed_at + 3_500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = rulings::publish(&mesh.nodes[1], &other_signed).unwrap_err();
    assert!(e.contains("expired"), "{e}");
    // (The one in force, published again, is a duplicate, not a refusal.)
    let again = rulings::publish(&mesh.nodes[2], &short).unwrap();
    assert!(again.contains("already in force"), "{again}");

    // ...but a node that joins now learns it from its peers before it is
    // ready, and routes around PK.
    let t = Instant::now();
    let late = mesh.add_entry("late", "NL").unwrap();
    let v = late
        .wait_status("the late entry is ready", Duration::from_secs(20), |v| {
            v["ready"] == true
        })
        .unwrap();
    let took = t.elapsed();
    eprintln!("late entry ready, with the ruling, {took:?} after it started");
    assert_eq!(
        v["rulings"].as_array().map(Vec::len),
        Some(1),
        "ready before the rulings arrived: {v}"
    );
    let target = echo_server().await.unwrap();
    let late_socks = late.socks.unwrap();
    let pk_id = mesh.nodes[1].id.clone();
    let v = late
        .wait_status(
            "the late entry knows the mesh",
            Duration::from_secs(10),
            |v| mesh.nodes.iter().all(|n| peer(v, &n.id).is_some()),
        )
        .unwrap();
    assert_eq!(
        peer(&v, &pk_id).map(|p| p["state"].clone()),
        Some(Value::from("active")),
        "PK itself is not draining: only the ruling keeps circuits off it"
    );
    // Each connection its own circuit (a different, harmless exclusion).
    for (n, cc) in ["AE", "AF", "AG", "AL", "AM", "AO", "AR", "AT"]
        .iter()
        .enumerate()
    {
        echo_as(
            late_socks,
            target,
            "acme",
            &format!("exclude={cc}"),
            n as u8,
        )
        .await
        .expect("echo through the late entry");
    }
    let pk = &mesh.nodes[1].id;
    let on = circuit_nodes(&late.status().unwrap());
    assert!(!on.is_empty());
    assert!(!on.contains(pk), "the late entry routed through PK");

    // Nobody counted a refusal for what peers passed on; the one refusal
    // is the operator's late publish; no gossip duplicate was logged.
    for p in all.iter().copied().chain([&late]) {
        let v = p.status().unwrap();
        let refused: u64 = v["ruling_rejections"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, n)| n.as_u64())
            .sum();
        let expected = u64::from(p.id == mesh.nodes[1].id);
        assert_eq!(
            refused, expected,
            "{}: {}",
            p.jurisdiction, v["ruling_rejections"]
        );
        let log = p.log();
        assert!(
            !log.contains("already been published") && !log.contains("ruling refused")
                || expected == 1,
            "{} logged a refusal:\n{log}",
            p.jurisdiction
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_relays_noise_key_under_load_loses_no_byte() {
    const LEN: usize = 24 << 20;
    let specs = [Spec::new("DE", "relay"), Spec::new("CA", "exit")];
    let opts = Options {
        gossip: true,
        hops: 2,
        advert_ttl_secs: 3,
        ..Options::default()
    };
    let mesh = Mesh::start(&specs, &opts).unwrap();
    let relay = &mesh.nodes[0];
    mesh.wait_entry_knows_all().unwrap();
    let rate = Some(4 << 20);
    let (target, mut uploads) = pattern_server_paced(rate).await.unwrap();
    let socks = mesh.socks();
    let seed: u64 = 77;
    // The task checks the download: whole and intact.
    let long = spawn_transfer(socks, target, seed, LEN, rate, None);
    mesh.entry
        .wait_status("the long stream runs", Duration::from_secs(20), |v| {
            circuit_nodes(v).contains(&relay.id)
        })
        .unwrap();

    let out = run_ferry(&[
        "keys",
        "rotate-noise",
        "--admin",
        &relay.admin.to_string(),
        "--grace",
        "4s",
    ])
    .unwrap();
    assert!(out.contains("new Noise key"), "{out}");
    let new_key = relay.status().unwrap()["noise_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_key, hex::encode(relay.noise_key));
    assert!(relay.dir.join("noise.retiring.key").exists());
    // New circuits during the grace (old or new key) and after it (new key).
    let echo_target = echo_server().await.unwrap();
    echo(socks, echo_target, "exclude=AE", 1)
        .await
        .expect("a new circuit during the grace");
    let retiring = relay.dir.join("noise.retiring.key");
    relay
        .wait_status("the old key erased", Duration::from_secs(15), |v| {
            v["retiring_noise_key_until"].is_null() && !retiring.exists()
        })
        .unwrap();
    mesh.entry
        .wait_status("the entry has the new key", Duration::from_secs(10), |v| {
            peer(v, &relay.id).is_some_and(|p| p["noise_key"] == new_key.as_str())
        })
        .unwrap();
    echo(socks, echo_target, "exclude=AF", 2)
        .await
        .expect("a new circuit after the grace");

    tokio::time::timeout(Duration::from_secs(60), long)
        .await
        .expect("the long stream finished")
        .unwrap();
    let (s, n, d) = tokio::time::timeout(Duration::from_secs(10), uploads.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s, n), (seed, LEN));
    assert!(d == Pattern::digest(seed, LEN), "upload corrupted");
}
