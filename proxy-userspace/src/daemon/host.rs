//! What `keyward run` needs of the host before it loads anything: the
//! privileges to load and attach XDP, signals that get through, the BPF
//! filesystem, and ownership of the interface (one keyward per interface and
//! network namespace, held by [`OwnerLock`] for as long as it lives).

use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

use crate::paths;

/// The name of this interface's pin directory and lock: the interface name,
/// qualified by the network namespace when not in the host's own, so that
/// daemons in different namespaces never collide.
pub fn slot_name(iface: &str) -> String {
    let ino = |p| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
    match (ino("/proc/self/ns/net"), ino("/proc/1/ns/net")) {
        // When the host's namespace cannot be read (a sandbox), qualify too.
        (Some(me), init) if init != Some(me) => format!("{iface}@{me}"),
        _ => iface.to_owned(),
    }
}

/// An exclusive `flock` on `/run/keyward/lock/<slot>.lock` holding our pid:
/// one keyward per interface. Dropping it empties the file and releases the
/// lock; the file itself stays (unlinking a lock file races with the next
/// owner opening it).
pub struct OwnerLock {
    file: nix::fcntl::Flock<File>,
}

impl OwnerLock {
    /// Take the interface, or say which pid has it.
    pub fn acquire(slot: &str, iface: &str) -> anyhow::Result<OwnerLock> {
        std::fs::create_dir_all(paths::LOCK_DIR).with_context(|| format!("creating {}", paths::LOCK_DIR))?;
        let path = Path::new(paths::LOCK_DIR).join(format!("{slot}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                bail!("another keyward (pid {}) already owns interface `{iface}`", pid.trim());
            }
        };
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(OwnerLock { file })
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        // No stale pid for the next reader; the flock goes with the file.
        let _ = self.file.set_len(0);
    }
}

/// A parent may have started us with signals blocked (the mask is
/// inherited across exec); the signals we act on must get through.
pub fn unblock_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    if let Err(e) = set.thread_unblock() {
        warn!(error = %e, "cannot unblock SIGTERM/SIGINT/SIGHUP");
    }
}

/// Refuse without the capabilities loading and attaching need. Measured
/// (tests/tests/operating.rs): CAP_BPF and CAP_NET_ADMIN are not enough, the
/// verifier refuses the program's packet access without CAP_PERFMON.
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON.
pub fn check_privileges() -> anyhow::Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    let sys = has(CAP_SYS_ADMIN);
    let enough = (sys || has(CAP_BPF) && has(CAP_PERFMON)) && has(CAP_NET_ADMIN);
    if !enough {
        bail!("keyward run needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load and attach XDP");
    }
    Ok(())
}

/// Mount the BPF filesystem at /sys/fs/bpf unless it is already there.
pub fn mount_bpffs() -> anyhow::Result<()> {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    let is_bpffs = statfs(paths::BPFFS).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if !is_bpffs {
        nix::mount::mount(Some("bpf"), paths::BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting the BPF filesystem at {}", paths::BPFFS))?;
        info!(path = paths::BPFFS, "mounted the BPF filesystem");
    }
    Ok(())
}

/// Raise the open-file limit's soft value to its hard one (systemd's default
/// soft limit is 1024: one source with 1,100 idle connections used to take
/// every descriptor). The forwarder's connection cap is then sized from it.
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => warn!(error = %e, soft, hard, "could not raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "reading the open-file limit"),
    }
}
