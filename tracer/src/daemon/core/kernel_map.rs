//! The kernel's per-socket map: how many sockets it holds (sized for the host at start unless
//! `--kernel-sockets` says), and a warning once the daemon tracks most of that.

use crate::probe::DEFAULT_KERNEL_SOCKETS;

/// How many sockets the kernel's map holds, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KernelMapSize {
    /// `--kernel-sockets`.
    Given(u32),
    /// Sized for the TCP sockets the host had at start.
    ForHost { present: u64, slots: u32 },
}

impl KernelMapSize {
    /// Twice the TCP sockets present (`TCP: alloc` of /proc/net/sockstat, every namespace's),
    /// rounded up to a power of two: at least the default, at most what the table can track.
    pub(crate) fn for_host(max_sockets: usize) -> Self {
        let present = sockets_present().unwrap_or(0);
        Self::ForHost { present, slots: slots_for(present, max_sockets) }
    }

    pub(crate) fn slots(self) -> u32 {
        match self {
            Self::Given(slots) | Self::ForHost { slots, .. } => slots,
        }
    }

    /// For the startup line: `524288 sockets (twice the 200000 TCP sockets present)`.
    pub(crate) fn describe(self) -> String {
        match self {
            Self::Given(slots) => format!("{slots} sockets (--kernel-sockets)"),
            Self::ForHost { present, slots } if u64::from(slots) > 2 * present => {
                format!("{slots} sockets (at least twice the {present} TCP sockets present)")
            }
            Self::ForHost { present, slots } => format!(
                "{slots} sockets, fewer than twice the {present} TCP sockets present: capped by \
                 --max-sockets"
            ),
        }
    }
}

fn slots_for(present: u64, max_sockets: usize) -> u32 {
    let ceiling = (max_sockets as u64).next_power_of_two().max(u64::from(DEFAULT_KERNEL_SOCKETS));
    let wanted = (2 * present).next_power_of_two();
    wanted.clamp(u64::from(DEFAULT_KERNEL_SOCKETS), ceiling).min(u64::from(u32::MAX)) as u32
}

/// TCP sockets allocated in every namespace (TIME_WAIT apart, which the map never holds).
fn sockets_present() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = text.lines().find(|line| line.starts_with("TCP:"))?;
    let mut fields = tcp.split_whitespace();
    fields.find(|field| *field == "alloc")?;
    fields.next()?.parse().ok()
}

/// Warns once when the daemon tracks more sockets than 80 % of the kernel's map: past its
/// slots the kernel forgets the least recently changed sockets.
pub(crate) struct KernelMapPressure {
    slots: u32,
    warned: bool,
}

impl KernelMapPressure {
    pub(crate) fn new(slots: u32) -> Self {
        Self { slots, warned: false }
    }

    pub(crate) fn check(&mut self, tracked: usize) {
        if self.warned || (tracked as u64) * 5 < u64::from(self.slots) * 4 {
            return;
        }
        self.warned = true;
        log::warn!(
            "the daemon tracks {tracked} sockets, over 80 % of the kernel's per-socket map \
             ({} slots): past it the kernel forgets the least recently changed sockets, whose \
             stays then come from the daemon's table \
             (tcpstate_kernel_untracked_sightings_total{{cause=\"evicted\"}}) and whose owners \
             may be missing; raise --kernel-sockets (TCPSTATE_KERNEL_SOCKETS)",
            self.slots
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_holds_twice_the_sockets_present_within_bounds() {
        let default = DEFAULT_KERNEL_SOCKETS;
        assert_eq!(slots_for(5_000, 1_000_000), default, "never below the default");
        assert_eq!(slots_for(200_000, 1_000_000), 1 << 19);
        assert_eq!(slots_for(3_000_000, 1_000_000), 1 << 20, "at most --max-sockets, rounded up");
        assert_eq!(slots_for(3_000_000, 1_000), default, "a small table keeps the default");
        let sized = KernelMapSize::ForHost { present: 200_000, slots: 1 << 19 };
        assert_eq!(
            sized.describe(),
            "524288 sockets (at least twice the 200000 TCP sockets present)"
        );
        let capped = KernelMapSize::ForHost { present: 3_000_000, slots: 1 << 20 };
        assert!(capped.describe().ends_with("capped by --max-sockets"), "{}", capped.describe());
    }

    #[test]
    fn this_host_has_tcp_sockets_to_count() {
        let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(sockets_present().is_some_and(|n| n >= 1));
    }
}
