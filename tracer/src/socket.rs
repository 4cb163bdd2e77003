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

/// The process a socket belongs to, as listings name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OwnerName {
    pub pid: u32,
    pub comm: String,
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
        owner: Option<OwnerName>,
        inode: u32,
    ) -> Self {
        let (local, remote) = (key.local(), key.remote());
        let (owner_pid, owner_comm) = owner.map(|o| (o.pid, o.comm)).unzip();
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
            owner_pid,
            owner_comm,
            inode: (inode != 0).then_some(inode),
            cgroup: None,
            container: Container::default(),
        }
    }

    /// With the owner's cgroup and what it names.
    pub(crate) fn in_cgroup(mut self, cgroup: Option<&CgroupName>) -> Self {
        if let Some(named) = cgroup {
            self.cgroup = Some(named.path.clone());
            self.container = named.container.clone();
        }
        self
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
        let owner = OwnerName { pid: 42, comm: "nginx".into() };
        let view =
            SocketView::new(&key, TcpState::CLOSE_WAIT, 1_500_000_000, false, Some(owner), 0);
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
