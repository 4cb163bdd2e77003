//! Loading and attaching the kernel program, and reading what it counts.
//!
//! `Probe::attach` runs every check that can fail with a useful message before the kernel is
//! involved (privileges, kernel version, tracefs, the tracepoint's layout, BTF), then loads the
//! embedded eBPF object with the run's settings and attaches it.

pub(crate) mod btf;
pub(crate) mod format;
pub(crate) mod preflight;
pub(crate) mod stats;

use std::{fs, io, os::fd::AsFd as _, path::PathBuf};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FExit, ProgramError, TracePoint},
};
use thiserror::Error;
use tracer_common::{
    KernelCounters, KernelSettings, SocketState,
    settings::{
        COUNTERS_MAIN, COUNTERS_STANDBY, KernelFilter, OFFSET_UNKNOWN, RecentTransitions,
        SockOffsets,
    },
    tracepoint,
};

pub use self::{btf::BtfError, format::FormatMismatch, preflight::PreflightError};
use self::{
    btf::{KernelBtf, NetnsOffsets, TaskOffsets},
    stats::ProgramStats,
};

/// The kernel program, built by `build.rs` and embedded: one binary to ship.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

const MAIN_PROGRAM: &str = "inet_sock_set_state";
const STANDBY_PROGRAM: &str = "standby";
const ACCEPT_PROGRAM: &str = "accept_owner";
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
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: 4 << 20,
            socket_map_entries: 1 << 18,
            trace_mptcp: false,
            filter: KernelFilter::ALL,
            wakeup_batch_bytes: None,
            format_file: None,
            standby_first: false,
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

/// What the kernel side delivered and what it could not, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Transitions of traced sockets the program handled (before filtering).
    pub handled: u64,
    /// Records sent to the ring buffer.
    pub emitted: u64,
    /// Transitions the kernel-side filter dropped on purpose.
    pub filtered: u64,
    /// Lost: no room in the ring buffer.
    pub ringbuf_full: u64,
    /// Lost: the kernel skipped the main program (a tracing program already running on that
    /// CPU) and the standby did not deliver the transition. Without the standby, an upper
    /// bound (it also counts untraced protocols), and kept by kernels from 6.7 only.
    pub recursion_misses: u64,
    /// Transitions the standby program delivered after the kernel skipped the main one (or of
    /// untraced protocols, which it also sees).
    pub rescued: u64,
    /// Not lost, but degraded: the per-socket map could not take an entry, so that socket's
    /// next transition has no duration or owner.
    pub map_update_failed: u64,
    /// Transitions of sockets the map did not know (older than the probe, evicted, or whose
    /// earlier transition was lost).
    pub untracked_sightings: u64,
}

impl Delivery {
    /// Transitions that were not delivered, whatever the cause.
    pub fn lost(&self) -> u64 {
        self.ringbuf_full + self.recursion_misses
    }
}

/// Runs of each program.
#[derive(Clone, Copy, Default)]
struct Runs {
    main: u64,
    standby: u64,
}

/// Sums what the two programs counted into what was delivered and what was lost.
///
/// The programs agree per CPU on which one delivers a transition, and that agreement can fail
/// (a program the kernel skipped between pushing and taking an entry leaves it behind), so the
/// loss count does not trust it. Each firing of the tracepoint adds to `main_skips` + main's
/// `deduplicated` + `duplicates_dropped` - standby's `seen` exactly the transitions it lost:
///
/// | main program | standby | adds |
/// |---|---|---|
/// | delivered | skipped it as delivered | 0 |
/// | skipped by the kernel | delivered | 1 - 1 = 0 |
/// | skipped by the kernel | skipped by the kernel, or as delivered | 1: lost |
/// | delivered | delivered too; the reader drops one | 1 - 1 = 0 |
/// | skipped it as delivered by the standby | delivered (before or after) | 1 - 1 = 0 |
/// | skipped it as delivered by the standby | did not deliver | 1: lost |
/// | delivered | delivered; the reader dropped the wrong one | 1: lost |
///
/// Firings of other protocols count the same way (`seen` includes them), so an untraced
/// protocol's skip is not a loss.
fn account(
    main: &KernelCounters,
    standby: &KernelCounters,
    main_skips: u64,
    duplicates_dropped: u64,
) -> Delivery {
    let recursion_misses =
        (main_skips + main.deduplicated + duplicates_dropped).saturating_sub(standby.seen);
    Delivery {
        handled: main.seen - main.other_protocol + standby.seen - standby.other_protocol,
        emitted: main.emitted + standby.emitted,
        filtered: main.filtered + standby.filtered,
        ringbuf_full: main.ringbuf_full + standby.ringbuf_full,
        recursion_misses,
        rescued: standby.seen.saturating_sub(main.deduplicated + duplicates_dropped),
        map_update_failed: main.map_update_failed + standby.map_update_failed,
        untracked_sightings: main.untracked_sightings + standby.untracked_sightings,
    }
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
}

impl Part {
    /// The name in logs and in `tcpstate_probe_info{program}`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Standby => "standby",
            Self::AcceptOwner => "accept_owner",
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

/// The attached kernel program and its maps. Dropping it detaches the program.
pub struct Probe {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, KernelCounters>,
    /// Per CPU: the two programs' runs (and their recent transitions).
    recent: PerCpuArray<MapData, RecentTransitions>,
    /// With the standby attached: the main program's runs less the standby's runs and misses
    /// as both were attached (see `Probe::runs_apart`).
    runs_apart_at_attach: Option<i64>,
    ring: Option<RingBuf<MapData>>,
    parts: Vec<PartStatus>,
    map_memory: Vec<MapMemory>,
}

/// Kernel memory one of the probe's maps takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MapMemory {
    pub name: String,
    pub bytes: u64,
}

impl Probe {
    /// Checks the host, loads the program with `options` and attaches it.
    pub fn attach(options: &ProbeOptions) -> Result<Self, ProbeError> {
        preflight::check_privileges()?;
        let kernel = preflight::check_kernel_version()?;
        let tracefs = preflight::ensure_tracefs()?;
        let format_path = options.format_file.clone().unwrap_or_else(|| {
            tracefs.join("events").join(tracepoint::CATEGORY).join(tracepoint::NAME).join("format")
        });
        let format_text = fs::read_to_string(&format_path).map_err(|source| {
            let path = format_path.display().to_string();
            if source.kind() == io::ErrorKind::PermissionDenied {
                ProbeError::Preflight(PreflightError::TracefsUnreadable { path, source })
            } else {
                ProbeError::TracepointMissing { path, source }
            }
        })?;
        format::check(&format_text).map_err(ProbeError::FormatMismatch)?;
        let btf = KernelBtf::load()?;
        let netns = NetnsOffsets::resolve(&btf)?;
        let task = TaskOffsets::resolve(&btf)?;
        let sock = btf::sock_offsets(&btf);
        let sk_err = btf::sk_err_offset(&btf);
        let accept_parameters = btf.parameter_count(ACCEPT_FUNCTION);
        drop(btf);
        preflight::raise_memlock_if_needed(kernel);

        let settings = KernelSettings {
            filter: options.filter,
            trace_mptcp: u8::from(options.trace_mptcp),
            sk_err_offset: sk_err.unwrap_or_else(|error| {
                log::warn!("failed connections will show no reason: {error}");
                u16::MAX
            }),
            sk_net_offset: netns.sk_net,
            net_inum_offset: netns.net_inum,
            task_group_leader_offset: task.group_leader,
            task_comm_offset: task.comm,
            accept_ret_slot: *accept_parameters.as_ref().unwrap_or(&OFFSET_UNKNOWN),
            sock: *sock.as_ref().unwrap_or(&SockOffsets::UNKNOWN),
            standby_first: options.standby_first.into(),
            wakeup_every: wakeup_every(options.wakeup_batch_bytes.unwrap_or_else(|| {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
                u64::from(options.ring_bytes) / 8 / cpus
            })),
        };
        // Parsed once: the loader, the standby and the fexit program all need it.
        let kernel_btf = aya::Btf::from_sys_fs().ok();
        let mut ebpf = EbpfLoader::new()
            .btf(kernel_btf.as_ref())
            .override_global("SETTINGS", &settings, true)
            .map_max_entries("EVENTS", options.ring_bytes)
            .map_max_entries("SOCKETS", options.socket_map_entries)
            .load(EBPF_OBJECT)
            .map_err(ProbeError::Load)?;
        forward_kernel_logs(&mut ebpf);

        // The tracepoint calls its programs in the order they were attached: the standby
        // goes second, so it only sees transitions after the main program had its chance.
        let mut standby = Err("not attached".to_owned());
        if options.standby_first {
            standby = attach_standby(&mut ebpf, kernel_btf.as_ref(), sock.as_ref());
        }
        attach_main(&mut ebpf)?;
        if !options.standby_first {
            standby = attach_standby(&mut ebpf, kernel_btf.as_ref(), sock.as_ref());
        }
        let accept_owner = match &accept_parameters {
            Ok(_) => attach_accept_owner(&mut ebpf, kernel_btf.as_ref()),
            Err(error) => Err(error.to_string()),
        };
        let parts = vec![
            PartStatus { part: Part::Main, unavailable: None },
            PartStatus { part: Part::Standby, unavailable: standby.err() },
            PartStatus { part: Part::AcceptOwner, unavailable: accept_owner.err() },
        ];
        for status in &parts {
            if let Some(reason) = &status.unavailable {
                let part = status.part;
                log::warn!(
                    "running without the {} program ({reason}): {}",
                    part.name(),
                    part.without()
                );
            }
        }
        log::info!(
            "attached to tracepoint {}:{} (ring buffer {} KiB, {} kernel socket slots)",
            tracepoint::CATEGORY,
            tracepoint::NAME,
            options.ring_bytes >> 10,
            options.socket_map_entries
        );
        let map_memory = map_memory();
        let total: u64 = map_memory.iter().map(|m| m.bytes).sum();
        log::info!(
            "kernel maps take {:.1} MiB: {}",
            total as f64 / f64::from(1 << 20),
            map_memory
                .iter()
                .map(|m| format!("{} {:.1} MiB", m.name, m.bytes as f64 / f64::from(1 << 20)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let ring = take_map(&mut ebpf, "EVENTS", RingBuf::try_from)?;
        let counters = take_map(&mut ebpf, "COUNTERS", PerCpuArray::try_from)?;
        let recent = take_map(&mut ebpf, "RECENT", PerCpuArray::try_from)?;
        drop(kernel_btf);
        release_freed_memory();
        let mut probe = Self {
            ebpf,
            counters,
            recent,
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

fn attach_main(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let refused = |source: ProgramError| ProbeError::LoadProgram {
        program: MAIN_PROGRAM,
        reason: refusal(MAIN_PROGRAM, &source),
    };
    let program: &mut TracePoint = ebpf
        .program_mut(MAIN_PROGRAM)
        .ok_or(ProbeError::Missing(MAIN_PROGRAM))?
        .try_into()
        .map_err(refused)?;
    program.load().map_err(refused)?;
    program.attach(tracepoint::CATEGORY, tracepoint::NAME).map_err(|source| {
        ProbeError::Attach {
            program: MAIN_PROGRAM,
            target: format!("tracepoint {}:{}", tracepoint::CATEGORY, tracepoint::NAME),
            hint: perf_event_hint(&source),
            source: Box::new(source),
        }
    })?;
    Ok(())
}

/// Why a perf event was refused, when it was for lack of privilege. Debian's kernels add a
/// level 3 to `kernel.perf_event_paranoid` (their default) at which perf events need
/// CAP_SYS_ADMIN, CAP_PERFMON not being enough (seen on their 5.10 and 6.1).
fn perf_event_hint(error: &ProgramError) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let denied = std::iter::from_fn(|| {
        let current = source?;
        source = current.source();
        Some(current)
    })
    .filter_map(|e| e.downcast_ref::<io::Error>())
    .any(|e| e.kind() == io::ErrorKind::PermissionDenied);
    if !denied {
        return String::new();
    }
    let paranoid = fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").unwrap_or_default();
    match paranoid.trim().parse::<i32>() {
        Ok(level) if level >= 3 => format!(
            "; kernel.perf_event_paranoid is {level}, at which this kernel allows perf events \
             only with CAP_SYS_ADMIN (Debian's default): run as root, add CAP_SYS_ADMIN, or \
             `sysctl kernel.perf_event_paranoid=2`"
        ),
        _ => "; perf events need CAP_PERFMON (or CAP_SYS_ADMIN)".to_owned(),
    }
}

/// The standby program, on the tracepoint's BTF flavour; it needs the socket's field offsets.
fn attach_standby(
    ebpf: &mut Ebpf,
    btf: Option<&aya::Btf>,
    sock: Result<&SockOffsets, &BtfError>,
) -> Result<(), String> {
    sock.map_err(ToString::to_string)?;
    let btf = btf.ok_or("no kernel BTF")?;
    let refused = |error: ProgramError| refusal(STANDBY_PROGRAM, &error);
    let program: &mut BtfTracePoint = ebpf
        .program_mut(STANDBY_PROGRAM)
        .ok_or("the eBPF object has no standby program")?
        .try_into()
        .map_err(refused)?;
    program.load(tracepoint::NAME, btf).map_err(refused)?;
    program.attach().map_err(refused)?;
    Ok(())
}

/// The optional fexit program that names the owner of an accepted socket.
fn attach_accept_owner(ebpf: &mut Ebpf, btf: Option<&aya::Btf>) -> Result<(), String> {
    let btf = btf.ok_or("no kernel BTF")?;
    let refused = |error: ProgramError| refusal(ACCEPT_PROGRAM, &error);
    let program: &mut FExit = ebpf
        .program_mut(ACCEPT_PROGRAM)
        .ok_or("the eBPF object has no accept hook")?
        .try_into()
        .map_err(refused)?;
    program.load(ACCEPT_FUNCTION, btf).map_err(refused)?;
    program.attach().map_err(refused)?;
    Ok(())
}

/// Why the kernel refused a program, in a line: the verifier's verdict, not its whole log
/// (thousands of lines, whose first lines are notes, not the reason). The log goes to the
/// debug log.
fn refusal(program: &str, error: &ProgramError) -> String {
    match error {
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            log::debug!("verifier log of program `{program}`:\n{log}");
            if io_error.raw_os_error() == Some(libc::EPERM) {
                // Refused before verification: not a bug to report, a policy to know about.
                return format!(
                    "{io_error}: a security policy (kernel lockdown, an LSM) or missing \
                     CAP_BPF/CAP_PERFMON forbids it"
                );
            }
            match verifier_verdict(&log) {
                Some(verdict) => format!("{io_error}; the verifier says: {verdict}"),
                None => io_error.to_string(),
            }
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

/// The last line of a verifier log that is not statistics: where the verifier gave up.
fn verifier_verdict(log: &str) -> Option<&str> {
    const STATISTICS: [&str; 4] = ["verification time", "stack depth", "processed ", "max_states"];
    log.lines()
        .map(str::trim)
        .rev()
        .find(|line| !line.is_empty() && !STATISTICS.iter().any(|s| line.starts_with(s)))
}

/// Program names (as the kernel keeps them, 15 bytes) of known tracers of this tracepoint:
/// tcpstate's own two, libbpf-tools' and BCC's `tcpstates`.
const KNOWN_TRACERS: [&str; 4] =
    ["inet_sock_set_s", "standby", "handle_set_stat", "tracepoint__soc"];

/// Programs of other known tracers of `sock:inet_sock_set_state` loaded in the kernel now (as
/// `name (id N)`): another tcpstate, or a `tcpstates`. Called before attaching, every match is
/// someone else's. They change the order in which the tracepoint calls programs.
pub fn other_tracers() -> Vec<String> {
    aya::programs::loaded_programs()
        .flatten()
        .filter_map(|info| {
            let name = info.name_as_str()?;
            KNOWN_TRACERS.contains(&name).then(|| format!("{name} (id {})", info.id()))
        })
        .collect()
}

/// `BPF_MAP_TYPE_RINGBUF`, as `/proc/<pid>/fdinfo` prints it.
const RINGBUF_MAP_TYPE: &str = "27";

/// Kernel memory of this process's BPF maps, by name, as the kernel accounts it (`memlock`
/// in `/proc/self/fdinfo`). The probe's maps are preallocated (the ring, the arrays, the LRU
/// hash), so this is what they take from load on, whatever they hold. Read at attach, when
/// the probe's maps are the only ones this process has open.
fn map_memory() -> Vec<MapMemory> {
    let Ok(fds) = fs::read_dir("/proc/self/fdinfo") else { return Vec::new() };
    let mut maps: Vec<MapMemory> = fds
        .flatten()
        .filter_map(|entry| {
            let info = fs::read_to_string(entry.path()).ok()?;
            let field = |name: &str| {
                info.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).map(str::to_owned)
            };
            let id: u32 = field("map_id:")?.parse().ok()?;
            let mut bytes: u64 = field("memlock:")?.parse().ok()?;
            if field("map_type:")? == RINGBUF_MAP_TYPE {
                // Kernels from 5.11 to 6.3 account a ring as key and value sizes (0) times
                // its entries: 0. Its data pages are its size in bytes at least.
                bytes = bytes.max(field("max_entries:")?.parse().ok()?);
            }
            let name = aya::maps::MapInfo::from_id(id).ok()?.name_as_str()?.to_owned();
            Some(MapMemory { name, bytes })
        })
        .collect();
    maps.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    maps.dedup_by(|a, b| a.name == b.name);
    maps
}

/// The kernel's per-socket map (`SOCKETS`), keyed by socket address.
pub(crate) struct KernelSockets(HashMap<MapData, u64, SocketState>);

impl KernelSockets {
    /// The owner the kernel recorded for the live socket at `skaddr`, if it knows one. The
    /// accept hook records the owner of an accepted socket in the map without sending a
    /// record: a socket whose peer hung up before accept() shows it only here.
    pub(crate) fn owner(&self, skaddr: u64) -> Option<SocketState> {
        self.0.get(&skaddr, 0).ok().filter(|entry| entry.owner_tgid != 0)
    }
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
    convert(map).map_err(|source| ProbeError::Map { map: name, source })
}

fn add_counters(total: KernelCounters, cpu: &KernelCounters) -> KernelCounters {
    let KernelCounters {
        seen,
        other_protocol,
        emitted,
        filtered,
        ringbuf_full,
        map_update_failed,
        untracked_sightings,
        deduplicated,
    } = *cpu;
    KernelCounters {
        seen: total.seen + seen,
        other_protocol: total.other_protocol + other_protocol,
        emitted: total.emitted + emitted,
        filtered: total.filtered + filtered,
        ringbuf_full: total.ringbuf_full + ringbuf_full,
        map_update_failed: total.map_update_failed + map_update_failed,
        untracked_sightings: total.untracked_sightings + untracked_sightings,
        deduplicated: total.deduplicated + deduplicated,
    }
}

/// Parsing the kernel's BTF twice (ours and aya's) takes tens of MiB, freed right after
/// loading; hand those pages back so a long-running daemon does not keep them resident.
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe { libc::malloc_trim(0) };
}

/// Records per CPU between forced wakeups for `batch_bytes` of records: a power of two (the
/// kernel program tests it with a mask), at least 1; 0 when `batch_bytes` is 0.
fn wakeup_every(batch_bytes: u64) -> u64 {
    const SLOT: u64 = tracer_common::RECORD_SIZE as u64 + 8;
    match batch_bytes / SLOT {
        0 if batch_bytes == 0 => 0,
        0 => 1,
        records => 1 << (63 - records.leading_zeros()),
    }
}

/// Kernel-side `warn!` lines (an unexpected kernel) go to this process's log, when a tokio
/// runtime is there to poll them.
fn forward_kernel_logs(ebpf: &mut Ebpf) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    match aya_log::EbpfLogger::init(ebpf) {
        // SAFETY: the logger owns its ring-buffer fd for as long as the AsyncFd holds it.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(mut logger) => {
                tokio::spawn(async move {
                    while let Ok(mut guard) = logger.readable_mut().await {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(error) => log::debug!("kernel log forwarding unavailable: {error}"),
        },
        Err(error) => log::debug!("kernel log forwarding unavailable: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_the_last_line_before_the_statistics() {
        let log = "arg#0 type is not a struct\nUnrecognized arg#0 type PTR\n0: (bf) r6 = r1\n\
                   Unreleased reference id=15 alloc_insn=767\nverification time 97610 usec\n\
                   stack depth 344+0\nprocessed 2032 insns (limit 1000000) max_states_per_insn 2\n";
        assert_eq!(verifier_verdict(log), Some("Unreleased reference id=15 alloc_insn=767"));
        assert_eq!(verifier_verdict("\n"), None);
    }

    #[test]
    fn wakeups_come_every_power_of_two_records() {
        assert_eq!(wakeup_every(0), 0);
        assert_eq!(wakeup_every(1), 1);
        let slot = tracer_common::RECORD_SIZE as u64 + 8;
        assert_eq!(wakeup_every(4096 * slot), 4096);
        assert_eq!(wakeup_every(4096 * slot - 1), 2048);
        assert_eq!(wakeup_every(slot - 1), 1);
    }

    /// One firing as each program and the reader saw it.
    #[derive(Clone, Copy)]
    enum Main {
        Delivered,
        Missed,
        SkippedAsDelivered,
    }

    #[derive(Clone, Copy)]
    enum Standby {
        Delivered,
        Skipped,
    }

    /// The counters `firings` leave, each given as (main, standby, records the reader dropped).
    fn counted(firings: &[(Main, Standby, u64)]) -> Delivery {
        let (mut main, mut standby) = (KernelCounters::default(), KernelCounters::default());
        let (mut skips, mut dropped) = (0, 0);
        for &(m, s, drops) in firings {
            match m {
                Main::Delivered => {
                    main.seen += 1;
                    main.emitted += 1;
                }
                Main::Missed => skips += 1,
                Main::SkippedAsDelivered => main.deduplicated += 1,
            }
            if let Standby::Delivered = s {
                standby.seen += 1;
                standby.emitted += 1;
            }
            dropped += drops;
        }
        account(&main, &standby, skips, dropped)
    }

    #[test]
    fn every_way_a_firing_goes_adds_what_it_lost() {
        use Main as M;
        use Standby as S;
        let delivered_once = [
            (M::Delivered, S::Skipped, 0),
            (M::Missed, S::Delivered, 0),
            (M::Delivered, S::Delivered, 1),
            (M::SkippedAsDelivered, S::Delivered, 0),
        ];
        for firing in delivered_once {
            let delivery = counted(&[firing; 3]);
            assert_eq!(delivery.lost(), 0);
        }
        let lost = [
            (M::Missed, S::Skipped, 0),
            (M::SkippedAsDelivered, S::Skipped, 0),
            // Both delivered, and the reader dropped both.
            (M::Delivered, S::Delivered, 2),
            // Delivered once, and the reader took it for a second delivery.
            (M::Delivered, S::Skipped, 1),
        ];
        for firing in lost {
            assert_eq!(counted(&[firing; 3]).lost(), 3);
        }
    }

    /// What failed a CI run on 6.12: one transition neither program delivered hid behind a
    /// standby record the reader dropped as a second delivery.
    #[test]
    fn a_second_delivery_does_not_hide_a_loss() {
        use Main as M;
        use Standby as S;
        let mut firings = vec![(M::Delivered, S::Skipped, 0); 1000];
        firings.extend([(M::Missed, S::Delivered, 0); 45]);
        firings.extend([(M::Delivered, S::Delivered, 1); 2]);
        firings.push((M::Missed, S::Skipped, 0));
        let delivery = counted(&firings);
        assert_eq!(delivery.lost(), 1);
        assert_eq!(delivery.rescued, 45);
        assert_eq!(delivery.emitted, 1000 + 45 + 2 * 2);
    }
}
