//! `tcpstate watch`, the binary, end to end: JSON keys, each filter, human columns, stop
//! conditions, and the errors a user can meet.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    time::Duration,
};

use crate::common::{self, Closer, Tcpstate, V4, V6, one_connection, run_tcpstate};
use serde_json::Value;
use serial_test::parallel;
use tracer::watch::JSON_KEYS;

fn parse_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let mut keys: Vec<_> = value.as_object().expect("an object").keys().cloned().collect();
            keys.sort_unstable();
            let mut expected: Vec<_> = JSON_KEYS.iter().map(|k| k.to_string()).collect();
            expected.sort_unstable();
            assert_eq!(keys, expected, "keys of {line}");
            value
        })
        .collect()
}

/// Identity of one transition across watchers (each program stamps its own `ts_ns`): within
/// this test no socket makes the same transition twice with the same addresses.
fn identity(v: &Value) -> String {
    ["skaddr", "old", "new", "saddr", "sport", "daddr", "dport"]
        .map(|key| v[key].to_string())
        .join(" ")
}

fn port(v: &Value, key: &str) -> u16 {
    v[key].as_u64().unwrap() as u16
}

type Predicate = Box<dyn Fn(&Value) -> bool>;

/// Several watchers with different filters see the same traffic; each must output exactly
/// the records of that traffic its filter selects.
#[test]
#[parallel]
fn json_output_and_every_filter_select_what_they_say() {
    let p4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port_p = p4.local_addr().unwrap().port();
    let p6 = TcpListener::bind(SocketAddr::new(V6, port_p)).unwrap();
    let q4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port_q = q4.local_addr().unwrap().port();
    let (p, q) = (port_p.to_string(), port_q.to_string());
    let alt_source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    // Ground truth: every record of this test's traffic.
    let mut all = Tcpstate::start(&["watch", "--json", "--port", &p, "--port", &q]);
    let filtered: Vec<(&str, Vec<&str>, Predicate)> = vec![
        (
            "--port",
            vec!["--port", &p],
            Box::new(move |v| port(v, "sport") == port_p || port(v, "dport") == port_p),
        ),
        ("--sport", vec!["--sport", &p], Box::new(move |v| port(v, "sport") == port_p)),
        ("--dport", vec!["--dport", &p], Box::new(move |v| port(v, "dport") == port_p)),
        (
            "--addr",
            vec!["--addr", "127.0.0.2"],
            Box::new(|v| v["saddr"] == "127.0.0.2" || v["daddr"] == "127.0.0.2"),
        ),
        ("-4", vec!["-4"], Box::new(|v| v["family"] == "inet")),
        ("-6", vec!["-6"], Box::new(|v| v["family"] == "inet6")),
        (
            "--state",
            vec!["--state", "close-wait"],
            Box::new(|v| v["old"] == "CLOSE_WAIT" || v["new"] == "CLOSE_WAIT"),
        ),
    ];
    let watchers: Vec<_> = filtered
        .iter()
        .map(|(_, args, _)| {
            let mut full = vec!["watch", "--json"];
            full.extend(args);
            Tcpstate::start(&full)
        })
        .collect();

    one_connection(&p4, V4, Closer::Client);
    one_connection(&p4, alt_source, Closer::Server);
    one_connection(&p6, V6, Closer::Client);
    one_connection(&q4, V4, Closer::Server);
    one_connection(&q4, alt_source, Closer::Client);
    // Once the unfiltered watcher has all 50, every transition has happened; each watcher
    // drains what it has left when interrupted.
    let mut seen = Vec::new();
    all.stdout_lines(50, Duration::from_secs(10), &mut seen);

    let truth = all.interrupt();
    assert!(truth.status.success(), "{:?}", truth.stderr);
    seen.extend(truth.stdout);
    let truth = parse_lines(&seen);
    assert_eq!(truth.len(), 50, "5 connections x 10 transitions: {truth:#?}");
    let ours: HashSet<_> = truth.iter().map(identity).collect();

    for ((name, _, keeps), watcher) in filtered.iter().zip(watchers) {
        let finished = watcher.interrupt();
        assert!(finished.status.success(), "{name}: {:?}", finished.stderr);
        let got = parse_lines(&finished.stdout);
        for v in &got {
            assert!(keeps(v), "{name} let through {v}");
        }
        let got_ours: HashSet<_> =
            got.iter().map(identity).filter(|id| ours.contains(id)).collect();
        let want: HashSet<_> = truth.iter().filter(|v| keeps(v)).map(identity).collect();
        assert!(!want.is_empty(), "{name}: the traffic must exercise the filter");
        assert_eq!(got_ours, want, "{name} selected the wrong records");
    }
}

#[test]
#[parallel]
fn human_output_is_aligned_and_count_stops_the_stream() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let p = listener.local_addr().unwrap().port().to_string();
    let watch = Tcpstate::start(&["watch", "--port", &p, "--count", "7"]);
    one_connection(&listener, V4, Closer::Client);
    let finished = watch.finish();
    assert!(finished.status.success(), "{:?}", finished.stderr);
    let lines = &finished.stdout;
    assert_eq!(lines.len(), 8, "a header and 7 transitions: {lines:#?}");
    let header = &lines[0];
    for column in ["TIME", "PID", "COMM", "LOCAL", "REMOTE", "TRANSITION", "MS"] {
        assert!(header.contains(column), "{header}");
    }
    let transition_at = header.find("TRANSITION").unwrap();
    for line in &lines[1..] {
        assert!(line.contains(" -> "), "{line}");
        assert_eq!(line.find(" -> ").map(|i| i > transition_at), Some(true), "{line}");
        let state_start = line[transition_at..].chars().next().unwrap();
        assert!(state_start.is_ascii_uppercase(), "columns misaligned: {line}");
    }
    assert!(
        lines[1].contains("CLOSE -> SYN_SENT") && lines[1].trim_end().ends_with('-'),
        "{}",
        lines[1]
    );
}

#[test]
#[parallel]
fn duration_stops_the_stream() {
    let started = std::time::Instant::now();
    let finished = Tcpstate::start(&["watch", "--port", "9", "--duration", "1"]).finish();
    assert!(finished.status.success(), "{:?}", finished.stderr);
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Its output can stall it, so watch reads through a ring four times the daemon's (4M);
/// `--ring-bytes` still decides when given.
#[test]
#[parallel]
fn watch_has_a_larger_ring_unless_told_otherwise() {
    for (extra, expected) in [(None, "ring buffer 16384 KiB"), (Some("1M"), "ring buffer 1024 KiB")]
    {
        let mut args = vec!["watch", "--port", "9", "--duration", "1"];
        if let Some(bytes) = extra {
            args.extend(["--ring-bytes", bytes]);
        }
        let finished = Tcpstate::start(&args).finish();
        let stderr = finished.stderr.join("\n");
        assert!(finished.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr}");
    }
}

#[test]
#[parallel]
fn a_moved_tracepoint_field_is_refused_by_name() {
    let real =
        std::fs::read_to_string("/sys/kernel/tracing/events/sock/inet_sock_set_state/format")
            .or_else(|_| {
                // tracefs is mounted by tcpstate itself on first use; make sure it is.
                run_tcpstate(&["watch", "--duration", "1"]);
                std::fs::read_to_string(
                    "/sys/kernel/tracing/events/sock/inet_sock_set_state/format",
                )
            })
            .expect("the real format file");
    let crafted = real.replace("offset:26;", "offset:28;");
    assert_ne!(crafted, real, "the crafted file must differ");
    let path = common::temp_file("format", &crafted);
    let finished = run_tcpstate(&["watch", "--tracepoint-format", path.to_str().unwrap()]);
    assert_eq!(finished.status.code(), Some(1), "{:?}", finished.stderr);
    let stderr = finished.stderr.join("\n");
    assert!(stderr.contains("`dport`") && stderr.contains("refusing to attach"), "{stderr}");
}

#[test]
#[parallel]
fn bad_flags_are_usage_errors_naming_the_flag() {
    for (args, needle) in [
        (vec!["watch", "--port", "70000"], "--port"),
        (vec!["watch", "--state", "BOGUS"], "CLOSE_WAIT"),
        (vec!["watch", "--ring-bytes", "3M"], "power of two"),
        (vec!["watch", "--duration", "0"], "--duration"),
        (vec!["watch", "--count", "0"], "at least 1"),
        (vec!["watch", "--port", "0"], "from 1 to 65535"),
        (vec!["watch", "-4", "-6"], "--ipv6"),
        (vec!["watch", "--no-such-flag"], "--no-such-flag"),
        (vec!["watch", "--container", "not-hex"], "--container"),
        (vec!["watch", "--cgroup", "relative/path"], "starting with /"),
        (vec!["watch", "--pod", "no-slash"], "NAMESPACE/NAME"),
        (vec!["run", "--group-by", "node"], "container, pod"),
        (vec!["run", "--stall-threshold", "0.5"], "0 to turn it off"),
        (vec!["explain", "BOGUS"], "CLOSE_WAIT, LAST_ACK"),
    ] {
        let finished = run_tcpstate(&args);
        let stderr = finished.stderr.join("\n");
        assert_eq!(finished.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let mut many = vec!["watch"];
    for _ in 0..9 {
        many.extend(["--port", "80"]);
    }
    let finished = run_tcpstate(&many);
    let stderr = finished.stderr.join("\n");
    assert_eq!(finished.status.code(), Some(2));
    assert!(stderr.contains("--port is given 9 times"), "{stderr}");
    assert!(stderr.contains("Usage: tcpstate watch"), "the subcommand's usage: {stderr}");
    // What a state means, on one screen; without a state, the diagram.
    let close_wait = run_tcpstate(&["explain", "CLOSE_WAIT"]);
    assert_eq!(close_wait.status.code(), Some(0));
    assert!(close_wait.stdout.len() <= 23, "{:#?}", close_wait.stdout);
    assert!(close_wait.stdout[0].starts_with("CLOSE_WAIT - "), "{:#?}", close_wait.stdout);
    let diagram = run_tcpstate(&["explain"]);
    assert!(diagram.stdout.iter().any(|l| l.contains("CLOSE_WAIT --close()--> LAST_ACK")));
}
