//! The soak (`cargo xtask soak`): the real daemon in namespaces under mixed
//! load for minutes. Visitors with page tokens and an allowed Origin call a
//! route at a steady rate while the attacks of issue 14 run at once: idle
//! connections and slow headers up to the per-IP cap, one address flooding
//! GETs over its rate, one POSTing over its rate, forged Origins, and a
//! spoofed SYN flood from rotating sources (AF_PACKET from the client
//! namespace). The daemon's memory (RSS), open descriptors, threads and CPU
//! per answered request are sampled at the start, every minute and at the
//! end, with the visitors' success rate; growth is flagged. A benchmark, not
//! a test: it reports, it never fails on a figure.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    daemon::{Daemon, PORT},
    frame,
    fwd::{ORIGIN, config},
    netns::{self, SERVER_V4, Topology},
    upstream::Upstream,
    wire,
};

/// Visitors (one address each) and the calls each makes per second.
const VISITORS: u8 = 8;
const VISITOR_RPS: f64 = 2.0;
/// Connection cap per address in the soak's config; the idle and slow
/// attackers each try to hold this many and a few more.
const PER_IP_CAP: usize = 64;
/// The spoofed SYN flood's rate.
const SPOOF_PPS: u64 = 2_000;
/// Requests per second of each flooding attacker.
const FLOOD_RPS: f64 = 50.0;
/// Per-address rate and burst in `[limits]`.
const LIMITS: &str = "per_ip_rate = 5\nper_ip_burst = 10\nper_ip_daily = 10000000\ndaily = 1000000.00";
const LISTEN: &str = "head_timeout = \"5s\"\nmax_connections_per_ip = 64\nmax_connections = 4096";
const XDP: &str = "rate_pps = 2000\nburst = 4000";

/// Counters every worker adds to.
#[derive(Default)]
pub struct Tally {
    /// Answers from the daemon, of any status (the CPU-per-request divisor).
    pub answered: AtomicU64,
    pub visitor_ok: AtomicU64,
    pub visitor_failed: AtomicU64,
    pub flood_429: AtomicU64,
    pub flood_other: AtomicU64,
    pub post_429: AtomicU64,
    pub post_other: AtomicU64,
    /// The slowest refusal of an over-rate POST, in ms.
    pub post_slowest_ms: AtomicU64,
    pub origin_403: AtomicU64,
    /// A forged Origin that was not refused 403: must stay 0.
    pub origin_admitted: AtomicU64,
    pub idle_opened: AtomicU64,
    pub slow_opened: AtomicU64,
    pub spoofed_sent: AtomicU64,
}

impl Tally {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "answered": g(&self.answered),
            "visitor_ok": g(&self.visitor_ok), "visitor_failed": g(&self.visitor_failed),
            "flood_429": g(&self.flood_429), "flood_other": g(&self.flood_other),
            "post_429": g(&self.post_429), "post_other": g(&self.post_other),
            "post_slowest_ms": g(&self.post_slowest_ms),
            "origin_403": g(&self.origin_403), "origin_admitted": g(&self.origin_admitted),
            "idle_opened": g(&self.idle_opened), "slow_opened": g(&self.slow_opened),
            "spoofed_sent": g(&self.spoofed_sent),
        })
    }
}

/// One sample of the daemon.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at_s: f64,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// User plus system CPU since start, ms.
    pub cpu_ms: u64,
    pub answered: u64,
    pub visitor_ok: u64,
    pub visitor_failed: u64,
}

/// A token key file, removed on drop.
struct KeyFile(std::path::PathBuf);

impl KeyFile {
    fn new() -> KeyFile {
        use std::os::unix::fs::PermissionsExt as _;
        let p = std::env::temp_dir().join(format!("kwt-soak-{}.keys", std::process::id()));
        std::fs::write(&p, "k1 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").expect("key file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("key file mode");
        KeyFile(p)
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The namespaces, the stand-in API and the daemon.
pub struct Rig {
    pub t: Topology,
    _up: Upstream,
    pub d: Daemon,
    _keys: KeyFile,
}

fn visitor(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + i)
}
const IDLE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 40);
const SLOW: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 41);
const FLOOD: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 42);
const POSTER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 43);
const FORGER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 44);

impl Rig {
    pub fn start() -> Rig {
        let t = Topology::new();
        for a in (0..VISITORS).map(visitor).chain([IDLE, SLOW, FLOOD, POSTER, FORGER]) {
            t.add_client_address(a);
        }
        let up = Upstream::start(&t.server_ns);
        let keys = KeyFile::new();
        let text = config(&up, LIMITS, LISTEN)
            .replace("require_origin = true\n", "require_origin = true\nrequire_token = true\n")
            + &format!("\n[access.token]\nkeys_file = \"{}\"\nmax_calls = 1000\n", keys.0.display());
        let d = Daemon::start_with(&t, XDP, &text);
        Rig { t, _up: up, d, _keys: keys }
    }

    /// Run the load for `length`, sampling every `every`.
    pub fn run(&self, length: Duration, every: Duration) -> (Vec<Sample>, Arc<Tally>) {
        let pid = self.d.pid().expect("daemon running");
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut samples = Vec::new();
        std::thread::scope(|s| {
            let ns = &self.t.client_ns;
            for i in 0..VISITORS {
                let (tl, st) = (tally.clone(), stop.clone());
                s.spawn(move || netns::in_ns(ns, move || visit(visitor(i), &tl, &st)));
            }
            let (tl, st) = (tally.clone(), stop.clone());
            s.spawn(move || netns::in_ns(ns, move || hold(IDLE, b"", None, &tl.idle_opened, &st)));
            let (tl, st) = (tally.clone(), stop.clone());
            let first = b"GET /postcodes/SW1A1AA HTTP/1.1\r\nHost: keyward.test\r\n";
            s.spawn(move || netns::in_ns(ns, move || hold(SLOW, first, Some(b"X-Slow: a\r\n"), &tl.slow_opened, &st)));
            let (tl, st) = (tally.clone(), stop.clone());
            s.spawn(move || netns::in_ns(ns, move || flood(FLOOD, false, &tl, &st)));
            let (tl, st) = (tally.clone(), stop.clone());
            s.spawn(move || netns::in_ns(ns, move || flood(POSTER, true, &tl, &st)));
            let (tl, st) = (tally.clone(), stop.clone());
            s.spawn(move || netns::in_ns(ns, move || forge(&tl, &st)));
            let (tl, st) = (tally.clone(), stop.clone());
            s.spawn(move || spoof(&self.t, &tl, &st));
            samples = sample_until(pid, &tally, length, every);
            stop.store(true, Ordering::SeqCst);
        });
        (samples, tally)
    }
}

/// Sample at the start, every `every`, and at the end.
fn sample_until(pid: u32, tally: &Tally, length: Duration, every: Duration) -> Vec<Sample> {
    let start = Instant::now();
    let mut out = vec![sample(pid, tally, 0.0)];
    eprintln!("{}", row(&out[0], None));
    let mut next = every;
    while next < length {
        std::thread::sleep(next.saturating_sub(start.elapsed()));
        out.push(sample(pid, tally, start.elapsed().as_secs_f64()));
        eprintln!("{}", row(&out[out.len() - 1], out.get(out.len() - 2)));
        next += every;
    }
    std::thread::sleep(length.saturating_sub(start.elapsed()));
    out.push(sample(pid, tally, start.elapsed().as_secs_f64()));
    eprintln!("{}", row(&out[out.len() - 1], out.get(out.len() - 2)));
    out
}

fn sample(pid: u32, tally: &Tally, at_s: f64) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split_whitespace().map(|w| w.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as u64;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Sample {
        at_s,
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
        cpu_ms: ticks * 1000 / hz.max(1),
        answered: g(&tally.answered),
        visitor_ok: g(&tally.visitor_ok),
        visitor_failed: g(&tally.visitor_failed),
    }
}

/// CPU µs per answered request between two samples.
pub fn cpu_per_request(a: &Sample, b: &Sample) -> Option<f64> {
    let n = b.answered.checked_sub(a.answered).filter(|n| *n > 0)?;
    Some(b.cpu_ms.saturating_sub(a.cpu_ms) as f64 * 1000.0 / n as f64)
}

/// Visitors' success between two samples, in percent.
pub fn success(a: &Sample, b: &Sample) -> Option<f64> {
    let ok = b.visitor_ok - a.visitor_ok;
    let all = ok + (b.visitor_failed - a.visitor_failed);
    (all > 0).then(|| ok as f64 * 100.0 / all as f64)
}

/// One line of the report (as the markdown table's rows).
pub fn row(s: &Sample, prev: Option<&Sample>) -> String {
    let per = prev.and_then(|p| cpu_per_request(p, s)).map_or("–".into(), |v| format!("{v:.0}"));
    let ok = prev.and_then(|p| success(p, s)).map_or("–".into(), |v| format!("{v:.1}%"));
    format!(
        "| {:>5.0} s | {:>7.1} MiB | {:>5} | {:>3} | {:>7} ms | {:>8} | {per:>6} µs | {ok:>7} |",
        s.at_s,
        s.rss_kib as f64 / 1024.0,
        s.fds,
        s.threads,
        s.cpu_ms,
        s.answered,
    )
}

/// What grew between the first minute (warmed up) and the end.
pub fn growth(samples: &[Sample]) -> Vec<String> {
    let (Some(first), Some(last)) = (samples.get(1).or(samples.first()), samples.last()) else { return vec![] };
    let mut flags = Vec::new();
    let grown = last.rss_kib.saturating_sub(first.rss_kib);
    if grown > 8 * 1024 && last.rss_kib * 4 > first.rss_kib * 5 {
        flags.push(format!("RSS grew {:.1} MiB ({} → {} KiB)", grown as f64 / 1024.0, first.rss_kib, last.rss_kib));
    }
    if last.fds > first.fds + 32 {
        flags.push(format!("descriptors grew {} → {}", first.fds, last.fds));
    }
    if last.threads > first.threads + 4 {
        flags.push(format!("threads grew {} → {}", first.threads, last.threads));
    }
    let n = samples.len();
    let early = samples.get(..2).and_then(|w| cpu_per_request(&w[0], &w[1]));
    let late = samples.get(n.saturating_sub(2)..).filter(|w| w.len() == 2).and_then(|w| cpu_per_request(&w[0], &w[1]));
    if let (Some(e), Some(l)) = (early, late)
        && l > e * 1.5
    {
        flags.push(format!("CPU per request grew {e:.0} → {l:.0} µs"));
    }
    flags
}

// ---- The load ----

/// One request from `src` (on a thread already in the client namespace):
/// the status and body, and how long the answer took.
fn exchange(src: Ipv4Addr, req: &[u8]) -> std::io::Result<(u16, String, Duration)> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((src, 0)).into())?;
    let start = Instant::now();
    sock.connect_timeout(&SocketAddr::from((SERVER_V4, PORT)).into(), Duration::from_secs(3))?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(req)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let raw = String::from_utf8_lossy(&buf);
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body, start.elapsed()))
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: keyward.test\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        r.push_str(&format!("Content-Type: text/plain\r\nContent-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// What kw.js does at page load: a token for the page's Origin.
fn mint(src: Ipv4Addr, tally: &Tally) -> Option<String> {
    let (status, body, _) = exchange(src, &request("GET", "/.keyward/token", &[ORIGIN], "")).ok()?;
    Tally::add(&tally.answered, 1);
    let v: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    v["token"].as_str().map(str::to_owned)
}

/// Sleep until `due` or until stopped.
fn pace(due: Instant, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= due {
            return;
        }
        std::thread::sleep((due - now).min(Duration::from_millis(200)));
    }
}

/// A visitor: a token, then a route call every `1/VISITOR_RPS` s; a new
/// token after 500 calls (the token allows 1000) or any token refusal.
fn visit(src: Ipv4Addr, tally: &Tally, stop: &AtomicBool) {
    let period = Duration::from_secs_f64(1.0 / VISITOR_RPS);
    let mut due = Instant::now();
    let (mut token, mut used) = (None, 0u32);
    while !stop.load(Ordering::Relaxed) {
        due += period;
        if token.is_none() || used >= 500 {
            token = mint(src, tally);
            used = 0;
        }
        let Some(t) = token.as_deref() else {
            Tally::add(&tally.visitor_failed, 1);
            pace(due, stop);
            continue;
        };
        let req = request("GET", "/postcodes/SW1A1AA", &[ORIGIN, ("Keyward-Token", t)], "");
        used += 1;
        match exchange(src, &req) {
            Ok((200, ..)) => Tally::add(&tally.visitor_ok, 1),
            Ok((status, ..)) => {
                if status == 403 {
                    token = None;
                }
                Tally::add(&tally.visitor_failed, 1);
            }
            Err(_) => Tally::add(&tally.visitor_failed, 1),
        }
        Tally::add(&tally.answered, 1);
        pace(due, stop);
    }
}

/// Hold as many connections from `src` as the cap allows and a few more,
/// each having sent `first` and, every second, `drip` (slow headers); the
/// ones the daemon closes are replaced.
fn hold(src: Ipv4Addr, first: &'static [u8], drip: Option<&'static [u8]>, opened: &AtomicU64, stop: &AtomicBool) {
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut due = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        conns.retain(|c| alive(c, drip));
        while conns.len() < PER_IP_CAP + 8 {
            match open(src, first) {
                Some(c) => conns.push(c),
                None => break,
            }
            Tally::add(opened, 1);
        }
        due += Duration::from_secs(1);
        pace(due, stop);
    }
}

fn open(src: Ipv4Addr, first: &[u8]) -> Option<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    sock.bind(&SocketAddr::from((src, 0)).into()).ok()?;
    sock.connect_timeout(&SocketAddr::from((SERVER_V4, PORT)).into(), Duration::from_secs(2)).ok()?;
    let mut s: TcpStream = sock.into();
    s.write_all(first).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// Whether the daemon still holds `c` open (sending `drip` if given).
fn alive(mut c: &TcpStream, drip: Option<&[u8]>) -> bool {
    let mut b = [0u8; 1];
    match c.peek(&mut b) {
        Ok(_) => return false,
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return false,
        Err(_) => {}
    }
    drip.is_none_or(|d| c.write_all(d).is_ok())
}

/// One address over its rate: GETs (or POSTs with a body) at `FLOOD_RPS`.
fn flood(src: Ipv4Addr, post: bool, tally: &Tally, stop: &AtomicBool) {
    let period = Duration::from_secs_f64(1.0 / FLOOD_RPS);
    let mut due = Instant::now();
    let mut token = None;
    while !stop.load(Ordering::Relaxed) {
        due += period;
        if token.is_none() {
            token = mint(src, tally);
        }
        let t = token.clone().unwrap_or_default();
        let headers = [ORIGIN, ("Keyward-Token", t.as_str())];
        let req = if post {
            request("POST", "/submit/SW1A1AA", &headers, "postcode=SW1A1AA")
        } else {
            request("GET", "/postcodes/SW1A1AA", &headers, "")
        };
        if let Ok((status, _, took)) = exchange(src, &req) {
            Tally::add(&tally.answered, 1);
            let (refused, other) =
                if post { (&tally.post_429, &tally.post_other) } else { (&tally.flood_429, &tally.flood_other) };
            Tally::add(if status == 429 { refused } else { other }, 1);
            if status == 403 {
                token = None;
            }
            if post && status == 429 {
                tally.post_slowest_ms.fetch_max(took.as_millis() as u64, Ordering::Relaxed);
            }
        }
        pace(due, stop);
    }
}

/// Forged Origins: another site, two values in one header, two headers.
fn forge(tally: &Tally, stop: &AtomicBool) {
    let forged: [&[(&str, &str)]; 3] = [
        &[("Origin", "https://evil.example")],
        &[("Origin", "https://www.example.com https://evil.example")],
        &[ORIGIN, ("Origin", "https://evil.example")],
    ];
    let mut due = Instant::now();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        due += Duration::from_millis(200);
        let req = request("GET", "/postcodes/SW1A1AA", forged[i % forged.len()], "");
        i += 1;
        if let Ok((status, ..)) = exchange(FORGER, &req) {
            Tally::add(&tally.answered, 1);
            Tally::add(if status == 403 { &tally.origin_403 } else { &tally.origin_admitted }, 1);
        }
        pace(due, stop);
    }
}

/// Spoofed SYNs from 65,536 rotating sources over 256 /24s, at `SPOOF_PPS`.
fn spoof(t: &Topology, tally: &Tally, stop: &Arc<AtomicBool>) {
    let macs = t.macs();
    while !stop.load(Ordering::Relaxed) {
        let (sent, _) = wire::send_until(t, SPOOF_PPS, stop.clone(), move |i| {
            let src = Ipv4Addr::new(10, 200, (i >> 8) as u8, i as u8);
            frame::tcp4(macs, src, SERVER_V4, 40_000 + (i % 20_000) as u16, PORT)
        });
        Tally::add(&tally.spoofed_sent, sent);
    }
}
