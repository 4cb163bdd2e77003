//! One look at the daemon: what `tcpstate top` reads each refresh, from `/metrics` and
//! `/api/leaks`, reduced to the numbers the screen shows.

use std::{collections::BTreeMap, time::Instant};

use anyhow::Context as _;
use prometheus_parse::{Scrape, Value};

use crate::{
    client::{Connection, FetchError},
    leaks::LeakReport,
};

/// A pair of states, as the transition counter labels it (`from`, `to`).
pub(super) type Pair = (String, String);

/// The numbers of one refresh. Counters are totals since the daemon started; rates come from
/// two samples (see `screen`).
#[derive(Clone, Debug, Default)]
pub(super) struct Sample {
    /// Sockets per state now, summed over port labels.
    pub sockets: BTreeMap<String, f64>,
    /// The longest current stay per state, in seconds.
    pub oldest: BTreeMap<String, f64>,
    /// Transitions per pair of states.
    pub transitions: BTreeMap<Pair, f64>,
    /// Failed connects per reason.
    pub connect_failures: BTreeMap<String, f64>,
    /// Resets per direction (received, sent).
    pub resets: BTreeMap<String, f64>,
    /// Segments sent again, all states together.
    pub retransmits: f64,
    /// The last minute's failed connects by destination, resets by peer and retransmits by
    /// destination, under the name of their kind's row (`connect refused`, `reset received`,
    /// `retransmits`): (where, count).
    pub destinations: BTreeMap<String, Vec<(String, f64)>>,
    /// Transitions the daemon could not count, per reason.
    pub lost: BTreeMap<String, f64>,
    /// Sockets the daemon tracks.
    pub tracked: f64,
    pub leaks: Option<LeakReport>,
}

/// A sample and when it was taken.
#[derive(Clone, Debug)]
pub(super) struct Timed {
    pub at: Instant,
    pub sample: Sample,
}

impl Sample {
    /// Reads the numbers from the daemon's Prometheus exposition.
    pub(super) fn from_metrics(text: &str) -> anyhow::Result<Self> {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        let scrape = Scrape::parse(lines).context("reading the daemon's /metrics")?;
        let mut sample = Self::default();
        for s in &scrape.samples {
            let value = match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                Value::Histogram(_) | Value::Summary(_) => continue,
            };
            let label = |name: &str| s.labels.get(name).unwrap_or_default().to_owned();
            let add = |map: &mut BTreeMap<String, f64>, key: String| {
                *map.entry(key).or_default() += value;
            };
            match s.metric.as_str() {
                "tcpstate_sockets" => add(&mut sample.sockets, label("state")),
                "tcpstate_state_oldest_age_seconds" => add(&mut sample.oldest, label("state")),
                "tcpstate_connect_failures_total" => {
                    add(&mut sample.connect_failures, label("reason"));
                }
                "tcpstate_resets_total" => add(&mut sample.resets, label("direction")),
                "tcpstate_retransmits_total" => sample.retransmits += value,
                "tcpstate_retransmits_by_destination" => {
                    let to = endpoint(&label("daddr"), &label("dport"));
                    sample.destinations.entry("retransmits".into()).or_default().push((to, value));
                }
                "tcpstate_connect_failures_by_destination" => {
                    let kind = format!("connect {}", label("reason"));
                    let to = endpoint(&label("daddr"), &label("dport"));
                    sample.destinations.entry(kind).or_default().push((to, value));
                }
                "tcpstate_resets_by_peer" => {
                    let kind = format!("reset {}", label("direction"));
                    let (peer, port) = (label("raddr"), label("port"));
                    // Where this host accepted, the port is its own listener's.
                    let place = match label("role").as_str() {
                        "server" => {
                            format!("{} → :{port}", endpoint(&peer, "").trim_end_matches(':'))
                        }
                        _ => endpoint(&peer, &port),
                    };
                    sample.destinations.entry(kind).or_default().push((place, value));
                }
                "tcpstate_events_lost_total" => add(&mut sample.lost, label("reason")),
                "tcpstate_tracked_sockets" => sample.tracked = value,
                "tcpstate_transitions_total" => {
                    *sample.transitions.entry((label("from"), label("to"))).or_default() += value;
                }
                _ => {}
            }
        }
        anyhow::ensure!(
            !sample.sockets.is_empty(),
            "the answer has no tcpstate_sockets: is this a tcpstate daemon?"
        );
        Ok(sample)
    }

    /// Transitions lost, all reasons together.
    pub(super) fn lost_total(&self) -> f64 {
        self.lost.values().sum()
    }
}

/// `10.0.0.9:5432`, `[2001:db8::9]:5432`.
fn endpoint(address: &str, port: &str) -> String {
    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") }
}

/// Takes one sample from the daemon `connection` leads to.
pub(super) async fn fetch(connection: &mut Connection) -> Result<Sample, FetchError> {
    let metrics = connection.get("/metrics").await?;
    let text = String::from_utf8_lossy(&metrics);
    let mut sample = Sample::from_metrics(&text).map_err(FetchError::Failed)?;
    let leaks = connection.get("/api/leaks").await?;
    sample.leaks = Some(
        serde_json::from_slice(&leaks)
            .with_context(|| {
                format!("{}/api/leaks did not answer with a leak report", connection.url())
            })
            .map_err(FetchError::Failed)?,
    );
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# TYPE tcpstate_sockets gauge
tcpstate_sockets{state="ESTABLISHED",port="80"} 3
tcpstate_sockets{state="ESTABLISHED",port="other"} 4
tcpstate_sockets{state="CLOSE_WAIT"} 2
# TYPE tcpstate_transitions counter
tcpstate_transitions_total{from="CLOSE",to="SYN_SENT"} 9
tcpstate_transitions_total{from="CLOSE",to="SYN_SENT",port="80"} 1
# TYPE tcpstate_connect_failures counter
tcpstate_connect_failures_total{reason="refused"} 5
# TYPE tcpstate_resets counter
tcpstate_resets_total{direction="received",state="ESTABLISHED"} 2
tcpstate_resets_total{direction="received",state="FIN_WAIT1"} 1
# TYPE tcpstate_connect_failures_by_destination gauge
tcpstate_connect_failures_by_destination{daddr="10.0.0.9",dport="5432",reason="refused"} 4
tcpstate_connect_failures_by_destination{daddr="2001:db8::9",dport="443",reason="refused"} 1
# TYPE tcpstate_resets_by_peer gauge
tcpstate_resets_by_peer{raddr="10.0.0.3",port="8080",role="server",direction="received"} 2
# TYPE tcpstate_retransmits counter
tcpstate_retransmits_total{state="ESTABLISHED"} 7
tcpstate_retransmits_total{state="SYN_SENT"} 2
# TYPE tcpstate_retransmits_by_destination gauge
tcpstate_retransmits_by_destination{daddr="10.0.0.7",dport="443"} 6
# TYPE tcpstate_events_lost counter
tcpstate_events_lost_total{reason="ring_full"} 6
tcpstate_events_lost_total{reason="recursion"} 1
# TYPE tcpstate_state_oldest_age_seconds gauge
tcpstate_state_oldest_age_seconds{state="CLOSE_WAIT"} 75.5
# TYPE tcpstate_tracked_sockets gauge
tcpstate_tracked_sockets 9
# TYPE tcpstate_state_duration_seconds histogram
tcpstate_state_duration_seconds_bucket{state="ESTABLISHED",le="+Inf"} 1
"#;

    #[test]
    fn sums_over_port_labels_and_reads_every_panel() {
        let sample = Sample::from_metrics(METRICS).unwrap();
        assert_eq!(sample.sockets["ESTABLISHED"], 7.0);
        assert_eq!(sample.sockets["CLOSE_WAIT"], 2.0);
        assert_eq!(sample.transitions[&("CLOSE".into(), "SYN_SENT".into())], 10.0);
        assert_eq!(sample.connect_failures["refused"], 5.0);
        assert_eq!(sample.resets["received"], 3.0);
        assert_eq!(
            sample.destinations["connect refused"],
            [("10.0.0.9:5432".to_owned(), 4.0), ("[2001:db8::9]:443".to_owned(), 1.0)]
        );
        assert_eq!(sample.destinations["reset received"], [("10.0.0.3 → :8080".to_owned(), 2.0)]);
        assert_eq!(sample.retransmits, 9.0);
        assert_eq!(sample.destinations["retransmits"], [("10.0.0.7:443".to_owned(), 6.0)]);
        assert_eq!(sample.lost_total(), 7.0);
        assert_eq!(sample.oldest["CLOSE_WAIT"], 75.5);
        assert_eq!(sample.tracked, 9.0);
    }

    #[test]
    fn an_answer_that_is_not_tcpstate_is_refused() {
        let error = Sample::from_metrics("up 1\n").unwrap_err();
        assert!(format!("{error:#}").contains("is this a tcpstate daemon"), "{error:#}");
    }
}
