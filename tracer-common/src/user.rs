//! Userspace side of the shared types: `Pod` markers for aya, and record decoding.

use core::fmt;

use crate::{
    KernelCounters, KernelSettings, RECORD_SIZE, SocketState, TransitionRecord,
    settings::RecentTransitions,
};

// SAFETY: all five are `#[repr(C)]`, `Copy`, made only of integers and byte arrays, with the
// padding spelled out as fields (sizes asserted where they are defined): any bit pattern is valid.
unsafe impl aya::Pod for TransitionRecord {}
unsafe impl aya::Pod for SocketState {}
unsafe impl aya::Pod for KernelCounters {}
unsafe impl aya::Pod for KernelSettings {}
unsafe impl aya::Pod for RecentTransitions {}

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
    /// Decodes one ring-buffer item. The only decoder of records: checks the length, and
    /// copies with an unaligned read (the slice carries no alignment promise).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != RECORD_SIZE {
            return Err(DecodeError::Length { got: bytes.len(), want: RECORD_SIZE });
        }
        // SAFETY: the length is exactly `size_of::<Self>()` and every bit pattern is a valid
        // `TransitionRecord` (see the `Pod` impl above).
        Ok(unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() })
    }

    /// The record's bytes, as the kernel program writes them (for tests and tools).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Self` is `repr(C)` with no implicit padding, so all its bytes are initialized.
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u8>(), RECORD_SIZE) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TransitionRecord {
        TransitionRecord {
            ts_ns: 123_456_789,
            skaddr: 0xffff_8880_1234_5678,
            dwell_ns: 42,
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
            oldstate: 2,
            newstate: 1,
            flags: crate::record::FLAG_DWELL_KNOWN,
            _pad: [0; 5],
        }
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
