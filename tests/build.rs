//! Builds the benchmark's XDP programs (`tests/bench-ebpf`) for the BPF
//! target and leaves the object in OUT_DIR, where `bench` embeds it. They
//! live apart from `proxy-ebpf` so that keyward's own object holds only its
//! program. Silent unless the build fails.
use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-ebpf");
    ebpf_build::build("keyward-bench-ebpf", &dir).context("building the benchmark's XDP programs")
}
