//! How long handshakes take, by role: a client's from connect() to the SYN-ACK that
//! established it (its SYN_SENT stay), a server's the round trip the kernel measured from its
//! SYN-ACK to the ACK that completed it.

use std::{
    fmt,
    sync::{Mutex, PoisonError},
};

use prometheus_client::{encoding::DescriptorEncoder, metrics::MetricType};
use tracer_common::TcpState;

use crate::daemon::{
    core::{Diagnosis, PortLabels, Transition, histogram::DurationHistogram},
    export::family::{PortSeries, Scrape, histogram},
};

/// Which side of a handshake a socket took, and what its handshake time measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HandshakeRole {
    /// connect() to the SYN-ACK that established the connection, SYN retries included: the
    /// socket's SYN_SENT stay.
    Client,
    /// The SYN-ACK to the ACK that completed the handshake: the kernel's own first round-trip
    /// sample. The SYN_RECV stay cannot tell it: the kernel creates the socket only when
    /// that ACK arrives.
    Server,
}

impl HandshakeRole {
    pub(crate) const ALL: [Self; 2] = [Self::Client, Self::Server];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// Completed handshakes: [port label][role].
pub(super) struct Handshakes {
    histograms: Mutex<Vec<[DurationHistogram; 2]>>,
}

impl Handshakes {
    pub(super) fn new(labels: &PortLabels) -> Self {
        Self { histograms: Mutex::new(vec![Default::default(); labels.values()]) }
    }
}

impl Diagnosis for Handshakes {
    fn transitions(&self, batch: &[Transition]) {
        let mut histograms = self.histograms.lock().unwrap_or_else(PoisonError::into_inner);
        for Transition { record, label, stay_ns } in batch {
            let by_role = &mut histograms[*label];
            if let Some(ns) = record.server_handshake_ns() {
                by_role[HandshakeRole::Server as usize].observe(ns);
            }
            if (record.oldstate, record.newstate) == (TcpState::SYN_SENT, TcpState::ESTABLISHED)
                && let Some(ns) = stay_ns
            {
                by_role[HandshakeRole::Client as usize].observe(*ns);
            }
        }
    }

    fn metrics(&self, encoder: &mut DescriptorEncoder, scrape: &Scrape) -> fmt::Result {
        let histograms = self.histograms.lock().unwrap_or_else(PoisonError::into_inner);
        durations(encoder, &histograms, scrape.ports)
    }
}

fn durations(
    encoder: &mut DescriptorEncoder,
    histograms: &[[DurationHistogram; 2]],
    ports: &PortSeries,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_handshake_duration_seconds",
        "Completed TCP handshakes, by role: client, from connect() to the SYN-ACK that \
         established the connection (SYN retries included); server, from the SYN-ACK to the \
         ACK that completed it, as the kernel measured it",
        None,
        MetricType::Histogram,
    )?;
    for role in HandshakeRole::ALL {
        for label in ports.indexes() {
            let set = ports.with(&[("role", role.name().to_owned())], label);
            histogram(&mut family, &set, &histograms[label][role as usize])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tracer_common::{TcpState as S, TransitionRecord};

    use super::*;
    use crate::daemon::core::{Aggregator, tests::record};

    const A: u64 = 0xffff_8880_0000_1000;

    /// A client's handshake is its SYN_SENT stay that ended ESTABLISHED, not the one a
    /// failed connect ended; a server's is the round trip the kernel measured, not its
    /// SYN_RECV stay, and none when the kernel has no sample.
    #[test]
    fn handshakes_are_counted_by_role() {
        let mut agg = Aggregator::new(100, PortLabels::none());
        let handshakes = Handshakes::new(&PortLabels::none());
        let mut apply = |r: TransitionRecord| handshakes.transitions(&[agg.apply(r)]);
        apply(record(A, 1, S::CLOSE, S::SYN_SENT, 0));
        apply(record(A, 2, S::SYN_SENT, S::ESTABLISHED, 40000));
        apply(record(A + 64, 1, S::CLOSE, S::SYN_SENT, 0));
        apply(record(A + 64, 2, S::SYN_SENT, S::CLOSE, 40001));
        apply(record(A + 128, 1, S::LISTEN, S::SYN_RECV, 80));
        apply(TransitionRecord {
            srtt_us: 8 * 70,
            ..record(A + 128, 2, S::SYN_RECV, S::ESTABLISHED, 80)
        });
        apply(record(A + 192, 1, S::LISTEN, S::SYN_RECV, 80));
        apply(record(A + 192, 2, S::SYN_RECV, S::ESTABLISHED, 80));
        let histograms = handshakes.histograms.lock().unwrap();
        let client = &histograms[0][HandshakeRole::Client as usize];
        assert_eq!((client.count, client.sum_ns), (1, 500));
        let server = &histograms[0][HandshakeRole::Server as usize];
        assert_eq!((server.count, server.sum_ns), (1, 70_000));
        assert_eq!(agg.stays(S::SYN_SENT).count, 2, "both SYN_SENT stays are stays");
    }
}
