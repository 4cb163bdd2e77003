//! Retransmits counted in the kernel, per CPU, by port label and by the state of the socket
//! that sent again, and by destination: no record per retransmit, a few reads, one hash
//! lookup and two increments.
//!
//! On the tracepoints' BTF flavour: the kernel does not run a classic tracepoint's program
//! while another tracing program or a map syscall (the daemon reading its maps) runs on that
//! CPU, and kernels before 6.7 do not count those skips. The BTF flavour is skipped at most
//! when the same program is running there (and counted), or, on older kernels, runs nested in
//! itself: hence the atomic increments.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::settings::{MAX_PORT_LABELS, RETRANSMIT_STATES, RetransmitDestination};

use crate::{
    RETRANSMIT_DST, RETRANSMITS, SETTINGS, atomic_increment, sock::Sock, transition::setting,
};

/// `RETRANSMITS` slot of a local port: its label's, or 0 for the other ports.
#[inline(always)]
fn label_slot(sport: u16) -> u32 {
    let count = setting!(label_port_count) as usize;
    let mut i = 0;
    while i < MAX_PORT_LABELS {
        if i >= count {
            break;
        }
        // SAFETY: `i` is within the array; a volatile read, as `setting!` does.
        let port = unsafe {
            core::ptr::read_volatile((&raw const SETTINGS.label_ports).cast::<u16>().add(i))
        };
        if port == sport {
            return i as u32 + 1;
        }
        i += 1;
    }
    0
}

/// `tcp_retransmit_skb(sk, skb[, err])`: one firing per segment sent again.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    let sock = Sock::argument(&ctx, 0);
    let (local_port, remote_port) = sock.ports();
    let Some(counts) = RETRANSMITS.get_ptr_mut(label_slot(local_port)) else {
        return 0;
    };
    // The third argument exists only where the loader says so: the verifier refuses a read
    // past the last one, and prunes this branch where the setting is 0.
    if setting!(retransmit_has_err) != 0 && ctx.arg::<i32>(2) != 0 {
        // SAFETY: this CPU's slot, a map value.
        atomic_increment(unsafe { &raw mut (*counts).failed });
        return 0;
    }
    let state = usize::from(sock.read::<u8>(setting!(sock.state))).min(RETRANSMIT_STATES - 1);
    // SAFETY: as above; `state` is within the array.
    atomic_increment(unsafe { &raw mut (*counts).by_state[state & (RETRANSMIT_STATES - 1)] });
    count_destination(sock, remote_port);
    0
}

/// One more retransmit to the socket's destination, in this CPU's share of its entry.
#[inline(always)]
fn count_destination(sock: Sock, remote_port: u16) {
    let Some(daddr) = sock.remote_address_v6() else {
        return count_unlisted();
    };
    let key = RetransmitDestination { daddr, dport: remote_port, _pad: 0 };
    if increment(&key) {
        return;
    }
    // A new entry: this CPU's share starts at 1, the others' at 0. Another CPU (or a run
    // nested in this one) may insert the same destination meanwhile; the lookup after a
    // refused insert finds theirs.
    if RETRANSMIT_DST.insert(key, 1, u64::from(BPF_NOEXIST)).is_ok() || increment(&key) {
        return;
    }
    count_unlisted();
}

/// Adds one to this CPU's share of `key`'s entry, if there is one.
#[inline(always)]
fn increment(key: &RetransmitDestination) -> bool {
    let Some(count) = RETRANSMIT_DST.get_ptr_mut(key) else { return false };
    atomic_increment(count);
    true
}

/// A retransmit the destination map had no room for.
#[inline(always)]
fn count_unlisted() {
    if let Some(counts) = RETRANSMITS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, a map value.
        atomic_increment(unsafe { &raw mut (*counts).unlisted });
    }
}

/// `tcp_retransmit_synack(sk, req)`: a listener's SYN-ACK sent again, counted under the
/// request's local port, as the classic tracepoint records it.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: BtfTracePointContext) -> i32 {
    let request = Sock::argument(&ctx, 1);
    let local_port: u16 = request.read(setting!(request_port_offset));
    if let Some(counts) = RETRANSMITS.get_ptr_mut(label_slot(local_port)) {
        // SAFETY: this CPU's slot, a map value.
        atomic_increment(unsafe { &raw mut (*counts).synack });
    }
    0
}
