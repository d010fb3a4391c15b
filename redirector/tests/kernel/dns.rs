//! DNS capture (`mesh.dnsCapture`, istio-iptables' `--redirect-dns`)
//! against istio-iptables' own DNS rules (the `dns-uid-gid` golden's
//! `ISTIO_OUTPUT` owner RETURNs and `ISTIO_OUTPUT_DNS` chain, for one proxy
//! UID/GID and this test's nameserver): in each of two workloads a DNS
//! stand-in listens where pilot-agent's DNS proxy does (127.0.0.1:15053,
//! UDP and TCP), a "real" nameserver answers in the peer namespace, and the
//! same queries must get the same answers, from the address they were
//! sent to. The workload's resolv.conf (`/etc/netns/NAME/resolv.conf`,
//! what `ip netns exec` shows) lists 198.51.100.53 only.
use std::net::{Ipv4Addr, SocketAddr};

use redirector::dataplane::Maps;
use redirector_common::counter;
use redirector_testkit::{
    dns::{query, Via},
    Proto, Server, Topology,
};

use super::{require_kernel, Managed};

/// The nameserver of resolv.conf, and one it does not list.
const NAMESERVER: &str = "198.51.100.53";
const OTHER_SERVER: &str = "198.51.100.54";
/// What the proxy's DNS listener answers, and what the real nameservers do.
const FROM_PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 153);
const FROM_REAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);

const CONFIG: &str = r#"
mesh:
  preset: istio
  dnsCapture: true
workloads:
  - name: app
    netns: {netns}
"#;

/// The DNS servers of a workload: the stand-in on the proxy's port, the
/// real ones on the peer's side; and its resolv.conf.
fn dns_servers(topo: &Topology) -> Vec<Server> {
    for ip in [NAMESERVER, OTHER_SERVER] {
        topo.peer.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]).unwrap();
    }
    let mut servers = Vec::new();
    let (u, t) = Server::dns(&topo.app.path(), "127.0.0.1:15053".parse().unwrap(), FROM_PROXY).unwrap();
    servers.extend([u, t]);
    // Each bound to its address, so its replies come from it.
    for ip in [NAMESERVER, OTHER_SERVER] {
        let (u, t) = Server::dns(&topo.peer.path(), format!("{ip}:53").parse().unwrap(), FROM_REAL).unwrap();
        servers.extend([u, t]);
    }
    // The outbound listener, where TCP the DNS rules leave goes.
    servers.push(Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap());
    let dir = resolv_dir(topo);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("resolv.conf"), format!("nameserver {NAMESERVER}\noptions timeout:2 attempts:1\n"))
        .unwrap();
    servers
}

fn resolv_dir(topo: &Topology) -> std::path::PathBuf {
    std::path::Path::new("/etc/netns").join(&topo.app.name)
}

/// Removes a workload's `/etc/netns/NAME` on drop.
struct ResolvConf(std::path::PathBuf);

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every case, as one line per query: who asks, how, whom, and the reply.
fn answers(topo: &Topology) -> Vec<String> {
    let ns = topo.app.path();
    let mut out = Vec::new();
    for (who, uid) in [("app", 1000u32), ("proxy", 1337)] {
        for server in [NAMESERVER, OTHER_SERVER] {
            for via in [Via::Udp, Via::UdpConnected, Via::Tcp] {
                let to: SocketAddr = format!("{server}:53").parse().unwrap();
                let got = query(&ns, uid, to, via).map_or_else(|e| format!("error: {e:#}"), |r| r.to_string());
                out.push(format!("{who} {via:?} to {to}: {got}"));
            }
        }
    }
    // Other UDP is left alone.
    let udp = redirector_testkit::probe(&ns, 1000, Proto::Udp, "192.0.2.10:5353".parse().unwrap()).unwrap();
    out.push(format!("app udp to 192.0.2.10:5353: {udp}"));
    // A real resolver (glibc through resolv.conf; dig from bind9), where
    // the machine has them (the kernel-VM guest has neither).
    for (who, uid) in [("app", "1000"), ("proxy", "1337")] {
        let as_uid = ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"];
        if which("getent") {
            let mut argv = as_uid.to_vec();
            argv.extend(["getent", "ahostsv4", "svc.example.test"]);
            let got = topo.app.exec(&argv).unwrap_or_else(|e| format!("error: {e:#}"));
            out.push(format!(
                "{who} getent: {}",
                got.lines().next().unwrap_or("").split_whitespace().next().unwrap_or("")
            ));
        }
        if which("dig") {
            for tcp in ["+notcp", "+tcp"] {
                let mut argv = as_uid.to_vec();
                let at = format!("@{NAMESERVER}");
                argv.extend(["dig", "+short", "+tries=1", "+time=2", tcp, at.as_str(), "svc.example.test", "A"]);
                let got = topo.app.exec(&argv).unwrap_or_else(|e| format!("error: {e:#}"));
                out.push(format!("{who} dig {tcp}: {}", got.trim()));
            }
        }
    }
    out
}

fn which(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn dns_capture_answers_as_istio_iptables_does() {
    if !require_kernel() {
        return;
    }
    let ipt = Topology::new("di").unwrap();
    let _ipt_resolv = ResolvConf(resolv_dir(&ipt));
    let _ipt_servers = dns_servers(&ipt);
    ipt.app.shell(&redirector_testkit::dns::istio_dns_rules(NAMESERVER, 1337)).expect("istio-iptables' DNS rules");
    let topo = Topology::new("db").unwrap();
    let _resolv = ResolvConf(resolv_dir(&topo));
    let bpf = Managed::start_full(topo, CONFIG, dns_servers, false);
    let maps = Maps::open(&bpf.pins.path).unwrap();
    let count = |i: u32| maps.counter(i).unwrap();
    let before = (count(counter::DNS_REDIRECTED), count(counter::DNS_REPLY_RESTORED));
    let want = answers(&ipt);
    let got = answers(&bpf.topo);
    let mut failures = Vec::new();
    for (w, g) in want.iter().zip(&got) {
        println!("iptables: {w:<80} redirector: {g}");
        if w != g {
            failures.push(format!("iptables: {w}\n  redirector: {g}"));
        }
    }
    assert!(failures.is_empty(), "redirector differs:\n{}\nagent log:\n{}", failures.join("\n"), bpf.agent.log_text());
    // What the cases must show, whoever answered them.
    let line = |prefix: &str| want.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}"));
    for via in ["Udp", "UdpConnected", "Tcp"] {
        let to_ns = format!("app {via} to {NAMESERVER}:53: ");
        assert_eq!(
            *line(&to_ns),
            format!("{to_ns}A {FROM_PROXY} from {NAMESERVER}:53"),
            "captured, shown from the nameserver"
        );
        // Not in resolv.conf: UDP direct, TCP to the outbound listener as
        // any other TCP (the stand-in answers "proxy <original dst>").
        let other = format!("app {via} to {OTHER_SERVER}:53: ");
        if via == "Tcp" {
            let to_outbound = format!("no DNS reply over TCP; the peer sent \"proxy {OTHER_SERVER}:53");
            assert!(line(&other).contains(&to_outbound), "{}", line(&other));
        } else {
            assert_eq!(*line(&other), format!("{other}A {FROM_REAL} from {OTHER_SERVER}:53"), "not listed: direct");
        }
        let proxy = format!("proxy {via} to {NAMESERVER}:53: ");
        assert_eq!(*line(&proxy), format!("{proxy}A {FROM_REAL} from {NAMESERVER}:53"), "the proxy's own: direct");
    }
    assert!(line("app udp to 192.0.2.10:5353").contains("direct udp"), "{}", line("app udp"));
    if which("getent") {
        assert_eq!(*line("app getent"), format!("app getent: {FROM_PROXY}"));
        assert_eq!(*line("proxy getent"), format!("proxy getent: {FROM_REAL}"));
    }
    if which("dig") {
        assert_eq!(*line("app dig +notcp"), format!("app dig +notcp: {FROM_PROXY}"));
        assert_eq!(*line("app dig +tcp"), format!("app dig +tcp: {FROM_PROXY}"));
    }
    let redirected = count(counter::DNS_REDIRECTED) - before.0;
    let restored = count(counter::DNS_REPLY_RESTORED) - before.1;
    assert!(redirected >= 3 && restored >= 2, "dns_redirected +{redirected}, dns_reply_restored +{restored}");
    // DNS capture's programs are attached while a workload asks for it,
    // and detached once none does: with the option off nothing of it is
    // attached, and the application's queries go to the nameserver.
    let links = |names: &[&str]| names.iter().filter(|n| bpf.pins.path.join("links").join(n).exists()).count();
    let dns_links =
        ["rdr_dns_connect4", "rdr_dns_connect6", "rdr_sendmsg4", "rdr_sendmsg6", "rdr_recvmsg4", "rdr_recvmsg6"];
    assert_eq!(links(&dns_links), 6);
    bpf.write_config(&CONFIG.replace("  dnsCapture: true\n", ""));
    let gone = super::poll_until(|| links(&dns_links), |n| *n == 0);
    assert_eq!(gone, 0, "DNS links still pinned with DNS capture off:\n{}", bpf.agent.log_text());
    let to: SocketAddr = format!("{NAMESERVER}:53").parse().unwrap();
    let got = super::poll_until(
        || query(&bpf.topo.app.path(), 1000, to, Via::UdpConnected).map(|r| r.a).ok(),
        |a| *a == Some(FROM_REAL),
    );
    assert_eq!(got, Some(FROM_REAL), "DNS capture off: the nameserver answers");
    assert_eq!(links(&["rdr_connect4", "rdr_sockops"]), 2, "the rest stays attached");
}

/// IPv6 nameservers, and IPv4 ones asked from an AF_INET6 socket
/// (IPv4-mapped): captured as their own family (the IPv4-mapped one as the
/// IPv4 address it carries, to `::ffff:127.0.0.1`), the reply shown from
/// the address asked; the proxy's own queries go out.
#[test]
fn dns_capture_ipv6_and_v4_mapped() {
    if !require_kernel() {
        return;
    }
    const NAMESERVER6: &str = "2001:db8:53::53";
    let topo = Topology::new("d6").unwrap();
    let (link, plink) = (topo.app_link.clone(), topo.peer_link.clone());
    topo.app.exec(&["ip", "addr", "add", "2001:db8::1/64", "dev", link.trim(), "nodad"]).unwrap();
    topo.app.exec(&["ip", "-6", "route", "add", "default", "via", "2001:db8::2"]).unwrap();
    topo.peer.exec(&["ip", "addr", "add", "2001:db8::2/64", "dev", plink.trim(), "nodad"]).unwrap();
    topo.peer.exec(&["ip", "addr", "add", &format!("{NAMESERVER6}/128"), "dev", "lo"]).unwrap();
    let _resolv = ResolvConf(resolv_dir(&topo));
    let m = Managed::start_full(
        topo,
        CONFIG,
        |t| {
            let mut servers = dns_servers(t);
            let (u, tcp) = Server::dns(&t.app.path(), "[::1]:15053".parse().unwrap(), FROM_PROXY).unwrap();
            servers.extend([u, tcp]);
            let (u, tcp) =
                Server::dns(&t.peer.path(), format!("[{NAMESERVER6}]:53").parse().unwrap(), FROM_REAL).unwrap();
            servers.extend([u, tcp]);
            std::fs::write(
                resolv_dir(t).join("resolv.conf"),
                format!("nameserver {NAMESERVER}\nnameserver {NAMESERVER6}\n"),
            )
            .unwrap();
            servers
        },
        false,
    );
    let ns = m.topo.app.path();
    let ask = |uid: u32, to: &str, via: Via| {
        let to: SocketAddr = to.parse().unwrap();
        query(&ns, uid, to, via).map_or_else(|e| format!("error: {e:#}"), |r| r.to_string())
    };
    let v6 = format!("[{NAMESERVER6}]:53");
    let mapped = format!("[::ffff:{NAMESERVER}]:53");
    for via in [Via::Udp, Via::UdpConnected, Via::Tcp] {
        assert_eq!(ask(1000, &v6, via), format!("A {FROM_PROXY} from {v6}"), "{via:?}\n{}", m.agent.log_text());
        assert_eq!(ask(1337, &v6, via), format!("A {FROM_REAL} from {v6}"), "the proxy's own, {via:?}");
        assert_eq!(ask(1000, &mapped, via), format!("A {FROM_PROXY} from {mapped}"), "IPv4-mapped, {via:?}");
    }
    // An IPv6 address resolv.conf does not list is left alone.
    let other6 = "[2001:db8:53::54]:53";
    assert!(ask(1000, other6, Via::UdpConnected).starts_with("error"), "not listed: direct (nothing there)");
}
