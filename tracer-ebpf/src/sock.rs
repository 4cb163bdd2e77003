//! A kernel socket read through its address, at the offsets the loader resolved from BTF: what
//! the programs on BTF tracepoints read in place of a classic tracepoint's record.

use aya_ebpf::{EbpfContext as _, helpers::bpf_probe_read_kernel, programs::BtfTracePointContext};
use tracer_common::record::AF_INET6;

use crate::transition::setting;

/// The address of a `struct sock` (or of a `struct request_sock`, which begins with the same
/// `struct sock_common`).
#[derive(Clone, Copy)]
pub struct Sock(pub u64);

impl Sock {
    /// The socket a BTF tracepoint passes as argument `n`, read as a plain number: the
    /// verifier allows no arithmetic on the typed pointer the argument would be, and the
    /// field reads need some.
    #[inline(always)]
    pub fn argument(ctx: &BtfTracePointContext, n: usize) -> Self {
        // SAFETY: the context holds the tracepoint's arguments as u64s and `n` is within them;
        // a probe read cannot fault.
        Self(unsafe { bpf_probe_read_kernel(ctx.as_ptr().cast::<u64>().add(n)) }.unwrap_or(0))
    }

    /// The value at `offset`, or `None` where the read failed.
    #[inline(always)]
    pub fn try_read<T: Copy>(self, offset: u16) -> Option<T> {
        // SAFETY: probe reads fault safely.
        unsafe { bpf_probe_read_kernel((self.0 + u64::from(offset)) as *const T) }.ok()
    }

    /// The value at `offset`; the default where the read failed.
    #[inline(always)]
    pub fn read<T: Copy + Default>(self, offset: u16) -> T {
        self.try_read(offset).unwrap_or_default()
    }

    /// Local and remote port, host order, as the tracepoints record them.
    #[inline(always)]
    pub fn ports(self) -> (u16, u16) {
        let sport: u16 = self.read(setting!(sock.sport));
        let dport: u16 = self.read(setting!(sock.dport));
        (u16::from_be(sport), u16::from_be(dport))
    }

    #[inline(always)]
    pub fn family(self) -> u16 {
        self.read(setting!(sock.family))
    }

    /// The remote address as IPv6, an IPv4 one v4-mapped, as `tcp:tcp_retransmit_skb`
    /// records it; `None` where the read failed.
    #[inline(always)]
    pub fn remote_address_v6(self) -> Option<[u8; 16]> {
        if self.family() == AF_INET6 {
            return self.try_read(setting!(sock.daddr_v6));
        }
        let v4: [u8; 4] = self.try_read(setting!(sock.daddr))?;
        Some([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]])
    }
}
