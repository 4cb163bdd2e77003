//! The `tcpstate` binary: parses the command line and runs one subcommand.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use tracer::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(message) = cli::validate(&cli) {
        // The usage shown is the subcommand's, as for errors clap finds itself.
        let mut command = Cli::command();
        command.build();
        let name = cli.command.name();
        let mut subcommand = command.find_subcommand_mut(name).cloned().unwrap_or(command);
        subcommand.error(clap::error::ErrorKind::ArgumentConflict, message).exit();
    }
    // The daemon reports what it does; the interactive commands keep stderr for problems.
    let default_level = match cli.command {
        Command::Run(_) => "info",
        Command::Watch(_) | Command::Leaks(_) => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("TCPSTATE_LOG", default_level))
        .format_timestamp_millis()
        .init();

    // Two workers for the daemon: the ring-buffer reader and the HTTP endpoint do not wait on
    // each other. The other commands need one.
    let runtime = match cli.command {
        Command::Run(_) => {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        }
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tcpstate: error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<ExitCode> = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => tracer::daemon::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Watch(args) => tracer::watch::run(args).await.map(|()| ExitCode::SUCCESS),
            // Its exit status carries the answer (0 no leaks, 1 leaks, 3 failure).
            Command::Leaks(args) => Ok(tracer::leaks::command::run(args).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tcpstate: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
