//! Connections that end badly, provoked for real: connects refused, timed out and
//! unreachable, resets sent with `SO_LINGER {on, 0}` and received by the peer, counted exactly
//! per labelled port, by destination, and named in `watch`; and ephemeral ports running out.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use crate::common::{self, Daemon, NetNs, Tcpstate, V4};
use serde_json::Value;
use serial_test::parallel;
use socket2::{Domain, Socket, Type};

/// A TCP socket bound to `port` on loopback (reusable at once: a refused or reset socket
/// leaves no TIME_WAIT), connected to `target`.
fn connect_from_port(port: u16, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::new(V4, port).into())?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

#[test]
#[parallel]
fn refused_connects_are_counted_by_reason_and_named_in_watch() {
    let client = common::ReservedPort::new();
    let client_port = client.port;
    let port = client_port.to_string();
    let daemon = Daemon::start(&["--port-label", &port]);
    let mut watch = Tcpstate::start(&["watch", "--json", "--sport", &port]);
    const ATTEMPTS: usize = 3;
    // Not the client's own port: connecting a port to itself succeeds (simultaneous open).
    let nothing_listens = common::ReservedPort::new();
    let target = nothing_listens.addr();
    for _ in 0..ATTEMPTS {
        let refused = connect_from_port(client_port, target).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    common::eventually(Duration::from_secs(10), || {
        let metrics = daemon.scrape();
        let labels = |reason| [("reason", reason), ("port", port.as_str())];
        let refused = metrics.value("tcpstate_connect_failures_total", &labels("refused"));
        let timeout = metrics.value("tcpstate_connect_failures_total", &labels("timeout"));
        (refused == ATTEMPTS as f64 && timeout == 0.0)
            .then_some(())
            .ok_or(format!("refused {refused}, timeout {timeout}"))
    });
    // Each attempt: CLOSE -> SYN_SENT (no error), SYN_SENT -> CLOSE (refused).
    let mut lines = Vec::new();
    watch.stdout_lines(2 * ATTEMPTS, Duration::from_secs(10), &mut lines);
    let lines: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    for pair in lines.chunks(2) {
        assert_eq!((pair[0]["new"].as_str(), &pair[0]["error"]), (Some("SYN_SENT"), &Value::Null));
        assert_eq!(
            (pair[1]["new"].as_str(), pair[1]["error"].as_str()),
            (Some("CLOSE"), Some("refused"))
        );
    }
    watch.interrupt();
    daemon.stop();
}

/// A connect whose SYNs are all dropped times out; one whose next hop never answers ARP
/// ends with the host unreachable. Each in a namespace of its own with short retries.
#[test]
#[parallel]
fn timed_out_and_unreachable_connects_are_counted_by_reason() {
    let ns = NetNs::create("failures");
    // One SYN retry: a dropped connect gives up after about 3 s.
    ns.sysctl("net.ipv4.tcp_syn_retries=1");
    // A next hop that exists but never answers: ARP gives up after one probe of 200 ms.
    ns.ip("link add veth-a type veth peer name veth-b");
    ns.ip("link set veth-a up");
    ns.ip("link set veth-b up");
    ns.ip("addr add 10.211.0.1/24 dev veth-a");
    ns.sysctl("net.ipv4.neigh.veth-a.mcast_solicit=1");
    ns.sysctl("net.ipv4.neigh.veth-a.retrans_time_ms=200");
    let (timeout_reserved, unreachable_reserved) =
        (common::ReservedPort::new(), common::ReservedPort::new());
    let (timeout_port, unreachable_port) = (timeout_reserved.port, unreachable_reserved.port);
    let (timeout, unreachable) = (timeout_port.to_string(), unreachable_port.to_string());
    let daemon = Daemon::start(&["--port-label", &timeout, "--port-label", &unreachable]);
    let (timed_out, host_unreachable) = ns.run(|| {
        // A listener whose accept queue (backlog 0: one connection) is full drops new SYNs.
        let listener = std::iter::repeat_with(|| {
            let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            listener.bind(&SocketAddr::new(V4, 0).into()).unwrap();
            listener
        })
        .find(|l| l.local_addr().unwrap().as_socket().unwrap().port() != timeout_port)
        .unwrap();
        listener.listen(0).unwrap();
        let target = listener.local_addr().unwrap().as_socket().unwrap();
        let _queued = TcpStream::connect(target).unwrap();
        let timed_out = connect_from_port(timeout_port, target).unwrap_err();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new([10, 211, 0, 1].into(), unreachable_port).into()).unwrap();
        let nowhere = SocketAddr::new([10, 211, 0, 2].into(), 80);
        (timed_out, socket.connect(&nowhere.into()).unwrap_err())
    });
    assert_eq!(timed_out.kind(), std::io::ErrorKind::TimedOut, "{timed_out}");
    assert_eq!(host_unreachable.raw_os_error(), Some(libc::EHOSTUNREACH), "{host_unreachable}");
    common::eventually(Duration::from_secs(10), || {
        let metrics = daemon.scrape();
        let count = |reason, port: &str| {
            let labels = [("reason", reason), ("port", port)];
            metrics.value("tcpstate_connect_failures_total", &labels)
        };
        let found = (count("timeout", &timeout), count("unreachable", &unreachable));
        let stray = count("refused", &timeout) + count("timeout", &unreachable);
        // What the timed-out connect was counted as instead, if anything, and what was lost.
        let elsewhere = ["aborted", "other", "refused"].map(|reason| count(reason, &timeout));
        let lost = metrics.sum("tcpstate_events_lost_total", &[]);
        (found == (1.0, 1.0) && stray == 0.0).then_some(()).ok_or(format!(
            "timeout, unreachable: {found:?}; stray {stray}; on the timeout port as aborted, \
             other, refused: {elsewhere:?}; transitions lost: {lost}"
        ))
    });
    daemon.stop();
}

#[test]
#[parallel]
fn resets_are_counted_by_direction_and_state() {
    let listener = TcpListener::bind((V4, 0)).unwrap();
    let server_port = listener.local_addr().unwrap().port().to_string();
    let client_reserved = common::ReservedPort::new();
    let client_port = client_reserved.port;
    let client = client_port.to_string();
    let daemon = Daemon::start(&["--port-label", &server_port, "--port-label", &client]);
    const CONNECTIONS: usize = 4;
    for _ in 0..CONNECTIONS {
        let stream = connect_from_port(client_port, listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // Close with SO_LINGER {on, 0}: the kernel resets the connection.
        Socket::from(stream).set_linger(Some(Duration::ZERO)).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let reset = std::io::Read::read(&mut &server, &mut [0; 16]).unwrap_err();
        assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset);
    }
    common::eventually(Duration::from_secs(10), || {
        let metrics = daemon.scrape();
        let resets = |direction, port: &str| {
            let labels = [("direction", direction), ("state", "ESTABLISHED"), ("port", port)];
            metrics.value("tcpstate_resets_total", &labels)
        };
        let (sent, received) = (resets("sent", &client), resets("received", &server_port));
        let stray = resets("received", &client) + resets("sent", &server_port);
        (sent == CONNECTIONS as f64 && received == CONNECTIONS as f64 && stray == 0.0)
            .then_some(())
            .ok_or(format!("sent {sent}, received {received}, stray {stray}"))
    });
    daemon.stop();
}

/// Refused connects to one destination and resets on both ends of connections to a listener,
/// listed by destination: the listener's own resets under its port as the server's.
#[test]
#[parallel]
fn failures_and_resets_are_listed_by_destination() {
    let ns = NetNs::create("destinations");
    let netns = std::fs::metadata(format!("/run/netns/{}", ns.name)).unwrap();
    let netns = std::os::unix::fs::MetadataExt::ino(&netns).to_string();
    let daemon = Daemon::start(&[]);
    let listener = ns.run(|| TcpListener::bind((V4, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    // Resets on a listening port count as the server's once a dump of the listeners saw it.
    common::eventually(Duration::from_secs(20), || {
        let metrics = daemon.scrape();
        let labels = [("netns", netns.as_str())];
        let seen = metrics.matching("tcpstate_listen_overflows_total", &labels).count();
        (seen == 1).then_some(()).ok_or("the listener dump has not seen the namespace".to_owned())
    });
    const REFUSED: usize = 25;
    const RESETS: usize = 4;
    let closed = SocketAddr::new(V4, if port == u16::MAX { port - 1 } else { port + 1 });
    ns.run(|| {
        for _ in 0..REFUSED {
            let refused = TcpStream::connect(closed).unwrap_err();
            assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        for _ in 0..RESETS {
            let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            Socket::from(stream).set_linger(Some(Duration::ZERO)).unwrap();
            server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let reset = std::io::Read::read(&mut &server, &mut [0; 16]).unwrap_err();
            assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset);
        }
    });
    let report = common::eventually(Duration::from_secs(10), || {
        let report = daemon.get("/api/destinations").json();
        let found = |list: &str, keys: &[(&str, Value)]| {
            report[list].as_array().into_iter().flatten().find_map(|entry| {
                keys.iter().all(|(k, v)| entry[*k] == *v).then(|| entry["count"].as_u64())
            })
        };
        let refused = found(
            "connect_failures",
            &[
                ("address", "127.0.0.1".into()),
                ("port", closed.port().into()),
                ("reason", "refused".into()),
            ],
        );
        let reset = |role: &str, direction: &str| {
            let keys = [
                ("peer_address", "127.0.0.1".into()),
                ("port", port.into()),
                ("role", role.into()),
                ("direction", direction.into()),
            ];
            found("resets", &keys)
        };
        let counts = (refused, reset("server", "received"), reset("client", "sent"));
        let wanted =
            (Some(Some(REFUSED as u64)), Some(Some(RESETS as u64)), Some(Some(RESETS as u64)));
        (counts == wanted).then_some(report.clone()).ok_or(format!("{counts:?} in {report:#}"))
    });
    assert_eq!(report["window_seconds"], 60.0);
    // The same counts as gauges.
    let metrics = daemon.scrape();
    let dport = closed.port().to_string();
    let labels = [("daddr", "127.0.0.1"), ("dport", dport.as_str()), ("reason", "refused")];
    assert_eq!(metrics.value("tcpstate_connect_failures_by_destination", &labels), REFUSED as f64);
    let port = port.to_string();
    let labels =
        [("raddr", "127.0.0.1"), ("port", &port), ("role", "server"), ("direction", "received")];
    assert_eq!(metrics.value("tcpstate_resets_by_peer", &labels), RESETS as f64);
    daemon.stop();
}

/// In a namespace whose ephemeral range is 100 ports, 80 connections to one destination
/// closed by the client leave 80 ports in TIME_WAIT: 0.8 of the range.
#[test]
#[parallel]
fn time_wait_sockets_count_against_the_ephemeral_range() {
    let ns = NetNs::create("ports");
    ns.sysctl("net.ipv4.ip_local_port_range=40000 40099");
    // Linux reuses a loopback TIME_WAIT port older than a second for the same destination
    // (tcp_tw_reuse=2), which a slow machine reaches mid-test: every connection gets its own.
    ns.sysctl("net.ipv4.tcp_tw_reuse=0");
    let daemon = Daemon::start(&["--reconcile-interval", "1"]);
    const CONNECTIONS: usize = 80;
    ns.run(|| {
        let listener = TcpListener::bind((V4, 5000)).unwrap();
        for _ in 0..CONNECTIONS {
            common::one_connection(&listener, V4, common::Closer::Client);
        }
    });
    let labels = [("saddr", "127.0.0.1"), ("daddr", "127.0.0.1"), ("dport", "5000")];
    common::eventually(Duration::from_secs(10), || {
        let metrics = daemon.scrape();
        let ratio = metrics.value("tcpstate_ephemeral_port_usage_ratio", &labels);
        let max = metrics.value("tcpstate_ephemeral_port_usage_max_ratio", &[]);
        (ratio == 0.8 && max >= 0.8).then_some(()).ok_or(format!("ratio {ratio}, max {max}"))
    });
    daemon.stop();
}
