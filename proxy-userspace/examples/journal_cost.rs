//! What the reservation journal costs per call, outside the HTTP path: heap
//! allocations (a counting allocator) and process CPU (`getrusage`, the
//! writer thread and its fsyncs included) per waited reservation, at a few
//! concurrencies, on a file-backed store in the temporary directory; then
//! the floor, an append-only file with one `pwrite` and one `fdatasync` per
//! commit. A measurement, not a test: `cargo run --release -p keyward
//! --example journal_cost` (see bench/results/2026-11-27-journal.md and
//! 2026-11-28-wal.md).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::IpAddr,
    os::unix::fs::FileExt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use keyward::{
    journal::{Journal, Record, Reserved},
    store::Embedded,
};

/// The system allocator, counting allocations and reallocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to `System` unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// This process's user + system CPU so far, in µs.
fn cpu_us() -> f64 {
    // SAFETY: `rusage` is plain data; getrusage fills it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage`.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 * 1e6 + v.tv_usec as f64;
    t(u.ru_utime) + t(u.ru_stime)
}

/// `calls` reservations (each waited for, then settled lazily) from
/// `tasks` tasks at once.
fn run(rt: &tokio::runtime::Runtime, j: &Arc<Journal>, tasks: u64, calls: u64) {
    let seq = Arc::new(AtomicU64::new(tasks * 1_000_000));
    let ip: IpAddr = [192, 0, 2, 1].into();
    rt.block_on(async {
        let mut running = Vec::new();
        for _ in 0..tasks {
            let (j, seq) = (j.clone(), seq.clone());
            running.push(tokio::spawn(async move {
                for _ in 0..calls / tasks {
                    let s = seq.fetch_add(1, Ordering::Relaxed);
                    let r = Reserved { day: 1, ip, network: None, cost: 1, token: None };
                    j.append(Record::Reserved(s, r)).await.expect("journaled");
                    j.append_lazy(Record::Billed(s));
                }
            }));
        }
        for t in running {
            t.await.expect("task");
        }
    });
}

fn main() {
    let dir = std::env::temp_dir().join(format!("keyward-journal-cost-{}", std::process::id()));
    let store = Embedded::open(&dir).expect("store");
    let j = Arc::new(store.journal().expect("journal"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    for tasks in [1u64, 8, 50] {
        let calls = if tasks == 1 { 400 } else { 4000 };
        let (c0, a0, t0) = (j.commits(), allocations(), cpu_us());
        run(&rt, &j, tasks, calls);
        let (c, a, t) = (j.commits() - c0, allocations() - a0, cpu_us() - t0);
        println!(
            "concurrency {tasks}: {calls} calls, {c} commits ({:.1} calls/commit), {:.1} allocations/call, \
             {:.1} allocations/commit, {:.1} µs CPU/call",
            calls as f64 / c as f64,
            a as f64 / calls as f64,
            a as f64 / c as f64,
            t / calls as f64
        );
    }
    drop(j);
    let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(dir.join("wal")).expect("wal");
    let (a0, t0) = (allocations(), cpu_us());
    for i in 0..400u64 {
        f.write_all_at(&[7u8; 80], i * 80).expect("pwrite");
        f.sync_data().expect("fdatasync");
    }
    println!(
        "append-only file: {:.1} allocations/commit, {:.1} µs CPU/commit",
        (allocations() - a0) as f64 / 400.0,
        (cpu_us() - t0) / 400.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
