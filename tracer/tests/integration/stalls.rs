//! Stalled sockets, against `ss`: a process that stops reading, a peer that stops reading,
//! a peer whose packets are lost; and the busy and idle connections that must never count.
//!
//! Each test runs its own daemon with `--stall-threshold 2 --reconcile-interval 1`, and reads
//! only the findings of this process on its own ports: other tests' sockets share the host.
//! The two that leave data unread in this process are `#[serial]`: findings are by process,
//! and another test's unread socket would join this one's.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use serial_test::{parallel, serial};
use socket2::{Domain, Socket, Type};

use crate::common::{self, Daemon, NetNs};

const STALL_ARGS: [&str; 4] = ["--stall-threshold", "2", "--reconcile-interval", "1"];

/// This process's findings of `kind` whose sockets are on local or remote port `port`.
fn findings_on(report: &Value, kind: &str, port: u16) -> Vec<Value> {
    report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == kind && f["pid"].as_u64() == Some(u64::from(std::process::id())))
        .filter(|f| sockets_of(f).iter().any(|s| on_port(s, port)))
        .cloned()
        .collect()
}

fn sockets_of(finding: &Value) -> Vec<Value> {
    finding["sockets"].as_array().cloned().unwrap_or_default()
}

fn on_port(socket: &Value, port: u16) -> bool {
    let port_of = |key: &str| {
        socket[key].as_str().and_then(|a| a.parse::<SocketAddr>().ok()).map(|a| a.port())
    };
    port_of("local") == Some(port) || port_of("remote") == Some(port)
}

/// `ss`'s Recv-Q and Send-Q of every ESTABLISHED socket with local port `port`, by peer.
fn ss_queues(port: u16) -> Vec<(SocketAddr, u64, u64)> {
    let output = Command::new("ss")
        .args(["-tnH", "state", "established", "sport", "=", &format!(":{port}")])
        .output()
        .expect("ss (iproute2)");
    assert!(output.status.success(), "{output:?}");
    let mut queues: Vec<(SocketAddr, u64, u64)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields[3].parse().unwrap(), fields[0].parse().unwrap(), fields[1].parse().unwrap())
        })
        .collect();
    queues.sort();
    queues
}

#[test]
#[serial]
fn a_process_that_stops_reading_is_named_with_its_sockets_until_it_reads() {
    let mut daemon = Daemon::start(&STALL_ARGS);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let clients: Vec<TcpStream> =
        (0..10).map(|_| TcpStream::connect(listener.local_addr().unwrap()).unwrap()).collect();
    let accepted: Vec<TcpStream> = (0..10).map(|_| listener.accept().unwrap().0).collect();
    for mut client in &clients {
        client.write_all(&[7u8; 64 * 1024]).unwrap();
    }
    let started = Instant::now();

    let finding = common::eventually(Duration::from_secs(20), || {
        let report = daemon.get("/api/leaks").json();
        let found = findings_on(&report, "stalled reader", port);
        let whole = found.len() == 1 && found[0]["count"] == 10;
        whole.then(|| found[0].clone()).ok_or(format!("stalled readers: {report:#}"))
    });
    assert!(started.elapsed() >= Duration::from_secs(2), "found before the threshold");
    assert!(finding["stuck"].as_bool().unwrap());
    assert_eq!(finding["comm"].as_str(), Some(common::process_comm().as_str()), "{finding}");
    // Exactly the accepted sockets, each with the bytes `ss` shows waiting in its Recv-Q.
    let mut ours: Vec<(SocketAddr, u64, u64)> = sockets_of(&finding)
        .iter()
        .map(|s| {
            assert_eq!(s["local"].as_str().unwrap().parse::<SocketAddr>().unwrap().port(), port);
            assert_eq!(s["reason"], "not_reading");
            assert!(s["for_seconds"].as_f64().unwrap() >= 2.0, "{s}");
            (s["remote"].as_str().unwrap().parse().unwrap(), s["queued_bytes"].as_u64().unwrap(), 0)
        })
        .collect();
    ours.sort();
    assert_eq!(ours, ss_queues(port));
    assert!(ours.iter().all(|(_, queued, _)| *queued > 0), "{ours:?}");
    let metric = daemon
        .scrape()
        .value("tcpstate_stalled_sockets", &[("kind", "reader"), ("reason", "not_reading")]);
    assert!(metric >= 10.0, "tcpstate_stalled_sockets reader: {metric}");
    daemon.process.wait_for_stderr("stalled reader: PID", Duration::from_secs(5));

    // It reads: the finding clears, and the log says so.
    for mut socket in &accepted {
        let mut buf = vec![0u8; 64 * 1024];
        socket.read_exact(&mut buf).unwrap();
    }
    common::eventually(Duration::from_secs(10), || {
        let report = daemon.get("/api/leaks").json();
        let left = findings_on(&report, "stalled reader", port);
        left.is_empty().then_some(()).ok_or(format!("still stalled: {left:#?}"))
    });
    let ended = daemon.process.wait_for_stderr("stalled reader ended", Duration::from_secs(5));
    assert!(ended.contains(&format!("PID {}", std::process::id())), "{ended}");
}

/// A peer that stops reading while this side writes until its send queue is full: the writer
/// is named, the reason the peer's zero window.
#[test]
#[serial]
fn a_writer_whose_peer_stopped_reading_is_named_with_a_zero_window() {
    let daemon = Daemon::start(&STALL_ARGS);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_peer, _) = listener.accept().unwrap();
    let local = writer.local_addr().unwrap();
    writer.set_nonblocking(true).unwrap();
    let mut written = 0usize;
    let chunk = vec![1u8; 64 * 1024];
    loop {
        match (&writer).write(&chunk) {
            Ok(n) => written += n,
            Err(error) if error.kind() == ErrorKind::WouldBlock => break,
            Err(error) => panic!("write: {error}"),
        }
    }
    assert!(written > 0);
    let finding = common::eventually(Duration::from_secs(20), || {
        let report = daemon.get("/api/leaks").json();
        let found = findings_on(&report, "stalled writer", local.port());
        found.first().cloned().ok_or(format!("stalled writers: {report:#}"))
    });
    let socket = sockets_of(&finding).into_iter().find(|s| on_port(s, local.port())).unwrap();
    assert_eq!(socket["local"].as_str(), Some(local.to_string().as_str()), "{finding:#}");
    assert_eq!(socket["reason"], "peer_window_zero", "{finding:#}");
    let send_q = ss_queues(local.port())[0].2;
    assert_eq!(socket["queued_bytes"].as_u64(), Some(send_q), "{finding:#}");
    assert!(finding["summary"].as_str().unwrap().contains("peer window zero"), "{finding}");
}

/// A peer whose packets are lost (a neighbour entry with an address nobody has): the writer
/// is named, the reason retransmitting.
#[test]
#[parallel]
fn a_writer_whose_peer_is_gone_is_named_as_retransmitting() {
    let client = NetNs::create("stall-client");
    let server = NetNs::create("stall-server");
    client.ip(&format!("link add stl-c type veth peer name stl-s netns {}", server.name));
    client.ip("addr add 10.214.0.1/24 dev stl-c");
    client.ip("link set stl-c up");
    server.ip("addr add 10.214.0.2/24 dev stl-s");
    server.ip("link set stl-s up");
    let daemon = Daemon::start(&STALL_ARGS);
    let target = SocketAddr::from(([10, 214, 0, 2], 7070));
    let listener: TcpListener = server.run(|| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&target.into()).unwrap();
        socket.listen(4).unwrap();
        socket.into()
    });
    let stream = client.run(|| TcpStream::connect(target)).expect("connect across the veth");
    let (_accepted, _) = listener.accept().unwrap();
    client.ip("neigh replace 10.214.0.2 lladdr 02:00:00:00:00:02 dev stl-c nud permanent");
    (&stream).write_all(&[3u8; 10_000]).unwrap();
    let local = stream.local_addr().unwrap();
    let finding = common::eventually(Duration::from_secs(20), || {
        let report = daemon.get("/api/leaks").json();
        let found = findings_on(&report, "stalled writer", local.port());
        let retransmitting = found.iter().find(|f| {
            sockets_of(f)
                .iter()
                .any(|s| on_port(s, local.port()) && s["reason"] == "retransmitting")
        });
        retransmitting.cloned().ok_or(format!("stalled writers: {report:#}"))
    });
    assert!(finding["summary"].as_str().unwrap().contains("retransmitting"), "{finding}");
    let socket = sockets_of(&finding).into_iter().find(|s| on_port(s, local.port())).unwrap();
    assert_eq!(socket["queued_bytes"].as_u64(), Some(10_000), "{finding:#}");
    assert_eq!(socket["remote"].as_str(), Some(target.to_string().as_str()));
    let metric = daemon
        .scrape()
        .value("tcpstate_stalled_sockets", &[("kind", "writer"), ("reason", "retransmitting")]);
    assert!(metric >= 1.0, "{metric}");
    drop(stream);
}

/// A bulk transfer at full speed for longer than the threshold, and idle connections with
/// empty queues, are never stalled: dumps every second all the while.
#[test]
#[parallel]
fn a_bulk_transfer_and_idle_connections_are_never_stalled() {
    const AT_LEAST: u64 = 200 << 20;
    let daemon = Daemon::start(&STALL_ARGS);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let idle: Vec<(TcpStream, TcpStream)> = (0..10)
        .map(|_| {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (client, listener.accept().unwrap().0)
        })
        .collect();
    let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (receiver, _) = listener.accept().unwrap();
    let done = &AtomicBool::new(false);
    let (sent, received, flagged) = thread::scope(|scope| {
        // As fast as loopback takes it, for six seconds (three thresholds) and 200 MB at
        // least (an emulated guest is slower), read as it comes.
        let send = scope.spawn(|| {
            let chunk = vec![5u8; 1 << 20];
            let started = Instant::now();
            let mut sent = 0u64;
            while started.elapsed() < Duration::from_secs(6) || sent < AT_LEAST {
                (&sender).write_all(&chunk).unwrap();
                sent += chunk.len() as u64;
            }
            sender.shutdown(Shutdown::Write).unwrap();
            sent
        });
        let receive = scope.spawn(|| {
            let mut total = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = (&receiver).read(&mut buf).unwrap();
                if n == 0 {
                    break total;
                }
                total += n as u64;
            }
        });
        let addr = daemon.addr;
        let watch = scope.spawn(move || {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let report = common::http_get(addr, "/api/leaks").json();
                for kind in ["stalled reader", "stalled writer"] {
                    seen.extend(findings_on(&report, kind, port));
                }
                thread::sleep(Duration::from_millis(250));
            }
            seen
        });
        let sent = send.join().unwrap();
        let received = receive.join().unwrap();
        // More dumps past the threshold with the idle connections still open.
        daemon.after_reconciliations(3);
        done.store(true, Ordering::Relaxed);
        (sent, received, watch.join().unwrap())
    });
    assert_eq!(received, sent);
    assert!(flagged.is_empty(), "flagged: {flagged:#?}");
    drop(idle);
}

/// `TcpStalledSockets` fires for stalled sockets that stay 5 minutes, by kind and reason, and
/// not for a stall that cleared (promtool's rule unit tests).
#[test]
#[parallel]
fn the_stall_alert_fires_on_sockets_that_stay_stalled() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/alerts.yml");
    let series = |kind: &str, reason: &str, values: &str| {
        format!(
            "      - series: 'tcpstate_stalled_sockets{{instance=\"h\",kind=\"{kind}\",reason=\"{reason}\"}}'\n        values: '{values}'\n"
        )
    };
    let mut input = series("reader", "not_reading", "10x8");
    // Stalled for two minutes, then moving again.
    input += &series("writer", "retransmitting", "1 1 0x6");
    input += &series("writer", "peer_window_zero", "0x8");
    let summary = "10 stalled reader sockets on h (not_reading)";
    let description = "kind=reader: a process holds unread data and reads nothing (a stuck \
        worker, a deadlock, a consumer that hangs), and its peers' writes block. kind=writer: \
        data waits for a peer that stopped reading (reason=peer_window_zero) or cannot be \
        reached (reason=retransmitting), and requests time out. `tcpstate leaks` on h names \
        the process and the sockets; `tcpstate explain ESTABLISHED` says how to read them.";
    let test = format!(
        "rule_files: ['{rules}']\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    \
         input_series:\n{input}    alert_rule_test:\n      - eval_time: 3m\n        \
         alertname: TcpStalledSockets\n        exp_alerts: []\n      - eval_time: 6m\n        \
         alertname: TcpStalledSockets\n        exp_alerts:\n          - exp_labels: \
         {{severity: warning, instance: h, kind: reader, reason: not_reading}}\n            \
         exp_annotations: {{summary: '{summary}', description: '{description}'}}\n",
        description = description.replace('\'', "''"),
    );
    let path = common::temp_file("stall-alert-test.yml", &test);
    common::promtool(&["test".as_ref(), "rules".as_ref(), path.as_os_str()]);
}
