//! Operating keyward: Prometheus metrics move by the right amounts for the
//! right labels after known traffic; `status`, `top` and `usage --json`
//! agree with it; reloads under load fail no request, refuse a bad config
//! with its position, and pick up a changed key file; the demo's report adds
//! up; the systemd unit verifies, its capability set is exactly enough, and
//! READY=1 reaches systemd's notify socket only once XDP is attached; under
//! journald each line carries its priority; health, readiness, the build and
//! reloads are on the metrics listener.

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
    // The metric and the status read the same sample of the table; a tick
    // may fall between one read and the other, so they must agree on some
    // pair of reads taken back to back.
    let agree = keyward_tests::wait_for(Duration::from_secs(10), || {
        let m = get(&series(&scrape(&t)), "keyward_tracked_sources", &[]);
        let s = d.status().tracked_sources as f64;
        (m == s).then_some(())
    });
    assert!(agree.is_some(), "keyward_tracked_sources never matched the status's count");
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
    for line in ["Type=notify", "ExecReload=/usr/bin/keyward reload -c /etc/keyward/keyward.toml", "WatchdogSec=30s"] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks `{line}`");
    }
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
        std::fs::write(&f, unit.replace("/usr/bin/keyward", &keyward_tests::daemon::bin().display().to_string()))
            .unwrap();
        // --man=no: the man page comes with the package (checked by its test).
        let o = std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&f).output().unwrap();
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
    // systemd's notify socket, as the test's: READY=1 only once attached,
    // watchdog pings (WATCHDOG_USEC as systemd sets it), STOPPING=1 at the end.
    let (d, mut cmd) = run(&caps);
    let notify_path = d.dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    cmd.env("NOTIFY_SOCKET", &notify_path).env("WATCHDOG_USEC", "1000000");
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let next = |want: &str| {
        let mut buf = [0u8; 4096];
        for _ in 0..50 {
            let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no `{want}` from keyward: {e}"));
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == want) {
                return msg;
            }
        }
        panic!("no `{want}` in 50 notifications");
    };
    let ready = next("READY=1");
    assert!(t.server_link().contains("prog/xdp"), "READY=1 before XDP was attached");
    assert!(
        keyward::admin::call(&d.socket, &keyward::admin::Request::Status).is_ok(),
        "READY=1 before the admin socket"
    );
    let status = ready.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_default().to_owned();
    assert!(status.contains(&format!("XDP on {}", t.server_if)), "{ready}");
    next("WATCHDOG=1");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    next("STOPPING=1");
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

/// `GET path` on the metrics listener inside the server namespace: status and body.
fn probe(t: &Topology, path: &str) -> (u16, String) {
    let path = path.to_owned();
    netns::in_ns(&t.server_ns, move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9901").expect("metrics listener");
        write!(s, "GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
    })
}

#[test]
fn journald_priorities_json_logs_health_and_reload_metrics() {
    if !privileged() {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    // JSON lines, and a listen port XDP does not guard (a warning at start).
    let cfg = fwd::config(&up, "", "").replace(&format!(":{PORT}\""), ":8444\"");
    let mut d = Daemon::prepare_with(&t, XDP_OPEN, &format!("{cfg}\n[log]\nformat = \"json\"\n"));
    // stderr is "the journal stream": its device and inode, as systemd sets them.
    let meta = d.log_file().metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    d.spawn_with_env(&[("JOURNAL_STREAM", &stream)]);

    let lines: Vec<(u8, serde_json::Value)> = d
        .log()
        .lines()
        .map(|l| {
            let (p, rest) =
                l.strip_prefix('<').and_then(|r| r.split_once('>')).unwrap_or_else(|| panic!("no priority: {l}"));
            (p.parse().unwrap(), serde_json::from_str(rest).unwrap_or_else(|e| panic!("not JSON ({e}): {rest}")))
        })
        .collect();
    let warned = lines.iter().find(|(_, v)| v["fields"]["message"].as_str().is_some_and(|m| m.contains("8444")));
    assert_eq!(warned.map(|(p, v)| (*p, v["level"].as_str().unwrap_or_default())), Some((4, "WARN")), "{}", d.log());
    assert!(lines.iter().any(|(p, v)| *p == 6 && v["level"] == "INFO"), "{}", d.log());

    assert_eq!(probe(&t, "/healthz"), (200, "ok\n".into()));
    assert_eq!(probe(&t, "/readyz"), (200, "ready\n".into()));
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();

    // A refused reload by SIGHUP (logged at warning) and a good one, counted apart.
    let good = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, good.replace("per_ip_daily = 1000", "per_ip_daily = 0")).unwrap();
    let pid = nix::unistd::Pid::from_raw(d.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let refused = keyward_tests::wait_for(Duration::from_secs(10), || {
        let m = series(&probe(&t, "/metrics").1);
        (get(&m, "keyward_reload_total", &[("result", "refused")]) == 1.0).then_some(())
    });
    assert!(refused.is_some(), "SIGHUP with a bad config was not counted:\n{}", d.log());
    std::fs::write(&d.config, good.replace("burst = 100000", "burst = 90000")).unwrap();
    d.ok(&["reload"]);
    let m = series(&probe(&t, "/metrics").1);
    assert_eq!(get(&m, "keyward_reload_total", &[("result", "ok")]), 1.0);
    let last = get(&m, "keyward_last_reload_success_timestamp_seconds", &[]);
    assert!(last >= started.floor() - 1.0, "{last} < {started}");
    let info = m.keys().find(|(n, _)| n == "keyward_build_info").expect("keyward_build_info").1.clone();
    assert!(info.iter().any(|(k, v)| k == "version" && v == env!("CARGO_PKG_VERSION")), "{info:?}");
    assert!(info.iter().any(|(k, v)| k == "commit" && !v.is_empty()), "{info:?}");
    let refused = d.log().lines().find(|l| l.contains("reload refused")).map(|l| l.get(..3).unwrap_or("").to_owned());
    assert_eq!(refused.as_deref(), Some("<4>"), "{}", d.log());
}

#[test]
fn access_log_names_each_request_without_query_values_or_key_and_is_sampled() {
    if !privileged() {
        return;
    }
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let cfg = fwd::config(&up, "", "");
    let log = "\n[log]\nformat = \"json\"\naccess = true\naccess_per_second = 3\n";
    let d = Daemon::start_with(&t, XDP_OPEN, &format!("{cfg}{log}"));
    let echoed = wire::get(&t, PORT, "/echo/hello?q=secretvalue123&other=zzz", &[ORIGIN]).status;
    assert_eq!(wire::get(&t, PORT, "/nope?token=topsecret456", &[ORIGIN]).status, 404);
    let access = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "keyward::access")
            .collect()
    };
    let lines = keyward_tests::wait_for(Duration::from_secs(5), || {
        let a = access(&d.log());
        (a.len() >= 2).then_some(a)
    })
    .unwrap_or_else(|| panic!("no access lines:\n{}", d.log()));
    let f = |i: usize| &lines[i]["fields"];
    assert_eq!((f(0)["method"].as_str(), f(0)["path"].as_str()), (Some("GET"), Some("/echo/hello")), "{lines:?}");
    assert_eq!(
        (f(0)["query"].as_str(), f(0)["status"].as_u64()),
        (Some("q,other"), Some(u64::from(echoed))),
        "{lines:?}"
    );
    assert_eq!(f(0)["outcome"].as_str(), Some("forwarded"), "{lines:?}");
    assert_eq!((f(0)["route"].as_str(), f(0)["client"].as_str()), (Some("GET /echo/{x}"), Some("10.77.0.2")));
    assert_eq!((f(1)["status"].as_u64(), f(1)["outcome"].as_str()), (Some(404), Some("no-route")), "{lines:?}");
    let text = d.log();
    for secret in ["secretvalue123", "zzz", "topsecret456", keyward_tests::daemon::KEY] {
        assert!(!text.contains(secret), "`{secret}` reached the log:\n{text}");
    }

    // A burst over the ceiling: at most 3 lines a second, the rest counted
    // and reported in one line by the first line of a later second. Every
    // request is then accounted for exactly: written, or reported left out.
    let burst = 12;
    for i in 0..burst {
        assert_eq!(wire::get(&t, PORT, &format!("/postcodes/AB{i}"), &[ORIGIN]).status, 200);
    }
    let mut sent = 2 + burst;
    let settled = keyward_tests::wait_for(Duration::from_secs(10), || {
        assert_eq!(wire::get(&t, PORT, "/nope", &[ORIGIN]).status, 404);
        sent += 1;
        let lines = access(&d.log());
        let written = lines.iter().filter(|v| v["fields"]["message"] == "access").count();
        let left: u64 = lines.iter().filter_map(|v| v["fields"]["left_out"].as_u64()).sum();
        (written + left as usize == sent).then_some((written, left))
    });
    let (written, left) = settled.unwrap_or_else(|| panic!("{sent} requests not all accounted for:\n{}", d.log()));
    assert!(left > 0, "nothing was left out of a burst of {burst} under a ceiling of 3/s ({written} written)");
    let burst_written = access(&d.log())
        .iter()
        .filter(|v| v["fields"]["path"].as_str().is_some_and(|p| p.starts_with("/postcodes/")))
        .count();
    assert!(burst_written < burst, "{burst_written} of {burst} burst lines written under a ceiling of 3/s");
}
