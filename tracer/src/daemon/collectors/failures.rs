//! Where connections fail: failed connects by reason and resets by the state they hit, since
//! start; and the same by destination and by peer over the last minute, in 10-second buckets
//! of bounded size. The top ones are served as gauges, at `/api/destinations` and in
//! `tcpstate top`.
//!
//! A reset's "peer" is the service it concerns: for a connection this side opened, the remote
//! address and port; for one a local listener accepted, the remote address and the local
//! (listening) port, since the client's own port says nothing.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use serde::{Deserialize, Serialize};
use tracer_common::TcpState;

use crate::{
    daemon::{
        core::{Diagnosis, PortLabels, Transition},
        export::family::{PortSeries, Scrape},
    },
    event::TransitionExt as _,
    failure::{CONNECT_REASONS, Failure, ResetDirection},
    netns::NamespaceListeners,
};

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

/// This diagnosis's part of `/api/destinations`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DestinationReport {
    pub window_seconds: f64,
    /// Most first, at most `TOP_DESTINATIONS`.
    pub connect_failures: Vec<ConnectFailures>,
    pub resets: Vec<Resets>,
    /// Failures in the window that no bucket had room for.
    pub uncounted: u64,
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
        DestinationReport { window_seconds: WINDOW_SECONDS, connect_failures, resets, uncounted }
    }
}

/// Failed connects and resets since start, per port label; and by destination over the last
/// minute.
pub(super) struct Failures {
    counts: Mutex<Counts>,
}

struct Counts {
    /// [label][reason], reasons in `failure::CONNECT_REASONS` order.
    connect_failures: Vec<[u64; CONNECT_REASONS.len()]>,
    /// [label][received, sent][state the reset hit]
    resets: Vec<[[u64; TcpState::INDEXES]; 2]>,
    destinations: Destinations,
}

impl Failures {
    pub(super) fn new(labels: &PortLabels) -> Self {
        let counts = Counts {
            connect_failures: vec![[0; CONNECT_REASONS.len()]; labels.values()],
            resets: vec![[[0; TcpState::INDEXES]; 2]; labels.values()],
            destinations: Destinations::default(),
        };
        Self { counts: Mutex::new(counts) }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Diagnosis for Failures {
    fn transitions(&self, batch: &[Transition]) {
        let mut counts = self.counts();
        for &Transition { record: ref r, label, .. } in batch {
            let Some(failure) = Failure::of(r.oldstate, r.newstate, r.error) else { continue };
            if r.oldstate == TcpState::SYN_SENT {
                let reason = failure.connect_slot();
                counts.connect_failures[label][reason] += 1;
                counts.destinations.connect_failed(r.ts_ns, reason, r.remote());
            } else if let Some(direction) = failure.reset() {
                counts.resets[label][direction as usize][r.oldstate.index()] += 1;
                counts.destinations.reset(r.ts_ns, direction, r.netns, r.local(), r.remote());
            }
        }
    }

    /// A reset on a listening port concerns that local service.
    fn listeners_dumped(&self, listeners: &[NamespaceListeners], _now: Instant) {
        let listening = listeners
            .iter()
            .flat_map(|ns| ns.queues.iter().map(|queue| (ns.inode, queue.local.port())))
            .collect();
        self.counts().destinations.set_listening(listening);
    }

    fn metrics(&self, encoder: &mut DescriptorEncoder, scrape: &Scrape) -> fmt::Result {
        let counts = self.counts();
        connect_failures(encoder, &counts, scrape.ports)?;
        resets(encoder, &counts, scrape.ports)?;
        by_destination(encoder, &counts.destinations.report(scrape.now))
    }

    fn destinations(&self, now_ns: u64, sections: &mut serde_json::Map<String, serde_json::Value>) {
        let report = self.counts().destinations.report(now_ns);
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(report) {
            sections.extend(fields);
        }
    }

    fn units(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("connect_failures_total", "{connection}"),
            ("resets_total", "{connection}"),
            ("connect_failures_by_destination", "{connection}"),
            ("resets_by_peer", "{connection}"),
        ]
    }
}

fn connect_failures(
    encoder: &mut DescriptorEncoder,
    counts: &Counts,
    ports: &PortSeries,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_connect_failures",
        "connect() attempts that failed (SYN_SENT -> CLOSE), by reason: refused, timeout, \
         unreachable, reset, aborted (given up by the program), other",
        None,
        MetricType::Counter,
    )?;
    for label in ports.indexes() {
        for (reason, count) in CONNECT_REASONS.iter().zip(&counts.connect_failures[label]) {
            let set = ports.with(&[("reason", (*reason).to_owned())], label);
            ConstCounter::new(*count).encode(family.encode_family(&set)?)?;
        }
    }
    Ok(())
}

fn resets(encoder: &mut DescriptorEncoder, counts: &Counts, ports: &PortSeries) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_resets",
        "Connections ended by a reset, received from the peer or sent by this host \
         (SO_LINGER 0, close() with unread data, ss -K), by the state it hit",
        None,
        MetricType::Counter,
    )?;
    for label in ports.indexes() {
        for direction in ResetDirection::ALL {
            for state in TcpState::ALL {
                let count = counts.resets[label][direction as usize][state.index()];
                if count > 0 {
                    let base =
                        [("direction", direction.name().to_owned()), ("state", state.to_string())];
                    ConstCounter::new(count)
                        .encode(family.encode_family(&ports.with(&base, label))?)?;
                }
            }
        }
    }
    Ok(())
}

/// The destinations with most failed connects, and the peers with most resets, over the
/// last minute.
fn by_destination(encoder: &mut DescriptorEncoder, report: &DestinationReport) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_connect_failures_by_destination",
        "Failed connects in the last minute to one destination address and port, for one \
         reason (as in tcpstate_connect_failures_total): the 10 with most",
        None,
        MetricType::Gauge,
    )?;
    for failures in &report.connect_failures {
        let set = [
            ("daddr", failures.address.to_string()),
            ("dport", failures.port.to_string()),
            ("reason", failures.reason.clone()),
        ];
        ConstGauge::new(failures.count as i64).encode(family.encode_family(&set)?)?;
    }
    let mut family = encoder.encode_descriptor(
        "tcpstate_resets_by_peer",
        "Connections ended by a reset in the last minute, by peer address and service port: \
         the remote port where this host connected (role client), the local listening port \
         where it accepted (role server); the 10 with most",
        None,
        MetricType::Gauge,
    )?;
    for resets in &report.resets {
        let set = [
            ("raddr", resets.peer_address.to_string()),
            ("port", resets.port.to_string()),
            ("role", resets.role.name().to_owned()),
            ("direction", resets.direction.clone()),
        ];
        ConstGauge::new(resets.count as i64).encode(family.encode_family(&set)?)?;
    }
    Ok(())
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
