//! The per-source table, sampled: how many sources it tracks and the
//! heaviest few, taken by one background walk at a time. A walk costs a
//! lookup per entry (seconds for a full million-entry table), so nothing
//! that must stay quick (a request, a scrape, an admin verb, the counter
//! flush, an escalation) ever walks; they read the last sample.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tracing::warn;

use super::{
    DataplaneError,
    maps::{MapReader, SourceStat},
};
use crate::clock::Clock;

/// How many of the heaviest sources a sample keeps (what `status` shows).
pub const TOP: usize = 3;
/// Least pause between two walks.
pub const MIN_PAUSE: Duration = Duration::from_secs(1);
/// Pause after a walk, as a multiple of the walk's duration: walking then
/// takes at most a tenth of one CPU however large the table.
const PAUSE_PER_WALK: u32 = 9;

/// The last sample. Readers never wait on a walk.
#[derive(Debug, Default)]
pub struct SourceSample {
    tracked: AtomicU64,
    taken_unix_ms: AtomicU64,
    top: Mutex<Vec<SourceStat>>,
}

impl SourceSample {
    /// Entries in the table at the last sample.
    pub fn tracked(&self) -> u64 {
        self.tracked.load(Ordering::Relaxed)
    }

    /// The heaviest sources at the last sample, by packets.
    pub fn top(&self) -> Vec<SourceStat> {
        self.top.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// When the last sample's walk started (Unix milliseconds; 0 = none yet).
    pub fn taken_unix_ms(&self) -> u64 {
        self.taken_unix_ms.load(Ordering::Acquire)
    }

    /// Walk the table once and publish what it holds.
    pub fn take(&self, reader: &MapReader, clock: &dyn Clock) -> Result<(), DataplaneError> {
        let started = clock.unix_millis();
        let (tracked, top) = reader.sources(TOP)?;
        *self.top.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = top;
        self.tracked.store(tracked, Ordering::Relaxed);
        self.taken_unix_ms.store(started, Ordering::Release);
        Ok(())
    }
}

/// Sample until `stop` turns true (or its sender is gone): a walk (on a blocking thread), then a
/// pause of [`MIN_PAUSE`] or nine times the walk, whichever is longer.
pub async fn run(
    sample: Arc<SourceSample>,
    reader: Arc<MapReader>,
    clock: Arc<dyn Clock>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let (s, r, c) = (sample.clone(), reader.clone(), clock.clone());
        let walked = tokio::task::spawn_blocking(move || {
            let t0 = c.monotonic_ns();
            let r = s.take(&r, c.as_ref());
            (r, Duration::from_nanos(c.monotonic_ns().saturating_sub(t0)))
        })
        .await;
        let pause = match walked {
            Ok((Ok(()), took)) => took.saturating_mul(PAUSE_PER_WALK).max(MIN_PAUSE),
            Ok((Err(e), _)) => {
                warn!(error = %e, "sampling the per-source table");
                MIN_PAUSE
            }
            Err(e) => {
                warn!(error = %e, "sampling the per-source table");
                MIN_PAUSE
            }
        };
        tokio::select! {
            changed = stop.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
