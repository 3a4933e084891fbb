//! The Helm chart (`deploy/helm/ferry`), rendered and linted by Helm's own
//! code and validated against the Kubernetes schemas, for the defaults and
//! for non-default values: `tests/helm/check_chart.py` does the work (the
//! Helm SDK is a Python package here); this runs it and shows what it said.
//! `scripts/ensure-deps.sh test` installs its packages; a missing one fails
//! the test, naming it.

use std::process::Command;

#[test]
fn the_chart_renders_lints_and_validates() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/check_chart.py");
    let out = Command::new("python3")
        .arg(script)
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("found symbolic link in path"))
        .collect();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "check_chart.py failed (install its packages with scripts/ensure-deps.sh test):\n{stdout}\n{}",
        stderr.join("\n")
    );
    assert!(stdout.contains("chart: all "), "{stdout}");
}
