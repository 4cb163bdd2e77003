//! The floor under any tracer of this tracepoint: a program that does nothing (`r0 = 0;
//! exit`) attached to `sock:inet_sock_set_state` the way every classic-tracepoint program is.
//! What the storm loses to it is the kernel's own cost of running a BPF program there (the
//! tracepoint's record built for it, the dispatch, bpf statistics), which no program can go
//! below; tcpstate's cost is what it adds on top.
//!
//! Two instructions need no compiler or ELF: they are loaded with bpf(2) and attached with
//! perf_event_open(2) and two ioctls, as libbpf does for tracepoints. aya only loads programs
//! from ELF objects.

use std::{ffi::c_void, io, thread, time::Duration};

use anyhow::{Context as _, bail};

/// The program's name, as bpftool lists it.
pub const NAME: &str = "floor";

const TRACEPOINT: &str = "sock/inet_sock_set_state";
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `_IOW('$', 8, __u32)` and `_IO('$', 0)` from linux/perf_event.h.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// `mov64 r0, 0` (BPF_ALU64 | BPF_MOV | BPF_K) and `exit` (BPF_JMP | BPF_EXIT).
const PROGRAM: [u64; 2] = [0xb7, 0x95];

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

fn load() -> anyhow::Result<libc::c_int> {
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..NAME.len()].copy_from_slice(NAME.as_bytes());
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACEPOINT,
        insn_cnt: PROGRAM.len() as u32,
        insns: PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        tail: [0; 64],
    };
    // SAFETY: `attr` and what it points at live across the call; the size is the struct's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &raw const attr as *const c_void,
            size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        bail!("loading the empty program: {}", io::Error::last_os_error());
    }
    Ok(fd as libc::c_int)
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
        bail!("attaching the empty program: {}", io::Error::last_os_error());
    }
    Ok(event)
}

/// Attaches the empty program, says so on stderr, and holds it until the process is
/// signalled (the bench interrupts it; the kernel detaches it with the process's files).
pub fn hold() -> anyhow::Result<()> {
    // A shell starting the bench in the background makes its children ignore SIGINT.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: restoring a signal's default action.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    let program = load()?;
    let _event = attach(program, tracepoint_id()?)?;
    eprintln!("{NAME}: empty program attached to {TRACEPOINT}");
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
