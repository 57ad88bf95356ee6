//! The daily window: when today began and when it ends, for a reset at a
//! local wall-clock time in an IANA time zone. DST is jiff's business: a
//! reset time that a spring-forward gap skips happens at the first instant
//! after the gap, a time repeated by a fall-back happens at its first
//! occurrence, and days are 23 or 25 hours long around the change.

use jiff::{Timestamp, civil::Date, tz::TimeZone};

/// When the daily counters reset.
#[derive(Clone, Debug)]
pub struct Schedule {
    tz: TimeZone,
    hour: i8,
    minute: i8,
}

/// One daily window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Local date on which the window began; identifies the day.
    pub day: Date,
    /// Unix seconds of the start.
    pub start: i64,
    /// Unix seconds of the next reset.
    pub end: i64,
}

impl Window {
    /// A compact day id (`yyyymmdd`) for the store.
    pub fn id(&self) -> u64 {
        let d = self.day;
        (d.year() as u64) * 10_000 + (d.month() as u64) * 100 + d.day() as u64
    }
}

/// A reset time or zone that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("reset_at `{0}` is not a time of day as HH:MM")]
    Time(String),
    #[error("timezone `{0}` is not a known IANA time zone")]
    Zone(String),
}

impl Schedule {
    /// `reset_at` as `HH:MM`, `timezone` an IANA name.
    pub fn new(reset_at: &str, timezone: &str) -> Result<Schedule, ScheduleError> {
        let bad = || ScheduleError::Time(reset_at.to_owned());
        let (h, m) = reset_at.split_once(':').ok_or_else(bad)?;
        let hour: i8 = h.parse().ok().filter(|h| (0..24).contains(h)).ok_or_else(bad)?;
        let minute: i8 = m.parse().ok().filter(|m| (0..60).contains(m)).ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let tz = TimeZone::get(timezone).map_err(|_| ScheduleError::Zone(timezone.to_owned()))?;
        Ok(Schedule { tz, hour, minute })
    }

    fn reset_on(&self, d: Date) -> i64 {
        let dt = d.at(self.hour, self.minute, 0, 0);
        match self.tz.to_zoned(dt) {
            Ok(z) => z.timestamp().as_second(),
            // Only at the ends of the representable range.
            Err(_) => dt.to_zoned(TimeZone::UTC).map_or(0, |z| z.timestamp().as_second()),
        }
    }

    /// The window containing Unix second `now`.
    pub fn window(&self, now: i64) -> Window {
        let ts = Timestamp::from_second(now).unwrap_or(Timestamp::UNIX_EPOCH);
        let today = ts.to_zoned(self.tz.clone()).date();
        let at_today = self.reset_on(today);
        let day = if at_today <= now { today } else { today.yesterday().unwrap_or(today) };
        let next = day.tomorrow().unwrap_or(day);
        Window { day, start: self.reset_on(day), end: self.reset_on(next) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn midnight_utc() {
        let s = Schedule::new("00:00", "UTC").unwrap();
        let w = s.window(unix("2026-11-23T15:00:00Z"));
        assert_eq!(w.start, unix("2026-11-23T00:00:00Z"));
        assert_eq!(w.end, unix("2026-11-24T00:00:00Z"));
        assert_eq!(w.id(), 20261123);
        // The reset instant itself belongs to the new day.
        assert_eq!(s.window(unix("2026-11-24T00:00:00Z")).id(), 20261124);
        assert_eq!(s.window(unix("2026-11-23T23:59:59Z")).id(), 20261123);
    }

    #[test]
    fn local_reset_time_before_it_today() {
        let s = Schedule::new("06:30", "Europe/Paris").unwrap();
        // 05:00 Paris (04:00Z) on the 23rd is still the 22nd's window.
        let w = s.window(unix("2026-11-23T04:00:00Z"));
        assert_eq!(w.id(), 20261122);
        assert_eq!(w.end, unix("2026-11-23T05:30:00Z"));
    }

    #[test]
    fn spring_forward_day_is_23_hours() {
        // London: 2026-03-29 01:00 GMT -> 02:00 BST.
        let s = Schedule::new("00:00", "Europe/London").unwrap();
        let w = s.window(unix("2026-03-29T12:00:00Z"));
        assert_eq!(w.start, unix("2026-03-29T00:00:00Z"));
        assert_eq!(w.end, unix("2026-03-29T23:00:00Z"));
        assert_eq!(w.end - w.start, 23 * 3600);
    }

    #[test]
    fn fall_back_day_is_25_hours() {
        // New York: 2026-11-01 02:00 EDT -> 01:00 EST.
        let s = Schedule::new("00:00", "America/New_York").unwrap();
        let w = s.window(unix("2026-11-01T12:00:00Z"));
        assert_eq!(w.end - w.start, 25 * 3600);
    }

    #[test]
    fn reset_inside_the_gap_happens_after_it() {
        // 02:30 does not exist in New York on 2026-03-08.
        let s = Schedule::new("02:30", "America/New_York").unwrap();
        let w = s.window(unix("2026-03-08T12:00:00Z"));
        assert_eq!(w.id(), 20260308);
        assert_eq!(w.start, unix("2026-03-08T07:30:00Z")); // 03:30 EDT
    }

    #[test]
    fn bad_inputs() {
        assert!(Schedule::new("24:00", "UTC").is_err());
        assert!(Schedule::new("7:00", "UTC").is_err());
        assert!(Schedule::new("07:00", "Mars/Olympus").is_err());
    }
}
