//! Serving HTTP connections so that no client can starve the others: a deadline for each
//! request's headers, and when every slot is taken, a waiting connection is closed to let the
//! new one in: silent ones first (connected, nothing sent: scanners, clients that reconnect
//! in a loop), then those heard from without a request in progress (idle keep-alive, a slow
//! client still sending headers), each the longest waiting first. A connection whose request
//! is in progress, or whose bytes already wait in its socket unread, is never taken: a fresh
//! client's request is answered while hundreds of silent clients reconnect.
//!
//! Closing after an error answer (431 for oversized headers) lingers: the write side is shut
//! and what the client still sends is read and dropped for a moment, so the answer arrives
//! instead of a reset. An HTTP/2 client is told so in its own protocol (GOAWAY,
//! HTTP_1_1_REQUIRED) rather than cut.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body, extract::Request, response::Response};
use http_body_util::BodyExt as _;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::clock::monotonic_ns;

/// Connections served at once; at the limit, a waiting one is closed for each newcomer.
pub(super) const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this; it also bounds how long a keep-alive
/// connection waits for its next request.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that moves no byte for this long is closed (a reader that stopped reading).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A silent connection this young is taken only after every other kind: its request may be
/// on its way (one round trip behind the handshake).
const NEWCOMER_GRACE_NS: u64 = 20_000_000;
/// How long a closing connection reads and drops what its client still sends, at most.
const LINGER: Duration = Duration::from_secs(1);
/// Bytes a closing connection drops at most before it closes anyway.
const LINGER_BYTES: usize = 4 << 20;
/// The listen backlog asked for; the kernel caps it at net.core.somaxconn. A burst of
/// connects beyond the accept loop's pace waits here instead of losing its SYN (a dropped SYN
/// costs a client a second).
pub(super) const LISTEN_BACKLOG: i32 = 4096;

/// `Connection::waiting_since` of one told to close: the next newcomer picks another.
const EVICTED: u64 = u64::MAX;

/// One served connection, as the admission decision sees it.
struct Connection {
    /// Requests of this connection inside a handler now.
    in_handler: AtomicU32,
    /// When it last started waiting (accepted, or a response sent), monotonic ns.
    waiting_since: AtomicU64,
    /// The client has sent at least one byte.
    heard_from: AtomicBool,
    /// Told to close, because a newcomer needs the slot.
    evict: Notify,
    /// Its socket, to see whether bytes wait unread in it. Only read while the connection
    /// is registered; a number reused after it closed only misleads one decision.
    fd: RawFd,
}

/// Who a newcomer takes the slot of first: lower first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Shedding {
    /// Nothing sent, connected longer than the grace.
    Silent,
    /// Heard from, no request in progress: idle keep-alive, headers still trickling.
    Waiting,
    /// Nothing sent yet, but just connected: its request may be on its way.
    SilentNewcomer,
}

impl Connection {
    fn new(fd: RawFd) -> Self {
        Self {
            in_handler: AtomicU32::new(0),
            waiting_since: AtomicU64::new(monotonic_ns()),
            heard_from: AtomicBool::new(false),
            evict: Notify::new(),
            fd,
        }
    }

    /// Whether, and in what order, a newcomer may take its slot: never with a request in
    /// progress or bytes waiting unread, nor twice.
    fn shedding(&self, now: u64) -> Option<Shedding> {
        let since = self.waiting_since.load(Ordering::Relaxed);
        if self.in_handler.load(Ordering::Relaxed) > 0 || since == EVICTED {
            return None;
        }
        if self.heard_from.load(Ordering::Relaxed) {
            return Some(Shedding::Waiting);
        }
        if bytes_waiting(self.fd) {
            return None;
        }
        if now.saturating_sub(since) >= NEWCOMER_GRACE_NS {
            Some(Shedding::Silent)
        } else {
            Some(Shedding::SilentNewcomer)
        }
    }
}

/// Whether bytes wait unread in the socket: its request arrived and is not parsed yet.
fn bytes_waiting(fd: RawFd) -> bool {
    let mut waiting: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; an fd that is no longer this socket fails or answers
    // for another file, which only misleads this one decision.
    let result = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut waiting) };
    result == 0 && waiting > 0
}

/// The connections being served, by id.
#[derive(Default)]
struct Registry {
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    /// Signalled whenever a connection ends.
    ended: Notify,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        // A panic while holding it cannot leave the map inconsistent: use it as it is.
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes room for one more connection: closes, of the kind shed first, the one that has
    /// waited longest. Returns false when none may be taken.
    fn evict_longest_waiting(&self) -> bool {
        let now = monotonic_ns();
        let connections = self.lock();
        let victim = connections
            .values()
            .filter_map(|c| Some((c.shedding(now)?, c.waiting_since.load(Ordering::Relaxed), c)))
            .min_by_key(|(shedding, since, _)| (*shedding, *since))
            .map(|(_, _, c)| c);
        match victim {
            Some(victim) => {
                victim.waiting_since.store(EVICTED, Ordering::Relaxed);
                victim.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `stop` resolves, then
/// lets requests in progress finish (callers bound how long they wait).
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl Future<Output = ()>,
) {
    let tls = tls.map(TlsAcceptor::from);
    let registry = Arc::new(Registry::default());
    let (stopping, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    log::warn!("accepting an HTTP connection failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while registry.lock().len() >= MAX_CONNECTIONS && !registry.evict_longest_waiting() {
            // Every slot is inside a handler (each bounded by the timeouts) or has its request
            // waiting to be read: wait for one to end.
            let ended = registry.ended.notified();
            if registry.lock().len() < MAX_CONNECTIONS {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), ended).await;
        }
        while tasks.try_join_next().is_some() {}
        next_id += 1;
        let connection = Arc::new(Connection::new(stream.as_raw_fd()));
        registry.lock().insert(next_id, connection.clone());
        let served = serve_connection(
            stream,
            peer,
            router.clone(),
            tls.clone(),
            connection,
            stopped.clone(),
        );
        let registry = registry.clone();
        let id = next_id;
        tasks.spawn(async move {
            served.await;
            registry.lock().remove(&id);
            registry.ended.notify_waiters();
        });
    }
    let _ = stopping.send(true);
    while tasks.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    tls: Option<TlsAcceptor>,
    connection: Arc<Connection>,
    stopped: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        // An HTTP/2 client (prior knowledge) is answered in HTTP/2 before hyper sees it.
        let first = tokio::select! {
            first = first_bytes(&stream) => first,
            () = connection.evict.notified() => return,
        };
        if first.starts_with(&H2_PREFACE[..first.len().min(H2_PREFACE.len())]) && first.len() >= 3 {
            return refuse_http2(stream, peer).await;
        }
        let stream = IdleTimeout::new(stream, connection.clone());
        return serve_http(stream, peer, router, connection, stopped).await;
    };
    let stream = IdleTimeout::new(stream, connection.clone());
    // The handshake is part of the request: it gets the headers' deadline, and a newcomer
    // may take its slot like any connection waiting for a request.
    let handshake = tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream));
    tokio::select! {
        accepted = handshake => match accepted {
            Ok(Ok(stream)) => serve_http(stream, peer, router, connection, stopped).await,
            Ok(Err(error)) => log::debug!("TLS handshake with {peer} failed: {error}"),
            Err(_) => log::debug!("TLS handshake with {peer} timed out"),
        },
        () = connection.evict.notified() => {}
    }
}

async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    connection: Arc<Connection>,
    mut stopped: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let connection = connection.clone();
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let guard = InHandler::enter(connection.clone());
            let response = router.clone().oneshot(request.map(Body::new));
            async move {
                let response: Result<Response, Infallible> = response.await;
                // A response is in progress until its body is sent (a listing streams for
                // seconds): the guard goes with the body, so no newcomer takes the slot of a
                // client still receiving its answer.
                response.map(|response| {
                    response.map(|body| {
                        Body::new(body.map_frame(move |frame| {
                            let _in_handler = &guard;
                            frame
                        }))
                    })
                })
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                log::debug!("HTTP connection from {peer}: {error}");
            }
        }
        () = connection.evict.notified() => {
            log::debug!("closed the HTTP connection from {peer}: a new client needed its slot");
        }
        () = async { drop(stopped.wait_for(|stopped| *stopped).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// What an HTTP/2 client with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first bytes the client sent, without taking them from the socket (empty when it
/// sent none within the headers' deadline, or closed).
async fn first_bytes(stream: &TcpStream) -> Vec<u8> {
    let mut buf = [0; H2_PREFACE.len()];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        _ => Vec::new(),
    }
}

/// Answers an HTTP/2 client the way its protocol says a server that wants HTTP/1.1 does: an
/// empty SETTINGS frame, then GOAWAY with the error HTTP_1_1_REQUIRED (RFC 9113, 7), then
/// closes, lingering.
async fn refuse_http2(mut stream: TcpStream, peer: SocketAddr) {
    use tokio::io::AsyncWriteExt as _;
    const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    const HTTP_1_1_REQUIRED: u32 = 0xd;
    let debug = b"tcpstate serves HTTP/1.1 only";
    let length = 8 + debug.len();
    let mut goaway =
        vec![(length >> 16) as u8, (length >> 8) as u8, length as u8, 0x7, 0, 0, 0, 0, 0];
    goaway.extend_from_slice(&0u32.to_be_bytes()); // last stream id
    goaway.extend_from_slice(&HTTP_1_1_REQUIRED.to_be_bytes());
    goaway.extend_from_slice(debug);
    log::debug!("HTTP/2 preface from {peer}: answered GOAWAY (HTTP/1.1 required)");
    if stream.write_all(&SETTINGS).await.is_ok() && stream.write_all(&goaway).await.is_ok() {
        let _ = stream.shutdown().await;
        linger(&mut stream).await;
    }
}

/// After the write side is shut: reads and drops what the client still sends, until it
/// closes, `LINGER` passes or `LINGER_BYTES` came, so that closing with unread bytes does
/// not reset the connection before the client has read the answer.
async fn linger(stream: &mut TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0; 16 << 10];
    let mut dropped = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while dropped < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => dropped += n,
            }
        }
    })
    .await;
}

/// Marks a connection as inside a handler while it lives.
struct InHandler(Arc<Connection>);

impl InHandler {
    fn enter(connection: Arc<Connection>) -> Self {
        connection.in_handler.fetch_add(1, Ordering::Relaxed);
        Self(connection)
    }
}

impl Drop for InHandler {
    fn drop(&mut self) {
        // An evicted connection stays evicted.
        let _ = self.0.waiting_since.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |since| {
            (since != EVICTED).then(monotonic_ns)
        });
        self.0.in_handler.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that fails once no byte has moved either way for `IDLE_TIMEOUT`, and marks its
/// connection heard from at the first byte read.
struct IdleTimeout {
    stream: TcpStream,
    idle: Pin<Box<Sleep>>,
    connection: Arc<Connection>,
    /// Once shut down: until when it lingers, and the bytes dropped meanwhile.
    lingering: Option<(Pin<Box<Sleep>>, usize)>,
}

impl IdleTimeout {
    fn new(stream: TcpStream, connection: Arc<Connection>) -> Self {
        let idle = Box::pin(tokio::time::sleep(IDLE_TIMEOUT));
        Self { stream, idle, connection, lingering: None }
    }

    /// Any progress restarts the clock; waiting too long fails the connection.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
                Poll::Ready(result)
            }
            Poll::Pending if self.idle.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "HTTP connection idle")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > filled {
            self.connection.heard_from.store(true, Ordering::Relaxed);
        }
        self.watch(cx, poll)
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Shuts the write side, then lingers (see `linger`) before reporting the shutdown done:
    /// hyper shuts down after an error answer (431), and the client may still be sending.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.lingering.is_none() {
            std::task::ready!(Pin::new(&mut self.stream).poll_shutdown(cx))?;
            self.lingering = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
        }
        let this = &mut *self;
        let Some((deadline, dropped)) = &mut this.lingering else { unreachable!("set above") };
        let mut buf = [0; 16 << 10];
        loop {
            if *dropped >= LINGER_BYTES || deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut this.stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => *dropped += read.filled().len(),
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
