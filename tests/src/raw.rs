//! A hostile peer's view of a node's link: the handshake (recorded, for
//! replays), sealed frames, and circuits built with the real telescoping
//! build along any path, of any length.

use crate::Proc;
use ferry_node::crypto::{self, Session};
use ferry_node::identity::Keys;
use ferry_node::link::{HANDSHAKE_CODEC, TRANSPORT_CODEC, seal};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs a link handshake with `node` as the test's fake peer, including
/// the initiator's identity proof (its first transport frame).
pub async fn handshake(node: &Proc, keys: &Keys) -> (TcpStream, Session) {
    let (s, session, _) = handshake_recorded(node, keys).await;
    (s, session)
}

/// [`handshake`], returning also the bytes the fake peer sent in it (its
/// message 1 and its proof frame), as an eavesdropper would record them.
pub async fn handshake_recorded(node: &Proc, keys: &Keys) -> (TcpStream, Session, Vec<u8>) {
    let mut s = TcpStream::connect(node.link.unwrap()).await.unwrap();
    let mut hs = crypto::link_initiator(&keys.noise_private(), &node.noise_key).unwrap();
    let mut out = Vec::new();
    HANDSHAKE_CODEC.encode(&crypto::write_hs(&mut hs).unwrap(), &mut out);
    s.write_all(&out).await.unwrap();
    let mut sent = out;
    let mut buf = bytes::BytesMut::new();
    let m2 = loop {
        if let Some(f) = HANDSHAKE_CODEC.decode(&mut buf).unwrap() {
            break f;
        }
        assert!(
            s.read_buf(&mut buf).await.unwrap() > 0,
            "node closed the handshake"
        );
    };
    crypto::read_hs(&mut hs, &m2).unwrap();
    let proof = crypto::prove(
        &keys.identity,
        crypto::LINK_INITIATOR_PROOF,
        &crypto::handshake_hash(&hs),
    );
    let mut session = Session::from_handshake(hs).unwrap();
    let first = proof_frame(&mut session, &proof);
    s.write_all(&first).await.unwrap();
    sent.extend_from_slice(&first);
    (s, session, sent)
}

/// Seals the initiator's identity proof as the first transport frame,
/// whole, as a link's dialler does before cells flow.
pub fn proof_frame(session: &mut Session, proof: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    TRANSPORT_CODEC.put_prefix(proof.len() + 16, &mut out);
    let start = out.len();
    out.extend_from_slice(proof);
    session.tx.seal_tail(&mut out, start).unwrap();
    out
}

/// Seals `cell` as one transport frame, as a link's writer does
/// (`ferry_node::link::seal`).
pub fn frame(session: &mut Session, cell: &[u8]) -> Vec<u8> {
    seal::frame(&mut session.tx, cell).unwrap()
}

/// A link the test drives as a hostile origin: cells in and out, sealed.
pub struct RawLink {
    /// The socket.
    pub s: TcpStream,
    /// The link's session.
    pub session: Session,
    /// Bytes read and not yet taken.
    pub buf: bytes::BytesMut,
}

impl RawLink {
    /// Opens a link to `node` as `keys`.
    pub async fn open(node: &Proc, keys: &Keys) -> Self {
        let (s, session) = handshake(node, keys).await;
        Self {
            s,
            session,
            buf: bytes::BytesMut::new(),
        }
    }

    /// Sends one cell, sealed.
    pub async fn send(&mut self, cell: &[u8]) {
        let f = frame(&mut self.session, cell);
        self.s.write_all(&f).await.unwrap();
    }

    /// The next cell for a circuit (link-level cells skipped), within 15 s.
    pub async fn next(&mut self) -> bytes::BytesMut {
        let read = async {
            loop {
                while let Some(mut f) = TRANSPORT_CODEC.decode(&mut self.buf).unwrap() {
                    let n = seal::open(&mut self.session.rx, &mut f).unwrap();
                    f.truncate(n);
                    if !f.starts_with(&[0; 4]) {
                        return f;
                    }
                }
                assert!(
                    self.s.read_buf(&mut self.buf).await.unwrap() > 0,
                    "the node closed the link"
                );
            }
        };
        tokio::time::timeout(Duration::from_secs(15), read)
            .await
            .expect("no cell within 15 s")
    }

    /// Builds `path` on circuit `circ` as a hostile origin may (any nodes,
    /// any length, with the real telescoping build): the hops built, and
    /// how the build ended.
    pub async fn build(&mut self, circ: u32, path: &[&Proc]) -> (usize, String) {
        let (built, how, _) = self.build_session(circ, path).await;
        (built, how)
    }

    /// Builds `path` on circuit `circ`, which must succeed: the
    /// end-to-end session with its last hop, as an origin's stream
    /// session (2 MiB window). It offers no probes, as a peer built before
    /// congestion control: the exit sends it up to the streams' windows,
    /// which is what a hostile origin that wants a node to queue would do.
    pub async fn circuit(&mut self, circ: u32, path: &[&Proc]) -> ferry_circuit::Session {
        let (built, how, session) = self.build_session(circ, path).await;
        let keys = session.unwrap_or_else(|| panic!("{built} hops built, then {how}"));
        let cfg = ferry_circuit::Config {
            window: 2 << 20,
            congestion: false,
            ..Default::default()
        };
        ferry_circuit::Session::new(ferry_circuit::Side::Origin, circ, keys, cfg)
    }

    /// Sends every cell `s` has queued, in one write.
    pub async fn flush(&mut self, s: &mut ferry_circuit::Session) {
        let mut out = Vec::new();
        while let Some(c) = s.poll_transmit() {
            out.extend_from_slice(&frame(&mut self.session, &c));
        }
        self.s.write_all(&out).await.unwrap();
    }

    async fn build_session(
        &mut self,
        circ: u32,
        path: &[&Proc],
    ) -> (usize, String, Option<Session>) {
        use ferry_circuit::{Build, Step};
        use ferry_proto::{Cell, CellCmd};
        let hops = path.iter().map(|p| hop(p)).collect();
        let (mut build, create) = Build::start(circ, hops, u64::MAX).unwrap();
        self.send(&create).await;
        let mut built = 0;
        loop {
            let cell = self.next().await;
            let c = Cell::parse(&cell).unwrap();
            assert_eq!(c.circ_id, circ, "a cell for another circuit");
            let step = match c.cmd {
                CellCmd::Created => build.handle_created(&cell),
                CellCmd::Control => build.handle_control(cell),
                CellCmd::Destroy => {
                    let d: ferry_proto::pb::Destroy = prost::Message::decode(c.body).unwrap();
                    return (
                        built,
                        format!("destroyed: {}", d.reason().as_str_name()),
                        None,
                    );
                }
                other => panic!("unexpected {other:?}"),
            };
            match step {
                Ok(Step::Send(next)) => {
                    built += 1;
                    self.send(&next).await;
                }
                Ok(Step::Done(s)) => return (built + 1, "built".into(), Some(*s)),
                Err(e) => return (built, e.to_string(), None),
            }
        }
    }
}

/// The circuit-build hop for a node of a test mesh.
pub fn hop(p: &Proc) -> ferry_circuit::Hop {
    ferry_circuit::Hop {
        node: ferry_router::NodeId(
            hex::decode(&p.id)
                .ok()
                .and_then(|id| id.try_into().ok())
                .expect("a node id is 32 bytes of hex"),
        ),
        noise_key: p.noise_key,
    }
}

/// A hostile client's keys, and the `[[peers]]` block that makes nodes
/// take its links (an entry-only node of jurisdiction NL).
pub fn fake_entry() -> (Keys, String) {
    let fake = Keys::generate();
    let block = ferry_node::config::peer_block(
        &fake.node_id(),
        &fake.noise_public(),
        None,
        "NL",
        ferry_router::Roles {
            entry: true,
            ..ferry_router::Roles::default()
        },
    );
    (fake, block)
}
