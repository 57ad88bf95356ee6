//! Prometheus text at `admin.metrics` (`GET /metrics`). The daemon's series
//! are read at scrape time from shared handles, never through the daemon's
//! state: XDP counters summed over CPUs from the per-CPU maps (a few small
//! reads, [`MapReader`]), the tracked-source count from the last table sample
//! ([`SourceSample`]: a scrape never walks the table), and list sizes from
//! gauges the daemon keeps current. The forwarder registers its own series
//! (`proxy::metrics`). Label values are the reason names defined once in
//! `proxy-common`.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, gauge::Gauge},
    registry::Registry,
};
use tracing::warn;

use crate::dataplane::{maps::MapReader, sample::SourceSample};

/// Allow and deny entries in force, set by whoever changes the lists.
#[derive(Clone, Debug, Default)]
pub struct ListGauges {
    pub allow: Gauge,
    pub deny: Gauge,
}

/// The XDP series, read from the maps and the table sample on each scrape.
#[derive(Debug)]
struct XdpCollector {
    reader: Arc<MapReader>,
    sample: Arc<SourceSample>,
}

fn counter<'a>(
    enc: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)
}

impl Collector for XdpCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let xdp = self.reader.counters().unwrap_or_else(|e| {
            warn!(error = %e, "reading the XDP counters");
            Vec::new()
        });
        {
            let mut m = counter(
                &mut enc,
                "keyward_xdp_packets",
                "Packets the XDP program decided, by action and reason (summed over CPUs).",
            )?;
            for c in &xdp {
                let l = [("action", c.action.as_str()), ("reason", c.reason.as_str())];
                ConstCounter::new(c.packets).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = counter(&mut enc, "keyward_xdp_bytes", "Bytes the XDP program decided, by action and reason.")?;
            for c in &xdp {
                let l = [("action", c.action.as_str()), ("reason", c.reason.as_str())];
                ConstCounter::new(c.bytes).encode(m.encode_family(&l)?)?;
            }
        }
        ConstCounter::new(self.reader.new_sources().unwrap_or(0)).encode(counter(
            &mut enc,
            "keyward_xdp_new_sources",
            "Per-source buckets created in the kernel (table churn: far above the table size means rotated sources).",
        )?)?;
        ConstGauge::new(self.sample.tracked() as i64).encode(enc.encode_descriptor(
            "keyward_tracked_sources",
            "Entries in the kernel's per-source table.",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// The registry with the daemon's series; the forwarder adds its own.
pub fn registry(reader: Arc<MapReader>, sample: Arc<SourceSample>, lists: &ListGauges) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(XdpCollector { reader, sample }));
    // `register` ends the help with a full stop.
    r.register("keyward_deny_entries", "Deny list entries in force", lists.deny.clone());
    r.register("keyward_allow_entries", "Allow list entries", lists.allow.clone());
    r
}

/// Serve `/metrics` on `addr` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut backoff = crate::accept::Backoff::new("metrics");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        backoff.succeeded();
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                let path = req.uri().path().to_owned();
                // Off the runtime: a scrape reads kernel maps (syscalls).
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
