//! Log lines on stderr, as text or JSON (`--log-format`, `[log] format`).
//! Under journald (stderr is the stream `JOURNAL_STREAM` names) each line
//! starts with its syslog priority (`<3>` error, `<4>` warn, `<6>` info,
//! `<7>` debug), which journald strips and records, so `journalctl -p
//! warning` finds the warnings; timestamps and colour are then left out.

use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

use crate::config::LogFormat;

/// Install the global subscriber: `RUST_LOG`-style filtering (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = under_journald();
    let ansi = std::io::stderr().is_terminal() && !journal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let base = tracing_subscriber::fmt::format().with_ansi(ansi);
    match (format, journal) {
        (LogFormat::Text, true) => builder.event_format(Priority { inner: base.without_time(), on: true }).init(),
        (LogFormat::Text, false) => builder.init(),
        (LogFormat::Json, _) => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(Priority { inner: base.json(), on: journal })
            .init(),
    }
}

/// True when stderr is the journal stream systemd connected us to (the
/// variable alone is inherited by children whose stderr may be elsewhere).
fn under_journald() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else { return false };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else { return false };
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

/// The syslog priority of a level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// An event format whose lines start with `<priority>` when `on`.
pub struct Priority<F> {
    pub inner: F,
    pub on: bool,
}

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        if self.on {
            write!(w, "<{}>", priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, w, event)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(b: &Buf) -> String {
        String::from_utf8(b.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn journald_lines_carry_their_priority() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .event_format(Priority {
                inner: tracing_subscriber::fmt::format().with_ansi(false).without_time(),
                on: true,
            })
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(port = 80, "not guarded");
            tracing::info!("up");
            tracing::error!("down");
        });
        let out = text(&buf);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("<4> WARN") && lines[0].contains("not guarded port=80"), "{out}");
        assert!(lines[1].starts_with("<6> INFO"), "{out}");
        assert!(lines[2].starts_with("<3>ERROR"), "{out}");
    }

    #[test]
    fn json_lines_are_objects_with_level_and_fields() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(Priority { inner: tracing_subscriber::fmt::format().json(), on: false })
            .finish();
        tracing::subscriber::with_default(sub, || tracing::warn!(port = 80, "not guarded"));
        let v: serde_json::Value = serde_json::from_str(text(&buf).trim()).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["fields"]["message"], "not guarded");
        assert_eq!(v["fields"]["port"], 80);
    }
}
