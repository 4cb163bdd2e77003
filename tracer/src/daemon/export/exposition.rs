//! The Prometheus exposition: a `prometheus-client` collector that reads the aggregator at
//! scrape time (nothing is updated per event), encoded as OpenMetrics or, for clients that do
//! not ask for it, the classic Prometheus text format. The core and each diagnosis write their
//! own families; docs/metrics.md lists them, and a golden file holds the whole output.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};

use super::{
    family::{PortSeries, Scrape},
    otlp::outcomes::OtlpStatus,
};
use crate::{
    clock::monotonic_ns,
    daemon::core::{
        Diagnoses, Shared, families,
        groups::{self, GroupBy},
    },
};

#[derive(Debug)]
struct TcpstateCollector {
    shared: Arc<Shared>,
    diagnoses: Diagnoses,
    group_by: Option<GroupBy>,
    otlp: Option<Arc<Mutex<OtlpStatus>>>,
}

/// One scrape: the core's families, then each diagnosis's, then the daemon's own. The
/// aggregator stays locked until every diagnosis has written, so a scrape sees one moment of
/// the records (the reader feeds the diagnoses under the same lock); nothing is kept between
/// scrapes.
impl Collector for TcpstateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let now = monotonic_ns();
        let status = self.shared.status();
        let agg = self.shared.aggregator();
        let ports = PortSeries::of(agg.labels());
        let pass = agg.table().scrape_pass(self.group_by.is_some());
        let grouped = self.group_by.map(|by| {
            groups::group_sockets(pass.per_cgroup, &mut self.shared.cgroups(), by, agg.labels())
        });
        let scrape = Scrape { now, ports: &ports, oldest: &pass.oldest };
        families::write(&mut encoder, &agg, &status, &scrape, grouped.as_deref())?;
        for diagnosis in self.diagnoses.iter() {
            diagnosis.metrics(&mut encoder, &scrape)?;
        }
        drop(agg);
        families::probe(&mut encoder, &status)?;
        if let Some(otlp) = &self.otlp {
            otlp.lock().unwrap_or_else(PoisonError::into_inner).metrics(&mut encoder)?;
        }
        families::build_info(&mut encoder)
    }
}

/// Which exposition format a scraper gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// OpenMetrics when the `Accept` header asks for it (Prometheus does), the classic text
    /// format otherwise (curl, older scrapers).
    pub(crate) fn negotiate(accept: Option<&str>) -> Self {
        let wants_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|part| {
                let mut params = part.split(';').map(str::trim);
                params.next() == Some("application/openmetrics-text")
                    && !params.any(|p| p.replace(' ', "") == "q=0")
            })
        });
        if wants_openmetrics { Self::OpenMetrics } else { Self::PrometheusText }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The registry the HTTP endpoint encodes.
pub(crate) struct Exporter {
    registry: Registry,
    diagnoses: Diagnoses,
}

impl Exporter {
    pub(crate) fn new(
        shared: Arc<Shared>,
        diagnoses: Diagnoses,
        group_by: Option<GroupBy>,
        otlp: Option<Arc<Mutex<OtlpStatus>>>,
    ) -> Self {
        let mut registry = Registry::default();
        let collector = TcpstateCollector { shared, diagnoses: diagnoses.clone(), group_by, otlp };
        registry.register_collector(Box::new(collector));
        Self { registry, diagnoses }
    }

    /// The OTLP unit a diagnosis declares for family `name` (without `tcpstate_`).
    pub(crate) fn declared_unit(&self, name: &str) -> Option<&'static str> {
        self.diagnoses.unit(name)
    }

    pub(crate) fn render(&self, format: Format) -> Result<String, fmt::Error> {
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
pub(crate) fn to_prometheus_text(openmetrics: &str) -> String {
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
pub(crate) mod tests {
    use super::*;
    use crate::daemon::export::family::escape_label_value;

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
    /// first, one the server does), a refused connect and a reset; and the diagnoses' known
    /// kernel counts and listener dumps.
    pub(crate) fn exporter_after_known_transitions() -> Exporter {
        use tracer_common::TcpState as S;

        use crate::daemon::{
            collectors,
            core::{Aggregator, PortLabels, tests::record},
        };

        let mut aggregator = Aggregator::new(100, PortLabels::none());
        // Every record a moment ago: within the last minute's failures by destination.
        let base = monotonic_ns().saturating_sub(1_000_000_000);
        let diagnoses = collectors::tests::after_known_inputs(base);
        let mut apply = |record| {
            let applied = aggregator.apply(record);
            for diagnosis in diagnoses.iter() {
                diagnosis.transitions(&[applied]);
            }
        };
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
                let ts = base + 1_000_000 * (step as u64 + 1);
                apply(record(skaddr, ts, old, new, 40_000));
            }
        }
        let mut refused = record(0x3000, base + 9_000_000, S::SYN_SENT, S::CLOSE, 40_001);
        refused.error = libc::ECONNREFUSED as u8;
        apply(record(0x3000, base + 8_000_000, S::CLOSE, S::SYN_SENT, 40_001));
        apply(refused);
        let mut reset = record(0x4000, base + 9_500_000, S::ESTABLISHED, S::CLOSE, 40_002);
        reset.error = libc::ECONNRESET as u8;
        apply(record(0x4000, base + 9_000_000, S::SYN_SENT, S::ESTABLISHED, 40_002));
        apply(reset);
        let shared = Arc::new(Shared::new(aggregator));
        // Exports over OTLP: twelve landed, two found the receiver down, one was refused.
        let mut otlp = OtlpStatus { exports: 12, ..Default::default() };
        otlp.failures[0] = 2;
        otlp.failures[3] = 1;
        Exporter::new(shared, diagnoses, None, Some(Arc::new(Mutex::new(otlp))))
    }

    fn rendered_after_known_transitions() -> String {
        let text = exporter_after_known_transitions().render(Format::PrometheusText).unwrap();
        text.replace(env!("CARGO_PKG_VERSION"), "VERSION")
    }

    /// The whole `/metrics` output, byte for byte, against `testdata/metrics.txt`: a change
    /// to any family's name, help, labels or values shows up here. `TCPSTATE_BLESS=1 cargo
    /// test` rewrites the file after an intended change.
    #[test]
    fn metrics_output_matches_the_golden_file() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/daemon/export/testdata/metrics.txt");
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
