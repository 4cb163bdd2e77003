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
//! common path only writes the record into a fixed window and one index slot; the search runs
//! for standby records, and for main records while a standby record is recent. Both searches
//! take constant time, so a host where the standby delivers much (another tracer's programs
//! often interrupted by network processing, or tests that attach the standby first) costs the
//! reader no more per record.

use std::collections::HashMap;

use tracer_common::{TcpState, TransitionRecord};

/// Records remembered: at 260,000 transitions per second, about 15 ms.
const WINDOW: usize = 4096;
/// Slots of the index of the main program's newest record per socket: sparse enough that
/// another socket rarely took a socket's slot within the window.
const INDEX_SLOTS: usize = 16 * WINDOW;
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
    /// By hash of a socket address: the sequence of the newest of the main program's records
    /// whose address hashes there (0: none yet).
    newest_handled: Box<[u64]>,
    /// The standby's records that are still the last of their socket, by address. Those older
    /// than the window count as absent, and are swept out when the map has grown.
    rescued: HashMap<u64, Seen>,
    /// Records read so far.
    sequence: u64,
    dropped: u64,
}

impl Default for Duplicates {
    fn default() -> Self {
        Self {
            handled: vec![Seen::default(); WINDOW].into_boxed_slice(),
            newest_handled: vec![0; INDEX_SLOTS].into_boxed_slice(),
            rescued: HashMap::new(),
            sequence: 0,
            dropped: 0,
        }
    }
}

/// Where the record read as `sequence` sits in the ring of the main program's records.
fn ring_slot(sequence: u64) -> usize {
    (sequence % WINDOW as u64) as usize
}

/// The index slot of a socket address (Fibonacci hashing: addresses differ in their middle
/// bits, the multiplication spreads those over the top ones).
fn index_slot(skaddr: u64) -> usize {
    const BITS: u32 = INDEX_SLOTS.trailing_zeros();
    (skaddr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - BITS)) as usize
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
        if !record.rescued() && self.rescued.is_empty() {
            // Nearly every record: the main program's, with no standby record to compare.
            self.remember_handled(seen);
            false
        } else {
            self.compare(seen, record.rescued())
        }
    }

    fn remember_handled(&mut self, seen: Seen) {
        self.handled[ring_slot(seen.sequence)] = seen;
        self.newest_handled[index_slot(seen.skaddr)] = seen.sequence;
    }

    /// A standby record, or a main record while standby records are pending.
    #[cold]
    fn compare(&mut self, seen: Seen, rescued: bool) -> bool {
        let oldest_remembered = self.sequence.saturating_sub(WINDOW as u64);
        // The socket's pending standby record is no longer its last one after this record,
        // or is matched by it: either way it goes.
        let pending = self.rescued.remove(&seen.skaddr).filter(|r| r.sequence > oldest_remembered);
        let repeat = if rescued {
            // The socket's last record, if the main program delivered it.
            let last_handled = self.last_handled(seen.skaddr, oldest_remembered);
            let is_last = |h: &Seen| pending.is_none_or(|p| p.sequence < h.sequence);
            last_handled.is_some_and(|h| is_last(&h) && h.delivered_again_as(&seen))
        } else {
            pending.is_some_and(|p| p.delivered_again_as(&seen))
        };
        if repeat {
            self.dropped += 1;
        } else if rescued {
            if self.rescued.len() >= 2 * WINDOW {
                self.rescued.retain(|_, r| r.sequence > oldest_remembered);
            }
            self.rescued.insert(seen.skaddr, seen);
        } else {
            self.remember_handled(seen);
        }
        repeat
    }

    /// The newest of the main program's remembered records of `skaddr`: found through the
    /// index, or, where another socket's record took the slot since, by a scan of the window.
    fn last_handled(&self, skaddr: u64, oldest_remembered: u64) -> Option<Seen> {
        let newest = self.newest_handled[index_slot(skaddr)];
        if newest <= oldest_remembered {
            // No main record of any address with this slot within the window.
            return None;
        }
        // In the window, so still in the ring: only a later lap overwrites it.
        let candidate = self.handled[ring_slot(newest)];
        if candidate.skaddr == skaddr {
            return Some(candidate);
        }
        (oldest_remembered + 1..newest)
            .rev()
            .map(|sequence| (sequence, self.handled[ring_slot(sequence)]))
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

    /// The rule `Duplicates` implements, applied by brute force to each socket's whole history:
    /// a standby record repeats the socket's newest kept main record in the window when no
    /// kept standby record came after that; a main record repeats the socket's last record
    /// when that is a kept standby record in the window.
    #[derive(Default)]
    struct Rule {
        /// Per socket: every record, whether the standby delivered it, whether it was dropped.
        by_socket: HashMap<u64, Vec<(Seen, bool, bool)>>,
    }

    impl Rule {
        fn is_repeat(&mut self, seen: Seen, rescued: bool) -> bool {
            let oldest = seen.sequence.saturating_sub(WINDOW as u64);
            let history = self.by_socket.entry(seen.skaddr).or_default();
            let in_window = || history.iter().rev().filter(|(s, ..)| s.sequence > oldest);
            let pending = in_window()
                .next()
                .filter(|&&(_, by_standby, dropped)| by_standby && !dropped)
                .map(|(s, ..)| *s);
            let repeat = if rescued {
                let handled =
                    in_window().find(|&&(_, by_standby, dropped)| !by_standby && !dropped);
                handled.is_some_and(|(h, ..)| {
                    pending.is_none_or(|p| p.sequence < h.sequence) && h.delivered_again_as(&seen)
                })
            } else {
                pending.is_some_and(|p| p.delivered_again_as(&seen))
            };
            history.push((seen, rescued, repeat));
            repeat
        }
    }

    /// xorshift64: a fixed, reproducible stream.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// `count` socket addresses that all share `skaddr`'s index slot.
    fn sharing_a_slot(skaddr: u64, count: usize) -> Vec<u64> {
        (1..)
            .map(|n| skaddr + (n << 6))
            .filter(|&a| index_slot(a) == index_slot(skaddr))
            .take(count)
            .collect()
    }

    /// Sockets few, many, and crowded into one index slot; the standby delivering rarely or
    /// nearly always; second deliveries near, late, and beyond the window: the window, its
    /// index and its sweeps answer as the rule does.
    #[test]
    fn every_answer_follows_the_rule() {
        let pairs =
            [(S::CLOSE, S::SYN_SENT), (S::SYN_SENT, S::ESTABLISHED), (S::LAST_ACK, S::CLOSE)];
        let crowded = sharing_a_slot(1 << 40, 8);
        let mut random = Random(0x2545_F491_4F6C_DD1D);
        let (mut duplicates, mut rule) = (Duplicates::default(), Rule::default());
        let mut recent = std::collections::VecDeque::new();
        let mut ts_ns = 1_000_000_000;
        let mut repeats = 0;
        for n in 0..60_000u64 {
            // Phases: the standby delivers 1 %, 20 % or 95 % of the records.
            let standby_percent = [1, 20, 95][(n / 7_000 % 3) as usize];
            // About 40 ms per window: both the window and the time apart decide.
            ts_ns += if random.below(1_000) == 0 { MAX_APART_NS } else { random.below(20_000) };
            let mut r = if recent.len() > 100 && random.below(10) == 0 {
                // The other program's delivery of an earlier firing, now and then one from
                // beyond the window.
                let back = if random.below(4) == 0 {
                    random.below(recent.len() as u64)
                } else {
                    random.below(8)
                };
                let mut again: TransitionRecord = recent[recent.len() - 1 - back as usize];
                again.flags ^= tracer_common::record::FLAG_RESCUED;
                again
            } else {
                let skaddr = match random.below(3) {
                    0 => random.below(64) << 12,
                    1 => random.below(300_000) << 6,
                    _ => crowded[random.below(crowded.len() as u64) as usize],
                };
                let (old, new) = pairs[random.below(pairs.len() as u64) as usize];
                let mut r = record(skaddr, old, new);
                if random.below(100) < standby_percent {
                    r.flags |= tracer_common::record::FLAG_RESCUED;
                }
                r.ts_ns = ts_ns;
                r
            };
            if random.below(2) == 0 {
                r.ts_ns = ts_ns;
            }
            let seen = Seen {
                skaddr: r.skaddr,
                pair: (r.oldstate, r.newstate),
                ts_ns: r.ts_ns,
                sequence: n + 1,
            };
            let expected = rule.is_repeat(seen, r.rescued());
            assert_eq!(duplicates.is_repeat(&r), expected, "record {n}");
            repeats += u64::from(expected);
            recent.push_back(r);
            if recent.len() > WINDOW + WINDOW / 2 {
                recent.pop_front();
            }
        }
        assert!(repeats > 1_000, "second deliveries exercised: {repeats}");
        assert_eq!(duplicates.dropped(), repeats);
    }

    /// Another socket's main record took the index slot after this socket's: found anyway.
    #[test]
    fn a_socket_whose_index_slot_was_taken_is_found() {
        let [mine, other] = sharing_a_slot(1 << 40, 2)[..] else { unreachable!() };
        let mut duplicates = Duplicates::default();
        assert!(!duplicates.is_repeat(&record(mine, S::LAST_ACK, S::CLOSE)));
        assert!(!duplicates.is_repeat(&record(other, S::CLOSE, S::SYN_SENT)));
        assert!(duplicates.is_repeat(&by_standby(record(mine, S::LAST_ACK, S::CLOSE), 1_000)));
    }

    /// The window's edge, exactly: a main record is compared while fewer than `WINDOW` records
    /// came after it.
    #[test]
    fn the_window_ends_exactly_after_window_records() {
        for (others, repeat) in [(WINDOW as u64 - 2, true), (WINDOW as u64 - 1, false)] {
            let mut duplicates = Duplicates::default();
            let first = record(7, S::FIN_WAIT1, S::FIN_WAIT2);
            assert!(!duplicates.is_repeat(&first));
            for skaddr in 0..others {
                assert!(!duplicates.is_repeat(&record(1_000_000 + skaddr, S::CLOSE, S::SYN_SENT)));
            }
            assert_eq!(duplicates.is_repeat(&by_standby(first, 0)), repeat, "after {others}");
        }
    }

    /// A sweep of the standby's records keeps those still in the window.
    #[test]
    fn a_sweep_keeps_what_is_within_the_window() {
        let mut duplicates = Duplicates::default();
        // The sweep runs at the insert after 2 * WINDOW records; a few more come after it.
        for skaddr in 0..(2 * WINDOW as u64 + 10) {
            assert!(!duplicates.is_repeat(&by_standby(record(skaddr, S::CLOSE, S::SYN_SENT), 0)));
        }
        assert!(duplicates.rescued.len() <= WINDOW + 10, "swept");
        let before_the_sweep = 2 * WINDOW as u64 - 100;
        assert!(duplicates.is_repeat(&record(before_the_sweep, S::CLOSE, S::SYN_SENT)));
    }

    /// A standby record older than the window is not compared, however close in time.
    #[test]
    fn a_standby_record_beyond_the_window_is_forgotten() {
        let mut duplicates = Duplicates::default();
        let first = by_standby(record(7, S::FIN_WAIT1, S::FIN_WAIT2), 0);
        assert!(!duplicates.is_repeat(&first));
        for skaddr in 0..(WINDOW as u64) {
            assert!(!duplicates.is_repeat(&record(1_000_000 + skaddr, S::CLOSE, S::SYN_SENT)));
        }
        assert!(!duplicates.is_repeat(&record(7, S::FIN_WAIT1, S::FIN_WAIT2)), "out of the window");
    }

    #[test]
    fn memory_stays_within_the_window() {
        let mut duplicates = Duplicates::default();
        for skaddr in 0..(3 * WINDOW as u64) {
            assert!(!duplicates.is_repeat(&by_standby(record(skaddr, S::CLOSE, S::SYN_SENT), 0)));
        }
        // Swept when it has grown to twice the window: at most that, whatever the traffic.
        assert!(duplicates.rescued.len() <= 2 * WINDOW);
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
