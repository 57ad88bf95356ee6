//! What several hosts share through the store, and how exactly.
//!
//! The global budget is leased: a script grants `min(want, limit − granted)`
//! (at most half of what is left, in whole multiples of one call's cost, so
//! leases shrink to one call near the end) on a per-day key, the day being
//! chosen by Redis's own clock against this host's reset boundary. Each host
//! spends its leases with the limiter's exact reserve and refund; Σ grants ≤
//! limit and each host spends ≤ its grants, so the fleet never overshoots.
//! Unused leases are handed back at shutdown; a crashed host's lease is lost
//! (the fleet under-spends). While Redis answers, a host keeps a standby lease
//! to spend when it does not.
//!
//! Per-IP and per-network daily counts: one script round trip per billable
//! call (taken if under the cap, given back for non-billable answers). When
//! Redis does not answer, the host's own counts decide against its share of
//! the cap, `ceil(cap / live hosts)`, the live hosts being those whose
//! heartbeat (a sorted set, beaten every second or so) is recent.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use super::{Store, StoreError};
use crate::{
    proxy::limit::{LeaseState, Limiter, Refusal, Reservation},
    units::Cidr,
};

/// Lease requests one reservation may make before it gives up (others'
/// concurrent reservations may take each grant first).
const LEASE_TRIES: usize = 4;

/// `KEYS`: today's and tomorrow's granted totals, the store's marker.
/// `ARGV`: want, need (one call's cost), limit, boundary (Unix s), expiry of
/// today's key, of tomorrow's, the rebuild window (ms). Returns {granted
/// now, 1 when it is tomorrow by Redis's clock, the day's total granted, 1
/// while the store is being rebuilt}. A store without its marker has lost
/// what it held (a restart without persistence): nothing is granted until
/// the rebuild window has passed, while the hosts report their leases.
const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1])
local now_ms = now * 1000 + math.floor(tonumber(t[2]) / 1000)
local mark = redis.call('GET', KEYS[3])
if not mark then
  redis.call('SET', KEYS[3], now_ms .. ' ' .. (now_ms + tonumber(ARGV[7])))
  return {0, 0, 0, 1}
end
if now_ms < tonumber(string.match(mark, '(%d+)$')) then return {0, 0, 0, 1} end
local key, exp, which = KEYS[1], ARGV[5], 0
if now >= tonumber(ARGV[4]) then key, exp, which = KEYS[2], ARGV[6], 1 end
local granted = tonumber(redis.call('GET', key) or '0')
local want, need, left = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]) - granted
if need < 1 then need = 1 end
if left < need then return {0, which, granted, 0} end
local g = math.min(want, math.max(need, math.floor(left / 2)), left)
g = g - (g % need)
if g < need then g = need end
redis.call('INCRBY', key, g)
redis.call('EXPIREAT', key, exp)
return {g, which, granted + g, 0}
";

/// `KEYS[1]`: the store's marker, `<epoch> <rebuilt until>` (ms). Set (no
/// rebuild) when a host connects and finds none: a new store, or one whose
/// hosts are all starting. A marker is replicated, so a Sentinel failover
/// keeps the epoch; a restart that lost the data changes it.
const INIT: &str = r"
local t = redis.call('TIME')
redis.call('SET', KEYS[1], (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) .. ' 0', 'NX')
return 0
";

/// `KEYS[1]`: the store's marker. Its epoch, or nothing.
const EPOCH: &str = r"
local m = redis.call('GET', KEYS[1])
if not m then return false end
return string.match(m, '^(%d+)')
";

/// `KEYS`: today's granted total, the store's marker. `ARGV`: this host's
/// lease today, the key's expiry, the rebuild window (ms). After a store
/// restart: add what this host holds to the day's total (opening the
/// rebuild window if no lease request opened it yet).
const REPORT: &str = r"
if not redis.call('GET', KEYS[2]) then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', KEYS[2], now_ms .. ' ' .. (now_ms + tonumber(ARGV[3])))
end
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return v
";

/// `KEYS`: counts; `ARGV`: for each key, the amount to add and its expiry.
/// After a store restart, a host adds back what it counted.
const ADD_COUNTS: &str = r"
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  redis.call('EXPIREAT', KEYS[i], ARGV[2 * i])
end
return #KEYS
";

/// Counts added back per script call after a restart.
const ADD_CHUNK: usize = 256;

/// How long after a store restart nothing is granted while the hosts report
/// their leases (each host's list-stream tail notices the restart within a
/// second or so of the store coming back).
pub const REBUILD_WINDOW_MS: i64 = 3_000;

/// `KEYS[1]`: a day's granted total; `ARGV[1]`: the amount handed back.
const GIVE_BACK: &str = r"
local g = tonumber(redis.call('GET', KEYS[1]) or '0')
local a = math.min(g, tonumber(ARGV[1]))
if a > 0 then redis.call('DECRBY', KEYS[1], a) end
return a
";

/// `KEYS`: the address's count and its network's (`ARGV[4]` of them: none
/// for an allow-listed client, 1, or 2), then optionally a page token's
/// calls. `ARGV`: the address's cap, the network's, the counts' expiry, how
/// many counts, the token's `max_calls`, the token's expiry. 0 taken, 1 the
/// address is over its cap, 2 the network is, 3 the token is used up.
const TAKE: &str = r"
local n = tonumber(ARGV[4])
if n >= 1 and tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return 1 end
if n >= 2 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[2]) then return 2 end
if #KEYS > n and tonumber(redis.call('GET', KEYS[n + 1]) or '0') >= tonumber(ARGV[5]) then return 3 end
for i = 1, n do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIREAT', KEYS[i], ARGV[3])
end
if #KEYS > n then
  redis.call('INCR', KEYS[n + 1])
  redis.call('EXPIREAT', KEYS[n + 1], ARGV[6])
end
return 0
";

/// `KEYS[1]`: a challenge's spent flag; `ARGV[1]`: when it expires. 1 when
/// this call spent it, 0 when it was spent before.
const SPEND: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'EXAT', ARGV[1]) then return 1 end
return 0
";

/// `KEYS`: the counts to give one back to.
const REFUND: &str = r"
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
return 0
";

/// Keys outlive their day by half a day plus up to an hour of jitter, so
/// every TTL is within (0, 2 days] and keys do not all expire at once.
const KEEP_AFTER_DAY: i64 = 12 * 3600;

/// How leases are sized.
#[derive(Clone, Copy, Debug)]
pub struct LeasePolicy {
    /// The most one request asks for, in micro-units (plus the standby).
    pub max_lease: u64,
    /// Kept leased while the store answers.
    pub standby: u64,
}

/// The answer of a per-IP reservation in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Yes,
    AddressOver,
    NetworkOver,
    /// The page token has used its calls (on any host).
    TokenUsed,
}

/// A call of a page token's allowance, taken beside the daily counts.
#[derive(Clone, Debug)]
pub struct TokenCall {
    /// The token's nonce (its identity), as text.
    pub nonce: String,
    pub max_calls: u32,
    pub expires_unix: u64,
}

/// What one call takes from the shared counts.
#[derive(Clone, Debug)]
pub struct Counted {
    pub day: u64,
    /// The reset boundary (the counts expire after it).
    pub boundary: i64,
    pub ip: IpAddr,
    pub cap: u32,
    /// The client's network and its cap.
    pub network: Option<(Cidr, u32)>,
    /// Allow-listed: no daily counts, only the token's.
    pub exempt: bool,
    pub token: Option<TokenCall>,
}

/// A host's share of the fleet: the store, the lease policy, and figures.
pub struct Fleet {
    pub store: Store,
    policy: LeasePolicy,
    single: tokio::sync::Mutex<()>,
    lease: redis::Script,
    give_back: redis::Script,
    take: redis::Script,
    refund: redis::Script,
    spend: redis::Script,
    init: redis::Script,
    epoch: redis::Script,
    report: redis::Script,
    add_counts: redis::Script,
    jitter: i64,
    /// Micro-units granted to this host since it started.
    pub granted: AtomicU64,
    /// The fleet's total granted today, as last seen.
    pub fleet_granted: AtomicU64,
    /// Restarts of the store seen (its run id changed): what it held was lost.
    pub restarts: AtomicU64,
    /// Hosts seen alive in the last `LIVE_WITHIN_MS` (this one included), as last counted.
    live: AtomicU32,
    heartbeat: redis::Script,
}

/// A host counts as live while its last heartbeat is this recent.
const LIVE_WITHIN_MS: i64 = 10_000;

/// `KEYS[1]`: the hosts' heartbeats (a sorted set by time). `ARGV`: this
/// host's name, how recent a live host's heartbeat is (ms). Returns how
/// many hosts are live.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
";

impl Fleet {
    pub fn new(store: Store, policy: LeasePolicy) -> Fleet {
        let jitter = i64::from(rand::random::<u16>() % 3600);
        Fleet {
            store,
            policy,
            single: tokio::sync::Mutex::new(()),
            lease: redis::Script::new(LEASE),
            give_back: redis::Script::new(GIVE_BACK),
            take: redis::Script::new(TAKE),
            refund: redis::Script::new(REFUND),
            spend: redis::Script::new(SPEND),
            init: redis::Script::new(INIT),
            epoch: redis::Script::new(EPOCH),
            report: redis::Script::new(REPORT),
            add_counts: redis::Script::new(ADD_COUNTS),
            jitter,
            granted: AtomicU64::new(0),
            fleet_granted: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            live: AtomicU32::new(1),
            heartbeat: redis::Script::new(HEARTBEAT),
        }
    }

    /// Say this host (`me`) is alive and count the live hosts.
    pub async fn heartbeat(&self, me: &str) -> Result<u32, StoreError> {
        let key = self.store.key("hosts");
        let n: u32 = self.store.script(&self.heartbeat, &[key], &[me.to_owned(), LIVE_WITHIN_MS.to_string()]).await?;
        self.live.store(n.max(1), Ordering::Relaxed);
        Ok(n)
    }

    /// The live hosts as last counted (at least this one): what the per-IP
    /// caps are shared by while the store does not answer.
    pub fn live_hosts(&self) -> u32 {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// The store restarted and lost what it held.
    pub fn note_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// At start: mark the store as holding the fleet's state (a store found
    /// without the mark later has lost it).
    pub async fn init(&self) -> Result<(), StoreError> {
        let _: i64 = self.store.script(&self.init, &[self.marker()], &[] as &[i64]).await?;
        Ok(())
    }

    /// The store's epoch: it changes only when the store lost what it held
    /// (`None`: lost, and no host has noticed yet).
    pub async fn epoch(&self) -> Result<Option<String>, StoreError> {
        self.store.script(&self.epoch, &[self.marker()], &[] as &[i64]).await
    }

    /// After a store restart: add this host's lease of today (`s`) to the
    /// day's granted total, so the fleet's grants still cover every host's
    /// spend. Returns the day's total after it.
    pub async fn report(&self, s: LeaseState) -> Result<u64, StoreError> {
        let expire = s.boundary + KEEP_AFTER_DAY + self.jitter;
        let keys = [self.day_key(s.day), self.marker()];
        self.store.script(&self.report, &keys, &[signed(s.leased), expire, REBUILD_WINDOW_MS]).await
    }

    /// After a store restart: add back this host's own counts of today (per
    /// address, per network, expiring after `boundary`) and its page tokens'
    /// calls (nonce, calls, token expiry), so the shared counts are again the
    /// sum of every host's. Returns how many counts were added back.
    pub async fn report_counts(
        &self,
        day: u64,
        boundary: i64,
        per_ip: &[(IpAddr, u32)],
        per_net: &[(Cidr, u32)],
        tokens: &[(String, u32, u64)],
    ) -> Result<usize, StoreError> {
        let exp = boundary + KEEP_AFTER_DAY + self.jitter;
        let mut all: Vec<(String, i64, i64)> = Vec::new();
        all.extend(per_ip.iter().map(|(ip, n)| (self.store.key(&format!("ip:{day}:{ip}")), i64::from(*n), exp)));
        all.extend(per_net.iter().map(|(c, n)| (self.store.key(&format!("net:{day}:{c}")), i64::from(*n), exp)));
        all.extend(
            tokens.iter().map(|(t, n, e)| (self.store.key(&format!("tok:{t}")), i64::from(*n), signed(*e) + 60)),
        );
        for chunk in all.chunks(ADD_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|c| c.0.clone()).collect();
            let args: Vec<i64> = chunk.iter().flat_map(|c| [c.1, c.2]).collect();
            let _: i64 = self.store.script(&self.add_counts, &keys, &args).await?;
        }
        Ok(all.len())
    }

    fn marker(&self) -> String {
        self.store.key("alive")
    }

    /// The lease policy.
    pub fn policy(&self) -> LeasePolicy {
        self.policy
    }

    fn day_key(&self, day: u64) -> String {
        self.store.key(&format!("budget:{day}:granted"))
    }

    /// Ask for more budget (single-flight: a caller that waited for
    /// another's request uses its grant). `state` reads the limiter's lease
    /// (`None` when the day rolled), `add` credits a grant to a day, which
    /// refuses grants for another day than the limiter's (they are handed back).
    /// Returns the amount granted; 0 when the fleet's budget is used up;
    /// `NextDay` when the grant was for a day this host is not in yet.
    /// Grants come in multiples of `unit` (one call's cost); nothing is asked
    /// when this host already has `enough` unspent.
    pub async fn top_up(
        &self,
        unit: u64,
        enough: u64,
        limit: u64,
        state: impl Fn() -> LeaseState,
        add: impl Fn(u64, u64) -> bool,
    ) -> Result<u64, StoreError> {
        let _one = self.single.lock().await;
        let s = state();
        let headroom = s.leased.saturating_sub(s.spent);
        if headroom >= enough {
            return Ok(headroom);
        }
        let unit = unit.max(1);
        let want = (self.policy.max_lease / unit).max(1) * unit + self.policy.standby.saturating_sub(headroom);
        let keys = [self.day_key(s.day), self.day_key(s.tomorrow), self.marker()];
        let expire = s.boundary + KEEP_AFTER_DAY + self.jitter;
        let args = [signed(want), signed(unit), signed(limit), s.boundary, expire, expire + 86_400, REBUILD_WINDOW_MS];
        let (grant, which, total, rebuilding): (u64, u8, u64, u8) =
            self.store.script(&self.lease, &keys, &args).await?;
        if rebuilding == 1 {
            return Err(StoreError::Rebuilding);
        }
        let day = if which == 1 { s.tomorrow } else { s.day };
        self.fleet_granted.store(total, Ordering::Relaxed);
        if grant > 0 && !add(day, grant) {
            self.hand_back(day, grant).await?;
            return Err(StoreError::NextDay);
        }
        self.granted.fetch_add(grant, Ordering::Relaxed);
        Ok(grant)
    }

    /// The limiter's reserve, leasing more when this host's lease is spent:
    /// `Budget` when the fleet's budget is used up, `Unleased` (503
    /// budget-unavailable) when the store does not answer.
    pub async fn reserve(
        &self,
        limiter: &Limiter,
        ip: IpAddr,
        cost: u64,
        now: i64,
        exempt: bool,
    ) -> Result<Reservation, Refusal> {
        let mut tries = 0;
        loop {
            match limiter.reserve(ip, cost, now, exempt) {
                Err(Refusal::Unleased) if tries < LEASE_TRIES => {
                    tries += 1;
                    self.lease_more(limiter, cost, now).await?;
                }
                other => return other,
            }
        }
    }

    async fn lease_more(&self, limiter: &Limiter, cost: u64, now: i64) -> Result<(), Refusal> {
        let budget = limiter.limits().budget;
        let fallback = LeaseState { day: 0, tomorrow: 0, boundary: 0, leased: 0, spent: 0 };
        let state = || limiter.lease(now).unwrap_or(fallback);
        match self.top_up(cost, cost, budget, state, |d, a| limiter.add_lease(d, a)).await {
            Ok(0) => Err(Refusal::Budget { reset: limiter.spent(now).1.end }),
            Ok(_) => Ok(()),
            Err(StoreError::Rebuilding) => Err(Refusal::Unleased),
            Err(e) => {
                tracing::warn!(error = %e, "cannot lease budget from the shared store; this host's leases are spent");
                Err(Refusal::Unleased)
            }
        }
    }

    /// Hand `amount` of `day`'s grants back (nothing if the day's key is gone).
    pub async fn hand_back(&self, day: u64, amount: u64) -> Result<u64, StoreError> {
        if amount == 0 {
            return Ok(0);
        }
        self.store.script(&self.give_back, &[self.day_key(day)], &[signed(amount)]).await
    }

    fn count_keys(&self, c: &Counted) -> Vec<String> {
        let mut keys = Vec::new();
        if !c.exempt {
            keys.push(self.store.key(&format!("ip:{}:{}", c.day, c.ip)));
            if let Some((n, _)) = c.network {
                keys.push(self.store.key(&format!("net:{}:{n}", c.day)));
            }
        }
        keys
    }

    /// Take one call from the client's (and its network's) shared daily
    /// count and from its page token's calls, all or none.
    pub async fn take(&self, c: &Counted) -> Result<Taken, StoreError> {
        let mut keys = self.count_keys(c);
        let n = keys.len();
        if let Some(t) = &c.token {
            keys.push(self.store.key(&format!("tok:{}", t.nonce)));
        }
        if keys.is_empty() {
            return Ok(Taken::Yes);
        }
        let (max, texp) = c.token.as_ref().map_or((0, 0), |t| (t.max_calls, t.expires_unix));
        let args = [
            i64::from(c.cap),
            i64::from(c.network.map_or(0, |n| n.1)),
            c.boundary + KEEP_AFTER_DAY + self.jitter,
            signed(n as u64),
            i64::from(max),
            signed(texp) + 60,
        ];
        let v: u8 = self.store.script(&self.take, &keys, &args).await?;
        Ok(match v {
            0 => Taken::Yes,
            1 => Taken::AddressOver,
            2 => Taken::NetworkOver,
            _ => Taken::TokenUsed,
        })
    }

    /// Give back a call taken by `take` (a non-billable answer).
    pub async fn untake(&self, c: &Counted) -> Result<(), StoreError> {
        let mut keys = self.count_keys(c);
        if let Some(t) = &c.token {
            keys.push(self.store.key(&format!("tok:{}", t.nonce)));
        }
        if keys.is_empty() {
            return Ok(());
        }
        let _: i64 = self.store.script(&self.refund, &keys, &[] as &[i64]).await?;
        Ok(())
    }

    /// Mark a proof-of-work challenge (by nonce) spent on the fleet until
    /// `expires_unix`: true for exactly one caller on any host.
    pub async fn spend_once(&self, nonce: &str, expires_unix: u64) -> Result<bool, StoreError> {
        let key = self.store.key(&format!("chal:{nonce}"));
        let v: u8 = self.store.script(&self.spend, &[key], &[signed(expires_unix.max(1))]).await?;
        Ok(v == 1)
    }
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
