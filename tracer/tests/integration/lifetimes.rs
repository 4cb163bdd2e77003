//! Closed connections, exact where the kernel knows the answer: a client sends 1,000,000 bytes
//! and receives 3,000,000, over loopback and over a veth pair between two namespaces, then
//! both close gracefully. `watch --closed` names both ends with exactly those bytes, a
//! lifetime within the test's own wall time, and the round-trip time `ss -ti` showed.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{Barrier, mpsc},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use serial_test::parallel;
use socket2::{Domain, Socket, Type};
use tracer::watch::CLOSED_JSON_KEYS;

use crate::common::{self, Daemon, Metrics, NetNs, ReservedPort, Tcpstate};

pub const SENT: usize = 1_000_000;
pub const RECEIVED: usize = 3_000_000;

/// What one transfer left to compare with: the client's local address, the smoothed RTT
/// `ss -ti` showed for each end just before they closed (milliseconds), and the wall time
/// from before connect() to after both closed.
pub struct Transfer {
    pub client: SocketAddr,
    pub client_rtt_ms: f64,
    pub server_rtt_ms: f64,
    pub wall: Duration,
}

fn read_exactly(stream: &mut TcpStream, count: usize) {
    let mut buf = vec![0u8; 64 << 10];
    let mut left = count;
    while left > 0 {
        let n = stream.read(&mut buf[..left.min(64 << 10)]).expect("read");
        assert!(n > 0, "EOF with {left} bytes still to come");
        left -= n;
    }
}

/// The smoothed RTT `ss -tin` shows for the socket whose local address is `local`, in the
/// namespace `namespace` (the host's when `None`), in milliseconds.
fn ss_rtt_ms(namespace: Option<&NetNs>, local: SocketAddr) -> f64 {
    let filter = format!("( src {local} )");
    let output = match namespace {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", &ns.name, "ss", "-tinH", "state", "established", &filter])
            .output(),
        None => Command::new("ss").args(["-tinH", "state", "established", &filter]).output(),
    }
    .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .find_map(|field| field.strip_prefix("rtt:"))
        .and_then(|rtt| rtt.split('/').next())
        .and_then(|srtt| srtt.parse().ok())
        .unwrap_or_else(|| panic!("no rtt for {local} in ss -tin: {text}"))
}

/// One connection to `listener` (in `server_ns`) from `client_ns`: the client sends `SENT`
/// bytes, the server reads them and answers `RECEIVED`, `ss` is sampled, then the server
/// shuts down its side, the client reads the EOF and closes, and the server closes last.
pub fn transfer(
    client_ns: Option<&NetNs>,
    server_ns: Option<&NetNs>,
    listener: &TcpListener,
    client_bind: SocketAddr,
    target: SocketAddr,
) -> Transfer {
    let sampled = Barrier::new(3);
    let (locals, ready) = mpsc::channel();
    let started = Instant::now();
    let (client, client_rtt_ms, server_rtt_ms) = thread::scope(|scope| {
        let server_ready = locals.clone();
        let sampled_server = &sampled;
        let server = scope.spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            read_exactly(&mut stream, SENT);
            stream.write_all(&vec![b's'; RECEIVED]).unwrap();
            server_ready.send(("server", stream.local_addr().unwrap())).unwrap();
            sampled_server.wait();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(stream.read(&mut [0u8; 16]).unwrap(), 0, "the client sends nothing more");
        });
        let sampled_client = &sampled;
        let client = scope.spawn(move || {
            let run = || {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                socket.set_reuse_address(true).unwrap();
                socket.bind(&client_bind.into()).expect("bind the client's reserved port");
                socket.connect_timeout(&target.into(), Duration::from_secs(5)).expect("connect");
                let mut stream: TcpStream = socket.into();
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                stream.write_all(&vec![b'c'; SENT]).unwrap();
                read_exactly(&mut stream, RECEIVED);
                let local = stream.local_addr().unwrap();
                locals.send(("client", local)).unwrap();
                sampled_client.wait();
                assert_eq!(stream.read(&mut [0u8; 16]).unwrap(), 0, "the server's FIN");
                local
            };
            match client_ns {
                Some(ns) => ns.run(run),
                None => run(),
            }
        });
        let mut ends: Vec<(&str, SocketAddr)> = (0..2).map(|_| ready.recv().unwrap()).collect();
        ends.sort_unstable();
        let [(_, client_local), (_, server_local)] = [ends[0], ends[1]];
        // Both ends are idle: every byte was acknowledged.
        thread::sleep(Duration::from_millis(100));
        let rtts = (ss_rtt_ms(client_ns, client_local), ss_rtt_ms(server_ns, server_local));
        sampled.wait();
        server.join().unwrap();
        (client.join().unwrap(), rtts.0, rtts.1)
    });
    Transfer { client, client_rtt_ms, server_rtt_ms, wall: started.elapsed() }
}

/// The `--closed --json` line of the end whose local address is `local`.
pub fn closed_line(lines: &[Value], local: SocketAddr) -> &Value {
    lines
        .iter()
        .find(|v| {
            v["saddr"].as_str() == Some(&local.ip().to_string())
                && v["sport"].as_u64() == Some(u64::from(local.port()))
        })
        .unwrap_or_else(|| panic!("no closed connection from {local} in {lines:#?}"))
}

/// The round-trip time at close against `ss`'s sampled just before: the FIN exchange after
/// the sample adds one or two RTT samples, each moving the smoothed value by an eighth of its
/// difference (RFC 6298), and loopback samples vary by tens of microseconds; a unit error
/// (µs for ms, eighths of µs for µs) is off by 8 to 1000 times, far outside.
fn assert_rtt_near(line: &Value, ss_ms: f64) {
    let ours_ms = line["rtt_ns"].as_u64().expect("an RTT at close") as f64 / 1e6;
    let tolerance = ss_ms / 2.0 + 0.1;
    assert!(
        (ours_ms - ss_ms).abs() <= tolerance,
        "RTT at close {ours_ms} ms, ss said {ss_ms} ms before (tolerance {tolerance}): {line}"
    );
}

/// Both ends of `transfer`'s connection in `lines`, checked: exact bytes each way, roles,
/// lifetimes within the wall time, RTTs near `ss`'s.
pub fn check_both_ends(lines: &[Value], transfer: &Transfer, server: SocketAddr) {
    let client = closed_line(lines, transfer.client);
    let server_end = lines
        .iter()
        .find(|v| {
            v["sport"].as_u64() == Some(u64::from(server.port()))
                && v["dport"].as_u64() == Some(u64::from(transfer.client.port()))
        })
        .unwrap_or_else(|| panic!("no closed connection of the server in {lines:#?}"));
    for (end, role, sent, received) in
        [(client, "client", SENT, RECEIVED), (server_end, "server", RECEIVED, SENT)]
    {
        assert_eq!(end["role"], role, "{end}");
        assert_eq!(end["bytes_sent"].as_u64(), Some(sent as u64), "{role}: {end}");
        assert_eq!(end["bytes_received"].as_u64(), Some(received as u64), "{role}: {end}");
        let lifetime = end["lifetime_ns"].as_u64().expect("a lifetime");
        assert!(
            lifetime > 0 && lifetime <= transfer.wall.as_nanos() as u64,
            "{role}: lifetime {lifetime} ns, the test took {:?}: {end}",
            transfer.wall
        );
        assert!(end["error"].is_null(), "a graceful close: {end}");
    }
    assert_rtt_near(client, transfer.client_rtt_ms);
    assert_rtt_near(server_end, transfer.server_rtt_ms);
}

fn watch_closed(port: u16) -> Tcpstate {
    Tcpstate::start(&["watch", "--closed", "--json", "--port", &port.to_string()])
}

fn closed_lines(watch: &mut Tcpstate, count: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    watch.stdout_lines(count, Duration::from_secs(10), &mut lines);
    lines
        .iter()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap();
            let mut keys: Vec<&str> =
                value.as_object().unwrap().keys().map(String::as_str).collect();
            let mut expected = CLOSED_JSON_KEYS;
            keys.sort_unstable();
            expected.sort_unstable();
            assert_eq!(keys, expected, "{line}");
            value
        })
        .collect()
}

/// The daemon's view of the same connection: each end's histograms (its local port
/// labelled, so no other test's connections share the series) and `/api/destinations`.
fn check_daemon(daemon: &Daemon, transfer: &Transfer, server: SocketAddr) {
    let client_port = transfer.client.port().to_string();
    let server_port = server.port().to_string();
    let metrics = common::eventually(Duration::from_secs(10), || {
        let metrics = daemon.scrape();
        let closed = |role, port: &str| {
            metrics.histogram("tcpstate_connection_sent_bytes", &[("role", role), ("port", port)]).0
        };
        let ends = (closed("client", &client_port), closed("server", &server_port));
        (ends == (1.0, 1.0)).then_some(metrics).ok_or(format!("closed connections: {ends:?}"))
    });
    let sums = |metrics: &Metrics, name, role, port: &str| {
        let (count, sum, _) = metrics.histogram(name, &[("role", role), ("port", port)]);
        (count, sum)
    };
    for (role, port, sent, received) in
        [("client", &client_port, SENT, RECEIVED), ("server", &server_port, RECEIVED, SENT)]
    {
        let bytes = |name| sums(&metrics, name, role, port);
        assert_eq!(bytes("tcpstate_connection_sent_bytes"), (1.0, sent as f64), "{role}");
        assert_eq!(bytes("tcpstate_connection_received_bytes"), (1.0, received as f64), "{role}");
        let (count, seconds) = bytes("tcpstate_connection_lifetime_seconds");
        assert!(
            count == 1.0 && seconds > 0.0 && seconds <= transfer.wall.as_secs_f64(),
            "{role}: lifetime {seconds} s, the test took {:?}",
            transfer.wall
        );
        assert_eq!(bytes("tcpstate_connection_rtt_seconds").0, 1.0, "{role}");
    }
    let destinations = daemon.get("/api/destinations").json();
    let listed = destinations["closed_connections"].as_array().expect("closed_connections");
    let to_server = listed
        .iter()
        .find(|d| {
            d["role"] == "client"
                && d["port"].as_u64() == Some(u64::from(server.port()))
                && d["address"].as_str() == Some(&server.ip().to_string())
        })
        .unwrap_or_else(|| panic!("no destination {server} in {destinations:#}"));
    assert_eq!(to_server["connections"], 1, "{to_server}");
    assert_eq!(to_server["bytes_sent"].as_u64(), Some(SENT as u64), "{to_server}");
    assert_eq!(to_server["bytes_received"].as_u64(), Some(RECEIVED as u64), "{to_server}");
    assert!(to_server["max_rtt_seconds"].as_f64().is_some_and(|rtt| rtt > 0.0), "{to_server}");
    assert_eq!(to_server["pid"].as_u64(), Some(u64::from(std::process::id())), "{to_server}");
}

fn daemon_labelling(ports: [u16; 2]) -> Daemon {
    let [a, b] = ports.map(|port| port.to_string());
    Daemon::start(&["--port-label", &a, "--port-label", &b])
}

#[test]
#[parallel]
fn closed_connections_over_loopback_carry_exact_bytes_lifetimes_and_rtt() {
    let (server_port, client_port) = (ReservedPort::new(), ReservedPort::new());
    let listener = TcpListener::bind(server_port.addr()).unwrap();
    let daemon = daemon_labelling([server_port.port, client_port.port]);
    let mut watch = watch_closed(server_port.port);
    let transfer = transfer(None, None, &listener, client_port.addr(), server_port.addr());
    let lines = closed_lines(&mut watch, 2);
    check_both_ends(&lines, &transfer, server_port.addr());
    check_daemon(&daemon, &transfer, server_port.addr());
}

#[test]
#[parallel]
fn closed_connections_over_a_veth_pair_carry_exact_bytes_lifetimes_and_rtt() {
    let client = NetNs::create("life-client");
    let server = NetNs::create("life-server");
    client.ip(&format!("link add life-c type veth peer name life-s netns {}", server.name));
    client.ip("addr add 10.214.0.1/24 dev life-c");
    client.ip("link set life-c up");
    server.ip("addr add 10.214.0.2/24 dev life-s");
    server.ip("link set life-s up");
    let (server_port, client_port) = (ReservedPort::new(), ReservedPort::new());
    let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 214, 0, 2)), server_port.port);
    let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 214, 0, 1)), client_port.port);
    let listener = server.run(|| TcpListener::bind(target).unwrap());
    let daemon = daemon_labelling([server_port.port, client_port.port]);
    let mut watch = watch_closed(server_port.port);
    let transfer = transfer(Some(&client), Some(&server), &listener, bind, target);
    let lines = closed_lines(&mut watch, 2);
    check_both_ends(&lines, &transfer, target);
    check_daemon(&daemon, &transfer, target);
}

/// Hundreds of connections a second that each live a millisecond, to one server: connection
/// churn, named with this process for both the destination and the local service, in
/// `/api/leaks` and the log. As many connections to another server, 50 at a time, that each
/// live 250 ms (past --churn-lifetime) are not.
#[test]
#[parallel]
fn connection_churn_is_found_and_named() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let target = listener.local_addr().unwrap();
    let lasting = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let lasting_target = lasting.local_addr().unwrap();
    let mut daemon = Daemon::start(&["--churn-rate", "10"]);
    let started = Instant::now();
    thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..20 {
                let held: Vec<(TcpStream, TcpStream)> = (0..50)
                    .map(|_| {
                        let client = TcpStream::connect(lasting_target).unwrap();
                        (client, lasting.accept().unwrap().0)
                    })
                    .collect();
                thread::sleep(Duration::from_millis(250));
                drop(held);
            }
        });
        let mut opened = 0;
        // 1,000 connections in about 4 s: over 10 per second over any minute that holds them.
        while opened < 1000 {
            common::one_connection(
                &listener,
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                common::Closer::Client,
            );
            opened += 1;
            if opened % 250 == 0 {
                thread::sleep(Duration::from_secs(1));
            }
        }
    });
    let findings = common::eventually(Duration::from_secs(15), || {
        let report = daemon.get("/api/leaks").json();
        let churn: Vec<Value> = report["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["kind"] == "connection churn")
            .filter(|f| f["summary"].as_str().is_some_and(|s| s.contains(&target.to_string())))
            .cloned()
            .collect();
        // Found as soon as the rate crosses the threshold; counted whole once the daemon has
        // applied every record (a second later at most: findings are made once a second).
        let whole = churn.iter().all(|f| f["count"].as_u64().is_some_and(|n| n >= 1000));
        (churn.len() == 2 && whole).then_some(churn).ok_or(format!("churn findings: {report:#}"))
    });
    for finding in &findings {
        assert_eq!(finding["pid"].as_u64(), Some(u64::from(std::process::id())), "{finding}");
    }
    let summaries: Vec<&str> = findings.iter().filter_map(|f| f["summary"].as_str()).collect();
    assert!(summaries.iter().any(|s| s.starts_with("opens ")), "{summaries:?}");
    assert!(summaries.iter().any(|s| s.starts_with("accepts ")), "{summaries:?}");
    let churn_rate = daemon.scrape().value(
        "tcpstate_connection_churn",
        &[("role", "client"), ("address", "127.0.0.1"), ("port", &target.port().to_string())],
    );
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        (10.0..=1000.0 / 50.0 + 1.0).contains(&churn_rate),
        "rate {churn_rate} after {elapsed} s"
    );
    let logged = daemon
        .process
        .wait_for_stderr(&format!("connections/s to {target}"), Duration::from_secs(5));
    assert!(logged.contains("connection churn: PID"), "{logged}");
    // 1,000 lasting connections closed too, at the same rate: not churn.
    let report = daemon.get("/api/leaks").json();
    let lasting_named =
        report["findings"].as_array().into_iter().flatten().any(|f| {
            f["summary"].as_str().is_some_and(|s| s.contains(&lasting_target.to_string()))
        });
    assert!(!lasting_named, "{report:#}");
    let closed = daemon.get("/api/destinations").json();
    let lasting_closed = closed["closed_connections"].as_array().into_iter().flatten().find(|d| {
        d["port"].as_u64() == Some(u64::from(lasting_target.port())) && d["role"] == "client"
    });
    let lasting_closed = lasting_closed.unwrap_or_else(|| panic!("{closed:#}"));
    assert_eq!(lasting_closed["connections"].as_u64(), Some(1000), "{lasting_closed}");
    let median = lasting_closed["median_lifetime_seconds"].as_f64().unwrap();
    assert!(median >= 0.1, "{lasting_closed}");
}
