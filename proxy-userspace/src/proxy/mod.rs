//! The key-injecting forwarder. For each HTTP call the kernel admitted it
//! decides, in this order, whether the paid API may be called on the site
//! owner's money: route allow-list → parameters and query → origin/referer
//! (CORS preflights answered here) → per-IP token bucket → per-IP daily
//! count → global daily budget → cache → upstream with the key injected.
//! Every refusal is answered locally as problem+json and never reaches the
//! upstream. The policy is swapped whole on reload; counters live on.

pub mod access;
pub mod cache;
pub mod day;
pub mod forward;
pub mod inject;
pub mod limit;
pub mod metrics;
pub mod respond;
pub mod route;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::{
    access::{OriginCheck, Origins},
    cache::Cache,
    day::Schedule,
    forward::{Failure, Upstream},
    inject::{Injector, Secret},
    limit::{Limiter, Limits, Refusal},
    respond::{Body, Outcome, problem},
    route::{Miss, Routes},
};
use crate::{clock::Clock, config::Config, units::Cidr};

/// Default bound on cached answers.
const CACHE_BYTES: usize = 64 << 20;
/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a forwarder policy could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("[upstream] is required when [listen] is set")]
    NoUpstream,
    #[error("no [[route]]: the forwarder would refuse everything")]
    NoRoutes,
    #[error("[[route]]: {0}")]
    Route(String),
    #[error(transparent)]
    Key(#[from] inject::KeyError),
    #[error(transparent)]
    Upstream(#[from] forward::UpstreamError),
    #[error("[limits]: {0}")]
    Limits(String),
    #[error("[upstream] client_ip_header `{0}` is not a header name")]
    Header(String),
}

/// Everything the config decides, swapped whole on reload.
#[derive(Debug)]
pub struct Policy {
    routes: Routes,
    origins: Origins,
    injector: Injector,
    upstream: Upstream,
    trusted: Vec<Cidr>,
    client_ip_from: crate::config::ForwardedHeader,
    max_body: u64,
    v6_prefix: u8,
    client_ip_header: Option<HeaderName>,
    deny_on_daily_cap: bool,
    dry_run: bool,
    currency: String,
    webhook: Option<http::Uri>,
    limits: Limits,
    schedule: Schedule,
}

impl Policy {
    /// Compile a config (loading the key). Nothing changes on error.
    pub fn build(cfg: &Config) -> Result<Policy, PolicyError> {
        let up = cfg.upstream.as_ref().ok_or(PolicyError::NoUpstream)?;
        Policy::build_with(cfg, Secret::load(up)?)
    }

    /// Check everything `build` would, for `keyward check`. A key that is not
    /// readable from here (the service's environment is not the operator's
    /// shell) is a warning, returned, not an error.
    pub fn validate(cfg: &Config) -> Result<Option<String>, PolicyError> {
        let up = cfg.upstream.as_ref().ok_or(PolicyError::NoUpstream)?;
        match Secret::load(up) {
            Ok(s) => Policy::build_with(cfg, s).map(|_| None),
            Err(e @ (inject::KeyError::Env(_) | inject::KeyError::File { .. })) => {
                Policy::build_with(cfg, Secret::from_str_for_test("placeholder")).map(|_| Some(e.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn build_with(cfg: &Config, secret: Secret) -> Result<Policy, PolicyError> {
        let listen = cfg.listen.as_ref();
        let up = cfg.upstream.as_ref().ok_or(PolicyError::NoUpstream)?;
        if cfg.routes.is_empty() {
            return Err(PolicyError::NoRoutes);
        }
        let routes = Routes::compile(&cfg.routes).map_err(PolicyError::Route)?;
        let injector = Injector::new(&up.inject, secret)?;
        let l = cfg.limits.get_ref();
        let budget =
            limit::micros(l.daily).ok_or_else(|| PolicyError::Limits("daily must be a non-negative amount".into()))?;
        let alert_at = l
            .alert_at
            .iter()
            .map(|f| limit::micros(*f).filter(|m| *m <= limit::MICROS))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| PolicyError::Limits("alert_at fractions must be between 0 and 1".into()))?;
        let schedule = Schedule::new(&l.reset_at, &l.timezone).map_err(|e| PolicyError::Limits(e.to_string()))?;
        let client_ip_header = match &up.client_ip_header {
            Some(h) => Some(HeaderName::from_bytes(h.as_bytes()).map_err(|_| PolicyError::Header(h.clone()))?),
            None => None,
        };
        let webhook = match l.alert_webhook.trim() {
            "" => None,
            u => Some(u.parse().map_err(|_| PolicyError::Limits(format!("alert_webhook `{u}` is not a URL")))?),
        };
        Ok(Policy {
            routes,
            origins: Origins::new(&cfg.access.get_ref().allowed_origins, cfg.access.get_ref().require_origin),
            injector,
            upstream: Upstream::new(up)?,
            trusted: listen.map(|l| l.trusted_proxies.clone()).unwrap_or_default(),
            client_ip_from: listen.map(|l| l.client_ip_from).unwrap_or_default(),
            max_body: listen.map_or(16 * 1024, |l| l.max_body.0),
            v6_prefix: cfg.xdp().ipv6_prefix.0,
            client_ip_header,
            deny_on_daily_cap: l.deny_on_daily_cap,
            dry_run: l.dry_run,
            currency: l.currency.clone(),
            webhook,
            limits: Limits {
                rate: proxy_common::bucket::Params::new(l.per_ip_rate.get(), l.per_ip_burst.get()),
                burst: l.per_ip_burst.get(),
                per_ip_daily: l.per_ip_daily.get(),
                budget,
                alert_at,
                dry_run: l.dry_run,
            },
            schedule,
        })
    }
}

/// A request to push a client into the XDP deny list until `until_unix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    pub cidr: Cidr,
    pub until_unix: u64,
}

/// Per route, per outcome request counts, and per-code upstream answers.
/// Keyed by the route's name so counting borrows it (no allocation per request).
#[derive(Debug, Default)]
pub struct Counts {
    pub requests: HashMap<String, [u64; Outcome::ALL.len()]>,
    pub upstream: HashMap<(String, u16), u64>,
    /// In dry run: the refusals that would have happened.
    pub would_refuse: HashMap<(String, Outcome), u64>,
}

/// The forwarder.
pub struct Forwarder {
    policy: RwLock<Arc<Policy>>,
    limiter: Limiter,
    cache: Cache,
    clock: Arc<dyn Clock>,
    escalate: mpsc::UnboundedSender<Escalation>,
    counts: Mutex<Counts>,
    /// The operator's allow list (kept in step by the daemon): these clients
    /// bypass the per-IP rate and daily cap, never the global budget.
    allow: RwLock<Vec<Cidr>>,
    upstream_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Last second each outcome was logged at info (log sampling).
    logged: Mutex<HashMap<Outcome, u64>>,
}

/// What the caller gets back to wire the forwarder into the daemon.
pub struct Handles {
    pub forwarder: Arc<Forwarder>,
    pub escalations: mpsc::UnboundedReceiver<Escalation>,
}

impl Forwarder {
    /// A forwarder for `policy`, starting from today's persisted counts.
    pub fn new(policy: Policy, clock: Arc<dyn Clock>, restored: Option<limit::DayCounts>) -> Handles {
        let now = clock.unix_secs() as i64;
        let limiter = Limiter::new(policy.limits.clone(), policy.schedule.clone(), now, restored);
        let (tx, rx) = mpsc::unbounded_channel();
        Handles {
            forwarder: Arc::new(Forwarder {
                policy: RwLock::new(Arc::new(policy)),
                limiter,
                cache: Cache::new(CACHE_BYTES),
                clock,
                escalate: tx,
                counts: Mutex::new(Counts::default()),
                allow: RwLock::new(Vec::new()),
                upstream_seconds: prometheus_client::metrics::histogram::Histogram::new(
                    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 12),
                ),
                logged: Mutex::new(HashMap::new()),
            }),
            escalations: rx,
        }
    }

    /// Swap in a new policy (reload). Counters and cache stay.
    pub fn reconfigure(&self, p: Policy) {
        self.limiter.reconfigure(p.limits.clone(), p.schedule.clone());
        *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(p);
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replace the allow list the forwarder honours.
    pub fn set_allow(&self, cidrs: Vec<Cidr>) {
        *self.allow.write().unwrap_or_else(std::sync::PoisonError::into_inner) = cidrs;
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.read().unwrap_or_else(std::sync::PoisonError::into_inner).iter().any(|c| c.contains(ip))
    }

    /// The limiter (for persistence and status).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The cache (for status).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The currency of amounts.
    pub fn currency(&self) -> String {
        self.policy().currency.clone()
    }

    /// A snapshot of request counts.
    pub fn counts(&self) -> (HashMap<(String, Outcome), u64>, HashMap<(String, u16), u64>) {
        let c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let requests = c
            .requests
            .iter()
            .flat_map(|(r, per)| {
                Outcome::ALL.iter().zip(per).filter(|(_, n)| **n > 0).map(move |(o, n)| ((r.clone(), *o), *n))
            })
            .collect();
        (requests, c.upstream.clone())
    }

    /// Dry run's would-be refusals by route and outcome.
    pub fn would_refuse(&self) -> HashMap<(String, Outcome), u64> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).would_refuse.clone()
    }

    fn would(&self, route: &str, o: Outcome) {
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *c.would_refuse.entry((route.to_owned(), o)).or_insert(0) += 1;
    }

    /// The upstream latency histogram (shared, for metrics).
    pub fn upstream_histogram(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.upstream_seconds.clone()
    }

    fn count(&self, route: &str, o: Outcome) {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match c.requests.get_mut(route) {
            Some(per) => per[i] += 1,
            None => {
                let mut per = [0u64; Outcome::ALL.len()];
                per[i] = 1;
                c.requests.insert(route.to_owned(), per);
            }
        }
    }

    /// One info line per outcome class per second at most; the rest at debug.
    fn log_refusal(&self, o: Outcome, client: IpAddr, route: &str, detail: &str) {
        let now = self.clock.unix_secs();
        let mut g = self.logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.get(&o).is_some_and(|t| *t == now) {
            debug!(outcome = o.name(), %client, route, detail, "refused");
        } else {
            g.insert(o, now);
            info!(outcome = o.name(), %client, route, detail, "refused (sampled: at most one line per outcome per second)");
        }
    }

    /// Answer one request from `peer`.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let p = self.policy();
        let client = access::client_ip(peer.ip(), req.headers(), &p.trusted, p.client_ip_from);
        let key = access::client_key(client, p.v6_prefix);
        let (mut resp, route, outcome) = self.decide(&p, req, client, key).await;
        if !matches!(outcome, Outcome::Forwarded | Outcome::CacheHit | Outcome::Preflight) {
            self.log_refusal(outcome, client, &route, "");
        }
        self.count(&route, outcome);
        let now = self.clock.unix_secs() as i64;
        let rem = self.limiter.remaining(key, self.clock.monotonic_ns(), now);
        respond::rate_headers(&mut resp, p.limits.burst, p.limits.per_ip_daily, &rem, now);
        resp
    }

    async fn decide(
        self: &Arc<Self>,
        p: &Policy,
        req: Request<Incoming>,
        client: IpAddr,
        key: IpAddr,
    ) -> (Response<Body>, String, Outcome) {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let cors = p.origins.check(req.headers());

        // CORS preflight: answered here, never forwarded.
        if method == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
            let methods = p.routes.methods_for(&path);
            if methods.is_empty() {
                return (problem(Outcome::NoRoute, "no such endpoint", None), "-".into(), Outcome::NoRoute);
            }
            let OriginCheck::Allowed(Some(origin)) = cors else {
                return (
                    problem(Outcome::OriginNotAllowed, "origin not allowed", None),
                    "-".into(),
                    Outcome::OriginNotAllowed,
                );
            };
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = http::StatusCode::NO_CONTENT;
            let m: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
            let h = r.headers_mut();
            set(h, header::ACCESS_CONTROL_ALLOW_METHODS, &m.join(", "));
            set(h, header::ACCESS_CONTROL_ALLOW_HEADERS, "content-type");
            set(h, header::ACCESS_CONTROL_MAX_AGE, "600");
            allow_origin(h, &origin);
            return (r, "-".into(), Outcome::Preflight);
        }

        let (route, raw) = match p.routes.find(&method, &path) {
            Ok(r) => r,
            Err(_) => return (problem(Outcome::NoRoute, "no such endpoint", None), "-".into(), Outcome::NoRoute),
        };
        let name = route.name.clone();
        let refuse = |o: Outcome, detail: &str, retry: Option<u64>| (problem(o, detail, retry), name.clone(), o);
        let mapped = match route.map(&raw, req.uri().query(), p.injector.query_key()) {
            Ok(m) => m,
            Err(Miss::BadParameter(d)) => return refuse(Outcome::BadParameter, &d, None),
            Err(Miss::NoRoute) => return refuse(Outcome::NoRoute, "no such endpoint", None),
        };
        let origin = match cors {
            OriginCheck::Allowed(o) => o,
            OriginCheck::Refused if p.dry_run => {
                self.would(&name, Outcome::OriginNotAllowed);
                None
            }
            OriginCheck::Refused => {
                return refuse(Outcome::OriginNotAllowed, "the calling page's origin is not allowed", None);
            }
        };

        // The body, bounded.
        let (parts, body) = req.into_parts();
        let declared =
            parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > p.max_body) {
            return refuse(Outcome::BodyTooLarge, "request body too large", None);
        }
        // Bounded in size and in time: a slow sender cannot hold a slot.
        let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, p.max_body as usize).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => return refuse(Outcome::BodyTooLarge, "request body too large", None),
            Err(_) => return refuse(Outcome::RequestTimeout, "the request body did not arrive in time", None),
        };

        // Limits. Allow-listed clients skip the per-IP ones (not the budget).
        let now_ns = self.clock.monotonic_ns();
        let now = self.clock.unix_secs() as i64;
        let exempt = self.allowed(client);
        if !exempt {
            if let Err(Refusal::Rate { retry_after }) = self.limiter.rate(key, now_ns) {
                if !p.dry_run {
                    return refuse(Outcome::RateLimited, "per-address rate exceeded", Some(retry_after));
                }
                self.would(&name, Outcome::RateLimited);
            }
        }
        if let Err(r) = self.limiter.check_daily(key, route.cost, now, exempt) {
            if let Some(x) = self.daily_refusal(p, r, key, now, &name) {
                return (x.0, name, x.1);
            }
        }

        // Cache.
        let public_query = {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &mapped.query {
                ser.append_pair(k, v);
            }
            ser.finish()
        };
        let hv = |n: header::HeaderName| parts.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let cache_key = format!(
            "{} {}?{}\n{}\n{}",
            route.method,
            mapped.path,
            public_query,
            hv(header::ACCEPT),
            hv(header::ACCEPT_LANGUAGE)
        );
        if route.cache_ttl.is_some() {
            if let Some(c) = self.cache.get(&cache_key, now_ns) {
                let mut r = Response::new(Full::new(c.body));
                *r.status_mut() = c.status;
                *r.headers_mut() = c.headers;
                if let Some(o) = &origin {
                    allow_origin(r.headers_mut(), o);
                }
                return (r, name, Outcome::CacheHit);
            }
        }

        // Reserve, call, charge or refund.
        let reservation = match self.limiter.reserve(key, route.cost, now, exempt) {
            Ok(r) => r,
            Err(r) => match self.daily_refusal(p, r, key, now, &name) {
                Some(x) => return (x.0, name, x.1),
                None => return refuse(Outcome::BudgetExhausted, "budget", None),
            },
        };
        let full_query = {
            let mut ser = form_urlencoded::Serializer::new(public_query.clone());
            p.injector.query(&mut ser);
            ser.finish()
        };
        let uri = match p.upstream.uri(&mapped.path, &full_query) {
            Ok(u) => u,
            Err(_) => {
                self.limiter.refund(reservation);
                return refuse(Outcome::UpstreamUnavailable, "bad upstream address", None);
            }
        };
        let mut up = Request::new(Full::new(body));
        *up.method_mut() = route.method.clone();
        *up.uri_mut() = uri;
        let h = up.headers_mut();
        for name in [header::ACCEPT, header::ACCEPT_LANGUAGE, header::CONTENT_TYPE] {
            if let Some(v) = parts.headers.get(&name) {
                h.insert(name, v.clone());
            }
        }
        set(h, header::USER_AGENT, concat!("keyward/", env!("CARGO_PKG_VERSION")));
        // Uncompressed answers only: the key must be findable to be scrubbed.
        set(h, header::ACCEPT_ENCODING, "identity");
        if let Some(hn) = &p.client_ip_header {
            set(h, hn.clone(), &client.to_string());
        }
        p.injector.headers(h);

        let t0 = Instant::now();
        let answer = p.upstream.call(up).await;
        let took = t0.elapsed();
        let answer = match answer {
            Ok(a) => a,
            Err(f) => {
                // Once the request may have reached the upstream it may be
                // billed: keep it charged. Only a call that never left is
                // given back.
                if f.maybe_billed() {
                    for a in self.limiter.commit(reservation) {
                        self.alert(p, a);
                    }
                } else {
                    self.limiter.refund(reservation);
                }
                let (o, d) = match f {
                    Failure::Timeout => {
                        (Outcome::UpstreamTimeout, "the upstream service did not answer in time".to_owned())
                    }
                    Failure::NotSent(e) | Failure::Unavailable(e) => {
                        warn!(route = %name, error = %e, "upstream unavailable");
                        (Outcome::UpstreamUnavailable, "the upstream service could not be reached".to_owned())
                    }
                };
                return refuse(o, &d, None);
            }
        };
        {
            let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *c.upstream.entry((name.clone(), answer.status.as_u16())).or_insert(0) += 1;
        }
        self.upstream_seconds.observe(took.as_secs_f64());
        let billable = route.charge_any || answer.status.is_success();
        if billable {
            for a in self.limiter.commit(reservation) {
                self.alert(p, a);
            }
        } else {
            self.limiter.refund(reservation);
        }
        let mut headers = answer.headers;
        forward::strip_hop_by_hop(&mut headers);
        p.injector.scrub_headers(&mut headers);
        let body = p.injector.scrub_body(answer.body);
        if let Some(ttl) = route.cache_ttl {
            if answer.status.is_success() {
                self.cache.put(cache_key, answer.status, headers.clone(), body.clone(), now_ns, ttl.as_nanos() as u64);
            }
        }
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = answer.status;
        *r.headers_mut() = headers;
        if let Some(o) = &origin {
            allow_origin(r.headers_mut(), o);
        }
        (r, name, Outcome::Forwarded)
    }

    /// The answer for a daily refusal (escalating when configured), or
    /// `None` in dry run.
    fn daily_refusal(
        &self,
        p: &Policy,
        r: Refusal,
        key: IpAddr,
        now: i64,
        route: &str,
    ) -> Option<(Response<Body>, Outcome)> {
        if p.dry_run {
            self.would(
                route,
                match r {
                    Refusal::Daily { .. } => Outcome::DailyCapReached,
                    Refusal::Budget { .. } => Outcome::BudgetExhausted,
                    Refusal::Rate { .. } => Outcome::RateLimited,
                },
            );
            return None;
        }
        match r {
            Refusal::Daily { reset } => {
                if p.deny_on_daily_cap && self.limiter.mark_escalated(key) {
                    let prefix = if key.is_ipv4() { 32 } else { p.v6_prefix };
                    if let Ok(cidr) = format!("{key}/{prefix}").parse::<Cidr>() {
                        let until_unix = u64::try_from(reset).unwrap_or(0);
                        warn!(%cidr, until_unix, "daily cap exhausted: denying in XDP until the reset");
                        let _ = self.escalate.send(Escalation { cidr, until_unix });
                    }
                }
                let retry = respond::retry_after_reset(now, reset);
                Some((
                    problem(Outcome::DailyCapReached, "the daily limit for your address is reached", Some(retry)),
                    Outcome::DailyCapReached,
                ))
            }
            Refusal::Budget { reset } => {
                let retry = respond::retry_after_reset(now, reset);
                Some((
                    problem(Outcome::BudgetExhausted, "the service is unavailable for now", Some(retry)),
                    Outcome::BudgetExhausted,
                ))
            }
            Refusal::Rate { retry_after } => Some((
                problem(Outcome::RateLimited, "per-address rate exceeded", Some(retry_after)),
                Outcome::RateLimited,
            )),
        }
    }

    /// Log an alert and POST it to the webhook (retried, never blocking requests).
    fn alert(&self, p: &Policy, a: limit::Alert) {
        let doc = serde_json::json!({
            "alert": "budget",
            "fraction": a.fraction as f64 / limit::MICROS as f64,
            "spent": limit::format_amount(a.spent),
            "budget": limit::format_amount(a.budget),
            "currency": p.currency,
            "day": a.day,
        });
        warn!(
            fraction = a.fraction as f64 / limit::MICROS as f64,
            spent = %limit::format_amount(a.spent),
            budget = %limit::format_amount(a.budget),
            currency = %p.currency,
            "daily budget alert"
        );
        if let Some(url) = p.webhook.clone() {
            let up = p.upstream.clone();
            tokio::spawn(async move {
                for attempt in 0..4u32 {
                    match up.post_json(&url, &doc).await {
                        Ok(s) if s.is_success() => return,
                        Ok(s) => warn!(status = s.as_u16(), attempt, "alert webhook refused"),
                        Err(e) => warn!(error = ?e, attempt, "alert webhook failed"),
                    }
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
            });
        }
    }
}

fn set(h: &mut http::HeaderMap, name: HeaderName, v: &str) {
    if let Ok(v) = HeaderValue::from_str(v) {
        h.insert(name, v);
    }
}

fn allow_origin(h: &mut http::HeaderMap, origin: &str) {
    set(h, header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Accept connections until `stop` fires, then drain in-flight requests
/// for up to `drain`.
pub async fn serve(
    fwd: Arc<Forwarder>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::{conn::auto, graceful::GracefulShutdown},
    };
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(30));
    let builder = Arc::new(builder);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let fwd = fwd.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let fwd = fwd.clone();
                    async move { Ok::<_, std::convert::Infallible>(fwd.handle(req, peer).await) }
                });
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await else { return };
                            let conn = builder.serve_connection(TokioIo::new(s), svc).into_owned();
                            let _ = watcher.watch(conn).await;
                        }
                        None => {
                            let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                            let _ = watcher.watch(conn).await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!("drain timed out; closing remaining connections");
    }
}

/// The TLS acceptor for `[listen] tls_cert`/`tls_key`.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
