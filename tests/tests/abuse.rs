//! The abuse scenario suite: one "day" of keyward (the real daemon, XDP
//! attached, in a server namespace) in front of a stand-in paid API that
//! counts what it bills. Real visitors (the right Origin, IPv4 and IPv6,
//! each from its own network, loading the page: a token, then calls) arrive
//! between attack phases. The promises are asserted; the attacker's share
//! of the budget, the visitors' success and the attacker's cost per billed
//! call are printed as figures (and written to `target/abuse-report.txt`).
//!
//! Configuration under test (what an operator would choose for a public
//! address-lookup page): tokens required (20 calls each, proof-of-work for
//! suspicious sources, at a tenth of the default difficulty so that the
//! suite stays fast: the solver CPU it reports scales with it), per-IP 2/s burst 5 and 10 billable calls a day,
//! 20 a day per /24 and per /48, 100.00 a day paced with a 20 % burst,
//! daily caps escalated into XDP.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use keyward_tests::{
    daemon::{Daemon, PORT},
    fwd::{XDP_OPEN, config},
    netns::{self, SERVER_V4, SERVER_V6, Topology},
    privileged,
    upstream::Upstream,
};

const SITE: &str = "https://www.example.com";
const COST: u64 = 20_000;
const BUDGET: u64 = 100_000_000;

/// One HTTP/1.1 exchange from `src`, with a short connect timeout (an
/// address escalated into XDP never connects). `None`: no connection.
fn http(ns: &str, src: IpAddr, req: String) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let dst = if src.is_ipv4() { SocketAddr::from((SERVER_V4, PORT)) } else { SocketAddr::from((SERVER_V6, PORT)) };
    netns::in_ns(ns, move || {
        let sock = socket2::Socket::new(socket2::Domain::for_address(dst), socket2::Type::STREAM, None).ok()?;
        sock.bind(&SocketAddr::from((src, 0)).into()).ok()?;
        sock.connect_timeout(&dst.into(), Duration::from_millis(300)).ok()?;
        let mut s: std::net::TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let raw = String::from_utf8_lossy(&buf).into_owned();
        let status = raw.split(' ').nth(1)?.parse().ok()?;
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((status, body))
    })
}

fn get(ns: &str, src: IpAddr, path: &str, origin: Option<&str>, token: Option<&str>) -> Option<(u16, String)> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: keyward.test\r\nConnection: close\r\n");
    if let Some(o) = origin {
        req.push_str(&format!("Origin: {o}\r\n"));
    }
    if let Some(t) = token {
        req.push_str(&format!("Keyward-Token: {t}\r\n"));
    }
    http(ns, src, req + "\r\n")
}

/// What a page load (or a script imitating one) does: fetch a token,
/// solving a challenge natively when one is asked for. Returns the token
/// and the CPU seconds spent solving.
fn mint(ns: &str, src: IpAddr, origin: &str) -> Option<(String, f64)> {
    let (status, body) = get(ns, src, "/.keyward/token", Some(origin), None)?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    if let Some(t) = v["token"].as_str() {
        return Some((t.to_owned(), 0.0));
    }
    let challenge: altcha::Challenge = serde_json::from_value(v["challenge"].clone()).ok()?;
    let cpu0 = cpu_seconds();
    let solution = keyward::token::pow::solve(&challenge, Duration::from_secs(30))?;
    let cpu = cpu_seconds() - cpu0;
    let body = serde_json::json!({ "challenge": challenge, "solution": solution }).to_string();
    let req = format!(
        "POST /.keyward/token HTTP/1.1\r\nHost: keyward.test\r\nConnection: close\r\nOrigin: {origin}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = http(ns, src, req)?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| (v["token"].as_str().unwrap_or_default().to_owned(), cpu))
}

fn cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("rusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

/// One attacker phase's outcome.
#[derive(Default)]
struct Phase {
    name: &'static str,
    addresses: usize,
    sent: usize,
    billed: u64,
    solve_cpu: f64,
    kernel_refused: usize,
    seconds: f64,
}

struct Day {
    t: Topology,
    up: Upstream,
    d: Daemon,
    phases: Vec<Phase>,
    /// Per gap between phases: (visitors' calls, succeeded).
    visits: Vec<(&'static str, usize, usize)>,
    visitor_n: u16,
    _keys: KeyFile,
}

struct KeyFile(std::path::PathBuf);

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Day {
    fn start() -> Day {
        use std::os::unix::fs::PermissionsExt as _;
        let t = Topology::new();
        let up = Upstream::start(&t.server_ns);
        let keys = KeyFile(std::env::temp_dir().join(format!("kwt-abuse-{}.keys", std::process::id())));
        std::fs::write(&keys.0, "k1 8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\n").unwrap();
        std::fs::set_permissions(&keys.0, std::fs::Permissions::from_mode(0o600)).unwrap();
        let limits = "per_ip_rate = 2\nper_ip_burst = 5\nper_ip_daily = 10\ndaily = 100.00\ndeny_on_daily_cap = true\n\
                      per_prefix_daily = { v4_prefix = 24, v6_prefix = 48, calls = 20 }\npace = { burst = 0.2 }";
        let text = config(&up, limits, "")
            .replace(&format!("addr = \"10.77.0.1:{PORT}\""), &format!("addr = \"[::]:{PORT}\""))
            .replace(
                "require_origin = true\n",
                "require_origin = true\nrequire_token = true\npow = { mode = \"suspicious\", counter = [300, 700] }\n",
            )
            + &format!("\n[access.token]\nkeys_file = \"{}\"\nmax_calls = 20\n", keys.0.display());
        let d = Daemon::start_with(&t, XDP_OPEN, &text);
        Day { t, up, d, phases: Vec::new(), visits: Vec::new(), visitor_n: 0, _keys: keys }
    }

    fn billed(&self) -> u64 {
        self.up.calls().len() as u64
    }

    /// Six visitors (three IPv4, three IPv6, each from its own network)
    /// load the page and look up two postcodes each.
    fn visitors(&mut self, after: &'static str) {
        let mut hosts = Vec::new();
        for _ in 0..3 {
            self.visitor_n += 1;
            let n = self.visitor_n;
            hosts.push(IpAddr::V4(Ipv4Addr::new(10, 120, n as u8, 2)));
            hosts.push(IpAddr::V6(Ipv6Addr::new(0xfd80, n, 0, 0, 0, 0, 0, 2)));
        }
        self.t.add_client_hosts(&hosts);
        let (mut calls, mut ok) = (0, 0);
        for h in hosts {
            let token = mint(&self.t.client_ns, h, SITE).map(|(t, _)| t);
            for pc in ["SW1A1AA", "EC1A1BB"] {
                calls += 1;
                let a = get(&self.t.client_ns, h, &format!("/postcodes/{pc}"), Some(SITE), token.as_deref());
                ok += usize::from(a.is_some_and(|(s, _)| s == 200));
            }
        }
        self.visits.push((after, calls, ok));
    }

    /// Run an attacker over `hosts`, each making up to `per_host` calls
    /// (with `origin`; minting tokens when `mint_tokens`); a host that meets
    /// a daily refusal or the kernel stops. The phase stops after three
    /// hosts in a row get no connection (their network is denied in XDP).
    fn attack(&mut self, name: &'static str, hosts: &[IpAddr], per_host: usize, origin: Option<&str>, tokens: bool) {
        self.t.add_client_hosts(hosts);
        let before = self.billed();
        let mut p = Phase { name, addresses: hosts.len(), ..Phase::default() };
        let mut dark = 0;
        let t0 = Instant::now();
        for h in hosts {
            let refused_before = p.kernel_refused;
            let token = match (tokens, origin) {
                (true, Some(o)) => mint(&self.t.client_ns, *h, o).map(|(t, cpu)| {
                    p.solve_cpu += cpu;
                    t
                }),
                _ => None,
            };
            for i in 0..per_host {
                p.sent += 1;
                match get(&self.t.client_ns, *h, &format!("/postcodes/AB{i}CD"), origin, token.as_deref()) {
                    None => {
                        p.kernel_refused += 1;
                        break;
                    }
                    Some((200, _)) => {}
                    Some((429 | 503, _)) => break,
                    Some((403, _)) => {}
                    Some((s, b)) => panic!("{name}: unexpected {s}: {b}"),
                }
            }
            dark = if p.kernel_refused > refused_before { dark + 1 } else { 0 };
            if dark >= 3 {
                break;
            }
        }
        p.seconds = t0.elapsed().as_secs_f64();
        p.billed = self.billed() - before;
        self.phases.push(p);
    }

    fn report(&self) -> String {
        let mut out =
            String::from("phase                         addresses  sent  billed  share of budget  CPU s/billed call\n");
        let mut total = 0;
        for p in &self.phases {
            total += p.billed;
            let share = 100.0 * (p.billed * COST) as f64 / BUDGET as f64;
            let cpu = if p.billed > 0 { format!("{:.3}", p.solve_cpu / p.billed as f64) } else { "-".into() };
            out.push_str(&format!(
                "{:<30}{:>9}{:>6}{:>8}{:>16.2} %{:>19}{:>16}   ({:.1} s)\n",
                p.name, p.addresses, p.sent, p.billed, share, cpu, p.kernel_refused, p.seconds
            ));
        }
        out.push_str(&format!(
            "attacker, all phases: {total} billed calls = {:.2} % of the day's budget\n\n",
            100.0 * (total * COST) as f64 / BUDGET as f64
        ));
        out.push_str("visitors after           calls  succeeded\n");
        for (after, calls, ok) in &self.visits {
            out.push_str(&format!("{after:<25}{calls:>5}{ok:>11}  ({:.1} %)\n", 100.0 * *ok as f64 / *calls as f64));
        }
        out
    }
}

#[test]
fn a_day_of_attacks_leaves_the_bill_and_the_visitors_standing() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let mut day = Day::start();
    let ns = day.t.client_ns.clone();
    day.visitors("the start");

    day.attack("no Origin (curl)", &[IpAddr::V4(Ipv4Addr::new(10, 91, 0, 2))], 20, None, false);
    day.visitors("no Origin");
    day.attack("copycat page", &[IpAddr::V4(Ipv4Addr::new(10, 91, 1, 2))], 20, Some("https://copycat.example"), true);
    day.visitors("copycat");
    day.attack("forged Origin, one address", &[IpAddr::V4(Ipv4Addr::new(10, 91, 2, 2))], 40, Some(SITE), true);
    day.visitors("forged Origin");
    let drip = IpAddr::V4(Ipv4Addr::new(10, 91, 3, 2));
    day.t.add_client_hosts(&[drip]);
    {
        // Under the rate: one call every 0.6 s (the pace is the attack).
        let before = day.billed();
        let token = mint(&ns, drip, SITE).map(|(t, _)| t);
        let mut sent = 0;
        for i in 0..14 {
            sent += 1;
            let a = get(&ns, drip, &format!("/postcodes/DR{i}P"), Some(SITE), token.as_deref());
            if a.is_none_or(|(s, _)| s != 200) {
                break;
            }
            std::thread::sleep(Duration::from_millis(600));
        }
        let billed = day.billed() - before;
        day.phases.push(Phase { name: "slow drip under the rate", addresses: 1, sent, billed, ..Phase::default() });
    }
    day.visitors("slow drip");
    let v6: Vec<IpAddr> = (1..=100).map(|n| IpAddr::V6(Ipv6Addr::new(0xfd90, 0, 0, 1, 0, 0, 0, n))).collect();
    day.attack("rotation, 100 in one /64", &v6, 3, Some(SITE), true);
    day.visitors("/64 rotation");
    let v4: Vec<IpAddr> = (1..=254).map(|n| IpAddr::V4(Ipv4Addr::new(10, 92, 1, n))).collect();
    day.attack("rotation, all of one /24", &v4, 3, Some(SITE), true);
    day.visitors("/24 rotation");
    let bots: Vec<IpAddr> =
        (0..200).map(|n| IpAddr::V4(Ipv4Addr::new(10, 100 + (n / 200) as u8, n as u8, 2))).collect();
    day.attack("botnet, 200 /24s", &bots, 2, Some(SITE), true);
    day.visitors("botnet");

    let report = day.report();
    eprintln!("\n{report}(suite ran in {:?})", t0.elapsed());
    let _ =
        std::fs::write(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/abuse-report.txt"), &report);

    // The promises.
    let spent = day.d.status().forwarder.expect("forwarder").spent_micros;
    let billed = day.billed();
    assert!(spent <= BUDGET, "overspent: {spent}");
    assert_eq!(spent, billed * COST, "the API saw exactly what was billed");
    let by = |n: &str| day.phases.iter().find(|p| p.name.starts_with(n)).map_or(0, |p| p.billed);
    assert_eq!(by("no Origin"), 0, "calls without Origin billed");
    assert_eq!(by("copycat"), 0, "a copycat page billed");
    assert!(by("forged Origin") <= 10, "one address billed more than its daily cap");
    assert!(by("rotation, 100 in one /64") <= 10, "a /64 billed more than one address's cap");
    assert!(by("rotation, all of one /24") <= 20, "a /24 billed more than its prefix cap");
    for (after, calls, ok) in &day.visits {
        assert_eq!(ok, calls, "visitors failed after {after}");
    }
}
