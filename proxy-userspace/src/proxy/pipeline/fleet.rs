//! The forwarder's hooks into the shared store (`crate::shared`): the
//! reserve phase leases budget when this host's lease is spent and takes the
//! client's shared daily count; settle gives a non-billable call's count back.
//! Without a shared store these are the limiter's own reserve and refund.

use std::sync::Arc;

use super::Call;
use crate::{
    proxy::{
        Forwarder,
        limit::{Refusal, Reservation},
    },
    shared::lease::Taken,
};

impl Forwarder {
    /// Reserve the call's cost and per-IP counts, locally and in the store.
    pub(super) async fn take_limits(&self, call: &Call<'_>) -> Result<Reservation, Refusal> {
        let (ip, cost, now, exempt) = (call.key, call.route.cost, call.now, call.exempt);
        let Some(fleet) = self.fleet() else { return self.limiter.reserve(ip, cost, now, exempt) };
        let r = fleet.reserve(&self.limiter, ip, cost, now, exempt).await?;
        if exempt { Ok(r) } else { self.take_shared_count(&fleet, call, r).await }
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
        let l = self.limiter.limits();
        let reset = self.limiter.spent(call.now).1.end;
        let network = r.network().zip(l.prefix.map(|p| p.calls));
        match fleet.take(r.day(), reset, call.key, l.per_ip_daily, network).await {
            Ok(Taken::Yes) => Ok(r),
            Ok(_) if l.dry_run => Ok(r),
            Ok(over) => {
                let net = r.network();
                self.limiter.refund(r);
                match (over, net) {
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
                tracing::debug!(error = %e, "shared daily count unavailable; the local count decides");
                Ok(r)
            }
        }
    }

    /// A non-billable call: give its shared daily count back (in the background).
    pub(super) fn untake_shared(&self, call: &Call<'_>, r: &Reservation) {
        let Some(fleet) = self.fleet() else { return };
        if call.exempt {
            return;
        }
        let (day, ip, network) = (r.day(), call.key, r.network());
        tokio::spawn(async move {
            if let Err(e) = fleet.untake(day, ip, network).await {
                tracing::debug!(error = %e, "shared daily count not given back");
            }
        });
    }

    /// The shared store, when configured.
    pub fn fleet(&self) -> Option<Arc<crate::shared::lease::Fleet>> {
        self.fleet.get().cloned()
    }
}
