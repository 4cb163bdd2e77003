//! Completing the first record of an accepted socket.
//!
//! The kernel moves a socket cloned from a listener to SYN_RECV before it copies the peer's
//! address and port into it (`inet_csk_clone_lock`, Linux 6.1 and older; on 6.12 still for
//! IPv4 clients of a dual-stack listener): that `LISTEN -> SYN_RECV` record shows the
//! listener's addresses and remote port 0. The socket's next record, `SYN_RECV ->
//! ESTABLISHED`, comes microseconds later from the same packet and has them all. Such a record
//! waits here for it and takes its addresses; after `MAX_WAIT_NS` it goes out as it is.

use tracer_common::{TcpState, TransitionRecord};

/// How long a record waits for its socket's next one.
pub(super) const MAX_WAIT_NS: u64 = 100_000_000;
/// Records waiting at most; beyond, the oldest goes out as it is.
const MAX_PENDING: usize = 1024;

#[derive(Default)]
pub(super) struct AcceptedAddresses {
    /// Records waiting for their socket's next record, oldest first.
    pending: Vec<TransitionRecord>,
}

/// A `LISTEN -> SYN_RECV` record without the peer: the kernel had not filled it in yet.
fn lacks_peer(record: &TransitionRecord) -> bool {
    record.oldstate == TcpState::LISTEN
        && record.newstate == TcpState::SYN_RECV
        && record.dport == 0
}

impl AcceptedAddresses {
    /// Takes one record; passes on, in order, every record that is ready.
    pub(super) fn push(
        &mut self,
        record: TransitionRecord,
        mut ready: impl FnMut(TransitionRecord),
    ) {
        if lacks_peer(&record) {
            if self.pending.len() >= MAX_PENDING {
                ready(self.pending.remove(0));
            }
            self.pending.push(record);
            return;
        }
        if !self.pending.is_empty()
            && let Some(at) = self.pending.iter().position(|p| p.skaddr == record.skaddr)
        {
            let mut first = self.pending.remove(at);
            first.family = record.family;
            first.saddr = record.saddr;
            first.daddr = record.daddr;
            first.sport = record.sport;
            first.dport = record.dport;
            ready(first);
        }
        ready(record);
    }

    /// Passes on, as they are, the records that waited since before `now_ns - MAX_WAIT_NS`.
    pub(super) fn expire(&mut self, now_ns: u64, mut ready: impl FnMut(TransitionRecord)) {
        let cutoff = now_ns.saturating_sub(MAX_WAIT_NS);
        while self.pending.first().is_some_and(|r| r.ts_ns < cutoff) {
            ready(self.pending.remove(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::record::AF_INET;

    use super::*;

    fn record(
        skaddr: u64,
        ts_ns: u64,
        old: TcpState,
        new: TcpState,
        dport: u16,
    ) -> TransitionRecord {
        let mut r = TransitionRecord::decode(&[0; tracer_common::RECORD_SIZE]).unwrap();
        r.skaddr = skaddr;
        r.ts_ns = ts_ns;
        r.oldstate = old;
        r.newstate = new;
        r.family = AF_INET;
        r.sport = 80;
        r.dport = dport;
        r
    }

    #[test]
    fn the_first_record_takes_the_addresses_of_the_next() {
        let mut accepted = AcceptedAddresses::default();
        let mut out = Vec::new();
        accepted.push(record(1, 10, TcpState::LISTEN, TcpState::SYN_RECV, 0), |r| out.push(r));
        assert!(out.is_empty(), "waits for its socket's next record");
        let mut next = record(1, 11, TcpState::SYN_RECV, TcpState::ESTABLISHED, 5555);
        next.daddr[..4].copy_from_slice(&[127, 0, 0, 9]);
        accepted.push(record(2, 11, TcpState::CLOSE, TcpState::SYN_SENT, 80), |r| out.push(r));
        accepted.push(next, |r| out.push(r));
        let order: Vec<_> = out.iter().map(|r| (r.skaddr, r.ts_ns)).collect();
        assert_eq!(order, [(2, 11), (1, 10), (1, 11)]);
        assert_eq!((out[1].dport, out[1].daddr[..4].to_vec()), (5555, vec![127, 0, 0, 9]));
        assert_eq!(out[1].oldstate, TcpState::LISTEN, "only addresses are taken");
    }

    #[test]
    fn a_record_whose_socket_goes_quiet_goes_out_as_it_is() {
        let mut accepted = AcceptedAddresses::default();
        let mut out = Vec::new();
        accepted.push(record(1, 1_000, TcpState::LISTEN, TcpState::SYN_RECV, 0), |r| out.push(r));
        accepted.expire(1_000 + MAX_WAIT_NS / 2, |r| out.push(r));
        assert!(out.is_empty());
        accepted.expire(1_001 + MAX_WAIT_NS, |r| out.push(r));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].dport, 0);
    }

    #[test]
    fn complete_records_pass_straight_through() {
        let mut accepted = AcceptedAddresses::default();
        let mut out = Vec::new();
        accepted.push(record(1, 1, TcpState::LISTEN, TcpState::SYN_RECV, 4000), |r| out.push(r));
        assert_eq!(out.len(), 1);
    }
}
