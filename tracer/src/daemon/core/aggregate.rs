//! Aggregation of transition records: counts per (old, new), completed stays per state, and
//! the live socket table; seeding and reconciliation from `sock_diag` dumps.

use std::collections::VecDeque;

use foldhash::{HashSet, HashSetExt as _};

use tracer_common::{TcpState, TransitionRecord};

use super::{
    gauges::PortLabels,
    histogram::DurationHistogram,
    table::{Owner, SocketId, SocketKey, SocketTable},
};

mod reconcile;

pub(crate) use reconcile::{DumpIndex, ReconcileOutcome, reconcile_in_slices};

/// A record as the diagnoses receive it, with what the core found out applying it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Transition {
    pub record: TransitionRecord,
    /// The series of the socket's local port (`--port-label`).
    pub label: usize,
    /// How long the socket stayed in its old state, where exactly known: as the kernel
    /// measured it, or from the table where the kernel's map had forgotten the socket.
    pub stay_ns: Option<u64>,
}

/// States the tracepoint never reports: their gauges come from dumps only.
pub(super) const SAMPLED_STATES: [TcpState; 2] = [TcpState::TIME_WAIT, TcpState::NEW_SYN_RECV];

/// States whose gauges follow the table (or, while it is saturated, dumps and records).
fn table_states() -> impl Iterator<Item = TcpState> {
    TcpState::ALL.into_iter().filter(|&state| tracked_state(state))
}

/// Whether a dump's socket in `state` belongs in the table (the tracepoint reports its
/// transitions); CLOSE sockets are not in dumps, sampled states are counted separately.
fn tracked_state(state: TcpState) -> bool {
    state.is_known() && state != TcpState::CLOSE && !SAMPLED_STATES.contains(&state)
}

pub(crate) struct Aggregator {
    labels: PortLabels,
    /// [label][old][new]
    transitions: Vec<[[u64; TcpState::INDEXES]; TcpState::INDEXES]>,
    stays: [DurationHistogram; TcpState::INDEXES],
    table: SocketTable,
    events: u64,
    malformed: u64,
    corrections: u64,
    namespaces: usize,
    /// Reconciliations completed since start (not the seeding).
    reconciliations: u64,
    /// How long the last one took, from the start of its dump to the end of its last slice.
    last_reconcile_ns: u64,
    /// Records stamped before this came from sockets a dump may already have listed.
    dedupe_until_ns: u64,
    /// From the start of a dump to the end of its reconciliation: keys of sockets that
    /// records closed, replaced or adopted meanwhile.
    changed_during_dump: Option<HashSet<SocketKey>>,
    /// The table cannot hold every socket: gauges come from the last dump plus every record
    /// since, tracked or not, instead of from the table.
    saturated: bool,
    /// Sockets the last dump listed that the table could not hold.
    untracked: usize,
    /// [port label]: the last dump's timewait minisockets in FIN_WAIT2, as counted in the
    /// gauges (see `DumpIndex::timewait`).
    timewait_counted: Vec<i64>,
    /// Transitions of sockets the kernel's map did not hold, by what the table knew of them.
    kernel_forgot: KernelForgot,
    /// Established sockets no record named an owner for, in the order they became due for
    /// a look in the kernel's map; kept only where the accept hook fills that map (see
    /// `kernel_owners`).
    unnamed: Option<VecDeque<Unnamed>>,
    /// Waits given up because `MAX_UNNAMED` sockets were already waiting.
    unnamed_dropped: u64,
}

/// Transitions whose record carries no stay although the socket existed before (the kernel's
/// per-socket map did not hold it), by what the daemon's table knew of the socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KernelForgot {
    /// The table saw it enter its state: the kernel's map evicted it (more sockets than
    /// `--kernel-sockets`), or could not take it. Its stay is taken from the table.
    pub evicted: u64,
    /// Older than the daemon: known from a dump only, its stay unknown to both.
    pub older: u64,
    /// Unknown to the table too (its earlier record was lost, or the table was full).
    pub unknown: u64,
}

/// A socket waiting for its owner to be looked up in the kernel's map.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unnamed {
    pub id: SocketId,
    /// Not looked up before this (CLOCK_MONOTONIC ns): the process may not have accepted
    /// the socket yet.
    pub due_ns: u64,
    /// Looks taken so far.
    pub looks: u8,
}

/// Sockets waiting at most; beyond, the oldest wait is given up (the socket is named at its
/// next transition in its owner's context, as without the accept hook).
const MAX_UNNAMED: usize = 1 << 18;
/// How long after it is established a socket's owner is first looked up.
const FIRST_LOOK_AFTER_NS: u64 = 500_000_000;

impl Aggregator {
    pub(crate) fn new(max_sockets: usize, labels: PortLabels) -> Self {
        Self {
            transitions: vec![[[0; TcpState::INDEXES]; TcpState::INDEXES]; labels.values()],
            stays: std::array::from_fn(|_| DurationHistogram::default()),
            table: SocketTable::new(max_sockets, labels.clone()),
            timewait_counted: vec![0; labels.values()],
            labels,
            events: 0,
            malformed: 0,
            corrections: 0,
            namespaces: 0,
            reconciliations: 0,
            last_reconcile_ns: 0,
            dedupe_until_ns: 0,
            changed_during_dump: None,
            saturated: false,
            untracked: 0,
            kernel_forgot: KernelForgot::default(),
            unnamed: None,
            unnamed_dropped: 0,
        }
    }

    pub(crate) fn saturated(&self) -> bool {
        self.saturated
    }

    pub(crate) fn untracked(&self) -> usize {
        self.untracked
    }

    /// Transitions of sockets the kernel's map did not hold, by what the table knew.
    pub(crate) fn kernel_forgot(&self) -> KernelForgot {
        self.kernel_forgot
    }

    pub(crate) fn labels(&self) -> &PortLabels {
        &self.labels
    }

    pub(crate) fn table(&self) -> &SocketTable {
        &self.table
    }

    pub(crate) fn events(&self) -> u64 {
        self.events
    }

    pub(crate) fn malformed(&self) -> u64 {
        self.malformed
    }

    pub(crate) fn corrections(&self) -> u64 {
        self.corrections
    }

    /// Owner lookups given up because too many sockets were waiting for one.
    pub(crate) fn unnamed_dropped(&self) -> u64 {
        self.unnamed_dropped
    }

    pub(crate) fn namespaces(&self) -> usize {
        self.namespaces
    }

    pub(crate) fn reconciliations(&self) -> u64 {
        self.reconciliations
    }

    pub(crate) fn last_reconcile_ns(&self) -> u64 {
        self.last_reconcile_ns
    }

    pub(crate) fn set_last_reconcile_ns(&mut self, ns: u64) {
        self.last_reconcile_ns = ns;
    }

    pub(crate) fn transitions(&self, label: usize, old: TcpState, new: TcpState) -> u64 {
        self.transitions[label][old.index()][new.index()]
    }

    pub(crate) fn stays(&self, state: TcpState) -> &DurationHistogram {
        &self.stays[state.index()]
    }

    /// Records a socket's inode learned from a dump.
    pub(crate) fn set_inode(&mut self, id: super::table::SocketId, inode: u32) {
        self.table.set_inode(id, inode);
    }

    /// Records a socket's owner learned outside its records (the kernel's map).
    pub(crate) fn set_owner(&mut self, id: super::table::SocketId, owner: super::table::Owner) {
        self.table.set_owner(id, owner);
    }

    pub(crate) fn count_malformed(&mut self, records: u64) {
        self.malformed += records;
    }

    /// Applies one transition record; returns it as the diagnoses see it.
    pub(crate) fn apply(&mut self, r: TransitionRecord) -> Transition {
        self.events += 1;
        let (old, new) = (r.oldstate, r.newstate);
        let label = self.labels.index(r.sport);
        self.transitions[label][old.index()][new.index()] += 1;
        let r = &r;

        let ts = r.ts_ns;
        let key = SocketKey::from_record(r);
        if TcpState::creates_socket(old, new) {
            // An entry under this address belongs to an earlier socket whose CLOSE was lost.
            if let Some(replaced) = self.table.remove(r.skaddr, ts) {
                self.note_changed(replaced.key);
            }
        } else if !self.table.contains(r.skaddr) && self.table.adopt_seeded(&key, r.skaddr) {
            // Older than the daemon: known from a dump by its 4-tuple, until now.
            self.note_changed(key);
        }
        if ts <= self.dedupe_until_ns && key.complete() {
            // A dump that ran while this socket changed state may have listed it too.
            self.table.drop_seeded_duplicate(&key, ts);
        }
        let stay_ns = if r.ends_stay() { self.stay(r) } else { None };
        if let Some(stay_ns) = stay_ns {
            self.stays[old.index()].observe(stay_ns);
        }
        let tracked = if new == TcpState::CLOSE {
            self.note_changed(key);
            self.table.remove(r.skaddr, ts).is_some()
        } else {
            if self.changed_during_dump.is_some() && !self.table.contains(r.skaddr) {
                // New to the table while a reconciliation runs: the walk may have passed
                // already (a record committed just after the flush that precedes the walk),
                // and the dump may list the socket too; it must not be added a second time.
                self.note_changed(key);
            }
            let owner = r.owner_known().then_some(Owner {
                pid: r.owner_tgid,
                comm: r.owner_comm,
                cgroup: r.owner_cgroup,
            });
            let tracked = self.table.enter_state(r.skaddr, key, new, ts, owner);
            // A socket the full table refused: from now on gauges follow records, not it.
            self.saturated |= !tracked;
            if tracked && owner.is_none() && new == TcpState::ESTABLISHED {
                // Accepted: every transition so far ran in softirq.
                let due_ns = ts + FIRST_LOOK_AFTER_NS;
                self.queue_unnamed(Unnamed { id: r.skaddr, due_ns, looks: 0 });
            }
            tracked
        };
        if !tracked && self.saturated {
            // Counted in the gauges (by the dump, or by its own creation) but not in the
            // table: the record moves it between gauges.
            let gauges = self.table.gauges_mut();
            if !TcpState::creates_socket(old, new) {
                gauges.add(r.sport, old, -1, ts);
            }
            if new != TcpState::CLOSE {
                gauges.add(r.sport, new, 1, ts);
            }
        }
        Transition { record: *r, label, stay_ns }
    }

    /// How long the record's socket stayed in its old state: as the kernel measured it, or,
    /// where the kernel's map no longer held the socket, from when the table saw it enter
    /// that state. Counts why the kernel did not know.
    fn stay(&mut self, r: &TransitionRecord) -> Option<u64> {
        if r.stay_known() {
            return Some(r.stay_ns);
        }
        if TcpState::creates_socket(r.oldstate, r.newstate) {
            return None;
        }
        match self.table.get(r.skaddr) {
            Some(known) if known.entered_exact && known.state == r.oldstate => {
                self.kernel_forgot.evicted += 1;
                Some(r.ts_ns.saturating_sub(known.entered_ns))
            }
            Some(known) if !known.entered_exact => {
                self.kernel_forgot.older += 1;
                None
            }
            _ => {
                self.kernel_forgot.unknown += 1;
                None
            }
        }
    }

    /// Call when a dump starts: closes seen from now on are remembered, so the dump's
    /// possibly older view does not resurrect those sockets.
    pub(crate) fn begin_dump(&mut self) {
        self.changed_during_dump = Some(HashSet::new());
    }

    /// From now on, established sockets without an owner are queued for `take_unnamed`.
    pub(crate) fn queue_unnamed_sockets(&mut self) {
        self.unnamed.get_or_insert_with(VecDeque::new);
    }

    /// Queues a socket for a look in the kernel's map (again, after a look that found
    /// nothing, with a later `due_ns`).
    pub(crate) fn queue_unnamed(&mut self, socket: Unnamed) {
        let Some(queue) = &mut self.unnamed else { return };
        if queue.len() >= MAX_UNNAMED {
            queue.pop_front();
            self.unnamed_dropped += 1;
        }
        queue.push_back(socket);
    }

    /// Up to `max` queued sockets due by `now_ns` that are still tracked and still unnamed.
    pub(crate) fn take_unnamed(&mut self, now_ns: u64, max: usize) -> Vec<Unnamed> {
        let Some(queue) = &mut self.unnamed else { return Vec::new() };
        let mut due = Vec::new();
        while due.len() < max
            && let Some(socket) = queue.front().copied()
            && socket.due_ns <= now_ns
        {
            queue.pop_front();
            if self.table.get(socket.id).is_some_and(|t| t.owner.is_none()) {
                due.push(socket);
            }
        }
        due
    }

    /// A dump that will not be reconciled: stop remembering changes for it.
    pub(crate) fn abandon_dump(&mut self) {
        self.changed_during_dump = None;
    }

    /// While a reconciliation is under way: a record closed, replaced or adopted the socket
    /// with this key, so what the dump says of that key is out of date.
    fn note_changed(&mut self, key: SocketKey) {
        if let Some(changed) = &mut self.changed_during_dump {
            changed.insert(key);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {

    use tracer_common::{
        TcpState as S,
        record::{AF_INET, FLAG_OWNER_KNOWN, FLAG_STAY_KNOWN, IPPROTO_TCP},
    };

    use super::*;
    use crate::{netns::NamespaceDump, sockdiag::DiagSocket};

    pub(super) const NETNS: u32 = 4_026_531_840;

    /// A record of socket `skaddr` moving from `old` to `new` at `ts`, local port `sport`.
    pub(crate) fn record(
        skaddr: u64,
        ts: u64,
        old: TcpState,
        new: TcpState,
        sport: u16,
    ) -> TransitionRecord {
        TransitionRecord {
            ts_ns: ts,
            skaddr,
            stay_ns: 500,
            owner_cgroup: 0,
            pid: 0,
            tgid: 0,
            owner_tgid: 0,
            netns: NETNS,
            comm: [0; 16],
            owner_comm: [0; 16],
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport,
            dport: 80,
            family: AF_INET,
            protocol: IPPROTO_TCP,
            oldstate: old,
            newstate: new,
            flags: if old == S::CLOSE { 0 } else { FLAG_STAY_KNOWN },
            error: 0,
            srtt_us: 0,
            totals: Default::default(),
        }
    }

    pub(super) fn diag(state: TcpState, sport: u16) -> DiagSocket {
        DiagSocket {
            family: AF_INET,
            state,
            timewait: false,
            sport,
            dport: 80,
            saddr: tracer_common::ip_to_raw([127, 0, 0, 1].into()),
            daddr: tracer_common::ip_to_raw([127, 0, 0, 1].into()),
            inode: 1,
            last_ack_ms: DiagSocket::NO_ACK_TIME,
        }
    }

    pub(super) fn dump(sockets: Vec<DiagSocket>) -> Vec<NamespaceDump> {
        vec![NamespaceDump { inode: NETNS, sockets, port_range: None, ..NamespaceDump::default() }]
    }

    pub(super) const A: u64 = 0xffff_8880_0000_1000;

    #[test]
    fn counts_transitions_and_completed_stays() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.apply(record(A, 1, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(record(A, 2, S::SYN_SENT, S::ESTABLISHED, 1000));
        agg.apply(record(A, 3, S::ESTABLISHED, S::FIN_WAIT1, 1000));
        assert_eq!(agg.transitions(0, S::CLOSE, S::SYN_SENT), 1);
        assert_eq!(agg.stays(S::CLOSE).count, 0, "first sightings have no stay");
        assert_eq!(agg.stays(S::SYN_SENT).count, 1);
        assert_eq!(agg.table().gauges().count(S::FIN_WAIT1), 1);
        agg.apply(record(A, 4, S::FIN_WAIT1, S::FIN_WAIT2, 1000));
        agg.apply(record(A, 5, S::FIN_WAIT2, S::CLOSE, 1000));
        assert!(agg.table().is_empty());
        assert_eq!(agg.events(), 5);
    }

    /// A record without a stay (the kernel's map forgot the socket) of a socket the table saw
    /// enter its state is measured from the table; one the table knows only from a dump is
    /// not, and each is counted by cause.
    #[test]
    fn a_stay_the_kernel_forgot_is_taken_from_the_table() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.apply(record(A, 1_000, S::CLOSE, S::SYN_SENT, 40000));
        agg.apply(record(A, 2_000, S::SYN_SENT, S::ESTABLISHED, 40000));
        let forgotten =
            |id, ts, old, new| TransitionRecord { flags: 0, ..record(id, ts, old, new, 40000) };
        agg.apply(forgotten(A, 9_000, S::ESTABLISHED, S::FIN_WAIT1));
        let established = agg.stays(S::ESTABLISHED);
        assert_eq!((established.count, established.sum_ns), (1, 7_000));
        assert_eq!(agg.kernel_forgot(), KernelForgot { evicted: 1, older: 0, unknown: 0 });
        // Never seen by the table: no stay, counted as unknown.
        agg.apply(forgotten(A + 64, 9_500, S::FIN_WAIT2, S::CLOSE));
        assert_eq!(agg.kernel_forgot().unknown, 1);
        assert_eq!(agg.stays(S::FIN_WAIT2).count, 0);
    }

    /// shutdown() then close() reports the close as FIN_WAIT1 -> FIN_WAIT1 (or FIN_WAIT2 ->
    /// FIN_WAIT2): a move within the state, which neither ends nor restarts the stay.
    #[test]
    fn a_move_to_the_same_state_continues_the_stay() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.apply(record(A, 1, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(record(A, 2, S::SYN_SENT, S::ESTABLISHED, 1000));
        agg.apply(record(A, 3, S::ESTABLISHED, S::FIN_WAIT1, 1000));
        agg.apply(record(A, 7, S::FIN_WAIT1, S::FIN_WAIT1, 1000));
        assert_eq!(agg.transitions(0, S::FIN_WAIT1, S::FIN_WAIT1), 1, "counted as a transition");
        assert_eq!(agg.stays(S::FIN_WAIT1).count, 0, "but the stay goes on");
        let tracked = agg.table().get(A).expect("tracked");
        assert_eq!((tracked.state, tracked.entered_ns), (S::FIN_WAIT1, 3), "entered at 3, not 7");
        assert_eq!(agg.table().gauges().count(S::FIN_WAIT1), 1);
        agg.apply(record(A, 9, S::FIN_WAIT1, S::FIN_WAIT2, 1000));
        assert_eq!(agg.stays(S::FIN_WAIT1).count, 1, "one stay, ended by the real move");
    }

    /// Above --max-sockets nothing churns: the table keeps what it holds, reconciliations
    /// correct nothing, and the gauges count every socket, tracked or not.
    #[test]
    fn a_saturated_table_stays_still_and_its_gauges_exact() {
        let mut agg = Aggregator::new(2, PortLabels::none());
        let steady: Vec<DiagSocket> = (1000..1005).map(|port| diag(S::ESTABLISHED, port)).collect();
        agg.reconcile(dump(steady.clone()), 10, 20, false);
        assert!(agg.saturated());
        assert_eq!((agg.table().len(), agg.untracked()), (2, 3));
        assert_eq!(agg.table().gauges().count(S::ESTABLISHED), 5, "from the dump");
        for round in 0..3 {
            let at = 100 + round * 100;
            let outcome = agg.reconcile(dump(steady.clone()), at, at + 10, true);
            assert_eq!(outcome.corrections(), 0, "round {round}: {outcome:?}");
            assert_eq!(agg.table().gauges().count(S::ESTABLISHED), 5);
        }
        assert_eq!(agg.corrections(), 0);

        // An untracked socket's records still move it between gauges; a new one counts too.
        let untracked = record(A, 500, S::ESTABLISHED, S::CLOSE_WAIT, 1004);
        agg.apply(untracked);
        agg.apply(record(A + 8, 501, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(record(A + 8, 502, S::SYN_SENT, S::ESTABLISHED, 2000));
        let gauges = agg.table().gauges();
        assert_eq!((gauges.count(S::ESTABLISHED), gauges.count(S::CLOSE_WAIT)), (5, 1));
        assert_eq!(gauges.count(S::SYN_SENT), 0);
        assert_eq!(agg.table().len(), 2);

        // Back under the bound: everything is tracked, and the table is the count again.
        agg.reconcile(dump(steady[..2].to_vec()), 600, 610, true);
        assert!(!agg.saturated());
        assert_eq!(agg.table().gauges().count(S::ESTABLISHED), 2);
    }

    #[test]
    fn seeded_socket_moves_between_gauges_once() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.reconcile(dump(vec![diag(S::ESTABLISHED, 1000)]), 10, 20, false);
        assert_eq!(agg.table().gauges().count(S::ESTABLISHED), 1);
        agg.apply(record(A, 30, S::ESTABLISHED, S::CLOSE_WAIT, 1000));
        assert_eq!(agg.table().gauges().count(S::ESTABLISHED), 0);
        assert_eq!(agg.table().gauges().count(S::CLOSE_WAIT), 1);
        assert_eq!(agg.table().len(), 1);
    }

    #[test]
    fn a_socket_created_during_the_seed_dump_is_counted_once() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        // Created at t=5 and established at t=6, while the dump ran (t=4..8) and listed it.
        agg.reconcile(dump(vec![diag(S::ESTABLISHED, 1000)]), 4, 8, false);
        agg.apply(record(A, 5, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(record(A, 6, S::SYN_SENT, S::ESTABLISHED, 1000));
        assert_eq!(agg.table().len(), 1);
        assert_eq!(agg.table().gauges().count(S::ESTABLISHED), 1);
    }

    #[test]
    fn reconciliation_removes_adds_and_repairs_and_counts() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.apply(record(A, 1, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(record(A, 2, S::SYN_SENT, S::ESTABLISHED, 1000)); // gone without CLOSE
        agg.apply(record(A + 8, 1, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(record(A + 8, 2, S::SYN_SENT, S::ESTABLISHED, 2000)); // now CLOSE_WAIT
        agg.begin_dump();
        let outcome = agg.reconcile(
            dump(vec![
                diag(S::CLOSE_WAIT, 2000),
                diag(S::ESTABLISHED, 3000),
                diag(S::TIME_WAIT, 4000),
            ]),
            10,
            20,
            true,
        );
        assert_eq!(outcome, ReconcileOutcome { removed: 1, added: 1, repaired: 1, namespaces: 1 });
        assert_eq!(agg.corrections(), 3);
        assert_eq!(agg.reconciliations(), 1);
        let gauges = agg.table().gauges();
        assert_eq!(gauges.count(S::ESTABLISHED), 1);
        assert_eq!(gauges.count(S::CLOSE_WAIT), 1);
        assert_eq!(gauges.count(S::TIME_WAIT), 1, "sampled from the dump");
        // A second pass over the same dump finds nothing to correct.
        agg.begin_dump();
        let again = agg.reconcile(
            dump(vec![
                diag(S::CLOSE_WAIT, 2000),
                diag(S::ESTABLISHED, 3000),
                diag(S::TIME_WAIT, 4000),
            ]),
            30,
            40,
            true,
        );
        assert_eq!(again.corrections(), 0);
    }

    #[test]
    fn a_seeded_close_wait_socket_is_dated_by_the_peers_last_ack() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        let mut socket = diag(S::CLOSE_WAIT, 1000);
        socket.last_ack_ms = 90_000;
        let now = 100_000_000_000;
        agg.reconcile(dump(vec![socket]), now - 10, now, false);
        let (_, tracked) = agg.table().iter().next().unwrap();
        assert_eq!(tracked.entered_ns, now - 90_000_000_000);
        assert!(!tracked.entered_exact, "still a lower bound");
    }

    #[test]
    fn sockets_of_namespaces_not_dumped_are_kept() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        let mut other = record(A, 1, S::CLOSE, S::SYN_SENT, 0);
        other.netns = 99;
        agg.apply(other);
        agg.begin_dump();
        let outcome = agg.reconcile(dump(vec![]), 10, 20, true);
        assert_eq!(outcome.removed, 0);
        assert_eq!(agg.table().len(), 1);
    }

    #[test]
    fn a_socket_closed_while_the_dump_ran_is_not_resurrected() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.apply(record(A, 1, S::CLOSE, S::SYN_SENT, 0));
        agg.apply(record(A, 2, S::SYN_SENT, S::ESTABLISHED, 1000));
        agg.begin_dump();
        agg.apply(record(A, 15, S::ESTABLISHED, S::FIN_WAIT1, 1000));
        agg.apply(record(A, 16, S::FIN_WAIT1, S::FIN_WAIT2, 1000));
        agg.apply(record(A, 17, S::FIN_WAIT2, S::CLOSE, 1000));
        let outcome = agg.reconcile(dump(vec![diag(S::ESTABLISHED, 1000)]), 10, 20, true);
        assert_eq!(outcome.added, 0);
        assert!(agg.table().is_empty());
    }

    /// Accepted sockets reach ESTABLISHED without an owner: they wait for a look in the
    /// kernel's map, half a second on; sockets with an owner, or named meanwhile, do not.
    #[test]
    fn established_sockets_without_an_owner_are_queued_for_the_kernel_map() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.queue_unnamed_sockets();
        agg.apply(record(A, 10, S::LISTEN, S::SYN_RECV, 8080));
        agg.apply(record(A, 11, S::SYN_RECV, S::ESTABLISHED, 8080));
        agg.apply(record(A + 8, 12, S::LISTEN, S::SYN_RECV, 8080));
        agg.apply(record(A + 8, 13, S::SYN_RECV, S::ESTABLISHED, 8080));
        let mut client = record(A + 16, 14, S::SYN_SENT, S::ESTABLISHED, 40000);
        (client.owner_tgid, client.flags) = (77, client.flags | FLAG_OWNER_KNOWN);
        agg.apply(client);
        assert!(agg.take_unnamed(11 + FIRST_LOOK_AFTER_NS - 1, 10).is_empty(), "not yet due");
        agg.set_owner(A + 8, Owner { pid: 5, comm: [0; 16], cgroup: 0 });
        let due = agg.take_unnamed(14 + FIRST_LOOK_AFTER_NS, 10);
        assert_eq!(due.iter().map(|u| (u.id, u.looks)).collect::<Vec<_>>(), [(A, 0)]);
        assert!(agg.take_unnamed(u64::MAX, 10).is_empty(), "taken once");

        let mut without = Aggregator::new(100, PortLabels::none());
        without.apply(record(A, 11, S::SYN_RECV, S::ESTABLISHED, 8080));
        assert!(without.take_unnamed(u64::MAX, 10).is_empty(), "queued only when asked");
    }

    /// A full queue gives up its oldest wait, and counts it: those sockets stay unnamed.
    #[test]
    fn a_full_unnamed_queue_drops_the_oldest_and_counts_it() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        agg.queue_unnamed_sockets();
        for id in 0..MAX_UNNAMED as u64 + 3 {
            agg.queue_unnamed(Unnamed { id, due_ns: id, looks: 0 });
        }
        assert_eq!(agg.unnamed_dropped(), 3);
        assert_eq!(agg.unnamed.as_ref().map(|q| q.front().map(|u| u.id)), Some(Some(3)));
    }
}
