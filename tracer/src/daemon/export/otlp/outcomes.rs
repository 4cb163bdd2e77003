//! What the OTLP exports did, served in `/metrics` as `tcpstate_otlp_*`.

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

use super::transport::{ExportError, Unreadable};

/// Exports landed and failed since start.
#[derive(Clone, Debug, Default)]
pub(crate) struct OtlpStatus {
    pub(crate) exports: u64,
    /// Failed exports by reason, in the order of `REASONS`.
    pub(crate) failures: [u64; ExportError::REASONS.len()],
    /// Data points receivers said they rejected in exports that landed (partial success).
    pub(crate) rejected_points: u64,
    /// Success answers that could not be read, by reason (`Unreadable::REASONS` order).
    pub(crate) unreadable_answers: [u64; Unreadable::REASONS.len()],
}

impl OtlpStatus {
    pub(crate) const REASONS: [&'static str; 7] = ExportError::REASONS;

    /// Its families, served only when the daemon exports over OTLP.
    pub(crate) fn metrics(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let family = encoder.encode_descriptor(
            "tcpstate_otlp_exports",
            "OTLP exports the receiver accepted",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.exports).encode(family)?;
        let mut family = encoder.encode_descriptor(
            "tcpstate_otlp_export_failures",
            "OTLP exports that did not land, by reason: unreachable (no connection), tls (handshake \
             failed), timeout, unauthorized (401/403: the headers' credentials), throttled (429), \
             rejected (another 4xx), server_error (5xx, or the connection broke)",
            None,
            MetricType::Counter,
        )?;
        for (reason, failures) in OtlpStatus::REASONS.iter().zip(self.failures) {
            ConstCounter::new(failures).encode(family.encode_family(&[("reason", *reason)])?)?;
        }
        let family = encoder.encode_descriptor(
            "tcpstate_otlp_rejected_points",
            "Data points the receiver accepted the export of but said it rejected (an OTLP \
             partial success)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.rejected_points).encode(family)?;
        let mut family = encoder.encode_descriptor(
            "tcpstate_otlp_unreadable_answers",
            "Success answers that were not an OTLP response, by reason: oversized (longer than \
             64 KiB; the rest was not read and the connection was closed), malformed",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in Unreadable::REASONS.iter().zip(self.unreadable_answers) {
            ConstCounter::new(count).encode(family.encode_family(&[("reason", *reason)])?)?;
        }
        Ok(())
    }
}
