//! Types shared by the kernel program (`tracer-ebpf`) and the userspace daemon (`tracer`).
//!
//! Everything that crosses the kernel/user boundary is defined here once: the ring-buffer
//! record, the per-socket map value, the per-CPU counters, the load-time settings and the
//! offsets the program reads in the tracepoint's record. Layouts are `#[repr(C)]` with explicit
//! padding and their sizes are pinned at compile time, so both sides agree byte for byte.
#![no_std]

pub mod record;
pub mod settings;
pub mod state;
pub mod tracepoint;

#[cfg(feature = "user")]
mod user;

pub use record::{RECORD_SIZE, TransitionRecord};
pub use settings::{KernelCounters, KernelSettings, SocketState};
pub use state::TcpState;
#[cfg(feature = "user")]
pub use user::{DecodeError, ip_from_raw, ip_to_raw, unmap_ipv4};
