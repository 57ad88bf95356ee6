//! The shared store against a real `redis-server` (Debian's package, which
//! `cargo xtask setup` installs), started on a free loopback port with no
//! persistence and killed by pid when the test ends.

use std::{
    net::IpAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use proxy_common::bucket::Params;

use super::{
    Store, StoreConfig, StoreError,
    lease::{Counted, Fleet, LeasePolicy, Taken, TokenCall},
};
use crate::proxy::{
    day::Schedule,
    limit::{Limiter, Limits, Refusal},
};

/// Replication straight from memory to memory, at once: nothing is written
/// to disk and a replica is in sync within moments.
const REPLICATION: [&str; 4] = ["--repl-diskless-sync-delay", "0", "--repl-diskless-load", "on-empty-db"];

/// A `redis-server` of this test's own, stopped on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::start_with(|port| {
            let mut c = Command::new("redis-server");
            c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
            c.args(REPLICATION).arg("--dir").arg(std::env::temp_dir());
            c
        })
    }

    /// A server started by `command` for a free loopback port.
    fn start_with(command: impl Fn(u16) -> Command) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = command(port)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's package; `cargo xtask setup` installs it)");
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, sig).unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn fleet(r: &RedisServer, site: &str, standby: u64) -> Fleet {
    let cfg = StoreConfig { url: r.url(), sentinel: None, site: site.into(), timeout: Duration::from_millis(50) };
    let f = Fleet::new(Store::connect(&cfg).await.unwrap(), LeasePolicy { max_lease: 100_000, standby });
    f.init().await.unwrap();
    f
}

fn limiter(budget: u64, per_ip_daily: u32, now: i64) -> Limiter {
    let limits = Limits {
        rate: Params::new(1000, 1000),
        burst: 1000,
        per_ip_daily,
        budget,
        alert_at: vec![],
        dry_run: false,
        prefix: None,
        pace: None,
    };
    let l = Limiter::new(limits, Schedule::new("00:00", "UTC").unwrap(), now, None);
    l.share_budget(now);
    l
}

fn now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0xC000_0200 + i))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hosts_spend_one_budget_to_the_micro_unit() {
    let r = RedisServer::start();
    let t = now();
    let budget = 1_000_000;
    let hosts: Vec<Arc<(Fleet, Limiter)>> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(Arc::new((fleet(&r, "race", 0).await, limiter(budget, 1_000_000, t))));
        }
        v
    };
    // Nine workers over three hosts, random costs, a third not billable.
    let mut tasks = Vec::new();
    for w in 0..9u32 {
        let h = hosts[w as usize % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut billed = 0u64;
            for i in 0..400u32 {
                let cost = [10_000, 30_000, 70_000][((i * 7 + w) % 3) as usize];
                match h.0.reserve(&h.1, ip(w), cost, t, false).await {
                    Ok(res) if (i + w) % 3 == 0 => {
                        h.1.refund(res);
                    }
                    Ok(res) => {
                        billed += cost;
                        h.1.commit(res);
                    }
                    Err(Refusal::Budget { .. }) => {}
                    Err(e) => panic!("{e:?}"),
                }
            }
            billed
        }));
    }
    let mut billed = 0;
    for t in tasks {
        billed += t.await.unwrap();
    }
    let spent: u64 = hosts.iter().map(|h| h.1.today(t).0.spent).sum();
    assert_eq!(billed, spent);
    assert!(spent <= budget, "overshoot: {spent} > {budget}");
    // Leases handed back, the last micro-units are usable from one host.
    for h in &hosts {
        let (day, unused) = h.1.release_lease().unwrap();
        h.0.hand_back(day, unused).await.unwrap();
    }
    let h = &hosts[0];
    let mut more = 0;
    while let Ok(res) = h.0.reserve(&h.1, ip(99), 1, t, false).await {
        h.1.commit(res);
        more += 1;
        assert!(more <= budget, "unbounded");
    }
    assert_eq!(spent + more, budget, "the whole budget and not a micro-unit more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_on_three_hosts_gets_exactly_its_cap() {
    let r = RedisServer::start();
    let t = now();
    let mut fleets = Vec::new();
    for _ in 0..3 {
        fleets.push(Arc::new(fleet(&r, "cap", 0).await));
    }
    let day = Schedule::new("00:00", "UTC").unwrap().window(t);
    let mut tasks = Vec::new();
    for i in 0..30usize {
        let f = fleets[i % 3].clone();
        tasks.push(tokio::spawn(async move { f.take(&counted(day.id(), day.end, ip(1), 7, None)).await.unwrap() }));
    }
    let mut yes = 0;
    for t in tasks {
        yes += usize::from(t.await.unwrap() == Taken::Yes);
    }
    assert_eq!(yes, 7);
    // A non-billable answer gives one back; the network cap is shared too.
    fleets[1].untake(&counted(day.id(), day.end, ip(1), 7, None)).await.unwrap();
    assert_eq!(fleets[2].take(&counted(day.id(), day.end, ip(1), 7, None)).await.unwrap(), Taken::Yes);
    assert_eq!(fleets[0].take(&counted(day.id(), day.end, ip(1), 7, None)).await.unwrap(), Taken::AddressOver);
    let net = "192.0.2.0/24".parse().unwrap();
    assert_eq!(fleets[0].take(&counted(day.id(), day.end, ip(2), 7, Some((net, 1)))).await.unwrap(), Taken::Yes);
    assert_eq!(
        fleets[1].take(&counted(day.id(), day.end, ip(3), 7, Some((net, 1)))).await.unwrap(),
        Taken::NetworkOver
    );
}

fn counted(day: u64, boundary: i64, ip: IpAddr, cap: u32, network: Option<(crate::units::Cidr, u32)>) -> Counted {
    Counted { day, boundary, ip, cap, network, exempt: false, token: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_token_and_a_solution_are_spent_once_across_hosts() {
    let r = RedisServer::start();
    let t = now();
    let (a, b) = (fleet(&r, "tok", 0).await, fleet(&r, "tok", 0).await);
    let day = Schedule::new("00:00", "UTC").unwrap().window(t);
    let token = TokenCall { nonce: "n1".into(), max_calls: 3, expires_unix: u64::try_from(t).unwrap() + 600 };
    let call = |i: u32, exempt: bool| Counted {
        token: Some(token.clone()),
        exempt,
        ..counted(day.id(), day.end, ip(i), 100, None)
    };
    // Three calls of one token, from two addresses on two hosts (one allow-listed).
    assert_eq!(a.take(&call(1, false)).await.unwrap(), Taken::Yes);
    assert_eq!(b.take(&call(2, false)).await.unwrap(), Taken::Yes);
    assert_eq!(b.take(&call(2, true)).await.unwrap(), Taken::Yes);
    assert_eq!(a.take(&call(1, false)).await.unwrap(), Taken::TokenUsed);
    assert_eq!(b.take(&call(3, true)).await.unwrap(), Taken::TokenUsed);
    // A refused take took nothing: address 1 has one call counted.
    let client = redis::Client::open(r.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let n: i64 =
        redis::cmd("GET").arg(format!("{{kw:tok}}:ip:{}:{}", day.id(), ip(1))).query_async(&mut c).await.unwrap();
    assert_eq!(n, 1);
    // A non-billable answer gives the token's call back.
    b.untake(&call(2, true)).await.unwrap();
    assert_eq!(a.take(&call(1, false)).await.unwrap(), Taken::Yes);
    // A challenge's solution: once, whichever host sees it first.
    let exp = u64::try_from(t).unwrap() + 120;
    let (x, y) = tokio::join!(a.spend_once("c1", exp), b.spend_once("c1", exp));
    assert_eq!(u8::from(x.unwrap()) + u8::from(y.unwrap()), 1);
    assert!(!a.spend_once("c1", exp).await.unwrap());
    assert!(b.spend_once("c2", exp).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_after_the_day_and_redis_clock_picks_the_day() {
    let r = RedisServer::start();
    let t = now();
    let f = fleet(&r, "ttl", 0).await;
    // The host's boundary already passed by Redis's clock: the grant is for
    // tomorrow, which a limiter still in today refuses (it is handed back).
    let l = limiter(1_000_000, 10, t);
    let s = l.lease(t).unwrap();
    let past = crate::proxy::limit::LeaseState { boundary: t - 1, ..s };
    let got = f.top_up(10_000, 10_000, 1_000_000, || past, |d, a| l.add_lease(d, a)).await;
    assert!(matches!(got, Err(StoreError::NextDay)), "{got:?}");
    let got = f.top_up(10_000, 10_000, 1_000_000, || s, |d, a| l.add_lease(d, a)).await.unwrap();
    assert!(got >= 10_000);
    let day = Schedule::new("00:00", "UTC").unwrap().window(t);
    f.take(&counted(day.id(), day.end, ip(1), 5, None)).await.unwrap();
    let client = redis::Client::open(r.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("{kw:ttl}:*").query_async(&mut c).await.unwrap();
    // The store's marker lives as long as the store (a restart loses it).
    keys.retain(|k| k != "{kw:ttl}:alive");
    assert_eq!(keys.len(), 3, "{keys:?}");
    for k in keys {
        let ttl: i64 = redis::cmd("TTL").arg(&k).query_async(&mut c).await.unwrap();
        assert!(ttl > 0 && ttl <= 2 * 86_400, "{k}: {ttl}");
        if k.contains(&format!(":{}:", s.tomorrow)) {
            let v: i64 = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
            assert_eq!(v, 0, "tomorrow's grant was handed back");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_costs_one_timeout_then_the_breaker_and_spend_stays_within_the_lease() {
    let r = RedisServer::start();
    let t = now();
    let f = fleet(&r, "pause", 60_000).await;
    let l = limiter(1_000_000, 1000, t);
    // Healthy: the first lease includes the standby.
    let res = f.reserve(&l, ip(1), 10_000, t, false).await.unwrap();
    l.commit(res);
    let leased = l.lease(t).unwrap().leased;
    assert!(leased >= 10_000 + 60_000, "{leased}");
    r.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    for _ in 0..200 {
        let started = Instant::now();
        match f.reserve(&l, ip(1), 10_000, t, false).await {
            Ok(res) => {
                l.commit(res);
            }
            Err(Refusal::Unleased) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
        slowest = slowest.max(started.elapsed());
    }
    assert!(refused > 0);
    assert_eq!(l.today(t).0.spent, leased, "spent what was leased, standby included, and no more");
    // A call is bounded by the timeout (50 ms) plus scheduling slack.
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    assert!(matches!(
        f.take(&counted(1, t + 10, ip(1), 5, None)).await,
        Err(StoreError::Open | StoreError::Timeout(_))
    ));
    assert!(!f.store.is_up());
    r.signal(nix::sys::signal::Signal::SIGCONT);
    // Recovery: after the breaker's second, leases are granted again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match f.reserve(&l, ip(1), 10_000, t, false).await {
            Ok(res) => {
                l.commit(res);
                break;
            }
            Err(Refusal::Unleased) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(f.store.is_up());
}

#[tokio::test]
async fn an_unreachable_store_is_one_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = StoreConfig {
        url: format!("redis://127.0.0.1:{port}"),
        sentinel: None,
        site: "x".into(),
        timeout: Duration::from_millis(50),
    };
    let e = Store::connect(&cfg).await.err().unwrap().to_string();
    assert!(!e.contains('\n'), "{e}");
    let r = RedisServer::start();
    let cfg = StoreConfig { url: format!("redis://:wrong@127.0.0.1:{}", r.port), ..cfg };
    let e = Store::connect(&cfg).await.err().unwrap().to_string();
    assert!(e.to_lowercase().contains("auth") || e.contains("password"), "{e}");
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(super::redact("redis://:s3cret@10.0.0.5:6379/0"), "redis://:***@10.0.0.5:6379/0");
    assert_eq!(super::redact("rediss://kw:s3cret@h:6380"), "rediss://kw:***@h:6380");
    assert_eq!(super::redact("redis://h:6379"), "redis://h:6379");
}

/// A sentinel config file of the test's own, removed on drop.
struct SentinelConf(std::path::PathBuf);

impl Drop for SentinelConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_names_the_master_and_a_failover_is_followed() {
    let a = RedisServer::start();
    let b = RedisServer::start_with(|port| {
        let mut c = Command::new("redis-server");
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        c.args(REPLICATION).arg("--dir").arg(std::env::temp_dir());
        c.args(["--replicaof", "127.0.0.1", &a.port.to_string()]);
        c
    });
    let conf = SentinelConf(std::env::temp_dir().join(format!("kw-sentinel-{}-{}.conf", std::process::id(), a.port)));
    std::fs::write(
        &conf.0,
        format!("bind 127.0.0.1\nsentinel monitor m 127.0.0.1 {} 1\nsentinel down-after-milliseconds m 1000\n", a.port),
    )
    .unwrap();
    let path = conf.0.clone();
    let s = RedisServer::start_with(move |port| {
        let mut c = Command::new("redis-server");
        c.arg(&path).args(["--sentinel", "--port", &port.to_string()]);
        c
    });
    let cfg = StoreConfig {
        url: "sentinel".into(),
        sentinel: Some((vec![s.url().replace("/0", "")], "m".into())),
        site: "sen".into(),
        timeout: Duration::from_millis(50),
    };
    let f = Fleet::new(Store::connect(&cfg).await.unwrap(), LeasePolicy { max_lease: 100_000, standby: 0 });
    f.init().await.unwrap();
    let epoch = f.epoch().await.unwrap();
    assert!(epoch.is_some());
    let day = Schedule::new("00:00", "UTC").unwrap().window(now());
    assert_eq!(f.take(&counted(day.id(), day.end, ip(1), 100, None)).await.unwrap(), Taken::Yes);
    // The replica has caught up before the failover (none of it is lost).
    let sc = redis::Client::open(s.url().replace("/0", "")).unwrap();
    let mut sconn = sc.get_multiplexed_async_connection().await.unwrap();
    let bc = redis::Client::open(b.url()).unwrap();
    let mut bconn = bc.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{{kw:sen}}:ip:{}:{}", day.id(), ip(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis::cmd("GET").arg(&key).query_async::<Option<i64>>(&mut bconn).await.unwrap() != Some(1) {
        assert!(Instant::now() < deadline, "the replica did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The sentinel knows the replica before it can fail over to it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r: redis::RedisResult<String> =
            redis::cmd("SENTINEL").arg("FAILOVER").arg("m").query_async(&mut sconn).await;
        if r.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no failover: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The store follows the new master (the breaker opens on the old one's refusals, then asks again).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Taken::Yes) = f.take(&counted(day.id(), day.end, ip(1), 100, None)).await {
            // A failover closes the replica's connections: ask on a new one.
            let mut c = bc.get_multiplexed_async_connection().await.unwrap();
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await.unwrap();
            if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the store did not follow the failover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = bc.get_multiplexed_async_connection().await.unwrap();
    let n: i64 = redis::cmd("GET").arg(&key).query_async(&mut c).await.unwrap();
    assert!(n >= 2, "{n}");
    assert_eq!(f.epoch().await.unwrap(), epoch, "a failover is not a restart");
}
