//! The forwarder's limits, all in integers and all against an injected
//! clock: the per-IP token bucket (the same GCRA as the kernel's, from
//! `proxy-common`), the per-IP daily count of billable calls, and the global
//! daily budget in micro-units of the currency. A call that may be billed
//! reserves its cost and its per-IP count before it is forwarded and gives
//! them back when the upstream answer is not billable, so concurrent calls
//! can never overshoot the budget. Each reservation and each refund gets the
//! next sequence number under the same lock that changes the counts, so a
//! snapshot of the counts names exactly what it includes (its watermark,
//! see [`crate::journal`]).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Mutex,
};

use proxy_common::bucket::Params;

use super::{
    day::{Schedule, Window},
    ipmap::IpMap,
};
use crate::units::Cidr;

/// Micro-units per unit of currency: amounts are kept exactly as integers.
pub const MICROS: u64 = 1_000_000;

/// Convert a configured amount (e.g. `0.02`) into micro-units.
pub fn micros(amount: f64) -> Option<u64> {
    (amount.is_finite() && (0.0..=1e12).contains(&amount)).then(|| (amount * MICROS as f64).round() as u64)
}

/// Format micro-units as an amount with up to 6 decimals, trailing zeros trimmed to 2.
pub fn format_amount(m: u64) -> String {
    let s = format!("{}.{:06}", m / MICROS, m % MICROS);
    let t = s.trim_end_matches('0');
    let dot = t.find('.').unwrap_or(t.len());
    if t.len() - dot < 3 { format!("{}.{:02}", m / MICROS, (m % MICROS) / 10_000) } else { t.to_owned() }
}

/// Limits as configured.
#[derive(Clone, Debug)]
pub struct Limits {
    pub rate: Params,
    pub burst: u32,
    pub per_ip_daily: u32,
    pub budget: u64,
    pub alert_at: Vec<u64>,
    pub dry_run: bool,
    /// Billable calls a day per client network (`None`: no prefix cap).
    pub prefix: Option<PrefixCap>,
    /// The budget released over the day (`None`: all of it at once).
    pub pace: Option<Pace>,
}

/// The per-prefix daily cap: addresses inside one IPv4 `/v4` or IPv6 `/v6`
/// share `calls` billable calls a day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixCap {
    pub v4: u8,
    pub v6: u8,
    pub calls: u32,
}

impl PrefixCap {
    /// The network `ip` is counted under.
    pub fn network(&self, ip: IpAddr) -> Cidr {
        Cidr::covering(ip, if ip.is_ipv4() { self.v4 } else { self.v6 })
    }
}

/// Budget pacing: `burst` micro-units may be spent at once; the rest of the
/// budget is released evenly over the day, so that by a fraction `f` of the
/// day at most `burst + f × (budget − burst)` is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    pub burst: u64,
}

impl Pace {
    /// What may have been spent by `now` in `window`.
    pub fn released(&self, budget: u64, window: &Window, now: i64) -> u64 {
        let burst = self.burst.min(budget);
        let len = u128::try_from((window.end - window.start).max(1)).unwrap_or(1);
        let elapsed = u128::try_from((now - window.start).clamp(0, window.end - window.start)).unwrap_or(0);
        let rest = u128::from(budget - burst) * elapsed / len;
        burst + u64::try_from(rest).unwrap_or(u64::MAX)
    }

    /// Seconds from `now` until `needed` is released (at least 1).
    pub fn wait_for(&self, budget: u64, window: &Window, now: i64, needed: u64) -> u64 {
        let burst = self.burst.min(budget);
        let rest = u128::from(budget - burst).max(1);
        let len = u128::try_from((window.end - window.start).max(1)).unwrap_or(1);
        let short = u128::from(needed.saturating_sub(burst));
        // Smallest elapsed time with rest × elapsed / len ≥ short.
        let at = (short * len).div_ceil(rest);
        let at = window.start.saturating_add(i64::try_from(at).unwrap_or(i64::MAX));
        u64::try_from(at.saturating_sub(now)).unwrap_or(0).max(1)
    }
}

/// Which limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the per-IP rate; retry after this many seconds.
    Rate { retry_after: u64 },
    /// The per-IP daily cap is used up; the window ends at `reset` (Unix s).
    Daily { reset: i64 },
    /// The client's network used up its daily cap.
    PrefixDaily { reset: i64, network: Cidr },
    /// The global budget is used up.
    Budget { reset: i64 },
    /// The budget is not used up but not yet released (pacing).
    Paced { retry_after: u64 },
    /// Shared budget: this host's leases are spent; lease more and retry.
    Unleased,
    /// Shared store: the call's page token has used its calls on the fleet.
    TokenUsed,
    /// The shared store does not answer and the client (or its network)
    /// used this host's share of its daily cap (the cap over the live hosts).
    DailyShare,
}

/// Today's counters, as persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DayCounts {
    pub day: u64,
    pub spent: u64,
    pub per_ip: IpMap<u32>,
    /// Indices into `alert_at` already raised today.
    pub alerted: HashSet<usize>,
    /// Sources already pushed into the XDP deny list today.
    pub escalated: HashSet<IpAddr>,
    /// Billable calls today per client network (prefix cap).
    pub per_prefix: HashMap<Cidr, u32>,
    /// Networks already pushed into the XDP deny list today.
    pub escalated_prefixes: HashSet<Cidr>,
    /// The sequence number of the last reservation or refund these counts
    /// include (the journal's watermark); it keeps growing across days.
    pub seq: u64,
}

/// What a reservation took; give it back unless billed.
#[derive(Debug)]
pub struct Reservation {
    ip: IpAddr,
    network: Option<Cidr>,
    cost: u64,
    day: u64,
    seq: u64,
}

impl Reservation {
    /// Its sequence number (unique, increasing, across days and restarts).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The day it was taken on.
    pub fn day(&self) -> u64 {
        self.day
    }

    /// The per-IP identity it was counted under.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The network it was counted under (prefix cap).
    pub fn network(&self) -> Option<Cidr> {
        self.network
    }

    /// What it holds of the budget, in micro-units.
    pub fn cost(&self) -> u64 {
        self.cost
    }
}

/// Per-IP state of the moment, for the RateLimit header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remaining {
    pub rate: u32,
    pub daily: u32,
    /// Calls left today for the client's network, with the prefix cap.
    pub prefix: Option<u32>,
    pub reset: i64,
}

struct Inner {
    tat: IpMap<u64>,
    counts: DayCounts,
    window: Window,
    dirty: bool,
    /// With a shared budget, what this host may spend today: the spend it
    /// started the day (or sharing) with plus the leases granted since.
    leased: Option<u64>,
}

/// This host's budget lease, for the shared store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub day: u64,
    pub tomorrow: u64,
    /// Today's reset boundary (Unix s).
    pub boundary: i64,
    pub leased: u64,
    pub spent: u64,
}

/// The limiter. Callers pass both clocks in, so tests drive time.
pub struct Limiter {
    /// Swapped whole on reload; read (an `Arc` bump) several times per request.
    limits: Mutex<std::sync::Arc<Limits>>,
    schedule: Mutex<Schedule>,
    inner: Mutex<Inner>,
}

/// How fast the budget is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Velocity {
    /// What may have been spent by now (pacing), in micro-units.
    pub released: u64,
    /// When the budget runs out at today's average spend rate (Unix s).
    pub runs_out: Option<i64>,
}

/// An alert threshold crossed by a charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub fraction: u64,
    pub spent: u64,
    pub budget: u64,
    pub day: u64,
}

impl Limiter {
    /// A limiter starting from `restored` counts when they are for the
    /// current day (a restart never resets today's counts).
    pub fn new(limits: Limits, schedule: Schedule, now_unix: i64, restored: Option<DayCounts>) -> Limiter {
        let window = schedule.window(now_unix);
        let counts = match restored {
            Some(c) if c.day == window.id() => c,
            // Another day's counts are dropped, not their sequence number.
            c => DayCounts { day: window.id(), seq: c.map_or(0, |c| c.seq), ..DayCounts::default() },
        };
        Limiter {
            limits: Mutex::new(std::sync::Arc::new(limits)),
            schedule: Mutex::new(schedule),
            inner: Mutex::new(Inner { tat: IpMap::new(), counts, window, dirty: true, leased: None }),
        }
    }

    /// Swap in new limits and schedule (reload); today's counts stay.
    pub fn reconfigure(&self, limits: Limits, schedule: Schedule) {
        *lock(&self.limits) = std::sync::Arc::new(limits);
        *lock(&self.schedule) = schedule;
    }

    /// The limits in force.
    pub fn limits(&self) -> std::sync::Arc<Limits> {
        lock(&self.limits).clone()
    }

    /// Move to the window containing `now` when it is past today's: the day
    /// only ever moves forward, so a clock stepped back keeps today's counts.
    fn roll(&self, inner: &mut Inner, now_unix: i64) {
        if now_unix >= inner.window.end {
            inner.window = lock(&self.schedule).window(now_unix);
            if inner.counts.day != inner.window.id() {
                inner.counts = DayCounts { day: inner.window.id(), seq: inner.counts.seq, ..DayCounts::default() };
                inner.dirty = true;
                inner.leased = inner.leased.map(|_| 0);
            }
        }
    }

    /// Charge one request to `ip`'s token bucket.
    pub fn rate(&self, ip: IpAddr, now_ns: u64) -> Result<(), Refusal> {
        let p = lock(&self.limits).rate;
        let mut inner = lock(&self.inner);
        let tat = inner.tat.get(&ip).copied().unwrap_or(0);
        match p.admit(tat, now_ns) {
            Some(t) => {
                inner.tat.insert(ip, t);
                Ok(())
            }
            None => {
                // Seconds until one token is back, rounded up.
                let wait = tat.saturating_add(p.interval_ns).saturating_sub(now_ns).saturating_sub(p.tolerance_ns);
                Err(Refusal::Rate { retry_after: wait.div_ceil(proxy_common::bucket::NS_PER_SEC).max(1) })
            }
        }
    }

    /// Whether `ip` may make a billable call of `cost` now (nothing is
    /// taken). An `exempt` (allow-listed) client meets only the budget.
    pub fn check_daily(&self, ip: IpAddr, cost: u64, now_unix: i64, exempt: bool) -> Result<(), Refusal> {
        let l = self.limits();
        let mut inner = lock(&self.inner);
        self.roll(&mut inner, now_unix);
        check(&l, &inner, ip, cost, exempt, now_unix).or_else(|r| if r == Refusal::Unleased { Ok(()) } else { Err(r) })
    }

    /// Take `cost` and one call from `ip`'s daily count, or refuse.
    pub fn reserve(&self, ip: IpAddr, cost: u64, now_unix: i64, exempt: bool) -> Result<Reservation, Refusal> {
        let l = self.limits();
        let mut inner = lock(&self.inner);
        self.roll(&mut inner, now_unix);
        let verdict = check(&l, &inner, ip, cost, exempt, now_unix);
        if let Err(e) = verdict
            && (!l.dry_run || e == Refusal::Unleased)
        {
            return Err(e);
        }
        let day = inner.counts.day;
        let network = if exempt { None } else { l.prefix.map(|p| p.network(ip)) };
        inner.counts.spent = inner.counts.spent.saturating_add(cost);
        *inner.counts.per_ip.entry(ip).or_insert(0) += 1;
        if let Some(n) = network {
            *inner.counts.per_prefix.entry(n).or_insert(0) += 1;
        }
        inner.counts.seq += 1;
        inner.dirty = true;
        Ok(Reservation { ip, network, cost, day, seq: inner.counts.seq })
    }

    /// The upstream answer was not billable (or never came): give it back.
    /// Returns the refund's own sequence number (for the journal).
    pub fn refund(&self, r: Reservation) -> u64 {
        let mut inner = lock(&self.inner);
        inner.counts.seq += 1;
        let seq = inner.counts.seq;
        inner.dirty = true;
        if inner.counts.day != r.day {
            return seq; // the day rolled over; the new day owes nothing
        }
        inner.counts.spent = inner.counts.spent.saturating_sub(r.cost);
        if let Some(n) = inner.counts.per_ip.get_mut(&r.ip) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = r.network.and_then(|net| inner.counts.per_prefix.get_mut(&net)) {
            *n = n.saturating_sub(1);
        }
        seq
    }

    /// The call was billed: keep the reservation, and return any alert
    /// thresholds crossed for the first time today.
    pub fn commit(&self, _r: Reservation) -> Vec<Alert> {
        let l = self.limits();
        let mut inner = lock(&self.inner);
        let mut out = Vec::new();
        for (i, threshold) in l.alert_at.iter().enumerate() {
            // threshold is a fraction of the budget in millionths.
            let at = (u128::from(l.budget) * u128::from(*threshold) / u128::from(MICROS)) as u64;
            if inner.counts.spent >= at && inner.counts.alerted.insert(i) {
                inner.dirty = true;
                out.push(Alert {
                    fraction: *threshold,
                    spent: inner.counts.spent,
                    budget: l.budget,
                    day: inner.counts.day,
                });
            }
        }
        out
    }

    /// Spend the budget from leases (a shared store): what is already spent
    /// today counts as leased, nothing more until `add_lease`.
    pub fn share_budget(&self, now_unix: i64) {
        let mut inner = lock(&self.inner);
        self.roll(&mut inner, now_unix);
        if inner.leased.is_none() {
            inner.leased = Some(inner.counts.spent);
        }
    }

    /// This host's lease of today's budget (`None` without a shared store).
    pub fn lease(&self, now_unix: i64) -> Option<LeaseState> {
        let mut inner = lock(&self.inner);
        self.roll(&mut inner, now_unix);
        let leased = inner.leased?;
        let tomorrow = lock(&self.schedule).window(inner.window.end).id();
        Some(LeaseState {
            day: inner.counts.day,
            tomorrow,
            boundary: inner.window.end,
            leased,
            spent: inner.counts.spent,
        })
    }

    /// Credit a lease granted for `day`; false (nothing credited) when that
    /// is not today's window.
    pub fn add_lease(&self, day: u64, amount: u64) -> bool {
        let mut inner = lock(&self.inner);
        match inner.leased {
            Some(l) if inner.counts.day == day => {
                inner.leased = Some(l.saturating_add(amount));
                true
            }
            _ => false,
        }
    }

    /// Give up the unspent part of today's lease beyond `keep` (an idle
    /// host): (day, amount handed back).
    pub fn release_lease_above(&self, keep: u64) -> Option<(u64, u64)> {
        let mut inner = lock(&self.inner);
        let spent = inner.counts.spent;
        let l = inner.leased.as_mut()?;
        let unused = l.saturating_sub(spent).saturating_sub(keep);
        *l -= unused;
        Some((inner.counts.day, unused))
    }

    /// Give up the unspent part of today's lease (shutdown): (day, amount).
    pub fn release_lease(&self) -> Option<(u64, u64)> {
        let mut inner = lock(&self.inner);
        let spent = inner.counts.spent;
        let l = inner.leased.as_mut()?;
        let unused = l.saturating_sub(spent);
        *l = spent;
        Some((inner.counts.day, unused))
    }

    /// The shared store says `ip` (or its network) is over its daily cap:
    /// remember it locally until the reset, so no more round trips are made.
    pub fn mark_over(&self, ip: IpAddr, network: Option<Cidr>) {
        let l = self.limits();
        let mut inner = lock(&self.inner);
        match network {
            Some(n) => {
                let cap = l.prefix.map_or(0, |p| p.calls);
                let c = inner.counts.per_prefix.entry(n).or_insert(0);
                *c = (*c).max(cap);
            }
            None => {
                let c = inner.counts.per_ip.entry(ip).or_insert(0);
                *c = (*c).max(l.per_ip_daily);
            }
        }
        inner.dirty = true;
    }

    /// Record that `ip` was pushed into the deny list today; false when it already was.
    pub fn mark_escalated(&self, ip: IpAddr) -> bool {
        let mut inner = lock(&self.inner);
        let new = inner.counts.escalated.insert(ip);
        inner.dirty |= new;
        new
    }

    /// Record that `network` was pushed into the deny list today; false when it already was.
    pub fn mark_escalated_prefix(&self, network: Cidr) -> bool {
        let mut inner = lock(&self.inner);
        let new = inner.counts.escalated_prefixes.insert(network);
        inner.dirty |= new;
        new
    }

    /// Per-IP quota left, for the RateLimit header.
    pub fn remaining(&self, ip: IpAddr, now_ns: u64, now_unix: i64) -> Remaining {
        let l = self.limits();
        let mut inner = lock(&self.inner);
        self.roll(&mut inner, now_unix);
        let tat = inner.tat.get(&ip).copied().unwrap_or(0);
        let ahead = tat.saturating_sub(now_ns);
        let used = ahead.div_ceil(l.rate.interval_ns.max(1));
        let rate = u64::from(l.burst).saturating_sub(used) as u32;
        let daily = l.per_ip_daily.saturating_sub(inner.counts.per_ip.get(&ip).copied().unwrap_or(0));
        let prefix =
            l.prefix.map(|p| p.calls.saturating_sub(inner.counts.per_prefix.get(&p.network(ip)).copied().unwrap_or(0)));
        Remaining { rate, daily, prefix, reset: inner.window.end }
    }

    /// Today's counts when they changed since the last call (for persistence).
    pub fn take_dirty(&self) -> Option<DayCounts> {
        let mut inner = lock(&self.inner);
        if !inner.dirty {
            return None;
        }
        inner.dirty = false;
        Some(inner.counts.clone())
    }

    /// Today's spend and window, without copying the per-client counts.
    pub fn spent(&self, now_unix: i64) -> (u64, Window) {
        let mut inner = lock(&self.inner);
        self.roll(&mut inner, now_unix);
        (inner.counts.spent, inner.window)
    }

    /// Today's counts and window.
    pub fn today(&self, now_unix: i64) -> (DayCounts, Window) {
        let mut inner = lock(&self.inner);
        self.roll(&mut inner, now_unix);
        (inner.counts.clone(), inner.window)
    }

    /// Spend velocity: what the pace has released by `now` (the budget without
    /// pacing), and when the budget runs out if spending goes on at today's
    /// average rate (`None` before any spend, or when it lasts the day).
    pub fn velocity(&self, now_unix: i64) -> Velocity {
        let l = self.limits();
        let (spent, w) = self.spent(now_unix);
        let released = l.pace.map_or(l.budget, |p| p.released(l.budget, &w, now_unix));
        let elapsed = (now_unix - w.start).max(1);
        let runs_out = (spent > 0)
            .then(|| {
                let secs = u128::from(l.budget) * u128::try_from(elapsed).unwrap_or(1) / u128::from(spent);
                w.start.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX))
            })
            .filter(|t| *t < w.end);
        Velocity { released, runs_out }
    }

    /// Forget full buckets (their state equals a fresh one), bounding memory.
    pub fn sweep(&self, now_ns: u64) {
        lock(&self.inner).tat.retain(|_, t| *t > now_ns);
    }
}

/// The daily limits, in order: the address's cap, its network's cap, the
/// budget, then the pace at which the budget is released.
fn check(l: &Limits, inner: &Inner, ip: IpAddr, cost: u64, exempt: bool, now: i64) -> Result<(), Refusal> {
    let reset = inner.window.end;
    if !exempt {
        if inner.counts.per_ip.get(&ip).copied().unwrap_or(0) >= l.per_ip_daily {
            return Err(Refusal::Daily { reset });
        }
        if let Some(p) = l.prefix {
            let network = p.network(ip);
            if inner.counts.per_prefix.get(&network).copied().unwrap_or(0) >= p.calls {
                return Err(Refusal::PrefixDaily { reset, network });
            }
        }
    }
    let after = inner.counts.spent.saturating_add(cost);
    if after > l.budget {
        return Err(Refusal::Budget { reset });
    }
    if inner.leased.is_some_and(|leased| after > leased) {
        return Err(Refusal::Unleased);
    }
    if let Some(pace) = l.pace
        && after > pace.released(l.budget, &inner.window, now)
    {
        return Err(Refusal::Paced { retry_after: pace.wait_for(l.budget, &inner.window, now, after) });
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const T0: i64 = 1_795_420_800; // 2026-11-23T08:00:00Z

    fn limiter(per_ip_daily: u32, budget: f64, dry_run: bool) -> Limiter {
        Limiter::new(
            Limits {
                rate: Params::new(5, 10),
                burst: 10,
                per_ip_daily,
                budget: micros(budget).unwrap(),
                alert_at: vec![900_000, 1_000_000],
                dry_run,
                prefix: None,
                pace: None,
            },
            Schedule::new("00:00", "UTC").unwrap(),
            T0,
            None,
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn with(f: impl FnOnce(&mut Limits)) -> Limiter {
        let l = limiter(1000, 10.0, false);
        let mut limits = (*l.limits()).clone();
        f(&mut limits);
        Limiter::new(limits, Schedule::new("00:00", "UTC").unwrap(), T0, None)
    }

    #[test]
    fn a_network_shares_one_daily_cap_and_refunds_give_it_back() {
        let l = with(|x| x.prefix = Some(PrefixCap { v4: 24, v6: 48, calls: 3 }));
        let mut held = Vec::new();
        for i in 1..=3 {
            held.push(l.reserve(ip(&format!("198.51.100.{i}")), 1, T0, false).unwrap());
        }
        let net: Cidr = "198.51.100.0/24".parse().unwrap();
        assert_eq!(
            l.reserve(ip("198.51.100.200"), 1, T0, false).unwrap_err(),
            Refusal::PrefixDaily { reset: T0 - 8 * 3600 + 86_400, network: net }
        );
        // Another /24 is not affected; an allow-listed (exempt) client neither.
        assert!(l.reserve(ip("198.51.101.1"), 1, T0, false).is_ok());
        assert!(l.reserve(ip("198.51.100.9"), 1, T0, true).is_ok());
        l.refund(held.pop().unwrap());
        assert!(l.reserve(ip("198.51.100.77"), 1, T0, false).is_ok());
        // IPv6: one /48 is one network, whatever the /64.
        let l6 = with(|x| x.prefix = Some(PrefixCap { v4: 24, v6: 48, calls: 1 }));
        assert!(l6.reserve(ip("2001:db8:1:aaaa::"), 1, T0, false).is_ok());
        assert!(matches!(l6.reserve(ip("2001:db8:1:bbbb::"), 1, T0, false), Err(Refusal::PrefixDaily { .. })));
        assert!(l6.reserve(ip("2001:db8:2::"), 1, T0, false).is_ok());
        assert_eq!(l.remaining(ip("198.51.100.5"), 0, T0).prefix, Some(0));
    }

    #[test]
    fn pacing_releases_the_budget_over_the_day_and_never_more() {
        // 10.00 a day, 2.00 at once, the rest evenly: at 08:00 (a third of
        // the day) 2 + 8/3 = 4.666666 may have been spent.
        let l = with(|x| x.pace = Some(Pace { burst: micros(2.0).unwrap() }));
        let day_start = T0 - 8 * 3600;
        let mut spent = 0;
        while l.reserve(ip("192.0.2.1"), 100_000, T0, true).is_ok() {
            spent += 100_000;
        }
        assert_eq!(spent, 4_600_000);
        let Err(Refusal::Paced { retry_after }) = l.check_daily(ip("192.0.2.1"), 100_000, T0, true) else {
            panic!("not paced")
        };
        // 4.7 is released 0.033334 later: 0.033334 / 8 × 86400 s ≈ 360 s.
        assert!((359..=361).contains(&retry_after), "{retry_after}");
        assert!(l.check_daily(ip("192.0.2.1"), 100_000, T0 + retry_after as i64, true).is_ok());
        // By the end of the day, all of it and not a micro-unit more.
        let end = day_start + 86_399;
        while l.reserve(ip("192.0.2.1"), 100_000, end, true).is_ok() {
            spent += 100_000;
        }
        assert_eq!(spent, micros(10.0).unwrap() - 100_000);
        assert!(l.reserve(ip("192.0.2.1"), 100_000, end + 1, true).is_ok(), "the next day is a new budget");
        let p = Pace { burst: 0 };
        let w = Window { day: jiff::civil::date(2026, 11, 23), start: 0, end: 100 };
        assert_eq!(p.released(1000, &w, 50), 500);
        assert_eq!(p.released(1000, &w, 500), 1000);
        assert_eq!(p.wait_for(1000, &w, 0, 501), 51);
    }

    #[test]
    fn amounts_are_exact() {
        assert_eq!(micros(0.02), Some(20_000));
        assert_eq!(micros(50.0), Some(50_000_000));
        assert_eq!(micros(-1.0), None);
        assert_eq!(micros(f64::NAN), None);
        // 0.1 + 0.2 in floats is 0.30000000000000004; in micros it is exact.
        assert_eq!(micros(0.1).unwrap() + micros(0.2).unwrap(), micros(0.3).unwrap());
        assert_eq!(format_amount(20_000), "0.02");
        assert_eq!(format_amount(50_000_000), "50.00");
        assert_eq!(format_amount(1_234_500), "1.2345");
    }

    #[test]
    fn rate_bucket_with_a_fake_clock() {
        let l = limiter(1000, 1000.0, false);
        let a = ip("192.0.2.1");
        let now = 100 * SEC;
        for _ in 0..10 {
            l.rate(a, now).unwrap();
        }
        let Err(Refusal::Rate { retry_after }) = l.rate(a, now) else { panic!("not limited") };
        assert_eq!(retry_after, 1);
        assert_eq!(l.remaining(a, now, T0).rate, 0);
        // 5 per second: after 0.2 s one more.
        l.rate(a, now + SEC / 5).unwrap();
        assert!(l.rate(a, now + SEC / 5).is_err());
        // Another IP is independent.
        l.rate(ip("192.0.2.2"), now).unwrap();
        l.sweep(now + 10 * SEC);
        assert_eq!(l.remaining(a, now + 10 * SEC, T0).rate, 10);
    }

    #[test]
    fn daily_cap_and_refunds() {
        let l = limiter(3, 1000.0, false);
        let a = ip("192.0.2.1");
        let r1 = l.reserve(a, 20_000, T0, false).unwrap();
        l.refund(r1); // not billable: does not count
        for _ in 0..3 {
            let r = l.reserve(a, 20_000, T0, false).unwrap();
            l.commit(r);
        }
        assert_eq!(l.check_daily(a, 20_000, T0, false), Err(Refusal::Daily { reset: T0 + 16 * 3600 }));
        assert!(matches!(l.reserve(a, 20_000, T0, false), Err(Refusal::Daily { .. })));
        assert_eq!(l.today(T0).0.spent, 60_000);
        assert!(l.check_daily(ip("192.0.2.9"), 20_000, T0, false).is_ok());
        // The next day starts afresh.
        let tomorrow = T0 + 16 * 3600;
        assert!(l.check_daily(a, 20_000, tomorrow, false).is_ok());
        assert_eq!(l.today(tomorrow).0.spent, 0);
    }

    #[test]
    fn budget_is_a_hard_stop_with_concurrent_reservations() {
        let l = limiter(1000, 0.05, false);
        let held: Vec<_> = (0..2).map(|i| l.reserve(ip(&format!("192.0.2.{i}")), 20_000, T0, false).unwrap()).collect();
        // 0.04 reserved; a third 0.02 would make 0.06 > 0.05.
        assert!(matches!(l.reserve(ip("192.0.2.9"), 20_000, T0, false), Err(Refusal::Budget { .. })));
        let mut it = held.into_iter();
        l.refund(it.next().unwrap());
        assert!(l.reserve(ip("192.0.2.9"), 20_000, T0, false).is_ok());
    }

    #[test]
    fn alerts_fire_once_per_threshold_per_day() {
        let l = limiter(1000, 0.10, false);
        let mut fired = Vec::new();
        for i in 0..5 {
            let r = l.reserve(ip(&format!("192.0.2.{i}")), 20_000, T0, false).unwrap();
            fired.extend(l.commit(r));
        }
        assert_eq!(fired.iter().map(|a| a.fraction).collect::<Vec<_>>(), vec![900_000, 1_000_000]);
        assert_eq!(fired[0].spent, 100_000);
        // Nothing more today.
        assert!(l.reserve(ip("192.0.2.9"), 1, T0, false).is_err());
    }

    #[test]
    fn a_clock_stepped_back_keeps_todays_counts() {
        let l = limiter(5, 10.0, false);
        let r = l.reserve(ip("192.0.2.1"), 20_000, T0, false).unwrap();
        l.commit(r);
        assert_eq!(l.today(T0 - 86_400).0.spent, 20_000);
    }

    #[test]
    fn dry_run_counts_but_refuses_nothing() {
        let l = limiter(1, 0.02, true);
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            let r = l.reserve(a, 20_000, T0, false).unwrap();
            l.commit(r);
        }
        assert_eq!(l.today(T0).0.spent, 60_000);
        assert_eq!(l.today(T0).0.per_ip[&a], 3);
    }

    #[test]
    fn reservations_and_refunds_are_numbered_across_days_and_restarts() {
        let l = limiter(5, 10.0, false);
        let a = ip("192.0.2.1");
        let r = l.reserve(a, 1, T0, false).unwrap();
        assert_eq!(r.seq(), 1);
        assert_eq!(l.refund(r), 2, "a refund takes its own number");
        let tomorrow = T0 + 86_400;
        assert_eq!(l.reserve(a, 1, tomorrow, false).unwrap().seq(), 3, "the day rolls, the numbers go on");
        let saved = l.take_dirty().unwrap();
        assert_eq!(saved.seq, 3, "a snapshot names the last number it includes");
        let limits = (*l.limits()).clone();
        let later = Limiter::new(limits, Schedule::new("00:00", "UTC").unwrap(), tomorrow + 86_400, Some(saved));
        assert_eq!(
            later.reserve(a, 1, tomorrow + 86_400, false).unwrap().seq(),
            4,
            "another day's counts, not numbers"
        );
    }

    #[test]
    fn restart_keeps_todays_counts_but_not_yesterdays() {
        let l = limiter(5, 10.0, false);
        let a = ip("192.0.2.1");
        let r = l.reserve(a, 20_000, T0, false).unwrap();
        l.commit(r);
        let saved = l.take_dirty().unwrap();
        assert!(l.take_dirty().is_none());
        let limits = (*l.limits()).clone();
        let again = Limiter::new(limits.clone(), Schedule::new("00:00", "UTC").unwrap(), T0 + 60, Some(saved.clone()));
        assert_eq!(again.today(T0 + 60).0.spent, 20_000);
        let next_day = Limiter::new(limits, Schedule::new("00:00", "UTC").unwrap(), T0 + 86_400, Some(saved));
        assert_eq!(next_day.today(T0 + 86_400).0.spent, 0);
    }
}
