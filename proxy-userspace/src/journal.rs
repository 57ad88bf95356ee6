//! The reservation journal: a crash never overspends. Every billable call's
//! reservation (its day, the per-IP identity and network it was counted
//! under, its cost, and the page token whose call it took) is appended to an
//! append-only file of fixed-size, checksummed records beside the embedded
//! store ([`file`]: `<store.path>/journal/`) and made durable before the
//! call leaves.
//!
//! One writer thread owns the journal's file ([`writer`]).
//! Callers queue a record and await the commit it goes into; each commit
//! covers every record queued while the previous commit was on its way to
//! disk (group commit), so concurrent calls share one fsync and one wakeup. Settlements (billed, or given back) are queued the
//! same way but nobody waits for them, and they never cost a commit of
//! their own: they go with the next reservation's (or are made moot by the
//! next snapshot). A lost one counts the call as spent, never the reverse.
//!
//! Reservations and refunds are numbered by the limiter under the lock that
//! changes the counts. The counters are snapshotted every second (see
//! [`crate::store`]) with their watermark, the number of the last
//! reservation or refund they include; once that snapshot is durable, the
//! journal's files it covers are emptied or deleted. Earlier versions kept
//! the journal in a table of the store ([`TABLE`]): it is replayed with the
//! files, and emptied by the first snapshot. On start, [`replay`] rebuilds the counters as
//! the snapshot plus the newer reservations, less the newer refunds; a
//! reservation with no settlement recorded is counted as spent. Page token
//! calls are added back the same way but never given back on replay (a
//! token's snapshot may or may not include a refund made as it was taken):
//! after a crash a token may count a call too many, never one too few.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::{
    proxy::limit::{DayCounts, Reservation},
    token::{allowance::AllowanceEntry, codec::Nonce},
    units::Cidr,
};

pub mod file;
mod record;
mod writer;

pub use writer::{Journal, Log};

/// The journal table of earlier versions, read at start and emptied by the
/// first snapshot: (sequence number, kind) → for [`Kind::Reserved`] and
/// [`Kind::Refunded`], what was taken or given back (a fixed-size binary
/// record, or JSON as written before it: see [`record`]); for
/// [`Kind::Billed`] (numbered as the reservation it keeps), nothing. The
/// files hold the same keys and values.
pub(crate) const TABLE: TableDefinition<'static, (u64, u8), &'static [u8]> = TableDefinition::new("journal");

/// A record as stored: its key (sequence number, kind) and its value.
pub type Stored = ((u64, u8), Vec<u8>);

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

    /// The value on disk, encoded inline.
    fn encode(&self) -> record::Value {
        match self {
            Record::Reserved(_, r) => record::encode(r, None),
            Record::Refunded(_, r) => record::encode(&r.what, Some(r.of)),
            Record::Billed(_) => record::Value::EMPTY,
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
        let bad = |reason: String| Unreadable { seq, reason };
        match kind {
            k if k == Kind::Reserved as u8 => {
                changes.insert(seq, Change::Take(record::reserved(&value).map_err(bad)?));
            }
            k if k == Kind::Refunded as u8 => {
                changes.insert(seq, Change::Give(record::refund(&value).map_err(bad)?));
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
