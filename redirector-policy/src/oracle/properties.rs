//! Property tests: for random policies and connections, the osm-init rule
//! set (run through the nat interpreter), the policy evaluator and the map
//! encoding all agree.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use proptest::prelude::*;

use ipnet::Ipv4Net;

use super::*;
use crate::{
    compile, evaluate, evaluate_entries, evaluate_inbound, istio_annotations, map_entries, map_entries_with,
    osm_annotations, parse_annotations, InboundConn, MeshSettings, OutboundConn, Preset, Protocol, Verdict,
    WorkloadAnnotations,
};

const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

const BASES: [[u8; 4]; 5] = [[192, 0, 2, 0], [198, 51, 100, 0], [203, 0, 113, 0], [198, 18, 0, 0], [127, 0, 0, 0]];
const PORTS: [u16; 8] = [22, 80, 443, 6379, 7070, 15000, 15001, 65535];

fn addr() -> impl Strategy<Value = Ipv4Addr> {
    (0..BASES.len(), any::<u8>()).prop_map(|(b, low)| {
        let o = BASES[b];
        Ipv4Addr::new(o[0], o[1], o[2], low)
    })
}

fn net() -> impl Strategy<Value = Ipv4Net> {
    (addr(), 0u8..=32).prop_map(|(a, len)| Ipv4Net::new(a, len).unwrap().trunc())
}

fn ports() -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(prop::sample::select(PORTS.to_vec()), 0..4)
}

/// Random lists, limited to what `preset`'s own init container can
/// express (Linkerd: no outbound IP lists; Linkerd/Kuma: no inclusion
/// lists; OSM/Istio: no inbound source exclusions).
fn lists(preset: Preset) -> impl Strategy<Value = WorkloadAnnotations> {
    let nets = || prop::collection::vec(net(), 0..3);
    (ports(), nets(), nets(), ports(), nets()).prop_map(move |(op, ex, inc, ip, src)| {
        let v4 = |v: Vec<Ipv4Net>| v.into_iter().map(IpNet::V4).collect::<Vec<_>>();
        let (linkerd, kuma) = (preset == Preset::Linkerd, preset == Preset::Kuma);
        WorkloadAnnotations {
            outbound_port_exclusion: op,
            outbound_ip_range_exclusion: if linkerd { Vec::new() } else { v4(ex) },
            outbound_ip_range_inclusion: if linkerd || kuma { Vec::new() } else { v4(inc) },
            inbound_port_exclusion: ip,
            inbound_source_exclusion: if linkerd || kuma { v4(src) } else { Vec::new() },
            ..WorkloadAnnotations::default()
        }
    })
}

/// The empty inclusion lists every dialect can be given, as its parsers
/// read them: the mesh-wide port inclusion lists given as `[]` (an empty
/// list adds no rule: no restriction, like `outboundIPRangeInclusionList:
/// []`), and, under Istio, `includeOutboundPorts: ""` (`-q ""` adds no
/// rule: no restriction), `includeInboundPorts: ""` (`-b ""`: no capture
/// rule, nothing redirected inbound) or `"*"`.
fn empty_inclusions(preset: Preset) -> impl Strategy<Value = (Option<&'static str>, Option<&'static str>, bool, bool)> {
    let istio = preset == Preset::Istio;
    let pod_value =
        move || prop::option::of(prop::sample::select(vec!["", "*"])).prop_map(move |v| if istio { v } else { None });
    (pod_value(), pod_value(), any::<bool>(), any::<bool>())
}

fn policy_for(preset: Preset) -> impl Strategy<Value = Policy> {
    (
        lists(preset),
        lists(preset),
        prop::sample::select(vec![1500u32, 1337]),
        prop::option::of(Just(1337u32)),
        empty_inclusions(preset),
    )
        .prop_map(move |(mesh, mut pod, uid, gid, (out_ports, in_ports, mesh_out, mesh_in))| {
            let mut given = BTreeMap::new();
            if let Some(v) = out_ports {
                given.insert(istio_annotations::INCLUDE_OUTBOUND_PORTS.to_string(), v.to_string());
            }
            if let Some(v) = in_ports {
                given.insert(istio_annotations::INCLUDE_INBOUND_PORTS.to_string(), v.to_string());
            }
            let parsed = parse_annotations(preset, &given).expect("empty and wildcard inclusions parse");
            pod.outbound_port_inclusion = parsed.outbound_port_inclusion;
            pod.inbound_port_inclusion = parsed.inbound_port_inclusion;
            let empty = |given: bool| given.then(Vec::new);
            let mesh = MeshSettings {
                outbound_port_inclusion: empty(mesh_out),
                inbound_port_inclusion: empty(mesh_in),
                proxy_uid: uid,
                proxy_gid: match preset {
                    // istio-iptables always has a GID rule (-g defaults to -u).
                    Preset::Istio => Some(uid),
                    Preset::Osm => gid,
                    // proxy-init and kuma match the user only.
                    Preset::Linkerd | Preset::Kuma => None,
                },
                outbound_ip_range_exclusion: mesh.outbound_ip_range_exclusion,
                outbound_ip_range_inclusion: mesh.outbound_ip_range_inclusion,
                outbound_port_exclusion: mesh.outbound_port_exclusion,
                inbound_port_exclusion: mesh.inbound_port_exclusion,
                inbound_source_exclusion: mesh.inbound_source_exclusion,
                ..MeshSettings::for_preset(preset)
            };
            compile(&mesh, &pod).with_local_addresses([IpAddr::V4(POD_IP)])
        })
}

fn any_preset_policy() -> impl Strategy<Value = (Preset, Policy)> {
    prop::sample::select(Preset::ALL.to_vec()).prop_flat_map(|preset| policy_for(preset).prop_map(move |p| (preset, p)))
}

fn policy() -> impl Strategy<Value = Policy> {
    policy_for(Preset::Osm)
}

fn conn() -> impl Strategy<Value = OutboundConn> {
    (
        prop::bool::weighted(0.9),
        prop::sample::select(vec![0u32, 1000, 1337, 1500]),
        prop::sample::select(vec![0u32, 1000, 1337]),
        prop_oneof![addr(), Just(Ipv4Addr::LOCALHOST), Just(POD_IP), Just(Ipv4Addr::new(127, 0, 0, 6))],
        prop::sample::select(PORTS.to_vec()),
        prop::option::of(Just(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)))),
        any::<bool>(),
    )
        .prop_map(|(tcp, uid, gid, ip, port, src, mapped)| OutboundConn {
            // A dual-stack socket binds 127.0.0.6 as ::ffff:127.0.0.6.
            src: src.map(|s| match s {
                IpAddr::V4(v4) if mapped => IpAddr::V6(v4.to_ipv6_mapped()),
                s => s,
            }),
            protocol: if tcp { Protocol::Tcp } else { Protocol::Udp },
            uid,
            gid,
            // The same destination written IPv4-mapped on an AF_INET6
            // socket must be decided identically.
            dst: if mapped {
                SocketAddr::new(ip.to_ipv6_mapped().into(), port)
            } else {
                SocketAddr::V4(SocketAddrV4::new(ip, port))
            },
            cgroup: 0,
        })
}

/// Compares an iptables outcome with a verdict; the proxy address of an
/// IPv4-mapped connection is ::ffff:127.0.0.1.
fn same(oracle: NatOutcome, verdict: Verdict) -> Result<(), TestCaseError> {
    match (oracle, verdict) {
        (NatOutcome::Redirect(a), Verdict::Redirect(b)) => {
            let b_ip = match b.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(b.ip()),
                v4 => v4,
            };
            prop_assert_eq!(IpAddr::V4(*a.ip()), b_ip);
            prop_assert_eq!(a.port(), b.port());
        }
        (NatOutcome::Unchanged, Verdict::Pass(_)) => {}
        (o, v) => prop_assert!(false, "iptables {:?} but policy {:?}", o, v),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// With the proxy identified by its cgroup (any dialect), the
    /// evaluator and the map encoding agree, and a UID or GID decides
    /// nothing: a process outside the proxy's cgroup that runs as the
    /// proxy's UID is treated exactly like any application process.
    #[test]
    fn proxy_cgroup_identity_ignores_uids(
        p in prop::sample::select(Preset::ALL.to_vec()).prop_flat_map(policy_for),
        c in conn(),
        in_proxy in any::<bool>(),
        id in 1u32..u32::MAX,
    ) {
        let p = p.with_proxy_cgroup(4242);
        let c = OutboundConn { cgroup: if in_proxy { 4242 } else { 7 }, ..c };
        let verdict = evaluate(&p, &c);
        prop_assert_eq!(evaluate_entries(&map_entries(&p, id), &c), verdict);
        for (uid, gid) in [(p.proxy_uid, p.proxy_gid.unwrap_or(0)), (1000, 1000), (0, 0)] {
            prop_assert_eq!(evaluate(&p, &OutboundConn { uid, gid, ..c }), verdict);
        }
    }

    #[test]
    fn osm_init_rules_policy_and_maps_agree(p in policy(), c in conn(), id in 1u32..u32::MAX) {
        let table = NatTable::from_commands(&osm_init_commands(&p)).unwrap();
        let verdict = evaluate(&p, &c);
        same(table.output(&c, &p.local_addresses), verdict)?;
        prop_assert_eq!(evaluate_entries(&map_entries(&p, id), &c), verdict);
    }

    #[test]
    fn every_dialects_rules_policy_and_maps_agree((preset, p) in any_preset_policy(), c in conn(), id in 1u32..u32::MAX) {
        let table = NatTable::from_commands(&oracle_commands(preset, &p)).unwrap();
        let verdict = evaluate(&p, &c);
        same(table.output(&c, &p.local_addresses), verdict)?;
        prop_assert_eq!(evaluate_entries(&map_entries(&p, id), &c), verdict);
        // The lists under a shared id, the own addresses under another.
        let local = id.wrapping_add(1).max(1);
        prop_assert_eq!(evaluate_entries(&map_entries_with(&p, id, local), &c), verdict);
    }

    #[test]
    fn inbound_rules_and_policy_agree(
        (preset, policy) in any_preset_policy(),
        port in prop::sample::select(vec![22u16, 80, 4143, 4190, 4567, 8080, 9090, 15003, 15006, 15010, 15020, 15021, 15090, 15901, 15903, 6379]),
        src in addr(),
    ) {
        let dst = SocketAddrV4::new(POD_IP, port);
        let conn = InboundConn { dst: SocketAddr::V4(dst), local_client: false, src: IpAddr::V4(src) };
        {
            let table = NatTable::from_commands(&oracle_commands(preset, &policy)).unwrap();
            let oracle = table.prerouting(src, dst);
            let verdict = evaluate_inbound(&policy, &conn);
            match (oracle, verdict) {
                // The proxy accepts on its inbound port and reads `dst` back.
                (NatOutcome::Redirect(a), Verdict::Redirect(b)) => {
                    prop_assert_eq!(a.port(), policy.inbound_port);
                    prop_assert_eq!(b, SocketAddr::V4(dst));
                }
                (NatOutcome::Unchanged, Verdict::Pass(_)) => {}
                // A connection to the inbound port itself reaches the proxy either way.
                (NatOutcome::Redirect(a), Verdict::Pass(_)) if port == policy.inbound_port => prop_assert_eq!(a.port(), port),
                (o, v) => prop_assert!(false, "iptables {:?} but policy {:?}", o, v),
            }
        }
    }

    #[test]
    fn annotation_parser_never_panics(s in ".{0,40}") {
        let mut a = BTreeMap::new();
        for k in osm_annotations::ALL {
            a.insert(k.to_string(), s.clone());
        }
        let _ = parse_annotations(Preset::Osm, &a);
    }

    #[test]
    fn port_lists_round_trip(ps in prop::collection::vec(1u16..=65535, 0..20)) {
        let mut a = BTreeMap::new();
        let text = ps.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        a.insert(osm_annotations::OUTBOUND_PORT_EXCLUSION.to_string(), text);
        prop_assert_eq!(parse_annotations(Preset::Osm, &a).unwrap().outbound_port_exclusion, ps);
    }
}
