//! What a retransmit costs: `tcpstate run` attached while connects inside the benchmark's
//! namespace retry their SYNs to an address whose packets are lost. The storm has few
//! retransmits, if any, so its figures do not show the retransmit programs' cost.

use std::{net::SocketAddr, process::Command, thread, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    measure::{self, ProgStats},
    run::{Bench, NETNS, fresh_namespace},
    tracers::wait_for,
};

/// Connects whose SYNs are lost: each retries `SYN_RETRIES` times, then gives up.
const SOCKETS: usize = 3000;
pub(super) const SYN_RETRIES: u64 = 2;
/// Nothing answers it: a permanent neighbour entry sends its packets to a link-layer address
/// nobody has, and the veth peer drops them, as loss on a wire does.
const NOWHERE: &str = "10.250.0.3";
const PORT: u16 = 80;

/// The retransmit run's figures.
pub(super) struct RetransmitCost {
    pub sockets: usize,
    /// The namespace's own count of the SYNs sent again (`TcpExtTCPSynRetrans`).
    pub kernel: u64,
    /// What `tcpstate run` counted: by state (SYN_SENT), those the kernel failed to send
    /// (counted in `TCPSynRetrans` too), and under the destination.
    pub by_state: u64,
    pub failed: u64,
    pub by_destination: u64,
    /// Both retransmit programs' runs.
    pub prog: ProgStats,
}

impl RetransmitCost {
    pub(super) fn ns_per_call(&self) -> f64 {
        self.prog.run_time_ns as f64 / self.prog.run_cnt.max(1) as f64
    }
}

fn in_namespace(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip").args(["-n", NETNS]).args(args).status()?;
    if !status.success() {
        bail!("ip -n {NETNS} {args:?} failed");
    }
    Ok(())
}

/// `TcpExt: TCPSynRetrans` of the benchmark's namespace.
fn syn_retransmits() -> anyhow::Result<u64> {
    let output = Command::new("ip")
        .args(["netns", "exec", NETNS, "cat", "/proc/net/netstat"])
        .output()
        .context("reading the namespace's netstat")?;
    let text = String::from_utf8(output.stdout)?;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines[..] else { bail!("no TcpExt lines in the namespace's netstat") };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "TCPSynRetrans")
        .and_then(|(_, value)| value.parse().ok())
        .context("no TCPSynRetrans in the namespace's netstat")
}

impl Bench<'_> {
    pub(super) fn retransmit_cost(&self) -> anyhow::Result<RetransmitCost> {
        fresh_namespace()?;
        in_namespace(&["link", "add", "rtx-a", "type", "veth", "peer", "name", "rtx-b"])?;
        in_namespace(&["link", "set", "rtx-a", "up"])?;
        in_namespace(&["link", "set", "rtx-b", "up"])?;
        in_namespace(&["addr", "add", "10.250.0.1/24", "dev", "rtx-a"])?;
        in_namespace(&["neigh", "add", NOWHERE, "lladdr", "02:00:00:00:00:03", "dev", "rtx-a"])?;
        let retries = format!("net.ipv4.tcp_syn_retries={SYN_RETRIES}");
        let status = Command::new("ip")
            .args(["netns", "exec", NETNS, "sysctl", "-q", "-w", &retries])
            .status()?;
        if !status.success() {
            bail!("sysctl {retries} in {NETNS} failed");
        }

        let (tracer, addr) = self.daemon(&[])?;
        let metric = |text: &str, name: &str, labels: &[&str]| measure::metric(text, name, labels);
        let (before, _) = measure::http_get(addr, "/metrics")?;
        let prog_before = tracer.prog_stats_named("tcp_retransmit_")?;
        let kernel_before = syn_retransmits()?;
        let to = SocketAddr::from(([10, 250, 0, 3], PORT)).to_string();
        let output = self
            .loadgen()
            .args(["syn-retries", "--sockets", &SOCKETS.to_string(), "--to", &to])
            .output()
            .context("running the load generator")?;
        if !output.status.success() {
            bail!("load generator failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let kernel = syn_retransmits()? - kernel_before;
        // The daemon reads the destinations every 5 s.
        let destination = [format!("daddr=\"{NOWHERE}\""), format!("dport=\"{PORT}\"")];
        let destination: Vec<&str> = destination.iter().map(String::as_str).collect();
        let mut after = String::new();
        let listed =
            |after: &str| metric(after, "tcpstate_retransmits_by_destination", &destination) as u64;
        let change = |after: &str, name: &str, labels: &[&str]| {
            (metric(after, name, labels) - metric(&before, name, labels)) as u64
        };
        let state = ["state=\"SYN_SENT\""];
        wait_for("the retransmits by destination", Duration::from_secs(20), || {
            after = measure::http_get(addr, "/metrics").map(|(text, _)| text).unwrap_or_default();
            listed(&after) >= change(&after, "tcpstate_retransmits_total", &state).max(1)
        })
        .with_context(|| {
            format!(
                "the namespace sent {kernel} SYNs again, tcpstate counted {}, {} are listed",
                change(&after, "tcpstate_retransmits_total", &state),
                listed(&after)
            )
        })?;
        let prog = prog_before.delta_to(tracer.prog_stats_named("tcp_retransmit_")?);
        thread::sleep(Duration::from_millis(100));
        tracer.stop()?;
        Ok(RetransmitCost {
            sockets: SOCKETS,
            kernel,
            by_state: change(&after, "tcpstate_retransmits_total", &state),
            failed: change(&after, "tcpstate_retransmits_failed_total", &[]),
            by_destination: listed(&after),
            prog,
        })
    }
}
