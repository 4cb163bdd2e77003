//! `cargo xtask vmtest`: the kernel matrix. Boots each stock kernel of `kernels::MATRIX`, on
//! each architecture, in a throwaway QEMU VM and runs the real integration test binaries
//! inside it, as root.
//!
//! A guest of this machine's architecture mounts the host's root file system read-only over
//! 9p and runs the very binaries `cargo test` built here (and python3, ss, promtool from the
//! host), so it needs no image of its own: a kernel, a busybox initramfs and this machine's
//! files. A guest of another architecture gets a Debian userland of its own
//! (`userland`), the workspace at the same path, test binaries cross-built for it, and
//! the stripped release binary the tarball ships as the binary under test.
//!
//! The VMs of each architecture run one after another; the architectures run side by side,
//! one emulated CPU each.

mod initramfs;
mod kernels;
mod userland;

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{arch::Arch, cmd::cargo, dist, setup};
use kernels::{Guest, MATRIX};

#[derive(clap::Args, Debug, Default)]
pub struct VmtestArgs {
    /// Only the kernel of this version (5.10, 6.1 or 6.12); repeat for several. Default: all.
    #[arg(long = "kernel", value_name = "VERSION", value_parser = parse_kernel)]
    pub kernels: Vec<String>,
    /// Only guests of this architecture; repeat for several. Default: all.
    #[arg(long = "arch", value_enum, value_name = "ARCH")]
    pub arches: Vec<Arch>,
    /// Only tests whose name contains this (or any word of it).
    pub filter: Option<String>,
}

/// Tests that check flags, files or this host's privileges rather than the kernel (and the
/// `deploy` module: the shipped files; `http`: connection handling; `containers`: podman,
/// which the VMs do not have; `top`: a terminal UI over the daemon's endpoints): they run on
/// the host only.
const HOST_ONLY_TESTS: [&str; 12] = [
    "containers::",
    "deploy::",
    "http::",
    "top::",
    "bad_flags_are_usage_errors_naming_the_flag",
    "configuration_errors_are_usage_errors_naming_the_flag",
    "a_moved_tracepoint_field_is_refused_by_name",
    "alert_rules_pass_promtool",
    "the_listen_queue_alert_fires_on_a_queue_that_stays_full",
    "the_stall_alert_fires_on_sockets_that_stay_stalled",
    "without_privileges_the_error_says_what_is_missing",
    "http_endpoint_answers_errors_in_json",
];

/// Tests that run Prometheus or VictoriaMetrics, which are unpacked for this machine's
/// architecture only: they check the exposition and the OTLP export, userspace work that
/// guests of this architecture cover on every kernel.
const RECEIVER_TESTS: [&str; 5] = [
    "promtool_accepts_the_exposition",
    "a_real_prometheus_scrapes_the_daemon",
    "the_export_lands_in_a_real_receiver_equal_to_metrics",
    "an_outage_of_the_receiver_is_counted_and_survived",
    "credentials_in_the_headers_variable_reach_the_receiver",
];

/// Directories the guest covers with tmpfs (written by the tests: scratch files, network
/// namespaces under /run), the first one its TMPDIR and HOME; any that holds the workspace is
/// left alone when the guest sees the workspace through its root, or it could not see the
/// test binaries.
const GUEST_SCRATCH: [&str; 4] = ["/tmp", "/var/tmp", "/run", "/root"];

/// Guest CPUs, unless `TCPSTATE_VM_CPUS` says otherwise. One: with two emulated CPUs the burst
/// test finds transitions handled twice and others not delivered nor counted, a few per
/// 100,000 (the README's open problem); `TCPSTATE_VM_CPUS=2 cargo xtask vmtest burst`
/// reproduces it.
const GUEST_CPUS: &str = "1";
const GUEST_MEMORY: &str = "2048";
/// Longest a VM may run before it is stopped and counted as failed.
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A `--kernel` value: one of the matrix's versions (a usage error otherwise, exit status 2).
fn parse_kernel(value: &str) -> Result<String, String> {
    if MATRIX.iter().any(|g| g.kernel.name == value) {
        return Ok(value.to_owned());
    }
    let mut names: Vec<&str> = Vec::new();
    for guest in &MATRIX {
        if !names.contains(&guest.kernel.name) {
            names.push(guest.kernel.name);
        }
    }
    Err(format!("no kernel {value} in the matrix; choose from {}", names.join(", ")))
}

/// Runs the matrix; `tools` (Prometheus, unpacked) goes first on the PATH of guests of this
/// machine's architecture, as on the host's.
pub fn run(root: &Path, args: &VmtestArgs, tools: &Path) -> anyhow::Result<()> {
    // `parse_kernel` and clap accepted only names of the matrix.
    let selected: Vec<&Guest> = MATRIX
        .iter()
        .filter(|g| args.kernels.is_empty() || args.kernels.iter().any(|k| k == g.kernel.name))
        .filter(|g| args.arches.is_empty() || args.arches.contains(&g.arch))
        .collect();
    let mut arches: Vec<Arch> = selected.iter().map(|g| g.arch).collect();
    arches.dedup();
    setup::vm_prerequisites(&arches)?;
    let cache = root.join("target/vmtest");
    fs::create_dir_all(&cache)?;
    // Built before any VM starts: the builds want both CPUs, the VMs one each.
    let mut userlands = Vec::new();
    for &arch in &arches {
        userlands.push(Userland::prepare(root, &cache, arch, tools)?);
    }

    let results: Vec<(&Guest, anyhow::Result<KernelRun>, Duration)> = thread::scope(|scope| {
        let lanes: Vec<_> = userlands
            .iter()
            .map(|userland| {
                let guests: Vec<&Guest> =
                    selected.iter().copied().filter(|g| g.arch == userland.arch).collect();
                let cache = &cache;
                let filter = args.filter.as_deref();
                scope.spawn(move || {
                    guests
                        .into_iter()
                        .map(|guest| {
                            let started = Instant::now();
                            let outcome = run_guest(cache, guest, userland, filter);
                            (guest, outcome, started.elapsed())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        lanes.into_iter().flat_map(|lane| lane.join().expect("a VM lane panicked")).collect()
    });

    eprintln!("\nvmtest: kernel matrix");
    let mut failed = Vec::new();
    for (guest, outcome, elapsed) in &results {
        let name = format!("{} {}", guest.kernel.distribution, guest.arch.name());
        match outcome {
            Ok(run) if run.failures().is_empty() => eprintln!(
                "vmtest: {name:<30} {:<26} passed: {} tests in {} binaries ({:.0} s; programs \
                 active: {}{})",
                run.release,
                run.passed(),
                run.binaries.len(),
                elapsed.as_secs_f64(),
                guest.runs,
                if guest.refused.is_empty() {
                    String::new()
                } else {
                    format!("; refused as this kernel must: {}", guest.refused)
                }
            ),
            Ok(run) => {
                eprintln!(
                    "vmtest: {name:<30} {:<26} FAILED: {}",
                    run.release,
                    run.failures().join(", ")
                );
                failed.push(guest.label());
            }
            Err(error) => {
                eprintln!("vmtest: {name:<30} could not run: {error:#}");
                failed.push(guest.label());
            }
        }
    }
    if !failed.is_empty() {
        bail!("the kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// What the guests of one architecture run, and from which root file system.
struct Userland {
    arch: Arch,
    /// Shared with the guest read-only as its root.
    root: PathBuf,
    /// The workspace, shared at its own path when `root` does not hold it.
    workspace: Option<PathBuf>,
    /// A static busybox of the guest's architecture, for the initramfs.
    busybox: PathBuf,
    binaries: Vec<(String, PathBuf)>,
    /// Exported to the tests.
    environment: Vec<(&'static str, String)>,
    skipped_tests: Vec<&'static str>,
}

impl Userland {
    fn prepare(root: &Path, cache: &Path, arch: Arch, tools: &Path) -> anyhow::Result<Self> {
        let mut skipped_tests = HOST_ONLY_TESTS.to_vec();
        if arch == Arch::host() {
            let mut build = cargo();
            build.args(["test", "--release", "--package", "tracer", "--tests", "--no-run"]);
            let path = format!("{}:$PATH", fs::canonicalize(tools)?.display());
            return Ok(Self {
                arch,
                root: PathBuf::from("/"),
                workspace: None,
                busybox: PathBuf::from("/bin/busybox"),
                binaries: test_binaries(build)?,
                environment: vec![("PATH", path)],
                skipped_tests,
            });
        }
        let userland = userland::root(cache, arch, &crate::debian::host_archives()?)?;
        let workspace = fs::canonicalize(root)?;
        // The guest mounts the workspace here; a scratch directory that holds it the guest
        // creates itself.
        fs::create_dir_all(userland.join(workspace.strip_prefix("/")?))?;
        let mut build = crate::cross::cargo_for(root, arch)?;
        build.args(["test", "--release", "--package", "tracer", "--tests", "--no-run"]);
        build.args(["--target", arch.triple()]);
        let binaries = test_binaries(build)?;
        let release = dist::release_binary(root, arch)?;
        skipped_tests.extend(RECEIVER_TESTS);
        Ok(Self {
            arch,
            busybox: userland.join("bin/busybox"),
            root: userland,
            workspace: Some(workspace),
            binaries,
            environment: vec![("TCPSTATE_TEST_BINARY", release.display().to_string())],
            skipped_tests,
        })
    }
}

/// The integration test binaries `build` (a `cargo test --no-run`) makes: (name, path).
fn test_binaries(mut build: Command) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let output = build
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("building the test binaries")?;
    if !output.status.success() {
        bail!("building the test binaries failed");
    }
    let mut binaries = Vec::new();
    for line in output.stdout.split(|&b| b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
        let is_integration_test = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(path)) = (
            is_integration_test,
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            binaries.push((name.to_owned(), PathBuf::from(path)));
        }
    }
    if binaries.is_empty() {
        bail!("cargo built no integration test binaries");
    }
    Ok(binaries)
}

/// How QEMU emulates an architecture.
struct Emulator {
    program: &'static str,
    machine: &'static [&'static str],
    console: &'static str,
}

impl Emulator {
    const fn of(arch: Arch) -> Self {
        match arch {
            Arch::X86_64 => Self {
                program: "qemu-system-x86_64",
                machine: &["-accel", "tcg", "-cpu", "max"],
                console: "ttyS0",
            },
            // Pointer authentication with QEMU's own cheap algorithm: the architected one
            // costs software emulation a large share of its speed.
            Arch::Aarch64 => Self {
                program: "qemu-system-aarch64",
                machine: &["-M", "virt", "-accel", "tcg", "-cpu", "max,pauth-impdef=on"],
                console: "ttyAMA0",
            },
        }
    }
}

/// One test binary's run inside a VM.
struct BinaryRun {
    name: String,
    exit_code: Option<i32>,
    /// libtest's `test result:` line.
    summary: String,
    output: Vec<String>,
}

struct KernelRun {
    release: String,
    binaries: Vec<BinaryRun>,
}

impl KernelRun {
    fn failures(&self) -> Vec<String> {
        self.binaries
            .iter()
            .filter(|b| b.exit_code != Some(0))
            .map(|b| format!("{} (exit {:?})", b.name, b.exit_code))
            .collect()
    }

    fn passed(&self) -> u64 {
        self.binaries
            .iter()
            .filter_map(|b| {
                let after = b.summary.split("ok. ").nth(1)?;
                after.split(' ').next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

fn run_guest(
    cache: &Path,
    guest: &Guest,
    userland: &Userland,
    filter: Option<&str>,
) -> anyhow::Result<KernelRun> {
    let label = guest.label();
    let kernel = kernels::fetch(cache, guest)?;
    let work = cache.join("run").join(label.replace('/', "-"));
    fs::create_dir_all(&work)?;
    let initrd = work.join("initramfs.cpio");
    initramfs::build(&kernel, &userland.busybox, &work.join("initramfs"), &initrd)?;
    // The guest reads the script through the workspace: an absolute path outside the
    // directories it mounts over (tmp, run, root, var/tmp) when its root holds the workspace.
    let script = fs::canonicalize(&work)?.join("guest.sh");
    fs::write(&script, guest_script(guest, userland, filter))?;
    let scratch: Vec<&str> = GUEST_SCRATCH
        .into_iter()
        .filter(|dir| userland.workspace.is_some() || !script.starts_with(dir))
        .collect();
    let mut kernel_args = format!(
        "console={} panic=-1 quiet loglevel=3 tcpstate.script={} tcpstate.tmpfs={}",
        Emulator::of(guest.arch).console,
        script.display(),
        scratch.join(",")
    );
    let share = |path: &Path, tag: &str| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,readonly=on,multidevs=remap",
            path.display()
        )
    };
    let mut shares = vec![share(&userland.root, "host")];
    if let Some(workspace) = &userland.workspace {
        shares.push(share(workspace, "work"));
        kernel_args.push_str(&format!(" tcpstate.work={}", workspace.display()));
    }

    eprintln!(
        "vmtest[{label}]: booting {} ({}) under QEMU software emulation",
        kernel.release, guest.kernel.distribution
    );
    let emulator = Emulator::of(guest.arch);
    let mut qemu = Command::new(emulator.program);
    qemu.args(emulator.machine).args(["-m", GUEST_MEMORY, "-smp"]);
    qemu.arg(std::env::var("TCPSTATE_VM_CPUS").unwrap_or_else(|_| GUEST_CPUS.to_owned()));
    qemu.args(["-nographic", "-no-reboot", "-kernel"]).arg(&kernel.vmlinuz);
    qemu.arg("-initrd").arg(&initrd);
    for share in shares {
        qemu.arg("-virtfs").arg(share);
    }
    let mut qemu = qemu
        .arg("-append")
        .arg(kernel_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", emulator.program))?;
    let stdout = qemu.stdout.take().context("qemu stdout")?;
    let (lines, received) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let mut log = fs::File::create(work.join("console.log"))?;
    let deadline = Instant::now() + VM_TIMEOUT;
    let mut parser = ConsoleParser::default();
    loop {
        match received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                writeln!(log, "{line}")?;
                if let Some(progress) = parser.feed(&line) {
                    eprintln!("vmtest[{label}]: {progress}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = qemu.kill();
                parser.timed_out = true;
                break;
            }
        }
    }
    let _ = qemu.wait();
    let log_path = work.join("console.log");
    let expected: Vec<&str> = userland.binaries.iter().map(|(name, _)| name.as_str()).collect();
    let run = parser.finish(&log_path, &expected)?;
    for binary in run.binaries.iter().filter(|b| b.exit_code != Some(0)) {
        eprintln!(
            "vmtest: ---- {label} ({}): test binary `{}` failed (exit {:?}); its output:",
            run.release, binary.name, binary.exit_code
        );
        for line in &binary.output {
            eprintln!("{line}");
        }
        eprintln!("vmtest: ---- end of `{}` on {}", binary.name, run.release);
    }
    Ok(run)
}

/// The shell script the guest runs: each test binary, one test at a time (emulated CPUs are
/// slow enough to turn timing margins into flakes), as root.
fn guest_script(guest: &Guest, userland: &Userland, filter: Option<&str>) -> String {
    let mut script = String::from("set +e\n");
    for (name, value) in &userland.environment {
        script.push_str(&format!("export {name}={value}\n"));
    }
    script.push_str(&format!("export TCPSTATE_TEST_EXPECT_PARTS={}\n", guest.runs));
    script.push_str(&format!("export TCPSTATE_TEST_REFUSED_PARTS={}\n", guest.refused));
    script.push_str("export RUST_BACKTRACE=1 TCPSTATE_INTEGRATION_REQUIRED=1\n");
    let skips: String = userland.skipped_tests.iter().map(|t| format!(" --skip {t}")).collect();
    // Words of the filter are libtest's filters: a test runs when its name contains any.
    let filter: String = filter
        .into_iter()
        .flat_map(str::split_whitespace)
        .map(|word| format!(" '{}'", word.replace('\'', "")))
        .collect();
    for (name, path) in &userland.binaries {
        script.push_str(&format!(
            "echo VMTEST-BEGIN {name}\n{} --test-threads=1{skips}{filter} 2>&1\necho VMTEST-END {name} rc=$?\n",
            path.display()
        ));
    }
    script
}

/// Reads the guest's console: which binary runs, its output and exit status.
#[derive(Default)]
struct ConsoleParser {
    release: Option<String>,
    binaries: Vec<BinaryRun>,
    current: Option<BinaryRun>,
    done: bool,
    timed_out: bool,
}

impl ConsoleParser {
    /// Takes one line; returns what is worth showing as progress.
    fn feed(&mut self, line: &str) -> Option<String> {
        // The first line carries the firmware's terminal escapes before the marker.
        let line = line.find("VMTEST-").map_or(line, |at| &line[at..]);
        if let Some(release) = line.strip_prefix("VMTEST-KERNEL ") {
            self.release = Some(release.trim().to_owned());
            return Some(format!("kernel {} up", release.trim()));
        }
        if let Some(name) = line.strip_prefix("VMTEST-BEGIN ") {
            self.current = Some(BinaryRun {
                name: name.trim().to_owned(),
                exit_code: None,
                summary: String::new(),
                output: Vec::new(),
            });
            return None;
        }
        if let Some(rest) = line.strip_prefix("VMTEST-END ") {
            let mut binary = self.current.take()?;
            binary.exit_code = rest.split("rc=").nth(1).and_then(|c| c.trim().parse().ok());
            let progress = format!("{}: {}", binary.name, binary.summary);
            self.binaries.push(binary);
            return Some(progress);
        }
        if let Some(rest) = line.strip_prefix("VMTEST-DONE") {
            self.done = true;
            return Some(format!("guest script ended ({})", rest.trim()));
        }
        let current = self.current.as_mut()?;
        current.output.push(line.to_owned());
        if line.starts_with("test result:") {
            current.summary = line.to_owned();
        }
        (line.starts_with("test ") && (line.ends_with(" ok") || line.contains("FAILED")))
            .then(|| line.to_owned())
    }

    /// The run, with every binary of `expected` that never reported counted as failed: a
    /// kernel where nothing ran has not passed.
    fn finish(mut self, log: &Path, expected: &[&str]) -> anyhow::Result<KernelRun> {
        let Some(release) = self.release else {
            bail!("the VM never started its tests; console output in {}", log.display());
        };
        if let Some(mut unfinished) = self.current.take() {
            unfinished.output.push(if self.timed_out {
                format!("(stopped: the VM ran longer than {} s)", VM_TIMEOUT.as_secs())
            } else {
                "(the VM ended while this binary ran)".to_owned()
            });
            self.binaries.push(unfinished);
        }
        for name in expected {
            if !self.binaries.iter().any(|b| b.name == *name) {
                self.binaries.push(BinaryRun {
                    name: (*name).to_owned(),
                    exit_code: None,
                    summary: String::new(),
                    output: vec![format!(
                        "(never ran in the VM; console output in {})",
                        log.display()
                    )],
                });
            }
        }
        Ok(KernelRun { release, binaries: self.binaries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&str], expected: &[&str]) -> KernelRun {
        let mut parser = ConsoleParser::default();
        for line in lines {
            parser.feed(line);
        }
        parser.finish(Path::new("console.log"), expected).unwrap()
    }

    #[test]
    fn a_binary_that_never_ran_fails_the_kernel() {
        let run = parse(&["\x1b[2JVMTEST-KERNEL 6.1.0-56-amd64", "VMTEST-DONE rc=2"], &["probe"]);
        assert_eq!(run.release, "6.1.0-56-amd64");
        assert_eq!(run.failures(), ["probe (exit None)"]);
    }

    #[test]
    fn passing_binaries_are_counted() {
        let run = parse(
            &[
                "VMTEST-KERNEL 5.10.0-32-amd64",
                "VMTEST-BEGIN probe",
                "test a ... ok",
                "test result: ok. 11 passed; 0 failed; 0 ignored",
                "VMTEST-END probe rc=0",
                "VMTEST-BEGIN leaks",
                "test result: FAILED. 3 passed; 1 failed; 0 ignored",
                "VMTEST-END leaks rc=101",
                "VMTEST-DONE rc=0",
            ],
            &["probe", "leaks"],
        );
        assert_eq!(run.passed(), 11);
        assert_eq!(run.failures(), ["leaks (exit Some(101))"]);
    }

    #[test]
    fn kernels_outside_the_matrix_are_usage_errors_naming_the_choices() {
        assert_eq!(parse_kernel("6.1"), Ok("6.1".to_owned()));
        assert_eq!(
            parse_kernel("9.9").unwrap_err(),
            "no kernel 9.9 in the matrix; choose from 5.10, 6.1, 6.12"
        );
    }

    #[test]
    fn a_vm_that_never_booted_is_an_error() {
        let parser = ConsoleParser::default();
        assert!(parser.finish(Path::new("console.log"), &["probe"]).is_err());
    }
}
