//! The reader's side of the daemon: records applied in batches and handed to the diagnoses,
//! flushes for scrapes, the kernel's counters each second, reconciliation with sock_diag dumps
//! off its way; and the periodic inputs of the diagnoses (listener dumps, the 1 Hz watch).

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tracer_common::{DecodeError, TransitionRecord};

use super::{
    Diagnoses, Shared, Transition,
    aggregate::{self, DumpIndex, ReconcileOutcome},
    kernel_map::KernelMapPressure,
    kernel_owners::KernelOwners,
};
use crate::{
    clock::monotonic_ns,
    daemon::{Flush, LARGE_ALLOCATION, status::STATUS_INTERVAL},
    netns::{self, AllDumps},
    probe::Probe,
    reader::RecordReader,
};

/// How often the listeners are dumped for the diagnoses.
const LISTEN_INTERVAL: Duration = Duration::from_secs(2);
/// How often the diagnoses' watch runs.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Dumps every network namespace off the async workers; returns when it started and ended.
pub(crate) async fn dump_namespaces(queues: bool) -> anyhow::Result<(AllDumps, u64, u64)> {
    let started = monotonic_ns();
    let dumps = tokio::task::spawn_blocking(move || netns::dump_all(queues))
        .await
        .context("sock_diag dump")?;
    Ok((dumps, started, monotonic_ns()))
}

/// Dumps every namespace and reconciles the table with it, off the reader's way: the dump
/// and its index are built on a thread of their own at a lower priority (on a busy host they
/// took the CPU the reader needed, and the ring filled), and the table is then locked only in
/// short slices while the reader goes on applying records.
fn reconcile(
    shared: &Shared,
    diagnoses: &Diagnoses,
    flush: &tokio::sync::mpsc::Sender<Flush>,
) -> ReconcileOutcome {
    let began = monotonic_ns();
    let labels = shared.aggregator().labels().clone();
    shared.aggregator().begin_dump();
    let diagnoses = diagnoses.clone();
    let dumped = std::thread::Builder::new()
        .name("tcpstate-dump".into())
        .spawn(move || {
            lower_this_threads_priority();
            let started = monotonic_ns();
            let dumps = netns::dump_all(diagnoses.need_queued_sockets());
            let finished = monotonic_ns();
            log::debug!(
                "sock_diag dump of {} namespaces took {:?}",
                dumps.dumps.len(),
                Duration::from_nanos(finished - started)
            );
            let bytes = dumps.bytes();
            for diagnosis in diagnoses.iter() {
                diagnosis.sockets_dumped(&dumps.dumps);
            }
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
    shared.aggregator().set_last_reconcile_ns(monotonic_ns().saturating_sub(began));
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

/// The reader's loop: records applied in batches as they come, flushes asked for by scrapes
/// and reconciliations, the kernel's counters each second, a reconciliation each interval.
pub(crate) struct Reading<'a> {
    pub(crate) probe: &'a Probe,
    pub(crate) reader: RecordReader,
    pub(crate) shared: &'a Arc<Shared>,
    pub(crate) diagnoses: Diagnoses,
    pub(crate) flushes: tokio::sync::mpsc::Receiver<Flush>,
    pub(crate) flush_requests: tokio::sync::mpsc::Sender<Flush>,
    pub(crate) kernel_map: KernelMapPressure,
}

impl Reading<'_> {
    pub(crate) async fn until(
        mut self,
        stop: impl Future<Output = ()>,
        reconcile_interval: Duration,
    ) -> anyhow::Result<()> {
        tokio::pin!(stop);
        let shared = self.shared;
        let mut batch = Batch::default();
        let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
        let mut reconcile_tick = tokio::time::interval(reconcile_interval);
        reconcile_tick.tick().await;
        let mut pending_reconcile = None;
        loop {
            tokio::select! {
                read = self.reader.next_batch(|item| batch.collect(item)) => {
                    read.context("reading the ring buffer")?;
                    batch.apply(shared, &self.diagnoses);
                }
                Some(flush) = self.flushes.recv() => {
                    self.reader.drain_now(|item| batch.collect(item));
                    batch.apply(shared, &self.diagnoses);
                    // A scrape's loss counts then cover what its event counts do.
                    refresh_delivery(self.probe, &self.reader, shared, &self.diagnoses);
                    let _ = flush.send(());
                }
                _ = status_tick.tick() => {
                    refresh_delivery(self.probe, &self.reader, shared, &self.diagnoses);
                    shared.release_memory_if_needed();
                    let tracked = shared.aggregator().table().len();
                    self.kernel_map.check(tracked);
                }
                _ = reconcile_tick.tick(), if pending_reconcile.is_none() => {
                    let (shared, flush) = (shared.clone(), self.flush_requests.clone());
                    let diagnoses = self.diagnoses.clone();
                    pending_reconcile = Some(tokio::task::spawn_blocking(move || {
                        reconcile(&shared, &diagnoses, &flush)
                    }));
                }
                done = async { pending_reconcile.as_mut().expect("guarded").await }, if pending_reconcile.is_some() => {
                    pending_reconcile = None;
                    let outcome = done.context("reconciliation task")?;
                    log::debug!("reconciled with {} namespaces: {outcome:?}", outcome.namespaces);
                }
                () = &mut stop => return Ok(()),
            }
            shared.update_status(|status| status.last_read_ns = monotonic_ns());
        }
    }
}

/// Reads the kernel's delivery and loss counters into the status: every `STATUS_INTERVAL`, and
/// whenever the ring is flushed for a reader (a scrape, a reconciliation). A failed read is
/// reported (log, /healthz), not fatal: records still flow.
fn refresh_delivery(probe: &Probe, reader: &RecordReader, shared: &Shared, diagnoses: &Diagnoses) {
    let duplicates = reader.duplicates_dropped();
    let now = monotonic_ns();
    let delivery = probe.delivery(duplicates).map_err(|error| format!("{error:#}"));
    let diagnosed: Result<(), String> =
        diagnoses.iter().try_for_each(|diagnosis| diagnosis.kernel_counters(probe, now));
    shared.update_status(|status| {
        match delivery.and_then(|delivery| diagnosed.map(|()| delivery)) {
            Ok(delivery) => {
                status.record_delivery(delivery, now);
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

/// Runs the diagnoses' watch once a second, off the async workers: owners from the kernel's
/// map first, so that a socket found stuck is named like any other.
pub(crate) async fn watch_every_second(
    shared: Arc<Shared>,
    kernel_owners: Option<KernelOwners>,
    diagnoses: Diagnoses,
) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tick.tick().await;
        let (shared, kernel_owners, diagnoses) =
            (shared.clone(), kernel_owners.clone(), diagnoses.clone());
        let watched = tokio::task::spawn_blocking(move || {
            if let Some(kernel_owners) = kernel_owners {
                kernel_owners.fill(&shared);
            }
            for diagnosis in diagnoses.iter() {
                diagnosis.every_second(&shared);
            }
        })
        .await;
        if let Err(error) = watched {
            log::error!("the once-a-second watch stopped: {error}");
            return;
        }
    }
}

/// Dumps every namespace's listeners every `LISTEN_INTERVAL` for the diagnoses, until the
/// task is aborted.
pub(crate) async fn dump_listeners(diagnoses: Diagnoses) {
    let mut ticks = tokio::time::interval(LISTEN_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let diagnoses = diagnoses.clone();
        // Entering namespaces (and the diagnoses' /proc walks) block: off the runtime.
        let dumped = tokio::task::spawn_blocking(move || {
            let found = netns::listeners_all();
            let now = std::time::Instant::now();
            for diagnosis in diagnoses.iter() {
                diagnosis.listeners_dumped(&found, now);
            }
        });
        if dumped.await.is_err() {
            return;
        }
    }
}

/// Records read from the ring, held so the aggregator is locked once per batch, not per record.
#[derive(Default)]
struct Batch {
    records: Vec<TransitionRecord>,
    /// The records as applied, for the diagnoses; kept to reuse its allocation.
    applied: Vec<Transition>,
    malformed: u64,
}

impl Batch {
    fn collect(&mut self, item: Result<TransitionRecord, DecodeError>) {
        match item {
            Ok(record) => self.records.push(record),
            Err(_) => self.malformed += 1,
        }
    }

    /// Applies the records to the table, then hands them to the diagnoses, all under one
    /// lock: a scrape sees every family at the same record.
    fn apply(&mut self, shared: &Shared, diagnoses: &Diagnoses) {
        if self.records.is_empty() && self.malformed == 0 {
            return;
        }
        let mut agg = shared.aggregator();
        self.applied.clear();
        self.applied.extend(self.records.drain(..).map(|record| agg.apply(record)));
        for diagnosis in diagnoses.iter() {
            diagnosis.transitions(&self.applied);
        }
        agg.count_malformed(std::mem::take(&mut self.malformed));
    }
}
