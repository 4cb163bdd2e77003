//! What the OTLP exports did, served in `/metrics` as `tcpstate_otlp_*`.

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

use super::transport::ExportError;

/// Exports landed and failed since start.
#[derive(Clone, Debug, Default)]
pub(crate) struct OtlpStatus {
    pub(crate) exports: u64,
    /// Failed exports by reason, in the order of `REASONS`.
    pub(crate) failures: [u64; ExportError::REASONS.len()],
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
        Ok(())
    }
}
