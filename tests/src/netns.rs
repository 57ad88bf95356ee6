//! Two network namespaces joined by a veth pair, as bpfman's and xdp-tools'
//! test setups build them: the server end carries keyward's XDP program, the
//! client end sends (spoofed) traffic. Names are unique per process and call
//! (`kwt<pid>-<n>s`/`c`); dropping the topology deletes both namespaces and
//! with them the veth pair, also when the test panicked.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::frame::Macs;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Addresses used inside every topology (namespaces keep them apart).
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const SERVER_MAC: [u8; 6] = [0x02, 0x6b, 0x77, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0x6b, 0x77, 0, 0, 0x02];

/// A server and a client namespace and the veth between them.
pub struct Topology {
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub client_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Topology {
    /// Create the namespaces, the veth pair, addresses and routes.
    pub fn new() -> Topology {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let t = Topology {
            server_ns: format!("kwt{pid}-{n}s"),
            client_ns: format!("kwt{pid}-{n}c"),
            server_if: format!("kw{:x}x{n}s", pid & 0xffff),
            client_if: format!("kw{:x}x{n}c", pid & 0xffff),
        };
        // From here on, Drop removes whatever was created.
        ip(&["netns", "add", &t.server_ns]);
        ip(&["netns", "add", &t.client_ns]);
        ip(&[
            "link",
            "add",
            &t.server_if,
            "netns",
            &t.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &t.client_if,
            "netns",
            &t.client_ns,
        ]);
        for (ns, dev, mac, v4, v6) in [
            (&t.server_ns, &t.server_if, SERVER_MAC, SERVER_V4, SERVER_V6),
            (&t.client_ns, &t.client_if, CLIENT_MAC, CLIENT_V4, CLIENT_V6),
        ] {
            let mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            ip(&["-n", ns, "link", "set", dev, "address", &mac]);
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&["-n", ns, "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        t
    }

    /// Let what XDP at the server end sends back (`XDP_TX`: keyward's
    /// challenges) reach the client: a veth delivers it only into a peer
    /// running NAPI, which a trivial `XDP_PASS` program at the client end
    /// turns on (kept attached while the returned handle lives). And the
    /// client then computes its TCP checksums in full, as every frame off a
    /// wire has them (with checksum offload a veth hands over only the
    /// pseudo-header's sum, which a challenge rewritten in place would carry
    /// back wrong).
    pub fn deliver_returns(&self) -> aya::Ebpf {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.client_ns, "ethtool", "-K", &self.client_if, "tx", "off"])
            .output()
            .expect("ethtool");
        assert!(st.status.success(), "ethtool -K tx off: {}", String::from_utf8_lossy(&st.stderr));
        let iface = self.client_if.clone();
        in_ns(&self.client_ns, move || {
            let mut e = aya::Ebpf::load(crate::bench::OBJECT).expect("bench object");
            let x: &mut aya::programs::Xdp =
                e.program_mut("bench_pass").expect("bench_pass").try_into().expect("an XDP program");
            x.load().expect("load bench_pass");
            x.attach(&iface, aya::programs::XdpMode::Driver).expect("attach bench_pass at the client");
            e
        })
    }

    /// Give the client another IPv4 address in 10.77.0.0/24 (for tests and
    /// the demo that need several clients).
    pub fn add_client_address(&self, addr: Ipv4Addr) {
        ip(&["-n", &self.client_ns, "addr", "add", &format!("{addr}/24"), "dev", &self.client_if]);
    }

    /// Give the client an address in another network (`addr/32`), routed
    /// both ways over the veth: a client from elsewhere on the internet.
    pub fn add_client_network(&self, addr: Ipv4Addr) {
        ip(&["-n", &self.client_ns, "addr", "add", &format!("{addr}/32"), "dev", &self.client_if]);
        ip(&["-n", &self.server_ns, "route", "add", &format!("{addr}/32"), "dev", &self.server_if]);
    }

    /// Give the client many addresses at once (`addr/32` or `addr/128`, each
    /// routed back from the server): one `ip -batch` per namespace.
    pub fn add_client_hosts(&self, addrs: &[std::net::IpAddr]) {
        let mut client = String::new();
        let mut server = String::new();
        for a in addrs {
            let (len, nodad) = if a.is_ipv4() { (32, "") } else { (128, " nodad") };
            client.push_str(&format!("addr add {a}/{len} dev {}{nodad}\n", self.client_if));
            server.push_str(&format!("route add {a}/{len} dev {}\n", self.server_if));
        }
        for (ns, batch) in [(&self.client_ns, client), (&self.server_ns, server)] {
            let file = std::env::temp_dir().join(format!("{ns}.batch"));
            std::fs::write(&file, batch).expect("batch file");
            ip(&["-n", ns, "-batch", &file.display().to_string()]);
            let _ = std::fs::remove_file(&file);
        }
    }

    /// MACs for frames sent from the client to the server.
    pub fn macs(&self) -> Macs {
        Macs { src: CLIENT_MAC, dst: SERVER_MAC }
    }

    /// The client's MAC, to tell its frames apart at the server.
    pub fn client_mac(&self) -> [u8; 6] {
        CLIENT_MAC
    }

    /// `ip -d link show` of the server end (to see whether XDP is attached).
    pub fn server_link(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.server_ns, "-d", "link", "show", "dev", &self.server_if])
            .output()
            .expect("ip link show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Run `f` on a thread that has entered network namespace `ns`; sockets it
/// opens live in that namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(ns, f).join().expect("thread in namespace panicked")
}

/// Like [`in_ns`] but returns the thread's handle.
pub fn spawn_in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
}
