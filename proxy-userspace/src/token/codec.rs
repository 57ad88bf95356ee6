//! The token format, `kw1.<kid>.<payload>.<tag>` (base64url without padding),
//! and its MAC. The 31-byte payload holds, big-endian: issued-at and expiry
//! (u32 Unix seconds), a 96-bit random nonce (the allowance key), the call
//! allowance (u32), the level (0 plain, 1 proof-of-work), the first 4 bytes
//! of SHA-256(origin) and a 2-byte keyed hint of the client network (both
//! only to tell "wrong origin" and "wrong network" apart from tampering in
//! refusals and metrics). The tag is HMAC-SHA-256 under the key's token
//! subkey over `kw1` ‖ kid ‖ payload ‖ origin ‖ client network, truncated to
//! 128 bits and compared in constant time. The origin and network are
//! recomputed from the request at verification, so the token carries no
//! address.

use std::{fmt, net::IpAddr, sync::Arc};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::Mac as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::{TokenError, keys::KeyRing};

/// The version tag every token starts with.
pub const VERSION: &str = "kw1";
const PAYLOAD_LEN: usize = 31;
const TAG_LEN: usize = 16;
/// Clock skew tolerated between hosts that share a key file, in seconds: a
/// token issued further in the future is refused.
pub const MAX_SKEW_SECS: u64 = 60;

/// A token's random identifier, the key of its call allowance.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nonce(pub [u8; 12]);

impl Nonce {
    /// A fresh random nonce.
    pub fn random() -> Nonce {
        let mut n = [0u8; 12];
        rand::fill(&mut n);
        Nonce(n)
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({self})")
    }
}

impl std::str::FromStr for Nonce {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Nonce, TokenError> {
        let v = URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed("nonce is not base64url"))?;
        v.try_into().map(Nonce).map_err(|_| TokenError::Malformed("nonce is not 12 bytes"))
    }
}

impl serde::Serialize for Nonce {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Nonce {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Nonce, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the token was earned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Minted on request.
    Plain,
    /// Minted against a solved proof-of-work challenge.
    Pow,
}

impl Level {
    fn byte(self) -> u8 {
        match self {
            Level::Plain => 0,
            Level::Pow => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Level> {
        match b {
            0 => Some(Level::Plain),
            1 => Some(Level::Pow),
            _ => None,
        }
    }
}

/// What a token says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Unix seconds when it was minted.
    pub issued_at: u64,
    /// Unix seconds after which it is refused.
    pub expires_at: u64,
    pub nonce: Nonce,
    pub max_calls: u32,
    pub level: Level,
}

/// The prefix lengths that bind a token to the client's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind {
    pub v4: u8,
    pub v6: u8,
}

impl Default for Bind {
    fn default() -> Self {
        Bind { v4: 24, v6: 64 }
    }
}

impl Bind {
    /// The client's network as bytes: family, prefix length, masked address.
    /// IPv4-mapped IPv6 addresses count as IPv4.
    pub fn network(&self, client: IpAddr) -> Vec<u8> {
        match client.to_canonical() {
            IpAddr::V4(a) => {
                let p = self.v4.min(32);
                let mut v = vec![4, p];
                v.extend(proxy_common::prefix::mask_v4(a.octets(), u32::from(p)));
                v
            }
            IpAddr::V6(a) => {
                let p = self.v6.min(128);
                let mut v = vec![6, p];
                v.extend(proxy_common::prefix::mask_v6(a.octets(), u32::from(p)));
                v
            }
        }
    }
}

/// Seals and opens tokens with a key ring.
#[derive(Clone, Debug)]
pub struct Codec {
    keys: Arc<KeyRing>,
    bind: Bind,
}

fn origin_hash(origin: &str) -> [u8; 4] {
    let d = Sha256::digest(origin.as_bytes());
    [d[0], d[1], d[2], d[3]]
}

impl Codec {
    pub fn new(keys: Arc<KeyRing>, bind: Bind) -> Codec {
        Codec { keys, bind }
    }

    /// The binding in force.
    pub fn bind(&self) -> Bind {
        self.bind
    }

    /// The token for `claims`, bound to `origin` and `client`'s network,
    /// signed with the signing key.
    pub fn seal(&self, claims: &Claims, origin: &str, client: IpAddr) -> String {
        let key = self.keys.signing();
        let net = self.bind.network(client);
        let payload = self.payload(claims, origin, key, &net);
        let tag = tag(key, &payload, origin, &net);
        format!("{VERSION}.{}.{}.{}", key.kid(), URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(tag))
    }

    fn payload(&self, c: &Claims, origin: &str, key: &super::keys::Key, net: &[u8]) -> [u8; PAYLOAD_LEN] {
        let secs = |t: u64| u32::try_from(t).unwrap_or(u32::MAX).to_be_bytes();
        let mut p = [0u8; PAYLOAD_LEN];
        p[0..4].copy_from_slice(&secs(c.issued_at));
        p[4..8].copy_from_slice(&secs(c.expires_at));
        p[8..20].copy_from_slice(&c.nonce.0);
        p[20..24].copy_from_slice(&c.max_calls.to_be_bytes());
        p[24] = c.level.byte();
        p[25..29].copy_from_slice(&origin_hash(origin));
        p[29..31].copy_from_slice(&net_hint(key, net));
        p
    }

    /// The claims of `token` when it is well-formed, signed by a listed key
    /// and bound to `origin` and `client`'s network. Time is not checked here.
    pub fn open(&self, token: &str, origin: &str, client: IpAddr) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(v), Some(kid), Some(p), Some(t), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("not four dot-separated parts"));
        };
        if v != VERSION {
            return Err(TokenError::Malformed("unknown version"));
        }
        let key = self.keys.get(kid).ok_or(TokenError::UnknownKey)?;
        let payload: [u8; PAYLOAD_LEN] = decode(p)?;
        let got: [u8; TAG_LEN] = decode(t)?;
        let net = self.bind.network(client);
        let want = tag(key, &payload, origin, &net);
        if !bool::from(want.ct_eq(&got)) {
            return Err(if payload[25..29] != origin_hash(origin) {
                TokenError::WrongOrigin
            } else if payload[29..31] != net_hint(key, &net) {
                TokenError::WrongNetwork
            } else {
                TokenError::BadMac
            });
        }
        claims(&payload)
    }
}

fn decode<const N: usize>(s: &str) -> Result<[u8; N], TokenError> {
    let v = URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed("not base64url"))?;
    v.try_into().map_err(|_| TokenError::Malformed("wrong length"))
}

fn claims(p: &[u8; PAYLOAD_LEN]) -> Result<Claims, TokenError> {
    let u32_at = |i: usize| u64::from(u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]));
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&p[8..20]);
    Ok(Claims {
        issued_at: u32_at(0),
        expires_at: u32_at(4),
        nonce: Nonce(nonce),
        max_calls: u32::try_from(u32_at(20)).unwrap_or(0),
        level: Level::from_byte(p[24]).ok_or(TokenError::Malformed("unknown level"))?,
    })
}

fn net_hint(key: &super::keys::Key, net: &[u8]) -> [u8; 2] {
    let mut m = key.token_mac();
    m.update(b"net hint");
    m.update(net);
    let d = m.finalize().into_bytes();
    [d[0], d[1]]
}

fn tag(key: &super::keys::Key, payload: &[u8], origin: &str, net: &[u8]) -> [u8; TAG_LEN] {
    let mut m = key.token_mac();
    m.update(VERSION.as_bytes());
    m.update(&[u8::try_from(key.kid().len()).unwrap_or(u8::MAX)]);
    m.update(key.kid().as_bytes());
    m.update(payload);
    m.update(&u32::try_from(origin.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.update(origin.as_bytes());
    m.update(net);
    let d = m.finalize().into_bytes();
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&d[..TAG_LEN]);
    t
}
