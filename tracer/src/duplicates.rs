//! Dropping the second delivery of one transition.
//!
//! The main and standby programs agree, per CPU, on which of them delivers each transition
//! (see the kernel program). Under heavy interrupt nesting that agreement can fail rarely
//! (seen about once per 100,000 transitions in emulated 2-CPU VMs), and both deliver. One
//! socket's transitions are serialized by its lock, and two consecutive transitions of one
//! socket address never have the same (old, new) pair: a new socket at a reused address starts
//! with a creation transition. So a record whose address and pair equal the last record seen
//! for that address is a second delivery. Remembering the last `WINDOW` records is enough: the
//! two deliveries come from one firing, microseconds to milliseconds apart.

use std::collections::{HashMap, VecDeque};

use tracer_common::TransitionRecord;

/// Records remembered: at 260,000 transitions per second, about 15 ms.
const WINDOW: usize = 4096;

#[derive(Default)]
pub struct Duplicates {
    /// Per socket address in `order`: the last (old, new) seen, and how many of its records
    /// the window holds.
    last: HashMap<u64, ((u8, u8), u32)>,
    /// Addresses in the order their records came, oldest first.
    order: VecDeque<u64>,
    dropped: u64,
}

impl Duplicates {
    /// Whether `record` is a second delivery of the last transition seen for its socket.
    pub fn is_repeat(&mut self, record: &TransitionRecord) -> bool {
        let pair = (record.oldstate, record.newstate);
        let entry = self.last.entry(record.skaddr).or_insert((pair, 0));
        if entry.1 > 0 && entry.0 == pair {
            self.dropped += 1;
            return true;
        }
        *entry = (pair, entry.1 + 1);
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
        r
    }

    #[test]
    fn a_second_delivery_is_dropped_and_a_reused_address_is_not() {
        let mut duplicates = Duplicates::default();
        assert!(!duplicates.is_repeat(&record(1, LastAck, Close)));
        assert!(!duplicates.is_repeat(&record(2, Close, SynSent)));
        assert!(duplicates.is_repeat(&record(1, LastAck, Close)), "the same firing, twice");
        // A new socket at address 1 starts with a creation, then may make the same moves.
        assert!(!duplicates.is_repeat(&record(1, Listen, SynRecv)));
        assert!(!duplicates.is_repeat(&record(1, SynRecv, Established)));
        assert_eq!(duplicates.dropped(), 1);
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
