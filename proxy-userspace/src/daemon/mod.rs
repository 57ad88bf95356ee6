//! `keyward run`: the daemon's lifecycle. Refuse early and clearly (config,
//! privileges, interface, ownership), then mount bpffs, bind every socket,
//! load, pin, fill the maps from the config and the store, attach, serve the
//! admin socket, and on SIGTERM/SIGINT stop. SIGHUP re-reads the config; a
//! bad one is refused and the running one stays.
//!
//! Cleanup is owned, not written out: the owner lock ([`host::OwnerLock`]),
//! the admin socket file ([`admin_server::AdminSocket`]), and the attached,
//! pinned program (the `Dataplane` inside [`state::State`]) each undo
//! themselves when dropped, so a refusal half way through setup and a
//! shutdown leave the same nothing behind.

mod admin_server;
mod fleet_lists;
mod host;
mod ops;
mod state;
mod views;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    net::TcpListener,
    runtime::Runtime,
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc::UnboundedReceiver, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use self::{
    admin_server::{Admin, AdminSocket},
    ops::Ops,
    state::{State, lock},
};
use crate::{
    admin::RunStatus,
    clock::{Clock, SystemClock},
    config::{Config, Durability},
    dataplane::{Dataplane, sample::SourceSample},
    metrics::ListGauges,
    paths,
    proxy::{self, Escalation, Forwarder, Policy},
    store::{Embedded, ListStore, Recovered},
};

/// How long in-flight forwarder requests may take to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let (config, policy) = crate::proxy::policy::Loaded::read(config_path)?.with_key(config_path)?;
    // Before any socket is bound or the forwarder sizes its connection cap.
    host::raise_nofile();
    for w in config.warnings() {
        warn!("{w}");
    }
    host::unblock_signals();
    host::check_privileges()?;
    let iface = config.xdp().interface.clone();
    if nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
        bail!("interface `{iface}` does not exist");
    }
    let slot = host::slot_name(&iface);
    let _owner = host::OwnerLock::acquire(&slot, &iface)?;
    host::mount_bpffs()?;
    let rt = runtime()?;
    // Handlers for SIGTERM/SIGINT/SIGHUP before anything is loaded: a signal
    // during setup is then acted on once setup is done, instead of killing
    // the process half way (and leaving pins behind).
    let signals = rt.block_on(async { Signals::install() })?;
    let mut daemon = Daemon::start(&rt, config_path, config, policy, &slot)?;
    rt.block_on(daemon.serve(signals));
    rt.block_on(daemon.drain());
    // The runtime ends the remaining tasks (and their references to the
    // state); dropping the daemon then saves today's counters, detaches,
    // unpins and removes the admin socket; `_owner` frees the interface.
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(daemon);
    info!("stopped");
    Ok(())
}

/// One worker per CPU we may run on (taskset/cgroup cpusets), not per CPU
/// of the host: extra workers on a pinned core only add context switches.
fn runtime() -> anyhow::Result<Runtime> {
    let workers = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| (0..nix::sched::CpuSet::count()).filter(|c| set.is_set(*c).unwrap_or(false)).count())
        .unwrap_or(1)
        .clamp(1, 16);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// The signals the daemon acts on.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Every socket, bound before XDP is attached so that a port in use refuses
/// the start with nothing loaded.
struct Listeners {
    admin: AdminSocket,
    metrics: Option<TcpListener>,
    forward: Option<TcpListener>,
}

impl Listeners {
    fn bind(rt: &Runtime, config: &Config) -> anyhow::Result<Listeners> {
        let _in_rt = rt.enter();
        let admin = AdminSocket::bind(&config.admin.socket)?;
        let metrics = match config.admin.metrics.0 {
            None => None,
            Some(a) => Some(rt.block_on(crate::metrics::bind(a))?),
        };
        let forward = match &config.listen {
            Some(l) => Some(
                rt.block_on(TcpListener::bind(l.addr)).with_context(|| format!("binding [listen] addr {}", l.addr))?,
            ),
            None => None,
        };
        Ok(Listeners { admin, metrics, forward })
    }
}

/// The running daemon. Field order is drop order: the state (counters
/// saved, XDP detached, pins removed) goes before the admin socket file.
struct Daemon {
    admin: Arc<Admin>,
    socket: AdminSocket,
    escalations: Option<UnboundedReceiver<Escalation>>,
    stop: watch::Sender<bool>,
    http: Option<JoinHandle<()>>,
    forwarder: Option<Arc<Forwarder>>,
    ops: Arc<Ops>,
}

impl Daemon {
    /// Set everything up, or refuse with nothing left behind.
    fn start(
        rt: &Runtime,
        config_path: &Path,
        config: Config,
        policy: Option<Policy>,
        slot: &str,
    ) -> anyhow::Result<Daemon> {
        let embedded = Embedded::open(&config.store.path)?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        // Everything that can refuse is done before XDP is attached: the
        // forwarder's policy (and key, built by `run`), and every listening socket.
        let listeners = Listeners::bind(rt, &config)?;
        let recovered = embedded.recover()?;
        let run = log_recovered(&recovered, config.store.durability);
        let (forwarder, escalations) = match policy {
            Some(p) => {
                let journal = match config.store.durability {
                    Durability::Immediate => Some(embedded.journal()?),
                    Durability::LoseUpTo1s => None,
                };
                let h = Forwarder::with_journal(p, clock.clone(), recovered.day, journal);
                h.forwarder.token_allowance().restore(recovered.tokens, clock.unix_secs());
                (Some(h.forwarder), Some(h.escalations))
            }
            None => (None, None),
        };
        let store: Arc<dyn ListStore> = Arc::new(embedded);
        let fleet = match (&forwarder, config.store.shared()) {
            (Some(f), true) => {
                let fleet = rt.block_on(connect_fleet(&config.store))?;
                f.set_fleet(fleet.clone());
                Some(fleet)
            }
            _ => None,
        };
        let (lease_period, idle_return) = (config.store.budget.lease_period.0, config.store.budget.idle_return.0);
        let ops = Arc::new(Ops::default());
        ops.reloads.last_success.set(i64::try_from(clock.unix_secs()).unwrap_or(i64::MAX));
        let iface = config.xdp().interface.clone();
        let mut state = attach(config_path, config, slot, store, clock.clone(), forwarder.clone(), ops.clone())?;
        state.run = run;
        let (share_tx, share_rx) = tokio::sync::mpsc::unbounded_channel();
        let me = fleet_lists::host_name(&iface);
        if fleet.is_some() {
            state.share = Some((share_tx, me.clone()));
        }
        if let Err(e) = state.store.mark_running(true, clock.unix_secs()) {
            warn!(error = %e, "noting the start in the store");
        }
        let (reader, sample, lists) = (state.reader.clone(), state.sample.clone(), state.lists.clone());
        let admin = Arc::new(Admin::new(Arc::new(Mutex::new(state)), reader.clone()));

        let (stop, stop_rx) = watch::channel(false);
        rt.spawn(crate::dataplane::sample::run(sample.clone(), reader.clone(), clock, stop_rx.clone()));
        if let Some(m) = listeners.metrics {
            let mut registry = crate::metrics::registry(reader, sample, &lists);
            crate::metrics::register_daemon(&mut registry, &ops.reloads, &ops.ready);
            if let Some(f) = &forwarder {
                proxy::metrics::register(f, &mut registry);
            }
            info!(addr = %m.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics at /metrics, /healthz, /readyz");
            rt.spawn(crate::metrics::serve(m, Arc::new(registry), ops.ready.clone()));
        }
        if let (Some(f), Some(fleet)) = (&forwarder, &fleet) {
            rt.spawn(keep_standby(f.clone(), lease_period, idle_return, stop_rx.clone()));
            let _in_rt = rt.enter();
            fleet_lists::spawn(
                f.clone(),
                fleet.clone(),
                admin.state.clone(),
                me,
                share_rx,
                ops.ready.clone(),
                stop_rx.clone(),
            );
        }
        let http = match (forwarder.clone(), listeners.forward) {
            (Some(f), Some(sock)) => {
                let tls = f.tls_acceptor().context("setting up TLS")?;
                info!(addr = %sock.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = tls.is_some(), "forwarder listening");
                Some(rt.spawn(proxy::serve(f, sock, tls, stop_rx, DRAIN)))
            }
            _ => None,
        };
        Ok(Daemon { admin, socket: listeners.admin, escalations, stop, http, forwarder, ops })
    }

    /// Answer the admin socket, tick, reload and escalate until told to stop.
    async fn serve(&mut self, mut sig: Signals) {
        info!(socket = %self.socket.path().display(), "admin socket ready");
        let state = self.admin.state.clone();
        // Every socket is bound and XDP attached: tell systemd.
        let summary = lock(&state).summary();
        self.ops.ready(&summary);
        info!(%summary, "ready");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut backoff = crate::accept::Backoff::new("admin");
        let watchdog = self.ops.watchdog_period();
        let mut wd = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        loop {
            tokio::select! {
                _ = sig.term.recv() => { info!("SIGTERM: shutting down"); return }
                _ = sig.int.recv() => { info!("SIGINT: shutting down"); return }
                _ = sig.hup.recv() => {
                    if let Err(e) = lock(&state).reload() {
                        warn!(error = %e, "reload refused; the running config stays");
                    }
                }
                _ = wd.tick(), if watchdog.is_some() => self.ops.ping(),
                _ = tick.tick() => {
                    let mut s = lock(&state);
                    s.gc();
                    s.flush();
                }
                Some(e) = recv(&mut self.escalations) => lock(&state).escalate(&e),
                stream = admin_server::accept(self.socket.listener(), &mut backoff) => {
                    tokio::spawn(admin_server::answer(self.admin.clone(), stream));
                }
            }
        }
    }

    /// Stop accepting forwarder requests and let those in flight finish.
    async fn drain(&mut self) {
        self.ops.stopping();
        let _ = self.stop.send(true);
        if let Some(h) = self.http.take() {
            let _ = h.await;
        }
        if let Some(f) = &self.forwarder {
            f.release_lease().await;
        }
    }
}

/// Connect to the shared store named in `[store]`: one clear line when it
/// cannot be reached or refuses the credentials.
async fn connect_fleet(cfg: &crate::config::Store) -> anyhow::Result<Arc<crate::shared::lease::Fleet>> {
    use crate::{proxy::limit::micros, shared};
    let sentinel = cfg.sentinel_service.clone().map(|svc| (cfg.sentinels.clone(), svc));
    let url = match (&cfg.redis_url, &sentinel) {
        (Some(u), _) => u.clone(),
        (None, Some((nodes, svc))) => {
            format!("sentinel {svc} via {}", nodes.iter().map(|n| shared::redact(n)).collect::<Vec<_>>().join(", "))
        }
        (None, None) => String::new(),
    };
    let sc = shared::StoreConfig { url: url.clone(), sentinel, site: cfg.site.clone(), timeout: cfg.timeout.0 };
    let store = shared::Store::connect(&sc)
        .await
        .map_err(|e| anyhow::anyhow!("cannot use the shared store at {}: {e}", shared::redact(&url)))?;
    let policy = shared::lease::LeasePolicy {
        max_lease: micros(cfg.budget.max_lease).unwrap_or(0),
        standby: micros(cfg.budget.standby_lease).unwrap_or(0),
    };
    let fleet = shared::lease::Fleet::new(store, policy);
    fleet.init().await.map_err(|e| anyhow::anyhow!("cannot use the shared store at {}: {e}", shared::redact(&url)))?;
    info!(url = %shared::redact(&url), site = %cfg.site, "sharing the budget, daily counts, lists and page tokens through the shared store");
    Ok(Arc::new(fleet))
}

/// Keep the standby lease topped up every `period`, and hand an idle
/// host's lease back after `idle`, until told to stop.
async fn keep_standby(f: Arc<Forwarder>, period: Duration, idle: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                f.keep_standby().await;
                f.return_idle(idle).await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// Say what the previous run left: how it stopped, and the reservations
/// replayed from the journal (those never settled are counted as spent).
fn log_recovered(r: &Recovered, durability: Durability) -> RunStatus {
    let spent = r.day.as_ref().map_or(0, |d| d.spent);
    let when = r.last_clean_shutdown_unix.map_or_else(|| "never".to_owned(), |t| t.to_string());
    if r.crashed {
        warn!(
            recovered = r.replayed,
            unsettled = r.unsettled,
            spent_micros = spent,
            last_clean_shutdown_unix = %when,
            "the previous run did not stop cleanly: {} reservations recovered without a settled answer (counted as spent)",
            r.unsettled
        );
    } else {
        info!(recovered = r.replayed, unsettled = r.unsettled, spent_micros = spent, last_clean_shutdown_unix = %when, "store opened");
    }
    RunStatus {
        durability: durability.name().into(),
        last_clean_shutdown_unix: r.last_clean_shutdown_unix,
        previous_run_crashed: r.crashed,
        recovered_reservations: r.replayed,
        recovered_unsettled: r.unsettled,
    }
}

/// The next escalation, or never when there is no forwarder.
async fn recv(r: &mut Option<UnboundedReceiver<Escalation>>) -> Option<Escalation> {
    match r {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Load, pin, restore the lists and attach: the state, or an error with
/// nothing left pinned or attached (the `Dataplane` undoes itself on drop).
fn attach(
    config_path: &Path,
    config: Config,
    slot: &str,
    store: Arc<dyn ListStore>,
    clock: Arc<dyn Clock>,
    forwarder: Option<Arc<Forwarder>>,
    ops: Arc<Ops>,
) -> anyhow::Result<State> {
    let x = config.xdp().clone();
    let mut dp = Dataplane::load(&x)?;
    dp.pin(&Path::new(paths::PIN_ROOT).join(slot))?;
    let reader = Arc::new(dp.reader()?);
    let mut state = State {
        config_path: config_path.to_owned(),
        config,
        dp,
        store,
        clock,
        forwarder,
        saved_spend: 0,
        lists: ListGauges::default(),
        reader,
        sample: Arc::new(SourceSample::default()),
        run: RunStatus::default(),
        unsaved: false,
        ops,
        files: Default::default(),
        share: None,
    };
    state.restore_lists()?;
    state.load_files()?;
    state.dp.attach(&x.interface, x.mode)?;
    Ok(state)
}
