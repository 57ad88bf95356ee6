//! `cargo xtask bench`: keyward measured side by side with its peers in one
//! run, on one topology, as ratios of CPU time per unit of work (README,
//! Benchmarks). Every tier interleaves its variants round by round and
//! reports per-variant medians with min–max and per-round ratios against an
//! in-run baseline. Figures are information, never pass/fail.

pub mod env;
pub mod http;
pub mod mem;
pub mod packet;
pub mod profile;
pub mod program;

use serde_json::{Value, json};

/// The benchmark's XDP programs (floor, baseline drop, live-frames
/// generators from `tests/bench-ebpf`), built by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keyward-bench-xdp"));

/// Median, min and max of a sample.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let mid = s.len() / 2;
    let med = if s.len() % 2 == 1 { s[mid] } else { (s[mid - 1] + s[mid]) / 2.0 };
    (med, s[0], s[s.len() - 1])
}

/// `median (min–max)` with `d` decimals.
pub fn fmt(v: &[f64], d: usize) -> String {
    let (m, lo, hi) = stats(v);
    if v.len() <= 1 {
        return format!("{m:.d$}");
    }
    format!("{m:.d$} ({lo:.d$}–{hi:.d$})")
}

/// A JSON summary of a sample.
pub fn summary(v: &[f64]) -> Value {
    let (m, lo, hi) = stats(v);
    json!({ "rounds": v, "median": m, "min": lo, "max": hi })
}

/// Per-round ratios a/b.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// A tiny deterministic PRNG (xorshift64*), for reproducible inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// CPU1's busy time since boot in ns, from /proc/stat (USER_HZ = 100):
/// everything but idle and iowait.
pub fn cpu1_busy_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().find(|l| l.starts_with("cpu1 ")).unwrap_or("cpu1 0");
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    total.saturating_sub(idle) * 10_000_000
}

/// A markdown table.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}|\n", head.join(" | "), head.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// Today's date (UTC), `YYYY-MM-DD`: the results files' names.
pub fn date() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Civil date from Unix days (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
