//! The flags' value parsers: each accepts one form and names it in its error, which clap turns
//! into a usage error (exit status 2) naming the flag.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

/// `--container`: hex digits, as runtimes print container ids (full or shortened).
pub(super) fn parse_container_id(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected a container id: up to 64 hex digits, e.g. 3f4e1c2a9b8d".to_owned());
    }
    Ok(value.to_ascii_lowercase())
}

/// `--cgroup`: an absolute path below the cgroup hierarchy's root.
pub(super) fn parse_cgroup_path(value: &str) -> Result<String, String> {
    if !value.starts_with('/') {
        return Err("expected a cgroup path starting with /, as /proc/PID/cgroup writes it, e.g. \
             /system.slice/nginx.service"
            .to_owned());
    }
    Ok(value.trim_end_matches('/').to_owned())
}

/// `--pod`: NAMESPACE/NAME.
pub(super) fn parse_pod(value: &str) -> Result<(String, String), String> {
    match value.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok((namespace.to_owned(), name.to_owned()))
        }
        _ => Err("expected NAMESPACE/NAME, e.g. shop/checkout-7f9c".to_owned()),
    }
}

/// Parses `--listen`: an IP address and a port, no host names (resolving one at start would make
/// the daemon depend on DNS).
pub(super) fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    const FORM: &str =
        "expected IP:PORT, e.g. 127.0.0.1:9977 or [::1]:9977; host names are not resolved";
    if let Ok(address) = value.parse::<SocketAddr>() {
        return Ok(address);
    }
    let Some((ip, port)) = value.rsplit_once(':') else {
        return Err(format!("no port: {FORM}"));
    };
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    if ip.parse::<IpAddr>().is_err() {
        return Err(format!("`{ip}` is not an IP address: {FORM}"));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!("`{port}` is not a port (0 to 65535): {FORM}"));
    }
    Err(FORM.to_owned())
}

/// A port to filter on: 1 to 65535 (no socket a filter could match has port 0).
pub(super) fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(0) | Err(_) => Err("expected a port from 1 to 65535".to_owned()),
        Ok(port) => Ok(port),
    }
}

pub(super) fn parse_count(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(0) | Err(_) => Err("expected a number of transitions, at least 1".to_owned()),
        Ok(count) => Ok(count),
    }
}

/// At most a year.
pub(super) fn parse_watch_duration(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(seconds @ 1..=31_536_000) => Ok(seconds),
        _ => Err("expected whole seconds from 1 to 31536000 (a year)".to_owned()),
    }
}

/// Parses a byte size with an optional binary suffix (K, M, G; `KiB` forms too).
pub(super) fn parse_size(value: &str) -> Result<u64, String> {
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

/// Parses seconds: a plain number (`90`, `0.5`) or with a unit (`90s`, `2m`, `1h`).
pub(super) fn parse_seconds(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().map_err(|_| "expected seconds, e.g. 30 or 2m".to_owned())?;
    let scale = match unit {
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown unit `{unit}`; use s, m or h")),
    };
    Duration::try_from_secs_f64(number * scale).map_err(|_| "out of range".to_owned())
}

pub(super) fn seconds_in(value: &str, min: f64, max: f64) -> Result<Duration, String> {
    let duration = parse_seconds(value)?;
    if !(min..=max).contains(&duration.as_secs_f64()) {
        return Err(format!("must be from {min} to {max} seconds"));
    }
    Ok(duration)
}

pub(super) fn parse_reconcile_interval(value: &str) -> Result<Duration, String> {
    seconds_in(value, 1.0, 3600.0)
}

pub(super) fn parse_threshold(value: &str) -> Result<Duration, String> {
    seconds_in(value, 0.1, 604_800.0)
}

/// `0` (off, as `Duration::ZERO`) or a threshold of 1 s to a week.
pub(super) fn parse_stall_threshold(value: &str) -> Result<Duration, String> {
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    seconds_in(value, 1.0, 604_800.0).map_err(|error| format!("{error} (or 0 to turn it off)"))
}

pub(super) fn parse_churn_lifetime(value: &str) -> Result<Duration, String> {
    seconds_in(value, 0.001, 3600.0)
}

pub(super) fn parse_churn_rate(value: &str) -> Result<f64, String> {
    let rate: f64 =
        value.parse().map_err(|_| "expected a number of connections per second".to_owned())?;
    if !(1.0..=1_000_000.0).contains(&rate) {
        return Err("must be from 1 to 1000000 connections per second".to_owned());
    }
    Ok(rate)
}

pub(super) fn parse_max_sockets(value: &str) -> Result<usize, String> {
    let n: usize = value.parse().map_err(|_| "expected a whole number".to_owned())?;
    if !(1000..=50_000_000).contains(&n) {
        return Err("must be from 1000 to 50000000".to_owned());
    }
    Ok(n)
}

const MIN_RING_BYTES: u64 = 4096;
const MAX_RING_BYTES: u64 = 1 << 30;

pub(super) fn parse_ring_bytes(value: &str) -> Result<u32, String> {
    let bytes = parse_size(value)?;
    if !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&bytes) || !bytes.is_power_of_two() {
        return Err(format!(
            "must be a power of two from {MIN_RING_BYTES} (4K) to {MAX_RING_BYTES} (1G) bytes"
        ));
    }
    Ok(bytes as u32)
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
    fn a_stall_threshold_is_off_at_zero_and_a_second_or_more_otherwise() {
        assert_eq!(parse_stall_threshold("0"), Ok(Duration::ZERO));
        assert_eq!(parse_stall_threshold("2m"), Ok(Duration::from_secs(120)));
        let error = parse_stall_threshold("0.5").unwrap_err();
        assert!(
            error.contains("from 1 to 604800") && error.contains("0 to turn it off"),
            "{error}"
        );
        assert!(parse_stall_threshold("soon").is_err());
    }

    #[test]
    fn seconds_parse_plain_and_suffixed() {
        assert_eq!(parse_seconds("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_seconds("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_seconds("2x").is_err());
        assert!(parse_seconds("").is_err());
        assert!(parse_reconcile_interval("0").is_err());
        assert!(parse_reconcile_interval("2h").is_err());
    }

    #[test]
    fn listen_errors_name_the_expected_form() {
        assert_eq!(parse_listen("127.0.0.1:9977"), Ok("127.0.0.1:9977".parse().unwrap()));
        assert_eq!(parse_listen("[::1]:0"), Ok("[::1]:0".parse().unwrap()));
        for bad in ["localhost:9977", "127.0.0.1", "127.0.0.1:99999", "[::1]", ""] {
            let error = parse_listen(bad).unwrap_err();
            assert!(error.contains("expected IP:PORT, e.g. 127.0.0.1:9977"), "{bad}: {error}");
        }
        assert!(parse_listen("localhost:9977").unwrap_err().contains("`localhost` is not an IP"));
        assert!(parse_listen("127.0.0.1:99999").unwrap_err().contains("`99999` is not a port"));
    }

    #[test]
    fn ports_and_counts_start_at_one() {
        assert_eq!(parse_port("443"), Ok(443));
        assert!(parse_port("0").unwrap_err().contains("from 1 to 65535"));
        assert!(parse_port("70000").is_err());
        assert_eq!(parse_count("1"), Ok(1));
        assert_eq!(parse_count("0").unwrap_err(), "expected a number of transitions, at least 1");
        assert!(parse_watch_duration("0").is_err());
    }
}
