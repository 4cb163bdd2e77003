//! The live socket table: every socket the daemon knows, its state, since when, and its owner;
//! per-state gauges kept in step with it.
//!
//! Sockets seen on the tracepoint are keyed by their kernel address (`skaddr`). Sockets known
//! only from a `sock_diag` dump (older than the daemon) have no address yet: they get a
//! synthetic id and are indexed by namespace and 4-tuple until their first transition names
//! them.

use foldhash::{HashMap, HashMapExt as _};

use tracer_common::TcpState;

pub(crate) use super::owner_pool::Owner;
use super::{
    gauges::{PortLabels, StateGauges},
    owner_pool::{OwnerId, OwnerPool},
};
pub(crate) use crate::socket::SocketKey;

/// What the daemon knows about one live socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Tracked {
    pub key: SocketKey,
    pub state: TcpState,
    /// When it entered `state` (CLOCK_MONOTONIC ns).
    pub entered_ns: u64,
    /// False while the socket is known only from a dump: `entered_ns` is then when the daemon
    /// first saw it in that state, a lower bound of its stay.
    pub entered_exact: bool,
    /// Last time a transition or a dump said something about it.
    pub last_seen_ns: u64,
    /// In the table's pool of owners: see `SocketTable::owner`.
    pub owner: Option<OwnerId>,
    /// Socket inode from the last dump (0 until one lists it).
    pub inode: u32,
}

/// Identifier of a table entry: the kernel address for traced sockets; below
/// `SEEDED_ID_LIMIT` for sockets known only from a dump (kernel addresses have the top bit
/// set on every 64-bit architecture Linux runs BPF on).
pub(crate) type SocketId = u64;
const SEEDED_ID_LIMIT: u64 = 1 << 62;

/// What the table takes per socket it holds: the packed entry and its share of the index.
/// `--max-sockets`' help quotes it; `cargo xtask bench` measures the whole daemon at about
/// this much per tracked socket.
pub(crate) const BYTES_PER_SOCKET: usize =
    size_of::<(SocketId, Tracked)>() + INDEX_BYTES_PER_SOCKET;
/// The index's share: a hash table of ids at its load factor (34 MB at a million sockets).
const INDEX_BYTES_PER_SOCKET: usize = 34;

/// Sockets live in a packed vector with a small index by id beside it, rather than in a hash
/// map of whole entries: a hash map's buckets double at each growth, so a million 120-byte
/// entries took 252 MB of buckets (2^21); packed, with owners pooled, they take 80 MB plus a
/// 34 MB index, and a pass over the table (each scrape, each leak check) reads only live
/// entries.
pub(crate) struct SocketTable {
    /// Where each socket's entry is in `entries`.
    index: HashMap<SocketId, u32>,
    entries: Vec<(SocketId, Tracked)>,
    owners: OwnerPool,
    seeded: HashMap<SocketKey, Vec<SocketId>>,
    next_seeded_id: SocketId,
    capacity: usize,
    gauges: StateGauges,
}

/// Sockets per port label and state.
pub(crate) type Counts = Vec<[i64; TcpState::INDEXES]>;

/// What a scrape needs from the whole table, gathered in one pass.
pub(crate) struct ScrapePass {
    /// When the longest stay in progress in each state began.
    pub oldest: [Option<u64>; TcpState::INDEXES],
    /// Sockets with a known owner, per owner cgroup id (when asked for).
    pub per_cgroup: Vec<(u64, Counts)>,
}

impl SocketTable {
    /// One pass over the entries for a scrape: at a million sockets each pass reads 80 MB,
    /// so the oldest stays and the per-cgroup counts are taken together. Neighbouring
    /// entries mostly share an owner: the last cgroup's counts are kept at hand, and the
    /// index of the others is consulted only on a change.
    pub(crate) fn scrape_pass(&self, by_cgroup: bool) -> ScrapePass {
        let labels = self.gauges.labels();
        let mut oldest = [None::<u64>; TcpState::INDEXES];
        let mut per_cgroup: Vec<(u64, Counts)> = Vec::new();
        let mut slots: HashMap<u64, usize> = HashMap::new();
        // The last owner seen, and its cgroup's slot in `per_cgroup` (None: no cgroup).
        let mut last: Option<(OwnerId, Option<usize>)> = None;
        for (_, tracked) in &self.entries {
            let entry = &mut oldest[tracked.state.index()];
            *entry = Some(entry.map_or(tracked.entered_ns, |o| o.min(tracked.entered_ns)));
            if !by_cgroup {
                continue;
            }
            let Some(owner) = tracked.owner else { continue };
            let slot = match last {
                Some((id, slot)) if id == owner => slot,
                _ => {
                    let cgroup = self.owners.get(owner).cgroup;
                    let slot = (cgroup != 0).then(|| {
                        *slots.entry(cgroup).or_insert_with(|| {
                            per_cgroup
                                .push((cgroup, vec![[0; TcpState::INDEXES]; labels.values()]));
                            per_cgroup.len() - 1
                        })
                    });
                    last = Some((owner, slot));
                    slot
                }
            };
            let Some(slot) = slot else { continue };
            per_cgroup[slot].1[labels.index(tracked.key.sport)][tracked.state.index()] += 1;
        }
        ScrapePass { oldest, per_cgroup }
    }

    pub(crate) fn new(capacity: usize, labels: PortLabels) -> Self {
        Self {
            index: HashMap::new(),
            entries: Vec::new(),
            owners: OwnerPool::default(),
            seeded: HashMap::new(),
            next_seeded_id: 1,
            capacity,
            gauges: StateGauges::new(labels),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a socket not in the table would be refused.
    pub(crate) fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    pub(crate) fn gauges(&self) -> &StateGauges {
        &self.gauges
    }

    pub(crate) fn gauges_mut(&mut self) -> &mut StateGauges {
        &mut self.gauges
    }

    pub(crate) fn get(&self, id: SocketId) -> Option<&Tracked> {
        self.index.get(&id).map(|&slot| &self.entries[slot as usize].1)
    }

    fn get_mut(&mut self, id: SocketId) -> Option<&mut Tracked> {
        self.index.get(&id).map(|&slot| &mut self.entries[slot as usize].1)
    }

    pub(crate) fn contains(&self, id: SocketId) -> bool {
        self.index.contains_key(&id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (SocketId, &Tracked)> {
        self.entries.iter().map(|(id, t)| (*id, t))
    }

    /// The owner of a socket, when known.
    pub(crate) fn owner(&self, tracked: &Tracked) -> Option<Owner> {
        tracked.owner.map(|id| self.owners.get(id))
    }

    #[cfg(test)]
    /// Owners the table refers to.
    pub(crate) fn owner_count(&self) -> usize {
        self.owners.len()
    }

    pub(crate) fn ids(&self) -> Vec<SocketId> {
        self.entries.iter().map(|(id, _)| *id).collect()
    }

    /// Takes the entry at `slot` out of `entries` (not out of the index), and its reference
    /// to its owner; the last entry moves into its place. Memory left over after a large drop
    /// goes back.
    fn take_slot(&mut self, slot: u32) -> (SocketId, Tracked) {
        let taken = self.entries.swap_remove(slot as usize);
        if let Some(owner) = taken.1.owner {
            self.owners.release(owner);
        }
        if let Some((moved, _)) = self.entries.get(slot as usize) {
            self.index.insert(*moved, slot);
        }
        let len = self.entries.len();
        if self.entries.capacity() > 4 * len.max(1024) {
            self.entries.shrink_to(2 * len);
            self.index.shrink_to(2 * len);
        }
        taken
    }

    /// Adds a socket with a reference to its owner taken for it; when the table is full,
    /// nothing changes (the reference is dropped) and the answer is false. Never evicting
    /// keeps a saturated table still: sockets it holds stay, the others are counted from
    /// dumps (see `Aggregator::reconcile`), and nothing churns.
    fn insert(&mut self, id: SocketId, tracked: Tracked, ts: u64) -> bool {
        if self.is_full() && !self.contains(id) {
            if let Some(owner) = tracked.owner {
                self.owners.release(owner);
            }
            return false;
        }
        self.gauges.add(tracked.key.sport, tracked.state, 1, ts);
        if id < SEEDED_ID_LIMIT {
            self.seeded.entry(tracked.key).or_default().push(id);
        }
        if let Some(existing) = self.get_mut(id) {
            let previous = std::mem::replace(existing, tracked);
            self.gauges.add(previous.key.sport, previous.state, -1, ts);
            if let Some(owner) = previous.owner {
                self.owners.release(owner);
            }
        } else {
            let slot = u32::try_from(self.entries.len()).expect("capacity below 2^32");
            self.index.insert(id, slot);
            self.entries.push((id, tracked));
        }
        true
    }

    /// Adds a socket known only from a dump, in `state` since at least `entered_ns`.
    pub(crate) fn insert_seeded(
        &mut self,
        key: SocketKey,
        state: TcpState,
        inode: u32,
        entered_ns: u64,
        now: u64,
    ) -> bool {
        let id = self.next_seeded_id;
        self.next_seeded_id += 1;
        let tracked = Tracked {
            key,
            state,
            entered_ns,
            entered_exact: false,
            last_seen_ns: now,
            owner: None,
            inode,
        };
        self.insert(id, tracked, now)
    }

    pub(crate) fn remove(&mut self, id: SocketId, ts: u64) -> Option<Tracked> {
        let slot = self.index.remove(&id)?;
        let (_, tracked) = self.take_slot(slot);
        self.gauges.add(tracked.key.sport, tracked.state, -1, ts);
        if id < SEEDED_ID_LIMIT {
            self.unindex_seeded(&tracked.key, id);
        }
        Some(tracked)
    }

    fn unindex_seeded(&mut self, key: &SocketKey, id: SocketId) {
        if let Some(ids) = self.seeded.get_mut(key) {
            ids.retain(|&other| other != id);
            if ids.is_empty() {
                self.seeded.remove(key);
            }
        }
    }

    /// Gives a socket known only from a dump the kernel address a transition revealed.
    /// Returns whether there was one with that key.
    pub(crate) fn adopt_seeded(&mut self, key: &SocketKey, skaddr: SocketId) -> bool {
        let Some(id) = self.seeded.get(key).and_then(|ids| ids.first().copied()) else {
            return false;
        };
        self.unindex_seeded(key, id);
        if let Some(slot) = self.index.remove(&id) {
            self.entries[slot as usize].0 = skaddr;
            // An entry under that address already (callers check there is none) is replaced.
            if let Some(replaced) = self.index.insert(skaddr, slot) {
                self.take_slot(replaced);
            }
        }
        true
    }

    /// Drops a dump-only entry with this key: the socket is tracked under its address already.
    pub(crate) fn drop_seeded_duplicate(&mut self, key: &SocketKey, ts: u64) -> bool {
        match self.seeded.get(key).and_then(|ids| ids.first().copied()) {
            Some(id) => self.remove(id, ts).is_some(),
            None => false,
        }
    }

    /// Moves socket `id` to `state` at `ts`, with a new key (ports fill in as a socket
    /// connects), recording an owner when one is given. Creates the entry when absent; false
    /// when it is absent and the table is full.
    pub(crate) fn enter_state(
        &mut self,
        id: SocketId,
        key: SocketKey,
        state: TcpState,
        ts: u64,
        owner: Option<Owner>,
    ) -> bool {
        match self.index.get(&id).map(|&slot| &mut self.entries[slot as usize].1) {
            Some(tracked) => {
                self.gauges.add(tracked.key.sport, tracked.state, -1, ts);
                self.gauges.add(key.sport, state, 1, ts);
                tracked.key = key;
                // A move to the state it is in (close() after shutdown()) continues the stay.
                if tracked.state != state {
                    tracked.state = state;
                    tracked.entered_ns = ts;
                    tracked.entered_exact = true;
                }
                tracked.last_seen_ns = ts;
                if let Some(owner) = owner {
                    self.set_owner(id, owner);
                }
                true
            }
            None => {
                let tracked = Tracked {
                    key,
                    state,
                    entered_ns: ts,
                    entered_exact: true,
                    last_seen_ns: ts,
                    owner: owner.map(|owner| self.owners.acquire(owner)),
                    inode: 0,
                };
                self.insert(id, tracked, ts)
            }
        }
    }

    /// Sets the gauges of `states` to what the table holds (after a saturation ended).
    pub(crate) fn recount_gauges(&mut self, states: &[TcpState], ts: u64) {
        let labels = self.gauges.labels().clone();
        for &state in states {
            let mut per_label = vec![0i64; labels.values()];
            for (_, tracked) in self.entries.iter().filter(|(_, t)| t.state == state) {
                per_label[labels.index(tracked.key.sport)] += 1;
            }
            self.gauges.set_counts(state, &per_label, ts);
        }
    }

    /// Repairs a socket's state from a dump: in `state` since at least `entered_ns`.
    pub(crate) fn repair_state(
        &mut self,
        id: SocketId,
        state: TcpState,
        entered_ns: u64,
        now: u64,
    ) {
        if let Some(&slot) = self.index.get(&id) {
            let tracked = &mut self.entries[slot as usize].1;
            self.gauges.add(tracked.key.sport, tracked.state, -1, now);
            self.gauges.add(tracked.key.sport, state, 1, now);
            tracked.state = state;
            tracked.entered_ns = entered_ns;
            tracked.entered_exact = false;
            tracked.last_seen_ns = now;
        }
    }

    pub(crate) fn set_owner(&mut self, id: SocketId, owner: Owner) {
        let Some(&slot) = self.index.get(&id) else { return };
        let current = self.entries[slot as usize].1.owner;
        if current.is_some_and(|current| self.owners.get(current) == owner) {
            return;
        }
        if let Some(current) = current {
            self.owners.release(current);
        }
        self.entries[slot as usize].1.owner = Some(self.owners.acquire(owner));
    }

    pub(crate) fn set_inode(&mut self, id: SocketId, inode: u32) {
        if let Some(tracked) = self.get_mut(id) {
            tracked.inode = inode;
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::record::AF_INET;

    use super::*;

    fn key(sport: u16) -> SocketKey {
        SocketKey {
            netns: 1,
            family: AF_INET,
            sport,
            dport: 80,
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    const EST: TcpState = TcpState::ESTABLISHED;
    const CW: TcpState = TcpState::CLOSE_WAIT;
    const SKADDR: u64 = 0xffff_8880_0000_1000;

    /// Inserts, removals in scattered order, adoptions and a large drop keep the packed
    /// entries and their index in step with what a plain map would hold.
    #[test]
    fn the_packed_table_agrees_with_a_plain_map() {
        let mut table = SocketTable::new(100_000, PortLabels::none());
        let mut expected: HashMap<SocketId, u16> = HashMap::new();
        let mut next = 7u64;
        let mut random = move || {
            next = next.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            next >> 33
        };
        for round in 0..20_000u64 {
            let id = SKADDR + (random() % 5_000) * 64;
            let port = (round % 60_000) as u16 + 1;
            match random() % 4 {
                0 | 1 => {
                    assert!(table.enter_state(id, key(port), EST, round, None));
                    expected.insert(id, port);
                }
                2 => assert_eq!(table.remove(id, round).is_some(), expected.remove(&id).is_some()),
                _ => {
                    let seeded_key = key(port);
                    assert!(table.insert_seeded(seeded_key, CW, 1, round, round));
                    let new_id = SKADDR + (5_000 + round) * 64;
                    assert!(table.adopt_seeded(&seeded_key, new_id));
                    expected.insert(new_id, port);
                }
            }
        }
        let check = |table: &SocketTable, expected: &HashMap<SocketId, u16>| {
            assert_eq!(table.len(), expected.len());
            for (&id, &port) in expected {
                assert_eq!(table.get(id).map(|t| t.key.sport), Some(port), "{id:#x}");
            }
            let mut listed: Vec<SocketId> = table.iter().map(|(id, _)| id).collect();
            listed.sort_unstable();
            let mut ids: Vec<SocketId> = expected.keys().copied().collect();
            ids.sort_unstable();
            assert_eq!(listed, ids);
        };
        check(&table, &expected);
        let all: Vec<SocketId> = expected.keys().copied().collect();
        for id in all.iter().skip(10) {
            assert!(table.remove(*id, 1).is_some());
            expected.remove(id);
        }
        check(&table, &expected);
        assert!(table.entries.capacity() <= 4 * 1024, "memory returned after a large drop");
    }

    #[test]
    fn a_scrape_pass_finds_the_oldest_stays_and_counts_per_cgroup() {
        let mut table = SocketTable::new(100, PortLabels::none());
        let owner = |cgroup| Some(Owner { pid: 1, comm: [0; 16], cgroup });
        // Interleaved owners, and sockets without one (or without a cgroup).
        let sockets = [(7, EST, 50), (7, EST, 40), (9, CW, 30), (7, CW, 60), (0, EST, 20)];
        for (i, (cgroup, state, entered)) in sockets.into_iter().enumerate() {
            let id = SKADDR + i as u64 * 64;
            let owner = if cgroup == 0 { None } else { owner(cgroup) };
            table.enter_state(id, key(1000 + i as u16), state, entered, owner);
        }
        table.enter_state(SKADDR + 640, key(2000), EST, 10, owner(0));
        let pass = table.scrape_pass(true);
        assert_eq!(pass.oldest[EST.index()], Some(10));
        assert_eq!(pass.oldest[CW.index()], Some(30));
        assert_eq!(pass.oldest[TcpState::LISTEN.index()], None);
        let count = |cgroup, state: TcpState| {
            let (_, counts) = pass.per_cgroup.iter().find(|(c, _)| *c == cgroup).unwrap();
            counts[0][state.index()]
        };
        assert_eq!((count(7, EST), count(7, CW), count(9, CW), count(9, EST)), (2, 1, 1, 0));
        assert_eq!(pass.per_cgroup.len(), 2, "no entry for unknown or zero cgroups");
        assert!(table.scrape_pass(false).per_cgroup.is_empty());
    }

    /// A million sockets take 80 MB of entries; a field added here costs a megabyte a byte.
    #[test]
    fn an_entry_takes_80_bytes() {
        assert_eq!(std::mem::size_of::<(SocketId, Tracked)>(), 80);
    }

    #[test]
    fn owners_are_stored_once_and_forgotten_with_their_sockets() {
        let mut table = SocketTable::new(4, PortLabels::none());
        let server = Owner { pid: 1, comm: *b"server\0\0\0\0\0\0\0\0\0\0", cgroup: 5 };
        let other = Owner { pid: 2, ..server };
        for i in 0..4u64 {
            table.enter_state(SKADDR + i * 64, key(1000 + i as u16), EST, 1, Some(server));
        }
        assert_eq!(table.owner_count(), 1);
        assert!(!table.enter_state(SKADDR + 640, key(9), EST, 1, Some(other)), "full");
        assert_eq!(table.owner_count(), 1, "a refused socket keeps no owner");
        table.set_owner(SKADDR, other);
        table.enter_state(SKADDR + 64, key(1001), CW, 2, Some(other));
        assert_eq!(table.owner_count(), 2);
        assert_eq!(table.owner(table.get(SKADDR).unwrap()), Some(other));
        assert_eq!(table.owner(table.get(SKADDR + 128).unwrap()), Some(server));
        for i in 0..4u64 {
            assert!(table.remove(SKADDR + i * 64, 3).is_some());
        }
        assert_eq!(table.owner_count(), 0);
    }

    #[test]
    fn gauges_follow_state_changes_and_removal() {
        let mut table = SocketTable::new(10, PortLabels::none());
        table.enter_state(SKADDR, key(1000), EST, 10, None);
        assert_eq!(table.gauges().count(EST), 1);
        table.enter_state(SKADDR, key(1000), CW, 20, None);
        assert_eq!((table.gauges().count(EST), table.gauges().count(CW)), (0, 1));
        assert!(table.remove(SKADDR, 30).is_some());
        assert_eq!(table.gauges().count(CW), 0);
        assert!(table.is_empty());
    }

    #[test]
    fn seeded_sockets_are_adopted_by_key_without_double_counting() {
        let mut table = SocketTable::new(10, PortLabels::none());
        table.insert_seeded(key(1000), EST, 77, 5, 5);
        assert_eq!(table.gauges().count(EST), 1);
        assert!(table.adopt_seeded(&key(1000), SKADDR));
        assert_eq!(table.gauges().count(EST), 1);
        let tracked = table.get(SKADDR).unwrap();
        assert!(!tracked.entered_exact);
        assert_eq!(tracked.inode, 77);
        table.enter_state(SKADDR, key(1000), CW, 9, None);
        assert_eq!((table.gauges().count(EST), table.gauges().count(CW)), (0, 1));
        assert!(table.get(SKADDR).unwrap().entered_exact);
        assert!(!table.adopt_seeded(&key(1000), SKADDR + 8), "adopted once only");
    }

    #[test]
    fn a_full_table_refuses_newcomers_and_keeps_what_it_holds() {
        let mut table = SocketTable::new(2, PortLabels::none());
        assert!(table.enter_state(SKADDR, key(1), EST, 1, None));
        assert!(table.enter_state(SKADDR + 8, key(2), EST, 1, None));
        assert!(!table.enter_state(SKADDR + 16, key(3), EST, 1, None));
        assert!(table.enter_state(SKADDR, key(1), CW, 2, None), "held sockets still move");
        assert_eq!(table.len(), 2);
        assert!(table.contains(SKADDR) && table.contains(SKADDR + 8));
        assert_eq!((table.gauges().count(EST), table.gauges().count(CW)), (1, 1));
    }

    #[test]
    fn duplicates_of_a_traced_socket_are_dropped() {
        let mut table = SocketTable::new(10, PortLabels::none());
        table.insert_seeded(key(1000), EST, 0, 5, 5);
        table.enter_state(SKADDR, key(1000), EST, 6, None);
        assert_eq!(table.gauges().count(EST), 2);
        assert!(table.drop_seeded_duplicate(&key(1000), 7));
        assert_eq!(table.gauges().count(EST), 1);
        assert_eq!(table.len(), 1);
    }
}
