//! The host-side reference decision of the XDP program, for the packet-path
//! differential fuzz (`tests/xdp_fuzz.rs`): what docs/kernel.md says the
//! program decides for a frame, computed from headers parsed by a packet
//! library (etherparse) instead of the program's own walk, against a fixed
//! [`World`] of maps whose answers do not depend on time.
//!
//! Where the program reads less than a full header, the reference says so
//! and reads the same: only the fixed 20 bytes of the TCP header (the data
//! offset is not checked), and only the next-header and length bytes of an
//! IPv6 extension header (its declared length need not fit; whatever it
//! points past the end of the frame is then out of reach).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpAuthHeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice,
    Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice, TcpHeaderSlice,
};
use keyward::units::Cidr;
use proxy_common::Reason;

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
    /// A TCP packet: its source, destination port and flags.
    Tcp { src: IpAddr, dport: u16, flags: u8 },
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
/// `untracked`, anything else `rate`).
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

/// The XDP config the [`World`] assumes (rates that always admit).
pub const WORLD_XDP: &str = "ports = [443, 8443]\nrate_pps = 1000000000\nburst = 1000000000\nipv6_prefix = 64\n\
    aggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 1000000000, burst = 1000000000 }\n\
    new_sources = { rate_pps = 1, burst = 1 }\ntable_size = 4096\n";

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

    /// The reason the program must give `frame`.
    pub fn decide(&self, frame: &[u8]) -> Reason {
        match parse(frame) {
            Parsed::Verdict(r) => r,
            Parsed::Tcp { dport, .. } if !self.ports.contains(&dport) => Reason::Unguarded,
            Parsed::Tcp { src, flags, .. } => self.judge(src, Some(flags)),
            Parsed::Unattributed(src) => match self.judge(src, None) {
                Reason::UnderRate => Reason::Malformed,
                r => r,
            },
        }
    }

    /// Lists, then buckets (docs/kernel.md, "How it decides").
    fn judge(&self, src: IpAddr, flags: Option<u8>) -> Reason {
        if self.deny.iter().any(|(c, expired)| !expired && c.contains(src)) {
            return Reason::Denied;
        }
        if self.allow.iter().any(|c| c.contains(src)) {
            return Reason::Allowed;
        }
        let spent = self.spent.iter().any(|c| c.contains(src));
        match self.sources.iter().find(|(c, _)| c.contains(src)).map(|(_, p)| *p) {
            Some(Planted::Over) => Reason::Rate,
            Some(Planted::Proven) => Reason::UnderRate,
            // No packet here can show a handshake: the fuzz runs in a network
            // namespace of its own, with no socket and no SYN cookie sent.
            Some(Planted::Unproven) if spent => Reason::Rate,
            Some(Planted::Unproven) => Reason::UnderRate,
            None if spent => Reason::Rate,
            // The admission bucket is spent.
            None => match flags {
                Some(f) if f & (SYN | ACK) == SYN => Reason::Untracked,
                _ => Reason::Rate,
            },
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
    Parsed::Tcp { src, dport: t.destination_port(), flags }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, Macs};

    #[test]
    fn plain_frames_parse() {
        let a = Ipv4Addr::new(198, 51, 100, 1);
        let f = frame::tcp4(Macs::TEST, a, a, 1, 443);
        assert_eq!(parse(&f), Parsed::Tcp { src: a.into(), dport: 443, flags: SYN });
        assert_eq!(parse(&f[..40]), Parsed::Unattributed(a.into()));
        assert_eq!(parse(&f[..20]), Parsed::Verdict(Reason::Malformed));
        let w = World::new();
        assert_eq!(w.decide(&f), Reason::UnderRate);
        assert_eq!(w.decide(&f[..40]), Reason::Malformed);
        let b = Ipv4Addr::new(198, 51, 100, 2);
        assert_eq!(w.decide(&frame::tcp4(Macs::TEST, b, a, 1, 443)), Reason::Rate);
        let c = Ipv4Addr::new(192, 0, 2, 130);
        assert_eq!(w.decide(&frame::tcp4(Macs::TEST, c, a, 1, 443)), Reason::Denied);
        let d = Ipv4Addr::new(192, 0, 2, 70);
        assert_eq!(w.decide(&frame::tcp4(Macs::TEST, d, a, 1, 443)), Reason::Allowed);
        let e = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(w.decide(&frame::tcp4(Macs::TEST, e, a, 1, 443)), Reason::Untracked);
        assert_eq!(w.decide(&frame::tcp4_with(Macs::TEST, e, a, 1, 443, ACK)), Reason::Rate);
    }
}
