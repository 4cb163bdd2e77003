//! Kernel side of tcpstate: one record per TCP state transition, from
//! `sock:inet_sock_set_state`, with the time spent in the old state and the socket's owner.
//!
//! Per event the work is bounded and small: a few loads from the tracepoint record, one LRU
//! hash lookup and update keyed by the socket's address, one ring-buffer reservation. Every
//! event that cannot be delivered is counted per CPU; the loader reads the counters.
// On the host (clippy, `cargo check --workspace`) this is an empty std binary: the program
// only means something for the bpf target.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod transition;

use aya_ebpf::{
    EbpfContext as _,
    macros::{fexit, map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{FExitContext, TracePointContext},
};
use tracer_common::{
    KernelCounters, KernelSettings, SocketState,
    settings::{COUNTER_SLOTS, COUNTERS_MAIN},
    tracepoint as tp,
};
use transition::{Transition, claim_owner, handle_transition};

/// Load-time settings; the loader overrides this read-only global before loading.
#[unsafe(no_mangle)]
static SETTINGS: KernelSettings = KernelSettings::DEFAULT;

/// Records for userspace. The loader sets the size (`--ring-bytes`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Per-socket state keyed by `skaddr`: when the socket entered its current state and who owns
/// it. LRU, so sockets whose CLOSE was never seen cannot fill it forever. The loader sets the size.
#[map]
static SOCKETS: LruHashMap<u64, SocketState> = LruHashMap::with_max_entries(1 << 18, 0);

/// What could not be delivered, and why; one slot per program.
#[map]
static COUNTERS: PerCpuArray<KernelCounters> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    handle_transition(&ctx, &FormatRecord(&ctx), COUNTERS_MAIN, 0);
    0
}

/// accept() returns a socket whose transitions so far all ran in softirq: the process that
/// accepts it is its owner. Optional: when this cannot attach, owners of accepted sockets come
/// from /proc in userspace.
#[fexit(function = "inet_csk_accept")]
pub fn accept_owner(ctx: FExitContext) -> i32 {
    if let Ok(accepted) = ctx.ret::<u64>()
        && accepted != 0
    {
        claim_owner(accepted);
    }
    0
}

/// The tracepoint's own record, read at the offsets the loader checked against its `format`.
struct FormatRecord<'a>(&'a TracePointContext);

impl FormatRecord<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, field: tp::Field) -> T {
        self.load_at(field.offset)
    }

    /// A direct load from the record: the verifier allows aligned reads of the context at
    /// constant offsets, which is cheaper than a `bpf_probe_read_kernel` call per field.
    #[inline(always)]
    fn load_at<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: every offset used lies within a field the loader checked against the format
        // file before load, and is naturally aligned for `T`.
        unsafe { self.0.as_ptr().cast::<u8>().add(offset).cast::<T>().read() }
    }
}

impl Transition for FormatRecord<'_> {
    #[inline(always)]
    fn protocol(&self) -> u16 {
        self.load(tp::PROTOCOL)
    }

    #[inline(always)]
    fn skaddr(&self) -> u64 {
        self.load(tp::SKADDR)
    }

    #[inline(always)]
    fn states(&self) -> (i32, i32) {
        (self.load(tp::OLDSTATE), self.load(tp::NEWSTATE))
    }

    #[inline(always)]
    fn ports(&self) -> (u16, u16) {
        (self.load(tp::SPORT), self.load(tp::DPORT))
    }

    #[inline(always)]
    fn family(&self) -> u16 {
        self.load(tp::FAMILY)
    }

    #[inline(always)]
    fn addresses(&self, family: u16) -> ([u64; 2], [u64; 2]) {
        if family == tracer_common::record::AF_INET6 {
            (
                [self.load(tp::SADDR_V6), self.load_at::<u64>(tp::SADDR_V6.offset + 8)],
                [self.load(tp::DADDR_V6), self.load_at::<u64>(tp::DADDR_V6.offset + 8)],
            )
        } else {
            (
                [u64::from(self.load::<u32>(tp::SADDR)), 0],
                [u64::from(self.load::<u32>(tp::DADDR)), 0],
            )
        }
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The ring buffer, `bpf_probe_read_kernel` and the tracepoint are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
