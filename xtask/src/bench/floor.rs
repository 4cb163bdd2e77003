//! Floors under any tracer of this tracepoint, attached to `sock:inet_sock_set_state` the
//! way every classic-tracepoint program is:
//!
//! - an empty program (`r0 = 0; exit`): what the storm loses to it is the kernel's own cost of
//!   running a BPF program there (the tracepoint's record built for it, the dispatch, bpf
//!   statistics), which no program can go below;
//! - a record per firing: a timestamp and a ring-buffer record of 128 bytes (tcpstate's
//!   size), 64 (one cache line) or 32 reserved, filled and submitted, drained by a thread that
//!   only moves the consumer position. That is the least any tracer that sends each
//!   transition to userspace pays, by record size; tcpstate's cost above it is its own logic
//!   (per-socket state, owner, loss accounting).
//!
//! A dozen instructions need no compiler or ELF: they are loaded with bpf(2) and attached with
//! perf_event_open(2) and two ioctls, as libbpf does for tracepoints. aya only loads programs
//! from ELF objects.

use std::{
    ffi::c_void,
    io,
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

/// Which floor program to hold on the tracepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Floor {
    /// `r0 = 0; exit`.
    Empty,
    /// A timestamped 128-byte ring-buffer record per firing (tcpstate's size).
    Record,
    /// The same with a 64-byte record: one cache line.
    Record64,
    /// The same with a 32-byte record.
    Record32,
}

impl Floor {
    /// The program's name, as bpftool lists it.
    fn name(self) -> &'static str {
        match self {
            Self::Empty => "floor",
            Self::Record => "floor_record",
            Self::Record64 => "floor_record64",
            Self::Record32 => "floor_record32",
        }
    }

    /// Bytes of each record, for the record floors.
    const fn record_bytes(self) -> Option<i32> {
        match self {
            Self::Empty => None,
            Self::Record => Some(128),
            Self::Record64 => Some(64),
            Self::Record32 => Some(32),
        }
    }
}

const TRACEPOINT: &str = "sock/inet_sock_set_state";
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `_IOW('$', 8, __u32)` and `_IO('$', 0)` from linux/perf_event.h.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// Bytes of the record floor's ring: as `tcpstate run`'s default.
const RING_BYTES: u32 = 4 << 20;
/// How often the drain thread moves the consumer position: often enough that the ring never
/// fills (it holds about 30,000 records, 100 ms of a storm), so every reservation succeeds and
/// the floor always pays for a whole record.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// One BPF instruction: opcode, registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst | (src << 4)) as u64) << 8
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

const EXIT: u64 = insn(0x95, 0, 0, 0, 0);
/// `mov64 dst, imm` (BPF_ALU64 | BPF_MOV | BPF_K).
const fn mov_imm(dst: u8, imm: i32) -> u64 {
    insn(0xb7, dst, 0, 0, imm)
}
/// `mov64 dst, src` (BPF_ALU64 | BPF_MOV | BPF_X).
const fn mov_reg(dst: u8, src: u8) -> u64 {
    insn(0xbf, dst, src, 0, 0)
}
const fn call(helper: i32) -> u64 {
    insn(0x85, 0, 0, 0, helper)
}
/// `*(u64 *)(dst + off) = src` (BPF_STX | BPF_MEM | BPF_DW).
const fn store(dst: u8, src: u8, off: i16) -> u64 {
    insn(0x7b, dst, src, off, 0)
}
const BPF_FUNC_KTIME_GET_NS: i32 = 5;
const BPF_FUNC_RINGBUF_RESERVE: i32 = 131;
const BPF_FUNC_RINGBUF_SUBMIT: i32 = 132;
/// `bpf_ringbuf_submit`'s flag: no wakeup, the reader polls (as tcpstate's records mostly go).
const BPF_RB_NO_WAKEUP: i32 = 1;

/// The empty program.
fn empty_program() -> Vec<u64> {
    vec![mov_imm(0, 0), EXIT]
}

/// `r7 = ktime; r0 = reserve(ring, bytes); if r0 { bytes/8 stores of r7; submit(r0,
/// NO_WAKEUP) }`.
fn record_program(ring: libc::c_int, bytes: i32) -> Vec<u64> {
    let mut program = vec![call(BPF_FUNC_KTIME_GET_NS), mov_reg(7, 0)];
    // `ld_imm64 r1, map fd` (BPF_LD | BPF_IMM | BPF_DW, src = BPF_PSEUDO_MAP_FD): two slots.
    program.extend([insn(0x18, 1, 1, 0, ring), 0]);
    program.extend([mov_imm(2, bytes), mov_imm(3, 0), call(BPF_FUNC_RINGBUF_RESERVE)]);
    let words = bytes / 8;
    // `if r0 == 0 goto exit` (BPF_JMP | BPF_JEQ | BPF_K) over the stores and the submit.
    program.push(insn(0x15, 0, 0, (words + 3) as i16, 0));
    program.extend((0..words).map(|word| store(0, 7, (word * 8) as i16)));
    program.extend([mov_reg(1, 0), mov_imm(2, BPF_RB_NO_WAKEUP), call(BPF_FUNC_RINGBUF_SUBMIT)]);
    program.extend([mov_imm(0, 0), EXIT]);
    program
}

/// The head of `union bpf_attr` for BPF_PROG_LOAD, zero-padded: the kernel accepts a larger
/// attribute whose unknown tail is zero.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    tail: [u8; 64],
}

/// `struct perf_event_attr` as of PERF_ATTR_SIZE_VER0 (64 bytes), enough for a tracepoint.
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

fn tracepoint_id() -> anyhow::Result<u64> {
    let paths = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .map(|root| format!("{root}/events/{TRACEPOINT}/id"));
    let text =
        paths.iter().find_map(|path| std::fs::read_to_string(path).ok()).with_context(|| {
            format!("reading the tracepoint's id from {paths:?}: is tracefs mounted?")
        })?;
    text.trim().parse().with_context(|| format!("the tracepoint id {text:?}"))
}

/// The head of `union bpf_attr` for BPF_MAP_CREATE, zero-padded.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    tail: [u8; 64],
}

fn bpf(
    command: libc::c_int,
    attr: *const c_void,
    size: usize,
    what: &str,
) -> anyhow::Result<libc::c_int> {
    // SAFETY: `attr` points at `size` readable bytes that live across the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr, size) };
    if fd < 0 {
        bail!("{what}: {}", io::Error::last_os_error());
    }
    Ok(fd as libc::c_int)
}

fn create_ring() -> anyhow::Result<libc::c_int> {
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_RINGBUF,
        key_size: 0,
        value_size: 0,
        max_entries: RING_BYTES,
        tail: [0; 64],
    };
    bpf(BPF_MAP_CREATE, (&raw const attr).cast(), size_of::<MapCreateAttr>(), "creating the ring")
}

fn load(name: &str, program: &[u64]) -> anyhow::Result<libc::c_int> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACEPOINT,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        tail: [0; 64],
    };
    bpf(
        BPF_PROG_LOAD,
        (&raw const attr).cast(),
        size_of::<ProgLoadAttr>(),
        "loading the floor program",
    )
}

/// Moves the ring's consumer position to its producer position every `DRAIN_EVERY`, so the
/// program always finds room; the records are not read.
fn drain_forever(ring: libc::c_int) -> anyhow::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let map = |offset: usize, protection| {
        // SAFETY: maps one page of the ring's fd, as the kernel lays it out: the consumer
        // position (writable) at 0, the producer position (read-only) one page on.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                protection,
                libc::MAP_SHARED,
                ring,
                offset as libc::off_t,
            )
        };
        if address == libc::MAP_FAILED {
            bail!("mapping the ring: {}", io::Error::last_os_error());
        }
        Ok(address.cast::<AtomicU64>())
    };
    let consumer = map(0, libc::PROT_READ | libc::PROT_WRITE)?;
    let producer = map(page, libc::PROT_READ)?;
    // SAFETY: both pages stay mapped for the life of the process; the positions are u64s
    // the kernel updates atomically.
    let (consumer, producer) = unsafe { (&*consumer, &*producer) };
    loop {
        consumer.store(producer.load(Ordering::Acquire), Ordering::Release);
        thread::sleep(DRAIN_EVERY);
    }
}

fn attach(program: libc::c_int, tracepoint: u64) -> anyhow::Result<libc::c_int> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: size_of::<PerfEventAttr>() as u32,
        config: tracepoint,
        sample_period: 0,
        sample_type: 0,
        read_format: 0,
        flags: 0,
        wakeup_events: 0,
        bp_type: 0,
        config1: 0,
    };
    // One event (any pid, CPU 0) is enough: a program attached to a tracepoint runs on every
    // CPU.
    // SAFETY: `attr` lives across the call; the size is the struct's.
    let event = unsafe {
        libc::syscall(libc::SYS_perf_event_open, &raw const attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    };
    if event < 0 {
        bail!("opening the tracepoint's perf event: {}", io::Error::last_os_error());
    }
    let event = event as libc::c_int;
    // SAFETY: ioctls on the perf event just opened.
    if unsafe { libc::ioctl(event, PERF_EVENT_IOC_SET_BPF, program) } < 0
        || unsafe { libc::ioctl(event, PERF_EVENT_IOC_ENABLE, 0) } < 0
    {
        bail!("attaching the floor program: {}", io::Error::last_os_error());
    }
    Ok(event)
}

/// Attaches the floor program, says so on stderr, and holds it until the process is
/// signalled (the bench interrupts it; the kernel detaches it with the process's files).
pub fn hold(floor: Floor) -> anyhow::Result<()> {
    // A shell starting the bench in the background makes its children ignore SIGINT.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: restoring a signal's default action.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    let name = floor.name();
    let (program, ring) = match floor.record_bytes() {
        None => (load(name, &empty_program())?, None),
        Some(bytes) => {
            let ring = create_ring()?;
            (load(name, &record_program(ring, bytes))?, Some(ring))
        }
    };
    let _event = attach(program, tracepoint_id()?)?;
    eprintln!("{name}: {floor:?} program attached to {TRACEPOINT}");
    match ring {
        Some(ring) => drain_forever(ring),
        None => loop {
            thread::sleep(Duration::from_secs(3600));
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // Encodings as `llvm-objdump -d` shows them for a BPF object (bytes little-endian).
        assert_eq!(mov_imm(0, 0).to_le_bytes(), [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(EXIT.to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(mov_reg(1, 0).to_le_bytes(), [0xbf, 0x01, 0, 0, 0, 0, 0, 0]);
        assert_eq!(store(0, 7, 120).to_le_bytes(), [0x7b, 0x70, 120, 0, 0, 0, 0, 0]);
        assert_eq!(call(131).to_le_bytes(), [0x85, 0, 0, 0, 131, 0, 0, 0]);
        assert_eq!(insn(0x18, 1, 1, 0, 7).to_le_bytes(), [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        assert_eq!(insn(0x15, 0, 0, -2, 0).to_le_bytes(), [0x15, 0, 0xfe, 0xff, 0, 0, 0, 0]);
    }

    #[test]
    fn the_record_programs_jump_over_the_stores_and_the_submit_to_their_exit() {
        for bytes in [128, 64, 32] {
            let program = record_program(3, bytes);
            let branch = program.iter().position(|i| i & 0xff == 0x15).unwrap();
            let offset = (program[branch] >> 16) as u16 as i16 as usize;
            // A jump lands `offset` instructions after the next one: on `r0 = 0; exit`.
            assert_eq!(&program[branch + 1 + offset..], [mov_imm(0, 0), EXIT], "{bytes}");
            let stores = program.iter().filter(|i| *i & 0xff == 0x7b).count();
            assert_eq!(stores * 8, bytes as usize, "every word of the record is written");
        }
    }
}
