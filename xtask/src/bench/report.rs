//! The bench's report: the Markdown table of every configuration's medians, which replaces
//! the current one in BENCHMARKS.md, and each run's full output under `target/bench/`.

use std::{fmt::Write as _, io::Write as _, path::Path, thread, time::Duration};

use super::scale::{RECONCILE_INTERVAL, RSS_SAMPLE_EVERY, RSS_WINDOW, Saturation, ScaleRun};
use super::{
    BenchArgs, Config, Outcome,
    measure::ProgStats,
    profile::{Part, Profile},
    retransmits::{RetransmitCost, SYN_RETRIES},
};
use crate::benchmarks_md::{commit, machine, record_section};

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Median in-kernel time per run of one program, over the runs where it ran.
fn per_call(runs: &[&Outcome], stats: &dyn Fn(&Outcome) -> ProgStats) -> Option<f64> {
    let mut ns: Vec<f64> = runs
        .iter()
        .map(|o| stats(o))
        .filter(|s| s.run_cnt > 0)
        .map(|s| s.run_time_ns as f64 / s.run_cnt as f64)
        .collect();
    (!ns.is_empty()).then(|| median(&mut ns))
}

/// Median in-kernel time of all the tracer's programs per tracepoint firing.
fn per_transition(runs: &[&Outcome]) -> String {
    let mut ns: Vec<f64> = runs.iter().filter_map(|o| o.in_kernel_ns_per_transition()).collect();
    if ns.is_empty() { "–".to_owned() } else { format!("{:.0}", median(&mut ns)) }
}

/// What each configuration costs the storm per tracepoint firing, all CPUs together: the
/// storm keeps every CPU busy, so a connection takes CPUs / rate seconds of CPU, and the
/// difference to bare, spread over the connection's transitions, is what the tracer (kernel
/// and userspace) added to each.
fn cost_per_firing(rate: f64, bare: f64, per_connection: f64) -> f64 {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    (cpus / rate - cpus / bare) / per_connection * 1e9
}

/// Everything one bench run measured.
pub(super) struct Measured<'a> {
    pub per_connection: f64,
    pub outcomes: &'a [(Config, Outcome)],
    pub retransmits: &'a RetransmitCost,
    pub scale: Option<&'a ScaleRun>,
    pub saturation: &'a Saturation,
    pub profiles: &'a [(Config, Profile)],
}

pub(super) fn render(args: &BenchArgs, measured: &Measured, took: Duration) -> String {
    let Measured { per_connection, outcomes, retransmits, scale, saturation, profiles } = *measured;
    let mut out = String::new();
    render_header(&mut out, args, per_connection, took);
    let bare: Vec<f64> =
        outcomes.iter().filter(|(c, _)| *c == Config::Bare).map(|(_, o)| o.rate()).collect();
    let bare_median = median(&mut bare.clone());
    render_storms(&mut out, outcomes, bare_median);
    render_losses(&mut out, outcomes);
    render_costs(&mut out, outcomes, bare_median, per_connection);
    render_transitions(&mut out, outcomes);
    if let Some(run) = scale {
        render_scale(&mut out, run);
    }
    render_profiles(&mut out, profiles);
    render_retransmits(&mut out, retransmits, outcomes);
    render_saturation(&mut out, saturation);
    out
}

/// The storms alone, for `--only`: the main table, the losses, the costs and the profiles.
pub(super) fn render_storms_only(
    outcomes: &[(Config, Outcome)],
    per_connection: f64,
    profiles: &[(Config, Profile)],
) -> String {
    let mut out = String::new();
    let mut bare: Vec<f64> =
        outcomes.iter().filter(|(c, _)| *c == Config::Bare).map(|(_, o)| o.rate()).collect();
    let bare_median = median(&mut bare);
    render_storms(&mut out, outcomes, bare_median);
    render_losses(&mut out, outcomes);
    render_costs(&mut out, outcomes, bare_median, per_connection);
    render_profiles(&mut out, profiles);
    out
}

/// The configurations that stormed, in the table's order.
fn measured_configs(outcomes: &[(Config, Outcome)]) -> impl Iterator<Item = Config> + '_ {
    Config::ALL.into_iter().filter(|config| outcomes.iter().any(|(c, _)| c == config))
}

/// What was run, where, and how.
fn render_header(out: &mut String, args: &BenchArgs, per_connection: f64, took: Duration) {
    let _ = writeln!(out, "{CURRENT_HEADING}\n");
    let _ = writeln!(out, "- Commit: {}", commit());
    let _ = writeln!(out, "- Machine: {}", machine());
    let _ = writeln!(
        out,
        "- Command: `cargo xtask bench --rounds {} --seconds {} --clients {} --hold {}{}` (took {:.0} s)",
        args.rounds,
        args.seconds,
        args.clients,
        args.hold,
        match (&args.baseline, &args.baseline_label) {
            (None, _) => String::new(),
            (Some(_), Some(label)) => format!(" --baseline TCPSTATE --baseline-label '{label}'"),
            (Some(path), None) => format!(" --baseline {}", path.display()),
        },
        took.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "- Storm: loopback, in a fresh network namespace per run, client closes first, {} client \
         threads spread over 62,500 source addresses; {per_connection:.2} transitions per \
         connection, measured at 1,000 connections/s. Medians over {} rounds, (min–max).\n",
        args.clients, args.rounds
    );
}

/// The main table: each configuration's storm rate, delivery, losses and cost.
fn render_storms(out: &mut String, outcomes: &[(Config, Outcome)], bare_median: f64) {
    let _ = writeln!(
        out,
        "| configuration | connections/s | vs bare | tracer CPU s per M transitions | \
         transitions (tracepoint firings) | delivered | lost | lost, as the tool counts it \
         (buffer / map / recursion) | in-kernel ns per call: main (standby) | in-kernel ns per \
         transition | peak RSS |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for config in measured_configs(outcomes) {
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
        let firings: u64 = runs.iter().map(|o| o.firings).sum();
        if config.is_floor() {
            let _ = writeln!(
                out,
                "| {} | {rate:.0} ({min:.0}–{max:.0}) | {:.2} | – | {firings} | – | – | – | {} | {} | – |",
                config.label(),
                rate / bare_median,
                per_call(&runs, &|o| o.prog)
                    .map_or_else(|| "–".to_owned(), |ns| format!("{ns:.0}")),
                per_transition(&runs),
            );
            continue;
        }
        let mut cpu: Vec<f64> =
            runs.iter().map(|o| o.tracer_cpu / (o.delivered.max(1) as f64 / 1e6)).collect();
        let delivered: u64 = runs.iter().map(|o| o.delivered).sum();
        let lost = firings.saturating_sub(delivered);
        let buffer: u64 = runs.iter().map(|o| o.lost_buffer).sum();
        let map = runs.iter().map(|o| o.lost_map).sum::<Option<u64>>();
        let recursion: u64 = runs.iter().map(|o| o.lost_recursion).sum();
        let main_ns = per_call(&runs, &|o| o.prog);
        let standby_ns = per_call(&runs, &|o| o.standby);
        let calls = match (main_ns, standby_ns) {
            (Some(m), Some(s)) => format!("{m:.0} ({s:.0})"),
            (Some(m), None) => format!("{m:.0}"),
            _ => "–".to_owned(),
        };
        let per_transition = per_transition(&runs);
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
}

/// Every storm of every tracer, its losses by the cause the tool counted them under: a loss
/// in one storm of five shows which cause it was, and what no cause accounts for.
fn render_losses(out: &mut String, outcomes: &[(Config, Outcome)]) {
    let _ = writeln!(
        out,
        "\nLosses by storm (firings minus delivered; the tool's own counts by cause; \
         \"unaccounted\" is what none of them covers):\n\n\
         | configuration | storm | firings | lost | ring buffer full | map | recursion | unaccounted |\n\
         |---|---|---|---|---|---|---|---|"
    );
    let mut storms: std::collections::BTreeMap<&str, usize> = Default::default();
    for (config, o) in outcomes.iter().filter(|(c, _)| *c != Config::Bare && !c.is_floor()) {
        let storm = storms.entry(config.label()).or_default();
        *storm += 1;
        let lost = o.firings.saturating_sub(o.delivered);
        let counted = o.lost_buffer + o.lost_map.unwrap_or(0) + o.lost_recursion;
        let _ = writeln!(
            out,
            "| {} | {storm} | {} | {lost} | {} | {} | {} | {} |",
            config.label(),
            o.firings,
            o.lost_buffer,
            o.lost_map.map_or_else(|| "–".to_owned(), |m| m.to_string()),
            o.lost_recursion,
            lost.saturating_sub(counted),
        );
    }
}

/// The cost per firing each configuration adds to bare, from the storm rates.
fn render_costs(
    out: &mut String,
    outcomes: &[(Config, Outcome)],
    bare_median: f64,
    per_connection: f64,
) {
    let costs: Vec<String> = measured_configs(outcomes)
        .filter(|c| *c != Config::Bare)
        .map(|config| {
            let mut rates: Vec<f64> =
                outcomes.iter().filter(|(c, _)| *c == config).map(|(_, o)| o.rate()).collect();
            let ns = cost_per_firing(median(&mut rates), bare_median, per_connection);
            format!("{} {ns:.0} ns", config.label())
        })
        .collect();
    let _ = writeln!(
        out,
        "\nCost per firing, from the storm rates (every CPU busy, so a connection takes CPUs / \
         rate of CPU time; the difference to bare over its {per_connection:.2} transitions): {}. \
         The empty program's is the kernel's own part, which no program on this tracepoint \
         avoids; the bare record's is the least a tracer pays that sends every transition to \
         userspace.",
        costs.join(", ")
    );
}

/// What the table's transition counts cover.
fn render_transitions(out: &mut String, outcomes: &[(Config, Outcome)]) {
    let connections: u64 = outcomes.iter().map(|(_, o)| o.connections).sum();
    let storm: u64 = outcomes
        .iter()
        .filter(|(c, _)| *c != Config::Bare)
        .map(|(_, o)| o.expected + o.expected_extra)
        .sum();
    let fired: u64 = outcomes.iter().map(|(_, o)| o.firings).sum();
    // What the figures say, whichever way they fall: more firings than the storms made is
    // other traffic; fewer is the storms' own estimate running over (it counts transitions
    // per connection from a calibration run).
    let accounting = if storm <= fired {
        format!(
            "the storms' {connections} connections account for {storm} of the {fired} under \
             tracers, and {} came from other traffic on the host",
            fired - storm
        )
    } else {
        format!(
            "the storms' {connections} connections were expected to make {storm}, {} more than \
             the {fired} that fired under tracers (the expectation counts transitions per \
             connection from a calibration run)",
            storm - fired
        )
    };
    let _ = writeln!(
        out,
        "\nTransitions: every firing of the tracepoint while the tracer was attached (its main \
         program's runs plus the runs the kernel skipped); {accounting}. Delivered: what the \
         tracer output (`watch`, `tcpstates`: lines, counted through a pipe; `run`: \
         `tcpstate_events_total`). Lost: firings minus delivered; counted: what the tool itself \
         reports (`tcpstates`: its \"lost N events\" lines and the kernel's recursion_misses for \
         its program). In-kernel time: `run_time_ns / run_cnt` with kernel.bpf_stats_enabled=1, \
         whose own overhead is most of the empty program's time per call; per transition: all \
         the tracer's programs' time over the firings."
    );
}

/// The scale run: memory and endpoints with connections held, the storm beside them, and the
/// closing check.
fn render_scale(out: &mut String, run: &ScaleRun) {
    let points = &run.points;
    let _ = writeln!(
        out,
        "\nScale run, `tcpstate run --group-by container --reconcile-interval {}` with connections held open (both ends on this host, so two sockets each; `/metrics` passes over the whole table to group it), the kernel map sized by the daemon at start ({} slots: no `--kernel-sockets`, as a user runs it). Daemon RSS: the lowest and the highest sampled every {} ms over {} s, which holds one reconciliation (a sock_diag dump of every socket, indexed); per tracked socket from the lowest; during the listing, the highest sampled every 10 ms while it streamed:\n",
        RECONCILE_INTERVAL.as_secs(),
        run.kernel_slots,
        RSS_SAMPLE_EVERY.as_millis(),
        RSS_WINDOW.as_secs(),
    );
    let _ = writeln!(
        out,
        "| connections | tracked sockets | daemon RSS | while reconciling | per tracked socket | `/metrics` (median of 5) | `/api/sockets?state=ESTABLISHED` | RSS during that listing | RSS after it | kernel per-socket map |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} B | {:.1} ms | {:.0} ms ({} sockets, {:.1} MiB) | {} | {} | {} |",
            p.connections,
            p.tracked,
            mib(p.rss),
            mib(p.rss_reconciling),
            p.per_socket,
            p.metrics.as_secs_f64() * 1e3,
            p.listing.as_secs_f64() * 1e3,
            p.listed,
            p.listing_bytes as f64 / (1 << 20) as f64,
            mib(p.rss_during_listing),
            mib(p.rss_after_listing),
            mib(p.kernel_map),
        );
    }
    let _ = writeln!(
        out,
        "\nWhat the stall check costs a reconciliation: a second daemon with the same flags and \
         `--stall-threshold 0` (its dumps ask no `tcp_info` of ESTABLISHED sockets) ran beside \
         over the same held sockets; the last reconciliation's time \
         (`tcpstate_reconcile_duration_seconds`, the two daemons' reconciliations competing for \
         the CPUs) and the highest RSS over the same window:\n\n\
         | connections | tracked sockets | with the stall check: reconciliation | highest RSS | \
         without (`--stall-threshold 0`): reconciliation | highest RSS |\n\
         |---|---|---|---|---|---|"
    );
    for p in points {
        let [(with, with_rss), (without, without_rss)] = p.stall_check;
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} s | {} | {:.2} s | {} |",
            p.connections,
            p.tracked,
            with.as_secs_f64(),
            mib(with_rss),
            without.as_secs_f64(),
            mib(without_rss),
        );
    }
    for (p, parallel) in points.iter().filter_map(|p| Some((p, p.parallel.as_ref()?))) {
        let _ = writeln!(
            out,
            "\n{} clients reading the full `/api/sockets` at once with {} tracked sockets: \
             all {} served in {:.1} s ({} answers were 503 and retried a second later); \
             daemon RSS {} before, peak {} (+{}), {} {:.0} s after the last answer.",
            parallel.clients,
            p.tracked,
            parallel.served,
            parallel.took.as_secs_f64(),
            parallel.retried,
            mib(parallel.rss_before),
            mib(parallel.rss_peak),
            mib(parallel.rss_peak.saturating_sub(parallel.rss_before)),
            mib(parallel.rss_after),
            parallel.settled_after.as_secs_f64(),
        );
    }
    let _ = writeln!(
        out,
        "\nThe storm under the same daemon, `--seconds` each, with nothing held and with every \
         connection above held (the kernel map full of live entries, which the storm's \
         sockets evict; the daemon's CPU includes its reconciliations every {} s):\n\n\
         | sockets held | connections/s | firings | in-kernel ns per call | daemon CPU s per M firings | daemon peak RSS |\n\
         |---|---|---|---|---|---|",
        RECONCILE_INTERVAL.as_secs(),
    );
    for storm in &run.storms {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {:.0} | {:.2} | {} |",
            storm.held_sockets,
            storm.rate,
            storm.firings,
            storm.ns_per_call,
            storm.cpu_per_million,
            mib(storm.rss_peak),
        );
    }
    let c = &run.closing;
    let _ = writeln!(
        out,
        "\nEvery held connection then closed ({} sockets against {} kernel map slots): the \
         ESTABLISHED stay histogram gained {} of the {} stays that ended (two per \
         connection, two per scrape meanwhile); transitions the kernel's map no longer \
         held: {} evicted (stays taken from the daemon's table), {} older than the \
         daemon, {} unknown; transitions lost meanwhile (`tcpstate_events_lost_total`): {}.",
        c.sockets,
        run.kernel_slots,
        c.counted,
        c.expected,
        c.evicted,
        c.older_than_daemon,
        c.unknown,
        c.lost,
    );
}

/// What the retransmit counters counted against the kernel's own counts.
fn render_retransmits(out: &mut String, r: &RetransmitCost, outcomes: &[(Config, Outcome)]) {
    let _ = writeln!(
        out,
        "\nRetransmits: {} connects to an address whose packets are lost, with \
         `tcp_syn_retries={SYN_RETRIES}`: the namespace counted {} SYNs sent again \
         (`TCPSynRetrans`, which counts those the kernel failed to send too); `tcpstate run` \
         counted {} by state, {} failed to send, and {} under the destination; the retransmit \
         programs ran {} times at {:.0} ns per call in the kernel. In the `tcpstate run` storms \
         above they ran {} times in all (the storm's own retransmits), and their runs are not \
         counted as transitions.",
        r.sockets,
        r.kernel,
        r.by_state,
        r.failed,
        r.by_destination,
        r.prog.run_cnt,
        r.ns_per_call(),
        outcomes
            .iter()
            .filter(|(c, _)| *c == Config::Daemon)
            .map(|(_, o)| o.retransmit_runs)
            .sum::<u64>(),
    );
}

/// The saturated table's check.
fn render_saturation(out: &mut String, s: &Saturation) {
    let _ = writeln!(
        out,
        "\nSaturated table: {} steady sockets against `--max-sockets {}`, reconciled every \
         second, watched for {} s after two passes: untracked sockets {} -> {}, reconcile \
         corrections {} -> {}, `tcpstate_table_saturated` {}; ESTABLISHED on the held port: \
         gauge {}, `ss` {}.",
        s.sockets,
        s.max_sockets,
        s.watched.as_secs(),
        s.untracked.0,
        s.untracked.1,
        s.corrections.0,
        s.corrections.1,
        s.saturated,
        s.gauge,
        s.ss,
    );
}

/// The profiles side by side: each part's in-kernel ns per transition, and the difference
/// of the second to the first.
pub(super) fn render_profiles(out: &mut String, profiles: &[(Config, Profile)]) {
    if profiles.is_empty() {
        return;
    }
    let samples: Vec<String> = profiles.iter().map(|(_, p)| p.total().to_string()).collect();
    let _ = writeln!(
        out,
        "\nWhere the in-kernel time per transition goes: one more storm each under `perf record \
         -a -g` ({} samples inside the programs), each sample put on the kernel function the \
         program was calling (or on its own instructions), the shares scaled to that storm's \
         in-kernel ns per transition:\n",
        samples.join(" and ")
    );
    let difference = profiles.len() == 2;
    let mut header = String::from("| part |");
    for (config, _) in profiles {
        let _ = write!(header, " {} |", config.label());
    }
    let _ = writeln!(out, "{header}{}", if difference { " difference |" } else { "" });
    let _ = writeln!(out, "|---|{}", "---|".repeat(profiles.len() + usize::from(difference)));
    let row = |out: &mut String, label: &str, ns: &dyn Fn(&Profile) -> f64| {
        let values: Vec<f64> = profiles.iter().map(|(_, p)| ns(p)).collect();
        if values.iter().all(|v| *v == 0.0) {
            return;
        }
        let _ = write!(out, "| {label} |");
        for value in &values {
            let _ = write!(out, " {value:.0} |");
        }
        if difference {
            let _ = write!(out, " {:+.0} |", values[1] - values[0]);
        }
        out.push('\n');
    };
    for part in Part::ALL {
        row(out, part.label(), &|p| p.ns(part));
    }
    row(out, "all", &|p| p.ns_per_transition);
}

/// The bench's section of BENCHMARKS.md; the method above it is written by hand.
const CURRENT_HEADING: &str = "## Current figures";

/// Replaces the current table of BENCHMARKS.md with `report`, keeping the method above it
/// and the other tools' sections.
pub(super) fn record(path: &Path, report: &str) -> anyhow::Result<()> {
    record_section(path, CURRENT_HEADING, report)
}

/// Keeps this run's whole output (the per-round log and the report) with the environment it
/// ran in, as `target/bench/<unix time>.md`; returns the file's path.
pub(super) fn keep_run(root: &Path, log: &str, report: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let path = dir.join(format!("{started}.md"));
    let mut file = std::fs::File::create(&path)?;
    writeln!(file, "# cargo xtask bench, unix time {started}\n")?;
    writeln!(file, "- Machine: {}", machine())?;
    writeln!(file, "- Arguments: `{}`\n", std::env::args().collect::<Vec<_>>().join(" "))?;
    writeln!(file, "## Log\n\n```\n{log}```\n\n{report}")?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tracer's storms are numbered and their losses split by cause, with what no
    /// cause covers; bare and the floors have no row.
    #[test]
    fn losses_are_shown_per_storm_by_cause() {
        let storm = |firings, delivered, buffer, recursion| Outcome {
            firings,
            delivered,
            lost_buffer: buffer,
            lost_recursion: recursion,
            ..Outcome::default()
        };
        let outcomes = [
            (Config::Bare, storm(0, 0, 0, 0)),
            (Config::Daemon, storm(1000, 1000, 0, 0)),
            (Config::Daemon, storm(1000, 900, 60, 30)),
        ];
        let mut out = String::new();
        render_losses(&mut out, &outcomes);
        let label = Config::Daemon.label();
        assert!(out.contains(&format!("| {label} | 1 | 1000 | 0 | 0 | – | 0 | 0 |")), "{out}");
        assert!(out.contains(&format!("| {label} | 2 | 1000 | 100 | 60 | – | 30 | 10 |")), "{out}");
        assert!(!out.contains(Config::Bare.label()), "{out}");
    }
}
