//! TCP states with the kernel's numbering (`include/net/tcp_states.h`).

use core::fmt;

/// A TCP state as the kernel numbers it. One type for every use: the record the kernel
/// program writes, the daemon's tables and arrays (`index`), metric labels and filters
/// (`Display`, `FromStr`). A number this build does not know (a newer kernel's) stays what it
/// is and shows as `STATE_<n>`, so nothing the kernel reports is dropped or renamed.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TcpState(u8);

impl TcpState {
    pub const ESTABLISHED: Self = Self(1);
    pub const SYN_SENT: Self = Self(2);
    pub const SYN_RECV: Self = Self(3);
    pub const FIN_WAIT1: Self = Self(4);
    pub const FIN_WAIT2: Self = Self(5);
    pub const TIME_WAIT: Self = Self(6);
    pub const CLOSE: Self = Self(7);
    pub const CLOSE_WAIT: Self = Self(8);
    pub const LAST_ACK: Self = Self(9);
    pub const LISTEN: Self = Self(10);
    pub const CLOSING: Self = Self(11);
    pub const NEW_SYN_RECV: Self = Self(12);

    /// Every state this build knows, in kernel order.
    pub const ALL: [Self; 12] = [
        Self::ESTABLISHED,
        Self::SYN_SENT,
        Self::SYN_RECV,
        Self::FIN_WAIT1,
        Self::FIN_WAIT2,
        Self::TIME_WAIT,
        Self::CLOSE,
        Self::CLOSE_WAIT,
        Self::LAST_ACK,
        Self::LISTEN,
        Self::CLOSING,
        Self::NEW_SYN_RECV,
    ];

    /// Length of an array indexed by `index()`.
    pub const INDEXES: usize = 16;

    /// The state the kernel numbers `number`.
    pub const fn from_kernel(number: u8) -> Self {
        Self(number)
    }

    /// The kernel's number.
    pub const fn number(self) -> u8 {
        self.0
    }

    /// Position in an array of `INDEXES` slots: the kernel's number for every known state;
    /// numbers beyond the array share slot 0, which no state uses.
    pub const fn index(self) -> usize {
        let number = self.0 as usize;
        if number < Self::INDEXES { number } else { 0 }
    }

    pub const fn is_known(self) -> bool {
        matches!(self.0, 1..=12)
    }

    /// The name users see in output, metrics labels and filters (`ss` spelling, upper case);
    /// `None` for a number this build does not know.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::ESTABLISHED => "ESTABLISHED",
            Self::SYN_SENT => "SYN_SENT",
            Self::SYN_RECV => "SYN_RECV",
            Self::FIN_WAIT1 => "FIN_WAIT1",
            Self::FIN_WAIT2 => "FIN_WAIT2",
            Self::TIME_WAIT => "TIME_WAIT",
            Self::CLOSE => "CLOSE",
            Self::CLOSE_WAIT => "CLOSE_WAIT",
            Self::LAST_ACK => "LAST_ACK",
            Self::LISTEN => "LISTEN",
            Self::CLOSING => "CLOSING",
            Self::NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => return None,
        })
    }

    /// Parses a state name, case-insensitively, accepting `-` for `_` (`close-wait`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| {
            let wanted = state.name().unwrap_or_default().as_bytes();
            let given = name.as_bytes();
            wanted.len() == given.len()
                && wanted.iter().zip(given).all(|(&w, &g)| {
                    let g = if g == b'-' { b'_' } else { g };
                    w == g.to_ascii_uppercase()
                })
        })
    }

    /// Bit of this state in a state mask (`1 << number`, numbers folded into 16 bits).
    pub const fn mask_bit(self) -> u16 {
        1 << (self.0 & 15)
    }

    /// The transition brings a socket into existence for the tracer: created (CLOSE ->
    /// SYN_SENT by connect, CLOSE -> LISTEN by listen) or cloned from a listener on accept
    /// (LISTEN -> SYN_RECV). It has no earlier stay, and anything known under its address
    /// belongs to an earlier socket whose CLOSE was missed. Kernel program and daemon apply
    /// the same rule.
    pub const fn creates_socket(old: Self, new: Self) -> bool {
        old.0 == Self::CLOSE.0 || (old.0 == Self::LISTEN.0 && new.0 == Self::SYN_RECV.0)
    }
}

/// Known states by name, others as `STATE_<n>`: the same text everywhere.
impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.pad(name),
            None => {
                // Formatted without allocating: this crate has no `alloc`.
                let mut text = [0u8; 9];
                text[..6].copy_from_slice(b"STATE_");
                let mut len = 6;
                let digits = [self.0 / 100, self.0 / 10 % 10, self.0 % 10];
                let first = digits.iter().position(|&d| d != 0).unwrap_or(2);
                for digit in &digits[first..] {
                    text[len] = b'0' + digit;
                    len += 1;
                }
                f.pad(core::str::from_utf8(&text[..len]).unwrap_or("STATE_?"))
            }
        }
    }
}

impl fmt::Debug for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A name that is no TCP state; says which names are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownState;

impl fmt::Display for UnknownState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown TCP state; expected one of ")?;
        for (i, state) in TcpState::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            fmt::Display::fmt(state, f)?;
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

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString as _;

    use super::*;

    #[test]
    fn numbering_round_trips() {
        for state in TcpState::ALL {
            assert!(state.is_known());
            assert_eq!(TcpState::from_kernel(state.number()), state);
            assert_eq!(TcpState::from_name(&state.to_string()), Some(state));
            assert_eq!(state.index(), usize::from(state.number()));
        }
        assert!(!TcpState::from_kernel(0).is_known());
        assert!(!TcpState::from_kernel(13).is_known());
    }

    #[test]
    fn unknown_numbers_keep_their_number() {
        assert_eq!(TcpState::from_kernel(13).to_string(), "STATE_13");
        assert_eq!(TcpState::from_kernel(200).to_string(), "STATE_200");
        assert_eq!(TcpState::from_kernel(0).to_string(), "STATE_0");
        assert_eq!(TcpState::from_kernel(42).index(), 0);
        assert_eq!(TcpState::from_kernel(13).index(), 13);
    }

    #[test]
    fn names_parse_loosely() {
        assert_eq!(TcpState::from_name("close-wait"), Some(TcpState::CLOSE_WAIT));
        assert_eq!(TcpState::from_name("Established"), Some(TcpState::ESTABLISHED));
        assert_eq!(TcpState::from_name("CLOSE_WAITX"), None);
        assert_eq!(TcpState::from_name(""), None);
        assert_eq!("close-wait".parse::<TcpState>(), Ok(TcpState::CLOSE_WAIT));
        let error = "BOGUS".parse::<TcpState>().unwrap_err().to_string();
        assert!(error.starts_with("unknown TCP state; expected one of ESTABLISHED, SYN_SENT"));
        assert!(error.ends_with("CLOSING, NEW_SYN_RECV"), "{error}");
        assert_eq!(TcpState::CLOSE_WAIT.to_string(), "CLOSE_WAIT");
    }
}
