//! Names for the cgroup ids the kernel program reads with a socket's owner
//! (`bpf_get_current_cgroup_id`: the inode of the owner's cgroup v2 directory): the path, as
//! `/proc/<pid>/cgroup` writes it, and the container and pod that path names.
//!
//! Ids are resolved by walking the cgroup v2 hierarchy (at `/sys/fs/cgroup`, or
//! `/sys/fs/cgroup/unified` on hybrid hosts) and cached. An id not seen before triggers a new
//! walk (a new container's first socket is named, not dropped); the kernel never reuses an
//! id, so one that a walk made after its first sighting does not find is gone for good and is
//! remembered as such, never walked for again. Each walk replaces the cache, so cgroups that
//! are gone (short containers) leave with it; neither map grows past `MAX_CGROUPS`.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::container::{Container, POD_LOGS};

/// Directories one walk records at most (a busy Kubernetes node has a few thousand), and ids
/// remembered as gone at most.
const MAX_CGROUPS: usize = 100_000;

/// What a cgroup id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupName {
    /// The path below the hierarchy's root, starting with `/`.
    pub path: String,
    pub container: Container,
}

/// Cached names of cgroup ids.
#[derive(Debug)]
pub(crate) struct CgroupNames {
    /// The cgroup v2 mount; `None` when the host has none (ids are then always 0).
    root: Option<PathBuf>,
    pod_logs: PathBuf,
    paths: HashMap<u64, String>,
    named: HashMap<u64, Arc<CgroupName>>,
    /// Ids no walk found (cgroups removed before their socket was named).
    gone: HashSet<u64>,
}

impl Default for CgroupNames {
    fn default() -> Self {
        Self::new(cgroup2_mount(), PathBuf::from(POD_LOGS))
    }
}

impl CgroupNames {
    pub(crate) fn new(root: Option<PathBuf>, pod_logs: PathBuf) -> Self {
        Self { root, pod_logs, paths: HashMap::new(), named: HashMap::new(), gone: HashSet::new() }
    }

    /// The name of cgroup `id`; `None` for 0 (unknown) or an id no walk finds (gone).
    pub(crate) fn get(&mut self, id: u64) -> Option<Arc<CgroupName>> {
        if id == 0 {
            return None;
        }
        if let Some(named) = self.named.get(&id) {
            return Some(named.clone());
        }
        if self.gone.contains(&id) {
            return None;
        }
        if !self.paths.contains_key(&id) {
            self.walk();
            if !self.paths.contains_key(&id) {
                if self.gone.len() >= MAX_CGROUPS {
                    self.gone.clear();
                }
                self.gone.insert(id);
                return None;
            }
        }
        let path = self.paths.get(&id)?;
        let named = Arc::new(CgroupName {
            container: Container::of_cgroup(path, &self.pod_logs),
            path: path.clone(),
        });
        self.named.insert(id, named.clone());
        Some(named)
    }

    /// Records every directory of the hierarchy by inode, replacing what was known.
    fn walk(&mut self) {
        let Some(root) = &self.root else { return };
        let mut paths = HashMap::new();
        let mut pending = vec![root.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(metadata) = std::fs::metadata(&dir) else { continue };
            let relative = dir.strip_prefix(root).unwrap_or(Path::new(""));
            paths.insert(metadata.ino(), format!("/{}", relative.display()));
            if paths.len() >= MAX_CGROUPS {
                log::warn!(
                    "more than {MAX_CGROUPS} cgroups under {}: the others are not named",
                    root.display()
                );
                break;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
        self.named.retain(|id, _| paths.contains_key(id));
        self.paths = paths;
    }
}

/// Where the cgroup v2 hierarchy is mounted, from this process's mount table:
/// `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split(' ').next() == Some("cgroup2")).then(|| before.split(' ').nth(4))?
        })
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_directory_inodes_named_by_path_and_container() {
        let base = std::env::temp_dir().join(format!("tcpstate-cgroups-{}", std::process::id()));
        let id = "5e2c6f1d9a0b4c3e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e";
        let scope = base.join("machine.slice").join(format!("libpod-{id}.scope"));
        std::fs::create_dir_all(&scope).unwrap();
        let mut names = CgroupNames::new(Some(base.clone()), base.join("no-pod-logs"));
        let ino = std::fs::metadata(&scope).unwrap().ino();
        let named = names.get(ino).expect("found by walking");
        assert_eq!(named.path, format!("/machine.slice/libpod-{id}.scope"));
        assert_eq!(named.container.container_id.as_deref(), Some(id));
        let root = names.get(std::fs::metadata(&base).unwrap().ino()).unwrap();
        assert_eq!((root.path.as_str(), root.container.is_empty()), ("/", true));
        assert!(names.get(0).is_none(), "0 is unknown");
        // A cgroup made after the last walk is found by the next one.
        let later = base.join("later.scope");
        std::fs::create_dir(&later).unwrap();
        let later_ino = std::fs::metadata(&later).unwrap().ino();
        assert_eq!(names.get(later_ino).unwrap().path, "/later.scope");
        // Gone: the walk an unknown id makes forgets it, and the unknown id is not walked
        // for again.
        std::fs::remove_dir_all(&base).unwrap();
        assert!(names.get(1).is_none());
        assert!(names.gone.contains(&1));
        assert!(names.get(ino).is_none(), "a removed cgroup leaves the cache");
    }

    #[test]
    fn thousands_of_short_lived_cgroups_leave_nothing_behind() {
        let base = std::env::temp_dir().join(format!("tcpstate-churn-{}", std::process::id()));
        let mut names = CgroupNames::new(Some(base.clone()), base.join("no-pod-logs"));
        let mut ids = Vec::new();
        for round in 0..4 {
            let dirs: Vec<PathBuf> =
                (0..500).map(|i| base.join(format!("round{round}-{i}.scope"))).collect();
            for dir in &dirs {
                std::fs::create_dir_all(dir).unwrap();
            }
            for dir in &dirs {
                let id = std::fs::metadata(dir).unwrap().ino();
                assert!(names.get(id).is_some(), "{}", dir.display());
                ids.push(id);
            }
            for dir in &dirs {
                std::fs::remove_dir(dir).unwrap();
            }
        }
        // The next unknown id walks again: only the root is left, and the 2,000 ids of
        // removed cgroups are not named any more.
        assert!(names.get(u64::MAX).is_none());
        assert_eq!((names.paths.len(), names.named.len()), (1, 0));
        assert!(ids.iter().all(|&id| names.get(id).is_none()));
        assert!(names.gone.len() <= ids.len() + 1);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
