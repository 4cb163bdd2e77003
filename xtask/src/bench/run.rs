//! Running the storms: a fresh network namespace, the load generator, and each
//! configuration's tracer measured around them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::ValueEnum as _;

use super::tracers::Tracer;
use super::{
    BenchArgs, Config, Outcome,
    measure::{self, ProgStats},
};

pub(super) const NETNS: &str = "tcpstate-bench";
pub(super) const STORM_PORT: u16 = 5001;
const TCPSTATES: &str = "/usr/sbin/tcpstates";

pub(super) struct Bench<'a> {
    tcpstate: PathBuf,
    /// The `--baseline` binary.
    baseline: Option<PathBuf>,
    xtask: PathBuf,
    pub(super) args: &'a BenchArgs,
}

/// Deletes the benchmark's namespace when the benchmark ends, however it ends.
pub(super) struct NamespaceCleanup;

impl Drop for NamespaceCleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).stderr(Stdio::null()).status();
    }
}

/// A fresh network namespace for one run: an empty TCP table, TIME_WAIT room for the storm.
pub(super) fn fresh_namespace() -> anyhow::Result<()> {
    let _ = Command::new("ip").args(["netns", "del", NETNS]).stderr(Stdio::null()).status();
    // The previous namespace's sockets are torn down in the background; let that finish.
    thread::sleep(Duration::from_millis(1500));
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).status()?;
        if !status.success() {
            bail!("{args:?} failed");
        }
        Ok(())
    };
    run(&["ip", "netns", "add", NETNS])?;
    run(&["ip", "-n", NETNS, "link", "set", "lo", "up"])?;
    for setting in [
        "net.ipv4.tcp_max_tw_buckets=4000000",
        "net.ipv4.ip_local_port_range=1024 65535",
        "net.core.somaxconn=65535",
        "net.ipv4.tcp_max_syn_backlog=65535",
    ] {
        run(&["ip", "netns", "exec", NETNS, "sysctl", "-q", "-w", setting])?;
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl<'a> Bench<'a> {
    pub(super) fn new(root: &Path, args: &'a BenchArgs) -> anyhow::Result<Self> {
        Ok(Self {
            tcpstate: root.join("target/release/tcpstate"),
            baseline: args.baseline.clone(),
            xtask: std::env::current_exe().context("the xtask binary")?,
            args,
        })
    }
}

impl Bench<'_> {
    pub(super) fn loadgen(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", NETNS]).arg(&self.xtask).arg("loadgen");
        command
    }

    /// Runs a storm in the namespace; returns (connections, seconds).
    pub(super) fn run_storm(&self, seconds: f64, rate: u64) -> anyhow::Result<(u64, f64)> {
        let output = self
            .loadgen()
            .args(["storm", "--seconds", &seconds.to_string(), "--rate", &rate.to_string()])
            .args(["--clients", &self.args.clients.to_string(), "--port", &STORM_PORT.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .context("running the load generator")?;
        if !output.status.success() {
            bail!("load generator failed");
        }
        let text = String::from_utf8(output.stdout)?;
        let mut parts = text.split_whitespace();
        let connections = parts.next().context("connections")?.parse()?;
        let elapsed = parts.next().context("seconds")?.parse()?;
        Ok((connections, elapsed))
    }

    /// `tcpstate run ARGS` on a free loopback port, started and settled.
    pub(super) fn daemon(&self, args: &[&str]) -> anyhow::Result<(Tracer, SocketAddr)> {
        self.daemon_of(&self.tcpstate, args)
    }

    /// `run ARGS` of the tcpstate binary `tcpstate`.
    fn daemon_of(&self, tcpstate: &Path, args: &[&str]) -> anyhow::Result<(Tracer, SocketAddr)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut command = Command::new(tcpstate);
        command.args(["run", "--listen", &addr.to_string()]).args(args);
        command.env("TCPSTATE_LOG", "info");
        let tracer = Tracer::start(command, |t| t.stderr_contains("serving http://"))?;
        thread::sleep(Duration::from_millis(500));
        Ok((tracer, addr))
    }

    fn watch(&self, extra: &[&str]) -> anyhow::Result<Tracer> {
        let mut command = Command::new(&self.tcpstate);
        command.args(["watch", "--json", "--stats"]).args(extra).env("TCPSTATE_LOG", "info");
        Tracer::start(command, |t| t.stderr_contains("attached to tracepoint"))
    }

    /// Counts what one connection produces, with the port filter so nothing else counts.
    pub(super) fn transitions_per_connection(&self) -> anyhow::Result<f64> {
        fresh_namespace()?;
        let tracer = self.watch(&["--port", &STORM_PORT.to_string()])?;
        let (connections, _) = self.run_storm(2.0, 1000)?;
        tracer.settle();
        let (_, lines) = tracer.stop()?;
        // The listener's own CLOSE -> LISTEN and LISTEN -> CLOSE are not per connection.
        Ok((lines.saturating_sub(2)) as f64 / connections as f64)
    }

    pub(super) fn storm(&self, config: Config, per_connection: f64) -> anyhow::Result<Outcome> {
        fresh_namespace()?;
        let seconds = self.args.seconds;
        let mut outcome = Outcome::default();
        match config {
            Config::Bare => {
                (outcome.connections, outcome.seconds) = self.run_storm(seconds, 0)?;
            }
            Config::Floor | Config::RecordFloor | Config::RecordFloor64 | Config::RecordFloor32 => {
                let program = config.floor_program().expect("a floor");
                let mut command = Command::new(&self.xtask);
                command.arg("floor").arg(program.to_possible_value().expect("a value").get_name());
                let floor = Tracer::start(command, |t| t.stderr_contains("attached"))?;
                let prog_before = floor.prog_stats()?;
                let firings_before = floor.firings()?;
                (outcome.connections, outcome.seconds) = self.run_storm(seconds, 0)?;
                outcome.firings = floor.firings()? - firings_before;
                (outcome.prog, outcome.standby) = deltas(floor.prog_stats()?, prog_before);
                floor.stop()?;
            }
            Config::Daemon | Config::Baseline => {
                let tcpstate = match config {
                    Config::Baseline => self.baseline.as_deref().context("--baseline")?,
                    _ => &self.tcpstate,
                };
                let (tracer, addr) = self.daemon_of(tcpstate, &[])?;
                let retransmits_before = tracer.prog_stats_named("tcp_retransmit_")?;
                let cpu_before = measure::cpu_seconds(tracer.pid())?;
                let prog_before = tracer.prog_stats()?;
                let firings_before = tracer.firings()?;
                let (before, _) = measure::http_get(addr, "/metrics")?;
                // One scrape's firings on the still idle host, for the count of the host's
                // traffic: 10 or 11 (the server's close() after its shutdown() reports a
                // FIN_WAIT1 -> FIN_WAIT1 unless the client's FIN came first).
                let per_scrape = tracer.settled_firings()? - firings_before;
                let scraping = Arc::new(AtomicBool::new(true));
                let scrapes = Arc::new(AtomicU64::new(0));
                let scraper = {
                    let (scraping, scrapes) = (scraping.clone(), scrapes.clone());
                    thread::spawn(move || {
                        while scraping.load(Ordering::Relaxed) {
                            thread::sleep(Duration::from_secs(1));
                            if measure::http_get(addr, "/metrics").is_ok() {
                                scrapes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                };
                (outcome.connections, outcome.seconds) = self.run_storm(seconds, 0)?;
                scraping.store(false, Ordering::Relaxed);
                scraper.join().expect("scraper");
                thread::sleep(Duration::from_millis(500));
                // The window runs from before the first scrape to before the last. A scrape's
                // connect and accept come before its render, so the first scrape's are in the
                // window but not in the delivered count, and the last one's in the delivered
                // count but not in the window: as many.
                outcome.firings = tracer.settled_firings()? - firings_before;
                (outcome.prog, outcome.standby) = deltas(tracer.prog_stats()?, prog_before);
                let (after, _) = measure::http_get(addr, "/metrics")?;
                outcome.tracer_cpu = measure::cpu_seconds(tracer.pid())? - cpu_before;
                outcome.peak_rss = measure::memory(tracer.pid())?.0;
                let change = |name: &str, labels: &[&str]| {
                    (measure::metric(&after, name, labels) - measure::metric(&before, name, labels))
                        as u64
                };
                outcome.delivered = change("tcpstate_events_total", &[]);
                // The scrapes in the window are connections too, not part of the storm.
                outcome.expected_extra = per_scrape * (scrapes.load(Ordering::Relaxed) + 1);
                outcome.lost_buffer =
                    change("tcpstate_events_lost_total", &["cause=\"ringbuf_full\""]);
                outcome.lost_recursion =
                    change("tcpstate_events_lost_total", &["cause=\"recursion\""]);
                outcome.lost_map = Some(change("tcpstate_kernel_map_update_failures_total", &[]));
                outcome.rescued = change("tcpstate_events_rescued_total", &[]);
                outcome.retransmit_runs = retransmits_before
                    .delta_to(tracer.prog_stats_named("tcp_retransmit_")?)
                    .run_cnt;
                tracer.stop()?;
            }
            Config::Watch => {
                let tracer = self.watch(&[])?;
                thread::sleep(Duration::from_millis(500));
                let cpu_before = measure::cpu_seconds(tracer.pid())?;
                let prog_before = tracer.prog_stats()?;
                let firings_before = tracer.firings()?;
                tracer.settle();
                let lines_before = tracer.lines.load(Ordering::Relaxed);
                (outcome.connections, outcome.seconds) = self.run_storm(seconds, 0)?;
                tracer.settle();
                outcome.firings = tracer.firings()? - firings_before;
                tracer.settle();
                outcome.delivered = tracer.lines.load(Ordering::Relaxed) - lines_before;
                outcome.tracer_cpu = measure::cpu_seconds(tracer.pid())? - cpu_before;
                (outcome.prog, outcome.standby) = deltas(tracer.prog_stats()?, prog_before);
                outcome.peak_rss = measure::memory(tracer.pid())?.0;
                let (stderr, _) = tracer.stop()?;
                let stats = stderr
                    .iter()
                    .find(|l| l.starts_with("tcpstate watch stats:"))
                    .context("watch --stats line")?;
                let field = |key: &str| -> u64 {
                    stats
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                outcome.lost_buffer = field("lost_ringbuf_full");
                outcome.lost_recursion = field("lost_recursion");
                outcome.lost_map = Some(field("map_update_failed"));
                outcome.rescued = field("rescued");
            }
            Config::Tcpstates => {
                // Its output to a pipe is block-buffered: it is ready once its program is
                // loaded, and its lines are counted when it exits (its header is one).
                let tracer = Tracer::start(Command::new(TCPSTATES), |_| true)?;
                thread::sleep(Duration::from_millis(1000));
                let cpu_before = measure::cpu_seconds(tracer.pid())?;
                let prog_before = tracer.prog_stats()?;
                (outcome.connections, outcome.seconds) = self.run_storm(seconds, 0)?;
                thread::sleep(Duration::from_millis(1500));
                outcome.tracer_cpu = measure::cpu_seconds(tracer.pid())? - cpu_before;
                (outcome.prog, outcome.standby) = deltas(tracer.prog_stats()?, prog_before);
                outcome.peak_rss = measure::memory(tracer.pid())?.0;
                // Its output reaches the pipe only at exit: count everything since it loaded,
                // against every firing since it loaded.
                outcome.firings = tracer.firings()?;
                let (stderr, lines) = tracer.stop()?;
                outcome.delivered = lines.saturating_sub(1);
                // "lost N events on CPU #C" from its perf buffer callback.
                outcome.lost_buffer = stderr
                    .iter()
                    .filter_map(|l| {
                        l.strip_prefix("lost ")?.split_whitespace().next()?.parse::<u64>().ok()
                    })
                    .sum();
                outcome.lost_recursion = outcome.prog.recursion_misses;
            }
        }
        // The listener's CLOSE -> LISTEN and LISTEN -> CLOSE come on top of the connections'.
        outcome.expected = (outcome.connections as f64 * per_connection).round() as u64 + 2;
        Ok(outcome)
    }
}

pub(super) fn deltas(
    after: (ProgStats, ProgStats),
    before: (ProgStats, ProgStats),
) -> (ProgStats, ProgStats) {
    (before.0.delta_to(after.0), before.1.delta_to(after.1))
}
