//! The key-injecting forwarder. For each HTTP call the kernel admitted it
//! decides whether the paid API may be called on the site owner's money,
//! and answers every refusal locally as problem+json. The request path is
//! [`pipeline`], a short sequence of named phases; the policy ([`policy`])
//! is compiled from the config and swapped whole on reload while the
//! counters ([`limit`], [`counts`]) and the [`cache`] live on.
//!
//! Map: `pipeline` (the phases) · `policy` (config → compiled policy, the one
//! home of validation) · `access` (origins, client address) · `route`
//! (allow-list, parameters) · `limit` (per-IP bucket, daily caps, budget) ·
//! `durable` (reservations on disk before the call leaves) ·
//! `day` (the daily window) · `cache` · `inject` (the key in) ·
//! `scrub` (the key out, in every encoding) · `forward` (the upstream client) · `respond` (outcomes as
//! answers) · `counts` (request counting) · `access_log` (the optional line per request) · `alert` (budget alerts) ·
//! `server`, `conns` and `tls` (the listener and its bounds).

pub mod access;
pub mod access_log;
pub mod alert;
pub mod cache;
pub mod conns;
pub mod counts;
pub mod day;
mod durable;
pub mod endpoint;
pub mod forward;
pub mod geo;
pub mod inject;
pub mod ipmap;
pub mod limit;
pub mod metrics;
mod pipeline;
pub mod policy;
pub mod respond;
pub mod route;
pub mod scrub;
pub mod server;
pub mod tls;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
};

use tokio::sync::mpsc;
use tracing::{debug, info};

use self::{cache::Cache, counts::Counts, limit::Limiter, respond::Outcome};
pub use self::{
    policy::{Compiled, Located, Policy, PolicyError},
    server::serve,
};
use crate::{clock::Clock, units::Cidr};

/// Default bound on cached answers.
const CACHE_BYTES: usize = 64 << 20;

/// A request to push a client into the XDP deny list until `until_unix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    pub cidr: Cidr,
    pub until_unix: u64,
}

/// The forwarder.
pub struct Forwarder {
    policy: RwLock<Arc<Policy>>,
    limiter: Limiter,
    cache: Cache,
    clock: Arc<dyn Clock>,
    escalate: mpsc::UnboundedSender<Escalation>,
    counts: Counts,
    /// The operator's allow list (kept in step by the daemon): these clients
    /// bypass the per-IP rate and daily cap, never the global budget.
    allow: RwLock<Vec<Cidr>>,
    upstream_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Last second each outcome was logged at info (log sampling).
    logged: Mutex<HashMap<Outcome, u64>>,
    /// The access log's per-second ceiling.
    access_lines: access_log::Sampler,
    /// Token counts and spent challenges (outlive reloads).
    token_state: endpoint::TokenState,
    /// Tokens as the current policy sets them up.
    token_rt: RwLock<Option<Arc<endpoint::TokenRuntime>>>,
    /// Open client connections and refusals (outlive reloads).
    conns: Arc<conns::Conns>,
    /// The shared store (several hosts), set once at start.
    fleet: std::sync::OnceLock<Arc<crate::shared::lease::Fleet>>,
    /// Today's spend when last seen to change, and when (monotonic ns): idle lease return.
    last_spend: Mutex<(u64, u64)>,
    /// The listener's certificate, replaced on reload.
    certs: Option<Arc<tls::Certs>>,
    /// Where reservations are made durable before their call leaves
    /// (`None`: only the periodic snapshot, `durability = "lose-up-to-1s"`).
    journal: Option<crate::journal::Journal>,
}

/// What the caller gets back to wire the forwarder into the daemon.
pub struct Handles {
    pub forwarder: Arc<Forwarder>,
    pub escalations: mpsc::UnboundedReceiver<Escalation>,
}

impl Forwarder {
    /// A forwarder for `policy`, starting from today's persisted counts.
    #[expect(clippy::new_ret_no_self, reason = "the forwarder comes with the receiving end of its escalations")]
    pub fn new(policy: Policy, clock: Arc<dyn Clock>, restored: Option<limit::DayCounts>) -> Handles {
        Forwarder::with_journal(policy, clock, restored, None)
    }

    /// Like [`Forwarder::new`], each reservation made durable in `journal`
    /// before its call leaves.
    pub fn with_journal(
        policy: Policy,
        clock: Arc<dyn Clock>,
        restored: Option<limit::DayCounts>,
        journal: Option<crate::journal::Journal>,
    ) -> Handles {
        let now = clock.unix_secs() as i64;
        let limiter = Limiter::new(policy.limits.clone(), policy.schedule.clone(), now, restored);
        let (tx, rx) = mpsc::unbounded_channel();
        let token_state = endpoint::TokenState::default();
        let token_rt = RwLock::new(endpoint::TokenRuntime::build(&policy, &token_state, clock.clone()));
        let policy_tls = policy.tls.clone().map(tls::Certs::new);
        let forwarder = Arc::new(Forwarder {
            policy: RwLock::new(Arc::new(policy)),
            limiter,
            cache: Cache::new(CACHE_BYTES),
            clock,
            escalate: tx,
            counts: Counts::default(),
            allow: RwLock::new(Vec::new()),
            upstream_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 12),
            ),
            logged: Mutex::new(HashMap::new()),
            access_lines: access_log::Sampler::default(),
            token_state,
            token_rt,
            conns: Arc::default(),
            fleet: std::sync::OnceLock::new(),
            last_spend: Mutex::new((0, 0)),
            certs: policy_tls,
            journal,
        });
        Handles { forwarder, escalations: rx }
    }

    /// Share the budget and daily counts through `fleet` (once, at start):
    /// from now on the budget is spent from leases.
    pub fn set_fleet(&self, fleet: Arc<crate::shared::lease::Fleet>) {
        self.limiter.share_budget(self.clock.unix_secs() as i64);
        let _ = self.fleet.set(fleet);
    }

    /// Keep the standby lease topped up (called every lease period while the
    /// store answers).
    pub async fn keep_standby(&self) {
        let Some(fleet) = self.fleet() else { return };
        let now = self.clock.unix_secs() as i64;
        let standby = fleet.policy().standby;
        let unit = self.policy().routes.all().iter().map(|r| r.cost).max().unwrap_or(1).max(1);
        let limits = self.limiter.limits();
        let Some(s) = self.limiter.lease(now) else { return };
        if standby == 0 || s.leased.saturating_sub(s.spent) >= standby {
            return;
        }
        let state = || self.limiter.lease(now).unwrap_or(s);
        let enough = standby;
        if let Err(e) = fleet.top_up(unit, enough, limits.budget, state, |d, a| self.limiter.add_lease(d, a)).await {
            tracing::debug!(error = %e, "standby lease not topped up");
        }
    }

    /// After a store restart (persistence off, so it lost what it held):
    /// report this host's lease of today again, so the fleet's grants still
    /// cover what every host may spend, and add back its own per-address,
    /// per-network and page-token counts. Say what was rebuilt.
    pub async fn report_lease(&self) -> Result<(), crate::shared::StoreError> {
        let Some(fleet) = self.fleet() else { return Ok(()) };
        let now = self.clock.unix_secs() as i64;
        let Some(s) = self.limiter.lease(now) else { return Ok(()) };
        let total = fleet.report(s).await?;
        let (counts, window) = self.limiter.today(now);
        let per_ip: Vec<_> = counts.per_ip.iter().map(|(ip, n)| (ip, *n)).collect();
        let per_net: Vec<_> = counts.per_prefix.iter().map(|(c, n)| (*c, *n)).collect();
        let tokens: Vec<_> = self
            .token_allowance()
            .snapshot(self.clock.unix_secs())
            .into_iter()
            .map(|e| (e.nonce.to_string(), e.used, e.expires_unix))
            .collect();
        let added = fleet.report_counts(counts.day, window.end, &per_ip, &per_net, &tokens).await?;
        tracing::warn!(
            leased_micros = s.leased,
            spent_micros = s.spent,
            fleet_granted_micros = total,
            counts_added_back = added,
            "the shared store restarted: this host's lease of today is reported again (no lease is granted for {} ms while the hosts report theirs; a host that does not report in time is not counted) and its own {added} per-address, per-network and page-token counts added back (the counts of a host that does not come back are lost)",
            crate::shared::lease::REBUILD_WINDOW_MS
        );
        Ok(())
    }

    /// A host that has spent nothing for `after` hands its unspent lease
    /// beyond the standby back (called every lease period).
    pub async fn return_idle(&self, after: std::time::Duration) {
        let Some(fleet) = self.fleet() else { return };
        let (now, ns) = (self.clock.unix_secs() as i64, self.clock.monotonic_ns());
        let Some(s) = self.limiter.lease(now) else { return };
        {
            let mut last = self.last_spend.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let after_ns = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
            if last.0 != s.spent || last.1 == 0 {
                *last = (s.spent, ns);
                return;
            }
            if ns.saturating_sub(last.1) < after_ns {
                return;
            }
            last.1 = ns;
        }
        if let Some((day, unused)) = self.limiter.release_lease_above(fleet.policy().standby)
            && unused > 0
        {
            match fleet.hand_back(day, unused).await {
                Ok(n) => {
                    tracing::info!(returned_micros = n, "idle: unspent budget lease handed back to the shared store")
                }
                Err(e) => tracing::warn!(error = %e, unused, "idle lease not handed back (the fleet under-spends it)"),
            }
        }
    }

    /// Hand this host's unspent lease back to the fleet (clean shutdown).
    pub async fn release_lease(&self) {
        let Some(fleet) = self.fleet() else { return };
        if let Some((day, unused)) = self.limiter.release_lease() {
            match fleet.hand_back(day, unused).await {
                Ok(n) => tracing::info!(returned = n, "unspent budget lease handed back to the shared store"),
                Err(e) => {
                    tracing::warn!(error = %e, unused, "unspent budget lease not handed back (the fleet under-spends)")
                }
            }
        }
    }

    /// Swap in a new policy (reload). Counters and cache stay.
    pub fn reconfigure(&self, p: Policy) {
        if let (Some(c), Some(k)) = (&self.certs, &p.tls) {
            c.set(k.clone());
        }
        self.limiter.reconfigure(p.limits.clone(), p.schedule.clone());
        let rt = endpoint::TokenRuntime::build(&p, &self.token_state, self.clock.clone());
        *self.token_rt.write().unwrap_or_else(std::sync::PoisonError::into_inner) = rt;
        *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(p);
    }

    /// The TLS acceptor for the listener (`None`: plain HTTP). It presents
    /// whatever certificate the last reload loaded.
    pub fn tls_acceptor(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, rustls::Error> {
        self.certs.as_ref().map(tls::Certs::acceptor).transpose()
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn token_runtime(&self) -> Option<Arc<endpoint::TokenRuntime>> {
        self.token_rt.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Page tokens (`off`, `optional`, `required`) and proof-of-work mode
    /// (`off`, `suspicious`, `always`), for status.
    pub fn token_mode(&self) -> (&'static str, &'static str) {
        use crate::token::config::PowMode;
        match self.token_runtime() {
            None => ("off", "off"),
            Some(rt) => (
                if rt.required { "required" } else { "optional" },
                match rt.pow.config().mode {
                    PowMode::Off => "off",
                    PowMode::Suspicious => "suspicious",
                    PowMode::Always => "always",
                },
            ),
        }
    }

    /// Per-token call counts (for persistence and status).
    pub fn token_allowance(&self) -> &Arc<crate::token::allowance::Allowance> {
        &self.token_state.allowance
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

    /// Open connections and refusals by reason (for metrics and tests).
    pub fn conns(&self) -> &Arc<conns::Conns> {
        &self.conns
    }

    /// The cache (for status).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The currency of amounts.
    pub fn currency(&self) -> String {
        self.policy().currency.clone()
    }

    /// Requests by (route, outcome) and upstream answers by (route, code).
    pub fn counts(&self) -> counts::Snapshot {
        self.counts.snapshot()
    }

    /// Dry run's would-be refusals by route and outcome.
    pub fn would_refuse(&self) -> HashMap<(String, Outcome), u64> {
        self.counts.would_refuse_snapshot()
    }

    /// The upstream latency histogram (shared, for metrics).
    pub fn upstream_histogram(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.upstream_seconds.clone()
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
}
