//! The optional access log: one line per answered request, off by default
//! (`[log] access = true`). A line names the method, the route, the path
//! without its query (only the query's parameter *names*, never their
//! values), the status, keyward's outcome, the client and the time taken.
//! Nothing in it can hold the key: the key exists only on the upstream
//! request, which is never logged.
//!
//! Under attack the log must not become the attack: at most
//! `[log] access_per_second` lines are written per second; the rest are
//! counted and one line at the start of the next written second says how
//! many were left out (the same rule as the sampled refusal lines, with a
//! higher ceiling).

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use tracing::info;

/// Target of the access lines, so that a log filter can select them
/// (`RUST_LOG=keyward::access=off`).
pub const TARGET: &str = "keyward::access";

/// The per-second sampler: which lines are written, how many were not.
#[derive(Debug, Default)]
pub struct Sampler {
    /// `second << 32 | lines written in that second`.
    window: AtomicU64,
    /// Lines left out since the last report.
    suppressed: AtomicU64,
}

/// The sampler's verdict for one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; `left_out` lines were suppressed before it and not yet reported.
    Write { left_out: u64 },
    /// Leave it out (counted).
    Skip,
}

impl Sampler {
    /// Decide for one line at `now` (unix seconds) under a ceiling of `per_second`.
    pub fn admit(&self, now: u64, per_second: u32) -> Verdict {
        let now = now & 0xffff_ffff;
        let mut cur = self.window.load(Ordering::Relaxed);
        loop {
            let (sec, n) = (cur >> 32, cur & 0xffff_ffff);
            let next = if sec == now {
                if n >= u64::from(per_second) {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return Verdict::Skip;
                }
                cur + 1
            } else {
                now << 32 | 1
            };
            match self.window.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Verdict::Write { left_out: self.suppressed.swap(0, Ordering::Relaxed) },
                Err(seen) => cur = seen,
            }
        }
    }
}

/// What is known of a request before the phases consume it.
#[derive(Debug)]
pub struct Start {
    method: http::Method,
    path: String,
    query_names: String,
    started_ns: u64,
}

impl Start {
    /// Record the request line (path without the query; parameter names only).
    pub fn of(method: &http::Method, uri: &http::Uri, started_ns: u64) -> Start {
        Start {
            method: method.clone(),
            path: uri.path().to_owned(),
            query_names: uri.query().map(query_names).unwrap_or_default(),
            started_ns,
        }
    }

    /// Write the line (the sampler has said yes).
    pub fn write(&self, route: &str, status: u16, outcome: &str, client: IpAddr, now_ns: u64, left_out: u64) {
        let micros = now_ns.saturating_sub(self.started_ns) / 1_000;
        if left_out > 0 {
            info!(target: TARGET, left_out, "access lines left out in the last busy second(s) (sampled)");
        }
        info!(
            target: TARGET,
            method = %self.method,
            path = %self.path,
            query = %self.query_names,
            route,
            status,
            outcome,
            %client,
            micros,
            "access"
        );
    }
}

/// `a=1&b=&c` → `a,b,c`: the names only, each cut to 64 bytes, at most 16.
fn query_names(q: &str) -> String {
    let mut out = String::new();
    for name in q.split('&').filter(|p| !p.is_empty()).take(16).map(|p| p.split('=').next().unwrap_or("")) {
        if !out.is_empty() {
            out.push(',');
        }
        let cut = name.char_indices().nth(64).map_or(name.len(), |(i, _)| i);
        out.extend(name[..cut].chars().filter(|c| c.is_ascii_graphic()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_ceiling_per_second_and_the_rest_reported() {
        let s = Sampler::default();
        let written = (0..10).filter(|_| s.admit(100, 3) != Verdict::Skip).count();
        assert_eq!(written, 3);
        assert_eq!(s.admit(101, 3), Verdict::Write { left_out: 7 });
        assert_eq!(s.admit(101, 3), Verdict::Write { left_out: 0 });
    }

    #[test]
    fn concurrent_writers_share_one_ceiling() {
        let s = std::sync::Arc::new(Sampler::default());
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || (0..1000).filter(|_| s.admit(7, 50) != Verdict::Skip).count())
            })
            .collect();
        let total: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 50);
    }

    #[test]
    fn only_parameter_names_leave_the_query() {
        assert_eq!(query_names("postcode=SW1A%201AA&key=secret&&flag"), "postcode,key,flag");
        assert_eq!(query_names(""), "");
        let long = format!("{}=v", "n".repeat(100));
        assert_eq!(query_names(&long).len(), 64);
    }
}
