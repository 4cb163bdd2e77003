//! `tcpstate run`: the daemon. Loads the probe, seeds the socket table from `sock_diag`,
//! aggregates every transition, reconciles with fresh dumps, and serves it all over HTTP.
//!
//! Rooms: `core` (the socket table, the reader's loop, the interface every diagnosis
//! implements), `collectors` (one module per diagnosis), `serve` (HTTP), `export` (the
//! Prometheus exposition and OTLP), and `status` (the daemon's health, a leaf).

mod collectors;
mod core;
mod export;
mod serve;
mod status;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;

pub(crate) use self::{collectors::ChurnThresholds, core::KernelMapSize};
pub(crate) use self::{
    collectors::DESTINATION_WINDOW_SECONDS,
    core::{groups::GroupBy, table::BYTES_PER_SOCKET},
    export::otlp::{OtlpSettings, SettingError as OtlpSettingError, check as check_otlp},
};
use self::{
    core::{
        Aggregator, Diagnoses, KernelMapPressure, KernelOwners, PortLabels, Shared,
        reader_loop::{self, Reading, dump_namespaces},
    },
    export::{
        exposition::Exporter,
        otlp::{OtlpExport, outcomes::OtlpStatus},
    },
    serve::HttpServer,
};
use crate::{
    clock::monotonic_ns,
    cmdline::CmdlinePolicy,
    probe::{KernelSockets, Probe, ProbeOptions},
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
    /// A socket whose queued data does not move for longer than this is stalled; `None`:
    /// stalls are not looked for (the dumps ask no `tcp_info` of ESTABLISHED sockets).
    pub(crate) stall_threshold: Option<Duration>,
    /// When a destination's short connections count as churn.
    pub(crate) churn: collectors::ChurnThresholds,
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
    let listener = serve::bind(config.listen)?;
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
    let labels = PortLabels::new(config.port_labels.clone());
    let kernel_sockets = kernel_sockets(&mut probe);
    let diagnoses = collectors::all(&config, &labels, kernel_sockets.clone());
    let shared = seed(&config, &probe, &diagnoses, labels, listener.local_addr()?).await?;
    let (flush_requests, flushes) = tokio::sync::mpsc::channel::<Flush>(16);
    let otlp_status = config.otlp.is_some().then(|| Arc::new(Mutex::new(OtlpStatus::default())));
    let exporter = Arc::new(Exporter::new(
        shared.clone(),
        diagnoses.clone(),
        config.group_by,
        otlp_status.clone(),
    ));
    let http = HttpServer::start(
        listener,
        &shared,
        diagnoses.clone(),
        config.web_config.clone(),
        exporter.clone(),
        flush_requests.clone(),
    );
    let otlp = config
        .otlp
        .clone()
        .zip(otlp_status)
        .map(|(settings, status)| OtlpExport::start(settings, status, exporter))
        .transpose()?;
    let watch = start_watch(kernel_sockets, &shared, &diagnoses);
    let listener_dumps = tokio::spawn(reader_loop::dump_listeners(diagnoses.clone()));
    let kernel_map = KernelMapPressure::new(config.probe.socket_map_entries);
    let reading = Reading {
        probe: &probe,
        reader,
        shared: &shared,
        diagnoses,
        flushes,
        flush_requests,
        kernel_map,
    };
    reading.until(stop, config.reconcile_interval).await?;
    log::info!("stopping: detaching the probe");
    watch.abort();
    listener_dumps.abort();
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
    diagnoses: &Diagnoses,
    labels: PortLabels,
    listen: std::net::SocketAddr,
) -> anyhow::Result<Arc<Shared>> {
    let shared = Arc::new(Shared::new(Aggregator::new(config.max_sockets, labels)));
    shared.update_status(|status| {
        status.parts = probe.parts().to_vec();
        status.map_memory = probe.map_memory().to_vec();
    });
    shared.aggregator().begin_dump();
    let (dumps, started, finished) = dump_namespaces(diagnoses.need_queued_sockets()).await?;
    shared.update_status(|status| status.netns_refused = dumps.refused);
    let tls = config.web_config.as_ref().is_some_and(|w| w.tls.is_some());
    let scheme = if tls { "https" } else { "http" };
    for diagnosis in diagnoses.iter() {
        diagnosis.sockets_dumped(&dumps.dumps);
    }
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

/// The kernel's per-socket map, where the accept hook runs: only that hook records owners no
/// record carries; without it, lookups there would find nothing.
fn kernel_sockets(probe: &mut Probe) -> Option<Arc<KernelSockets>> {
    let accept_hook =
        probe.parts().iter().any(|p| p.part == crate::probe::Part::AcceptOwner && p.active());
    accept_hook
        .then(|| probe.socket_map())
        .and_then(|map| {
            map.inspect_err(|error| {
                log::warn!("accepted sockets may show no owner until they close: {error:#}");
            })
            .ok()
        })
        .map(Arc::new)
}

/// The once-a-second watch: owners of accepted sockets from the kernel's map, then the
/// diagnoses that look at the table.
fn start_watch(
    kernel_sockets: Option<Arc<KernelSockets>>,
    shared: &Arc<Shared>,
    diagnoses: &Diagnoses,
) -> tokio::task::JoinHandle<()> {
    let kernel_owners = kernel_sockets.map(KernelOwners::new);
    if kernel_owners.is_some() {
        shared.aggregator().queue_unnamed_sockets();
    }
    tokio::spawn(reader_loop::watch_every_second(shared.clone(), kernel_owners, diagnoses.clone()))
}
