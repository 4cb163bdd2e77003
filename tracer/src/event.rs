//! A decoded transition with typed accessors: addresses, states, owner, duration, failure.

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tracer_common::{TransitionRecord, ip_from_raw};

pub use crate::{failure::Failure, socket::Family};

/// The text of a NUL-padded kernel `comm`.
pub fn comm_str(comm: &[u8; 16]) -> Cow<'_, str> {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end])
}

/// Accessors over a record; borrowing, so the hot path never allocates.
pub trait TransitionExt {
    fn ip(&self, raw: &[u8; 16]) -> IpAddr;
    fn local(&self) -> SocketAddr;
    fn remote(&self) -> SocketAddr;
    fn stay(&self) -> Option<Duration>;
    /// (pid, comm) of the owner, when known.
    fn owner(&self) -> Option<(u32, Cow<'_, str>)>;
    fn family(&self) -> Family;
    /// How a transition to CLOSE ended the connection, when not normally.
    fn failure(&self) -> Option<Failure>;
}

impl TransitionExt for TransitionRecord {
    fn ip(&self, raw: &[u8; 16]) -> IpAddr {
        ip_from_raw(self.family, raw)
    }

    fn local(&self) -> SocketAddr {
        SocketAddr::new(self.ip(&self.saddr), self.sport)
    }

    fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.ip(&self.daddr), self.dport)
    }

    fn stay(&self) -> Option<Duration> {
        self.stay_known().then(|| Duration::from_nanos(self.stay_ns))
    }

    fn owner(&self) -> Option<(u32, Cow<'_, str>)> {
        self.owner_known().then(|| (self.owner_tgid, comm_str(&self.owner_comm)))
    }

    fn family(&self) -> Family {
        Family::from_raw(self.family)
    }

    fn failure(&self) -> Option<Failure> {
        Failure::of(self.oldstate, self.newstate, self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_stops_at_nul() {
        assert_eq!(comm_str(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
        assert_eq!(comm_str(b"0123456789abcdef"), "0123456789abcdef");
    }
}
