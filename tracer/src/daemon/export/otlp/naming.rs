//! What each Prometheus family is called in OTLP, in what unit, and how its labels become
//! attributes. Where an OpenTelemetry semantic convention names the measurement, its name and
//! attributes are used; everything else is `tcpstate.` and the Prometheus name without the
//! prefix and the suffixes that OTLP carries elsewhere (`_total` is the sum's monotonicity,
//! `_seconds`, `_bytes` and `_ratio` the unit), so that a backend translating OTLP back into
//! Prometheus names (VictoriaMetrics, Prometheus' own OTLP receiver) arrives at the same names.

/// The semantic convention's count of connections by state.
pub(super) const CONNECTION_COUNT: &str = "system.network.connection.count";

/// The OTLP name and UCUM unit of a family, by its Prometheus name, with the unit its
/// diagnosis declares for it if any; `None` for a family whose unit nobody knows (a test
/// keeps that from happening).
pub(super) fn otlp_name(
    prometheus: &str,
    declared: Option<&'static str>,
) -> Option<(String, &'static str)> {
    let unit = unit(prometheus).or(declared)?;
    let name = match prometheus {
        "tcpstate_sockets" => CONNECTION_COUNT.to_owned(),
        // `tcpstate.state` alone would not say what it counts.
        "tcpstate_state_seconds_total" => "tcpstate.state_time".to_owned(),
        "tcpstate_kernel_map_bytes" => "tcpstate.kernel_map_memory".to_owned(),
        _ => {
            let base = prometheus.strip_prefix("tcpstate_")?;
            let base = base.strip_suffix("_total").unwrap_or(base);
            let base = ["_seconds", "_bytes", "_ratio"]
                .iter()
                .find_map(|suffix| base.strip_suffix(suffix))
                .unwrap_or(base);
            format!("tcpstate.{base}")
        }
    };
    Some((name, unit))
}

/// The unit of each of the core's and the export's families, and of every family whose name
/// says it; diagnoses declare their own (`Diagnosis::units`).
fn unit(prometheus: &str) -> Option<&'static str> {
    if prometheus.ends_with("_seconds") || prometheus.ends_with("_seconds_total") {
        return Some("s");
    }
    if prometheus.ends_with("_bytes") {
        return Some("By");
    }
    if prometheus.ends_with("_ratio") || prometheus.ends_with("_info") {
        return Some("1");
    }
    Some(match prometheus.strip_prefix("tcpstate_")? {
        "transitions_total" | "kernel_untracked_sightings_total" => "{transition}",
        "sockets" => "{connection}",
        "tracked_sockets" | "table_untracked_sockets" => "{socket}",
        "events_total"
        | "events_lost_total"
        | "events_rescued_total"
        | "events_duplicates_dropped_total" => "{event}",
        "netns_skipped" | "network_namespaces" => "{namespace}",
        "kernel_map_update_failures_total" => "{update}",
        "reconcile_corrections_total" => "{correction}",
        "reconciliations_total" => "{reconciliation}",
        "owner_lookups_dropped_total" => "{lookup}",
        "table_saturated" => "1",
        "otlp_exports_total" | "otlp_export_failures_total" => "{export}",
        "otlp_rejected_points_total" => "{data_point}",
        "otlp_unreadable_answers_total" => "{answer}",
        _ => return None,
    })
}

/// A label as an OTLP attribute: the semantic conventions' key and spelling where one
/// exists, the label unchanged otherwise. `family` is the Prometheus name.
pub(super) fn attribute(family: &str, label: &str, value: &str) -> (String, String) {
    let key = match label {
        "state" => "network.connection.state",
        "reason" => "error.type",
        "namespace" => "k8s.namespace.name",
        "pod" => "k8s.pod.name",
        "container" => "container.name",
        "role" if family == "tcpstate_handshake_duration_seconds" => "network.tcp.handshake.role",
        other => other,
    };
    let value = match label {
        "state" | "from" | "to" => connection_state(value),
        "reason" => error_type(value).to_owned(),
        _ => value.to_owned(),
    };
    (key.to_owned(), value)
}

/// States as the semantic conventions spell them (`close_wait`, `fin_wait_1`), for the
/// `from` and `to` of transitions too, so that the two join.
pub(super) fn connection_state(state: &str) -> String {
    match state {
        "FIN_WAIT1" => "fin_wait_1".to_owned(),
        "FIN_WAIT2" => "fin_wait_2".to_owned(),
        other => other.to_ascii_lowercase(),
    }
}

/// `error.type` values: the proposed TCP conventions' where they name the same failure.
fn error_type(reason: &str) -> &str {
    match reason {
        "timeout" => "timed_out",
        "other" => "_OTHER",
        reason => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let name = |p| otlp_name(p, None).unwrap();
        assert_eq!(name("tcpstate_sockets"), (CONNECTION_COUNT.to_owned(), "{connection}"));
        assert_eq!(
            name("tcpstate_transitions_total"),
            ("tcpstate.transitions".to_owned(), "{transition}")
        );
        assert_eq!(
            name("tcpstate_state_duration_seconds"),
            ("tcpstate.state_duration".to_owned(), "s")
        );
        assert_eq!(
            name("tcpstate_kernel_map_bytes"),
            ("tcpstate.kernel_map_memory".to_owned(), "By")
        );
        assert_eq!(name("tcpstate_build_info"), ("tcpstate.build_info".to_owned(), "1"));
        assert_eq!(otlp_name("tcpstate_something_new", None), None);
        assert_eq!(otlp_name("tcpstate_something_new", Some("{thing}")).unwrap().1, "{thing}");
    }

    #[test]
    fn attributes_use_semantic_convention_keys_and_values() {
        let family = "tcpstate_sockets";
        assert_eq!(
            attribute(family, "state", "CLOSE_WAIT"),
            ("network.connection.state".to_owned(), "close_wait".to_owned())
        );
        assert_eq!(
            attribute(family, "state", "FIN_WAIT1"),
            ("network.connection.state".to_owned(), "fin_wait_1".to_owned())
        );
        assert_eq!(
            attribute("tcpstate_connect_failures_total", "reason", "timeout"),
            ("error.type".to_owned(), "timed_out".to_owned())
        );
        assert_eq!(
            attribute(family, "pod", "web-1"),
            ("k8s.pod.name".to_owned(), "web-1".to_owned())
        );
        assert_eq!(attribute(family, "port", "8080"), ("port".to_owned(), "8080".to_owned()));
        assert_eq!(attribute("tcpstate_transitions_total", "to", "TIME_WAIT").1, "time_wait");
    }
}
