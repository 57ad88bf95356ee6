//! Header parsing. Every packet byte is read through [`ptr_at`], the one
//! bounds-checked accessor; headers are byte arrays so no read is unaligned.
//! The walk: Ethernet, up to two VLAN tags (802.1Q / 802.1ad), then IPv4
//! (honouring IHL) or IPv6 (walking up to `MAX_V6_EXT_HEADERS` extension
//! headers), then the TCP header. Anything that is not TCP is `Unguarded`;
//! anything cut short or garbled before the source address is `Malformed`;
//! an IP packet whose TCP header cannot be reached is `Unattributed` (its
//! source is known, its port is not).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use proxy_common::{MAX_V6_EXT_HEADERS, Reason};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// No header we walk starts beyond this offset; a bound the verifier can see.
const MAX_OFFSET: usize = 4096;

/// The source of a guarded-candidate packet.
#[derive(Clone, Copy)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// What the policy needs of a TCP packet.
#[derive(Clone, Copy)]
pub struct Tcp {
    pub source: Source,
    pub dport: u16,
    /// The TCP flags byte (`TCP_SYN`, `TCP_ACK`, ...).
    pub flags: u8,
    /// The IP and TCP headers, checked to lie inside the packet, for the
    /// kernel's SYN-cookie check and socket lookup.
    pub hdrs: Hdrs,
    /// The TCP header follows the IP header directly (no IPv4 options, no
    /// IPv6 extension headers): a SYN the challenge may answer in place.
    pub bare: bool,
}

impl Tcp {
    /// The TCP header.
    #[inline(always)]
    pub fn tcp(&self) -> *const TcpHdr {
        match self.hdrs {
            Hdrs::V4 { tcp, .. } | Hdrs::V6 { tcp, .. } => tcp,
        }
    }
}

/// `TCP_SYN` in [`Tcp::flags`].
pub const TCP_SYN: u8 = 0x02;
/// `TCP_ACK` in [`Tcp::flags`].
pub const TCP_ACK: u8 = 0x10;
/// `TCP_RST` in [`Tcp::flags`].
pub const TCP_RST: u8 = 0x04;
/// `TCP_FIN` in [`Tcp::flags`].
pub const TCP_FIN: u8 = 0x01;

/// Pointers to a packet's headers, each checked by [`ptr_at`] to lie
/// wholly inside the packet (what the helpers taking headers require).
#[derive(Clone, Copy)]
pub enum Hdrs {
    V4 { ip: *const Ipv4Hdr, tcp: *const TcpHdr },
    V6 { ip: *const Ipv6Hdr, tcp: *const TcpHdr },
}

/// A packet whose IP header (and so its source) parsed, but whose TCP header
/// could not be reached: cut short, or behind more extension headers than
/// the walk's bound. Its port is unknown, so it cannot be shown to be
/// unguarded; the policy applies the deny list and the source's bucket.
#[derive(Clone, Copy)]
pub struct Unattributed(pub Source);

/// Why `tcp` found no TCP header to judge.
pub enum Miss {
    /// Not ours to judge (`Unguarded`), or garbled before a source is known (`Malformed`).
    Verdict(Reason),
    /// The source is known, the port is not.
    Source(Unattributed),
}

impl From<Reason> for Miss {
    fn from(r: Reason) -> Miss {
        Miss::Verdict(r)
    }
}

#[repr(C)]
pub struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    vtcfl: [u8; 4],
    payload_len: [u8; 2],
    next: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first two bytes of every extension header we walk.
#[repr(C)]
struct ExtHdr {
    next: u8,
    len: u8,
}

#[repr(C)]
struct FragHdr {
    next: u8,
    reserved: u8,
    offset_flags: [u8; 2],
    id: [u8; 4],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    /// Data offset and reserved bits.
    pub off: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    urgent: [u8; 2],
}

/// The bounds-checked accessor: a pointer to a `T` at `off`, or `Malformed`
/// when the packet is shorter.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*const T, Reason> {
    if off > MAX_OFFSET {
        return Err(Reason::Malformed);
    }
    let start = ctx.data();
    let end = ctx.data_end();
    // off <= MAX_OFFSET, so neither sum can overflow.
    let at = start.wrapping_add(off);
    if at.wrapping_add(size_of::<T>()) > end {
        return Err(Reason::Malformed);
    }
    Ok(at as *const T)
}

/// Read a copy of the `T` at `off`.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Result<T, Reason> {
    let p = ptr_at::<T>(ctx, off)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes lie inside the packet;
    // T is a byte array or u8, so alignment is 1.
    Ok(unsafe { *p })
}

/// Parse down to TCP.
#[inline(always)]
pub fn tcp(ctx: &XdpContext) -> Result<Tcp, Miss> {
    let mut proto = u16::from_be_bytes(read::<[u8; 2]>(ctx, 12)?);
    let mut off = ETH_HLEN;
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = u16::from_be_bytes(read::<[u8; 2]>(ctx, off.wrapping_add(2))?);
            off = off.wrapping_add(4);
        }
    }
    match proto {
        ETH_P_IP => ipv4(ctx, off),
        ETH_P_IPV6 => ipv6(ctx, off),
        _ => Err(Miss::Verdict(Reason::Unguarded)),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize) -> Result<Tcp, Miss> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, off)?;
    // SAFETY: ptr_at checked the whole header is inside the packet.
    let (version_ihl, frag, proto, src) = unsafe { ((*ip).version_ihl, (*ip).frag, (*ip).proto, (*ip).src) };
    if version_ihl >> 4 != 4 {
        return Err(Miss::Verdict(Reason::Malformed));
    }
    let ihl = usize::from(version_ihl & 0x0f).wrapping_mul(4);
    if ihl < size_of::<Ipv4Hdr>() {
        return Err(Miss::Verdict(Reason::Malformed));
    }
    if proto != IPPROTO_TCP {
        return Err(Miss::Verdict(Reason::Unguarded));
    }
    // A non-first fragment carries no TCP header: the port is unknowable
    // here, and the stack reassembles or drops it. Legitimate fragments
    // exist (large UDP answers), so these pass.
    if u16::from_be_bytes(frag) & 0x1fff != 0 {
        return Err(Miss::Verdict(Reason::Unguarded));
    }
    let tcp = tcp_hdr(ctx, off.wrapping_add(ihl)).map_err(|_| Miss::Source(Unattributed(Source::V4(src))))?;
    // SAFETY: tcp_hdr checked the whole fixed header is inside the packet.
    let (dport, flags) = unsafe { (u16::from_be_bytes((*tcp).dport), (*tcp).flags) };
    let bare = ihl == size_of::<Ipv4Hdr>();
    Ok(Tcp { source: Source::V4(src), dport, flags, hdrs: Hdrs::V4 { ip, tcp }, bare })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize) -> Result<Tcp, Miss> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, off)?;
    // SAFETY: ptr_at checked the whole header is inside the packet.
    let (vtcfl, mut next, src) = unsafe { ((*ip).vtcfl, (*ip).next, (*ip).src) };
    let [v, ..] = vtcfl;
    if v >> 4 != 6 {
        return Err(Miss::Verdict(Reason::Malformed));
    }
    let unattributed = || Miss::Source(Unattributed(Source::V6(src)));
    let mut off = off.wrapping_add(size_of::<Ipv6Hdr>());
    if next == IPPROTO_TCP {
        return v6_tcp(ctx, off, ip, src, true).map_err(|_| unattributed());
    }
    for _ in 0..MAX_V6_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return v6_tcp(ctx, off, ip, src, false).map_err(|_| unattributed()),
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let h = read::<ExtHdr>(ctx, off).map_err(|_| unattributed())?;
                next = h.next;
                off = off.wrapping_add((usize::from(h.len).wrapping_add(1)).wrapping_mul(8));
            }
            IPV6_AH => {
                let h = read::<ExtHdr>(ctx, off).map_err(|_| unattributed())?;
                next = h.next;
                off = off.wrapping_add((usize::from(h.len).wrapping_add(2)).wrapping_mul(4));
            }
            IPV6_FRAGMENT => {
                let h = read::<FragHdr>(ctx, off).map_err(|_| unattributed())?;
                if u16::from_be_bytes(h.offset_flags) & 0xfff8 != 0 {
                    return Err(Miss::Verdict(Reason::Unguarded));
                }
                next = h.next;
                off = off.wrapping_add(size_of::<FragHdr>());
            }
            _ => return Err(Miss::Verdict(Reason::Unguarded)),
        }
    }
    match next {
        IPPROTO_TCP => v6_tcp(ctx, off, ip, src, false).map_err(|_| unattributed()),
        // Still inside extension headers after the walk's bound: the stack may
        // well accept it, so it must not be a way around deny and rate.
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => Err(unattributed()),
        // Another protocol after the sixth header: not TCP.
        _ => Err(Miss::Verdict(Reason::Unguarded)),
    }
}

/// The whole fixed TCP header at `off`.
#[inline(always)]
fn tcp_hdr(ctx: &XdpContext, off: usize) -> Result<*const TcpHdr, Reason> {
    ptr_at::<TcpHdr>(ctx, off)
}

/// The TCP packet behind an IPv6 header.
#[inline(always)]
fn v6_tcp(ctx: &XdpContext, off: usize, ip: *const Ipv6Hdr, src: [u8; 16], bare: bool) -> Result<Tcp, Reason> {
    let tcp = tcp_hdr(ctx, off)?;
    // SAFETY: tcp_hdr checked the whole fixed header is inside the packet.
    let (dport, flags) = unsafe { (u16::from_be_bytes((*tcp).dport), (*tcp).flags) };
    Ok(Tcp { source: Source::V6(src), dport, flags, hdrs: Hdrs::V6 { ip, tcp }, bare })
}

// Derive Copy for the headers read by value.
impl Clone for ExtHdr {
    fn clone(&self) -> Self {
        *self
    }
}
impl Copy for ExtHdr {}
impl Clone for FragHdr {
    fn clone(&self) -> Self {
        *self
    }
}
impl Copy for FragHdr {}
