//! Kernel side of tcpstate: one record per TCP state transition, from
//! `sock:inet_sock_set_state`, with the time spent in the old state and the socket's owner.
//!
//! Per event the work is bounded and small: a few loads from the tracepoint record, one LRU
//! hash lookup and update keyed by the socket's address, one ring-buffer reservation. Every
//! event that cannot be delivered is counted per CPU; the loader reads the counters.
//!
//! Two programs share the work. The main one runs on the classic tracepoint and reads the
//! record the tracepoint built. The kernel skips it when the tracepoint fires while a tracing
//! program already runs on that CPU (network processing in an interrupt that landed inside
//! it). The standby, on the same tracepoint's BTF flavour, which the kernel skips only when
//! *it* is already running, delivers exactly the transitions the main program has not: the
//! main program remembers, per CPU, the last few transitions it delivered, and the standby
//! leaves those alone. Tests attach the standby first, so it delivers everything; the
//! standby then remembers what it delivered for the main program, the other way round.

// On the host (clippy, `cargo check --workspace`) this is an empty std binary: the program
// only means something for the bpf target.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inline assembly for BPF (one atomic add); the eBPF crate is built with RUSTC_BOOTSTRAP=1
// for `-Z build-std` anyway.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod retransmits;
mod sock;
mod transition;

use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, fexit, map, tracepoint},
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, FExitContext, TracePointContext},
};
use sock::Sock;
use tracer_common::{
    KernelCounters, KernelSettings, SocketState, TcpState,
    record::{AF_INET6, FLAG_RESCUED},
    settings::{
        self, COUNTER_SLOTS, COUNTERS_MAIN, COUNTERS_STANDBY, MAX_PORT_LABELS, OFFSET_UNKNOWN,
        RETRANSMIT_DESTINATIONS as DESTINATION_SLOTS, RecentTransitions, RetransmitCounts,
        RetransmitDestination, transition_id,
    },
    tracepoint as tp,
};
use transition::{Transition, claim_owner, handle_transition, setting};

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

/// Per CPU, per port label (slot 0: the other ports): retransmits by state.
#[map]
static RETRANSMITS: PerCpuArray<RetransmitCounts> =
    PerCpuArray::with_max_entries(MAX_PORT_LABELS as u32 + 1, 0);

/// Per CPU, per destination: retransmits that went out. LRU: destinations that stopped
/// retransmitting make room for new ones.
#[map]
static RETRANSMIT_DST: LruPerCpuHashMap<RetransmitDestination, u64> =
    LruPerCpuHashMap::with_max_entries(DESTINATION_SLOTS, 0);

/// Per CPU: the transitions each program delivered last.
#[map]
static RECENT: PerCpuArray<RecentTransitions> = PerCpuArray::with_max_entries(1, 0);

/// Looks for `id` among the remembered transitions, newest first, and forgets it with every
/// entry remembered after it. Within one firing, whatever runs in the gap between the two
/// programs (an interrupt's own transitions) completes before the second program runs, so
/// entries above this firing's belong to runs whose partner the kernel skipped: stale.
#[inline(always)]
fn take(ids: &[u64; settings::RECENT], len: &mut u32, id: u64) -> bool {
    let mut i = settings::RECENT;
    while i > 0 {
        i -= 1;
        if (i as u32) < *len && ids[i] == id {
            *len = i as u32;
            return true;
        }
    }
    false
}

/// Remembers `id` on top; when the stack is full, its oldest entry is dropped.
#[inline(always)]
fn remember(ids: &mut [u64; settings::RECENT], len: &mut u32, id: u64) {
    if *len as usize >= settings::RECENT {
        let mut i = 1;
        while i < settings::RECENT {
            ids[i - 1] = ids[i];
            i += 1;
        }
        *len = settings::RECENT as u32 - 1;
    }
    ids[*len as usize & (settings::RECENT - 1)] = id;
    *len += 1;
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let record = FormatRecord(&ctx);
    let (old, new) = record.states();
    let id = transition_id(record.skaddr(), old, new);
    let Some(recent) = RECENT.get_ptr_mut(0) else {
        handle_transition(&ctx, &record, COUNTERS_MAIN, 0);
        return 0;
    };
    // SAFETY: this CPU's slot. Runs nested on this CPU (interrupts) only push and pop above
    // what this run pushed, and are complete when it resumes.
    let recent = unsafe { &mut *recent };
    // Never nests in itself (the kernel skips it instead): a plain increment is exact.
    recent.main_runs += 1;
    if setting!(standby_first) != 0 && take(&recent.rescued, &mut recent.rescued_len, id) {
        if let Some(counters) = COUNTERS.get_ptr_mut(COUNTERS_MAIN) {
            // SAFETY: this program's per-CPU slot.
            unsafe { (*counters).deduplicated += 1 };
        }
        return 0;
    }
    let rescued_before = recent.rescued_len;
    remember(&mut recent.handled, &mut recent.handled_len, id);
    handle_transition(&ctx, &record, COUNTERS_MAIN, 0);
    // Standby runs nested in this one delivered what the kernel skipped this program for
    // (it never nests in itself): no run of this program will claim those.
    recent.rescued_len = recent.rescued_len.min(rescued_before);
    0
}

/// Delivers the transitions the main program did not: it runs for every transition, and one
/// the main program has not delivered on this CPU is one the kernel skipped it for.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn standby(ctx: BtfTracePointContext) -> i32 {
    let state = |n| TcpState::from_kernel(ctx.arg::<i32>(n) as u8);
    let source =
        SockFields { sock: Sock::argument(&ctx, 0), oldstate: state(1), newstate: state(2) };
    let id = transition_id(source.sock.0, source.oldstate, source.newstate);
    let Some(recent) = RECENT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, as in the main program.
    let recent = unsafe { &mut *recent };
    if !take(&recent.handled, &mut recent.handled_len, id) {
        let handled_before = recent.handled_len;
        if setting!(standby_first) != 0 {
            remember(&mut recent.rescued, &mut recent.rescued_len, id);
        }
        handle_transition(&ctx, &source, COUNTERS_STANDBY, FLAG_RESCUED);
        // Main runs nested in this one pushed entries for standby runs that kernels with a
        // recursion guard for this program (6.4 on, roughly) skip: forget them. Where the
        // nested standby did run, it already took its entry and this changes nothing.
        recent.handled_len = recent.handled_len.min(handled_before);
    }
    // Last, after anything else this run counts (the reader relies on that order), and
    // atomic: on kernels without that guard this program can nest in itself.
    atomic_increment(&raw mut recent.standby_runs);
    0
}

/// `*counter += 1` in one instruction that an interrupt cannot split (BPF_XADD, on every
/// kernel). Rust offers no atomic read-modify-write for BPF on its stable surface.
#[inline(always)]
pub(crate) fn atomic_increment(counter: *mut u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: `counter` points to an aligned u64 in a map value, updated only this way.
    unsafe {
        core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) counter, in(reg) 1u64);
    }
    #[cfg(not(target_arch = "bpf"))]
    let _ = counter;
}

/// accept() returns a socket whose transitions so far all ran in softirq: the process that
/// accepts it is its owner. Optional: when this cannot attach, owners of accepted sockets come
/// from /proc in userspace.
#[fexit(function = "inet_csk_accept")]
pub fn accept_owner(ctx: FExitContext) -> i32 {
    let slot = setting!(accept_ret_slot);
    if slot == OFFSET_UNKNOWN {
        return 0;
    }
    // The return value follows the arguments in the context. A probe read rather than a
    // context load: the verifier only allows context loads at constant offsets.
    // SAFETY: the context holds the arguments and the return value as u64s; a probe read
    // cannot fault.
    let ret = unsafe { ctx.as_ptr().cast::<u64>().add(slot as usize) };
    if let Ok(accepted) = unsafe { bpf_probe_read_kernel(ret) }
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
    fn states(&self) -> (TcpState, TcpState) {
        let number = |field| TcpState::from_kernel(self.load::<i32>(field) as u8);
        (number(tp::OLDSTATE), number(tp::NEWSTATE))
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
        if family == AF_INET6 {
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

/// The same fields, read from the socket the way the tracepoint's own assignment does
/// (offsets resolved from BTF by the loader). Slower, probe reads; used only for rescues.
struct SockFields {
    sock: Sock,
    oldstate: TcpState,
    newstate: TcpState,
}

impl Transition for SockFields {
    #[inline(always)]
    fn protocol(&self) -> u16 {
        self.sock.read(setting!(sock.protocol))
    }

    #[inline(always)]
    fn skaddr(&self) -> u64 {
        self.sock.0
    }

    #[inline(always)]
    fn states(&self) -> (TcpState, TcpState) {
        (self.oldstate, self.newstate)
    }

    #[inline(always)]
    fn ports(&self) -> (u16, u16) {
        self.sock.ports()
    }

    #[inline(always)]
    fn family(&self) -> u16 {
        self.sock.family()
    }

    #[inline(always)]
    fn addresses(&self, family: u16) -> ([u64; 2], [u64; 2]) {
        let sock = self.sock;
        if family == AF_INET6 {
            (sock.read(setting!(sock.saddr_v6)), sock.read(setting!(sock.daddr_v6)))
        } else {
            let saddr: u32 = sock.read(setting!(sock.saddr));
            let daddr: u32 = sock.read(setting!(sock.daddr));
            ([u64::from(saddr), 0], [u64::from(daddr), 0])
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
