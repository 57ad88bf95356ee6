//! The forwarder's hooks into the shared store (`crate::shared`): the
//! reserve phase leases budget when this host's lease is spent and takes the
//! client's shared daily count and its page token's call (one script round
//! trip); settle gives a non-billable call's count and token call back.
//! Without a shared store these are the limiter's own reserve and refund.

use std::sync::Arc;

use super::Call;
use crate::{
    proxy::{
        Forwarder,
        limit::{Refusal, Reservation},
    },
    shared::lease::{Counted, Taken, TokenCall},
};

impl Forwarder {
    /// Reserve the call's cost and per-IP counts, locally and in the store.
    pub(super) async fn take_limits(&self, call: &Call<'_>) -> Result<Reservation, Refusal> {
        let (ip, cost, now, exempt) = (call.key, call.route.cost, call.now, call.exempt);
        let Some(fleet) = self.fleet() else { return self.limiter.reserve(ip, cost, now, exempt) };
        let r = fleet.reserve(&self.limiter, ip, cost, now, exempt).await?;
        if exempt && call.token.is_none() { Ok(r) } else { self.take_shared_count(&fleet, call, r).await }
    }

    /// What `call` (reserved as `r`) takes from the shared counts.
    fn counted(&self, call: &Call<'_>, r: &Reservation) -> Counted {
        let l = self.limiter.limits();
        Counted {
            day: r.day(),
            boundary: self.limiter.spent(call.now).1.end,
            ip: call.key,
            cap: l.per_ip_daily,
            network: r.network().zip(l.prefix.map(|p| p.calls)),
            exempt: call.exempt,
            token: call.token.as_ref().map(|c| TokenCall {
                nonce: c.nonce.to_string(),
                max_calls: c.max_calls,
                expires_unix: c.expires_at,
            }),
        }
    }

    /// One script round trip: the client's (and its network's) shared daily
    /// count. An address over its cap is remembered locally until the reset;
    /// when the store does not answer, the local count (already taken) decides.
    async fn take_shared_count(
        &self,
        fleet: &crate::shared::lease::Fleet,
        call: &Call<'_>,
        r: Reservation,
    ) -> Result<Reservation, Refusal> {
        let counted = self.counted(call, &r);
        let reset = counted.boundary;
        match fleet.take(&counted).await {
            Ok(Taken::Yes) => Ok(r),
            Ok(_) if self.limiter.limits().dry_run => Ok(r),
            Ok(over) => {
                let net = r.network();
                self.limiter.refund(r);
                match (over, net) {
                    (Taken::TokenUsed, _) => Err(Refusal::TokenUsed),
                    (Taken::NetworkOver, Some(n)) => {
                        self.limiter.mark_over(call.key, Some(n));
                        Err(Refusal::PrefixDaily { reset, network: n })
                    }
                    _ => {
                        self.limiter.mark_over(call.key, None);
                        Err(Refusal::Daily { reset })
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "shared daily count unavailable; this host's share of the cap decides");
                self.within_share(fleet, call, r)
            }
        }
    }

    /// The store does not answer: this host admits a client (and its
    /// network) up to its share of the daily cap, `ceil(cap / live hosts)`,
    /// by its own counts (which already include this call). Never escalated.
    fn within_share(
        &self,
        fleet: &crate::shared::lease::Fleet,
        call: &Call<'_>,
        r: Reservation,
    ) -> Result<Reservation, Refusal> {
        let l = self.limiter.limits();
        if call.exempt || l.dry_run {
            return Ok(r);
        }
        let hosts = fleet.live_hosts();
        let rem = self.limiter.remaining(call.key, call.now_ns, call.now);
        let over_ip = l.per_ip_daily.saturating_sub(rem.daily) > l.per_ip_daily.div_ceil(hosts);
        let over_net =
            l.prefix.zip(rem.prefix).is_some_and(|(p, left)| p.calls.saturating_sub(left) > p.calls.div_ceil(hosts));
        if over_ip || over_net {
            self.limiter.refund(r);
            return Err(Refusal::DailyShare);
        }
        Ok(r)
    }

    /// A non-billable call: give its shared daily count and token call back
    /// (in the background).
    pub(super) fn untake_shared(&self, call: &Call<'_>, r: &Reservation) {
        let Some(fleet) = self.fleet() else { return };
        if call.exempt && call.token.is_none() {
            return;
        }
        let counted = self.counted(call, r);
        tokio::spawn(async move {
            if let Err(e) = fleet.untake(&counted).await {
                tracing::debug!(error = %e, "shared daily count not given back");
            }
        });
    }

    /// A redeemed proof-of-work solution, checked against the fleet: false
    /// when another host redeemed it first. When the store does not answer,
    /// this host's own record (already checked) decides.
    pub(crate) async fn spend_on_fleet(&self, nonce: &str, expires_unix: u64) -> bool {
        let Some(fleet) = self.fleet() else { return true };
        match fleet.spend_once(nonce, expires_unix).await {
            Ok(first) => first,
            Err(e) => {
                tracing::debug!(error = %e, "shared spent challenges unavailable; this host's record decides");
                true
            }
        }
    }

    /// The shared store, when configured.
    pub fn fleet(&self) -> Option<Arc<crate::shared::lease::Fleet>> {
        self.fleet.get().cloned()
    }
}
