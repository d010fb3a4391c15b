//! `SO_ORIGINAL_DST` on connections that nothing redirected, answered as
//! conntrack answers them, checked with a proxy that stops serving when the
//! answer fails, as squid 5 in intercept mode does.
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use super::*;

const OSM: &str = r#"
mesh:
  preset: osm
workloads:
  - name: app
    netns: {netns}
"#;

/// A connection that reaches the proxy's port without being redirected (a
/// process of the pod dialing 127.0.0.1:15001, a peer dialing podIP:15003)
/// gets its own local address as the original destination, as conntrack
/// answers for a connection it did not NAT, in IPv4 and IPv6. The
/// squid-like proxy answers those "403 forwarding loop" and goes on
/// serving redirected connections with their original destinations; with
/// ENOENT it would have stopped accepting after the first. A socket outside
/// the workloads keeps the kernel's answer.
#[test]
fn unredirected_connections_get_their_own_address() {
    if !require_kernel() {
        return;
    }
    let topo = Topology::new("od").unwrap();
    let (link, plink) = (topo.app_link.clone(), topo.peer_link.clone());
    topo.app.exec(&["ip", "addr", "add", "2001:db8::1/64", "dev", &link, "nodad"]).unwrap();
    topo.app.exec(&["ip", "-6", "route", "add", "default", "via", "2001:db8::2"]).unwrap();
    topo.peer.exec(&["ip", "addr", "add", "2001:db8::2/64", "dev", &plink, "nodad"]).unwrap();
    let m = Managed::start_full(topo, OSM, |_| Vec::new(), false);
    let app = m.topo.app.path();
    let peer = m.topo.peer.path();
    // The proxies start after the agent: sockops registers the inbound one.
    let mut proxies = Vec::new();
    for addr in ["127.0.0.1:15001", "[::1]:15001", "[::]:15003"] {
        let stopped = Arc::new(AtomicBool::new(false));
        let server = Server::intercepting(&app, addr.parse().unwrap(), stopped.clone()).unwrap();
        proxies.push((addr, stopped, server));
    }
    let pod = testkit::addrs::POD_IP;
    // (name, from the workload, destination, expected start of the answer)
    let cases = [
        ("app dials 127.0.0.1:15001", true, "127.0.0.1:15001".to_string(), "403 forwarding loop 127.0.0.1:15001"),
        ("then a redirected connection", true, "192.0.2.10:80".into(), "proxy 192.0.2.10:80"),
        ("app dials [::1]:15001", true, "[::1]:15001".into(), "403 forwarding loop [::1]:15001"),
        ("then a redirected IPv6 one", true, "[2001:db8:1::10]:9443".into(), "proxy [2001:db8:1::10]:9443"),
        ("app dials 127.0.0.1:15003", true, "127.0.0.1:15003".into(), "403 forwarding loop 127.0.0.1:15003"),
        ("peer dials podIP:15003", false, format!("{pod}:15003"), "403 forwarding loop 198.18.0.1:15003"),
        (
            "peer dials [2001:db8::1]:15003",
            false,
            "[2001:db8::1]:15003".into(),
            "403 forwarding loop [2001:db8::1]:15003",
        ),
        ("then inbound to podIP:8080", false, format!("{pod}:8080"), "proxy 198.18.0.1:8080"),
        ("then inbound to [2001:db8::1]:8080", false, "[2001:db8::1]:8080".into(), "proxy [2001:db8::1]:8080"),
        ("peer dials podIP:15001 (captured)", false, format!("{pod}:15001"), "proxy 198.18.0.1:15001"),
        ("and a last redirected one", true, "192.0.2.10:8080".into(), "proxy 192.0.2.10:8080"),
    ];
    let mut failures = Vec::new();
    for (name, from_app, dst, want) in &cases {
        let ns = if *from_app { &app } else { &peer };
        let dst: std::net::SocketAddr = dst.parse().unwrap();
        let probe = || testkit::probe(ns, 1000, Proto::Tcp, dst).unwrap();
        // (the first inbound IPv6 SYN may wait for neighbour discovery)
        let got = if *from_app { probe() } else { poll_until(probe, |g| !g.starts_with("error")) };
        println!("{name:<38} {got}");
        if !got.starts_with(&format!("{want} from ")) {
            failures.push(format!("{name}: {got:?}, expected {want:?}"));
        }
    }
    let stopped: Vec<_> = proxies.iter().filter(|(_, s, _)| s.load(Ordering::SeqCst)).map(|(a, _, _)| *a).collect();
    assert!(
        failures.is_empty() && stopped.is_empty(),
        "{failures:#?}\nproxies that stopped accepting: {stopped:?}\nagent log:\n{}",
        m.agent.log_text()
    );
    let counters = Maps::open(&m.pins.path).unwrap().counters().unwrap();
    let count = |name: &str| counters.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    // The three loopback dials; the peer's to :15003 are inbound
    // connections sockops recorded, as before.
    assert_eq!(count("orig_dst_own_address"), Some(3), "{counters:?}");

    // Outside the workloads nothing changes: without a conntrack entry the
    // kernel says ENOENT, and the squid-like proxy stops accepting.
    let stopped = Arc::new(AtomicBool::new(false));
    let _outside = Server::intercepting(&peer, "127.0.0.1:15001".parse().unwrap(), stopped.clone()).unwrap();
    let got = testkit::probe(&peer, 0, Proto::Tcp, "127.0.0.1:15001".parse().unwrap()).unwrap();
    let stopped = poll_until(|| stopped.load(Ordering::SeqCst), |s| *s);
    assert!(stopped, "a proxy outside the workloads got an original destination: {got}");
    let counters = Maps::open(&m.pins.path).unwrap().counters().unwrap();
    let own = counters.iter().find(|(n, _)| *n == "orig_dst_own_address").map(|(_, v)| *v);
    assert_eq!(own, Some(3), "answered outside the workloads: {counters:?}");
}

/// Who the proxy sees as the client of a redirected connection, and what
/// the application sees as its own address. Under iptables REDIRECT the
/// application's socket keeps the source routing chose for the original
/// destination (the pod's address); connect4 rewrites the destination
/// before a source is chosen, so under redirector both see 127.0.0.1.
/// docs/architecture.md ("Client address") says why this is not matched
/// and what it means for proxies that log or filter by client address;
/// this test keeps that page true. The application's peer is what it
/// dialed under both.
#[test]
fn redirected_client_address_is_loopback_not_the_pod_address() {
    if !require_kernel() {
        return;
    }
    let never = || Arc::new(AtomicBool::new(false));
    // osm-init's rules for the same config, and the same proxy.
    let reference = Topology::new("ci").unwrap();
    let cfg = parse_config(&render(OSM, &reference.app.path())).unwrap();
    reference.app.shell(&osm_init_script(&compile(&cfg.mesh, &cfg.workloads[0].annotations))).unwrap();
    let _ref_proxy = Server::intercepting(&reference.app.path(), "127.0.0.1:15001".parse().unwrap(), never()).unwrap();
    let m = Managed::start_full(Topology::new("cr").unwrap(), OSM, |_| Vec::new(), false);
    let _proxy = Server::intercepting(&m.topo.app.path(), "127.0.0.1:15001".parse().unwrap(), never()).unwrap();
    let connect = |ns: &Path| {
        testkit::in_netns_as(ns, 1000, || {
            use std::io::Read as _;
            let mut s = std::net::TcpStream::connect("192.0.2.10:80").unwrap();
            let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            (reply.trim().to_string(), local, peer)
        })
        .unwrap()
    };
    let pod = testkit::addrs::POD_IP;
    let (reply, local, peer) = connect(&reference.app.path());
    println!("iptables:   app {local} -> peer {peer}; proxy: {reply}");
    assert_eq!(reply, format!("proxy 192.0.2.10:80 from {local}"));
    assert_eq!((local.ip().to_string(), peer.to_string()), (pod.to_string(), "192.0.2.10:80".to_string()));
    let (reply, local, peer) = connect(&m.topo.app.path());
    println!("redirector: app {local} -> peer {peer}; proxy: {reply}");
    assert_eq!(reply, format!("proxy 192.0.2.10:80 from {local}"));
    assert_eq!((local.ip().to_string(), peer.to_string()), ("127.0.0.1".to_string(), "192.0.2.10:80".to_string()));
}
