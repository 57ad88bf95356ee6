//! The `keyward` binary as an operator meets it, without root: `check` on
//! the shipped example and on configs with traps in them, exit codes
//! (1 refused, 2 unreachable, 64 usage), one-line errors, a reader that
//! goes away (`keyward check | head -1`), and the man page and completions.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/keyward.example.toml");

/// A unique scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("keyward-cli-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn keyward(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("KEYWARD_UPSTREAM_KEY").output().unwrap()
}

fn check(path: &Path) -> Output {
    keyward(&["check", "-c", path.to_str().unwrap()])
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_shipped_example_checks() {
    let o = check(Path::new(EXAMPLE));
    assert!(o.status.success(), "{}", err(&o));
    let text = out(&o);
    assert!(text.contains("valid. Effective configuration"), "{text}");
    assert!(text.contains("# warning: ") && text.contains("KEYWARD_UPSTREAM_KEY"), "{text}");
    assert!(!text.contains("not in [xdp] ports"), "the example's listen port is guarded: {text}");
}

#[test]
fn check_warns_about_an_unguarded_listen_port_and_reports_a_bad_certificate_at_its_line() {
    let s = Scratch::new("traps");
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    let unguarded = s.file("unguarded.toml", &example.replace("0.0.0.0:443", "0.0.0.0:8443"));
    let o = check(&unguarded);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("# warning: [listen] addr port 8443 is not in [xdp] ports"), "{}", out(&o));

    let cert = s.0.join("missing-cert.pem");
    let bad = example.replace(
        "# tls_cert = \"/etc/keyward/cert.pem\"\n# tls_key = \"/etc/keyward/key.pem\"",
        &format!("tls_cert = \"{}\"\ntls_key = \"/nonexistent/key.pem\"", cert.display()),
    );
    assert_ne!(bad, example);
    let line = bad.lines().position(|l| l.starts_with("tls_cert =")).unwrap() + 1;
    let o = check(&s.file("bad-cert.toml", &bad));
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let e = err(&o);
    assert!(e.contains(&format!("bad-cert.toml:{line}:12: [listen] tls_cert {}", cert.display())), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");

    let open = example.replace("allowed_origins = [\"https://www.example.com\", \"example.org\"]", "");
    let o = check(&s.file("open.toml", &open));
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("allowed_origins is empty"), "{}", err(&o));
}

#[test]
fn a_missing_config_is_reported_once() {
    for verb in ["run", "check"] {
        let o = keyward(&[verb, "-c", "/nonexistent/missing.toml"]);
        assert_eq!(o.status.code(), Some(1), "{verb}: {}", err(&o));
        let e = err(&o);
        assert_eq!(e.matches("No such file or directory").count(), 1, "{verb}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{verb}: {e}");
        assert!(e.starts_with("keyward: /nonexistent/missing.toml: cannot read"), "{verb}: {e}");
    }
}

#[test]
fn exit_codes_tell_usage_refusal_and_unreachable_apart() {
    let s = Scratch::new("codes");
    let sock = s.0.join("nobody.sock");
    let sock = sock.to_str().unwrap();
    // Usage errors: clap's and ours (a CIDR that is not one), both before any daemon is asked.
    assert_eq!(keyward(&["frobnicate"]).status.code(), Some(64));
    assert_eq!(keyward(&["top", "-n", "many"]).status.code(), Some(64));
    let o = keyward(&["--socket", sock, "deny", "add", "10.1.2.3/33"]);
    assert_eq!(o.status.code(), Some(64), "{}", err(&o));
    let o = keyward(&["--socket", sock, "allow", "add", "10.0.0.0/8", "--for", "1h"]);
    assert_eq!(o.status.code(), Some(64), "{}", err(&o));
    // Help and version are not errors.
    assert_eq!(keyward(&["--help"]).status.code(), Some(0));
    assert_eq!(keyward(&["--version"]).status.code(), Some(0));
    // No daemon: 2, one line, with where to look.
    let o = keyward(&["--socket", sock, "status"]);
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(e.contains("cannot reach the keyward daemon") && e.contains("systemctl status keyward"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn a_reader_that_goes_away_ends_the_verb_quietly() {
    // The pipe's read end is closed before keyward writes a byte: every
    // write meets EPIPE, as with `keyward check | head -0`.
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let o = Command::new(BIN)
        .args(["check", "-c", EXAMPLE])
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let e = err(&o);
    assert!(!e.contains("panicked"), "{e}");
    assert!(o.status.signal() == Some(libc::SIGPIPE) || o.status.success(), "ended by {:?}: {e}", o.status);
}

#[test]
fn man_page_and_completions_come_from_the_command_line() {
    let o = keyward(&["manpage"]);
    assert!(o.status.success(), "{}", err(&o));
    let man = out(&o);
    assert!(man.starts_with(".ie") || man.contains(".TH keyward 1"), "{man}");
    assert!(man.contains("deny") && man.contains("reload"), "{man}");
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef keyward"), ("fish", "complete -c keyward")] {
        let o = keyward(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", err(&o));
        assert!(out(&o).contains(marker), "{shell}: {}", out(&o));
        assert!(out(&o).contains("deny"), "{shell}");
    }
    assert_eq!(keyward(&["completions", "tcsh"]).status.code(), Some(64));
}
