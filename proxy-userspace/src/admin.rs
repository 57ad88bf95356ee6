//! The admin protocol between the CLI verbs and the running daemon: one JSON
//! request and one JSON response per line over a Unix socket (mode 0600, so
//! only the socket's owner, normally root, drives the daemon). This module
//! owns the message types and the client side; the daemon serves them.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    dataplane::maps::{ReasonCount, SourceStat},
    store::{Entry, List},
};

/// Largest request or response line accepted.
pub const MAX_LINE: u64 = 4 << 20;

/// What a CLI verb asks of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Top { n: usize },
    ListAdd { list: List, cidr: String, for_secs: Option<u64> },
    ListRemove { list: List, cidr: String },
    ListShow { list: List },
    Reload,
    Usage { n: usize },
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok { data: serde_json::Value },
    Error { message: String },
}

/// `status --json`: a stable shape (fields are only ever added).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub interface: String,
    pub attach_mode: String,
    pub ports: Vec<u16>,
    pub rate_pps: u32,
    pub burst: u32,
    pub ipv6_prefix: u8,
    pub aggregate: AggregateStatus,
    /// Host-wide admission of new sources into the table.
    pub new_sources_pps: u32,
    pub new_sources_burst: u32,
    pub dry_run: bool,
    pub table_size: u32,
    pub tracked_sources: u64,
    pub new_sources: u64,
    pub allow_entries: usize,
    pub deny_entries: usize,
    pub counters: Vec<ReasonCount>,
    /// The three heaviest sources in the kernel table.
    #[serde(default)]
    pub top_sources: Vec<SourceStat>,
    /// The forwarder, when `[listen]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarder: Option<ForwarderStatus>,
}

/// Today's money and requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwarderStatus {
    pub listen: String,
    pub currency: String,
    /// Amounts as exact decimal strings.
    pub spent: String,
    pub budget: String,
    pub spent_micros: u64,
    pub budget_micros: u64,
    /// Spend as last written to the store (a crash loses at most the difference).
    pub saved_micros: u64,
    pub reset_unix: i64,
    pub day: u64,
    pub clients_today: usize,
    pub alerts_raised: usize,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub requests: Vec<RequestCount>,
    /// With `limits.dry_run`: refusals that would have happened.
    #[serde(default)]
    pub dry_run_would_refuse: Vec<RequestCount>,
}

/// Requests per route and outcome since start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestCount {
    pub route: String,
    pub outcome: String,
    pub count: u64,
}

impl ForwarderStatus {
    /// Requests with `outcome` over all routes.
    pub fn outcome(&self, outcome: &str) -> u64 {
        self.requests.iter().filter(|r| r.outcome == outcome).map(|r| r.count).sum()
    }
}

/// The aggregate bucket as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AggregateStatus {
    pub v4_prefix: u8,
    pub v6_prefix: u8,
    pub rate_pps: u32,
    pub burst: u32,
}

impl Status {
    /// Packets counted under `action`/`reason`.
    pub fn packets(&self, action: &str, reason: &str) -> u64 {
        self.counters.iter().filter(|c| c.action == action && c.reason == reason).map(|c| c.packets).sum()
    }
}

/// `top --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Top {
    pub tracked_sources: u64,
    pub sources: Vec<SourceStat>,
}

/// `usage --json`: today's units.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Usage {
    pub day: u64,
    pub currency: String,
    pub spent: String,
    pub budget: String,
    pub reset_unix: i64,
    /// Per route: outcomes since the daemon started.
    pub routes: Vec<RouteUsage>,
    /// Heaviest clients today (billable calls).
    pub top_clients: Vec<ClientUsage>,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Hits / (hits + misses), 0 when nothing was looked up.
    pub cache_hit_ratio: f64,
}

/// One route's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteUsage {
    pub route: String,
    pub forwarded: u64,
    pub cache_hits: u64,
    pub refused: u64,
}

/// One client's billable calls today.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientUsage {
    pub client: String,
    pub calls: u32,
}

/// `allow ls --json` / `deny ls --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListShow {
    pub list: List,
    pub entries: Vec<Entry>,
}

/// Why a verb got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The daemon is not running or the socket is wrong (CLI exit 2).
    #[error("cannot reach the keyward daemon at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error (CLI exit 1).
    #[error("{0}")]
    Refused(String),
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
}

/// Send one request and wait for its answer.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, AdminError> {
    let unreachable = |source| AdminError::Unreachable { path: socket.to_owned(), source };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).map_err(|e| AdminError::Protocol(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&s, MAX_LINE)).read_line(&mut answer).map_err(unreachable)?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok { data }) => Ok(data),
        Ok(Response::Error { message }) => Err(AdminError::Refused(message)),
        Err(e) => Err(AdminError::Protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::ListAdd { list: List::Deny, cidr: "10.0.0.0/8".into(), for_secs: Some(2) };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"verb":"list_add","list":"deny","cidr":"10.0.0.0/8","for_secs":2}"#);
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"verb":"format_disk"}"#).is_err());
    }
}
