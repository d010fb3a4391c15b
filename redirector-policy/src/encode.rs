//! Encode: the map entries (the kernel ABI of `redirector-common`) that
//! express one workload's policy under its two ids: its lists under a
//! `policy_id` that workloads with the same lists share ([`Policy::lists`]),
//! its own addresses under a `local_id` of its own. Pure.
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv6Net};
use redirector_common::{
    cidr_kind, flags, port_kind, v4_mapped, CidrData, PortKey, WorkloadPolicy, CIDR_KEY_PREFIX_BITS,
    V4_MAPPED_PREFIX_BITS,
};

use crate::{
    compile::{DnsCapture, Policy},
    dialect::LoopbackMode,
    mesh::Acceleration,
    values::canonical_net,
};

/// The map entries that express one workload's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntries {
    pub workload: WorkloadPolicy,
    pub ports: Vec<PortKey>,
    /// (prefix length in trie bits, data): the lists' entries under
    /// `policy_id`, then the workload's own addresses under `local_id`.
    pub cidrs: Vec<(u32, CidrData)>,
}

impl MapEntries {
    /// The trie entries of the lists (shared by every workload with the
    /// same lists), without the workload's own addresses.
    pub fn list_cidrs(&self) -> impl Iterator<Item = &(u32, CidrData)> {
        self.cidrs.iter().filter(|(_, d)| d.kind != cidr_kind::LOCAL_ADDRESS)
    }

    /// The trie entries of the workload's own addresses.
    pub fn local_cidrs(&self) -> impl Iterator<Item = &(u32, CidrData)> {
        self.cidrs.iter().filter(|(_, d)| d.kind == cidr_kind::LOCAL_ADDRESS)
    }
}

/// A CIDR trie entry; IPv4 in mapped form. An IPv6 range that covers the
/// IPv4-mapped block needs [`cidr_entries`].
pub fn cidr_entry(policy_id: u32, kind: u8, net: &IpNet) -> (u32, CidrData) {
    let (addr, bits) = match canonical_net(*net) {
        IpNet::V4(n) => (v4_mapped(n.network().octets()), V4_MAPPED_PREFIX_BITS + u32::from(n.prefix_len())),
        IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    };
    (CIDR_KEY_PREFIX_BITS + bits, CidrData { policy_id_be: policy_id.to_be_bytes(), kind, addr, _pad: [0; 3] })
}

/// The trie entries of one range. IPv4 addresses are looked up in their
/// IPv4-mapped form (`::ffff:0:0/96`), but an IPv6 range never matches an
/// IPv4 destination (the evaluator's rule, and iptables': ip6tables never
/// sees IPv4 packets). So an IPv6 range that covers the mapped block
/// (`::/0` … `::/80`, `::ffff:0:0/81` … `/95`) is written as the pieces of
/// it outside the block: at each depth from its prefix to 95, the sibling
/// of the block's path (at most 96 entries).
pub fn cidr_entries(policy_id: u32, kind: u8, net: &IpNet) -> Vec<(u32, CidrData)> {
    let mapped = u128::from(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
    match canonical_net(*net) {
        IpNet::V6(n) if n.contains(&Ipv6Net::new(mapped.into(), 96).expect("96 <= 128")) => (n.prefix_len()..96)
            .map(|depth| {
                let bit = 1u128 << (127 - u32::from(depth));
                let keep = !(u128::MAX >> depth);
                let piece = (mapped & keep) | (!mapped & bit);
                let piece = Ipv6Net::new(piece.into(), depth + 1).expect("depth < 96");
                cidr_entry(policy_id, kind, &IpNet::V6(piece))
            })
            .collect(),
        n => vec![cidr_entry(policy_id, kind, &n)],
    }
}

/// The IP ranges one kind of trie entries express, the way they were
/// written: IPv4 entries as they are, IPv6 ones collapsed to the minimal set
/// of ranges that matches the same IPv6 destinations, so the pieces of a
/// range that covers the IPv4-mapped block ([`cidr_entries`]) read as that
/// range again (`::/0`, not 96 pieces). Takes the entries' canonical nets
/// (IPv4 as IPv4); sorted.
pub fn written_ranges(entries: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    let block = Ipv6Net::new(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96).expect("96 <= 128");
    let (mut v4, mut v6) = (Vec::new(), vec![block]);
    for n in entries {
        match canonical_net(n) {
            IpNet::V4(n) => v4.push(IpNet::V4(n)),
            IpNet::V6(n) => v6.push(n),
        }
    }
    // An IPv6 range never matches IPv4 destinations, so with the mapped
    // block added the pieces merge back into their range; what lies inside
    // the block came only from it.
    let v6 = Ipv6Net::aggregate(&v6).into_iter().filter(|n| !block.contains(n)).map(IpNet::V6);
    v4.sort();
    v4.dedup();
    v4.into_iter().chain(v6).collect()
}

/// The entries of `policy` with one id for both its lists and its own
/// addresses (what a workload alone in the maps may use).
pub fn map_entries(policy: &Policy, policy_id: u32) -> MapEntries {
    map_entries_with(policy, policy_id, policy_id)
}

/// The entries of `policy` with its lists under `policy_id` and its own
/// addresses under `local_id`. `local_id` is written into the workload
/// entry only when the policy has own addresses in the maps
/// ([`Policy::own_addresses`]), 0 otherwise.
pub fn map_entries_with(policy: &Policy, policy_id: u32, local_id: u32) -> MapEntries {
    let own = policy.own_addresses();
    let local_id = if own.is_empty() { 0 } else { local_id };
    let mut f = flags::OUT_ENABLED;
    if policy.outbound_ip_range_inclusion.is_some() {
        f |= flags::OUT_INCLUSION_SET;
    }
    if policy.outbound_port_inclusion.is_some() {
        f |= flags::OUT_PORT_INCLUSION_SET;
    }
    if policy.proxy_gid.is_some() {
        f |= flags::MATCH_PROXY_GID;
    }
    if policy.inbound {
        f |= flags::IN_ENABLED;
    }
    if policy.inbound_port_inclusion.is_some() {
        f |= flags::IN_PORT_INCLUSION_SET;
    }
    if !policy.inbound_source_exclusion.is_empty() {
        f |= flags::IN_SOURCE_EXCLUSION_SET;
    }
    if policy.proxy_cgroup.is_some() {
        f |= flags::MATCH_PROXY_CGROUP;
    }
    if policy.acceleration == Acceleration::Sockmap {
        f |= flags::ACCEL_SOCKMAP;
    }
    if let Some(d) = &policy.dns {
        f |= flags::DNS_CAPTURE;
        if d.istio_order {
            f |= flags::DNS_ISTIO_ORDER;
        }
    }
    match policy.loopback {
        LoopbackMode::Osm => {}
        LoopbackMode::ToInbound => f |= flags::LOCAL_TO_INBOUND,
        LoopbackMode::ProxyToInbound => f |= flags::LOCAL_TO_INBOUND | flags::LOCAL_PROXY_ONLY,
        LoopbackMode::Bypass => f |= flags::LOCAL_BYPASS,
    }
    let workload = WorkloadPolicy {
        policy_id,
        flags: f,
        proxy_uid: policy.proxy_uid,
        proxy_gid: policy.proxy_gid.unwrap_or(u32::MAX),
        outbound_port: policy.outbound_port,
        inbound_port: policy.inbound_port,
        redirect_ip4: u32::from_ne_bytes(policy.redirect_ip4.octets()),
        redirect_ip6: policy.redirect_ip6.octets(),
        proxy_cgroup_id: policy.proxy_cgroup.unwrap_or(0),
        local_id,
        dns_port: policy.dns.as_ref().map_or(0, |d| d.port),
        _pad: 0,
    };
    let port = |kind: u8| move |p: &u16| PortKey { policy_id, port: *p, kind, _pad: 0 };
    let mut ports: Vec<PortKey> =
        policy.outbound_port_exclusion.iter().map(port(port_kind::OUTBOUND_EXCLUDE)).collect();
    ports.extend(policy.inbound_port_exclusion.iter().map(port(port_kind::INBOUND_EXCLUDE)));
    for p in policy.outbound_port_inclusion.iter().flatten() {
        ports.push(port(port_kind::OUTBOUND_INCLUDE)(p));
    }
    for p in policy.inbound_port_inclusion.iter().flatten() {
        ports.push(port(port_kind::INBOUND_INCLUDE)(p));
    }
    let mut cidrs: Vec<(u32, CidrData)> = Vec::new();
    let lists = [
        (cidr_kind::OUTBOUND_EXCLUDE, Some(&policy.outbound_ip_range_exclusion)),
        (cidr_kind::OUTBOUND_INCLUDE, policy.outbound_ip_range_inclusion.as_ref()),
        (cidr_kind::INBOUND_SOURCE_EXCLUDE, Some(&policy.inbound_source_exclusion)),
    ];
    for (kind, list) in lists {
        for n in list.into_iter().flatten() {
            cidrs.extend(cidr_entries(policy_id, kind, n));
        }
    }
    for n in policy.dns.iter().flat_map(DnsCapture::ranges) {
        cidrs.extend(cidr_entries(policy_id, cidr_kind::DNS_SERVER, &n));
    }
    for a in own {
        cidrs.push(cidr_entry(local_id, cidr_kind::LOCAL_ADDRESS, &IpNet::from(*a)));
    }
    // Pieces of two ranges covering the mapped block can coincide.
    let mut seen = std::collections::HashSet::new();
    cidrs.retain(|(bits, d)| seen.insert((*bits, *d)));
    MapEntries { workload, ports, cidrs }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nets the trie holds for `written` (as inspect reads them back).
    fn stored(written: &[&str]) -> Vec<IpNet> {
        let mut out = Vec::new();
        for w in written {
            for (bits, d) in cidr_entries(7, cidr_kind::OUTBOUND_INCLUDE, &w.parse().unwrap()) {
                let net = IpNet::new(std::net::Ipv6Addr::from(d.addr).into(), (bits - CIDR_KEY_PREFIX_BITS) as u8);
                out.push(canonical_net(net.unwrap()));
            }
        }
        out
    }

    fn shown(written: &[&str]) -> Vec<String> {
        written_ranges(stored(written)).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn ranges_covering_the_mapped_block_read_as_written() {
        assert_eq!(stored(&["::/0"]).len(), 96);
        assert_eq!(shown(&["::/0"]), ["::/0"]);
        assert_eq!(shown(&["0.0.0.0/0", "::/0"]), ["0.0.0.0/0", "::/0"]);
        assert_eq!(shown(&["0.0.0.0/0"]), ["0.0.0.0/0"]);
        assert_eq!(shown(&["::/64", "2001:db8::/32"]), ["::/64", "2001:db8::/32"]);
        // (shown by its network address, as every range is)
        assert_eq!(shown(&["::ffff:0:0/81"]), ["::8000:0:0/81"]);
        // IPv4-mapped spellings are IPv4 ranges.
        assert_eq!(shown(&["::ffff:192.0.2.0/120"]), ["192.0.2.0/24"]);
    }

    #[test]
    fn other_ranges_are_kept_and_sorted() {
        assert_eq!(shown(&[]), Vec::<String>::new());
        assert_eq!(
            shown(&["203.0.113.0/25", "192.0.2.10/32", "2001:db8:2::/64", "198.51.100.0/24"]),
            ["192.0.2.10/32", "198.51.100.0/24", "203.0.113.0/25", "2001:db8:2::/64"]
        );
        // IPv4 ranges stay as written, even when adjacent.
        assert_eq!(shown(&["10.0.0.0/9", "10.128.0.0/9"]), ["10.0.0.0/9", "10.128.0.0/9"]);
    }

    /// Whatever is written, what is shown matches the same destinations:
    /// every address of a sample lies in a shown range exactly when it lies
    /// in a written one (an IPv6 range never covering IPv4).
    #[test]
    fn shown_ranges_match_the_same_destinations() {
        let lists: &[&[&str]] = &[
            &["::/0"],
            &["::/1", "8000::/1"],
            &["::/80", "2001:db8::/32", "10.0.0.0/8"],
            &["::ffff:0:0/95", "::fffe:0:0/96"],
            &["::/0", "0.0.0.0/0", "2001:db8::/32"],
        ];
        let samples: Vec<std::net::IpAddr> = [
            "::1",
            "::",
            "::fffe:1:2",
            "::ffff:10.1.2.3",
            "10.1.2.3",
            "192.0.2.1",
            "2001:db8::1",
            "8000::1",
            "ffff::1",
            "::1:0:0:1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let covers = |nets: &[IpNet], a: std::net::IpAddr| {
            let a = crate::compile::canonical_ip(a);
            nets.iter().map(|n| canonical_net(*n)).any(|n| matches!(n, IpNet::V4(_)) == a.is_ipv4() && n.contains(&a))
        };
        for written in lists {
            let w: Vec<IpNet> = written.iter().map(|s| s.parse().unwrap()).collect();
            let s = written_ranges(stored(written));
            for a in &samples {
                assert_eq!(covers(&w, *a), covers(&s, *a), "{written:?} shown as {s:?}, address {a}");
            }
        }
    }
}
