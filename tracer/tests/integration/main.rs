//! Integration tests, one binary with a module per area (as aya lays out its own): each loads
//! the real program into the running kernel and drives real TCP traffic, so they need root.
//!
//! Tests run in parallel (`#[parallel]`): each uses its own ports, listeners and daemon, and
//! filters what it reads by them. The few that need the tracepoint to themselves, because they
//! check which program the kernel calls first or count every firing under a burst, are
//! `#[serial]`: no other test runs beside them.

// The helpers are `pub` for the test modules beside them; nothing outside reaches them.
#![allow(unreachable_pub)]

mod check;
mod common;
mod containers;
mod daemon;
mod deploy;
mod failures;
mod http;
mod leaks;
mod lifetimes;
mod listeners;
mod otlp;
mod pressure;
mod privileges;
mod probe;
mod retransmits;
mod stalls;
mod top;
mod watch;

/// Runs once, before the test harness starts: these tests load eBPF programs, create network
/// namespaces and start services, which needs root. A contributor's plain `cargo test` then
/// skips the whole binary with one message instead of failing every test; `cargo xtask test`
/// (and so CI) sets `TCPSTATE_INTEGRATION_REQUIRED`, and there not being root fails the run.
extern "C" fn skip_unless_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    let required = std::env::var_os("TCPSTATE_INTEGRATION_REQUIRED").is_some();
    eprintln!(
        "\n{}: the integration tests load the real eBPF program and must run as root; run \
         them with `cargo xtask test` (through sudo when not root).\n",
        if required { "error" } else { "SKIPPED" }
    );
    std::process::exit(i32::from(required));
}

/// Called by the C runtime before `main`, as every `.init_array` entry is.
#[used]
#[unsafe(link_section = ".init_array")]
static SKIP_UNLESS_ROOT: extern "C" fn() = skip_unless_root;
