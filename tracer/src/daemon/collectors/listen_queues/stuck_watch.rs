//! The daemon's stuck-listener detector: a listener whose accept queue is full at every dump
//! for longer than the threshold is named with the process holding it, logged once when it
//! becomes stuck and once when it accepts again (or closes).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::{
    cmdline::CmdlinePolicy,
    leaks::stuck_listeners::{StuckListener, holders, is_full},
    netns::NamespaceListeners,
    owners::ProcessCache,
    socket::Process,
};

/// At most one /proc walk for owners not yet known this often.
const LOOKUP_INTERVAL: Duration = Duration::from_secs(5);

/// A listener across dumps: its namespace and its socket's inode.
type ListenerId = (u32, u32);

pub(super) struct StuckWatch {
    threshold: Duration,
    /// Listeners full at every dump since this instant.
    full_since: HashMap<ListenerId, Instant>,
    /// Listeners reported stuck, as last reported.
    stuck: HashMap<ListenerId, StuckListener>,
    /// Owners found: listener inode to pid.
    known: HashMap<u32, u32>,
    processes: ProcessCache,
    last_scan: Option<Instant>,
}

impl StuckWatch {
    pub(super) fn new(threshold: Duration, cmdline: CmdlinePolicy) -> Self {
        Self {
            threshold,
            full_since: HashMap::new(),
            stuck: HashMap::new(),
            known: HashMap::new(),
            processes: ProcessCache::new(cmdline),
            last_scan: None,
        }
    }

    pub(super) fn threshold(&self) -> Duration {
        self.threshold
    }

    /// One evaluation of a dump of every namespace's listeners, at `now` (blocking: may walk
    /// /proc). Returns the stuck listeners, full the longest first.
    pub(super) fn evaluate(
        &mut self,
        namespaces: &[NamespaceListeners],
        now: Instant,
    ) -> Vec<StuckListener> {
        let mut full = HashMap::new();
        let mut open = HashSet::new();
        for namespace in namespaces {
            for queue in &namespace.queues {
                let id = (namespace.inode, queue.inode);
                open.insert(id);
                if is_full(queue) {
                    let since = self.full_since.get(&id).copied().unwrap_or(now);
                    full.insert(id, (since, queue));
                }
            }
        }
        self.full_since = full.iter().map(|(id, (since, _))| (*id, *since)).collect();
        let over: Vec<_> = full
            .into_iter()
            .filter(|(_, (since, _))| now.duration_since(*since) >= self.threshold)
            .collect();
        let owners = self.owners(over.iter().map(|((_, inode), _)| *inode).collect());
        let mut stuck: Vec<(ListenerId, StuckListener)> = over
            .into_iter()
            .map(|(id, (since, queue))| {
                let owner = owners.get(&id.1).cloned().unwrap_or_default();
                let full_for = now.duration_since(since).as_secs_f64();
                (id, StuckListener::new(id.0, queue, Some(full_for), owner))
            })
            .collect();
        for (id, listener) in &stuck {
            if !self.stuck.contains_key(id) {
                log::warn!("listener not accepting: {}", listener.describe());
            }
        }
        let now_stuck: HashSet<ListenerId> = stuck.iter().map(|(id, _)| *id).collect();
        for (id, listener) in self.stuck.drain().filter(|(id, _)| !now_stuck.contains(id)) {
            let what = if open.contains(&id) { "accepting again" } else { "closed" };
            log::warn!(
                "listener {what}: {} in network namespace {}, {}",
                listener.local(),
                listener.netns,
                listener.owner()
            );
        }
        stuck.sort_by(|(_, a), (_, b)| {
            b.full_for_seconds.partial_cmp(&a.full_for_seconds).unwrap_or(std::cmp::Ordering::Equal)
        });
        self.stuck = stuck.iter().cloned().collect();
        stuck.into_iter().map(|(_, listener)| listener).collect()
    }

    /// The processes holding the listeners `inodes`: a /proc walk for the unknown ones at most
    /// every `LOOKUP_INTERVAL`.
    fn owners(&mut self, inodes: HashSet<u32>) -> HashMap<u32, Process> {
        let may_scan = self.last_scan.is_none_or(|at| at.elapsed() >= LOOKUP_INTERVAL);
        let unknown = inodes.iter().any(|inode| !self.known.contains_key(inode));
        if unknown && may_scan {
            self.last_scan = Some(Instant::now());
            return holders(&inodes, &mut self.known, &mut self.processes);
        }
        // Without a walk: only the owners already known.
        let known: HashSet<u32> =
            inodes.into_iter().filter(|inode| self.known.contains_key(inode)).collect();
        holders(&known, &mut self.known, &mut self.processes)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::unix::fs::MetadataExt as _};

    use super::*;
    use crate::sockdiag::ListenQueue;

    fn namespace(queue: ListenQueue) -> Vec<NamespaceListeners> {
        vec![NamespaceListeners { inode: 1, queues: vec![queue], overflows: None, drops: None }]
    }

    #[test]
    fn a_listener_full_past_the_threshold_is_named_until_it_drains() {
        // A listener of this process: its owner is found in /proc.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd as _;
        let link = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode = u32::try_from(link.ino()).unwrap();
        let local = listener.local_addr().unwrap();
        let queue = |length| ListenQueue { local, length, limit: 8, inode };
        let mut watch = StuckWatch::new(Duration::from_secs(10), CmdlinePolicy::Full);
        let start = Instant::now();
        assert!(watch.evaluate(&namespace(queue(9)), start).is_empty());
        let later = start + Duration::from_secs(9);
        assert!(watch.evaluate(&namespace(queue(9)), later).is_empty(), "not yet");
        let past = start + Duration::from_secs(10);
        let stuck = watch.evaluate(&namespace(queue(9)), past);
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].process.pid, Some(std::process::id()));
        assert_eq!((stuck[0].local(), stuck[0].queue_length), (local, 9));
        assert_eq!(stuck[0].full_for_seconds, Some(10.0));
        // Draining once restarts the clock.
        assert!(watch.evaluate(&namespace(queue(2)), past).is_empty());
        let again = past + Duration::from_secs(9);
        assert!(watch.evaluate(&namespace(queue(9)), again).is_empty());
    }
}
