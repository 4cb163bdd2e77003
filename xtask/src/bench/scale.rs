//! Runs with many connections held open: the daemon's memory per tracked socket and how long
//! its endpoints take; 64 clients reading the full listing at once; and a table too small for
//! the host, which must not churn.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    load, measure,
    run::{Bench, NETNS, STORM_PORT, deltas, fresh_namespace},
    tracers::Tracer,
};

/// One measurement of the scale run.
pub struct ScalePoint {
    pub(super) connections: usize,
    pub(super) tracked: u64,
    /// The lowest RSS over a reconciliation interval: the table alone.
    pub(super) rss: u64,
    /// The highest over the same interval: with a reconciliation's dump and index.
    pub(super) rss_reconciling: u64,
    pub(super) per_socket: f64,
    pub(super) metrics: Duration,
    pub(super) listing: Duration,
    pub(super) listed: usize,
    pub(super) listing_bytes: usize,
    /// The highest RSS sampled while the listing streamed.
    pub(super) rss_during_listing: u64,
    pub(super) rss_after_listing: u64,
    /// Kernel memory of the per-socket map (`tcpstate_kernel_map_bytes{map="SOCKETS"}`).
    pub(super) kernel_map: u64,
    /// Measured at the first point only.
    pub(super) parallel: Option<ParallelListings>,
    /// The last reconciliation's time (`tcpstate_reconcile_duration_seconds`) and the highest
    /// RSS over the window: this daemon's, with the stall check, and a second one's beside it
    /// with `--stall-threshold 0`.
    pub(super) stall_check: [(Duration, u64); 2],
}

/// The scale run: its points, and what closing every held connection left in the stay
/// histogram.
pub struct ScaleRun {
    pub(super) points: Vec<ScalePoint>,
    /// The storm under the same daemon before any connection was held, and with all held.
    pub(super) storms: [ScaleStorm; 2],
    /// The kernel map's size as the daemon chose it (no `--kernel-sockets`).
    pub(super) kernel_slots: u64,
    pub(super) closing: ClosedStays,
}

/// A storm under the scale run's daemon.
pub struct ScaleStorm {
    /// Sockets held open meanwhile (and so in the kernel's map, as far as it holds them).
    pub(super) held_sockets: usize,
    pub(super) rate: f64,
    pub(super) firings: u64,
    /// The main program's kernel time per call.
    pub(super) ns_per_call: f64,
    /// The daemon's CPU over the storm, per million firings (its reconciliations included).
    pub(super) cpu_per_million: f64,
    pub(super) rss_peak: u64,
}

/// Every held connection closed: the ESTABLISHED stays the histogram gained against those
/// that ended, and how many of their transitions the kernel's map no longer held.
pub struct ClosedStays {
    pub(super) sockets: usize,
    /// Stays that ended: two per held connection, two per scrape made meanwhile.
    pub(super) expected: u64,
    pub(super) counted: u64,
    /// `tcpstate_kernel_untracked_sightings_total` gained, by cause.
    pub(super) evicted: u64,
    pub(super) older_than_daemon: u64,
    pub(super) unknown: u64,
    /// Transitions not delivered meanwhile (`tcpstate_events_lost_total`): a lost record
    /// leaves its socket's next stay unknown.
    pub(super) lost: u64,
}

/// The highest RSS of a process, sampled every 10 ms on a thread of its own until stopped.
struct PeakRss {
    sampling: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    sampler: thread::JoinHandle<()>,
}

impl PeakRss {
    fn start(pid: u32) -> anyhow::Result<Self> {
        let sampling = Arc::new(AtomicBool::new(true));
        let peak = Arc::new(AtomicU64::new(measure::memory(pid)?.1));
        let sampler = {
            let (sampling, peak) = (sampling.clone(), peak.clone());
            thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    if let Ok((_, rss)) = measure::memory(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Ok(Self { sampling, peak, sampler })
    }

    fn stop(self) -> u64 {
        self.sampling.store(false, Ordering::Relaxed);
        self.sampler.join().expect("the RSS sampler thread");
        self.peak.load(Ordering::Relaxed)
    }
}

/// Clients reading the full `/api/sockets` at once (issue: 64 clients at 100,000 sockets,
/// peak under 128 MiB above idle, back within 10 % of idle within a minute).
pub struct ParallelListings {
    pub(super) clients: usize,
    pub(super) served: usize,
    /// 503 answers (a listing's turn not free within 2 s); each was retried until served.
    pub(super) retried: usize,
    pub(super) took: Duration,
    pub(super) rss_before: u64,
    pub(super) rss_peak: u64,
    /// RSS once it came back within 10 % of `rss_before`, or after a minute.
    pub(super) rss_after: u64,
    pub(super) settled_after: Duration,
}

/// `--max-sockets` far below the host's sockets (issue: 10,000 steady sockets, a table of
/// 1,000, counters flat over 30 s, gauges equal `ss`).
pub struct Saturation {
    pub(super) sockets: usize,
    pub(super) max_sockets: usize,
    pub(super) watched: Duration,
    /// Sockets only the gauges know (`tcpstate_table_untracked_sockets`), before and after.
    pub(super) untracked: (f64, f64),
    pub(super) corrections: (f64, f64),
    pub(super) saturated: f64,
    pub(super) gauge: f64,
    pub(super) ss: usize,
}

/// Waits until the daemon tracks at least `sockets` and the count holds still for a second
/// (it is still applying the holders' transitions before that), at most a minute.
fn settle(addr: std::net::SocketAddr, sockets: usize) {
    let mut last = 0.0;
    for _ in 0..60 {
        thread::sleep(Duration::from_secs(1));
        // A scrape can time out while the daemon reconciles a million sockets: not yet.
        let Ok((metrics, _)) = measure::http_get(addr, "/metrics") else { continue };
        let tracked = measure::metric(&metrics, "tcpstate_tracked_sockets", &[]);
        if tracked >= sockets as f64 && tracked == last {
            return;
        }
        last = tracked;
    }
    eprintln!("bench: the daemon tracks {last} sockets, not yet {sockets}, after a minute");
}

/// The scale run's reconciliation interval: short, so that one falls inside the window the
/// RSS is sampled over.
pub(super) const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);
/// How long RSS is sampled at each point: a little over one reconciliation interval.
pub(super) const RSS_WINDOW: Duration = Duration::from_secs(RECONCILE_INTERVAL.as_secs() + 1);
/// How often RSS is sampled within the window.
pub(super) const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// (lowest, highest) RSS of each process, sampled every `RSS_SAMPLE_EVERY` for `RSS_WINDOW`.
fn rss_ranges<const N: usize>(pids: [u32; N]) -> anyhow::Result<[(u64, u64); N]> {
    let mut ranges = [(u64::MAX, 0); N];
    let deadline = Instant::now() + RSS_WINDOW;
    while Instant::now() < deadline {
        for (pid, (low, high)) in pids.iter().zip(&mut ranges) {
            let rss = measure::memory(*pid)?.1;
            (*low, *high) = ((*low).min(rss), (*high).max(rss));
        }
        thread::sleep(RSS_SAMPLE_EVERY);
    }
    Ok(ranges)
}

/// The last reconciliation's time, as the daemon at `addr` serves it.
fn reconcile_duration(addr: SocketAddr) -> anyhow::Result<Duration> {
    let (metrics, _) = measure::http_get(addr, "/metrics")?;
    let seconds = measure::metric(&metrics, "tcpstate_reconcile_duration_seconds", &[]);
    Ok(Duration::from_secs_f64(seconds))
}

/// Connections held at the scale run's first point (at most half the full hold).
const FIRST_POINT: usize = 50_000;

/// Load generator processes holding connections; dropping them closes the connections.
struct Holders {
    processes: Vec<(Child, ChildStdin)>,
    held: usize,
    next_port: u16,
}

impl Holders {
    fn new() -> Self {
        Self { processes: Vec::new(), held: 0, next_port: STORM_PORT + 1 }
    }

    /// Holds connections in the bench's namespace until `target` are held.
    fn hold(&mut self, bench: &Bench, target: usize) -> anyhow::Result<()> {
        let per_process = load::max_held_connections();
        while self.held < target {
            let count = (target - self.held).min(per_process);
            let mut holder = bench
                .loadgen()
                .args(["hold", "--connections", &count.to_string()])
                .args(["--port", &self.next_port.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            self.next_port += 1;
            let mut ready = String::new();
            BufReader::new(holder.stdout.take().expect("piped")).read_line(&mut ready)?;
            if !ready.starts_with("ready") {
                bail!("the load generator could not hold {count} connections");
            }
            let stdin = holder.stdin.take().expect("piped");
            self.processes.push((holder, stdin));
            self.held += count;
        }
        Ok(())
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for (mut holder, stdin) in self.processes.drain(..) {
            drop(stdin);
            let _ = holder.wait();
        }
    }
}

impl Bench<'_> {
    /// Holds connections open under the daemon: memory per tracked socket and how long the
    /// endpoints take with that many.
    pub(super) fn scale(&self) -> anyhow::Result<ScaleRun> {
        fresh_namespace()?;
        // Room for every held socket in the daemon's table (both ends of each connection are
        // on this host). The kernel's map is left to the daemon's own sizing, as a user runs
        // it: started on an idle host, it takes its smallest size, which the held sockets
        // then overflow.
        let sockets = 2 * self.args.hold + 10_000;
        let max_sockets = sockets.max(1_000_000).to_string();
        // With the most expensive scrape: --group-by passes over the whole table.
        let interval = RECONCILE_INTERVAL.as_secs().to_string();
        let flags = [
            "--group-by",
            "container",
            "--reconcile-interval",
            &interval,
            "--max-sockets",
            &max_sockets,
        ];
        let (tracer, addr) = self.daemon(&flags)?;
        let idle_rss = measure::memory(tracer.pid())?.1;
        // `...; kernel map: 262144 sockets (...)` in the startup line.
        let kernel_slots = tracer
            .stderr_line("kernel map: ")
            .and_then(|line| {
                let size = line.split("kernel map: ").nth(1)?.split_whitespace().next()?;
                size.parse().ok()
            })
            .context("the daemon's startup line gives no kernel map size")?;
        eprintln!("bench: scale run: a storm with no connection held");
        let empty = self.storm_beside(&tracer, 0)?;
        // What the stall check costs a reconciliation: the same daemon without it, beside.
        let (unchecked, unchecked_addr) =
            self.daemon(&[&flags[..], &["--stall-threshold", "0"]].concat())?;
        let mut points = Vec::new();
        let mut holders = Holders::new();
        // The first point as the issue that set the listing targets measured them (100,000
        // sockets); the last at the full hold.
        let first = FIRST_POINT.min(self.args.hold / 2);
        for target in [first, self.args.hold] {
            eprintln!("bench: scale run: holding {target} connections");
            holders.hold(self, target)?;
            settle(addr, 2 * holders.held);
            settle(unchecked_addr, 2 * holders.held);
            let (metrics, _) = measure::http_get(addr, "/metrics")?;
            let tracked = measure::metric(&metrics, "tcpstate_tracked_sockets", &[]) as u64;
            let kernel_map =
                measure::metric(&metrics, "tcpstate_kernel_map_bytes", &[r#"map="SOCKETS""#])
                    as u64;
            let mut metrics_times: Vec<Duration> = (0..5)
                .map(|_| measure::http_get(addr, "/metrics").map(|(_, t)| t))
                .collect::<Result<_, _>>()?;
            metrics_times.sort();
            let [(rss_steady, rss_reconciling), (_, rss_unchecked)] =
                rss_ranges([tracer.pid(), unchecked.pid()])?;
            let stall_check = [
                (reconcile_duration(addr)?, rss_reconciling),
                (reconcile_duration(unchecked_addr)?, rss_unchecked),
            ];
            let during = PeakRss::start(tracer.pid())?;
            let (listing, listing_time) =
                measure::http_get(addr, "/api/sockets?state=ESTABLISHED&limit=10000000")?;
            let rss_during_listing = during.stop();
            // Counted without building a million JSON values.
            let listed = serde_json::from_str::<Vec<serde::de::IgnoredAny>>(&listing)?.len();
            let listing_bytes = listing.len();
            drop(listing);
            let rss_after_listing = measure::memory(tracer.pid())?.1;
            let parallel = if points.is_empty() {
                eprintln!("bench: scale run: 64 clients reading the full listing at once");
                Some(parallel_listings(addr, tracer.pid(), 64)?)
            } else {
                None
            };
            points.push(ScalePoint {
                connections: holders.held,
                tracked,
                rss: rss_steady,
                rss_reconciling,
                per_socket: (rss_steady.saturating_sub(idle_rss)) as f64 / tracked.max(1) as f64,
                metrics: metrics_times[2],
                listing: listing_time,
                listed,
                listing_bytes,
                rss_during_listing,
                rss_after_listing,
                kernel_map,
                parallel,
                stall_check,
            });
        }
        unchecked.stop()?;
        eprintln!("bench: scale run: a storm beside {} held connections", holders.held);
        let full = self.storm_beside(&tracer, 2 * holders.held)?;
        let closing = close_all(addr, holders)?;
        tracer.stop()?;
        Ok(ScaleRun { points, storms: [empty, full], kernel_slots, closing })
    }

    /// A storm of `--seconds` under the scale run's daemon, `held_sockets` held meanwhile.
    fn storm_beside(&self, tracer: &Tracer, held_sockets: usize) -> anyhow::Result<ScaleStorm> {
        let pid = tracer.pid();
        let cpu_before = measure::cpu_seconds(pid)?;
        let prog_before = tracer.prog_stats()?;
        let firings_before = tracer.firings()?;
        let peak = PeakRss::start(pid)?;
        let (connections, seconds) = self.run_storm(self.args.seconds, 0)?;
        let firings = tracer.settled_firings()? - firings_before;
        let rss_peak = peak.stop();
        let (main, _) = deltas(tracer.prog_stats()?, prog_before);
        let cpu = measure::cpu_seconds(pid)? - cpu_before;
        Ok(ScaleStorm {
            held_sockets,
            rate: connections as f64 / seconds,
            firings,
            ns_per_call: main.run_time_ns as f64 / main.run_cnt.max(1) as f64,
            cpu_per_million: cpu / (firings.max(1) as f64 / 1e6),
            rss_peak,
        })
    }

    /// 5,000 connections (10,000 sockets) held under a daemon whose table holds 1,000: the
    /// correction counter and the untracked count over 30 s once it settled (the table never
    /// evicts, so there is no eviction counter), and its gauge beside `ss`.
    pub(super) fn saturation(&self) -> anyhow::Result<Saturation> {
        const CONNECTIONS: usize = 5_000;
        const MAX_SOCKETS: usize = 1_000;
        const WATCHED: Duration = Duration::from_secs(30);
        fresh_namespace()?;
        let mut holders = Holders::new();
        holders.hold(self, CONNECTIONS)?;
        // One holder process, one port: the gauge of that port against `ss` for it.
        let port = (STORM_PORT + 1).to_string();
        let max = MAX_SOCKETS.to_string();
        let (tracer, addr) = self.daemon(&[
            "--max-sockets",
            &max,
            "--reconcile-interval",
            "1",
            "--port-label",
            &port,
        ])?;
        // Two reconciliations: the first pass has filled the table and the gauges.
        thread::sleep(Duration::from_secs(3));
        let read = |name: &str| -> anyhow::Result<f64> {
            let (metrics, _) = measure::http_get(addr, "/metrics")?;
            Ok(measure::metric(&metrics, name, &[]))
        };
        let untracked = read("tcpstate_table_untracked_sockets")?;
        let corrections = read("tcpstate_reconcile_corrections_total")?;
        eprintln!("bench: saturation: watching the counters for {} s", WATCHED.as_secs());
        thread::sleep(WATCHED);
        let (metrics, _) = measure::http_get(addr, "/metrics")?;
        // `--port-label` labels by local port: the accepted ends, one per connection.
        let filter = format!("sport = :{port}");
        let ss = Command::new("ip")
            .args(["netns", "exec", NETNS, "ss", "-Htn", "state", "established", &filter])
            .output()?;
        let ss = String::from_utf8_lossy(&ss.stdout).lines().count();
        let port_label = format!("port=\"{port}\"");
        let established = ["state=\"ESTABLISHED\"", port_label.as_str()];
        let outcome = Saturation {
            sockets: 2 * holders.held,
            max_sockets: MAX_SOCKETS,
            watched: WATCHED,
            untracked: (
                untracked,
                measure::metric(&metrics, "tcpstate_table_untracked_sockets", &[]),
            ),
            corrections: (
                corrections,
                measure::metric(&metrics, "tcpstate_reconcile_corrections_total", &[]),
            ),
            saturated: measure::metric(&metrics, "tcpstate_table_saturated", &[]),
            gauge: measure::metric(&metrics, "tcpstate_sockets", &established),
            ss,
        };
        drop(holders);
        tracer.stop()?;
        Ok(outcome)
    }
}

/// Closes every held connection and waits until the daemon tracks them no more: the
/// ESTABLISHED stays the histogram gained, against the two per connection (and two per
/// scrape of this wait) that ended, and the map's untracked sightings meanwhile.
fn close_all(addr: SocketAddr, holders: Holders) -> anyhow::Result<ClosedStays> {
    const STAYS: &str = "tcpstate_state_duration_seconds_count";
    const ESTABLISHED: &str = r#"state="ESTABLISHED""#;
    const SIGHTINGS: &str = "tcpstate_kernel_untracked_sightings_total";
    let cause = |text: &str, cause: &str| {
        measure::metric(text, SIGHTINGS, &[&format!("cause=\"{cause}\"")]) as u64
    };
    let (before, _) = measure::http_get(addr, "/metrics")?;
    let sockets = 2 * holders.held;
    drop(holders);
    // Each scrape's own connection ends its ESTABLISHED stay after the scrape was rendered.
    let mut scrapes = 1;
    let mut last = f64::MAX;
    let after = loop {
        thread::sleep(Duration::from_secs(1));
        let Ok((after, _)) = measure::http_get(addr, "/metrics") else { continue };
        scrapes += 1;
        let tracked = measure::metric(&after, "tcpstate_tracked_sockets", &[]);
        if (tracked < 1_000.0 && tracked == last) || scrapes > 120 {
            break after;
        }
        last = tracked;
    };
    Ok(ClosedStays {
        sockets,
        expected: sockets as u64 + 2 * (scrapes - 1),
        counted: (measure::metric(&after, STAYS, &[ESTABLISHED])
            - measure::metric(&before, STAYS, &[ESTABLISHED])) as u64,
        evicted: cause(&after, "evicted") - cause(&before, "evicted"),
        older_than_daemon: cause(&after, "older_than_daemon") - cause(&before, "older_than_daemon"),
        unknown: cause(&after, "unknown") - cause(&before, "unknown"),
        lost: (measure::metric(&after, "tcpstate_events_lost_total", &[])
            - measure::metric(&before, "tcpstate_events_lost_total", &[])) as u64,
    })
}

/// `clients` threads read the full listing at once, each retrying after a 503 until served,
/// while the daemon's RSS is sampled; then how long its memory takes to come back.
fn parallel_listings(
    addr: SocketAddr,
    pid: u32,
    clients: usize,
) -> anyhow::Result<ParallelListings> {
    let rss_before = measure::memory(pid)?.1;
    let peak = PeakRss::start(pid)?;
    let started = Instant::now();
    let readers: Vec<_> = (0..clients)
        .map(|_| {
            thread::spawn(move || -> anyhow::Result<usize> {
                let mut retried = 0;
                loop {
                    match measure::http_status(addr, "/api/sockets?limit=10000000")? {
                        200 => return Ok(retried),
                        503 => retried += 1,
                        other => bail!("/api/sockets answered {other}"),
                    }
                    thread::sleep(Duration::from_secs(1));
                }
            })
        })
        .collect();
    let mut retried = 0;
    let mut served = 0;
    for reader in readers {
        retried += reader.join().expect("a reader thread")?;
        served += 1;
    }
    let took = started.elapsed();
    let rss_peak = peak.stop();
    let settling = Instant::now();
    let rss_after = loop {
        let rss = measure::memory(pid)?.1;
        if rss <= rss_before + rss_before / 10 || settling.elapsed() >= Duration::from_secs(60) {
            break rss;
        }
        thread::sleep(Duration::from_secs(1));
    };
    Ok(ParallelListings {
        clients,
        served,
        retried,
        took,
        rss_before,
        rss_peak,
        rss_after,
        settled_after: settling.elapsed(),
    })
}
