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
const SYSFS_MAGIC: i64 = 0x6265_6572;
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

/// The `f_type` of the file system `path` is on (`statfs(2)`), None if
/// `path` cannot be reached.
pub fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs on a valid C string into a zeroed struct.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut s) == 0).then_some(s.f_type as i64)
    }
}

/// A file system type for messages: its name where it is a common one
/// (magic numbers of `linux/magic.h`), and its `f_type`.
pub fn describe_fs(magic: i64) -> String {
    let name = match magic {
        BPF_FS_MAGIC => "bpf",
        CGROUP2_SUPER_MAGIC => "cgroup2",
        0x0027_e0eb => "cgroup (v1)",
        SYSFS_MAGIC => "sysfs",
        0x0102_1994 => "tmpfs",
        0xef53 => "ext2/3/4",
        0x9fa0 => "proc",
        0x794c_7630 => "overlayfs",
        0x9123_683e => "btrfs",
        0x5846_5342 => "xfs",
        _ => return format!("a file system of type 0x{magic:x}"),
    };
    format!("{name} (f_type 0x{magic:x})")
}

/// The nearest existing path at or above `path`, with the type of its
/// file system.
fn nearest_existing(path: &Path) -> Option<(PathBuf, i64)> {
    path.ancestors().find_map(|p| fs_magic(p).map(|m| (p.to_path_buf(), m)))
}

/// What the caller does with the pin directory, for [`require_bpffs`]'s
/// remedy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinUse {
    /// `run`: creates and pins (a new bpffs mount is the remedy).
    Create,
    /// `wait-ready`, `inspect`, `cleanup`: read or remove what an agent
    /// pinned (a new mount would be empty: each bpffs mount is its own
    /// instance).
    Existing,
}

/// Refuses a pin directory that is not (or would not be created) on a bpf
/// file system as this process sees it, naming the file system found
/// instead. Under `ip netns exec` (which mounts a fresh sysfs on /sys, so
/// /sys/fs/bpf is an empty sysfs directory) it says so.
pub fn require_bpffs(pin_dir: &Path, usage: PinUse) -> Result<()> {
    let Some((at, magic)) = nearest_existing(pin_dir) else {
        bail!("pin directory {}: no part of the path exists", pin_dir.display());
    };
    if magic == BPF_FS_MAGIC {
        return Ok(());
    }
    let mount_at = pin_dir.parent().unwrap_or(Path::new("/")).display();
    let under_sys = magic == SYSFS_MAGIC && at.starts_with("/sys");
    let hint = match (under_sys, usage) {
        (true, PinUse::Create) => format!(
            "if this runs under `ip netns exec` (which mounts a new sysfs on /sys, hiding the bpf file \
             system), run it outside; otherwise mount one: `mount -t bpf bpf {mount_at}`"
        ),
        (true, PinUse::Existing) => "if this runs under `ip netns exec` (which mounts a new sysfs on /sys, hiding \
             the bpf file system), the agent's pins cannot be seen from here: run this outside it (`wait-ready \
             --netns /run/netns/NAME` names the namespace), or enter only the network namespace (`nsenter \
             --net=/run/netns/NAME redirector …`); otherwise no bpf file system is mounted there, so no agent runs \
             with this --pin-dir"
            .to_string(),
        (false, PinUse::Create) => format!("mount one: `mount -t bpf bpf {mount_at}`"),
        (false, PinUse::Existing) => "the agent's pins cannot be seen from here: give the --pin-dir the agent \
             uses (a new bpffs mount would be empty: each mount is its own instance)"
            .to_string(),
    };
    let msg = format!(
        "pin directory {}: {} is on {}, not on a bpf file system; {hint}",
        pin_dir.display(),
        at.display(),
        describe_fs(magic)
    );
    bail!(msg)
}

/// Checks that the pin directory is, or will be, on bpffs, and creates it
/// (with its `links` directory) if needed.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    require_bpffs(pin_dir, PinUse::Create)?;
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

    #[test]
    fn a_pin_dir_off_bpffs_is_refused_naming_the_file_system() {
        // A plain directory: the remedy for `run` is a mount; for a reader
        // it is not (a new bpffs mount would be empty).
        let tmp = std::env::temp_dir().join(format!("redirector-nobpf-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let pin = tmp.join("pins");
        let e = require_bpffs(&pin, PinUse::Create).unwrap_err().to_string();
        assert!(e.starts_with(&format!("pin directory {}: {} is on ", pin.display(), tmp.display())), "{e}");
        assert!(
            e.ends_with(&format!("not on a bpf file system; mount one: `mount -t bpf bpf {}`", tmp.display())),
            "{e}"
        );
        let e = require_bpffs(&pin, PinUse::Existing).unwrap_err().to_string();
        assert!(e.contains("the agent's pins cannot be seen from here") && !e.contains("mount one"), "{e}");
        let _ = std::fs::remove_dir(&tmp);
        // sysfs where bpffs should be, as /sys/fs/bpf is under `ip netns
        // exec` (it mounts a new sysfs on /sys): the hint names it.
        if fs_magic(Path::new("/sys/fs")) == Some(SYSFS_MAGIC) {
            let e =
                require_bpffs(Path::new("/sys/fs/redirector-absent/pins"), PinUse::Existing).unwrap_err().to_string();
            assert!(e.contains("/sys/fs is on sysfs (f_type 0x62656572), not on a bpf file system"), "{e}");
            assert!(e.contains("`ip netns exec`") && e.contains("nsenter --net=/run/netns/NAME"), "{e}");
        }
    }
}
