//! Owners only the kernel's map knows. Every transition of an accepted socket up to
//! ESTABLISHED runs in softirq, so no record names its owner; the accept hook writes the
//! accepting process into the kernel's per-socket map, which no record carries until the
//! socket's next transition (often its end). Without this, a server's connections showed no
//! owner in `/api/sockets` and were missing from the per-container gauges for as long as
//! they lived.
//!
//! So an established socket without an owner is queued (see `Aggregator::take_unnamed`) and
//! looked up by its address once a second, half a second after it was established (time for
//! the process to accept it), and again after 1, 2 and 4 s while the map has no owner yet.
//! One map lookup per accepted socket, off the reader's thread.

use std::sync::Arc;

use super::{
    Shared,
    aggregate::Unnamed,
    table::{Owner, SocketId},
};
use crate::{clock::monotonic_ns, probe::KernelSockets};

/// Lookups per pass at most: about a tenth of a second of system calls.
const MAX_LOOKUPS: usize = 100_000;
/// Looks at most per socket: a process that accepts later is named at its socket's next
/// transition in its own context, as without the accept hook.
const MAX_LOOKS: u8 = 4;
const RETRY_AFTER_NS: u64 = 1_000_000_000;

#[derive(Clone)]
pub(crate) struct KernelOwners {
    map: Arc<KernelSockets>,
}

impl KernelOwners {
    pub(crate) fn new(map: Arc<KernelSockets>) -> Self {
        Self { map }
    }

    /// Looks up the owners of the sockets that are due; returns how many were found.
    pub(crate) fn fill(&self, shared: &Shared) -> usize {
        let now = monotonic_ns();
        let due = shared.aggregator().take_unnamed(now, MAX_LOOKUPS);
        if due.is_empty() {
            return 0;
        }
        let mut found: Vec<(SocketId, Owner)> = Vec::new();
        let mut again = Vec::new();
        for socket in due {
            match self.map.owner(socket.id) {
                Some(entry) => found.push((
                    socket.id,
                    Owner {
                        pid: entry.owner_tgid,
                        comm: entry.owner_comm,
                        cgroup: entry.owner_cgroup,
                    },
                )),
                None if socket.looks + 1 < MAX_LOOKS => again.push(Unnamed {
                    id: socket.id,
                    due_ns: now + (RETRY_AFTER_NS << socket.looks),
                    looks: socket.looks + 1,
                }),
                None => {}
            }
        }
        let mut agg = shared.aggregator();
        for (id, owner) in &found {
            agg.set_owner(*id, *owner);
        }
        for socket in again {
            agg.queue_unnamed(socket);
        }
        found.len()
    }
}
