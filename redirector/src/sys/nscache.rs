//! The network namespaces an agent keeps hold of between passes, so that a
//! pass does not enter every workload's namespace again to learn what it
//! already knows.
//!
//! For each namespace it has entered, the cache keeps one `NETLINK_ROUTE`
//! socket created inside it. The socket does three things:
//! - it keeps the namespace alive, so its nsfs inode cannot be given to a
//!   new namespace while the entry exists (the kernel hands out the lowest
//!   free inode number, so an inode alone is not an identity once its
//!   namespace may have gone);
//! - it answers the namespace's cookie (`SO_NETNS_COOKIE`);
//! - where the workload's own addresses matter, it is subscribed to the
//!   namespace's address changes (`RTMGRP_IPV4_IFADDR`, `RTMGRP_IPV6_IFADDR`),
//!   so a new or removed address, or a queue that overflowed, makes the
//!   next pass read them again.
//!
//! A pass then costs one `stat` of the workload's path per namespace it
//! already holds: the same device and inode as the namespace held is the
//! same namespace, because the held one cannot have been freed. A
//! namespace whose path is gone or names another one is let go at once
//! ([`NsCache::release_gone`], on each of the agent's ticks), so a deleted
//! namespace is not kept alive (with its interfaces) beyond a tick.
//!
//! Each held namespace costs a file descriptor: the cache holds at most
//! [`NsCache::room`] of them (from `RLIMIT_NOFILE`, which the agent raises
//! to its hard limit at start) and surveys the rest afresh on every pass,
//! as before, which [`NsCache::overflow`] reports.
use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    fs::File,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// A namespace's identity while it is held: the device and inode of its
/// nsfs file.
pub type NsId = (u64, u64);

/// `linux/rtnetlink.h`: the multicast groups of address changes.
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// File descriptors left for everything else the agent opens (its maps,
/// links, the /proc walks, its listening and watch sockets).
const FDS_KEPT_FREE: u64 = 1024;

/// What a survey learns of one namespace.
#[derive(Debug, Clone)]
pub struct NetnsFacts {
    /// Its nsfs device and inode (an identity only while it is held).
    pub id: NsId,
    pub cookie: u64,
    /// Its interfaces' addresses, when they were asked for.
    pub addresses: Option<Vec<IpAddr>>,
    /// The user namespace that owns it, or why that could not be asked.
    pub owner: Result<NsId, String>,
}

struct Held {
    sock: OwnedFd,
    /// What was read when it was entered; `facts.id` is its identity.
    facts: NetnsFacts,
}

impl Held {
    /// Whether an address of the namespace may have changed since its
    /// addresses were read: a notification is queued, or the queue
    /// overflowed (`ENOBUFS`), or the socket failed.
    fn addresses_changed(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut changed = false;
        loop {
            // SAFETY: recv into a buffer we own, on a socket we own.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n > 0 {
                changed = true;
                continue;
            }
            if n == 0 {
                return true;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return changed,
                Some(libc::EINTR) => continue,
                _ => return true,
            }
        }
    }
}

/// See the module's documentation.
pub struct NsCache {
    held: BTreeMap<OsString, Held>,
    room: usize,
    overflow: usize,
    /// Where the next [`NsCache::release_gone`] starts (None: the first
    /// path).
    release_from: Option<OsString>,
    /// The ID maps of a `pid:` workload's user namespace (None: the
    /// agent's own), by pid and the held namespace it was read with: kept
    /// only where that user namespace is the agent's or the one owning
    /// the held network namespace, which the held namespace keeps alive
    /// (a user namespace's maps are written once and never change).
    id_maps: HashMap<(u32, NsId), Option<redirector_policy::IdMaps>>,
}

/// How many held namespaces one [`NsCache::release_gone`] checks.
pub const RELEASE_CHECKS_PER_CALL: usize = 1024;

impl Default for NsCache {
    fn default() -> Self {
        Self::with_room(room_from_rlimit())
    }
}

/// How many namespaces the soft `RLIMIT_NOFILE` leaves room for.
fn room_from_rlimit() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    let soft = lim.rlim_cur;
    let room = if soft > 2 * FDS_KEPT_FREE { soft - FDS_KEPT_FREE } else { soft / 2 };
    usize::try_from(room).unwrap_or(usize::MAX)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (as the Go runtime
/// does for every program): each held namespace is a file descriptor, and
/// the usual soft limit of 1,024 would leave room for few. Returns the
/// soft limit in force.
pub fn raise_nofile_limit() -> Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setrlimit(RLIMIT_NOFILE) to its hard limit {}", lim.rlim_max));
            }
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

fn stat_id(path: &Path) -> Option<NsId> {
    super::userns::ns_id(path).ok()
}

impl NsCache {
    /// A cache that holds at most `room` namespaces (0: none, every pass
    /// surveys every namespace afresh).
    pub fn with_room(room: usize) -> Self {
        Self { held: BTreeMap::new(), room, overflow: 0, release_from: None, id_maps: HashMap::new() }
    }

    /// The ID maps of process `pid`'s user namespace, its network
    /// namespace being `netns` (held under `path`): from the cache, or read (under
    /// `proc_root`) and kept when they can be (see `id_maps`).
    pub fn id_maps_of_pid(
        &mut self,
        proc_root: &Path,
        pid: u32,
        path: &Path,
        netns: &NetnsFacts,
    ) -> Result<Option<redirector_policy::IdMaps>> {
        let key = (pid, netns.id);
        if let Some(m) = self.id_maps.get(&key) {
            return Ok(m.clone());
        }
        let (userns, maps) = super::userns::id_maps_of_pid_with_ns(proc_root, pid)?;
        let held = self.held.get(path.as_os_str()).is_some_and(|h| h.facts.id == netns.id);
        if held && (maps.is_none() || netns.owner.as_ref().is_ok_and(|o| *o == userns)) {
            self.id_maps.insert(key, maps.clone());
        }
        Ok(maps)
    }

    /// How many namespaces it may hold.
    pub fn room(&self) -> usize {
        self.room
    }

    /// How many namespaces it holds.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// How many namespaces of the last survey it had no room for (surveyed
    /// afresh, and again on the next pass).
    pub fn overflow(&self) -> usize {
        self.overflow
    }

    /// Lets go of the namespaces whose path no longer names them (the
    /// namespace deleted, the process gone, the path bound to another):
    /// holding one would keep a deleted namespace alive. Each call checks
    /// at most [`RELEASE_CHECKS_PER_CALL`] of them, taking up where the
    /// last call stopped: the agent calls it on every tick, and a `stat`
    /// of every held path each second would cost a busy node more than its
    /// passes do (at 10,000 workloads, a fifth of the agent's CPU time in
    /// the change benchmark). A namespace deleted is let go within
    /// ⌈held / 1,024⌉ ticks.
    pub fn release_gone(&mut self) -> usize {
        let n = self.held.len();
        if n == 0 {
            return 0;
        }
        use std::ops::Bound;
        let from = self.release_from.take().map_or(Bound::Unbounded, Bound::Included);
        let mut checked: Vec<OsString> = self
            .held
            .range((from, Bound::Unbounded))
            .take(RELEASE_CHECKS_PER_CALL + 1)
            .map(|(p, _)| p.clone())
            .collect();
        // The path after the last checked, or the first again at the end.
        self.release_from = if checked.len() > RELEASE_CHECKS_PER_CALL { checked.pop() } else { None };
        let mut gone = 0;
        for path in checked {
            if self.held.get(&path).is_some_and(|h| stat_id(Path::new(&path)) != Some(h.facts.id)) {
                self.held.remove(&path);
                gone += 1;
            }
        }
        gone
    }

    /// For each (namespace path, whether its addresses are wanted): its
    /// cookie, addresses and owning user namespace, or why they could not
    /// be read. A namespace held whose path still names it, and whose
    /// addresses (if wanted) did not change, is answered from the cache;
    /// the others are entered, in turn, on one thread (a thread per
    /// namespace costs far more than the `setns`: on a busy machine,
    /// joining 1,000 threads took 60 times as long as 1,000 `setns`
    /// calls). Namespaces of paths not asked for are let go.
    pub fn survey(&mut self, wanted: &[(PathBuf, bool)]) -> Vec<Result<NetnsFacts>> {
        let mut out: Vec<Option<Result<NetnsFacts>>> = (0..wanted.len()).map(|_| None).collect();
        let mut misses: Vec<(usize, PathBuf, bool)> = Vec::new();
        let asked: std::collections::HashSet<&std::ffi::OsStr> = wanted.iter().map(|(p, _)| p.as_os_str()).collect();
        self.held.retain(|p, _| asked.contains(p.as_os_str()));
        for (i, (path, addresses)) in wanted.iter().enumerate() {
            if let Some(h) = self.held.get(path.as_os_str()) {
                let same = stat_id(path) == Some(h.facts.id);
                let fresh = !*addresses || (h.facts.addresses.is_some() && !h.addresses_changed());
                if same && fresh {
                    let mut facts = h.facts.clone();
                    if !*addresses {
                        facts.addresses = None;
                    }
                    out[i] = Some(Ok(facts));
                    continue;
                }
                self.held.remove(path.as_os_str());
            }
            misses.push((i, path.clone(), *addresses));
        }
        self.overflow = 0;
        if !misses.is_empty() {
            // The first `keep` misses are held, the rest read and let go.
            let keep = self.room.saturating_sub(self.held.len()).min(misses.len());
            let entered = std::thread::spawn(move || {
                misses
                    .into_iter()
                    .enumerate()
                    .map(|(k, (i, path, addresses))| {
                        let r = enter_and_read(&path, addresses, k < keep);
                        (i, path, r)
                    })
                    .collect::<Vec<_>>()
            })
            .join();
            match entered {
                Ok(entered) => {
                    for (i, path, r) in entered {
                        out[i] = Some(r.map(|(facts, held)| {
                            match held {
                                Some(sock) => {
                                    self.held.insert(path.into_os_string(), Held { sock, facts: facts.clone() });
                                }
                                None => self.overflow += 1,
                            }
                            facts
                        }));
                    }
                }
                Err(_) => {
                    for o in out.iter_mut().filter(|o| o.is_none()) {
                        *o = Some(Err(anyhow::anyhow!("thread inside network namespaces panicked")));
                    }
                }
            }
        }
        let held: std::collections::HashSet<NsId> = self.held.values().map(|h| h.facts.id).collect();
        self.id_maps.retain(|(_, id), _| held.contains(id));
        out.into_iter().map(|o| o.unwrap_or_else(|| Err(anyhow::anyhow!("namespace not surveyed")))).collect()
    }
}

/// Enters the namespace at `path` (on the calling thread, which stays
/// there) and reads its facts; with `hold`, also returns the socket that
/// keeps it alive (subscribed to its address changes when
/// its addresses are wanted), or None if no descriptor was left for it.
fn enter_and_read(path: &Path, addresses: bool, hold: bool) -> Result<(NetnsFacts, Option<OwnedFd>)> {
    let file = File::open(path).with_context(|| format!("opening network namespace {}", path.display()))?;
    super::netns::enter_netns(&file).with_context(|| format!("entering network namespace {}", path.display()))?;
    let m = file.metadata().with_context(|| format!("reading network namespace {}", path.display()))?;
    let id = (m.dev(), m.ino());
    let owner = super::userns::owner_of(&file).map_err(|e| {
        format!("{:#}", e.context(format!("asking the user namespace of network namespace {}", path.display())))
    });
    let groups = if addresses { RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR } else { 0 };
    let sock = match hold.then(|| route_socket(groups)) {
        None => None,
        Some(Ok(s)) => Some(s),
        // No descriptor left: this namespace is read without being held.
        Some(Err(e)) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => None,
        Some(Err(e)) => return Err(e).context("socket(AF_NETLINK, NETLINK_ROUTE) for the namespace cache"),
    };
    let cookie = match &sock {
        Some(s) => super::netns::socket_netns_cookie(s)?,
        None => super::netns::current_netns_cookie()?,
    };
    let addresses = if addresses { Some(super::netns::addresses_here()?) } else { None };
    let facts = NetnsFacts { id, cookie, addresses, owner };
    Ok((facts, sock))
}

/// A `NETLINK_ROUTE` socket of the calling thread's namespace, bound to
/// `groups` (0: none).
fn route_socket(groups: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the fd is owned as soon as it exists.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        if groups != 0 {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            sa.nl_groups = groups;
            let rc = libc::bind(
                sock.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            );
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(sock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn root() -> bool {
        // SAFETY: plain syscall.
        unsafe { libc::geteuid() == 0 }
    }

    /// `ip ARGS` whose failure does not matter (cleanup of what may be gone).
    fn quiet(args: &[&str]) {
        let _ = Command::new("ip").args(args).stderr(std::process::Stdio::null()).status();
    }

    struct Netns(String);
    impl Netns {
        fn new(name: &str) -> Self {
            quiet(&["netns", "del", name]);
            assert!(Command::new("ip").args(["netns", "add", name]).status().unwrap().success());
            Self(name.into())
        }
        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/run/netns/{}", self.0))
        }
        fn ip(&self, args: &[&str]) {
            let st = Command::new("ip").args(["-n", &self.0]).args(args).status().unwrap();
            assert!(st.success(), "ip -n {} {args:?}", self.0);
        }
    }
    impl Drop for Netns {
        fn drop(&mut self) {
            quiet(&["netns", "del", &self.0]);
        }
    }

    /// The cache answers a held namespace without entering it, sees a new
    /// address, a namespace deleted and made again under the same path,
    /// and lets go of a deleted one (its veth, whose peer is outside,
    /// then goes with it: held, it would stay).
    #[test]
    fn held_namespaces_are_revalidated_and_let_go() {
        if !root() {
            eprintln!("SKIP held_namespaces_are_revalidated_and_let_go: needs root for ip netns");
            return;
        }
        let ns = Netns::new("rdr-nscache-a");
        let mut cache = NsCache::with_room(8);
        let first = cache.survey(&[(ns.path(), true)]).pop().unwrap().unwrap();
        assert_eq!(cache.len(), 1);
        assert_eq!(first.addresses.as_deref(), Some(&[][..]), "a new namespace has no address: lo is down");
        // Unchanged: answered from the cache, the same facts.
        let again = cache.survey(&[(ns.path(), true)]).pop().unwrap().unwrap();
        assert_eq!((again.cookie, again.addresses.clone()), (first.cookie, first.addresses.clone()));
        // A new address is seen on the next survey.
        ns.ip(&["addr", "add", "192.0.2.44/32", "dev", "lo"]);
        let added = cache.survey(&[(ns.path(), true)]).pop().unwrap().unwrap();
        assert_eq!(added.cookie, first.cookie);
        assert!(added.addresses.unwrap().contains(&IpAddr::from([192, 0, 2, 44])));
        // Deleted and made again under the same name: a new cookie.
        let (veth_out, veth_in) = ("rdrnsc-out", "rdrnsc-in");
        quiet(&["link", "del", veth_out]);
        assert!(Command::new("ip")
            .args(["link", "add", veth_out, "type", "veth", "peer", "name", veth_in, "netns", &ns.0])
            .status()
            .unwrap()
            .success());
        assert!(Command::new("ip").args(["netns", "del", &ns.0]).status().unwrap().success());
        // Held, the namespace and with it the veth live on.
        assert!(Path::new(&format!("/sys/class/net/{veth_out}")).exists());
        assert_eq!(cache.release_gone(), 1);
        assert!(cache.is_empty());
        // Let go, the kernel destroys the namespace and its veth pair.
        let gone = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            !Path::new(&format!("/sys/class/net/{veth_out}")).exists()
        });
        quiet(&["link", "del", veth_out]);
        assert!(gone, "the veth of a namespace let go must go with it");
        let ns = Netns::new("rdr-nscache-a");
        let remade = cache.survey(&[(ns.path(), false)]).pop().unwrap().unwrap();
        assert_ne!(remade.cookie, first.cookie);
        assert_eq!(remade.addresses, None);
        // A path asked no more is let go by the next survey.
        let other = Netns::new("rdr-nscache-b");
        let both = cache.survey(&[(other.path(), false)]);
        assert!(both[0].is_ok());
        assert_eq!(cache.len(), 1);
        // No room: answered, but not held.
        let mut none = NsCache::with_room(0);
        let r = none.survey(&[(ns.path(), false), (other.path(), false)]);
        assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 2);
        assert_eq!((none.len(), none.overflow()), (0, 2));
    }

    /// Many held namespaces are checked a bounded number per call, in
    /// turn, so every one is checked within ⌈held / 1,024⌉ calls.
    #[test]
    fn release_gone_checks_in_turn() {
        if !root() {
            eprintln!("SKIP release_gone_checks_in_turn: needs root to enter namespaces");
            return;
        }
        // 1,100 paths to one namespace (this process's own): links to
        // descriptors of it, each path its own entry.
        if raise_nofile_limit().unwrap() < 3_000 {
            eprintln!("SKIP release_gone_checks_in_turn: RLIMIT_NOFILE's hard limit is below 3,000");
            return;
        }
        let files: Vec<File> = (0..1_100).map(|_| File::open("/proc/self/ns/net").unwrap()).collect();
        let wanted: Vec<(PathBuf, bool)> =
            files.iter().map(|f| (PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())), false)).collect();
        let mut cache = NsCache::with_room(2_000);
        assert!(cache.survey(&wanted).iter().all(|r| r.is_ok()));
        assert_eq!(cache.len(), 1_100);
        // Still named by their paths: nothing to let go, in two calls.
        assert_eq!([cache.release_gone(), cache.release_gone()], [0, 0]);
        assert_eq!(cache.len(), 1_100);
        drop(files);
        let calls: Vec<usize> = (0..3).map(|_| cache.release_gone()).collect();
        assert_eq!(calls, [1_024, 76, 0]);
        assert!(cache.is_empty());
    }

    /// The ID maps of a `pid:` process in a user namespace of its own
    /// (which owns its network namespace) are read once while that
    /// namespace is held, and read on every call when it is not.
    #[test]
    fn id_maps_are_kept_with_the_held_namespace() {
        if !root() {
            eprintln!("SKIP id_maps_are_kept_with_the_held_namespace: writing another process's uid_map needs root");
            return;
        }
        let mut child = super::super::userns::child_in_own_user_ns();
        let pid = child.id();
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let nowhere = Path::new("/nonexistent-proc");
        for room in [8, 0] {
            let mut cache = NsCache::with_room(room);
            let facts = cache.survey(&[(dir.join("ns/net"), false)]).pop().unwrap().unwrap();
            let net = dir.join("ns/net");
            let maps = cache.id_maps_of_pid(Path::new("/proc"), pid, &net, &facts).unwrap().unwrap();
            assert_eq!(maps.uid.to_outside(1337), Some(525625));
            // A /proc with nothing in it: only a kept answer can come back.
            let again = cache.id_maps_of_pid(nowhere, pid, &net, &facts);
            if room > 0 {
                assert_eq!(again.unwrap(), Some(maps));
            } else {
                assert!(again.is_err(), "not held, the maps must be read again");
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A deleted namespace is not found again from the cache even before
    /// `release_gone` runs: the survey stats the path first.
    #[test]
    fn a_missing_path_is_an_error_not_a_cached_answer() {
        if !root() {
            eprintln!("SKIP a_missing_path_is_an_error_not_a_cached_answer: needs root for ip netns");
            return;
        }
        let ns = Netns::new("rdr-nscache-c");
        let mut cache = NsCache::with_room(8);
        assert!(cache.survey(&[(ns.path(), false)])[0].is_ok());
        let path = ns.path();
        drop(ns);
        let e = format!("{:#}", cache.survey(&[(path.clone(), false)])[0].as_ref().unwrap_err());
        assert!(e.contains("opening network namespace /run/netns/rdr-nscache-c"), "{e}");
        assert!(cache.is_empty());
    }
}
