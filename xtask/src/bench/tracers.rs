//! The tracers under test as child processes: started, waited for, their output counted,
//! their kernel programs' statistics read.

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::measure::{self, ProgStats};

/// A tracer process under test, its output counted line by line.
pub(super) struct Tracer {
    pub(super) child: Child,
    pub(super) lines: Arc<AtomicU64>,
    /// Ends when the tracer's stdout closes: every line it wrote is counted then.
    pub(super) counter: Option<thread::JoinHandle<()>>,
    pub(super) stderr: Arc<Mutex<Vec<String>>>,
    pub(super) programs: HashSet<u64>,
}

pub(super) fn counted_lines(
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

pub(super) fn collected_lines(
    stream: impl std::io::Read + Send + 'static,
) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

pub(super) fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Kernel names (15 characters at most) of tcpstate's programs that are not on the state-change
/// tracepoint: their runs are no firings of it.
const ELSEWHERE: [&str; 2] = ["tcp_retransmit_", "accept_owner"];

impl Tracer {
    pub(super) fn start(
        mut command: Command,
        ready: impl Fn(&Tracer) -> bool,
    ) -> anyhow::Result<Self> {
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn stderr_contains(&self, needle: &str) -> bool {
        self.stderr_line(needle).is_some()
    }

    /// The first stderr line so far that contains `needle`.
    pub(super) fn stderr_line(&self, needle: &str) -> Option<String> {
        self.stderr.lock().unwrap().iter().find(|l| l.contains(needle)).cloned()
    }

    /// Statistics of the main program(s) and of the standby (zero when there is none), on
    /// the state-change tracepoint only.
    pub(super) fn prog_stats(&self) -> anyhow::Result<(ProgStats, ProgStats)> {
        let programs = measure::programs()?;
        let on_the_tracepoint = |id: &&u64| {
            programs
                .get(*id)
                .is_some_and(|(name, _)| !ELSEWHERE.iter().any(|p| name.starts_with(p)))
        };
        let (standby, main): (HashSet<u64>, HashSet<u64>) = self
            .programs
            .iter()
            .filter(on_the_tracepoint)
            .partition(|id| programs.get(id).is_some_and(|(name, _)| name == "standby"));
        Ok((measure::sum(&programs, &main), measure::sum(&programs, &standby)))
    }

    /// Statistics of this tracer's programs whose kernel name starts with `prefix`.
    pub(super) fn prog_stats_named(&self, prefix: &str) -> anyhow::Result<ProgStats> {
        let programs = measure::programs()?;
        let named: HashSet<u64> = self
            .programs
            .iter()
            .copied()
            .filter(|id| programs.get(id).is_some_and(|(name, _)| name.starts_with(prefix)))
            .collect();
        Ok(measure::sum(&programs, &named))
    }

    /// Times the tracepoint fired for this tracer since its programs loaded: every run of its
    /// main program plus every run the kernel skipped. The standby runs for the same firings,
    /// so it is left out.
    pub(super) fn firings(&self) -> anyhow::Result<u64> {
        let (main, _) = self.prog_stats()?;
        Ok(main.run_cnt + main.recursion_misses)
    }

    /// `firings` once a scrape's last transitions are in: a connection's final ACK can be
    /// processed after the client's `close` returned (in ksoftirqd on a busy CPU).
    pub(super) fn settled_firings(&self) -> anyhow::Result<u64> {
        let mut last = self.firings()?;
        for _ in 0..40 {
            thread::sleep(Duration::from_millis(50));
            let now = self.firings()?;
            if now == last {
                break;
            }
            last = now;
        }
        Ok(last)
    }

    /// Waits until the output stops growing: the tracer has written what it received.
    pub(super) fn settle(&self) {
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
    pub(super) fn stop(mut self) -> anyhow::Result<(Vec<String>, u64)> {
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
