//! The diagnoses, one module each: who leaks CLOSE_WAIT sockets, which listener stopped
//! accepting, where connects fail and segments are sent again, how long handshakes take, which
//! destinations use up the ephemeral ports, what closed connections carried and which
//! destinations churn through short ones, which sockets stopped moving data. Each implements the core's `Diagnosis`: it declares
//! what it consumes, keeps its own state, and writes its own metric families, API sections and
//! findings. Adding one is a module here and a line in [`all`].

mod close_wait;
mod closed_connections;
mod ephemeral_ports;
mod failures;
mod handshakes;
mod listen_queues;
mod retransmits;
mod stalled_sockets;

use std::sync::Arc;

pub(crate) use self::{
    closed_connections::ChurnThresholds, failures::WINDOW_SECONDS as DESTINATION_WINDOW_SECONDS,
};
use super::{
    Config,
    core::{Diagnoses, Diagnosis, PortLabels},
};
use crate::probe::KernelSockets;

/// Every diagnosis, configured, in the order their families appear in `/metrics`.
/// `kernel_sockets`: the kernel's per-socket map, where the accept hook fills it with owners.
pub(crate) fn all(
    config: &Config,
    labels: &PortLabels,
    kernel_sockets: Option<Arc<KernelSockets>>,
) -> Diagnoses {
    let listen_queues =
        listen_queues::ListenQueues::new(config.listen_queue_threshold, config.cmdline);
    with(config, labels, kernel_sockets, retransmits::Retransmits::default(), listen_queues)
}

/// `all`, with the diagnoses fed by the kernel and the listener dumps given.
fn with(
    config: &Config,
    labels: &PortLabels,
    kernel_sockets: Option<Arc<KernelSockets>>,
    retransmits: retransmits::Retransmits,
    listen_queues: listen_queues::ListenQueues,
) -> Diagnoses {
    Diagnoses::new(vec![
        Arc::new(failures::Failures::new(labels)) as Arc<dyn Diagnosis>,
        Arc::new(retransmits),
        Arc::new(handshakes::Handshakes::new(labels)),
        Arc::new(closed_connections::ClosedConnections::new(labels, config.churn, config.cmdline)),
        Arc::new(ephemeral_ports::EphemeralPorts::default()),
        Arc::new(listen_queues),
        Arc::new(close_wait::CloseWaitLeaks::new(
            config.close_wait_threshold,
            config.cmdline,
            config.group_by,
            kernel_sockets,
        )),
        Arc::new(stalled_sockets::StalledSockets::new(
            config.stall_threshold,
            config.cmdline,
            config.group_by,
        )),
    ])
}

#[cfg(test)]
pub(crate) mod tests {
    use tracer_common::TcpState as S;

    use super::*;
    use crate::{daemon::core::PortLabels, probe, sockdiag::ListenQueue};

    /// Every diagnosis, as `run` configures them by default, after known kernel counts and
    /// listener dumps at `at_ns`: four segments sent again to one destination, two SYN
    /// retries, three data retransmits and a SYN-ACK; a listener whose queue is full (8 + 1
    /// waiting), and the drops that cost.
    pub(crate) fn after_known_inputs(at_ns: u64) -> Diagnoses {
        let mut counts = tracer_common::settings::RetransmitCounts::default();
        counts.by_state[usize::from(S::SYN_SENT.number())] = 2;
        counts.by_state[usize::from(S::ESTABLISHED.number())] = 3;
        counts.synack = 1;
        let retransmits = retransmits::Retransmits::known(
            probe::Retransmits { by_label: vec![counts], missed: 0 },
            at_ns,
            vec![(([10, 0, 0, 9], 5432).into(), 4)],
        );
        let full = listen_queues::Listener {
            netns: 4026531840,
            queue: ListenQueue {
                local: ([10, 0, 0, 1], 8080).into(),
                length: 9,
                limit: 8,
                inode: 0,
            },
        };
        let listen_queues = listen_queues::ListenQueues::known(listen_queues::ListenerReport {
            top: vec![full],
            rest_length: 0,
            rest_limit: 4096,
            dropped: vec![(4026531840, 31, 31)],
            ..Default::default()
        });
        let parsed = <crate::cli::Cli as clap::Parser>::parse_from(["tcpstate", "run"]);
        let crate::cli::Command::Run(args) = parsed.command else { unreachable!("parsed run") };
        let config = args.config();
        with(&config, &PortLabels::none(), None, retransmits, listen_queues)
    }
}
