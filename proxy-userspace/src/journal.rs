//! The reservation journal: a crash never overspends. Every billable call's
//! reservation (its day, the per-IP identity and network it was counted
//! under, its cost, and the page token whose call it took) is appended to a
//! table of the embedded store and committed durably before the call leaves.
//!
//! One writer thread owns the journal's write transactions. Callers queue a
//! record and await a oneshot; each commit covers every record queued while
//! the previous commit was on its way to disk (group commit), so concurrent
//! calls share one fsync. Settlements (billed, or given back) are queued the
//! same way but nobody waits for them, and they never cost a commit of
//! their own: they go with the next reservation's (or are made moot by the
//! next snapshot). A lost one counts the call as spent, never the reverse.
//!
//! Reservations and refunds are numbered by the limiter under the lock that
//! changes the counts. The counters are snapshotted every second (see
//! [`crate::store`]) with their watermark, the number of the last
//! reservation or refund they include, and the same transaction drops the
//! journal's records up to it. On start, [`replay`] rebuilds the counters as
//! the snapshot plus the newer reservations, less the newer refunds; a
//! reservation with no settlement recorded is counted as spent. Page token
//! calls are added back the same way but never given back on replay (a
//! token's snapshot may or may not include a refund made as it was taken):
//! after a crash a token may count a call too many, never one too few.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use redb::{Database, Durability, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{
    proxy::limit::{DayCounts, Reservation},
    token::{allowance::AllowanceEntry, codec::Nonce},
    units::Cidr,
};

/// The journal table: (sequence number, kind) → for [`Kind::Reserved`] and
/// [`Kind::Refunded`], what was taken or given back (JSON); for
/// [`Kind::Billed`] (numbered as the reservation it keeps), nothing.
pub(crate) const TABLE: TableDefinition<'static, (u64, u8), &'static [u8]> = TableDefinition::new("journal");

/// The most records one commit takes; the rest wait for the next.
const MAX_BATCH: usize = 4096;

/// What a journal record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Taken, before the call left.
    Reserved = 0,
    /// The answer was billable: kept.
    Billed = 1,
    /// The answer was not billable, or the call never left: given back.
    Refunded = 2,
}

/// A refund as journaled: the reservation it gives back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// The reservation's sequence number.
    pub of: u64,
    #[serde(flatten)]
    pub what: Reserved,
}

/// The page token call a reservation took.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCall {
    pub nonce: Nonce,
    pub expires_unix: u64,
}

/// A reservation as journaled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserved {
    pub day: u64,
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Cidr>,
    pub cost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenCall>,
}

impl Reserved {
    /// The record of `r`, with the token call it took.
    pub fn of(r: &Reservation, token: Option<TokenCall>) -> Reserved {
        Reserved { day: r.day(), ip: r.ip(), network: r.network(), cost: r.cost(), token }
    }
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Reservation `seq`.
    Reserved(u64, Reserved),
    /// Reservation `seq` was billed.
    Billed(u64),
    /// Refund `seq` (its own number, taken when it was given back).
    Refunded(u64, Refund),
}

impl Record {
    fn key(&self) -> (u64, u8) {
        match self {
            Record::Reserved(s, _) => (*s, Kind::Reserved as u8),
            Record::Billed(s) => (*s, Kind::Billed as u8),
            Record::Refunded(s, _) => (*s, Kind::Refunded as u8),
        }
    }

    fn value(&self) -> Vec<u8> {
        match self {
            Record::Reserved(_, r) => serde_json::to_vec(r).unwrap_or_default(),
            Record::Refunded(_, r) => serde_json::to_vec(r).unwrap_or_default(),
            Record::Billed(_) => Vec::new(),
        }
    }
}

/// A reservation could not be made durable.
#[derive(Clone, Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the reservation journal could not be written: {0}")]
    Store(String),
    #[error("the reservation journal is stopped")]
    Stopped,
}

/// A record queued for the writer, with whoever waits for its commit.
struct Op {
    key: (u64, u8),
    value: Vec<u8>,
    done: Option<oneshot::Sender<Result<(), JournalError>>>,
}

/// The handle callers queue records on; dropping it lets the writer commit
/// what is queued and stop.
pub struct Journal {
    tx: Option<mpsc::Sender<Op>>,
    commits: Arc<AtomicU64>,
    writer: Option<JoinHandle<()>>,
}

impl Journal {
    /// Start the writer thread on `db` (whose [`TABLE`] exists).
    pub fn start(db: Arc<Database>) -> std::io::Result<Journal> {
        let (tx, rx) = mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let c = commits.clone();
        let writer = std::thread::Builder::new().name("kw-journal".into()).spawn(move || run(&db, &rx, &c))?;
        Ok(Journal { tx: Some(tx), commits, writer: Some(writer) })
    }

    /// Queue `r` now; the future is ready once it is on disk (with
    /// whatever else was queued meanwhile).
    pub fn append(&self, r: Record) -> impl Future<Output = Result<(), JournalError>> + use<> {
        let (done, wait) = oneshot::channel();
        let queued = self.send(&r, Some(done));
        async move {
            queued?;
            wait.await.unwrap_or(Err(JournalError::Stopped))
        }
    }

    /// Append `r` with the next commit made for a waiter, without waiting.
    pub fn append_lazy(&self, r: Record) {
        let _ = self.send(&r, None);
    }

    fn send(&self, r: &Record, done: Option<oneshot::Sender<Result<(), JournalError>>>) -> Result<(), JournalError> {
        let tx = self.tx.as_ref().ok_or(JournalError::Stopped)?;
        tx.send(Op { key: r.key(), value: r.value(), done }).map_err(|_| JournalError::Stopped)
    }

    /// Commits made so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The writer: take every record queued, and commit once a caller waits on
/// one of them (settlements alone wait for the next reservation's commit,
/// or for the snapshot that makes them moot), answering every waiter; when
/// every handle is gone, commit what is left and stop.
fn run(db: &Database, rx: &mpsc::Receiver<Op>, commits: &AtomicU64) {
    let mut batch: Vec<Op> = Vec::new();
    let mut waited = false;
    while let Ok(op) = rx.recv() {
        waited |= op.done.is_some();
        batch.push(op);
        for op in rx.try_iter().take(MAX_BATCH.saturating_sub(batch.len())) {
            waited |= op.done.is_some();
            batch.push(op);
        }
        if waited || batch.len() >= MAX_BATCH {
            commit(db, std::mem::take(&mut batch), commits);
            waited = false;
        }
    }
    if !batch.is_empty() {
        commit(db, batch, commits);
    }
}

/// One commit of `batch`; every waiter gets its outcome.
fn commit(db: &Database, batch: Vec<Op>, commits: &AtomicU64) {
    let result = write(db, &batch).map_err(|e| JournalError::Store(e.to_string()));
    commits.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = &result {
        tracing::error!(error = %e, records = batch.len(), "journal commit failed: the calls waiting on it are refused");
    }
    for op in batch {
        if let Some(done) = op.done {
            let _ = done.send(result.clone());
        }
    }
}

fn write(db: &Database, batch: &[Op]) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    {
        let mut t = tx.open_table(TABLE)?;
        for op in batch {
            t.insert(op.key, op.value.as_slice())?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The counters and token counts rebuilt at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub counts: Option<DayCounts>,
    pub tokens: Vec<AllowanceEntry>,
    /// Reservations newer than the snapshot (given back ones included).
    pub replayed: u64,
    /// Of those, with no settlement recorded: counted as spent.
    pub unsettled: u64,
}

/// A journal record that cannot be read (its cost is unknown: refusing to
/// start is the only answer that cannot overspend).
#[derive(Debug, thiserror::Error)]
#[error("journal record {seq} cannot be read ({reason}); the day's spend cannot be known")]
pub struct Unreadable {
    pub seq: u64,
    pub reason: String,
}

/// One replayed change, in sequence order.
enum Change {
    Take(Reserved),
    Give(Refund),
}

/// The snapshot (`counts`, `tokens`) plus the journal's `records` (in key
/// order) newer than its watermark.
pub fn replay(
    counts: Option<DayCounts>,
    tokens: Vec<AllowanceEntry>,
    records: impl IntoIterator<Item = ((u64, u8), Vec<u8>)>,
) -> Result<Replayed, Unreadable> {
    let watermark = counts.as_ref().map_or(0, |c| c.seq);
    let mut changes = BTreeMap::new();
    let mut billed = HashSet::new();
    for ((seq, kind), value) in records.into_iter().filter(|((s, _), _)| *s > watermark) {
        let bad = |e: serde_json::Error| Unreadable { seq, reason: e.to_string() };
        match kind {
            k if k == Kind::Reserved as u8 => {
                changes.insert(seq, Change::Take(serde_json::from_slice(&value).map_err(bad)?));
            }
            k if k == Kind::Refunded as u8 => {
                changes.insert(seq, Change::Give(serde_json::from_slice(&value).map_err(bad)?));
            }
            _ => {
                billed.insert(seq);
            }
        }
    }
    let reserved: HashSet<u64> =
        changes.iter().filter_map(|(s, c)| matches!(c, Change::Take(_)).then_some(*s)).collect();
    let given: HashSet<u64> =
        changes.values().filter_map(|c| if let Change::Give(g) = c { Some(g.of) } else { None }).collect();
    let mut out = Replayed { replayed: reserved.len() as u64, ..Replayed::default() };
    let mut tokens: HashMap<Nonce, AllowanceEntry> = tokens.into_iter().map(|e| (e.nonce, e)).collect();
    let mut c = counts;
    for (seq, change) in changes {
        let first_day = match &change {
            Change::Take(r) => r.day,
            Change::Give(g) => g.what.day,
        };
        let day = c.get_or_insert_with(|| DayCounts { day: first_day, ..DayCounts::default() });
        day.seq = day.seq.max(seq);
        match change {
            Change::Take(r) => {
                if !billed.contains(&seq) && !given.contains(&seq) {
                    out.unsettled += 1;
                }
                take(day, &r);
                if let Some(t) = r.token {
                    let e = tokens.entry(t.nonce).or_insert(AllowanceEntry {
                        nonce: t.nonce,
                        used: 0,
                        expires_unix: t.expires_unix,
                    });
                    e.used = e.used.saturating_add(1);
                }
            }
            // Only what was taken: in the snapshot, or replayed above.
            Change::Give(g) if g.of <= watermark || reserved.contains(&g.of) => give(day, &g.what),
            Change::Give(_) => {}
        }
    }
    out.counts = c;
    let mut tokens: Vec<AllowanceEntry> = tokens.into_values().collect();
    tokens.sort_by_key(|e| e.nonce);
    out.tokens = tokens;
    Ok(out)
}

/// Apply a reservation to the counters: a later day starts afresh, an
/// earlier one is no longer counted.
fn take(c: &mut DayCounts, r: &Reserved) {
    if r.day > c.day {
        *c = DayCounts { day: r.day, seq: c.seq, ..DayCounts::default() };
    }
    if r.day < c.day {
        return;
    }
    c.spent = c.spent.saturating_add(r.cost);
    *c.per_ip.entry(r.ip).or_insert(0) += 1;
    if let Some(n) = r.network {
        *c.per_prefix.entry(n).or_insert(0) += 1;
    }
}

/// Apply a refund, as the limiter does: only to the day it was taken on.
fn give(c: &mut DayCounts, r: &Reserved) {
    if r.day != c.day {
        return;
    }
    c.spent = c.spent.saturating_sub(r.cost);
    if let Some(n) = c.per_ip.get_mut(&r.ip) {
        *n = n.saturating_sub(1);
    }
    if let Some(n) = r.network.and_then(|net| c.per_prefix.get_mut(&net)) {
        *n = n.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests;
