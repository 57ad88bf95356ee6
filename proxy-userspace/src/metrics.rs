//! Prometheus text at `admin.metrics` (`GET /metrics`). The daemon's series
//! are read at scrape time from shared handles, never through the daemon's
//! state: XDP counters summed over CPUs from the per-CPU maps (a few small
//! reads, [`MapReader`]), the tracked-source count from the last table sample
//! ([`SourceSample`]: a scrape never walks the table), and list sizes from
//! gauges the daemon keeps current. The forwarder registers its own series
//! (`proxy::metrics`). Label values are the reason names defined once in
//! `proxy-common`. The same listener answers `/healthz` (the process is up)
//! and `/readyz` ([`Readiness`]: XDP attached, listeners serving, store
//! writable), and carries the build and the reloads ([`register_daemon`]).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
        info::Info,
    },
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

/// What `/readyz` checks, kept current by the daemon.
#[derive(Debug)]
pub struct Readiness {
    pub xdp_attached: AtomicBool,
    pub listening: AtomicBool,
    /// The last write to the store succeeded.
    pub store_ok: AtomicBool,
    /// The shared store (when configured) answered the last read of the
    /// lists' stream (at least once a second).
    pub shared_store_ok: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            xdp_attached: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            store_ok: AtomicBool::new(true),
            shared_store_ok: AtomicBool::new(true),
        }
    }
}

impl Readiness {
    /// What is not ready, in words; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        [
            (&self.xdp_attached, "XDP is not attached"),
            (&self.listening, "listeners are not serving"),
            (&self.store_ok, "the store cannot be written"),
            (&self.shared_store_ok, "the shared store does not answer"),
        ]
        .into_iter()
        .filter(|(f, _)| !f.load(Ordering::Relaxed))
        .map(|(_, m)| m)
        .collect()
    }
}

/// Config reloads by result (`ok`, `refused`), and when one last succeeded.
#[derive(Clone, Debug, Default)]
pub struct Reloads {
    pub total: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub last_success: Gauge,
}

impl Reloads {
    /// Count one reload at Unix second `now`.
    pub fn record(&self, ok: bool, now: u64) {
        self.total.get_or_create(&vec![("result", if ok { "ok" } else { "refused" })]).inc();
        if ok {
            self.last_success.set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }
}

/// The commit this binary was built from (`unknown` outside a git checkout).
pub const COMMIT: &str = env!("KEYWARD_COMMIT");

/// [`Readiness`] as gauges (`keyward_xdp_attached`, `keyward_store_writable`),
/// for alerting rules.
#[derive(Debug)]
struct ReadyCollector(Arc<Readiness>);

impl Collector for ReadyCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.0;
        for (name, help, flag) in [
            ("keyward_xdp_attached", "1 while the XDP program is attached to the interface.", &r.xdp_attached),
            ("keyward_store_writable", "1 while the last write to the store succeeded.", &r.store_ok),
        ] {
            let v = i64::from(flag.load(Ordering::Relaxed));
            ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

/// Add the build, the readiness flags and the reloads to the daemon's registry.
pub fn register_daemon(r: &mut Registry, reloads: &Reloads, ready: &Arc<Readiness>) {
    r.register_collector(Box::new(ReadyCollector(ready.clone())));
    r.register(
        "keyward_build",
        "The version and commit of the running binary",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)]),
    );
    for result in ["ok", "refused"] {
        let _ = reloads.total.get_or_create(&vec![("result", result)]);
    }
    r.register("keyward_reload", "Config reloads (SIGHUP or keyward reload), by result", reloads.total.clone());
    r.register(
        "keyward_last_reload_success_timestamp_seconds",
        "When the config was last loaded successfully (start or reload), Unix time",
        reloads.last_success.clone(),
    );
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

/// Serve `/metrics`, `/healthz` and `/readyz` on `addr` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, ready: Arc<Readiness>) {
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
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (registry, ready) = (registry.clone(), ready.clone());
                let path = req.uri().path().to_owned();
                // Off the runtime: a scrape reads kernel maps (syscalls).
                async move {
                    let r = tokio::task::spawn_blocking(move || answer(&path, &registry, &ready))
                        .await
                        .unwrap_or_else(|_| answer("/error", &Registry::default(), &Readiness::default()));
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

fn answer(path: &str, registry: &Registry, ready: &Readiness) -> Response<Full<Bytes>> {
    let mut body = String::new();
    let (status, ctype) = match path {
        "/metrics" => match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8"),
            Err(e) => {
                warn!(error = %e, "encoding metrics");
                (StatusCode::INTERNAL_SERVER_ERROR, "text/plain")
            }
        },
        "/healthz" => {
            body.push_str("ok\n");
            (StatusCode::OK, "text/plain")
        }
        "/readyz" => match ready.missing() {
            m if m.is_empty() => {
                body.push_str("ready\n");
                (StatusCode::OK, "text/plain")
            }
            m => {
                body = format!("not ready: {}\n", m.join("; "));
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain")
            }
        },
        _ => {
            body.push_str("keyward serves /metrics, /healthz and /readyz\n");
            (StatusCode::NOT_FOUND, "text/plain")
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Bind the metrics listener (an error names the address).
pub async fn bind(a: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding admin.metrics {a}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: Response<Full<Bytes>>) -> (u16, String) {
        use http_body_util::BodyExt as _;
        let status = r.status().as_u16();
        let b = block_on(r.into_body().collect()).map(|c| c.to_bytes()).unwrap_or_default();
        (status, String::from_utf8_lossy(&b).into_owned())
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn health_readiness_build_and_reloads() {
        let ready = Readiness::default();
        let mut r = Registry::default();
        let reloads = Reloads::default();
        let ready = Arc::new(ready);
        register_daemon(&mut r, &reloads, &ready);
        assert_eq!(body(answer("/healthz", &r, &ready)), (200, "ok\n".into()));
        let (code, text) = body(answer("/readyz", &r, &ready));
        assert_eq!(code, 503);
        assert!(text.contains("XDP is not attached") && text.contains("listeners"), "{text}");
        ready.xdp_attached.store(true, Ordering::Relaxed);
        ready.listening.store(true, Ordering::Relaxed);
        assert_eq!(body(answer("/readyz", &r, &ready)), (200, "ready\n".into()));
        ready.store_ok.store(false, Ordering::Relaxed);
        assert_eq!(body(answer("/readyz", &r, &ready)).0, 503);
        ready.shared_store_ok.store(false, Ordering::Relaxed);
        let (code, text) = body(answer("/readyz", &r, &ready));
        assert_eq!(code, 503);
        assert!(text.ends_with("the store cannot be written; the shared store does not answer\n"), "{text}");
        ready.shared_store_ok.store(true, Ordering::Relaxed);

        reloads.record(true, 1_700_000_000);
        reloads.record(false, 1_700_000_100);
        reloads.record(false, 1_700_000_200);
        let (code, text) = body(answer("/metrics", &r, &ready));
        assert_eq!(code, 200);
        let version = env!("CARGO_PKG_VERSION");
        assert!(text.contains(&format!("keyward_build_info{{version=\"{version}\",commit=\"{COMMIT}\"}} 1")), "{text}");
        assert!(text.contains("keyward_reload_total{result=\"ok\"} 1"), "{text}");
        assert!(text.contains("keyward_reload_total{result=\"refused\"} 2"), "{text}");
        assert!(text.contains("keyward_last_reload_success_timestamp_seconds 1700000000"), "{text}");
        assert!(text.contains("keyward_xdp_attached 1") && text.contains("keyward_store_writable 0"), "{text}");
        assert!(!COMMIT.is_empty());
    }
}
