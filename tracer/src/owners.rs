//! Who holds a socket, from /proc: the processes whose file descriptors link to its inode
//! (`socket:[inode]`), as `ss -p` finds them, and what those processes are.
//!
//! Walking every process's descriptors is the expensive part; callers do it only for sockets
//! whose owner the kernel program could not capture, and not more often than they choose.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use procfs::process::{FDTarget, Process};

use crate::{
    cmdline::CmdlinePolicy,
    container::{Container, POD_LOGS},
    socket::Process as Owner,
};

/// Reads /proc/<pid>, with its start time; `None` when the process is gone or unreadable.
fn read_process(pid: u32, policy: CmdlinePolicy) -> Option<(Owner, u64)> {
    let process = Process::new(pid as i32).ok()?;
    let stat = process.stat().ok()?;
    let cmdline = policy.render(&process.cmdline().unwrap_or_default());
    let cgroup = process.cgroups().ok().and_then(|groups| {
        let groups = groups.0;
        groups
            .iter()
            .find(|g| g.hierarchy == 0)
            .or(groups.first())
            .map(|g| g.pathname.clone())
            .filter(|path| !path.is_empty())
    });
    let container = cgroup
        .as_deref()
        .map(|path| Container::of_cgroup(path, Path::new(POD_LOGS)))
        .unwrap_or_default();
    let owner = Owner { pid: Some(pid), comm: Some(stat.comm), cmdline, cgroup, container };
    Some((owner, stat.starttime))
}

/// Maps socket inodes to the first process (lowest pid) holding a descriptor for each of
/// `wanted`; stops early once all are found.
pub(crate) fn scan_socket_holders(wanted: &HashSet<u32>) -> HashMap<u32, u32> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let Ok(processes) = procfs::process::all_processes() else { return found };
    let mut processes: Vec<Process> = processes.flatten().collect();
    processes.sort_by_key(Process::pid);
    let mut refused = 0;
    for process in processes {
        let fds = match process.fd() {
            Ok(fds) => fds,
            Err(procfs::ProcError::PermissionDenied(_)) => {
                refused += 1;
                continue;
            }
            // Gone meanwhile, or a kernel thread.
            Err(_) => continue,
        };
        for fd in fds.flatten() {
            if let FDTarget::Socket(inode) = fd.target
                && let Ok(inode) = u32::try_from(inode)
                && wanted.contains(&inode)
            {
                found.entry(inode).or_insert(process.pid() as u32);
            }
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    if refused > 0 && found.len() < wanted.len() {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            log::warn!(
                "cannot read the descriptors of {refused} processes (/proc/<pid>/fd): owners of \
                 their sockets stay unknown; reading them needs CAP_SYS_PTRACE and \
                 CAP_DAC_READ_SEARCH"
            );
        });
    }
    found
}

/// Process details, cached by pid and checked against the process start time so a reused
/// pid is not mistaken for the old process.
pub(crate) struct ProcessCache {
    by_pid: HashMap<u32, (Owner, u64)>,
    policy: CmdlinePolicy,
}

impl ProcessCache {
    pub(crate) fn new(policy: CmdlinePolicy) -> Self {
        Self { by_pid: HashMap::new(), policy }
    }

    /// The live process `pid`, if it exists.
    pub(crate) fn get(&mut self, pid: u32) -> Option<Owner> {
        let start = Process::new(pid as i32).ok()?.stat().ok()?.starttime;
        if let Some((info, cached_start)) = self.by_pid.get(&pid)
            && *cached_start == start
        {
            return Some(info.clone());
        }
        let (info, start) = read_process(pid, self.policy)?;
        self.by_pid.insert(pid, (info.clone(), start));
        Some(info)
    }

    /// Forgets every pid not in `keep`.
    pub(crate) fn retain(&mut self, keep: &HashSet<u32>) {
        self.by_pid.retain(|pid, _| keep.contains(pid));
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::unix::fs::MetadataExt as _};

    use super::*;

    #[test]
    fn finds_this_process_holding_its_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd as _;
        let link = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode = u32::try_from(link.ino()).unwrap();
        let holders = scan_socket_holders(&HashSet::from([inode]));
        assert_eq!(holders.get(&inode), Some(&std::process::id()));
        let info = ProcessCache::new(CmdlinePolicy::Full).get(std::process::id()).unwrap();
        assert_eq!(
            info.comm.as_deref(),
            Some(std::fs::read_to_string("/proc/self/comm").unwrap().trim())
        );
        assert!(info.cmdline.is_some_and(|c| !c.is_empty()));
    }
}
