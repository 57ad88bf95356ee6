//! The Debian package: cargo-deb (installed at a pinned version when
//! missing) packs the binary, the unit, the config and environment files
//! (conffiles), the man page and the completions, which the binary itself
//! generates next to it first (`keyward manpage`, `keyward completions`).
//! What goes where is `[package.metadata.deb]` in proxy-userspace/Cargo.toml.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The cargo-deb release the package metadata is written for.
const CARGO_DEB: &str = "3.8.0";

/// Which build to package.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `cargo xtask dist`.
    Release,
    /// `cargo xtask test`: the debug binary already built for the tests
    /// (stripped by cargo-deb), so the package test costs no release build.
    Dev,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "debug",
        }
    }
}

/// Build `target/debian/keyward_*.deb` from the already built binary; its path.
pub fn build(root: &Path, profile: Profile) -> anyhow::Result<PathBuf> {
    install_cargo_deb()?;
    let dir = root.join("target").join(profile.dir());
    generate(&dir)?;
    let out = root.join("target/debian");
    let _ = std::fs::remove_dir_all(&out);
    let mut cmd = Command::new("cargo");
    cmd.args(["deb", "--package", "keyward", "--no-build", "--quiet", "--output"]).arg(&out).current_dir(root);
    if profile == Profile::Dev {
        cmd.args(["--profile", "dev", "--fast"]);
    }
    eprintln!("==> cargo deb ({})", profile.dir());
    let st = cmd.status().context("running cargo deb")?;
    if !st.success() {
        bail!("cargo deb failed ({st})");
    }
    let found = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("no .deb in {}", out.display()))?;
    Ok(found)
}

/// `cargo install cargo-deb` (from crates.io) unless this version is there.
fn install_cargo_deb() -> anyhow::Result<()> {
    let have = Command::new("cargo").args(["deb", "--version"]).output().ok().filter(|o| o.status.success());
    if have.is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB)) {
        return Ok(());
    }
    eprintln!("==> cargo install cargo-deb {CARGO_DEB}");
    let st = Command::new("cargo")
        .args(["install", "cargo-deb", "--locked", "--version", CARGO_DEB])
        .status()
        .context("running cargo install")?;
    if !st.success() {
        bail!("cargo install cargo-deb failed ({st})");
    }
    Ok(())
}

/// The man page and completions, from the binary in `dir`, next to it.
fn generate(dir: &Path) -> anyhow::Result<()> {
    let bin = dir.join("keyward");
    let run = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let o = Command::new(&bin).args(args).output().with_context(|| format!("running {}", bin.display()))?;
        if !o.status.success() {
            bail!("keyward {} failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
        }
        Ok(o.stdout)
    };
    for (args, name) in [
        (&["completions", "bash"][..], "keyward.bash"),
        (&["completions", "zsh"], "_keyward"),
        (&["completions", "fish"], "keyward.fish"),
    ] {
        std::fs::write(dir.join(name), run(args)?)?;
    }
    let man = dir.join("keyward.1");
    std::fs::write(&man, run(&["manpage"])?)?;
    // gzip -n: no name or time stamp, so the package is reproducible.
    let st = Command::new("gzip").args(["-9nf"]).arg(&man).status().context("running gzip")?;
    if !st.success() {
        bail!("gzip {} failed", man.display());
    }
    Ok(())
}
