//! Page-load tokens: proof that a route call comes from a page that loaded
//! keyward's script. keyward mints a short-lived token (MAC'd with a key
//! from a shared key file, bound to the page's Origin and the client's IP
//! network, with a call allowance) at `/.keyward/token`, asking for an
//! Altcha v2 proof-of-work first when configured; the page's script
//! (`kw.js`, [`SCRIPT`]) attaches it to calls; [`Tokens::check`] verifies it
//! and takes one call of its allowance before any limit is charged.
//!
//! Submodules: [`keys`] (the key file), [`codec`] (the token format),
//! [`allowance`] (per-token call counts), [`pow`] (challenges), [`config`]
//! (`[access.token]`, `[access] pow`).
//!
//! # The endpoint (what the forwarder serves; `kw.js` relies on exactly this)
//!
//! All answers carry CORS for allowed Origins only (as for routes), and
//! `Cache-Control: no-store` except the script. Requests from an Origin not
//! in `access.allowed_origins` get `403` `origin-not-allowed` and nothing else.
//!
//! ```text
//! GET /.keyward/token
//!   200 {"token":"kw1.<kid>.<payload>.<tag>","expires_in":600,"max_calls":20,"min_age":0,"level":"plain"}
//!       when no proof-of-work is required ([`Minted`]);
//!   200 {"challenge":{"parameters":{"algorithm":"PBKDF2/SHA-256","cost":1000,"data":{"bind":"…","kid":"k1"},
//!        "expiresAt":1767225600,"keyLength":32,"keyPrefix":"<32 hex>","keySignature":"<64 hex>",
//!        "nonce":"<32 hex>","salt":"<32 hex>"},"signature":"<64 hex>"}}
//!       when it is ([`Issue::Challenge`]; the inner object is a plain Altcha v2 challenge);
//!   429 problem+json rate-limited (issuance cap per client network).
//! POST /.keyward/token            body (any Content-Type; kw.js sends text/plain so no preflight):
//!   {"payload":"<base64 of {\"challenge\":{…},\"solution\":{…}}>"}   (what <altcha-widget verifyurl=…> sends;
//!                                                                    kw.js sends this too)
//!   or {"challenge":{…as issued…},"solution":{"counter":1234,"derivedKey":"<64 hex>","time":812.5}}
//!   200 {"token":…,"expires_in":…,"max_calls":…,"min_age":…,"level":"pow","verified":true,"payload":"<the token>"}
//!       ([`Issue::solved`]; `verified` and `payload` are what the Altcha widget reads)
//!   403 problem+json challenge-invalid | challenge-expired | challenge-spent       ([`pow::PowError`])
//! GET /.keyward/challenge          (optional, for <altcha-widget challenge="/.keyward/challenge">)
//!   200 the bare Altcha challenge object (no "challenge" wrapper).
//! GET /.keyward/kw.js
//!   200 application/javascript, Cache-Control: public, max-age=3600; Subresource Integrity value
//!       [`script_integrity`] (`sha384-…`) for the page's <script integrity=…>.
//! ```
//!
//! Route calls carry the token in the `Keyward-Token` header (the preflight
//! must allow it) or, for simple GETs without a preflight, in the query
//! parameter `kw_token` (never forwarded: only listed query keys are).
//! Refusals are `403` problem+json `token-required` (none), `token-invalid`
//! (malformed, unknown key, wrong origin or network, bad MAC, and too new:
//! then with `Retry-After`), `token-expired`, `token-exhausted`.

pub mod allowance;
pub mod codec;
pub mod config;
pub mod keys;
pub mod pow;

use std::{net::IpAddr, sync::Arc};

use allowance::Allowance;
use codec::{Bind, Claims, Codec, Level, Nonce};
use config::TokenConfig;
use keys::KeyRing;

use crate::clock::Clock;

/// The request header that carries a token.
pub const HEADER: &str = "keyward-token";
/// The query parameter that carries a token (simple GETs).
pub const QUERY: &str = "kw_token";
/// The page script, served at `/.keyward/kw.js`.
pub const SCRIPT: &str = include_str!("kw.js");

/// The `integrity` attribute value for [`SCRIPT`] (SHA-384, base64).
pub fn script_integrity() -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    format!("sha384-{}", base64::engine::general_purpose::STANDARD.encode(sha2::Sha384::digest(SCRIPT)))
}

/// Why a route call's token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("this route needs a page token: load /.keyward/kw.js on the page and call through keyward.fetch")]
    Missing,
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token was signed with a key this site does not hold")]
    UnknownKey,
    #[error("the token was issued for another origin")]
    WrongOrigin,
    #[error("the token was issued to another network")]
    WrongNetwork,
    #[error("the token's signature does not match")]
    BadMac,
    #[error("the token is too new: it is accepted in {retry_after} s")]
    TooNew { retry_after: u64 },
    #[error("the token has expired; fetch a new one")]
    Expired,
    #[error("the token's call allowance is used up; fetch a new one")]
    Exhausted,
}

impl TokenError {
    /// The problem type suffix of the `403` refusal.
    pub const fn problem_type(self) -> &'static str {
        match self {
            TokenError::Missing => "token-required",
            TokenError::Expired => "token-expired",
            TokenError::Exhausted => "token-exhausted",
            _ => "token-invalid",
        }
    }

    /// A finer metric label (`reason`).
    pub const fn reason(self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed(_) => "malformed",
            TokenError::UnknownKey => "unknown_key",
            TokenError::WrongOrigin => "wrong_origin",
            TokenError::WrongNetwork => "wrong_network",
            TokenError::BadMac => "bad_mac",
            TokenError::TooNew { .. } => "too_new",
            TokenError::Expired => "expired",
            TokenError::Exhausted => "exhausted",
        }
    }

    /// Seconds for `Retry-After`, where waiting helps.
    pub const fn retry_after(self) -> Option<u64> {
        match self {
            TokenError::TooNew { retry_after } => Some(retry_after),
            _ => None,
        }
    }
}

/// The token endpoint's success body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Minted {
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    pub max_calls: u32,
    /// Seconds before it is accepted.
    pub min_age: u64,
    pub level: Level,
}

/// What the token endpoint answers: `GET` a token or a challenge to solve
/// first; `POST` (a solution) a [`Issue::solved`] token.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Issue {
    Token(Minted),
    Challenge {
        challenge: altcha::Challenge,
    },
    /// A token minted against a solution, with the two fields that make
    /// `<altcha-widget verifyurl=…>` show "verified" and hand the token to
    /// the page in its `verified` event (`payload`).
    Solved {
        #[serde(flatten)]
        minted: Minted,
        verified: bool,
        payload: String,
    },
}

impl Issue {
    /// The answer to a redeemed solution.
    pub fn solved(minted: Minted) -> Issue {
        let payload = minted.token.clone();
        Issue::Solved { minted, verified: true, payload }
    }
}

/// A call admitted by its token (one call of its allowance taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub nonce: Nonce,
    pub level: Level,
    pub max_calls: u32,
    /// Calls left after this one.
    pub remaining: u32,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Mints and checks tokens: the codec, the allowance and the time rules.
pub struct Tokens {
    codec: Codec,
    allowance: Arc<Allowance>,
    cfg: TokenConfig,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("codec", &self.codec).field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Tokens {
    /// `allowance` is shared so that counts survive a config reload.
    pub fn new(cfg: &TokenConfig, keys: Arc<KeyRing>, allowance: Arc<Allowance>, clock: Arc<dyn Clock>) -> Tokens {
        let bind = Bind { v4: cfg.bind_ipv4_prefix.0, v6: cfg.bind_ipv6_prefix.0 };
        Tokens { codec: Codec::new(keys, bind), allowance, cfg: cfg.clone(), clock }
    }

    /// The network binding in force (also for [`pow::Pow`]).
    pub fn bind(&self) -> Bind {
        self.codec.bind()
    }

    /// The per-token counts (for persisting and status).
    pub fn allowance(&self) -> &Arc<Allowance> {
        &self.allowance
    }

    /// A new token for a page of `origin` loaded by `client`, allowing
    /// `max_calls` calls (`None`: the configured `max_calls`).
    pub fn mint(&self, origin: &str, client: IpAddr, level: Level, max_calls: Option<u32>) -> Minted {
        let now = self.clock.unix_secs();
        let claims = Claims {
            issued_at: now,
            expires_at: now.saturating_add(self.cfg.ttl_secs()),
            nonce: Nonce::random(),
            max_calls: max_calls.unwrap_or(self.cfg.max_calls.get()),
            level,
        };
        Minted {
            token: self.codec.seal(&claims, origin, client),
            expires_in: self.cfg.ttl_secs(),
            max_calls: claims.max_calls,
            min_age: self.cfg.min_age_secs(),
            level,
        }
    }

    /// The claims of a token that is valid now for `origin` and `client`,
    /// without touching its allowance.
    pub fn verify(&self, token: &str, origin: &str, client: IpAddr) -> Result<Claims, TokenError> {
        let c = self.codec.open(token, origin, client)?;
        let now = self.clock.unix_secs();
        if c.issued_at > now.saturating_add(codec::MAX_SKEW_SECS) {
            return Err(TokenError::Malformed("issued in the future"));
        }
        if now > c.expires_at {
            return Err(TokenError::Expired);
        }
        let age = now.saturating_sub(c.issued_at);
        let min = self.cfg.min_age_secs();
        if age < min {
            return Err(TokenError::TooNew { retry_after: min - age });
        }
        Ok(c)
    }

    /// The forwarder's `check_token` phase: verify the call's token (from
    /// [`token_from_request`]) and take one call of its allowance.
    pub fn check(&self, token: Option<&str>, origin: &str, client: IpAddr) -> Result<Admitted, TokenError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        let c = self.verify(token, origin, client)?;
        let remaining = self.allowance.take(c.nonce, c.max_calls, c.expires_at, self.clock.unix_secs())?;
        Ok(Admitted { nonce: c.nonce, level: c.level, max_calls: c.max_calls, remaining, expires_at: c.expires_at })
    }

    /// Give back the call taken by [`Tokens::check`] (the answer was not billed).
    pub fn refund(&self, a: &Admitted) {
        self.allowance.refund(a.nonce);
    }
}

/// The token a request carries: the `Keyward-Token` header, else the
/// `kw_token` query parameter.
pub fn token_from_request(headers: &http::HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers.get(HEADER).and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == QUERY).map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests;
