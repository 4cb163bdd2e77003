//! `cargo xtask soak --minutes N`: `tcpstate run` under a steady load for a long time, sampled
//! every minute, to prove what a short test cannot: memory that stays flat, gauges that stay
//! equal to `ss`, no drift and nothing lost.
//!
//! The load, all on loopback in this process and in a network namespace of its own:
//! connections opened and closed at `--rate` per second, a server that never closes what its
//! peers hang up on (a slow CLOSE_WAIT leak, one socket every 30 s), and a listener that never
//! accepts, kept full by clients that time out. Each minute the churn pauses for a moment so
//! that `ss` and the daemon can be compared on still sockets. The daemon watches the whole
//! host; only the namespace's sockets are compared, so the host's own traffic (other tests,
//! other services) does not make the comparison fail.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};

use anyhow::{Context as _, bail, ensure};

use crate::{
    bench::measure::{cpu_seconds, http_get, memory, metric},
    benchmarks_md::{commit, machine, record_section},
};

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the daemon runs under load.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Connections opened and closed per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Most the daemon's resident memory may grow over the run's second half, in percent of
    /// what it was at the half (and at least 2 MiB).
    #[arg(long, default_value_t = 10.0)]
    pub rss_growth_percent: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60)]
    pub sample_seconds: u64,
    /// Make this run's figures the soak section of BENCHMARKS.md (passed or not).
    #[arg(long)]
    pub record: bool,
}

/// States the daemon's table holds (what its gauges count), compared with `ss` at each
/// sample. TIME_WAIT and NEW_SYN_RECV are counted from dumps, and so are the timewait
/// minisockets `ss` lists as FIN-WAIT-2: those agree with the last reconciliation only.
const COMPARED: [(&str, &str); 8] = [
    ("ESTABLISHED", "ESTAB"),
    ("SYN_SENT", "SYN-SENT"),
    ("SYN_RECV", "SYN-RECV"),
    ("FIN_WAIT1", "FIN-WAIT-1"),
    ("CLOSE_WAIT", "CLOSE-WAIT"),
    ("LAST_ACK", "LAST-ACK"),
    ("LISTEN", "LISTEN"),
    ("CLOSING", "CLOSING"),
];

impl SoakArgs {
    /// The soak `cargo xtask test` runs: long enough for several reconciliations and for a
    /// steady leak of memory to show, short enough for CI.
    pub fn short() -> Self {
        Self { minutes: 3, rate: 500, rss_growth_percent: 10.0, sample_seconds: 30, record: false }
    }
}

/// One minute's sample.
#[derive(Debug)]
struct Sample {
    at: Duration,
    rss: u64,
    cpu_seconds: f64,
    connections: u64,
    lost: f64,
    corrections: f64,
    /// Sockets of the namespace the daemon holds, per state (those it holds any of).
    compared: Vec<(&'static str, u64)>,
    /// States where the daemon and `ss` differed after every retry: (state, daemon, ss).
    differing: Vec<(&'static str, u64, u64)>,
}

pub fn run(root: &Path, args: &SoakArgs) -> anyhow::Result<()> {
    ensure!(args.minutes >= 1 && args.rate >= 1, "--minutes and --rate must be at least 1");
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let binary = root.join("target/release/tcpstate");
    let namespace = Namespace::create()?;
    let mut daemon = Daemon::start(&binary, addr)?;
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    let load = namespace.enter(|| Load::start(args.rate, &stop, &pause, &connections))??;
    eprintln!(
        "soak: {} min, {} connections/s, a CLOSE_WAIT leak and a stuck listener; daemon pid {}",
        args.minutes,
        args.rate,
        daemon.child.id()
    );
    let started = Instant::now();
    let end = started + Duration::from_secs(args.minutes * 60);
    let mut samples = Vec::new();
    let sampled = (|| -> anyhow::Result<()> {
        while Instant::now() < end {
            let next = Instant::now() + Duration::from_secs(args.sample_seconds);
            thread::sleep(next.min(end).saturating_duration_since(Instant::now()));
            daemon.ensure_running()?;
            pause.store(true, Ordering::Relaxed);
            let sample = sample(
                &daemon,
                addr,
                &namespace,
                started.elapsed(),
                connections.load(Ordering::Relaxed),
            );
            pause.store(false, Ordering::Relaxed);
            let sample = sample?;
            eprintln!(
                "soak: {:>4} s  RSS {:.1} MiB  CPU {:.1} s  {} connections  lost {}  corrections \
                 {}  table {}",
                sample.at.as_secs(),
                mib(sample.rss),
                sample.cpu_seconds,
                sample.connections,
                sample.lost,
                sample.corrections,
                if sample.differing.is_empty() {
                    format!("= ss {:?}", sample.compared)
                } else {
                    format!("differ from ss: {:?}", sample.differing)
                }
            );
            samples.push(sample);
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    load.join();
    daemon.stop();
    sampled?;
    let figures = Figures::of(&samples, args)?;
    eprintln!("soak: {}", figures.summary());
    let verdict = figures.verdict(&samples);
    if args.record {
        let section = figures.section(args, verdict.as_ref().err());
        record_section(&root.join("BENCHMARKS.md"), SECTION_HEADING, &section)?;
        eprintln!("soak: BENCHMARKS.md's soak section is this run's");
    }
    verdict
}

/// The soak's section of BENCHMARKS.md.
const SECTION_HEADING: &str = "## Soak";

/// What a run measured, from its samples.
struct Figures {
    samples: usize,
    minutes: f64,
    connections: u64,
    rss_first: u64,
    rss_half: u64,
    rss_last: u64,
    rss_max: u64,
    /// How far the second half's highest sample rose above the half's.
    growth: u64,
    allowed: u64,
    cpu_per_hour: f64,
    lost: f64,
    corrections: f64,
    equal_to_ss: usize,
    /// RSS at about a dozen moments of the run: (minute, bytes).
    rss_course: Vec<(f64, u64)>,
}

impl Figures {
    fn of(samples: &[Sample], args: &SoakArgs) -> anyhow::Result<Self> {
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            bail!("no sample taken");
        };
        let half = &samples[samples.len() / 2];
        let later_max = samples[samples.len() / 2..].iter().map(|s| s.rss).max().unwrap_or(0);
        let hours = (last.at.as_secs_f64() - first.at.as_secs_f64()) / 3600.0;
        let step = samples.len().div_ceil(12).max(1);
        let mut rss_course: Vec<_> =
            samples.iter().step_by(step).map(|s| (s.at.as_secs_f64() / 60.0, s.rss)).collect();
        if !(samples.len() - 1).is_multiple_of(step) {
            rss_course.push((last.at.as_secs_f64() / 60.0, last.rss));
        }
        Ok(Self {
            samples: samples.len(),
            minutes: last.at.as_secs_f64() / 60.0,
            connections: last.connections,
            rss_first: first.rss,
            rss_half: half.rss,
            rss_last: last.rss,
            rss_max: samples.iter().map(|s| s.rss).max().unwrap_or(0),
            growth: later_max.saturating_sub(half.rss),
            allowed: ((half.rss as f64 * args.rss_growth_percent / 100.0) as u64).max(2 << 20),
            cpu_per_hour: (last.cpu_seconds - first.cpu_seconds) / hours.max(1e-9),
            lost: last.lost,
            corrections: last.corrections,
            equal_to_ss: samples.iter().filter(|s| s.differing.is_empty()).count(),
            rss_course,
        })
    }

    fn summary(&self) -> String {
        format!(
            "{} samples over {:.0} min, {} connections: RSS first {:.1} MiB, last {:.1} MiB, \
             max {:.1} MiB; second half grew {:.2} MiB (allowed {:.2}); CPU {:.1} s per hour; \
             drift {} corrections; {} transitions lost (counted); table = ss at {} of {} samples",
            self.samples,
            self.minutes,
            self.connections,
            mib(self.rss_first),
            mib(self.rss_last),
            mib(self.rss_max),
            mib(self.growth),
            mib(self.allowed),
            self.cpu_per_hour,
            self.corrections,
            self.lost,
            self.equal_to_ss,
            self.samples,
        )
    }

    /// Whether the run passed: the table equal to `ss` at every sample, no correction, and
    /// memory flat over the second half.
    fn verdict(&self, samples: &[Sample]) -> anyhow::Result<()> {
        let mismatched: Vec<_> = samples.iter().filter(|s| !s.differing.is_empty()).collect();
        ensure!(
            mismatched.is_empty(),
            "gauges differed from ss at {} samples: {mismatched:?}",
            mismatched.len()
        );
        ensure!(self.corrections == 0.0, "the table drifted: {} corrections", self.corrections);
        ensure!(
            self.growth <= self.allowed,
            "RSS grew {:.2} MiB over the second half",
            mib(self.growth)
        );
        Ok(())
    }

    /// The soak's section of BENCHMARKS.md.
    fn section(&self, args: &SoakArgs, failed: Option<&anyhow::Error>) -> String {
        let mut out = format!("{SECTION_HEADING}\n\n");
        out += &format!("- Commit: {}\n- Machine: {}\n", commit(), machine());
        out += &format!(
            "- Command: `cargo xtask soak --minutes {} --rate {} --sample-seconds {} \
             --rss-growth-percent {} --record`\n",
            args.minutes, args.rate, args.sample_seconds, args.rss_growth_percent
        );
        out += &format!(
            "- Load (in a network namespace of its own): {} connections opened and closed per \
             second, a CLOSE_WAIT leak growing by one socket every 30 s, a listener that never \
             accepts; sampled every {} s (what it checks: docs/development.md, \"The soak\").\n",
            args.rate, args.sample_seconds
        );
        out += &format!(
            "- Verdict: {}\n\n",
            failed.map_or_else(|| "passed".to_owned(), |e| format!("failed: {e:#}"))
        );
        out += "| minutes | connections | table = `ss` (samples) | daemon RSS: first | at the half \
                | last | max | second-half growth (allowed) | daemon CPU s per hour | transitions \
                lost | corrections |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
        out += &format!(
            "| {:.0} | {} | {} of {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} MiB \
             ({:.2}) | {:.1} | {} | {} |\n\n",
            self.minutes,
            self.connections,
            self.equal_to_ss,
            self.samples,
            mib(self.rss_first),
            mib(self.rss_half),
            mib(self.rss_last),
            mib(self.rss_max),
            mib(self.growth),
            mib(self.allowed),
            self.cpu_per_hour,
            self.lost,
            self.corrections,
        );
        let course: Vec<String> = self
            .rss_course
            .iter()
            .map(|(minute, rss)| format!("{minute:.0} min {:.1}", mib(*rss)))
            .collect();
        out += &format!("Daemon RSS over the run (MiB): {}.\n", course.join(", "));
        out
    }
}

/// Flushes the daemon (a scrape applies what waits in the ring), counts the namespace's
/// sockets in `ss` and in the daemon's table, and compares; a difference is retried a few
/// times, since a socket may still be moving.
fn sample(
    daemon: &Daemon,
    addr: SocketAddr,
    namespace: &Namespace,
    at: Duration,
    connections: u64,
) -> anyhow::Result<Sample> {
    thread::sleep(Duration::from_millis(1500));
    let mut differing = Vec::new();
    let mut exposition = String::new();
    let mut held_by_state = Vec::new();
    for _ in 0..5 {
        exposition = http_get(addr, "/metrics")?.0;
        let counted = namespace.ss_counts()?;
        (differing, held_by_state) = (Vec::new(), Vec::new());
        for &(state, ss) in &COMPARED {
            let held = namespace.daemon_sockets(addr, state)?;
            let listed = counted.get(ss).copied().unwrap_or(0);
            if held.len() as u64 != listed {
                differing.push((state, held.len() as u64, listed));
            }
            held_by_state.push((state, held));
        }
        if differing.is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    for (state, held) in &held_by_state {
        if differing.iter().any(|(differs, _, _)| differs == state) {
            // Which sockets the daemon holds, to find the ones `ss` does not list.
            let listing: String = serde_json::to_string(held)?.chars().take(2000).collect();
            eprintln!("soak: the daemon's {state} sockets: {listing}");
        }
    }
    let compared = held_by_state
        .iter()
        .filter(|(_, held)| !held.is_empty())
        .map(|(state, held)| (*state, held.len() as u64))
        .collect();
    let pid = daemon.child.id();
    Ok(Sample {
        at,
        rss: memory(pid)?.1,
        cpu_seconds: cpu_seconds(pid)?,
        connections,
        lost: metric(&exposition, "tcpstate_events_lost_total", &[]),
        corrections: metric(&exposition, "tcpstate_reconcile_corrections_total", &[]),
        compared,
        differing,
    })
}

/// The soak's network namespace, deleted when the soak ends.
struct Namespace {
    name: String,
    /// Its inode: what the daemon's socket listing names it by.
    inode: u64,
}

impl Namespace {
    fn create() -> anyhow::Result<Self> {
        let name = format!("tcpstate-soak-{}", std::process::id());
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let status = Command::new("ip").args(args).stdout(Stdio::null()).status()?;
            ensure!(status.success(), "ip {} failed", args.join(" "));
            Ok(())
        };
        ip(&["netns", "add", &name])?;
        // Deleted from here on, whatever fails next.
        let mut namespace = Self { inode: 0, name };
        ip(&["-n", &namespace.name, "link", "set", "lo", "up"])?;
        namespace.inode = std::fs::metadata(namespace.path())?.ino();
        Ok(namespace)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread inside the namespace; threads it spawns stay there.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file = std::fs::File::open(self.path())?;
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a namespace file this thread holds open; it moves only
                    // this thread (and what it spawns).
                    let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    ensure!(entered == 0, "setns: {}", std::io::Error::last_os_error());
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the namespace's thread panicked"))?
        })
    }

    /// TCP sockets per `ss` state name in the namespace.
    fn ss_counts(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, "ss", "-tanH"])
            .output()
            .context("running ss (iproute2)")?;
        let mut counts = BTreeMap::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(state) = line.split_whitespace().next() {
                *counts.entry(state.to_owned()).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// The namespace's sockets the daemon's table holds in `state`.
    fn daemon_sockets(
        &self,
        addr: SocketAddr,
        state: &str,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut sockets = Vec::new();
        let mut offset = 0;
        loop {
            let path = format!("/api/sockets?state={state}&offset={offset}&limit={PAGE}");
            let page: Vec<serde_json::Value> = serde_json::from_str(&http_get(addr, &path)?.0)
                .context("the daemon's socket listing")?;
            let full = page.len() == PAGE;
            sockets.extend(page.into_iter().filter(|s| s["netns"].as_u64() == Some(self.inode)));
            if !full {
                return Ok(sockets);
            }
            offset += PAGE;
        }
    }
}

/// Sockets asked of the daemon per request.
const PAGE: usize = 10_000;

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The daemon under test.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(binary: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        let child = Command::new(binary)
            .args(["run", "--listen", &addr.to_string()])
            .args(["--close-wait-threshold", "5", "--listen-queue-threshold", "5"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let daemon = Self { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(addr, "/healthz").is_err() {
            ensure!(Instant::now() < deadline, "the daemon did not answer within a minute");
            thread::sleep(Duration::from_millis(200));
        }
        Ok(daemon)
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("the daemon exited during the soak: {status}"),
        }
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// The load's threads.
struct Load {
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(
        rate: u64,
        stop: &Arc<AtomicBool>,
        pause: &Arc<AtomicBool>,
        connections: &Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let mut threads = Vec::new();
        // Churn: a server that reads a byte, answers and closes; clients at `rate` per second.
        let server = TcpListener::bind("127.0.0.1:0")?;
        let target = server.local_addr()?;
        server.set_nonblocking(true)?;
        let running = stop.clone();
        threads.push(thread::spawn(move || {
            while !running.load(Ordering::Relaxed) {
                match server.accept() {
                    Ok((mut peer, _)) => {
                        let _ = peer.set_nonblocking(false);
                        let mut byte = [0; 1];
                        if peer.read_exact(&mut byte).is_ok() {
                            let _ = peer.write_all(b"y");
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        }));
        let (running, paused, counted) = (stop.clone(), pause.clone(), connections.clone());
        threads.push(thread::spawn(move || {
            let per_tick = (rate / 100).max(1);
            while !running.load(Ordering::Relaxed) {
                let tick = Instant::now() + Duration::from_millis(10);
                if !paused.load(Ordering::Relaxed) {
                    for _ in 0..per_tick {
                        if let Ok(mut client) = TcpStream::connect(target) {
                            let mut byte = [0; 1];
                            if client.write_all(b"x").is_ok()
                                && client.read_exact(&mut byte).is_ok()
                            {
                                counted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                thread::sleep(tick.saturating_duration_since(Instant::now()));
            }
        }));
        // The leak: accepted and never closed; a peer hangs up every 30 s.
        let leaking = TcpListener::bind("127.0.0.1:0")?;
        let leak_addr = leaking.local_addr()?;
        let running = stop.clone();
        threads.push(thread::spawn(move || {
            let mut held = Vec::new();
            while !running.load(Ordering::Relaxed) {
                if let Ok(client) = TcpStream::connect(leak_addr)
                    && let Ok((accepted, _)) = leaking.accept()
                {
                    held.push(accepted);
                    drop(client);
                }
                for _ in 0..300 {
                    if running.load(Ordering::Relaxed) {
                        return;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }));
        // The stuck listener: a backlog of 2 it never accepts from, kept full.
        let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        stuck.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        stuck.listen(2)?;
        let stuck_addr = stuck.local_addr()?.as_socket().context("an IPv4 address")?;
        let running = stop.clone();
        threads.push(thread::spawn(move || {
            let _listener = stuck;
            while !running.load(Ordering::Relaxed) {
                let _ = TcpStream::connect_timeout(&stuck_addr, Duration::from_secs(1));
                thread::sleep(Duration::from_secs(5));
            }
        }));
        Ok(Self { threads })
    }

    fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(minute: u64, rss_mib: u64) -> Sample {
        Sample {
            at: Duration::from_secs(minute * 60),
            rss: rss_mib << 20,
            cpu_seconds: minute as f64,
            connections: minute * 1000,
            lost: 0.0,
            corrections: 0.0,
            compared: vec![("ESTABLISHED", 2)],
            differing: Vec::new(),
        }
    }

    fn args() -> SoakArgs {
        SoakArgs {
            minutes: 30,
            rate: 500,
            rss_growth_percent: 10.0,
            sample_seconds: 60,
            record: true,
        }
    }

    /// Memory that keeps growing through the second half fails, however slowly it started;
    /// a warm-up in the first half does not.
    #[test]
    fn growth_in_the_second_half_fails_and_a_warm_up_does_not() {
        let warm_up: Vec<_> =
            (1..=30).map(|m| sample(m, if m < 10 { 20 + m } else { 30 })).collect();
        let figures = Figures::of(&warm_up, &args()).unwrap();
        assert!(figures.verdict(&warm_up).is_ok(), "{}", figures.summary());

        let leaking: Vec<_> = (1..=30).map(|m| sample(m, 20 + m / 3)).collect();
        let figures = Figures::of(&leaking, &args()).unwrap();
        assert_eq!(figures.growth, 5 << 20);
        assert!(figures.verdict(&leaking).is_err(), "{}", figures.summary());
    }

    #[test]
    fn a_sample_that_differs_from_ss_fails_and_is_counted() {
        let mut samples: Vec<_> = (1..=10).map(|m| sample(m, 20)).collect();
        samples[4].differing.push(("ESTABLISHED", 3, 2));
        let figures = Figures::of(&samples, &args()).unwrap();
        assert_eq!(figures.equal_to_ss, 9);
        assert!(figures.verdict(&samples).is_err());
    }

    /// The section gives the course of memory from the first sample to the last, each once,
    /// and the verdict.
    #[test]
    fn the_section_shows_memory_from_first_to_last_sample() {
        for count in [1, 2, 12, 13, 120] {
            let samples: Vec<_> = (1..=count).map(|m| sample(m, 20)).collect();
            let figures = Figures::of(&samples, &args()).unwrap();
            let minutes: Vec<f64> = figures.rss_course.iter().map(|(m, _)| *m).collect();
            assert_eq!(minutes.first(), Some(&1.0), "{count} samples");
            assert_eq!(minutes.last(), Some(&(count as f64)), "{count} samples");
            assert!(minutes.windows(2).all(|w| w[0] < w[1]), "{count} samples: {minutes:?}");
            assert!(minutes.len() <= 13, "{count} samples: {minutes:?}");
        }
        let samples: Vec<_> = (1..=3).map(|m| sample(m, 20)).collect();
        let figures = Figures::of(&samples, &args()).unwrap();
        let section = figures.section(&args(), None);
        assert!(section.starts_with("## Soak\n"), "{section}");
        assert!(section.contains("- Verdict: passed"), "{section}");
        assert!(section.contains("| 3 | 3000 | 3 of 3 |"), "{section}");
    }
}
