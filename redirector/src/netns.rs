//! Network namespaces: the cookie that identifies a workload in the maps,
//! and running a closure inside a namespace (on a dedicated thread, so the
//! rest of the process stays where it is).
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};

const SO_NETNS_COOKIE: libc::c_int = 71;

/// Runs `f` on a new thread that has joined the network namespace at
/// `path`. Sockets `f` creates belong to that namespace.
pub fn run_in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    let shown = path.display().to_string();
    std::thread::spawn(move || {
        enter_netns(&file).with_context(|| format!("entering network namespace {shown}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("thread inside network namespace panicked"))?
}

/// Moves the calling thread into the namespace behind `file`.
pub fn enter_netns(file: &File) -> Result<()> {
    // SAFETY: plain syscall on a valid fd.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// The cookie of the calling thread's current network namespace.
pub fn current_netns_cookie() -> Result<u64> {
    // SAFETY: plain syscalls; the fd is closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket()");
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err).context("getsockopt(SO_NETNS_COOKIE) (needs Linux 5.14 or later)");
        }
        Ok(cookie)
    }
}

/// The cookie of the network namespace at `path` (`/run/netns/NAME` or
/// `/proc/PID/ns/net`).
pub fn netns_cookie(path: &Path) -> Result<u64> {
    run_in_netns(path, current_netns_cookie)
}

/// Named namespaces under /run/netns (for `inspect` to put names on cookies).
pub fn named_namespaces() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// The addresses configured on the interfaces of the network namespace at
/// `path` (what "routed through lo" means for that workload).
pub fn local_addresses(path: &Path) -> Result<Vec<std::net::IpAddr>> {
    run_in_netns(path, || {
        let mut out = Vec::new();
        let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills a list we free below; its netlink socket
        // is created on this thread, inside the namespace.
        if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
            return Err(std::io::Error::last_os_error()).context("getifaddrs");
        }
        let mut cur = ifap;
        while !cur.is_null() {
            // SAFETY: cur points into the list getifaddrs returned.
            let ifa = unsafe { &*cur };
            if !ifa.ifa_addr.is_null() {
                // SAFETY: ifa_addr is a sockaddr of the family it says.
                let fam = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
                if fam == libc::AF_INET {
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(std::net::IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                } else if fam == libc::AF_INET6 {
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
                }
            }
            cur = ifa.ifa_next;
        }
        // SAFETY: list from getifaddrs.
        unsafe { libc::freeifaddrs(ifap) };
        out.sort();
        out.dedup();
        Ok(out)
    })
}
