//! One request's way through the forwarder, as named phases, in the spirit
//! of pingora's filters. Each phase decides one thing and either hands the
//! call on or refuses it with a [`Refused`]; a new check is one new function
//! called from [`Forwarder::admit`] or [`Forwarder::forward`].
//!
//! ```text
//! own_path             keyward's own /.keyward/ paths (script, tokens)
//! preflight            CORS preflights answered here, never forwarded
//! admit                route → parameters → origin → country → page token
//!                      → declared body size → per-IP bucket → daily caps
//!                      (address, network), budget and pace
//! lookup_cache         a fresh cached answer costs nothing
//! read_body            bounded in size and time; only for a call that will
//!                      be forwarded, and never for GET or HEAD routes
//! upstream_request     the fixed upstream URL, client copies of the key
//!                      stripped, the key injected
//! reserve              the token's call, the cost and the daily counts taken,
//!                      on disk before the call leaves (see `durable`)
//! exchange → settle    the call; charge kept or given back, alerts
//! finish               key scrubbed, answer cached, CORS
//! ```
//!
//! Refusals never reach the upstream and never charge the budget. In dry run
//! the refusals a limit or origin check would make are counted and the call
//! goes on.

mod fleet;

use std::{borrow::Cow, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header, request::Parts};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use tracing::warn;

use super::{
    Escalation, Forwarder,
    access::{self, OriginCheck},
    access_log, alert,
    forward::{self, Answer, Failure},
    geo::Placed,
    limit::{Refusal, Reservation},
    policy::Policy,
    respond::{self, Body, Outcome, problem},
    route::{Mapped, Miss, Route},
};
use crate::token::{TokenError, codec::Claims};

/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request is answered here instead of forwarded.
#[derive(Debug)]
pub struct Refused {
    pub outcome: Outcome,
    pub detail: Cow<'static, str>,
    pub retry_after: Option<u64>,
}

impl Refused {
    pub(super) fn new(outcome: Outcome, detail: impl Into<Cow<'static, str>>) -> Refused {
        Refused { outcome, detail: detail.into(), retry_after: None }
    }

    pub(super) fn retry(mut self, secs: u64) -> Refused {
        self.retry_after = Some(secs);
        self
    }

    /// A constant detail's body is pre-rendered (see `respond`).
    fn response(&self) -> Response<Body> {
        match self.detail {
            Cow::Borrowed(d) => respond::problem_static(self.outcome, d, self.retry_after),
            Cow::Owned(ref d) => problem(self.outcome, d, self.retry_after),
        }
    }
}

/// A request answered without a refusal.
struct Answered {
    response: Response<Body>,
    outcome: Outcome,
}

/// What the pipeline knows about a call once its route is found.
struct Call<'p> {
    policy: &'p Policy,
    route: &'p Route,
    mapped: Mapped,
    /// The kept query, encoded (without the key).
    query: String,
    client: IpAddr,
    /// The per-IP identity (the address, or its IPv6 prefix).
    key: IpAddr,
    /// Allow-listed: no per-IP limits.
    exempt: bool,
    /// The allowed Origin to echo in CORS headers.
    origin: Option<String>,
    /// The call's page token, verified (its allowance is taken in `reserve`).
    token: Option<Claims>,
    now: i64,
    now_ns: u64,
}

impl Forwarder {
    /// Answer one request from `peer`.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<Body> {
        let p = self.policy();
        let client = access::client_ip(peer.ip(), req.headers(), &p.trusted, p.client_ip_from);
        let key = access::client_key(client, p.v6_prefix);
        let start = p.access_log.map(|_| access_log::Start::of(req.method(), req.uri(), self.clock.monotonic_ns()));
        let (route, result) = self.run(&p, req, client, key).await;
        let route = route.map(|r| r.name.as_str());
        let (mut resp, outcome) = match result {
            Ok(a) => (a.response, a.outcome),
            Err(r) => {
                self.log_refusal(r.outcome, client, route.unwrap_or(super::counts::NO_ROUTE), &r.detail);
                (r.response(), r.outcome)
            }
        };
        self.counts.request(route, outcome);
        let now = self.clock.unix_secs() as i64;
        let rem = self.limiter.remaining(key, self.clock.monotonic_ns(), now);
        let prefix_daily = p.limits.prefix.map(|c| c.calls);
        respond::rate_headers(&mut resp, p.limits.burst, p.limits.per_ip_daily, prefix_daily, &rem, now);
        if let (Some(per_second), Some(start)) = (p.access_log, start)
            && let access_log::Verdict::Write { left_out } = self.access_lines.admit(now as u64, per_second)
        {
            let route = route.unwrap_or(super::counts::NO_ROUTE);
            let status = resp.status().as_u16();
            start.write(route, status, outcome.name(), client, self.clock.monotonic_ns(), left_out);
        }
        resp
    }

    /// The phases, top to bottom. Returns the route when one matched.
    async fn run<'p>(
        self: &Arc<Self>,
        p: &'p Policy,
        req: Request<Incoming>,
        client: IpAddr,
        key: IpAddr,
    ) -> (Option<&'p Route>, Result<Answered, Refused>) {
        let cors = p.origins.check(req.headers());
        if req.uri().path().starts_with(super::endpoint::PREFIX) {
            let own = self.own_path(p, req, cors, client, key).await;
            return (None, own.map(|(response, outcome)| Answered { response, outcome }));
        }
        if let Some(answer) = preflight(p, &req, &cors) {
            return (None, answer);
        }
        let (parts, body) = req.into_parts();
        let call = match self.admit(p, &parts, cors, client, key) {
            Ok(call) => call,
            Err((route, r)) => return (route, Err(r)),
        };
        let route = call.route;
        (Some(route), self.forward(&call, &parts, body).await)
    }

    /// Everything decided from the request head, cheapest first, before any
    /// body is read or any money reserved.
    fn admit<'p>(
        &self,
        p: &'p Policy,
        parts: &Parts,
        cors: OriginCheck,
        client: IpAddr,
        key: IpAddr,
    ) -> Result<Call<'p>, (Option<&'p Route>, Refused)> {
        let (route, mapped) = match_route(p, parts)?;
        let query = encode_query(&mapped);
        let mut call = Call {
            policy: p,
            route,
            mapped,
            query,
            client,
            key,
            exempt: self.allowed(client),
            origin: None,
            token: None,
            now: self.clock.unix_secs() as i64,
            now_ns: self.clock.monotonic_ns(),
        };
        let checks = || -> Result<(), Refused> {
            call.origin = self.check_origin(&call, cors)?;
            self.check_country(&call)?;
            call.token = self.check_token(&call, parts)?;
            check_declared_size(&call, parts)?;
            self.check_rate(&call)?;
            self.check_daily(&call)
        };
        checks().map_err(|r| (Some(route), r))?;
        Ok(call)
    }

    /// From the cache, or from the upstream on the site's money.
    async fn forward(&self, call: &Call<'_>, parts: &Parts, body: Incoming) -> Result<Answered, Refused> {
        let cache_key = call.route.cache_ttl.map(|_| cache_key(call, parts));
        if let Some(hit) = cache_key.as_deref().and_then(|k| self.lookup_cache(call, k)) {
            return Ok(Answered { response: hit, outcome: Outcome::CacheHit });
        }
        let body = read_body(call, parts, body).await?;
        let up = upstream_request(call, parts, body)?;
        let reservation = self.reserve(call).await?;
        let answer = self.exchange(call, up, reservation).await?;
        Ok(Answered { response: self.finish(call, answer, cache_key)?, outcome: Outcome::Forwarded })
    }

    /// In dry run, count the refusal and let the call go on.
    fn enforce(&self, call: &Call<'_>, r: Refused) -> Result<(), Refused> {
        if call.policy.dry_run {
            self.counts.would_refuse(&call.route.name, r.outcome);
            return Ok(());
        }
        Err(r)
    }

    /// The calling page's Origin (or Referer) must be allowed.
    fn check_origin(&self, call: &Call<'_>, cors: OriginCheck) -> Result<Option<String>, Refused> {
        match cors {
            OriginCheck::Allowed(o) => Ok(o),
            OriginCheck::Refused => self
                .enforce(call, Refused::new(Outcome::OriginNotAllowed, "the calling page's origin is not allowed"))
                .map(|()| None),
        }
    }

    /// Only calls from the listed countries (allow-listed clients skip it).
    fn check_country(&self, call: &Call<'_>) -> Result<(), Refused> {
        let Some(countries) = &call.policy.countries else { return Ok(()) };
        if call.exempt {
            return Ok(());
        }
        match countries.place(call.client) {
            Placed::Allowed => Ok(()),
            Placed::Refused(_) => {
                self.enforce(call, Refused::new(Outcome::CountryNotAllowed, "calls from your country are not served"))
            }
        }
    }

    /// With `require_token`: a valid page token for this Origin and client
    /// network, not yet used up. Checked before any limit is charged.
    fn check_token(&self, call: &Call<'_>, parts: &Parts) -> Result<Option<Claims>, Refused> {
        let Some(rt) = self.token_runtime().filter(|rt| rt.required) else { return Ok(None) };
        let token = crate::token::token_from_request(&parts.headers, parts.uri.query());
        let origin = call.origin.as_deref().unwrap_or_default();
        let verdict = match token.as_deref().filter(|t| !t.is_empty()) {
            None => Err(TokenError::Missing),
            Some(t) => rt.tokens.verify(t, origin, call.client).and_then(|c| {
                let used = self.token_state.allowance.used(c.nonce);
                if used >= c.max_calls { Err(TokenError::Exhausted) } else { Ok(c) }
            }),
        };
        match verdict {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                let o = match e {
                    TokenError::Missing => Outcome::TokenRequired,
                    TokenError::Expired => Outcome::TokenExpired,
                    TokenError::Exhausted => Outcome::TokenExhausted,
                    _ => Outcome::TokenInvalid,
                };
                let r = Refused::new(o, e.to_string());
                self.enforce(
                    call,
                    match e.retry_after() {
                        Some(s) => r.retry(s),
                        None => r,
                    },
                )
                .map(|()| None)
            }
        }
    }

    /// The per-IP token bucket (allow-listed clients skip it).
    fn check_rate(&self, call: &Call<'_>) -> Result<(), Refused> {
        if call.exempt {
            return Ok(());
        }
        match self.limiter.rate(call.key, call.now_ns) {
            Ok(()) => Ok(()),
            Err(r) => self.enforce(call, self.refusal(call, r)),
        }
    }

    /// The per-IP daily cap and the budget, without taking anything yet.
    fn check_daily(&self, call: &Call<'_>) -> Result<(), Refused> {
        match self.limiter.check_daily(call.key, call.route.cost, call.now, call.exempt) {
            Ok(()) => Ok(()),
            Err(r) => self.enforce(call, self.refusal(call, r)),
        }
    }

    /// The answer for a limit's refusal; a daily cap reached escalates the
    /// client into the XDP deny list when configured (never in dry run).
    fn refusal(&self, call: &Call<'_>, r: Refusal) -> Refused {
        match r {
            Refusal::Rate { retry_after } => {
                Refused::new(Outcome::RateLimited, "per-address rate exceeded").retry(retry_after)
            }
            Refusal::Daily { reset } => {
                if !call.policy.dry_run {
                    self.escalate(call, reset);
                }
                Refused::new(Outcome::DailyCapReached, "the daily limit for your address is reached")
                    .retry(respond::retry_after_reset(call.now, reset))
            }
            Refusal::PrefixDaily { reset, network } => {
                if !call.policy.dry_run {
                    self.escalate_network(call, network, reset);
                }
                Refused::new(Outcome::PrefixCapReached, "the daily limit for your network is reached")
                    .retry(respond::retry_after_reset(call.now, reset))
            }
            Refusal::Budget { reset } => Refused::new(Outcome::BudgetExhausted, "the service is unavailable for now")
                .retry(respond::retry_after_reset(call.now, reset)),
            Refusal::Paced { retry_after } => {
                Refused::new(Outcome::BudgetPaced, "the service is busy; the budget is released over the day")
                    .retry(retry_after)
            }
            Refusal::Unleased => {
                Refused::new(Outcome::BudgetUnavailable, "the service is briefly unavailable").retry(1)
            }
            Refusal::TokenUsed => Refused::new(Outcome::TokenExhausted, TokenError::Exhausted.to_string()),
            Refusal::DailyShare => Refused::new(
                Outcome::DailyCapReached,
                "the daily limit for your address is reached on this server for now",
            )
            .retry(60),
        }
    }

    /// Push a network over its daily cap into the XDP deny list until the
    /// reset, once a day; never a network that holds a trusted proxy or an
    /// allow-listed one.
    fn escalate_network(&self, call: &Call<'_>, network: crate::units::Cidr, reset: i64) {
        let p = call.policy;
        let protected = p.trusted.iter().any(|t| t.overlaps(&network))
            || self
                .allow
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .any(|a| a.overlaps(&network));
        if !p.deny_on_daily_cap || protected || !self.limiter.mark_escalated_prefix(network) {
            return;
        }
        let until_unix = u64::try_from(reset).unwrap_or(0);
        warn!(cidr = %network, until_unix, "network daily cap exhausted: denying in XDP until the reset");
        let _ = self.escalate.send(Escalation { cidr: network, until_unix });
    }

    /// Push the client into the XDP deny list until the reset, once a day.
    fn escalate(&self, call: &Call<'_>, reset: i64) {
        let p = call.policy;
        if !p.deny_on_daily_cap || !self.limiter.mark_escalated(call.key) {
            return;
        }
        let prefix = if call.key.is_ipv4() { 32 } else { p.v6_prefix };
        if let Ok(cidr) = format!("{}/{prefix}", call.key).parse() {
            let until_unix = u64::try_from(reset).unwrap_or(0);
            warn!(%cidr, until_unix, "daily cap exhausted: denying in XDP until the reset");
            let _ = self.escalate.send(Escalation { cidr, until_unix });
        }
    }

    /// A fresh cached answer, with this caller's CORS headers.
    fn lookup_cache(&self, call: &Call<'_>, key: &str) -> Option<Response<Body>> {
        let c = self.cache.get(key, call.now_ns)?;
        let mut r = Response::new(Full::new(c.body));
        *r.status_mut() = c.status;
        *r.headers_mut() = c.headers;
        if let Some(o) = &call.origin {
            respond::allow_origin(r.headers_mut(), o);
        }
        Some(r)
    }

    /// Take the call's cost and per-IP count (given back by `settle` if the
    /// answer is not billable), durable before the call leaves.
    async fn reserve(&self, call: &Call<'_>) -> Result<Reservation, Refused> {
        if let Some(c) = &call.token {
            let now = u64::try_from(call.now).unwrap_or(0);
            self.token_state
                .allowance
                .take(c.nonce, c.max_calls, c.expires_at, now)
                .map_err(|e| Refused::new(Outcome::TokenExhausted, e.to_string()))?;
        }
        let r = self.take_limits(call).await.map_err(|r| {
            self.give_back_token(call);
            self.refusal(call, r)
        })?;
        self.durable(call.token.as_ref(), r).await
    }

    /// Give back the call taken from the token's allowance.
    fn give_back_token(&self, call: &Call<'_>) {
        if let Some(c) = &call.token {
            self.token_state.allowance.refund(c.nonce);
        }
    }

    /// Call the upstream and settle the reservation.
    async fn exchange(
        &self,
        call: &Call<'_>,
        up: Request<Full<Bytes>>,
        reservation: Reservation,
    ) -> Result<Answer, Refused> {
        let t0 = std::time::Instant::now();
        let answer = call.policy.upstream.call(up).await;
        let took = t0.elapsed();
        match answer {
            Ok(a) => {
                self.counts.upstream(&call.route.name, a.status.as_u16());
                self.upstream_seconds.observe(took.as_secs_f64());
                self.settle(call, reservation, call.route.charge_any || a.status.is_success());
                Ok(a)
            }
            Err(f) => {
                // Once the request may have reached the upstream it may be
                // billed: keep it charged. Only a call that never left is
                // given back.
                self.settle(call, reservation, f.maybe_billed());
                Err(match f {
                    Failure::Timeout => {
                        Refused::new(Outcome::UpstreamTimeout, "the upstream service did not answer in time")
                    }
                    Failure::NotSent(e) | Failure::Unavailable(e) => {
                        warn!(route = %call.route.name, error = %e, "upstream unavailable");
                        Refused::new(Outcome::UpstreamUnavailable, "the upstream service could not be reached")
                    }
                })
            }
        }
    }

    /// Keep a billed call's charge (raising alerts), or give it back.
    fn settle(&self, call: &Call<'_>, reservation: Reservation, billed: bool) {
        if billed {
            self.journal_billed(&reservation);
            for a in self.limiter.commit(reservation) {
                alert::raise(call.policy, &a);
            }
        } else {
            self.untake_shared(call, &reservation);
            self.give_back(call.token.as_ref(), reservation);
        }
    }

    /// The answer for the client: hop-by-hop headers dropped, an encoding
    /// we did not ask for undone and the key scrubbed (an answer that cannot
    /// be read is refused 502, never passed on unread), a success cached,
    /// CORS for the allowed origin.
    fn finish(&self, call: &Call<'_>, answer: Answer, cache_key: Option<String>) -> Result<Response<Body>, Refused> {
        let p = call.policy;
        let mut headers = answer.headers;
        forward::strip_hop_by_hop(&mut headers);
        let body = p.injector.scrub_answer(&mut headers, answer.body).map_err(|e| {
            warn!(route = %call.route.name, error = %e, "upstream answer refused");
            Refused::new(Outcome::UpstreamUnavailable, "the upstream's answer could not be checked")
        })?;
        if let (Some(ttl), Some(key)) = (call.route.cache_ttl, cache_key)
            && answer.status.is_success()
        {
            let ttl_ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
            self.cache.put(key, answer.status, headers.clone(), body.clone(), call.now_ns, ttl_ns);
        }
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = answer.status;
        *r.headers_mut() = headers;
        if let Some(o) = &call.origin {
            respond::allow_origin(r.headers_mut(), o);
        }
        Ok(r)
    }
}

/// A CORS preflight for a listed path, answered here; `None` for any other
/// request.
fn preflight(p: &Policy, req: &Request<Incoming>, cors: &OriginCheck) -> Option<Result<Answered, Refused>> {
    if req.method() != Method::OPTIONS || !req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return None;
    }
    let methods = p.routes.methods_for(req.uri().path());
    if methods.is_empty() {
        return Some(Err(Refused::new(Outcome::NoRoute, "no such endpoint")));
    }
    let OriginCheck::Allowed(Some(origin)) = cors else {
        return Some(Err(Refused::new(Outcome::OriginNotAllowed, "origin not allowed")));
    };
    let methods: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
    Some(Ok(Answered { response: respond::preflight(&methods.join(", "), origin), outcome: Outcome::Preflight }))
}

/// The route for the method and path, and its parameters and query mapped
/// onto the upstream call.
fn match_route<'p>(p: &'p Policy, parts: &Parts) -> Result<(&'p Route, Mapped), (Option<&'p Route>, Refused)> {
    let path = parts.uri.path();
    let no_route = || Refused::new(Outcome::NoRoute, "no such endpoint");
    let (route, raw) = p.routes.find(&parts.method, path).map_err(|_| (None, no_route()))?;
    match route.map(&raw, parts.uri.query(), p.injector.query_key()) {
        Ok(m) => Ok((route, m)),
        Err(Miss::BadParameter(d)) => Err((Some(route), Refused::new(Outcome::BadParameter, d))),
        Err(Miss::NoRoute) => Err((Some(route), no_route())),
    }
}

/// A declared `Content-Length` over `max_body` is refused before reading.
fn check_declared_size(call: &Call<'_>, parts: &Parts) -> Result<(), Refused> {
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > call.policy.max_body) {
        return Err(Refused::new(Outcome::BodyTooLarge, "request body too large"));
    }
    Ok(())
}

/// GET and HEAD routes never carry a body upstream.
fn takes_body(route: &Route) -> bool {
    route.method != Method::GET && route.method != Method::HEAD
}

/// The request body, bounded in size and in time (a slow sender cannot hold
/// a slot). Not read at all for GET and HEAD routes.
async fn read_body(call: &Call<'_>, _parts: &Parts, body: Incoming) -> Result<Bytes, Refused> {
    if !takes_body(call.route) {
        return Ok(Bytes::new());
    }
    let max = usize::try_from(call.policy.max_body).unwrap_or(usize::MAX);
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, max).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        // Over `max_body` is 413; any other body error is the client's
        // framing (malformed chunked, a length it did not keep to): 400.
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(Refused::new(Outcome::BodyTooLarge, "request body too large"))
        }
        Ok(Err(_)) => Err(Refused::new(Outcome::BadRequest, "the request body's framing is malformed")),
        Err(_) => Err(Refused::new(Outcome::RequestTimeout, "the request body did not arrive in time")),
    }
}

/// The kept query pairs, encoded.
fn encode_query(m: &Mapped) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &m.query {
        ser.append_pair(k, v);
    }
    ser.finish()
}

/// What a cached answer depends on: the upstream call and the content
/// negotiation headers passed to it.
fn cache_key(call: &Call<'_>, parts: &Parts) -> String {
    let hv = |n: header::HeaderName| parts.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    format!(
        "{} {}?{}\n{}\n{}",
        call.route.method,
        call.mapped.path,
        call.query,
        hv(header::ACCEPT),
        hv(header::ACCEPT_LANGUAGE)
    )
}

/// The upstream request: the fixed base URL and mapped path, the kept query
/// plus the key (query mode), only the content headers, our User-Agent,
/// identity encoding (so the key can be found to be scrubbed), the client
/// address header if configured, and the key header (header mode) after any
/// client copy is removed.
fn upstream_request(call: &Call<'_>, parts: &Parts, body: Bytes) -> Result<Request<Full<Bytes>>, Refused> {
    let p = call.policy;
    let full_query = {
        let mut ser = form_urlencoded::Serializer::new(call.query.clone());
        p.injector.query(&mut ser);
        ser.finish()
    };
    let uri = p
        .upstream
        .uri(&call.mapped.path, &full_query)
        .map_err(|_| Refused::new(Outcome::UpstreamUnavailable, "bad upstream address"))?;
    let mut up = Request::new(Full::new(body));
    *up.method_mut() = call.route.method.clone();
    *up.uri_mut() = uri;
    let h = up.headers_mut();
    let passed: &[header::HeaderName] = if takes_body(call.route) {
        &[header::ACCEPT, header::ACCEPT_LANGUAGE, header::CONTENT_TYPE]
    } else {
        &[header::ACCEPT, header::ACCEPT_LANGUAGE]
    };
    for name in passed {
        if let Some(v) = parts.headers.get(name) {
            h.insert(name.clone(), v.clone());
        }
    }
    h.insert(header::USER_AGENT, HeaderValue::from_static(concat!("keyward/", env!("CARGO_PKG_VERSION"))));
    h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    if let Some(hn) = &p.client_ip_header
        && let Ok(v) = HeaderValue::from_str(&call.client.to_string())
    {
        h.insert(hn.clone(), v);
    }
    p.injector.headers(h);
    Ok(up)
}
