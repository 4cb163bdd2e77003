//! Retransmits counted by the kernel program against the kernel's own counters, each caused
//! for real between two namespaces joined by a veth pair: SYNs to an address nobody answers,
//! data and a FIN the peer stops acknowledging, SYN-ACKs whose answer never comes; by state
//! and by destination.
//!
//! Packets are lost by sending them to a link-layer address nobody has (a permanent neighbour
//! entry): they leave without error and the peer drops them, as loss on a wire does. (A
//! blackhole route would fail the send itself, which the kernel counts as a failed retransmit.)

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use crate::common::{self, Daemon, Metrics, NetNs, ReservedPort};
use serial_test::parallel;
use socket2::{Domain, Socket, Type};

const CLIENT: [u8; 4] = [10, 213, 0, 1];
/// A second client address, whose SYN-ACKs the server loses.
const CLIENT_UNANSWERED: [u8; 4] = [10, 213, 0, 11];
const SERVER: [u8; 4] = [10, 213, 0, 2];
/// A second server address, so the client can lose its packets to `SERVER` alone.
const SERVER_SYNACK: [u8; 4] = [10, 213, 0, 12];
/// Nothing answers it.
const NOWHERE: [u8; 4] = [10, 213, 0, 3];

/// A connect from `source` to `target`, from inside the calling thread's namespace.
fn connect(source: SocketAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&source.into())?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from(ip), port)
}

/// A namespace's own counts of SYNs sent again and of every segment sent again, less those
/// that failed to go out (`TCPRetransFail`: counted in `RetransSegs`, but newer kernels report
/// them to tcpstate as failed and older ones not at all).
fn sent_again(namespace: &NetNs) -> [u64; 2] {
    let failed = namespace.tcp_counter("TCPRetransFail");
    [namespace.tcp_counter("TCPSynRetrans"), namespace.tcp_counter("RetransSegs") - failed]
}

/// `tcpstate_retransmits_total` of one labelled port, in every state.
fn retransmits_of(metrics: &Metrics, port: u16) -> f64 {
    metrics.sum("tcpstate_retransmits_total", &[("port", &port.to_string())])
}

fn retransmits_in(metrics: &Metrics, state: &str, port: u16) -> f64 {
    metrics.value("tcpstate_retransmits_total", &[("state", state), ("port", &port.to_string())])
}

#[test]
#[parallel]
fn retransmits_by_state_equal_the_namespaces_own_counters() {
    let client = NetNs::create("rtx-client");
    let server = NetNs::create("rtx-server");
    client.ip(&format!("link add rtx-c type veth peer name rtx-s netns {}", server.name));
    client.ip("addr add 10.213.0.1/24 dev rtx-c");
    client.ip("addr add 10.213.0.11/24 dev rtx-c");
    client.ip("link set rtx-c up");
    server.ip("addr add 10.213.0.2/24 dev rtx-s");
    server.ip("addr add 10.213.0.12/24 dev rtx-s");
    server.ip("link set rtx-s up");
    // Two retries, then the kernel gives up (about 7 s): a known number of each.
    client.sysctl("net.ipv4.tcp_syn_retries=2");
    server.sysctl("net.ipv4.tcp_synack_retries=2");
    client.ip("neigh add 10.213.0.3 lladdr 02:00:00:00:00:03 dev rtx-c nud permanent");
    server.ip("neigh add 10.213.0.11 lladdr 02:00:00:00:00:11 dev rtx-s nud permanent");
    // Ports reserved on the host, so no other test's sockets share their series.
    let reserved: [ReservedPort; 4] = std::array::from_fn(|_| ReservedPort::new());
    let [syn_port, unanswered_port, data_port, listen_port] = reserved.each_ref().map(|r| r.port);
    let labels: Vec<String> = [syn_port, unanswered_port, data_port, listen_port]
        .iter()
        .flat_map(|port| ["--port-label".to_owned(), port.to_string()])
        .collect();
    let daemon = Daemon::start(&labels.iter().map(String::as_str).collect::<Vec<_>>());
    let before = daemon.scrape();
    let (client_before, server_before) = (sent_again(&client), sent_again(&server));

    let listener: TcpListener = server.run(|| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&addr([0, 0, 0, 0], listen_port).into()).unwrap();
        socket.listen(16).unwrap();
        socket.into()
    });
    thread::scope(|scope| {
        // SYN_SENT: SYNs nobody answers, and SYNs whose SYN-ACKs the server loses (the
        // server's SYN-ACK retries).
        let unanswered =
            [(CLIENT, syn_port, NOWHERE), (CLIENT_UNANSWERED, unanswered_port, SERVER_SYNACK)].map(
                |(source, port, target)| {
                    let client = &client;
                    scope.spawn(move || {
                        client.run(|| connect(addr(source, port), addr(target, listen_port)))
                    })
                },
            );
        // ESTABLISHED, then FIN_WAIT1: data the server stops receiving, then the FIN after it.
        let stream = client
            .run(|| connect(addr(CLIENT, data_port), addr(SERVER, listen_port)))
            .expect("connect to the server's namespace");
        let (accepted, _) = listener.accept().unwrap();
        client.ip("neigh replace 10.213.0.2 lladdr 02:00:00:00:00:02 dev rtx-c nud permanent");
        (&stream).write_all(b"lost until the route is back").unwrap();
        let established_retransmits = common::eventually(Duration::from_secs(10), || {
            let count = retransmits_in(&daemon.scrape(), "ESTABLISHED", data_port);
            (count >= 2.0).then_some(count).ok_or(format!("ESTABLISHED retransmits: {count}"))
        });
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        common::eventually(Duration::from_secs(15), || {
            let count = retransmits_in(&daemon.scrape(), "FIN_WAIT1", data_port);
            (count >= 1.0).then_some(()).ok_or(format!("FIN_WAIT1 retransmits: {count}"))
        });
        client.ip("neigh del 10.213.0.2 dev rtx-c");
        // Resolved again by ARP: the next retransmit gets through: the data and the FIN are acknowledged.
        accepted.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut received = Vec::new();
        std::io::Read::read_to_end(&mut &accepted, &mut received).unwrap();
        assert_eq!(received, b"lost until the route is back");
        assert!(established_retransmits >= 2.0);
        for attempt in unanswered {
            let error = attempt.join().unwrap().unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        }
    });

    // Everything has settled (the connects gave up, the data got through): the daemon's counts
    // and each namespace's own counters must agree exactly.
    let client_ports = [syn_port, unanswered_port, data_port];
    common::eventually(Duration::from_secs(15), || {
        let after = daemon.scrape();
        let delta = |port| retransmits_of(&after, port) - retransmits_of(&before, port);
        let syn_sent = |metrics: &Metrics| {
            client_ports.iter().map(|&port| retransmits_in(metrics, "SYN_SENT", port)).sum::<f64>()
        };
        let synack = |metrics: &Metrics| {
            metrics
                .value("tcpstate_synack_retransmits_total", &[("port", &listen_port.to_string())])
        };
        let found = (
            syn_sent(&after) - syn_sent(&before),
            client_ports.iter().map(|&port| delta(port)).sum::<f64>(),
            synack(&after) - synack(&before),
            synack(&after) - synack(&before) + delta(listen_port),
        );
        let (client_now, server_now) = (sent_again(&client), sent_again(&server));
        let kernel = (
            (client_now[0] - client_before[0]) as f64,
            (client_now[1] - client_before[1]) as f64,
            (server_now[0] - server_before[0]) as f64,
            (server_now[1] - server_before[1]) as f64,
        );
        (found == kernel && found.0 >= 4.0 && found.2 >= 2.0).then_some(()).ok_or(format!(
            "tcpstate (client SYN, client all, server SYN-ACK, server all) {found:?}, \
             the namespaces' TCPSynRetrans and RetransSegs less TCPRetransFail {kernel:?}"
        ))
    });
    // By destination: every segment the client sent again went to one of the three
    // addresses it connected to (read from the kernel every 5 s).
    let client_sent_again = (sent_again(&client)[1] - client_before[1]) as f64;
    let destinations = [NOWHERE, SERVER_SYNACK, SERVER].map(|ip| IpAddr::from(ip).to_string());
    common::eventually(Duration::from_secs(15), || {
        let report = daemon.get("/api/destinations").json();
        let listed = report["retransmits"].as_array().cloned().unwrap_or_default();
        let ours: Vec<_> = listed
            .iter()
            .filter(|r| destinations.iter().any(|d| r["address"] == d.as_str()))
            .collect();
        let per_destination: Vec<f64> =
            ours.iter().map(|r| r["count"].as_f64().unwrap_or(0.0)).collect();
        let all_to_the_listener = ours.iter().all(|r| r["port"] == listen_port);
        let to_nowhere = ours.iter().any(|r| r["address"] == "10.213.0.3");
        (per_destination.iter().sum::<f64>() == client_sent_again
            && all_to_the_listener
            && to_nowhere)
            .then_some(())
            .ok_or(format!("the client's {client_sent_again} retransmits in {listed:?}"))
    });
    let metrics = daemon.scrape();
    let listen = listen_port.to_string();
    let labels = [("daddr", "10.213.0.3"), ("dport", listen.as_str())];
    let syn_retries = retransmits_in(&metrics, "SYN_SENT", syn_port)
        - retransmits_in(&before, "SYN_SENT", syn_port);
    assert_eq!(metrics.value("tcpstate_retransmits_by_destination", &labels), syn_retries);
    daemon.stop();
}
