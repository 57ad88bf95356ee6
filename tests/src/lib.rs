//! Test support for keyward: hand-built frames, network-namespace topologies
//! with veth pairs, an AF_PACKET sender and counter, and a handle on the real
//! `keyward` daemon binary. Everything created here has a unique name and is
//! removed on drop, also when a test fails.

pub mod bench;
pub mod browser;
pub mod daemon;
pub mod frame;
pub mod fwd;
pub mod netns;
pub mod redis;
pub mod soak;
pub mod tokenpage;
pub mod upstream;
pub mod wire;
pub mod xdp_reference;

/// True when privileged tests may run. Without root they fail loudly, unless
/// `KEYWARD_SKIP_PRIVILEGED=1` asks to skip them (for unprivileged dev loops).
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("KEYWARD_SKIP_PRIVILEGED").is_some() {
        eprintln!("skipping: needs root (KEYWARD_SKIP_PRIVILEGED is set)");
        return false;
    }
    panic!("this test needs root (CAP_BPF, CAP_NET_ADMIN); set KEYWARD_SKIP_PRIVILEGED=1 to skip");
}

/// Poll `f` every 20 ms until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= end {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
