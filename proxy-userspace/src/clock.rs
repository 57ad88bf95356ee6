//! Time, injectable. The kernel compares deny expiries against
//! `CLOCK_MONOTONIC_COARSE` (`bpf_ktime_get_coarse_ns`), which is
//! `CLOCK_MONOTONIC` as of the last scheduler tick: an expiry written from
//! [`Clock::monotonic_ns`] takes effect at most a tick (≤ 10 ms) late. The
//! store keeps wall-clock Unix seconds; everything time-based asks a
//! [`Clock`] so tests can fake it.

use std::time::{SystemTime, UNIX_EPOCH};

/// A source of both clocks.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn unix_millis(&self) -> u64;
    /// Seconds since the Unix epoch.
    fn unix_secs(&self) -> u64 {
        self.unix_millis() / 1000
    }
    /// `CLOCK_MONOTONIC` in nanoseconds (the kernel program's coarse clock
    /// runs up to a tick behind it).
    fn monotonic_ns(&self) -> u64;

    /// The monotonic instant at which wall-clock second `unix` arrives
    /// (now when it is already past).
    fn monotonic_at(&self, unix: u64) -> u64 {
        let ahead = unix.saturating_sub(self.unix_secs());
        self.monotonic_ns().saturating_add(ahead.saturating_mul(proxy_common::bucket::NS_PER_SEC))
    }
}

/// The real clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_millis(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn monotonic_ns(&self) -> u64 {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
    }
}

/// A clock moved by hand, for tests of everything time-based.
pub mod fake {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A clock the test moves by hand.
    #[derive(Debug, Default)]
    pub struct FakeClock {
        pub unix: AtomicU64,
        pub mono: AtomicU64,
    }

    impl FakeClock {
        pub fn advance_secs(&self, s: u64) {
            self.unix.fetch_add(s, Ordering::SeqCst);
            self.mono.fetch_add(s * 1_000_000_000, Ordering::SeqCst);
        }
    }

    impl super::Clock for FakeClock {
        fn unix_millis(&self) -> u64 {
            self.unix.load(Ordering::SeqCst) * 1000
        }
        fn monotonic_ns(&self) -> u64 {
            self.mono.load(Ordering::SeqCst)
        }
    }

    impl FakeClock {
        /// A clock at Unix second `unix` (and monotonic 1 s, never 0).
        pub fn at(unix: u64) -> FakeClock {
            FakeClock { unix: AtomicU64::new(unix), mono: AtomicU64::new(1_000_000_000) }
        }
    }

    #[test]
    fn monotonic_at_maps_wall_time() {
        let c = FakeClock::default();
        c.unix.store(1_000, Ordering::SeqCst);
        c.mono.store(5, Ordering::SeqCst);
        use super::Clock as _;
        assert_eq!(c.monotonic_at(1_002), 2_000_000_005);
        assert_eq!(c.monotonic_at(10), 5);
        c.advance_secs(1);
        // The same wall-clock instant maps to the same monotonic instant.
        assert_eq!(c.monotonic_at(1_002), 2_000_000_005);
    }
}
