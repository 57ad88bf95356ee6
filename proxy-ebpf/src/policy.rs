//! The decision for a parsed packet, in order: unguarded port → pass; deny
//! list (unexpired) → drop; allow list → pass (a deny inside an allowed
//! network wins; docs/kernel.md); then the buckets. A packet whose
//! source is known but whose port is not (cut short, too many IPv6
//! extension headers) meets the deny list and its source's buckets too, and
//! passes as `malformed` when under them: it cannot be a way around either.
//!
//! Rate: a known source is charged to its own bucket, then to the aggregate
//! bucket of its wider prefix. An unknown source is first charged to the
//! aggregate bucket, then to the host-wide admission bucket, and gets a
//! per-source entry only when both admit it: a flood that rotates sources
//! inside one prefix is held by the aggregate, one spread over many prefixes
//! by the admission bucket, and neither can churn the per-source table at
//! line rate (an LRU insert costs several times a lookup).
//!
//! The allow and deny tries are skipped while they are empty (flags the
//! daemon keeps in `CONFIG`).

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};
use proxy_common::{
    AllowValue, Bucket, DenyValue, FLAG_HAS_ALLOW, FLAG_HAS_DENY, Reason, SourceKey, XdpConfig,
    bucket::Params,
    prefix::{key_v4, key_v6},
};

use crate::{
    ADMIT, AGGREGATES, ALLOW_V4, ALLOW_V6, DENY_V4, DENY_V6, NEW_SOURCES, PORTS, SOURCES,
    parse::{self, Source},
};

/// `BPF_NOEXIST`: insert only when absent (two CPUs may race on a new source).
const BPF_NOEXIST: u64 = 1;

/// Decide the reason for this packet.
#[inline(always)]
pub fn decide(ctx: &XdpContext, cfg: &XdpConfig) -> Reason {
    let (source, unattributed) = match parse::tcp(ctx) {
        Ok(t) => {
            match PORTS.get(u32::from(t.dport)) {
                Some(g) if *g != 0 => {}
                _ => return Reason::Unguarded,
            }
            (t.source, false)
        }
        Err(parse::Miss::Verdict(r)) => return r,
        Err(parse::Miss::Source(parse::Unattributed(s))) => (s, true),
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
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
    match rate(cfg, &own, &wide, now) {
        Reason::UnderRate if unattributed => Reason::Malformed,
        r => r,
    }
}

#[inline(always)]
fn rate(cfg: &XdpConfig, own: &SourceKey, wide: &SourceKey, now: u64) -> Reason {
    if let Some(b) = SOURCES.get_ptr_mut(own) {
        // SAFETY: a live LRU element; concurrent updates from other CPUs can
        // only make the count approximate, never unsafe (cilium does the same).
        let b = unsafe { &mut *b };
        if !b.take(&cfg.source, now) {
            return Reason::Rate;
        }
        if !charge(&cfg.aggregate, wide, now) {
            b.drops = b.drops.wrapping_add(1);
            return Reason::Rate;
        }
        return Reason::UnderRate;
    }
    if !charge(&cfg.aggregate, wide, now) || !admit(&cfg.admit, now) {
        return Reason::Rate;
    }
    if SOURCES.insert(own, Bucket::fresh(&cfg.source, now), BPF_NOEXIST).is_ok()
        && let Some(n) = NEW_SOURCES.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot.
        unsafe { *n = (*n).wrapping_add(1) };
    }
    Reason::UnderRate
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
    match ADMIT.get_ptr_mut(0) {
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
