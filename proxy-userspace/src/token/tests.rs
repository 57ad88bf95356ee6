//! Tokens and challenges end to end on a fake clock: round trips, every
//! tamper, expiry, binding boundaries, allowance, min_age, rotation; replay
//! and a concurrent double spend of one solution.

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{
    codec::{Level, Nonce},
    config::{PowAlgorithm, PowConfig, PowMode, TokenConfig},
    keys::{KeyRing, tests::ring},
    pow::{MemorySpent, Pow, PowError, Submission, solve},
    *,
};
use crate::{clock::fake::FakeClock, units::Span};

const ORIGIN: &str = "https://shop.example";
const T0: u64 = 1_767_225_600;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn clock() -> Arc<FakeClock> {
    let c = FakeClock::default();
    c.unix.store(T0, Ordering::SeqCst);
    Arc::new(c)
}

fn tokens_with(keys: KeyRing, cfg: TokenConfig, c: &Arc<FakeClock>) -> Tokens {
    Tokens::new(&cfg, Arc::new(keys), Arc::new(Allowance::new()), c.clone())
}

fn tokens(c: &Arc<FakeClock>) -> Tokens {
    tokens_with(ring(&["k1"]), TokenConfig::default(), c)
}

#[test]
fn round_trip() {
    let c = clock();
    let t = tokens(&c);
    let m = t.mint(ORIGIN, ip("192.0.2.10"), Level::Plain, None);
    assert!(m.token.starts_with("kw1.k1."), "{}", m.token);
    assert!(m.token.len() < 100, "{}", m.token);
    assert_eq!((m.expires_in, m.max_calls, m.min_age, m.level), (600, 20, 0, Level::Plain));
    let claims = t.verify(&m.token, ORIGIN, ip("192.0.2.10")).unwrap();
    assert_eq!((claims.issued_at, claims.expires_at, claims.max_calls), (T0, T0 + 600, 20));
    let a = t.check(Some(&m.token), ORIGIN, ip("192.0.2.10")).unwrap();
    assert_eq!((a.remaining, a.level, a.nonce), (19, Level::Plain, claims.nonce));
    let p = t.mint(ORIGIN, ip("192.0.2.10"), Level::Pow, Some(300));
    let a = t.check(Some(&p.token), ORIGIN, ip("192.0.2.10")).unwrap();
    assert_eq!((a.level, a.max_calls, a.remaining), (Level::Pow, 300, 299));
    assert_ne!(a.nonce, claims.nonce, "each token has its own nonce");
    // The JSON the endpoint sends.
    let j = serde_json::to_value(Issue::Token(m.clone())).unwrap();
    assert_eq!(j["level"], "plain");
    assert_eq!(j["expires_in"], 600);
    assert!(j.get("verified").is_none());
    let j = serde_json::to_value(Issue::solved(m.clone())).unwrap();
    assert_eq!((&j["token"], &j["payload"], &j["verified"]), (&m.token.clone().into(), &m.token.into(), &true.into()));
}

#[test]
fn missing_and_malformed() {
    let c = clock();
    let t = tokens(&c);
    let who = ip("192.0.2.10");
    assert_eq!(t.check(None, ORIGIN, who), Err(TokenError::Missing));
    assert_eq!(t.check(Some(""), ORIGIN, who), Err(TokenError::Missing));
    assert_eq!(TokenError::Missing.problem_type(), "token-required");
    for bad in ["kw1", "kw1.k1.AAAA", "kw2.k1.AAAA.AAAA", "kw1.k1.!!!!.AAAA", "kw1.k1.AAAA.AAAA", "a.b.c.d.e"] {
        let e = t.check(Some(bad), ORIGIN, who).unwrap_err();
        assert_eq!(e.problem_type(), "token-invalid", "{bad}: {e:?}");
    }
}

/// The parts of a token: kid, payload bytes, tag bytes.
fn split(tok: &str) -> (String, Vec<u8>, Vec<u8>) {
    let p: Vec<&str> = tok.split('.').collect();
    (p[1].to_owned(), URL_SAFE_NO_PAD.decode(p[2]).unwrap(), URL_SAFE_NO_PAD.decode(p[3]).unwrap())
}

fn join(kid: &str, payload: &[u8], tag: &[u8]) -> String {
    format!("kw1.{kid}.{}.{}", URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(tag))
}

#[test]
fn every_tamper_is_refused() {
    let c = clock();
    let t = tokens_with(ring(&["k1", "k2"]), TokenConfig::default(), &c);
    let who = ip("192.0.2.10");
    let tok = t.mint(ORIGIN, who, Level::Plain, None).token;
    let (kid, payload, tag) = split(&tok);
    // Every bit of the payload: issued-at, expiry, nonce, max_calls, level,
    // origin hash, network hint.
    for byte in 0..payload.len() {
        for bit in 0..8 {
            let mut p = payload.clone();
            p[byte] ^= 1 << bit;
            let e = t.verify(&join(&kid, &p, &tag), ORIGIN, who).unwrap_err();
            assert_eq!(e.problem_type(), "token-invalid", "byte {byte} bit {bit}: {e:?}");
        }
    }
    // Every bit of the MAC.
    for byte in 0..tag.len() {
        for bit in 0..8 {
            let mut g = tag.clone();
            g[byte] ^= 1 << bit;
            assert_eq!(t.verify(&join(&kid, &payload, &g), ORIGIN, who), Err(TokenError::BadMac));
        }
    }
    // The key id: another listed key, or one not listed.
    // (The network hint is keyed, so under another key it reads as a
    // network mismatch; refused as token-invalid either way.)
    let e = t.verify(&join("k2", &payload, &tag), ORIGIN, who).unwrap_err();
    assert_eq!(e.problem_type(), "token-invalid", "{e:?}");
    assert_eq!(t.verify(&join("k9", &payload, &tag), ORIGIN, who), Err(TokenError::UnknownKey));
    // A longer allowance, re-signed by nobody: refused.
    let mut more = payload.clone();
    more[20..24].copy_from_slice(&1000u32.to_be_bytes());
    assert_eq!(t.verify(&join(&kid, &more, &tag), ORIGIN, who), Err(TokenError::BadMac));
    assert!(t.verify(&tok, ORIGIN, who).is_ok(), "the untouched token still verifies");
}

#[test]
fn expiry_on_the_fake_clock() {
    let c = clock();
    let t = tokens(&c);
    let who = ip("192.0.2.10");
    let tok = t.mint(ORIGIN, who, Level::Plain, None).token;
    c.advance_secs(600);
    assert!(t.check(Some(&tok), ORIGIN, who).is_ok(), "valid through its last second");
    c.advance_secs(1);
    let e = t.check(Some(&tok), ORIGIN, who).unwrap_err();
    assert_eq!((e, e.problem_type()), (TokenError::Expired, "token-expired"));
    // Minted by a host whose clock runs far ahead: refused.
    let ahead = clock();
    ahead.advance_secs(3600);
    let future = tokens(&ahead).mint(ORIGIN, who, Level::Plain, None).token;
    assert_eq!(tokens(&clock()).verify(&future, ORIGIN, who), Err(TokenError::Malformed("issued in the future")));
}

#[test]
fn wrong_origin() {
    let c = clock();
    let t = tokens(&c);
    let who = ip("192.0.2.10");
    let tok = t.mint(ORIGIN, who, Level::Plain, None).token;
    for other in ["https://evil.example", "http://shop.example", "https://shop.example:8443", ""] {
        assert_eq!(t.verify(&tok, other, who), Err(TokenError::WrongOrigin), "{other}");
    }
}

#[test]
fn ipv4_network_boundaries() {
    let c = clock();
    let t = tokens(&c);
    let tok = t.mint(ORIGIN, ip("192.0.2.77"), Level::Plain, None).token;
    for same in ["192.0.2.0", "192.0.2.255", "::ffff:192.0.2.1"] {
        assert!(t.verify(&tok, ORIGIN, ip(same)).is_ok(), "{same} is in the /24");
    }
    for other in ["192.0.3.0", "192.0.1.255", "10.0.2.77", "2001:db8::1"] {
        assert_eq!(t.verify(&tok, ORIGIN, ip(other)), Err(TokenError::WrongNetwork), "{other}");
    }
    // A /32 binding is exact.
    let cfg = TokenConfig { bind_ipv4_prefix: crate::config::PrefixV4(32), ..TokenConfig::default() };
    let t = tokens_with(ring(&["k1"]), cfg, &c);
    let tok = t.mint(ORIGIN, ip("192.0.2.77"), Level::Plain, None).token;
    assert!(t.verify(&tok, ORIGIN, ip("192.0.2.77")).is_ok());
    assert_eq!(t.verify(&tok, ORIGIN, ip("192.0.2.78")), Err(TokenError::WrongNetwork));
}

#[test]
fn ipv6_network_boundaries() {
    let c = clock();
    let t = tokens(&c);
    let tok = t.mint(ORIGIN, ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), Level::Plain, None).token;
    for same in ["2001:db8:1:2::", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::1"] {
        assert!(t.verify(&tok, ORIGIN, ip(same)).is_ok(), "{same} is in the /64");
    }
    for other in ["2001:db8:1:3::", "2001:db8:1:1:ffff:ffff:ffff:ffff", "192.0.2.1"] {
        assert_eq!(t.verify(&tok, ORIGIN, ip(other)), Err(TokenError::WrongNetwork), "{other}");
    }
}

#[test]
fn allowance_exhaustion_and_refund() {
    let c = clock();
    let cfg = TokenConfig { max_calls: std::num::NonZeroU32::new(3).unwrap(), ..TokenConfig::default() };
    let t = tokens_with(ring(&["k1"]), cfg, &c);
    let who = ip("192.0.2.10");
    let tok = t.mint(ORIGIN, who, Level::Plain, None).token;
    let remaining: Vec<u32> = (0..3).map(|_| t.check(Some(&tok), ORIGIN, who).unwrap().remaining).collect();
    assert_eq!(remaining, [2, 1, 0]);
    let e = t.check(Some(&tok), ORIGIN, who).unwrap_err();
    assert_eq!((e, e.problem_type()), (TokenError::Exhausted, "token-exhausted"));
    // A refused check takes nothing; a refund gives one call back.
    let claims = t.verify(&tok, ORIGIN, who).unwrap();
    assert_eq!(t.allowance().used(claims.nonce), 3);
    let last = Admitted {
        nonce: claims.nonce,
        level: claims.level,
        max_calls: 3,
        remaining: 0,
        expires_at: claims.expires_at,
    };
    t.refund(&last);
    assert_eq!(t.check(Some(&tok), ORIGIN, who).unwrap().remaining, 0);
    // Refusals for other reasons do not touch the allowance.
    let fresh = t.mint(ORIGIN, who, Level::Plain, None).token;
    assert!(t.check(Some(&fresh), "https://evil.example", who).is_err());
    assert_eq!(t.allowance().used(t.verify(&fresh, ORIGIN, who).unwrap().nonce), 0);
}

#[test]
fn min_age() {
    let c = clock();
    let cfg = TokenConfig { min_age: Span(Duration::from_secs(3)), ..TokenConfig::default() };
    let t = tokens_with(ring(&["k1"]), cfg, &c);
    let who = ip("192.0.2.10");
    let m = t.mint(ORIGIN, who, Level::Plain, None);
    assert_eq!(m.min_age, 3);
    let e = t.check(Some(&m.token), ORIGIN, who).unwrap_err();
    assert_eq!(
        (e, e.problem_type(), e.retry_after()),
        (TokenError::TooNew { retry_after: 3 }, "token-invalid", Some(3))
    );
    c.advance_secs(2);
    assert_eq!(t.check(Some(&m.token), ORIGIN, who), Err(TokenError::TooNew { retry_after: 1 }));
    assert_eq!(t.allowance().len(), 0, "a too-new token takes no call");
    c.advance_secs(1);
    assert_eq!(t.check(Some(&m.token), ORIGIN, who).unwrap().remaining, 19);
}

#[test]
fn key_rotation() {
    let c = clock();
    let who = ip("192.0.2.10");
    let old = tokens_with(ring(&["k1"]), TokenConfig::default(), &c);
    let before = old.mint(ORIGIN, who, Level::Plain, None).token;
    // The new file lists the new key first and keeps the old one.
    let k1 = ring(&["k1"]).signing().clone();
    let k2 = keys::Key::new("k2", &[9; 32]).unwrap();
    let rotated = tokens_with(KeyRing::from_keys(vec![k2.clone(), k1]).unwrap(), TokenConfig::default(), &c);
    assert!(rotated.verify(&before, ORIGIN, who).is_ok(), "old tokens verify during the overlap");
    let after = rotated.mint(ORIGIN, who, Level::Plain, None).token;
    assert!(after.starts_with("kw1.k2."), "the first key signs");
    // Once the old key is dropped, its tokens are refused.
    let dropped = tokens_with(KeyRing::from_keys(vec![k2]).unwrap(), TokenConfig::default(), &c);
    assert_eq!(dropped.verify(&before, ORIGIN, who), Err(TokenError::UnknownKey));
    assert!(dropped.verify(&after, ORIGIN, who).is_ok());
    // A host with another key file shares nothing.
    let stranger = tokens_with(
        KeyRing::from_keys(vec![keys::Key::new("k2", &[5; 32]).unwrap()]).unwrap(),
        TokenConfig::default(),
        &c,
    );
    assert_eq!(stranger.verify(&after, ORIGIN, who).unwrap_err().problem_type(), "token-invalid");
}

#[test]
fn token_from_header_or_query() {
    let mut h = http::HeaderMap::new();
    assert_eq!(token_from_request(&h, Some("q=1")), None);
    assert_eq!(token_from_request(&h, Some("q=1&kw_token=kw1.a.b.c")).as_deref(), Some("kw1.a.b.c"));
    h.insert("Keyward-Token", "kw1.h.h.h".parse().unwrap());
    assert_eq!(token_from_request(&h, Some("kw_token=kw1.a.b.c")).as_deref(), Some("kw1.h.h.h"));
    assert!(script_integrity().starts_with("sha384-"));
    assert!(SCRIPT.contains("Keyward-Token"));
}

// ---- proof-of-work ----

fn pow_cfg() -> PowConfig {
    PowConfig {
        mode: PowMode::Always,
        algorithm: PowAlgorithm::Sha256,
        cost: std::num::NonZeroU32::new(2).unwrap(),
        counter: [20, 40],
        ..PowConfig::default()
    }
}

/// A fake clock at the real time: the `altcha` crate also checks expiry
/// against the system clock.
fn real_clock() -> Arc<FakeClock> {
    let c = FakeClock::default();
    c.unix.store(crate::clock::SystemClock.unix_secs(), Ordering::SeqCst);
    Arc::new(c)
}

fn pow(keys: KeyRing, c: &Arc<FakeClock>) -> Pow {
    Pow::new(Arc::new(keys), pow_cfg(), codec::Bind::default(), Arc::new(MemorySpent::new()), c.clone())
}

fn solved(p: &Pow, origin: &str, who: IpAddr) -> Submission {
    let challenge = p.challenge(origin, who).unwrap();
    let solution = solve(&challenge, Duration::from_secs(60)).unwrap();
    Submission { challenge, solution }
}

#[test]
fn challenge_verify_and_replay() {
    let c = real_clock();
    let p = pow(ring(&["k1"]), &c);
    let who = ip("192.0.2.10");
    let s = solved(&p, ORIGIN, who);
    let n = s.solution.counter;
    assert!((20..=40).contains(&n), "deterministic counter {n}");
    assert_eq!(s.challenge.parameters.algorithm, "SHA-256");
    assert!(p.redeem(&s, ORIGIN, who).is_ok());
    assert_eq!(p.redeem(&s, ORIGIN, who), Err(PowError::Spent), "single use");
    assert_eq!(PowError::Spent.problem_type(), "challenge-spent");
    // The widget's body form, and the plain one.
    let raw = serde_json::to_vec(&s).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
    let widget = format!("{{\"payload\":\"{b64}\",\"code\":null}}");
    assert_eq!(Submission::from_json(widget.as_bytes()).unwrap().solution.counter, n);
    assert_eq!(Submission::from_json(&raw).unwrap().solution.counter, n);
    assert_eq!(Submission::from_json(b"{\"payload\":\"@@\"}").unwrap_err(), PowError::Malformed);
    assert_eq!(Submission::from_json(b"[]").unwrap_err(), PowError::Malformed);
    // The challenge JSON is plain Altcha v2.
    let j = serde_json::to_value(Issue::Challenge { challenge: s.challenge.clone() }).unwrap();
    let params = &j["challenge"]["parameters"];
    for k in ["algorithm", "cost", "expiresAt", "keyLength", "keyPrefix", "keySignature", "nonce", "salt"] {
        assert!(!params[k].is_null(), "{k} in {j}");
    }
    assert_eq!(params["data"]["kid"], "k1");
}

#[test]
fn challenge_refusals() {
    let c = real_clock();
    let p = pow(ring(&["k1"]), &c);
    let who = ip("192.0.2.10");
    // A wrong solution.
    let mut s = solved(&p, ORIGIN, who);
    s.solution.counter += 1;
    s.solution.derived_key = "00".repeat(32);
    assert_eq!(p.redeem(&s, ORIGIN, who), Err(PowError::BadSolution));
    // A changed parameter (easier counter range) breaks the signature.
    let mut s = solved(&p, ORIGIN, who);
    s.challenge.parameters.cost = 1;
    assert_eq!(p.redeem(&s, ORIGIN, who), Err(PowError::BadSignature));
    // Another origin or network.
    let s = solved(&p, ORIGIN, who);
    assert_eq!(p.redeem(&s, "https://evil.example", who), Err(PowError::WrongBinding));
    assert_eq!(p.redeem(&s, ORIGIN, ip("192.0.3.10")), Err(PowError::WrongBinding));
    assert!(p.redeem(&s, ORIGIN, ip("192.0.2.200")).is_ok(), "same /24");
    // Issued by a host with another key file.
    let other = pow(KeyRing::from_keys(vec![keys::Key::new("k1", &[7; 32]).unwrap()]).unwrap(), &c);
    let s = solved(&other, ORIGIN, who);
    assert_eq!(p.redeem(&s, ORIGIN, who), Err(PowError::BadSignature));
    // Expiry on the fake clock.
    let s = solved(&p, ORIGIN, who);
    c.advance_secs(121);
    assert_eq!(p.redeem(&s, ORIGIN, who), Err(PowError::Expired));
}

#[test]
fn concurrent_double_spend_has_one_winner() {
    let c = real_clock();
    let p = Arc::new(pow(ring(&["k1"]), &c));
    let who = ip("192.0.2.10");
    for _round in 0..5 {
        let s = Arc::new(solved(&p, ORIGIN, who));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (p, s, b) = (p.clone(), s.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    p.redeem(&s, ORIGIN, who)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
        assert!(results.iter().filter(|r| r.is_err()).all(|r| *r == Err(PowError::Spent)));
    }
}

#[test]
fn rotation_keeps_challenges_valid() {
    let c = real_clock();
    let who = ip("192.0.2.10");
    let k1 = ring(&["k1"]).signing().clone();
    let s = solved(&pow(KeyRing::from_keys(vec![k1.clone()]).unwrap(), &c), ORIGIN, who);
    let k2 = keys::Key::new("k2", &[9; 32]).unwrap();
    let rotated = pow(KeyRing::from_keys(vec![k2, k1]).unwrap(), &c);
    assert!(rotated.redeem(&s, ORIGIN, who).is_ok());
}

#[test]
fn nonce_text_round_trip() {
    let n = Nonce([0xab; 12]);
    assert_eq!(n.to_string().parse::<Nonce>().unwrap(), n);
    assert!("short".parse::<Nonce>().is_err());
}
