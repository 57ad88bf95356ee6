//! The host-side reference decision of the XDP program, for the packet-path
//! differential fuzz (`tests/xdp_fuzz.rs`): what docs/kernel.md says the
//! program decides for a frame, computed from headers parsed by a packet
//! library (etherparse) instead of the program's own walk, against a fixed
//! [`World`] of maps whose answers do not depend on time, and a [`Round`]
//! that follows what one frame's runs change: the `SYN_RETRY` tags
//! (computed with the program's own keyed hash, `proxy_common::table`, and
//! the seed it was loaded with) and the aggregates charged.
//!
//! Where the program reads less than a full header, the reference says so
//! and reads the same: only the fixed 20 bytes of the TCP header (the data
//! offset is not checked), and only the next-header and length bytes of an
//! IPv6 extension header (its declared length need not fit; whatever it
//! points past the end of the frame is then out of reach).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpAuthHeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice,
    Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice, TcpHeaderSlice,
};
use keyward::units::Cidr;
use proxy_common::{
    Reason, SourceKey,
    prefix::{key_v4, key_v6},
    table,
};

/// The TCP flags the decision looks at.
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// How far the IPv6 walk goes (docs/kernel.md: "up to 6 extension headers").
const V6_EXT_MAX: usize = 6;

/// What the headers say, before any map is consulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Decided by the headers alone (`unguarded`, `malformed`).
    Verdict(Reason),
    /// A TCP packet: its source, destination port and flags, and its
    /// source port and sequence number (`table::sport_seq`).
    Tcp { src: IpAddr, dport: u16, flags: u8, sport_seq: u64 },
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
/// `untracked` under the untracked cap, or over it when it repeats the
/// last SYN dropped in its `SYN_RETRY` slot; anything else `rate`).
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
    /// `SYN_RETRY`: the non-zero slots and their tags.
    pub syn_retry: HashMap<u32, u32>,
    /// The aggregates charged (each created by its first charge), by the
    /// address of their wider prefix.
    pub charged: BTreeSet<IpAddr>,
}

impl Round {
    /// A round with `SYN_RETRY` empty and no aggregate charged.
    pub fn new(seed: u64, cap_spent: bool) -> Round {
        Round { seed, cap_spent, syn_retry: HashMap::new(), charged: BTreeSet::new() }
    }

    /// Over the untracked cap, whether this SYN repeats the one last
    /// dropped in its `SYN_RETRY` slot (docs/kernel.md, "Admission
    /// spent"): then it passes and the slot is emptied; else the slot
    /// remembers it.
    fn retried(&mut self, own: &SourceKey, sport_seq: u64) -> bool {
        let (i, tag) = table::syn_slot(own, sport_seq, self.seed);
        if self.syn_retry.get(&i) == Some(&tag) {
            self.syn_retry.remove(&i);
            true
        } else {
            self.syn_retry.insert(i, tag);
            false
        }
    }
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
            Parsed::Tcp { src, flags, sport_seq, .. } => self.judge(src, Some((flags, sport_seq)), round),
            Parsed::Unattributed(src) => match self.judge(src, None, round) {
                Reason::UnderRate => Reason::Malformed,
                r => r,
            },
        }
    }

    /// Lists, then buckets (docs/kernel.md, "How it decides"). `tcp`:
    /// the flags and `sport_seq` when the TCP header was reached.
    fn judge(&self, src: IpAddr, tcp: Option<(u8, u64)>, round: &mut Round) -> Reason {
        if self.deny.iter().any(|(c, expired)| !expired && c.contains(src)) {
            return Reason::Denied;
        }
        if self.allow.iter().any(|c| c.contains(src)) {
            return Reason::Allowed;
        }
        let planted = self.sources.iter().find(|(c, _)| c.contains(src)).map(|(_, p)| *p);
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
            Some((f, sport_seq)) if f & (SYN | ACK) == SYN => {
                if !round.cap_spent || round.retried(&own_key(src), sport_seq) {
                    Reason::Untracked
                } else {
                    Reason::Rate
                }
            }
            _ => Reason::Rate,
        }
    }
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
    match et {
        EtherType::IPV4 => ipv4(rest),
        EtherType::IPV6 => ipv6(rest),
        _ => Parsed::Verdict(Reason::Unguarded),
    }
}

fn ipv4(ip: &[u8]) -> Parsed {
    use etherparse::err::ipv4::HeaderSliceError;
    match Ipv4HeaderSlice::from_slice(ip) {
        Ok(h) => v4_tcp(&h, Some(&ip[h.slice().len()..])),
        // Options cut short: the fixed header (re-read without options)
        // still decides whether this is TCP at all; its TCP header is out
        // of reach.
        Err(HeaderSliceError::Len(_)) if ip.len() >= 20 => {
            let mut b = [0u8; 20];
            b.copy_from_slice(&ip[..20]);
            b[0] = 0x45;
            let h = Ipv4HeaderSlice::from_slice(&b).expect("a version-4 header of 20 bytes parses");
            v4_tcp(&h, None)
        }
        // Too short for the fixed header, not version 4, or IHL under 5.
        Err(_) => Parsed::Verdict(Reason::Malformed),
    }
}

/// A first fragment of TCP has its TCP header in `l4` (`None`: out of reach).
fn v4_tcp(h: &Ipv4HeaderSlice<'_>, l4: Option<&[u8]>) -> Parsed {
    let src = IpAddr::V4(h.source_addr());
    if h.protocol() != IpNumber::TCP || h.fragments_offset().value() != 0 {
        return Parsed::Verdict(Reason::Unguarded);
    }
    match l4 {
        Some(l4) => tcp(l4, src),
        None => Parsed::Unattributed(src),
    }
}

fn ipv6(ip: &[u8]) -> Parsed {
    // Too short for the fixed header, or not version 6.
    let Ok(h) = Ipv6HeaderSlice::from_slice(ip) else {
        return Parsed::Verdict(Reason::Malformed);
    };
    let src = IpAddr::V6(h.source_addr());
    let mut next = h.next_header();
    let mut rest = &ip[h.slice().len()..];
    for _ in 0..V6_EXT_MAX {
        if next == IpNumber::TCP {
            return tcp(rest, src);
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
        return tcp(rest, src);
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

/// The fixed TCP header (the data offset is not checked).
fn tcp(l4: &[u8], src: IpAddr) -> Parsed {
    let Some(fixed) = l4.get(..20) else {
        return Parsed::Unattributed(src);
    };
    let mut b = [0u8; 20];
    b.copy_from_slice(fixed);
    b[12] = 0x50 | (b[12] & 0x0f);
    let t = TcpHeaderSlice::from_slice(&b).expect("a 20-byte TCP header with data offset 5 parses");
    let flags = (u8::from(t.syn()) * SYN) | (u8::from(t.ack()) * ACK);
    let sport_seq = table::sport_seq(t.source_port().to_be_bytes(), t.sequence_number().to_be_bytes());
    Parsed::Tcp { src, dport: t.destination_port(), flags, sport_seq }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, Macs};

    #[test]
    fn plain_frames_parse() {
        let a = Ipv4Addr::new(198, 51, 100, 1);
        let f = frame::tcp4(Macs::TEST, a, a, 1, 443);
        let sport_seq = table::sport_seq(f[34..36].try_into().unwrap(), f[38..42].try_into().unwrap());
        assert_eq!(parse(&f), Parsed::Tcp { src: a.into(), dport: 443, flags: SYN, sport_seq });
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
        assert!(r.syn_retry.is_empty());
    }

    #[test]
    fn over_the_cap_a_repeated_syn_passes_every_other_time() {
        let w = World::new();
        let mut r = Round::new(7, true);
        let a = Ipv4Addr::new(10, 1, 2, 3);
        let syn = frame::tcp4(Macs::TEST, a, a, 1, 443);
        assert_eq!(w.decide(&syn, &mut r), Reason::Rate);
        assert_eq!(r.syn_retry.len(), 1);
        assert_eq!(w.decide(&syn, &mut r), Reason::Untracked);
        assert!(r.syn_retry.is_empty());
        assert_eq!(w.decide(&syn, &mut r), Reason::Rate);
        assert_eq!(w.decide(&frame::tcp4(Macs::TEST, a, a, 2, 443), &mut r), Reason::Rate);
        // A SYN-ACK is no new connection: dropped, not remembered.
        let before = r.syn_retry.clone();
        assert_eq!(w.decide(&frame::tcp4_with(Macs::TEST, a, a, 3, 443, SYN | ACK), &mut r), Reason::Rate);
        assert_eq!(r.syn_retry, before);
    }
}
