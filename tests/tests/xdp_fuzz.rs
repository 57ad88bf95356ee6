//! The packet path, fuzzed differentially: random and mutated frames
//! (Ethernet, VLAN tags, IPv4 with options and fragments, IPv6 with
//! extension headers, TCP, UDP, ICMP, garbled lengths, random bytes), each
//! cut at every length, run through the real XDP program with
//! `BPF_PROG_TEST_RUN` and compared frame by frame with the host-side
//! reference decision (`keyward_tests::xdp_reference`, built on etherparse):
//! the verdict, which (action, reason) counter moved, and for a challenge
//! (`XDP_TX`) the frame sent back. Needs root.
//!
//! Property-based (proptest), not coverage-guided: the code under test runs
//! in the kernel, where no coverage instrumentation of a fuzzer reaches.
//! Seeded (`KEYWARD_FUZZ_SEED`, printed) and bounded by a case count:
//! about a minute in `cargo xtask test`; `cargo xtask fuzz` runs many more
//! (`KEYWARD_XDP_FUZZ_CASES`). The maps are planted through their pins
//! before each frame so that every decision is fixed (see `World`; the
//! per-source entries go into the slots the program's keyed hash picks,
//! with the seed read back from `CONFIG`), the untracked cap is planted
//! spent or full per frame, and the reference follows what the runs of one
//! frame change (`Round`: the aggregates charged and the sources a RST
//! proved, both compared with the maps after each frame; a RST is given the
//! right cookie now and then, so that proofs happen). The program runs in a
//! network namespace of its own, where no socket or SYN cookie can vouch for
//! a fuzzed packet.

use std::{
    cell::RefCell,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Instant,
};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions},
};
use keyward::{
    clock::{Clock as _, SystemClock},
    config::Config,
    dataplane::Dataplane,
    store::List,
};
use keyward_tests::{
    frame::{self, Macs},
    privileged,
    xdp_reference::{self as reference, Parsed, Planted, Round, WORLD_XDP, World, own_key},
};
use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{Config as ProptestConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};
use proxy_common::{
    ADMIT_NEW_SOURCES, ADMIT_UNTRACKED_SYNS, Action, Bucket, Reason, SourceKey, challenge, maps as names,
    prefix::{key_v4, key_v6},
    table::{self, Slot},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// Far enough ahead that a bucket planted spent stays spent (11.6 days).
const FAR_NS: u64 = 1_000_000_000_000_000;

/// Cases (frames, each run at every length): about a minute by default.
fn cases() -> u32 {
    std::env::var("KEYWARD_XDP_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

fn seed() -> u64 {
    std::env::var("KEYWARD_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x6b65_7977_6172_6421)
}

/// The maps the harness plants (opened from their pins).
struct Planting {
    sources: Array<MapData, Slot>,
    aggregates: HashMap<MapData, SourceKey, Bucket>,
    admit: Array<MapData, Bucket>,
}

struct Fuzz {
    dp: Dataplane,
    world: World,
    maps: Planting,
    /// Each planted source's slot in `SOURCES` and its entry.
    slots: Vec<(u32, Slot)>,
    /// The program's hash seed, read back from `CONFIG`.
    seed: u64,
    /// What the current frame's runs changed, as the reference has it.
    round: Round,
    /// After a disagreement the maps may hold what the reference does not
    /// know of: the next planting empties them whole.
    dirty: bool,
    /// Sources tracked before this round.
    tracked: u64,
    /// The counters after the last run, as (action, reason) → packets.
    last: Vec<(String, String, u64)>,
    runs: u64,
    pins: PathBuf,
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(dir: &std::path::Path, name: &str) -> T {
    let data = MapData::from_pin(dir.join(name)).expect("open pinned map");
    T::try_from(Map::from_map_data(data).expect("map type")).expect("map kind")
}

/// Where each of `world`'s sources lives in a table of `mask + 1` slots
/// hashed with `seed` (`proxy_common::table`), planted as `Planted` says;
/// `None` when three of them share a set (then no planting can hold them).
fn layout(world: &World, seed: u64, mask: u32) -> Option<Vec<(u32, Slot)>> {
    let now = SystemClock.monotonic_ns();
    let mut slots: Vec<(u32, Slot)> = Vec::new();
    for (c, p) in &world.sources {
        let key = own_key(c.addr());
        let tat_ns = match p {
            // Any arrival time long past is under the rate; the lowest bit
            // is the proven mark, and 0 would be an empty slot.
            Planted::Proven => 2 | Bucket::PROVEN,
            Planted::Unproven => 2,
            Planted::Over => (now + FAR_NS) & !Bucket::PROVEN,
        };
        let set = table::set_index(&key, seed, mask);
        let i = [set, set | 1].into_iter().find(|i| slots.iter().all(|(j, _)| j != i))?;
        slots.push((i, Slot { key, bucket: Bucket { tat_ns, packets: 0, drops: 0 } }));
    }
    Some(slots)
}

/// Load the program and pin its maps; again (a new seed) in the unlikely
/// case that three planted sources share a set.
fn load(world: &World, pins: &std::path::Path) -> (Dataplane, u64, Vec<(u32, Slot)>) {
    let text = format!("[xdp]\ninterface = \"lo\"\n{WORLD_XDP}");
    let cfg = Config::parse(std::path::Path::new("fuzz.toml"), &text).expect("fuzz config");
    for _ in 0..8 {
        let mut dp = Dataplane::load(cfg.xdp()).expect("load XDP object");
        let k = dp.kernel_config().expect("read CONFIG");
        if let Some(slots) = layout(world, k.seed, k.table_mask) {
            dp.pin(pins).expect("pin maps");
            return (dp, k.seed, slots);
        }
    }
    panic!("eight seeds in a row put three planted sources in one set");
}

impl Fuzz {
    fn new() -> Fuzz {
        let world = World::new();
        let pins = PathBuf::from(format!("/sys/fs/bpf/kwt{}-xdpfuzz", std::process::id()));
        let (mut dp, seed, slots) = load(&world, &pins);
        let maps = Planting {
            sources: open(&pins, names::SOURCES),
            aggregates: open(&pins, names::AGGREGATES),
            admit: open(&pins, names::ADMIT),
        };
        let now = SystemClock.monotonic_ns();
        for (c, expired) in &world.deny {
            dp.list_insert(List::Deny, c, if *expired { 1 } else { now + FAR_NS }).expect("deny");
        }
        for c in &world.allow {
            dp.list_insert(List::Allow, c, 0).expect("allow");
        }
        let last = counts(&dp);
        let round = Round::new(seed, false);
        Fuzz { dp, world, maps, slots, seed, round, dirty: false, tracked: 0, last, runs: 0, pins }
    }

    /// Reset the maps to the world's planting for a new round: the
    /// sources the last round proved and the aggregates emptied, the
    /// planted entries written, the admission bucket spent, the bucket of
    /// RSTs checked full, and the untracked cap spent or full.
    fn plant(&mut self, cap_spent: bool) {
        if std::mem::take(&mut self.dirty) || !self.round.proven.is_empty() {
            self.empty_all();
        }
        self.round = Round::new(self.seed, cap_spent);
        self.tracked = self.dp.new_sources().expect("new sources");
        let keys: Vec<SourceKey> = self.maps.aggregates.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.maps.aggregates.remove(&k);
        }
        for (i, slot) in &self.slots {
            self.maps.sources.set(*i, *slot, 0).expect("plant source");
        }
        let now = SystemClock.monotonic_ns();
        let spent = Bucket { tat_ns: (now + FAR_NS) & !Bucket::PROVEN, packets: 0, drops: 0 };
        for c in &self.world.spent {
            self.maps.aggregates.insert(key(c.addr(), 24, 48), spent, 0).expect("plant aggregate");
        }
        self.maps.admit.set(ADMIT_NEW_SOURCES, spent, 0).expect("spend admission");
        let cap = if cap_spent { spent } else { Bucket::default() };
        self.maps.admit.set(ADMIT_UNTRACKED_SYNS, cap, 0).expect("plant the untracked cap");
        self.maps.admit.set(proxy_common::ADMIT_PROOFS, Bucket::default(), 0).expect("fill the proofs bucket");
    }

    /// Empty `SOURCES` whole (after a disagreement, before proptest runs
    /// the next, smaller input, or after a round tracked proven sources).
    fn empty_all(&mut self) {
        for i in 0..self.maps.sources.len() {
            self.maps.sources.set(i, Slot::default(), 0).expect("empty SOURCES");
        }
    }

    /// Run `f` at every length from the end of Ethernet; each must match,
    /// and so must the maps the runs changed.
    fn check_all(&mut self, f: &Frame) -> Result<(), TestCaseError> {
        self.plant(f.cap_spent);
        let bytes = if f.cookie { self.with_cookie(&f.bytes) } else { f.bytes.clone() };
        let r = (14..=bytes.len()).try_for_each(|len| self.check(&bytes[..len])).and_then(|()| self.check_maps());
        self.dirty = r.is_err();
        r
    }

    /// A RST given the cookie of this time slot as its sequence number
    /// (what a client answering a challenge sends); any other frame as it is.
    fn with_cookie(&self, f: &[u8]) -> Vec<u8> {
        let mut out = f.to_vec();
        if let Parsed::Tcp { flags, tuple, seq, bare: Some(tcp), .. } = reference::parse(f)
            && flags & 0x17 == 0x04
        {
            let h = challenge::hash(&tuple, challenge::slot(reference::coarse_now()), self.seed);
            let cookie = (seq & !challenge::COOKIE_MASK) | (h as u32 & challenge::COOKIE_MASK);
            out[tcp + 4..tcp + 8].copy_from_slice(&cookie.to_be_bytes());
        }
        out
    }

    /// The aggregates as the reference has them, and only the sources a
    /// RST proved tracked (the admission bucket is spent and nothing can
    /// show a handshake).
    fn check_maps(&self) -> Result<(), TestCaseError> {
        let mut want: Vec<SourceKey> = self.round.charged.iter().map(|a| key(*a, 24, 48)).collect();
        want.extend(self.world.spent.iter().map(|c| key(c.addr(), 24, 48)));
        want.sort_by_key(|k| k.addr);
        want.dedup();
        let mut got: Vec<SourceKey> = self.maps.aggregates.keys().filter_map(Result::ok).collect();
        got.sort_by_key(|k| k.addr);
        if got != want {
            return Err(TestCaseError::fail(format!("aggregates: the program holds {got:?}, the reference {want:?}")));
        }
        let new = self.dp.new_sources().expect("new sources") - self.tracked;
        if new != self.round.proven.len() as u64 {
            return Err(TestCaseError::fail(format!("{new} sources were tracked, {} proven", self.round.proven.len())));
        }
        Ok(())
    }

    fn check(&mut self, f: &[u8]) -> Result<(), TestCaseError> {
        let want = self.world.decide(f, &mut self.round);
        let action = match want.verdict() {
            Action::Pass => XDP_PASS,
            Action::Drop => XDP_DROP,
            Action::Tx => XDP_TX,
        };
        let p = self.dp.program().expect("program");
        let mut out = vec![0u8; f.len() + 256];
        let got =
            p.test_run(TestRunOptions { data_in: Some(f), data_out: Some(&mut out), ..TestRunOptions::default() });
        let got = got.map_err(|e| TestCaseError::fail(format!("test run failed: {e}; frame {}", hex(f))))?;
        out.truncate(got.data_size_out as usize);
        self.runs += 1;
        let now = counts(&self.dp);
        let moved: Vec<(String, String, u64)> = now
            .iter()
            .zip(&self.last)
            .filter(|(a, b)| a.2 != b.2)
            .map(|(a, b)| (a.0.clone(), a.1.clone(), a.2 - b.2))
            .collect();
        self.last = now;
        let expected = vec![(want.verdict().name().to_owned(), want.name().to_owned(), 1)];
        if got.return_value != action || moved != expected {
            return Err(TestCaseError::fail(format!(
                "frame of {} bytes: reference says XDP {action} {}/{}, program returned XDP {} and moved {moved:?}\n\
                 frame hex: {}",
                f.len(),
                want.verdict().name(),
                want.name(),
                got.return_value,
                hex(f),
            )));
        }
        if want == Reason::Challenge {
            return self.check_challenge(f, &out);
        }
        Ok(())
    }

    /// The frame a challenge sent back: the reference's, checksums checked
    /// by their sums (`xdp_reference::sums_agree`).
    fn check_challenge(&self, f: &[u8], out: &[u8]) -> Result<(), TestCaseError> {
        let Parsed::Tcp { bare: Some(tcp), .. } = reference::parse(f) else {
            return Err(TestCaseError::fail(format!("a challenge to a frame that is no bare SYN: {}", hex(f))));
        };
        let want = reference::challenge_frame(f, tcp, reference::coarse_now(), self.seed);
        let mask = |b: &[u8]| {
            let mut b = b.to_vec();
            b[tcp + 16..tcp + 18].fill(0);
            if tcp >= 34 && !(tcp >= 54 && b[tcp - 42..tcp - 40] == [0x86, 0xdd]) {
                b[tcp - 10..tcp - 8].fill(0);
            }
            b
        };
        if mask(out) != mask(&want) || !reference::sums_agree(f, out, tcp) {
            return Err(TestCaseError::fail(format!(
                "challenge to {}:\n program sent {}\n reference   {} (checksums aside; sums agree: {})",
                hex(f),
                hex(out),
                hex(&want),
                reference::sums_agree(f, out, tcp)
            )));
        }
        Ok(())
    }
}

impl Drop for Fuzz {
    fn drop(&mut self) {
        keyward::dataplane::remove_pins(&self.pins);
    }
}

/// A source's table key: IPv4 masked to `v4`, IPv6 to `v6`.
fn key(a: IpAddr, v4: u32, v6: u32) -> SourceKey {
    match a {
        IpAddr::V4(a) => key_v4(a.octets(), v4),
        IpAddr::V6(a) => key_v6(a.octets(), v6),
    }
}

fn counts(dp: &Dataplane) -> Vec<(String, String, u64)> {
    dp.counters().expect("counters").into_iter().map(|c| (c.action, c.reason, c.packets)).collect()
}

fn hex(f: &[u8]) -> String {
    f.iter().fold(String::with_capacity(f.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// ---- The frames ----

/// A layer-4 header and payload with its protocol number.
fn l4() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let port = prop_oneof![Just(443u16), Just(8443), Just(22), Just(53), any::<u16>()];
    let flags = prop_oneof![Just(0x02u8), Just(0x10), Just(0x12), Just(0x04), Just(0x18), Just(0x11), any::<u8>()];
    let off = prop_oneof![4 => Just(5u8), 1 => 0u8..16];
    let tcp = (port.clone(), flags, off, prop::collection::vec(any::<u8>(), 0..12)).prop_map(|(dport, fl, off, pl)| {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        t[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
        t[12] = off << 4;
        t[13] = fl;
        t.extend(pl);
        (frame::TCP, t)
    });
    let udp = (port, prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(dport, pl)| {
        let mut u = 40_000u16.to_be_bytes().to_vec();
        u.extend(dport.to_be_bytes());
        u.extend(((8 + pl.len()) as u16).to_be_bytes());
        u.extend([0, 0]);
        u.extend(pl);
        (frame::UDP, u)
    });
    let icmp = Just((1u8, vec![8, 0, 0, 0, 0, 1, 0, 1]));
    let other = (any::<u8>(), prop::collection::vec(any::<u8>(), 0..24));
    prop_oneof![6 => tcp, 2 => udp, 1 => icmp, 1 => other]
}

fn v4_src() -> impl Strategy<Value = Ipv4Addr> {
    let (v4, _) = World::new().interesting();
    prop_oneof![
        3 => prop::sample::select(v4),
        1 => (0u8..16, any::<u16>()).prop_map(|(b, cd)| Ipv4Addr::new(10, b, (cd >> 8) as u8, cd as u8)),
        1 => any::<[u8; 4]>().prop_map(Ipv4Addr::from),
    ]
}

fn v6_src() -> impl Strategy<Value = Ipv6Addr> {
    let (_, v6) = World::new().interesting();
    prop_oneof![3 => prop::sample::select(v6), 1 => any::<[u8; 16]>().prop_map(Ipv6Addr::from)]
}

fn ipv4() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let frag =
        prop_oneof![4 => Just(0u16), 1 => Just(0x4000), 1 => Just(0x2000), 1 => Just(0x2000 | 185), 1 => any::<u16>()];
    let opts = prop_oneof![3 => Just(vec![]), 1 => prop::collection::vec(any::<u8>(), 1..=40)];
    let garble = prop::option::weighted(0.15, (any::<u8>(), any::<u16>()));
    (v4_src(), opts, frag, l4(), garble).prop_map(|(src, opts, frag, (proto, l4), garble)| {
        let mut ip = frame::ipv4(src, Ipv4Addr::new(198, 51, 100, 200), proto, &opts, frag, &l4);
        // A wrong version/IHL byte or total length.
        if let Some((vihl, total)) = garble {
            ip[0] = vihl;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
        }
        (0x0800, ip)
    })
}

/// An IPv6 extension header: its type and body (without the next-header byte).
fn ext() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let opts = (prop_oneof![Just(0u8), Just(43), Just(60)], 0u8..3).prop_map(|(t, len)| {
        let mut b = vec![0u8; (usize::from(len) + 1) * 8 - 1];
        b[0] = len;
        (t, b)
    });
    let ah = (0u8..5).prop_map(|len| {
        let mut b = vec![0u8; (usize::from(len) + 2) * 4 - 1];
        b[0] = len;
        (51u8, b)
    });
    let frag =
        (prop_oneof![3 => Just(0u16), 1 => 1u16..8192], any::<bool>()).prop_map(|(o, m)| (44u8, frame::frag6(o, m)));
    prop_oneof![3 => opts, 1 => ah, 1 => frag]
}

fn ipv6() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let chain = prop_oneof![2 => Just(vec![]), 3 => prop::collection::vec(ext(), 1..=8)];
    (v6_src(), chain, l4()).prop_map(|(src, chain, (proto, l4))| {
        (0x86dd, frame::ipv6(src, Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1), &chain, proto, &l4))
    })
}

fn other_l3() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let et = prop_oneof![Just(0x0806u16), Just(0x88cc), Just(0x9100), Just(0x8100), any::<u16>()];
    (et, prop::collection::vec(any::<u8>(), 0..48))
}

/// A frame, shown as hex (in proptest's report of the minimal input),
/// whether the untracked cap is planted spent while it runs, and whether a
/// RST gets the cookie of a challenge as its sequence number.
#[derive(Clone)]
struct Frame {
    bytes: Vec<u8>,
    cap_spent: bool,
    cookie: bool,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cap = if self.cap_spent { "spent" } else { "full" };
        write!(f, "{} (untracked cap {cap}, cookie {})", hex(&self.bytes), self.cookie)
    }
}

/// A whole frame: tags, a network layer, then up to four bytes overwritten.
fn frames() -> impl Strategy<Value = Frame> {
    let tags = prop::collection::vec((prop_oneof![Just(0x8100u16), Just(0x88a8), Just(0x9100)], any::<u16>()), 0..=3);
    let tags = prop_oneof![3 => Just(vec![]), 1 => tags];
    let l3 = prop_oneof![4 => ipv4(), 4 => ipv6(), 1 => other_l3()];
    let edits = prop::collection::vec((any::<Index>(), any::<u8>()), 0..4);
    let built = (tags, l3, edits).prop_map(|(tags, (et, l3), edits)| {
        let mut f = frame::ethernet(Macs::TEST, &tags, et, &l3);
        for (i, b) in edits {
            let at = i.index(f.len());
            f[at] = b;
        }
        f
    });
    let bytes = prop_oneof![9 => built, 1 => prop::collection::vec(any::<u8>(), 14..120)];
    (bytes, any::<bool>(), any::<bool>()).prop_map(|(bytes, cap_spent, cookie)| Frame { bytes, cap_spent, cookie })
}

#[test]
fn the_program_decides_every_frame_as_the_reference_does() {
    if !privileged() {
        return;
    }
    // A thread of its own so the new network namespace ends with it.
    let t = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a network namespace of our own");
        let (cases, seed) = (cases(), seed());
        eprintln!("info: packet-path fuzz: {cases} cases, KEYWARD_FUZZ_SEED={seed}");
        let fuzz = RefCell::new(Fuzz::new());
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
        let start = Instant::now();
        let r = runner.run(&frames(), |f| fuzz.borrow_mut().check_all(&f));
        let runs = fuzz.borrow().runs;
        eprintln!("info: {runs} frames run in {:.1} s", start.elapsed().as_secs_f64());
        if let Err(e) = r {
            panic!("the XDP program and the reference disagree (seed {seed}):\n{e}");
        }
        // The challenge and its proof were exercised, not only modelled.
        let c = counts(&fuzz.borrow().dp);
        let n = |a: &str, r: &str| c.iter().filter(|x| x.0 == a && x.1 == r).map(|x| x.2).sum::<u64>();
        let (tx, proven) = (n("tx", "challenge"), n("drop", "proven"));
        eprintln!("info: {tx} challenges sent, {proven} sources proven");
        if cases >= 1_000 {
            assert!(tx > 0 && proven > 0, "{tx} challenges, {proven} proofs: the fuzz no longer reaches them");
        }
    });
    if let Err(e) = t.join() {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn the_reference_agrees_with_the_hand_built_table() {
    // The reference itself, on frames whose decision xdp_test_run.rs states.
    let w = World::new();
    let mut r = Round::new(0, false);
    let v4 = frame::tcp4(Macs::TEST, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 1, 443);
    assert_eq!(w.decide(&v4, &mut r), Reason::Untracked);
    let mut bad_ihl = v4.clone();
    bad_ihl[14] = 0x44;
    assert_eq!(w.decide(&bad_ihl, &mut r), Reason::Malformed);
    let seven: Vec<(u8, Vec<u8>)> = (0..7).map(|_| (60, frame::ext8())).collect();
    let a = Ipv6Addr::new(0x2001, 0xdb8, 1, 1, 0, 0, 0, 1);
    let t6 = frame::tcp6_header(a, a, 1, 443);
    let deep = frame::ethernet(Macs::TEST, &[], 0x86dd, &frame::ipv6(a, a, &seven, frame::TCP, &t6));
    assert_eq!(w.decide(&deep, &mut r), Reason::Malformed);
    let six: Vec<(u8, Vec<u8>)> = (0..6).map(|_| (60, frame::ext8())).collect();
    let six = frame::ethernet(Macs::TEST, &[], 0x86dd, &frame::ipv6(a, a, &six, frame::TCP, &t6));
    assert_eq!(w.decide(&six, &mut r), Reason::UnderRate);
    let later = frame::ipv4(
        Ipv4Addr::new(198, 51, 100, 2),
        a.to_ipv4_mapped().unwrap_or(Ipv4Addr::LOCALHOST),
        6,
        &[],
        100,
        &[],
    );
    assert_eq!(w.decide(&frame::ethernet(Macs::TEST, &[], 0x0800, &later), &mut r), Reason::Unguarded);
}
