//! The page snippet against the real daemon, in a real browser: headless
//! Chromium in the client namespace loads a site's page (served from the
//! allowed origin in the server namespace) that includes keyward's
//! `/.keyward/kw.js` and looks up postcodes through `keyward.fetch`, with
//! proof-of-work required for every token. The stand-in API must see exactly
//! those calls; the same page from a foreign origin gets nothing.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use keyward_tests::{
    browser::{self, Chromium},
    daemon::{Daemon, PORT},
    fwd::{XDP_OPEN, config},
    netns::{self, SERVER_V4, Topology},
    privileged,
    upstream::Upstream,
};
use serde_json::Value;

/// The site owner's page: one `<script>` tag and `keyward.fetch`.
fn page_html() -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Find your address</title>
<script src="http://{SERVER_V4}:{PORT}/.keyward/kw.js"></script>
<style>body{{font:16px sans-serif;margin:2em}} li{{margin:.3em 0}}</style></head>
<body><h1>Find your address</h1><p>Lookups go through keyward, which holds the API key.</p><ul id="out"></ul>
<script>
async function lookup(pc) {{
  const r = await keyward.fetch('/postcodes/' + pc);
  const body = await r.json();
  const li = document.createElement('li');
  li.textContent = pc + ': ' + r.status + ' ' + JSON.stringify(body);
  document.getElementById('out').appendChild(li);
  return {{ status: r.status, body }};
}}
</script></body></html>"#
    )
}

/// A static page host in `ns` on `SERVER_V4:0`, stopped on drop.
struct Site {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Site {
    fn start(ns: &str) -> Site {
        let listener = netns::in_ns(ns, || TcpListener::bind((SERVER_V4, 0)).expect("bind site"));
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let html = page_html();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((mut c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    html.len()
                );
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(html.as_bytes());
            }
        });
        Site { addr, stop, thread: Some(thread) }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct KeyFile(PathBuf);

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_page_with_the_snippet_looks_up_through_keyward_and_a_foreign_page_gets_nothing() {
    if !privileged() {
        return;
    }
    assert!(browser::executable().is_some(), "chromium is not installed: run `cargo xtask setup`");
    use std::os::unix::fs::PermissionsExt as _;
    let t = Topology::new();
    let up = Upstream::start(&t.server_ns);
    let site = Site::start(&t.server_ns);
    let foreign = Site::start(&t.server_ns);
    let keys = KeyFile(std::env::temp_dir().join(format!("kwt-page-{}.keys", std::process::id())));
    std::fs::write(&keys.0, "k1 a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90\n").unwrap();
    std::fs::set_permissions(&keys.0, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = config(&up, "", "")
        .replace(
            "allowed_origins = [\"https://www.example.com\", \"example.org\"]",
            &format!("allowed_origins = [\"{}\"]", site.origin()),
        )
        .replace(
            "require_origin = true\n",
            "require_origin = true\nrequire_token = true\npow = { mode = \"always\" }\n",
        )
        + &format!("\n[access.token]\nkeys_file = \"{}\"\nmax_calls = 20\n", keys.0.display());
    let d = Daemon::start_with(&t, XDP_OPEN, &text);

    let keyward = format!("http://{SERVER_V4}:{PORT}");
    let (origin, foreign_origin) = (site.origin(), foreign.origin());
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/keyward-page.png");
    let ns = t.client_ns.clone();
    let (ok, refused): (Vec<Value>, Value) = browser::block_on_in(Some(&t.client_ns), move || async move {
        let secure = format!("--unsafely-treat-insecure-origin-as-secure={keyward},{origin},{foreign_origin}");
        let c = Chromium::launch(Some(&ns), &[&secure]).await?;
        let page = c.open(&format!("{origin}/")).await?;
        let ok = page
            .eval(
                "async () => { await keyward.ready; const out = [];
                 for (const pc of ['SW1A1AA', 'EC1A1BB', 'W1A0AX']) out.push(await lookup(pc));
                 return out; }",
            )
            .await?;
        page.screenshot(&shot).await?;
        let copy = c.open(&format!("{foreign_origin}/")).await?;
        let refused = copy
            .eval(
                "async () => { try { await keyward.ready; return await lookup('SW1A1AA'); }
                 catch (e) { return { error: String(e) }; } }",
            )
            .await?;
        anyhow::Ok((ok, refused))
    })
    .expect("browser run");
    let statuses: Vec<_> = ok.iter().map(|r| r["status"].as_u64()).collect();
    assert_eq!(statuses, [Some(200); 3], "{ok:#?}\n{}", d.log());
    let calls = up.calls();
    assert_eq!(calls.len(), 3, "the API saw exactly the page's lookups");
    assert!(refused.get("error").is_some() || refused["status"] == 403, "a foreign page was served: {refused}");
    assert_eq!(up.calls().len(), 3, "the foreign page reached the API");
    let st = d.status().forwarder.expect("forwarder");
    assert_eq!(st.outcome("challenge_issued"), st.outcome("token_minted"), "every token was paid for");
    assert!(st.outcome("token_minted") >= 1);
    println!(
        "screenshot: {}",
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/keyward-page.png").display()
    );
}
