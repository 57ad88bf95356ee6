//! The per-source table's layout and hashing: a power-of-two array of
//! [`Slot`]s (key and bucket, 32 bytes) in two-way sets. A source lives in
//! one of the two slots of the set its keyed hash picks; a new source takes
//! an empty slot of its set, else the stalest one (the earlier arrival
//! time). An array map costs 32 bytes per slot where the kernel's LRU hash
//! costs 96 per entry (48 of element header and 16 of hash bucket before
//! key and value), and its lookups and inserts need no lock and no helper
//! call. The kernel program and the daemon's readers both use this code.

use crate::{Bucket, SourceKey};

/// One slot: a source and its bucket. Empty while the arrival time is 0
/// (a bucket's arrival time is always later than boot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub key: SourceKey,
    pub bucket: Bucket,
}
const _: () = assert!(core::mem::size_of::<Slot>() == 32);

impl Slot {
    /// Whether the slot holds a source.
    #[inline(always)]
    pub const fn used(&self) -> bool {
        self.bucket.tat_ns != 0
    }

    /// Whether the slot holds `key`.
    #[inline(always)]
    pub fn holds(&self, key: &SourceKey) -> bool {
        let (a, b) = words(key);
        let (c, d) = words(&self.key);
        self.used() && a == c && b == d
    }

    /// Its arrival time without the proven bit: the older, the staler.
    #[inline(always)]
    pub const fn age_key(&self) -> u64 {
        self.bucket.tat_ns & !Bucket::PROVEN
    }
}

/// Slots in a table asked to hold `n` sources: `n` rounded up to a power of
/// two (at least 2, at most 2³¹), so that a set is an aligned pair.
pub const fn slots_for(n: u32) -> u32 {
    let n = if n < 2 { 2 } else { n };
    match n.checked_next_power_of_two() {
        Some(p) => p,
        None => 1 << 31,
    }
}

/// Index of the first slot of `key`'s set in a table of `mask + 1` slots
/// (`mask + 1` a power of two): a multiply-xorshift hash of the key keyed by
/// `seed` (random per load, so that which sources share a set cannot be
/// chosen from outside), its lowest bit cleared.
#[inline(always)]
pub fn set_index(key: &SourceKey, seed: u64, mask: u32) -> u32 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    const K3: u64 = 0x1656_67b1_9e37_79f9;
    let (a, b) = words(key);
    let mut h = (a ^ seed).wrapping_mul(K1) ^ (b ^ seed.rotate_left(29)).wrapping_mul(K2);
    h ^= h >> 31;
    h = h.wrapping_mul(K3);
    h ^= h >> 29;
    ((h >> 32) as u32) & mask & !1
}

/// One round of the keyed multiply-xorshift hash (also the challenge
/// cookie's, `crate::challenge`).
#[inline(always)]
pub(crate) const fn mix(a: u64, b: u64, seed: u64) -> u64 {
    let mut h = a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (b ^ seed.rotate_left(29)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    h ^= h >> 31;
    h = h.wrapping_mul(0x1656_67b1_9e37_79f9);
    h ^ (h >> 29)
}

/// A key as two native-endian words (two loads in the kernel, no memcmp).
#[inline(always)]
pub(crate) const fn words(k: &SourceKey) -> (u64, u64) {
    let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = k.addr;
    (u64::from_ne_bytes([a0, a1, a2, a3, a4, a5, a6, a7]), u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]))
}

/// Which slot of a set (`0` or `1`) a new source takes: an empty one, else
/// the stalest.
#[inline(always)]
pub const fn victim(a: &Slot, b: &Slot) -> u32 {
    if a.used() && (!b.used() || b.age_key() < a.age_key()) { 1 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::key_v4;

    #[test]
    fn slots_are_powers_of_two() {
        assert_eq!(slots_for(0), 2);
        assert_eq!(slots_for(1), 2);
        assert_eq!(slots_for(1024), 1024);
        assert_eq!(slots_for(1025), 2048);
        assert_eq!(slots_for(u32::MAX), 1 << 31);
    }

    #[test]
    fn sets_are_aligned_pairs_in_range_and_spread() {
        let mask = 4095;
        let mut used = [0u32; 2048];
        for i in 0..20_000u32 {
            let k = key_v4(i.to_be_bytes(), 32);
            let s = set_index(&k, 0x1234_5678_9abc_def0, mask);
            assert_eq!(s & 1, 0);
            assert!(s <= mask);
            used[(s / 2) as usize] += 1;
        }
        // 20,000 keys over 2,048 sets: about 9.8 each; none empty, none far over.
        assert!(used.iter().all(|&n| (1..=30).contains(&n)), "{:?}", used.iter().max());
    }

    #[test]
    fn the_seed_changes_the_sets() {
        let k = key_v4([10, 0, 0, 1], 32);
        let m = (1 << 20) - 1;
        let same = (0..64u64).filter(|s| set_index(&k, *s, m) == set_index(&k, 0, m)).count();
        assert!(same < 4, "{same} of 64 seeds give the same set");
    }

    #[test]
    fn a_slot_holds_its_key_only_while_used() {
        let k = key_v4([10, 0, 0, 1], 32);
        let mut s = Slot { key: k, bucket: Bucket::default() };
        assert!(!s.holds(&k), "an empty slot holds nothing");
        s.bucket.tat_ns = 5;
        assert!(s.holds(&k));
        assert!(!s.holds(&key_v4([10, 0, 0, 2], 32)));
    }

    #[test]
    fn the_victim_is_an_empty_slot_else_the_stalest() {
        let k = SourceKey::default();
        let at = |t| Slot { key: k, bucket: Bucket { tat_ns: t, packets: 1, drops: 0 } };
        assert_eq!(victim(&at(0), &at(0)), 0);
        assert_eq!(victim(&at(9), &at(0)), 1);
        assert_eq!(victim(&at(9), &at(5)), 1);
        assert_eq!(victim(&at(5), &at(9)), 0);
        // The proven bit does not make a slot look fresher.
        assert_eq!(victim(&at(5 | Bucket::PROVEN), &at(6)), 0);
    }
}
