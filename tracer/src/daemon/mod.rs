//! `tcpstate run`: the daemon. Loads the probe, seeds the socket table from `sock_diag`,
//! aggregates every transition, reconciles with fresh dumps, and serves it all over HTTP.
//!
//! One task owns the ring buffer and applies records to the aggregator in batches; HTTP
//! handlers read the aggregator under the same lock, at scrape time only.

mod aggregate;
mod destinations;
mod gauges;
mod groups;
mod http;
mod kernel_map;
mod kernel_owners;
mod leak_watch;
mod listeners;
mod listing;
mod metrics;
mod otlp;
mod owner_pool;
mod ports;
mod reading;
mod server;
mod shared;
mod stuck_listeners;
mod table;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;

pub(crate) use self::otlp::{OtlpSettings, SettingError as OtlpSettingError, check as check_otlp};
pub(crate) use self::shared::{Shared, Status};
use self::{
    aggregate::Aggregator,
    gauges::PortLabels,
    kernel_map::KernelMapPressure,
    kernel_owners::KernelOwners,
    leak_watch::{LeakState, LeakWatch},
    otlp::OtlpExport,
    reading::{Reading, dump_namespaces, watch_leaks},
    stuck_listeners::StuckWatch,
};
pub(crate) use self::{
    destinations::WINDOW_SECONDS as DESTINATION_WINDOW_SECONDS, groups::GroupBy,
    kernel_map::KernelMapSize, table::BYTES_PER_SOCKET,
};
use crate::{
    clock::monotonic_ns,
    cmdline::CmdlinePolicy,
    probe::{Probe, ProbeOptions},
    reader::RecordReader,
    web_config::WebConfig,
};

/// What the daemon is told to do: built from `tcpstate run`'s flags, or by `top` for the
/// daemon it runs in-process.
#[derive(Clone, Debug)]
pub struct Config {
    /// The HTTP endpoint's address.
    pub(crate) listen: std::net::SocketAddr,
    /// Most sockets the table holds.
    pub(crate) max_sockets: usize,
    /// How often the table is compared with a fresh sock_diag dump.
    pub(crate) reconcile_interval: Duration,
    /// A socket in CLOSE_WAIT for longer than this is a leak.
    pub(crate) close_wait_threshold: Duration,
    /// A listener whose accept queue stays full for longer than this is stuck.
    pub(crate) listen_queue_threshold: Duration,
    /// Local ports that get a `port` label of their own.
    pub(crate) port_labels: Vec<u16>,
    /// TLS and basic authentication for the endpoint.
    pub(crate) web_config: Option<WebConfig>,
    /// How much of a leaking process's command line is shown.
    pub(crate) cmdline: CmdlinePolicy,
    /// Split the socket and leak gauges by the owner's container or pod.
    pub(crate) group_by: Option<GroupBy>,
    /// The kernel side.
    pub(crate) probe: ProbeOptions,
    /// The kernel's per-socket map's size (in `probe`), and why.
    pub(crate) kernel_sockets: KernelMapSize,
    /// Where to push the metrics over OTLP, if anywhere.
    pub(crate) otlp: Option<OtlpSettings>,
}

/// How long a record may wait in the ring when the kernel sends no wakeup.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Ring size unless `--ring-bytes` says otherwise.
pub(crate) const RING_BYTES: u32 = 4 << 20;
/// How often the kernel's counters are read and health is judged.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How long shutdown waits for HTTP connections to finish.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_millis(800);
/// A listing or dump larger than this is followed by `malloc_trim`: built on blocking threads,
/// each with its own malloc arena, their freed memory otherwise stays with the process.
pub(crate) const LARGE_ALLOCATION: usize = 1 << 20;

/// A request to apply every record waiting in the ring now; answered when done.
pub(crate) type Flush = tokio::sync::oneshot::Sender<()>;

/// What the daemon sets up with its full privileges, before any other thread exists.
pub struct Attached {
    listener: std::net::TcpListener,
    probe: Probe,
}

impl Attached {
    /// Where the HTTP server will answer (the port chosen when `--listen` asked for port 0).
    pub(crate) fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds the HTTP port and attaches the probe. Privileges first: without them nothing else
/// matters, a busy port included. Then bind: a busy port fails before anything touches the
/// kernel. Runs before the async runtime starts, so that the capabilities dropped afterwards
/// (`capabilities::keep_only`) are dropped for every thread the daemon will have.
pub fn attach(config: &Config) -> anyhow::Result<Attached> {
    crate::probe::preflight::check_privileges()?;
    let listener = http::bind(config.listen)?;
    if !config.listen.ip().is_loopback() && config.web_config.is_none() {
        log::warn!(
            "serving {} without TLS or authentication: whoever reaches it reads every socket \
             and the processes holding them; give --web-config (TLS, basic auth) or listen on \
             loopback",
            config.listen
        );
    }
    let probe = Probe::attach(&config.probe)?;
    Ok(Attached { listener, probe })
}

/// Large allocations (a listing's ids, a dump) always get their own mapping,
/// returned to the system when freed. glibc otherwise raises its mmap threshold after the
/// first such free, and later ones land in the heap, where the small allocations made
/// meanwhile pin them: 64 listings of 100,000 sockets left 44 MiB behind that way.
fn map_large_allocations_apart() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's tuning; a fixed threshold also turns off
    // its dynamic adjustment.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_ALLOCATION as libc::c_int / 4);
    }
}

pub async fn run(config: Config, attached: Attached) -> anyhow::Result<()> {
    map_large_allocations_apart();
    let stop = crate::signals::shutdown()?;
    let Attached { listener, mut probe } = attached;
    let listener = tokio::net::TcpListener::from_std(listener).context("serving HTTP")?;
    let ring = probe.take_ring().context("ring buffer already taken")?;
    let reader = RecordReader::new(ring, POLL_INTERVAL).context("watching the ring buffer")?;
    let shared = seed(&config, &probe, listener.local_addr()?).await?;
    let (flush_requests, flushes) = tokio::sync::mpsc::channel::<Flush>(16);
    let exporter = Arc::new(metrics::Exporter::new(shared.clone(), config.group_by));
    let http =
        HttpServer::start(listener, &shared, &config, exporter.clone(), flush_requests.clone());
    let otlp = config
        .otlp
        .clone()
        .map(|settings| OtlpExport::start(settings, shared.clone(), exporter))
        .transpose()?;
    let leak_watch = start_leak_watch(&mut probe, &shared, &config);
    let stuck_watch = StuckWatch::new(config.listen_queue_threshold, config.cmdline);
    let listener_watch = tokio::spawn(listeners::watch_listeners(shared.clone(), stuck_watch));
    let kernel_map = KernelMapPressure::new(config.probe.socket_map_entries);
    let reading =
        Reading { probe: &probe, reader, shared: &shared, flushes, flush_requests, kernel_map };
    reading.until(stop, config.reconcile_interval).await?;
    log::info!("stopping: detaching the probe");
    leak_watch.abort();
    listener_watch.abort();
    let http_stopped = http.stop();
    drop(probe);
    log::debug!("probe detached");
    // The last export and the HTTP connections' grace run together: exit stays within 2 s.
    let last_export = async {
        if let Some(otlp) = otlp {
            otlp.stop().await;
        }
    };
    let (http_stopped, ()) = tokio::join!(http_stopped, last_export);
    http_stopped
}

/// The shared state, its table seeded with every socket a sock_diag dump of every namespace
/// finds; logs the startup line.
async fn seed(
    config: &Config,
    probe: &Probe,
    listen: std::net::SocketAddr,
) -> anyhow::Result<Arc<Shared>> {
    let labels = PortLabels::new(config.port_labels.clone());
    let shared = Arc::new(Shared::new(
        Aggregator::new(config.max_sockets, labels),
        LeakState::new(config.close_wait_threshold),
    ));
    shared.update_status(|status| {
        status.listeners.stuck_threshold = config.listen_queue_threshold;
        status.parts = probe.parts().to_vec();
        status.map_memory = probe.map_memory().to_vec();
    });
    shared.aggregator().begin_dump();
    let (dumps, started, finished) = dump_namespaces().await?;
    shared.update_status(|status| status.netns_refused = dumps.refused);
    let tls = config.web_config.as_ref().is_some_and(|w| w.tls.is_some());
    let scheme = if tls { "https" } else { "http" };
    let seeded = shared.aggregator().reconcile(dumps.dumps, started, finished, false);
    log::info!(
        "tcpstate {} attached to tracepoint sock:inet_sock_set_state; serving {scheme}://{listen}/metrics; \
         seeded {} existing sockets from {} network namespaces; kernel map: {}",
        env!("CARGO_PKG_VERSION"),
        seeded.added,
        seeded.namespaces,
        config.kernel_sockets.describe()
    );
    shared.update_status(|status| status.last_read_ns = monotonic_ns());
    Ok(shared)
}

/// The HTTP endpoint, served on a task of its own until stopped.
struct HttpServer {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl HttpServer {
    fn start(
        listener: tokio::net::TcpListener,
        shared: &Arc<Shared>,
        config: &Config,
        exporter: Arc<metrics::Exporter>,
        flush: tokio::sync::mpsc::Sender<Flush>,
    ) -> Self {
        let state = http::AppState {
            shared: shared.clone(),
            exporter,
            flush,
            listings: Arc::new(tokio::sync::Semaphore::new(http::MAX_LISTINGS)),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let web = config.web_config.clone();
        let task = tokio::spawn(async move {
            let users = web.as_ref().and_then(|w| w.users.clone());
            let tls = web.and_then(|w| w.tls);
            server::serve(listener, http::router(state, users), tls, async {
                let _ = stopped.await;
            })
            .await;
        });
        Self { task, stop }
    }

    /// Stops accepting now; the future gives connections still open a moment to finish.
    fn stop(self) -> impl Future<Output = anyhow::Result<()>> {
        let _ = self.stop.send(());
        async move {
            match tokio::time::timeout(HTTP_SHUTDOWN_GRACE, self.task).await {
                Ok(Ok(())) => {}
                Ok(Err(join)) => return Err(join).context("HTTP server task"),
                Err(_elapsed) => log::debug!("closing HTTP connections still open"),
            }
            log::debug!("HTTP server stopped");
            Ok(())
        }
    }
}

/// The leak watch, with the kernel's socket map when the accept hook runs: only that hook
/// records owners no record carries; without it the lookups would find nothing, once a
/// second for every socket without an owner.
fn start_leak_watch(
    probe: &mut Probe,
    shared: &Arc<Shared>,
    config: &Config,
) -> tokio::task::JoinHandle<()> {
    let accept_hook =
        probe.parts().iter().any(|p| p.part == crate::probe::Part::AcceptOwner && p.active());
    let kernel_sockets = accept_hook
        .then(|| probe.socket_map())
        .and_then(|map| {
            map.inspect_err(|error| {
                log::warn!("accepted sockets may show no owner until they close: {error:#}");
            })
            .ok()
        })
        .map(Arc::new);
    let kernel_owners = kernel_sockets.clone().map(KernelOwners::new);
    if kernel_owners.is_some() {
        shared.aggregator().queue_unnamed_sockets();
    }
    let watch = LeakWatch::new(
        config.close_wait_threshold,
        config.cmdline,
        config.group_by,
        kernel_sockets,
    );
    tokio::spawn(watch_leaks(shared.clone(), kernel_owners, watch))
}
