//! One export request from the families of a scrape: counters as monotonic cumulative sums,
//! gauges as gauges (the connection count as the non-monotonic sum its convention asks for),
//! histograms with the same explicit buckets. Every value is cumulative since the daemon
//! started, so an export that fails loses nothing: the next one carries it.

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
    },
    resource::v1::Resource,
};

use super::{
    naming,
    read_back::{Family, Kind, Value},
};

/// When the values began and when they were read, in ns since the Unix epoch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Times {
    pub(super) start: u64,
    pub(super) now: u64,
}

/// The request for `families`, under `resource`. A family the naming table does not know is
/// left out (and the tests fail).
/// `declared`: the unit a diagnosis declares for a family (by its name without `tcpstate_`).
pub(super) fn request(
    families: &[Family],
    resource: &[(String, String)],
    times: Times,
    declared: &dyn Fn(&str) -> Option<&'static str>,
) -> ExportMetricsServiceRequest {
    let metrics = families.iter().filter_map(|family| metric(family, times, declared)).collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| key_value(k.clone(), v.clone())).collect(),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "tcpstate".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The Prometheus text name of a family read from OpenMetrics.
pub(super) fn prometheus_name(family: &Family) -> String {
    match family.kind {
        Kind::Counter => format!("{}_total", family.name),
        Kind::Info => format!("{}_info", family.name),
        Kind::Gauge | Kind::Histogram => family.name.clone(),
    }
}

fn metric(
    family: &Family,
    times: Times,
    declared: &dyn Fn(&str) -> Option<&'static str>,
) -> Option<Metric> {
    let prometheus = prometheus_name(family);
    let own = prometheus.strip_prefix("tcpstate_").and_then(declared);
    let (name, unit) = naming::otlp_name(&prometheus, own)?;
    let cumulative = AggregationTemporality::Cumulative as i32;
    // Counts travel as integers; seconds and ratios as doubles.
    let integer = unit.starts_with('{');
    let is_connection_count = name == naming::CONNECTION_COUNT;
    let attributes = |labels: &[(String, String)]| {
        let mut attributes: Vec<KeyValue> = labels
            .iter()
            .map(|(label, value)| {
                let (key, value) = naming::attribute(&prometheus, label, value);
                key_value(key, value)
            })
            .collect();
        if is_connection_count {
            attributes.push(key_value("network.transport".to_owned(), "tcp".to_owned()));
        }
        attributes
    };
    let numbers = || {
        family
            .series
            .iter()
            .filter_map(|series| match series.value {
                Value::Number(value) => Some(NumberDataPoint {
                    attributes: attributes(&series.labels),
                    start_time_unix_nano: times.start,
                    time_unix_nano: times.now,
                    value: Some(if integer {
                        number_data_point::Value::AsInt(value as i64)
                    } else {
                        number_data_point::Value::AsDouble(value)
                    }),
                    ..Default::default()
                }),
                Value::Histogram { .. } => None,
            })
            .collect()
    };
    let data = match family.kind {
        Kind::Counter => Data::Sum(Sum {
            data_points: numbers(),
            aggregation_temporality: cumulative,
            is_monotonic: true,
        }),
        Kind::Gauge if is_connection_count => Data::Sum(Sum {
            data_points: numbers(),
            aggregation_temporality: cumulative,
            is_monotonic: false,
        }),
        Kind::Gauge | Kind::Info => Data::Gauge(Gauge { data_points: numbers() }),
        Kind::Histogram => Data::Histogram(Histogram {
            data_points: family
                .series
                .iter()
                .filter_map(|series| {
                    histogram_point(&attributes(&series.labels), &series.value, times)
                })
                .collect(),
            aggregation_temporality: cumulative,
        }),
    };
    Some(Metric {
        name,
        description: family.help.clone(),
        unit: unit.to_owned(),
        data: Some(data),
        ..Default::default()
    })
}

/// Prometheus buckets count everything up to their bound; OTLP's count what falls between
/// one bound and the next, and `+Inf` is implied.
fn histogram_point(
    attributes: &[KeyValue],
    value: &Value,
    times: Times,
) -> Option<HistogramDataPoint> {
    let Value::Histogram { buckets, sum, count } = value else { return None };
    let explicit_bounds = buckets.iter().map(|&(le, _)| le).filter(|le| le.is_finite()).collect();
    let mut previous = 0;
    let bucket_counts = buckets
        .iter()
        .map(|&(_, cumulative)| {
            let own = cumulative.saturating_sub(previous);
            previous = cumulative;
            own
        })
        .collect();
    Some(HistogramDataPoint {
        attributes: attributes.to_vec(),
        start_time_unix_nano: times.start,
        time_unix_nano: times.now,
        count: *count,
        sum: Some(*sum),
        bucket_counts,
        explicit_bounds,
        ..Default::default()
    })
}

fn key_value(key: String, value: String) -> KeyValue {
    KeyValue {
        key,
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::export::otlp::read_back::Series;

    const TIMES: Times = Times { start: 1, now: 2 };

    fn family(name: &str, kind: Kind, series: Vec<Series>) -> Family {
        Family { name: name.to_owned(), help: "Help.".to_owned(), kind, series }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn string(attribute: &KeyValue) -> (&str, &str) {
        match &attribute.value.as_ref().unwrap().value {
            Some(any_value::Value::StringValue(v)) => (attribute.key.as_str(), v.as_str()),
            other => panic!("not a string: {other:?}"),
        }
    }

    #[test]
    fn sockets_are_the_connection_count_of_the_conventions() {
        let sockets = family(
            "tcpstate_sockets",
            Kind::Gauge,
            vec![Series { labels: labels(&[("state", "CLOSE_WAIT")]), value: Value::Number(3.0) }],
        );
        let metric = metric(&sockets, TIMES, &|_| None).unwrap();
        assert_eq!(metric.name, "system.network.connection.count");
        assert_eq!(metric.unit, "{connection}");
        let Some(Data::Sum(sum)) = metric.data else { panic!("not a sum") };
        assert!(!sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, AggregationTemporality::Cumulative as i32);
        let point = &sum.data_points[0];
        let attributes: Vec<_> = point.attributes.iter().map(string).collect();
        assert_eq!(
            attributes,
            [("network.connection.state", "close_wait"), ("network.transport", "tcp")]
        );
        assert_eq!(point.value, Some(number_data_point::Value::AsInt(3)));
        assert_eq!((point.start_time_unix_nano, point.time_unix_nano), (1, 2));
    }

    #[test]
    fn histograms_count_each_bucket_apart() {
        let stays = family(
            "tcpstate_state_duration_seconds",
            Kind::Histogram,
            vec![Series {
                labels: labels(&[("state", "ESTABLISHED")]),
                value: Value::Histogram {
                    buckets: vec![(0.1, 2), (1.0, 5), (f64::INFINITY, 6)],
                    sum: 9.5,
                    count: 6,
                },
            }],
        );
        let metric = metric(&stays, TIMES, &|_| None).unwrap();
        assert_eq!((metric.name.as_str(), metric.unit.as_str()), ("tcpstate.state_duration", "s"));
        let Some(Data::Histogram(histogram)) = metric.data else { panic!("not a histogram") };
        let point = &histogram.data_points[0];
        assert_eq!(point.explicit_bounds, [0.1, 1.0]);
        assert_eq!(point.bucket_counts, [2, 3, 1]);
        assert_eq!((point.count, point.sum), (6, Some(9.5)));
    }

    #[test]
    fn counters_are_monotonic_sums() {
        let failures = family(
            "tcpstate_connect_failures",
            Kind::Counter,
            vec![Series { labels: labels(&[("reason", "refused")]), value: Value::Number(4.0) }],
        );
        let metric = metric(&failures, TIMES, &|_| Some("{connection}")).unwrap();
        assert_eq!(metric.name, "tcpstate.connect_failures");
        let Some(Data::Sum(sum)) = metric.data else { panic!("not a sum") };
        assert!(sum.is_monotonic);
        assert_eq!(string(&sum.data_points[0].attributes[0]), ("error.type", "refused"));
    }
}
