//! cgroup v2 ids (what `bpf_get_current_cgroup_id` returns: the inode number of the cgroup's
//! directory) to paths, and paths to Kubernetes pod UIDs and container ids, without the API
//! server.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Where a cgroup puts a task, as far as the path tells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The cgroup path below the cgroup2 mount, e.g. `/kubepods.slice/...`.
    pub cgroup: String,
    /// The pod's UID, from a `pod<UID>` path component.
    pub pod_uid: Option<String>,
    /// The container id, from the last component (`cri-containerd-<id>.scope`, `docker-<id>`,
    /// `crio-<id>`, or a bare 64-hex id).
    pub container_id: Option<String>,
}

/// Parses a cgroup path for pod and container identity.
pub fn parse_path(path: &str) -> Workload {
    let mut w = Workload {
        cgroup: path.to_string(),
        ..Default::default()
    };
    for comp in path.split('/') {
        // cgroupfs driver: pod<uid>; systemd driver: kubepods-burstable-pod<uid_with_underscores>.slice
        let comp = comp.strip_suffix(".slice").unwrap_or(comp);
        if let Some(idx) = comp.rfind("pod") {
            let uid = &comp[idx + 3..];
            if uid.len() == 36
                && uid
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
            {
                w.pod_uid = Some(uid.replace('_', "-"));
            }
        }
    }
    if let Some(last) = path.rsplit('/').next() {
        let last = last.strip_suffix(".scope").unwrap_or(last);
        let id = ["cri-containerd-", "docker-", "crio-", "containerd-"]
            .iter()
            .find_map(|p| last.strip_prefix(p))
            .unwrap_or(last);
        if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
            w.container_id = Some(id.to_string());
        }
    }
    w
}

/// Where cgroup2 (the unified hierarchy, whose ids BPF reports) is mounted, if anywhere.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
    mounts
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

/// Resolves cgroup ids by walking the cgroup2 hierarchy, with a cache.
pub struct Resolver {
    root: PathBuf,
    known: HashMap<u64, Workload>,
}

impl Resolver {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            known: HashMap::new(),
        }
    }

    /// The workload of cgroup `id`; walks the hierarchy again when the id is new.
    pub fn resolve(&mut self, id: u64) -> Option<Workload> {
        if id == 0 {
            return None;
        }
        if let Some(w) = self.known.get(&id) {
            return Some(w.clone());
        }
        let root = self.root.clone();
        let mut found = None;
        walk(&root, &root, &mut |rel, ino| {
            self.known.entry(ino).or_insert_with(|| parse_path(rel));
            if ino == id {
                found = Some(parse_path(rel));
            }
        });
        found
    }
}

/// Pod UID → namespace and name, from the kubelet's log directories
/// (`/var/log/pods/NAMESPACE_NAME_UID`) under the node's root (`--host-root`). No API server.
pub struct PodNames {
    dir: PathBuf,
    known: HashMap<String, (String, String)>,
    last_scan: Option<std::time::Instant>,
}

/// How often an unknown UID may trigger a new directory scan.
const RESCAN_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// `NAMESPACE_NAME_UID` → (namespace, name, uid). Neither a namespace nor a pod name can hold
/// an underscore (DNS names), so the split is unambiguous.
pub fn parse_pod_dir(name: &str) -> Option<(String, String, String)> {
    let mut it = name.split('_');
    let (ns, pod, uid) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || ns.is_empty() || pod.is_empty() || uid.len() != 36 {
        return None;
    }
    Some((ns.to_string(), pod.to_string(), uid.to_string()))
}

impl PodNames {
    pub fn new(host_root: &Path) -> Self {
        Self {
            dir: host_root.join("var/log/pods"),
            known: HashMap::new(),
            last_scan: None,
        }
    }

    fn scan(&mut self) {
        self.last_scan = Some(std::time::Instant::now());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if let Some((ns, pod, uid)) = parse_pod_dir(&e.file_name().to_string_lossy()) {
                self.known.insert(uid, (ns, pod));
            }
        }
    }

    /// (namespace, name) of the pod with `uid`, if the node has its log directory.
    pub fn lookup(&mut self, uid: &str) -> Option<(String, String)> {
        if let Some(found) = self.known.get(uid) {
            return Some(found.clone());
        }
        if self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_AFTER) {
            self.scan();
        }
        self.known.get(uid).cloned()
    }
}

fn walk(root: &Path, dir: &Path, visit: &mut dyn FnMut(&str, u64)) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let rel = dir
        .strip_prefix(root)
        .map_or_else(|_| String::new(), |r| r.display().to_string());
    visit(&format!("/{rel}"), meta.ino());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &e.path(), visit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_driver_paths() {
        let w = parse_path(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f3e6a52_4c1b_4e5e_9a2d_7b1c2d3e4f50.slice/cri-containerd-4b6c0a4f3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c.scope",
        );
        assert_eq!(
            w.pod_uid.as_deref(),
            Some("0f3e6a52-4c1b-4e5e-9a2d-7b1c2d3e4f50")
        );
        assert_eq!(
            w.container_id.as_deref(),
            Some("4b6c0a4f3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c")
        );
    }

    #[test]
    fn cgroupfs_driver_paths() {
        let w = parse_path(
            "/kubepods/besteffort/pod0f3e6a52-4c1b-4e5e-9a2d-7b1c2d3e4f50/4b6c0a4f3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c",
        );
        assert_eq!(
            w.pod_uid.as_deref(),
            Some("0f3e6a52-4c1b-4e5e-9a2d-7b1c2d3e4f50")
        );
        assert!(w.container_id.is_some());
    }

    #[test]
    fn pod_names_from_log_directories() {
        let uid = "0f3e6a52-4c1b-4e5e-9a2d-7b1c2d3e4f50";
        assert_eq!(
            parse_pod_dir(&format!("shop_checkout-7d9f_{uid}")),
            Some(("shop".into(), "checkout-7d9f".into(), uid.into()))
        );
        assert_eq!(parse_pod_dir("shop_checkout"), None);
        assert_eq!(parse_pod_dir(&format!("a_b_c_{uid}")), None);
        let root = std::env::temp_dir().join(format!("netrace-pods-{}", std::process::id()));
        let dir = root
            .join("var/log/pods")
            .join(format!("shop_checkout-7d9f_{uid}"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let mut names = PodNames::new(&root);
        assert_eq!(
            names.lookup(uid),
            Some(("shop".to_string(), "checkout-7d9f".to_string()))
        );
        assert_eq!(names.lookup("ffffffff-4c1b-4e5e-9a2d-7b1c2d3e4f50"), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn non_kubernetes_paths() {
        let w = parse_path("/user.slice/user-0.slice/session-1.scope");
        assert_eq!(w.pod_uid, None);
        assert_eq!(w.container_id, None);
    }

    #[test]
    fn resolves_this_process() {
        // Machines with only cgroup v1 mounted have nothing to resolve (netrace mounts cgroup2
        // privately there; the end-to-end attribution test covers that).
        let Some(root) = cgroup2_root() else {
            return;
        };
        let cgroups = procfs::process::Process::myself()
            .and_then(|p| p.cgroups())
            .map(|c| c.0)
            .unwrap_or_default();
        let Some(rel) = cgroups
            .iter()
            .find(|c| c.hierarchy == 0)
            .map(|c| c.pathname.as_str())
        else {
            return;
        };
        let dir = root.join(rel.trim_start_matches('/'));
        let meta = std::fs::metadata(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut r = Resolver::new(root);
        let w = r.resolve(meta.ino()).unwrap_or_default();
        assert_eq!(
            w.cgroup.trim_end_matches('/'),
            format!("/{}", rel.trim_start_matches('/')).trim_end_matches('/')
        );
    }
}
