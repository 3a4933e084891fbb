//! A 3-hop circuit between separate `ferry` processes: bulk data both ways
//! on concurrent streams, the real curl through the SOCKS5 entry, and an
//! exit-policy refusal reaching the client as SOCKS reply 0x02.

use ferry_tests::{
    Mesh, Options, curl_socks_async, finish_transfers, http_server, pattern_server, spawn_transfer,
};
use std::time::Duration;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_each_way_on_concurrent_streams_arrive_intact() {
    let mesh = Mesh::start(&ferry_tests::THREE, &Options::default()).unwrap();
    let (target, mut uploads) = pattern_server().await.unwrap();
    let seeds: Vec<u64> = (0..4).collect();
    let len = 10 * MIB;
    let tasks = seeds
        .iter()
        .map(|&seed| spawn_transfer(mesh.socks(), target, seed, len, None, None))
        .collect();
    finish_transfers(tasks, &mut uploads, &seeds, len)
        .await
        .unwrap();
    // The entry's log names the circuit's path: all three jurisdictions.
    let log = mesh.entry.log();
    let built = log
        .lines()
        .find(|l| l.contains("circuit built"))
        .expect("circuit built line");
    for cc in ["DE", "CH", "IS"] {
        assert!(built.contains(cc), "{built}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_a_page_through_the_socks_entry() {
    let mesh = Mesh::start(&ferry_tests::THREE, &Options::default()).unwrap();
    let page = http_server("hello through three hops\n").await.unwrap();
    let url = format!("http://localhost:{}/", page.port());
    let out = curl_socks_async(mesh.socks(), url).await;
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through three hops\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_policy_refusal_reaches_the_client_as_reply_0x02() {
    let opts = Options {
        allow_private: false,
        ..Options::default()
    };
    let mesh = Mesh::start(&ferry_tests::THREE, &opts).unwrap();
    let page = http_server("must not be reached\n").await.unwrap();
    let reply = mesh.connect(page.port(), "").await.unwrap();
    assert_eq!(
        reply.err(),
        Some(0x02),
        "loopback target must be refused by the exit policy"
    );
    // The refusal says why, at the entry.
    mesh.entry
        .wait_log("loopback targets are not allowed", Duration::from_secs(10))
        .unwrap();
    // curl reports it as a SOCKS refusal with reply 2: exit code 97.
    let url = format!("http://127.0.0.1:{}/", page.port());
    let out = curl_socks_async(mesh.socks(), url).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(97), "curl said: {err}");
    // Older curl prints the reply code, newer the RFC 1928 text.
    assert!(
        err.contains("(2)") || err.contains("not allowed by ruleset"),
        "curl said: {err}"
    );
    // Refused streams leave nothing on the circuit: it counts no stream
    // (one left behind would be shared against the limit, and a drain
    // would try to move a stream the exit never had).
    let status = mesh.entry.status().unwrap();
    let circuits = status["origin"]["circuits"].as_array().unwrap();
    assert!(!circuits.is_empty(), "{status}");
    for c in circuits {
        assert_eq!(c["streams"], 0, "a refused stream stayed on {c}");
    }
}
