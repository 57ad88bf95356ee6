//! Operating keyward: Prometheus metrics move by the right amounts for the
//! right labels after known traffic; `status`, `top` and `usage --json`
//! agree with it; reloads under load fail no request, refuse a bad config
//! with its position, and pick up a changed key file; the demo's report adds
//! up; the systemd unit verifies and its capability set is exactly enough.

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use keyward_tests::{
    daemon::{Daemon, PORT},
    frame::{self, TCP},
    fwd::{self, ORIGIN, XDP_OPEN},
    netns::{self, SERVER_V4, Topology},
    privileged,
    upstream::Upstream,
    wire,
};

/// Scrape `/metrics` inside the server namespace.
fn scrape(t: &Topology) -> String {
    netns::in_ns(&t.server_ns, || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9901").expect("metrics listener");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    })
}

/// A series: its name and its sorted labels.
type Series = (String, Vec<(String, String)>);

/// Parse Prometheus text into (name, labels) → value.
fn series(text: &str) -> HashMap<Series, f64> {
    let mut m = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("keyward_")) {
        let Some((head, value)) = line.rsplit_once(' ') else { continue };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => {
                let mut ls: Vec<(String, String)> = rest
                    .trim_end_matches('}')
                    .split("\",")
                    .filter_map(|kv| kv.split_once("=\""))
                    .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
                    .collect();
                ls.sort();
                (n.to_owned(), ls)
            }
            None => (head.to_owned(), Vec::new()),
        };
        m.insert((name, labels), value.parse().unwrap_or(f64::NAN));
    }
    m
}

fn get(m: &HashMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    l.sort();
    *m.get(&(name.to_owned(), l)).unwrap_or_else(|| panic!("no series {name}{labels:?}"))
}

#[test]
fn metrics_and_cli_views_agree_with_known_traffic() {
    if !privileged() {
        return;
    }
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let d = Daemon::start_with(&t, "", &fwd::config(&up, "", ""));
    // The client's HTTP must not meet the XDP test rate of 10 pps.
    d.ok(&["allow", "add", "10.77.0.2"]);
    let before = series(&scrape(&t));

    let flood = Ipv4Addr::new(10, 210, 0, 1);
    let frames: Vec<Vec<u8>> = (0..100u16).map(|i| frame::tcp4(t.macs(), flood, SERVER_V4, 1000 + i, PORT)).collect();
    let (seen, _) = wire::deliver(&t, frames);
    let passed = seen.iter().filter(|s| s.proto == TCP && s.src == flood).count() as f64;
    for i in 0..3 {
        assert_eq!(wire::get(&t, PORT, &format!("/postcodes/AB{i}"), &[ORIGIN]).status, 200);
    }
    for _ in 0..2 {
        assert_eq!(wire::get(&t, PORT, "/nope", &[ORIGIN]).status, 404);
    }
    assert_eq!(wire::get(&t, PORT, "/cached/ZZ1", &[ORIGIN]).status, 200);
    assert_eq!(wire::get(&t, PORT, "/cached/ZZ1", &[ORIGIN]).status, 200);

    // The table is sampled off the scrape path: wait for a sample taken
    // after the traffic, so `keyward_tracked_sources` and the status view
    // both include the flood's source.
    let st = d.status_sampled();
    let after = series(&scrape(&t));
    let delta = |name: &str, labels: &[(&str, &str)]| get(&after, name, labels) - get(&before, name, labels);
    assert_eq!(delta("keyward_xdp_packets_total", &[("action", "drop"), ("reason", "rate")]), 100.0 - passed);
    assert!(delta("keyward_xdp_packets_total", &[("action", "pass"), ("reason", "allowed")]) >= 7.0 * 4.0);
    assert!(delta("keyward_xdp_bytes_total", &[("action", "drop"), ("reason", "rate")]) >= (100.0 - passed) * 54.0);
    assert_eq!(delta("keyward_xdp_new_sources_total", &[]), 1.0);
    let route = "GET /postcodes/{postcode}";
    assert_eq!(get(&after, "keyward_requests_total", &[("route", route), ("outcome", "forwarded")]), 3.0);
    assert_eq!(get(&after, "keyward_requests_total", &[("route", "-"), ("outcome", "no-route")]), 2.0);
    assert_eq!(
        get(&after, "keyward_requests_total", &[("route", "GET /cached/{postcode}"), ("outcome", "cache_hit")]),
        1.0
    );
    assert_eq!(get(&after, "keyward_upstream_responses_total", &[("route", route), ("code", "200")]), 3.0);
    assert_eq!(get(&after, "keyward_upstream_seconds_count", &[]), 4.0);
    assert!((get(&after, "keyward_budget_spent", &[("currency", "GBP")]) - 0.08).abs() < 1e-9);
    assert_eq!(get(&after, "keyward_budget_limit", &[("currency", "GBP")]), 100.0);
    assert_eq!(get(&after, "keyward_allow_entries", &[]), 1.0);
    assert_eq!(get(&after, "keyward_deny_entries", &[]), 0.0);
    assert!(get(&after, "keyward_tracked_sources", &[]) >= 1.0);
    assert_eq!(get(&after, "keyward_tracked_sources", &[]), st.tracked_sources as f64);
    let reset = get(&after, "keyward_budget_reset_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(reset > now && reset <= now + 86_400.0 + 1.0, "reset {reset}");

    // The CLI's JSON views tell the same story.
    let f = st.forwarder.clone().unwrap();
    assert_eq!(f.outcome("forwarded"), 4);
    assert_eq!(f.spent_micros, 80_000);
    assert_eq!(
        st.packets("drop", "rate") as f64,
        get(&after, "keyward_xdp_packets_total", &[("action", "drop"), ("reason", "rate")])
    );
    let top: serde_json::Value = serde_json::from_str(&d.ok(&["top", "-n", "5", "--json"])).unwrap();
    assert_eq!(top["sources"][0]["source"], "10.210.0.1");
    assert_eq!(top["sources"][0]["drops"].as_f64().unwrap(), 100.0 - passed);
    let usage: serde_json::Value = serde_json::from_str(&d.ok(&["usage", "--json"])).unwrap();
    assert_eq!(usage["spent"], "0.08");
    assert_eq!(usage["currency"], "GBP");
    assert_eq!(usage["top_clients"][0], serde_json::json!({"client": "10.77.0.2", "calls": 4}));
    assert_eq!(usage["cache_hit_ratio"], 0.5);
    let r = usage["routes"].as_array().unwrap().iter().find(|r| r["route"] == route).unwrap().clone();
    assert_eq!((r["forwarded"].as_u64(), r["refused"].as_u64()), (Some(3), Some(0)));
    let text = d.ok(&["status"]);
    assert!(text.contains("0.08 GBP of 100.00") && text.contains("10.210.0.1"), "{text}");
}

#[test]
fn reload_under_load_fails_no_request_and_refuses_a_bad_config() {
    if !privileged() {
        return;
    }
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let mut d = Daemon::prepare_with(&t, XDP_OPEN, "");
    let key_file = d.dir.join("upstream.key");
    std::fs::write(&key_file, "first-key-111\n").unwrap();
    let cfg = fwd::config(&up, "", "")
        .replace("key_env = \"KEYWARD_TEST_KEY\"", &format!("key_file = \"{}\"", key_file.display()));
    let base = std::fs::read_to_string(&d.config).unwrap();
    let good = format!("{base}\n{cfg}");
    std::fs::write(&d.config, &good).unwrap();
    d.spawn();

    // A client making 150 requests back to back while the config changes.
    let load = {
        let t2 = TopologyRef::of(&t);
        std::thread::spawn(move || (0..150).map(|i| t2.get(&format!("/postcodes/LD{i}")).status).collect::<Vec<u16>>())
    };
    for (rate, burst) in [(50_000, 60_000), (40_000, 40_000), (100_000, 100_000)] {
        let next = good
            .replace("rate_pps = 100000\nburst = 100000", &format!("rate_pps = {rate}\nburst = {burst}"))
            .replace("per_ip_rate = 1000", "per_ip_rate = 2000");
        std::fs::write(&d.config, next).unwrap();
        d.ok(&["reload"]);
        assert_eq!(d.status().rate_pps, rate);
        d.ok(&["allow", "add", "192.0.2.0/24"]);
        d.ok(&["allow", "rm", "192.0.2.0/24"]);
    }
    // A bad config is refused with its position, and the running one stays.
    std::fs::write(&d.config, good.replace("per_ip_daily = 1000", "per_ip_daily = 0")).unwrap();
    let o = d.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("keyward.toml:") && err.contains("nonzero"), "{err}");
    std::fs::write(&d.config, good.replace("base_url = ", "base_urll = ")).unwrap();
    assert!(String::from_utf8_lossy(&d.cli(&["reload"]).stderr).contains("unknown field `base_urll`"));
    let statuses = load.join().unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "failed requests during reloads: {statuses:?}");
    assert!(t.server_link().contains("prog/xdp"), "a reload detached XDP");

    // A changed key file is picked up by a reload (SIGHUP here).
    std::fs::write(&d.config, &good).unwrap();
    std::fs::write(&key_file, "second-key-222\n").unwrap();
    let pid = nix::unistd::Pid::from_raw(d.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let switched = keyward_tests::wait_for(Duration::from_secs(5), || {
        let a = wire::get(&t, PORT, "/postcodes/NEWKEY", &[ORIGIN]);
        assert_eq!(a.status, 200);
        up.calls().last().filter(|c| c.target.contains("second-key-222")).map(|_| ())
    });
    assert!(switched.is_some(), "the new key was not used after SIGHUP:\n{}", d.log());
    assert!(up.calls().iter().take(150).all(|c| c.target.contains("first-key-111")));
    assert!(!d.log().contains("second-key-222") && !d.log().contains("first-key-111"));
}

/// What the load thread needs of a topology (the topology itself stays with the test).
#[derive(Clone)]
struct TopologyRef {
    client_ns: String,
}

impl TopologyRef {
    fn of(t: &Topology) -> TopologyRef {
        TopologyRef { client_ns: t.client_ns.clone() }
    }

    fn get(&self, path: &str) -> wire::HttpAnswer {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: k\r\nOrigin: https://www.example.com\r\nConnection: close\r\n\r\n");
        wire::http_raw_in(&self.client_ns, None, PORT, req.as_bytes()).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

#[test]
fn the_demo_report_adds_up() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("keyward-demo-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyward-demo"))
        .args(["--quick", "--report"])
        .arg(&report)
        .env("KEYWARD_BIN", keyward_tests::daemon::bin())
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "demo failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let n = |k: &str| r[k].as_u64().unwrap();
    assert_eq!(n("forwarded"), n("upstream_calls"), "forwarded calls and calls the paid API saw");
    assert_eq!(n("spent_micros"), n("budget_micros"), "the budget ran out exactly");
    assert_eq!(n("spent_micros"), n("forwarded") * 20_000);
    let refused: u64 = r["refused"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert!(n("sent") >= n("forwarded") + refused, "{r}");
    assert_eq!(r["refused"]["origin-not-allowed"], 30);
    assert!(r["refused"]["daily-cap-reached"].as_u64() >= Some(1));
    assert!(r["refused"]["budget-exhausted"].as_u64() >= Some(1));
    assert!(r["kernel_drops"]["rate"].as_u64() > Some(500), "{r}");
    assert!(r["kernel_drops"]["denied"].as_u64() >= Some(1), "{r}");
    assert!(n("would_have_spent_micros") > n("spent_micros"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("== Report") && stdout.contains("XDP still attached: no"), "{stdout}");
}

#[test]
fn systemd_unit_verifies_and_its_capabilities_are_exactly_enough() {
    if !privileged() {
        return;
    }
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/keyward.service")).unwrap();
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap()
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    assert_eq!(caps, ["bpf", "perfmon", "net_admin", "net_bind_service"]);

    if std::process::Command::new("systemd-analyze").arg("--version").output().is_ok() {
        let dir = std::env::temp_dir().join(format!("keyward-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keyward.service");
        std::fs::write(&f, unit.replace("/usr/local/bin/keyward", &keyward_tests::daemon::bin().display().to_string()))
            .unwrap();
        let o = std::process::Command::new("systemd-analyze").arg("verify").arg(&f).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && !err.contains("keyward.service"), "systemd-analyze verify: {err}");
    } else {
        eprintln!("note: systemd-analyze not installed; unit syntax not verified");
    }

    // With exactly the unit's capabilities the daemon attaches and serves;
    // with any of the three BPF/network ones missing it refuses clearly.
    let t = Topology::new();
    let run = |set: &[String]| {
        let d = Daemon::prepare(&t, "");
        let bounding =
            format!("--bounding-set=-all,{}", set.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(","));
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", t.server_ns))
            .args(["setpriv", &bounding, "--inh-caps=-all"])
            .arg(keyward_tests::daemon::bin())
            .args(["run", "-c"])
            .arg(&d.config);
        (d, cmd)
    };
    let (d, mut cmd) = run(&caps);
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let up = keyward_tests::wait_for(Duration::from_secs(20), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("keyward with the unit's capabilities exited: {st}");
        }
        keyward::admin::call(&d.socket, &keyward::admin::Request::Status).ok()
    });
    assert!(up.is_some());
    assert!(t.server_link().contains("prog/xdp"));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
    for missing in ["bpf", "perfmon", "net_admin"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let (_d, mut cmd) = run(&fewer);
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "without CAP_{missing}: {err}");
        assert!(err.contains("needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"), "without CAP_{missing}: {err}");
    }
}
