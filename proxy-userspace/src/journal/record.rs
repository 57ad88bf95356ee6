//! The journal's record values on disk: a fixed-size binary layout, encoded
//! on the caller's stack (no allocation per call), and the JSON records
//! written before it, still read at start (a journal left by a crash of the
//! previous version is replayed like any other).
//!
//! A binary value starts with its format version ([`VERSION`]); a JSON one
//! starts with `{`, which no version number takes. Layout of version 1
//! (integers little-endian, absent parts zeroed):
//!
//! | bytes | what |
//! |---|---|
//! | 0 | version (1) |
//! | 1 | flags: 1 the address is IPv6, 2 a network is counted, 4 it is IPv6, 8 a page token call |
//! | 2..10 | day |
//! | 10..18 | cost |
//! | 18..34 | address (IPv4 in the first 4 bytes) |
//! | 34..50 | network address (idem) |
//! | 50 | network prefix length |
//! | 51..63 | token nonce |
//! | 63..71 | token expiry (Unix seconds) |
//! | 71..79 | refunds only: the reservation given back |

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Refund, Reserved, TokenCall};
use crate::{token::codec::Nonce, units::Cidr};

/// The binary format's version, the value's first byte.
pub(super) const VERSION: u8 = 1;
/// A reservation's value.
const RESERVED_LEN: usize = 71;
/// A refund's value: the reservation's, then the one it gives back.
const REFUNDED_LEN: usize = RESERVED_LEN + 8;

const IP_V6: u8 = 1;
const NETWORK: u8 = 2;
const NETWORK_V6: u8 = 4;
const TOKEN: u8 = 8;

/// An encoded value, held inline (empty for a settlement).
#[derive(Clone, Copy)]
pub(super) struct Value {
    len: u8,
    buf: [u8; REFUNDED_LEN],
}

impl Value {
    pub(super) const EMPTY: Value = Value { len: 0, buf: [0; REFUNDED_LEN] };

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

fn put_ip(out: &mut [u8], ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            false
        }
        IpAddr::V6(v6) => {
            out[..16].copy_from_slice(&v6.octets());
            true
        }
    }
}

fn get_ip(b: &[u8], v6: bool) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    if v6 { IpAddr::V6(Ipv6Addr::from(a)) } else { IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])) }
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// `r` in the binary layout; `of`, for a refund, the reservation it gives back.
pub(super) fn encode(r: &Reserved, of: Option<u64>) -> Value {
    let mut v = Value::EMPTY;
    let b = &mut v.buf;
    b[0] = VERSION;
    let mut flags = 0;
    b[2..10].copy_from_slice(&r.day.to_le_bytes());
    b[10..18].copy_from_slice(&r.cost.to_le_bytes());
    if put_ip(&mut b[18..34], r.ip) {
        flags |= IP_V6;
    }
    if let Some(n) = r.network {
        flags |= NETWORK;
        if put_ip(&mut b[34..50], n.addr()) {
            flags |= NETWORK_V6;
        }
        b[50] = n.prefix();
    }
    if let Some(t) = r.token {
        flags |= TOKEN;
        b[51..63].copy_from_slice(&t.nonce.0);
        b[63..71].copy_from_slice(&t.expires_unix.to_le_bytes());
    }
    b[1] = flags;
    v.len = RESERVED_LEN as u8;
    if let Some(of) = of {
        b[71..79].copy_from_slice(&of.to_le_bytes());
        v.len = REFUNDED_LEN as u8;
    }
    v
}

/// A reservation's value, binary or JSON.
pub(super) fn reserved(value: &[u8]) -> Result<Reserved, String> {
    match value.first() {
        Some(b'{') => serde_json::from_slice(value).map_err(|e| e.to_string()),
        _ => decode(value, RESERVED_LEN),
    }
}

/// A refund's value, binary or JSON.
pub(super) fn refund(value: &[u8]) -> Result<Refund, String> {
    match value.first() {
        Some(b'{') => serde_json::from_slice(value).map_err(|e| e.to_string()),
        _ => Ok(Refund { what: decode(value, REFUNDED_LEN)?, of: get_u64(value, RESERVED_LEN) }),
    }
}

/// The reservation in a binary value of `len` bytes.
fn decode(b: &[u8], len: usize) -> Result<Reserved, String> {
    match b.first() {
        Some(&VERSION) if b.len() == len => {}
        Some(&VERSION) => return Err(format!("{} bytes where version {VERSION} has {len}", b.len())),
        Some(v) => return Err(format!("unknown record version {v}")),
        None => return Err("empty record".into()),
    }
    let flags = b[1];
    if flags & !(IP_V6 | NETWORK | NETWORK_V6 | TOKEN) != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let network = if flags & NETWORK == 0 {
        None
    } else {
        let addr = get_ip(&b[34..50], flags & NETWORK_V6 != 0);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if b[50] > max {
            return Err(format!("network prefix /{} is too long", b[50]));
        }
        Some(Cidr::covering(addr, b[50]))
    };
    let token = (flags & TOKEN != 0).then(|| {
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&b[51..63]);
        TokenCall { nonce: Nonce(nonce), expires_unix: get_u64(b, 63) }
    });
    Ok(Reserved {
        day: get_u64(b, 2),
        ip: get_ip(&b[18..34], flags & IP_V6 != 0),
        network,
        cost: get_u64(b, 10),
        token,
    })
}
