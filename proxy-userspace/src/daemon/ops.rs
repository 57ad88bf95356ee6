//! What the running daemon tells its supervisor and its probes: systemd's
//! notify protocol (READY=1 once XDP is attached and every listener bound,
//! a one-line STATUS=, STOPPING=1, and WATCHDOG=1 pings from the main loop
//! when the unit sets `WatchdogSec=`), the flags behind `/readyz`, and the
//! reload counters. Outside systemd (`NOTIFY_SOCKET` unset) notifying is a
//! no-op.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use sd_notify::NotifyState;
use tracing::{debug, warn};

use super::state::State;
use crate::metrics::{Readiness, Reloads};

/// The daemon's side of supervision.
#[derive(Debug, Default)]
pub struct Ops {
    pub ready: Arc<Readiness>,
    pub reloads: Reloads,
}

impl Ops {
    /// Tell systemd, logging (not failing) when it cannot be told.
    fn notify(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }

    /// Everything is up: READY=1 with a summary.
    pub fn ready(&self, summary: &str) {
        self.ready.xdp_attached.store(true, Ordering::Relaxed);
        self.ready.listening.store(true, Ordering::Relaxed);
        self.notify(&[NotifyState::Ready, NotifyState::Status(summary)]);
        debug!(summary, "told systemd we are ready");
    }

    /// A new STATUS= line.
    pub fn status(&self, line: &str) {
        self.notify(&[NotifyState::Status(line)]);
    }

    /// Shutting down: no longer ready.
    pub fn stopping(&self) {
        self.ready.listening.store(false, Ordering::Relaxed);
        self.notify(&[NotifyState::Stopping, NotifyState::Status("stopping: draining requests, detaching XDP")]);
    }

    /// How often to ping the watchdog (half its timeout), when enabled.
    pub fn watchdog_period(&self) -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(100)))
    }

    /// WATCHDOG=1: the main loop is turning.
    pub fn ping(&self) {
        self.notify(&[NotifyState::Watchdog]);
    }
}

impl State {
    /// One line for STATUS= and the log: what is attached and served.
    pub fn summary(&self) -> String {
        let x = self.config.xdp();
        let ports: Vec<String> = x.ports.iter().map(|p| p.to_string()).collect();
        let xdp = match self.dp.attached() {
            Some((iface, mode)) => format!("XDP on {iface} ({}) guarding tcp/{}", mode.as_str(), ports.join(",")),
            None => "XDP not attached".to_owned(),
        };
        let fwd = match (&self.forwarder, &self.config.listen) {
            (Some(f), Some(l)) => {
                let (spent, _) = f.limiter().spent(self.clock.unix_secs() as i64);
                let spent = crate::proxy::limit::format_amount(spent);
                let budget = crate::proxy::limit::format_amount(f.limiter().limits().budget);
                format!("; forwarder on {} ({spent} of {budget} {} spent today)", l.addr, f.currency())
            }
            _ => String::new(),
        };
        format!("{xdp}{fwd}")
    }
}
