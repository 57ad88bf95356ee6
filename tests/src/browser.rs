//! A real browser for tests: Debian's headless Chromium, started in a network
//! namespace the test created, driven over the DevTools protocol by
//! `chromiumoxide`. It opens pages, evaluates JavaScript (awaiting
//! promises), throttles the CPU (`Emulation.setCPUThrottlingRate`) and
//! takes screenshots. Each browser gets a fresh profile directory; dropping
//! it ends the browser's process group (the one it was started in) and
//! removes the profile, also when the test panicked.
//!
//! The DevTools socket listens on the namespace's loopback, so the driving
//! code must run on a thread inside that namespace: [`block_on_in`] runs a
//! future on a current-thread runtime there.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use chromiumoxide::{
    Browser,
    cdp::browser_protocol::{emulation::SetCpuThrottlingRateParams, page::CaptureScreenshotFormat},
    handler::HandlerConfig,
    page::ScreenshotParams,
};
use futures_util::StreamExt as _;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The flags every test browser gets: headless, no sandbox (tests run as
/// root), nothing that reaches outside the test's network.
pub const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
];

/// The Chromium binary, if installed (`cargo xtask setup` installs it).
pub fn executable() -> Option<PathBuf> {
    // The Debian wrapper script only adds flags we set ourselves.
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Run the future made by `f` to completion on a fresh thread that has
/// entered network namespace `ns` (or stays in this one), on a
/// current-thread runtime, so every socket it opens lives in `ns`.
pub fn block_on_in<T, F>(ns: Option<&str>, f: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    let run = move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(f())
    };
    match ns {
        Some(ns) => crate::netns::in_ns(ns, run),
        None => std::thread::spawn(run).join().expect("browser thread panicked"),
    }
}

/// The network namespace of the calling thread, as an inode number.
fn thread_netns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net").ok().map(|m| m.ino())
}

/// A running headless Chromium and its DevTools connection.
pub struct Chromium {
    child: Child,
    profile: PathBuf,
    browser: Browser,
    handler: tokio::task::JoinHandle<()>,
}

/// A tab.
pub struct Page(pub chromiumoxide::Page);

impl Chromium {
    /// Start Chromium in namespace `ns` with [`FLAGS`] and `extra` flags,
    /// and connect to it. Call from a thread in `ns` ([`block_on_in`]).
    pub async fn launch(ns: Option<&str>, extra: &[&str]) -> anyhow::Result<Chromium> {
        let exe = executable().context("chromium is not installed; run `cargo xtask setup`")?;
        if let Some(ns) = ns {
            use std::os::unix::fs::MetadataExt as _;
            let want = std::fs::metadata(format!("/run/netns/{ns}")).with_context(|| format!("namespace {ns}"))?;
            if thread_netns() != Some(want.ino()) {
                bail!("Chromium::launch({ns}) must run on a thread inside {ns} (see block_on_in)");
            }
        }
        let profile = std::env::temp_dir().join(format!(
            "kwt{}-{}-chromium",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(FLAGS)
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that drop ends its helpers too.
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&profile);
                return Err(e).context("starting chromium");
            }
        };
        let ws = match devtools_url(&mut child) {
            Ok(ws) => ws,
            Err(e) => {
                end(&mut child, &profile);
                return Err(e);
            }
        };
        let cfg = HandlerConfig { request_timeout: Duration::from_secs(180), ..HandlerConfig::default() };
        let (browser, mut events) = match Browser::connect_with_config(ws, cfg).await {
            Ok(b) => b,
            Err(e) => {
                end(&mut child, &profile);
                return Err(e).context("connecting to chromium's DevTools");
            }
        };
        let handler = tokio::spawn(async move { while events.next().await.is_some() {} });
        Ok(Chromium { child, profile, browser, handler })
    }

    /// The browser process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open `url` in a new tab and wait for it to load.
    pub async fn open(&self, url: &str) -> anyhow::Result<Page> {
        let p = self.browser.new_page(url).await.with_context(|| format!("opening {url}"))?;
        p.wait_for_navigation().await?;
        Ok(Page(p))
    }
}

impl Page {
    /// Call the JavaScript function `function` (e.g. `async () => 1 + 1`) in
    /// the page, await its promise and deserialize the result.
    pub async fn eval<T: serde::de::DeserializeOwned>(&self, function: &str) -> anyhow::Result<T> {
        let r = self.0.evaluate_function(function).await.with_context(|| format!("evaluating {function}"))?;
        r.into_value().context("the result does not deserialize")
    }

    /// Slow the page's CPU down by `rate` (1 = no throttling).
    pub async fn throttle(&self, rate: f64) -> anyhow::Result<()> {
        self.0.execute(SetCpuThrottlingRateParams::new(rate)).await?;
        Ok(())
    }

    /// Save a PNG screenshot of the whole page to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let params = ScreenshotParams::builder().format(CaptureScreenshotFormat::Png).full_page(true).build();
        self.0.save_screenshot(params, path).await?;
        Ok(())
    }
}

/// Read Chromium's stderr until it names its DevTools websocket (at most
/// 30 s), then keep draining it on a thread so the pipe never fills.
fn devtools_url(child: &mut Child) -> anyhow::Result<String> {
    let stderr = child.stderr.take().context("chromium stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                // Nobody listens any more: keep draining.
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(ws) = line.split_whitespace().find(|w| w.starts_with("ws://")) {
                    return Ok(ws.to_owned());
                }
                seen.push(line);
            }
            Err(_) => break,
        }
    }
    bail!("chromium did not report its DevTools address within 30 s; it said:\n{}", seen.join("\n"))
}

/// End the process group `child` leads (TERM, then KILL after 5 s) and remove the profile.
fn end(child: &mut Child, profile: &Path) {
    use nix::{sys::signal, unistd::Pid};
    let pgid = Pid::from_raw(-i32::try_from(child.id()).unwrap_or(i32::MAX));
    let _ = signal::kill(pgid, signal::Signal::SIGTERM);
    let done = crate::wait_for(Duration::from_secs(5), || child.try_wait().ok().flatten());
    if done.is_none() {
        let _ = signal::kill(pgid, signal::Signal::SIGKILL);
        let _ = child.wait();
    }
    // Helpers that outlived the browser (same group).
    let _ = signal::kill(pgid, signal::Signal::SIGKILL);
    let _ = std::fs::remove_dir_all(profile);
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.handler.abort();
        end(&mut self.child, &self.profile);
    }
}
