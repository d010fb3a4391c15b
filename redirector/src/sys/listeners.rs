//! Finding a proxy's inbound listening socket that existed before the agent
//! programmed its workload (sockops only sees `listen()` calls made while
//! it is attached): scan the processes of the workload's network namespace
//! for a TCP socket in LISTEN state on the inbound port and take a copy of
//! it with `pidfd_getfd(2)` so it can be put into the `LISTENERS` map.
use std::{
    collections::{BTreeMap, HashMap},
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

/// A proxy's listening sockets, each with its family.
pub type Listeners = Vec<(u16, OwnedFd)>;

/// For each `(netns, port)`: the listening sockets on `port` held by
/// processes in the network namespace at `netns`, one per family (AF_INET6
/// covers a dual-stack `[::]`). One walk of `/proc` for all of them, each
/// namespace's socket tables read once; an unreadable `/proc` fails the
/// whole call, a namespace that cannot be opened only its own entry.
pub fn find_listeners(wanted: &[(&Path, u16)]) -> Result<Vec<Result<Listeners>>> {
    type NsKey = (u64, u64);
    let mut found: Vec<Result<BTreeMap<u16, OwnedFd>>> = Vec::with_capacity(wanted.len());
    // Which entries of `wanted` each namespace serves.
    let mut targets: HashMap<NsKey, Vec<usize>> = HashMap::new();
    for (i, (netns, _)) in wanted.iter().enumerate() {
        match std::fs::metadata(netns) {
            Ok(m) => {
                targets.entry((m.dev(), m.ino())).or_default().push(i);
                found.push(Ok(BTreeMap::new()));
            }
            Err(e) => found.push(Err(e).with_context(|| format!("network namespace {}", netns.display()))),
        }
    }
    if !targets.is_empty() {
        // Listening socket inode → (family, port), per namespace, read
        // from the first task found in it.
        let mut tables: HashMap<NsKey, BTreeMap<u64, (u16, u16)>> = HashMap::new();
        let procs = std::fs::read_dir("/proc").context("reading /proc")?;
        for entry in procs.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            // A thread can sit in another namespace than its process
            // leader (setns, unshare), so look at every task.
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
            // Socket inode → (family, port, namespace) of this process.
            let mut inodes: BTreeMap<u64, (u16, u16, NsKey)> = BTreeMap::new();
            for task in tasks.flatten() {
                let t = task.path();
                let Ok(ns) = std::fs::metadata(t.join("ns/net")) else { continue };
                let key = (ns.dev(), ns.ino());
                let Some(served) = targets.get(&key) else { continue };
                let table = tables.entry(key).or_insert_with(|| {
                    let mut listening = BTreeMap::new();
                    for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
                        if let Ok(text) = std::fs::read_to_string(t.join("net").join(file)) {
                            for &i in served {
                                let port = wanted[i].1;
                                for ino in listening_inodes(&text, port) {
                                    listening.insert(ino, (family, port));
                                }
                            }
                        }
                    }
                    listening
                });
                for (ino, (family, port)) in table.iter() {
                    inodes.insert(*ino, (*family, *port, key));
                }
            }
            if inodes.is_empty() {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
            for fd in fds.flatten() {
                let Ok(link) = std::fs::read_link(fd.path()) else { continue };
                let link = link.to_string_lossy();
                let Some(ino) = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) else { continue };
                let Some(&(family, port, key)) = ino.parse::<u64>().ok().and_then(|i| inodes.get(&i)) else { continue };
                let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
                for &i in &targets[&key] {
                    let Ok(map) = &mut found[i] else { continue };
                    if wanted[i].1 != port || map.contains_key(&family) {
                        continue;
                    }
                    if let Ok(owned) = pidfd_getfd(pid, n) {
                        map.insert(family, owned);
                    }
                }
            }
        }
    }
    Ok(found.into_iter().map(|r| r.map(|m| m.into_iter().collect())).collect())
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

    /// A thread of this process alone in a new network namespace, holding
    /// listening sockets on `addrs`, until the returned sender is dropped.
    fn namespace_listening_on(addrs: &[&'static str]) -> (std::path::PathBuf, std::sync::mpsc::Sender<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let addrs = addrs.to_vec();
        std::thread::spawn(move || {
            // SAFETY: moves only this thread into a new network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
            // `ip` forked here runs in this thread's namespace.
            assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
            let held: Vec<std::net::TcpListener> =
                addrs.iter().map(|a| std::net::TcpListener::bind(a).expect("bind")).collect();
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = wait.recv();
            drop(held);
        });
        let tid = rx.recv().unwrap();
        (std::path::PathBuf::from(format!("/proc/self/task/{tid}/ns/net")), release)
    }

    /// One walk answers every namespace: each gets its own listeners (by
    /// family and port), one without listeners gets none, and a namespace
    /// that cannot be opened is an error of its own entry only.
    #[test]
    fn finds_the_listeners_of_many_namespaces_in_one_walk() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP finds_the_listeners_of_many_namespaces_in_one_walk: unshare needs root");
            return;
        }
        let (a, _a) = namespace_listening_on(&["127.0.0.1:15003", "[::1]:15003", "127.0.0.1:15001"]);
        let (b, _b) = namespace_listening_on(&["127.0.0.1:15003"]);
        let (c, _c) = namespace_listening_on(&[]);
        let missing = Path::new("/nonexistent/ns/net");
        let wanted = [
            (a.as_path(), 15003),
            (b.as_path(), 15003),
            (c.as_path(), 15003),
            (missing, 15003),
            (a.as_path(), 15001),
            (b.as_path(), 15001),
        ];
        let found = find_listeners(&wanted).unwrap();
        let families = |i: usize| -> Vec<u16> { found[i].as_ref().unwrap().iter().map(|(f, _)| *f).collect() };
        assert_eq!(families(0), vec![AF_INET, AF_INET6]);
        assert_eq!(families(1), vec![AF_INET]);
        assert!(families(2).is_empty());
        let e = format!("{:#}", found[3].as_ref().unwrap_err());
        assert!(e.contains("/nonexistent/ns/net"), "{e}");
        assert_eq!(families(4), vec![AF_INET]);
        assert!(families(5).is_empty());
        // The copies are the listeners themselves: bound to the port asked.
        for (i, port) in [(0, 15003), (1, 15003), (4, 15001)] {
            for (_, fd) in found[i].as_ref().unwrap() {
                let l = std::net::TcpListener::from(fd.try_clone().unwrap());
                assert_eq!(l.local_addr().unwrap().port(), port);
            }
        }
        assert!(find_listeners(&[]).unwrap().is_empty());
    }
}
