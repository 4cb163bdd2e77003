//! TCP sockets as the kernel's `sock_diag` netlink interface lists them (what `ss` reads):
//! every state, IPv4 and IPv6, in the calling thread's network namespace.
//!
//! The tracepoint only reports changes; a dump tells what exists right now: sockets older than
//! the daemon, and TIME_WAIT and NEW_SYN_RECV sockets, which never appear on the tracepoint.

use std::{io, net::SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// One TCP socket from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Kernel state number (`TcpState`).
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Inode of the socket's file (0 for TIME_WAIT and request sockets, which have none):
    /// what `/proc/<pid>/fd/*` links to as `socket:[inode]`.
    pub inode: u32,
    pub uid: u32,
}

/// Dumps every TCP socket of the current network namespace, IPv4 then IPv6.
pub fn dump_tcp() -> io::Result<Vec<DiagSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(&socket, family, &mut sockets)?;
    }
    Ok(sockets)
}

fn dump_family(socket: &Socket, family: u8, out: &mut Vec<DiagSocket>) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
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
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(|e| io::Error::other(format!("malformed sock_diag reply: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let header = &response.header;
                    out.push(DiagSocket {
                        family: u16::from(header.family),
                        state: header.state,
                        local: SocketAddr::new(
                            header.socket_id.source_address,
                            header.socket_id.source_port,
                        ),
                        remote: SocketAddr::new(
                            header.socket_id.destination_address,
                            header.socket_id.destination_port,
                        ),
                        inode: header.inode,
                        uid: header.uid,
                    });
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => return Err(error.to_io()),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}
