//! `watch`'s aligned columns: time, owner, addresses, transition, time in the old state and,
//! for a connection that ended badly, why.

use std::{
    borrow::Cow,
    io::{self, Write},
};

use tracer_common::TransitionRecord;

use crate::{clock::WallClock, event::TransitionExt as _, socket::Family};

/// Width of an address:port column for the family shown (`None`: both): IPv4 fits 21,
/// bracketed IPv6 up to 47; longer IPv6 addresses push the row right.
pub(super) const fn address_width(family: Option<Family>) -> usize {
    match family {
        Some(Family::Inet) => 21,
        Some(Family::Inet6) => 47,
        Some(Family::Unknown) | None => 25,
    }
}

pub(super) struct Columns {
    /// Width of an address:port: IPv4 fits 21, bracketed IPv6 up to 47.
    address_width: usize,
    clock: WallClock,
}

impl Columns {
    /// Wide enough for the family shown (`None`: both); longer IPv6 addresses push the row
    /// right.
    pub(super) fn for_family(family: Option<Family>) -> Self {
        Self { address_width: address_width(family), clock: WallClock::now() }
    }

    pub(super) fn write_header(&self, out: &mut impl Write) -> io::Result<()> {
        let width = self.address_width;
        writeln!(
            out,
            "{:<12} {:>7} {:<16} {:<width$} {:<width$} {:<27} {:>10}",
            "TIME", "PID", "COMM", "LOCAL", "REMOTE", "TRANSITION", "MS"
        )
    }

    pub(super) fn write_line(
        &self,
        out: &mut impl Write,
        record: &TransitionRecord,
    ) -> io::Result<()> {
        let (pid, comm) = owner_columns(record);
        let ms = record
            .stay()
            .map_or_else(|| "-".to_owned(), |d| format!("{:.3}", d.as_secs_f64() * 1e3));
        let width = self.address_width;
        write!(
            out,
            "{:<12} {:>7} {:<16} {:<width$} {:<width$} {:<27} {:>10}",
            self.clock.time_of_day(record.ts_ns),
            pid,
            comm,
            record.local().to_string(),
            record.remote().to_string(),
            format!("{} -> {}", record.oldstate, record.newstate),
            ms
        )?;
        end_line(out, record)
    }
}

/// PID and COMM of the socket's owner, `-` where not known: in softirq the running task is
/// unrelated to the socket.
pub(super) fn owner_columns(record: &TransitionRecord) -> (String, Cow<'_, str>) {
    match record.owner() {
        Some((pid, comm)) => (pid.to_string(), comm),
        None => ("-".to_owned(), Cow::Borrowed("-")),
    }
}

/// Ends a line: for a connection that ended badly, with why.
pub(super) fn end_line(out: &mut impl Write, record: &TransitionRecord) -> io::Result<()> {
    match record.failure() {
        Some(failure) => writeln!(out, "  {}", failure.name()),
        None => writeln!(out),
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::TcpState;

    use super::*;
    use crate::watch::json::tests::record;

    fn line_of(record: &TransitionRecord) -> String {
        let mut out = Vec::new();
        Columns::for_family(None).write_line(&mut out, record).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn unknowns_are_a_dash() {
        let mut unknown = record();
        unknown.flags = 0;
        let line = line_of(&unknown);
        assert!(line.contains("[fe80::1]:51000"), "{line}");
        assert!(line.trim_end().ends_with(" -"), "{line}");
    }

    #[test]
    fn a_failed_connect_says_why() {
        let mut refused = record();
        (refused.oldstate, refused.newstate) = (TcpState::SYN_SENT, TcpState::CLOSE);
        refused.error = libc::ECONNREFUSED as u8;
        let line = line_of(&refused);
        assert!(line.contains("SYN_SENT -> CLOSE") && line.ends_with("1.500  refused\n"), "{line}");
    }
}
