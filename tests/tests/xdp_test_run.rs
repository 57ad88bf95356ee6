//! `BPF_PROG_TEST_RUN` on the embedded XDP object (aya's `TestRun`): every
//! verdict and its counter, and a table of malformed frames, none of which
//! may abort and each of which must land in a defined counter. Needs root.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::{
    maps::{Array, Map, MapData},
    programs::{TestRun as _, TestRunOptions},
};
use keyward::{
    clock::{Clock as _, SystemClock},
    config::Config,
    dataplane::Dataplane,
    store::List,
    units::Cidr,
};
use keyward_tests::{
    frame::{self, Macs, TCP},
    privileged,
};
use proxy_common::{
    ADMIT_NEW_SOURCES, ADMIT_PROOFS, ADMIT_UNTRACKED_SYNS, Bucket,
    challenge::{self, Tuple},
    prefix::{key_v4, key_v6},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const PORT: u16 = 443;
const SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn src6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, last)
}
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);

fn config(xdp_extra: &str) -> Config {
    // Default rates unless the caller sets its own.
    let rates = if xdp_extra.starts_with("rate_pps") { "" } else { "rate_pps = 10\nburst = 20\n" };
    let t = format!("[xdp]\ninterface = \"lo\"\nports = [{PORT}]\n{rates}table_size = 1024\n{xdp_extra}\n");
    Config::parse(std::path::Path::new("test.toml"), &t).expect("test config")
}

struct Harness {
    dp: Dataplane,
}

impl Harness {
    fn new(xdp_extra: &str) -> Harness {
        let cfg = config(xdp_extra);
        Harness { dp: Dataplane::load(cfg.xdp()).expect("load XDP object") }
    }

    fn run(&mut self, f: &[u8]) -> u32 {
        let p = self.dp.program().expect("program");
        p.test_run(TestRunOptions { data_in: Some(f), ..TestRunOptions::default() }).expect("test run").return_value
    }

    fn count(&self, action: &str, reason: &str) -> u64 {
        self.dp
            .counters()
            .expect("counters")
            .iter()
            .filter(|c| c.action == action && c.reason == reason)
            .map(|c| c.packets)
            .sum()
    }

    /// Spend host-wide bucket `i` of `ADMIT` for the rest of the test
    /// (through its pin, `kwt<pid>-<name>`, removed with the dataplane), so
    /// that what follows does not depend on how fast it runs: at 1 per
    /// second a bucket would refill.
    fn spend(&mut self, name: &str, i: u32) {
        // A day ahead: far beyond any bucket's tolerance here.
        let tat_ns = (SystemClock.monotonic_ns() + 86_400_000_000_000) & !Bucket::PROVEN;
        self.set_admit(name, i, tat_ns);
    }

    /// Fill host-wide bucket `i` of `ADMIT` (as `spend`).
    fn fill(&mut self, name: &str, i: u32) {
        self.set_admit(name, i, 0);
    }

    fn set_admit(&mut self, name: &str, i: u32, tat_ns: u64) {
        let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/kwt{}-{name}", std::process::id()));
        if !dir.exists() {
            self.dp.pin(&dir).expect("pin maps");
        }
        let data = MapData::from_pin(dir.join(proxy_common::maps::ADMIT)).expect("open ADMIT");
        let mut admit: Array<MapData, Bucket> =
            Array::try_from(Map::from_map_data(data).expect("map type")).expect("an array");
        admit.set(i, Bucket { tat_ns, packets: 0, drops: 0 }, 0).expect("set the bucket");
    }

    /// Run `f` once; the verdict and the frame as the program left it.
    fn run_out(&mut self, f: &[u8]) -> (u32, Vec<u8>) {
        let p = self.dp.program().expect("program");
        let mut out = vec![0u8; f.len() + 256];
        let r = p
            .test_run(TestRunOptions { data_in: Some(f), data_out: Some(&mut out), ..TestRunOptions::default() })
            .expect("test run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn total(&self) -> u64 {
        self.dp.counters().expect("counters").iter().map(|c| c.packets).sum()
    }

    /// Run `f` once; assert the verdict and that exactly the named counter moved.
    fn expect(&mut self, name: &str, f: &[u8], verdict: u32, action: &str, reason: &str) {
        let before = self.count(action, reason);
        let total = self.total();
        let v = self.run(f);
        assert_eq!(v, verdict, "{name}: verdict");
        assert_eq!(self.count(action, reason), before + 1, "{name}: {action}/{reason} counter");
        assert_eq!(self.total(), total + 1, "{name}: exactly one counter moved");
    }
}

fn syn(src: Ipv4Addr) -> Vec<u8> {
    frame::tcp4(Macs::TEST, src, DST, 40_000, PORT)
}

#[test]
fn every_map_name_resolves_and_counters_cover_every_reason() {
    if !privileged() {
        return;
    }
    let h = Harness::new("");
    for name in proxy_common::maps::ALL {
        assert!(h.dp.has_map(name), "{name} is not in the object");
        assert!(name.len() <= 15, "{name} is longer than BPF_OBJ_NAME_LEN");
    }
    let c = h.dp.counters().unwrap();
    // Every reason passes (in dry run); denied, rate and proven can drop,
    // challenge transmits.
    assert_eq!(c.len(), proxy_common::REASON_COUNT as usize + 4);
    for r in proxy_common::Reason::ALL {
        assert!(c.iter().any(|x| x.reason == r.name()));
    }
}

#[test]
fn unguarded_traffic_passes() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("");
    let ssh = frame::tcp4(Macs::TEST, SRC, DST, 40_000, 22);
    let dns = frame::udp4(Macs::TEST, SRC, DST, 40_000, 53, b"q");
    let udp_on_port = frame::udp4(Macs::TEST, SRC, DST, 40_000, PORT, b"q");
    let arp = frame::ethernet(Macs::TEST, &[], 0x0806, &[0u8; 28]);
    let lldp = frame::ethernet(Macs::TEST, &[], 0x88cc, &[0u8; 30]);
    for (n, f) in [("ssh", ssh), ("dns", dns), ("udp", udp_on_port), ("arp", arp), ("lldp", lldp)] {
        // Far more than the burst: unguarded traffic is never limited.
        for _ in 0..30 {
            h.expect(n, &f, XDP_PASS, "pass", "unguarded");
        }
    }
}

#[test]
fn token_bucket_admits_burst_then_drops() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("");
    let f = syn(SRC);
    let mut passed = 0;
    for _ in 0..100 {
        if h.run(&f) == XDP_PASS {
            passed += 1;
        }
    }
    // 20 burst, plus at most what 10 pps refills while the loop runs.
    assert!((20..=22).contains(&passed), "passed {passed}");
    assert_eq!(h.count("pass", "under_rate"), passed);
    assert_eq!(h.count("drop", "rate"), 100 - passed);
    // Another source has its own bucket.
    h.expect("other source", &syn(Ipv4Addr::new(192, 0, 2, 11)), XDP_PASS, "pass", "under_rate");
    assert_eq!(h.dp.new_sources().unwrap(), 2);
    let (tracked, top) = h.dp.sources(1).unwrap();
    assert_eq!(tracked, 2);
    assert_eq!(top[0].source, SRC.to_string());
    assert_eq!(top[0].packets, 100);
    assert_eq!(top[0].drops, 100 - passed);
}

#[test]
fn allow_list_skips_rate_and_deny_wins_over_allow() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("");
    h.dp.list_insert(List::Allow, &"192.0.2.0/24".parse().unwrap(), 0).unwrap();
    for _ in 0..50 {
        h.expect("allowed", &syn(SRC), XDP_PASS, "pass", "allowed");
    }
    // The documented order (docs/kernel.md): a deny inside an allowed network wins.
    let bad: Cidr = "192.0.2.10/32".parse().unwrap();
    h.dp.list_insert(List::Deny, &bad, 0).unwrap();
    h.expect("denied inside allowed", &syn(SRC), XDP_DROP, "drop", "denied");
    h.expect("neighbour still allowed", &syn(Ipv4Addr::new(192, 0, 2, 11)), XDP_PASS, "pass", "allowed");
    h.dp.list_remove(List::Deny, &bad).unwrap();
    h.expect("released", &syn(SRC), XDP_PASS, "pass", "allowed");
}

#[test]
fn packets_without_a_reachable_port_still_meet_deny_and_rate() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("");
    let v6src = src6(1);
    let seven: Vec<(u8, Vec<u8>)> = (0..7).map(|_| (60, frame::ext8())).collect();
    let t6 = frame::tcp6_header(v6src, DST6, 1, PORT);
    let deep = frame::ethernet(Macs::TEST, &[], 0x86dd, &frame::ipv6(v6src, DST6, &seven, TCP, &t6));
    let cut = &syn(SRC)[..40]; // IPv4 header whole, TCP header cut short
    // Under the limit they pass, counted as malformed.
    h.expect("deep v6", &deep, XDP_PASS, "pass", "malformed");
    h.expect("cut v4", cut, XDP_PASS, "pass", "malformed");
    // A denied source cannot use them to get around the deny list...
    h.dp.list_insert(List::Deny, &"2001:db8:1::/48".parse().unwrap(), 0).unwrap();
    h.expect("deep v6, denied", &deep, XDP_DROP, "drop", "denied");
    // ...nor around its token bucket.
    let mut dropped = 0;
    for _ in 0..100 {
        dropped += u32::from(h.run(cut) == XDP_DROP);
    }
    assert!(dropped >= 75, "only {dropped} of 100 cut frames over the limit were dropped");
}

#[test]
fn deny_entries_expire_in_the_kernel() {
    if !privileged() {
        return;
    }
    use keyward::clock::{Clock as _, SystemClock};
    let mut h = Harness::new("");
    let now = SystemClock.monotonic_ns();
    // The program reads the coarse clock, up to a tick behind this one: an
    // entry that expired a tick ago has expired for it too.
    let expired = now - proxy_common::bucket::COARSE_TICK_MAX_NS;
    h.dp.list_insert(List::Deny, &"192.0.2.10/32".parse().unwrap(), expired).unwrap();
    h.expect("expired", &syn(SRC), XDP_PASS, "pass", "under_rate");
    h.dp.list_insert(List::Deny, &"192.0.2.10/32".parse().unwrap(), now + 60_000_000_000).unwrap();
    h.expect("in force", &syn(SRC), XDP_DROP, "drop", "denied");
    let v6: Cidr = "2001:db8:1::/48".parse().unwrap();
    h.dp.list_insert(List::Deny, &v6, 0).unwrap();
    let f = frame::tcp6(Macs::TEST, src6(1), DST6, 1, PORT);
    h.expect("v6 denied", &f, XDP_DROP, "drop", "denied");
}

#[test]
fn dry_run_counts_but_never_drops() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("dry_run = true");
    h.dp.list_insert(List::Deny, &"192.0.2.99/32".parse().unwrap(), 0).unwrap();
    for _ in 0..60 {
        assert_eq!(h.run(&syn(SRC)), XDP_PASS);
    }
    assert!(h.count("pass", "rate") >= 38, "{}", h.count("pass", "rate"));
    assert_eq!(h.count("drop", "rate"), 0);
    h.expect("would deny", &syn(Ipv4Addr::new(192, 0, 2, 99)), XDP_PASS, "pass", "denied");
    // Turning dry run off live drops again, without reloading the program.
    h.dp.apply(config("").xdp()).unwrap();
    h.expect("now drops", &syn(SRC), XDP_DROP, "drop", "rate");
}

#[test]
fn ipv6_sources_share_a_bucket_per_prefix() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("ipv6_prefix = 64");
    let a = frame::tcp6(Macs::TEST, src6(1), DST6, 1, PORT);
    let b = frame::tcp6(Macs::TEST, src6(2), DST6, 1, PORT);
    let other = Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1);
    let c = frame::tcp6(Macs::TEST, other, DST6, 1, PORT);
    let mut pa = 0;
    for _ in 0..40 {
        pa += u32::from(h.run(&a) == XDP_PASS);
    }
    assert!((20..=22).contains(&pa), "{pa}");
    // Same /64: the shared bucket is empty.
    h.expect("same /64", &b, XDP_DROP, "drop", "rate");
    // Another /64: a fresh bucket.
    h.expect("other /64", &c, XDP_PASS, "pass", "under_rate");
    let (_, top) = h.dp.sources(5).unwrap();
    assert!(top.iter().any(|s| s.source == "2001:db8:1:2::"), "{top:?}");
}

#[test]
fn aggregate_bucket_holds_rotating_sources() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("aggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 1, burst = 5 }");
    let mut passed = 0;
    for i in 1..=200u8 {
        passed += u32::from(h.run(&syn(Ipv4Addr::new(203, 0, 113, i))) == XDP_PASS);
    }
    assert!((5..=6).contains(&passed), "{passed}");
    // Rejected new sources never got a per-source entry: no table churn.
    assert_eq!(h.dp.new_sources().unwrap(), u64::from(passed));
    // A different /24 has its own aggregate.
    h.expect("other /24", &syn(Ipv4Addr::new(203, 0, 114, 1)), XDP_PASS, "pass", "under_rate");
}

#[test]
fn admission_bucket_holds_floods_spread_over_many_prefixes() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("new_sources = { rate_pps = 1, burst = 10 }");
    // A source tracked before the flood keeps its own bucket.
    h.expect("known", &syn(SRC), XDP_PASS, "pass", "under_rate");
    let ack = |src| frame::tcp4_with(Macs::TEST, src, DST, 40_000, PORT, frame::ACK);
    let mut passed = 0;
    for i in 0..200u32 {
        // One new source in each of 200 different /24s: the aggregate cannot help.
        let src = Ipv4Addr::from(0x0b00_0000 + (i << 8));
        passed += u32::from(h.run(&ack(src)) == XDP_PASS);
    }
    assert!((9..=11).contains(&passed), "{passed} of 200 new sources admitted");
    assert_eq!(h.dp.new_sources().unwrap(), u64::from(passed) + 1, "refused sources got no table entry");
    h.expect("known during the flood", &syn(SRC), XDP_PASS, "pass", "under_rate");
    // With admission spent, a new source's SYN goes untracked to the
    // kernel's SYN cookies (a real visitor must be able to connect); its ACK
    // without a cookie the kernel issued, or any state the kernel holds, is
    // dropped; neither gets a table entry.
    let new = Ipv4Addr::new(11, 250, 0, 1);
    h.expect("new SYN, admission spent", &syn(new), XDP_PASS, "pass", "untracked");
    h.expect("new spoofed ACK, admission spent", &ack(new), XDP_DROP, "drop", "rate");
    assert_eq!(h.dp.new_sources().unwrap(), u64::from(passed) + 1, "untracked SYNs got a table entry");
}

/// A harness whose admission bucket and untracked cap are both spent, as
/// under a spoofed flood.
fn both_spent() -> Harness {
    let mut h = Harness::new("new_sources = { rate_pps = 1, burst = 1 }\nuntracked_syns = { rate_pps = 1, burst = 1 }");
    let syn_from = |src| frame::tcp4_with(Macs::TEST, src, DST, 40_000, PORT, frame::SYN);
    h.expect("admitted", &syn_from(Ipv4Addr::new(11, 0, 0, 1)), XDP_PASS, "pass", "under_rate");
    h.spend("challenge", ADMIT_NEW_SOURCES);
    h.expect("under the cap", &syn_from(Ipv4Addr::new(11, 0, 1, 1)), XDP_PASS, "pass", "untracked");
    h.spend("challenge", ADMIT_UNTRACKED_SYNS);
    h
}

/// `f` (a SYN whose TCP header starts at `tcp`) made a RST with sequence
/// number `seq` (what the client's TCP answers a challenge with; the
/// program reads no checksum).
fn rst(f: &[u8], tcp: usize, seq: u32) -> Vec<u8> {
    let mut r = f.to_vec();
    r[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    r[tcp + 8..tcp + 12].copy_from_slice(&[0; 4]);
    r[tcp + 13] = 0x04;
    r
}

/// Check that `out` is the challenge to the SYN `syn` (etherparse reads
/// both); returns its acknowledgement number.
fn check_challenge(syn: &[u8], out: &[u8]) -> u32 {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let a = SlicedPacket::from_ethernet(syn).expect("the SYN parses");
    let b = SlicedPacket::from_ethernet(out).expect("the challenge parses");
    assert_eq!(out.len(), syn.len(), "same length");
    assert_eq!((&out[..6], &out[6..12]), (&syn[6..12], &syn[..6]), "MACs swapped");
    assert_eq!(a.link_exts.len(), b.link_exts.len(), "VLAN tags kept");
    assert_eq!(out[12..14 + 4 * b.link_exts.len()], syn[12..14 + 4 * a.link_exts.len()], "tags and ethertype kept");
    let (Some(TransportSlice::Tcp(ta)), Some(TransportSlice::Tcp(tb))) = (&a.transport, &b.transport) else {
        panic!("TCP in both");
    };
    let csum = match (&a.net, &b.net) {
        (Some(NetSlice::Ipv4(ia)), Some(NetSlice::Ipv4(ib))) => {
            let (ha, hb) = (ia.header(), ib.header());
            assert_eq!((hb.source_addr(), hb.destination_addr()), (ha.destination_addr(), ha.source_addr()));
            assert_eq!(hb.ttl(), 64);
            let h = hb.to_header();
            assert_eq!(h.calc_header_checksum(), h.header_checksum, "IPv4 header checksum");
            tb.to_header().calc_checksum_ipv4(&h, tb.payload()).expect("checksum")
        }
        (Some(NetSlice::Ipv6(ia)), Some(NetSlice::Ipv6(ib))) => {
            let (ha, hb) = (ia.header(), ib.header());
            assert_eq!((hb.source_addr(), hb.destination_addr()), (ha.destination_addr(), ha.source_addr()));
            assert_eq!(hb.hop_limit(), 64);
            tb.to_header().calc_checksum_ipv6(&hb.to_header(), tb.payload()).expect("checksum")
        }
        _ => panic!("the same IP version in both"),
    };
    assert_eq!(csum, tb.checksum(), "TCP checksum");
    assert_eq!((tb.source_port(), tb.destination_port()), (ta.destination_port(), ta.source_port()));
    assert!(tb.syn() && tb.ack() && !tb.rst() && !tb.fin(), "SYN|ACK");
    assert_eq!(tb.options(), ta.options(), "options kept");
    let (isn, ack) = (ta.sequence_number(), tb.acknowledgment_number());
    let k = isn.wrapping_sub(ack);
    assert!((1..=32_768).contains(&k), "ack {ack} is not in [ISN - 32768, ISN - 1] (ISN {isn})");
    ack
}

/// The acknowledgement number the program would put in a challenge to `t`
/// with sequence number `isn` `back` time slots ago.
fn ack_of(h: &Harness, t: &Tuple, isn: u32, back: u64) -> u32 {
    let seed = h.dp.kernel_config().expect("read CONFIG").seed;
    let now = keyward_tests::xdp_reference::coarse_now();
    challenge::ack(isn, challenge::hash(t, challenge::slot(now) - back, seed))
}

/// Over the untracked cap: `syn` (its TCP header at `tcp`, from `src`) is
/// challenged, a RST with a wrong cookie or one two slots old proves
/// nothing, the right one proves the source, and its SYN then passes.
fn challenge_and_prove(h: &mut Harness, name: &str, syn: &[u8], tcp: usize, t: &Tuple, src: &str) {
    let total = h.total();
    let (v, out) = h.run_out(syn);
    assert_eq!(v, XDP_TX, "{name}: a SYN over the cap is answered");
    assert_eq!(h.count("tx", "challenge"), 1, "{name}: tx/challenge");
    assert_eq!(h.total(), total + 1);
    let ack = check_challenge(syn, &out);
    let isn = u32::from_be_bytes(syn[tcp + 4..tcp + 8].try_into().expect("seq"));
    assert_eq!(ack, ack_of(h, t, isn, 0), "{name}: the cookie of this slot");
    let tracked = h.dp.new_sources().unwrap();
    // Each RST checked spends the bucket of checks (here 1 a second, the
    // admission rate): filled before each, so that only the cookie decides.
    h.fill("challenge", ADMIT_PROOFS);
    h.expect(&format!("{name}: RST, wrong seq"), &rst(syn, tcp, ack.wrapping_add(1)), XDP_DROP, "drop", "rate");
    let old = ack_of(h, t, isn, 2);
    if challenge::COOKIE_MASK & (old ^ ack) != 0 {
        h.fill("challenge", ADMIT_PROOFS);
        h.expect(&format!("{name}: RST, two slots old"), &rst(syn, tcp, old), XDP_DROP, "drop", "rate");
    }
    // Over the bucket of checks even the right RST is not checked.
    h.spend("challenge", ADMIT_PROOFS);
    h.expect(&format!("{name}: RST, checks spent"), &rst(syn, tcp, ack), XDP_DROP, "drop", "rate");
    h.fill("challenge", ADMIT_PROOFS);
    let (_, top) = h.dp.sources(16).unwrap();
    assert!(!top.iter().any(|s| s.source == src), "{name}: tracked before its proof");
    assert_eq!(h.dp.new_sources().unwrap(), tracked);
    h.expect(&format!("{name}: RST answering the challenge"), &rst(syn, tcp, ack), XDP_DROP, "drop", "proven");
    assert_eq!(h.dp.new_sources().unwrap(), tracked + 1, "{name}: the proven source is tracked");
    let (_, top) = h.dp.sources(16).unwrap();
    assert!(top.iter().any(|s| s.source == src), "{name}: {top:?}");
    // The visitor's retransmitted SYN passes, as a known source.
    h.expect(&format!("{name}: SYN again"), syn, XDP_PASS, "pass", "under_rate");
}

#[test]
fn over_the_untracked_cap_a_syn_is_challenged_and_the_rst_proves_its_source() {
    if !privileged() {
        return;
    }
    let mut h = both_spent();
    let src = Ipv4Addr::new(11, 0, 2, 1);
    // Behind a VLAN tag: the tag stays.
    let plain = frame::tcp4(Macs::TEST, src, DST, 40_001, PORT);
    let syn = frame::ethernet(Macs::TEST, &[(0x8100, 7)], 0x0800, &plain[14..]);
    let t = Tuple {
        src: key_v4(src.octets(), 32),
        dst: key_v4(DST.octets(), 32),
        sport: 40_001u16.to_be_bytes(),
        dport: PORT.to_be_bytes(),
    };
    challenge_and_prove(&mut h, "v4", &syn, 38, &t, "11.0.2.1");
    // A SYN behind IPv4 options is not answered in place.
    let other = Ipv4Addr::new(11, 0, 3, 1);
    let tcp = frame::tcp4_header(other, DST, 1, PORT);
    let ip = frame::ipv4(other, DST, frame::TCP, &[1, 1, 1, 1], 0, &tcp);
    h.expect("options", &frame::ethernet(Macs::TEST, &[], 0x0800, &ip), XDP_DROP, "drop", "rate");
}

#[test]
fn over_the_untracked_cap_an_ipv6_syn_is_challenged_and_the_rst_proves_its_source() {
    if !privileged() {
        return;
    }
    let mut h = both_spent();
    let src = src6(77);
    let syn = frame::tcp6(Macs::TEST, src, DST6, 40_002, PORT);
    let t = Tuple {
        src: key_v6(src.octets(), 128),
        dst: key_v6(DST6.octets(), 128),
        sport: 40_002u16.to_be_bytes(),
        dport: PORT.to_be_bytes(),
    };
    challenge_and_prove(&mut h, "v6", &syn, 54, &t, "2001:db8:1:2::");
}

#[test]
fn in_dry_run_a_challenge_passes_the_syn_untouched() {
    if !privileged() {
        return;
    }
    let mut h = both_spent();
    let mut cfg = config(
        "new_sources = { rate_pps = 1, burst = 1 }\nuntracked_syns = { rate_pps = 1, burst = 1 }\ndry_run = true",
    );
    h.dp.apply(cfg.xdp()).unwrap();
    let syn = frame::tcp4(Macs::TEST, Ipv4Addr::new(11, 0, 4, 1), DST, 40_003, PORT);
    let (v, out) = h.run_out(&syn);
    assert_eq!((v, out), (XDP_PASS, syn.clone()));
    assert_eq!(h.count("pass", "challenge"), 1);
    cfg = config("new_sources = { rate_pps = 1, burst = 1 }\nuntracked_syns = { rate_pps = 1, burst = 1 }");
    h.dp.apply(cfg.xdp()).unwrap();
    assert_eq!(h.run_out(&syn).0, XDP_TX);
}

#[test]
fn header_variants_are_parsed() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("rate_pps = 1000000\nburst = 1000000");
    let tcp = frame::tcp4_header(SRC, DST, 1, PORT);
    let ip = frame::ipv4(SRC, DST, TCP, &[], 0, &tcp);
    let guarded = |name: &str, h: &mut Harness, f: &[u8]| h.expect(name, f, XDP_PASS, "pass", "under_rate");
    guarded("plain", &mut h, &frame::ethernet(Macs::TEST, &[], 0x0800, &ip));
    guarded("one vlan", &mut h, &frame::ethernet(Macs::TEST, &[(0x8100, 7)], 0x0800, &ip));
    guarded("qinq", &mut h, &frame::ethernet(Macs::TEST, &[(0x88a8, 7), (0x8100, 8)], 0x0800, &ip));
    let three = frame::ethernet(Macs::TEST, &[(0x88a8, 7), (0x8100, 8), (0x8100, 9)], 0x0800, &ip);
    h.expect("three tags", &three, XDP_PASS, "pass", "unguarded");
    for opts in [&[1u8, 1, 1, 1][..], &[1u8; 40][..]] {
        let ip = frame::ipv4(SRC, DST, TCP, opts, 0, &tcp);
        guarded("ipv4 options", &mut h, &frame::ethernet(Macs::TEST, &[], 0x0800, &ip));
    }
    let first_frag = frame::ipv4(SRC, DST, TCP, &[], 0x2000, &tcp);
    guarded("first fragment", &mut h, &frame::ethernet(Macs::TEST, &[], 0x0800, &first_frag));
    let later_frag = frame::ipv4(SRC, DST, TCP, &[], 0x2000 | 100, &tcp);
    h.expect("later fragment", &frame::ethernet(Macs::TEST, &[], 0x0800, &later_frag), XDP_PASS, "pass", "unguarded");

    let t6 = frame::tcp6_header(src6(1), DST6, 1, PORT);
    let v6 = |ext: &[(u8, Vec<u8>)], proto: u8| {
        frame::ethernet(Macs::TEST, &[], 0x86dd, &frame::ipv6(src6(1), DST6, ext, proto, &t6))
    };
    guarded("v6 plain", &mut h, &v6(&[], TCP));
    guarded(
        "v6 hop-by-hop, routing, destination, fragment",
        &mut h,
        &v6(&[(0, frame::ext8()), (43, frame::ext8()), (60, frame::ext8()), (44, frame::frag6(0, true))], TCP),
    );
    h.expect("v6 later fragment", &v6(&[(44, frame::frag6(10, false))], TCP), XDP_PASS, "pass", "unguarded");
    h.expect("v6 esp", &v6(&[], 50), XDP_PASS, "pass", "unguarded");
    let seven: Vec<(u8, Vec<u8>)> = (0..7).map(|_| (60, frame::ext8())).collect();
    h.expect("v6 too many extension headers", &v6(&seven, TCP), XDP_PASS, "pass", "malformed");
    let six: Vec<(u8, Vec<u8>)> = (0..6).map(|_| (60, frame::ext8())).collect();
    guarded("v6 six extension headers", &mut h, &v6(&six, TCP));
    // Found by the packet-path fuzz: another protocol after the sixth
    // extension header was taken for an unreachable TCP header.
    h.expect("v6 udp after six extension headers", &v6(&six, frame::UDP), XDP_PASS, "pass", "unguarded");
}

#[test]
fn malformed_frames_pass_and_are_counted() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new("rate_pps = 1000000\nburst = 1000000");
    // The kernel refuses test frames shorter than an Ethernet header; the
    // program never sees them.
    assert!(
        h.dp.program().unwrap().test_run(TestRunOptions { data_in: Some(&[]), ..TestRunOptions::default() }).is_err()
    );

    // Cut a full frame at every length from the end of Ethernet to one byte
    // short of the TCP header: each is malformed, none aborts.
    let v4 = syn(SRC);
    let v6 = frame::tcp6(Macs::TEST, src6(1), DST6, 1, PORT);
    let vlan = frame::ethernet(Macs::TEST, &[(0x8100, 1), (0x8100, 2)], 0x0800, &v4[14..]);
    for (name, full) in [("ipv4", &v4), ("ipv6", &v6), ("qinq ipv4", &vlan)] {
        for len in 14..full.len() {
            h.expect(&format!("{name} cut at {len}"), &full[..len], XDP_PASS, "pass", "malformed");
        }
        h.expect(&format!("{name} whole"), full, XDP_PASS, "pass", "under_rate");
    }
    // Garbled headers.
    let mut bad_ihl = v4.clone();
    bad_ihl[14] = 0x44;
    h.expect("ihl 4", &bad_ihl, XDP_PASS, "pass", "malformed");
    let mut bad_version = v4.clone();
    bad_version[14] = 0x65;
    h.expect("version 6 in an IPv4 ethertype", &bad_version, XDP_PASS, "pass", "malformed");
    let mut long_ihl = v4.clone();
    long_ihl[14] = 0x4f; // 60-byte header in a 54-byte frame
    h.expect("ihl past the end", &long_ihl, XDP_PASS, "pass", "malformed");
    let ext_cut =
        frame::ethernet(Macs::TEST, &[], 0x86dd, &frame::ipv6(src6(1), DST6, &[(0, vec![0u8; 13])], TCP, &[]));
    h.expect("v6 extension header longer than the frame", &ext_cut[..ext_cut.len() - 8], XDP_PASS, "pass", "malformed");
}

#[test]
fn cost_per_packet_is_reported() {
    if !privileged() {
        return;
    }
    // Information, not a test of speed: ns per run of a guarded packet of a
    // known source under the limit, from the kernel's own timing.
    let mut h = Harness::new(
        "rate_pps = 1000000000\nburst = 1000000000\naggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 1000000000, burst = 1000000000 }",
    );
    let f = syn(SRC);
    let p = h.dp.program().unwrap();
    let r = p.test_run(TestRunOptions { data_in: Some(&f), repeat: 100_000, ..TestRunOptions::default() }).unwrap();
    assert_eq!(r.return_value, XDP_PASS);
    eprintln!("info: keyward_xdp, known source under the limit: {} ns/packet (test run)", r.duration.as_nanos());
}

#[test]
fn tracked_sources_stay_held_by_their_prefix_until_they_show_a_handshake() {
    if !privileged() {
        return;
    }
    // Per source 10 pps, burst 20; per /24 1 pps, burst 10.
    let mut h = Harness::new("aggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 1, burst = 10 }");
    let at = |i: u8| Ipv4Addr::new(203, 0, 113, i);
    let ack = |i: u8| frame::tcp4_with(Macs::TEST, at(i), DST, 40_000, PORT, frame::ACK);
    // Ten addresses of one /24 become tracked, each through the aggregate.
    for i in 1..=10 {
        h.expect("new source", &syn(at(i)), XDP_PASS, "pass", "under_rate");
    }
    // The aggregate is spent: an eleventh new address is refused, and the
    // tracked ones, which never showed a handshake (spoofed SYNs, an ACK no
    // cookie or socket vouches for), stay held by it: a rotation through one
    // prefix cannot buy each address its own rate.
    h.expect("eleventh new source", &syn(at(11)), XDP_DROP, "drop", "rate");
    let mut passed = 10;
    for i in 1..=10 {
        for _ in 0..9 {
            passed += u32::from(h.run(&syn(at(i))) == XDP_PASS);
        }
        passed += u32::from(h.run(&ack(i)) == XDP_PASS);
    }
    assert!(passed <= 11, "{passed} packets of an unproven /24 passed; its aggregate burst is 10");
    assert_eq!(h.dp.new_sources().unwrap(), 10);
}
