//! The `tcpstate` binary: parses the command line and runs one subcommand.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use tracer::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(message) = cli::validate(&cli) {
        Cli::command().error(clap::error::ErrorKind::ArgumentConflict, message).exit();
    }
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("TCPSTATE_LOG", "warn"))
        .format_timestamp_millis()
        .init();

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tcpstate: error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Watch(args) => tracer::watch::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tcpstate: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
