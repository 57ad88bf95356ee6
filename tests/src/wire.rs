//! Real packets on the veth: an AF_PACKET sender on the client end and a
//! counter on the server end (pnet's datalink channels). XDP runs before
//! packet taps, so the counter sees exactly what keyward let through. A
//! marker frame (UDP to port 9, never guarded) sent last ends a count: the
//! veth delivers in order, so when the marker arrives every earlier frame has
//! been decided.

use std::{
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use pnet_datalink::{Channel, Config, DataLinkReceiver, DataLinkSender};

use crate::{
    frame::{self, Summary},
    netns::{self, CLIENT_V4, SERVER_V4, Topology},
};

/// UDP port of the end marker.
pub const MARKER_PORT: u16 = 9;
/// The longest a count waits for its marker.
const COUNT_LIMIT: Duration = Duration::from_secs(20);

fn channel(iface: &str) -> (Box<dyn DataLinkSender>, Box<dyn DataLinkReceiver>) {
    let ifs = pnet_datalink::interfaces();
    let i =
        ifs.into_iter().find(|i| i.name == iface).unwrap_or_else(|| panic!("no interface {iface} in this namespace"));
    let cfg = Config { read_timeout: Some(Duration::from_millis(50)), ..Config::default() };
    match pnet_datalink::channel(&i, cfg).expect("AF_PACKET channel") {
        Channel::Ethernet(tx, rx) => (tx, rx),
        _ => panic!("unexpected channel type"),
    }
}

/// Frames from the client that reached the server (marker excluded).
pub struct Counter {
    handle: JoinHandle<Vec<Summary>>,
}

impl Counter {
    /// Start counting client frames on the server end; returns once the
    /// socket is open, so nothing sent afterwards is missed.
    pub fn start(t: &Topology) -> Counter {
        let (ready_tx, ready_rx) = mpsc::channel();
        let iface = t.server_if.clone();
        let client = t.client_mac();
        let handle = netns::spawn_in_ns(&t.server_ns, move || {
            let (_tx, mut rx) = channel(&iface);
            ready_tx.send(()).ok();
            let end = Instant::now() + COUNT_LIMIT;
            let mut seen = Vec::new();
            while Instant::now() < end {
                let Ok(f) = rx.next() else { continue };
                let Some(s) = frame::summary(f) else { continue };
                if s.src_mac != client {
                    continue;
                }
                if s.proto == frame::UDP && s.dport == MARKER_PORT {
                    return seen;
                }
                seen.push(s);
            }
            panic!("end marker never arrived within {COUNT_LIMIT:?}");
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("counter did not start");
        Counter { handle }
    }

    /// Send the marker from the client and return what arrived before it.
    pub fn finish(self, t: &Topology) -> Vec<Summary> {
        send(t, vec![marker(t)]);
        self.handle.join().expect("counter thread panicked")
    }
}

/// The end marker: UDP from the client to port 9 of the server.
pub fn marker(t: &Topology) -> Vec<u8> {
    frame::udp4(t.macs(), CLIENT_V4, SERVER_V4, 40_000, MARKER_PORT, b"end")
}

/// Send `frames` from the client end as fast as possible; returns the time
/// from the first to the last send.
pub fn send(t: &Topology, frames: Vec<Vec<u8>>) -> Duration {
    let iface = t.client_if.clone();
    netns::in_ns(&t.client_ns, move || {
        let (mut tx, _rx) = channel(&iface);
        let start = Instant::now();
        for f in &frames {
            match tx.send_to(f, None) {
                Some(Ok(())) => {}
                other => panic!("sending a frame: {other:?}"),
            }
        }
        start.elapsed()
    })
}

/// Send frames made by `make(i)` from the client end at about `pps`, in
/// steps of a millisecond on one socket, until `stop` is set (or 30 s pass);
/// returns the frames sent and the seconds taken.
pub fn send_until(
    t: &Topology,
    pps: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut make: impl FnMut(u64) -> Vec<u8> + Send + 'static,
) -> (u64, f64) {
    let iface = t.client_if.clone();
    netns::in_ns(&t.client_ns, move || {
        let (mut tx, _rx) = channel(&iface);
        let start = Instant::now();
        let mut sent = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && start.elapsed() < Duration::from_secs(30) {
            let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            for i in sent..due {
                match tx.send_to(&make(i), None) {
                    Some(Ok(())) => {}
                    other => panic!("sending a frame: {other:?}"),
                }
            }
            sent = due;
        }
        (sent, start.elapsed().as_secs_f64())
    })
}

/// Count frames from the client that arrive while `frames` are sent.
pub fn deliver(t: &Topology, frames: Vec<Vec<u8>>) -> (Vec<Summary>, Duration) {
    let c = Counter::start(t);
    let took = send(t, frames);
    (c.finish(t), took)
}

/// Try a real TCP connection from the client namespace to the server.
pub fn connects(t: &Topology, port: u16, timeout: Duration) -> bool {
    let addr = std::net::SocketAddr::from((SERVER_V4, port));
    netns::in_ns(&t.client_ns, move || std::net::TcpStream::connect_timeout(&addr, timeout).is_ok())
}

/// A TCP listener in the server namespace that accepts until dropped.
pub struct Listener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Listener {
    /// Listen on `port` of the server.
    pub fn start(t: &Topology, port: u16) -> Listener {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = netns::spawn_in_ns(&t.server_ns, move || {
            let l = std::net::TcpListener::bind((SERVER_V4, port)).expect("bind listener");
            l.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).ok();
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("listener did not start");
        Listener { stop, handle: Some(handle) }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// An HTTP answer read off the wire.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Everything received, head and body.
    pub raw: String,
}

impl HttpAnswer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Send raw request bytes from the client namespace to the server's `port`
/// and read the answer until the server closes (send `Connection: close`).
pub fn http_raw(t: &Topology, port: u16, request: &[u8]) -> std::io::Result<HttpAnswer> {
    http_raw_from(t, None, port, request)
}

/// Like [`http_raw`], from source address `src` of the client (see
/// [`Topology::add_client_address`]).
pub fn http_raw_from(
    t: &Topology,
    src: Option<std::net::Ipv4Addr>,
    port: u16,
    request: &[u8],
) -> std::io::Result<HttpAnswer> {
    http_raw_in(&t.client_ns, src, port, request)
}

/// Like [`http_raw_from`], given only the client namespace's name (for
/// threads that do not hold the topology).
pub fn http_raw_in(
    client_ns: &str,
    src: Option<std::net::Ipv4Addr>,
    port: u16,
    request: &[u8],
) -> std::io::Result<HttpAnswer> {
    http_raw_at(client_ns, src.map(std::net::IpAddr::V4), std::net::SocketAddr::from((SERVER_V4, port)), request)
}

/// Like [`http_raw_in`], to any address (IPv4 or IPv6) from any source.
pub fn http_raw_at(
    client_ns: &str,
    src: Option<std::net::IpAddr>,
    addr: std::net::SocketAddr,
    request: &[u8],
) -> std::io::Result<HttpAnswer> {
    use std::io::{Read as _, Write as _};
    let request = request.to_vec();
    netns::in_ns(client_ns, move || {
        let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        if let Some(ip) = src {
            sock.bind(&std::net::SocketAddr::from((ip, 0)).into())?;
        }
        sock.connect_timeout(&addr.into(), Duration::from_secs(2))?;
        let mut s: std::net::TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&request)?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let raw = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status line in {raw:?}")))?;
        let headers =
            lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))).collect();
        // Bodies here are small and never chunked by keyward (full bodies).
        Ok(HttpAnswer { status, headers, body: body.to_owned(), raw: raw.clone() })
    })
}

/// `GET path` with optional extra header lines, from the client namespace.
pub fn get(t: &Topology, port: u16, path: &str, extra: &[(&str, &str)]) -> HttpAnswer {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: keyward.test\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    http_raw(t, port, req.as_bytes()).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}
