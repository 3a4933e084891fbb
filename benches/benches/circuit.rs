//! The circuit core's cost per DATA record: one record through
//! `ferry_circuit::Session` — the origin stamps, keeps a resend copy and
//! seals it, the exit opens, checks and hands it over, the exit's app
//! consumes it (a WINDOW every quarter window, which the origin takes) —
//! against the baseline measured in the same run: the bare AEAD seal and
//! open of a record of the same size, which the core cannot avoid. The
//! ratio is what the sans-IO state machine adds over the cryptography.

use bytes::{BufMut, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry_circuit::{Config, Event, HEADROOM, Outcome, Session, Side, crypto};
use std::hint::black_box;

fn keys() -> (crypto::Session, crypto::Session) {
    let k = ferry_node::identity::Keys::generate();
    let id = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let mut i = crypto::hop_initiator(&k.noise_public()).unwrap();
    let m1 = crypto::write_hs(&mut i).unwrap();
    let (exit, m2) = crypto::hop_respond(&k.noise.responder_keys(0), &id, &m1).unwrap();
    crypto::read_hs(&mut i, &m2).unwrap();
    (crypto::Session::from_handshake(i).unwrap(), exit)
}

/// An origin and an exit with one open stream.
fn open_pair() -> (Session, Session, u32) {
    let (origin, exit, ids) = open_many(1, Config::default());
    (origin, exit, ids[0])
}

fn data_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("circuit_data_record");
    for size in [1024usize, 16 * 1024, ferry_proto::MAX_DATA_PAYLOAD] {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("session", size), &size, |b, &size| {
            let (mut origin, mut exit, id) = open_pair();
            let payload = vec![7u8; size];
            b.iter(|| {
                let mut buf = BytesMut::with_capacity(HEADROOM + size + 16);
                buf.put_bytes(0, HEADROOM);
                buf.put_slice(&payload);
                assert!(matches!(
                    origin.send_data(id, buf, 0).unwrap(),
                    Outcome::Done
                ));
                // The record, and a probe when one is due.
                while let Some(cell) = origin.poll_transmit() {
                    exit.handle_relay(cell, 0).unwrap();
                }
                while let Some(ev) = exit.poll_event() {
                    if let Event::Data { data, .. } = ev {
                        let _ = exit.consumed(id, black_box(data).len() as u64).unwrap();
                    }
                }
                while let Some(c) = exit.poll_transmit() {
                    origin.handle_relay(c, 0).unwrap();
                }
                while origin.poll_event().is_some() {}
            });
        });
        g.bench_with_input(
            BenchmarkId::new("aead_baseline", size),
            &size,
            |b, &size| {
                let (mut o, mut x) = keys();
                let payload = vec![7u8; size];
                b.iter(|| {
                    let mut buf = BytesMut::with_capacity(HEADROOM + size + 16);
                    buf.put_bytes(0, HEADROOM);
                    buf.put_slice(&payload);
                    o.tx.seal_tail_bytes(&mut buf, ferry_proto::cell::HEADER_LEN)
                        .unwrap();
                    let n =
                        x.rx.open_in_place(&mut buf[ferry_proto::cell::HEADER_LEN..])
                            .unwrap();
                    black_box(n);
                });
            },
        );
    }
    g.finish();
}

/// An origin and an exit with `n` open streams.
fn open_many(n: usize, cfg: Config) -> (Session, Session, Vec<u32>) {
    let (o, x) = keys();
    let mut origin = Session::new(Side::Origin, 1, o, cfg.clone());
    let mut exit = Session::new(Side::Exit, 1, x, cfg);
    let ids: Vec<u32> = (0..n)
        .map(|_| origin.open("target.example", 80).unwrap())
        .collect();
    while let Some(c) = origin.poll_transmit() {
        exit.handle_relay(c, 0).unwrap();
    }
    while exit.poll_event().is_some() {}
    for id in &ids {
        assert!(matches!(exit.accept(*id, [3; 16]).unwrap(), Outcome::Done));
    }
    while let Some(c) = exit.poll_transmit() {
        origin.handle_relay(c, 0).unwrap();
    }
    while origin.poll_event().is_some() {}
    (origin, exit, ids)
}

/// Many streams on one circuit, as at an entry with a thousand clients:
/// each round, every stream whose turn it is sends one 16 KiB record, and
/// the exit takes 16 records' worth of what arrived, streams in turn, so
/// the circuit stays full and the streams it has no room for wait in its
/// line. Time per record sent, its delivery and acknowledgement included;
/// one stream alone is the baseline. A record the session refused is
/// kept and sent again, as the entry does.
fn waiting_line(c: &mut Criterion) {
    let mut g = c.benchmark_group("circuit_waiting_line");
    const RECORD: usize = 16 * 1024;
    // What the exit's side takes a round.
    const TAKE: u64 = 16 * RECORD as u64;
    g.throughput(Throughput::Bytes(RECORD as u64));
    for n in [1usize, 64] {
        g.bench_with_input(BenchmarkId::new("streams", n), &n, |b, &n| {
            // Congestion control off: the circuit's window is then what
            // the streams wait for.
            let cfg = Config {
                congestion: false,
                ..Config::default()
            };
            let (mut origin, mut exit, ids) = open_many(n, cfg);
            let mut ready: std::collections::VecDeque<u32> = ids.iter().copied().collect();
            let mut unread = std::collections::VecDeque::<(u32, u64)>::new();
            let mut refused = std::collections::HashMap::<u32, BytesMut>::new();
            b.iter_custom(|records| {
                let t0 = std::time::Instant::now();
                let mut sent = 0u64;
                let mut stalled = 0u32;
                while sent < records {
                    let before = sent;
                    // Each stream whose turn it is sends a record.
                    for _ in 0..ready.len() {
                        if sent == records {
                            break;
                        }
                        let id = ready.pop_front().expect("counted");
                        let buf = refused.remove(&id).unwrap_or_else(|| {
                            let mut buf = BytesMut::with_capacity(HEADROOM + RECORD + 16);
                            buf.put_bytes(0, HEADROOM);
                            buf.put_bytes(7, RECORD);
                            buf
                        });
                        match origin.send_data(id, buf, 0).unwrap() {
                            Outcome::Done => {
                                sent += 1;
                                ready.push_back(id);
                            }
                            Outcome::Blocked(buf) => {
                                refused.insert(id, buf);
                            }
                            Outcome::Elsewhere(_) => panic!("stream {id} left the circuit"),
                        }
                    }
                    while let Some(cell) = origin.poll_transmit() {
                        exit.handle_relay(cell, 0).unwrap();
                    }
                    while let Some(ev) = exit.poll_event() {
                        if let Event::Data { id, data } = ev {
                            let n = black_box(data).len() as u64;
                            match unread.iter_mut().find(|(u, _)| *u == id) {
                                Some((_, left)) => *left += n,
                                None => unread.push_back((id, n)),
                            }
                        }
                    }
                    // The exit's side takes 16 records a round, streams in
                    // turn: the circuit fills, and the rest wait in line.
                    let mut budget = TAKE;
                    while budget > 0
                        && let Some((id, left)) = unread.pop_front()
                    {
                        let k = left.min(budget).min(RECORD as u64);
                        let _ = exit.consumed(id, k).unwrap();
                        budget -= k;
                        if left > k {
                            unread.push_back((id, left - k));
                        }
                    }
                    while let Some(c) = exit.poll_transmit() {
                        origin.handle_relay(c, 0).unwrap();
                    }
                    while let Some(ev) = origin.poll_event() {
                        if let Event::Writable { id } = ev
                            && !ready.contains(&id)
                        {
                            ready.push_back(id);
                        }
                    }
                    if sent == before && budget == TAKE {
                        stalled += 1;
                        assert!(stalled < 10_000, "the streams stopped");
                    } else {
                        stalled = 0;
                    }
                }
                t0.elapsed()
            });
        });
    }
    g.finish();
}

/// A CREATE's cryptography at the hop (`crypto::hop_respond`: Noise NK as
/// responder and the identity proof), beside what it is made of, measured
/// in the same run: X25519 by curve25519-dalek (snow's stock primitive:
/// an agreement, a key pair made with a ladder and with the Edwards
/// table) and by aws-lc (an agreement, a key pair), an Ed25519 signature.
fn circuit_setup(c: &mut Criterion) {
    let mut g = c.benchmark_group("circuit_setup");
    let k = ferry_node::identity::Keys::generate();
    let id = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let mut i = crypto::hop_initiator(&k.noise_public()).unwrap();
    let m1 = crypto::write_hs(&mut i).unwrap();
    let statics = [crypto::StaticKey::new(k.noise_private())];
    g.bench_function("hop_respond", |b| {
        b.iter(|| black_box(crypto::hop_respond(&statics, &id, black_box(&m1)).unwrap()));
    });
    // The same with snow's stock primitives (its `ring-accelerated`
    // resolver: X25519 by curve25519-dalek, the static key's public half
    // derived per handshake), as `hop_respond` was before Ferry's own.
    g.bench_function("hop_respond_stock_snow", |b| {
        let private = k.noise_private();
        b.iter(|| {
            let mut hs = snow::Builder::new(crypto::HOP_PATTERN.parse().unwrap())
                .local_private_key(&private)
                .and_then(|b| b.prologue(crypto::HOP_PROLOGUE))
                .and_then(|b| b.build_responder())
                .unwrap();
            let mut scratch = [0u8; 256];
            hs.read_message(black_box(&m1), &mut scratch).unwrap();
            let proof = crypto::prove(&id, crypto::HOP_PROOF, hs.get_handshake_hash());
            let msg2 = crypto::write_hs_with(&mut hs, &proof).unwrap();
            black_box((crypto::Session::from_handshake(hs).unwrap(), msg2))
        });
    });
    let point = k.noise_public();
    g.bench_function("x25519_dalek", |b| {
        b.iter(|| black_box(x25519_dalek::x25519(black_box([9; 32]), point)));
    });
    g.bench_function("x25519_dalek_base", |b| {
        b.iter(|| {
            black_box(x25519_dalek::x25519(
                black_box([9; 32]),
                x25519_dalek::X25519_BASEPOINT_BYTES,
            ))
        });
    });
    g.bench_function("x25519_dalek_mul_base", |b| {
        let s = x25519_dalek::StaticSecret::from([9; 32]);
        b.iter(|| black_box(x25519_dalek::PublicKey::from(black_box(&s))));
    });
    use aws_lc_rs::agreement::{PrivateKey, UnparsedPublicKey, X25519, agree};
    let peer = UnparsedPublicKey::new(&X25519, point);
    let key = PrivateKey::from_private_key(&X25519, &[9; 32]).unwrap();
    g.bench_function("x25519_aws_lc", |b| {
        b.iter(|| agree(&key, peer, (), |s| Ok(black_box(s[0]))).unwrap());
    });
    g.bench_function("x25519_aws_lc_keygen", |b| {
        b.iter(|| {
            let e = PrivateKey::generate(&X25519).unwrap();
            black_box(e.compute_public_key().unwrap())
        });
    });
    g.bench_function("ed25519_sign", |b| {
        use ed25519_dalek::Signer;
        b.iter(|| black_box(id.sign(black_box(&[7u8; 49]))));
    });
    g.finish();
}

criterion_group!(benches, data_record, waiting_line, circuit_setup);
criterion_main!(benches);
