//! The daemon's CLOSE_WAIT leak detector: once a second, sockets in CLOSE_WAIT for longer
//! than the threshold are grouped by the process holding them; a process starting to leak,
//! crossing a power of two, or clearing is logged once, not once per socket per second.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};
use tracer_common::TcpState;

use crate::{
    clock::monotonic_ns,
    cmdline::CmdlinePolicy,
    daemon::{
        core::{
            Diagnosis, Shared,
            groups::{GroupBy, GroupLabels},
            table::{Owner, SocketId, SocketKey},
        },
        export::family::{Scrape, escape_label_value, gauge_f64},
    },
    leaks::{Candidate, LeakReport, OwnerResolver, ProcessLeak, Source, human_age},
    netns,
    probe::KernelSockets,
    sockdiag,
};

/// At most one /proc walk, and one sock_diag dump for missing inodes, this often.
const LOOKUP_INTERVAL: Duration = Duration::from_secs(5);
/// Most processes with their own `comm` label in tcpstate_close_wait_leaked_sockets.
const TOP_PROCESSES: usize = 20;
/// A process that stopped leaking keeps a 0 sample this long, so the metric returns to 0.
const CLEARED_RETENTION: Duration = Duration::from_secs(600);

/// The labels of one series of tcpstate_close_wait_leaked_sockets: the process's `comm` and,
/// under `--group-by`, its group (empty labels otherwise).
type Series = (String, GroupLabels);

/// The latest evaluation.
#[derive(Clone, Debug)]
struct LeakState {
    pub report: LeakReport,
    /// Leaked sockets per series: the top processes (with their group under `--group-by`),
    /// "other" for the rest, and recently cleared ones at 0.
    pub by_comm: Vec<(Series, u64)>,
}

impl LeakState {
    fn new(threshold: Duration) -> Self {
        Self { report: LeakReport::empty(Source::Daemon, threshold), by_comm: Vec::new() }
    }
}

/// What was last logged about a leaking process.
struct Logged {
    series: Series,
    /// floor(log2) of the largest count logged: the next log is at the next power of two.
    power: u32,
}

/// The diagnosis: the watch evaluates once a second; scrapes and reports read the latest.
pub(super) struct CloseWaitLeaks {
    watch: Mutex<LeakWatch>,
    latest: Mutex<LeakState>,
    group_by: Option<GroupBy>,
}

impl CloseWaitLeaks {
    pub(super) fn new(
        threshold: Duration,
        cmdline: CmdlinePolicy,
        group_by: Option<GroupBy>,
        kernel_sockets: Option<Arc<KernelSockets>>,
    ) -> Self {
        Self {
            watch: Mutex::new(LeakWatch::new(threshold, cmdline, group_by, kernel_sockets)),
            latest: Mutex::new(LeakState::new(threshold)),
            group_by,
        }
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, LeakState> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Diagnosis for CloseWaitLeaks {
    fn every_second(&self, shared: &Shared) {
        let state = self.watch.lock().unwrap_or_else(PoisonError::into_inner).evaluate(shared);
        *self.latest() = state;
    }

    fn metrics(&self, encoder: &mut DescriptorEncoder, scrape: &Scrape) -> fmt::Result {
        let oldest = scrape.oldest[TcpState::CLOSE_WAIT.index()]
            .map_or(0.0, |entered| scrape.now.saturating_sub(entered) as f64 / 1e9);
        families(encoder, &self.latest(), self.group_by, oldest)
    }

    fn findings(&self, report: &mut LeakReport) {
        let latest = self.latest();
        report.threshold_seconds = latest.report.threshold_seconds;
        report.leaked_sockets = latest.report.leaked_sockets;
        report.processes.clone_from(&latest.report.processes);
    }

    fn units(&self) -> &'static [(&'static str, &'static str)] {
        &[("close_wait_leaked_sockets", "{socket}")]
    }
}

struct LeakWatch {
    threshold: Duration,
    resolver: OwnerResolver,
    last_inode_dump: Option<Instant>,
    logged: HashMap<Option<u32>, Logged>,
    /// Since when leaked sockets of no known owner have been present, unlogged.
    unnamed: UnnamedSince,
    cleared: HashMap<Series, Instant>,
    group_by: Option<GroupBy>,
    /// The kernel's per-socket map: owners recorded after a socket's last record.
    kernel_sockets: Option<Arc<KernelSockets>>,
}

impl LeakWatch {
    fn new(
        threshold: Duration,
        cmdline: CmdlinePolicy,
        group_by: Option<GroupBy>,
        kernel_sockets: Option<Arc<KernelSockets>>,
    ) -> Self {
        Self {
            group_by,
            kernel_sockets,
            threshold,
            resolver: OwnerResolver::new(LOOKUP_INTERVAL, cmdline),
            last_inode_dump: None,
            logged: HashMap::new(),
            unnamed: UnnamedSince::default(),
            cleared: HashMap::new(),
        }
    }

    /// One evaluation (blocking: reads /proc, may dump sock_diag).
    fn evaluate(&mut self, shared: &Shared) -> LeakState {
        let now = monotonic_ns();
        let threshold_ns = self.threshold.as_nanos() as u64;
        let mut candidates: Vec<(SocketId, Candidate)> = {
            let agg = shared.aggregator();
            agg.table()
                .iter()
                .filter(|(_, t)| t.state == TcpState::CLOSE_WAIT)
                .filter(|(_, t)| now.saturating_sub(t.entered_ns) >= threshold_ns)
                .map(|(id, t)| {
                    let candidate = Candidate {
                        key: t.key,
                        age_ns: now.saturating_sub(t.entered_ns),
                        age_is_lower_bound: !t.entered_exact,
                        kernel_owner: agg.table().owner(t).map(|o| o.pid),
                        inode: t.inode,
                    };
                    (id, candidate)
                })
                .collect()
        };
        self.fill_owners_from_kernel(shared, &mut candidates);
        self.fill_missing_inodes(shared, &mut candidates);
        let report = self.resolver.report(
            candidates.into_iter().map(|(_, c)| c).collect(),
            Source::Daemon,
            self.threshold,
        );
        self.log_changes(&report);
        let by_comm = self.by_comm(&report);
        LeakState { report, by_comm }
    }

    /// A socket whose peer hung up before accept() reached CLOSE_WAIT in softirq, with no
    /// owner yet; the kernel's accept hook recorded the owner in its map afterwards, and no
    /// record carries it. One map lookup per such socket (only leaked ones, only until found).
    fn fill_owners_from_kernel(&self, shared: &Shared, candidates: &mut [(SocketId, Candidate)]) {
        let Some(kernel) = &self.kernel_sockets else { return };
        let mut found = Vec::new();
        for (id, candidate) in candidates.iter_mut().filter(|(_, c)| c.kernel_owner.is_none()) {
            if let Some(entry) = kernel.owner(*id) {
                candidate.kernel_owner = Some(entry.owner_tgid);
                let owner = Owner {
                    pid: entry.owner_tgid,
                    comm: entry.owner_comm,
                    cgroup: entry.owner_cgroup,
                };
                found.push((*id, owner));
            }
        }
        if !found.is_empty() {
            let mut agg = shared.aggregator();
            for (id, owner) in found {
                agg.set_owner(id, owner);
            }
        }
    }

    /// Sockets seen only on the tracepoint have no inode until a dump lists them; /proc needs
    /// it to find their owner. Dumps CLOSE_WAIT sockets (cheap) when some are missing.
    fn fill_missing_inodes(&mut self, shared: &Shared, candidates: &mut [(SocketId, Candidate)]) {
        let missing: HashMap<SocketKey, usize> = candidates
            .iter()
            .enumerate()
            .filter(|(_, (_, c))| c.inode == 0 && c.kernel_owner.is_none())
            .map(|(i, (_, c))| (c.key, i))
            .collect();
        if missing.is_empty()
            || self.last_inode_dump.is_some_and(|at| at.elapsed() < LOOKUP_INTERVAL)
        {
            return;
        }
        self.last_inode_dump = Some(Instant::now());
        let dumps = netns::dump_all_with(sockdiag::dump_close_wait).dumps;
        let mut agg = shared.aggregator();
        for dump in &dumps {
            for socket in &dump.sockets {
                let key = SocketKey::from_diag(dump.inode, socket);
                if let Some(&i) = missing.get(&key) {
                    let (id, candidate) = &mut candidates[i];
                    candidate.inode = socket.inode;
                    agg.set_inode(*id, socket.inode);
                }
            }
        }
    }

    fn log_changes(&mut self, report: &LeakReport) {
        let mut present = HashSet::new();
        let unnamed = report.processes.iter().any(|p| p.process.pid.is_none());
        let unnamed_loggable = self.unnamed.loggable(unnamed, Instant::now());
        for process in &report.processes {
            if process.process.pid.is_none()
                && !self.logged.contains_key(&None)
                && !unnamed_loggable
            {
                continue;
            }
            present.insert(process.process.pid);
            let power = process.count.max(1).ilog2();
            match self.logged.get_mut(&process.process.pid) {
                None => {
                    log::warn!(
                        "CLOSE_WAIT leak started: {}{}",
                        describe(process),
                        details(process)
                    );
                    let series = self.series(process);
                    self.cleared.remove(&series);
                    self.logged.insert(process.process.pid, Logged { series, power });
                }
                Some(logged) if power > logged.power => {
                    log::warn!(
                        "CLOSE_WAIT leak growing: {}{}",
                        describe(process),
                        details(process)
                    );
                    logged.power = power;
                }
                Some(_) => {}
            }
        }
        let gone: Vec<_> =
            self.logged.keys().filter(|pid| !present.contains(*pid)).copied().collect();
        for pid in gone {
            if let Some(logged) = self.logged.remove(&pid) {
                let who = pid.map_or_else(|| "unknown owner".to_owned(), |p| format!("pid {p}"));
                log::warn!(
                    "CLOSE_WAIT leak cleared: {who} ({}) holds no socket in CLOSE_WAIT past {} any more",
                    logged.series.0,
                    human_age(self.threshold.as_secs_f64())
                );
                self.cleared.insert(logged.series, Instant::now());
            }
        }
    }

    /// The series a process's leaked sockets count in.
    fn series(&self, process: &ProcessLeak) -> Series {
        let group =
            self.group_by.and_then(|by| by.group(&process.process.container)).unwrap_or_default();
        (process.comm_or_unknown().to_owned(), group)
    }

    /// Leaked sockets per series, bounded: the top processes by count, "other" for the rest,
    /// and 0 for processes that cleared recently (absent ones would only go stale).
    fn by_comm(&mut self, report: &LeakReport) -> Vec<(Series, u64)> {
        let mut per_series: HashMap<Series, u64> = HashMap::new();
        for process in &report.processes {
            *per_series.entry(self.series(process)).or_default() += process.count as u64;
        }
        let mut ranked: Vec<(Series, u64)> = per_series.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other: u64 = ranked.iter().skip(TOP_PROCESSES).map(|(_, n)| n).sum();
        ranked.truncate(TOP_PROCESSES);
        self.cleared.retain(|_, at| at.elapsed() < CLEARED_RETENTION);
        let mut zeros: Vec<_> =
            self.cleared.keys().filter(|c| !ranked.iter().any(|(r, _)| r == *c)).cloned().collect();
        zeros.sort();
        zeros.truncate(TOP_PROCESSES);
        ranked.extend(zeros.into_iter().map(|series| (series, 0)));
        ranked.push((("other".to_owned(), GroupLabels::default()), other));
        ranked
    }
}

/// Leaked sockets whose owner is not known yet are logged only once the /proc walk (at most
/// every `LOOKUP_INTERVAL`) has had its chance to name them: sockets that crossed the
/// threshold just after a walk would otherwise show as a leak of an unknown process that
/// "clears" when the next walk names their owner. `/api/leaks` still lists them at once.
#[derive(Debug, Default)]
struct UnnamedSince(Option<Instant>);

impl UnnamedSince {
    /// Whether unnamed sockets, `present` now, have been present for a whole lookup interval.
    fn loggable(&mut self, present: bool, now: Instant) -> bool {
        if !present {
            self.0 = None;
            return false;
        }
        let since = *self.0.get_or_insert(now);
        now.duration_since(since) >= LOOKUP_INTERVAL
    }
}

fn describe(process: &ProcessLeak) -> String {
    let pid = process.process.pid.map_or_else(|| "unknown pid".to_owned(), |p| format!("pid {p}"));
    format!(
        "{pid} ({}) holds {} sockets in CLOSE_WAIT, oldest {}",
        process.comm_or_unknown(),
        process.count,
        human_age(process.oldest_age_seconds)
    )
}

fn details(process: &ProcessLeak) -> String {
    let ports: Vec<String> = process.local_ports().iter().take(5).map(u16::to_string).collect();
    let peers: Vec<String> =
        process.top_peers(3).into_iter().map(|(addr, n)| format!("{addr} ({n})")).collect();
    let cmdline = process.process.cmdline.as_deref().filter(|c| !c.is_empty()).unwrap_or("-");
    let container =
        process.container_description().map_or_else(String::new, |c| format!("; in {c}"));
    format!(
        "; local ports {}; top peers {}{container}; cmdline: {cmdline}",
        ports.join(","),
        peers.join(", ")
    )
}

/// CLOSE_WAIT leaks by process (and group under `--group-by`), the oldest CLOSE_WAIT socket's
/// age in seconds, and the threshold.
fn families(
    encoder: &mut DescriptorEncoder,
    leaks: &LeakState,
    group_by: Option<GroupBy>,
    close_wait_oldest: f64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_close_wait_leaked_sockets",
        "Sockets in CLOSE_WAIT for longer than --close-wait-threshold, by the comm of the \
         process holding them: the 20 processes with most, the rest summed as comm=\"other\"",
        None,
        MetricType::Gauge,
    )?;
    for ((comm, group), count) in &leaks.by_comm {
        let mut set = vec![("comm", escape_label_value(comm))];
        if group_by.is_some() {
            set.extend(group.pairs().map(|(name, value)| (name, escape_label_value(&value))));
        }
        ConstGauge::new(*count as i64).encode(family.encode_family(&set)?)?;
    }
    gauge_f64(
        encoder,
        "tcpstate_close_wait_oldest_age_seconds",
        "Age of the oldest socket in CLOSE_WAIT (0 when there is none)",
        close_wait_oldest,
    )?;
    gauge_f64(
        encoder,
        "tcpstate_close_wait_threshold_seconds",
        "The --close-wait-threshold beyond which a CLOSE_WAIT socket counts as leaked",
        leaks.report.threshold_seconds,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_sockets_wait_one_lookup_interval_before_they_are_logged() {
        let start = Instant::now();
        let mut unnamed = UnnamedSince::default();
        assert!(!unnamed.loggable(true, start));
        assert!(!unnamed.loggable(true, start + LOOKUP_INTERVAL / 2));
        assert!(unnamed.loggable(true, start + LOOKUP_INTERVAL));
        // Named meanwhile: gone, and a later unnamed leak waits again.
        assert!(!unnamed.loggable(false, start + LOOKUP_INTERVAL * 2));
        assert!(!unnamed.loggable(true, start + LOOKUP_INTERVAL * 3));
    }
}
