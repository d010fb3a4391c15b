//! Shared invariant checks of the fuzz targets. Every check panics with
//! what it found, which libFuzzer reports as a crash with the input.
//!
//! - [`check_nets`], [`check_ports`]: parsed values are in range and
//!   canonical;
//! - [`render_annotations`], [`render_mesh`]: print parsed values back in
//!   the input vocabulary (for parse → print → parse round trips);
//! - [`check_policy`]: a compiled policy is the documented merge of its
//!   mesh settings and pod annotations;
//! - [`check_entries`]: the map contents of a policy are well formed and
//!   each CIDR list in the trie matches exactly the addresses of the list;
//! - [`check_connections`]: the reference evaluator, the map encoding and
//!   (where the dialect's rules can express the policy) the mesh's own
//!   iptables rules decide every connection alike.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
};

use ipnet::IpNet;
use redirector_common::{cidr_kind, flags, port_kind, v4_mapped, CidrData, CIDR_KEY_PREFIX_BITS};
use redirector_policy::{
    canonical_net, evaluate, evaluate_entries, evaluate_inbound, istio_annotations, kuma_annotations,
    linkerd_annotations, map_entries,
    oracle::{oracle_commands, NatOutcome, NatTable},
    osm_annotations, Bypass, InboundConn, Inclusion, LoopbackMode, MapEntries, MeshSettings, OutboundConn, Policy,
    Preset, Protocol, Verdict, WorkloadAnnotations,
};

/// Every annotation key of every dialect (the fuzz inputs pick from these).
pub const ANNOTATION_KEYS: [&str; 17] = [
    osm_annotations::OUTBOUND_PORT_EXCLUSION,
    osm_annotations::OUTBOUND_IP_RANGE_EXCLUSION,
    osm_annotations::OUTBOUND_IP_RANGE_INCLUSION,
    osm_annotations::INBOUND_PORT_EXCLUSION,
    istio_annotations::INCLUDE_OUTBOUND_IP_RANGES,
    istio_annotations::EXCLUDE_OUTBOUND_IP_RANGES,
    istio_annotations::INCLUDE_INBOUND_PORTS,
    istio_annotations::EXCLUDE_INBOUND_PORTS,
    istio_annotations::INCLUDE_OUTBOUND_PORTS,
    istio_annotations::EXCLUDE_OUTBOUND_PORTS,
    linkerd_annotations::SKIP_OUTBOUND_PORTS,
    linkerd_annotations::SKIP_INBOUND_PORTS,
    linkerd_annotations::SKIP_SUBNETS,
    kuma_annotations::EXCLUDE_OUTBOUND_PORTS,
    kuma_annotations::EXCLUDE_INBOUND_PORTS,
    kuma_annotations::EXCLUDE_OUTBOUND_IPS,
    kuma_annotations::EXCLUDE_INBOUND_IPS,
];

/// The annotation keys `preset` reads.
pub fn vocabulary(preset: Preset) -> &'static [&'static str] {
    match preset {
        Preset::Osm => &ANNOTATION_KEYS[0..4],
        Preset::Istio => &ANNOTATION_KEYS[4..10],
        Preset::Linkerd => &ANNOTATION_KEYS[10..13],
        Preset::Kuma => &ANNOTATION_KEYS[13..17],
    }
}

/// A net as the parsers must leave it: host bits clear, IPv4-mapped
/// ranges as IPv4.
pub fn check_nets(what: &str, nets: &[IpNet]) {
    for n in nets {
        assert_eq!(canonical_net(*n), *n, "{what}: {n} is not canonical");
        let back: IpNet = n.to_string().parse().unwrap_or_else(|e| panic!("{what}: {n} does not print back: {e}"));
        assert_eq!(back, *n, "{what}: {n} prints as another net");
    }
}

pub fn check_ports(what: &str, ports: &[u16]) {
    assert!(!ports.contains(&0), "{what}: port 0 accepted: {ports:?}");
}

pub fn check_annotations(a: &WorkloadAnnotations) {
    check_ports("outbound port exclusion", &a.outbound_port_exclusion);
    check_ports("inbound port exclusion", &a.inbound_port_exclusion);
    for (what, inc) in
        [("outbound port inclusion", &a.outbound_port_inclusion), ("inbound port inclusion", &a.inbound_port_inclusion)]
    {
        if let Some(Inclusion::Only(v)) = inc {
            check_ports(what, v);
        }
    }
    check_nets("outbound exclusion", &a.outbound_ip_range_exclusion);
    check_nets("outbound inclusion", &a.outbound_ip_range_inclusion);
    check_nets("inbound source exclusion", &a.inbound_source_exclusion);
    if let Some(Inclusion::Only(v)) = &a.outbound_ip_range_inclusion_override {
        check_nets("outbound inclusion override", v);
    }
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn inclusion<T: ToString>(i: &Inclusion<T>) -> String {
    match i {
        Inclusion::All => "*".into(),
        Inclusion::Only(v) => join(v),
    }
}

/// The annotations that express `a` in `preset`'s vocabulary (ranges
/// written out port by port).
pub fn render_annotations(preset: Preset, a: &WorkloadAnnotations) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    match preset {
        Preset::Osm => {
            use osm_annotations::*;
            put(OUTBOUND_PORT_EXCLUSION, join(&a.outbound_port_exclusion));
            put(INBOUND_PORT_EXCLUSION, join(&a.inbound_port_exclusion));
            put(OUTBOUND_IP_RANGE_EXCLUSION, join(&a.outbound_ip_range_exclusion));
            put(OUTBOUND_IP_RANGE_INCLUSION, join(&a.outbound_ip_range_inclusion));
        }
        Preset::Istio => {
            use istio_annotations::*;
            put(EXCLUDE_OUTBOUND_PORTS, join(&a.outbound_port_exclusion));
            put(EXCLUDE_INBOUND_PORTS, join(&a.inbound_port_exclusion));
            put(EXCLUDE_OUTBOUND_IP_RANGES, join(&a.outbound_ip_range_exclusion));
            if let Some(i) = &a.outbound_ip_range_inclusion_override {
                put(INCLUDE_OUTBOUND_IP_RANGES, inclusion(i));
            }
            if let Some(i) = &a.outbound_port_inclusion {
                put(INCLUDE_OUTBOUND_PORTS, inclusion(i));
            }
            if let Some(i) = &a.inbound_port_inclusion {
                put(INCLUDE_INBOUND_PORTS, inclusion(i));
            }
        }
        Preset::Linkerd => {
            use linkerd_annotations::*;
            put(SKIP_OUTBOUND_PORTS, join(&a.outbound_port_exclusion));
            put(SKIP_INBOUND_PORTS, join(&a.inbound_port_exclusion));
            put(SKIP_SUBNETS, join(&a.inbound_source_exclusion));
        }
        Preset::Kuma => {
            use kuma_annotations::*;
            put(EXCLUDE_OUTBOUND_PORTS, join(&a.outbound_port_exclusion));
            put(EXCLUDE_INBOUND_PORTS, join(&a.inbound_port_exclusion));
            put(EXCLUDE_OUTBOUND_IPS, join(&a.outbound_ip_range_exclusion));
            put(EXCLUDE_INBOUND_IPS, join(&a.inbound_source_exclusion));
        }
    }
    m
}

fn yaml_list<T: ToString>(v: &[T], quote: bool) -> String {
    let items: Vec<String> =
        v.iter().map(|x| if quote { format!("\"{}\"", x.to_string()) } else { x.to_string() }).collect();
    format!("[{}]", items.join(", "))
}

/// The `mesh` mapping (as YAML, one key a line, not indented) that parses
/// to `m`, or None when `m` cannot be written (a preset's proxy GID cannot
/// be removed, nor its reserved ports changed).
pub fn render_mesh(m: &MeshSettings) -> Option<String> {
    let d = MeshSettings::for_preset(m.preset);
    if m.reserved_inbound_ports != d.reserved_inbound_ports || (m.proxy_gid.is_none() && d.proxy_gid.is_some()) {
        return None;
    }
    let mut s = format!(
        "preset: {}\nproxyUID: {}\noutboundPort: {}\ninboundPort: {}\ninbound: {}\nloopback: {}\n",
        m.preset.name(),
        m.proxy_uid,
        m.outbound_port,
        m.inbound_port,
        m.inbound,
        m.loopback.name()
    );
    if let Some(g) = m.proxy_gid {
        s += &format!("proxyGID: {g}\n");
    }
    s += &format!("outboundIPRangeExclusionList: {}\n", yaml_list(&m.outbound_ip_range_exclusion, true));
    s += &format!("outboundIPRangeInclusionList: {}\n", yaml_list(&m.outbound_ip_range_inclusion, true));
    s += &format!("inboundSourceIPRangeExclusionList: {}\n", yaml_list(&m.inbound_source_exclusion, true));
    s += &format!("outboundPortExclusionList: {}\n", yaml_list(&m.outbound_port_exclusion, false));
    s += &format!("inboundPortExclusionList: {}\n", yaml_list(&m.inbound_port_exclusion, false));
    if let Some(v) = &m.outbound_port_inclusion {
        s += &format!("outboundPortInclusionList: {}\n", yaml_list(v, false));
    }
    if let Some(v) = &m.inbound_port_inclusion {
        s += &format!("inboundPortInclusionList: {}\n", yaml_list(v, false));
    }
    Some(s)
}

/// A mesh configuration the parser may return.
pub fn check_mesh(m: &MeshSettings) {
    assert_ne!(m.outbound_port, 0);
    assert_ne!(m.inbound_port, 0);
    assert_ne!(m.outbound_port, m.inbound_port, "one port for both listeners accepted");
    assert_eq!(m.reserved_inbound_ports, MeshSettings::for_preset(m.preset).reserved_inbound_ports);
    check_ports("outboundPortExclusionList", &m.outbound_port_exclusion);
    check_ports("inboundPortExclusionList", &m.inbound_port_exclusion);
    for v in [&m.outbound_port_inclusion, &m.inbound_port_inclusion].into_iter().flatten() {
        check_ports("port inclusion list", v);
    }
    check_nets("outboundIPRangeExclusionList", &m.outbound_ip_range_exclusion);
    check_nets("outboundIPRangeInclusionList", &m.outbound_ip_range_inclusion);
    check_nets("inboundSourceIPRangeExclusionList", &m.inbound_source_exclusion);
}

fn nets(v: &[IpNet]) -> BTreeSet<IpNet> {
    v.iter().map(|n| canonical_net(*n)).collect()
}

/// `p` is the documented merge of `mesh` and `pod`: exclusion lists are
/// unions (inbound with the preset's reserved ports), OSM's inclusion list
/// a union, Istio's `include*` replaces the mesh value (`*`: everything).
pub fn check_policy(mesh: &MeshSettings, pod: &WorkloadAnnotations, p: &Policy) {
    assert_eq!(
        (p.proxy_uid, p.proxy_gid, p.outbound_port, p.inbound_port, p.inbound, p.loopback),
        (mesh.proxy_uid, mesh.proxy_gid, mesh.outbound_port, mesh.inbound_port, mesh.inbound, mesh.loopback)
    );
    let ports = |a: &[u16], b: &[u16]| a.iter().chain(b).copied().collect::<BTreeSet<u16>>();
    assert_eq!(p.outbound_port_exclusion, ports(&mesh.outbound_port_exclusion, &pod.outbound_port_exclusion));
    let mut inbound = ports(&mesh.inbound_port_exclusion, &pod.inbound_port_exclusion);
    inbound.extend(&mesh.reserved_inbound_ports);
    assert_eq!(p.inbound_port_exclusion, inbound);
    let all: Vec<IpNet> =
        mesh.outbound_ip_range_exclusion.iter().chain(&pod.outbound_ip_range_exclusion).copied().collect();
    assert_eq!(p.outbound_ip_range_exclusion, nets(&all));
    let all: Vec<IpNet> = mesh.inbound_source_exclusion.iter().chain(&pod.inbound_source_exclusion).copied().collect();
    assert_eq!(p.inbound_source_exclusion, nets(&all));
    let want = match &pod.outbound_ip_range_inclusion_override {
        Some(Inclusion::All) => None,
        Some(Inclusion::Only(v)) => Some(nets(v)),
        None => {
            let all: Vec<IpNet> =
                mesh.outbound_ip_range_inclusion.iter().chain(&pod.outbound_ip_range_inclusion).copied().collect();
            Some(nets(&all)).filter(|s| !s.is_empty())
        }
    };
    assert_eq!(p.outbound_ip_range_inclusion, want);
    let over = |pod: &Option<Inclusion<u16>>, mesh: &Option<Vec<u16>>| -> Option<BTreeSet<u16>> {
        match pod {
            Some(Inclusion::All) => None,
            Some(Inclusion::Only(v)) => Some(v.iter().copied().collect()),
            // An empty mesh-wide list restricts nothing.
            None => mesh.as_ref().filter(|v| !v.is_empty()).map(|v| v.iter().copied().collect()),
        }
    };
    assert_eq!(p.outbound_port_inclusion, over(&pod.outbound_port_inclusion, &mesh.outbound_port_inclusion));
    assert_eq!(p.inbound_port_inclusion, over(&pod.inbound_port_inclusion, &mesh.inbound_port_inclusion));
    for set in [&p.outbound_ip_range_exclusion, &p.inbound_source_exclusion]
        .into_iter()
        .chain(p.outbound_ip_range_inclusion.as_ref())
    {
        check_nets("policy", &set.iter().copied().collect::<Vec<_>>());
    }
}

/// The trie key bits of an address (IPv4 in mapped form).
fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_mapped(v4.octets()),
            None => v6.octets(),
        },
    }
}

fn bit(bytes: &[u8], i: usize) -> bool {
    bytes[i / 8] >> (7 - i % 8) & 1 == 1
}

/// Whether the trie holds an entry of `kind` for `policy_id` covering `ip`
/// (the kernel's LPM lookup only says whether some entry matches).
pub fn trie_hit(cidrs: &[(u32, CidrData)], policy_id: u32, kind: u8, ip: IpAddr) -> bool {
    let key = |id: [u8; 4], kind: u8, addr: [u8; 16]| {
        let mut k = [0u8; 21];
        k[..4].copy_from_slice(&id);
        k[4] = kind;
        k[5..].copy_from_slice(&addr);
        k
    };
    let probe = key(policy_id.to_be_bytes(), kind, addr16(ip));
    cidrs.iter().any(|(bits, d)| {
        let k = key(d.policy_id_be, d.kind, d.addr);
        (0..*bits as usize).all(|i| bit(&k, i) == bit(&probe, i))
    })
}

/// Whether `ip` is in one of `nets` the way the evaluator decides it: an
/// IPv4-mapped address is the IPv4 address.
pub fn in_nets(nets: &BTreeSet<IpNet>, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// Addresses at and around the edges of `net`.
pub fn probes(net: &IpNet) -> Vec<IpAddr> {
    let mut v = vec![net.network(), net.broadcast()];
    match net {
        IpNet::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            v.extend(
                [lo.wrapping_sub(1), hi.wrapping_add(1), lo + (hi - lo) / 2].map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            );
            // The same addresses written IPv4-mapped.
            v.push(IpAddr::V6(n.network().to_ipv6_mapped()));
            v.push(IpAddr::V6(n.broadcast().to_ipv6_mapped()));
        }
        IpNet::V6(n) => {
            let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
            v.extend(
                [lo.wrapping_sub(1), hi.wrapping_add(1), lo + (hi - lo) / 2].map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            );
        }
    }
    v
}

/// Map contents of `p` under `id`: the workload entry carries the policy,
/// every key names `id`, no key twice, no set bits past a prefix, and each
/// CIDR list in the trie matches exactly the addresses of the list.
pub fn check_entries(p: &Policy, id: u32, e: &MapEntries) {
    let w = &e.workload;
    assert_eq!(w.policy_id, id);
    assert_eq!((w.outbound_port, w.inbound_port, w.proxy_uid), (p.outbound_port, p.inbound_port, p.proxy_uid));
    assert_eq!(w.proxy_gid, p.proxy_gid.unwrap_or(u32::MAX));
    assert_eq!(w.proxy_cgroup_id, p.proxy_cgroup.unwrap_or(0));
    let has = |f: u32| w.flags & f != 0;
    assert!(has(flags::OUT_ENABLED));
    assert_eq!(has(flags::OUT_INCLUSION_SET), p.outbound_ip_range_inclusion.is_some());
    assert_eq!(has(flags::OUT_PORT_INCLUSION_SET), p.outbound_port_inclusion.is_some());
    assert_eq!(has(flags::IN_PORT_INCLUSION_SET), p.inbound_port_inclusion.is_some());
    assert_eq!(has(flags::MATCH_PROXY_GID), p.proxy_gid.is_some());
    assert_eq!(has(flags::MATCH_PROXY_CGROUP), p.proxy_cgroup.is_some());
    assert_eq!(has(flags::IN_ENABLED), p.inbound);
    assert_eq!(has(flags::IN_SOURCE_EXCLUSION_SET), !p.inbound_source_exclusion.is_empty());
    let want_lo = match p.loopback {
        LoopbackMode::Osm => (false, false, false),
        LoopbackMode::ToInbound => (true, false, false),
        LoopbackMode::ProxyToInbound => (true, true, false),
        LoopbackMode::Bypass => (false, false, true),
    };
    assert_eq!((has(flags::LOCAL_TO_INBOUND), has(flags::LOCAL_PROXY_ONLY), has(flags::LOCAL_BYPASS)), want_lo);

    // Ports: exactly the lists, each key once.
    let mut want: BTreeSet<(u8, u16)> = BTreeSet::new();
    want.extend(p.outbound_port_exclusion.iter().map(|x| (port_kind::OUTBOUND_EXCLUDE, *x)));
    want.extend(p.inbound_port_exclusion.iter().map(|x| (port_kind::INBOUND_EXCLUDE, *x)));
    want.extend(p.outbound_port_inclusion.iter().flatten().map(|x| (port_kind::OUTBOUND_INCLUDE, *x)));
    want.extend(p.inbound_port_inclusion.iter().flatten().map(|x| (port_kind::INBOUND_INCLUDE, *x)));
    let got: BTreeSet<(u8, u16)> = e.ports.iter().map(|k| (k.kind, k.port)).collect();
    assert_eq!(got.len(), e.ports.len(), "a port key written twice");
    assert_eq!(got, want);
    assert!(e.ports.iter().all(|k| k.policy_id == id && k._pad == 0));

    // CIDR keys: well formed, each once.
    let mut seen = BTreeSet::new();
    for (bits, d) in &e.cidrs {
        assert_eq!(d.policy_id_be, id.to_be_bytes());
        assert!((CIDR_KEY_PREFIX_BITS..=CIDR_KEY_PREFIX_BITS + 128).contains(bits), "prefix {bits}");
        let prefix = (*bits - CIDR_KEY_PREFIX_BITS) as usize;
        assert!((prefix..128).all(|i| !bit(&d.addr, i)), "bits set past the prefix: {bits} {:?}", d.addr);
        assert!(seen.insert((*bits, d.kind, d.addr)), "a CIDR key written twice");
    }

    // Each list matches, through the trie, exactly its own addresses.
    let local: BTreeSet<IpNet> = if p.loopback == LoopbackMode::Osm {
        BTreeSet::new()
    } else {
        p.local_addresses.iter().map(|a| canonical_net(IpNet::from(*a))).collect()
    };
    let empty = BTreeSet::new();
    let lists: [(u8, &BTreeSet<IpNet>); 4] = [
        (cidr_kind::OUTBOUND_EXCLUDE, &p.outbound_ip_range_exclusion),
        (cidr_kind::OUTBOUND_INCLUDE, p.outbound_ip_range_inclusion.as_ref().unwrap_or(&empty)),
        (cidr_kind::INBOUND_SOURCE_EXCLUDE, &p.inbound_source_exclusion),
        (cidr_kind::LOCAL_ADDRESS, &local),
    ];
    let mut addrs: Vec<IpAddr> = lists.iter().flat_map(|(_, l)| l.iter().flat_map(probes)).collect();
    addrs.extend(fixed_addresses());
    for (kind, list) in lists {
        for a in &addrs {
            assert_eq!(
                trie_hit(&e.cidrs, id, kind, *a),
                in_nets(list, *a),
                "kind {kind}: address {a} in the trie is not as in the list {list:?}"
            );
        }
    }
}

/// Addresses every connection set tries.
pub fn fixed_addresses() -> Vec<IpAddr> {
    [
        "127.0.0.1",
        "127.0.0.6",
        "127.1.2.3",
        "0.0.0.0",
        "255.255.255.255",
        "192.0.2.10",
        "198.51.100.7",
        "203.0.113.200",
        "198.18.0.1",
        "::1",
        "::",
        "::ffff:192.0.2.10",
        "::ffff:127.0.0.1",
        "2001:db8::1",
        "fe80::1",
        "64:ff9b::c000:20a",
        "::192.0.2.10",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

fn same_v4_outcome(oracle: NatOutcome, verdict: Verdict) -> bool {
    match (oracle, verdict) {
        (NatOutcome::Redirect(a), Verdict::Redirect(b)) => {
            let b_ip = match b.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(b.ip(), IpAddr::V4),
                v4 => v4,
            };
            IpAddr::V4(*a.ip()) == b_ip && a.port() == b.port()
        }
        (NatOutcome::Unchanged, Verdict::Pass(_)) => true,
        _ => false,
    }
}

/// Whether `preset`'s own init container can write `p` (what the property
/// tests restrict themselves to): its proxy identity, ports, loopback
/// rules, and only the lists it has.
pub fn oracle_expresses(preset: Preset, p: &Policy) -> bool {
    let d = MeshSettings::for_preset(preset);
    let gid_ok = match preset {
        Preset::Istio => p.proxy_gid == Some(p.proxy_uid),
        Preset::Osm => true,
        Preset::Linkerd | Preset::Kuma => p.proxy_gid.is_none(),
    };
    let (linkerd, kuma) = (preset == Preset::Linkerd, preset == Preset::Kuma);
    let reserved: BTreeSet<u16> = d.reserved_inbound_ports.iter().copied().collect();
    gid_ok
        && p.proxy_cgroup.is_none()
        && p.inbound
        && (p.outbound_port, p.inbound_port, p.loopback) == (d.outbound_port, d.inbound_port, d.loopback)
        && p.outbound_port_inclusion.is_none()
        && p.inbound_port_inclusion.is_none()
        && reserved.is_subset(&p.inbound_port_exclusion)
        && !(linkerd && !p.outbound_ip_range_exclusion.is_empty())
        && !((linkerd || kuma) && p.outbound_ip_range_inclusion.is_some())
        && !(!(linkerd || kuma) && !p.inbound_source_exclusion.is_empty())
}

/// The evaluator and the map encoding agree on every connection; the
/// decision does not depend on how an IPv4 destination is written; where
/// the dialect's iptables rules can express `p`, they agree too (IPv4:
/// they are IPv4 rules).
pub fn check_connections(preset: Preset, p: &Policy, id: u32, conns: &[OutboundConn], inbound: &[InboundConn]) {
    let e = map_entries(p, id);
    let table = oracle_expresses(preset, p)
        .then(|| NatTable::from_commands(&oracle_commands(preset, p)).expect("the oracle's own commands parse"));
    for c in conns {
        let v = evaluate(p, c);
        assert_eq!(evaluate_entries(&e, c), v, "maps and evaluator differ on {c:?}");
        if let Verdict::Redirect(to) = v {
            assert_eq!(to.is_ipv4(), c.dst.is_ipv4(), "redirect target of another family: {c:?} -> {to}");
            assert!(to.ip().is_loopback() || to.ip().to_canonical().is_loopback(), "redirected off the host: {to}");
        }
        if c.protocol != Protocol::Tcp {
            assert_eq!(v, Verdict::Pass(Bypass::NotTcp));
        }
        let v4 = match c.dst {
            SocketAddr::V4(d) => Some(d),
            SocketAddr::V6(d) => d.ip().to_ipv4_mapped().map(|ip| SocketAddrV4::new(ip, d.port())),
        };
        if let Some(v4) = v4 {
            let other = OutboundConn {
                dst: match c.dst {
                    SocketAddr::V4(_) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
                    SocketAddr::V6(_) => SocketAddr::V4(v4),
                },
                ..*c
            };
            let w = evaluate(p, &other);
            let strip = |v: Verdict| match v {
                Verdict::Redirect(a) => Verdict::Redirect(SocketAddr::new(a.ip().to_canonical(), a.port())),
                pass => pass,
            };
            assert_eq!(strip(v), strip(w), "{c:?} and {other:?} decided differently");
            if let Some(t) = &table {
                let o = t.output(c, &p.local_addresses);
                assert!(same_v4_outcome(o, v), "{preset:?} rules: {o:?}, evaluator: {v:?}, for {c:?} under {p:?}");
            }
        }
    }
    for c in inbound {
        let v = evaluate_inbound(p, c);
        if let Verdict::Redirect(d) = v {
            assert_eq!(d, c.dst, "the proxy must read back the dialed address");
        }
        let (Some(t), SocketAddr::V4(dst), IpAddr::V4(src), false) = (&table, c.dst, c.src, c.local_client) else {
            continue;
        };
        // osm-init's static rules do not know osm-healthcheck's port, which
        // the OSM preset reserves (docs/dialects.md).
        if preset == Preset::Osm && dst.port() == redirector_policy::oracle::OSM_HEALTHCHECK_PORT {
            continue;
        }
        match (t.prerouting(src, dst), v) {
            (NatOutcome::Redirect(a), Verdict::Redirect(_)) => assert_eq!(a.port(), p.inbound_port),
            (NatOutcome::Unchanged, Verdict::Pass(_)) => {}
            (NatOutcome::Redirect(a), Verdict::Pass(_)) if dst.port() == p.inbound_port => {
                assert_eq!(a.port(), dst.port())
            }
            (o, v) => panic!("{preset:?} PREROUTING {o:?}, evaluator {v:?}, for {c:?} under {p:?}"),
        }
    }
}

/// A few hundred connections at the edges of `p`'s rules: probes of every
/// list, the fixed addresses, both spellings of IPv4, the proxy's and an
/// application's identity, the 127.0.0.6 passthrough source.
pub fn edge_connections(p: &Policy) -> (Vec<OutboundConn>, Vec<InboundConn>) {
    let mut addrs: Vec<IpAddr> = fixed_addresses();
    for set in [&p.outbound_ip_range_exclusion, &p.inbound_source_exclusion]
        .into_iter()
        .chain(p.outbound_ip_range_inclusion.as_ref())
    {
        addrs.extend(set.iter().take(8).flat_map(probes));
    }
    addrs.extend(p.local_addresses.iter().copied());
    let mut ports: Vec<u16> = vec![80, p.outbound_port, p.inbound_port];
    ports.extend(p.outbound_port_exclusion.iter().chain(&p.inbound_port_exclusion).take(3));
    ports.extend(p.outbound_port_inclusion.iter().flatten().take(2));
    ports.extend(p.inbound_port_inclusion.iter().flatten().take(2));
    let mut out = Vec::new();
    let mut inbound = Vec::new();
    for (n, ip) in addrs.iter().enumerate() {
        for port in &ports {
            let dst = SocketAddr::new(*ip, *port);
            let passthrough = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)));
            for (uid, src) in [(p.proxy_uid, None), (1000, None), (p.proxy_uid, passthrough), (1000, passthrough)] {
                out.push(OutboundConn { src, ..OutboundConn::tcp(uid, dst) });
            }
            inbound.push(InboundConn {
                dst: SocketAddr::new("198.18.0.1".parse().unwrap(), *port),
                local_client: n == 0,
                src: *ip,
            });
        }
    }
    (out, inbound)
}
