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
    daemon::core::{
        gauges::PortLabels,
        table::{SocketId, SocketKey},
    },
    netns::NamespaceDump,
    sockdiag::DiagSocket,
};

/// Table entries visited per hold of the lock: about a millisecond of work, so that the
/// holder is rarely preempted with the lock held on a busy host.
const SLICE: usize = 4_096;

/// A connecting socket the table holds without its local port is removed only once it has
/// not moved for longer than a connect lasts (the default 6 SYN retries give up after about
/// 127 s): then its last record was lost.
const CONNECT_OUTLIVES_NS: u64 = 300_000_000_000;

/// Corrections of each kind logged (at debug level) per reconciliation, to tell what drifts.
const EXAMPLES: u64 = 5;

/// Between slices: time for the threads waiting for the lock to take it.
const PAUSE: Duration = Duration::from_millis(1);

/// What one reconciliation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReconcileOutcome {
    /// Tracked sockets no dump lists any more (their CLOSE was never seen).
    pub removed: u64,
    /// Sockets a dump lists that the table lacked.
    pub added: u64,
    /// Sockets whose state the dump contradicted.
    pub repaired: u64,
    pub namespaces: usize,
}

impl ReconcileOutcome {
    pub(crate) fn corrections(&self) -> u64 {
        self.removed + self.added + self.repaired
    }
}

/// The earliest moment a dumped socket is known to have been in its state: for CLOSE_WAIT,
/// when the peer's last ACK (its FIN, or later) arrived; otherwise when the dump saw it.
fn entered_at(socket: &DiagSocket, now: u64) -> u64 {
    match socket.since_last_ack_ms() {
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
/// Every dumped socket has a position: its place in the dumps taken one after the other. The
/// index is an open-addressed table of those positions, found by a hash of the key (linear
/// probing; listeners sharing a port with SO_REUSEPORT have one key and take a slot each):
/// 12 bytes a socket in the table's states. A map from hash to a chain of positions took 49
/// (36 MiB of buckets at a million sockets), half the memory a reconciliation added then.
pub(crate) struct DumpIndex {
    dumps: Vec<NamespaceDump>,
    /// Position of each dump's first socket.
    starts: Vec<u32>,
    started_ns: u64,
    finished_ns: u64,
    covered: HashSet<u32>,
    /// [SAMPLED_STATES position][port label]
    sampled: Vec<Vec<i64>>,
    /// [state index][port label], of the table's states.
    counted: Vec<Vec<i64>>,
    /// [port label]: timewait minisockets listed in a table state (FIN_WAIT2: an orphan that
    /// waited too long for its peer's FIN). The tracepoint saw them close, and no record
    /// comes for them: they count in their state's gauge from the dump, not in the table.
    timewait: Vec<i64>,
    hasher: RandomState,
    slots: Vec<Slot>,
    /// Which positions a table entry has claimed, a bit each.
    matched: Vec<u64>,
    /// Connecting sockets the table holds without their local port, by (namespace,
    /// destination address, destination port): as many SYN_SENT sockets to the same place
    /// in the dump are theirs, not sockets the table lacks.
    connecting: HashMap<(u32, [u8; 16], u16), u32>,
}

/// A dumped socket in the index: part of its key's hash, to skip most other keys without
/// reading their socket, and its position + 1 (0: the slot is free).
#[derive(Clone, Copy, Default)]
struct Slot {
    hash_low: u32,
    position_after: u32,
}

/// Slots per indexed socket, as a fraction: at most two thirds of them taken keeps probe
/// sequences short.
const SLOTS_PER_SOCKET: (usize, usize) = (3, 2);

impl DumpIndex {
    pub(crate) fn new(
        dumps: Vec<NamespaceDump>,
        started_ns: u64,
        finished_ns: u64,
        labels: &PortLabels,
    ) -> Self {
        let mut starts = Vec::with_capacity(dumps.len());
        let mut total = 0u32;
        for dump in &dumps {
            starts.push(total);
            total = u32::try_from(dump.sockets.len())
                .ok()
                .and_then(|n| total.checked_add(n))
                .expect("under 2^32 sockets");
        }
        let mut index = Self {
            covered: dumps.iter().map(|d| d.inode).collect(),
            sampled: vec![vec![0; labels.values()]; SAMPLED_STATES.len()],
            counted: vec![vec![0; labels.values()]; TcpState::INDEXES],
            timewait: vec![0; labels.values()],
            starts,
            dumps: Vec::new(),
            started_ns,
            finished_ns,
            hasher: RandomState::new(),
            slots: Vec::new(),
            matched: vec![0; (total as usize).div_ceil(64)],
            connecting: HashMap::new(),
        };
        let mut indexed = Vec::new();
        for (dump, &start) in dumps.iter().zip(&index.starts) {
            for (position, socket) in (start..).zip(&dump.sockets) {
                let label = labels.index(socket.sport);
                if let Some(i) = SAMPLED_STATES.iter().position(|&state| state == socket.state) {
                    index.sampled[i][label] += 1;
                } else if tracked_state(socket.state) {
                    index.counted[socket.state.index()][label] += 1;
                    if socket.timewait {
                        index.timewait[label] += 1;
                    } else {
                        indexed.push(position);
                    }
                }
            }
        }
        // Sized once, exactly: growing by doubling would hold the old and the new table at
        // once, on top of the dump.
        let (num, den) = SLOTS_PER_SOCKET;
        index.slots = vec![Slot::default(); indexed.len() * num / den + 1];
        index.dumps = dumps;
        for position in indexed {
            let hash = index.hasher.hash_one(index.key(position));
            let mut slot = index.home(hash);
            while index.slots[slot].position_after != 0 {
                slot = index.after(slot);
            }
            index.slots[slot] = Slot { hash_low: hash as u32, position_after: position + 1 };
        }
        index
    }

    /// The slot a hash's probe sequence starts at.
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    fn after(&self, slot: usize) -> usize {
        if slot + 1 == self.slots.len() { 0 } else { slot + 1 }
    }

    fn socket(&self, position: u32) -> (u32, &DiagSocket) {
        let d = self.starts.partition_point(|&start| start <= position) - 1;
        let dump = &self.dumps[d];
        (dump.inode, &dump.sockets[(position - self.starts[d]) as usize])
    }

    fn key(&self, position: u32) -> SocketKey {
        let (netns, socket) = self.socket(position);
        SocketKey::from_diag(netns, socket)
    }

    fn is_matched(&self, position: u32) -> bool {
        self.matched[position as usize / 64] & (1 << (position % 64)) != 0
    }

    /// A listed socket with this key that no entry has claimed yet, now claimed.
    fn claim(&mut self, key: &SocketKey) -> Option<&DiagSocket> {
        // At least one slot is free (`SLOTS_PER_SOCKET`): every probe sequence ends.
        let hash = self.hasher.hash_one(key);
        let mut slot = self.home(hash);
        loop {
            let Slot { hash_low, position_after } = self.slots[slot];
            if position_after == 0 {
                return None;
            }
            let position = position_after - 1;
            if hash_low == hash as u32 && !self.is_matched(position) && self.key(position) == *key {
                self.matched[position as usize / 64] |= 1 << (position % 64);
                return Some(self.socket(position).1);
            }
            slot = self.after(slot);
        }
    }

    /// Listed sockets no entry claimed.
    fn unclaimed(&self) -> impl Iterator<Item = (SocketKey, &DiagSocket)> + '_ {
        self.dumps.iter().zip(&self.starts).flat_map(move |(dump, &start)| {
            (start..)
                .zip(&dump.sockets)
                .filter(|&(position, socket)| {
                    tracked_state(socket.state) && !socket.timewait && !self.is_matched(position)
                })
                .map(|(_, socket)| (SocketKey::from_diag(dump.inode, socket), socket))
        })
    }
}

impl Aggregator {
    /// Makes the table agree with dumps taken between `started_ns` and `finished_ns`, in one
    /// hold of the aggregator. Sockets in namespaces that were not dumped are left alone.
    /// Entries that changed since the dump started are trusted over it. `count` is false for
    /// the initial seeding, which corrects nothing.
    pub(crate) fn reconcile(
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
            if !key.complete() && state == TcpState::SYN_SENT {
                // connect() moves a socket to SYN_SENT before it picks the local port, so
                // the record has none and no dump can match it: the dump lists it under its
                // port. Left to its next record, unless older than any connect lasts.
                if now.saturating_sub(tracked.last_seen_ns) < CONNECT_OUTLIVES_NS {
                    *index.connecting.entry((key.netns, key.daddr, key.dport)).or_default() += 1;
                    continue;
                }
            }
            match index.claim(&key) {
                Some(socket) => {
                    self.table.set_inode(id, socket.inode);
                    if socket.state != state && !changed_since_dump {
                        if outcome.repaired < EXAMPLES {
                            log::debug!(
                                "reconcile: {key:?} is {} in the dump, {state} in the table",
                                socket.state
                            );
                        }
                        self.table.repair_state(id, socket.state, entered_at(socket, now), now);
                        outcome.repaired += 1;
                    }
                }
                None if !changed_since_dump => {
                    if outcome.removed < EXAMPLES {
                        log::debug!("reconcile: {key:?} ({state}) is in no dump: removed");
                    }
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
        let mut connecting = index.connecting.clone();
        for (key, socket) in index.unclaimed() {
            if changed.contains(&key) {
                continue;
            }
            if socket.state == TcpState::SYN_SENT
                && let Some(waiting) = connecting.get_mut(&(key.netns, key.daddr, key.dport))
                && *waiting > 0
            {
                // The table holds it, without its local port (see `reconcile_slice`).
                *waiting -= 1;
                continue;
            }
            let entered = entered_at(socket, now);
            if outcome.added < EXAMPLES {
                log::debug!(
                    "reconcile: {key:?} ({}) is missing from the table: added",
                    socket.state
                );
            }
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
        } else {
            if was_saturated {
                // Everything fits again: the table is the count, plus the minisockets below.
                let states: Vec<TcpState> = table_states().collect();
                self.table.recount_gauges(&states, now);
                self.timewait_counted.iter_mut().for_each(|count| *count = 0);
            }
            // The dump's timewait minisockets in FIN_WAIT2 replace the previous dump's.
            for (label, (&now_listed, before)) in
                index.timewait.iter().zip(&mut self.timewait_counted).enumerate()
            {
                let delta = now_listed - *before;
                self.table.gauges_mut().add_to_label(label, TcpState::FIN_WAIT2, delta, now);
                *before = now_listed;
            }
        }
        if self.saturated {
            // Set from the dump, which counted them already.
            self.timewait_counted.clone_from(&index.timewait);
        }
        self.dedupe_until_ns = index.finished_ns;
        outcome.namespaces = index.dumps.len();
        self.namespaces = index.dumps.len();
        if count {
            self.corrections += outcome.corrections();
            self.reconciliations += 1;
        }
        outcome
    }
}

/// `Aggregator::reconcile` with the aggregator locked one slice at a time (see the module's
/// documentation); call `Aggregator::begin_dump` before the dump starts.
pub(crate) fn reconcile_in_slices<'m>(
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
        agg.apply(record(skaddr, 1, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(record(skaddr, 2, S::SYN_SENT, S::ESTABLISHED, sport));
    }

    /// An orphan that waited too long in FIN_WAIT2 becomes a timewait minisocket, which dumps
    /// list in FIN_WAIT2 with no record to come: it counts in the FIN_WAIT2 gauge from each
    /// dump, like TIME_WAIT, and neither its appearance nor its expiry is a correction.
    #[test]
    fn timewait_minisockets_in_fin_wait2_count_from_the_dump_only() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        let mut minisocket = diag(S::FIN_WAIT2, 40_000);
        (minisocket.timewait, minisocket.inode) = (true, 0);
        agg.begin_dump();
        let outcome = agg.reconcile(dump(vec![minisocket]), 10, 20, true);
        assert_eq!(outcome.corrections(), 0, "{outcome:?}");
        assert!(agg.table().is_empty(), "not in the table");
        assert_eq!(agg.table().gauges().count(S::FIN_WAIT2), 1, "counted from the dump");
        agg.begin_dump();
        let outcome = agg.reconcile(dump(vec![]), 30, 40, true);
        assert_eq!(outcome.corrections(), 0, "{outcome:?}");
        assert_eq!(agg.table().gauges().count(S::FIN_WAIT2), 0, "expired");
        assert_eq!(agg.corrections(), 0);
    }

    /// connect() reports SYN_SENT before it picks the local port: while the connect waits
    /// (a listener that drops SYNs), the table holds the socket under port 0 and the dump
    /// under its port. That is no drift: nothing is removed, added or counted, and the count
    /// stays one; only a connect older than any connect lasts is removed as drift.
    #[test]
    fn a_connect_without_its_local_port_yet_is_not_a_correction() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.apply(record(A, 1_000, S::CLOSE, S::SYN_SENT, 0));
        let mut connecting = diag(S::SYN_SENT, 40_000);
        connecting.sport = 40_000;
        agg.begin_dump();
        let outcome = agg.reconcile(dump(vec![connecting.clone()]), 2_000, 3_000, true);
        assert_eq!(outcome.corrections(), 0, "{outcome:?}");
        assert_eq!(agg.table().len(), 1);
        assert_eq!(agg.table().gauges().count(S::SYN_SENT), 1);
        // Its next record completes the key.
        agg.apply(record(A, 4_000, S::SYN_SENT, S::ESTABLISHED, 40_000));
        assert_eq!(agg.table().gauges().count(S::ESTABLISHED), 1);

        // A connect whose records stopped long ago: its CLOSE was lost.
        let mut stale = Aggregator::new(100, PortLabels::none());
        stale.apply(record(A, 1_000, S::CLOSE, S::SYN_SENT, 0));
        let later = 1_000 + CONNECT_OUTLIVES_NS + 1;
        stale.begin_dump();
        let outcome = stale.reconcile(dump(vec![]), later, later + 10, true);
        assert_eq!(outcome.removed, 1, "{outcome:?}");
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
            agg.apply(record(A, 45, S::ESTABLISHED, S::CLOSE_WAIT, 1000));
            agg.apply(record(A + 8, 46, S::ESTABLISHED, S::FIN_WAIT1, 2000));
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
                agg.apply(record(skaddr, 25, S::ESTABLISHED, S::CLOSE_WAIT, sport));
                agg.apply(record(skaddr, 26, S::CLOSE_WAIT, S::LAST_ACK, sport));
                agg.apply(record(skaddr, 27, S::LAST_ACK, S::CLOSE, sport));
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
            agg.apply(r);
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

    /// Several namespaces, sampled states among the listed ones, keys shared by several
    /// sockets: each socket is claimed once, by its key, and what is left is unclaimed.
    #[test]
    fn the_index_finds_every_socket_once_by_key() {
        let namespace = |inode, first_port: u16| {
            let sockets = (0..700u16)
                .map(|i| {
                    let state = match i % 7 {
                        0 => S::TIME_WAIT,
                        1 => S::LISTEN,
                        _ => S::ESTABLISHED,
                    };
                    // Every tenth port twice: listeners sharing it.
                    diag(state, first_port + i - u16::from(i % 10 == 9))
                })
                .collect();
            NamespaceDump { inode, sockets, port_range: None, ..NamespaceDump::default() }
        };
        let dumps = vec![namespace(1, 1000), namespace(2, 1000), namespace(3, 5000)];
        let listed: Vec<(SocketKey, TcpState)> = dumps
            .iter()
            .flat_map(|d| d.sockets.iter().map(|s| (SocketKey::from_diag(d.inode, s), s.state)))
            .filter(|(_, state)| *state != S::TIME_WAIT)
            .collect();
        let mut index = DumpIndex::new(dumps, 0, 1, &PortLabels::none());
        assert_eq!(index.sampled[0][0], 300, "TIME_WAIT counted, not indexed");

        let (claimed, left) = listed.split_at(listed.len() / 2);
        for (key, state) in claimed {
            assert_eq!(index.claim(key).map(|s| s.state), Some(*state), "{key:?}");
        }
        let mut unclaimed: Vec<SocketKey> = index.unclaimed().map(|(key, _)| key).collect();
        let mut expected: Vec<SocketKey> = left.iter().map(|(key, _)| *key).collect();
        unclaimed.sort_by_key(|k| (k.netns, k.sport));
        expected.sort_by_key(|k| (k.netns, k.sport));
        assert_eq!(unclaimed, expected);
        for (key, _) in left {
            assert!(index.claim(key).is_some(), "{key:?}");
        }
        assert_eq!(index.unclaimed().count(), 0);
        assert!(index.claim(&listed[0].0).is_none(), "each socket is claimed once");
    }
}
