//! Tier 3: the forwarder against nginx configured the same way, both pinned
//! to CPU1 in a namespace of their own, in front of the same stand-in
//! upstream (nginx `return 200`, pinned to CPU0). Per round and path:
//! closed-loop throughput with `wrk` (pinned to CPU0) and CPU1 µs per
//! request (and keyward's own user + system CPU per request, which other
//! work on a shared CPU1 does not inflate), then open-loop latency at a fixed rate measured here with
//! coordinated omission corrected (each request timed from when it was
//! due). Paths: pass, per-IP 429, exhausted budget (keyward's 503; nginx
//! serves a static 503, its nearest equivalent), pass over an HTTPS
//! upstream, and pass with `[store] durability = "lose-up-to-1s"` (the
//! periodic flush instead of every reservation on disk before its call
//! leaves, the default: the pair shows what durability costs per call),
//! and pass with a shared store (`[store] redis_url` on a local
//! `redis-server` over a Unix socket: the budget leased, the per-IP daily
//! count taken in Redis on every billable call), whose Redis round trips
//! per billable call are counted from the daemon's status.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use super::{cpu1_busy_ns, fmt, ratios, stats, summary, table};
use crate::{daemon, netns};

const UP: u16 = 18080;
const UP_TLS: u16 = 18081;
const KW: u16 = 18443;
const NGX: u16 = 18444;
const KEY: &str = "bench-key-0123456789";

/// A process we started, stopped by pid on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = crate::wait_for(Duration::from_secs(5), || self.0.try_wait().ok().flatten());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_ns(ns: &str, cpu: u32, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).args(["taskset", "-c", &cpu.to_string()]).args(args);
    c
}

fn nginx_conf(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(format!("{name}.conf"));
    let text = format!(
        "worker_processes 1;\ndaemon off;\npid {dir}/{name}.pid;\nerror_log {dir}/{name}.err crit;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir}/{name}-body;\n  proxy_temp_path {dir}/{name}-proxy;\n{body}\n}}\n",
        dir = dir.display()
    );
    std::fs::write(&p, text).expect("nginx config");
    p
}

fn wait_port(ns: &str, port: u16) {
    let ns = ns.to_owned();
    let ok = crate::wait_for(Duration::from_secs(20), || {
        let ns = ns.clone();
        netns::in_ns(&ns, move || std::net::TcpStream::connect(("127.0.0.1", port)).ok()).map(|_| ())
    });
    assert!(ok.is_some(), "nothing listening on 127.0.0.1:{port} in {ns}");
}

/// wrk for `secs` seconds from CPU0; returns (requests, non-2xx/3xx).
fn wrk(ns: &str, url: &str, secs: u32) -> (u64, u64) {
    let out =
        in_ns(ns, 0, &["wrk", "-t1", "-c50", &format!("-d{secs}s"), "-H", "Origin: https://www.example.com", url])
            .output()
            .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let non2xx = text
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    (requests, non2xx)
}

/// Open-loop latency: `rate` requests/s for `secs` over up to 32 keep-alive
/// connections, each timed from its due instant. Returns (p50, p99) in µs.
fn open_loop(ns: &str, port: u16, path: &str, rate: u32, secs: u32) -> (f64, f64) {
    let ns = ns.to_owned();
    let path = path.to_owned();
    netns::in_ns(&ns, move || {
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(0);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            use std::sync::Arc;
            let conns = Arc::new(tokio::sync::Mutex::new(Vec::<tokio::net::TcpStream>::new()));
            let total = rate * secs;
            let start = tokio::time::Instant::now() + Duration::from_millis(50);
            let period = Duration::from_secs(1) / rate;
            let mut tasks = Vec::with_capacity(total as usize);
            for i in 0..total {
                let due = start + period * i;
                tokio::time::sleep_until(due).await;
                let conns = conns.clone();
                let req = format!("GET {path} HTTP/1.1\r\nHost: b\r\nOrigin: https://www.example.com\r\n\r\n");
                tasks.push(tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let mut s = match conns.lock().await.pop() {
                        Some(s) => s,
                        None => tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?,
                    };
                    s.write_all(req.as_bytes()).await.ok()?;
                    // Read one response: headers, then Content-Length bytes.
                    let mut buf = Vec::with_capacity(1024);
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = s.read(&mut chunk).await.ok()?;
                        if n == 0 {
                            return None;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    let took = tokio::time::Instant::now() - due;
                    conns.lock().await.push(s);
                    Some(took.as_secs_f64() * 1e6)
                }));
            }
            let mut lat: Vec<f64> = Vec::new();
            for t in tasks {
                if let Ok(Some(v)) = t.await {
                    lat.push(v);
                }
            }
            lat.sort_by(|a, b| a.total_cmp(b));
            let q = |p: f64| {
                lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
            };
            (q(0.50), q(0.99))
        })
    })
}

/// Run tier 3; returns JSON and markdown.
///
/// Long on purpose: one measurement script read top to bottom (topology,
/// peers, rounds interleaved, tables); splitting it would scatter the order
/// of the rounds, which is what makes the ratios fair.
pub fn run(rounds: usize, secs: u32, rate: u32) -> (Value, String) {
    let t = netns::Topology::new();
    let ns = t.server_ns.clone();
    let dir = std::env::temp_dir().join(format!("keyward-bench-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let _cleanup = DirGuard(dir.clone());

    // Certificates for the HTTPS upstream.
    let (cert_pem, key_pem, ca_pem) = certs();
    std::fs::write(dir.join("up.crt"), &cert_pem).unwrap();
    std::fs::write(dir.join("up.key"), &key_pem).unwrap();
    std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();

    let up = nginx_conf(
        &dir,
        "upstream",
        &format!(
            "  server {{ listen 127.0.0.1:{UP}; location / {{ default_type application/json; return 200 '{{\"ok\":true}}'; }} }}\n  server {{ listen 127.0.0.1:{UP_TLS} ssl; ssl_certificate {d}/up.crt; ssl_certificate_key {d}/up.key; location / {{ default_type application/json; return 200 '{{\"ok\":true}}'; }} }}",
            d = dir.display()
        ),
    );
    let _up = Proc(in_ns(&ns, 0, &["nginx", "-c"]).arg(&up).stderr(Stdio::null()).spawn().expect("nginx upstream"));
    wait_port(&ns, UP);

    // nginx as the equivalent proxy: per-IP limit_req, key injected, keep-alive upstream, quiet logs.
    let ngx = nginx_conf(
        &dir,
        "proxy",
        &format!(
            "  limit_req_zone $binary_remote_addr zone=ip:10m rate=100000r/s;\n  limit_req_zone $binary_remote_addr zone=tight:10m rate=100r/s;\n  limit_req_status 429;\n  limit_req_log_level warn;\n  upstream up {{ server 127.0.0.1:{UP}; keepalive 64; }}\n  upstream uptls {{ server 127.0.0.1:{UP_TLS}; keepalive 64; }}\n  server {{ listen 127.0.0.1:{NGX};\n    proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Api-Key {KEY};\n    location /postcodes/ {{ limit_req zone=ip burst=100000 nodelay; proxy_pass http://up; }}\n    location /tight/ {{ limit_req zone=tight burst=10 nodelay; proxy_pass http://up/postcodes/; }}\n    location /broke/ {{ return 503; }}\n    location /tls/ {{ limit_req zone=ip burst=100000 nodelay; proxy_ssl_trusted_certificate {d}/ca.crt; proxy_ssl_verify on; proxy_ssl_name localhost; proxy_ssl_session_reuse on; proxy_pass https://uptls/postcodes/; }}\n  }}",
            d = dir.display()
        ),
    );
    let _ngx = Proc(in_ns(&ns, 1, &["nginx", "-c"]).arg(&ngx).stderr(Stdio::null()).spawn().expect("nginx proxy"));
    wait_port(&ns, NGX);

    // keyward for one path: started pinned to CPU1, measured, stopped.
    let redis = crate::redis::RedisServer::start();
    let start_kw = |limits: &str, base: &str, extra_up: &str, store: &str| -> (Proc, daemon::Daemon) {
        let rest = format!(
            "metrics = \"\"\n\n[listen]\naddr = \"127.0.0.1:{KW}\"\n\n[upstream]\nbase_url = \"{base}\"\ntimeout = \"5s\"\nkey_env = \"KEYWARD_TEST_KEY\"\ninject = {{ header = \"X-Api-Key\", value = \"{{key}}\" }}\n{extra_up}\n\n[[route]]\nmethod = \"GET\"\npath = \"/postcodes/{{p}}\"\nupstream_path = \"/postcodes/{{p}}\"\ncost = 0.0001\n\n[access]\nallowed_origins = [\"https://www.example.com\"]\nrequire_origin = true\n\n[limits]\nper_ip_daily = 4000000000\ndeny_on_daily_cap = false\n{limits}\n"
        );
        let d = daemon::Daemon::prepare_with(&t, "rate_pps = 100000000\nburst = 100000000", &rest);
        let text = std::fs::read_to_string(&d.config).expect("bench config");
        let text = text.replacen("[store]\n", &format!("[store]\n{store}"), 1);
        std::fs::write(&d.config, text).expect("bench config");
        let child = in_ns(
            &t.server_ns,
            1,
            &[daemon::bin().to_str().unwrap_or("keyward"), "run", "-c", d.config.to_str().unwrap_or("")],
        )
        .env("KEYWARD_TEST_KEY", KEY)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("keyward");
        wait_port(&t.server_ns, KW);
        (Proc(child), d)
    };
    let plain = format!("http://127.0.0.1:{UP}");
    let tls = format!("https://localhost:{UP_TLS}");
    let ca = format!("ca_file = \"{}\"", dir.join("ca.crt").display());
    let open = "per_ip_rate = 4000000\nper_ip_burst = 4000000\ndaily = 1000000.0";
    let durable = |d: &str| format!("durability = \"{d}\"\n");
    let shared = format!("{}redis_url = \"{}\"\nsite = \"bench\"\n", durable("immediate"), redis.url());
    // (name, keyward limits, keyward base, keyward extra, nginx path, measure direct too, [store] lines)
    let paths: [(&str, String, String, String, &str, bool, String); 6] = [
        ("pass", open.into(), plain.clone(), String::new(), "/postcodes/AB1", true, durable("immediate")),
        (
            "per-IP 429",
            "per_ip_rate = 100\nper_ip_burst = 10\ndaily = 1000000.0".into(),
            plain.clone(),
            String::new(),
            "/tight/AB1",
            false,
            durable("immediate"),
        ),
        (
            "budget exhausted (503)",
            "per_ip_rate = 4000000\nper_ip_burst = 4000000\ndaily = 0.0".into(),
            plain.clone(),
            String::new(),
            "/broke/AB1",
            false,
            durable("immediate"),
        ),
        ("pass, HTTPS upstream", open.into(), tls, ca, "/tls/AB1", false, durable("immediate")),
        (
            "pass, durability lose-up-to-1s",
            open.into(),
            plain.clone(),
            String::new(),
            "/postcodes/AB1",
            false,
            durable("lose-up-to-1s"),
        ),
        ("pass, shared store (Redis)", open.into(), plain, String::new(), "/postcodes/AB1", false, shared),
    ];
    let mut us: Vec<[Vec<f64>; 3]> = (0..paths.len()).map(|_| [Vec::new(), Vec::new(), Vec::new()]).collect();
    let mut rps: Vec<[Vec<f64>; 3]> = (0..paths.len()).map(|_| [Vec::new(), Vec::new(), Vec::new()]).collect();
    let mut lat: Vec<[Vec<(f64, f64)>; 3]> = (0..paths.len()).map(|_| [Vec::new(), Vec::new(), Vec::new()]).collect();
    // Also the CPU of process `pid` per request when given.
    let measure = |port: u16, path: &str, pid: Option<u32>| {
        let url = format!("http://127.0.0.1:{port}{path}");
        let o0 = pid.map(proc_cpu_ns);
        let b0 = cpu1_busy_ns();
        let (reqs, _bad) = wrk(&ns, &url, secs);
        let b1 = cpu1_busy_ns();
        let per_req = |ns: u64| ns as f64 / 1e3 / reqs.max(1) as f64;
        let own = pid.map(proc_cpu_ns).zip(o0).map_or(f64::NAN, |(o1, o0)| per_req(o1.saturating_sub(o0)));
        let cpu = per_req(b1 - b0);
        ((cpu, reqs as f64 / f64::from(secs), open_loop(&ns, port, path, rate, secs.min(3))), own)
    };
    let mut own: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    // Shared store: Redis round trips per billable call, per round.
    let mut trips: Vec<f64> = Vec::new();
    let mut record = |i: usize, j: usize, m: (f64, f64, (f64, f64))| {
        us[i][j].push(m.0);
        rps[i][j].push(m.1);
        lat[i][j].push(m.2);
    };
    for round in 0..rounds {
        for (i, (name, limits, base, extra, ngx_path, direct, store)) in paths.iter().enumerate() {
            let (k, k_own) = {
                let kw = start_kw(limits, base, extra, store);
                let m = measure(KW, "/postcodes/AB1", Some(kw.0.0.id()));
                if let Some(st) = kw.1.status().forwarder.filter(|f| f.store.is_some()) {
                    // Every measured call is billable at 0.0001 (100 micro-units).
                    let calls = (st.spent_micros / 100).max(1) as f64;
                    trips.push(st.store.map_or(0, |s| s.round_trips) as f64 / calls);
                }
                m
            };
            own[i].push(k_own);
            let (n, _) = measure(NGX, ngx_path, None);
            eprintln!(
                "   round {} {name:<24} keyward {:>7.0} req/s {:>5.1} µs/req ({k_own:.1} own) · nginx {:>7.0} req/s {:>5.1} µs/req",
                round + 1,
                k.1,
                k.0,
                n.1,
                n.0
            );
            record(i, 0, k);
            record(i, 1, n);
            if *direct {
                record(i, 2, measure(UP, "/postcodes/AB1", None).0);
            }
        }
    }
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let direct_p = &lat[0][2];
    for (i, (name, ..)) in paths.iter().enumerate() {
        let r_us = ratios(&us[i][0], &us[i][1]);
        let add = |v: &Vec<(f64, f64)>, pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
            v.iter().zip(direct_p).map(|(a, d)| pick(a) - pick(d)).collect()
        };
        let (k50, k99, n50, n99) =
            (add(&lat[i][0], |x| x.0), add(&lat[i][0], |x| x.1), add(&lat[i][1], |x| x.0), add(&lat[i][1], |x| x.1));
        rows.push(vec![
            (*name).to_owned(),
            fmt(&rps[i][0], 0),
            fmt(&us[i][0], 1),
            fmt(&own[i], 1),
            fmt(&rps[i][1], 0),
            fmt(&us[i][1], 1),
            fmt(&r_us, 2),
            format!("{} / {}", fmt(&k50, 0), fmt(&k99, 0)),
            format!("{} / {}", fmt(&n50, 0), fmt(&n99, 0)),
        ]);
        out.push(json!({
            "path": name,
            "keyward": { "rps": summary(&rps[i][0]), "cpu_us_per_req": summary(&us[i][0]), "own_cpu_us_per_req": summary(&own[i]), "added_p50_us": summary(&k50), "added_p99_us": summary(&k99) },
            "nginx": { "rps": summary(&rps[i][1]), "cpu_us_per_req": summary(&us[i][1]), "added_p50_us": summary(&n50), "added_p99_us": summary(&n99) },
            "keyward_over_nginx_cpu_per_req": summary(&r_us),
        }));
    }
    let direct_rps = stats(&rps[0][2]).0;
    let shared_i = paths.len() - 1;
    let over_embedded = |pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        lat[shared_i][0].iter().zip(&lat[0][0]).map(|(s, e)| pick(s) - pick(e)).collect()
    };
    let (s50, s99) = (over_embedded(|x| x.0), over_embedded(|x| x.1));
    let md = format!(
        "{}\nDirect to the upstream: {direct_rps:.0} req/s; open loop at {rate} req/s for the latency columns (µs added over direct, p50 / p99).\nShared store against the embedded store (same run): {} Redis round trips per billable call; p50 / p99 added {} / {} µs.\n",
        table(
            &[
                "path",
                "keyward req/s",
                "keyward CPU1 µs/req",
                "keyward own µs/req",
                "nginx req/s",
                "nginx CPU1 µs/req",
                "keyward ÷ nginx µs/req",
                "keyward added p50 / p99 µs",
                "nginx added p50 / p99 µs"
            ],
            &rows
        ),
        fmt(&trips, 2),
        fmt(&s50, 0),
        fmt(&s99, 0)
    );
    let shared_store = json!({ "round_trips_per_billable_call": summary(&trips), "added_p50_us_over_embedded": summary(&s50), "added_p99_us_over_embedded": summary(&s99) });
    (
        json!({ "rounds": rounds, "seconds": secs, "open_loop_rate": rate, "paths": out, "direct_rps": summary(&rps[0][2]), "shared_store": shared_store }),
        md,
    )
}

/// User + system CPU of process `pid` (all its threads) so far, in ns
/// (USER_HZ = 100).
fn proc_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (in parentheses, may hold spaces): state is
    // field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) * 10_000_000
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (certificate, key, CA) PEMs for `localhost`.
fn certs() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let key = KeyPair::generate().expect("key");
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let cert =
        CertificateParams::new(vec!["localhost".to_owned()]).expect("params").signed_by(&key, &issuer).expect("cert");
    (cert.pem(), key.serialize_pem(), ca_cert.pem())
}
