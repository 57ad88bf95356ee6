//! Answers that cost nothing the second time: successful upstream answers
//! kept for the route's `cache_ttl`, keyed on the upstream request a call
//! maps to (method, path and kept query; never the key), bounded in bytes
//! with least-recently-used eviction. Time comes from the caller.

use std::sync::Mutex;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use lru::LruCache;

/// A stored answer.
#[derive(Clone, Debug)]
pub struct Cached {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    expires_ns: u64,
}

/// The cache.
pub struct Cache {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

struct Inner {
    lru: LruCache<String, Cached>,
    bytes: usize,
    hits: u64,
    misses: u64,
}

fn size(key: &str, c: &Cached) -> usize {
    key.len() + c.body.len() + c.headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum::<usize>() + 64
}

impl Cache {
    /// A cache holding at most `max_bytes` of answers.
    pub fn new(max_bytes: usize) -> Cache {
        Cache { inner: Mutex::new(Inner { lru: LruCache::unbounded(), bytes: 0, hits: 0, misses: 0 }), max_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh answer for `key`, if any.
    pub fn get(&self, key: &str, now_ns: u64) -> Option<Cached> {
        let mut g = self.lock();
        let hit = match g.lru.get(key) {
            Some(c) if c.expires_ns > now_ns => Some(c.clone()),
            Some(_) => {
                if let Some(old) = g.lru.pop(key) {
                    g.bytes = g.bytes.saturating_sub(size(key, &old));
                }
                None
            }
            None => None,
        };
        if hit.is_some() {
            g.hits += 1;
        } else {
            g.misses += 1;
        }
        hit
    }

    /// Keep an answer for `ttl_ns`.
    pub fn put(&self, key: String, status: StatusCode, headers: HeaderMap, body: Bytes, now_ns: u64, ttl_ns: u64) {
        let c = Cached { status, headers, body, expires_ns: now_ns.saturating_add(ttl_ns) };
        let sz = size(&key, &c);
        if sz > self.max_bytes {
            return;
        }
        let mut g = self.lock();
        if let Some(old) = g.lru.put(key.clone(), c) {
            g.bytes = g.bytes.saturating_sub(size(&key, &old));
        }
        g.bytes += sz;
        while g.bytes > self.max_bytes {
            let Some((k, v)) = g.lru.pop_lru() else { break };
            g.bytes = g.bytes.saturating_sub(size(&k, &v));
        }
    }

    /// (hits, misses, entries, bytes).
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        let g = self.lock();
        (g.hits, g.misses, g.lru.len(), g.bytes)
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (h, m, n, b) = self.stats();
        write!(f, "Cache {{ hits: {h}, misses: {m}, entries: {n}, bytes: {b} }}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_evicts() {
        let c = Cache::new(1000);
        c.put("a".into(), StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"x"), 0, 10);
        assert!(c.get("a", 5).is_some());
        assert!(c.get("a", 10).is_none());
        assert!(c.get("a", 5).is_none(), "expired entries are dropped");
        for i in 0..100 {
            c.put(format!("k{i}"), StatusCode::OK, HeaderMap::new(), Bytes::from(vec![0u8; 100]), 0, 100);
        }
        let (_, _, n, bytes) = c.stats();
        assert!(bytes <= 1000 && n < 10, "{n} entries, {bytes} bytes");
        assert!(c.get("k99", 1).is_some(), "the newest survives");
        assert!(c.get("k0", 1).is_none(), "the oldest was evicted");
        // Too big to keep at all.
        c.put("big".into(), StatusCode::OK, HeaderMap::new(), Bytes::from(vec![0u8; 2000]), 0, 100);
        assert!(c.get("big", 1).is_none());
    }
}
