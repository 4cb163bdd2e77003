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
        Command::Watch(_) | Command::Leaks(_) | Command::Top(_) => "warn",
        // The report says everything; the probe's own warnings would repeat it.
        Command::Check(_) | Command::Explain(_) => "error",
    };
    let mut logger = env_logger::Builder::from_env(
        env_logger::Env::new().filter_or("TCPSTATE_LOG", default_level),
    );
    // Lines say `tcpstate`, the program's name, rather than the crate's module path; the
    // libraries' own lines keep their names (aya, hyper).
    logger.format(|out, record| {
        use std::io::Write as _;
        let target = record.target();
        let source =
            if target == "tracer" || target.starts_with("tracer::") { "tcpstate" } else { target };
        let at = out.timestamp_millis();
        writeln!(out, "[{at} {:<5} {source}] {}", record.level(), record.args())
    });
    if let Command::Top(_) = cli.command {
        // Written over the panels otherwise: shown in the screen's bottom line instead.
        logger.target(env_logger::Target::Pipe(Box::new(tracer::top::WarningLine)));
        logger.format(|out, record| {
            use std::io::Write as _;
            writeln!(out, "{}: {}", record.level(), record.args())
        });
    }
    logger.init();

    let result = match cli.command {
        Command::Run(args) => run_daemon(args.config()),
        Command::Watch(args) => {
            let config = args.config();
            on_one_thread(async { tracer::watch::run(config).await.map(|()| ExitCode::SUCCESS) })
        }
        // Its exit status carries the answer (0 no leaks, 1 leaks, 3 failure).
        Command::Leaks(args) => {
            let config = args.config();
            on_one_thread(async { Ok(tracer::leaks::command::run(config).await) })
        }
        Command::Check(args) => Ok(tracer::check::run(args.json)),
        // Its exit status carries the outcome (1: nothing to show).
        Command::Top(args) => match args.config() {
            Ok(config) => on_one_thread(async { Ok(tracer::top::run(config).await) }),
            Err(error) => error.exit(),
        },
        Command::Explain(args) => {
            tracer::explain::run(args.state);
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tcpstate: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an interactive command: one thread is enough.
fn on_one_thread(
    command: impl Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| anyhow::anyhow!("starting the async runtime: {error}"))?
        .block_on(command)
}

/// The daemon binds and attaches with all its privileges, then keeps only those it still
/// needs, before the runtime's threads exist so that every one of them starts with less.
fn run_daemon(config: tracer::daemon::Config) -> anyhow::Result<ExitCode> {
    let attached = tracer::daemon::attach(&config)?;
    match tracer::capabilities::keep_only(&tracer::capabilities::DAEMON_NEEDS) {
        Ok(kept) => log::debug!("capabilities kept after attaching: {kept:?}"),
        Err(error) => {
            log::warn!("could not drop the capabilities the daemon no longer needs: {error}")
        }
    }
    // Two workers: the ring-buffer reader and the HTTP endpoint do not wait on each other.
    // Blocking work (metrics, listings, leak checks) runs in a bounded pool; listings are
    // further limited by their own turns.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .map_err(|error| anyhow::anyhow!("starting the async runtime: {error}"))?;
    runtime.block_on(tracer::daemon::run(config, attached))?;
    Ok(ExitCode::SUCCESS)
}
