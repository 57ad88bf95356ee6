//! Countries: `[access] countries` with a MaxMind-format database the
//! operator supplies (`geo_db`), read with the `maxminddb` crate when the
//! policy is built (so a reload picks up a new file). A call from a country
//! not listed is refused; so is an address the database does not place
//! (fail closed: an unknown origin of calls is not a listed country).

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use serde::Deserialize;

/// Why the country filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("[access] geo_db {path}: {message}")]
    Database { path: String, message: String },
    #[error("[access] countries: `{0}` is not a two-letter ISO 3166-1 code")]
    Code(String),
    #[error("[access] countries needs geo_db (a MaxMind-format .mmdb file)")]
    NoDatabase,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// A listed country.
    Allowed,
    /// Another country (its code), or none known (`None`).
    Refused(Option<String>),
}

#[derive(Deserialize)]
struct Record {
    #[serde(default)]
    country: Option<Code>,
    #[serde(default)]
    registered_country: Option<Code>,
}

#[derive(Deserialize)]
struct Code {
    #[serde(default)]
    iso_code: Option<String>,
}

/// The allowed countries and the database that places addresses.
pub struct Countries {
    allowed: BTreeSet<String>,
    reader: maxminddb::Reader<Vec<u8>>,
    path: String,
}

impl std::fmt::Debug for Countries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Countries({:?} from {})", self.allowed, self.path)
    }
}

impl Countries {
    /// `None` when no countries are listed (no filter).
    pub fn load(countries: &[String], db: Option<&Path>) -> Result<Option<Countries>, GeoError> {
        if countries.is_empty() {
            return Ok(None);
        }
        let mut allowed = BTreeSet::new();
        for c in countries {
            if c.len() != 2 || !c.chars().all(|ch| ch.is_ascii_alphabetic()) {
                return Err(GeoError::Code(c.clone()));
            }
            allowed.insert(c.to_ascii_uppercase());
        }
        let path = db.ok_or(GeoError::NoDatabase)?;
        let shown = path.display().to_string();
        let err = |message: String| GeoError::Database { path: shown.clone(), message };
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| err(e.to_string()))?;
        Ok(Some(Countries { allowed, reader, path: shown }))
    }

    /// Where `ip` is, as far as the filter is concerned.
    pub fn place(&self, ip: IpAddr) -> Placed {
        let code = self
            .reader
            .lookup(ip)
            .ok()
            .and_then(|r| r.decode::<Record>().ok().flatten())
            .and_then(|r| r.country.or(r.registered_country))
            .and_then(|c| c.iso_code)
            .map(|c| c.to_ascii_uppercase());
        match code {
            Some(c) if self.allowed.contains(&c) => Placed::Allowed,
            other => Placed::Refused(other),
        }
    }

    /// The listed countries.
    pub fn allowed(&self) -> impl Iterator<Item = &str> {
        self.allowed.iter().map(String::as_str)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use maxminddb_writer::{Database, metadata::IpVersion, paths::IpAddrWithMask};

    use super::*;

    /// A small country database: each network with its ISO code. IPv4
    /// networks go in the IPv4-compatible subtree (`::a.b.c.d/96+n`).
    pub fn mmdb(networks: &[(&str, &str)]) -> Vec<u8> {
        let mut db = Database::default();
        db.metadata.ip_version = IpVersion::V6;
        db.metadata.database_type = "keyward-test-Country".into();
        db.metadata.binary_format_major_version = 2;
        for (net, code) in networks {
            let (addr, len) = net.split_once('/').unwrap();
            let (addr, len): (IpAddr, u8) = (addr.parse().unwrap(), len.parse().unwrap());
            let (addr, len) = match addr {
                IpAddr::V4(v4) => (IpAddr::V6(v4.to_ipv6_compatible()), len + 96),
                v6 => (v6, len),
            };
            let value = serde_json::json!({ "country": { "iso_code": code } });
            let data = db.insert_value(value).unwrap();
            db.insert_node(IpAddrWithMask::new(addr, len), data);
        }
        db.write_to(Vec::new()).unwrap()
    }

    #[test]
    fn places_addresses_and_fails_closed() {
        let path = std::env::temp_dir().join(format!("kw-geo-{}.mmdb", std::process::id()));
        std::fs::write(&path, mmdb(&[("81.2.69.0/24", "GB"), ("2a02:c7c::/32", "GB"), ("89.160.20.0/24", "SE")]))
            .unwrap();
        let c = Countries::load(&["gb".into()], Some(&path)).unwrap().unwrap();
        assert_eq!(c.place("81.2.69.160".parse().unwrap()), Placed::Allowed);
        assert_eq!(c.place("2a02:c7c:1::1".parse().unwrap()), Placed::Allowed);
        assert_eq!(c.place("89.160.20.1".parse().unwrap()), Placed::Refused(Some("SE".into())));
        assert_eq!(c.place("192.0.2.1".parse().unwrap()), Placed::Refused(None));
        assert!(matches!(Countries::load(&["GBR".into()], Some(&path)), Err(GeoError::Code(_))));
        assert!(matches!(Countries::load(&["GB".into()], None), Err(GeoError::NoDatabase)));
        assert!(Countries::load(&[], None).unwrap().is_none());
        std::fs::write(&path, b"not a database").unwrap();
        assert!(matches!(Countries::load(&["GB".into()], Some(&path)), Err(GeoError::Database { .. })));
        let _ = std::fs::remove_file(&path);
    }
}
