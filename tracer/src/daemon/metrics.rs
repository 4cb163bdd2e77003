//! The Prometheus exposition: a `prometheus-client` collector that reads the aggregator at
//! scrape time (nothing is updated per event), encoded as OpenMetrics or, for clients that do
//! not ask for it, the classic Prometheus text format.

use std::{collections::HashMap, fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tracer_common::TcpState;

use super::{
    Shared,
    aggregate::{DURATION_BUCKETS, SAMPLED_STATES},
    groups::{self, GroupBy, GroupLabels},
};
use crate::{
    clock::monotonic_ns,
    failure::{CONNECT_REASONS, ResetDirection},
};

/// States that have gauges: all but CLOSE (a socket leaves the table when it closes).
fn gauge_states() -> impl Iterator<Item = TcpState> {
    TcpState::ALL.into_iter().filter(|s| *s != TcpState::CLOSE)
}

/// States with completed stays: those the tracepoint reports a socket entering and leaving.
fn stay_states() -> impl Iterator<Item = TcpState> {
    gauge_states().filter(|s| !SAMPLED_STATES.contains(s))
}

/// Label values are escaped as the exposition formats require.
pub(super) fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug)]
struct TcpstateCollector {
    shared: Arc<Shared>,
    group_by: Option<GroupBy>,
}

impl Collector for TcpstateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let now = monotonic_ns();
        let status = self.shared.status();
        let agg = self.shared.aggregator();
        let labels = agg.labels().clone();
        let label_sets: Vec<Vec<(&str, String)>> = (0..labels.values())
            .map(|i| if labels.enabled() { vec![("port", labels.value(i))] } else { vec![] })
            .collect();
        let with = |base: &[(&'static str, String)], label: usize| {
            let mut set: Vec<(&str, String)> = base.to_vec();
            set.extend(label_sets[label].iter().cloned());
            set
        };

        let mut family = encoder.encode_descriptor(
            "tcpstate_transitions",
            "TCP state transitions, by old (from) and new (to) state",
            None,
            MetricType::Counter,
        )?;
        for label in 0..labels.values() {
            for from in TcpState::ALL {
                for to in TcpState::ALL {
                    let count = agg.transitions(label, from, to);
                    if count > 0 {
                        let set =
                            with(&[("from", from.to_string()), ("to", to.to_string())], label);
                        ConstCounter::new(count).encode(family.encode_family(&set)?)?;
                    }
                }
            }
        }

        let mut family = encoder.encode_descriptor(
            "tcpstate_connect_failures",
            "connect() attempts that failed (SYN_SENT -> CLOSE), by reason: refused, timeout, \
             unreachable, reset, aborted (given up by the program), other",
            None,
            MetricType::Counter,
        )?;
        for label in 0..labels.values() {
            for (reason, count) in CONNECT_REASONS.iter().zip(agg.connect_failures(label)) {
                let set = with(&[("reason", (*reason).to_owned())], label);
                ConstCounter::new(*count).encode(family.encode_family(&set)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "tcpstate_resets",
            "Connections ended by a reset, received from the peer or sent by this host \
             (SO_LINGER 0, close() with unread data, ss -K), by the state it hit",
            None,
            MetricType::Counter,
        )?;
        for label in 0..labels.values() {
            for direction in ResetDirection::ALL {
                for state in TcpState::ALL {
                    let count = agg.resets(label, direction, state);
                    if count > 0 {
                        let base = [
                            ("direction", direction.name().to_owned()),
                            ("state", state.to_string()),
                        ];
                        ConstCounter::new(count)
                            .encode(family.encode_family(&with(&base, label))?)?;
                    }
                }
            }
        }

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
        let family = encoder.encode_descriptor(
            "tcpstate_ephemeral_port_usage_max_ratio",
            "The highest share of the ephemeral port range any destination holds (see \
             tcpstate_ephemeral_port_usage_ratio)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(*max_usage).encode(family)?;

        let mut family = encoder.encode_descriptor(
            "tcpstate_state_duration_seconds",
            "Completed stays in each state whose length is exactly known (first sightings and \
             sockets older than the daemon are left out)",
            None,
            MetricType::Histogram,
        )?;
        for state in stay_states() {
            let stays = agg.stays(state);
            let mut buckets: Vec<(f64, u64)> =
                DURATION_BUCKETS.iter().copied().zip(stays.buckets.iter().copied()).collect();
            buckets.push((f64::MAX, stays.buckets[DURATION_BUCKETS.len()]));
            let set = [("state", state.to_string())];
            family
                .encode_family(&set)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    stays.sum_ns as f64 / 1e9,
                    stays.count,
                    &buckets,
                    None,
                )?;
        }

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

        let mut family = encoder.encode_descriptor(
            "tcpstate_sockets",
            "Sockets in each state now (TIME_WAIT and NEW_SYN_RECV sampled from sock_diag at \
             each reconciliation)",
            None,
            MetricType::Gauge,
        )?;
        // Under --group-by, each gauge splits into its groups' counts and what is left (no
        // group), so every sum by state stays exact.
        let pass = agg.table().scrape_pass(self.group_by.is_some());
        let grouped = self.group_by.map(|by| {
            groups::group_sockets(pass.per_cgroup, &mut self.shared.cgroups(), by, &labels)
        });
        for label in 0..labels.values() {
            for state in gauge_states() {
                let count = gauges.count_for_label(label, state).max(0);
                let Some(grouped) = &grouped else {
                    let set = with(&[("state", state.to_string())], label);
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
                let no_group = GroupLabels::default();
                series.push((&no_group, rest.max(0)));
                for (group, value) in series {
                    let mut base = vec![("state", state.to_string())];
                    base.extend(group.pairs().map(|(name, v)| (name, escape_label_value(&v))));
                    ConstGauge::new(value).encode(family.encode_family(&with(&base, label))?)?;
                }
            }
        }

        let oldest = pass.oldest;
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
                ConstGauge::new(age)
                    .encode(family.encode_family(&[("state", state.to_string())])?)?;
            }
        }

        let close_wait_oldest = oldest[TcpState::CLOSE_WAIT.index()]
            .map_or(0.0, |entered| now.saturating_sub(entered) as f64 / 1e9);
        let delivery = status.delivery;
        counter(&mut encoder, "tcpstate_events", "Transition records received", agg.events())?;
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
            &mut encoder,
            "tcpstate_events_rescued",
            "Transitions the kernel skipped the main program for, delivered by the standby program",
            delivery.rescued,
        )?;
        counter(
            &mut encoder,
            "tcpstate_events_duplicates_dropped",
            "Second deliveries of one transition (by both kernel programs) the reader dropped",
            status.duplicates_dropped,
        )?;
        gauge(
            &mut encoder,
            "tcpstate_netns_skipped",
            "Network namespaces the last sock_diag dump could not enter for lack of privilege \
             (their sockets are missing from the gauges)",
            status.netns_refused as i64,
        )?;
        counter(
            &mut encoder,
            "tcpstate_kernel_map_update_failures",
            "Per-socket kernel map updates that failed (the socket's next duration is unknown)",
            delivery.map_update_failed,
        )?;
        gauge(
            &mut encoder,
            "tcpstate_tracked_sockets",
            "Sockets in the daemon's table",
            agg.table().len() as i64,
        )?;
        gauge(
            &mut encoder,
            "tcpstate_table_saturated",
            "1 when the table cannot hold every socket (--max-sockets): gauges then come from \
             sock_diag dumps and records, per-socket details only for the sockets it holds",
            i64::from(agg.saturated()),
        )?;
        gauge(
            &mut encoder,
            "tcpstate_table_untracked_sockets",
            "Sockets the last sock_diag dump listed that the full table could not hold",
            agg.untracked() as i64,
        )?;
        counter(
            &mut encoder,
            "tcpstate_reconcile_corrections",
            "Table entries a sock_diag reconciliation added, removed or repaired",
            agg.corrections(),
        )?;
        counter(
            &mut encoder,
            "tcpstate_owner_lookups_dropped",
            "Accepted sockets whose owner was not looked up in the kernel's map because 262,144 \
             were already waiting (they show no owner until their owner closes them)",
            agg.unnamed_dropped(),
        )?;
        gauge(
            &mut encoder,
            "tcpstate_network_namespaces",
            "Network namespaces the last reconciliation dumped",
            agg.namespaces() as i64,
        )?;
        drop(agg);

        let leaks = self.shared.leaks();
        let mut family = encoder.encode_descriptor(
            "tcpstate_close_wait_leaked_sockets",
            "Sockets in CLOSE_WAIT for longer than --close-wait-threshold, by the comm of the \
             process holding them: the 20 processes with most, the rest summed as comm=\"other\"",
            None,
            MetricType::Gauge,
        )?;
        for ((comm, group), count) in &leaks.by_comm {
            let mut set = vec![("comm", escape_label_value(comm))];
            if self.group_by.is_some() {
                set.extend(group.pairs().map(|(name, value)| (name, escape_label_value(&value))));
            }
            ConstGauge::new(*count as i64).encode(family.encode_family(&set)?)?;
        }
        let gauge_f64 = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64| {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)
        };
        gauge_f64(
            &mut encoder,
            "tcpstate_close_wait_oldest_age_seconds",
            "Age of the oldest socket in CLOSE_WAIT (0 when there is none)",
            close_wait_oldest,
        )?;
        gauge_f64(
            &mut encoder,
            "tcpstate_close_wait_threshold_seconds",
            "The --close-wait-threshold beyond which a CLOSE_WAIT socket counts as leaked",
            leaks.report.threshold_seconds,
        )?;

        let mut family = encoder.encode_descriptor(
            "tcpstate_probe_info",
            "The probe's programs and whether each runs on this kernel (main: required; \
             standby: delivers what the kernel skips the main program for; accept_owner: names \
             owners of accepted sockets)",
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

        let version = escape_label_value(env!("CARGO_PKG_VERSION"));
        let info = encoder.encode_descriptor(
            "tcpstate_build",
            "tcpstate build information",
            None,
            MetricType::Info,
        )?;
        prometheus_client::metrics::info::Info::new([("version", version)]).encode(info)?;
        Ok(())
    }
}

const fn bool_label(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// Which exposition format a scraper gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// OpenMetrics when the `Accept` header asks for it (Prometheus does), the classic text
    /// format otherwise (curl, older scrapers).
    pub(super) fn negotiate(accept: Option<&str>) -> Self {
        let wants_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|part| {
                let mut params = part.split(';').map(str::trim);
                params.next() == Some("application/openmetrics-text")
                    && !params.any(|p| p.replace(' ', "") == "q=0")
            })
        });
        if wants_openmetrics { Self::OpenMetrics } else { Self::PrometheusText }
    }

    pub(super) fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The registry the HTTP endpoint encodes.
pub(super) struct Exporter {
    registry: Registry,
}

impl Exporter {
    pub(super) fn new(shared: Arc<Shared>, group_by: Option<GroupBy>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(TcpstateCollector { shared, group_by }));
        Self { registry }
    }

    pub(super) fn render(&self, format: Format) -> Result<String, fmt::Error> {
        let mut openmetrics = String::with_capacity(16 << 10);
        prometheus_client::encoding::text::encode(&mut openmetrics, &self.registry)?;
        Ok(match format {
            Format::OpenMetrics => openmetrics,
            Format::PrometheusText => to_prometheus_text(&openmetrics),
        })
    }
}

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4: counter and info families take
/// their samples' names (`_total`, `_info`), info becomes a gauge, and there is no `# EOF`.
pub(super) fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut renamed: HashMap<&str, (&str, &str)> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.split_once(' ') {
                Some((name, "counter")) => renamed.insert(name, ("_total", "counter")),
                Some((name, "info")) => renamed.insert(name, ("_info", "gauge")),
                _ => None,
            };
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# TYPE ", "# HELP "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let (suffix, kind) = renamed.get(name)?;
            let tail = if *prefix == "# TYPE " { kind } else { tail };
            Some(format!("{prefix}{name}{suffix} {tail}"))
        });
        match rewritten {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn negotiation_follows_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::PrometheusText);
        assert_eq!(Format::negotiate(None), Format::PrometheusText);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0")),
            Format::PrometheusText
        );
    }

    #[test]
    fn openmetrics_is_rewritten_as_classic_text() {
        let om = "# HELP x_events Events.\n# TYPE x_events counter\nx_events_total 3\n\
                  # HELP x_build Build.\n# TYPE x_build info\nx_build_info{version=\"1\"} 1\n\
                  # HELP x_sockets Sockets.\n# TYPE x_sockets gauge\nx_sockets 2\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP x_events_total Events.\n# TYPE x_events_total counter\nx_events_total 3\n\
             # HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{version=\"1\"} 1\n\
             # HELP x_sockets Sockets.\n# TYPE x_sockets gauge\nx_sockets 2\n"
        );
    }

    /// A daemon's metrics after a known set of transitions, every socket closed again so that
    /// nothing depends on the time of the scrape: two connections (one the client closes
    /// first, one the server does), a refused connect and a reset.
    fn rendered_after_known_transitions() -> String {
        use tracer_common::TcpState as S;

        use crate::daemon::{aggregate::tests::record, gauges::PortLabels, leak_watch::LeakState};

        let mut aggregator = super::super::Aggregator::new(100, PortLabels::none());
        let connection: [(u64, [(S, S); 5]); 2] = [
            (
                0x1000,
                [
                    (S::CLOSE, S::SYN_SENT),
                    (S::SYN_SENT, S::ESTABLISHED),
                    (S::ESTABLISHED, S::FIN_WAIT1),
                    (S::FIN_WAIT1, S::FIN_WAIT2),
                    (S::FIN_WAIT2, S::CLOSE),
                ],
            ),
            (
                0x2000,
                [
                    (S::LISTEN, S::SYN_RECV),
                    (S::SYN_RECV, S::ESTABLISHED),
                    (S::ESTABLISHED, S::CLOSE_WAIT),
                    (S::CLOSE_WAIT, S::LAST_ACK),
                    (S::LAST_ACK, S::CLOSE),
                ],
            ),
        ];
        for (skaddr, moves) in connection {
            for (step, (old, new)) in moves.into_iter().enumerate() {
                let ts = 1_000_000 * (step as u64 + 1);
                aggregator.apply(&record(skaddr, ts, old, new, 40_000));
            }
        }
        let mut refused = record(0x3000, 9_000_000, S::SYN_SENT, S::CLOSE, 40_001);
        refused.error = libc::ECONNREFUSED as u8;
        aggregator.apply(&record(0x3000, 8_000_000, S::CLOSE, S::SYN_SENT, 40_001));
        aggregator.apply(&refused);
        let mut reset = record(0x4000, 9_500_000, S::ESTABLISHED, S::CLOSE, 40_002);
        reset.error = libc::ECONNRESET as u8;
        aggregator.apply(&record(0x4000, 9_000_000, S::SYN_SENT, S::ESTABLISHED, 40_002));
        aggregator.apply(&reset);

        let shared = Arc::new(Shared::new(aggregator, LeakState::new(Duration::from_secs(60))));
        let text = Exporter::new(shared, None).render(Format::PrometheusText).unwrap();
        text.replace(env!("CARGO_PKG_VERSION"), "VERSION")
    }

    /// The whole `/metrics` output, byte for byte, against `testdata/metrics.txt`: a change
    /// to any family's name, help, labels or values shows up here. `TCPSTATE_BLESS=1 cargo
    /// test` rewrites the file after an intended change.
    #[test]
    fn metrics_output_matches_the_golden_file() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/daemon/testdata/metrics.txt");
        let rendered = rendered_after_known_transitions();
        if std::env::var_os("TCPSTATE_BLESS").is_some() {
            std::fs::write(&golden, &rendered).unwrap();
        }
        let expected = std::fs::read_to_string(&golden).unwrap();
        if rendered != expected {
            let first = rendered.lines().zip(expected.lines()).find(|(r, e)| r != e);
            panic!(
                "/metrics differs from {}: first differing line {first:?} (rendered, golden); \
                 TCPSTATE_BLESS=1 cargo test metrics_output rewrites it if the change is meant",
                golden.display()
            );
        }
    }

    /// docs/metrics.md lists exactly the families the daemon serves.
    #[test]
    fn every_served_metric_is_documented() {
        let served: std::collections::BTreeSet<String> = rendered_after_known_transitions()
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split(' ').next())
            .map(str::to_owned)
            .collect();
        let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
        let page = std::fs::read_to_string(page).unwrap();
        let documented: std::collections::BTreeSet<String> = page
            .lines()
            .filter_map(|line| line.strip_prefix("| `tcpstate_"))
            .filter_map(|rest| rest.split('`').next())
            .map(|name| format!("tcpstate_{name}"))
            .collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let not_served: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty() && not_served.is_empty(),
            "docs/metrics.md is out of step with /metrics: served but not listed {undocumented:?}; \
             listed but not served {not_served:?}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("a\nb"), "a\\nb");
    }
}
