//! `mesh.acceleration: sockmap`: both ends of an app ↔ proxy connection in
//! `RDR_ACCEL_SOCKS`, `sk_msg` moving the bytes between them. Every test
//! checks the bytes end to end (small messages, several MiB with partial
//! non-blocking writes and odd-sized reads, both directions at once,
//! half-close), that acceleration really happened (map entries while the
//! connections are open, the sk_msg counters) and that nothing else is
//! ever put in the map (connections to a non-local end, acceleration off).
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Duration,
};

use redirector::{
    dataplane::Maps,
    sys::bpf::{self, AttachType},
    sys::netns::netns_cookie,
};
use redirector_common::map_names;
use redirector_testkit::{self as testkit, AgentProcess, Proto, Server, Topology};

use super::{bin, poll_until, require_kernel, Managed};

const ACCEL: &str = r#"
mesh:
  acceleration: sockmap
  outboundIPRangeExclusionList: ["198.51.100.0/24"]
workloads:
  - name: app
    netns: {netns}
"#;

const PLAIN: &str = r#"
mesh:
  outboundIPRangeExclusionList: ["198.51.100.0/24"]
workloads:
  - name: app
    netns: {netns}
"#;

fn counter(pins: &Path, name: &str) -> u64 {
    let maps = Maps::open(pins).unwrap();
    maps.counters().unwrap().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v).unwrap()
}

/// Sockets of `cookie`'s namespace in the acceleration map.
fn accel_entries(pins: &Path, cookie: u64) -> usize {
    let maps = Maps::open(pins).unwrap();
    maps.accel_socket_keys().unwrap().iter().filter(|k| k.netns_cookie == cookie).count()
}

/// The proxy's outbound listener, bound inside the workload (its socket
/// belongs to the test cgroup, like a pod's proxy).
fn proxy_listener(app: &Path) -> TcpListener {
    testkit::in_netns_as(app, 0, || TcpListener::bind("127.0.0.1:15001")).unwrap().unwrap()
}

/// The application's connection to `dst` (as UID 1000) and the proxy's
/// accepted end of it.
fn connect_pair(app: &Path, listener: &TcpListener, dst: &str) -> (TcpStream, TcpStream) {
    let dst: SocketAddr = dst.parse().unwrap();
    let a = testkit::in_netns_as(app, 1000, move || TcpStream::connect_timeout(&dst, Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    let (p, _) = listener.accept().unwrap();
    for s in [&a, &p] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    (a, p)
}

/// Deterministic bytes that differ at every offset of a stream.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `data` with non-blocking `send(MSG_DONTWAIT)` calls of varying
/// sizes, waiting in poll() on EAGAIN. Returns (short writes, EAGAINs).
fn send_nonblocking(s: &TcpStream, data: &[u8]) -> (u64, u64) {
    let sizes = [1usize, 1000, 65_536, 300_001, 4096, 1 << 20, 17];
    let (mut off, mut short, mut eagain, mut i) = (0usize, 0u64, 0u64, 0usize);
    while off < data.len() {
        let want = sizes[i % sizes.len()].min(data.len() - off);
        i += 1;
        // SAFETY: the slice outlives the call; fd is a connected socket.
        let n = unsafe {
            libc::send(s.as_raw_fd(), data[off..].as_ptr().cast(), want, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "send: {e}");
            eagain += 1;
            let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            // SAFETY: one valid pollfd.
            assert!(unsafe { libc::poll(&mut p, 1, 20_000) } == 1, "socket never became writable again");
            continue;
        }
        if (n as usize) < want {
            short += 1;
        }
        off += n as usize;
    }
    (short, eagain)
}

/// Reads exactly `len` bytes in odd-sized chunks.
fn read_odd(s: &TcpStream, len: usize) -> Vec<u8> {
    let chunks = [4093usize, 7, 65_521, 1, 131_071, 333];
    let mut out = Vec::with_capacity(len);
    let mut buf = vec![0u8; 131_071];
    let mut i = 0;
    let mut s = s;
    while out.len() < len {
        let want = chunks[i % chunks.len()].min(len - out.len());
        i += 1;
        let n = s.read(&mut buf[..want]).unwrap();
        assert!(n > 0, "EOF after {} of {len} bytes", out.len());
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Both directions at once: the application sends `a_len` bytes while the
/// proxy sends `p_len`, each side reading the other's in odd chunks.
fn bulk_both_ways(app: &TcpStream, proxy: &TcpStream, a_len: usize, p_len: usize) -> ((u64, u64), (u64, u64)) {
    let (a_data, p_data) = (pattern(1, a_len), pattern(2, p_len));
    std::thread::scope(|sc| {
        let a_w = sc.spawn(|| send_nonblocking(app, &a_data));
        let p_w = sc.spawn(|| send_nonblocking(proxy, &p_data));
        let at_proxy = sc.spawn(|| read_odd(proxy, a_len));
        let at_app = read_odd(app, p_len);
        let at_proxy = at_proxy.join().unwrap();
        assert!(at_proxy == a_data, "application → proxy bytes differ (first at {:?})", first_diff(&at_proxy, &a_data));
        assert!(at_app == p_data, "proxy → application bytes differ (first at {:?})", first_diff(&at_app, &p_data));
        (a_w.join().unwrap(), p_w.join().unwrap())
    })
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

/// Small request/response exchanges of sizes 1..=200 and back.
fn ping_pong(app: &TcpStream, proxy: &TcpStream, rounds: usize) {
    let (mut a, mut p) = (app, proxy);
    for i in 0..rounds {
        let req = pattern(i as u64 + 10, 1 + i % 200);
        a.write_all(&req).unwrap();
        let mut got = vec![0u8; req.len()];
        p.read_exact(&mut got).unwrap();
        assert_eq!(got, req, "request {i}");
        let resp = pattern(i as u64 + 5000, 1 + (i * 7) % 150);
        p.write_all(&resp).unwrap();
        let mut back = vec![0u8; resp.len()];
        a.read_exact(&mut back).unwrap();
        assert_eq!(back, resp, "response {i}");
    }
}

/// (a) bytes identical both ways, small and large (8 MiB / 6 MiB at once,
/// partial non-blocking writes, odd reads); (b) half-close; (d) the
/// connection was accelerated: both ends in the map while open, the
/// sk_msg counter moved, SO_ORIGINAL_DST and getpeername still right; the
/// entries leave the map with their sockets.
#[test]
fn sockmap_acceleration_carries_bytes_exactly() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start_full(Topology::new("s").unwrap(), ACCEL, |_| Vec::new(), false);
    let app = m.topo.app.path();
    let cookie = netns_cookie(&app).unwrap();
    let l = proxy_listener(&app);
    let redirected_before = counter(&m.pins.path, "accel_msg_redirected");

    let (a, p) = connect_pair(&app, &l, "192.0.2.10:80");
    assert_eq!(testkit::original_dst(&p).unwrap().to_string(), "192.0.2.10:80");
    assert_eq!(a.peer_addr().unwrap().to_string(), "192.0.2.10:80");
    assert_eq!(accel_entries(&m.pins.path, cookie), 2, "both ends in the map\n{}", m.agent.log_text());

    ping_pong(&a, &p, 2000);
    let (app_writes, proxy_writes) = bulk_both_ways(&a, &p, 8 << 20, 6 << 20);
    println!("non-blocking writes (short, EAGAIN): application {app_writes:?}, proxy {proxy_writes:?}");
    ping_pong(&a, &p, 50);
    let redirected = counter(&m.pins.path, "accel_msg_redirected") - redirected_before;
    let via_tcp = counter(&m.pins.path, "accel_msg_via_tcp");
    println!("sk_msg: {redirected} messages redirected, {via_tcp} via TCP");
    assert!(redirected >= 4100, "the messages did not go through sk_msg: {redirected}");

    // (b) half-close: the application ends its request; the proxy sees
    // EOF after the whole request, still answers, then closes.
    let (a2, p2) = connect_pair(&app, &l, "192.0.2.10:8080");
    assert_eq!(accel_entries(&m.pins.path, cookie), 4);
    let request = pattern(77, 300_000);
    let mut aw = &a2;
    aw.write_all(&request).unwrap();
    a2.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    (&p2).read_to_end(&mut got).unwrap();
    assert!(got == request, "request before EOF differs (first at {:?})", first_diff(&got, &request));
    let reply = pattern(78, 500_000);
    (&p2).write_all(&reply).unwrap();
    drop(p2);
    let mut back = Vec::new();
    (&a2).read_to_end(&mut back).unwrap();
    assert!(back == reply, "reply after half-close differs (first at {:?})", first_diff(&back, &reply));
    drop(a2);

    // Many short connections, each checked, then all closed: no entry left.
    for i in 0..50 {
        let (a, p) = connect_pair(&app, &l, "192.0.2.10:80");
        ping_pong(&a, &p, 3 + i % 5);
    }
    drop((a, p));
    let left = poll_until(|| accel_entries(&m.pins.path, cookie), |n| *n == 0);
    assert_eq!(left, 0, "closed sockets left in the acceleration map");
    let left = poll_until(|| Maps::open(&m.pins.path).unwrap().tracked_connections().unwrap().len(), |n| *n == 0);
    assert_eq!(left, 0);
}

/// (c) connections whose other end is not local are never put in the map
/// and work: an excluded destination (direct, over the veth), and an
/// inbound connection from the peer namespace delivered to the proxy.
/// (e) with acceleration off nothing is put in the map; switching it on
/// live accelerates the next connection.
#[test]
fn sockmap_only_for_local_app_proxy_pairs_and_only_when_on() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start_full(Topology::new("n").unwrap(), PLAIN, |_| Vec::new(), false);
    let app = m.topo.app.path();
    let cookie = netns_cookie(&app).unwrap();
    let l = proxy_listener(&app);
    let inspect = |pins: &Path| -> serde_json::Value {
        let out =
            std::process::Command::new(bin()).args(["inspect", "--json", "--pin-dir"]).arg(pins).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // (e) off by default.
    assert_eq!(inspect(&m.pins.path)["workloads"][0]["acceleration"], "none");
    let (a, p) = connect_pair(&app, &l, "192.0.2.10:80");
    assert_eq!(testkit::original_dst(&p).unwrap().to_string(), "192.0.2.10:80");
    ping_pong(&a, &p, 100);
    bulk_both_ways(&a, &p, 1 << 20, 1 << 20);
    assert_eq!(accel_entries(&m.pins.path, cookie), 0);
    assert_eq!(counter(&m.pins.path, "accel_socket_added"), 0);
    assert_eq!(counter(&m.pins.path, "accel_msg_redirected"), 0);

    // Switched on live: the next connection is accelerated, the open one
    // stays as it was (and keeps working).
    m.write_config(ACCEL);
    let on = poll_until(|| inspect(&m.pins.path)["workloads"][0]["acceleration"].clone(), |v| v == "sockmap");
    assert_eq!(on, "sockmap", "{}", m.agent.log_text());
    let (a2, p2) = connect_pair(&app, &l, "192.0.2.10:80");
    assert_eq!(accel_entries(&m.pins.path, cookie), 2);
    ping_pong(&a2, &p2, 100);
    ping_pong(&a, &p, 100);
    assert!(counter(&m.pins.path, "accel_msg_redirected") >= 200);

    // (c) not local: the excluded destination goes direct over the veth.
    let added = counter(&m.pins.path, "accel_socket_added");
    let direct = testkit::in_netns_as(&app, 1000, || {
        let mut s = TcpStream::connect_timeout(&"198.51.100.10:80".parse().unwrap(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        s.read_to_string(&mut line)?;
        std::io::Result::Ok(line)
    })
    .unwrap()
    .unwrap();
    assert!(direct.starts_with("direct 198.51.100.10:80"), "{direct}");
    // Inbound from the peer namespace to the pod, delivered to the proxy's
    // inbound listener by sk_lookup: its client is not on this side.
    let inbound = Server::proxy(&app, "0.0.0.0:15003".parse().unwrap()).unwrap();
    let got = poll_until(
        || testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, "198.18.0.1:8080".parse().unwrap()).unwrap(),
        |g| g.starts_with("proxy"),
    );
    assert!(got.starts_with("proxy 198.18.0.1:8080"), "{got}");
    // A local connection that was not redirected (127.0.0.1 passes).
    let local = testkit::probe(&app, 1000, Proto::Tcp, "127.0.0.1:8080".parse().unwrap()).unwrap();
    assert!(local.starts_with("direct 127.0.0.1:8080"), "{local}");
    drop(inbound);
    assert_eq!(counter(&m.pins.path, "accel_socket_added"), added, "a non-redirected connection was put in the map");
    assert_eq!(accel_entries(&m.pins.path, cookie), 2);

    // Off again: new connections are left alone.
    m.write_config(PLAIN);
    let off = poll_until(|| inspect(&m.pins.path)["workloads"][0]["acceleration"].clone(), |v| v == "none");
    assert_eq!(off, "none");
    let (a3, p3) = connect_pair(&app, &l, "192.0.2.10:80");
    ping_pong(&a3, &p3, 20);
    assert_eq!(accel_entries(&m.pins.path, cookie), 2, "only the connection made while on");
    drop((a, p, a2, p2, a3, p3));
    assert_eq!(poll_until(|| accel_entries(&m.pins.path, cookie), |n| *n == 0), 0);
}

/// Restarts and cleanup with accelerated connections open: programs on a
/// pinned map outlive the agent; a new agent replaces the sk_msg program
/// (one attached, never two); the old connection keeps its bytes intact
/// throughout; `cleanup` detaches it and leaves nothing once the last
/// accelerated connection has closed.
#[test]
fn sockmap_survives_restart_and_cleanup_detaches_it() {
    if !require_kernel() {
        return;
    }
    let mut m = Managed::start_full(Topology::new("t").unwrap(), ACCEL, |_| Vec::new(), false);
    let app = m.topo.app.path();
    let cookie = netns_cookie(&app).unwrap();
    let l = proxy_listener(&app);
    let sockhash = m.pins.path.join(map_names::ACCEL_SOCKETS);
    let attached = || {
        let fd = bpf::obj_get(&sockhash).unwrap();
        bpf::attached_ids(fd.as_fd(), AttachType::SkMsgVerdict).unwrap()
    };
    let first = attached();
    assert_eq!(first.len(), 1, "{first:?}");
    let (a, p) = connect_pair(&app, &l, "192.0.2.10:80");
    ping_pong(&a, &p, 100);

    // SIGKILL: still accelerated, same bytes.
    m.agent.child.kill().unwrap();
    m.agent.child.wait().unwrap();
    let before = counter(&m.pins.path, "accel_msg_redirected");
    ping_pong(&a, &p, 100);
    assert!(counter(&m.pins.path, "accel_msg_redirected") >= before + 200, "sk_msg stopped with the agent");
    assert_eq!(attached(), first);

    // A new agent: its program replaces the old one.
    let mut agent2 =
        AgentProcess::start(bin(), &m.config, &m._cgroup.path, &m.pins.path, &m.dir.join("agent2.log")).unwrap();
    agent2.wait_ready(bin(), &m.pins.path, &app).unwrap();
    // wait-ready already holds for the old agent's state: wait for this
    // agent's own load (sk_msg is attached before its links).
    let log = poll_until(|| agent2.log_text(), |l| l.contains("attached to cgroup"));
    assert!(log.contains("attached to cgroup"), "{log}");
    let second = attached();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first, "the new agent did not attach its own sk_msg");
    let (a2, p2) = connect_pair(&app, &l, "192.0.2.10:80");
    assert_eq!(accel_entries(&m.pins.path, cookie), 4);
    ping_pong(&a, &p, 100);
    ping_pong(&a2, &p2, 100);
    bulk_both_ways(&a, &p, 2 << 20, 2 << 20);
    agent2.stop();

    // cleanup: the program is detached from the map and the pins go.
    // Sockets still open keep the map (through their sk_msg program's
    // reference) and stay accelerated, with intact bytes, until they close;
    // new connections go direct. Once they close, everything is freed.
    let out = std::process::Command::new(bin()).args(["cleanup", "--pin-dir"]).arg(&m.pins.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!m.pins.path.exists());
    ping_pong(&a, &p, 100);
    ping_pong(&a2, &p2, 100);
    bulk_both_ways(&a2, &p2, 1 << 20, 1 << 20);
    // A link's detach follows its last reference, which the kernel may
    // drop a moment after the unpin: wait for it, as the restart test does.
    let direct = poll_until(
        || testkit::probe(&app, 1000, Proto::Tcp, "192.0.2.10:80".parse().unwrap()).unwrap(),
        |d| d.starts_with("direct"),
    );
    assert!(direct.starts_with("direct 192.0.2.10:80"), "{direct}");
    drop((a, p, a2, p2));
    let loaded =
        poll_until(|| second.iter().chain(&first).filter(|id| bpf::prog_by_id(**id).is_ok()).count(), |n| *n == 0);
    assert_eq!(loaded, 0, "sk_msg programs still loaded after cleanup and the last connection closed");
}
