//! The pin directory: where links and maps are pinned, what is pinned
//! (capacities, readiness) and removing it all.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use redirector_common::{
    counter, map_names, MAX_ACCEL_SOCKETS, MAX_CIDR_RULES, MAX_LISTENERS, MAX_PORT_RULES, MAX_TRACKED_CONNECTIONS,
    MAX_WORKLOADS,
};

use super::{
    lock::{Owner, PinDirInUse, PinLock, Wanted, OWNER},
    object::PROGRAMS,
    Maps,
};
use crate::{
    error::PinnedLayout,
    sys::{
        bpf::{self, AttachType},
        mounts::{self, PinUse},
    },
};

/// Pin of the `sk_lookup` link of the workload with netns `cookie`.
pub fn netns_link_pin_path(pin_dir: &Path, cookie: u64) -> PathBuf {
    pin_dir.join("netns").join(cookie.to_string())
}

pub fn link_pin_path(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join("links").join(prog)
}

/// Refuses pinned maps whose capacity is not this build's.
pub(super) fn check_pinned_capacities(pin_dir: &Path) -> Result<()> {
    let expected = CAPACITIES.iter().copied().chain([(map_names::META, 1), (map_names::COUNTERS, counter::COUNT)]);
    for (name, capacity) in expected {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?
            .max_entries();
        if pinned != capacity {
            return Err(PinnedLayout::Capacity { path, map: name, pinned, expected: capacity }.into());
        }
    }
    Ok(())
}

/// Detaches and unpins everything under `pin_dir`, returning what it
/// removed (nothing if it does not exist). Refused, with a
/// [`PinDirInUse`] naming the agent, while an agent holds the pin
/// directory: the agent would go on as if its workloads were programmed.
pub fn cleanup(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    cleanup_as(pin_dir, false)
}

/// [`cleanup`] even while an agent holds the pin directory (`cleanup
/// --force`): that agent then finds its pins gone and exits with an error.
pub fn cleanup_force(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    cleanup_as(pin_dir, true)
}

fn cleanup_as(pin_dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
    if !pin_dir.exists() {
        return Ok(Vec::new());
    }
    // Held while removing, so no agent starts on a half-removed directory.
    let _lock = match PinLock::acquire(pin_dir, &Owner::cleanup(), Wanted::Cleanup) {
        Ok(lock) => Some(lock),
        Err(e) if force && e.downcast_ref::<PinDirInUse>().is_some() => {
            let holder = e.downcast_ref::<PinDirInUse>().and_then(|u| u.holder.as_ref());
            log::warn!(
                "pin directory {} is in use by {}: removing its pins anyway (--force); that agent will report them \
                 gone and exit with an error",
                pin_dir.display(),
                holder.map_or_else(|| "another process".to_string(), Owner::describe)
            );
            None
        }
        Err(e) => return Err(e),
    };
    remove_pins(pin_dir)
}

/// Detaches and unpins everything under `pin_dir` (the caller holds its
/// lock, or was told to go ahead without it).
pub(super) fn remove_pins(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    // Nothing is removed from a directory holding something unexpected.
    // (The owner record is a symlink whose target is not a path: its own
    // type counts, not what it would point to.)
    for e in std::fs::read_dir(pin_dir)? {
        let e = e?;
        let retired = super::migrate::retired_sets(pin_dir).iter().any(|(_, d)| *d == e.path());
        if e.file_type()?.is_dir() && !retired && !["links", "netns"].iter().any(|s| e.file_name() == *s) {
            bail!("unexpected directory {} in the pin directory; not removing it", e.path().display());
        }
    }
    let mut removed = Vec::new();
    detach_sk_msg(pin_dir)?;
    for sub in ["links", "netns"] {
        let links = pin_dir.join(sub);
        if links.exists() {
            for e in std::fs::read_dir(&links)? {
                let p = e?.path();
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                removed.push(p);
            }
            std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
        }
    }
    for e in std::fs::read_dir(pin_dir)? {
        let p = e?.path();
        // The owner record goes last: until then it names who is removing.
        if p.file_name().is_some_and(|n| n == OWNER) {
            continue;
        }
        if p.is_dir() && super::migrate::retired_sets(pin_dir).iter().any(|(_, d)| *d == p) {
            // An older layout still draining after an upgrade.
            removed.extend(remove_pins(&p)?);
            continue;
        }
        if p.is_dir() {
            bail!("unexpected directory {} in the pin directory; not removing it", p.display());
        }
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        removed.push(p);
    }
    let owner = pin_dir.join(OWNER);
    if owner.symlink_metadata().is_ok() {
        std::fs::remove_file(&owner).with_context(|| format!("removing {}", owner.display()))?;
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(removed)
}

/// Whether every program's link is pinned (i.e. attached).
pub fn links_pinned(pin_dir: &Path) -> Vec<(&'static str, bool)> {
    PROGRAMS.iter().map(|(name, _)| (*name, bpf::obj_get(&link_pin_path(pin_dir, name)).is_ok())).collect()
}

pub const CAPACITIES: [(&str, u32); 7] = [
    (map_names::WORKLOADS, MAX_WORKLOADS),
    (map_names::NAMES, MAX_WORKLOADS),
    (map_names::PORTS, MAX_PORT_RULES),
    (map_names::CIDRS, MAX_CIDR_RULES),
    (map_names::ORIG_BY_TUPLE, MAX_TRACKED_CONNECTIONS),
    (map_names::LISTENERS, MAX_LISTENERS),
    (map_names::ACCEL_SOCKETS, MAX_ACCEL_SOCKETS),
];

/// The init-container gate of the standalone agent (`redirector wait-ready`):
/// waits until the workload in namespace `ns` (default: this process's) is
/// programmed, its programs attached and, if it has inbound redirection, its
/// sk_lookup link pinned, then, with `check_caller`, checks that this
/// process is inside the cgroup the programs are attached to (what it
/// starts next inherits its cgroup, and only processes in that cgroup's
/// subtree are redirected); returns the line to print. Fails closed on
/// timeout, naming what is missing, and at once when the pins cannot be
/// seen from here (no bpffs) or this process is outside the attach cgroup:
/// neither clears by waiting.
pub fn wait_ready(ns: Option<&Path>, pin_dir: &Path, timeout: Duration, check_caller: bool) -> Result<String> {
    mounts::require_bpffs(pin_dir, PinUse::Existing)?;
    let (cookie, shown) = match &ns {
        Some(p) => (crate::sys::netns::netns_cookie(p)?, p.display().to_string()),
        None => (crate::sys::netns::current_netns_cookie()?, "this process's network namespace".to_string()),
    };
    let deadline = Instant::now() + timeout;
    // Whether the caller was found inside the attach cgroup: checked as
    // soon as the programs are attached (the attach cgroup is read from
    // the pinned link), without waiting for the workload to be programmed.
    let mut caller_checked = !check_caller;
    loop {
        let missing: Vec<&str> = links_pinned(pin_dir).into_iter().filter(|(_, ok)| !ok).map(|(n, _)| n).collect();
        if !caller_checked && missing.is_empty() {
            super::cgroup::check_caller_inside(pin_dir)?;
            caller_checked = true;
        }
        let last_err: String = match Maps::open(pin_dir).and_then(|m| m.workload(cookie)) {
            Ok(Some(w)) => {
                // Inbound capture is part of "programmed": without it a
                // connection could reach the application around the proxy.
                let inbound_missing = w.flags & redirector_common::flags::IN_ENABLED != 0
                    && !netns_link_pin_path(pin_dir, cookie).exists();
                if missing.is_empty() && !inbound_missing {
                    return Ok(format!(
                        "ready: {shown} (netns cookie {cookie}) is programmed with policy #{}",
                        w.policy_id
                    ));
                }
                if missing.is_empty() {
                    "inbound capture (sk_lookup) not attached to the namespace yet".to_string()
                } else {
                    format!("programs not attached: {}", missing.join(", "))
                }
            }
            Ok(None) => "the agent has no policy for this namespace yet".into(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{shown} (netns cookie {cookie}) not programmed after {timeout:?}: {last_err}; \
                 is the agent running with --pin-dir {} and is this workload in its config?",
                pin_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Detaches the `sk_msg` program from the pinned `ACCEL_SOCKETS` map (the
/// map's removal would detach it too, but only once no process holds the
/// map open). Kernels before 5.19 cannot list a map's programs: then the
/// removal of the pin does it.
pub(super) fn detach_sk_msg(pin_dir: &Path) -> Result<usize> {
    let path = pin_dir.join(map_names::ACCEL_SOCKETS);
    let Ok(map) = bpf::obj_get(&path) else { return Ok(0) };
    let Ok(ids) = bpf::attached_ids(map.as_fd(), AttachType::SkMsgVerdict) else { return Ok(0) };
    let mut n = 0;
    for id in ids {
        if let Ok(prog) = bpf::prog_by_id(id) {
            bpf::map_prog_detach(prog.as_fd(), map.as_fd(), AttachType::SkMsgVerdict)
                .with_context(|| format!("detaching program {id} from {}", path.display()))?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of this test's own under the temporary directory,
    /// removed on drop (plain files: no bpffs, no kernel objects).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("redirector-pins-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn cgroup_links_are_pinned_under_links_by_program_name() {
        let pin = Path::new("/sys/fs/bpf/redirector");
        assert_eq!(link_pin_path(pin, "rdr_connect4"), Path::new("/sys/fs/bpf/redirector/links/rdr_connect4"));
    }

    #[test]
    fn sk_lookup_links_are_pinned_under_netns_by_decimal_cookie() {
        let pin = Path::new("/sys/fs/bpf/redirector");
        assert_eq!(netns_link_pin_path(pin, 4097), Path::new("/sys/fs/bpf/redirector/netns/4097"));
        assert_eq!(netns_link_pin_path(pin, u64::MAX), Path::new("/sys/fs/bpf/redirector/netns/18446744073709551615"));
    }

    #[test]
    fn every_program_has_its_own_link_pin() {
        let pin = Path::new("/p");
        let pins: std::collections::BTreeSet<PathBuf> = PROGRAMS.iter().map(|(n, _)| link_pin_path(pin, n)).collect();
        assert_eq!(pins.len(), PROGRAMS.len());
        // bpffs rejects names with dots, and the attach uses `<name>-next`.
        assert!(PROGRAMS.iter().all(|(n, _)| !n.contains('.') && !n.contains('/')), "{PROGRAMS:?}");
    }

    #[test]
    fn capacities_are_this_builds_constants() {
        assert_eq!(
            CAPACITIES,
            [
                ("RDR_WORKLOADS", MAX_WORKLOADS),
                ("RDR_NAMES", MAX_WORKLOADS),
                ("RDR_PORTS", MAX_PORT_RULES),
                ("RDR_CIDRS", MAX_CIDR_RULES),
                ("RDR_ORIG_TUPLE", MAX_TRACKED_CONNECTIONS),
                ("RDR_LISTENERS", MAX_LISTENERS),
                ("RDR_ACCEL_SOCKS", MAX_ACCEL_SOCKETS),
            ]
        );
    }

    #[test]
    fn cleanup_of_a_missing_pin_dir_removes_nothing() {
        let dir = TempDir::new("missing");
        assert_eq!(cleanup(&dir.0.join("absent")).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn cleanup_removes_link_pins_then_maps_then_the_directory() {
        let dir = TempDir::new("layout");
        let pin = dir.0.join("pin");
        std::fs::create_dir_all(pin.join("links")).unwrap();
        std::fs::create_dir_all(pin.join("netns")).unwrap();
        for p in [link_pin_path(&pin, "rdr_sockops"), netns_link_pin_path(&pin, 7), pin.join("RDR_META")] {
            std::fs::write(&p, b"").unwrap();
        }
        let removed = cleanup(&pin).unwrap();
        assert_eq!(removed, [pin.join("links/rdr_sockops"), pin.join("netns/7"), pin.join("RDR_META")]);
        assert!(!pin.exists());
    }

    #[test]
    fn cleanup_refuses_an_unexpected_directory() {
        let dir = TempDir::new("unexpected");
        let pin = dir.0.join("pin");
        std::fs::create_dir_all(pin.join("other")).unwrap();
        let err = cleanup(&pin).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("unexpected directory {} in the pin directory; not removing it", pin.join("other").display())
        );
        assert!(pin.join("other").exists());
    }
}
