//! Tier 3: the forwarder against nginx and HAProxy configured the same way, all pinned
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
const HAP: u16 = 18445;
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

/// Run tier 3; returns JSON, markdown and, with `profile_dir` (scratch
/// space for perf's data), the profile of each keyward path.
///
/// Long on purpose: one measurement script read top to bottom (topology,
/// peers, rounds interleaved, tables); splitting it would scatter the order
/// of the rounds, which is what makes the ratios fair.
pub fn run(rounds: usize, secs: u32, rate: u32, profile_dir: Option<&Path>) -> (Value, String, Option<String>) {
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
    let hap_conf = haproxy_conf(&dir);
    let _hap =
        Proc(in_ns(&ns, 1, &["haproxy", "-db", "-f"]).arg(&hap_conf).stderr(Stdio::null()).spawn().expect("haproxy"));
    wait_port(&ns, HAP);

    // Columns: keyward, nginx, HAProxy, direct to the upstream.
    let cols = || -> [Vec<f64>; 4] { Default::default() };
    let mut us: Vec<[Vec<f64>; 4]> = (0..paths.len()).map(|_| cols()).collect();
    let mut rps: Vec<[Vec<f64>; 4]> = (0..paths.len()).map(|_| cols()).collect();
    let mut bad: Vec<[Vec<f64>; 4]> = (0..paths.len()).map(|_| cols()).collect();
    let mut lat: Vec<[Vec<(f64, f64)>; 4]> = (0..paths.len()).map(|_| Default::default()).collect();
    // Also the CPU of process `pid` per request when given.
    let measure = |port: u16, path: &str, pid: Option<u32>| {
        let url = format!("http://127.0.0.1:{port}{path}");
        let o0 = pid.map(proc_cpu_ns);
        let b0 = cpu1_busy_ns();
        let (reqs, non2xx) = wrk(&ns, &url, secs);
        let b1 = cpu1_busy_ns();
        let per_req = |ns: u64| ns as f64 / 1e3 / reqs.max(1) as f64;
        let own = pid.map(proc_cpu_ns).zip(o0).map_or(f64::NAN, |(o1, o0)| per_req(o1.saturating_sub(o0)));
        let cpu = per_req(b1 - b0);
        let m = Measured {
            cpu,
            rps: reqs as f64 / f64::from(secs),
            non2xx: non2xx as f64 / reqs.max(1) as f64,
            lat: open_loop(&ns, port, path, rate, secs.min(3)),
        };
        (m, own)
    };
    // Each proxy's own CPU (its processes' user + system time) per request:
    // unlike CPU1's busy time, other work on a shared CPU1 does not inflate it.
    let mut own: Vec<[Vec<f64>; 3]> = (0..paths.len()).map(|_| Default::default()).collect();
    let (ngx_pid, hap_pid) = (_ngx.0.id(), _hap.0.id());
    // Shared store: Redis round trips per billable call, per round.
    let mut trips: Vec<f64> = Vec::new();
    let mut record = |i: usize, j: usize, m: Measured| {
        us[i][j].push(m.cpu);
        rps[i][j].push(m.rps);
        bad[i][j].push(m.non2xx);
        lat[i][j].push(m.lat);
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
            let (n, n_own) = measure(NGX, ngx_path, Some(ngx_pid));
            let (h, h_own) = measure(HAP, ngx_path, Some(hap_pid));
            for (j, o) in [k_own, n_own, h_own].into_iter().enumerate() {
                own[i][j].push(o);
            }
            eprintln!(
                "   round {} {name:<24} keyward {:>7.0} req/s {:>5.1} µs/req ({k_own:.1} own) · nginx {:>7.0} req/s {:>5.1} µs/req ({n_own:.1} own) · haproxy {:>7.0} req/s {:>5.1} µs/req ({h_own:.1} own)",
                round + 1,
                k.rps,
                k.cpu,
                n.rps,
                n.cpu,
                h.rps,
                h.cpu
            );
            record(i, 0, k);
            record(i, 1, n);
            record(i, 2, h);
            if *direct {
                record(i, 3, measure(UP, "/postcodes/AB1", None).0);
            }
        }
    }
    let profiles = profile_dir.map(|pd| {
        let probes = super::profile::add_probes();
        let mut text = String::new();
        let mut sys_rows = Vec::new();
        for (name, limits, base, extra, ngx_path, _, durability) in paths.iter() {
            let kw = start_kw(limits, base, extra, durability);
            let url = format!("http://127.0.0.1:{KW}/postcodes/AB1");
            text.push_str(&super::profile::around(pd, name, kw.0.0.id(), probes, || wrk(&ns, &url, secs.max(3)).0));
            let peers = [
                ("keyward", vec![kw.0.0.id()], url),
                ("nginx", with_children(ngx_pid), format!("http://127.0.0.1:{NGX}{ngx_path}")),
                ("HAProxy", vec![hap_pid], format!("http://127.0.0.1:{HAP}{ngx_path}")),
            ];
            for (who, pids, url) in peers {
                let slug = format!("{}-{who}", sys_rows.len());
                let counted = super::profile::syscalls(pd, &slug, &pids, || wrk(&ns, &url, secs.max(3)).0);
                let mut row = vec![(*name).to_owned(), who.to_owned()];
                match counted {
                    Some(c) => row.extend(c.iter().map(|v| format!("{v:.2}"))),
                    None => row.extend(super::profile::syscall_columns().iter().map(|_| "–".to_owned())),
                }
                sys_rows.push(row);
            }
        }
        if probes {
            super::profile::remove_probes();
        }
        let mut head = vec!["path", "proxy"];
        head.extend(super::profile::syscall_columns());
        text.push_str(&format!(
            "### Syscalls and context switches per request (`perf stat -p`, every thread of each proxy's processes)\n\n{}\n",
            table(&head, &sys_rows)
        ));
        text
    });
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let direct_p = &lat[0][3];
    for (i, (name, ..)) in paths.iter().enumerate() {
        let r_us = ratios(&us[i][0], &us[i][1]);
        let r_hap = ratios(&us[i][0], &us[i][2]);
        let r_own = ratios(&own[i][0], &own[i][1]);
        let r_own_hap = ratios(&own[i][0], &own[i][2]);
        let add = |v: &Vec<(f64, f64)>, pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
            v.iter().zip(direct_p).map(|(a, d)| pick(a) - pick(d)).collect()
        };
        let p5099 = |j: usize| (add(&lat[i][j], |x| x.0), add(&lat[i][j], |x| x.1));
        let ((k50, k99), (n50, n99), (h50, h99)) = (p5099(0), p5099(1), p5099(2));
        rows.push(vec![
            (*name).to_owned(),
            fmt(&rps[i][0], 0),
            fmt(&us[i][0], 1),
            fmt(&us[i][1], 1),
            fmt(&us[i][2], 1),
            fmt(&r_us, 2),
            fmt(&r_hap, 2),
            format!("{} / {} / {}", fmt(&own[i][0], 1), fmt(&own[i][1], 1), fmt(&own[i][2], 1)),
            format!("{} / {}", fmt(&r_own, 2), fmt(&r_own_hap, 2)),
            format!("{} / {}", fmt(&k50, 0), fmt(&k99, 0)),
            format!("{} / {}", fmt(&n50, 0), fmt(&n99, 0)),
            format!("{} / {}", fmt(&h50, 0), fmt(&h99, 0)),
            format!("{} / {} / {}", fmt(&rps[i][1], 0), fmt(&rps[i][2], 0), fmt(&pct(&bad[i][1]), 0)),
        ]);
        out.push(json!({
            "path": name,
            "keyward": { "rps": summary(&rps[i][0]), "cpu_us_per_req": summary(&us[i][0]), "own_cpu_us_per_req": summary(&own[i][0]), "added_p50_us": summary(&k50), "added_p99_us": summary(&k99), "non2xx": summary(&bad[i][0]) },
            "nginx": { "rps": summary(&rps[i][1]), "cpu_us_per_req": summary(&us[i][1]), "added_p50_us": summary(&n50), "added_p99_us": summary(&n99), "non2xx": summary(&bad[i][1]), "own_cpu_us_per_req": summary(&own[i][1]) },
            "haproxy": { "rps": summary(&rps[i][2]), "cpu_us_per_req": summary(&us[i][2]), "added_p50_us": summary(&h50), "added_p99_us": summary(&h99), "non2xx": summary(&bad[i][2]), "own_cpu_us_per_req": summary(&own[i][2]) },
            "keyward_over_nginx_cpu_per_req": summary(&r_us),
            "keyward_over_haproxy_cpu_per_req": summary(&r_hap),
            "keyward_over_nginx_own_cpu_per_req": summary(&r_own),
            "keyward_over_haproxy_own_cpu_per_req": summary(&r_own_hap),
        }));
    }
    let direct_rps = stats(&rps[0][3]).0;
    let shared_i = paths.len() - 1;
    let over_embedded = |pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        lat[shared_i][0].iter().zip(&lat[0][0]).map(|(s, e)| pick(s) - pick(e)).collect()
    };
    let (s50, s99) = (over_embedded(|x| x.0), over_embedded(|x| x.1));
    let md = format!(
        "Peers: {}.\n\n{}\nDirect to the upstream: {direct_rps:.0} req/s; open loop at {rate} req/s for the latency columns (µs added over direct, p50 / p99). The last column is the peers' closed-loop req/s and the share of nginx's answers that were not 2xx/3xx (expected on the 429 and 503 paths only). \"own\" is each proxy's processes' user + system time per request (nginx: master and worker), which other work on a shared CPU1 does not inflate; on a busy machine its ratios are the ones to read.\nShared store against the embedded store (same run): {} Redis round trips per billable call; p50 / p99 added {} / {} µs.\n",
        versions(),
        table(
            &[
                "path",
                "keyward req/s",
                "keyward CPU1 µs/req",
                "nginx CPU1 µs/req",
                "HAProxy CPU1 µs/req",
                "keyward ÷ nginx µs/req",
                "keyward ÷ HAProxy µs/req",
                "own µs/req keyward / nginx / HAProxy",
                "own ÷ nginx / ÷ HAProxy",
                "keyward added p50 / p99 µs",
                "nginx added p50 / p99 µs",
                "HAProxy added p50 / p99 µs",
                "nginx / HAProxy req/s, nginx non-2xx %"
            ],
            &rows
        ),
        fmt(&trips, 2),
        fmt(&s50, 0),
        fmt(&s99, 0)
    );
    let shared_store = json!({ "round_trips_per_billable_call": summary(&trips), "added_p50_us_over_embedded": summary(&s50), "added_p99_us_over_embedded": summary(&s99) });
    (
        json!({ "rounds": rounds, "seconds": secs, "open_loop_rate": rate, "peers": versions(), "paths": out, "direct_rps": summary(&rps[0][3]), "shared_store": shared_store }),
        md,
        profiles,
    )
}

/// One closed-loop and open-loop measurement of one proxy on one path.
struct Measured {
    cpu: f64,
    rps: f64,
    /// Share of the closed-loop answers that were not 2xx/3xx.
    non2xx: f64,
    lat: (f64, f64),
}

fn pct(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x * 100.0).collect()
}

/// The peers' versions, as they print them.
fn versions() -> String {
    let first = |cmd: &str, arg: &str| {
        Command::new(cmd).arg(arg).output().map_or_else(
            |_| format!("{cmd} (not found)"),
            |o| {
                let t = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                t.lines().next().unwrap_or("").trim().to_owned()
            },
        )
    };
    format!("{} · {} · {}", first("nginx", "-v"), first("haproxy", "-v"), first("wrk", "-v"))
}

/// HAProxy as its documentation recommends for per-client rate limiting: a
/// stick table of request rates by source address, `http-request
/// track-sc0 src`, and `http-request deny deny_status 429` over the rate
/// (100/s on `/tight/`, as nginx's zone; a ceiling no load reaches elsewhere,
/// so the pass paths pay for the tracking too); the key set on the way up;
/// idle server connections reused (`http-reuse always`), TLS verified with
/// session reuse (the default).
fn haproxy_conf(dir: &Path) -> PathBuf {
    let p = dir.join("haproxy.cfg");
    let text = format!(
        "global\n  nbthread 1\n  pidfile {d}/haproxy.pid\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\nfrontend fe\n  bind 127.0.0.1:{HAP}\n  stick-table type ip size 1m expire 60s store http_req_rate(1s)\n  http-request track-sc0 src\n  http-request return status 503 if {{ path_beg /broke/ }}\n  http-request deny deny_status 429 if {{ path_beg /tight/ }} {{ sc_http_req_rate(0) gt 100 }}\n  http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 1000000 }}\n  use_backend uptls if {{ path_beg /tls/ }}\n  default_backend up\n\nbackend up\n  http-request replace-path /tight/(.*) /postcodes/\\1\n  http-request set-header X-Api-Key {KEY}\n  server s1 127.0.0.1:{UP}\n\nbackend uptls\n  http-request replace-path /tls/(.*) /postcodes/\\1\n  http-request set-header X-Api-Key {KEY}\n  server s1 127.0.0.1:{UP_TLS} ssl verify required ca-file {d}/ca.crt verifyhost localhost sni str(localhost)\n",
        d = dir.display()
    );
    std::fs::write(&p, text).expect("haproxy config");
    p
}

/// User + system CPU of process `pid` (all its threads) and its children
/// (nginx's worker) so far, in ns (USER_HZ = 100).
fn proc_cpu_ns(pid: u32) -> u64 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let kids: u64 = children.split_whitespace().filter_map(|c| c.parse().ok()).map(one_proc_cpu_ns).sum();
    one_proc_cpu_ns(pid) + kids
}

/// `pid` and its children (nginx's master and worker).
fn with_children(pid: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid).chain(children.split_whitespace().filter_map(|c| c.parse().ok())).collect()
}

fn one_proc_cpu_ns(pid: u32) -> u64 {
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
    // Distinct subject names: with rcgen's default name on both, the leaf's
    // issuer equals its own subject and OpenSSL (nginx, HAProxy) takes it
    // for self-signed and refuses it (every call a handshake and a 502).
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca");
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "keyward bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let key = KeyPair::generate().expect("key");
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &issuer).expect("cert");
    (cert.pem(), key.serialize_pem(), ca_cert.pem())
}
