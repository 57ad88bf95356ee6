//! Page tokens end to end: the real daemon in a server namespace, a stand-in
//! paid API, clients in the client namespace (and one from another network).
//! A script that never loads the page bills nothing; a token replayed from
//! another network is refused; a script that skips a required challenge gets
//! no token; a solved challenge mints one, once; allowances run out.

use std::{net::Ipv4Addr, time::Instant};

use keyward_tests::{
    daemon::{Daemon, PORT},
    fwd::{ORIGIN, XDP_OPEN, config},
    netns::Topology,
    privileged,
    upstream::Upstream,
    wire::{self, HttpAnswer},
};

/// A token key file removed on drop.
struct KeyFile(std::path::PathBuf);

impl KeyFile {
    fn new() -> KeyFile {
        use std::os::unix::fs::PermissionsExt as _;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("kwt-token-{}-{n}.keys", std::process::id()));
        std::fs::write(&p, "# test keys\nk1 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n")
            .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        KeyFile(p)
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Setup {
    t: Topology,
    up: Upstream,
    d: Daemon,
    _keys: KeyFile,
}

/// Tokens required; `access` adds `[access]` keys, `token` `[access.token]` keys.
fn setup(access: &str, token: &str) -> Setup {
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let keys = KeyFile::new();
    let text = config(&up, "", "")
        .replace("require_origin = true\n", &format!("require_origin = true\nrequire_token = true\n{access}\n"))
        + &format!("\n[access.token]\nkeys_file = \"{}\"\n{token}\n", keys.0.display());
    let d = Daemon::start_with(&t, XDP_OPEN, &text);
    Setup { t, up, d, _keys: keys }
}

impl Setup {
    fn request(
        &self,
        src: Option<Ipv4Addr>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpAnswer {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: keyward.test\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!("Content-Type: text/plain\r\nContent-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        req.push_str(body);
        wire::http_raw_from(&self.t, src, PORT, req.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// What kw.js does at page load: `GET /.keyward/token` from the page's origin.
    fn mint(&self, src: Option<Ipv4Addr>) -> serde_json::Value {
        let a = self.request(src, "GET", "/.keyward/token", &[ORIGIN], "");
        assert_eq!(a.status, 200, "{}", a.raw);
        assert_eq!(a.header("access-control-allow-origin"), Some(ORIGIN.1), "{}", a.raw);
        a.json()
    }

    fn call(&self, src: Option<Ipv4Addr>, token: Option<&str>) -> HttpAnswer {
        let mut h = vec![ORIGIN];
        if let Some(t) = token {
            h.push(("Keyward-Token", t));
        }
        self.request(src, "GET", "/postcodes/SW1A1AA", &h, "")
    }

    fn spent(&self) -> u64 {
        self.d.status().forwarder.expect("forwarder status").spent_micros
    }
}

fn problem(a: &HttpAnswer) -> String {
    a.json()["type"].as_str().unwrap_or_default().trim_start_matches("urn:keyward:problem:").to_owned()
}

#[test]
fn a_script_that_never_loads_the_page_gets_token_required_and_bills_nothing() {
    if !privileged() {
        return;
    }
    let s = setup("", "");
    for token in [None, Some(""), Some("kw1.k1.forged.forged"), Some("not-a-token")] {
        let a = s.call(None, token);
        assert_eq!(a.status, 403, "{}", a.raw);
        assert_eq!(a.header("content-type"), Some("application/problem+json"));
        let want = if token.is_none_or(str::is_empty) { "token-required" } else { "token-invalid" };
        assert_eq!(problem(&a), want, "{token:?}");
    }
    // A token for the query-parameter form is checked the same way.
    let a = s.request(None, "GET", "/postcodes/SW1A1AA?kw_token=forged", &[ORIGIN], "");
    assert_eq!((a.status, problem(&a).as_str()), (403, "token-invalid"));
    // Tokens are minted only for the allowed page.
    let a = s.request(None, "GET", "/.keyward/token", &[("Origin", "https://copycat.example")], "");
    assert_eq!((a.status, problem(&a).as_str()), (403, "origin-not-allowed"));
    assert!(s.up.calls().is_empty(), "a call without a token reached the paid API");
    assert_eq!(s.spent(), 0);
    // The page script is served.
    let a = s.request(None, "GET", "/.keyward/kw.js", &[], "");
    assert_eq!(a.status, 200);
    assert!(a.header("content-type").is_some_and(|c| c.starts_with("application/javascript")), "{}", a.raw);
}

#[test]
fn a_token_replayed_from_another_network_is_refused() {
    if !privileged() {
        return;
    }
    let s = setup("", "max_calls = 3");
    let neighbour = Ipv4Addr::new(10, 77, 0, 3);
    let elsewhere = Ipv4Addr::new(10, 78, 0, 2);
    s.t.add_client_address(neighbour);
    s.t.add_client_network(elsewhere);
    let minted = s.mint(None);
    let token = minted["token"].as_str().expect("a token").to_owned();
    assert_eq!(minted["max_calls"], 3);
    assert_eq!(s.call(None, Some(&token)).status, 200);
    // A phone moving inside its carrier's /24 keeps working.
    assert_eq!(s.call(Some(neighbour), Some(&token)).status, 200);
    let a = s.call(Some(elsewhere), Some(&token));
    assert_eq!((a.status, problem(&a).as_str()), (403, "token-invalid"), "{}", a.raw);
    // The allowance: three calls, then exhausted.
    assert_eq!(s.call(None, Some(&token)).status, 200);
    let a = s.call(None, Some(&token));
    assert_eq!((a.status, problem(&a).as_str()), (403, "token-exhausted"), "{}", a.raw);
    assert_eq!(s.up.calls().len(), 3, "the API saw exactly the token's allowance");
    assert_eq!(s.spent(), 60_000);
}

#[test]
fn a_script_that_skips_a_required_challenge_gets_nothing_and_a_solution_mints_once() {
    if !privileged() {
        return;
    }
    let s = setup("pow = { mode = \"always\" }", "");
    let issued = s.mint(None);
    assert!(issued.get("token").is_none(), "minted without proof-of-work: {issued}");
    let challenge = issued["challenge"].clone();
    assert!(challenge["parameters"]["algorithm"].is_string(), "{issued}");
    // A made-up solution gets nothing.
    let forged = serde_json::json!({ "challenge": challenge, "solution": { "counter": 1, "derivedKey": "00" } });
    let a = s.request(None, "POST", "/.keyward/token", &[ORIGIN], &forged.to_string());
    assert_eq!((a.status, problem(&a).as_str()), (403, "challenge-invalid"), "{}", a.raw);
    assert!(s.call(None, None).status == 403);
    // A native solver (what a determined script runs) mints, once.
    let c: altcha::Challenge = serde_json::from_value(challenge.clone()).unwrap();
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let solution = keyward::token::pow::solve(&c, std::time::Duration::from_secs(60)).expect("solvable");
    let (cpu, wall) = (cpu_seconds() - cpu0, t0.elapsed());
    eprintln!("native solve at the default difficulty: {cpu:.3} CPU s ({wall:?} wall) per minted token");
    let body = serde_json::json!({ "challenge": challenge, "solution": solution }).to_string();
    let a = s.request(None, "POST", "/.keyward/token", &[ORIGIN], &body);
    assert_eq!(a.status, 200, "{}", a.raw);
    let token = a.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(s.call(None, Some(&token)).status, 200);
    let again = s.request(None, "POST", "/.keyward/token", &[ORIGIN], &body);
    assert_eq!((again.status, problem(&again).as_str()), (403, "challenge-spent"), "{}", again.raw);
    assert_eq!(s.up.calls().len(), 1);
}

/// This process's user + system CPU time.
fn cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

#[test]
fn token_allowances_survive_a_restart() {
    if !privileged() {
        return;
    }
    let mut s = setup("", "max_calls = 3");
    let token = s.mint(None)["token"].as_str().unwrap().to_owned();
    assert_eq!(s.call(None, Some(&token)).status, 200);
    assert_eq!(s.call(None, Some(&token)).status, 200);
    assert!(s.d.stop().success());
    s.d.spawn();
    assert_eq!(s.call(None, Some(&token)).status, 200, "the token's key is shared across restarts");
    let a = s.call(None, Some(&token));
    assert_eq!((a.status, problem(&a).as_str()), (403, "token-exhausted"), "a restart gave the token its calls back");
    assert_eq!(s.up.calls().len(), 3);
}
