//! Connection bounds: how many client connections are open, in all and per
//! client address, the caps a new one must fit under, and why connections
//! were refused or closed (counted for metrics). A [`Slot`] is held for the
//! life of a connection and gives its place back when dropped.
//!
//! The per-address key is the TCP peer (IPv4 /32, IPv6 per `ipv6_prefix`,
//! as the kernel counts sources): a connection is refused before a byte of
//! it is read, so no forwarded-for header is believed here. Trusted proxies
//! carry many clients and are held only to the total. The total is also
//! kept below half the open-file limit left after a reserve, so the other
//! half stays free for upstream connections, the admin socket and metrics.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Descriptors kept out of the forwarder's reach (store, maps, logs, admin).
const FD_RESERVE: u64 = 256;

/// The caps, from `[listen]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub max: u32,
    pub per_ip: u32,
    /// From accept to the first complete request head.
    pub head_timeout: Duration,
}

/// Why a connection was refused or closed early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `max_connections` (or the open-file limit) reached.
    Total,
    /// `max_connections_per_ip` reached for its address.
    PerIp,
    /// No complete request head within `head_timeout`.
    HeadTimeout,
    /// The TLS handshake failed.
    Tls,
}

impl Reason {
    pub const ALL: [Reason; 4] = [Reason::Total, Reason::PerIp, Reason::HeadTimeout, Reason::Tls];

    /// The metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Total => "max-connections",
            Reason::PerIp => "max-connections-per-ip",
            Reason::HeadTimeout => "head-timeout",
            Reason::Tls => "tls-handshake",
        }
    }

    const fn index(self) -> usize {
        match self {
            Reason::Total => 0,
            Reason::PerIp => 1,
            Reason::HeadTimeout => 2,
            Reason::Tls => 3,
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    total: u32,
    per_key: HashMap<IpAddr, u32>,
}

/// The open connections and the refusal counts.
#[derive(Debug)]
pub struct Conns {
    open: Mutex<Open>,
    refused: [AtomicU64; Reason::ALL.len()],
    /// The total allowed by the open-file limit, read once at start.
    fd_room: u32,
}

impl Default for Conns {
    fn default() -> Conns {
        Conns::with_fd_room(fd_room())
    }
}

/// A connection's place; given back on drop.
#[derive(Debug)]
pub struct Slot {
    conns: Arc<Conns>,
    key: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.conns.lock();
        o.total = o.total.saturating_sub(1);
        if let Some(k) = self.key
            && let Some(n) = o.per_key.get_mut(&k)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.per_key.remove(&k);
            }
        }
    }
}

impl Conns {
    /// Bounds with a given descriptor room (tests).
    pub fn with_fd_room(fd_room: u32) -> Conns {
        Conns { open: Mutex::default(), refused: Default::default(), fd_room }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a place for a connection from `key` (`None`: a trusted proxy,
    /// held only to the total), or say which cap refuses it (counted).
    pub fn admit(self: &Arc<Self>, key: Option<IpAddr>, b: &Bounds) -> Result<Slot, Reason> {
        let mut o = self.lock();
        let verdict = if o.total >= b.max.min(self.fd_room) {
            Err(Reason::Total)
        } else if key.is_some_and(|k| o.per_key.get(&k).copied().unwrap_or(0) >= b.per_ip) {
            Err(Reason::PerIp)
        } else {
            Ok(())
        };
        if let Err(r) = verdict {
            drop(o);
            self.count(r);
            return Err(r);
        }
        o.total += 1;
        if let Some(k) = key {
            *o.per_key.entry(k).or_insert(0) += 1;
        }
        Ok(Slot { conns: self.clone(), key })
    }

    /// Count a connection refused or closed for `r`.
    pub fn count(&self, r: Reason) {
        if let Some(c) = self.refused.get(r.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connections refused or closed early, by reason.
    pub fn refused(&self) -> Vec<(Reason, u64)> {
        Reason::ALL.iter().map(|r| (*r, self.refused.get(r.index()).map_or(0, |c| c.load(Ordering::Relaxed)))).collect()
    }

    /// Open connections, and open from `key`.
    pub fn open(&self, key: Option<IpAddr>) -> (u32, u32) {
        let o = self.lock();
        (o.total, key.and_then(|k| o.per_key.get(&k).copied()).unwrap_or(0))
    }

    /// The total the open-file limit allows.
    pub fn fd_room(&self) -> u32 {
        self.fd_room
    }
}

/// Half of the soft open-file limit left after [`FD_RESERVE`] (the other
/// half for upstream connections).
fn fd_room() -> u32 {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    u32::try_from(soft.saturating_sub(FD_RESERVE) / 2).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(max: u32, per_ip: u32) -> Bounds {
        Bounds { max, per_ip, head_timeout: Duration::from_secs(1) }
    }

    #[test]
    fn caps_per_address_and_in_all_and_slots_give_back() {
        let c = Arc::new(Conns::with_fd_room(1000));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<Slot> = (0..3).map(|_| c.admit(Some(a), &b(5, 3)).unwrap()).collect();
        assert_eq!(c.admit(Some(a), &b(5, 3)).unwrap_err(), Reason::PerIp);
        let o1 = c.admit(Some(other), &b(5, 3)).unwrap();
        let proxy = c.admit(None, &b(5, 3)).unwrap();
        assert_eq!(c.admit(Some("192.0.2.3".parse().unwrap()), &b(5, 3)).unwrap_err(), Reason::Total);
        assert_eq!(c.open(Some(a)), (5, 3));
        drop(held);
        drop((o1, proxy));
        assert_eq!(c.open(Some(a)), (0, 0));
        assert!(c.lock().per_key.is_empty(), "empty entries are removed");
        let counted: HashMap<_, _> = c.refused().into_iter().collect();
        assert_eq!((counted[&Reason::PerIp], counted[&Reason::Total]), (1, 1));
    }

    #[test]
    fn the_open_file_limit_caps_the_total() {
        let c = Arc::new(Conns::with_fd_room(2));
        let _h: Vec<Slot> = (0..2).map(|i| c.admit(Some(IpAddr::from([10, 0, 0, i])), &b(100, 100)).unwrap()).collect();
        assert_eq!(c.admit(None, &b(100, 100)).unwrap_err(), Reason::Total);
        assert!(super::fd_room() >= 1);
    }
}
