//! Record seal/open: Ferry's in-place transport (ring with the raw Noise
//! split) against snow's own `TransportState`, which copies each record, as
//! the baseline measured in the same run; and what a link does to a RELAY
//! cell of the same size (`link::seal`: its header sealed alone), against
//! the whole record sealed as links did before.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry_node::crypto::{self, Session};
use std::hint::black_box;

fn pair() -> (snow::HandshakeState, snow::HandshakeState) {
    let (a_priv, _) = keypair();
    let (b_priv, b_pub) = keypair();
    let mut i = crypto::link_initiator(&a_priv, &b_pub).unwrap();
    let mut r = crypto::link_responder(&b_priv).unwrap();
    let m1 = crypto::write_hs(&mut i).unwrap();
    crypto::read_hs(&mut r, &m1).unwrap();
    let m2 = crypto::write_hs(&mut r).unwrap();
    crypto::read_hs(&mut i, &m2).unwrap();
    (i, r)
}

fn keypair() -> ([u8; 32], [u8; 32]) {
    let k = ferry_node::identity::Keys::generate();
    (k.noise_private(), k.noise_public())
}

fn seal_open(c: &mut Criterion) {
    let mut g = c.benchmark_group("record_seal_open");
    for size in [1024usize, 16 * 1024, 65_519] {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("ferry_in_place", size),
            &size,
            |b, &size| {
                let (i, r) = pair();
                let (mut tx, mut rx) = (
                    Session::from_handshake(i).unwrap(),
                    Session::from_handshake(r).unwrap(),
                );
                let mut buf = Vec::with_capacity(size + 16);
                b.iter(|| {
                    buf.clear();
                    buf.resize(size, 7);
                    tx.tx.seal_tail(&mut buf, 0).unwrap();
                    let n = rx.rx.open_in_place(&mut buf).unwrap();
                    black_box(&buf[..n]);
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new("link_relay_cell", size),
            &size,
            |b, &size| {
                use ferry_node::link::seal;
                let (i, r) = pair();
                let (mut tx, mut rx) = (
                    Session::from_handshake(i).unwrap(),
                    Session::from_handshake(r).unwrap(),
                );
                let head = ferry_proto::cell::header(9, ferry_proto::CellCmd::Relay);
                let mut buf = Vec::with_capacity(size + 16);
                b.iter(|| {
                    buf.clear();
                    buf.extend_from_slice(&head);
                    buf.resize(size, 7);
                    seal::seal(&mut tx.tx, &mut buf, 0).unwrap();
                    let n = seal::open(&mut rx.rx, &mut buf).unwrap();
                    black_box(&buf[..n]);
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new("snow_transport_baseline", size),
            &size,
            |b, &size| {
                let (i, r) = pair();
                let (mut tx, mut rx) = (
                    i.into_transport_mode().unwrap(),
                    r.into_transport_mode().unwrap(),
                );
                let plain = vec![7u8; size];
                let mut wire = vec![0u8; 65535];
                let mut out = vec![0u8; 65535];
                b.iter(|| {
                    let n = tx.write_message(&plain, &mut wire).unwrap();
                    let m = rx.read_message(&wire[..n], &mut out).unwrap();
                    black_box(&out[..m]);
                });
            },
        );
    }
    g.finish();
}

fn frame_decode(c: &mut Criterion) {
    use ferry_node::link::TRANSPORT_CODEC;
    let mut g = c.benchmark_group("frame_decode");
    let mut wire = Vec::new();
    for _ in 0..64 {
        TRANSPORT_CODEC.encode(&[1u8; 16 * 1024], &mut wire);
    }
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("64_frames_of_16k", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(&wire[..]);
            let mut n = 0;
            while let Some(f) = TRANSPORT_CODEC.decode(&mut buf).unwrap() {
                n += f.len();
            }
            black_box(n);
        });
    });
    g.finish();
}

criterion_group!(benches, seal_open, frame_decode);
criterion_main!(benches);
