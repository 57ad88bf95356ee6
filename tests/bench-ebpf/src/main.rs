//! XDP programs for `cargo xtask bench`, built by `keyward-tests`' build
//! script into an object of their own that keyward never embeds nor loads:
//! - `bench_pass` and `bench_drop`: the floor and the baseline that
//!   keyward's program is measured against (`bench_drop` counts what it saw);
//! - `bench_tx` and `bench_tx_spoof`: live-frames generators
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES` turns `XDP_TX` into a transmit out of the
//!   ingress interface); the spoofing one rewrites the IPv4 source to
//!   `11.0.0.0 + n` with an incremental checksum update, `n` rotating
//!   sequentially through `BENCH_CONF[0]` sources, or drawn at random among
//!   them when `BENCH_CONF[1]` is non-zero. It first copies the frame's
//!   headers back from `BENCH_FRAME`: live frames reuse their pages
//!   without copying the frame in again, and a receiver that answers in
//!   place (keyward's challenges, sent back and dropped at the generator's
//!   end) returns them rewritten.
#![no_std]
#![no_main]
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects, clippy::panic, clippy::unwrap_used)]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_get_prandom_u32,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

#[map]
static BENCH_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Index 0: how many distinct sources `bench_tx_spoof` rotates through;
/// index 1: non-zero to draw them at random instead of in sequence.
#[map]
static BENCH_CONF: Array<u32> = Array::with_max_entries(2, 0);
#[map]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
/// The first [`HEADERS`] bytes of the generator's frame, as user space
/// wrote them.
#[map]
static BENCH_FRAME: Array<[u8; HEADERS]> = Array::with_max_entries(1, 0);

/// Ethernet, IPv4 and TCP headers of the generator's untagged frame.
pub const HEADERS: usize = 54;

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    if let Some(c) = BENCH_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c = (*c).wrapping_add(1) };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Offset of the IPv4 header checksum and source address in an untagged frame.
const CSUM: usize = 14 + 10;
const SADDR: usize = 14 + 12;

#[xdp]
pub fn bench_tx_spoof(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start.wrapping_add(HEADERS) > end {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(h) = BENCH_FRAME.get(0) {
        // SAFETY: the frame holds HEADERS bytes (checked above).
        unsafe { *(start as *mut [u8; HEADERS]) = *h };
    }
    let n = BENCH_CONF.get(0).copied().unwrap_or(1).max(1);
    let random = BENCH_CONF.get(1).is_some_and(|r| *r != 0);
    let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot; the frame bounds were checked above.
    unsafe {
        let s = if random { bpf_get_prandom_u32() } else { (*seq).wrapping_add(1) };
        *seq = if s >= n { s.checked_rem(n).unwrap_or(0) } else { s };
        let new = 0x0b00_0000u32.wrapping_add(*seq);
        let p = start.wrapping_add(SADDR) as *mut [u8; 4];
        let old = u32::from_be_bytes(*p);
        *p = new.to_be_bytes();
        // RFC 1624: HC' = ~(~HC + ~m + m'), over 16-bit words.
        let c = start.wrapping_add(CSUM) as *mut [u8; 2];
        let mut sum = u32::from(!u16::from_be_bytes(*c));
        for (o, m) in [(old >> 16, new >> 16), (old & 0xffff, new & 0xffff)] {
            sum = sum.wrapping_add(u32::from(!(o as u16))).wrapping_add(m);
        }
        // Five 16-bit words fit in 19 bits: two folds always suffice (and
        // a bounded loop is what the verifier wants).
        for _ in 0..2 {
            sum = (sum & 0xffff).wrapping_add(sum >> 16);
        }
        *c = (!(sum as u16)).to_be_bytes();
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
