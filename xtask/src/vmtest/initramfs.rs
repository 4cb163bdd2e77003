//! The VM's initramfs: a static busybox, the kernel modules the guest needs before it can
//! reach the host's files (9p over virtio) or that the tests need (veth), and `init.sh`.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::kernels::Kernel;

/// Modules to load, with their dependencies; those built into a kernel are simply absent. On a
/// normal host the kernel loads the last three on first use through modprobe, which the guest
/// cannot do: the host's modules are another kernel's.
const MODULES: [&str; 6] = ["virtio_pci", "9pnet_virtio", "9p", "veth", "inet_diag", "tcp_diag"];

const INIT: &str = include_str!("init.sh");

/// Writes the initramfs for `kernel` to `out` (an uncompressed newc cpio archive); `busybox`
/// is a static one (Debian's `busybox-static`) for the guest's architecture: the initramfs has
/// no libraries.
pub fn build(kernel: &Kernel, busybox: &Path, staging: &Path, out: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(staging);
    for dir in ["bin", "proc", "sys", "dev", "host", "modules"] {
        fs::create_dir_all(staging.join(dir))?;
    }
    fs::copy(busybox, staging.join("bin/busybox"))
        .with_context(|| format!("copying {} (package busybox-static)", busybox.display()))?;
    let init = staging.join("init");
    fs::write(&init, INIT)?;
    make_executable(&init)?;

    let available = module_files(&kernel.modules)?;
    let mut loader = ModuleLoader { available, order: Vec::new(), dir: staging.join("modules") };
    for module in MODULES {
        loader.add(module)?;
    }
    fs::write(staging.join("modules/order"), loader.order.join("\n"))?;

    let files = walk(staging)?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc"])
        .current_dir(staging)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out)?)
        .spawn()
        .context("running cpio (package cpio)")?;
    let mut stdin = cpio.stdin.take().context("cpio stdin")?;
    for file in files {
        writeln!(stdin, "{}", file.strip_prefix(staging)?.display())?;
    }
    drop(stdin);
    if !cpio.wait()?.success() {
        bail!("cpio failed writing {}", out.display());
    }
    Ok(())
}

fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Every file and directory below `dir`, parents first.
fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in fs::read_dir(&next)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Module name (as the kernel spells it, `_` for `-`) to its file.
fn module_files(dir: &Path) -> anyhow::Result<HashMap<String, PathBuf>> {
    let mut modules = HashMap::new();
    for path in walk(dir)? {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if let Some((stem, _)) = name.split_once(".ko") {
            modules.insert(stem.replace('-', "_"), path);
        }
    }
    Ok(modules)
}

struct ModuleLoader {
    available: HashMap<String, PathBuf>,
    /// Load order: dependencies first.
    order: Vec<String>,
    dir: PathBuf,
}

impl ModuleLoader {
    fn add(&mut self, name: &str) -> anyhow::Result<()> {
        let name = name.replace('-', "_");
        if self.order.contains(&name) {
            return Ok(());
        }
        let Some(file) = self.available.get(&name).cloned() else {
            return Ok(()); // built in
        };
        let bytes = decompressed(&file)?;
        for dependency in module_dependencies(&bytes) {
            self.add(&dependency)?;
        }
        fs::write(self.dir.join(format!("{name}.ko")), bytes)?;
        self.order.push(name);
        Ok(())
    }
}

/// Busybox's insmod takes plain ELF: Debian 13 ships modules xz-compressed.
fn decompressed(file: &Path) -> anyhow::Result<Vec<u8>> {
    let tool = match file.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return Ok(fs::read(file)?),
    };
    let output = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .output()
        .with_context(|| format!("running {tool} to decompress {}", file.display()))?;
    if !output.status.success() {
        bail!("{tool} could not decompress {}", file.display());
    }
    Ok(output.stdout)
}

/// The `depends=` entry of the module's `.modinfo` section: NUL-separated `key=value` strings.
fn module_dependencies(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[start + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dependencies_from_modinfo() {
        let module = b"\x7fELF...\0license=GPL\0depends=9pnet,netfs\0retpoline=Y\0";
        assert_eq!(module_dependencies(module), ["9pnet", "netfs"]);
        assert!(module_dependencies(b"\0depends=\0name=veth\0").is_empty());
        assert!(module_dependencies(b"no modinfo").is_empty());
    }
}
