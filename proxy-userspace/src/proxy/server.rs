//! The forwarder's accept loop: HTTP/1.1 and HTTP/2 (hyper-util's auto
//! builder), optional TLS, a header-read timeout, back-off on accept
//! errors, and a bounded graceful drain when asked to stop.

use std::{sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tracing::warn;

use super::Forwarder;

/// How long a client may take to send a request head, or a TLS handshake.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(30));
    let builder = Arc::new(builder);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let fwd = fwd.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let fwd = fwd.clone();
                    async move { Ok::<_, std::convert::Infallible>(fwd.handle(req, peer).await) }
                });
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            let Ok(Ok(s)) = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await else {
                                return;
                            };
                            let conn = builder.serve_connection(TokioIo::new(s), svc).into_owned();
                            let _ = watcher.watch(conn).await;
                        }
                        None => {
                            let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                            let _ = watcher.watch(conn).await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!("drain timed out; closing remaining connections");
    }
}
