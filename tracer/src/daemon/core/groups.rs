//! `--group-by container|pod`: the `namespace`, `pod` and `container` labels (the names
//! cAdvisor and kube-state-metrics use, so PromQL joins work) that split `tcpstate_sockets`
//! and `tcpstate_close_wait_leaked_sockets` by the owner's container or pod.
//!
//! Bounded: the `TOP_GROUPS` largest groups get their own series, the rest are summed into
//! one with `container="other"`; sockets in no group (owner unknown, or not in a container)
//! are what is left of each exact gauge, with the three labels empty.

use std::collections::HashMap;

use tracer_common::TcpState;

use super::{gauges::PortLabels, table::Counts};
use crate::{cgroups::CgroupNames, container::Container};

/// Groups with a series of their own; the rest are summed into one.
pub(super) const TOP_GROUPS: usize = 20;

/// What the labels split by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum GroupBy {
    /// One series per container: `namespace`, `pod` and `container` (the Kubernetes
    /// container's name, or the first 12 digits of the id outside Kubernetes).
    Container,
    /// One series per pod: `namespace` and `pod`; `container` stays empty.
    Pod,
}

/// The values of the `namespace`, `pod` and `container` labels of one group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GroupLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl GroupLabels {
    /// The series the groups beyond the top ones are summed into.
    pub(crate) fn other() -> Self {
        Self { container: "other".to_owned(), ..Self::default() }
    }

    pub(crate) fn pairs(&self) -> [(&'static str, String); 3] {
        [
            ("namespace", self.namespace.clone()),
            ("pod", self.pod.clone()),
            ("container", self.container.clone()),
        ]
    }
}

impl GroupBy {
    /// The group of a process in `container`; `None` when it is in none (for `Pod`: in no
    /// pod).
    pub(crate) fn group(self, container: &Container) -> Option<GroupLabels> {
        let namespace = container.pod_namespace.clone().unwrap_or_default();
        let pod = container.pod_name.clone().unwrap_or_default();
        match self {
            Self::Pod => container.pod_name.is_some().then_some(GroupLabels {
                namespace,
                pod,
                ..Default::default()
            }),
            Self::Container => {
                let id = container.container_id.as_ref()?;
                let name = container.container_name.clone().unwrap_or_else(|| id[..12].to_owned());
                Some(GroupLabels { namespace, pod, container: name })
            }
        }
    }
}

/// Tracked sockets per group, port label and state, from the per-cgroup counts of a scrape
/// pass: the `TOP_GROUPS` largest groups, then `other` when there are more.
pub(crate) fn group_sockets(
    per_cgroup: Vec<(u64, Counts)>,
    cgroups: &mut CgroupNames,
    by: GroupBy,
    ports: &PortLabels,
) -> Vec<(GroupLabels, Counts)> {
    let empty = || vec![[0; TcpState::INDEXES]; ports.values()];
    let mut per_group: HashMap<GroupLabels, Counts> = HashMap::new();
    for (id, counts) in per_cgroup {
        let Some(group) = cgroups.get(id).and_then(|named| by.group(&named.container)) else {
            continue;
        };
        add(per_group.entry(group).or_insert_with(empty), &counts);
    }
    let total = |counts: &Counts| counts.iter().flatten().sum::<i64>();
    let mut ranked: Vec<(GroupLabels, Counts)> = per_group.into_iter().collect();
    ranked.sort_by(|a, b| total(&b.1).cmp(&total(&a.1)).then_with(|| a.0.cmp(&b.0)));
    if ranked.len() > TOP_GROUPS {
        let mut other = empty();
        for (_, counts) in ranked.drain(TOP_GROUPS..) {
            add(&mut other, &counts);
        }
        ranked.push((GroupLabels::other(), other));
    }
    ranked
}

fn add(into: &mut Counts, counts: &Counts) {
    for (into, counts) in into.iter_mut().zip(counts) {
        for (into, count) in into.iter_mut().zip(counts) {
            *into += count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1c2a9b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";

    #[test]
    fn groups_are_named_like_cadvisor_labels() {
        let pod = Container {
            container_id: Some(ID.into()),
            pod_uid: Some("u".into()),
            pod_namespace: Some("shop".into()),
            pod_name: Some("checkout-7f9c".into()),
            container_name: Some("api".into()),
        };
        let labels = GroupBy::Container.group(&pod).unwrap();
        assert_eq!((labels.namespace.as_str(), labels.pod.as_str()), ("shop", "checkout-7f9c"));
        assert_eq!(labels.container, "api");
        assert_eq!(GroupBy::Pod.group(&pod).unwrap().container, "");
        let plain = Container { container_id: Some(ID.into()), ..Container::default() };
        assert_eq!(GroupBy::Container.group(&plain).unwrap().container, "3f4e1c2a9b8d");
        assert_eq!(GroupBy::Pod.group(&plain), None, "a container outside any pod");
        assert_eq!(GroupBy::Container.group(&Container::default()), None);
    }
}
