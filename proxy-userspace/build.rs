//! Builds `proxy-ebpf` for the BPF target with the Debian toolchain linked as
//! `debian-bpf` (see README "Building" and `cargo xtask setup`) and leaves the
//! object in OUT_DIR, where `dataplane` embeds it. Also records the git
//! commit being built (`KEYWARD_COMMIT`, "unknown" outside a checkout) for
//! `keyward_build_info`.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().ok_or_else(|| anyhow!("no workspace root"))?.join("proxy-ebpf");
    let root = root.to_str().context("non-UTF-8 workspace path")?;
    commit(manifest);
    aya_build::build_ebpf(
        [aya_build::Package { name: "proxy-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom("debian-bpf"),
    )
    .context("building the XDP program (run `cargo xtask setup` first)")
}

/// `KEYWARD_COMMIT` for the binary, and re-run when HEAD moves.
fn commit(dir: &std::path::Path) {
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
