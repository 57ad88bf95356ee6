//! The human units the config and the CLI accept: durations (`500ms`, `5s`,
//! `2m`, `1h`, `1d`), sizes (`16KiB`, `1MiB`, or a plain byte count) and
//! CIDRs (`10.0.0.0/8`, `2001:db8::/32`, or a bare address meaning /32 or
//! /128). Each parses into a value that serializes back to the same text.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// A parse failure, with the reason written for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(pub String);

/// A duration written with a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| UnitError(format!("duration `{s}` needs a unit: ms, s, m, h or d")))?;
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| UnitError(format!("duration `{s}` must start with a whole number")))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => {
                return Err(UnitError(format!("duration `{s}` has unknown unit `{unit}` (use ms, s, m, h or d)")));
            }
        }
        .ok_or_else(|| UnitError(format!("duration `{s}` is too long")))?;
        Ok(Span(Duration::from_millis(ms)))
    }
}

impl TryFrom<String> for Span {
    type Error = UnitError;
    fn try_from(s: String) -> Result<Self, UnitError> {
        s.parse()
    }
}

impl From<Span> for String {
    fn from(s: Span) -> String {
        s.to_string()
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
            if ms != 0 && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// A byte size written with an IEC unit, or a plain count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "String")]
pub struct Size(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for Size {
    type Error = UnitError;
    fn try_from(r: SizeRepr) -> Result<Self, UnitError> {
        match r {
            SizeRepr::Bytes(n) => Ok(Size(n)),
            SizeRepr::Text(s) => s.parse(),
        }
    }
}

impl FromStr for Size {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| UnitError(format!("size `{s}` must start with a whole number")))?;
        let mul: u64 = match unit {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => {
                return Err(UnitError(format!("size `{s}` has unknown unit `{unit}` (use B, KiB, MiB or GiB)")));
            }
        };
        n.checked_mul(mul).map(Size).ok_or_else(|| UnitError(format!("size `{s}` is too large")))
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        s.to_string()
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 != 0 && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// An IPv4 or IPv6 network. Host bits must be zero, so that what is listed is
/// exactly what matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network of `prefix` bits that holds `ip` (the prefix is clamped
    /// to the address family's width).
    pub fn covering(ip: IpAddr, prefix: u8) -> Cidr {
        match ip {
            IpAddr::V4(v4) => {
                let prefix = prefix.min(32);
                let a = Ipv4Addr::from(proxy_common::prefix::mask_v4(v4.octets(), u32::from(prefix)));
                Cidr { addr: IpAddr::V4(a), prefix }
            }
            IpAddr::V6(v6) => {
                let prefix = prefix.min(128);
                let a = Ipv6Addr::from(proxy_common::prefix::mask_v6(v6.octets(), u32::from(prefix)));
                Cidr { addr: IpAddr::V6(a), prefix }
            }
        }
    }

    /// Whether the two networks share any address (one holds the other).
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                proxy_common::prefix::mask_v4(a.octets(), u32::from(self.prefix)) == n.octets()
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                proxy_common::prefix::mask_v6(a.octets(), u32::from(self.prefix)) == n.octets()
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let t = s.trim();
        let (a, p) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| UnitError(format!("`{s}` is not an IPv4 or IPv6 address or CIDR")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| UnitError(format!("`{s}`: prefix length must be 0 to {max}")))?,
        };
        let masked = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(proxy_common::prefix::mask_v4(v4.octets(), u32::from(prefix)))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(proxy_common::prefix::mask_v6(v6.octets(), u32::from(prefix)))),
        };
        if masked != addr {
            return Err(UnitError(format!("`{s}` has host bits set; did you mean {masked}/{prefix}?")));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = UnitError;
    fn try_from(s: String) -> Result<Self, UnitError> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("500ms".parse::<Span>().unwrap().0, Duration::from_millis(500));
        assert_eq!("5s".parse::<Span>().unwrap().0, Duration::from_secs(5));
        assert_eq!("1h".parse::<Span>().unwrap().0, Duration::from_secs(3600));
        assert_eq!("2d".parse::<Span>().unwrap().0, Duration::from_secs(172_800));
        for bad in ["5", "s", "5 weeks", "-1s", "1.5s", ""] {
            assert!(bad.parse::<Span>().is_err(), "{bad}");
        }
        for good in ["500ms", "5s", "2m", "1h", "3d"] {
            assert_eq!(good.parse::<Span>().unwrap().to_string(), good);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!("16KiB".parse::<Size>().unwrap().0, 16 * 1024);
        assert_eq!("1MiB".parse::<Size>().unwrap().0, 1 << 20);
        assert_eq!("100".parse::<Size>().unwrap().0, 100);
        assert!("16KB".parse::<Size>().is_err());
        assert!("lots".parse::<Size>().is_err());
        assert_eq!(Size(16 * 1024).to_string(), "16KiB");
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(c.prefix(), 16);
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().to_string(), "192.0.2.7/32");
        assert_eq!("2001:db8::/32".parse::<Cidr>().unwrap().to_string(), "2001:db8::/32");
        assert_eq!("2001:db8::1".parse::<Cidr>().unwrap().prefix(), 128);
        let e = "10.1.2.3/16".parse::<Cidr>().unwrap_err();
        assert!(e.0.contains("did you mean 10.1.0.0/16"), "{e}");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
        assert!("2001:db8::/129".parse::<Cidr>().is_err());
    }
}
