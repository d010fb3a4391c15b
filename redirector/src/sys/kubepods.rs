//! The kubelet's pods cgroup (`--attach-cgroup=kubepods`): every pod of the
//! node is below it, the node's own services (kubelet, sshd, the runtime)
//! are not. Programs attached there run before any attached at the cgroup
//! root, because the kernel runs a cgroup's effective programs from the
//! socket's own cgroup up to the root (`compute_effective_progs` in
//! kernel/bpf/cgroup.c walks `cgroup_parent` after the cgroup's own
//! list). Cilium's socket load balancer attaches at the root; below it,
//! redirector sees the Service address the application dialed.
//!
//! Where the kubelet puts it (pkg/kubelet/cm: `--cgroup-root`, the driver's
//! naming in `cgroup_manager_linux.go`):
//! - systemd driver: `kubepods.slice` (`--cgroup-root=/`), or
//!   `<root>.slice/<root>-kubepods.slice` under a `--cgroup-root` such as
//!   kind's `/kubelet` (`kubelet.slice/kubelet-kubepods.slice`);
//! - cgroupfs driver: `kubepods`, or `<root>/kubepods`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Finds the one kubelet pods cgroup under the cgroup2 mount `root`, at
/// the depths the kubelet uses; refuses none or several (naming them).
pub fn find(root: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    for name in ["kubepods.slice", "kubepods"] {
        let p = root.join(name);
        if p.is_dir() {
            found.push(p);
        }
    }
    let entries =
        std::fs::read_dir(root).map_err(|e| anyhow::anyhow!("reading cgroup root {}: {e}", root.display()))?;
    let mut parents: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    parents.sort();
    for parent in parents {
        let Some(name) = parent.file_name().and_then(|n| n.to_str()) else { continue };
        let child = match name.strip_suffix(".slice") {
            // systemd: the child slice repeats the parent's name as prefix.
            Some(stem) => parent.join(format!("{stem}-kubepods.slice")),
            None => parent.join("kubepods"),
        };
        if name != "kubepods" && name != "kubepods.slice" && child.is_dir() {
            found.push(child);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "option --attach-cgroup: value \"kubepods\": no kubelet pods cgroup under {} (looked for kubepods.slice, \
             kubepods, */kubepods and X.slice/X-kubepods.slice); give its path instead",
            root.display()
        ),
        _ => bail!(
            "option --attach-cgroup: value \"kubepods\": several kubelet pods cgroups under {}: {}; give the path of this \
             node's kubelet's",
            root.display(),
            found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dirs: &[&str]) -> PathBuf {
        let root = std::env::temp_dir().join(format!(
            "rdr-kubepods-{}-{}",
            std::process::id(),
            dirs.join("+").replace('/', "_")
        ));
        let _ = std::fs::remove_dir_all(&root);
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        root
    }

    #[test]
    fn the_kubelets_layouts() {
        for (dirs, want) in [
            (&["kubepods.slice/kubepods-burstable.slice", "system.slice/kubelet.service"][..], "kubepods.slice"),
            (&["kubepods/burstable/pod1", "system.slice"][..], "kubepods"),
            // kind: --cgroup-root=/kubelet with the systemd driver.
            (
                &["kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice", "init.scope"][..],
                "kubelet.slice/kubelet-kubepods.slice",
            ),
            (&["kubelet/kubepods/besteffort", "user.slice"][..], "kubelet/kubepods"),
        ] {
            let root = tree(dirs);
            assert_eq!(find(&root).unwrap(), root.join(want), "{dirs:?}");
            std::fs::remove_dir_all(&root).unwrap();
        }
    }

    #[test]
    fn none_or_several_are_refused() {
        let root = tree(&["system.slice", "user.slice"]);
        let e = find(&root).unwrap_err().to_string();
        assert!(e.contains("no kubelet pods cgroup") && e.contains("--attach-cgroup"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
        let root = tree(&["kubepods.slice", "kubepods"]);
        let e = find(&root).unwrap_err().to_string();
        assert!(
            e.contains("several")
                && e.contains("kubepods.slice, ")
                && e.ends_with("kubepods; give the path of this node's kubelet's"),
            "{e}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
