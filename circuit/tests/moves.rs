//! The stream-move defects of the old node code, pinned step by step on the
//! sans-IO core: each test drives an origin and an exit over two circuits
//! by hand, cell by cell, with cells lost where the defect needed them
//! lost.

use bytes::{BufMut, BytesMut};
use ferry_circuit::{
    Config, Event, Found, HEADROOM, Outcome, Phase, Resumables, Session, Side, Token,
};
use ferry_proto::pb::EndReason;

mod common;
use common::keys;

const TOKEN: Token = [7; 16];

fn cfg() -> Config {
    Config {
        window: 1 << 16,
        max_streams: 16,
        resume_timeout_ms: 1_000,
        // These pin moves and the windows; `congestion.rs` tests probing.
        congestion: false,
    }
}

/// A circuit: the origin's end and the exit's end.
struct Circ {
    o: Session,
    x: Session,
}

fn circuit() -> Circ {
    let (o, x) = keys();
    Circ {
        o: Session::new(Side::Origin, 1, o, cfg()),
        x: Session::new(Side::Exit, 1, x, cfg()),
    }
}

/// Delivers every queued cell origin → exit.
fn up(c: &mut Circ) {
    while let Some(cell) = c.o.poll_transmit() {
        c.x.handle_relay(cell, 0).unwrap();
    }
}

/// Delivers every queued cell exit → origin.
fn down(c: &mut Circ) {
    while let Some(cell) = c.x.poll_transmit() {
        c.o.handle_relay(cell, 0).unwrap();
    }
}

/// Loses every queued cell both ways.
fn lose(c: &mut Circ) {
    while c.o.poll_transmit().is_some() {}
    while c.x.poll_transmit().is_some() {}
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn record(data: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(HEADROOM + data.len() + 16);
    b.put_bytes(0, HEADROOM);
    b.put_slice(data);
    b
}

/// What an app saw: bytes, and whether it ended cleanly or with an error.
#[derive(Default, Debug)]
struct Seen {
    bytes: Vec<u8>,
    finished: bool,
    reset: Option<EndReason>,
}

impl Seen {
    fn take(&mut self, s: &mut Session, id: u32) -> Vec<Event> {
        let mut rest = Vec::new();
        for ev in events(s) {
            match ev {
                Event::Data { id: i, data } if i == id => {
                    self.bytes.extend_from_slice(&data);
                    let _ = s.consumed(id, data.len() as u64).unwrap();
                }
                Event::Finished { id: i } if i == id => self.finished = true,
                Event::Reset { id: i, reason, .. } if i == id => self.reset = Some(reason),
                e => rest.push(e),
            }
        }
        rest
    }
}

/// A circuit whose streams have `window` each, with `n` streams opened
/// and connected (their events taken).
fn circuit_of(window: u32, n: usize) -> (Circ, Vec<u32>) {
    let (o, x) = keys();
    let cfg = Config {
        window,
        max_streams: 64,
        resume_timeout_ms: 1_000,
        congestion: false,
    };
    let mut c = Circ {
        o: Session::new(Side::Origin, 1, o, cfg.clone()),
        x: Session::new(Side::Exit, 1, x, cfg),
    };
    let ids: Vec<u32> = (0..n)
        .map(|_| c.o.open("target.example", 80).unwrap())
        .collect();
    up(&mut c);
    for id in &ids {
        assert!(matches!(c.x.accept(*id, TOKEN).unwrap(), Outcome::Done));
    }
    down(&mut c);
    let _ = events(&mut c.x);
    let _ = events(&mut c.o);
    (c, ids)
}

/// Opens stream 1 on `c` and connects it at the exit.
fn open(c: &mut Circ) -> u32 {
    let id = c.o.open("target.example", 80).unwrap();
    up(c);
    assert!(matches!(events(&mut c.x)[..], [Event::Begin { .. }]));
    assert!(matches!(c.x.accept(id, TOKEN).unwrap(), Outcome::Done));
    down(c);
    let ev = events(&mut c.o);
    assert!(matches!(ev[0], Event::Connected { .. }), "{ev:?}");
    id
}

/// The `Resume` event the exit's session `to` raised.
fn resume_event(to: &mut Session) -> (u32, u32, u64, bool) {
    let ev: Vec<Event> = events(to)
        .into_iter()
        .filter(|e| !matches!(e, Event::Writable { .. }))
        .collect();
    let [
        Event::Resume {
            id,
            token,
            received,
            fin,
            attempt,
        },
    ] = ev[..]
    else {
        panic!("expected one resume: {ev:?}")
    };
    assert_eq!(token, TOKEN);
    (id, attempt, received, fin)
}

/// The exit's shell for a `Resume` on `to` for a stream `from_id` on the
/// same session.
fn exit_moves_within(to: &mut Session, from_id: u32) -> u32 {
    let (id, attempt, received, fin) = resume_event(to);
    let s = to.take_for_move(from_id, attempt, received).unwrap();
    to.accept_move(id, s, attempt, received, fin)
        .map_err(|(e, _)| e)
        .unwrap();
    id
}

/// The exit's shell for a `Resume` on `to` for a stream on session `from`.
fn exit_moves(to: &mut Session, from: &mut Session, from_id: u32) -> u32 {
    let (id, attempt, received, fin) = resume_event(to);
    let s = from.take_for_move(from_id, attempt, received).unwrap();
    to.accept_move(id, s, attempt, received, fin)
        .map_err(|(e, _)| e)
        .unwrap();
    id
}

/// Defect 1: a `Resume` that is never answered used to leave the move's
/// waiter set, so a later END was swallowed and the client hung. Now the
/// timeout hands the stream back, explicitly, and it carries on.
#[test]
fn an_unanswered_resume_hands_the_stream_back_and_its_end_still_arrives() {
    let (mut a, mut b) = (circuit(), circuit());
    let id = open(&mut a);
    let mut seen = Seen::default();
    assert!(matches!(
        a.x.send_data(id, record(b"one "), 0).unwrap(),
        Outcome::Done
    ));
    down(&mut a);
    seen.take(&mut a.o, id);
    // Move to b; b's Resume is lost.
    let s = a.o.detach(id).unwrap();
    let bid = b.o.attach_resume(s, 0).map_err(|(e, _)| e).unwrap();
    assert_eq!(b.o.poll_timeout(), Some(1_000));
    lose(&mut b);
    b.o.handle_timeout(999);
    assert!(events(&mut b.o).is_empty(), "not before the deadline");
    b.o.handle_timeout(1_000);
    let mut ev = events(&mut b.o);
    assert_eq!(ev.len(), 1, "{ev:?}");
    let Some(Event::MoveFailed {
        id: failed, stream, ..
    }) = ev.pop()
    else {
        panic!("a failed move")
    };
    assert_eq!(failed, bid);
    assert_eq!(b.o.stream_count(), 0, "nothing is left waiting on b");
    assert_eq!(b.o.poll_timeout(), None);
    // Back onto a (a Resume on the circuit it came from); the exit moves
    // it within a.
    let aid =
        a.o.attach_resume(*stream, 1_000)
            .map_err(|(e, _)| e)
            .unwrap();
    up(&mut a);
    let xid = exit_moves_within(&mut a.x, id);
    down(&mut a);
    let rest = seen.take(&mut a.o, aid);
    assert!(
        rest.iter().any(|e| matches!(e, Event::Moved { .. })),
        "{rest:?}"
    );
    // The exit ends the stream; the END reaches the origin's app.
    assert!(matches!(
        a.x.send_data(xid, record(b"two"), 0).unwrap(),
        Outcome::Done
    ));
    a.x.finish(xid, EndReason::Done, "").unwrap();
    down(&mut a);
    seen.take(&mut a.o, aid);
    assert_eq!(seen.bytes, b"one two");
    assert!(seen.finished && seen.reset.is_none(), "{seen:?}");
}

/// Defect 2: the exit used to forget a stream (token and resend buffer) as
/// soon as its socket was done, while its last bytes and END were still in
/// flight; a move then ended the stream short. Now the exit keeps it until
/// the origin has acknowledged everything, END included, so the move
/// brings the rest.
#[test]
fn a_move_after_the_exit_finished_still_brings_the_last_bytes_and_the_end() {
    let (mut a, mut b) = (circuit(), circuit());
    let id = open(&mut a);
    // The origin is done sending: END, acknowledged.
    a.o.finish(id, EndReason::Done, "").unwrap();
    up(&mut a);
    let mut exit_seen = Seen::default();
    exit_seen.take(&mut a.x, id);
    assert!(exit_seen.finished);
    // The exit sends its last bytes and END: lost with the old circuit.
    assert!(matches!(
        a.x.send_data(id, record(b"last bytes"), 0).unwrap(),
        Outcome::Done
    ));
    a.x.finish(id, EndReason::Done, "").unwrap();
    lose(&mut a);
    assert_eq!(a.x.stream_count(), 1, "kept until the origin has it all");
    // The origin moves the stream; the exit finds it and sends the rest.
    let s = a.o.detach(id).unwrap();
    let bid = b.o.attach_resume(s, 0).map_err(|(e, _)| e).unwrap();
    up(&mut b);
    let xid = exit_moves(&mut b.x, &mut a.x, id);
    down(&mut b);
    let mut seen = Seen::default();
    seen.take(&mut b.o, bid);
    assert_eq!(seen.bytes, b"last bytes");
    assert!(seen.finished, "{seen:?}");
    // The origin's acknowledgement (END included) lets both ends forget it.
    up(&mut b);
    let ev = events(&mut b.x);
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Closed { id, .. } if *id == xid)),
        "{ev:?}"
    );
    assert_eq!(b.x.stream_count(), 0);
    down(&mut b);
    assert_eq!(b.o.stream_count(), 0);
}

/// Defect 3: if the new circuit died after the exit had accepted `Resume`,
/// falling back to the old circuit could not work (the exit had dropped
/// the stream from it). Now the exit parks the stream of a closed circuit,
/// and a `Resume` on any circuit — the old one too — finds it.
#[test]
fn when_the_new_circuit_dies_mid_move_the_old_one_takes_the_stream_back() {
    let (mut a, mut b) = (circuit(), circuit());
    let id = open(&mut a);
    let mut registry: Resumables<()> = Resumables::new(30_000, 16);
    registry.live(TOKEN, ());
    let s = a.o.detach(id).unwrap();
    b.o.attach_resume(s, 0).map_err(|(e, _)| e).unwrap();
    up(&mut b);
    let xid = exit_moves(&mut b.x, &mut a.x, id);
    assert!(b.x.has_transmits(), "RESUMED queued, not yet delivered");
    // Circuit b dies: the origin gets its moving stream back, the exit
    // parks what it holds.
    let mut back = b.o.close();
    assert_eq!(back.len(), 1);
    let (_, stream) = back.pop().unwrap();
    assert!(matches!(stream.phase(), Phase::Moving { .. }));
    let mut parked = b.x.close();
    assert_eq!(parked[0].0, xid);
    registry.park((), parked.pop().unwrap().1, 10);
    // Fall back to a.
    let aid = a.o.attach_resume(stream, 20).map_err(|(e, _)| e).unwrap();
    up(&mut a);
    let (rid, attempt, received, fin) = resume_event(&mut a.x);
    let Found::Parked((), s) = registry.find(&TOKEN) else {
        panic!("the parked stream is found")
    };
    a.x.accept_move(rid, *s, attempt, received, fin)
        .map_err(|(e, _)| e)
        .unwrap();
    down(&mut a);
    assert!(
        events(&mut a.o)
            .iter()
            .any(|e| matches!(e, Event::Moved { id } if *id == aid))
    );
    assert!(matches!(
        a.x.send_data(rid, record(b"still here"), 0).unwrap(),
        Outcome::Done
    ));
    a.x.finish(rid, EndReason::Done, "").unwrap();
    down(&mut a);
    let mut seen = Seen::default();
    seen.take(&mut a.o, aid);
    assert_eq!(seen.bytes, b"still here");
    assert!(seen.finished);
}

/// A `Resume` delayed on a slow circuit cannot pull a stream back from
/// where a later move put it: the exit refuses it by its attempt number,
/// and the stream stays.
#[test]
fn a_stale_resume_is_refused_and_the_stream_stays() {
    let (mut a, mut b, mut c) = (circuit(), circuit(), circuit());
    let id = open(&mut a);
    // Move to b; its Resume is slow. Times out; move to c instead.
    let s = a.o.detach(id).unwrap();
    b.o.attach_resume(s, 0).map_err(|(e, _)| e).unwrap();
    b.o.handle_timeout(1_000);
    let Some(Event::MoveFailed { stream, .. }) = events(&mut b.o).pop() else {
        panic!("timed out")
    };
    let cid =
        c.o.attach_resume(*stream, 1_000)
            .map_err(|(e, _)| e)
            .unwrap();
    up(&mut c);
    let xid = exit_moves(&mut c.x, &mut a.x, id);
    down(&mut c);
    assert!(
        events(&mut c.o)
            .iter()
            .any(|e| matches!(e, Event::Moved { .. }))
    );
    // Now b's Resume arrives at the exit.
    up(&mut b);
    let (_, attempt, received, _) = resume_event(&mut b.x);
    assert!(c.x.take_for_move(xid, attempt, received).is_err(), "stale");
    assert_eq!(c.x.stream_count(), 1, "the stream stays on c");
    // And it still carries bytes on c.
    assert!(matches!(
        c.x.send_data(xid, record(b"on c"), 0).unwrap(),
        Outcome::Done
    ));
    down(&mut c);
    let mut seen = Seen::default();
    seen.take(&mut c.o, cid);
    assert_eq!(seen.bytes, b"on c");
}

/// An abnormal end reaches the other side's app as an error, never as a
/// clean end; and the stream is gone at once.
#[test]
fn an_abnormal_end_is_a_reset_not_a_clean_close() {
    let mut a = circuit();
    let id = open(&mut a);
    assert!(matches!(
        a.x.send_data(id, record(b"part"), 0).unwrap(),
        Outcome::Done
    ));
    a.x.finish(id, EndReason::Reset, "connection reset")
        .unwrap();
    assert_eq!(a.x.stream_count(), 0);
    down(&mut a);
    let mut seen = Seen::default();
    seen.take(&mut a.o, id);
    assert_eq!(seen.bytes, b"part");
    assert_eq!(seen.reset, Some(EndReason::Reset));
    assert!(!seen.finished);
    assert_eq!(a.o.stream_count(), 0);
}

/// A peer that sends past the window breaks the protocol (a hostile exit,
/// forging cells with its real session keys).
#[test]
fn sending_past_the_window_is_a_protocol_error() {
    use ferry_proto::stream::{StreamKind, header};
    use ferry_proto::{CellCmd, cell};
    use prost::Message;
    let (o, mut x) = keys();
    let mut origin = Session::new(Side::Origin, 1, o, cfg());
    let id = origin.open("target.example", 80).unwrap();
    let mut forge = |kind: StreamKind, body: &[u8]| {
        let mut b = BytesMut::new();
        b.put_slice(&cell::header(1, CellCmd::Relay));
        b.put_slice(&header(kind, id));
        b.put_slice(body);
        x.tx.seal_tail_bytes(&mut b, cell::HEADER_LEN).unwrap();
        b
    };
    let connected = ferry_proto::pb::Connected {
        window: 1 << 20,
        resume_token: TOKEN.to_vec(),
        probes: false,
    }
    .encode_to_vec();
    origin
        .handle_relay(forge(StreamKind::Connected, &connected), 0)
        .unwrap();
    let data = |off: u64| {
        let mut body = off.to_be_bytes().to_vec();
        body.extend_from_slice(&[9u8; 40_000]);
        body
    };
    origin
        .handle_relay(forge(StreamKind::Data, &data(0)), 0)
        .unwrap();
    let err = origin
        .handle_relay(forge(StreamKind::Data, &data(40_000)), 0)
        .unwrap_err();
    assert_eq!(err.kind(), "window", "{err}");
    assert!(err.is_violation());
    // And a DATA offset beyond what was received is refused too.
    let (o, mut x2) = keys();
    let mut origin = Session::new(Side::Origin, 1, o, cfg());
    let id2 = origin.open("target.example", 80).unwrap();
    assert_eq!(id2, id);
    let mut b = BytesMut::new();
    b.put_slice(&cell::header(1, CellCmd::Relay));
    b.put_slice(&header(StreamKind::Data, id));
    b.put_slice(&data(5));
    x2.tx.seal_tail_bytes(&mut b, cell::HEADER_LEN).unwrap();
    let err = origin.handle_relay(b, 0).unwrap_err();
    assert_eq!(err.kind(), "protocol", "{err}");
}

/// A keepalive is an open stream's current acknowledgement: one cell the
/// peer takes as credit at most, so relays see the circuit in use while
/// its streams are quiet; with no open stream there is nothing to send.
#[test]
fn a_keepalive_changes_nothing_at_the_peer() {
    let mut a = circuit();
    assert!(!a.o.keepalive().unwrap(), "no stream, no keepalive");
    let id = open(&mut a);
    assert!(matches!(
        a.x.send_data(id, record(b"hello"), 0).unwrap(),
        Outcome::Done
    ));
    down(&mut a);
    let mut seen = Seen::default();
    seen.take(&mut a.o, id);
    up(&mut a);
    let _ = events(&mut a.x);
    assert!(a.o.keepalive().unwrap());
    let cells: Vec<BytesMut> = std::iter::from_fn(|| a.o.poll_transmit()).collect();
    assert_eq!(cells.len(), 1, "one cell");
    for c in cells {
        a.x.handle_relay(c, 0).unwrap();
    }
    // At most the acknowledgement is news (the origin had not sent it
    // yet): the exit may send more; nothing else happens.
    assert!(
        events(&mut a.x)
            .iter()
            .all(|e| matches!(e, Event::Writable { .. })),
        "nothing but credit at the exit"
    );
    // The stream carries on.
    assert!(matches!(
        a.x.send_data(id, record(b" again"), 0).unwrap(),
        Outcome::Done
    ));
    down(&mut a);
    seen.take(&mut a.o, id);
    assert_eq!(seen.bytes, b"hello again");
}

/// A sender keeps at most `CIRCUIT_WINDOW` unacknowledged over all the
/// streams of a circuit, whatever each stream's own window allows; an
/// acknowledgement on one stream lets the others go on.
#[test]
fn a_circuit_has_a_window_over_its_streams() {
    use ferry_circuit::CIRCUIT_WINDOW;
    // Each stream's own window is three quarters of the circuit's.
    let own = (CIRCUIT_WINDOW / 4 * 3) as u32;
    let (mut a, ids) = circuit_of(own, 3);
    let chunk = ferry_proto::MAX_DATA_PAYLOAD;
    let fill = |x: &mut Session, id: u32| {
        let mut n = 0u64;
        while let Outcome::Done = x.send_data(id, record(&vec![1; chunk]), 0).unwrap() {
            n += chunk as u64;
        }
        n
    };
    // Stream 1 sends its own window; stream 2 only what is left of the
    // circuit's, though its own window would take as much again; stream 3
    // nothing.
    let one = fill(&mut a.x, ids[0]);
    let two = fill(&mut a.x, ids[1]);
    assert!(one > u64::from(own) - chunk as u64, "{one}");
    assert!(
        two <= CIRCUIT_WINDOW - one && two > CIRCUIT_WINDOW - one - chunk as u64,
        "{two}"
    );
    assert_eq!(fill(&mut a.x, ids[2]), 0);
    assert!(a.x.in_flight() <= CIRCUIT_WINDOW);
    // The origin reads stream 1: its acknowledgement wakes stream 3 too.
    down(&mut a);
    let mut seen = Seen::default();
    let _ = seen.take(&mut a.o, ids[0]);
    up(&mut a);
    let woke = events(&mut a.x);
    assert!(
        woke.iter()
            .any(|e| matches!(e, Event::Writable { id } if *id == ids[2])),
        "{woke:?}"
    );
    assert!(matches!(
        a.x.send_data(ids[2], record(&vec![3; chunk]), 0).unwrap(),
        Outcome::Done
    ));
}

/// Many streams each below their own acknowledgement threshold (a quarter
/// of their window) can together hold the whole circuit window: the
/// receiver acknowledges them all once a quarter of the circuit window is
/// consumed and unacknowledged, so the circuit never stops for want of an
/// acknowledgement (it did, with 20 streams).
#[test]
fn many_quiet_acknowledgements_do_not_stop_a_circuit() {
    use ferry_circuit::CIRCUIT_WINDOW;
    let (mut a, ids) = circuit_of(2 << 20, 20);
    let chunk = ferry_proto::MAX_DATA_PAYLOAD;
    let mut got = 0u64;
    // Round-robin over the streams, as long as the circuit lets the exit
    // send; the origin consumes all it gets. 64 MiB in all must pass.
    while got < 8 * CIRCUIT_WINDOW {
        let mut sent = 0;
        for id in &ids {
            if let Outcome::Done = a.x.send_data(*id, record(&vec![5; chunk]), 0).unwrap() {
                sent += 1;
            }
        }
        down(&mut a);
        for ev in events(&mut a.o) {
            if let Event::Data { id, data } = ev {
                got += data.len() as u64;
                let _ = a.o.consumed(id, data.len() as u64).unwrap();
            }
        }
        up(&mut a);
        let _ = events(&mut a.x);
        assert!(sent > 0, "the circuit stopped at {got} bytes");
    }
}
