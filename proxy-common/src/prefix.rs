//! Prefix masking for bucket keys. IPv4 sources are keyed as IPv4-mapped IPv6
//! addresses (`::ffff:a.b.c.d`) so both families share one table layout; the
//! kernel and the forwarder aggregate IPv6 clients with the same function.

use crate::SourceKey;

/// Mask `addr` to its first `prefix` bits (a prefix over 128 keeps all bits).
#[inline(always)]
pub const fn mask_v6(addr: [u8; 16], prefix: u32) -> [u8; 16] {
    let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = addr;
    let hi = u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
    let lo = u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
    let (mh, ml) = if prefix >= 128 {
        (u64::MAX, u64::MAX)
    } else if prefix >= 64 {
        (u64::MAX, high_bits(prefix.wrapping_sub(64)))
    } else {
        (high_bits(prefix), 0)
    };
    let [a0, a1, a2, a3, a4, a5, a6, a7] = (hi & mh).to_be_bytes();
    let [b0, b1, b2, b3, b4, b5, b6, b7] = (lo & ml).to_be_bytes();
    [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7]
}

/// A `u64` with its top `n` bits set, `n` in `0..64`.
#[inline(always)]
const fn high_bits(n: u32) -> u64 {
    if n == 0 {
        0
    } else {
        // n in 1..64: the shift is in range.
        u64::MAX << (64u32.wrapping_sub(n) & 63)
    }
}

/// Mask an IPv4 address (network order) to its first `prefix` bits.
#[inline(always)]
pub const fn mask_v4(addr: [u8; 4], prefix: u32) -> [u8; 4] {
    let a = u32::from_be_bytes(addr);
    let m = if prefix >= 32 {
        u32::MAX
    } else if prefix == 0 {
        0
    } else {
        u32::MAX << (32u32.wrapping_sub(prefix) & 31)
    };
    (a & m).to_be_bytes()
}

/// Bucket key of an IPv4 address masked to `prefix`.
#[inline(always)]
pub const fn key_v4(addr: [u8; 4], prefix: u32) -> SourceKey {
    let [a, b, c, d] = mask_v4(addr, prefix);
    SourceKey { addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] }
}

/// Bucket key of an IPv6 address masked to `prefix`.
#[inline(always)]
pub const fn key_v6(addr: [u8; 16], prefix: u32) -> SourceKey {
    SourceKey { addr: mask_v6(addr, prefix) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_masks() {
        let a = [192, 168, 37, 201];
        assert_eq!(mask_v4(a, 32), a);
        assert_eq!(mask_v4(a, 24), [192, 168, 37, 0]);
        assert_eq!(mask_v4(a, 20), [192, 168, 32, 0]);
        assert_eq!(mask_v4(a, 1), [128, 0, 0, 0]);
        assert_eq!(mask_v4(a, 0), [0, 0, 0, 0]);
        assert_eq!(mask_v4(a, 99), a);
    }

    #[test]
    fn v6_masks() {
        let a = [0x20, 0x01, 0x0d, 0xb8, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4];
        assert_eq!(mask_v6(a, 128), a);
        assert_eq!(mask_v6(a, 200), a);
        let m64 = mask_v6(a, 64);
        assert_eq!(m64, [0x20, 0x01, 0x0d, 0xb8, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0, 0, 0, 0, 0]);
        let m48 = mask_v6(a, 48);
        assert_eq!(m48, [0x20, 0x01, 0x0d, 0xb8, 0x12, 0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let m68 = mask_v6(a, 68);
        assert_eq!(m68, [0x20, 0x01, 0x0d, 0xb8, 0x12, 0x34, 0x56, 0x78, 0x90, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(mask_v6(a, 0), [0; 16]);
        let m1 = mask_v6(a, 1);
        assert_eq!(m1, [0; 16]); // 0x20 has its top bit clear
        let m3 = mask_v6(a, 3);
        assert_eq!(m3, [0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn two_hosts_in_one_64_share_a_key() {
        let mut a = [0u8; 16];
        a[0] = 0x20;
        a[1] = 0x01;
        let mut b = a;
        b[15] = 7;
        assert_eq!(key_v6(a, 64), key_v6(b, 64));
        assert_ne!(key_v6(a, 128), key_v6(b, 128));
        let mut c = a;
        c[7] = 1;
        assert_ne!(key_v6(a, 64), key_v6(c, 64));
    }

    #[test]
    fn v4_key_is_mapped() {
        let k = key_v4([10, 1, 2, 3], 24);
        assert_eq!(k.addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 0]);
    }
}
