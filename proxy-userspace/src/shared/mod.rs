//! The shared store: several keyward hosts on one Redis or Valkey. This
//! module owns the connection (the `redis` crate's connection manager), the
//! bound on every call (a timeout, then a circuit breaker that stays open for
//! a second after three failures in a row, so a paused or dead Redis adds at
//! most one timeout to a few requests and nothing to the rest), the key
//! namespace `{kw:<site>}` and the Lua scripts. With Sentinel, the master is
//! asked of the sentinels at start and again after the breaker opens. What is shared and how is in
//! `lease` (the global budget, per-IP daily counts) and `lists` (the allow
//! and deny lists, escalations included). Scripts only, no
//! modules, so managed Redis and Valkey serve too.

pub mod lease;
pub mod lists;

use std::{
    sync::{
        Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::Histogram;
use redis::{
    aio::ConnectionManager,
    sentinel::{SentinelClient, SentinelServerType},
};

/// Failures in a row that open the breaker.
const BREAKER_FAILURES: u32 = 3;
/// How long an open breaker refuses calls without trying.
const BREAKER_OPEN: Duration = Duration::from_secs(1);

/// Why a shared-store call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the shared store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the shared store is unavailable (circuit open after repeated failures)")]
    Open,
    #[error("the shared store: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis's clock is past this host's reset boundary (the grant, for the
    /// next day, was handed back); the host's day rolls within a moment.
    #[error("the shared store's clock is past this host's reset boundary")]
    NextDay,
    /// The store restarted and lost what it held: nothing is granted for a
    /// moment while the hosts report their leases.
    #[error("the shared store restarted; budget leases resume once the hosts have reported theirs")]
    Rebuilding,
}

/// How to reach the shared store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The store's URL; with `sentinel`, only what logs and status show.
    pub url: String,
    /// Sentinel: the sentinels' URLs and the service (master) name. The
    /// master is asked of them at start and again whenever the breaker opens
    /// (a failover moved it).
    pub sentinel: Option<(Vec<String>, String)>,
    pub site: String,
    pub timeout: Duration,
}

/// The URL with any password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// One host's connection to the shared store.
pub struct Store {
    client: RwLock<redis::Client>,
    conn: RwLock<ConnectionManager>,
    /// With Sentinel: where to ask for the master again, and whether to.
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    resolve: AtomicBool,
    url: String,
    prefix: String,
    timeout: Duration,
    breaker: Mutex<Breaker>,
    up: AtomicBool,
    calls: AtomicU64,
    round_trip: Histogram,
}

impl Store {
    /// Connect and check the store answers (one clear error when it does not).
    pub async fn connect(cfg: &StoreConfig) -> Result<Store, StoreError> {
        // Connecting may take longer than one call: a TLS handshake, AUTH, asking a sentinel.
        let within = connect_within(cfg.timeout);
        let mut sentinel = match &cfg.sentinel {
            Some((nodes, service)) => {
                Some(SentinelClient::build(nodes.clone(), service.as_str(), None, SentinelServerType::Master)?)
            }
            None => None,
        };
        let client = match &mut sentinel {
            Some(s) => bounded(within, s.async_get_client()).await?,
            None => redis::Client::open(cfg.url.as_str())?,
        };
        let conn = manager(&client, cfg.timeout).await?;
        let store = Store {
            client: RwLock::new(client),
            conn: RwLock::new(conn),
            sentinel: sentinel.map(tokio::sync::Mutex::new),
            resolve: AtomicBool::new(false),
            url: redact(&cfg.url),
            prefix: format!("{{kw:{}}}", cfg.site),
            timeout: cfg.timeout,
            breaker: Mutex::new(Breaker { failures: 0, open_until: None }),
            up: AtomicBool::new(true),
            calls: AtomicU64::new(0),
            round_trip: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 12)),
        };
        let _: String = bounded(within, redis::cmd("PING").query_async(&mut store.connection())).await?;
        Ok(store)
    }

    fn connection(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// With Sentinel, after the breaker opened: ask the sentinels for the
    /// master again and connect to it (a failover may have moved it).
    async fn resolve_master(&self) -> Result<(), StoreError> {
        let Some(s) = &self.sentinel else { return Ok(()) };
        if !self.resolve.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let within = connect_within(self.timeout);
        let client = bounded(within, async { s.lock().await.async_get_client().await }).await?;
        let conn = manager(&client, self.timeout).await?;
        tracing::info!(master = ?client.get_connection_info().addr(), "the shared store's master, as the sentinels name it");
        *self.client.write().unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        *self.conn.write().unwrap_or_else(std::sync::PoisonError::into_inner) = conn;
        Ok(())
    }

    /// A key under this site's namespace.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the last call was answered (for metrics and status).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Calls made (round trips), for metrics and the benchmark.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The round-trip histogram (shared, for metrics).
    pub fn round_trip_histogram(&self) -> Histogram {
        self.round_trip.clone()
    }

    /// Run `script` with `keys` and `args`, bounded by the timeout and the breaker.
    pub async fn script<T: redis::FromRedisValue, A: redis::ToRedisArgs>(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[A],
    ) -> Result<T, StoreError> {
        self.admit()?;
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        if let Err(e) = self.resolve_master().await {
            self.resolve.store(true, Ordering::Relaxed);
            self.record(false);
            return Err(e);
        }
        let mut conn = self.connection();
        let started = Instant::now();
        self.calls.fetch_add(1, Ordering::Relaxed);
        let out = match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        self.round_trip.observe(started.elapsed().as_secs_f64());
        self.record(out.is_ok());
        out
    }

    /// A connection of its own for a blocking read (`XREAD BLOCK`), which
    /// would hold up every other call on the shared one: its replies may take
    /// `block` plus the call timeout.
    pub async fn blocking_connection(&self, block: Duration) -> Result<redis::aio::MultiplexedConnection, StoreError> {
        let within = (self.timeout * 20).max(Duration::from_secs(1));
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(within))
            .set_response_timeout(Some(block + self.timeout));
        let client = self.client.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        tokio::time::timeout(within, client.get_multiplexed_async_connection_with_config(&cfg))
            .await
            .map_err(|_| StoreError::Timeout(within))?
            .map_err(StoreError::Redis)
    }

    /// The call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn admit(&self) -> Result<(), StoreError> {
        let mut b = self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match b.open_until {
            Some(t) if Instant::now() < t => Err(StoreError::Open),
            Some(_) => {
                // Half open: this call tries; one more failure reopens.
                b.open_until = None;
                b.failures = BREAKER_FAILURES - 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            b.failures = 0;
        } else {
            b.failures += 1;
            if b.failures >= BREAKER_FAILURES {
                b.open_until = Some(Instant::now() + BREAKER_OPEN);
                self.resolve.store(true, Ordering::Relaxed);
            }
        }
        self.up.store(ok, Ordering::Relaxed);
    }
}

fn connect_within(timeout: Duration) -> Duration {
    (timeout * 20).max(Duration::from_secs(1))
}

/// `f`, or a timeout after `within`.
async fn bounded<T>(
    within: Duration,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(within, f).await.map_err(|_| StoreError::Timeout(within))?.map_err(StoreError::Redis)
}

/// A connection manager to `client`: bounded calls, few retries.
async fn manager(client: &redis::Client, timeout: Duration) -> Result<ConnectionManager, StoreError> {
    let within = connect_within(timeout);
    let mc = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(within))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    bounded(within, client.get_connection_manager_with_config(mc)).await
}

#[cfg(test)]
mod tests;
