//! TCP states with the kernel's numbering (`include/net/tcp_states.h`).

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    /// Every state, in kernel order.
    pub const ALL: [Self; 12] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
    ];

    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Established),
            2 => Some(Self::SynSent),
            3 => Some(Self::SynRecv),
            4 => Some(Self::FinWait1),
            5 => Some(Self::FinWait2),
            6 => Some(Self::TimeWait),
            7 => Some(Self::Close),
            8 => Some(Self::CloseWait),
            9 => Some(Self::LastAck),
            10 => Some(Self::Listen),
            11 => Some(Self::Closing),
            12 => Some(Self::NewSynRecv),
            _ => None,
        }
    }

    /// The name users see in output, metrics labels and filters (`ss` spelling, upper case).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// Parses a state name, case-insensitively, accepting `-` for `_` (`close-wait`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| {
            let wanted = state.name().as_bytes();
            let given = name.as_bytes();
            wanted.len() == given.len()
                && wanted.iter().zip(given).all(|(&w, &g)| {
                    let g = if g == b'-' { b'_' } else { g };
                    w == g.to_ascii_uppercase()
                })
        })
    }

    /// Bit of this state in a state mask (`1 << state`).
    pub const fn mask_bit(self) -> u16 {
        1 << (self as u8)
    }
}

/// A name that is no TCP state; says which names are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownState;

impl core::fmt::Display for UnknownState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("unknown TCP state; expected one of ")?;
        for (i, state) in TcpState::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(state.name())?;
        }
        Ok(())
    }
}

impl core::error::Error for UnknownState {}

/// Parses case-insensitively, `-` for `_` (`close-wait`).
impl core::str::FromStr for TcpState {
    type Err = UnknownState;

    fn from_str(name: &str) -> Result<Self, UnknownState> {
        Self::from_name(name).ok_or(UnknownState)
    }
}

impl core::fmt::Display for TcpState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.pad(self.name())
    }
}

/// The transition brings a socket into existence for the tracer: created (CLOSE -> SYN_SENT by
/// connect, CLOSE -> LISTEN by listen) or cloned from a listener on accept (LISTEN ->
/// SYN_RECV). It has no earlier stay, and anything known under its address belongs to an
/// earlier socket whose CLOSE was missed. Kernel program and daemon apply the same rule.
pub const fn creates_socket(old: u8, new: u8) -> bool {
    old == TcpState::Close as u8
        || (old == TcpState::Listen as u8 && new == TcpState::SynRecv as u8)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString as _;

    use super::*;

    #[test]
    fn numbering_round_trips() {
        for state in TcpState::ALL {
            assert_eq!(TcpState::from_u8(state as u8), Some(state));
            assert_eq!(TcpState::from_name(state.name()), Some(state));
        }
        assert_eq!(TcpState::from_u8(0), None);
        assert_eq!(TcpState::from_u8(13), None);
    }

    #[test]
    fn names_parse_loosely() {
        assert_eq!(TcpState::from_name("close-wait"), Some(TcpState::CloseWait));
        assert_eq!(TcpState::from_name("Established"), Some(TcpState::Established));
        assert_eq!(TcpState::from_name("CLOSE_WAITX"), None);
        assert_eq!(TcpState::from_name(""), None);
        assert_eq!("close-wait".parse::<TcpState>(), Ok(TcpState::CloseWait));
        let error = "BOGUS".parse::<TcpState>().unwrap_err().to_string();
        assert!(error.starts_with("unknown TCP state; expected one of ESTABLISHED, SYN_SENT"));
        assert!(error.ends_with("CLOSING, NEW_SYN_RECV"), "{error}");
        assert_eq!(TcpState::CloseWait.to_string(), "CLOSE_WAIT");
    }
}
