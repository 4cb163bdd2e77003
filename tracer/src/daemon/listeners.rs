//! Listeners that stop accepting: every namespace's listening sockets are dumped every
//! `LISTEN_INTERVAL` (a LISTEN-only dump, small even on a busy host), the fullest accept
//! queues kept with their limits, and each namespace's count of handshakes the kernel
//! dropped because a queue was full; queues that stay full name their owner
//! (`stuck_listeners`).

use std::{sync::Arc, time::Duration};

use super::{shared::Shared, stuck_listeners::StuckWatch};
use crate::{
    leaks::stuck_listeners::StuckListener,
    netns::{self, NamespaceListeners},
    sockdiag::ListenQueue,
};

/// How often the listeners are dumped.
pub(super) const LISTEN_INTERVAL: Duration = Duration::from_secs(2);
/// Listeners with series of their own; the others are summed.
pub(super) const TOP_LISTENERS: usize = 20;

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
pub(super) fn report(namespaces: Vec<NamespaceListeners>) -> ListenerReport {
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
            namespace.queues.into_iter().map(|queue| Listener { netns: namespace.inode, queue }),
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

/// Dumps the listeners every `LISTEN_INTERVAL`, until the task is aborted.
pub(super) async fn watch_listeners(shared: Arc<Shared>, mut stuck_watch: StuckWatch) {
    let mut ticks = tokio::time::interval(LISTEN_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        // Entering namespaces and walking /proc block: off the runtime.
        let evaluated = tokio::task::spawn_blocking(move || {
            let found = netns::listeners_all();
            let stuck = stuck_watch.evaluate(&found, std::time::Instant::now());
            (stuck_watch, found, stuck)
        });
        let Ok((watch, found, stuck)) = evaluated.await else { return };
        stuck_watch = watch;
        let listening = found
            .iter()
            .flat_map(|ns| ns.queues.iter().map(|queue| (ns.inode, queue.local.port())))
            .collect();
        shared.aggregator().destinations_mut().set_listening(listening);
        let stuck_threshold = stuck_watch.threshold();
        let report = ListenerReport { stuck, stuck_threshold, ..report(found) };
        shared.update_status(|status| status.listeners = report);
    }
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
        let report = report(namespaces);
        let ports: Vec<u16> = report.top.iter().map(|l| l.queue.local.port()).collect();
        assert_eq!(&ports[..3], [80, 82, 81]);
        assert_eq!(report.top.len(), TOP_LISTENERS);
        assert_eq!((report.rest_length, report.rest_limit), (0, 5 * 128));
        // The namespace without listeners has no series.
        assert_eq!(report.dropped, vec![(1, 5, 6)]);
    }
}
