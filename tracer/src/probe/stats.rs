//! What the kernel knows about a loaded program: run count, run time and, above all, how many
//! times it skipped the program (`recursion_misses`), which aya's `ProgramInfo` does not expose.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

/// Counters from `struct bpf_prog_info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ProgramStats {
    /// Invocations (counted only while `kernel.bpf_stats_enabled` is 1).
    pub run_count: u64,
    /// Nanoseconds spent in the program (same condition).
    pub run_time_ns: u64,
    /// Times the kernel did not run the program because it was already running on that CPU
    /// (for a classic tracepoint: because any tracing program was). Always counted.
    pub recursion_misses: u64,
}

/// Reads the program's info with `BPF_OBJ_GET_INFO_BY_FD`.
pub(crate) fn program_stats(program: BorrowedFd<'_>) -> io::Result<ProgramStats> {
    // SAFETY: both are plain C structs for which all-zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = program.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&raw mut info) as u64;
    // SAFETY: `attr` points at `info`, which outlives the call; the kernel writes at most
    // `info_len` bytes into it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ProgramStats {
        run_count: info.run_cnt,
        run_time_ns: info.run_time_ns,
        recursion_misses: info.recursion_misses,
    })
}
