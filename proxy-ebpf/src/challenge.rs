//! The SYN-ACK challenge in the packet (`proxy_common::challenge` holds the
//! arithmetic): [`answer`] rewrites a SYN in place into the challenge and
//! [`answers`] checks a RST against it. The rewrite swaps the MAC
//! addresses, the IP addresses and the ports, keeps VLAN tags, lengths and
//! TCP options, sets TTL or hop limit, sequence and acknowledgement
//! numbers, flags (SYN|ACK) and window, and updates both checksums
//! incrementally (a swap does not change a ones'-complement sum).

use aya_ebpf::programs::XdpContext;
use proxy_common::{
    SourceKey,
    challenge::{self, Tuple},
    prefix::{key_v4, key_v6},
};

use crate::parse::{Hdrs, Tcp, TcpHdr, ptr_at};

/// SYN|ACK in the flags byte.
const SYN_ACK: u8 = 0x12;

/// The 4-tuple of a packet from the client, as the cookie reads it.
#[inline(always)]
fn tuple(t: &Tcp) -> Tuple {
    // SAFETY: the parser checked that both headers lie wholly inside the packet.
    unsafe {
        let (src, dst): (SourceKey, SourceKey) = match t.hdrs {
            Hdrs::V4 { ip, .. } => (key_v4((*ip).src, 32), key_v4((*ip).dst, 32)),
            Hdrs::V6 { ip, .. } => (key_v6((*ip).src, 128), key_v6((*ip).dst, 128)),
        };
        let tcp = t.tcp();
        Tuple { src, dst, sport: (*tcp).sport, dport: (*tcp).dport }
    }
}

/// Whether the RST `t` answers a challenge sent to its 4-tuple in this
/// time slot or the one before.
#[inline(always)]
pub fn answers(t: &Tcp, now: u64, seed: u64) -> bool {
    // SAFETY: as in `tuple`.
    let seq = unsafe { u32::from_be_bytes((*t.tcp()).seq) };
    challenge::verify(&tuple(t), seq, now, seed)
}

/// Rewrite the SYN `t` into its challenge; false (the frame untouched)
/// when it carries IP options or IPv6 extension headers, which a
/// challenge does not echo.
#[inline(always)]
pub fn answer(ctx: &XdpContext, t: &Tcp, now: u64, seed: u64) -> bool {
    if !t.bare {
        return false;
    }
    let Ok(eth) = ptr_at::<[[u8; 6]; 2]>(ctx, 0) else {
        return false;
    };
    let h = challenge::hash(&tuple(t), challenge::slot(now), seed);
    // SAFETY: `ptr_at` and the parser checked that every header written
    // here lies wholly inside the packet; all are byte arrays (alignment 1).
    unsafe {
        let eth = eth as *mut [[u8; 6]; 2];
        let [a, b] = *eth;
        *eth = [b, a];
        match t.hdrs {
            Hdrs::V4 { ip, .. } => {
                let ip = ip as *mut crate::parse::Ipv4Hdr;
                let (s, d) = ((*ip).src, (*ip).dst);
                (*ip).src = d;
                (*ip).dst = s;
                let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
                (*ip).ttl = challenge::TTL;
                let new = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
                (*ip).check = challenge::csum_replace(u16::from_be_bytes((*ip).check), old, new).to_be_bytes();
            }
            Hdrs::V6 { ip, .. } => {
                let ip = ip as *mut crate::parse::Ipv6Hdr;
                let (s, d) = ((*ip).src, (*ip).dst);
                (*ip).src = d;
                (*ip).dst = s;
                (*ip).hop_limit = challenge::TTL;
            }
        }
        syn_ack(t.tcp() as *mut TcpHdr, h);
    }
    true
}

/// The TCP header of the SYN made the challenge's, checksum updated.
///
/// # Safety
/// `tcp` points at a whole TCP header inside the packet.
#[inline(always)]
unsafe fn syn_ack(tcp: *mut TcpHdr, h: u64) {
    // SAFETY: the caller's.
    unsafe {
        let (sp, dp) = ((*tcp).sport, (*tcp).dport);
        (*tcp).sport = dp;
        (*tcp).dport = sp;
        let isn = u32::from_be_bytes((*tcp).seq);
        let old_ack = u32::from_be_bytes((*tcp).ack);
        let (seq, ack) = (challenge::seq(h), challenge::ack(isn, h));
        let old_flags = u16::from_be_bytes([(*tcp).off, (*tcp).flags]);
        let new_flags = u16::from_be_bytes([(*tcp).off, SYN_ACK]);
        let old_window = u16::from_be_bytes((*tcp).window);
        let mut c = u16::from_be_bytes((*tcp).check);
        c = challenge::csum_replace32(c, isn, seq);
        c = challenge::csum_replace32(c, old_ack, ack);
        c = challenge::csum_replace(c, old_flags, new_flags);
        c = challenge::csum_replace(c, old_window, challenge::WINDOW);
        (*tcp).seq = seq.to_be_bytes();
        (*tcp).ack = ack.to_be_bytes();
        (*tcp).flags = SYN_ACK;
        (*tcp).window = challenge::WINDOW.to_be_bytes();
        (*tcp).check = c.to_be_bytes();
    }
}
