//! Least privilege after setup: once the probe is attached and the port bound, the daemon
//! keeps only the capabilities it still uses, so a bug in the HTTP server or the /proc parsing
//! cannot attach tracing programs, open perf events, or do anything else root can.

use caps::{CapSet, Capability, CapsHashSet};

/// What the running daemon still needs: reading its kernel counters (a `bpf()` call, which
/// kernels with `kernel.unprivileged_bpf_disabled`, Debian's default, refuse without
/// CAP_BPF: found on 5.10), entering other network namespaces for sock_diag dumps (`setns`),
/// and finding them and the sockets' owners in other processes' `/proc` entries (`ns/net`,
/// `fd/`). Everything else, CAP_PERFMON (attaching) and CAP_SYS_RESOURCE included, goes.
pub const DAEMON_NEEDS: [Capability; 4] = [
    Capability::CAP_BPF,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Reduces this thread's capabilities to `keep` (those it has of them), in every set, and
/// removes the rest from the bounding set so no exec can regain them. Threads created
/// afterwards inherit the result: call it before starting any other thread.
pub fn keep_only(keep: &[Capability]) -> Result<CapsHashSet, caps::errors::CapsError> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = permitted.iter().copied().filter(|cap| keep.contains(cap)).collect();
    // The bounding set first: dropping from it takes CAP_SETPCAP, which is about to go.
    for cap in caps::read(None, CapSet::Bounding)? {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    Ok(kept)
}
