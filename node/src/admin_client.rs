//! `ferry status`, `ferry healthcheck`, `ferry drain` and `ferry policy
//! publish`: calls to a running node's admin API, and their answers printed.

use crate::admission_cli;
use anyhow::{Context, Result, bail};
use ferry_node::admin::client;
use ferry_node::authority::{fmt_time, now_ms};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn agent() -> ureq::Agent {
    client::agent(Duration::from_secs(10))
}

pub fn policy_publish(admin: SocketAddr, file: &Path) -> Result<()> {
    let body =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let is_revocation = serde_json::from_str::<serde_json::Value>(&body)
        .is_ok_and(|v| v.get("revocation").is_some());
    if is_revocation {
        let v = client::publish_revocation(&admin.to_string(), &body)?;
        println!(
            "node {} revoked{}",
            &v["revoked"].as_str().unwrap_or("?")
                [..8.min(v["revoked"].as_str().unwrap_or("?").len())],
            if v["new"].as_bool() == Some(false) {
                " (already)"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let v = client::publish_ruling(&admin.to_string(), &body)?;
    println!("{}", v["status"].as_str().unwrap_or("accepted"));
    Ok(())
}

/// How `ferry audit export` writes records.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AuditFormat {
    /// One JSON record a line.
    Jsonl,
    /// CSV with a header: a row a stream, its circuits in one column.
    Csv,
}

/// `ferry audit export`: the entry's trail since `since`, to standard
/// output, a page at a time (each page written before the next is asked
/// for, so a long trail never sits whole in memory).
pub fn audit_export(
    admin: SocketAddr,
    since: &str,
    tenant: Option<&str>,
    format: AuditFormat,
) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let mut cursor: Option<String> = None;
    loop {
        let mut req =
            client::agent(Duration::from_secs(120)).get(&format!("http://{admin}/v1/audit"));
        req = match &cursor {
            Some(c) => req.query("after", c),
            None => req.query("since", since),
        };
        if let Some(t) = tenant {
            req = req.query("tenant", t);
        }
        let v = client::answer(&admin.to_string(), req.call())?;
        let records: Vec<ferry_node::audit::Record> =
            serde_json::from_value(v["records"].clone()).context("the audit records")?;
        let mut out = Vec::new();
        match format {
            AuditFormat::Jsonl => {
                for r in &records {
                    serde_json::to_writer(&mut out, r)?;
                    out.push(b'\n');
                }
            }
            AuditFormat::Csv => {
                let mut w = csv::Writer::from_writer(Vec::new());
                if cursor.is_none() {
                    w.write_record([
                        "tenant",
                        "class",
                        "target",
                        "started",
                        "ended",
                        "bytes_up",
                        "bytes_down",
                        "end",
                        "moves",
                        "circuits",
                    ])?;
                }
                for r in &records {
                    // Each circuit: when, why, then its hops as JJ:node8.
                    let circuits: Vec<String> = r
                        .circuits
                        .iter()
                        .map(|l| {
                            let hops: Vec<String> = l
                                .hops
                                .iter()
                                .map(|h| {
                                    format!("{}:{}", h.jurisdiction, &h.node[..8.min(h.node.len())])
                                })
                                .collect();
                            format!("{} {} {}", l.at, l.why, hops.join(">"))
                        })
                        .collect();
                    w.write_record([
                        r.tenant.as_str(),
                        r.class.as_str(),
                        r.target.as_deref().unwrap_or(""),
                        r.started.as_str(),
                        r.ended.as_str(),
                        &r.bytes_up.to_string(),
                        &r.bytes_down.to_string(),
                        r.end.as_str(),
                        &r.circuits.len().saturating_sub(1).to_string(),
                        &circuits.join(" | "),
                    ])?;
                }
                out = w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?;
            }
        }
        match stdout.write_all(&out).and_then(|()| stdout.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r?,
        }
        match v["next"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(()),
        }
    }
}

/// `ferry audit report`: the entry's signed exit report of `ruling`,
/// written to `out` (or standard output), and a summary on standard
/// error.
pub fn audit_report(admin: SocketAddr, ruling: &str, out: Option<&Path>) -> Result<()> {
    let resp = client::agent(Duration::from_secs(300))
        .get(&format!("http://{admin}/v1/audit/report"))
        .query("ruling", ruling)
        .call();
    let v = client::answer(&admin.to_string(), resp)?;
    let text = format!("{}\n", serde_json::to_string_pretty(&v)?);
    match out {
        Some(path) => {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    let body: serde_json::Value =
        serde_json::from_str(v["body"].as_str().unwrap_or("{}")).context("the report's body")?;
    eprintln!("{}", report_summary(&body));
    Ok(())
}

/// `ferry audit verify`: checks a signed report.
pub fn audit_verify(path: &Path, node: Option<&str>) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (signer, body) = ferry_node::audit::verify_report(&text, node)
        .with_context(|| format!("{}: NOT VALID", path.display()))?;
    println!("valid: signed by node {signer}\n{}", report_summary(&body));
    if node.is_none() {
        println!(
            "(any key can sign a report: check that this is the entry's node id, or give --node)"
        );
    }
    Ok(())
}

/// A report's counts in one paragraph.
fn report_summary(b: &serde_json::Value) -> String {
    let r = &b["ruling"];
    let c = &b["crossed"];
    format!(
        "ruling {} v{} on {}: {} session(s) of its scope crossed the region: {} before {}, {} \
         while draining, {} after the exit date {}; {} moved out, {} closed; {} still open \
         crossing it, {} not recorded",
        r["id"].as_str().unwrap_or("?"),
        r["version"],
        r["region"].as_str().unwrap_or("?"),
        b["sessions"],
        c["before"],
        r["blocked_from"].as_str().unwrap_or("?"),
        c["draining"],
        c["after_exit"],
        r["exit_by"].as_str().unwrap_or("?"),
        b["moved_out"],
        b["closed"],
        b["open_sessions_crossing_now"],
        b["records_dropped_since_start"],
    )
}

/// The strings in a JSON array (none if it is not one).
fn strs(v: &serde_json::Value) -> impl Iterator<Item = &str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
}

/// What `ferry policy what-if` asks about.
pub enum WhatIf {
    /// A ruling given by flags.
    Flags {
        region: String,
        from: Option<String>,
        exit_by: String,
        class: Option<String>,
        tenant: Option<String>,
    },
    /// A ruling file, signed or not.
    File(std::path::PathBuf),
}

/// `ferry policy what-if`: asks the node, prints its answer.
pub fn what_if(admin: SocketAddr, ask: WhatIf, json: bool) -> Result<()> {
    let url = format!("http://{admin}/v1/what-if");
    let resp = match ask {
        WhatIf::Flags {
            region,
            from,
            exit_by,
            class,
            tenant,
        } => {
            let mut req = agent()
                .get(&url)
                .query("region", &region)
                .query("exit_by", &exit_by);
            for (k, v) in [("from", from), ("class", class), ("tenant", tenant)] {
                if let Some(v) = v {
                    req = req.query(k, &v);
                }
            }
            req.call()
        }
        WhatIf::File(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let file = ruling_file(&text).with_context(|| path.display().to_string())?;
            agent()
                .post(&url)
                .header("content-type", "application/json")
                .send(serde_json::to_string(&file)?.as_bytes())
        }
    };
    let v = client::answer(&admin.to_string(), resp)?;
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(&v)?)
    } else {
        what_if_text(&v)?
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// A ruling file's terms: a signed file's signed body (not its readable
/// copy), or the file as written.
fn ruling_file(text: &str) -> Result<ferry_node::authority::RulingFile> {
    use ferry_node::authority::{RulingFile, SignedFile};
    use prost::Message;
    if let Ok(signed) = serde_json::from_str::<SignedFile>(text) {
        let bytes = hex::decode(&signed.body_hex).context("body_hex")?;
        let body =
            ferry_proto::pb::RulingBody::decode(bytes.as_slice()).context("the signed body")?;
        return Ok(RulingFile::from_body(&body));
    }
    RulingFile::parse(text)
}

/// The text of a what-if answer.
fn what_if_text(v: &serde_json::Value) -> Result<String> {
    use std::fmt::Write;
    let mut o = String::new();
    let r = &v["ruling"];
    let names = |k: &str| -> Option<String> {
        let list = r["scope"][k].as_array()?;
        Some(
            list.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    let scope = match (names("classes"), names("tenants")) {
        (Some(c), _) => format!("{c} traffic"),
        (_, Some(t)) => format!("the traffic of {t}"),
        _ => "all traffic".to_string(),
    };
    writeln!(
        o,
        "what if {} ({}) drained from {}, out by {}, for {scope}:",
        r["region"].as_str().unwrap_or("?"),
        strs(&r["jurisdictions"]).collect::<Vec<_>>().join(" "),
        r["blocked_from"].as_str().unwrap_or("?"),
        r["exit_by"].as_str().unwrap_or("?"),
    )?;
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    let c = &v["capacity_mbps"];
    writeln!(
        o,
        "nodes leaving: {}  ({} of {} Mbit/s of the mesh, {:.1}%)",
        nodes.len(),
        c["leaving"],
        c["mesh"],
        c["share"].as_f64().unwrap_or(0.0) * 100.0
    )?;
    if let Some(m) = v["nodes_by_role"].as_object().filter(|m| !m.is_empty()) {
        let parts: Vec<String> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(o, "  by role: {}", parts.join(", "))?;
    }
    for n in &nodes {
        let id = n["id"].as_str().unwrap_or("?");
        writeln!(
            o,
            "  {}  {}  {:<16} {} Mbit/s",
            n["jurisdiction"].as_str().unwrap_or("??"),
            &id[..8.min(id.len())],
            n["roles"].as_str().unwrap_or("?"),
            n["capacity_mbps"]
        )?;
    }
    let own = v["circuits_seen"] == "own";
    writeln!(
        o,
        "circuits: {} would move, {} would close (their exit leaves), {} at risk, {} released{}",
        v["migrate"],
        v["close"],
        v["at_risk"],
        v["released"],
        if own {
            " (this entry's own)"
        } else {
            " (this node is no entry: ask the entries)"
        }
    )?;
    for c in v["circuits"].as_array().into_iter().flatten() {
        let path: Vec<&str> = strs(&c["path"]).collect();
        let tenant = c["tenant"]
            .as_str()
            .filter(|t| !t.is_empty())
            .unwrap_or("(none)");
        let when = match c["action"].as_str() {
            Some("released") => {
                "released: the rulings in force move or close it, this one would not".to_string()
            }
            Some("move") => format!(
                "moves at {}, done by {}",
                c["at"].as_str().unwrap_or("?"),
                c["done_by"].as_str().unwrap_or("?")
            ),
            _ => format!("closes at {}", c["at"].as_str().unwrap_or("?")),
        };
        writeln!(
            o,
            "  {}  tenant {tenant}  class {}  streams {}  {when}",
            path.join(" -> "),
            c["class"].as_str().unwrap_or("?"),
            c["streams"]
        )?;
        if let Some(why) = c["at_risk"].as_str() {
            writeln!(o, "    AT RISK: {why}")?;
        }
    }
    let tenants: Vec<&str> = strs(&v["tenants"])
        .map(|t| if t.is_empty() { "(none)" } else { t })
        .collect();
    writeln!(
        o,
        "tenants affected: {}",
        if tenants.is_empty() {
            "none".to_string()
        } else {
            tenants.join(", ")
        }
    )?;
    Ok(o)
}

pub fn healthcheck(admin: SocketAddr, ready: bool) -> Result<()> {
    let path = if ready { "readyz" } else { "livez" };
    let mut resp = client::agent(Duration::from_secs(3))
        .get(&format!("http://{admin}/{path}"))
        .call()
        .with_context(|| format!("node not answering on {admin}"))?;
    if resp.status().is_success() {
        println!("ok");
        return Ok(());
    }
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    let why = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .map(|v| {
            format!(
                "{}{}",
                v["state"].as_str().unwrap_or("?"),
                v["reason"]
                    .as_str()
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )
        })
        .unwrap_or(body);
    bail!("not {}: {why}", if ready { "ready" } else { "live" })
}

pub fn drain(
    admin: SocketAddr,
    exit_by: Option<String>,
    within: Option<Duration>,
    reason: &str,
    cancel: bool,
    transient: bool,
    wait: bool,
) -> Result<()> {
    let url = format!("http://{admin}/v1/drain");
    let resp = if cancel {
        agent().delete(&url).call()
    } else {
        let persist = !transient;
        let body = match (exit_by, within) {
            (Some(t), _) => {
                serde_json::json!({ "exit_by": t, "reason": reason, "persist": persist })
            }
            (None, Some(d)) => {
                serde_json::json!({ "in_secs": d.as_secs().max(1), "reason": reason, "persist": persist })
            }
            (None, None) => bail!("give --exit-by TIME, --in DURATION or --cancel"),
        };
        agent()
            .post(&url)
            .header("content-type", "application/json")
            .send(body.to_string().as_bytes())
    };
    let v = client::answer(&admin.to_string(), resp)?;
    match v["exit_by"].as_str() {
        Some(t) => println!("draining; exit by {t}"),
        None => println!("{}", v["status"].as_str().unwrap_or("ok")),
    }
    if wait && let Some(t) = v["exit_by"].as_str() {
        let until = humantime::parse_rfc3339_weak(t)
            .context("the node's exit date")?
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        wait_empty(admin, until)?;
    }
    Ok(())
}

/// Polls the node until it carries no circuit and no stream, printing
/// what is left every few seconds; an error if the exit date passes first.
fn wait_empty(admin: SocketAddr, until_ms: u64) -> Result<()> {
    let mut last_print = 0u64;
    loop {
        let v = client::answer(
            &admin.to_string(),
            agent().get(&format!("http://{admin}/v1/status")).call(),
        )?;
        let circuits = v["circuits"].as_u64().unwrap_or(0);
        let origin = v["origin"]["circuits"].as_array();
        let streams: u64 = origin
            .into_iter()
            .flatten()
            .map(|c| c["streams"].as_u64().unwrap_or(0))
            .sum();
        let now = now_ms();
        if circuits == 0 && streams == 0 {
            println!("drained: the node carries nothing");
            return Ok(());
        }
        if v["state"] == "exited" || now > until_ms + 2_000 {
            bail!("exit date passed with {circuits} circuit(s) and {streams} stream(s) left");
        }
        if now >= last_print + 5_000 {
            println!(
                "waiting: {circuits} circuit(s) carried, {streams} stream(s) of its own; exit in {} s",
                until_ms.saturating_sub(now) / 1000
            );
            last_print = now;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `ferry status`: once, or every `watch` in place until interrupted
/// (the screen redrawn on a terminal; elsewhere each frame follows the
/// last under a dated rule, and `--json` prints one line of JSON a frame).
/// While watching, a node that stops answering is said so and asked again.
pub fn status(admin: SocketAddr, json: bool, watch: Option<Duration>) -> Result<()> {
    let fetch = || {
        let resp = agent().get(&format!("http://{admin}/v1/status")).call();
        client::answer(&admin.to_string(), resp)
    };
    use std::io::{IsTerminal, Write};
    // The reader went away (`| head`): done, not an error.
    let done = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    };
    let Some(every) = watch else {
        let text = render(&fetch()?, json)?;
        let mut out = std::io::stdout().lock();
        return Ok(done(
            out.write_all(text.as_bytes()).and_then(|()| out.flush()),
        )?);
    };
    let tty = std::io::stdout().is_terminal();
    loop {
        let now = now_ms();
        let frame = match fetch() {
            Ok(v) if json => format!("{}\n", serde_json::to_string(&v)?),
            Ok(v) => render(&v, false)?,
            Err(e) if json => format!("{}\n", serde_json::json!({ "error": format!("{e:#}") })),
            Err(e) => format!(
                "{e:#}\n(asking again in {})\n",
                humantime::format_duration(every)
            ),
        };
        // Text from the node (reasons, ids) cannot move the cursor.
        let frame: String = frame
            .chars()
            .filter(|c| *c == '\n' || !c.is_control())
            .collect();
        let mut out = std::io::stdout().lock();
        let wrote = if json {
            write!(out, "{frame}")
        } else {
            let head = format!(
                "{}  every {}  (Ctrl-C to stop)",
                fmt_time(now),
                humantime::format_duration(every)
            );
            if tty {
                // Home, draw each line over the last frame's, then clear
                // what that frame left below.
                write!(
                    out,
                    "\x1b[H{head}\x1b[K\n{}\x1b[J",
                    frame.replace('\n', "\x1b[K\n")
                )
            } else {
                write!(out, "--- {head}\n{frame}")
            }
        };
        if let Err(e) = wrote.and_then(|()| out.flush()) {
            return Ok(done(Err(e))?);
        }
        drop(out);
        std::thread::sleep(every);
    }
}

/// The text `ferry status` prints for a status answer `v`, or the JSON
/// itself.
fn render(v: &serde_json::Value, json: bool) -> Result<String> {
    use std::fmt::Write;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(v)?));
    }
    let mut o = String::new();
    let s = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    writeln!(
        o,
        "node {}  {}  {}  {}",
        &s("node_id")[..8.min(s("node_id").len())],
        s("jurisdiction"),
        s("roles"),
        s("state")
    )?;
    if let Some(r) = v["state_reason"].as_str().filter(|r| !r.is_empty()) {
        writeln!(o, "  {r}")?;
    }
    if let Some(line) = admission_cli::status_line(v) {
        writeln!(o, "{line}")?;
    }
    writeln!(o, "circuits carried: {}", v["circuits"])?;
    if let Some(cs) = v["origin"]["circuits"].as_array() {
        writeln!(o, "own circuits: {}", cs.len())?;
        for c in cs {
            let path: Vec<&str> = strs(&c["path"]).collect();
            let named = |k: &str| c[k].as_str().filter(|s| !s.is_empty());
            let scope = match (named("tenant"), named("class")) {
                (Some(t), Some(k)) => format!("tenant {t}  class {k}"),
                (Some(t), None) => format!("tenant {t}"),
                (None, Some(k)) => format!("anonymous  class {k}"),
                (None, None) => "anonymous".to_string(),
            };
            writeln!(
                o,
                "  {}  {scope}  streams {}{}",
                path.join(" -> "),
                c["streams"],
                congestion_text(&c["congestion"])
            )?;
            if let Some(line) = leave_line(&c["must_leave"]) {
                writeln!(o, "    {line}")?;
            }
        }
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    writeln!(o, "peers: {}", peers.len())?;
    for p in &peers {
        let id = p["id"].as_str().unwrap_or("?");
        let rtt = match (p["rtt"]["srtt_ms"].as_f64(), p["rtt"]["min_ms"].as_f64()) {
            (Some(s), Some(m)) => format!("rtt {s:.2} ms (min {m:.2})"),
            _ => "no link".to_string(),
        };
        writeln!(
            o,
            "  {}  {}  {:<16} {:<9} {rtt}",
            p["jurisdiction"].as_str().unwrap_or("??"),
            &id[..8.min(id.len())],
            p["roles"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
        )?;
    }
    for q in v["quarantine"].as_array().into_iter().flatten() {
        let id = q["node_id"].as_str().unwrap_or("?");
        let landmark = q["landmark_id"].as_str().unwrap_or("?");
        writeln!(
            o,
            "quarantined: {} claims {}, but landmark {} at {} measured {:.2} ms (at least {:.2} ms for that claim)",
            &id[..8.min(id.len())],
            q["claimed"].as_str().unwrap_or("??"),
            &landmark[..8.min(landmark.len())],
            q["landmark_at"].as_str().unwrap_or("?"),
            q["measured_rtt_ms"].as_f64().unwrap_or(0.0),
            q["minimum_rtt_ms"].as_f64().unwrap_or(0.0),
        )?;
    }
    let rulings = v["rulings"].as_array().cloned().unwrap_or_default();
    writeln!(o, "rulings in force: {}", rulings.len())?;
    for r in rulings {
        writeln!(
            o,
            "  {} v{}  {}  blocked from {}  exit by {}{}",
            r["id"].as_str().unwrap_or("?"),
            r["version"],
            r["region"].as_str().unwrap_or("?"),
            r["blocked_from"].as_str().unwrap_or("?"),
            r["exit_by"].as_str().unwrap_or("?"),
            if r["lifted"].as_bool() == Some(true) {
                "  (lifted)"
            } else {
                ""
            }
        )?;
    }
    for key in [
        "ruling_rejections",
        "advert_rejections",
        "revocation_rejections",
    ] {
        if let Some(m) = v[key].as_object().filter(|m| !m.is_empty()) {
            let parts: Vec<String> = m.iter().map(|(k, n)| format!("{k}={n}")).collect();
            writeln!(o, "{}: {}", key.replace('_', " "), parts.join(" "))?;
        }
    }
    Ok(o)
}

/// What an own circuit's `must_leave` says, as a line: which hop must be
/// left, by when (counted from the node's own clock: `in_secs`), why, and
/// what happens then; `None` when nothing asks it to move.
/// A circuit's congestion window and round trip, as `  rtt 0.41 ms (least
/// 0.22)  window 512 KiB`; nothing when it does not probe.
fn congestion_text(c: &serde_json::Value) -> String {
    let (Some(window), Some(rtt), Some(base)) = (
        c["window_bytes"].as_u64(),
        c["rtt_us"].as_u64(),
        c["base_rtt_us"].as_u64(),
    ) else {
        return String::new();
    };
    if base == 0 {
        return format!("  window {} KiB", window / 1024);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "  rtt {:.2} ms (least {:.2})  window {} KiB",
        ms(rtt.max(base)),
        ms(base),
        window / 1024
    )
}

fn leave_line(m: &serde_json::Value) -> Option<String> {
    let by = m["by"].as_str()?;
    let short = |k: &str| m[k].as_str().map(|id| id[..8.min(id.len())].to_string());
    let left = match (m["phase"].as_str(), m["in_secs"].as_u64()) {
        (Some("overdue"), _) | (_, Some(0)) => "OVERDUE".to_string(),
        (_, Some(s)) => format!("in {}", humantime::format_duration(Duration::from_secs(s))),
        (_, None) => "?".to_string(),
    };
    let j = m["jurisdiction"].as_str().unwrap_or("??");
    let why = if let Some(r) = m["ruling"].as_str() {
        format!(
            "ruling {r} v{} on {}",
            m["version"],
            m["region"].as_str().unwrap_or("?")
        )
    } else if let Some(id) = short("hop_unknown") {
        format!("node {id} is not known here any more (its advert lapsed, or it was revoked)")
    } else {
        format!("node {} is draining", short("node").unwrap_or_default())
    };
    let phase = match m["phase"].as_str() {
        Some("announced") => format!(", draining from {}", m["from"].as_str().unwrap_or("?")),
        Some("draining") => ", draining now".to_string(),
        _ => String::new(),
    };
    let then = if m["action"] == "close" {
        "its exit leaves: its streams close then"
    } else {
        "it moves before then"
    };
    Some(format!(
        "must leave {j} by {by} ({left}): {why}{phase}; {then}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_circuit_says_which_hop_it_must_leave_by_when_and_why() {
        let announced = json!({
            "by": "2030-01-15T00:00:00Z", "in_secs": 7_200, "jurisdiction": "PK",
            "node": "cd".repeat(32), "action": "move", "phase": "announced",
            "from": "2030-01-01T00:00:00Z", "ruling": "pk-2030", "version": 3, "region": "PK",
        });
        assert_eq!(
            leave_line(&announced).unwrap(),
            "must leave PK by 2030-01-15T00:00:00Z (in 2h): ruling pk-2030 v3 on PK, \
             draining from 2030-01-01T00:00:00Z; it moves before then"
        );
        let exit = json!({
            "by": "2030-01-15T00:00:00Z", "in_secs": 0, "jurisdiction": "DE",
            "node": "ab".repeat(32), "action": "close", "phase": "overdue",
            "from": "2030-01-01T00:00:00Z", "ruling": null,
        });
        assert_eq!(
            leave_line(&exit).unwrap(),
            "must leave DE by 2030-01-15T00:00:00Z (OVERDUE): node abababab is draining; \
             its exit leaves: its streams close then"
        );
        let unknown = json!({
            "by": "2030-01-15T00:00:00Z", "in_secs": 0, "jurisdiction": "??",
            "hop_unknown": "ef".repeat(32), "action": "move",
        });
        assert!(
            leave_line(&unknown)
                .unwrap()
                .contains("node efefefef is not known here any more"),
            "{unknown}"
        );
        assert_eq!(leave_line(&serde_json::Value::Null), None);
    }
}
