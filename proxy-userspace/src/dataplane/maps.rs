//! Typed access to the XDP maps: the runtime config and guarded ports
//! (rewritten in place on reload, never by reloading the program), the allow
//! and deny tries, and the counters and buckets that status, top and metrics
//! read. Per-CPU counters are summed here, at read time. [`MapReader`] holds
//! its own handles on the read-only maps, so readers never need the
//! [`Dataplane`] (nor whatever lock guards it).

use std::{
    borrow::Borrow,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd as _,
};

use aya::maps::{
    Array, Map, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use proxy_common::{Action, AllowValue, Counter, DenyValue, Reason, SourceKey, maps as names, stat_index, table::Slot};

use super::{Dataplane, DataplaneError};
use crate::{config::Xdp as XdpConfig, store::List, units::Cidr};

/// One (action, reason) counter summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReasonCount {
    pub action: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

/// One source in the per-source table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceStat {
    /// The source (IPv4 address, or IPv6 prefix per `ipv6_prefix`).
    pub source: String,
    pub packets: u64,
    pub drops: u64,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

impl Dataplane {
    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.ebpf_mut().map_mut(name).ok_or(DataplaneError::Missing(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DataplaneError> {
        self.ebpf().map(name).ok_or(DataplaneError::Missing(name))
    }

    /// Write rates, prefixes, flags and guarded ports. Safe while attached:
    /// the program reads `CONFIG` per packet.
    pub fn apply(&mut self, xdp: &XdpConfig) -> Result<(), DataplaneError> {
        self.config = xdp.kernel_config();
        self.write_config()?;
        let wanted: Vec<u16> = xdp.ports.iter().map(|p| p.get()).collect();
        let old = std::mem::take(&mut self.ports);
        let mut ports: Array<&mut MapData, u8> =
            Array::try_from(self.map_mut(names::PORTS)?).map_err(map_err(names::PORTS))?;
        for p in &wanted {
            ports.set(u32::from(*p), 1, 0).map_err(map_err(names::PORTS))?;
        }
        for p in old.iter().filter(|p| !wanted.contains(p)) {
            ports.set(u32::from(*p), 0, 0).map_err(map_err(names::PORTS))?;
        }
        self.ports = wanted;
        Ok(())
    }

    /// Write `CONFIG`: the configured knobs plus whether each list is empty.
    fn write_config(&mut self) -> Result<(), DataplaneError> {
        let mut cfg = self.config;
        cfg.table_mask = self.table_mask;
        cfg.seed = self.seed;
        cfg.flags &= !(proxy_common::FLAG_HAS_ALLOW | proxy_common::FLAG_HAS_DENY);
        if !self.lists[0].is_empty() {
            cfg.flags |= proxy_common::FLAG_HAS_ALLOW;
        }
        if !self.lists[1].is_empty() {
            cfg.flags |= proxy_common::FLAG_HAS_DENY;
        }
        let mut config: Array<&mut MapData, proxy_common::XdpConfig> =
            Array::try_from(self.map_mut(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        config.set(0, cfg, 0).map_err(map_err(names::CONFIG))
    }

    /// Put `cidr` into the allow or deny trie. `expires_ns` (monotonic, 0 =
    /// never) applies to deny entries.
    pub fn list_insert(&mut self, list: List, cidr: &Cidr, expires_ns: u64) -> Result<(), DataplaneError> {
        let plen = u32::from(cidr.prefix());
        let r = match (list, cidr.addr()) {
            (List::Allow, IpAddr::V4(a)) => trie::<[u8; 4], AllowValue>(self, names::ALLOW_V4)?
                .insert(&Key::new(plen, a.octets()), AllowValue { flags: 0 }, 0)
                .map_err(map_err(names::ALLOW_V4)),
            (List::Allow, IpAddr::V6(a)) => trie::<[u8; 16], AllowValue>(self, names::ALLOW_V6)?
                .insert(&Key::new(plen, a.octets()), AllowValue { flags: 0 }, 0)
                .map_err(map_err(names::ALLOW_V6)),
            (List::Deny, IpAddr::V4(a)) => trie::<[u8; 4], DenyValue>(self, names::DENY_V4)?
                .insert(&Key::new(plen, a.octets()), DenyValue { expires_ns }, 0)
                .map_err(map_err(names::DENY_V4)),
            (List::Deny, IpAddr::V6(a)) => trie::<[u8; 16], DenyValue>(self, names::DENY_V6)?
                .insert(&Key::new(plen, a.octets()), DenyValue { expires_ns }, 0)
                .map_err(map_err(names::DENY_V6)),
        };
        r?;
        if self.lists[list_index(list)].insert(*cidr) {
            self.write_config()?;
        }
        Ok(())
    }

    /// Remove `cidr` from a trie; absent entries are not an error.
    pub fn list_remove(&mut self, list: List, cidr: &Cidr) -> Result<(), DataplaneError> {
        let plen = u32::from(cidr.prefix());
        let r = match (list, cidr.addr()) {
            (List::Allow, IpAddr::V4(a)) => {
                trie::<[u8; 4], AllowValue>(self, names::ALLOW_V4)?.remove(&Key::new(plen, a.octets()))
            }
            (List::Allow, IpAddr::V6(a)) => {
                trie::<[u8; 16], AllowValue>(self, names::ALLOW_V6)?.remove(&Key::new(plen, a.octets()))
            }
            (List::Deny, IpAddr::V4(a)) => {
                trie::<[u8; 4], DenyValue>(self, names::DENY_V4)?.remove(&Key::new(plen, a.octets()))
            }
            (List::Deny, IpAddr::V6(a)) => {
                trie::<[u8; 16], DenyValue>(self, names::DENY_V6)?.remove(&Key::new(plen, a.octets()))
            }
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                return Err(DataplaneError::Map { map: "list", source: e });
            }
        }
        if self.lists[list_index(list)].remove(cidr) {
            self.write_config()?;
        }
        Ok(())
    }

    /// `CONFIG` as the program reads it: the configured knobs with the
    /// table mask, the hash seed of this load and the list flags.
    pub fn kernel_config(&self) -> Result<proxy_common::XdpConfig, DataplaneError> {
        let config: Array<&MapData, proxy_common::XdpConfig> =
            Array::try_from(self.map(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        config.get(&0, 0).map_err(map_err(names::CONFIG))
    }

    /// Every possible (action, reason) counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<ReasonCount>, DataplaneError> {
        counters(&PerCpuArray::try_from(self.map(names::STATS)?).map_err(map_err(names::STATS))?)
    }

    /// Per-source buckets created since load.
    pub fn new_sources(&self) -> Result<u64, DataplaneError> {
        new_sources(&PerCpuArray::try_from(self.map(names::NEW_SOURCES)?).map_err(map_err(names::NEW_SOURCES))?)
    }

    /// The per-source table: entry count and the `n` heaviest by packets.
    /// Walks the whole table.
    pub fn sources(&self, n: usize) -> Result<(u64, Vec<SourceStat>), DataplaneError> {
        sources(&Array::try_from(self.map(names::SOURCES)?).map_err(map_err(names::SOURCES))?, n)
    }

    /// Handles of its own on the counter and source maps (duplicated file
    /// descriptors of the same kernel maps).
    pub fn reader(&self) -> Result<MapReader, DataplaneError> {
        let stats = own(self.map(names::STATS)?, names::STATS)?;
        let new = own(self.map(names::NEW_SOURCES)?, names::NEW_SOURCES)?;
        let table = own(self.map(names::SOURCES)?, names::SOURCES)?;
        Ok(MapReader {
            stats: PerCpuArray::try_from(stats).map_err(map_err(names::STATS))?,
            new_sources: PerCpuArray::try_from(new).map_err(map_err(names::NEW_SOURCES))?,
            sources: Array::try_from(table).map_err(map_err(names::SOURCES))?,
        })
    }
}

/// Read-only handles on `STATS`, `NEW_SOURCES` and `SOURCES`, usable from
/// any thread (`Arc<MapReader>`) while the daemon changes the lists and the
/// config through its [`Dataplane`].
pub struct MapReader {
    stats: PerCpuArray<MapData, Counter>,
    new_sources: PerCpuArray<MapData, u64>,
    sources: Array<MapData, Slot>,
}

impl std::fmt::Debug for MapReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapReader")
    }
}

impl MapReader {
    /// As [`Dataplane::counters`]: a few small per-CPU reads.
    pub fn counters(&self) -> Result<Vec<ReasonCount>, DataplaneError> {
        counters(&self.stats)
    }

    /// As [`Dataplane::new_sources`].
    pub fn new_sources(&self) -> Result<u64, DataplaneError> {
        new_sources(&self.new_sources)
    }

    /// As [`Dataplane::sources`]: a walk of the whole table, one lookup per
    /// entry (seconds for a million entries). Never call it under a lock
    /// other work waits on.
    pub fn sources(&self, n: usize) -> Result<(u64, Vec<SourceStat>), DataplaneError> {
        sources(&self.sources, n)
    }
}

/// A map of our own on the same kernel map as `map`.
fn own(map: &Map, name: &'static str) -> Result<Map, DataplaneError> {
    let data = match map {
        Map::PerCpuArray(d) | Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) => d,
        _ => return Err(DataplaneError::Missing(name)),
    };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| DataplaneError::Map { map: name, source: e.into() })?;
    Map::from_map_data(MapData::from_fd(fd).map_err(map_err(name))?).map_err(map_err(name))
}

/// Every possible (action, reason) counter, summed over CPUs, in a fixed
/// order: each reason's own action, and its pass (dry run's would-drops
/// and would-transmits). Other pairs cannot happen and are left out.
fn counters<T: Borrow<MapData>>(stats: &PerCpuArray<T, Counter>) -> Result<Vec<ReasonCount>, DataplaneError> {
    let mut out = Vec::new();
    for reason in Reason::ALL {
        for action in Action::ALL {
            if action != Action::Pass && action != reason.verdict() {
                continue;
            }
            let per_cpu = stats.get(&stat_index(action, reason), 0).map_err(map_err(names::STATS))?;
            let sum = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets.saturating_add(c.packets),
                bytes: acc.bytes.saturating_add(c.bytes),
            });
            out.push(ReasonCount {
                action: action.name().into(),
                reason: reason.name().into(),
                packets: sum.packets,
                bytes: sum.bytes,
            });
        }
    }
    Ok(out)
}

fn new_sources<T: Borrow<MapData>>(m: &PerCpuArray<T, u64>) -> Result<u64, DataplaneError> {
    let v = m.get(&0, 0).map_err(map_err(names::NEW_SOURCES))?;
    Ok(v.iter().fold(0u64, |a, b| a.saturating_add(*b)))
}

fn sources<T: Borrow<MapData>>(m: &Array<T, Slot>, n: usize) -> Result<(u64, Vec<SourceStat>), DataplaneError> {
    let mut all = Vec::new();
    for row in m.iter() {
        // A slot that cannot be read mid-walk is simply skipped.
        let Ok(s) = row else { continue };
        if s.used() {
            all.push((s.key, s.bucket));
        }
    }
    let count = all.len() as u64;
    all.sort_by(|a, b| b.1.packets.cmp(&a.1.packets).then(b.1.drops.cmp(&a.1.drops)));
    let top = all
        .into_iter()
        .take(n)
        .map(|(k, b)| SourceStat { source: source_name(&k), packets: u64::from(b.packets), drops: u64::from(b.drops) })
        .collect();
    Ok((count, top))
}

fn list_index(l: List) -> usize {
    match l {
        List::Allow => 0,
        List::Deny => 1,
    }
}

fn trie<'a, K: aya::Pod, V: aya::Pod>(
    dp: &'a mut Dataplane,
    name: &'static str,
) -> Result<LpmTrie<&'a mut MapData, K, V>, DataplaneError> {
    LpmTrie::try_from(dp.map_mut(name)?).map_err(map_err(name))
}

/// IPv4-mapped keys print as IPv4; IPv6 keys print as the (masked) address.
fn source_name(k: &SourceKey) -> String {
    let v6 = Ipv6Addr::from(k.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names() {
        let k = proxy_common::prefix::key_v4([192, 0, 2, 1], 32);
        assert_eq!(source_name(&k), "192.0.2.1");
        let a: Ipv6Addr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let k = proxy_common::prefix::key_v6(a.octets(), 64);
        assert_eq!(source_name(&k), "2001:db8:1:2::");
    }
}
