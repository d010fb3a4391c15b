//! User namespaces: which one a process or a network namespace belongs
//! to, and a process's ID maps (parsed by `redirector_policy::idmap`).
//! The data path sees the IDs of the initial user namespace; a workload
//! in another one has its proxy's UID and GID translated through these
//! maps.
use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use redirector_policy::{IdMap, IdMaps};

/// `NS_GET_USERNS` (linux/nsfs.h, `_IO(0xb7, 0x1)`, Linux 4.9): a file
/// descriptor of the user namespace that owns a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

use super::nscache::NsId;

pub(crate) fn ns_id(path: &Path) -> Result<NsId> {
    let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((m.dev(), m.ino()))
}

/// The agent's own user namespace, read once: the agent never changes it
/// (it enters network namespaces only), and the standalone agent asks for
/// it once per `pid:` workload on every pass.
fn own() -> Result<NsId> {
    static OWN: std::sync::OnceLock<NsId> = std::sync::OnceLock::new();
    if let Some(id) = OWN.get() {
        return Ok(*id);
    }
    let id = ns_id(Path::new("/proc/self/ns/user"))?;
    Ok(*OWN.get_or_init(|| id))
}

/// The ID maps of process `pid`'s user namespace (under `proc_root`), or
/// None if that is the agent's own (its IDs are the ones the data path
/// sees).
pub fn id_maps_of_pid(proc_root: &Path, pid: u32) -> Result<Option<IdMaps>> {
    id_maps_of_pid_with_ns(proc_root, pid).map(|(_, maps)| maps)
}

/// [`id_maps_of_pid`], with the identity of the user namespace they are
/// of.
pub fn id_maps_of_pid_with_ns(proc_root: &Path, pid: u32) -> Result<(NsId, Option<IdMaps>)> {
    let dir = proc_root.join(pid.to_string());
    let userns = ns_id(&dir.join("ns/user"))?;
    if userns == own()? {
        return Ok((userns, None));
    }
    require_initial_user_ns()?;
    let read = |name: &str| -> Result<IdMap> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        IdMap::parse(&text).with_context(|| format!("{}", path.display()))
    };
    Ok((userns, Some(IdMaps { uid: read("uid_map")?, gid: read("gid_map")? })))
}

/// Fails unless `owner`, the user namespace a survey found owning the
/// network namespace at `path` (`Err`: why it could not be asked), is the
/// agent's own: the proxy's IDs in a namespace of another one cannot be
/// translated without a process of it.
pub fn require_owner_is_own(path: &Path, owner: &Result<NsId, String>) -> Result<()> {
    let owner = owner.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    if *owner != own()? {
        bail!(
            "network namespace {} belongs to a user namespace other than the agent's (inode {}): the proxy's UID \
             there is not the one the kernel reports; give `pid:` of a process of the workload instead, whose \
             uid_map and gid_map translate proxyUID and proxyGID",
            path.display(),
            owner.1
        );
    }
    Ok(())
}

/// The user namespace that owns the namespace behind `ns`
/// (`NS_GET_USERNS`).
pub fn owner_of(ns: &File) -> Result<NsId> {
    // SAFETY: an ioctl on a valid fd; it returns a new fd or -1.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS as _) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("NS_GET_USERNS");
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let owner = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let m = owner.metadata().context("reading the owning user namespace")?;
    Ok((m.dev(), m.ino()))
}

/// The agent must be in the initial user namespace for outside IDs it
/// reads to be those the data path sees.
fn require_initial_user_ns() -> Result<()> {
    let text = std::fs::read_to_string("/proc/self/uid_map").context("reading /proc/self/uid_map")?;
    let map = IdMap::parse(&text).context("/proc/self/uid_map")?;
    if !map.is_identity() {
        bail!(
            "the agent runs in a user namespace of its own (/proc/self/uid_map: {map}): it cannot translate a \
             workload's IDs to those the kernel reports"
        );
    }
    Ok(())
}

/// A `sleep 30` in a user and network namespace of its own, its ID maps
/// written by this process as a runtime does: UID 0-65535 inside are
/// 524288-589823 outside, GID 0-65535 are 589824-655359. Needs root.
#[cfg(test)]
pub(crate) fn child_in_own_user_ns() -> std::process::Child {
    use std::os::unix::process::CommandExt as _;
    let mut c = std::process::Command::new("sleep");
    c.arg("30");
    // SAFETY: unshare is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c.spawn().unwrap();
    let dir = Path::new("/proc").join(child.id().to_string());
    std::fs::write(dir.join("uid_map"), "0 524288 65536\n").unwrap();
    std::fs::write(dir.join("gid_map"), "0 589824 65536\n").unwrap();
    child
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check a survey makes of a `netns:` workload's namespace.
    fn require_netns_in_own_user_ns(path: &Path) -> Result<()> {
        let ns = File::open(path).unwrap();
        require_owner_is_own(path, &owner_of(&ns).map_err(|e| format!("{e:#}")))
    }

    /// This process's own namespaces: no maps, and its network namespace
    /// belongs to its user namespace. A user namespace of its own is read
    /// with its maps (a child made with unshare(CLONE_NEWUSER), its maps
    /// written by this process as a runtime does).
    #[test]
    fn own_and_child_user_namespaces() {
        assert_eq!(id_maps_of_pid(Path::new("/proc"), std::process::id()).unwrap(), None);
        require_netns_in_own_user_ns(Path::new("/proc/self/ns/net")).unwrap();
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP own_and_child_user_namespaces (child part): writing another process's uid_map needs root");
            return;
        }
        let mut child = child_in_own_user_ns();
        let dir = Path::new("/proc").join(child.id().to_string());
        let maps = id_maps_of_pid(Path::new("/proc"), child.id()).unwrap().unwrap();
        assert_eq!((maps.uid.to_outside(1337), maps.gid.to_outside(1337)), (Some(525625), Some(591161)));
        let e = require_netns_in_own_user_ns(&dir.join("ns/net")).unwrap_err().to_string();
        assert!(e.contains("belongs to a user namespace other than the agent's") && e.contains("`pid:`"), "{e}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
