//! Dropping the second delivery of one transition.
//!
//! The main and standby programs agree, per CPU, on which of them delivers each transition
//! (see the kernel program). Under heavy interrupt nesting that agreement has failed, rarely
//! (seen about once per 100,000 transitions in emulated 2-CPU VMs), and both delivered. Such a
//! pair is one firing: same socket address, same (old, new), one record from each program
//! (`rescued` differs), at most milliseconds apart, and nothing else of that socket between
//! them. Two genuine transitions are never that: a socket's consecutive transitions differ in
//! their pair, and even when records in between were lost (a full ring) and an address was
//! reused, two deliveries by the same program, or far apart, are two transitions.
//!
//! Every such pair includes a standby record, and those are rare (about one in 2,000), so the
//! common path only writes the record into a fixed window; the search runs for standby
//! records, and for main records while a standby record is recent.

use tracer_common::{TcpState, TransitionRecord};

/// Records remembered: at 260,000 transitions per second, about 15 ms.
const WINDOW: usize = 4096;
/// Farthest apart the two deliveries of one firing can be: the second program runs when the
/// interrupts that came in between are done.
const MAX_APART_NS: u64 = 50_000_000;

/// What is compared of a record.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    skaddr: u64,
    pair: (TcpState, TcpState),
    ts_ns: u64,
    /// Position in the stream of records read.
    sequence: u64,
}

impl Seen {
    /// Whether `later`, delivered by the other program, is the same firing as `self`.
    fn delivered_again_as(&self, later: &Self) -> bool {
        self.skaddr == later.skaddr
            && self.pair == later.pair
            && self.ts_ns.abs_diff(later.ts_ns) <= MAX_APART_NS
    }
}

pub(super) struct Duplicates {
    /// The main program's last `WINDOW` records, a ring indexed by `sequence`.
    handled: Box<[Seen]>,
    /// The standby's records that are still the last of their socket, within the window.
    rescued: Vec<Seen>,
    /// Records read so far.
    sequence: u64,
    dropped: u64,
}

impl Default for Duplicates {
    fn default() -> Self {
        Self {
            handled: vec![Seen::default(); WINDOW].into_boxed_slice(),
            rescued: Vec::new(),
            sequence: 0,
            dropped: 0,
        }
    }
}

impl Duplicates {
    /// Whether `record` is the other program's delivery of its socket's last transition.
    pub(super) fn is_repeat(&mut self, record: &TransitionRecord) -> bool {
        self.sequence += 1;
        let seen = Seen {
            skaddr: record.skaddr,
            pair: (record.oldstate, record.newstate),
            ts_ns: record.ts_ns,
            sequence: self.sequence,
        };
        let oldest_remembered = self.sequence.saturating_sub(WINDOW as u64);
        self.rescued.retain(|r| r.sequence > oldest_remembered);
        let pending = self.rescued.iter().position(|r| r.skaddr == seen.skaddr);
        let repeat = if record.rescued() {
            // The socket's last record, if the main program delivered it.
            let last_handled = self.last_handled(seen.skaddr, oldest_remembered);
            let is_last = |h: &Seen| pending.is_none_or(|p| self.rescued[p].sequence < h.sequence);
            last_handled.is_some_and(|h| is_last(&h) && h.delivered_again_as(&seen))
        } else {
            pending.is_some_and(|p| self.rescued[p].delivered_again_as(&seen))
        };
        if let Some(p) = pending {
            // No longer the socket's last record, or just matched.
            self.rescued.swap_remove(p);
        }
        if repeat {
            self.dropped += 1;
        } else if record.rescued() {
            self.rescued.push(seen);
        } else {
            self.handled[(seen.sequence % WINDOW as u64) as usize] = seen;
        }
        repeat
    }

    /// The newest of the main program's remembered records of `skaddr`.
    fn last_handled(&self, skaddr: u64, oldest_remembered: u64) -> Option<Seen> {
        (oldest_remembered + 1..self.sequence)
            .rev()
            .map(|sequence| (sequence, self.handled[(sequence % WINDOW as u64) as usize]))
            // A slot whose sequence differs holds an older lap's record: that position was
            // the standby's.
            .find(|(sequence, h)| h.sequence == *sequence && h.skaddr == skaddr)
            .map(|(_, h)| h)
    }

    /// Second deliveries dropped so far.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{RECORD_SIZE, TcpState as S};

    use super::*;

    fn record(
        skaddr: u64,
        old: tracer_common::TcpState,
        new: tracer_common::TcpState,
    ) -> TransitionRecord {
        let mut r = TransitionRecord::decode(&[0; RECORD_SIZE]).unwrap();
        r.skaddr = skaddr;
        r.oldstate = old;
        r.newstate = new;
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
        assert!(!duplicates.is_repeat(&record(1, S::LAST_ACK, S::CLOSE)));
        assert!(!duplicates.is_repeat(&record(2, S::CLOSE, S::SYN_SENT)));
        let again = by_standby(record(1, S::LAST_ACK, S::CLOSE), 1_600_000);
        assert!(duplicates.is_repeat(&again), "the same firing, by the standby 1.6 ms later");
        assert_eq!(duplicates.dropped(), 1);
    }

    #[test]
    fn genuine_transitions_are_kept_even_when_they_look_alike() {
        let mut duplicates = Duplicates::default();
        assert!(!duplicates.is_repeat(&record(1, S::LISTEN, S::SYN_RECV)));
        // Records in between lost, the address reused: the same pair again, same program.
        assert!(!duplicates.is_repeat(&record(1, S::LISTEN, S::SYN_RECV)));
        // By the other program, but far too late to be the same firing.
        let late = by_standby(record(1, S::LISTEN, S::SYN_RECV), MAX_APART_NS + 1);
        assert!(!duplicates.is_repeat(&late));
        assert!(!duplicates.is_repeat(&record(1, S::SYN_RECV, S::ESTABLISHED)));
        assert_eq!(duplicates.dropped(), 0);
    }

    #[test]
    fn either_program_may_deliver_first() {
        let mut duplicates = Duplicates::default();
        assert!(!duplicates.is_repeat(&by_standby(record(1, S::FIN_WAIT1, S::FIN_WAIT2), 0)));
        assert!(!duplicates.is_repeat(&record(2, S::CLOSE, S::SYN_SENT)));
        assert!(duplicates.is_repeat(&record(1, S::FIN_WAIT1, S::FIN_WAIT2)));
        assert_eq!(duplicates.dropped(), 1);
    }

    #[test]
    fn only_the_sockets_last_record_is_compared() {
        let mut duplicates = Duplicates::default();
        assert!(!duplicates.is_repeat(&record(1, S::CLOSE, S::SYN_SENT)));
        assert!(!duplicates.is_repeat(&by_standby(record(1, S::SYN_SENT, S::ESTABLISHED), 0)));
        // Reused address, records lost in between: a genuine second (S::CLOSE, S::SYN_SENT).
        assert!(!duplicates.is_repeat(&by_standby(record(1, S::CLOSE, S::SYN_SENT), 1_000)));
        assert!(!duplicates.is_repeat(&record(1, S::SYN_SENT, S::ESTABLISHED)));
        assert_eq!(duplicates.dropped(), 0);
    }

    #[test]
    fn memory_stays_within_the_window() {
        let mut duplicates = Duplicates::default();
        for skaddr in 0..(3 * WINDOW as u64) {
            assert!(!duplicates.is_repeat(&by_standby(record(skaddr, S::CLOSE, S::SYN_SENT), 0)));
        }
        assert!(duplicates.rescued.len() <= WINDOW);
        assert_eq!(duplicates.handled.len(), WINDOW);
        // Forgotten after the window: a record that old is not compared any more.
        assert!(!duplicates.is_repeat(&record(0, S::CLOSE, S::SYN_SENT)));
        let first = record(7, S::CLOSE, S::SYN_SENT);
        assert!(!duplicates.is_repeat(&first));
        for skaddr in 0..(WINDOW as u64) {
            assert!(!duplicates.is_repeat(&record(1_000_000 + skaddr, S::CLOSE, S::SYN_SENT)));
        }
        assert!(!duplicates.is_repeat(&by_standby(first, 0)), "out of the window");
    }
}
