//! tcpstate: TCP state transitions from the kernel tracepoint `sock:inet_sock_set_state`,
//! streamed live (`watch`) or aggregated by a daemon (`run`) into Prometheus metrics.
//!
//! Data flows one way: the kernel program (`tracer-ebpf`) writes one record per transition to
//! a BPF ring buffer; [`probe`] loads and attaches it, [`reader`] drains the ring in batches,
//! and the commands consume the records.

pub mod accepted;
pub mod capabilities;
pub mod cgroups;
pub mod check;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cmdline;
pub mod container;
pub mod daemon;
pub mod duplicates;
pub mod event;
pub mod explain;
pub mod failure;
pub mod leaks;
pub mod netns;
pub mod owners;
pub mod probe;
pub mod reader;
pub mod signals;
pub mod sockdiag;
pub mod socket;
pub mod top;
pub mod watch;
pub mod web_config;
