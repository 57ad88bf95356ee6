//! The journal's writer thread and the queue callers append to.
//!
//! Callers push a record (encoded inline, see [`super::record`]) onto one
//! queue under a mutex; a caller that waits takes a reference to the commit
//! the queue will go into. The writer swaps the whole queue for its spare
//! (both keep their capacity across commits), writes it to its [`Log`] (one
//! `pwrite` and one `fdatasync` of the journal's file, see [`super::file`]),
//! then publishes the outcome on that commit and wakes every
//! waiter of it at once. So a call costs no channel or allocation of its
//! own, and one commit costs one wakeup of the writer (only when it sleeps)
//! and one `notify_waiters`. Every waiter of a commit gets that commit's
//! outcome, and a commit the writer never finished (it stopped, or
//! panicked) answers [`JournalError::Stopped`]: a call is acknowledged only
//! when its own record is on disk.

use std::{
    sync::{
        Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use tokio::sync::Notify;

use super::{
    JournalError, Record,
    file::{self, Frame},
};

/// Where the writer appends its commits: the journal's file
/// ([`super::file::Wal`]), or memory in tests.
pub trait Log: Send + 'static {
    /// Write `frames` (whole [`file::FRAME`]-byte frames, the highest
    /// sequence number among them `max_seq`) after what was acknowledged,
    /// and make them durable before returning. After an error, the next
    /// call writes over what this one may have left.
    fn append(&mut self, frames: &[u8], max_seq: u64) -> std::io::Result<()>;
    /// Drop what a durable snapshot covers (called between commits).
    fn cut(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records queued without a waiter (settlements) that make the writer
/// commit anyway.
const MAX_LAZY: usize = 4096;
/// The queue's (and the writer's spare's) capacity from the start; both
/// keep what they grow to.
const PREALLOCATED: usize = 1024;

/// One commit: its outcome once made, and the callers waiting for it.
#[derive(Default)]
struct Commit {
    outcome: OnceLock<Result<(), JournalError>>,
    done: Notify,
}

impl Commit {
    /// Publish `outcome` (the first one given stays) and wake every waiter.
    fn finish(&self, outcome: Result<(), JournalError>) {
        let _ = self.outcome.set(outcome);
        self.done.notify_waiters();
    }

    /// This commit's outcome, once made.
    async fn outcome(&self) -> Result<(), JournalError> {
        let done = self.done.notified();
        tokio::pin!(done);
        // Registered before the check: a `finish` after it wakes us.
        done.as_mut().enable();
        if let Some(o) = self.outcome.get() {
            return o.clone();
        }
        done.await;
        self.outcome.get().cloned().unwrap_or(Err(JournalError::Stopped))
    }
}

/// A commit taken by the writer: answered [`JournalError::Stopped`] if
/// dropped before it was finished (the writer panicked).
struct Taken(Arc<Commit>);

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.finish(Err(JournalError::Stopped));
    }
}

/// What callers and the writer share under the lock.
struct Queue {
    ops: Vec<Frame>,
    /// The commit `ops` will go into.
    next: Arc<Commit>,
    /// Someone waits on `next`.
    waited: bool,
    /// The writer sleeps on `wake`.
    idle: bool,
    /// No more records are taken.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    commits: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take no more records; the writer commits what is queued and stops.
    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

/// The handle callers queue records on; dropping it lets the writer commit
/// what is queued and stop.
pub struct Journal {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

impl Journal {
    /// Start the writer thread on `log`.
    pub fn start(mut log: impl Log) -> std::io::Result<Journal> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                ops: Vec::with_capacity(PREALLOCATED),
                next: Arc::default(),
                waited: false,
                idle: false,
                closed: false,
            }),
            wake: Condvar::new(),
            commits: AtomicU64::new(0),
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new().name("kw-journal".into()).spawn(move || run(&mut log, &s))?;
        Ok(Journal { shared, writer: Some(writer) })
    }

    /// Queue `r` now; the future is ready once it is on disk (with
    /// whatever else was queued meanwhile).
    pub fn append(&self, r: Record) -> impl Future<Output = Result<(), JournalError>> + use<> {
        let commit = self.queue(&r, true);
        async move {
            match commit? {
                Some(c) => c.outcome().await,
                None => Err(JournalError::Stopped),
            }
        }
    }

    /// Append `r` with the next commit made for a waiter, without waiting.
    pub fn append_lazy(&self, r: Record) {
        let _ = self.queue(&r, false);
    }

    /// Push `r`; with `wait`, the commit it goes into.
    fn queue(&self, r: &Record, wait: bool) -> Result<Option<Arc<Commit>>, JournalError> {
        let op = file::frame(r);
        let mut q = self.shared.lock();
        if q.closed {
            return Err(JournalError::Stopped);
        }
        q.ops.push(op);
        q.waited |= wait;
        let commit = wait.then(|| q.next.clone());
        let wake = q.idle && (q.waited || q.ops.len() >= MAX_LAZY);
        if wake {
            q.idle = false;
        }
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(commit)
    }

    /// Commits made so far.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Take no more records (as a stopped writer does).
    #[cfg(test)]
    pub(super) fn close(&self) {
        self.shared.close();
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// On the writer's way out, however it leaves: no more records are taken,
/// and whoever waits on a commit that will not be made is answered.
struct Stopping<'s>(&'s Shared);

impl Drop for Stopping<'_> {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.closed = true;
        q.next.finish(Err(JournalError::Stopped));
    }
}

/// The writer: sleep until a caller waits on a queued record (settlements
/// alone wait for the next reservation's commit, or for the snapshot that
/// makes them moot), then commit everything queued at once; when the
/// journal is closed, commit what is left and stop.
fn run(log: &mut dyn Log, shared: &Shared) {
    let _stopping = Stopping(shared);
    let mut batch: Vec<Frame> = Vec::with_capacity(PREALLOCATED);
    loop {
        let next = Arc::new(Commit::default());
        let taken = {
            let mut q = shared.lock();
            while !(q.waited || q.ops.len() >= MAX_LAZY || q.closed) {
                q.idle = true;
                q = shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            q.idle = false;
            if q.ops.is_empty() {
                return; // closed, nothing left
            }
            q.waited = false;
            std::mem::swap(&mut q.ops, &mut batch);
            Taken(std::mem::replace(&mut q.next, next))
        };
        if let Err(e) = log.cut() {
            tracing::warn!(error = %e, "journal: records a snapshot covers could not be dropped yet");
        }
        commit(log, &batch, &taken, &shared.commits);
        batch.clear();
    }
}

/// One commit of `batch`; every waiter of `taken` gets its outcome.
fn commit(log: &mut dyn Log, batch: &[Frame], taken: &Taken, commits: &AtomicU64) {
    let max_seq = batch.iter().map(file::seq_of).max().unwrap_or(0);
    let outcome = log.append(batch.as_flattened(), max_seq).map_err(|e| JournalError::Store(e.to_string()));
    commits.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = &outcome {
        tracing::error!(error = %e, records = batch.len(), "journal commit failed: the calls waiting on it are refused");
    }
    taken.0.finish(outcome);
}
