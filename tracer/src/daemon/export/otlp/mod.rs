//! OTLP export: every `OTEL_METRIC_EXPORT_INTERVAL` the daemon encodes the same scrape
//! `/metrics` serves as an OTLP/HTTP protobuf request and posts it. Beside the reader, never
//! in its way: a task of its own, the encoding on a blocking thread like a scrape's. Nothing
//! is queued while the receiver is down: values are cumulative, so the next export that lands
//! carries everything, and memory stays what one export takes.

mod encode;
mod naming;
pub(crate) mod outcomes;
pub(crate) mod read_back;
pub(crate) mod settings;
mod transport;

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hyper::body::Bytes;
use prost::Message as _;

use self::outcomes::OtlpStatus;
pub(crate) use self::settings::{OtlpSettings, SettingError};
use self::transport::{ExportError, Landed, Transport};
use super::exposition::{Exporter, Format};

/// Longest wait between attempts while the receiver fails (the interval when longer).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long the last export at shutdown may take: the daemon exits within 2 s of a signal.
const FINAL_EXPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks what only a connection attempt would otherwise find wrong: the certificate files.
pub(crate) fn check(settings: &OtlpSettings) -> Result<(), SettingError> {
    Transport::new(settings).map(drop).map_err(|error| SettingError {
        name: "OTEL_EXPORTER_OTLP_CERTIFICATE".to_owned(),
        reason: format!("{error:#}"),
    })
}

/// The export task; `stop` ends it after one last export.
pub(crate) struct OtlpExport {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl OtlpExport {
    pub(crate) fn start(
        settings: OtlpSettings,
        status: Arc<Mutex<OtlpStatus>>,
        exporter: Arc<Exporter>,
    ) -> anyhow::Result<Self> {
        let transport = Transport::new(&settings)?;
        log::info!(
            "exporting metrics over OTLP to {} every {} ms",
            settings.endpoint,
            settings.interval.as_millis()
        );
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let exporting = Exporting {
            settings,
            transport,
            status,
            exporter,
            start_ns: unix_ns(),
            outage: None,
            answer_trouble: None,
        };
        Ok(Self { task: tokio::spawn(exporting.run(stopped)), stop })
    }

    /// Sends what changed since the last export, then stops.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        // The encoding too must fit: past this, the task is left behind.
        if tokio::time::timeout(FINAL_EXPORT_TIMEOUT + Duration::from_millis(500), self.task)
            .await
            .is_err()
        {
            log::debug!("the last OTLP export did not finish");
        }
    }
}

/// An outage: since when exports fail, how many, and the cause last logged.
struct Outage {
    since: Instant,
    failed: u64,
    reason: &'static str,
}

struct Exporting {
    settings: OtlpSettings,
    transport: Transport,
    /// What the exports did, served in `/metrics`.
    status: Arc<Mutex<OtlpStatus>>,
    exporter: Arc<Exporter>,
    /// When the cumulative values began (ns since the Unix epoch).
    start_ns: u64,
    outage: Option<Outage>,
    /// The kind of trouble with success answers last logged, while it lasts.
    answer_trouble: Option<String>,
}

impl Exporting {
    async fn run(mut self, mut stopped: tokio::sync::oneshot::Receiver<()>) {
        let mut next = Instant::now() + self.settings.interval;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next.into()) => {}
                _ = &mut stopped => {
                    self.transport.set_timeout(self.settings.timeout.min(FINAL_EXPORT_TIMEOUT));
                    self.export().await;
                    return;
                }
            }
            let started = Instant::now();
            self.export().await;
            next = started + self.delay();
        }
    }

    /// The interval, or while the receiver fails, a wait that doubles with each failure up to
    /// `MAX_BACKOFF` (or the interval when longer).
    fn delay(&self) -> Duration {
        let interval = self.settings.interval;
        let Some(outage) = &self.outage else { return interval };
        let doubled = interval.saturating_mul(1 << outage.failed.min(16) as u32);
        doubled.min(interval.max(MAX_BACKOFF))
    }

    async fn export(&mut self) {
        let exporter = self.exporter.clone();
        let resource = self.settings.resource.clone();
        let start = self.start_ns;
        let encoded =
            tokio::task::spawn_blocking(move || encode_scrape(&exporter, &resource, start)).await;
        let body = match encoded {
            Ok(Ok(body)) => body,
            Ok(Err(error)) => {
                log::error!("OTLP export skipped: the exposition could not be read back: {error}");
                return;
            }
            Err(join) => {
                log::error!("OTLP export skipped: encoding failed: {join}");
                return;
            }
        };
        match self.transport.post(body).await {
            Ok(landed) => self.succeeded(&landed),
            Err(error) => self.failed(&error),
        }
    }

    fn succeeded(&mut self, landed: &Landed) {
        {
            let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            status.exports += 1;
            status.rejected_points += landed.rejected_points;
            if let Some(unreadable) = landed.unreadable {
                status.unreadable_answers[unreadable as usize] += 1;
            }
        }
        self.warn_about_answer(landed);
        if let Some(outage) = self.outage.take() {
            log::info!(
                "OTLP export to {} works again after {} failed exports over {} s",
                self.settings.endpoint,
                outage.failed,
                outage.since.elapsed().as_secs()
            );
        }
    }

    /// A partial success or an answer that is none, logged when it starts or its reason
    /// changes, not at every export.
    fn warn_about_answer(&mut self, landed: &Landed) {
        let (key, trouble) = match (landed.unreadable, landed.rejected_points) {
            (Some(unreadable), _) => (
                unreadable.name().to_owned(),
                format!(
                    "answered with success but a body that is not an OTLP response ({}); \
                     counted in tcpstate_otlp_unreadable_answers_total",
                    unreadable.name()
                ),
            ),
            (None, 0) => {
                self.answer_trouble = None;
                return;
            }
            (None, rejected) => {
                let reason = landed.rejection.as_deref().unwrap_or("no reason given");
                (
                    format!("rejected: {reason}"),
                    format!(
                        "accepted the export but rejected {rejected} data points ({reason}); \
                         counted in tcpstate_otlp_rejected_points_total"
                    ),
                )
            }
        };
        if self.answer_trouble.as_ref() != Some(&key) {
            log::warn!("OTLP receiver {} {trouble}", self.settings.endpoint);
            self.answer_trouble = Some(key);
        }
    }

    fn failed(&mut self, error: &ExportError) {
        let reason = error.reason();
        let at = ExportError::REASONS.iter().position(|r| *r == reason).unwrap_or(0);
        self.status.lock().unwrap_or_else(PoisonError::into_inner).failures[at] += 1;
        let outage =
            self.outage.get_or_insert(Outage { since: Instant::now(), failed: 0, reason: "" });
        outage.failed += 1;
        // Once per outage, and again when its cause changes.
        if outage.reason != reason {
            outage.reason = reason;
            log::warn!(
                "OTLP export to {} failed: {error}; tracing and /metrics go on, exports are \
                 retried (waits double up to {} s) and failures counted in \
                 tcpstate_otlp_export_failures_total{{reason=\"{reason}\"}}",
                self.settings.endpoint,
                self.settings.interval.max(MAX_BACKOFF).as_secs()
            );
        }
    }
}

/// The scrape as an encoded OTLP request.
fn encode_scrape(
    exporter: &Exporter,
    resource: &[(String, String)],
    start_ns: u64,
) -> Result<Bytes, String> {
    let text = exporter.render(Format::OpenMetrics).map_err(|e| format!("rendering: {e}"))?;
    let families = read_back::parse(&text)?;
    let times = encode::Times { start: start_ns, now: unix_ns() };
    let declared = |name: &str| exporter.declared_unit(name);
    Ok(Bytes::from(encode::request(&families, resource, times, &declared).encode_to_vec()))
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::metrics::v1::ExportMetricsServiceRequest, metrics::v1::metric::Data,
    };

    use super::*;
    use crate::daemon::export::exposition::tests::exporter_after_known_transitions;

    fn known_families() -> Vec<read_back::Family> {
        let text = exporter_after_known_transitions().render(Format::OpenMetrics).unwrap();
        read_back::parse(&text).unwrap()
    }

    /// A family's OTLP name and unit, with what its diagnosis declares.
    fn otlp_name(prometheus: &str) -> Option<(String, &'static str)> {
        let exporter = exporter_after_known_transitions();
        let own = prometheus.strip_prefix("tcpstate_").and_then(|n| exporter.declared_unit(n));
        naming::otlp_name(prometheus, own)
    }

    /// Every family of a full scrape crosses over, with as many points as it has series.
    #[test]
    fn every_family_is_exported_with_every_series() {
        let families = known_families();
        let body = encode_scrape(&exporter_after_known_transitions(), &[], 1).unwrap();
        let request = ExportMetricsServiceRequest::decode(body).unwrap();
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let unnamed: Vec<_> = families
            .iter()
            .map(encode::prometheus_name)
            .filter(|name| otlp_name(name).is_none())
            .collect();
        assert!(unnamed.is_empty(), "no OTLP name for {unnamed:?}: add them to naming.rs");
        assert_eq!(metrics.len(), families.len());
        for (family, metric) in families.iter().zip(metrics) {
            let points = match metric.data.as_ref().unwrap() {
                Data::Sum(sum) => sum.data_points.len(),
                Data::Gauge(gauge) => gauge.data_points.len(),
                Data::Histogram(histogram) => histogram.data_points.len(),
                other => panic!("{}: unexpected {other:?}", metric.name),
            };
            assert_eq!(points, family.series.len(), "{}", metric.name);
        }
    }

    /// docs/metrics.md's OTLP table lists each family's OTLP name and unit as exported.
    #[test]
    fn the_otlp_names_are_documented() {
        let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
        let page = std::fs::read_to_string(page).unwrap();
        let documented: std::collections::BTreeMap<String, (String, String)> = page
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let [_, prometheus, otlp, unit, ..] = cells.as_slice() else { return None };
                let otlp = otlp.strip_prefix('`')?.strip_suffix('`')?;
                let unit = unit.strip_prefix('`')?.strip_suffix('`')?;
                let prometheus = prometheus.strip_prefix('`')?.strip_suffix('`')?;
                Some((prometheus.to_owned(), (otlp.to_owned(), unit.to_owned())))
            })
            .collect();
        for family in known_families() {
            let prometheus = encode::prometheus_name(&family);
            let (name, unit) = otlp_name(&prometheus).unwrap();
            assert_eq!(
                documented.get(&prometheus),
                Some(&(name.clone(), unit.to_owned())),
                "docs/metrics.md's OTLP table should list `{prometheus}` | `{name}` | `{unit}`"
            );
        }
    }
}
