//! Persistent state behind one trait, so the embedded default (redb, a single
//! file under `store.path`) can be joined by a shared Redis backend without
//! the daemon changing: the allow and deny lists, with deny expiries as
//! wall-clock Unix seconds (monotonic clocks do not survive a reboot) and
//! why and when each entry was added (a table beside each list), today's
//! counters (spend, per-IP counts, alerts raised, escalations, page token
//! counts), snapshotted every second, and the reservation journal
//! ([`crate::journal`], its own append-only files in `journal/` beside the
//! redb file) that makes every reservation durable before its call leaves:
//! once a snapshot is durable, the journal's files it covers are cut, and a
//! start replays the rest. Also when a run last stopped cleanly.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::{
    journal::{self, Journal, file},
    proxy::limit::DayCounts,
    token::allowance::AllowanceEntry,
    units::Cidr,
};

const DAY: TableDefinition<'static, &'static str, u64> = TableDefinition::new("day");
/// `running` (1 while a run has not stopped cleanly) and `clean_shutdown_unix`.
const RUN: TableDefinition<'static, &'static str, u64> = TableDefinition::new("run");
/// Page-token call counts: nonce → `expiry << 32 | used`.
const TOKENS: TableDefinition<'static, &'static str, u64> = TableDefinition::new("tokens");

/// A list the operator manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum List {
    /// Sources that bypass rate limits.
    Allow,
    /// Sources dropped in XDP.
    Deny,
}

impl List {
    /// The operator's name for the list (`allow`, `deny`), as the CLI verbs spell it.
    pub fn name(self) -> &'static str {
        match self {
            List::Allow => "allow",
            List::Deny => "deny",
        }
    }

    fn table(self) -> TableDefinition<'static, &'static str, u64> {
        match self {
            List::Allow => TableDefinition::new("allow"),
            List::Deny => TableDefinition::new("deny"),
        }
    }

    /// CIDR → `"<added unix> <reason>"`, beside the list (stores written
    /// before it existed have entries without one).
    fn meta(self) -> TableDefinition<'static, &'static str, &'static str> {
        match self {
            List::Allow => TableDefinition::new("allow_meta"),
            List::Deny => TableDefinition::new("deny_meta"),
        }
    }
}

/// One stored entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub cidr: Cidr,
    /// Unix seconds after which the entry no longer applies; `None` = never.
    pub expires_unix: Option<u64>,
    /// Why it is listed: `manual`, `escalated: daily cap`, `file: NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was added (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_unix: Option<u64>,
}

impl Entry {
    /// An entry without provenance (as stored before provenance was kept).
    pub fn bare(cidr: Cidr, expires_unix: Option<u64>) -> Entry {
        Entry { cidr, expires_unix, reason: None, added_unix: None }
    }
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError(e.into().to_string())
    }
}

/// What a start finds the previous run left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The counters as of the last durable write: the last snapshot plus the
    /// journal's newer reservations (whatever day they are for).
    pub day: Option<DayCounts>,
    /// Page token call counts, the same way.
    pub tokens: Vec<AllowanceEntry>,
    /// Reservations found in the journal newer than the snapshot.
    pub replayed: u64,
    /// Of those, with no settled answer recorded: counted as spent.
    pub unsettled: u64,
    /// When a run last stopped cleanly (Unix seconds).
    pub last_clean_shutdown_unix: Option<u64>,
    /// The previous run did not stop cleanly (a crash, `kill -9`, power loss).
    pub crashed: bool,
}

/// What the daemon needs from persistent storage.
pub trait ListStore: Send + Sync {
    /// Insert or replace an entry.
    fn put(&self, list: List, entry: &Entry) -> Result<(), StoreError>;
    /// Insert or replace entries, all or none where the backend can.
    fn put_many(&self, list: List, entries: &[Entry]) -> Result<(), StoreError> {
        entries.iter().try_for_each(|e| self.put(list, e))
    }

    /// Remove an entry; false when it was not there.
    fn remove(&self, list: List, cidr: &Cidr) -> Result<bool, StoreError>;
    /// All entries of a list, in CIDR text order.
    fn entries(&self, list: List) -> Result<Vec<Entry>, StoreError>;
    /// Replace the persisted page-token call counts with `entries`.
    fn save_tokens(&self, entries: &[AllowanceEntry]) -> Result<(), StoreError>;
    /// Replace the persisted counters with `c` (and the token counts with
    /// `tokens`, when given), and drop the journal's records up to `c.seq`
    /// (which `c` includes), in one durable transaction.
    fn save_day(&self, c: &DayCounts, tokens: Option<&[AllowanceEntry]>) -> Result<(), StoreError>;
    /// What the previous run left: its counters and token counts as of its
    /// last durable write, and how it stopped.
    fn recover(&self) -> Result<Recovered, StoreError>;
    /// Note that a run is serving (`true`), or that it stopped cleanly at
    /// `now_unix` after its last [`ListStore::save_day`] (`false`).
    fn mark_running(&self, running: bool, now_unix: u64) -> Result<(), StoreError>;
}

/// The embedded store: one redb file, and the journal's directory.
pub struct Embedded {
    db: Arc<Database>,
    journal: Arc<file::Dir>,
    /// The journal table of earlier versions exists (until a snapshot
    /// covers its records and drops it).
    old_journal: AtomicBool,
}

impl Embedded {
    /// Open (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Embedded, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let file = dir.join("keyward.redb");
        let db = Database::create(&file)
            .map_err(|e| StoreError(format!("cannot open {}: {}", file.display(), redb::Error::from(e))))?;
        let tx = db.begin_write()?;
        for l in [List::Allow, List::Deny] {
            tx.open_table(l.table())?;
            tx.open_table(l.meta())?;
        }
        tx.open_table(DAY)?;
        tx.open_table(RUN)?;
        tx.commit()?;
        let old_journal = match db.begin_read()?.open_table(journal::TABLE) {
            Ok(_) => true,
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(e.into()),
        };
        let journal = file::Dir::open(dir)
            .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.join("journal").display())))?;
        Ok(Embedded { db: Arc::new(db), journal, old_journal: AtomicBool::new(old_journal) })
    }

    /// The redb database (for tests that read it directly).
    #[cfg(test)]
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    /// The journal's directory (for tests that read it directly).
    #[cfg(test)]
    pub(crate) fn journal_dir(&self) -> &std::path::Path {
        self.journal.path()
    }

    /// Start the journal's writer on a new file of this store's journal.
    pub fn journal(&self) -> Result<Journal, StoreError> {
        let start = || Journal::start(self.journal.log()?);
        start().map_err(|e| StoreError(format!("cannot start the journal writer: {e}")))
    }

    /// The old journal table's records (empty once a snapshot followed).
    fn table_records(tx: &redb::ReadTransaction) -> Result<Vec<journal::Stored>, StoreError> {
        let t = match tx.open_table(journal::TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut records = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            records.push((k.value(), v.value().to_vec()));
        }
        Ok(records)
    }

    /// The snapshot plus the journal's newer records, and the run markers.
    fn replay(&self) -> Result<Recovered, StoreError> {
        let (day, tokens) = (self.read_day()?, self.read_tokens()?);
        let tx = self.db.begin_read()?;
        let mut records = Self::table_records(&tx)?;
        let files = self
            .journal
            .replay()
            .map_err(|e| StoreError(format!("cannot read the journal in {}: {e}", self.journal.path().display())))?;
        records.extend(files);
        records.sort_by_key(|(k, _)| *k);
        let r = journal::replay(day, tokens, records).map_err(|e| StoreError(e.to_string()))?;
        let meta = tx.open_table(RUN)?;
        let get = |k: &str| -> Result<Option<u64>, StoreError> { Ok(meta.get(k)?.map(|v| v.value())) };
        Ok(Recovered {
            day: r.counts,
            tokens: r.tokens,
            replayed: r.replayed,
            unsettled: r.unsettled,
            last_clean_shutdown_unix: get("clean_shutdown_unix")?,
            crashed: get("running")? == Some(1),
        })
    }
}

impl ListStore for Embedded {
    fn put(&self, list: List, entry: &Entry) -> Result<(), StoreError> {
        self.put_many(list, std::slice::from_ref(entry))
    }

    fn put_many(&self, list: List, entries: &[Entry]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(list.table())?;
            let mut meta = tx.open_table(list.meta())?;
            for entry in entries {
                let key = entry.cidr.to_string();
                t.insert(key.as_str(), entry.expires_unix.unwrap_or(0))?;
                match &entry.reason {
                    Some(r) => {
                        let v = format!("{} {r}", entry.added_unix.unwrap_or(0));
                        meta.insert(key.as_str(), v.as_str())?;
                    }
                    None => {
                        meta.remove(key.as_str())?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn remove(&self, list: List, cidr: &Cidr) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let was = {
            let key = cidr.to_string();
            tx.open_table(list.meta())?.remove(key.as_str())?;
            let mut t = tx.open_table(list.table())?;
            t.remove(key.as_str())?.is_some()
        };
        tx.commit()?;
        Ok(was)
    }

    fn entries(&self, list: List) -> Result<Vec<Entry>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(list.table())?;
        let meta = tx.open_table(list.meta())?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            // Entries were validated on the way in; skip (and log) anything
            // that no longer parses rather than refusing to start.
            match k.value().parse::<Cidr>() {
                Ok(cidr) => {
                    let e = v.value();
                    let mut entry = Entry::bare(cidr, (e != 0).then_some(e));
                    if let Some(m) = meta.get(k.value())? {
                        let (at, why) = m.value().split_once(' ').unwrap_or(("0", m.value()));
                        entry.added_unix = at.parse().ok().filter(|t| *t != 0);
                        entry.reason = Some(why.to_owned());
                    }
                    out.push(entry);
                }
                Err(e) => tracing::warn!(entry = k.value(), error = %e, "skipping unreadable stored entry"),
            }
        }
        Ok(out)
    }

    fn save_day(&self, c: &DayCounts, tokens: Option<&[AllowanceEntry]>) -> Result<(), StoreError> {
        self.write_day(c, tokens)
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        self.replay()
    }

    fn mark_running(&self, running: bool, now_unix: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(RUN)?;
            t.insert("running", u64::from(running))?;
            if !running {
                t.insert("clean_shutdown_unix", now_unix)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn save_tokens(&self, entries: &[AllowanceEntry]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        write_tokens(&tx, entries)?;
        tx.commit()?;
        Ok(())
    }
}

/// Replace the token counts inside `tx`.
fn write_tokens(tx: &redb::WriteTransaction, entries: &[AllowanceEntry]) -> Result<(), StoreError> {
    tx.delete_table(TOKENS)?;
    let mut t = tx.open_table(TOKENS)?;
    for e in entries {
        let (k, v) = e.to_kv();
        t.insert(k.as_str(), v)?;
    }
    Ok(())
}

impl Embedded {
    /// The persisted page-token call counts.
    fn read_tokens(&self) -> Result<Vec<AllowanceEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(TOKENS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            if let Some(e) = AllowanceEntry::from_kv(k.value(), v.value()) {
                out.push(e);
            }
        }
        Ok(out)
    }
}

impl Embedded {
    fn write_day(&self, c: &DayCounts, tokens: Option<&[AllowanceEntry]>) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.delete_table(DAY)?;
        let old_journal_gone = self.old_journal.load(Ordering::SeqCst) && {
            let mut t = tx.open_table(journal::TABLE)?;
            t.retain_in(..=(c.seq, u8::MAX), |_, _| false)?;
            t.is_empty()?
        };
        if old_journal_gone {
            tx.delete_table(journal::TABLE)?;
        }
        {
            if let Some(tokens) = tokens {
                write_tokens(&tx, tokens)?;
            }
            let mut t = tx.open_table(DAY)?;
            t.insert("day", c.day)?;
            t.insert("spent", c.spent)?;
            t.insert("seq", c.seq)?;
            for (ip, n) in &c.per_ip {
                t.insert(format!("ip/{ip}").as_str(), u64::from(*n))?;
            }
            for i in &c.alerted {
                t.insert(format!("alert/{i}").as_str(), 1)?;
            }
            for ip in &c.escalated {
                t.insert(format!("esc/{ip}").as_str(), 1)?;
            }
            for (net, n) in &c.per_prefix {
                t.insert(format!("net/{net}").as_str(), u64::from(*n))?;
            }
            for net in &c.escalated_prefixes {
                t.insert(format!("escnet/{net}").as_str(), 1)?;
            }
        }
        tx.commit()?;
        if old_journal_gone {
            self.old_journal.store(false, Ordering::SeqCst);
        }
        // Durable: the journal's records it covers may go.
        self.journal.covered(c.seq);
        Ok(())
    }

    fn read_day(&self) -> Result<Option<DayCounts>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DAY)?;
        let mut c = DayCounts::default();
        let mut seen = false;
        for row in t.iter()? {
            let (k, v) = row?;
            let (k, v) = (k.value(), v.value());
            seen = true;
            match k {
                "day" => c.day = v,
                "spent" => c.spent = v,
                "seq" => c.seq = v,
                _ => {
                    if let Some(ip) = k.strip_prefix("ip/").and_then(|i| i.parse().ok()) {
                        c.per_ip.insert(ip, u32::try_from(v).unwrap_or(u32::MAX));
                    } else if let Some(i) = k.strip_prefix("alert/").and_then(|i| i.parse().ok()) {
                        c.alerted.insert(i);
                    } else if let Some(ip) = k.strip_prefix("esc/").and_then(|i| i.parse().ok()) {
                        c.escalated.insert(ip);
                    } else if let Some(net) = k.strip_prefix("net/").and_then(|i| i.parse().ok()) {
                        c.per_prefix.insert(net, u32::try_from(v).unwrap_or(u32::MAX));
                    } else if let Some(net) = k.strip_prefix("escnet/").and_then(|i| i.parse().ok()) {
                        c.escalated_prefixes.insert(net);
                    }
                }
            }
        }
        Ok(seen.then_some(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "keyward-store-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn entries_persist_across_reopen() {
        let d = tmp();
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        let e: Cidr = "2001:db8::/32".parse().unwrap();
        {
            let s = Embedded::open(&d).unwrap();
            s.put(List::Allow, &Entry::bare(c, None)).unwrap();
            s.put(List::Deny, &Entry::bare(e, Some(42))).unwrap();
        }
        let s = Embedded::open(&d).unwrap();
        assert_eq!(s.entries(List::Allow).unwrap(), vec![Entry::bare(c, None)]);
        assert_eq!(s.entries(List::Deny).unwrap(), vec![Entry::bare(e, Some(42))]);
        // Why and when, kept beside the entry and gone with it.
        let why = Entry {
            reason: Some("escalated: daily cap".into()),
            added_unix: Some(1_700_000_000),
            ..Entry::bare(c, Some(9))
        };
        s.put(List::Deny, &why).unwrap();
        assert_eq!(s.entries(List::Deny).unwrap(), vec![why.clone(), Entry::bare(e, Some(42))]);
        assert!(s.remove(List::Deny, &c).unwrap());
        s.put(List::Deny, &Entry::bare(c, None)).unwrap();
        assert_eq!(s.entries(List::Deny).unwrap()[0], Entry::bare(c, None));
        assert!(s.remove(List::Deny, &c).unwrap());
        assert!(s.remove(List::Deny, &e).unwrap());
        assert!(!s.remove(List::Deny, &e).unwrap());
        assert!(s.entries(List::Deny).unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn day_counters_round_trip() {
        let d = tmp().with_extension("day");
        let _ = std::fs::remove_dir_all(&d);
        let mut c = DayCounts { day: 20261123, spent: 1_234_567, ..DayCounts::default() };
        c.per_ip.insert("192.0.2.1".parse().unwrap(), 7);
        c.per_ip.insert("2001:db8::".parse().unwrap(), 2);
        c.alerted.insert(1);
        c.escalated.insert("192.0.2.1".parse().unwrap());
        c.per_prefix.insert("192.0.2.0/24".parse().unwrap(), 9);
        c.escalated_prefixes.insert("2001:db8::/48".parse().unwrap());
        let tokens = vec![AllowanceEntry { nonce: crate::token::codec::Nonce([7; 12]), used: 3, expires_unix: 99 }];
        {
            let s = Embedded::open(&d).unwrap();
            assert_eq!(s.recover().unwrap(), Recovered::default());
            s.save_day(&c, None).unwrap();
            c.per_ip.remove(&"2001:db8::".parse().unwrap());
            c.seq = 12;
            s.save_day(&c, Some(&tokens)).unwrap();
            s.save_day(&c, None).unwrap(); // the token counts stay as they were
        }
        let r = Embedded::open(&d).unwrap().recover().unwrap();
        assert_eq!((r.day, r.tokens), (Some(c), tokens));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
