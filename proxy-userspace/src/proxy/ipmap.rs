//! A map keyed by client address that stores IPv4 keys as `u32` and IPv6
//! keys as `u128`, instead of the 17-byte `IpAddr` padded to its value's
//! alignment: the limiter keeps one entry per client seen today, so the key
//! is most of its memory (issue 11: the forwarder's heap per client).

use std::{
    collections::{HashMap, hash_map},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// A map from client address to `V`, with the part of `HashMap`'s API the
/// limiter and its persistence use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpMap<V> {
    v4: HashMap<u32, V>,
    v6: HashMap<u128, V>,
}

impl<V> Default for IpMap<V> {
    fn default() -> Self {
        IpMap { v4: HashMap::new(), v6: HashMap::new() }
    }
}

/// A vacant or occupied place for one address.
pub enum Entry<'a, V> {
    V4(hash_map::Entry<'a, u32, V>),
    V6(hash_map::Entry<'a, u128, V>),
}

impl<'a, V> Entry<'a, V> {
    /// The value, inserting `v` first when there is none.
    pub fn or_insert(self, v: V) -> &'a mut V {
        match self {
            Entry::V4(e) => e.or_insert(v),
            Entry::V6(e) => e.or_insert(v),
        }
    }
}

impl<V> IpMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&a.to_bits()),
            IpAddr::V6(a) => self.v6.get(&a.to_bits()),
        }
    }

    pub fn get_mut(&mut self, ip: &IpAddr) -> Option<&mut V> {
        match ip {
            IpAddr::V4(a) => self.v4.get_mut(&a.to_bits()),
            IpAddr::V6(a) => self.v6.get_mut(&a.to_bits()),
        }
    }

    pub fn insert(&mut self, ip: IpAddr, v: V) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(a.to_bits(), v),
            IpAddr::V6(a) => self.v6.insert(a.to_bits(), v),
        }
    }

    pub fn remove(&mut self, ip: &IpAddr) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.remove(&a.to_bits()),
            IpAddr::V6(a) => self.v6.remove(&a.to_bits()),
        }
    }

    pub fn entry(&mut self, ip: IpAddr) -> Entry<'_, V> {
        match ip {
            IpAddr::V4(a) => Entry::V4(self.v4.entry(a.to_bits())),
            IpAddr::V6(a) => Entry::V6(self.v6.entry(a.to_bits())),
        }
    }

    pub fn contains_key(&self, ip: &IpAddr) -> bool {
        self.get(ip).is_some()
    }

    /// Keep only the entries `f` accepts.
    pub fn retain(&mut self, mut f: impl FnMut(IpAddr, &mut V) -> bool) {
        self.v4.retain(|k, v| f(IpAddr::V4(Ipv4Addr::from_bits(*k)), v));
        self.v6.retain(|k, v| f(IpAddr::V6(Ipv6Addr::from_bits(*k)), v));
    }

    /// Every (address, value), IPv4 first, in no particular order otherwise.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &V)> + '_ {
        let v4 = self.v4.iter().map(|(k, v)| (IpAddr::V4(Ipv4Addr::from_bits(*k)), v));
        v4.chain(self.v6.iter().map(|(k, v)| (IpAddr::V6(Ipv6Addr::from_bits(*k)), v)))
    }
}

impl<'a, V> IntoIterator for &'a IpMap<V> {
    type Item = (IpAddr, &'a V);
    type IntoIter = Box<dyn Iterator<Item = (IpAddr, &'a V)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl<V> std::ops::Index<&IpAddr> for IpMap<V> {
    type Output = V;

    fn index(&self, ip: &IpAddr) -> &V {
        self.get(ip).expect("no entry for this address")
    }
}

impl<V> FromIterator<(IpAddr, V)> for IpMap<V> {
    fn from_iter<I: IntoIterator<Item = (IpAddr, V)>>(it: I) -> Self {
        let mut m = IpMap::new();
        for (k, v) in it {
            m.insert(k, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_round_trip() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::".parse().unwrap();
        // The IPv4-mapped IPv6 form of `a` is a different client key.
        let c: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let mut m = IpMap::new();
        *m.entry(a).or_insert(0) += 1;
        *m.entry(a).or_insert(0) += 1;
        m.insert(b, 5);
        m.insert(c, 9);
        assert_eq!((m[&a], m[&b], m[&c], m.len()), (2, 5, 9, 3));
        let mut seen: Vec<(IpAddr, u32)> = m.iter().map(|(k, v)| (k, *v)).collect();
        seen.sort();
        assert_eq!(seen, vec![(a, 2), (c, 9), (b, 5)]);
        m.retain(|k, _| k != b);
        assert_eq!(m.remove(&a), Some(2));
        assert_eq!((m.get(&b), m.len()), (None, 1));
    }
}
