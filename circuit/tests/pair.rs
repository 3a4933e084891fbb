//! A deterministic driver in virtual time: an origin and an exit with
//! circuits through a relay's table, cells delayed, reordered, dropped and
//! swapped on the links, circuits killed and streams moved at random
//! points (quinn-proto's `tests/util.rs` `Pair` is the model).
//!
//! The property, for every stream at each end: what arrived is a prefix of
//! what was sent (every byte exactly once, in order), and either all of it
//! arrived with a clean end, or the end saw an error. Never a short stream
//! with a clean end, and never a stream left hanging.

use bytes::{BufMut, BytesMut};
use ferry_circuit::{
    Config, Dispatch, Event, Found, HEADROOM, Outcome, Phase, Resumables, Session, Side, Stream,
    Table,
};
use ferry_proto::pb::{DestroyReason, EndReason};
use ferry_proto::{Cell, CellCmd, cell};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;

mod common;
use common::keys;

/// Faults and sizes of one run.
#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    streams: usize,
    max_len: usize,
    window: u32,
    /// Chance per delivery (in 1/1000) of dropping or swapping a cell.
    fault_permille: u32,
    /// Chance per step (in 1/1000) of killing a circuit.
    kill_permille: u32,
    /// Chance per step (in 1/1000) of moving a stream.
    move_permille: u32,
    steps: usize,
}

/// What one end of a stream saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    bytes: Vec<u8>,
    clean: bool,
    error: Option<String>,
}

/// A stream's app at one end.
#[derive(Debug, Default)]
struct App {
    /// What it sends.
    out: Vec<u8>,
    /// Bytes handed to the session so far.
    written: usize,
    finished: bool,
    /// Bytes received and not yet "written to the socket" (consumed).
    backlog: u64,
    seen: Seen,
    gone: bool,
    /// The exit heard BEGIN (an exit app exists only then).
    began: bool,
}

impl App {
    fn fail(&mut self, why: impl Into<String>) {
        if self.seen.error.is_none() && !self.seen.clean {
            self.seen.error = Some(why.into());
        }
        self.gone = true;
    }
}

/// A circuit: its two sessions and the cells in flight each way.
struct Circ {
    origin: Session,
    exit: Session,
    /// Origin → relay (link 1, circuit id `a`) and relay → exit (link 2, `b`).
    up: VecDeque<BytesMut>,
    down: VecDeque<BytesMut>,
    a: u32,
    b: u32,
    open: bool,
}

struct World {
    rng: StdRng,
    now: u64,
    plan: Plan,
    circs: Vec<Circ>,
    relay: Table<ferry_circuit::LinkId, (), (), ()>,
    /// Where each stream is at the origin: (circuit, id); None while handed back.
    o_at: Vec<Option<(usize, u32)>>,
    /// Where each stream is at the exit.
    x_at: Vec<Option<(usize, u32)>>,
    /// Exit: stream index by token.
    x_reg: Resumables<usize>,
    o_app: Vec<App>,
    x_app: Vec<App>,
    cfg: Config,
    /// Streams found hanging once everything had time to finish.
    unsettled: Vec<String>,
}

impl World {
    fn new(plan: Plan) -> Self {
        let mut rng = StdRng::seed_from_u64(plan.seed);
        let cfg = Config {
            window: plan.window,
            max_streams: 64,
            resume_timeout_ms: 2_000,
            congestion: true,
        };
        let mut o_app = Vec::new();
        let mut x_app = Vec::new();
        for _ in 0..plan.streams {
            let n = rng.gen_range(0..=plan.max_len);
            let m = rng.gen_range(0..=plan.max_len);
            o_app.push(App {
                out: (0..n).map(|_| rng.r#gen()).collect(),
                ..App::default()
            });
            x_app.push(App {
                out: (0..m).map(|_| rng.r#gen()).collect(),
                ..App::default()
            });
        }
        let mut w = World {
            rng,
            now: 0,
            circs: Vec::new(),
            relay: Table::default(),
            o_at: vec![None; plan.streams],
            x_at: vec![None; plan.streams],
            x_reg: Resumables::new(5_000, 1024),
            o_app,
            x_app,
            cfg,
            plan,
            unsettled: Vec::new(),
        };
        let c = w.new_circ();
        for s in 0..w.plan.streams {
            let id = w.circs[c].origin.open("target.example", 443).unwrap();
            w.o_at[s] = Some((c, id));
        }
        w
    }

    fn new_circ(&mut self) -> usize {
        let (o, x) = keys();
        let idx = self.circs.len();
        let a = 100 + idx as u32;
        let b = 200 + idx as u32;
        self.relay.add_tip(1, a, ());
        self.relay.splice((1, a), (2, b), |_| true).unwrap();
        self.circs.push(Circ {
            origin: Session::new(Side::Origin, a, o, self.cfg.clone()),
            exit: Session::new(Side::Exit, b, x, self.cfg.clone()),
            up: VecDeque::new(),
            down: VecDeque::new(),
            a,
            b,
            open: true,
        });
        idx
    }

    fn stream_at(at: &[Option<(usize, u32)>], c: usize, id: u32) -> Option<usize> {
        at.iter().position(|x| *x == Some((c, id)))
    }

    /// Moves sealed cells from sessions onto the links.
    fn collect(&mut self) {
        for c in &mut self.circs {
            while let Some(t) = c.origin.poll_transmit() {
                c.up.push_back(t);
            }
            while let Some(t) = c.exit.poll_transmit() {
                c.down.push_back(t);
            }
        }
    }

    /// Kills circuit `c`: both ends close (a DESTROY reached them).
    fn kill(&mut self, c: usize) {
        if !self.circs[c].open {
            return;
        }
        self.circs[c].open = false;
        self.circs[c].up.clear();
        self.circs[c].down.clear();
        let (a, b) = (self.circs[c].a, self.circs[c].b);
        let _ = self
            .relay
            .dispatch(1, a, CellCmd::Destroy, DestroyReason::LinkLost);
        assert!(
            !self.relay.contains(2, b),
            "destroy propagates to the far side"
        );
        for (id, stream) in self.circs[c].origin.close() {
            let s = Self::stream_at(&self.o_at, c, id).expect("tracked");
            self.o_at[s] = None;
            if matches!(stream.phase(), Phase::Moving { .. }) {
                self.fallback(s, stream);
            } else {
                self.o_app[s].fail("circuit closed");
            }
        }
        for (id, stream) in self.circs[c].exit.close() {
            let s = Self::stream_at(&self.x_at, c, id).expect("tracked");
            self.x_at[s] = None;
            self.x_reg.park(s, stream, self.now);
        }
    }

    /// A move failed: attach the stream to any open circuit (a fresh one
    /// if none), or give up with an error.
    fn fallback(&mut self, s: usize, stream: Stream) {
        if self.o_app[s].gone {
            return;
        }
        let open: Vec<usize> = (0..self.circs.len())
            .filter(|c| self.circs[*c].open)
            .collect();
        let c = if open.is_empty() || self.rng.gen_bool(0.3) {
            self.new_circ()
        } else {
            open[self.rng.gen_range(0..open.len())]
        };
        match self.circs[c].origin.attach_resume(stream, self.now) {
            Ok(id) => self.o_at[s] = Some((c, id)),
            Err((e, _)) => self.o_app[s].fail(format!("fallback: {e}")),
        }
    }

    /// Origin: moves stream `s` to another circuit (maybe a new one).
    fn move_stream(&mut self, s: usize) {
        let Some((c, id)) = self.o_at[s] else { return };
        let ok = self.circs[c]
            .origin
            .stream(id)
            .is_some_and(|st| st.phase() == Phase::Open);
        if !ok {
            return;
        }
        let open: Vec<usize> = (0..self.circs.len())
            .filter(|x| *x != c && self.circs[*x].open)
            .collect();
        let to = if open.is_empty() || self.rng.gen_bool(0.5) {
            self.new_circ()
        } else {
            open[self.rng.gen_range(0..open.len())]
        };
        let stream = self.circs[c].origin.detach(id).expect("attached");
        match self.circs[to].origin.attach_resume(stream, self.now) {
            Ok(nid) => self.o_at[s] = Some((to, nid)),
            Err((e, _)) => panic!("attach to an open circuit: {e}"),
        }
    }

    /// Delivers one cell from a random non-empty queue; maybe drops or
    /// swaps it first. Returns false if nothing was in flight.
    fn deliver(&mut self, faults: bool) -> bool {
        let busy: Vec<(usize, bool)> = (0..self.circs.len())
            .flat_map(|c| [(c, true), (c, false)])
            .filter(|(c, up)| {
                let q = if *up {
                    &self.circs[*c].up
                } else {
                    &self.circs[*c].down
                };
                !q.is_empty()
            })
            .collect();
        if busy.is_empty() {
            return false;
        }
        let (c, up) = busy[self.rng.gen_range(0..busy.len())];
        let fault = faults && self.rng.gen_range(0..1000) < self.plan.fault_permille;
        let q = if up {
            &mut self.circs[c].up
        } else {
            &mut self.circs[c].down
        };
        if fault {
            if self.rng.gen_bool(0.5) || q.len() < 2 {
                q.pop_front();
            } else {
                q.swap(0, 1);
            }
        }
        let Some(mut cell) = q.pop_front() else {
            return true;
        };
        // Through the relay: its table rewrites the circuit id.
        let parsed = Cell::parse(&cell).expect("sessions send well-formed cells");
        let from = if up {
            (1, parsed.circ_id)
        } else {
            (2, parsed.circ_id)
        };
        match self
            .relay
            .dispatch(from.0, from.1, parsed.cmd, DestroyReason::Unspecified)
        {
            Dispatch::Forward { circ, .. } => cell::set_circ_id(&mut cell, circ),
            d => panic!("relay did not forward: {d:?}"),
        }
        let res = if up {
            self.circs[c].exit.handle_relay(cell, self.now)
        } else {
            self.circs[c].origin.handle_relay(cell, self.now)
        };
        if let Err(e) = res {
            assert!(
                e.is_violation(),
                "only a broken cell stream fails a circuit: {e}"
            );
            self.kill(c);
        }
        true
    }

    /// The exit's and the origin's shells act on events.
    fn events(&mut self) {
        for c in 0..self.circs.len() {
            while let Some(ev) = self.circs[c].exit.poll_event() {
                self.exit_event(c, ev);
            }
            while let Some(ev) = self.circs[c].origin.poll_event() {
                self.origin_event(c, ev);
            }
        }
    }

    fn exit_event(&mut self, c: usize, ev: Event) {
        let find = |w: &World, id| Self::stream_at(&w.x_at, c, id);
        match ev {
            Event::Begin { id, port, .. } => {
                assert_eq!(port, 443);
                // The origin opened streams in order on circuit 0: id - 1.
                let s = (id - 1) as usize;
                let token: [u8; 16] = self.rng.r#gen();
                self.x_at[s] = Some((c, id));
                self.x_app[s].began = true;
                assert!(matches!(
                    self.circs[c].exit.accept(id, token).unwrap(),
                    Outcome::Done
                ));
                self.x_reg.live(token, s);
            }
            Event::Resume {
                id,
                token,
                received,
                fin,
                attempt,
            } => match self.x_reg.find(&token) {
                Found::Live(s) => match self.x_at[s] {
                    Some((oc, oid)) => {
                        match self.circs[oc].exit.take_for_move(oid, attempt, received) {
                            Ok(stream) => {
                                self.x_at[s] = None;
                                self.x_attach(s, c, id, token, stream, attempt, received, fin);
                            }
                            // A stale move: the stream stays where it is.
                            Err(_) => self.circs[c].exit.refuse_move(id).unwrap(),
                        }
                    }
                    // Reset meanwhile: the token is stale.
                    None => {
                        self.x_reg.forget(&token);
                        self.circs[c].exit.refuse_move(id).unwrap();
                    }
                },
                Found::Parked(s, stream) => {
                    self.x_attach(s, c, id, token, *stream, attempt, received, fin)
                }
                Found::Completed(r) => self.circs[c].exit.answer_completed(id, r).unwrap(),
                Found::Unknown => self.circs[c].exit.refuse_move(id).unwrap(),
            },
            Event::Data { id, data } => {
                let s = find(self, id).expect("data for a tracked stream");
                self.x_app[s].seen.bytes.extend_from_slice(&data);
                self.x_app[s].backlog += data.len() as u64;
            }
            Event::Finished { id } => {
                let s = find(self, id).expect("tracked");
                self.x_app[s].seen.clean = true;
            }
            Event::Reset { id, reason, .. } => {
                let s = find(self, id).expect("tracked");
                self.x_at[s] = None;
                self.x_app[s].fail(format!("reset {}", reason.as_str_name()));
            }
            Event::Closed {
                id,
                token,
                received,
            } => {
                let s = find(self, id).expect("tracked");
                self.x_at[s] = None;
                self.x_app[s].gone = true;
                self.x_reg.completed(token, received, self.now);
            }
            Event::Writable { .. } => {}
            e => panic!("exit got an origin event: {e:?}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn x_attach(
        &mut self,
        s: usize,
        c: usize,
        id: u32,
        token: [u8; 16],
        stream: Stream,
        attempt: u32,
        received: u64,
        fin: bool,
    ) {
        match self.circs[c]
            .exit
            .accept_move(id, stream, attempt, received, fin)
        {
            Ok(()) => {
                self.x_at[s] = Some((c, id));
                self.x_reg.live(token, s);
                // Completed at once (the resend settled it): Closed follows.
            }
            Err((_, stream)) => {
                // A stale move of a parked stream: it stays parked.
                self.x_reg.park(s, *stream, self.now);
                self.circs[c].exit.refuse_move(id).unwrap();
            }
        }
    }

    fn origin_event(&mut self, c: usize, ev: Event) {
        let find = |w: &World, id| Self::stream_at(&w.o_at, c, id);
        match ev {
            Event::Connected { .. } | Event::Writable { .. } | Event::Moved { .. } => {}
            Event::Data { id, data } => {
                let s = find(self, id).expect("data for a tracked stream");
                self.o_app[s].seen.bytes.extend_from_slice(&data);
                self.o_app[s].backlog += data.len() as u64;
            }
            Event::Finished { id } => {
                let s = find(self, id).expect("tracked");
                self.o_app[s].seen.clean = true;
            }
            Event::Reset { id, reason, .. } => {
                let s = find(self, id).expect("tracked");
                self.o_at[s] = None;
                self.o_app[s].fail(format!("reset {}", reason.as_str_name()));
            }
            Event::MoveFailed { id, stream, .. } => {
                let s = find(self, id).expect("tracked");
                self.o_at[s] = None;
                self.fallback(s, *stream);
            }
            Event::Closed { id, .. } => {
                let s = find(self, id).expect("tracked");
                self.o_at[s] = None;
                self.o_app[s].gone = true;
            }
            e => panic!("origin got an exit event: {e:?}"),
        }
    }

    /// Apps write (within credit), finish, and consume at random.
    fn apps(&mut self) {
        for s in 0..self.plan.streams {
            for exit in [false, true] {
                let at = if exit { self.x_at[s] } else { self.o_at[s] };
                let Some((c, id)) = at else { continue };
                let sess = if exit {
                    &mut self.circs[c].exit
                } else {
                    &mut self.circs[c].origin
                };
                let app = if exit {
                    &mut self.x_app[s]
                } else {
                    &mut self.o_app[s]
                };
                // Consume some of the backlog.
                if app.backlog > 0 && self.rng.gen_bool(0.7) {
                    let n = self.rng.gen_range(1..=app.backlog);
                    app.backlog -= n;
                    match sess.consumed(id, n).unwrap() {
                        Outcome::Done => {}
                        o => panic!(
                            "consumed on the stream's own session (exit {exit}, stream {s}, at {c}/{id}): {o:?}"
                        ),
                    }
                }
                // The shell's delayed acknowledgement, at random moments
                // (to a stream still here: a consumption may have
                // completed it).
                if sess.stream(id).is_some() && self.rng.gen_bool(0.1) {
                    match sess.acknowledge(id).unwrap() {
                        Outcome::Done => {}
                        o => panic!("acknowledged on the stream's own session: {o:?}"),
                    }
                }
                let credit = sess.stream(id).map_or(0, |st| st.credit());
                let left = app.out.len() - app.written;
                if left > 0 && credit > 0 {
                    let n = self.rng.gen_range(1..=left.min(credit as usize).min(3000));
                    let mut buf = BytesMut::with_capacity(HEADROOM + n + 16);
                    buf.put_bytes(0, HEADROOM);
                    buf.put_slice(&app.out[app.written..app.written + n]);
                    match sess.send_data(id, buf, self.now).unwrap() {
                        Outcome::Done => app.written += n,
                        // No circuit room (congestion control): the stream
                        // waits in line and is woken.
                        Outcome::Blocked(_) => {}
                        o => panic!("the stream is here: {o:?}"),
                    }
                } else if left == 0 && !app.finished {
                    let phase_ok = sess.stream(id).is_some_and(|st| st.phase() == Phase::Open);
                    if phase_ok {
                        app.finished = true;
                        sess.finish(id, EndReason::Done, "").unwrap();
                    }
                }
            }
        }
    }

    fn timeouts(&mut self) {
        for c in &mut self.circs {
            c.origin.handle_timeout(self.now);
        }
        for (s, _stream) in self.x_reg.handle_timeout(self.now) {
            self.x_app[s].fail("parked stream expired");
        }
    }

    fn step(&mut self, chaos: bool) -> bool {
        self.apps();
        self.events();
        self.collect();
        let moved = self.deliver(chaos);
        self.events();
        if chaos {
            if self.rng.gen_range(0..1000) < self.plan.kill_permille {
                let c = self.rng.gen_range(0..self.circs.len());
                self.kill(c);
                self.events();
            }
            if self.rng.gen_range(0..1000) < self.plan.move_permille {
                let s = self.rng.gen_range(0..self.plan.streams);
                self.move_stream(s);
            }
        }
        self.now += self.rng.gen_range(0..20);
        self.timeouts();
        self.events();
        moved
    }

    fn run(&mut self) {
        for _ in 0..self.plan.steps {
            self.step(true);
        }
        // Calm: no more faults; let everything finish.
        let mut idle = 0;
        for _ in 0..200_000 {
            if self.step(false) {
                idle = 0;
            } else {
                idle += 1;
                self.now += 100;
                if idle > 200 {
                    break;
                }
            }
        }
        // Parked streams expire; then, unless cells were lost (a relay that
        // silently drops a cell stalls its circuit until something notices:
        // link keepalives, not this core), nothing may be left hanging:
        // every origin stream has ended (cleanly or with an error), and an
        // exit stream is unfinished only if its origin gave up on it (it
        // ends when its circuit closes, below).
        self.now += 60_000;
        self.timeouts();
        self.events();
        for _ in 0..2_000 {
            if !self.step(false) {
                break;
            }
        }
        for s in (0..self.plan.streams).filter(|_| self.plan.fault_permille == 0) {
            let o = &self.o_app[s].seen;
            let x = &self.x_app[s];
            if !o.clean && o.error.is_none() {
                self.unsettled
                    .push(format!("stream {s} hangs at the origin"));
            }
            if x.began && !x.seen.clean && x.seen.error.is_none() && o.error.is_none() {
                self.unsettled.push(format!(
                    "stream {s} hangs at the exit while its origin is fine"
                ));
            }
        }
        // Every circuit closes (the pool's idle close), and time passes
        // beyond every parked stream's expiry.
        for c in 0..self.circs.len() {
            self.kill(c);
        }
        self.events();
        self.now += 60_000;
        self.timeouts();
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert!(self.unsettled.is_empty(), "{:?}", self.unsettled);
        for s in 0..self.plan.streams {
            for (end, app, sent) in [
                ("origin", &self.o_app[s], &self.x_app[s].out),
                ("exit", &self.x_app[s], &self.o_app[s].out),
            ] {
                if end == "exit" && !app.began {
                    // BEGIN never arrived: no exit stream, and the origin
                    // must have seen an error.
                    prop_assert!(self.o_app[s].seen.error.is_some());
                    continue;
                }
                let got = &app.seen.bytes;
                prop_assert!(
                    sent.starts_with(got),
                    "stream {s} at the {end}: {} bytes arrived that are not a prefix of the {} sent",
                    got.len(),
                    sent.len()
                );
                if app.seen.clean {
                    prop_assert_eq!(
                        got.len(),
                        sent.len(),
                        "stream {} at the {}: a clean end after {} of {} bytes",
                        s,
                        end,
                        got.len(),
                        sent.len()
                    );
                } else {
                    prop_assert!(
                        app.seen.error.is_some(),
                        "stream {s} at the {end}: neither a clean end nor an error ({} of {} bytes)",
                        got.len(),
                        sent.len()
                    );
                }
            }
        }
        Ok(())
    }
}

fn plans() -> impl Strategy<Value = Plan> {
    (
        any::<u64>(),
        1usize..5,
        prop_oneof![Just(0usize), 1usize..20_000],
        prop_oneof![Just(1024u32), Just(4096u32), Just(65_536u32)],
        prop_oneof![3 => Just(0u32), 1 => 1u32..20],
        prop_oneof![2 => Just(0u32), 1 => 1u32..15],
        prop_oneof![1 => Just(0u32), 3 => 5u32..80],
        50usize..600,
    )
        .prop_map(
            |(seed, streams, max_len, window, fault, kill, mv, steps)| Plan {
                seed,
                streams,
                max_len,
                window,
                fault_permille: fault,
                kill_permille: kill,
                move_permille: mv,
                steps,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("tests/pair.proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    /// Every byte once and in order, or an error at that end.
    #[test]
    fn streams_survive_moves_kills_and_faults(plan in plans()) {
        let mut w = World::new(plan);
        w.run();
        w.check()?;
    }
}

/// With no faults and no kills, every stream completes cleanly at both
/// ends, however often it moves.
#[test]
fn moves_alone_lose_nothing() {
    for seed in 0..200 {
        let mut w = World::new(Plan {
            seed,
            streams: 3,
            max_len: 30_000,
            window: 4096,
            fault_permille: 0,
            kill_permille: 0,
            move_permille: 60,
            steps: 400,
        });
        w.run();
        w.check().unwrap();
        for s in 0..3 {
            assert!(
                w.o_app[s].seen.clean,
                "seed {seed} stream {s} at the origin: {:?}",
                w.o_app[s].seen.error
            );
            assert!(
                w.x_app[s].seen.clean,
                "seed {seed} stream {s} at the exit: {:?}",
                w.x_app[s].seen.error
            );
        }
    }
}
