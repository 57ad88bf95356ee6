//! The forwarder's policy: everything the config decides for HTTP, compiled
//! once (routes, origins, the schedule of the day, amounts in micro-units,
//! the upstream client, where the key goes) and swapped whole on reload.
//! This is the one place a config is checked beyond its syntax: `check`,
//! `run` and reload all go through [`Compiled::new`], and its errors carry
//! the position of the table or route that is wrong.

use std::{
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use http::HeaderName;
use rustls::sign::CertifiedKey;
use toml::Spanned;

use super::{
    access::Origins,
    conns::Bounds,
    day::Schedule,
    forward::{self, Upstream},
    geo::Countries,
    inject::{self, Injector, Placement, Secret},
    limit::{self, Limits},
    route::Routes,
};
use crate::{
    config::{Config, ConfigError, ForwardedHeader},
    units::Cidr,
};

/// What is wrong with a config, beyond its syntax.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("[upstream] is required when [listen] is set")]
    NoUpstream,
    #[error("no [[route]]: the forwarder would refuse everything")]
    NoRoutes,
    #[error("[[route]] {0}")]
    Route(String),
    #[error(transparent)]
    Key(#[from] inject::KeyError),
    #[error(transparent)]
    Upstream(#[from] forward::UpstreamError),
    #[error("[limits] {0}")]
    Limits(String),
    #[error("[upstream] client_ip_header `{0}` is not a header name")]
    Header(String),
    #[error(transparent)]
    Geo(#[from] super::geo::GeoError),
    #[error("[access.token] {0}")]
    TokenKeys(#[from] crate::token::keys::KeyFileError),
    #[error(
        "[access] allowed_origins is empty: any web page could spend the budget; list the sites that may call, or write allowed_origins = [\"*\"] to accept any Origin"
    )]
    NoOrigins,
    #[error("[listen] {0}")]
    Tls(#[from] super::tls::TlsError),
}

impl PolicyError {
    /// The table an error is about, when it is about one.
    fn table(&self) -> Option<&'static str> {
        match self {
            PolicyError::Key(_) | PolicyError::Upstream(_) | PolicyError::Header(_) => Some("[upstream]"),
            PolicyError::NoOrigins => Some("[access]"),
            _ => None,
        }
    }
}

/// Where the line that opens `table` (e.g. `[upstream]`) is in `text`.
fn table_span(text: &str, table: &str) -> Option<Range<usize>> {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        let rest = t.strip_prefix(table).map(str::trim);
        if rest.is_some_and(|r| r.is_empty() || r.starts_with('#')) {
            let start = at + (line.len() - t.len());
            return Some(start..start + table.len());
        }
        at += line.len();
    }
    None
}

/// Page tokens as configured: the key ring (loaded when the policy is
/// built, so a reload picks up a rotated file) and the settings.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    pub keys: std::sync::Arc<crate::token::keys::KeyRing>,
    pub cfg: crate::token::config::TokenConfig,
    pub pow: crate::token::config::PowConfig,
    /// Route calls need a valid token.
    pub required: bool,
}

/// A [`PolicyError`] and the byte range of the config it is about.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Located {
    pub error: PolicyError,
    pub span: Option<Range<usize>>,
}

trait At<T> {
    fn at(self, span: Option<Range<usize>>) -> Result<T, Located>;
}

impl<T, E: Into<PolicyError>> At<T> for Result<T, E> {
    fn at(self, span: Option<Range<usize>>) -> Result<T, Located> {
        self.map_err(|e| Located { error: e.into(), span })
    }
}

/// Everything but the key: what `check` can verify from anywhere.
#[derive(Debug)]
pub struct Compiled {
    routes: Routes,
    origins: Origins,
    countries: Option<Countries>,
    tokens: Option<TokenPolicy>,
    placement: Placement,
    upstream: Upstream,
    tls: Option<Arc<CertifiedKey>>,
    trusted: Vec<Cidr>,
    client_ip_from: ForwardedHeader,
    max_body: u64,
    conns: Bounds,
    v6_prefix: u8,
    client_ip_header: Option<HeaderName>,
    deny_on_daily_cap: bool,
    dry_run: bool,
    currency: String,
    webhook: Option<http::Uri>,
    limits: Limits,
    schedule: Schedule,
    access_log: Option<u32>,
}

/// Everything the config decides, with the key: what the forwarder runs.
#[derive(Debug)]
pub struct Policy {
    pub(super) routes: Routes,
    pub(super) origins: Origins,
    pub(super) countries: Option<Countries>,
    pub(super) tokens: Option<TokenPolicy>,
    pub(super) injector: Injector,
    pub(super) upstream: Upstream,
    /// The listener's certificate, when `[listen]` has one.
    pub tls: Option<Arc<CertifiedKey>>,
    pub(super) trusted: Vec<Cidr>,
    pub(super) client_ip_from: ForwardedHeader,
    pub(super) max_body: u64,
    pub(super) conns: Bounds,
    pub(super) v6_prefix: u8,
    pub(super) client_ip_header: Option<HeaderName>,
    pub(super) deny_on_daily_cap: bool,
    pub(super) dry_run: bool,
    pub(super) currency: String,
    pub(super) webhook: Option<http::Uri>,
    pub(super) limits: Limits,
    pub(super) schedule: Schedule,
    /// Access lines per second at most, when the access log is on.
    pub(super) access_log: Option<u32>,
}

fn span<T>(s: &Spanned<T>) -> Option<Range<usize>> {
    Some(s.span())
}

/// The limits and the schedule of the day, compiled from `[limits]`.
fn compile_limits(cfg: &Config) -> Result<(Limits, Schedule), Located> {
    let here = span(&cfg.limits);
    let l = cfg.limits.get_ref();
    let bad = |m: &str| Err(PolicyError::Limits(m.to_owned())).at(here.clone());
    let Some(budget) = limit::micros(l.daily) else { return bad("daily must be a non-negative amount") };
    let Some(alert_at) =
        l.alert_at.iter().map(|f| limit::micros(*f).filter(|m| *m <= limit::MICROS)).collect::<Option<Vec<_>>>()
    else {
        return bad("alert_at fractions must be between 0 and 1");
    };
    let schedule = Schedule::new(l.reset_at.get_ref(), l.timezone.get_ref()).map_err(|e| {
        let at = match e {
            super::day::ScheduleError::Time(_) => &l.reset_at,
            super::day::ScheduleError::Zone(_) => &l.timezone,
        };
        Located { error: PolicyError::Limits(e.to_string()), span: Some(at.span()).filter(|s| !s.is_empty()) }
    })?;
    let limits = Limits {
        rate: proxy_common::bucket::Params::new(l.per_ip_rate.get(), l.per_ip_burst.get()),
        burst: l.per_ip_burst.get(),
        per_ip_daily: l.per_ip_daily.get(),
        budget,
        alert_at,
        dry_run: l.dry_run,
        prefix: l.per_prefix_daily.as_ref().map(|p| limit::PrefixCap {
            v4: p.v4_prefix.0,
            v6: p.v6_prefix.0,
            calls: p.calls.get(),
        }),
        pace: l.pace.as_ref().map(|p| limit::Pace {
            burst: u64::try_from((u128::from(budget) * (p.burst.0 * 1e6).round() as u128) / 1_000_000)
                .unwrap_or(budget),
        }),
    };
    Ok((limits, schedule))
}

impl Compiled {
    /// Compile the HTTP side of `cfg`. Routes, limits and the schedule are
    /// checked whenever they are written, with or without `[listen]`; the
    /// rest only when the forwarder runs.
    pub fn new(cfg: &Config) -> Result<Option<Compiled>, Located> {
        let routes = Routes::compile(&cfg.routes)
            .map_err(|(i, e)| Located { error: PolicyError::Route(e), span: cfg.routes.get(i).map(Spanned::span) })?;
        let (limits, schedule) = compile_limits(cfg)?;
        let Some(listen) = cfg.listen.as_ref() else { return Ok(None) };
        let up = cfg.upstream.as_ref().ok_or(PolicyError::NoUpstream).at(None)?;
        if cfg.routes.is_empty() {
            return Err(PolicyError::NoRoutes).at(None);
        }
        let client_ip_header = match &up.client_ip_header {
            Some(h) => Some(HeaderName::from_bytes(h.as_bytes()).map_err(|_| PolicyError::Header(h.clone())).at(None)?),
            None => None,
        };
        let l = cfg.limits.get_ref();
        let webhook = match l.alert_webhook.get_ref().trim() {
            "" => None,
            u => Some(
                u.parse()
                    .map_err(|_| PolicyError::Limits(format!("alert_webhook `{u}` is not a URL")))
                    .at(span(&l.alert_webhook))?,
            ),
        };
        let access = cfg.access.get_ref();
        if access.allowed_origins.is_empty() {
            // At `[access]` when it is written, else about the file.
            return Err(PolicyError::NoOrigins).at(span(&cfg.access).filter(|s| !s.is_empty()));
        }
        let tls = match (&listen.tls_cert, &listen.tls_key) {
            (Some(c), Some(k)) => Some(super::tls::load(c.get_ref(), k.get_ref()).map_err(|e| {
                let at = if e.half == super::tls::Half::Cert { c.span() } else { k.span() };
                Located { error: e.into(), span: Some(at) }
            })?),
            _ => None,
        };
        Ok(Some(Compiled {
            routes,
            origins: Origins::new(&access.allowed_origins, access.require_origin),
            countries: Countries::load(&access.countries, access.geo_db.as_deref()).at(span(&cfg.access))?,
            tokens: match &access.token.keys_file {
                Some(f) => Some(TokenPolicy {
                    keys: std::sync::Arc::new(crate::token::keys::KeyRing::load(f).at(span(&cfg.access))?),
                    cfg: access.token.clone(),
                    pow: access.pow.clone(),
                    required: access.require_token,
                }),
                None => None,
            },
            placement: Placement::new(&up.inject).at(None)?,
            upstream: Upstream::new(up).at(None)?,
            tls,
            trusted: listen.trusted_proxies.clone(),
            client_ip_from: listen.client_ip_from,
            max_body: listen.max_body.0,
            conns: Bounds {
                max: listen.max_connections.get(),
                per_ip: listen.max_connections_per_ip.get(),
                head_timeout: listen.head_timeout.0,
            },
            v6_prefix: cfg.xdp().ipv6_prefix.0,
            client_ip_header,
            deny_on_daily_cap: l.deny_on_daily_cap,
            dry_run: l.dry_run,
            currency: l.currency.clone(),
            webhook,
            limits,
            schedule,
            access_log: cfg.log.access.then_some(cfg.log.access_per_second.get()),
        }))
    }

    /// The policy, with the key put in place.
    pub fn with_secret(self, secret: Secret) -> Result<Policy, PolicyError> {
        Ok(Policy {
            routes: self.routes,
            origins: self.origins,
            countries: self.countries,
            tokens: self.tokens,
            injector: Injector::new(self.placement, secret)?,
            upstream: self.upstream,
            tls: self.tls,
            trusted: self.trusted,
            client_ip_from: self.client_ip_from,
            max_body: self.max_body,
            conns: self.conns,
            v6_prefix: self.v6_prefix,
            client_ip_header: self.client_ip_header,
            deny_on_daily_cap: self.deny_on_daily_cap,
            dry_run: self.dry_run,
            currency: self.currency,
            webhook: self.webhook,
            access_log: self.access_log,
            limits: self.limits,
            schedule: self.schedule,
        })
    }
}

impl Policy {
    /// Compile `cfg` and load the key: the forwarder's policy, or `None`
    /// when `[listen]` is absent. Nothing changes on error.
    pub fn build(cfg: &Config) -> Result<Option<Policy>, Located> {
        let Some(c) = Compiled::new(cfg)? else { return Ok(None) };
        let up = cfg.upstream.as_ref().ok_or(PolicyError::NoUpstream).at(None)?;
        let secret = Secret::load(up).at(None)?;
        c.with_secret(secret).at(None).map(Some)
    }

    /// The currency amounts are in.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// Why a config could not be turned into a running policy.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The upstream key could not be loaded from where the config says.
    #[error("{path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: inject::KeyError,
    },
}

/// A config file read, parsed and compiled: where `check`, `run` and reload
/// all start.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The forwarder's policy without the key; `None` without `[listen]`.
    pub compiled: Option<Compiled>,
}

impl Loaded {
    /// Read, parse and compile the file at `path`.
    pub fn read(path: &Path) -> Result<Loaded, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Loaded::parse(path, &text)
    }

    /// Parse and compile `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
        let config = Config::parse(path, text)?;
        let compiled = Compiled::new(&config).map_err(|e| {
            // An unspanned error about one table points at its header.
            let span = e.span.or_else(|| e.error.table().and_then(|t| table_span(text, t)));
            ConfigError::at(path, text, span, e.error.to_string())
        })?;
        Ok(Loaded { config, compiled })
    }

    /// Load the key and finish the policy: what `run` and reload use.
    pub fn with_key(self, path: &Path) -> Result<(Config, Option<Policy>), LoadError> {
        let key = |source: inject::KeyError| LoadError::Key { path: path.to_owned(), source };
        let Some(c) = self.compiled else { return Ok((self.config, None)) };
        let Some(up) = self.config.upstream.as_ref() else {
            let message = PolicyError::NoUpstream.to_string();
            return Err(ConfigError::Unplaced { path: path.to_owned(), message }.into());
        };
        let secret = Secret::load(up).map_err(key)?;
        let policy = c.with_secret(secret).map_err(|e| match e {
            PolicyError::Key(k) => key(k),
            e => ConfigError::Unplaced { path: path.to_owned(), message: e.to_string() }.into(),
        })?;
        Ok((self.config, Some(policy)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"[xdp]
interface = "eth0"
ports = [443]
rate_pps = 200
burst = 400

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

[access]
allowed_origins = ["https://www.example.com"]

[limits]
daily = 10.0
"#;

    fn err(t: &str) -> String {
        Loaded::parse(Path::new("k.toml"), t).unwrap_err().to_string()
    }

    #[test]
    fn a_forwarder_without_an_origin_list_is_refused_unless_the_wildcard_is_written() {
        assert!(Loaded::parse(Path::new("k.toml"), BASE).is_ok());
        let e = err(&BASE.replace("allowed_origins = [\"https://www.example.com\"]", ""));
        assert!(e.starts_with("k.toml:20:1: [access] allowed_origins is empty"), "{e}");
        assert!(e.contains("allowed_origins = [\"*\"]"), "{e}");
        let e = err(&BASE.replace("[access]\nallowed_origins = [\"https://www.example.com\"]", ""));
        assert!(e.starts_with("k.toml: [access] allowed_origins is empty"), "{e}");
        assert!(Loaded::parse(Path::new("k.toml"), &BASE.replace("\"https://www.example.com\"", "\"*\"")).is_ok());
        // XDP only: no forwarder, no list needed.
        let xdp_only = BASE.split("[listen]").next().unwrap();
        assert!(Loaded::parse(Path::new("k.toml"), xdp_only).is_ok());
    }

    #[test]
    fn cross_key_errors_point_at_the_key() {
        let e = err(&BASE.replace("daily = 10.0", "daily = 10.0\ntimezone = \"Mars/Olympus\""));
        assert!(e.starts_with("k.toml:25:12: [limits] timezone `Mars/Olympus`"), "{e}");
        let e = err(&BASE.replace("daily = 10.0", "reset_at = \"25:00\"\ndaily = 10.0"));
        assert!(e.starts_with("k.toml:24:12: [limits] reset_at"), "{e}");
        let e = err(&BASE.replace("daily = 10.0", "daily = 10.0\nalert_webhook = \"not a url\""));
        assert!(e.starts_with("k.toml:25:17: [limits] alert_webhook"), "{e}");
    }

    #[test]
    fn an_unreadable_certificate_is_reported_at_its_key() {
        let e =
            err(&BASE.replace("addr =", "tls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\naddr ="));
        assert!(e.starts_with("k.toml:8:12: [listen] tls_cert /nonexistent/c.pem"), "{e}");
    }
}
