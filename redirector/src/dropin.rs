//! The drop-in gate: the redirector image run with a mesh's own init
//! command line. A user who only swaps the init container's image through
//! the mesh's knob (Istio `values.global.proxy_init.image`, Linkerd
//! `proxyInit.image`, Kuma's init image) keeps the injector's command:
//! `istio-iptables …` (the image's entrypoint, redirector, gets it as its
//! first argument), `/usr/lib/linkerd/linkerd2-proxy-init …` and
//! `/usr/bin/kumactl install transparent-proxy …` (links to redirector in
//! the image). It programs nothing and needs no capability: it reads the
//! command line as the agent reads the pod's (`k8s::injector`), refuses
//! (exit 1) a setting redirector cannot honour, since nothing else would
//! redirect the pod then, and exits 0 only once redirection is in force
//! in its own network namespace, which it checks as Istio's validator
//! does: it listens where the policy sends a connection, makes one, and
//! reads the original destination back with `SO_ORIGINAL_DST`. The agent
//! socket is not needed, so the mesh's injector need not mount it.
use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use redirector_policy::{
    evaluate,
    k8s::{
        injector::{decide, program_name, Decision, InitContainer},
        pods::PodInfo,
    },
    LoopbackMode, OutboundConn, Policy, Protocol, Verdict,
};

/// How long to wait for the agent by default (`REDIRECTOR_GATE_TIMEOUT`
/// overrides it, in seconds).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `REDIRECTOR_GATE_TIMEOUT`: whole seconds, 1 to 86400 (a day, as the
/// CLI's durations); unset, [`DEFAULT_TIMEOUT`]. Zero would fail every
/// pod at once and a huge value overflows the deadline: both refused.
fn gate_timeout(v: Option<&str>) -> Result<Duration> {
    let Some(v) = v else { return Ok(DEFAULT_TIMEOUT) };
    match v.trim().parse::<u64>() {
        Ok(s @ 1..=86_400) => Ok(Duration::from_secs(s)),
        Ok(_) => Err(anyhow!("REDIRECTOR_GATE_TIMEOUT={v:?}: must be 1 to 86400 seconds")),
        Err(_) => Err(anyhow!("REDIRECTOR_GATE_TIMEOUT={v:?}: not a whole number of seconds")),
    }
}

/// The mesh command line this process was started with, if it is one.
pub fn mesh_argv(args: &[String]) -> Option<Vec<String>> {
    let first = args.first()?;
    match program_name(first) {
        "istio-iptables" | "linkerd2-proxy-init" | "proxy-init" | "kumactl" => Some(args.to_vec()),
        _ if args.get(1).is_some_and(|a| a == "istio-iptables") => Some(args[1..].to_vec()),
        _ => None,
    }
}

/// The policy the command line asks for, as the agent reads it.
pub fn policy_of(argv: &[String], env: BTreeMap<String, Option<String>>) -> Result<Policy> {
    let mut c = InitContainer { name: "drop-in".into(), command: argv.to_vec(), env, ..Default::default() };
    let mut pod = PodInfo { uid: "drop-in".into(), namespace: "-".into(), name: "-".into(), ..Default::default() };
    // Kuma's config files are the pod's annotations, mounted: read them.
    for a in argv {
        for flag in ["--config=", "--transparent-proxy-config="] {
            if let Some(path) = a.strip_prefix(flag) {
                for p in path.split(',') {
                    let text = std::fs::read_to_string(p).with_context(|| format!("{flag}{p}: reading the file"))?;
                    let key = format!("file:{p}");
                    c.downward_files.insert(p.to_string(), format!("metadata.annotations['{key}']"));
                    pod.annotations.insert(key, text);
                }
            }
        }
    }
    pod.init_containers = vec![c];
    match decide(&pod, &[]) {
        Decision::Injected { reading, tool, .. } => {
            log::info!("{tool} command line read: preset {}", reading.preset.name());
            Ok(redirector_policy::compile(&reading.mesh, &reading.annotations))
        }
        Decision::Refused { tool, problem, .. } => bail!(
            "{tool}: {problem}: redirector cannot redirect this pod as asked, and with this image nothing else \
             will; restore the mesh's own init image for it"
        ),
        other => bail!("not a mesh init command line redirector reads: {other:?}"),
    }
}

/// A connection the policy redirects, from which UID, and where it lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub uid: u32,
    pub dst: SocketAddrV4,
    pub lands: SocketAddrV4,
}

/// Chooses the probe: a connection the policy redirects that stays in the
/// pod if it is not redirected (the proxy's own connection to 127.0.0.6,
/// as Istio's validator makes it, where loopback connections of the proxy
/// go to its inbound port); otherwise one to a documentation address
/// (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) or the first address
/// of an inclusion range, as Linkerd's validator dials out. None if the
/// policy redirects nothing outbound.
pub fn choose_probe(p: &Policy, own_uid: u32) -> Option<Probe> {
    let mut dsts: Vec<Ipv4Addr> = Vec::new();
    if matches!(p.loopback, LoopbackMode::ToInbound | LoopbackMode::ProxyToInbound) && p.inbound {
        dsts.push(Ipv4Addr::new(127, 0, 0, 6));
    }
    dsts.extend([Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(198, 51, 100, 1), Ipv4Addr::new(203, 0, 113, 1)]);
    for n in p.outbound_ip_range_inclusion.iter().flatten() {
        if let IpAddr::V4(a) = n.network() {
            dsts.push(Ipv4Addr::from(u32::from(a).saturating_add(u32::from(n.prefix_len() < 32))));
        }
    }
    let uids = [p.proxy_uid, own_uid];
    for dst in dsts {
        for port in [15002u16, 20001, 80, 443, 8080] {
            for uid in uids {
                let gid = if uid == p.proxy_uid { p.proxy_gid.unwrap_or(uid) } else { uid };
                let c = OutboundConn {
                    src: None,
                    protocol: Protocol::Tcp,
                    uid,
                    gid,
                    dst: SocketAddr::V4(SocketAddrV4::new(dst, port)),
                    cgroup: 0,
                };
                if let Verdict::Redirect(SocketAddr::V4(to)) = evaluate(p, &c) {
                    if to.ip().is_loopback() && to.port() != port {
                        return Some(Probe { uid, dst: SocketAddrV4::new(dst, port), lands: to });
                    }
                }
            }
        }
    }
    None
}

/// One attempt: listen where the probe lands, connect as its UID (this
/// thread only), and read the original destination back.
fn attempt(probe: &Probe, listener: &TcpListener) -> Result<()> {
    let dst = probe.dst;
    let uid = probe.uid;
    let client = std::thread::spawn(move || -> Result<TcpStream> {
        if uid != 0 {
            // SAFETY: raw syscalls change only this thread's credentials.
            unsafe {
                if libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    return Err(std::io::Error::last_os_error()).context(format!("becoming UID {uid} to probe"));
                }
            }
        }
        TcpStream::connect_timeout(&SocketAddr::V4(dst), Duration::from_secs(1))
            .with_context(|| format!("connecting to {dst} as UID {uid}"))
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                if client.is_finished() {
                    // Connected elsewhere, or failed: nothing will arrive.
                    match listener.accept() {
                        Ok((s, _)) => break Some(s),
                        Err(_) => break None,
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => break None,
        }
    };
    let mut conn = client.join().map_err(|_| anyhow!("probe thread panicked"))??;
    let Some(accepted) = accepted else {
        bail!("{dst} was not redirected to {}: reached {}", probe.lands, conn.peer_addr()?)
    };
    let got = original_dst(&accepted)?;
    let _ = conn.write_all(b"redirector gate\n");
    if got != dst {
        bail!("redirected, but SO_ORIGINAL_DST answers {got}, not {dst}");
    }
    Ok(())
}

fn original_dst(s: &TcpStream) -> Result<SocketAddrV4> {
    // SAFETY: getsockopt into a properly sized sockaddr_in.
    unsafe {
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::getsockopt(s.as_raw_fd(), libc::SOL_IP, 80, (&raw mut sa).cast(), &mut len);
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("SO_ORIGINAL_DST");
        }
        Ok(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port)))
    }
}

/// Runs the drop-in gate for `argv` (a mesh's init command line).
pub fn run(argv: &[String]) -> Result<()> {
    let env: BTreeMap<String, Option<String>> = std::env::vars().map(|(k, v)| (k, Some(v))).collect();
    let timeout = gate_timeout(std::env::var("REDIRECTOR_GATE_TIMEOUT").ok().as_deref())?;
    let policy = policy_of(argv, env)?;
    // SAFETY: getuid cannot fail.
    let own_uid = unsafe { libc::getuid() };
    let Some(probe) = choose_probe(&policy, own_uid) else {
        println!("ready: the command line redirects no outbound connection; nothing to wait for");
        return Ok(());
    };
    let listener = TcpListener::bind(probe.lands).with_context(|| format!("listening on {}", probe.lands))?;
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    loop {
        let last = match attempt(&probe, &listener) {
            Ok(()) => {
                println!(
                    "ready: {} as UID {} reached {} and read its original destination back",
                    probe.dst, probe.uid, probe.lands
                );
                return Ok(());
            }
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= timeout {
            bail!("redirection not in force after {timeout:?} (is the redirector agent running on this node?): {last}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_timeout_is_refused_outside_one_second_to_a_day() {
        assert_eq!(gate_timeout(None).unwrap(), DEFAULT_TIMEOUT);
        assert_eq!(gate_timeout(Some("90")).unwrap(), Duration::from_secs(90));
        for (bad, why) in
            [("0", "1 to 86400"), ("86401", "1 to 86400"), ("-1", "whole number"), ("30s", "whole number")]
        {
            let e = gate_timeout(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("REDIRECTOR_GATE_TIMEOUT") && e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_meshes_command_lines_are_drop_ins() {
        assert!(mesh_argv(&argv(&["/usr/local/bin/redirector", "istio-iptables", "-p", "15001"])).is_some());
        assert!(mesh_argv(&argv(&["/usr/lib/linkerd/linkerd2-proxy-init", "--proxy-uid", "2102"])).is_some());
        assert!(mesh_argv(&argv(&["/usr/bin/kumactl", "install", "transparent-proxy"])).is_some());
        assert!(mesh_argv(&argv(&["redirector", "run"])).is_none());
    }

    #[test]
    fn probes_stay_in_the_pod_where_they_can() {
        let istio = argv(&["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-b", "*"]);
        let p = policy_of(&istio, BTreeMap::new()).unwrap();
        let probe = choose_probe(&p, 0).unwrap();
        assert_eq!(
            probe,
            Probe { uid: 1337, dst: "127.0.0.6:15002".parse().unwrap(), lands: "127.0.0.1:15006".parse().unwrap() }
        );
        // Linkerd returns every loopback route: out to a documentation address.
        let linkerd = argv(&[
            "linkerd2-proxy-init",
            "--incoming-proxy-port",
            "4143",
            "--outgoing-proxy-port",
            "4140",
            "--proxy-uid",
            "2102",
        ]);
        let p = policy_of(&linkerd, BTreeMap::new()).unwrap();
        let probe = choose_probe(&p, 0).unwrap();
        assert_eq!((probe.uid, probe.lands), (0, "127.0.0.1:4140".parse().unwrap()));
        assert!(probe.dst.ip().octets()[..3] == [192, 0, 2], "{probe:?}");
        // Istio with an include list: inside it.
        let only = argv(&["istio-iptables", "-u", "1337", "-i", "198.51.100.0/24", "-b", ""]);
        let probe = choose_probe(&policy_of(&only, BTreeMap::new()).unwrap(), 0).unwrap();
        assert_eq!(probe.dst.ip().octets()[..3], [198, 51, 100]);
        // What the agent refuses, the gate refuses.
        let e = policy_of(&argv(&["istio-iptables", "-m", "TPROXY"]), BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("TPROXY") && e.contains("nothing else"), "{e}");
    }
}
