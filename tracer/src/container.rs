//! Which container and Kubernetes pod a process runs in, from its cgroup path alone: the
//! runtimes name their cgroups after the container id, the kubelet after the pod's uid, and
//! every kubelet node keeps `/var/log/pods/<namespace>_<name>_<uid>/`, the convention log
//! shippers rely on, so no API server is needed.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a cgroup path says about its process's container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Container {
    /// The runtime's full container id (64 hex digits).
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// The Kubernetes container's name (`spec.containers[].name`), from the kubelet's
    /// `/var/log/containers/<pod>_<namespace>_<name>-<id>.log` links.
    pub container_name: Option<String>,
}

/// Where the kubelet keeps pod log directories.
pub(crate) const POD_LOGS: &str = "/var/log/pods";

impl Container {
    /// Reads `cgroup` (a path as `/proc/<pid>/cgroup` gives it), naming the pod from the
    /// directories under `pod_logs` and the container from the links in its sibling
    /// `containers` (`/var/log/pods`, `/var/log/containers`).
    pub(crate) fn of_cgroup(cgroup: &str, pod_logs: &Path) -> Self {
        let container_id = cgroup.split('/').rev().find_map(container_id);
        let pod_uid = cgroup.split('/').find_map(pod_uid);
        let (pod_namespace, pod_name) =
            pod_uid.as_deref().and_then(|uid| pod_of(uid, pod_logs)).unzip();
        let container_name = match (&container_id, &pod_namespace, &pod_name) {
            (Some(id), Some(namespace), Some(pod)) => {
                let links = pod_logs.parent().unwrap_or(Path::new("/")).join("containers");
                name_of(id, &format!("{pod}_{namespace}_"), &links)
            }
            _ => None,
        };
        Self { container_id, pod_uid, pod_namespace, pod_name, container_name }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.container_id.is_none() && self.pod_uid.is_none()
    }
}

/// The container id in one path component, for the runtimes' naming patterns:
/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`
/// (systemd cgroup driver), or a bare `<id>` under `/docker/`, `/kubepods/...`, `libpod-...`
/// (cgroupfs driver).
fn container_id(component: &str) -> Option<String> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    let id = ["docker-", "cri-containerd-", "crio-", "libpod-", "containerd-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    let is_id = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    is_id.then(|| id.to_owned())
}

/// The pod uid in one path component: `kubepods-burstable-pod<uid>.slice` (systemd driver,
/// dashes in the uid written as underscores) or `pod<uid>` (cgroupfs driver).
fn pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let uid = &name[name.rfind("pod")? + 3..];
    let uid = uid.replace('_', "-");
    let is_uid = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) { b == b'-' } else { b.is_ascii_hexdigit() }
        });
    is_uid.then_some(uid)
}

/// (namespace, name) of the pod whose log directory ends in `_<uid>`.
fn pod_of(uid: &str, pod_logs: &Path) -> Option<(String, String)> {
    let suffix = format!("_{uid}");
    std::fs::read_dir(pod_logs).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        let (namespace, pod) = name.strip_suffix(&suffix)?.split_once('_')?;
        Some((namespace.to_owned(), pod.to_owned()))
    })
}

/// The container name in `<pod>_<namespace>_<name>-<id>.log` under `links`.
fn name_of(id: &str, pod_prefix: &str, links: &Path) -> Option<String> {
    let suffix = format!("-{id}.log");
    std::fs::read_dir(links).ok()?.flatten().find_map(|entry| {
        let file = entry.file_name().into_string().ok()?;
        let name = file.strip_prefix(pod_prefix)?.strip_suffix(&suffix)?;
        (!name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1c2a9b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const UID: &str = "0b7e5a3c-1d2f-4e6a-8b9c-0d1e2f3a4b5c";

    fn logs_with(entries: &[&str]) -> std::path::PathBuf {
        // `pods` in a directory of its own, so its sibling `containers` is the test's too.
        let dir = std::env::temp_dir()
            .join(format!("tcpstate-logs-{}-{}", std::process::id(), entries.len()))
            .join("pods");
        for entry in entries {
            std::fs::create_dir_all(dir.join(entry)).unwrap();
        }
        dir
    }

    #[test]
    fn runtimes_and_drivers_name_the_container() {
        let none = Path::new("/nonexistent");
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/system.slice/crio-{ID}.scope"),
        ] {
            let found = Container::of_cgroup(&path, none);
            assert_eq!(found.container_id.as_deref(), Some(ID), "{path}");
            assert_eq!(found.pod_uid, None, "{path}");
        }
        assert!(
            Container::of_cgroup("/user.slice/user-1000.slice/session-2.scope", none).is_empty()
        );
        assert!(Container::of_cgroup("/", none).is_empty());
    }

    #[test]
    fn kubernetes_pods_are_named_from_the_kubelet_log_directories() {
        // Entries that do not follow the convention are skipped, whatever their order.
        let logs = logs_with(&[
            &format!("nonamespace_{UID}"),
            &format!("_{UID}"),
            &format!("shop_checkout-7d9f_{UID}"),
            "other_pod_x",
            "README",
        ]);
        let links = logs.parent().unwrap().join("containers");
        std::fs::create_dir_all(&links).unwrap();
        std::fs::write(links.join(format!("checkout-7d9f_shop_api-{ID}.log")), "").unwrap();
        std::fs::write(links.join("unrelated.log"), "").unwrap();
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
             cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let cgroupfs = format!("/kubepods/besteffort/pod{UID}/{ID}");
        for path in [systemd, cgroupfs] {
            let found = Container::of_cgroup(&path, &logs);
            assert_eq!(found.container_id.as_deref(), Some(ID), "{path}");
            assert_eq!(found.pod_uid.as_deref(), Some(UID), "{path}");
            assert_eq!(found.pod_namespace.as_deref(), Some("shop"), "{path}");
            assert_eq!(found.pod_name.as_deref(), Some("checkout-7d9f"), "{path}");
            assert_eq!(found.container_name.as_deref(), Some("api"), "{path}");
        }
        // A pod the node has no log directory for: its uid, without a name.
        let other = Container::of_cgroup(&format!("/kubepods/pod{UID}/{ID}"), Path::new("/none"));
        assert_eq!((other.pod_uid.as_deref(), other.pod_name), (Some(UID), None));
        let _ = std::fs::remove_dir_all(logs.parent().unwrap());
    }
}
