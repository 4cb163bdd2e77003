//! Where connections fail: failed connects by destination and reason, and resets by peer,
//! counted over the last minute in 10-second buckets of bounded size, and retransmits by
//! destination, from the kernel's counts read every few seconds. The top ones are served as
//! gauges, at `/api/destinations` and in `tcpstate top`.
//!
//! A reset's "peer" is the service it concerns: for a connection this side opened, the remote
//! address and port; for one a local listener accepted, the remote address and the local
//! (listening) port, since the client's own port says nothing.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::failure::{CONNECT_REASONS, ResetDirection};

/// How far back the counts go, in seconds: six 10-second buckets, the current one filling.
pub(crate) const WINDOW_SECONDS: f64 = (BUCKET_NS * BUCKETS as u64 / 1_000_000_000) as f64;
const BUCKET_NS: u64 = 10_000_000_000;
const BUCKETS: usize = 6;
/// Distinct keys one bucket holds: a scan of thousands of closed ports must not grow memory.
/// Failures beyond are counted in `uncounted` only.
const MAX_KEYS: usize = 4096;
/// Destinations served of each kind.
pub(crate) const TOP_DESTINATIONS: usize = 10;

/// Which side opened the connection a reset ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// This side connected: the peer is the remote service.
    Client,
    /// A local listener accepted it: the port is the local service's.
    Server,
}

impl Role {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A failed connect: its reason's index in `CONNECT_REASONS`.
    Connect {
        reason: usize,
        to: SocketAddr,
    },
    Reset {
        direction: ResetDirection,
        role: Role,
        peer: IpAddr,
        port: u16,
    },
}

/// Failed connects to one destination for one reason, over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConnectFailures {
    pub address: IpAddr,
    pub port: u16,
    pub reason: String,
    pub count: u64,
}

/// Resets of connections with one peer and service port, one way, over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Resets {
    pub peer_address: IpAddr,
    pub port: u16,
    pub role: Role,
    pub direction: String,
    pub count: u64,
}

/// Retransmitted segments to one destination, over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RetransmitsTo {
    pub address: IpAddr,
    pub port: u16,
    pub count: u64,
}

/// What `/api/destinations` serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DestinationReport {
    pub window_seconds: f64,
    /// Most first, at most `TOP_DESTINATIONS`.
    pub connect_failures: Vec<ConnectFailures>,
    pub resets: Vec<Resets>,
    /// Failures in the window that no bucket had room for.
    pub uncounted: u64,
    /// Most first, at most `TOP_DESTINATIONS`; empty where the retransmit counters do not run.
    pub retransmits: Vec<RetransmitsTo>,
    /// Retransmits in the window the kernel's destination map had no room for.
    pub retransmits_unlisted: u64,
}

/// The kernel's retransmit counts by destination at one moment (since attach).
#[derive(Clone, Debug, Default)]
struct RetransmitSnapshot {
    at_ns: u64,
    by_destination: HashMap<SocketAddr, u64>,
    unlisted: u64,
}

#[derive(Default)]
struct Bucket {
    /// Which 10-second interval since boot it counts.
    epoch: u64,
    counts: HashMap<Key, u64>,
    uncounted: u64,
}

/// The last minute's failures by destination.
#[derive(Default)]
pub(crate) struct Destinations {
    buckets: [Bucket; BUCKETS],
    /// Ports listeners listen on, per namespace: a reset socket on one of them was accepted.
    listening: HashSet<(u32, u16)>,
    /// Snapshots at least `BUCKET_NS` apart, oldest first: the first is the window's start
    /// (at attach, all zero, until the daemon is a minute old).
    retransmit_history: VecDeque<RetransmitSnapshot>,
    /// The latest snapshot.
    retransmits_now: RetransmitSnapshot,
}

impl Destinations {
    /// Replaces the set of listening ports (namespace, port), from the latest listener dump.
    pub(crate) fn set_listening(&mut self, listening: HashSet<(u32, u16)>) {
        self.listening = listening;
    }

    pub(crate) fn connect_failed(&mut self, at_ns: u64, reason: usize, to: SocketAddr) {
        self.count(at_ns, Key::Connect { reason, to });
    }

    pub(crate) fn reset(
        &mut self,
        at_ns: u64,
        direction: ResetDirection,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
    ) {
        let accepted = self.listening.contains(&(netns, local.port()));
        let (role, port) =
            if accepted { (Role::Server, local.port()) } else { (Role::Client, remote.port()) };
        self.count(at_ns, Key::Reset { direction, role, peer: remote.ip(), port });
    }

    /// The kernel's retransmit counts by destination, read at `at_ns`.
    pub(crate) fn retransmits_read(
        &mut self,
        at_ns: u64,
        by_destination: Vec<(SocketAddr, u64)>,
        unlisted: u64,
    ) {
        let by_destination = by_destination.into_iter().collect();
        let snapshot = RetransmitSnapshot { at_ns, by_destination, unlisted };
        if self.retransmit_history.is_empty() {
            self.retransmit_history.push_back(RetransmitSnapshot::default());
        }
        let last = self.retransmit_history.back().map_or(0, |s| s.at_ns);
        if at_ns.saturating_sub(last) >= BUCKET_NS {
            self.retransmit_history.push_back(snapshot.clone());
        }
        // The window starts at the newest snapshot at least a window old.
        let window_ns = BUCKET_NS * BUCKETS as u64;
        while self
            .retransmit_history
            .get(1)
            .is_some_and(|next| at_ns.saturating_sub(next.at_ns) >= window_ns)
        {
            self.retransmit_history.pop_front();
        }
        self.retransmits_now = snapshot;
    }

    /// Retransmits per destination since the window's start, most first.
    fn retransmits(&self) -> (Vec<RetransmitsTo>, u64) {
        let Some(start) = self.retransmit_history.front() else { return (Vec::new(), 0) };
        let now = &self.retransmits_now;
        let mut found: Vec<RetransmitsTo> = now
            .by_destination
            .iter()
            .map(|(to, &count)| {
                // Lower than at the start: evicted from the kernel's map and counted again
                // from 0 since.
                let before = start.by_destination.get(to).copied().unwrap_or(0);
                let count = if count >= before { count - before } else { count };
                RetransmitsTo { address: to.ip(), port: to.port(), count }
            })
            .filter(|to| to.count > 0)
            .collect();
        found.sort_by(|a, b| {
            b.count.cmp(&a.count).then_with(|| (a.address, a.port).cmp(&(b.address, b.port)))
        });
        found.truncate(TOP_DESTINATIONS);
        (found, now.unlisted.saturating_sub(start.unlisted))
    }

    fn count(&mut self, at_ns: u64, key: Key) {
        let epoch = at_ns / BUCKET_NS;
        let bucket = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if bucket.epoch != epoch {
            if epoch < bucket.epoch {
                // Older than the window this slot now counts: out of it already.
                return;
            }
            *bucket = Bucket { epoch, ..Bucket::default() };
        }
        let room = bucket.counts.len() < MAX_KEYS;
        match bucket.counts.get_mut(&key) {
            Some(count) => *count += 1,
            None if room => {
                bucket.counts.insert(key, 1);
            }
            None => bucket.uncounted += 1,
        }
    }

    /// The window ending at `now_ns`: the bucket it falls in and the five before.
    pub(crate) fn report(&self, now_ns: u64) -> DestinationReport {
        let current = now_ns / BUCKET_NS;
        let mut sums: HashMap<Key, u64> = HashMap::new();
        let mut uncounted = 0;
        for bucket in
            self.buckets.iter().filter(|b| current.saturating_sub(b.epoch) < BUCKETS as u64)
        {
            if bucket.counts.is_empty() && bucket.uncounted == 0 {
                continue;
            }
            uncounted += bucket.uncounted;
            for (key, count) in &bucket.counts {
                *sums.entry(*key).or_default() += count;
            }
        }
        let mut connect_failures = Vec::new();
        let mut resets = Vec::new();
        for (key, count) in sums {
            match key {
                Key::Connect { reason, to } => connect_failures.push(ConnectFailures {
                    address: to.ip(),
                    port: to.port(),
                    reason: CONNECT_REASONS[reason].to_owned(),
                    count,
                }),
                Key::Reset { direction, role, peer, port } => resets.push(Resets {
                    peer_address: peer,
                    port,
                    role,
                    direction: direction.name().to_owned(),
                    count,
                }),
            }
        }
        // Most first; ties in a stable order, so the series do not swap between scrapes.
        connect_failures.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| (a.address, a.port, &a.reason).cmp(&(b.address, b.port, &b.reason)))
        });
        resets.sort_by(|a, b| {
            b.count.cmp(&a.count).then_with(|| {
                (a.peer_address, a.port, a.role, &a.direction).cmp(&(
                    b.peer_address,
                    b.port,
                    b.role,
                    &b.direction,
                ))
            })
        });
        connect_failures.truncate(TOP_DESTINATIONS);
        resets.truncate(TOP_DESTINATIONS);
        let (retransmits, retransmits_unlisted) = self.retransmits();
        DestinationReport {
            window_seconds: WINDOW_SECONDS,
            connect_failures,
            resets,
            uncounted,
            retransmits,
            retransmits_unlisted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn addr(last: u8, port: u16) -> SocketAddr {
        ([10, 0, 0, last], port).into()
    }

    #[test]
    fn the_top_destinations_of_the_last_minute_most_first() {
        let mut d = Destinations::default();
        let start = 1000 * SECOND;
        for i in 0..5 {
            d.connect_failed(start + i * SECOND, 0, addr(9, 5432));
        }
        d.connect_failed(start, 1, addr(9, 5432));
        d.connect_failed(start, 1, addr(9, 5432));
        for port in 0..20 {
            d.connect_failed(start, 0, addr(8, 1000 + port));
        }
        let report = d.report(start + 5 * SECOND);
        assert_eq!(report.connect_failures.len(), TOP_DESTINATIONS);
        let first = &report.connect_failures[0];
        assert_eq!(
            (first.address, first.port, first.reason.as_str(), first.count),
            (addr(9, 0).ip(), 5432, "refused", 5)
        );
        assert_eq!(report.connect_failures[1].reason, "timeout");
        // A minute later they have left the window.
        assert!(d.report(start + 70 * SECOND).connect_failures.is_empty());
    }

    #[test]
    fn a_reset_on_a_listening_port_names_the_local_service() {
        let mut d = Destinations::default();
        d.set_listening(HashSet::from([(7, 8080)]));
        let now = 100 * SECOND;
        // A client of our :8080 reset us; we reset an upstream's :443.
        d.reset(now, ResetDirection::Received, 7, addr(1, 8080), addr(2, 51234));
        d.reset(now, ResetDirection::Sent, 7, addr(1, 40000), addr(3, 443));
        // The same port in another namespace is not that listener.
        d.reset(now, ResetDirection::Received, 8, addr(1, 8080), addr(2, 51234));
        let resets = d.report(now).resets;
        let found: Vec<_> =
            resets.iter().map(|r| (r.peer_address, r.port, r.role, r.direction.as_str())).collect();
        assert!(found.contains(&(addr(2, 0).ip(), 8080, Role::Server, "received")), "{found:?}");
        assert!(found.contains(&(addr(3, 0).ip(), 443, Role::Client, "sent")), "{found:?}");
        assert!(found.contains(&(addr(2, 0).ip(), 51234, Role::Client, "received")), "{found:?}");
    }

    #[test]
    fn retransmits_count_from_the_newest_snapshot_a_minute_old() {
        let mut d = Destinations::default();
        let (a, b) = (addr(1, 443), addr(2, 80));
        // Since attach, until the daemon is a minute old.
        d.retransmits_read(5 * SECOND, vec![(a, 3)], 0);
        let report = d.report(5 * SECOND);
        assert_eq!((report.retransmits[0].address, report.retransmits[0].count), (a.ip(), 3));
        for t in (10..=70).step_by(5) {
            d.retransmits_read(t * SECOND, vec![(a, 3 + t), (b, 1)], 2);
        }
        // At 70 s the window starts at the snapshot of 10 s: a grew by 60, b not at all.
        let report = d.report(70 * SECOND);
        let found: Vec<_> = report.retransmits.iter().map(|r| (r.port, r.count)).collect();
        assert_eq!(found, [(443, 60)]);
        assert_eq!(report.retransmits_unlisted, 0);
        // Evicted and back: counted from 0 again.
        d.retransmits_read(75 * SECOND, vec![(a, 4)], 2);
        assert_eq!(d.report(75 * SECOND).retransmits[0].count, 4);
    }

    #[test]
    fn a_bucket_holds_a_bounded_number_of_destinations() {
        let mut d = Destinations::default();
        let now = 100 * SECOND;
        for i in 0..MAX_KEYS as u64 + 10 {
            d.connect_failed(now, 0, ([10, 1, (i >> 8) as u8, i as u8], 80).into());
        }
        let report = d.report(now);
        assert_eq!(report.uncounted, 10);
        assert_eq!(d.buckets.iter().map(|b| b.counts.len()).sum::<usize>(), MAX_KEYS);
    }
}
