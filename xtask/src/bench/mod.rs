//! `cargo xtask bench`: a loopback connection storm inside a fresh network namespace, run
//! bare and under each tracer in alternation, several rounds; then a scale run holding many
//! connections open. Prints the table and records it at the top of BENCHMARKS.md.

pub mod load;
mod measure;

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use self::measure::{BpfStats, ProgStats};
use crate::cmd::{capture, is_root};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Rounds of every configuration, alternating, for medians and min-max.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds of storm per configuration and round.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Client threads of the load generator.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Connections held open in the scale run (half of them measured first); 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    pub hold: usize,
    /// Print the results without recording them in BENCHMARKS.md.
    #[arg(long)]
    pub no_record: bool,
}

const NETNS: &str = "tcpstate-bench";
const STORM_PORT: u16 = 5001;
const TCPSTATES: &str = "/usr/sbin/tcpstates";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Bare,
    Daemon,
    Watch,
    Tcpstates,
}

impl Config {
    const ALL: [Self; 4] = [Self::Bare, Self::Daemon, Self::Watch, Self::Tcpstates];

    fn label(self) -> &'static str {
        match self {
            Self::Bare => "nothing attached (bare)",
            Self::Daemon => "`tcpstate run` (scraped 1/s)",
            Self::Watch => "`tcpstate watch --json`",
            Self::Tcpstates => "libbpf-tools `tcpstates`",
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
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.connections as f64 / self.seconds
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
    let bench = Bench {
        tcpstate: root.join("target/release/tcpstate"),
        xtask: std::env::current_exe().context("the xtask binary")?,
        args,
    };
    let _stats = BpfStats::enable()?;
    let _namespace = NamespaceCleanup;
    let started = Instant::now();

    eprintln!("bench: measuring transitions per connection at a low rate");
    let per_connection = bench.transitions_per_connection()?;
    eprintln!("bench: {per_connection:.3} transitions per connection");

    let mut outcomes: Vec<(Config, Outcome)> = Vec::new();
    for round in 1..=args.rounds {
        for config in Config::ALL {
            eprintln!("bench: round {round}/{}: {}", args.rounds, config.label());
            let outcome = bench.storm(config, per_connection)?;
            eprintln!(
                "bench:   {:.0} connections/s, {} of {} transitions delivered, tracer CPU {:.2} s",
                outcome.rate(),
                outcome.delivered,
                outcome.expected,
                outcome.tracer_cpu
            );
            outcomes.push((config, outcome));
        }
    }
    let scale = if args.hold > 0 { Some(bench.scale()?) } else { None };

    let report = render(args, per_connection, &outcomes, scale.as_deref(), started.elapsed());
    println!("{report}");
    if !args.no_record {
        record(&root.join("BENCHMARKS.md"), &report)?;
        eprintln!("bench: recorded in BENCHMARKS.md");
    }
    Ok(())
}

struct Bench<'a> {
    tcpstate: PathBuf,
    xtask: PathBuf,
    args: &'a BenchArgs,
}

/// A tracer process under test, its output counted line by line.
struct Tracer {
    child: Child,
    lines: Arc<AtomicU64>,
    /// Ends when the tracer's stdout closes: every line it wrote is counted then.
    counter: Option<thread::JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<String>>>,
    programs: HashSet<u64>,
}

fn counted_lines(
    stream: impl std::io::Read + Send + 'static,
) -> (Arc<AtomicU64>, thread::JoinHandle<()>) {
    let lines = Arc::new(AtomicU64::new(0));
    let counter = lines.clone();
    let reader = thread::spawn(move || {
        let mut reader = BufReader::with_capacity(1 << 20, stream);
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            counter.fetch_add(
                buf[..n].iter().filter(|&&b| b == b'\n').count() as u64,
                Ordering::Relaxed,
            );
        }
    });
    (lines, reader)
}

fn collected_lines(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Tracer {
    fn start(mut command: Command, ready: impl Fn(&Tracer) -> bool) -> anyhow::Result<Self> {
        let before: HashSet<u64> = measure::programs()?.into_keys().collect();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let (lines, counter) = counted_lines(child.stdout.take().expect("piped"));
        let stderr = collected_lines(child.stderr.take().expect("piped"));
        let mut tracer =
            Self { child, lines, counter: Some(counter), stderr, programs: HashSet::new() };
        wait_for("the tracer to attach", Duration::from_secs(60), || {
            let new_program =
                || measure::programs().is_ok_and(|p| p.keys().any(|id| !before.contains(id)));
            (ready(&tracer) && new_program()) || tracer.child.try_wait().ok().flatten().is_some()
        })?;
        if let Some(status) = tracer.child.try_wait()? {
            bail!("tracer exited ({status}): {:?}", tracer.stderr.lock().unwrap());
        }
        tracer.programs =
            measure::programs()?.into_keys().filter(|id| !before.contains(id)).collect();
        Ok(tracer)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_contains(&self, needle: &str) -> bool {
        self.stderr.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Statistics of the main program(s) and of the standby (zero when there is none).
    fn prog_stats(&self) -> anyhow::Result<(ProgStats, ProgStats)> {
        let programs = measure::programs()?;
        let (standby, main): (HashSet<u64>, HashSet<u64>) = self
            .programs
            .iter()
            .partition(|id| programs.get(id).is_some_and(|(name, _)| name == "standby"));
        Ok((measure::sum(&programs, &main), measure::sum(&programs, &standby)))
    }

    /// Times the tracepoint fired for this tracer since its programs loaded: every run of its
    /// main program plus every run the kernel skipped. The standby runs for the same firings,
    /// so it is left out.
    fn firings(&self) -> anyhow::Result<u64> {
        let programs = measure::programs()?;
        let main: HashSet<u64> = self
            .programs
            .iter()
            .copied()
            .filter(|id| programs.get(id).is_some_and(|(name, _)| name != "standby"))
            .collect();
        let stats = measure::sum(&programs, &main);
        Ok(stats.run_cnt + stats.recursion_misses)
    }

    /// Waits until the output stops growing: the tracer has written what it received.
    fn settle(&self) {
        let mut last = u64::MAX;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let now = self.lines.load(Ordering::Relaxed);
            if now == last {
                return;
            }
            last = now;
            thread::sleep(Duration::from_millis(700));
        }
    }

    /// Stops the tracer; returns its stderr and how many lines it wrote in all.
    fn stop(mut self) -> anyhow::Result<(Vec<String>, u64)> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("tracer did not stop");
            }
            thread::sleep(Duration::from_millis(20));
        }
        if let Some(counter) = self.counter.take() {
            counter.join().expect("line counter");
        }
        thread::sleep(Duration::from_millis(100));
        Ok((self.stderr.lock().unwrap().clone(), self.lines.load(Ordering::Relaxed)))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes the benchmark's namespace when the benchmark ends, however it ends.
struct NamespaceCleanup;

impl Drop for NamespaceCleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).stderr(Stdio::null()).status();
    }
}

/// A fresh network namespace for one run: an empty TCP table, TIME_WAIT room for the storm.
fn fresh_namespace() -> anyhow::Result<()> {
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

impl Bench<'_> {
    fn loadgen(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", NETNS]).arg(&self.xtask).arg("loadgen");
        command
    }

    /// Runs a storm in the namespace; returns (connections, seconds).
    fn run_storm(&self, seconds: f64, rate: u64) -> anyhow::Result<(u64, f64)> {
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

    /// `tcpstate run` on a free loopback port, started and settled.
    fn daemon(&self) -> anyhow::Result<(Tracer, SocketAddr)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut command = Command::new(&self.tcpstate);
        command.args(["run", "--listen", &addr.to_string()]).env("TCPSTATE_LOG", "info");
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
    fn transitions_per_connection(&self) -> anyhow::Result<f64> {
        fresh_namespace()?;
        let tracer = self.watch(&["--port", &STORM_PORT.to_string()])?;
        let (connections, _) = self.run_storm(2.0, 1000)?;
        tracer.settle();
        let (_, lines) = tracer.stop()?;
        // The listener's own CLOSE -> LISTEN and LISTEN -> CLOSE are not per connection.
        Ok((lines.saturating_sub(2)) as f64 / connections as f64)
    }

    fn storm(&self, config: Config, per_connection: f64) -> anyhow::Result<Outcome> {
        fresh_namespace()?;
        let seconds = self.args.seconds;
        let mut outcome = Outcome::default();
        match config {
            Config::Bare => {
                (outcome.connections, outcome.seconds) = self.run_storm(seconds, 0)?;
            }
            Config::Daemon => {
                let (tracer, addr) = self.daemon()?;
                let cpu_before = measure::cpu_seconds(tracer.pid())?;
                let prog_before = tracer.prog_stats()?;
                let firings_before = tracer.firings()?;
                let (before, _) = measure::http_get(addr, "/metrics")?;
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
                let (after, _) = measure::http_get(addr, "/metrics")?;
                // The first scrape's opening transitions came after the first count of
                // firings but before its render; the last one's closing ones after its render
                // but before the last count: one scrape's 10 transitions the firings include
                // and the delivered count does not.
                outcome.firings = (tracer.firings()? - firings_before).saturating_sub(10);
                outcome.tracer_cpu = measure::cpu_seconds(tracer.pid())? - cpu_before;
                (outcome.prog, outcome.standby) = deltas(tracer.prog_stats()?, prog_before);
                outcome.peak_rss = measure::memory(tracer.pid())?.0;
                let change = |name: &str, labels: &[&str]| {
                    (measure::metric(&after, name, labels) - measure::metric(&before, name, labels))
                        as u64
                };
                outcome.delivered = change("tcpstate_events_total", &[]);
                // The scrapes are connections too; they are not part of the storm.
                outcome.expected_extra = 10 * (scrapes.load(Ordering::Relaxed) + 1);
                outcome.lost_buffer =
                    change("tcpstate_events_lost_total", &["cause=\"ringbuf_full\""]);
                outcome.lost_recursion =
                    change("tcpstate_events_lost_total", &["cause=\"recursion\""]);
                outcome.lost_map = Some(change("tcpstate_kernel_map_update_failures_total", &[]));
                outcome.rescued = change("tcpstate_events_rescued_total", &[]);
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

    /// Holds connections open under the daemon: memory per tracked socket and how long the
    /// endpoints take with that many.
    fn scale(&self) -> anyhow::Result<Vec<ScalePoint>> {
        fresh_namespace()?;
        let (tracer, addr) = self.daemon()?;
        let idle_rss = measure::memory(tracer.pid())?.1;
        let mut points = Vec::new();
        let mut holders: Vec<(Child, ChildStdin)> = Vec::new();
        let per_process = load::max_held_connections();
        let mut held = 0;
        let mut next_port = STORM_PORT + 1;
        for target in [self.args.hold / 2, self.args.hold] {
            eprintln!("bench: scale run: holding {target} connections");
            while held < target {
                let count = (target - held).min(per_process);
                let mut holder = self
                    .loadgen()
                    .args([
                        "hold",
                        "--connections",
                        &count.to_string(),
                        "--port",
                        &next_port.to_string(),
                    ])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()?;
                next_port += 1;
                let mut ready = String::new();
                BufReader::new(holder.stdout.take().expect("piped")).read_line(&mut ready)?;
                if !ready.starts_with("ready") {
                    bail!("the load generator could not hold {count} connections");
                }
                let stdin = holder.stdin.take().expect("piped");
                holders.push((holder, stdin));
                held += count;
            }
            thread::sleep(Duration::from_secs(2));
            let (metrics, _) = measure::http_get(addr, "/metrics")?;
            let tracked = measure::metric(&metrics, "tcpstate_tracked_sockets", &[]) as u64;
            let mut metrics_times: Vec<Duration> = (0..5)
                .map(|_| measure::http_get(addr, "/metrics").map(|(_, t)| t))
                .collect::<Result<_, _>>()?;
            metrics_times.sort();
            let rss_before_listing = measure::memory(tracer.pid())?.1;
            let (listing, listing_time) =
                measure::http_get(addr, "/api/sockets?state=ESTABLISHED")?;
            let listed =
                serde_json::from_str::<serde_json::Value>(&listing)?.as_array().map_or(0, Vec::len);
            points.push(ScalePoint {
                connections: held,
                tracked,
                rss: rss_before_listing,
                per_socket: (rss_before_listing.saturating_sub(idle_rss)) as f64
                    / tracked.max(1) as f64,
                metrics: metrics_times[2],
                listing: listing_time,
                listed,
                listing_bytes: listing.len(),
                rss_after_listing: measure::memory(tracer.pid())?.1,
            });
        }
        for (mut holder, stdin) in holders {
            drop(stdin);
            let _ = holder.wait();
        }
        tracer.stop()?;
        Ok(points)
    }
}

fn deltas(after: (ProgStats, ProgStats), before: (ProgStats, ProgStats)) -> (ProgStats, ProgStats) {
    (delta(after.0, before.0), delta(after.1, before.1))
}

fn delta(after: ProgStats, before: ProgStats) -> ProgStats {
    ProgStats {
        run_time_ns: after.run_time_ns.saturating_sub(before.run_time_ns),
        run_cnt: after.run_cnt.saturating_sub(before.run_cnt),
        recursion_misses: after.recursion_misses.saturating_sub(before.recursion_misses),
    }
}

/// One measurement of the scale run.
pub struct ScalePoint {
    connections: usize,
    tracked: u64,
    rss: u64,
    per_socket: f64,
    metrics: Duration,
    listing: Duration,
    listed: usize,
    listing_bytes: usize,
    rss_after_listing: u64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| format!("{:.0} GiB", kb as f64 / 1_048_576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} × {cpu}, {memory}, Linux {}", kernel.trim())
}

fn render(
    args: &BenchArgs,
    per_connection: f64,
    outcomes: &[(Config, Outcome)],
    scale: Option<&[ScalePoint]>,
    took: Duration,
) -> String {
    let mut out = String::new();
    let commit = capture(Command::new("git").args(["rev-parse", "--short", "HEAD"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let date = capture(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let _ = writeln!(out, "## {date}, commit {commit}\n");
    let _ = writeln!(out, "- Machine: {}", machine());
    let _ = writeln!(
        out,
        "- Command: `cargo xtask bench --rounds {} --seconds {} --clients {} --hold {}` (took {:.0} s)",
        args.rounds,
        args.seconds,
        args.clients,
        args.hold,
        took.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "- Storm: loopback, in a fresh network namespace per run, client closes first, {} client \
         threads spread over 62,500 source addresses; {per_connection:.2} transitions per \
         connection, measured at 1,000 connections/s. Medians over {} rounds, (min–max).\n",
        args.clients, args.rounds
    );
    let bare: Vec<f64> =
        outcomes.iter().filter(|(c, _)| *c == Config::Bare).map(|(_, o)| o.rate()).collect();
    let bare_median = median(&mut bare.clone());
    let _ = writeln!(
        out,
        "| configuration | connections/s | vs bare | tracer CPU s per M transitions | \
         transitions (tracepoint firings) | delivered | lost | lost, as the tool counts it \
         (buffer / map / recursion) | in-kernel ns per call: main (standby) | in-kernel ns per \
         transition | peak RSS |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for config in Config::ALL {
        let runs: Vec<&Outcome> =
            outcomes.iter().filter(|(c, _)| *c == config).map(|(_, o)| o).collect();
        let mut rates: Vec<f64> = runs.iter().map(|o| o.rate()).collect();
        let (min, max) =
            rates.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let rate = median(&mut rates);
        if config == Config::Bare {
            let _ = writeln!(
                out,
                "| {} | {rate:.0} ({min:.0}–{max:.0}) | 1.00 | – | – | – | – | – | – | – | – |",
                config.label()
            );
            continue;
        }
        let mut cpu: Vec<f64> =
            runs.iter().map(|o| o.tracer_cpu / (o.delivered.max(1) as f64 / 1e6)).collect();
        let firings: u64 = runs.iter().map(|o| o.firings).sum();
        let delivered: u64 = runs.iter().map(|o| o.delivered).sum();
        let lost = firings.saturating_sub(delivered);
        let buffer: u64 = runs.iter().map(|o| o.lost_buffer).sum();
        let map = runs.iter().map(|o| o.lost_map).sum::<Option<u64>>();
        let recursion: u64 = runs.iter().map(|o| o.lost_recursion).sum();
        let per_call = |stats: &dyn Fn(&Outcome) -> ProgStats| {
            let mut ns: Vec<f64> = runs
                .iter()
                .map(|o| stats(o))
                .filter(|s| s.run_cnt > 0)
                .map(|s| s.run_time_ns as f64 / s.run_cnt as f64)
                .collect();
            (!ns.is_empty()).then(|| median(&mut ns))
        };
        let main_ns = per_call(&|o| o.prog);
        let standby_ns = per_call(&|o| o.standby);
        let calls = match (main_ns, standby_ns) {
            (Some(m), Some(s)) => format!("{m:.0} ({s:.0})"),
            (Some(m), None) => format!("{m:.0}"),
            _ => "–".to_owned(),
        };
        let mut per_transition: Vec<f64> = runs
            .iter()
            .filter(|o| o.firings > 0)
            .map(|o| (o.prog.run_time_ns + o.standby.run_time_ns) as f64 / o.firings as f64)
            .collect();
        let per_transition = if per_transition.is_empty() {
            "–".to_owned()
        } else {
            format!("{:.0}", median(&mut per_transition))
        };
        let rss = runs.iter().map(|o| o.peak_rss).max().unwrap_or(0);
        let rescued: u64 = runs.iter().map(|o| o.rescued).sum();
        let rescued =
            if rescued > 0 { format!(" ({rescued} by the standby)") } else { String::new() };
        let _ = writeln!(
            out,
            "| {} | {rate:.0} ({min:.0}–{max:.0}) | {:.2} | {:.2} | {firings} | {delivered}{rescued} | {lost} ({:.4} %) | {buffer} / {} / {recursion} | {calls} | {per_transition} | {} |",
            config.label(),
            rate / bare_median,
            median(&mut cpu),
            lost as f64 * 100.0 / firings.max(1) as f64,
            map.map_or_else(|| "–".to_owned(), |m| m.to_string()),
            mib(rss),
        );
    }
    let connections: u64 = outcomes.iter().map(|(_, o)| o.connections).sum();
    let storm: u64 = outcomes
        .iter()
        .filter(|(c, _)| *c != Config::Bare)
        .map(|(_, o)| o.expected + o.expected_extra)
        .sum();
    let fired: u64 = outcomes.iter().map(|(_, o)| o.firings).sum();
    let _ = writeln!(
        out,
        "\nTransitions: every firing of the tracepoint while the tracer was attached (its main \
         program's runs plus the runs the kernel skipped); the storms' {connections} connections \
         account for {storm} of the {fired} under tracers, the rest is other traffic on the \
         host. Delivered: what the tracer output (`watch`, `tcpstates`: lines, counted through a \
         pipe; `run`: `tcpstate_events_total`). Lost: firings minus delivered; counted: what the \
         tool itself reports (`tcpstates`: its \"lost N events\" lines and the kernel's \
         recursion_misses for its program). In-kernel time: `run_time_ns / run_cnt` with \
         kernel.bpf_stats_enabled=1, which itself adds about 80 ns to every run (an empty \
         program measures that); per transition: both programs' time over the firings."
    );
    if let Some(points) = scale {
        let _ = writeln!(
            out,
            "\nScale run, `tcpstate run` with connections held open (both ends on this host, so two sockets each):\n"
        );
        let _ = writeln!(
            out,
            "| connections | tracked sockets | daemon RSS | per tracked socket | `/metrics` (median of 5) | `/api/sockets?state=ESTABLISHED` | RSS after that listing |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for p in points {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} B | {:.1} ms | {:.0} ms ({} sockets, {:.1} MiB) | {} |",
                p.connections,
                p.tracked,
                mib(p.rss),
                p.per_socket,
                p.metrics.as_secs_f64() * 1e3,
                p.listing.as_secs_f64() * 1e3,
                p.listed,
                p.listing_bytes as f64 / (1 << 20) as f64,
                mib(p.rss_after_listing),
            );
        }
    }
    out
}

/// Puts the newest report first, keeping every earlier one below it.
fn record(path: &Path, report: &str) -> anyhow::Result<()> {
    const HEADER: &str = "# Benchmarks\n\nEvery table here comes from `cargo xtask bench` \
        (as root); the newest is first and earlier ones stay below, so the history of the \
        numbers is visible. Notes under a table say what was found and changed.\n\n";
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let earlier = existing.strip_prefix(HEADER).unwrap_or(&existing);
    let mut file = std::fs::File::create(path)?;
    write!(file, "{HEADER}{report}\n{earlier}")?;
    Ok(())
}
