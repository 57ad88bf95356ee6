//! `cargo xtask demo`: keyward's XDP half in one minute, on this machine.
//! Creates two network namespaces joined by a veth pair, starts the real
//! `keyward` daemon with XDP attached to the server end, and plays floods
//! from the client end with real packets; prints what reached the host and
//! what the kernel dropped, then removes everything (also on Ctrl-C).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use keyward_tests::{
    daemon::{Daemon, PORT},
    frame::{self, TCP, UDP},
    netns::{SERVER_V4, SERVER_V6, Topology},
    wire::{self, Listener},
};

/// What Ctrl-C must clean up: namespaces and the daemon's pid.
static CLEANUP: OnceLock<Mutex<(Vec<String>, Option<u32>)>> = OnceLock::new();

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("keyward demo: needs root (it creates network namespaces and attaches XDP)");
        std::process::exit(1);
    }
    install_ctrl_c();
    let code = match std::panic::catch_unwind(play) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    std::process::exit(code);
}

fn say(s: &str) {
    use std::io::IsTerminal as _;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m== {s}\x1b[0m");
    } else {
        println!("\n== {s}");
    }
}

struct Row {
    scenario: &'static str,
    sent: u64,
    arrived: u64,
}

fn play() {
    say("Setting up: two network namespaces joined by a veth pair");
    let t = Topology::new();
    println!("   server namespace {} (interface {}, {SERVER_V4}, {SERVER_V6})", t.server_ns, t.server_if);
    println!("   client namespace {} (interface {})", t.client_ns, t.client_if);
    let d = Daemon::start(
        &t,
        "rate_pps = 50\nburst = 100\nipv6_prefix = 64\naggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 100, burst = 120 }",
    );
    if let Some(c) = CLEANUP.get() {
        let mut g = c.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = vec![t.server_ns.clone(), t.client_ns.clone()];
        g.1 = d.pid();
    }
    say(&format!("keyward run -c {}  (pid {:?})", d.config.display(), d.pid().unwrap_or(0)));
    println!("{}", std::fs::read_to_string(&d.config).unwrap_or_default().trim_end());
    println!("\n{}", t.server_link().lines().find(|l| l.contains("prog/xdp")).unwrap_or("").trim());
    let _api = Listener::start(&t, PORT);
    let mut rows = Vec::new();

    say("1. A legitimate visitor opens 5 TCP connections to the guarded port");
    let ok = (0..5).filter(|_| wire::connects(&t, PORT, Duration::from_secs(3))).count();
    println!("   {ok} of 5 connected");

    say("2. A SYN flood: 3000 SYNs from one spoofed source, 10.66.0.9, as fast as this machine sends");
    let src = Ipv4Addr::new(10, 66, 0, 9);
    let mut frames: Vec<Vec<u8>> = (0..3000u16)
        .map(|i| frame::tcp4(t.macs(), src, SERVER_V4, 1024 + i, PORT))
        .collect();
    println!("   ...with 200 UDP datagrams from the same source to port 5353 mixed in (not guarded)");
    for i in 0..200u16 {
        frames.insert(usize::from(i) * 15, frame::udp4(t.macs(), src, SERVER_V4, 5353, 5353, b"mdns"));
    }
    let (seen, took) = wire::deliver(&t, frames);
    let tcp = seen.iter().filter(|s| s.proto == TCP).count() as u64;
    let udp = seen.iter().filter(|s| s.proto == UDP).count() as u64;
    println!("   sent in {took:.2?}: {tcp} of 3000 SYNs reached the host (burst 100 + 50/s), {udp} of 200 UDP");
    rows.push(Row { scenario: "SYN flood, one source", sent: 3000, arrived: tcp });
    rows.push(Row { scenario: "UDP from the same source", sent: 200, arrived: udp });

    say("3. A flood rotating through all 254 addresses of 10.88.7.0/24, 4 SYNs each");
    let frames: Vec<Vec<u8>> = (0..4)
        .flat_map(|_| (1..=254u8).map(|i| frame::tcp4(t.macs(), Ipv4Addr::new(10, 88, 7, i), SERVER_V4, 4000, PORT)))
        .collect();
    let before = d.status().new_sources;
    let (seen, _) = wire::deliver(&t, frames);
    let arrived = seen.iter().filter(|s| s.proto == TCP).count() as u64;
    let created = d.status().new_sources - before;
    println!("   {arrived} of 1016 reached the host: the /24's aggregate bucket (burst 120, 100/s) held it,");
    println!("   and only {created} per-source entries were created for 254 rotating sources");
    rows.push(Row { scenario: "rotating sources in one /24", sent: 1016, arrived });

    say("4. An IPv6 flood from 100 addresses inside one /64");
    let frames: Vec<Vec<u8>> = (0..10)
        .flat_map(|_| (1..=100u16).map(|i| frame::tcp6(t.macs(), Ipv6Addr::new(0xfd00, 0xbad, 0, 1, 0, 0, 0, i), SERVER_V6, 4000, PORT)))
        .collect();
    let (seen, _) = wire::deliver(&t, frames);
    let arrived = seen.iter().filter(|s| s.proto == TCP).count() as u64;
    println!("   {arrived} of 1000 reached the host: one bucket per /64");
    rows.push(Row { scenario: "IPv6, 100 addresses in one /64", sent: 1000, arrived });

    say("5. The operator denies 10.66.0.0/16 for 30 seconds");
    println!("   $ keyward deny add 10.66.0.0/16 --for 30s");
    print!("   {}", d.ok(&["deny", "add", "10.66.0.0/16", "--for", "30s"]));
    let frames: Vec<Vec<u8>> = (0..500u16).map(|i| frame::tcp4(t.macs(), src, SERVER_V4, 1024 + i, PORT)).collect();
    let (seen, _) = wire::deliver(&t, frames);
    let arrived = seen.iter().filter(|s| s.proto == TCP).count() as u64;
    println!("   {arrived} of 500 SYNs from 10.66.0.9 reached the host");
    rows.push(Row { scenario: "denied network", sent: 500, arrived });
    let ok = (0..3).filter(|_| wire::connects(&t, PORT, Duration::from_secs(3))).count();
    println!("   the legitimate visitor still connects: {ok} of 3");

    say("$ keyward status");
    print!("{}", d.ok(&["status"]));
    say("$ keyward top -n 5");
    print!("{}", d.ok(&["top", "-n", "5"]));

    say("Report");
    println!("   {:<34} {:>6} {:>14} {:>16}", "scenario", "sent", "reached host", "dropped in XDP");
    for r in &rows {
        println!("   {:<34} {:>6} {:>14} {:>16}", r.scenario, r.sent, r.arrived, r.sent - r.arrived);
    }
    let s = d.status();
    println!(
        "\n   kernel counters: {} dropped over rate, {} dropped as denied, {} passed under rate, {} unguarded passed",
        s.packets("drop", "rate"),
        s.packets("drop", "denied"),
        s.packets("pass", "under_rate"),
        s.packets("pass", "unguarded")
    );

    say("Stopping keyward (SIGTERM): XDP detached, pins removed, namespaces deleted");
    let mut d = d;
    let st = d.stop();
    let attached = t.server_link().contains("prog/xdp");
    println!("   daemon exit: {st}; XDP still attached: {}", if attached { "yes (bug!)" } else { "no" });
    drop(t);
}

/// On Ctrl-C: stop the daemon we started and delete our namespaces, then exit.
fn install_ctrl_c() {
    use nix::sys::signal::{SigSet, Signal};
    let _ = CLEANUP.set(Mutex::new((Vec::new(), None)));
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // Block in this thread (inherited by every thread spawned later) and
    // wait for the signal in a dedicated one.
    let _ = set.thread_block();
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            eprintln!("\ninterrupted: cleaning up");
            if let Some(c) = CLEANUP.get() {
                let g = c.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(pid) = g.1 {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
                    std::thread::sleep(Duration::from_millis(500));
                }
                for ns in &g.0 {
                    let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
                }
            }
            std::process::exit(130);
        }
    });
}
