//! cgroup-v2 directories: telling one from a plain directory, a process's
//! own cgroup directory, and whether a cgroup lies inside another's
//! subtree (only processes in the attach cgroup or below it are
//! redirected: the programs are cgroup programs).
use std::{
    collections::VecDeque,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::mounts;

/// The id of a cgroup-v2 hierarchy's root cgroup (its directory's inode
/// number; `bpf_get_current_cgroup_id()` of a process in it). Every process
/// is in its subtree.
pub const ROOT_CGROUP_ID: u64 = 1;

/// Refuses `--cgroup` values that are not a cgroup-v2 directory, before
/// anything is pinned (attaching to a plain directory fails with EBADF
/// after the maps are pinned).
pub fn require_cgroup2_dir(dir: &Path) -> Result<()> {
    let why = match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "it does not exist".to_string(),
        Err(e) => format!("it cannot be read: {e}"),
        Ok(m) if !m.is_dir() => "it is not a directory".to_string(),
        Ok(_) if mounts::is_cgroup2(dir) => return Ok(()),
        Ok(_) => match mounts::fs_magic(dir) {
            Some(m) => format!("it is on {}, not on cgroup2 (f_type 0x63677270)", mounts::describe_fs(m)),
            None => "its file system cannot be read".to_string(),
        },
    };
    let mounted = mounts::mounts_of("cgroup2").unwrap_or_default();
    let mounted = if mounted.is_empty() {
        "no cgroup2 file system is mounted".to_string()
    } else {
        format!(
            "cgroup2 is mounted at {}",
            mounted.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    };
    bail!(
        "option --cgroup: value {}: not a cgroup-v2 directory ({why}); give the cgroup2 mount or a group below it \
         ({mounted}); nothing was loaded or pinned",
        dir.display()
    )
}

/// The cgroup-v2 path of process `pid` as `proc_root` shows it (the `0::`
/// line of `/proc/PID/cgroup`), relative to the reader's cgroup namespace.
pub fn cgroup_path_of(proc_root: &Path, pid: u32) -> Result<String> {
    let file = proc_root.join(pid.to_string()).join("cgroup");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    parse_cgroup_file(&text).ok_or_else(|| anyhow!("{}: no cgroup-v2 line (`0::PATH`)", file.display()))
}

fn parse_cgroup_file(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// Whether `pid` is listed in `dir`'s `cgroup.procs` (the kernel's answer
/// to "is this process in that very cgroup", in the reader's PID
/// namespace).
fn lists_pid(dir: &Path, pid: u32) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|t| t.lines().any(|l| l.trim().parse::<u32>().ok() == Some(pid)))
}

/// This process's own cgroup directory: its `/proc/self/cgroup` path under
/// one of the cgroup2 mounts it sees, checked to list this process in
/// `cgroup.procs` (so a mount of a subtree cannot be mistaken for the
/// hierarchy's root).
pub fn own_cgroup_dir() -> Result<(String, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = parse_cgroup_file(&text).ok_or_else(|| anyhow!("/proc/self/cgroup: no cgroup-v2 line (`0::PATH`)"))?;
    if rel.starts_with("/..") {
        bail!("this process's cgroup {rel} lies outside its cgroup namespace, so its directory cannot be reached");
    }
    let mounted = mounts::mounts_of("cgroup2")?;
    for m in &mounted {
        let dir = m.join(rel.trim_start_matches('/'));
        if lists_pid(&dir, std::process::id()) {
            return Ok((rel, dir));
        }
    }
    bail!(
        "this process's cgroup {rel} is under none of the cgroup2 mounts it sees ({})",
        if mounted.is_empty() {
            "none is mounted".to_string()
        } else {
            mounted.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        }
    )
}

/// Whether the cgroup with id `ancestor` is `dir` or one of its ancestors:
/// walks up comparing inode numbers. None when the walk reaches the root
/// of the mount `dir` is on and that is not the hierarchy's root (the
/// answer lies above what this process sees).
pub fn ancestry_contains(dir: &Path, ancestor: u64) -> Result<Option<bool>> {
    let mut cur = dir.to_path_buf();
    let mut meta = std::fs::metadata(&cur).with_context(|| format!("reading cgroup {}", cur.display()))?;
    loop {
        if meta.ino() == ancestor {
            return Ok(Some(true));
        }
        if meta.ino() == ROOT_CGROUP_ID {
            return Ok(Some(false));
        }
        let Some(parent) = cur.parent().map(Path::to_path_buf) else { return Ok(None) };
        let up = std::fs::metadata(&parent).with_context(|| format!("reading {}", parent.display()))?;
        if up.dev() != meta.dev() {
            return Ok(None);
        }
        (cur, meta) = (parent, up);
    }
}

/// The most directories [`pid_in_subtree`] reads before it gives up
/// (a node has a few hundred to a few thousand cgroups).
const MAX_SEARCHED: usize = 100_000;

/// Whether process `pid` (a PID as `proc_root` and `cgroup.procs` show it)
/// is in the cgroup `dir` or below it. The hierarchy's root holds every
/// process; below it, `dir`'s subtree is searched for the directory named
/// like the last component of the process's cgroup path and listing it in
/// `cgroup.procs` (the path itself cannot be joined onto `dir`: the reader
/// may be in another cgroup namespace, where it starts with `/..`).
pub fn pid_in_subtree(dir: &Path, pid: u32, proc_root: &Path) -> Result<bool> {
    let meta = std::fs::metadata(dir).with_context(|| format!("reading cgroup {}", dir.display()))?;
    if meta.ino() == ROOT_CGROUP_ID {
        return Ok(true);
    }
    let rel = cgroup_path_of(proc_root, pid)?;
    let leaf = rel.rsplit('/').next().filter(|l| !l.is_empty() && *l != "..").map(str::to_owned);
    let mut queue = VecDeque::from([dir.to_path_buf()]);
    let mut searched = 0;
    while let Some(d) = queue.pop_front() {
        searched += 1;
        if searched > MAX_SEARCHED {
            bail!("cgroup {}: more than {MAX_SEARCHED} groups below it; not searched further", dir.display());
        }
        let named = leaf.as_deref().is_none_or(|l| d.file_name().is_some_and(|n| n == l));
        if (named || d == dir) && lists_pid(&d, pid) {
            return Ok(true);
        }
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(e.path());
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_v2_line_is_read_among_v1_lines() {
        let hybrid = "9:name=systemd:/\n4:memory:/a/b\n0::/system.slice/x.service\n";
        assert_eq!(parse_cgroup_file(hybrid).as_deref(), Some("/system.slice/x.service"));
        assert_eq!(parse_cgroup_file("1:cpu:/\n"), None);
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = std::env::temp_dir();
        let e = require_cgroup2_dir(&dir).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("option --cgroup: value {}: not a cgroup-v2 directory (it is on ", dir.display())),
            "{e}"
        );
        assert!(e.ends_with("nothing was loaded or pinned"), "{e}");
        let e = require_cgroup2_dir(Path::new("/nonexistent/redirector-cgroup")).unwrap_err().to_string();
        assert!(e.contains("not a cgroup-v2 directory (it does not exist)"), "{e}");
    }

    /// A plain directory tree stands in for a cgroup subtree here: the
    /// search reads only directory names and `cgroup.procs` files, as it
    /// does on cgroup2 (where `cgroup.procs` lists the PIDs of the group's
    /// processes, one a line: Documentation/admin-guide/cgroup-v2.rst).
    #[test]
    fn a_process_is_found_by_its_leaf_and_cgroup_procs() {
        let base = std::env::temp_dir().join(format!("redirector-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let proc_root = base.join("proc");
        let attach = base.join("cg/attach");
        for d in ["cg/attach/pod1/ctr", "cg/attach/pod2/ctr", "cg/outside/pod3/ctr", "proc/41", "proc/42", "proc/43"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        std::fs::write(base.join("cg/attach/pod1/ctr/cgroup.procs"), "7\n").unwrap();
        std::fs::write(base.join("cg/attach/pod2/ctr/cgroup.procs"), "41\n8\n").unwrap();
        std::fs::write(base.join("cg/outside/pod3/ctr/cgroup.procs"), "42\n").unwrap();
        // Seen from another cgroup namespace: the path climbs out first.
        std::fs::write(proc_root.join("41/cgroup"), "0::/../../attach/pod2/ctr\n").unwrap();
        std::fs::write(proc_root.join("42/cgroup"), "0::/outside/pod3/ctr\n").unwrap();
        std::fs::write(proc_root.join("43/cgroup"), "0::/attach/pod1/ctr\n").unwrap();
        let inside = |pid| pid_in_subtree(&attach, pid, &proc_root).unwrap();
        assert!(inside(41), "listed in a `ctr` below the attach cgroup");
        assert!(!inside(42), "its `ctr` is outside the attach cgroup");
        assert!(!inside(43), "a `ctr` below the attach cgroup, but not listing it");
        let _ = std::fs::remove_dir_all(&base);
    }
}
