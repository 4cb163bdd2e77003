//! Reconciliation: making the table agree with `sock_diag` dumps, for what records cannot
//! say (sockets older than the daemon, CLOSEs the kernel never reported, sampled states).
//!
//! At a million sockets one pass over the table takes a good part of a second, and the
//! aggregator's lock is what the ring reader and every scrape wait for: held for the whole
//! pass, the ring filled and scrapes took seconds. So the dump is indexed before the lock is
//! taken, the table is then walked in slices with the lock released between them (records
//! and scrapes go on in the gaps), and only the short last step, adding what the table
//! lacks, sees the table at one moment. Whatever records change in the gaps is newer than
//! the dump and wins over it: such entries are left alone, and keys that records closed,
//! replaced or adopted meanwhile are not added back.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::MutexGuard,
    time::{Duration, Instant},
};

use tracer_common::TcpState;

use super::{Aggregator, SAMPLED_STATES, table_states, tracked_state};
use crate::{
    daemon::{
        gauges::PortLabels,
        ports::{self, PortUsage},
        table::{SocketId, SocketKey},
    },
    netns::NamespaceDump,
    sockdiag::DiagSocket,
};

/// Table entries visited per hold of the lock: about a millisecond of work, so that the
/// holder is rarely preempted with the lock held on a busy host.
const SLICE: usize = 4_096;

/// Between slices: time for the threads waiting for the lock to take it.
const PAUSE: Duration = Duration::from_millis(1);

/// No further socket in a chain.
const END: u32 = u32::MAX;

/// What one reconciliation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileOutcome {
    /// Tracked sockets no dump lists any more (their CLOSE was never seen).
    pub removed: u64,
    /// Sockets a dump lists that the table lacked.
    pub added: u64,
    /// Sockets whose state the dump contradicted.
    pub repaired: u64,
    pub namespaces: usize,
}

impl ReconcileOutcome {
    pub fn corrections(&self) -> u64 {
        self.removed + self.added + self.repaired
    }
}

/// The earliest moment a dumped socket is known to have been in its state: for CLOSE_WAIT,
/// when the peer's last ACK (its FIN, or later) arrived; otherwise when the dump saw it.
fn entered_at(socket: &DiagSocket, now: u64) -> u64 {
    match socket.since_last_ack_ms {
        Some(ms) if socket.state == TcpState::CLOSE_WAIT => {
            now.saturating_sub(u64::from(ms) * 1_000_000)
        }
        _ => now,
    }
}

/// Dumps taken between `started_ns` and `finished_ns`, indexed by socket key, with what the
/// gauges need from them counted. Built without the aggregator's lock (and on a thread of
/// its own, at a lower priority than the reader's: see `daemon::reconcile`).
///
/// The index maps a 64-bit hash of each key to its first socket and chains the others with
/// the same hash (listeners sharing a port with SO_REUSEPORT have the same key): 16 bytes a
/// bucket plus 4 a socket, where a map holding the keys themselves took 72 a bucket and an
/// allocation per key (some 200 MB at a million sockets).
pub struct DumpIndex {
    dumps: Vec<NamespaceDump>,
    started_ns: u64,
    finished_ns: u64,
    covered: HashSet<u32>,
    /// [SAMPLED_STATES position][port label]
    sampled: Vec<Vec<i64>>,
    /// [state index][port label], of the table's states.
    counted: Vec<Vec<i64>>,
    port_usage: Option<(Vec<PortUsage>, f64)>,
    hasher: RandomState,
    /// Dumped sockets in the table's states, as (dump, socket) positions.
    listed: Vec<(u32, u32)>,
    first: HashMap<u64, u32>,
    next: Vec<u32>,
    /// Which listed sockets a table entry has claimed.
    matched: Vec<bool>,
}

impl DumpIndex {
    pub fn new(
        dumps: Vec<NamespaceDump>,
        started_ns: u64,
        finished_ns: u64,
        labels: &PortLabels,
    ) -> Self {
        let mut index = Self {
            covered: dumps.iter().map(|d| d.inode).collect(),
            sampled: vec![vec![0; labels.values()]; SAMPLED_STATES.len()],
            counted: vec![vec![0; labels.values()]; TcpState::INDEXES],
            port_usage: Some(ports::usage(&dumps)),
            dumps: Vec::new(),
            started_ns,
            finished_ns,
            hasher: RandomState::new(),
            listed: Vec::new(),
            first: HashMap::new(),
            next: Vec::new(),
            matched: Vec::new(),
        };
        // Sized once: growing by doubling would hold the old and the new table at once, tens
        // of MiB at a million sockets, on top of the dump.
        let sockets: usize = dumps.iter().map(|d| d.sockets.len()).sum();
        index.first.reserve(sockets);
        index.next.reserve_exact(sockets);
        index.listed.reserve_exact(sockets);
        for (d, dump) in dumps.iter().enumerate() {
            for (s, socket) in dump.sockets.iter().enumerate() {
                let label = labels.index(socket.sport);
                if let Some(i) = SAMPLED_STATES.iter().position(|&state| state == socket.state) {
                    index.sampled[i][label] += 1;
                } else if tracked_state(socket.state) {
                    index.counted[socket.state.index()][label] += 1;
                    let position = u32::try_from(index.listed.len()).expect("under 2^32 sockets");
                    let hash = index.hasher.hash_one(SocketKey::from_diag(dump.inode, socket));
                    index.next.push(index.first.insert(hash, position).unwrap_or(END));
                    index.listed.push((d as u32, s as u32));
                }
            }
        }
        index.matched = vec![false; index.listed.len()];
        index.dumps = dumps;
        index
    }

    fn socket(&self, position: u32) -> (SocketKey, &DiagSocket) {
        let (d, s) = self.listed[position as usize];
        let dump = &self.dumps[d as usize];
        let socket = &dump.sockets[s as usize];
        (SocketKey::from_diag(dump.inode, socket), socket)
    }

    /// A listed socket with this key that no entry has claimed yet, now claimed.
    fn claim(&mut self, key: &SocketKey) -> Option<&DiagSocket> {
        let mut position = *self.first.get(&self.hasher.hash_one(key))?;
        while position != END {
            if !self.matched[position as usize] && self.socket(position).0 == *key {
                self.matched[position as usize] = true;
                return Some(self.socket(position).1);
            }
            position = self.next[position as usize];
        }
        None
    }

    /// Listed sockets no entry claimed.
    fn unclaimed(&self) -> impl Iterator<Item = (SocketKey, &DiagSocket)> + '_ {
        (0..self.listed.len() as u32).filter(|&p| !self.matched[p as usize]).map(|p| self.socket(p))
    }
}

impl Aggregator {
    /// Makes the table agree with dumps taken between `started_ns` and `finished_ns`, in one
    /// hold of the aggregator. Sockets in namespaces that were not dumped are left alone.
    /// Entries that changed since the dump started are trusted over it. `count` is false for
    /// the initial seeding, which corrects nothing.
    pub fn reconcile(
        &mut self,
        dumps: Vec<NamespaceDump>,
        started_ns: u64,
        finished_ns: u64,
        count: bool,
    ) -> ReconcileOutcome {
        let mut index = DumpIndex::new(dumps, started_ns, finished_ns, &self.labels);
        let ids = self.reconcile_start(&mut index);
        let mut outcome = ReconcileOutcome::default();
        self.reconcile_slice(&mut index, &ids, &mut outcome);
        self.reconcile_finish(&index, outcome, count)
    }

    /// Sets what comes from dumps alone; returns the entries to visit.
    fn reconcile_start(&mut self, index: &mut DumpIndex) -> Vec<SocketId> {
        if let Some(usage) = index.port_usage.take() {
            self.port_usage = usage;
        }
        for (state, per_label) in SAMPLED_STATES.iter().zip(&index.sampled) {
            self.table.gauges_mut().set_counts(*state, per_label, index.finished_ns);
        }
        self.table.ids()
    }

    /// Checks these entries against the dump: each claims its listed socket; the state of
    /// one the dump contradicts is repaired, and one the dump lacks is removed, unless a
    /// record changed it since the dump started.
    fn reconcile_slice(
        &mut self,
        index: &mut DumpIndex,
        ids: &[SocketId],
        outcome: &mut ReconcileOutcome,
    ) {
        let now = index.finished_ns;
        for &id in ids {
            let Some(tracked) = self.table.get(id) else { continue };
            if !index.covered.contains(&tracked.key.netns) {
                continue;
            }
            let changed_since_dump = tracked.last_seen_ns >= index.started_ns;
            let (key, state) = (tracked.key, tracked.state);
            match index.claim(&key) {
                Some(socket) => {
                    self.table.set_inode(id, socket.inode);
                    if socket.state != state && !changed_since_dump {
                        self.table.repair_state(id, socket.state, entered_at(socket, now), now);
                        outcome.repaired += 1;
                    }
                }
                None if !changed_since_dump => {
                    self.table.remove(id, now);
                    outcome.removed += 1;
                }
                None => {}
            }
        }
    }

    /// Adds the listed sockets no entry claimed, and sets the gauges from the dump when the
    /// table cannot hold every socket.
    fn reconcile_finish(
        &mut self,
        index: &DumpIndex,
        mut outcome: ReconcileOutcome,
        count: bool,
    ) -> ReconcileOutcome {
        let now = index.finished_ns;
        let changed = self.changed_during_dump.take().unwrap_or_default();
        let mut untracked = 0;
        for (key, socket) in index.unclaimed() {
            if changed.contains(&key) {
                continue;
            }
            let entered = entered_at(socket, now);
            if self.table.insert_seeded(key, socket.state, socket.inode, entered, now) {
                outcome.added += 1;
            } else {
                untracked += 1;
            }
        }
        let was_saturated = self.saturated;
        self.saturated = untracked > 0;
        self.untracked = untracked;
        if self.saturated {
            // Exact as of the dump: every socket it listed, tracked or not, and the table's
            // sockets of namespaces it could not enter.
            let mut counted = index.counted.clone();
            let uncovered =
                self.table.iter().filter(|(_, t)| !index.covered.contains(&t.key.netns));
            for (_, tracked) in uncovered {
                counted[tracked.state.index()][self.labels.index(tracked.key.sport)] += 1;
            }
            for state in table_states() {
                self.table.gauges_mut().set_counts(state, &counted[state.index()], now);
            }
        } else if was_saturated {
            // Everything fits again: the table is the count.
            let states: Vec<TcpState> = table_states().collect();
            self.table.recount_gauges(&states, now);
        }
        self.dedupe_until_ns = index.finished_ns;
        outcome.namespaces = index.dumps.len();
        self.namespaces = index.dumps.len();
        if count {
            self.corrections += outcome.corrections();
        }
        outcome
    }
}

/// `Aggregator::reconcile` with the aggregator locked one slice at a time (see the module's
/// documentation); call `Aggregator::begin_dump` before the dump starts.
pub fn reconcile_in_slices<'m>(
    lock: impl Fn() -> MutexGuard<'m, Aggregator>,
    mut index: DumpIndex,
) -> ReconcileOutcome {
    // How long each step held the lock, the longest first: logged, for tuning at scale.
    let mut holds = [Duration::ZERO; 3];
    let timed = |hold: &mut Duration, step: &mut dyn FnMut(&mut Aggregator)| {
        let mut agg = lock();
        let started = Instant::now();
        step(&mut agg);
        *hold = (*hold).max(started.elapsed());
    };
    let mut ids = Vec::new();
    timed(&mut holds[0], &mut |agg| ids = agg.reconcile_start(&mut index));
    let mut outcome = ReconcileOutcome::default();
    for slice in ids.chunks(SLICE) {
        timed(&mut holds[1], &mut |agg| agg.reconcile_slice(&mut index, slice, &mut outcome));
        // Let the reader and scrapes waiting for the lock in. A yield is not enough: a
        // mutex is not fair, and this thread took it back before the woken reader ran, for
        // slice after slice, while the ring filled.
        std::thread::sleep(PAUSE);
    }
    timed(&mut holds[2], &mut |agg| outcome = agg.reconcile_finish(&index, outcome, true));
    log::debug!(
        "reconciliation held the table for at most {:?} (start), {:?} (one of {} slices), {:?} \
         (finish)",
        holds[0],
        holds[1],
        ids.len().div_ceil(SLICE),
        holds[2]
    );
    outcome
}

#[cfg(test)]
mod tests {
    use tracer_common::TcpState as S;

    use super::{super::tests::*, *};

    /// Runs a reconciliation in two slices, applying `between` while the lock would be free.
    fn reconcile_around(
        agg: &mut Aggregator,
        dumps: Vec<NamespaceDump>,
        (started, finished): (u64, u64),
        between: impl FnOnce(&mut Aggregator),
    ) -> ReconcileOutcome {
        let labels = agg.labels.clone();
        let mut index = DumpIndex::new(dumps, started, finished, &labels);
        let ids = agg.reconcile_start(&mut index);
        let (first, rest) = ids.split_at(ids.len() / 2);
        let mut outcome = ReconcileOutcome::default();
        agg.reconcile_slice(&mut index, first, &mut outcome);
        between(agg);
        agg.reconcile_slice(&mut index, rest, &mut outcome);
        agg.reconcile_finish(&index, outcome, true)
    }

    fn established(agg: &mut Aggregator, skaddr: u64, sport: u16) {
        agg.apply(&record(skaddr, 1, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(&record(skaddr, 2, S::SYN_SENT, S::ESTABLISHED, sport));
    }

    #[test]
    fn a_socket_adopted_between_slices_is_not_added_twice() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        let listed = dump(vec![diag(S::ESTABLISHED, 1000), diag(S::ESTABLISHED, 2000)]);
        agg.reconcile(listed.clone(), 10, 20, false);
        assert_eq!(agg.table().len(), 2, "seeded");
        agg.begin_dump();
        let outcome = reconcile_around(&mut agg, listed, (30, 40), |agg| {
            // Both seeded entries get their addresses from records while the lock is free.
            agg.apply(&record(A, 45, S::ESTABLISHED, S::CLOSE_WAIT, 1000));
            agg.apply(&record(A + 8, 46, S::ESTABLISHED, S::FIN_WAIT1, 2000));
        });
        assert_eq!(outcome.corrections(), 0, "{outcome:?}");
        assert_eq!(agg.table().len(), 2);
        let gauges = agg.table().gauges();
        assert_eq!((gauges.count(S::CLOSE_WAIT), gauges.count(S::FIN_WAIT1)), (1, 1));
        assert_eq!(gauges.count(S::ESTABLISHED), 0);
    }

    #[test]
    fn a_socket_closed_between_slices_is_not_resurrected() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        established(&mut agg, A, 1000);
        established(&mut agg, A + 8, 2000);
        agg.begin_dump();
        let listed = dump(vec![diag(S::ESTABLISHED, 1000), diag(S::ESTABLISHED, 2000)]);
        let outcome = reconcile_around(&mut agg, listed, (10, 20), |agg| {
            for (skaddr, sport) in [(A, 1000), (A + 8, 2000)] {
                agg.apply(&record(skaddr, 25, S::ESTABLISHED, S::CLOSE_WAIT, sport));
                agg.apply(&record(skaddr, 26, S::CLOSE_WAIT, S::LAST_ACK, sport));
                agg.apply(&record(skaddr, 27, S::LAST_ACK, S::CLOSE, sport));
            }
        });
        assert_eq!(outcome.corrections(), 0, "{outcome:?}");
        assert!(agg.table().is_empty());
        assert_eq!(agg.table().gauges().count(S::ESTABLISHED), 0);
    }

    /// Listeners sharing a port (SO_REUSEPORT) have one key: each entry claims one socket.
    #[test]
    fn sockets_with_one_key_are_matched_one_to_one() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        let listener = |agg: &mut Aggregator, skaddr| {
            let mut r = record(skaddr, 1, S::CLOSE, S::LISTEN, 8080);
            (r.dport, r.daddr) = (0, [0; 16]);
            agg.apply(&r);
        };
        listener(&mut agg, A);
        listener(&mut agg, A + 8);
        let mut socket = diag(S::LISTEN, 8080);
        (socket.dport, socket.daddr) = (0, [0; 16]);
        agg.begin_dump();
        let both = agg.reconcile(dump(vec![socket.clone(), socket.clone()]), 10, 20, true);
        assert_eq!(both.corrections(), 0, "{both:?}");
        agg.begin_dump();
        let one = agg.reconcile(dump(vec![socket]), 30, 40, true);
        assert_eq!((one.removed, one.added), (1, 0));
        assert_eq!(agg.table().gauges().count(S::LISTEN), 1);
    }
}
