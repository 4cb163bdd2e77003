//! Draining the ring buffer: woken by the kernel when a batch is waiting, and on a timer for
//! the records that arrived without a wakeup.

mod accepted;
mod duplicates;

use std::{io, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracer_common::{DecodeError, TransitionRecord};

use self::{accepted::AcceptedAddresses, duplicates::Duplicates};
use crate::clock::monotonic_ns;

/// Reads records from the probe's ring buffer.
pub struct RecordReader {
    ring: AsyncFd<RingBuf<MapData>>,
    poll_interval: Duration,
    accepted: AcceptedAddresses,
    duplicates: Duplicates,
}

/// Most records handed out per `next_batch` call, so one call cannot starve other tasks and a
/// caller's batch buffer stays small (8192 records are under 1 MiB).
const MAX_BATCH: usize = 1 << 13;

impl RecordReader {
    /// `poll_interval` bounds how long a record can wait when the kernel sends no wakeup
    /// (see `ProbeOptions::wakeup_batch_bytes`).
    pub fn new(ring: RingBuf<MapData>, poll_interval: Duration) -> io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and keeps it open until it is dropped with the
        // AsyncFd.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        Ok(Self {
            ring,
            poll_interval,
            accepted: AcceptedAddresses::default(),
            duplicates: Duplicates::default(),
        })
    }

    /// Waits for a wakeup or the poll interval, whichever comes first, then passes every
    /// waiting record to `sink`. Returns how many items were read.
    pub async fn next_batch(
        &mut self,
        mut sink: impl FnMut(Result<TransitionRecord, DecodeError>),
    ) -> io::Result<usize> {
        let Self { ring, poll_interval, accepted, duplicates } = self;
        match tokio::time::timeout(*poll_interval, ring.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard?;
                let count = drain(guard.get_inner_mut(), accepted, duplicates, &mut sink);
                if count < MAX_BATCH {
                    guard.clear_ready();
                }
                Ok(count)
            }
            Err(_elapsed) => Ok(drain(ring.get_mut(), accepted, duplicates, &mut sink)),
        }
    }

    /// Reads whatever is waiting, without waiting.
    pub fn drain_now(
        &mut self,
        mut sink: impl FnMut(Result<TransitionRecord, DecodeError>),
    ) -> usize {
        drain(self.ring.get_mut(), &mut self.accepted, &mut self.duplicates, &mut sink)
    }

    /// Second deliveries of one transition dropped so far (see `duplicates`).
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates.dropped()
    }
}

/// Reads up to `MAX_BATCH` items; a second delivery of one transition is dropped
/// (`duplicates`), and records of accepted sockets may wait for their next one (`accepted`)
/// and leave when it comes or they expire.
fn drain(
    ring: &mut RingBuf<MapData>,
    accepted: &mut AcceptedAddresses,
    duplicates: &mut Duplicates,
    sink: &mut impl FnMut(Result<TransitionRecord, DecodeError>),
) -> usize {
    let mut count = 0;
    while count < MAX_BATCH {
        let Some(item) = ring.next() else { break };
        match TransitionRecord::decode(&item) {
            Ok(record) if duplicates.is_repeat(&record) => {}
            Ok(record) => accepted.push(record, |r| sink(Ok(r))),
            Err(error) => sink(Err(error)),
        }
        count += 1;
    }
    accepted.expire(monotonic_ns(), |r| sink(Ok(r)));
    count
}
