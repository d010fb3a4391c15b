//! Policy: pure functions from parsed config to the desired map contents,
//! plus a reference evaluator of what the data path does with a connection.
//! No kernel, no I/O: unit- and property-tested.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use ipnet::Ipv4Net;
use redirector_common::{
    cidr_kind, flags, port_kind, Cidr4Data, PortKey, WorkloadPolicy, CIDR_KEY_PREFIX_BITS,
};

use crate::config::{MeshConfig, WorkloadAnnotations};

/// The merged policy of one workload: mesh lists ∪ pod annotations, as
/// osm-injector merges them before it writes the osm-init command line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub redirect_ip: Ipv4Addr,
    pub outbound_port_exclusion: BTreeSet<u16>,
    pub outbound_ip_range_exclusion: BTreeSet<Ipv4Net>,
    pub outbound_ip_range_inclusion: BTreeSet<Ipv4Net>,
    pub inbound_port_exclusion: BTreeSet<u16>,
}

pub fn compile(mesh: &MeshConfig, pod: &WorkloadAnnotations) -> Policy {
    let union_ports = |a: &[u16], b: &[u16]| a.iter().chain(b).copied().collect::<BTreeSet<_>>();
    let union_nets = |a: &[Ipv4Net], b: &[Ipv4Net]| {
        a.iter().chain(b).map(|n| n.trunc()).collect::<BTreeSet<_>>()
    };
    Policy {
        proxy_uid: mesh.proxy_uid,
        proxy_gid: mesh.proxy_gid,
        outbound_port: mesh.outbound_port,
        inbound_port: mesh.inbound_port,
        redirect_ip: Ipv4Addr::LOCALHOST,
        outbound_port_exclusion: union_ports(
            &mesh.outbound_port_exclusion,
            &pod.outbound_port_exclusion,
        ),
        outbound_ip_range_exclusion: union_nets(
            &mesh.outbound_ip_range_exclusion,
            &pod.outbound_ip_range_exclusion,
        ),
        outbound_ip_range_inclusion: union_nets(
            &mesh.outbound_ip_range_inclusion,
            &pod.outbound_ip_range_inclusion,
        ),
        inbound_port_exclusion: union_ports(&mesh.inbound_port_exclusion, &pod.inbound_port_exclusion),
    }
}

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
    pub dst: SocketAddrV4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    NotTcp,
    ProxyUid,
    Localhost,
    ExcludedPort,
    ExcludedCidr,
    NotIncluded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Sent to the proxy; the proxy reads `dst` as the original destination.
    Redirect(SocketAddrV4),
    Pass(Bypass),
}

/// What connect4 does with `conn` under `policy` (the same order of checks).
pub fn evaluate(policy: &Policy, conn: &OutboundConn) -> Verdict {
    if conn.protocol != Protocol::Tcp {
        return Verdict::Pass(Bypass::NotTcp);
    }
    if conn.uid == policy.proxy_uid || policy.proxy_gid == Some(conn.gid) {
        return Verdict::Pass(Bypass::ProxyUid);
    }
    let ip = *conn.dst.ip();
    if ip == Ipv4Addr::LOCALHOST {
        return Verdict::Pass(Bypass::Localhost);
    }
    if policy.outbound_port_exclusion.contains(&conn.dst.port()) {
        return Verdict::Pass(Bypass::ExcludedPort);
    }
    if policy.outbound_ip_range_exclusion.iter().any(|n| n.contains(&ip)) {
        return Verdict::Pass(Bypass::ExcludedCidr);
    }
    if !policy.outbound_ip_range_inclusion.is_empty()
        && !policy.outbound_ip_range_inclusion.iter().any(|n| n.contains(&ip))
    {
        return Verdict::Pass(Bypass::NotIncluded);
    }
    Verdict::Redirect(SocketAddrV4::new(policy.redirect_ip, policy.outbound_port))
}

/// The map entries that express one workload's policy under `policy_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntries {
    pub workload: WorkloadPolicy,
    pub ports: Vec<PortKey>,
    /// (prefix length in trie bits, data).
    pub cidrs4: Vec<(u32, Cidr4Data)>,
}

pub fn cidr4_entry(policy_id: u32, kind: u8, net: &Ipv4Net) -> (u32, Cidr4Data) {
    (
        CIDR_KEY_PREFIX_BITS + u32::from(net.prefix_len()),
        Cidr4Data {
            policy_id_be: policy_id.to_be_bytes(),
            kind,
            addr: net.network().octets(),
            _pad: [0; 3],
        },
    )
}

pub fn map_entries(policy: &Policy, policy_id: u32) -> MapEntries {
    let mut f = flags::OUT_ENABLED;
    if !policy.outbound_ip_range_inclusion.is_empty() {
        f |= flags::OUT_INCLUSION_SET;
    }
    if policy.proxy_gid.is_some() {
        f |= flags::MATCH_PROXY_GID;
    }
    let workload = WorkloadPolicy {
        policy_id,
        flags: f,
        proxy_uid: policy.proxy_uid,
        proxy_gid: policy.proxy_gid.unwrap_or(u32::MAX),
        outbound_port: policy.outbound_port,
        inbound_port: policy.inbound_port,
        redirect_ip4: u32::from_ne_bytes(policy.redirect_ip.octets()),
    };
    let port = |kind: u8| {
        move |p: &u16| PortKey { policy_id, port: *p, kind, _pad: 0 }
    };
    let mut ports: Vec<PortKey> = policy
        .outbound_port_exclusion
        .iter()
        .map(port(port_kind::OUTBOUND_EXCLUDE))
        .collect();
    ports.extend(policy.inbound_port_exclusion.iter().map(port(port_kind::INBOUND_EXCLUDE)));
    let mut cidrs4: Vec<(u32, Cidr4Data)> = policy
        .outbound_ip_range_exclusion
        .iter()
        .map(|n| cidr4_entry(policy_id, cidr_kind::OUTBOUND_EXCLUDE, n))
        .collect();
    cidrs4.extend(
        policy
            .outbound_ip_range_inclusion
            .iter()
            .map(|n| cidr4_entry(policy_id, cidr_kind::OUTBOUND_INCLUDE, n)),
    );
    MapEntries { workload, ports, cidrs4 }
}

/// Evaluates a connection against map *entries* the way the eBPF program
/// does (exact port lookup, longest-prefix lookups in one trie). Used to
/// prove that `map_entries` encodes `evaluate` faithfully.
pub fn evaluate_entries(e: &MapEntries, conn: &OutboundConn) -> Verdict {
    let w = &e.workload;
    if conn.protocol != Protocol::Tcp {
        return Verdict::Pass(Bypass::NotTcp);
    }
    if conn.uid == w.proxy_uid || (w.flags & flags::MATCH_PROXY_GID != 0 && conn.gid == w.proxy_gid)
    {
        return Verdict::Pass(Bypass::ProxyUid);
    }
    let ip = *conn.dst.ip();
    if ip == Ipv4Addr::LOCALHOST {
        return Verdict::Pass(Bypass::Localhost);
    }
    let key = PortKey {
        policy_id: w.policy_id,
        port: conn.dst.port(),
        kind: port_kind::OUTBOUND_EXCLUDE,
        _pad: 0,
    };
    if e.ports.contains(&key) {
        return Verdict::Pass(Bypass::ExcludedPort);
    }
    let trie_hit = |kind: u8| {
        let probe = cidr4_entry(w.policy_id, kind, &Ipv4Net::new(ip, 32).unwrap()).1;
        e.cidrs4.iter().any(|(bits, data)| {
            let bits = *bits as usize;
            let a = trie_bits(data);
            let b = trie_bits(&probe);
            a[..bits] == b[..bits]
        })
    };
    if trie_hit(cidr_kind::OUTBOUND_EXCLUDE) {
        return Verdict::Pass(Bypass::ExcludedCidr);
    }
    if w.flags & flags::OUT_INCLUSION_SET != 0 && !trie_hit(cidr_kind::OUTBOUND_INCLUDE) {
        return Verdict::Pass(Bypass::NotIncluded);
    }
    Verdict::Redirect(SocketAddrV4::new(
        Ipv4Addr::from(w.redirect_ip4.to_ne_bytes()),
        w.outbound_port,
    ))
}

fn trie_bits(d: &Cidr4Data) -> Vec<bool> {
    let bytes: Vec<u8> =
        d.policy_id_be.iter().chain([d.kind].iter()).chain(d.addr.iter()).copied().collect();
    bytes.iter().flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    fn conn(uid: u32, dst: &str) -> OutboundConn {
        OutboundConn { protocol: Protocol::Tcp, uid, gid: uid, dst: dst.parse().unwrap() }
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

    #[test]
    fn map_entries_encode_the_policy() {
        let p = policy(DOC);
        let e = map_entries(&p, 7);
        assert_eq!(e.workload.policy_id, 7);
        assert_eq!(e.ports.len(), 2);
        assert_eq!(e.cidrs4.len(), 2);
        assert!(e.cidrs4.iter().all(|(bits, d)| *bits >= 40 && d.policy_id_be == 7u32.to_be_bytes()));
        for dst in ["192.0.2.10:80", "198.51.100.9:80", "203.0.113.10:80", "203.0.113.200:7070"] {
            let c = conn(1000, dst);
            assert_eq!(evaluate_entries(&e, &c), evaluate(&p, &c), "{dst}");
        }
    }
}
