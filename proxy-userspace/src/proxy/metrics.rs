//! The forwarder's Prometheus series: requests by route and outcome, dry
//! run's would-be refusals, upstream answers by code and how long they took,
//! today's budget, and client connections open and refused by reason.
//! [`register`] puts them into the daemon's registry; they are read from the
//! forwarder at scrape time. Outcome labels are the names defined once in
//! `proxy::respond`, connection reasons in `proxy::conns`.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::{Forwarder, limit};

/// Add the forwarder's series to `registry`.
pub fn register(fwd: &Arc<Forwarder>, registry: &mut Registry) {
    // The histogram is the forwarder's own (shared, not copied); `register`
    // ends the help with a full stop.
    registry.register_with_unit(
        "keyward_upstream",
        "Time from sending the upstream request to having its whole answer",
        Unit::Seconds,
        fwd.upstream_histogram(),
    );
    registry.register_collector(Box::new(Scrape { fwd: fwd.clone() }));
}

/// Reads the forwarder's counts on each scrape.
struct Scrape {
    fwd: Arc<Forwarder>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("forwarder metrics")
    }
}

type ByRoute<K> = std::collections::HashMap<(String, K), u64>;

fn counter_family<K>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    rows: &ByRoute<K>,
    value: impl Fn(&K) -> String,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for ((route, k), n) in rows {
        let v = value(k);
        let l = [("route", route.as_str()), (label, v.as_str())];
        ConstCounter::new(*n).encode(m.encode_family(&l)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = &self.fwd;
        let (requests, upstream) = f.counts();
        counter_family(
            &mut enc,
            "keyward_requests",
            "Requests answered, by route and outcome (forwarded, cache_hit, or the refusal's type suffix).",
            "outcome",
            &requests,
            |o| o.name().to_owned(),
        )?;
        let would = f.would_refuse();
        if !would.is_empty() {
            counter_family(
                &mut enc,
                "keyward_dry_run_would_refuse",
                "With limits.dry_run: requests that would have been refused, by route and outcome.",
                "outcome",
                &would,
                |o| o.name().to_owned(),
            )?;
        }
        counter_family(
            &mut enc,
            "keyward_upstream_responses",
            "Upstream answers, by route and status code.",
            "code",
            &upstream,
            u16::to_string,
        )?;
        encode_conns(&mut enc, f.conns())?;
        let (counts, window) = f.limiter().today(f.clock.unix_secs() as i64);
        let currency = f.currency();
        let cur = [("currency", currency.as_str())];
        let micros = limit::MICROS as f64;
        for (name, help, v) in [
            ("keyward_budget_spent", "Spent today, in the routes' cost unit.", counts.spent as f64 / micros),
            (
                "keyward_budget_limit",
                "The daily budget, in the routes' cost unit.",
                f.limiter().limits().budget as f64 / micros,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m.encode_family(&cur)?)?;
        }
        ConstGauge::new(window.end as f64).encode(enc.encode_descriptor(
            "keyward_budget_reset_timestamp",
            "When today's counters reset (Unix time).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// Open client connections, and those refused or closed early by reason.
fn encode_conns(enc: &mut DescriptorEncoder, c: &super::conns::Conns) -> Result<(), std::fmt::Error> {
    ConstGauge::new(i64::from(c.open(None).0)).encode(enc.encode_descriptor(
        "keyward_connections_open",
        "Client connections open on the forwarder.",
        None,
        MetricType::Gauge,
    )?)?;
    let mut m = enc.encode_descriptor(
        "keyward_connections_refused",
        "Client connections refused (max-connections, max-connections-per-ip) or closed before a request \
         (head-timeout, tls-handshake).",
        None,
        MetricType::Counter,
    )?;
    for (r, n) in c.refused() {
        ConstCounter::new(n).encode(m.encode_family(&[("reason", r.name())])?)?;
    }
    Ok(())
}
