//! Request counting: per route and outcome, per route and upstream status
//! code, and (in dry run) the refusals that would have happened. Counting
//! borrows the route's name, so a request allocates nothing here unless its
//! route is counted for the first time.

use std::{collections::HashMap, sync::Mutex};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

use super::respond::Outcome;

/// The label of requests that matched no route.
pub const NO_ROUTE: &str = "-";

#[derive(Debug, Default)]
struct Inner {
    requests: HashMap<String, [u64; Outcome::ALL.len()]>,
    upstream: HashMap<(String, u16), u64>,
    would_refuse: HashMap<(String, Outcome), u64>,
}

/// The forwarder's request counters.
#[derive(Debug, Default)]
pub struct Counts {
    inner: Mutex<Inner>,
}

/// Requests by (route, outcome) and upstream answers by (route, code).
pub type Snapshot = (HashMap<(String, Outcome), u64>, HashMap<(String, u16), u64>);

impl Counts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One request on `route` (`None`: no route matched) ended as `o`.
    pub fn request(&self, route: Option<&str>, o: Outcome) {
        let route = route.unwrap_or(NO_ROUTE);
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        let mut c = self.lock();
        match c.requests.get_mut(route) {
            Some(per) => per[i] += 1,
            None => {
                let mut per = [0u64; Outcome::ALL.len()];
                per[i] = 1;
                c.requests.insert(route.to_owned(), per);
            }
        }
    }

    /// The upstream answered a call on `route` with `code`.
    pub fn upstream(&self, route: &str, code: u16) {
        *self.lock().upstream.entry((route.to_owned(), code)).or_insert(0) += 1;
    }

    /// In dry run: `route` would have been refused as `o`.
    pub fn would_refuse(&self, route: &str, o: Outcome) {
        *self.lock().would_refuse.entry((route.to_owned(), o)).or_insert(0) += 1;
    }

    /// Every non-zero count.
    pub fn snapshot(&self) -> Snapshot {
        let c = self.lock();
        let requests = c
            .requests
            .iter()
            .flat_map(|(r, per)| {
                Outcome::ALL.iter().zip(per).filter(|(_, n)| **n > 0).map(move |(o, n)| ((r.clone(), *o), *n))
            })
            .collect();
        (requests, c.upstream.clone())
    }

    /// Encode the three counter families straight from the counts, under
    /// their lock (a few entries per route: nothing is copied).
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.lock();
        let mut m = enc.encode_descriptor(
            "keyward_requests",
            "Requests answered, by route and outcome (forwarded, cache_hit, or the refusal's type suffix).",
            None,
            MetricType::Counter,
        )?;
        for (route, per) in &c.requests {
            for (o, n) in Outcome::ALL.iter().zip(per).filter(|(_, n)| **n > 0) {
                ConstCounter::new(*n).encode(m.encode_family(&[("route", route.as_str()), ("outcome", o.name())])?)?;
            }
        }
        if !c.would_refuse.is_empty() {
            let mut m = enc.encode_descriptor(
                "keyward_dry_run_would_refuse",
                "With limits.dry_run: requests that would have been refused, by route and outcome.",
                None,
                MetricType::Counter,
            )?;
            for ((route, o), n) in &c.would_refuse {
                ConstCounter::new(*n).encode(m.encode_family(&[("route", route.as_str()), ("outcome", o.name())])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "keyward_upstream_responses",
            "Upstream answers, by route and status code.",
            None,
            MetricType::Counter,
        )?;
        let mut code = itoa::Buffer::new();
        for ((route, c), n) in &c.upstream {
            ConstCounter::new(*n).encode(m.encode_family(&[("route", route.as_str()), ("code", code.format(*c))])?)?;
        }
        Ok(())
    }

    /// Dry run's would-be refusals.
    pub fn would_refuse_snapshot(&self) -> HashMap<(String, Outcome), u64> {
        self.lock().would_refuse.clone()
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
}
