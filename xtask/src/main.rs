//! Project tasks: `cargo xtask setup | build | run | test | lint | dist | chart | image |
//! vmtest | bench | soak`.
//!
//! Every task that builds runs `setup` first, so a fresh machine needs nothing but the repo,
//! rustup and the package registries.

mod arch;
mod bench;
mod benchmarks_md;
mod chart;
mod cmd;
mod cross;
mod debian;
mod dist;
#[cfg(test)]
mod doc_pointers;
mod image;
#[cfg(test)]
mod module_graph;
mod setup;
mod soak;
mod vmtest;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::cmd::{cargo, run_checked, run_logged};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and benchmark tcpstate")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs and is missing: rust-src, LLVM 22, bpf-linker 0.13.
    Setup,
    /// Build the release binary at target/release/tcpstate; with --arch, a static binary
    /// for that architecture at target/<triple>/release/tcpstate.
    Build {
        /// The architecture to build a static binary for (cross-compiled when not this
        /// machine's).
        #[arg(long, value_enum)]
        arch: Option<arch::Arch>,
    },
    /// Build, then run `tcpstate ARGS` as root (through sudo when not root); default `run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check formatting and lints, run every test against this machine's kernel as root, check
    /// the Helm chart, soak the daemon for three minutes (`soak`), build and check the release
    /// artifacts (`dist`), then the integration tests inside each stock kernel of the matrix
    /// on both architectures (`vmtest`).
    Test {
        /// Only run tests whose name contains this (or any word of it).
        filter: Option<String>,
        /// Skip the kernel matrix (the VMs): this machine's kernel only.
        #[arg(long)]
        host_only: bool,
    },
    /// Build what a user installs without a toolchain, for x86_64 and aarch64: static
    /// binaries in tarballs and Debian packages, one multi-architecture OCI image archive,
    /// SHA256SUMS, in target/dist/; then check them on this host.
    Dist {
        /// Only this architecture (repeatable). Default: both.
        #[arg(long, value_enum)]
        arch: Vec<arch::Arch>,
    },
    /// Write deploy/kubernetes/daemonset.yaml from the Helm chart with default values (`test`
    /// fails while the two differ), then check the chart as `test` does.
    Chart,
    /// Build an OCI image of tcpstate (no registry needed), load it into podman and save it as
    /// target/image/tcpstate-VERSION.oci.tar for other hosts.
    Image,
    /// Boot Debian's stock kernels (5.10, 6.1, 6.12) for x86_64 and aarch64 in QEMU and run the
    /// integration tests inside each.
    Vmtest(vmtest::VmtestArgs),
    /// `cargo fmt --check` and clippy with warnings denied.
    Lint,
    /// Measure throughput, loss, CPU and memory side by side with libbpf-tools tcpstates;
    /// records the table in BENCHMARKS.md. Needs root.
    Bench(bench::BenchArgs),
    /// Run the daemon under churn, a slow CLOSE_WAIT leak and a stuck listener for N minutes,
    /// sampling memory, CPU, its sockets against `ss`, losses and drift every minute; fails
    /// on a socket count that differs from `ss`, on drift, or on memory that grows over the
    /// second half. Needs root.
    Soak(soak::SoakArgs),
    /// The benchmark's load generator (run inside its network namespace).
    #[command(hide = true, subcommand)]
    Loadgen(bench::load::LoadCommand),
    /// The benchmark's floors: a program held on the tracepoint until interrupted.
    #[command(hide = true)]
    Floor {
        #[arg(value_enum, default_value = "empty")]
        program: bench::floor::Floor,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    if let Task::Loadgen(_) = cli.task {
        // Runs inside the benchmark's namespace, from the xtask binary; no workspace needed.
    } else {
        std::env::set_current_dir(&root).context("entering the workspace")?;
    }
    match cli.task {
        Task::Setup => setup::build_prerequisites(&root),
        Task::Build { arch } => {
            setup::build_prerequisites(&root)?;
            match arch {
                None => build_release(&root),
                Some(arch) => {
                    let binary = cross::build(&root, arch)?;
                    eprintln!("xtask: {}", binary.display());
                    Ok(())
                }
            }
        }
        Task::Run { args } => {
            setup::build_prerequisites(&root)?;
            build_release(&root)?;
            let args = if args.is_empty() { vec!["run".to_owned()] } else { args };
            run_as_root(&root.join("target/release/tcpstate"), &args)
        }
        Task::Dist { arch } => {
            setup::build_prerequisites(&root)?;
            setup::container_prerequisites()?;
            let arches = if arch.is_empty() { arch::Arch::ALL.to_vec() } else { arch };
            dist_for(&root, &arches)
        }
        Task::Chart => {
            let tools = chart_tools(&root)?;
            chart::write_manifest(&root, &tools)?;
            chart::check(&root, &tools)
        }
        Task::Image => {
            setup::build_prerequisites(&root)?;
            setup::container_prerequisites()?;
            build_release(&root)?;
            image::build(&root).map(drop)
        }
        Task::Test { filter, host_only } => {
            setup::build_prerequisites(&root)?;
            let tools = setup::test_prerequisites(&root)?;
            setup::container_prerequisites()?;
            lint()?;
            // The container tests run the image of the binary under test.
            build_release(&root)?;
            let image = image::build(&root)?;
            let host = test(filter.as_deref(), &tools, &image);
            // The chart: lint, render, validate, promtool; the manifest it generates.
            let chart = if filter.is_none() {
                chart_tools(&root).and_then(|chart_tools| {
                    chart::check(&root, &chart_tools)?;
                    chart::run_pod(&root, &chart_tools, &image)
                })
            } else {
                Ok(())
            };
            // A few minutes of the soak: gauges, drift and memory over time, not one moment.
            let soaked =
                if filter.is_none() { soak::run(&root, &soak::SoakArgs::short()) } else { Ok(()) };
            // What users install, built and checked (lintian, dpkg install and purge, the
            // image running `tcpstate check`); a filtered run is after one test, not these.
            let releases = if filter.is_none() { dist_checked(&root) } else { Ok(()) };
            if host_only {
                host?;
                chart.context("the Helm chart failed its checks")?;
                soaked.context("the soak failed")?;
                return releases;
            }
            // The matrix runs even when the host failed: every verdict is worth having.
            let args = vmtest::VmtestArgs { filter, ..Default::default() };
            let matrix = vmtest::run(&root, &args, &tools);
            host.context("tests on this machine's kernel failed")?;
            chart.context("the Helm chart failed its checks")?;
            soaked.context("the soak failed")?;
            releases.context("the release artifacts failed their checks")?;
            matrix
        }
        Task::Vmtest(args) => {
            setup::build_prerequisites(&root)?;
            let tools = setup::test_prerequisites(&root)?;
            vmtest::run(&root, &args, &tools)
        }
        Task::Lint => {
            setup::build_prerequisites(&root)?;
            lint()
        }
        Task::Bench(args) => {
            setup::build_prerequisites(&root)?;
            setup::bench_prerequisites()?;
            build_release(&root)?;
            bench::run(&root, &args)
        }
        Task::Soak(args) => {
            setup::build_prerequisites(&root)?;
            setup::test_prerequisites(&root)?;
            build_release(&root)?;
            soak::run(&root, &args)
        }
        Task::Loadgen(command) => bench::load::run(command),
        Task::Floor { program } => bench::floor::hold(program),
    }
}

/// helm, kubernetes-validate and promtool, installed where missing.
fn chart_tools(root: &std::path::Path) -> anyhow::Result<chart::Tools> {
    let bin = setup::test_prerequisites(root)?;
    Ok(chart::Tools { installed: setup::chart_prerequisites(root)?, bin })
}

/// `cargo xtask dist` for `arches`: builds and checks every artifact, and lists them.
fn dist_for(root: &std::path::Path, arches: &[arch::Arch]) -> anyhow::Result<()> {
    setup::dist_prerequisites()?;
    for artifact in dist::run(root, arches)? {
        eprintln!("xtask: {}", artifact.display());
    }
    Ok(())
}

/// The release artifacts of every architecture, as `cargo xtask test` checks them.
fn dist_checked(root: &std::path::Path) -> anyhow::Result<()> {
    eprintln!("xtask: building and checking the release artifacts (`cargo xtask dist`)");
    dist_for(root, &arch::Arch::ALL)
}

fn workspace_root() -> PathBuf {
    let xtask_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Builds the release binary. When nothing changed since the last build it prints nothing,
/// so `cargo xtask run -- ARGS` shows only tcpstate's output.
fn build_release(root: &std::path::Path) -> anyhow::Result<()> {
    let mut command = cargo();
    command.args(["build", "--release", "--package", "tracer"]);
    if binary_is_newer_than_sources(root) {
        // Most likely nothing to do; cargo still checks, quietly.
        command.arg("--quiet");
        let status = command.status().context("running cargo build")?;
        anyhow::ensure!(status.success(), "`cargo build --release --package tracer` failed");
        return Ok(());
    }
    eprintln!("xtask: building tcpstate (the first build takes about 4 minutes on 2 cores)");
    run_logged(&mut command, "build-release")
}

/// Whether `target/release/tcpstate` is newer than every source and manifest of the crates
/// it is built from.
fn binary_is_newer_than_sources(root: &std::path::Path) -> bool {
    fn newest(path: &std::path::Path, newest_seen: &mut std::time::SystemTime) {
        let Ok(metadata) = std::fs::metadata(path) else { return };
        if metadata.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                newest(&entry.path(), newest_seen);
            }
        } else if let Ok(modified) = metadata.modified() {
            *newest_seen = (*newest_seen).max(modified);
        }
    }
    let Ok(built) = std::fs::metadata(root.join("target/release/tcpstate"))
        .and_then(|metadata| metadata.modified())
    else {
        return false;
    };
    let mut sources = std::time::SystemTime::UNIX_EPOCH;
    for part in [
        "tracer",
        "tracer-common",
        "tracer-ebpf",
        "Cargo.toml",
        "Cargo.lock",
        "rust-toolchain.toml",
    ] {
        newest(&root.join(part), &mut sources);
    }
    built > sources
}

fn lint() -> anyhow::Result<()> {
    run_checked(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    run_checked(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
}

/// Runs unit and integration tests in release mode (the binary under test is the one shipped).
/// Integration tests run in parallel, except those marked `#[serial]` (see
/// tracer/tests/integration/main.rs).
fn test(filter: Option<&str>, tools: &std::path::Path, image: &str) -> anyhow::Result<()> {
    let mut command = cargo();
    command.env("PATH", cmd::path_with(tools)).env("TCPSTATE_TEST_IMAGE", image);
    // Here the integration tests must run: not being root fails them instead of skipping.
    command.env("TCPSTATE_INTEGRATION_REQUIRED", "1");
    // Every failing test binary is reported, not only the first.
    command.args(["test", "--release", "--no-fail-fast"]);
    if !cmd::is_root() {
        // The tests load eBPF programs: run the test binaries (not the build) as root.
        command.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    if let Some(filter) = filter {
        command.arg("--").args(filter.split_whitespace());
    }
    run_checked(&mut command)
}

fn run_as_root(binary: &std::path::Path, args: &[String]) -> anyhow::Result<()> {
    let mut command = if cmd::is_root() {
        std::process::Command::new(binary)
    } else {
        let mut sudo = std::process::Command::new("sudo");
        sudo.arg("-E").arg(binary);
        sudo
    };
    command.args(args);
    let status = command.status().with_context(|| format!("starting {}", binary.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}
