//! Finding the cgroup2 and bpf file systems.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirector";

/// Mount points of a file system type, from /proc/mounts.
pub fn mounts_of(fstype: &str) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(parse_mounts(&text, fstype))
}

fn parse_mounts(text: &str, fstype: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == fstype).then(|| PathBuf::from(unescape(f[1])))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The cgroup2 mount: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = mounts_of("cgroup2")?;
    match mounts.first() {
        Some(p) => Ok(p.clone()),
        None => bail!("no cgroup2 file system is mounted (looked in /proc/mounts); mount one with `mount -t cgroup2 none /sys/fs/cgroup`"),
    }
}

/// Whether `path` is on a bpf file system.
pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `NSFS_MAGIC` (include/uapi/linux/magic.h): namespace files, as
/// `/proc/PID/ns/net` and their bind mounts under `/run/netns`.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Whether `path` is a namespace file (on nsfs).
pub fn is_nsfs(path: &Path) -> bool {
    fs_magic(path) == Some(NSFS_MAGIC)
}

/// Whether `path` is on a cgroup-v2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    fs_magic(path) == Some(CGROUP2_SUPER_MAGIC)
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs on a valid C string into a zeroed struct.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut s) == 0).then_some(s.f_type as i64)
    }
}

/// Checks that the pin directory's parent is on bpffs, creating the pin
/// directory itself if needed.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && !is_bpffs(pin_dir) {
        bail!(
            "pin directory {}: {} is not on a bpf file system; mount one with `mount -t bpf bpf {}`",
            pin_dir.display(),
            parent.display(),
            parent.display()
        );
    }
    std::fs::create_dir_all(pin_dir.join("links"))
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    Ok(())
}

/// The cgroup-v2 id of a cgroup directory (its inode number on cgroup2).
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(dir).with_context(|| format!("reading cgroup {}", dir.display()))?;
    if !m.is_dir() {
        anyhow::bail!("{} is not a cgroup directory", dir.display());
    }
    if !is_cgroup2(dir) {
        anyhow::bail!("{} is not on a cgroup-v2 file system", dir.display());
    }
    Ok(m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_mounts(hybrid, "cgroup2"), vec![PathBuf::from("/sys/fs/cgroup/unified")]);
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(parse_mounts(unified, "cgroup2"), vec![PathBuf::from("/sys/fs/cgroup")]);
        assert!(parse_mounts("proc /proc proc rw 0 0\n", "cgroup2").is_empty());
    }
}
