//! `cargo xtask bench`: a loopback connection storm inside a fresh network namespace, run
//! bare and under each tracer in alternation, several rounds; then a scale run holding many
//! connections open. Prints the table, makes it BENCHMARKS.md's current one and keeps the
//! run's whole output under target/bench/.

pub mod floor;
pub mod load;
pub mod measure;
mod profile;
mod report;
mod retransmits;
mod run;
mod scale;
mod tracers;

use std::{path::Path, time::Instant};

use anyhow::bail;
use clap::Args;

use self::{
    measure::{BpfStats, ProgStats},
    report::{record, render},
    run::{Bench, NamespaceCleanup},
};
use crate::cmd::is_root;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Rounds of every configuration, alternating, for medians and min-max.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds of storm per configuration and round.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Client threads of the load generator.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Connections held open in the scale run (2 tracked sockets each; 50,000 of them are
    /// measured first); 0 skips it.
    #[arg(long, default_value_t = 500_000)]
    pub hold: usize,
    /// Print the results (and keep them under target/bench/) without replacing the table in
    /// BENCHMARKS.md.
    #[arg(long)]
    pub no_record: bool,
    /// Storms of bare and this configuration only, no scale or saturation run, nothing
    /// recorded: for looking into one tracer.
    #[arg(long, hide = true, value_enum)]
    pub only: Option<Config>,
    /// Another tcpstate binary (built from another commit, or with a change left out): its
    /// `tcpstate run` storms in every round beside this build's, for a before and after in
    /// one table.
    #[arg(long, value_name = "TCPSTATE")]
    pub baseline: Option<std::path::PathBuf>,
    /// What the `--baseline` binary is, for its row: "without the closing totals".
    #[arg(long, value_name = "TEXT", requires = "baseline")]
    pub baseline_label: Option<String>,
}

/// The `--baseline` row's label, set once from the arguments.
static BASELINE_LABEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Config {
    #[value(skip)]
    Bare,
    /// An empty program on the tracepoint: the kernel's own cost, below any tracer.
    Floor,
    /// A 128-byte ring-buffer record per firing and nothing else: the least a tracer that
    /// sends every transition pays.
    RecordFloor,
    /// The same with a 64-byte record (one cache line).
    RecordFloor64,
    /// The same with a 32-byte record.
    RecordFloor32,
    #[value(name = "run")]
    Daemon,
    /// `tcpstate run` of the `--baseline` binary.
    #[value(skip)]
    Baseline,
    Watch,
    Tcpstates,
}

impl Config {
    /// Every configuration, in the table's order.
    const ALL: [Self; 9] = [
        Self::Bare,
        Self::Floor,
        Self::RecordFloor,
        Self::RecordFloor64,
        Self::RecordFloor32,
        Self::Daemon,
        Self::Baseline,
        Self::Watch,
        Self::Tcpstates,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Bare => "nothing attached (bare)",
            Self::Floor => "an empty program (the kernel's own cost)",
            Self::RecordFloor => "a 128-byte ring record per firing, nothing else",
            Self::RecordFloor64 => "a 64-byte ring record per firing, nothing else",
            Self::RecordFloor32 => "a 32-byte ring record per firing, nothing else",
            Self::Daemon => "`tcpstate run` (scraped 1/s)",
            Self::Baseline => BASELINE_LABEL
                .get()
                .map_or("`tcpstate run` of the `--baseline` binary (scraped 1/s)", String::as_str),
            Self::Watch => "`tcpstate watch --json`",
            Self::Tcpstates => "libbpf-tools `tcpstates`",
        }
    }

    /// A floor: a program that runs on every firing and delivers nothing to count as lost.
    fn is_floor(self) -> bool {
        self.floor_program().is_some()
    }

    /// The program `cargo xtask floor` holds for a floor.
    fn floor_program(self) -> Option<floor::Floor> {
        match self {
            Self::Floor => Some(floor::Floor::Empty),
            Self::RecordFloor => Some(floor::Floor::Record),
            Self::RecordFloor64 => Some(floor::Floor::Record64),
            Self::RecordFloor32 => Some(floor::Floor::Record32),
            Self::Bare | Self::Daemon | Self::Baseline | Self::Watch | Self::Tcpstates => None,
        }
    }
}

/// One storm under one configuration.
#[derive(Clone, Debug, Default)]
struct Outcome {
    connections: u64,
    seconds: f64,
    /// Transitions the connections made (connections × transitions per connection).
    expected: u64,
    /// Times the tracepoint fired for the tracer over the same window: what it should deliver.
    firings: u64,
    delivered: u64,
    tracer_cpu: f64,
    lost_buffer: u64,
    lost_map: Option<u64>,
    lost_recursion: u64,
    rescued: u64,
    prog: ProgStats,
    standby: ProgStats,
    peak_rss: u64,
    /// Transitions of the tracer's own traffic during the window (the daemon's scrapes).
    expected_extra: u64,
    /// Runs of the retransmit programs during the storm (`tcpstate run`).
    retransmit_runs: u64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.connections as f64 / self.seconds
    }

    /// In-kernel time of all the tracer's programs per tracepoint firing; `None` without
    /// firings.
    fn in_kernel_ns_per_transition(&self) -> Option<f64> {
        (self.firings > 0).then(|| {
            (self.prog.run_time_ns + self.standby.run_time_ns) as f64 / self.firings as f64
        })
    }
}

/// The bench's progress lines: printed as they come, and kept for the run's record.
#[derive(Default)]
struct RunLog {
    text: String,
}

impl RunLog {
    fn line(&mut self, line: String) {
        eprintln!("{line}");
        self.text.push_str(&line);
        self.text.push('\n');
    }
}

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask bench loads eBPF programs and creates network namespaces: run it as root (sudo -E cargo xtask bench)"
        );
    }
    if args.rounds == 0 || args.seconds <= 0.0 {
        bail!("--rounds and --seconds must be positive");
    }
    if let Some(baseline) = &args.baseline
        && !baseline.is_file()
    {
        bail!(
            "--baseline {}: no such file; give a tcpstate binary, e.g. one built with `cargo build --release -p tracer` in a worktree of another commit",
            baseline.display()
        );
    }
    if let Some(label) = &args.baseline_label {
        let _ = BASELINE_LABEL.set(format!("`tcpstate run` {label} (scraped 1/s)"));
    }
    let bench = Bench::new(root, args)?;
    let _stats = BpfStats::enable()?;
    let _namespace = NamespaceCleanup;
    let started = Instant::now();

    let mut log = RunLog::default();
    log.line("bench: measuring transitions per connection at a low rate".to_owned());
    let per_connection = bench.transitions_per_connection()?;
    log.line(format!("bench: {per_connection:.3} transitions per connection"));

    let mut outcomes: Vec<(Config, Outcome)> = Vec::new();
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|&c| match (c, args.only) {
            (Config::Bare, _) => true,
            (Config::Baseline, _) => args.baseline.is_some(),
            (c, Some(only)) => c == only,
            (_, None) => true,
        })
        .collect();
    for round in 1..=args.rounds {
        for &config in &configs {
            log.line(format!("bench: round {round}/{}: {}", args.rounds, config.label()));
            let outcome = bench.storm(config, per_connection)?;
            log.line(format!(
                "bench:   {:.0} connections/s, {} of {} transitions delivered, tracer CPU {:.2} s",
                outcome.rate(),
                outcome.delivered,
                outcome.expected,
                outcome.tracer_cpu
            ));
            if outcome.firings > 0 && !config.is_floor() {
                log.line(format!(
                    "bench:   {} firings, {} lost, counted {} ring full / {} recursion",
                    outcome.firings,
                    outcome.firings as i64 - outcome.delivered as i64,
                    outcome.lost_buffer,
                    outcome.lost_recursion
                ));
            }
            outcomes.push((config, outcome));
        }
    }
    let mut profiles = Vec::new();
    for config in profile::PROFILED.into_iter().filter(|c| configs.contains(c)) {
        log.line(format!("bench: profile: {} under `perf record`", config.label()));
        profiles.push((config, bench.profile(config, per_connection, &root.join("target/bench"))?));
    }
    if args.only.is_some() {
        println!("{}", report::render_storms_only(&outcomes, per_connection, &profiles));
        return Ok(());
    }
    log.line("bench: retransmits: SYNs to an address whose packets are lost".to_owned());
    let retransmits = bench.retransmit_cost()?;
    log.line(format!(
        "bench:   {} retransmits, {:.0} ns per call",
        retransmits.prog.run_cnt,
        retransmits.ns_per_call()
    ));
    let scale = if args.hold > 0 { Some(bench.scale()?) } else { None };
    log.line("bench: saturation: 10,000 sockets against --max-sockets 1000".to_owned());
    let saturation = bench.saturation()?;

    let measured = report::Measured {
        per_connection,
        outcomes: &outcomes,
        retransmits: &retransmits,
        scale: scale.as_ref(),
        saturation: &saturation,
        profiles: &profiles,
    };
    let report = render(args, &measured, started.elapsed());
    println!("{report}");
    let kept = report::keep_run(root, &log.text, &report)?;
    eprintln!("bench: this run's output is in {}", kept.display());
    if !args.no_record {
        record(&root.join("BENCHMARKS.md"), &report)?;
        eprintln!("bench: the current table in BENCHMARKS.md is this run's");
    }
    Ok(())
}
