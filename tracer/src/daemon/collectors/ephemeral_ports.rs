//! Ephemeral port pressure, from the sock_diag dumps (TIME_WAIT included, which the
//! tracepoint never reports): for each (local address, remote address, remote port), the
//! share of its namespace's `net.ipv4.ip_local_port_range` that its sockets hold. A client
//! that opens short connections to one destination runs out of ports there first.

use std::{
    fmt,
    net::IpAddr,
    sync::{Mutex, PoisonError},
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};
use tracer_common::TcpState;

use crate::{
    daemon::{
        core::Diagnosis,
        export::family::{Scrape, gauge_f64},
    },
    netns::NamespaceDump,
    sockdiag::DiagSocket,
};

/// The most used destinations' shares of the ephemeral port range, and the highest share, at
/// the last dump.
#[derive(Default)]
pub(super) struct EphemeralPorts {
    usage: Mutex<(Vec<PortUsage>, f64)>,
}

impl Diagnosis for EphemeralPorts {
    fn sockets_dumped(&self, dumps: &[NamespaceDump]) {
        let found = usage(dumps);
        *self.usage.lock().unwrap_or_else(PoisonError::into_inner) = found;
    }

    fn metrics(&self, encoder: &mut DescriptorEncoder, _scrape: &Scrape) -> fmt::Result {
        families(encoder, &self.usage.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Destinations with a series of their own; the maximum over all is exported apart.
const TOP_DESTINATIONS: usize = 10;

/// One destination's share of the ephemeral range.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PortUsage {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub dport: u16,
    /// Sockets with a local port in the range, over the range's size.
    pub ratio: f64,
}

/// The `TOP_DESTINATIONS` most used destinations, most used first, and the highest ratio.
/// The same destination in two namespaces is one series with the higher ratio.
fn usage(dumps: &[NamespaceDump]) -> (Vec<PortUsage>, f64) {
    let mut top: Vec<PortUsage> = Vec::new();
    let mut max = 0.0f64;
    for dump in dumps {
        let Some((low, high)) = dump.port_range else { continue };
        let size = f64::from(high.saturating_sub(low)) + 1.0;
        // Sorted references, not a map of counts: a host with a million connections can have
        // nearly as many destinations, and maps of them (per namespace, then merged) took
        // more memory than the dump itself, on top of it.
        let mut sockets: Vec<&DiagSocket> = dump
            .sockets
            .iter()
            .filter(|s| s.state != TcpState::LISTEN && (low..=high).contains(&s.sport))
            .collect();
        let destination = |s: &DiagSocket| (s.family, s.saddr, s.daddr, s.dport);
        sockets.sort_unstable_by_key(|s| destination(s));
        for run in sockets.chunk_by(|a, b| destination(a) == destination(b)) {
            let ratio = run.len() as f64 / size;
            max = max.max(ratio);
            let (local, remote) = (run[0].local(), run[0].remote());
            top.push(PortUsage {
                saddr: local.ip(),
                daddr: remote.ip(),
                dport: run[0].dport,
                ratio,
            });
            if top.len() >= 4 * TOP_DESTINATIONS {
                keep_top(&mut top);
            }
        }
    }
    keep_top(&mut top);
    (top, max)
}

/// Keeps the `TOP_DESTINATIONS` highest ratios, highest first, a destination seen in several
/// namespaces once with its highest. What it drops had that many distinct destinations above
/// it, so it cannot be among the top later either.
fn keep_top(usages: &mut Vec<PortUsage>) {
    let key = |u: &PortUsage| (u.saddr, u.daddr, u.dport);
    usages.sort_by(|a, b| b.ratio.total_cmp(&a.ratio).then_with(|| key(a).cmp(&key(b))));
    let mut kept: Vec<(IpAddr, IpAddr, u16)> = Vec::with_capacity(TOP_DESTINATIONS);
    usages.retain(|u| {
        let fresh = kept.len() < TOP_DESTINATIONS && !kept.contains(&key(u));
        if fresh {
            kept.push(key(u));
        }
        fresh
    });
}

/// The ten most used local-address-to-destination port ranges, and the highest share.
fn families(
    encoder: &mut DescriptorEncoder,
    (port_usage, max_usage): &(Vec<PortUsage>, f64),
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "tcpstate_ephemeral_port_usage_ratio",
        "Share of the ephemeral port range (net.ipv4.ip_local_port_range) held by sockets to \
         one destination from one local address, TIME_WAIT included, at the last \
         reconciliation: the 10 highest",
        None,
        MetricType::Gauge,
    )?;
    for usage in port_usage {
        let set = [
            ("saddr", usage.saddr.to_string()),
            ("daddr", usage.daddr.to_string()),
            ("dport", usage.dport.to_string()),
        ];
        ConstGauge::new(usage.ratio).encode(family.encode_family(&set)?)?;
    }
    gauge_f64(
        encoder,
        "tcpstate_ephemeral_port_usage_max_ratio",
        "The highest share of the ephemeral port range any destination holds (see \
         tcpstate_ephemeral_port_usage_ratio)",
        *max_usage,
    )
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
            timewait: false,
            sport: local.port(),
            dport: remote.port(),
            saddr: tracer_common::ip_to_raw(local.ip()),
            daddr: tracer_common::ip_to_raw(remote.ip()),
            inode: 0,
            last_ack_ms: DiagSocket::NO_ACK_TIME,
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
        let dump = NamespaceDump {
            inode: 1,
            sockets,
            port_range: Some((40_000, 40_099)),
            ..NamespaceDump::default()
        };
        let (top, max) = usage(&[dump]);
        assert_eq!(max, 0.8);
        assert_eq!(top.len(), 2);
        assert_eq!(
            (top[0].daddr.to_string(), top[0].dport, top[0].ratio),
            ("10.0.0.9".into(), 443, 0.8)
        );
        assert_eq!(top[1].ratio, 0.01);
        let unknown = NamespaceDump {
            inode: 2,
            sockets: Vec::new(),
            port_range: None,
            ..NamespaceDump::default()
        };
        assert_eq!(usage(&[unknown]), (Vec::new(), 0.0));
    }

    /// More destinations than series: the highest shares, and a destination used in two
    /// namespaces once, with its higher share.
    #[test]
    fn the_top_destinations_across_namespaces() {
        let to = |host: u16, count: u16| {
            (0..count).map(move |i| {
                socket(
                    TcpState::ESTABLISHED,
                    &format!("10.0.0.1:{}", 40_000 + i),
                    &format!("10.0.1.{host}:443"),
                )
            })
        };
        let first: Vec<DiagSocket> = (1..=30).flat_map(|host| to(host, host)).collect();
        let second: Vec<DiagSocket> = to(5, 90).collect();
        let range = Some((40_000, 40_099));
        let dumps = [
            NamespaceDump {
                inode: 1,
                sockets: first,
                port_range: range,
                ..NamespaceDump::default()
            },
            NamespaceDump {
                inode: 2,
                sockets: second,
                port_range: range,
                ..NamespaceDump::default()
            },
        ];
        let (top, max) = usage(&dumps);
        assert_eq!(max, 0.9);
        let hosts: Vec<(String, f64)> =
            top.iter().map(|u| (u.daddr.to_string(), u.ratio)).collect();
        let mut expected = vec![("10.0.1.5".to_owned(), 0.9)];
        expected.extend((22..=30).rev().map(|h| (format!("10.0.1.{h}"), f64::from(h) / 100.0)));
        assert_eq!(hosts, expected);
    }
}
