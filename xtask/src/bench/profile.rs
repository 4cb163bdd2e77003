//! Where the in-kernel time goes: one more storm each for the record floor and `tcpstate run`
//! under `perf record -a -g`, every sample taken inside a program on the tracepoint put on the
//! kernel function the program was calling (or on the program's own instructions), and the
//! shares scaled to that storm's in-kernel time per transition. It splits tcpstate's cost
//! above the floor into its parts: what the ring buffer costs both, what only tcpstate does.

use std::{
    collections::BTreeMap,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{Config, Outcome, run::Bench};

/// Samples per second and CPU: enough for a few thousand inside the programs per storm.
const FREQUENCY: &str = "1999";

/// The configurations profiled, side by side.
pub(super) const PROFILED: [Config; 2] = [Config::RecordFloor, Config::Daemon];

/// What a program on the tracepoint spends its time on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Part {
    RingReserve,
    RingSubmit,
    Clock,
    MapLookup,
    MapInsert,
    MapDelete,
    ProbeReads,
    TaskHelpers,
    OwnInstructions,
    Standby,
    Other,
}

impl Part {
    pub(super) const ALL: [Self; 11] = [
        Self::RingReserve,
        Self::RingSubmit,
        Self::Clock,
        Self::MapLookup,
        Self::MapInsert,
        Self::MapDelete,
        Self::ProbeReads,
        Self::TaskHelpers,
        Self::OwnInstructions,
        Self::Standby,
        Self::Other,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            Self::RingReserve => "ring buffer: reserve a record",
            Self::RingSubmit => "ring buffer: submit it",
            Self::Clock => "the clock (`bpf_ktime_get_ns`)",
            Self::MapLookup => "per-socket map: look up",
            Self::MapInsert => "per-socket map: insert (new sockets)",
            Self::MapDelete => "per-socket map: delete (closed sockets)",
            Self::ProbeReads => "probe reads (socket, task, namespace)",
            Self::TaskHelpers => "task helpers (pid, cgroup, task)",
            Self::OwnInstructions => "the program's own instructions",
            Self::Standby => "the standby program, all of it",
            Self::Other => "other kernel functions",
        }
    }

    /// The part a kernel function called from the main program belongs to.
    fn of_callee(function: &str) -> Self {
        match function {
            "__bpf_ringbuf_reserve" | "bpf_ringbuf_reserve" => Self::RingReserve,
            "bpf_ringbuf_submit" | "bpf_ringbuf_commit" => Self::RingSubmit,
            "bpf_ktime_get_ns" | "ktime_get_mono_fast_ns" => Self::Clock,
            "__htab_map_lookup_elem" | "lookup_nulls_elem_raw" | "htab_lru_map_lookup_elem" => {
                Self::MapLookup
            }
            "htab_lru_map_update_elem" | "htab_map_update_elem" => Self::MapInsert,
            "htab_lru_map_delete_elem" | "htab_map_delete_elem" => Self::MapDelete,
            "bpf_probe_read_kernel" => Self::ProbeReads,
            "bpf_get_current_pid_tgid"
            | "bpf_get_current_cgroup_id"
            | "bpf_get_current_task"
            | "bpf_get_current_comm" => Self::TaskHelpers,
            _ => Self::Other,
        }
    }
}

/// One configuration's samples inside its programs, by part.
#[derive(Debug, Default)]
pub(super) struct Profile {
    pub(super) samples: BTreeMap<Part, u64>,
    /// In-kernel time of all its programs per tracepoint firing, in the profiled storm.
    pub(super) ns_per_transition: f64,
}

impl Profile {
    pub(super) fn total(&self) -> u64 {
        self.samples.values().sum()
    }

    /// The part's share of the in-kernel time per transition, in ns.
    pub(super) fn ns(&self, part: Part) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        self.samples.get(&part).copied().unwrap_or(0) as f64 / total as f64 * self.ns_per_transition
    }
}

/// The programs' names (as the kernel's symbols for them end) that make up `config`.
fn programs_of(config: Config) -> (&'static str, Option<&'static str>) {
    match config {
        Config::RecordFloor => ("floor_record", None),
        Config::Daemon => ("inet_sock_set_state", Some("standby")),
        _ => unreachable!("only the record floor and `tcpstate run` are profiled"),
    }
}

/// `perf record` of every CPU, until stopped.
struct Recording {
    perf: Child,
    data: PathBuf,
}

impl Recording {
    fn start(data: &Path) -> anyhow::Result<Self> {
        let perf = Command::new("perf")
            .args(["record", "-a", "-g", "-F", FREQUENCY, "-o"])
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting `perf record` (Debian: apt-get install linux-perf)")?;
        // perf opens its events on every CPU before it samples.
        thread::sleep(Duration::from_millis(1000));
        Ok(Self { perf, data: data.to_owned() })
    }

    /// Stops the recording the way Ctrl-C does, so perf writes its data out.
    fn stop(mut self) -> anyhow::Result<PathBuf> {
        // SAFETY: signals a child of ours by its pid.
        unsafe { libc::kill(self.perf.id() as libc::pid_t, libc::SIGINT) };
        let status = self.perf.wait()?;
        // Once its data is out, perf raises the signal again and ends by it, as Ctrl-C asks.
        if !status.success() && status.signal() != Some(libc::SIGINT) {
            bail!("`perf record` failed ({status})");
        }
        Ok(self.data)
    }
}

impl Bench<'_> {
    /// One storm of `config` under `perf record`, its samples attributed.
    pub(super) fn profile(
        &self,
        config: Config,
        per_connection: f64,
        scratch: &Path,
    ) -> anyhow::Result<Profile> {
        std::fs::create_dir_all(scratch)?;
        let recording = Recording::start(&scratch.join("perf.data"))?;
        let storm = self.storm(config, per_connection);
        let data = recording.stop()?;
        let outcome: Outcome = storm?;
        let script = Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(&data)
            .stderr(Stdio::null())
            .output()
            .context("running `perf script`")?;
        let _ = std::fs::remove_file(&data);
        if !script.status.success() {
            bail!("`perf script` failed ({})", script.status);
        }
        let mut profile = attribute(&String::from_utf8_lossy(&script.stdout), programs_of(config));
        profile.ns_per_transition = outcome.in_kernel_ns_per_transition().unwrap_or(0.0);
        if profile.total() == 0 {
            bail!(
                "`perf record` took no sample inside {}'s programs: does this kernel list BPF \
                 programs in /proc/kallsyms (net.core.bpf_jit_kallsyms=1)?",
                config.label()
            );
        }
        Ok(profile)
    }
}

/// Attributes `perf script -F ip,sym` output (samples apart by blank lines, one frame per
/// line, the innermost first): a sample whose stack holds one of the programs counts for the
/// function that program was calling, or for its own instructions when it was the innermost.
fn attribute(script: &str, (main, standby): (&str, Option<&str>)) -> Profile {
    let mut profile = Profile::default();
    let mut frames: Vec<&str> = Vec::new();
    let mut count = |frames: &[&str]| {
        let Some(depth) = frames.iter().position(|f| program_name(f).is_some()) else {
            return;
        };
        let program = program_name(frames[depth]).expect("found above");
        let part = if Some(program) == standby {
            Part::Standby
        } else if program != main {
            return;
        } else if depth == 0 {
            Part::OwnInstructions
        } else {
            Part::of_callee(frames[depth - 1])
        };
        *profile.samples.entry(part).or_default() += 1;
    };
    for line in script.lines() {
        match line.split_whitespace().nth(1) {
            Some(symbol) if line.starts_with(char::is_whitespace) => frames.push(symbol),
            _ if line.trim().is_empty() => {
                count(&frames);
                frames.clear();
            }
            _ => {}
        }
    }
    count(&frames);
    profile
}

/// `bpf_prog_<tag>_<name>` → `name`.
fn program_name(symbol: &str) -> Option<&str> {
    let rest = symbol.strip_prefix("bpf_prog_")?;
    let (tag, name) = rest.split_once('_')?;
    (tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "
\tffffffff8224fde1 __bpf_ringbuf_reserve
\tffffffffc0012bff bpf_prog_0ad546aa29cf274c_inet_sock_set_state
\tffffffff81111111 trace_call_bpf

\tffffffffc0012bff bpf_prog_0ad546aa29cf274c_inet_sock_set_state
\tffffffff81111111 trace_call_bpf

\tffffffff81222222 bpf_lru_pop_free
\tffffffff81333333 htab_lru_map_update_elem
\tffffffffc0012bff bpf_prog_0ad546aa29cf274c_inet_sock_set_state

\tffffffff81444444 copy_from_kernel_nofault
\tffffffff81555555 bpf_probe_read_kernel
\tffffffffc0034567 bpf_prog_5d6069159a515698_standby

\tffffffffc0099999 bpf_prog_4f9302ba65b90ccd_memset

\tffffffff82240ddb pv_native_safe_halt
";

    #[test]
    fn samples_go_to_the_function_the_program_called() {
        let profile = attribute(SCRIPT, programs_of(Config::Daemon));
        let expected = BTreeMap::from([
            (Part::RingReserve, 1),
            (Part::OwnInstructions, 1),
            (Part::MapInsert, 1),
            (Part::Standby, 1),
        ]);
        assert_eq!(profile.samples, expected);
    }

    #[test]
    fn other_programs_and_the_rest_of_the_kernel_are_left_out() {
        let profile = attribute(SCRIPT, programs_of(Config::RecordFloor));
        assert_eq!(profile.total(), 0);
        assert_eq!(program_name("bpf_prog_0ad546aa29cf274c_floor_record"), Some("floor_record"));
        assert_eq!(program_name("bpf_prog_short_x"), None);
        assert_eq!(program_name("bpf_prog_load"), None);
    }

    #[test]
    fn shares_scale_to_the_time_per_transition() {
        let profile = Profile {
            samples: BTreeMap::from([(Part::RingReserve, 3), (Part::Standby, 1)]),
            ns_per_transition: 400.0,
        };
        assert_eq!(profile.ns(Part::RingReserve), 300.0);
        assert_eq!(profile.ns(Part::Standby), 100.0);
        assert_eq!(profile.ns(Part::Clock), 0.0);
    }
}
