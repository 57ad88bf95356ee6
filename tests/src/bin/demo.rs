//! `cargo xtask demo`: keyward in one minute, on this machine, with nothing
//! faked but the paid API. Two network namespaces joined by a veth pair; in
//! the server one, a stand-in paid API (a postcode lookup at 0.02 GBP a
//! call) and the real `keyward` daemon with XDP attached and its forwarder
//! holding the key; in the client one, visitors, a scripted caller, a
//! copycat site, a scraper and a SYN flood, all real packets. Prints as it
//! goes, ends with a report, and removes everything (also on Ctrl-C).
//!
//! `--report FILE` also writes the report as JSON (the tests read it).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use keyward_tests::{
    daemon::{Daemon, PORT},
    frame::{self, TCP},
    fwd,
    netns::{SERVER_V4, Topology},
    upstream::Upstream,
    wire,
};

/// What Ctrl-C must clean up: namespaces and the daemon's pid.
static CLEANUP: OnceLock<Mutex<(Vec<String>, Option<u32>)>> = OnceLock::new();

const COST: f64 = 0.02;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("keyward demo: needs root (it creates network namespaces and attaches XDP)");
        std::process::exit(1);
    }
    let mut report_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--report" => report_path = args.next(),
            "--quick" => {} // the demo is already short; accepted for scripts
            other => {
                eprintln!("keyward demo: unknown argument {other} (use --report FILE)");
                std::process::exit(2);
            }
        }
    }
    install_ctrl_c();
    let code = match std::panic::catch_unwind(|| play(report_path.as_deref())) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    std::process::exit(code);
}

fn say(s: &str) {
    use std::io::IsTerminal as _;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m== {s}\x1b[0m");
    } else {
        println!("\n== {s}");
    }
}

/// Tally of answers by status.
#[derive(Default)]
struct Tally(BTreeMap<String, u64>);

impl Tally {
    fn add(&mut self, what: &str) {
        *self.0.entry(what.to_owned()).or_insert(0) += 1;
    }
    fn line(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{v} × {k}")).collect::<Vec<_>>().join(", ")
    }
}

fn call(t: &Topology, src: Ipv4Addr, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: api.shop.example\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    match wire::http_raw_from(t, Some(src), PORT, req.as_bytes()) {
        Ok(a) if a.status < 400 => format!("{}", a.status),
        Ok(a) => {
            let ty = serde_json::from_str::<serde_json::Value>(&a.body)
                .ok()
                .and_then(|j| j["type"].as_str().map(|t| t.rsplit([':', '#']).next().unwrap_or(t).to_owned()))
                .unwrap_or_default();
            format!("{} {ty}", a.status)
        }
        Err(_) => "no connection (dropped in XDP)".to_owned(),
    }
}

fn play(report_path: Option<&str>) {
    say("Setting up: two network namespaces joined by a veth pair");
    let t = Topology::new();
    println!(
        "   server {} ({}, {SERVER_V4}): the stand-in paid API on 127.0.0.1 and keyward",
        t.server_ns, t.server_if
    );
    println!("   client {} ({}): visitors, scripts, a copycat site, a scraper, a flood", t.client_ns, t.client_if);
    let visitors: Vec<Ipv4Addr> = (11..=20).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect();
    let scripted = Ipv4Addr::new(10, 77, 0, 30);
    let copycat = Ipv4Addr::new(10, 77, 0, 31);
    let scraper = Ipv4Addr::new(10, 77, 0, 32);
    for ip in visitors.iter().chain([&scripted, &copycat, &scraper]) {
        t.add_client_address(*ip);
    }
    let up = Upstream::start(&t.server_ns);
    let limits = "per_ip_rate = 2\nper_ip_burst = 4\nper_ip_daily = 6\ndaily = 1.00\ndeny_on_daily_cap = true\nalert_at = [0.8, 1.0]";
    let d = Daemon::start_with(
        &t,
        "rate_pps = 200\nburst = 200\nipv6_prefix = 64\naggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 100, burst = 120 }",
        &fwd::config(&up, limits, ""),
    );
    if let Some(c) = CLEANUP.get() {
        let mut g = c.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = vec![t.server_ns.clone(), t.client_ns.clone()];
        g.1 = d.pid();
    }
    say(&format!("keyward run -c {}", d.config.display()));
    println!("   guarding tcp/{PORT} in XDP (200 pps per source, 100 pps per /24) and forwarding");
    println!("   GET /postcodes/{{postcode}} to {} with the key injected from $KEYWARD_TEST_KEY", up.base_url());
    println!("   limits per visitor: 2 req/s (burst 4) and 6 billable calls a day; budget 1.00 GBP a day;");
    println!("   allowed page origin https://www.example.com");
    println!("   {}", t.server_link().lines().find(|l| l.contains("prog/xdp")).unwrap_or("").trim());
    let page = [fwd::ORIGIN];
    let mut sent = 0u64;

    say("1. Ten visitors of the sign-up page look up their postcode (2 calls each)");
    let mut tally = Tally::default();
    for (i, v) in visitors.iter().enumerate() {
        for j in 0..2 {
            tally.add(&call(&t, *v, &format!("/postcodes/SW{i}A{j}AA"), &page));
            sent += 1;
        }
    }
    println!("   {}", tally.line());

    say("2. A script calls the endpoint directly, without an Origin (curl, Postman)");
    let mut tally = Tally::default();
    for i in 0..15 {
        tally.add(&call(&t, scripted, &format!("/postcodes/EC{i}A1BB"), &[]));
        sent += 1;
    }
    println!("   {}", tally.line());

    say("3. A copycat site embeds the endpoint in its own page");
    let mut tally = Tally::default();
    for i in 0..15 {
        tally.add(&call(&t, copycat, &format!("/postcodes/M{i}1AA"), &[("Origin", "https://copycat.example")]));
        sent += 1;
    }
    println!("   {}", tally.line());

    say("4. A scraper forges the Origin header and hammers the endpoint");
    let mut tally = Tally::default();
    for i in 0..10 {
        tally.add(&call(&t, scraper, &format!("/postcodes/B{i}1AA"), &page));
        sent += 1;
    }
    println!("   as fast as it can: {}", tally.line());
    let mut tally = Tally::default();
    std::thread::sleep(Duration::from_millis(1600)); // its bucket refills 3 tokens
    for i in 0..5 {
        tally.add(&call(&t, scraper, &format!("/postcodes/C{i}1AA"), &page));
        sent += 1;
    }
    println!("   1.6 s later:       {}", tally.line());
    let deny = d.ok(&["deny", "ls"]);
    println!("   its daily cap was escalated into the XDP deny list until the reset:");
    for l in deny.lines() {
        println!("     {l}");
    }

    say("5. A SYN flood rotates through all 254 addresses of 10.88.7.0/24 (4 SYNs each)");
    let frames: Vec<Vec<u8>> = (0..4)
        .flat_map(|_| (1..=254u8).map(|i| frame::tcp4(t.macs(), Ipv4Addr::new(10, 88, 7, i), SERVER_V4, 4000, PORT)))
        .collect();
    let (seen, _) = wire::deliver(&t, frames);
    let flood_in = seen.iter().filter(|s| s.proto == TCP).count() as u64;
    println!("   {flood_in} of 1016 SYNs reached the host; the rest died in XDP before any socket existed");

    say("6. More visitors arrive while the budget runs out");
    let mut tally = Tally::default();
    for (i, v) in visitors.iter().enumerate() {
        for j in 2..5 {
            tally.add(&call(&t, *v, &format!("/postcodes/N{i}W{j}1"), &page));
            sent += 1;
        }
    }
    println!("   {}", tally.line());

    say("$ keyward status");
    print!("{}", d.ok(&["status"]));
    say("$ keyward usage -n 5");
    print!("{}", d.ok(&["usage", "-n", "5"]));

    let s = d.status();
    let f = s.forwarder.clone().expect("forwarder status");
    let paid_calls = up.calls().len() as u64;
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    for r in &f.requests {
        if !matches!(r.outcome.as_str(), "forwarded" | "cache_hit" | "preflight") {
            *refused.entry(r.outcome.clone()).or_insert(0) += r.count;
        }
    }
    let kernel: BTreeMap<String, u64> = s
        .counters
        .iter()
        .filter(|c| c.action == "drop" && c.packets > 0)
        .map(|c| (c.reason.clone(), c.packets))
        .collect();
    let would = sent as f64 * COST;

    say("Report");
    println!("   HTTP requests sent            {sent}");
    println!("   forwarded to the paid API     {} (the stand-in received {paid_calls})", f.outcome("forwarded"));
    for (k, v) in &refused {
        println!("   refused: {k:<21} {v}");
    }
    for (k, v) in &kernel {
        println!("   dropped in the kernel: {k:<7} {v} packets");
    }
    println!("   spent                         {} of {} {}", f.spent, f.budget, f.currency);
    println!("   without keyward               every call forwarded: {would:.2} {} today, and no ceiling", f.currency);

    if let Some(p) = report_path {
        let doc = serde_json::json!({
            "sent": sent,
            "forwarded": f.outcome("forwarded"),
            "upstream_calls": paid_calls,
            "refused": refused,
            "kernel_drops": kernel,
            "flood_reached_host": flood_in,
            "spent_micros": f.spent_micros,
            "budget_micros": f.budget_micros,
            "would_have_spent_micros": (sent as f64 * COST * 1e6).round() as u64,
            "deny_entries": s.deny_entries,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default()).expect("writing the report");
    }

    say("Stopping keyward (SIGTERM): XDP detached, pins removed, namespaces deleted");
    let mut d = d;
    let st = d.stop();
    let attached = t.server_link().contains("prog/xdp");
    println!("   daemon exit: {st}; XDP still attached: {}", if attached { "yes (bug!)" } else { "no" });
    drop(up);
    drop(t);
}

/// On Ctrl-C: stop the daemon we started and delete our namespaces, then exit.
fn install_ctrl_c() {
    use nix::sys::signal::{SigSet, Signal};
    let _ = CLEANUP.set(Mutex::new((Vec::new(), None)));
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // Block in this thread (inherited by every thread spawned later) and
    // wait for the signal in a dedicated one.
    let _ = set.thread_block();
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            eprintln!("\ninterrupted: cleaning up");
            if let Some(c) = CLEANUP.get() {
                let g = c.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(pid) = g.1 {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
                    std::thread::sleep(Duration::from_millis(500));
                }
                for ns in &g.0 {
                    let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
                }
            }
            std::process::exit(130);
        }
    });
}
