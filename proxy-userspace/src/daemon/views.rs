//! The read-only views of the running daemon that `status` and `usage`
//! print: the config in force, the kernel's counters, the last sample of the
//! per-source table (never a walk), the lists, and the forwarder's day.

use crate::{
    admin::{AdminError, AggregateStatus, ClientUsage, ForwarderStatus, RequestCount, RouteUsage, Status, Usage},
    proxy::{Forwarder, limit},
    store::List,
};

use super::state::State;

impl State {
    /// `status`.
    pub fn status(&self) -> Result<Status, AdminError> {
        let x = self.config.xdp();
        let (iface, mode) = self.dp.attached().map_or(("-".to_owned(), "-"), |(i, a)| (i.to_owned(), a.as_str()));
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            interface: iface,
            attach_mode: mode.into(),
            ports: x.ports.iter().map(|p| p.get()).collect(),
            rate_pps: x.rate_pps.get(),
            burst: x.burst.get(),
            ipv6_prefix: x.ipv6_prefix.0,
            aggregate: AggregateStatus {
                v4_prefix: x.aggregate.v4_prefix.0,
                v6_prefix: x.aggregate.v6_prefix.0,
                rate_pps: x.aggregate.rate_pps.get(),
                burst: x.aggregate.burst.get(),
            },
            new_sources_pps: x.new_sources.rate_pps.get(),
            new_sources_burst: x.new_sources.burst.get(),
            untracked_syns_pps: x.untracked_syns.rate_pps.get(),
            untracked_syns_burst: x.untracked_syns.burst.get(),
            dry_run: x.dry_run,
            table_size: x.table_size.get(),
            tracked_sources: self.sample.tracked(),
            new_sources: self.reader.new_sources()?,
            allow_entries: self.in_force(List::Allow)?,
            deny_entries: self.in_force(List::Deny)?,
            allow_from_files: self.file_only(List::Allow)?,
            deny_from_files: self.file_only(List::Deny)?,
            counters: self.reader.counters()?,
            top_sources: self.sample.top(),
            sources_sampled_unix_ms: self.sample.taken_unix_ms(),
            forwarder: self.forwarder.as_ref().map(|f| self.forwarder_status(f)),
            run: self.run.clone(),
        })
    }

    /// `usage`: today's units, per route and per client.
    pub fn usage(&self, n: usize) -> Result<Usage, AdminError> {
        let f = self.forwarder.as_ref().ok_or(AdminError::NoForwarder)?;
        let st = self.forwarder_status(f);
        let (counts, _) = f.limiter().today(self.clock.unix_secs() as i64);
        let mut routes: Vec<RouteUsage> = Vec::new();
        for r in &st.requests {
            let i = match routes.iter().position(|x| x.route == r.route) {
                Some(i) => i,
                None => {
                    routes.push(RouteUsage { route: r.route.clone(), forwarded: 0, cache_hits: 0, refused: 0 });
                    routes.len() - 1
                }
            };
            let u = &mut routes[i];
            match r.outcome.as_str() {
                "forwarded" => u.forwarded += r.count,
                "cache_hit" => u.cache_hits += r.count,
                "preflight" => {}
                _ => u.refused += r.count,
            }
        }
        let mut top: Vec<ClientUsage> = counts
            .per_ip
            .iter()
            .filter(|(_, c)| **c > 0)
            .map(|(ip, c)| ClientUsage { client: ip.to_string(), calls: *c })
            .collect();
        top.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.client.cmp(&b.client)));
        top.truncate(n);
        let looked = st.cache_hits + st.cache_misses;
        Ok(Usage {
            day: st.day,
            currency: st.currency,
            spent: st.spent,
            budget: st.budget,
            reset_unix: st.reset_unix,
            routes,
            top_clients: top,
            cache_hits: st.cache_hits,
            cache_misses: st.cache_misses,
            cache_hit_ratio: if looked == 0 { 0.0 } else { st.cache_hits as f64 / looked as f64 },
        })
    }

    fn forwarder_status(&self, f: &Forwarder) -> ForwarderStatus {
        let now = self.clock.unix_secs() as i64;
        let (counts, window) = f.limiter().today(now);
        let limits = f.limiter().limits();
        let (hits, misses, _, _) = f.cache().stats();
        let velocity = f.limiter().velocity(now);
        let rows = |m: std::collections::HashMap<(String, crate::proxy::respond::Outcome), u64>| {
            let mut v: Vec<RequestCount> = m
                .into_iter()
                .map(|((route, o), count)| RequestCount { route, outcome: o.name().into(), count })
                .collect();
            v.sort_by(|a, b| (&a.route, &a.outcome).cmp(&(&b.route, &b.outcome)));
            v
        };
        ForwarderStatus {
            listen: self.config.listen.as_ref().map(|l| l.addr.to_string()).unwrap_or_default(),
            currency: f.currency(),
            spent: limit::format_amount(counts.spent),
            budget: limit::format_amount(limits.budget),
            spent_micros: counts.spent,
            budget_micros: limits.budget,
            saved_micros: self.saved_spend,
            reset_unix: window.end,
            day: counts.day,
            clients_today: counts.per_ip.len(),
            alerts_raised: counts.alerted.len(),
            cache_hits: hits,
            cache_misses: misses,
            requests: rows(f.counts().0),
            dry_run_would_refuse: rows(f.would_refuse()),
            released_micros: limits.pace.map(|_| velocity.released),
            runs_out_unix: velocity.runs_out,
            tokens: f.token_mode().0.to_owned(),
            pow: f.token_mode().1.to_owned(),
            live_tokens: f.token_allowance().len(),
            store: f.fleet().map(|fl| crate::admin::StoreStatus {
                url: fl.store.url().to_owned(),
                up: fl.store.is_up(),
                leased_micros: f.limiter().lease(now).map_or(0, |l| l.leased),
                fleet_granted_micros: fl.fleet_granted.load(std::sync::atomic::Ordering::Relaxed),
                round_trips: fl.store.calls(),
                live_hosts: fl.live_hosts(),
                restarts_seen: fl.restarts.load(std::sync::atomic::Ordering::Relaxed),
            }),
        }
    }
}
