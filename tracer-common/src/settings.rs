//! Load-time settings, per-socket map values and per-CPU counters.

use crate::TcpState;

/// Most ports a kernel-side port filter holds (`--port`, `--sport`, `--dport` each).
pub const MAX_FILTER_PORTS: usize = 8;

/// Most ports with series of their own (`--port-label`); the kernel counts retransmits for
/// each.
pub const MAX_PORT_LABELS: usize = 32;

/// An offset that could not be resolved from the kernel's BTF: the program skips that read.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// Emission filter evaluated in the kernel. It only decides whether a record is sent: the
/// per-socket state is tracked for every socket, so durations stay right for the ones shown.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFilter {
    /// Either side's port must be one of these (when `port_count > 0`).
    pub ports: [u16; MAX_FILTER_PORTS],
    /// The local port must be one of these (when `sport_count > 0`).
    pub sports: [u16; MAX_FILTER_PORTS],
    /// The remote port must be one of these (when `dport_count > 0`).
    pub dports: [u16; MAX_FILTER_PORTS],
    pub port_count: u8,
    pub sport_count: u8,
    pub dport_count: u8,
    pub _pad: u8,
    /// `AF_INET` or `AF_INET6` to keep only that family; 0 keeps both.
    pub family: u16,
    /// Bit `1 << state` set: keep transitions whose old or new state is that state; 0 keeps all.
    pub state_mask: u16,
}

impl KernelFilter {
    pub const ALL: Self = Self {
        ports: [0; MAX_FILTER_PORTS],
        sports: [0; MAX_FILTER_PORTS],
        dports: [0; MAX_FILTER_PORTS],
        port_count: 0,
        sport_count: 0,
        dport_count: 0,
        _pad: 0,
        family: 0,
        state_mask: 0,
    };
}

/// Where the programs on BTF tracepoints (the standby, the retransmit counters) find the
/// classic tracepoints' fields in `struct sock` (and the `struct inet_sock` that begins with
/// it), from BTF; byte offsets, as the tracepoints' own assignments read them. `u16::MAX`
/// where unknown (those programs are then not attached).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    /// `sk->__sk_common.skc_family` (u16).
    pub family: u16,
    /// `sk->__sk_common.skc_state` (u8).
    pub state: u16,
    /// `sk->sk_protocol` (u16).
    pub protocol: u16,
    /// `inet_sk(sk)->inet_sport` (be16).
    pub sport: u16,
    /// `sk->__sk_common.skc_dport` (be16).
    pub dport: u16,
    /// `inet_sk(sk)->inet_saddr` (be32).
    pub saddr: u16,
    /// `sk->__sk_common.skc_daddr` (be32).
    pub daddr: u16,
    /// `sk->__sk_common.skc_v6_rcv_saddr` (16 bytes).
    pub saddr_v6: u16,
    /// `sk->__sk_common.skc_v6_daddr` (16 bytes).
    pub daddr_v6: u16,
}

impl SockOffsets {
    pub const UNKNOWN: Self = Self {
        family: u16::MAX,
        state: u16::MAX,
        protocol: u16::MAX,
        sport: u16::MAX,
        dport: u16::MAX,
        saddr: u16::MAX,
        daddr: u16::MAX,
        saddr_v6: u16::MAX,
        daddr_v6: u16::MAX,
    };
}

/// Settings the loader writes into the program's read-only globals before loading it, so one
/// compiled object serves every configuration and the verifier prunes disabled branches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSettings {
    pub filter: KernelFilter,
    /// 1: also trace MPTCP subflow-level sockets (protocol 262).
    pub trace_mptcp: u8,
    /// 1: the standby program was attached first, so it runs before the main program in each
    /// firing and tells it, through `RecentTransitions::rescued`, what it delivered. 0: the
    /// main program runs first, so whatever the standby delivers is a transition the kernel
    /// skipped the main program for, and it need not say so (an entry no main run would take
    /// only lingers, and could match a later transition of a reused socket address).
    pub standby_first: u8,
    /// Offset of `sock.sk_err` (the error a reset, a timeout or an ICMP error left on the
    /// socket), from BTF; `u16::MAX` when unknown.
    pub sk_err_offset: u16,
    /// Offset of `sock_common.skc_net` (a `struct net *`) in `struct sock`, from BTF.
    pub sk_net_offset: u32,
    /// Offset of `net.ns.inum` in `struct net`, from BTF.
    pub net_inum_offset: u32,
    /// Offset of `task_struct.group_leader`, from BTF: the owner is named by its process's
    /// main thread, as `ps` and `ss -p` do, not by the thread that made the call.
    pub task_group_leader_offset: u32,
    /// Offset of `task_struct.comm`, from BTF.
    pub task_comm_offset: u32,
    /// The accept hook reads `inet_csk_accept`'s return value from this 8-byte slot of its
    /// context: the function's parameter count, from BTF (4 before Linux 6.10, 2 since).
    /// Read directly, because `bpf_get_func_ret` only exists from Linux 5.17.
    pub accept_ret_slot: u32,
    /// Offset of `tcp_sock.srtt_us`, from BTF: read on SYN_RECV -> ESTABLISHED, for the
    /// server's handshake time, and as a connection closes.
    pub tcp_srtt_offset: u32,
    /// Where a closing connection's totals are read, from BTF.
    pub totals: TotalsOffsets,
    /// For the programs that read a socket's fields from the socket itself.
    pub sock: SockOffsets,
    /// Offset of `request_sock.__req_common.skc_num` (the local port, host order), from BTF:
    /// the SYN-ACK retransmit counter reads the request's port, as its tracepoint does;
    /// `u16::MAX` when unknown.
    pub request_port_offset: u16,
    /// 1 where `tcp_retransmit_skb` passes its programs the retransmit's error (a third
    /// argument, 0 for a retransmit that went out): newer kernels fire for failed retransmits
    /// too; older ones fire only for those that went out.
    pub retransmit_has_err: u32,
    /// Local ports whose retransmits are counted apart, sorted as the daemon's port labels:
    /// the `i`th counts in `RETRANSMITS[i + 1]`, any other port in `RETRANSMITS[0]`.
    pub label_ports: [u16; MAX_PORT_LABELS],
    pub label_port_count: u32,
    /// 0: wake the reader for every record it has not caught up with (the kernel's default).
    /// Otherwise a power of two: send records without a wakeup, and force one every this many
    /// records a CPU sends; the reader also polls on a timer. Saves a wakeup (and the interrupt
    /// nesting it causes) per record at high rates.
    pub wakeup_every: u64,
}

impl KernelSettings {
    pub const DEFAULT: Self = Self {
        filter: KernelFilter::ALL,
        trace_mptcp: 0,
        standby_first: 0,
        sk_err_offset: u16::MAX,
        sk_net_offset: OFFSET_UNKNOWN,
        net_inum_offset: OFFSET_UNKNOWN,
        task_group_leader_offset: OFFSET_UNKNOWN,
        task_comm_offset: OFFSET_UNKNOWN,
        accept_ret_slot: OFFSET_UNKNOWN,
        tcp_srtt_offset: OFFSET_UNKNOWN,
        totals: TotalsOffsets::UNKNOWN,
        sock: SockOffsets::UNKNOWN,
        request_port_offset: u16::MAX,
        retransmit_has_err: 0,
        label_ports: [0; MAX_PORT_LABELS],
        label_port_count: 0,
        wakeup_every: 0,
    };
}

const _: () = assert!(size_of::<KernelFilter>() == 56);
const _: () = assert!(size_of::<SockOffsets>() == 18);
const _: () = assert!(size_of::<TotalsOffsets>() == 24);
const _: () = assert!(size_of::<KernelSettings>() == 208);

/// Offsets in `struct tcp_sock` of the counters a connection's totals are read from as it
/// closes (`ConnectionTotals`, whose RTT is read at `KernelSettings::tcp_srtt_offset`), from
/// BTF; `OFFSET_UNKNOWN` where the kernel lacks one (the total is then 0 and the loader says so).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TotalsOffsets {
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub total_retrans: u32,
    /// `tcp_sock.snd_una` and `tcp_sock.write_seq`: equal once everything queued, the FIN
    /// included, was acknowledged.
    pub snd_una: u32,
    pub write_seq: u32,
    /// `sock.sk_flags`, whose `SOCK_DONE` bit says the peer's FIN arrived.
    pub sk_flags: u32,
}

impl TotalsOffsets {
    /// `SOCK_DONE` in `sk_flags` (bit 1 of `enum sock_flags` since Linux 2.6): set by
    /// `tcp_fin` when the peer's FIN arrives.
    pub const SOCK_DONE: u64 = 1 << 1;

    pub const UNKNOWN: Self = Self {
        bytes_acked: OFFSET_UNKNOWN,
        bytes_received: OFFSET_UNKNOWN,
        total_retrans: OFFSET_UNKNOWN,
        snd_una: OFFSET_UNKNOWN,
        write_seq: OFFSET_UNKNOWN,
        sk_flags: OFFSET_UNKNOWN,
    };
}

/// Value of the per-socket LRU map, keyed by `skaddr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketState {
    /// When the socket entered its current state (`bpf_ktime_get_ns`).
    pub entered_ns: u64,
    /// When the connection began (its creation's `bpf_ktime_get_ns`), with
    /// [`SocketState::ACCEPTED`] set for a socket a listener accepted; 0 where its creation
    /// was not seen.
    pub born: u64,
    /// The owner's cgroup v2 id (`bpf_get_current_cgroup_id`, the cgroup directory's inode),
    /// 0 while unknown.
    pub owner_cgroup: u64,
    /// Owner's tgid, 0 while unknown.
    pub owner_tgid: u32,
    /// Network namespace inode, read once at first sighting.
    pub netns: u32,
    pub owner_comm: [u8; 16],
}

const _: () = assert!(size_of::<SocketState>() == 48);

impl SocketState {
    /// `born`'s top bit: the socket was accepted from a listener. Monotonic nanoseconds
    /// reach it after 292 years of uptime.
    pub const ACCEPTED: u64 = 1 << 63;
}

/// Per-CPU counters, one slot per program (`COUNTERS_MAIN`, `COUNTERS_STANDBY`), so a program
/// interrupted on its CPU by the other never races on a counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Times the program ran, for any protocol.
    pub seen: u64,
    /// Of those, transitions of sockets that are not traced (not TCP, or MPTCP when disabled).
    pub other_protocol: u64,
    /// Records sent to the ring buffer.
    pub emitted: u64,
    /// Transitions that did not pass the kernel-side filter (not lost: not wanted).
    pub filtered: u64,
    /// Records that could not be reserved because the ring buffer was full: lost.
    pub ringbuf_full: u64,
    /// Per-socket map updates that failed: the record was sent, but the socket's next
    /// transition will report an unknown duration and owner.
    pub map_update_failed: u64,
    /// Transitions seen with no map entry for a socket whose old state implies it existed
    /// before (not a first sighting by creation or accept): socket older than the tracer, or
    /// its entry was evicted from the LRU map, or its earlier transition was lost.
    pub untracked_sightings: u64,
    /// Main program only: runs that found the standby had already delivered this transition.
    pub deduplicated: u64,
}

/// TCP state numbers below this are counted apart (the kernel's go up to 13).
pub const RETRANSMIT_STATES: usize = 16;

/// Per CPU and per port label (`KernelSettings::label_ports`): retransmitted segments, by the
/// state of the socket that sent them again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetransmitCounts {
    /// `tcp:tcp_retransmit_skb` firings that went out, by `state` (a higher number in the
    /// last slot).
    pub by_state: [u64; RETRANSMIT_STATES],
    /// `tcp:tcp_retransmit_synack` firings: SYN-ACKs a listener sent again.
    pub synack: u64,
    /// Retransmits that failed to go out (kernels whose tracepoint says so): not counted
    /// above, so that every kernel counts the same thing (older ones fire only for
    /// retransmits that went out).
    pub failed: u64,
    /// Retransmits counted above that found no room in `RETRANSMIT_DESTINATIONS` (counted in
    /// slot 0 only, whatever their port).
    pub unlisted: u64,
}

impl Default for RetransmitCounts {
    fn default() -> Self {
        Self { by_state: [0; RETRANSMIT_STATES], synack: 0, failed: 0, unlisted: 0 }
    }
}

const _: () = assert!(size_of::<RetransmitCounts>() == 152);

/// Destinations whose retransmits are counted apart, least recently retransmitting evicted
/// first: the top ones of the last minute are what matters.
pub const RETRANSMIT_DESTINATIONS: u32 = 1024;

/// Key of `RETRANSMIT_DESTINATIONS`: where retransmitted segments went.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RetransmitDestination {
    /// IPv6, or IPv4 as v4-mapped IPv6, as the tracepoint gives it.
    pub daddr: [u8; 16],
    pub dport: u16,
    pub _pad: u16,
}

const _: () = assert!(size_of::<RetransmitDestination>() == 20);

/// How many recent transitions each program remembers per CPU (`RecentTransitions`).
pub const RECENT: usize = 4;

/// Per CPU, the last transitions each program delivered, by `transition_id`: the standby
/// delivers a transition only when the main program has not, and, when it runs first, the
/// main program skips one the standby already delivered. Rarely an entry outlives its firing
/// and both or neither deliver one; the loss count does not rely on these (`Probe::delivery`
/// in the tracer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecentTransitions {
    pub handled: [u64; RECENT],
    pub rescued: [u64; RECENT],
    /// Entries in use in `handled` and `rescued`: each is a stack, newest last.
    pub handled_len: u32,
    pub rescued_len: u32,
    /// Runs of the standby program on this CPU, counted as each ends. It runs in every firing
    /// of the tracepoint (or the kernel counts its miss), so with `main_runs` this tells how
    /// often the kernel skipped the main program, which kernels before 6.7 do not count.
    pub standby_runs: u64,
    /// Runs of the main program on this CPU, counted as each starts.
    pub main_runs: u64,
}

const _: () = assert!(size_of::<RecentTransitions>() == 88);
const _: () = assert!(RECENT.is_power_of_two());

/// Identifies a transition among the few a CPU handles at once: the socket's address (whose
/// top bits are all ones in the kernel half) with the two states folded into those bits.
pub const fn transition_id(skaddr: u64, old: TcpState, new: TcpState) -> u64 {
    skaddr ^ ((old.number() as u64) << 56) ^ ((new.number() as u64) << 48)
}

pub const COUNTERS_MAIN: u32 = 0;
pub const COUNTERS_STANDBY: u32 = 1;
pub const COUNTER_SLOTS: u32 = 2;
