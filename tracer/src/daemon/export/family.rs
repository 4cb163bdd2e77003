//! What every metric family writer uses: one-value families, histograms, the `port` label of
//! `--port-label` series, escaping, and the scrape's context.

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use tracer_common::TcpState;

use crate::daemon::core::{
    PortLabels,
    histogram::{DURATION_BUCKETS, DurationHistogram},
};

/// What a family writer may need of the scrape it writes for.
pub(crate) struct Scrape<'a> {
    /// When the scrape started (CLOCK_MONOTONIC ns).
    pub now: u64,
    pub ports: &'a PortSeries,
    /// When the longest stay in progress in each state began.
    pub oldest: &'a [Option<u64>; TcpState::INDEXES],
}

/// Label values are escaped as the exposition formats require.
pub(crate) fn escape_label_value(value: &str) -> String {
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

/// The `port` label of each `--port-label` series (one series without labels otherwise).
pub(crate) struct PortSeries(Vec<Vec<(&'static str, String)>>);

impl PortSeries {
    pub(crate) fn of(labels: &PortLabels) -> Self {
        Self(
            (0..labels.values())
                .map(|i| if labels.enabled() { vec![("port", labels.value(i))] } else { vec![] })
                .collect(),
        )
    }

    /// Whether the series carry a `port` label (`--port-label` given).
    pub(crate) fn labelled(&self) -> bool {
        self.0.iter().any(|set| !set.is_empty())
    }

    /// The series' indexes, as the aggregator's counters take them.
    pub(crate) fn indexes(&self) -> std::ops::Range<usize> {
        0..self.0.len()
    }

    /// `base` with series `index`'s port label.
    pub(crate) fn with(
        &self,
        base: &[(&'static str, String)],
        index: usize,
    ) -> Vec<(&'static str, String)> {
        let mut set = base.to_vec();
        set.extend(self.0[index].iter().cloned());
        set
    }
}

pub(crate) fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

pub(crate) fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

pub(crate) fn gauge_f64(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

pub(crate) const fn bool_label(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

/// One histogram series on the duration buckets.
pub(crate) fn histogram(
    family: &mut prometheus_client::encoding::MetricEncoder,
    labels: &[(&str, String)],
    observed: &DurationHistogram,
) -> fmt::Result {
    let mut buckets: Vec<(f64, u64)> =
        DURATION_BUCKETS.iter().copied().zip(observed.buckets.iter().copied()).collect();
    buckets.push((f64::MAX, observed.buckets[DURATION_BUCKETS.len()]));
    family.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
        observed.sum_ns as f64 / 1e9,
        observed.count,
        &buckets,
        None,
    )
}
