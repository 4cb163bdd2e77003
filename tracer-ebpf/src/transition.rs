//! Turning one state transition into per-socket state and a ring-buffer record, whatever
//! program (and so whatever source of fields) saw it.
//!
//! The record is written field by field into its reserved slot, and the 16-byte names are
//! copied as two u64 words: byte arrays moved through the stack compile to a load and a store
//! per byte in BPF.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
};
use aya_log_ebpf::warn;
use tracer_common::{
    KernelCounters, RECORD_SIZE, SocketState, TcpState, TransitionRecord,
    record::{
        ConnectionTotals, FLAG_ACCEPTED, FLAG_CLOSED, FLAG_LIFETIME_KNOWN, FLAG_OWNER_KNOWN,
        FLAG_STAY_KNOWN, IPPROTO_MPTCP, IPPROTO_TCP,
    },
    settings::{KernelFilter, MAX_FILTER_PORTS, OFFSET_UNKNOWN, TotalsOffsets},
};

use crate::{COUNTERS, EVENTS, SOCKETS};

/// Reads one field of the read-only `SETTINGS` global. A volatile read keeps the compiler from
/// folding in the compiled default; the verifier still sees the loaded (frozen) value.
macro_rules! setting {
    ($($field:ident).+) => {
        // SAFETY: `SETTINGS` is a plain-data static; the loader fills it before load.
        unsafe { core::ptr::read_volatile(&raw const $crate::SETTINGS.$($field).+) }
    };
}
pub(crate) use setting;

/// A task name, as two words: copied with two loads and stores.
pub type Comm = [u64; 2];

/// Where a program gets a transition's fields from.
pub trait Transition {
    fn protocol(&self) -> u16;
    fn skaddr(&self) -> u64;
    fn states(&self) -> (TcpState, TcpState);
    /// (local, remote), host byte order.
    fn ports(&self) -> (u16, u16);
    fn family(&self) -> u16;
    /// (local, remote) as raw network-order bytes packed in two u64s; IPv4 in the first 4 bytes.
    fn addresses(&self, family: u16) -> ([u64; 2], [u64; 2]);
}

/// Transitions that only run in a system call of the process holding the socket (connect,
/// listen, close, shutdown), never in softirq: the running task is the owner.
#[inline(always)]
fn runs_in_owner_context(old: TcpState, new: TcpState) -> bool {
    use TcpState as S;
    matches!(
        (old, new),
        (S::CLOSE, S::SYN_SENT)
            | (S::CLOSE, S::LISTEN)
            | (S::LISTEN, S::CLOSE)
            | (S::ESTABLISHED, S::FIN_WAIT1)
            | (S::CLOSE_WAIT, S::LAST_ACK)
    )
}

/// The running task's name, into `out` (8-aligned, 16 bytes): read straight from
/// `current->comm` with the offset from BTF (the comm helper copies byte by byte and costs
/// several times more); the helper when the offset is unknown.
#[inline(always)]
fn current_comm(out: *mut Comm) {
    let comm_offset = setting!(task_comm_offset);
    if comm_offset != OFFSET_UNKNOWN {
        // SAFETY: probe reads fault safely.
        let task = unsafe { bpf_get_current_task() };
        if let Ok(comm) =
            unsafe { bpf_probe_read_kernel((task + u64::from(comm_offset)) as *const Comm) }
        {
            // SAFETY: `out` points at 16 writable, 8-aligned bytes.
            unsafe { *out = comm };
            return;
        }
    }
    // SAFETY: `out` points at 16 writable bytes; the helper NUL-pads and never writes more.
    unsafe { bpf_get_current_comm(out.cast(), 16) };
}

#[inline(always)]
pub fn handle_transition<C: EbpfContext, T: Transition>(
    ctx: &C,
    source: &T,
    counter_slot: u32,
    record_flags: u8,
) {
    let Some(counters) = COUNTERS.get_ptr_mut(counter_slot) else {
        return;
    };
    // SAFETY: a per-CPU slot of this program; the kernel never runs this program nested on one
    // CPU, and the other program has its own slot.
    let counters = unsafe { &mut *counters };
    counters.seen += 1;
    let protocol = source.protocol();
    if protocol != IPPROTO_TCP && !(protocol == IPPROTO_MPTCP && setting!(trace_mptcp) != 0) {
        counters.other_protocol += 1;
        return;
    }

    let skaddr = source.skaddr();
    let (old, new) = source.states();
    if !old.is_known() || !new.is_known() {
        // Delivered anyway, with the kernel's numbers; userspace shows them as STATE_<n>.
        warn!(
            ctx,
            "unexpected TCP state numbers {} -> {}: is this kernel newer than tcpstate?",
            old.number(),
            new.number()
        );
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let (sport, dport) = source.ports();
    let family = source.family();

    let tracked = track_socket(skaddr, old, new, now, tgid, counters);
    if !passes(&setting!(filter), family, sport, dport, old, new) {
        counters.filtered += 1;
        return;
    }
    let (saddr, daddr) = source.addresses(family);
    let common = Common {
        now,
        skaddr,
        pid_tgid,
        sport,
        dport,
        family,
        protocol,
        old,
        new,
        flags: tracked.flags | record_flags,
        saddr,
        daddr,
    };
    // One reservation per branch, each with one null check dominating every use of it:
    // kernels before 6.3 do not know a checked ring-buffer pointer is non-null, so a second
    // check (an `Option` matched twice) makes them explore a "null" path where the slot is
    // never released, and they refuse the program ("Unreleased reference"). A record that ends
    // a connection is the whole `TransitionRecord`; any other is sent without its totals.
    if closes_connection(old, new) {
        let Some(mut slot) = EVENTS.reserve::<TransitionRecord>(0) else {
            counters.ringbuf_full += 1;
            return;
        };
        let rec = slot.as_mut_ptr();
        let (totals, lifetime_flags) = read_totals(skaddr, old, tracked.born, now);
        // SAFETY: `rec` is the 8-aligned slot of `CLOSED_RECORD_SIZE` bytes reserved above.
        unsafe {
            write_record(rec, &common, &tracked);
            (*rec).flags |= FLAG_CLOSED | lifetime_flags;
            (*rec).srtt_us = 0;
            (*rec).totals = totals;
        }
        counters.emitted += 1;
        slot.submit(wakeup_flags(counters.emitted));
    } else {
        let Some(mut slot) = EVENTS.reserve::<[u64; RECORD_SIZE / 8]>(0) else {
            counters.ringbuf_full += 1;
            return;
        };
        let rec = slot.as_mut_ptr().cast::<TransitionRecord>();
        // SAFETY: `rec` is the 8-aligned slot of `RECORD_SIZE` bytes reserved above: every
        // field before `totals`, which `write_record` leaves alone.
        unsafe {
            write_record(rec, &common, &tracked);
            (*rec).srtt_us = if (old, new) == (TcpState::SYN_RECV, TcpState::ESTABLISHED) {
                read_srtt(skaddr)
            } else {
                0
            };
        }
        counters.emitted += 1;
        slot.submit(wakeup_flags(counters.emitted));
    }
}

/// A record's fields that come from the transition itself.
struct Common {
    now: u64,
    skaddr: u64,
    pid_tgid: u64,
    sport: u16,
    dport: u16,
    family: u16,
    protocol: u16,
    old: TcpState,
    new: TcpState,
    flags: u8,
    saddr: [u64; 2],
    daddr: [u64; 2],
}

/// Writes every field of the record before `totals` but `srtt_us`.
///
/// # Safety
/// `rec` points at a reserved, 8-aligned slot of at least `RECORD_SIZE` bytes.
#[inline(always)]
unsafe fn write_record(rec: *mut TransitionRecord, common: &Common, tracked: &Tracked) {
    unsafe {
        (*rec).ts_ns = common.now;
        (*rec).skaddr = common.skaddr;
        (*rec).stay_ns = tracked.stay_ns;
        (*rec).owner_cgroup = tracked.owner_cgroup;
        (*rec).pid = common.pid_tgid as u32;
        (*rec).tgid = (common.pid_tgid >> 32) as u32;
        (*rec).owner_tgid = tracked.owner_tgid;
        (*rec).netns = tracked.netns;
        current_comm((&raw mut (*rec).comm).cast());
        *(&raw mut (*rec).owner_comm).cast::<Comm>() = tracked.owner_comm;
        *(&raw mut (*rec).saddr).cast::<[u64; 2]>() = common.saddr;
        *(&raw mut (*rec).daddr).cast::<[u64; 2]>() = common.daddr;
        (*rec).sport = common.sport;
        (*rec).dport = common.dport;
        (*rec).family = common.family;
        (*rec).protocol = common.protocol;
        (*rec).oldstate = common.old;
        (*rec).newstate = common.new;
        (*rec).flags = common.flags;
        (*rec).error = if common.new == TcpState::CLOSE { read_sk_err(common.skaddr) } else { 0 };
    }
}

/// A transition to CLOSE from a state past the handshake: the end of a connection, whose
/// totals the record carries. A failed connect or handshake carried nothing.
#[inline(always)]
fn closes_connection(old: TcpState, new: TcpState) -> bool {
    use TcpState as S;
    new == S::CLOSE
        && matches!(
            old,
            S::ESTABLISHED | S::FIN_WAIT1 | S::FIN_WAIT2 | S::CLOSE_WAIT | S::LAST_ACK | S::CLOSING
        )
}

/// What the closing connection carried, read from its `tcp_sock` at the offsets the loader
/// resolved (a counter whose offset is unknown reads 0), and its lifetime flags. The kernel's
/// byte counters count sequence numbers, and a SYN and a FIN take one each without carrying
/// data: a client's SYN, our FIN once acknowledged and the peer's FIN once received come off.
#[inline(always)]
fn read_totals(skaddr: u64, old: TcpState, born: u64, now: u64) -> (ConnectionTotals, u8) {
    use TcpState as S;
    let offsets = setting!(totals);
    // SAFETY: probe reads fault safely on a bad address.
    let read_u64 = |offset: u32| {
        if offset == OFFSET_UNKNOWN {
            return 0;
        }
        unsafe { bpf_probe_read_kernel((skaddr + u64::from(offset)) as *const u64) }.unwrap_or(0)
    };
    let read_u32 = |offset: u32| {
        if offset == OFFSET_UNKNOWN {
            return 0;
        }
        unsafe { bpf_probe_read_kernel((skaddr + u64::from(offset)) as *const u32) }.unwrap_or(0)
    };
    let birth_ns = born & !SocketState::ACCEPTED;
    let accepted = born & SocketState::ACCEPTED != 0;
    let (lifetime_ns, flags) = match (birth_ns, accepted) {
        (0, _) => (0, 0),
        (_, true) => (now.saturating_sub(birth_ns), FLAG_LIFETIME_KNOWN | FLAG_ACCEPTED),
        (_, false) => (now.saturating_sub(birth_ns), FLAG_LIFETIME_KNOWN),
    };
    let client_syn = u64::from(birth_ns != 0 && !accepted);
    let fin_sent = matches!(old, S::FIN_WAIT1 | S::FIN_WAIT2 | S::CLOSING | S::LAST_ACK);
    let fin_acked = fin_sent
        && offsets.snd_una != OFFSET_UNKNOWN
        && offsets.write_seq != OFFSET_UNKNOWN
        && read_u32(offsets.snd_una) == read_u32(offsets.write_seq);
    let fin_received = offsets.sk_flags != OFFSET_UNKNOWN
        && read_u64(offsets.sk_flags) & TotalsOffsets::SOCK_DONE != 0;
    let totals = ConnectionTotals {
        bytes_sent: read_u64(offsets.bytes_acked).saturating_sub(client_syn + u64::from(fin_acked)),
        bytes_received: read_u64(offsets.bytes_received).saturating_sub(u64::from(fin_received)),
        lifetime_ns,
        srtt_us: read_srtt(skaddr),
        total_retrans: read_u32(offsets.total_retrans),
    };
    (totals, flags)
}

/// What the per-socket map knows about a transition's socket.
struct Tracked {
    stay_ns: u64,
    /// The map's `SocketState::born`: 0 where the socket's creation was not seen.
    born: u64,
    owner_cgroup: u64,
    owner_tgid: u32,
    netns: u32,
    owner_comm: Comm,
    flags: u8,
}

/// Updates the socket's map entry for this transition and returns what the record reports.
#[inline(always)]
fn track_socket(
    skaddr: u64,
    old: TcpState,
    new: TcpState,
    now: u64,
    tgid: u32,
    counters: &mut KernelCounters,
) -> Tracked {
    let creation = TcpState::creates_socket(old, new);
    let owner_context = runs_in_owner_context(old, new);
    let existing = if creation { None } else { SOCKETS.get_ptr_mut(skaddr) };
    let mut tracked = match existing {
        Some(entry) => {
            // SAFETY: a live value of the map (8-aligned); the socket lock serializes its
            // transitions.
            let entry = unsafe { &mut *entry };
            let owner_comm = (&raw mut entry.owner_comm).cast::<Comm>();
            if owner_context {
                entry.owner_tgid = tgid;
                entry.owner_cgroup = current_cgroup();
                // SAFETY: 8-aligned map value field.
                unsafe { *owner_comm = process_comm() };
            }
            let tracked = Tracked {
                stay_ns: now.saturating_sub(entry.entered_ns),
                born: entry.born,
                owner_cgroup: entry.owner_cgroup,
                owner_tgid: entry.owner_tgid,
                netns: entry.netns,
                // SAFETY: as above.
                owner_comm: unsafe { *owner_comm },
                flags: FLAG_STAY_KNOWN,
            };
            if new == TcpState::CLOSE {
                // The kernel reuses the address for a later socket.
                let _ = SOCKETS.remove(skaddr);
            } else if new != old {
                // A socket shut down and then closed reports the close as a move to the state
                // it is in (FIN_WAIT1, FIN_WAIT2 or LAST_ACK): its stay goes on.
                entry.entered_ns = now;
            }
            tracked
        }
        None => {
            if !creation {
                counters.untracked_sightings += 1;
            }
            let (owner_tgid, owner_comm, owner_cgroup) = if owner_context {
                (tgid, process_comm(), current_cgroup())
            } else {
                (0, [0; 2], 0)
            };
            // A connection is born where its socket is created; a socket first seen later is
            // older than the tracer, and its lifetime unknown.
            let born = match (creation, old) {
                (false, _) => 0,
                (true, TcpState::LISTEN) => now | SocketState::ACCEPTED,
                (true, _) => now,
            };
            let tracked = Tracked {
                stay_ns: 0,
                born,
                owner_cgroup,
                owner_tgid,
                netns: read_netns(skaddr),
                owner_comm,
                flags: 0,
            };
            if new != TcpState::CLOSE {
                let mut entry = SocketState {
                    entered_ns: now,
                    born,
                    owner_cgroup,
                    owner_tgid,
                    netns: tracked.netns,
                    owner_comm: [0; 16],
                };
                // SAFETY: the field is 8-aligned in a stack value of an 8-aligned type.
                unsafe { *(&raw mut entry.owner_comm).cast::<Comm>() = owner_comm };
                if SOCKETS.insert(skaddr, entry, 0).is_err() {
                    counters.map_update_failed += 1;
                }
            }
            tracked
        }
    };
    if tracked.owner_tgid != 0 {
        tracked.flags |= FLAG_OWNER_KNOWN;
    }
    tracked
}

/// Records the current process as the owner of a tracked socket (called in its context).
#[inline(always)]
pub fn claim_owner(skaddr: u64) {
    let Some(entry) = SOCKETS.get_ptr_mut(skaddr) else {
        return;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let comm = process_comm();
    let cgroup = current_cgroup();
    // SAFETY: a live, 8-aligned value of the map; a racing update of the same socket only
    // changes which of two owners the next record names.
    unsafe {
        (*entry).owner_tgid = tgid;
        (*entry).owner_cgroup = cgroup;
        *(&raw mut (*entry).owner_comm).cast::<Comm>() = comm;
    }
}

/// The current task's cgroup v2 id: only read with the owner, in its own context (a few
/// transitions per socket), so the other transitions pay nothing for it.
#[inline(always)]
fn current_cgroup() -> u64 {
    // SAFETY: no preconditions; 0 where the kernel has no cgroup v2 hierarchy.
    unsafe { bpf_get_current_cgroup_id() }
}

/// The socket's pending error (`sk->sk_err`), set by the kernel before it closes a socket on
/// a reset, a timeout or an ICMP error; read only on transitions to CLOSE.
#[inline(always)]
fn read_sk_err(skaddr: u64) -> u8 {
    let offset = setting!(sk_err_offset);
    if offset == u16::MAX {
        return 0;
    }
    // SAFETY: probe reads fault safely on a bad address.
    let error = unsafe { bpf_probe_read_kernel((skaddr + u64::from(offset)) as *const i32) };
    error.map_or(0, |e| u8::try_from(e).unwrap_or(u8::MAX))
}

/// The socket's smoothed round-trip time (`tcp_sock.srtt_us`), read only as a server's
/// handshake completes: the kernel took its first sample from the SYN-ACK just before.
#[inline(always)]
fn read_srtt(skaddr: u64) -> u32 {
    let offset = setting!(tcp_srtt_offset);
    if offset == OFFSET_UNKNOWN {
        return 0;
    }
    // SAFETY: probe reads fault safely on a bad address.
    unsafe { bpf_probe_read_kernel((skaddr + u64::from(offset)) as *const u32) }.unwrap_or(0)
}

/// The socket's network namespace inode (`sk->__sk_common.skc_net.net->ns.inum`), with the
/// offsets the loader resolved from the kernel's BTF; 0 when they are unknown.
#[inline(always)]
fn read_netns(skaddr: u64) -> u32 {
    let sk_net = setting!(sk_net_offset);
    let inum = setting!(net_inum_offset);
    if sk_net == OFFSET_UNKNOWN || inum == OFFSET_UNKNOWN {
        return 0;
    }
    // SAFETY: probe reads fault safely on a bad address.
    let net: u64 =
        unsafe { bpf_probe_read_kernel((skaddr + u64::from(sk_net)) as *const u64) }.unwrap_or(0);
    if net == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((net + u64::from(inum)) as *const u32) }.unwrap_or(0)
}

/// `comm` of the current process's main thread (`current->group_leader->comm`), as `ps`
/// names the process; the calling thread's when the offsets are unknown or the read fails.
#[inline(always)]
fn process_comm() -> Comm {
    let leader_offset = setting!(task_group_leader_offset);
    let comm_offset = setting!(task_comm_offset);
    if leader_offset != OFFSET_UNKNOWN && comm_offset != OFFSET_UNKNOWN {
        // SAFETY: probe reads fault safely on a bad address.
        let task = unsafe { bpf_get_current_task() };
        if let Ok(leader) =
            unsafe { bpf_probe_read_kernel((task + u64::from(leader_offset)) as *const u64) }
            && let Ok(comm) =
                unsafe { bpf_probe_read_kernel((leader + u64::from(comm_offset)) as *const Comm) }
        {
            return comm;
        }
    }
    let mut comm = [0; 2];
    current_comm(&mut comm);
    comm
}

#[inline(always)]
fn passes(
    filter: &KernelFilter,
    family: u16,
    sport: u16,
    dport: u16,
    old: TcpState,
    new: TcpState,
) -> bool {
    if filter.family != 0 && filter.family != family {
        return false;
    }
    if filter.state_mask != 0 && filter.state_mask & (old.mask_bit() | new.mask_bit()) == 0 {
        return false;
    }
    (filter.port_count == 0 || any_port(&filter.ports, filter.port_count, sport, dport))
        && (filter.sport_count == 0 || any_port(&filter.sports, filter.sport_count, sport, sport))
        && (filter.dport_count == 0 || any_port(&filter.dports, filter.dport_count, dport, dport))
}

#[inline(always)]
fn any_port(ports: &[u16; MAX_FILTER_PORTS], count: u8, a: u16, b: u16) -> bool {
    let mut i = 0;
    while i < MAX_FILTER_PORTS {
        if i >= usize::from(count) {
            return false;
        }
        if ports[i] == a || ports[i] == b {
            return true;
        }
        i += 1;
    }
    false
}

/// Records go out without a wakeup, except every `wakeup_every` records a CPU has sent: the
/// reader drains on a timer anyway, and a wakeup per record costs an interrupt that can nest
/// network processing (and so another transition) inside this program. Counting per CPU costs
/// nothing; asking the ring how full it is would cost a helper call per record.
#[inline(always)]
fn wakeup_flags(emitted_on_this_cpu: u64) -> u64 {
    let every = setting!(wakeup_every);
    if every == 0 {
        return 0;
    }
    // A power of two (the loader makes it so).
    if emitted_on_this_cpu & (every - 1) == 0 {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}
