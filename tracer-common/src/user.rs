//! Userspace side of the shared types: `Pod` markers for aya, and record decoding.

use core::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    KernelCounters, KernelSettings, RECORD_SIZE, SocketState, TcpState, TransitionRecord,
    record::{AF_INET, AF_INET6, CLOSED_RECORD_SIZE, FLAG_CLOSED},
    settings::{RecentTransitions, RetransmitCounts, RetransmitDestination},
};

// SAFETY: all seven are `#[repr(C)]`, `Copy`, made only of integers and byte arrays, with the
// padding spelled out as fields (sizes asserted where they are defined): any bit pattern is valid.
unsafe impl aya::Pod for TransitionRecord {}
unsafe impl aya::Pod for SocketState {}
unsafe impl aya::Pod for KernelCounters {}
unsafe impl aya::Pod for KernelSettings {}
unsafe impl aya::Pod for RecentTransitions {}
unsafe impl aya::Pod for RetransmitCounts {}
unsafe impl aya::Pod for RetransmitDestination {}

impl RetransmitDestination {
    /// The address, IPv4 where the kernel gave it v4-mapped.
    pub fn address(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.daddr);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

/// A state is its name in JSON (`"CLOSE_WAIT"`, `"STATE_13"`), written without allocating.
impl serde::Serialize for TcpState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TcpState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = TcpState;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a TCP state name such as CLOSE_WAIT")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<TcpState, E> {
                if let Some(number) = name.strip_prefix("STATE_").and_then(|n| n.parse().ok()) {
                    return Ok(TcpState::from_kernel(number));
                }
                name.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// A ring-buffer item that is not a `TransitionRecord`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The item's length differs from the record's: the kernel object and this binary disagree.
    Length { got: usize, want: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { got, want } => write!(
                f,
                "ring-buffer record of {got} bytes, expected {want}: the eBPF object and the \
                 binary were built from different sources"
            ),
        }
    }
}

impl core::error::Error for DecodeError {}

impl TransitionRecord {
    /// Decodes one ring-buffer item. The only decoder of records: checks the length against
    /// the record's kind (`FLAG_CLOSED` records carry `totals`, the others end before them),
    /// and copies bytewise (the slice carries no alignment promise).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let flags_at = core::mem::offset_of!(Self, flags);
        let closed = bytes.get(flags_at).is_some_and(|flags| flags & FLAG_CLOSED != 0);
        let want = if closed { CLOSED_RECORD_SIZE } else { RECORD_SIZE };
        if bytes.len() != want {
            return Err(DecodeError::Length { got: bytes.len(), want });
        }
        // SAFETY: every bit pattern is a valid `TransitionRecord` (see the `Pod` impl above),
        // so all zeroes is one; `want` bytes fit in it.
        let mut record: Self = unsafe { core::mem::zeroed() };
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut record).cast::<u8>(), want);
        }
        (record.family, record.saddr, record.daddr) =
            unmap_ipv4(record.family, record.saddr, record.daddr);
        Ok(record)
    }

    /// The record's bytes, as the kernel program sends them (for tests and tools).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Self` is `repr(C)` with no implicit padding, so all its bytes are
        // initialized, and `wire_size` is at most its size.
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u8>(), self.wire_size()) }
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

/// An IPv4 connection on a dual-stack IPv6 socket (`[::]` listener, `IPV6_V6ONLY=0`) is shown
/// as the IPv4 connection it is: when every address is v4-mapped (`::ffff:a.b.c.d`) or
/// unspecified and at least one is mapped, the family becomes `AF_INET` and the addresses
/// plain IPv4 (raw layout: 4 bytes, then zeros). Everything else is returned as it is.
pub fn unmap_ipv4(family: u16, saddr: [u8; 16], daddr: [u8; 16]) -> (u16, [u8; 16], [u8; 16]) {
    const MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    let mapped = |raw: &[u8; 16]| raw[..12] == MAPPED_PREFIX;
    let unspecified = |raw: &[u8; 16]| raw.iter().all(|&b| b == 0);
    if family != AF_INET6
        || !(mapped(&saddr) || mapped(&daddr))
        || !(mapped(&saddr) || unspecified(&saddr))
        || !(mapped(&daddr) || unspecified(&daddr))
    {
        return (family, saddr, daddr);
    }
    let ipv4 = |raw: [u8; 16]| {
        let mut out = [0; 16];
        if mapped(&raw) {
            out[..4].copy_from_slice(&raw[12..]);
        }
        out
    };
    (AF_INET, ipv4(saddr), ipv4(daddr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_connections_become_ipv4() {
        let mapped = |a: [u8; 4]| {
            let mut raw = [0; 16];
            raw[10] = 0xff;
            raw[11] = 0xff;
            raw[12..].copy_from_slice(&a);
            raw
        };
        let v4 = |a: [u8; 4]| {
            let mut raw = [0; 16];
            raw[..4].copy_from_slice(&a);
            raw
        };
        let loopback = [127, 0, 0, 1];
        assert_eq!(
            unmap_ipv4(AF_INET6, mapped(loopback), mapped([10, 1, 2, 3])),
            (AF_INET, v4(loopback), v4([10, 1, 2, 3]))
        );
        assert_eq!(
            unmap_ipv4(AF_INET6, mapped(loopback), [0; 16]),
            (AF_INET, v4(loopback), [0; 16])
        );
        // A dual-stack listener on [::] and a real IPv6 peer stay IPv6.
        assert_eq!(unmap_ipv4(AF_INET6, [0; 16], [0; 16]), (AF_INET6, [0; 16], [0; 16]));
        let mut v6 = [0; 16];
        v6[15] = 1;
        assert_eq!(unmap_ipv4(AF_INET6, v6, mapped(loopback)), (AF_INET6, v6, mapped(loopback)));
        assert_eq!(unmap_ipv4(AF_INET, v4(loopback), [0; 16]), (AF_INET, v4(loopback), [0; 16]));
    }

    fn sample() -> TransitionRecord {
        TransitionRecord {
            ts_ns: 123_456_789,
            skaddr: 0xffff_8880_1234_5678,
            stay_ns: 42,
            owner_cgroup: 4242,
            pid: 7,
            tgid: 8,
            owner_tgid: 9,
            netns: 4_026_531_840,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            owner_comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            sport: 40_000,
            dport: 80,
            family: crate::record::AF_INET6,
            protocol: crate::record::IPPROTO_TCP,
            oldstate: crate::TcpState::SYN_SENT,
            newstate: crate::TcpState::ESTABLISHED,
            flags: crate::record::FLAG_STAY_KNOWN,
            error: 0,
            srtt_us: 0,
            totals: crate::record::ConnectionTotals::default(),
        }
    }

    fn closing() -> TransitionRecord {
        TransitionRecord {
            oldstate: crate::TcpState::LAST_ACK,
            newstate: crate::TcpState::CLOSE,
            flags: FLAG_CLOSED | crate::record::FLAG_LIFETIME_KNOWN,
            totals: crate::record::ConnectionTotals {
                bytes_sent: 1_000_001,
                bytes_received: 3_000_000,
                lifetime_ns: 5_000_000,
                srtt_us: 8 * 40,
                total_retrans: 2,
            },
            ..sample()
        }
    }

    /// A record that ends a connection is sent whole, any other without its totals, and both
    /// come back as they were sent.
    #[test]
    fn a_closing_record_carries_its_totals_and_the_others_do_not() {
        let plain = sample();
        assert_eq!(plain.as_bytes().len(), RECORD_SIZE);
        assert_eq!(TransitionRecord::decode(plain.as_bytes()), Ok(plain));
        let closing = closing();
        assert_eq!(closing.as_bytes().len(), CLOSED_RECORD_SIZE);
        let decoded = TransitionRecord::decode(closing.as_bytes()).unwrap();
        assert_eq!(decoded.closed().map(|t| t.bytes_sent), Some(1_000_001));
        assert_eq!(decoded.lifetime_ns(), Some(5_000_000));
        assert_eq!(decoded.accepted(), Some(false));
        assert_eq!(decoded.closing_rtt_ns(), Some(40_000));
        assert_eq!(plain.lifetime_ns(), None);
        assert_eq!(plain.closed(), None);
    }

    /// A closing record cut to the plain size, or a plain one with a tail, is the kernel
    /// object and the binary disagreeing: an error, not a record with garbage totals.
    #[test]
    fn a_record_whose_length_does_not_match_its_kind_is_an_error() {
        let closing = closing();
        assert_eq!(
            TransitionRecord::decode(&closing.as_bytes()[..RECORD_SIZE]),
            Err(DecodeError::Length { got: RECORD_SIZE, want: CLOSED_RECORD_SIZE })
        );
        let mut long = [0u8; CLOSED_RECORD_SIZE];
        long[..RECORD_SIZE].copy_from_slice(sample().as_bytes());
        assert_eq!(
            TransitionRecord::decode(&long),
            Err(DecodeError::Length { got: CLOSED_RECORD_SIZE, want: RECORD_SIZE })
        );
    }

    #[test]
    fn record_round_trips() {
        let record = sample();
        assert_eq!(TransitionRecord::decode(record.as_bytes()), Ok(record));
    }

    #[test]
    fn decodes_from_unaligned_bytes() {
        let record = sample();
        let mut buf = [0u8; RECORD_SIZE + 1];
        buf[1..].copy_from_slice(record.as_bytes());
        assert_eq!(TransitionRecord::decode(&buf[1..]), Ok(record));
    }

    #[test]
    fn short_and_long_records_are_errors() {
        let record = sample();
        let bytes = record.as_bytes();
        assert_eq!(
            TransitionRecord::decode(&bytes[..RECORD_SIZE - 1]),
            Err(DecodeError::Length { got: RECORD_SIZE - 1, want: RECORD_SIZE })
        );
        assert_eq!(
            TransitionRecord::decode(&[]),
            Err(DecodeError::Length { got: 0, want: RECORD_SIZE })
        );
        let mut long = [0u8; RECORD_SIZE + 8];
        long[..RECORD_SIZE].copy_from_slice(bytes);
        assert!(TransitionRecord::decode(&long).is_err());
    }
}
