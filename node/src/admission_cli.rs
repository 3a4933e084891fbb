//! `ferry request`, `ferry authority admit | cosign | revoke`,
//! `ferry keys rotate-noise` and `ferry paths`: admission on the command
//! line (see `ferry_node::cert` for what each file holds).

use anyhow::{Context, Result, bail};
use ferry_node::admin::client;
use ferry_node::authority::{load_key, now_ms};
use ferry_node::cert::{
    Admission, CertFile, Proposal, REQUEST_FILE, RequestFile, RevocationFile, certificate_body,
    cosign_file, make_request, parse_role_list, roles_of, sign_certificate,
};
use ferry_node::config::{NodeConfig, parse_jurisdiction};
use ferry_node::identity::{Keys, parse_key_hex};
use ferry_router::NodeId;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Writes `keys`' admission request to `path`; prints what to do next.
pub fn write_request(keys: &Keys, p: &Proposal<'_>, path: &Path) -> Result<()> {
    let req = make_request(keys, p, now_ms());
    std::fs::write(path, serde_json::to_string_pretty(&req)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "  request: {} (send it to the mesh's authority: `ferry authority admit --key KEY --request {} --jurisdiction {} --out node.cert`, then put node.cert next to the keys)",
        path.display(),
        path.display(),
        p.jurisdiction
    );
    Ok(())
}

/// `ferry request`: (re)writes a node's admission request from its config.
pub fn request(
    config: &Path,
    create_keys: bool,
    contact: &str,
    out: Option<PathBuf>,
) -> Result<()> {
    let cfg = NodeConfig::load(config)?;
    let keys = if create_keys {
        Keys::load_or_create(&cfg.key_dir)?.0
    } else {
        Keys::load(&cfg.key_dir)?
    };
    let path = out.unwrap_or_else(|| cfg.key_dir.join(REQUEST_FILE));
    println!(
        "node {} ({}, {})",
        keys.node_id().short(),
        cfg.jurisdiction,
        cfg.roles
    );
    write_request(
        &keys,
        &Proposal {
            jurisdiction: cfg.jurisdiction,
            family: &cfg.family,
            roles: cfg.roles,
            contact,
        },
        &path,
    )
}

/// What `ferry authority admit` is asked.
#[derive(clap::Args)]
pub struct AdmitArgs {
    /// An authority private key file; repeatable.
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    /// The node's request (node.request).
    #[arg(long)]
    pub request: PathBuf,
    /// The jurisdiction the authority vouches for (ISO 3166-1 alpha-2).
    #[arg(long)]
    pub jurisdiction: String,
    /// Operator family (default: as requested).
    #[arg(long)]
    pub family: Option<String>,
    /// Roles it may take, comma-separated (default: as requested).
    #[arg(long)]
    pub roles: Option<String>,
    /// Path selection weighs the node by at most this, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    pub capacity_max: u32,
    /// How long the certificate is valid.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub valid_for: Duration,
    /// Where to write the certificate (default: node.cert next to the request).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Make the node a landmark at this location, which the authority
    /// knows: `LAT,LON[,PLACE]` in degrees (for example
    /// `24.86,67.01,Karachi`). Landmarks measure round trips to the nodes
    /// they link to and sign reports that refute implausible jurisdictions.
    #[arg(long)]
    pub landmark: Option<String>,
}

/// `ferry authority admit`.
pub fn admit(a: AdmitArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.request)
        .with_context(|| format!("reading {}", a.request.display()))?;
    let file: RequestFile = serde_json::from_str(&text)
        .with_context(|| format!("request file {}", a.request.display()))?;
    let req = file.verify()?;
    let jurisdiction = parse_jurisdiction(&a.jurisdiction).context("--jurisdiction")?;
    let roles = match &a.roles {
        Some(r) => parse_role_list(r).context("--roles")?,
        None => roles_of(req.roles),
    };
    let keys = a
        .keys
        .iter()
        .map(|k| load_key(k))
        .collect::<Result<Vec<_>>>()?;
    if keys.is_empty() {
        bail!("give at least one --key");
    }
    let landmark = a
        .landmark
        .as_deref()
        .map(ferry_node::cert::Location::parse)
        .transpose()
        .context("--landmark")?;
    let now = now_ms();
    let body = certificate_body(
        &req,
        &Admission {
            jurisdiction,
            family: a.family.clone().unwrap_or_else(|| req.family.clone()),
            roles,
            capacity_max_mbps: a.capacity_max,
            not_before_ms: now.saturating_sub(60_000),
            not_after_ms: now + a.valid_for.as_millis() as u64,
            landmark,
        },
    )?;
    let cert = CertFile::from_cert(&sign_certificate(&body, &keys))?;
    let out = a.out.unwrap_or_else(|| {
        a.request
            .parent()
            .unwrap_or(Path::new("."))
            .join(ferry_node::cert::CERT_FILE)
    });
    std::fs::write(&out, serde_json::to_string_pretty(&cert)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    let c = &cert.certificate;
    if req.jurisdiction != c.jurisdiction {
        println!(
            "note: the node proposed {}; the certificate says {}",
            req.jurisdiction, c.jurisdiction
        );
    }
    println!(
        "admitted node {} ({}, family `{}`, {}, at most {} Mbit/s) until {} ({} signature{}) -> {}",
        &c.node_id[..8],
        c.jurisdiction,
        c.family,
        c.roles,
        c.capacity_max_mbps,
        c.not_after,
        cert.signatures.len(),
        if cert.signatures.len() == 1 { "" } else { "s" },
        out.display()
    );
    Ok(())
}

/// `ferry authority cosign`: adds a signature to a certificate or
/// revocation file, in place.
pub fn cosign(key: &Path, file: &Path) -> Result<()> {
    let sk = load_key(key)?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (text, what) = cosign_file(&text, &sk).with_context(|| format!("{}", file.display()))?;
    std::fs::write(file, &text).with_context(|| format!("writing {}", file.display()))?;
    let n = serde_json::from_str::<serde_json::Value>(&text)?["signatures"]
        .as_array()
        .map_or(0, Vec::len);
    println!(
        "signed the {what} in {} ({n} signatures now)",
        file.display()
    );
    Ok(())
}

/// `ferry authority revoke`.
pub fn revoke(keys: &[PathBuf], node: &str, reason: &str, out: &Path) -> Result<()> {
    let id = NodeId(parse_key_hex(node).context("--node: a node id is 64 hex digits")?);
    let keys = keys
        .iter()
        .map(|k| load_key(k))
        .collect::<Result<Vec<_>>>()?;
    if keys.is_empty() {
        bail!("give at least one --key");
    }
    let f = RevocationFile::new(&id, reason, now_ms(), &keys)?;
    std::fs::write(out, serde_json::to_string_pretty(&f)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "revocation of node {} ({} signature{}) -> {}; publish it with `ferry policy publish --admin ADDR {}`",
        id.short(),
        f.signatures.len(),
        if f.signatures.len() == 1 { "" } else { "s" },
        out.display(),
        out.display()
    );
    Ok(())
}

/// `ferry keys rotate-noise`.
pub fn rotate_noise(admin: SocketAddr, grace: Duration) -> Result<()> {
    let v = client::rotate_noise(&admin.to_string(), grace.as_secs().max(1))?;
    println!(
        "new Noise key {}; the old one is accepted until {}, then erased",
        &v["noise_key"].as_str().unwrap_or("?")
            [..16.min(v["noise_key"].as_str().unwrap_or("?").len())],
        v["old_key_until"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `ferry paths`: how `n` freshly picked paths spread over the mesh.
pub fn paths(admin: SocketAddr, n: usize, json: bool) -> Result<()> {
    let v = client::paths(&admin.to_string(), n)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let picked = v["picked"].as_u64().unwrap_or(0).max(1) as f64;
    println!("{} paths picked ({} failed)", v["picked"], v["failed"]);
    for node in v["nodes"].as_array().into_iter().flatten() {
        let id = node["id"].as_str().unwrap_or("?");
        let c = node["paths"].as_u64().unwrap_or(0);
        println!(
            "  {}  {}  capacity {:>6} Mbit/s  on {:>5} paths ({:.1}%)",
            &id[..8.min(id.len())],
            node["jurisdiction"].as_str().unwrap_or("??"),
            node["capacity_mbps"],
            c,
            100.0 * c as f64 / picked
        );
    }
    Ok(())
}

/// The certificate line of `ferry status`.
pub fn status_line(v: &serde_json::Value) -> Option<String> {
    let c = &v["certificate"];
    if c.is_null() {
        return None;
    }
    if c["present"].as_bool() != Some(true) {
        return (c["needed"].as_bool() == Some(true)).then(|| {
            format!(
                "certificate: none; {}",
                c["problem"].as_str().unwrap_or("peers refuse this node")
            )
        });
    }
    if let Some(p) = c["problem"].as_str() {
        return Some(format!("certificate: {p}"));
    }
    let days = c["expires_in_secs"].as_u64().unwrap_or(0) / 86_400;
    Some(format!(
        "certificate: {} {} up to {} Mbit/s, until {} ({} day{} left{})",
        c["jurisdiction"].as_str().unwrap_or("?"),
        c["roles"].as_str().unwrap_or("?"),
        c["capacity_max_mbps"],
        c["not_after"].as_str().unwrap_or("?"),
        days,
        if days == 1 { "" } else { "s" },
        if days < 14 { ": RENEW SOON" } else { "" }
    ))
}

/// `--admit-with`: trusts the test cluster's authority key and, unless the
/// node already holds a certificate valid under it, admits the node as
/// configured (30 days) into its key dir.
pub fn self_admit(cfg: &mut NodeConfig, keys: &Keys, key_file: &Path) -> Result<()> {
    let sk = load_key(key_file).context("--admit-with")?;
    let public = hex::encode(sk.verifying_key().as_bytes());
    let mut trusted: Vec<String> = cfg
        .authority
        .keys
        .iter()
        .map(|k| hex::encode(k.as_bytes()))
        .collect();
    if !trusted.contains(&public) {
        trusted.push(public);
        cfg.authority =
            ferry_node::authority::Authority::new(&trusted, cfg.authority.threshold.max(1))?;
    }
    let now = now_ms();
    let held = ferry_node::cert::OwnCert::load(&cfg.key_dir, &cfg.authority, &keys.node_id())?;
    if held.is_some_and(|c| c.problem(now + 86_400_000).is_none()) {
        return Ok(());
    }
    ferry_node::cert::admit_into(
        &cfg.key_dir,
        keys,
        &Admission {
            jurisdiction: cfg.jurisdiction,
            family: cfg.family.clone(),
            roles: cfg.roles,
            capacity_max_mbps: cfg.capacity_mbps.max(1),
            not_before_ms: now.saturating_sub(60_000),
            not_after_ms: now + 30 * 86_400_000,
            landmark: None,
        },
        &[sk],
    )?;
    tracing::warn!(
        jurisdiction = %cfg.jurisdiction,
        roles = %cfg.roles,
        "admitted this node with a test cluster's authority key (--admit-with); production nodes are admitted offline with `ferry authority admit`"
    );
    Ok(())
}
