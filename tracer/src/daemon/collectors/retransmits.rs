//! Segments sent again: the kernel's counters by the state of the socket that sent them (and
//! by port label), read each second; and by destination over about the last minute, from the
//! kernel's per-destination map walked every 5 s, a snapshot kept every 10 s.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, MutexGuard, PoisonError},
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use serde::Serialize;
use tracer_common::TcpState;

use crate::{
    daemon::{
        core::Diagnosis,
        export::family::{PortSeries, Scrape, counter},
    },
    probe::{self, Probe},
};

/// A snapshot of the kernel's counts by destination is kept this often; six make the window.
const BUCKET_NS: u64 = 10_000_000_000;
const BUCKETS: usize = 6;
/// Destinations served.
const TOP_DESTINATIONS: usize = 10;
/// How often the kernel's map of destinations is walked (two system calls per destination
/// that retransmitted).
const DESTINATION_READ_NS: u64 = 5_000_000_000;

#[derive(Default)]
pub(super) struct Retransmits {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The kernel's counters, where they run.
    counts: Option<probe::Retransmits>,
    by_destination: ByDestination,
    /// When the destinations were last read (CLOCK_MONOTONIC ns), if ever.
    destinations_read_ns: Option<u64>,
}

impl Retransmits {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
impl Retransmits {
    /// As after one read of `counts` and of the destinations at `at_ns`.
    pub(super) fn known(
        counts: probe::Retransmits,
        at_ns: u64,
        destinations: Vec<(SocketAddr, u64)>,
    ) -> Self {
        let mut by_destination = ByDestination::default();
        by_destination.read(at_ns, destinations, 0);
        let state =
            State { counts: Some(counts), by_destination, destinations_read_ns: Some(at_ns) };
        Self { state: Mutex::new(state) }
    }
}

impl Diagnosis for Retransmits {
    fn kernel_counters(&self, probe: &Probe, now_ns: u64) -> Result<(), String> {
        let counts = probe.retransmits().map_err(|error| format!("{error:#}"))?;
        let mut state = self.state();
        let unlisted = counts.as_ref().and_then(|r| r.by_label.first()).map_or(0, |s| s.unlisted);
        state.counts = counts;
        if state
            .destinations_read_ns
            .is_some_and(|at| now_ns.saturating_sub(at) < DESTINATION_READ_NS)
        {
            return Ok(());
        }
        state.destinations_read_ns = Some(now_ns);
        match probe.retransmit_destinations() {
            Ok(Some(by_destination)) => state.by_destination.read(now_ns, by_destination, unlisted),
            Ok(None) => {}
            // The previous read stays; the per-state counters report the map's trouble.
            Err(error) => log::debug!("retransmits by destination not read: {error:#}"),
        }
        Ok(())
    }

    /// Absent where the kernel's counters do not run: a 0 would claim nothing was sent again.
    fn metrics(&self, encoder: &mut DescriptorEncoder, scrape: &Scrape) -> fmt::Result {
        let state = self.state();
        let Some(counts) = &state.counts else { return Ok(()) };
        counters(encoder, counts, scrape.ports)?;
        let (top, _) = state.by_destination.top();
        by_destination(encoder, &top)
    }

    fn destinations(
        &self,
        _now_ns: u64,
        sections: &mut serde_json::Map<String, serde_json::Value>,
    ) {
        let (top, unlisted) = self.state().by_destination.top();
        sections.insert("retransmits".to_owned(), serde_json::to_value(top).unwrap_or_default());
        sections.insert("retransmits_unlisted".to_owned(), unlisted.into());
    }

    fn units(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("retransmits_total", "{segment}"),
            ("retransmits_by_destination", "{segment}"),
            ("synack_retransmits_total", "{segment}"),
            ("retransmits_failed_total", "{segment}"),
            ("retransmits_missed_total", "{segment}"),
        ]
    }
}

/// Retransmitted segments to one destination, over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct RetransmitsTo {
    pub address: IpAddr,
    pub port: u16,
    pub count: u64,
}

/// The kernel's retransmit counts by destination at one moment (since attach).
#[derive(Clone, Debug, Default)]
struct RetransmitSnapshot {
    at_ns: u64,
    by_destination: HashMap<SocketAddr, u64>,
    unlisted: u64,
}

/// The last minute's retransmits by destination.
#[derive(Default)]
struct ByDestination {
    /// Snapshots at least `BUCKET_NS` apart, oldest first: the first is the window's start
    /// (at attach, all zero, until the daemon is a minute old).
    history: VecDeque<RetransmitSnapshot>,
    /// The latest snapshot.
    now: RetransmitSnapshot,
}

impl ByDestination {
    /// The kernel's retransmit counts by destination, read at `at_ns`.
    fn read(&mut self, at_ns: u64, by_destination: Vec<(SocketAddr, u64)>, unlisted: u64) {
        let by_destination = by_destination.into_iter().collect();
        let snapshot = RetransmitSnapshot { at_ns, by_destination, unlisted };
        if self.history.is_empty() {
            self.history.push_back(RetransmitSnapshot::default());
        }
        let last = self.history.back().map_or(0, |s| s.at_ns);
        if at_ns.saturating_sub(last) >= BUCKET_NS {
            self.history.push_back(snapshot.clone());
        }
        // The window starts at the newest snapshot at least a window old.
        let window_ns = BUCKET_NS * BUCKETS as u64;
        while self.history.get(1).is_some_and(|next| at_ns.saturating_sub(next.at_ns) >= window_ns)
        {
            self.history.pop_front();
        }
        self.now = snapshot;
    }

    /// Retransmits per destination since the window's start, most first.
    fn top(&self) -> (Vec<RetransmitsTo>, u64) {
        let Some(start) = self.history.front() else { return (Vec::new(), 0) };
        let now = &self.now;
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
}

/// States a socket sends segments again in; their series are always there, others' once seen.
const RETRANSMITTING_STATES: [TcpState; 7] = [
    TcpState::ESTABLISHED,
    TcpState::SYN_SENT,
    TcpState::SYN_RECV,
    TcpState::FIN_WAIT1,
    TcpState::CLOSE_WAIT,
    TcpState::LAST_ACK,
    TcpState::CLOSING,
];

/// Retransmits the kernel counted, where its counters run (absent otherwise: a 0 would claim
/// that nothing was retransmitted).
fn counters(
    encoder: &mut DescriptorEncoder,
    retransmits: &probe::Retransmits,
    ports: &PortSeries,
) -> fmt::Result {
    let by_label = |label: usize| retransmits.by_label.get(label).copied().unwrap_or_default();
    let mut family = encoder.encode_descriptor(
        "tcpstate_retransmits",
        "Segments sent again, by the state of the socket that sent them: SYN_SENT are SYN \
         retries (slow or failing connects), ESTABLISHED data loss, FIN_WAIT1 a FIN the peer \
         does not acknowledge",
        None,
        MetricType::Counter,
    )?;
    for label in ports.indexes() {
        let counts = by_label(label);
        for (number, &count) in counts.by_state.iter().enumerate() {
            let state = TcpState::from_kernel(number as u8);
            if count == 0 && !RETRANSMITTING_STATES.contains(&state) {
                continue;
            }
            let set = ports.with(&[("state", state.to_string())], label);
            ConstCounter::new(count).encode(family.encode_family(&set)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "tcpstate_synack_retransmits",
        "SYN-ACKs a listener sent again: the handshake's final ACK did not come",
        None,
        MetricType::Counter,
    )?;
    if ports.labelled() {
        for label in ports.indexes() {
            let set = ports.with(&[], label);
            ConstCounter::new(by_label(label).synack).encode(family.encode_family(&set)?)?;
        }
    } else {
        ConstCounter::new(by_label(0).synack).encode(family)?;
    }
    let failed = retransmits.by_label.iter().map(|counts| counts.failed).sum();
    counter(
        encoder,
        "tcpstate_retransmits_failed",
        "Retransmits that could not be sent (newer kernels report them); not in \
         tcpstate_retransmits_total",
        failed,
    )?;
    counter(
        encoder,
        "tcpstate_retransmits_missed",
        "Retransmits not counted: the kernel skipped the counter because it already ran on \
         that CPU (counted by the kernels that skip it)",
        retransmits.missed,
    )
}

/// The destinations with most retransmits over about the last minute.
fn by_destination(encoder: &mut DescriptorEncoder, top: &[RetransmitsTo]) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_retransmits_by_destination",
        "Segments retransmitted in about the last minute to one destination address and port, \
         counted in the kernel: the 10 with most",
        None,
        MetricType::Gauge,
    )?;
    for retransmits in top {
        let set =
            [("daddr", retransmits.address.to_string()), ("dport", retransmits.port.to_string())];
        ConstGauge::new(retransmits.count as i64).encode(family.encode_family(&set)?)?;
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
    fn retransmits_count_from_the_newest_snapshot_a_minute_old() {
        let mut d = ByDestination::default();
        let (a, b) = (addr(1, 443), addr(2, 80));
        // Since attach, until the daemon is a minute old.
        d.read(5 * SECOND, vec![(a, 3)], 0);
        let (top, _) = d.top();
        assert_eq!((top[0].address, top[0].count), (a.ip(), 3));
        for t in (10..=70).step_by(5) {
            d.read(t * SECOND, vec![(a, 3 + t), (b, 1)], 2);
        }
        // At 70 s the window starts at the snapshot of 10 s: a grew by 60, b not at all.
        let (top, unlisted) = d.top();
        let found: Vec<_> = top.iter().map(|r| (r.port, r.count)).collect();
        assert_eq!(found, [(443, 60)]);
        assert_eq!(unlisted, 0);
        // Evicted and back: counted from 0 again.
        d.read(75 * SECOND, vec![(a, 4)], 2);
        assert_eq!(d.top().0[0].count, 4);
    }
}
