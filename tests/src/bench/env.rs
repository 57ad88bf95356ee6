//! The machine's facts, recorded with every result: kernel, CPU model,
//! mitigations, clock source, core count.

use serde_json::{Value, json};

fn read(p: &str) -> String {
    std::fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

/// The facts as JSON.
pub fn facts() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    json!({
        "kernel": kernel,
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "spectre_v2": read("/sys/devices/system/cpu/vulnerabilities/spectre_v2"),
        "clocksource": read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        "keyward": env!("CARGO_PKG_VERSION"),
    })
}
