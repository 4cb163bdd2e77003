//! `watch --closed`: one line per closed connection, as `tcplife` prints them: the owner,
//! the addresses, the bytes each way, the lifetime and the round-trip time at close.

use std::{
    borrow::Cow,
    io::{self, Write},
    net::IpAddr,
};

use tracer_common::TransitionRecord;

use super::columns::{address_width, end_line, owner_columns};
use crate::{
    cgroups::CgroupName, clock::WallClock, event::TransitionExt as _, failure::Failure,
    socket::Family,
};

/// The keys of a `--closed --json` line, in order (documented in the README).
pub const CLOSED_JSON_KEYS: [&str; 19] = [
    "ts_ns",
    "skaddr",
    "owner_pid",
    "owner_comm",
    "family",
    "saddr",
    "sport",
    "daddr",
    "dport",
    "role",
    "old",
    "bytes_sent",
    "bytes_received",
    "lifetime_ns",
    "rtt_ns",
    "retransmits",
    "cgroup",
    "container_id",
    "error",
];

/// Which end of the connection this host was, where the kernel saw it begin.
pub(crate) fn role_name(record: &TransitionRecord) -> Option<&'static str> {
    record.accepted().map(|accepted| if accepted { "server" } else { "client" })
}

/// One `--closed --json` line: exactly the keys of `CLOSED_JSON_KEYS`, in this order. One
/// per connection, not per transition, so `serde_json` writes it.
#[derive(serde::Serialize)]
struct JsonClosed<'a> {
    ts_ns: u64,
    skaddr: String,
    owner_pid: Option<u32>,
    owner_comm: Option<Cow<'a, str>>,
    family: Family,
    saddr: IpAddr,
    sport: u16,
    daddr: IpAddr,
    dport: u16,
    role: Option<&'static str>,
    /// The state the connection closed from.
    old: tracer_common::TcpState,
    bytes_sent: u64,
    bytes_received: u64,
    lifetime_ns: Option<u64>,
    rtt_ns: Option<u64>,
    retransmits: u32,
    cgroup: Option<&'a str>,
    container_id: Option<&'a str>,
    error: Option<&'static str>,
}

/// Writes a record that ends a connection as one JSON line; any other record is not one.
pub(super) fn write_json(
    out: &mut impl Write,
    record: &TransitionRecord,
    cgroup: Option<&CgroupName>,
) -> io::Result<()> {
    let Some(totals) = record.closed() else { return Ok(()) };
    let owner = record.owner();
    let line = JsonClosed {
        ts_ns: record.ts_ns,
        skaddr: format!("{:#x}", record.skaddr),
        owner_pid: owner.as_ref().map(|(pid, _)| *pid),
        owner_comm: owner.map(|(_, comm)| comm),
        family: record.family(),
        saddr: record.ip(&record.saddr),
        sport: record.sport,
        daddr: record.ip(&record.daddr),
        dport: record.dport,
        role: role_name(record),
        old: record.oldstate,
        bytes_sent: totals.bytes_sent,
        bytes_received: totals.bytes_received,
        lifetime_ns: record.lifetime_ns(),
        rtt_ns: record.closing_rtt_ns(),
        retransmits: totals.total_retrans,
        cgroup: cgroup.map(|c| c.path.as_str()),
        container_id: cgroup.and_then(|c| c.container.container_id.as_deref()),
        error: record.failure().map(Failure::name),
    };
    serde_json::to_writer(&mut *out, &line).map_err(io::Error::from)?;
    out.write_all(b"\n")
}

/// `tcplife`'s columns.
pub(super) struct ClosedColumns {
    address_width: usize,
    clock: WallClock,
}

impl ClosedColumns {
    pub(super) fn for_family(family: Option<Family>) -> Self {
        Self { address_width: address_width(family), clock: WallClock::now() }
    }

    pub(super) fn write_header(&self, out: &mut impl Write) -> io::Result<()> {
        let width = self.address_width;
        writeln!(
            out,
            "{:<12} {:>7} {:<16} {:<width$} {:<width$} {:<6} {:>9} {:>9} {:>10} {:>8}",
            "TIME", "PID", "COMM", "LOCAL", "REMOTE", "ROLE", "TX_KB", "RX_KB", "MS", "RTT_MS"
        )
    }

    /// One line for a record that ends a connection; nothing for any other.
    pub(super) fn write_line(
        &self,
        out: &mut impl Write,
        record: &TransitionRecord,
    ) -> io::Result<()> {
        let Some(totals) = record.closed() else { return Ok(()) };
        let (pid, comm) = owner_columns(record);
        let ms = |ns: Option<u64>| {
            ns.map_or_else(|| "-".to_owned(), |ns| format!("{:.3}", ns as f64 / 1e6))
        };
        let width = self.address_width;
        write!(
            out,
            "{:<12} {:>7} {:<16} {:<width$} {:<width$} {:<6} {:>9} {:>9} {:>10} {:>8}",
            self.clock.time_of_day(record.ts_ns),
            pid,
            comm,
            record.local().to_string(),
            record.remote().to_string(),
            role_name(record).unwrap_or("-"),
            totals.bytes_sent / 1024,
            totals.bytes_received / 1024,
            ms(record.lifetime_ns()),
            ms(record.closing_rtt_ns()),
        )?;
        end_line(out, record)
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{
        TcpState,
        record::{ConnectionTotals, FLAG_ACCEPTED, FLAG_CLOSED, FLAG_LIFETIME_KNOWN},
    };

    use super::*;
    use crate::watch::json::tests::record;

    fn closed(flags: u8) -> TransitionRecord {
        TransitionRecord {
            oldstate: TcpState::LAST_ACK,
            newstate: TcpState::CLOSE,
            flags: record().flags | flags,
            totals: ConnectionTotals {
                bytes_sent: 3_000_000,
                bytes_received: 1_000_000,
                lifetime_ns: 12_500_000,
                srtt_us: 8 * 250,
                total_retrans: 1,
            },
            ..record()
        }
    }

    #[test]
    fn a_closed_connection_is_one_json_line_with_every_key_in_order() {
        let mut out = Vec::new();
        write_json(&mut out, &closed(FLAG_CLOSED | FLAG_LIFETIME_KNOWN | FLAG_ACCEPTED), None)
            .unwrap();
        let line = String::from_utf8(out).unwrap();
        // In the order of the keys: each key's position in the line.
        let at: Vec<usize> =
            CLOSED_JSON_KEYS.iter().map(|key| line.find(&format!("\"{key}\":")).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value.as_object().unwrap().len(), CLOSED_JSON_KEYS.len(), "{line}");
        assert_eq!(value["role"], "server");
        assert_eq!(value["bytes_sent"], 3_000_000);
        assert_eq!(value["bytes_received"], 1_000_000);
        assert_eq!(value["lifetime_ns"], 12_500_000);
        assert_eq!(value["rtt_ns"], 250_000);
        assert_eq!(value["old"], "LAST_ACK");
    }

    /// A connection older than the tracer has no lifetime and no role: null and a dash,
    /// never 0.
    #[test]
    fn an_unknown_lifetime_is_null_and_a_dash() {
        let record = closed(FLAG_CLOSED);
        let mut out = Vec::new();
        write_json(&mut out, &record, None).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(value["lifetime_ns"].is_null() && value["role"].is_null(), "{value}");
        let mut out = Vec::new();
        ClosedColumns::for_family(None).write_line(&mut out, &record).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert!(line.contains(" -      ") && line.contains("     2929       976 "), "{line}");
        assert!(line.trim_end().ends_with("-    0.250"), "{line}");
    }

    #[test]
    fn a_transition_that_ends_no_connection_prints_nothing() {
        let mut out = Vec::new();
        write_json(&mut out, &record(), None).unwrap();
        ClosedColumns::for_family(None).write_line(&mut out, &record()).unwrap();
        assert!(out.is_empty());
    }
}
