//! The decision for a parsed packet, in order: unguarded port → pass; deny
//! list (unexpired) → drop; allow list → pass (a deny inside an allowed
//! network wins; docs/kernel.md); then the buckets. A packet whose
//! source is known but whose port is not (cut short, too many IPv6
//! extension headers) meets the deny list and its source's buckets too, and
//! passes as `malformed` when under them: it cannot be a way around either.
//!
//! Rate: a known source is charged to its own bucket, then, until it has
//! shown a real TCP handshake, to the aggregate bucket of its wider prefix;
//! over its own bucket it is dropped on that one lookup (two slot reads in
//! `SOURCES`, an array in two-way sets: `proxy_common::table`). An unknown
//! source is first charged to the aggregate bucket, then to the host-wide
//! admission bucket, and gets a per-source slot only when both admit it: a
//! flood that rotates sources inside one prefix is held by the aggregate,
//! one spread over many prefixes by the admission bucket, and neither can
//! churn the per-source table at line rate.
//!
//! Neither can be turned against real visitors (issue 14). A handshake is
//! shown by a non-SYN packet the kernel vouches for: its raw SYN-cookie
//! check accepts the ACK, or it holds a connection or request for the
//! 4-tuple; spoofed packets cannot do either. A source that has shown one
//! (`Bucket::PROVEN`) is held by its own bucket only, so spoofed neighbours
//! that spend its prefix's aggregate do not touch it. And when the admission
//! bucket is spent, a new source's SYN passes untracked (`Untracked`) to the
//! kernel, whose SYN cookies keep spoofed SYNs from holding any state, up
//! to a second host-wide bucket that caps what the kernel is handed; beyond
//! it a SYN is answered here with a challenge SYN-ACK (`XDP_TX`,
//! `crate::challenge`) whose acknowledgement number a real client's TCP
//! answers with a RST carrying a keyed cookie, which a spoofer that never
//! saw the challenge cannot forge: that RST tracks the source as proven,
//! and the client's retransmitted SYN then passes as a known source. Its
//! other packets pass, and it is tracked, only once it has shown a
//! handshake or answered a challenge.
//!
//! The allow and deny tries are skipped while they are empty (flags the
//! daemon keeps in `CONFIG`).

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6, iphdr, ipv6hdr, tcphdr,
    },
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_raw_check_syncookie_ipv4,
        bpf_tcp_raw_check_syncookie_ipv6,
    },
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};
use proxy_common::{
    AllowValue, Bucket, DenyValue, FLAG_DRY_RUN, FLAG_HAS_ALLOW, FLAG_HAS_DENY, Reason, SourceKey, XdpConfig,
    bucket::Params,
    prefix::{key_v4, key_v6},
    table::{self, Slot},
};

use crate::{
    ADMIT, AGGREGATES, ALLOW_V4, ALLOW_V6, DENY_V4, DENY_V6, NEW_SOURCES, PORTS, SOURCES, challenge,
    parse::{self, Hdrs, Source, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tcp},
};

/// `BPF_NOEXIST`: insert only when absent (two CPUs may race on a new prefix).
const BPF_NOEXIST: u64 = 1;
/// Index in `ADMIT` of the bucket admitting new sources into `SOURCES`.
const ADMISSION: u32 = proxy_common::ADMIT_NEW_SOURCES;
/// Index in `ADMIT` of the bucket capping untracked SYNs passed to the kernel.
const UNTRACKED: u32 = proxy_common::ADMIT_UNTRACKED_SYNS;
/// Index in `ADMIT` of the bucket bounding the RSTs checked against a challenge.
const PROOFS: u32 = proxy_common::ADMIT_PROOFS;

/// Decide the reason for this packet.
#[inline(always)]
pub fn decide(ctx: &XdpContext, cfg: &XdpConfig) -> Reason {
    let (source, tcp) = match parse::tcp(ctx) {
        Ok(t) => {
            match PORTS.get(u32::from(t.dport)) {
                Some(g) if *g != 0 => {}
                _ => return Reason::Unguarded,
            }
            (t.source, Some(t))
        }
        Err(parse::Miss::Verdict(r)) => return r,
        Err(parse::Miss::Source(parse::Unattributed(s))) => (s, None),
    };
    // The coarse clock (a tick's resolution) is cheaper to read, and the
    // buckets lose nothing on it (`proxy_common::bucket`).
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (listed, own, wide) = match source {
        Source::V4(a) => {
            (lists(cfg, &ALLOW_V4, &DENY_V4, &Key::new(32, a), now), key_v4(a, 32), key_v4(a, cfg.agg_v4_prefix))
        }
        Source::V6(a) => (
            lists(cfg, &ALLOW_V6, &DENY_V6, &Key::new(128, a), now),
            key_v6(a, cfg.v6_prefix),
            key_v6(a, cfg.agg_v6_prefix),
        ),
    };
    if let Some(r) = listed {
        return r;
    }
    match rate(ctx, cfg, tcp.as_ref(), &own, &wide, now) {
        Reason::UnderRate if tcp.is_none() => Reason::Malformed,
        r => r,
    }
}

#[inline(always)]
fn rate(ctx: &XdpContext, cfg: &XdpConfig, tcp: Option<&Tcp>, own: &SourceKey, wide: &SourceKey, now: u64) -> Reason {
    let set = set(cfg, own);
    if let Some(b) = set.and_then(|s| s.find(own)) {
        // SAFETY: a live array slot; concurrent updates from other CPUs can
        // only make the count approximate, never unsafe (cilium does the same).
        let b = unsafe { &mut *b };
        if !b.take(&cfg.source, now) {
            // Over its own rate: dropped on this one lookup. Its excess is
            // not charged to its prefix (it cannot pass anyway).
            return Reason::Rate;
        }
        // A source that has shown a real handshake is held by its own
        // bucket only: spoofed neighbours cannot spend its prefix for it.
        if b.proven() {
            return Reason::UnderRate;
        }
        if tcp.is_some_and(|t| t.flags & TCP_SYN == 0 && proven(ctx, t)) {
            b.set_proven();
            return Reason::UnderRate;
        }
        if !charge(&cfg.aggregate, wide, now) {
            b.drops = b.drops.wrapping_add(1);
            return Reason::Rate;
        }
        return Reason::UnderRate;
    }
    if !charge(&cfg.aggregate, wide, now) {
        return Reason::Rate;
    }
    if admit(&cfg.admit, now) {
        track(cfg, set, own, now, false);
        return Reason::UnderRate;
    }
    match tcp {
        // A new connection: the kernel's SYN cookies hold no state for it,
        // up to the host-wide cap on what they are handed; beyond it, the
        // challenge.
        Some(t) if t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN => {
            if take_host(UNTRACKED, &cfg.untracked, now) {
                Reason::Untracked
            } else if t.bare && (cfg.flags & FLAG_DRY_RUN != 0 || challenge::answer(ctx, t, now, cfg.seed)) {
                // In dry run the frame is left as it was and passes.
                Reason::Challenge
            } else {
                Reason::Rate
            }
        }
        // The RST a client's TCP answers a challenge with: a return path.
        Some(t)
            if t.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_RST
                && take_host(PROOFS, &cfg.admit, now)
                && challenge::answers(t, now, cfg.seed) =>
        {
            track(cfg, set, own, now, true);
            Reason::Proven
        }
        // A handshake is shown by a non-SYN packet (docs/kernel.md), as for
        // a tracked source above: a SYN-ACK is nothing a visitor sends.
        Some(t) if t.flags & TCP_SYN == 0 && proven(ctx, t) => {
            track(cfg, set, own, now, true);
            Reason::UnderRate
        }
        _ => Reason::Rate,
    }
}

/// The two slots of a source's set in `SOURCES`.
#[derive(Clone, Copy)]
struct Set {
    a: *mut Slot,
    b: *mut Slot,
}

impl Set {
    /// The bucket of `own`, when one of the two slots holds it.
    #[inline(always)]
    fn find(self, own: &SourceKey) -> Option<*mut Bucket> {
        // SAFETY: both point at live array slots (see `set`).
        unsafe {
            if (*self.a).holds(own) {
                Some(&raw mut (*self.a).bucket)
            } else if (*self.b).holds(own) {
                Some(&raw mut (*self.b).bucket)
            } else {
                None
            }
        }
    }
}

/// The set `own` hashes to (`None` only if the table is smaller than
/// `CONFIG` says, which the daemon never writes).
#[inline(always)]
fn set(cfg: &XdpConfig, own: &SourceKey) -> Option<Set> {
    let i = table::set_index(own, cfg.seed, cfg.table_mask);
    Some(Set { a: SOURCES.get_ptr_mut(i)?, b: SOURCES.get_ptr_mut(i | 1)? })
}

/// Give `own` a slot of its set (`proven`: it showed a real handshake): an
/// empty one, else the stalest (`table::victim`).
#[inline(always)]
fn track(cfg: &XdpConfig, set: Option<Set>, own: &SourceKey, now: u64, proven: bool) {
    let Some(s) = set else { return };
    let mut b = Bucket::fresh(&cfg.source, now);
    if proven {
        b.set_proven();
    }
    // SAFETY: live array slots; two CPUs writing one slot at once leave one
    // source's entry or a mix, which only makes a count approximate.
    unsafe {
        let slot = if table::victim(&*s.a, &*s.b) == 0 { s.a } else { s.b };
        *slot = Slot { key: *own, bucket: b };
    }
    if let Some(n) = NEW_SOURCES.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *n = (*n).wrapping_add(1) };
    }
}

/// Whether a non-SYN packet from an untracked source belongs to a real
/// handshake: the ACK of a SYN cookie the kernel sent, or a 4-tuple the
/// kernel holds a connection or request for. A spoofed source saw no SYN-ACK
/// and can show neither.
#[inline(always)]
fn proven(ctx: &XdpContext, t: &Tcp) -> bool {
    // SAFETY: the parser checked that each header lies wholly inside the
    // packet; the helpers only read them; the tuple lives on the stack.
    unsafe {
        let mut tup: bpf_sock_tuple = core::mem::zeroed();
        let size = match t.hdrs {
            Hdrs::V4 { ip, tcp } => {
                if bpf_tcp_raw_check_syncookie_ipv4(ip as *mut iphdr, tcp as *mut tcphdr) == 0 {
                    return true;
                }
                tup.__bindgen_anon_1.ipv4 = Tuple4 {
                    saddr: u32::from_ne_bytes((*ip).src),
                    daddr: u32::from_ne_bytes((*ip).dst),
                    sport: u16::from_ne_bytes((*tcp).sport),
                    dport: u16::from_ne_bytes((*tcp).dport),
                };
                core::mem::size_of::<Tuple4>()
            }
            Hdrs::V6 { ip, tcp } => {
                if bpf_tcp_raw_check_syncookie_ipv6(ip as *mut ipv6hdr, tcp as *mut tcphdr) == 0 {
                    return true;
                }
                tup.__bindgen_anon_1.ipv6 = Tuple6 {
                    saddr: words((*ip).src),
                    daddr: words((*ip).dst),
                    sport: u16::from_ne_bytes((*tcp).sport),
                    dport: u16::from_ne_bytes((*tcp).dport),
                };
                core::mem::size_of::<Tuple6>()
            }
        };
        let sk = bpf_skc_lookup_tcp(ctx.ctx.cast(), &mut tup, size as u32, BPF_F_CURRENT_NETNS as u64, 0);
        if sk.is_null() {
            return false;
        }
        let state = (*sk).state;
        bpf_sk_release(sk.cast());
        state != BPF_TCP_LISTEN
    }
}

/// An IPv6 address as four network-order words.
#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    let [a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15] = a;
    [
        u32::from_ne_bytes([a0, a1, a2, a3]),
        u32::from_ne_bytes([a4, a5, a6, a7]),
        u32::from_ne_bytes([a8, a9, a10, a11]),
        u32::from_ne_bytes([a12, a13, a14, a15]),
    ]
}

/// The (unexpired) deny list, then the allow list, each skipped while empty.
#[inline(always)]
fn lists<K>(
    cfg: &XdpConfig,
    allow: &LpmTrie<K, AllowValue>,
    deny: &LpmTrie<K, DenyValue>,
    key: &Key<K>,
    now: u64,
) -> Option<Reason> {
    if cfg.flags & FLAG_HAS_DENY != 0
        && let Some(d) = deny.get(key)
        && d.active(now)
    {
        return Some(Reason::Denied);
    }
    if cfg.flags & FLAG_HAS_ALLOW != 0 && allow.get(key).is_some() {
        return Some(Reason::Allowed);
    }
    None
}

/// Charge one new source to the host-wide admission bucket; false when over.
#[inline(always)]
fn admit(p: &Params, now: u64) -> bool {
    take_host(ADMISSION, p, now)
}

/// Charge one packet to host-wide bucket `i` of `ADMIT`; false when over.
#[inline(always)]
fn take_host(i: u32, p: &Params, now: u64) -> bool {
    match ADMIT.get_ptr_mut(i) {
        // SAFETY: the one array slot; racing CPUs may lose an update, which
        // only makes the admission rate approximate.
        Some(b) => unsafe { &mut *b }.take(p, now),
        None => true,
    }
}

/// Charge one packet to the aggregate bucket of `wide`; false when over.
#[inline(always)]
fn charge(p: &Params, wide: &SourceKey, now: u64) -> bool {
    if let Some(b) = AGGREGATES.get_ptr_mut(wide) {
        // SAFETY: as for SOURCES above.
        return unsafe { &mut *b }.take(p, now);
    }
    // Losing a race to another CPU only means that CPU's entry wins.
    let _ = AGGREGATES.insert(wide, Bucket::fresh(p, now), BPF_NOEXIST);
    true
}
