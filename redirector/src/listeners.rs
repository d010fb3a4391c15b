//! Finding a proxy's inbound listening socket that existed before the agent
//! programmed its workload (sockops only sees `listen()` calls made while
//! it is attached): scan the processes of the workload's network namespace
//! for a TCP socket in LISTEN state on the inbound port and take a copy of
//! it with `pidfd_getfd(2)` so it can be put into the `LISTENERS` map.
use std::{
    collections::BTreeMap,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result};
use redirector_common::{AF_INET, AF_INET6};

/// Socket inodes listening on `port` in a `/proc/PID/net/tcp{,6}` text.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local = f.get(1)?;
            let (_, p) = local.rsplit_once(':')?;
            let st = f.get(3)?;
            (u16::from_str_radix(p, 16).ok()? == port && *st == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

fn pidfd_getfd(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; returned fds are owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0);
        if got < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(got as i32))
    }
}

/// Listening sockets on `port` held by processes in the network namespace
/// at `netns`, one per family (AF_INET6 covers a dual-stack `[::]`).
pub fn find_listeners(netns: &Path, port: u16) -> Result<Vec<(u16, OwnedFd)>> {
    let target = std::fs::metadata(netns)
        .with_context(|| format!("network namespace {}", netns.display()))?;
    let mut found: BTreeMap<u16, OwnedFd> = BTreeMap::new();
    let procs = std::fs::read_dir("/proc").context("reading /proc")?;
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // A thread can sit in another namespace than its process leader
        // (setns), so look at every task.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        let mut inodes: BTreeMap<u64, u16> = BTreeMap::new();
        for task in tasks.flatten() {
            let t = task.path();
            let Ok(ns) = std::fs::metadata(t.join("ns/net")) else { continue };
            if ns.dev() != target.dev() || ns.ino() != target.ino() {
                continue;
            }
            for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
                if let Ok(table) = std::fs::read_to_string(t.join("net").join(file)) {
                    for ino in listening_inodes(&table, port) {
                        inodes.insert(ino, family);
                    }
                }
            }
            break;
        }
        if inodes.is_empty() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else { continue };
            let link = link.to_string_lossy();
            let Some(ino) = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) else { continue };
            let Some(family) = ino.parse::<u64>().ok().and_then(|i| inodes.get(&i)) else { continue };
            if found.contains_key(family) {
                continue;
            }
            let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if let Ok(owned) = pidfd_getfd(pid, n) {
                found.insert(*family, owned);
            }
        }
    }
    Ok(found.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_inodes() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:3A9B 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1500        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1500        0 4343 1 0 100 0 0 10 0\n\
   2: 0100007F:3A9B 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1500        0 4444 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(t, 15003), vec![4242]);
        assert_eq!(listening_inodes(t, 15001), vec![4343]);
        assert!(listening_inodes(t, 80).is_empty());
    }
}
