//! `tcpstate leaks`: the leak table and the stuck listeners of a running daemon, or of a
//! one-shot snapshot when no daemon answers. Exit status 0 when there are none, 1 when there
//! are, 2 on a usage error, 3 when neither the daemon nor a snapshot could tell.

use std::{fmt::Write as _, process::ExitCode, time::Duration};

use anyhow::Context as _;
use tracer_common::TcpState;

use super::{
    Candidate, LeakReport, OwnerResolver, Source, human_age, plural,
    stuck_listeners::{self, StuckListener},
};
use crate::{
    client::{self, DaemonTls, DaemonUrl, Endpoint, FetchError},
    cmdline::CmdlinePolicy,
    netns,
    owners::ProcessCache,
    sockdiag,
    socket::SocketKey,
};

async fn fetch(endpoint: &Endpoint) -> Result<LeakReport, FetchError> {
    let body = client::get(endpoint, "/api/leaks").await?;
    let url = endpoint.url();
    serde_json::from_slice::<LeakReport>(&body)
        .with_context(|| format!("{url}/api/leaks did not answer with a leak report"))
        .map_err(FetchError::Failed)
}

/// A one-shot look without a daemon: CLOSE_WAIT sockets of every namespace, dated by the time
/// since their peer's last ACK (a lower bound of their stay), and the listeners full at this
/// moment; owners from /proc.
pub(crate) fn snapshot(threshold: Duration, cmdline: CmdlinePolicy) -> LeakReport {
    let report = close_wait_snapshot(threshold, cmdline);
    LeakReport { stuck_listeners: full_listeners(cmdline), ..report }
}

fn close_wait_snapshot(threshold: Duration, cmdline: CmdlinePolicy) -> LeakReport {
    let threshold_ms = threshold.as_millis();
    let all = netns::dump_all_with(sockdiag::dump_close_wait);
    if all.refused > 0 {
        eprintln!(
            "tcpstate: {} network namespaces could not be entered (needs CAP_SYS_ADMIN): \
             their sockets are not in this report",
            all.refused
        );
    }
    let candidates = all
        .dumps
        .into_iter()
        .flat_map(|dump| {
            dump.sockets.into_iter().filter_map(move |socket| {
                let silent_ms = socket.since_last_ack_ms()?;
                (u128::from(silent_ms) >= threshold_ms).then(|| Candidate {
                    key: SocketKey::from_diag(dump.inode, &socket),
                    age_ns: u64::from(silent_ms) * 1_000_000,
                    age_is_lower_bound: true,
                    kernel_owner: None,
                    inode: socket.inode,
                })
            })
        })
        .collect();
    OwnerResolver::new(Duration::ZERO, cmdline).report(candidates, Source::Snapshot, threshold)
}

/// Listeners of every namespace whose accept queue is full now, fullest first.
fn full_listeners(cmdline: CmdlinePolicy) -> Vec<StuckListener> {
    let full: Vec<(u32, sockdiag::ListenQueue)> = netns::listeners_all()
        .into_iter()
        .flat_map(|ns| ns.queues.into_iter().map(move |queue| (ns.inode, queue)))
        .filter(|(_, queue)| stuck_listeners::is_full(queue))
        .collect();
    let inodes = full.iter().map(|(_, queue)| queue.inode).collect();
    let mut processes = ProcessCache::new(cmdline);
    let owners = stuck_listeners::holders(&inodes, &mut Default::default(), &mut processes);
    let mut listeners: Vec<StuckListener> = full
        .iter()
        .map(|(netns, queue)| {
            let owner = owners.get(&queue.inode).cloned().unwrap_or_default();
            StuckListener::new(*netns, queue, None, owner)
        })
        .collect();
    listeners.sort_by_key(|l| std::cmp::Reverse(l.queue_length));
    listeners
}

/// The leak table and the stuck listeners, as aligned text.
pub(crate) fn render(report: &LeakReport) -> String {
    let mut out = render_close_wait(report);
    render_stuck_listeners(report, &mut out);
    render_findings(report, &mut out);
    out
}

/// The other diagnoses' findings, grouped by kind, each kind's advice once under it.
fn render_findings(report: &LeakReport, out: &mut String) {
    let mut kinds: Vec<&str> = report.findings.iter().map(|f| f.kind.as_str()).collect();
    kinds.dedup();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in kinds {
        let found: Vec<_> = report.findings.iter().filter(|f| f.kind == kind).collect();
        let _ = writeln!(out, "\n{} ({}):", capitalized(kind), found.len());
        for finding in &found {
            let _ = writeln!(
                out,
                "\n{}: {} (for {})",
                finding.process.owner_line(),
                finding.summary,
                human_age(finding.for_seconds)
            );
            for line in &finding.details {
                let _ = writeln!(out, "  {line}");
            }
            let process = &finding.process;
            if let Some(cmdline) = process.cmdline.as_deref().filter(|c| !c.is_empty()) {
                let _ = writeln!(out, "  cmdline: {cmdline}");
            }
            if let Some(where_) = process.container_description() {
                let _ = writeln!(out, "  in:      {where_}");
            }
        }
        if let Some(advice) = found.iter().map(|f| f.advice.as_str()).find(|a| !a.is_empty()) {
            let _ = writeln!(out, "\n{advice}");
        }
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

fn render_stuck_listeners(report: &LeakReport, out: &mut String) {
    let listeners = &report.stuck_listeners;
    let threshold = human_age(report.listen_queue_threshold_seconds);
    if listeners.is_empty() {
        let _ = match report.source {
            Source::Daemon => writeln!(
                out,
                "\nNo stuck listeners: no accept queue has stayed full for over {threshold}."
            ),
            Source::Snapshot => writeln!(out, "\nNo listener has a full accept queue."),
        };
        return;
    }
    let _ = match report.source {
        Source::Daemon => writeln!(
            out,
            "\n{} not accepting (accept queue full for over {threshold}):",
            plural(listeners.len(), "listener", "listeners")
        ),
        Source::Snapshot => writeln!(
            out,
            "\n{} with a full accept queue now (a snapshot cannot tell for how long):",
            plural(listeners.len(), "listener", "listeners")
        ),
    };
    for listener in listeners {
        let full_for = listener
            .full_for_seconds
            .map_or_else(String::new, |s| format!(", full for {}", human_age(s)));
        let _ = writeln!(
            out,
            "\n{} (network namespace {}): {} of {} waiting{full_for}",
            listener.local(),
            listener.netns,
            listener.queue_length,
            listener.queue_limit
        );
        let _ = writeln!(out, "  {}", listener.owner());
        let process = &listener.process;
        if let Some(cmdline) = process.cmdline.as_deref().filter(|c| !c.is_empty()) {
            let _ = writeln!(out, "  cmdline: {cmdline}");
        }
        if let Some(where_) = process.container_description() {
            let _ = writeln!(out, "  in:      {where_}");
        }
    }
    let _ = writeln!(
        out,
        "\nA full accept queue means the program no longer calls accept() fast enough (a \
         stuck event loop, a full worker pool): new handshakes are dropped until clients time \
         out. `tcpstate explain LISTEN` says what to check."
    );
}

fn render_close_wait(report: &LeakReport) -> String {
    let mut out = String::new();
    let threshold = human_age(report.threshold_seconds);
    if report.processes.is_empty() {
        let _ = writeln!(
            out,
            "No CLOSE_WAIT leaks: no socket has been in CLOSE_WAIT for over {threshold}."
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{} leaked in CLOSE_WAIT (over {threshold}) by {}:",
        plural(report.leaked_sockets, "socket", "sockets"),
        plural(report.processes.len(), "process", "processes")
    );
    for process in &report.processes {
        let pid = process.process.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
        let _ = writeln!(
            out,
            "\nPID {pid} {}: {}, oldest {}",
            process.comm_or_unknown(),
            plural(process.count, "socket", "sockets"),
            human_age(process.oldest_age_seconds)
        );
        if process.process.pid.is_none() {
            let _ =
                writeln!(out, "  owner unknown: no process holds a descriptor for these sockets");
        }
        if let Some(cmdline) = process.process.cmdline.as_deref().filter(|c| !c.is_empty()) {
            let _ = writeln!(out, "  cmdline: {cmdline}");
        }
        if let Some(cgroup) = &process.process.cgroup {
            let _ = writeln!(out, "  cgroup:  {cgroup}");
        }
        if let Some(where_) = process.container_description() {
            let _ = writeln!(out, "  in:      {where_}");
        }
        const SHOWN: usize = 10;
        let rows: Vec<(String, String, String)> = process
            .sockets
            .iter()
            .take(SHOWN)
            .map(|socket| {
                let age = human_age(socket.age_seconds);
                (
                    socket.local().to_string(),
                    socket.remote().to_string(),
                    if socket.age_is_lower_bound { format!(">={age}") } else { age },
                )
            })
            .collect();
        let local = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(5);
        let remote = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(6);
        let _ = writeln!(out, "  {:<local$}  {:<remote$}  {:>10}", "LOCAL", "REMOTE", "AGE");
        for (l, r, age) in rows {
            let _ = writeln!(out, "  {l:<local$}  {r:<remote$}  {age:>10}");
        }
        if process.sockets.len() > SHOWN {
            let _ = writeln!(out, "  ... and {} more", process.sockets.len() - SHOWN);
        }
    }
    if let Some(close_wait) = crate::explain::of(TcpState::CLOSE_WAIT) {
        let _ = writeln!(
            out,
            "\nCLOSE_WAIT: {}; `tcpstate explain CLOSE_WAIT` says what to check.",
            close_wait.hint()
        );
    }
    out
}

/// What `tcpstate leaks` asks and how it answers.
#[derive(Debug)]
pub struct Config {
    /// The daemon to ask.
    pub(crate) daemon: DaemonUrl,
    pub(crate) tls: DaemonTls,
    /// Print the report as JSON (the daemon's /api/leaks format).
    pub(crate) json: bool,
    /// In snapshot mode: how long a socket must have been in CLOSE_WAIT to count.
    pub(crate) close_wait_threshold: Duration,
    /// In snapshot mode: how much of each command line to show.
    pub(crate) cmdline: CmdlinePolicy,
}

pub async fn run(config: Config) -> ExitCode {
    const LEAKS: u8 = 1;
    const FAILED: u8 = 3;
    let endpoint = match Endpoint::new(config.daemon.clone(), &config.tls) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            eprintln!("tcpstate: error: {error:#}");
            return ExitCode::from(FAILED);
        }
    };
    let report = match fetch(&endpoint).await {
        Ok(report) => report,
        Err(FetchError::Failed(error)) => {
            eprintln!("tcpstate: error: {error:#}");
            return ExitCode::from(FAILED);
        }
        Err(FetchError::Unreachable(reason)) => {
            eprintln!(
                "tcpstate: no daemon at {} ({reason}); taking a one-shot snapshot instead. Ages \
                 are lower bounds: the time since each socket's peer last sent an ACK.",
                config.daemon
            );
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!(
                    "tcpstate: not root: other users' processes and other network namespaces \
                     are not visible"
                );
            }
            let (threshold, cmdline) = (config.close_wait_threshold, config.cmdline);
            match tokio::task::spawn_blocking(move || snapshot(threshold, cmdline)).await {
                Ok(report) => report,
                Err(error) => {
                    eprintln!("tcpstate: error: snapshot failed: {error}");
                    return ExitCode::from(FAILED);
                }
            }
        }
    };
    let printed = if config.json {
        serde_json::to_string_pretty(&report).map(|json| println!("{json}"))
    } else {
        print!("{}", render(&report));
        Ok(())
    };
    if let Err(error) = printed {
        eprintln!("tcpstate: error: {error}");
        return ExitCode::from(FAILED);
    }
    if report.anything_stuck() { ExitCode::from(LEAKS) } else { ExitCode::SUCCESS }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_report_says_so() {
        let report = LeakReport {
            listen_queue_threshold_seconds: 30.0,
            ..LeakReport::empty(Source::Daemon, Duration::from_secs(60))
        };
        let text = render(&report);
        assert!(text.starts_with("No CLOSE_WAIT leaks"), "{text}");
        assert!(
            text.contains("No stuck listeners: no accept queue has stayed full for over 30.0s")
        );
    }

    #[test]
    fn a_stuck_listener_is_shown_with_its_process() {
        let report = LeakReport {
            listen_queue_threshold_seconds: 30.0,
            stuck_listeners: vec![StuckListener::example()],
            ..LeakReport::empty(Source::Daemon, Duration::from_secs(60))
        };
        let text = render(&report);
        assert!(
            text.contains(
                "1 listener not accepting (accept queue full for over 30.0s):\n\n\
                 0.0.0.0:8080 (network namespace 7): 129 of 128 waiting, full for 1m 35s\n  \
                 held by pid 812 (server)\n  cmdline: server --port 8080\n"
            ),
            "{text}"
        );
    }

    /// Another diagnosis's findings need nothing of this module: shown by kind, with their
    /// process, details and advice; the exit status says something is stuck only for a
    /// finding that is.
    #[test]
    fn findings_of_any_kind_are_shown_and_round_trip() {
        let report = LeakReport {
            findings: vec![crate::leaks::Finding::example()],
            ..LeakReport::empty(Source::Daemon, Duration::from_secs(60))
        };
        assert!(!report.anything_stuck(), "churn is not stuck");
        let stuck = LeakReport {
            findings: vec![crate::leaks::Finding {
                stuck: true,
                ..crate::leaks::Finding::example()
            }],
            ..report.clone()
        };
        assert!(stuck.anything_stuck());
        let text = render(&report);
        assert!(
            text.contains(
                "Connection churn (1):\n\nPID 4242 client: opens 50 connections/s to \
                 10.0.0.9:5432, median lifetime 3 ms (for 1m 15s)\n  no connection is reused: \
                 pool them\n  cmdline: client --upstream 10.0.0.9:5432\n\n`tcpstate explain \
                 TIME_WAIT` says what churn costs.\n"
            ),
            "{text}"
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<LeakReport>(&json).unwrap(), report);
        assert!(json.contains(r#""kind":"connection churn","pid":4242"#), "{json}");
    }
}
