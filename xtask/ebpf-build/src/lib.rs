//! Builds one eBPF crate of this workspace for the BPF target, from the build
//! script of the crate that embeds it, and leaves each of its binaries in
//! `OUT_DIR` under the binary's name (for `aya::include_bytes_aligned!`).
//!
//! It runs what aya-build runs (`cargo build --bins --release` for
//! `bpfel-unknown-none`, with the `debian-bpf` toolchain that `cargo xtask
//! setup` links; see README, Building), but keeps cargo's output: aya-build
//! replays every line of it, one `cargo:warning` per compiled crate, on every
//! build. Here cargo's progress is shown only when the build fails; the eBPF
//! crate's own compiler warnings, if any, are passed on.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

/// The rustup toolchain that builds for the BPF target.
pub const TOOLCHAIN: &str = "debian-bpf";

/// Why the eBPF crate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0} is not set: ebpf-build runs from a build script")]
    Env(&'static str),
    #[error("no BPF target for a {0}-endian host")]
    Endian(String),
    #[error("running `rustup run {TOOLCHAIN} cargo` (run `cargo xtask setup` first): {0}")]
    Spawn(#[source] std::io::Error),
    #[error(
        "building {package} for {target} failed ({status}; run `cargo xtask setup` if the {TOOLCHAIN} toolchain is missing):\n{output}"
    )]
    Failed { package: String, target: &'static str, status: ExitStatus, output: String },
    #[error("building {0} produced no binary")]
    NoBinary(String),
    #[error("copying {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One finished cargo build: the binaries it made and the rendered compiler
/// messages (warnings, or the errors of a failed build).
#[derive(Debug, Default)]
struct Built {
    binaries: Vec<(String, PathBuf)>,
    messages: Vec<String>,
}

/// Build the package `package`, whose sources are in `dir`, and copy its
/// binaries into `OUT_DIR`. Cargo reruns the calling build script when `dir`
/// changes (the caller's build-dependency on the package covers its
/// dependencies).
pub fn build(package: &str, dir: &Path) -> Result<(), BuildError> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or(BuildError::Env("OUT_DIR"))?);
    let target = match var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => return Err(BuildError::Endian(other.to_owned())),
    };
    let arch = var("CARGO_CFG_TARGET_ARCH")?;
    // aya-ebpf knows riscv64 by that name only (as aya-build maps it).
    let arch = if arch.starts_with("riscv64") { "riscv64".to_owned() } else { arch };

    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--package", package, "--bins", "--release"])
        .args(["--message-format=json", "--target", target])
        .arg("--target-dir")
        .arg(out_dir.join("ebpf-target").join(package))
        .current_dir(dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's compiler and wrappers (clippy-driver under
        // `cargo clippy`) are for the host toolchain, not this one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let output = cmd.output().map_err(BuildError::Spawn)?;
    let built = parse(&String::from_utf8_lossy(&output.stdout));
    if !output.status.success() {
        let mut text = built.messages.concat();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        return Err(BuildError::Failed { package: package.to_owned(), target, status: output.status, output: text });
    }
    for line in built.messages.iter().flat_map(|m| m.lines()) {
        println!("cargo:warning={line}");
    }
    if built.binaries.is_empty() {
        return Err(BuildError::NoBinary(package.to_owned()));
    }
    for (name, from) in built.binaries {
        let to = out_dir.join(name);
        std::fs::copy(&from, &to).map_err(|source| BuildError::Copy { from, to, source })?;
    }
    Ok(())
}

fn var(name: &'static str) -> Result<String, BuildError> {
    env::var(name).map_err(|_| BuildError::Env(name))
}

/// Read cargo's `--message-format=json` stream.
fn parse(stdout: &str) -> Built {
    let mut built = Built::default();
    for msg in stdout.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) {
                    built.binaries.push((name.to_owned(), PathBuf::from(exe)));
                }
            }
            Some("compiler-message") => {
                if let Some(r) = msg["message"]["rendered"].as_str() {
                    built.messages.push(r.to_owned());
                }
            }
            _ => {}
        }
    }
    built
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_and_messages_from_cargo_json() {
        let out = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"proxy-common"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-message","message":{"rendered":"warning: unused variable\n"}}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"proxy-ebpf"},"executable":"/t/release/proxy-ebpf"}"#,
            "\nnot json\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        let b = parse(out);
        assert_eq!(b.binaries, vec![("proxy-ebpf".to_owned(), PathBuf::from("/t/release/proxy-ebpf"))]);
        assert_eq!(b.messages, vec!["warning: unused variable\n".to_owned()]);
    }
}
