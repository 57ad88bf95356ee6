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
    if let Some(fleet) = fwd.fleet() {
        registry.register_with_unit(
            "keyward_store_round_trip",
            "Time of one call to the shared store, timeouts included",
            Unit::Seconds,
            fleet.store.round_trip_histogram(),
        );
    }
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

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = &self.fwd;
        f.counts.encode(&mut enc)?;
        encode_conns(&mut enc, f.conns())?;
        let now = f.clock.unix_secs() as i64;
        let (spent, window) = f.limiter().spent(now);
        let currency = f.currency();
        let cur = [("currency", currency.as_str())];
        let micros = limit::MICROS as f64;
        for (name, help, v) in [
            ("keyward_budget_spent", "Spent today, in the routes' cost unit.", spent as f64 / micros),
            (
                "keyward_budget_limit",
                "The daily budget, in the routes' cost unit.",
                f.limiter().limits().budget as f64 / micros,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m.encode_family(&cur)?)?;
        }
        encode_store(f, now, &mut enc)?;
        let v = f.limiter().velocity(now);
        {
            let mut m = enc.encode_descriptor(
                "keyward_budget_released",
                "What the pace has released by now (the whole budget without pacing), in the cost unit.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(v.released as f64 / micros).encode(m.encode_family(&cur)?)?;
        }
        ConstGauge::new(v.runs_out.map_or(0.0, |t| t as f64)).encode(enc.encode_descriptor(
            "keyward_budget_runs_out_timestamp",
            "When the budget runs out at today's average spend rate (Unix time; 0 when it lasts the day).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
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

/// The shared store's series: whether it answers, round trips, leases.
fn encode_store(f: &Forwarder, now: i64, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let Some(fleet) = f.fleet() else { return Ok(()) };
    let micros = limit::MICROS as f64;
    let leased = f.limiter().lease(now).map_or(0, |l| l.leased);
    let granted = fleet.fleet_granted.load(std::sync::atomic::Ordering::Relaxed);
    for (name, help, v) in [
        (
            "keyward_store_up",
            "1 when the shared store answered the last call.",
            f64::from(u8::from(fleet.store.is_up())),
        ),
        (
            "keyward_budget_leased",
            "This host's lease of today's budget (spent included), in the cost unit.",
            leased as f64 / micros,
        ),
        (
            "keyward_budget_fleet_granted",
            "The fleet's budget granted today as last seen, in the cost unit.",
            granted as f64 / micros,
        ),
        (
            "keyward_store_live_hosts",
            "Hosts with a recent heartbeat in the shared store, as last counted (they share the per-IP caps during an outage).",
            f64::from(fleet.live_hosts()),
        ),
    ] {
        ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
    }
    prometheus_client::metrics::counter::ConstCounter::new(fleet.store.calls()).encode(enc.encode_descriptor(
        "keyward_store_calls",
        "Calls made to the shared store since start.",
        None,
        MetricType::Counter,
    )?)?;
    let restarts = fleet.restarts.load(std::sync::atomic::Ordering::Relaxed);
    prometheus_client::metrics::counter::ConstCounter::new(restarts).encode(enc.encode_descriptor(
        "keyward_store_restarts",
        "Restarts of the shared store that lost what it held, seen by this host (each rebuilt from the hosts' reports).",
        None,
        MetricType::Counter,
    )?)
}
