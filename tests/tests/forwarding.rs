//! The forwarder end to end: the real `keyward` binary (XDP attached too) in
//! a server namespace, a stand-in paid API on that namespace's loopback, and
//! raw HTTP/1.1 requests from the client namespace. Every refusal must be
//! problem+json and must never reach the stand-in; the key must reach the
//! stand-in and never come back out.

use std::time::Duration;

use keyward_tests::{
    daemon::{Daemon, KEY, PORT},
    fwd::{ORIGIN, XDP_OPEN, config},
    netns::Topology,
    privileged,
    upstream::Upstream,
    wait_for,
    wire::{self, HttpAnswer},
};

struct Setup {
    t: Topology,
    up: Upstream,
    d: Daemon,
}

fn setup(limits: &str, extra: &str) -> Setup {
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let d = Daemon::start_with(&t, XDP_OPEN, &config(&up, limits, extra));
    Setup { t, up, d }
}

impl Setup {
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpAnswer {
        wire::get(&self.t, PORT, path, headers)
    }

    fn page(&self, path: &str) -> HttpAnswer {
        self.get(path, &[ORIGIN])
    }

    fn spent(&self) -> u64 {
        self.d.status().forwarder.expect("forwarder status").spent_micros
    }
}

fn assert_problem(a: &HttpAnswer, status: u16, suffix: &str) {
    assert_eq!(a.status, status, "{}", a.raw);
    assert_eq!(a.header("content-type"), Some("application/problem+json"), "{}", a.raw);
    let ty = a.json()["type"].as_str().unwrap_or_default().to_owned();
    match suffix {
        "rate-limited" | "daily-cap-reached" => {
            assert_eq!(ty, "https://iana.org/assignments/http-problem-types#quota-exceeded", "{}", a.raw)
        }
        s => assert_eq!(ty, format!("urn:keyward:problem:{s}"), "{}", a.raw),
    }
    assert_eq!(a.json()["status"], status);
}

#[test]
fn forwards_with_the_key_injected_and_client_copies_stripped() {
    if !privileged() {
        return;
    }
    let s = setup("", "");
    let a = s.page("/postcodes/SW1A%201AA?filter=a,b&evil=1&api_key=stolen");
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.json()["postcode"], "SW1A%201AA");
    assert_eq!(a.header("access-control-allow-origin"), Some("https://www.example.com"));
    assert_eq!(a.header("ratelimit-policy"), Some("\"ip-rate\";q=1000;w=1, \"ip-daily\";q=1000;w=86400"));
    assert!(a.header("ratelimit").is_some_and(|v| v.contains("\"ip-daily\";r=999;")), "{}", a.raw);
    let calls = s.up.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    let encoded: String = KEY
        .bytes()
        .map(|b| match b {
            b'+' => "%2B".to_owned(),
            b'/' => "%2F".to_owned(),
            b'=' => "%3D".to_owned(),
            b => (b as char).to_string(),
        })
        .collect();
    assert_eq!(c.target, format!("/v1/postcodes/SW1A%201AA?filter=a%2Cb&api_key={encoded}"));
    assert!(!c.target.contains("stolen") && !c.target.contains("evil"));
    assert_eq!(c.header("idpc-source-ip"), Some("10.77.0.2"));
    assert!(c.header("origin").is_none(), "client headers are not passed on");
    assert_eq!(s.spent(), 20_000);
}

#[test]
fn every_refusal_is_problem_json_and_never_reaches_the_upstream() {
    if !privileged() {
        return;
    }
    let s = setup("", "");
    assert_problem(&s.page("/nope"), 404, "no-route");
    assert_problem(&s.page("/postcodes/AB1/extra"), 404, "no-route");
    let del = wire::http_raw(
        &s.t,
        PORT,
        b"DELETE /postcodes/AB1 HTTP/1.1\r\nHost: x\r\nOrigin: https://www.example.com\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_problem(&del, 404, "no-route");
    assert_problem(&s.page("/postcodes/a!b"), 400, "bad-parameter");
    assert_problem(&s.page("/postcodes/ABCDEFGHIJKLMNOP"), 400, "bad-parameter");
    assert_problem(&s.page("/postcodes/AB1?filter=a%0d%0ab"), 400, "bad-parameter");
    assert_problem(&s.get("/postcodes/AB1", &[]), 403, "origin-not-allowed");
    assert_problem(&s.get("/postcodes/AB1", &[("Origin", "https://evil.example")]), 403, "origin-not-allowed");
    assert_problem(&s.get("/postcodes/AB1", &[("Origin", "https://example.org.evil.net")]), 403, "origin-not-allowed");
    assert_eq!(s.get("/postcodes/AB1", &[("Referer", "https://shop.example.org/signup")]).status, 200);
    let big = format!(
        "POST /submit/AB1 HTTP/1.1\r\nHost: x\r\nOrigin: https://www.example.com\r\nContent-Length: 300\r\nConnection: close\r\n\r\n{}",
        "x".repeat(300)
    );
    assert_problem(&wire::http_raw(&s.t, PORT, big.as_bytes()).unwrap(), 413, "body-too-large");
    // A CORS preflight is answered here.
    let pre = wire::http_raw(&s.t, PORT, b"OPTIONS /postcodes/AB1 HTTP/1.1\r\nHost: x\r\nOrigin: https://www.example.com\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(pre.status, 204, "{}", pre.raw);
    assert_eq!(pre.header("access-control-allow-methods"), Some("GET"));
    let pre = wire::http_raw(&s.t, PORT, b"OPTIONS /postcodes/AB1 HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n").unwrap();
    assert_problem(&pre, 403, "origin-not-allowed");
    // Only the one allowed Referer call went upstream.
    assert_eq!(s.up.calls().len(), 1, "{:?}", s.up.calls());
    let st = s.d.status().forwarder.unwrap();
    assert_eq!(st.outcome("no-route"), 3);
    assert_eq!(st.outcome("origin-not-allowed"), 4);
    assert_eq!(st.outcome("forwarded"), 1);
}

#[test]
fn hostile_targets_cannot_reach_another_host_or_path() {
    if !privileged() {
        return;
    }
    let s = setup("", "");
    let raw = |req: &str| wire::http_raw(&s.t, PORT, req.as_bytes()).unwrap();
    // Absolute-form with a foreign host: the path is matched, the host ignored.
    let a = raw(
        "GET http://evil.example/postcodes/AB1 HTTP/1.1\r\nHost: evil.example\r\nOrigin: https://www.example.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    let a = raw(
        "GET /postcodes/AB1 HTTP/1.1\r\nHost: evil.example:8080\r\nOrigin: https://www.example.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    for bad in [
        "/postcodes/..%2Fadmin",
        "/postcodes/a%2F..%2F..%2Fadmin",
        "/postcodes/..",
        "/postcodes/%2e%2e",
        "/postcodes/AB1%0d%0aHost:%20evil",
        "/postcodes/AB1%3Fapi_key=x",
        "/postcodes/AB1%23frag",
        "/echo/..",
        "/echo/a%2Fb",
    ] {
        let a = s.page(bad);
        assert!(a.status == 400 || a.status == 404, "{bad}: {}", a.raw);
    }
    let long = format!("/postcodes/{}", "A".repeat(5000));
    assert!(s.page(&long).status >= 400);
    for c in s.up.calls() {
        assert!(c.target.starts_with("/v1/postcodes/AB1?api_key="), "upstream saw {}", c.target);
        assert_eq!(c.header("host"), Some(s.up.addr.to_string().as_str()));
    }
    assert_eq!(s.up.calls().len(), 2);
}

#[test]
fn the_key_never_comes_back_out() {
    if !privileged() {
        return;
    }
    let s = setup("", "");
    // The stand-in echoes the request line, key included, in body and header.
    let a = s.page("/echo/x?q=1");
    assert_eq!(a.status, 400, "{}", a.raw);
    assert!(s.up.calls()[0].target.contains("api_key="), "the key was not sent");
    assert!(a.raw.contains("[redacted]"), "{}", a.raw);
    let encoded = KEY.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
    for hay in [a.raw.clone(), s.d.log(), s.d.ok(&["status", "--json"]), s.d.ok(&["status"])] {
        assert!(!hay.contains(KEY) && !hay.contains(&encoded) && !hay.contains("KW9f3a"), "key leaked:\n{hay}");
    }
    let check = std::process::Command::new(keyward_tests::daemon::bin())
        .args(["check", "-c"])
        .arg(&s.d.config)
        .env("KEYWARD_TEST_KEY", KEY)
        .output()
        .unwrap();
    assert!(check.status.success());
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.contains("key_env = \"KEYWARD_TEST_KEY\"") && !out.contains("KW9f3a"), "{out}");
    // A 400 is not billable under charge_on = "2xx".
    assert_eq!(s.spent(), 0);
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    if !privileged() {
        return;
    }
    let xff = [ORIGIN, ("X-Forwarded-For", "6.6.6.6, 203.0.113.9")];
    let s = setup("", "");
    s.get("/postcodes/AB1", &xff);
    assert_eq!(s.up.calls()[0].header("idpc-source-ip"), Some("10.77.0.2"), "spoofed XFF was believed");
    drop(s);
    let s = setup("", "trusted_proxies = [\"10.77.0.2/32\"]");
    s.get("/postcodes/AB1", &xff);
    assert_eq!(s.up.calls()[0].header("idpc-source-ip"), Some("203.0.113.9"));
}

#[test]
fn per_ip_rate_limit_answers_429_with_retry_after() {
    if !privileged() {
        return;
    }
    let s = setup("per_ip_rate = 1\nper_ip_burst = 2", "");
    assert_eq!(s.page("/postcodes/AB1").status, 200);
    assert_eq!(s.page("/postcodes/AB1").status, 200);
    let a = s.page("/postcodes/AB1");
    assert_problem(&a, 429, "rate-limited");
    assert_eq!(a.json()["violated-policies"], serde_json::json!(["ip-rate"]));
    assert!(a.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|n| n >= 1)));
    assert!(a.header("ratelimit").is_some_and(|v| v.contains("\"ip-rate\";r=0")), "{}", a.raw);
    assert_eq!(s.up.calls().len(), 2);
}

#[test]
fn daily_cap_answers_429_and_escalates_into_xdp_until_the_reset() {
    if !privileged() {
        return;
    }
    let s = setup("per_ip_daily = 2\ndeny_on_daily_cap = true", "");
    assert_eq!(s.page("/postcodes/AB1").status, 200);
    assert_eq!(s.page("/postcodes/AB2").status, 200);
    let a = s.page("/postcodes/AB3");
    assert_problem(&a, 429, "daily-cap-reached");
    assert_eq!(a.json()["violated-policies"], serde_json::json!(["ip-daily"]));
    let st = s.d.status().forwarder.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let retry: i64 = a.header("retry-after").unwrap().parse().unwrap();
    let to_reset = st.reset_unix - now;
    assert!(retry >= to_reset - 2 && retry <= to_reset + 62, "Retry-After {retry}, reset in {to_reset}");
    assert_eq!(s.up.calls().len(), 2);
    // Escalated: the client is now dropped in XDP until the reset.
    let denied = wait_for(Duration::from_secs(5), || {
        let v: serde_json::Value = serde_json::from_str(&s.d.ok(&["deny", "ls", "--json"])).ok()?;
        v["entries"].as_array()?.iter().find(|e| e["cidr"] == "10.77.0.2/32").cloned()
    })
    .expect("no deny entry after the daily cap");
    let until = denied["expires_unix"].as_i64().unwrap();
    assert!((until - st.reset_unix).abs() <= 2, "deny until {until}, reset at {}", st.reset_unix);
    assert_eq!(denied["reason"], "escalated: daily cap", "{denied}");
    assert!((denied["added_unix"].as_i64().unwrap() - now).abs() <= 5, "{denied}");
    assert!(!wire::connects(&s.t, PORT, Duration::from_millis(700)), "capped client still connects");
}

#[test]
fn global_budget_is_a_hard_stop() {
    if !privileged() {
        return;
    }
    let s = setup("daily = 0.05", "");
    assert_eq!(s.page("/postcodes/AB1").status, 200);
    assert_eq!(s.page("/postcodes/AB2").status, 200);
    let a = s.page("/postcodes/AB3");
    assert_problem(&a, 503, "budget-exhausted");
    assert!(a.header("retry-after").is_some());
    let j = a.json();
    assert!(j.get("violated-policies").is_none());
    // The global budget is never advertised.
    assert!(!a.raw.contains("0.05") && !a.header("ratelimit-policy").unwrap().contains("budget"), "{}", a.raw);
    assert_eq!(s.up.calls().len(), 2);
    let st = s.d.status().forwarder.unwrap();
    assert_eq!((st.spent.as_str(), st.budget.as_str(), st.currency.as_str()), ("0.04", "0.05", "GBP"));
}

#[test]
fn unbillable_answers_and_cache_hits_are_free() {
    if !privileged() {
        return;
    }
    let s = setup("", "");
    assert_eq!(s.page("/fail/x").status, 500);
    assert_eq!(s.spent(), 0, "a 500 was charged");
    assert_eq!(s.page("/cached/AB1").status, 200);
    let hit = s.page("/cached/AB1");
    assert_eq!(hit.status, 200);
    assert_eq!(hit.json()["postcode"], "AB1");
    assert_eq!(s.up.calls().len(), 2, "the cache hit reached the upstream");
    assert_eq!(s.spent(), 20_000);
    let st = s.d.status().forwarder.unwrap();
    assert_eq!(st.outcome("cache_hit"), 1);
}

#[test]
fn upstream_timeout_and_unreachable_are_504_and_502() {
    if !privileged() {
        return;
    }
    let s = setup("", "");
    // The timed-out call reached the upstream, which may bill it: it stays charged.
    assert_problem(&s.page("/slow/x"), 504, "upstream-timeout");
    assert_eq!(s.spent(), 20_000);
    // With the upstream gone the connection is refused: nothing left, nothing charged.
    drop(s.up);
    let a = wire::get(&s.t, PORT, "/postcodes/AB1", &[ORIGIN]);
    assert_problem(&a, 502, "upstream-unavailable");
    assert_eq!(s.d.status().forwarder.unwrap().spent_micros, 20_000);
}

#[test]
fn https_upstream_with_a_private_ca() {
    if !privileged() {
        return;
    }
    let t = Topology::new();
    let up = Upstream::start_tls(&t.server_ns);
    // The CA file lives in the daemon's own directory, removed with it.
    let mut d = Daemon::prepare_with(&t, XDP_OPEN, "");
    let ca = d.dir.join("ca.pem");
    std::fs::write(&ca, up.ca_pem.as_ref().unwrap()).unwrap();
    let cfg = config(&up, "", "").replace("CA_FILE", &ca.display().to_string());
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{text}\n{cfg}")).unwrap();
    d.spawn();
    let a = wire::get(&t, PORT, "/postcodes/AB1", &[ORIGIN]);
    assert_eq!(a.status, 200, "{}\n{}", a.raw, d.log());
    assert_eq!(up.calls().len(), 1);
}

#[test]
fn counts_survive_sigterm_and_kill_9() {
    if !privileged() {
        return;
    }
    let mut s = setup("", "");
    for i in 0..3 {
        assert_eq!(s.page(&format!("/postcodes/AB{i}")).status, 200);
    }
    s.d.stop();
    s.d.spawn();
    assert_eq!(s.spent(), 60_000, "SIGTERM lost counts");
    for i in 0..2 {
        assert_eq!(s.page(&format!("/postcodes/CD{i}")).status, 200);
    }
    // Wait until the daemon says the counts are on disk, then crash it.
    wait_for(Duration::from_secs(5), || {
        let f = s.d.status().forwarder?;
        (f.saved_micros == f.spent_micros).then_some(())
    })
    .expect("counters never saved");
    s.d.kill9();
    s.d.spawn();
    assert_eq!(s.spent(), 100_000, "kill -9 lost counts");
}

#[test]
fn alert_webhook_fires_once_per_threshold() {
    if !privileged() {
        return;
    }
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let hook = format!("alert_webhook = \"http://{}/v1/hook\"\nalert_at = [0.5, 1.0]\ndaily = 0.10", up.addr);
    let d = Daemon::start_with(&t, XDP_OPEN, &config(&up, &hook, ""));
    for i in 0..7 {
        let a = wire::get(&t, PORT, &format!("/postcodes/AB{i}"), &[ORIGIN]);
        assert_eq!(a.status, if i < 5 { 200 } else { 503 }, "{}", a.raw);
    }
    let hooks = wait_for(Duration::from_secs(10), || {
        let h = up.hooks();
        (h.len() >= 2).then_some(h)
    })
    .expect("webhook did not fire twice");
    let fractions: Vec<f64> = hooks
        .iter()
        .map(|h| serde_json::from_str::<serde_json::Value>(&h.body).unwrap()["fraction"].as_f64().unwrap())
        .collect();
    assert_eq!(fractions, vec![0.5, 1.0]);
    assert!(!hooks.iter().any(|h| h.body.contains("KW9f3a")));
    assert_eq!(d.log().matches("daily budget alert").count(), 2);
}

#[test]
fn dry_run_refuses_nothing_but_counts() {
    if !privileged() {
        return;
    }
    let s = setup("dry_run = true\nper_ip_rate = 1\nper_ip_burst = 1\nper_ip_daily = 1\ndaily = 0.02", "");
    for i in 0..4 {
        let a = s.get(&format!("/postcodes/AB{i}"), &[]);
        assert_eq!(a.status, 200, "{}", a.raw);
    }
    assert_eq!(s.up.calls().len(), 4);
    assert_eq!(s.spent(), 80_000, "dry run still counts spend");
    let f = s.d.status().forwarder.unwrap();
    let would = |o: &str| f.dry_run_would_refuse.iter().filter(|r| r.outcome == o).map(|r| r.count).sum::<u64>();
    assert_eq!(would("origin-not-allowed"), 4);
    assert!(would("rate-limited") >= 1 && would("daily-cap-reached") >= 1, "{:?}", f.dry_run_would_refuse);
    assert_eq!(f.outcome("forwarded"), 4);
}

#[test]
fn allow_listed_clients_skip_per_ip_limits_but_not_the_budget() {
    if !privileged() {
        return;
    }
    let s = setup("per_ip_rate = 1\nper_ip_burst = 1\nper_ip_daily = 1\ndaily = 0.06\ndeny_on_daily_cap = true", "");
    s.d.ok(&["allow", "add", "10.77.0.0/24"]);
    for i in 0..3 {
        assert_eq!(s.page(&format!("/postcodes/AL{i}")).status, 200);
    }
    assert_problem(&s.page("/postcodes/AL9"), 503, "budget-exhausted");
    assert!(!s.d.ok(&["deny", "ls"]).contains("10.77.0.2"), "an allow-listed client was escalated");
}
