//! What every accept loop does when `accept` fails (EMFILE, ENFILE, ENOBUFS
//! and friends): wait before trying again, longer each time up to a second,
//! and log at most one line a second saying how many failures it stands for.
//! Without it a listener whose backlog holds a connection that cannot be
//! accepted is reported readable again at once, and the loop spins a core
//! and writes hundreds of thousands of lines a second (issue 14).

use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

/// The first wait after a failure.
const FIRST: Duration = Duration::from_millis(5);
/// The longest wait.
const LONGEST: Duration = Duration::from_secs(1);
/// At most one log line per this long.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// One accept loop's back-off and log sampling.
#[derive(Debug)]
pub struct Backoff {
    /// Which loop, in the log line.
    what: &'static str,
    wait: Duration,
    last_log: Option<Instant>,
    /// Failures since the last line.
    unlogged: u64,
}

impl Backoff {
    pub fn new(what: &'static str) -> Backoff {
        Backoff { what, wait: Duration::ZERO, last_log: None, unlogged: 0 }
    }

    /// An accept succeeded: the next failure waits the shortest time again.
    pub fn succeeded(&mut self) {
        self.wait = Duration::ZERO;
    }

    /// An accept failed: log (sampled) and wait. Returns whether a line was
    /// written.
    pub async fn failed(&mut self, e: &std::io::Error) -> bool {
        let logged = self.note(e, Instant::now());
        tokio::time::sleep(self.wait).await;
        logged
    }

    /// Count the failure, grow the wait, and log when a line is due.
    fn note(&mut self, e: &std::io::Error, now: Instant) -> bool {
        self.wait = if self.wait.is_zero() { FIRST } else { (self.wait * 2).min(LONGEST) };
        self.unlogged += 1;
        if self.last_log.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return false;
        }
        warn!(listener = self.what, error = %e, failures = self.unlogged, next_try_ms = self.wait.as_millis() as u64,
            "accept failed (at most one line a second; backing off)");
        self.last_log = Some(now);
        self.unlogged = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_grow_to_a_second_and_lines_are_one_a_second() {
        let mut b = Backoff::new("test");
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let t0 = Instant::now();
        let mut lines = 0;
        // Two thousand failures in a row: a spinning loop would do this in
        // milliseconds; backing off they take minutes of (paused) time.
        for _ in 0..2000 {
            if b.failed(&e).await {
                lines += 1;
            }
        }
        let took = Instant::now() - t0;
        assert!(took >= Duration::from_secs(1900), "waited only {took:?}");
        assert_eq!(b.wait, LONGEST);
        let secs = took.as_secs() + 1;
        assert!(lines <= secs && lines > 1, "{lines} lines in {secs} s");
        b.succeeded();
        b.failed(&e).await;
        assert_eq!(b.wait, FIRST);
    }
}
