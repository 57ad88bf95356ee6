//! `cargo xtask bench [--quick] [--tier N]`: see `keyward_tests::bench`.
//! Writes `bench/results/<date>.json` and `.md` (or under `--out DIR`).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use keyward_tests::bench;

/// Counts live heap bytes, for tier 4's per-client memory.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `System` with layout `l` (every allocation does).
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new` is the caller's, unchanged.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn allocated() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    let mut quick = false;
    let mut profile = false;
    let mut tiers: Vec<u8> = Vec::new();
    let mut out = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/results"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--tier" => tiers.push(args.next().and_then(|t| t.parse().ok()).unwrap_or_else(|| usage())),
            "--profile" => profile = true,
            "--out" => out = args.next().map(Into::into).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    if tiers.is_empty() {
        tiers = vec![1, 2, 3, 4];
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("keyward bench: needs root (BPF_PROG_TEST_RUN, namespaces, pinned cores)");
        std::process::exit(1);
    }
    let facts = bench::env::facts();
    let mut doc = serde_json::json!({ "date": bench::date(), "quick": quick, "machine": facts });
    let mut md = format!(
        "# keyward benchmark, {}{}\n\nMachine: {} · kernel {} · {} cores · spectre_v2: {} · clocksource {}\n\n",
        bench::date(),
        if quick { " (quick)" } else { "" },
        facts["cpu"].as_str().unwrap_or("?"),
        facts["kernel"].as_str().unwrap_or("?"),
        facts["cores"],
        facts["spectre_v2"].as_str().unwrap_or("?"),
        facts["clocksource"].as_str().unwrap_or("?"),
    );
    if tiers.contains(&1) {
        eprintln!("== tier 1: program cost (BPF_PROG_TEST_RUN)");
        let (rounds, repeat, each) = if quick { (2, 100_000, 2_000) } else { (5, 2_000_000, 20_000) };
        let (j, t) = bench::program::run(rounds, repeat, each);
        doc["tier1"] = j;
        md.push_str(&format!("## Tier 1: XDP program cost\n\n{rounds} interleaved rounds; repeated scenarios run {repeat} times per call, new-source scenarios {each} distinct frames one run each.\n\n{t}\n"));
        println!("{t}");
    }
    if tiers.contains(&2) {
        eprintln!("== tier 2: packet path on veth with live frames");
        let (rounds, packets) = if quick { (1, 1_000_000) } else { (3, 5_000_000) };
        let (j, t) = bench::packet::run(rounds, packets);
        doc["tier2"] = j;
        md.push_str(&format!("## Tier 2: packet path (veth, live frames)\n\n{rounds} interleaved rounds of {packets} 64-byte SYNs from a live-frames generator pinned to CPU0; the receiving veth's NAPI is threaded and pinned to CPU1; CPU1 busy time per packet counted at the receiver.\n\n{t}\n"));
        println!("{t}");
    }
    if tiers.contains(&3) {
        eprintln!("== tier 3: HTTP, keyward vs nginx");
        let (rounds, secs, rate) = if quick { (1, 2, 1000) } else { (5, 5, 2000) };
        let scratch = std::env::temp_dir().join(format!("keyward-bench-perf-{}", std::process::id()));
        let profile_dir = (profile && bench::profile::available()).then(|| {
            let _ = std::fs::create_dir_all(&scratch);
            scratch.as_path()
        });
        if profile && profile_dir.is_none() {
            eprintln!("keyward bench: --profile needs perf (Debian's linux-perf); going on without profiles");
        }
        let (j, t, prof) = bench::http::run(rounds, secs, rate, profile_dir);
        let _ = std::fs::remove_dir_all(&scratch);
        doc["tier3"] = j;
        md.push_str(&format!("## Tier 3: HTTP forwarder vs nginx and HAProxy\n\n{rounds} interleaved rounds; `wrk -t1 -c50 -d{secs}s` on CPU0, proxies (one nginx worker, one HAProxy thread; keyward's runtime) pinned to CPU1, upstream nginx `return 200` on CPU0; CPU1 busy time per request.\n\n{t}\n"));
        println!("{t}");
        if let Some(p) = prof {
            std::fs::create_dir_all(&out).expect("results directory");
            let stem = if quick { format!("{}-quick", bench::date()) } else { bench::date() };
            let text = format!(
                "# keyward forwarder profile, {}\n\n`perf record -g` on the pinned daemon under `wrk -t1 -c50`, frames by self time (≥ 1%); allocations counted by uprobes on libc's malloc and realloc.\n\n{p}",
                bench::date()
            );
            std::fs::write(out.join(format!("{stem}-profile.md")), text).expect("write profile");
        }
    }
    if tiers.contains(&4) {
        eprintln!("== tier 4: memory and scale");
        let (j, t) = bench::mem::run(if quick { 1 } else { 3 }, quick, allocated);
        doc["tier4"] = j;
        md.push_str(&format!("## Tier 4: memory and scale\n\n{t}\n"));
        println!("{t}");
    }
    std::fs::create_dir_all(&out).expect("results directory");
    let stem = if quick { format!("{}-quick", bench::date()) } else { bench::date() };
    std::fs::write(out.join(format!("{stem}.json")), serde_json::to_string_pretty(&doc).unwrap()).expect("write json");
    std::fs::write(out.join(format!("{stem}.md")), &md).expect("write md");
    eprintln!("== wrote {}/{stem}.{{json,md}}", out.display());
}

fn usage() -> ! {
    eprintln!("usage: keyward-bench [--quick] [--tier 1|2|3|4]... [--profile] [--out DIR]");
    std::process::exit(2);
}
