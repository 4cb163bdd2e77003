//! The reader's side of the daemon: records applied in batches, flushes for scrapes, the
//! kernel's counters each second, and reconciliation with sock_diag dumps off its way.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tracer_common::{DecodeError, TransitionRecord};

use super::{
    Flush, LARGE_ALLOCATION, STATUS_INTERVAL, Shared,
    aggregate::{self, DumpIndex, ReconcileOutcome},
    kernel_map::KernelMapPressure,
    kernel_owners::KernelOwners,
    leak_watch::{self, LeakWatch},
};
use crate::{
    clock::monotonic_ns,
    netns::{self, AllDumps},
    probe::Probe,
    reader::RecordReader,
};

/// Dumps every network namespace off the async workers; returns when it started and ended.
pub(super) async fn dump_namespaces() -> anyhow::Result<(AllDumps, u64, u64)> {
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

/// The reader's loop: records applied in batches as they come, flushes asked for by scrapes
/// and reconciliations, the kernel's counters each second, a reconciliation each interval.
pub(super) struct Reading<'a> {
    pub(super) probe: &'a Probe,
    pub(super) reader: RecordReader,
    pub(super) shared: &'a Arc<Shared>,
    pub(super) flushes: tokio::sync::mpsc::Receiver<Flush>,
    pub(super) flush_requests: tokio::sync::mpsc::Sender<Flush>,
    pub(super) kernel_map: KernelMapPressure,
}

impl Reading<'_> {
    pub(super) async fn until(
        mut self,
        stop: impl Future<Output = ()>,
        reconcile_interval: Duration,
    ) -> anyhow::Result<()> {
        tokio::pin!(stop);
        let shared = self.shared;
        let mut batch = Batch::default();
        let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
        let mut retransmit_tick = tokio::time::interval(RETRANSMIT_READ_INTERVAL);
        let mut reconcile_tick = tokio::time::interval(reconcile_interval);
        reconcile_tick.tick().await;
        let mut pending_reconcile = None;
        loop {
            tokio::select! {
                read = self.reader.next_batch(|item| batch.collect(item)) => {
                    read.context("reading the ring buffer")?;
                    batch.apply(shared);
                }
                Some(flush) = self.flushes.recv() => {
                    self.reader.drain_now(|item| batch.collect(item));
                    batch.apply(shared);
                    // A scrape's loss counts then cover what its event counts do.
                    refresh_delivery(self.probe, &self.reader, shared);
                    let _ = flush.send(());
                }
                _ = status_tick.tick() => {
                    refresh_delivery(self.probe, &self.reader, shared);
                    shared.release_memory_if_needed();
                    let tracked = shared.aggregator().table().len();
                    self.kernel_map.check(tracked);
                }
                _ = retransmit_tick.tick() => read_retransmit_destinations(self.probe, shared),
                _ = reconcile_tick.tick(), if pending_reconcile.is_none() => {
                    let (shared, flush) = (shared.clone(), self.flush_requests.clone());
                    pending_reconcile =
                        Some(tokio::task::spawn_blocking(move || reconcile(&shared, &flush)));
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

/// How often retransmits by destination are read: each read walks the kernel's map (two
/// system calls per destination that retransmitted).
const RETRANSMIT_READ_INTERVAL: Duration = Duration::from_secs(5);

/// Reads the kernel's retransmits by destination into the last minute's. A failed read
/// leaves the previous one (the per-state counters report the map's trouble).
fn read_retransmit_destinations(probe: &Probe, shared: &Shared) {
    match probe.retransmit_destinations() {
        Ok(Some(by_destination)) => {
            let unlisted = shared.read_status(|status| {
                status
                    .retransmits
                    .as_ref()
                    .and_then(|r| r.by_label.first())
                    .map_or(0, |s| s.unlisted)
            });
            let now = monotonic_ns();
            shared.aggregator().destinations_mut().retransmits_read(now, by_destination, unlisted);
        }
        Ok(None) => {}
        Err(error) => log::debug!("retransmits by destination not read: {error:#}"),
    }
}

/// Reads the kernel's delivery and loss counters into the status: every `STATUS_INTERVAL`, and
/// whenever the ring is flushed for a reader (a scrape, a reconciliation). A failed read is
/// reported (log, /healthz), not fatal: records still flow.
fn refresh_delivery(probe: &Probe, reader: &RecordReader, shared: &Shared) {
    let duplicates = reader.duplicates_dropped();
    let delivery = probe.delivery(duplicates).map_err(|error| format!("{error:#}"));
    let retransmits = probe.retransmits().map_err(|error| format!("{error:#}"));
    shared.update_status(|status| {
        match delivery.and_then(|delivery| Ok((delivery, retransmits?))) {
            Ok((delivery, retransmits)) => {
                status.record_delivery(delivery, monotonic_ns());
                status.retransmits = retransmits;
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
pub(super) async fn watch_leaks(
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
