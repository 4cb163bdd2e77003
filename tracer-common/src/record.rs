//! The one record the kernel program sends per TCP state transition.

use crate::TcpState;

/// `TransitionRecord::flags`: `stay_ns` holds the time spent in `oldstate`. Unset on a first
/// sighting (a socket created or accepted just now, or older than the tracer), where the stay
/// is unknown; an unknown stay is never reported as 0.
pub const FLAG_STAY_KNOWN: u8 = 1 << 0;
/// `TransitionRecord::flags`: `owner_tgid`/`owner_comm`/`owner_cgroup` name the process that
/// owns the socket and its cgroup, captured at a transition that ran in that process's
/// context (connect, listen, close) or when accept() returned the socket.
pub const FLAG_OWNER_KNOWN: u8 = 1 << 1;
/// `TransitionRecord::flags`: the kernel skipped the main program for this event because it
/// was already running on this CPU, and the standby program delivered it instead.
pub const FLAG_RESCUED: u8 = 1 << 2;
/// `TransitionRecord::flags`: the record ends a connection (a transition to CLOSE from a
/// state past the handshake) and `totals` holds what the socket carried; the kernel sends
/// [`CLOSED_RECORD_SIZE`] bytes for it, [`RECORD_SIZE`] for any other.
pub const FLAG_CLOSED: u8 = 1 << 3;
/// `TransitionRecord::flags`, with `FLAG_CLOSED`: `totals.lifetime_ns` is known (the kernel
/// saw the connection begin).
pub const FLAG_LIFETIME_KNOWN: u8 = 1 << 4;
/// `TransitionRecord::flags`, with `FLAG_LIFETIME_KNOWN`: the connection was accepted from a
/// listener (this host is its server); without it, this host connected (its client).
pub const FLAG_ACCEPTED: u8 = 1 << 5;

/// Address family values as the tracepoint reports them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `protocol` values as the tracepoint reports them.
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_MPTCP: u16 = 262;

/// One TCP state transition, as written by the kernel program into its ring-buffer slot.
///
/// Addresses are raw network-order bytes; an IPv4 address fills the first 4 bytes and the rest
/// are zero. Ports are host byte order, as the tracepoint stores them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransitionRecord {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// The kernel address of the `struct sock`; unique while the socket lives, reused after CLOSE.
    pub skaddr: u64,
    /// Nanoseconds spent in `oldstate`, valid when `FLAG_STAY_KNOWN` is set. A move to the
    /// state the socket is already in (close() after shutdown() reports one) does not end
    /// the stay: its record carries the time so far, and the next record the whole stay.
    pub stay_ns: u64,
    /// The owner's cgroup v2 id (its cgroup directory's inode), valid when `FLAG_OWNER_KNOWN`
    /// is set: names its container without reading `/proc`.
    pub owner_cgroup: u64,
    /// Thread id of the task that was running when the transition happened (often unrelated
    /// to the socket: many transitions run in softirq context).
    pub pid: u32,
    /// Process id (tgid) of that task.
    pub tgid: u32,
    /// Process id of the socket's owner, valid when `FLAG_OWNER_KNOWN` is set.
    pub owner_tgid: u32,
    /// Inode number of the socket's network namespace (0 when it could not be read).
    pub netns: u32,
    /// `comm` of the running task, NUL-padded.
    pub comm: [u8; 16],
    /// `comm` of the owner, NUL-padded, valid when `FLAG_OWNER_KNOWN` is set.
    pub owner_comm: [u8; 16],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub oldstate: TcpState,
    pub newstate: TcpState,
    pub flags: u8,
    /// On a transition to CLOSE, the socket's pending error (`sk_err`, an errno below 256):
    /// why a connect failed or a connection was reset or timed out; 0 otherwise.
    pub error: u8,
    /// On SYN_RECV -> ESTABLISHED, the socket's smoothed round-trip time as the kernel keeps
    /// it (`tcp_sock.srtt_us`, in eighths of a microsecond). Its first sample, taken when the
    /// final ACK arrived, is the handshake's: from the SYN-ACK to that ACK. 0 otherwise, or
    /// when the kernel had no sample (a retried SYN-ACK without timestamps).
    pub srtt_us: u32,
    /// What a connection carried, valid with `FLAG_CLOSED`: sent only in records that end a
    /// connection, all zero in the others.
    pub totals: ConnectionTotals,
}

/// What a connection carried over its life, read from its `tcp_sock` as it closes (the
/// counters `tcplife` reads: nothing per packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionTotals {
    /// Payload bytes the peer acknowledged: `tcp_sock.bytes_acked` without the SYN (which a
    /// client's counts) and the FIN (once acknowledged), which take a sequence number each
    /// but carry no data. On a connection whose start the tracer did not see, a client's
    /// SYN cannot be told and stays in (one byte more).
    pub bytes_sent: u64,
    /// Payload bytes received in order: `tcp_sock.bytes_received` without the peer's FIN.
    pub bytes_received: u64,
    /// From the connection's first transition (SYN_SENT, or SYN_RECV for an accepted one) to
    /// CLOSE, valid with `FLAG_LIFETIME_KNOWN`.
    pub lifetime_ns: u64,
    /// The smoothed round-trip time at close (`tcp_sock.srtt_us`, eighths of a microsecond);
    /// 0 when the kernel had no sample.
    pub srtt_us: u32,
    /// Segments retransmitted over the connection's life (`tcp_sock.total_retrans`).
    pub total_retrans: u32,
}

/// Bytes of one record in the ring buffer (the kernel adds its own 8-byte header), for any
/// transition but one that ends a connection: the record without its `totals`.
pub const RECORD_SIZE: usize = 128;
/// Bytes of a record that ends a connection: the whole `TransitionRecord`.
pub const CLOSED_RECORD_SIZE: usize = 160;
const _: () = assert!(core::mem::offset_of!(TransitionRecord, totals) == RECORD_SIZE);
const _: () = assert!(size_of::<TransitionRecord>() == CLOSED_RECORD_SIZE);
const _: () = assert!(align_of::<TransitionRecord>() == 8);

impl TransitionRecord {
    /// Whether the socket left `oldstate`: false for a move to the state it is already in.
    pub fn ends_stay(&self) -> bool {
        self.oldstate != self.newstate
    }

    pub const fn stay_known(&self) -> bool {
        self.flags & FLAG_STAY_KNOWN != 0
    }

    pub const fn owner_known(&self) -> bool {
        self.flags & FLAG_OWNER_KNOWN != 0
    }

    pub const fn rescued(&self) -> bool {
        self.flags & FLAG_RESCUED != 0
    }

    /// What the connection this record ends carried, if it ends one.
    pub const fn closed(&self) -> Option<&ConnectionTotals> {
        if self.flags & FLAG_CLOSED != 0 { Some(&self.totals) } else { None }
    }

    /// The lifetime of the connection this record ends, where the kernel saw it begin.
    pub const fn lifetime_ns(&self) -> Option<u64> {
        if self.flags & (FLAG_CLOSED | FLAG_LIFETIME_KNOWN) == FLAG_CLOSED | FLAG_LIFETIME_KNOWN {
            Some(self.totals.lifetime_ns)
        } else {
            None
        }
    }

    /// Whether the connection this record ends was accepted (true) or connected (false),
    /// where the kernel saw it begin.
    pub const fn accepted(&self) -> Option<bool> {
        if self.lifetime_ns().is_some() { Some(self.flags & FLAG_ACCEPTED != 0) } else { None }
    }

    /// The bytes the kernel sends for this record.
    pub const fn wire_size(&self) -> usize {
        if self.flags & FLAG_CLOSED != 0 { CLOSED_RECORD_SIZE } else { RECORD_SIZE }
    }

    /// The smoothed round-trip time at close, in nanoseconds, where the kernel had a sample.
    pub fn closing_rtt_ns(&self) -> Option<u64> {
        self.closed().filter(|t| t.srtt_us != 0).map(|t| u64::from(t.srtt_us) * 125)
    }

    /// A server's handshake, in nanoseconds: the SYN-ACK's round trip, when this record
    /// completed one and the kernel measured it.
    pub fn server_handshake_ns(&self) -> Option<u64> {
        let completes =
            (self.oldstate, self.newstate) == (TcpState::SYN_RECV, TcpState::ESTABLISHED);
        (completes && self.srtt_us != 0).then(|| u64::from(self.srtt_us) * 125)
    }
}
