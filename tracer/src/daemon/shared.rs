//! What the reader task and the HTTP handlers share: the aggregator, the reader's health and
//! the kernel's counters, the leak report, the cgroup names.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard, PoisonError},
};

use super::{Aggregator, STATUS_INTERVAL, leak_watch::LeakState};
use crate::{
    cgroups::CgroupNames,
    probe::{Delivery, PartStatus, Retransmits},
};

/// The reader is "stalled" when it has not run for this long.
const STALL_AFTER_NS: u64 = 5_000_000_000;
/// Ring-buffer overflows this recent make `/healthz` report unhealthy.
const OVERFLOW_WINDOW_NS: u64 = 60_000_000_000;

/// Reader health and kernel counters, refreshed every `STATUS_INTERVAL`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Status {
    pub delivery: Delivery,
    /// Which of the probe's programs run on this kernel; set once at start.
    pub parts: Vec<PartStatus>,
    /// Kernel memory of the probe's maps; set once at start.
    pub map_memory: Vec<crate::probe::MapMemory>,
    /// What the retransmit counters counted, where they run.
    pub retransmits: Option<Retransmits>,
    /// The last dump of the listeners.
    pub listeners: super::listeners::ListenerReport,
    /// Second deliveries of one transition the reader dropped.
    pub duplicates_dropped: u64,
    /// When the reader last finished a batch (monotonic ns).
    pub last_read_ns: u64,
    /// Namespaces the last dump could not enter for lack of privilege.
    pub netns_refused: usize,
    /// Why the kernel's counters could not be read at the last status tick, if they could not.
    pub counters_error: Option<String>,
    /// What the OTLP exports did, when they run.
    pub otlp: Option<super::otlp::OtlpStatus>,
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

    pub(super) fn record_delivery(&mut self, delivery: Delivery, now: u64) {
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

    pub(super) fn release_memory_if_needed(&self) {
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

    /// The report `/api/leaks` serves: the latest leak evaluation and the stuck listeners.
    pub(crate) fn leak_report(&self) -> crate::leaks::LeakReport {
        let mut report = self.leaks.lock().unwrap_or_else(PoisonError::into_inner).report.clone();
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        report.listen_queue_threshold_seconds = status.listeners.stuck_threshold.as_secs_f64();
        report.stuck_listeners = status.listeners.stuck.clone();
        report
    }

    pub(super) fn set_leaks(&self, state: LeakState) {
        *self.leaks.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    /// The aggregator; a panic elsewhere while holding it leaves it usable (counts only).
    pub(crate) fn aggregator(&self) -> MutexGuard<'_, Aggregator> {
        self.aggregator.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// One answer from the status, without copying the rest of it.
    pub(super) fn read_status<T>(&self, read: impl FnOnce(&Status) -> T) -> T {
        read(&self.status.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn update_status(&self, update: impl FnOnce(&mut Status)) {
        update(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
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
