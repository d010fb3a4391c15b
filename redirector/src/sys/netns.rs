//! Network namespaces: the cookie that identifies a workload in the maps,
//! and running a closure inside a namespace (on a dedicated thread, so the
//! rest of the process stays where it is).
use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};

const SO_NETNS_COOKIE: libc::c_int = 71;

/// Runs `f` on a new thread that has joined the network namespace at
/// `path`. Sockets `f` creates belong to that namespace.
pub fn run_in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let file = File::open(path).with_context(|| format!("opening network namespace {}", path.display()))?;
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
    // SAFETY: plain syscall; the fd is owned (and closed) at once.
    let sock = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket()");
        }
        OwnedFd::from_raw_fd(fd)
    };
    socket_netns_cookie(&sock)
}

/// The cookie of the network namespace a socket belongs to.
pub fn socket_netns_cookie(sock: &OwnedFd) -> Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 we own, on a socket we own.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE) (needs Linux 5.14 or later)");
    }
    Ok(cookie)
}

/// The cookie of the network namespace at `path` (`/run/netns/NAME` or
/// `/proc/PID/ns/net`).
pub fn netns_cookie(path: &Path) -> Result<u64> {
    run_in_netns(path, current_netns_cookie)
}

/// Named namespaces under /run/netns (for `inspect` to put names on cookies).
pub fn named_namespaces() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        std::fs::read_dir("/run/netns").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    out.sort();
    out
}

/// The addresses configured on the interfaces of the calling thread's
/// namespace (what "routed through lo" means for a workload there).
pub(crate) fn addresses_here() -> Result<Vec<std::net::IpAddr>> {
    {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One thread visits every namespace; each answer is for its own path,
    /// an unusable path is an error naming it and does not stop the rest.
    #[test]
    fn survey_answers_each_namespace_in_order() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP survey_answers_each_namespace_in_order: setns needs root");
            return;
        }
        let own = PathBuf::from("/proc/self/ns/net");
        for room in [0, 8] {
            let mut cache = crate::sys::nscache::NsCache::with_room(room);
            let facts =
                cache.survey(&[(own.clone(), true), (PathBuf::from("/nonexistent/ns"), true), (own.clone(), false)]);
            assert_eq!(facts.len(), 3);
            let cookie = current_netns_cookie().unwrap();
            let first = facts[0].as_ref().unwrap();
            assert_eq!(first.cookie, cookie);
            assert!(first.addresses.as_ref().unwrap().contains(&std::net::IpAddr::from([127, 0, 0, 1])));
            let e = format!("{:#}", facts[1].as_ref().unwrap_err());
            assert!(e.contains("/nonexistent/ns"), "{e}");
            let third = facts[2].as_ref().unwrap();
            assert_eq!((third.cookie, third.addresses.is_none()), (cookie, true));
            assert!(cache.survey(&[]).is_empty());
        }
    }
}
