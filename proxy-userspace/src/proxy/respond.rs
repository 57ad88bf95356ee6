//! The one place where an outcome becomes an HTTP answer: refusals as
//! `application/problem+json` (RFC 9457) with a stable type, `Retry-After`
//! where a client should come back (never before the window ends; the daily
//! one with jitter so refused clients do not all return at the reset
//! instant), and the per-IP policies in the draft-11 `RateLimit-Policy` /
//! `RateLimit` fields on every answer. The global budget is never advertised.

use std::hash::{BuildHasher as _, Hasher as _};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use super::limit::Remaining;

/// The body type of every answer.
pub type Body = Full<Bytes>;

/// How a request ended: the `outcome` label and the problem type suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Forwarded,
    CacheHit,
    Preflight,
    NoRoute,
    BadParameter,
    OriginNotAllowed,
    CountryNotAllowed,
    TokenRequired,
    TokenInvalid,
    TokenExpired,
    TokenExhausted,
    TokenMinted,
    ChallengeIssued,
    ChallengeInvalid,
    ChallengeExpired,
    ChallengeSpent,
    Script,
    BodyTooLarge,
    BadRequest,
    RequestTimeout,
    RateLimited,
    DailyCapReached,
    PrefixCapReached,
    BudgetExhausted,
    BudgetPaced,
    /// The shared store is down and this host's leases are spent.
    BudgetUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
    /// The call's reservation could not be saved (the store is failing).
    StoreUnavailable,
}

impl Outcome {
    /// Every outcome, for metrics.
    pub const ALL: [Outcome; 29] = [
        Outcome::Forwarded,
        Outcome::CacheHit,
        Outcome::Preflight,
        Outcome::NoRoute,
        Outcome::BadParameter,
        Outcome::OriginNotAllowed,
        Outcome::CountryNotAllowed,
        Outcome::TokenRequired,
        Outcome::TokenInvalid,
        Outcome::TokenExpired,
        Outcome::TokenExhausted,
        Outcome::TokenMinted,
        Outcome::ChallengeIssued,
        Outcome::ChallengeInvalid,
        Outcome::ChallengeExpired,
        Outcome::ChallengeSpent,
        Outcome::Script,
        Outcome::BodyTooLarge,
        Outcome::BadRequest,
        Outcome::RequestTimeout,
        Outcome::RateLimited,
        Outcome::DailyCapReached,
        Outcome::PrefixCapReached,
        Outcome::BudgetExhausted,
        Outcome::BudgetPaced,
        Outcome::BudgetUnavailable,
        Outcome::UpstreamTimeout,
        Outcome::UpstreamUnavailable,
        Outcome::StoreUnavailable,
    ];

    /// Metric label and type suffix.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::CacheHit => "cache_hit",
            Outcome::Preflight => "preflight",
            Outcome::NoRoute => "no-route",
            Outcome::BadParameter => "bad-parameter",
            Outcome::OriginNotAllowed => "origin-not-allowed",
            Outcome::CountryNotAllowed => "country-not-allowed",
            Outcome::TokenRequired => "token-required",
            Outcome::TokenInvalid => "token-invalid",
            Outcome::TokenExpired => "token-expired",
            Outcome::TokenExhausted => "token-exhausted",
            Outcome::TokenMinted => "token_minted",
            Outcome::ChallengeIssued => "challenge_issued",
            Outcome::ChallengeInvalid => "challenge-invalid",
            Outcome::ChallengeExpired => "challenge-expired",
            Outcome::ChallengeSpent => "challenge-spent",
            Outcome::Script => "script",
            Outcome::BodyTooLarge => "body-too-large",
            Outcome::BadRequest => "bad-request",
            Outcome::RequestTimeout => "request-timeout",
            Outcome::RateLimited => "rate-limited",
            Outcome::DailyCapReached => "daily-cap-reached",
            Outcome::PrefixCapReached => "prefix-cap-reached",
            Outcome::BudgetExhausted => "budget-exhausted",
            Outcome::BudgetPaced => "budget-paced",
            Outcome::BudgetUnavailable => "budget-unavailable",
            Outcome::UpstreamTimeout => "upstream-timeout",
            Outcome::UpstreamUnavailable => "upstream-unavailable",
            Outcome::StoreUnavailable => "store-unavailable",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Outcome::Forwarded
            | Outcome::CacheHit
            | Outcome::TokenMinted
            | Outcome::ChallengeIssued
            | Outcome::Script => StatusCode::OK,
            Outcome::Preflight => StatusCode::NO_CONTENT,
            Outcome::NoRoute => StatusCode::NOT_FOUND,
            Outcome::BadParameter | Outcome::BadRequest => StatusCode::BAD_REQUEST,
            Outcome::OriginNotAllowed
            | Outcome::CountryNotAllowed
            | Outcome::TokenRequired
            | Outcome::TokenInvalid
            | Outcome::TokenExpired
            | Outcome::TokenExhausted
            | Outcome::ChallengeInvalid
            | Outcome::ChallengeExpired
            | Outcome::ChallengeSpent => StatusCode::FORBIDDEN,
            Outcome::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Outcome::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Outcome::RateLimited | Outcome::DailyCapReached | Outcome::PrefixCapReached => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Outcome::BudgetExhausted
            | Outcome::BudgetPaced
            | Outcome::StoreUnavailable
            | Outcome::BudgetUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Outcome::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Outcome::NoRoute => "No such endpoint",
            Outcome::BadParameter => "A parameter was refused",
            Outcome::OriginNotAllowed => "This page is not allowed to call this endpoint",
            Outcome::CountryNotAllowed => "This service is not offered where you are",
            Outcome::TokenRequired => "A valid page token is required",
            Outcome::TokenInvalid => "The page token is not valid here",
            Outcome::TokenExpired => "The page token has expired",
            Outcome::TokenExhausted => "The page token's calls are used up",
            Outcome::ChallengeInvalid => "The proof-of-work was not accepted",
            Outcome::ChallengeExpired => "The proof-of-work challenge has expired",
            Outcome::ChallengeSpent => "The proof-of-work challenge was already used",
            Outcome::BodyTooLarge => "Request body too large",
            Outcome::BadRequest => "The request is malformed",
            Outcome::RequestTimeout => "The request body did not arrive in time",
            Outcome::RateLimited => "Too many requests from your address",
            Outcome::DailyCapReached => "Daily limit for your address reached",
            Outcome::PrefixCapReached => "Daily limit for your network reached",
            Outcome::BudgetExhausted => "Service temporarily unavailable",
            Outcome::BudgetPaced => "Service busy; try again later",
            Outcome::BudgetUnavailable => "Service temporarily unavailable; try again shortly",
            Outcome::UpstreamTimeout => "The upstream service timed out",
            Outcome::UpstreamUnavailable => "The upstream service is unavailable",
            Outcome::StoreUnavailable => "Service temporarily unavailable",
            Outcome::Forwarded
            | Outcome::CacheHit
            | Outcome::Preflight
            | Outcome::TokenMinted
            | Outcome::ChallengeIssued
            | Outcome::Script => "",
        }
    }
}

/// The IANA problem type of the per-IP quota refusals.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// The problem type and the violated per-IP policy of `outcome`.
fn problem_type(outcome: Outcome) -> (std::borrow::Cow<'static, str>, Option<&'static str>) {
    match outcome {
        Outcome::RateLimited => (QUOTA_EXCEEDED.into(), Some("ip-rate")),
        Outcome::DailyCapReached => (QUOTA_EXCEEDED.into(), Some("ip-daily")),
        Outcome::PrefixCapReached => (QUOTA_EXCEEDED.into(), Some("prefix-daily")),
        o => (format!("urn:keyward:problem:{}", o.name()).into(), None),
    }
}

/// The problem+json body of `outcome` with `detail`.
fn render(outcome: Outcome, detail: &str) -> Bytes {
    #[derive(serde::Serialize)]
    struct Problem<'a> {
        #[serde(rename = "type")]
        ty: &'a str,
        title: &'a str,
        status: u16,
        detail: &'a str,
        #[serde(rename = "violated-policies", skip_serializing_if = "Option::is_none")]
        violated: Option<[&'a str; 1]>,
    }
    let (ty, violated) = problem_type(outcome);
    let p = Problem {
        ty: &ty,
        title: outcome.title(),
        status: outcome.status().as_u16(),
        detail,
        violated: violated.map(|v| [v]),
    };
    Bytes::from(serde_json::to_vec(&p).unwrap_or_default())
}

/// A body rendered for (outcome, the constant detail's address and length).
type Rendered = (Outcome, (usize, usize), Bytes);

thread_local! {
    /// Bodies already rendered for a constant detail, by outcome and the
    /// detail's address and length: a refusal with a fixed detail is answered with
    /// bytes built once per thread (a few dozen entries at most).
    static RENDERED: std::cell::RefCell<Vec<Rendered>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The body for a constant `detail`, rendered once per thread.
fn rendered(outcome: Outcome, detail: &'static str) -> Bytes {
    let at = (detail.as_ptr() as usize, detail.len());
    RENDERED.with_borrow_mut(|done| {
        if let Some((_, _, b)) = done.iter().find(|(o, a, _)| *o == outcome && *a == at) {
            return b.clone();
        }
        let b = render(outcome, detail);
        if done.len() < 256 {
            done.push((outcome, at, b.clone()));
        }
        b
    })
}

/// A refusal answer.
pub fn problem(outcome: Outcome, detail: &str, retry_after: Option<u64>) -> Response<Body> {
    answer(outcome, render(outcome, detail), retry_after)
}

/// A refusal answer whose detail is a constant: its body is pre-rendered.
pub fn problem_static(outcome: Outcome, detail: &'static str, retry_after: Option<u64>) -> Response<Body> {
    answer(outcome, rendered(outcome, detail), retry_after)
}

fn answer(outcome: Outcome, body: Bytes, retry_after: Option<u64>) -> Response<Body> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = outcome.status();
    let h = r.headers_mut();
    h.reserve(8);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(s) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// The answer to a CORS preflight for `methods` from an allowed `origin`.
pub fn preflight(methods: &str, origin: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(methods) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("content-type, keyward-token"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    allow_origin(h, origin);
    r
}

/// Let the allowed `origin` read the answer.
pub fn allow_origin(h: &mut http::HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Seconds until `reset`, plus up to a minute of jitter; never before the reset.
pub fn retry_after_reset(now_unix: i64, reset: i64) -> u64 {
    let base = u64::try_from(reset.saturating_sub(now_unix)).unwrap_or(0).max(1);
    base + jitter(60)
}

/// A random number in `0..=max` (std's per-process random hasher keys).
fn jitter(max: u64) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() % (max + 1)
}

/// `RateLimit-Policy`: the same for every answer under one policy, so
/// rendered once per thread and policy.
fn policy_value(burst: u32, daily: u32, prefix_daily: Option<u32>) -> HeaderValue {
    type Limits = (u32, u32, Option<u32>);
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Limits, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    let k = (burst, daily, prefix_daily);
    LAST.with_borrow_mut(|last| {
        if let Some((lk, v)) = last.as_ref()
            && *lk == k
        {
            return v.clone();
        }
        let mut policy = format!("\"ip-rate\";q={burst};w=1, \"ip-daily\";q={daily};w=86400");
        if let Some(q) = prefix_daily {
            policy.push_str(&format!(", \"prefix-daily\";q={q};w=86400"));
        }
        let v = HeaderValue::from_maybe_shared(Bytes::from(policy)).unwrap_or_else(|_| HeaderValue::from_static(""));
        *last = Some((k, v.clone()));
        v
    })
}

/// Append the decimal digits of `n`.
fn num(buf: &mut Vec<u8>, n: impl itoa::Integer) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Add the per-client policies to an answer: the address's rate and daily
/// cap, and its network's daily cap when one is set (`prefix_daily`). The
/// policy field is pre-rendered; the state field is written straight into
/// its header bytes (one allocation).
pub fn rate_headers(
    r: &mut Response<Body>,
    burst: u32,
    daily: u32,
    prefix_daily: Option<u32>,
    rem: &Remaining,
    now_unix: i64,
) {
    let t = u64::try_from(rem.reset.saturating_sub(now_unix)).unwrap_or(0);
    let prefix = prefix_daily.and(rem.prefix);
    let policy = policy_value(burst, daily, prefix_daily.filter(|_| rem.prefix.is_some()));
    let mut state = Vec::with_capacity(96);
    state.extend_from_slice(b"\"ip-rate\";r=");
    num(&mut state, rem.rate);
    state.extend_from_slice(b";t=1, \"ip-daily\";r=");
    num(&mut state, rem.daily);
    state.extend_from_slice(b";t=");
    num(&mut state, t);
    if let Some(left) = prefix {
        state.extend_from_slice(b", \"prefix-daily\";r=");
        num(&mut state, left);
        state.extend_from_slice(b";t=");
        num(&mut state, t);
    }
    let h = r.headers_mut();
    h.insert(header::HeaderName::from_static("ratelimit-policy"), policy);
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(state)) {
        h.insert(header::HeaderName::from_static("ratelimit"), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(r: Response<Body>) -> serde_json::Value {
        use http_body_util::BodyExt as _;
        let b = futures_lite_block(r.into_body().collect()).unwrap().to_bytes();
        serde_json::from_slice(&b).unwrap()
    }

    fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn quota_problems_use_the_iana_type() {
        let r = problem(Outcome::DailyCapReached, "x", Some(100));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        assert_eq!(r.headers()["retry-after"], "100");
        let j = json(r);
        assert_eq!(j["type"], QUOTA_EXCEEDED);
        assert_eq!(j["violated-policies"], serde_json::json!(["ip-daily"]));
        let j = json(problem(Outcome::BudgetExhausted, "", None));
        assert_eq!(j["type"], "urn:keyward:problem:budget-exhausted");
        assert_eq!(j["status"], 503);
        assert!(j.get("violated-policies").is_none());
    }

    #[test]
    fn pre_rendered_bodies_match_and_stay_per_detail() {
        let b = |r: Response<Body>| json(r);
        assert_eq!(
            b(problem_static(Outcome::RateLimited, "a", Some(1))),
            b(problem(Outcome::RateLimited, "a", Some(1)))
        );
        assert_eq!(b(problem_static(Outcome::RateLimited, "a", None))["detail"], "a");
        assert_eq!(b(problem_static(Outcome::RateLimited, "b", None))["detail"], "b");
        assert_eq!(b(problem_static(Outcome::BudgetExhausted, "a", None))["status"], 503);
    }

    #[test]
    fn retry_after_is_never_early_and_jitters() {
        let vals: std::collections::HashSet<u64> = (0..50).map(|_| retry_after_reset(1000, 4600)).collect();
        assert!(vals.iter().all(|v| (3600..=3660).contains(v)));
        assert!(vals.len() > 1, "no jitter");
        // A reset already past still says "come back later", within the jitter.
        assert!((1..=61).contains(&retry_after_reset(5000, 4600)));
    }

    #[test]
    fn ratelimit_fields() {
        let mut r = problem(Outcome::RateLimited, "", Some(1));
        rate_headers(&mut r, 10, 200, None, &Remaining { rate: 0, daily: 143, prefix: None, reset: 41_000 }, 0);
        assert_eq!(r.headers()["ratelimit-policy"], "\"ip-rate\";q=10;w=1, \"ip-daily\";q=200;w=86400");
        assert_eq!(r.headers()["ratelimit"], "\"ip-rate\";r=0;t=1, \"ip-daily\";r=143;t=41000");
        rate_headers(&mut r, 10, 200, Some(50), &Remaining { rate: 0, daily: 143, prefix: Some(7), reset: 41_000 }, 0);
        assert!(r.headers()["ratelimit-policy"].to_str().unwrap().ends_with(", \"prefix-daily\";q=50;w=86400"));
        assert!(r.headers()["ratelimit"].to_str().unwrap().ends_with(", \"prefix-daily\";r=7;t=41000"));
    }
}
