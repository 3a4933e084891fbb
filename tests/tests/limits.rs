//! Fair limits at the entry, with real processes: a client flooding the
//! entry with new streams and a bulk stream does not stop another tenant's
//! checksummed stream from completing at its own (paced) rate; the limits' refusals are
//! counted; a full listener and a client over its rate get HTTP 503 and 429
//! from the real `curl`; the entry survives all of it.

use ferry_tests::{
    Mesh, Options, Pattern, echo_server, free_port, http_server, read_digest, send_pattern,
    socks_connect_from,
};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const KIB: usize = 1024;
/// The steady tenant's byte rate, each way.
const STEADY_RATE: usize = 512 * KIB;
/// What it sends (and gets back from the echo server): 4 s at its rate.
const STEADY_LEN: usize = 2048 * KIB;

fn set(from: &str, to: &str) -> (String, String) {
    (from.to_string(), to.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_does_not_starve_another_tenants_stream() {
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_replace: vec![
                set("client_streams = 512", "client_streams = 8"),
                set("client_streams_per_sec = 100", "client_streams_per_sec = 20"),
                set("client_burst = 300", "client_burst = 20"),
            ],
            entry_toml: format!(
                "[[tenants]]\nname = \"flood\"\nclass = \"enterprise\"\n\n\
                 [[tenants]]\nname = \"steady\"\nclass = \"enterprise\"\nbytes_per_sec = {STEADY_RATE}\n"
            ),
            ..Options::default()
        },
    )
    .unwrap();
    let echo = echo_server().await.unwrap();
    let socks = mesh.socks();
    let flooder: IpAddr = "127.0.0.2".parse().unwrap();
    let steady: IpAddr = "127.0.0.3".parse().unwrap();

    // The flooder: one bulk stream as fast as the mesh carries it (at most
    // 512 MiB), and new streams as fast as it can, holding some open,
    // until the steady stream is done (at most 20,000 tries).
    let done = Arc::new(AtomicBool::new(false));
    let bulk = socks_connect_from(
        socks,
        Some(flooder),
        "127.0.0.1",
        echo.port(),
        Some(("flood", "")),
    )
    .await
    .unwrap()
    .expect("the flooder's bulk stream");
    let bulk = {
        let done = done.clone();
        let (mut r, mut w) = bulk.into_split();
        let reader = tokio::spawn(async move { ferry_tests::read_until_end(&mut r).await.0 });
        tokio::spawn(async move {
            let chunk = vec![0x5a_u8; 64 * KIB];
            let mut sent = 0usize;
            while !done.load(Ordering::Relaxed) && sent < 512 * KIB * KIB {
                w.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
            w.shutdown().await.unwrap();
            (sent, reader.await.unwrap())
        })
    };
    let flood = {
        let done = done.clone();
        tokio::spawn(async move {
            let (mut served, mut refused, mut closed) = (0u32, 0u32, 0u32);
            let mut held = Vec::new();
            for i in 0..20_000u32 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                if i % 32 == 31 {
                    held.clear();
                }
                let c = socks_connect_from(
                    socks,
                    Some(flooder),
                    "127.0.0.1",
                    echo.port(),
                    Some(("flood", "")),
                );
                match tokio::time::timeout(Duration::from_secs(10), c).await {
                    Ok(Ok(Ok(s))) => {
                        served += 1;
                        held.push(s);
                    }
                    Ok(Ok(Err(code))) => {
                        assert_eq!(code, 2, "a limit's refusal is SOCKS reply 0x02");
                        refused += 1;
                    }
                    // Over its streams at once: closed without a reply.
                    Ok(Err(_)) => closed += 1,
                    Err(_) => panic!("a flood connection hung for 10 s"),
                }
            }
            (served, refused, closed)
        })
    };

    // Meanwhile the steady tenant's stream, from another client: 2 MiB
    // out and back through a 3-hop circuit, checksummed, at its own rate.
    tokio::time::sleep(Duration::from_millis(300)).await; // the flood is on
    let start = Instant::now();
    let s = socks_connect_from(
        socks,
        Some(steady),
        "127.0.0.1",
        echo.port(),
        Some(("steady", "")),
    )
    .await
    .unwrap()
    .expect("the steady tenant is served during the flood");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move { send_pattern(&mut w, 7, STEADY_LEN).await });
    let (n, digest) = tokio::time::timeout(Duration::from_secs(60), read_digest(&mut r))
        .await
        .expect("the steady stream finished within 60 s")
        .unwrap();
    writer.await.unwrap().unwrap();
    let took = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    assert_eq!(n, STEADY_LEN, "every byte came back");
    assert_eq!(digest, Pattern::digest(7, STEADY_LEN), "intact");
    // Its own rate: paced to 512 KiB/s each way (a burst of 52 KiB goes at
    // once), and not much slower for the flood beside it.
    let ideal = STEADY_LEN as f64 / STEADY_RATE as f64;
    assert!(
        took >= ideal * 0.9,
        "2 MiB at 512 KiB/s took {took:.2}s: not paced"
    );
    assert!(
        took <= ideal * 3.0,
        "2 MiB at 512 KiB/s took {took:.2}s beside the flood (ideal {ideal:.1}s)"
    );
    let (served, refused, closed) = flood.await.unwrap();
    let (bulk_sent, bulk_back) = bulk.await.unwrap();
    println!(
        "steady: {took:.2}s for 2 MiB each way; flood: {served} served, {refused} refused (rate), \
         {closed} closed (streams at once), {} MiB in bulk beside it",
        bulk_sent >> 20
    );
    assert_eq!(bulk_back, bulk_sent, "the bulk stream is carried whole");
    assert!(refused > 0 && closed > 0, "the flood met both limits");
    assert!(served >= 20, "the flooder is limited, not shut out");

    let entry = &mesh.entry;
    let metric = |s: &str| entry.metric(s).unwrap_or(-1.0);
    assert!(metric("ferry_refusals_total{reason=\"rate\"}") >= refused as f64);
    assert!(metric("ferry_refusals_total{reason=\"concurrency\"}") >= closed as f64);
    assert!(metric("ferry_streams_paced_seconds_total") > 1.0);
    // The entry survives and serves a new client at once.
    let fresh = socks_connect_from(
        socks,
        Some("127.0.0.4".parse().unwrap()),
        "127.0.0.1",
        echo.port(),
        Some(("steady", "")),
    )
    .await
    .unwrap();
    assert!(fresh.is_ok(), "a new client is served after the flood");
}

/// The real `curl -p -x` through the HTTP CONNECT entry: 503 while the
/// listener is full, 429 (with Retry-After) for a client over its rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sees_503_when_the_listener_is_full_and_429_over_the_rate() {
    let http = free_port().unwrap();
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_http: Some(http),
            entry_replace: vec![
                set("connections = 4096", "connections = 8"),
                set("client_streams_per_sec = 100", "client_streams_per_sec = 1"),
                set("client_burst = 300", "client_burst = 2"),
            ],
            ..Options::default()
        },
    )
    .unwrap();
    let page = http_server("limited").await.unwrap();
    let url = format!("http://127.0.0.1:{}/", page.port());
    let curl = |from: &'static str| {
        let (url, proxy) = (url.clone(), format!("http://{http}"));
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("curl")
                .args(["-sS", "-i", "--max-time", "20", "--interface", from])
                .args(["-p", "-x", &proxy, &url])
                .output()
                .expect("running curl");
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    // Eight idle connections fill the listener: the next is told 503.
    let idle: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(tokio::net::TcpStream::connect(http).await.unwrap());
        }
        v
    };
    let open = || {
        mesh.entry
            .metric("ferry_entry_connections{listener=\"http\"}")
            .unwrap_or(-1.0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while open() != 8.0 {
        assert!(
            Instant::now() < deadline,
            "the entry counts 8 open: {}",
            open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let full = curl("127.0.0.5").await.unwrap();
    assert!(full.contains("503"), "{full}");
    assert!(
        mesh.entry
            .metric("ferry_refusals_total{reason=\"connections\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open() != 0.0 {
        assert!(Instant::now() < deadline, "the slots come back: {}", open());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A client's first two streams are served, and of six more opened at
    // once, those over its rate (one a second) are told 429.
    let mut outs = Vec::new();
    for _ in 0..2 {
        outs.push(curl("127.0.0.6").await.unwrap());
    }
    assert!(
        outs.iter().all(|o| o.contains("limited")),
        "the burst is served: {outs:?}"
    );
    let more: Vec<_> = (0..6).map(|_| curl("127.0.0.6")).collect();
    let mut limited = 0;
    for m in more {
        let o = m.await.unwrap();
        if o.contains("429") {
            assert!(o.contains("Retry-After: 1"), "{o}");
            limited += 1;
        }
    }
    assert!(
        limited >= 2,
        "a client over its rate is told 429 ({limited} of 6)"
    );
    // The log says why, without the client's address.
    let log = mesh.entry.log();
    let line = log
        .lines()
        .find(|l| l.contains("opens streams faster than 1 per second"))
        .expect("the refusal's reason in the entry's log");
    assert!(
        line.contains("reason=\"rate\"") || line.contains("reason=rate"),
        "{line}"
    );
    assert!(
        !line.contains("127.0.0.6"),
        "no client address above debug: {line}"
    );
    assert!(
        mesh.entry
            .metric("ferry_refusals_total{reason=\"rate\"}")
            .unwrap_or(0.0)
            >= limited as f64
    );
}
