//! The HTTP CONNECT entry with the real `curl -p -x`: a tenant's page
//! through the mesh (by password and by bearer token), 407 without
//! credentials or with a wrong token, 403 for a refused target, 405 for
//! plain proxying; and the real `git clone` of an HTTPS repository through
//! it.

use ferry_tests::{Mesh, Options, free_port, http_server};
use std::io::Write;
use std::process::{Command, Stdio};

fn tenant_block(name: &str, password: &str) -> String {
    let mut child = Command::new(ferry_tests::ferry_bin().unwrap())
        .args(["tenant", "add", name, "--class", "enterprise"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// `ferry tenant add NAME --token`: the block (stdout) and the token
/// (stderr, shown once).
fn token_block(name: &str) -> (String, String) {
    let out = Command::new(ferry_tests::ferry_bin().unwrap())
        .args(["tenant", "add", name, "--class", "enterprise", "--token"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let block = String::from_utf8(out.stdout).unwrap();
    let token = String::from_utf8(out.stderr)
        .unwrap()
        .split_whitespace()
        .find(|w| w.starts_with("ferry_"))
        .expect("a token on stderr")
        .to_string();
    assert!(block.contains("token_hash = \"sha256:"), "{block}");
    assert!(!block.contains(&token), "the block holds no token");
    (block, token)
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("running curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_tunnels_through_the_http_connect_entry() {
    let http = free_port().unwrap().to_string();
    let (bot, token) = token_block("bot");
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_toml: format!("{}\n{bot}", tenant_block("acme", "s3cret")),
            entry_http: Some(http.parse().unwrap()),
            ..Options::default()
        },
    )
    .unwrap();
    let page = http_server("through CONNECT").await.unwrap();
    let url = format!("http://127.0.0.1:{}/", page.port());
    let proxy = format!("http://{http}");
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // A tenant, through a 3-hop circuit.
    let (ok, body, err) = run(s(&[
        "-p",
        "-x",
        &proxy,
        "--proxy-user",
        "acme:s3cret",
        &url,
    ]))
    .await
    .unwrap();
    assert!(ok && body.contains("through CONNECT"), "{err}");
    let circuits = mesh.entry.status().unwrap()["origin"]["circuits"].clone();
    assert!(
        circuits
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tenant"] == "acme" && c["path"].as_array().unwrap().len() == 3),
        "a 3-hop circuit for acme: {circuits}"
    );
    // No credentials: 407.
    let (ok, _, err) = run(s(&["-p", "-x", &proxy, &url])).await.unwrap();
    assert!(!ok && err.contains("407"), "{err}");
    // A tenant by its bearer token; a wrong token is 407.
    let bearer = format!("Proxy-Authorization: Bearer {token}");
    let (ok, body, err) = run(s(&["-p", "-x", &proxy, "--proxy-header", &bearer, &url]))
        .await
        .unwrap();
    assert!(ok && body.contains("through CONNECT"), "{err}");
    let wrong = format!("Proxy-Authorization: Bearer {token}x");
    let (ok, _, err) = run(s(&["-p", "-x", &proxy, "--proxy-header", &wrong, &url]))
        .await
        .unwrap();
    assert!(!ok && err.contains("407"), "{err}");
    // The same token as a SOCKS5 password, with the tenant's name.
    let socks_user = format!("bot:{token}");
    let socks = mesh.socks().to_string();
    let (ok, body, err) = run(s(&[
        "--socks5-hostname",
        &socks,
        "--proxy-user",
        &socks_user,
        &url,
    ]))
    .await
    .unwrap();
    assert!(ok && body.contains("through CONNECT"), "{err}");
    let circuits = mesh.entry.status().unwrap()["origin"]["circuits"].clone();
    assert!(
        circuits
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tenant"] == "bot"),
        "the token's tenant has its own circuit: {circuits}"
    );
    // A refused target (no exit in JP): 403.
    let (ok, _, err) = run(s(&[
        "-p",
        "-x",
        &proxy,
        "--proxy-user",
        "acme:s3cret",
        "--proxy-header",
        "Ferry-Options: exit_in=JP",
        &url,
    ]))
    .await
    .unwrap();
    assert!(!ok && err.contains("403"), "{err}");
    // Plain proxying is not offered: 405 with a hint.
    let (_, body, _) = run(s(&[
        "-x",
        &proxy,
        "--proxy-user",
        "acme:s3cret",
        "-i",
        &url,
    ]))
    .await
    .unwrap();
    assert!(
        body.starts_with("HTTP/1.1 405") && body.contains("use CONNECT"),
        "{body}"
    );
}

/// An HTTPS server of a folder (Python's `http.server` behind TLS, the
/// certificate `cert`), killed when dropped; git's "dumb" HTTP protocol
/// needs nothing more.
struct HttpsServer {
    child: std::process::Child,
    port: u16,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SERVE_TLS: &str = r#"
import functools, http.server, ssl, sys
folder, cert, key = sys.argv[1:4]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
tls.load_cert_chain(cert, key)
server.socket = tls.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

fn https_server(
    folder: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> HttpsServer {
    use std::io::BufRead;
    let mut child = Command::new("python3")
        .args(["-c", SERVE_TLS])
        .args([folder, cert, key])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the server's port");
    HttpsServer { child, port }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `git -c http.proxy=http://tenant:pass@entry clone https://…`: git
/// (libcurl) tunnels TLS through the HTTP CONNECT entry and a 3-hop
/// circuit, verifying the server's certificate end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clones_an_https_repository_through_the_entry() {
    let http = free_port().unwrap();
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_toml: tenant_block("acme", "s3cret"),
            entry_http: Some(http),
            ..Options::default()
        },
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.args([
            "-c",
            "user.name=ferry",
            "-c",
            "user.email=ferry@example.org",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY");
        c
    };
    run_ok(git(&["init", "-q", "src"]).env_remove("GIT_DIR"));
    let readme = "carried by Ferry\n".repeat(2000);
    std::fs::write(dir.join("src/README"), &readme).unwrap();
    run_ok(&mut git(&["-C", "src", "add", "README"]));
    run_ok(&mut git(&["-C", "src", "commit", "-q", "-m", "first"]));
    std::fs::create_dir(dir.join("srv")).unwrap();
    run_ok(&mut git(&["clone", "-q", "--bare", "src", "srv/repo.git"]));
    run_ok(&mut git(&["-C", "srv/repo.git", "update-server-info"]));
    run_ok(Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
    ]));
    let server = https_server(
        &dir.join("srv"),
        &dir.join("cert.pem"),
        &dir.join("key.pem"),
    );
    let proxy = format!("http.proxy=http://acme:s3cret@{http}");
    let url = format!("https://127.0.0.1:{}/repo.git", server.port);
    // Git trusts the test's certificate alone (the variable beats
    // http.sslCAInfo, and some machines set it to the system bundle).
    let mut clone = git(&["-c", &proxy, "clone", "-q", &url, "out"]);
    clone.env("GIT_SSL_CAINFO", dir.join("cert.pem"));
    let out = tokio::task::spawn_blocking(move || clone.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "git clone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("out/README")).unwrap(),
        readme
    );
    // It went through the entry: the tenant's streams were counted.
    assert!(
        mesh.entry
            .metric("ferry_streams_opened_total")
            .unwrap_or(0.0)
            >= 1.0
    );
    let circuits = mesh.entry.status().unwrap()["origin"]["circuits"].clone();
    assert!(
        circuits
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tenant"] == "acme"),
        "a circuit for acme: {circuits}"
    );
}
