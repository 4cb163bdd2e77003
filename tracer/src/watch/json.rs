//! `watch --json`: one JSON object per transition, written by hand for speed (escaping every
//! byte and the formatting machinery were most of `watch --json`'s time under a storm).

use std::{
    borrow::Cow,
    io::{self, Write},
    net::IpAddr,
};

use tracer_common::{TcpState, TransitionRecord};

use crate::{
    cgroups::CgroupName,
    event::{TransitionExt as _, comm_str},
    failure::Failure,
    socket::Family,
};

/// Writes `record` as one JSON line, with its owner's cgroup when named.
pub(super) fn write_line(
    out: &mut impl Write,
    record: &TransitionRecord,
    cgroup: Option<&CgroupName>,
) -> io::Result<()> {
    let owner = record.owner();
    JsonTransition {
        ts_ns: record.ts_ns,
        skaddr: Hex(record.skaddr),
        pid: record.tgid,
        comm: comm_str(&record.comm),
        owner_pid: owner.as_ref().map(|(pid, _)| *pid),
        owner_comm: owner.map(|(_, comm)| comm),
        family: record.family(),
        saddr: record.ip(&record.saddr),
        sport: record.sport,
        daddr: record.ip(&record.daddr),
        dport: record.dport,
        old: record.oldstate,
        new: record.newstate,
        stay_ns: record.stay().map(|_| record.stay_ns),
        cgroup: cgroup.map(|c| c.path.as_str()),
        container_id: cgroup.and_then(|c| c.container.container_id.as_deref()),
        error: record.failure().map(Failure::name),
    }
    .write_to(out)
}

/// The keys of a `--json` line, in order (documented in the README; scripts rely on them).
pub const JSON_KEYS: [&str; 17] = [
    "ts_ns",
    "skaddr",
    "pid",
    "comm",
    "owner_pid",
    "owner_comm",
    "family",
    "saddr",
    "sport",
    "daddr",
    "dport",
    "old",
    "new",
    "stay_ns",
    "cgroup",
    "container_id",
    "error",
];

/// One JSON line: exactly the keys of `JSON_KEYS`, in this order. The `Serialize` derive
/// is the test's oracle for the hand-written writer.
#[cfg_attr(test, derive(serde::Serialize))]
struct JsonTransition<'a> {
    ts_ns: u64,
    skaddr: Hex,
    pid: u32,
    comm: Cow<'a, str>,
    owner_pid: Option<u32>,
    owner_comm: Option<Cow<'a, str>>,
    family: Family,
    saddr: IpAddr,
    sport: u16,
    daddr: IpAddr,
    dport: u16,
    old: TcpState,
    new: TcpState,
    stay_ns: Option<u64>,
    cgroup: Option<&'a str>,
    container_id: Option<&'a str>,
    error: Option<&'static str>,
}

impl JsonTransition<'_> {
    /// Writes the line as `serde_json` would (a test holds them equal), by hand: keys,
    /// numbers, addresses and state names never need escaping, and escaping every key and
    /// value byte by byte was 40 % of `watch --json`'s time under a storm, the formatting
    /// machinery most of the rest. Only the strings that come from outside (task names,
    /// cgroup paths) go through the escaper, and only when they hold a character that needs
    /// it.
    fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(b"{\"ts_ns\":")?;
        write_number(out, self.ts_ns)?;
        out.write_all(b",\"skaddr\":\"")?;
        write_hex(out, self.skaddr.0)?;
        out.write_all(b"\",\"pid\":")?;
        write_number(out, self.pid)?;
        out.write_all(b",\"comm\":")?;
        write_str(out, &self.comm)?;
        out.write_all(b",\"owner_pid\":")?;
        write_option(out, self.owner_pid, write_number)?;
        out.write_all(b",\"owner_comm\":")?;
        write_option(out, self.owner_comm.as_deref(), write_str)?;
        out.write_all(b",\"family\":\"")?;
        out.write_all(self.family.name().as_bytes())?;
        out.write_all(b"\",\"saddr\":\"")?;
        write_ip(out, self.saddr)?;
        out.write_all(b"\",\"sport\":")?;
        write_number(out, self.sport)?;
        out.write_all(b",\"daddr\":\"")?;
        write_ip(out, self.daddr)?;
        out.write_all(b"\",\"dport\":")?;
        write_number(out, self.dport)?;
        out.write_all(b",\"old\":\"")?;
        write_state(out, self.old)?;
        out.write_all(b"\",\"new\":\"")?;
        write_state(out, self.new)?;
        out.write_all(b"\",\"stay_ns\":")?;
        write_option(out, self.stay_ns, write_number)?;
        out.write_all(b",\"cgroup\":")?;
        write_option(out, self.cgroup, write_str)?;
        out.write_all(b",\"container_id\":")?;
        write_option(out, self.container_id, write_str)?;
        out.write_all(b",\"error\":")?;
        write_option(out, self.error, write_str)?;
        out.write_all(b"}\n")
    }
}

fn write_number<W: Write>(out: &mut W, number: impl itoa::Integer) -> io::Result<()> {
    out.write_all(itoa::Buffer::new().format(number).as_bytes())
}

/// `{:#x}`: `0x` and the lowercase digits, without leading zeros.
fn write_hex(out: &mut impl Write, value: u64) -> io::Result<()> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 18];
    let digits = (64 - value.leading_zeros()).div_ceil(4).max(1) as usize;
    text[..2].copy_from_slice(b"0x");
    for i in 0..digits {
        text[2 + digits - 1 - i] = DIGITS[(value >> (4 * i)) as usize & 0xf];
    }
    out.write_all(&text[..2 + digits])
}

/// IPv4 by hand (the common case, and `Display` is slow); IPv6 as `Display` writes it.
fn write_ip(out: &mut impl Write, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            write_number(out, a)?;
            for octet in [b, c, d] {
                out.write_all(b".")?;
                write_number(out, octet)?;
            }
            Ok(())
        }
        IpAddr::V6(v6) => write!(out, "{v6}"),
    }
}

fn write_state(out: &mut impl Write, state: TcpState) -> io::Result<()> {
    match state.name() {
        Some(name) => out.write_all(name.as_bytes()),
        None => write!(out, "{state}"),
    }
}

fn write_option<W: Write, T>(
    out: &mut W,
    value: Option<T>,
    write: impl FnOnce(&mut W, T) -> io::Result<()>,
) -> io::Result<()> {
    match value {
        Some(value) => write(out, value),
        None => out.write_all(b"null"),
    }
}

/// A JSON string: as it is when no character needs escaping, else through `serde_json`.
fn write_str(out: &mut impl Write, text: &str) -> io::Result<()> {
    if text.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.write_all(b"\"")?;
        out.write_all(text.as_bytes())?;
        out.write_all(b"\"")
    } else {
        serde_json::to_writer(out, text).map_err(io::Error::from)
    }
}

/// A kernel address as JSON text (`"0xffff..."`), written without an intermediate string.
struct Hex(u64);

#[cfg(test)]
impl serde::Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:#x}", self.0))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use tracer_common::record::{AF_INET6, FLAG_OWNER_KNOWN, FLAG_STAY_KNOWN, IPPROTO_TCP};

    use super::*;

    /// An IPv6 server socket moving to CLOSE_WAIT, owner and stay known.
    pub(in crate::watch) fn record() -> TransitionRecord {
        TransitionRecord {
            ts_ns: 5_000_000_000,
            skaddr: 0xffff_8881_0000_1000,
            stay_ns: 1_500_000,
            owner_cgroup: 0,
            pid: 11,
            tgid: 10,
            owner_tgid: 20,
            netns: 1,
            comm: *b"swapper/0\0\0\0\0\0\0\0",
            owner_comm: *b"server\0\0\0\0\0\0\0\0\0\0",
            saddr: [0; 16],
            daddr: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            sport: 443,
            dport: 51000,
            family: AF_INET6,
            protocol: IPPROTO_TCP,
            oldstate: TcpState::ESTABLISHED,
            newstate: TcpState::CLOSE_WAIT,
            flags: FLAG_STAY_KNOWN | FLAG_OWNER_KNOWN,
            error: 0,
            srtt_us: 0,
            totals: Default::default(),
        }
    }

    /// The hand-written line is exactly what serde_json makes of the same struct, escapes
    /// and nulls included.
    #[test]
    fn json_lines_are_written_as_serde_json_would() {
        let lines = [
            JsonTransition {
                ts_ns: 1,
                skaddr: Hex(0xffff_8881_0000_1000),
                pid: 7,
                comm: Cow::Borrowed("a \"quoted\" \\ name\t\u{1}é"),
                owner_pid: None,
                owner_comm: None,
                family: Family::Inet,
                saddr: IpAddr::from([127, 0, 0, 1]),
                sport: 0,
                daddr: IpAddr::from([10, 1, 2, 3]),
                dport: 65535,
                old: TcpState::SYN_SENT,
                new: TcpState::from_kernel(42),
                stay_ns: None,
                cgroup: None,
                container_id: None,
                error: None,
            },
            JsonTransition {
                ts_ns: u64::MAX,
                skaddr: Hex(0),
                pid: u32::MAX,
                comm: Cow::Borrowed("nginx"),
                owner_pid: Some(42),
                owner_comm: Some(Cow::Borrowed("java")),
                family: Family::Inet6,
                saddr: "fe80::1".parse().unwrap(),
                sport: 443,
                daddr: "::ffff:10.0.0.1".parse().unwrap(),
                dport: 1,
                old: TcpState::ESTABLISHED,
                new: TcpState::CLOSE,
                stay_ns: Some(0),
                cgroup: Some("/kubepods.slice/pod\"x\".slice"),
                container_id: Some("abc"),
                error: Some("refused"),
            },
        ];
        for line in &lines {
            let mut written = Vec::new();
            line.write_to(&mut written).unwrap();
            let expected = serde_json::to_string(line).unwrap() + "\n";
            assert_eq!(String::from_utf8(written).unwrap(), expected);
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for value in [0, 1, 0xf, 0x10, 0xabc, 0xffff_8881_0000_1000, u64::MAX] {
            let mut written = Vec::new();
            write_hex(&mut written, value).unwrap();
            assert_eq!(String::from_utf8(written).unwrap(), format!("{value:#x}"));
        }
        for ip in ["0.0.0.0", "255.255.255.255", "10.0.20.3", "::", "2001:db8::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut written = Vec::new();
            write_ip(&mut written, ip).unwrap();
            assert_eq!(String::from_utf8(written).unwrap(), ip.to_string());
        }
    }

    fn json_of(record: &TransitionRecord, cgroup: Option<&CgroupName>) -> serde_json::Value {
        let mut out = Vec::new();
        write_line(&mut out, record, cgroup).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn json_line_has_exactly_the_documented_keys() {
        let id = "ab".repeat(32);
        let path = format!("/machine.slice/libpod-{id}.scope");
        let cgroup = CgroupName {
            container: crate::container::Container::of_cgroup(
                &path,
                std::path::Path::new("/nonexistent"),
            ),
            path,
        };
        let value = json_of(&record(), Some(&cgroup));
        let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort_unstable();
        let mut expected = JSON_KEYS.to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(value["skaddr"], "0xffff888100001000");
        assert_eq!(value["daddr"], "fe80::1");
        assert_eq!(value["saddr"], "::");
        assert_eq!(value["old"], "ESTABLISHED");
        assert_eq!(value["new"], "CLOSE_WAIT");
        assert_eq!(value["owner_comm"], "server");
        assert_eq!(value["stay_ns"], 1_500_000);
        assert_eq!(value["cgroup"], cgroup.path);
        assert_eq!(value["container_id"], id);
    }

    #[test]
    fn unknowns_are_null() {
        let mut unknown = record();
        unknown.flags = 0;
        let value = json_of(&unknown, None);
        assert!(value["stay_ns"].is_null());
        assert!(value["owner_pid"].is_null());
        assert!(value["owner_comm"].is_null());
        assert!(value["cgroup"].is_null() && value["container_id"].is_null());
        assert!(value["error"].is_null());
    }

    #[test]
    fn a_failed_connect_says_why() {
        let mut refused = record();
        (refused.oldstate, refused.newstate) = (TcpState::SYN_SENT, TcpState::CLOSE);
        refused.error = libc::ECONNREFUSED as u8;
        assert_eq!(json_of(&refused, None)["error"], "refused");
    }
}
