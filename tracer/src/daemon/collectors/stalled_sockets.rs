//! Sockets that stopped moving data, the twins of a CLOSE_WAIT leak: a process that stopped
//! reading (data waits in its receive queue while the peer's writes block) and a peer that
//! stopped reading or is gone (our send queue stays full; the kernel probes a zero window or
//! sends the same segments again). Each reconciliation's dump lists every ESTABLISHED and
//! CLOSE_WAIT socket with queued data and its `tcp_info`; a socket is stalled when what its
//! application read (bytes received less the queue), or what the peer acknowledged, did not
//! move from one dump to the next for longer than `--stall-threshold`. A busy transfer moves
//! both between any two dumps; an idle connection has nothing queued and is not looked at.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};

use crate::{
    cmdline::CmdlinePolicy,
    daemon::{
        core::{
            Diagnosis,
            groups::{GroupBy, GroupLabels},
        },
        export::family::{Scrape, escape_label_value, gauge_f64},
    },
    leaks::{Finding, FindingSocket, LeakReport, human_age, plural},
    netns::NamespaceDump,
    owners::{ProcessCache, scan_socket_holders},
    sockdiag::QueuedSocket,
    socket::{Process, SocketKey},
};

/// At most one /proc walk for the owners of stalled sockets this often.
const LOOKUP_INTERVAL: Duration = Duration::from_secs(5);
/// Sockets listed under one finding; the rest are counted.
const SOCKETS_LISTED: usize = 20;

/// Why a socket is stalled: its reader or, for a writer, what the kernel says of the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Stall {
    /// Unread data waits and the application read nothing.
    Reader,
    /// The peer advertises a zero window: it stopped reading.
    PeerWindowZero,
    /// The kernel sends the same data again: the path or the peer is gone.
    Retransmitting,
    /// Data waits for an acknowledgement that does not come, for no reason the kernel says.
    Unacknowledged,
}

impl Stall {
    const ALL: [Self; 4] =
        [Self::Reader, Self::PeerWindowZero, Self::Retransmitting, Self::Unacknowledged];

    /// The metric's `kind` label, and the finding's kind after "stalled ".
    fn kind(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::PeerWindowZero | Self::Retransmitting | Self::Unacknowledged => "writer",
        }
    }

    /// The metric's `reason` label.
    fn reason(self) -> &'static str {
        match self {
            Self::Reader => "not_reading",
            Self::PeerWindowZero => "peer_window_zero",
            Self::Retransmitting => "retransmitting",
            Self::Unacknowledged => "unacknowledged",
        }
    }

    /// The reason in words, for findings and the log.
    fn words(self) -> &'static str {
        match self {
            Self::Reader => "the process reads none of it",
            Self::PeerWindowZero => "peer window zero: the peer stopped reading",
            Self::Retransmitting => "retransmitting: the path or the peer is gone",
            Self::Unacknowledged => "the peer acknowledges nothing",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            Self::Reader => {
                "A process that holds unread data and reads nothing is blocked elsewhere: look \
                 at what its threads wait for (`cat /proc/PID/task/*/stack`, a thread dump) for \
                 a lock, a full downstream queue or a slow call. `tcpstate explain ESTABLISHED` \
                 says how to read stalls."
            }
            Self::PeerWindowZero | Self::Retransmitting | Self::Unacknowledged => {
                "A writer whose peer's window stays zero waits for a peer that stopped reading: \
                 look at that peer's process. One that retransmits has lost its path or its \
                 peer: check the route and the peer host, and set write timeouts \
                 (TCP_USER_TIMEOUT) so requests fail instead of hanging. `tcpstate explain \
                 ESTABLISHED` says how to read stalls."
            }
        }
    }
}

/// Which way a socket's data does not move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Direction {
    Reading,
    Writing,
}

/// A socket with queued data, as the last dumps saw it.
#[derive(Clone, Debug)]
struct Watched {
    /// What the application read (reading) or the peer acknowledged (writing).
    progress: u64,
    /// The first dump that saw `progress` at this value.
    since: Instant,
    socket: QueuedSocket,
    netns: u32,
}

/// A stalled socket, for a finding.
#[derive(Clone, Debug)]
struct Stalled {
    stall: Stall,
    netns: u32,
    socket: QueuedSocket,
    since: Instant,
}

impl Stalled {
    /// The bytes `ss` shows queued the way this stall is stuck: Recv-Q for a reader,
    /// Send-Q for a writer.
    fn queued(&self) -> u32 {
        match self.stall {
            Stall::Reader => self.socket.recv_queue,
            _ => self.socket.send_queue,
        }
    }
}

/// The stalled sockets of one process, one way.
#[derive(Clone, Debug)]
struct Group {
    stall: Stall,
    process: Process,
    sockets: Vec<Stalled>,
}

impl Group {
    fn since(&self) -> Instant {
        self.sockets.iter().map(|s| s.since).min().unwrap_or_else(Instant::now)
    }

    fn finding(&self) -> Finding {
        let bytes: u64 = self.sockets.iter().map(|s| u64::from(s.queued())).sum();
        let for_seconds = self.since().elapsed().as_secs_f64();
        let queue = if self.stall == Stall::Reader { "unread" } else { "unacknowledged" };
        let summary = format!(
            "{} with {bytes} bytes {queue}: {}",
            plural(self.sockets.len(), "socket", "sockets"),
            self.stall.words()
        );
        let mut details: Vec<String> = self
            .sockets
            .iter()
            .take(SOCKETS_LISTED)
            .map(|s| {
                format!(
                    "{} -> {} {}: {} bytes queued, for {}",
                    s.socket.socket.local(),
                    s.socket.socket.remote(),
                    s.socket.socket.state,
                    s.queued(),
                    human_age(s.since.elapsed().as_secs_f64())
                )
            })
            .collect();
        if self.sockets.len() > SOCKETS_LISTED {
            details.push(format!("and {} more", self.sockets.len() - SOCKETS_LISTED));
        }
        Finding {
            kind: format!("stalled {}", self.stall.kind()),
            process: self.process.clone(),
            count: self.sockets.len(),
            for_seconds,
            summary,
            details,
            advice: self.stall.advice().to_owned(),
            stuck: true,
            sockets: self
                .sockets
                .iter()
                .map(|s| FindingSocket {
                    local: s.socket.socket.local(),
                    remote: s.socket.socket.remote(),
                    state: s.socket.socket.state.to_string(),
                    queued_bytes: Some(u64::from(s.queued())),
                    reason: Some(s.stall.reason().to_owned()),
                    for_seconds: s.since.elapsed().as_secs_f64(),
                })
                .collect(),
        }
    }
}

/// The diagnosis. Off (`None` threshold) it asks the dumps for nothing.
pub(super) struct StalledSockets {
    threshold: Option<Duration>,
    group_by: Option<GroupBy>,
    state: Mutex<State>,
}

struct State {
    watched: HashMap<(SocketKey, Direction), Watched>,
    groups: Vec<Group>,
    /// Sockets with queued data the last dumps did not keep (past `sockdiag::MAX_QUEUED`).
    unchecked: usize,
    /// Owners by socket inode, from the last /proc walk.
    holders: HashMap<u32, u32>,
    last_walk: Option<Instant>,
    processes: ProcessCache,
    /// What is in the log: (owner, stall) that started and has not ended.
    logged: HashSet<(Option<u32>, Stall)>,
}

impl StalledSockets {
    pub(super) fn new(
        threshold: Option<Duration>,
        cmdline: CmdlinePolicy,
        group_by: Option<GroupBy>,
    ) -> Self {
        Self {
            threshold,
            group_by,
            state: Mutex::new(State {
                watched: HashMap::new(),
                groups: Vec::new(),
                unchecked: 0,
                holders: HashMap::new(),
                last_walk: None,
                processes: ProcessCache::new(cmdline),
                logged: HashSet::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Follows every queued socket of the dumps, taken at `now`: a socket whose progress
    /// moved (or is new) starts over; one that left the queues is forgotten.
    fn follow(&mut self, dumps: &[NamespaceDump], now: Instant) {
        let mut watched = HashMap::with_capacity(self.watched.len());
        for dump in dumps {
            for socket in &dump.queued {
                let key = SocketKey::from_diag(dump.inode, &socket.socket);
                let reading = (socket.unread() > 0).then_some(socket.consumed).flatten();
                let writing = (socket.send_queue > 0).then_some(socket.acked).flatten();
                for (direction, progress) in
                    [(Direction::Reading, reading), (Direction::Writing, writing)]
                {
                    let Some(progress) = progress else { continue };
                    let since = match self.watched.get(&(key, direction)) {
                        Some(before) if before.progress == progress => before.since,
                        _ => now,
                    };
                    let entry =
                        Watched { progress, since, socket: socket.clone(), netns: dump.inode };
                    watched.insert((key, direction), entry);
                }
            }
        }
        self.watched = watched;
        self.unchecked = dumps.iter().map(|dump| dump.queued_unkept).sum();
    }

    /// The sockets stalled for `threshold` at `now`.
    fn stalled(&self, threshold: Duration, now: Instant) -> Vec<Stalled> {
        self.watched
            .iter()
            .filter(|(_, w)| now.duration_since(w.since) >= threshold)
            .map(|((_, direction), w)| Stalled {
                stall: match direction {
                    Direction::Reading => Stall::Reader,
                    Direction::Writing if w.socket.peer_window_zero => Stall::PeerWindowZero,
                    Direction::Writing if w.socket.retransmitting => Stall::Retransmitting,
                    Direction::Writing => Stall::Unacknowledged,
                },
                netns: w.netns,
                socket: w.socket.clone(),
                since: w.since,
            })
            .collect()
    }

    /// Stalled sockets by owning process and stall, most sockets first. Owners are found by
    /// socket inode in /proc, walked at most every `LOOKUP_INTERVAL` and only for sockets
    /// not found before.
    fn group(&mut self, stalled: Vec<Stalled>) -> Vec<Group> {
        let inodes: HashSet<u32> =
            stalled.iter().map(|s| s.socket.socket.inode).filter(|&inode| inode != 0).collect();
        let missing = inodes.iter().any(|inode| !self.holders.contains_key(inode));
        let may_walk = self.last_walk.is_none_or(|at| at.elapsed() >= LOOKUP_INTERVAL);
        if missing && may_walk {
            self.holders = scan_socket_holders(&inodes);
            self.last_walk = Some(Instant::now());
        }
        let mut by_owner: BTreeMap<(Option<u32>, Stall), Vec<Stalled>> = BTreeMap::new();
        for socket in stalled {
            let owner = self.holders.get(&socket.socket.socket.inode).copied();
            by_owner.entry((owner, socket.stall)).or_default().push(socket);
        }
        let live: HashSet<u32> = by_owner.keys().filter_map(|(pid, _)| *pid).collect();
        let mut groups: Vec<Group> = by_owner
            .into_iter()
            .map(|((pid, stall), mut sockets)| {
                sockets.sort_by_key(|s| (s.since, s.socket.socket.local(), s.netns));
                let process = pid
                    .and_then(|pid| self.processes.get(pid))
                    .unwrap_or_else(|| Process { pid, ..Process::default() });
                Group { stall, process, sockets }
            })
            .collect();
        self.processes.retain(&live);
        groups.sort_by(|a, b| {
            b.sockets
                .len()
                .cmp(&a.sockets.len())
                .then_with(|| (a.process.pid, a.stall).cmp(&(b.process.pid, b.stall)))
        });
        groups
    }

    /// Logs each (process, stall) once when it starts and once when it ends.
    fn log_changes(&mut self, groups: &[Group]) {
        let present: HashSet<(Option<u32>, Stall)> =
            groups.iter().map(|g| (g.process.pid, g.stall)).collect();
        for group in groups {
            if self.logged.insert((group.process.pid, group.stall)) {
                let finding = group.finding();
                let cmdline =
                    group.process.cmdline.as_deref().filter(|c| !c.is_empty()).unwrap_or("-");
                let container = group
                    .process
                    .container_description()
                    .map_or_else(String::new, |c| format!("; in {c}"));
                log::warn!(
                    "stalled {}: {}: {}; {}{container}; cmdline: {cmdline}",
                    group.stall.kind(),
                    group.process.owner_line(),
                    finding.summary,
                    finding.details.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
                );
            }
        }
        let ended: Vec<(Option<u32>, Stall)> =
            self.logged.iter().filter(|key| !present.contains(key)).copied().collect();
        for (pid, stall) in ended {
            self.logged.remove(&(pid, stall));
            let who = pid.map_or_else(|| "an unknown process".to_owned(), |p| format!("PID {p}"));
            log::info!(
                "stalled {} ended: {who} has no socket stalled any more (reason {})",
                stall.kind(),
                stall.reason()
            );
        }
    }
}

impl Diagnosis for StalledSockets {
    fn needs_queued_sockets(&self) -> bool {
        self.threshold.is_some()
    }

    fn sockets_dumped(&self, dumps: &[NamespaceDump]) {
        let Some(threshold) = self.threshold else { return };
        let mut state = self.state();
        let now = Instant::now();
        state.follow(dumps, now);
        let stalled = state.stalled(threshold, now);
        let groups = state.group(stalled);
        state.log_changes(&groups);
        state.groups = groups;
    }

    fn metrics(&self, encoder: &mut DescriptorEncoder, _scrape: &Scrape) -> fmt::Result {
        let Some(threshold) = self.threshold else { return Ok(()) };
        let state = self.state();
        let mut series: BTreeMap<(Stall, GroupLabels), u64> =
            Stall::ALL.into_iter().map(|stall| ((stall, GroupLabels::default()), 0)).collect();
        for group in &state.groups {
            let labels =
                self.group_by.and_then(|by| by.group(&group.process.container)).unwrap_or_default();
            *series.entry((group.stall, labels)).or_default() += group.sockets.len() as u64;
        }
        let mut family = encoder.encode_descriptor(
            "tcpstate_stalled_sockets",
            "ESTABLISHED and CLOSE_WAIT sockets whose data did not move for longer than \
             --stall-threshold: kind=\"reader\", unread data the process does not read; \
             kind=\"writer\", data the peer does not acknowledge, by reason",
            None,
            MetricType::Gauge,
        )?;
        for ((stall, group), count) in &series {
            let mut labels =
                vec![("kind", stall.kind().to_owned()), ("reason", stall.reason().to_owned())];
            if self.group_by.is_some() {
                labels
                    .extend(group.pairs().map(|(name, value)| (name, escape_label_value(&value))));
            }
            ConstGauge::new(*count as i64).encode(family.encode_family(&labels)?)?;
        }
        let unchecked = state.unchecked as f64;
        gauge_f64(
            encoder,
            "tcpstate_stall_unchecked_sockets",
            "Sockets with queued data the last reconciliation could not follow for stalls \
             (past 100,000 in one network namespace)",
            unchecked,
        )?;
        gauge_f64(
            encoder,
            "tcpstate_stall_threshold_seconds",
            "The --stall-threshold beyond which a socket whose data does not move is stalled",
            threshold.as_secs_f64(),
        )
    }

    fn findings(&self, report: &mut LeakReport) {
        report.findings.extend(self.state().groups.iter().map(Group::finding));
    }

    fn units(&self) -> &'static [(&'static str, &'static str)] {
        &[("stalled_sockets", "{socket}"), ("stall_unchecked_sockets", "{socket}")]
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use tracer_common::TcpState;

    use super::*;
    use crate::sockdiag::DiagSocket;

    const NETNS: u32 = 4026531840;

    fn queued(state: TcpState, port: u16, recv_queue: u32, send_queue: u32) -> QueuedSocket {
        let mut saddr = [0; 16];
        saddr[..4].copy_from_slice(&Ipv4Addr::LOCALHOST.octets());
        QueuedSocket {
            socket: DiagSocket {
                family: 2,
                state,
                timewait: false,
                sport: port,
                dport: 40_000,
                saddr,
                daddr: saddr,
                inode: 0,
                last_ack_ms: DiagSocket::NO_ACK_TIME,
            },
            recv_queue,
            send_queue,
            consumed: Some(1000),
            acked: Some(5000),
            peer_window_zero: false,
            retransmitting: false,
        }
    }

    fn dump(queued: Vec<QueuedSocket>) -> Vec<NamespaceDump> {
        vec![NamespaceDump { inode: NETNS, queued, ..NamespaceDump::default() }]
    }

    fn state() -> State {
        StalledSockets::new(Some(THRESHOLD), CmdlinePolicy::default(), None)
            .state
            .into_inner()
            .unwrap()
    }

    const THRESHOLD: Duration = Duration::from_secs(60);

    /// Unread data whose consumption does not move for the threshold is a stalled reader;
    /// the same queue while the application reads (consumed moves) starts the clock over.
    #[test]
    fn a_reader_stalls_when_what_it_read_does_not_move() {
        let start = Instant::now();
        let mut state = state();
        let stuck = queued(TcpState::ESTABLISHED, 8080, 65_536, 0);
        let mut reading = queued(TcpState::ESTABLISHED, 8081, 65_536, 0);
        state.follow(&dump(vec![stuck.clone(), reading.clone()]), start);
        reading.consumed = Some(900_000);
        let later = start + THRESHOLD;
        state.follow(&dump(vec![stuck.clone(), reading.clone()]), later);
        let stalled = state.stalled(THRESHOLD, later);
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].stall, Stall::Reader);
        assert_eq!(stalled[0].socket.socket.sport, 8080);
        assert_eq!(stalled[0].queued(), 65_536);
        assert!(state.stalled(THRESHOLD, later - Duration::from_secs(1)).len() < 2);
        // Read at last: its queue is empty, and it leaves the dumps' queued sockets.
        state.follow(&dump(vec![reading]), later + Duration::from_secs(30));
        assert!(state.stalled(THRESHOLD, later + Duration::from_secs(30)).is_empty());
    }

    /// A writer's reason is what the kernel says of the peer; a CLOSE_WAIT socket whose only
    /// queued byte is the peer's FIN is no reader (that is a CLOSE_WAIT leak's business).
    #[test]
    fn a_writer_stalls_with_the_reason_the_kernel_gives() {
        let start = Instant::now();
        let mut state = state();
        let mut window = queued(TcpState::ESTABLISHED, 9001, 0, 2_000_000);
        window.peer_window_zero = true;
        let mut lost = queued(TcpState::ESTABLISHED, 9002, 0, 1_000);
        lost.retransmitting = true;
        let silent = queued(TcpState::ESTABLISHED, 9003, 0, 10);
        let fin_only = queued(TcpState::CLOSE_WAIT, 9004, 1, 0);
        let sockets = vec![window, lost, silent, fin_only];
        state.follow(&dump(sockets.clone()), start);
        state.follow(&dump(sockets), start + THRESHOLD);
        let mut found: Vec<(u16, Stall)> = state
            .stalled(THRESHOLD, start + THRESHOLD)
            .iter()
            .map(|s| (s.socket.socket.sport, s.stall))
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                (9001, Stall::PeerWindowZero),
                (9002, Stall::Retransmitting),
                (9003, Stall::Unacknowledged)
            ]
        );
    }

    /// A writer whose peer acknowledges between two dumps is making progress, however full
    /// its queue; a kernel whose tcp_info has no byte counters gives nothing to follow.
    #[test]
    fn progress_or_no_counters_is_no_stall() {
        let start = Instant::now();
        let mut state = state();
        let mut busy = queued(TcpState::ESTABLISHED, 9101, 100_000, 4_000_000);
        let mut blind = queued(TcpState::ESTABLISHED, 9102, 100, 100);
        (blind.consumed, blind.acked) = (None, None);
        state.follow(&dump(vec![busy.clone(), blind.clone()]), start);
        busy.acked = Some(9_000_000);
        busy.consumed = Some(7_000_000);
        state.follow(&dump(vec![busy, blind]), start + THRESHOLD);
        assert!(state.stalled(THRESHOLD, start + THRESHOLD).is_empty());
    }

    /// A finding lists each socket with what `ss` shows queued, and says the reason.
    #[test]
    fn findings_name_the_sockets_and_their_queues() {
        let since = Instant::now() - THRESHOLD;
        let mut socket = queued(TcpState::ESTABLISHED, 9201, 0, 3_000);
        socket.peer_window_zero = true;
        let group = Group {
            stall: Stall::PeerWindowZero,
            process: Process { pid: Some(42), comm: Some("writer".into()), ..Process::default() },
            sockets: vec![Stalled { stall: Stall::PeerWindowZero, netns: NETNS, socket, since }],
        };
        let finding = group.finding();
        assert_eq!(finding.kind, "stalled writer");
        assert!(finding.stuck);
        assert_eq!(finding.count, 1);
        assert!(finding.summary.contains("3000 bytes"), "{}", finding.summary);
        assert!(finding.summary.contains("peer window zero"), "{}", finding.summary);
        let listed = &finding.sockets[0];
        assert_eq!(listed.local, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9201));
        assert_eq!(listed.queued_bytes, Some(3_000));
        assert_eq!(listed.reason.as_deref(), Some("peer_window_zero"));
        assert!(listed.for_seconds >= 60.0);
    }
}
