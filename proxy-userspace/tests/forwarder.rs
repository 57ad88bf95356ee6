//! The forwarder's HTTP policy, in process and without root: the real
//! `Forwarder` and its accept loop on loopback, in front of a stand-in paid
//! API on loopback, with a clock the test moves. Every refusal row, the key
//! injected and scrubbed, per-IP caps, the budget, the day change, and the
//! order of work (limits decided before a body is read). The network
//! namespace tests in `tests/` cover the real daemon with XDP.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use keyward::{
    clock::fake::FakeClock,
    journal::Journal,
    proxy::{Escalation, Forwarder, Handles, policy::Loaded},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

const KEY: &str = "sk_test_s3cr3t/+=";
/// 2026-11-27 12:00:00 UTC.
const NOON: u64 = 1_795_780_800;

/// What the stand-in API saw of one call.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: http::HeaderMap,
    body: Bytes,
}

/// A stand-in paid API on loopback: records every call, answers with the
/// status the test sets, echoes the key when asked (to test scrubbing), and
/// can be made slow.
struct StandIn {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
}

impl StandIn {
    async fn start() -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (s, st, d) = (seen.clone(), status.clone(), delay_ms.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (s, st, d) = (s.clone(), st.clone(), d.clone());
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (s, st, d) = (s.clone(), st.clone(), d.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let uri = parts.uri.to_string();
                        s.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            uri: uri.clone(),
                            headers: parts.headers,
                            body,
                        });
                        tokio::time::sleep(Duration::from_millis(d.load(Ordering::SeqCst))).await;
                        // Echo what was asked for, key included: keyward must scrub it.
                        let echo = format!("{{\"you-asked\":\"{uri}\"}}");
                        let mut r = Response::new(Full::new(Bytes::from(echo)));
                        *r.status_mut() = StatusCode::from_u16(st.load(Ordering::SeqCst)).unwrap();
                        r.headers_mut().insert("x-echo", http::HeaderValue::from_str(&uri).unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                tokio::spawn(async move {
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        StandIn { addr, seen, status, delay_ms }
    }

    fn calls(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// keyward's forwarder on loopback in front of a stand-in, on a fake clock.
struct Harness {
    addr: SocketAddr,
    api: StandIn,
    clock: Arc<FakeClock>,
    fwd: Arc<Forwarder>,
    escalations: mpsc::UnboundedReceiver<Escalation>,
    _stop: watch::Sender<bool>,
    _dir: TempDir,
}

/// A directory (or file) removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(&self.0).is_err() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn config(api: SocketAddr, key_file: &std::path::Path, extra_limits: &str) -> String {
    format!(
        r#"
[xdp]
interface = "lo"
ports = [8080]
rate_pps = 100
burst = 100

[listen]
addr = "127.0.0.1:0"
trusted_proxies = ["127.0.0.1/32"]
max_body = "1KiB"

[upstream]
base_url = "http://{api}/v1"
timeout = "300ms"
key_file = "{key}"
inject = {{ query = "api_key" }}

[[route]]
method = "GET"
path = "/lookup/{{postcode}}"
upstream_path = "/postcodes/{{postcode}}"
params = {{ postcode = "[A-Z0-9]{{2,8}}" }}
query = ["filter"]
cost = 0.02

[[route]]
method = "POST"
path = "/geocode"
upstream_path = "/geocode"
cost = 0.05

[access]
allowed_origins = ["https://shop.example"]
require_origin = true

[limits]
per_ip_rate = 1
per_ip_burst = 3
per_ip_daily = 4
daily = 0.20
currency = "GBP"
reset_at = "00:00"
timezone = "UTC"
{extra_limits}
"#,
        key = key_file.display()
    )
}

impl Harness {
    async fn start(extra_limits: &str) -> Harness {
        Harness::start_with("", extra_limits).await
    }

    /// With extra `[access]` keys too.
    async fn start_with(extra_access: &str, extra_limits: &str) -> Harness {
        let access = format!("require_origin = true\n{extra_access}\n");
        Harness::start_edited(extra_limits, |t| t.replace("require_origin = true\n", &access), None).await
    }

    /// With extra `[listen]` keys.
    async fn start_listen(extra_listen: &str) -> Harness {
        let listen = format!("max_body = \"1KiB\"\n{extra_listen}\n");
        Harness::start_edited("", |t| t.replace("max_body = \"1KiB\"\n", &listen), None).await
    }

    /// With reservations made durable in `journal` before each call leaves.
    async fn start_journaled(journal: Journal) -> Harness {
        Harness::start_edited("", |t| t, Some(journal)).await
    }

    /// With the config text edited by `edit`, and reservations made durable
    /// in `journal` when given.
    async fn start_edited(
        extra_limits: &str,
        edit: impl FnOnce(String) -> String,
        journal: Option<Journal>,
    ) -> Harness {
        let api = StandIn::start().await;
        let dir = std::env::temp_dir().join(format!("kw-fwd-{}-{}", std::process::id(), next_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = TempDir(dir);
        let key_file = dir.0.join("key");
        std::fs::write(&key_file, KEY).unwrap();
        let path = dir.0.join("keyward.toml");
        let text = edit(config(api.addr, &key_file, extra_limits));
        let (_cfg, policy) = Loaded::parse(&path, &text).unwrap().with_key(&path).unwrap();
        let clock = Arc::new(FakeClock::at(NOON));
        let Handles { forwarder, escalations } = Forwarder::with_journal(policy.unwrap(), clock.clone(), None, journal);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(keyward::proxy::serve(forwarder.clone(), listener, None, stop_rx, Duration::from_secs(1)));
        Harness { addr, api, clock, fwd: forwarder, escalations, _stop: stop, _dir: dir }
    }

    /// One HTTP/1.1 request over a fresh connection; the answer's status,
    /// headers and body.
    async fn call(&self, raw: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.expect("answer in time").unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    /// A GET from `client` (through the trusted loopback proxy) with `origin`.
    async fn get(&self, path: &str, client: &str, origin: Option<&str>) -> (u16, String, String) {
        let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
        self.call(&format!(
            "GET {path} HTTP/1.1\r\nHost: kw\r\nX-Forwarded-For: {client}\r\n{origin}Connection: close\r\n\r\n"
        ))
        .await
    }

    fn spent(&self) -> u64 {
        use keyward::clock::Clock as _;
        self.fwd.limiter().today(self.clock.unix_secs() as i64).0.spent
    }
}

fn next_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

const SHOP: Option<&str> = Some("https://shop.example");

fn problem_type(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["type"].as_str().unwrap_or_default().rsplit([':', '#']).next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_with_the_key_injected_and_scrubbed_from_the_answer() {
    let h = Harness::start("").await;
    let (status, head, body) = h.get("/lookup/AB12CD?filter=x&api_key=guess&other=1", "198.51.100.7", SHOP).await;
    assert_eq!(status, 200, "{head}{body}");
    let calls = h.api.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.method, "GET");
    // The fixed path, the listed query kept, the unlisted and the client's
    // copy of the key dropped, our key appended.
    assert_eq!(c.uri, "/v1/postcodes/AB12CD?filter=x&api_key=sk_test_s3cr3t%2F%2B%3D");
    assert_eq!(c.headers["accept-encoding"], "identity");
    // The stand-in echoed the key in a header and the body: both scrubbed.
    assert!(!head.contains("s3cr3t") && !body.contains("s3cr3t"), "{head}{body}");
    assert!(body.contains("[redacted]"), "{body}");
    assert!(head.contains("access-control-allow-origin: https://shop.example"), "{head}");
    assert!(head.contains("ratelimit-policy:"), "{head}");
    assert_eq!(h.spent(), 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_head_refusal_is_problem_json_and_never_reaches_the_upstream() {
    let h = Harness::start("").await;
    let cases: &[(&str, Option<&str>, u16, &str)] = &[
        ("/nowhere", SHOP, 404, "no-route"),
        ("/lookup/ab12cd", SHOP, 400, "bad-parameter"),
        ("/lookup/AB%2F..%2FCD", SHOP, 400, "bad-parameter"),
        ("/lookup/AB12CD", None, 403, "origin-not-allowed"),
        ("/lookup/AB12CD", Some("https://copycat.example"), 403, "origin-not-allowed"),
        ("/lookup/AB12CD", Some("https://shop.example.evil.net"), 403, "origin-not-allowed"),
    ];
    for (path, origin, want, ty) in cases {
        let (status, head, body) = h.get(path, "198.51.100.8", *origin).await;
        assert_eq!(status, *want, "{path} {origin:?}: {body}");
        assert!(head.contains("content-type: application/problem+json"), "{head}");
        assert_eq!(problem_type(&body), *ty);
    }
    let (status, _, body) = h
        .call("POST /geocode HTTP/1.1\r\nHost: kw\r\nOrigin: https://shop.example\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!((status, problem_type(&body).as_str()), (413, "body-too-large"));
    assert!(h.api.calls().is_empty(), "a refusal reached the upstream");
    assert_eq!(h.spent(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_rate_then_daily_cap_then_escalation_then_the_next_day() {
    let mut h = Harness::start("").await;
    let client = "203.0.113.9";
    for _ in 0..3 {
        assert_eq!(h.get("/lookup/AB12CD", client, SHOP).await.0, 200);
    }
    let (status, head, body) = h.get("/lookup/AB12CD", client, SHOP).await;
    assert_eq!((status, problem_type(&body).as_str()), (429, "quota-exceeded"), "{body}");
    assert!(body.contains("ip-rate") && head.contains("retry-after: 1"), "{head}{body}");
    // A second later one token is back: the fourth call uses up the day.
    h.clock.advance_secs(1);
    assert_eq!(h.get("/lookup/AB12CD", client, SHOP).await.0, 200);
    h.clock.advance_secs(1);
    let (status, head, body) = h.get("/lookup/AB12CD", client, SHOP).await;
    assert_eq!(status, 429);
    assert!(body.contains("ip-daily"), "{body}");
    // Retry-After points at midnight (plus up to a minute of jitter).
    let retry: u64 = head.split("retry-after: ").nth(1).unwrap().split("\r\n").next().unwrap().parse().unwrap();
    assert!((43_198..=43_260).contains(&retry), "retry-after {retry}");
    let e = h.escalations.try_recv().expect("escalated into XDP");
    assert_eq!(e.cidr.to_string(), "203.0.113.9/32");
    assert_eq!(e.until_unix, NOON + 43_200);
    assert_eq!(h.api.calls().len(), 4);
    // Another address is not affected; the next day the client is back.
    assert_eq!(h.get("/lookup/AB12CD", "203.0.113.10", SHOP).await.0, 200);
    h.clock.advance_secs(43_200);
    assert_eq!(h.get("/lookup/AB12CD", client, SHOP).await.0, 200);
    assert_eq!(h.spent(), 20_000, "the new day starts from zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_a_hard_stop_and_unbillable_answers_are_free() {
    let h = Harness::start("").await;
    h.api.status.store(500, Ordering::SeqCst);
    assert_eq!(h.get("/lookup/AB12CD", "192.0.2.1", SHOP).await.0, 500);
    assert_eq!(h.spent(), 0, "a 500 is not billed");
    h.api.status.store(200, Ordering::SeqCst);
    // 0.20 GBP at 0.02 a call: ten calls from ten addresses, then 503.
    for i in 0..10 {
        h.clock.advance_secs(1);
        assert_eq!(h.get("/lookup/AB12CD", &format!("192.0.2.{}", 10 + i), SHOP).await.0, 200);
    }
    assert_eq!(h.spent(), 200_000);
    let (status, head, body) = h.get("/lookup/AB12CD", "192.0.2.99", SHOP).await;
    assert_eq!((status, problem_type(&body).as_str()), (503, "budget-exhausted"), "{body}");
    assert!(head.contains("retry-after:"), "{head}");
    assert_eq!(h.api.calls().len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_stays_charged_and_unreachable_is_refunded() {
    let h = Harness::start("").await;
    h.api.delay_ms.store(2_000, Ordering::SeqCst);
    let (status, _, body) = h.get("/lookup/AB12CD", "192.0.2.1", SHOP).await;
    assert_eq!((status, problem_type(&body).as_str()), (504, "upstream-timeout"));
    assert_eq!(h.spent(), 20_000, "a call that may have been billed stays charged");

    // An upstream that is not listening: the call never left.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let dir = TempDir(std::env::temp_dir().join(format!("kw-fwd-dead-{}-{}", std::process::id(), next_id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(dir.0.join("key"), KEY).unwrap();
    let path = dir.0.join("k.toml");
    let text = config(dead, &dir.0.join("key"), "");
    let (_c, p) = Loaded::parse(&path, &text).unwrap().with_key(&path).unwrap();
    h.fwd.reconfigure(p.unwrap());
    let (status, _, body) = h.get("/lookup/AB12CD", "192.0.2.2", SHOP).await;
    assert_eq!((status, problem_type(&body).as_str()), (502, "upstream-unavailable"));
    assert_eq!(h.spent(), 20_000, "a call that never left is given back");
}

/// The journal's disk, in memory: it refuses every commit while `fail` is
/// set (a disk gone bad), and holds every commit while `held` is set (a
/// commit on its way to disk; at most 10 s).
#[derive(Clone, Debug, Default)]
struct Disk {
    fail: Arc<AtomicBool>,
    held: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Disk {
    fn hold(&self, held: bool) {
        *self.held.0.lock().unwrap() = held;
        self.held.1.notify_all();
    }
}

impl keyward::journal::Log for Disk {
    fn append(&mut self, _frames: &[u8], _max_seq: u64) -> std::io::Result<()> {
        let (lock, changed) = &*self.held;
        let (_held, _) = changed.wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(10), |h| *h).unwrap();
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected: disk full"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_that_cannot_be_saved_is_refused_and_given_back() {
    let fail = Arc::new(AtomicBool::new(false));
    let disk = Disk { fail: fail.clone(), ..Disk::default() };
    let h = Harness::start_journaled(Journal::start(disk).unwrap()).await;
    let (status, head, body) = h.get("/lookup/AB12CD", "198.51.100.7", SHOP).await;
    assert_eq!(status, 200, "{head}{body}");
    fail.store(true, Ordering::SeqCst);
    let (status, head, body) = h.get("/lookup/AB12CE", "198.51.100.7", SHOP).await;
    assert_eq!(status, 503, "{head}{body}");
    assert_eq!(problem_type(&body), "store-unavailable");
    assert_eq!(h.api.calls().len(), 1, "the call never left");
    assert_eq!(h.spent(), 20_000, "its cost was given back");
    assert!(head.contains("\"ip-daily\";r=3;"), "its daily count was given back: {head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_goes_away_while_its_reservation_is_written_is_given_back() {
    let disk = Disk::default();
    let h = Harness::start_journaled(Journal::start(disk.clone()).unwrap()).await;
    // Hold the commit: the reservation cannot reach the disk.
    disk.hold(true);
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let req = "GET /lookup/AB12CD HTTP/1.1\r\nHost: kw\r\nX-Forwarded-For: 198.51.100.7\r\nOrigin: https://shop.example\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let until = |spent: u64| {
        let h = &h;
        async move {
            for _ in 0..500 {
                if h.spent() == spent {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    };
    assert!(until(20_000).await, "the call never took its reservation");
    drop(s);
    assert!(until(0).await, "the reservation of a call that went away was kept");
    disk.hold(false);
    assert!(h.api.calls().is_empty(), "the call never left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_decided_before_a_body_is_read() {
    let h = Harness::start("").await;
    let client = "198.51.100.50";
    let post = |body: &str| {
        format!(
            "POST /geocode HTTP/1.1\r\nHost: kw\r\nX-Forwarded-For: {client}\r\nOrigin: https://shop.example\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    for _ in 0..3 {
        assert_eq!(h.call(&post("{\"q\":\"x\"}")).await.0, 200);
    }
    assert_eq!(h.api.calls()[0].body, Bytes::from_static(b"{\"q\":\"x\"}"));
    // Over its rate, a request that declares a body it never sends is
    // answered 429 at once (not held until the body timeout).
    let t0 = std::time::Instant::now();
    let (status, _, body) = h
        .call(&format!(
            "POST /geocode HTTP/1.1\r\nHost: kw\r\nX-Forwarded-For: {client}\r\nOrigin: https://shop.example\r\nContent-Length: 500\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(5), "the refusal waited for the body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_route_never_forwards_a_body() {
    let h = Harness::start("").await;
    let (status, _, _) = h
        .call("GET /lookup/AB12CD HTTP/1.1\r\nHost: kw\r\nOrigin: https://shop.example\r\nContent-Type: text/evil\r\nContent-Length: 4\r\nConnection: close\r\n\r\nEVIL")
        .await;
    assert_eq!(status, 200);
    let c = &h.api.calls()[0];
    assert!(c.body.is_empty(), "body forwarded: {:?}", c.body);
    assert!(!c.headers.contains_key("content-type"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_refuses_nothing_but_counts_what_it_would() {
    let h = Harness::start("dry_run = true").await;
    let (status, _, _) = h.get("/lookup/AB12CD", "192.0.2.1", None).await;
    assert_eq!(status, 200, "dry run forwarded a call without origin");
    let would = h.fwd.would_refuse();
    assert_eq!(would.values().sum::<u64>(), 1, "{would:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_is_answered_here() {
    let h = Harness::start("").await;
    let (status, head, _) = h
        .call("OPTIONS /geocode HTTP/1.1\r\nHost: kw\r\nOrigin: https://shop.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 204);
    assert!(head.contains("access-control-allow-methods: post"), "{head}");
    let (status, _, _) = h
        .call("OPTIONS /geocode HTTP/1.1\r\nHost: kw\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 403);
    assert!(h.api.calls().is_empty());
}

#[test]
fn a_bad_route_is_refused_at_its_line() {
    let text = config("127.0.0.1:9".parse().unwrap(), std::path::Path::new("/nonexistent"), "")
        .replace("upstream_path = \"/geocode\"", "upstream_path = \"geocode\"");
    let err = Loaded::parse(std::path::Path::new("k.toml"), &text).unwrap_err().to_string();
    // At the route that is wrong (the second one), not at the file's start.
    let line = text.lines().enumerate().filter(|(_, l)| *l == "[[route]]").nth(1).unwrap().0 + 1;
    assert!(err.starts_with(&format!("k.toml:{line}:")), "{err}");
    assert!(err.contains("must start with /"), "{err}");
}

#[test]
fn a_bad_timezone_is_refused_at_the_limits_table() {
    let text = config("127.0.0.1:9".parse().unwrap(), std::path::Path::new("/nonexistent"), "")
        .replace("timezone = \"UTC\"", "timezone = \"Mars/Olympus\"");
    let err = Loaded::parse(std::path::Path::new("k.toml"), &text).unwrap_err().to_string();
    assert!(err.contains("Mars/Olympus"), "{err}");
    assert!(err.starts_with("k.toml:") && !err.starts_with("k.toml:1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_inside_one_network_bills_at_most_the_prefix_cap() {
    let mut h = Harness::start("per_prefix_daily = { v4_prefix = 24, v6_prefix = 48, calls = 5 }").await;
    let mut billed = 0;
    for i in 1..=60 {
        let (status, head, body) = h.get("/lookup/AB12CD", &format!("203.0.113.{i}"), SHOP).await;
        match status {
            200 => billed += 1,
            429 => {
                assert!(body.contains("prefix-daily"), "{body}");
                assert!(head.contains("\"prefix-daily\";q=5"), "{head}");
            }
            s => panic!("unexpected {s}: {body}"),
        }
        h.clock.advance_secs(1);
    }
    assert_eq!(billed, 5);
    assert_eq!(h.api.calls().len(), 5);
    let e = h.escalations.try_recv().expect("the network escalated");
    assert_eq!(e.cidr.to_string(), "203.0.113.0/24");
    assert!(h.escalations.try_recv().is_err(), "escalated once");
    // Visitors elsewhere are served.
    assert_eq!(h.get("/lookup/AB12CD", "198.51.100.1", SHOP).await.0, 200);
    // The trusted proxy's own network is never escalated.
    let mut h = Harness::start("per_prefix_daily = { calls = 1 }").await;
    assert_eq!(h.get("/lookup/AB12CD", "127.0.0.9", SHOP).await.0, 200);
    assert_eq!(h.get("/lookup/AB12CD", "127.0.0.10", SHOP).await.0, 429);
    assert!(h.escalations.try_recv().is_err(), "a trusted proxy's network was escalated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_refuses_with_its_own_type_until_the_next_release() {
    // 0.20 a day, 0.04 at once: at noon 0.04 + 0.08 = 0.12 is released.
    let h = Harness::start("pace = { burst = 0.2 }").await;
    for i in 0..6 {
        assert_eq!(h.get("/lookup/AB12CD", &format!("192.0.2.{}", i + 1), SHOP).await.0, 200);
    }
    let (status, head, body) = h.get("/lookup/AB12CD", "192.0.2.50", SHOP).await;
    assert_eq!((status, problem_type(&body).as_str()), (503, "budget-paced"), "{body}");
    // 0.02 more is released every 0.02 / 0.16 × 86400 s = 10800 s.
    let retry: u64 = head.split("retry-after: ").nth(1).unwrap().split("\r\n").next().unwrap().parse().unwrap();
    assert_eq!(retry, 10_800);
    h.clock.advance_secs(retry);
    assert_eq!(h.get("/lookup/AB12CD", "192.0.2.50", SHOP).await.0, 200);
    assert_eq!(h.spent(), 140_000);
}

/// A small MaxMind-format country database.
fn mmdb(networks: &[(&str, &str)]) -> Vec<u8> {
    use maxminddb_writer::{Database, metadata::IpVersion, paths::IpAddrWithMask};
    let mut db = Database::default();
    db.metadata.ip_version = IpVersion::V6;
    db.metadata.binary_format_major_version = 2;
    db.metadata.database_type = "keyward-test-Country".into();
    for (net, code) in networks {
        let (a, len) = net.split_once('/').unwrap();
        let (a, len): (std::net::Ipv4Addr, u8) = (a.parse().unwrap(), len.parse().unwrap());
        let data = db.insert_value(serde_json::json!({ "country": { "iso_code": code } })).unwrap();
        db.insert_node(IpAddrWithMask::new(std::net::IpAddr::V6(a.to_ipv6_compatible()), len + 96), data);
    }
    db.write_to(Vec::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_countries_are_served_and_a_reload_reads_a_new_database() {
    let db = std::env::temp_dir().join(format!("kw-fwd-geo-{}-{}.mmdb", std::process::id(), next_id()));
    let _rm = TempDir(db.clone());
    std::fs::write(&db, mmdb(&[("198.51.100.0/24", "GB"), ("203.0.113.0/24", "FR")])).unwrap();
    let access = format!("countries = [\"GB\"]\ngeo_db = \"{}\"", db.display());
    let h = Harness::start_with(&access, "").await;
    assert_eq!(h.get("/lookup/AB12CD", "198.51.100.7", SHOP).await.0, 200);
    for client in ["203.0.113.7", "192.0.2.7"] {
        let (status, _, body) = h.get("/lookup/AB12CD", client, SHOP).await;
        assert_eq!((status, problem_type(&body).as_str()), (403, "country-not-allowed"), "{client}");
    }
    assert_eq!(h.api.calls().len(), 1);
    // A new database file, picked up when the policy is rebuilt (reload).
    std::fs::write(&db, mmdb(&[("198.51.100.0/24", "GB"), ("203.0.113.0/24", "GB")])).unwrap();
    let path = h._dir.0.join("keyward.toml");
    let text = config(h.api.addr, &h._dir.0.join("key"), "")
        .replace("require_origin = true\n", &format!("require_origin = true\n{access}\n"));
    let (_c, p) = Loaded::parse(&path, &text).unwrap().with_key(&path).unwrap();
    h.fwd.reconfigure(p.unwrap());
    assert_eq!(h.get("/lookup/AB12CD", "203.0.113.7", SHOP).await.0, 200);
}

// ---- Connection bounds (issue 14) ----

/// A connection from `src` (a loopback address other than the trusted
/// 127.0.0.1, so that it is held to the per-address cap).
async fn connect_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((src, 0))).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether the server closes `s` within `within` (EOF or reset), reading
/// and discarding whatever it sends first.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all).await.is_ok()
}

/// Whether `f` holds within 5 s (polled every 10 ms).
async fn until(f: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

fn refused(h: &Harness, reason: &str) -> u64 {
    h.fwd.conns().refused().into_iter().find(|(r, _)| r.name() == reason).map_or(0, |(_, n)| n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_request_head_is_closed_at_the_head_timeout() {
    let h = Harness::start_listen("head_timeout = \"1s\"").await;
    // Silent; the first line of the HTTP/2 preface (stuck in hyper-util's
    // version sniff); the whole preface and SETTINGS but no request; half an
    // HTTP/1 head.
    let openers: [&[u8]; 4] = [
        b"",
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        b"GET /lookup/AB12CD HTTP/1.1\r\nHost: kw\r\n",
    ];
    let mut conns = Vec::new();
    for o in openers {
        let mut s = connect_from([127, 0, 0, 2], h.addr).await;
        s.write_all(o).await.unwrap();
        conns.push(s);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(5)).await, "connection {i} still open 5 s after a 1 s timeout");
    }
    assert_eq!(refused(&h, "head-timeout"), 4);
    assert!(until(|| h.fwd.conns().open(None).0 == 0).await, "every slot given back");
    // A visitor who does send a request is served.
    assert_eq!(h.get("/lookup/AB12CD", "198.51.100.1", SHOP).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_its_cap_and_visitors_are_served() {
    let h = Harness::start_listen("max_connections = 6\nmax_connections_per_ip = 4").await;
    let attacker = [127, 0, 0, 2];
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(attacker, h.addr).await);
    }
    // Wait until the forwarder has taken all four (accept is asynchronous).
    let key = Some(std::net::IpAddr::from(attacker));
    assert!(until(|| h.fwd.conns().open(key).1 == 4).await);
    // The fifth is closed at once, before it sends anything.
    let mut fifth = connect_from(attacker, h.addr).await;
    assert!(closed_within(&mut fifth, Duration::from_secs(5)).await, "a fifth connection was kept");
    assert_eq!(refused(&h, "max-connections-per-ip"), 1);
    // Another visitor is served while the attacker holds its cap.
    let mut v = connect_from([127, 0, 0, 3], h.addr).await;
    v.write_all(
        b"GET /lookup/AB12CD HTTP/1.1\r\nHost: kw\r\nOrigin: https://shop.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), v.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    // The total: two more idle connections fill it; the next is refused.
    let _a = connect_from([127, 0, 0, 4], h.addr).await;
    let _b = connect_from([127, 0, 0, 5], h.addr).await;
    let mut over = connect_from([127, 0, 0, 6], h.addr).await;
    assert!(closed_within(&mut over, Duration::from_secs(5)).await, "the total cap was not held");
    assert_eq!(refused(&h, "max-connections"), 1);
    // The attacker leaves: its places are free again.
    drop(held);
    drop(fifth);
    assert!(until(|| h.fwd.conns().open(key).1 == 0).await, "the attacker's places were not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_32_kib_is_refused_431() {
    let h = Harness::start("").await;
    let big = "a".repeat(40 << 10);
    let (status, _, _) =
        h.call(&format!("GET /lookup/AB12CD HTTP/1.1\r\nHost: kw\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(status, 431);
    // Just under the bound is still read.
    let ok = "a".repeat(24 << 10);
    let (status, _, _) = h
        .call(&format!(
            "GET /lookup/AB12CD HTTP/1.1\r\nHost: kw\r\nOrigin: https://shop.example\r\nX-Big: {ok}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(h.api.calls().len(), 1);
}

// ---- Request framing and Origin (issue 14) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_framing_is_400_and_an_oversized_chunked_body_413() {
    let h = Harness::start("").await;
    let head = "POST /geocode HTTP/1.1\r\nHost: kw\r\nOrigin: https://shop.example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let (status, _, body) = h.call(&format!("{head}zz\r\nhello\r\n0\r\n\r\n")).await;
    assert_eq!((status, problem_type(&body).as_str()), (400, "bad-request"), "{body}");
    let big = "x".repeat(2000);
    let (status, _, body) = h.call(&format!("{head}{:x}\r\n{big}\r\n0\r\n\r\n", big.len())).await;
    assert_eq!((status, problem_type(&body).as_str()), (413, "body-too-large"), "{body}");
    assert!(h.api.calls().is_empty(), "a refusal reached the upstream");
    assert_eq!(h.spent(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_one_origin_is_refused_403() {
    let h = Harness::start("").await;
    for origins in [
        "Origin: https://shop.example https://evil.example\r\n",
        "Origin: https://shop.example\r\nOrigin: https://evil.example\r\n",
        "Origin: https://shop.example\r\nOrigin: https://shop.example\r\n",
    ] {
        let (status, _, body) =
            h.call(&format!("GET /lookup/AB12CD HTTP/1.1\r\nHost: kw\r\n{origins}Connection: close\r\n\r\n")).await;
        assert_eq!((status, problem_type(&body).as_str()), (403, "origin-not-allowed"), "{origins}");
    }
    assert!(h.api.calls().is_empty());
}
