//! A userland for guests of another architecture than this machine's, which cannot run the
//! host's programs: Debian bookworm for that architecture, with what the tests call (python3
//! for the leaking helpers, iproute2 for namespaces and `ss`, procps for sysctls, util-linux
//! for setpriv and unshare) and a static busybox for the initramfs. Unpacked, never
//! configured: the guest only runs programs from it. Cached under `target/vmtest/userland`.

use std::{fs, path::Path, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::debian::Archives;
use crate::{arch::Arch, cmd::run_checked};

/// Packages beyond debootstrap's minimal base (which brings util-linux).
const PACKAGES: &str = "python3,iproute2,procps,busybox-static";
const SUITE: &str = "bookworm";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The root file system for `arch`'s guests, built once per package list.
pub fn root(cache: &Path, arch: Arch, archives: &Archives) -> anyhow::Result<PathBuf> {
    let root = cache.join("userland").join(arch.debian());
    let marker = root.join(".tcpstate-packages");
    if fs::read_to_string(&marker).is_ok_and(|built| built == PACKAGES) {
        return Ok(root);
    }
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    eprintln!("vmtest: unpacking a Debian {SUITE} {} userland for the guests", arch.debian());
    // The first stage only: the second would run the target's programs to configure them.
    run_checked(
        Command::new("debootstrap")
            .args(["--foreign", "--variant=minbase"])
            .arg(format!("--arch={}", arch.debian()))
            .arg(format!("--include={PACKAGES}"))
            .arg(format!("--keyring={KEYRING}"))
            .arg(SUITE)
            .arg(&root)
            .arg(&archives.main),
    )
    .context("debootstrap (package debootstrap)")?;
    // The first stage unpacks the required packages and leaves the rest to the second.
    // Unpack those too (about a hundred packages: not echoed one by one).
    for entry in fs::read_dir(root.join("var/cache/apt/archives"))? {
        let package = entry?.path();
        if package.extension().is_some_and(|e| e == "deb") {
            let status =
                Command::new("dpkg-deb").arg("--extract").arg(&package).arg(&root).status();
            if !status.is_ok_and(|s| s.success()) {
                bail!("dpkg-deb could not unpack {}", package.display());
            }
            fs::remove_file(&package)?;
        }
    }
    fs::write(&marker, PACKAGES)?;
    Ok(root)
}
