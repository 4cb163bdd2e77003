//! Ephemeral port pressure, from the sock_diag dumps (TIME_WAIT included, which the
//! tracepoint never reports): for each (local address, remote address, remote port), the
//! share of its namespace's `net.ipv4.ip_local_port_range` that its sockets hold. A client
//! that opens short connections to one destination runs out of ports there first.

use std::{collections::HashMap, net::IpAddr};

use tracer_common::TcpState;

use crate::netns::NamespaceDump;

/// Destinations with a series of their own; the maximum over all is exported apart.
pub const TOP_DESTINATIONS: usize = 10;

/// One destination's share of the ephemeral range.
#[derive(Clone, Debug, PartialEq)]
pub struct PortUsage {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub dport: u16,
    /// Sockets with a local port in the range, over the range's size.
    pub ratio: f64,
}

/// The `TOP_DESTINATIONS` most used destinations, most used first, and the highest ratio.
/// The same destination in two namespaces is one series with the higher ratio.
pub fn usage(dumps: &[NamespaceDump]) -> (Vec<PortUsage>, f64) {
    let mut ratios: HashMap<(IpAddr, IpAddr, u16), f64> = HashMap::new();
    for dump in dumps {
        let Some((low, high)) = dump.port_range else { continue };
        let size = f64::from(high.saturating_sub(low)) + 1.0;
        let mut counts: HashMap<(IpAddr, IpAddr, u16), u32> = HashMap::new();
        for socket in &dump.sockets {
            let port = socket.sport;
            if socket.state == TcpState::LISTEN || !(low..=high).contains(&port) {
                continue;
            }
            let key = (socket.local().ip(), socket.remote().ip(), socket.dport);
            *counts.entry(key).or_default() += 1;
        }
        for (key, count) in counts {
            let ratio = f64::from(count) / size;
            let best = ratios.entry(key).or_default();
            *best = best.max(ratio);
        }
    }
    let mut ranked: Vec<PortUsage> = ratios
        .into_iter()
        .map(|((saddr, daddr, dport), ratio)| PortUsage { saddr, daddr, dport, ratio })
        .collect();
    ranked.sort_by(|a, b| {
        b.ratio
            .total_cmp(&a.ratio)
            .then_with(|| (a.saddr, a.daddr, a.dport).cmp(&(b.saddr, b.daddr, b.dport)))
    });
    let max = ranked.first().map_or(0.0, |u| u.ratio);
    ranked.truncate(TOP_DESTINATIONS);
    (ranked, max)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::sockdiag::DiagSocket;

    fn socket(state: TcpState, local: &str, remote: &str) -> DiagSocket {
        let (local, remote) =
            (local.parse::<SocketAddr>().unwrap(), remote.parse::<SocketAddr>().unwrap());
        DiagSocket {
            family: tracer_common::record::AF_INET,
            state,
            sport: local.port(),
            dport: remote.port(),
            saddr: tracer_common::ip_to_raw(local.ip()),
            daddr: tracer_common::ip_to_raw(remote.ip()),
            inode: 0,
            uid: 0,
            since_last_ack_ms: None,
        }
    }

    #[test]
    fn shares_of_the_range_by_destination() {
        let mut sockets = Vec::new();
        for port in 40_000..40_080 {
            sockets.push(socket(TcpState::TIME_WAIT, &format!("10.0.0.1:{port}"), "10.0.0.9:443"));
        }
        sockets.push(socket(TcpState::ESTABLISHED, "10.0.0.1:40090", "10.0.0.8:80"));
        // Outside the range, or a listener: not ephemeral ports in use.
        sockets.push(socket(TcpState::ESTABLISHED, "10.0.0.1:5000", "10.0.0.9:443"));
        sockets.push(socket(TcpState::LISTEN, "0.0.0.0:40050", "0.0.0.0:0"));
        let dump = NamespaceDump { inode: 1, sockets, port_range: Some((40_000, 40_099)) };
        let (top, max) = usage(&[dump]);
        assert_eq!(max, 0.8);
        assert_eq!(top.len(), 2);
        assert_eq!(
            (top[0].daddr.to_string(), top[0].dport, top[0].ratio),
            ("10.0.0.9".into(), 443, 0.8)
        );
        assert_eq!(top[1].ratio, 0.01);
        let unknown = NamespaceDump { inode: 2, sockets: Vec::new(), port_range: None };
        assert_eq!(usage(&[unknown]), (Vec::new(), 0.0));
    }
}
