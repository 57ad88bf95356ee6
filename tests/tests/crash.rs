//! A crash never overspends: the real daemon killed with SIGKILL right after
//! its last answer, and at random points of a burst of concurrent calls,
//! then restarted on the same store. The stand-in paid API (which lives on
//! across the restarts) is the judge of what was billed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use keyward::admin::Usage;
use keyward_tests::{
    bench::Rng,
    daemon::{Daemon, PORT},
    fwd::{ORIGIN, XDP_OPEN, config},
    netns::Topology,
    privileged,
    upstream::Upstream,
    wire,
};

/// Every test route costs 0.02.
const COST: u64 = 20_000;

fn spent(d: &Daemon) -> u64 {
    d.status().forwarder.expect("forwarder status").spent_micros
}

/// Today's billable calls from the test client, as `usage` counts them.
fn client_calls(d: &Daemon) -> u32 {
    let u: Usage = serde_json::from_str(&d.ok(&["usage", "--json"])).expect("usage json");
    u.top_clients.iter().filter(|c| c.client == "10.77.0.2").map(|c| c.calls).sum()
}

#[test]
fn a_kill_9_right_after_the_last_answer_forgets_no_spend() {
    if !privileged() {
        return;
    }
    const N: u64 = 4;
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let mut d = Daemon::start_with(&t, XDP_OPEN, &config(&up, "daily = 0.08", ""));
    let page = |p: &str| wire::get(&t, PORT, p, &[ORIGIN]);
    assert_eq!(page("/postcodes/AA0").status, 200);
    d.stop();
    d.spawn();
    let run = d.status().run;
    assert!(!run.previous_run_crashed, "{run:?}");
    assert_eq!(run.durability, "immediate");
    let clean = run.last_clean_shutdown_unix.expect("a clean shutdown noted");
    assert!(d.ok(&["status"]).contains("last clean shutdown 20"), "{}", d.ok(&["status"]));

    for i in 1..N {
        let a = page(&format!("/postcodes/AB{i}"));
        assert_eq!(a.status, 200, "{}", a.raw);
    }
    // No waiting for a flush: the crash follows the last answer at once.
    let answered = Instant::now();
    d.kill9();
    eprintln!("killed {:?} after the last answer", answered.elapsed());
    d.spawn();

    assert_eq!(spent(&d), N * COST, "the day's spend, to the micro-unit");
    assert_eq!(client_calls(&d), N as u32, "the per-IP count");
    let run = d.status().run;
    assert!(run.previous_run_crashed, "{run:?}");
    assert_eq!(run.last_clean_shutdown_unix, Some(clean), "the last clean shutdown is the earlier one");
    assert!(d.log().contains("reservations recovered without a settled answer (counted as spent)"), "{}", d.log());
    assert!(d.ok(&["status"]).contains("the previous run did not stop cleanly"));
    let a = page("/postcodes/AC0");
    assert_eq!(a.status, 503, "over the budget after the restart: {}", a.raw);
    assert!(a.body.contains("budget-exhausted"), "{}", a.raw);
    assert_eq!(up.calls().len() as u64, N, "the API billed exactly what was spent");
}

/// A burst of concurrent calls from `threads` threads until told to stop,
/// the daemon answers anything but 200, or the connection fails.
fn burst(t: &Topology, threads: usize, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|i| {
            let (ns, stop) = (t.client_ns.clone(), stop.clone());
            std::thread::spawn(move || {
                for n in 0..200 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let req = format!(
                        "GET /postcodes/T{i}X{n} HTTP/1.1\r\nHost: k\r\nOrigin: {}\r\nConnection: close\r\n\r\n",
                        ORIGIN.1
                    );
                    match wire::http_raw_in(&ns, None, PORT, req.as_bytes()) {
                        Ok(a) if a.status == 200 => {}
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

#[test]
fn kill_9_at_random_points_of_a_burst_never_bills_past_the_budget() {
    if !privileged() {
        return;
    }
    const BUDGET_CALLS: u64 = 100;
    let seed = u64::from(std::process::id()) ^ 0x5eed_cafe;
    eprintln!("seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let mut d = Daemon::start_with(&t, XDP_OPEN, &config(&up, "daily = 2.00", ""));
    for round in 1..=5 {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = burst(&t, 8, &stop);
        std::thread::sleep(Duration::from_millis(10 + rng.next_u64() % 150));
        d.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().expect("burst thread");
        }
        let billed = up.calls().len() as u64;
        d.spawn();
        let now = spent(&d);
        eprintln!("round {round}: the API billed {billed} calls; keyward counts {now} µ-units spent");
        assert!(billed <= BUDGET_CALLS, "round {round}: {billed} calls billed over a budget of {BUDGET_CALLS}");
        assert!(now >= billed * COST, "round {round}: spend {now} below what was forwarded ({billed} calls)");
        assert!(d.status().run.previous_run_crashed);
    }
    // Whatever is left of the budget, and not a call more.
    for i in 0..=BUDGET_CALLS {
        if wire::get(&t, PORT, &format!("/postcodes/Z{i}"), &[ORIGIN]).status != 200 {
            break;
        }
    }
    let billed = up.calls().len() as u64;
    assert!(billed <= BUDGET_CALLS, "{billed} calls billed over a budget of {BUDGET_CALLS}");
    assert!(spent(&d) >= billed * COST);
    assert_eq!(wire::get(&t, PORT, "/postcodes/ZZ", &[ORIGIN]).status, 503, "the budget is spent");
}
