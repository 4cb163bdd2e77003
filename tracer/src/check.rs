//! `tcpstate check`: whether this host can run tcpstate, and what would be degraded. Each
//! check is the real thing (the programs are loaded, attached and detached again), in the
//! order the daemon meets them, so the first failure is the one to fix first.

use std::{fmt::Write as _, process::ExitCode};

use serde::Serialize;
use tracer_common::tracepoint;

use crate::{
    netns,
    probe::{
        Probe, ProbeOptions, btf::KernelBtf, format, other_tracers, preflight,
        preflight::kernel_release,
    },
    sockdiag,
};

/// How one check came out; the report's verdict is the worst of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Verdict {
    Ok,
    /// tcpstate runs, without something (said in the detail).
    Degraded,
    /// tcpstate cannot run.
    Fails,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Degraded => "degraded",
            Self::Fails => "FAILS",
        }
    }

    /// 0 runs fully, 1 cannot run, 3 runs degraded (2 is a usage error).
    pub(crate) fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            Self::Ok => 0,
            Self::Fails => 1,
            Self::Degraded => 3,
        })
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Finding {
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub kernel: String,
    pub verdict: Verdict,
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, check: &'static str, verdict: Verdict, detail: impl Into<String>) {
        self.verdict = self.verdict.max(verdict);
        self.findings.push(Finding { check, verdict, detail: detail.into() });
    }

    /// Adds `result` as ok (its detail) or as a failure (the error); true when ok.
    fn require<E: std::fmt::Display>(
        &mut self,
        check: &'static str,
        result: Result<String, E>,
    ) -> bool {
        match result {
            Ok(detail) => self.add(check, Verdict::Ok, detail),
            Err(error) => self.add(check, Verdict::Fails, error.to_string()),
        }
        self.verdict < Verdict::Fails
    }
}

/// Runs every check; stops at the first that makes tcpstate unable to run, since the later
/// ones depend on it.
pub(crate) fn run_checks() -> Report {
    let (release, _) = kernel_release();
    let mut report = Report { kernel: release, verdict: Verdict::Ok, findings: Vec::new() };
    if check_host(&mut report) && check_programs(&mut report) {
        check_sock_diag(&mut report);
        check_namespaces(&mut report);
    }
    report
}

/// What loading needs: kernel, privileges, BTF, tracefs, the tracepoint's layout. False when
/// one fails.
fn check_host(report: &mut Report) -> bool {
    report.require(
        "kernel",
        preflight::check_kernel_version().map(|(major, minor)| {
            let (min_major, min_minor) = preflight::MIN_KERNEL;
            format!("Linux {major}.{minor} (tcpstate needs {min_major}.{min_minor} or newer)")
        }),
    ) && report.require(
        "privileges",
        preflight::check_privileges()
            .map(|()| "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): programs can load".to_owned()),
    ) && report.require(
        "btf",
        KernelBtf::load().map(|_| "/sys/kernel/btf/vmlinux: offsets resolve".to_owned()),
    ) && report.require(
        "tracefs",
        preflight::ensure_tracefs().map(|path| format!("mounted at {}", path.display())),
    ) && report.require("tracepoint", tracepoint_format())
}

/// Other tracers, then each program loaded, attached and detached again. False when the
/// probe cannot attach.
fn check_programs(report: &mut Report) -> bool {
    let others = other_tracers();
    report.add(
        "other tracers",
        Verdict::Ok,
        if others.is_empty() {
            "none on the tracepoint".to_owned()
        } else {
            format!("also on the tracepoint (they coexist): {}", others.join(", "))
        },
    );
    // The smallest maps that load: this checks the kernel, not the memory a run will use.
    let options =
        ProbeOptions { ring_bytes: 64 << 10, socket_map_entries: 1024, ..ProbeOptions::default() };
    let probe = match Probe::attach(&options) {
        Ok(probe) => probe,
        Err(error) => {
            report.add("programs", Verdict::Fails, crate::error_chain::one_line(&error));
            return false;
        }
    };
    report.add("ring buffer", Verdict::Ok, "created");
    for status in probe.parts() {
        let name = status.part.name();
        match &status.unavailable {
            None => report.add(name, Verdict::Ok, "loads and attaches"),
            Some(reason) => report.add(
                name,
                Verdict::Degraded,
                format!("{reason}; without it {}", status.part.without()),
            ),
        }
    }
    // Dropping the probe detaches every program.
    true
}

fn check_sock_diag(report: &mut Report) {
    match sockdiag::dump_tcp(false) {
        Ok(dump) => report.add(
            "sock_diag",
            Verdict::Ok,
            format!("dumps this namespace ({} TCP sockets)", dump.sockets.len()),
        ),
        Err(error) => {
            report.add(
                "sock_diag",
                Verdict::Degraded,
                format!(
                    "{error}: gauges count only sockets seen changing state, TIME_WAIT is not \
                     counted and leaks of sockets older than tcpstate are missed; modprobe tcp_diag"
                ),
            );
            return;
        }
    }
    match sockdiag::tcp_info_size() {
        Ok(size) if size >= sockdiag::TCP_INFO_FOR_STALLS => report.add(
            "stall check",
            Verdict::Ok,
            format!("tcp_info of {size} bytes: stalled readers and writers, and why writers stall"),
        ),
        Ok(size) if size >= sockdiag::TCP_INFO_FOR_PROGRESS => report.add(
            "stall check",
            Verdict::Ok,
            format!(
                "tcp_info of {size} bytes, without tcpi_snd_wnd (Linux 5.4): stalled readers \
                 and writers; a writer's zero window is seen only while the kernel probes it"
            ),
        ),
        Ok(size) => report.add(
            "stall check",
            Verdict::Degraded,
            format!(
                "tcp_info of {size} bytes has no tcpi_bytes_received and tcpi_bytes_acked \
                 (Linux 4.1): stalled sockets are not found on this kernel"
            ),
        ),
        Err(error) => report.add(
            "stall check",
            Verdict::Degraded,
            format!("{error}: stalled sockets are not found; modprobe tcp_diag"),
        ),
    }
}

fn check_namespaces(report: &mut Report) {
    let all = netns::dump_all_with(sockdiag::dump_close_wait);
    if all.refused > 0 {
        report.add(
            "network namespaces",
            Verdict::Degraded,
            format!(
                "{} of {} cannot be entered (needs CAP_SYS_ADMIN): their sockets are missing \
                 from gauges and leak reports",
                all.refused,
                all.refused + all.dumps.len()
            ),
        );
    } else {
        report.add("network namespaces", Verdict::Ok, format!("{} dumped", all.dumps.len()));
    }
}

fn tracepoint_format() -> Result<String, String> {
    let path = preflight::ensure_tracefs()
        .map_err(|error| error.to_string())?
        .join("events")
        .join(tracepoint::CATEGORY)
        .join(tracepoint::NAME)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| {
        let path = path.display().to_string();
        match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                preflight::PreflightError::TracefsUnreadable { path, source }.to_string()
            }
            _ => format!("reading {path}: {source}"),
        }
    })?;
    format::check(&text).map_err(|mismatch| mismatch.to_string())?;
    Ok(format!(
        "{}:{} has the fields and offsets tcpstate reads",
        tracepoint::CATEGORY,
        tracepoint::NAME
    ))
}

/// The report as people read it.
pub(crate) fn render(report: &Report) -> String {
    let mut out = format!("tcpstate check on Linux {}\n", report.kernel);
    let width = report.findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    for finding in &report.findings {
        let _ = writeln!(
            out,
            "  {:<8}  {:<width$}  {}",
            finding.verdict.label(),
            finding.check,
            finding.detail
        );
    }
    out.push_str(match report.verdict {
        Verdict::Ok => "tcpstate can run here, fully.\n",
        Verdict::Degraded => "tcpstate can run here, degraded as said above.\n",
        Verdict::Fails => "tcpstate cannot run here: fix the first FAILS line above.\n",
    });
    out
}

/// Prints the report, as JSON when `json` is set; the exit status carries the verdict.
pub fn run(json: bool) -> ExitCode {
    let report = run_checks();
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(error) => {
                eprintln!("tcpstate: error: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", render(&report));
    }
    report.verdict.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_finding_decides_and_is_rendered_last() {
        let mut report = Report { kernel: "6.1.0".into(), verdict: Verdict::Ok, findings: vec![] };
        report.add("kernel", Verdict::Ok, "Linux 6.1");
        report.add("accept_owner", Verdict::Degraded, "refused");
        assert_eq!(report.verdict, Verdict::Degraded);
        let text = render(&report);
        assert!(text.contains("  degraded  accept_owner  refused"), "{text}");
        assert!(text.ends_with("degraded as said above.\n"), "{text}");
        assert!(!report.require("btf", Err::<String, _>("no BTF")));
        assert_eq!(report.verdict, Verdict::Fails);
    }
}
