//! `keyward run`: the daemon's lifecycle. Refuse early and clearly (config,
//! privileges, interface, ownership), then mount bpffs, load, pin, attach,
//! fill the maps from the config and the store, serve the admin socket, and
//! on SIGTERM/SIGINT detach, unpin and exit 0. SIGHUP re-reads the config;
//! a bad one is refused and the running one stays.

use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{
    admin::{self, AggregateStatus, ForwarderStatus, ListShow, Request, RequestCount, Response, Status, Top},
    clock::{Clock, SystemClock},
    config::Config,
    dataplane::Dataplane,
    paths,
    proxy::{self, Escalation, Forwarder, Policy},
    store::{Embedded, Entry, List, ListStore},
    units::Cidr,
};

/// Everything the admin verbs act on.
pub struct State {
    config_path: PathBuf,
    config: Config,
    dp: Dataplane,
    store: Arc<dyn ListStore>,
    clock: Arc<dyn Clock>,
    forwarder: Option<Arc<Forwarder>>,
    /// Spend of the last counters written to the store.
    saved_spend: u64,
}

impl State {
    /// Answer one admin request.
    pub fn handle(&mut self, req: Request) -> Result<serde_json::Value, String> {
        let json = |v: &dyn erased::Ser| v.to_json();
        match req {
            Request::Status => self.status().map(|s| json(&s)),
            Request::Top { n } => {
                let (tracked_sources, sources) = self.dp.sources(n).map_err(|e| e.to_string())?;
                Ok(json(&Top { tracked_sources, sources }))
            }
            Request::ListShow { list } => {
                let now = self.clock.unix_secs();
                let entries = self
                    .store
                    .entries(list)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .filter(|e| e.expires_unix.is_none_or(|t| t > now))
                    .collect();
                Ok(json(&ListShow { list, entries }))
            }
            Request::ListAdd { list, cidr, for_secs } => {
                let cidr: Cidr = cidr.parse().map_err(|e: crate::units::UnitError| e.0)?;
                if list == List::Allow && for_secs.is_some() {
                    return Err("allow entries do not expire; --for applies to deny".into());
                }
                // Rounded up: an entry may outlive its duration by under a
                // second, never fall short of it.
                let expires_unix =
                    for_secs.map(|s| self.clock.unix_millis().saturating_add(s.saturating_mul(1000)).div_ceil(1000));
                let expires_ns =
                    for_secs.map_or(0, |s| self.clock.monotonic_ns().saturating_add(s.saturating_mul(1_000_000_000)));
                self.dp.list_insert(list, &cidr, expires_ns).map_err(|e| e.to_string())?;
                let entry = Entry { cidr, expires_unix };
                if let Err(e) = self.store.put(list, &entry) {
                    // Keep kernel and store in step: undo the map insert.
                    let _ = self.dp.list_remove(list, &cidr);
                    return Err(e.to_string());
                }
                info!(list = ?list, %cidr, expires_unix, "list entry added");
                if list == List::Allow {
                    self.sync_allow();
                }
                Ok(json(&entry))
            }
            Request::ListRemove { list, cidr } => {
                let cidr: Cidr = cidr.parse().map_err(|e: crate::units::UnitError| e.0)?;
                let was = self.store.remove(list, &cidr).map_err(|e| e.to_string())?;
                self.dp.list_remove(list, &cidr).map_err(|e| e.to_string())?;
                if !was {
                    return Err(format!("{cidr} is not in the {list:?} list").to_lowercase());
                }
                info!(list = ?list, %cidr, "list entry removed");
                if list == List::Allow {
                    self.sync_allow();
                }
                Ok(serde_json::json!({ "removed": cidr.to_string() }))
            }
            Request::Reload => self.reload().map(|()| serde_json::json!({ "reloaded": true })),
            Request::Usage { n } => {
                let f = self.forwarder.as_ref().ok_or("the forwarder is not configured ([listen] is absent)")?;
                Ok(json(&self.usage(f, n)))
            }
        }
    }

    fn status(&self) -> Result<Status, String> {
        let x = self.config.xdp();
        let (iface, mode) = self.dp.attached().map_or(("-".to_owned(), "-"), |(i, a)| (i.to_owned(), a.as_str()));
        let counters = self.dp.counters().map_err(|e| e.to_string())?;
        let (tracked_sources, top_sources) = self.dp.sources(3).map_err(|e| e.to_string())?;
        let now = self.clock.unix_secs();
        let count = |l| -> Result<usize, String> {
            Ok(self
                .store
                .entries(l)
                .map_err(|e| e.to_string())?
                .iter()
                .filter(|e| e.expires_unix.is_none_or(|t| t > now))
                .count())
        };
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
            dry_run: x.dry_run,
            table_size: x.table_size.get(),
            tracked_sources,
            new_sources: self.dp.new_sources().map_err(|e| e.to_string())?,
            allow_entries: count(List::Allow)?,
            deny_entries: count(List::Deny)?,
            counters,
            top_sources,
            forwarder: self.forwarder.as_ref().map(|f| self.forwarder_status(f)),
        })
    }

    fn usage(&self, f: &Forwarder, n: usize) -> admin::Usage {
        let st = self.forwarder_status(f);
        let (counts, _) = f.limiter().today(self.clock.unix_secs() as i64);
        let mut routes: Vec<admin::RouteUsage> = Vec::new();
        for r in &st.requests {
            let i = match routes.iter().position(|x| x.route == r.route) {
                Some(i) => i,
                None => {
                    routes.push(admin::RouteUsage { route: r.route.clone(), forwarded: 0, cache_hits: 0, refused: 0 });
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
        let mut top: Vec<admin::ClientUsage> = counts
            .per_ip
            .iter()
            .filter(|(_, c)| **c > 0)
            .map(|(ip, c)| admin::ClientUsage { client: ip.to_string(), calls: *c })
            .collect();
        top.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.client.cmp(&b.client)));
        top.truncate(n);
        let looked = st.cache_hits + st.cache_misses;
        admin::Usage {
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
        }
    }

    fn forwarder_status(&self, f: &Forwarder) -> ForwarderStatus {
        let now = self.clock.unix_secs() as i64;
        let (counts, window) = f.limiter().today(now);
        let limits = f.limiter().limits();
        let (hits, misses, _, _) = f.cache().stats();
        let (requests, _) = f.counts();
        let mut requests: Vec<RequestCount> = requests
            .into_iter()
            .map(|((route, o), count)| RequestCount { route, outcome: o.name().into(), count })
            .collect();
        requests.sort_by(|a, b| (&a.route, &a.outcome).cmp(&(&b.route, &b.outcome)));
        let mut would: Vec<RequestCount> = f
            .would_refuse()
            .into_iter()
            .map(|((route, o), count)| RequestCount { route, outcome: o.name().into(), count })
            .collect();
        would.sort_by(|a, b| (&a.route, &a.outcome).cmp(&(&b.route, &b.outcome)));
        ForwarderStatus {
            listen: self.config.listen.as_ref().map(|l| l.addr.to_string()).unwrap_or_default(),
            currency: f.currency(),
            spent: proxy::limit::format_amount(counts.spent),
            budget: proxy::limit::format_amount(limits.budget),
            spent_micros: counts.spent,
            budget_micros: limits.budget,
            saved_micros: self.saved_spend,
            reset_unix: window.end,
            day: counts.day,
            clients_today: counts.per_ip.len(),
            alerts_raised: counts.alerted.len(),
            cache_hits: hits,
            cache_misses: misses,
            requests,
            dry_run_would_refuse: would,
        }
    }

    /// Re-read the config file. Refused (and nothing changes) when it is
    /// invalid or changes what cannot change live.
    pub fn reload(&mut self) -> Result<(), String> {
        let new = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let (old, next) = (self.config.xdp(), new.xdp());
        for (what, changed) in [
            ("xdp.interface", old.interface != next.interface),
            ("xdp.mode", old.mode != next.mode),
            ("xdp.table_size", old.table_size != next.table_size),
            ("store.path", self.config.store.path != new.store.path),
            ("admin.socket", self.config.admin.socket != new.admin.socket),
            (
                "listen",
                self.config.listen.as_ref().map(|l| (l.addr, l.tls_cert.clone(), l.tls_key.clone()))
                    != new.listen.as_ref().map(|l| (l.addr, l.tls_cert.clone(), l.tls_key.clone())),
            ),
        ] {
            if changed {
                return Err(format!(
                    "{}: {what} cannot change while running; restart keyward to apply it",
                    self.config_path.display()
                ));
            }
        }
        // Build everything before changing anything: a refused reload leaves
        // both halves as they were.
        let policy = match &self.forwarder {
            Some(_) => Some(Policy::build(&new).map_err(|e| format!("{}: {e}", self.config_path.display()))?),
            None => None,
        };
        self.dp.apply(next).map_err(|e| e.to_string())?;
        if let (Some(f), Some(p)) = (&self.forwarder, policy) {
            f.reconfigure(p);
        }
        info!(path = %self.config_path.display(), "config reloaded");
        self.config = new;
        Ok(())
    }

    /// Give the forwarder the current allow list.
    fn sync_allow(&self) {
        if let Some(f) = &self.forwarder {
            let cidrs =
                self.store.entries(List::Allow).map(|v| v.into_iter().map(|e| e.cidr).collect()).unwrap_or_default();
            f.set_allow(cidrs);
        }
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
        let for_secs = e.until_unix.saturating_sub(self.clock.unix_secs()).max(1);
        let req = Request::ListAdd { list: List::Deny, cidr: e.cidr.to_string(), for_secs: Some(for_secs) };
        if let Err(err) = self.handle(req) {
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
        }
    }

    /// What one metrics scrape reports.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let now = self.clock.unix_secs();
        let active = |l| {
            self.store
                .entries(l)
                .map(|v| v.iter().filter(|e| e.expires_unix.is_none_or(|t| t > now)).count() as u64)
                .unwrap_or(0)
        };
        let forwarder = self.forwarder.as_ref().map(|f| {
            let (counts, window) = f.limiter().today(now as i64);
            let (requests, upstream) = f.counts();
            crate::metrics::ForwarderSnapshot {
                requests: requests.into_iter().map(|((r, o), n)| ((r, o.name().to_owned()), n)).collect(),
                would_refuse: f.would_refuse().into_iter().map(|((r, o), n)| ((r, o.name().to_owned()), n)).collect(),
                upstream: upstream.into_iter().collect(),
                upstream_seconds: f.upstream_histogram(),
                currency: f.currency(),
                spent: counts.spent as f64 / proxy::limit::MICROS as f64,
                limit: f.limiter().limits().budget as f64 / proxy::limit::MICROS as f64,
                reset: window.end,
            }
        });
        crate::metrics::Snapshot {
            xdp: self.dp.counters().unwrap_or_default(),
            new_sources: self.dp.new_sources().unwrap_or(0),
            tracked_sources: self.dp.sources(0).map_or(0, |(n, _)| n),
            deny_entries: active(List::Deny),
            allow_entries: active(List::Allow),
            forwarder,
        }
    }

    /// Drop deny entries whose expiry has passed from the store and the map
    /// (the kernel already ignores them; this keeps the tries small).
    pub fn gc(&mut self) {
        let now = self.clock.unix_secs();
        let Ok(entries) = self.store.entries(List::Deny) else {
            return;
        };
        for e in entries.iter().filter(|e| e.expires_unix.is_some_and(|t| t <= now)) {
            if let Err(err) = self.store.remove(List::Deny, &e.cidr) {
                warn!(cidr = %e.cidr, error = %err, "expiring deny entry");
                continue;
            }
            let _ = self.dp.list_remove(List::Deny, &e.cidr);
            info!(cidr = %e.cidr, "deny entry expired");
        }
    }

    /// Load every stored list entry into the maps.
    fn restore_lists(&mut self) -> anyhow::Result<()> {
        self.gc();
        for list in [List::Allow, List::Deny] {
            let entries = self.store.entries(list)?;
            for e in &entries {
                let ns = e.expires_unix.map_or(0, |t| self.clock.monotonic_at(t));
                self.dp.list_insert(list, &e.cidr, ns)?;
            }
            info!(list = ?list, entries = entries.len(), "restored list");
        }
        self.sync_allow();
        Ok(())
    }
}

/// A tiny object-safe wrapper so `handle` can serialize different types.
mod erased {
    pub trait Ser {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    unblock_signals();
    let x = config.xdp().clone();
    check_privileges()?;
    if nix::net::if_::if_nametoindex(x.interface.as_str()).is_err() {
        bail!("interface `{}` does not exist", x.interface);
    }
    let slot = slot_name(&x.interface);
    let _lock = OwnerLock::acquire(&slot, &x.interface)?;
    mount_bpffs()?;
    let store: Arc<dyn ListStore> = Arc::new(Embedded::open(&config.store.path)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // Everything that can refuse is done before XDP is attached: the
    // forwarder's policy (and key), and every listening socket.
    let policy = match &config.listen {
        Some(_) => Some(Policy::build(&config)?),
        None => None,
    };
    // One worker per CPU we may run on (taskset/cgroup cpusets), not per CPU
    // of the host: extra workers on a pinned core only add context switches.
    let workers = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| (0..nix::sched::CpuSet::count()).filter(|c| set.is_set(*c).unwrap_or(false)).count())
        .unwrap_or(1)
        .clamp(1, 16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // Handlers for SIGTERM/SIGINT/SIGHUP before anything is loaded: a signal
    // during setup is then acted on once setup is done, instead of killing
    // the process half way (and leaving pins behind).
    let signals = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    let admin = rt.block_on(async { bind_admin(&config.admin.socket) })?;
    let metrics = match config.admin.metrics.trim() {
        "" => None,
        a => Some(rt.block_on(crate::metrics::bind(a))?),
    };
    let listen = match &config.listen {
        Some(l) => {
            let tls = match (&l.tls_cert, &l.tls_key) {
                (Some(c), Some(k)) => Some(proxy::tls_acceptor(c, k)?),
                _ => None,
            };
            let sock = rt
                .block_on(tokio::net::TcpListener::bind(l.addr))
                .with_context(|| format!("binding [listen] addr {}", l.addr))?;
            Some((sock, tls))
        }
        None => None,
    };
    let mut escalations = None;
    let forwarder = match policy {
        Some(p) => {
            let h = Forwarder::new(p, clock.clone(), store.load_day()?);
            escalations = Some(h.escalations);
            Some(h.forwarder)
        }
        None => None,
    };

    let mut dp = Dataplane::load(&x)?;
    if let Err(e) = dp.pin(&Path::new(paths::PIN_ROOT).join(&slot)) {
        dp.shutdown(); // removes whatever was pinned
        let _ = std::fs::remove_file(&config.admin.socket);
        return Err(e.into());
    }
    let mut state = State {
        config_path: config_path.to_owned(),
        config: config.clone(),
        dp,
        store,
        clock,
        forwarder: forwarder.clone(),
        saved_spend: 0,
    };
    let attached = state.restore_lists().and_then(|()| Ok(state.dp.attach(&x.interface, x.mode)?));
    if let Err(e) = attached {
        state.dp.shutdown();
        let _ = std::fs::remove_file(&config.admin.socket);
        return Err(e);
    }

    let state = Arc::new(Mutex::new(state));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = match (forwarder, listen) {
        (Some(f), Some((sock, tls))) => {
            info!(addr = %sock.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = tls.is_some(), "forwarder listening");
            Some(rt.spawn(proxy::serve(f, sock, tls, stop_rx, Duration::from_secs(10))))
        }
        _ => None,
    };
    let metrics_task = metrics.map(|m| {
        info!(addr = %config.admin.metrics, "metrics at /metrics");
        rt.spawn(crate::metrics::serve(m, Arc::new(crate::metrics::registry(state.clone()))))
    });

    let served = rt.block_on(serve(state.clone(), admin, escalations, signals));
    let _ = stop_tx.send(true);
    if let Some(h) = http {
        let _ = rt.block_on(h);
    }
    if let Some(m) = metrics_task {
        m.abort();
    }
    {
        let mut s = lock(&state);
        s.flush();
        s.dp.shutdown();
    }
    let _ = std::fs::remove_file(&config.admin.socket);
    rt.shutdown_timeout(Duration::from_secs(2));
    info!("stopped");
    served
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal, tokio::signal::unix::Signal);

async fn serve(
    state: Arc<Mutex<State>>,
    listener: UnixListener,
    mut escalations: Option<tokio::sync::mpsc::UnboundedReceiver<Escalation>>,
    (mut term, mut int, mut hup): Signals,
) -> anyhow::Result<()> {
    if let Ok(a) = listener.local_addr() {
        info!(socket = ?a.as_pathname(), "admin socket ready");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); return Ok(()) }
            _ = int.recv() => { info!("SIGINT: shutting down"); return Ok(()) }
            _ = hup.recv() => {
                if let Err(e) = lock(&state).reload() {
                    warn!(error = %e, "reload refused; the running config stays");
                }
            }
            _ = tick.tick() => {
                let mut s = lock(&state);
                s.gc();
                s.flush();
            }
            Some(e) = async { match escalations.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                lock(&state).escalate(&e);
            }
            conn = listener.accept() => match conn {
                Ok((stream, _)) => { tokio::spawn(answer(state.clone(), stream)); }
                Err(e) => warn!(error = %e, "admin accept"),
            },
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn answer(state: Arc<Mutex<State>>, stream: tokio::net::UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), BufReader::new(r.take(admin::MAX_LINE)).read_line(&mut line))
            .await;
    let resp = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            // Off the runtime: status and top walk the kernel table.
            Ok(req) => match tokio::task::spawn_blocking(move || lock(&state).handle(req)).await {
                Ok(Ok(data)) => Response::Ok { data },
                Ok(Err(message)) => Response::Error { message },
                Err(e) => Response::Error { message: format!("internal error: {e}") },
            },
            Err(e) => Response::Error { message: format!("bad request: {e}") },
        },
        Ok(Err(e)) => Response::Error { message: format!("reading request: {e}") },
        Err(_) => return,
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = w.write_all(&out).await;
}

fn bind_admin(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!("admin socket {} is in use by another keyward", socket.display());
    }
    let _ = std::fs::remove_file(socket);
    let l = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The name of this interface's pin directory and lock: the interface name,
/// qualified by the network namespace when not in the host's own, so that
/// daemons in different namespaces never collide.
fn slot_name(iface: &str) -> String {
    let ino = |p| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
    match (ino("/proc/self/ns/net"), ino("/proc/1/ns/net")) {
        // When the host's namespace cannot be read (a sandbox), qualify too.
        (Some(me), init) if init != Some(me) => format!("{iface}@{me}"),
        _ => iface.to_owned(),
    }
}

/// An exclusive `flock` on `/run/keyward/lock/<slot>.lock` holding our pid:
/// one keyward per interface.
struct OwnerLock {
    _file: nix::fcntl::Flock<File>,
}

impl OwnerLock {
    fn acquire(slot: &str, iface: &str) -> anyhow::Result<OwnerLock> {
        std::fs::create_dir_all(paths::LOCK_DIR).with_context(|| format!("creating {}", paths::LOCK_DIR))?;
        let path = Path::new(paths::LOCK_DIR).join(format!("{slot}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                bail!("another keyward (pid {}) already owns interface `{iface}`", pid.trim());
            }
        };
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(OwnerLock { _file: file })
    }
}

/// A parent may have started us with signals blocked (the mask is
/// inherited across exec); the signals we act on must get through.
fn unblock_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    if let Err(e) = set.thread_unblock() {
        warn!(error = %e, "cannot unblock SIGTERM/SIGINT/SIGHUP");
    }
}

/// Refuse without the capabilities loading and attaching need. Measured
/// (tests/tests/operating.rs): CAP_BPF and CAP_NET_ADMIN are not enough, the
/// verifier refuses the program's packet access without CAP_PERFMON.
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON.
fn check_privileges() -> anyhow::Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    let sys = has(CAP_SYS_ADMIN);
    if !(has(CAP_BPF) || sys) || !(has(CAP_PERFMON) || sys) || !has(CAP_NET_ADMIN) {
        bail!("keyward run needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load and attach XDP");
    }
    Ok(())
}

/// Mount the BPF filesystem at /sys/fs/bpf unless it is already there.
fn mount_bpffs() -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let is_bpffs =
        nix::sys::statfs::statfs(paths::BPFFS).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC).unwrap_or(false);
    if !is_bpffs {
        nix::mount::mount(Some("bpf"), paths::BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting the BPF filesystem at {}", paths::BPFFS))?;
        info!(path = paths::BPFFS, "mounted the BPF filesystem");
    }
    Ok(())
}
