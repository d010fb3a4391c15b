//! IPv6 and IPv4-mapped destinations are decided and redirected without a
//! bypass.
use super::*;

const DUAL_STACK: &str = r#"
mesh:
  outboundIPRangeExclusionList: ["2001:db8:2::/64", "203.0.113.0/25"]
workloads:
  - name: app
    netns: {netns}
"#;

#[test]
fn ipv6_and_v4_mapped_are_redirected_without_bypass() {
    if !require_kernel() {
        return;
    }
    let topo = Topology::new("v6").unwrap();
    // IPv6 on the veth (no DAD wait), remotes on the peer's lo.
    let (link, plink) = (topo.app_link.clone(), topo.peer_link.clone());
    topo.app.exec(&["ip", "addr", "add", "2001:db8::1/64", "dev", link.trim(), "nodad"]).unwrap();
    topo.app.exec(&["ip", "-6", "route", "add", "default", "via", "2001:db8::2"]).unwrap();
    topo.peer.exec(&["ip", "addr", "add", "2001:db8::2/64", "dev", plink.trim(), "nodad"]).unwrap();
    for a in ["2001:db8:1::10/128", "2001:db8:2::10/128"] {
        topo.peer.exec(&["ip", "addr", "add", a, "dev", "lo"]).unwrap();
    }
    let ap = topo.app.path();
    let _remote = Server::tcp(&topo.peer.path(), "[::]:9443".parse().unwrap()).unwrap();
    let m = Managed::start_with(topo, DUAL_STACK, |t| {
        vec![
            Server::tcp(&t.app.path(), "[::1]:8081".parse().unwrap()).unwrap(),
            Server::proxy(&t.app.path(), "[::1]:15001".parse().unwrap()).unwrap(),
        ]
    });
    // The inbound proxy starts after the agent: sockops registers it.
    let _in6 = Server::proxy(&ap, "[::]:15003".parse().unwrap()).unwrap();

    let got = m.probe(1000, "[2001:db8:1::10]:9443");
    assert!(got.starts_with("proxy [2001:db8:1::10]:9443 | peer [2001:db8:1::10]:9443"), "IPv6 outbound: {got}");
    let got = m.probe(1000, "[2001:db8:2::10]:9443");
    assert!(got.starts_with("direct [2001:db8:2::10]:9443"), "IPv6 CIDR exclusion: {got}");
    // IPv4-mapped: decided as the IPv4 address, sent to ::ffff:127.0.0.1,
    // the proxy asks SOL_IP; the application still sees what it dialed.
    let got = m.probe(1000, "[::ffff:192.0.2.10]:80");
    assert!(got.starts_with("proxy 192.0.2.10:80 | peer [::ffff:192.0.2.10]:80"), "v4-mapped: {got}");
    let got = m.probe(1000, "[::ffff:203.0.113.10]:80");
    assert!(got.starts_with("direct"), "v4-mapped must not bypass... nor be redirected when excluded: {got}");
    let got = m.probe(1000, "[::ffff:127.0.0.1]:8080");
    assert!(got.starts_with("direct"), "v4-mapped 127.0.0.1 is 127.0.0.1: {got}");
    let got = m.probe(1000, "[::1]:8081");
    assert!(got.starts_with("direct [::1]:8081"), "::1 is like 127.0.0.1: {got}");
    let got = m.probe(1500, "[2001:db8:1::10]:9443");
    assert!(got.starts_with("direct"), "proxy UID over IPv6: {got}");
    // Inbound over IPv6 and (dual-stack listener) IPv4.
    let got = poll_until(
        || testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, "[2001:db8::1]:8080".parse().unwrap()).unwrap(),
        |g| g.starts_with("proxy"),
    );
    assert!(got.starts_with("proxy [2001:db8::1]:8080"), "IPv6 inbound: {got}\n{}", m.agent.log_text());
    let pod = testkit::addrs::POD_IP;
    let got = testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, format!("{pod}:8080").parse().unwrap()).unwrap();
    assert!(got.starts_with(&format!("proxy {pod}:8080")), "IPv4 inbound to a [::] proxy: {got}");

    // An IPv6 inclusion list, applied live: only 2001:db8:1::/64 goes to
    // the proxy, in either family nothing else does.
    m.write_config(DUAL_STACK_INCLUSION);
    // (192.0.2.10 was redirected under the previous config: wait for it.)
    let got = m.probe_until(1000, "192.0.2.10:80", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct"), "IPv4 outside an IPv6-only inclusion list: {got}");
    let got = m.probe(1000, "[2001:db8:2::10]:9443");
    assert!(got.starts_with("direct"), "outside the IPv6 inclusion list: {got}");
    let got = m.probe(1000, "[2001:db8:1::10]:9443");
    assert!(got.starts_with("proxy [2001:db8:1::10]:9443"), "inside the IPv6 inclusion list: {got}");
    let got = m.probe(1000, "[::ffff:192.0.2.10]:80");
    assert!(got.starts_with("direct"), "v4-mapped outside the inclusion list: {got}");
}

const DUAL_STACK_INCLUSION: &str = r#"
mesh:
  outboundIPRangeInclusionList: ["2001:db8:1::/64"]
workloads:
  - name: app
    netns: {netns}
"#;
