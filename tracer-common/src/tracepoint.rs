//! Where the kernel programs read their tracepoints' records: `sock:inet_sock_set_state`'s
//! here, the retransmit tracepoints' in [`retransmit`] and [`synack`].
//!
//! The kernel program reads these offsets directly; the loader checks each one against the
//! tracepoint's `format` file before attaching and refuses to run on a mismatch, so a kernel
//! with another layout fails loudly instead of producing garbage.

pub const CATEGORY: &str = "sock";
pub const NAME: &str = "inet_sock_set_state";

/// A field the program reads: its name in the `format` file, byte offset and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

pub const SKADDR: Field = Field { name: "skaddr", offset: 8, size: 8 };
pub const OLDSTATE: Field = Field { name: "oldstate", offset: 16, size: 4 };
pub const NEWSTATE: Field = Field { name: "newstate", offset: 20, size: 4 };
pub const SPORT: Field = Field { name: "sport", offset: 24, size: 2 };
pub const DPORT: Field = Field { name: "dport", offset: 26, size: 2 };
pub const FAMILY: Field = Field { name: "family", offset: 28, size: 2 };
pub const PROTOCOL: Field = Field { name: "protocol", offset: 30, size: 2 };
pub const SADDR: Field = Field { name: "saddr", offset: 32, size: 4 };
pub const DADDR: Field = Field { name: "daddr", offset: 36, size: 4 };
pub const SADDR_V6: Field = Field { name: "saddr_v6", offset: 40, size: 16 };
pub const DADDR_V6: Field = Field { name: "daddr_v6", offset: 56, size: 16 };

/// Every field the program reads, for the loader's check.
pub const FIELDS: [Field; 11] =
    [SKADDR, OLDSTATE, NEWSTATE, SPORT, DPORT, FAMILY, PROTOCOL, SADDR, DADDR, SADDR_V6, DADDR_V6];

/// `tcp:tcp_retransmit_skb` (Linux 4.16 on): one firing per retransmitted segment, with the
/// socket's state.
pub mod retransmit {
    use super::Field;

    pub const CATEGORY: &str = "tcp";
    pub const NAME: &str = "tcp_retransmit_skb";
    pub const STATE: Field = Field { name: "state", offset: 24, size: 4 };
    pub const SPORT: Field = Field { name: "sport", offset: 28, size: 2 };
    pub const DPORT: Field = Field { name: "dport", offset: 30, size: 2 };
    pub const FIELDS: [Field; 3] = [STATE, SPORT, DPORT];
    /// The destination address, IPv4 as v4-mapped IPv6; its offset moved when kernels added
    /// a `family` field before the addresses, so the loader finds it in the format.
    pub const DADDR_V6: &str = "daddr_v6";
    /// Newer kernels also fire for retransmits that failed, and say so in this field (an
    /// errno, 0 for a retransmit that went out); older ones fire only for those that went out.
    pub const ERR: &str = "err";
}

/// `tcp:tcp_retransmit_synack`: a listener's SYN-ACK sent again, the handshake's final ACK
/// not having come.
pub mod synack {
    use super::Field;

    pub const CATEGORY: &str = "tcp";
    pub const NAME: &str = "tcp_retransmit_synack";
    pub const SPORT: Field = Field { name: "sport", offset: 24, size: 2 };
    pub const FIELDS: [Field; 1] = [SPORT];
}
