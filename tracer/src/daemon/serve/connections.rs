//! Serving HTTP connections so that no client can starve the others: a deadline for each
//! request's headers, and when every slot is taken, the connection that has waited longest
//! without a request in progress (idle keep-alive, or a slow client still sending headers)
//! is closed to let the new one in. `/healthz` (the liveness probe) therefore answers while
//! hundreds of idle or trickling clients hold connections. A request is in progress until its
//! answer is sent, and a connection just accepted whose request has not been read yet is
//! not taken either: neither client is cut for a newcomer.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
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
/// A connection the server has not heard from yet may not be taken for a newcomer before it
/// has waited this long: its request may be in the socket, not yet read.
const NEWCOMER_GRACE_NS: u64 = 100_000_000;

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
}

impl Connection {
    fn new() -> Self {
        Self {
            in_handler: AtomicU32::new(0),
            waiting_since: AtomicU64::new(monotonic_ns()),
            heard_from: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    /// Whether a newcomer may take its slot: no request in progress, not already told to
    /// close, and either heard from (idle keep-alive, headers trickling) or silent past the
    /// grace.
    fn may_be_taken(&self, now: u64) -> bool {
        let since = self.waiting_since.load(Ordering::Relaxed);
        self.in_handler.load(Ordering::Relaxed) == 0
            && since != EVICTED
            && (self.heard_from.load(Ordering::Relaxed)
                || now.saturating_sub(since) >= NEWCOMER_GRACE_NS)
    }
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

    /// Makes room for one more connection: closes the one that has waited longest of those
    /// that may be taken. Returns false when none may.
    fn evict_longest_waiting(&self) -> bool {
        let now = monotonic_ns();
        let connections = self.lock();
        let victim = connections
            .values()
            .filter(|c| c.may_be_taken(now))
            .min_by_key(|c| c.waiting_since.load(Ordering::Relaxed));
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
            // Every slot is inside a handler (each bounded by the timeouts) or just accepted:
            // wait for one to end, or for the newest to outlive its grace.
            let ended = registry.ended.notified();
            if registry.lock().len() < MAX_CONNECTIONS {
                break;
            }
            let grace = Duration::from_nanos(NEWCOMER_GRACE_NS);
            let _ = tokio::time::timeout(grace / 4, ended).await;
        }
        while tasks.try_join_next().is_some() {}
        next_id += 1;
        let connection = Arc::new(Connection::new());
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
    let stream = IdleTimeout::new(stream, connection.clone());
    let Some(tls) = tls else {
        return serve_http(stream, peer, router, connection, stopped).await;
    };
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
}

impl IdleTimeout {
    fn new(stream: TcpStream, connection: Arc<Connection>) -> Self {
        Self { stream, idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)), connection }
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
