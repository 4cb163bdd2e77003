//! The core's own metric families: transitions, stays, sockets per state, what was delivered
//! and lost, the table and the probe. Diagnoses write theirs themselves; `write` is the
//! core's part of a scrape.

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
};
use tracer_common::TcpState;

use super::{
    aggregate::{Aggregator, SAMPLED_STATES},
    groups::GroupLabels,
    table::Counts,
};
use crate::daemon::{
    export::family::{
        PortSeries, Scrape, bool_label, counter, escape_label_value, gauge, gauge_f64, histogram,
    },
    status::Status,
};

/// The families of the socket table and of delivery, in the order they are served.
pub(crate) fn write(
    encoder: &mut DescriptorEncoder,
    agg: &Aggregator,
    status: &Status,
    scrape: &Scrape,
    grouped: Option<&[(GroupLabels, Counts)]>,
) -> fmt::Result {
    transitions(encoder, agg, scrape.ports)?;
    stay_durations(encoder, agg)?;
    state_seconds(encoder, agg, scrape.now)?;
    sockets(encoder, agg, scrape.ports, grouped)?;
    oldest_stays(encoder, scrape.oldest, scrape.now)?;
    delivery(encoder, agg, status)?;
    table(encoder, agg, status)
}

/// States that have gauges: all but CLOSE (a socket leaves the table when it closes).
fn gauge_states() -> impl Iterator<Item = TcpState> {
    TcpState::ALL.into_iter().filter(|s| *s != TcpState::CLOSE)
}

/// States with completed stays: those the tracepoint reports a socket entering and leaving.
fn stay_states() -> impl Iterator<Item = TcpState> {
    gauge_states().filter(|s| !SAMPLED_STATES.contains(s))
}

fn transitions(
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

fn stay_durations(encoder: &mut DescriptorEncoder, agg: &Aggregator) -> fmt::Result {
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

fn state_seconds(encoder: &mut DescriptorEncoder, agg: &Aggregator, now: u64) -> fmt::Result {
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
fn sockets(
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
fn oldest_stays(
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
fn delivery(encoder: &mut DescriptorEncoder, agg: &Aggregator, status: &Status) -> fmt::Result {
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
fn table(encoder: &mut DescriptorEncoder, agg: &Aggregator, status: &Status) -> fmt::Result {
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
        "Per-socket kernel map updates that failed (the socket's next stay is unknown)",
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
        "Drift a sock_diag reconciliation repaired: table entries it added, removed or whose \
         state it changed, that no record explained (a transition lost, or never reported); \
         sockets that moved while the dump ran, connects whose local port was not picked yet \
         and timewait minisockets are not drift",
        agg.corrections(),
    )?;
    counter(
        encoder,
        "tcpstate_reconciliations",
        "sock_diag reconciliations completed since start (the seeding dump not included)",
        agg.reconciliations(),
    )?;
    gauge_f64(
        encoder,
        "tcpstate_reconcile_duration_seconds",
        "How long the last reconciliation took: the sock_diag dump of every network namespace \
         and the table compared with it (0 before the first)",
        agg.last_reconcile_ns() as f64 / 1e9,
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

/// Which programs run on this kernel, and the kernel memory of their maps.
pub(crate) fn probe(encoder: &mut DescriptorEncoder, status: &Status) -> fmt::Result {
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

pub(crate) fn build_info(encoder: &mut DescriptorEncoder) -> fmt::Result {
    let version = escape_label_value(env!("CARGO_PKG_VERSION"));
    let info = encoder.encode_descriptor(
        "tcpstate_build",
        "tcpstate build information",
        None,
        MetricType::Info,
    )?;
    Info::new([("version", version)]).encode(info)
}
