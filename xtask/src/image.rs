//! `cargo xtask image`: an OCI image of tcpstate built without a registry, from the same
//! release binary the tests run, loaded into podman and saved as an OCI archive for other
//! hosts (`ctr images import`, `podman load`, `skopeo copy`).
//!
//! The image holds `/usr/local/bin/tcpstate` and the few shared libraries it links (glibc,
//! libgcc_s), nothing else. Not a musl build: the binary shipped is the one tested on every
//! kernel of the matrix, and it keeps glibc's allocator, whose tuning the daemon relies on to
//! hand memory back (see `daemon::map_large_allocations_apart`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{capture, run_checked};

/// The image's name in podman's local storage.
pub fn name() -> String {
    format!("localhost/tcpstate:{}", env!("CARGO_PKG_VERSION"))
}

/// Where the OCI archive is written.
pub fn archive(root: &Path) -> PathBuf {
    root.join("target/image").join(format!("tcpstate-{}.oci.tar", env!("CARGO_PKG_VERSION")))
}

/// podman's flags for this machine: runc (crun refuses a hybrid cgroup layout) and cgroupfs
/// (no systemd user session needed).
pub const PODMAN: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];

/// `rootfs` anew, with `binary` at /usr/local/bin/tcpstate and the directories it needs.
pub fn root_filesystem(rootfs: &Path, binary: &Path) -> anyhow::Result<()> {
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("clearing {}", rootfs.display()))?;
    }
    let bin_dir = rootfs.join("usr/local/bin");
    fs::create_dir_all(&bin_dir)?;
    // Where tcpstate mounts tracefs when the host's is not mounted into the container.
    fs::create_dir_all(rootfs.join("sys/kernel/tracing"))?;
    fs::create_dir_all(rootfs.join("tmp"))?;
    fs::copy(binary, bin_dir.join("tcpstate"))
        .with_context(|| format!("copying {} (build it first)", binary.display()))?;
    Ok(())
}

/// Imports `rootfs` into podman as image `name` running `tcpstate run`, for `arch` (Debian's
/// name; this machine's when `None`).
pub fn import(rootfs: &Path, name: &str, arch: Option<&str>) -> anyhow::Result<()> {
    let tar = rootfs.with_extension("tar");
    run_checked(
        Command::new("tar")
            .args(["--create", "--numeric-owner", "--owner=0", "--group=0", "--file"])
            .arg(&tar)
            .arg("--directory")
            .arg(rootfs)
            .arg("."),
    )?;
    let mut import = Command::new("podman");
    import.args(PODMAN).args(["import", "--quiet"]);
    if let Some(arch) = arch {
        import.args(["--os", "linux", "--arch", arch]);
    }
    run_checked(
        import
            .args(["--change", "ENTRYPOINT [\"/usr/local/bin/tcpstate\"]"])
            .args(["--change", "CMD [\"run\"]"])
            // `kubectl exec POD -- tcpstate leaks` finds the binary by name.
            .args(["--change", "ENV PATH=/usr/local/bin:/usr/bin:/bin"])
            .args(["--change", "LABEL org.opencontainers.image.title=tcpstate"])
            .arg(&tar)
            .arg(name),
    )?;
    fs::remove_file(&tar).with_context(|| format!("removing {}", tar.display()))
}

/// Builds the image from `target/release/tcpstate`, imports it into podman and saves the
/// OCI archive; returns the image's name.
pub fn build(root: &Path) -> anyhow::Result<String> {
    let binary = root.join("target/release/tcpstate");
    let dir = root.join("target/image");
    let rootfs = dir.join("rootfs");
    root_filesystem(&rootfs, &binary)?;
    for library in shared_libraries(&binary)? {
        let inside = rootfs.join(library.strip_prefix("/").expect("ldd prints absolute paths"));
        fs::create_dir_all(inside.parent().expect("a library has a directory"))?;
        // The file itself, not the symlink ldd may name.
        fs::copy(&library, &inside).with_context(|| format!("copying {}", library.display()))?;
    }
    let name = name();
    import(&rootfs, &name, None)?;
    let archive = archive(root);
    let _ = fs::remove_file(&archive);
    run_checked(
        Command::new("podman")
            .args(PODMAN)
            .args(["save", "--quiet", "--format", "oci-archive", "--output"])
            .arg(&archive)
            .arg(&name),
    )?;
    eprintln!("xtask: image {name} loaded into podman; OCI archive {}", archive.display());
    Ok(name)
}

/// The shared libraries `binary` loads, the dynamic loader included, as ldd resolves them.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = capture(Command::new("ldd").arg(binary)).context("running ldd")?;
    if !output.status.success() {
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8(output.stdout)?;
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
    let libraries = text
        .lines()
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    Ok(libraries)
}
