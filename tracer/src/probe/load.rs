//! Loading the embedded program: the tracepoint's layout checked, the kernel's offsets
//! resolved from BTF into the program's settings, the object loaded with them.

use std::{fs, io, path::Path};

use aya::{Ebpf, EbpfLoader};
use tracer_common::{
    KernelSettings,
    settings::{MAX_PORT_LABELS, OFFSET_UNKNOWN, SockOffsets},
    tracepoint::{self, retransmit, synack},
};

use super::{
    ACCEPT_FUNCTION, BtfError, EBPF_OBJECT, PreflightError, ProbeError, ProbeOptions,
    btf::{self, KernelBtf, NetnsOffsets, TaskOffsets},
    format,
};

/// Refuses a tracepoint whose record layout is not what the program reads.
pub(super) fn check_format(options: &ProbeOptions, tracefs: &Path) -> Result<(), ProbeError> {
    let format_path = options.format_file.clone().unwrap_or_else(|| {
        tracefs.join("events").join(tracepoint::CATEGORY).join(tracepoint::NAME).join("format")
    });
    let format_text = fs::read_to_string(&format_path).map_err(|source| {
        let path = format_path.display().to_string();
        if source.kind() == io::ErrorKind::PermissionDenied {
            ProbeError::Preflight(PreflightError::TracefsUnreadable { path, source })
        } else {
            ProbeError::TracepointMissing { path, source }
        }
    })?;
    format::check(&format_text).map_err(ProbeError::FormatMismatch)
}

/// What the retransmit counters need from BTF beyond the socket's offsets: where a request
/// socket keeps its port, and whether `tcp_retransmit_skb` passes the retransmit's error.
struct RetransmitLayout {
    request_port: u16,
    has_err: bool,
}

fn retransmit_layout(btf: &KernelBtf) -> Result<RetransmitLayout, BtfError> {
    let request_port = btf::request_port_offset(btf)?;
    let arguments = btf.tracepoint_argument_count(retransmit::NAME)?;
    btf.tracepoint_argument_count(synack::NAME)?;
    Ok(RetransmitLayout { request_port, has_err: arguments >= 3 })
}

/// The program's settings, with what BTF says of this kernel's structures.
pub(super) struct Resolved {
    pub(super) settings: KernelSettings,
    /// The socket's field offsets the standby reads (it cannot run without them).
    pub(super) sock: Result<SockOffsets, BtfError>,
    /// Where the accept hook finds the return value (it cannot run without it).
    pub(super) accept_parameters: Result<u32, BtfError>,
    /// Why the retransmit counters cannot run, if they cannot.
    pub(super) retransmits: Result<(), String>,
}

/// Reads the kernel's BTF once, for every offset the programs need.
pub(super) fn resolve(options: &ProbeOptions) -> Result<Resolved, ProbeError> {
    let btf = KernelBtf::load()?;
    let netns = NetnsOffsets::resolve(&btf)?;
    let task = TaskOffsets::resolve(&btf)?;
    let sock = btf::sock_offsets(&btf);
    let sk_err = btf::sk_err_offset(&btf);
    let accept_parameters = btf.parameter_count(ACCEPT_FUNCTION);
    let retransmit_layout = retransmit_layout(&btf);
    // Sorted, as the daemon numbers its port labels.
    let mut labels = options.port_labels.clone();
    labels.sort_unstable();
    labels.dedup();
    labels.truncate(MAX_PORT_LABELS);
    let mut label_ports = [0; MAX_PORT_LABELS];
    label_ports[..labels.len()].copy_from_slice(&labels);
    let settings = KernelSettings {
        filter: options.filter,
        trace_mptcp: u8::from(options.trace_mptcp),
        sk_err_offset: sk_err.unwrap_or_else(|error| {
            log::warn!("failed connections will show no reason: {error}");
            u16::MAX
        }),
        sk_net_offset: netns.sk_net,
        net_inum_offset: netns.net_inum,
        task_group_leader_offset: task.group_leader,
        task_comm_offset: task.comm,
        accept_ret_slot: *accept_parameters.as_ref().unwrap_or(&OFFSET_UNKNOWN),
        tcp_srtt_offset: btf::srtt_offset(&btf).unwrap_or_else(|error| {
            log::warn!(
                "server handshake durations and round-trip times at close are not measured: \
                 {error}"
            );
            OFFSET_UNKNOWN
        }),
        totals: {
            let (offsets, missing) = btf::totals_offsets(&btf);
            for error in missing {
                log::warn!(
                    "closed connections' totals are incomplete (a missing counter reads 0, \
                     a missing sequence field leaves the FIN counted as a byte): {error}"
                );
            }
            offsets
        },
        sock: *sock.as_ref().unwrap_or(&SockOffsets::UNKNOWN),
        request_port_offset: retransmit_layout.as_ref().map_or(u16::MAX, |l| l.request_port),
        retransmit_has_err: retransmit_layout.as_ref().is_ok_and(|l| l.has_err).into(),
        label_ports,
        label_port_count: labels.len() as u32,
        standby_first: options.standby_first.into(),
        wakeup_every: wakeup_every(options.wakeup_batch_bytes.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
            u64::from(options.ring_bytes) / 8 / cpus
        })),
    };
    // The retransmit counters read the socket as the standby does.
    let retransmits = match (&sock, &retransmit_layout) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(error), _) | (_, Err(error)) => Err(error.to_string()),
    };
    Ok(Resolved { settings, sock, accept_parameters, retransmits })
}

/// Loads the object with `settings` and the map sizes of `options`.
pub(super) fn load(
    options: &ProbeOptions,
    settings: &KernelSettings,
    btf: Option<&aya::Btf>,
) -> Result<Ebpf, ProbeError> {
    let mut ebpf = EbpfLoader::new()
        .btf(btf)
        .override_global("SETTINGS", settings, true)
        .map_max_entries("EVENTS", options.ring_bytes)
        .map_max_entries("SOCKETS", options.socket_map_entries)
        .load(EBPF_OBJECT)
        .map_err(ProbeError::Load)?;
    forward_kernel_logs(&mut ebpf);
    Ok(ebpf)
}

/// Parsing the kernel's BTF twice (ours and aya's) takes tens of MiB, freed right after
/// loading; hand those pages back so a long-running daemon does not keep them resident.
pub(super) fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe { libc::malloc_trim(0) };
}

/// Records per CPU between forced wakeups for `batch_bytes` of records: a power of two (the
/// kernel program tests it with a mask), at least 1; 0 when `batch_bytes` is 0.
fn wakeup_every(batch_bytes: u64) -> u64 {
    const SLOT: u64 = tracer_common::RECORD_SIZE as u64 + 8;
    match batch_bytes / SLOT {
        0 if batch_bytes == 0 => 0,
        0 => 1,
        records => 1 << (63 - records.leading_zeros()),
    }
}

/// Kernel-side `warn!` lines (an unexpected kernel) go to this process's log, when a tokio
/// runtime is there to poll them.
fn forward_kernel_logs(ebpf: &mut Ebpf) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    match aya_log::EbpfLogger::init(ebpf) {
        // SAFETY: the logger owns its ring-buffer fd for as long as the AsyncFd holds it.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(mut logger) => {
                tokio::spawn(async move {
                    while let Ok(mut guard) = logger.readable_mut().await {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(error) => log::debug!("kernel log forwarding unavailable: {error}"),
        },
        Err(error) => log::debug!("kernel log forwarding unavailable: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeups_come_every_power_of_two_records() {
        assert_eq!(wakeup_every(0), 0);
        assert_eq!(wakeup_every(1), 1);
        let slot = tracer_common::RECORD_SIZE as u64 + 8;
        assert_eq!(wakeup_every(4096 * slot), 4096);
        assert_eq!(wakeup_every(4096 * slot - 1), 2048);
        assert_eq!(wakeup_every(slot - 1), 1);
    }
}
