//! The forwarder configuration the tests and the demo share: a stand-in
//! upstream with routes for every behaviour (`/postcodes`, a cached route,
//! an echoing route, one echoing the key in hostile encodings, a failing one,
//! a slow one, a POST), allowed origins,
//! and `[limits]` with test defaults that each caller overrides key by key.

use crate::{daemon::PORT, upstream::Upstream};

pub const ORIGIN: (&str, &str) = ("Origin", "https://www.example.com");
/// XDP must not get in the way of HTTP tests.
pub const XDP_OPEN: &str = "rate_pps = 100000\nburst = 100000";

pub fn config(up: &Upstream, limits: &str, extra: &str) -> String {
    let ca = up.ca_pem.as_ref().map(|_| String::from("ca_file = \"CA_FILE\"\n")).unwrap_or_default();
    format!(
        r#"[listen]
addr = "10.77.0.1:{PORT}"
max_body = "256B"
{extra}

[upstream]
base_url = "{base}"
timeout = "1s"
key_env = "KEYWARD_TEST_KEY"
inject = {{ query = "api_key" }}
client_ip_header = "IDPC-Source-IP"
{ca}
[[route]]
method = "GET"
path = "/postcodes/{{postcode}}"
upstream_path = "/postcodes/{{postcode}}"
params = {{ postcode = "^[A-Za-z0-9 ]{{2,10}}$" }}
query = ["filter"]
cost = 0.02

[[route]]
method = "GET"
path = "/cached/{{postcode}}"
upstream_path = "/postcodes/{{postcode}}"
cost = 0.02
cache_ttl = "1h"

[[route]]
method = "GET"
path = "/echo/{{x}}"
upstream_path = "/echo/{{x}}"
query = ["q"]
cost = 0.02

[[route]]
method = "GET"
path = "/hostile/{{x}}"
upstream_path = "/hostile/{{x}}"
cost = 0.02

[[route]]
method = "GET"
path = "/fail/{{x}}"
upstream_path = "/fail/{{x}}"
cost = 0.02

[[route]]
method = "GET"
path = "/slow/{{x}}"
upstream_path = "/slow/{{x}}"
cost = 0.02

[[route]]
method = "POST"
path = "/submit/{{x}}"
upstream_path = "/postcodes/{{x}}"
cost = 0.02

[access]
allowed_origins = ["https://www.example.com", "example.org"]
require_origin = true

[limits]
{limits}
"#,
        base = up.base_url(),
        limits = limits_with(limits),
    )
}

/// Test defaults for `[limits]`, overridden key by key by `over`.
pub fn limits_with(over: &str) -> String {
    let mut lines: Vec<String> = over.lines().map(str::to_owned).collect();
    for d in [
        "per_ip_rate = 1000",
        "per_ip_burst = 1000",
        "per_ip_daily = 1000",
        "daily = 100.00",
        "currency = \"GBP\"",
        "deny_on_daily_cap = false",
    ] {
        let key = d.split(' ').next().unwrap_or_default();
        if !over.lines().any(|l| l.split(' ').next() == Some(key)) {
            lines.push(d.to_owned());
        }
    }
    lines.join("\n")
}
