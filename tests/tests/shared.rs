//! Several keyward hosts sharing one Redis: three real daemons (XDP
//! attached) in three namespace pairs, each with its own stand-in paid API,
//! and one real `redis-server` on a Unix socket they all reach. The budget is
//! spent exactly once across the hosts, one client meets one daily cap
//! whichever host it reaches, and a paused Redis costs bounded latency and
//! never more than what was leased. The lists are shared too: an
//! escalation on one host drops the client in XDP on the others within a
//! second, a host started later picks the entry up, and after Redis is
//! killed and restarted the hosts rebuild its lists from what they hold.
//! Page tokens and challenge solutions are spent once across the hosts, and
//! `/readyz` says when the shared store does not answer.

use std::time::{Duration, Instant};

use keyward_tests::{
    daemon::{Daemon, PORT},
    fwd::{ORIGIN, XDP_OPEN, config},
    netns::Topology,
    privileged,
    redis::RedisServer,
    upstream::Upstream,
    wait_for,
    wire::{self, HttpAnswer},
};

struct Host {
    t: Topology,
    up: Upstream,
    d: Daemon,
}

impl Host {
    fn get(&self, path: &str) -> HttpAnswer {
        wire::get(&self.t, PORT, path, &[ORIGIN])
    }
}

/// One host on `redis` with `[limits]` overrides and more sections.
fn host(redis: &RedisServer, limits: &str, extra: &str) -> Host {
    host_with(redis, |up| format!("{}\n{extra}", config(up, limits, "")))
}

/// One host on `redis` with the config `text` makes for its stand-in API.
fn host_with(redis: &RedisServer, text: impl Fn(&Upstream) -> String) -> Host {
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let mut d = Daemon::prepare_with(&t, XDP_OPEN, &text(&up));
    // A call timeout above the default's 50 ms: a machine busy with other
    // builds must not turn a slow answer into the outage policy mid-test.
    let store = format!("[store]\nredis_url = \"{}\"\nsite = \"test\"\ntimeout = \"200ms\"\n", redis.url());
    let text = std::fs::read_to_string(&d.config).expect("config").replacen("[store]\n", &store, 1);
    std::fs::write(&d.config, text).expect("config");
    d.spawn();
    Host { t, up, d }
}

/// Three hosts on `redis` with `[limits]` overrides and more sections.
fn hosts(redis: &RedisServer, limits: &str, extra: &str) -> Vec<Host> {
    (0..3).map(|_| host(redis, limits, extra)).collect()
}

/// `h`'s deny entry for `cidr`, if it holds one.
fn deny_entry(h: &Host, cidr: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&h.d.ok(&["deny", "ls", "--json"])).ok()?;
    v["entries"].as_array()?.iter().find(|e| e["cidr"] == cidr).cloned()
}

/// Packets `h`'s XDP program dropped for a deny entry.
fn denied_packets(h: &Host) -> u64 {
    h.d.status().counters.iter().filter(|c| c.action == "drop" && c.reason == "denied").map(|c| c.packets).sum()
}

/// The client (10.77.0.2 in every topology) cannot connect to `h`, and
/// `h`'s XDP program counted the drops.
fn dropped_in_xdp(h: &Host) -> bool {
    let before = denied_packets(h);
    !wire::connects(&h.t, PORT, Duration::from_millis(500)) && denied_packets(h) > before
}

#[test]
fn three_hosts_racing_spend_one_budget_exactly() {
    if !privileged() {
        return;
    }
    let redis = RedisServer::start();
    // 0.20 at 0.02 a call: ten calls in all, whichever hosts make them.
    let hs = hosts(&redis, "daily = 0.20", "");
    let answered: Vec<(usize, usize)> = std::thread::scope(|s| {
        let tasks: Vec<_> = hs
            .iter()
            .map(|h| {
                s.spawn(move || {
                    let (mut ok, mut other) = (0, 0);
                    for i in 0..40 {
                        let a = h.get(&format!("/postcodes/AB{i}"));
                        match a.status {
                            200 => ok += 1,
                            503 => {
                                assert!(a.raw.contains("budget-exhausted"), "{}", a.raw);
                                break;
                            }
                            _ => other += 1,
                        }
                    }
                    (ok, other)
                })
            })
            .collect();
        tasks.into_iter().map(|t| t.join().expect("client thread")).collect()
    });
    let ok: usize = answered.iter().map(|a| a.0).sum();
    let seen: usize = hs.iter().map(|h| h.up.calls().len()).sum();
    assert_eq!(answered.iter().map(|a| a.1).sum::<usize>(), 0, "{answered:?}");
    assert_eq!((ok, seen), (10, 10), "{answered:?}");
    let spent: u64 = hs.iter().map(|h| h.d.status().forwarder.expect("forwarder").spent_micros).sum();
    assert_eq!(spent, 200_000);
    let trips: u64 = hs.iter().map(|h| h.d.status().forwarder.and_then(|f| f.store).map_or(0, |s| s.round_trips)).sum();
    eprintln!("store round trips for {ok} billable calls and {} refusals: {trips}", hs.len());
    let st = hs[0].d.status().forwarder.expect("forwarder").store.expect("store status");
    assert!(st.up && st.round_trips > 0, "{st:?}");
}

#[test]
fn one_client_alternating_between_hosts_gets_exactly_its_cap() {
    if !privileged() {
        return;
    }
    let redis = RedisServer::start();
    let hs = hosts(&redis, "per_ip_daily = 4", "");
    // The client has the same address (10.77.0.2) in every topology.
    let statuses: Vec<u16> = (0..12).map(|i| hs[i % 3].get(&format!("/postcodes/AB{i}")).status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 4, "{statuses:?}");
    assert!(statuses[4..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(hs.iter().map(|h| h.up.calls().len()).sum::<usize>(), 4);
}

#[test]
fn a_paused_redis_bounds_latency_and_spend_to_the_lease() {
    if !privileged() {
        return;
    }
    let redis = RedisServer::start();
    let budget = "[store.budget]\nmax_lease = 0.04\nstandby_lease = 0.10\nlease_period = \"200ms\"\n";
    let hs = hosts(&redis, "daily = 10.00", budget);
    let h = &hs[0];
    assert_eq!(h.get("/postcodes/AB1").status, 200);
    // The standby lease is topped up in the background while Redis answers.
    let f = wait_for(Duration::from_secs(5), || {
        let f = h.d.status().forwarder.expect("forwarder");
        let st = f.store.clone().expect("store");
        (st.leased_micros >= f.spent_micros + 100_000).then_some(f)
    })
    .expect("standby lease taken");
    let leased = f.store.expect("store").leased_micros;
    redis.pause(true);
    let mut slowest = Duration::ZERO;
    let mut outcomes = Vec::new();
    for i in 0..15 {
        let t0 = Instant::now();
        let a = h.get(&format!("/postcodes/AC{i}"));
        slowest = slowest.max(t0.elapsed());
        outcomes.push(if a.status == 503 {
            a.json()["type"].as_str().unwrap_or_default().to_owned()
        } else {
            a.status.to_string()
        });
    }
    let f = h.d.status().forwarder.expect("forwarder");
    assert!(f.spent_micros <= leased, "spent {} > leased {leased}", f.spent_micros);
    assert!(outcomes.iter().any(|o| o.ends_with("budget-unavailable")), "{outcomes:?}");
    assert!(!f.store.expect("store").up);
    eprintln!("slowest call with Redis paused: {slowest:?}; outcomes {outcomes:?}");
    // Bounded by the store's timeout and breaker, far below any client's patience.
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    // Not ready while the store does not answer (the list stream's reads notice within a second or so).
    let unready = wait_for(Duration::from_secs(5), || {
        let (code, body) = readyz(h);
        (code == 503 && body.contains("the shared store does not answer")).then_some(())
    });
    assert!(unready.is_some(), "/readyz: {:?}", readyz(h));
    redis.pause(false);
    let back = wait_for(Duration::from_secs(5), || (h.get("/postcodes/AD1").status == 200).then_some(()));
    assert!(back.is_some(), "leasing resumes after SIGCONT");
    let ready = wait_for(Duration::from_secs(5), || (readyz(h) == (200, "ready\n".into())).then_some(()));
    assert!(ready.is_some(), "/readyz after SIGCONT: {:?}", readyz(h));
}

/// `GET /readyz` on `h`'s metrics listener (in its server namespace).
fn readyz(h: &Host) -> (u16, String) {
    probe(h, "/readyz")
}

/// `GET path` on `h`'s metrics listener (in its server namespace).
fn probe(h: &Host, path: &'static str) -> (u16, String) {
    keyward_tests::netns::in_ns(&h.t.server_ns, move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9901").expect("metrics listener");
        write!(s, "GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
    })
}

#[test]
fn an_escalation_on_one_host_drops_the_client_in_xdp_on_every_host() {
    if !privileged() {
        return;
    }
    let redis = RedisServer::start();
    let hs = hosts(&redis, "per_ip_daily = 2\ndeny_on_daily_cap = true", "");
    assert_eq!(hs[0].get("/postcodes/AB1").status, 200);
    assert_eq!(hs[0].get("/postcodes/AB2").status, 200);
    assert_eq!(hs[0].get("/postcodes/AB3").status, 429);
    // Escalated on host A (its once-a-second tick) ...
    let on_a = wait_for(Duration::from_secs(5), || deny_entry(&hs[0], "10.77.0.2/32")).expect("escalated on A");
    let t0 = Instant::now();
    // ... and held by B and C within a second.
    let on_bc = wait_for(Duration::from_secs(5), || {
        Some((deny_entry(&hs[1], "10.77.0.2/32")?, deny_entry(&hs[2], "10.77.0.2/32")?))
    })
    .expect("the escalation reached B and C");
    let took = t0.elapsed();
    eprintln!("escalation on A held by B and C after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    for e in [&on_bc.0, &on_bc.1] {
        let reason = e["reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with("shared: ") && reason.ends_with(": escalated: daily cap"), "{e}");
        assert_eq!(e["expires_unix"], on_a["expires_unix"], "{e}");
    }
    assert!(dropped_in_xdp(&hs[1]) && dropped_in_xdp(&hs[2]), "the client still reaches B or C");
    // A host started after the escalation picks it up from the shared state.
    let late = host(&redis, "per_ip_daily = 2\ndeny_on_daily_cap = true", "");
    let e = wait_for(Duration::from_secs(5), || deny_entry(&late, "10.77.0.2/32")).expect("the late host holds it");
    assert_eq!(e["expires_unix"], on_a["expires_unix"], "{e}");
    assert!(dropped_in_xdp(&late), "the client reaches the late host");
    // A removal on B is a removal everywhere.
    hs[1].d.ok(&["deny", "rm", "10.77.0.2/32"]);
    let gone = wait_for(Duration::from_secs(5), || {
        [&hs[0], &hs[2], &late].iter().all(|h| deny_entry(h, "10.77.0.2/32").is_none()).then_some(())
    });
    assert!(gone.is_some(), "the removal on B did not reach every host");
}

#[test]
fn after_redis_is_killed_and_restarted_the_hosts_rebuild_the_lists() {
    if !privileged() {
        return;
    }
    let mut redis = RedisServer::start();
    let hs: Vec<Host> = (0..2).map(|_| host(&redis, "", "")).collect();
    hs[0].d.ok(&["deny", "add", "10.88.0.0/24"]);
    let held = |h: &Host, c: &str| wait_for(Duration::from_secs(5), || deny_entry(h, c));
    assert!(held(&hs[1], "10.88.0.0/24").is_some(), "B holds A's entry");
    redis.kill_and_restart();
    // Written on A while the store is down or coming back: queued, then published.
    hs[0].d.ok(&["deny", "add", "10.89.0.0/24"]);
    let said = wait_for(Duration::from_secs(10), || hs[1].d.log().contains("the shared store restarted").then_some(()));
    assert!(said.is_some(), "B does not say the store restarted:\n{}", hs[1].d.log());
    assert!(held(&hs[1], "10.89.0.0/24").is_some(), "A's entry written during the outage did not reach B");
    // The store's lists are rebuilt from what the hosts hold: a new host gets both.
    let late = host(&redis, "", "");
    assert!(
        held(&late, "10.88.0.0/24").is_some() && held(&late, "10.89.0.0/24").is_some(),
        "{}",
        late.d.ok(&["deny", "ls"])
    );
    assert!(hs.iter().any(|h| h.d.log().contains("published again")), "no host says what it re-published");
}

#[test]
fn after_redis_is_killed_and_restarted_the_budget_is_not_spent_twice() {
    if !privileged() {
        return;
    }
    let mut redis = RedisServer::start();
    // 0.20 at 0.02 a call: ten calls; leases of two calls at most.
    let hs = hosts(&redis, "daily = 0.20", "[store.budget]\nmax_lease = 0.04\n");
    let mut ok = 0;
    for (i, h) in hs.iter().enumerate() {
        for j in 0..2 {
            assert_eq!(h.get(&format!("/postcodes/AB{i}{j}")).status, 200);
            ok += 1;
        }
    }
    // Persistence off: the store loses every grant. Each host reports its lease again.
    redis.kill_and_restart();
    let reported = wait_for(Duration::from_secs(10), || {
        hs.iter().all(|h| h.d.log().contains("lease of today is reported again")).then_some(())
    });
    assert!(reported.is_some(), "{}", hs[0].d.log());
    // Spend what is left from every host: 503 budget-unavailable while the
    // hosts report (retried), then exactly the rest of the budget.
    for (i, h) in hs.iter().enumerate() {
        let mut n = 0;
        let done = wait_for(Duration::from_secs(10), || {
            n += 1;
            let a = h.get(&format!("/postcodes/AC{i}{n}"));
            match a.status {
                200 => {
                    ok += 1;
                    None
                }
                503 if a.raw.contains("budget-exhausted") => Some(()),
                503 if a.raw.contains("budget-unavailable") => None,
                _ => panic!("{}", a.raw),
            }
        });
        assert!(done.is_some(), "host {i} never reached the end of the budget");
    }
    let seen: usize = hs.iter().map(|h| h.up.calls().len()).sum();
    assert_eq!((ok, seen), (10, 10), "the budget was spent again after the store restarted");
    assert!(hs[0].d.log().contains("counts added back"), "the hosts say what they rebuilt");
    let metrics = probe(&hs[0], "/metrics").1;
    assert!(metrics.contains("keyward_store_restarts_total 1"), "{metrics}");
    assert!(metrics.contains("keyward_store_live_hosts 3"), "{metrics}");
}

#[test]
fn after_redis_is_killed_and_restarted_a_client_still_gets_only_its_cap() {
    if !privileged() {
        return;
    }
    let mut redis = RedisServer::start();
    let hs: Vec<Host> = (0..2).map(|_| host(&redis, "per_ip_daily = 4", "")).collect();
    assert_eq!(hs[0].get("/postcodes/AB1").status, 200);
    assert_eq!(hs[0].get("/postcodes/AB2").status, 200);
    assert_eq!(hs[1].get("/postcodes/AB3").status, 200);
    redis.kill_and_restart();
    let reported =
        wait_for(Duration::from_secs(10), || hs.iter().all(|h| h.d.log().contains("counts added back")).then_some(()));
    assert!(reported.is_some(), "{}", hs[1].d.log());
    // The hosts added back their own counts (2 + 1): one call is left, whichever host.
    let mut statuses = Vec::new();
    let settled = wait_for(Duration::from_secs(10), || {
        let a = hs[statuses.len() % 2].get(&format!("/postcodes/AD{}", statuses.len()));
        if a.status == 503 && a.raw.contains("budget-unavailable") {
            return None;
        }
        statuses.push(a.status);
        (statuses.len() == 4).then_some(())
    });
    assert!(settled.is_some(), "{statuses:?}");
    assert_eq!(statuses, [200, 429, 429, 429], "the store forgot the counts");
    assert_eq!(hs.iter().map(|h| h.up.calls().len()).sum::<usize>(), 4);
}

#[test]
fn an_idle_host_hands_its_lease_back() {
    if !privileged() {
        return;
    }
    let redis = RedisServer::start();
    let budget = "[store.budget]\nmax_lease = 0.10\nlease_period = \"200ms\"\nidle_return = \"1s\"\n";
    let h = host(&redis, "daily = 1.00", budget);
    assert_eq!(h.get("/postcodes/AB1").status, 200);
    let st = h.d.status().forwarder.expect("forwarder").store.expect("store");
    assert_eq!(st.leased_micros, 100_000, "{st:?}");
    // Nothing spent for a second: the unspent 0.08 goes back to the fleet.
    let back = wait_for(Duration::from_secs(5), || {
        let f = h.d.status().forwarder.expect("forwarder");
        (f.store.expect("store").leased_micros == f.spent_micros).then_some(())
    });
    assert!(back.is_some(), "{:?}", h.d.status().forwarder.and_then(|f| f.store));
    assert!(h.d.log().contains("idle: unspent budget lease handed back"), "{}", h.d.log());
    // Spending again leases again.
    assert_eq!(h.get("/postcodes/AB2").status, 200);
}

#[test]
fn while_redis_is_paused_each_host_admits_a_client_its_share_of_the_cap() {
    if !privileged() {
        return;
    }
    let redis = RedisServer::start();
    let budget = "[store.budget]\nmax_lease = 0.04\nstandby_lease = 0.20\nlease_period = \"200ms\"\n";
    let hs = hosts(&redis, "daily = 10.00\nper_ip_daily = 6", budget);
    // Every host counts three live hosts and holds its standby lease.
    let ready = wait_for(Duration::from_secs(10), || {
        hs.iter()
            .all(|h| {
                let f = h.d.status().forwarder.expect("forwarder");
                let st = f.store.expect("store");
                st.live_hosts == 3 && st.leased_micros >= f.spent_micros + 200_000
            })
            .then_some(())
    });
    assert!(ready.is_some(), "{:?}", hs[0].d.status().forwarder.and_then(|f| f.store));
    redis.pause(true);
    // ceil(6 / 3) = 2 calls on each host, by its own counts.
    let statuses: Vec<u16> = (0..3).map(|i| hs[0].get(&format!("/postcodes/AE{i}")).status).collect();
    redis.pause(false);
    assert_eq!(statuses, [200, 200, 429], "{statuses:?}");
    assert_eq!(hs[0].up.calls().len(), 2);
    assert!(deny_entry(&hs[0], "10.77.0.2/32").is_none(), "a share refusal is not escalated");
}

/// A token key file (the same on every host), removed on drop.
struct KeyFile(std::path::PathBuf);

impl KeyFile {
    fn new() -> KeyFile {
        use std::os::unix::fs::PermissionsExt as _;
        let p = std::env::temp_dir().join(format!("kwt{}-shared-token.keys", std::process::id()));
        std::fs::write(&p, "k1 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").expect("keys");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("keys mode");
        KeyFile(p)
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_page_token_and_a_solution_are_spent_once_across_hosts() {
    if !privileged() {
        return;
    }
    let redis = RedisServer::start();
    let keys = KeyFile::new();
    let hs: Vec<Host> = (0..3)
        .map(|_| {
            host_with(&redis, |up| {
                config(up, "", "").replace("require_origin = true\n", "require_origin = true\nrequire_token = true\n")
                    + &format!("\n[access.token]\nkeys_file = \"{}\"\nmax_calls = 3\n", keys.0.display())
            })
        })
        .collect();
    let token_call =
        |h: &Host, token: &str| wire::get(&h.t, PORT, "/postcodes/SW1A1AA", &[ORIGIN, ("Keyward-Token", token)]);
    let minted = hs[0].get("/.keyward/token").json();
    let token = minted["token"].as_str().expect("a token").to_owned();
    // Three calls, one on each host, then the token is used up everywhere.
    let statuses: Vec<u16> = hs.iter().map(|h| token_call(h, &token).status).collect();
    assert_eq!(statuses, [200, 200, 200]);
    for h in &hs {
        let a = token_call(h, &token);
        assert_eq!(a.status, 403, "{}", a.raw);
        assert!(a.raw.contains("token-exhausted"), "{}", a.raw);
    }
    assert_eq!(hs.iter().map(|h| h.up.calls().len()).sum::<usize>(), 3, "the API saw exactly one allowance");
    // A challenge solved once mints once, whichever hosts it is taken to.
    let c = wire::get(&hs[1].t, PORT, "/.keyward/challenge", &[ORIGIN]).json();
    let challenge: altcha::Challenge = serde_json::from_value(c.clone()).expect("a challenge");
    let solution = keyward::token::pow::solve(&challenge, Duration::from_secs(60)).expect("solvable");
    let body = serde_json::json!({ "challenge": c, "solution": solution }).to_string();
    let post = |h: &Host| {
        let req = format!(
            "POST /.keyward/token HTTP/1.1\r\nHost: keyward.test\r\nConnection: close\r\nOrigin: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            ORIGIN.1,
            body.len()
        );
        wire::http_raw(&h.t, PORT, req.as_bytes()).expect("POST /.keyward/token")
    };
    let first = post(&hs[1]);
    assert_eq!(first.status, 200, "{}", first.raw);
    for h in [&hs[0], &hs[2]] {
        let again = post(h);
        assert_eq!(again.status, 403, "{}", again.raw);
        assert!(again.raw.contains("challenge-spent"), "{}", again.raw);
    }
}
