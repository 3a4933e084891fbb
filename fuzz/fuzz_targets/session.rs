//! The exit's end of a circuit's session, fed stream messages an origin
//! sealed with the session's real keys: what a hostile origin (or a
//! hostile exit, the other way) can make of BEGIN, DATA, WINDOW, END and
//! RESUME in any order and with any contents.
#![no_main]

use bytes::{BufMut, BytesMut};
use ferry_circuit::{Config, Event, Session, Side, crypto};
use ferry_proto::{CellCmd, cell};
use libfuzzer_sys::fuzz_target;

fn keys() -> (crypto::Session, crypto::Session) {
    let kp = snow::Builder::new(crypto::HOP_PATTERN.parse().unwrap())
        .generate_keypair()
        .unwrap();
    let private: [u8; 32] = kp.private.try_into().unwrap();
    let public: [u8; 32] = kp.public.try_into().unwrap();
    let id = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let mut i = crypto::hop_initiator(&public).unwrap();
    let m1 = crypto::write_hs(&mut i).unwrap();
    let (exit, m2) = crypto::hop_respond(&[private], &id, &m1).unwrap();
    crypto::read_hs(&mut i, &m2).unwrap();
    (crypto::Session::from_handshake(i).unwrap(), exit)
}

fuzz_target!(|data: &[u8]| {
    let (mut origin, exit_keys) = keys();
    let cfg = Config {
        window: 1 << 16,
        max_streams: 8,
        resume_timeout_ms: 1_000,
    };
    let mut exit = Session::new(Side::Exit, 1, exit_keys, cfg);
    let mut now = 0u64;
    // Messages: a length byte, then that many bytes of stream message.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (msg, tail) = tail.split_at(n);
        rest = tail;
        let mut buf = BytesMut::with_capacity(cell::HEADER_LEN + msg.len() + 16);
        buf.put_slice(&cell::header(1, CellCmd::Relay));
        buf.put_slice(msg);
        origin
            .tx
            .seal_tail_bytes(&mut buf, cell::HEADER_LEN)
            .unwrap();
        if exit.handle_relay(buf).is_err() {
            // A real exit destroys the circuit here.
            return;
        }
        while let Some(ev) = exit.poll_event() {
            match ev {
                Event::Begin { id, .. } => {
                    let _ = exit.accept(id, [len; 16]);
                }
                Event::Data { id, data } => {
                    let _ = exit.consumed(id, data.len() as u64);
                }
                _ => {}
            }
        }
        while exit.poll_transmit().is_some() {}
        now += 100;
        let _ = exit.handle_timeout(now);
    }
});
