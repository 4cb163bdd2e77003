//! `tcpstate watch`: a live, filterable stream of transitions, in aligned columns or JSON lines.

use std::{
    borrow::Cow,
    io::{self, BufWriter, Write},
    net::IpAddr,
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use tracer_common::{
    TcpState, TransitionRecord,
    record::{AF_INET, AF_INET6},
    settings::{KernelFilter, MAX_FILTER_PORTS},
};

use crate::{
    cgroups::{CgroupName, CgroupNames},
    cli::WatchArgs,
    clock::WallClock,
    event::{TransitionExt as _, comm_str},
    failure::Failure,
    probe::{Delivery, Probe},
    reader::RecordReader,
    socket::Family,
};

/// How long a record may wait in the ring before the reader looks without a wakeup.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Ring size unless `--ring-bytes` says otherwise: four times the daemon's, because writing
/// to a terminal or a pipe can block this reader while the kernel keeps sending. Under a
/// 10 s storm of ~390,000 transitions per second, 4M lost records in one run of three, 16M
/// none: it holds about 300 ms of such a storm.
const RING_BYTES: u32 = 16 << 20;
/// How often lost records are reported while running.
const LOSS_REPORT_INTERVAL: Duration = Duration::from_secs(10);

impl WatchArgs {
    /// The part of the filter that runs in the kernel: ports, family, states.
    pub fn kernel_filter(&self) -> KernelFilter {
        fn port_list(list: &[u16]) -> ([u16; MAX_FILTER_PORTS], u8) {
            let mut out = [0; MAX_FILTER_PORTS];
            for (slot, port) in out.iter_mut().zip(list) {
                *slot = *port;
            }
            (out, list.len().min(MAX_FILTER_PORTS) as u8)
        }
        let (ports, port_count) = port_list(&self.ports);
        let (sports, sport_count) = port_list(&self.sports);
        let (dports, dport_count) = port_list(&self.dports);
        KernelFilter {
            ports,
            sports,
            dports,
            port_count,
            sport_count,
            dport_count,
            family: if self.ipv4 {
                AF_INET
            } else if self.ipv6 {
                AF_INET6
            } else {
                0
            },
            state_mask: self.states.iter().fold(0, |mask, state| mask | state.mask_bit()),
            ..KernelFilter::ALL
        }
    }

    /// Wide enough for the families shown; longer IPv6 addresses push the row right.
    fn address_width(&self) -> usize {
        if self.ipv4 {
            21
        } else if self.ipv6 {
            47
        } else {
            25
        }
    }

    /// The part of the filter that runs here: addresses.
    fn keeps(&self, record: &TransitionRecord) -> bool {
        self.addrs.is_empty() || {
            let (local, remote) = (record.ip(&record.saddr), record.ip(&record.daddr));
            self.addrs.iter().any(|addr| *addr == local || *addr == remote)
        }
    }

    /// The container filters, on the owner's cgroup (`None`: owner or cgroup unknown, which
    /// no container filter keeps).
    fn keeps_cgroup(&self, cgroup: Option<&CgroupName>) -> bool {
        if !self.filters_containers() {
            return true;
        }
        let Some(cgroup) = cgroup else { return false };
        let container = &cgroup.container;
        let in_container = self.container.as_ref().is_none_or(|wanted| {
            container.container_id.as_ref().is_some_and(|id| id.starts_with(wanted.as_str()))
        });
        let in_cgroup = self.cgroup.as_ref().is_none_or(|wanted| {
            cgroup.path.strip_prefix(wanted.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || wanted.as_str() == "/"
            })
        });
        let in_pod = self.pod.as_ref().is_none_or(|(namespace, name)| {
            container.pod_namespace.as_ref() == Some(namespace)
                && container.pod_name.as_ref() == Some(name)
        });
        in_container && in_cgroup && in_pod
    }
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let mut probe = Probe::attach(&args.probe.probe_options(args.kernel_filter(), RING_BYTES))?;
    let ring = probe.take_ring().context("ring buffer already taken")?;
    let mut reader = RecordReader::new(ring, POLL_INTERVAL).context("watching the ring buffer")?;
    let mut session = Session {
        printer: Printer::new(args.json, args.address_width(), io::stdout().lock()),
        cgroups: CgroupNames::default(),
        losses: LossReporter::default(),
        read: 0,
        printed: 0,
        limit: args.count.unwrap_or(u64::MAX),
        outcome: Ok(()),
        args: &args,
    };
    session.outcome = session.printer.header();

    let deadline =
        args.duration.map(|secs| tokio::time::Instant::now() + Duration::from_secs(secs));
    let mut report = tokio::time::interval(LOSS_REPORT_INTERVAL);
    report.tick().await;
    let stop = crate::signals::shutdown()?;
    tokio::pin!(stop);
    while !session.done() {
        tokio::select! {
            batch = reader.next_batch(|item| session.accept(item)) => {
                batch.context("reading the ring buffer")?;
            }
            _ = &mut stop => break,
            _ = sleep_until(deadline) => break,
            _ = report.tick() => {
                session.losses.report(&probe.delivery(reader.duplicates_dropped())?, false);
            }
        }
        session.flush();
    }
    // Whatever arrived before the stop is still shown.
    reader.drain_now(|item| session.accept(item));
    session.flush();
    let delivery = probe.delivery(reader.duplicates_dropped())?;
    session.losses.report(&delivery, true);
    if args.stats {
        eprintln!(
            "tcpstate watch stats: read={} shown={} lost_ringbuf_full={} lost_recursion={} \
             malformed={} map_update_failed={} handled={} filtered={} rescued={}",
            session.read,
            session.printed,
            delivery.ringbuf_full,
            delivery.recursion_misses,
            session.losses.malformed,
            delivery.map_update_failed,
            delivery.handled,
            delivery.filtered,
            delivery.rescued,
        );
    }
    match session.outcome {
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}

/// One `watch` run's output state.
struct Session<'a, W: Write> {
    args: &'a WatchArgs,
    printer: Printer<W>,
    cgroups: CgroupNames,
    losses: LossReporter,
    /// Records read from the ring, shown or not.
    read: u64,
    printed: u64,
    limit: u64,
    /// The first write error; output stops there (e.g. a closed pipe).
    outcome: io::Result<()>,
}

impl<W: Write> Session<'_, W> {
    fn accept(&mut self, item: Result<TransitionRecord, tracer_common::DecodeError>) {
        if self.done() {
            return;
        }
        self.read += 1;
        match item {
            Ok(record) if self.args.keeps(&record) => {
                // Named only when something shows or filters it.
                let cgroup = if self.printer.json || self.args.filters_containers() {
                    record.owner().and_then(|_| self.cgroups.get(record.owner_cgroup))
                } else {
                    None
                };
                if !self.args.keeps_cgroup(cgroup.as_deref()) {
                    return;
                }
                self.outcome = self.printer.print(&record, cgroup.as_deref());
                self.printed += 1;
            }
            Ok(_) => {}
            Err(error) => self.losses.malformed(error),
        }
    }

    fn done(&self) -> bool {
        self.printed >= self.limit || self.outcome.is_err()
    }

    fn flush(&mut self) {
        if self.outcome.is_ok() {
            self.outcome = self.printer.out.flush();
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Writes transitions as aligned columns or JSON lines.
struct Printer<W: Write> {
    json: bool,
    /// Column width of an address:port: IPv4 fits 21, bracketed IPv6 up to 47.
    address_width: usize,
    out: BufWriter<W>,
    clock: WallClock,
}

/// The keys of a `--json` line, in order (documented in the README; scripts rely on them).
pub const JSON_KEYS: [&str; 17] = [
    "ts_ns",
    "skaddr",
    "pid",
    "comm",
    "owner_pid",
    "owner_comm",
    "family",
    "saddr",
    "sport",
    "daddr",
    "dport",
    "old",
    "new",
    "dwell_ns",
    "cgroup",
    "container_id",
    "error",
];

/// One JSON line: exactly the keys of `JSON_KEYS`, in this order.
#[derive(Serialize)]
struct JsonTransition<'a> {
    ts_ns: u64,
    skaddr: Hex,
    pid: u32,
    comm: Cow<'a, str>,
    owner_pid: Option<u32>,
    owner_comm: Option<Cow<'a, str>>,
    family: Family,
    saddr: IpAddr,
    sport: u16,
    daddr: IpAddr,
    dport: u16,
    old: TcpState,
    new: TcpState,
    dwell_ns: Option<u64>,
    cgroup: Option<&'a str>,
    container_id: Option<&'a str>,
    error: Option<&'static str>,
}

impl JsonTransition<'_> {
    /// Writes the line as `serde_json` would (a test holds them equal), by hand: keys,
    /// numbers, addresses and state names never need escaping, and escaping every key and
    /// value byte by byte was 40 % of `watch --json`'s time under a storm, the formatting
    /// machinery most of the rest. Only the strings that come from outside (task names,
    /// cgroup paths) go through the escaper, and only when they hold a character that needs
    /// it.
    fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(b"{\"ts_ns\":")?;
        write_number(out, self.ts_ns)?;
        out.write_all(b",\"skaddr\":\"")?;
        write_hex(out, self.skaddr.0)?;
        out.write_all(b"\",\"pid\":")?;
        write_number(out, self.pid)?;
        out.write_all(b",\"comm\":")?;
        write_str(out, &self.comm)?;
        out.write_all(b",\"owner_pid\":")?;
        write_option(out, self.owner_pid, write_number)?;
        out.write_all(b",\"owner_comm\":")?;
        write_option(out, self.owner_comm.as_deref(), write_str)?;
        out.write_all(b",\"family\":\"")?;
        out.write_all(self.family.name().as_bytes())?;
        out.write_all(b"\",\"saddr\":\"")?;
        write_ip(out, self.saddr)?;
        out.write_all(b"\",\"sport\":")?;
        write_number(out, self.sport)?;
        out.write_all(b",\"daddr\":\"")?;
        write_ip(out, self.daddr)?;
        out.write_all(b"\",\"dport\":")?;
        write_number(out, self.dport)?;
        out.write_all(b",\"old\":\"")?;
        write_state(out, self.old)?;
        out.write_all(b"\",\"new\":\"")?;
        write_state(out, self.new)?;
        out.write_all(b"\",\"dwell_ns\":")?;
        write_option(out, self.dwell_ns, write_number)?;
        out.write_all(b",\"cgroup\":")?;
        write_option(out, self.cgroup, write_str)?;
        out.write_all(b",\"container_id\":")?;
        write_option(out, self.container_id, write_str)?;
        out.write_all(b",\"error\":")?;
        write_option(out, self.error, write_str)?;
        out.write_all(b"}\n")
    }
}

fn write_number<W: Write>(out: &mut W, number: impl itoa::Integer) -> io::Result<()> {
    out.write_all(itoa::Buffer::new().format(number).as_bytes())
}

/// `{:#x}`: `0x` and the lowercase digits, without leading zeros.
fn write_hex(out: &mut impl Write, value: u64) -> io::Result<()> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 18];
    let digits = (64 - value.leading_zeros()).div_ceil(4).max(1) as usize;
    text[..2].copy_from_slice(b"0x");
    for i in 0..digits {
        text[2 + digits - 1 - i] = DIGITS[(value >> (4 * i)) as usize & 0xf];
    }
    out.write_all(&text[..2 + digits])
}

/// IPv4 by hand (the common case, and `Display` is slow); IPv6 as `Display` writes it.
fn write_ip(out: &mut impl Write, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            write_number(out, a)?;
            for octet in [b, c, d] {
                out.write_all(b".")?;
                write_number(out, octet)?;
            }
            Ok(())
        }
        IpAddr::V6(v6) => write!(out, "{v6}"),
    }
}

fn write_state(out: &mut impl Write, state: TcpState) -> io::Result<()> {
    match state.name() {
        Some(name) => out.write_all(name.as_bytes()),
        None => write!(out, "{state}"),
    }
}

fn write_option<W: Write, T>(
    out: &mut W,
    value: Option<T>,
    write: impl FnOnce(&mut W, T) -> io::Result<()>,
) -> io::Result<()> {
    match value {
        Some(value) => write(out, value),
        None => out.write_all(b"null"),
    }
}

/// A JSON string: as it is when no character needs escaping, else through `serde_json`.
fn write_str(out: &mut impl Write, text: &str) -> io::Result<()> {
    if text.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.write_all(b"\"")?;
        out.write_all(text.as_bytes())?;
        out.write_all(b"\"")
    } else {
        serde_json::to_writer(out, text).map_err(io::Error::from)
    }
}

/// A kernel address as JSON text (`"0xffff..."`), written without an intermediate string.
struct Hex(u64);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:#x}", self.0))
    }
}

impl<W: Write> Printer<W> {
    fn new(json: bool, address_width: usize, out: W) -> Self {
        Self {
            json,
            address_width,
            out: BufWriter::with_capacity(64 << 10, out),
            clock: WallClock::now(),
        }
    }

    fn header(&mut self) -> io::Result<()> {
        if !self.json {
            let width = self.address_width;
            writeln!(
                self.out,
                "{:<12} {:>7} {:<16} {:<width$} {:<width$} {:<27} {:>10}",
                "TIME", "PID", "COMM", "LOCAL", "REMOTE", "TRANSITION", "MS"
            )?;
            self.out.flush()?;
        }
        Ok(())
    }

    fn print(&mut self, record: &TransitionRecord, cgroup: Option<&CgroupName>) -> io::Result<()> {
        if self.json {
            let owner = record.owner();
            let line = JsonTransition {
                ts_ns: record.ts_ns,
                skaddr: Hex(record.skaddr),
                pid: record.tgid,
                comm: comm_str(&record.comm),
                owner_pid: owner.as_ref().map(|(pid, _)| *pid),
                owner_comm: owner.map(|(_, comm)| comm),
                family: record.family(),
                saddr: record.ip(&record.saddr),
                sport: record.sport,
                daddr: record.ip(&record.daddr),
                dport: record.dport,
                old: record.oldstate,
                new: record.newstate,
                dwell_ns: record.dwell().map(|_| record.dwell_ns),
                cgroup: cgroup.map(|c| c.path.as_str()),
                container_id: cgroup.and_then(|c| c.container.container_id.as_deref()),
                error: record.failure().map(Failure::name),
            };
            line.write_to(&mut self.out)
        } else {
            // The owner when known: in softirq the running task is unrelated to the socket.
            let (pid, comm) = match record.owner() {
                Some((pid, comm)) => (pid.to_string(), comm),
                None => ("-".to_owned(), Cow::Borrowed("-")),
            };
            let ms = record
                .dwell()
                .map_or_else(|| "-".to_owned(), |d| format!("{:.3}", d.as_secs_f64() * 1e3));
            let width = self.address_width;
            write!(
                self.out,
                "{:<12} {:>7} {:<16} {:<width$} {:<width$} {:<27} {:>10}",
                self.clock.time_of_day(record.ts_ns),
                pid,
                comm,
                record.local().to_string(),
                record.remote().to_string(),
                format!("{} -> {}", record.oldstate, record.newstate),
                ms
            )?;
            match record.failure() {
                Some(failure) => writeln!(self.out, "  {}", failure.name()),
                None => writeln!(self.out),
            }
        }
    }
}

/// Reports lost records on stderr: while running when the count grew, and at exit.
#[derive(Default)]
struct LossReporter {
    reported_lost: u64,
    malformed: u64,
}

impl LossReporter {
    fn malformed(&mut self, error: tracer_common::DecodeError) {
        if self.malformed == 0 {
            log::error!("{error}");
        }
        self.malformed += 1;
    }

    fn report(&mut self, delivery: &Delivery, at_exit: bool) {
        let lost = delivery.lost();
        if lost > self.reported_lost || (at_exit && (lost > 0 || self.malformed > 0)) {
            eprintln!(
                "tcpstate: {lost} transitions lost{} (ring buffer full: {}, kernel skipped the \
                 program: {}); {} malformed records; {} per-socket map updates failed",
                if at_exit { " in total" } else { " so far" },
                delivery.ringbuf_full,
                delivery.recursion_misses,
                self.malformed,
                delivery.map_update_failed,
            );
            self.reported_lost = lost;
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::record::{FLAG_DWELL_KNOWN, FLAG_OWNER_KNOWN, IPPROTO_TCP};

    use super::*;

    fn record() -> TransitionRecord {
        TransitionRecord {
            ts_ns: 5_000_000_000,
            skaddr: 0xffff_8881_0000_1000,
            dwell_ns: 1_500_000,
            owner_cgroup: 0,
            pid: 11,
            tgid: 10,
            owner_tgid: 20,
            netns: 1,
            comm: *b"swapper/0\0\0\0\0\0\0\0",
            owner_comm: *b"server\0\0\0\0\0\0\0\0\0\0",
            saddr: [0; 16],
            daddr: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            sport: 443,
            dport: 51000,
            family: AF_INET6,
            protocol: IPPROTO_TCP,
            oldstate: TcpState::ESTABLISHED,
            newstate: TcpState::CLOSE_WAIT,
            flags: FLAG_DWELL_KNOWN | FLAG_OWNER_KNOWN,
            error: 0,
            _pad: [0; 4],
        }
    }

    /// The hand-written line is exactly what serde_json makes of the same struct, escapes
    /// and nulls included.
    #[test]
    fn json_lines_are_written_as_serde_json_would() {
        let lines = [
            JsonTransition {
                ts_ns: 1,
                skaddr: Hex(0xffff_8881_0000_1000),
                pid: 7,
                comm: Cow::Borrowed("a \"quoted\" \\ name\t\u{1}é"),
                owner_pid: None,
                owner_comm: None,
                family: Family::Inet,
                saddr: IpAddr::from([127, 0, 0, 1]),
                sport: 0,
                daddr: IpAddr::from([10, 1, 2, 3]),
                dport: 65535,
                old: TcpState::SYN_SENT,
                new: TcpState::from_kernel(42),
                dwell_ns: None,
                cgroup: None,
                container_id: None,
                error: None,
            },
            JsonTransition {
                ts_ns: u64::MAX,
                skaddr: Hex(0),
                pid: u32::MAX,
                comm: Cow::Borrowed("nginx"),
                owner_pid: Some(42),
                owner_comm: Some(Cow::Borrowed("java")),
                family: Family::Inet6,
                saddr: "fe80::1".parse().unwrap(),
                sport: 443,
                daddr: "::ffff:10.0.0.1".parse().unwrap(),
                dport: 1,
                old: TcpState::ESTABLISHED,
                new: TcpState::CLOSE,
                dwell_ns: Some(0),
                cgroup: Some("/kubepods.slice/pod\"x\".slice"),
                container_id: Some("abc"),
                error: Some("refused"),
            },
        ];
        for line in &lines {
            let mut written = Vec::new();
            line.write_to(&mut written).unwrap();
            let expected = serde_json::to_string(line).unwrap() + "\n";
            assert_eq!(String::from_utf8(written).unwrap(), expected);
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for value in [0, 1, 0xf, 0x10, 0xabc, 0xffff_8881_0000_1000, u64::MAX] {
            let mut written = Vec::new();
            write_hex(&mut written, value).unwrap();
            assert_eq!(String::from_utf8(written).unwrap(), format!("{value:#x}"));
        }
        for ip in ["0.0.0.0", "255.255.255.255", "10.0.20.3", "::", "2001:db8::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut written = Vec::new();
            write_ip(&mut written, ip).unwrap();
            assert_eq!(String::from_utf8(written).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn json_line_has_exactly_the_documented_keys() {
        let mut printer = Printer::new(true, 25, Vec::new());
        let id = "ab".repeat(32);
        let cgroup = CgroupName {
            path: format!("/machine.slice/libpod-{id}.scope"),
            container: crate::container::Container::of_cgroup(
                &format!("/machine.slice/libpod-{id}.scope"),
                std::path::Path::new("/nonexistent"),
            ),
        };
        printer.print(&record(), Some(&cgroup)).unwrap();
        let out = printer.out.into_inner().unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        let mut expected = JSON_KEYS.to_vec();
        expected.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, expected);
        assert_eq!(value["skaddr"], "0xffff888100001000");
        assert_eq!(value["daddr"], "fe80::1");
        assert_eq!(value["saddr"], "::");
        assert_eq!(value["old"], "ESTABLISHED");
        assert_eq!(value["new"], "CLOSE_WAIT");
        assert_eq!(value["owner_comm"], "server");
        assert_eq!(value["dwell_ns"], 1_500_000);
        assert_eq!(value["cgroup"], cgroup.path);
        assert_eq!(value["container_id"], id);
    }

    #[test]
    fn unknowns_are_null_in_json_and_dash_in_columns() {
        let mut unknown = record();
        unknown.flags = 0;
        let mut printer = Printer::new(true, 25, Vec::new());
        printer.print(&unknown, None).unwrap();
        let value: serde_json::Value =
            serde_json::from_slice(&printer.out.into_inner().unwrap()).unwrap();
        assert!(value["dwell_ns"].is_null());
        assert!(value["owner_pid"].is_null());
        assert!(value["owner_comm"].is_null());
        assert!(value["cgroup"].is_null() && value["container_id"].is_null());
        assert!(value["error"].is_null());

        let mut printer = Printer::new(false, 25, Vec::new());
        printer.print(&unknown, None).unwrap();
        let line = String::from_utf8(printer.out.into_inner().unwrap()).unwrap();
        assert!(line.contains("[fe80::1]:51000"), "{line}");
        assert!(line.trim_end().ends_with(" -"), "{line}");
    }

    #[test]
    fn a_failed_connect_says_why() {
        let mut refused = record();
        (refused.oldstate, refused.newstate) = (TcpState::SYN_SENT, TcpState::CLOSE);
        refused.error = libc::ECONNREFUSED as u8;
        let mut printer = Printer::new(true, 25, Vec::new());
        printer.print(&refused, None).unwrap();
        let value: serde_json::Value =
            serde_json::from_slice(&printer.out.into_inner().unwrap()).unwrap();
        assert_eq!(value["error"], "refused");
        let mut printer = Printer::new(false, 25, Vec::new());
        printer.print(&refused, None).unwrap();
        let line = String::from_utf8(printer.out.into_inner().unwrap()).unwrap();
        assert!(line.contains("SYN_SENT -> CLOSE") && line.ends_with("1.500  refused\n"), "{line}");
    }

    #[test]
    fn container_filters_match_the_owner_cgroup() {
        use clap::Parser as _;
        let id = "3f4e".repeat(16);
        let path = format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope");
        let mut cgroup = CgroupName {
            container: crate::container::Container::of_cgroup(&path, std::path::Path::new("/")),
            path,
        };
        cgroup.container.pod_namespace = Some("shop".into());
        cgroup.container.pod_name = Some("checkout".into());
        let keeps = |args: &[&str], cgroup: Option<&CgroupName>| {
            let cli =
                crate::cli::Cli::try_parse_from(["tcpstate", "watch"].iter().chain(args)).unwrap();
            let crate::cli::Command::Watch(watch) = cli.command else { unreachable!() };
            watch.keeps_cgroup(cgroup)
        };
        assert!(keeps(&[], None), "no container filter keeps everything");
        assert!(keeps(&["--container", "3F4E3F4E"], Some(&cgroup)), "a prefix, any case");
        assert!(!keeps(&["--container", "3f4f"], Some(&cgroup)));
        assert!(!keeps(&["--container", "3f4e"], None), "an unknown owner is not in it");
        assert!(keeps(&["--cgroup", "/kubepods.slice"], Some(&cgroup)), "below the path");
        assert!(keeps(&["--cgroup", "/"], Some(&cgroup)));
        assert!(!keeps(&["--cgroup", "/kubepods"], Some(&cgroup)), "a whole component");
        assert!(keeps(&["--pod", "shop/checkout"], Some(&cgroup)));
        assert!(!keeps(&["--pod", "shop/cart"], Some(&cgroup)));
        assert!(!keeps(&["--pod", "shop/checkout", "--container", "ab"], Some(&cgroup)));
    }
}
