//! The `keyward` binary: parse the command line, set up logging, dispatch.
//! Errors print as one line and set the exit code (1 refused, 2 unreachable,
//! 64 usage).

use clap::Parser as _;
use keyward::{
    cli::{self, Cli, Command},
    config::{Config, LogFormat},
};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print to stdout and succeed; the rest is a usage error.
            let code = if e.use_stderr() { cli::EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if !matches!(cli.command, Command::Run) {
        default_sigpipe();
    }
    keyward::logging::init(log_format(&cli));
    let code = match &cli.command {
        Command::Run => match keyward::daemon::run(&cli.config_path()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("keyward: {}", cli::one_line(e.as_ref()));
                1
            }
        },
        Command::Check => report(cli::check(&cli.config_path())),
        Command::Completions { .. } | Command::Manpage => report(cli::generate(&cli.command)),
        _ => report(cli::verb(&cli)),
    };
    std::process::exit(code);
}

/// `--log-format`, else the config's `[log] format` for `run`, else text.
/// A config that does not load is reported by `run` itself.
fn log_format(cli: &Cli) -> LogFormat {
    cli.log_format
        .or_else(|| match cli.command {
            Command::Run => Config::load(&cli.config_path()).ok().map(|c| c.log.format),
            _ => None,
        })
        .unwrap_or_default()
}

/// A verb whose reader went away (`keyward check | head -1`) ends quietly,
/// as other Unix tools do, instead of panicking in `println!`. Not for the
/// daemon, whose sockets report EPIPE as an error to handle.
fn default_sigpipe() {
    // SAFETY: called before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE and no handler code is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn report(r: Result<(), cli::CliError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("keyward: {e}");
            e.exit_code()
        }
    }
}
