//! The host-side reference decision of the XDP program, for the packet-path
//! differential fuzz (`tests/xdp_fuzz.rs`): what docs/kernel.md says the
//! program decides for a frame, computed from headers parsed by a packet
//! library (etherparse) instead of the program's own walk, against a fixed
//! [`World`] of maps whose answers do not depend on time, and a [`Round`]
//! that follows what one frame's runs change: the aggregates charged and
//! the sources a RST proved (checked with the program's own keyed cookie,
//! `proxy_common::challenge`, the seed it was loaded with and the coarse
//! clock). For a challenge (`XDP_TX`) it also builds the frame the program
//! must send back ([`challenge_frame`]).
//!
//! Where the program reads less than a full header, the reference says so
//! and reads the same: only the fixed 20 bytes of the TCP header (the data
//! offset is not checked), and only the next-header and length bytes of an
//! IPv6 extension header (its declared length need not fit; whatever it
//! points past the end of the frame is then out of reach).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpAuthHeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice,
    Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice, TcpHeaderSlice,
};
use keyward::units::Cidr;
use proxy_common::{
    Reason, SourceKey,
    challenge::{self, Tuple},
    prefix::{key_v4, key_v6},
};

/// The TCP flags the decision looks at.
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;
pub const FIN: u8 = 0x01;

/// How far the IPv6 walk goes (docs/kernel.md: "up to 6 extension headers").
const V6_EXT_MAX: usize = 6;

/// What the headers say, before any map is consulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Decided by the headers alone (`unguarded`, `malformed`).
    Verdict(Reason),
    /// A TCP packet: its source, destination port and flags, the cookie's
    /// 4-tuple and its sequence number, and where its TCP header starts
    /// when it follows the IP header directly (no IPv4 options, no IPv6
    /// extension headers: a SYN the challenge may answer).
    Tcp { src: IpAddr, dport: u16, flags: u8, tuple: Tuple, seq: u32, bare: Option<usize> },
    /// The source is known, the TCP header is out of reach.
    Unattributed(IpAddr),
}

/// The state a per-source entry is planted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planted {
    /// Has shown a handshake, under its rate.
    Proven,
    /// Has not shown a handshake, under its rate.
    Unproven,
    /// Over its rate (arrival time far in the future).
    Over,
}

/// The maps the program is run against: guarded ports, allow and deny
/// lists (one deny entry expired), planted per-source entries, aggregates
/// planted spent, rates otherwise too high to matter, and the admission
/// bucket spent (so a new source is never admitted: its SYN is
/// `untracked` under the untracked cap, and over it answered with a
/// `challenge`; its RST is `proven` when it carries the cookie of the
/// current or last time slot; anything else `rate`).
pub struct World {
    pub ports: &'static [u16],
    pub allow: Vec<Cidr>,
    /// Deny entries and whether each has expired.
    pub deny: Vec<(Cidr, bool)>,
    /// IPv4 sources per address, IPv6 per `/64`.
    pub sources: Vec<(Cidr, Planted)>,
    /// Aggregates (IPv4 `/24`, IPv6 `/48`) whose bucket is spent.
    pub spent: Vec<Cidr>,
}

/// The XDP config the [`World`] assumes (rates that always admit, unless
/// a bucket is planted spent).
pub const WORLD_XDP: &str = "ports = [443, 8443]\nrate_pps = 1000000000\nburst = 1000000000\nipv6_prefix = 64\n\
    aggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 1000000000, burst = 1000000000 }\n\
    new_sources = { rate_pps = 1, burst = 1 }\nuntracked_syns = { rate_pps = 1000000000, burst = 1000000000 }\n\
    table_size = 4096\n";

/// Per-source prefix of IPv6 sources in [`WORLD_XDP`].
pub const V6_PREFIX: u32 = 64;
/// Aggregate prefixes in [`WORLD_XDP`].
pub const AGG_V4_PREFIX: u8 = 24;
pub const AGG_V6_PREFIX: u8 = 48;

/// What one frame's runs change, for the reference to follow: planted
/// afresh before each frame.
#[derive(Clone, Debug)]
pub struct Round {
    /// The program's hash seed (`XdpConfig::seed`, random per load).
    pub seed: u64,
    /// The host-wide cap on untracked SYNs is planted spent for the whole
    /// frame (else it is planted full, and never runs out in one frame).
    pub cap_spent: bool,
    /// The aggregates charged (each created by its first charge), by the
    /// address of their wider prefix.
    pub charged: BTreeSet<IpAddr>,
    /// Sources a RST proved (tracked by the program), by their own key.
    pub proven: BTreeSet<[u8; 16]>,
}

impl Round {
    /// A round with no aggregate charged and no source proven.
    pub fn new(seed: u64, cap_spent: bool) -> Round {
        Round { seed, cap_spent, charged: BTreeSet::new(), proven: BTreeSet::new() }
    }
}

/// `CLOCK_MONOTONIC_COARSE`, the program's clock.
pub fn coarse_now() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).expect("the coarse clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The challenge the program must send for the SYN `f` whose TCP header
/// starts at `tcp` (behind a bare IP header), built from the docs
/// (docs/kernel.md, "Admission spent") rather than the program's code:
/// MACs, addresses and ports swapped, TTL or hop limit 64, flags SYN|ACK,
/// window 65,535, the sequence number and acknowledgement number of
/// `proxy_common::challenge`, everything else as it came. The checksum
/// fields are left as they came: the caller checks them by their sums
/// ([`sums_agree`]).
pub fn challenge_frame(f: &[u8], tcp: usize, now_ns: u64, seed: u64) -> Vec<u8> {
    let mut o = f.to_vec();
    o[..6].copy_from_slice(&f[6..12]);
    o[6..12].copy_from_slice(&f[..6]);
    let (ip, alen, ttl_at) = if is_v6(f, tcp) { (tcp - 40, 16, tcp - 40 + 7) } else { (tcp - 20, 4, tcp - 20 + 8) };
    let (s, d) = if alen == 4 { (ip + 12, ip + 16) } else { (ip + 8, ip + 24) };
    o[s..s + alen].copy_from_slice(&f[d..d + alen]);
    o[d..d + alen].copy_from_slice(&f[s..s + alen]);
    o[ttl_at] = challenge::TTL;
    let t = &f[tcp..];
    o[tcp..tcp + 2].copy_from_slice(&t[2..4]);
    o[tcp + 2..tcp + 4].copy_from_slice(&t[..2]);
    let isn = u32::from_be_bytes(t[4..8].try_into().unwrap());
    let (src, dst) = if alen == 4 {
        (key_v4(f[s..s + 4].try_into().unwrap(), 32), key_v4(f[d..d + 4].try_into().unwrap(), 32))
    } else {
        (key_v6(f[s..s + 16].try_into().unwrap(), 128), key_v6(f[d..d + 16].try_into().unwrap(), 128))
    };
    let tuple = Tuple { src, dst, sport: t[..2].try_into().unwrap(), dport: t[2..4].try_into().unwrap() };
    let h = challenge::hash(&tuple, challenge::slot(now_ns), seed);
    o[tcp + 4..tcp + 8].copy_from_slice(&challenge::seq(h).to_be_bytes());
    o[tcp + 8..tcp + 12].copy_from_slice(&challenge::ack(isn, h).to_be_bytes());
    o[tcp + 13] = SYN | ACK;
    o[tcp + 14..tcp + 16].copy_from_slice(&challenge::WINDOW.to_be_bytes());
    o
}

/// The ones'-complement sum of `b` as 16-bit words (the last byte padded).
fn ones_sum(b: &[u8]) -> u16 {
    let mut s: u64 = b.chunks(2).map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Whether a challenge's checksums were updated correctly: over the IP
/// header (IPv4) and the fixed TCP header, checksum fields included, the
/// ones'-complement sums of `got` equal those of the SYN `f` (0 and 0xffff
/// being the same number). A swap does not change a sum, so a SYN whose
/// checksums were right gets a challenge whose checksums are right, and
/// one whose were wrong, wrong by as much.
pub fn sums_agree(f: &[u8], got: &[u8], tcp: usize) -> bool {
    let same = |a: u16, b: u16| a == b || (a | b == 0xffff && (a == 0 || b == 0));
    let ip = is_v6(f, tcp) || same(ones_sum(&f[tcp - 20..tcp]), ones_sum(&got[tcp - 20..tcp]));
    ip && same(ones_sum(&f[tcp..tcp + 20]), ones_sum(&got[tcp..tcp + 20]))
}

/// Whether the bare IP header before the TCP header at `tcp` is IPv6.
fn is_v6(f: &[u8], tcp: usize) -> bool {
    // The ethertype just before the IP header says which (20 or 40 bytes back).
    tcp >= 54 && u16::from_be_bytes([f[tcp - 42], f[tcp - 41]]) == 0x86dd
}

/// The key of a source's own bucket: IPv4 per address, IPv6 per
/// [`V6_PREFIX`].
pub fn own_key(src: IpAddr) -> SourceKey {
    match src {
        IpAddr::V4(a) => key_v4(a.octets(), 32),
        IpAddr::V6(a) => key_v6(a.octets(), V6_PREFIX),
    }
}

/// The address of a source's aggregate prefix.
pub fn wide(src: IpAddr) -> IpAddr {
    let prefix = if src.is_ipv4() { AGG_V4_PREFIX } else { AGG_V6_PREFIX };
    Cidr::covering(src, prefix).addr()
}

impl World {
    /// The one world the fuzz runs in.
    pub fn new() -> World {
        let c = |s: &str| s.parse::<Cidr>().expect("world cidr");
        World {
            ports: &[443, 8443],
            allow: vec![c("192.0.2.0/24"), c("2001:db8:a11::/48")],
            deny: vec![
                (c("192.0.2.128/25"), false),
                (c("192.0.2.64/26"), true),
                (c("2001:db8:a11:bad::/64"), false),
                (c("2001:db8:dead::/48"), false),
                (c("2001:db8:0:e::/64"), true),
            ],
            sources: vec![
                (c("198.51.100.1/32"), Planted::Proven),
                (c("198.51.100.2/32"), Planted::Over),
                (c("198.51.100.3/32"), Planted::Unproven),
                (c("203.0.113.5/32"), Planted::Proven),
                (c("203.0.113.6/32"), Planted::Unproven),
                (c("2001:db8:1:1::/64"), Planted::Proven),
                (c("2001:db8:1:2::/64"), Planted::Over),
                (c("2001:db8:1:3::/64"), Planted::Unproven),
                (c("2001:db8:2:1::/64"), Planted::Proven),
                (c("2001:db8:2:2::/64"), Planted::Unproven),
            ],
            spent: vec![c("203.0.113.0/24"), c("2001:db8:2::/48")],
        }
    }

    /// Addresses worth generating: one inside each planted or listed range.
    pub fn interesting(&self) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let nets = self.allow.iter().chain(self.deny.iter().map(|(c, _)| c)).chain(self.sources.iter().map(|(c, _)| c));
        for c in nets.chain(self.spent.iter()) {
            match c.addr() {
                IpAddr::V4(a) => v4.extend([a, Ipv4Addr::from(u32::from(a) | 7)]),
                IpAddr::V6(a) => v6.extend([a, Ipv6Addr::from(u128::from(a) | 0x1234)]),
            }
        }
        (v4, v6)
    }

    /// The reason the program must give `frame`, in `round`.
    pub fn decide(&self, frame: &[u8], round: &mut Round) -> Reason {
        match parse(frame) {
            Parsed::Verdict(r) => r,
            Parsed::Tcp { dport, .. } if !self.ports.contains(&dport) => Reason::Unguarded,
            Parsed::Tcp { src, flags, tuple, seq, bare, .. } => {
                self.judge(src, Some(TcpSeen { flags, tuple, seq, bare: bare.is_some() }), round)
            }
            Parsed::Unattributed(src) => match self.judge(src, None, round) {
                Reason::UnderRate => Reason::Malformed,
                r => r,
            },
        }
    }

    /// Lists, then buckets (docs/kernel.md, "How it decides"). `tcp`:
    /// what the decision reads of the TCP header, when it was reached.
    fn judge(&self, src: IpAddr, tcp: Option<TcpSeen>, round: &mut Round) -> Reason {
        if self.deny.iter().any(|(c, expired)| !expired && c.contains(src)) {
            return Reason::Denied;
        }
        if self.allow.iter().any(|c| c.contains(src)) {
            return Reason::Allowed;
        }
        let planted = self.sources.iter().find(|(c, _)| c.contains(src)).map(|(_, p)| *p);
        // A source a RST proved earlier in this round is tracked, proven.
        let planted = planted.or_else(|| round.proven.contains(&own_key(src).addr).then_some(Planted::Proven));
        match planted {
            // Over its own bucket: dropped, and not charged to its prefix.
            Some(Planted::Over) => return Reason::Rate,
            // Held by its own bucket only.
            Some(Planted::Proven) => return Reason::UnderRate,
            // No packet here can show a handshake: the fuzz runs in a network
            // namespace of its own, with no socket and no SYN cookie sent.
            Some(Planted::Unproven) | None => {}
        }
        round.charged.insert(wide(src));
        if self.spent.iter().any(|c| c.contains(src)) {
            return Reason::Rate;
        }
        if planted.is_some() {
            return Reason::UnderRate;
        }
        // A new source, and the admission bucket is spent: its SYN meets
        // the untracked cap.
        match tcp {
            Some(t) if t.flags & (SYN | ACK) == SYN => match (round.cap_spent, t.bare) {
                (false, _) => Reason::Untracked,
                // Over the cap: the challenge, when the SYN can be answered in place.
                (true, true) => Reason::Challenge,
                (true, false) => Reason::Rate,
            },
            Some(t)
                if t.flags & (SYN | ACK | RST | FIN) == RST
                    && challenge::verify(&t.tuple, t.seq, coarse_now(), round.seed) =>
            {
                round.proven.insert(own_key(src).addr);
                Reason::Proven
            }
            _ => Reason::Rate,
        }
    }
}

/// What the decision reads of a TCP header.
#[derive(Clone, Copy)]
struct TcpSeen {
    flags: u8,
    tuple: Tuple,
    seq: u32,
    bare: bool,
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// Ethernet, up to two 802.1Q / 802.1ad tags, then IP.
pub fn parse(f: &[u8]) -> Parsed {
    let Ok(eth) = Ethernet2HeaderSlice::from_slice(f) else {
        return Parsed::Verdict(Reason::Malformed);
    };
    let mut et = eth.ether_type();
    let mut rest = &f[eth.slice().len()..];
    for _ in 0..2 {
        if et == EtherType::VLAN_TAGGED_FRAME || et == EtherType::PROVIDER_BRIDGING {
            let Ok(tag) = SingleVlanHeaderSlice::from_slice(rest) else {
                return Parsed::Verdict(Reason::Malformed);
            };
            et = tag.ether_type();
            rest = &rest[tag.slice().len()..];
        }
    }
    let base = f.len() - rest.len();
    match et {
        EtherType::IPV4 => ipv4(rest, base),
        EtherType::IPV6 => ipv6(rest, base),
        _ => Parsed::Verdict(Reason::Unguarded),
    }
}

/// IPv4 at offset `base` of the frame.
fn ipv4(ip: &[u8], base: usize) -> Parsed {
    use etherparse::err::ipv4::HeaderSliceError;
    match Ipv4HeaderSlice::from_slice(ip) {
        Ok(h) => {
            let bare = (h.slice().len() == 20).then_some(base + 20);
            v4_tcp(&h, Some(&ip[h.slice().len()..]), bare)
        }
        // Options cut short: the fixed header (re-read without options)
        // still decides whether this is TCP at all; its TCP header is out
        // of reach.
        Err(HeaderSliceError::Len(_)) if ip.len() >= 20 => {
            let mut b = [0u8; 20];
            b.copy_from_slice(&ip[..20]);
            b[0] = 0x45;
            let h = Ipv4HeaderSlice::from_slice(&b).expect("a version-4 header of 20 bytes parses");
            v4_tcp(&h, None, None)
        }
        // Too short for the fixed header, not version 4, or IHL under 5.
        Err(_) => Parsed::Verdict(Reason::Malformed),
    }
}

/// A first fragment of TCP has its TCP header in `l4` (`None`: out of reach).
fn v4_tcp(h: &Ipv4HeaderSlice<'_>, l4: Option<&[u8]>, bare: Option<usize>) -> Parsed {
    let src = IpAddr::V4(h.source_addr());
    let dst = IpAddr::V4(h.destination_addr());
    if h.protocol() != IpNumber::TCP || h.fragments_offset().value() != 0 {
        return Parsed::Verdict(Reason::Unguarded);
    }
    match l4 {
        Some(l4) => tcp(l4, src, dst, bare),
        None => Parsed::Unattributed(src),
    }
}

/// IPv6 at offset `base` of the frame.
fn ipv6(ip: &[u8], base: usize) -> Parsed {
    // Too short for the fixed header, or not version 6.
    let Ok(h) = Ipv6HeaderSlice::from_slice(ip) else {
        return Parsed::Verdict(Reason::Malformed);
    };
    let src = IpAddr::V6(h.source_addr());
    let dst = IpAddr::V6(h.destination_addr());
    let mut next = h.next_header();
    let mut rest = &ip[h.slice().len()..];
    if next == IpNumber::TCP {
        return tcp(rest, src, dst, Some(base + 40));
    }
    for _ in 0..V6_EXT_MAX {
        if next == IpNumber::TCP {
            return tcp(rest, src, dst, None);
        }
        match ext(next, rest) {
            Ext::Next(n, len) => {
                next = n;
                // Past the end: whatever follows is out of reach.
                rest = rest.get(len..).unwrap_or(&[]);
            }
            Ext::Done(p) => return p.unwrap_or(Parsed::Unattributed(src)),
        }
    }
    if next == IpNumber::TCP {
        return tcp(rest, src, dst, None);
    }
    // More extension headers than the walk's bound: unattributed. Any other
    // protocol after the sixth header is simply not TCP.
    if is_ext(next) { Parsed::Unattributed(src) } else { Parsed::Verdict(Reason::Unguarded) }
}

fn is_ext(n: IpNumber) -> bool {
    [
        IpNumber::IPV6_HEADER_HOP_BY_HOP,
        IpNumber::IPV6_ROUTE_HEADER,
        IpNumber::IPV6_DESTINATION_OPTIONS,
        IpNumber::AUTHENTICATION_HEADER,
        IpNumber::IPV6_FRAGMENTATION_HEADER,
    ]
    .contains(&n)
}

/// One step of the IPv6 walk.
enum Ext {
    /// The next header's number and where it starts (may be past the end).
    Next(IpNumber, usize),
    /// The walk ends here: a verdict, or `None` when this header is cut
    /// short (the source is known, the rest is not).
    Done(Option<Parsed>),
}

fn ext(n: IpNumber, rest: &[u8]) -> Ext {
    if n == IpNumber::IPV6_FRAGMENTATION_HEADER {
        return match Ipv6FragmentHeaderSlice::from_slice(rest) {
            Ok(f) if f.fragment_offset().value() != 0 => Ext::Done(Some(Parsed::Verdict(Reason::Unguarded))),
            Ok(f) => Ext::Next(f.next_header(), f.slice().len()),
            Err(_) => Ext::Done(None),
        };
    }
    if n == IpNumber::AUTHENTICATION_HEADER {
        if let Ok(a) = IpAuthHeaderSlice::from_slice(rest) {
            return Ext::Next(a.next_header(), a.slice().len());
        }
        // Cut short, or a zero payload length (invalid, but the walk reads
        // only the next and length bytes): 4-byte units, plus 2.
        return two_bytes(rest, |len| (len + 2) * 4);
    }
    if [IpNumber::IPV6_HEADER_HOP_BY_HOP, IpNumber::IPV6_ROUTE_HEADER, IpNumber::IPV6_DESTINATION_OPTIONS].contains(&n)
    {
        if let Ok(h) = Ipv6RawExtHeaderSlice::from_slice(rest) {
            return Ext::Next(h.next_header(), h.slice().len());
        }
        return two_bytes(rest, |len| (len + 1) * 8);
    }
    Ext::Done(Some(Parsed::Verdict(Reason::Unguarded)))
}

/// An extension header whose declared length does not fit: its next-header
/// and length bytes, when present.
fn two_bytes(rest: &[u8], size: impl Fn(usize) -> usize) -> Ext {
    match rest {
        [next, len, ..] => Ext::Next(IpNumber(*next), size(usize::from(*len))),
        _ => Ext::Done(None),
    }
}

/// The fixed TCP header (the data offset is not checked); `bare`: where
/// it starts in the frame when it follows the IP header directly.
fn tcp(l4: &[u8], src: IpAddr, dst: IpAddr, bare: Option<usize>) -> Parsed {
    let Some(fixed) = l4.get(..20) else {
        return Parsed::Unattributed(src);
    };
    let mut b = [0u8; 20];
    b.copy_from_slice(fixed);
    b[12] = 0x50 | (b[12] & 0x0f);
    let t = TcpHeaderSlice::from_slice(&b).expect("a 20-byte TCP header with data offset 5 parses");
    let flags = (u8::from(t.syn()) * SYN) | (u8::from(t.ack()) * ACK) | (u8::from(t.rst()) * RST) | u8::from(t.fin());
    let key = |a: IpAddr| match a {
        IpAddr::V4(a) => key_v4(a.octets(), 32),
        IpAddr::V6(a) => key_v6(a.octets(), 128),
    };
    let tuple = Tuple {
        src: key(src),
        dst: key(dst),
        sport: t.source_port().to_be_bytes(),
        dport: t.destination_port().to_be_bytes(),
    };
    Parsed::Tcp { src, dport: t.destination_port(), flags, tuple, seq: t.sequence_number(), bare }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, Macs};

    #[test]
    fn plain_frames_parse() {
        let a = Ipv4Addr::new(198, 51, 100, 1);
        let f = frame::tcp4(Macs::TEST, a, a, 1, 443);
        let Parsed::Tcp { src, dport: 443, flags: SYN, bare: Some(34), .. } = parse(&f) else {
            panic!("{:?}", parse(&f));
        };
        assert_eq!(src, IpAddr::from(a));
        assert_eq!(parse(&f[..40]), Parsed::Unattributed(a.into()));
        assert_eq!(parse(&f[..20]), Parsed::Verdict(Reason::Malformed));
        let w = World::new();
        let mut r = Round::new(7, false);
        assert_eq!(w.decide(&f, &mut r), Reason::UnderRate);
        assert_eq!(w.decide(&f[..40], &mut r), Reason::Malformed);
        let b = Ipv4Addr::new(198, 51, 100, 2);
        assert_eq!(w.decide(&frame::tcp4(Macs::TEST, b, a, 1, 443), &mut r), Reason::Rate);
        let c = Ipv4Addr::new(192, 0, 2, 130);
        assert_eq!(w.decide(&frame::tcp4(Macs::TEST, c, a, 1, 443), &mut r), Reason::Denied);
        let d = Ipv4Addr::new(192, 0, 2, 70);
        assert_eq!(w.decide(&frame::tcp4(Macs::TEST, d, a, 1, 443), &mut r), Reason::Allowed);
        let e = Ipv4Addr::new(10, 1, 2, 3);
        let new = frame::tcp4(Macs::TEST, e, a, 1, 443);
        assert_eq!(w.decide(&new, &mut r), Reason::Untracked);
        assert_eq!(w.decide(&frame::tcp4_with(Macs::TEST, e, a, 1, 443, ACK), &mut r), Reason::Rate);
        // Neither the known source over its rate nor the proven one charged its /24.
        let charged: Vec<IpAddr> = r.charged.iter().copied().collect();
        assert_eq!(charged, [IpAddr::from([10, 1, 2, 0])]);
        assert!(r.proven.is_empty());
    }

    #[test]
    fn over_the_cap_a_syn_is_challenged_and_the_right_rst_proves_its_source() {
        let w = World::new();
        let mut r = Round::new(7, true);
        let (a, server) = (Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 9, 9, 9));
        let syn = frame::tcp4(Macs::TEST, a, server, 1, 443);
        assert_eq!(w.decide(&syn, &mut r), Reason::Challenge);
        let now = coarse_now();
        let out = challenge_frame(&syn, 34, now, 7);
        // Its checksum fields are left as they came: the sums tell.
        assert!(sums_agree(&syn, &syn, 34));
        assert!(!sums_agree(&syn, &out, 34));
        let Parsed::Tcp { src, tuple, .. } = parse(&out) else { panic!() };
        assert_eq!(src, IpAddr::from(server));
        assert_eq!(tuple.dport, 1u16.to_be_bytes());
        // The client's RST carries the challenge's acknowledgement number.
        let ack = u32::from_be_bytes(out[42..46].try_into().unwrap());
        let mut rst = frame::tcp4_with(Macs::TEST, a, server, 1, 443, RST);
        rst[38..42].copy_from_slice(&ack.wrapping_add(1).to_be_bytes());
        assert_eq!(w.decide(&rst, &mut r), Reason::Rate, "a wrong sequence number");
        rst[38..42].copy_from_slice(&ack.to_be_bytes());
        assert_eq!(w.decide(&rst, &mut r), Reason::Proven);
        // Tracked and proven from then on.
        assert_eq!(w.decide(&syn, &mut r), Reason::UnderRate);
        assert_eq!(r.proven.len(), 1);
        // A SYN behind IPv4 options cannot be answered in place.
        let t = frame::tcp4_header(Ipv4Addr::new(10, 1, 2, 4), server, 1, 443);
        let ip = frame::ipv4(Ipv4Addr::new(10, 1, 2, 4), server, frame::TCP, &[1, 1, 1, 1], 0, &t);
        assert_eq!(w.decide(&frame::ethernet(Macs::TEST, &[], 0x0800, &ip), &mut r), Reason::Rate);
        // A SYN-ACK is no new connection.
        let sa = frame::tcp4_with(Macs::TEST, Ipv4Addr::new(10, 1, 2, 5), server, 3, 443, SYN | ACK);
        assert_eq!(w.decide(&sa, &mut r), Reason::Rate);
    }
}
