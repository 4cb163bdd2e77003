//! Running commands: echo them, check their exit status, say which one failed.

use std::process::{Command, Output};

use anyhow::{Context as _, bail};

/// `cargo`, as the one that runs this xtask.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `command` with inherited stdio; fails with the command line when it does not succeed.
pub fn run_checked(command: &mut Command) -> anyhow::Result<()> {
    let text = describe(command);
    eprintln!("xtask: {text}");
    let status = command.status().with_context(|| format!("could not start `{text}`"))?;
    if !status.success() {
        bail!("`{text}` failed ({status})");
    }
    Ok(())
}

/// Where `run_logged` keeps each tool's output.
const LOG_DIR: &str = "target/xtask-logs";
/// Lines of a failed tool's log shown on the terminal.
const TAIL_LINES: usize = 30;

/// Runs `command` with its output kept in `target/xtask-logs/NAME.log` instead of the
/// terminal: a first run installs with apt, rustup and cargo, whose hundreds of lines say
/// nothing while they work. One line says what runs and where its log is; when the command
/// fails, the log's last lines follow.
pub fn run_logged(command: &mut Command, name: &str) -> anyhow::Result<()> {
    let text = describe(command);
    let dir = std::env::current_dir().context("the current directory")?.join(LOG_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join(format!("{name}.log"));
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    eprintln!("xtask: {text} (output in {LOG_DIR}/{name}.log)");
    let status = command
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("could not start `{text}`"))?;
    if !status.success() {
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = output.lines().collect();
        for line in &lines[lines.len().saturating_sub(TAIL_LINES)..] {
            eprintln!("  | {line}");
        }
        bail!("`{text}` failed ({status}); its whole output is in {}", log.display());
    }
    Ok(())
}

/// Runs `command` and captures its output; `None` when it cannot start.
pub fn capture(command: &mut Command) -> Option<Output> {
    command.output().ok()
}

/// A root-only command: as is when root, through sudo otherwise.
pub fn as_root(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg(program);
        sudo
    }
}

/// `PATH` with `dir` first.
pub fn path_with(dir: &std::path::Path) -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&path));
    std::env::join_paths(dirs).unwrap_or(path)
}

/// Downloads Debian package `package` with `apt_get` (an `apt-get` command with its options
/// set) through the empty directory `scratch`, and unpacks it into `into`, replacing what was
/// there. Nothing is installed: no maintainer script runs.
pub fn download_and_unpack(
    mut apt_get: Command,
    package: &str,
    scratch: &std::path::Path,
    into: &std::path::Path,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch)?;
    run_logged(apt_get.arg("download").arg(package).current_dir(scratch), "apt-get-download")
        .with_context(|| format!("downloading Debian package {package}"))?;
    let deb = std::fs::read_dir(scratch)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb of {package}"))?;
    let _ = std::fs::remove_dir_all(into);
    std::fs::create_dir_all(into)?;
    run_logged(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into), "dpkg-deb")?;
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}
