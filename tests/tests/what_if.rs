//! `ferry policy what-if` against a live entry: before a ruling is signed,
//! which nodes would leave, which of the entry's circuits would move or
//! close, and whose they are; the same for a bloc and for a ruling file.

use ferry_node::authority::{fmt_time, now_ms};
use ferry_tests::{Mesh, Options, Spec, echo_server, run_ferry, socks_connect_as, tenant_block};
use serde_json::Value;
use std::collections::BTreeSet;

/// The ids of the circuits in a what-if answer with `action`, by tenant.
fn tenants_that(v: &Value, action: &str) -> BTreeSet<String> {
    v["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == action)
        .map(|c| c["tenant"].as_str().unwrap().to_string())
        .collect()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_if_lists_the_nodes_circuits_and_tenants_a_ruling_would_hit() {
    let mut tenants = String::new();
    for (name, class) in [
        ("acme", "enterprise"),
        ("globex", "consumer"),
        ("initech", "consumer"),
    ] {
        tenants.push_str(&tenant_block(name, class, &format!("{name} pw")));
    }
    let specs = [
        Spec::new("GB", "relay"),
        Spec::new("DE", "relay"),
        Spec::new("CA", "exit"),
        Spec::new("GB", "exit"),
    ];
    let opts = Options {
        hops: 2,
        entry_toml: tenants,
        ..Options::default()
    };
    let mesh = Mesh::start(&specs, &opts).unwrap();
    let echo = echo_server().await.unwrap();
    // acme through the GB relay to CA (moves), globex out of the GB exit
    // (closes), initech around GB altogether.
    let mut streams = Vec::new();
    for (tenant, options) in [
        ("acme", "exclude=DE;exit_in=CA"),
        ("globex", "exit_in=GB;exclude=CA"),
        ("initech", "exclude=GB"),
    ] {
        let pw = format!("{tenant} pw|{options}");
        let s = socks_connect_as(mesh.socks(), "127.0.0.1", echo.port(), Some((tenant, &pw)))
            .await
            .unwrap()
            .unwrap_or_else(|code| panic!("{tenant}: SOCKS reply {code}"));
        streams.push(s);
    }
    let admin = mesh.entry.admin.to_string();
    let now = now_ms();
    let (from, exit) = (fmt_time(now + 3_600_000), fmt_time(now + 7_200_000));
    let ask = |extra: &[&str]| -> Value {
        let mut args = vec!["policy", "what-if", "--admin", &admin, "--json"];
        args.extend(extra);
        serde_json::from_str(&run_ferry(&args).unwrap()).unwrap()
    };

    let gb = ask(&["--region", "GB", "--from", &from, "--exit-by", &exit]);
    let ids = |specs: &[usize]| -> BTreeSet<String> {
        specs.iter().map(|i| mesh.nodes[*i].id.clone()).collect()
    };
    let nodes: BTreeSet<String> = gb["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nodes, ids(&[0, 3]), "the two GB nodes: {gb:#}");
    assert_eq!(tenants_that(&gb, "move"), ["acme".to_string()].into());
    assert_eq!(tenants_that(&gb, "close"), ["globex".to_string()].into());
    assert_eq!(
        strings(&gb["tenants"]),
        ["acme".to_string(), "globex".to_string()].into()
    );
    assert_eq!(gb["by_jurisdiction"]["GB"]["nodes"], 2, "{gb:#}");
    assert_eq!(gb["at_risk"], 0, "an hour is time enough: {gb:#}");
    assert_eq!(gb["circuits_seen"], "own");
    let share = gb["capacity_mbps"]["share"].as_f64().unwrap();
    assert!(
        (share - 0.5).abs() < 1e-9,
        "two of four equal nodes: {gb:#}"
    );

    // A bloc covers every member: FIVE_EYES holds GB and CA, so every
    // circuit here is hit (initech's exit is in CA).
    let five = ask(&["--region", "FIVE_EYES", "--from", &from, "--exit-by", &exit]);
    let members = strings(&five["ruling"]["jurisdictions"]);
    for j in ["AU", "CA", "GB", "NZ", "US"] {
        assert!(members.contains(j), "{j} in FIVE_EYES: {members:?}");
    }
    assert_eq!(five["nodes"].as_array().unwrap().len(), 3, "{five:#}");
    assert_eq!(
        strings(&five["tenants"]),
        ["acme", "globex", "initech"].map(String::from).into()
    );

    // A class-scoped ruling hits only that class's circuits, and one that
    // must be out in a minute cannot be met: at risk, with the reason.
    let soon = fmt_time(now_ms() + 10_000);
    let enterprise = [
        "--region",
        "GB",
        "--exit-by",
        &soon,
        "--class",
        "enterprise",
    ];
    let class = ask(&enterprise);
    assert_eq!(strings(&class["tenants"]), ["acme".to_string()].into());
    assert_eq!(class["at_risk"], 1, "{class:#}");
    let risk = class["circuits"][0]["at_risk"].as_str().unwrap();
    assert!(risk.contains("margin_secs"), "{risk}");
    let mut args = vec!["policy", "what-if", "--admin", &admin];
    args.extend(enterprise);
    let text = run_ferry(&args).unwrap();
    for want in [
        "nodes leaving: 2",
        "tenant acme  class enterprise",
        "AT RISK:",
        "tenants affected: acme",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }

    // The same ruling as a file, before it is signed: the same answer.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gb.toml");
    std::fs::write(
        &file,
        format!(
            "id = \"gb-2031\"\nversion = 1\nregion = \"GB\"\nblocked_from = \"{from}\"\n\
             exit_by = \"{exit}\"\nreason = \"licence withdrawn\"\n"
        ),
    )
    .unwrap();
    let from_file = ask(&["--file", file.to_str().unwrap()]);
    for key in [
        "nodes",
        "circuits",
        "tenants",
        "by_jurisdiction",
        "capacity_mbps",
    ] {
        assert_eq!(
            from_file[key], gb[key],
            "{key} from the file and from the flags"
        );
    }
    assert_eq!(from_file["ruling"]["id"], "gb-2031");

    // Bad input is refused with the reason, and nothing changes.
    let bad = ferry_tests::run_ferry(&[
        "policy",
        "what-if",
        "--admin",
        &admin,
        "--region",
        "XX_NOT",
        "--exit-by",
        &exit,
    ])
    .unwrap_err()
    .to_string();
    assert!(bad.contains("XX_NOT"), "{bad}");
    let status = mesh.entry.status().unwrap();
    assert_eq!(
        status["rulings"].as_array().unwrap().len(),
        0,
        "a what-if is not a ruling"
    );
    drop(streams);
}
