//! `cargo xtask dist`: what a user installs without a toolchain, in `target/dist/`: for each
//! architecture a tarball and a Debian package around the static binary, one OCI image
//! archive over every architecture, the Helm chart (whose appVersion is the image's tag), and
//! `SHA256SUMS`.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{arch::Arch, cmd::run_checked, cross};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const SUMMARY: &str = "eBPF tracer of TCP socket state changes, CLOSE_WAIT leaks and their owners";
const DESCRIPTION: &str = "tcpstate follows every TCP state transition from the kernel \
tracepoint sock:inet_sock_set_state. It streams them with their owner and time in state, \
serves transition counts, time in each state, live sockets per state and failed connections \
to Prometheus, and names the processes that leak sockets in CLOSE_WAIT.";

/// Files of the repository every artifact carries: (path in the repository, name inside).
const DOCS: [(&str, &str); 5] = [
    ("README.md", "README.md"),
    ("LICENSE-MIT", "LICENSE-MIT"),
    ("LICENSE-APACHE", "LICENSE-APACHE"),
    ("deploy/prometheus/alerts.yml", "alerts.yml"),
    ("deploy/grafana/tcpstate-dashboard.json", "tcpstate-dashboard.json"),
];

/// Builds every artifact for `arches`; returns their paths.
pub fn run(root: &Path, arches: &[Arch]) -> anyhow::Result<Vec<PathBuf>> {
    let dist = root.join("target/dist");
    fs::create_dir_all(&dist)?;
    let mut artifacts = Vec::new();
    let mut binaries = Vec::new();
    for &arch in arches {
        let binary = release_binary(root, arch)?;
        artifacts.push(tarball(root, &dist, arch, &binary)?);
        artifacts.push(deb(root, &dist, arch, &binary)?);
        binaries.push((arch, binary));
    }
    let image = image(&dist, &binaries)?;
    artifacts.push(image.clone());
    let installed = crate::setup::chart_prerequisites(root)?;
    let tools = crate::chart::Tools { installed, bin: root.join("target/tools/bin") };
    artifacts.push(crate::chart::package(&tools, root, &dist)?);
    write_sums(&dist, &artifacts)?;
    check_image(&image)?;
    for package in artifacts.iter().filter(|a| a.extension().is_some_and(|e| e == "deb")) {
        lint(package)?;
    }
    if let Some(&host) = arches.iter().find(|&&arch| arch == Arch::host()) {
        let package = dist.join(format!("tcpstate_{VERSION}_{}.deb", host.debian()));
        check_install(&package)?;
    }
    Ok(artifacts)
}

/// lintian reports no error (its warnings are printed).
fn lint(package: &Path) -> anyhow::Result<()> {
    let output = Command::new("lintian").arg(package).output().context("running lintian")?;
    let report = String::from_utf8_lossy(&output.stdout);
    eprint!("{report}");
    let errors: Vec<_> = report.lines().filter(|line| line.starts_with("E:")).collect();
    anyhow::ensure!(errors.is_empty(), "lintian finds errors in {}: {errors:?}", package.display());
    Ok(())
}

/// Installs the package on this host, runs what it installed and removes it again: the
/// binary answers from /usr/bin, systemd accepts the unit, and purging leaves nothing. A
/// host that already has tcpstate installed is left alone.
fn check_install(package: &Path) -> anyhow::Result<()> {
    let installed = Command::new("dpkg-query").args(["-W", "-f=${Status}", "tcpstate"]).output()?;
    if String::from_utf8_lossy(&installed.stdout).contains("installed") {
        eprintln!("xtask: NOT checking the install: tcpstate is already installed on this host");
        return Ok(());
    }
    run_checked(Command::new("dpkg").arg("--install").arg(package))?;
    let checked = (|| {
        let version = Command::new("/usr/bin/tcpstate").arg("--version").output()?;
        let version = String::from_utf8_lossy(&version.stdout);
        anyhow::ensure!(version.trim() == format!("tcpstate {VERSION}"), "--version: {version}");
        run_checked(Command::new("systemd-analyze").args(["verify", UNIT]))
    })();
    run_checked(Command::new("dpkg").args(["--purge", "tcpstate"]))?;
    checked?;
    for left in ["/usr/bin/tcpstate", UNIT, "/etc/default/tcpstate"] {
        anyhow::ensure!(!Path::new(left).exists(), "{left} is still there after purging");
    }
    eprintln!("xtask: the package installs, runs, verifies and purges cleanly on this host");
    Ok(())
}

/// Where the package installs the unit.
const UNIT: &str = "/lib/systemd/system/tcpstate.service";

/// The binary every artifact of `arch` ships: the static build, stripped (the eBPF object
/// inside keeps its BTF: it is data to the host binary), as Debian's policy asks. The arm64
/// kernel matrix runs this very file.
pub fn release_binary(root: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let binary = cross::build(root, arch)?;
    let stage = root.join("target/dist/stage");
    fs::create_dir_all(&stage)?;
    let copy = stage.join(format!("tcpstate-{}", arch.name()));
    fs::copy(&binary, &copy).with_context(|| format!("copying {}", binary.display()))?;
    run_checked(Command::new(arch.tool("strip")).args(["--strip-all"]).arg(&copy))?;
    Ok(copy)
}

/// The image's name, in the archive and once loaded (the DaemonSet's `image:`).
fn image_name() -> String {
    format!("localhost/tcpstate:{VERSION}")
}

/// `tcpstate-VERSION.oci.tar`: one OCI image index over an image per architecture, each the
/// static binary at /usr/local/bin/tcpstate and nothing else; `podman load` or `docker load`
/// takes the host's, `skopeo copy --all oci-archive:...` pushes them all to a registry.
fn image(dist: &Path, binaries: &[(Arch, PathBuf)]) -> anyhow::Result<PathBuf> {
    let index = format!("localhost/tcpstate-dist:{VERSION}");
    // A list or an image of that name left by an earlier run would refuse the new one.
    let _ = Command::new("podman").args(["manifest", "rm", &index]).output();
    let _ = Command::new("podman").args(["rmi", "--force", &index]).output();
    run_checked(Command::new("podman").args(["manifest", "create", &index]))?;
    let mut per_arch = Vec::new();
    for (arch, binary) in binaries {
        let rootfs = dist.join("stage").join(format!("image-{}", arch.debian()));
        crate::image::root_filesystem(&rootfs, binary)?;
        let name = format!("{index}-{}", arch.debian());
        crate::image::import(&rootfs, &name, Some(arch.debian()))?;
        run_checked(
            Command::new("podman")
                .args(["manifest", "add", &index])
                .arg(format!("containers-storage:{name}")),
        )?;
        per_arch.push(name);
    }
    let archive = dist.join(format!("tcpstate-{VERSION}.oci.tar"));
    let _ = fs::remove_file(&archive);
    let pushed =
        run_checked(
            Command::new("podman")
                .args(["manifest", "push", "--quiet", "--all", &index])
                .arg(format!("oci-archive:{}:{}", archive.display(), image_name())),
        );
    let _ = Command::new("podman").args(["manifest", "rm", &index]).output();
    let _ = Command::new("podman").args(["rmi", "--force"]).args(&per_arch).output();
    pushed?;
    Ok(archive)
}

/// The archive loads into podman as the DaemonSet names it, and the host's image runs
/// `tcpstate check` with the DaemonSet's privileges: ok or degraded, not failed.
fn check_image(archive: &Path) -> anyhow::Result<()> {
    run_checked(Command::new("podman").args(["load", "--quiet", "--input"]).arg(archive))?;
    let status = Command::new("podman")
        .args(crate::image::PODMAN)
        .args(["run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"])
        .args(["--pid", "host", "--network", "host", "--cap-drop", "all"])
        .args(["--cap-add", "bpf,perfmon,sys_admin,sys_ptrace,dac_read_search,sys_resource"])
        .args(["-v", "/sys/kernel/tracing:/sys/kernel/tracing"])
        .arg(image_name())
        .arg("check")
        .status()
        .context("running podman")?;
    // 0: runs fully; 3: runs degraded (the report says what is missing on this host).
    anyhow::ensure!(
        matches!(status.code(), Some(0 | 3)),
        "the image's `tcpstate check` says tcpstate cannot run ({status})"
    );
    eprintln!("xtask: the image loads and runs `tcpstate check` on this host");
    Ok(())
}

/// `tcpstate-VERSION-ARCH.tar.gz`: the binary, the systemd unit, alert rules, dashboard,
/// README and licences, in a directory of the same name.
fn tarball(root: &Path, dist: &Path, arch: Arch, binary: &Path) -> anyhow::Result<PathBuf> {
    let name = format!("tcpstate-{VERSION}-{}", arch.name());
    let stage = fresh_dir(&dist.join("stage").join(&name))?;
    install(binary, &stage.join("tcpstate"), 0o755)?;
    install(&root.join("deploy/systemd/tcpstate.service"), &stage.join("tcpstate.service"), 0o644)?;
    for (from, to) in DOCS {
        install(&root.join(from), &stage.join(to), 0o644)?;
    }
    let archive = dist.join(format!("{name}.tar.gz"));
    run_checked(
        Command::new("tar")
            .args(["--create", "--gzip", "--owner=0", "--group=0", "--numeric-owner"])
            .args(["--sort=name", "--mtime=@0", "--file"])
            .arg(&archive)
            .arg("--directory")
            .arg(stage.parent().expect("staged under dist/stage"))
            .arg(&name),
    )?;
    Ok(archive)
}

/// `tcpstate_VERSION_ARCH.deb`: the binary in /usr/bin, the unit installed but not enabled
/// or started, settings in /etc/default/tcpstate (a conffile), alert rules and dashboard in
/// /usr/share/tcpstate.
fn deb(root: &Path, dist: &Path, arch: Arch, binary: &Path) -> anyhow::Result<PathBuf> {
    let stage = fresh_dir(&dist.join("stage").join(format!("deb-{}", arch.debian())))?;
    install(binary, &stage.join("usr/bin/tcpstate"), 0o755)?;
    let unit = fs::read_to_string(root.join("deploy/systemd/tcpstate.service"))?;
    let unit = packaged_unit(&unit)?;
    write(&stage.join(UNIT.trim_start_matches('/')), unit.as_bytes(), 0o644)?;
    install(
        &root.join("deploy/debian/tcpstate.default"),
        &stage.join("etc/default/tcpstate"),
        0o644,
    )?;
    for (from, to) in &DOCS[3..] {
        install(&root.join(from), &stage.join("usr/share/tcpstate").join(to), 0o644)?;
    }
    let doc = stage.join("usr/share/doc/tcpstate");
    install(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    write(&doc.join("copyright"), copyright(root)?.as_bytes(), 0o644)?;
    write(&doc.join("changelog.gz"), &gzip(changelog().as_bytes())?, 0o644)?;
    let control = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(&root.join("deploy/debian").join(script), &control.join(script), 0o755)?;
    }
    write(&control.join("conffiles"), b"/etc/default/tcpstate\n", 0o644)?;
    install(
        &root.join("deploy/debian/lintian-overrides"),
        &stage.join("usr/share/lintian/overrides/tcpstate"),
        0o644,
    )?;
    write(&control.join("md5sums"), md5sums(&stage)?.as_bytes(), 0o644)?;
    write(&control.join("control"), control_file(arch, installed_kib(&stage)?).as_bytes(), 0o644)?;
    let package = dist.join(format!("tcpstate_{VERSION}_{}.deb", arch.debian()));
    run_checked(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&package),
    )?;
    Ok(package)
}

/// The shipped unit with the packaged binary's path.
fn packaged_unit(unit: &str) -> anyhow::Result<String> {
    const SHIPPED: &str = "ExecStart=/usr/local/bin/tcpstate run";
    anyhow::ensure!(unit.contains(SHIPPED), "the unit has no `{SHIPPED}` line to rewrite");
    Ok(unit.replace(SHIPPED, "ExecStart=/usr/bin/tcpstate run"))
}

fn control_file(arch: Arch, installed_kib: u64) -> String {
    let mut control = String::new();
    let _ = writeln!(control, "Package: tcpstate");
    let _ = writeln!(control, "Version: {VERSION}");
    let _ = writeln!(control, "Architecture: {}", arch.debian());
    let _ =
        writeln!(control, "Maintainer: The tcpstate authors <tcpstate@users.noreply.github.com>");
    let _ = writeln!(control, "Installed-Size: {installed_kib}");
    let _ = writeln!(control, "Section: net");
    let _ = writeln!(control, "Priority: optional");
    let _ = writeln!(control, "Description: {SUMMARY}");
    let _ = writeln!(control, " {}", wrap(DESCRIPTION, 78).join("\n "));
    control
}

/// Debian's machine-readable copyright format, with the licences' texts.
fn copyright(root: &Path) -> anyhow::Result<String> {
    let mit = fs::read_to_string(root.join("LICENSE-MIT"))?;
    let mit: Vec<String> = mit
        .lines()
        .map(|line| if line.trim().is_empty() { " .".to_owned() } else { format!(" {line}") })
        .collect();
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: tcpstate\n\n\
         Files: *\nCopyright: The tcpstate authors\nLicense: MIT or Apache-2.0\n\n\
         License: MIT\n{}\n\n\
         License: Apache-2.0\n On Debian systems, the full text of the Apache License 2.0 is \
         in\n /usr/share/common-licenses/Apache-2.0.\n",
        mit.join("\n")
    ))
}

fn changelog() -> String {
    format!(
        "tcpstate ({VERSION}) unstable; urgency=medium\n\n  * Release {VERSION}.\n\n \
         -- The tcpstate authors <tcpstate@users.noreply.github.com>  Thu, 01 Jan 1970 00:00:00 +0000\n"
    )
}

/// Words of `text` in lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
}

fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    child.stdin.take().context("gzip's stdin")?.write_all(data)?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "gzip failed");
    Ok(output.stdout)
}

/// `md5sum` of every file below `stage` but the control directory, relative paths.
fn md5sums(stage: &Path) -> anyhow::Result<String> {
    let files = files_below(stage)?;
    let relative: Vec<_> = files
        .iter()
        .filter_map(|f| f.strip_prefix(stage).ok())
        .filter(|f| !f.starts_with("DEBIAN"))
        .collect();
    let output = Command::new("md5sum")
        .args(&relative)
        .current_dir(stage)
        .output()
        .context("running md5sum")?;
    anyhow::ensure!(output.status.success(), "md5sum failed");
    Ok(String::from_utf8(output.stdout)?)
}

fn installed_kib(stage: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for file in files_below(stage)? {
        if !file.strip_prefix(stage).is_ok_and(|f| f.starts_with("DEBIAN")) {
            bytes += fs::metadata(&file)?.len();
        }
    }
    Ok(bytes.div_ceil(1024))
}

fn files_below(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(files_below(&path)?);
        } else {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn write_sums(dist: &Path, artifacts: &[PathBuf]) -> anyhow::Result<()> {
    let names: Vec<_> = artifacts.iter().filter_map(|a| a.file_name()).collect();
    let output = Command::new("sha256sum")
        .args(&names)
        .current_dir(dist)
        .output()
        .context("running sha256sum")?;
    anyhow::ensure!(output.status.success(), "sha256sum failed");
    fs::write(dist.join("SHA256SUMS"), output.stdout)?;
    Ok(())
}

fn fresh_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    Ok(dir.to_path_buf())
}

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &data, mode)
}

fn write(to: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    fs::create_dir_all(to.parent().expect("a file in a directory"))?;
    fs::write(to, data).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DaemonSet runs the image `dist` writes: the name and the Cargo.toml version.
    #[test]
    fn the_daemonset_names_the_image_of_this_version() {
        let daemonset = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/daemonset.yaml");
        let text = fs::read_to_string(daemonset).unwrap();
        let images: Vec<_> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("image: "))
            .map(|i| i.trim_matches('"'))
            .collect();
        assert_eq!(images, [image_name()], "{daemonset}");
    }

    #[test]
    fn the_packaged_unit_runs_the_packaged_binary() {
        let unit = packaged_unit("[Service]\nExecStart=/usr/local/bin/tcpstate run\n").unwrap();
        assert_eq!(unit, "[Service]\nExecStart=/usr/bin/tcpstate run\n");
        assert!(packaged_unit("[Service]\nExecStart=/opt/x run\n").is_err());
    }

    #[test]
    fn the_control_file_has_a_wrapped_description() {
        let control = control_file(Arch::Aarch64, 12_345);
        assert!(control.contains("Architecture: arm64\n"));
        assert!(control.contains("Installed-Size: 12345\n"));
        let long: Vec<_> =
            control.lines().skip_while(|l| !l.starts_with("Description")).skip(1).collect();
        assert!(!long.is_empty() && long.iter().all(|l| l.starts_with(' ') && l.len() <= 80));
    }
}
