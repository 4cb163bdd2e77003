//! Network namespaces: which exist, and running a `sock_diag` dump inside one.
//!
//! The tracepoint sees sockets of every namespace; a dump sees only the namespace of the
//! thread that makes it. To reconcile containers' sockets too, the daemon finds every
//! namespace (through the processes in /proc and the bind mounts `ip netns` makes under
//! /run/netns) and dumps each from a short-lived thread that joined it.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::sockdiag::{
    DiagSocket, ListenQueue, QueuedSocket, TcpDump, dump_listen_queues, dump_tcp,
};

/// A `sock_diag` dump of the calling thread's namespace.
pub(crate) type Dumper = fn() -> io::Result<TcpDump>;

/// A network namespace, by the inode the kernel program reports (`net->ns.inum`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Namespace {
    pub inode: u32,
    /// A file that refers to it: `/proc/<pid>/ns/net` or `/run/netns/<name>`.
    pub path: PathBuf,
}

fn inode_of(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().and_then(|m| u32::try_from(m.ino()).ok())
}

/// This process's network namespace.
pub(crate) fn own() -> io::Result<Namespace> {
    let path = PathBuf::from("/proc/self/ns/net");
    let inode = inode_of(&path).ok_or_else(|| io::Error::other("cannot stat /proc/self/ns/net"))?;
    Ok(Namespace { inode, path })
}

/// Every network namespace reachable from here, once each, this process's first.
pub(crate) fn enumerate() -> Vec<Namespace> {
    let mut found: BTreeMap<u32, PathBuf> = BTreeMap::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        candidates.extend(entries.flatten().map(|e| e.path()));
    }
    if let Ok(entries) = fs::read_dir("/proc") {
        candidates.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
                .map(|e| e.path().join("ns/net")),
        );
    }
    for path in candidates {
        if let Some(inode) = inode_of(&path) {
            found.entry(inode).or_insert(path);
        }
    }
    let own = own().ok();
    let mut namespaces: Vec<_> =
        found.into_iter().map(|(inode, path)| Namespace { inode, path }).collect();
    if let Some(own) = own {
        namespaces.retain(|ns| ns.inode != own.inode);
        namespaces.insert(0, own);
    }
    namespaces
}

#[cfg(test)]
/// Runs `dump` inside `namespace`.
pub(crate) fn dump_in_with(namespace: &Namespace, dump: Dumper) -> io::Result<TcpDump> {
    inside(namespace, dump)
}

/// Runs `work` on a thread inside `namespace` (this thread when it is our own).
fn inside<T: Send>(
    namespace: &Namespace,
    work: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    if own().is_ok_and(|own| own.inode == namespace.inode) {
        return work();
    }
    let file = File::open(&namespace.path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a valid namespace fd; it changes only this thread, which
                // ends right after the work.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace dump thread panicked")))
    })
}

/// The calling thread's namespace's `net.ipv4.ip_local_port_range` (sysctls under
/// /proc/sys/net are the reader's namespace's).
fn local_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    match (bounds.next(), bounds.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some((low, high)),
        _ => None,
    }
}

/// A dump of one namespace.
#[derive(Clone, Debug, Default)]
pub(crate) struct NamespaceDump {
    pub inode: u32,
    pub sockets: Vec<DiagSocket>,
    /// Its sockets with queued data, when the dump asked for them (see `sockdiag::dump_tcp`).
    pub queued: Vec<QueuedSocket>,
    /// Sockets with queued data past `sockdiag::MAX_QUEUED`, not kept.
    pub queued_unkept: usize,
    /// Its `net.ipv4.ip_local_port_range`, when readable.
    pub port_range: Option<(u16, u16)>,
}

/// The dumps of every namespace that could be entered.
#[derive(Debug, Default)]
pub(crate) struct AllDumps {
    pub dumps: Vec<NamespaceDump>,
    /// Namespaces that could not be entered for lack of privilege: their sockets are missing.
    pub refused: usize,
}

impl AllDumps {
    /// Memory the dumped sockets take.
    pub(crate) fn bytes(&self) -> usize {
        let sockets: usize = self.dumps.iter().map(|dump| dump.sockets.capacity()).sum();
        let queued: usize = self.dumps.iter().map(|dump| dump.queued.capacity()).sum();
        sockets * size_of::<DiagSocket>() + queued * size_of::<QueuedSocket>()
    }
}

/// Dumps every namespace; the caller treats only the dumped ones as known. A namespace that
/// vanished meanwhile is skipped quietly (debug); one refused for lack of privilege is
/// counted, and the first refusal is a warning naming the capability. With `queues`, the
/// dumps keep what the stall check needs of sockets with queued data.
pub(crate) fn dump_all(queues: bool) -> AllDumps {
    if queues { dump_all_with(|| dump_tcp(true)) } else { dump_all_with(|| dump_tcp(false)) }
}

/// Runs `dump` in every namespace.
pub(crate) fn dump_all_with(dump: Dumper) -> AllDumps {
    let own = own().ok().map(|ns| ns.inode);
    let mut refused = 0;
    let dumps = enumerate()
        .into_iter()
        .filter_map(|ns| match inside(&ns, || Ok((dump()?, local_port_range()))) {
            Ok((TcpDump { sockets, queued, queued_unkept }, port_range)) => {
                Some(NamespaceDump { inode: ns.inode, sockets, queued, queued_unkept, port_range })
            }
            Err(error) if Some(ns.inode) == own => {
                // Not a namespace that vanished: sock_diag does not work on this host.
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    log::warn!(
                        "sock_diag dump failed ({error}): socket gauges count only sockets seen \
                         changing state since tcpstate started, and TIME_WAIT is not counted. \
                         Load the kernel's socket diagnostics: modprobe tcp_diag"
                    );
                });
                None
            }
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                refused += 1;
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    log::warn!(
                        "cannot enter network namespace {} ({}): {error}. Sockets of namespaces \
                         tcpstate cannot enter are missing from gauges and leak reports \
                         (counted in tcpstate_netns_skipped); entering them needs CAP_SYS_ADMIN, \
                         finding them CAP_SYS_PTRACE",
                        ns.inode,
                        ns.path.display()
                    );
                });
                None
            }
            Err(error) => {
                log::debug!(
                    "skipping network namespace {} ({}): {error}",
                    ns.inode,
                    ns.path.display()
                );
                None
            }
        })
        .collect();
    AllDumps { dumps, refused }
}

/// One namespace's listeners, and the kernel's counts of what full accept queues cost there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NamespaceListeners {
    pub inode: u32,
    pub queues: Vec<ListenQueue>,
    /// `TcpExt: ListenOverflows`: handshakes dropped because an accept queue was full.
    pub overflows: Option<u64>,
    /// `TcpExt: ListenDrops`: every drop at a listener, overflows included.
    pub drops: Option<u64>,
}

/// The listeners of every namespace that could be entered (the reconciliation already warns
/// about the others).
pub(crate) fn listeners_all() -> Vec<NamespaceListeners> {
    enumerate()
        .into_iter()
        .filter_map(|ns| {
            inside(&ns, || {
                let queues = dump_listen_queues()?;
                // thread-self: /proc/self/net is the namespace of the process's first thread.
                let netstat = fs::read_to_string("/proc/thread-self/net/netstat").ok();
                let counter = |name| netstat.as_deref().and_then(|text| tcp_ext(text, name));
                Ok(NamespaceListeners {
                    inode: ns.inode,
                    queues,
                    overflows: counter("ListenOverflows"),
                    drops: counter("ListenDrops"),
                })
            })
            .ok()
        })
        .collect()
}

/// Counter `name` of the `TcpExt:` lines (names, then values) of `/proc/net/netstat`.
fn tcp_ext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let position = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(position)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A real dump of this namespace finds a listener this test opens, in LISTEN state.
    #[test]
    fn dump_of_own_namespace_sees_a_fresh_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let own = own().unwrap();
        let dump = dump_in_with(&own, || dump_tcp(false)).unwrap();
        let found = dump.sockets.iter().find(|s| s.local() == addr).expect("listener in dump");
        assert_eq!(found.state, tracer_common::TcpState::LISTEN);
        assert_ne!(found.inode, 0);
        assert!(enumerate().first().is_some_and(|ns| ns.inode == own.inode));
    }

    #[test]
    fn netstat_counters_are_found_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 0 7 9\n\
                       IpExt: InNoRoutes\n\
                       IpExt: 3\n";
        assert_eq!(tcp_ext(netstat, "ListenOverflows"), Some(7));
        assert_eq!(tcp_ext(netstat, "ListenDrops"), Some(9));
        assert_eq!(tcp_ext(netstat, "InNoRoutes"), None);
    }
}
