//! What the admin verbs, the reload signal and the once-a-second tick act
//! on, behind one lock: the config in force, the data plane's lists and
//! config maps, the store, and the forwarder's policy. Every method here is
//! quick (no walk of the per-source table: that is sampled elsewhere), so a
//! verb, the counter flush and an escalation never wait long on each other.
//! The read-only views (status, usage) are in `views`. The lists are the
//! store's entries (manual and escalated, with why and when) plus what the
//! `[xdp] deny_files`/`allow_files` say, re-read on reload and applied as a
//! difference; the kernel holds their union.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tracing::{info, warn};

use crate::{
    admin::{AdminError, ListShow, RunStatus},
    clock::Clock,
    config::{Config, ConfigError},
    dataplane::{Dataplane, maps::MapReader, sample::SourceSample},
    lists::{self, FileEntries},
    metrics::ListGauges,
    proxy::{Escalation, Forwarder},
    shared::lists::Change,
    store::{Entry, List, ListStore},
    units::Cidr,
};

/// The daemon's mutable state. Dropping it saves today's counters one last
/// time and notes the clean shutdown, then detaches XDP and removes the pins
/// (the [`Dataplane`]'s drop).
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
    /// How reservations are kept, and what the start found.
    pub(super) run: RunStatus,
    /// The last flush failed: the next one saves everything again.
    pub(super) unsaved: bool,
    /// Readiness, reload counters, systemd.
    pub(super) ops: Arc<super::ops::Ops>,
    /// What the list files said at the last load.
    pub(super) files: FileLists,
    /// With a shared store: where this host's list changes go to be
    /// published to the other hosts (`super::fleet_lists`), and this host's name there.
    pub(super) share: Option<(tokio::sync::mpsc::UnboundedSender<Change>, String)>,
}

/// The entries of `[xdp] allow_files` and `deny_files`.
#[derive(Debug, Default)]
pub struct FileLists {
    allow: FileEntries,
    deny: FileEntries,
}

impl FileLists {
    pub fn get(&self, list: List) -> &FileEntries {
        match list {
            List::Allow => &self.allow,
            List::Deny => &self.deny,
        }
    }

    fn get_mut(&mut self, list: List) -> &mut FileEntries {
        match list {
            List::Allow => &mut self.allow,
            List::Deny => &mut self.deny,
        }
    }
}

/// Both lists' files, read (all or nothing) for `config` at `path`.
fn read_files(path: &std::path::Path, config: &Config) -> Result<[FileEntries; 2], AdminError> {
    let x = config.xdp();
    let read = |files: &[PathBuf]| {
        lists::read_all(files).map_err(|e| ConfigError::Unplaced { path: path.to_owned(), message: e.to_string() })
    };
    Ok([read(&x.allow_files)?, read(&x.deny_files)?])
}

/// Lock the state; a panic elsewhere does not take the daemon down with it.
pub fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// The entries of `list` in force: the store's, then those only the files list.
    pub fn list_show(&self, list: List) -> Result<ListShow, AdminError> {
        let now = self.clock.unix_secs();
        let mut entries: Vec<Entry> =
            self.store.entries(list)?.into_iter().filter(|e| e.expires_unix.is_none_or(|t| t > now)).collect();
        let stored: std::collections::HashSet<Cidr> = entries.iter().map(|e| e.cidr).collect();
        entries.extend(
            self.files
                .get(list)
                .iter()
                .filter(|(c, _)| !stored.contains(c))
                .map(|(c, name)| Entry { reason: Some(format!("file: {name}")), ..Entry::bare(*c, None) }),
        );
        Ok(ListShow { list, entries })
    }

    /// Put `cidr` into the kernel's trie and the store (both or neither),
    /// recording `reason` and now. `lasting` applies to deny entries (a
    /// network a list file also holds stays in the kernel when it expires).
    pub fn list_add(
        &mut self,
        list: List,
        cidr: Cidr,
        lasting: Option<Duration>,
        reason: &str,
    ) -> Result<Entry, AdminError> {
        if list == List::Allow && lasting.is_some() {
            return Err(AdminError::BadRequest("allow entries do not expire; --for applies to deny".into()));
        }
        let ms = lasting.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        // Rounded up: an entry may outlive its duration by under a second,
        // never fall short of it.
        let expires_unix = ms.map(|ms| self.clock.unix_millis().saturating_add(ms).div_ceil(1000));
        let expires_ns = ms.map_or(0, |ms| self.clock.monotonic_ns().saturating_add(ms.saturating_mul(1_000_000)));
        let in_file = self.files.get(list).contains_key(&cidr);
        self.dp.list_insert(list, &cidr, if in_file { 0 } else { expires_ns })?;
        let added_unix = Some(self.clock.unix_secs());
        let entry = Entry { cidr, expires_unix, reason: Some(reason.to_owned()), added_unix };
        if let Err(e) = self.store.put(list, &entry) {
            // Keep kernel and store in step: undo the map insert.
            if !in_file {
                let _ = self.dp.list_remove(list, &cidr);
            }
            return Err(e.into());
        }
        info!(list = ?list, %cidr, expires_unix, reason, "list entry added");
        self.lists_changed(list);
        self.share(|me| Change::from_entry(list, &entry, me));
        Ok(entry)
    }

    /// [`State::list_add`] for many networks, stored in one transaction;
    /// on error the kernel entries added are taken out again.
    pub fn list_add_many(
        &mut self,
        list: List,
        cidrs: &[Cidr],
        lasting: Option<Duration>,
        reason: &str,
    ) -> Result<usize, AdminError> {
        if list == List::Allow && lasting.is_some() {
            return Err(AdminError::BadRequest("allow entries do not expire; --for applies to deny".into()));
        }
        let ms = lasting.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let expires_unix = ms.map(|ms| self.clock.unix_millis().saturating_add(ms).div_ceil(1000));
        let expires_ns = ms.map_or(0, |ms| self.clock.monotonic_ns().saturating_add(ms.saturating_mul(1_000_000)));
        let added_unix = Some(self.clock.unix_secs());
        let mut inserted = Vec::new();
        let undo = |s: &mut State, done: &[Cidr]| {
            for c in done.iter().filter(|c| !s.files.get(list).contains_key(c)) {
                let _ = s.dp.list_remove(list, c);
            }
        };
        for c in cidrs {
            let ns = if self.files.get(list).contains_key(c) { 0 } else { expires_ns };
            if let Err(e) = self.dp.list_insert(list, c, ns) {
                undo(self, &inserted);
                return Err(e.into());
            }
            inserted.push(*c);
        }
        let entries: Vec<Entry> = cidrs
            .iter()
            .map(|c| Entry { cidr: *c, expires_unix, reason: Some(reason.to_owned()), added_unix })
            .collect();
        if let Err(e) = self.store.put_many(list, &entries) {
            undo(self, &inserted);
            return Err(e.into());
        }
        info!(list = ?list, entries = cidrs.len(), expires_unix, reason, "list entries added");
        self.lists_changed(list);
        for e in &entries {
            self.share(|me| Change::from_entry(list, e, me));
        }
        Ok(cidrs.len())
    }

    /// Take `cidr` out of the store and the kernel's trie (the kernel keeps
    /// it when a list file holds it).
    pub fn list_remove(&mut self, list: List, cidr: Cidr) -> Result<(), AdminError> {
        let file = self.files.get(list).get(&cidr).cloned();
        let was = self.store.remove(list, &cidr)?;
        match (&file, was) {
            (Some(name), false) => {
                return Err(AdminError::BadRequest(format!(
                    "{cidr} comes from the list file {name}: remove it there and reload"
                )));
            }
            (Some(_), true) => {}
            (None, _) => self.dp.list_remove(list, &cidr)?,
        }
        if !was {
            return Err(AdminError::NotFound { list, cidr });
        }
        info!(list = ?list, %cidr, "list entry removed");
        self.lists_changed(list);
        let now = self.clock.unix_secs();
        self.share(|me| Change::removal(list, cidr, now, me));
        Ok(())
    }

    /// Hand a change of this host's to the publisher (with a shared store).
    fn share(&self, change: impl FnOnce(&str) -> Change) {
        if let Some((tx, me)) = &self.share {
            let _ = tx.send(change(me));
        }
    }

    /// This host's entry for `cidr` in `list`, if any.
    fn stored(&self, list: List, cidr: Cidr) -> Result<Option<Entry>, AdminError> {
        Ok(self.store.entries(list)?.into_iter().find(|e| e.cidr == cidr))
    }

    /// A change another host made, applied to the kernel and the store
    /// (not published again). An entry replaces this host's for the same
    /// network; a removal removes what was added before it. True when
    /// something changed.
    pub fn apply_shared(&mut self, c: &Change) -> Result<bool, AdminError> {
        let now = self.clock.unix_secs();
        let held = self.stored(c.list, c.cidr)?;
        let in_file = self.files.get(c.list).contains_key(&c.cidr);
        if !c.present {
            if held.as_ref().is_none_or(|e| e.added_unix.unwrap_or(0) > c.at_unix) {
                return Ok(false);
            }
            self.store.remove(c.list, &c.cidr)?;
            if !in_file {
                self.dp.list_remove(c.list, &c.cidr)?;
            }
            info!(list = ?c.list, cidr = %c.cidr, origin = %c.origin, "list entry removed by another host");
        } else {
            let entry = c.entry();
            let same = |e: &Entry| e.expires_unix == c.expires_unix && e.reason == entry.reason;
            if c.expires_unix.is_some_and(|t| t <= now) || held.as_ref().is_some_and(same) {
                return Ok(false);
            }
            let ns = c.expires_unix.map_or(0, |t| self.clock.monotonic_at(t));
            self.dp.list_insert(c.list, &c.cidr, if in_file { 0 } else { ns })?;
            self.store.put(c.list, &entry)?;
            info!(list = ?c.list, cidr = %c.cidr, expires_unix = c.expires_unix, reason = entry.reason.as_deref().unwrap_or(""), "list entry from another host");
        }
        self.lists_changed(c.list);
        Ok(true)
    }

    /// Bring this host's lists in line with the shared state (`me` being
    /// this host): apply what others wrote, and return this host's entries
    /// the state lacks (added while the store was away, or lost by a store
    /// restart), to be published again. An entry of this host's own that
    /// the state holds and this host no longer does was removed here while
    /// the store was away: its removal is queued and wins.
    pub fn resync_shared(&mut self, state: &[Change], me: &str) -> Result<(usize, Vec<Change>), AdminError> {
        let mut applied = 0;
        for c in state.iter().filter(|c| !(c.present && c.origin == me)) {
            match self.apply_shared(c) {
                Ok(true) => applied += 1,
                Ok(false) => {}
                Err(e) => warn!(cidr = %c.cidr, error = %e, "applying a shared list entry"),
            }
        }
        let known: std::collections::HashMap<(List, Cidr), &Change> =
            state.iter().map(|c| ((c.list, c.cidr), c)).collect();
        let now = self.clock.unix_secs();
        let mut missing = Vec::new();
        for list in [List::Allow, List::Deny] {
            for e in self.store.entries(list)?.iter().filter(|e| e.expires_unix.is_none_or(|t| t > now)) {
                let newer = |c: &&Change| !c.present && c.at_unix < e.added_unix.unwrap_or(0);
                if known.get(&(list, e.cidr)).is_none_or(newer) {
                    missing.push(Change::from_entry(list, e, me));
                }
            }
        }
        Ok((applied, missing))
    }

    /// Re-read the config file, counting the result and telling systemd.
    pub fn reload(&mut self) -> Result<(), AdminError> {
        let r = self.try_reload();
        self.ops.reloads.record(r.is_ok(), self.clock.unix_secs());
        match &r {
            Ok(()) => self.ops.status(&self.summary()),
            Err(e) => self.ops.status(&format!("reload refused, running config kept: {e}")),
        }
        r
    }

    /// Re-read the config file. Refused (and nothing changes) when it is
    /// invalid or changes what cannot change live.
    fn try_reload(&mut self) -> Result<(), AdminError> {
        let path = &self.config_path;
        let (new, policy) = crate::proxy::policy::Loaded::read(path)?
            .with_key(path)
            .map_err(|source| AdminError::Policy { path: path.clone(), source })?;
        if let Some(what) = needs_restart(&self.config, &new) {
            return Err(AdminError::NeedsRestart { path: path.clone(), what });
        }
        let [allow_files, deny_files] = read_files(path, &new)?;
        // Build everything before changing anything: a refused reload leaves
        // both halves as they were.
        let policy = if self.forwarder.is_some() { policy } else { None };
        self.dp.apply(new.xdp())?;
        if let (Some(f), Some(p)) = (&self.forwarder, policy) {
            f.reconfigure(p);
        }
        info!(path = %self.config_path.display(), "config reloaded");
        self.config = new;
        self.apply_files(List::Allow, allow_files)?;
        self.apply_files(List::Deny, deny_files)
    }

    /// Read the config's list files and put them into the kernel (at start).
    pub fn load_files(&mut self) -> Result<(), AdminError> {
        let [allow, deny] = read_files(&self.config_path, &self.config)?;
        self.apply_files(List::Allow, allow)?;
        self.apply_files(List::Deny, deny)
    }

    /// Make the kernel hold what the files now say for `list`: insert what
    /// was added, remove what was dropped unless the store still lists it.
    fn apply_files(&mut self, list: List, new: FileEntries) -> Result<(), AdminError> {
        let d = lists::diff(self.files.get(list), &new);
        if d.added.is_empty() && d.removed.is_empty() {
            *self.files.get_mut(list) = new;
            return Ok(());
        }
        let now = self.clock.unix_secs();
        let stored: std::collections::HashMap<Cidr, Option<u64>> = self
            .store
            .entries(list)?
            .into_iter()
            .filter(|e| e.expires_unix.is_none_or(|t| t > now))
            .map(|e| (e.cidr, e.expires_unix))
            .collect();
        for c in &d.added {
            self.dp.list_insert(list, c, 0)?;
        }
        for c in &d.removed {
            match stored.get(c) {
                Some(exp) => self.dp.list_insert(list, c, exp.map_or(0, |t| self.clock.monotonic_at(t)))?,
                None => self.dp.list_remove(list, c)?,
            }
        }
        *self.files.get_mut(list) = new;
        info!(list = ?list, added = d.added.len(), removed = d.removed.len(), "list files applied");
        self.lists_changed(list);
        Ok(())
    }

    /// Push a client that exhausted its daily cap into the deny list until
    /// the reset, persisted like any other deny entry. Never a trusted proxy
    /// or an allow-listed source: denying those would cut off everyone
    /// behind them.
    pub fn escalate(&mut self, e: &Escalation) {
        let ip = e.cidr.addr();
        let trusted = self.config.listen.as_ref().is_some_and(|l| l.trusted_proxies.iter().any(|c| c.contains(ip)));
        let allowed = self.store.entries(List::Allow).is_ok_and(|v| v.iter().any(|a| a.cidr.contains(ip)))
            || self.files.get(List::Allow).keys().any(|c| c.contains(ip));
        if trusted || allowed {
            warn!(cidr = %e.cidr, trusted, allowed, "not escalating a trusted or allow-listed source into the deny list");
            return;
        }
        let lasting = Duration::from_secs(e.until_unix.saturating_sub(self.clock.unix_secs()).max(1));
        // A host's own cap, or the cap its network shares (per_prefix_daily).
        let host = e.cidr.prefix() == if e.cidr.addr().is_ipv4() { 32 } else { self.config.xdp().ipv6_prefix.0 };
        let reason = if host { "escalated: daily cap" } else { "escalated: network daily cap" };
        if let Err(err) = self.list_add(List::Deny, e.cidr, Some(lasting), reason) {
            warn!(cidr = %e.cidr, error = %err, "escalating into the XDP deny list");
        }
    }

    /// Persist the forwarder's counters when they changed, with the token
    /// counts when they changed too (taken after the counters: a call in
    /// flight at that instant may be counted twice after a crash, never
    /// forgotten), and forget per-IP token buckets that have refilled
    /// (bounding their memory). False when something could not be saved;
    /// the next flush then saves everything, changed or not.
    pub fn flush(&mut self) -> bool {
        let Some(f) = &self.forwarder else { return true };
        f.limiter().sweep(self.clock.monotonic_ns());
        let (now, all) = (self.clock.unix_secs(), std::mem::take(&mut self.unsaved));
        let counts = f.limiter().take_dirty().or_else(|| all.then(|| f.limiter().today(now as i64).0));
        let tokens = f.token_allowance().take_dirty(now).or_else(|| all.then(|| f.token_allowance().snapshot(now)));
        let saved = match (&counts, &tokens) {
            (Some(c), t) => self.store.save_day(c, t.as_deref()),
            (None, Some(t)) => self.store.save_tokens(t),
            (None, None) => return true,
        };
        self.ops.ready.store_ok.store(saved.is_ok(), std::sync::atomic::Ordering::Relaxed);
        match saved {
            Ok(()) => {
                self.saved_spend = counts.map_or(self.saved_spend, |c| c.spent);
                true
            }
            Err(e) => {
                warn!(error = %e, "saving today's counters and page-token call counts");
                self.unsaved = true;
                false
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
            // A network a deny file lists stays denied, for good.
            let _ = match self.files.deny.contains_key(&e.cidr) {
                true => self.dp.list_insert(List::Deny, &e.cidr, 0),
                false => self.dp.list_remove(List::Deny, &e.cidr),
            };
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

    /// Entries of `list` in force now, stored and from files (a network in both counted once).
    pub(super) fn in_force(&self, list: List) -> Result<usize, AdminError> {
        Ok(self.list_show(list)?.entries.len())
    }

    /// Entries of `list` that come only from its files.
    pub(super) fn file_only(&self, list: List) -> Result<usize, AdminError> {
        Ok(self
            .list_show(list)?
            .entries
            .iter()
            .filter(|e| e.reason.as_deref().is_some_and(|r| r.starts_with("file: ")))
            .count())
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
            let cidrs = self
                .list_show(List::Allow)
                .map(|l| l.entries.into_iter().map(|e| e.cidr).collect())
                .unwrap_or_default();
            f.set_allow(cidrs);
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if self.flush()
            && let Err(e) = self.store.mark_running(false, self.clock.unix_secs())
        {
            warn!(error = %e, "noting the clean shutdown");
        }
    }
}

/// The first setting in `new` that differs from `old` and needs a restart.
fn needs_restart(old: &Config, new: &Config) -> Option<&'static str> {
    let (x, y) = (old.xdp(), new.xdp());
    // The certificate files are re-read on reload; only turning TLS on or off needs a restart.
    let listen = |c: &Config| c.listen.as_ref().map(|l| (l.addr, l.tls_cert.is_some()));
    [
        ("xdp.interface", x.interface != y.interface),
        ("xdp.mode", x.mode != y.mode),
        ("xdp.table_size", x.table_size != y.table_size),
        ("store.path", old.store.path != new.store.path),
        ("store.durability", old.store.durability != new.store.durability),
        ("store.redis_url", old.store.redis_url != new.store.redis_url),
        (
            "store.sentinels",
            (&old.store.sentinels, &old.store.sentinel_service) != (&new.store.sentinels, &new.store.sentinel_service),
        ),
        ("store.site", old.store.site != new.store.site),
        ("admin.socket", old.admin.socket != new.admin.socket),
        ("admin.metrics", old.admin.metrics != new.admin.metrics),
        ("log.format", old.log.format != new.log.format),
        ("listen", listen(old) != listen(new)),
    ]
    .into_iter()
    .find_map(|(what, changed)| changed.then_some(what))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config_text(xdp: &str) -> String {
        format!(
            "[xdp]\ninterface = \"eth0\"\nports = [443]\n{xdp}\n[store]\npath = \"/var/lib/kw\"\n[admin]\nsocket = \"/run/kw.sock\"\n"
        )
    }

    fn config(xdp: &str) -> Config {
        Config::parse(Path::new("keyward.toml"), &config_text(xdp)).unwrap()
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
        let metrics = Config::parse(
            Path::new("keyward.toml"),
            &format!("{}metrics = \"127.0.0.1:9999\"\n", config_text("rate_pps = 10\nburst = 20")),
        )
        .unwrap();
        assert_eq!(needs_restart(&old, &metrics), Some("admin.metrics"));
    }
}
