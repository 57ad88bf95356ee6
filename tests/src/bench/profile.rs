//! Where the forwarder's time goes (tier 3 with `--profile`): `perf record
//! -g` on the pinned daemon while `wrk` loads one path, its top frames by
//! self time, and heap allocations per request counted by uprobes on the C
//! library's `malloc` and `realloc` (the daemon uses the system allocator,
//! so every Rust allocation goes through them). Needs Debian's
//! `linux-perf`; without it the profile says so and the bench goes on.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
const EVENTS: &str = "probe_libc:malloc,probe_libc:realloc";

/// Whether `perf` runs here.
pub fn available() -> bool {
    Command::new("perf").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The allocation uprobes, added once (an existing probe is kept).
pub fn add_probes() -> bool {
    for f in ["malloc", "realloc"] {
        let _ = Command::new("perf").args(["probe", "-q", "-x", LIBC, "--add", f]).output();
    }
    Command::new("perf").args(["probe", "-l"]).output().is_ok_and(|o| {
        let t = String::from_utf8_lossy(&o.stdout);
        t.contains("probe_libc:malloc") && t.contains("probe_libc:realloc")
    })
}

/// The uprobes this run added, removed.
pub fn remove_probes() {
    let _ = Command::new("perf").args(["probe", "-q", "-d", "probe_libc:malloc", "-d", "probe_libc:realloc"]).output();
}

struct Perf(Child);

impl Perf {
    /// Stop with SIGINT (perf writes its output then) and wait, bounded.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        if crate::wait_for(Duration::from_secs(30), || self.0.try_wait().ok().flatten()).is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Option<Perf> {
    Command::new("perf").args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok().map(Perf)
}

/// Profile process `pid` under `load` (it returns the requests it made):
/// one warm-up run, one under `perf record` alone, then one with the
/// allocation uprobes counting (apart, so that the uprobes' own cost does
/// not show in the frames). The summary as text: allocations per request,
/// the share of each binary, then the top frames by self time.
pub fn around(dir: &Path, name: &str, pid: u32, probes: bool, load: impl Fn() -> u64) -> String {
    let slug: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let data = dir.join(format!("{slug}.perf"));
    let stat = dir.join(format!("{slug}.stat"));
    let (data_s, stat_s, pid_s) = (data.display().to_string(), stat.display().to_string(), pid.to_string());
    let _ = load();
    let rec = spawn(&["record", "-g", "-F", "1999", "-p", &pid_s, "-o", &data_s]);
    // perf attaches within a few ms; give it until its data file exists.
    let _ = crate::wait_for(Duration::from_secs(5), || data.exists().then_some(()));
    std::thread::sleep(Duration::from_millis(200));
    let reqs = load();
    if let Some(r) = rec {
        r.stop();
    }
    let mut s = format!("### {name}\n\n{reqs} requests profiled");
    if probes && let Some(c) = spawn(&["stat", "-x", ",", "-e", EVENTS, "-p", &pid_s, "-o", &stat_s]) {
        std::thread::sleep(Duration::from_millis(300));
        let counted = load();
        c.stop();
        let allocs: u64 = std::fs::read_to_string(&stat)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("probe_libc:"))
            .filter_map(|l| l.split(',').next().and_then(|n| n.trim().parse::<u64>().ok()))
            .sum();
        let per = allocs as f64 / counted.max(1) as f64;
        s.push_str(&format!("; {per:.1} heap allocations per request (malloc + realloc, over {counted} requests)"));
    }
    s.push_str("\n\n```\n");
    s.push_str(&report(&data_s, "dso", 5));
    s.push_str("```\n\n```\n");
    s.push_str(&report(&data_s, "dso,symbol", 25));
    s.push_str("```\n\n");
    let _ = std::fs::remove_file(&data);
    let _ = std::fs::remove_file(&stat);
    s
}

/// The first `n` lines of `perf report` by self time, sorted by `sort`,
/// those with at least 0.5% of the samples.
fn report(data: &str, sort: &str, n: usize) -> String {
    let out = Command::new("perf")
        .args(["report", "-i", data, "--stdio", "--no-children", "-g", "none", "--percent-limit", "0.5"])
        .args(["--sort", sort])
        .stderr(Stdio::null())
        .output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
    if lines.is_empty() {
        return "(no samples: perf record did not run)\n".to_owned();
    }
    lines.iter().take(n).map(|l| format!("{}\n", l.trim_end())).collect()
}

/// What [`syscalls`] counts, as (column, perf events summed into it). The
/// EAGAIN column is every syscall that returned -EAGAIN (a read or accept
/// that found nothing, the readiness model's probe).
const SYSCALL_COLUMNS: [(&str, &[&str]); 8] = [
    ("syscalls", &["raw_syscalls:sys_enter"]),
    ("EAGAIN", &["raw_syscalls:sys_exit"]),
    (
        "reads",
        &[
            "syscalls:sys_enter_read",
            "syscalls:sys_enter_recvfrom",
            "syscalls:sys_enter_recvmsg",
            "syscalls:sys_enter_readv",
        ],
    ),
    (
        "writes",
        &[
            "syscalls:sys_enter_write",
            "syscalls:sys_enter_writev",
            "syscalls:sys_enter_sendto",
            "syscalls:sys_enter_sendmsg",
        ],
    ),
    (
        "epoll waits",
        &["syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait", "syscalls:sys_enter_epoll_pwait2"],
    ),
    ("epoll_ctl", &["syscalls:sys_enter_epoll_ctl"]),
    ("futex", &["syscalls:sys_enter_futex"]),
    ("context switches", &["context-switches"]),
];

/// The header of the table [`syscalls`] fills a row of.
pub fn syscall_columns() -> Vec<&'static str> {
    SYSCALL_COLUMNS.iter().map(|(c, _)| *c).collect()
}

/// Syscalls and context switches per request of processes `pids` (all
/// their threads) over one run of `load` (it returns the requests made),
/// counted by `perf stat`; one value per [`syscall_columns`], or `None`
/// when perf could not count.
pub fn syscalls(dir: &Path, slug: &str, pids: &[u32], load: impl Fn() -> u64) -> Option<Vec<f64>> {
    let out = dir.join(format!("{slug}.syscalls"));
    let out_s = out.display().to_string();
    let pids = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut args: Vec<&str> = vec!["stat", "-x", ",", "-p", &pids, "-o", &out_s];
    for (col, events) in SYSCALL_COLUMNS {
        for e in events {
            args.extend(["-e", e]);
            if col == "EAGAIN" {
                args.extend(["--filter", "ret == -11"]);
            }
        }
    }
    let c = spawn(&args)?;
    std::thread::sleep(Duration::from_millis(300));
    let reqs = load();
    c.stop();
    let text = std::fs::read_to_string(&out).ok()?;
    let _ = std::fs::remove_file(&out);
    let count = |event: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.get(2) == Some(&event)).then(|| f[0].trim().parse::<u64>().ok()).flatten()
        })
    };
    let cols: Vec<f64> = SYSCALL_COLUMNS
        .iter()
        .map(|(_, events)| events.iter().filter_map(|e| count(e)).sum::<u64>() as f64 / reqs.max(1) as f64)
        .collect();
    (cols[0] > 0.0).then_some(cols)
}
