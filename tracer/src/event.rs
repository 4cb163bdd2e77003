//! A decoded transition with typed accessors: addresses, states, owner, duration.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tracer_common::{
    TcpState, TransitionRecord,
    record::{AF_INET, AF_INET6},
};

/// A state as the kernel reported it: a known state, or a number this build does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateName {
    Known(TcpState),
    Unknown(u8),
}

impl StateName {
    pub fn from_raw(raw: u8) -> Self {
        TcpState::from_u8(raw).map_or(Self::Unknown(raw), Self::Known)
    }
}

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Known(state) => f.pad(state.name()),
            Self::Unknown(raw) => f.pad(&format!("STATE_{raw}")),
        }
    }
}

/// An address as records and socket keys hold it: raw network-order bytes, IPv4 in the first 4.
pub fn ip_from_raw(family: u16, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*raw))
    } else {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

/// The inverse of `ip_from_raw`.
pub fn ip_to_raw(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `inet`, `inet6`, as output and the API name families.
pub fn family_name(family: u16) -> &'static str {
    match family {
        AF_INET => "inet",
        AF_INET6 => "inet6",
        _ => "unknown",
    }
}

/// The text of a NUL-padded kernel `comm`.
pub fn comm_str(comm: &[u8; 16]) -> Cow<'_, str> {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end])
}

/// Accessors over a record; borrowing, so the hot path never allocates.
pub trait TransitionExt {
    fn old_state(&self) -> StateName;
    fn new_state(&self) -> StateName;
    fn ip(&self, raw: &[u8; 16]) -> IpAddr;
    fn local(&self) -> SocketAddr;
    fn remote(&self) -> SocketAddr;
    fn dwell(&self) -> Option<Duration>;
    /// (pid, comm) of the owner, when known.
    fn owner(&self) -> Option<(u32, Cow<'_, str>)>;
    fn family_name(&self) -> &'static str;
}

impl TransitionExt for TransitionRecord {
    fn old_state(&self) -> StateName {
        StateName::from_raw(self.oldstate)
    }

    fn new_state(&self) -> StateName {
        StateName::from_raw(self.newstate)
    }

    fn ip(&self, raw: &[u8; 16]) -> IpAddr {
        ip_from_raw(self.family, raw)
    }

    fn local(&self) -> SocketAddr {
        SocketAddr::new(self.ip(&self.saddr), self.sport)
    }

    fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.ip(&self.daddr), self.dport)
    }

    fn dwell(&self) -> Option<Duration> {
        self.dwell_known().then(|| Duration::from_nanos(self.dwell_ns))
    }

    fn owner(&self) -> Option<(u32, Cow<'_, str>)> {
        self.owner_known().then(|| (self.owner_tgid, comm_str(&self.owner_comm)))
    }

    fn family_name(&self) -> &'static str {
        family_name(self.family)
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

    #[test]
    fn unknown_states_keep_their_number() {
        assert_eq!(StateName::from_raw(8).to_string(), "CLOSE_WAIT");
        assert_eq!(StateName::from_raw(42).to_string(), "STATE_42");
    }
}
