//! One function per metric family (or per small group of single-value families), each
//! writing its `# HELP`, `# TYPE` and samples. The order of the calls in `encode` is the order
//! of the output.

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
};
use tracer_common::TcpState;

use super::{PortSeries, escape_label_value};
use crate::{
    daemon::{
        Status,
        aggregate::{Aggregator, DURATION_BUCKETS, HandshakeRole, SAMPLED_STATES, StayHistogram},
        destinations::DestinationReport,
        groups::{GroupBy, GroupLabels},
        leak_watch::LeakState,
        listeners::{Listener, ListenerReport},
        otlp::OtlpStatus,
        table::Counts,
    },
    failure::{CONNECT_REASONS, ResetDirection},
    sockdiag::ListenQueue,
};

/// States that have gauges: all but CLOSE (a socket leaves the table when it closes).
fn gauge_states() -> impl Iterator<Item = TcpState> {
    TcpState::ALL.into_iter().filter(|s| *s != TcpState::CLOSE)
}

/// States with completed stays: those the tracepoint reports a socket entering and leaving.
fn stay_states() -> impl Iterator<Item = TcpState> {
    gauge_states().filter(|s| !SAMPLED_STATES.contains(s))
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

fn gauge_f64(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

const fn bool_label(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

pub(super) fn transitions(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
    ports: &PortSeries,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_transitions",
        "TCP state transitions, by old (from) and new (to) state",
        None,
        MetricType::Counter,
    )?;
    for label in ports.indexes() {
        for from in TcpState::ALL {
            for to in TcpState::ALL {
                let count = agg.transitions(label, from, to);
                if count > 0 {
                    let set =
                        ports.with(&[("from", from.to_string()), ("to", to.to_string())], label);
                    ConstCounter::new(count).encode(family.encode_family(&set)?)?;
                }
            }
        }
    }
    Ok(())
}

pub(super) fn connect_failures(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
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
        for (reason, count) in CONNECT_REASONS.iter().zip(agg.connect_failures(label)) {
            let set = ports.with(&[("reason", (*reason).to_owned())], label);
            ConstCounter::new(*count).encode(family.encode_family(&set)?)?;
        }
    }
    Ok(())
}

pub(super) fn resets(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
    ports: &PortSeries,
) -> fmt::Result {
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
                let count = agg.resets(label, direction, state);
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

/// The destinations with most failed connects and retransmits, and the peers with most
/// resets, over the last minute.
pub(super) fn destinations(
    encoder: &mut DescriptorEncoder,
    report: &DestinationReport,
) -> fmt::Result {
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
        "tcpstate_retransmits_by_destination",
        "Segments retransmitted in about the last minute to one destination address and port, \
         counted in the kernel: the 10 with most",
        None,
        MetricType::Gauge,
    )?;
    for retransmits in &report.retransmits {
        let set =
            [("daddr", retransmits.address.to_string()), ("dport", retransmits.port.to_string())];
        ConstGauge::new(retransmits.count as i64).encode(family.encode_family(&set)?)?;
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

/// The ten most used local-address-to-destination port ranges, and the highest share.
pub(super) fn ephemeral_ports(encoder: &mut DescriptorEncoder, agg: &Aggregator) -> fmt::Result {
    let (port_usage, max_usage) = agg.port_usage();
    let mut family = encoder.encode_descriptor(
        "tcpstate_ephemeral_port_usage_ratio",
        "Share of the ephemeral port range (net.ipv4.ip_local_port_range) held by sockets to \
         one destination from one local address, TIME_WAIT included, at the last \
         reconciliation: the 10 highest",
        None,
        MetricType::Gauge,
    )?;
    for usage in port_usage {
        let set = [
            ("saddr", usage.saddr.to_string()),
            ("daddr", usage.daddr.to_string()),
            ("dport", usage.dport.to_string()),
        ];
        ConstGauge::new(usage.ratio).encode(family.encode_family(&set)?)?;
    }
    gauge_f64(
        encoder,
        "tcpstate_ephemeral_port_usage_max_ratio",
        "The highest share of the ephemeral port range any destination holds (see \
         tcpstate_ephemeral_port_usage_ratio)",
        *max_usage,
    )
}

pub(super) fn stay_durations(encoder: &mut DescriptorEncoder, agg: &Aggregator) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_state_duration_seconds",
        "Completed stays in each state whose length is exactly known (first sightings and \
         sockets older than the daemon are left out)",
        None,
        MetricType::Histogram,
    )?;
    for state in stay_states() {
        histogram(&mut family, &[("state", state.to_string())], agg.stays(state))?;
    }
    Ok(())
}

pub(super) fn handshake_durations(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
    ports: &PortSeries,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_handshake_duration_seconds",
        "Completed TCP handshakes, by role: client, from connect() to the SYN-ACK that \
         established the connection (SYN retries included); server, from the SYN-ACK to the \
         ACK that completed it, as the kernel measured it",
        None,
        MetricType::Histogram,
    )?;
    for role in HandshakeRole::ALL {
        for label in ports.indexes() {
            let set = ports.with(&[("role", role.name().to_owned())], label);
            histogram(&mut family, &set, agg.handshakes(label, role))?;
        }
    }
    Ok(())
}

/// One histogram series with the stay buckets.
fn histogram(
    family: &mut prometheus_client::encoding::MetricEncoder,
    labels: &[(&str, String)],
    stays: &StayHistogram,
) -> fmt::Result {
    let mut buckets: Vec<(f64, u64)> =
        DURATION_BUCKETS.iter().copied().zip(stays.buckets.iter().copied()).collect();
    buckets.push((f64::MAX, stays.buckets[DURATION_BUCKETS.len()]));
    family.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
        stays.sum_ns as f64 / 1e9,
        stays.count,
        &buckets,
        None,
    )
}

pub(super) fn state_seconds(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
    now: u64,
) -> fmt::Result {
    let gauges = agg.table().gauges();
    let mut family = encoder.encode_descriptor(
        "tcpstate_state_seconds",
        "Socket-seconds spent in each state since the daemon started, including sockets \
         still in it (TIME_WAIT and NEW_SYN_RECV from sampled counts)",
        None,
        MetricType::Counter,
    )?;
    for state in gauge_states() {
        let seconds = gauges.seconds(state, now);
        ConstCounter::new(seconds)
            .encode(family.encode_family(&[("state", state.to_string())])?)?;
    }
    Ok(())
}

/// Sockets per state; under `--group-by`, each state's count splits into its groups' counts
/// and what is left (no group), so every sum by state stays exact.
pub(super) fn sockets(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
    ports: &PortSeries,
    grouped: Option<&[(GroupLabels, Counts)]>,
) -> fmt::Result {
    let gauges = agg.table().gauges();
    let mut family = encoder.encode_descriptor(
        "tcpstate_sockets",
        "Sockets in each state now (TIME_WAIT and NEW_SYN_RECV sampled from sock_diag at \
         each reconciliation)",
        None,
        MetricType::Gauge,
    )?;
    let no_group = GroupLabels::default();
    for label in ports.indexes() {
        for state in gauge_states() {
            let count = gauges.count_for_label(label, state).max(0);
            let Some(grouped) = grouped else {
                let set = ports.with(&[("state", state.to_string())], label);
                ConstGauge::new(count).encode(family.encode_family(&set)?)?;
                continue;
            };
            let mut rest = count;
            let mut series = Vec::new();
            for (group, counts) in grouped {
                let value = counts[label][state.index()];
                if value > 0 {
                    series.push((group, value));
                    rest -= value;
                }
            }
            series.push((&no_group, rest.max(0)));
            for (group, value) in series {
                let mut base = vec![("state", state.to_string())];
                base.extend(group.pairs().map(|(name, v)| (name, escape_label_value(&v))));
                ConstGauge::new(value).encode(family.encode_family(&ports.with(&base, label))?)?;
            }
        }
    }
    Ok(())
}

/// `oldest`: when the longest stay in progress in each state began.
pub(super) fn oldest_stays(
    encoder: &mut DescriptorEncoder,
    oldest: &[Option<u64>; TcpState::INDEXES],
    now: u64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_state_oldest_age_seconds",
        "Age of the longest stay in progress in each state (a lower bound for sockets older \
         than the daemon); absent when no socket is in the state",
        None,
        MetricType::Gauge,
    )?;
    for state in gauge_states() {
        if let Some(entered) = oldest[state.index()] {
            let age = now.saturating_sub(entered) as f64 / 1e9;
            ConstGauge::new(age).encode(family.encode_family(&[("state", state.to_string())])?)?;
        }
    }
    Ok(())
}

/// What arrived, what was lost and why, what the standby rescued.
pub(super) fn delivery(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
    status: &Status,
) -> fmt::Result {
    let delivery = status.delivery;
    counter(encoder, "tcpstate_events", "Transition records received", agg.events())?;
    let mut family = encoder.encode_descriptor(
        "tcpstate_events_lost",
        "Transitions not delivered, by cause: ringbuf_full (no room in the ring buffer), \
         recursion (the kernel skipped the program while it ran on that CPU), malformed",
        None,
        MetricType::Counter,
    )?;
    for (cause, value) in [
        ("ringbuf_full", delivery.ringbuf_full),
        ("recursion", delivery.recursion_misses),
        ("malformed", agg.malformed()),
    ] {
        ConstCounter::new(value).encode(family.encode_family(&[("cause", cause)])?)?;
    }
    counter(
        encoder,
        "tcpstate_events_rescued",
        "Transitions the kernel skipped the main program for, delivered by the standby program",
        delivery.rescued,
    )?;
    counter(
        encoder,
        "tcpstate_events_duplicates_dropped",
        "Second deliveries of one transition (by both kernel programs) the reader dropped",
        status.duplicates_dropped,
    )
}

/// The socket table, the namespaces behind it and the kernel map that feeds it.
pub(super) fn table(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
    status: &Status,
) -> fmt::Result {
    gauge(
        encoder,
        "tcpstate_netns_skipped",
        "Network namespaces the last sock_diag dump could not enter for lack of privilege \
         (their sockets are missing from the gauges)",
        status.netns_refused as i64,
    )?;
    counter(
        encoder,
        "tcpstate_kernel_map_update_failures",
        "Per-socket kernel map updates that failed (the socket's next duration is unknown)",
        status.delivery.map_update_failed,
    )?;
    let mut family = encoder.encode_descriptor(
        "tcpstate_kernel_untracked_sightings",
        "Transitions of sockets the kernel's per-socket map did not hold, by cause: evicted \
         (the map held more than --kernel-sockets; the stay is taken from the daemon's table \
         instead), older_than_daemon (known from a dump only: stay unknown), unknown (the \
         daemon had no entry either)",
        None,
        MetricType::Counter,
    )?;
    let forgot = agg.kernel_forgot();
    for (cause, count) in [
        ("evicted", forgot.evicted),
        ("older_than_daemon", forgot.older),
        ("unknown", forgot.unknown),
    ] {
        ConstCounter::new(count).encode(family.encode_family(&[("cause", cause)])?)?;
    }
    gauge(
        encoder,
        "tcpstate_tracked_sockets",
        "Sockets in the daemon's table",
        agg.table().len() as i64,
    )?;
    gauge(
        encoder,
        "tcpstate_table_saturated",
        "1 when the table cannot hold every socket (--max-sockets): gauges then come from \
         sock_diag dumps and records, per-socket details only for the sockets it holds",
        i64::from(agg.saturated()),
    )?;
    gauge(
        encoder,
        "tcpstate_table_untracked_sockets",
        "Sockets the last sock_diag dump listed that the full table could not hold",
        agg.untracked() as i64,
    )?;
    counter(
        encoder,
        "tcpstate_reconcile_corrections",
        "Table entries a sock_diag reconciliation added, removed or repaired",
        agg.corrections(),
    )?;
    counter(
        encoder,
        "tcpstate_reconciliations",
        "sock_diag reconciliations completed since start (the seeding dump not included)",
        agg.reconciliations(),
    )?;
    counter(
        encoder,
        "tcpstate_owner_lookups_dropped",
        "Accepted sockets whose owner was not looked up in the kernel's map because 262,144 \
         were already waiting (they show no owner until their owner closes them)",
        agg.unnamed_dropped(),
    )?;
    gauge(
        encoder,
        "tcpstate_network_namespaces",
        "Network namespaces the last reconciliation dumped",
        agg.namespaces() as i64,
    )
}

/// CLOSE_WAIT leaks by process (and group under `--group-by`), the oldest CLOSE_WAIT socket's
/// age in seconds, and the threshold.
pub(super) fn leaks(
    encoder: &mut DescriptorEncoder,
    leaks: &LeakState,
    group_by: Option<GroupBy>,
    close_wait_oldest: f64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_close_wait_leaked_sockets",
        "Sockets in CLOSE_WAIT for longer than --close-wait-threshold, by the comm of the \
         process holding them: the 20 processes with most, the rest summed as comm=\"other\"",
        None,
        MetricType::Gauge,
    )?;
    for ((comm, group), count) in &leaks.by_comm {
        let mut set = vec![("comm", escape_label_value(comm))];
        if group_by.is_some() {
            set.extend(group.pairs().map(|(name, value)| (name, escape_label_value(&value))));
        }
        ConstGauge::new(*count as i64).encode(family.encode_family(&set)?)?;
    }
    gauge_f64(
        encoder,
        "tcpstate_close_wait_oldest_age_seconds",
        "Age of the oldest socket in CLOSE_WAIT (0 when there is none)",
        close_wait_oldest,
    )?;
    gauge_f64(
        encoder,
        "tcpstate_close_wait_threshold_seconds",
        "The --close-wait-threshold beyond which a CLOSE_WAIT socket counts as leaked",
        leaks.report.threshold_seconds,
    )
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
pub(super) fn retransmits(
    encoder: &mut DescriptorEncoder,
    status: &Status,
    ports: &PortSeries,
) -> fmt::Result {
    let Some(retransmits) = &status.retransmits else {
        return Ok(());
    };
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

/// Accept queues of the fullest listeners, and the handshakes full queues cost.
pub(super) fn listeners(encoder: &mut DescriptorEncoder, status: &Status) -> fmt::Result {
    let report = &status.listeners;
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

/// Which programs run on this kernel, and the kernel memory of their maps.
pub(super) fn probe(encoder: &mut DescriptorEncoder, status: &Status) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_probe_info",
        "The probe's programs and whether each runs on this kernel (main: required; \
         standby: delivers what the kernel skips the main program for; accept_owner: names \
         owners of accepted sockets; retransmits: counts retransmits by state)",
        None,
        MetricType::Gauge,
    )?;
    for status in &status.parts {
        let set = [("program", status.part.name()), ("active", bool_label(status.active()))];
        ConstGauge::new(1).encode(family.encode_family(&set)?)?;
    }
    let mut family = encoder.encode_descriptor(
        "tcpstate_kernel_map_bytes",
        "Kernel memory each of the probe's BPF maps takes (preallocated at load: SOCKETS \
         grows with --kernel-sockets, EVENTS is --ring-bytes)",
        None,
        MetricType::Gauge,
    )?;
    for map in &status.map_memory {
        let name = map.name.as_str();
        ConstGauge::new(map.bytes as i64).encode(family.encode_family(&[("map", name)])?)?;
    }
    Ok(())
}

/// Only when the daemon exports over OTLP.
pub(super) fn otlp(encoder: &mut DescriptorEncoder, otlp: &OtlpStatus) -> fmt::Result {
    let family = encoder.encode_descriptor(
        "tcpstate_otlp_exports",
        "OTLP exports the receiver accepted",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(otlp.exports).encode(family)?;
    let mut family = encoder.encode_descriptor(
        "tcpstate_otlp_export_failures",
        "OTLP exports that did not land, by reason: unreachable (no connection), tls (handshake \
         failed), timeout, unauthorized (401/403: the headers' credentials), throttled (429), \
         rejected (another 4xx), server_error (5xx, or the connection broke)",
        None,
        MetricType::Counter,
    )?;
    for (reason, failures) in OtlpStatus::REASONS.iter().zip(otlp.failures) {
        ConstCounter::new(failures).encode(family.encode_family(&[("reason", *reason)])?)?;
    }
    Ok(())
}

pub(super) fn build_info(encoder: &mut DescriptorEncoder) -> fmt::Result {
    let version = escape_label_value(env!("CARGO_PKG_VERSION"));
    let info = encoder.encode_descriptor(
        "tcpstate_build",
        "tcpstate build information",
        None,
        MetricType::Info,
    )?;
    Info::new([("version", version)]).encode(info)
}
