//! The command line: one binary, the daemon (`run`), config validation
//! (`check`) and the operator verbs that talk to a running daemon over its
//! admin socket. Help text is written for an operator, with an example per
//! verb. Exit codes: 0 success, 1 refused or invalid, 2 daemon unreachable,
//! 64 usage error (sysexits' EX_USAGE).

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
};

use clap::{Args, Parser, Subcommand};

use crate::{
    admin::{self, CallError, ListShow, Request, Status, Top},
    config::Config,
    paths,
    store::List,
    units::{Cidr, Span},
};

/// keyward: shields a paid API. Floods are dropped in the kernel (XDP) before
/// a socket exists; the operator verbs below talk to the running daemon.
#[derive(Debug, Parser)]
#[command(
    name = "keyward",
    version,
    propagate_version = true,
    after_help = "Examples:\n  keyward check -c /etc/keyward/keyward.toml\n  keyward run -c /etc/keyward/keyward.toml\n  keyward status\n  keyward top -n 20 --watch\n  keyward usage --json\n  keyward deny add 198.51.100.0/24 --for 1h\n  keyward allow add 192.0.2.10\n  keyward reload\n\nExit codes: 0 done, 1 refused or invalid, 2 the daemon could not be reached, 64 usage error."
)]
pub struct Cli {
    /// Config file: `run`/`check` read it; other verbs take `admin.socket` from it.
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Admin socket of the daemon to talk to (default: from -c, else /run/keyward/admin.sock).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Log lines as text or JSON (default: `[log] format` of the config, else text).
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<crate::config::LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load and attach XDP, pin maps, serve the admin socket.
    ///
    /// SIGHUP reloads the config; SIGTERM/SIGINT detach, unpin and exit 0.
    /// Example: keyward run -c /etc/keyward/keyward.toml
    Run,
    /// Validate a config and print the effective config (exit 1 with file:line:col on error).
    ///
    /// Example: keyward check -c /etc/keyward/keyward.toml
    Check,
    /// Show the daemon: interface and XDP mode, guarded ports, limits, drops by reason.
    ///
    /// Example: keyward status --json
    Status(JsonFlag),
    /// Heaviest sources in the kernel's per-source table now.
    ///
    /// Example: keyward top -n 20
    Top {
        /// How many sources to show.
        #[arg(short = 'n', default_value_t = 10)]
        n: usize,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Today's units: spend against the budget, per route, top clients, cache hit ratio.
    ///
    /// Example: keyward usage -n 20 --json
    Usage {
        /// How many clients to show.
        #[arg(short = 'n', default_value_t = 10)]
        n: usize,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Sources that bypass rate limits (health checkers, the office). Persisted.
    ///
    /// Example: keyward allow add 192.0.2.0/24
    Allow {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Sources dropped in XDP. Persisted; entries may expire.
    ///
    /// Example: keyward deny add 198.51.100.7 --for 1h
    Deny {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Re-read the config (same as SIGHUP); a bad config is refused and the old one stays.
    ///
    /// Example: keyward reload -c /etc/keyward/keyward.toml
    Reload,
    /// Print shell completions (bash, zsh, fish, …) to stdout.
    ///
    /// Example: keyward completions bash > /etc/bash_completion.d/keyward
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, keyward(1), as roff (the package ships it).
    #[command(hide = true)]
    Manpage,
}

/// `--json`.
#[derive(Debug, Args, Clone, Copy)]
pub struct JsonFlag {
    /// Machine-readable output (stable shape; fields are only ever added).
    #[arg(long)]
    pub json: bool,
}

/// `allow`/`deny` sub-verbs.
#[derive(Debug, Subcommand)]
pub enum ListAction {
    /// Add a CIDR (a bare address means /32 or /128), or every one in a file; takes effect in the kernel at once.
    ///
    /// Example: keyward deny add 198.51.100.0/24 --for 2h
    /// Example: keyward deny add -f drop.txt   (one CIDR per line, `#` and `;` comments)
    Add {
        /// IPv4 or IPv6 network, host bits zero (e.g. 10.1.0.0/16, 2001:db8::/32, 192.0.2.7).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        cidr: Option<String>,
        /// Add every network in this file instead (all or none). For a list
        /// kept in a file and re-read on reload, use `[xdp] deny_files`/`allow_files`.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
        /// Deny only: expire after this long (e.g. 30s, 10m, 2h, 1d).
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
    },
    /// Remove a CIDR (exactly as listed).
    ///
    /// Example: keyward allow rm 192.0.2.10/32
    Rm {
        /// The network to remove.
        cidr: String,
    },
    /// List the entries, with their expiry, when they were added and why.
    ///
    /// Example: keyward deny ls --json
    Ls(JsonFlag),
}

/// A failed verb and its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Admin(#[from] CallError),
    /// What was typed cannot be meant (a bad CIDR, a flag that does not apply).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Invalid for another reason (the config's policy, a garbled answer).
    #[error("{0}")]
    Invalid(String),
}

/// sysexits' EX_USAGE: the command line was wrong.
pub const EXIT_USAGE: i32 = 64;

impl CliError {
    /// 2 when the daemon could not be reached, 64 for a usage error, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Admin(CallError::Unreachable { .. }) => 2,
            CliError::Usage(_) => EXIT_USAGE,
            _ => 1,
        }
    }
}

/// An error and its causes on one line, each cause once: a cause whose text
/// is already part of the line (a wrapped error that prints its source) is
/// not repeated.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

impl Cli {
    /// The admin socket the verbs talk to.
    fn socket(&self) -> Result<PathBuf, CliError> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(c) = &self.config {
            return Ok(Config::load(c)?.admin.socket);
        }
        Ok(PathBuf::from(paths::ADMIN_SOCKET))
    }

    /// The config path for `run`/`check`.
    pub fn config_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| PathBuf::from(paths::CONFIG))
    }
}

use crate::proxy::{inject::KeyError, policy::LoadError};

/// `check`.
pub fn check(path: &Path) -> Result<(), CliError> {
    // Everything the daemon would build (upstream URL and TLS roots, routes,
    // injection, schedule, webhook), through the same builder; the key only
    // as a warning, since the service's environment is not this shell's.
    let loaded = crate::proxy::policy::Loaded::read(path)?;
    let c = loaded.config.clone();
    let mut warnings = c.warnings();
    // The list files, as the daemon would read them (all or nothing).
    let mut files = Vec::new();
    for (key, paths) in [("allow_files", &c.xdp().allow_files), ("deny_files", &c.xdp().deny_files)] {
        if !paths.is_empty() {
            let n = crate::lists::read_all(paths).map_err(|e| CliError::Invalid(format!("[xdp] {key}: {e}")))?.len();
            files.push(format!("[xdp] {key}: {n} networks"));
        }
    }
    match loaded.with_key(path) {
        Ok(_) => {}
        Err(LoadError::Key { source: e @ (KeyError::Env(_) | KeyError::File { .. }), .. }) => {
            warnings.push(format!("{e} (here; the service may have it)"));
        }
        Err(LoadError::Config(e)) => return Err(e.into()),
        Err(e) => return Err(CliError::Invalid(e.to_string())),
    }
    println!("# {}: valid. Effective configuration:", path.display());
    for f in &files {
        println!("# {f}");
    }
    for w in &warnings {
        println!("# warning: {w}");
    }
    println!();
    print!("{}", c.to_toml());
    Ok(())
}

/// `completions SHELL` and `manpage`: generated from the command line's own definition.
pub fn generate(command: &Command) -> Result<(), CliError> {
    use clap::CommandFactory as _;
    let mut out = std::io::stdout().lock();
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "keyward", &mut out);
            Ok(())
        }
        _ => clap_mangen::Man::new(Cli::command())
            .render(&mut out)
            .map_err(|e| CliError::Invalid(format!("writing the man page: {e}"))),
    }
}

/// Run a verb that talks to the daemon.
pub fn verb(cli: &Cli) -> Result<(), CliError> {
    let socket = cli.socket()?;
    let call = |r: &Request| admin::call(&socket, r).map_err(CliError::from);
    match &cli.command {
        Command::Run | Command::Check | Command::Completions { .. } | Command::Manpage => {
            Err(CliError::Invalid("not a client verb".into()))
        }
        Command::Status(j) => {
            let v = call(&Request::Status)?;
            if j.json {
                return print_json(&v);
            }
            print_status(&from(v)?);
            Ok(())
        }
        Command::Top { n, watch, json } => loop {
            let v = call(&Request::Top { n: *n })?;
            if json.json {
                print_json(&v)?;
            } else {
                let t: Top = from(v)?;
                if *watch {
                    print!("\x1b[2J\x1b[H");
                }
                println!("{} sources tracked", t.tracked_sources);
                let rows: Vec<Vec<String>> = t
                    .sources
                    .iter()
                    .map(|s| vec![s.source.clone(), s.packets.to_string(), s.drops.to_string()])
                    .collect();
                print_table(&["SOURCE", "PACKETS", "DROPS"], &rows);
            }
            if !*watch {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
        Command::Usage { n, json } => {
            let v = call(&Request::Usage { n: *n })?;
            if json.json {
                return print_json(&v);
            }
            let u: admin::Usage = from(v)?;
            println!(
                "today ({}): {} {} of {} spent; resets in {}",
                u.day,
                u.spent,
                u.currency,
                u.budget,
                until(u.reset_unix)
            );
            println!(
                "cache: {} hits, {} misses ({:.0}% hit ratio)\n",
                u.cache_hits,
                u.cache_misses,
                u.cache_hit_ratio * 100.0
            );
            let rows: Vec<Vec<String>> = u
                .routes
                .iter()
                .map(|r| {
                    vec![r.route.clone(), r.forwarded.to_string(), r.cache_hits.to_string(), r.refused.to_string()]
                })
                .collect();
            print_table(&["ROUTE", "FORWARDED", "CACHE HITS", "REFUSED"], &rows);
            println!();
            let rows: Vec<Vec<String>> =
                u.top_clients.iter().map(|c| vec![c.client.clone(), c.calls.to_string()]).collect();
            print_table(&["CLIENT", "BILLABLE CALLS TODAY"], &rows);
            Ok(())
        }
        Command::Allow { action } => list_verb(List::Allow, action, &call),
        Command::Deny { action } => list_verb(List::Deny, action, &call),
        Command::Reload => {
            call(&Request::Reload)?;
            println!("reloaded");
            Ok(())
        }
    }
}

fn list_verb(
    list: List,
    action: &ListAction,
    call: &dyn Fn(&Request) -> Result<serde_json::Value, CliError>,
) -> Result<(), CliError> {
    let name = list.name();
    match action {
        ListAction::Add { cidr, file, for_ } => {
            // Parsed here, once: a typo is refused even with no daemon, and
            // the daemon gets a CIDR and a duration, not text.
            let for_secs = match for_ {
                None => None,
                Some(_) if list == List::Allow => {
                    return Err(CliError::Usage("--for applies to deny entries only".into()));
                }
                Some(d) => {
                    let s: Span = d.parse().map_err(|e: crate::units::UnitError| CliError::Usage(e.0))?;
                    Some(s.0.as_secs().max(1))
                }
            };
            let lasting = for_secs.map(std::time::Duration::from_secs);
            if let Some(f) = file {
                let cidrs = crate::lists::read(f).map_err(|e| CliError::Invalid(e.to_string()))?;
                let n = cidrs.len();
                call(&Request::ListAddMany { list, cidrs, lasting })?;
                println!("{name}: {n} entries from {}", f.display());
                return Ok(());
            }
            let c = parse_cidr(cidr.as_deref().unwrap_or_default())?;
            call(&Request::ListAdd { list, cidr: c, lasting })?;
            match for_secs {
                Some(s) => println!("{name} {c} (expires in {s}s)"),
                None => println!("{name} {c}"),
            }
            Ok(())
        }
        ListAction::Rm { cidr } => {
            let c = parse_cidr(cidr)?;
            call(&Request::ListRemove { list, cidr: c })?;
            println!("removed {c} from {name}");
            Ok(())
        }
        ListAction::Ls(j) => {
            let v = call(&Request::ListShow { list })?;
            if j.json {
                return print_json(&v);
            }
            let l: ListShow = from(v)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let rows: Vec<Vec<String>> = l
                .entries
                .iter()
                .map(|e| {
                    let exp = e.expires_unix.map_or("never".to_owned(), |t| {
                        let s = t.saturating_sub(now);
                        format!("in {}h{:02}m{:02}s", s / 3600, (s % 3600) / 60, s % 60)
                    });
                    let added = e.added_unix.map_or("-".to_owned(), |t| {
                        jiff::Timestamp::from_second(t as i64)
                            .map_or("-".to_owned(), |t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
                    });
                    vec![e.cidr.to_string(), exp, added, e.reason.clone().unwrap_or_else(|| "-".into())]
                })
                .collect();
            print_table(&["CIDR", "EXPIRES", "ADDED", "REASON"], &rows);
            Ok(())
        }
    }
}

/// A CIDR from the command line, or the reason it is not one.
fn parse_cidr(s: &str) -> Result<Cidr, CliError> {
    s.parse().map_err(|e: crate::units::UnitError| CliError::Usage(e.0))
}

/// Decode a daemon answer.
fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, CliError> {
    serde_json::from_value(v).map_err(|e| CliError::Invalid(format!("bad answer from the daemon: {e}")))
}

fn print_json(v: &serde_json::Value) -> Result<(), CliError> {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    Ok(())
}

fn print_status(s: &Status) {
    let bold = |t: &str| {
        if std::io::stdout().is_terminal() { format!("\x1b[1m{t}\x1b[0m") } else { t.to_owned() }
    };
    println!("{} {} — up (pid {})", bold("keyward"), s.version, s.pid);
    let ports: Vec<String> = s.ports.iter().map(|p| format!("tcp/{p}")).collect();
    let kv = [
        ("interface", format!("{} (XDP {})", s.interface, s.attach_mode)),
        ("guarded", ports.join(", ")),
        ("per source", format!("{} pps, burst {}; IPv6 per /{}", s.rate_pps, s.burst, s.ipv6_prefix)),
        (
            "aggregate",
            format!(
                "{} pps, burst {} per IPv4 /{} and IPv6 /{}",
                s.aggregate.rate_pps, s.aggregate.burst, s.aggregate.v4_prefix, s.aggregate.v6_prefix
            ),
        ),
        ("new sources", format!("admitted at {} pps, burst {} (host-wide)", s.new_sources_pps, s.new_sources_burst)),
        (
            "untracked SYNs",
            format!(
                "passed at {} pps, burst {} (host-wide); beyond, challenged",
                s.untracked_syns_pps, s.untracked_syns_burst
            ),
        ),
        ("dry run", if s.dry_run { "yes: nothing is dropped".into() } else { "no".into() }),
        ("sources", format!("{} tracked of {}, {} created", s.tracked_sources, s.table_size, s.new_sources)),
        (
            "lists",
            format!(
                "{} allow, {} deny (of which {} and {} from list files)",
                s.allow_entries, s.deny_entries, s.allow_from_files, s.deny_from_files
            ),
        ),
        ("store", run_line(&s.run)),
    ];
    for (k, v) in kv {
        println!("  {k:<11} {v}");
    }
    if s.run.previous_run_crashed {
        println!(
            "  {:<11} the previous run did not stop cleanly: {} reservations recovered, {} without a settled answer (counted as spent)",
            "recovered", s.run.recovered_reservations, s.run.recovered_unsettled
        );
    }
    println!();
    let rows: Vec<Vec<String>> = s
        .counters
        .iter()
        .filter(|c| c.packets > 0)
        .map(|c| vec![c.reason.clone(), c.action.clone(), c.packets.to_string(), c.bytes.to_string()])
        .collect();
    if rows.is_empty() {
        println!("no packets seen yet");
    } else {
        print_table(&["REASON", "ACTION", "PACKETS", "BYTES"], &rows);
    }
    if !s.top_sources.is_empty() {
        println!();
        let rows: Vec<Vec<String>> =
            s.top_sources.iter().map(|t| vec![t.source.clone(), t.packets.to_string(), t.drops.to_string()]).collect();
        print_table(&["TOP SOURCE", "PACKETS", "DROPS"], &rows);
    }
    if let Some(f) = &s.forwarder {
        println!();
        let frac = if f.budget_micros == 0 { 1.0 } else { f.spent_micros as f64 / f.budget_micros as f64 };
        let filled = ((frac.min(1.0)) * 30.0).round() as usize;
        let bar = format!("[{}{}]", "#".repeat(filled), ".".repeat(30 - filled));
        let bar = if std::io::stdout().is_terminal() && frac >= 0.9 { format!("\x1b[31m{bar}\x1b[0m") } else { bar };
        println!("  {:<11} {} {} of {} {bar} {:.0}%", "spend", f.spent, f.currency, f.budget, frac * 100.0);
        println!("  {:<11} in {} (day {})", "reset", until(f.reset_unix), f.day);
        if let Some(r) = f.released_micros {
            println!("  {:<11} {} {} released so far", "pace", crate::proxy::limit::format_amount(r), f.currency);
        }
        if let Some(t) = f.runs_out_unix.filter(|_| f.spent_micros < f.budget_micros) {
            println!("  {:<11} at this pace the budget runs out in {}", "velocity", until(t));
        }
        println!("  {:<11} {} (proof-of-work {}), {} live", "tokens", f.tokens, f.pow, f.live_tokens);
        if let Some(s) = &f.store {
            let fmt = crate::proxy::limit::format_amount;
            println!(
                "  {:<11} {} {}; leased here {} {}, fleet granted {}; {} round trips; {} live hosts; {} restarts seen",
                "store",
                s.url,
                if s.up { "up" } else { "DOWN (spending leases, then 503 budget-unavailable)" },
                fmt(s.leased_micros),
                f.currency,
                fmt(s.fleet_granted_micros),
                s.round_trips,
                s.live_hosts,
                s.restarts_seen
            );
        }
        println!("  {:<11} {} raised today", "alerts", f.alerts_raised);
        println!(
            "  {:<11} {} clients today; cache {} hits, {} misses",
            "forwarder", f.clients_today, f.cache_hits, f.cache_misses
        );
        let rows: Vec<Vec<String>> =
            f.requests.iter().map(|r| vec![r.route.clone(), r.outcome.clone(), r.count.to_string()]).collect();
        if !rows.is_empty() {
            println!();
            print_table(&["ROUTE", "OUTCOME", "REQUESTS"], &rows);
        }
    }
}

/// The durability in force and the last clean shutdown.
fn run_line(r: &admin::RunStatus) -> String {
    let mode = match r.durability.as_str() {
        "immediate" => "reservations on disk before each call leaves",
        "lose-up-to-1s" => "counters saved every second (a crash may lose up to 1s of spend)",
        _ => "-",
    };
    let last = r.last_clean_shutdown_unix.and_then(|t| jiff::Timestamp::from_second(i64::try_from(t).ok()?).ok());
    let last = last.map_or_else(|| "never".to_owned(), |t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string());
    format!("{mode}; last clean shutdown {last}")
}

/// "3h12m" until Unix second `t`.
fn until(t: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let s = (t - now).max(0);
    format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
}

/// Left-aligned first column, right-aligned numbers.
fn print_table(head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let out: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let width = w.get(i).copied().unwrap_or(0);
                if i == 0 { format!("{c:<width$}") } else { format!("{c:>width$}") }
            })
            .collect();
        println!("{}", out.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
