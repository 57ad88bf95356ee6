//! The token bucket, in its GCRA form: one `u64` of state per bucket (the
//! theoretical arrival time), no division on the packet path, integer-exact.
//! A bucket with rate `r` per second and size `b` admits `b` back-to-back
//! packets, then one every `1/r` seconds, exactly like a token bucket that
//! starts full. The XDP program and the host tests call these functions.
//!
//! The program reads `CLOCK_MONOTONIC_COARSE` (`bpf_ktime_get_coarse_ns`),
//! which moves in steps of one scheduler tick. GCRA stays exact on it: the
//! arrival time advances by `interval` per admitted packet, never to "now",
//! so no time is lost to the steps, and a `now` behind the stored time
//! (another CPU's later read) only means nothing has refilled yet. What a
//! step does cost is a bucket whose `tolerance` is shorter than a tick: it
//! would refill to its burst at most once a tick. Configuration refuses
//! such buckets ([`Params::covers_tick`]).

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// The longest clock step a bucket must absorb: a scheduler tick at the
/// smallest `CONFIG_HZ` Linux offers (100, so 10 ms).
pub const COARSE_TICK_MAX_NS: u64 = 10_000_000;

/// A bucket's parameters in GCRA form.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// Nanoseconds one packet costs (`1e9 / rate`).
    pub interval_ns: u64,
    /// How far ahead of now the arrival time may run (`interval * burst`).
    pub tolerance_ns: u64,
}

impl Params {
    /// Parameters for `rate` packets per second and a bucket of `burst`
    /// packets. `rate` and `burst` of zero are refused by config validation;
    /// here they saturate (rate 0 admits nothing after the burst).
    pub const fn new(rate: u32, burst: u32) -> Self {
        let interval_ns = match NS_PER_SEC.checked_div(rate as u64) {
            Some(i) => i,
            None => u64::MAX,
        };
        let tolerance_ns = interval_ns.saturating_mul(burst as u64);
        Params { interval_ns, tolerance_ns }
    }

    /// Whether the bucket holds at least one clock step's worth of packets
    /// ([`COARSE_TICK_MAX_NS`]); otherwise a coarse clock would cap its rate
    /// at `burst` per tick.
    pub const fn covers_tick(&self) -> bool {
        self.tolerance_ns >= COARSE_TICK_MAX_NS
    }

    /// Arrival time to store for a brand-new bucket whose first packet is admitted at `now`.
    #[inline(always)]
    pub const fn first(&self, now_ns: u64) -> u64 {
        now_ns.saturating_add(self.interval_ns)
    }

    /// Admit one packet at `now` against arrival time `tat`. Returns the new
    /// arrival time when the packet conforms, `None` when it is over the limit
    /// (the state is then left unchanged).
    #[inline(always)]
    pub const fn admit(&self, tat_ns: u64, now_ns: u64) -> Option<u64> {
        let base = if tat_ns > now_ns { tat_ns } else { now_ns };
        let next = base.saturating_add(self.interval_ns);
        if next.saturating_sub(now_ns) > self.tolerance_ns { None } else { Some(next) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &Params, tat: &mut u64, now: u64, n: u32) -> u32 {
        let mut ok = 0;
        for _ in 0..n {
            if let Some(t) = p.admit(*tat, now) {
                *tat = t;
                ok += 1;
            }
        }
        ok
    }

    #[test]
    fn params_from_rate_and_burst() {
        let p = Params::new(200, 400);
        assert_eq!(p.interval_ns, 5_000_000);
        assert_eq!(p.tolerance_ns, 2_000_000_000);
        assert_eq!(Params::new(0, 5).interval_ns, u64::MAX);
    }

    #[test]
    fn full_bucket_admits_exactly_burst() {
        let p = Params::new(10, 20);
        let mut tat = 0;
        assert_eq!(run(&p, &mut tat, 1_000 * NS_PER_SEC, 100), 20);
    }

    #[test]
    fn first_packet_of_new_bucket_counts() {
        let p = Params::new(10, 20);
        let now = 5 * NS_PER_SEC;
        let mut tat = p.first(now);
        assert_eq!(run(&p, &mut tat, now, 100), 19);
    }

    #[test]
    fn refills_at_rate() {
        let p = Params::new(10, 20);
        let t0 = 1_000 * NS_PER_SEC;
        let mut tat = 0;
        assert_eq!(run(&p, &mut tat, t0, 100), 20);
        // 0.5 s later: 5 tokens back.
        assert_eq!(run(&p, &mut tat, t0 + NS_PER_SEC / 2, 100), 5);
        // Long idle: refills to the burst, never beyond.
        assert_eq!(run(&p, &mut tat, t0 + 3600 * NS_PER_SEC, 100), 20);
    }

    #[test]
    fn steady_rate_at_limit_is_admitted() {
        let p = Params::new(100, 1);
        let mut tat = 0;
        let mut now = NS_PER_SEC;
        for _ in 0..1000 {
            assert_eq!(run(&p, &mut tat, now, 1), 1);
            now += p.interval_ns;
        }
        // Twice as fast: half refused.
        let mut ok = 0;
        for _ in 0..1000 {
            ok += run(&p, &mut tat, now, 1);
            now += p.interval_ns / 2;
        }
        assert!((499..=501).contains(&ok), "{ok}");
    }

    #[test]
    fn a_clock_that_moves_in_ticks_loses_no_rate() {
        // 1000 pps, burst 10 (10 ms): a 4 ms tick (HZ=250) and a 10 ms one.
        for tick in [4_000_000u64, COARSE_TICK_MAX_NS] {
            let p = Params::new(1000, 10);
            assert!(p.covers_tick());
            let mut tat = 0;
            let t0 = 1_000 * NS_PER_SEC;
            assert_eq!(run(&p, &mut tat, t0, 100), 10);
            // Ten seconds of ticks, flooded: exactly the rate gets through.
            let mut ok = 0;
            for k in 1..=(10 * NS_PER_SEC / tick) {
                ok += run(&p, &mut tat, t0 + k * tick, 100);
            }
            assert_eq!(ok, 10_000, "tick {tick}");
        }
        // A bucket shorter than a tick would refill only to its burst.
        assert!(!Params::new(1000, 9).covers_tick());
    }

    #[test]
    fn now_behind_the_stored_time_refills_nothing_and_does_not_underflow() {
        let p = Params::new(10, 2);
        let mut tat = 0;
        let t = 1_000 * NS_PER_SEC;
        assert_eq!(run(&p, &mut tat, t, 5), 2);
        // Another CPU read the clock a tick earlier.
        assert_eq!(run(&p, &mut tat, t - 4_000_000, 5), 0);
        assert_eq!(p.admit(tat, 0), None);
        assert_eq!(run(&p, &mut tat, t + p.interval_ns, 5), 1);
    }

    #[test]
    fn saturates_at_the_end_of_time() {
        // Arithmetic near u64::MAX saturates instead of wrapping (no panic in
        // debug, no wrap-around admitting a flood in release).
        let p = Params::new(1_000_000, 1);
        assert_eq!(p.admit(0, u64::MAX), Some(u64::MAX));
        assert_eq!(p.admit(u64::MAX, 0), None);
        assert_eq!(p.first(u64::MAX), u64::MAX);
    }
}
