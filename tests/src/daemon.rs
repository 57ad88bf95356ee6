//! The real `keyward` binary, run as a daemon inside a topology's server
//! namespace (`nsenter --net`, so pins land in the host's bpffs where the
//! test can check them). Each daemon gets its own directory for config,
//! store, socket and log; dropping the handle stops the process it started
//! (by pid) and removes the directory.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use keyward::admin::{self, Request, Status};

use crate::{netns::Topology, wait_for};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The guarded port in every test config.
pub const PORT: u16 = 8443;

/// The upstream key the tests give keyward: it must never come back out.
pub const KEY: &str = "sk_test_KW9f3a+b/c=Zq71";

/// Path of the `keyward` binary built next to the test executables
/// (`cargo xtask test` builds it first), or `$KEYWARD_BIN`.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let b = dir.join("keyward");
    assert!(b.exists(), "{} missing: run `cargo build -p keyward` (cargo xtask test does)", b.display());
    b
}

/// A daemon and its directory.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub ns: String,
    pub iface: String,
}

impl Daemon {
    /// Write a config for `t` (`xdp_extra` lines go into `[xdp]`) and start.
    /// Rates default to 10 pps / burst 20 per source (unless `xdp_extra`
    /// starts with `rate_pps`) and a generous aggregate.
    pub fn start(t: &Topology, xdp_extra: &str) -> Daemon {
        let d = Daemon::prepare(t, xdp_extra);
        d.spawned()
    }

    /// Write the config but do not start (for tests of refusals).
    pub fn prepare(t: &Topology, xdp_extra: &str) -> Daemon {
        Daemon::prepare_with(t, xdp_extra, "")
    }

    /// Start with more sections (`[listen]`, `[upstream]`, `[[route]]`,
    /// `[access]`, `[limits]`) appended to the config. The upstream key is
    /// [`KEY`], given to the daemon in `$KEYWARD_TEST_KEY`.
    pub fn start_with(t: &Topology, xdp_extra: &str, rest: &str) -> Daemon {
        Daemon::prepare_with(t, xdp_extra, rest).spawned()
    }

    /// Write such a config without starting.
    pub fn prepare_with(t: &Topology, xdp_extra: &str, rest: &str) -> Daemon {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("keyward-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let socket = dir.join("admin.sock");
        let config = dir.join("keyward.toml");
        let aggregate = if xdp_extra.contains("aggregate") {
            ""
        } else {
            "aggregate = { v4_prefix = 24, v6_prefix = 48, rate_pps = 100000, burst = 100000 }\n"
        };
        // Test rates unless the caller gives its own first.
        let rates = if xdp_extra.starts_with("rate_pps") { "" } else { "rate_pps = 10\nburst = 20\n" };
        let text = format!(
            "[xdp]\ninterface = \"{iface}\"\nports = [{PORT}]\n{rates}table_size = 4096\n{aggregate}{xdp_extra}\n\n[store]\npath = \"{store}\"\n\n[admin]\nsocket = \"{sock}\"\n\n{rest}\n",
            iface = t.server_if,
            store = dir.join("store").display(),
            sock = socket.display(),
        );
        std::fs::write(&config, text).expect("write config");
        Daemon { child: None, dir, config, socket, ns: t.server_ns.clone(), iface: t.server_if.clone() }
    }

    fn spawned(mut self) -> Daemon {
        self.spawn();
        self
    }

    /// Start the process and wait until it answers on its socket.
    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// The daemon's log file (its stderr), created if need be: a test can
    /// stat it before the start (e.g. for `JOURNAL_STREAM`).
    pub fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).expect("log file")
    }

    /// [`Daemon::spawn`] with extra environment variables.
    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "already running");
        let log = self.log_file();
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("spawning keyward");
        self.child = Some(child);
        let ready = wait_for(Duration::from_secs(30), || {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("keyward exited early ({st}):\n{}", self.log());
            }
            admin::call(&self.socket, &Request::Status).ok()
        });
        assert!(ready.is_some(), "keyward did not come up:\n{}", self.log());
    }

    /// `nsenter --net=<server ns> keyward run -c <config>`.
    pub fn command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(bin())
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("KEYWARD_TEST_KEY", KEY);
        c
    }

    /// Run `keyward --socket <ours> <args>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin()).arg("--socket").arg(&self.socket).args(args).output().expect("running keyward CLI")
    }

    /// Run a CLI verb that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "keyward {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `status --json`, decoded.
    pub fn status(&self) -> Status {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status json")
    }

    /// `status --json` once the daemon has sampled its per-source table
    /// (`tracked_sources`, `top_sources`, and the metric of the same name)
    /// after this call: what was sent before the call is in the sample.
    pub fn status_sampled(&self) -> Status {
        let since =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
        let st =
            wait_for(Duration::from_secs(15), || Some(self.status()).filter(|s| s.sources_sampled_unix_ms > since));
        st.unwrap_or_else(|| panic!("no sample of the source table within 15s:\n{}", self.log()))
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The pin directory in bpffs (named per interface and namespace).
    pub fn pin_dir(&self) -> Option<PathBuf> {
        let root = Path::new(keyward::paths::PIN_ROOT);
        std::fs::read_dir(root).ok()?.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == self.iface || n.starts_with(&format!("{}@", self.iface)))
        })
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("not running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let st = wait_for(Duration::from_secs(15), || child.try_wait().ok().flatten());
        match st {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("keyward did not stop within 15s of SIGTERM:\n{}", self.log());
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if wait_for(Duration::from_secs(10), || c.try_wait().ok().flatten()).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("--- keyward log ({}) ---\n{}", self.dir.display(), self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
