//! Hand-built Ethernet frames (IPv4/IPv6, TCP/UDP, VLAN tags, IPv4 options,
//! IPv6 extension headers, fragments) with correct checksums, and a small
//! parser for what a receiver saw. Shared by the test-run table and the live
//! namespace tests, as cilium's `build_packet()` is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Source and destination MAC of a frame.
#[derive(Clone, Copy, Debug)]
pub struct Macs {
    pub src: [u8; 6],
    pub dst: [u8; 6],
}

impl Macs {
    /// Fixed MACs for test-run frames.
    pub const TEST: Macs = Macs { src: [0x02, 0, 0, 0, 0, 0x01], dst: [0x02, 0, 0, 0, 0, 0x02] };
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// Ethernet frame with optional VLAN tags (outer first).
pub fn ethernet(m: Macs, vlans: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * vlans.len() + payload.len());
    f.extend_from_slice(&m.dst);
    f.extend_from_slice(&m.src);
    for (tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        let mut it = c.chunks(2);
        for w in &mut it {
            let v = match w {
                [a, b] => u16::from_be_bytes([*a, *b]),
                [a] => u16::from_be_bytes([*a, 0]),
                _ => 0,
            };
            sum += u32::from(v);
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN header (no payload) with its checksum over `pseudo`.
fn tcp_syn(sport: u16, dport: u16, pseudo: &[u8]) -> Vec<u8> {
    tcp_flags(sport, dport, SYN, pseudo)
}

fn tcp_flags(sport: u16, dport: u16, flags: u8, pseudo: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    if flags & ACK != 0 {
        t[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
    }
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = checksum(&[pseudo, &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

fn udp(sport: u16, dport: u16, payload: &[u8], pseudo: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(len as usize);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let c = checksum(&[pseudo, &u]);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

fn pseudo4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

fn pseudo6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    p
}

/// An IPv4 packet: `options` (padded to 4 bytes), `frag` = flags|offset field.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = 20 + opts.len();
    let total = (ihl + l4.len()) as u16;
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | (ihl / 4) as u8;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&0x4b57u16.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h.extend_from_slice(&opts);
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// An IPv6 packet with extension headers: each `(type, body)` where `body`
/// excludes the next-header byte (filled in here). `proto` follows the last.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, ext: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (_, body)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |(t, _)| *t);
        chain.push(next);
        chain.extend_from_slice(body);
    }
    let first = ext.first().map_or(proto, |(t, _)| *t);
    let plen = (chain.len() + l4.len()) as u16;
    let mut h = Vec::with_capacity(40 + plen as usize);
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&plen.to_be_bytes());
    h.push(first);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&chain);
    h.extend_from_slice(l4);
    h
}

/// An 8-byte extension header body (hop-by-hop, destination, routing): length 0, padding.
pub fn ext8() -> Vec<u8> {
    vec![0, 1, 4, 0, 0, 0, 0]
}

/// A fragment header body with `offset` (in 8-byte units) and the M flag.
pub fn frag6(offset: u16, more: bool) -> Vec<u8> {
    let of = (offset << 3) | u16::from(more);
    let mut b = vec![0u8];
    b.extend_from_slice(&of.to_be_bytes());
    b.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    b
}

/// IPv4 TCP SYN frame.
pub fn tcp4(m: Macs, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let t = tcp_syn(sport, dport, &pseudo4(src, dst, TCP, 20));
    ethernet(m, &[], 0x0800, &ipv4(src, dst, TCP, &[], 0, &t))
}

/// IPv4 TCP frame with the given flags (an ACK carries an acknowledgement
/// number no SYN cookie produced: what a spoofed source can send).
pub fn tcp4_with(m: Macs, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let t = tcp_flags(sport, dport, flags, &pseudo4(src, dst, TCP, 20));
    ethernet(m, &[], 0x0800, &ipv4(src, dst, TCP, &[], 0, &t))
}

/// IPv4 UDP frame.
pub fn udp4(m: Macs, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let u = udp(sport, dport, payload, &pseudo4(src, dst, UDP, 8 + payload.len()));
    ethernet(m, &[], 0x0800, &ipv4(src, dst, UDP, &[], 0, &u))
}

/// IPv6 TCP SYN frame.
pub fn tcp6(m: Macs, src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let t = tcp_syn(sport, dport, &pseudo6(src, dst, TCP, 20));
    ethernet(m, &[], 0x86dd, &ipv6(src, dst, &[], TCP, &t))
}

/// The TCP header alone for an IPv4 pair (for custom IP headers).
pub fn tcp4_header(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    tcp_syn(sport, dport, &pseudo4(src, dst, TCP, 20))
}

/// The TCP header alone for an IPv6 pair.
pub fn tcp6_header(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    tcp_syn(sport, dport, &pseudo6(src, dst, TCP, 20))
}

/// What a receiver needs to know of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub src_mac: [u8; 6],
    pub src: IpAddr,
    pub proto: u8,
    pub dport: u16,
}

/// Parse an untagged IPv4/IPv6 TCP/UDP frame (no extension headers).
pub fn summary(f: &[u8]) -> Option<Summary> {
    let src_mac: [u8; 6] = f.get(6..12)?.try_into().ok()?;
    let et = u16::from_be_bytes(f.get(12..14)?.try_into().ok()?);
    let (src, proto, l4) = match et {
        0x0800 => {
            let ihl = usize::from(f.get(14)? & 0x0f) * 4;
            let a: [u8; 4] = f.get(26..30)?.try_into().ok()?;
            (IpAddr::from(a), *f.get(23)?, 14 + ihl)
        }
        0x86dd => {
            let a: [u8; 16] = f.get(22..38)?.try_into().ok()?;
            (IpAddr::from(a), *f.get(20)?, 54)
        }
        _ => return None,
    };
    let dport = u16::from_be_bytes(f.get(l4 + 2..l4 + 4)?.try_into().ok()?);
    Some(Summary { src_mac, src, proto, dport })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let p = ipv4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), TCP, &[1, 1, 1, 1], 0, &[]);
        assert_eq!(checksum(&[&p[..24]]), 0);
        assert_eq!(p[0], 0x46);
    }

    #[test]
    fn summaries_round_trip() {
        let f = tcp4(Macs::TEST, Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2), 1000, 443);
        let s = summary(&f).unwrap();
        assert_eq!((s.src, s.proto, s.dport), (IpAddr::from([192, 0, 2, 1]), TCP, 443));
        let a: Ipv6Addr = "fd00::1".parse().unwrap();
        let f = tcp6(Macs::TEST, a, a, 1, 8443);
        let s = summary(&f).unwrap();
        assert_eq!((s.src, s.dport), (IpAddr::V6(a), 8443));
        // TCP checksum over pseudo header verifies.
        let t = &f[54..];
        assert_eq!(checksum(&[&pseudo6(a, a, TCP, 20), t]), 0);
    }
}
