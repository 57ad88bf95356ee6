//! A `redis-server` of the test's own (Debian's package, installed by
//! `cargo xtask setup`), listening on a Unix socket only: a socket in the
//! file system is reachable from every network namespace, so daemons in
//! several test namespaces share it with no routing. No persistence; the
//! server is stopped by pid and its directory removed on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct RedisServer {
    child: Child,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("kwt{}-{n}-redis", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis dir");
        let socket = dir.join("redis.sock");
        let child = spawn(&dir, &socket);
        let r = RedisServer { child, dir, socket };
        r.await_listening();
        r
    }

    fn await_listening(&self) {
        let up =
            crate::wait_for(Duration::from_secs(10), || std::os::unix::net::UnixStream::connect(&self.socket).ok());
        assert!(up.is_some(), "redis-server did not listen on {}", self.socket.display());
    }

    /// Kill the server (SIGKILL: with persistence off, everything it held is
    /// lost) and start a new one on the same socket.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = spawn(&self.dir, &self.socket);
        self.await_listening();
    }

    /// The URL daemons are given.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Pause (SIGSTOP) or resume (SIGCONT) the server.
    pub fn pause(&self, paused: bool) {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        kill(pid, if paused { Signal::SIGSTOP } else { Signal::SIGCONT }).expect("signal redis-server");
    }
}

fn spawn(dir: &std::path::Path, socket: &std::path::Path) -> Child {
    Command::new("redis-server")
        .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocketperm", "700"])
        .arg("--unixsocket")
        .arg(socket)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (Debian's package; `cargo xtask setup` installs it)")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.pause(false);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
