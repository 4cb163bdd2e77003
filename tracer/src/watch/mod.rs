//! `tcpstate watch`: a live, filterable stream of transitions, in aligned columns or JSON lines.

mod closed;
mod columns;
mod filter;
mod json;
mod losses;

use std::{
    io::{self, BufWriter, Write},
    time::Duration,
};

use anyhow::Context as _;
use tracer_common::TransitionRecord;

pub(crate) use self::filter::Filter;
pub use self::{closed::CLOSED_JSON_KEYS, json::JSON_KEYS};
use self::{closed::ClosedColumns, columns::Columns, losses::LossReporter};
use crate::{
    cgroups::{CgroupName, CgroupNames},
    event::TransitionExt as _,
    probe::{Probe, ProbeOptions},
    reader::RecordReader,
    socket::Family,
};

/// How long a record may wait in the ring before the reader looks without a wakeup.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Ring size unless `--ring-bytes` says otherwise: four times the daemon's, because writing
/// to a terminal or a pipe can block this reader while the kernel keeps sending. Under a
/// 10 s storm of ~390,000 transitions per second, 4M lost records in one run of three, 16M
/// none: it holds about 300 ms of such a storm.
pub(crate) const RING_BYTES: u32 = 16 << 20;
/// How often lost records are reported while running.
const LOSS_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// What `tcpstate watch` shows, how, and for how long.
#[derive(Debug)]
pub struct Config {
    /// JSON lines instead of aligned columns.
    pub(crate) json: bool,
    /// One line per closed connection (`tcplife`'s view) instead of one per transition.
    pub(crate) closed: bool,
    /// Stop after this long.
    pub(crate) duration: Option<Duration>,
    /// Print delivery statistics at exit.
    pub(crate) stats: bool,
    /// Stop after showing this many transitions.
    pub(crate) count: Option<u64>,
    pub(crate) filter: Filter,
    /// The kernel side, with the filter's kernel part.
    pub(crate) probe: ProbeOptions,
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut probe = Probe::attach(&config.probe)?;
    let ring = probe.take_ring().context("ring buffer already taken")?;
    let mut reader = RecordReader::new(ring, POLL_INTERVAL).context("watching the ring buffer")?;
    let mut session = Session {
        printer: Printer::new(
            Layout::new(config.json, config.closed, config.filter.family),
            io::stdout().lock(),
        ),
        cgroups: CgroupNames::default(),
        losses: LossReporter::default(),
        read: 0,
        printed: 0,
        limit: config.count.unwrap_or(u64::MAX),
        outcome: Ok(()),
        filter: &config.filter,
    };
    session.outcome = session.printer.header();

    let deadline = config.duration.map(|duration| tokio::time::Instant::now() + duration);
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
    if config.stats {
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
    filter: &'a Filter,
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
            Ok(record) if self.printer.layout.shows(&record) && self.filter.keeps(&record) => {
                // Named only when something shows or filters it.
                let cgroup = if self.printer.is_json() || self.filter.filters_containers() {
                    record.owner().and_then(|_| self.cgroups.get(record.owner_cgroup))
                } else {
                    None
                };
                if !self.filter.keeps_cgroup(cgroup.as_deref()) {
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

/// What a line is (a transition, or a closed connection) and how it is written.
enum Layout {
    Columns(Columns),
    Json,
    ClosedColumns(ClosedColumns),
    ClosedJson,
}

impl Layout {
    fn new(json: bool, closed: bool, family: Option<Family>) -> Self {
        match (closed, json) {
            (false, false) => Self::Columns(Columns::for_family(family)),
            (false, true) => Self::Json,
            (true, false) => Self::ClosedColumns(ClosedColumns::for_family(family)),
            (true, true) => Self::ClosedJson,
        }
    }

    /// Whether `record` makes a line: every transition, or only those that end a connection.
    fn shows(&self, record: &TransitionRecord) -> bool {
        match self {
            Self::Columns(_) | Self::Json => true,
            Self::ClosedColumns(_) | Self::ClosedJson => record.closed().is_some(),
        }
    }
}

/// Writes transitions or closed connections as aligned columns or JSON lines.
struct Printer<W: Write> {
    layout: Layout,
    out: BufWriter<W>,
}

impl<W: Write> Printer<W> {
    fn new(layout: Layout, out: W) -> Self {
        Self { layout, out: BufWriter::with_capacity(64 << 10, out) }
    }

    const fn is_json(&self) -> bool {
        matches!(self.layout, Layout::Json | Layout::ClosedJson)
    }

    fn header(&mut self) -> io::Result<()> {
        match &self.layout {
            Layout::Columns(columns) => columns.write_header(&mut self.out)?,
            Layout::ClosedColumns(columns) => columns.write_header(&mut self.out)?,
            Layout::Json | Layout::ClosedJson => return Ok(()),
        }
        self.out.flush()
    }

    fn print(&mut self, record: &TransitionRecord, cgroup: Option<&CgroupName>) -> io::Result<()> {
        match &self.layout {
            Layout::Columns(columns) => columns.write_line(&mut self.out, record),
            Layout::Json => json::write_line(&mut self.out, record, cgroup),
            Layout::ClosedColumns(columns) => columns.write_line(&mut self.out, record),
            Layout::ClosedJson => closed::write_json(&mut self.out, record, cgroup),
        }
    }
}
