//! The HTTP endpoint's routes: `/metrics`, `/healthz`, `/api/sockets`, `/api/leaks`,
//! `/api/destinations`. Loopback by default; a request timeout; errors are JSON with a reason
//! (connections: `connections`).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get},
};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracer_common::TcpState;

use super::{connections::LISTEN_BACKLOG, socket_listing::StreamedListing};
use crate::{
    clock::monotonic_ns,
    daemon::{
        Flush,
        core::{Diagnoses, Shared, table::SocketId},
        export::exposition::{Exporter, Format},
    },
    leaks::{LeakReport, Source},
    web_config::BasicAuth,
};

/// A request that takes longer gets 408.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `/api/sockets` listings built or sent at once: each holds its sockets' ids.
pub(crate) const MAX_LISTINGS: usize = 2;
/// How long a listing waits for its turn before the client is told to retry (503).
const LISTING_WAIT: Duration = Duration::from_secs(2);
/// Default and largest `limit` of `/api/sockets`.
pub(crate) const DEFAULT_SOCKET_LIMIT: usize = 100_000;
pub(crate) const MAX_SOCKET_LIMIT: usize = 10_000_000;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub shared: Arc<Shared>,
    pub diagnoses: Diagnoses,
    pub exporter: Arc<Exporter>,
    /// Asks the reader to apply what is waiting in the ring before a response is built.
    pub flush: tokio::sync::mpsc::Sender<Flush>,
    /// Turns for `/api/sockets` listings (`MAX_LISTINGS`).
    pub listings: Arc<Semaphore>,
}

/// Longest a request waits for the reader to catch up before answering with what it has.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

impl AppState {
    /// Every transition that happened before the request is counted in its response.
    pub(crate) async fn catch_up(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.flush.send(done).await.is_ok() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, wait).await;
        }
    }
}

/// The endpoints; with `users`, every request needs one's basic-auth credentials.
pub(crate) fn router(state: AppState, users: Option<Arc<BasicAuth>>) -> Router {
    let router = Router::new()
        .route("/metrics", only_get(get(metrics)))
        .route("/healthz", only_get(get(healthz)))
        .route("/api/sockets", only_get(get(sockets)))
        .route("/api/leaks", only_get(get(leaks)))
        .route("/api/destinations", only_get(get(destinations)))
        .fallback(not_found)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn(http_norms))
        .with_state(state);
    match users {
        Some(users) => router.layer(axum::middleware::from_fn_with_state(users, authenticate)),
        None => router,
    }
}

/// What HTTP asks of every request before any route: an HTTP/1.1 request names its `Host`
/// (400 otherwise, RFC 9112 3.2), and a method the endpoint serves nowhere (CONNECT, POST,
/// ...) is 405 with `Allow` whatever the path.
async fn http_norms(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let has_host =
        request.headers().contains_key(header::HOST) || request.uri().authority().is_some();
    if request.version() == axum::http::Version::HTTP_11 && !has_host {
        return error(StatusCode::BAD_REQUEST, "an HTTP/1.1 request needs a Host header");
    }
    if !matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
        return method_not_allowed();
    }
    next.run(request).await
}

/// 405 with the methods every endpoint takes.
fn method_not_allowed() -> Response {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "only GET (and HEAD) is allowed here");
    response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    response
}

/// 401 unless the request carries a configured user's credentials. The bcrypt check runs
/// in the blocking pool: a flood of wrong passwords must not stall the workers.
async fn authenticate(
    State(users): State<Arc<BasicAuth>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let allowed = tokio::task::spawn_blocking(move || users.allows(authorization.as_deref())).await;
    if allowed.unwrap_or(false) {
        return next.run(request).await;
    }
    let mut response = error(StatusCode::UNAUTHORIZED, "credentials required (basic auth)");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"tcpstate\""),
    );
    response
}

/// Every endpoint is read-only: other methods get 405 with an `Allow` header.
pub(crate) fn only_get(route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    route.fallback(|| async { method_not_allowed() })
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct ErrorBody {
        error: String,
    }
    (status, Json(ErrorBody { error: message.into() })).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; try /metrics, /healthz, /api/sockets, /api/leaks or /api/destinations",
    )
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
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

/// Everything stuck, as the diagnoses last found it (at most a second or two old): per
/// process, its leaked sockets; the listeners stuck full.
async fn leaks(State(state): State<AppState>, query: axum::extract::RawQuery) -> Response {
    if query.0.is_some_and(|q| !q.is_empty()) {
        return error(StatusCode::BAD_REQUEST, "/api/leaks takes no parameters");
    }
    let mut report = LeakReport::empty(Source::Daemon, Duration::ZERO);
    state.diagnoses.report(&mut report);
    Json(report).into_response()
}

/// Failed connects and resets of the last minute, by destination (applying what waits in the
/// ring first, as a scrape does).
async fn destinations(State(state): State<AppState>, query: axum::extract::RawQuery) -> Response {
    if query.0.is_some_and(|q| !q.is_empty()) {
        return error(StatusCode::BAD_REQUEST, "/api/destinations takes no parameters");
    }
    state.catch_up().await;
    Json(state.diagnoses.destinations(monotonic_ns())).into_response()
}

/// `/api/sockets` query: `state` (a state name, optional), `offset` and `limit` (a page of
/// the oldest-first list).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SocketsQuery {
    state: Option<TcpState>,
    offset: Option<usize>,
    limit: Option<usize>,
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
                format!("{}; parameters: state=NAME, offset=N, limit=N", rejection.body_text()),
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
    let offset = query.offset.unwrap_or(0);
    // The turn is held until the answer is sent: a slow reader keeps its memory, not more.
    let Ok(Ok(turn)) =
        tokio::time::timeout(LISTING_WAIT, state.listings.clone().acquire_owned()).await
    else {
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_LISTINGS} socket listings are being served; retry in a second"),
        );
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    };
    state.catch_up().await;
    let shared = state.shared.clone();
    let listing = tokio::task::spawn_blocking(move || {
        let now = monotonic_ns();
        let agg = shared.aggregator();
        // Oldest first: the interesting ones when something is stuck. Ties broken by
        // address, so pages of the same list follow each other. Only the sort keys and ids
        // are copied (24 bytes a socket, then 8): the chunks read the entries themselves.
        let mut matching: Vec<((u64, u32, u16, u16), SocketId)> = agg
            .table()
            .iter()
            .filter(|(_, t)| wanted.is_none_or(|state| t.state == state))
            .map(|(id, t)| ((t.entered_ns, t.key.netns, t.key.sport, t.key.dport), id))
            .collect();
        matching.sort_unstable();
        let total = matching.len();
        let page: Vec<SocketId> =
            matching.into_iter().skip(offset).take(limit).map(|(_, id)| id).collect();
        // Named here, off the async workers: a cgroup not seen before walks the hierarchy.
        let mut cgroups = shared.cgroups();
        for tracked in page.iter().filter_map(|&id| agg.table().get(id)) {
            if let Some(owner) = agg.table().owner(tracked) {
                cgroups.get(owner.cgroup);
            }
        }
        (page, now, total)
    })
    .await;
    match listing {
        Ok((page, now, total)) => {
            let body = StreamedListing::new(page, wanted, now, state.shared.clone(), turn);
            (
                [(header::CONTENT_TYPE, "application/json")],
                [("x-total-count", total.to_string())],
                axum::body::Body::new(body),
            )
                .into_response()
        }
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "listing sockets failed"),
    }
}

/// Binds the endpoint (before the async runtime starts: see `daemon::attach`); a busy or
/// forbidden address is an error that names the flag.
pub(crate) fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let bound = (|| {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            // As std's bind: [::] takes IPv4 clients too where the host allows it.
            let _ = socket.set_only_v6(false);
        }
        socket.bind(&addr.into())?;
        // std's listen uses 128: a burst of reconnecting clients overflowed it.
        socket.listen(LISTEN_BACKLOG)?;
        socket.set_nonblocking(true)?;
        Ok::<_, io::Error>(std::net::TcpListener::from(socket))
    })();
    bound.map_err(|error| {
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
            io::ErrorKind::PermissionDenied => format!(
                "ports below net.ipv4.ip_unprivileged_port_start (1024 by default) need \
                 CAP_NET_BIND_SERVICE; choose a higher one with --listen IP:PORT, or run \
                 {binary} as root or with cap_net_bind_service added to its setcap list",
                binary = crate::probe::preflight::this_binary()
            ),
            _ => format!("{error}; check --listen"),
        };
        anyhow::anyhow!("cannot serve HTTP on {addr}: {cause}")
    })
}
