//! The probe's maps: how much kernel memory each takes, taking one out of the loaded object,
//! and reading the per-socket map.

use std::fs;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError},
};
use tracer_common::SocketState;

use super::ProbeError;

/// Kernel memory one of the probe's maps takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MapMemory {
    pub name: String,
    pub bytes: u64,
}

/// `BPF_MAP_TYPE_RINGBUF`, as `/proc/<pid>/fdinfo` prints it.
const RINGBUF_MAP_TYPE: &str = "27";

/// Kernel memory of this process's BPF maps, by name, as the kernel accounts it (`memlock`
/// in `/proc/self/fdinfo`). The probe's maps are preallocated (the ring, the arrays, the LRU
/// hash), so this is what they take from load on, whatever they hold. Read at attach, when
/// the probe's maps are the only ones this process has open.
pub(super) fn map_memory() -> Vec<MapMemory> {
    let Ok(fds) = fs::read_dir("/proc/self/fdinfo") else { return Vec::new() };
    let mut maps: Vec<MapMemory> = fds
        .flatten()
        .filter_map(|entry| {
            let info = fs::read_to_string(entry.path()).ok()?;
            let field = |name: &str| {
                info.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).map(str::to_owned)
            };
            let id: u32 = field("map_id:")?.parse().ok()?;
            let mut bytes: u64 = field("memlock:")?.parse().ok()?;
            if field("map_type:")? == RINGBUF_MAP_TYPE {
                // Kernels from 5.11 to 6.3 account a ring as key and value sizes (0) times
                // its entries: 0. Its data pages are its size in bytes at least.
                bytes = bytes.max(field("max_entries:")?.parse().ok()?);
            }
            let name = aya::maps::MapInfo::from_id(id).ok()?.name_as_str()?.to_owned();
            Some(MapMemory { name, bytes })
        })
        .collect();
    maps.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    maps.dedup_by(|a, b| a.name == b.name);
    maps
}

/// Kernel memory per slot of the per-socket map, preallocated: the key, the `SocketState`
/// value and the LRU hash table's own header per element (64 bytes), as the kernel accounts
/// it in fdinfo. `--kernel-sockets`' help quotes it; `tcpstate_kernel_map_bytes` reports the
/// kernel's own figure.
pub(crate) const KERNEL_SOCKET_SLOT_BYTES: usize = size_of::<u64>() + size_of::<SocketState>() + 64;

/// The kernel's per-socket map (`SOCKETS`), keyed by socket address.
pub(crate) struct KernelSockets(pub(super) HashMap<MapData, u64, SocketState>);

impl KernelSockets {
    /// The owner the kernel recorded for the live socket at `skaddr`, if it knows one. The
    /// accept hook records the owner of an accepted socket in the map without sending a
    /// record: a socket whose peer hung up before accept() shows it only here.
    pub(crate) fn owner(&self, skaddr: u64) -> Option<SocketState> {
        self.0.get(&skaddr, 0).ok().filter(|entry| entry.owner_tgid != 0)
    }
}

pub(super) fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
    convert(map).map_err(|source| ProbeError::Map { map: name, source })
}

/// Logs what the maps take, once at attach.
pub(super) fn log_memory(maps: &[MapMemory]) {
    let total: u64 = maps.iter().map(|m| m.bytes).sum();
    log::info!(
        "kernel maps take {:.1} MiB: {}",
        total as f64 / f64::from(1 << 20),
        maps.iter()
            .map(|m| format!("{} {:.1} MiB", m.name, m.bytes as f64 / f64::from(1 << 20)))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
