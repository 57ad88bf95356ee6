//! What keyward ships besides the binary: the Grafana dashboard and the
//! Prometheus alerting rules in dist/ (well formed, and asking only for
//! series keyward exports), and the Debian package, installed for real with
//! `apt-get install ./keyward_*.deb`, checked (`keyward check` on the
//! installed example, conffiles, modes, the unit, the man page), and purged
//! leaving nothing behind. The package test needs root and the package that
//! `cargo xtask test` builds (`KEYWARD_DEB`); it installs into this system,
//! so it refuses to run where a keyward it did not install is present.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output},
};

use keyward_tests::privileged;

const DIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist");

/// Every series keyward exports (families, as a query names them).
const SERIES: &[&str] = &[
    "up",
    "keyward_xdp_packets_total",
    "keyward_xdp_bytes_total",
    "keyward_xdp_new_sources_total",
    "keyward_tracked_sources",
    "keyward_deny_entries",
    "keyward_allow_entries",
    "keyward_requests_total",
    "keyward_dry_run_would_refuse_total",
    "keyward_upstream_seconds_bucket",
    "keyward_upstream_responses_total",
    "keyward_budget_spent",
    "keyward_budget_limit",
    "keyward_budget_reset_timestamp_seconds",
    "keyward_build_info",
    "keyward_reload_total",
    "keyward_last_reload_success_timestamp_seconds",
    "keyward_xdp_attached",
    "keyward_store_writable",
];

/// The metric names a PromQL expression uses: identifiers outside quotes,
/// label matchers (`{...}`), label lists (`by (...)`) and ranges (`[5m]`),
/// that are not functions or keywords.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by", "without", "and", "or", "unless", "offset", "bool", "on", "ignoring", // operators
        "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk",
        "quantile", // aggregations
    ];
    let chars: Vec<char> = expr.chars().collect();
    let (mut names, mut i, mut skip_parens) = (Vec::new(), 0, false);
    while i < chars.len() {
        let c = chars[i];
        let close = match c {
            '"' => Some('"'),
            '{' => Some('}'),
            '[' => Some(']'),
            '(' if skip_parens => Some(')'),
            _ => None,
        };
        if let Some(close) = close {
            i += chars[i + 1..].iter().position(|x| *x == close).map_or(chars.len(), |n| n + 2);
            skip_parens = false;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            // `by (instance)`: a label list, not a call.
            skip_parens = word == "by" || word == "without" || word == "on" || word == "ignoring";
            let preceded_by_digit = start > 0 && chars[start - 1].is_ascii_digit();
            if !KEYWORDS.contains(&word.as_str()) && next != Some(&'(') && !preceded_by_digit {
                names.push(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

#[test]
fn grafana_dashboard_and_alert_rules_are_well_formed() {
    let text = std::fs::read_to_string(format!("{DIST}/grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "keyward");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    let mut ids = std::collections::HashSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id: {p}");
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "no series in `{expr}`");
            for n in names {
                assert!(
                    SERIES.contains(&n.as_str()),
                    "panel `{}` asks for `{n}`, which keyward does not export",
                    p["title"]
                );
            }
        }
    }

    let text = std::fs::read_to_string(format!("{DIST}/prometheus-alerts.yml")).unwrap();
    let rules: serde_json::Value = serde_norway::from_str(&text).expect("the rules are YAML");
    let group = &rules["groups"][0];
    assert_eq!(group["name"], "keyward");
    let mut alerts = Vec::new();
    for r in group["rules"].as_array().unwrap() {
        let name = r["alert"].as_str().expect("every rule is an alert");
        let expr = r["expr"].as_str().unwrap();
        assert!(["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap_or("")), "{name}");
        assert!(r["annotations"]["summary"].is_string() && r["annotations"]["description"].is_string(), "{name}");
        if let Some(f) = r["for"].as_str() {
            assert!(f.ends_with('m') || f.ends_with('s'), "{name}: for {f}");
        }
        for n in metric_names(expr) {
            assert!(SERIES.contains(&n.as_str()), "alert {name} asks for `{n}`, which keyward does not export");
        }
        alerts.push(name.to_owned());
    }
    for want in [
        "KeywardBudgetNearlySpent",
        "KeywardPacingEngaged",
        "KeywardXdpDetached",
        "KeywardStoreDown",
        "KeywardDropsSpiking",
    ] {
        assert!(alerts.iter().any(|a| a == want), "no {want} in {alerts:?}");
    }
    // The check itself: it finds a name that is not exported.
    assert_eq!(metric_names("rate(keyward_nope_total{a=\"b\"}[5m]) > 1"), ["keyward_nope_total"]);
    assert_eq!(metric_names("sum by (reason) (rate(a{x=\"drop\"}[1h] offset 1h)) > 10 * b"), ["a", "b"]);
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.env("DEBIAN_FRONTEND", "noninteractive").output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", "keyward"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("ii"))
}

/// Purges the package when dropped (also when the test fails).
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ =
            Command::new("apt-get").args(["purge", "-y", "keyward"]).env("DEBIAN_FRONTEND", "noninteractive").output();
    }
}

/// What the package puts on the system (all gone after a purge).
const PATHS: &[&str] = &[
    "/usr/bin/keyward",
    "/etc/keyward",
    "/var/lib/keyward",
    "/usr/lib/systemd/system/keyward.service",
    "/usr/share/man/man1/keyward.1.gz",
    "/usr/share/bash-completion/completions/keyward",
    "/usr/share/zsh/vendor-completions/_keyward",
    "/usr/share/fish/vendor_completions.d/keyward.fish",
    "/usr/share/keyward",
    "/usr/share/doc/keyward",
];

#[test]
fn the_package_installs_checks_and_purges_without_a_trace() {
    if !privileged() {
        return;
    }
    let Some(deb) = std::env::var_os("KEYWARD_DEB") else {
        eprintln!("note: KEYWARD_DEB is unset (cargo xtask test builds the package and sets it); not installing");
        return;
    };
    let deb = Path::new(&deb);
    assert!(deb.is_absolute() && deb.exists(), "{}", deb.display());
    if installed() {
        // Left by a run of this test that was killed: start clean.
        eprintln!("note: keyward is installed; purging it first");
        drop(Purge);
    }
    let foreign: Vec<&&str> = PATHS.iter().filter(|p| Path::new(p).exists()).collect();
    assert!(foreign.is_empty(), "not touching a keyward this test did not install: {foreign:?}");

    let _purge = Purge;
    run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends"]).arg(deb));
    assert!(installed());
    for p in PATHS {
        assert!(Path::new(p).exists(), "{p} not installed");
    }
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("/etc/keyward/environment"), 0o600, "the key's file is root's alone");
    assert_eq!(mode("/etc/keyward"), 0o700);
    assert_eq!(mode("/var/lib/keyward"), 0o700);
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "keyward"]));
    let conffiles = String::from_utf8_lossy(&conffiles.stdout);
    for f in ["/etc/keyward/keyward.toml", "/etc/keyward/environment"] {
        assert!(conffiles.contains(f), "{f} is not a conffile: {conffiles}");
    }
    // Installed, not enabled: the example must be edited first.
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/keyward.service").exists());

    let o = run(Command::new("/usr/bin/keyward").args(["check", "-c", "/etc/keyward/keyward.toml"]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("valid. Effective configuration"));
    if Command::new("systemd-analyze").arg("--version").output().is_ok() {
        // Now with its man page installed, the unit verifies as shipped.
        let o = run(Command::new("systemd-analyze").args(["verify", "/usr/lib/systemd/system/keyward.service"]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("keyward.service"), "systemd-analyze verify: {err}");
    }

    run(Command::new("apt-get").args(["purge", "-y", "keyward"]));
    assert!(!installed());
    let left: Vec<&&str> = PATHS.iter().filter(|p| Path::new(p).exists()).collect();
    assert!(left.is_empty(), "left behind after purge: {left:?}");
    assert!(!Path::new("/run/keyward").exists());
}
