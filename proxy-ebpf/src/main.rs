//! keyward's XDP program. The entry is thin: parse, decide, and return through
//! [`stats::record`], which counts every verdict under its reason. Maps live
//! here; parsing in `parse`, the allow/deny/rate decision in `policy`.
#![no_std]
#![no_main]
// The verifier and the packet path: no panic, no unchecked indexing or
// arithmetic anywhere in the program.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects, clippy::panic, clippy::unwrap_used)]

mod challenge;
mod parse;
mod policy;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use proxy_common::{
    ADMIT_LEN, AGGREGATES_MAX, AllowValue, Bucket, Counter, DenyValue, LIST_MAX, SOURCES_MAX_DEFAULT, STATS_LEN,
    SourceKey, XdpConfig, table::Slot,
};

#[map]
static CONFIG: Array<XdpConfig> = Array::with_max_entries(1, 0);
#[map]
static PORTS: Array<u8> = Array::with_max_entries(65_536, 0);
#[map]
static ALLOW_V4: LpmTrie<[u8; 4], AllowValue> = LpmTrie::with_max_entries(LIST_MAX, 0);
#[map]
static ALLOW_V6: LpmTrie<[u8; 16], AllowValue> = LpmTrie::with_max_entries(LIST_MAX, 0);
#[map]
static DENY_V4: LpmTrie<[u8; 4], DenyValue> = LpmTrie::with_max_entries(LIST_MAX, 0);
#[map]
static DENY_V6: LpmTrie<[u8; 16], DenyValue> = LpmTrie::with_max_entries(LIST_MAX, 0);
/// Resized at load from `xdp.table_size` (a power of two; `proxy_common::table`).
#[map]
static SOURCES: Array<Slot> = Array::with_max_entries(SOURCES_MAX_DEFAULT, 0);
#[map]
static AGGREGATES: LruHashMap<SourceKey, Bucket> = LruHashMap::with_max_entries(AGGREGATES_MAX, 0);
/// Per-CPU so the hot path needs no atomics (as xdp-tools' `xdp_stats_map`).
#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_LEN, 0);
#[map]
static NEW_SOURCES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Host-wide buckets, shared by all CPUs (updates race benignly): new
/// sources admitted into `SOURCES`, untracked SYNs passed to the kernel,
/// and RSTs checked against a challenge.
#[map]
static ADMIT: Array<Bucket> = Array::with_max_entries(ADMIT_LEN, 0);

/// The program. Every path, parse failures included, ends in `stats::record`.
#[xdp]
pub fn keyward_xdp(ctx: XdpContext) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let reason = policy::decide(&ctx, cfg);
    stats::record(&ctx, cfg, reason)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic is reachable (the crate denies indexing, unwraps and
    // unchecked arithmetic); this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
