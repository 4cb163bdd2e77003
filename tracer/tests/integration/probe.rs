//! The kernel program, loaded for real, against real loopback connections: exact transition
//! sequences, addresses, durations, owners, and loss accounting under a burst.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    thread,
    time::{Duration, Instant},
};

use crate::common::{self, Closer, V4, V6};
use rstest::rstest;
use serial_test::{parallel, serial};
use socket2::{Domain, Socket, Type};
use tracer::{
    event::{TransitionExt as _, comm_str},
    probe::{Delivery, Part, Probe, ProbeOptions},
    reader::RecordReader,
};
use tracer_common::{TcpState, TcpState as S, TransitionRecord, settings::KernelFilter};

/// The probe, filtered in the kernel to one port, with a reader.
struct Capture {
    runtime: tokio::runtime::Runtime,
    probe: Probe,
    reader: RecordReader,
    records: Vec<TransitionRecord>,
}

impl Capture {
    fn on_port(port: u16, ring_bytes: u32) -> Self {
        Self::with_options(port, ProbeOptions { ring_bytes, ..ProbeOptions::default() })
    }

    fn with_options(port: u16, options: ProbeOptions) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = runtime.enter();
        let mut filter = KernelFilter::ALL;
        filter.ports[0] = port;
        filter.port_count = 1;
        let mut probe = Probe::attach(&ProbeOptions { filter, ..options })
            .unwrap_or_else(|error| panic!("attaching the probe: {error:?}"));
        let reader =
            RecordReader::new(probe.take_ring().unwrap(), Duration::from_millis(10)).unwrap();
        Self { runtime, probe, reader, records: Vec::new() }
    }

    /// Reads records until `done` holds for all of them, or `timeout` passes.
    fn collect_until(&mut self, timeout: Duration, done: impl Fn(&[TransitionRecord]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.records) && Instant::now() < deadline {
            let records = &mut self.records;
            self.runtime
                .block_on(
                    self.reader.next_batch(|item| records.push(item.expect("well-formed record"))),
                )
                .unwrap();
        }
    }

    fn delivery(&self) -> Delivery {
        self.probe.delivery(self.reader.duplicates_dropped()).unwrap()
    }
}

fn states(records: &[&TransitionRecord]) -> Vec<(TcpState, TcpState)> {
    records.iter().map(|r| (r.oldstate, r.newstate)).collect()
}

/// Which program delivers the records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The main program, reading the tracepoint's record.
    Main,
    /// The standby, reading the socket itself: attached first, it delivers everything and
    /// the main program skips what it delivered.
    Standby,
}

/// How the two ends are addressed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Addressing {
    V4,
    V6,
    /// An IPv4 client of an IPv6-any listener with `IPV6_V6ONLY=0` (what Go, Java and nginx
    /// `listen [::]` do): every record shows the IPv4 connection, family `inet`.
    DualStack,
}

impl Addressing {
    fn listener(self) -> TcpListener {
        match self {
            Self::V4 => TcpListener::bind((V4, 0)).unwrap(),
            Self::V6 => TcpListener::bind((V6, 0)).unwrap(),
            Self::DualStack => {
                let socket = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
                socket.set_only_v6(false).unwrap();
                socket.bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0).into()).unwrap();
                socket.listen(16).unwrap();
                socket.into()
            }
        }
    }

    /// The address the client connects to and the server's side of every record shows.
    fn server(self, listener: &TcpListener) -> SocketAddr {
        let port = listener.local_addr().unwrap().port();
        SocketAddr::new(if self == Self::V6 { V6 } else { V4 }, port)
    }
}

/// The kernel matrix (`cargo xtask vmtest`) says which programs each kernel must run; on
/// other kernels the test only reports what it found.
fn expected_parts() -> Option<String> {
    std::env::var("TCPSTATE_TEST_EXPECT_PARTS").ok()
}

fn accept_hook_active(probe: &Probe) -> bool {
    probe.parts().iter().any(|p| p.part == Part::AcceptOwner && p.active())
}

/// One connection: accepted, held, then closed by `closer` first. The exact sequences
/// BUILD.md documents, with addresses, ports, durations and owners checked.
fn exact_sequences(addressing: Addressing, closer: Closer, path: Path) {
    let listener = addressing.listener();
    let server = addressing.server(&listener);
    if path == Path::Standby {
        // The kernel frees a program some time after its last fd closes: an earlier test's can
        // still be listed for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut others = tracer::probe::other_tracers();
        while !others.is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            others = tracer::probe::other_tracers();
        }
        assert!(
            others.is_empty(),
            "this test must be the only tracer of sock:inet_sock_set_state (it checks which \
             program the tracepoint calls first), but these programs are loaded: {}. Stop the \
             tcpstate or tcpstates that runs them and run the test again",
            others.join(", ")
        );
    }
    let options = ProbeOptions {
        ring_bytes: 1 << 20,
        standby_first: path == Path::Standby,
        ..ProbeOptions::default()
    };
    let mut capture = Capture::with_options(server.port(), options);

    const HOLD: Duration = Duration::from_millis(30);
    let started = Instant::now();
    let client_thread = thread::Builder::new().name("tcpstate-client".into());
    let (ready, connected) = std::sync::mpsc::channel();
    let client = client_thread
        .spawn(move || {
            let client = common::connect_from(server.ip(), server).unwrap();
            ready.send(()).unwrap();
            thread::sleep(HOLD);
            if closer == Closer::Client {
                let local = client.local_addr().unwrap();
                drop(client);
                return (local, common::thread_comm());
            }
            common::wait_for_eof(&client);
            let local = client.local_addr().unwrap();
            drop(client);
            (local, common::thread_comm())
        })
        .unwrap();
    connected.recv().unwrap();
    let (accepted, _) = listener.accept().unwrap();
    match closer {
        Closer::Client => {
            common::wait_for_eof(&accepted);
            drop(accepted);
        }
        Closer::Server => {
            thread::sleep(HOLD);
            drop(accepted);
        }
    }
    let (client_addr, thread_comm) = client.join().unwrap();

    capture.collect_until(Duration::from_secs(10), |records| {
        records.iter().filter(|r| r.newstate == S::CLOSE).count() >= 2
    });
    // Both sockets lived within this span: the last transitions (the final ACKs) can come
    // after the test closed its side, e.g. after a retransmission.
    let lifetime = started.elapsed();
    let records = &capture.records;
    let client_skaddr = records
        .iter()
        .find(|r| r.dport == server.port() && r.oldstate == S::CLOSE)
        .expect("the client's CLOSE -> SYN_SENT")
        .skaddr;
    let client: Vec<_> = records.iter().filter(|r| r.skaddr == client_skaddr).collect();
    let accepted: Vec<_> =
        records.iter().filter(|r| r.skaddr != client_skaddr && r.sport == server.port()).collect();

    let (client_expected, server_expected) = match closer {
        Closer::Client => {
            (common::client_side(Closer::Client), common::server_side(Closer::Client))
        }
        Closer::Server => {
            (common::client_side(Closer::Server), common::server_side(Closer::Server))
        }
    };
    assert_eq!(states(&client), client_expected.to_vec(), "client sequence");
    assert_eq!(states(&accepted), server_expected.to_vec(), "accepted sequence");

    let family = if addressing == Addressing::V6 { "inet6" } else { "inet" };
    for (i, r) in client.iter().enumerate() {
        assert_eq!(r.remote(), server, "client record {i} remote");
        // An unbound connect() moves to SYN_SENT before it picks the source port.
        let unbound = SocketAddr::new(server.ip(), 0);
        assert!(
            r.local() == client_addr || (i == 0 && r.local() == unbound),
            "client record {i} local {} (client {client_addr})",
            r.local()
        );
        assert_eq!(r.family().name(), family, "client record {i}");
    }
    for (i, r) in accepted.iter().enumerate() {
        assert_eq!(r.local(), server, "accepted record {i} local");
        assert_eq!(r.remote(), client_addr, "accepted record {i} remote");
        assert_eq!(r.family().name(), family, "accepted record {i}");
    }

    // First sightings have no duration; every later record has one, each stay runs from the
    // previous transition to this one, and together they fit in the socket's lifetime.
    for sequence in [&client, &accepted] {
        assert_eq!(sequence[0].stay(), None, "first sighting must not report a duration");
        assert!(sequence[1..].iter().all(|r| r.stay().is_some()), "later records have durations");
        for pair in sequence.windows(2) {
            assert_eq!(pair[1].stay_ns, pair[1].ts_ns - pair[0].ts_ns, "stay ends where it began");
        }
        let total: Duration = sequence.iter().filter_map(|r| r.stay()).sum();
        assert!(total <= lifetime, "stays sum to {total:?}, more than the {lifetime:?} lifetime");
    }
    let established = client[2].stay().unwrap();
    assert!(established >= HOLD, "ESTABLISHED lasted {established:?}, the client held it {HOLD:?}");

    // The owner is this process on every client record, including the ones the kernel emits
    // in softirq (SYN_SENT -> ESTABLISHED, FIN_WAIT1 -> FIN_WAIT2, FIN_WAIT2 -> CLOSE).
    let pid = std::process::id();
    let comm = common::process_comm();
    for r in &client {
        let (owner_pid, owner_comm) = r.owner().expect("client owner known");
        assert_eq!((owner_pid, owner_comm.as_ref()), (pid, comm.as_str()), "{:?}", r.newstate);
    }
    // With the owner, its cgroup: this process's cgroup v2 directory, by inode.
    let cgroup = own_cgroup_id();
    for r in &client {
        match cgroup {
            Some(id) => assert_eq!(r.owner_cgroup, id, "{:?}", r.newstate),
            None => assert_ne!(r.owner_cgroup, 0, "no cgroup2 mount: the root's id"),
        }
    }
    // connect() ran in the client thread: the running task is that thread.
    assert_eq!(client[0].tgid, pid);
    assert_eq!(comm_str(&client[0].comm), thread_comm);

    // The accepted socket's transitions after accept() name this process when the accept
    // hook runs, even those in softirq (ESTABLISHED -> CLOSE_WAIT when the client closes).
    if accept_hook_active(&capture.probe) {
        for r in &accepted[2..] {
            let (owner_pid, owner_comm) = r.owner().expect("accepted socket's owner known");
            assert_eq!((owner_pid, owner_comm.as_ref()), (pid, comm.as_str()), "{r:?}");
        }
    } else {
        assert!(expected_parts().is_none_or(|parts| !parts.contains("accept_owner")));
        eprintln!(
            "the accept hook does not run on this kernel: accepted sockets' owners not checked"
        );
    }

    let rescued = client.iter().chain(&accepted).filter(|r| r.rescued()).count();
    match path {
        Path::Main => assert_eq!(rescued, 0, "the main program delivers"),
        Path::Standby => assert_eq!(rescued, 10, "the standby delivers, nothing twice"),
    }
    let delivery = capture.delivery();
    assert_eq!(delivery.lost(), 0, "{delivery:?}");
    assert!(delivery.emitted >= 10, "{delivery:?}");
}

/// Every addressing, either end closing first, delivered by the main program.
#[rstest]
#[parallel]
fn exact_sequences_durations_and_owners(
    #[values(Addressing::V4, Addressing::V6, Addressing::DualStack)] addressing: Addressing,
    #[values(Closer::Client, Closer::Server)] closer: Closer,
) {
    exact_sequences(addressing, closer, Path::Main);
}

/// The standby reads the same fields from the socket that the tracepoint's record holds. It
/// needs the tracepoint to itself: it checks which program the kernel calls first.
#[rstest]
#[case::v4(Addressing::V4, Closer::Client)]
#[case::v6(Addressing::V6, Closer::Server)]
#[case::dual_stack(Addressing::DualStack, Closer::Client)]
#[serial]
fn standby_delivers_the_same_records_from_the_socket(
    #[case] addressing: Addressing,
    #[case] closer: Closer,
) {
    exact_sequences(addressing, closer, Path::Standby);
}

/// A server that shuts its side down and closes later (hyper, nginx's lingering close): the
/// kernel reports the close as a move to the state the socket is already in (FIN_WAIT2 here,
/// FIN_WAIT1 when the peer's ACK has not come yet). That move does not end the stay: its
/// record carries the time so far, and the record that leaves the state the whole stay.
#[test]
#[parallel]
fn close_after_shutdown_continues_the_stay() {
    let listener = TcpListener::bind((V4, 0)).unwrap();
    let server = listener.local_addr().unwrap();
    let mut capture = Capture::on_port(server.port(), 1 << 20);

    const HOLD: Duration = Duration::from_millis(40);
    let client = std::net::TcpStream::connect(server).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    accepted.shutdown(std::net::Shutdown::Write).unwrap();
    // The peer may delay its ACK of the FIN: FIN_WAIT2 begins when it comes.
    let in_fin_wait2 = |records: &[TransitionRecord]| {
        records.iter().any(|r| (r.oldstate, r.newstate) == (S::FIN_WAIT1, S::FIN_WAIT2))
    };
    capture.collect_until(Duration::from_secs(5), in_fin_wait2);
    assert!(in_fin_wait2(&capture.records), "no FIN_WAIT2: {:?}", capture.records);
    thread::sleep(HOLD);
    // Orphaned in FIN_WAIT2, the socket hands over to a timewait socket at once: CLOSE.
    drop(accepted);
    drop(client);

    capture.collect_until(Duration::from_secs(10), |records| {
        records.iter().filter(|r| r.newstate == S::CLOSE).count() >= 2
    });
    let accepted: Vec<_> = capture.records.iter().filter(|r| r.sport == server.port()).collect();
    let mut expected = common::server_side(Closer::Server).to_vec();
    expected.insert(4, (S::FIN_WAIT2, S::FIN_WAIT2));
    assert_eq!(states(&accepted), expected, "close() is a move within FIN_WAIT2");

    // Every stay runs from the record that entered the state, across the move within it.
    let mut entered_ns = None;
    for r in &accepted {
        if let Some(entered_ns) = entered_ns {
            assert!(r.stay().is_some(), "{r:?}");
            assert_eq!(r.stay_ns, r.ts_ns - entered_ns, "{:?} -> {:?}", r.oldstate, r.newstate);
        }
        if r.oldstate != r.newstate {
            entered_ns = Some(r.ts_ns);
        }
    }
    let (within, leaving) = (accepted[4].stay().unwrap(), accepted[5].stay().unwrap());
    assert!(within >= HOLD, "FIN_WAIT2 so far at close(): {within:?}, held {HOLD:?}");
    assert!(leaving >= within, "FIN_WAIT2 lasted {leaving:?}, less than the {within:?} before");
}

/// The programs that run are the ones the kernel matrix expects of this kernel.
#[test]
#[parallel]
fn the_expected_programs_run_on_this_kernel() {
    let capture = Capture::on_port(9, 1 << 16);
    let parts = capture.probe.parts();
    let active: Vec<&str> = parts.iter().filter(|p| p.active()).map(|p| p.part.name()).collect();
    match expected_parts() {
        Some(expected) => assert_eq!(active.join(","), expected, "{parts:?}"),
        None => {
            assert!(active.contains(&"main"), "{parts:?}");
            eprintln!("programs running on this kernel: {}", active.join(", "));
        }
    }
}

/// The ten transitions one connection makes when the client closes first.
fn expected_kinds() -> Vec<(TcpState, TcpState)> {
    let mut kinds = common::client_side(Closer::Client).to_vec();
    kinds.extend(common::server_side(Closer::Client));
    kinds
}

/// The records of `kind` for connections that made it more than once, for a failure message.
fn repeats(records: &[TransitionRecord], kind: (TcpState, TcpState)) -> String {
    // The kernel reuses a socket's address: the 4-tuple tells connections apart.
    let mut by_socket: HashMap<(u64, SocketAddr, SocketAddr), Vec<&TransitionRecord>> =
        HashMap::new();
    for r in records.iter().filter(|r| (r.oldstate, r.newstate) == kind) {
        by_socket.entry((r.skaddr, r.local(), r.remote())).or_default().push(r);
    }
    let repeated: Vec<String> = by_socket
        .values()
        .filter(|list| list.len() > 1)
        .take(4)
        .map(|list| {
            let each: Vec<String> = list
                .iter()
                .map(|r| {
                    format!(
                        "ts {} local {} remote {} rescued {} pid {}",
                        r.ts_ns,
                        r.local(),
                        r.remote(),
                        r.rescued(),
                        r.pid
                    )
                })
                .collect();
            format!("socket {:#x}: {}", list[0].skaddr, each.join(" / "))
        })
        .collect();
    format!("repeated on one socket: [{}]", repeated.join("; "))
}

/// Children the kernel drops right after creating them: LISTEN -> SYN_RECV -> CLOSE, a real
/// pair of transitions on top of the connection's ten. Seen under emulation with two CPUs,
/// where a retransmitted last ACK of one handshake can be handled on both: both create a
/// child, and the one that loses the insertion into the connection table is destroyed.
fn lost_races(records: &[TransitionRecord]) -> usize {
    let race = (S::SYN_RECV, S::CLOSE);
    records.iter().filter(|r| (r.oldstate, r.newstate) == race).count()
}

#[test]
#[serial]
fn burst_of_connections_is_delivered_or_counted_as_lost() {
    const CONNECTIONS: usize = 10_000;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    // A small ring (256 KiB, about 2,000 records) so a slow reader would lose some: the point
    // is that whatever is lost is counted.
    let mut capture = Capture::on_port(port, 256 << 10);

    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (stream, _) = listener.accept().unwrap();
            common::wait_for_eof(&stream);
        }
        listener
    });
    let sources: Vec<IpAddr> = (2..=251).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i))).collect();
    let target = SocketAddr::new(common::V4, port);
    let clients = thread::spawn(move || {
        for i in 0..CONNECTIONS {
            drop(common::connect_from(sources[i % sources.len()], target).unwrap());
        }
    });
    // Read while the burst runs, then until every record not counted as lost is in.
    let expected = CONNECTIONS * 10;
    while !(clients.is_finished() && server.is_finished()) {
        capture.collect_until(Duration::from_millis(100), |_| false);
    }
    clients.join().unwrap();
    let _listener = server.join().unwrap();
    let lost = capture.delivery().lost() as usize;
    capture.collect_until(Duration::from_secs(5), |records| {
        records.len().saturating_sub(2 * lost_races(records)) + lost >= expected
    });

    let delivery = capture.delivery();
    let records = &capture.records;
    let kinds = expected_kinds();
    // Besides each connection's ten, the kernel's own: a child that lost a race.
    let races = lost_races(records);
    let lost_race = (S::SYN_RECV, S::CLOSE);
    let mut per_kind: HashMap<(TcpState, TcpState), usize> = HashMap::new();
    let mut unique = HashSet::new();
    for r in records {
        assert!(
            unique.insert((r.skaddr, r.ts_ns, r.oldstate, r.newstate)),
            "duplicate record {r:?}"
        );
        let kind = (r.oldstate, r.newstate);
        assert!(kinds.contains(&kind) || kind == lost_race, "unexpected transition {kind:?}");
        *per_kind.entry(kind).or_default() += 1;
    }
    // Each child that lost a race also made LISTEN -> SYN_RECV.
    let per_connection = |kind: &(TcpState, TcpState)| {
        let extra = if kind.1 == S::SYN_RECV { races } else { 0 };
        CONNECTIONS + extra
    };
    for kind in &kinds {
        let n = per_kind.get(kind).copied().unwrap_or(0);
        let most = per_connection(kind);
        assert!(
            n <= most,
            "{kind:?} arrived {n} times, at most {most} expected; {}",
            repeats(records, *kind)
        );
    }
    let delivered = records.len().saturating_sub(2 * races);
    let missing = expected.checked_sub(delivered).unwrap_or_else(|| {
        panic!("{delivered} delivered, more than the {expected} transitions expected")
    });
    eprintln!(
        "burst: {CONNECTIONS} connections, {expected} transitions expected, {delivered} delivered \
         ({} by the standby), {missing} missing, {races} children that lost a race, {} second \
         deliveries dropped; counted: ring buffer full {}, recursion misses {}, map failures {}",
        records.iter().filter(|r| r.rescued()).count(),
        capture.reader.duplicates_dropped(),
        delivery.ringbuf_full,
        delivery.recursion_misses,
        delivery.map_update_failed
    );
    // Exact, not a bound: both sides count this port's transitions only, but for another
    // socket's that neither program delivered (nothing read its port), none on a quiet host.
    assert_eq!(
        missing as u64,
        delivery.lost(),
        "transitions missing, and counted as lost: {delivery:?}"
    );
    // Second deliveries of one transition are dropped by the reader (and counted).
    let dropped = capture.reader.duplicates_dropped() as usize;
    assert_eq!(
        delivery.emitted as usize,
        records.len() + dropped,
        "every emitted record was read, or dropped as a second delivery: {delivery:?}"
    );
    if delivery.lost() == 0 {
        // Nothing lost: every connection made exactly its ten transitions, none twice.
        for kind in &kinds {
            assert_eq!(per_kind.get(kind), Some(&per_connection(kind)), "{kind:?}");
        }
    }
}

/// The inode of this process's cgroup v2 directory (what `bpf_get_current_cgroup_id`
/// returns), when cgroup2 is mounted.
fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|line| line.strip_prefix("0::"))?;
    let root = tracer::cgroups::cgroup2_mount()?;
    let dir = format!("{}{}", root.display(), path.trim_end_matches('/'));
    std::fs::metadata(dir).ok().map(|m| m.ino())
}
