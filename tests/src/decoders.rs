//! Every decoder of bytes a peer, a client or an operator's file hands a
//! node, one function per fuzz target (`fuzz/`): the cargo-fuzz targets
//! call these, and `tests/corpus.rs` replays the committed corpora through
//! them on every test run. Each ignores what the input is (an error is a
//! fine answer); what it must never do is panic, hang, or allocate what
//! the input asks for before bounding it.

use bytes::{BufMut, BytesMut};
use ferry_circuit::{Config, Event, Session, Side};
use ferry_node::crypto;
use ferry_node::identity::Keys;
use ferry_proto::pb;
use ferry_proto::{Cell, CellCmd, StreamMsg, cell, decode_pb};

/// A target: its name (as in `fuzz/Cargo.toml`) and its body.
pub type Target = (&'static str, fn(&[u8]));

/// The targets.
pub const TARGETS: [Target; 8] = [
    ("frames", frames),
    ("cells", cells),
    ("session", session),
    ("handshake", handshake),
    ("socks", socks),
    ("http_connect", http_connect),
    ("signed", signed),
    ("config", config),
];

/// Link frames (handshake and transport codecs), the bytes cut into reads
/// at the size the first byte says; transport frames each opened as a
/// link's reader opens them (`link::seal::open`; with a key of the first
/// byte, so they open only by chance: what is fuzzed is the bounds before
/// the tag is checked).
pub fn frames(data: &[u8]) {
    use ferry_node::link::{HANDSHAKE_CODEC, TRANSPORT_CODEC, seal};
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut).max(1);
    let mut buf = BytesMut::new();
    'handshake: for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match HANDSHAKE_CODEC.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => break 'handshake,
            }
        }
    }
    let mut opener = ferry_node::crypto::Opener::new(&[cut; 32]);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match TRANSPORT_CODEC.decode(&mut buf) {
                Ok(Some(mut frame)) => {
                    if let Ok(n) = seal::open(&mut opener, &mut frame) {
                        assert!(n <= frame.len());
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// Cell headers, stream messages, and every protobuf body they carry.
pub fn cells(data: &[u8]) {
    if let Ok(c) = Cell::parse(data) {
        let _ = c.cmd.name();
        let _ = decode_pb::<pb::Destroy>("destroy", c.body);
        let _ = decode_pb::<pb::DrainNotice>("notice", c.body);
        let _ = decode_pb::<pb::Control>("control", c.body);
        let _ = decode_pb::<pb::ControlReply>("control reply", c.body);
    }
    if let Ok(m) = StreamMsg::parse(data) {
        let _ = m.window_ack();
        let _ = decode_pb::<pb::Begin>("begin", m.body);
        let _ = decode_pb::<pb::Connected>("connected", m.body);
        let _ = decode_pb::<pb::End>("end", m.body);
        let _ = decode_pb::<pb::Resume>("resume", m.body);
        let _ = decode_pb::<pb::Resumed>("resumed", m.body);
    }
}

/// A matching pair of end-to-end sessions (origin, exit) on fixed keys,
/// each at its first nonce. (Fixed, not from a hop handshake per input:
/// the handshake is the `handshake` target's, and would cost this target
/// nine tenths of its executions.)
fn session_keys() -> (crypto::Session, crypto::Session) {
    let (up, down) = ([0x11; 32], [0x22; 32]);
    (
        crypto::Session {
            tx: crypto::Sealer::new(&up),
            rx: crypto::Opener::new(&down),
        },
        crypto::Session {
            tx: crypto::Sealer::new(&down),
            rx: crypto::Opener::new(&up),
        },
    )
}

/// An exit's session fed stream messages sealed with its real keys (each
/// a length byte, then that many bytes), as a hostile origin can send them.
pub fn session(data: &[u8]) {
    let (mut origin, exit_keys) = session_keys();
    let cfg = Config {
        window: 1 << 16,
        max_streams: 8,
        resume_timeout_ms: 1_000,
        congestion: true,
    };
    let mut exit = Session::new(Side::Exit, 1, exit_keys, cfg);
    let mut now = 0u64;
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
            .expect("seal");
        if exit.handle_relay(buf, now).is_err() {
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
        exit.handle_timeout(now);
    }
}

/// A link's Noise IK message 1, a hop's CREATE (Noise NK), identity proofs.
pub fn handshake(data: &[u8]) {
    // One node's keys for every input (generating them is most of the
    // cost of an input that fails early).
    static NODE: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(Keys::generate);
    let node = &*NODE;
    if let Ok(mut hs) = crypto::link_responder(&node.noise_private()) {
        let _ = crypto::read_hs(&mut hs, data);
    }
    let _ = crypto::hop_respond(&node.noise.responder_keys(0), &node.identity, data);
    let _ = crypto::check_proof(data, crypto::LINK_INITIATOR_PROOF, &[1; 32], None);
}

/// A pipelined SOCKS5 handshake (`socks::wire`), and the connection
/// options a password may carry.
pub fn socks(data: &[u8]) {
    use ferry_node::socks::wire::{self, Parsed};
    let mut rest = data;
    match wire::greeting(rest) {
        Ok(Parsed::Done(_, n)) => rest = &rest[n..],
        _ => return,
    }
    if let Ok(Parsed::Done((_, pass), n)) = wire::userpass(rest) {
        let _ = ferry_node::routing::ConnOptions::parse(&pass);
        if let Some((_, opts)) = pass.split_once('|') {
            let _ = ferry_node::routing::ConnOptions::parse(opts);
        }
        rest = &rest[n..];
    }
    if let Ok(Parsed::Done((host, _), n)) = wire::request(rest) {
        assert!(!host.is_empty() && n <= rest.len());
    }
}

/// The HTTP CONNECT entry's request head.
pub fn http_connect(data: &[u8]) {
    let _ = ferry_node::http_proxy::parse_head(data);
}

/// Adverts (certificates inside), certificates, revocations and rulings,
/// checked as a node checks them.
pub fn signed(data: &[u8]) {
    static AUTHORITY: std::sync::LazyLock<ferry_node::authority::Authority> =
        std::sync::LazyLock::new(|| {
            let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
            let public = hex::encode(key.verifying_key().to_bytes());
            ferry_node::authority::Authority::new(&[public], 1).expect("authority")
        });
    let authority = &*AUTHORITY;
    let now = 1_800_000_000_000;
    let _ = ferry_node::directory::verify_advert(data, now);
    let _ = authority.verify_cert(data, &ferry_router::NodeId([1; 32]), now);
    let _ = authority.verify_revocation(data);
    let _ = authority.verify(data, Some(now));
}

/// A node's config file: interpolation (no environment), TOML, validation.
pub fn config(data: &[u8]) {
    use ferry_node::config::{FileConfig, NodeConfig, interpolate};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(text) = interpolate(text, |_| None) else {
        return;
    };
    let Ok(file) = toml::from_str::<FileConfig>(&text) else {
        return;
    };
    let _ = NodeConfig::try_from(file);
}
