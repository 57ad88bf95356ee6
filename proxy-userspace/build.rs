//! Builds `proxy-ebpf` for the BPF target with the `debian-bpf` toolchain
//! (see README "Building" and `cargo xtask setup`) and leaves the object in
//! OUT_DIR, where `dataplane` embeds it. Silent unless the build fails. Also
//! records the git commit being built (`KEYWARD_COMMIT`, "unknown" outside a
//! checkout) for `keyward_build_info`.
use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    commit(manifest);
    let dir = manifest.parent().ok_or_else(|| anyhow!("no workspace root"))?.join("proxy-ebpf");
    ebpf_build::build("proxy-ebpf", &dir).context("building the XDP program")
}

/// `KEYWARD_COMMIT` for the binary, and re-run when HEAD moves.
fn commit(dir: &Path) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KEYWARD_COMMIT={commit}");
    // HEAD, and the branch file it points at (a worktree has its own HEAD).
    for p in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])),
    ]
    .into_iter()
    .flatten()
    {
        let p = dir.join(p);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
