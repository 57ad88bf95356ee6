//! What the admin verbs, the reload signal and the once-a-second tick act
//! on, behind one lock: the config in force, the data plane's lists and
//! config maps, the store, and the forwarder's policy. Every method here is
//! quick (no walk of the per-source table: that is sampled elsewhere), so a
//! verb, the counter flush and an escalation never wait long on each other.
//! The read-only views (status, usage) are in `views`.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tracing::{info, warn};

use crate::{
    admin::{AdminError, ListShow},
    clock::Clock,
    config::Config,
    dataplane::{Dataplane, maps::MapReader, sample::SourceSample},
    metrics::ListGauges,
    proxy::{Escalation, Forwarder},
    store::{Entry, List, ListStore},
    units::Cidr,
};

/// The daemon's mutable state. Dropping it saves today's counters one last
/// time, then detaches XDP and removes the pins (the [`Dataplane`]'s drop).
pub struct State {
    pub(super) config_path: PathBuf,
    pub(super) config: Config,
    pub(super) dp: Dataplane,
    pub(super) store: Arc<dyn ListStore>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) forwarder: Option<Arc<Forwarder>>,
    /// Spend of the last counters written to the store.
    pub(super) saved_spend: u64,
    pub(super) lists: ListGauges,
    pub(super) reader: Arc<MapReader>,
    pub(super) sample: Arc<SourceSample>,
}

/// Lock the state; a panic elsewhere does not take the daemon down with it.
pub fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// The entries of `list` still in force.
    pub fn list_show(&self, list: List) -> Result<ListShow, AdminError> {
        let now = self.clock.unix_secs();
        let entries =
            self.store.entries(list)?.into_iter().filter(|e| e.expires_unix.is_none_or(|t| t > now)).collect();
        Ok(ListShow { list, entries })
    }

    /// Put `cidr` into the kernel's trie and the store (both or neither).
    /// `lasting` applies to deny entries.
    pub fn list_add(&mut self, list: List, cidr: Cidr, lasting: Option<Duration>) -> Result<Entry, AdminError> {
        if list == List::Allow && lasting.is_some() {
            return Err(AdminError::BadRequest("allow entries do not expire; --for applies to deny".into()));
        }
        let ms = lasting.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        // Rounded up: an entry may outlive its duration by under a second,
        // never fall short of it.
        let expires_unix = ms.map(|ms| self.clock.unix_millis().saturating_add(ms).div_ceil(1000));
        let expires_ns = ms.map_or(0, |ms| self.clock.monotonic_ns().saturating_add(ms.saturating_mul(1_000_000)));
        self.dp.list_insert(list, &cidr, expires_ns)?;
        let entry = Entry { cidr, expires_unix };
        if let Err(e) = self.store.put(list, &entry) {
            // Keep kernel and store in step: undo the map insert.
            let _ = self.dp.list_remove(list, &cidr);
            return Err(e.into());
        }
        info!(list = ?list, %cidr, expires_unix, "list entry added");
        self.lists_changed(list);
        Ok(entry)
    }

    /// Take `cidr` out of the store and the kernel's trie.
    pub fn list_remove(&mut self, list: List, cidr: Cidr) -> Result<(), AdminError> {
        let was = self.store.remove(list, &cidr)?;
        self.dp.list_remove(list, &cidr)?;
        if !was {
            return Err(AdminError::NotFound { list, cidr });
        }
        info!(list = ?list, %cidr, "list entry removed");
        self.lists_changed(list);
        Ok(())
    }

    /// Re-read the config file. Refused (and nothing changes) when it is
    /// invalid or changes what cannot change live.
    pub fn reload(&mut self) -> Result<(), AdminError> {
        let path = &self.config_path;
        let (new, policy) = crate::proxy::policy::Loaded::read(path)?
            .with_key(path)
            .map_err(|source| AdminError::Policy { path: path.clone(), source })?;
        if let Some(what) = needs_restart(&self.config, &new) {
            return Err(AdminError::NeedsRestart { path: path.clone(), what });
        }
        // Build everything before changing anything: a refused reload leaves
        // both halves as they were.
        let policy = if self.forwarder.is_some() { policy } else { None };
        self.dp.apply(new.xdp())?;
        if let (Some(f), Some(p)) = (&self.forwarder, policy) {
            f.reconfigure(p);
        }
        info!(path = %self.config_path.display(), "config reloaded");
        self.config = new;
        Ok(())
    }

    /// Push a client that exhausted its daily cap into the deny list until
    /// the reset, persisted like any other deny entry. Never a trusted proxy
    /// or an allow-listed source: denying those would cut off everyone
    /// behind them.
    pub fn escalate(&mut self, e: &Escalation) {
        let ip = e.cidr.addr();
        let trusted = self.config.listen.as_ref().is_some_and(|l| l.trusted_proxies.iter().any(|c| c.contains(ip)));
        let allowed = self.store.entries(List::Allow).is_ok_and(|v| v.iter().any(|a| a.cidr.contains(ip)));
        if trusted || allowed {
            warn!(cidr = %e.cidr, trusted, allowed, "not escalating a trusted or allow-listed source into the deny list");
            return;
        }
        let lasting = Duration::from_secs(e.until_unix.saturating_sub(self.clock.unix_secs()).max(1));
        if let Err(err) = self.list_add(List::Deny, e.cidr, Some(lasting)) {
            warn!(cidr = %e.cidr, error = %err, "escalating into the XDP deny list");
        }
    }

    /// Persist the forwarder's counters when they changed, and forget
    /// per-IP token buckets that have refilled (bounding their memory).
    pub fn flush(&mut self) {
        if let Some(f) = &self.forwarder {
            f.limiter().sweep(self.clock.monotonic_ns());
            if let Some(c) = f.limiter().take_dirty() {
                match self.store.save_day(&c) {
                    Ok(()) => self.saved_spend = c.spent,
                    Err(e) => warn!(error = %e, "saving today's counters"),
                }
            }
            if let Some(t) = f.token_allowance().take_dirty(self.clock.unix_secs())
                && let Err(e) = self.store.save_tokens(&t)
            {
                warn!(error = %e, "saving page-token call counts");
            }
        }
    }

    /// Drop deny entries whose expiry has passed from the store and the map
    /// (the kernel already ignores them; this keeps the tries small).
    pub fn gc(&mut self) {
        let now = self.clock.unix_secs();
        let Ok(entries) = self.store.entries(List::Deny) else {
            return;
        };
        let mut expired = false;
        for e in entries.iter().filter(|e| e.expires_unix.is_some_and(|t| t <= now)) {
            if let Err(err) = self.store.remove(List::Deny, &e.cidr) {
                warn!(cidr = %e.cidr, error = %err, "expiring deny entry");
                continue;
            }
            let _ = self.dp.list_remove(List::Deny, &e.cidr);
            info!(cidr = %e.cidr, "deny entry expired");
            expired = true;
        }
        if expired {
            self.lists_changed(List::Deny);
        }
    }

    /// Load every stored list entry into the maps.
    pub fn restore_lists(&mut self) -> Result<(), AdminError> {
        self.gc();
        for list in [List::Allow, List::Deny] {
            let entries = self.store.entries(list)?;
            for e in &entries {
                let ns = e.expires_unix.map_or(0, |t| self.clock.monotonic_at(t));
                self.dp.list_insert(list, &e.cidr, ns)?;
            }
            info!(list = ?list, entries = entries.len(), "restored list");
            self.lists_changed(list);
        }
        Ok(())
    }

    /// Entries of `list` in force now.
    pub(super) fn in_force(&self, list: List) -> Result<usize, AdminError> {
        let now = self.clock.unix_secs();
        Ok(self.store.entries(list)?.iter().filter(|e| e.expires_unix.is_none_or(|t| t > now)).count())
    }

    /// After `list` changed: its gauge, and the forwarder's copy of the allow list.
    fn lists_changed(&self, list: List) {
        let gauge = match list {
            List::Allow => &self.lists.allow,
            List::Deny => &self.lists.deny,
        };
        match self.in_force(list) {
            Ok(n) => {
                gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            Err(e) => warn!(error = %e, list = ?list, "counting list entries"),
        }
        if list == List::Allow
            && let Some(f) = &self.forwarder
        {
            let cidrs =
                self.store.entries(List::Allow).map(|v| v.into_iter().map(|e| e.cidr).collect()).unwrap_or_default();
            f.set_allow(cidrs);
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The first setting in `new` that differs from `old` and needs a restart.
fn needs_restart(old: &Config, new: &Config) -> Option<&'static str> {
    let (x, y) = (old.xdp(), new.xdp());
    let listen = |c: &Config| c.listen.as_ref().map(|l| (l.addr, l.tls_cert.clone(), l.tls_key.clone()));
    [
        ("xdp.interface", x.interface != y.interface),
        ("xdp.mode", x.mode != y.mode),
        ("xdp.table_size", x.table_size != y.table_size),
        ("store.path", old.store.path != new.store.path),
        ("admin.socket", old.admin.socket != new.admin.socket),
        ("listen", listen(old) != listen(new)),
    ]
    .into_iter()
    .find_map(|(what, changed)| changed.then_some(what))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(xdp: &str) -> Config {
        let text = format!(
            "[xdp]\ninterface = \"eth0\"\nports = [443]\n{xdp}\n[store]\npath = \"/var/lib/kw\"\n[admin]\nsocket = \"/run/kw.sock\"\n"
        );
        Config::parse(Path::new("keyward.toml"), &text).unwrap()
    }

    #[test]
    fn live_settings_reload_and_the_rest_need_a_restart() {
        let old = config("rate_pps = 10\nburst = 20");
        assert_eq!(needs_restart(&old, &config("rate_pps = 50\nburst = 100")), None);
        assert_eq!(
            needs_restart(&old, &config("rate_pps = 10\nburst = 20\ntable_size = 8192")),
            Some("xdp.table_size")
        );
        assert_eq!(needs_restart(&old, &config("rate_pps = 10\nburst = 20\nmode = \"generic\"")), Some("xdp.mode"));
    }
}
