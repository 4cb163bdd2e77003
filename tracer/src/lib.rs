//! tcpstate: TCP state transitions from the kernel tracepoint `sock:inet_sock_set_state`,
//! streamed live (`watch`) or aggregated by a daemon (`run`) into Prometheus metrics.
//!
//! Data flows one way: the kernel program (`tracer-ebpf`) writes one record per transition to
//! a BPF ring buffer; [`probe`] loads and attaches it, [`reader`] drains the ring in batches,
//! and the commands consume the records.
//!
//! The public surface is what the `tcpstate` binary (the commands and their configuration)
//! and the integration tests (the probe, the reader, a record's accessors) use; everything
//! else is `pub(crate)`, which `unreachable_pub` keeps so.

mod bounded_body;
pub mod capabilities;
pub mod cgroups;
pub mod check;
pub mod cli;
mod client;
mod clock;
mod cmdline;
mod container;
pub mod daemon;
mod error_chain;
pub mod event;
pub mod explain;
mod failure;
pub mod leaks;
mod netns;
mod owners;
pub mod probe;
pub mod reader;
mod signals;
mod sockdiag;
mod socket;
pub mod top;
pub mod watch;
mod web_config;
