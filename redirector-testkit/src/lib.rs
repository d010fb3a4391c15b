//! Test support, never shipped: throwaway network namespaces, a test
//! cgroup, tiny servers, a demo proxy, a probing client and an agent
//! process ([`fakeapi`]: a Kubernetes API server stand-in; [`admission`]:
//! its side of an admission webhook), shared by the
//! kernel tests and the `redirector-lab` binary (demo, bench).
//!
//! Everything here talks only to loopback or to documentation addresses
//! inside namespaces it created, and removes what it created on drop.
pub mod dns;

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use redirector::sys::netns::enter_netns;

pub mod admission;
pub mod fakeapi;

/// The agent's programs built with the eBPF crate's `upgrade-test`
/// feature: connect4/6 also count `upgrade_test_build`. The restart test
/// upgrades a running agent to it (through `REDIRECTOR_EBPF_OBJECT`) under
/// load.
pub static UPGRADE_TEST_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf-upgrade-test"));

/// The agent's programs plus `standin_sock4_connect` /
/// `standin_sock4_getpeername` and their maps: a stand-in for Cilium's
/// socket load balancer (see `redirector-ebpf/src/standin_socklb.rs`).
pub static SOCKLB_STANDIN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf-socklb-standin"));

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out =
        Command::new(program).args(args).output().with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call (interface names ≤ 15).
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(argv);
        sh("ip", &args)
    }

    pub fn shell(&self, script: &str) -> Result<String> {
        self.exec(&["sh", "-c", script])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// Addresses of the standard topology (documentation ranges only).
pub mod addrs {
    pub const POD_IP: &str = "198.18.0.1";
    pub const PEER_IP: &str = "198.18.0.2";
    /// Remote "services", on the peer's loopback.
    pub const REMOTES: [&str; 4] = ["192.0.2.10", "198.51.100.10", "203.0.113.10", "203.0.113.200"];
    /// TCP ports the remote servers listen on.
    pub const REMOTE_PORTS: [u16; 5] = [80, 7070, 6379, 8080, 15000];
    /// UDP echo port on the remotes.
    pub const UDP_PORT: u16 = 5353;
    /// A server inside the workload itself (loopback and pod IP).
    pub const LOCAL_PORT: u16 = 8080;
}

/// A workload namespace joined to a "rest of the world" namespace by a
/// veth pair, with servers on the far side.
pub struct Topology {
    pub app: Netns,
    pub peer: Netns,
    /// The veth ends: in `app`, in `peer`.
    pub app_link: String,
    pub peer_link: String,
    _servers: Vec<Server>,
}

impl Topology {
    pub fn new(tag: &str) -> Result<Self> {
        let app = Netns::new(&format!("rdr{tag}a"))?;
        let peer = Netns::new(&format!("rdr{tag}p"))?;
        let va = unique("rva");
        let vb = unique("rvb");
        sh("ip", &["link", "add", &va, "netns", &app.name, "type", "veth", "peer", "name", &vb, "netns", &peer.name])?;
        app.exec(&["ip", "addr", "add", &format!("{}/24", addrs::POD_IP), "dev", &va])?;
        app.exec(&["ip", "link", "set", &va, "up"])?;
        app.exec(&["ip", "route", "add", "default", "via", addrs::PEER_IP])?;
        peer.exec(&["ip", "addr", "add", &format!("{}/24", addrs::PEER_IP), "dev", &vb])?;
        peer.exec(&["ip", "link", "set", &vb, "up"])?;
        for ip in addrs::REMOTES {
            peer.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        }
        let mut servers = Vec::new();
        for port in addrs::REMOTE_PORTS {
            servers.push(Server::tcp(&peer.path(), SocketAddr::from(([0, 0, 0, 0], port)))?);
        }
        servers.push(Server::udp(&peer.path(), SocketAddr::from(([0, 0, 0, 0], addrs::UDP_PORT)))?);
        servers.push(Server::tcp(&app.path(), SocketAddr::from(([0, 0, 0, 0], addrs::LOCAL_PORT)))?);
        Ok(Self { app, peer, app_link: va, peer_link: vb, _servers: servers })
    }
}

/// A cgroup-v2 directory for the test; the current process joins it and
/// goes back to where it was on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    original: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Result<Self> {
        let root = redirector::sys::mounts::cgroup2_root()?;
        let rel = std::fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            .ok_or_else(|| anyhow!("this process is in no cgroup-v2 group"))?;
        let original = root.join(rel.trim_start_matches('/'));
        let path = root.join(unique("redirector-test-"));
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let cg = Self { path, original };
        std::fs::write(cg.path.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.path.display()))?;
        Ok(cg)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let back = std::fs::write(self.original.join("cgroup.procs"), std::process::id().to_string());
        if back.is_err() {
            // The original group may not accept processes; fall back to the root.
            if let Ok(root) = redirector::sys::mounts::cgroup2_root() {
                let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `f` on a thread inside `netns` with the given uid/gid (thread-local
/// credentials, raw setresuid/setresgid so other threads keep theirs).
pub fn in_netns_as<T: Send + 'static>(netns: &Path, uid: u32, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::spawn(move || -> Result<T> {
        enter_netns(&file)?;
        become_thread(uid)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("probe thread panicked"))?
}

/// Switches the calling thread (only) to `uid`/`gid` = `uid`; 0 is a no-op.
fn become_thread(uid: u32) -> Result<()> {
    if uid != 0 {
        // SAFETY: raw syscalls change only this thread's credentials.
        unsafe {
            if libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error()).context("setresuid");
            }
        }
    }
    Ok(())
}

/// A server thread that answers every connection or datagram with one line.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn start(
        netns: &Path,
        bind: impl FnOnce() -> Result<Box<dyn FnMut() -> bool + Send>> + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let file = File::open(netns)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut poll = match enter_netns(&file).and_then(|()| bind()) {
                Ok(p) => {
                    let _ = tx.send(Ok(()));
                    p
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !s2.load(Ordering::Relaxed) {
                if !poll() {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        rx.recv().map_err(|_| anyhow!("server thread died"))??;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Answers `direct <local address>`.
    pub fn tcp(netns: &Path, addr: SocketAddr) -> Result<Self> {
        Self::start(netns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(Box::new(move || match l.accept() {
                Ok((mut s, _)) => {
                    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    let _ = s.write_all(format!("direct {local}\n").as_bytes());
                    true
                }
                Err(_) => false,
            }))
        })
    }

    pub fn udp(netns: &Path, addr: SocketAddr) -> Result<Self> {
        Self::start(netns, move || {
            let u = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
            u.set_nonblocking(true)?;
            Ok(Box::new(move || {
                let mut buf = [0u8; 64];
                match u.recv_from(&mut buf) {
                    Ok((_, from)) => {
                        // Reply from the address the datagram was sent to.
                        let local = u.local_addr().map(|a| a.port()).unwrap_or(0);
                        let dst = std::str::from_utf8(&buf).unwrap_or("").trim_end_matches('\0').trim();
                        let _ = u.send_to(format!("direct udp {dst} port {local}\n").as_bytes(), from);
                        true
                    }
                    Err(_) => false,
                }
            }))
        })
    }

    /// The demo proxy: answers `proxy <original destination>` read with
    /// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`, as Envoy does.
    pub fn proxy(netns: &Path, addr: SocketAddr) -> Result<Self> {
        Self::start(netns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(Box::new(move || match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(proxy_answer(&s).as_bytes());
                    true
                }
                Err(_) => false,
            }))
        })
    }
}

impl Server {
    /// A proxy in NAT interception mode that treats the original
    /// destination as squid 5 does (`http_port … intercept`):
    ///
    /// - it asks for it on every accepted connection, `SOL_IPV6,
    ///   IP6T_SO_ORIGINAL_DST` when the local address is IPv6 and `SOL_IP,
    ///   SO_ORIGINAL_DST` otherwise (squid's
    ///   `Ip::Intercept::NetfilterInterception`, src/ip/Intercept.cc);
    /// - when that fails it closes the connection and stops accepting for
    ///   good: squid 5's `Comm::TcpAcceptor::oldAccept` returns
    ///   `COMM_ERROR` when the NAT lookup fails and `acceptOne()` then calls
    ///   `mustStop("Listener socket closed")` (src/comm/TcpAcceptor.cc;
    ///   squid 6 only drops that one connection);
    /// - when the original destination is its own listening address (the
    ///   connection reached the port without being redirected), it answers
    ///   `403 forwarding loop <address>` and goes on serving: squid
    ///   forwards such a request to itself, finds its own
    ///   name in the `Via` header (`clientInterpretRequestHeaders`,
    ///   src/client_side_request.cc) and answers 403 `ERR_ACCESS_DENIED`
    ///   ("Deny loops", src/client_side_reply.cc);
    /// - otherwise it answers `proxy <original destination>`.
    ///
    /// Both answers end in `from <client address>`, as squid logs it.
    ///
    /// `stopped` becomes true once it has stopped accepting.
    pub fn intercepting(netns: &Path, addr: SocketAddr, stopped: Arc<AtomicBool>) -> Result<Self> {
        Self::start(netns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            l.set_nonblocking(true)?;
            let mut listener = Some(l);
            Ok(Box::new(move || {
                let Some(l) = &listener else { return false };
                let Ok((mut s, client)) = l.accept() else { return false };
                let _ = s.set_nonblocking(false);
                // Itself: its port, and its address unless it listens on
                // all of them.
                let own = |orig: SocketAddr| {
                    orig.port() == addr.port() && (addr.ip().is_unspecified() || orig.ip() == addr.ip())
                };
                match original_dst_any(&s) {
                    Ok(orig) if own(orig) => {
                        let _ = s.write_all(format!("403 forwarding loop {orig} from {client}\n").as_bytes());
                    }
                    Ok(orig) => {
                        let _ = s.write_all(format!("proxy {orig} from {client}\n").as_bytes());
                    }
                    Err(_) => {
                        drop(s);
                        listener = None;
                        stopped.store(true, Ordering::SeqCst);
                    }
                }
                true
            }))
        })
    }
}

/// Which of Envoy's listeners a [`Server::forwarder`] plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// 15001: forwards to the original destination (or the endpoint a
    /// service address resolves to) as the proxy user.
    Outbound,
    /// 15006: forwards to the original destination from 127.0.0.6, the
    /// inbound passthrough source of istio-iptables.
    Inbound,
}

impl Server {
    /// A proxy that behaves like Envoy's listeners in REDIRECT mode: reads
    /// the original destination, connects onwards as `uid`, and answers
    /// `"<outbound|inbound> <original dst> > <upstream's answer>"`.
    /// `services` maps a service address to its endpoint (kube-proxy and
    /// Envoy's load balancing in one line).
    pub fn forwarder(
        netns: &Path,
        addr: SocketAddr,
        uid: u32,
        hop: Hop,
        services: Vec<(SocketAddr, SocketAddr)>,
    ) -> Result<Self> {
        Self::start(netns, move || {
            become_thread(uid)?;
            let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(Box::new(move || match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let line = match original_dst_any(&s) {
                        Err(e) => format!("{} no-original-dst ({e})", hop_name(hop)),
                        Ok(orig) => {
                            let target = services.iter().find(|(svc, _)| *svc == orig).map_or(orig, |(_, ep)| *ep);
                            let source = (hop == Hop::Inbound).then(|| SocketAddr::from(([127, 0, 0, 6], 0)));
                            let upstream = connect_from(source, target).and_then(|mut u| {
                                u.set_read_timeout(Some(Duration::from_secs(1)))?;
                                let mut r = String::new();
                                u.read_to_string(&mut r)?;
                                Ok(r)
                            });
                            match upstream {
                                Ok(r) => format!("{} {orig} > {}", hop_name(hop), r.trim()),
                                Err(e) => format!("{} {orig} > error: {e}", hop_name(hop)),
                            }
                        }
                    };
                    let _ = s.write_all(format!("{line}\n").as_bytes());
                    true
                }
                Err(_) => false,
            }))
        })
    }
}

fn hop_name(h: Hop) -> &'static str {
    match h {
        Hop::Outbound => "outbound",
        Hop::Inbound => "inbound",
    }
}

/// `connect()` with an optional `bind()` first (IPv4), 1 s timeout.
fn connect_from(source: Option<SocketAddr>, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(SocketAddr::V4(src)) = source else {
        return TcpStream::connect_timeout(&dst, Duration::from_secs(1));
    };
    let SocketAddr::V4(dst) = dst else {
        return Err(std::io::Error::other("an IPv4 source needs an IPv4 destination"));
    };
    let sin = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket owned by OwnedFd; sockaddr_in values live
    // across the calls that read them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
        let s = sin(src);
        if libc::bind(fd, (&s as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let d = sin(dst);
        if libc::connect(fd, (&d as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TcpStream::from(owned))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The test proxy's answer on an accepted connection: `proxy <original
/// destination>` or `proxy no-original-dst (<error>)`.
pub fn proxy_answer(s: &TcpStream) -> String {
    match original_dst_any(s) {
        Ok(a) => format!("proxy {a}\n"),
        Err(e) => format!("proxy no-original-dst ({e})\n"),
    }
}

/// The original destination of an accepted socket, asked the way Envoy
/// does: `SOL_IPV6, IP6T_SO_ORIGINAL_DST` on an IPv6 connection,
/// `SOL_IP, SO_ORIGINAL_DST` otherwise.
pub fn original_dst_any(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let v6 = matches!(s.local_addr()?, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_none());
    if !v6 {
        return original_dst(s).map(SocketAddr::V4);
    }
    // SAFETY: getsockopt into a properly sized sockaddr_in6.
    unsafe {
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc =
            libc::getsockopt(s.as_raw_fd(), libc::SOL_IPV6, 80, (&mut sa as *mut libc::sockaddr_in6).cast(), &mut len);
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SocketAddr::from((std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr), u16::from_be(sa.sin6_port))))
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on an accepted socket.
pub fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: getsockopt into a properly sized sockaddr_in.
    unsafe {
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SocketAddrV4::new(u32::from_be(sa.sin_addr.s_addr).into(), u16::from_be(sa.sin_port)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Connects from inside `netns` as `uid` and reports who answered and
/// what `getpeername()` said: `"<reply> | peer <addr>"`.
pub fn probe(netns: &Path, uid: u32, proto: Proto, dst: SocketAddr) -> Result<String> {
    probe_from(netns, uid, None, proto, dst)
}

/// [`probe`] from a given source address (TCP, IPv4).
pub fn probe_from(netns: &Path, uid: u32, src: Option<SocketAddr>, proto: Proto, dst: SocketAddr) -> Result<String> {
    in_netns_as(netns, uid, move || -> String {
        let r = match proto {
            Proto::Tcp => (|| -> std::io::Result<String> {
                let mut s = match src {
                    None => TcpStream::connect_timeout(&dst, Duration::from_secs(2))?,
                    Some(_) => connect_from(src, dst)?,
                };
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let peer = s.peer_addr()?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                Ok(format!("{} | peer {peer}", reply.trim()))
            })(),
            Proto::Udp => (|| -> std::io::Result<String> {
                // Unconnected: the server's reply comes from its routed
                // source address, not necessarily the one we sent to.
                let u = UdpSocket::bind(if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
                u.set_read_timeout(Some(Duration::from_secs(2)))?;
                u.send_to(dst.ip().to_string().as_bytes(), dst)?;
                let mut buf = [0u8; 128];
                let (n, from) = u.recv_from(&mut buf)?;
                Ok(format!("{} | from {from}", String::from_utf8_lossy(&buf[..n]).trim()))
            })(),
        };
        r.unwrap_or_else(|e| format!("error: {e}"))
    })
}

/// Connects to `dst` (TCP, IPv4) from a process that is in network
/// namespace `netns`, in user namespace `userns` as its (inside) `uid` and
/// GID `uid`, and in the cgroup whose `cgroup.procs` is `cgroup_procs`, as
/// a process of a `hostUsers: false` pod is; returns the server's reply
/// (`"direct …"` or `"proxy …"`), or `"error: …"`.
///
/// A thread cannot join another user namespace (setns refuses a
/// multithreaded caller), so this forks a child that makes only raw
/// system calls (async-signal-safe) and reports through a pipe.
pub fn probe_in_user_namespace(
    netns: &Path,
    userns: &Path,
    cgroup_procs: &Path,
    uid: u32,
    dst: SocketAddrV4,
) -> Result<String> {
    let net = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let user = File::open(userns).with_context(|| format!("opening {}", userns.display()))?;
    let procs = std::ffi::CString::new(cgroup_procs.as_os_str().as_encoded_bytes())?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*dst.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the child makes only async-signal-safe calls on values
    // prepared before the fork, and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let fail = |step: &[u8]| -> ! {
                let errno = *libc::__errno_location();
                let mut msg = [0u8; 64];
                let mut n = 0;
                for b in b"error: ".iter().chain(step) {
                    msg[n] = *b;
                    n += 1;
                }
                msg[n] = b' ';
                n += 1;
                let mut digits = [0u8; 10];
                let (mut v, mut d) = (errno.unsigned_abs(), 0);
                loop {
                    digits[d] = b'0' + (v % 10) as u8;
                    d += 1;
                    v /= 10;
                    if v == 0 {
                        break;
                    }
                }
                while d > 0 {
                    d -= 1;
                    msg[n] = digits[d];
                    n += 1;
                }
                libc::write(wr, msg.as_ptr().cast(), n);
                libc::_exit(1)
            };
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(b"joining the cgroup, errno");
            }
            libc::close(fd);
            // The network namespace first: once in the user namespace,
            // the child has no capability over the initial one's.
            if libc::setns(net.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                fail(b"setns(net), errno");
            }
            if libc::setns(user.as_raw_fd(), libc::CLONE_NEWUSER) != 0 {
                fail(b"setns(user), errno");
            }
            if libc::setresgid(uid, uid, uid) != 0 || libc::setresuid(uid, uid, uid) != 0 {
                fail(b"setresuid in the user namespace, errno");
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if s < 0 {
                fail(b"socket, errno");
            }
            let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
            let tvp = (&tv as *const libc::timeval).cast();
            let tvl = size_of::<libc::timeval>() as libc::socklen_t;
            libc::setsockopt(s, libc::SOL_SOCKET, libc::SO_RCVTIMEO, tvp, tvl);
            libc::setsockopt(s, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tvp, tvl);
            let alen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::connect(s, (&addr as *const libc::sockaddr_in).cast(), alen) != 0 {
                fail(b"connect, errno");
            }
            let mut buf = [0u8; 256];
            let mut n = 0usize;
            while n < buf.len() {
                let r = libc::read(s, buf[n..].as_mut_ptr().cast(), buf.len() - n);
                if r <= 0 {
                    break;
                }
                n += r as usize;
            }
            libc::write(wr, buf.as_ptr().cast(), n);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(wr) };
    if pid < 0 {
        // SAFETY: closing the read end we own.
        unsafe { libc::close(rd) };
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    // SAFETY: rd is ours; File closes it.
    let mut out = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(rd) };
    let mut text = String::new();
    let _ = out.read_to_string(&mut text);
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(text.trim().to_string())
}

/// A running `redirector run` process; stopped (SIGTERM) on drop. The
/// caller cleans the pin directory up separately.
pub struct AgentProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl AgentProcess {
    pub fn start(bin: &Path, config: &Path, cgroup: &Path, pin_dir: &Path, log: &Path) -> Result<Self> {
        Self::start_polling(bin, config, cgroup, pin_dir, log, "100ms")
    }

    /// Like [`AgentProcess::start`] with the config file checked every `poll`.
    pub fn start_polling(
        bin: &Path,
        config: &Path,
        cgroup: &Path,
        pin_dir: &Path,
        log: &Path,
        poll: &str,
    ) -> Result<Self> {
        Self::start_with_env(bin, config, cgroup, pin_dir, log, poll, &[])
    }

    /// Like [`AgentProcess::start_polling`] with extra environment.
    pub fn start_with_env(
        bin: &Path,
        config: &Path,
        cgroup: &Path,
        pin_dir: &Path,
        log: &Path,
        poll: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--config".into(), config.into()];
        args.extend(["--cgroup".into(), cgroup.into(), "--pin-dir".into(), pin_dir.into()]);
        args.extend(["--poll-interval".into(), poll.into()]);
        Self::spawn(bin, &args, env, log)
    }

    /// `bin` with `args` and extra environment, output to `log`.
    pub fn spawn(
        bin: &Path,
        args: &[std::ffi::OsString],
        env: &[(&str, &std::ffi::OsStr)],
        log: &Path,
    ) -> Result<Self> {
        let out = File::create(log)?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child, log: log.to_owned() })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `redirector wait-ready` succeeds for `netns`, run from
    /// this process's cgroup (which must be inside the agent's).
    pub fn wait_ready(&self, bin: &Path, pin_dir: &Path, netns: &Path) -> Result<()> {
        self.wait_ready_with(bin, pin_dir, netns, &[])
    }

    /// Like [`AgentProcess::wait_ready`] from outside the agent's cgroup
    /// (`--no-cgroup-check`): the workload is programmed, whoever asks.
    pub fn wait_programmed(&self, bin: &Path, pin_dir: &Path, netns: &Path) -> Result<()> {
        self.wait_ready_with(bin, pin_dir, netns, &["--no-cgroup-check"])
    }

    fn wait_ready_with(&self, bin: &Path, pin_dir: &Path, netns: &Path, extra: &[&str]) -> Result<()> {
        let out = Command::new(bin)
            .args(["wait-ready", "--timeout", "60s", "--netns"])
            .arg(netns)
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(extra)
            .output()?;
        if !out.status.success() {
            bail!("wait-ready failed: {}\nagent log:\n{}", String::from_utf8_lossy(&out.stderr), self.log_text());
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        // Already exited and reaped: its PID may belong to another process.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A pin directory for a test on /sys/fs/bpf (mounted if needed), cleaned
/// (links detached, pins removed) on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Result<Self> {
        ensure_bpffs()?;
        let path = PathBuf::from("/sys/fs/bpf").join(unique("redirector-test-"));
        Ok(Self { path })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Forced: a test that failed may have left its agent running.
        let _ = redirector::dataplane::cleanup_force(&self.path);
    }
}

/// Mounts bpffs on /sys/fs/bpf if it is not there yet.
pub fn ensure_bpffs() -> Result<()> {
    let p = Path::new("/sys/fs/bpf");
    if redirector::sys::mounts::is_bpffs(p) {
        return Ok(());
    }
    std::fs::create_dir_all(p)?;
    sh("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    Ok(())
}

/// The agent binary the demo and the bench run: `REDIRECTOR_BIN` if set,
/// else `redirector` beside the running executable (cargo puts both in
/// its target directory).
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIRECTOR_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let bin = std::env::current_exe()?.with_file_name("redirector");
    if !bin.is_file() {
        bail!(
            "the agent binary {} is missing: build it with `cargo xtask build`, or name it in REDIRECTOR_BIN",
            bin.display()
        );
    }
    Ok(bin)
}
