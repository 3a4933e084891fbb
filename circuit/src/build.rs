//! The telescoping build of a circuit, as a step machine.
//!
//! The origin runs a Noise NK handshake with the first hop inside
//! CREATE/CREATED, then, for each further hop, sends the current tip an
//! EXTEND sealed with its session: the tip alone reads which node comes
//! next, so every relay learns only its two neighbours. Each hop proves its
//! identity over the handshake hash in its answer, so a node that
//! advertises another's Noise key is found out (the key's holder answers as
//! itself). The session with the last hop — the exit — is the end-to-end
//! session.
//!
//! [`Build::start`] gives the CREATE cell; each answer goes to
//! [`Build::handle_created`] or [`Build::handle_control`], which give the
//! next cell to send or the finished session; a DESTROY to
//! [`Build::handle_destroy`]. The shell enforces [`Build::deadline`].

use crate::crypto::{self, Session};
use crate::error::{Error, Result};
use bytes::{BufMut, BytesMut};
use ferry_proto::pb;
use ferry_proto::pb::DestroyReason;
use ferry_proto::{CellCmd, TAG_LEN, cell};
use ferry_router::NodeId;
use prost::Message;

/// One node of a path to build, with the Noise key its certificate-vouched
/// advert binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The node.
    pub node: NodeId,
    /// Its Noise static key.
    pub noise_key: [u8; 32],
}

/// What to do after an answer.
pub enum Step {
    /// Send this cell (an EXTEND for the next hop) on the circuit's link.
    Send(BytesMut),
    /// The circuit is complete: the end-to-end session with the exit.
    Done(Box<Session>),
}

/// A circuit being built.
pub struct Build {
    circ: u32,
    hops: Vec<Hop>,
    /// The hop being built to.
    at: usize,
    /// The handshake with the hop built to now (`None` once done).
    hs: Option<snow::HandshakeState>,
    /// The handshake hash after message 1: what the hop's proof signs.
    h1: Vec<u8>,
    /// The session with the tip so far (after the first hop).
    session: Option<Session>,
    deadline: u64,
}

impl std::fmt::Debug for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Build")
            .field("circ", &self.circ)
            .field("hop", &self.at)
            .field("of", &self.hops.len())
            .finish()
    }
}

impl Build {
    /// Starts building `hops` (origin side first, at least one) on the
    /// link-local circuit id `circ`; the build must finish by `deadline`
    /// (ms). Returns the CREATE cell for the first hop.
    pub fn start(circ: u32, hops: Vec<Hop>, deadline: u64) -> Result<(Self, BytesMut)> {
        let first = hops
            .first()
            .ok_or_else(|| Error::Protocol("a circuit needs at least one hop".into()))?;
        let mut hs = crypto::hop_initiator(&first.noise_key)?;
        let m1 = crypto::write_hs(&mut hs)?;
        let h1 = crypto::handshake_hash(&hs);
        let mut create = BytesMut::with_capacity(cell::HEADER_LEN + m1.len());
        create.put_slice(&cell::header(circ, CellCmd::Create));
        create.put_slice(&m1);
        let build = Self {
            circ,
            hops,
            at: 0,
            hs: Some(hs),
            h1,
            session: None,
            deadline,
        };
        Ok((build, create))
    }

    /// The node the build waits on now.
    pub fn hop(&self) -> NodeId {
        self.hops[self.at].node
    }

    /// When the build fails if unfinished (ms).
    pub fn deadline(&self) -> u64 {
        self.deadline
    }

    /// The circuit id on the first link.
    pub fn circ(&self) -> u32 {
        self.circ
    }

    /// The first hop answered CREATE (`cell` is the whole CREATED cell).
    pub fn handle_created(&mut self, cell: &[u8]) -> Result<Step> {
        if self.at != 0 || self.session.is_some() {
            return Err(Error::Protocol("CREATED out of turn".into()));
        }
        let body = cell.get(cell::HEADER_LEN..).unwrap_or_default();
        self.finish_hop(body)
    }

    /// The tip answered an EXTEND (`cell` is the whole CONTROL cell).
    pub fn handle_control(&mut self, mut cell: BytesMut) -> Result<Step> {
        let Some(session) = self.session.as_mut() else {
            return Err(Error::Protocol("CONTROL before CREATED".into()));
        };
        let body = &mut cell[cell::HEADER_LEN..];
        let n = session.rx.open_in_place(body)?;
        let reply: pb::ControlReply = ferry_proto::decode_pb("control reply", &body[..n])?;
        match reply.msg {
            Some(pb::control_reply::Msg::Extended(ext)) => self.finish_hop(&ext.handshake),
            Some(pb::control_reply::Msg::ExtendFailed(f)) => Err(Error::ExtendRefused {
                next: self.hop(),
                reason: f.reason(),
                detail: f.detail,
            }),
            None => Err(Error::Protocol("empty control reply".into())),
        }
    }

    /// A hop destroyed the circuit during the build: why it failed.
    pub fn handle_destroy(&self, reason: DestroyReason) -> Error {
        Error::Destroyed {
            hop: self.hop(),
            reason,
        }
    }

    /// Reads the current hop's message 2 and its proof; then either the
    /// EXTEND to the next hop, or the finished session.
    fn finish_hop(&mut self, msg2: &[u8]) -> Result<Step> {
        let node = self.hop();
        let mut hs = self
            .hs
            .take()
            .ok_or_else(|| Error::Protocol("answer after the build finished".into()))?;
        let proof = crypto::read_hs(&mut hs, msg2)?;
        crypto::check_proof(&proof, crypto::HOP_PROOF, &self.h1, Some(&node))?;
        let mut session = Session::from_handshake(hs)?;
        let Some(next) = self.hops.get(self.at + 1) else {
            self.session = None;
            return Ok(Step::Done(Box::new(session)));
        };
        let mut next_hs = crypto::hop_initiator(&next.noise_key)?;
        self.at += 1;
        let m1 = crypto::write_hs(&mut next_hs)?;
        self.h1 = crypto::handshake_hash(&next_hs);
        self.hs = Some(next_hs);
        let ctl = pb::Control {
            msg: Some(pb::control::Msg::Extend(pb::Extend {
                node_id: self.hops[self.at].node.0.to_vec(),
                handshake: m1,
            })),
        }
        .encode_to_vec();
        let mut buf = BytesMut::with_capacity(cell::HEADER_LEN + ctl.len() + TAG_LEN);
        buf.put_slice(&cell::header(self.circ, CellCmd::Control));
        buf.put_slice(&ctl);
        session.tx.seal_tail_bytes(&mut buf, cell::HEADER_LEN)?;
        self.session = Some(session);
        Ok(Step::Send(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::pb::RefusalReason;

    /// A hop: its Noise key pair and identity.
    struct Node {
        private: [u8; 32],
        hop: Hop,
        identity: ed25519_dalek::SigningKey,
    }

    fn node(seed: u8) -> Node {
        let kp = snow::Builder::new(crypto::HOP_PATTERN.parse().unwrap())
            .generate_keypair()
            .unwrap();
        let identity = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        Node {
            private: kp.private.try_into().unwrap(),
            hop: Hop {
                node: NodeId(identity.verifying_key().to_bytes()),
                noise_key: kp.public.try_into().unwrap(),
            },
            identity,
        }
    }

    /// The tip's side of an EXTEND: opens it with its session, and answers
    /// what `answer` makes of the handshake, sealed.
    fn tip_answers(
        tip: &mut Session,
        cell: BytesMut,
        answer: impl FnOnce(pb::Extend) -> pb::control_reply::Msg,
    ) -> BytesMut {
        let mut cell = cell;
        let body = &mut cell[cell::HEADER_LEN..];
        let n = tip.rx.open_in_place(body).unwrap();
        let ctl: pb::Control = ferry_proto::decode_pb("control", &body[..n]).unwrap();
        let Some(pb::control::Msg::Extend(ext)) = ctl.msg else {
            panic!("an EXTEND")
        };
        let reply = pb::ControlReply {
            msg: Some(answer(ext)),
        }
        .encode_to_vec();
        let mut out = BytesMut::new();
        out.put_slice(&cell::header(9, CellCmd::Control));
        out.put_slice(&reply);
        tip.tx.seal_tail_bytes(&mut out, cell::HEADER_LEN).unwrap();
        out
    }

    #[test]
    fn three_hops_telescope_and_the_last_session_reaches_the_exit() {
        let nodes: Vec<Node> = (1..=3).map(node).collect();
        let (mut b, create) =
            Build::start(9, nodes.iter().map(|n| n.hop.clone()).collect(), 1_000).unwrap();
        assert_eq!(b.hop(), nodes[0].hop.node);
        let (mut tip, m2) = crypto::hop_respond(
            &[crypto::StaticKey::new(nodes[0].private)],
            &nodes[0].identity,
            &create[cell::HEADER_LEN..],
        )
        .unwrap();
        let mut created = BytesMut::new();
        created.put_slice(&cell::header(9, CellCmd::Created));
        created.put_slice(&m2);
        let mut step = b.handle_created(&created).unwrap();
        for n in &nodes[1..] {
            let Step::Send(extend) = step else {
                panic!("an EXTEND to send")
            };
            let mut next = None;
            let reply = tip_answers(&mut tip, extend, |ext| {
                assert_eq!(
                    ext.node_id,
                    n.hop.node.0.to_vec(),
                    "the tip learns the next hop"
                );
                let (s, m2) = crypto::hop_respond(
                    &[crypto::StaticKey::new(n.private)],
                    &n.identity,
                    &ext.handshake,
                )
                .unwrap();
                next = Some(s);
                pb::control_reply::Msg::Extended(pb::Extended { handshake: m2 })
            });
            step = b.handle_control(reply).unwrap();
            tip = next.unwrap();
        }
        let Step::Done(mut session) = step else {
            panic!("done after the last hop")
        };
        // The session is with the exit, and nobody else.
        let mut rec = b"end to end".to_vec();
        session.tx.seal_tail(&mut rec, 0).unwrap();
        let n = tip.rx.open_in_place(&mut rec).unwrap();
        assert_eq!(&rec[..n], b"end to end");
        assert!(
            b.handle_created(&created).is_err(),
            "no answer after the build"
        );
    }

    #[test]
    fn a_hop_that_answers_as_another_node_is_found_out() {
        let (a, impostor) = (node(1), node(2));
        let (mut b, create) = Build::start(9, vec![a.hop.clone()], 1_000).unwrap();
        // The key's holder answers, but proves another identity.
        let (_, m2) = crypto::hop_respond(
            &[crypto::StaticKey::new(a.private)],
            &impostor.identity,
            &create[cell::HEADER_LEN..],
        )
        .unwrap();
        let mut created = BytesMut::new();
        created.put_slice(&cell::header(9, CellCmd::Created));
        created.put_slice(&m2);
        let err = b.handle_created(&created).map(|_| ()).unwrap_err();
        assert_eq!(err.kind(), "crypto", "{err}");
    }

    #[test]
    fn a_refused_extend_names_the_hop_and_whether_it_is_leaving() {
        let (a, c) = (node(1), node(3));
        let (mut b, create) = Build::start(9, vec![a.hop.clone(), c.hop.clone()], 1_000).unwrap();
        let (mut tip, m2) = crypto::hop_respond(
            &[crypto::StaticKey::new(a.private)],
            &a.identity,
            &create[cell::HEADER_LEN..],
        )
        .unwrap();
        let mut created = BytesMut::new();
        created.put_slice(&cell::header(9, CellCmd::Created));
        created.put_slice(&m2);
        let Step::Send(extend) = b.handle_created(&created).unwrap() else {
            panic!("an EXTEND")
        };
        let reply = tip_answers(&mut tip, extend, |_| {
            pb::control_reply::Msg::ExtendFailed(pb::ExtendFailed {
                reason: RefusalReason::Draining as i32,
                detail: "leaving".into(),
            })
        });
        let err = b.handle_control(reply).map(|_| ()).unwrap_err();
        assert_eq!(err.hop_leaving(), Some(c.hop.node));
        assert_eq!(err.kind(), "extend_refused");
        assert_eq!(
            b.handle_destroy(DestroyReason::Exited).hop_leaving(),
            Some(c.hop.node)
        );
    }
}
