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
    // The daemon removes its own pin directory; the bpffs directory above it
    // is left for an installed keyward unless this demo created it.
    let pin_root = std::path::Path::new("/sys/fs/bpf/keyward");
    let had_pin_root = pin_root.exists();
    let code = match std::panic::catch_unwind(|| play(report_path.as_deref())) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    if !had_pin_root {
        let _ = std::fs::remove_dir(pin_root); // only if empty
    }
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

/// What the page's script does at load: fetch a token (the demo's page
/// never asks for proof-of-work: `pow` is `suspicious` and visitors are not).
fn mint(t: &Topology, src: Ipv4Addr, origin: &str) -> Option<String> {
    let req = format!(
        "GET /.keyward/token HTTP/1.1\r\nHost: api.shop.example\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n"
    );
    let a = wire::http_raw_from(t, Some(src), PORT, req.as_bytes()).ok()?;
    if a.status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&a.body).ok()?;
    if let Some(tok) = v["token"].as_str() {
        return Some(tok.to_owned());
    }
    // Asked for proof-of-work: solve it natively, as a browser's worker would.
    let c: altcha::Challenge = serde_json::from_value(v["challenge"].clone()).ok()?;
    let sol = keyward::token::pow::solve(&c, Duration::from_secs(30))?;
    let body = serde_json::json!({ "challenge": c, "solution": sol }).to_string();
    let req = format!(
        "POST /.keyward/token HTTP/1.1\r\nHost: api.shop.example\r\nOrigin: {origin}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let a = wire::http_raw_from(t, Some(src), PORT, req.as_bytes()).ok()?;
    serde_json::from_str::<serde_json::Value>(&a.body).ok()?["token"].as_str().map(str::to_owned)
}

/// A token key file for the demo, removed on drop.
struct Keys(std::path::PathBuf);

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The demo's story, chapter by chapter. Long on purpose: it is a script
/// read (and printed) top to bottom, each chapter a few lines after a `say`.
fn play(report_path: Option<&str>) {
    say("Setting up: two network namespaces joined by a veth pair");
    let t = Topology::new();
    println!(
        "   server {} ({}, {SERVER_V4}): the stand-in paid API on 127.0.0.1 and keyward",
        t.server_ns, t.server_if
    );
    println!("   client {} ({}): visitors, scripts, a copycat site, a scraper, a flood", t.client_ns, t.client_if);
    // Visitors come from networks of their own (homes, phones); the scripts
    // share the client namespace's 10.77.0.0/24.
    let visitors: Vec<Ipv4Addr> = (11..=20).map(|i| Ipv4Addr::new(10, i, 0, 2)).collect();
    let scripted = Ipv4Addr::new(10, 77, 0, 30);
    let copycat = Ipv4Addr::new(10, 77, 0, 31);
    let scraper = Ipv4Addr::new(10, 77, 0, 32);
    for ip in [&scripted, &copycat, &scraper] {
        t.add_client_address(*ip);
    }
    t.add_client_hosts(&visitors.iter().map(|v| std::net::IpAddr::V4(*v)).collect::<Vec<_>>());
    let forger = Ipv4Addr::new(10, 77, 0, 33);
    t.add_client_address(forger);
    let rotation: Vec<std::net::IpAddr> = (1..=40).map(|i| std::net::IpAddr::V4(Ipv4Addr::new(10, 66, 1, i))).collect();
    t.add_client_hosts(&rotation);
    let up = Upstream::start(&t.server_ns);
    let keys = Keys(std::env::temp_dir().join(format!("keyward-demo-{}.keys", std::process::id())));
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(&keys.0, "k1 5e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f\n")
            .expect("key file");
        std::fs::set_permissions(&keys.0, std::fs::Permissions::from_mode(0o600)).expect("key file mode");
    }
    let limits = "per_ip_rate = 2\nper_ip_burst = 4\nper_ip_daily = 6\ndaily = 1.00\ndeny_on_daily_cap = true\n\
                  alert_at = [0.8, 1.0]\nper_prefix_daily = { v4_prefix = 24, v6_prefix = 48, calls = 8 }";
    let text = fwd::config(&up, limits, "").replace(
        "require_origin = true\n",
        "require_origin = true\nrequire_token = true\npow = { mode = \"suspicious\" }\n",
    ) + &format!("\n[access.token]\nkeys_file = \"{}\"\n", keys.0.display());
    let d = Daemon::start_with(
        &t,
        "rate_pps = 200\nburst = 200\nipv6_prefix = 64\naggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 100, burst = 300 }",
        &text,
    );
    if let Some(c) = CLEANUP.get() {
        let mut g = c.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = vec![t.server_ns.clone(), t.client_ns.clone()];
        g.1 = d.pid();
    }
    say(&format!("keyward run -c {}", d.config.display()));
    println!("   guarding tcp/{PORT} in XDP (200 pps per source, 100 pps per /24) and forwarding");
    println!("   GET /postcodes/{{postcode}} to {} with the key injected from $KEYWARD_TEST_KEY", up.base_url());
    println!("   limits per visitor: 2 req/s (burst 4) and 6 billable calls a day, 8 per /24; budget 1.00 GBP a day;");
    println!(
        "   allowed page origin https://www.example.com; every call needs a page token (/.keyward/kw.js fetches it)"
    );
    println!("   {}", t.server_link().lines().find(|l| l.contains("prog/xdp")).unwrap_or("").trim());
    let page = [fwd::ORIGIN];
    let mut sent = 0u64;

    let mut billed: Vec<(&str, u64)> = Vec::new();
    let mut mark = 0u64;
    let mut account = |who: &'static str, billed: &mut Vec<(&str, u64)>| {
        let now = up.calls().len() as u64;
        billed.push((who, now - mark));
        mark = now;
    };

    say("1. Ten visitors load the sign-up page (the script fetches a token) and look up their postcode (2 calls each)");
    let mut tally = Tally::default();
    let mut tokens = Vec::new();
    for (i, v) in visitors.iter().enumerate() {
        let tok = mint(&t, *v, fwd::ORIGIN.1).unwrap_or_default();
        for j in 0..2 {
            tally.add(&call(&t, *v, &format!("/postcodes/SW{i}A{j}AA"), &[fwd::ORIGIN, ("Keyward-Token", &tok)]));
            sent += 1;
        }
        tokens.push(tok);
    }
    println!("   {}", tally.line());
    account("visitors", &mut billed);

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

    say("3b. A script forges the Origin header but never loads the page (no token)");
    let mut tally = Tally::default();
    for i in 0..10 {
        tally.add(&call(&t, forger, &format!("/postcodes/F{i}1AA"), &page));
        sent += 1;
    }
    println!("   {}", tally.line());
    account("scripts without a page", &mut billed);

    say("4. A scraper imitates the page (forged Origin, fetches a token) and hammers the endpoint");
    let scraper_token = mint(&t, scraper, fwd::ORIGIN.1).unwrap_or_default();
    let page = [fwd::ORIGIN, ("Keyward-Token", scraper_token.as_str())];
    let mut tally = Tally::default();
    for i in 0..10 {
        tally.add(&call(&t, scraper, &format!("/postcodes/B{i}1AA"), &page));
        sent += 1;
    }
    println!("   as fast as it can: {}", tally.line());
    let mut tally = Tally::default();
    std::thread::sleep(Duration::from_millis(2100)); // its bucket refills 4 tokens
    for i in 0..6 {
        tally.add(&call(&t, scraper, &format!("/postcodes/C{i}1AA"), &page));
        sent += 1;
    }
    println!("   2.1 s later:       {}", tally.line());
    let deny = d.ok(&["deny", "ls"]);
    println!("   its daily cap was escalated into the XDP deny list until the reset:");
    for l in deny.lines() {
        println!("     {l}");
    }
    account("scraper", &mut billed);

    say("4b. A script rotates through the addresses of 10.66.1.0/24, a token and 2 calls each");
    let mut tally = Tally::default();
    let mut used = 0;
    for (i, a) in rotation.iter().enumerate() {
        let std::net::IpAddr::V4(a) = *a else { continue };
        used += 1;
        let tok = mint(&t, a, fwd::ORIGIN.1).unwrap_or_default();
        let mut dark = false;
        for j in 0..2 {
            let r = call(&t, a, &format!("/postcodes/R{i}X{j}"), &[fwd::ORIGIN, ("Keyward-Token", &tok)]);
            sent += 1;
            dark |= r.starts_with("no connection");
            tally.add(&r);
        }
        if dark {
            break; // the /24 is in the kernel deny list: the rotation is over
        }
    }
    println!("   {used} addresses: {}", tally.line());
    println!("   the /24 shares one daily cap of 8 calls; then it is denied in XDP until the reset");
    account("rotation through one /24", &mut billed);

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
            let h = [fwd::ORIGIN, ("Keyward-Token", tokens[i].as_str())];
            tally.add(&call(&t, *v, &format!("/postcodes/N{i}W{j}1"), &h));
            sent += 1;
        }
    }
    println!("   {}", tally.line());
    account("visitors", &mut billed);

    say("$ keyward status");
    print!("{}", d.ok(&["status"]));
    say("$ keyward usage -n 5");
    print!("{}", d.ok(&["usage", "-n", "5"]));

    let s = d.status();
    let f = s.forwarder.clone().expect("forwarder status");
    let paid_calls = up.calls().len() as u64;
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    for r in &f.requests {
        if !matches!(
            r.outcome.as_str(),
            "forwarded" | "cache_hit" | "preflight" | "token_minted" | "challenge_issued" | "script"
        ) {
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
    println!(
        "   page tokens minted            {} ({} after a proof-of-work challenge was issued)",
        f.outcome("token_minted"),
        f.outcome("challenge_issued")
    );
    for (k, v) in &refused {
        println!("   refused: {k:<21} {v}");
    }
    for (k, v) in &kernel {
        println!("   dropped in the kernel: {k:<7} {v} packets");
    }
    println!("   spent                         {} of {} {}", f.spent, f.budget, f.currency);
    let mut by: BTreeMap<&str, u64> = BTreeMap::new();
    for (who, n) in &billed {
        *by.entry(who).or_insert(0) += n;
    }
    for (who, n) in &by {
        println!("   billed to {who:<28} {n} calls ({:.0} % of the budget)", *n as f64 * COST * 100.0 / 1.0);
    }
    println!("   without keyward               every call forwarded: {would:.2} {} today, and no ceiling", f.currency);
    println!("   (a whole day of attacks, with figures per phase: `cargo xtask test -- --test abuse --nocapture`)");

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
            "billed_by": by,
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
