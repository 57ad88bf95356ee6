//! The daemon's two tasks that keep its lists in step with the other hosts'
//! through the shared store (`crate::shared::lists`): the publisher, which
//! writes this host's list changes (manual and escalated) in order and keeps
//! them queued while the store does not answer, and the tail, which reads
//! the others' changes from the stream (a bounded `XREAD BLOCK` on a
//! connection of its own) and applies them to the XDP maps and the embedded
//! store with the daemon's own list machinery. The tail resynchronises from
//! the shared state at start, after every reconnect, when its position was
//! trimmed from the stream, and once a minute; what the state lacks of this
//! host's entries (the store restarted empty, or they were written while it
//! was away) is published again, and said in the log. The tail is also
//! what notices a store restart (the store's epoch changed): it reports this host's
//! budget lease again (`Forwarder::report_lease`), and what beats this
//! host's heartbeat (the live hosts' count). During an outage the
//! maps keep what they hold. The tail's reads, at least one a second, also
//! say whether the store answers, for `/readyz`.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc::UnboundedReceiver, watch};
use tracing::{info, warn};

use super::state::{State, lock};
use crate::metrics::Readiness;
use crate::shared::{
    StoreError,
    lease::Fleet,
    lists::{Change, SharedLists},
};

/// How long one `XREAD` waits for a change.
const BLOCK: Duration = Duration::from_millis(1000);
/// Between attempts while the store does not answer.
const RETRY: Duration = Duration::from_millis(500);
/// A full resynchronisation at least this often.
const RECONCILE: Duration = Duration::from_secs(60);
/// How often this host says it is alive (the live hosts share the per-IP
/// caps while the store does not answer).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Changes kept for publishing while the store is away (the oldest dropped beyond).
const QUEUE_MAX: usize = 10_000;

/// What both tasks share.
pub(super) struct ListSync {
    fleet: Arc<Fleet>,
    lists: SharedLists,
    state: Arc<Mutex<State>>,
    me: String,
    ready: Arc<Readiness>,
    forwarder: Arc<crate::proxy::Forwarder>,
}

/// This host's name among the others: the host name and the XDP interface.
pub(super) fn host_name(iface: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{iface}", host.trim())
}

/// Start the publisher and the tail; they stop when `stop` turns true.
pub(super) fn spawn(
    forwarder: Arc<crate::proxy::Forwarder>,
    fleet: Arc<Fleet>,
    state: Arc<Mutex<State>>,
    me: String,
    changes: UnboundedReceiver<Change>,
    ready: Arc<Readiness>,
    stop: watch::Receiver<bool>,
) {
    let lists = SharedLists::new(&fleet.store);
    let sync = Arc::new(ListSync { fleet, lists, state, me, ready, forwarder });
    tokio::spawn(publisher(sync.clone(), changes, stop.clone()));
    tokio::spawn(tail(sync, stop));
}

/// Sleep `d`; false when told to stop meanwhile.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// Publish this host's changes in order; while the store does not answer,
/// keep them (up to `QUEUE_MAX`) and try again.
async fn publisher(sync: Arc<ListSync>, mut rx: UnboundedReceiver<Change>, mut stop: watch::Receiver<bool>) {
    let mut queue = VecDeque::new();
    let mut failing = false;
    loop {
        if queue.is_empty() {
            tokio::select! {
                c = rx.recv() => match c { Some(c) => queue.push_back(c), None => return },
                _ = stop.changed() => return,
            }
        }
        while let Ok(c) = rx.try_recv() {
            queue.push_back(c);
        }
        if queue.len() > QUEUE_MAX {
            let dropped = queue.len() - QUEUE_MAX;
            queue.drain(..dropped);
            warn!(
                dropped,
                "list changes not yet published dropped (the queue is full); the next resync publishes what this host holds"
            );
        }
        let Some(c) = queue.front() else { continue };
        match sync.lists.publish(&sync.fleet.store, c).await {
            Ok(_) => {
                queue.pop_front();
                if std::mem::take(&mut failing) {
                    info!("list changes published again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    warn!(error = %e, queued = queue.len(), "cannot publish list changes to the shared store; queued, the XDP maps keep their state");
                }
                if !pause(RETRY, &mut stop).await {
                    return;
                }
            }
        }
    }
}

/// Follow the other hosts' changes until told to stop, reconnecting and
/// resynchronising whenever the store comes back.
async fn tail(sync: Arc<ListSync>, mut stop: watch::Receiver<bool>) {
    let mut pos = String::from("0-0");
    let mut run: Option<String> = None;
    let mut failing = false;
    loop {
        match follow(&sync, &mut pos, &mut run, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                sync.ready.shared_store_ok.store(false, Ordering::Relaxed);
                if !std::mem::replace(&mut failing, true) {
                    warn!(error = %e, "lost the shared list stream; the XDP maps keep their state, reconnecting");
                }
            }
        }
        if !pause(RETRY, &mut stop).await {
            return;
        }
    }
}

/// One connection's worth of following: connect, resynchronise, read.
/// `Ok` when told to stop.
async fn follow(
    sync: &ListSync,
    pos: &mut String,
    run: &mut Option<String>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let store = &sync.fleet.store;
    let mut conn = store.blocking_connection(BLOCK).await?;
    let epoch = sync.fleet.epoch().await?;
    // A new epoch (or none) means the store lost what it held: a restart
    // without persistence. A failover to a replica keeps the epoch.
    let restarted = run.as_ref().is_some_and(|seen| epoch.as_ref() != Some(seen));
    if restarted {
        warn!(
            "the shared store restarted and lost what it held: the budget's grants and the daily counts are rebuilt from what the hosts report, the lists from what they hold"
        );
        // Not noted as seen until reported: a failure here is retried at the next connection.
        sync.forwarder.report_lease().await?;
        sync.fleet.note_restart();
        *run = sync.fleet.epoch().await?;
    } else {
        *run = epoch;
    }
    resync(sync, pos, restarted).await?;
    sync.ready.shared_store_ok.store(true, Ordering::Relaxed);
    sync.fleet.heartbeat(&sync.me).await?;
    let (mut reconciled, mut beat) = (Instant::now(), Instant::now());
    loop {
        if reconciled.elapsed() >= RECONCILE {
            resync(sync, pos, false).await?;
            reconciled = Instant::now();
        }
        let read = tokio::select! {
            r = tokio::time::timeout(BLOCK + store.timeout() * 2, sync.lists.read(&mut conn, pos, BLOCK)) => r,
            _ = stop.changed() => return Ok(()),
        };
        let batch = read.map_err(|_| StoreError::Timeout(BLOCK))??;
        sync.ready.shared_store_ok.store(true, Ordering::Relaxed);
        if beat.elapsed() >= HEARTBEAT {
            beat = Instant::now();
            if let Err(e) = sync.fleet.heartbeat(&sync.me).await {
                tracing::debug!(error = %e, "heartbeat not written");
            }
        }
        let full = batch.len() >= 256;
        apply(sync, pos, batch);
        if full {
            // Behind the stream: make sure nothing was trimmed past us.
            resync(sync, pos, false).await?;
            reconciled = Instant::now();
        }
    }
}

/// Apply a batch read from the stream (this host's own changes skipped).
fn apply(sync: &ListSync, pos: &mut String, batch: Vec<(String, Option<Change>)>) {
    if batch.is_empty() {
        return;
    }
    let mut state = lock(&sync.state);
    for (id, c) in batch {
        if let Some(c) = c.filter(|c| c.origin != sync.me)
            && let Err(e) = state.apply_shared(&c)
        {
            warn!(cidr = %c.cidr, error = %e, "applying a list change from another host");
        }
        *pos = id;
    }
}

/// Read the shared state, apply it, publish what it lacks of this host's,
/// and move `pos` to the stream's newest entry.
async fn resync(sync: &ListSync, pos: &mut String, restarted: bool) -> Result<(), StoreError> {
    let store = &sync.fleet.store;
    let now = crate::clock::Clock::unix_secs(&crate::clock::SystemClock);
    let (snap, trimmed) = sync.lists.snapshot(store, pos, now).await?;
    if trimmed {
        warn!(position = %pos, "the shared list stream was trimmed past this host's position; resynchronised from the shared state");
    }
    let (applied, missing) = match lock(&sync.state).resync_shared(&snap.changes, &sync.me) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "resynchronising the lists from the shared state");
            (0, Vec::new())
        }
    };
    for c in &missing {
        sync.lists.publish(store, c).await?;
    }
    if restarted {
        warn!(
            republished = missing.len(),
            "the shared store had lost the lists: published again the {} entries this host holds",
            missing.len()
        );
    }
    if applied > 0 || !missing.is_empty() || restarted || trimmed {
        info!(state = snap.changes.len(), applied, published = missing.len(), position = %snap.last_id, "lists resynchronised with the shared store");
    }
    *pos = snap.last_id;
    Ok(())
}
