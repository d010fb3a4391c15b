//! The oracle: the osm-init iptables command line for a policy (the exact
//! form of seed 004, plus the dynamic rules osm-injector appends) and a
//! small interpreter of the nat table it builds. The differential kernel
//! test runs these commands for real; the property tests run them through
//! the interpreter against [`crate::evaluate`].
use ipnet::{IpNet, Ipv4Net};

use crate::Policy;

/// osm-init programs IPv4 only (no ip6tables).
fn v4_nets<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Vec<Ipv4Net> {
    nets.into_iter()
        .filter_map(|n| match n {
            IpNet::V4(v4) => Some(*v4),
            IpNet::V6(_) => None,
        })
        .collect()
}

/// osm-healthcheck's port (seed 000), reserved by our OSM preset but not
/// part of seed 004's static rules.
pub const OSM_HEALTHCHECK_PORT: u16 = 15904;

/// Inbound ports osm-init never redirects (Prometheus, probe ports).
pub const OSM_INBOUND_RESERVED: [u16; 4] = [15010, 15901, 15902, 15903];
/// Envoy's admin port (the seed's dead ACCEPT rule after REDIRECT).
pub const OSM_ADMIN_PORT: u16 = 15000;
/// `-m multiport` takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// The commands osm-init runs for `policy`, one `iptables …` per element.
pub fn osm_init_commands(policy: &Policy) -> Vec<String> {
    let ipt = |rule: String| format!("iptables -t nat {rule}");
    let mut c: Vec<String> = ["PROXY_INBOUND", "PROXY_IN_REDIRECT", "PROXY_OUTPUT", "PROXY_REDIRECT"]
        .iter()
        .map(|chain| ipt(format!("-N {chain}")))
        .collect();
    c.push(ipt(format!("-A PROXY_REDIRECT -p tcp -j REDIRECT --to-port {}", policy.outbound_port)));
    c.push(ipt(format!("-A PROXY_REDIRECT -p tcp --dport {OSM_ADMIN_PORT} -j ACCEPT")));
    c.push(ipt("-A OUTPUT -p tcp -j PROXY_OUTPUT".into()));
    c.push(ipt(format!("-A PROXY_OUTPUT -m owner --uid-owner {} -j RETURN", policy.proxy_uid)));
    if let Some(gid) = policy.proxy_gid {
        c.push(ipt(format!("-A PROXY_OUTPUT -m owner --gid-owner {gid} -j RETURN")));
    }
    c.push(ipt("-A PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN".into()));
    match &policy.outbound_ip_range_inclusion {
        None => c.push(ipt("-A PROXY_OUTPUT -j PROXY_REDIRECT".into())),
        Some(nets) => {
            for net in v4_nets(nets) {
                c.push(ipt(format!("-A PROXY_OUTPUT -d {net} -j PROXY_REDIRECT")));
            }
        }
    }
    c.push(ipt(format!("-A PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port {}", policy.inbound_port)));
    c.push(ipt("-A PREROUTING -p tcp -j PROXY_INBOUND".into()));
    for port in OSM_INBOUND_RESERVED {
        c.push(ipt(format!("-A PROXY_INBOUND -p tcp --dport {port} -j RETURN")));
    }
    c.push(ipt("-A PROXY_INBOUND -p tcp -j PROXY_IN_REDIRECT".into()));
    for net in v4_nets(&policy.outbound_ip_range_exclusion) {
        c.push(ipt(format!("-I PROXY_OUTPUT -d {net} -j RETURN")));
    }
    let ports: Vec<u16> = policy.outbound_port_exclusion.iter().copied().collect();
    for chunk in ports.chunks(MULTIPORT_MAX) {
        c.push(ipt(format!("-I PROXY_OUTPUT -p tcp --match multiport --dports {} -j RETURN", join(chunk))));
    }
    // The reserved ports are static rules above (15904 is ours, not seed 004's).
    let ports: Vec<u16> = policy
        .inbound_port_exclusion
        .iter()
        .copied()
        .filter(|p| !OSM_INBOUND_RESERVED.contains(p) && *p != OSM_HEALTHCHECK_PORT)
        .collect();
    for chunk in ports.chunks(MULTIPORT_MAX) {
        c.push(ipt(format!("-I PROXY_INBOUND -p tcp --match multiport --dports {} -j RETURN", join(chunk))));
    }
    c
}

fn join(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The single shell line osm-init's container runs (`sh -c …`).
pub fn osm_init_script(policy: &Policy) -> String {
    osm_init_commands(policy).join(" && ")
}

/// The options of istio-iptables (seed 001) that shape the nat table in
/// REDIRECT mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstioOptions {
    /// -p
    pub proxy_port: u16,
    /// -z
    pub inbound_capture_port: u16,
    /// -u
    pub proxy_uid: u32,
    /// -g (defaults to the uid)
    pub proxy_gid: u32,
    /// -b: None is `*`.
    pub inbound_ports_include: Option<Vec<u16>>,
    /// -d
    pub inbound_ports_exclude: Vec<u16>,
    /// -o
    pub outbound_ports_exclude: Vec<u16>,
    /// -i: None is `*`.
    pub ipv4_ranges_include: Option<Vec<Ipv4Net>>,
    /// -x
    pub ipv4_ranges_exclude: Vec<Ipv4Net>,
}

impl IstioOptions {
    /// The command line istio-injector would write for `policy` (the
    /// istio preset: 22 is built into istio-iptables, the rest is `-d`).
    pub fn from_policy(policy: &Policy) -> Self {
        Self {
            proxy_port: policy.outbound_port,
            inbound_capture_port: policy.inbound_port,
            proxy_uid: policy.proxy_uid,
            proxy_gid: policy.proxy_gid.unwrap_or(policy.proxy_uid),
            inbound_ports_include: policy.inbound_port_inclusion.as_ref().map(|s| s.iter().copied().collect()),
            inbound_ports_exclude: policy.inbound_port_exclusion.iter().copied().filter(|p| *p != 22).collect(),
            outbound_ports_exclude: policy.outbound_port_exclusion.iter().copied().collect(),
            ipv4_ranges_include: policy.outbound_ip_range_inclusion.as_ref().map(v4_nets),
            ipv4_ranges_exclude: v4_nets(&policy.outbound_ip_range_exclusion),
        }
    }
}

/// The nat table istio-iptables builds, as `iptables -t nat -S` lists it
/// (the form seed 001 shows).
pub fn istio_nat_listing(o: &IstioOptions) -> Vec<String> {
    let mut l: Vec<String> =
        ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"].iter().map(|c| format!("-P {c} ACCEPT")).collect();
    for c in ["ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"] {
        l.push(format!("-N {c}"));
    }
    l.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
    l.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".into());
    match &o.inbound_ports_include {
        None => {
            l.push("-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN".into());
            for p in &o.inbound_ports_exclude {
                l.push(format!("-A ISTIO_INBOUND -p tcp -m tcp --dport {p} -j RETURN"));
            }
            l.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
        }
        Some(ports) => {
            for p in ports {
                l.push(format!("-A ISTIO_INBOUND -p tcp -m tcp --dport {p} -j ISTIO_IN_REDIRECT"));
            }
        }
    }
    // (seed 001 sends a listed-ports inbound capture to -p; modern
    // istio-iptables and redirector use -z in both modes)
    l.push(format!("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}", o.inbound_capture_port));
    for p in &o.outbound_ports_exclude {
        l.push(format!("-A ISTIO_OUTPUT -p tcp -m tcp --dport {p} -j RETURN"));
    }
    l.push("-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN".into());
    l.push("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ISTIO_IN_REDIRECT".into());
    l.push(format!("-A ISTIO_OUTPUT -m owner --uid-owner {} -j RETURN", o.proxy_uid));
    l.push(format!("-A ISTIO_OUTPUT -m owner --gid-owner {} -j RETURN", o.proxy_gid));
    l.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
    for net in &o.ipv4_ranges_exclude {
        l.push(format!("-A ISTIO_OUTPUT -d {net} -j RETURN"));
    }
    match &o.ipv4_ranges_include {
        None => l.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into()),
        Some(nets) => {
            for net in nets {
                l.push(format!("-A ISTIO_OUTPUT -d {net} -j ISTIO_REDIRECT"));
            }
        }
    }
    l.push(format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}", o.proxy_port));
    l
}

/// linkerd2-proxy-init's nat rules for `p` (its "IPTables Reference" and
/// `FirewallConfiguration`: ignored ports in multiport chunks of 15,
/// `--subnets-to-ignore` as `-s` RETURNs, proxy UID, `-o lo` RETURN), as
/// `iptables -t nat` commands. Linkerd has no outbound IP lists and no
/// inclusion lists; those fields of `p` must be empty.
pub fn linkerd_commands(p: &Policy) -> Vec<String> {
    let mut v = vec!["-N PROXY_INIT_REDIRECT".to_string()];
    for chunk in p.inbound_port_exclusion.iter().copied().collect::<Vec<_>>().chunks(15) {
        v.push(format!("-A PROXY_INIT_REDIRECT -p tcp --match multiport --dports {} -j RETURN", join(chunk)));
    }
    for net in v4_nets(&p.inbound_source_exclusion) {
        v.push(format!("-A PROXY_INIT_REDIRECT -j RETURN -s {net}"));
    }
    v.push(format!("-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-port {}", p.inbound_port));
    v.push("-A PREROUTING -j PROXY_INIT_REDIRECT".into());
    v.push("-N PROXY_INIT_OUTPUT".into());
    v.push(format!("-A PROXY_INIT_OUTPUT -m owner --uid-owner {} -j RETURN", p.proxy_uid));
    v.push("-A PROXY_INIT_OUTPUT -o lo -j RETURN".into());
    for chunk in p.outbound_port_exclusion.iter().copied().collect::<Vec<_>>().chunks(15) {
        v.push(format!("-A PROXY_INIT_OUTPUT -p tcp --match multiport --dports {} -j RETURN", join(chunk)));
    }
    v.push(format!("-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-port {}", p.outbound_port));
    v.push("-A OUTPUT -j PROXY_INIT_OUTPUT".into());
    v.into_iter().map(|r| format!("iptables -t nat {r}")).collect()
}

/// Kuma's transparent-proxy nat rules for `p` (kuma's iptables builder,
/// IPv4, DNS redirection off): outbound IP exclusions in OUTPUT, the
/// 127.0.0.6 passthrough, only kuma-dp's loopback connections to the
/// inbound chain, everyone else's loopback returned. Kuma has no outbound
/// inclusion lists; those fields of `p` must be empty.
pub fn kuma_commands(p: &Policy) -> Vec<String> {
    let uid = p.proxy_uid;
    let mut v: Vec<String> =
        ["KUMA_MESH_INBOUND", "KUMA_MESH_OUTBOUND", "KUMA_MESH_INBOUND_REDIRECT", "KUMA_MESH_OUTBOUND_REDIRECT"]
            .iter()
            .map(|c| format!("-N {c}"))
            .collect();
    for net in v4_nets(&p.outbound_ip_range_exclusion) {
        v.push(format!("-A OUTPUT -d {net} -j RETURN"));
    }
    v.push("-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND".into());
    v.push("-A PREROUTING -p tcp -j KUMA_MESH_INBOUND".into());
    for net in v4_nets(&p.inbound_source_exclusion) {
        v.push(format!("-A KUMA_MESH_INBOUND -s {net} -j RETURN"));
    }
    for port in &p.inbound_port_exclusion {
        v.push(format!("-A KUMA_MESH_INBOUND -p tcp --dport {port} -j RETURN"));
    }
    v.push("-A KUMA_MESH_INBOUND -p tcp -j KUMA_MESH_INBOUND_REDIRECT".into());
    for port in &p.outbound_port_exclusion {
        v.push(format!("-A KUMA_MESH_OUTBOUND -p tcp --dport {port} -j RETURN"));
    }
    v.push("-A KUMA_MESH_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN".into());
    v.push(format!(
        "-A KUMA_MESH_OUTBOUND -p tcp -o lo ! -d 127.0.0.1/32 -m owner --uid-owner {uid} -j KUMA_MESH_INBOUND_REDIRECT"
    ));
    v.push(format!("-A KUMA_MESH_OUTBOUND -p tcp -o lo -m owner ! --uid-owner {uid} -j RETURN"));
    v.push(format!("-A KUMA_MESH_OUTBOUND -m owner --uid-owner {uid} -j RETURN"));
    v.push("-A KUMA_MESH_OUTBOUND -d 127.0.0.1/32 -j RETURN".into());
    v.push("-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT".into());
    v.push(format!("-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {}", p.inbound_port));
    v.push(format!("-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {}", p.outbound_port));
    v.into_iter().map(|r| format!("iptables -t nat {r}")).collect()
}

/// The rule set the mesh's own init container would program for `p`.
pub fn oracle_commands(preset: crate::Preset, p: &Policy) -> Vec<String> {
    use crate::Preset;
    match preset {
        Preset::Osm => osm_init_commands(p),
        Preset::Istio => listing_to_commands(&istio_nat_listing(&IstioOptions::from_policy(p))),
        Preset::Linkerd => linkerd_commands(p),
        Preset::Kuma => kuma_commands(p),
    }
}

/// `iptables -t nat …` commands that build `listing` (policies skipped).
pub fn listing_to_commands(listing: &[String]) -> Vec<String> {
    listing.iter().filter(|r| !r.starts_with("-P ")).map(|r| format!("iptables -t nat {r}")).collect()
}

mod nat;
#[cfg(test)]
mod properties;

pub use nat::{NatOutcome, NatTable};

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        net::{IpAddr, Ipv4Addr},
    };

    use super::*;
    use crate::{OutboundConn, Protocol};

    /// The client of the inbound cases (the peer namespace's address).
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    use crate::{compile, evaluate, parse_config, MeshSettings, Verdict, WorkloadAnnotations};

    /// The osm-init argument line of seed 004 (OSM v1.0 demo `curl` pod),
    /// verbatim; its one dynamic rule excludes 54.91.118.50/32.
    const SEED_004: &str = include_str!("../../tests/fixtures/osm-init-seed-004.txt");

    #[test]
    fn reproduces_the_seed_command_line_exactly() {
        let mesh = MeshSettings {
            outbound_ip_range_exclusion: vec!["54.91.118.50/32".parse().unwrap()],
            ..MeshSettings::default()
        };
        let p = compile(&mesh, &WorkloadAnnotations::default());
        assert_eq!(osm_init_script(&p), SEED_004.trim());
    }

    #[test]
    fn interpreter_runs_the_seed_rules() {
        let cmds: Vec<String> = SEED_004.trim().split(" && ").map(str::to_owned).collect();
        let t = NatTable::from_commands(&cmds).unwrap();
        let c = |uid, dst: &str| OutboundConn::tcp(uid, dst.parse().unwrap());
        let none = BTreeSet::new();
        let proxy = NatOutcome::Redirect("127.0.0.1:15001".parse().unwrap());
        assert_eq!(t.output(&c(0, "192.0.2.1:80"), &none), proxy);
        assert_eq!(t.output(&c(0, "192.0.2.1:15000"), &none), proxy);
        assert_eq!(t.output(&c(1500, "192.0.2.1:80"), &none), NatOutcome::Unchanged);
        assert_eq!(t.output(&c(0, "127.0.0.1:80"), &none), NatOutcome::Unchanged);
        assert_eq!(t.output(&c(0, "54.91.118.50:443"), &none), NatOutcome::Unchanged);
        let udp = OutboundConn { protocol: Protocol::Udp, ..c(0, "192.0.2.1:53") };
        assert_eq!(t.output(&udp, &none), NatOutcome::Unchanged);
        let inbound = |d: &str| t.prerouting(PEER, d.parse().unwrap());
        assert_eq!(inbound("198.18.0.1:8080"), NatOutcome::Redirect("198.18.0.1:15003".parse().unwrap()));
        for reserved in OSM_INBOUND_RESERVED {
            assert_eq!(inbound(&format!("198.18.0.1:{reserved}")), NatOutcome::Unchanged);
        }
    }

    /// seed 001's `iptables -t nat -S` after
    /// `istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x "" -b * -d 15020`.
    const SEED_001: &str = include_str!("../../tests/fixtures/istio-iptables-seed-001.txt");

    fn seed_001_options() -> IstioOptions {
        IstioOptions {
            proxy_port: 15001,
            inbound_capture_port: 15006,
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_ports_include: None,
            inbound_ports_exclude: vec![15020],
            outbound_ports_exclude: vec![],
            ipv4_ranges_include: None,
            ipv4_ranges_exclude: vec![],
        }
    }

    #[test]
    fn reproduces_the_istio_seed_listing_exactly() {
        let want: Vec<String> = SEED_001.lines().map(str::to_owned).collect();
        assert_eq!(istio_nat_listing(&seed_001_options()), want);
    }

    #[test]
    fn istio_seed_traffic_types() {
        // The six traffic types of seed 002 under the seed 001 rules.
        let t = NatTable::from_commands(&listing_to_commands(&istio_nat_listing(&seed_001_options()))).unwrap();
        let pod: BTreeSet<IpAddr> = ["198.18.0.1".parse().unwrap()].into();
        let c = |uid, dst: &str| OutboundConn::tcp(uid, dst.parse().unwrap());
        let outbound = NatOutcome::Redirect("127.0.0.1:15001".parse().unwrap());
        let inbound = NatOutcome::Redirect("127.0.0.1:15006".parse().unwrap());
        // 1: remote pod -> local pod: PREROUTING to 15006; Envoy then
        //    reaches the app from 127.0.0.6 (RULE 1).
        assert_eq!(
            t.prerouting(PEER, "198.18.0.1:8080".parse().unwrap()),
            NatOutcome::Redirect("198.18.0.1:15006".parse().unwrap())
        );
        let from_passthrough = OutboundConn { src: Some("127.0.0.6".parse().unwrap()), ..c(1337, "198.18.0.1:8080") };
        assert_eq!(t.output(&from_passthrough, &pod), NatOutcome::Unchanged);
        // 2: local pod -> remote pod: app to 15001, Envoy out untouched.
        assert_eq!(t.output(&c(1000, "192.0.2.10:80"), &pod), outbound);
        assert_eq!(t.output(&c(1337, "192.0.2.10:80"), &pod), NatOutcome::Unchanged);
        // 3: Prometheus -> the excluded port.
        assert_eq!(t.prerouting(PEER, "198.18.0.1:15020".parse().unwrap()), NatOutcome::Unchanged);
        assert_eq!(t.prerouting(PEER, "198.18.0.1:22".parse().unwrap()), NatOutcome::Unchanged);
        // 4: local pod -> local pod through its service: app to 15001,
        //    Envoy's upstream (own pod IP) to 15006, then 127.0.0.6.
        assert_eq!(t.output(&c(1337, "198.18.0.1:8080"), &pod), inbound);
        // 5: Envoy's own loopback traffic.
        assert_eq!(t.output(&c(1337, "127.0.0.1:15000"), &pod), NatOutcome::Unchanged);
        // 6: sidecar -> istiod.
        assert_eq!(t.output(&c(1337, "192.0.2.20:15012"), &pod), NatOutcome::Unchanged);
    }

    /// Fuzz finding (policy_compiler, 2026-11-23): the interpreter took a
    /// socket bound to ::ffff:127.0.0.6 for an unbound one, so Istio's
    /// `-s 127.0.0.6/32 -o lo -j RETURN` missed it and the oracle sent the
    /// connection to the inbound listener, where the evaluator (and
    /// connect6, which compares the mapped form) let it pass.
    #[test]
    fn mapped_passthrough_source_matches_the_127_0_0_6_rule() {
        let t = NatTable::from_commands(&listing_to_commands(&istio_nat_listing(&seed_001_options()))).unwrap();
        let pod: BTreeSet<IpAddr> = ["198.18.0.1".parse().unwrap()].into();
        for src in ["127.0.0.6", "::ffff:127.0.0.6"] {
            let c = OutboundConn {
                src: Some(src.parse().unwrap()),
                ..OutboundConn::tcp(1000, "127.255.255.255:15001".parse().unwrap())
            };
            assert_eq!(t.output(&c, &pod), NatOutcome::Unchanged, "{src}");
        }
    }

    #[test]
    fn multiport_rules_are_chunked() {
        let mesh = MeshSettings { outbound_port_exclusion: (1000..1040).collect(), ..MeshSettings::default() };
        let p = compile(&mesh, &WorkloadAnnotations::default());
        let cmds = osm_init_commands(&p);
        assert_eq!(cmds.iter().filter(|c| c.contains("--dports")).count(), 3);
    }

    #[test]
    fn inclusion_rules_replace_the_catch_all() {
        let c = parse_config(
            "mesh:\n  outboundIPRangeInclusionList: [\"192.0.2.0/24\"]\nworkloads:\n  - name: a\n    netns: /x\n",
        )
        .unwrap();
        let p = compile(&c.mesh, &c.workloads[0].annotations);
        let s = osm_init_script(&p);
        assert!(s.contains("-A PROXY_OUTPUT -d 192.0.2.0/24 -j PROXY_REDIRECT"));
        assert!(!s.contains("-A PROXY_OUTPUT -j PROXY_REDIRECT"));
        let t = NatTable::from_commands(&osm_init_commands(&p)).unwrap();
        let conn = |dst: &str| OutboundConn::tcp(0, dst.parse().unwrap());
        let none = BTreeSet::new();
        assert!(matches!(t.output(&conn("192.0.2.9:80"), &none), NatOutcome::Redirect(_)));
        assert_eq!(t.output(&conn("198.51.100.9:80"), &none), NatOutcome::Unchanged);
        assert!(matches!(evaluate(&p, &conn("192.0.2.9:80")), Verdict::Redirect(_)));
    }
}
