//! Connection mechanics: tracking entries released on close under churn,
//! non-blocking reconnects and TCP Fast Open.
use super::*;

/// Reads the one-line answer from a connected raw socket.
fn read_answer(fd: libc::c_int) -> String {
    let mut buf = [0u8; 256];
    let mut out = Vec::new();
    loop {
        // SAFETY: reading into a local buffer from a socket we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
        if out.ends_with(b"\n") {
            break;
        }
    }
    String::from_utf8_lossy(&out).trim().to_string()
}

fn sockaddr4(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// Original-destination entries live exactly as long as their sockets:
/// after hundreds of thousands of redirected connections (opened, answered,
/// closed, from two threads), the tracking map is back to its baseline.
/// `REDIRECTOR_CHURN_CONNECTIONS` sets the count (default 200,000; the
/// kernel-VM runner, under emulation, uses fewer).
#[test]
fn connection_churn_leaves_no_tracking_entries() {
    if !require_kernel() {
        return;
    }
    let total: u64 = std::env::var("REDIRECTOR_CHURN_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let m = Managed::start("h", EXCLUSIONS);
    let tracked = || Maps::open(&m.pins.path).unwrap().tracked_connections().unwrap().len();
    let baseline = tracked();
    let started = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let file = std::fs::File::open(m.topo.app.path()).unwrap();
            std::thread::spawn(move || {
                use std::io::Read as _;
                redirector::sys::netns::enter_netns(&file).unwrap();
                // SAFETY: raw syscalls change only this thread's credentials.
                unsafe {
                    assert_eq!(libc::syscall(libc::SYS_setresgid, 1000, 1000, 1000), 0);
                    assert_eq!(libc::syscall(libc::SYS_setresuid, 1000, 1000, 1000), 0);
                }
                let dst: std::net::SocketAddr = "192.0.2.10:80".parse().unwrap();
                let (mut proxied, mut other) = (0u64, Vec::new());
                for _ in 0..total / 2 {
                    let r = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)).and_then(|mut s| {
                        let mut t = String::new();
                        s.read_to_string(&mut t)?;
                        Ok(t)
                    });
                    match r {
                        Ok(t) if t.starts_with("proxy 192.0.2.10:80") => proxied += 1,
                        Ok(t) => other.push(t),
                        Err(e) => other.push(e.to_string()),
                    }
                }
                (proxied, other)
            })
        })
        .collect();
    let (mut proxied, mut other) = (0, Vec::new());
    for w in workers {
        let (p, o) = w.join().unwrap();
        proxied += p;
        other.extend(o);
    }
    let elapsed = started.elapsed();
    let left = poll_until(tracked, |n| *n == baseline);
    println!("connection churn: {proxied} of {total} proxied in {elapsed:?}; tracking entries {baseline} before, {left} after");
    assert!(other.is_empty(), "{} connections not proxied, e.g. {:?}", other.len(), &other[..other.len().min(5)]);
    assert_eq!(proxied, total / 2 * 2);
    assert_eq!(left, baseline, "original-destination entries outlived their sockets");
}

/// Socket-API paths into connect(): non-blocking connect, a socket that
/// connects, disconnects (AF_UNSPEC) and connects again elsewhere, and TCP
/// Fast Open (`sendto(MSG_FASTOPEN)`, no connect() call at all). Each must
/// reach the proxy with its own original destination.
#[test]
fn nonblocking_reconnect_and_fastopen_are_redirected() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("s", EXCLUSIONS);
    let results = testkit::in_netns_as(&m.topo.app.path(), 1000, || {
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let first = sockaddr4("192.0.2.10:80".parse().unwrap());
        let second = sockaddr4("192.0.2.10:8080".parse().unwrap());
        let mut out = Vec::new();
        // SAFETY: plain socket syscalls on sockets this closure owns.
        unsafe {
            // Non-blocking connect: EINPROGRESS, then writable.
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            let rc = libc::connect(fd, (&first as *const libc::sockaddr_in).cast(), len);
            let errno = std::io::Error::last_os_error().raw_os_error();
            let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
            libc::poll(&mut pfd, 1, 2000);
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            out.push((
                "non-blocking connect",
                format!("rc {rc} errno {errno:?}: {}", read_answer(fd)),
                "proxy 192.0.2.10:80",
            ));
            libc::close(fd);

            // connect, AF_UNSPEC disconnect, connect to another destination.
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            libc::connect(fd, (&first as *const libc::sockaddr_in).cast(), len);
            let a1 = read_answer(fd);
            let unspec = libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
            let rc = libc::connect(fd, &unspec, size_of::<libc::sockaddr>() as libc::socklen_t);
            let rc2 = libc::connect(fd, (&second as *const libc::sockaddr_in).cast(), len);
            let err2 = std::io::Error::last_os_error();
            let a2 = if rc2 == 0 { read_answer(fd) } else { format!("second connect failed: {err2}") };
            out.push(("connect #1", a1, "proxy 192.0.2.10:80"));
            out.push(("disconnect + connect #2", format!("unspec rc {rc}; {a2}"), "proxy 192.0.2.10:8080"));
            libc::close(fd);

            // TCP Fast Open: the destination comes with the first data.
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let msg = b"hello";
            let rc = libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_FASTOPEN,
                (&first as *const libc::sockaddr_in).cast(),
                len,
            );
            let err = std::io::Error::last_os_error();
            let a = if rc >= 0 { read_answer(fd) } else { format!("sendto failed: {err}") };
            out.push(("sendto(MSG_FASTOPEN)", a, "proxy 192.0.2.10:80"));
            libc::close(fd);
        }
        out
    })
    .unwrap();
    let mut bad = Vec::new();
    for (what, got, want) in &results {
        println!("{what:<26} {got}");
        if !got.contains(want) {
            bad.push(format!("{what}: {got} (expected {want})"));
        }
    }
    assert!(bad.is_empty(), "{}\nagent log:\n{}", bad.join("\n"), m.agent.log_text());
}
