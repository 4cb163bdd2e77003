//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) and how they relate to wall time.

/// Nanoseconds of CLOCK_MONOTONIC now: the clock the kernel program stamps records with.
pub(crate) fn monotonic_ns() -> u64 {
    read_clock(libc::CLOCK_MONOTONIC)
}

fn read_clock(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts kernel timestamps to local wall-clock time of day.
pub(crate) struct WallClock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in nanoseconds, when created.
    offset_ns: i128,
}

impl WallClock {
    pub(crate) fn now() -> Self {
        let mono = read_clock(libc::CLOCK_MONOTONIC);
        let real = read_clock(libc::CLOCK_REALTIME);
        Self { offset_ns: i128::from(real) - i128::from(mono) }
    }

    /// `HH:MM:SS.mmm` in local time.
    pub(crate) fn time_of_day(&self, ts_ns: u64) -> String {
        let real_ns = i128::from(ts_ns) + self.offset_ns;
        let secs = (real_ns / 1_000_000_000) as libc::time_t;
        let millis = (real_ns % 1_000_000_000) / 1_000_000;
        // SAFETY: `tm` is plain data; localtime_r writes it and only reads `secs`.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        unsafe { libc::localtime_r(&secs, &mut tm) };
        format!("{:02}:{:02}:{:02}.{millis:03}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}
