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
    units::Cidr,
};

/// Largest request or response line accepted.
pub const MAX_LINE: u64 = 4 << 20;

/// What a CLI verb asks of the daemon. Values are typed: a CIDR is parsed
/// once, by the client, and arrives here as a [`Cidr`] (a daemon given text
/// that is not one refuses the line as a bad request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Top {
        n: usize,
    },
    ListAdd {
        list: List,
        cidr: Cidr,
        /// Deny only: how long the entry lasts (whole seconds on the wire).
        #[serde(rename = "for_secs", with = "opt_secs", default)]
        lasting: Option<Duration>,
    },
    /// Many at once (`keyward deny add -f FILE`): all or none.
    ListAddMany {
        list: List,
        cidrs: Vec<Cidr>,
        #[serde(rename = "for_secs", with = "opt_secs", default)]
        lasting: Option<Duration>,
    },
    ListRemove {
        list: List,
        cidr: Cidr,
    },
    ListShow {
        list: List,
    },
    Reload,
    Usage {
        n: usize,
    },
}

/// `Option<Duration>` as whole seconds (`null` when absent); sub-second
/// parts round up, so an entry never lasts less than asked.
mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_millis().div_ceil(1000).try_into().unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok {
        data: serde_json::Value,
    },
    /// `{"result":"error","kind":"not_found","message":"…"}`: `message` is
    /// what the CLI prints; `kind` lets a script tell refusals apart.
    Error {
        #[serde(default)]
        kind: ErrorKind,
        message: String,
    },
}

/// Why the daemon refused a verb, as the daemon sees it. Crosses the socket
/// as an [`ErrorKind`] and the message.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request is malformed or asks for something that cannot be.
    #[error("{0}")]
    BadRequest(String),
    /// Removing an entry that is not listed.
    #[error("{cidr} is not in the {} list", list.name())]
    NotFound { list: List, cidr: Cidr },
    #[error("the forwarder is not configured ([listen] is absent)")]
    NoForwarder,
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A reload refused: the file is invalid (with file:line:col)…
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// … or its forwarder policy does not build (the key, say) …
    #[error("{source}")]
    Policy {
        path: PathBuf,
        #[source]
        source: crate::proxy::policy::LoadError,
    },
    /// … or it changes what only a restart can.
    #[error("{}: {what} cannot change while running; restart keyward to apply it", path.display())]
    NeedsRestart { path: PathBuf, what: &'static str },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The stable, machine-readable class of an [`AdminError`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    NoForwarder,
    Dataplane,
    Store,
    Config,
    Internal,
    /// From a daemon newer than this client.
    #[default]
    #[serde(other)]
    Unknown,
}

impl AdminError {
    /// The class sent over the socket.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AdminError::BadRequest(_) => ErrorKind::BadRequest,
            AdminError::NotFound { .. } => ErrorKind::NotFound,
            AdminError::NoForwarder => ErrorKind::NoForwarder,
            AdminError::Dataplane(_) => ErrorKind::Dataplane,
            AdminError::Store(_) => ErrorKind::Store,
            AdminError::Config(_) | AdminError::Policy { .. } | AdminError::NeedsRestart { .. } => ErrorKind::Config,
            AdminError::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl From<AdminError> for Response {
    fn from(e: AdminError) -> Response {
        Response::Error { kind: e.kind(), message: e.to_string() }
    }
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
    /// Host-wide cap on SYNs passed untracked to the kernel.
    #[serde(default)]
    pub untracked_syns_pps: u32,
    #[serde(default)]
    pub untracked_syns_burst: u32,
    pub dry_run: bool,
    pub table_size: u32,
    pub tracked_sources: u64,
    pub new_sources: u64,
    pub allow_entries: usize,
    pub deny_entries: usize,
    /// Of those, the entries only `[xdp] allow_files` / `deny_files` list.
    #[serde(default)]
    pub allow_from_files: usize,
    #[serde(default)]
    pub deny_from_files: usize,
    pub counters: Vec<ReasonCount>,
    /// The three heaviest sources in the kernel table.
    #[serde(default)]
    pub top_sources: Vec<SourceStat>,
    /// When the table was last sampled (`tracked_sources`, `top_sources`),
    /// in Unix milliseconds; the daemon samples it every second or more.
    #[serde(default)]
    pub sources_sampled_unix_ms: u64,
    /// The forwarder, when `[listen]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarder: Option<ForwarderStatus>,
    /// How reservations are kept, and what this run found at start.
    #[serde(default)]
    pub run: RunStatus,
}

/// How reservations are kept, and what this run found at start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunStatus {
    /// `[store] durability`: `immediate` (every reservation on disk before
    /// its call leaves) or `lose-up-to-1s`.
    pub durability: String,
    /// When a run last stopped cleanly, before this one (Unix seconds).
    pub last_clean_shutdown_unix: Option<u64>,
    /// The run before this one did not stop cleanly (a crash, `kill -9`).
    pub previous_run_crashed: bool,
    /// Reservations found in the journal at start, newer than the last snapshot.
    pub recovered_reservations: u64,
    /// Of those, with no settled answer recorded: counted as spent.
    pub recovered_unsettled: u64,
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
    /// Spend in the last snapshot written to the store (with `durability =
    /// "immediate"` the journal holds the rest; with `"lose-up-to-1s"` a
    /// crash loses the difference).
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
    /// With `limits.pace`: what the pace has released by now.
    #[serde(default)]
    pub released_micros: Option<u64>,
    /// When the budget runs out at today's average spend rate, if before the reset.
    #[serde(default)]
    pub runs_out_unix: Option<i64>,
    /// Page tokens: `off`, `optional` or `required`, and the proof-of-work mode.
    #[serde(default)]
    pub tokens: String,
    #[serde(default)]
    pub pow: String,
    /// Tokens with calls counted today (live).
    #[serde(default)]
    pub live_tokens: usize,
    /// The shared store, when `[store] redis_url` is set.
    #[serde(default)]
    pub store: Option<StoreStatus>,
}

/// The shared store as this host sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreStatus {
    /// The URL, password redacted.
    pub url: String,
    pub up: bool,
    /// This host's lease of today's budget (spent included).
    pub leased_micros: u64,
    /// The fleet's total granted today, as last seen.
    pub fleet_granted_micros: u64,
    /// Calls to the store since start.
    pub round_trips: u64,
    /// Hosts with a recent heartbeat, as last counted (this one included):
    /// while the store does not answer, each admits a client up to
    /// `ceil(per_ip_daily / live_hosts)`.
    #[serde(default)]
    pub live_hosts: u32,
    /// Restarts of the store this host has seen (each lost what the store held).
    #[serde(default)]
    pub restarts_seen: u64,
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
pub enum CallError {
    /// The daemon is not running or the socket is wrong (CLI exit 2).
    #[error("cannot reach the keyward daemon at {path}: {source} (is it running? see `systemctl status keyward`)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error (CLI exit 1).
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
}

/// Send one request and wait for its answer.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, CallError> {
    let unreachable = |source| CallError::Unreachable { path: socket.to_owned(), source };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).map_err(|e| CallError::Protocol(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&s, MAX_LINE)).read_line(&mut answer).map_err(unreachable)?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok { data }) => Ok(data),
        Ok(Response::Error { kind, message }) => Err(CallError::Refused { kind, message }),
        Err(e) => Err(CallError::Protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let cidr: Cidr = "10.0.0.0/8".parse().unwrap();
        let r = Request::ListAdd { list: List::Deny, cidr, lasting: Some(Duration::from_secs(2)) };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"verb":"list_add","list":"deny","cidr":"10.0.0.0/8","for_secs":2}"#);
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        let forever = r#"{"verb":"list_add","list":"allow","cidr":"10.0.0.0/8"}"#;
        let r = serde_json::from_str::<Request>(forever).unwrap();
        assert_eq!(r, Request::ListAdd { list: List::Allow, cidr, lasting: None });
        assert!(serde_json::from_str::<Request>(r#"{"verb":"format_disk"}"#).is_err());
    }

    #[test]
    fn a_cidr_is_checked_where_the_request_is_read() {
        let bad = r#"{"verb":"list_remove","list":"deny","cidr":"10.1.2.3/16"}"#;
        let e = serde_json::from_str::<Request>(bad).unwrap_err().to_string();
        assert!(e.contains("did you mean 10.1.0.0/16"), "{e}");
    }

    #[test]
    fn errors_keep_their_message_and_carry_a_kind() {
        let e = AdminError::NotFound { list: List::Deny, cidr: "2001:db8::/32".parse().unwrap() };
        let j = serde_json::to_string(&Response::from(e)).unwrap();
        assert_eq!(j, r#"{"result":"error","kind":"not_found","message":"2001:db8::/32 is not in the deny list"}"#);
        let old = r#"{"result":"error","message":"refused"}"#;
        let r: Response = serde_json::from_str(old).unwrap();
        assert!(matches!(r, Response::Error { kind: ErrorKind::Unknown, .. }));
        let newer = r#"{"result":"error","kind":"quota","message":"x"}"#;
        assert!(matches!(serde_json::from_str(newer).unwrap(), Response::Error { kind: ErrorKind::Unknown, .. }));
    }
}
