//! Histograms of durations on one set of log-spaced buckets, as the core's stays and the
//! diagnoses' timings use them: observed with integer comparisons, served as Prometheus histograms.

/// Upper bounds of the stay histogram's buckets, in seconds: log-spaced (1-3-10) from 10 µs to
/// 1000 s, then one hour.
pub(crate) const DURATION_BUCKETS: [f64; 18] = [
    1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0,
    1000.0, 3600.0,
];

/// The same bounds in whole nanoseconds: a record's stay is sorted into its bucket with integer
/// comparisons, where a division and float comparisons per record took a tenth of the
/// daemon's CPU under a connection storm.
pub(crate) const DURATION_BUCKET_NS: [u64; DURATION_BUCKETS.len()] = {
    let mut ns = [0; DURATION_BUCKETS.len()];
    let mut i = 0;
    while i < ns.len() {
        ns[i] = (DURATION_BUCKETS[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    ns
};

/// Completed stays in one state whose length is exactly known.
#[derive(Clone, Debug, Default)]
pub(crate) struct DurationHistogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    pub sum_ns: u128,
    pub count: u64,
}

impl DurationHistogram {
    pub(crate) fn observe(&mut self, ns: u64) {
        let bucket = DURATION_BUCKET_NS.partition_point(|&bound| bound < ns);
        self.buckets[bucket] += 1;
        self.sum_ns += u128::from(ns);
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_log_spaced() {
        let mut h = DurationHistogram::default();
        h.observe(5_000); // 5 µs: first bucket (<= 10 µs)
        h.observe(2_000_000_000); // 2 s: the 3 s bucket
        h.observe(7_200_000_000_000); // 2 h: +Inf
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[DURATION_BUCKETS.iter().position(|&b| b == 3.0).unwrap()], 1);
        assert_eq!(h.buckets[DURATION_BUCKETS.len()], 1);
        assert_eq!(h.count, 3);
    }

    #[test]
    fn stays_on_a_bound_fall_in_its_bucket_as_prometheus_le_says() {
        assert_eq!(DURATION_BUCKET_NS[0], 10_000);
        assert_eq!(DURATION_BUCKET_NS[DURATION_BUCKETS.len() - 1], 3_600_000_000_000);
        for (i, &bound) in DURATION_BUCKET_NS.iter().enumerate() {
            assert_eq!(bound as f64 / 1e9, DURATION_BUCKETS[i], "bound {i} converts back exactly");
            for (ns, bucket) in [(bound - 1, i), (bound, i), (bound + 1, i + 1)] {
                let mut h = DurationHistogram::default();
                h.observe(ns);
                assert_eq!(h.buckets[bucket], 1, "{ns} ns belongs in bucket {bucket}");
            }
        }
    }
}
