//! keyward's own paths under `/.keyward/`: the page script (`kw.js`), the
//! token endpoint (`GET` mints a token, or hands out a proof-of-work
//! challenge first; `POST` mints against a solution) and the bare challenge
//! for the Altcha widget. Answered only to allowed Origins, never forwarded,
//! never charged to the budget. Minting is held to the client's per-IP rate.

use std::{net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;

use super::{
    Forwarder,
    access::OriginCheck,
    pipeline::Refused,
    policy::Policy,
    respond::{self, Body, Outcome},
};
use crate::token::{self, codec::Level, config::PowMode, pow::Submission};

/// The prefix of keyward's own paths.
pub const PREFIX: &str = "/.keyward/";
/// Largest accepted proof-of-work submission.
const MAX_SUBMISSION: usize = 8 << 10;

/// An answer from keyward's own paths.
pub type Own = Result<(Response<Body>, Outcome), Refused>;

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(v).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn script() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(token::SCRIPT.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/javascript; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r
}

fn pow_refusal(e: token::pow::PowError) -> Refused {
    use token::pow::PowError;
    let o = match e {
        PowError::Expired => Outcome::ChallengeExpired,
        PowError::Spent => Outcome::ChallengeSpent,
        _ => Outcome::ChallengeInvalid,
    };
    Refused::new(o, e.to_string())
}

impl Forwarder {
    /// Answer a request for one of keyward's own paths.
    pub(super) async fn own_path(
        &self,
        p: &Policy,
        req: Request<Incoming>,
        cors: OriginCheck,
        client: IpAddr,
        key: IpAddr,
    ) -> Own {
        let path = req.uri().path().to_owned();
        if path == "/.keyward/kw.js" && req.method() == Method::GET {
            return Ok((script(), Outcome::Script));
        }
        let Some(rt) = self.token_runtime() else {
            return Err(Refused::new(Outcome::NoRoute, "page tokens are not configured"));
        };
        let OriginCheck::Allowed(Some(origin)) = cors else {
            return Err(Refused::new(Outcome::OriginNotAllowed, "tokens are minted only for an allowed page"));
        };
        if !self.allowed(client)
            && let Err(r) = self.limiter.rate(key, self.clock.monotonic_ns())
        {
            let super::limit::Refusal::Rate { retry_after } = r else { unreachable!("rate only") };
            return Err(Refused::new(Outcome::RateLimited, "too many tokens asked for").retry(retry_after));
        }
        let answer = match (req.method().clone(), path.as_str()) {
            (Method::GET, "/.keyward/token") => {
                if self.wants_proof(p, &rt, client, key) {
                    let c = rt.pow.challenge(&origin, client).map_err(pow_refusal)?;
                    (json(StatusCode::OK, &token::Issue::Challenge { challenge: c }), Outcome::ChallengeIssued)
                } else {
                    let m = rt.tokens.mint(&origin, client, Level::Plain, None);
                    (json(StatusCode::OK, &m), Outcome::TokenMinted)
                }
            }
            (Method::GET, "/.keyward/challenge") => {
                let c = rt.pow.challenge(&origin, client).map_err(pow_refusal)?;
                (json(StatusCode::OK, &c), Outcome::ChallengeIssued)
            }
            (Method::POST, "/.keyward/token") => {
                let body = read_submission(req).await?;
                let sub = Submission::from_json(&body).map_err(pow_refusal)?;
                rt.pow.redeem(&sub, &origin, client).map_err(pow_refusal)?;
                let params = &sub.challenge.parameters;
                let expires = params.expires_at.and_then(|e| u64::try_from(e).ok()).unwrap_or(0);
                if !self.spend_on_fleet(&params.nonce, expires).await {
                    return Err(pow_refusal(token::pow::PowError::Spent));
                }
                let solved = rt.pow.config().solved_max_calls.map(std::num::NonZeroU32::get);
                let m = rt.tokens.mint(&origin, client, Level::Pow, solved);
                (json(StatusCode::OK, &token::Issue::solved(m)), Outcome::TokenMinted)
            }
            _ => return Err(Refused::new(Outcome::NoRoute, "no such endpoint")),
        };
        let (mut r, o) = answer;
        respond::allow_origin(r.headers_mut(), &origin);
        Ok((r, o))
    }

    /// Whether the token endpoint asks this client for proof-of-work first.
    /// In `suspicious` mode: when spend runs ahead of half the budget's
    /// release (or half the budget without pacing), or the client or its
    /// network has used half of its daily cap.
    fn wants_proof(&self, p: &Policy, rt: &TokenRuntime, client: IpAddr, key: IpAddr) -> bool {
        match rt.pow.config().mode {
            PowMode::Off => false,
            PowMode::Always => true,
            PowMode::Suspicious => {
                let now = self.clock.unix_secs() as i64;
                let (spent, window) = self.limiter.spent(now);
                let l = &p.limits;
                let released = l.pace.map_or(l.budget, |pace| pace.released(l.budget, &window, now));
                let rem = self.limiter.remaining(key, self.clock.monotonic_ns(), now);
                let half_used = |left: u32, cap: u32| left.saturating_mul(2) <= cap;
                spent.saturating_mul(2) > released
                    || (!self.allowed(client) && half_used(rem.daily, l.per_ip_daily))
                    || l.prefix.zip(rem.prefix).is_some_and(|(c, left)| half_used(left, c.calls))
            }
        }
    }
}

async fn read_submission(req: Request<Incoming>) -> Result<Bytes, Refused> {
    let body = Limited::new(req.into_body(), MAX_SUBMISSION).collect();
    match tokio::time::timeout(Duration::from_secs(10), body).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(Refused::new(Outcome::BodyTooLarge, "the submission is too large"))
        }
        Ok(Err(_)) => Err(Refused::new(Outcome::BadRequest, "the submission's framing is malformed")),
        Err(_) => Err(Refused::new(Outcome::RequestTimeout, "the submission did not arrive in time")),
    }
}

/// Tokens and proof-of-work as the current policy sets them up; rebuilt on
/// reload, while the allowance counts and spent challenges live on.
pub struct TokenRuntime {
    pub tokens: token::Tokens,
    pub pow: token::pow::Pow,
    pub required: bool,
}

impl TokenRuntime {
    /// For `p`, sharing the forwarder's long-lived state.
    pub fn build(p: &Policy, f: &TokenState, clock: Arc<dyn crate::clock::Clock>) -> Option<Arc<TokenRuntime>> {
        let t = p.tokens.as_ref()?;
        let tokens = token::Tokens::new(&t.cfg, t.keys.clone(), f.allowance.clone(), clock.clone());
        let pow = token::pow::Pow::new(t.keys.clone(), t.pow.clone(), tokens.bind(), f.spent.clone(), clock);
        Some(Arc::new(TokenRuntime { tokens, pow, required: t.required }))
    }
}

/// What outlives a reload: per-token call counts and spent challenges.
#[derive(Default)]
pub struct TokenState {
    pub allowance: Arc<token::allowance::Allowance>,
    pub spent: Arc<token::pow::MemorySpent>,
}
