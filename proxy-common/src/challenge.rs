//! The stateless SYN-ACK challenge that proves a new source has a return
//! path while the host-wide buckets are spent (docs/kernel.md, "Admission
//! spent"). Over the untracked cap a SYN is answered, in XDP, by a SYN-ACK
//! whose acknowledgement number lies just below the client's initial
//! sequence number (ISN): unacceptable to a TCP in SYN-SENT, which answers
//! it with a RST whose sequence number is that acknowledgement number
//! (RFC 793, 9293 §3.10.7.3; Linux `tcp_rcv_synsent_state_process`). The
//! acknowledgement number keeps the ISN's upper 17 bits and carries in its
//! lower 15 a keyed hash of the 4-tuple and a ~69 s time slot, so that the
//! RST, which does not carry the ISN, can be checked from its own 4-tuple:
//! its low 15 bits must be the cookie of the current or the previous slot.
//! The kernel program and the host tests call these functions.

use crate::SourceKey;

/// Bits of the cookie carried in the acknowledgement number.
pub const COOKIE_BITS: u32 = 15;
/// Mask of the cookie bits.
pub const COOKIE_MASK: u32 = 0x7fff;
/// The distance between two acknowledgement numbers with the same cookie.
const COOKIE_PERIOD: u32 = 0x8000;
const _: () = assert!(COOKIE_PERIOD == 1 << COOKIE_BITS && COOKIE_MASK == COOKIE_PERIOD - 1);
/// A time slot is `now_ns >> SLOT_SHIFT` (2³⁶ ns, about 68.7 s); a RST is
/// accepted in the slot of its SYN-ACK or the next one.
pub const SLOT_SHIFT: u32 = 36;
/// TTL and hop limit of a challenge.
pub const TTL: u8 = 64;
/// Receive window of a challenge: the largest an unscaled SYN-ACK can
/// offer, so that a connection tracker on the client's side finds the
/// RST (up to 32,768 below the end of the SYN) inside it.
pub const WINDOW: u16 = 65_535;

/// The time slot of `now_ns`.
#[inline(always)]
pub const fn slot(now_ns: u64) -> u64 {
    now_ns >> SLOT_SHIFT
}

/// The 4-tuple of a packet from the client as the cookie reads it:
/// addresses as `SourceKey`s (IPv4 mapped, whole address), ports as their
/// wire bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: SourceKey,
    pub dst: SourceKey,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

/// The keyed hash of `t` in `slot`: 64 bits, of which the cookie is the
/// low [`COOKIE_BITS`] and the challenge's own sequence number the high 32.
#[inline(always)]
pub fn hash(t: &Tuple, slot: u64, seed: u64) -> u64 {
    let (a, b) = crate::table::words(&t.src);
    let (c, d) = crate::table::words(&t.dst);
    let ports = (u64::from(u16::from_ne_bytes(t.sport)) << 16) | u64::from(u16::from_ne_bytes(t.dport));
    let mut h = crate::table::mix(a ^ seed, b ^ slot.rotate_left(40), seed);
    h = crate::table::mix(h ^ c, d ^ ports, seed);
    crate::table::mix(h, slot, seed)
}

/// The acknowledgement number of the challenge to a SYN with sequence
/// number `isn` and hash `h`: the ISN's upper 17 bits and the cookie,
/// moved one period down when that would not be below the ISN. So it lies
/// in `[isn - 32768, isn - 1]`: at or below the ISN (unacceptable), and well
/// within the 66,000 below it that Linux conntrack accepts for a SYN-ACK.
#[inline(always)]
pub const fn ack(isn: u32, h: u64) -> u32 {
    let a = (isn & !COOKIE_MASK) | (h as u32 & COOKIE_MASK);
    if a >= isn { a.wrapping_sub(COOKIE_PERIOD) } else { a }
}

/// The challenge's own sequence number (the client's RST does not echo
/// it; it only has to look like any server's).
#[inline(always)]
pub const fn seq(h: u64) -> u32 {
    (h >> 32) as u32
}

/// Whether a RST with sequence number `rst_seq` answers a challenge sent
/// with hash `h` (that of its slot).
#[inline(always)]
pub const fn answers(rst_seq: u32, h: u64) -> bool {
    rst_seq & COOKIE_MASK == h as u32 & COOKIE_MASK
}

/// Whether a RST on `t` with sequence number `rst_seq` answers a challenge
/// sent in the slot of `now_ns` or the one before.
#[inline(always)]
pub fn verify(t: &Tuple, rst_seq: u32, now_ns: u64, seed: u64) -> bool {
    let s = slot(now_ns);
    answers(rst_seq, hash(t, s, seed)) || answers(rst_seq, hash(t, s.wrapping_sub(1), seed))
}

/// RFC 1624 incremental checksum update: the checksum `check` (as read
/// from the wire, big-endian) after 16-bit word `old` became `new`.
#[inline(always)]
pub const fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    // HC' = ~(~HC + ~m + m'); three 16-bit terms cannot overflow a u32.
    let mut s = ((!check) as u32).wrapping_add((!old) as u32).wrapping_add(new as u32);
    s = (s & 0xffff).wrapping_add(s >> 16);
    s = (s & 0xffff).wrapping_add(s >> 16);
    !(s as u16)
}

/// [`csum_replace`] for a 32-bit field (two words).
#[inline(always)]
pub const fn csum_replace32(check: u16, old: u32, new: u32) -> u16 {
    let c = csum_replace(check, (old >> 16) as u16, (new >> 16) as u16);
    csum_replace(c, old as u16, new as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::key_v4;

    fn tuple(last: u8, sport: u16) -> Tuple {
        Tuple {
            src: key_v4([192, 0, 2, last], 32),
            dst: key_v4([198, 51, 100, 1], 32),
            sport: sport.to_be_bytes(),
            dport: 443u16.to_be_bytes(),
        }
    }

    #[test]
    fn the_ack_is_below_the_isn_and_within_a_half_window() {
        for isn in [0u32, 1, 0x7fff, 0x8000, 0x8001, 123_456_789, u32::MAX, u32::MAX - 0x7fff] {
            for h in [0u64, 1, 0x7ffe, 0x7fff, 0x1234_5678_9abc_def0, u64::MAX] {
                let a = ack(isn, h);
                let k = isn.wrapping_sub(a);
                assert!((1..=32_768).contains(&k), "isn {isn:#x} h {h:#x}: k {k}");
                assert!(answers(a, h));
            }
        }
    }

    #[test]
    fn a_rst_verifies_in_its_slot_and_the_next_only() {
        let t = tuple(10, 40_000);
        let seed = 0x5eed_5eed_1234_5678;
        let now = 1000u64 << SLOT_SHIFT;
        let a = ack(987_654_321, hash(&t, slot(now), seed));
        assert!(verify(&t, a, now, seed));
        assert!(verify(&t, a, now + (1 << SLOT_SHIFT), seed), "the next slot");
        assert!(!verify(&t, a, now + (2 << SLOT_SHIFT), seed), "two slots later");
        assert!(!verify(&t, a ^ 1, now, seed), "another sequence number");
        assert!(!verify(&t, a, now, seed ^ 1), "another seed");
        assert!(!verify(&tuple(11, 40_000), a, now, seed), "another source");
        assert!(!verify(&tuple(10, 40_001), a, now, seed), "another port");
    }

    #[test]
    fn blind_guesses_succeed_about_once_in_16k() {
        // A spoofer that never saw the challenge: every sequence number of
        // one 15-bit period, against one tuple, matches twice (two slots)
        // at most.
        let t = tuple(10, 40_000);
        let now = 77u64 << SLOT_SHIFT;
        let hits = (0..=COOKIE_MASK).filter(|s| verify(&t, *s, now, 42)).count();
        assert!((1..=2).contains(&hits), "{hits}");
        // Cookies spread over the sources.
        let mut seen = std::collections::HashSet::new();
        for i in 0..=255u8 {
            seen.insert(hash(&tuple(i, 40_000), 1, 42) as u32 & COOKIE_MASK);
        }
        assert!(seen.len() > 250, "{}", seen.len());
    }

    extern crate std;

    #[test]
    fn incremental_checksums_match_a_full_sum() {
        fn full(words: &[u16]) -> u16 {
            let mut s: u32 = words.iter().map(|w| u32::from(*w)).sum();
            while s >> 16 != 0 {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        }
        let mut w = [0x4500u16, 0x003c, 0x1c46, 0x4000, 0x4006, 0xac10, 0x0a63, 0xac10, 0x0a0c, 0xffff];
        let c = full(&w);
        let (old, new) = (w[4], 0x4006u16 & 0x00ff | u16::from(TTL) << 8);
        w[4] = new;
        assert_eq!(csum_replace(c, old, new), full(&w));
        let old32 = (u32::from(w[8]) << 16) | u32::from(w[9]);
        w[8] = 0x1234;
        w[9] = 0x0000;
        assert_eq!(
            csum_replace32(
                full(&{
                    let mut x = w;
                    x[8] = (old32 >> 16) as u16;
                    x[9] = old32 as u16;
                    x
                }),
                old32,
                0x1234_0000
            ),
            full(&w)
        );
    }
}
