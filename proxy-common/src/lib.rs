//! The one home of everything keyward's XDP program and its user space must
//! agree on: map names, the `#[repr(C)]` layouts of keys and values, reason
//! codes, and the token-bucket and prefix arithmetic. The kernel program and
//! the daemon both call the functions here, so the arithmetic that decides a
//! drop is the arithmetic the host unit tests check.
#![no_std]
// The kernel runs this code: no panic, no unchecked indexing or arithmetic
// (the host tests may use them).
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects, clippy::panic, clippy::unwrap_used)
)]

pub mod bucket;
pub mod challenge;
pub mod prefix;
pub mod table;

/// Names of the maps in the eBPF object. `#[map]` statics in `proxy-ebpf` carry
/// these identifiers (the ELF name equals the ident); a test asserts that every
/// name resolves in the embedded object. All fit the kernel's 15-byte
/// `BPF_OBJ_NAME_LEN`.
pub mod maps {
    /// `Array<XdpConfig>`, one entry: rates, prefixes, flags.
    pub const CONFIG: &str = "CONFIG";
    /// `Array<u8>` indexed by TCP destination port: non-zero = guarded.
    pub const PORTS: &str = "PORTS";
    /// `LpmTrie<[u8; 4], AllowValue>`.
    pub const ALLOW_V4: &str = "ALLOW_V4";
    /// `LpmTrie<[u8; 16], AllowValue>`.
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// `LpmTrie<[u8; 4], DenyValue>`.
    pub const DENY_V4: &str = "DENY_V4";
    /// `LpmTrie<[u8; 16], DenyValue>`.
    pub const DENY_V6: &str = "DENY_V6";
    /// `Array<table::Slot>`: one bucket per source (IPv4 /32, IPv6 per
    /// prefix) in two-way sets ([`crate::table`]).
    pub const SOURCES: &str = "SOURCES";
    /// `LruHashMap<SourceKey, Bucket>`: one bucket per wider prefix.
    pub const AGGREGATES: &str = "AGGREGATES";
    /// `PerCpuArray<Counter>` indexed by [`crate::stat_index`].
    pub const STATS: &str = "STATS";
    /// `PerCpuArray<u64>`, one entry: per-source buckets created.
    pub const NEW_SOURCES: &str = "NEW_SOURCES";
    /// `Array<Bucket>`, [`crate::ADMIT_LEN`] entries: the host-wide buckets
    /// that admit new sources into the per-source table
    /// ([`crate::ADMIT_NEW_SOURCES`]) and cap the untracked SYNs passed to
    /// the kernel ([`crate::ADMIT_UNTRACKED_SYNS`]), and bound the RSTs
    /// checked against a challenge ([`crate::ADMIT_PROOFS`]).
    pub const ADMIT: &str = "ADMIT";

    /// Every map name, for pinning and for the test that checks them.
    pub const ALL: [&str; 11] =
        [CONFIG, PORTS, ALLOW_V4, ALLOW_V6, DENY_V4, DENY_V6, SOURCES, AGGREGATES, STATS, NEW_SOURCES, ADMIT];
}

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "keyward_xdp";

/// Capacity of the aggregate-bucket table (one entry per wider prefix).
pub const AGGREGATES_MAX: u32 = 65_536;
/// Default capacity of the per-source table; `xdp.table_size` overrides it
/// at load (rounded up to a power of two, [`table::slots_for`]).
pub const SOURCES_MAX_DEFAULT: u32 = 1_048_576;
/// Capacity of each allow and deny trie.
pub const LIST_MAX: u32 = 262_144;
/// Entries of `ADMIT`.
pub const ADMIT_LEN: u32 = 3;
/// `ADMIT` index of the bucket admitting new sources into the per-source table.
pub const ADMIT_NEW_SOURCES: u32 = 0;
/// `ADMIT` index of the bucket capping SYNs passed untracked to the kernel.
pub const ADMIT_UNTRACKED_SYNS: u32 = 1;
/// `ADMIT` index of the bucket bounding the RSTs of untracked sources
/// checked against a challenge ([`challenge`]); it runs at the admission
/// bucket's rate.
pub const ADMIT_PROOFS: u32 = 2;
/// IPv6 extension headers walked before a packet counts as malformed.
pub const MAX_V6_EXT_HEADERS: u32 = 6;

/// Why the XDP program reached its verdict. The discriminants index the
/// `STATS` map (with [`Action`]) and name the `reason` label of
/// `keyward_xdp_packets_total`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not TCP to a guarded port (ARP, ND, SSH, DNS, other ports, non-first fragments).
    Unguarded = 0,
    /// Source in the allow list.
    Allowed = 1,
    /// Source in the deny list (and the entry has not expired).
    Denied = 2,
    /// Over the per-source, the aggregate or the admission bucket; or an
    /// untracked source's packet that is neither a SYN under the untracked
    /// cap nor shows a handshake or a return path.
    Rate = 3,
    /// Guarded, under every bucket.
    UnderRate = 4,
    /// A header was truncated or garbled; passed untouched, never dropped.
    Malformed = 5,
    /// A SYN from a source not in the table while the admission bucket is
    /// spent, under the host-wide cap on such SYNs: passed without a table
    /// entry, to the kernel's own SYN cookies (a spoofed flood of new
    /// sources must not lock new visitors out).
    Untracked = 6,
    /// Such a SYN over the untracked cap: answered in place (`XDP_TX`) by a
    /// challenge SYN-ACK whose acknowledgement number a real client answers
    /// with a RST ([`challenge`]).
    Challenge = 7,
    /// A RST from a source not in the table that answers a challenge: the
    /// source has a return path and is tracked as proven; the RST itself
    /// is dropped.
    Proven = 8,
}

/// Number of [`Reason`] values.
pub const REASON_COUNT: u32 = 9;

impl Reason {
    /// Every reason, in discriminant order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::Unguarded,
        Reason::Allowed,
        Reason::Denied,
        Reason::Rate,
        Reason::UnderRate,
        Reason::Malformed,
        Reason::Untracked,
        Reason::Challenge,
        Reason::Proven,
    ];

    /// The metric label and CLI name.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Unguarded => "unguarded",
            Reason::Allowed => "allowed",
            Reason::Denied => "denied",
            Reason::Rate => "rate",
            Reason::UnderRate => "under_rate",
            Reason::Malformed => "malformed",
            Reason::Untracked => "untracked",
            Reason::Challenge => "challenge",
            Reason::Proven => "proven",
        }
    }

    /// The one place that decides what each reason does to the packet
    /// (before `dry_run`, which turns every drop into a counted pass).
    pub const fn verdict(self) -> Action {
        match self {
            Reason::Denied | Reason::Rate | Reason::Proven => Action::Drop,
            Reason::Challenge => Action::Tx,
            Reason::Unguarded | Reason::Allowed | Reason::UnderRate | Reason::Malformed | Reason::Untracked => {
                Action::Pass
            }
        }
    }
}

/// What happened to the packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `XDP_PASS`.
    Pass = 0,
    /// `XDP_DROP`.
    Drop = 1,
    /// `XDP_TX`: the frame, rewritten, goes back out of the interface.
    Tx = 2,
}

impl Action {
    /// Both actions, in discriminant order.
    pub const ALL: [Action; 3] = [Action::Pass, Action::Drop, Action::Tx];

    /// The metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Drop => "drop",
            Action::Tx => "tx",
        }
    }
}

/// Entries in `STATS`.
pub const STATS_LEN: u32 = REASON_COUNT * 3;

/// Index of the (action, reason) counter in `STATS`.
#[inline(always)]
pub const fn stat_index(action: Action, reason: Reason) -> u32 {
    // Both factors are tiny enums: cannot overflow, so wrapping is exact.
    (reason as u32).wrapping_mul(3).wrapping_add(action as u32)
}

/// One per-CPU counter slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// `XdpConfig::flags` bit: count would-be drops as passes.
pub const FLAG_DRY_RUN: u32 = 1;
/// `XdpConfig::flags` bit: the allow tries hold entries (else skip them).
pub const FLAG_HAS_ALLOW: u32 = 2;
/// `XdpConfig::flags` bit: the deny tries hold entries (else skip them).
pub const FLAG_HAS_DENY: u32 = 4;

/// Runtime knobs the daemon writes into `CONFIG` (index 0) and may rewrite at
/// any time without reloading the program. Rates are pre-converted into the
/// token bucket's nanosecond form so the packet path does no division.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpConfig {
    /// Per-source bucket.
    pub source: bucket::Params,
    /// Aggregate bucket per wider prefix.
    pub aggregate: bucket::Params,
    /// Host-wide bucket admitting sources not yet in the per-source table.
    pub admit: bucket::Params,
    /// Host-wide bucket capping the SYNs passed untracked to the kernel
    /// while `admit` is spent; beyond it they are dropped (`rate`).
    pub untracked: bucket::Params,
    /// IPv6 sources share a per-source bucket per this prefix length.
    pub v6_prefix: u32,
    /// Aggregate prefix length for IPv4.
    pub agg_v4_prefix: u32,
    /// Aggregate prefix length for IPv6.
    pub agg_v6_prefix: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Slots in `SOURCES` minus one (a power of two minus one).
    pub table_mask: u32,
    /// Reserved (zero).
    pub reserved: u32,
    /// Key of the hash that places sources in `SOURCES` ([`table::set_index`]),
    /// random per load.
    pub seed: u64,
}
const _: () = assert!(core::mem::size_of::<XdpConfig>() == 96);

/// Key of `SOURCES` and `AGGREGATES`: an IPv6 address, or an IPv4 address
/// mapped into `::ffff:0:0/96`, already masked to the bucket's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 16);

/// Value of `SOURCES` and `AGGREGATES`. 16 bytes: at a million sources
/// every byte here is a MiB of kernel memory, so the per-source counters
/// (shown by `keyward top`) are 32-bit and wrap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Theoretical arrival time of the next conforming packet (ns,
    /// `bpf_ktime_get_coarse_ns`), except its lowest bit: [`Bucket::PROVEN`]
    /// (a nanosecond of the arrival time is not worth 8 bytes per source).
    pub tat_ns: u64,
    /// Packets seen while the entry existed (wrapping).
    pub packets: u32,
    /// Of those, dropped (or, in dry run, counted as would-drop; wrapping).
    pub drops: u32,
}
const _: () = assert!(core::mem::size_of::<Bucket>() == 16);

impl Bucket {
    /// Bit of `tat_ns` set once the source has shown a real TCP handshake
    /// (the kernel accepted its ACK): it is then held by its own bucket only,
    /// never by its prefix's aggregate.
    pub const PROVEN: u64 = 1;

    /// A bucket whose first packet, at `now`, was admitted.
    #[inline(always)]
    pub const fn fresh(p: &bucket::Params, now_ns: u64) -> Bucket {
        Bucket { tat_ns: p.first(now_ns) & !Bucket::PROVEN, packets: 1, drops: 0 }
    }

    /// Whether the source has shown a real handshake.
    #[inline(always)]
    pub const fn proven(&self) -> bool {
        self.tat_ns & Bucket::PROVEN != 0
    }

    /// Mark the source as having shown a real handshake.
    #[inline(always)]
    pub fn set_proven(&mut self) {
        self.tat_ns |= Bucket::PROVEN;
    }

    /// Count one packet against the bucket: true when admitted (the arrival
    /// time moves on), false when over the limit (counted as a drop).
    #[inline(always)]
    pub fn take(&mut self, p: &bucket::Params, now_ns: u64) -> bool {
        self.packets = self.packets.wrapping_add(1);
        let flag = self.tat_ns & Bucket::PROVEN;
        match p.admit(self.tat_ns & !Bucket::PROVEN, now_ns) {
            Some(t) => {
                self.tat_ns = (t & !Bucket::PROVEN) | flag;
                true
            }
            None => {
                self.drops = self.drops.wrapping_add(1);
                false
            }
        }
    }
}

/// Value of the deny tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyValue {
    /// `CLOCK_MONOTONIC` ns after which the entry counts as absent; 0 = never.
    pub expires_ns: u64,
}
const _: () = assert!(core::mem::size_of::<DenyValue>() == 8);

impl DenyValue {
    /// Whether the entry is in force at `now_ns`.
    #[inline(always)]
    pub const fn active(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || now_ns < self.expires_ns
    }
}

/// Value of the allow tries (reserved flags, currently zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowValue {
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<AllowValue>() == 4);

#[cfg(feature = "user")]
mod pod {
    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: the type is #[repr(C)], Copy, made only of integers,
            // with no implicit padding (sizes asserted above): every bit
            // pattern is a valid value.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        super::Counter,
        super::XdpConfig,
        super::SourceKey,
        super::Bucket,
        super::DenyValue,
        super::AllowValue,
        super::table::Slot
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proven_bit_survives_takes_and_costs_at_most_a_nanosecond() {
        let p = bucket::Params::new(10, 2);
        let now = 1_000 * bucket::NS_PER_SEC;
        let mut b = Bucket::fresh(&p, now);
        assert!(!b.proven());
        b.set_proven();
        assert!(b.take(&p, now) && b.proven());
        assert!(!b.take(&p, now) && b.proven(), "the burst of 2 is spent");
        assert!(b.take(&p, now + p.interval_ns) && b.proven());
        let mut plain = Bucket::fresh(&p, now);
        plain.take(&p, now);
        plain.take(&p, now + p.interval_ns);
        assert!(plain.tat_ns.abs_diff(b.tat_ns) <= 1);
    }

    #[test]
    fn stat_indices_are_distinct_and_in_range() {
        let mut seen = [false; STATS_LEN as usize];
        for r in Reason::ALL {
            for a in Action::ALL {
                let i = stat_index(a, r) as usize;
                assert!(i < seen.len());
                assert!(!seen.get(i).copied().unwrap_or(true), "duplicate index {i}");
                if let Some(s) = seen.get_mut(i) {
                    *s = true;
                }
            }
        }
    }

    #[test]
    fn reasons_are_in_discriminant_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn only_denied_rate_and_proven_drop_and_only_challenge_transmits() {
        for r in Reason::ALL {
            let drops = matches!(r, Reason::Denied | Reason::Rate | Reason::Proven);
            assert_eq!(r.verdict() == Action::Drop, drops, "{r:?}");
            assert_eq!(r.verdict() == Action::Tx, r == Reason::Challenge, "{r:?}");
        }
    }

    #[test]
    fn bucket_take_counts_packets_and_drops() {
        let p = bucket::Params::new(10, 2);
        let mut b = Bucket::fresh(&p, 1_000);
        assert!(b.take(&p, 1_000));
        assert!(!b.take(&p, 1_000));
        assert_eq!((b.packets, b.drops), (3, 1));
        // A tenth of a second later one more token is back.
        assert!(b.take(&p, 1_000 + 100_000_000));
    }

    #[test]
    fn deny_expiry() {
        assert!(DenyValue { expires_ns: 0 }.active(u64::MAX));
        assert!(DenyValue { expires_ns: 10 }.active(9));
        assert!(!DenyValue { expires_ns: 10 }.active(10));
    }
}
