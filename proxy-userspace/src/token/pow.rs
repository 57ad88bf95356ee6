//! Proof-of-work before minting: Altcha v2 challenges in deterministic mode,
//! made and checked with the official `altcha` crate, so the open-source
//! `<altcha-widget>` and Altcha solvers work against keyward. A challenge is
//! signed with a subkey of the token key file's signing key (its id rides in
//! the signed `data.kid`, so every host sharing the file verifies it), binds
//! the Origin and client network it was issued to (`data.bind`, a keyed
//! hash), expires after `pow.expiry`, and can be redeemed once: a
//! [`SpentStore`] records redeemed challenges until they expire, and of two
//! concurrent submissions of one solution exactly one wins. [`solve`] is the
//! native solver, used by tests and to measure what a script pays per token.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

/// The Altcha v2 challenge and solution types (JSON as the widget speaks it).
pub use altcha::{Challenge, Solution};
use altcha::{CreateChallengeOptions, SolveChallengeOptions, VerifySolutionOptions};
use base64::Engine as _;
use hmac::Mac as _;
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use super::{
    codec::Bind,
    config::PowConfig,
    keys::{Key, KeyRing},
};
use crate::clock::Clock;

/// Why a submitted solution mints nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PowError {
    #[error("the body is not an Altcha solution (expected {{\"payload\": base64}} or {{\"challenge\", \"solution\"}})")]
    Malformed,
    #[error("the challenge was not issued by this site")]
    BadSignature,
    #[error("the challenge was issued for another origin or network")]
    WrongBinding,
    #[error("the challenge has expired; fetch a new one")]
    Expired,
    #[error("the solution does not solve the challenge")]
    BadSolution,
    #[error("the challenge has already been redeemed")]
    Spent,
    #[error("the challenge could not be created")]
    Internal,
}

impl PowError {
    /// The problem type suffix of the refusal (`403`).
    pub const fn problem_type(self) -> &'static str {
        match self {
            PowError::Expired => "challenge-expired",
            PowError::Spent => "challenge-spent",
            _ => "challenge-invalid",
        }
    }

    /// A metric label.
    pub const fn reason(self) -> &'static str {
        match self {
            PowError::Malformed => "malformed",
            PowError::BadSignature => "bad_signature",
            PowError::WrongBinding => "wrong_binding",
            PowError::Expired => "expired",
            PowError::BadSolution => "bad_solution",
            PowError::Spent => "spent",
            PowError::Internal => "internal",
        }
    }
}

/// Remembers redeemed challenges until they expire. `spend` must be atomic:
/// for one `id`, exactly one caller ever gets `true` while the entry lives
/// (a Redis implementation is `SET id 1 NX EXAT expires_unix`).
pub trait SpentStore: Send + Sync {
    /// Record `id` as spent until `expires_unix`; `true` when it was not
    /// spent before.
    fn spend(&self, id: &str, expires_unix: u64, now_unix: u64) -> bool;
}

/// The in-memory [`SpentStore`]: a map under a mutex, purged of expired
/// entries as it grows.
#[derive(Debug, Default)]
pub struct MemorySpent {
    ids: Mutex<HashMap<String, u64>>,
}

impl MemorySpent {
    pub fn new() -> MemorySpent {
        MemorySpent::default()
    }

    /// Entries held (spent and not yet purged).
    pub fn len(&self) -> usize {
        self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SpentStore for MemorySpent {
    fn spend(&self, id: &str, expires_unix: u64, now_unix: u64) -> bool {
        let mut m = self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= 4096 {
            m.retain(|_, exp| *exp >= now_unix);
        }
        match m.get(id) {
            Some(exp) if *exp >= now_unix => false,
            _ => {
                m.insert(id.to_owned(), expires_unix);
                true
            }
        }
    }
}

/// What a client sends to mint against a solution: the widget's form
/// `{"payload": base64(JSON)}` or the decoded `{"challenge", "solution"}`.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct Submission {
    pub challenge: Challenge,
    pub solution: Solution,
}

impl Submission {
    /// Parse a request body.
    pub fn from_json(body: &[u8]) -> Result<Submission, PowError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Body {
            Payload { payload: String },
            Plain(Box<Submission>),
        }
        match serde_json::from_slice::<Body>(body).map_err(|_| PowError::Malformed)? {
            Body::Plain(s) => Ok(*s),
            Body::Payload { payload } => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(payload.trim())
                    .map_err(|_| PowError::Malformed)?;
                serde_json::from_slice(&raw).map_err(|_| PowError::Malformed)
            }
        }
    }
}

/// A redeemed challenge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Redeemed {
    /// The solve time the client reported, in milliseconds (unverified).
    pub reported_ms: Option<f64>,
}

/// Issues and redeems challenges.
pub struct Pow {
    keys: Arc<KeyRing>,
    cfg: PowConfig,
    bind: Bind,
    spent: Arc<dyn SpentStore>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Pow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pow").field("keys", &self.keys).field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

fn binding(key: &Key, bind: Bind, origin: &str, client: IpAddr) -> String {
    let mut m = key.bind_mac();
    m.update(&u32::try_from(origin.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.update(origin.as_bytes());
    m.update(&bind.network(client));
    m.finalize().into_bytes().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

impl Pow {
    pub fn new(
        keys: Arc<KeyRing>,
        cfg: PowConfig,
        bind: Bind,
        spent: Arc<dyn SpentStore>,
        clock: Arc<dyn Clock>,
    ) -> Pow {
        Pow { keys, cfg, bind, spent, clock }
    }

    /// The settings in force.
    pub fn config(&self) -> &PowConfig {
        &self.cfg
    }

    /// A fresh challenge for a client of `origin` at `client`. Costs the
    /// server one key derivation of `cost` iterations.
    pub fn challenge(&self, origin: &str, client: IpAddr) -> Result<Challenge, PowError> {
        let key = self.keys.signing();
        let [lo, hi] = self.cfg.counter;
        let expires = self.clock.unix_secs().saturating_add(self.cfg.expiry.0.as_secs());
        let mut data = BTreeMap::new();
        data.insert("kid".to_owned(), key.kid().into());
        data.insert("bind".to_owned(), binding(key, self.bind, origin, client).into());
        altcha::create_challenge(CreateChallengeOptions {
            algorithm: self.cfg.algorithm.altcha_name().to_owned(),
            cost: self.cfg.cost.get(),
            counter: Some(rand::random_range(lo..=hi.max(lo))),
            data: Some(data),
            expires_at: i64::try_from(expires).ok(),
            hmac_signature_secret: Some(key.challenge_secret().to_owned()),
            hmac_key_signature_secret: Some(key.key_signature_secret().to_owned()),
            ..CreateChallengeOptions::default()
        })
        .map_err(|e| {
            tracing::error!(error = %e, "cannot create a proof-of-work challenge");
            PowError::Internal
        })
    }

    /// Check a submission from `origin` at `client` and mark its challenge
    /// spent; `Ok` exactly once per challenge.
    pub fn redeem(&self, sub: &Submission, origin: &str, client: IpAddr) -> Result<Redeemed, PowError> {
        let p = &sub.challenge.parameters;
        let data = p.data.as_ref().ok_or(PowError::BadSignature)?;
        let kid = data.get("kid").and_then(|v| v.as_str()).ok_or(PowError::BadSignature)?;
        let key = self.keys.get(kid).ok_or(PowError::BadSignature)?;
        let now = self.clock.unix_secs();
        let expires = p.expires_at.and_then(|e| u64::try_from(e).ok()).ok_or(PowError::BadSignature)?;
        if now > expires {
            return Err(PowError::Expired);
        }
        let r = altcha::verify_solution(VerifySolutionOptions {
            hmac_key_signature_secret: Some(key.key_signature_secret().to_owned()),
            ..VerifySolutionOptions::new(&sub.challenge, &sub.solution, key.challenge_secret())
        })
        .map_err(|_| PowError::BadSolution)?;
        if r.expired {
            return Err(PowError::Expired);
        }
        if r.invalid_signature == Some(true) {
            return Err(PowError::BadSignature);
        }
        if !r.verified {
            return Err(PowError::BadSolution);
        }
        let bound = data.get("bind").and_then(|v| v.as_str()).unwrap_or_default();
        if !bool::from(bound.as_bytes().ct_eq(binding(key, self.bind, origin, client).as_bytes())) {
            return Err(PowError::WrongBinding);
        }
        if !self.spent.spend(&p.nonce, expires, now) {
            return Err(PowError::Spent);
        }
        Ok(Redeemed { reported_ms: sub.solution.time })
    }
}

/// Solve `challenge` natively on this thread, giving up after `timeout`:
/// what a scripted solver does.
pub fn solve(challenge: &Challenge, timeout: Duration) -> Option<Solution> {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
    altcha::solve_challenge(SolveChallengeOptions { timeout_ms, ..SolveChallengeOptions::new(challenge) })
        .ok()
        .flatten()
}
