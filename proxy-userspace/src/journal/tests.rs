//! The journal: replay against a snapshot's watermark, snapshots dropping
//! what they include, group commit (commits counted), a failing disk, and a
//! crash at any point against the limiter's own counts.

use std::{
    io,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use proxy_common::bucket::Params;

use super::*;
use crate::{
    proxy::{
        day::Schedule,
        limit::{Limiter, Limits, PrefixCap},
    },
    store::{Embedded, ListStore},
};

const T0: i64 = 1_795_420_800; // 2026-11-23T08:00:00Z
const DAY: u64 = 20261123;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn reserved(day: u64, who: &str, cost: u64) -> Reserved {
    Reserved { day, ip: ip(who), network: Some(Cidr::covering(ip(who), 24)), cost, token: None }
}

fn rec(r: &Record) -> ((u64, u8), Vec<u8>) {
    (r.key(), r.encode().as_bytes().to_vec())
}

struct TmpDir(std::path::PathBuf);

impl TmpDir {
    fn new(name: &str) -> TmpDir {
        let d = std::env::temp_dir().join(format!("keyward-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        TmpDir(d)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn refund(of: u64, what: Reserved) -> Refund {
    Refund { of, what }
}

#[test]
fn replay_adds_what_is_newer_than_the_snapshot_and_counts_the_unsettled() {
    let net: Cidr = "192.0.2.0/24".parse().unwrap();
    let mut snap = DayCounts { day: DAY, spent: 20_000, seq: 3, ..DayCounts::default() };
    snap.per_ip.insert(ip("192.0.2.9"), 1);
    snap.per_prefix.insert(net, 1);
    let nonce = Nonce([5; 12]);
    let token = Some(TokenCall { nonce, expires_unix: 99 });
    let with_token = Reserved { token, ..reserved(DAY, "192.0.2.1", 20_000) };
    let (a, b) = (reserved(DAY, "192.0.2.9", 20_000), reserved(DAY, "192.0.2.8", 20_000));
    let records = [
        Record::Reserved(1, a.clone()), // 1 to 3 are in the snapshot
        Record::Reserved(2, b.clone()),
        Record::Refunded(3, refund(2, b)),
        Record::Reserved(4, reserved(DAY, "192.0.2.1", 20_000)),
        Record::Billed(4),
        Record::Reserved(5, reserved(DAY, "192.0.2.2", 20_000)),
        Record::Refunded(6, refund(5, reserved(DAY, "192.0.2.2", 20_000))),
        Record::Reserved(7, with_token.clone()), // never settled
        Record::Reserved(8, with_token.clone()),
        Record::Refunded(9, refund(8, with_token)),
        Record::Refunded(10, refund(1, a)), // of a reservation in the snapshot
        Record::Refunded(11, refund(99, reserved(DAY, "192.0.2.7", 20_000))), // of one never on disk
    ];
    let tokens = vec![AllowanceEntry { nonce, used: 2, expires_unix: 99 }];
    let r = replay(Some(snap), tokens, records.iter().map(rec)).unwrap();
    let c = r.counts.unwrap();
    assert_eq!(c.spent, 20_000 + 2 * 20_000 - 20_000, "4 billed, 7 unsettled, 1 given back");
    assert_eq!(c.per_ip.get(&ip("192.0.2.1")), Some(&2));
    assert_eq!(c.per_ip.get(&ip("192.0.2.2")), Some(&0), "given back");
    assert_eq!(c.per_ip.get(&ip("192.0.2.9")), Some(&0), "given back after the snapshot");
    assert_eq!(c.per_ip.get(&ip("192.0.2.7")), None, "never taken, never given");
    assert_eq!(c.per_prefix.get(&net), Some(&2));
    assert_eq!(c.seq, 11, "numbering continues after the journal");
    assert_eq!((r.replayed, r.unsettled), (4, 1));
    // Token calls are added back, never given back on replay.
    assert_eq!(r.tokens, vec![AllowanceEntry { nonce, used: 4, expires_unix: 99 }]);
}

#[test]
fn replay_follows_the_day_and_refuses_an_unreadable_record() {
    let snap = DayCounts { day: DAY, spent: 40_000, seq: 1, ..DayCounts::default() };
    let records =
        [Record::Reserved(2, reserved(DAY, "192.0.2.1", 1)), Record::Reserved(3, reserved(DAY + 1, "192.0.2.1", 7))];
    let r = replay(Some(snap), Vec::new(), records.iter().map(rec)).unwrap();
    let c = r.counts.unwrap();
    assert_eq!((c.day, c.spent, c.seq), (DAY + 1, 7, 3));
    // With no snapshot at all, the journal alone.
    let r = replay(None, Vec::new(), records.iter().map(rec)).unwrap();
    assert_eq!(r.counts.map(|c| (c.day, c.spent)), Some((DAY + 1, 7)));
    let bad = [((9, Kind::Reserved as u8), b"{".to_vec())];
    assert_eq!(replay(None, Vec::new(), bad).unwrap_err().seq, 9);
}

#[test]
fn binary_records_read_back_as_written() {
    let v6 = ip("2001:db8::1");
    let token = Some(TokenCall { nonce: Nonce([7; 12]), expires_unix: u64::MAX });
    let cases = [
        reserved(DAY, "192.0.2.1", 20_000),
        Reserved { network: None, ..reserved(DAY, "192.0.2.1", 0) },
        Reserved { day: u64::MAX, ip: v6, network: Some(Cidr::covering(v6, 48)), cost: u64::MAX, token },
        Reserved { ip: v6, network: Some(Cidr::covering(v6, 0)), token, ..reserved(DAY, "192.0.2.1", 1) },
    ];
    for (n, r) in cases.into_iter().enumerate() {
        let taken = Record::Reserved(n as u64, r.clone()).encode();
        assert_eq!(taken.as_bytes()[0], record::VERSION);
        assert_eq!(record::reserved(taken.as_bytes()), Ok(r.clone()));
        let given = Record::Refunded(99, refund(n as u64, r.clone())).encode();
        assert_eq!(record::refund(given.as_bytes()), Ok(refund(n as u64, r)));
        // A refund is not a reservation, nor the reverse: the lengths differ.
        assert!(record::reserved(given.as_bytes()).is_err());
        assert!(record::refund(taken.as_bytes()).is_err());
    }
    assert!(Record::Billed(1).encode().as_bytes().is_empty());
}

/// Records as the JSON journal (before the binary one) wrote them, which a
/// crash of that version leaves behind: read at start like new ones.
#[test]
fn json_records_of_the_previous_version_are_replayed() {
    let taken = br#"{"day":20261123,"ip":"192.0.2.1","network":"192.0.2.0/24","cost":20000,"token":{"nonce":"BQUFBQUFBQUFBQUF","expires_unix":99}}"#;
    let given = br#"{"of":2,"day":20261123,"ip":"2001:db8::1","cost":7}"#;
    let token = Some(TokenCall { nonce: Nonce([5; 12]), expires_unix: 99 });
    let r1 = Reserved { token, ..reserved(DAY, "192.0.2.1", 20_000) };
    let r2 = Reserved { network: None, ..reserved(DAY, "2001:db8::1", 7) };
    // These are the bytes the previous writer made (serde_json of these types).
    assert_eq!(serde_json::to_vec(&r1).unwrap(), taken);
    assert_eq!(serde_json::to_vec(&refund(2, r2.clone())).unwrap(), given);
    let old = [
        ((1, Kind::Reserved as u8), taken.to_vec()),
        ((2, Kind::Reserved as u8), serde_json::to_vec(&r2).unwrap()),
        ((3, Kind::Refunded as u8), given.to_vec()),
    ];
    // Followed by binary ones written after the upgrade.
    let new = [Record::Billed(1), Record::Reserved(4, reserved(DAY, "192.0.2.1", 5))];
    let r = replay(None, Vec::new(), old.into_iter().chain(new.iter().map(rec))).unwrap();
    let c = r.counts.unwrap();
    assert_eq!((c.spent, c.seq, r.replayed, r.unsettled), (20_005, 4, 3, 1));
    assert_eq!(c.per_ip.get(&ip("192.0.2.1")), Some(&2));
    assert_eq!(c.per_ip.get(&ip("2001:db8::1")), Some(&0), "given back");
    assert_eq!(r.tokens, vec![AllowanceEntry { nonce: Nonce([5; 12]), used: 1, expires_unix: 99 }]);
}

#[test]
fn a_record_of_an_unknown_version_or_length_is_unreadable() {
    let mut v = Record::Reserved(5, reserved(DAY, "192.0.2.1", 1)).encode().as_bytes().to_vec();
    v[0] = 2;
    let e = replay(None, Vec::new(), [((5, Kind::Reserved as u8), v.clone())]).unwrap_err();
    assert_eq!(e.seq, 5);
    assert!(e.reason.contains("version 2"), "{}", e.reason);
    v[0] = record::VERSION;
    v.pop();
    assert!(replay(None, Vec::new(), [((5, Kind::Reserved as u8), v)]).is_err());
}

/// The records in every journal file of `store`, oldest file first.
fn files_of(store: &Embedded) -> Vec<((u64, u8), Vec<u8>)> {
    let mut names: Vec<_> = std::fs::read_dir(store.journal_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    names.iter().flat_map(|p| file::read(&std::fs::read(p).unwrap()).records).collect()
}

fn keys(records: &[((u64, u8), Vec<u8>)]) -> Vec<(u64, u8)> {
    records.iter().map(|(k, _)| *k).collect()
}

#[tokio::test]
async fn records_after_a_snapshot_survive_and_what_it_covers_is_cut_once_it_is_durable() {
    let dir = TmpDir::new("snapshot");
    let store = Embedded::open(&dir.0).unwrap();
    let j = store.journal().unwrap();
    for seq in 1..=4 {
        j.append(Record::Reserved(seq, reserved(DAY, "192.0.2.1", 10))).await.unwrap();
    }
    let mut c = DayCounts { day: DAY, spent: 20, seq: 2, ..DayCounts::default() };
    c.per_ip.insert(ip("192.0.2.1"), 2);
    store.save_day(&c, None).unwrap();
    // Its next commit moves to a new file: the old one still holds 3 and 4.
    j.append(Record::Billed(2)).await.unwrap(); // late, and no longer needed
    assert_eq!(keys(&files_of(&store)), vec![(1, 0), (2, 0), (3, 0), (4, 0), (2, 1)]);
    drop((j, store));
    let reopened = Embedded::open(&dir.0).unwrap();
    let r = reopened.recover().unwrap();
    assert_eq!((r.replayed, r.unsettled), (2, 2), "3 and 4 survive the snapshot and the restart");
    let d = r.day.unwrap();
    assert_eq!((d.spent, d.per_ip[&ip("192.0.2.1")], d.seq), (40, 4, 4));
    // A snapshot covering everything: the earlier run's files go at once,
    // the new writer's at its next commit.
    let j = reopened.journal().unwrap();
    j.append(Record::Reserved(5, reserved(DAY, "192.0.2.1", 10))).await.unwrap();
    reopened.save_day(&d, None).unwrap();
    assert_eq!(keys(&files_of(&reopened)), vec![(5, 0)]);
    j.append(Record::Reserved(6, reserved(DAY, "192.0.2.1", 10))).await.unwrap();
    assert_eq!(keys(&files_of(&reopened)), vec![(5, 0), (6, 0)], "5 is not in the snapshot");
    let d = DayCounts { seq: 6, spent: 60, ..d };
    reopened.save_day(&d, None).unwrap();
    j.append(Record::Reserved(7, reserved(DAY, "192.0.2.1", 10))).await.unwrap();
    assert_eq!(keys(&files_of(&reopened)), vec![(7, 0)], "the covered file was emptied before 7");
    drop((j, reopened));
    let r = Embedded::open(&dir.0).unwrap().recover().unwrap();
    assert_eq!((r.replayed, r.day.unwrap().spent), (1, 70));
}

/// Frames of reservations `seqs`, costing 10 each, as a file holds them.
fn frames(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    seqs.flat_map(|s| file::frame(&Record::Reserved(s, reserved(DAY, "192.0.2.1", 10)))).collect()
}

#[test]
fn a_torn_tail_is_ignored() {
    let mut bytes = frames(1..=3);
    bytes.extend_from_slice(&frames(4..=4)[..40]);
    let r = file::read(&bytes);
    assert_eq!(keys(&r.records), vec![(1, 0), (2, 0), (3, 0)]);
    assert_eq!((r.max_seq, r.stop), (3, Some(file::Stop::Torn { offset: 3 * file::FRAME as u64 })));
    // A whole last frame written only in part (here: zeros) is torn too.
    let mut bytes = frames(1..=3);
    bytes.extend_from_slice(&[0; file::FRAME]);
    let r = file::read(&bytes);
    assert_eq!(r.records.len(), 3);
    assert_eq!(r.stop, Some(file::Stop::BadChecksum { offset: 3 * file::FRAME as u64, after: 0 }));
    assert_eq!(file::read(&frames(1..=3)).stop, None);
}

#[test]
fn a_bad_checksum_stops_the_replay_at_that_record_and_says_so() {
    let mut bytes = frames(1..=4);
    bytes[file::FRAME + 20] ^= 1; // a bit of record 2's value
    let r = file::read(&bytes);
    assert_eq!(keys(&r.records), vec![(1, 0)]);
    let (offset, after) = (file::FRAME as u64, 2 * file::FRAME as u64);
    assert_eq!(r.stop, Some(file::Stop::BadChecksum { offset, after }));
    // The store replays what comes before it, and starts.
    let dir = TmpDir::new("checksum");
    let store = Embedded::open(&dir.0).unwrap();
    std::fs::write(store.journal_dir().join("00000000000000000001.wal"), &bytes).unwrap();
    let r = store.recover().unwrap();
    assert_eq!((r.replayed, r.day.unwrap().spent), (1, 10));
}

#[tokio::test]
async fn a_torn_tail_left_by_a_crash_is_ignored_at_start() {
    let dir = TmpDir::new("torn");
    let store = Embedded::open(&dir.0).unwrap();
    let j = store.journal().unwrap();
    for seq in 1..=3 {
        j.append(Record::Reserved(seq, reserved(DAY, "192.0.2.1", 10))).await.unwrap();
    }
    drop(j);
    let (name, len) = {
        let e = std::fs::read_dir(store.journal_dir()).unwrap().next().unwrap().unwrap();
        (e.path(), e.metadata().unwrap().len())
    };
    assert_eq!(len, 3 * file::FRAME as u64);
    let mut bytes = std::fs::read(&name).unwrap();
    bytes.extend_from_slice(&frames(4..=4)[..50]); // the crash, half way through commit 4
    std::fs::write(&name, bytes).unwrap();
    drop(store);
    let store = Embedded::open(&dir.0).unwrap();
    let r = store.recover().unwrap();
    assert_eq!((r.replayed, r.day.as_ref().unwrap().spent), (3, 30));
    // The next run writes a new file: nothing is appended after the tear.
    let j = store.journal().unwrap();
    j.append(Record::Reserved(4, reserved(DAY, "192.0.2.1", 10))).await.unwrap();
    drop((j, store));
    let r = Embedded::open(&dir.0).unwrap().recover().unwrap();
    assert_eq!((r.replayed, r.day.unwrap().spent), (4, 40));
}

/// A journal the previous version left in its redb table is replayed, and
/// emptied by the first snapshot (so it is replayed once).
#[test]
fn the_old_redb_journal_table_is_replayed_once() {
    use redb::ReadableDatabase as _;
    let dir = TmpDir::new("table");
    let store = Embedded::open(&dir.0).unwrap();
    {
        let tx = store.database().begin_write().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for r in [Record::Reserved(1, reserved(DAY, "192.0.2.1", 10)), Record::Billed(1)] {
                t.insert(r.key(), r.encode().as_bytes()).unwrap();
            }
            let json = serde_json::to_vec(&reserved(DAY, "192.0.2.2", 5)).unwrap();
            t.insert((2, Kind::Reserved as u8), json.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    drop(store);
    let store = Embedded::open(&dir.0).unwrap();
    let r = store.recover().unwrap();
    assert_eq!((r.replayed, r.unsettled), (2, 1));
    let d = r.day.unwrap();
    assert_eq!((d.spent, d.seq), (15, 2));
    store.save_day(&d, None).unwrap();
    let tx = store.database().begin_read().unwrap();
    assert!(matches!(tx.open_table(TABLE), Err(redb::TableError::TableDoesNotExist(_))), "emptied and gone");
    let r = store.recover().unwrap();
    assert_eq!((r.replayed, r.day.unwrap().spent), (0, 15));
}

/// Memory standing in for the journal's file: `fail` refuses every commit
/// (a disk gone bad), a held `gate` keeps a commit on its way to disk, and
/// a commit holding `poison` fails (a disk that refuses those bytes).
#[derive(Clone, Debug, Default)]
struct Memory {
    bytes: Arc<Mutex<Vec<u8>>>,
    fail: Arc<AtomicBool>,
    gate: Arc<Gate>,
    poison: Option<[u8; 8]>,
}

impl Log for Memory {
    fn append(&mut self, frames: &[u8], _max_seq: u64) -> io::Result<()> {
        self.gate.pass();
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected: disk full"));
        }
        if self.poison.is_some_and(|p| frames.windows(8).any(|w| w == p)) {
            return Err(io::Error::other("injected: these bytes cannot be written"));
        }
        self.bytes.lock().unwrap().extend_from_slice(frames);
        Ok(())
    }
}

fn records_of(m: &Memory) -> Vec<((u64, u8), Vec<u8>)> {
    let r = file::read(&m.bytes.lock().unwrap());
    assert_eq!(r.stop, None);
    r.records
}

#[tokio::test]
async fn concurrent_waiters_share_commits() {
    let mem = Memory::default();
    let j = Journal::start(mem.clone()).unwrap();
    // Hold the first commit on its way to disk: then every record below is
    // queued while the writer waits for it, and one more commit takes them.
    mem.gate.hold();
    let first = j.append(Record::Reserved(1, reserved(DAY, "192.0.2.1", 1)));
    mem.gate.reached();
    let waiting: Vec<_> = (2..=200).map(|s| j.append(Record::Reserved(s, reserved(DAY, "192.0.2.1", 1)))).collect();
    j.append_lazy(Record::Billed(1));
    mem.gate.release();
    first.await.unwrap();
    for w in waiting {
        w.await.unwrap();
    }
    assert!(j.commits() <= 2, "{} commits for 200 waiters", j.commits());
    drop(j);
    let r = replay(None, Vec::new(), records_of(&mem)).unwrap();
    assert_eq!((r.replayed, r.unsettled, r.counts.unwrap().spent), (200, 199, 200));
}

#[tokio::test]
async fn settlements_ride_with_the_next_reservation() {
    let mem = Memory::default();
    let j = Journal::start(mem.clone()).unwrap();
    j.append_lazy(Record::Billed(1));
    j.append_lazy(Record::Billed(2));
    j.append(Record::Reserved(3, reserved(DAY, "192.0.2.1", 1))).await.unwrap();
    assert_eq!(j.commits(), 1, "settlements never commit on their own");
    assert_eq!(records_of(&mem).len(), 3);
    j.append_lazy(Record::Billed(3));
    drop(j);
    assert_eq!(records_of(&mem).len(), 4, "a clean stop commits what is left");
}

#[tokio::test]
async fn a_failed_commit_fails_its_waiters() {
    let mem = Memory::default();
    let j = Journal::start(mem.clone()).unwrap();
    j.append(Record::Reserved(1, reserved(DAY, "192.0.2.1", 1))).await.unwrap();
    mem.fail.store(true, Ordering::SeqCst);
    let e = j.append(Record::Reserved(2, reserved(DAY, "192.0.2.1", 1))).await.unwrap_err();
    assert!(matches!(e, JournalError::Store(_)), "{e}");
}

#[derive(Debug, Default)]
struct Gate {
    /// (held, a commit is waiting at it)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Gate {
    fn hold(&self) {
        *self.state.lock().unwrap() = (true, false);
    }

    /// Until a commit waits at the gate (bounded: 10 s).
    fn reached(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = self.state.lock().unwrap();
        while !s.1 {
            let left = deadline.checked_duration_since(Instant::now()).expect("no commit reached the gate in 10 s");
            s = self.changed.wait_timeout(s, left).unwrap().0;
        }
    }

    fn release(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut s = self.state.lock().unwrap();
        if s.0 {
            s.1 = true;
            self.changed.notify_all();
        }
        while s.0 {
            s = self.changed.wait(s).unwrap();
        }
    }
}

type Waiting = std::pin::Pin<Box<dyn Future<Output = Result<(), JournalError>>>>;

/// A journal on [`Memory`], its first commit (of reservation 1) held at the
/// gate, and `n` reservations costing `cost` queued behind it: all of them
/// for the next commit. None of them is answered yet.
async fn behind_a_held_commit(n: u64, cost: u64, poison: Option<[u8; 8]>) -> (Memory, Journal, Vec<Waiting>) {
    let mem = Memory { poison, ..Memory::default() };
    let j = Journal::start(mem.clone()).unwrap();
    mem.gate.hold();
    let first: Waiting = Box::pin(j.append(Record::Reserved(1, reserved(DAY, "192.0.2.1", 1))));
    mem.gate.reached();
    let mut waiting = vec![first];
    for s in 2..=n + 1 {
        waiting.push(Box::pin(j.append(Record::Reserved(s, reserved(DAY, "192.0.2.2", cost)))));
    }
    for w in &mut waiting {
        assert!(std::future::poll_fn(|cx| Poll::Ready(w.as_mut().poll(cx).is_pending())).await, "answered early");
    }
    assert_eq!(j.commits(), 0);
    (mem, j, waiting)
}

/// `w`'s answer, which must come within 10 s.
async fn answered(w: Waiting) -> Result<(), JournalError> {
    tokio::time::timeout(Duration::from_secs(10), w).await.expect("a waiter was never answered")
}

#[tokio::test]
async fn the_waiters_of_one_commit_are_each_answered_once_when_it_is_on_disk() {
    const N: u64 = 300;
    let (mem, j, waiting) = behind_a_held_commit(N, 1, None).await;
    j.append_lazy(Record::Billed(1));
    mem.gate.release();
    let mut ok = 0;
    for w in waiting {
        answered(w).await.unwrap();
        ok += 1;
    }
    assert_eq!(ok, N + 1);
    assert_eq!(j.commits(), 2, "the held one, then one for all {N} queued behind it");
    drop(j);
    let r = replay(None, Vec::new(), records_of(&mem)).unwrap();
    assert_eq!((r.replayed, r.unsettled, r.counts.unwrap().spent), (N + 1, N, N + 1));
}

#[tokio::test]
async fn a_failed_commit_fails_every_waiter_of_it_and_no_other() {
    const N: u64 = 300;
    const COST: u64 = 0x5eed_f00d_dead_beef;
    let (mem, j, mut waiting) = behind_a_held_commit(N, COST, Some(COST.to_le_bytes())).await;
    mem.gate.release();
    let first = waiting.remove(0);
    answered(first).await.expect("the held commit had no poisoned record");
    let mut failed = 0;
    for w in waiting {
        let e = answered(w).await.expect_err("a waiter of the failed commit was acknowledged");
        assert!(matches!(e, JournalError::Store(_)), "{e}");
        failed += 1;
    }
    assert_eq!(failed, N);
    assert_eq!(j.commits(), 2);
    drop(j);
    let r = replay(None, Vec::new(), records_of(&mem)).unwrap();
    assert_eq!((r.replayed, r.counts.unwrap().spent), (1, 1), "only the first commit is on disk");
}

#[tokio::test]
async fn a_stopped_journal_refuses() {
    let j = Journal::start(Memory::default()).unwrap();
    j.close();
    let e = j.append(Record::Billed(1)).await.unwrap_err();
    assert!(matches!(e, JournalError::Stopped));
}

/// A tiny deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn limiter(restored: Option<DayCounts>) -> Limiter {
    let limits = Limits {
        rate: Params::new(5, 10),
        burst: 10,
        per_ip_daily: 1000,
        budget: 1_000_000,
        alert_at: Vec::new(),
        dry_run: false,
        prefix: Some(PrefixCap { v4: 24, v6: 48, calls: 1000 }),
        pace: None,
    };
    Limiter::new(limits, Schedule::new("00:00", "UTC").unwrap(), T0, restored)
}

/// The daemon's way, against a crash after any step: reservations durable
/// before use, settlements lazy (some lost), snapshots now and then. After
/// the crash the recovered counts are never below what was kept, and equal
/// it when no settlement was lost.
#[tokio::test]
async fn a_crash_at_any_point_never_forgets_a_kept_reservation() {
    for (round, lose_settlements) in [(1u64, false), (2, true), (3, false), (4, true)] {
        let dir = TmpDir::new(&format!("crash{round}"));
        let store = Embedded::open(&dir.0).unwrap();
        let l = limiter(None);
        let j = store.journal().unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ round);
        let mut held = Vec::new();
        let mut lost_refunds = 0;
        for _ in 0..(50 + rng.below(150)) {
            match rng.below(10) {
                0..=4 => {
                    let who = ip(&format!("192.0.2.{}", rng.below(4)));
                    let r = l.reserve(who, 1000 + rng.below(9) * 1000, T0, false).unwrap();
                    j.append(Record::Reserved(r.seq(), Reserved::of(&r, None))).await.unwrap();
                    held.push(r);
                }
                5..=7 if !held.is_empty() => {
                    let r = held.swap_remove(rng.below(held.len() as u64) as usize);
                    let (cost, lose) = (r.cost(), lose_settlements && rng.below(2) == 0);
                    let record = if rng.below(2) == 0 {
                        let given = refund(r.seq(), Reserved::of(&r, None));
                        lost_refunds += if lose { cost } else { 0 };
                        Record::Refunded(l.refund(r), given)
                    } else {
                        let seq = r.seq();
                        l.commit(r);
                        Record::Billed(seq)
                    };
                    if !lose {
                        j.append_lazy(record);
                    }
                }
                _ => {
                    if let Some(c) = l.take_dirty() {
                        store.save_day(&c, None).unwrap();
                    }
                }
            }
        }
        drop(j); // the crash: what the writer had queued is on disk or not, nothing else
        let (kept, _) = l.today(T0);
        let got = store.recover().unwrap().day.unwrap();
        assert!(got.spent >= kept.spent, "round {round}: recovered {} < kept {}", got.spent, kept.spent);
        if !lose_settlements {
            assert_eq!((got.spent, &got.per_ip, &got.per_prefix), (kept.spent, &kept.per_ip, &kept.per_prefix));
        }
        assert!(got.spent <= kept.spent + lost_refunds, "round {round}: more than the lost refunds");
        assert!(got.seq >= kept.seq);
        // A limiter restarted on them goes on numbering after them.
        let again = limiter(Some(got.clone()));
        assert_eq!(again.reserve(ip("192.0.2.1"), 1, T0, false).unwrap().seq(), got.seq + 1);
    }
}
