//! Why a connection ended badly, from the errno the kernel left on the socket as it closed it
//! (`TransitionRecord::error`, `sk_err`): a connect that failed and why, a reset received or
//! sent, a timeout.

use tracer_common::TcpState;

/// How a transition to CLOSE ended a connection, when not by the normal exchange of FINs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The peer answered the SYN with a reset: nothing listens there (ECONNREFUSED).
    Refused,
    /// Retransmissions went unanswered (ETIMEDOUT).
    TimedOut,
    /// An ICMP error said the host or network cannot be reached (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// The peer reset the connection (ECONNRESET, or EPIPE in CLOSE_WAIT).
    ResetReceived,
    /// This side reset it: SO_LINGER 0, close() with unread data, `ss -K` (ECONNABORTED).
    ResetSent,
    /// The program gave up a connect() in progress (closed the socket in SYN_SENT).
    Aborted,
    /// Another errno.
    Other(u8),
}

impl Failure {
    /// Reads a transition and its errno; `None` for anything but a failed or aborted end.
    pub(crate) fn of(old: TcpState, new: TcpState, errno: u8) -> Option<Self> {
        if new != TcpState::CLOSE {
            return None;
        }
        Some(match i32::from(errno) {
            0 => match old {
                TcpState::SYN_SENT => Self::Aborted,
                // Left without a FIN of its own: the kernel sent a reset.
                TcpState::ESTABLISHED | TcpState::CLOSE_WAIT => Self::ResetSent,
                _ => return None,
            },
            libc::ECONNREFUSED => Self::Refused,
            libc::ETIMEDOUT => Self::TimedOut,
            libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN => {
                Self::Unreachable
            }
            libc::ECONNRESET | libc::EPIPE => Self::ResetReceived,
            libc::ECONNABORTED => Self::ResetSent,
            _ => Self::Other(errno),
        })
    }

    /// The name in `watch` and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::TimedOut => "timeout",
            Self::Unreachable => "unreachable",
            Self::ResetReceived => "reset_received",
            Self::ResetSent => "reset_sent",
            Self::Aborted => "aborted",
            Self::Other(_) => "other",
        }
    }

    #[cfg(test)]
    /// The `reason` of tcpstate_connect_failures_total, for a failure in SYN_SENT.
    pub(crate) fn connect_reason(self) -> &'static str {
        CONNECT_REASONS[self.connect_slot()]
    }

    /// The index of `connect_reason` in `CONNECT_REASONS`.
    pub(crate) fn connect_slot(self) -> usize {
        match self {
            Self::Refused => 0,
            Self::TimedOut => 1,
            Self::Unreachable => 2,
            Self::ResetReceived => 3,
            Self::ResetSent | Self::Aborted => 4,
            Self::Other(_) => 5,
        }
    }

    /// Which way the reset went, when it is one.
    pub(crate) fn reset(self) -> Option<ResetDirection> {
        match self {
            Self::ResetReceived => Some(ResetDirection::Received),
            Self::ResetSent => Some(ResetDirection::Sent),
            _ => None,
        }
    }
}

/// The `direction` of tcpstate_resets_total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ResetDirection {
    Received = 0,
    Sent = 1,
}

impl ResetDirection {
    pub(crate) const ALL: [Self; 2] = [Self::Received, Self::Sent];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Sent => "sent",
        }
    }
}

/// Every `reason` of tcpstate_connect_failures_total, in a fixed order.
pub(crate) const CONNECT_REASONS: [&str; 6] =
    ["refused", "timeout", "unreachable", "reset", "aborted", "other"];

#[cfg(test)]
mod tests {
    use super::*;
    use TcpState as S;

    #[test]
    fn errnos_name_the_failure() {
        let refused = Failure::of(S::SYN_SENT, S::CLOSE, libc::ECONNREFUSED as u8);
        assert_eq!(refused.map(Failure::connect_reason), Some("refused"));
        let unreachable = Failure::of(S::SYN_SENT, S::CLOSE, libc::EHOSTUNREACH as u8);
        assert_eq!(unreachable, Some(Failure::Unreachable));
        assert_eq!(Failure::of(S::SYN_SENT, S::CLOSE, 0), Some(Failure::Aborted));
        let reset = Failure::of(S::ESTABLISHED, S::CLOSE, libc::ECONNRESET as u8);
        assert_eq!(reset.and_then(Failure::reset), Some(ResetDirection::Received));
        let sent = Failure::of(S::ESTABLISHED, S::CLOSE, 0);
        assert_eq!(sent.and_then(Failure::reset), Some(ResetDirection::Sent));
        assert_eq!(Failure::of(S::CLOSE_WAIT, S::CLOSE, libc::EPIPE as u8), reset);
        // Normal ends and other transitions are not failures.
        assert_eq!(Failure::of(S::LAST_ACK, S::CLOSE, 0), None);
        assert_eq!(Failure::of(S::FIN_WAIT2, S::CLOSE, 0), None);
        assert_eq!(Failure::of(S::ESTABLISHED, S::FIN_WAIT1, 0), None);
        assert_eq!(Failure::of(S::SYN_SENT, S::CLOSE, 200), Some(Failure::Other(200)));
        assert_eq!(Failure::TimedOut.connect_reason(), "timeout");
        assert_eq!(Failure::ResetReceived.connect_reason(), "reset");
        assert_eq!(Failure::Other(1).connect_reason(), "other");
    }
}
