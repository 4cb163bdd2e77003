//! Which transitions `watch` shows: the part that runs in the kernel (ports, family, states)
//! and the part that runs here (addresses, the owner's container, cgroup or pod).

use std::net::IpAddr;

use tracer_common::{
    TcpState, TransitionRecord,
    record::{AF_INET, AF_INET6},
    settings::{KernelFilter, MAX_FILTER_PORTS},
};

use crate::{cgroups::CgroupName, event::TransitionExt as _, socket::Family};

/// Every condition must hold; an empty list or `None` keeps everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    /// Either port is one of these (at most `MAX_FILTER_PORTS`).
    pub ports: Vec<u16>,
    /// The local port is one of these.
    pub sports: Vec<u16>,
    /// The remote port is one of these.
    pub dports: Vec<u16>,
    /// Only this address family (`Inet` or `Inet6`).
    pub family: Option<Family>,
    /// The old or the new state is one of these.
    pub states: Vec<TcpState>,
    /// Either address is one of these.
    pub addrs: Vec<IpAddr>,
    /// The owner's container id starts with this (lowercase hex).
    pub container: Option<String>,
    /// The owner's cgroup is this path or below it.
    pub cgroup: Option<String>,
    /// The owner runs in this Kubernetes pod: (namespace, name).
    pub pod: Option<(String, String)>,
}

impl Filter {
    /// The part that runs in the kernel: ports, family, states.
    pub(crate) fn kernel_filter(&self) -> KernelFilter {
        fn port_list(list: &[u16]) -> ([u16; MAX_FILTER_PORTS], u8) {
            let mut out = [0; MAX_FILTER_PORTS];
            for (slot, port) in out.iter_mut().zip(list) {
                *slot = *port;
            }
            (out, list.len().min(MAX_FILTER_PORTS) as u8)
        }
        let (ports, port_count) = port_list(&self.ports);
        let (sports, sport_count) = port_list(&self.sports);
        let (dports, dport_count) = port_list(&self.dports);
        KernelFilter {
            ports,
            sports,
            dports,
            port_count,
            sport_count,
            dport_count,
            family: match self.family {
                Some(Family::Inet) => AF_INET,
                Some(Family::Inet6) => AF_INET6,
                Some(Family::Unknown) | None => 0,
            },
            state_mask: self.states.iter().fold(0, |mask, state| mask | state.mask_bit()),
            ..KernelFilter::ALL
        }
    }

    /// Whether a container filter is given: records then need their owner's cgroup named.
    pub(crate) fn filters_containers(&self) -> bool {
        self.container.is_some() || self.cgroup.is_some() || self.pod.is_some()
    }

    /// The address filter, which runs here.
    pub(super) fn keeps(&self, record: &TransitionRecord) -> bool {
        self.addrs.is_empty() || {
            let (local, remote) = (record.ip(&record.saddr), record.ip(&record.daddr));
            self.addrs.iter().any(|addr| *addr == local || *addr == remote)
        }
    }

    /// The container filters, on the owner's cgroup (`None`: owner or cgroup unknown, which
    /// no container filter keeps).
    pub(super) fn keeps_cgroup(&self, cgroup: Option<&CgroupName>) -> bool {
        if !self.filters_containers() {
            return true;
        }
        let Some(cgroup) = cgroup else { return false };
        let container = &cgroup.container;
        let in_container = self.container.as_ref().is_none_or(|wanted| {
            container.container_id.as_ref().is_some_and(|id| id.starts_with(wanted.as_str()))
        });
        let in_cgroup = self.cgroup.as_ref().is_none_or(|wanted| {
            cgroup.path.strip_prefix(wanted.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || wanted.as_str() == "/"
            })
        });
        let in_pod = self.pod.as_ref().is_none_or(|(namespace, name)| {
            container.pod_namespace.as_ref() == Some(namespace)
                && container.pod_name.as_ref() == Some(name)
        });
        in_container && in_cgroup && in_pod
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_filters_match_the_owner_cgroup() {
        let id = "3f4e".repeat(16);
        let path = format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope");
        let mut cgroup = CgroupName {
            container: crate::container::Container::of_cgroup(&path, std::path::Path::new("/")),
            path,
        };
        cgroup.container.pod_namespace = Some("shop".into());
        cgroup.container.pod_name = Some("checkout".into());
        let container = |id: &str| Filter { container: Some(id.into()), ..Filter::default() };
        let in_cgroup = |path: &str| Filter { cgroup: Some(path.into()), ..Filter::default() };
        let pod =
            |name: &str| Filter { pod: Some(("shop".into(), name.into())), ..Filter::default() };
        assert!(Filter::default().keeps_cgroup(None), "no container filter keeps everything");
        assert!(container("3f4e3f4e").keeps_cgroup(Some(&cgroup)), "a prefix");
        assert!(!container("3f4f").keeps_cgroup(Some(&cgroup)));
        assert!(!container("3f4e").keeps_cgroup(None), "an unknown owner is not in it");
        assert!(in_cgroup("/kubepods.slice").keeps_cgroup(Some(&cgroup)), "below the path");
        assert!(in_cgroup("/").keeps_cgroup(Some(&cgroup)));
        assert!(!in_cgroup("/kubepods").keeps_cgroup(Some(&cgroup)), "a whole component");
        assert!(pod("checkout").keeps_cgroup(Some(&cgroup)));
        assert!(!pod("cart").keeps_cgroup(Some(&cgroup)));
        let both = Filter { container: Some("ab".into()), ..pod("checkout") };
        assert!(!both.keeps_cgroup(Some(&cgroup)), "every condition must hold");
    }

    #[test]
    fn the_kernel_part_carries_ports_family_and_states() {
        let filter = Filter {
            ports: vec![443, 8443],
            family: Some(Family::Inet6),
            states: vec![TcpState::CLOSE_WAIT],
            ..Filter::default()
        };
        let kernel = filter.kernel_filter();
        assert_eq!((kernel.port_count, &kernel.ports[..2]), (2, &[443, 8443][..]));
        assert_eq!(kernel.family, AF_INET6);
        assert_eq!(kernel.state_mask, TcpState::CLOSE_WAIT.mask_bit());
    }
}
