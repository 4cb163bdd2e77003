//! Loading and attaching the kernel program, and reading what it counts.
//!
//! `Probe::attach` runs every check that can fail with a useful message before the kernel is
//! involved (privileges, kernel version, tracefs, the tracepoint's layout, BTF), then loads the
//! embedded eBPF object with the run's settings and attaches it.

mod account;
mod attach;
pub(crate) mod btf;
pub(crate) mod format;
mod load;
mod maps;
pub(crate) mod preflight;
pub(crate) mod stats;
mod verifier;

use std::{io, os::fd::AsFd as _, path::PathBuf};

use aya::{
    Ebpf, EbpfError,
    maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::ProgramError,
};
use thiserror::Error;
use tracer_common::{
    KernelCounters,
    settings::{
        COUNTERS_MAIN, COUNTERS_STANDBY, KernelFilter, MAX_PORT_LABELS, RecentTransitions,
        RetransmitCounts, RetransmitDestination,
    },
    tracepoint,
};

pub use self::attach::other_tracers;

/// Sockets the kernel's per-socket map holds unless told or sized otherwise.
pub(crate) const DEFAULT_KERNEL_SOCKETS: u32 = 1 << 18;
pub(crate) use self::maps::{KERNEL_SOCKET_SLOT_BYTES, KernelSockets, MapMemory};

pub use self::{
    account::Delivery, btf::BtfError, format::FormatMismatch, preflight::PreflightError,
};
use self::{
    account::{Runs, account, add_counters},
    maps::take_map,
    stats::ProgramStats,
};

/// The kernel program, built by `build.rs` and embedded: one binary to ship.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

const MAIN_PROGRAM: &str = "inet_sock_set_state";
const STANDBY_PROGRAM: &str = "standby";
const ACCEPT_PROGRAM: &str = "accept_owner";
const RETRANSMIT_PROGRAM: &str = "tcp_retransmit_skb";
const SYNACK_PROGRAM: &str = "tcp_retransmit_synack";
const ACCEPT_FUNCTION: &str = "inet_csk_accept";

/// Settings of one probe instance.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Ring-buffer size in bytes: a power of two, at least one page.
    pub ring_bytes: u32,
    /// Capacity of the kernel's per-socket LRU map.
    pub socket_map_entries: u32,
    pub trace_mptcp: bool,
    pub filter: KernelFilter,
    /// Bytes of records a CPU sends between two forced wakeups of the reader (see
    /// `KernelSettings::wakeup_every`). `None`: an eighth of the ring shared among the CPUs,
    /// so the reader wakes well before the ring fills. 0: a wakeup for every record.
    pub wakeup_batch_bytes: Option<u64>,
    /// Read the tracepoint's layout from this file instead of tracefs (for tests).
    pub format_file: Option<PathBuf>,
    /// Attach the standby program before the main one, so it runs first and delivers every
    /// transition (for tests of the standby's path; the main program then skips them all).
    pub standby_first: bool,
    /// Local ports whose retransmits are counted apart (the daemon's `--port-label`s), at most
    /// `MAX_PORT_LABELS`.
    pub port_labels: Vec<u16>,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: 4 << 20,
            socket_map_entries: DEFAULT_KERNEL_SOCKETS,
            trace_mptcp: false,
            filter: KernelFilter::ALL,
            wakeup_batch_bytes: None,
            format_file: None,
            standby_first: false,
            port_labels: Vec::new(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "the kernel has no tracepoint {}:{} (reading {path}: {source}); tcpstate needs Linux {}.{} \
         or newer with CONFIG_NET and tracepoints enabled",
        tracepoint::CATEGORY,
        tracepoint::NAME,
        preflight::MIN_KERNEL.0,
        preflight::MIN_KERNEL.1
    )]
    TracepointMissing { path: String, source: io::Error },
    #[error(
        "refusing to attach: {0}. tcpstate would decode garbage on this kernel; please report \
         the output of `uname -r` and that format file"
    )]
    FormatMismatch(FormatMismatch),
    #[error("loading the eBPF object failed")]
    Load(#[source] EbpfError),
    #[error(
        "the kernel rejected program `{program}`: {reason}. Please report `uname -r` and this \
         message; `TCPSTATE_LOG=debug` prints the verifier's whole log"
    )]
    LoadProgram { program: &'static str, reason: String },
    #[error("attaching `{program}` to {target} failed{hint}")]
    Attach {
        program: &'static str,
        target: String,
        /// What to do about it, when known (starts with "; ").
        hint: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map `{map}` of the eBPF object: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "eBPF object has no `{0}`: the object and the binary were built from different sources"
    )]
    Missing(&'static str),
    #[error("reading the kernel's statistics of program `{program}`")]
    Stats {
        program: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The programs of the probe. The main one is required; the others each add something the
/// daemon can do without, and on a kernel that refuses one it runs degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Records every transition from the classic tracepoint.
    Main,
    /// Delivers the transitions the kernel skips the main program for.
    Standby,
    /// Names the owner of an accepted socket when accept() returns it.
    AcceptOwner,
    /// Counts retransmits by state, from `tcp:tcp_retransmit_skb` and `tcp_retransmit_synack`.
    Retransmits,
}

impl Part {
    /// The name in logs and in `tcpstate_probe_info{program}`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Standby => "standby",
            Self::AcceptOwner => "accept_owner",
            Self::Retransmits => "retransmits",
        }
    }

    /// What tcpstate does without it.
    pub(crate) const fn without(self) -> &'static str {
        match self {
            Self::Main => "nothing can be traced",
            Self::Standby => {
                "transitions the kernel skips the main program for (it was already running on \
                 that CPU) are counted as lost in tcpstate_events_lost{cause=\"recursion\"}, \
                 not delivered"
            }
            Self::AcceptOwner => {
                "owners of accepted sockets come from /proc (scanned when a leak needs a name); \
                 their transitions before the owner closes them show no owner"
            }
            Self::Retransmits => {
                "retransmits are not counted (tcpstate_retransmits_total is absent)"
            }
        }
    }
}

/// Whether one part of the probe runs, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartStatus {
    pub part: Part,
    /// `None` when active; otherwise what kept it from loading or attaching.
    pub unavailable: Option<String>,
}

impl PartStatus {
    pub fn active(&self) -> bool {
        self.unavailable.is_none()
    }
}

/// Retransmits the kernel counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Retransmits {
    /// Per port label as `KernelSettings::label_ports` numbers them (0: the other ports).
    pub by_label: Vec<RetransmitCounts>,
    /// Firings the kernel skipped the counters for, because the same counter was already
    /// running on that CPU (BTF tracepoints; counted by the kernels that skip them).
    pub missed: u64,
}

/// The attached kernel program and its maps. Dropping it detaches the program.
pub struct Probe {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, KernelCounters>,
    /// Per CPU: the two programs' runs (and their recent transitions).
    recent: PerCpuArray<MapData, RecentTransitions>,
    /// Per CPU and port label: retransmits by state.
    retransmits: PerCpuArray<MapData, RetransmitCounts>,
    /// Per CPU and destination: retransmits.
    retransmit_destinations: PerCpuHashMap<MapData, RetransmitDestination, u64>,
    /// With the standby attached: the main program's runs less the standby's runs and misses
    /// as both were attached (see `Probe::runs_apart`).
    runs_apart_at_attach: Option<i64>,
    ring: Option<RingBuf<MapData>>,
    parts: Vec<PartStatus>,
    map_memory: Vec<MapMemory>,
}

impl Probe {
    /// Checks the host, loads the program with `options` and attaches it.
    pub fn attach(options: &ProbeOptions) -> Result<Self, ProbeError> {
        preflight::check_privileges()?;
        let kernel = preflight::check_kernel_version()?;
        let tracefs = preflight::ensure_tracefs()?;
        load::check_format(options, &tracefs)?;
        let resolved = load::resolve(options)?;
        preflight::raise_memlock_if_needed(kernel);
        // Parsed once: the loader, the standby and the fexit program all need it.
        let kernel_btf = aya::Btf::from_sys_fs().ok();
        let mut ebpf = load::load(options, &resolved.settings, kernel_btf.as_ref())?;
        let parts = attach::attach_parts(
            &mut ebpf,
            options,
            kernel_btf.as_ref(),
            resolved.sock.as_ref(),
            resolved.accept_parameters.as_ref(),
            resolved.retransmits.clone(),
        )?;
        log::info!(
            "attached to tracepoint {}:{} (ring buffer {} KiB, {} kernel socket slots)",
            tracepoint::CATEGORY,
            tracepoint::NAME,
            options.ring_bytes >> 10,
            options.socket_map_entries
        );
        let map_memory = maps::map_memory();
        maps::log_memory(&map_memory);
        let ring = take_map(&mut ebpf, "EVENTS", RingBuf::try_from)?;
        let counters = take_map(&mut ebpf, "COUNTERS", PerCpuArray::try_from)?;
        let recent = take_map(&mut ebpf, "RECENT", PerCpuArray::try_from)?;
        let retransmits = take_map(&mut ebpf, "RETRANSMITS", PerCpuArray::try_from)?;
        let retransmit_destinations =
            take_map(&mut ebpf, "RETRANSMIT_DST", PerCpuHashMap::try_from)?;
        drop(kernel_btf);
        load::release_freed_memory();
        let mut probe = Self {
            ebpf,
            counters,
            recent,
            retransmits,
            retransmit_destinations,
            runs_apart_at_attach: None,
            ring: Some(ring),
            parts,
            map_memory,
        };
        if probe.parts.iter().any(|p| p.part == Part::Standby && p.active()) {
            probe.runs_apart_at_attach = Some(probe.runs_apart(options.standby_first)?);
        }
        Ok(probe)
    }

    /// Kernel memory of each of the probe's maps, as measured at load.
    pub(crate) fn map_memory(&self) -> &[MapMemory] {
        &self.map_memory
    }

    /// Which programs run on this kernel.
    pub fn parts(&self) -> &[PartStatus] {
        &self.parts
    }

    /// The ring buffer the program writes records to; can be taken once.
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// The kernel's per-socket map, to read what it knows of one socket by address.
    pub(crate) fn socket_map(&mut self) -> Result<KernelSockets, ProbeError> {
        take_map(&mut self.ebpf, "SOCKETS", HashMap::try_from).map(KernelSockets)
    }

    /// Reads what the programs counted. `duplicates_dropped` is what the reader of the ring
    /// has dropped as second deliveries so far (see `account`): read it first.
    ///
    /// Counts that add to the losses are read before those that take from them: in a firing
    /// the latter grow first (the main program's run as it starts, the standby's record as
    /// it is made, the standby's run as it ends), so a firing under way during the reads can
    /// make the losses seem fewer for a moment, never more (a counter that went down and up
    /// again would confuse `rate()`).
    pub fn delivery(&self, duplicates_dropped: u64) -> Result<Delivery, ProbeError> {
        let sum = |slot: u32| -> Result<KernelCounters, ProbeError> {
            let per_cpu = self
                .counters
                .get(&slot, 0)
                .map_err(|source| ProbeError::Map { map: "COUNTERS", source })?;
            Ok(per_cpu.iter().fold(KernelCounters::default(), add_counters))
        };
        let (main_skips, main, standby) = match self.runs_apart_at_attach {
            Some(apart) => {
                let firings = self.runs()?.standby + self.stats(STANDBY_PROGRAM)?.recursion_misses;
                let (main, standby) = (sum(COUNTERS_MAIN)?, sum(COUNTERS_STANDBY)?);
                let main_runs = self.runs()?.main;
                ((firings as i64 + apart - main_runs as i64).max(0) as u64, main, standby)
            }
            // Without the standby only the kernel's count is left, which kernels before 6.7
            // do not keep for a classic tracepoint's program.
            None => {
                let skips = self.main_stats()?.recursion_misses;
                (skips, sum(COUNTERS_MAIN)?, sum(COUNTERS_STANDBY)?)
            }
        };
        Ok(account(&main, &standby, main_skips, duplicates_dropped))
    }

    /// Retransmits counted so far, per port label (slot 0: the other ports), summed over
    /// CPUs; `None` when the retransmit counter does not run on this kernel.
    pub(crate) fn retransmits(&self) -> Result<Option<Retransmits>, ProbeError> {
        if !self.parts.iter().any(|p| p.part == Part::Retransmits && p.active()) {
            return Ok(None);
        }
        let map_error = |source| ProbeError::Map { map: "RETRANSMITS", source };
        let mut by_label = Vec::new();
        for slot in 0..=MAX_PORT_LABELS as u32 {
            let per_cpu = self.retransmits.get(&slot, 0).map_err(map_error)?;
            by_label.push(per_cpu.iter().fold(RetransmitCounts::default(), |mut total, cpu| {
                for (sum, count) in total.by_state.iter_mut().zip(cpu.by_state) {
                    *sum += count;
                }
                total.synack += cpu.synack;
                total.failed += cpu.failed;
                total.unlisted += cpu.unlisted;
                total
            }));
        }
        let missed = self.stats(RETRANSMIT_PROGRAM)?.recursion_misses
            + self.stats(SYNACK_PROGRAM)?.recursion_misses;
        Ok(Some(Retransmits { by_label, missed }))
    }

    /// Retransmits by destination (address, port) since attach, summed over CPUs, where the
    /// retransmit counters run. Destinations evicted to make room for others start again
    /// from 0 when they come back.
    pub(crate) fn retransmit_destinations(
        &self,
    ) -> Result<Option<Vec<(std::net::SocketAddr, u64)>>, ProbeError> {
        if !self.parts.iter().any(|p| p.part == Part::Retransmits && p.active()) {
            return Ok(None);
        }
        let map_error = |source| ProbeError::Map { map: "RETRANSMIT_DST", source };
        let mut found = Vec::new();
        for entry in self.retransmit_destinations.iter() {
            let (key, per_cpu) = match entry {
                Ok(entry) => entry,
                // Evicted between listing its key and reading it.
                Err(MapError::KeyNotFound) => continue,
                Err(source) => return Err(map_error(source)),
            };
            let count = per_cpu.iter().sum();
            found.push(((key.address(), key.dport).into(), count));
        }
        Ok(Some(found))
    }

    /// Both programs' runs, summed over CPUs.
    fn runs(&self) -> Result<Runs, ProbeError> {
        let per_cpu =
            self.recent.get(&0, 0).map_err(|source| ProbeError::Map { map: "RECENT", source })?;
        Ok(per_cpu.iter().fold(Runs::default(), |total, cpu| Runs {
            main: total.main + cpu.main_runs,
            standby: total.standby + cpu.standby_runs,
        }))
    }

    /// How many more times the main program ran than the standby ran or was skipped, just
    /// after both were attached: the firings between the two attachments (negative when the
    /// standby went first). From then on every firing runs the standby or counts its miss,
    /// so the firings since, less the main program's runs since, are the firings the kernel
    /// skipped the main program for, whether or not it counts them.
    fn runs_apart(&self, standby_first: bool) -> Result<i64, ProbeError> {
        // A firing under way while a CPU's slot is copied counts for the program that ran
        // first and not yet for the other: of a few reads, the one with none under way on
        // that CPU is the lowest (the highest when the standby runs first).
        let mut apart: Option<Vec<i64>> = None;
        for _ in 0..3 {
            let per_cpu = self
                .recent
                .get(&0, 0)
                .map_err(|source| ProbeError::Map { map: "RECENT", source })?;
            let read = per_cpu.iter().map(|cpu| cpu.main_runs as i64 - cpu.standby_runs as i64);
            apart = Some(match apart {
                None => read.collect(),
                Some(before) if standby_first => {
                    before.iter().zip(read).map(|(a, b)| b.max(*a)).collect()
                }
                Some(before) => before.iter().zip(read).map(|(a, b)| b.min(*a)).collect(),
            });
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let misses = self.stats(STANDBY_PROGRAM)?.recursion_misses as i64;
        Ok(apart.unwrap_or_default().iter().sum::<i64>() - misses)
    }

    /// The kernel's statistics of the main program.
    pub(crate) fn main_stats(&self) -> Result<ProgramStats, ProbeError> {
        self.stats(MAIN_PROGRAM)
    }

    fn stats(&self, name: &'static str) -> Result<ProgramStats, ProbeError> {
        let stats_error = |source| ProbeError::Stats { program: name, source };
        let program = self.ebpf.program(name).ok_or(ProbeError::Missing(name))?;
        let fd = program.fd().map_err(|e| stats_error(io::Error::other(e.to_string())))?;
        stats::program_stats(fd.as_fd()).map_err(stats_error)
    }
}
