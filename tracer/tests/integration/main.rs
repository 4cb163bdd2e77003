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
mod privileges;
mod probe;
mod top;
mod watch;
