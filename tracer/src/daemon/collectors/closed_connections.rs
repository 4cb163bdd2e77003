//! What closed connections carried, from the totals the kernel reads as each one closes:
//! lifetime, bytes each way and round-trip time by role, since start; the same by destination
//! over the last minute; and connection churn, a destination (or a local service) that gets
//! new connections at a high rate that live only milliseconds, named with its process.
//!
//! A destination is, for a connection this host opened, the remote address and port; for one
//! a listener accepted, the local service's address and port (its clients' ports say nothing).

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, gauge::ConstGauge},
};
use serde::{Deserialize, Serialize};
use tracer_common::TransitionRecord;

use crate::{
    cgroups::CgroupNames,
    cmdline::CmdlinePolicy,
    daemon::{
        core::{
            Diagnosis, PortLabels, Shared, Transition,
            histogram::{DURATION_BUCKETS, DurationHistogram},
        },
        export::family::{PortSeries, Scrape, histogram},
    },
    event::{TransitionExt as _, comm_str},
    leaks::{Finding, LeakReport},
    owners::ProcessCache,
    socket::Process,
};

/// Six 10-second buckets, the current one filling: the last minute.
const BUCKET_NS: u64 = 10_000_000_000;
const BUCKETS: usize = 6;
/// Distinct destinations one bucket holds: a host that talks to many peers must not grow
/// memory. Connections beyond are counted in `uncounted` only.
const MAX_KEYS: usize = 1024;
/// Destinations served in `/api/destinations`.
const TOP_DESTINATIONS: usize = 10;

/// Which end of the connection this host was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// This host connected.
    Client,
    /// A listener of this host accepted it.
    Server,
    /// Opened before the tracer started: the kernel did not see it begin.
    Unknown,
}

impl Role {
    const ALL: [Self; 3] = [Self::Client, Self::Server, Self::Unknown];

    fn of(record: &TransitionRecord) -> Self {
        match record.accepted() {
            Some(true) => Self::Server,
            Some(false) => Self::Client,
            None => Self::Unknown,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
            Self::Unknown => "unknown",
        }
    }
}

/// When a destination's connections count as churn: at least `rate` new ones per second over
/// the last minute, living a median of less than `lifetime`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ChurnThresholds {
    pub rate: f64,
    pub lifetime: Duration,
}

/// Upper bounds of the byte histograms' buckets: powers of 4 from 64 B to 1 GiB.
const BYTE_BUCKETS: [u64; 13] = {
    let mut bounds = [0; 13];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = 64 << (2 * i);
        i += 1;
    }
    bounds
};

/// Bytes per connection.
#[derive(Clone, Debug, Default)]
struct ByteHistogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    buckets: [u64; BYTE_BUCKETS.len() + 1],
    sum: u128,
    count: u64,
}

impl ByteHistogram {
    fn observe(&mut self, bytes: u64) {
        self.buckets[BYTE_BUCKETS.partition_point(|&bound| bound < bytes)] += 1;
        self.sum += u128::from(bytes);
        self.count += 1;
    }
}

/// Since start, for one role of one port label.
#[derive(Clone, Debug, Default)]
struct Totals {
    lifetime: DurationHistogram,
    rtt: DurationHistogram,
    sent: ByteHistogram,
    received: ByteHistogram,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Destination {
    role: Role,
    address: IpAddr,
    port: u16,
}

impl Destination {
    fn of(record: &TransitionRecord) -> Self {
        let role = Role::of(record);
        let at = if role == Role::Server { record.local() } else { record.remote() };
        Self { role, address: at.ip(), port: at.port() }
    }

    fn address(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// The owner the kernel named for a connection: pid, comm, cgroup id.
type Owner = (u32, [u8; 16], u64);

/// One destination's closed connections in one bucket.
#[derive(Clone, Debug, Default)]
struct Closed {
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    lifetime: DurationHistogram,
    rtt: DurationHistogram,
    rtt_max_ns: u64,
    /// The last known owner of a connection to it.
    owner: Option<Owner>,
}

impl Closed {
    fn add(&mut self, other: &Self) {
        self.connections += other.connections;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        for (sum, add) in [(&mut self.lifetime, &other.lifetime), (&mut self.rtt, &other.rtt)] {
            for (bucket, count) in sum.buckets.iter_mut().zip(add.buckets) {
                *bucket += count;
            }
            sum.sum_ns += add.sum_ns;
            sum.count += add.count;
        }
        self.rtt_max_ns = self.rtt_max_ns.max(other.rtt_max_ns);
        self.owner = other.owner.or(self.owner);
    }
}

#[derive(Default)]
struct Bucket {
    epoch: u64,
    by_destination: HashMap<Destination, Closed>,
    uncounted: u64,
}

/// One destination over the last minute, as `/api/destinations` serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClosedByDestination {
    pub role: Role,
    pub address: IpAddr,
    pub port: u16,
    pub connections: u64,
    pub per_second: f64,
    /// Estimated from log-spaced buckets; `None` when no lifetime was known.
    pub median_lifetime_seconds: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub median_rtt_seconds: Option<f64>,
    pub max_rtt_seconds: Option<f64>,
    /// The process that last opened (or accepted) one, where the kernel named it.
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// This diagnosis's part of `/api/destinations`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClosedReport {
    /// Most connections first, at most `TOP_DESTINATIONS`.
    pub closed_connections: Vec<ClosedByDestination>,
    /// Connections closed in the window that no bucket had room for.
    pub closed_uncounted: u64,
}

/// The window's sums by destination, with the window's length in seconds.
fn window_sums(
    buckets: &[Bucket; BUCKETS],
    now_ns: u64,
) -> (HashMap<Destination, Closed>, u64, f64) {
    let current = now_ns / BUCKET_NS;
    let mut sums: HashMap<Destination, Closed> = HashMap::new();
    let mut uncounted = 0;
    for bucket in buckets.iter().filter(|b| current.saturating_sub(b.epoch) < BUCKETS as u64) {
        uncounted += bucket.uncounted;
        for (destination, closed) in &bucket.by_destination {
            sums.entry(*destination).or_default().add(closed);
        }
    }
    // The five full buckets before the current one, and what of the current one has passed.
    let seconds =
        ((now_ns - (current.saturating_sub(BUCKETS as u64 - 1)) * BUCKET_NS) as f64 / 1e9).max(1.0);
    (sums, uncounted, seconds)
}

/// The median of a duration histogram, interpolated within its bucket on a log scale (the
/// buckets are log-spaced); `None` when it is empty.
fn median_seconds(histogram: &DurationHistogram) -> Option<f64> {
    if histogram.count == 0 {
        return None;
    }
    let rank = histogram.count.div_ceil(2);
    let mut below = 0;
    for (i, &count) in histogram.buckets.iter().enumerate() {
        if below + count >= rank {
            let upper =
                *DURATION_BUCKETS.get(i).unwrap_or(&DURATION_BUCKETS[DURATION_BUCKETS.len() - 1]);
            if i == 0 || i >= DURATION_BUCKETS.len() {
                return Some(upper);
            }
            let lower = DURATION_BUCKETS[i - 1];
            let share = (rank - below) as f64 / count as f64;
            return Some(lower * (upper / lower).powf(share));
        }
        below += count;
    }
    None
}

/// Whether more than half the known lifetimes are under `bound`, exactly where `bound` is a
/// bucket bound (the default 100 ms is).
fn median_under(histogram: &DurationHistogram, bound: Duration) -> bool {
    let bound_ns = bound.as_nanos() as u64;
    let bounds = crate::daemon::core::histogram::DURATION_BUCKET_NS;
    let under: u64 = histogram
        .buckets
        .iter()
        .zip(bounds)
        .take_while(|(_, upper)| *upper <= bound_ns)
        .map(|(count, _)| count)
        .sum();
    histogram.count > 0 && under * 2 > histogram.count
}

/// Lifetimes, bytes and RTTs since start; the last minute by destination; churn found.
pub(super) struct ClosedConnections {
    state: Mutex<State>,
    churn: ChurnThresholds,
    naming: Mutex<Naming>,
    findings: Mutex<Vec<Finding>>,
}

struct State {
    /// [label][role]
    totals: Vec<[Totals; 3]>,
    buckets: [Bucket; BUCKETS],
}

/// What names churn's processes, and which churn is already in the log.
struct Naming {
    processes: ProcessCache,
    cgroups: CgroupNames,
    /// Churning destinations, and since when.
    churning: HashMap<Destination, Instant>,
}

impl ClosedConnections {
    pub(super) fn new(labels: &PortLabels, churn: ChurnThresholds, cmdline: CmdlinePolicy) -> Self {
        Self {
            state: Mutex::new(State {
                totals: vec![Default::default(); labels.values()],
                buckets: Default::default(),
            }),
            churn,
            naming: Mutex::new(Naming {
                processes: ProcessCache::new(cmdline),
                cgroups: CgroupNames::default(),
                churning: HashMap::new(),
            }),
            findings: Mutex::new(Vec::new()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn report(&self, now_ns: u64) -> ClosedReport {
        let (sums, uncounted, seconds) = window_sums(&self.state().buckets, now_ns);
        let mut closed: Vec<ClosedByDestination> = sums
            .into_iter()
            .map(|(destination, closed)| {
                let owner = closed.owner;
                ClosedByDestination {
                    role: destination.role,
                    address: destination.address,
                    port: destination.port,
                    connections: closed.connections,
                    per_second: closed.connections as f64 / seconds,
                    median_lifetime_seconds: median_seconds(&closed.lifetime),
                    bytes_sent: closed.bytes_sent,
                    bytes_received: closed.bytes_received,
                    median_rtt_seconds: median_seconds(&closed.rtt),
                    max_rtt_seconds: (closed.rtt.count > 0).then(|| closed.rtt_max_ns as f64 / 1e9),
                    pid: owner.map(|(pid, _, _)| pid),
                    comm: owner.map(|(_, comm, _)| comm_str(&comm).into_owned()),
                }
            })
            .collect();
        // Most first; ties in a stable order.
        closed.sort_by(|a, b| {
            b.connections
                .cmp(&a.connections)
                .then_with(|| (a.role, a.address, a.port).cmp(&(b.role, b.address, b.port)))
        });
        closed.truncate(TOP_DESTINATIONS);
        ClosedReport { closed_connections: closed, closed_uncounted: uncounted }
    }

    /// The destinations churning now, by the window ending at `now_ns`.
    fn churning(&self, now_ns: u64) -> Vec<(Destination, Closed, f64)> {
        let (sums, _, seconds) = window_sums(&self.state().buckets, now_ns);
        let mut churning: Vec<_> = sums
            .into_iter()
            .map(|(destination, closed)| {
                let rate = closed.connections as f64 / seconds;
                (destination, closed, rate)
            })
            .filter(|(_, closed, rate)| {
                *rate >= self.churn.rate && median_under(&closed.lifetime, self.churn.lifetime)
            })
            .collect();
        churning.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        churning
    }
}

impl State {
    fn count(&mut self, record: &TransitionRecord, label: usize) {
        let Some(totals) = record.closed() else { return };
        let destination = Destination::of(record);
        let by_role = &mut self.totals[label][destination.role as usize];
        let lifetime = record.lifetime_ns();
        let rtt = record.closing_rtt_ns();
        if let Some(ns) = lifetime {
            by_role.lifetime.observe(ns);
        }
        if let Some(ns) = rtt {
            by_role.rtt.observe(ns);
        }
        by_role.sent.observe(totals.bytes_sent);
        by_role.received.observe(totals.bytes_received);

        let epoch = record.ts_ns / BUCKET_NS;
        let bucket = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if bucket.epoch != epoch {
            if epoch < bucket.epoch {
                return;
            }
            *bucket = Bucket { epoch, ..Bucket::default() };
        }
        let room = bucket.by_destination.len() < MAX_KEYS;
        let closed = match bucket.by_destination.get_mut(&destination) {
            Some(closed) => closed,
            None if room => bucket.by_destination.entry(destination).or_default(),
            None => {
                bucket.uncounted += 1;
                return;
            }
        };
        closed.connections += 1;
        closed.bytes_sent += totals.bytes_sent;
        closed.bytes_received += totals.bytes_received;
        if let Some(ns) = lifetime {
            closed.lifetime.observe(ns);
        }
        if let Some(ns) = rtt {
            closed.rtt.observe(ns);
            closed.rtt_max_ns = closed.rtt_max_ns.max(ns);
        }
        if record.owner_known() {
            closed.owner = Some((record.owner_tgid, record.owner_comm, record.owner_cgroup));
        }
    }
}

impl Diagnosis for ClosedConnections {
    fn transitions(&self, batch: &[Transition]) {
        let mut state = self.state();
        for Transition { record, label, .. } in batch {
            state.count(record, *label);
        }
    }

    /// Churn is looked for once a second: named, logged when it starts and when it ends.
    fn every_second(&self, _shared: &Shared) {
        let now_ns = crate::clock::monotonic_ns();
        let churning = self.churning(now_ns);
        let mut naming = self.naming.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let present: HashSet<Destination> = churning.iter().map(|(d, _, _)| *d).collect();
        let ended: Vec<Destination> =
            naming.churning.keys().filter(|d| !present.contains(d)).copied().collect();
        for destination in ended {
            naming.churning.remove(&destination);
            log::info!("connection churn ended: {}", describe_destination(&destination));
        }
        let mut findings = Vec::new();
        for (destination, closed, rate) in churning {
            let process = name_owner(&mut naming, closed.owner);
            let mut finding = churn_finding(&destination, &closed, rate, process);
            let since = match naming.churning.entry(destination) {
                Entry::Occupied(since) => *since.get(),
                Entry::Vacant(new) => {
                    log::warn!(
                        "connection churn: {} {}; {}",
                        finding.process.owner_line(),
                        finding.summary,
                        finding.details.join("; ")
                    );
                    *new.insert(now)
                }
            };
            finding.for_seconds = now.duration_since(since).as_secs_f64();
            findings.push(finding);
        }
        *self.findings.lock().unwrap_or_else(PoisonError::into_inner) = findings;
    }

    fn metrics(&self, encoder: &mut DescriptorEncoder, scrape: &Scrape) -> fmt::Result {
        {
            let state = self.state();
            families(encoder, &state.totals, scrape.ports)?;
        }
        let findings = self.churning(scrape.now);
        let mut family = encoder.encode_descriptor(
            "tcpstate_connection_churn",
            "Destinations (or local services, role=server) getting new connections at a high \
             rate that live a median of milliseconds, over the last minute: connections per \
             second (--churn-rate, --churn-lifetime)",
            None,
            MetricType::Gauge,
        )?;
        for (destination, _, rate) in findings.iter().take(TOP_DESTINATIONS) {
            let labels = [
                ("role", destination.role.name().to_owned()),
                ("address", destination.address.to_string()),
                ("port", destination.port.to_string()),
            ];
            ConstGauge::new(*rate).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn destinations(&self, now_ns: u64, sections: &mut serde_json::Map<String, serde_json::Value>) {
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(self.report(now_ns)) {
            sections.extend(fields);
        }
    }

    fn findings(&self, report: &mut LeakReport) {
        report
            .findings
            .extend(self.findings.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned());
    }

    fn units(&self) -> &'static [(&'static str, &'static str)] {
        &[("connection_churn", "{connection}/s")]
    }
}

fn describe_destination(destination: &Destination) -> String {
    match destination.role {
        Role::Server => format!("connections accepted on {}", destination.address()),
        Role::Client | Role::Unknown => format!("connections to {}", destination.address()),
    }
}

/// The process the kernel named for the destination's connections, as far as it is known
/// (its command line redacted as `--cmdline` says).
fn name_owner(naming: &mut Naming, owner: Option<Owner>) -> Process {
    let Some((pid, comm, cgroup)) = owner else { return Process::default() };
    if let Some(process) = naming.processes.get(pid) {
        return process;
    }
    let cgroup = naming.cgroups.get(cgroup);
    Process::named(pid, comm_str(&comm).into_owned(), cgroup.as_deref())
}

fn churn_finding(
    destination: &Destination,
    closed: &Closed,
    rate: f64,
    process: Process,
) -> Finding {
    let median_ms = median_seconds(&closed.lifetime).map_or(0.0, |s| s * 1e3);
    let verb = match destination.role {
        Role::Server => format!("accepts {rate:.0} connections/s on {}", destination.address()),
        Role::Client | Role::Unknown => {
            format!("opens {rate:.0} connections/s to {}", destination.address())
        }
    };
    let per_connection = |bytes: u64| bytes / closed.connections.max(1);
    let details = vec![format!(
        "per connection: {} bytes sent, {} received{}",
        per_connection(closed.bytes_sent),
        per_connection(closed.bytes_received),
        median_seconds(&closed.rtt)
            .map_or_else(String::new, |rtt| format!(", round trip {:.3} ms", rtt * 1e3)),
    )];
    Finding {
        kind: "connection churn".into(),
        process,
        count: closed.connections as usize,
        // Set by the caller, which knows since when.
        for_seconds: 0.0,
        summary: format!("{verb}, median lifetime {median_ms:.1} ms"),
        details,
        advice: "A new connection per request (no pool, keep-alive off) fills TIME_WAIT and \
                 uses up ephemeral ports: reuse connections. `tcpstate explain TIME_WAIT` \
                 says what churn costs."
            .into(),
        stuck: false,
        sockets: Vec::new(),
    }
}

fn byte_histogram(
    family: &mut prometheus_client::encoding::MetricEncoder,
    labels: &[(&str, String)],
    observed: &ByteHistogram,
) -> fmt::Result {
    let mut buckets: Vec<(f64, u64)> = BYTE_BUCKETS
        .iter()
        .map(|&bound| bound as f64)
        .zip(observed.buckets.iter().copied())
        .collect();
    buckets.push((f64::MAX, observed.buckets[BYTE_BUCKETS.len()]));
    family.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
        observed.sum as f64,
        observed.count,
        &buckets,
        None,
    )
}

/// A histogram family: its name, help, and where its series are in `Totals`.
type Family<H> = (&'static str, &'static str, fn(&Totals) -> &H);

fn families(
    encoder: &mut DescriptorEncoder,
    totals: &[[Totals; 3]],
    ports: &PortSeries,
) -> fmt::Result {
    let series = |role: Role, label: usize| ports.with(&[("role", role.name().to_owned())], label);
    let durations: [Family<DurationHistogram>; 2] = [
        (
            "tcpstate_connection_lifetime_seconds",
            "Closed connections' lifetimes, from their first transition (SYN_SENT, or SYN_RECV \
             for an accepted one) to CLOSE, by role (client: this host connected; server: a \
             listener accepted it); connections older than tcpstate have none",
            |t| &t.lifetime,
        ),
        (
            "tcpstate_connection_rtt_seconds",
            "Closed connections' smoothed round-trip time as the kernel kept it at close, by \
             role (unknown: opened before tcpstate started)",
            |t| &t.rtt,
        ),
    ];
    for (name, help, of) in durations {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for role in Role::ALL {
            for label in ports.indexes() {
                histogram(&mut family, &series(role, label), of(&totals[label][role as usize]))?;
            }
        }
    }
    let bytes: [Family<ByteHistogram>; 2] = [
        (
            "tcpstate_connection_sent_bytes",
            "Closed connections' payload bytes acknowledged by the peer, per connection, by role",
            |t| &t.sent,
        ),
        (
            "tcpstate_connection_received_bytes",
            "Closed connections' payload bytes received, per connection, by role",
            |t| &t.received,
        ),
    ];
    for (name, help, of) in bytes {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for role in Role::ALL {
            for label in ports.indexes() {
                byte_histogram(
                    &mut family,
                    &series(role, label),
                    of(&totals[label][role as usize]),
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tracer_common::{
        TcpState as S,
        record::{
            ConnectionTotals, FLAG_ACCEPTED, FLAG_CLOSED, FLAG_LIFETIME_KNOWN, FLAG_OWNER_KNOWN,
        },
    };

    use super::*;
    use crate::daemon::core::tests::record;

    const CHURN: ChurnThresholds =
        ChurnThresholds { rate: 50.0, lifetime: Duration::from_millis(100) };

    /// A client connection to 10.0.0.9:5432 that closed at `at_ns` after `lifetime_ns`.
    fn closed(at_ns: u64, lifetime_ns: u64, flags: u8) -> TransitionRecord {
        let mut r = record(0xffff_8880_0000_1000, at_ns, S::FIN_WAIT2, S::CLOSE, 40000);
        r.daddr[..4].copy_from_slice(&[10, 0, 0, 9]);
        r.dport = 5432;
        r.flags |= FLAG_CLOSED | flags | FLAG_OWNER_KNOWN;
        r.owner_tgid = 4242;
        r.owner_comm[..6].copy_from_slice(b"client");
        r.totals = ConnectionTotals {
            bytes_sent: 100,
            bytes_received: 2000,
            lifetime_ns,
            srtt_us: 8 * 300,
            total_retrans: 0,
        };
        r
    }

    fn feed(diagnosis: &ClosedConnections, records: &[TransitionRecord]) {
        let batch: Vec<Transition> =
            records.iter().map(|&record| Transition { record, label: 0, stay_ns: None }).collect();
        diagnosis.transitions(&batch);
    }

    #[test]
    fn closed_connections_are_counted_by_role_and_destination() {
        let diagnosis =
            ClosedConnections::new(&PortLabels::none(), CHURN, CmdlinePolicy::default());
        let t0 = 100 * BUCKET_NS;
        feed(
            &diagnosis,
            &[
                closed(t0, 2_000_000, FLAG_LIFETIME_KNOWN),
                closed(t0 + 1, 4_000_000, FLAG_LIFETIME_KNOWN),
                closed(t0 + 2, 0, 0),
                closed(t0 + 3, 9_000_000, FLAG_LIFETIME_KNOWN | FLAG_ACCEPTED),
            ],
        );
        let state = diagnosis.state();
        let client = &state.totals[0][Role::Client as usize];
        assert_eq!((client.lifetime.count, client.lifetime.sum_ns), (2, 6_000_000));
        assert_eq!((client.sent.count, client.sent.sum, client.received.sum), (2, 200, 4000));
        let unknown = &state.totals[0][Role::Unknown as usize];
        assert_eq!((unknown.lifetime.count, unknown.sent.count), (0, 1), "no lifetime, never 0");
        assert_eq!(state.totals[0][Role::Server as usize].rtt.count, 1);
        drop(state);
        let report = diagnosis.report(t0 + BUCKET_NS);
        let to = &report.closed_connections[0];
        assert_eq!((to.role, to.port, to.connections), (Role::Client, 5432, 2));
        assert_eq!((to.bytes_sent, to.bytes_received), (200, 4000));
        assert_eq!(to.comm.as_deref(), Some("client"));
        assert_eq!(to.max_rtt_seconds, Some(0.0003));
        let server = report.closed_connections.iter().find(|d| d.role == Role::Server).unwrap();
        assert_eq!(server.address, "127.0.0.1".parse::<IpAddr>().unwrap(), "the local service");
    }

    /// 60 connections/s of 3 ms each for a minute is churn; the same rate of connections
    /// living 1 s is not, nor is 10 connections/s of 3 ms; and churn ends once the window
    /// has moved past it.
    #[test]
    fn churn_is_a_high_rate_of_short_connections() {
        let t0 = 1000 * BUCKET_NS;
        let minute = |lifetime_ns| -> Vec<TransitionRecord> {
            (0..60 * 60)
                .map(|i| closed(t0 + i * 1_000_000_000 / 60, lifetime_ns, FLAG_LIFETIME_KNOWN))
                .collect()
        };
        let at_end = t0 + 60 * 1_000_000_000;
        let churn = ClosedConnections::new(&PortLabels::none(), CHURN, CmdlinePolicy::default());
        feed(&churn, &minute(3_000_000));
        let found = churn.churning(at_end);
        assert_eq!(found.len(), 1);
        assert!((found[0].2 - 60.0).abs() < 7.0, "rate {}", found[0].2);
        let long = ClosedConnections::new(&PortLabels::none(), CHURN, CmdlinePolicy::default());
        feed(&long, &minute(1_000_000_000));
        assert!(long.churning(at_end).is_empty());
        let slow = ClosedConnections::new(&PortLabels::none(), CHURN, CmdlinePolicy::default());
        feed(&slow, &minute(3_000_000).into_iter().step_by(6).collect::<Vec<_>>());
        assert!(slow.churning(at_end).is_empty());
        assert!(churn.churning(at_end + 2 * 60 * 1_000_000_000).is_empty());
    }

    #[test]
    fn the_median_is_in_its_bucket() {
        let mut h = DurationHistogram::default();
        assert_eq!(median_seconds(&h), None);
        for ns in [2_000_000, 2_500_000, 2_900_000, 50_000_000] {
            h.observe(ns);
        }
        let median = median_seconds(&h).unwrap();
        assert!((0.001..=0.003).contains(&median), "{median}");
        assert!(median_under(&h, Duration::from_millis(100)));
        assert!(!median_under(&h, Duration::from_millis(1)));
    }
}
