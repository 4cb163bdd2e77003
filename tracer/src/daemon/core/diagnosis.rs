//! The interface between the core and the diagnoses: what a diagnosis consumes, and what it
//! shows. The core calls it and never names a diagnosis; `collectors` implements it, one
//! module per diagnosis.
//!
//! Every method has a default that does nothing, so a diagnosis implements only what it uses.
//! Methods take `&self`: each diagnosis keeps its state behind its own lock, so a slow
//! evaluation (a /proc walk) never holds the socket table or another diagnosis. Lock order:
//! the core's aggregator before a diagnosis's own locks, never the other way.

use std::{fmt, sync::Arc, time::Instant};

use prometheus_client::encoding::DescriptorEncoder;

use super::{Shared, Transition};
use crate::{
    daemon::export::family::Scrape,
    leaks::LeakReport,
    netns::{NamespaceDump, NamespaceListeners},
    probe::Probe,
};

/// One diagnosis of the daemon.
pub(crate) trait Diagnosis: Send + Sync {
    /// A batch of transitions, in order, with the core's lock held: count, do no I/O.
    fn transitions(&self, _batch: &[Transition]) {}

    /// Every socket of every namespace, at seeding and at each reconciliation; called on the
    /// dump's thread (low priority, off the reader's way).
    fn sockets_dumped(&self, _dumps: &[NamespaceDump]) {}

    /// Whether the dumps should keep what a stall check needs of sockets with queued data
    /// (their `tcp_info`, which makes a dump of a busy host larger): `NamespaceDump::queued`.
    fn needs_queued_sockets(&self) -> bool {
        false
    }

    /// Every namespace's listeners, every 2 s, on a blocking thread (a /proc walk may follow).
    fn listeners_dumped(&self, _listeners: &[NamespaceListeners], _now: Instant) {}

    /// The kernel's counters, read each second and before each scrape; an error is reported
    /// in `/healthz` as the core's own are.
    fn kernel_counters(&self, _probe: &Probe, _now_ns: u64) -> Result<(), String> {
        Ok(())
    }

    /// Once a second, on a blocking thread, with the socket table to read.
    fn every_second(&self, _shared: &Shared) {}

    /// Its metric families, at each scrape.
    fn metrics(&self, _encoder: &mut DescriptorEncoder, _scrape: &Scrape) -> fmt::Result {
        Ok(())
    }

    /// Its sections of `/api/destinations`: the last minute, by destination.
    fn destinations(
        &self,
        _now_ns: u64,
        _sections: &mut serde_json::Map<String, serde_json::Value>,
    ) {
    }

    /// Its findings in the one report of what is stuck (`/api/leaks`, `tcpstate leaks`, `top`).
    fn findings(&self, _report: &mut LeakReport) {}

    /// The OTLP (UCUM) unit of each of its families whose name does not say it (`_seconds`,
    /// `_bytes` and `_ratio` do): the Prometheus name without `tcpstate_`, and the unit.
    fn units(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
}

/// The diagnoses the daemon runs, in the order their families appear in `/metrics`.
#[derive(Clone)]
pub(crate) struct Diagnoses(Arc<[Arc<dyn Diagnosis>]>);

impl Diagnoses {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &dyn Diagnosis> {
        self.0.iter().map(|diagnosis| &**diagnosis)
    }

    /// The report of everything stuck, each diagnosis adding its part.
    pub(crate) fn report(&self, report: &mut LeakReport) {
        for diagnosis in self.iter() {
            diagnosis.findings(report);
        }
    }

    /// Whether any diagnosis needs the dumps' queued sockets.
    pub(crate) fn need_queued_sockets(&self) -> bool {
        self.iter().any(Diagnosis::needs_queued_sockets)
    }

    /// The unit a diagnosis declares for the family `name` (without `tcpstate_`).
    pub(crate) fn unit(&self, name: &str) -> Option<&'static str> {
        self.iter().flat_map(Diagnosis::units).find(|(family, _)| *family == name).map(|(_, u)| *u)
    }

    /// `/api/destinations`: every diagnosis's sections, in one object.
    pub(crate) fn destinations(&self, now_ns: u64) -> serde_json::Value {
        let mut sections = serde_json::Map::new();
        for diagnosis in self.iter() {
            diagnosis.destinations(now_ns, &mut sections);
        }
        serde_json::Value::Object(sections)
    }
}

impl Diagnoses {
    pub(crate) fn new(diagnoses: Vec<Arc<dyn Diagnosis>>) -> Self {
        Self(diagnoses.into())
    }
}

impl fmt::Debug for Diagnoses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Diagnoses").field("count", &self.0.len()).finish()
    }
}
