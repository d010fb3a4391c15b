//! Finding a pod's network namespace without a container-runtime client:
//! every container of a pod (the pause container included) lives in a
//! cgroup whose path names the pod UID, and shares the pod's network
//! namespace, so `/proc/PID/cgroup` + `/proc/PID/ns/net` tell where it is.
//! This finds pods that were running before the agent started; new pods
//! also register themselves through the init container (see `registry`).
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// The pod UID named by a cgroup path, in the layouts of the kubelet's two
/// cgroup drivers:
/// - cgroupfs: `/kubepods/burstable/pod0f1e…-…/<container>`;
/// - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e…_….slice/cri-containerd-<id>.scope`
///   (the UID's dashes written as underscores).
///
/// Only a segment that is exactly `pod<uid>` or ends in `-pod<uid>.slice`
/// counts, and the UID must have the 8-4-4-4-12 hex shape.
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    path.split('/').find_map(|seg| {
        let uid = if let Some(rest) = seg.strip_suffix(".slice") {
            rest.rsplit_once("-pod").map(|(_, u)| u)?
        } else {
            seg.strip_prefix("pod")?
        };
        let uid = uid.replace('_', "-");
        is_uid(&uid).then_some(uid)
    })
}

fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pod UID of a process, from the cgroup-v2 line of `/proc/PID/cgroup`
/// (`0::/path`).
pub fn pod_uid_of_pid(proc_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).and_then(pod_uid_from_cgroup_path)
}

/// The cgroup directory of container `id` of pod `pod_uid`, found under
/// `root` (the cgroup the agent attaches to): the pod's directory, in
/// either driver's layout (see [`pod_uid_from_cgroup_path`]), at most 8
/// levels down (each, if there are several), then its child named `<id>` (cgroupfs driver),
/// `<runtime>-<id>.scope` (systemd driver: `cri-containerd-`, `crio-`,
/// `docker-`) or `crio-<id>`. None if there is none (not started yet, or
/// already gone).
pub fn container_cgroup(root: &Path, pod_uid: &str, id: &str) -> Option<PathBuf> {
    const MAX_DEPTH: usize = 8;
    let is_container = |name: &str| {
        name == id
            || name.strip_prefix("crio-") == Some(id)
            || name.strip_suffix(".scope").and_then(|n| n.strip_suffix(id)).is_some_and(|n| n.ends_with('-'))
    };
    let mut level = vec![root.to_path_buf()];
    for _ in 0..=MAX_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if pod_uid_from_cgroup_path(name).as_deref() == Some(pod_uid) {
                    let found = std::fs::read_dir(e.path()).ok().and_then(|children| {
                        children.flatten().find(|c| {
                            c.file_type().is_ok_and(|t| t.is_dir()) && c.file_name().to_str().is_some_and(is_container)
                        })
                    });
                    if let Some(c) = found {
                        return Some(c.path());
                    }
                    continue;
                }
                next.push(e.path());
            }
        }
        level = next;
    }
    None
}

/// An open handle on a pod's network namespace. Holding it keeps the
/// namespace reachable after the process it was found through exits (the
/// init container); it is dropped when the pod is deleted.
#[derive(Debug)]
pub struct NetnsHandle {
    file: File,
    pub cookie: u64,
    /// Where it was found (for logs): `/proc/PID/ns/net`.
    pub source: PathBuf,
}

impl NetnsHandle {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening network namespace {}", path.display()))?;
        let cookie = crate::sys::netns::netns_cookie(&fd_path(&file))?;
        Ok(Self { file, cookie, source: path.to_owned() })
    }

    /// A path that names this namespace for as long as the handle lives
    /// (`/proc/self/fd/N`), for code that takes a namespace path.
    pub fn path(&self) -> PathBuf {
        fd_path(&self.file)
    }
}

fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Every process under `proc_root` whose cgroup names a pod UID in
/// `wanted`, and is not in `host` (the agent's own network namespace:
/// never a pod's). First match per pod, lowest PID first.
pub fn scan(proc_root: &Path, wanted: &[&str], host_cookie: u64) -> BTreeMap<String, NetnsHandle> {
    let mut found = BTreeMap::new();
    if wanted.is_empty() {
        return found;
    }
    let Ok(dir) = std::fs::read_dir(proc_root) else { return found };
    let mut pids: Vec<u32> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids {
        let Some(uid) = pod_uid_of_pid(proc_root, pid) else { continue };
        if found.contains_key(&uid) || !wanted.contains(&uid.as_str()) {
            continue;
        }
        // The process may exit between the two reads: skip it then.
        if let Ok(h) = NetnsHandle::open(&proc_root.join(pid.to_string()).join("ns/net")) {
            if h.cookie != host_cookie {
                found.insert(uid, h);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn both_cgroup_drivers() {
        for path in [
            "/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/5d7c0a",
            "/kubepods/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/5d7c0a",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-5d7c.scope",
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-ab.scope",
            "/kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
        ] {
            assert_eq!(pod_uid_from_cgroup_path(path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn not_pods() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods/burstable",
            "/kubepods/podnotauid/x",
            "/kubepods/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f/x",
            "/kubepods/xpod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/x",
        ] {
            assert_eq!(pod_uid_from_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn scan_reads_a_fake_proc() {
        // Reading a namespace's cookie enters it (setns: CAP_SYS_ADMIN).
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("SKIP scan_reads_a_fake_proc: entering a network namespace needs root (run `cargo xtask test`)");
            return;
        }
        let root = std::env::temp_dir().join(format!("rdr-fakeproc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // PID 7 belongs to the pod; its ns/net is this process's own
        // namespace, which is also the "host" here: so it must be skipped.
        std::fs::create_dir_all(root.join("7/ns")).unwrap();
        std::fs::write(root.join("7/cgroup"), format!("0::/kubepods/pod{UID}/c\n")).unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", root.join("7/ns/net")).unwrap();
        std::fs::create_dir_all(root.join("8")).unwrap();
        std::fs::write(root.join("8/cgroup"), "0::/system.slice/x.service\n").unwrap();
        let own = crate::sys::netns::current_netns_cookie().unwrap();
        assert!(scan(&root, &[UID], own).is_empty());
        let found = scan(&root, &[UID], own.wrapping_add(1));
        assert_eq!(found.len(), 1);
        assert_eq!(found[UID].cookie, own);
        assert!(scan(&root, &["00000000-0000-0000-0000-000000000000"], 0).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn container_cgroups_in_both_drivers() {
        let root = std::env::temp_dir().join(format!("rdr-fakecg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let other = "11111111-2222-4333-8444-555555555555";
        let dirs = [
            format!("kubepods/burstable/pod{UID}/5d7c0a"),
            format!("kubepods/burstable/pod{UID}/pause1"),
            format!("kubepods/burstable/pod{other}/5d7c0a"),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-ab12.scope",
                other.replace('-', "_")
            ),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-cd34.scope",
                other.replace('-', "_")
            ),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-ef56",
                other.replace('-', "_")
            ),
        ];
        for d in &dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // A file named like the container is not a cgroup.
        std::fs::write(root.join(format!("kubepods/burstable/pod{UID}/0a")), "").unwrap();
        assert_eq!(container_cgroup(&root, UID, "5d7c0a"), Some(root.join(&dirs[0])));
        assert_eq!(container_cgroup(&root, UID, "0a"), None);
        assert_eq!(container_cgroup(&root, UID, "7c0a"), None, "a suffix of an ID is not the ID");
        // Each directory of that pod is searched (one per layout here).
        assert_eq!(container_cgroup(&root, other, "5d7c0a"), Some(root.join(&dirs[2])));
        assert_eq!(container_cgroup(&root, "00000000-0000-4000-8000-000000000000", "5d7c0a"), None);
        std::fs::remove_dir_all(&root).unwrap();
        // The systemd layout, alone.
        for d in &dirs[3..] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        assert_eq!(container_cgroup(&root, other, "ab12"), Some(root.join(&dirs[3])));
        assert_eq!(container_cgroup(&root, other, "cd34"), Some(root.join(&dirs[4])));
        assert_eq!(container_cgroup(&root, other, "ef56"), Some(root.join(&dirs[5])));
        assert_eq!(container_cgroup(&root, other, "b12"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
