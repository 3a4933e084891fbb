//! Tenants with credentials at the entry: the real `curl` through a
//! tenant's password; a wrong password, an unknown tenant and a client with
//! no credentials are refused (and counted, and logged without the
//! password).

use ferry_tests::{Mesh, Options, http_server, tenant_block};
use std::process::Command;

/// The real `curl` through the entry, as `user:password` (none if empty).
fn curl(socks: &str, user: &str, url: &str) -> std::process::Output {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--socks5-hostname", socks]);
    if !user.is_empty() {
        c.args(["--proxy-user", user]);
    }
    c.arg(url).output().expect("running curl")
}

fn refusals(p: &ferry_tests::Proc) -> f64 {
    p.metric("ferry_refusals_total{reason=\"auth\"}")
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_tenant_with_its_password_is_served() {
    let block = tenant_block("acme", "enterprise", "s3cret horse");
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_toml: block,
            ..Options::default()
        },
    )
    .unwrap();
    let page = http_server("hello tenant").await.unwrap();
    let url = format!("http://127.0.0.1:{}/", page.port());
    let socks = mesh.socks().to_string();
    let (socks, url2) = (socks.clone(), url.clone());
    let ok =
        tokio::task::spawn_blocking(move || curl(&socks, "acme:s3cret horse|exclude=AE", &url2))
            .await
            .unwrap();
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("hello tenant"),
        "the tenant is served: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(refusals(&mesh.entry), 0.0);
    let socks = mesh.socks().to_string();
    for user in ["acme:wrong horse", "nobody:s3cret horse", ""] {
        let (socks, url) = (socks.clone(), url.clone());
        let out = tokio::task::spawn_blocking(move || curl(&socks, user, &url))
            .await
            .unwrap();
        assert!(
            !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("hello"),
            "`{user}` must be refused"
        );
    }
    assert_eq!(
        refusals(&mesh.entry),
        3.0,
        "each refusal is counted as auth"
    );
    let log = mesh.entry.log();
    for why in ["bad_password", "unknown_tenant", "anonymous"] {
        assert!(
            log.contains(why),
            "the reason `{why}` in the entry's log:\n{log}"
        );
    }
    assert!(
        !log.contains("wrong horse") && !log.contains("s3cret"),
        "no password in the log"
    );
}

/// SIGHUP reloads the tenants without a restart; a config that does not
/// validate is refused and the tenants in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tenants() {
    let old = tenant_block("acme", "enterprise", "old password");
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_toml: old.clone(),
            ..Options::default()
        },
    )
    .unwrap();
    let page = http_server("hello again").await.unwrap();
    let url = format!("http://127.0.0.1:{}/", page.port());
    let fetch = |user: &'static str| {
        let (socks, url) = (mesh.socks().to_string(), url.clone());
        tokio::task::spawn_blocking(move || curl(&socks, user, &url))
    };
    let served = |o: &std::process::Output| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("hello again")
    };
    assert!(served(&fetch("acme:old password").await.unwrap()));
    // A broken file: refused, the old password still works.
    let cfg = mesh.entry.dir.join("ferry.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[[tenants]]\nname = \"x\"\npassword_hash = \"not a hash\"\n"),
    )
    .unwrap();
    mesh.entry.signal("HUP");
    mesh.entry
        .wait_log(
            "the tenants in force stay",
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    assert!(served(&fetch("acme:old password").await.unwrap()));
    // A new password: the new one works at once, the old one no longer.
    let new = tenant_block("acme", "enterprise", "new password");
    std::fs::write(&cfg, text.replace(&old, &new)).unwrap();
    mesh.entry.signal("HUP");
    mesh.entry
        .wait_log(
            "tenants, routing and limits reloaded",
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    assert!(served(&fetch("acme:new password").await.unwrap()));
    assert!(!served(&fetch("acme:old password").await.unwrap()));
}

/// A client sending wrong passwords as fast as it can does not lock out a
/// tenant that knows its own: password checks are a bounded pool, and one
/// client may hold one place in it. (Before that bound, 800 wrong guesses
/// queued ahead of the tenant's check, which waited its 3 s and was refused
/// as busy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_guesser_does_not_lock_out_the_tenant() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const GUESSES: usize = 800;
    let mesh = Mesh::start(
        &ferry_tests::THREE,
        &Options {
            entry_toml: tenant_block("acme", "enterprise", "s3cret horse"),
            entry_replace: vec![
                (
                    "client_streams = 512".into(),
                    "client_streams = 2000".into(),
                ),
                ("client_burst = 300".into(), "client_burst = 2000".into()),
            ],
            ..Options::default()
        },
    )
    .unwrap();
    let target = ferry_tests::echo_server().await.unwrap();
    let socks = mesh.socks();
    // The guesser, from 127.0.0.8: every guess sent before the tenant
    // tries; each ends refused or closed.
    let sent = Arc::new(AtomicUsize::new(0));
    let guesses: Vec<_> = (0..GUESSES)
        .map(|i| {
            let sent = sent.clone();
            tokio::spawn(async move {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.bind("127.0.0.8:0".parse().unwrap()).unwrap();
                let Ok(mut s) = sock.connect(socks).await else {
                    sent.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                let guess = format!("guess{i:04}");
                let mut hello = vec![5, 1, 2, 1, 4];
                hello.extend_from_slice(b"acme");
                hello.push(guess.len() as u8);
                hello.extend_from_slice(guess.as_bytes());
                let _ = s.write_all(&hello).await;
                sent.fetch_add(1, Ordering::SeqCst);
                let mut answer = [0u8; 4];
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    s.read_exact(&mut answer),
                )
                .await;
            })
        })
        .collect();
    while sent.load(Ordering::SeqCst) < GUESSES {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let asked = std::time::Instant::now();
    let served = ferry_tests::socks_connect_from(
        socks,
        Some("127.0.0.9".parse().unwrap()),
        "127.0.0.1",
        target.port(),
        Some(("acme", "s3cret horse")),
    )
    .await;
    assert!(
        matches!(served, Ok(Ok(_))),
        "the tenant is served beside the guesser: {:?}",
        served.map(|r| r.err())
    );
    println!("the tenant's answer took {:?}", asked.elapsed());
    for g in guesses {
        g.await.unwrap();
    }
    assert!(
        mesh.entry.log().contains("busy"),
        "the guesser's surplus is refused as busy"
    );
}
