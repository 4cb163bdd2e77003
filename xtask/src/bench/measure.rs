//! What the benchmark reads about a running tracer: its CPU time and peak memory from /proc,
//! its eBPF programs' run statistics from the kernel (through bpftool), its metrics over HTTP.

use std::{
    collections::{HashMap, HashSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized comm: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields[11].parse()?;
    let stime: f64 = fields[12].parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) / ticks)
}

/// Peak resident memory (VmHWM) and current (VmRSS), in bytes.
pub fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line =
            status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
        let kib: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Run statistics of one eBPF program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
}

impl ProgStats {
    /// What ran between `self` and `later`.
    pub fn delta_to(self, later: Self) -> Self {
        Self {
            run_time_ns: later.run_time_ns.saturating_sub(self.run_time_ns),
            run_cnt: later.run_cnt.saturating_sub(self.run_cnt),
            recursion_misses: later.recursion_misses.saturating_sub(self.recursion_misses),
        }
    }
}

/// Every loaded program's statistics, by id (bpftool omits counters that are zero).
pub fn programs() -> anyhow::Result<HashMap<u64, (String, ProgStats)>> {
    let output =
        Command::new("bpftool").args(["prog", "show", "--json"]).output().context("bpftool")?;
    if !output.status.success() {
        bail!("bpftool prog show failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let list: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let mut programs = HashMap::new();
    for prog in list.as_array().context("a list")? {
        let number = |key: &str| prog[key].as_u64().unwrap_or(0);
        let stats = ProgStats {
            run_time_ns: number("run_time_ns"),
            run_cnt: number("run_cnt"),
            recursion_misses: number("recursion_misses"),
        };
        let name = prog["name"].as_str().unwrap_or("").to_owned();
        programs.insert(number("id"), (name, stats));
    }
    Ok(programs)
}

/// Sums the statistics of the programs in `ids`.
pub fn sum(programs: &HashMap<u64, (String, ProgStats)>, ids: &HashSet<u64>) -> ProgStats {
    ids.iter().filter_map(|id| programs.get(id)).fold(ProgStats::default(), |a, (_, s)| ProgStats {
        run_time_ns: a.run_time_ns + s.run_time_ns,
        run_cnt: a.run_cnt + s.run_cnt,
        recursion_misses: a.recursion_misses + s.recursion_misses,
    })
}

/// Turns `kernel.bpf_stats_enabled` on for the benchmark and restores it afterwards.
pub struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS)?.trim().to_owned();
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.previous);
    }
}

/// One HTTP/1.0 GET (so a streamed answer ends with the connection, not in chunks); returns
/// the body and how long the whole exchange took.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let elapsed = started.elapsed();
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header")?;
    if head.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok((body.to_owned(), elapsed))
}

/// One HTTP/1.0 GET whose body is read and dropped; returns the status code.
pub fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reader = std::io::BufReader::new(stream);
    let mut status_line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut status_line)?;
    std::io::copy(&mut reader, &mut std::io::sink())?;
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path}: no HTTP status in {status_line:?}"))
}

/// The sum of every sample of `name` in a Prometheus text exposition whose labels contain
/// all of `labels` (`key="value"` pairs).
pub fn metric(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric_name = series.split('{').next()?;
            (metric_name == name && labels.iter().all(|l| series.contains(l))).then_some(value)
        })
        .filter_map(|value| value.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_by_name_and_labels() {
        let text =
            "# TYPE a_total counter\na_total{cause=\"x\"} 2\na_total{cause=\"y\"} 3\nab_total 7\n";
        assert_eq!(metric(text, "a_total", &[]), 5.0);
        assert_eq!(metric(text, "a_total", &["cause=\"y\""]), 3.0);
        assert_eq!(metric(text, "ab_total", &[]), 7.0);
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let (peak, now) = memory(pid).unwrap();
        assert!(peak >= now && now > 0);
    }
}
