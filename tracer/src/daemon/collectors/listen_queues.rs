//! Listeners that stop accepting: from the core's dumps of every namespace's listening
//! sockets (every 2 s; a LISTEN-only dump, small even on a busy host), the fullest accept
//! queues kept with their limits, and each namespace's count of handshakes the kernel
//! dropped because a queue was full; queues that stay full name their owner
//! (`stuck_watch`).

mod stuck_watch;

use std::{
    fmt,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use self::stuck_watch::StuckWatch;
use crate::{
    cmdline::CmdlinePolicy,
    daemon::{core::Diagnosis, export::family::Scrape},
    leaks::{LeakReport, stuck_listeners::StuckListener},
    netns::NamespaceListeners,
    sockdiag::ListenQueue,
};

/// Listeners with series of their own; the others are summed.
const TOP_LISTENERS: usize = 20;

/// A listener of one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Listener {
    pub netns: u32,
    pub queue: ListenQueue,
}

/// What the last dump of the listeners found.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ListenerReport {
    /// The `TOP_LISTENERS` fullest listeners: longest queue first, then the largest share of
    /// its limit.
    pub top: Vec<Listener>,
    /// Queue lengths and limits of the other listeners, summed.
    pub rest_length: u64,
    pub rest_limit: u64,
    /// Namespaces with listeners: (inode, `ListenOverflows`, `ListenDrops`).
    pub dropped: Vec<(u32, u64, u64)>,
    /// Listeners whose queue stayed full past `stuck_threshold`, with their owners.
    pub stuck: Vec<StuckListener>,
    pub stuck_threshold: Duration,
}

/// The report of one dump of every namespace.
fn report(namespaces: &[NamespaceListeners]) -> ListenerReport {
    let mut report = ListenerReport::default();
    let mut all = Vec::new();
    for namespace in namespaces {
        if namespace.queues.is_empty() {
            continue;
        }
        if let (Some(overflows), Some(drops)) = (namespace.overflows, namespace.drops) {
            report.dropped.push((namespace.inode, overflows, drops));
        }
        all.extend(
            namespace
                .queues
                .iter()
                .map(|queue| Listener { netns: namespace.inode, queue: queue.clone() }),
        );
    }
    // Fullest first: by length, then by share of the limit (length * other limit, exact).
    all.sort_by(|a, b| {
        let (a, b) = (&a.queue, &b.queue);
        b.length.cmp(&a.length).then_with(|| {
            (u64::from(b.length) * u64::from(a.limit))
                .cmp(&(u64::from(a.length) * u64::from(b.limit)))
        })
    });
    for listener in all.drain(TOP_LISTENERS.min(all.len())..) {
        report.rest_length += u64::from(listener.queue.length);
        report.rest_limit += u64::from(listener.queue.limit);
    }
    report.top = all;
    report
}

/// The last dump's fullest listeners, and the listeners stuck full.
pub(super) struct ListenQueues {
    stuck_watch: Mutex<StuckWatch>,
    report: Mutex<ListenerReport>,
}

impl ListenQueues {
    pub(super) fn new(threshold: Duration, cmdline: CmdlinePolicy) -> Self {
        let report = ListenerReport { stuck_threshold: threshold, ..ListenerReport::default() };
        Self {
            stuck_watch: Mutex::new(StuckWatch::new(threshold, cmdline)),
            report: Mutex::new(report),
        }
    }

    fn report(&self) -> MutexGuard<'_, ListenerReport> {
        self.report.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
impl ListenQueues {
    /// As after a dump that found `report` (stuck listeners included).
    pub(super) fn known(report: ListenerReport) -> Self {
        let threshold = report.stuck_threshold;
        Self {
            stuck_watch: Mutex::new(StuckWatch::new(threshold, CmdlinePolicy::default())),
            report: Mutex::new(report),
        }
    }
}

impl Diagnosis for ListenQueues {
    fn listeners_dumped(&self, listeners: &[NamespaceListeners], now: Instant) {
        let (stuck, stuck_threshold) = {
            let mut watch = self.stuck_watch.lock().unwrap_or_else(PoisonError::into_inner);
            (watch.evaluate(listeners, now), watch.threshold())
        };
        *self.report() = ListenerReport { stuck, stuck_threshold, ..report(listeners) };
    }

    fn metrics(&self, encoder: &mut DescriptorEncoder, _scrape: &Scrape) -> fmt::Result {
        families(encoder, &self.report())
    }

    fn findings(&self, leaks: &mut LeakReport) {
        let report = self.report();
        leaks.listen_queue_threshold_seconds = report.stuck_threshold.as_secs_f64();
        leaks.stuck_listeners = report.stuck.clone();
    }

    fn units(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("listen_queue_length", "{connection}"),
            ("listen_queue_limit", "{connection}"),
            ("listen_overflows_total", "{handshake}"),
            ("listen_drops_total", "{handshake}"),
        ]
    }
}

/// Accept queues of the fullest listeners, and the handshakes full queues cost.
fn families(encoder: &mut DescriptorEncoder, report: &ListenerReport) -> fmt::Result {
    listen_queue_gauge(
        encoder,
        "tcpstate_listen_queue_length",
        "Connections established and waiting for the listener's accept(), by network \
         namespace (inode), local address and port: the 20 fullest listeners, the others \
         summed as \"other\"; dumped every 2 s. The kernel drops handshakes once it is above \
         tcpstate_listen_queue_limit",
        report,
        |queue| queue.length,
        report.rest_length,
    )?;
    listen_queue_gauge(
        encoder,
        "tcpstate_listen_queue_limit",
        "The accept queue's limit of the same listeners: the backlog given to listen(), \
         capped by net.core.somaxconn",
        report,
        |queue| queue.limit,
        report.rest_limit,
    )?;
    let mut overflows = encoder.encode_descriptor(
        "tcpstate_listen_overflows",
        "Handshakes the kernel dropped because a listener's accept queue was full, per \
         network namespace with listeners (its TcpExt ListenOverflows)",
        None,
        MetricType::Counter,
    )?;
    for &(netns, count, _) in &report.dropped {
        let set = [("netns", netns.to_string())];
        ConstCounter::new(count).encode(overflows.encode_family(&set)?)?;
    }
    let mut drops = encoder.encode_descriptor(
        "tcpstate_listen_drops",
        "Every handshake dropped at a listener, full queues included, per network \
         namespace with listeners (its TcpExt ListenDrops)",
        None,
        MetricType::Counter,
    )?;
    for &(netns, _, count) in &report.dropped {
        let set = [("netns", netns.to_string())];
        ConstCounter::new(count).encode(drops.encode_family(&set)?)?;
    }
    Ok(())
}

/// One figure of the fullest listeners' queues, and the others' sum as `other`.
fn listen_queue_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    report: &ListenerReport,
    value: impl Fn(&ListenQueue) -> u32,
    rest: u64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for Listener { netns, queue } in &report.top {
        let set = [
            ("netns", netns.to_string()),
            ("laddr", queue.local.ip().to_string()),
            ("port", queue.local.port().to_string()),
        ];
        ConstGauge::new(i64::from(value(queue))).encode(family.encode_family(&set)?)?;
    }
    if !report.top.is_empty() {
        let other = [("netns", "other"), ("laddr", "other"), ("port", "other")];
        let rest = i64::try_from(rest).unwrap_or(i64::MAX);
        ConstGauge::new(rest).encode(family.encode_family(&other)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(port: u16, length: u32, limit: u32) -> ListenQueue {
        ListenQueue { local: ([127, 0, 0, 1], port).into(), length, limit, inode: 0 }
    }

    #[test]
    fn the_fullest_listeners_are_kept_and_the_rest_summed() {
        let mut many: Vec<ListenQueue> =
            (0..TOP_LISTENERS as u16 + 2).map(|i| queue(1000 + i, 0, 128)).collect();
        many.push(queue(80, 9, 8));
        many.push(queue(81, 3, 4096));
        many.push(queue(82, 3, 4));
        let namespaces = vec![
            NamespaceListeners { inode: 1, queues: many, overflows: Some(5), drops: Some(6) },
            NamespaceListeners { inode: 2, queues: vec![], overflows: Some(0), drops: Some(0) },
        ];
        let report = report(&namespaces);
        let ports: Vec<u16> = report.top.iter().map(|l| l.queue.local.port()).collect();
        assert_eq!(&ports[..3], [80, 82, 81]);
        assert_eq!(report.top.len(), TOP_LISTENERS);
        assert_eq!((report.rest_length, report.rest_limit), (0, 5 * 128));
        // The namespace without listeners has no series.
        assert_eq!(report.dropped, vec![(1, 5, 6)]);
    }
}
