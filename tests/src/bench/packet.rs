//! Tier 2: the packet path on a veth pair, with live frames. A generator
//! written here (aya's `BPF_F_TEST_XDP_LIVE_FRAMES` test run of
//! `bench_tx`/`bench_tx_spoof`) pinned to CPU0 pushes SYNs out of the client
//! end; the server end's NAPI runs threaded and pinned to CPU1, where the
//! variant under test decides each packet. The metric is CPU1 busy time
//! (`/proc/stat`) per packet counted at the receiver: bare `XDP_DROP`,
//! keyward (one source over the limit, a 1M-source spoofed flood rotating
//! sequentially and at random, a deny hit), an nftables netdev-ingress meter and an iptables hashlimit (one
//! source and 1M sources).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use keyward::{config::Config, dataplane::Dataplane, store::List};
use serde_json::{Value, json};

use super::{cpu1_busy_ns, fmt, ratios, summary, table};
use crate::{
    frame,
    netns::{self, SERVER_V4, Topology},
};

const PORT: u16 = 443;

fn pin_self(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let _ = set.set(cpu);
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
}

/// Pin every NAPI kthread of `iface` to CPU1 (their pids change whenever
/// XDP or GRO is toggled, so this runs before each measurement).
fn pin_napi(iface: &str) -> usize {
    let mut n = 0;
    let want = format!("napi/{iface}");
    let want = &want[..want.len().min(15)];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with(want) {
            let mut set = nix::sched::CpuSet::new();
            let _ = set.set(1);
            if nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set).is_ok() {
                n += 1;
            }
        }
    }
    n
}

fn sh(ns: &str, cmd: &str) -> String {
    let o = Command::new("ip").args(["netns", "exec", ns, "sh", "-c", cmd]).output().expect("ip netns exec");
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// The live-frames generator: a thread in the client namespace pinned to
/// CPU0 that owns the generator programs and sends on command.
struct Generator {
    cmd: std::sync::mpsc::Sender<(Spoof, u32, u32)>,
    done: std::sync::mpsc::Receiver<Duration>,
}

impl Generator {
    fn start(t: &Topology) -> Generator {
        let (cmd, cmd_rx) = std::sync::mpsc::channel::<(Spoof, u32, u32)>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let iface = t.client_if.clone();
        let frame = frame::tcp4(t.macs(), std::net::Ipv4Addr::new(10, 66, 0, 9), SERVER_V4, 40_000, PORT);
        netns::spawn_in_ns(&t.client_ns, move || {
            pin_self(0);
            let mut ebpf = aya::Ebpf::load(super::OBJECT).expect("bench object");
            for p in ["bench_tx", "bench_tx_spoof"] {
                let x: &mut Xdp = ebpf.program_mut(p).expect(p).try_into().expect("xdp");
                x.load().expect("load generator");
            }
            let ifindex = nix::net::if_::if_nametoindex(iface.as_str()).expect("client ifindex");
            // struct xdp_md: data, data_end (must equal the frame's length),
            // data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
            for (spoof, count, sources) in cmd_rx {
                {
                    let mut conf: aya::maps::Array<_, u32> =
                        aya::maps::Array::try_from(ebpf.map_mut("BENCH_CONF").expect("BENCH_CONF")).expect("array");
                    conf.set(0, sources, 0).expect("set sources");
                    conf.set(1, u32::from(spoof == Spoof::Random), 0).expect("set order");
                    let mut tpl: aya::maps::Array<_, [u8; 54]> =
                        aya::maps::Array::try_from(ebpf.map_mut("BENCH_FRAME").expect("BENCH_FRAME")).expect("array");
                    let head: [u8; 54] = frame[..54].try_into().expect("a 54-byte header");
                    tpl.set(0, head, 0).expect("set the frame's headers");
                }
                let name = if spoof == Spoof::No { "bench_tx" } else { "bench_tx_spoof" };
                let prog: &Xdp = ebpf.program(name).unwrap().try_into().unwrap();
                let start = Instant::now();
                let mut left = count;
                while left > 0 {
                    let n = left.min(1_000_000);
                    prog.test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&ctx),
                        repeat: n,
                        attrs: TestRunAttrs::new().xdp_live_frames(64),
                        ..TestRunOptions::default()
                    })
                    .expect("live frames");
                    left -= n;
                }
                if done_tx.send(start.elapsed()).is_err() {
                    return;
                }
            }
        });
        Generator { cmd, done }
    }

    fn send(&self, spoof: Spoof, count: u32, sources: u32) -> Duration {
        self.cmd.send((spoof, count, sources)).expect("generator gone");
        self.done.recv().expect("generator failed")
    }
}

/// Whether and how the generator rotates the source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spoof {
    No,
    Sequential,
    Random,
}

/// What the receiver runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    XdpDrop,
    KeywardOne,
    KeywardSpoof,
    KeywardSpoofRandom,
    KeywardDeny,
    NftOne,
    NftSpoof,
    HashlimitOne,
    HashlimitSpoof,
}

impl Variant {
    const ALL: [Variant; 9] = [
        Variant::XdpDrop,
        Variant::KeywardOne,
        Variant::KeywardSpoof,
        Variant::KeywardSpoofRandom,
        Variant::KeywardDeny,
        Variant::NftOne,
        Variant::NftSpoof,
        Variant::HashlimitOne,
        Variant::HashlimitSpoof,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::XdpDrop => "bare XDP_DROP",
            Variant::KeywardOne => "keyward, 1 source over the limit",
            Variant::KeywardSpoof => "keyward, 1M spoofed sources",
            Variant::KeywardSpoofRandom => "keyward, 1M spoofed sources, random",
            Variant::KeywardDeny => "keyward, deny-list hit",
            Variant::NftOne => "nftables ingress meter, 1 source",
            Variant::NftSpoof => "nftables ingress meter, 1M sources",
            Variant::HashlimitOne => "iptables hashlimit, 1 source",
            Variant::HashlimitSpoof => "iptables hashlimit, 1M sources",
        }
    }

    fn spoof(self) -> Spoof {
        match self {
            Variant::KeywardSpoof | Variant::NftSpoof | Variant::HashlimitSpoof => Spoof::Sequential,
            Variant::KeywardSpoofRandom => Spoof::Random,
            _ => Spoof::No,
        }
    }
}

/// The receiver side of one variant, set up and counted.
enum Receiver {
    Drop(aya::Ebpf),
    Keyward(Box<Dataplane>),
    Netfilter,
}

fn keyward_dp(t: &Topology, deny: bool) -> Dataplane {
    let text = format!("[xdp]\ninterface = \"{}\"\nports = [{PORT}]\nrate_pps = 200\nburst = 400\n", t.server_if);
    let c = Config::parse(std::path::Path::new("bench.toml"), &text).expect("config");
    let x = c.xdp().clone();
    let iface = t.server_if.clone();
    netns::in_ns(&t.server_ns, move || {
        let mut d = Dataplane::load(&x).expect("load keyward");
        if deny {
            d.list_insert(List::Deny, &"10.0.0.0/8".parse().unwrap(), 0).unwrap();
            d.list_insert(List::Deny, &"11.0.0.0/8".parse().unwrap(), 0).unwrap();
        }
        d.attach(&iface, keyward::config::AttachMode::Native).expect("attach keyward");
        d
    })
}

fn setup(t: &Topology, v: Variant) -> Receiver {
    match v {
        Variant::XdpDrop => {
            let iface = t.server_if.clone();
            Receiver::Drop(netns::in_ns(&t.server_ns, move || {
                let mut e = aya::Ebpf::load(super::OBJECT).expect("bench object");
                let x: &mut Xdp = e.program_mut("bench_drop").unwrap().try_into().unwrap();
                x.load().expect("load bench_drop");
                x.attach(&iface, XdpMode::Driver).expect("attach bench_drop");
                e
            }))
        }
        Variant::KeywardOne | Variant::KeywardSpoof | Variant::KeywardSpoofRandom => {
            Receiver::Keyward(Box::new(keyward_dp(t, false)))
        }
        Variant::KeywardDeny => Receiver::Keyward(Box::new(keyward_dp(t, true))),
        Variant::NftOne | Variant::NftSpoof => {
            let rules = format!(
                "table netdev kwb {{\n  set persrc {{\n    type ipv4_addr\n    size 65536\n    flags dynamic,timeout\n    timeout 10s\n  }}\n  chain ingress {{\n    type filter hook ingress device \"{}\" priority 0; policy accept;\n    counter\n    ip protocol tcp update @persrc {{ ip saddr limit rate over 200/second burst 400 packets }} drop\n  }}\n}}",
                t.server_if
            );
            let out = sh(
                &t.server_ns,
                &format!("ethtool -K {} gro on >/dev/null; nft -f - <<'EOF'\n{rules}\nEOF", t.server_if),
            );
            assert!(!out.contains("Error"), "nft: {out}");
            Receiver::Netfilter
        }
        Variant::HashlimitOne | Variant::HashlimitSpoof => {
            let out = sh(
                &t.server_ns,
                &format!(
                    "ethtool -K {} gro on >/dev/null; iptables-legacy -t raw -A PREROUTING && \
                     iptables-legacy -t raw -A PREROUTING -p tcp -m hashlimit --hashlimit-above 200/sec --hashlimit-burst 400 \
                     --hashlimit-mode srcip --hashlimit-name kwb --hashlimit-htable-size 65536 --hashlimit-htable-max 65536 -j DROP",
                    t.server_if
                ),
            );
            assert!(out.trim().is_empty(), "iptables: {out}");
            Receiver::Netfilter
        }
    }
}

/// Packets the receiver has seen so far.
fn seen(t: &Topology, v: Variant, r: &Receiver) -> u64 {
    match r {
        Receiver::Drop(e) => {
            let m: aya::maps::PerCpuArray<_, u64> =
                aya::maps::PerCpuArray::try_from(e.map("BENCH_COUNT").unwrap()).unwrap();
            m.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
        }
        Receiver::Keyward(d) => d.counters().map(|c| c.iter().map(|x| x.packets).sum()).unwrap_or(0),
        Receiver::Netfilter => {
            let out = if matches!(v, Variant::NftOne | Variant::NftSpoof) {
                sh(&t.server_ns, "nft list chain netdev kwb ingress")
            } else {
                sh(&t.server_ns, "iptables-legacy -t raw -L PREROUTING -v -x -n | sed -n 3p")
            };
            // nft: the first "counter packets N"; iptables: the first number of the accounting rule.
            out.split("counter packets ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .or_else(|| out.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        }
    }
}

/// Packets keyward has counted under `action` so far (`None` for the
/// others): "pass" (to the stack), "tx" (answered with a challenge).
fn counted(r: &Receiver, action: &str) -> Option<u64> {
    match r {
        Receiver::Keyward(d) => {
            d.counters().ok().map(|c| c.iter().filter(|x| x.action == action).map(|x| x.packets).sum())
        }
        _ => None,
    }
}

/// Drop what the receiver sends back (keyward's challenges, `XDP_TX`) at
/// the generator's end, as cheaply as anything can, instead of handing it
/// to the client namespace's stack.
fn drop_returns(t: &Topology) -> aya::Ebpf {
    let iface = t.client_if.clone();
    netns::in_ns(&t.client_ns, move || {
        let mut e = aya::Ebpf::load(super::OBJECT).expect("bench object");
        let x: &mut Xdp = e.program_mut("bench_drop").unwrap().try_into().unwrap();
        x.load().expect("load bench_drop");
        x.attach(&iface, XdpMode::Driver).expect("attach bench_drop at the generator");
        e
    })
}

fn teardown(t: &Topology, v: Variant, r: Receiver) {
    match r {
        Receiver::Drop(e) => drop(e),
        Receiver::Keyward(mut d) => d.shutdown(),
        Receiver::Netfilter => {
            if matches!(v, Variant::NftOne | Variant::NftSpoof) {
                sh(&t.server_ns, "nft delete table netdev kwb");
            } else {
                sh(&t.server_ns, "iptables-legacy -t raw -F PREROUTING; iptables-legacy -t raw -X 2>/dev/null");
            }
            sh(&t.server_ns, &format!("ethtool -K {} gro off >/dev/null", t.server_if));
        }
    }
}

/// Run tier 2; returns JSON and markdown.
pub fn run(rounds: usize, packets: u32) -> (Value, String) {
    let t = Topology::new();
    let _returns = drop_returns(&t);
    let g = Generator::start(&t);
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    let mut mpps: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    let mut pass_pct: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    let mut tx_pct: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    for round in 0..rounds {
        for (i, v) in Variant::ALL.iter().enumerate() {
            let r = setup(&t, *v);
            // veth has NAPI only while XDP or GRO is on: switch it to a
            // kthread now, then pin that thread.
            let out = sh(&t.server_ns, &format!("echo 1 > /sys/class/net/{}/threaded", t.server_if));
            assert!(out.trim().is_empty(), "threaded NAPI: {out}");
            let pinned = pin_napi(&t.server_if);
            assert!(pinned > 0, "no NAPI thread for {}", t.server_if);
            // Warm up (also fills tables for the spoofed variants). A
            // receiver sees only what it keeps up with, so a spoofed flood
            // is sent until the receiver has seen more than keyward's
            // host-wide bursts (40,000 admitted, 10,000 untracked by
            // default): what follows is the steady state of a flood, not
            // its first burst. Bounded at 30 sends.
            g.send(v.spoof(), packets / 10, 1_000_000);
            for _ in 0..30 {
                if v.spoof() == Spoof::No || seen(&t, *v, &r) > 100_000 {
                    break;
                }
                g.send(v.spoof(), packets / 10, 1_000_000);
            }
            let before = seen(&t, *v, &r);
            let (passed0, tx0) = (counted(&r, "pass"), counted(&r, "tx"));
            let busy0 = cpu1_busy_ns();
            let took = g.send(v.spoof(), packets, 1_000_000);
            let busy1 = cpu1_busy_ns();
            let n = seen(&t, *v, &r).saturating_sub(before).max(1);
            if let (Some(a), Some(b)) = (passed0, counted(&r, "pass")) {
                pass_pct[i].push(100.0 * b.saturating_sub(a) as f64 / n as f64);
            }
            if let (Some(a), Some(b)) = (tx0, counted(&r, "tx")) {
                tx_pct[i].push(100.0 * b.saturating_sub(a) as f64 / n as f64);
            }
            ns[i].push((busy1 - busy0) as f64 / n as f64);
            mpps[i].push(n as f64 / took.as_secs_f64() / 1e6);
            eprintln!(
                "   round {} {:<40} {:>7.0} ns/pkt  {:>5.2} Mpps ({} seen)",
                round + 1,
                v.name(),
                ns[i][round],
                mpps[i][round],
                n
            );
            if let Receiver::Keyward(d) = &r {
                let by: Vec<String> = d
                    .counters()
                    .unwrap_or_default()
                    .iter()
                    .filter(|c| c.packets > 0)
                    .map(|c| format!("{}/{} {}", c.action, c.reason, c.packets))
                    .collect();
                eprintln!("     counters since load: {}", by.join(", "));
            }
            teardown(&t, *v, r);
        }
    }
    drop(g);
    let idx = |v: Variant| Variant::ALL.iter().position(|x| *x == v).unwrap_or(0);
    let base = &ns[idx(Variant::XdpDrop)];
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (i, v) in Variant::ALL.iter().enumerate() {
        let r = ratios(&ns[i], base);
        let pct = |p: &[f64]| if p.is_empty() { "–".into() } else { fmt(p, 1) };
        rows.push(vec![
            v.name().into(),
            fmt(&ns[i], 0),
            fmt(&mpps[i], 2),
            fmt(&r, 2),
            pct(&pass_pct[i]),
            pct(&tx_pct[i]),
        ]);
        out.push(json!({ "variant": v.name(), "ns_per_packet": summary(&ns[i]), "mpps": summary(&mpps[i]), "vs_xdp_drop": summary(&r), "passed_pct": summary(&pass_pct[i]), "challenged_pct": summary(&tx_pct[i]) }));
    }
    let named = [
        ("keyward(1 src) / XDP_DROP", Variant::KeywardOne, Variant::XdpDrop),
        ("nft(1 src) / keyward(1 src)", Variant::NftOne, Variant::KeywardOne),
        ("hashlimit(1 src) / keyward(1 src)", Variant::HashlimitOne, Variant::KeywardOne),
        ("keyward(1M) / keyward(1 src)", Variant::KeywardSpoof, Variant::KeywardOne),
        ("keyward(1M) / XDP_DROP", Variant::KeywardSpoof, Variant::XdpDrop),
        ("keyward(1M random) / XDP_DROP", Variant::KeywardSpoofRandom, Variant::XdpDrop),
        ("nft(1M) / keyward(1M)", Variant::NftSpoof, Variant::KeywardSpoof),
        ("hashlimit(1M) / keyward(1M)", Variant::HashlimitSpoof, Variant::KeywardSpoof),
    ];
    let mut rrows = Vec::new();
    let mut rj = Vec::new();
    for (name, a, b) in named {
        let r = ratios(&ns[idx(a)], &ns[idx(b)]);
        rrows.push(vec![name.into(), fmt(&r, 2)]);
        rj.push(json!({ "ratio": name, "per_round": summary(&r) }));
    }
    let md = format!(
        "{}\n{}",
        table(
            &[
                "receiver (veth, NAPI pinned to CPU1)",
                "CPU1 ns/packet",
                "Mpps seen",
                "÷ XDP_DROP",
                "% passed to the stack",
                "% answered with a challenge"
            ],
            &rows
        ),
        table(&["ratio (per round, median (min–max))", "value"], &rrows)
    );
    (json!({ "rounds": rounds, "packets": packets, "variants": out, "ratios": rj }), md)
}
