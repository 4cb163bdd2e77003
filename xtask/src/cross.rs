//! Static release binaries for each architecture tcpstate ships for, built on this machine.
//!
//! Static glibc rather than musl: the daemon tunes glibc's allocator to hand large buffers
//! back to the system (`mallopt`, `malloc_trim`), and the binary shipped should be built from
//! the same libc the tests run. The eBPF program inside is compiled for the target's
//! conventions (aya-build reads the target architecture).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{
    arch::Arch,
    cmd::{cargo, run_checked},
    setup,
};

/// Builds the static binary for `arch`; returns its path.
pub fn build(root: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let mut command = cargo_for(root, arch)?;
    command.args(["build", "--release", "--package", "tracer", "--target", arch.triple()]);
    eprintln!(
        "xtask: building a static tcpstate for {} (a few minutes the first time)",
        arch.name()
    );
    run_checked(&mut command)?;
    let binary = root.join("target").join(arch.triple()).join("release/tcpstate");
    check_static(&binary)?;
    Ok(binary)
}

/// `cargo` set up to build static code for `arch` (the caller adds `--target`): the target's
/// standard library and C cross toolchain installed, and the environment that selects them.
/// Builds and test builds share it, so the test binaries run the binary that ships.
pub fn cargo_for(root: &Path, arch: Arch) -> anyhow::Result<Command> {
    let toolchain = setup::pinned_toolchain(root)?;
    setup::cross_prerequisites(&toolchain, arch)?;
    let env_triple = arch.triple().replace('-', "_");
    let cargo_triple = env_triple.to_uppercase();
    let mut command = cargo();
    // Only the target's code is static; build scripts and proc macros stay host binaries.
    command.env(format!("CARGO_TARGET_{cargo_triple}_RUSTFLAGS"), "-C target-feature=+crt-static");
    if let Some(prefix) = arch.cross_prefix() {
        command
            .env(format!("CARGO_TARGET_{cargo_triple}_LINKER"), format!("{prefix}-gcc"))
            .env(format!("CC_{env_triple}"), format!("{prefix}-gcc"))
            .env(format!("AR_{env_triple}"), arch.tool("ar"));
    }
    Ok(command)
}

/// A binary that needs no shared library runs on any distribution of its architecture.
fn check_static(binary: &Path) -> anyhow::Result<()> {
    let output = Command::new("file")
        .arg("--brief")
        .arg(binary)
        .output()
        .context("running `file` (package file)")?;
    let description = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        description.contains("statically linked") || description.contains("static-pie linked"),
        "{} is not static: {description}",
        binary.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;

    use super::*;

    /// `--arch` takes the names the docs and `uname -m` use; anything else is a usage error.
    #[test]
    fn architectures_are_named_as_uname_names_them() {
        for arch in Arch::ALL {
            assert_eq!(Arch::from_str(arch.name(), false), Ok(arch));
        }
        assert!(Arch::from_str("sparc", false).is_err());
    }
}
