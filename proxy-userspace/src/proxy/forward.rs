//! The upstream side: one pooled keep-alive client (HTTP/1.1 and HTTP/2,
//! HTTPS through rustls with the system roots plus an optional extra CA file
//! for private upstreams), a fixed `base_url` that only the config chooses,
//! a timeout over the whole exchange, and a bounded read of the answer.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject as _},
};

use crate::config;

/// Largest upstream answer read (and so cached and scrubbed) in full.
pub const MAX_ANSWER: usize = 8 << 20;

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream.base_url `{0}` must be an absolute http:// or https:// URL without query")]
    BaseUrl(String),
    #[error("upstream.ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Why a call failed, and whether the upstream may have received (and
/// billed) the request.
#[derive(Debug)]
pub enum Failure {
    /// No answer in time; the request may have been received.
    Timeout,
    /// The connection could not be made: the request never left.
    NotSent(String),
    /// The connection broke after the request was sent, or the answer was
    /// unreadable: it may have been received.
    Unavailable(String),
}

impl Failure {
    /// Whether the upstream may have billed the call.
    pub fn maybe_billed(&self) -> bool {
        !matches!(self, Failure::NotSent(_))
    }
}

/// An answer read in full.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The upstream client and its fixed base.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upstream({}://{}{})", self.scheme, self.authority, self.prefix)
    }
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, UpstreamError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(path) = ca_file {
        let err = |message: String| UpstreamError::CaFile { path: path.display().to_string(), message };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate in it".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(roots)
}

impl Upstream {
    /// Build from `[upstream]`.
    pub fn new(u: &config::Upstream) -> Result<Upstream, UpstreamError> {
        let bad = || UpstreamError::BaseUrl(u.base_url.clone());
        let uri: Uri = u.base_url.parse().map_err(|_| bad())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad)?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(bad());
        }
        let authority = uri.authority().cloned().ok_or_else(bad)?;
        if uri.query().is_some() || authority.as_str().contains('@') {
            return Err(bad());
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamError::Tls(e.to_string()))?
            .with_root_certificates(roots(u.ca_file.as_deref())?)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(https);
        Ok(Upstream { client, scheme, authority, prefix, timeout: u.timeout.0 })
    }

    /// The absolute URI of `path` (already encoded) and `query` under the base.
    pub fn uri(&self, path: &str, query: &str) -> Result<Uri, Failure> {
        let pq =
            if query.is_empty() { format!("{}{path}", self.prefix) } else { format!("{}{path}?{query}", self.prefix) };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| Failure::NotSent(format!("building the upstream URI: {e}")))
    }

    /// Send and read the whole answer, within the timeout.
    pub async fn call(&self, req: Request<Full<Bytes>>) -> Result<Answer, Failure> {
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() { Failure::NotSent(error_chain(&e)) } else { Failure::Unavailable(error_chain(&e)) }
            })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| Failure::Unavailable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(Answer { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(self.timeout, exchange).await.unwrap_or(Err(Failure::Timeout))
    }

    /// POST a JSON document (alert webhooks), within the timeout.
    pub async fn post_json(&self, url: &Uri, doc: &serde_json::Value) -> Result<StatusCode, Failure> {
        let req = Request::post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("keyward/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(doc.to_string())))
            .map_err(|e| Failure::NotSent(e.to_string()))?;
        let c = self.client.clone();
        match tokio::time::timeout(self.timeout, c.request(req)).await {
            Ok(Ok(r)) => Ok(r.status()),
            Ok(Err(e)) => Err(Failure::Unavailable(error_chain(&e))),
            Err(_) => Err(Failure::Timeout),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Headers never passed back to the client.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
        header::TE,
        header::PROXY_AUTHENTICATE,
        header::CONTENT_LENGTH,
        header::SET_COOKIE,
        header::ALT_SVC,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
}
