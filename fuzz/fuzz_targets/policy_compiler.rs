//! The policy compiler: typed mesh settings + pod annotations → merged
//! policy → map contents. Checks that the merge is the documented one, the
//! map contents are well formed and encode each list exactly, and that the
//! reference evaluator, the map encoding and (where the dialect's own
//! iptables rules can express the policy) the nat-table interpreter decide
//! every connection derived from the input alike.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libfuzzer_sys::fuzz_target;
use redirector_fuzz::{check_connections, check_entries, check_policy, fixed_addresses, probes};
use redirector_policy::{
    compile, map_entries, InboundConn, Inclusion, LoopbackMode, MeshSettings, OutboundConn, Policy, Preset, Protocol,
    WorkloadAnnotations,
};

/// Addresses that make rules match often: documentation ranges, loopback,
/// the pod, mapped and IPv6 ones.
const BASES: [&str; 10] = [
    "192.0.2.0",
    "198.51.100.0",
    "203.0.113.0",
    "198.18.0.0",
    "127.0.0.0",
    "0.0.0.0",
    "2001:db8::",
    "::",
    "::ffff:0.0.0.0",
    "fe80::",
];

#[derive(Arbitrary, Debug)]
struct NetIn {
    base: u8,
    low: u16,
    raw: Option<[u8; 16]>,
    v6: bool,
    prefix: u8,
}

impl NetIn {
    fn net(&self) -> IpNet {
        let ip: IpAddr = match self.raw {
            Some(b) if self.v6 => Ipv6Addr::from(b).into(),
            Some(b) => Ipv4Addr::new(b[0], b[1], b[2], b[3]).into(),
            None => match BASES[self.base as usize % BASES.len()].parse().unwrap() {
                IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) | u32::from(self.low & 0xff)).into(),
                IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) | u128::from(self.low)).into(),
            },
        };
        // Deliberately not truncated: the compiler must canonicalize.
        match ip {
            IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, self.prefix % 33).unwrap()),
            IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, self.prefix % 129).unwrap()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum InclusionIn<T> {
    All,
    Only(Vec<T>),
}

#[derive(Arbitrary, Debug)]
struct ListsIn {
    out_ports: Vec<u16>,
    in_ports: Vec<u16>,
    out_nets: Vec<NetIn>,
    out_incl: Vec<NetIn>,
    src_nets: Vec<NetIn>,
    out_port_incl: Option<InclusionIn<u16>>,
    in_port_incl: Option<InclusionIn<u16>>,
    net_incl_override: Option<InclusionIn<NetIn>>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    preset: u8,
    /// Keep the preset's identity, ports and loopback rules (so that the
    /// dialect's iptables rules can be compared).
    standard: bool,
    uid: u32,
    gid: Option<u32>,
    outbound_port: u16,
    inbound_port: u16,
    inbound: bool,
    loopback: u8,
    mesh: ListsIn,
    pod: ListsIn,
    local: Vec<NetIn>,
    cgroup: Option<u64>,
    id: u32,
    seeds: Vec<ConnIn>,
}

#[derive(Arbitrary, Debug)]
struct ConnIn {
    udp: bool,
    who: u8,
    uid: u32,
    addr: u8,
    port: u8,
    raw_port: u16,
    form: u8,
    src: u8,
    cgroup: bool,
}

fn ports(v: &[u16]) -> Vec<u16> {
    v.iter().copied().filter(|p| *p != 0).collect()
}

fn nets(v: &[NetIn]) -> Vec<IpNet> {
    v.iter().map(NetIn::net).collect()
}

fn inclusion<T, U>(i: &Option<InclusionIn<T>>, f: impl Fn(&[T]) -> Vec<U>) -> Option<Inclusion<U>> {
    i.as_ref().map(|i| match i {
        InclusionIn::All => Inclusion::All,
        InclusionIn::Only(v) => Inclusion::Only(f(v)),
    })
}

fn annotations(l: &ListsIn) -> WorkloadAnnotations {
    WorkloadAnnotations {
        outbound_port_exclusion: ports(&l.out_ports),
        outbound_ip_range_exclusion: nets(&l.out_nets),
        outbound_ip_range_inclusion: nets(&l.out_incl),
        inbound_port_exclusion: ports(&l.in_ports),
        inbound_source_exclusion: nets(&l.src_nets),
        outbound_ip_range_inclusion_override: inclusion(&l.net_incl_override, nets),
        outbound_port_inclusion: inclusion(&l.out_port_incl, ports),
        inbound_port_inclusion: inclusion(&l.in_port_incl, ports),
    }
}

fn mesh(i: &Input, preset: Preset) -> MeshSettings {
    let l = annotations(&i.mesh);
    let mut m = MeshSettings::for_preset(preset);
    if !i.standard {
        m.proxy_uid = i.uid;
        m.proxy_gid = i.gid;
        m.outbound_port = i.outbound_port.max(1);
        m.inbound_port = if i.inbound_port == 0 || i.inbound_port == m.outbound_port {
            m.outbound_port % 65535 + 1
        } else {
            i.inbound_port
        };
        m.inbound = i.inbound;
        m.loopback = LoopbackMode::ALL[i.loopback as usize % 4];
        m.outbound_port_inclusion = match l.outbound_port_inclusion {
            Some(Inclusion::Only(v)) => Some(v),
            _ => None,
        };
        m.inbound_port_inclusion = match l.inbound_port_inclusion {
            Some(Inclusion::Only(v)) => Some(v),
            _ => None,
        };
    }
    m.outbound_port_exclusion.extend(l.outbound_port_exclusion);
    m.inbound_port_exclusion.extend(l.inbound_port_exclusion);
    m.outbound_ip_range_exclusion = l.outbound_ip_range_exclusion;
    m.outbound_ip_range_inclusion = l.outbound_ip_range_inclusion;
    m.inbound_source_exclusion = l.inbound_source_exclusion;
    m
}

/// Connections aimed at the edges of the policy's own rules.
fn connections(p: &Policy, seeds: &[ConnIn]) -> (Vec<OutboundConn>, Vec<InboundConn>) {
    let mut addrs: Vec<IpAddr> = fixed_addresses();
    for set in [&p.outbound_ip_range_exclusion, &p.inbound_source_exclusion]
        .into_iter()
        .chain(p.outbound_ip_range_inclusion.as_ref())
    {
        addrs.extend(set.iter().flat_map(probes));
    }
    addrs.extend(p.local_addresses.iter().copied());
    let mut port_list: Vec<u16> =
        vec![80, 443, 15000, 15001, 15003, 15006, 22, 0, 65535, p.outbound_port, p.inbound_port];
    port_list.extend(p.outbound_port_exclusion.iter().chain(&p.inbound_port_exclusion).take(16));
    port_list
        .extend(p.outbound_port_inclusion.iter().flatten().chain(p.inbound_port_inclusion.iter().flatten()).take(16));
    let mut out = Vec::new();
    let mut inbound = Vec::new();
    for s in seeds.iter().take(64) {
        let ip = addrs[s.addr as usize % addrs.len()];
        let port = if s.port == 255 { s.raw_port } else { port_list[s.port as usize % port_list.len()] };
        let dst = match (ip, s.form % 3) {
            (IpAddr::V4(a), 1) => SocketAddr::new(a.to_ipv6_mapped().into(), port),
            (ip, _) => SocketAddr::new(ip, port),
        };
        let (uid, gid) = match s.who % 4 {
            0 => (p.proxy_uid, p.proxy_uid),
            1 => (s.uid, p.proxy_gid.unwrap_or(s.uid)),
            _ => (s.uid, s.uid),
        };
        let src = match s.src % 4 {
            0 => Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))),
            1 => Some(IpAddr::V6(Ipv4Addr::new(127, 0, 0, 6).to_ipv6_mapped())),
            2 => Some(addrs[(s.addr as usize + 1) % addrs.len()]),
            _ => None,
        };
        out.push(OutboundConn {
            protocol: if s.udp { Protocol::Udp } else { Protocol::Tcp },
            uid,
            gid,
            dst,
            src,
            cgroup: if s.cgroup { p.proxy_cgroup.unwrap_or(1) } else { 7 },
        });
        inbound.push(InboundConn {
            dst: SocketAddr::new("198.18.0.1".parse().unwrap(), port),
            local_client: s.udp && s.cgroup,
            src: ip,
        });
    }
    (out, inbound)
}

fuzz_target!(|data: &[u8]| {
    let Ok(i) = Input::arbitrary(&mut Unstructured::new(data)) else { return };
    let preset = Preset::ALL[i.preset as usize % 4];
    let mesh = mesh(&i, preset);
    let pod = annotations(&i.pod);
    let mut p = compile(&mesh, &pod);
    check_policy(&mesh, &pod, &p);
    p = p.with_local_addresses(i.local.iter().map(|n| n.net().addr()));
    if let Some(c) = i.cgroup {
        p = p.with_proxy_cgroup(c);
    }
    let e = map_entries(&p, i.id);
    check_entries(&p, i.id, &e);
    let (out, inbound) = connections(&p, &i.seeds);
    check_connections(preset, &p, i.id, &out, &inbound);
});
