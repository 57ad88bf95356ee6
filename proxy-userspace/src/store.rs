//! Persistent state behind one trait, so the embedded default (redb, a single
//! file under `store.path`) can be joined by a shared Redis backend without
//! the daemon changing: today the allow and deny lists, with deny expiries
//! as wall-clock Unix seconds (monotonic clocks do not survive a reboot).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::units::Cidr;

/// A list the operator manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum List {
    /// Sources that bypass rate limits.
    Allow,
    /// Sources dropped in XDP.
    Deny,
}

impl List {
    fn table(self) -> TableDefinition<'static, &'static str, u64> {
        match self {
            List::Allow => TableDefinition::new("allow"),
            List::Deny => TableDefinition::new("deny"),
        }
    }
}

/// One stored entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub cidr: Cidr,
    /// Unix seconds after which the entry no longer applies; `None` = never.
    pub expires_unix: Option<u64>,
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

/// What the daemon needs from persistent storage.
pub trait ListStore: Send + Sync {
    /// Insert or replace an entry.
    fn put(&self, list: List, entry: &Entry) -> Result<(), StoreError>;
    /// Remove an entry; false when it was not there.
    fn remove(&self, list: List, cidr: &Cidr) -> Result<bool, StoreError>;
    /// All entries of a list, in CIDR text order.
    fn entries(&self, list: List) -> Result<Vec<Entry>, StoreError>;
}

/// The embedded store: one redb file.
pub struct Embedded {
    db: Database,
}

impl Embedded {
    /// Open (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Embedded, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let file = dir.join("keyward.redb");
        let db = Database::create(&file).map_err(|e| {
            StoreError(format!("cannot open {}: {}", file.display(), redb::Error::from(e)))
        })?;
        let tx = db.begin_write()?;
        for l in [List::Allow, List::Deny] {
            tx.open_table(l.table())?;
        }
        tx.commit()?;
        Ok(Embedded { db })
    }
}

impl ListStore for Embedded {
    fn put(&self, list: List, entry: &Entry) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(list.table())?;
            t.insert(entry.cidr.to_string().as_str(), entry.expires_unix.unwrap_or(0))?;
        }
        tx.commit()?;
        Ok(())
    }

    fn remove(&self, list: List, cidr: &Cidr) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let was = {
            let mut t = tx.open_table(list.table())?;
            t.remove(cidr.to_string().as_str())?.is_some()
        };
        tx.commit()?;
        Ok(was)
    }

    fn entries(&self, list: List) -> Result<Vec<Entry>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(list.table())?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            // Entries were validated on the way in; skip (and log) anything
            // that no longer parses rather than refusing to start.
            match k.value().parse::<Cidr>() {
                Ok(cidr) => {
                    let e = v.value();
                    out.push(Entry {
                        cidr,
                        expires_unix: (e != 0).then_some(e),
                    });
                }
                Err(e) => tracing::warn!(entry = k.value(), error = %e, "skipping unreadable stored entry"),
            }
        }
        Ok(out)
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
            s.put(List::Allow, &Entry { cidr: c, expires_unix: None }).unwrap();
            s.put(List::Deny, &Entry { cidr: e, expires_unix: Some(42) }).unwrap();
        }
        let s = Embedded::open(&d).unwrap();
        assert_eq!(s.entries(List::Allow).unwrap(), vec![Entry { cidr: c, expires_unix: None }]);
        assert_eq!(s.entries(List::Deny).unwrap(), vec![Entry { cidr: e, expires_unix: Some(42) }]);
        assert!(s.remove(List::Deny, &e).unwrap());
        assert!(!s.remove(List::Deny, &e).unwrap());
        assert!(s.entries(List::Deny).unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
