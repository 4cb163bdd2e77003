//! The stock kernels of the matrix: which Debian suites they come from, and fetching the
//! current image of each through a private apt configuration (the system's sources stay as
//! they are), cached under `target/vmtest/kernels`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::{
    arch::Arch,
    cmd::{capture, download_and_unpack, run_checked},
    debian::{PrivateApt, host_archives},
};

/// A Debian suite's stock kernel.
#[derive(Clone, Copy)]
pub struct KernelSource {
    /// How `--kernel` selects it: its version.
    pub name: &'static str,
    /// The distribution whose stock kernel it is.
    pub distribution: &'static str,
    /// Debian suites whose `linux-image-<arch>` is looked at; the newest candidate wins.
    pub suites: &'static [&'static str],
}

const BULLSEYE: KernelSource =
    KernelSource { name: "5.10", distribution: "Debian 11 (bullseye)", suites: &["bullseye"] };
const BOOKWORM: KernelSource = KernelSource {
    name: "6.1",
    distribution: "Debian 12 (bookworm)",
    suites: &["bookworm", "bookworm-security"],
};
const TRIXIE: KernelSource =
    KernelSource { name: "6.12", distribution: "Debian 13 (trixie)", suites: &["trixie"] };

/// One VM of the matrix: a kernel on an architecture, and which of tcpstate's programs it must
/// run (`TCPSTATE_TEST_EXPECT_PARTS`) or refuse (`TCPSTATE_TEST_REFUSED_PARTS`). The tests
/// assert both, and the support table in docs/kernels.md says the same.
pub struct Guest {
    pub kernel: KernelSource,
    pub arch: Arch,
    pub runs: &'static str,
    pub refused: &'static str,
}

const EVERY_PART: &str = "main,standby,accept_owner,retransmits";

pub const MATRIX: [Guest; 6] = [
    Guest { kernel: BULLSEYE, arch: Arch::X86_64, runs: EVERY_PART, refused: "" },
    Guest { kernel: BOOKWORM, arch: Arch::X86_64, runs: EVERY_PART, refused: "" },
    Guest { kernel: TRIXIE, arch: Arch::X86_64, runs: EVERY_PART, refused: "" },
    // arm64 attaches fexit programs to kernel functions from 6.4 on (ftrace direct calls);
    // before, the kernel refuses the accept hook and owners come from /proc.
    Guest {
        kernel: BULLSEYE,
        arch: Arch::Aarch64,
        runs: "main,standby,retransmits",
        refused: "accept_owner",
    },
    Guest {
        kernel: BOOKWORM,
        arch: Arch::Aarch64,
        runs: "main,standby,retransmits",
        refused: "accept_owner",
    },
    Guest { kernel: TRIXIE, arch: Arch::Aarch64, runs: EVERY_PART, refused: "" },
];

impl Guest {
    /// How progress and results name it, e.g. `6.1/aarch64`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.kernel.name, self.arch.name())
    }
}

/// A kernel ready to boot.
pub struct Kernel {
    /// Its release, as `uname -r` prints it.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the package.
    pub modules: PathBuf,
}

/// The package `linux-image-<arch>` of these suites depends on now, e.g.
/// `linux-image-6.1.0-56-amd64`.
fn current_image(apt: &PrivateApt, arch: Arch) -> anyhow::Result<String> {
    let meta = format!("linux-image-{}", arch.debian());
    let policy =
        capture(apt.command("apt-cache").args(["policy", &meta])).context("running apt-cache")?;
    let policy = String::from_utf8_lossy(&policy.stdout);
    let candidate = policy
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| *v != "(none)")
        .with_context(|| format!("no {meta} in these suites"))?;
    let show = capture(apt.command("apt-cache").arg("show").arg(format!("{meta}={candidate}")))
        .context("running apt-cache")?;
    let show = String::from_utf8_lossy(&show.stdout);
    show.lines()
        .find_map(|line| line.strip_prefix("Depends:"))
        .and_then(|depends| depends.split([',', ' ']).find(|w| w.starts_with("linux-image-")))
        .map(str::to_owned)
        .with_context(|| format!("{meta}={candidate} names no image"))
}

/// The current stock kernel of `guest`, downloaded and unpacked once.
pub fn fetch(cache: &Path, guest: &Guest) -> anyhow::Result<Kernel> {
    let kernels = cache.join("kernels");
    fs::create_dir_all(&kernels)?;
    let source = &guest.kernel;
    let arch = guest.arch;
    let dir = cache.join("apt").join(arch.debian()).join(source.name);
    let apt = PrivateApt::new(dir, arch, source.suites, &host_archives()?)?;
    let current = kernels.join(format!("{}-{}.current", source.name, guest.arch.debian()));
    let image = match run_checked(apt.command("apt-get").arg("update")) {
        Ok(()) => current_image(&apt, arch)?,
        Err(error) => {
            // Offline: the last kernel fetched for this source, if any.
            let cached = fs::read_to_string(&current);
            match cached {
                Ok(image) => {
                    eprintln!("vmtest: {error:#}; using the cached {image}");
                    image.trim().to_owned()
                }
                Err(_) => return Err(error.context(format!("resolving {}", source.distribution))),
            }
        }
    };
    let unpacked = kernels.join(&image);
    if !unpacked.join("complete").exists() {
        eprintln!("vmtest: downloading {image} ({})", source.distribution);
        download_and_unpack(apt.command("apt-get"), &image, &apt.dir.join("download"), &unpacked)?;
        fs::write(unpacked.join("complete"), "")?;
    }
    fs::write(&current, &image)?;
    unpacked_kernel(&unpacked)
}

fn unpacked_kernel(dir: &Path) -> anyhow::Result<Kernel> {
    let vmlinuz = fs::read_dir(dir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("no vmlinuz in {}", dir.display()))?;
    let release =
        vmlinuz.file_name().unwrap_or_default().to_string_lossy()["vmlinuz-".len()..].to_owned();
    // Debian 13 moved modules to /usr/lib/modules.
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|base| dir.join(base).join(&release))
        .find(|p| p.is_dir());
    let Some(modules) = modules else {
        bail!("no modules for {release} in {}", dir.display());
    };
    Ok(Kernel { release, vmlinuz, modules })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel boots on every architecture tcpstate ships for, and each optional program
    /// is either asserted to run or asserted to be refused, never both.
    #[test]
    fn the_matrix_covers_each_kernel_on_each_architecture() {
        for kernel in [BULLSEYE, BOOKWORM, TRIXIE] {
            for arch in Arch::ALL {
                let guests: Vec<_> = MATRIX
                    .iter()
                    .filter(|g| g.kernel.name == kernel.name && g.arch == arch)
                    .collect();
                assert_eq!(guests.len(), 1, "{} on {}", kernel.name, arch.name());
                let guest = guests[0];
                assert!(guest.runs.split(',').any(|p| p == "main"), "{}", guest.label());
                for part in guest.refused.split(',').filter(|p| !p.is_empty()) {
                    assert!(!guest.runs.split(',').any(|p| p == part), "{}", guest.label());
                }
            }
        }
    }
}
