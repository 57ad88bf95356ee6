//! Tier 4: memory and scale. Kernel bytes per tracked source (the maps'
//! `memlock` from fdinfo: the per-source table is an array, allocated
//! whole, so this is the cost of capacity, paid up front), the forwarder's resident memory per
//! tracked client (its real limiter, filled in process, heap bytes), the daemon's
//! startup time to a first answer, and a reload's round trip.

use std::{net::IpAddr, time::Instant};

use keyward::{
    config::Config,
    dataplane::Dataplane,
    proxy::{
        day::Schedule,
        limit::{Limiter, Limits},
    },
};
use serde_json::{Value, json};

use super::{fmt, summary, table};
use crate::{daemon::Daemon, netns::Topology};

/// (max_entries, value_size, memlock) of every BPF map this process holds.
fn maps() -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fdinfo").into_iter().flatten().flatten() {
        let t = std::fs::read_to_string(e.path()).unwrap_or_default();
        if !t.contains("map_type:") {
            continue;
        }
        let field =
            |k: &str| t.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse().ok()).unwrap_or(0u64);
        out.push((field("max_entries:"), field("value_size:"), field("memlock:")));
    }
    out
}

/// Long on purpose: one measurement script, each figure next to the
/// setup it needs.
///
/// Run tier 4. `allocated` reports the bytes the process has live on the
/// heap (the bench binary's counting allocator): exact, unlike RSS, which
/// the allocator's reuse of freed memory hides.
pub fn run(rounds: usize, quick: bool, allocated: fn() -> usize) -> (Value, String) {
    let mut rows = Vec::new();
    let mut doc = json!({});

    // Kernel memory per tracked source, at the default table size.
    let size = if quick { 262_144u32 } else { 1_048_576 };
    let before: Vec<(u64, u64, u64)> = maps();
    let text = format!("[xdp]\ninterface = \"lo\"\nports = [443]\nrate_pps = 1\nburst = 1\ntable_size = {size}\n");
    let cfg = Config::parse(std::path::Path::new("bench.toml"), &text).expect("config");
    let dp = Dataplane::load(cfg.xdp()).expect("load");
    let after = maps();
    let ours: Vec<(u64, u64, u64)> = after.iter().filter(|m| !before.contains(m)).copied().collect();
    // The per-source table: `size` entries of one slot each (the tries and
    // other arrays may have as many entries, with other values).
    let slot = std::mem::size_of::<proxy_common::table::Slot>() as u64;
    let sources = ours.iter().find(|(n, v, _)| *n == u64::from(size) && *v == slot).map_or(0, |(_, _, m)| *m);
    let total: u64 = ours.iter().map(|(_, _, m)| m).sum();
    drop(dp);
    let per = sources as f64 / f64::from(size);
    rows.push(vec![
        format!("kernel: per-source table of {size}"),
        format!("{:.1} MiB", sources as f64 / 1048576.0),
        format!("{per:.0} B per source"),
    ]);
    rows.push(vec![
        "kernel: all of keyward's maps".into(),
        format!("{:.1} MiB", total as f64 / 1048576.0),
        format!("a 1M-source table takes {:.0} MiB", per),
    ]);
    doc["kernel"] =
        json!({ "table_size": size, "sources_map_bytes": sources, "bytes_per_source": per, "all_maps_bytes": total });

    // The forwarder's memory per tracked client.
    let counts: &[u32] = if quick { &[10_000, 100_000] } else { &[10_000, 100_000, 1_000_000] };
    let mut rss = Vec::new();
    for &n in counts {
        let base = allocated();
        let l = Limiter::new(
            Limits {
                rate: proxy_common::bucket::Params::new(5, 10),
                burst: 10,
                per_ip_daily: 200,
                budget: u64::MAX,
                alert_at: vec![],
                dry_run: false,
                prefix: None,
                pace: None,
            },
            Schedule::new("00:00", "UTC").expect("schedule"),
            1_795_420_800,
            None,
        );
        for i in 0..n {
            let ip = IpAddr::from((0x0b00_0000 + i).to_be_bytes());
            let _ = l.rate(ip, 1_000_000_000);
            if let Ok(r) = l.reserve(ip, 1, 1_795_420_800, false) {
                l.commit(r);
            }
        }
        let grew = allocated().saturating_sub(base) as u64;
        rows.push(vec![
            format!("forwarder: {n} clients tracked today"),
            format!("{:.1} MiB", grew as f64 / 1048576.0),
            format!("{:.0} B per client", grew as f64 / f64::from(n)),
        ]);
        rss.push(json!({ "clients": n, "heap_bytes": grew }));
        drop(l);
    }
    doc["forwarder_heap"] = json!(rss);

    // Startup and reload, with the real daemon.
    let t = Topology::new();
    let mut start = Vec::new();
    let mut reload = Vec::new();
    for _ in 0..rounds {
        let mut d = Daemon::prepare(&t, "");
        let t0 = Instant::now();
        d.spawn();
        start.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        d.ok(&["reload"]);
        reload.push(t0.elapsed().as_secs_f64() * 1e3);
        d.stop();
    }
    rows.push(vec![
        "daemon start to first answer (table of 4096)".into(),
        format!("{} ms", fmt(&start, 0)),
        String::new(),
    ]);
    rows.push(vec!["reload round trip (`keyward reload`)".into(), format!("{} ms", fmt(&reload, 1)), String::new()]);
    doc["startup_ms"] = summary(&start);
    doc["reload_ms"] = summary(&reload);
    (doc, table(&["what", "measured", "per unit"], &rows))
}
