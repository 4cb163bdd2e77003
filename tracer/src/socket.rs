//! A socket as the commands name and show it: its identity when its kernel address is not
//! known (a socket seen only in a `sock_diag` dump), and the one serializable view every
//! listing uses (`/api/sockets`, `/api/leaks`, `tcpstate leaks`).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};
use tracer_common::{
    TcpState, TransitionRecord, ip_from_raw,
    record::{AF_INET, AF_INET6},
};

use crate::{cgroups::CgroupName, container::Container, sockdiag::DiagSocket};

/// An address family as output and the API name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Inet,
    Inet6,
    /// Neither: not a TCP/IP socket the tracepoint reports, kept rather than dropped.
    Unknown,
}

impl Family {
    pub(crate) fn from_raw(family: u16) -> Self {
        match family {
            AF_INET => Self::Inet,
            AF_INET6 => Self::Inet6,
            _ => Self::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Inet => "inet",
            Self::Inet6 => "inet6",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// A socket's identity in the absence of its kernel address: namespace and 4-tuple. Raw
/// bytes, as records carry them (40 bytes a key, the table holds up to a million);
/// `local()`/`remote()` give the addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SocketKey {
    pub netns: u32,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl SocketKey {
    pub(crate) fn from_record(r: &TransitionRecord) -> Self {
        Self {
            netns: r.netns,
            family: r.family,
            sport: r.sport,
            dport: r.dport,
            saddr: r.saddr,
            daddr: r.daddr,
        }
    }

    pub(crate) fn from_diag(netns: u32, socket: &DiagSocket) -> Self {
        Self {
            netns,
            family: socket.family,
            sport: socket.sport,
            dport: socket.dport,
            saddr: socket.saddr,
            daddr: socket.daddr,
        }
    }

    pub(crate) fn local(&self) -> SocketAddr {
        SocketAddr::new(ip_from_raw(self.family, &self.saddr), self.sport)
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        SocketAddr::new(ip_from_raw(self.family, &self.daddr), self.dport)
    }

    /// A connecting socket reports local port 0 until connect() picks one: such a key cannot
    /// match a dump yet.
    pub(crate) fn complete(&self) -> bool {
        self.sport != 0
    }

    pub(crate) fn family(&self) -> Family {
        Family::from_raw(self.family)
    }
}

/// A socket's owner and what is known of it: the one shape the socket listings, the leak
/// report and its log lines use. (The daemon's table keeps the owner in a compact pooled
/// form, pid, comm and cgroup id, and `watch` prints a record's fields directly: neither
/// allocates per socket or per record.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Process {
    /// `None`: the owner is not known.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Arguments joined by spaces, as `--cmdline` allows (`None`: not read, or off).
    pub cmdline: Option<String>,
    /// The cgroup v2 path (or the first v1 hierarchy's), when known.
    pub cgroup: Option<String>,
    /// `container_id`, `pod_uid`, `pod_namespace`, `pod_name`, `container_name` (null when
    /// the cgroup names none).
    #[serde(flatten)]
    pub container: Container,
}

impl Process {
    /// "PID 812 server", or what is known of it.
    pub(crate) fn owner_line(&self) -> String {
        match self.pid {
            Some(pid) => format!("PID {pid} {}", self.comm_or_unknown()),
            None => format!("{} (no process found)", self.comm_or_unknown()),
        }
    }

    /// A process known by pid and name, with the cgroup the kernel named for it.
    pub(crate) fn named(pid: u32, comm: String, cgroup: Option<&CgroupName>) -> Self {
        Self {
            pid: Some(pid),
            comm: Some(comm),
            cmdline: None,
            cgroup: cgroup.map(|c| c.path.clone()),
            container: cgroup.map(|c| c.container.clone()).unwrap_or_default(),
        }
    }

    /// `container 3f4e1c2a9b8d (pod shop/checkout-7d9f)`, when the process runs in one.
    pub(crate) fn container_description(&self) -> Option<String> {
        let c = &self.container;
        let pod = match (&c.pod_namespace, &c.pod_name, &c.pod_uid) {
            (Some(namespace), Some(name), _) => Some(format!("pod {namespace}/{name}")),
            (_, _, Some(uid)) => Some(format!("pod uid {uid}")),
            _ => None,
        };
        let container =
            c.container_id.as_deref().map(|id| format!("container {}", &id[..12.min(id.len())]));
        match (container, pod) {
            (Some(container), Some(pod)) => Some(format!("{container} ({pod})")),
            (one, other) => one.or(other),
        }
    }

    pub(crate) fn comm_or_unknown(&self) -> &str {
        self.comm.as_deref().unwrap_or("unknown")
    }
}

/// One socket as every listing shows it; the keys are documented in the README.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SocketView {
    pub state: TcpState,
    pub family: Family,
    pub local_address: IpAddr,
    pub local_port: u16,
    pub remote_address: IpAddr,
    pub remote_port: u16,
    pub netns: u32,
    pub age_seconds: f64,
    /// True when the socket is older than what was observed of it (known from a dump).
    pub age_is_lower_bound: bool,
    pub owner_pid: Option<u32>,
    pub owner_comm: Option<String>,
    pub inode: Option<u32>,
    /// The owner's cgroup v2 path (null when unknown), and the container and pod it names
    /// (null when it names none).
    pub cgroup: Option<String>,
    #[serde(flatten)]
    pub container: Container,
}

impl SocketView {
    /// `inode` 0 is unknown.
    pub(crate) fn new(
        key: &SocketKey,
        state: TcpState,
        age_ns: u64,
        age_is_lower_bound: bool,
        owner: &Process,
        inode: u32,
    ) -> Self {
        let (local, remote) = (key.local(), key.remote());
        Self {
            state,
            family: key.family(),
            local_address: local.ip(),
            local_port: local.port(),
            remote_address: remote.ip(),
            remote_port: remote.port(),
            netns: key.netns,
            age_seconds: age_ns as f64 / 1e9,
            age_is_lower_bound,
            owner_pid: owner.pid,
            owner_comm: owner.comm.clone(),
            inode: (inode != 0).then_some(inode),
            cgroup: owner.cgroup.clone(),
            container: owner.container.clone(),
        }
    }

    pub(crate) fn local(&self) -> SocketAddr {
        SocketAddr::new(self.local_address, self.local_port)
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.remote_address, self.remote_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_serializes_addresses_as_text_and_reads_back() {
        let key = SocketKey {
            netns: 7,
            family: AF_INET6,
            sport: 443,
            dport: 50_000,
            saddr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            daddr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        };
        let owner = Process::named(42, "nginx".into(), None);
        let view = SocketView::new(&key, TcpState::CLOSE_WAIT, 1_500_000_000, false, &owner, 0);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["state"], "CLOSE_WAIT");
        assert_eq!(json["family"], "inet6");
        assert_eq!(json["local_address"], "fd00::1");
        assert_eq!(json["age_seconds"], 1.5);
        assert_eq!(json["owner_comm"], "nginx");
        assert!(json["inode"].is_null());
        assert_eq!(view.remote().to_string(), "[fd00::2]:50000");
        let back: SocketView = serde_json::from_value(json).unwrap();
        assert_eq!(back, view);
    }
}
