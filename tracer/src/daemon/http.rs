//! The HTTP endpoint: `/metrics`, `/healthz`, `/api/sockets`. Loopback by default; bounded
//! concurrent connections, idle and request timeouts; errors are JSON with a reason.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get},
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tracer_common::TcpState;

use super::{Shared, metrics::Exporter, table::Tracked};
use crate::{
    clock::monotonic_ns,
    event::comm_str,
    socket::{OwnerName, SocketView},
};

/// Connections served at once; further clients wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends or receives nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A request that takes longer gets 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default and largest `limit` of `/api/sockets`.
pub const DEFAULT_SOCKET_LIMIT: usize = 100_000;
pub const MAX_SOCKET_LIMIT: usize = 10_000_000;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub exporter: Arc<Exporter>,
    /// Asks the reader to apply what is waiting in the ring before a response is built.
    pub flush: tokio::sync::mpsc::Sender<super::Flush>,
}

/// Longest a request waits for the reader to catch up before answering with what it has.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

impl AppState {
    /// Every transition that happened before the request is counted in its response.
    pub async fn catch_up(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.flush.send(done).await.is_ok() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, wait).await;
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", only_get(get(metrics)))
        .route("/healthz", only_get(get(healthz)))
        .route("/api/sockets", only_get(get(sockets)))
        .route("/api/leaks", only_get(get(leaks)))
        .fallback(not_found)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

/// Every endpoint is read-only: other methods get 405 with an `Allow` header.
pub fn only_get(route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    route.fallback(|| async {
        let mut response =
            error(StatusCode::METHOD_NOT_ALLOWED, "only GET (and HEAD) is allowed here");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        response
    })
}

pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct ErrorBody {
        error: String,
    }
    (status, Json(ErrorBody { error: message.into() })).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; try /metrics, /healthz, /api/sockets or /api/leaks",
    )
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = super::metrics::Format::negotiate(accept);
    state.catch_up().await;
    let exporter = state.exporter.clone();
    // Encoding scans the socket table: keep it off the async workers.
    match tokio::task::spawn_blocking(move || exporter.render(format)).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed"),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    #[derive(Serialize)]
    struct Health {
        status: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    }
    match state.shared.status().unhealthy_reason(monotonic_ns()) {
        None => (StatusCode::OK, Json(Health { status: "ok", reason: None })).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health { status: "unhealthy", reason: Some(reason) }),
        )
            .into_response(),
    }
}

/// The latest leak evaluation (at most a second old): per process, its leaked sockets.
async fn leaks(State(state): State<AppState>, query: axum::extract::RawQuery) -> Response {
    if query.0.is_some_and(|q| !q.is_empty()) {
        return error(StatusCode::BAD_REQUEST, "/api/leaks takes no parameters");
    }
    Json(state.shared.leaks().report).into_response()
}

/// `/api/sockets` query: `state` (a state name, optional) and `limit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketsQuery {
    state: Option<TcpState>,
    limit: Option<usize>,
}

fn view(tracked: &Tracked, now: u64) -> SocketView {
    let owner =
        tracked.owner.map(|o| OwnerName { pid: o.pid, comm: comm_str(&o.comm).into_owned() });
    SocketView::new(
        &tracked.key,
        tracked.state,
        now.saturating_sub(tracked.entered_ns),
        !tracked.entered_exact,
        owner,
        tracked.inode,
    )
}

/// A response this large leaves memory the allocator keeps unless asked to give it back.
const LARGE_RESPONSE: usize = 1 << 20;

/// Serializes sockets as a JSON list without first building their views.
struct Listing<'a> {
    sockets: &'a [&'a Tracked],
    now: u64,
}

impl Serialize for Listing<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq as _;
        let mut seq = serializer.serialize_seq(Some(self.sockets.len()))?;
        for tracked in self.sockets {
            seq.serialize_element(&view(tracked, self.now))?;
        }
        seq.end()
    }
}

async fn sockets(
    State(state): State<AppState>,
    query: Result<Query<SocketsQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{}; parameters: state=NAME, limit=N", rejection.body_text()),
            );
        }
    };
    let wanted = query.state;
    let limit = query.limit.unwrap_or(DEFAULT_SOCKET_LIMIT);
    if !(1..=MAX_SOCKET_LIMIT).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be from 1 to {MAX_SOCKET_LIMIT}"),
        );
    }
    state.catch_up().await;
    let shared = state.shared.clone();
    let listing = tokio::task::spawn_blocking(move || {
        let now = monotonic_ns();
        let agg = shared.aggregator();
        let mut matching: Vec<&Tracked> = agg
            .table()
            .iter()
            .map(|(_, tracked)| tracked)
            .filter(|tracked| wanted.is_none_or(|state| tracked.state == state))
            .collect();
        // Oldest first: the interesting ones when something is stuck.
        matching.sort_unstable_by_key(|tracked| tracked.entered_ns);
        matching.truncate(limit);
        // Written one socket at a time: no list of views as large as the answer.
        serde_json::to_vec(&Listing { sockets: &matching, now })
    })
    .await;
    match listing {
        Ok(Ok(body)) => {
            if body.len() > LARGE_RESPONSE {
                state.shared.note_large_allocation();
            }
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "listing sockets failed"),
    }
}

/// Binds the endpoint; a busy or forbidden address is an error that names the flag.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|error| {
        // One cause, said once: the known ones in words, others as the system reports them.
        let cause = match error.kind() {
            io::ErrorKind::AddrInUse => {
                "the port is already in use (another tcpstate?); choose another with --listen \
                 IP:PORT"
                    .to_owned()
            }
            io::ErrorKind::AddrNotAvailable => {
                "no local interface has that address; check --listen".to_owned()
            }
            io::ErrorKind::PermissionDenied => {
                "not permitted to bind it (ports below 1024 need CAP_NET_BIND_SERVICE); check \
                 --listen"
                    .to_owned()
            }
            _ => format!("{error}; check --listen"),
        };
        anyhow::anyhow!("cannot serve HTTP on {addr}: {cause}")
    })
}

/// A listener that serves at most `MAX_CONNECTIONS` connections at once and closes idle ones.
pub struct BoundedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
}

impl BoundedListener {
    pub fn new(listener: TcpListener) -> Self {
        Self { listener, slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)) }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit =
            self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = BoundedConnection {
                        stream,
                        _permit: permit,
                        idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                    };
                    return (connection, addr);
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    log::warn!("accepting an HTTP connection failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// An accepted connection holding one of the listener's slots until it closes.
pub struct BoundedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
}

impl BoundedConnection {
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.idle.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "HTTP connection idle"));
        }
        Ok(())
    }

    fn progress(&mut self) {
        self.idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
    }

    /// Any progress restarts the idle clock; waiting too long fails the connection.
    fn watch_idle<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.progress();
                Poll::Ready(result)
            }
            Poll::Pending => {
                self.check_idle(cx)?;
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for BoundedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.watch_idle(cx, poll)
    }
}

impl AsyncWrite for BoundedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch_idle(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
