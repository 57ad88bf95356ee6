//! The forwarder's accept loop: HTTP/1.1 and HTTP/2 (hyper-util's auto
//! builder), optional TLS, and a bounded graceful drain when asked to stop.
//!
//! Bounds against one address taking the forwarder down (issue 14): a new
//! connection must fit under the total and per-address caps ([`conns`]) or
//! is closed before a byte is read; one deadline runs from accept to the
//! first complete request head, over the TLS handshake, hyper-util's
//! version sniff (which has no timeout of its own) and the HTTP/1 head or
//! the HTTP/2 preface and first HEADERS; a request head larger than
//! [`HEAD_BYTES`] is answered 431 (HTTP/1) or refused by the header-list
//! limit (HTTP/2); accept errors back off ([`crate::accept`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Notify,
    time::Instant,
};
use tracing::warn;

use super::{
    Forwarder, access,
    conns::{Bounds, Reason, Slot},
};

/// The HTTP/1 read buffer, and so the largest request head (431 above).
/// hyper's default is about 400 KiB, which 400 parked connections turn into
/// 86 MiB.
pub const HEAD_BYTES: usize = 32 << 10;

/// HTTP/2 flow-control windows: what a client can make us buffer for a
/// stream or a connection before we read it (hyper's default is 1 MiB).
const H2_WINDOW: u32 = 64 << 10;

/// Accept connections until `stop` fires, then drain in-flight requests
/// for up to `drain`.
pub async fn serve(
    fwd: Arc<Forwarder>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut backoff = crate::accept::Backoff::new("forwarder");
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                };
                backoff.succeeded();
                let Some((slot, bounds)) = admit(&fwd, peer) else { continue };
                let conn = Conn { fwd: fwd.clone(), peer, deadline: Instant::now() + bounds.head_timeout, _slot: slot };
                tokio::spawn(conn.run(builder(&bounds), graceful.watcher(), tls.clone(), stream));
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!("drain timed out; closing remaining connections");
    }
}

/// A place for a connection from `peer`, or `None` (the stream is dropped,
/// so closed, and the refusal counted).
fn admit(fwd: &Arc<Forwarder>, peer: SocketAddr) -> Option<(Slot, Bounds)> {
    let p = fwd.policy();
    let ip = access::canonical(peer.ip());
    let key = (!p.trusted.iter().any(|c| c.contains(ip))).then(|| access::client_key(ip, p.v6_prefix));
    fwd.conns.admit(key, &p.conns).ok().map(|slot| (slot, p.conns))
}

/// The connection builder for the current bounds.
fn builder(b: &Bounds) -> Arc<auto::Builder<TokioExecutor>> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(b.head_timeout).max_buf_size(HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .max_header_list_size(HEAD_BYTES as u32)
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW);
    Arc::new(builder)
}

/// One accepted connection, holding its place until it ends.
struct Conn {
    fwd: Arc<Forwarder>,
    peer: SocketAddr,
    /// The first complete request head must arrive before this.
    deadline: Instant,
    _slot: Slot,
}

impl Conn {
    async fn run(
        self,
        builder: Arc<auto::Builder<TokioExecutor>>,
        watcher: Watcher,
        tls: Option<tokio_rustls::TlsAcceptor>,
        stream: tokio::net::TcpStream,
    ) {
        match tls {
            Some(acceptor) => match tokio::time::timeout_at(self.deadline, acceptor.accept(stream)).await {
                Ok(Ok(s)) => self.http(&builder, watcher, s).await,
                Ok(Err(_)) => self.fwd.conns.count(Reason::Tls),
                Err(_) => self.fwd.conns.count(Reason::HeadTimeout),
            },
            None => self.http(&builder, watcher, stream).await,
        }
    }

    /// Serve HTTP on `io`; closed at the deadline unless a request head has
    /// arrived by then.
    async fn http<I>(&self, builder: &auto::Builder<TokioExecutor>, watcher: Watcher, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let first = Arc::new(Notify::new());
        let svc = {
            let (fwd, first, peer) = (self.fwd.clone(), first.clone(), self.peer);
            hyper::service::service_fn(move |req| {
                first.notify_one();
                let fwd = fwd.clone();
                async move { Ok::<_, std::convert::Infallible>(fwd.handle(req, peer).await) }
            })
        };
        let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc).into_owned());
        tokio::pin!(conn);
        tokio::select! {
            biased;
            () = first.notified() => {}
            _ = &mut conn => {
                // hyper's own HTTP/1 head timer (the same length, started
                // a little later) may end it first: still a head timeout.
                if Instant::now() >= self.deadline {
                    self.fwd.conns.count(Reason::HeadTimeout);
                }
                return;
            }
            () = tokio::time::sleep_until(self.deadline) => {
                self.fwd.conns.count(Reason::HeadTimeout);
                return;
            }
        }
        let _ = conn.await;
    }
}
