//! The reference evaluator: what the data path does with a connection,
//! from the policy (`evaluate`, `evaluate_inbound`) and from the encoded
//! map entries (`evaluate_entries`). No kernel, no I/O: the property tests
//! hold these against the meshes' iptables rules.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::IpNet;
use redirector_common::{
    decide::{decide, decide_udp, is_proxy_with, Action, Dst, Lookups, Reason, DNS_PORT},
    flags, v4_mapped, CidrData, PortKey, WorkloadPolicy,
};

use crate::{
    compile::{canonical_ip, Policy},
    dialect::LoopbackMode,
    encode::MapEntries,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// An outbound connection attempt from inside a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboundConn {
    pub protocol: Protocol,
    pub uid: u32,
    pub gid: u32,
    /// As the application wrote it (IPv4-mapped allowed).
    pub dst: SocketAddr,
    /// The address the socket is bound to, if any (127.0.0.6 matters).
    pub src: Option<IpAddr>,
    /// cgroup-v2 id of the connecting process.
    pub cgroup: u64,
}

impl OutboundConn {
    pub fn tcp(uid: u32, dst: SocketAddr) -> Self {
        Self { protocol: Protocol::Tcp, uid, gid: uid, dst, src: None, cgroup: 0 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    NotTcp,
    ProxyUid,
    Localhost,
    ExcludedPort,
    ExcludedCidr,
    NotIncluded,
    /// Inbound: the client is inside the workload (never inbound-redirected).
    LocalClient,
    InboundDisabled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Sent to the proxy at this address; the proxy reads the original
    /// destination back.
    Redirect(SocketAddr),
    Pass(Bypass),
}

/// The destination as the data path decides on it: IPv4 for IPv4-mapped.
fn effective(dst: SocketAddr) -> (IpAddr, u16, bool) {
    let ip = canonical_ip(dst.ip());
    (ip, dst.port(), ip.is_ipv4())
}

fn in_nets(nets: &BTreeSet<IpNet>, ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// What connect4/connect6 do with `conn` under `policy` (same order of
/// checks). The redirect target keeps the socket's family: an AF_INET6
/// socket dialing an IPv4-mapped address is sent to ::ffff:127.0.0.1.
///
/// With DNS capture, UDP to port 53 of a nameserver goes to the DNS
/// listener, decided before every exclusion (only the proxy's own queries,
/// and with istio-iptables' order a socket bound to 127.0.0.6 sending
/// through lo, go out as they are). TCP port 53: with istio-iptables'
/// order captured right after the proxy test (its loopback rules leave it
/// alone); with kumactl's, never captured, and only the proxy's goes on
/// through the chain.
pub fn evaluate(policy: &Policy, conn: &OutboundConn) -> Verdict {
    let (ip, port, is_v4) = effective(conn.dst);
    let dns = policy.dns.as_ref().filter(|_| port == DNS_PORT);
    let dns_server = dns.is_some_and(|d| d.takes(ip));
    let target = |p: u16| -> SocketAddr {
        match conn.dst {
            SocketAddr::V4(_) => SocketAddr::new(policy.redirect_ip4.into(), p),
            SocketAddr::V6(_) if is_v4 => SocketAddr::new(policy.redirect_ip4.to_ipv6_mapped().into(), p),
            SocketAddr::V6(_) => SocketAddr::new(policy.redirect_ip6.into(), p),
        }
    };
    let to_lo = match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    } || policy.local_addresses.contains(&ip);
    let is_proxy = match policy.proxy_cgroup {
        Some(id) => conn.cgroup == id,
        None => conn.uid == policy.proxy_uid || policy.proxy_gid == Some(conn.gid),
    };
    let from_passthrough = conn.src.map(canonical_ip) == Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)));
    if conn.protocol != Protocol::Tcp {
        let Some(d) = dns else { return Verdict::Pass(Bypass::NotTcp) };
        if d.istio_order && from_passthrough && to_lo {
            return Verdict::Pass(Bypass::Localhost);
        }
        if is_proxy {
            return Verdict::Pass(Bypass::ProxyUid);
        }
        if !dns_server {
            return Verdict::Pass(Bypass::NotIncluded);
        }
        return Verdict::Redirect(target(d.port));
    }
    let localhost = ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST);
    if policy.outbound_port_exclusion.contains(&port) {
        return Verdict::Pass(Bypass::ExcludedPort);
    }
    // kumactl: TCP port 53 is not captured, and only the proxy's goes on.
    if dns.is_some_and(|d| !d.istio_order) && !is_proxy {
        return Verdict::Pass(Bypass::NotIncluded);
    }
    let lo_skips_dns = dns.is_some_and(|d| d.istio_order);
    if policy.loopback == LoopbackMode::ProxyToInbound && in_nets(&policy.outbound_ip_range_exclusion, ip) {
        return Verdict::Pass(Bypass::ExcludedCidr);
    }
    match policy.loopback {
        LoopbackMode::ToInbound | LoopbackMode::ProxyToInbound if to_lo => {
            if from_passthrough {
                return Verdict::Pass(Bypass::Localhost);
            }
            if policy.loopback == LoopbackMode::ProxyToInbound && !is_proxy && !lo_skips_dns {
                return Verdict::Pass(Bypass::Localhost);
            }
            if !localhost && !lo_skips_dns {
                return Verdict::Redirect(target(policy.inbound_port));
            }
        }
        LoopbackMode::Bypass if to_lo => return Verdict::Pass(Bypass::Localhost),
        _ => {}
    }
    if is_proxy {
        return Verdict::Pass(Bypass::ProxyUid);
    }
    if let (Some(d), true) = (dns, dns_server && lo_skips_dns) {
        return Verdict::Redirect(target(d.port));
    }
    if localhost {
        return Verdict::Pass(Bypass::Localhost);
    }
    if in_nets(&policy.outbound_ip_range_exclusion, ip) {
        return Verdict::Pass(Bypass::ExcludedCidr);
    }
    if let Some(ports) = &policy.outbound_port_inclusion {
        if !ports.contains(&port) {
            return Verdict::Pass(Bypass::NotIncluded);
        }
    }
    if let Some(nets) = &policy.outbound_ip_range_inclusion {
        if !in_nets(nets, ip) {
            return Verdict::Pass(Bypass::NotIncluded);
        }
    }
    let _ = is_v4;
    Verdict::Redirect(target(policy.outbound_port))
}

/// An inbound TCP connection arriving in the workload's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundConn {
    /// The address and port the client dialed (a local address).
    pub dst: SocketAddr,
    /// The client is inside the workload (loopback or its own address).
    pub local_client: bool,
    /// The client's address.
    pub src: IpAddr,
}

/// What sk_lookup does with an inbound connection: `Redirect(dst)` means
/// the proxy's inbound listener accepts it and reads `dst` back as the
/// original destination.
pub fn evaluate_inbound(policy: &Policy, conn: &InboundConn) -> Verdict {
    if !policy.inbound {
        return Verdict::Pass(Bypass::InboundDisabled);
    }
    if conn.local_client {
        return Verdict::Pass(Bypass::LocalClient);
    }
    let port = conn.dst.port();
    if port == policy.inbound_port {
        return Verdict::Pass(Bypass::ExcludedPort);
    }
    if policy.inbound_port_exclusion.contains(&port) {
        return Verdict::Pass(Bypass::ExcludedPort);
    }
    if let Some(ports) = &policy.inbound_port_inclusion {
        if !ports.contains(&port) {
            return Verdict::Pass(Bypass::NotIncluded);
        }
    }
    if in_nets(&policy.inbound_source_exclusion, canonical_ip(conn.src)) {
        return Verdict::Pass(Bypass::ExcludedCidr);
    }
    Verdict::Redirect(conn.dst)
}

/// Evaluates a connection against map *entries* with the eBPF programs'
/// own chain (`redirector_common::decide`) over exact port lookups and
/// longest-prefix lookups in one trie. Used to prove that `map_entries`
/// encodes `evaluate` faithfully.
pub fn evaluate_entries(e: &MapEntries, conn: &OutboundConn) -> Verdict {
    /// The entries as the maps hold them, and the connecting task.
    struct Entries<'a> {
        e: &'a MapEntries,
        conn: &'a OutboundConn,
    }
    impl Lookups for Entries<'_> {
        fn port_rule(&self, policy_id: u32, kind: u8, port: u16) -> bool {
            self.e.ports.contains(&PortKey { policy_id, port, kind, _pad: 0 })
        }
        fn cidr_hit(&self, policy_id: u32, kind: u8, addr: &[u8; 16]) -> bool {
            let probe = CidrData { policy_id_be: policy_id.to_be_bytes(), kind, addr: *addr, _pad: [0; 3] };
            self.e.cidrs.iter().any(|(bits, data)| {
                let bits = *bits as usize;
                trie_bits(data)[..bits] == trie_bits(&probe)[..bits]
            })
        }
        fn is_proxy(&self, policy: &WorkloadPolicy) -> bool {
            let c = self.conn;
            is_proxy_with(policy, || c.cgroup, || u64::from(c.gid) << 32 | u64::from(c.uid))
        }
    }
    let w = &e.workload;
    let (ip, port, is_v4) = effective(conn.dst);
    let addr = match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    let from_passthrough = conn.src.map(canonical_ip) == Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)));
    let target = |p: u16| -> SocketAddr {
        let v4 = Ipv4Addr::from(w.redirect_ip4.to_ne_bytes());
        match conn.dst {
            SocketAddr::V4(_) => SocketAddr::new(v4.into(), p),
            SocketAddr::V6(_) if is_v4 => SocketAddr::new(v4.to_ipv6_mapped().into(), p),
            SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::from(w.redirect_ip6).into(), p),
        }
    };
    let dst = Dst { addr, is_v4, port, from_passthrough };
    let action = match conn.protocol {
        Protocol::Tcp => decide(&Entries { e, conn }, w, &dst),
        Protocol::Udp => match decide_udp(&Entries { e, conn }, w, &dst) {
            Action::Pass(Reason::NotIncluded) if w.flags & flags::DNS_CAPTURE == 0 || port != DNS_PORT => {
                return Verdict::Pass(Bypass::NotTcp)
            }
            a => a,
        },
    };
    match action {
        Action::Pass(Reason::ExcludedPort) => Verdict::Pass(Bypass::ExcludedPort),
        Action::Pass(Reason::ExcludedCidr) => Verdict::Pass(Bypass::ExcludedCidr),
        Action::Pass(Reason::Localhost) => Verdict::Pass(Bypass::Localhost),
        Action::Pass(Reason::Proxy) => Verdict::Pass(Bypass::ProxyUid),
        Action::Pass(Reason::NotIncluded) => Verdict::Pass(Bypass::NotIncluded),
        Action::Outbound => Verdict::Redirect(target(w.outbound_port)),
        Action::Inbound => Verdict::Redirect(target(w.inbound_port)),
        Action::Dns => Verdict::Redirect(target(w.dns_port)),
    }
}

fn trie_bits(d: &CidrData) -> Vec<bool> {
    let bytes: Vec<u8> = d.policy_id_be.iter().chain([d.kind].iter()).chain(d.addr.iter()).copied().collect();
    bytes.iter().flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use redirector_common::flags;

    fn conn(uid: u32, dst: &str) -> OutboundConn {
        OutboundConn::tcp(uid, dst.parse().unwrap())
    }

    fn policy(doc: &str) -> Policy {
        let c = parse_config(doc).unwrap();
        assert!(c.rejected.is_empty(), "{:?}", c.rejected);
        compile(&c.mesh, &c.workloads[0].annotations)
    }

    const DOC: &str = r#"
mesh:
  outboundIPRangeExclusionList: ["198.51.100.0/24"]
  outboundPortExclusionList: [6379]
workloads:
  - name: app
    netns: /run/netns/app
    annotations:
      openservicemesh.io/outbound-port-exclusion-list: "7070"
      openservicemesh.io/outbound-ip-range-exclusion-list: "203.0.113.0/25"
"#;

    #[test]
    fn merges_mesh_and_pod_lists() {
        let p = policy(DOC);
        assert_eq!(p.outbound_port_exclusion, [6379, 7070].into_iter().collect());
        assert_eq!(p.outbound_ip_range_exclusion.len(), 2);
    }

    #[test]
    fn verdicts_follow_the_osm_rules() {
        let p = policy(DOC);
        let to_proxy = Verdict::Redirect("127.0.0.1:15001".parse().unwrap());
        assert_eq!(evaluate(&p, &conn(1000, "192.0.2.10:80")), to_proxy);
        assert_eq!(evaluate(&p, &conn(1500, "192.0.2.10:80")), Verdict::Pass(Bypass::ProxyUid));
        assert_eq!(evaluate(&p, &conn(0, "127.0.0.1:80")), Verdict::Pass(Bypass::Localhost));
        // Only 127.0.0.1/32 is exempt in osm-init, not 127.0.0.0/8.
        assert_eq!(evaluate(&p, &conn(0, "127.0.0.2:80")), to_proxy);
        assert_eq!(evaluate(&p, &conn(0, "192.0.2.10:6379")), Verdict::Pass(Bypass::ExcludedPort));
        assert_eq!(evaluate(&p, &conn(0, "192.0.2.10:7070")), Verdict::Pass(Bypass::ExcludedPort));
        assert_eq!(evaluate(&p, &conn(0, "198.51.100.9:80")), Verdict::Pass(Bypass::ExcludedCidr));
        assert_eq!(evaluate(&p, &conn(0, "203.0.113.10:80")), Verdict::Pass(Bypass::ExcludedCidr));
        assert_eq!(evaluate(&p, &conn(0, "203.0.113.200:80")), to_proxy);
        let udp = OutboundConn { protocol: Protocol::Udp, ..conn(0, "192.0.2.10:53") };
        assert_eq!(evaluate(&p, &udp), Verdict::Pass(Bypass::NotTcp));
    }

    #[test]
    fn inclusion_and_exclusion() {
        let p = policy(
            r#"
mesh:
  outboundIPRangeInclusionList: ["192.0.2.0/24"]
workloads:
  - name: app
    netns: /x
    annotations:
      openservicemesh.io/outbound-ip-range-exclusion-list: "192.0.2.128/25"
"#,
        );
        assert!(matches!(evaluate(&p, &conn(0, "192.0.2.10:80")), Verdict::Redirect(_)));
        // exclusion wins over inclusion
        assert_eq!(evaluate(&p, &conn(0, "192.0.2.200:80")), Verdict::Pass(Bypass::ExcludedCidr));
        assert_eq!(evaluate(&p, &conn(0, "198.51.100.1:80")), Verdict::Pass(Bypass::NotIncluded));
    }

    /// Fuzz finding (policy_compiler, 2026-11-23): `::/0` in a list matched
    /// every IPv4 address in the trie (IPv4 is looked up IPv4-mapped), so an
    /// IPv6-only exclusion let all IPv4 traffic bypass the proxy, while the
    /// evaluator (and iptables) never match IPv4 with an IPv6 range.
    #[test]
    fn ipv6_range_covering_the_v4_mapped_block_does_not_match_ipv4() {
        for (list, v6_in, v6_out) in [
            ("::/0", "2001:db8::1", None),
            ("::/1", "2001:db8::1", Some("8000::1")),
            ("::/80", "::1:2:3", Some("0:0:0:0:1::")),
            ("::ffff:0:0/95", "::fffe:0:1", Some("::1:0:0:0")),
        ] {
            let p = policy(&format!(
                "mesh:\n  outboundIPRangeExclusionList: [\"{list}\"]\n  inboundSourceIPRangeExclusionList: [\"{list}\"]\nworkloads:\n  - name: app\n    netns: /x\n"
            ));
            let e = map_entries(&p, 9);
            assert!(e.cidrs.len() <= 2 * 96, "{list}: {} entries", e.cidrs.len());
            let mut dsts = vec![
                (format!("[{v6_in}]:80"), true),
                ("192.0.2.10:80".into(), false),
                ("[::ffff:192.0.2.10]:80".into(), false),
            ];
            dsts.extend(v6_out.map(|o| (format!("[{o}]:80"), false)));
            for (dst, excluded) in dsts {
                let c = conn(1000, &dst);
                assert_eq!(evaluate_entries(&e, &c), evaluate(&p, &c), "{list}: {dst}");
                assert_eq!(evaluate(&p, &c) == Verdict::Pass(Bypass::ExcludedCidr), excluded, "{list}: {dst}");
            }
        }
    }

    #[test]
    fn acceleration_sets_only_its_flag() {
        let off = policy(DOC);
        assert_eq!(off.acceleration, Acceleration::None);
        let on = Policy { acceleration: Acceleration::Sockmap, ..off.clone() };
        let (a, b) = (map_entries(&off, 3), map_entries(&on, 3));
        assert_eq!(a.workload.flags & flags::ACCEL_SOCKMAP, 0);
        assert_eq!(b.workload.flags, a.workload.flags | flags::ACCEL_SOCKMAP);
        assert_eq!((a.ports, a.cidrs), (b.ports, b.cidrs));
    }

    #[test]
    fn own_addresses_go_under_the_local_id_and_the_lists_under_the_shared_one() {
        let doc = "mesh:\n  preset: istio\n  outboundIPRangeExclusionList: [\"198.51.100.0/24\"]\nworkloads:\n  - name: app\n    netns: /x\n";
        let p = policy(doc).with_local_addresses(["192.0.2.5".parse().unwrap()]);
        let e = map_entries_with(&p, 7, 8);
        assert_eq!((e.workload.policy_id, e.workload.local_id), (7, 8));
        assert!(e.ports.iter().all(|k| k.policy_id == 7));
        assert!(e.list_cidrs().all(|(_, d)| d.policy_id_be == 7u32.to_be_bytes()));
        let local: Vec<_> = e.local_cidrs().collect();
        assert_eq!(local.len(), 1);
        assert_eq!(local[0].1.policy_id_be, 8u32.to_be_bytes());
        // Istio sends a connection to the pod's own address to the inbound
        // port: found only under the local id.
        let c = conn(1000, "192.0.2.5:8080");
        assert_eq!(evaluate_entries(&e, &c), evaluate(&p, &c));
        assert_eq!(evaluate(&p, &c), Verdict::Redirect("127.0.0.1:15006".parse().unwrap()));
        // Two pods with other addresses have the same lists.
        let q = p.clone().with_local_addresses(["192.0.2.6".parse().unwrap()]);
        assert_eq!(p.lists(), q.lists());
        assert_ne!(p, q);
        // OSM's loopback rule needs no own address: no local id.
        let osm = policy(DOC).with_local_addresses(["192.0.2.5".parse().unwrap()]);
        let e = map_entries_with(&osm, 7, 8);
        assert_eq!((e.workload.local_id, e.local_cidrs().count()), (0, 0));
    }

    #[test]
    fn map_entries_encode_the_policy() {
        let p = policy(DOC);
        let e = map_entries(&p, 7);
        assert_eq!(e.workload.policy_id, 7);
        // 6379, 7070 outbound; OSM's five reserved inbound ports.
        assert_eq!(e.ports.len(), 2 + 5);
        assert_eq!(e.cidrs.len(), 2);
        assert!(e.cidrs.iter().all(|(bits, d)| *bits >= 40 + 96 && d.policy_id_be == 7u32.to_be_bytes()));
        for dst in ["192.0.2.10:80", "198.51.100.9:80", "203.0.113.10:80", "203.0.113.200:7070"] {
            let c = conn(1000, dst);
            assert_eq!(evaluate_entries(&e, &c), evaluate(&p, &c), "{dst}");
        }
    }
}
