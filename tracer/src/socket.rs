//! A socket as the commands name it: its identity when its kernel address is not known (a
//! socket seen only in a `sock_diag` dump), in one place for the daemon and the leak report.

use std::net::SocketAddr;

use tracer_common::TransitionRecord;

use crate::{
    event::{family_name, ip_from_raw, ip_to_raw},
    sockdiag::DiagSocket,
};

/// A socket's identity in the absence of its kernel address: namespace and 4-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub netns: u32,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl SocketKey {
    pub fn from_record(r: &TransitionRecord) -> Self {
        Self {
            netns: r.netns,
            family: r.family,
            sport: r.sport,
            dport: r.dport,
            saddr: r.saddr,
            daddr: r.daddr,
        }
    }

    pub fn from_diag(netns: u32, socket: &DiagSocket) -> Self {
        Self {
            netns,
            family: socket.family,
            sport: socket.local.port(),
            dport: socket.remote.port(),
            saddr: ip_to_raw(socket.local.ip()),
            daddr: ip_to_raw(socket.remote.ip()),
        }
    }

    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(ip_from_raw(self.family, &self.saddr), self.sport)
    }

    pub fn remote(&self) -> SocketAddr {
        SocketAddr::new(ip_from_raw(self.family, &self.daddr), self.dport)
    }

    /// A connecting socket reports local port 0 until connect() picks one: such a key cannot
    /// match a dump yet.
    pub fn complete(&self) -> bool {
        self.sport != 0
    }

    pub fn family_name(&self) -> &'static str {
        family_name(self.family)
    }
}
