//! Default locations on a Linux proxy host, in one place: the admin socket
//! under /run, the store under /var/lib, pins under the BPF filesystem.

/// Default admin socket (`admin.socket`).
pub const ADMIN_SOCKET: &str = "/run/keyward/admin.sock";
/// Default config file.
pub const CONFIG: &str = "/etc/keyward/keyward.toml";
/// Default store directory (`store.path`).
pub const STORE_DIR: &str = "/var/lib/keyward";
/// Where the BPF filesystem is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// keyward's directory in the BPF filesystem; one subdirectory per interface.
pub const PIN_ROOT: &str = "/sys/fs/bpf/keyward";
/// Interface ownership locks.
pub const LOCK_DIR: &str = "/run/keyward/lock";
