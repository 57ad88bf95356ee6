//! Request counting: per route and outcome, per route and upstream status
//! code, and (in dry run) the refusals that would have happened. Counting
//! borrows the route's name and bumps an atomic, so a request neither
//! allocates nor takes a lock's write side here unless its route is counted
//! for the first time.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

use super::respond::Outcome;

/// The label of requests that matched no route.
pub const NO_ROUTE: &str = "-";

/// Status codes the `http` crate accepts: 100..=999.
const CODES: usize = 900;

/// One route's counters, bumped with a relaxed atomic add.
#[derive(Debug)]
struct PerRoute {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// Upstream answers by status code (index: code − 100).
    codes: Box<[AtomicU64]>,
}

impl PerRoute {
    fn new() -> PerRoute {
        PerRoute {
            outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
            codes: (0..CODES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn codes(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.codes.iter().enumerate().filter_map(|(i, n)| {
            let n = n.load(Relaxed);
            (n > 0).then(|| (u16::try_from(i + 100).unwrap_or(u16::MAX), n))
        })
    }
}

/// The forwarder's request counters: a route's counters are found under a
/// read lock (written only the first time a route is counted) and bumped
/// without one, so a request neither allocates nor waits here.
#[derive(Debug, Default)]
pub struct Counts {
    routes: RwLock<HashMap<Box<str>, Arc<PerRoute>>>,
    would_refuse: Mutex<HashMap<(String, Outcome), u64>>,
}

/// Requests by (route, outcome) and upstream answers by (route, code).
pub type Snapshot = (HashMap<(String, Outcome), u64>, HashMap<(String, u16), u64>);

/// The index of `o` in [`Outcome::ALL`] (the enum's declaration order).
const fn index(o: Outcome) -> usize {
    o as usize
}

impl Counts {
    /// The counters of `route`, created on its first request.
    fn route(&self, route: &str) -> Arc<PerRoute> {
        if let Some(r) = self.routes.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(route) {
            return r.clone();
        }
        let mut w = self.routes.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.entry(route.into()).or_insert_with(|| Arc::new(PerRoute::new())).clone()
    }

    fn with_route(&self, route: &str, f: impl FnOnce(&PerRoute)) {
        if let Some(r) = self.routes.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(route) {
            return f(r);
        }
        f(&self.route(route));
    }

    /// One request on `route` (`None`: no route matched) ended as `o`.
    pub fn request(&self, route: Option<&str>, o: Outcome) {
        self.with_route(route.unwrap_or(NO_ROUTE), |r| {
            r.outcomes[index(o)].fetch_add(1, Relaxed);
        });
    }

    /// The upstream answered a call on `route` with `code`.
    pub fn upstream(&self, route: &str, code: u16) {
        let i = usize::from(code).saturating_sub(100).min(CODES - 1);
        self.with_route(route, |r| {
            r.codes[i].fetch_add(1, Relaxed);
        });
    }

    /// In dry run: `route` would have been refused as `o`.
    pub fn would_refuse(&self, route: &str, o: Outcome) {
        let mut w = self.would_refuse.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *w.entry((route.to_owned(), o)).or_insert(0) += 1;
    }

    /// Every non-zero count.
    pub fn snapshot(&self) -> Snapshot {
        let routes = self.routes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut requests = HashMap::new();
        let mut upstream = HashMap::new();
        for (name, r) in routes.iter() {
            for (o, n) in Outcome::ALL.iter().zip(&r.outcomes) {
                let n = n.load(Relaxed);
                if n > 0 {
                    requests.insert((name.to_string(), *o), n);
                }
            }
            for (code, n) in r.codes() {
                upstream.insert((name.to_string(), code), n);
            }
        }
        (requests, upstream)
    }

    /// Encode the three counter families straight from the counters (a few
    /// entries per route: nothing is copied).
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes = self.routes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut m = enc.encode_descriptor(
            "keyward_requests",
            "Requests answered, by route and outcome (forwarded, cache_hit, or the refusal's type suffix).",
            None,
            MetricType::Counter,
        )?;
        for (route, r) in routes.iter() {
            for (o, n) in Outcome::ALL.iter().zip(&r.outcomes) {
                let n = n.load(Relaxed);
                if n > 0 {
                    ConstCounter::new(n).encode(m.encode_family(&[("route", &**route), ("outcome", o.name())])?)?;
                }
            }
        }
        let would = self.would_refuse.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !would.is_empty() {
            let mut m = enc.encode_descriptor(
                "keyward_dry_run_would_refuse",
                "With limits.dry_run: requests that would have been refused, by route and outcome.",
                None,
                MetricType::Counter,
            )?;
            for ((route, o), n) in would.iter() {
                ConstCounter::new(*n).encode(m.encode_family(&[("route", route.as_str()), ("outcome", o.name())])?)?;
            }
        }
        drop(would);
        let mut m = enc.encode_descriptor(
            "keyward_upstream_responses",
            "Upstream answers, by route and status code.",
            None,
            MetricType::Counter,
        )?;
        let mut code = itoa::Buffer::new();
        for (route, r) in routes.iter() {
            for (c, n) in r.codes() {
                ConstCounter::new(n).encode(m.encode_family(&[("route", &**route), ("code", code.format(c))])?)?;
            }
        }
        Ok(())
    }

    /// Dry run's would-be refusals.
    pub fn would_refuse_snapshot(&self) -> HashMap<(String, Outcome), u64> {
        self.would_refuse.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_route_and_outcome() {
        let c = Counts::default();
        c.request(Some("GET /a"), Outcome::Forwarded);
        c.request(Some("GET /a"), Outcome::Forwarded);
        c.request(None, Outcome::NoRoute);
        c.upstream("GET /a", 200);
        let (req, up) = c.snapshot();
        assert_eq!(req[&("GET /a".to_owned(), Outcome::Forwarded)], 2);
        assert_eq!(req[&(NO_ROUTE.to_owned(), Outcome::NoRoute)], 1);
        assert_eq!(req.len(), 2);
        assert_eq!(up[&("GET /a".to_owned(), 200)], 1);
    }

    #[test]
    fn every_outcome_has_its_own_counter() {
        // `index` relies on ALL listing the outcomes in declaration order.
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(index(*o), i, "{o:?}");
        }
        let c = Counts::default();
        for o in Outcome::ALL {
            c.request(Some("r"), o);
        }
        let (req, _) = c.snapshot();
        assert!(Outcome::ALL.iter().all(|o| req[&("r".to_owned(), *o)] == 1));
    }
}
