//! Builds `proxy-ebpf` for the BPF target with the Debian toolchain linked as
//! `debian-bpf` (see README "Building" and `cargo xtask setup`) and leaves the
//! object in OUT_DIR, where `dataplane` embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("proxy-ebpf");
    let root = root.to_str().context("non-UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "proxy-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom("debian-bpf"),
    )
    .context("building the XDP program (run `cargo xtask setup` first)")
}
