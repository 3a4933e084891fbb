//! Jurisdiction claims checked by landmarks, with real processes in a
//! gossip mesh: a landmark admitted in PK (Karachi) measures the nodes it
//! links to. A node claiming CH answers it in well under a millisecond (it
//! is on the same machine), which no node in Switzerland could: the table
//! puts CH at least 4,092 km from PK, 27 ms there and back for light. It is
//! quarantined at every node, circuits avoid it, and the evidence verifies
//! under the landmark's key. A
//! node claiming DE and an exit claiming CA, placed 100 ms away (a delaying
//! proxy: this kernel has no `netem`), are consistent with their claims and
//! stay in service.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use ferry_proto::pb;
use ferry_tests::{Mesh, Options, Spec, rulings, run_ferry};
use prost::Message;
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_too_near_a_landmark_for_its_claim_is_quarantined_everywhere() {
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let specs = [
        Spec::new("PK", "relay"),
        Spec::new("CH", "relay"),
        Spec::new("DE", "relay"),
        Spec::new("CA", "exit"),
    ];
    let mesh = Mesh::start(
        &specs,
        &Options {
            hops: 2,
            admit_with: Some(kd),
            admit_args: vec![(0, vec!["--landmark".into(), "24.86,67.01,Karachi".into()])],
            // DE and CA 100 ms away from everyone (PK to CA is at least
            // 64 ms): consistent with their claims.
            advertise_delay: vec![
                (2, Duration::from_millis(50)),
                (3, Duration::from_millis(50)),
            ],
            ..Options::gossip(public)
        },
    )
    .unwrap();
    let ids: Vec<String> = mesh.nodes.iter().map(|n| n.id.clone()).collect();
    let (landmark, ch, de) = (&ids[0], &ids[1], &ids[2]);
    // Every other node, the entry among them, quarantines CH within a
    // minute (CH does not judge itself).
    let mut evidence = Value::Null;
    for p in mesh
        .nodes
        .iter()
        .chain([&mesh.entry])
        .filter(|p| p.id != *ch)
    {
        let status = p
            .wait_status("CH quarantined", Duration::from_secs(60), |v| {
                v["quarantine"]
                    .as_array()
                    .is_some_and(|q| q.iter().any(|e| e["node_id"] == ch.as_str()))
            })
            .unwrap_or_else(|e| panic!("{} never quarantined CH: {e:#}", p.jurisdiction));
        evidence = status["quarantine"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["node_id"] == ch.as_str())
            .cloned()
            .unwrap();
        let quarantined: Vec<&str> = status["quarantine"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["node_id"].as_str())
            .collect();
        assert_eq!(
            quarantined,
            [ch.as_str()],
            "{}: only CH; DE and CA are consistent with their claims",
            p.jurisdiction
        );
    }
    println!("evidence: {evidence}");
    assert_eq!(evidence["claimed"], "CH");
    assert_eq!(evidence["landmark_id"], landmark.as_str());
    assert_eq!(evidence["landmark_jurisdiction"], "PK");
    let measured = evidence["measured_rtt_ms"].as_f64().unwrap();
    let minimum = evidence["minimum_rtt_ms"].as_f64().unwrap();
    assert!(measured < 5.0 && minimum > 25.0, "{measured} vs {minimum}");
    // The evidence verifies under the landmark's own key, whoever passed
    // it on.
    let signed = hex::decode(evidence["signed_report_hex"].as_str().unwrap()).unwrap();
    let s = pb::SignedMeasurement::decode(signed.as_slice()).unwrap();
    let key =
        VerifyingKey::from_bytes(&hex::decode(landmark).unwrap().try_into().unwrap()).unwrap();
    let mut msg = b"ferry/measurement/1".to_vec();
    msg.extend_from_slice(&s.report);
    key.verify(&msg, &Signature::from_slice(&s.signature).unwrap())
        .expect("the landmark's signature verifies");
    let r = pb::MeasurementReport::decode(s.report.as_slice()).unwrap();
    assert_eq!(hex::encode(&r.node_id), *ch);
    assert_eq!(r.claimed, "CH");
    // The entry shows CH quarantined, and its paths avoid CH.
    let status = mesh.entry.status().unwrap();
    let peer = |id: &str| {
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(peer(ch)["state"], "quarantined");
    assert_eq!(peer(de)["state"], "active");
    let paths = mesh.entry.paths(2000).unwrap();
    let on = |id: &str| {
        paths
            .iter()
            .find(|(pid, ..)| pid == id)
            .map_or(0, |(.., n)| *n)
    };
    assert_eq!(on(ch), 0, "no path through the quarantined node");
    assert!(on(de) > 0, "paths still use DE");
    // Metrics and the operator's view.
    assert!(mesh.entry.metric("ferry_quarantined_nodes").unwrap_or(0.0) >= 1.0);
    let admin = mesh.entry.admin.to_string();
    let text = tokio::task::spawn_blocking(move || run_ferry(&["status", "--admin", &admin]))
        .await
        .unwrap()
        .unwrap();
    assert!(
        text.contains("quarantined:") && text.contains("Karachi"),
        "{text}"
    );
}
