//! Congestion control at the session: who probes, what a probe costs a
//! peer that breaks the rules, and the streams of a circuit taking turns
//! for its room.

use bytes::{BufMut, BytesMut};
use ferry_circuit::{Config, Event, HEADROOM, Outcome, Session, Side, congestion};
use ferry_proto::stream::{StreamKind, StreamMsg, header};
use ferry_proto::{CellCmd, MAX_DATA_PAYLOAD, cell};
use prost::Message;

mod common;
use common::keys;

const TOKEN: [u8; 16] = [7; 16];

fn cfg(congestion: bool) -> Config {
    Config {
        window: 8 << 20,
        max_streams: 16,
        resume_timeout_ms: 1_000,
        congestion,
    }
}

fn record(n: usize, byte: u8) -> BytesMut {
    let mut b = BytesMut::with_capacity(HEADROOM + n + 16);
    b.put_bytes(0, HEADROOM);
    b.put_bytes(byte, n);
    b
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// An origin and an exit (each with congestion control on or off) and
/// `n` connected streams.
fn pair(origin_cc: bool, exit_cc: bool, n: usize) -> (Session, Session, Vec<u32>) {
    let (o, x) = keys();
    let mut o = Session::new(Side::Origin, 1, o, cfg(origin_cc));
    let mut x = Session::new(Side::Exit, 1, x, cfg(exit_cc));
    let ids: Vec<u32> = (0..n)
        .map(|_| o.open("target.example", 80).unwrap())
        .collect();
    while let Some(c) = o.poll_transmit() {
        x.handle_relay(c, 0).unwrap();
    }
    for id in &ids {
        assert!(matches!(x.accept(*id, TOKEN).unwrap(), Outcome::Done));
    }
    while let Some(c) = x.poll_transmit() {
        o.handle_relay(c, 0).unwrap();
    }
    let _ = events(&mut o);
    let _ = events(&mut x);
    (o, x, ids)
}

/// The kinds of the cells `from` has queued, opened with a copy of the
/// receiver's keys: the sessions here are fresh, so a second pair from the
/// same handshake is not at hand; instead the cells are handed to `to`
/// and counted by what `to` did. Returns how many PROBEs `to` answered
/// (each answer is a PONG queued at `to`).
fn deliver(from: &mut Session, to: &mut Session, now: u64) -> usize {
    let mut probes = 0;
    while let Some(c) = from.poll_transmit() {
        let before = to.has_transmits();
        to.handle_relay(c, now).unwrap();
        // A DATA cell queues nothing at `to`; a PROBE queues its PONG.
        if !before && to.has_transmits() {
            probes += 1;
            // Keep counting one by one.
            let pong = to.poll_transmit().unwrap();
            from.handle_relay(pong, now).unwrap();
        }
    }
    probes
}

/// Fills stream `id` at `s` until the session refuses a record; returns
/// the bytes it took.
fn fill(s: &mut Session, id: u32, now: u64) -> u64 {
    let mut n = 0;
    while let Outcome::Done = s.send_data(id, record(MAX_DATA_PAYLOAD, 1), now).unwrap() {
        n += MAX_DATA_PAYLOAD as u64;
        assert!(n < 64 << 20, "never stopped");
    }
    n
}

#[test]
fn only_a_peer_that_offers_probes_is_probed() {
    // Both on: the exit's window starts at the initial congestion window,
    // and it probes.
    let (mut o, mut x, ids) = pair(true, true, 1);
    assert!(x.congestion().is_some() && o.congestion().is_some());
    let took = fill(&mut x, ids[0], 0);
    assert!(
        took <= congestion::INITIAL_WINDOW + MAX_DATA_PAYLOAD as u64,
        "{took}"
    );
    assert!(deliver(&mut x, &mut o, 10) > 0, "no probe went");

    // The origin off (or built before probes: its BEGIN has no `probes`):
    // the exit never probes it and sends to the stream's window.
    let (mut o, mut x, ids) = pair(false, true, 1);
    assert!(x.congestion().is_none() && o.congestion().is_none());
    let took = fill(&mut x, ids[0], 0);
    assert!(took >= (8 << 20) - MAX_DATA_PAYLOAD as u64, "{took}");
    assert_eq!(
        deliver(&mut x, &mut o, 10),
        0,
        "probed a peer that did not offer"
    );

    // The exit off: the origin does not probe it either.
    let (mut o, mut x, ids) = pair(true, false, 1);
    assert!(o.congestion().is_none());
    let took = fill(&mut o, ids[0], 0);
    assert!(took >= (8 << 20) - MAX_DATA_PAYLOAD as u64, "{took}");
    assert_eq!(deliver(&mut o, &mut x, 10), 0);
}

#[test]
fn answered_probes_free_room_and_the_window_grows_while_the_path_keeps_up() {
    let (mut o, mut x, ids) = pair(true, true, 1);
    let mut now = 0;
    let mut windows = Vec::new();
    for _ in 0..8 {
        fill(&mut x, ids[0], now);
        // A round trip that does not grow: nothing stands in a queue.
        now += 100;
        deliver(&mut x, &mut o, now);
        for ev in events(&mut o) {
            if let Event::Data { id, data } = ev {
                o.consumed(id, data.len() as u64).unwrap();
            }
        }
        while let Some(c) = o.poll_transmit() {
            x.handle_relay(c, now).unwrap();
        }
        let _ = events(&mut x);
        windows.push(x.congestion().unwrap().window);
    }
    assert!(
        windows.windows(2).all(|w| w[1] >= w[0]) && windows[7] > windows[0],
        "{windows:?}"
    );
    assert_eq!(x.congestion().unwrap().base_rtt_us, 100);
}

/// A bulk stream that fills the window and a request behind it: the
/// request goes after at most about one record of the bulk stream's once
/// room comes back, not after everything the bulk stream could send.
#[test]
fn streams_of_a_circuit_take_turns_for_its_room() {
    let (mut o, mut x, ids) = pair(true, true, 2);
    let (bulk, request) = (ids[0], ids[1]);
    let now = 1_000;
    fill(&mut x, bulk, now);
    assert!(matches!(
        x.send_data(request, record(64, 2), now).unwrap(),
        Outcome::Blocked(_)
    ));
    // The bulk stream is in line first; each PONG frees about one record
    // of room and wakes the next in line, which sends and, finding no room,
    // goes to the back. Count the bulk stream's bytes until the request
    // went.
    let mut bulk_after = 0u64;
    let mut t = now;
    let mut sent_request = false;
    for _ in 0..64 {
        t += 50;
        // One cell at a time, so the room comes back bit by bit.
        let Some(c) = x.poll_transmit() else { break };
        o.handle_relay(c, t).unwrap();
        while let Some(pong) = o.poll_transmit() {
            x.handle_relay(pong, t).unwrap();
        }
        for ev in events(&mut x) {
            if let Event::Writable { id } = ev {
                if id == request && !sent_request {
                    assert!(matches!(
                        x.send_data(request, record(64, 2), t).unwrap(),
                        Outcome::Done
                    ));
                    sent_request = true;
                } else if id == bulk {
                    bulk_after += fill(&mut x, bulk, t);
                }
            }
        }
        if sent_request {
            break;
        }
    }
    assert!(sent_request, "the request never got its turn");
    assert!(
        bulk_after <= 2 * MAX_DATA_PAYLOAD as u64,
        "the bulk stream sent {bulk_after} bytes first"
    );
}

/// Forges a stream message from the exit to `o` (with the exit's keys).
fn forged(
    keys: &mut ferry_circuit::crypto::Session,
    kind: StreamKind,
    id: u32,
    body: &[u8],
) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_slice(&cell::header(1, CellCmd::Relay));
    b.put_slice(&header(kind, id));
    b.put_slice(body);
    keys.tx.seal_tail_bytes(&mut b, cell::HEADER_LEN).unwrap();
    b
}

#[test]
fn a_pong_nobody_asked_for_or_a_probe_on_a_stream_breaks_the_circuit() {
    for (kind, id, body, offer) in [
        (StreamKind::Pong, 0, 5u64.to_be_bytes().to_vec(), true),
        (StreamKind::Pong, 0, 5u64.to_be_bytes().to_vec(), false),
        (StreamKind::Probe, 1, 5u64.to_be_bytes().to_vec(), true),
        (StreamKind::Probe, 0, vec![1, 2, 3], true),
    ] {
        let (ok, mut xk) = keys();
        let mut o = Session::new(Side::Origin, 1, ok, cfg(true));
        let sid = o.open("target.example", 80).unwrap();
        let connected = ferry_proto::pb::Connected {
            window: 1 << 20,
            resume_token: TOKEN.to_vec(),
            probes: offer,
        }
        .encode_to_vec();
        o.handle_relay(forged(&mut xk, StreamKind::Connected, sid, &connected), 0)
            .unwrap();
        let err = o
            .handle_relay(forged(&mut xk, kind, id, &body), 0)
            .unwrap_err();
        assert!(err.is_violation(), "{kind:?} on {id}: {err}");
    }
    // A well-formed PROBE is answered with its count.
    let (ok, mut xk) = keys();
    let mut o = Session::new(Side::Origin, 1, ok, cfg(false));
    o.handle_relay(
        forged(&mut xk, StreamKind::Probe, 0, &77u64.to_be_bytes()),
        0,
    )
    .unwrap();
    let mut pong = o.poll_transmit().unwrap();
    let n = xk.rx.open_in_place(&mut pong[cell::HEADER_LEN..]).unwrap();
    let msg = StreamMsg::parse(&pong[cell::HEADER_LEN..cell::HEADER_LEN + n]).unwrap();
    assert_eq!(
        (msg.kind, msg.stream_id, msg.probe_count()),
        (StreamKind::Pong, 0, Ok(77))
    );
}

/// Bytes sent again after a move count in flight on the new circuit and
/// are probed at once: two streams whose resends together pass the new
/// circuit's window, the second joining the line behind the first, still
/// get their turns (the second resend was covered by no probe, and once
/// the first's PONG came nothing was out to bring room back: the circuit
/// froze).
#[test]
fn streams_moved_with_more_to_resend_than_the_window_do_not_freeze_the_circuit() {
    // Circuit a without congestion control, so 600 KiB a stream goes out
    // (and is lost with it); circuit b with it, to the same exit.
    let (ok, xk) = keys();
    let mut ao = Session::new(Side::Origin, 1, ok, cfg(false));
    let mut ax = Session::new(Side::Exit, 1, xk, cfg(false));
    let ids: Vec<u32> = (0..2)
        .map(|_| ao.open("target.example", 80).unwrap())
        .collect();
    while let Some(c) = ao.poll_transmit() {
        ax.handle_relay(c, 0).unwrap();
    }
    for (n, id) in ids.iter().enumerate() {
        assert!(matches!(
            ax.accept(*id, [n as u8 + 1; 16]).unwrap(),
            Outcome::Done
        ));
    }
    while let Some(c) = ax.poll_transmit() {
        ao.handle_relay(c, 0).unwrap();
    }
    let _ = (events(&mut ao), events(&mut ax));
    for id in &ids {
        for _ in 0..10 {
            assert!(matches!(
                ao.send_data(*id, record(60_000, 3), 0).unwrap(),
                Outcome::Done
            ));
        }
    }
    while ao.poll_transmit().is_some() {}

    let (ok, xk) = keys();
    let mut bo = Session::new(Side::Origin, 2, ok, cfg(true));
    let mut bx = Session::new(Side::Exit, 2, xk, cfg(true));
    let mut moved = Vec::new();
    for id in &ids {
        let s = ao.detach(*id).unwrap();
        moved.push(bo.attach_resume(s, 0).map_err(|(e, _)| e).unwrap());
    }
    while let Some(c) = bo.poll_transmit() {
        bx.handle_relay(c, 0).unwrap();
    }
    for ev in events(&mut bx) {
        if let Event::Resume {
            id,
            received,
            fin,
            attempt,
            ..
        } = ev
        {
            let old = ids[moved.iter().position(|m| *m == id).unwrap()];
            let s = ax.take_for_move(old, attempt, received).unwrap();
            bx.accept_move(id, s, attempt, received, fin)
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
    // The exit's RESUMED answers reach the origin one at a time: the
    // first stream resends and, wanting to send more, stops for room; then
    // the second resends and stops behind it.
    let mut t = 10;
    let mut cells: Vec<BytesMut> = std::iter::from_fn(|| bx.poll_transmit()).collect();
    let mut stopped = 0;
    for c in cells.drain(..) {
        bo.handle_relay(c, t).unwrap();
        for ev in events(&mut bo) {
            if let Event::Moved { id } = ev {
                assert!(matches!(
                    bo.send_data(id, record(1000, 4), t).unwrap(),
                    Outcome::Blocked(_)
                ));
                stopped += 1;
            }
        }
    }
    assert_eq!(stopped, 2);
    // Cells go both ways until both streams had a turn, or nothing moves.
    let mut turns = std::collections::HashSet::new();
    for _ in 0..1000 {
        t += 10;
        let mut moving = false;
        while let Some(c) = bo.poll_transmit() {
            bx.handle_relay(c, t).unwrap();
            moving = true;
        }
        for ev in events(&mut bx) {
            if let Event::Data { id, data } = ev {
                bx.consumed(id, data.len() as u64).unwrap();
            }
        }
        while let Some(c) = bx.poll_transmit() {
            bo.handle_relay(c, t).unwrap();
            moving = true;
        }
        for ev in events(&mut bo) {
            if let Event::Writable { id } = ev
                && !turns.contains(&id)
                && let Outcome::Done = bo.send_data(id, record(1000, 4), t).unwrap()
            {
                turns.insert(id);
            }
        }
        if turns.len() == 2 || !moving {
            break;
        }
    }
    assert_eq!(turns.len(), 2, "the circuit froze with streams in line");
}

/// When the circuit's window is all but full (receivers that stopped
/// reading), a small record that fits the room left goes, though a large
/// one waits ahead of it in line: a stream is called when its record fits,
/// in order, and one that does not keeps its place.
#[test]
fn a_small_record_that_fits_is_not_held_behind_a_large_one_that_does_not() {
    use ferry_circuit::CIRCUIT_WINDOW;
    let (_o, mut x, ids) = pair(false, false, 6);
    // Four streams' windows (8 MiB each) fill the circuit's 32 MiB, less
    // than a record short.
    let mut sent = 0;
    for id in &ids[..4] {
        sent += fill(&mut x, *id, 0);
    }
    let room = CIRCUIT_WINDOW - sent;
    assert!(room > 100 && room < MAX_DATA_PAYLOAD as u64, "{room}");
    // Stream 4 wants a large record: it waits. Stream 5's 100 bytes fit.
    assert!(matches!(
        x.send_data(ids[4], record(MAX_DATA_PAYLOAD, 4), 0).unwrap(),
        Outcome::Blocked(_)
    ));
    let _ = events(&mut x);
    let small = x.send_data(ids[5], record(100, 5), 0).unwrap();
    let called = events(&mut x)
        .iter()
        .any(|e| matches!(e, Event::Writable { id } if *id == ids[5]));
    assert!(
        matches!(small, Outcome::Done) || called,
        "the small record was left waiting: {small:?}"
    );
    if !matches!(small, Outcome::Done) {
        assert!(matches!(
            x.send_data(ids[5], record(100, 5), 0).unwrap(),
            Outcome::Done
        ));
    }
    // The large one still waits, in its place.
    assert!(matches!(
        x.send_data(ids[4], record(MAX_DATA_PAYLOAD, 4), 0).unwrap(),
        Outcome::Blocked(_)
    ));
}
