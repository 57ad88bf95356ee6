//! The benchmark still works: tier 1 in its quick form runs on the embedded
//! object and reports a figure for every scenario. Never a timing threshold:
//! figures are information (see `cargo xtask bench`).

#[test]
fn tier_one_reports_every_scenario() {
    if !keyward_tests::privileged() {
        return;
    }
    let (_, json) =
        run_with_out(env!("CARGO_BIN_EXE_keyward-bench"), &["--quick", "--tier", "1"], "keyward-bench-smoke");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("bench JSON");
    let scenarios = doc["tier1"]["scenarios"].as_array().expect("scenarios");
    assert!(scenarios.len() >= 12);
    for s in scenarios {
        let ns = s["ns"]["median"].as_f64().unwrap_or(f64::NAN);
        assert!(ns.is_finite() && ns > 0.0, "no figure for {}", s["scenario"]);
        eprintln!("info: {:<45} {:>7.1} ns/packet", s["scenario"].as_str().unwrap_or("?"), ns);
    }
    assert!(doc["machine"]["kernel"].is_string());
}

/// The soak still runs: 20 seconds of the same mixed load, a report with
/// samples and every attack exercised. Figures are printed, never judged;
/// only behaviour is (no forged Origin admitted, visitors served).
#[test]
fn a_short_soak_reports_samples_and_exercises_every_attack() {
    if !keyward_tests::privileged() {
        return;
    }
    let (stdout, json) = run_with_out(env!("CARGO_BIN_EXE_keyward-soak"), &["--seconds", "20"], "keyward-soak-smoke");
    eprintln!("{stdout}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("soak JSON");
    assert!(doc["samples"].as_array().is_some_and(|s| s.len() >= 3), "{doc}");
    let t = &doc["tally"];
    for k in ["visitor_ok", "flood_429", "post_429", "origin_403", "idle_opened", "slow_opened", "spoofed_sent"] {
        assert!(t[k].as_u64().is_some_and(|n| n > 0), "{k} is 0: {t}");
    }
    assert_eq!(t["origin_admitted"], 0, "a forged Origin was admitted: {t}");
}

/// Run `bin` with `args` and `--out` a fresh directory; assert it succeeded
/// and return its stdout and the JSON report it wrote (the directory is removed).
fn run_with_out(bin: &str, args: &[&str], name: &str) -> (String, String) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let out = std::process::Command::new(bin).args(args).arg("--out").arg(&dir).output().unwrap();
    let json = std::fs::read_dir(&dir)
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().filter(|e| e.path().extension().is_some_and(|x| x == "json"))))
        .and_then(|e| std::fs::read_to_string(e.path()).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8_lossy(&out.stdout).into_owned(), json)
}
