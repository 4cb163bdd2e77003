//! The daemon's own health: what the kernel delivered and lost, which programs run, when the
//! reader last ran. A leaf: it imports none of its neighbours, so every room can use it.

use std::{collections::VecDeque, time::Duration};

use crate::probe::{Delivery, MapMemory, PartStatus};

/// How often the kernel's counters are read and health is judged.
pub(crate) const STATUS_INTERVAL: Duration = Duration::from_secs(1);
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
    pub map_memory: Vec<MapMemory>,
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

    pub(crate) fn record_delivery(&mut self, delivery: Delivery, now: u64) {
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
