//! Where the main kernel program reads its tracepoint's record, `sock:inet_sock_set_state`;
//! the names of the retransmit tracepoints, [`retransmit`] and [`synack`].
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

/// `tcp:tcp_retransmit_skb` (Linux 4.16 on): one firing per segment sent again. Its programs
/// run on the BTF flavour and read the socket itself, not this record.
pub mod retransmit {
    pub const CATEGORY: &str = "tcp";
    pub const NAME: &str = "tcp_retransmit_skb";
}

/// `tcp:tcp_retransmit_synack`: a listener's SYN-ACK sent again, the handshake's final ACK
/// not having come. BTF flavour, as `retransmit`.
pub mod synack {
    pub const CATEGORY: &str = "tcp";
    pub const NAME: &str = "tcp_retransmit_synack";
}
