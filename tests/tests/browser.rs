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
};
use keyward_tests::{
    browser::{self, Chromium},
    netns::{SERVER_V4, Topology},
    privileged,
    tokenpage::TokenPage,
};

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
    let host = host(&topo, &cfg, pow_cfg);
    let origin = host.origin();
    let shot = artifact("kw-demo-page.png");
    let ns = topo.client_ns.clone();
    let results: Vec<serde_json::Value> = browser::block_on_in(Some(&topo.client_ns), move || async move {
        let secure = format!("--unsafely-treat-insecure-origin-as-secure={origin}");
        let c = Chromium::launch(Some(&ns), &[&secure]).await?;
        let page = c.open(&format!("{origin}/")).await?;
        // Three lookups with a 2-call token: the third needs a second token
        // (and a second challenge), fetched by the script on its own.
        let r = page
            .eval(
                "async () => { await keyward.ready; const out = [];
                  for (const q of ['SW1A1AA', 'EC1A1BB', 'W1A0AX']) out.push(await lookup(q));
                  return out; }",
            )
            .await?;
        page.screenshot(&shot).await?;
        anyhow::Ok(r)
    })
    .expect("browser run");
    let statuses: Vec<_> = results.iter().map(|r| r["status"].as_u64()).collect();
    assert_eq!(statuses, [Some(200); 3], "{results:#?}");
    let remaining: Vec<_> = results.iter().map(|r| r["body"]["remaining"].as_u64()).collect();
    assert_eq!(remaining, [Some(1), Some(0), Some(1)], "{results:#?}");
    let counts = host.counts();
    assert_eq!(counts.admitted, 3, "{counts:?}");
    assert_eq!((counts.challenges, counts.minted), (2, 2), "{counts:?}");
    assert!(counts.refused.is_empty(), "the script never sends a call its token cannot cover: {counts:?}");
    println!("screenshot: {}", artifact("kw-demo-page.png").display());
}

/// The mean solve time, projected to the challenge range's mean counter.
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
    // Challenges made in Rust by a Pow with the host's key and binding.
    let keys = keys();
    let client = IpAddr::V4(keyward_tests::netns::CLIENT_V4);
    let maker = Pow::new(keys, cfg.clone(), Default::default(), Arc::new(MemorySpent::new()), Arc::new(SystemClock));
    let origin = host.origin();
    let runs: Vec<(&str, f64, &str, u32)> = vec![
        ("1x", 1.0, "auto", 1),
        ("1x", 1.0, "js", 1),
        ("4x", 4.0, "auto", 1),
        ("4x", 4.0, "js", 1),
        ("1x", 1.0, "auto", 2),
    ];
    let challenges: Vec<_> = runs.iter().map(|_| maker.challenge(&origin, client).unwrap()).collect();
    let jobs: Vec<_> = runs.iter().cloned().zip(challenges.iter().cloned()).collect();
    let ns = topo.client_ns.clone();
    let o = origin.clone();
    let solved: Vec<(serde_json::Value, f64)> = browser::block_on_in(Some(&topo.client_ns), move || async move {
        let secure = format!("--unsafely-treat-insecure-origin-as-secure={o}");
        let c = Chromium::launch(Some(&ns), &[&secure]).await?;
        let page = c.open(&format!("{o}/bench")).await?;
        let mut out = Vec::new();
        for ((_, rate, mode, workers), ch) in jobs {
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
    println!("proof-of-work at the default difficulty: {}", cfg.describe());
    for (((label, _, mode, workers), ch), (s, wall)) in runs.iter().zip(&challenges).zip(&solved) {
        let solution: pow::Solution = serde_json::from_value(s.clone()).expect("a solution");
        let sub = Submission { challenge: ch.clone(), solution: solution.clone() };
        maker.redeem(&sub, &origin, client).expect("the browser's solution verifies in Rust");
        println!(
            "  chromium {label} throttle, mode {mode}, {workers} worker(s): counter {} in {wall:.0} ms wall \
             (projected to the mean counter: {:.0} ms)",
            solution.counter,
            projected(*wall, solution.counter, &cfg),
        );
    }
    let ch = maker.challenge(&origin, client).unwrap();
    let t = Instant::now();
    let s = pow::solve(&ch, Duration::from_secs(120)).expect("native solve");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "  native Rust (altcha crate, one thread): counter {} in {ms:.0} ms (projected to the mean counter: {:.0} ms \
         = CPU seconds per minted token for a scripted solver)",
        s.counter,
        projected(ms, s.counter, &cfg)
    );
}
