//! A tiny page host for browser tests of the page script, without the
//! forwarder: it serves a demo page, `kw.js`, the token endpoint exactly as
//! `keyward::token` documents it (GET a token or a challenge, POST a
//! solution), and one lookup route that admits calls with
//! `Tokens::check`, all from `keyward::token`'s own types. It counts the
//! calls it admitted and the refusals by problem type.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use keyward::token::{
    Issue, Tokens,
    codec::Level,
    pow::{Pow, Submission},
};

use crate::netns;

/// The demo page: one lookup button that calls through `keyward.fetch`.
pub const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>keyward demo</title>
<script src="/.keyward/kw.js"></script>
<style>body{font:16px system-ui,sans-serif;margin:2em;max-width:40em}li{margin:.3em 0}
.ok{color:#176f2c}.no{color:#b00020}code{background:#eee;padding:0 .3em}</style></head>
<body><h1>Postcode lookup</h1>
<p>Calls go through <code>keyward.fetch</code>, which carries a page token (minted after a proof-of-work).</p>
<form id="f"><input id="q" value="SW1A1AA"> <button>Look up</button></form>
<ul id="out"></ul>
<script>
async function lookup(q) {
  const li = document.createElement('li');
  document.getElementById('out').append(li);
  try {
    const r = await keyward.fetch('/api/lookup/' + encodeURIComponent(q));
    const j = await r.json();
    li.className = r.ok ? 'ok' : 'no';
    li.textContent = r.ok ? q + ': ' + j.result + ' (' + j.remaining + ' calls left on this token)' : q + ': ' + r.status + ' ' + j.type;
    return { status: r.status, body: j };
  } catch (e) {
    li.className = 'no'; li.textContent = q + ': ' + e.message;
    return { status: 0, body: { error: e.message } };
  }
}
document.getElementById('f').onsubmit = (e) => { e.preventDefault(); lookup(document.getElementById('q').value); };
</script></body></html>"#;

/// A page for measurements: the script without a token fetch at load.
pub const BENCH_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>kw bench</title>\
<script src=\"/.keyward/kw.js\" data-prefetch=\"false\"></script></head><body>bench</body></html>";

/// What the host saw.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Lookup calls admitted by their token.
    pub admitted: u32,
    /// Refusals by problem type.
    pub refused: BTreeMap<String, u32>,
    pub challenges: u32,
    pub minted: u32,
}

struct State {
    tokens: Tokens,
    pow: Option<Pow>,
    counts: Mutex<Counts>,
    /// Lookups still to refuse as `token-expired` whatever they carry.
    refuse: AtomicU32,
}

/// A running page host.
pub struct TokenPage {
    pub addr: SocketAddr,
    state: Arc<State>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TokenPage {
    /// Serve on `ip`:0 inside namespace `ns`; `pow` (when set) is always
    /// asked for before a token is minted.
    pub fn start(ns: &str, ip: IpAddr, tokens: Tokens, pow: Option<Pow>) -> TokenPage {
        let listener = netns::in_ns(ns, move || {
            let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind page host");
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State { tokens, pow, counts: Mutex::new(Counts::default()), refuse: AtomicU32::new(0) });
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let st = state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, peer)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req, peer.ip(), &st).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                });
            }
        });
        TokenPage { addr, state, rt: Some(rt) }
    }

    /// The page's origin.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Refuse the next `n` lookups as `token-expired` (to exercise the
    /// script's refresh-and-retry-once).
    pub fn refuse_next(&self, n: u32) {
        self.state.refuse.store(n, Ordering::SeqCst);
    }

    /// What it saw so far.
    pub fn counts(&self) -> Counts {
        self.state.counts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TokenPage {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", ctype.parse().expect("content type"));
    r.headers_mut().insert("cache-control", "no-store".parse().expect("cache control"));
    r
}

fn json(v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/json", serde_json::to_vec(v).unwrap_or_default())
}

fn problem(st: &State, ty: &str, detail: &str, retry_after: Option<u64>) -> Response<Full<Bytes>> {
    *st.counts.lock().unwrap_or_else(|p| p.into_inner()).refused.entry(ty.to_owned()).or_default() += 1;
    let body = serde_json::json!({ "type": format!("urn:keyward:problem:{ty}"), "title": ty, "status": 403, "detail": detail });
    let mut r = reply(StatusCode::FORBIDDEN, "application/problem+json", body.to_string());
    if let Some(s) = retry_after {
        r.headers_mut().insert("retry-after", s.into());
    }
    r
}

fn bump(st: &State, f: impl FnOnce(&mut Counts)) {
    f(&mut st.counts.lock().unwrap_or_else(|p| p.into_inner()));
}

async fn answer(req: Request<Incoming>, peer: IpAddr, st: &State) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Same-origin GETs carry no Origin header; the page's origin is then its Host.
    let origin = parts.headers.get("origin").and_then(|v| v.to_str().ok()).map(str::to_owned).unwrap_or_else(|| {
        format!("http://{}", parts.headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or_default())
    });
    let path = parts.uri.path();
    match (parts.method.as_str(), path) {
        ("GET", "/") => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        ("GET", "/bench") => reply(StatusCode::OK, "text/html; charset=utf-8", BENCH_PAGE),
        ("GET", "/.keyward/kw.js") => reply(StatusCode::OK, "application/javascript", keyward::token::SCRIPT),
        ("GET", "/.keyward/token") => match &st.pow {
            None => {
                bump(st, |c| c.minted += 1);
                json(&Issue::Token(st.tokens.mint(&origin, peer, Level::Plain, None)))
            }
            Some(pow) => match pow.challenge(&origin, peer) {
                Ok(challenge) => {
                    bump(st, |c| c.challenges += 1);
                    json(&Issue::Challenge { challenge })
                }
                Err(e) => problem(st, e.problem_type(), &e.to_string(), None),
            },
        },
        ("POST", "/.keyward/token") => {
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let Some(pow) = &st.pow else { return problem(st, "challenge-invalid", "no challenge was asked", None) };
            match Submission::from_json(&body).and_then(|s| pow.redeem(&s, &origin, peer)) {
                Ok(_) => {
                    bump(st, |c| c.minted += 1);
                    let max = pow.config().solved_max_calls.map(|n| n.get());
                    json(&Issue::solved(st.tokens.mint(&origin, peer, Level::Pow, max)))
                }
                Err(e) => problem(st, e.problem_type(), &e.to_string(), None),
            }
        }
        ("GET", p) if p.starts_with("/api/lookup/") => {
            if st.refuse.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return problem(st, "token-expired", "refused by the test", None);
            }
            let token = keyward::token::token_from_request(&parts.headers, parts.uri.query());
            match st.tokens.check(token.as_deref(), &origin, peer) {
                Ok(a) => {
                    bump(st, |c| c.admitted += 1);
                    let q = p.trim_start_matches("/api/lookup/");
                    json(&serde_json::json!({ "query": q, "result": "found", "remaining": a.remaining }))
                }
                Err(e) => problem(st, e.problem_type(), &e.to_string(), e.retry_after()),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found"),
    }
}
