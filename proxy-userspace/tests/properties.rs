//! Property-based fuzzing (proptest) of what hostile input reaches first:
//! the config parser, route matching with re-encoding, the client-address
//! and Origin parsers, and the key scrubber, differentially against
//! independent decoders. Bounded in time so it runs in every `cargo test`
//! (a few hundred cases per target, about a second each); `cargo xtask
//! fuzz` runs the same targets with many more cases
//! (`KEYWARD_FUZZ_CASES`). Property-based rather than coverage-guided:
//! cargo-fuzz needs a nightly toolchain this project does not use, and
//! these targets are pure functions whose interesting inputs a generator
//! can describe.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use keyward::{
    config::{ForwardedHeader, Route as RouteCfg},
    proxy::{
        access::{self, OriginCheck, Origins},
        policy::Loaded,
        route::Route,
        scrub::Scrubber,
    },
    units::Cidr,
};
use proptest::prelude::*;

/// Cases per target: a few hundred in `cargo test`, more when asked.
fn cases() -> ProptestConfig {
    let n = std::env::var("KEYWARD_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

// ---- The config parser ----

const CONFIG: &str = r#"[xdp]
interface = "lo"
ports = [8080]
rate_pps = 100
burst = 100

[listen]
addr = "127.0.0.1:0"
max_body = "1KiB"

[upstream]
base_url = "http://127.0.0.1:9/v1"
key_env = "KEYWARD_FUZZ_KEY"
inject = { query = "api_key" }

[[route]]
method = "GET"
path = "/lookup/{postcode}"
upstream_path = "/postcodes/{postcode}"
params = { postcode = "[A-Z0-9]{2,8}" }
cost = 0.02

[access]
allowed_origins = ["https://shop.example"]

[limits]
per_ip_rate = 1
per_ip_burst = 3
per_ip_daily = 4
daily = 0.20
"#;

/// An edit of the valid config: a byte replaced, a line dropped or doubled,
/// or junk inserted.
#[derive(Debug, Clone)]
enum Edit {
    Byte(usize, u8),
    Drop(usize),
    Double(usize),
    Insert(usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
        any::<usize>().prop_map(Edit::Drop),
        any::<usize>().prop_map(Edit::Double),
        (any::<usize>(), "[ -~\n]{0,20}").prop_map(|(i, s)| Edit::Insert(i, s)),
    ]
}

fn apply(text: &str, e: &Edit) -> String {
    let lines: Vec<&str> = text.lines().collect();
    match e {
        Edit::Byte(i, b) => {
            let mut v = text.as_bytes().to_vec();
            let i = i % v.len();
            v[i] = *b;
            String::from_utf8_lossy(&v).into_owned()
        }
        Edit::Drop(i) => {
            let i = i % lines.len();
            lines.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, l)| format!("{l}\n")).collect()
        }
        Edit::Double(i) => {
            let i = i % lines.len();
            lines
                .iter()
                .enumerate()
                .flat_map(|(j, l)| std::iter::repeat_n(format!("{l}\n"), 1 + usize::from(j == i)))
                .collect()
        }
        Edit::Insert(i, s) => {
            let mut t = text.to_owned();
            let mut at = i % t.len();
            while !t.is_char_boundary(at) {
                at -= 1;
            }
            t.insert_str(at, s);
            t
        }
    }
}

proptest! {
    #![proptest_config(cases())]

    /// Any edit of a valid config is accepted or refused with its position
    /// (`file:line:col`, inside the file); never a panic.
    #[test]
    fn config_edits_are_refused_with_a_position(edits in prop::collection::vec(edit(), 1..4)) {
        let mut text = CONFIG.to_owned();
        for e in &edits {
            text = apply(&text, e);
        }
        if let Err(e) = Loaded::parse(std::path::Path::new("k.toml"), &text) {
            let msg = e.to_string();
            // Only a missing table is about no place in the file.
            if msg.contains("is required when") || msg.contains("no [[route]]") {
                return Ok(());
            }
            let rest = msg.strip_prefix("k.toml:");
            prop_assert!(rest.is_some(), "no file in {msg:?}");
            let mut nums = rest.unwrap_or_default().splitn(3, ':');
            let line: usize = nums.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let col: usize = nums.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            prop_assert!(line >= 1 && line <= text.lines().count() + 1 && col >= 1, "bad position in {msg:?}");
        }
    }
}

// ---- Routes: no output path escapes the template ----

fn route() -> Route {
    let cfg: RouteCfg = toml::from_str(
        r#"method = "GET"
path = "/a/{x}/b"
upstream_path = "/v/{x}/w"
params = { x = "(?s).*" }
query = ["q"]
"#,
    )
    .expect("route");
    Route::compile(&cfg).expect("compiles")
}

/// Path segments an attacker would try: dots, encoded slashes and dots,
/// backslashes, query and fragment characters, control characters,
/// double encoding, non-ASCII.
fn hostile_segment() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("%2F".to_owned()),
            Just("%2f".to_owned()),
            Just("%2E".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%252F".to_owned()),
            Just("%5C".to_owned()),
            Just("\\".to_owned()),
            Just("%3F".to_owned()),
            Just("%23".to_owned()),
            Just("%00".to_owned()),
            Just("%0D%0A".to_owned()),
            Just("%C3%A9".to_owned()),
            Just("%FF".to_owned()),
            Just("@".to_owned()),
            Just(":".to_owned()),
            "[a-zA-Z0-9_~-]{1,4}",
        ],
        1..8,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(cases())]

    /// Whatever the segment, a mapped call keeps the template's shape: the
    /// same segments, the literals in place, and a value that decodes back
    /// to what the client sent and adds no segment, query or fragment.
    #[test]
    fn mapped_paths_never_escape_the_template(seg in hostile_segment(), q in "[ -~]{0,30}") {
        let r = route();
        let query = format!("q={q}&api_key=stolen");
        if let Ok(m) = r.map(&["a", &seg, "b"], Some(&query), Some("api_key")) {
            let parts: Vec<&str> = m.path.split('/').collect();
            prop_assert_eq!(parts.len(), 4, "{}", m.path);
            prop_assert_eq!((parts[0], parts[1], parts[3]), ("", "v", "w"));
            let value = parts[2];
            prop_assert!(!value.contains(['?', '#', '\\']), "{}", m.path);
            let decoded = percent_encoding::percent_decode_str(value).decode_utf8().expect("utf-8");
            let sent = percent_encoding::percent_decode_str(&seg).decode_utf8().expect("utf-8");
            prop_assert_eq!(decoded.as_ref(), sent.as_ref());
            prop_assert!(sent != "." && sent != "..");
            // And the whole URL keeps the base's authority and prefix.
            let uri: http::Uri = format!("http://api.example{}", m.path).parse().expect("a URI");
            prop_assert_eq!(uri.host(), Some("api.example"));
            prop_assert!(uri.path().starts_with("/v/") && uri.query().is_none());
            prop_assert!(m.query.iter().all(|(k, _)| k == "q"), "{:?}", m.query);
        }
    }
}

// ---- Client address and Origin ----

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
        Just("10.0.0.7".parse().expect("ip")),
    ]
}

/// A forwarded-for header value: addresses in their written forms, mixed
/// with junk.
fn hops() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            ip().prop_map(|a| a.to_string()),
            ip().prop_map(|a| match a {
                IpAddr::V6(v) => format!("\"[{v}]:4711\""),
                IpAddr::V4(v) => format!("{v}:80"),
            }),
            "[ -~]{0,12}",
        ],
        0..5,
    )
    .prop_map(|v| v.join(", "))
}

/// Every address written in `s`, in any of the node forms, as the
/// canonical address (IPv4-mapped IPv6 as IPv4): an independent reading.
fn written_addrs(s: &str) -> Vec<IpAddr> {
    s.split([',', ';', ' ', '=', '"'])
        .filter_map(|t| {
            let t = t.trim();
            let inner = t.strip_prefix('[').and_then(|r| r.split(']').next());
            let host = inner.or_else(|| t.rsplit_once(':').map(|(h, _)| h).filter(|h| h.parse::<IpAddr>().is_ok()));
            t.parse::<IpAddr>().ok().or_else(|| host.and_then(|h| h.parse().ok()))
        })
        .map(|a| match a {
            IpAddr::V6(v) => v.to_ipv4_mapped().map_or(a, IpAddr::V4),
            v4 => v4,
        })
        .collect()
}

proptest! {
    #![proptest_config(cases())]

    /// The client is the peer unless the peer is trusted; then it is an
    /// address written in the configured header, never anything else.
    #[test]
    fn the_client_is_the_peer_or_a_written_hop(peer in ip(), xff in hops(), fwd in hops(), use_fwd in any::<bool>()) {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
        let fwd_value = fwd.split(", ").map(|p| format!("for={p}")).collect::<Vec<_>>().join(", ");
        if let Ok(v) = HeaderValue::from_str(&fwd_value) {
            h.insert("forwarded", v);
        }
        let from = if use_fwd { ForwardedHeader::Forwarded } else { ForwardedHeader::XForwardedFor };
        let client = access::client_ip(peer, &h, &trusted, from);
        let canonical = access::canonical(peer);
        if !trusted.iter().any(|c| c.contains(canonical)) {
            prop_assert_eq!(client, canonical);
        } else if client != canonical {
            let written = if use_fwd { &fwd } else { &xff };
            let seen = written_addrs(written);
            prop_assert!(seen.contains(&client), "{client} not in {written:?} ({seen:?})");
        }
    }

    /// Origins agree with an independent URL parser: allowed exactly when
    /// the host is listed (`https://www.example.com` with any port, or
    /// `example.org` and its subdomains); more than one Origin never is.
    #[test]
    fn origins_agree_with_a_url_parser(
        scheme in prop_oneof![Just("https"), Just("http"), Just("javascript")],
        host in "[a-z.@:\\[\\]0-9-]{0,12}(www\\.example\\.com|example\\.org|evil\\.net)?[a-z.@:/?#0-9-]{0,12}",
        second in prop::option::of("[ -~]{1,20}"),
    ) {
        let o = Origins::new(&["https://www.example.com".into(), "example.org".into()], true);
        let origin = format!("{scheme}://{host}");
        let Ok(v) = HeaderValue::from_str(&origin) else { return Ok(()) };
        let mut h = HeaderMap::new();
        h.insert(http::header::ORIGIN, v);
        let verdict = o.check(&h);
        if let Ok(uri) = origin.parse::<http::Uri>() {
            let uh = uri.host().unwrap_or_default().to_ascii_lowercase();
            let clean = !origin.contains([' ', ',', '\t']) && uri.authority().is_some_and(|a| !a.as_str().contains('@'));
            let expect = clean
                && ((scheme == "https" && uh == "www.example.com")
                    || uh == "example.org"
                    || uh.ends_with(".example.org"));
            if matches!(verdict, OriginCheck::Allowed(_)) {
                prop_assert!(expect, "{origin:?} allowed; host {uh:?}");
            }
        }
        if let Some(s) = second.and_then(|s| HeaderValue::from_str(&s).ok()) {
            h.append(http::header::ORIGIN, s);
            prop_assert_eq!(o.check(&h), OriginCheck::Refused);
        }
    }
}

// ---- The key scrubber, differentially ----

/// One way an echo may carry a byte of the key.
fn encode_byte(b: u8, how: u8) -> String {
    match how % 8 {
        0 => (b as char).to_string(),
        1 => (b as char).to_ascii_uppercase().to_string(),
        2 => format!("%{b:02X}"),
        3 => format!("%{b:02x}"),
        4 => format!("%25{b:02X}"),
        5 => format!("\\u{b:04x}"),
        6 => format!("&#{b};"),
        _ => format!("&#x{b:X};"),
    }
}

/// The key in a listed form: byte by byte in any mix of the text forms, or
/// base64 of it (standard or URL-safe, padded or not, behind 0-2 bytes).
fn encoded(key: &str, hows: &[u8], b64: Option<(bool, bool, usize)>) -> String {
    use base64::Engine as _;
    match b64 {
        Some((url, pad, lead)) => {
            let data = format!("{}{key}", &"ab"[..lead]);
            match (url, pad) {
                (false, true) => base64::engine::general_purpose::STANDARD.encode(data),
                (false, false) => base64::engine::general_purpose::STANDARD_NO_PAD.encode(data),
                (true, true) => base64::engine::general_purpose::URL_SAFE.encode(data),
                (true, false) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data),
            }
        }
        None => key.bytes().zip(hows.iter().cycle()).map(|(b, h)| encode_byte(b, *h)).collect(),
    }
}

/// Undo every listed text encoding (percent, twice; JSON `\u` and `\/`;
/// HTML character references), case-folded: an independent decoder.
fn normalize(s: &str) -> String {
    let mut t = s.to_owned();
    for _ in 0..2 {
        t = percent_encoding::percent_decode_str(&t).decode_utf8_lossy().into_owned();
    }
    let mut out = String::new();
    let mut rest = t.as_str();
    while let Some(c) = rest.chars().next() {
        let (decoded, used) = if let Some(h) = rest.strip_prefix("\\u").and_then(|r| r.get(..4)) {
            (u32::from_str_radix(h, 16).ok().and_then(char::from_u32), 6)
        } else if rest.starts_with("\\/") {
            (Some('/'), 2)
        } else if let Some(r) = rest.strip_prefix("&#") {
            let end = r.find(';').filter(|e| *e <= 8);
            let v = end.and_then(|e| {
                let d = &r[..e];
                match d.strip_prefix(['x', 'X']) {
                    Some(x) => u32::from_str_radix(x, 16).ok(),
                    None => d.parse().ok(),
                }
            });
            (v.and_then(char::from_u32), end.map_or(0, |e| e + 3))
        } else {
            (None, 0)
        };
        match decoded {
            Some(d) => {
                out.push(d);
                rest = &rest[used..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out.to_ascii_lowercase()
}

/// Whether any base64 run in `s`, read at any offset, decodes to text
/// holding `key`.
fn base64_holds(s: &str, key: &str) -> bool {
    use base64::Engine as _;
    let cfg = base64::engine::GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let engines = [
        base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, cfg),
        base64::engine::GeneralPurpose::new(&base64::alphabet::URL_SAFE, cfg),
    ];
    s.split(|c: char| !(c.is_ascii_alphanumeric() || "+/_-=".contains(c))).any(|tok| {
        let tok = tok.trim_end_matches('=');
        (0..4).any(|off| {
            let t = tok.get(off..).unwrap_or_default();
            let t = t.get(..t.len() - t.len() % 4).unwrap_or_default();
            engines.iter().any(|e| e.decode(t).is_ok_and(|b| String::from_utf8_lossy(&b).contains(key)))
        })
    })
}

proptest! {
    #![proptest_config(cases())]

    /// Whatever listed form the key is echoed in, among any text, the
    /// scrubbed output holds none of them (read by independent decoders),
    /// and text without the key is left alone.
    #[test]
    fn scrubbed_output_holds_no_listed_form_of_the_key(
        key in "[A-Za-z0-9_+/=.-]{8,40}",
        before in "[ -~]{0,40}",
        after in "[ -~]{0,40}",
        hows in prop::collection::vec(any::<u8>(), 1..8),
        b64 in prop::option::of((any::<bool>(), any::<bool>(), 0usize..3)),
    ) {
        let s = Scrubber::new(&key);
        let echo = format!("{before}{}{after}", encoded(&key, &hows, b64));
        let out = s.scrub(echo.as_bytes()).map(|o| String::from_utf8_lossy(&o).into_owned());
        prop_assert!(out.is_some(), "nothing scrubbed in {echo:?}");
        let out = out.unwrap_or_default();
        prop_assert!(!normalize(&out).contains(&key.to_ascii_lowercase()), "{echo:?} -> {out:?}");
        prop_assert!(!base64_holds(&out, &key), "{echo:?} -> {out:?}");
        // Text that never held the key is not touched.
        if !normalize(&before).contains(&key.to_ascii_lowercase()) && !base64_holds(&before, &key) {
            let plain = s.scrub(before.as_bytes());
            prop_assert!(plain.is_none() || before.len() >= 6, "{before:?} changed");
        }
    }

    /// Headers: the key split over values of one name, or in a name, never
    /// survives.
    #[test]
    fn scrubbed_headers_hold_no_key(key in "[A-Za-z0-9_-]{8,30}", cut in 1usize..7, other in "[a-z]{1,8}") {
        let s = Scrubber::new(&key);
        let mut h = HeaderMap::new();
        let (a, b) = key.split_at(cut.min(key.len() - 1));
        h.append("x-echo", HeaderValue::from_str(a).expect("value"));
        h.append("x-echo", HeaderValue::from_str(b).expect("value"));
        h.append(HeaderName::from_bytes(format!("x-{}", key.to_ascii_lowercase()).as_bytes()).expect("name"), HeaderValue::from_static("1"));
        h.append(HeaderName::from_bytes(format!("x-{other}").as_bytes()).expect("name"), HeaderValue::from_static("fine"));
        s.headers(&mut h);
        let lower = key.to_ascii_lowercase();
        for name in h.keys() {
            prop_assert!(!name.as_str().contains(&lower), "{name}");
            let joined: String = h.get_all(name).iter().map(|v| v.to_str().unwrap_or_default()).collect();
            prop_assert!(!joined.to_ascii_lowercase().contains(&lower), "{name}: {joined}");
        }
        prop_assert_eq!(h.get(format!("x-{other}")).map(|v| v.as_bytes()), Some(&b"fine"[..]));
    }
}
