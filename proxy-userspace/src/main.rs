//! The `keyward` binary: parse the command line, set up logging, dispatch.
//! Errors print as one line and set the exit code (1 refused, 2 unreachable).

use clap::Parser as _;
use keyward::cli::{self, Cli, Command};

fn main() {
    let cli = Cli::parse();
    init_logging();
    let code = match &cli.command {
        Command::Run => match keyward::daemon::run(&cli.config_path()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("keyward: {e:#}");
                1
            }
        },
        Command::Check => report(cli::check(&cli.config_path())),
        _ => report(cli::verb(&cli)),
    };
    std::process::exit(code);
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

/// `RUST_LOG`-style filtering (default `info`) to stderr; colour only on a
/// terminal; under systemd (`JOURNAL_STREAM` set) no timestamps, which
/// journald adds itself.
fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let tty = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(tty);
    if !tty && std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
