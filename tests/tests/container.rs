//! The container mesh, for real: the shipped Dockerfile's runtime stage and
//! the shipped Compose file, run by Docker.
//!
//! No image can be pulled here, so the runtime image is built from a local
//! Debian base (`scripts/container-base.sh`: debootstrap, `docker import`)
//! and the `ferry` binary this build made, by the shipped Dockerfile's
//! runtime stage with only its `FROM` and its `COPY --from=builder` line
//! swapped (the test fails if either is not found, so the two cannot drift).
//! Prometheus runs from an image of the same base holding Debian's
//! `prometheus` binary. Then: `compose up`; the one-shot `authority`
//! service makes the test mesh's authority key and exits 0; every node
//! admits itself with it (`--admit-with`) and turns healthy;
//! `curl` fetches a page through the mesh's SOCKS5 port; Prometheus scrapes
//! every node; held streams cross the mesh; a signed ruling drains PK, which
//! exits carrying nothing while the held streams move and keep working; a
//! relay stopped with SIGTERM drains before it exits; `compose down`.
//!
//! `FERRY_TEST_IMAGE=TAG` runs the same test on an image built elsewhere
//! (the whole shipped Dockerfile, on a machine that can pull its bases):
//! `docker build -f deploy/docker/Dockerfile -t ferry:local . &&
//! FERRY_TEST_IMAGE=ferry:local cargo test -p ferry-tests --test container`.

use ferry_node::authority::now_ms;
use ferry_tests::rulings::{self, Ruling};
use ferry_tests::{curl_socks, ferry_bin, free_port, socks_connect_as};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const NODES: [&str; 6] = ["ch", "de", "is", "ca", "pk", "entry"];

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The shipped Dockerfile's runtime stage, from `base` and a binary in the
/// build context instead of the Rust builder stage.
fn runtime_stage(base: &str) -> String {
    let shipped = std::fs::read_to_string(format!("{ROOT}/deploy/docker/Dockerfile")).unwrap();
    let from = "FROM debian:bookworm-slim AS runtime";
    let copy = "COPY --from=builder /out/ferry /usr/local/bin/ferry";
    assert_eq!(shipped.matches(from).count(), 1, "Dockerfile: `{from}`");
    assert_eq!(shipped.matches(copy).count(), 1, "Dockerfile: `{copy}`");
    let stage = &shipped[shipped.find(from).unwrap()..];
    stage
        .replace(from, &format!("FROM {base} AS runtime"))
        .replace(copy, "COPY ferry /usr/local/bin/ferry")
}

/// Builds an image from a Dockerfile text and context files.
fn build_image(tag: &str, dockerfile: &str, files: &[(&str, &Path)]) {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    for (name, src) in files {
        let dst = ctx.path().join(name);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, &dst).unwrap();
    }
    run(Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(ctx.path()));
}

/// The compose command here: `docker compose` or `docker-compose`.
fn compose_cmd() -> Vec<&'static str> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        return vec!["docker", "compose"];
    }
    let v1 = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        v1,
        "neither `docker compose` nor `docker-compose` works: install Docker Compose"
    );
    vec!["docker-compose"]
}

/// A /24 for the mesh that no Docker network here uses: its first three octets.
fn free_net() -> String {
    let ids = text(&run(Command::new("docker").args(["network", "ls", "-q"])));
    let mut used = String::new();
    for id in ids.lines() {
        let o = run(Command::new("docker").args([
            "network",
            "inspect",
            id,
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
        ]));
        used.push_str(&text(&o));
        used.push(' ');
    }
    (0..200)
        .map(|i| format!("172.28.{}", (std::process::id() as usize + i) % 200 + 20))
        .find(|net| !used.contains(&format!("{net}.")))
        .expect("a free 172.28.x.0/24")
}

/// Removes what an earlier run that was killed (not unwound) left behind:
/// its containers, volumes (the authority's named one too) and network.
fn remove_stale_projects() {
    let o = run(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        "label=com.docker.compose.project",
        "--format",
        "{{.ID}} {{.Label \"com.docker.compose.project\"}}",
    ]));
    let mut projects = std::collections::BTreeSet::new();
    for line in text(&o).lines() {
        if let Some((id, project)) = line.split_once(' ')
            && project.starts_with("ferrytest")
        {
            let _ = Command::new("docker").args(["rm", "-fv", id]).output();
            projects.insert(project.to_string());
        }
    }
    for p in projects {
        let _ = Command::new("docker")
            .args(["network", "rm", &format!("{p}_mesh")])
            .output();
        println!("removed the leftovers of {p}");
    }
    let o = run(Command::new("docker").args([
        "volume",
        "ls",
        "--filter",
        "label=com.docker.compose.project",
        "--format",
        "{{.Name}} {{.Label \"com.docker.compose.project\"}}",
    ]));
    for line in text(&o).lines() {
        if let Some((name, project)) = line.split_once(' ')
            && project.starts_with("ferrytest")
        {
            let _ = Command::new("docker").args(["volume", "rm", name]).output();
        }
    }
}

/// The running mesh; `compose down` and the test image go when it drops.
struct Mesh {
    compose: Vec<&'static str>,
    project: String,
    env: Vec<(String, String)>,
    /// The image this test built, removed at the end (empty when given).
    image: String,
}

impl Mesh {
    fn cmd(&self) -> Command {
        let mut c = Command::new(self.compose[0]);
        c.args(&self.compose[1..])
            .args(["-p", &self.project, "-f", "docker-compose.yml"])
            .current_dir(format!("{ROOT}/deploy/compose"))
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn container(&self, service: &str) -> String {
        let id = text(&run(self.cmd().args(["ps", "-q", service])));
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// `ferry ARGS` inside a service's container, with `stdin` piped in.
    fn ferry(&self, service: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        use std::io::Write;
        let mut child = Command::new("docker")
            .args(["exec", "-i", &self.container(service), "ferry"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut w = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            w.write_all(b).unwrap();
        }
        drop(w);
        child.wait_with_output().unwrap()
    }

    fn status(&self, service: &str) -> serde_json::Value {
        let o = self.ferry(service, &["status", "--json"], None);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn logs(&self, service: &str) -> String {
        let o = run(Command::new("docker").args(["logs", &self.container(service)]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    fn inspect(&self, service: &str, format: &str) -> String {
        text(&run(Command::new("docker").args([
            "inspect",
            "-f",
            format,
            &self.container(service),
        ])))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in ["authority"].into_iter().chain(NODES) {
                if let Ok(o) = self.cmd().args(["logs", "--tail", "40", s]).output() {
                    eprintln!("--- {s}\n{}", String::from_utf8_lossy(&o.stdout));
                }
            }
        }
        let _ = self
            .cmd()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
        if !self.image.is_empty() {
            let _ = Command::new("docker")
                .args(["rmi", "-f", &self.image])
                .output();
        }
    }
}

/// Polls `f` every 500 ms until it gives `Some`, for at most `within`.
fn wait<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A Prometheus instant query's result vector.
fn prom_query(port: u16, q: &str) -> Vec<serde_json::Value> {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-G"])
        .arg(format!("http://127.0.0.1:{port}/api/v1/query"))
        .args(["--data-urlencode", &format!("query={q}")])
        .output()
        .expect("running curl");
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()
        .and_then(|v| v["data"]["result"].as_array().cloned())
        .unwrap_or_default()
}

/// One HTTP/1.1 request on a kept-alive stream; the response body.
async fn http_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /-/healthy HTTP/1.1\r\nHost: prometheus:9090\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "stream closed: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            let t = String::from_utf8_lossy(&buf).to_string();
            if let Some(h) = t.find("\r\n\r\n") {
                let len: usize = t[..h]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= h + 4 + len {
                    return t[h + 4..].to_string();
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("answer within 15 s")
}

/// The jurisdictions of the entry circuit that carries the streams with
/// the options `opts` (one harmless exclusion each: a circuit each).
fn path_of(entry: &serde_json::Value, opts: &str) -> Vec<String> {
    let exclusion = opts
        .split(';')
        .find(|o| o.starts_with("exclude="))
        .unwrap_or(opts);
    entry["origin"]["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["constraints"]
                .as_str()
                .is_some_and(|s| s.split(' ').any(|part| part == exclusion))
                && c["streams"].as_u64() > Some(0)
        })
        .flat_map(|c| c["path"].as_array().unwrap().clone())
        .map(|j| j.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_mesh_serves_drains_and_stops_gracefully() {
    let info = Command::new("docker").arg("info").output();
    assert!(
        info.is_ok_and(|o| o.status.success()),
        "Docker is not running here: the container test needs the Docker engine"
    );
    let compose = compose_cmd();
    remove_stale_projects();
    let t0 = Instant::now();

    // Images: the local base, ferry's runtime stage, and Prometheus.
    let base = text(&run(&mut Command::new(format!(
        "{ROOT}/scripts/container-base.sh"
    ))));
    let given = std::env::var("FERRY_TEST_IMAGE").ok();
    let image = match &given {
        Some(tag) => tag.clone(),
        None => {
            let work = tempfile::tempdir().unwrap();
            let bin = work.path().join("ferry");
            std::fs::copy(ferry_bin().unwrap(), &bin).unwrap();
            run(Command::new("strip").arg("--strip-debug").arg(&bin));
            let image = format!("ferry-test:{}", std::process::id());
            let config = PathBuf::from(format!("{ROOT}/deploy/docker/ferry.toml"));
            build_image(
                &image,
                &runtime_stage(&base),
                &[("ferry", &bin), ("deploy/docker/ferry.toml", &config)],
            );
            image
        }
    };
    let prom = which_prometheus();
    let prom_image = "ferry-test-prometheus:local";
    build_image(
        prom_image,
        &format!(
            "FROM {base}\nCOPY prometheus /bin/prometheus\n\
             RUN install -d -o 65534 -g 65534 /prometheus\nUSER 65534\n\
             ENTRYPOINT [\"/bin/prometheus\"]\n"
        ),
        &[("prometheus", &prom)],
    );
    println!("images built in {:.0?}", t0.elapsed());
    let user = text(&run(Command::new("docker").args([
        "run",
        "--rm",
        "--entrypoint",
        "id",
        &image,
    ])));
    assert!(user.starts_with("uid=10001(ferry)"), "runs as: {user}");

    // The mesh.
    let keys = tempfile::tempdir().unwrap();
    let (kd, public) = rulings::authority(keys.path(), "authority");
    let socks_port = free_port().unwrap().port();
    let prom_port = free_port().unwrap().port();
    let net = free_net();
    let mesh = Mesh {
        compose,
        project: format!("ferrytest{}", std::process::id()),
        env: vec![
            ("FERRY_IMAGE".into(), image.clone()),
            ("PROMETHEUS_IMAGE".into(), prom_image.into()),
            ("FERRY_NET".into(), net.clone()),
            ("FERRY_SOCKS_PORT".into(), socks_port.to_string()),
            ("FERRY_PROMETHEUS_PORT".into(), prom_port.to_string()),
            ("FERRY_AUTHORITY_KEYS".into(), public),
        ],
        image: if given.is_some() {
            String::new()
        } else {
            image
        },
    };
    run(mesh.cmd().args(["up", "-d", "--no-build"]));
    for s in NODES {
        wait(&format!("{s} healthy"), Duration::from_secs(90), || {
            (mesh.inspect(s, "{{.State.Health.Status}}") == "healthy").then_some(())
        });
    }
    println!(
        "{} containers healthy after {:.0?}",
        NODES.len(),
        t0.elapsed()
    );
    // The one-shot authority container made the key and exited 0; every
    // node holds a certificate signed with it, for its own jurisdiction.
    let authority = text(&run(mesh.cmd().args(["ps", "-a", "-q", "authority"])));
    assert_eq!(authority.lines().count(), 1, "one authority container");
    let state = text(&run(Command::new("docker").args([
        "inspect",
        "-f",
        "{{.State.Status}} {{.State.ExitCode}}",
        &authority,
    ])));
    assert_eq!(state, "exited 0", "the authority container");
    for (s, j) in NODES.iter().zip(["CH", "DE", "IS", "CA", "PK", "NL"]) {
        let status = mesh.status(s);
        let cert = &status["certificate"];
        assert!(
            cert["present"] == true && cert["problem"].is_null() && cert["jurisdiction"] == j,
            "{s}: certificate {cert}"
        );
    }

    // A page through the mesh, with the real curl.
    let socks = format!("127.0.0.1:{socks_port}");
    let body = wait("a page through the mesh", Duration::from_secs(90), || {
        let o = curl_socks(&socks, "http://prometheus:9090/-/healthy");
        let b = String::from_utf8_lossy(&o.stdout).to_string();
        b.contains("Healthy").then_some(b)
    });
    println!("curl through the mesh: {}", body.trim());
    // The exits reach the mesh's Prometheus and nothing else private.
    let o = curl_socks(&socks, &format!("http://{net}.11:9300/metrics"));
    assert_eq!(
        o.status.code(),
        Some(97),
        "a private target other than Prometheus must be refused"
    );

    // Prometheus scrapes all six nodes, with Ferry's rules loaded.
    wait(
        "Prometheus scraping every node",
        Duration::from_secs(60),
        || {
            let r = prom_query(prom_port, "count(up{job=\"ferry\"} == 1)");
            (r.first().and_then(|v| v["value"][1].as_str()) == Some("6")).then_some(())
        },
    );
    // ... and every node turns ready (joined, active), as /readyz says.
    wait("every node ready", Duration::from_secs(60), || {
        let r = prom_query(prom_port, "sum(ferry_node_ready)");
        (r.first().and_then(|v| v["value"][1].as_str()) == Some("6")).then_some(())
    });
    println!(
        "Prometheus: 6 targets up and ready after {:.0?}",
        t0.elapsed()
    );

    // Held streams, on circuits of three tenants (a circuit each): 3 hops
    // out of 5 jurisdictions, so most cross PK, and there are always
    // enough nodes to build around PK and then around one more.
    // Held streams, a circuit each (one tenant each): 3 hops out of 5
    // jurisdictions, so most cross PK, and there are always enough nodes to
    // build around PK and then around one more. At least three, and more
    // (at most 12) until one crosses PK, so the move off PK is exercised.
    // (A circuit each through distinct, harmless exclusions: no tenant
    // names, which an entry refuses unless it has those tenants.)
    let names: Vec<String> = [
        "AE", "AF", "AG", "AL", "AM", "AO", "AR", "AT", "AU", "AZ", "BA", "BB",
    ]
    .iter()
    .map(|cc| format!("hops=3;exclude={cc}"))
    .collect();
    let mut tenants: Vec<&str> = Vec::new();
    let mut held = Vec::new();
    let mut via_pk: Vec<&str> = Vec::new();
    for t in &names {
        let mut s = socks_connect_as(socks.parse().unwrap(), "prometheus", 9090, Some(("-", t)))
            .await
            .unwrap()
            .unwrap_or_else(|code| panic!("{t}: SOCKS reply {code}"));
        assert!(http_on(&mut s).await.contains("Healthy"));
        held.push(s);
        tenants.push(t);
        if path_of(&mesh.status("entry"), t).iter().any(|j| j == "PK") {
            via_pk.push(t);
        }
        if tenants.len() >= 3 && !via_pk.is_empty() {
            break;
        }
    }
    assert!(!via_pk.is_empty(), "no circuit of 12 crossed PK");
    println!("held streams crossing PK before the ruling: {via_pk:?}");

    // A ruling: PK blocked in 2 s, out by 20 s.
    let now = now_ms();
    let signed = rulings::sign(
        keys.path(),
        &kd,
        &Ruling::block("PK", now + 2_000, now + 20_000),
    );
    let o = mesh.ferry(
        "ch",
        &[
            "policy",
            "publish",
            "--admin",
            "127.0.0.1:7200",
            "/dev/stdin",
        ],
        Some(&std::fs::read(&signed).unwrap()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait("PK draining", Duration::from_secs(10), || {
        (mesh.status("pk")["state"] == "draining").then_some(())
    });
    let health = mesh.ferry("pk", &["healthcheck", "--ready"], None);
    assert!(!health.status.success(), "a draining node is not ready");
    assert!(
        String::from_utf8_lossy(&health.stderr).contains("not ready: draining"),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    let pk = wait("PK exited and empty", Duration::from_secs(40), || {
        let s = mesh.status("pk");
        (s["state"] == "exited" && s["circuits"] == 0).then_some(s)
    });
    println!("PK: {} with {} circuits", pk["state"], pk["circuits"]);
    let entry = mesh.status("entry");
    for c in entry["origin"]["circuits"].as_array().unwrap() {
        assert!(
            !c["path"].as_array().unwrap().iter().any(|j| j == "PK"),
            "a circuit still crosses PK after its exit date: {c}"
        );
    }
    let moved = entry["origin"]["streams_moved"].as_u64().unwrap();
    assert!(
        moved >= via_pk.len() as u64,
        "{} held streams crossed PK but {moved} moved",
        via_pk.len()
    );
    for (t, s) in tenants.iter().zip(held.iter_mut()) {
        assert!(http_on(s).await.contains("Healthy"), "{t} after the drain");
    }
    println!(
        "after the exit date: no circuit crosses PK; {moved} stream(s) moved; held streams answer"
    );
    wait("Prometheus sees PK exited", Duration::from_secs(30), || {
        let q = "ferry_node_state{state=\"exited\"} * on (instance) group_left (jurisdiction) ferry_node_info{jurisdiction=\"PK\"}";
        (prom_query(prom_port, q)
            .first()
            .and_then(|v| v["value"][1].as_str())
            == Some("1"))
        .then_some(())
    });
    let firing = prom_query(prom_port, "ALERTS{alertname=\"FerryTrafficAfterExitDate\"}");
    assert!(firing.is_empty(), "traffic after the exit date: {firing:?}");

    // SIGTERM on a relay that carries a held stream: it drains, the stream
    // moves, and the container exits 0 by itself. Streams whose exit is the
    // stopped node cannot move, so it waits out its grace (20 s) for them;
    // a relay that is no held stream's exit stops as soon as it is empty,
    // so one is picked when there is one.
    let entry = mesh.status("entry");
    let exits: Vec<String> = tenants
        .iter()
        .filter_map(|t| path_of(&entry, t).last().map(|j| j.to_ascii_lowercase()))
        .collect();
    let hops: Vec<(usize, String)> = tenants
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            let p = path_of(&entry, t);
            p[..p.len() - 1]
                .iter()
                .map(|j| (i, j.to_ascii_lowercase()))
                .collect::<Vec<_>>()
        })
        .collect();
    let (which, relay) = hops
        .iter()
        .find(|(_, r)| !exits.contains(r))
        .or(hops.first())
        .cloned()
        .expect("a relay hop");
    let exit_here = exits.contains(&relay);
    let moved_before = entry["origin"]["streams_moved"].as_u64().unwrap();
    let t = Instant::now();
    run(Command::new("docker").args(["stop", "-t", "60", &mesh.container(&relay)]));
    let took = t.elapsed();
    let logs = mesh.logs(&relay);
    assert!(logs.contains("SIGTERM: draining"), "{relay}:\n{logs}");
    assert!(
        logs.contains("drain finished; stopping"),
        "{relay}:\n{logs}"
    );
    assert_eq!(mesh.inspect(&relay, "{{.State.ExitCode}}"), "0");
    if exit_here {
        assert!(took < Duration::from_secs(35), "stop took {took:?}");
    } else {
        assert!(
            took < Duration::from_secs(15),
            "{relay} was only a relay of moving circuits, yet stopping took {took:?}"
        );
    }
    assert!(http_on(&mut held[which]).await.contains("Healthy"));
    let moved_after = mesh.status("entry")["origin"]["streams_moved"]
        .as_u64()
        .unwrap();
    assert!(moved_after > moved_before, "the stream on {relay} moved");
    println!(
        "SIGTERM on {relay} (exit of a held stream: {exit_here}): drained and exited 0 in {took:.1?}; the held stream moved and answers; whole test {:.0?}",
        t0.elapsed()
    );
}

/// Debian's `prometheus` binary (scripts/ensure-deps.sh test installs it).
fn which_prometheus() -> PathBuf {
    let o = Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .output()
        .unwrap();
    let p = text(&o);
    assert!(
        !p.is_empty(),
        "prometheus is missing: scripts/ensure-deps.sh test installs it"
    );
    PathBuf::from(p)
}
