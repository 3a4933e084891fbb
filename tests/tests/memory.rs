//! What an open stream costs the nodes at its ends: a stream that carries
//! little holds little.
//!
//! Real processes: an entry and an exit (one hop). 500 streams each send 2
//! KB every quarter second to a sink for six seconds; the entry's and the
//! exit's resident memory may grow by at most 32 KiB per stream, and every
//! byte must arrive on its own stream, unaltered.
//!
//! Before, each stream's socket reader reserved room for four full records
//! (256 KiB) and its resend ring started at 64 KiB and was acknowledged
//! only a quarter window (512 KiB) at a time, so a slow stream held more
//! the longer it lived: this test measured about 100 KiB per stream at the
//! entry after six seconds.

use ferry_tests::{Mesh, Options, Spec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STREAMS: usize = 500;

/// An entry and an exit, one hop; the entry takes 1,000 streams a second
/// from its one client, and `extra` replaces text in its config.
fn one_hop(extra: &[(&str, &str)]) -> Mesh {
    let raise = |(a, b): &(&str, &str)| (a.to_string(), b.to_string());
    let mut entry_replace: Vec<_> = [
        (
            "client_streams_per_sec = 100",
            "client_streams_per_sec = 1000",
        ),
        ("client_burst = 300", "client_burst = 1000"),
    ]
    .iter()
    .map(raise)
    .collect();
    entry_replace.extend(extra.iter().map(raise));
    Mesh::start(
        &[Spec::new("IS", "exit")],
        &Options {
            hops: 1,
            entry_replace,
            ..Options::default()
        },
    )
    .unwrap()
}
/// The most a slow stream may cost each end, bytes.
const PER_STREAM: u64 = 32 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_streams_hold_little_memory_at_the_ends() {
    let mesh = one_hop(&[]);
    mesh.echo_ping().await.unwrap();

    // Each stream starts with its index (two bytes), then carries the byte
    // `index % 251`: the sink checks every byte of every connection and
    // counts them by stream.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink = l.local_addr().unwrap().port();
    let got = Arc::new(AtomicU64::new(0));
    let by_stream = Arc::new(Mutex::new(HashMap::<u16, u64>::new()));
    let altered = Arc::new(AtomicU64::new(0));
    {
        let (got, by_stream, altered) = (got.clone(), by_stream.clone(), altered.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (got, by_stream, altered) = (got.clone(), by_stream.clone(), altered.clone());
                tokio::spawn(async move {
                    let mut id = [0u8; 2];
                    if s.read_exact(&mut id).await.is_err() {
                        return;
                    }
                    let id = u16::from_be_bytes(id);
                    let mut n = 2u64;
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(k) = s.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                        if buf[..k].iter().any(|b| *b != (id % 251) as u8) {
                            altered.fetch_add(1, Ordering::Relaxed);
                        }
                        n += k as u64;
                        got.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    got.fetch_add(2, Ordering::Relaxed);
                    by_stream.lock().unwrap().insert(id, n);
                });
            }
        });
    }

    // Allocators settle after the warm-up stream.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (entry0, exit0) = (
        mesh.entry.rss_bytes().unwrap(),
        mesh.nodes[0].rss_bytes().unwrap(),
    );
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let mut s = match mesh.open(sink, "").await {
            Ok(s) => s,
            Err(e) => panic!("stream {i}: {e:#}\n{}", mesh.entry.log()),
        };
        let (sent, stop) = (sent.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let chunk = vec![(i % 251) as u8; 2000];
            s.write_all(&(i as u16).to_be_bytes()).await.expect("write");
            let mut mine = 2u64;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                s.write_all(&chunk).await.expect("write");
                mine += chunk.len() as u64;
            }
            s.shutdown().await.expect("shutdown");
            sent.fetch_add(mine, Ordering::Relaxed);
            mine
        }));
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (entry1, exit1) = (
        mesh.entry.rss_bytes().unwrap(),
        mesh.nodes[0].rss_bytes().unwrap(),
    );
    stop.store(true, Ordering::Relaxed);
    let mut mine = Vec::new();
    for t in tasks {
        mine.push(t.await.unwrap());
    }
    let want = sent.load(Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    while (got.load(Ordering::Relaxed) < want || by_stream.lock().unwrap().len() < STREAMS)
        && t0.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(altered.load(Ordering::Relaxed), 0, "bytes altered");
    let by_stream = by_stream.lock().unwrap().clone();
    for (i, n) in mine.iter().enumerate() {
        assert_eq!(
            by_stream.get(&(i as u16)),
            Some(n),
            "stream {i}: sent {n} bytes, the sink got another count"
        );
    }
    let per = |a: u64, b: u64| b.saturating_sub(a) / STREAMS as u64;
    println!(
        "per slow stream: entry {} KiB, exit {} KiB ({want} bytes carried)",
        per(entry0, entry1) / 1024,
        per(exit0, exit1) / 1024
    );
    for (who, a, b) in [("entry", entry0, entry1), ("exit", exit0, exit1)] {
        assert!(
            per(a, b) <= PER_STREAM,
            "the {who} grew by {} KiB per slow stream (at most {} KiB)",
            per(a, b) / 1024,
            PER_STREAM / 1024
        );
    }
}

/// Idle circuits at an entry.
const CIRCUITS: usize = 400;
/// The most an idle circuit may cost an entry, its idle stream included,
/// bytes.
const PER_CIRCUIT: u64 = 16 * 1024;

/// An entry that puts each stream on a circuit of its own: 400 streams each
/// send a few bytes, get them echoed and go quiet; the entry's resident
/// memory may grow by at most 16 KiB per circuit, its stream included, and
/// every stream still echoes afterwards.
///
/// Before, a SOCKS client's task kept the room of its handshake and of its
/// stream's opening for the stream's whole life (11.1 KiB), and a quiet
/// stream's socket reader kept its last read's room: this test measured
/// about 18 KiB per circuit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_circuits_hold_little_memory_at_the_entry() {
    let mesh = one_hop(&[(
        "max_streams_per_circuit = 64",
        "max_streams_per_circuit = 1",
    )]);
    mesh.echo_ping().await.unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    async fn round_trip(s: &mut tokio::net::TcpStream, i: usize) -> anyhow::Result<()> {
        let msg = format!("stream {i:05}");
        s.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        anyhow::ensure!(back == msg.as_bytes(), "stream {i}: echoed other bytes");
        Ok(())
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let entry0 = mesh.entry.rss_bytes().unwrap();
    let mut held = Vec::with_capacity(CIRCUITS);
    for i in 0..CIRCUITS {
        let mut s = match mesh.open(echo, "").await {
            Ok(s) => s,
            Err(e) => panic!("stream {i}: {e:#}\n{}", mesh.entry.log()),
        };
        round_trip(&mut s, i).await.unwrap();
        held.push(s);
    }
    // Past the delayed acknowledgement (200 ms): the resend rings are empty.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let entry1 = mesh.entry.rss_bytes().unwrap();
    let circuits = ferry_tests::entry_circuits(&mesh.entry.status().unwrap()).len();
    assert!(
        circuits >= CIRCUITS,
        "the entry lists {circuits} circuits for {CIRCUITS} streams on circuits of their own"
    );
    for (i, s) in held.iter_mut().enumerate() {
        round_trip(s, i).await.unwrap();
    }
    let per = entry1.saturating_sub(entry0) / CIRCUITS as u64;
    println!("per idle circuit at the entry, its stream included: {per} bytes");
    assert!(
        per <= PER_CIRCUIT,
        "the entry grew by {} KiB per idle circuit (at most {} KiB)",
        per / 1024,
        PER_CIRCUIT / 1024
    );
}

/// Streams a client pushes into a target that never reads.
const PUSHED: usize = 16;
/// The most of a peer's bytes an end's kernel may hold per stream: its
/// socket's receive buffer, bounded (the kernel doubles what is asked, and
/// counts its own overhead in it).
const PARKED: u64 = 768 * 1024;

/// Writes into `s`, with a 32 MiB send buffer, until it takes nothing for
/// half a second (its send buffer and the other end's receive buffer are
/// full) or `until`; whether it stalled.
async fn push_until_stalled(s: &mut tokio::net::TcpStream, until: std::time::Instant) -> bool {
    socket2::SockRef::from(&*s)
        .set_send_buffer_size(32 << 20)
        .unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    while std::time::Instant::now() < until {
        let wrote = tokio::time::timeout(Duration::from_millis(500), s.write_all(&chunk)).await;
        if wrote.is_err() {
            return true;
        }
    }
    false
}

/// The receive queues (bytes) of the established sockets `ss` finds for
/// `filter` (an `ss` filter expression).
fn receive_queues(filter: &str) -> Vec<u64> {
    let out = std::process::Command::new("ss")
        .args(["-tnH", "state", "established", filter])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Asserts that the `PUSHED` established sockets `ss` finds for `filter`
/// each hold at most [`PARKED`] bytes unread: `whose` kernel, `what`.
fn assert_parked_little(filter: &str, whose: &str, what: &str) {
    let queued = receive_queues(filter);
    assert!(queued.len() >= PUSHED, "ss listed {} sockets", queued.len());
    let most = queued.iter().copied().max().unwrap_or(0);
    println!("the {whose} kernel holds at most {most} bytes of a stream ({queued:?})");
    assert!(
        most <= PARKED,
        "the {whose} kernel holds {} KiB of {what} (at most {} KiB)",
        most / 1024,
        PARKED / 1024
    );
}

/// A client that sends faster than its streams go (its target never
/// reads) parks its bytes in the entry's kernel, in its sockets' receive
/// buffers. Those must stay bounded per stream: autotuned, each grows to
/// `tcp_rmem`'s most (32 MiB on this machine), and a few hundred streams
/// put the host past its TCP memory (`tcp_mem`), where the kernel drops
/// segments on every socket, the mesh's links among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_parks_little_in_the_entrys_kernel() {
    let mesh = one_hop(&[]);
    mesh.echo_ping().await.unwrap();
    // A target that takes connections and never reads them.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    // Each client writes until its stream takes nothing, for 20 s at most.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let mut streams = Vec::new();
    for i in 0..PUSHED {
        let mut s = match mesh.open(target, "").await {
            Ok(s) => s,
            Err(e) => panic!("stream {i}: {e:#}\n{}", mesh.entry.log()),
        };
        assert!(
            push_until_stalled(&mut s, until).await,
            "the streams were still taking bytes after 20 s"
        );
        streams.push(s);
    }
    // What the entry's kernel holds for them: the receive queues of its
    // sockets on its SOCKS port.
    let port = mesh.socks().port();
    assert_parked_little(
        &format!("( sport = :{port} )"),
        "entry's",
        "one client stream",
    );
}

/// The same at the exit: a target that sends faster than its stream goes
/// (its client never reads) parks its bytes in the exit's kernel, in its
/// socket's receive buffer, which must stay bounded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_parks_little_in_the_exits_kernel() {
    let mesh = one_hop(&[]);
    mesh.echo_ping().await.unwrap();
    // A target that sends to every connection until it takes nothing for
    // half a second, for 20 s at most.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap().port();
    let stalled = Arc::new(AtomicU64::new(0));
    {
        let stalled = stalled.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let stalled = stalled.clone();
                tokio::spawn(async move {
                    let until = std::time::Instant::now() + Duration::from_secs(20);
                    if push_until_stalled(&mut s, until).await {
                        stalled.fetch_add(1, Ordering::Relaxed);
                    }
                    // Held open until the test ends.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
    }
    // Clients that never read.
    let mut held = Vec::new();
    for i in 0..PUSHED {
        match mesh.open(target, "").await {
            Ok(s) => held.push(s),
            Err(e) => panic!("stream {i}: {e:#}\n{}", mesh.entry.log()),
        }
    }
    let t0 = std::time::Instant::now();
    while stalled.load(Ordering::Relaxed) < PUSHED as u64 && t0.elapsed() < Duration::from_secs(25)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stalled.load(Ordering::Relaxed),
        PUSHED as u64,
        "the targets were still sending after 20 s"
    );
    // What the exit's kernel holds: the receive queues of its sockets to
    // the target.
    assert_parked_little(
        &format!("( dport = :{target} )"),
        "exit's",
        "one target's stream",
    );
    drop(held);
}
