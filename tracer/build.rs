//! Builds the eBPF program (`tracer-ebpf`) with bpf-linker and the pinned toolchain, so the
//! binary can embed it.

use std::{env, fs, path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};

/// bpf-linker release that matches the pinned rustc's LLVM (see README, "Version pins").
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let workspace = Path::new(&manifest_dir).parent().context("workspace root")?;
    let toolchain = pinned_toolchain(&workspace.join("rust-toolchain.toml"))?;
    check_bpf_linker()?;

    // The eBPF crate needs `-Z build-std=core`; aya-build passes it when RUSTC_BOOTSTRAP=1,
    // which lets the pinned stable toolchain accept it.
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    // aya-build passes every line the eBPF build prints on as a cargo warning: about 50
    // "Compiling ..." lines on every build. A quiet sub-build prints only what matters:
    // compiler errors and warnings still come through its JSON messages.
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let ebpf_dir = workspace.join("tracer-ebpf");
    let ebpf_package = aya_build::Package {
        name: "tracer-ebpf",
        root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf_package], aya_build::Toolchain::Custom(&toolchain))
}

/// The toolchain `rust-toolchain.toml` pins: one place decides it for both sides.
fn pinned_toolchain(path: &Path) -> anyhow::Result<String> {
    println!("cargo:rerun-if-changed={}", path.display());
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow!("no `channel = \"...\"` in {}", path.display()))
}

fn check_bpf_linker() -> anyhow::Result<()> {
    let path = env::var_os("PATH").unwrap_or_default();
    let Some(linker) =
        env::split_paths(&path).map(|dir| dir.join("bpf-linker")).find(|p| p.is_file())
    else {
        bail!(
            "bpf-linker is not installed (not found on PATH). Run `cargo xtask setup`, which \
             installs bpf-linker {BPF_LINKER_VERSION} built against LLVM 22"
        );
    };
    println!("cargo:rerun-if-changed={}", linker.display());
    let output = Command::new(&linker).arg("--version").output();
    let version =
        output.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    if !version.ends_with(BPF_LINKER_VERSION) {
        bail!(
            "{} reports `{version}`, but this build needs bpf-linker {BPF_LINKER_VERSION} built \
             against LLVM 22. Run `cargo xtask setup`",
            linker.display()
        );
    }
    Ok(())
}
