//! `tcpstate run`: the daemon. Loads the probe, seeds the socket table from `sock_diag`,
//! aggregates every transition, reconciles with fresh dumps, and serves it all over HTTP.
//!
//! One task owns the ring buffer and applies records to the aggregator in batches; HTTP
//! handlers read the aggregator under the same lock, at scrape time only.

mod aggregate;
mod gauges;
mod groups;
mod http;
mod kernel_owners;
mod leak_watch;
mod listing;
mod metrics;
mod owner_pool;
mod ports;
mod server;
mod table;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use tracer_common::{DecodeError, TransitionRecord};

pub(crate) use self::groups::GroupBy;
use self::{
    aggregate::{Aggregator, DumpIndex, ReconcileOutcome},
    gauges::PortLabels,
    kernel_owners::KernelOwners,
    leak_watch::{LeakState, LeakWatch},
};
use crate::{
    cgroups::CgroupNames,
    clock::monotonic_ns,
    cmdline::CmdlinePolicy,
    netns::{self, AllDumps},
    probe::{Delivery, PartStatus, Probe, ProbeOptions},
    reader::RecordReader,
    web_config::WebConfig,
};

/// What the daemon is told to do: built from `tcpstate run`'s flags, or by `top` for the
/// daemon it runs in-process.
#[derive(Clone, Debug)]
pub struct Config {
    /// The HTTP endpoint's address.
    pub(crate) listen: std::net::SocketAddr,
    /// Most sockets the table holds.
    pub(crate) max_sockets: usize,
    /// How often the table is compared with a fresh sock_diag dump.
    pub(crate) reconcile_interval: Duration,
    /// A socket in CLOSE_WAIT for longer than this is a leak.
    pub(crate) close_wait_threshold: Duration,
    /// Local ports that get a `port` label of their own.
    pub(crate) port_labels: Vec<u16>,
    /// TLS and basic authentication for the endpoint.
    pub(crate) web_config: Option<WebConfig>,
    /// How much of a leaking process's command line is shown.
    pub(crate) cmdline: CmdlinePolicy,
    /// Split the socket and leak gauges by the owner's container or pod.
    pub(crate) group_by: Option<GroupBy>,
    /// The kernel side.
    pub(crate) probe: ProbeOptions,
}

/// How long a record may wait in the ring when the kernel sends no wakeup.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Ring size unless `--ring-bytes` says otherwise.
pub(crate) const RING_BYTES: u32 = 4 << 20;
/// How often the kernel's counters are read and health is judged.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The reader is "stalled" when it has not run for this long.
const STALL_AFTER_NS: u64 = 5_000_000_000;
/// Ring-buffer overflows this recent make `/healthz` report unhealthy.
const OVERFLOW_WINDOW_NS: u64 = 60_000_000_000;
/// How long shutdown waits for HTTP connections to finish.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_millis(800);
/// A listing or dump larger than this is followed by `malloc_trim`: built on blocking threads,
/// each with its own malloc arena, their freed memory otherwise stays with the process.
pub(crate) const LARGE_ALLOCATION: usize = 1 << 20;

/// A request to apply every record waiting in the ring now; answered when done.
pub(crate) type Flush = tokio::sync::oneshot::Sender<()>;

/// Reader health and kernel counters, refreshed every `STATUS_INTERVAL`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Status {
    pub delivery: Delivery,
    /// Which of the probe's programs run on this kernel; set once at start.
    pub parts: Vec<PartStatus>,
    /// Kernel memory of the probe's maps; set once at start.
    pub map_memory: Vec<crate::probe::MapMemory>,
    /// Second deliveries of one transition the reader dropped.
    pub duplicates_dropped: u64,
    /// When the reader last finished a batch (monotonic ns).
    pub last_read_ns: u64,
    /// Namespaces the last dump could not enter for lack of privilege.
    pub netns_refused: usize,
    /// Why the kernel's counters could not be read at the last status tick, if they could not.
    pub counters_error: Option<String>,
    /// (when, ring-buffer overflows so far) samples over `OVERFLOW_WINDOW_NS`.
    overflow_history: VecDeque<(u64, u64)>,
}

impl Status {
    /// Why the daemon is not keeping up, if it is not.
    pub(crate) fn unhealthy_reason(&self, now: u64) -> Option<String> {
        if let Some(error) = &self.counters_error {
            return Some(format!(
                "cannot read the kernel program's counters ({error}): losses are not counted"
            ));
        }
        if self.last_read_ns == 0 || now.saturating_sub(self.last_read_ns) > STALL_AFTER_NS {
            return Some(format!(
                "the ring-buffer reader has not run for more than {} s",
                STALL_AFTER_NS / 1_000_000_000
            ));
        }
        let oldest = self.overflow_history.front().map_or(0, |&(_, lost)| lost);
        let recent = self.delivery.ringbuf_full.saturating_sub(oldest);
        (recent > 0).then(|| {
            format!(
                "{recent} transitions lost to a full ring buffer in the last minute; raise \
                 --ring-bytes"
            )
        })
    }

    fn record_delivery(&mut self, delivery: Delivery, now: u64) {
        self.delivery = delivery;
        // One sample a status interval is enough for the window; every flush (each scrape)
        // also refreshes `delivery`, and must not grow the history at the scrapers' pace.
        let interval_ns = STATUS_INTERVAL.as_nanos() as u64;
        if self.overflow_history.back().is_none_or(|&(t, _)| now - t >= interval_ns) {
            self.overflow_history.push_back((now, delivery.ringbuf_full));
        }
        while self.overflow_history.front().is_some_and(|&(t, _)| now - t > OVERFLOW_WINDOW_NS) {
            self.overflow_history.pop_front();
        }
    }
}

/// State shared by the reader task and the HTTP handlers.
#[derive(Debug)]
pub(crate) struct Shared {
    aggregator: Mutex<Aggregator>,
    status: Mutex<Status>,
    leaks: Mutex<LeakState>,
    cgroups: Mutex<CgroupNames>,
    /// Set after a large response; the next status tick returns freed memory to the system.
    large_allocation: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator").field("tracked", &self.table().len()).finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(aggregator: Aggregator, leaks: LeakState) -> Self {
        Self {
            aggregator: Mutex::new(aggregator),
            status: Mutex::new(Status::default()),
            leaks: Mutex::new(leaks),
            cgroups: Mutex::new(CgroupNames::default()),
            large_allocation: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Names of the owners' cgroups, shared by listings.
    pub(crate) fn cgroups(&self) -> MutexGuard<'_, CgroupNames> {
        self.cgroups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A response or dump of many MiB was built: its memory, once freed, is best handed back
    /// (see `LARGE_ALLOCATION`).
    pub(crate) fn note_large_allocation(&self) {
        self.large_allocation.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn release_memory_if_needed(&self) {
        if self.large_allocation.swap(false, std::sync::atomic::Ordering::Relaxed) {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only returns free heap memory to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// The latest leak evaluation.
    pub(crate) fn leaks(&self) -> LeakState {
        self.leaks.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_leaks(&self, state: LeakState) {
        *self.leaks.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    /// The aggregator; a panic elsewhere while holding it leaves it usable (counts only).
    pub(crate) fn aggregator(&self) -> MutexGuard<'_, Aggregator> {
        self.aggregator.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn update_status(&self, update: impl FnOnce(&mut Status)) {
        update(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// Dumps every network namespace off the async workers; returns when it started and ended.
async fn dump_namespaces() -> anyhow::Result<(AllDumps, u64, u64)> {
    let started = monotonic_ns();
    let dumps = tokio::task::spawn_blocking(netns::dump_all).await.context("sock_diag dump")?;
    Ok((dumps, started, monotonic_ns()))
}

/// Dumps every namespace and reconciles the table with it, off the reader's way: the dump
/// and its index are built on a thread of their own at a lower priority (on a busy host they
/// took the CPU the reader needed, and the ring filled), and the table is then locked only in
/// short slices while the reader goes on applying records.
fn reconcile(shared: &Shared, flush: &tokio::sync::mpsc::Sender<Flush>) -> ReconcileOutcome {
    let labels = shared.aggregator().labels().clone();
    shared.aggregator().begin_dump();
    let dumped = std::thread::Builder::new()
        .name("tcpstate-dump".into())
        .spawn(move || {
            lower_this_threads_priority();
            let started = monotonic_ns();
            let dumps = netns::dump_all();
            let finished = monotonic_ns();
            log::debug!(
                "sock_diag dump of {} namespaces took {:?}",
                dumps.dumps.len(),
                Duration::from_nanos(finished - started)
            );
            let bytes = dumps.bytes();
            (DumpIndex::new(dumps.dumps, started, finished, &labels), dumps.refused, bytes)
        })
        .map(|thread| thread.join());
    let Ok(Ok((index, refused, bytes))) = dumped else {
        log::warn!("could not run the sock_diag dump thread: gauges are not reconciled this time");
        shared.aggregator().abandon_dump();
        return ReconcileOutcome::default();
    };
    // Everything the kernel sent before the dump ended is applied first. Without an answer
    // the daemon is stopping, and what follows changes nothing anyone reads.
    let (applied, done) = tokio::sync::oneshot::channel();
    if flush.blocking_send(applied).is_ok() {
        let _ = done.blocking_recv();
    }
    shared.update_status(|status| status.netns_refused = refused);
    let outcome = aggregate::reconcile_in_slices(|| shared.aggregator(), index);
    // Built on other threads (their own malloc arenas): returned once freed, or every dump
    // of a large host leaves its size behind.
    if bytes > LARGE_ALLOCATION {
        shared.note_large_allocation();
    }
    outcome
}

/// Background work yields to the reader: nice 10 for the calling thread only (raising one's
/// own nice value needs no privilege; a failure only leaves the priority as it was).
fn lower_this_threads_priority() {
    // SAFETY: plain system calls; PRIO_PROCESS with a thread id applies to that thread.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// What the daemon sets up with its full privileges, before any other thread exists.
pub struct Attached {
    listener: std::net::TcpListener,
    probe: Probe,
}

impl Attached {
    /// Where the HTTP server will answer (the port chosen when `--listen` asked for port 0).
    pub(crate) fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds the HTTP port and attaches the probe. Privileges first: without them nothing else
/// matters, a busy port included. Then bind: a busy port fails before anything touches the
/// kernel. Runs before the async runtime starts, so that the capabilities dropped afterwards
/// (`capabilities::keep_only`) are dropped for every thread the daemon will have.
pub fn attach(config: &Config) -> anyhow::Result<Attached> {
    crate::probe::preflight::check_privileges()?;
    let listener = http::bind(config.listen)?;
    if !config.listen.ip().is_loopback() && config.web_config.is_none() {
        log::warn!(
            "serving {} without TLS or authentication: whoever reaches it reads every socket \
             and the processes holding them; give --web-config (TLS, basic auth) or listen on \
             loopback",
            config.listen
        );
    }
    let probe = Probe::attach(&config.probe)?;
    Ok(Attached { listener, probe })
}

/// Large allocations (a listing's copy of the table, a dump) always get their own mapping,
/// returned to the system when freed. glibc otherwise raises its mmap threshold after the
/// first such free, and later ones land in the heap, where the small allocations made
/// meanwhile pin them: 64 listings of 100,000 sockets left 44 MiB behind that way.
fn map_large_allocations_apart() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's tuning; a fixed threshold also turns off
    // its dynamic adjustment.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_ALLOCATION as libc::c_int / 4);
    }
}

pub async fn run(config: Config, attached: Attached) -> anyhow::Result<()> {
    map_large_allocations_apart();
    let stop = crate::signals::shutdown()?;
    tokio::pin!(stop);
    let Attached { listener, mut probe } = attached;
    let listener = tokio::net::TcpListener::from_std(listener).context("serving HTTP")?;
    let listen = listener.local_addr()?;

    let ring = probe.take_ring().context("ring buffer already taken")?;
    let mut reader = RecordReader::new(ring, POLL_INTERVAL).context("watching the ring buffer")?;

    let labels = PortLabels::new(config.port_labels.clone());
    let shared = Arc::new(Shared::new(
        Aggregator::new(config.max_sockets, labels),
        LeakState::new(config.close_wait_threshold),
    ));
    shared.update_status(|status| {
        status.parts = probe.parts().to_vec();
        status.map_memory = probe.map_memory().to_vec();
    });
    shared.aggregator().begin_dump();
    let (dumps, started, finished) = dump_namespaces().await?;
    shared.update_status(|status| status.netns_refused = dumps.refused);
    let web = config.web_config.clone();
    let scheme = if web.as_ref().is_some_and(|w| w.tls.is_some()) { "https" } else { "http" };
    let seeded = shared.aggregator().reconcile(dumps.dumps, started, finished, false);
    log::info!(
        "tcpstate {} attached to tracepoint sock:inet_sock_set_state; serving {scheme}://{listen}/metrics; \
         seeded {} existing sockets from {} network namespaces",
        env!("CARGO_PKG_VERSION"),
        seeded.added,
        seeded.namespaces
    );

    let (flush_requests, mut flushes) = tokio::sync::mpsc::channel::<Flush>(16);
    let state = http::AppState {
        shared: shared.clone(),
        exporter: Arc::new(metrics::Exporter::new(shared.clone(), config.group_by)),
        flush: flush_requests.clone(),
        listings: Arc::new(tokio::sync::Semaphore::new(http::MAX_LISTINGS)),
    };
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    shared.update_status(|status| status.last_read_ns = monotonic_ns());
    let server = tokio::spawn(async move {
        let users = web.as_ref().and_then(|w| w.users.clone());
        let tls = web.and_then(|w| w.tls);
        server::serve(listener, http::router(state, users), tls, async {
            let _ = http_stopped.await;
        })
        .await;
    });

    // Only the accept hook records owners no record carries: without it, the lookups would
    // find nothing, once a second for every socket without an owner.
    let accept_hook =
        probe.parts().iter().any(|p| p.part == crate::probe::Part::AcceptOwner && p.active());
    let kernel_sockets = if accept_hook {
        probe
            .socket_map()
            .inspect_err(|error| {
                log::warn!("accepted sockets may show no owner until they close: {error:#}");
            })
            .ok()
            .map(Arc::new)
    } else {
        None
    };
    let kernel_owners = kernel_sockets.clone().map(KernelOwners::new);
    if kernel_owners.is_some() {
        shared.aggregator().queue_unnamed_sockets();
    }
    let leak_watch = tokio::spawn(watch_leaks(
        shared.clone(),
        kernel_owners,
        LeakWatch::new(
            config.close_wait_threshold,
            config.cmdline,
            config.group_by,
            kernel_sockets,
        ),
    ));

    let mut batch = Batch::default();
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    let mut reconcile_tick = tokio::time::interval(config.reconcile_interval);
    reconcile_tick.tick().await;
    let mut pending_reconcile = None;
    loop {
        tokio::select! {
            read = reader.next_batch(|item| batch.collect(item)) => {
                read.context("reading the ring buffer")?;
                batch.apply(&shared);
            }
            Some(flush) = flushes.recv() => {
                reader.drain_now(|item| batch.collect(item));
                batch.apply(&shared);
                // A scrape's loss counts then cover what its event counts do.
                refresh_delivery(&probe, &reader, &shared);
                let _ = flush.send(());
            }
            _ = status_tick.tick() => {
                refresh_delivery(&probe, &reader, &shared);
                shared.release_memory_if_needed();
            }
            _ = reconcile_tick.tick(), if pending_reconcile.is_none() => {
                let (shared, flush) = (shared.clone(), flush_requests.clone());
                pending_reconcile =
                    Some(tokio::task::spawn_blocking(move || reconcile(&shared, &flush)));
            }
            done = async { pending_reconcile.as_mut().expect("guarded").await }, if pending_reconcile.is_some() => {
                pending_reconcile = None;
                let outcome = done.context("reconciliation task")?;
                log::debug!("reconciled with {} namespaces: {outcome:?}", outcome.namespaces);
            }
            _ = &mut stop => break,
        }
        shared.update_status(|status| status.last_read_ns = monotonic_ns());
    }

    log::info!("stopping: detaching the probe");
    leak_watch.abort();
    let _ = http_stop.send(());
    drop(probe);
    log::debug!("probe detached");
    match tokio::time::timeout(HTTP_SHUTDOWN_GRACE, server).await {
        Ok(Ok(())) => {}
        Ok(Err(join)) => return Err(join).context("HTTP server task"),
        Err(_elapsed) => log::debug!("closing HTTP connections still open"),
    }
    log::debug!("HTTP server stopped");
    Ok(())
}

/// Reads the kernel's delivery and loss counters into the status: every `STATUS_INTERVAL`, and
/// whenever the ring is flushed for a reader (a scrape, a reconciliation). A failed read is
/// reported (log, /healthz), not fatal: records still flow.
fn refresh_delivery(probe: &Probe, reader: &RecordReader, shared: &Shared) {
    let duplicates = reader.duplicates_dropped();
    let delivery = probe.delivery(duplicates).map_err(|error| format!("{error:#}"));
    shared.update_status(|status| {
        match delivery {
            Ok(delivery) => {
                status.record_delivery(delivery, monotonic_ns());
                status.counters_error = None;
            }
            Err(error) => {
                if status.counters_error.as_ref() != Some(&error) {
                    log::warn!("cannot read the kernel program's counters: {error}");
                }
                status.counters_error = Some(error);
            }
        }
        status.duplicates_dropped = duplicates;
    });
}

/// Evaluates leaks every second, off the async workers.
async fn watch_leaks(
    shared: Arc<Shared>,
    kernel_owners: Option<KernelOwners>,
    mut watch: LeakWatch,
) {
    let mut tick = tokio::time::interval(leak_watch::EVALUATION_INTERVAL);
    loop {
        tick.tick().await;
        let task_shared = shared.clone();
        let kernel_owners = kernel_owners.clone();
        let evaluated = tokio::task::spawn_blocking(move || {
            // Owners first: a leaked accepted socket is then named like any other.
            if let Some(kernel_owners) = kernel_owners {
                kernel_owners.fill(&task_shared);
            }
            let state = watch.evaluate(&task_shared);
            (watch, state)
        })
        .await;
        match evaluated {
            Ok((returned, state)) => {
                watch = returned;
                shared.set_leaks(state);
            }
            Err(error) => {
                log::error!("leak detection stopped: {error}");
                return;
            }
        }
    }
}

/// Records read from the ring, held so the aggregator is locked once per batch, not per record.
#[derive(Default)]
struct Batch {
    records: Vec<TransitionRecord>,
    malformed: u64,
}

impl Batch {
    fn collect(&mut self, item: Result<TransitionRecord, DecodeError>) {
        match item {
            Ok(record) => self.records.push(record),
            Err(_) => self.malformed += 1,
        }
    }

    fn apply(&mut self, shared: &Shared) {
        if self.records.is_empty() && self.malformed == 0 {
            return;
        }
        let mut agg = shared.aggregator();
        for record in self.records.drain(..) {
            agg.apply(&record);
        }
        agg.count_malformed(std::mem::take(&mut self.malformed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_counters_make_the_daemon_unhealthy_with_the_reason() {
        let mut status = Status { last_read_ns: 1, ..Status::default() };
        assert_eq!(status.unhealthy_reason(2), None);
        status.counters_error = Some("Operation not permitted".into());
        let reason = status.unhealthy_reason(2).unwrap();
        assert!(reason.contains("Operation not permitted") && reason.contains("not counted"));
    }

    #[test]
    fn scrapes_refresh_the_loss_counts_without_growing_the_overflow_history() {
        let second = STATUS_INTERVAL.as_nanos() as u64;
        let mut status = Status { last_read_ns: 1, ..Status::default() };
        let overflowed = |ringbuf_full| Delivery { ringbuf_full, ..Delivery::default() };
        for scrape in 0..100 {
            status.record_delivery(overflowed(scrape), 1 + scrape * second / 100);
        }
        assert_eq!(status.overflow_history.len(), 1, "one sample per status interval");
        assert_eq!(status.delivery.ringbuf_full, 99, "every scrape sees the latest count");
        status.record_delivery(overflowed(100), 1 + second);
        assert_eq!(status.overflow_history.len(), 2);
        let reason = status.unhealthy_reason(1 + second).unwrap();
        assert!(reason.starts_with("100 transitions lost"), "{reason}");
    }
}
