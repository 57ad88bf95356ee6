//! The configuration of page tokens and proof-of-work: `[access.token]` (the
//! key file, lifetime, network binding, call allowance, minimum age) and
//! `[access] pow = { ... }` (when a challenge is asked for and how hard it
//! is). Strict like the rest of the config: unknown keys are errors, values
//! are checked while parsed; [`TokenConfig::validate`] and
//! [`PowConfig::validate`] hold the checks that span several keys.

use std::{num::NonZeroU32, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    config::{PrefixV4, PrefixV6},
    units::Span,
};

/// `[access.token]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// `kid secret` per line; the first key signs, every key verifies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_file: Option<PathBuf>,
    /// How long a token is accepted after it was minted.
    pub ttl: Span,
    /// Tokens bind the client's IPv4 network of this prefix length.
    pub bind_ipv4_prefix: PrefixV4,
    /// Tokens bind the client's IPv6 network of this prefix length.
    pub bind_ipv6_prefix: PrefixV6,
    /// Route calls one plain token allows.
    pub max_calls: NonZeroU32,
    /// A token is refused until it is this old (scripts mint and call at once).
    pub min_age: Span,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            keys_file: None,
            ttl: Span(Duration::from_secs(600)),
            bind_ipv4_prefix: PrefixV4(24),
            bind_ipv6_prefix: PrefixV6(64),
            max_calls: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            min_age: Span(Duration::ZERO),
        }
    }
}

/// The longest token lifetime accepted (expiries are 32-bit Unix seconds,
/// and a day-long token is no longer a page load).
pub const MAX_TTL: Duration = Duration::from_secs(86_400);

impl TokenConfig {
    /// Checks across keys; the message names the keys, for `[access.token]`.
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl.0 < Duration::from_secs(10) || self.ttl.0 > MAX_TTL {
            return Err(format!("ttl {} must be between 10s and 1d", self.ttl));
        }
        if self.min_age.0 >= self.ttl.0 {
            return Err(format!("min_age {} must be shorter than ttl {}", self.min_age, self.ttl));
        }
        Ok(())
    }

    /// The lifetime in whole seconds.
    pub fn ttl_secs(&self) -> u64 {
        self.ttl.0.as_secs()
    }

    /// The minimum age in whole seconds, rounded up.
    pub fn min_age_secs(&self) -> u64 {
        self.min_age.0.as_millis().div_ceil(1000).try_into().unwrap_or(u64::MAX)
    }
}

/// When the token endpoint asks for proof-of-work first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PowMode {
    /// Never: tokens are minted on request.
    #[default]
    Off,
    /// For sources the forwarder finds suspicious.
    Suspicious,
    /// For every token.
    Always,
}

/// The Altcha v2 key derivation the client must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum PowAlgorithm {
    /// PBKDF2-HMAC-SHA-256 with `cost` iterations per attempt: browsers run
    /// it natively (WebCrypto), so a native solver gains little.
    #[default]
    #[serde(rename = "PBKDF2/SHA-256")]
    Pbkdf2Sha256,
    /// `cost` rounds of SHA-256 per attempt.
    #[serde(rename = "SHA-256")]
    Sha256,
}

impl PowAlgorithm {
    /// The name in the Altcha challenge.
    pub const fn altcha_name(self) -> &'static str {
        match self {
            PowAlgorithm::Pbkdf2Sha256 => "PBKDF2/SHA-256",
            PowAlgorithm::Sha256 => "SHA-256",
        }
    }
}

/// `[access] pow = { ... }`: Altcha v2 in deterministic mode. The server
/// picks a counter uniformly in `counter`; the client derives keys for
/// counters 0, 1, ... until it reproduces the signed prefix, so one token
/// costs on average `cost × (counter[0] + counter[1]) / 2` KDF iterations.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PowConfig {
    pub mode: PowMode,
    pub algorithm: PowAlgorithm,
    /// KDF iterations per attempt.
    pub cost: NonZeroU32,
    /// The range the secret counter is drawn from, inclusive.
    pub counter: [u32; 2],
    /// How long a challenge can be answered.
    pub expiry: Span,
    /// The allowance of a token minted against a solution (default: the
    /// plain `max_calls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solved_max_calls: Option<NonZeroU32>,
}

/// Default KDF iterations per attempt. With [`DEFAULT_COUNTER`] a token
/// costs 5 M PBKDF2 iterations on average: Altcha's published rate for a
/// Galaxy A14 (25 M iterations in 9.5 s on 4 threads) gives about 1.9 s there
/// and about 1 s on a phone twice as fast; headless Chromium on the 2-core
/// development machine took 0.8 to 1.1 s, and the native solver 0.7 to 1.1
/// CPU-seconds (docs/page-tokens.md, "Cost").
pub const DEFAULT_COST: u32 = 1_000;
/// Default counter range (the client's work is uniform in it).
pub const DEFAULT_COUNTER: [u32; 2] = [3_000, 7_000];

impl Default for PowConfig {
    fn default() -> Self {
        PowConfig {
            mode: PowMode::Off,
            algorithm: PowAlgorithm::Pbkdf2Sha256,
            cost: NonZeroU32::new(DEFAULT_COST).unwrap_or(NonZeroU32::MIN),
            counter: DEFAULT_COUNTER,
            expiry: Span(Duration::from_secs(120)),
            solved_max_calls: None,
        }
    }
}

impl PowConfig {
    /// Checks across keys; the message names the keys, for `[access] pow`.
    pub fn validate(&self) -> Result<(), String> {
        let [lo, hi] = self.counter;
        if lo == 0 || lo > hi {
            return Err(format!("pow.counter [{lo}, {hi}] must be two counts with 0 < first <= second"));
        }
        // Minting a challenge runs one KDF of `cost` iterations on the
        // server; keep that well under a millisecond's order of magnitude.
        if self.cost.get() > 100_000 {
            return Err(format!("pow.cost {} is above 100000 (each challenge costs the server one KDF)", self.cost));
        }
        if self.expiry.0 < Duration::from_secs(10) || self.expiry.0 > Duration::from_secs(3600) {
            return Err(format!("pow.expiry {} must be between 10s and 1h", self.expiry));
        }
        Ok(())
    }

    /// Mean KDF iterations a client runs per token: the difficulty, as
    /// `keyward status` reports it.
    pub fn mean_work(&self) -> u64 {
        let [lo, hi] = self.counter;
        (u64::from(lo) + u64::from(hi)) / 2 * u64::from(self.cost.get())
    }

    /// One line for status and logs: `PBKDF2/SHA-256 cost 1000 × counter 100..200`.
    pub fn describe(&self) -> String {
        let [lo, hi] = self.counter;
        format!("{} cost {} x counter {lo}..{hi}", self.algorithm.altcha_name(), self.cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Access {
        #[serde(default)]
        token: TokenConfig,
        #[serde(default)]
        pow: PowConfig,
    }

    #[test]
    fn defaults_and_overrides() {
        let a: Access = toml::from_str("").unwrap();
        assert_eq!(a.token, TokenConfig::default());
        assert_eq!(a.token.ttl_secs(), 600);
        assert_eq!(a.token.max_calls.get(), 20);
        assert_eq!(a.pow.mode, PowMode::Off);
        a.token.validate().unwrap();
        a.pow.validate().unwrap();
        let a: Access = toml::from_str(
            "pow = { mode = \"always\", algorithm = \"SHA-256\", cost = 1, counter = [5000, 10000], expiry = \"1m\" }\n\
             [token]\nkeys_file = \"/etc/keyward/token.keys\"\nttl = \"5m\"\nbind_ipv4_prefix = 32\nmin_age = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(a.pow.mode, PowMode::Always);
        assert_eq!(a.pow.algorithm, PowAlgorithm::Sha256);
        assert_eq!(a.pow.mean_work(), 7_500);
        assert_eq!(a.token.bind_ipv4_prefix, PrefixV4(32));
        assert_eq!(a.token.min_age_secs(), 2);
    }

    #[test]
    fn refusals() {
        let e = toml::from_str::<Access>("[token]\nttl = \"10m\"\nttl_max = 3\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `ttl_max`"), "{e}");
        let e = toml::from_str::<Access>("pow = { mode = \"sometimes\" }").unwrap_err();
        assert!(e.to_string().contains("unknown variant `sometimes`"), "{e}");
        let e = toml::from_str::<Access>("[token]\nbind_ipv6_prefix = 129\n").unwrap_err();
        assert!(e.to_string().contains("1 to 128"), "{e}");
        let t = TokenConfig { min_age: Span(Duration::from_secs(600)), ..TokenConfig::default() };
        assert!(t.validate().unwrap_err().contains("min_age"));
        let p = PowConfig { counter: [10, 5], ..PowConfig::default() };
        assert!(p.validate().unwrap_err().contains("counter"));
        let p = PowConfig { expiry: Span(Duration::from_secs(2)), ..PowConfig::default() };
        assert!(p.validate().is_err());
    }
}
