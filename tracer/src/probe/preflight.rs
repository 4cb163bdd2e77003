//! Checks and fixes before loading: privileges, kernel version, tracefs, memlock. Each failure
//! says what is wrong and what to do about it.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Where tracefs is normally mounted, and where an older layout exposes it.
const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "tcpstate needs root, or CAP_BPF and CAP_PERFMON to load its programs (missing: \
         {missing}); the daemon also uses CAP_SYS_ADMIN (other network namespaces, and perf \
         events on Debian's kernels), CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (socket owners, \
         tracefs). Run it with sudo, or grant them: sudo setcap \
         cap_bpf,cap_perfmon,cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+ep {binary}"
    )]
    NotPermitted { missing: String, binary: String },
    #[error(
        "cannot read {path}: tracefs is readable by root only on this system; run tcpstate as \
         root, or give it CAP_DAC_READ_SEARCH as well"
    )]
    TracefsUnreadable { path: String, source: io::Error },
    #[error(
        "kernel {release} is too old: tcpstate needs the BPF ring buffer (Linux {}.{} or newer)",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    KernelTooOld { release: String },
    #[error(
        "tracefs is not mounted and mounting it at {path} failed ({source}{needs}). Mount it \
         once as root: sudo mount -t tracefs nodev /sys/kernel/tracing"
    )]
    TracefsMount { path: String, source: io::Error, needs: &'static str },
}

/// Linux capability numbers (`include/uapi/linux/capability.h`).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from `/proc/self/status`.
fn effective_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:").map(str::trim).map(str::to_owned))
        })
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .unwrap_or(0)
}

/// Loading and attaching a tracing program needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN,
/// which implies both on kernels before 5.8 split them out).
pub(crate) fn check_privileges() -> Result<(), PreflightError> {
    let caps = effective_capabilities();
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let missing: Vec<_> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect();
    Err(PreflightError::NotPermitted { missing: missing.join(", "), binary: this_binary() })
}

/// This binary's path, for the `setcap` a fix names (`command -v tcpstate` is empty when it
/// runs from a build directory).
pub(crate) fn this_binary() -> String {
    std::env::current_exe()
        .map_or_else(|_| "\"$(command -v tcpstate)\"".to_owned(), |p| p.display().to_string())
}

/// The running kernel's release string and (major, minor).
pub(crate) fn kernel_release() -> (String, (u32, u32)) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let version = parse_release(&release).unwrap_or((0, 0));
    (release, version)
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

pub(crate) fn check_kernel_version() -> Result<(u32, u32), PreflightError> {
    let (release, _) = kernel_release();
    check_release(&release)
}

/// The oldest kernel tcpstate runs on: the BPF ring buffer came with Linux 5.8. The one
/// source of this fact for the checks, their messages and (through a test) the docs.
pub(crate) const MIN_KERNEL: (u32, u32) = (5, 8);

fn check_release(release: &str) -> Result<(u32, u32), PreflightError> {
    match parse_release(release) {
        Some(version) if version >= MIN_KERNEL => Ok(version),
        _ => Err(PreflightError::KernelTooOld { release: release.to_owned() }),
    }
}

/// Whether tracefs is mounted at `path`, from the mount table: looking inside would fail
/// when the directory is readable by root only, and misreport it as not mounted.
fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return path.join("events").is_dir();
    };
    mounts.lines().any(|line| {
        // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS ... - FSTYPE SOURCE SUPER_OPTIONS`
        let mount_point = line.split(' ').nth(4);
        let fs_type = line.split(" - ").nth(1).and_then(|rest| rest.split(' ').next());
        mount_point.map(Path::new) == Some(path) && fs_type == Some("tracefs")
    })
}

/// Finds tracefs (aya reads tracepoint ids from it), mounting it where it is not mounted:
/// on some distributions nothing mounts it at boot.
pub(crate) fn ensure_tracefs() -> Result<PathBuf, PreflightError> {
    if let Some(found) = TRACEFS_MOUNTS.iter().map(Path::new).find(|p| is_mounted(p)) {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(TRACEFS_MOUNTS[0]);
    let c = |s: &str| CString::new(s).expect("no NUL in constant");
    let target_c = c(TRACEFS_MOUNTS[0]);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let ret = unsafe {
        libc::mount(
            c("nodev").as_ptr(),
            target_c.as_ptr(),
            c("tracefs").as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        let source = io::Error::last_os_error();
        let needs = match source.kind() {
            io::ErrorKind::PermissionDenied => ": mounting needs CAP_SYS_ADMIN",
            _ => "",
        };
        return Err(PreflightError::TracefsMount {
            path: target.display().to_string(),
            source,
            needs,
        });
    }
    log::info!("mounted tracefs at {}", target.display());
    Ok(target.to_path_buf())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK instead of the memory cgroup; the
/// default limit is too small for the ring buffer there.
pub(crate) fn raise_memlock_if_needed(kernel: (u32, u32)) {
    if kernel >= (5, 11) {
        return;
    }
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::warn!(
            "could not raise RLIMIT_MEMLOCK ({}); loading may fail with EPERM on this kernel",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn a_kernel_without_the_ring_buffer_is_refused_in_one_sentence() {
        assert_eq!(check_release("5.10.0-32-amd64").unwrap(), (5, 10));
        assert_eq!(check_release("5.8.0").unwrap(), (5, 8));
        let error = check_release("5.4.0-150-generic").unwrap_err().to_string();
        assert_eq!(
            error,
            "kernel 5.4.0-150-generic is too old: tcpstate needs the BPF ring buffer (Linux 5.8 \
             or newer)"
        );
        assert!(check_release("garbage").is_err());
    }

    /// The docs state the minimum this constant enforces, in the same words.
    #[test]
    fn the_docs_state_the_minimum_kernel() {
        let (major, minor) = MIN_KERNEL;
        let stated = format!("Linux {major}.{minor} or newer");
        for doc in ["../README.md", "../docs/kernels.md"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.contains(&stated), "{} does not say `{stated}`", path.display());
        }
    }
}
