//! TCP sockets as the kernel's `sock_diag` netlink interface lists them (what `ss` reads):
//! every state, IPv4 and IPv6, in the calling thread's network namespace.
//!
//! The tracepoint only reports changes; a dump tells what exists right now: sockets older than
//! the daemon, and TIME_WAIT and NEW_SYN_RECV sockets, which never appear on the tracepoint.

use std::{collections::HashSet, io, net::SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, Parseable as _,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{
        ExtensionFlags, InetRequest, InetResponseBuffer, InetResponseHeader, SocketId, StateFlags,
        Timer,
    },
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use tracer_common::{TcpState, ip_from_raw, ip_to_raw, unmap_ipv4};

/// One TCP socket from a dump. Addresses stay raw, as records carry them (48 bytes a
/// socket, against 88 with two `SocketAddr`s): a reconciliation holds every socket of the
/// host at once; `local()`/`remote()` give the addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiagSocket {
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub state: TcpState,
    /// A timewait minisocket: what the kernel keeps of a connection it closed, listed in its
    /// substate (TIME_WAIT, or FIN_WAIT2 for an orphan that waited too long for the peer's
    /// FIN). The tracepoint saw the connection close; no record will come for it.
    pub timewait: bool,
    pub sport: u16,
    pub dport: u16,
    /// Network-order address bytes; IPv4 (and IPv4-mapped IPv6) in the first four.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Inode of the socket's file (0 for TIME_WAIT and request sockets, which have none):
    /// what `/proc/<pid>/fd/*` links to as `socket:[inode]`.
    pub inode: u32,
    /// Milliseconds since the socket last received an ACK (`tcpi_last_ack_recv`), for
    /// CLOSE_WAIT sockets, `NO_ACK_TIME` for the others (see `since_last_ack_ms`). A plain
    /// number: an `Option` would take 4 more bytes for every socket of the host.
    pub last_ack_ms: u32,
}

impl DiagSocket {
    /// `last_ack_ms` of a socket the dump did not ask `tcp_info` of.
    pub(crate) const NO_ACK_TIME: u32 = u32::MAX;

    /// For a CLOSE_WAIT socket, the time since it last received an ACK: the peer's FIN carried
    /// the last one it will send, so this is a lower bound of the time spent in CLOSE_WAIT.
    pub(crate) fn since_last_ack_ms(&self) -> Option<u32> {
        (self.last_ack_ms != Self::NO_ACK_TIME).then_some(self.last_ack_ms)
    }

    pub(crate) fn local(&self) -> SocketAddr {
        SocketAddr::new(ip_from_raw(self.family, &self.saddr), self.sport)
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        SocketAddr::new(ip_from_raw(self.family, &self.daddr), self.dport)
    }
}

/// Every state bit, NEW_SYN_RECV (request sockets) included, which the crate's flags lack.
fn all_states() -> StateFlags {
    StateFlags::from_bits_retain(StateFlags::all().bits() | 1 << TcpState::NEW_SYN_RECV.number())
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    Ok(socket)
}

/// One namespace's TCP sockets, and what a stall check needs of those with queued data.
#[derive(Debug, Default)]
pub(crate) struct TcpDump {
    pub sockets: Vec<DiagSocket>,
    /// ESTABLISHED and CLOSE_WAIT sockets with bytes in a queue, when the dump asked
    /// `tcp_info` of them; at most `MAX_QUEUED`.
    pub queued: Vec<QueuedSocket>,
    /// Sockets with queued data past `MAX_QUEUED`: listed, not kept for the stall check.
    pub queued_unkept: usize,
}

/// Most sockets with queued data one namespace's dump keeps for the stall check: bounds its
/// memory (about 100 bytes each) on a host where every socket holds data.
pub(crate) const MAX_QUEUED: usize = 100_000;

/// Dumps every TCP socket of the current network namespace, IPv4 then IPv6. CLOSE_WAIT
/// sockets come with `since_last_ack_ms`; asking `tcp_info` of every socket would make a dump
/// of a busy host several times larger. With `queues`, ESTABLISHED sockets come with it too,
/// and those with bytes queued are kept as `QueuedSocket`s for the stall check.
pub(crate) fn dump_tcp(queues: bool) -> io::Result<TcpDump> {
    let socket = open()?;
    let mut dump = TcpDump::default();
    let with_info = if queues {
        StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT
    } else {
        StateFlags::CLOSE_WAIT
    };
    let others = all_states().difference(with_info.clone());
    for family in [AF_INET, AF_INET6] {
        let mut keep = |answer: &Answer| dump.sockets.push(diag_socket(answer));
        dump_family(&socket, family, others.clone(), ExtensionFlags::empty(), &mut keep)?;
    }
    // The second request's sockets follow the first's in the same list: a million
    // ESTABLISHED sockets are not held twice while the lists are joined.
    let later = dump.sockets.len();
    for family in [AF_INET, AF_INET6] {
        let mut keep = |answer: &Answer| {
            let socket = diag_socket(answer);
            if queues && let Some(queued) = QueuedSocket::from_answer(&socket, answer) {
                if dump.queued.len() < MAX_QUEUED {
                    dump.queued.push(queued);
                } else {
                    dump.queued_unkept += 1;
                }
            }
            dump.sockets.push(socket);
        };
        dump_family(&socket, family, with_info.clone(), ExtensionFlags::INFO, &mut keep)?;
    }
    drop_listed_again(&mut dump.sockets, later);
    Ok(dump)
}

/// What a stall check needs of an ESTABLISHED or CLOSE_WAIT socket with queued data, from
/// the dump's header and its `tcp_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueuedSocket {
    pub socket: DiagSocket,
    /// Bytes received and not read by the application, as `ss` shows Recv-Q (a CLOSE_WAIT
    /// socket's count includes the peer's FIN until the application reads the end).
    pub recv_queue: u32,
    /// Bytes written and not yet acknowledged by the peer, sent or not (`ss`'s Send-Q).
    pub send_queue: u32,
    /// Bytes the application has read: `tcpi_bytes_received` less the receive queue.
    /// `None` where the kernel's `tcp_info` is too short to hold it (before Linux 4.1).
    pub consumed: Option<u64>,
    /// `tcpi_bytes_acked`: bytes the peer acknowledged. `None` before Linux 4.1.
    pub acked: Option<u64>,
    /// The peer advertises a zero window: the kernel probes it (its zero-window timer runs)
    /// or `tcpi_snd_wnd` (Linux 5.4) is 0.
    pub peer_window_zero: bool,
    /// The kernel is sending unacknowledged data again: its retransmit timer fired at
    /// least once for the data now outstanding.
    pub retransmitting: bool,
}

impl QueuedSocket {
    /// Unread application data: the receive queue without a FIN it holds.
    pub(crate) fn unread(&self) -> u32 {
        let fin = u32::from(self.socket.state == TcpState::CLOSE_WAIT);
        self.recv_queue.saturating_sub(fin)
    }

    fn from_answer(socket: &DiagSocket, answer: &Answer) -> Option<Self> {
        let header = &answer.header;
        let (recv_queue, send_queue) = (header.recv_queue, header.send_queue);
        if recv_queue == 0 && send_queue == 0 {
            return None;
        }
        let info = answer.tcp_info?;
        let consumed = tcp_info::u64_at(info, tcp_info::BYTES_RECEIVED)
            .map(|received| received.saturating_sub(u64::from(recv_queue)));
        let (probing, retransmit_timer) = match header.timer {
            Some(Timer::Probe(_)) => (true, false),
            Some(Timer::Retransmit(_, retransmits)) => (false, retransmits > 0),
            _ => (false, false),
        };
        let window_zero = tcp_info::u32_at(info, tcp_info::SND_WND) == Some(0);
        let retransmits = info.get(tcp_info::RETRANSMITS).is_some_and(|&n| n > 0);
        Some(Self {
            socket: socket.clone(),
            recv_queue,
            send_queue,
            consumed,
            acked: tcp_info::u64_at(info, tcp_info::BYTES_ACKED),
            peer_window_zero: probing || window_zero,
            retransmitting: retransmit_timer || retransmits,
        })
    }
}

/// Bytes of a `tcp_info` that holds what a stall check needs to tell progress: the bytes
/// received and acknowledged (Linux 4.1).
pub(crate) const TCP_INFO_FOR_PROGRESS: usize = tcp_info::BYTES_RECEIVED + 8;
/// Bytes of a `tcp_info` that also holds the peer's window (Linux 5.4).
pub(crate) const TCP_INFO_FOR_STALLS: usize = tcp_info::SND_WND + 4;

/// The size of this kernel's `tcp_info`, from a dump of a loopback connection made for it.
pub(crate) fn tcp_info_size() -> io::Result<usize> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let local = client.local_addr()?;
    let socket = open()?;
    let mut size = None;
    let mut keep = |answer: &Answer| {
        if diag_socket(answer).local() == local {
            size = answer.tcp_info.map(<[u8]>::len);
        }
    };
    dump_family(&socket, AF_INET, StateFlags::ESTABLISHED, ExtensionFlags::INFO, &mut keep)?;
    size.ok_or_else(|| io::Error::other("the dump listed no tcp_info for a loopback connection"))
}

/// Offsets in the kernel's `struct tcp_info` (stable uAPI: fields are only ever appended, so
/// an older kernel's is shorter, never different).
mod tcp_info {
    /// `tcpi_retransmits` (u8): retransmits of the data now outstanding.
    pub(super) const RETRANSMITS: usize = 2;
    /// `tcpi_last_ack_recv` (u32, ms), since Linux 2.6.
    pub(super) const LAST_ACK_RECV: usize = 56;
    /// `tcpi_bytes_acked` (u64), since Linux 4.1.
    pub(super) const BYTES_ACKED: usize = 120;
    /// `tcpi_bytes_received` (u64), since Linux 4.1.
    pub(super) const BYTES_RECEIVED: usize = 128;
    /// `tcpi_snd_wnd` (u32): the peer's advertised window, since Linux 5.4.
    pub(super) const SND_WND: usize = 228;

    pub(super) fn u32_at(info: &[u8], offset: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(info.get(offset..offset + 4)?.try_into().ok()?))
    }

    pub(super) fn u64_at(info: &[u8], offset: usize) -> Option<u64> {
        Some(u64::from_ne_bytes(info.get(offset..offset + 8)?.try_into().ok()?))
    }
}

/// A socket that moved on between the two requests (to CLOSE_WAIT; to ESTABLISHED when
/// the second request lists it) is in both answers, `sockets[..later]` and `sockets[later..]`,
/// and the second is newer: the earlier listing goes. Kept, it made a reconciliation add the
/// socket a second time and the next one remove it again (on a slow host, several times a
/// second under churn). Only the states a socket enters those from are looked up, and the
/// smaller side is the one hashed: the second answer holds a million ESTABLISHED sockets when
/// the stall check asks for them, the first when it does not.
fn drop_listed_again(sockets: &mut Vec<DiagSocket>, later: usize) {
    type Tuple = (u16, [u8; 16], u16, [u8; 16], u16);
    let tuple = |s: &DiagSocket| -> Tuple { (s.family, s.saddr, s.sport, s.daddr, s.dport) };
    let precedes = |s: &DiagSocket| {
        !s.timewait
            && matches!(s.state, TcpState::SYN_SENT | TcpState::SYN_RECV | TcpState::ESTABLISHED)
    };
    let (first, second) = sockets.split_at(later);
    let candidates = first.iter().filter(|s| precedes(s)).count();
    if candidates == 0 || second.is_empty() {
        return;
    }
    let listed_again: HashSet<Tuple> = if second.len() <= candidates {
        let second: HashSet<Tuple> = second.iter().map(tuple).collect();
        first.iter().filter(|s| precedes(s)).map(tuple).filter(|t| second.contains(t)).collect()
    } else {
        let first: HashSet<Tuple> = first.iter().filter(|s| precedes(s)).map(tuple).collect();
        second.iter().map(tuple).filter(|t| first.contains(t)).collect()
    };
    if listed_again.is_empty() {
        return;
    }
    let mut position = 0;
    sockets.retain(|socket| {
        let earlier = position < later;
        position += 1;
        !(earlier && precedes(socket) && listed_again.contains(&tuple(socket)))
    });
}

/// Dumps the CLOSE_WAIT sockets of the current network namespace only.
pub(crate) fn dump_close_wait() -> io::Result<TcpDump> {
    let socket = open()?;
    let mut sockets = Vec::new();
    let mut keep = |answer: &Answer| sockets.push(diag_socket(answer));
    for family in [AF_INET, AF_INET6] {
        dump_family(&socket, family, StateFlags::CLOSE_WAIT, ExtensionFlags::INFO, &mut keep)?;
    }
    Ok(TcpDump { sockets, ..TcpDump::default() })
}

/// A listening socket's accept queue, as `ss -ltn` shows it (Recv-Q, Send-Q).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenQueue {
    pub local: SocketAddr,
    /// Connections established and waiting for accept().
    pub length: u32,
    /// The backlog listen() asked for, capped by `net.core.somaxconn`. The kernel queues one
    /// more than this before it drops SYNs.
    pub limit: u32,
    /// Inode of the listener's file, for its owner.
    pub inode: u32,
}

/// The listening sockets of the calling thread's namespace, with their accept queues: a
/// LISTEN-only dump, small even on a busy host.
pub(crate) fn dump_listen_queues() -> io::Result<Vec<ListenQueue>> {
    let socket = open()?;
    let mut queues = Vec::new();
    let mut keep = |answer: &Answer| {
        let socket = diag_socket(answer);
        // For a listener the kernel reports the accept queue in the receive queue field
        // and its limit in the send queue field.
        let (length, limit) = (answer.header.recv_queue, answer.header.send_queue);
        queues.push(ListenQueue { local: socket.local(), length, limit, inode: socket.inode });
    };
    for family in [AF_INET, AF_INET6] {
        dump_family(&socket, family, StateFlags::LISTEN, ExtensionFlags::empty(), &mut keep)?;
    }
    Ok(queues)
}

fn diag_socket(answer: &Answer) -> DiagSocket {
    let header = &answer.header;
    let state = TcpState::from_kernel(header.state);
    let since_last_ack_ms = answer
        .tcp_info
        .filter(|_| state == TcpState::CLOSE_WAIT)
        .and_then(|info| tcp_info::u32_at(info, tcp_info::LAST_ACK_RECV));
    let id = &header.socket_id;
    let (family, saddr, daddr) = unmap_ipv4(
        u16::from(header.family),
        ip_to_raw(id.source_address),
        ip_to_raw(id.destination_address),
    );
    DiagSocket {
        family,
        state,
        timewait: header.timer == Some(Timer::TimeWait),
        sport: id.source_port,
        dport: id.destination_port,
        saddr,
        daddr,
        inode: header.inode,
        last_ack_ms: since_last_ack_ms.unwrap_or(DiagSocket::NO_ACK_TIME),
    }
}

fn dump_family(
    socket: &Socket,
    family: u8,
    states: StateFlags,
    extensions: ExtensionFlags,
    each: &mut impl FnMut(&Answer),
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions,
            states,
            socket_id: if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut receive = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut messages = &receive[..size];
        while messages.len() >= NLMSG_HDRLEN {
            let length = u32::from_ne_bytes(messages[..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(messages[4..6].try_into().expect("2 bytes"));
            if !(NLMSG_HDRLEN..=messages.len()).contains(&length) {
                return Err(malformed(format!("a message of {length} bytes")));
            }
            let payload = &messages[NLMSG_HDRLEN..length];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code =
                        payload.get(..4).map(|b| i32::from_ne_bytes(b.try_into().expect("4")));
                    match code {
                        Some(0) => {}
                        Some(code) => return Err(io::Error::from_raw_os_error(-code)),
                        None => return Err(malformed("a short error message".into())),
                    }
                }
                SOCK_DIAG_BY_FAMILY => {
                    let header = InetResponseHeader::parse(payload)
                        .map_err(|error| malformed(error.to_string()))?;
                    let attributes = payload.get(size_of::<InetResponseBuffer>()..).unwrap_or(&[]);
                    each(&Answer { header, tcp_info: attribute(attributes, INET_DIAG_INFO) });
                }
                _ => {}
            }
            messages = messages.get(length.next_multiple_of(4)..).unwrap_or(&[]);
        }
    }
}

/// One socket of a dump's answer: its `inet_diag_msg`, and its `tcp_info` when asked for.
/// Read in place from the receive buffer: a dump of a million sockets allocates nothing per
/// socket.
struct Answer<'a> {
    header: InetResponseHeader,
    tcp_info: Option<&'a [u8]>,
}

/// `struct nlmsghdr`'s size, and the message types a dump's answer holds.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The attribute that carries `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;

/// The value of the attribute `kind` among netlink attributes (`struct nlattr`, 4-aligned).
fn attribute(mut attributes: &[u8], kind: u16) -> Option<&[u8]> {
    while attributes.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let this = u16::from_ne_bytes([attributes[2], attributes[3]]) & 0x3fff;
        if length < 4 || length > attributes.len() {
            return None;
        }
        if this == kind {
            return Some(&attributes[4..length]);
        }
        attributes = attributes.get(length.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

fn malformed(what: String) -> io::Error {
    io::Error::other(format!("malformed sock_diag reply: {what}"))
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::{TcpListener, TcpStream},
        thread,
        time::Duration,
    };

    use super::*;

    /// Attributes are found by type among 4-aligned ones (flag bits masked); a length past
    /// the buffer ends the search instead of reading beyond it.
    #[test]
    fn attributes_are_read_in_place() {
        let mut buffer = Vec::new();
        for (kind, value) in [(8u16, &[1u8, 2, 3][..]), (INET_DIAG_INFO | 0x8000, &[9u8; 8][..])] {
            let length = 4 + value.len() as u16;
            buffer.extend(length.to_ne_bytes());
            buffer.extend(kind.to_ne_bytes());
            buffer.extend(value);
            buffer.resize(buffer.len().next_multiple_of(4), 0);
        }
        assert_eq!(attribute(&buffer, INET_DIAG_INFO), Some(&[9u8; 8][..]));
        assert_eq!(attribute(&buffer, 8), Some(&[1u8, 2, 3][..]));
        assert_eq!(attribute(&buffer, 5), None);
        let mut truncated = buffer.clone();
        truncated[8..10].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(attribute(&truncated, INET_DIAG_INFO), None);
    }

    /// A reconciliation holds one per socket of the host: a million at the documented scale.
    #[test]
    fn a_dumped_socket_takes_48_bytes() {
        assert_eq!(size_of::<DiagSocket>(), 48);
    }

    /// Listed ESTABLISHED by the first request and CLOSE_WAIT by the second: kept once, as
    /// the second says. Other sockets, and a CLOSE_WAIT socket's namesake in another family
    /// or state, stay.
    #[test]
    fn a_socket_in_both_answers_is_kept_once_as_the_later_says() {
        let socket = |state, family: u8, sport| DiagSocket {
            family: family.into(),
            state,
            timewait: false,
            sport,
            dport: 40_000,
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            inode: 0,
            last_ack_ms: DiagSocket::NO_ACK_TIME,
        };
        // The second answer the smaller (CLOSE_WAIT only)...
        let mut sockets = vec![
            socket(TcpState::ESTABLISHED, AF_INET, 8080),
            socket(TcpState::ESTABLISHED, AF_INET, 8081),
            socket(TcpState::ESTABLISHED, AF_INET6, 8080),
            socket(TcpState::LISTEN, AF_INET, 8080),
            socket(TcpState::CLOSE_WAIT, AF_INET, 8080),
        ];
        let kept = sockets[1..].to_vec();
        drop_listed_again(&mut sockets, 4);
        assert_eq!(sockets, kept);
        // ...or the larger (ESTABLISHED and CLOSE_WAIT, for the stall check).
        let mut sockets = vec![
            socket(TcpState::SYN_SENT, AF_INET, 8080),
            socket(TcpState::LISTEN, AF_INET, 8080),
            socket(TcpState::ESTABLISHED, AF_INET, 8080),
            socket(TcpState::ESTABLISHED, AF_INET, 8081),
            socket(TcpState::ESTABLISHED, AF_INET6, 8080),
        ];
        let kept = sockets[1..].to_vec();
        drop_listed_again(&mut sockets, 2);
        assert_eq!(sockets, kept);
    }

    /// A real CLOSE_WAIT socket: its dump entry says how long since the peer's FIN.
    #[test]
    fn close_wait_sockets_report_time_since_the_last_ack() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        drop(client);
        assert_eq!(server.read(&mut [0u8; 1]).unwrap(), 0, "the peer's FIN");
        thread::sleep(Duration::from_millis(300));
        let local = server.local_addr().unwrap();
        let dump = dump_close_wait().unwrap();
        let ours = dump.sockets.iter().find(|s| s.local() == local).expect("our CLOSE_WAIT socket");
        assert_eq!(ours.state, TcpState::CLOSE_WAIT);
        let silent = ours.since_last_ack_ms().expect("tcp_info");
        assert!((300..5_000).contains(&silent), "{silent} ms since the FIN");
        let all = dump_tcp(false).unwrap().sockets;
        assert!(all.iter().any(|s| s.local() == local && s.since_last_ack_ms().is_some()));
        assert!(all.iter().any(
            |s| s.local() == listener.local_addr().unwrap() && s.since_last_ack_ms().is_none()
        ));
    }
}
