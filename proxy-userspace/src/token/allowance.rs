//! Per-token call counts: how many route calls each token (by nonce) has
//! used against its `max_calls`, kept until the token expires. Taking a call
//! is one check-and-increment under a lock, so concurrent calls with one
//! token never exceed the allowance; answers that are not billed give their
//! call back. [`Allowance::snapshot`] and [`Allowance::restore`] let the
//! store persist the counts like the day's counters, so a restart does not
//! hand out fresh allowances.

use std::{collections::HashMap, sync::Mutex};

use serde::{Deserialize, Serialize};

use super::{TokenError, codec::Nonce};

/// Above this many tracked tokens, expired ones are purged on insert.
const PURGE_AT: usize = 4096;

/// One token's count, as persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowanceEntry {
    pub nonce: Nonce,
    /// Calls taken.
    pub used: u32,
    /// Unix seconds after which the token (and so the entry) is gone.
    pub expires_unix: u64,
}

impl AllowanceEntry {
    /// The entry as one key and one `u64` (`expiry << 32 | used`), for a
    /// key-value table like the store's day table (`tok/<nonce>`).
    pub fn to_kv(&self) -> (String, u64) {
        let exp = u64::from(u32::try_from(self.expires_unix).unwrap_or(u32::MAX));
        (self.nonce.to_string(), exp << 32 | u64::from(self.used))
    }

    /// The inverse of [`AllowanceEntry::to_kv`]; `None` for a bad key.
    pub fn from_kv(key: &str, value: u64) -> Option<AllowanceEntry> {
        Some(AllowanceEntry {
            nonce: key.parse().ok()?,
            used: u32::try_from(value & u64::from(u32::MAX)).unwrap_or(u32::MAX),
            expires_unix: value >> 32,
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Count {
    used: u32,
    expires_unix: u64,
}

/// The counts of live tokens.
#[derive(Debug, Default)]
pub struct Allowance {
    counts: Mutex<HashMap<Nonce, Count>>,
    /// Changed since the last [`Allowance::take_dirty`].
    dirty: std::sync::atomic::AtomicBool,
}

impl Allowance {
    pub fn new() -> Allowance {
        Allowance::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Nonce, Count>> {
        // A panic elsewhere while holding the lock leaves counts that are
        // still consistent (each update is one assignment).
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take one call of the token `nonce` (allowance `max_calls`, expiring
    /// at `expires_unix`); the calls left after this one, or
    /// [`TokenError::Exhausted`].
    pub fn take(&self, nonce: Nonce, max_calls: u32, expires_unix: u64, now_unix: u64) -> Result<u32, TokenError> {
        let mut m = self.lock();
        if m.len() >= PURGE_AT && !m.contains_key(&nonce) {
            m.retain(|_, c| c.expires_unix >= now_unix);
        }
        let c = m.entry(nonce).or_insert(Count { used: 0, expires_unix });
        if c.used >= max_calls {
            return Err(TokenError::Exhausted);
        }
        c.used += 1;
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(max_calls - c.used)
    }

    /// Give back one call taken for `nonce` (an answer that was not billed).
    pub fn refund(&self, nonce: Nonce) {
        if let Some(c) = self.lock().get_mut(&nonce) {
            c.used = c.used.saturating_sub(1);
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The live counts when they changed since the last call (persistence).
    pub fn take_dirty(&self, now_unix: u64) -> Option<Vec<AllowanceEntry>> {
        self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed).then(|| self.snapshot(now_unix))
    }

    /// Calls taken so far by `nonce`.
    pub fn used(&self, nonce: Nonce) -> u32 {
        self.lock().get(&nonce).map_or(0, |c| c.used)
    }

    /// Tokens tracked (live, or expired and not yet purged).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget tokens expired before `now_unix`; how many were dropped.
    pub fn purge(&self, now_unix: u64) -> usize {
        let mut m = self.lock();
        let before = m.len();
        m.retain(|_, c| c.expires_unix >= now_unix);
        before - m.len()
    }

    /// The live counts, in nonce order, for persisting.
    pub fn snapshot(&self, now_unix: u64) -> Vec<AllowanceEntry> {
        let mut v: Vec<AllowanceEntry> = self
            .lock()
            .iter()
            .filter(|(_, c)| c.expires_unix >= now_unix)
            .map(|(n, c)| AllowanceEntry { nonce: *n, used: c.used, expires_unix: c.expires_unix })
            .collect();
        v.sort_by_key(|e| e.nonce);
        v
    }

    /// Merge persisted counts (after a restart): expired entries are
    /// skipped, and a token keeps the larger of the two counts.
    pub fn restore(&self, entries: impl IntoIterator<Item = AllowanceEntry>, now_unix: u64) {
        let mut m = self.lock();
        for e in entries.into_iter().filter(|e| e.expires_unix >= now_unix) {
            let c = m.entry(e.nonce).or_insert(Count { used: 0, expires_unix: e.expires_unix });
            c.used = c.used.max(e.used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhausts_refunds_and_expires() {
        let a = Allowance::new();
        let n = Nonce([1; 12]);
        assert_eq!(a.take(n, 3, 100, 10), Ok(2));
        assert_eq!(a.take(n, 3, 100, 10), Ok(1));
        assert_eq!(a.take(n, 3, 100, 10), Ok(0));
        assert_eq!(a.take(n, 3, 100, 10), Err(TokenError::Exhausted));
        a.refund(n);
        assert_eq!(a.take(n, 3, 100, 10), Ok(0));
        assert_eq!(a.take(Nonce([2; 12]), 3, 100, 10), Ok(2), "counts are per token");
        assert_eq!(a.purge(100), 0);
        assert_eq!(a.purge(101), 2);
        assert!(a.is_empty());
    }

    #[test]
    fn concurrent_takes_never_exceed_the_allowance() {
        let a = std::sync::Arc::new(Allowance::new());
        let n = Nonce([3; 12]);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || (0..50).filter(|_| a.take(n, 100, 100, 0).is_ok()).count())
            })
            .collect();
        let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(ok, 100);
        assert_eq!(a.used(n), 100);
    }

    #[test]
    fn snapshot_restore_round_trip() {
        let a = Allowance::new();
        let (n1, n2, old) = (Nonce([1; 12]), Nonce([2; 12]), Nonce([9; 12]));
        for _ in 0..5 {
            a.take(n1, 20, 700, 100).unwrap();
        }
        a.take(n2, 20, 800, 100).unwrap();
        a.take(old, 20, 150, 100).unwrap();
        let snap = a.snapshot(200);
        assert_eq!(snap.len(), 2, "expired tokens are not persisted");
        let json = serde_json::to_string(&snap).unwrap();
        let back: Vec<AllowanceEntry> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let kv: Vec<_> = snap.iter().map(AllowanceEntry::to_kv).collect();
        let fresh = Allowance::new();
        fresh.take(n1, 20, 700, 100).unwrap();
        fresh.restore(kv.iter().filter_map(|(k, v)| AllowanceEntry::from_kv(k, *v)), 200);
        assert_eq!(fresh.used(n1), 5);
        assert_eq!(fresh.used(n2), 1);
        assert_eq!(fresh.take(n1, 6, 700, 200), Ok(0));
        assert_eq!(fresh.take(n1, 6, 700, 200), Err(TokenError::Exhausted));
        assert!(AllowanceEntry::from_kv("not a nonce", 1).is_none());
    }
}
