//! Finding a pod's network namespace without a container-runtime client:
//! a pod's containers live in cgroups whose path names the pod UID and the
//! container ID, and share the pod's network namespace, so
//! `/proc/PID/cgroup` + `/proc/PID/ns/net` tell where it is. Only a
//! process in one of the pod's *container* cgroups counts (the IDs of
//! `status.containerStatuses`, `initContainerStatuses` and
//! `ephemeralContainerStatuses`): other processes in the pod's cgroup may
//! not be in its network namespace. CRI-O with `conmon_cgroup = "pod"`
//! (what Kubernetes' CRI-O setup asks for, and OpenShift's default) runs
//! each container's conmon in the pod's cgroup, in
//! `crio-conmon-<id>.scope`, but in the node's network namespace.
//! This finds pods that were running before the agent started; new pods
//! also register themselves through the init container (see `registry`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// The pod UID named by a cgroup path, in the layouts of the kubelet's two
/// cgroup drivers (kubernetes/kubernetes `pkg/kubelet/cm`: the pod's
/// cgroup is `pod` + UID (`GetPodCgroupNameSuffix`); the systemd driver
/// turns each `-` of a name into `_` and joins the path's names with `-`
/// into a `.slice` (`ConvertCgroupNameToSystemd`)):
/// - cgroupfs: `/kubepods/burstable/pod0f1e…-…/<container>`;
/// - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e…_….slice/cri-containerd-<id>.scope`.
///
/// Only a segment that is exactly `pod<uid>` or ends in `-pod<uid>.slice`
/// counts, and the UID must have the 8-4-4-4-12 hex shape.
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    parse_cgroup_path(path).map(|c| c.pod_uid)
}

/// Where a process is in its pod's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub pod_uid: String,
    pub place: Place,
}

/// The part of a pod's cgroup a process is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// Container `id`'s cgroup, or one below it (crun puts the container's
    /// processes in `<container>/container`, CRI-O puts `exec`'d ones in
    /// `…/exec`).
    Container(String),
    /// CRI-O's conmon for container `id`: in the pod's cgroup, in the
    /// node's network namespace.
    Conmon(String),
    /// The pod's own cgroup, or a child of it that names no container.
    Pod,
}

/// The pod and the container a cgroup path is in. The child of the pod's
/// cgroup names the container, as the runtimes lay it out:
/// - containerd, cgroupfs driver: `<id>` (`getCgroupsPath`: the parent
///   joined with the ID); systemd driver: `cri-containerd-<id>.scope`
///   (runc's `slice:cri-containerd:<id>`, a scope `prefix-name.scope`);
/// - CRI-O (`internal/config/cgmgr`), cgroupfs: `crio-<id>`, conmon in
///   `crio-conmon-<id>`; systemd: `crio-<id>.scope`, conmon in
///   `crio-conmon-<id>.scope`;
/// - cri-dockerd, systemd: `docker-<id>.scope`.
///
/// An ID is letters and digits (the runtimes' 64 hex digits).
pub fn parse_cgroup_path(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').collect();
    let (at, pod_uid) = segments.iter().enumerate().find_map(|(i, seg)| Some((i, pod_uid_of_segment(seg)?)))?;
    let place = segments.get(at + 1).filter(|s| !s.is_empty()).map_or(Place::Pod, |child| container_dir(child));
    Some(PodCgroup { pod_uid, place })
}

fn pod_uid_of_segment(seg: &str) -> Option<String> {
    let uid = if let Some(rest) = seg.strip_suffix(".slice") {
        rest.rsplit_once("-pod").map(|(_, u)| u)?
    } else {
        seg.strip_prefix("pod")?
    };
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// What a child directory of a pod's cgroup is (see [`parse_cgroup_path`]).
fn container_dir(name: &str) -> Place {
    let id_ok = |id: &str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric());
    let (stem, scope) = match name.strip_suffix(".scope") {
        Some(stem) => (stem, true),
        None => (name, false),
    };
    if let Some(id) = stem.strip_prefix("crio-conmon-").filter(|id| id_ok(id)) {
        return Place::Conmon(id.to_string());
    }
    let prefixes: &[&str] = if scope { &["cri-containerd-", "crio-", "docker-"] } else { &["crio-", ""] };
    prefixes
        .iter()
        .find_map(|p| stem.strip_prefix(p).filter(|id| id_ok(id)))
        .map_or(Place::Pod, |id| Place::Container(id.to_string()))
}

fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where process `pid` is in a pod's cgroup, from the cgroup-v2 line of
/// `/proc/PID/cgroup` (`0::/path`). None: in no pod's cgroup.
pub fn cgroup_of_pid(proc_root: &Path, pid: u32) -> Option<PodCgroup> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).and_then(parse_cgroup_path)
}

/// The cgroup that container `id` of pod `pod_uid` runs its processes in,
/// found under `root` (the cgroup the agent attaches to): the pod's
/// directory, in either driver's layout (see [`pod_uid_from_cgroup_path`]),
/// at most 8 levels down (each, if there are several); its child that is
/// container `id`'s (see [`parse_cgroup_path`]; never CRI-O's
/// `crio-conmon-<id>`, which carries the same ID); and, when that has a
/// child `container`, that child: crun with the systemd driver runs the
/// container's processes there (CRI-O's `crunContainerCgroupManager` looks
/// for the same name). None if there is none (not started yet, or already
/// gone).
pub fn container_cgroup(root: &Path, pod_uid: &str, id: &str) -> Option<PathBuf> {
    const MAX_DEPTH: usize = 8;
    let is_dir = |e: &std::fs::DirEntry| e.file_type().is_ok_and(|t| t.is_dir());
    let mut level = vec![root.to_path_buf()];
    for _ in 0..=MAX_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten().filter(is_dir) {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if pod_uid_of_segment(name).as_deref() == Some(pod_uid) {
                    let found = std::fs::read_dir(e.path()).ok().and_then(|children| {
                        children.flatten().filter(is_dir).find(|c| {
                            c.file_name().to_str().map(container_dir) == Some(Place::Container(id.to_string()))
                        })
                    });
                    if let Some(c) = found {
                        let crun = c.path().join("container");
                        return Some(if crun.is_dir() { crun } else { c.path() });
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
    /// The ID maps of that process's user namespace, when it is not the
    /// agent's (a pod with `hostUsers: false`); read once, as the maps of
    /// a user namespace never change once written.
    pub id_maps: Option<redirector_policy::IdMaps>,
    /// The nameservers of that process's resolv.conf (what DNS capture
    /// takes), read once: a pod's resolv.conf is written when its sandbox
    /// is made and bind-mounted into each container. Err: why not.
    pub nameservers: std::result::Result<Vec<std::net::IpAddr>, String>,
}

impl NetnsHandle {
    /// The network namespace of process `pid` under `proc_root`, with its
    /// user namespace's ID maps.
    pub fn open_pid(proc_root: &Path, pid: u32) -> Result<Self> {
        let path = proc_root.join(pid.to_string()).join("ns/net");
        let file = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
        let cookie = crate::sys::netns::netns_cookie(&fd_path(&file))?;
        let id_maps = crate::sys::userns::id_maps_of_pid(proc_root, pid)
            .with_context(|| format!("the user namespace of process {pid}"))?;
        let conf = proc_root.join(pid.to_string()).join("root/etc/resolv.conf");
        let nameservers = std::fs::read_to_string(&conf)
            .map(|t| crate::sys::resolv::nameservers(&t))
            .map_err(|e| format!("reading {}: {e}", conf.display()));
        Ok(Self { file, cookie, source: path, id_maps, nameservers })
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

/// For each pod of `wanted` (pod UID → the IDs of its containers), the
/// network namespace of a process in one of those containers' cgroups
/// (lowest PID first), never one in `never` (the node's namespace and
/// the agent's own). A process elsewhere in the pod's cgroup (conmon, or
/// a container the pod's status does not list yet) is not taken. The
/// second map: pods whose container process was there but could not be
/// used, with why (a process that exits meanwhile is just skipped).
pub fn scan(
    proc_root: &Path,
    wanted: &BTreeMap<String, BTreeSet<String>>,
    never: &BTreeSet<u64>,
) -> (BTreeMap<String, NetnsHandle>, BTreeMap<String, String>) {
    let mut found = BTreeMap::new();
    let mut errors = BTreeMap::new();
    if wanted.is_empty() {
        return (found, errors);
    }
    let Ok(dir) = std::fs::read_dir(proc_root) else { return (found, errors) };
    let mut pids: Vec<u32> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids {
        let Some(PodCgroup { pod_uid, place: Place::Container(id) }) = cgroup_of_pid(proc_root, pid) else { continue };
        if found.contains_key(&pod_uid) || !wanted.get(&pod_uid).is_some_and(|ids| ids.contains(&id)) {
            continue;
        }
        match NetnsHandle::open_pid(proc_root, pid) {
            Ok(h) if never.contains(&h.cookie) => {}
            Ok(h) => {
                errors.remove(&pod_uid);
                found.insert(pod_uid, h);
            }
            // The process may exit between the reads: skip it then.
            Err(_) if !proc_root.join(pid.to_string()).exists() => {}
            Err(e) => {
                errors.insert(pod_uid, format!("{e:#}"));
            }
        }
    }
    (found, errors)
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

    /// The container a cgroup path is in, in each runtime's layout (see
    /// [`parse_cgroup_path`] for the sources).
    #[test]
    fn containers_and_conmon_in_each_layout() {
        let sd =
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice";
        let fs = "/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let c = |id: &str| Place::Container(id.into());
        for (path, place) in [
            (format!("{fs}/5d7c0a"), c("5d7c0a")),
            (format!("{fs}/crio-5d7c0a"), c("5d7c0a")),
            (format!("{fs}/crio-conmon-5d7c0a"), Place::Conmon("5d7c0a".into())),
            (format!("{sd}/cri-containerd-5d7c0a.scope"), c("5d7c0a")),
            (format!("{sd}/crio-5d7c0a.scope"), c("5d7c0a")),
            (format!("{sd}/docker-5d7c0a.scope"), c("5d7c0a")),
            (format!("{sd}/crio-conmon-5d7c0a.scope"), Place::Conmon("5d7c0a".into())),
            // crun with systemd: the processes are one level down; CRI-O
            // puts `exec`'d processes in `exec`.
            (format!("{sd}/crio-5d7c0a.scope/container"), c("5d7c0a")),
            (format!("{sd}/crio-5d7c0a.scope/container/exec"), c("5d7c0a")),
            (format!("/../..{sd}/crio-5d7c0a.scope"), c("5d7c0a")),
            (sd.to_string(), Place::Pod),
            (format!("{sd}/"), Place::Pod),
            (format!("{sd}/crio-.scope"), Place::Pod),
            (format!("{sd}/other-5d7c0a.scope"), Place::Pod),
            (format!("{sd}/crio-conmon-.scope"), Place::Pod),
            (format!("{fs}/a-b"), Place::Pod),
        ] {
            let got = parse_cgroup_path(&path);
            assert_eq!(got, Some(PodCgroup { pod_uid: UID.into(), place }), "{path}");
        }
        assert_eq!(parse_cgroup_path("/system.slice/crio.service"), None);
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
        let sd = format!("/kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_"));
        // PID 5: conmon (lower PID, in the pod's cgroup, not a container);
        // 6: the pod's cgroup itself; 7: the container, one level down
        // (crun); 8: no pod. Every ns/net and ns/user is this process's.
        for (pid, cgroup) in [
            (5, format!("{sd}/crio-conmon-ab12.scope")),
            (6, sd.clone()),
            (7, format!("{sd}/crio-ab12.scope/container")),
            (8, "/system.slice/x.service".to_string()),
        ] {
            std::fs::create_dir_all(root.join(format!("{pid}/ns"))).unwrap();
            std::fs::write(root.join(format!("{pid}/cgroup")), format!("0::{cgroup}\n")).unwrap();
            for ns in ["net", "user"] {
                std::os::unix::fs::symlink(format!("/proc/self/ns/{ns}"), root.join(format!("{pid}/ns/{ns}"))).unwrap();
            }
        }
        let own = crate::sys::netns::current_netns_cookie().unwrap();
        let wanted = |ids: &[&str]| BTreeMap::from([(UID.to_string(), ids.iter().map(|s| s.to_string()).collect())]);
        let (found, errors) = scan(&root, &wanted(&["ab12"]), &BTreeSet::new());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(found.len(), 1);
        assert_eq!((found[UID].cookie, found[UID].source.clone()), (own, root.join("7/ns/net")), "not the container");
        assert!(scan(&root, &wanted(&["ab12"]), &BTreeSet::from([own])).0.is_empty(), "a `never` namespace taken");
        assert!(scan(&root, &wanted(&["cd34"]), &BTreeSet::new()).0.is_empty(), "a container of another ID taken");
        assert!(scan(&root, &BTreeMap::new(), &BTreeSet::new()).0.is_empty());
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
        // The systemd layout, alone; CRI-O's conmon scopes (created first)
        // carry the containers' IDs but are never taken; crun's processes
        // are in the scope's `container` child.
        let pod = format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            other.replace('-', "_")
        );
        for d in ["crio-conmon-cd34.scope", "crio-conmon-gh78.scope", "crio-conmon-ij90.scope"] {
            std::fs::create_dir_all(root.join(&pod).join(d)).unwrap();
        }
        for d in &dirs[3..] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::create_dir_all(root.join(&pod).join("crio-gh78.scope/container")).unwrap();
        assert_eq!(container_cgroup(&root, other, "ab12"), Some(root.join(&dirs[3])));
        assert_eq!(container_cgroup(&root, other, "cd34"), Some(root.join(&dirs[4])));
        assert_eq!(container_cgroup(&root, other, "ef56"), Some(root.join(&dirs[5])));
        assert_eq!(container_cgroup(&root, other, "gh78"), Some(root.join(&pod).join("crio-gh78.scope/container")));
        assert_eq!(container_cgroup(&root, other, "ij90"), None, "conmon's cgroup taken for the container's");
        assert_eq!(container_cgroup(&root, other, "b12"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
