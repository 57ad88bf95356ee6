//! `cargo xtask`: what a plain `cargo` command cannot do by itself. `setup`
//! installs the BPF toolchain idempotently (the recipe of
//! ../shared/notes/bpf-toolchain.md, as code); `test` and `demo` run setup
//! first, so the README's two commands work on a fresh machine. `dist`
//! builds the Debian package ([`deb`]); `test` builds one from the debug
//! binary for the package test.

mod deb;
mod setup;

use std::process::Command;

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
    /// Setup, build, then run every test: host unit tests, BPF_PROG_TEST_RUN
    /// tests and network-namespace end-to-end tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test-name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
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
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { args } => {
            setup::run()?;
            sweep_stale_namespaces();
            cargo(&["build", "--package", "keyward", "--bins"])?;
            // The package test installs this (from the debug binary).
            let package = deb::build(&workspace_root(), deb::Profile::Dev)?;
            let mut a = vec!["test", "--workspace", "--exclude", "proxy-ebpf"];
            a.extend(args.iter().map(String::as_str));
            cargo_env(&a, &[("KEYWARD_DEB", package.as_os_str())])
        }
        Cmd::Dist => {
            setup::run()?;
            cargo(&["build", "--release", "--package", "keyward", "--bins"])?;
            let root = workspace_root();
            let out = root.join("target/dist");
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir_all(&out)?;
            let package = deb::build(&root, deb::Profile::Release)?;
            for (from, to) in [
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
            ] {
                std::fs::copy(root.join(from), out.join(to)).with_context(|| format!("copying {from}"))?;
            }
            eprintln!("==> {}", package.display());
            eprintln!("    install: apt-get install ./{}", package.strip_prefix(&root).unwrap_or(&package).display());
            eprintln!("==> {}: the same files for other distributions (README.md, \"Install\")", out.display());
            Ok(())
        }
        Cmd::Bench { quick, tier } => {
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
            let st =
                cmd.current_dir(workspace_root()).status().with_context(|| format!("running {}", bin.display()))?;
            if !st.success() {
                bail!("the benchmark failed ({st})");
            }
            Ok(())
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

/// Run cargo (the one that runs us) with `args` in the workspace root.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_env(args, &[])
}

/// [`cargo`] with extra environment variables.
fn cargo_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
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
