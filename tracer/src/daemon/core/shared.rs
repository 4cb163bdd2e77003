//! What the reader task, the diagnoses and the HTTP handlers share: the aggregator, the
//! daemon's health and the cgroup names.

use std::sync::{Mutex, MutexGuard, PoisonError};

use super::Aggregator;
use crate::{cgroups::CgroupNames, daemon::status::Status};

/// State shared by the reader task and the HTTP handlers.
#[derive(Debug)]
pub(crate) struct Shared {
    aggregator: Mutex<Aggregator>,
    status: Mutex<Status>,
    cgroups: Mutex<CgroupNames>,
    /// Set after a large response; the next status tick returns freed memory to the system.
    large_allocation: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator").field("tracked", &self.table().len()).finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(aggregator: Aggregator) -> Self {
        Self {
            aggregator: Mutex::new(aggregator),
            status: Mutex::new(Status::default()),
            cgroups: Mutex::new(CgroupNames::default()),
            large_allocation: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Names of the owners' cgroups, shared by listings.
    pub(crate) fn cgroups(&self) -> MutexGuard<'_, CgroupNames> {
        self.cgroups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A response or dump of many MiB was built: its memory, once freed, is best handed back
    /// (see `LARGE_ALLOCATION`).
    pub(crate) fn note_large_allocation(&self) {
        self.large_allocation.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn release_memory_if_needed(&self) {
        if self.large_allocation.swap(false, std::sync::atomic::Ordering::Relaxed) {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only returns free heap memory to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// The aggregator; a panic elsewhere while holding it leaves it usable (counts only).
    pub(crate) fn aggregator(&self) -> MutexGuard<'_, Aggregator> {
        self.aggregator.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) fn update_status(&self, update: impl FnOnce(&mut Status)) {
        update(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }
}
