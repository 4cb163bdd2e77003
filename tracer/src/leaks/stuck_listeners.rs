//! Listeners that stopped accepting: a process whose event loop is stuck or whose workers are
//! all busy leaves its listener's accept queue full, and the kernel drops new handshakes
//! until clients time out. Like a CLOSE_WAIT leak, the finding is the process to look at.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::human_age;
use crate::{
    owners::{ProcessCache, scan_socket_holders},
    sockdiag::ListenQueue,
    socket::Process,
};

/// A listener whose accept queue is full, with the process holding it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StuckListener {
    /// The process holding the listener: `pid`, `comm`, `cmdline`, `cgroup`, and the
    /// container and pod its cgroup names (null when no process could be found).
    #[serde(flatten)]
    pub process: Process,
    pub netns: u32,
    pub local_address: IpAddr,
    pub local_port: u16,
    /// Connections established and waiting for accept().
    pub queue_length: u32,
    /// The backlog the listener asked for, capped by `net.core.somaxconn`.
    pub queue_limit: u32,
    /// How long the queue has stayed full; null in a snapshot, which sees one moment.
    pub full_for_seconds: Option<f64>,
    pub inode: u32,
}

impl StuckListener {
    pub(crate) fn new(
        netns: u32,
        queue: &ListenQueue,
        full_for_seconds: Option<f64>,
        process: Process,
    ) -> Self {
        Self {
            process,
            netns,
            local_address: queue.local.ip(),
            local_port: queue.local.port(),
            queue_length: queue.length,
            queue_limit: queue.limit,
            full_for_seconds,
            inode: queue.inode,
        }
    }

    /// `127.0.0.1:8080`, `[::1]:8080`.
    pub(crate) fn local(&self) -> std::net::SocketAddr {
        (self.local_address, self.local_port).into()
    }

    /// `held by pid 812 (nginx)`, or that no process was found.
    pub(crate) fn owner(&self) -> String {
        match self.process.pid {
            Some(pid) => format!("held by pid {pid} ({})", self.process.comm_or_unknown()),
            None => "no process found holding it".to_owned(),
        }
    }

    /// One line for the log: where, how full, for how long, and who.
    pub(crate) fn describe(&self) -> String {
        let mut line = format!(
            "{} in network namespace {}: {} of {} connections wait in its accept queue",
            self.local(),
            self.netns,
            self.queue_length,
            self.queue_limit
        );
        if let Some(seconds) = self.full_for_seconds {
            let _ = write!(line, ", full for {}", human_age(seconds));
        }
        let _ = write!(line, "; {}", self.owner());
        if let Some(container) = self.process.container_description() {
            let _ = write!(line, "; in {container}");
        }
        if let Some(cmdline) = self.process.cmdline.as_deref().filter(|c| !c.is_empty()) {
            let _ = write!(line, "; cmdline: {cmdline}");
        }
        line
    }
}

#[cfg(test)]
impl StuckListener {
    /// A listener of `server` (pid 812) on 0.0.0.0:8080, 129 of 128 waiting for 95 s.
    pub(crate) fn example() -> Self {
        let queue =
            ListenQueue { local: ([0, 0, 0, 0], 8080).into(), length: 129, limit: 128, inode: 9 };
        let process = Process {
            pid: Some(812),
            comm: Some("server".into()),
            cmdline: Some("server --port 8080".into()),
            ..Process::default()
        };
        Self::new(7, &queue, Some(95.0), process)
    }
}

/// Whether a listener's accept queue holds at least 90 % of its limit: from there on a burst
/// of handshakes overflows it.
pub(crate) fn is_full(queue: &ListenQueue) -> bool {
    queue.length > 0 && u64::from(queue.length) * 10 >= u64::from(queue.limit) * 9
}

/// The processes holding `inodes`, from one walk of /proc for those not in `known` (which
/// keeps what it found, for the next call).
pub(crate) fn holders(
    inodes: &HashSet<u32>,
    known: &mut HashMap<u32, u32>,
    processes: &mut ProcessCache,
) -> HashMap<u32, Process> {
    known.retain(|inode, pid| inodes.contains(inode) && processes.get(*pid).is_some());
    let missing: HashSet<u32> = inodes.iter().filter(|i| !known.contains_key(i)).copied().collect();
    known.extend(scan_socket_holders(&missing));
    let live: HashSet<u32> = known.values().copied().collect();
    let found =
        known.iter().filter_map(|(&inode, &pid)| Some((inode, processes.get(pid)?))).collect();
    processes.retain(&live);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(length: u32, limit: u32) -> ListenQueue {
        ListenQueue { local: ([127, 0, 0, 1], 8080).into(), length, limit, inode: 7 }
    }

    #[test]
    fn a_queue_is_full_from_nine_tenths_of_its_limit() {
        assert!(is_full(&queue(9, 8)), "one over the limit, as the kernel allows");
        assert!(is_full(&queue(9, 10)) && !is_full(&queue(8, 10)));
        assert!(is_full(&queue(1, 0)), "listen(0) queues one");
        assert!(!is_full(&queue(0, 0)), "an empty queue is never full");
    }

    #[test]
    fn the_log_line_names_the_listener_its_queue_and_its_owner() {
        let process = Process {
            pid: Some(812),
            comm: Some("server".into()),
            cmdline: Some("server --port 8080".into()),
            ..Process::default()
        };
        let stuck = StuckListener::new(4026531840, &queue(9, 8), Some(31.0), process);
        assert_eq!(
            stuck.describe(),
            "127.0.0.1:8080 in network namespace 4026531840: 9 of 8 connections wait in its \
             accept queue, full for 31.0s; held by pid 812 (server); cmdline: server --port 8080"
        );
        let unknown = StuckListener::new(1, &queue(9, 8), None, Process::default());
        assert!(
            unknown
                .describe()
                .ends_with("connections wait in its accept queue; no process found holding it")
        );
        let json = serde_json::to_value(&stuck).unwrap();
        assert_eq!((json["pid"].as_u64(), json["local_port"].as_u64()), (Some(812), Some(8080)));
    }
}
