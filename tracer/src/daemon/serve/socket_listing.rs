//! The body of an `/api/sockets` answer: a JSON list written a chunk at a time, as the
//! connection asks for more. The listing keeps only the ids of the matching sockets, in
//! order (8 bytes each); each chunk reads its sockets from the table as it is written. No
//! copy of the entries nor buffer as large as the answer exists: a million-socket listing
//! holds 8 MB, not the 200 MB of entries or 260 MB of JSON.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::body::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use tracer_common::TcpState;

use crate::{
    cgroups::CgroupName,
    daemon::{
        LARGE_ALLOCATION,
        core::{
            Shared,
            table::{Owner, SocketId, Tracked},
        },
    },
    event::comm_str,
    socket::{Process, SocketView},
};

/// Bytes of JSON written per chunk. hyper asks for the next chunk only when it has written
/// most of the last: a client that reads slowly holds its turn, not more memory.
const CHUNK: usize = 64 << 10;

/// A listing being sent; it keeps its turn (see `http::MAX_LISTINGS`) until the last chunk
/// is handed to the connection or the client goes away.
pub(super) struct StreamedListing {
    /// The listed sockets, in order. One that closed (or left the state asked for) before
    /// its chunk is written is left out.
    ids: std::vec::IntoIter<SocketId>,
    state: Option<TcpState>,
    /// Monotonic time the listing was taken at: every socket's age is measured against it.
    now: u64,
    opened: bool,
    closed: bool,
    /// The copy was large enough to ask the allocator to return memory once it is freed.
    large: bool,
    shared: Arc<Shared>,
    _turn: OwnedSemaphorePermit,
}

impl StreamedListing {
    pub(super) fn new(
        ids: Vec<SocketId>,
        state: Option<TcpState>,
        now: u64,
        shared: Arc<Shared>,
        turn: OwnedSemaphorePermit,
    ) -> Self {
        let large = ids.len() * size_of::<SocketId>() > LARGE_ALLOCATION;
        Self {
            ids: ids.into_iter(),
            state,
            now,
            opened: false,
            closed: false,
            large,
            shared,
            _turn: turn,
        }
    }

    /// The next piece of the list, or `None` once `]` was sent.
    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.closed {
            return None;
        }
        let mut chunk = Vec::with_capacity(CHUNK + 1024);
        // Held for one chunk's sockets (a few hundred lookups): the reader waits that long
        // at most. The owners' cgroups were named when the listing was taken.
        let agg = self.shared.aggregator();
        let mut cgroups = self.shared.cgroups();
        for id in self.ids.by_ref() {
            let Some(tracked) = agg.table().get(id) else { continue };
            if self.state.is_some_and(|state| tracked.state != state) {
                continue;
            }
            chunk.push(if self.opened { b',' } else { b'[' });
            self.opened = true;
            let owner = agg.table().owner(tracked);
            let cgroup = owner.and_then(|owner| cgroups.get(owner.cgroup));
            let view = view(tracked, owner, cgroup.as_deref(), self.now);
            serde_json::to_writer(&mut chunk, &view)
                .expect("a socket view serializes: it has no map with non-string keys");
            if chunk.len() >= CHUNK {
                return Some(chunk.into());
            }
        }
        if !self.opened {
            chunk.push(b'[');
        }
        chunk.push(b']');
        self.closed = true;
        Some(chunk.into())
    }
}

impl Drop for StreamedListing {
    fn drop(&mut self) {
        if self.large {
            self.shared.note_large_allocation();
        }
    }
}

impl http_body::Body for StreamedListing {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(self.get_mut().next_chunk().map(|chunk| Ok(http_body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.closed
    }
}

/// What a listing says about one socket.
pub(super) fn view(
    tracked: &Tracked,
    owner: Option<Owner>,
    cgroup: Option<&CgroupName>,
    now: u64,
) -> SocketView {
    let owner = owner
        .map(|o| Process::named(o.pid, comm_str(&o.comm).into_owned(), cgroup))
        .unwrap_or_default();
    SocketView::new(
        &tracked.key,
        tracked.state,
        now.saturating_sub(tracked.entered_ns),
        !tracked.entered_exact,
        &owner,
        tracked.inode,
    )
}
