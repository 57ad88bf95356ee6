//! Prometheus text at `admin.metrics` (`GET /metrics`). Every series is
//! read at scrape time from where it lives: XDP counters summed over CPUs
//! from the per-CPU map, table sizes from the maps and the store, requests
//! and spend from the forwarder. Label values are the reason and outcome
//! names defined once in `proxy-common` and `proxy::respond`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tracing::warn;

use crate::daemon::State;

/// Reads the daemon's state on each scrape.
#[derive(Debug)]
pub struct Scrape {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
}

fn counter<'a>(
    enc: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let snap = s.metrics_snapshot();
        {
            let mut m = counter(
                &mut enc,
                "keyward_xdp_packets",
                "Packets the XDP program decided, by action and reason (summed over CPUs).",
            )?;
            for c in &snap.xdp {
                let l = [("action", c.action.as_str()), ("reason", c.reason.as_str())];
                ConstCounter::new(c.packets).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = counter(&mut enc, "keyward_xdp_bytes", "Bytes the XDP program decided, by action and reason.")?;
            for c in &snap.xdp {
                let l = [("action", c.action.as_str()), ("reason", c.reason.as_str())];
                ConstCounter::new(c.bytes).encode(m.encode_family(&l)?)?;
            }
        }
        ConstCounter::new(snap.new_sources).encode(counter(
            &mut enc,
            "keyward_xdp_new_sources",
            "Per-source buckets created in the kernel (table churn: far above the table size means rotated sources).",
        )?)?;
        for (name, help, v) in [
            ("keyward_tracked_sources", "Entries in the kernel's per-source table.", snap.tracked_sources),
            ("keyward_deny_entries", "Deny list entries in force.", snap.deny_entries),
            ("keyward_allow_entries", "Allow list entries.", snap.allow_entries),
        ] {
            ConstGauge::new(v as i64).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        let Some(f) = snap.forwarder else { return Ok(()) };
        {
            let mut m = counter(
                &mut enc,
                "keyward_requests",
                "Requests answered, by route and outcome (forwarded, cache_hit, or the refusal's type suffix).",
            )?;
            for ((route, outcome), n) in &f.requests {
                let l = [("route", route.as_str()), ("outcome", outcome.as_str())];
                ConstCounter::new(*n).encode(m.encode_family(&l)?)?;
            }
        }
        if !f.would_refuse.is_empty() {
            let mut m = counter(
                &mut enc,
                "keyward_dry_run_would_refuse",
                "With limits.dry_run: requests that would have been refused, by route and outcome.",
            )?;
            for ((route, outcome), n) in &f.would_refuse {
                let l = [("route", route.as_str()), ("outcome", outcome.as_str())];
                ConstCounter::new(*n).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = counter(&mut enc, "keyward_upstream_responses", "Upstream answers, by route and status code.")?;
            for ((route, code), n) in &f.upstream {
                let code = code.to_string();
                let l = [("route", route.as_str()), ("code", code.as_str())];
                ConstCounter::new(*n).encode(m.encode_family(&l)?)?;
            }
        }
        f.upstream_seconds.encode(enc.encode_descriptor(
            "keyward_upstream",
            "Time from sending the upstream request to having its whole answer.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        let cur = [("currency", f.currency.as_str())];
        for (name, help, v) in [
            ("keyward_budget_spent", "Spent today, in the routes' cost unit.", f.spent),
            ("keyward_budget_limit", "The daily budget, in the routes' cost unit.", f.limit),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m.encode_family(&cur)?)?;
        }
        ConstGauge::new(f.reset as f64).encode(enc.encode_descriptor(
            "keyward_budget_reset_timestamp",
            "When today's counters reset (Unix time).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// What one scrape reports.
pub struct Snapshot {
    pub xdp: Vec<crate::dataplane::maps::ReasonCount>,
    pub new_sources: u64,
    pub tracked_sources: u64,
    pub deny_entries: u64,
    pub allow_entries: u64,
    pub forwarder: Option<ForwarderSnapshot>,
}

/// The forwarder's part of a scrape.
pub struct ForwarderSnapshot {
    pub requests: Vec<((String, String), u64)>,
    pub would_refuse: Vec<((String, String), u64)>,
    pub upstream: Vec<((String, u16), u64)>,
    pub upstream_seconds: prometheus_client::metrics::histogram::Histogram,
    pub currency: String,
    pub spent: f64,
    pub limit: f64,
    pub reset: i64,
}

/// The registry with the scrape collector.
pub fn registry(state: Arc<Mutex<State>>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Scrape { state }));
    r
}

/// Serve `/metrics` on `addr` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                let path = req.uri().path().to_owned();
                // Off the runtime: a scrape walks the kernel's source table.
                async move {
                    let r = tokio::task::spawn_blocking(move || answer(&path, &registry))
                        .await
                        .unwrap_or_else(|_| answer("/error", &Registry::default()));
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(path: &str, registry: &Registry) -> Response<Full<Bytes>> {
    let mut body = String::new();
    let (status, ctype) = if path == "/metrics" {
        match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8"),
            Err(e) => {
                warn!(error = %e, "encoding metrics");
                (StatusCode::INTERNAL_SERVER_ERROR, "text/plain")
            }
        }
    } else {
        body.push_str("keyward metrics are at /metrics\n");
        (StatusCode::NOT_FOUND, "text/plain")
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Bind the metrics listener (an error names the address).
pub async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    let a: SocketAddr = addr.parse().with_context(|| format!("admin.metrics `{addr}` is not an address:port"))?;
    tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding admin.metrics {a}"))
}
