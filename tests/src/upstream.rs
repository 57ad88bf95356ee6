//! The stand-in for the paid third-party API: a small HTTP (or HTTPS, with a
//! CA made for the test) server in the server namespace's loopback, which
//! records every request it receives. Paths under its base `/v1`:
//! - `/postcodes/{x}`: 200 with a JSON body naming `x`;
//! - `/echo/{x}`: 400 whose body and `x-echo` header repeat the request
//!   line, key included, as some real APIs do in their errors;
//! - `/fail/{x}`: 500 (not billable under `charge_on = "2xx"`);
//! - `/slow/{x}`: answers after 3 s (for timeouts);
//! - `/hook`: records alert webhook posts, answers 204;
//! - `/hostile/{form}`: 200 echoing the key it was given in one of the
//!   forms an attacker would try to get it out in (see [`hostile`]).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use crate::netns;

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A running stand-in.
pub struct Upstream {
    pub addr: SocketAddr,
    /// PEM of the CA that signed its certificate (HTTPS only).
    pub ca_pem: Option<String>,
    seen: Arc<Mutex<Vec<Seen>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Upstream {
    /// Plain HTTP on 127.0.0.1 inside `ns`.
    pub fn start(ns: &str) -> Upstream {
        Upstream::spawn(ns, false)
    }

    /// HTTPS with a fresh test CA, certificate for `localhost` and 127.0.0.1.
    pub fn start_tls(ns: &str) -> Upstream {
        Upstream::spawn(ns, true)
    }

    fn spawn(ns: &str, tls: bool) -> Upstream {
        let listener = netns::in_ns(ns, || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind stand-in");
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let addr = listener.local_addr().expect("addr");
        let (acceptor, ca_pem) = if tls {
            let (a, pem) = tls_acceptor();
            (Some(a), Some(pem))
        } else {
            (None, None)
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let s = s.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req, s).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Upstream { addr, ca_pem, seen, rt: Some(rt) }
    }

    /// The base URL keyward should use.
    pub fn base_url(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://localhost:{}/v1", self.addr.port()),
            None => format!("http://{}/v1", self.addr),
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests other than webhook posts.
    pub fn calls(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| !s.target.starts_with("/v1/hook")).collect()
    }

    /// Webhook posts.
    pub fn hooks(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.target.starts_with("/v1/hook")).collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn answer(req: Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let target = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let s = Seen {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    let path = parts.uri.path();
    let reply = |status: u16, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        r.headers_mut().insert("content-type", "application/json".parse().unwrap());
        r
    };
    if let Some(x) = path.strip_prefix("/v1/postcodes/") {
        return reply(200, format!("{{\"postcode\":\"{x}\",\"result\":\"ok\"}}"));
    }
    if path.starts_with("/v1/echo/") {
        let line = format!("{} {}", parts.method, target);
        let mut r = reply(400, format!("{{\"error\":\"bad request\",\"request\":\"{line}\"}}"));
        if let Ok(v) = line.parse() {
            r.headers_mut().insert("x-echo", v);
        }
        return r;
    }
    if path.starts_with("/v1/fail/") {
        return reply(500, "{\"error\":\"internal\"}".into());
    }
    if path.starts_with("/v1/slow/") {
        tokio::time::sleep(Duration::from_secs(3)).await;
        return reply(200, "{\"slow\":true}".into());
    }
    if let Some(form) = path.strip_prefix("/v1/hostile/") {
        let key = form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "api_key")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        return hostile(form, &key, &target);
    }
    if path.starts_with("/v1/hook") {
        let mut r = reply(204, String::new());
        *r.status_mut() = StatusCode::NO_CONTENT;
        return r;
    }
    reply(404, "{\"error\":\"not found\"}".into())
}

fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "keyward test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let der = rustls::pki_types::CertificateDer::from(cert.der().to_vec());
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![der], key_der)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), ca_cert.pem())
}

/// An answer carrying `key` in `form`: `gzip` (the echo gzip-compressed,
/// although keyward asked for identity), `zstd` (a coding keyward cannot
/// read), `split` (over two `x-echo` lines), `name` (in a header name,
/// form-encoded as a name allows), `base64` (standard and URL-safe, padded
/// and not, at every alignment), `upper`, `json` (every character
/// `\u`-escaped).
pub fn hostile(form: &str, key: &str, target: &str) -> Response<Full<Bytes>> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let mut r = Response::new(Full::new(Bytes::new()));
    let h = r.headers_mut();
    let body = match form {
        "gzip" | "zstd" => {
            use std::io::Write as _;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = gz.write_all(format!("{{\"request\":\"{target}\",\"key\":\"{key}\"}}").as_bytes());
            h.insert("content-encoding", form.replace("zstd", "zstd, gzip").parse().expect("coding"));
            Bytes::from(gz.finish().unwrap_or_default())
        }
        "split" => {
            let (a, b) = key.split_at(key.len() / 2);
            h.append("x-echo", a.parse().expect("half"));
            h.append("x-echo", b.parse().expect("half"));
            Bytes::from_static(b"{}")
        }
        "name" => {
            let name: String = form_urlencoded::byte_serialize(key.as_bytes()).collect();
            h.insert(
                http::HeaderName::from_bytes(format!("x-{}", name.to_ascii_lowercase()).as_bytes()).expect("name"),
                "1".parse().expect("v"),
            );
            Bytes::from_static(b"{}")
        }
        "base64" => Bytes::from(
            ["", "a", "ab"]
                .iter()
                .flat_map(|p| [STANDARD.encode(format!("{p}{key}")), URL_SAFE_NO_PAD.encode(format!("{p}{key};"))])
                .collect::<Vec<_>>()
                .join(" "),
        ),
        "upper" => Bytes::from(format!("KEY={}", key.to_uppercase())),
        "json" => Bytes::from(format!(
            "{{\"key\":\"{}\"}}",
            key.chars().map(|c| format!("\\u{:04x}", c as u32)).collect::<String>()
        )),
        _ => Bytes::from_static(b"{}"),
    };
    h.insert("content-type", "application/json".parse().expect("ctype"));
    *r.body_mut() = Full::new(body);
    r
}
