//! Command-line interface: subcommands, flags, their environment variables, and validation.
//! A value outside its range is a usage error (exit status 2) that names the flag and the range.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use tracer_common::TcpState;

#[derive(Debug, Parser)]
#[command(
    name = "tcpstate",
    version,
    about = "Trace TCP socket state changes with eBPF: live stream, Prometheus metrics, CLOSE_WAIT leaks",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream TCP state transitions as they happen, until Ctrl-C, --duration or --count.
    Watch(WatchArgs),
}

/// Settings of the kernel probe, shared by every command that loads it.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Also trace MPTCP sockets (protocol 262), not only TCP.
    #[arg(long, env = "TCPSTATE_MPTCP")]
    pub mptcp: bool,

    /// Size of the kernel-to-userspace ring buffer: a power of two from 4K to 1G
    /// (suffixes K, M, G are binary). Larger absorbs longer bursts.
    #[arg(long, env = "TCPSTATE_RING_BYTES", default_value = "4M", value_parser = parse_ring_bytes, value_name = "BYTES")]
    pub ring_bytes: u32,

    /// Sockets the kernel program tracks at once (an LRU map; about 100 bytes each).
    #[arg(long, env = "TCPSTATE_KERNEL_SOCKETS", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1024..=16_777_216), value_name = "N")]
    pub kernel_sockets: u32,

    /// Read the tracepoint layout from this file instead of tracefs (testing the layout check).
    #[arg(long, hide = true, value_name = "FILE")]
    pub tracepoint_format: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Print one JSON object per line instead of aligned columns.
    #[arg(long)]
    pub json: bool,

    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub duration: Option<u64>,

    /// Stop after printing this many transitions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Keep transitions where either port is PORT (repeatable, up to 8). Runs in the kernel.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,

    /// Keep transitions whose local port is PORT (repeatable, up to 8). Runs in the kernel.
    #[arg(long = "sport", value_name = "PORT")]
    pub sports: Vec<u16>,

    /// Keep transitions whose remote port is PORT (repeatable, up to 8). Runs in the kernel.
    #[arg(long = "dport", value_name = "PORT")]
    pub dports: Vec<u16>,

    /// Keep transitions where either address is IP (repeatable). Runs in userspace.
    #[arg(long = "addr", value_name = "IP")]
    pub addrs: Vec<IpAddr>,

    /// Keep IPv4 sockets only. Runs in the kernel.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Keep IPv6 sockets only. Runs in the kernel.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Keep transitions whose old or new state is NAME, e.g. CLOSE_WAIT (repeatable).
    /// Runs in the kernel.
    #[arg(long = "state", value_name = "NAME", value_parser = parse_state)]
    pub states: Vec<TcpState>,

    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// Parses a TCP state name for a flag.
pub fn parse_state(value: &str) -> Result<TcpState, String> {
    TcpState::from_name(value).ok_or_else(|| {
        let names: Vec<_> = TcpState::ALL.iter().map(|s| s.name()).collect();
        format!("unknown TCP state; expected one of {}", names.join(", "))
    })
}

/// Parses a byte size with an optional binary suffix (K, M, G; `KiB` forms too).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let trimmed = value.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    let number: u64 =
        digits.parse().map_err(|_| "expected a number of bytes, e.g. 4M".to_owned())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("unknown size suffix `{suffix}`; use K, M or G")),
    };
    number.checked_mul(1 << shift).ok_or_else(|| "size too large".to_owned())
}

const MIN_RING_BYTES: u64 = 4096;
const MAX_RING_BYTES: u64 = 1 << 30;

fn parse_ring_bytes(value: &str) -> Result<u32, String> {
    let bytes = parse_size(value)?;
    if !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&bytes) || !bytes.is_power_of_two() {
        return Err(format!(
            "must be a power of two from {MIN_RING_BYTES} (4K) to {MAX_RING_BYTES} (1G) bytes"
        ));
    }
    Ok(bytes as u32)
}

/// Checks that cannot be expressed as one flag's value parser. Returns the message of a usage
/// error, if any.
pub fn validate(cli: &Cli) -> Result<(), String> {
    match &cli.command {
        Command::Watch(args) => {
            let max = tracer_common::settings::MAX_FILTER_PORTS;
            for (flag, ports) in
                [("--port", &args.ports), ("--sport", &args.sports), ("--dport", &args.dports)]
            {
                if ports.len() > max {
                    return Err(format!(
                        "{flag} is given {} times; at most {max} are supported",
                        ports.len()
                    ));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn ring_bytes_must_be_a_power_of_two_in_range() {
        assert_eq!(parse_ring_bytes("4M"), Ok(4 << 20));
        assert!(parse_ring_bytes("3M").is_err());
        assert!(parse_ring_bytes("2K").is_err());
        assert!(parse_ring_bytes("2G").is_err());
    }

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
