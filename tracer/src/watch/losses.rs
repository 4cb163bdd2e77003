//! Telling the person watching what was lost: on stderr, while running when the count grew,
//! and at exit.

use tracer_common::DecodeError;

use crate::probe::Delivery;

#[derive(Default)]
pub(super) struct LossReporter {
    reported_lost: u64,
    pub(super) malformed: u64,
}

impl LossReporter {
    pub(super) fn malformed(&mut self, error: DecodeError) {
        if self.malformed == 0 {
            log::error!("{error}");
        }
        self.malformed += 1;
    }

    pub(super) fn report(&mut self, delivery: &Delivery, at_exit: bool) {
        let lost = delivery.lost();
        if lost > self.reported_lost || (at_exit && (lost > 0 || self.malformed > 0)) {
            eprintln!(
                "tcpstate: {lost} transitions lost{} (ring buffer full: {}, kernel skipped the \
                 program: {}); {} malformed records; {} per-socket map updates failed",
                if at_exit { " in total" } else { " so far" },
                delivery.ringbuf_full,
                delivery.recursion_misses,
                self.malformed,
                delivery.map_update_failed,
            );
            self.reported_lost = lost;
        }
    }
}
