//! The HTTP CONNECT entry with the real `curl -p -x`: a tenant's page
//! through the mesh, 407 without credentials, 403 for a refused target,
//! 405 for plain proxying.

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
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_toml: tenant_block("acme", "s3cret"),
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
