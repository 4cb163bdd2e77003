//! Command-line interface: subcommands, flags, their environment variables, and validation.
//! A value outside its range is a usage error (exit status 2) that names the flag and the range.
//!
//! The one module that knows clap: each command takes a plain configuration, built here from
//! the parsed arguments (`RunArgs::config`, `WatchArgs::config`, ...).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, FromArgMatches as _, Parser, Subcommand};
use tracer_common::{TcpState, settings::KernelFilter};

mod values;

use self::values::{
    parse_cgroup_path, parse_churn_lifetime, parse_churn_rate, parse_container_id, parse_count,
    parse_listen, parse_max_sockets, parse_pod, parse_port, parse_reconcile_interval,
    parse_ring_bytes, parse_stall_threshold, parse_threshold, parse_watch_duration,
};
use crate::{
    client::{DaemonTls, DaemonUrl},
    cmdline::CmdlinePolicy,
    daemon::{self, KernelMapSize},
    leaks,
    probe::{DEFAULT_KERNEL_SOCKETS, ProbeOptions},
    socket::Family,
    top, watch,
};

#[derive(Debug, Parser)]
#[command(
    name = "tcpstate",
    version,
    about = "Trace TCP socket state changes with eBPF: live stream, Prometheus metrics, CLOSE_WAIT leaks",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Command {
    /// The subcommand's name on the command line.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Run(_) => "run",
            Self::Watch(_) => "watch",
            Self::Leaks(_) => "leaks",
            Self::Check(_) => "check",
            Self::Explain(_) => "explain",
            Self::Top(_) => "top",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: aggregate every transition and serve Prometheus metrics and a JSON API.
    Run(RunArgs),
    /// Stream TCP state transitions as they happen, until Ctrl-C, --duration or --count.
    Watch(WatchArgs),
    /// List CLOSE_WAIT leaks and the processes holding them, from the daemon or, when none
    /// answers, a one-shot snapshot. Exit status: 0 no leaks, 1 leaks, 2 usage error, 3 failure.
    Leaks(LeaksArgs),
    /// Say whether this host can run tcpstate and what would be degraded: kernel, privileges,
    /// BTF, tracefs, each program loaded and detached for real, sock_diag, namespaces.
    /// Exit status: 0 runs fully, 1 cannot run, 2 usage error, 3 runs degraded.
    Check(CheckArgs),
    /// What a TCP state means for you: who is in it, what leads in and out, what a pile-up
    /// usually means, what to check, the kernel settings that matter. Without a state, the
    /// state diagram.
    Explain(ExplainArgs),
    /// A live view, refreshed each second: sockets per state and their trend, transitions per
    /// second, leaking processes and stuck listeners, failed connections and retransmits with
    /// their destinations, lost events. `s` changes the order, `q` quits. Reads the kernel itself (as root) or, with --daemon, a running daemon.
    Top(TopArgs),
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Read this daemon (its --listen address) instead of attaching to the kernel.
    #[arg(long, env = "TCPSTATE_DAEMON", value_name = "URL")]
    pub(crate) daemon: Option<DaemonUrl>,
    #[command(flatten)]
    pub(crate) daemon_tls: DaemonTlsArgs,
    /// The order of every panel's rows at start: largest first, largest change over the last
    /// minute first, or by state (`s` cycles through them).
    #[arg(long, value_enum, default_value_t = top::SortKey::Count)]
    pub(crate) sort: top::SortKey,
    /// When the output is not a terminal, a plain screen is printed each second: stop after
    /// this many.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) count: Option<u64>,
    /// Without --daemon: sockets in CLOSE_WAIT for longer than this are leaks (as for `run`).
    #[arg(long, env = "TCPSTATE_CLOSE_WAIT_THRESHOLD", default_value = "60", value_parser = parse_threshold, value_name = "SECS")]
    pub(crate) close_wait_threshold: Duration,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A state name as tcpstate prints it, e.g. CLOSE_WAIT.
    pub state: Option<TcpState>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print the findings as JSON: `kernel`, `verdict` (ok, degraded, fails) and `findings`,
    /// each with `check`, `verdict` and `detail`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LeaksArgs {
    /// The daemon to ask (its --listen address).
    #[arg(
        long,
        env = "TCPSTATE_DAEMON",
        default_value = "http://127.0.0.1:9977",
        value_name = "URL"
    )]
    pub(crate) daemon: DaemonUrl,
    #[command(flatten)]
    pub(crate) daemon_tls: DaemonTlsArgs,

    /// Print the report as JSON (the daemon's /api/leaks format).
    #[arg(long)]
    pub json: bool,

    /// In snapshot mode, how long a socket must have been in CLOSE_WAIT to count as leaked
    /// (seconds, or with s/m/h). A daemon applies its own setting.
    #[arg(long, env = "TCPSTATE_CLOSE_WAIT_THRESHOLD", default_value = "60", value_parser = parse_threshold, value_name = "SECS")]
    pub(crate) close_wait_threshold: Duration,

    /// In snapshot mode, how much of each process's command line to show: `redacted` masks
    /// secret-looking values. A daemon applies its own setting.
    #[arg(long, env = "TCPSTATE_CMDLINE", value_enum, default_value_t = CmdlinePolicy::Redacted, value_name = "full|redacted|off")]
    pub(crate) cmdline: CmdlinePolicy,
}

/// How to reach a daemon served over TLS (its `--web-config` has `tls_server_config`).
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct DaemonTlsArgs {
    /// For an https:// daemon: the CA certificate (PEM) that signed the daemon's certificate.
    #[arg(long, env = "TCPSTATE_DAEMON_CA", value_name = "FILE")]
    pub(crate) daemon_ca: Option<PathBuf>,
    /// For an https:// daemon that verifies clients (`client_ca_file`): this client's
    /// certificate (PEM), with --daemon-key.
    #[arg(long, env = "TCPSTATE_DAEMON_CERT", value_name = "FILE", requires = "daemon_key")]
    pub(crate) daemon_cert: Option<PathBuf>,
    /// The private key (PEM) of --daemon-cert.
    #[arg(long, env = "TCPSTATE_DAEMON_KEY", value_name = "FILE", requires = "daemon_cert")]
    pub(crate) daemon_key: Option<PathBuf>,
}

impl DaemonTlsArgs {
    pub(crate) fn config(self) -> DaemonTls {
        // clap's `requires` makes the certificate and the key come together.
        let client_cert = self.daemon_cert.zip(self.daemon_key);
        DaemonTls { ca: self.daemon_ca, client_cert }
    }
}

/// The daemon's default address: loopback only, so nothing is exposed without a decision.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:9977";
/// Most `--port-label` ports: each adds series to two metric families.
pub(crate) use tracer_common::settings::MAX_PORT_LABELS;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address and port of the HTTP endpoint (/metrics, /healthz, /api/...). Loopback by
    /// default; use 0.0.0.0:9977 to let a remote Prometheus scrape it.
    #[arg(long, env = "TCPSTATE_LISTEN", default_value = DEFAULT_LISTEN, value_parser = parse_listen, value_name = "IP:PORT")]
    pub(crate) listen: SocketAddr,

    #[arg(long, env = "TCPSTATE_MAX_SOCKETS", help = max_sockets_help(), default_value_t = 1_000_000, value_parser = parse_max_sockets, value_name = "N")]
    pub(crate) max_sockets: usize,

    /// How often the table is compared with a fresh sock_diag dump and repaired, in seconds
    /// (1 to 3600; `30s`, `2m` also work). TIME_WAIT counts are sampled at the same pace.
    #[arg(long, env = "TCPSTATE_RECONCILE_INTERVAL", default_value = "30", value_parser = parse_reconcile_interval, value_name = "SECS")]
    pub(crate) reconcile_interval: Duration,

    /// A socket in CLOSE_WAIT for longer than this is a leak: its process never closed it
    /// after the peer hung up. Seconds (0.1 to 604800), or with s/m/h: `90`, `2m`.
    #[arg(long, env = "TCPSTATE_CLOSE_WAIT_THRESHOLD", default_value = "60", value_parser = parse_threshold, value_name = "SECS")]
    pub(crate) close_wait_threshold: Duration,

    /// A listener whose accept queue stays at 90 % of its limit or more for longer than this
    /// is stuck: its process stopped calling accept(). Seconds (0.1 to 604800), or with
    /// s/m/h. Queues are looked at every 2 seconds.
    #[arg(long, env = "TCPSTATE_LISTEN_QUEUE_THRESHOLD", default_value = "30", value_parser = parse_threshold, value_name = "SECS")]
    pub(crate) listen_queue_threshold: Duration,

    /// An ESTABLISHED or CLOSE_WAIT socket whose queued data does not move for longer than
    /// this is stalled: its process stopped reading, or its peer stopped reading or is gone.
    /// Seconds (1 to 604800), or with s/m/h; looked at on each reconciliation; 0 turns it off.
    #[arg(long, env = "TCPSTATE_STALL_THRESHOLD", default_value = "60", value_parser = parse_stall_threshold, value_name = "SECS")]
    pub(crate) stall_threshold: Duration,

    /// A destination (or a local service) that gets at least this many new connections per
    /// second over the last minute, living a median of less than --churn-lifetime, is
    /// connection churn: named with its process (1 to 1000000).
    #[arg(long, env = "TCPSTATE_CHURN_RATE", default_value = "50", value_parser = parse_churn_rate, value_name = "PER_SECOND")]
    pub(crate) churn_rate: f64,

    /// The median lifetime under which a destination's connections are churn, in seconds
    /// (0.001 to 3600; `0.1` is 100 ms).
    #[arg(long, env = "TCPSTATE_CHURN_LIFETIME", default_value = "0.1", value_parser = parse_churn_lifetime, value_name = "SECS")]
    pub(crate) churn_lifetime: Duration,

    /// Add a `port` label for this local port to tcpstate_transitions_total and
    /// tcpstate_sockets (repeatable, up to 32; comma-separated in the environment). All
    /// other ports are port="other".
    #[arg(long = "port-label", env = "TCPSTATE_PORT_LABELS", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub(crate) port_labels: Vec<u16>,

    /// TLS and basic authentication for the endpoint: a web configuration file in the format
    /// of Prometheus exporters (tls_server_config, basic_auth_users), as node_exporter reads.
    #[arg(long, env = "TCPSTATE_WEB_CONFIG", value_parser = crate::web_config::parse, value_name = "FILE")]
    pub(crate) web_config: Option<crate::web_config::WebConfig>,

    /// How much of a leaking process's command line /api/leaks and the log show: `redacted`
    /// masks values whose name looks secret (password, token, key, ...) and passwords in URLs.
    #[arg(long, env = "TCPSTATE_CMDLINE", value_enum, default_value_t = CmdlinePolicy::Redacted, value_name = "full|redacted|off")]
    pub(crate) cmdline: CmdlinePolicy,

    /// Split tcpstate_sockets and tcpstate_close_wait_leaked_sockets by the owner's
    /// container or pod (labels namespace, pod, container): the 20 largest groups, the rest
    /// summed as container="other". Off by default.
    #[arg(long, env = "TCPSTATE_GROUP_BY", value_enum, value_name = "container|pod")]
    pub(crate) group_by: Option<daemon::GroupBy>,

    /// Push the metrics over OTLP/HTTP (protobuf) to this receiver as well: a base URL such as
    /// http://collector:4318 (/v1/metrics is appended) or the full URL. Without it, the
    /// standard OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_METRICS_ENDPOINT turn the
    /// export on; OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _CERTIFICATE, _CLIENT_CERTIFICATE,
    /// _CLIENT_KEY, OTEL_METRIC_EXPORT_INTERVAL (ms, default 60000), OTEL_RESOURCE_ATTRIBUTES
    /// and OTEL_SERVICE_NAME are read as the OpenTelemetry SDKs read them.
    #[arg(long, value_name = "URL")]
    pub(crate) otlp_endpoint: Option<String>,

    #[command(flatten)]
    pub(crate) probe: ProbeArgs,
}

/// Settings of the kernel probe, shared by every command that loads it.
#[derive(Debug, Clone, Args)]
pub(crate) struct ProbeArgs {
    /// Also trace MPTCP sockets (protocol 262), not only TCP.
    #[arg(long, env = "TCPSTATE_MPTCP")]
    pub(crate) mptcp: bool,

    /// Size of the kernel-to-userspace ring buffer: a power of two from 4K to 1G
    /// (suffixes K, M, G are binary). Larger absorbs longer bursts. Default: 4M for `run`,
    /// 16M for `watch`, whose output (a terminal, a pipe) can stall its reading.
    #[arg(long, env = "TCPSTATE_RING_BYTES", value_parser = parse_ring_bytes, value_name = "BYTES")]
    pub(crate) ring_bytes: Option<u32>,

    #[arg(long, env = "TCPSTATE_KERNEL_SOCKETS", help = kernel_sockets_help(), value_parser = clap::value_parser!(u32).range(1024..=16_777_216), value_name = "N")]
    pub(crate) kernel_sockets: Option<u32>,

    /// Read the tracepoint layout from this file instead of tracefs (testing the layout check).
    #[arg(long, hide = true, value_name = "FILE")]
    pub(crate) tracepoint_format: Option<PathBuf>,
}

impl ProbeArgs {
    /// The probe these flags describe, with `filter` deciding which records are sent and
    /// the command's own ring size unless `--ring-bytes` sets one.
    pub(crate) fn probe_options(
        &self,
        filter: KernelFilter,
        default_ring_bytes: u32,
    ) -> ProbeOptions {
        ProbeOptions {
            ring_bytes: self.ring_bytes.unwrap_or(default_ring_bytes),
            socket_map_entries: self.kernel_sockets.unwrap_or(DEFAULT_KERNEL_SOCKETS),
            trace_mptcp: self.mptcp,
            filter,
            wakeup_batch_bytes: None,
            format_file: self.tracepoint_format.clone(),
            standby_first: false,
            port_labels: Vec::new(),
        }
    }
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Print one JSON object per line instead of aligned columns.
    #[arg(long)]
    pub json: bool,

    /// One line per closed connection, as `tcplife` shows them: owner, addresses, bytes
    /// sent and received, lifetime and round-trip time at close. Without `--state`, the
    /// kernel sends only transitions to CLOSE.
    #[arg(long)]
    pub closed: bool,

    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_watch_duration)]
    pub(crate) duration: Option<u64>,

    /// At exit, print one line of delivery statistics to stderr: records read and shown,
    /// transitions lost by cause, kernel-side counts (key=value, for scripts).
    #[arg(long)]
    pub(crate) stats: bool,

    /// Stop after printing this many transitions.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub(crate) count: Option<u64>,

    /// Keep transitions where either port is PORT (repeatable, up to 8). Runs in the kernel.
    #[arg(long = "port", value_name = "PORT", value_parser = parse_port)]
    pub(crate) ports: Vec<u16>,

    /// Keep transitions whose local port is PORT (repeatable, up to 8). Runs in the kernel.
    #[arg(long = "sport", value_name = "PORT", value_parser = parse_port)]
    pub(crate) sports: Vec<u16>,

    /// Keep transitions whose remote port is PORT (repeatable, up to 8). Runs in the kernel.
    #[arg(long = "dport", value_name = "PORT", value_parser = parse_port)]
    pub(crate) dports: Vec<u16>,

    /// Keep transitions where either address is IP (repeatable). Runs in userspace.
    #[arg(long = "addr", value_name = "IP")]
    pub(crate) addrs: Vec<IpAddr>,

    /// Keep IPv4 sockets only. Runs in the kernel.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub(crate) ipv4: bool,

    /// Keep IPv6 sockets only. Runs in the kernel.
    #[arg(short = '6', long = "ipv6")]
    pub(crate) ipv6: bool,

    /// Keep transitions whose old or new state is NAME, e.g. CLOSE_WAIT (repeatable).
    /// Runs in the kernel.
    #[arg(long = "state", value_name = "NAME")]
    pub(crate) states: Vec<TcpState>,

    /// Keep sockets owned by a process of container ID (the full id or a prefix, as `docker
    /// ps` and `crictl ps` show it). Runs in userspace, on the owner's cgroup.
    #[arg(long, value_name = "ID", value_parser = parse_container_id)]
    pub(crate) container: Option<String>,

    /// Keep sockets owned by a process of cgroup PATH or below it (as /proc/PID/cgroup
    /// writes it, e.g. /system.slice/nginx.service). Runs in userspace.
    #[arg(long, value_name = "PATH", value_parser = parse_cgroup_path)]
    pub(crate) cgroup: Option<String>,

    /// Keep sockets owned by a process of Kubernetes pod NAMESPACE/NAME (named from
    /// /var/log/pods). Runs in userspace.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_pod)]
    pub(crate) pod: Option<(String, String)>,

    #[command(flatten)]
    pub(crate) probe: ProbeArgs,
}

/// The sizes quoted come from the types they describe.
fn max_sockets_help() -> String {
    format!(
        "Most sockets the daemon tracks (1000 to 50000000), about {} bytes each. Beyond it, new \
         sockets are not tracked (ages, owners and leaks only for those held) while the \
         per-state gauges stay exact from sock_diag dumps; tcpstate_table_saturated says so.",
        daemon::BYTES_PER_SOCKET
    )
}

fn kernel_sockets_help() -> String {
    format!(
        "Sockets the kernel program tracks at once (an LRU map, preallocated: {} bytes each). \
         Default: `run` sizes it for the host at start, twice the TCP sockets present rounded \
         up to a power of two, at least {DEFAULT_KERNEL_SOCKETS} and at most --max-sockets \
         rounded up; the other commands take {DEFAULT_KERNEL_SOCKETS}.",
        crate::probe::KERNEL_SOCKET_SLOT_BYTES
    )
}

impl RunArgs {
    pub fn config(self) -> daemon::Config {
        // `validate` refused bad settings for `run`; `top`'s own daemon exports nothing.
        let otlp = self.otlp_settings().ok().flatten();
        let kernel_sockets = match self.probe.kernel_sockets {
            Some(slots) => KernelMapSize::Given(slots),
            None => KernelMapSize::for_host(self.max_sockets),
        };
        daemon::Config {
            listen: self.listen,
            max_sockets: self.max_sockets,
            reconcile_interval: self.reconcile_interval,
            close_wait_threshold: self.close_wait_threshold,
            listen_queue_threshold: self.listen_queue_threshold,
            stall_threshold: (!self.stall_threshold.is_zero()).then_some(self.stall_threshold),
            churn: daemon::ChurnThresholds { rate: self.churn_rate, lifetime: self.churn_lifetime },
            web_config: self.web_config,
            cmdline: self.cmdline,
            group_by: self.group_by,
            probe: ProbeOptions {
                port_labels: self.port_labels.clone(),
                socket_map_entries: kernel_sockets.slots(),
                ..self.probe.probe_options(KernelFilter::ALL, daemon::RING_BYTES)
            },
            kernel_sockets,
            port_labels: self.port_labels,
            otlp,
        }
    }

    /// The OTLP export's settings from `--otlp-endpoint` and the environment; `None` when
    /// neither asks for it.
    fn otlp_settings(&self) -> Result<Option<daemon::OtlpSettings>, daemon::OtlpSettingError> {
        let settings = daemon::OtlpSettings::read(self.otlp_endpoint.as_deref(), |name| {
            std::env::var(name).ok()
        })?;
        if let Some(settings) = &settings {
            daemon::check_otlp(settings)?;
        }
        Ok(settings)
    }
}

impl WatchArgs {
    pub fn config(self) -> watch::Config {
        let family = match (self.ipv4, self.ipv6) {
            (true, _) => Some(Family::Inet),
            (_, true) => Some(Family::Inet6),
            _ => None,
        };
        let filter = watch::Filter {
            ports: self.ports,
            sports: self.sports,
            dports: self.dports,
            family,
            states: self.states,
            addrs: self.addrs,
            container: self.container,
            cgroup: self.cgroup,
            pod: self.pod,
        };
        let mut kernel_filter = filter.kernel_filter();
        if self.closed && kernel_filter.state_mask == 0 {
            kernel_filter.state_mask = TcpState::CLOSE.mask_bit();
        }
        watch::Config {
            json: self.json,
            closed: self.closed,
            duration: self.duration.map(Duration::from_secs),
            stats: self.stats,
            count: self.count,
            probe: self.probe.probe_options(kernel_filter, watch::RING_BYTES),
            filter,
        }
    }
}

impl LeaksArgs {
    pub fn config(self) -> leaks::command::Config {
        leaks::command::Config {
            daemon: self.daemon,
            tls: self.daemon_tls.config(),
            json: self.json,
            close_wait_threshold: self.close_wait_threshold,
            cmdline: self.cmdline,
        }
    }
}

impl TopArgs {
    /// Without `--daemon`, top runs a daemon of its own on a loopback port, with `run`'s
    /// settings from the same `TCPSTATE_*` variables (read by `run`'s own parsers) and top's
    /// `--close-wait-threshold`.
    pub fn config(self) -> Result<top::Config, clap::Error> {
        let source = match self.daemon {
            Some(url) => top::Source::Daemon { url, tls: self.daemon_tls.config() },
            None => {
                let run = RunArgs::augment_args(clap::Command::new("run"))
                    .try_get_matches_from(["run", "--listen", "127.0.0.1:0"])?;
                let mut daemon = RunArgs::from_arg_matches(&run)?.config();
                daemon.close_wait_threshold = self.close_wait_threshold;
                // Nothing but this process reads it: no TLS or passwords in its way.
                daemon.web_config = None;
                // The metrics go to the screen only.
                daemon.otlp = None;
                top::Source::Kernel(Box::new(daemon))
            }
        };
        Ok(top::Config { source, sort: self.sort, count: self.count })
    }
}

/// Checks that cannot be expressed as one flag's value parser. Returns the message of a usage
/// error, if any.
pub fn validate(cli: &Cli) -> Result<(), String> {
    match &cli.command {
        Command::Run(args) => {
            if args.port_labels.len() > MAX_PORT_LABELS {
                return Err(format!(
                    "--port-label is given {} ports; at most {MAX_PORT_LABELS} are supported",
                    args.port_labels.len()
                ));
            }
            args.otlp_settings().map(drop).map_err(|error| error.to_string())
        }
        Command::Leaks(args) => args.daemon_tls.clone().config().check(&args.daemon),
        Command::Top(args) => match &args.daemon {
            Some(url) => args.daemon_tls.clone().config().check(url),
            None if args.daemon_tls.clone().config().is_given() => {
                Err("--daemon-ca, --daemon-cert and --daemon-key go with --daemon".to_owned())
            }
            None => Ok(()),
        },
        Command::Check(_) | Command::Explain(_) => Ok(()),
        Command::Watch(args) => {
            let max = tracer_common::settings::MAX_FILTER_PORTS;
            for (flag, ports) in
                [("--port", &args.ports), ("--sport", &args.sports), ("--dport", &args.dports)]
            {
                if ports.len() > max {
                    return Err(format!(
                        "{flag} is given {} times; at most {max} are supported",
                        ports.len()
                    ));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of every subcommand has help of its own: a doc comment that slipped to
    /// the next field shows up here as a flag without help, or two flags sharing one.
    #[test]
    fn every_flag_has_its_own_help() {
        use clap::CommandFactory as _;
        let mut cli = Cli::command();
        cli.build();
        for command in cli.get_subcommands() {
            let mut seen: Vec<(String, String)> = Vec::new();
            for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
                let id = arg.get_id().to_string();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert!(!help.trim().is_empty(), "`{}` --{id} has no help", command.get_name());
                if let Some((other, _)) = seen.iter().find(|(_, h)| *h == help) {
                    panic!("`{}` --{id} shares its help with --{other}", command.get_name());
                }
                seen.push((id, help));
            }
        }
    }

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
