//! One agent per pin directory: an exclusive `flock(2)` on the pin
//! directory itself, held for the agent's whole life (the kernel drops it
//! when the process exits, however it exits), and the owner record beside
//! the pins.
//!
//! bpffs holds only directories, pinned objects and symlinks (no regular
//! files: `bpf_dir_iops` in the kernel's `kernel/bpf/inode.c` has no
//! `create`, so `open(O_CREAT)` there fails with EPERM), so the lock is
//! taken on the directory and the record is the target of the symlink
//! `<pin-dir>/owner`: JSON naming the holder's PID (in its own PID
//! namespace), its command, the cgroup it attaches to and when it started.
//! The record stays after the holder exits (it then names the last agent);
//! only the lock says whether that one still runs.
use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// The owner record's name in the pin directory (a symlink).
pub const OWNER: &str = "owner";

/// Who holds (or last held) a pin directory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// The holder's PID in its own PID namespace.
    pub pid: u32,
    /// `run` or `cleanup`.
    pub command: String,
    /// The cgroup the agent attaches its programs to, as it named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// That cgroup's id (its directory's inode number on cgroup2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// When it took the lock, in seconds since the Unix epoch.
    pub since: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Owner {
    /// This process, about to run an agent attached to `cgroup`.
    pub fn agent(cgroup: &Path) -> Self {
        Self {
            pid: std::process::id(),
            command: "run".into(),
            cgroup: Some(cgroup.to_path_buf()),
            cgroup_id: std::fs::metadata(cgroup).ok().map(|m| m.ino()),
            since: now(),
        }
    }

    /// This process, about to remove the pins.
    pub fn cleanup() -> Self {
        Self { pid: std::process::id(), command: "cleanup".into(), cgroup: None, cgroup_id: None, since: now() }
    }

    /// `` `redirector run` (pid 1234, attached to cgroup /sys/fs/cgroup, started 12 s ago) ``.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("pid {}", self.pid)];
        if let Some(cg) = &self.cgroup {
            parts.push(format!("attached to cgroup {}", cg.display()));
        }
        parts.push(format!("started {} s ago", now().saturating_sub(self.since)));
        format!("`redirector {}` ({})", self.command, parts.join(", "))
    }
}

/// The owner record of `pin_dir`, if there is a readable one.
pub fn read_owner(pin_dir: &Path) -> Option<Owner> {
    let target = std::fs::read_link(pin_dir.join(OWNER)).ok()?;
    serde_json::from_str(target.to_str()?).ok()
}

/// What the refused command wanted to do, for the remedy in
/// [`PinDirInUse`]'s message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    Run,
    Cleanup,
}

/// The pin directory's lock is held by another process.
#[derive(Debug)]
pub struct PinDirInUse {
    pub pin_dir: PathBuf,
    /// The holder's record (None if it has not written one yet).
    pub holder: Option<Owner>,
    pub wanted: Wanted,
}

impl std::fmt::Display for PinDirInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who =
            self.holder.as_ref().map_or_else(|| "another process (no owner record yet)".to_string(), Owner::describe);
        let dir = self.pin_dir.display();
        if self.holder.as_ref().is_some_and(|h| h.command == "cleanup") {
            return write!(f, "pin directory {dir} is being cleaned up by {who}; try again once it is done");
        }
        match self.wanted {
            Wanted::Run => write!(
                f,
                "pin directory {dir} is in use by another agent, {who}: two agents on one pin directory remove \
                 each other's workloads; stop that one first, or give this one its own --pin-dir"
            ),
            Wanted::Cleanup => write!(
                f,
                "pin directory {dir} is in use by the running agent, {who}: stop it first (the redirection stays \
                 in force after it exits), then run cleanup again; or pass --force to remove its pins while it \
                 runs (it then reports them gone and exits with an error)"
            ),
        }
    }
}

impl std::error::Error for PinDirInUse {}

/// The exclusive lock of a pin directory, released when dropped (or when
/// the process exits).
#[derive(Debug)]
pub struct PinLock {
    /// Held open for the lock: closing it releases the lock.
    _dir: File,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl PinLock {
    /// Takes the lock of the existing directory `pin_dir` without waiting
    /// and writes `owner` as its record; a [`PinDirInUse`] error if another
    /// process holds it.
    pub fn acquire(pin_dir: &Path, owner: &Owner, wanted: Wanted) -> Result<Self> {
        // The directory can be removed (and made again) between opening
        // and locking it: the lock counts only on the directory the path
        // still names once it is held.
        for _ in 0..10 {
            let dir = File::open(pin_dir).with_context(|| format!("opening pin directory {}", pin_dir.display()))?;
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(PinDirInUse { pin_dir: pin_dir.to_owned(), holder: read_owner(pin_dir), wanted }.into());
                }
                return Err(e).with_context(|| format!("locking pin directory {}", pin_dir.display()));
            }
            let held = dir.metadata()?;
            match std::fs::metadata(pin_dir) {
                Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                    let lock = Self { _dir: dir, path: pin_dir.to_owned(), dev: held.dev(), ino: held.ino() };
                    lock.write_owner(owner)?;
                    return Ok(lock);
                }
                // Removed meanwhile: lock whatever the path names now.
                _ => continue,
            }
        }
        bail!("pin directory {}: removed and created again while it was being locked", pin_dir.display())
    }

    /// Replaces the owner record (a symlink made beside it, then renamed
    /// over it: readers see the old record or the new one).
    fn write_owner(&self, owner: &Owner) -> Result<()> {
        let text = serde_json::to_string(owner)?;
        let next = self.path.join(format!("{OWNER}-next"));
        let _ = std::fs::remove_file(&next);
        std::os::unix::fs::symlink(&text, &next)
            .with_context(|| format!("writing the owner record {}", next.display()))?;
        std::fs::rename(&next, self.path.join(OWNER))
            .with_context(|| format!("writing the owner record {}", self.path.join(OWNER).display()))
    }

    /// Whether the pin directory's path still names the directory this
    /// lock holds: an error saying what happened if it was removed, or
    /// removed and created again (by another process, which may hold it).
    pub fn still_held(&self) -> Result<()> {
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (self.dev, self.ino) => Ok(()),
            Ok(_) => {
                let by = read_owner(&self.path).map(|o| format!(", now held by {}", o.describe())).unwrap_or_default();
                bail!("pin directory {} was removed and created again{by}", self.path.display())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("pin directory {} is gone", self.path.display())
            }
            Err(e) => Err(e).with_context(|| format!("reading pin directory {}", self.path.display())),
        }
    }

    /// The locked pin directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("redirector-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// flock(2) locks belong to the open file description: a second open
    /// of the same directory, even in this process, is refused while the
    /// first holds it (as another agent's would be).
    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_record() {
        let dir = tempdir("second");
        let first = Owner {
            pid: 4242,
            command: "run".into(),
            cgroup: Some("/sys/fs/cgroup/x".into()),
            cgroup_id: Some(9),
            since: now(),
        };
        let held = PinLock::acquire(&dir, &first, Wanted::Run).unwrap();
        assert_eq!(read_owner(&dir), Some(first.clone()));
        let e = PinLock::acquire(&dir, &Owner::agent(Path::new("/")), Wanted::Run).unwrap_err();
        let in_use = e.downcast_ref::<PinDirInUse>().expect("a PinDirInUse");
        assert_eq!(in_use.holder, Some(first));
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("pin directory {} is in use by another agent, `redirector run` (pid 4242, attached to cgroup /sys/fs/cgroup/x, started ", dir.display())), "{msg}");
        assert!(msg.ends_with("stop that one first, or give this one its own --pin-dir"), "{msg}");
        let e = PinLock::acquire(&dir, &Owner::cleanup(), Wanted::Cleanup).unwrap_err().to_string();
        assert!(e.contains("in use by the running agent") && e.contains("pass --force"), "{e}");
        drop(held);
        let again = PinLock::acquire(&dir, &Owner::cleanup(), Wanted::Run).unwrap();
        assert_eq!(read_owner(&dir).map(|o| o.command), Some("cleanup".to_string()));
        let e = PinLock::acquire(&dir, &Owner::agent(Path::new("/")), Wanted::Run).unwrap_err().to_string();
        assert!(e.contains("is being cleaned up by `redirector cleanup`"), "{e}");
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_removed_or_replaced_directory_is_noticed() {
        let dir = tempdir("replaced");
        let lock = PinLock::acquire(&dir, &Owner::agent(Path::new("/")), Wanted::Run).unwrap();
        lock.still_held().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(lock.still_held().unwrap_err().to_string(), format!("pin directory {} is gone", dir.display()));
        std::fs::create_dir_all(&dir).unwrap();
        let other = PinLock::acquire(&dir, &Owner::cleanup(), Wanted::Cleanup).unwrap();
        let e = lock.still_held().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "pin directory {} was removed and created again, now held by `redirector cleanup` (pid ",
                dir.display()
            )),
            "{e}"
        );
        drop(other);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
