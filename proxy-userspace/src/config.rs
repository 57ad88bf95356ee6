//! The TOML configuration: its schema (strict: unknown keys are errors), its
//! validation, and its errors, which always carry `file:line:col`. Values are
//! checked while they are parsed (newtypes with `try_from`), so the TOML
//! parser attaches the offending value's position to every error; the few
//! checks that span several keys report the position of the key that is
//! wrong (fields kept as `Spanned` for that), else of their table.
//!
//! The key of the paid API is never part of the config: only where to find it
//! (`key_env` / `key_file`).

use std::{
    fmt,
    num::{NonZeroU16, NonZeroU32},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    paths,
    units::{Cidr, Size, Span},
};

/// A config that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}")]
    Invalid { path: PathBuf, line: usize, col: usize, message: String },
    /// Not about one place in the file.
    #[error("{path}: {message}")]
    Unplaced { path: PathBuf, message: String },
}

impl ConfigError {
    /// An error about the bytes `span` of `text` (the file at `path`), or
    /// about the file as a whole when there is no span.
    pub fn at(path: &Path, text: &str, span: Option<std::ops::Range<usize>>, message: String) -> ConfigError {
        match span {
            Some(s) => {
                let (line, col) = line_col(text, s.start);
                ConfigError::Invalid { path: path.to_owned(), line, col, message }
            }
            None => ConfigError::Unplaced { path: path.to_owned(), message },
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub xdp: Spanned<Xdp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Listen>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    #[serde(default, rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Spanned<Route>>,
    #[serde(default = "spanned_default")]
    pub access: Spanned<Access>,
    #[serde(default = "spanned_default")]
    pub limits: Spanned<Limits>,
    #[serde(default)]
    pub store: Store,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub log: Log,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic with a log line.
    #[default]
    Auto,
    /// Native only.
    Native,
    /// Generic (skb) only.
    Generic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// `[xdp]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Xdp {
    pub interface: String,
    #[serde(default)]
    pub mode: AttachMode,
    pub ports: Vec<NonZeroU16>,
    pub rate_pps: NonZeroU32,
    pub burst: NonZeroU32,
    #[serde(default = "default_v6_prefix")]
    pub ipv6_prefix: PrefixV6,
    #[serde(default)]
    pub aggregate: Aggregate,
    #[serde(default)]
    pub dry_run: bool,
    /// Capacity of the per-source table (an extension of the contract).
    #[serde(default = "default_table_size")]
    pub table_size: NonZeroU32,
    /// Host-wide rate at which sources not yet tracked are admitted into the
    /// per-source table (an extension: holds floods spread over many
    /// prefixes, which the aggregate bucket cannot).
    #[serde(default)]
    pub new_sources: NewSources,
    /// Host-wide cap on the SYNs of untracked sources passed to the kernel
    /// while `new_sources` is spent (an extension: beyond it they are
    /// dropped, so a spoofed flood cannot make the kernel answer every SYN).
    #[serde(default)]
    pub untracked_syns: UntrackedSyns,
    /// Files of CIDRs to drop (blocklist feeds), re-read on reload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_files: Vec<PathBuf>,
    /// Files of CIDRs that bypass rate limits (a CDN's ranges), re-read on reload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_files: Vec<PathBuf>,
}

/// `[xdp] new_sources`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewSources {
    pub rate_pps: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Default for NewSources {
    fn default() -> Self {
        NewSources {
            rate_pps: NonZeroU32::new(20_000).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(40_000).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// `[xdp] untracked_syns`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UntrackedSyns {
    pub rate_pps: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Default for UntrackedSyns {
    fn default() -> Self {
        UntrackedSyns {
            rate_pps: NonZeroU32::new(10_000).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(10_000).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// `[xdp] aggregate`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    pub v4_prefix: PrefixV4,
    pub v6_prefix: PrefixV6,
    pub rate_pps: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Default for Aggregate {
    fn default() -> Self {
        Aggregate {
            v4_prefix: PrefixV4(24),
            v6_prefix: PrefixV6(48),
            rate_pps: NonZeroU32::new(2000).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(4000).unwrap_or(NonZeroU32::MIN),
        }
    }
}

fn spanned_default<T: Default>() -> Spanned<T> {
    Spanned::new(0..0, T::default())
}

fn default_v6_prefix() -> PrefixV6 {
    PrefixV6(64)
}

fn default_table_size() -> NonZeroU32 {
    NonZeroU32::new(proxy_common::SOURCES_MAX_DEFAULT).unwrap_or(NonZeroU32::MIN)
}

/// An IPv4 prefix length, 1 to 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct PrefixV4(pub u8);

impl TryFrom<u8> for PrefixV4 {
    type Error = String;
    fn try_from(n: u8) -> Result<Self, String> {
        if (1..=32).contains(&n) {
            Ok(PrefixV4(n))
        } else {
            Err(format!("IPv4 prefix length must be 1 to 32, not {n}"))
        }
    }
}

impl From<PrefixV4> for u8 {
    fn from(p: PrefixV4) -> u8 {
        p.0
    }
}

/// An IPv6 prefix length, 1 to 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct PrefixV6(pub u8);

impl TryFrom<u8> for PrefixV6 {
    type Error = String;
    fn try_from(n: u8) -> Result<Self, String> {
        if (1..=128).contains(&n) {
            Ok(PrefixV6(n))
        } else {
            Err(format!("IPv6 prefix length must be 1 to 128, not {n}"))
        }
    }
}

impl From<PrefixV6> for u8 {
    fn from(p: PrefixV6) -> u8 {
        p.0
    }
}

/// `[listen]` (served by the forwarder).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub addr: std::net::SocketAddr,
    /// Certificate chain (PEM); re-read on reload. Needs `tls_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<Spanned<PathBuf>>,
    /// Private key (PEM) of `tls_cert`; re-read on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Which header trusted proxies write the client into (an extension):
    /// only that one is read, so a client cannot add the other.
    #[serde(default)]
    pub client_ip_from: ForwardedHeader,
    #[serde(default = "default_max_body")]
    pub max_body: Size,
    /// Connection bounds (issue 14): open client connections in all, and
    /// per client address (IPv6: per `ipv6_prefix`; trusted proxies are
    /// held only to the total). The total is also kept below the open-file
    /// limit. A new connection over either is closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: NonZeroU32,
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: NonZeroU32,
    /// From accept to the first complete request head (TLS handshake and
    /// HTTP/2 preface included); a connection silent that long is closed.
    #[serde(default = "default_head_timeout")]
    pub head_timeout: Span,
}

fn default_max_connections() -> NonZeroU32 {
    NonZeroU32::new(8192).unwrap_or(NonZeroU32::MIN)
}

fn default_max_connections_per_ip() -> NonZeroU32 {
    NonZeroU32::new(128).unwrap_or(NonZeroU32::MIN)
}

fn default_head_timeout() -> Span {
    Span(std::time::Duration::from_secs(10))
}

/// The header that carries the client address behind trusted proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx, HAProxy, most load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=…`.
    Forwarded,
}

fn default_max_body() -> Size {
    Size(16 * 1024)
}

/// `[upstream]`. Holds where the key is, never the key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub base_url: String,
    #[serde(default = "default_timeout")]
    pub timeout: Span,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    pub inject: Inject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip_header: Option<String>,
    /// Extra CA certificates (PEM) trusted for the upstream, besides the
    /// system roots (an extension: private upstreams, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_timeout() -> Span {
    Span(std::time::Duration::from_secs(5))
}

/// Where the key goes in the upstream request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, untagged)]
pub enum Inject {
    Query {
        query: String,
    },
    Header {
        header: String,
        #[serde(default = "default_header_value")]
        value: String,
    },
}

fn default_header_value() -> String {
    "{key}".to_owned()
}

/// Which upstream answers are billable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum ChargeOn {
    #[default]
    #[serde(rename = "2xx")]
    Success,
    #[serde(rename = "any")]
    Any,
}

/// One `[[route]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub method: String,
    pub path: String,
    pub upstream_path: String,
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub query: Vec<String>,
    #[serde(default)]
    pub cost: f64,
    #[serde(default)]
    pub charge_on: ChargeOn,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_ttl: Option<Span>,
}

/// `[access]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Access {
    /// Pages allowed to call; the forwarder refuses to start without a
    /// list (`["*"]` is an explicit "any Origin").
    pub allowed_origins: Vec<String>,
    /// A call with neither Origin nor Referer is refused (the default).
    pub require_origin: bool,
    #[serde(default)]
    pub require_token: bool,
    /// Only calls from these countries (ISO 3166-1 alpha-2), placed by `geo_db`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<String>,
    /// A MaxMind-format country database (`.mmdb`) the operator supplies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo_db: Option<PathBuf>,
    /// `[access.token]`: page-load tokens.
    #[serde(default)]
    pub token: crate::token::config::TokenConfig,
    /// `[access] pow`: proof-of-work before a token is minted.
    #[serde(default)]
    pub pow: crate::token::config::PowConfig,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            allowed_origins: Vec::new(),
            require_origin: true,
            require_token: false,
            countries: Vec::new(),
            geo_db: None,
            token: Default::default(),
            pow: Default::default(),
        }
    }
}

/// `[limits]`. Keys left out take the defaults shown in the example config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub per_ip_rate: NonZeroU32,
    pub per_ip_burst: NonZeroU32,
    pub per_ip_daily: NonZeroU32,
    pub daily: f64,
    pub currency: String,
    pub reset_at: Spanned<String>,
    pub timezone: Spanned<String>,
    pub dry_run: bool,
    pub alert_at: Vec<f64>,
    pub alert_webhook: Spanned<String>,
    pub deny_on_daily_cap: bool,
    /// Billable calls a day shared by the addresses of one network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_prefix_daily: Option<PrefixDaily>,
    /// Release the budget over the day instead of all at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pace: Option<Pace>,
}

/// `[limits] per_prefix_daily`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixDaily {
    #[serde(default = "default_prefix_v4")]
    pub v4_prefix: PrefixV4,
    #[serde(default = "default_prefix_v6")]
    pub v6_prefix: PrefixV6,
    pub calls: NonZeroU32,
}

fn default_prefix_v4() -> PrefixV4 {
    PrefixV4(24)
}

fn default_prefix_v6() -> PrefixV6 {
    PrefixV6(48)
}

/// `[limits] pace`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pace {
    /// The share of the day's budget that may be spent at once (0 to 1);
    /// the rest is released evenly over the day.
    pub burst: Fraction,
}

/// A number from 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Fraction(pub f64);

impl TryFrom<f64> for Fraction {
    type Error = String;
    fn try_from(f: f64) -> Result<Self, String> {
        if (0.0..=1.0).contains(&f) { Ok(Fraction(f)) } else { Err(format!("{f} is not a fraction from 0 to 1")) }
    }
}

impl From<Fraction> for f64 {
    fn from(f: Fraction) -> f64 {
        f.0
    }
}

impl Default for Limits {
    fn default() -> Self {
        let n = |v| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        Limits {
            per_ip_rate: n(5),
            per_ip_burst: n(10),
            per_ip_daily: n(200),
            daily: 50.0,
            currency: "GBP".into(),
            reset_at: Spanned::new(0..0, "00:00".into()),
            timezone: Spanned::new(0..0, "UTC".into()),
            dry_run: false,
            alert_at: vec![0.9, 1.0],
            alert_webhook: Spanned::new(0..0, String::new()),
            deny_on_daily_cap: true,
            per_prefix_daily: None,
            pace: None,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// A Redis or Valkey shared by several hosts (`redis://`, `rediss://`):
    /// the global budget, per-IP daily counts (see `crate::shared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Or Redis Sentinel: the sentinels' URLs (`redis://host:26379`) …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sentinels: Vec<String>,
    /// … and the name of the service (master) they watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_service: Option<String>,
    /// When a billable call's reservation reaches the disk.
    #[serde(default)]
    pub durability: Durability,
    /// The key namespace in the shared Redis: keys are under `{kw:<site>}`.
    #[serde(default = "default_site")]
    pub site: String,
    /// The longest any one Redis call may take.
    #[serde(default = "default_store_timeout")]
    pub timeout: Span,
    /// Budget leases from the shared Redis.
    #[serde(default)]
    pub budget: StoreBudget,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            path: default_store_path(),
            redis_url: None,
            sentinels: Vec::new(),
            sentinel_service: None,
            durability: Durability::default(),
            site: default_site(),
            timeout: default_store_timeout(),
            budget: StoreBudget::default(),
        }
    }
}

/// `[store] durability`: named for what each choice risks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum Durability {
    /// Every reservation is on disk before its call leaves: a crash never
    /// overspends (the default).
    #[default]
    #[serde(rename = "immediate")]
    Immediate,
    /// Counters are saved once a second: a crash forgets up to a second of
    /// spend, per-IP counts and token calls, and so may overspend by that much.
    #[serde(rename = "lose-up-to-1s")]
    LoseUpTo1s,
}

impl Durability {
    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Immediate => "immediate",
            Durability::LoseUpTo1s => "lose-up-to-1s",
        }
    }
}

/// `[store.budget]`: how a host leases the global budget from Redis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreBudget {
    /// The most one lease request asks for (in the currency).
    #[serde(default = "default_max_lease")]
    pub max_lease: f64,
    /// Kept leased while Redis answers, to spend while it does not.
    #[serde(default)]
    pub standby_lease: f64,
    /// How often the standby lease is topped up (and idleness checked).
    #[serde(default = "default_lease_period")]
    pub lease_period: Span,
    /// A host that has spent nothing for this long hands back its unspent
    /// lease beyond the standby.
    #[serde(default = "default_idle_return")]
    pub idle_return: Span,
}

impl Default for StoreBudget {
    fn default() -> Self {
        StoreBudget {
            max_lease: default_max_lease(),
            standby_lease: 0.0,
            lease_period: default_lease_period(),
            idle_return: default_idle_return(),
        }
    }
}

fn default_idle_return() -> Span {
    Span(std::time::Duration::from_secs(60))
}

fn default_site() -> String {
    "default".into()
}

fn default_store_timeout() -> Span {
    Span(std::time::Duration::from_millis(50))
}

fn default_max_lease() -> f64 {
    0.5
}

fn default_lease_period() -> Span {
    Span(std::time::Duration::from_secs(10))
}

impl Store {
    /// What is wrong with the shared-store keys, if anything.
    fn validate(&self) -> Result<(), String> {
        let ok_amount = |a: f64| a.is_finite() && (0.0..=1e9).contains(&a);
        if !ok_amount(self.budget.max_lease) || !ok_amount(self.budget.standby_lease) {
            return Err("[store.budget] max_lease and standby_lease must be amounts between 0 and 1e9".into());
        }
        if self.site.is_empty() || !self.site.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("[store] site `{}` must be letters, digits, `-`, `_` or `.`", self.site));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > std::time::Duration::from_secs(5) {
            return Err("[store] timeout must be between 1ms and 5s".into());
        }
        self.validate_sentinels()?;
        let Some(url) = &self.redis_url else { return Ok(()) };
        if !["redis://", "rediss://", "unix://", "redis+unix://"].iter().any(|s| url.starts_with(s)) {
            return Err(format!(
                "[store] redis_url must start with redis://, rediss:// or unix:// (for Sentinel, set sentinels and sentinel_service), not `{}`",
                crate::shared::redact(url)
            ));
        }
        redis::Client::open(url.as_str())
            .map(drop)
            .map_err(|e| format!("[store] redis_url `{}`: {e}", crate::shared::redact(url)))
    }
}

impl Store {
    /// Whether a shared store is configured (a URL or Sentinel).
    pub fn shared(&self) -> bool {
        self.redis_url.is_some() || !self.sentinels.is_empty()
    }

    /// `sentinels` and `sentinel_service` go together, instead of `redis_url`.
    fn validate_sentinels(&self) -> Result<(), String> {
        match (self.sentinels.is_empty(), &self.sentinel_service, &self.redis_url) {
            (true, None, _) => return Ok(()),
            (false, Some(s), None) if !s.is_empty() => {}
            (_, _, Some(_)) => return Err("[store] sets redis_url or sentinels, not both".into()),
            _ => return Err("[store] sentinels and sentinel_service go together".into()),
        }
        for u in &self.sentinels {
            if !u.starts_with("redis://") && !u.starts_with("rediss://") {
                return Err(format!(
                    "[store] sentinels: `{}` must start with redis:// or rediss://",
                    crate::shared::redact(u)
                ));
            }
            redis::Client::open(u.as_str())
                .map(drop)
                .map_err(|e| format!("[store] sentinels: `{}`: {e}", crate::shared::redact(u)))?;
        }
        Ok(())
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from(paths::STORE_DIR)
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_metrics")]
    pub metrics: MetricsAddr,
}

/// `admin.metrics`: where `/metrics`, `/healthz` and `/readyz` are served,
/// or `""` for nowhere. Checked as it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

impl TryFrom<String> for MetricsAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.trim() {
            "" => Ok(MetricsAddr(None)),
            a => a.parse().map(|a| MetricsAddr(Some(a))).map_err(|_| {
                format!("admin.metrics `{a}` is not an address:port (e.g. \"127.0.0.1:9901\"; \"\" disables)")
            }),
        }
    }
}

impl From<MetricsAddr> for String {
    fn from(m: MetricsAddr) -> String {
        m.0.map(|a| a.to_string()).unwrap_or_default()
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `text` (the default) or `json` (one object per line, for shippers);
    /// `--log-format` overrides it.
    #[serde(default)]
    pub format: LogFormat,
    /// One line per answered request (target `keyward::access`): method,
    /// route, path without the query (parameter names only), status,
    /// outcome, client, time taken. Off by default.
    #[serde(default)]
    pub access: bool,
    /// At most this many access lines per second; the rest are counted and
    /// reported in one line (default 50).
    #[serde(default = "default_access_per_second")]
    pub access_per_second: std::num::NonZeroU32,
}

fn default_access_per_second() -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(50).expect("50 is not zero")
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Log {
    fn default() -> Self {
        Log { format: LogFormat::default(), access: false, access_per_second: default_access_per_second() }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin { socket: default_socket(), metrics: default_metrics() }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from(paths::ADMIN_SOCKET)
}

fn default_metrics() -> MetricsAddr {
    MetricsAddr(Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9901))))
}

impl Config {
    /// Read and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(path, &text)
    }

    /// Parse and validate `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, col) = line_col(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid { path: path.to_owned(), line, col, message }
        };
        let cfg: Config = toml::from_str(text).map_err(|e| invalid(e.span(), e.message().trim().to_owned()))?;
        let xdp = cfg.xdp.get_ref();
        let here = || Some(cfg.xdp.span());
        if xdp.interface.is_empty() || xdp.interface.len() > 15 || xdp.interface.contains('/') {
            return Err(invalid(here(), format!("[xdp] interface `{}` is not a valid interface name", xdp.interface)));
        }
        if xdp.ports.is_empty() {
            return Err(invalid(here(), "[xdp] ports must list at least one port".into()));
        }
        if xdp.aggregate.v6_prefix.0 > xdp.ipv6_prefix.0 {
            return Err(invalid(
                here(),
                format!(
                    "[xdp] aggregate.v6_prefix (/{}) must be as wide as or wider than ipv6_prefix (/{})",
                    xdp.aggregate.v6_prefix.0, xdp.ipv6_prefix.0
                ),
            ));
        }
        if let Some(m) = xdp.short_bucket() {
            return Err(invalid(here(), m));
        }
        cfg.store.validate().map_err(|m| invalid(None, m))?;
        let access = cfg.access.get_ref();
        let here = || Some(cfg.access.span());
        access.token.validate().map_err(|m| invalid(here(), format!("[access.token] {m}")))?;
        access.pow.validate().map_err(|m| invalid(here(), format!("[access] pow: {m}")))?;
        if access.require_token && access.token.keys_file.is_none() {
            return Err(invalid(here(), "[access] require_token needs [access.token] keys_file".into()));
        }
        if let Some(u) = &cfg.upstream
            && u.key_env.is_some() == u.key_file.is_some()
        {
            return Err(invalid(None, "[upstream] set exactly one of key_env and key_file".into()));
        }
        if cfg.listen.as_ref().is_some_and(|l| l.head_timeout.0.is_zero()) {
            return Err(invalid(None, "[listen] head_timeout must be more than 0s".into()));
        }
        if cfg.listen.is_some() && (cfg.upstream.is_none() || cfg.routes.is_empty()) {
            return Err(invalid(None, "[listen] needs [upstream] and at least one [[route]]".into()));
        }
        if let Some(l) = &cfg.listen {
            match (&l.tls_cert, &l.tls_key) {
                (Some(c), None) => return Err(invalid(Some(c.span()), "[listen] tls_cert needs tls_key".into())),
                (None, Some(k)) => return Err(invalid(Some(k.span()), "[listen] tls_key needs tls_cert".into())),
                _ => {}
            }
        }
        Ok(cfg)
    }

    /// The `[xdp]` section.
    pub fn xdp(&self) -> &Xdp {
        self.xdp.get_ref()
    }

    /// What is valid but probably not meant: printed by `check`, logged at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(l) = &self.listen {
            let port = l.addr.port();
            if !self.xdp().ports.iter().any(|p| p.get() == port) {
                w.push(format!(
                    "[listen] addr port {port} is not in [xdp] ports: floods to the forwarder are not dropped in XDP"
                ));
            }
        }
        w
    }

    /// The effective config as TOML (defaults filled in). Holds no secret:
    /// the key is never part of the config.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        // A webhook URL may carry a token (user info or query): not printed.
        let hook = shown.limits.get_mut().alert_webhook.get_mut();
        if hook.contains('@') || hook.contains('?') {
            *hook = "[redacted]".into();
        }
        // The Redis URL may carry a password.
        if let Some(u) = &mut shown.store.redis_url {
            *u = crate::shared::redact(u);
        }
        for u in &mut shown.store.sentinels {
            *u = crate::shared::redact(u);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

impl Xdp {
    /// A bucket that holds less than a clock step of the kernel's coarse
    /// clock (10 ms of its rate), which the program could not keep at its
    /// rate (`proxy_common::bucket::Params::covers_tick`).
    fn short_bucket(&self) -> Option<String> {
        let buckets = [
            ("", self.rate_pps, self.burst),
            ("aggregate.", self.aggregate.rate_pps, self.aggregate.burst),
            ("new_sources.", self.new_sources.rate_pps, self.new_sources.burst),
            ("untracked_syns.", self.untracked_syns.rate_pps, self.untracked_syns.burst),
        ];
        buckets.into_iter().find_map(|(name, rate, burst)| {
            (!proxy_common::bucket::Params::new(rate.get(), burst.get()).covers_tick()).then(|| {
                format!(
                    "[xdp] {name}burst ({burst}) must hold at least 10 ms of {name}rate_pps ({rate}): at least {}",
                    rate.get().div_ceil(100)
                )
            })
        })
    }

    /// The kernel's view of this section.
    pub fn kernel_config(&self) -> proxy_common::XdpConfig {
        use proxy_common::bucket::Params;
        proxy_common::XdpConfig {
            source: Params::new(self.rate_pps.get(), self.burst.get()),
            aggregate: Params::new(self.aggregate.rate_pps.get(), self.aggregate.burst.get()),
            admit: Params::new(self.new_sources.rate_pps.get(), self.new_sources.burst.get()),
            untracked: Params::new(self.untracked_syns.rate_pps.get(), self.untracked_syns.burst.get()),
            v6_prefix: u32::from(self.ipv6_prefix.0),
            agg_v4_prefix: u32::from(self.aggregate.v4_prefix.0),
            agg_v6_prefix: u32::from(self.aggregate.v6_prefix.0),
            flags: if self.dry_run { proxy_common::FLAG_DRY_RUN } else { 0 },
            table_mask: proxy_common::table::slots_for(self.table_size.get()).saturating_sub(1),
            reserved: 0,
            // The dataplane writes its own, chosen once per load.
            seed: 0,
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[xdp]
interface = "eth0"
ports = [443]
rate_pps = 200
burst = 400
"#;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("k.toml"), t)
    }

    fn err(t: &str) -> String {
        parse(t).unwrap_err().to_string()
    }

    #[test]
    fn the_shared_store_url_is_checked_and_never_printed_with_its_password() {
        let with = |store: &str| format!("{MINIMAL}\n[store]\n{store}\n");
        let c = parse(&with("redis_url = \"redis://:s3cret@10.0.0.5:6379/0\"\nsite = \"shop\"")).unwrap();
        assert_eq!(c.store.timeout.0, std::time::Duration::from_millis(50));
        assert_eq!(c.store.site, "shop");
        assert!(!c.to_toml().contains("s3cret"), "{}", c.to_toml());
        assert!(parse(&with("redis_url = \"rediss://h:6380\"")).is_ok());
        assert!(parse(&with("redis_url = \"unix:///run/redis.sock\"")).is_ok());
        let e = err(&with("redis_url = \"http://h:6379\""));
        assert!(e.starts_with("k.toml:") && e.contains("redis_url must start with"), "{e}");
        assert!(err(&with("redis_url = \"redis://h:notaport\"")).contains("redis_url"));
        assert!(err(&with("site = \"a b\"")).contains("site"));
        let c = parse(&with("sentinels = [\"redis://:pw@s1:26379\", \"redis://s2:26379\"]\nsentinel_service = \"m\""))
            .unwrap();
        assert!(c.store.shared() && !c.to_toml().contains(":pw@"), "{}", c.to_toml());
        assert!(err(&with("sentinels = [\"redis://s1:26379\"]")).contains("go together"));
        assert!(err(&with("sentinels = [\"s1:26379\"]\nsentinel_service = \"m\"")).contains("must start with"));
        let both = "redis_url = \"redis://h:6379\"\nsentinels = [\"redis://s1:26379\"]\nsentinel_service = \"m\"";
        assert!(err(&with(both)).contains("not both"));
        assert!(err(&with("timeout = \"0s\"")).contains("timeout"));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        let x = c.xdp();
        assert_eq!(x.mode, AttachMode::Auto);
        assert_eq!(x.ipv6_prefix.0, 64);
        assert_eq!(x.aggregate, Aggregate::default());
        assert!(!x.dry_run);
        assert_eq!(c.admin.socket, PathBuf::from(paths::ADMIN_SOCKET));
        let k = x.kernel_config();
        assert_eq!(k.source.interval_ns, 5_000_000);
        assert_eq!(k.source.tolerance_ns, 2_000_000_000);
        assert_eq!(k.agg_v4_prefix, 24);
        assert_eq!(k.flags, 0);
        assert_eq!(x.untracked_syns, UntrackedSyns::default());
        assert_eq!(k.untracked.interval_ns, 100_000);
        // 1048576 slots, already a power of two.
        assert_eq!(k.table_mask, 1_048_575);
    }

    #[test]
    fn contract_example_parses() {
        let t = include_str!("../../docs/keyward.example.toml");
        let c = parse(t).unwrap();
        assert_eq!(c.xdp().ports.len(), 1);
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.listen.unwrap().max_body, Size(16 * 1024));
    }

    #[test]
    fn effective_config_round_trips() {
        let c = parse(MINIMAL).unwrap();
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.xdp(), c.xdp());
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let e = err(&MINIMAL.replace("burst = 400", "burst = 400\nburts = 1"));
        assert!(e.starts_with("k.toml:7:1: unknown field `burts`"), "{e}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let e = err(&format!("{MINIMAL}\n[xpd]\n"));
        assert!(e.contains("unknown field `xpd`"), "{e}");
    }

    #[test]
    fn zero_rate_points_at_the_value() {
        let e = err(&MINIMAL.replace("rate_pps = 200", "rate_pps = 0"));
        assert!(e.starts_with("k.toml:5:12: "), "{e}");
        assert!(e.contains("nonzero"), "{e}");
    }

    #[test]
    fn port_zero_and_out_of_range() {
        assert!(err(&MINIMAL.replace("[443]", "[0]")).starts_with("k.toml:4:"));
        assert!(err(&MINIMAL.replace("[443]", "[70000]")).starts_with("k.toml:4:"));
        assert!(err(&MINIMAL.replace("[443]", "[]")).contains("at least one port"));
    }

    #[test]
    fn bad_prefixes() {
        let e = err(&format!("{MINIMAL}ipv6_prefix = 129\n"));
        assert!(e.contains("1 to 128"), "{e}");
        let e = err(&format!("{MINIMAL}aggregate = {{ v4_prefix = 33, v6_prefix = 48, rate_pps = 1, burst = 1 }}\n"));
        assert!(e.contains("1 to 32"), "{e}");
        let e = err(&format!("{MINIMAL}ipv6_prefix = 40\n"));
        assert!(e.contains("as wide as or wider"), "{e}");
        assert!(e.starts_with("k.toml:2:1:"), "{e}");
    }

    #[test]
    fn a_burst_shorter_than_a_clock_tick_is_refused() {
        let e = err(&MINIMAL.replace("burst = 400", "burst = 1\nrate_pps = 1000").replace("rate_pps = 200\n", ""));
        assert!(e.contains("burst (1) must hold at least 10 ms of rate_pps (1000): at least 10"), "{e}");
        let e = err(&format!("{MINIMAL}untracked_syns = {{ rate_pps = 100000, burst = 999 }}\n"));
        assert!(e.contains("untracked_syns.burst"), "{e}");
        assert!(e.starts_with("k.toml:2:1:"), "{e}");
    }

    #[test]
    fn bad_mode_and_interface() {
        let e = err(&format!("{MINIMAL}mode = \"turbo\"\n"));
        assert!(e.contains("unknown variant `turbo`"), "{e}");
        let e = err(&MINIMAL.replace("eth0", "a-very-long-interface-name"));
        assert!(e.contains("not a valid interface name"), "{e}");
    }

    #[test]
    fn missing_section_and_syntax_error() {
        assert!(err("").contains("missing field `xdp`"));
        let e = err(&MINIMAL.replace("burst = 400", "burst = = 400"));
        assert!(e.starts_with("k.toml:6:"), "{e}");
    }

    #[test]
    fn bad_units() {
        let base = format!("{MINIMAL}[listen]\naddr = \"127.0.0.1:8080\"\nmax_body = \"16KB\"\n");
        let e = err(&base);
        assert!(e.contains("unknown unit `KB`"), "{e}");
        let e = err(&format!("{MINIMAL}[listen]\naddr = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.1/8\"]\n"));
        assert!(e.contains("host bits set"), "{e}");
    }

    const FORWARDER: &str = r#"
[listen]
addr = "127.0.0.1:443"

[upstream]
base_url = "https://api.example.test"
key_env = "K"
inject = { query = "key" }

[[route]]
method = "GET"
path = "/a/{x}"
upstream_path = "/a/{x}"
"#;

    #[test]
    fn tls_cert_and_key_come_together_and_the_error_points_at_the_one_written() {
        let e = err(&format!("{MINIMAL}{}", FORWARDER.replace("addr =", "tls_cert = \"/c.pem\"\naddr =")));
        assert!(e.starts_with("k.toml:9:12: [listen] tls_cert needs tls_key"), "{e}");
        let e = err(&format!("{MINIMAL}{}", FORWARDER.replace("addr =", "tls_key = \"/k.pem\"\naddr =")));
        assert!(e.starts_with("k.toml:9:11: [listen] tls_key needs tls_cert"), "{e}");
    }

    #[test]
    fn metrics_address_is_checked_where_it_is_written() {
        let e = err(&format!("{MINIMAL}[admin]\nmetrics = \"localhost\"\n"));
        assert!(e.starts_with("k.toml:8:11:") && e.contains("not an address:port"), "{e}");
        let c = parse(&format!("{MINIMAL}[admin]\nmetrics = \"\"\n")).unwrap();
        assert_eq!(c.admin.metrics, MetricsAddr(None));
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.admin.metrics.0, Some("127.0.0.1:9901".parse().unwrap()));
        assert!(parse(&c.to_toml()).is_ok());
    }

    #[test]
    fn safe_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.access.get_ref().require_origin, "require_origin defaults to true");
        assert_eq!(c.limits.get_ref().timezone.get_ref(), "UTC");
        assert_eq!(c.log.format, LogFormat::Text);
        let c = parse(&format!("{MINIMAL}[log]\nformat = \"json\"\n")).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn an_unguarded_listen_port_is_a_warning() {
        let c = parse(&format!("{MINIMAL}{}", FORWARDER)).unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        let c = parse(&format!("{MINIMAL}{}", FORWARDER.replace(":443", ":8080"))).unwrap();
        assert_eq!(c.warnings().len(), 1);
        assert!(c.warnings()[0].contains("port 8080 is not in [xdp] ports"), "{:?}", c.warnings());
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
