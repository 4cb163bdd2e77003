//! The OTLP export against a real receiver: VictoriaMetrics from Debian's package (`cargo
//! xtask test` unpacks it), which takes OTLP/HTTP at `/opentelemetry/v1/metrics` and answers
//! what it stored through its export API. Values read back equal `/metrics` exactly, an
//! outage is counted and survived, and credentials in `OTEL_EXPORTER_OTLP_HEADERS` reach it.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serial_test::{parallel, serial};

use crate::common::{self, Closer, Daemon, Metrics, ReservedPort, V4};

/// Exports every second in these tests.
const INTERVAL_MS: &str = "1000";

/// A VictoriaMetrics of the test's own, on a reserved loopback port, with its data in a
/// directory of its own (kept across a restart).
struct Receiver {
    port: ReservedPort,
    dir: PathBuf,
    credentials: Option<(&'static str, &'static str)>,
    process: Option<Child>,
}

impl Receiver {
    fn start(tag: &str, credentials: Option<(&'static str, &'static str)>) -> Self {
        let dir = std::env::temp_dir().join(format!("tcpstate-vm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut receiver = Self { port: ReservedPort::new(), dir, credentials, process: None };
        receiver.resume();
        receiver
    }

    /// Starts the process (again) and waits until it answers.
    fn resume(&mut self) {
        let mut command = Command::new("victoria-metrics");
        command
            .arg(format!("-storageDataPath={}", self.dir.display()))
            .arg(format!("-httpListenAddr={}", self.port.addr()))
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((user, password)) = self.credentials {
            command.arg(format!("-httpAuth.username={user}"));
            command.arg(format!("-httpAuth.password={password}"));
        }
        self.process = Some(command.spawn().expect(
            "victoria-metrics (Debian trixie's package victoria-metrics; `cargo xtask test` unpacks it)",
        ));
        common::eventually(Duration::from_secs(30), || {
            let up =
                TcpStream::connect(self.port.addr()).is_ok() && self.get("/health").status == 200;
            up.then_some(()).ok_or("VictoriaMetrics does not answer /health".to_owned())
        });
    }

    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// What `--otlp-endpoint` is given: the base under which `/v1/metrics` is.
    fn base_url(&self) -> String {
        format!("http://{}/opentelemetry", self.port.addr())
    }

    fn get(&self, path: &str) -> common::HttpResponse {
        let authorization = self.credentials.map(|(user, password)| {
            use base64::Engine as _;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        let headers: Vec<(&str, &str)> =
            authorization.iter().map(|value| ("Authorization", value.as_str())).collect();
        common::http_request(self.port.addr(), "GET", path, &headers)
    }

    /// Each stored series of the metrics named by the regular expression `names`: its labels
    /// and its last value at or before `end_ms` (Unix ms), the resource's labels left out.
    fn series_at(&self, names: &str, end_ms: u64) -> Vec<(BTreeMap<String, String>, f64)> {
        // Recently received samples become searchable at the next flush.
        assert_eq!(self.get("/internal/force_flush").status, 200);
        let selector = format!("{{__name__=~\"{names}\"}}");
        let path = format!(
            "/api/v1/export?match[]={}&end={}.{:03}",
            percent_encode(&selector),
            end_ms / 1000,
            end_ms % 1000
        );
        let response = self.get(&path);
        assert_eq!(response.status, 200, "{}", response.body);
        response
            .body
            .lines()
            .filter_map(|line| {
                let series: serde_json::Value = serde_json::from_str(line).unwrap();
                let labels: BTreeMap<String, String> = series["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| !k.starts_with("service.") && *k != "host.name")
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect();
                let timestamps = series["timestamps"].as_array().unwrap();
                let values = series["values"].as_array().unwrap();
                let last = timestamps
                    .iter()
                    .zip(values)
                    .rev()
                    .find(|(t, _)| t.as_u64().unwrap() <= end_ms)
                    .map(|(_, v)| v.as_f64().unwrap())?;
                Some((labels, last))
            })
            .collect()
    }

    /// The resource labels VictoriaMetrics stored with the exported series.
    fn resource_labels(&self) -> BTreeMap<String, String> {
        assert_eq!(self.get("/internal/force_flush").status, 200);
        let selector = percent_encode("{__name__=\"tcpstate.build_info\"}");
        let response = self.get(&format!("/api/v1/export?match[]={selector}"));
        let line = response.body.lines().next().unwrap_or_else(|| panic!("no build_info stored"));
        let series: serde_json::Value = serde_json::from_str(line).unwrap();
        series["metric"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// `/metrics` over one kept connection: a scrape that opened a connection of its own would
/// change the transition counts it is compared with.
struct KeptScraper {
    reader: BufReader<TcpStream>,
}

impl KeptScraper {
    fn new(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self { reader: BufReader::new(stream) }
    }

    fn scrape(&mut self) -> Metrics {
        let request = "GET /metrics HTTP/1.1\r\nHost: tcpstate\r\n\r\n";
        self.reader.get_mut().write_all(request.as_bytes()).unwrap();
        let mut length = None;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = Some(value.trim().parse::<usize>().unwrap());
            }
        }
        let mut body = vec![0; length.expect("/metrics answers with a Content-Length")];
        self.reader.read_exact(&mut body).unwrap();
        Metrics::parse(&String::from_utf8(body).unwrap())
    }
}

/// A state as OTLP spells it.
fn otlp_state(state: &str) -> String {
    match state {
        "FIN_WAIT1" => "fin_wait_1".to_owned(),
        "FIN_WAIT2" => "fin_wait_2".to_owned(),
        other => other.to_ascii_lowercase(),
    }
}

/// The values compared, keyed as the receiver stores them: (OTLP name, attributes).
type Values = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// What `/metrics` says, under the documented OTLP names and attributes: transitions, the
/// connection count per state, connect failures by reason and the state-duration histogram.
fn expected_in_otlp(metrics: &Metrics) -> Values {
    let mut values = Values::new();
    let mut put = |name: &str, labels: Vec<(&str, String)>, value: f64| {
        let labels = labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        values.insert((name.to_owned(), labels), value);
    };
    for sample in &metrics.scrape.samples {
        let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_owned();
        let number = match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            _ => continue,
        };
        match sample.metric.as_str() {
            "tcpstate_transitions_total" => put(
                "tcpstate.transitions",
                vec![("from", otlp_state(&label("from"))), ("to", otlp_state(&label("to")))],
                number,
            ),
            "tcpstate_sockets" => put(
                "system.network.connection.count",
                vec![
                    ("network.connection.state", otlp_state(&label("state"))),
                    ("network.transport", "tcp".to_owned()),
                ],
                number,
            ),
            "tcpstate_connect_failures_total" => {
                let error_type = match label("reason").as_str() {
                    "timeout" => "timed_out".to_owned(),
                    "other" => "_OTHER".to_owned(),
                    reason => reason.to_owned(),
                };
                put("tcpstate.connect_failures", vec![("error.type", error_type)], number);
            }
            _ => {}
        }
    }
    for sample in metrics.matching("tcpstate_state_duration_seconds", &[]) {
        let state = otlp_state(sample.labels.get("state").unwrap());
        let prometheus_parse::Value::Histogram(buckets) = &sample.value else { continue };
        for bucket in buckets {
            let le = if bucket.less_than.is_infinite() {
                "+Inf".to_owned()
            } else {
                bucket.less_than.to_string()
            };
            put(
                "tcpstate.state_duration_bucket",
                vec![("le", le), ("network.connection.state", state.clone())],
                bucket.count,
            );
        }
    }
    for sample in metrics.matching("tcpstate_state_duration_seconds_count", &[]) {
        let prometheus_parse::Value::Untyped(count) = sample.value else { continue };
        let state = otlp_state(sample.labels.get("state").unwrap());
        put("tcpstate.state_duration_count", vec![("network.connection.state", state)], count);
    }
    values
}

/// The resource attributes the tests give, besides those `series_at` leaves out.
const RESOURCE_KEYS: [&str; 2] = ["k8s.node.name", "deployment.environment"];

/// What the receiver holds at `end_ms`, for the names `expected` has; bucket bounds as
/// numbers, as they may be printed differently.
fn stored_in_otlp(receiver: &Receiver, end_ms: u64) -> Values {
    let names = "tcpstate.transitions|system.network.connection.count|tcpstate.connect_failures\
                 |tcpstate.state_duration_bucket|tcpstate.state_duration_count";
    receiver
        .series_at(&names.replace('.', "\\\\."), end_ms)
        .into_iter()
        .map(|(mut labels, value)| {
            let name = labels.remove("__name__").unwrap();
            // The resource's attributes are on every series; the test checks them apart.
            labels.retain(|key, _| !RESOURCE_KEYS.contains(&key.as_str()));
            if let Some(le) = labels.get_mut("le")
                && le != "+Inf"
            {
                *le = le.parse::<f64>().unwrap().to_string();
            }
            ((name, labels), value)
        })
        .collect()
}

/// The compared values of `/metrics`, once two scrapes with at least one whole export
/// between them agree (nothing moved meanwhile, so that export carried these very values),
/// and the time of the second.
fn settled_scrape(scraper: &mut KeptScraper) -> (Values, Metrics, u64) {
    const EXPORTS: &str = "tcpstate_otlp_exports_total";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let first = scraper.scrape();
        let wanted = first.value(EXPORTS, &[]) + 2.0;
        let second = common::eventually(Duration::from_secs(20), || {
            let metrics = scraper.scrape();
            let exports = metrics.value(EXPORTS, &[]);
            (exports >= wanted).then_some(metrics).ok_or(format!("{exports} of {wanted} exports"))
        });
        let at = unix_ms();
        let (before, after) = (expected_in_otlp(&first), expected_in_otlp(&second));
        if before == after {
            return (after, second, at);
        }
        assert!(Instant::now() < deadline, "the host's TCP counts never held still for 2 s");
    }
}

/// Transitions, connections per state, failed connects and the stay histogram read back from
/// a real OTLP receiver equal `/metrics`, under the documented names, with the resource.
#[test]
#[serial]
fn the_export_lands_in_a_real_receiver_equal_to_metrics() {
    let receiver = Receiver::start("values", None);
    let daemon = Daemon::start_with_env(
        &["--otlp-endpoint", &receiver.base_url()],
        &[
            ("OTEL_METRIC_EXPORT_INTERVAL", INTERVAL_MS),
            ("OTEL_RESOURCE_ATTRIBUTES", "k8s.node.name=node-a,deployment.environment=test"),
        ],
    );
    // The workload: complete connections closed by either side, three held open, and
    // refused connects.
    let listener = TcpListener::bind((V4, 0)).unwrap();
    for closer in [Closer::Client, Closer::Server].repeat(10) {
        common::one_connection(&listener, V4, closer);
    }
    let held: Vec<_> = (0..3)
        .map(|_| {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (client, listener.accept().unwrap().0)
        })
        .collect();
    let nothing_listens = ReservedPort::new();
    for _ in 0..5 {
        assert!(TcpStream::connect(nothing_listens.addr()).is_err());
    }
    let mut scraper = KeptScraper::new(daemon.addr);
    let (expected, metrics, at) = settled_scrape(&mut scraper);
    assert!(metrics.value("tcpstate_connect_failures_total", &[("reason", "refused")]) >= 5.0);
    assert!(metrics.value("tcpstate_sockets", &[("state", "ESTABLISHED")]) >= 6.0);
    let stored = stored_in_otlp(&receiver, at);
    let differing: Vec<_> = expected
        .iter()
        .filter(|(key, value)| stored.get(*key) != Some(*value))
        .map(|(key, value)| format!("{key:?}: /metrics {value}, receiver {:?}", stored.get(key)))
        .collect();
    assert!(
        differing.is_empty() && expected.len() == stored.len(),
        "{} of {} values differ ({} stored):\n{}",
        differing.len(),
        expected.len(),
        stored.len(),
        differing.join("\n")
    );
    let resource = receiver.resource_labels();
    assert_eq!(resource.get("service.name").map(String::as_str), Some("tcpstate"));
    assert_eq!(
        resource.get("service.version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(resource.get("k8s.node.name").map(String::as_str), Some("node-a"));
    assert!(resource.contains_key("host.name"), "{resource:?}");
    drop(held);
    daemon.stop();
}

/// The receiver down for 10 s: tracing and `/metrics` go on, each failed export is counted,
/// the outage is logged once and its end once, exports resume with what happened meanwhile,
/// and the daemon's memory does not grow with the outage.
#[test]
#[parallel]
fn an_outage_of_the_receiver_is_counted_and_survived() {
    let mut receiver = Receiver::start("outage", None);
    let ns = common::NetNs::create("otlp-outage");
    let mut daemon = Daemon::start_with_env(
        &["--otlp-endpoint", &receiver.base_url()],
        &[("OTEL_METRIC_EXPORT_INTERVAL", INTERVAL_MS)],
    );
    let exports = |daemon: &Daemon| daemon.scrape().value("tcpstate_otlp_exports_total", &[]);
    common::eventually(Duration::from_secs(20), || {
        (exports(&daemon) >= 2.0).then_some(()).ok_or("no export landed".to_owned())
    });
    let rss_before = rss_kib(daemon.process.pid());
    receiver.stop();
    let down = Instant::now();
    // Traced while the receiver is down: 40 connections in a namespace of their own.
    ns.run(|| {
        let listener = TcpListener::bind((V4, 0)).unwrap();
        for _ in 0..40 {
            common::one_connection(&listener, V4, Closer::Client);
        }
    });
    let failed = |metrics: &Metrics| {
        metrics.value("tcpstate_otlp_export_failures_total", &[("reason", "unreachable")])
    };
    common::eventually(Duration::from_secs(10), || {
        let failures = failed(&daemon.scrape());
        (failures >= 2.0).then_some(()).ok_or(format!("{failures} failures counted"))
    });
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    let during = daemon.scrape();
    let established_during =
        during.value("tcpstate_transitions_total", &[("from", "SYN_SENT"), ("to", "ESTABLISHED")]);
    let exports_during = during.value("tcpstate_otlp_exports_total", &[]);
    receiver.resume();
    // Backoff waits at most 30 s between attempts.
    let resumed = common::eventually(Duration::from_secs(40), || {
        let metrics = daemon.scrape();
        let exports = metrics.value("tcpstate_otlp_exports_total", &[]);
        (exports > exports_during).then_some(metrics).ok_or(format!("{exports} exports"))
    });
    let rss_after = rss_kib(daemon.process.pid());
    let log = daemon.process.wait_for_stderr("works again after", Duration::from_secs(5));
    assert!(log.contains("failed exports over"), "{log}");
    // What happened during the outage reached the receiver with the export after it.
    let stored = stored_in_otlp(&receiver, unix_ms());
    let key = (
        "tcpstate.transitions".to_owned(),
        BTreeMap::from([
            ("from".to_owned(), "syn_sent".to_owned()),
            ("to".to_owned(), "established".to_owned()),
        ]),
    );
    let stored_established = stored.get(&key).copied().unwrap_or_default();
    assert!(
        stored_established >= established_during,
        "receiver {stored_established}, /metrics during the outage {established_during}"
    );
    assert!(failed(&resumed) >= 2.0);
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over the outage"
    );
    let finished = daemon.stop();
    let warnings = finished.stderr.iter().filter(|l| l.contains("OTLP export to")).count();
    // The outage's line, its end's line, and nothing else: once each.
    assert_eq!(warnings, 2, "{:#?}", finished.stderr);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

/// Credentials in `OTEL_EXPORTER_OTLP_HEADERS` reach a receiver behind basic auth; a wrong
/// password is counted as `unauthorized` and logged once, naming the variable.
#[test]
#[parallel]
fn credentials_in_the_headers_variable_reach_the_receiver() {
    let receiver = Receiver::start("auth", Some(("tcpstate", "s3cret")));
    let header = |password: &str| {
        use base64::Engine as _;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("tcpstate:{password}"));
        format!("Authorization=Basic%20{token}")
    };
    let right = header("s3cret");
    let daemon = Daemon::start_with_env(
        &["--otlp-endpoint", &receiver.base_url()],
        &[("OTEL_METRIC_EXPORT_INTERVAL", INTERVAL_MS), ("OTEL_EXPORTER_OTLP_HEADERS", &right)],
    );
    common::eventually(Duration::from_secs(20), || {
        let metrics = daemon.scrape();
        let exports = metrics.value("tcpstate_otlp_exports_total", &[]);
        let failures = metrics.sum("tcpstate_otlp_export_failures_total", &[]);
        (exports >= 2.0 && failures == 0.0)
            .then_some(())
            .ok_or(format!("{exports} exports, {failures} failures"))
    });
    assert_eq!(
        receiver.resource_labels().get("service.name").map(String::as_str),
        Some("tcpstate")
    );
    daemon.stop();

    let wrong = header("guess");
    let mut daemon = Daemon::start_with_env(
        &["--otlp-endpoint", &receiver.base_url()],
        &[("OTEL_METRIC_EXPORT_INTERVAL", INTERVAL_MS), ("OTEL_EXPORTER_OTLP_HEADERS", &wrong)],
    );
    let line = daemon.process.wait_for_stderr("OTLP export to", Duration::from_secs(20));
    assert!(line.contains("401") && line.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{line}");
    common::eventually(Duration::from_secs(20), || {
        let metrics = daemon.scrape();
        let refused =
            metrics.value("tcpstate_otlp_export_failures_total", &[("reason", "unauthorized")]);
        (refused >= 3.0).then_some(()).ok_or(format!("{refused} refused exports"))
    });
    assert_eq!(daemon.scrape().value("tcpstate_otlp_exports_total", &[]), 0.0);
    let finished = daemon.stop();
    let logged = finished.stderr.iter().filter(|l| l.contains("OTLP export to")).count();
    assert_eq!(logged, 1, "{:#?}", finished.stderr);
}

/// Bad settings stop the daemon before it starts: exit 2, naming the variable or flag.
#[test]
#[parallel]
fn bad_otlp_settings_are_usage_errors_naming_the_variable() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    for (args, env, needle) in [
        (vec!["run", "--otlp-endpoint", "collector:4318"], vec![], "--otlp-endpoint"),
        (
            vec!["run"],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            vec!["run"],
            vec![endpoint, ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization")],
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        (
            vec!["run"],
            vec![endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            vec!["run"],
            vec![endpoint, ("OTEL_METRIC_EXPORT_INTERVAL", "1s")],
            "OTEL_METRIC_EXPORT_INTERVAL",
        ),
        (
            vec!["run"],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:4318"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/hostname"),
            ],
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ),
    ] {
        let finished = Command::new(common::tcpstate_bin())
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&finished.stderr);
        assert_eq!(finished.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?} {env:?}: {stderr}");
    }
}

/// What a hostile or broken receiver answers every export with.
#[derive(Clone, Copy)]
enum Answer {
    /// 200 with a body announced as 500 MB, sent until the daemon stops reading.
    Endless,
    /// 200 with an OTLP partial success: 3 data points rejected.
    PartialSuccess,
}

/// A receiver of the test's own on loopback that answers every request with `answer`,
/// until dropped. Each connection is served on a thread that ends when the daemon closes it.
struct HostileReceiver {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HostileReceiver {
    fn start(answer: Answer) -> Self {
        use std::sync::{Arc, atomic::AtomicBool};
        let listener = TcpListener::bind((V4, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || Self::serve(stream, answer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { addr, stop }
    }

    fn serve(stream: TcpStream, answer: Answer) {
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        loop {
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            match answer {
                Answer::Endless => {
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n\
                                Content-Length: 500000000\r\n\r\n";
                    if writer.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    // Until the daemon closes the connection, or 500 MB.
                    let chunk = vec![0u8; 64 << 10];
                    for _ in 0..(500_000_000 / chunk.len()) {
                        if writer.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                    return;
                }
                Answer::PartialSuccess => {
                    // ExportMetricsServiceResponse { partial_success: { rejected_data_points:
                    // 3, error_message: "bad points" } }, encoded by hand.
                    let message = b"bad points";
                    let mut partial = vec![0x08, 3, 0x12, message.len() as u8];
                    partial.extend_from_slice(message);
                    let mut response = vec![0x0a, partial.len() as u8];
                    response.extend_from_slice(&partial);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n\
                         Content-Length: {}\r\n\r\n",
                        response.len()
                    );
                    if writer.write_all(head.as_bytes()).is_err()
                        || writer.write_all(&response).is_err()
                    {
                        return;
                    }
                }
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for HostileReceiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

/// A receiver answering 200 with a body that does not end cannot take the daemon's memory:
/// at most 64 KiB of it is read, the connection is dropped, and the answer is counted as
/// unreadable and logged once, while the exports themselves go on and count as landed.
#[test]
#[parallel]
fn an_endless_answer_is_cut_counted_and_logged_once() {
    let receiver = HostileReceiver::start(Answer::Endless);
    let daemon = Daemon::start_with_env(
        &["--otlp-endpoint", &receiver.url()],
        &[("OTEL_METRIC_EXPORT_INTERVAL", INTERVAL_MS)],
    );
    let unreadable = |metrics: &Metrics| {
        metrics.value("tcpstate_otlp_unreadable_answers_total", &[("reason", "oversized")])
    };
    let metrics = common::eventually(Duration::from_secs(30), || {
        let metrics = daemon.scrape();
        let count = unreadable(&metrics);
        (count >= 4.0).then_some(metrics).ok_or(format!("{count} oversized answers counted"))
    });
    assert!(metrics.value("tcpstate_otlp_exports_total", &[]) >= 4.0);
    let peak = peak_rss_kib(daemon.process.pid());
    // Without the bound, one such answer took the daemon past 600 MB.
    assert!(peak < 100 * 1024, "the daemon's peak RSS reached {peak} KiB");
    let finished = daemon.stop();
    let warned: Vec<_> =
        finished.stderr.iter().filter(|l| l.contains("not an OTLP response")).collect();
    assert_eq!(warned.len(), 1, "logged once while it lasts: {:#?}", finished.stderr);
}

/// A partial success is what the OTLP specification says it is: the export landed, and the
/// data points the receiver rejected are counted, with its reason logged once.
#[test]
#[parallel]
fn a_partial_success_counts_the_rejected_points() {
    let receiver = HostileReceiver::start(Answer::PartialSuccess);
    let daemon = Daemon::start_with_env(
        &["--otlp-endpoint", &receiver.url()],
        &[("OTEL_METRIC_EXPORT_INTERVAL", INTERVAL_MS)],
    );
    let metrics = common::eventually(Duration::from_secs(30), || {
        let metrics = daemon.scrape();
        let exports = metrics.value("tcpstate_otlp_exports_total", &[]);
        (exports >= 3.0).then_some(metrics).ok_or(format!("{exports} exports"))
    });
    let exports = metrics.value("tcpstate_otlp_exports_total", &[]);
    let rejected = metrics.value("tcpstate_otlp_rejected_points_total", &[]);
    // A scrape may fall between an export's answer and its count: within one export.
    assert!(
        (rejected - 3.0 * exports).abs() <= 3.0,
        "{rejected} points rejected over {exports} exports, 3 each"
    );
    assert_eq!(
        metrics.value("tcpstate_otlp_unreadable_answers_total", &[("reason", "malformed")]),
        0.0
    );
    let finished = daemon.stop();
    let warned: Vec<_> = finished.stderr.iter().filter(|l| l.contains("bad points")).collect();
    assert_eq!(warned.len(), 1, "logged once while it lasts: {:#?}", finished.stderr);
}
