//! The stock kernels of the matrix: which Debian suites they come from, and fetching the
//! current image of each through a private apt configuration (the system's sources stay as
//! they are), cached under `target/vmtest/kernels`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{capture, download_and_unpack, run_checked},
    cross::Arch,
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

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Where the host's apt finds Debian's main archive and its security archive.
pub struct Archives {
    pub main: String,
    security: Option<String>,
}

/// Finds the archives in the host's apt sources (one-line `.list` and deb822 `.sources`):
/// the kernels come from the same mirror the host already uses.
pub fn host_archives() -> anyhow::Result<Archives> {
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else { continue };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(deb822_entries(&text)),
            Some("list") | None => entries.extend(one_line_entries(&text)),
            _ => {}
        }
    }
    let debian = |security: bool| {
        entries
            .iter()
            .find(|(uri, suite)| {
                uri.contains("debian")
                    && suite.ends_with("-security") == security
                    && !suite.contains("backports")
            })
            .map(|(uri, _)| uri.clone())
    };
    let main = debian(false).context(
        "the host's apt sources name no Debian archive: the kernel matrix downloads Debian's \
         stock kernels through it (add a Debian mirror to /etc/apt/sources.list)",
    )?;
    Ok(Archives { main, security: debian(true) })
}

fn one_line_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "deb" {
                return None;
            }
            let mut uri = words.next()?;
            if uri.starts_with('[') {
                // Options, up to the closing bracket.
                while !uri.ends_with(']') {
                    uri = words.next()?;
                }
                uri = words.next()?;
            }
            Some((uri.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

fn deb822_entries(text: &str) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        if field("Types:").is_some_and(|t| !t.split_whitespace().any(|t| t == "deb"))
            || field("Enabled:").is_some_and(|e| e == "no")
        {
            continue;
        }
        let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else { continue };
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace() {
                entries.push((uri.to_owned(), suite.to_owned()));
            }
        }
    }
    entries
}

/// A private apt configuration for one kernel's suites and architecture.
struct PrivateApt {
    dir: PathBuf,
    arch: Arch,
}

impl PrivateApt {
    fn new(cache: &Path, guest: &Guest, archives: &Archives) -> anyhow::Result<Self> {
        let arch = guest.arch.debian();
        let dir = cache.join("apt").join(arch).join(guest.kernel.name);
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("archives/partial"))?;
        let mut list = String::new();
        for suite in guest.kernel.suites {
            let uri = if suite.ends_with("-security") {
                let Some(security) = &archives.security else {
                    eprintln!(
                        "vmtest: no Debian security archive in the host's apt sources; {suite} left out"
                    );
                    continue;
                };
                security
            } else {
                &archives.main
            };
            list.push_str(&format!("deb [arch={arch} signed-by={KEYRING}] {uri} {suite} main\n"));
        }
        fs::write(dir.join("sources.list"), list)?;
        Ok(Self { dir, arch: guest.arch })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let option = |name: &str, value: &Path| format!("{name}={}", value.display());
        let arch = self.arch.debian();
        command
            .arg("-o")
            .arg(option("Dir::Etc::SourceList", &self.dir.join("sources.list")))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null", "-o"])
            .arg(option("Dir::State::Lists", &self.dir.join("lists")))
            .arg("-o")
            .arg(option("Dir::Cache::Archives", &self.dir.join("archives")))
            .args(["-o", &format!("APT::Architecture={arch}")])
            .args(["-o", &format!("APT::Architectures={arch}")])
            // Files are written by root into the project's tree, not by apt's sandbox user.
            .args(["-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-q"]);
        command
    }

    /// The package `linux-image-<arch>` of these suites depends on now, e.g.
    /// `linux-image-6.1.0-56-amd64`.
    fn current_image(&self) -> anyhow::Result<String> {
        let meta = format!("linux-image-{}", self.arch.debian());
        let policy = capture(self.command("apt-cache").args(["policy", &meta]))
            .context("running apt-cache")?;
        let policy = String::from_utf8_lossy(&policy.stdout);
        let candidate = policy
            .lines()
            .find_map(|line| line.trim().strip_prefix("Candidate:"))
            .map(str::trim)
            .filter(|v| *v != "(none)")
            .with_context(|| format!("no {meta} in these suites"))?;
        let show =
            capture(self.command("apt-cache").arg("show").arg(format!("{meta}={candidate}")))
                .context("running apt-cache")?;
        let show = String::from_utf8_lossy(&show.stdout);
        show.lines()
            .find_map(|line| line.strip_prefix("Depends:"))
            .and_then(|depends| depends.split([',', ' ']).find(|w| w.starts_with("linux-image-")))
            .map(str::to_owned)
            .with_context(|| format!("{meta}={candidate} names no image"))
    }
}

/// The current stock kernel of `guest`, downloaded and unpacked once.
pub fn fetch(cache: &Path, guest: &Guest) -> anyhow::Result<Kernel> {
    let kernels = cache.join("kernels");
    fs::create_dir_all(&kernels)?;
    let source = &guest.kernel;
    let apt = PrivateApt::new(cache, guest, &host_archives()?)?;
    let current = kernels.join(format!("{}-{}.current", source.name, guest.arch.debian()));
    let image = match run_checked(apt.command("apt-get").arg("update")) {
        Ok(()) => apt.current_image()?,
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

    #[test]
    fn reads_both_source_formats() {
        let list = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main\n\
                    deb-src http://m/debian bookworm main\ndeb http://m/debian-security bookworm-security main\n";
        assert_eq!(
            one_line_entries(list),
            [
                ("http://m/debian".to_owned(), "bookworm".to_owned()),
                ("http://m/debian-security".to_owned(), "bookworm-security".to_owned())
            ]
        );
        let sources = "Types: deb\nURIs: http://m/debian\nSuites: bookworm bookworm-updates\n\
                       Components: main\n\nTypes: deb-src\nURIs: http://x/debian\nSuites: sid\n";
        assert_eq!(deb822_entries(sources).len(), 2);
        assert_eq!(deb822_entries(sources)[1].1, "bookworm-updates");
    }
}
