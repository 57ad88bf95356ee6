//! `cargo xtask`: what a plain `cargo` command cannot do by itself. `setup`
//! installs the BPF toolchain idempotently (README, Building, as code);
//! `lint`, `test` and `demo` run setup first, so the README's commands work
//! on a fresh machine.
//! `dist` builds the Debian package ([`deb`]); `test` builds one from the
//! debug binary for the package test.

mod deb;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs (Debian packages, bpf-linker for LLVM 22,
    /// the `debian-bpf` toolchain link) and mount bpffs. Quick when done.
    Setup,
    /// Setup, then check formatting (`cargo fmt --check`) and run clippy with
    /// `-D warnings` over every crate: the host crates with all their targets,
    /// the eBPF crates for the BPF target with the toolchain that builds them.
    Lint,
    /// Setup, build, then run every test: host unit tests, BPF_PROG_TEST_RUN
    /// tests and network-namespace end-to-end tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test-name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The property-based fuzz targets (config parser, route re-encoding,
    /// client address and Origin parsing, the key scrubber) and the
    /// packet-path differential fuzz (the XDP program under
    /// `BPF_PROG_TEST_RUN` against a reference; needs root) with many more
    /// cases than `cargo test` runs: about ten minutes each at the default.
    Fuzz {
        /// Cases per target.
        #[arg(long, default_value_t = 200_000)]
        cases: u32,
    },
    /// Setup, build the release binaries, then soak the real daemon in
    /// namespaces: visitors with page tokens and the hostile-input attacks
    /// at once for N minutes; reports memory, descriptors, threads and CPU
    /// per request each minute and flags growth. Writes
    /// `bench/results/<date>-soak.{json,md}`. A benchmark, not a test.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u32,
    },
    /// Setup, build, then play the demo: namespaces, the real daemon with XDP
    /// attached, legitimate traffic and floods, and a report.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then build the release binary: the Debian package in
    /// `target/debian/`, and for other distributions the binary with the
    /// example config, the unit, the man page and completions under `target/dist/`.
    Dist,
    /// Setup (plus the peers: nftables, iptables, nginx, wrk, ethtool), then
    /// measure keyward side by side with them; writes `bench/results/<date>.{json,md}`.
    Bench {
        /// About a minute instead of about ten.
        #[arg(long)]
        quick: bool,
        /// Only these tiers (1 program cost, 2 packet path, 3 HTTP, 4 memory).
        #[arg(long)]
        tier: Vec<u8>,
        /// With tier 3: profile each keyward path with perf (top frames,
        /// allocations per request) into `bench/results/<date>-profile.md`.
        #[arg(long)]
        profile: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Lint => {
            setup::run()?;
            lint()
        }
        Cmd::Test { args } => {
            setup::run()?;
            sweep_stale_namespaces();
            cargo(&["build", "--package", "keyward", "--bins"])?;
            // The package test installs this (from the debug binary).
            let package = deb::build(&workspace_root(), deb::Profile::Dev)?;
            let mut a = vec!["test", "--workspace"];
            for p in EBPF_CRATES {
                a.extend(["--exclude", p]);
            }
            a.extend(args.iter().map(String::as_str));
            cargo_env(&a, &[("KEYWARD_DEB", package.as_os_str())])
        }
        Cmd::Fuzz { cases } => {
            setup::run()?;
            fuzz(cases)
        }
        Cmd::Dist => {
            setup::run()?;
            cargo(&["build", "--release", "--package", "keyward", "--bins"])?;
            dist()
        }
        Cmd::Bench { quick, tier, profile } => {
            setup::run()?;
            setup::bench_peers()?;
            cargo(&["build", "--release", "--package", "keyward", "--package", "keyward-tests", "--bins"])?;
            let bin = workspace_root().join("target/release/keyward-bench");
            let mut cmd = Command::new(&bin);
            if quick {
                cmd.arg("--quick");
            }
            for t in tier {
                cmd.args(["--tier", &t.to_string()]);
            }
            if profile {
                cmd.arg("--profile");
            }
            let st =
                cmd.current_dir(workspace_root()).status().with_context(|| format!("running {}", bin.display()))?;
            if !st.success() {
                bail!("the benchmark failed ({st})");
            }
            Ok(())
        }
        Cmd::Soak { minutes } => {
            setup::run()?;
            cargo(&["build", "--release", "--package", "keyward", "--package", "keyward-tests", "--bins"])?;
            sweep_stale_namespaces();
            let bin = workspace_root().join("target/release/keyward-soak");
            run(&bin.to_string_lossy(), &["--minutes", &minutes.to_string()])
        }
        Cmd::Demo { args } => {
            setup::run()?;
            cargo(&["build", "--package", "keyward", "--bins"])?;
            let mut a = vec!["run", "--quiet", "--package", "keyward-tests", "--bin", "keyward-demo", "--"];
            a.extend(args.iter().map(String::as_str));
            cargo(&a)
        }
    }
}

/// `cargo xtask fuzz`: the host targets (optimized), then the packet path.
/// The packet path runs in the debug profile: its time is spent in the
/// kernel, and this saves a release build of the test crate. Both run, so
/// one report shows every failure.
fn fuzz(cases: u32) -> anyhow::Result<()> {
    let cases = cases.to_string();
    let host = cargo_env(
        &["test", "--release", "--package", "keyward", "--test", "properties"],
        &[("KEYWARD_FUZZ_CASES", cases.as_ref())],
    );
    let packet = cargo_env(
        &["test", "--package", "keyward-tests", "--test", "xdp_fuzz", "--", "--nocapture"],
        &[("KEYWARD_XDP_FUZZ_CASES", cases.as_ref())],
    );
    let failed: Vec<String> = [host, packet].into_iter().filter_map(|r| r.err().map(|e| e.to_string())).collect();
    if !failed.is_empty() {
        bail!("a fuzz target failed (its minimal input is printed above):\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// `cargo xtask dist`: the release binary with what an operator needs beside
/// it, in `target/dist/`.
fn dist() -> anyhow::Result<()> {
    let root = workspace_root();
    let out = root.join("target/dist");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("docs"))?;
    let package = deb::build(&root, deb::Profile::Release)?;
    let mut files: Vec<(PathBuf, PathBuf)> = [
        ("target/release/keyward", "keyward"),
        ("target/release/keyward.1.gz", "keyward.1.gz"),
        ("target/release/keyward.bash", "keyward.bash"),
        ("target/release/_keyward", "_keyward"),
        ("target/release/keyward.fish", "keyward.fish"),
        ("docs/keyward.example.toml", "keyward.toml.example"),
        ("dist/keyward.service", "keyward.service"),
        ("dist/keyward.environment", "environment"),
        ("dist/grafana-dashboard.json", "grafana-dashboard.json"),
        ("dist/prometheus-alerts.yml", "prometheus-alerts.yml"),
        ("README.md", "README.md"),
        ("LICENSE-MIT", "LICENSE-MIT"),
        ("LICENSE-APACHE", "LICENSE-APACHE"),
        ("LICENSE-GPL-2.0", "LICENSE-GPL-2.0"),
    ]
    .into_iter()
    .map(|(from, to)| (root.join(from), out.join(to)))
    .collect();
    // The reference, so that the README's links work in the bundle too.
    for e in std::fs::read_dir(root.join("docs")).context("reading docs/")? {
        let e = e?;
        files.push((e.path(), out.join("docs").join(e.file_name())));
    }
    for (from, to) in files {
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    }
    eprintln!("==> {}", package.display());
    eprintln!("    install: apt-get install ./{}", package.strip_prefix(&root).unwrap_or(&package).display());
    eprintln!(
        "==> {}: the binary, man page, completions, example, unit, environment, README.md, docs/, LICENSE-*",
        out.display()
    );
    eprintln!("    for other distributions: README.md, \"Install on a host\"");
    Ok(())
}

/// The crates that build for the BPF target only (from build scripts): never
/// part of a host build, test run or host clippy.
const EBPF_CRATES: [&str; 2] = ["proxy-ebpf", "keyward-bench-ebpf"];

/// `cargo xtask lint`. The eBPF crates are linted for `bpfel-unknown-none`
/// with the toolchain that builds them (`debian-bpf`, whose clippy is
/// Debian's rust-web-clippy), in their own target directory so the two
/// toolchains do not invalidate each other's builds. Every step runs, so
/// one report shows every finding.
fn lint() -> anyhow::Result<()> {
    let fmt = cargo(&["fmt", "--all", "--", "--check"]);
    let mut host = vec!["clippy", "--workspace", "--all-targets"];
    for p in EBPF_CRATES {
        host.extend(["--exclude", p]);
    }
    host.extend(["--", "-D", "warnings"]);
    let host = cargo(&host);
    let mut bpf = vec!["run", setup::TOOLCHAIN, "cargo", "clippy", "--release", "--target", "bpfel-unknown-none"];
    bpf.extend(["--target-dir", "target/lint-bpf"]);
    for p in EBPF_CRATES {
        bpf.extend(["--package", p]);
    }
    bpf.extend(["--", "-D", "warnings"]);
    let bpf = run("rustup", &bpf);
    let failed: Vec<String> = [fmt, host, bpf].into_iter().filter_map(|r| r.err().map(|e| e.to_string())).collect();
    if !failed.is_empty() {
        bail!("lint failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// Run cargo (the one that runs us) with `args` in the workspace root.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_env(args, &[])
}

/// [`cargo`] with extra environment variables.
fn cargo_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_env(&cargo, args, env)
}

/// Run `program` with `args` in the workspace root; an error names the command.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    run_env(program, args, &[])
}

/// [`run`] with extra environment variables.
fn run_env(program: &str, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    let shown = format!(
        "{} {}",
        Path::new(program).file_name().map_or(program.into(), |n| n.to_string_lossy()),
        args.join(" ")
    );
    eprintln!("==> {shown}");
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(std::path::Path::to_path_buf).unwrap_or_default()
}

/// Remove test namespaces (`kwt<pid>-…`) left by test processes that were
/// killed before their cleanup ran. Only namespaces whose creating process
/// is gone are touched.
fn sweep_stale_namespaces() {
    let Ok(rd) = std::fs::read_dir("/run/netns") else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("kwt") else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("==> removing stale test namespace {name}");
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}
