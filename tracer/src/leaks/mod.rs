//! CLOSE_WAIT leaks: sockets whose peer hung up long ago while the local process never closed
//! them. This module holds the report (what the daemon serves at /api/leaks and `tcpstate
//! leaks` prints) and how it names the processes; `command` is `tcpstate leaks` itself.

pub mod command;
pub(crate) mod stuck_listeners;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use tracer_common::TcpState;

use self::stuck_listeners::StuckListener;
use crate::{
    cmdline::CmdlinePolicy,
    owners::{ProcessCache, scan_socket_holders},
    socket::{Process, SocketKey, SocketView},
};

/// Where a report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Source {
    /// The daemon, which saw most sockets enter CLOSE_WAIT: exact ages where it did.
    Daemon,
    /// A one-shot snapshot: every age is a lower bound.
    Snapshot,
}

/// The leaked sockets of one process (or of no known process, `pid` null).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ProcessLeak {
    /// The process holding them: `pid`, `comm`, `cmdline`, `cgroup` and the container and
    /// pod its cgroup names (all null when no process could be found).
    #[serde(flatten)]
    pub process: Process,
    pub count: usize,
    pub oldest_age_seconds: f64,
    /// Oldest first.
    pub sockets: Vec<SocketView>,
}

impl ProcessLeak {
    /// Distinct local ports, ascending.
    pub(crate) fn local_ports(&self) -> Vec<u16> {
        let ports: std::collections::BTreeSet<u16> =
            self.sockets.iter().map(|s| s.local_port).collect();
        ports.into_iter().collect()
    }

    /// Remote addresses with the most leaked sockets, most first.
    pub(crate) fn top_peers(&self, n: usize) -> Vec<(IpAddr, usize)> {
        let mut peers: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for socket in &self.sockets {
            *peers.entry(socket.remote_address).or_default() += 1;
        }
        let mut peers: Vec<_> = peers.into_iter().collect();
        peers.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        peers.truncate(n);
        peers
    }

    pub(crate) fn container_description(&self) -> Option<String> {
        self.process.container_description()
    }

    pub(crate) fn comm_or_unknown(&self) -> &str {
        self.process.comm_or_unknown()
    }
}

/// Every leak at one moment, and the listeners that stopped accepting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LeakReport {
    pub source: Source,
    pub threshold_seconds: f64,
    pub leaked_sockets: usize,
    /// Most leaked sockets first.
    pub processes: Vec<ProcessLeak>,
    /// How long a listener's accept queue must stay full to count as stuck (0 in a snapshot,
    /// which reports the listeners full at that moment).
    #[serde(default)]
    pub listen_queue_threshold_seconds: f64,
    /// Listeners whose accept queue stayed at 90 % of its limit or more for that long, full
    /// the longest first.
    #[serde(default)]
    pub stuck_listeners: Vec<StuckListener>,
    /// What the other diagnoses found stuck, each in the same shape.
    #[serde(default)]
    pub findings: Vec<Finding>,
}

/// Something a diagnosis found stuck, in a shape `tcpstate leaks` and `top` show without
/// knowing the diagnosis: a diagnosis adds findings of a new kind without touching either.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Finding {
    /// The diagnosis's name for it, a few words: "connection churn", "stalled reader".
    pub kind: String,
    /// The process behind it, as far as known.
    #[serde(flatten)]
    pub process: Process,
    /// Sockets or connections it concerns.
    pub count: usize,
    /// How long it has lasted so far, in seconds.
    pub for_seconds: f64,
    /// One line that says what was found.
    pub summary: String,
    /// Lines under it: the sockets, destinations or figures behind it.
    #[serde(default)]
    pub details: Vec<String>,
    /// What to check, said once per kind under the findings.
    #[serde(default)]
    pub advice: String,
    /// Something stuck (a leak, a stall), which makes `tcpstate leaks` exit 1; a pattern to
    /// fix (connection churn) is shown without.
    #[serde(default)]
    pub stuck: bool,
    /// The sockets it concerns, where a diagnosis names them one by one (stalls).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sockets: Vec<FindingSocket>,
}

/// One socket behind a finding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FindingSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: String,
    /// Bytes waiting in the queue the finding is about (`ss`'s Recv-Q or Send-Q).
    #[serde(default)]
    pub queued_bytes: Option<u64>,
    /// The finding's reason for this socket, as its metric's `reason` label says it.
    #[serde(default)]
    pub reason: Option<String>,
    /// How long it has been so, in seconds.
    pub for_seconds: f64,
}

impl Finding {
    #[cfg(test)]
    pub(crate) fn example() -> Self {
        Self {
            kind: "connection churn".into(),
            process: Process {
                pid: Some(4242),
                comm: Some("client".into()),
                cmdline: Some("client --upstream 10.0.0.9:5432".into()),
                ..Process::default()
            },
            count: 3000,
            for_seconds: 75.0,
            summary: "opens 50 connections/s to 10.0.0.9:5432, median lifetime 3 ms".into(),
            details: vec!["no connection is reused: pool them".into()],
            advice: "`tcpstate explain TIME_WAIT` says what churn costs.".into(),
            stuck: false,
            sockets: Vec::new(),
        }
    }
}

impl LeakReport {
    /// Whether anything at all is stuck: `tcpstate leaks` exits 1 then.
    pub(crate) fn anything_stuck(&self) -> bool {
        self.leaked_sockets > 0
            || !self.stuck_listeners.is_empty()
            || self.findings.iter().any(|finding| finding.stuck)
    }

    pub(crate) fn empty(source: Source, threshold: Duration) -> Self {
        Self {
            source,
            threshold_seconds: threshold.as_secs_f64(),
            leaked_sockets: 0,
            processes: Vec::new(),
            listen_queue_threshold_seconds: 0.0,
            stuck_listeners: Vec::new(),
            findings: Vec::new(),
        }
    }
}

/// A socket past the threshold, before its owner is resolved.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub key: SocketKey,
    pub age_ns: u64,
    pub age_is_lower_bound: bool,
    /// The owner the kernel program captured in the owner's own system call.
    pub kernel_owner: Option<u32>,
    /// Socket inode from sock_diag, 0 when unknown.
    pub inode: u32,
}

/// Names the processes holding leaked sockets. Owners the kernel captured are used while
/// those processes live; the others are looked up by inode in /proc, at most once per
/// `scan_interval`, and only for sockets that need it.
pub(crate) struct OwnerResolver {
    processes: ProcessCache,
    holders: HashMap<u32, u32>,
    last_scan: Option<Instant>,
    scan_interval: Duration,
}

impl OwnerResolver {
    pub(crate) fn new(scan_interval: Duration, cmdline: CmdlinePolicy) -> Self {
        Self {
            processes: ProcessCache::new(cmdline),
            holders: HashMap::new(),
            last_scan: None,
            scan_interval,
        }
    }

    pub(crate) fn report(
        &mut self,
        candidates: Vec<Candidate>,
        source: Source,
        threshold: Duration,
    ) -> LeakReport {
        let mut owners: Vec<Option<u32>> = candidates
            .iter()
            .map(|c| c.kernel_owner.filter(|&pid| self.processes.get(pid).is_some()))
            .collect();
        let unresolved: HashSet<u32> = candidates
            .iter()
            .zip(&owners)
            .filter(|(c, owner)| owner.is_none() && c.inode != 0)
            .map(|(c, _)| c.inode)
            .collect();
        let missing = unresolved.iter().any(|inode| !self.holders.contains_key(inode));
        let may_scan = self.last_scan.is_none_or(|at| at.elapsed() >= self.scan_interval);
        if missing && may_scan {
            self.holders = scan_socket_holders(&unresolved);
            self.last_scan = Some(Instant::now());
        }
        for (candidate, owner) in candidates.iter().zip(owners.iter_mut()) {
            if owner.is_none() {
                *owner = self.holders.get(&candidate.inode).copied();
            }
        }

        let mut by_owner: HashMap<Option<u32>, Vec<&Candidate>> = HashMap::new();
        for (candidate, owner) in candidates.iter().zip(&owners) {
            by_owner.entry(*owner).or_default().push(candidate);
        }
        let live: HashSet<u32> = by_owner.keys().flatten().copied().collect();
        let mut processes: Vec<ProcessLeak> = by_owner
            .into_iter()
            .map(|(pid, mut sockets)| {
                sockets.sort_by_key(|c| std::cmp::Reverse(c.age_ns));
                let process = pid
                    .and_then(|pid| self.processes.get(pid))
                    .unwrap_or_else(|| Process { pid, ..Process::default() });
                ProcessLeak {
                    count: sockets.len(),
                    oldest_age_seconds: sockets.first().map_or(0.0, |s| s.age_ns as f64 / 1e9),
                    sockets: sockets.into_iter().map(|c| leaked_socket(c, &process)).collect(),
                    process,
                }
            })
            .collect();
        processes
            .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.process.pid.cmp(&b.process.pid)));
        self.processes.retain(&live);
        LeakReport {
            source,
            threshold_seconds: threshold.as_secs_f64(),
            leaked_sockets: candidates.len(),
            processes,
            listen_queue_threshold_seconds: 0.0,
            stuck_listeners: Vec::new(),
            findings: Vec::new(),
        }
    }
}

fn leaked_socket(candidate: &Candidate, owner: &Process) -> SocketView {
    SocketView::new(
        &candidate.key,
        TcpState::CLOSE_WAIT,
        candidate.age_ns,
        candidate.age_is_lower_bound,
        owner,
        candidate.inode,
    )
}

/// "1 process", "3 processes".
pub(crate) fn plural(count: usize, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

/// `1h 02m`, `2m 03s`, `4.2s`: ages as people read them.
pub(crate) fn human_age(seconds: f64) -> String {
    let whole = seconds as u64;
    match whole {
        0..60 => format!("{seconds:.1}s"),
        60..3600 => format!("{}m {:02}s", whole / 60, whole % 60),
        3600..86_400 => format!("{}h {:02}m", whole / 3600, whole % 3600 / 60),
        _ => format!("{}d {:02}h", whole / 86_400, whole % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(human_age(4.25), "4.2s");
        assert_eq!(human_age(123.0), "2m 03s");
        assert_eq!(human_age(3720.0), "1h 02m");
        assert_eq!(human_age(90_000.0), "1d 01h");
    }

    #[test]
    fn peers_and_ports_summarize_a_process() {
        let socket = |port: u16, peer: [u8; 4]| SocketView {
            state: TcpState::CLOSE_WAIT,
            family: crate::socket::Family::Inet,
            local_address: IpAddr::from([10, 0, 0, 1]),
            local_port: port,
            remote_address: IpAddr::from(peer),
            remote_port: 40_000,
            netns: 1,
            age_seconds: 1.0,
            age_is_lower_bound: false,
            owner_pid: None,
            owner_comm: None,
            inode: None,
            cgroup: None,
            container: Default::default(),
        };
        let leak = ProcessLeak {
            process: Process { pid: Some(1), ..Process::default() },
            count: 3,
            oldest_age_seconds: 1.0,
            sockets: vec![
                socket(80, [10, 0, 0, 9]),
                socket(443, [10, 0, 0, 8]),
                socket(80, [10, 0, 0, 9]),
            ],
        };
        assert_eq!(leak.local_ports(), vec![80, 443]);
        assert_eq!(leak.top_peers(1), vec![(IpAddr::from([10, 0, 0, 9]), 2)]);
        assert_eq!(leak.comm_or_unknown(), "unknown");
        assert_eq!(leak.container_description(), None);
        let container = crate::container::Container {
            container_id: Some("3f4e1c2a9b8d7e6f".into()),
            pod_uid: Some("0b7e5a3c-1d2f-4e6a-8b9c-0d1e2f3a4b5c".into()),
            pod_namespace: Some("shop".into()),
            pod_name: Some("checkout".into()),
            container_name: None,
        };
        let in_pod =
            ProcessLeak { process: Process { container, ..leak.process.clone() }, ..leak.clone() };
        assert_eq!(
            in_pod.container_description().as_deref(),
            Some("container 3f4e1c2a9b8d (pod shop/checkout)")
        );
        let json = serde_json::to_value(&in_pod).unwrap();
        assert_eq!(json["pod_name"], "checkout", "flattened into the process: {json}");
        assert!(serde_json::to_value(&leak).unwrap()["container_id"].is_null());
    }
}
