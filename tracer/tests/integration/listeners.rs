//! A listener that stops calling accept(): its queue fills to what the kernel allows, the
//! kernel's own count of the handshakes it drops is served per namespace, the listener is
//! named with its process once its queue stays full, and all of it clears once the listener
//! accepts again.

use std::{os::unix::fs::MetadataExt as _, time::Duration};

use crate::common::{self, Daemon, Metrics, NetNs, V4, run_tcpstate};
use serde_json::Value;
use serial_test::parallel;
use socket2::{Domain, Socket, Type};

const BACKLOG: i32 = 8;
const CLIENTS: usize = 40;
/// How long the queue must stay full before the daemon names the listener.
const THRESHOLD_SECONDS: f64 = 3.0;

/// The listener on `port` in a leak report's stuck listeners.
fn stuck_on(report: &Value, port: u16) -> Option<Value> {
    let listeners = report["stuck_listeners"].as_array()?;
    listeners.iter().find(|l| l["local_port"].as_u64() == Some(u64::from(port))).cloned()
}

#[test]
#[parallel]
fn a_listener_that_stops_accepting_shows_a_full_queue_and_the_drops() {
    let ns = NetNs::create("listen");
    let netns = std::fs::metadata(format!("/run/netns/{}", ns.name)).unwrap().ino().to_string();
    let threshold = THRESHOLD_SECONDS.to_string();
    let mut daemon = Daemon::start(&["--listen-queue-threshold", &threshold]);
    let (listener, clients) = ns.run(|| {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener.bind(&std::net::SocketAddr::new(V4, 0).into()).unwrap();
        listener.listen(BACKLOG).unwrap();
        let target = listener.local_addr().unwrap();
        let clients: Vec<Socket> = (0..CLIENTS)
            .map(|_| {
                let client = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                client.set_nonblocking(true).unwrap();
                // In progress: the handshake completes, or its SYNs are dropped and retried.
                let _ = client.connect(&target);
                client
            })
            .collect();
        (listener, clients)
    });
    let port_number = listener.local_addr().unwrap().as_socket().unwrap().port();
    let port = port_number.to_string();
    let labels = [("netns", netns.as_str()), ("laddr", "127.0.0.1"), ("port", port.as_str())];
    let queue = |metrics: &Metrics| {
        let length = metrics.value("tcpstate_listen_queue_length", &labels);
        (length, metrics.value("tcpstate_listen_queue_limit", &labels))
    };
    common::eventually(Duration::from_secs(20), || {
        let metrics = daemon.scrape();
        let overflows = metrics.value("tcpstate_listen_overflows_total", &[("netns", &netns)]);
        let kernel = ns.tcp_counter("ListenOverflows") as f64;
        // The kernel queues one connection more than the backlog before it drops.
        let found = (queue(&metrics), overflows);
        (found.0 == (f64::from(BACKLOG + 1), f64::from(BACKLOG)) && overflows == kernel && kernel > 0.0)
            .then_some(())
            .ok_or(format!("(queue length, limit), overflows: {found:?}; the namespace's ListenOverflows {kernel}"))
    });

    // Full past the threshold: named with this process, in the API, the command and the log.
    let stuck = common::eventually(Duration::from_secs(20), || {
        let report = daemon.get("/api/leaks").json();
        stuck_on(&report, port_number).ok_or(format!("not reported stuck yet: {report:#}"))
    });
    assert_eq!(stuck["pid"].as_u64(), Some(u64::from(std::process::id())), "{stuck:#}");
    assert_eq!(stuck["comm"].as_str(), Some(common::process_comm().as_str()), "{stuck:#}");
    assert_eq!(stuck["netns"].as_u64().map(|n| n.to_string()), Some(netns.clone()));
    assert_eq!((stuck["queue_length"].as_u64(), stuck["queue_limit"].as_u64()), (Some(9), Some(8)));
    assert!(stuck["full_for_seconds"].as_f64().unwrap() >= THRESHOLD_SECONDS, "{stuck:#}");
    let logged = daemon.process.wait_for_stderr("listener not accepting", Duration::from_secs(5));
    assert!(logged.contains(&format!("127.0.0.1:{port} in network namespace {netns}")), "{logged}");
    assert!(logged.contains(&format!("held by pid {}", std::process::id())), "{logged}");
    let url = format!("http://{}", daemon.addr);
    let command = run_tcpstate(&["leaks", "--daemon", &url]);
    assert_eq!(
        command.status.code(),
        Some(1),
        "a stuck listener is a finding: {:?}",
        command.stderr
    );
    let text = command.stdout.join("\n");
    assert!(
        text.contains(&format!("127.0.0.1:{port} (network namespace {netns}): 9 of 8 waiting")),
        "{text}"
    );
    // Without a daemon, a snapshot lists the listeners full at that moment.
    let no_daemon = common::ReservedPort::new();
    let snapshot =
        run_tcpstate(&["leaks", "--daemon", &format!("http://{}", no_daemon.addr()), "--json"]);
    let report: Value = serde_json::from_str(&snapshot.stdout.join("\n")).unwrap();
    let full_now = stuck_on(&report, port_number).unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(full_now["pid"].as_u64(), Some(u64::from(std::process::id())), "{full_now:#}");
    assert!(
        full_now["full_for_seconds"].is_null(),
        "a snapshot cannot tell how long: {full_now:#}"
    );

    drop(clients);
    listener.set_nonblocking(true).unwrap();
    common::eventually(Duration::from_secs(20), || {
        while listener.accept().is_ok() {}
        let (length, _) = queue(&daemon.scrape());
        (length == 0.0).then_some(()).ok_or(format!("queue length {length} after accepting"))
    });
    common::eventually(Duration::from_secs(10), || {
        let report = daemon.get("/api/leaks").json();
        stuck_on(&report, port_number).map_or(Ok(()), |l| Err(format!("still stuck: {l:#}")))
    });
    let cleared =
        daemon.process.wait_for_stderr("listener accepting again", Duration::from_secs(5));
    assert!(cleared.contains(&format!("127.0.0.1:{port}")), "{cleared}");
    daemon.stop();
}

/// `TcpListenQueueFull` fires for a queue held at its limit for 2 minutes, not for one that
/// filled for a moment, nor for the summed "other" listeners (promtool's rule unit tests).
#[test]
#[parallel]
fn the_listen_queue_alert_fires_on_a_queue_that_stays_full() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/alerts.yml");
    let series = |labels: &str, values: &str| {
        format!("      - series: '{labels}'\n        values: '{values}'\n")
    };
    let listener = |name, port| {
        format!("{name}{{instance=\"h\",netns=\"1\",laddr=\"0.0.0.0\",port=\"{port}\"}}")
    };
    let mut input = String::new();
    input += &series(&listener("tcpstate_listen_queue_length", "80"), "9x5");
    input += &series(&listener("tcpstate_listen_queue_limit", "80"), "8x5");
    // Full for one minute only, then drained.
    input += &series(&listener("tcpstate_listen_queue_length", "81"), "9 0x4");
    input += &series(&listener("tcpstate_listen_queue_limit", "81"), "8x5");
    input += &series(&listener("tcpstate_listen_queue_length", "other"), "9x5");
    input += &series(&listener("tcpstate_listen_queue_limit", "other"), "8x5");
    // What the person on call reads: the listener, its queue, and where to look.
    let summary = "Listener 0.0.0.0:80 on h is not accepting: 9 connections wait";
    let description = "The accept queue of the listener on 0.0.0.0:80 (network namespace 1) \
        has stayed full for 2 minutes: the program has stopped calling accept() (a stuck event \
        loop, a full worker pool), and clients' handshakes are dropped \
        (tcpstate_listen_overflows_total) until they time out. `tcpstate leaks` on that \
        host names the process holding it; `tcpstate explain LISTEN` says what to check.";
    let test = format!(
        "rule_files: ['{rules}']\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    \
         input_series:\n{input}    alert_rule_test:\n      - eval_time: 1m\n        \
         alertname: TcpListenQueueFull\n        exp_alerts: []\n      - eval_time: 3m\n        \
         alertname: TcpListenQueueFull\n        exp_alerts:\n          - exp_labels: \
         {{severity: warning, instance: h, netns: '1', laddr: 0.0.0.0, port: '80'}}\n            \
         exp_annotations: {{summary: '{summary}', description: '{description}'}}\n",
        description = description.replace('\'', "''"),
    );
    let path = common::temp_file("listen-alert-test.yml", &test);
    common::promtool(&["test".as_ref(), "rules".as_ref(), path.as_os_str()]);
}
