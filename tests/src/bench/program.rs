//! Tier 1: the XDP program's cost per packet from `BPF_PROG_TEST_RUN` on
//! the embedded object, as the difference from a trivial `XDP_PASS` program
//! timed the same way in the same round. Scenarios that need a different
//! packet every run (new sources) are timed one run per call over many
//! distinct frames, against the floor timed the same way.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use keyward::{config::Config, dataplane::Dataplane, store::List, units::Cidr};
use serde_json::{Value, json};

use super::{Rng, fmt, ratios, summary, table};
use crate::frame::{self, Macs};

const PORT: u16 = 443;
const DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn dp(extra: &str, table_size: u32) -> Dataplane {
    let t = format!("[xdp]\ninterface = \"lo\"\nports = [{PORT}]\ntable_size = {table_size}\n{extra}\n");
    let c = Config::parse(std::path::Path::new("bench.toml"), &t).expect("bench config");
    Dataplane::load(c.xdp()).expect("load keyward's XDP object")
}

fn syn(src: Ipv4Addr) -> Vec<u8> {
    frame::tcp4(Macs::TEST, src, DST, 40_000, PORT)
}

/// ns per run over `repeat` runs of one frame.
fn repeat_ns(p: &Xdp, f: &[u8], repeat: u32) -> f64 {
    let r = p.test_run(TestRunOptions { data_in: Some(f), repeat, ..TestRunOptions::default() }).expect("test run");
    r.duration.as_nanos() as f64
}

/// Mean ns per run over one run each of many frames.
fn each_ns(p: &Xdp, frames: &[Vec<u8>]) -> f64 {
    let mut total = 0f64;
    for f in frames {
        let r =
            p.test_run(TestRunOptions { data_in: Some(f), repeat: 1, ..TestRunOptions::default() }).expect("test run");
        total += r.duration.as_nanos() as f64;
    }
    total / frames.len() as f64
}

/// Fill a trie with `n` random prefixes (/8 to /32), plus `hit` at /32.
fn fill(d: &mut Dataplane, list: List, n: usize, hit: Ipv4Addr, rng: &mut Rng) {
    for _ in 0..n.saturating_sub(1) {
        let len = 8 + (rng.next_u64() % 25) as u8;
        let a = Ipv4Addr::from(rng.next_u64() as u32);
        let masked = Ipv4Addr::from(proxy_common::prefix::mask_v4(a.octets(), u32::from(len)));
        if let Ok(c) = format!("{masked}/{len}").parse::<Cidr>()
            && !c.contains(hit.into())
        {
            let _ = d.list_insert(list, &c, 0);
        }
    }
    d.list_insert(list, &format!("{hit}/32").parse().unwrap(), 0).unwrap();
}

struct Scenario {
    name: String,
    dp: Dataplane,
    kind: Kind,
}

enum Kind {
    /// One frame, repeated.
    Repeat(Vec<u8>),
    /// Distinct frames, one run each (`fresh` says whether the table must be reset per round).
    Each(Vec<Vec<u8>>),
}

/// Run tier 1; returns the JSON and the markdown table.
///
/// Long on purpose: one measurement script whose interleaved rounds must be
/// read together.
pub fn run(rounds: usize, repeat: u32, each: usize) -> (Value, String) {
    let mut bench = aya::Ebpf::load(super::OBJECT).expect("bench object");
    let floor: &mut Xdp = bench.program_mut("bench_pass").expect("bench_pass").try_into().expect("xdp");
    floor.load().expect("load bench_pass");
    let floor: &Xdp = bench.program("bench_pass").expect("bench_pass").try_into().expect("xdp");

    let open = "rate_pps = 1000000000\nburst = 1000000000\naggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 1000000000, burst = 1000000000 }";
    let mut rng = Rng(0x006b_6579_7761_7264);
    let mut sc: Vec<Scenario> = Vec::new();
    let udp = frame::udp4(Macs::TEST, SRC, DST, 40_000, 53, b"q");
    sc.push(Scenario { name: "unguarded (UDP to another port)".into(), dp: dp(open, 1024), kind: Kind::Repeat(udp) });
    sc.push(Scenario {
        name: "known source, under the limit".into(),
        dp: dp(open, 1024),
        kind: Kind::Repeat(syn(SRC)),
    });
    sc.push(Scenario {
        name: "known source, over the limit".into(),
        dp: dp("rate_pps = 1\nburst = 1", 1024),
        kind: Kind::Repeat(syn(SRC)),
    });
    for n in [16usize, 10_000, 100_000] {
        let mut d = dp(open, 1024);
        fill(&mut d, List::Allow, n, SRC, &mut rng);
        sc.push(Scenario { name: format!("allowed, trie of {n}"), dp: d, kind: Kind::Repeat(syn(SRC)) });
        let mut d = dp(open, 1024);
        fill(&mut d, List::Deny, n, SRC, &mut rng);
        sc.push(Scenario { name: format!("denied, trie of {n}"), dp: d, kind: Kind::Repeat(syn(SRC)) });
    }
    sc.push(Scenario {
        name: "aggregate bucket drop (rotating sources)".into(),
        dp: dp("rate_pps = 1000000000\nburst = 1000000000\naggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 1, burst = 1 }", 1024),
        kind: Kind::Repeat(syn(Ipv4Addr::new(203, 0, 113, 7))),
    });
    // New sources: distinct addresses, one run each.
    let fresh: Vec<Vec<u8>> = (0..each).map(|i| syn(Ipv4Addr::from(0x0b00_0000u32 + i as u32))).collect();
    sc.push(Scenario {
        name: "new source, empty table".into(),
        dp: dp(open, 4_194_304),
        kind: Kind::Each(fresh.clone()),
    });
    let mut full = dp(open, 4096);
    // Fill the table with other sources first, so every new one evicts.
    {
        let p = full.program().unwrap();
        for i in 0..8192u32 {
            repeat_ns(p, &syn(Ipv4Addr::from(0x0c00_0000 + i)), 1);
        }
    }
    sc.push(Scenario { name: "new source, full table (evicts)".into(), dp: full, kind: Kind::Each(fresh.clone()) });
    // A spoofed flood of never-seen sources once both host-wide buckets are
    // spent: each SYN probes the table, meets its prefix's aggregate and both
    // buckets, and is rewritten into a challenge (`XDP_TX`).
    let mut spent = dp(
        &format!("{open}\nnew_sources = {{ rate_pps = 1, burst = 1 }}\nuntracked_syns = {{ rate_pps = 1, burst = 1 }}"),
        1_048_576,
    );
    {
        let p = spent.program().unwrap();
        for i in 0..4u32 {
            repeat_ns(p, &syn(Ipv4Addr::from(0x0e00_0000 + (i << 8))), 1);
        }
    }
    sc.push(Scenario {
        name: "new source, both host-wide buckets spent (spoofed flood, 1M table)".into(),
        dp: spent,
        kind: Kind::Each(fresh.clone()),
    });

    let mut floor_rep = Vec::new();
    let mut floor_each = Vec::new();
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); sc.len()];
    for round in 0..rounds {
        floor_rep.push(repeat_ns(floor, &syn(SRC), repeat));
        floor_each.push(each_ns(floor, &fresh));
        for (i, s) in sc.iter_mut().enumerate() {
            let v = match &s.kind {
                Kind::Repeat(f) => repeat_ns(s.dp.program().unwrap(), f, repeat),
                Kind::Each(frames) => {
                    // Rotate which addresses are new this round for the empty table.
                    let shifted: Vec<Vec<u8>> = frames
                        .iter()
                        .enumerate()
                        .map(|(j, _)| syn(Ipv4Addr::from(0x0d00_0000u32 + (round * frames.len() + j) as u32)))
                        .collect();
                    each_ns(s.dp.program().unwrap(), &shifted)
                }
            };
            ns[i].push(v);
        }
    }
    let mut rows = vec![
        vec!["floor: trivial XDP_PASS, repeated".into(), fmt(&floor_rep, 1), "0".into()],
        vec!["floor: trivial XDP_PASS, one run per call".into(), fmt(&floor_each, 1), "0".into()],
    ];
    let mut out = Vec::new();
    for (s, v) in sc.iter().zip(&ns) {
        let base = match s.kind {
            Kind::Repeat(_) => &floor_rep,
            Kind::Each(_) => &floor_each,
        };
        let delta: Vec<f64> = v.iter().zip(base).map(|(a, b)| a - b).collect();
        rows.push(vec![s.name.clone(), fmt(v, 1), fmt(&delta, 1)]);
        out.push(json!({ "scenario": s.name, "ns": summary(v), "delta_ns": summary(&delta), "ratio_to_floor": summary(&ratios(v, base)) }));
    }
    let md = table(&["scenario (BPF_PROG_TEST_RUN)", "ns/packet, median (min–max)", "Δ over the floor"], &rows);
    (
        json!({
            "rounds": rounds, "repeat": repeat, "distinct_frames": each,
            "floor_repeat_ns": summary(&floor_rep), "floor_each_ns": summary(&floor_each),
            "scenarios": out,
        }),
        md,
    )
}
