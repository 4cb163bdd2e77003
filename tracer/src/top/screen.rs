//! What `tcpstate top` shows, computed from the last minute of samples: the rows of each
//! panel, in the order the user chose. Pure: the terminal code only draws these rows.

use std::{
    cmp::Ordering,
    collections::VecDeque,
    time::{Duration, Instant},
};

use tracer_common::TcpState;

use super::sample::{Sample, Timed};

/// Samples kept: a minute at one per second, for the change column and the trend.
const KEPT: usize = 61;
/// Samples the trend column draws.
pub(super) const TREND_POINTS: usize = 8;

/// The order of every panel's rows; `s` cycles through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SortKey {
    /// Largest first: sockets now, transitions and failures per second, leaked sockets.
    Count,
    /// Largest change over the last minute first.
    Change,
    /// The state diagram's order (processes by name).
    Name,
}

impl SortKey {
    pub(crate) const fn next(self) -> Self {
        match self {
            Self::Count => Self::Change,
            Self::Change => Self::Name,
            Self::Name => Self::Count,
        }
    }

    pub(crate) const fn label(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Change => "change",
            Self::Name => "name",
        }
    }
}

/// One state: its sockets now, the change over the window, the trend, the oldest stay.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct StateRow {
    pub state: String,
    pub now: f64,
    pub change: f64,
    /// The last `TREND_POINTS` counts, oldest first (fewer while the history is short).
    pub trend: Vec<f64>,
    pub oldest_seconds: Option<f64>,
}

/// One pair of states with transitions.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct TransitionRow {
    pub from: String,
    pub to: String,
    pub per_second: f64,
    /// Rate now minus the rate a minute ago.
    pub change: f64,
    pub total: f64,
}

/// One kind of failure (a connect's reason, or resets in one direction), or one of its
/// destinations of the last minute, listed under it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct FailureRow {
    pub what: String,
    /// For a destination: its average over the last minute.
    pub per_second: f64,
    /// Since the daemon started; none for a destination.
    pub total: Option<f64>,
}

/// One process holding leaked CLOSE_WAIT sockets, or a listener that stopped accepting.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct LeakRow {
    pub pid: Option<u32>,
    pub comm: String,
    /// Leaked sockets, or connections waiting in the listener's accept queue.
    pub sockets: usize,
    /// The oldest leaked socket's age, or how long the listener's queue has been full.
    pub oldest_seconds: f64,
    /// Its pod (namespace/name), else its container id (12 digits), else empty.
    pub container: String,
    /// For a stuck listener: its port and its queue's limit.
    pub listener: Option<(u16, u32)>,
    /// For another diagnosis's finding: its kind.
    pub kind: Option<String>,
}

/// A process's pod (namespace/name), else its container id (12 digits), else empty.
fn pod_or_container(process: &crate::socket::Process) -> String {
    let container = &process.container;
    match (&container.pod_namespace, &container.pod_name) {
        (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
        _ => container
            .container_id
            .as_deref()
            .map_or_else(String::new, |id| id.chars().take(12).collect()),
    }
}

/// The samples of the last minute, oldest first.
#[derive(Default)]
pub(super) struct History {
    samples: VecDeque<Timed>,
}

impl History {
    pub(super) fn push(&mut self, at: Instant, sample: Sample) {
        if self.samples.len() == KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back(Timed { at, sample });
    }

    pub(super) fn latest(&self) -> Option<&Sample> {
        self.samples.back().map(|t| &t.sample)
    }

    fn oldest(&self) -> Option<&Sample> {
        self.samples.front().map(|t| &t.sample)
    }

    /// How much time the window covers.
    pub(super) fn span(&self) -> Duration {
        match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last)) => last.at.duration_since(first.at),
            _ => Duration::ZERO,
        }
    }

    /// Per second between the two samples ending at `end` (from the back: 0 is the latest);
    /// 0 without two samples, and after a counter went down (a restarted daemon).
    fn rate_at(&self, end: usize, value: impl Fn(&Sample) -> f64) -> f64 {
        let len = self.samples.len();
        if len < end + 2 {
            return 0.0;
        }
        let (before, after) = (&self.samples[len - end - 2], &self.samples[len - end - 1]);
        let seconds = after.at.duration_since(before.at).as_secs_f64();
        let delta = value(&after.sample) - value(&before.sample);
        if seconds <= 0.0 || delta < 0.0 { 0.0 } else { delta / seconds }
    }

    fn rate(&self, value: impl Fn(&Sample) -> f64) -> f64 {
        self.rate_at(0, value)
    }

    pub(super) fn states(&self, sort: SortKey) -> Vec<StateRow> {
        let (Some(latest), Some(first)) = (self.latest(), self.oldest()) else {
            return Vec::new();
        };
        let mut rows: Vec<StateRow> = latest
            .sockets
            .iter()
            .map(|(state, &now)| StateRow {
                state: state.clone(),
                now,
                change: now - first.sockets.get(state).copied().unwrap_or(now),
                trend: self
                    .samples
                    .iter()
                    .rev()
                    .take(TREND_POINTS)
                    .rev()
                    .map(|t| t.sample.sockets.get(state).copied().unwrap_or(0.0))
                    .collect(),
                oldest_seconds: latest.oldest.get(state).copied(),
            })
            .collect();
        rows.sort_by(|a, b| match sort {
            SortKey::Count => descending(a.now, b.now).then_with(|| by_state(&a.state, &b.state)),
            SortKey::Change => descending(a.change.abs(), b.change.abs())
                .then_with(|| by_state(&a.state, &b.state)),
            SortKey::Name => by_state(&a.state, &b.state),
        });
        rows
    }

    pub(super) fn transitions(&self, sort: SortKey) -> Vec<TransitionRow> {
        let Some(latest) = self.latest() else { return Vec::new() };
        let window = self.samples.len().saturating_sub(2);
        let mut rows: Vec<TransitionRow> = latest
            .transitions
            .iter()
            .filter(|(_, total)| **total > 0.0)
            .map(|(pair, &total)| {
                let count = |s: &Sample| s.transitions.get(pair).copied().unwrap_or(0.0);
                let per_second = self.rate(count);
                TransitionRow {
                    from: pair.0.clone(),
                    to: pair.1.clone(),
                    per_second,
                    change: per_second - self.rate_at(window, count),
                    total,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            let names = || by_state(&a.from, &b.from).then_with(|| by_state(&a.to, &b.to));
            match sort {
                SortKey::Count => descending(a.per_second, b.per_second)
                    .then_with(|| descending(a.total, b.total))
                    .then_with(names),
                SortKey::Change => descending(a.change.abs(), b.change.abs())
                    .then_with(|| descending(a.total, b.total))
                    .then_with(names),
                SortKey::Name => names(),
            }
        });
        rows
    }

    /// Failed connects by reason, resets by direction and retransmits, each followed by its
    /// destinations of the last minute; kinds never seen are left out.
    pub(super) fn failures(&self, sort: SortKey) -> Vec<FailureRow> {
        let Some(latest) = self.latest() else { return Vec::new() };
        let connects = latest.connect_failures.iter().map(|(reason, total)| {
            let per_second = self.rate(|s| s.connect_failures.get(reason).copied().unwrap_or(0.0));
            (format!("connect {reason}"), per_second, *total)
        });
        let resets = latest.resets.iter().map(|(direction, total)| {
            let per_second = self.rate(|s| s.resets.get(direction).copied().unwrap_or(0.0));
            (format!("reset {direction}"), per_second, *total)
        });
        let retransmits = std::iter::once((
            "retransmits".to_owned(),
            self.rate(|s| s.retransmits),
            latest.retransmits,
        ));
        let mut kinds: Vec<(String, f64, f64)> = connects
            .chain(resets)
            .chain(retransmits)
            .filter(|(_, _, total)| *total > 0.0)
            .collect();
        if sort != SortKey::Name {
            kinds.sort_by(|a, b| descending(a.1, b.1).then_with(|| descending(a.2, b.2)));
        }
        let mut rows = Vec::new();
        for (what, per_second, total) in kinds {
            let destinations = latest.destinations.get(&what).cloned().unwrap_or_default();
            rows.push(FailureRow { what, per_second, total: Some(total) });
            // The daemon lists them most first.
            rows.extend(destinations.into_iter().map(|(place, count)| FailureRow {
                what: format!(" {place}"),
                per_second: count / crate::daemon::DESTINATION_WINDOW_SECONDS,
                total: None,
            }));
        }
        rows
    }

    pub(super) fn leaks(&self, sort: SortKey) -> Vec<LeakRow> {
        let Some(report) = self.latest().and_then(|s| s.leaks.as_ref()) else {
            return Vec::new();
        };
        let mut rows: Vec<LeakRow> = report
            .processes
            .iter()
            .map(|p| LeakRow {
                pid: p.process.pid,
                comm: p.process.comm.clone().unwrap_or_else(|| "(unknown owner)".to_owned()),
                sockets: p.count,
                oldest_seconds: p.oldest_age_seconds,
                container: pod_or_container(&p.process),
                listener: None,
                kind: None,
            })
            .collect();
        let listeners = report.stuck_listeners.iter().map(|l| LeakRow {
            pid: l.process.pid,
            comm: l.process.comm.clone().unwrap_or_else(|| "(unknown owner)".to_owned()),
            sockets: l.queue_length as usize,
            oldest_seconds: l.full_for_seconds.unwrap_or(0.0),
            container: pod_or_container(&l.process),
            listener: Some((l.local_port, l.queue_limit)),
            kind: None,
        });
        rows.extend(listeners);
        rows.extend(report.findings.iter().map(|f| LeakRow {
            pid: f.process.pid,
            comm: f.process.comm.clone().unwrap_or_else(|| "(unknown owner)".to_owned()),
            sockets: f.count,
            oldest_seconds: f.for_seconds,
            container: pod_or_container(&f.process),
            listener: None,
            kind: Some(f.kind.clone()),
        }));
        match sort {
            SortKey::Name => rows.sort_by(|a, b| a.comm.cmp(&b.comm).then(a.pid.cmp(&b.pid))),
            SortKey::Count | SortKey::Change => rows.sort_by(|a, b| {
                b.sockets
                    .cmp(&a.sockets)
                    .then_with(|| descending(a.oldest_seconds, b.oldest_seconds))
            }),
        }
        rows
    }

    /// Transitions lost in total, and per second now.
    pub(super) fn lost(&self) -> (f64, f64) {
        let total = self.latest().map_or(0.0, Sample::lost_total);
        (total, self.rate(Sample::lost_total))
    }
}

fn descending(a: f64, b: f64) -> Ordering {
    b.partial_cmp(&a).unwrap_or(Ordering::Equal)
}

/// The kernel's state order (ESTABLISHED first, as /proc/net/tcp numbers them); unknown
/// names last, alphabetically.
fn by_state(a: &str, b: &str) -> Ordering {
    let number = |name: &str| TcpState::from_name(name).map_or(u8::MAX, TcpState::number);
    number(a).cmp(&number(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(established: f64, close_wait: f64, refused: f64, transitions: f64) -> Sample {
        let mut s = Sample::default();
        s.sockets.insert("ESTABLISHED".into(), established);
        s.sockets.insert("CLOSE_WAIT".into(), close_wait);
        s.sockets.insert("LISTEN".into(), 2.0);
        s.connect_failures.insert("refused".into(), refused);
        s.connect_failures.insert("timeout".into(), 0.0);
        s.transitions.insert(("CLOSE".into(), "SYN_SENT".into()), transitions);
        s.transitions.insert(("LISTEN".into(), "SYN_RECV".into()), 7.0);
        s
    }

    fn history(samples: &[Sample]) -> History {
        let start = Instant::now();
        let mut history = History::default();
        for (i, s) in samples.iter().enumerate() {
            history.push(start + Duration::from_secs(i as u64 * 2), s.clone());
        }
        history
    }

    #[test]
    fn rates_are_per_second_between_the_last_two_samples() {
        let h = history(&[sample(1.0, 0.0, 0.0, 10.0), sample(5.0, 3.0, 4.0, 30.0)]);
        let transitions = h.transitions(SortKey::Count);
        assert_eq!(transitions[0].from, "CLOSE");
        assert_eq!(transitions[0].per_second, 10.0);
        assert_eq!(transitions[0].total, 30.0);
        assert_eq!(transitions[1].per_second, 0.0);
        let failures = h.failures(SortKey::Count);
        assert_eq!(failures.len(), 1, "kinds never seen are left out: {failures:?}");
        assert_eq!((failures[0].what.as_str(), failures[0].per_second), ("connect refused", 2.0));
    }

    #[test]
    fn each_sort_key_orders_the_states_its_way() {
        let h = history(&[sample(9.0, 0.0, 0.0, 0.0), sample(10.0, 5.0, 0.0, 0.0)]);
        let order = |sort| h.states(sort).into_iter().map(|r| r.state).collect::<Vec<_>>();
        assert_eq!(order(SortKey::Count), ["ESTABLISHED", "CLOSE_WAIT", "LISTEN"]);
        assert_eq!(order(SortKey::Change), ["CLOSE_WAIT", "ESTABLISHED", "LISTEN"]);
        assert_eq!(order(SortKey::Name), ["ESTABLISHED", "CLOSE_WAIT", "LISTEN"]);
        let close_wait = &h.states(SortKey::Count)[1];
        assert_eq!((close_wait.change, close_wait.trend.clone()), (5.0, vec![0.0, 5.0]));
        assert_eq!(SortKey::Count.next().next().next(), SortKey::Count);
    }

    #[test]
    fn destinations_follow_their_kind_with_their_rate_over_the_minute() {
        let mut latest = sample(1.0, 0.0, 4.0, 0.0);
        latest.resets.insert("received".into(), 9.0);
        latest.destinations.insert("connect refused".into(), vec![("10.0.0.9:5432".into(), 30.0)]);
        // Resets stood still: they come after the refused connects, which grew.
        let mut earlier = sample(1.0, 0.0, 0.0, 0.0);
        earlier.resets.insert("received".into(), 9.0);
        let h = history(&[earlier, latest]);
        let rows = h.failures(SortKey::Count);
        let found: Vec<(&str, Option<f64>)> =
            rows.iter().map(|r| (r.what.as_str(), r.total)).collect();
        assert_eq!(
            found,
            [
                ("connect refused", Some(4.0)),
                (" 10.0.0.9:5432", None),
                ("reset received", Some(9.0))
            ]
        );
        assert_eq!(rows[1].per_second, 0.5, "30 in the last minute");
    }

    #[test]
    fn a_counter_that_went_down_is_no_negative_rate() {
        let h = history(&[sample(1.0, 0.0, 9.0, 50.0), sample(1.0, 0.0, 1.0, 3.0)]);
        assert_eq!(h.transitions(SortKey::Count)[1].per_second, 0.0);
        assert_eq!(h.failures(SortKey::Count)[0].per_second, 0.0);
    }

    #[test]
    fn the_window_keeps_a_minute_and_the_trend_its_last_points() {
        let samples: Vec<Sample> = (0..100).map(|i| sample(f64::from(i), 0.0, 0.0, 0.0)).collect();
        let h = history(&samples);
        assert_eq!(h.span(), Duration::from_secs(2 * (KEPT as u64 - 1)));
        let established = &h.states(SortKey::Name)[0];
        assert_eq!(established.change, (KEPT - 1) as f64);
        assert_eq!(established.trend.len(), TREND_POINTS);
        assert_eq!(established.trend.last(), Some(&99.0));
    }

    #[test]
    fn an_empty_history_has_no_rows() {
        let h = History::default();
        assert!(h.states(SortKey::Count).is_empty() && h.transitions(SortKey::Name).is_empty());
        assert!(h.leaks(SortKey::Count).is_empty() && h.failures(SortKey::Count).is_empty());
        assert_eq!(h.lost(), (0.0, 0.0));
    }
}
