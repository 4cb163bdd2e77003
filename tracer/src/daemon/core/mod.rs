//! The daemon's core, which knows no diagnosis: the socket table and the aggregator that keeps
//! it from the records, reconciliation with sock_diag dumps, the reader's loop that feeds the
//! diagnoses (`diagnosis` is their interface), and the core's own metric families.

mod aggregate;
mod diagnosis;
pub(crate) mod families;
pub(crate) mod gauges;
pub(crate) mod groups;
pub(crate) mod histogram;
mod kernel_map;
mod kernel_owners;
mod owner_pool;
pub(crate) mod reader_loop;
mod shared;
pub(crate) mod table;

#[cfg(test)]
pub(crate) use self::aggregate::tests;
pub(crate) use self::{
    aggregate::{Aggregator, Transition},
    diagnosis::{Diagnoses, Diagnosis},
    gauges::PortLabels,
    kernel_map::{KernelMapPressure, KernelMapSize},
    kernel_owners::KernelOwners,
    shared::Shared,
};
