//! `ferry status` as an operator reads it: each own circuit with its tenant
//! and class, and by when a ruling makes it leave which jurisdiction;
//! `--watch` redraws it in place as the mesh changes, and says so when the
//! node stops answering.

use ferry_node::authority::now_ms;
use ferry_tests::rulings::{self, Ruling};
use ferry_tests::{Mesh, Options, Spec, echo_server, ferry_bin, run_ferry, socks_connect_as};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A command's output, read as it comes by a thread of its own.
struct Watched {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Watched {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let o = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self { child, out }
    }

    /// Waits up to 20 s until `ok` holds of the output so far; panics with
    /// the output if it never does.
    fn until(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.out.lock().unwrap().clone();
            if ok(&out) {
                return out;
            }
            assert!(Instant::now() < deadline, "never {what}; output:\n{out}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The frames a terminal was sent: each starts by moving the cursor home
/// and ends by clearing what is below it; only complete ones.
fn frames(out: &str) -> Vec<&str> {
    out.split("\x1b[H")
        .filter_map(|f| f.split_once("\x1b[J").map(|(frame, _)| frame))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_circuit_and_by_when_a_ruling_moves_it() {
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let mut tenants = ferry_tests::tenant_block("acme", "enterprise", "acme pw");
    tenants.push_str(&ferry_tests::tenant_block(
        "globex",
        "consumer",
        "globex pw",
    ));
    let opts = Options {
        hops: 2,
        authority_keys: vec![public],
        entry_toml: tenants,
        ..Options::default()
    };
    // One path: the entry, the relay in PK, the exit in CA.
    let mut mesh =
        Mesh::start(&[Spec::new("CA", "exit"), Spec::new("PK", "relay")], &opts).unwrap();
    let echo = echo_server().await.unwrap();
    let mut streams = Vec::new();
    for (tenant, pw) in [("acme", "acme pw"), ("globex", "globex pw")] {
        let s = socks_connect_as(mesh.socks(), "127.0.0.1", echo.port(), Some((tenant, pw)))
            .await
            .unwrap()
            .unwrap_or_else(|code| panic!("{tenant}: SOCKS reply {code}"));
        streams.push(s);
    }
    // Announced: PK drains enterprise traffic from an hour on, and it must
    // be out by two.
    let now = now_ms();
    let mut ruling = Ruling::block("PK", now + 3_600_000, now + 7_200_000);
    ruling.classes = &["enterprise"];
    let signed = rulings::sign(keys.path(), &kd, &ruling);
    rulings::publish(&mesh.entry, &signed).unwrap();
    let admin = mesh.entry.admin.to_string();

    let text = run_ferry(&["status", "--admin", &admin]).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{text}"))
    };
    let acme = at("tenant acme  class enterprise  streams 1");
    assert!(lines[acme].contains("PK -> CA"), "{text}");
    let leave = lines[acme + 1];
    for want in [
        "must leave PK by ",
        "(in 1h 59m",
        "ruling test-PK v1 on PK, draining from ",
        "; it moves before then",
    ] {
        assert!(
            leave.contains(want),
            "{want:?} under acme's circuit:\n{text}"
        );
    }
    let globex = at("tenant globex  class consumer  streams 1");
    assert!(
        !lines
            .get(globex + 1)
            .is_some_and(|l| l.contains("must leave")),
        "the ruling is for enterprise traffic only:\n{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&run_ferry(&["status", "--admin", &admin, "--json"]).unwrap())
            .unwrap();
    let own = v["origin"]["circuits"].as_array().unwrap();
    let m = &own.iter().find(|c| c["tenant"] == "acme").unwrap()["must_leave"];
    assert_eq!(m["ruling"], "test-PK", "{m}");
    assert_eq!(m["phase"], "announced", "{m}");
    assert_eq!(m["jurisdiction"], "PK", "{m}");
    assert_eq!(m["action"], "move", "{m}");
    let in_secs = m["in_secs"].as_u64().unwrap();
    assert!((7_000..=7_200).contains(&in_secs), "{m}");

    // Watched on a terminal (`script` gives it one): redrawn in place, and
    // the lift shows without asking again.
    let watch = Watched::start(
        Command::new("script")
            .args(["-qfec"])
            .arg(format!(
                "{} status --admin {admin} --watch 300ms",
                ferry_bin().unwrap().display()
            ))
            .arg("/dev/null"),
    );
    watch.until("a frame with the ruling", |o| {
        frames(o).iter().any(|f| f.contains("must leave PK"))
    });
    let mut lift = ruling;
    lift.version = 2;
    lift.lifted = true;
    rulings::publish(&mesh.entry, &rulings::sign(keys.path(), &kd, &lift)).unwrap();
    watch.until("a frame without it", |o| {
        frames(o)
            .last()
            .is_some_and(|f| f.contains("(lifted)") && !f.contains("must leave"))
    });
    // The node goes away: the watch says so and keeps asking.
    mesh.entry.kill9().unwrap();
    watch.until("a frame saying the node is not answering", |o| {
        frames(o)
            .last()
            .is_some_and(|f| f.contains("asking again in 300ms"))
    });
    drop(watch);
    drop(streams);

    let bad = Command::new(ferry_bin().unwrap())
        .args(["status", "--admin", &admin, "--watch", "10ms"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("give 100ms to 1day"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// `--watch` to a pipe: each frame follows the last under a dated rule;
/// with `--json`, one JSON document a line, a refresh each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_to_a_pipe_prints_frame_after_frame() {
    let mesh = Mesh::one_exit(vec![]).unwrap();
    let admin = mesh.entry.admin.to_string();
    let text = Watched::start(
        Command::new(ferry_bin().unwrap()).args(["status", "--admin", &admin, "--watch", "200ms"]),
    );
    let out = text.until("three frames", |o| o.matches("\n--- ").count() >= 2);
    assert!(out.starts_with("--- 20"), "a dated rule first:\n{out}");
    assert!(
        !out.contains('\x1b'),
        "no terminal codes into a pipe:\n{out}"
    );
    drop(text);
    let watch = Watched::start(
        Command::new(ferry_bin().unwrap())
            .args(["status", "--admin", &admin, "--watch", "200ms", "--json"]),
    );
    // Whole lines only: the reader may hold half of the next.
    let whole = |o: &str| -> Vec<String> {
        o.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(String::from)
            .collect()
    };
    let before = whole(&watch.until("two lines", |o| whole(o).len() >= 2));
    for l in &before {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(v["node_id"], mesh.entry.id, "{l}");
    }
    // The next lines see a circuit that was not there before.
    mesh.echo_ping().await.unwrap();
    watch.until("a line with the new circuit", |o| {
        whole(o).iter().skip(before.len()).any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["origin"]["circuits"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())
            })
        })
    });
}
