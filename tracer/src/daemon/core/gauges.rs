//! Sockets per state (optionally per chosen local port) and the time integral of those counts:
//! the socket-seconds spent in each state, for sockets that left it and for those still in it.

use tracer_common::TcpState;

/// The `port` label: configured local ports, everything else "other". Index 0 is "other".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PortLabels {
    ports: Vec<u16>,
}

impl PortLabels {
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Self::default()
    }

    pub(crate) fn new(mut ports: Vec<u16>) -> Self {
        ports.sort_unstable();
        ports.dedup();
        Self { ports }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.ports.is_empty()
    }

    /// Number of label values (configured ports plus "other").
    pub(crate) fn values(&self) -> usize {
        self.ports.len() + 1
    }

    pub(crate) fn index(&self, local_port: u16) -> usize {
        self.ports.binary_search(&local_port).map_or(0, |i| i + 1)
    }

    pub(crate) fn value(&self, index: usize) -> String {
        match index {
            0 => "other".to_owned(),
            i => self.ports[i - 1].to_string(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct StateClock {
    /// Socket-nanoseconds accumulated up to `since_ns`.
    accumulated_ns: u128,
    since_ns: u64,
}

/// Socket counts per (port label, state) and socket-seconds per state.
#[derive(Clone, Debug)]
pub(crate) struct StateGauges {
    labels: PortLabels,
    by_label: Vec<[i64; TcpState::INDEXES]>,
    total: [i64; TcpState::INDEXES],
    clocks: [StateClock; TcpState::INDEXES],
}

impl StateGauges {
    pub(crate) fn new(labels: PortLabels) -> Self {
        Self {
            by_label: vec![[0; TcpState::INDEXES]; labels.values()],
            labels,
            total: [0; TcpState::INDEXES],
            clocks: [StateClock::default(); TcpState::INDEXES],
        }
    }

    pub(crate) fn labels(&self) -> &PortLabels {
        &self.labels
    }

    /// Accrues socket-time for `state` up to `ts` (never backwards: records from different
    /// CPUs arrive a few microseconds out of order).
    fn accrue(&mut self, state: usize, ts: u64) {
        let clock = &mut self.clocks[state];
        if ts > clock.since_ns {
            if clock.since_ns != 0 {
                let sockets = u128::try_from(self.total[state].max(0)).unwrap_or(0);
                clock.accumulated_ns += sockets * u128::from(ts - clock.since_ns);
            }
            clock.since_ns = ts;
        }
    }

    /// Adds `delta` sockets in `state` with local port `local_port`, at `ts`.
    pub(crate) fn add(&mut self, local_port: u16, state: TcpState, delta: i64, ts: u64) {
        let state = state.index();
        self.accrue(state, ts);
        self.by_label[self.labels.index(local_port)][state] += delta;
        self.total[state] += delta;
    }

    /// Adds `delta` sockets in `state` to port label `label` (sockets counted from a dump,
    /// with no port at hand).
    pub(crate) fn add_to_label(&mut self, label: usize, state: TcpState, delta: i64, ts: u64) {
        let state = state.index();
        self.accrue(state, ts);
        self.by_label[label][state] += delta;
        self.total[state] += delta;
    }

    /// Replaces a state's counts, per label: with a dump's for the states the tracepoint never
    /// reports (TIME_WAIT, NEW_SYN_RECV) and while the table is saturated.
    pub(crate) fn set_counts(&mut self, state: TcpState, per_label: &[i64], ts: u64) {
        let state = state.index();
        self.accrue(state, ts);
        let mut total = 0;
        for (label, count) in self.by_label.iter_mut().zip(per_label) {
            label[state] = *count;
            total += count;
        }
        self.total[state] = total;
    }

    #[cfg(test)]
    pub(crate) fn count(&self, state: TcpState) -> i64 {
        self.total[state.index()]
    }

    pub(crate) fn count_for_label(&self, label: usize, state: TcpState) -> i64 {
        self.by_label[label][state.index()]
    }

    /// Socket-seconds spent in `state` up to `now`, including sockets still in it.
    pub(crate) fn seconds(&self, state: TcpState, now: u64) -> f64 {
        let state = state.index();
        let clock = self.clocks[state];
        let open = if clock.since_ns != 0 && now > clock.since_ns {
            u128::try_from(self.total[state].max(0)).unwrap_or(0) * u128::from(now - clock.since_ns)
        } else {
            0
        };
        (clock.accumulated_ns + open) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: TcpState = TcpState::CLOSE_WAIT;

    #[test]
    fn seconds_integrate_open_and_closed_stays() {
        let mut gauges = StateGauges::new(PortLabels::none());
        gauges.add(1, S, 1, 1_000_000_000); // one socket from t=1s
        gauges.add(2, S, 1, 2_000_000_000); // a second from t=2s
        gauges.add(1, S, -1, 4_000_000_000); // the first leaves at t=4s: 3 s
        // At t=5s: 3 s (closed) + 3 s (the second, still in) = 6 s.
        assert!((gauges.seconds(S, 5_000_000_000) - 6.0).abs() < 1e-9);
        assert_eq!(gauges.count(S), 1);
    }

    #[test]
    fn out_of_order_timestamps_never_subtract() {
        let mut gauges = StateGauges::new(PortLabels::none());
        gauges.add(1, S, 1, 2_000);
        gauges.add(1, S, 1, 1_000);
        assert_eq!(gauges.count(S), 2);
        assert!(gauges.seconds(S, 3_000) >= 0.0);
    }

    #[test]
    fn port_labels_split_counts() {
        let labels = PortLabels::new(vec![5432, 80]);
        assert_eq!(labels.index(80), 1);
        assert_eq!(labels.index(5432), 2);
        assert_eq!(labels.index(22), 0);
        assert_eq!(labels.value(0), "other");
        assert_eq!(labels.value(2), "5432");
        let mut gauges = StateGauges::new(labels);
        gauges.add(5432, S, 1, 1);
        gauges.add(22, S, 1, 1);
        assert_eq!(gauges.count_for_label(2, S), 1);
        assert_eq!(gauges.count_for_label(0, S), 1);
        assert_eq!(gauges.count(S), 2);
    }
}
