//! `cargo xtask soak [--minutes N]`: see `keyward_tests::soak`. Writes
//! `bench/results/<date>-soak.json` and `.md` (or under `--out DIR`);
//! `--seconds N` runs a short smoke instead of whole minutes.

use std::time::Duration;

use keyward_tests::{bench, soak};

fn usage() -> ! {
    eprintln!("usage: keyward-soak [--minutes N | --seconds N] [--out DIR]");
    std::process::exit(2);
}

fn main() {
    let mut length = Duration::from_secs(600);
    let mut out = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/results"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut n = || args.next().and_then(|v| v.parse::<u64>().ok()).filter(|n| *n > 0).unwrap_or_else(|| usage());
        match a.as_str() {
            "--minutes" => length = Duration::from_secs(n() * 60),
            "--seconds" => length = Duration::from_secs(n()),
            "--out" => out = args.next().map(Into::into).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("keyward soak: needs root (namespaces, XDP)");
        std::process::exit(1);
    }
    // Samples every minute; a smoke shorter than two minutes samples every
    // quarter of its length.
    let every = if length >= Duration::from_secs(120) { Duration::from_secs(60) } else { length / 4 };
    let rig = soak::Rig::start();
    eprintln!("== soak: {} s, samples every {} s", length.as_secs(), every.as_secs());
    eprintln!("{HEAD}");
    let (samples, tally) = rig.run(length, every);
    drop(rig);
    let (doc, md) = report(length, &samples, &tally);
    std::fs::create_dir_all(&out).expect("results directory");
    let stem = format!("{}-soak", bench::date());
    std::fs::write(out.join(format!("{stem}.json")), serde_json::to_string_pretty(&doc).unwrap()).expect("write json");
    std::fs::write(out.join(format!("{stem}.md")), &md).expect("write md");
    println!("{md}");
    eprintln!("== wrote {}/{stem}.{{json,md}}", out.display());
}

const HEAD: &str =
    "|  time | RSS | fds | threads | CPU | answered | CPU/request | visitors ok |\n|---|---|---|---|---|---|---|---|";

fn report(length: Duration, samples: &[soak::Sample], tally: &soak::Tally) -> (serde_json::Value, String) {
    let facts = bench::env::facts();
    let flags = soak::growth(samples);
    let t = tally.json();
    let rows: Vec<String> =
        samples.iter().enumerate().map(|(i, s)| soak::row(s, i.checked_sub(1).and_then(|p| samples.get(p)))).collect();
    let whole = samples.first().zip(samples.last());
    let ok = whole.and_then(|(a, b)| soak::success(a, b)).unwrap_or(0.0);
    let per = whole.and_then(|(a, b)| soak::cpu_per_request(a, b)).unwrap_or(0.0);
    let doc = serde_json::json!({
        "date": bench::date(), "seconds": length.as_secs(), "machine": facts, "tally": t,
        "visitor_success_pct": ok, "cpu_us_per_request": per, "growth": flags,
        "samples": samples.iter().map(|s| serde_json::json!({
            "at_s": s.at_s, "rss_kib": s.rss_kib, "fds": s.fds, "threads": s.threads,
            "cpu_ms": s.cpu_ms, "answered": s.answered, "visitor_ok": s.visitor_ok, "visitor_failed": s.visitor_failed,
        })).collect::<Vec<_>>(),
    });
    let mut md = format!(
        "# keyward soak, {}\n\nMachine: {} · kernel {} · {} cores. {} s of mixed load on the {} daemon in namespaces \
         (see `keyward_tests::soak`): 8 visitors with page tokens at 2 calls/s each; idle connections and slow \
         headers from one address each, held at the per-IP cap (64) and 8 over; one address flooding GETs and one \
         POSTing at 50/s over a 5/s rate; forged Origins at 5/s; a spoofed SYN flood at 2,000 pps from 65,536 \
         rotating sources.\n\n{HEAD}\n{}\n\n",
        bench::date(),
        facts["cpu"].as_str().unwrap_or("?"),
        facts["kernel"].as_str().unwrap_or("?"),
        facts["cores"],
        length.as_secs(),
        if keyward_tests::daemon::bin().components().any(|c| c.as_os_str() == "release") { "release" } else { "debug" },
        rows.join("\n"),
    );
    md.push_str(&format!(
        "Visitors: {ok:.2}% of {} calls succeeded. CPU per answered request over the run: {per:.0} µs.\n\n\
         Attacks: GET flood {} refused 429, {} otherwise; POST flood {} refused 429 (slowest refusal {} ms), {} \
         otherwise; forged Origins {} refused 403, {} admitted; idle connections opened {}, slow-header \
         connections opened {}; spoofed SYNs sent {}.\n\n",
        t["visitor_ok"].as_u64().unwrap_or(0) + t["visitor_failed"].as_u64().unwrap_or(0),
        t["flood_429"],
        t["flood_other"],
        t["post_429"],
        t["post_slowest_ms"],
        t["post_other"],
        t["origin_403"],
        t["origin_admitted"],
        t["idle_opened"],
        t["slow_opened"],
        t["spoofed_sent"],
    ));
    if flags.is_empty() {
        md.push_str("Growth: none flagged (RSS, descriptors, threads and CPU per request, first minute to end).\n");
    } else {
        md.push_str(&format!("Growth flagged:\n\n- {}\n", flags.join("\n- ")));
    }
    (doc, md)
}
