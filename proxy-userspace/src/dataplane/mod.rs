//! The kernel half, seen from user space: the embedded XDP object, loading
//! it, attaching it to the configured interface, pinning its maps under
//! `/sys/fs/bpf/keyward/<iface>` (so bpftool and operators can inspect them),
//! and undoing all of that on shutdown. Map contents live in [`maps`].

pub mod maps;
pub mod sample;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use proxy_common::{PROGRAM_NAME, maps as names};
use tracing::{info, warn};

use crate::config::{AttachMode, Xdp as XdpConfig};

/// The XDP object built by `build.rs`, embedded in the binary.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Why the data plane could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP program: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    #[error("verifying the XDP program: {0}")]
    Verify(#[source] ProgramError),
    #[error("interface `{0}` does not exist")]
    NoInterface(String),
    #[error("attaching XDP to `{iface}` in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinning {what} at {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attached {
    Native,
    Generic,
}

impl Attached {
    /// Operator-facing name.
    pub fn as_str(self) -> &'static str {
        match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
        }
    }
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    link: Option<(XdpLinkId, String, Attached)>,
    pins: Option<PathBuf>,
    /// Ports currently marked guarded in `PORTS`, so a new config can clear
    /// the ones it drops.
    ports: Vec<u16>,
    /// The config last written to `CONFIG` (flags are added from `lists`).
    config: proxy_common::XdpConfig,
    /// `SOURCES`' slots minus one, and the key of the hash placing sources
    /// in them: fixed for the life of the loaded program.
    table_mask: u32,
    seed: u64,
    /// Entries in the allow and deny tries, to tell the program when it may
    /// skip them.
    lists: [std::collections::HashSet<crate::units::Cidr>; 2],
}

impl Dataplane {
    /// Load and verify the embedded object, sizing the per-source table, and
    /// write `xdp` into the config and port maps. Nothing is attached yet.
    pub fn load(xdp: &XdpConfig) -> Result<Dataplane, DataplaneError> {
        raise_memlock();
        let slots = proxy_common::table::slots_for(xdp.table_size.get());
        let ebpf = EbpfLoader::new()
            .map_max_entries(names::SOURCES, slots)
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;
        let mut dp = Dataplane {
            ebpf,
            link: None,
            pins: None,
            ports: Vec::new(),
            config: proxy_common::XdpConfig::default(),
            table_mask: slots.saturating_sub(1),
            seed: rand::random(),
            lists: Default::default(),
        };
        dp.program()?.load().map_err(DataplaneError::Verify)?;
        dp.apply(xdp)?;
        Ok(dp)
    }

    /// The XDP program (for attaching, and for `BPF_PROG_TEST_RUN` in tests).
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .ok_or(DataplaneError::Missing("XDP program"))
    }

    /// Attach to `iface`. `auto` tries native (driver) mode and falls back to
    /// generic with a log line saying so.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, DataplaneError> {
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(DataplaneError::NoInterface(iface.to_owned()));
        }
        let prog = self.program()?;
        let attach = |prog: &mut Xdp, m: XdpMode, name: &'static str| {
            prog.attach(iface, m).map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                mode: name,
                source,
            })
        };
        let (id, how) = match mode {
            AttachMode::Native => (attach(prog, XdpMode::Driver, "native")?, Attached::Native),
            AttachMode::Generic => (attach(prog, XdpMode::Skb, "generic")?, Attached::Generic),
            AttachMode::Auto => match attach(prog, XdpMode::Driver, "native") {
                Ok(id) => (id, Attached::Native),
                Err(e) => {
                    warn!(iface, error = %e, "native XDP unavailable, falling back to generic mode");
                    (attach(prog, XdpMode::Skb, "generic")?, Attached::Generic)
                }
            },
        };
        info!(iface, mode = how.as_str(), "attached XDP program");
        self.link = Some((id, iface.to_owned(), how));
        Ok(how)
    }

    /// Where and how the program is attached.
    pub fn attached(&self) -> Option<(&str, Attached)> {
        self.link.as_ref().map(|(_, i, a)| (i.as_str(), *a))
    }

    /// Pin every map under `dir` (created; stale pins from a crashed run are
    /// replaced).
    pub fn pin(&mut self, dir: &Path) -> Result<(), DataplaneError> {
        let pin_err = |what, path: &Path, source| DataplaneError::Pin { what, path: path.to_owned(), source };
        remove_pins(dir);
        std::fs::create_dir_all(dir).map_err(|e| pin_err("directory", dir, e))?;
        self.pins = Some(dir.to_owned());
        for name in names::ALL {
            let map = self.ebpf.map(name).ok_or(DataplaneError::Missing(name))?;
            let path = dir.join(name);
            map.pin(&path).map_err(|e| pin_err("map", &path, io::Error::other(e.to_string())))?;
        }
        Ok(())
    }

    /// Detach and remove the pins; a second call does nothing. Dropping the
    /// `Dataplane` does this too.
    pub fn shutdown(&mut self) {
        if let Some((id, iface, _)) = self.link.take() {
            match self.program() {
                Ok(p) => match p.detach(id) {
                    Ok(()) => info!(iface, "detached XDP program"),
                    Err(e) => warn!(iface, error = %e, "detaching XDP program"),
                },
                Err(e) => warn!(error = %e, "detaching XDP program"),
            }
        }
        if let Some(dir) = self.pins.take() {
            remove_pins(&dir);
        }
    }

    /// Whether the object has a map called `name`.
    pub fn has_map(&self, name: &str) -> bool {
        self.ebpf.map(name).is_some()
    }

    pub(crate) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

impl Drop for Dataplane {
    /// Detach and unpin, so that however setup or the daemon ends, nothing
    /// is left attached or pinned.
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Remove keyward's pins in `dir` and `dir` itself, leaving anything else.
pub fn remove_pins(dir: &Path) {
    for name in names::ALL {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; raise it so
/// loading works there too (a no-op on memcg-accounted kernels).
fn raise_memlock() {
    use nix::sys::resource::{Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, libc::RLIM_INFINITY, libc::RLIM_INFINITY) {
        tracing::debug!(error = %e, "cannot raise RLIMIT_MEMLOCK");
    }
}
