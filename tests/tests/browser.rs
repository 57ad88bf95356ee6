//! The page script (`kw.js`) in a real browser: headless Chromium in a client
//! namespace loads a page from a host in the server namespace that serves
//! the token endpoint from `keyward::token`. The page fetches a challenge,
//! solves it in Web Workers, mints a token and makes lookups with it; the
//! host admits exactly those calls. A second test solves challenges made in
//! Rust with the script's solver and prints the solve times (a measurement,
//! never a pass/fail criterion) next to the native solver's.

use std::{
    net::IpAddr,
    num::NonZeroU32,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use keyward::{
    clock::SystemClock,
    token::{
        Tokens,
        allowance::Allowance,
        config::{PowConfig, PowMode, TokenConfig},
        keys::{Key, KeyRing},
        pow::{self, MemorySpent, Pow, Submission},
    },
    units::Span,
};
use keyward_tests::{
    browser::{self, Chromium},
    netns::{SERVER_V4, Topology},
    privileged,
    tokenpage::TokenPage,
};
use serde_json::Value;

fn keys() -> Arc<KeyRing> {
    let mut secret = [0u8; 32];
    for (i, b) in secret.iter_mut().enumerate() {
        *b = u8::try_from(i).unwrap_or(0) ^ u8::try_from(std::process::id() & 0xff).unwrap_or(0);
    }
    Arc::new(KeyRing::from_keys(vec![Key::new("t1", &secret).unwrap()]).unwrap())
}

fn host(topo: &Topology, token_cfg: &TokenConfig, pow_cfg: PowConfig) -> TokenPage {
    let keys = keys();
    let tokens = Tokens::new(token_cfg, keys.clone(), Arc::new(Allowance::new()), Arc::new(SystemClock));
    let pow = Pow::new(keys, pow_cfg, tokens.bind(), Arc::new(MemorySpent::new()), Arc::new(SystemClock));
    TokenPage::start(&topo.server_ns, IpAddr::V4(SERVER_V4), tokens, Some(pow))
}

fn ready() -> bool {
    if !privileged() {
        return false;
    }
    assert!(browser::executable().is_some(), "chromium is not installed: run `cargo xtask setup`");
    true
}

/// Where screenshots are kept for the report (under target/, not removed).
fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts").join(name)
}

#[test]
fn page_solves_the_challenge_mints_and_calls_with_its_token() {
    if !ready() {
        return;
    }
    let topo = Topology::new();
    let cfg = TokenConfig { max_calls: NonZeroU32::new(2).unwrap(), ..TokenConfig::default() };
    let pow_cfg = PowConfig { mode: PowMode::Always, ..PowConfig::default() };
    let host = Arc::new(host(&topo, &cfg, pow_cfg));
    // A second host without proof-of-work whose tokens are only accepted after 2 s.
    let slow_cfg = TokenConfig { min_age: Span(Duration::from_secs(2)), ..TokenConfig::default() };
    let tokens = Tokens::new(&slow_cfg, keys(), Arc::new(Allowance::new()), Arc::new(SystemClock));
    let patient = TokenPage::start(&topo.server_ns, IpAddr::V4(SERVER_V4), tokens, None);
    let (origin, patient_origin) = (host.origin(), patient.origin());
    let shot = artifact("kw-demo-page.png");
    let ns = topo.client_ns.clone();
    let h = host.clone();
    let lookups = "async () => { await keyward.ready; const out = [];
                   for (const q of ['SW1A1AA', 'EC1A1BB', 'W1A0AX']) out.push(await lookup(q));
                   return out; }";
    let (results, retried, given_up, waited): (Vec<Value>, Value, Value, Value) =
        browser::block_on_in(Some(&topo.client_ns), move || async move {
            let secure = format!("--unsafely-treat-insecure-origin-as-secure={origin},{patient_origin}");
            let c = Chromium::launch(Some(&ns), &[&secure]).await?;
            let page = c.open(&format!("{origin}/")).await?;
            // Three lookups with a 2-call token: the third needs a second
            // token (and a second challenge), fetched by the script on its own.
            let r = page.eval(lookups).await?;
            page.screenshot(&shot).await?;
            // One token-* refusal: a new token and one retry.
            h.refuse_next(1);
            let retried = page.eval("async () => lookup('N11AA')").await?;
            // Two: the retry is refused too, and the page sees the refusal.
            h.refuse_next(2);
            let given_up = page.eval("async () => lookup('N12AA')").await?;
            // min_age: the script waits until the token is accepted.
            let p2 = c.open(&format!("{patient_origin}/")).await?;
            let waited = p2
                .eval(
                    "async () => { const t = performance.now(); const r = await lookup('E11AA');
                                  return { ...r, waited_ms: performance.now() - t }; }",
                )
                .await?;
            anyhow::Ok((r, retried, given_up, waited))
        })
        .expect("browser run");
    let statuses: Vec<_> = results.iter().map(|r| r["status"].as_u64()).collect();
    assert_eq!(statuses, [Some(200); 3], "{results:#?}");
    let remaining: Vec<_> = results.iter().map(|r| r["body"]["remaining"].as_u64()).collect();
    assert_eq!(remaining, [Some(1), Some(0), Some(1)], "{results:#?}");
    assert_eq!(retried["status"], 200, "{retried}");
    assert_eq!(given_up["status"], 403, "{given_up}");
    assert_eq!(given_up["body"]["type"], "urn:keyward:problem:token-expired", "{given_up}");
    let counts = host.counts();
    // 3 + 1 retried + 0 for the call refused twice.
    assert_eq!(counts.admitted, 4, "{counts:?}");
    // Tokens: the first, the second (allowance used up), after each token-* refusal one more.
    assert_eq!((counts.challenges, counts.minted), (4, 4), "{counts:?}");
    assert_eq!(counts.refused.get("token-expired"), Some(&3), "{counts:?}");
    assert_eq!(counts.refused.len(), 1, "{counts:?}");
    assert_eq!(waited["status"], 200, "{waited}");
    let c2 = patient.counts();
    assert_eq!((c2.admitted, c2.refused.len()), (1, 0), "the script waited out min_age: {c2:?} {waited}");
    println!("screenshot: {}", artifact("kw-demo-page.png").display());
}

/// One measured configuration: throttling rate, solver mode, workers (0 =
/// in the page) and the share of the default counter range used (small
/// shares keep slow configurations short; times are projected back).
struct Run {
    rate: f64,
    mode: &'static str,
    workers: u32,
    share: u32,
}

const RUNS: &[Run] = &[
    Run { rate: 1.0, mode: "auto", workers: 2, share: 1 },
    Run { rate: 4.0, mode: "auto", workers: 2, share: 1 },
    Run { rate: 1.0, mode: "auto", workers: 1, share: 1 },
    Run { rate: 1.0, mode: "js", workers: 1, share: 4 },
    Run { rate: 1.0, mode: "js", workers: 0, share: 4 },
    Run { rate: 4.0, mode: "js", workers: 0, share: 10 },
];

/// A solve time in ms projected to the mean counter of `cfg`'s range.
fn projected(ms: f64, counter: u32, cfg: &PowConfig) -> f64 {
    let [lo, hi] = cfg.counter;
    ms / f64::from(counter.max(1)) * (f64::from(lo) + f64::from(hi)) / 2.0
}

#[test]
fn solve_times_in_chromium_and_natively() {
    if !ready() {
        return;
    }
    let topo = Topology::new();
    let cfg = PowConfig { mode: PowMode::Always, ..PowConfig::default() };
    let host = host(&topo, &TokenConfig::default(), cfg.clone());
    let origin = host.origin();
    let client = IpAddr::V4(keyward_tests::netns::CLIENT_V4);
    // Challenges made in Rust, with the host's key and binding.
    let maker = |share: u32| {
        let [lo, hi] = cfg.counter;
        let c = PowConfig { counter: [(lo / share).max(1), (hi / share).max(1)], ..cfg.clone() };
        Pow::new(keys(), c, Default::default(), Arc::new(MemorySpent::new()), Arc::new(SystemClock))
    };
    let challenges: Vec<_> = RUNS.iter().map(|r| maker(r.share).challenge(&origin, client).unwrap()).collect();
    let jobs: Vec<_> = RUNS.iter().map(|r| (r.rate, r.mode, r.workers)).zip(challenges.iter().cloned()).collect();
    let ns = topo.client_ns.clone();
    let o = origin.clone();
    let solved: Vec<(serde_json::Value, f64)> = browser::block_on_in(Some(&topo.client_ns), move || async move {
        let secure = format!("--unsafely-treat-insecure-origin-as-secure={o}");
        let c = Chromium::launch(Some(&ns), &[&secure]).await?;
        let page = c.open(&format!("{o}/bench")).await?;
        let mut out = Vec::new();
        for ((rate, mode, workers), ch) in jobs {
            page.throttle(rate).await?;
            let js = format!(
                "async () => keyward.solve({}, {{ workers: {workers}, mode: '{mode}' }})",
                serde_json::to_string(&ch)?
            );
            let t = Instant::now();
            let s: serde_json::Value = page.eval(&js).await?;
            out.push((s, t.elapsed().as_secs_f64() * 1000.0));
        }
        anyhow::Ok(out)
    })
    .expect("browser run");
    println!("proof-of-work at the default difficulty: {} (mean {} KDF iterations)", cfg.describe(), cfg.mean_work());
    for ((run, ch), (s, wall)) in RUNS.iter().zip(&challenges).zip(&solved) {
        let solution: pow::Solution = serde_json::from_value(s.clone()).expect("a solution");
        let sub = Submission { challenge: ch.clone(), solution: solution.clone() };
        maker(run.share).redeem(&sub, &origin, client).expect("the browser's solution verifies in Rust");
        let place = if run.workers == 0 { "in the page".to_owned() } else { format!("{} worker(s)", run.workers) };
        println!(
            "  chromium, CPU throttling {}x, mode {}, {place}: counter {} in {wall:.0} ms; at the mean counter {:.0} ms",
            run.rate,
            run.mode,
            solution.counter,
            projected(*wall, solution.counter, &cfg),
        );
    }
    let ch = maker(1).challenge(&origin, client).unwrap();
    let t = Instant::now();
    let s = pow::solve(&ch, Duration::from_secs(120)).expect("native solve");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "  native Rust solver (altcha crate, optimized, one thread): counter {} in {ms:.0} ms; at the mean counter \
         {:.0} ms = the CPU time a scripted solver pays per minted token",
        s.counter,
        projected(ms, s.counter, &cfg)
    );
}
