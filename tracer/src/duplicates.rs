//! Dropping the second delivery of one transition.
//!
//! The main and standby programs agree, per CPU, on which of them delivers each transition
//! (see the kernel program). Under heavy interrupt nesting that agreement has failed, rarely
//! (seen about once per 100,000 transitions in emulated 2-CPU VMs), and both delivered. Such a
//! pair is one firing: same socket address, same (old, new), one record from each program
//! (`rescued` differs), at most milliseconds apart. Two genuine transitions are never that: a
//! socket's consecutive transitions differ in their pair, and even when records in between
//! were lost (a full ring) and an address was reused, two deliveries by the same program, or
//! far apart, are two transitions. Remembering the last `WINDOW` records is enough.

use std::collections::{HashMap, VecDeque};

use tracer_common::TransitionRecord;

/// Records remembered: at 260,000 transitions per second, about 15 ms.
const WINDOW: usize = 4096;
/// Farthest apart the two deliveries of one firing can be: the second program runs when the
/// interrupts that came in between are done.
const MAX_APART_NS: u64 = 50_000_000;

/// What is compared of a record.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    pair: (u8, u8),
    rescued: bool,
    ts_ns: u64,
}

impl Seen {
    fn of(record: &TransitionRecord) -> Self {
        Self {
            pair: (record.oldstate, record.newstate),
            rescued: record.rescued(),
            ts_ns: record.ts_ns,
        }
    }

    /// `later` is the other program's delivery of the same firing.
    fn delivered_again_by(&self, later: &Self) -> bool {
        self.pair == later.pair
            && self.rescued != later.rescued
            && self.ts_ns.abs_diff(later.ts_ns) <= MAX_APART_NS
    }
}

#[derive(Default)]
pub struct Duplicates {
    /// Per socket address in `order`: its last record, and how many of its records the
    /// window holds.
    last: HashMap<u64, (Seen, u32)>,
    /// Addresses in the order their records came, oldest first.
    order: VecDeque<u64>,
    dropped: u64,
}

impl Duplicates {
    /// Whether `record` is a second delivery of the last transition seen for its socket.
    pub fn is_repeat(&mut self, record: &TransitionRecord) -> bool {
        let seen = Seen::of(record);
        let entry = self.last.entry(record.skaddr).or_insert((seen, 0));
        if entry.1 > 0 && entry.0.delivered_again_by(&seen) {
            self.dropped += 1;
            return true;
        }
        *entry = (seen, entry.1 + 1);
        self.order.push_back(record.skaddr);
        if self.order.len() > WINDOW
            && let Some(oldest) = self.order.pop_front()
            && let Some(old_entry) = self.last.get_mut(&oldest)
        {
            old_entry.1 -= 1;
            if old_entry.1 == 0 {
                self.last.remove(&oldest);
            }
        }
        false
    }

    /// Second deliveries dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{RECORD_SIZE, TcpState::*};

    use super::*;

    fn record(
        skaddr: u64,
        old: tracer_common::TcpState,
        new: tracer_common::TcpState,
    ) -> TransitionRecord {
        let mut r = TransitionRecord::decode(&[0; RECORD_SIZE]).unwrap();
        r.skaddr = skaddr;
        r.oldstate = old as u8;
        r.newstate = new as u8;
        r.ts_ns = 1_000_000_000;
        r
    }

    fn by_standby(mut r: TransitionRecord, later_ns: u64) -> TransitionRecord {
        r.flags |= tracer_common::record::FLAG_RESCUED;
        r.ts_ns += later_ns;
        r
    }

    #[test]
    fn the_other_programs_delivery_of_one_firing_is_dropped() {
        let mut duplicates = Duplicates::default();
        assert!(!duplicates.is_repeat(&record(1, LastAck, Close)));
        assert!(!duplicates.is_repeat(&record(2, Close, SynSent)));
        let again = by_standby(record(1, LastAck, Close), 1_600_000);
        assert!(duplicates.is_repeat(&again), "the same firing, by the standby 1.6 ms later");
        assert_eq!(duplicates.dropped(), 1);
    }

    #[test]
    fn genuine_transitions_are_kept_even_when_they_look_alike() {
        let mut duplicates = Duplicates::default();
        assert!(!duplicates.is_repeat(&record(1, Listen, SynRecv)));
        // Records in between lost, the address reused: the same pair again, same program.
        assert!(!duplicates.is_repeat(&record(1, Listen, SynRecv)));
        // By the other program, but far too late to be the same firing.
        let late = by_standby(record(1, Listen, SynRecv), MAX_APART_NS + 1);
        assert!(!duplicates.is_repeat(&late));
        assert!(!duplicates.is_repeat(&record(1, SynRecv, Established)));
        assert_eq!(duplicates.dropped(), 0);
    }

    #[test]
    fn memory_stays_within_the_window() {
        let mut duplicates = Duplicates::default();
        for skaddr in 0..(3 * WINDOW as u64) {
            assert!(!duplicates.is_repeat(&record(skaddr, Close, SynSent)));
        }
        assert_eq!(duplicates.order.len(), WINDOW);
        assert_eq!(duplicates.last.len(), WINDOW);
        // Forgotten after the window: a record that old is not compared any more.
        assert!(!duplicates.is_repeat(&record(0, Close, SynSent)));
    }
}
