//! Several keyward hosts sharing one Redis: three real daemons (XDP
//! attached) in three namespace pairs, each with its own stand-in paid API,
//! and one real `redis-server` on a Unix socket they all reach. The budget is
//! spent exactly once across the hosts, one client meets one daily cap
//! whichever host it reaches, and a paused Redis costs bounded latency and
//! never more than what was leased.

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

/// Three hosts on `redis` with `[limits]` overrides and more sections.
fn hosts(redis: &RedisServer, limits: &str, extra: &str) -> Vec<Host> {
    (0..3)
        .map(|_| {
            let t = Topology::new();
            let up = Upstream::start(&t.server_ns);
            let mut d = Daemon::prepare_with(&t, XDP_OPEN, &format!("{}\n{extra}", config(&up, limits, "")));
            let store = format!("[store]\nredis_url = \"{}\"\nsite = \"test\"\n", redis.url());
            let text = std::fs::read_to_string(&d.config).expect("config").replacen("[store]\n", &store, 1);
            std::fs::write(&d.config, text).expect("config");
            d.spawn();
            Host { t, up, d }
        })
        .collect()
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
    redis.pause(false);
    let back = wait_for(Duration::from_secs(5), || (h.get("/postcodes/AD1").status == 200).then_some(()));
    assert!(back.is_some(), "leasing resumes after SIGCONT");
}
