//! Idempotent install of the BPF build toolchain on Debian 12 (README,
//! Building): Debian's rustc 1.96 (and its clippy) with a prebuilt
//! `core` for `bpfel-unknown-none` (no rust-src needed), bpf-linker 0.13.0
//! built against LLVM 22, and that toolchain linked into rustup as
//! `debian-bpf`. Each step checks first, so a second run takes a second.
//! Also Debian's Chromium, for the real-browser tests of the page script, and
//! Debian's redis-server, which the shared-store tests start on loopback.
//! Fails with one sentence where it cannot proceed.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// `rust-web-clippy` is the clippy of that rustc, for `cargo xtask lint` on
/// the eBPF crates; `redis-server` serves the shared-store tests.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-clippy",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "iproute2",
    "util-linux",
    "redis-server",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The rustup name of the toolchain that builds (and lints) the eBPF crates.
pub const TOOLCHAIN: &str = "debian-bpf";

pub fn run() -> anyhow::Result<()> {
    check_platform()?;
    packages()?;
    bpf_linker()?;
    toolchain_link()?;
    bpffs();
    browser()?;
    eprintln!("==> setup: BPF toolchain ready");
    Ok(())
}

fn check_platform() -> anyhow::Result<()> {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    if field("ID") != "debian" || field("VERSION_ID") != "12" {
        bail!(
            "cargo xtask setup supports Debian 12 (bookworm) only; on {} {} install rustc with a BPF `core`, bpf-linker {BPF_LINKER_VERSION} for your LLVM, and link the toolchain as `{TOOLCHAIN}` by hand (see README, Building)",
            field("ID"),
            field("VERSION_ID")
        );
    }
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!("cargo xtask setup needs rustup on PATH (the user-space crates build with the rustup toolchain)");
    }
    Ok(())
}

/// The benchmark's peers, from Debian's packages.
pub fn bench_peers() -> anyhow::Result<()> {
    const PEERS: &[&str] = &["nftables", "iptables", "nginx-light", "haproxy", "wrk", "ethtool"];
    profiler();
    let missing: Vec<&str> = PEERS.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("cargo xtask bench must run as root to install {}", missing.join(" "));
    }
    eprintln!("==> setup: apt-get install {}", missing.join(" "));
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

/// `perf` (Debian's `linux-perf`) for the profiles: installed when missing,
/// and when it cannot be, the benchmark goes on without profiles and says so.
fn profiler() {
    if installed("linux-perf") {
        return;
    }
    let why = if !is_root() {
        "not root".to_owned()
    } else {
        eprintln!("==> setup: apt-get install linux-perf (for the profiles)");
        match apt(&["install", "-y", "-q", "--no-install-recommends", "linux-perf"]) {
            Ok(()) => return,
            Err(e) => e.to_string(),
        }
    };
    eprintln!("==> setup: linux-perf could not be installed ({why}); the benchmark runs without profiles");
}

/// Run apt-get non-interactively; an error names the command.
fn apt(args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !st.success() {
        bail!("apt-get {} failed ({st})", args.join(" "));
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    let bpf_core = Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib");
    if missing.is_empty() && bpf_core.exists() {
        return Ok(());
    }
    if !is_root() {
        bail!("cargo xtask setup must run as root to install {} with apt-get", missing.join(" "));
    }
    eprintln!("==> setup: apt-get install {}", missing.join(" "));
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(PACKAGES);
    apt(&args)?;
    if !bpf_core.exists() {
        bail!(
            "libstd-rust-web-dev-bpf installed no BPF `core` at {}; this setup needs the bookworm-security rustc-web 1.96 packages",
            bpf_core.display()
        );
    }
    Ok(())
}

/// Debian's Chromium (and a font for screenshots), for the real-browser tests
/// of the page script (tests/src/browser.rs).
fn browser() -> anyhow::Result<()> {
    const BROWSER: &[&str] = &["chromium", "fonts-dejavu-core"];
    let missing: Vec<&str> = BROWSER.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the browser tests need {}: run cargo xtask setup as root, or `apt-get install {}` yourself",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("==> setup: apt-get install {} (the browser tests drive headless Chromium)", missing.join(" "));
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args).map_err(|e| anyhow::anyhow!("{e}; the browser tests cannot run without Debian's chromium"))
}

fn bpf_linker() -> anyhow::Result<()> {
    let current = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if current == format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Ok(());
    }
    eprintln!("==> setup: cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22, about a minute)");
    let st = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("running cargo install")?;
    if !st.success() {
        bail!("building bpf-linker {BPF_LINKER_VERSION} against /usr/lib/llvm-22 failed ({st})");
    }
    Ok(())
}

fn toolchain_link() -> anyhow::Result<()> {
    let list = Command::new("rustup").args(["toolchain", "list"]).output().context("running rustup")?;
    if String::from_utf8_lossy(&list.stdout).lines().any(|l| l.split_whitespace().next() == Some(TOOLCHAIN)) {
        return Ok(());
    }
    eprintln!("==> setup: rustup toolchain link {TOOLCHAIN} /usr");
    let st =
        Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]).status().context("running rustup")?;
    if !st.success() {
        bail!("rustup toolchain link {TOOLCHAIN} /usr failed ({st})");
    }
    Ok(())
}

/// Mount bpffs where the daemon pins its maps. The daemon mounts it too when
/// missing; doing it here makes `bpftool` work right after setup.
fn bpffs() {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
    if !mounted && is_root() {
        let _ = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status();
    }
}
