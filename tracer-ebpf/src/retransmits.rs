//! Retransmits counted in the kernel, per CPU, by port label and by the state of the socket
//! that sent again, and by destination: no record per retransmit, a few loads, one hash
//! lookup and two increments.

use aya_ebpf::{
    EbpfContext as _, bindings::BPF_NOEXIST, helpers::bpf_probe_read_kernel, macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    settings::{MAX_PORT_LABELS, OFFSET_UNKNOWN, RETRANSMIT_STATES, RetransmitDestination},
    tracepoint::{Field, retransmit, synack},
};

use crate::{RETRANSMIT_DST, RETRANSMITS, SETTINGS, transition::setting};

/// A field of the tracepoint's record, at the offset the loader checked against its format.
#[inline(always)]
fn load<T: Copy>(ctx: &TracePointContext, field: Field) -> T {
    // SAFETY: the loader checked the field's offset and size against the format file before
    // attaching; the offset is naturally aligned for `T`.
    unsafe { ctx.as_ptr().cast::<u8>().add(field.offset).cast::<T>().read() }
}

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

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let slot = label_slot(load(&ctx, retransmit::SPORT));
    let Some(counts) = RETRANSMITS.get_ptr_mut(slot) else {
        return 0;
    };
    let err_offset = setting!(retransmit_err_offset);
    if err_offset != OFFSET_UNKNOWN {
        // A probe read: the verifier allows only constant offsets for context loads.
        // SAFETY: the offset is the format file's; a probe read cannot fault.
        let err = unsafe {
            bpf_probe_read_kernel(ctx.as_ptr().cast::<u8>().add(err_offset as usize).cast::<i32>())
        };
        if err.unwrap_or(0) != 0 {
            // SAFETY: this CPU's slot. The kernel runs no tracepoint program nested in another
            // on one CPU (it skips and counts the nested one), so a plain increment is exact.
            unsafe { (*counts).failed += 1 };
            return 0;
        }
    }
    let state = (load::<i32>(&ctx, retransmit::STATE) as usize).min(RETRANSMIT_STATES - 1);
    // SAFETY: as above; `state` is within the array.
    unsafe { (*counts).by_state[state & (RETRANSMIT_STATES - 1)] += 1 };
    count_destination(&ctx);
    0
}

/// One more retransmit to the record's destination, in this CPU's share of its entry.
#[inline(always)]
fn count_destination(ctx: &TracePointContext) {
    let offset = setting!(retransmit_daddr_offset) as usize;
    // A probe read: the offset depends on the kernel's layout, and context loads must be
    // constant. SAFETY: the offset is the format file's; a probe read cannot fault.
    let Ok(daddr) = (unsafe {
        bpf_probe_read_kernel(ctx.as_ptr().cast::<u8>().add(offset).cast::<[u8; 16]>())
    }) else {
        return count_unlisted();
    };
    let key = RetransmitDestination { daddr, dport: load(ctx, retransmit::DPORT), _pad: 0 };
    if increment(&key) {
        return;
    }
    // A new entry: this CPU's share starts at 1, the others' at 0. Another CPU may insert the
    // same destination meanwhile; the lookup after a refused insert finds theirs.
    if RETRANSMIT_DST.insert(key, 1, u64::from(BPF_NOEXIST)).is_ok() || increment(&key) {
        return;
    }
    count_unlisted();
}

/// Adds one to this CPU's share of `key`'s entry, if there is one.
#[inline(always)]
fn increment(key: &RetransmitDestination) -> bool {
    let Some(count) = RETRANSMIT_DST.get_ptr_mut(key) else { return false };
    // SAFETY: this CPU's share of the entry; no program nests on one CPU.
    unsafe { *count += 1 };
    true
}

/// A retransmit the destination map had no room for.
#[inline(always)]
fn count_unlisted() {
    if let Some(counts) = RETRANSMITS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { (*counts).unlisted += 1 };
    }
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let slot = label_slot(load(&ctx, synack::SPORT));
    if let Some(counts) = RETRANSMITS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot.
        unsafe { (*counts).synack += 1 };
    }
    0
}
