//! The one exit: turns a [`Reason`] into the XDP action (honouring dry run,
//! which passes what would be dropped or transmitted)
//! and counts packets and bytes under (action, reason) in the per-CPU `STATS`.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use proxy_common::{Action, FLAG_DRY_RUN, Reason, XdpConfig, stat_index};

use crate::STATS;

/// Count the packet and return its XDP action.
#[inline(always)]
pub fn record(ctx: &XdpContext, cfg: &XdpConfig, reason: Reason) -> u32 {
    let action = match reason.verdict() {
        Action::Drop | Action::Tx if cfg.flags & FLAG_DRY_RUN != 0 => Action::Pass,
        a => a,
    };
    if let Some(c) = STATS.get_ptr_mut(stat_index(action, reason)) {
        let len = ctx.data_end().saturating_sub(ctx.data()) as u64;
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*c).packets = (*c).packets.wrapping_add(1);
            (*c).bytes = (*c).bytes.wrapping_add(len);
        }
    }
    match action {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Tx => xdp_action::XDP_TX,
    }
}
