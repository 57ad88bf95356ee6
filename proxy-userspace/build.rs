//! Builds `proxy-ebpf` for the BPF target with the `debian-bpf` toolchain
//! (see README "Building" and `cargo xtask setup`) and leaves the object in
//! OUT_DIR, where `dataplane` embeds it. Silent unless the build fails.
use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or_else(|| anyhow!("no workspace root"))?.join("proxy-ebpf");
    ebpf_build::build("proxy-ebpf", &dir).context("building the XDP program")
}
