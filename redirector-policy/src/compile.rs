//! Compile: the merged policy of one workload from the mesh settings and
//! its annotations, as the mesh's injector merges them. Pure.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::{
    dialect::LoopbackMode,
    dialect::WorkloadAnnotations,
    idmap::IdMaps,
    mesh::{Acceleration, MeshSettings},
    values::{canonical_net, Inclusion},
};

/// The merged policy of one workload: mesh settings ∪ pod annotations, as
/// the mesh's injector merges them before it writes the init container's
/// command line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    /// The proxy is identified by this cgroup-v2 id instead of its UID/GID
    /// (filled in by the agent from the workload's `proxyCgroup`).
    pub proxy_cgroup: Option<u64>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub redirect_ip4: Ipv4Addr,
    pub redirect_ip6: Ipv6Addr,
    pub inbound: bool,
    pub loopback: LoopbackMode,
    /// `mesh.acceleration` (sockmap for the app ↔ proxy connections).
    pub acceleration: Acceleration,
    pub outbound_port_exclusion: BTreeSet<u16>,
    /// None: every port.
    pub outbound_port_inclusion: Option<BTreeSet<u16>>,
    pub outbound_ip_range_exclusion: BTreeSet<IpNet>,
    /// None: every destination.
    pub outbound_ip_range_inclusion: Option<BTreeSet<IpNet>>,
    /// Includes the preset's reserved ports.
    pub inbound_port_exclusion: BTreeSet<u16>,
    /// None: every port.
    pub inbound_port_inclusion: Option<BTreeSet<u16>>,
    /// Inbound connections from these sources are not redirected.
    pub inbound_source_exclusion: BTreeSet<IpNet>,
    /// The workload's own addresses (the "-o lo" test of `LoopbackMode`);
    /// filled in by the agent from the network namespace.
    pub local_addresses: BTreeSet<IpAddr>,
    /// DNS capture, when asked for.
    pub dns: Option<DnsCapture>,
}

/// DNS capture: UDP and TCP to port 53 of the workload's nameservers go
/// to the proxy's DNS listener (istio-iptables' `--redirect-dns`, Kuma's
/// `--redirect-dns`), all of port 53 with [`DnsServers::All`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DnsCapture {
    /// The proxy's DNS listener (15053 for Istio and Kuma).
    pub port: u16,
    pub servers: DnsServers,
    /// istio-iptables' order of the DNS rules (see
    /// `redirector_common::flags::DNS_ISTIO_ORDER`); Kuma's otherwise.
    pub istio_order: bool,
    /// IPv6 nameservers too (istio-iptables programs ip6tables only for
    /// an IPv6 or dual-stack pod; else IPv6 DNS is left alone).
    pub ipv6: bool,
}

/// Which destinations DNS capture takes (on port 53).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DnsServers {
    /// Every address (`--capture-all-dns`, `--redirect-all-dns-traffic`).
    All,
    /// The workload's nameservers, as its resolv.conf lists them: filled
    /// in by the agent (`Listed` once read).
    ResolvConf,
    /// These nameservers (IPv4-mapped ones as IPv4).
    Listed(BTreeSet<IpAddr>),
}

impl DnsCapture {
    /// Whether port 53 of `ip` (IPv4-mapped as IPv4) is captured.
    pub fn takes(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        (ip.is_ipv4() || self.ipv6)
            && match &self.servers {
                DnsServers::All => true,
                DnsServers::Listed(s) => s.contains(&ip),
                DnsServers::ResolvConf => false,
            }
    }

    /// The ranges the maps hold for it: each nameserver of a family it
    /// captures, or the whole of each family for `All`.
    pub fn ranges(&self) -> Vec<IpNet> {
        let family = |ip: &IpAddr| ip.is_ipv4() || self.ipv6;
        match &self.servers {
            DnsServers::All => {
                let mut v = vec![IpNet::V4(Default::default())];
                if self.ipv6 {
                    v.push(IpNet::V6(Default::default()));
                }
                v
            }
            DnsServers::Listed(s) => s.iter().filter(|ip| family(ip)).map(|ip| IpNet::from(*ip)).collect(),
            DnsServers::ResolvConf => Vec::new(),
        }
    }
}

/// The part of a [`Policy`] that the list maps hold under a `policy_id`:
/// its port and IP-range lists. Workloads whose lists are equal share one
/// id and one set of entries (their own addresses are apart, see
/// [`Policy::own_addresses`]); the agent finds them by this key.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Lists<'a> {
    pub outbound_port_exclusion: &'a BTreeSet<u16>,
    pub outbound_port_inclusion: &'a Option<BTreeSet<u16>>,
    pub outbound_ip_range_exclusion: &'a BTreeSet<IpNet>,
    pub outbound_ip_range_inclusion: &'a Option<BTreeSet<IpNet>>,
    pub inbound_port_exclusion: &'a BTreeSet<u16>,
    pub inbound_port_inclusion: &'a Option<BTreeSet<u16>>,
    pub inbound_source_exclusion: &'a BTreeSet<IpNet>,
    /// The nameservers DNS capture takes (in the list maps), and whether
    /// IPv6 ones count.
    pub dns_servers: Option<(&'a DnsServers, bool)>,
}

pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn compile(mesh: &MeshSettings, pod: &WorkloadAnnotations) -> Policy {
    let union_ports = |a: &[u16], b: &[u16]| a.iter().chain(b).copied().collect::<BTreeSet<_>>();
    let union_nets = |a: &[IpNet], b: &[IpNet]| a.iter().chain(b).map(|n| canonical_net(*n)).collect::<BTreeSet<_>>();
    let outbound_ip_range_inclusion = match &pod.outbound_ip_range_inclusion_override {
        Some(Inclusion::All) => None,
        Some(Inclusion::Only(v)) => Some(union_nets(v, &[])),
        None => {
            let u = union_nets(&mesh.outbound_ip_range_inclusion, &pod.outbound_ip_range_inclusion);
            (!u.is_empty()).then_some(u)
        }
    };
    // A mesh-wide inclusion list that is empty restricts nothing, like the
    // IP-range one above; a pod's `Only` is taken as its dialect's parser
    // gave it (Istio's `includeInboundPorts: ""` redirects no port, as
    // istio-iptables' `-b ""` adds no capture rule).
    let over = |pod: &Option<Inclusion<u16>>, mesh: &Option<Vec<u16>>| match pod {
        Some(Inclusion::All) => None,
        Some(Inclusion::Only(v)) => Some(v.iter().copied().collect()),
        None => mesh.as_ref().filter(|v| !v.is_empty()).map(|v| v.iter().copied().collect()),
    };
    let mut inbound_port_exclusion = union_ports(&mesh.inbound_port_exclusion, &pod.inbound_port_exclusion);
    inbound_port_exclusion.extend(mesh.reserved_inbound_ports.iter().copied());
    Policy {
        proxy_uid: mesh.proxy_uid,
        proxy_gid: mesh.proxy_gid,
        proxy_cgroup: None,
        outbound_port: mesh.outbound_port,
        inbound_port: mesh.inbound_port,
        redirect_ip4: Ipv4Addr::LOCALHOST,
        redirect_ip6: Ipv6Addr::LOCALHOST,
        inbound: mesh.inbound,
        loopback: mesh.loopback,
        acceleration: mesh.acceleration,
        outbound_port_exclusion: union_ports(&mesh.outbound_port_exclusion, &pod.outbound_port_exclusion),
        outbound_port_inclusion: over(&pod.outbound_port_inclusion, &mesh.outbound_port_inclusion),
        outbound_ip_range_exclusion: union_nets(&mesh.outbound_ip_range_exclusion, &pod.outbound_ip_range_exclusion),
        outbound_ip_range_inclusion,
        inbound_port_exclusion,
        inbound_port_inclusion: over(&pod.inbound_port_inclusion, &mesh.inbound_port_inclusion),
        inbound_source_exclusion: union_nets(&mesh.inbound_source_exclusion, &pod.inbound_source_exclusion),
        local_addresses: BTreeSet::new(),
        dns: mesh.dns.as_ref().map(|d| DnsCapture {
            port: d.port,
            servers: match (&d.servers, d.capture_all) {
                (_, true) => DnsServers::All,
                (Some(listed), false) => DnsServers::Listed(listed.iter().copied().map(canonical_ip).collect()),
                (None, false) => DnsServers::ResolvConf,
            },
            istio_order: mesh.preset == crate::Preset::Istio,
            ipv6: d.ipv6,
        }),
    }
}

impl Policy {
    /// Its lists, the content key of the entries it shares.
    pub fn lists(&self) -> Lists<'_> {
        Lists {
            outbound_port_exclusion: &self.outbound_port_exclusion,
            outbound_port_inclusion: &self.outbound_port_inclusion,
            outbound_ip_range_exclusion: &self.outbound_ip_range_exclusion,
            outbound_ip_range_inclusion: &self.outbound_ip_range_inclusion,
            inbound_port_exclusion: &self.inbound_port_exclusion,
            inbound_port_inclusion: &self.inbound_port_inclusion,
            inbound_source_exclusion: &self.inbound_source_exclusion,
            dns_servers: self.dns.as_ref().map(|d| (&d.servers, d.ipv6)),
        }
    }

    /// Whether the agent must read the workload's resolv.conf for its
    /// nameservers.
    pub fn needs_resolv_conf(&self) -> bool {
        matches!(self.dns, Some(DnsCapture { servers: DnsServers::ResolvConf, .. }))
    }

    /// The same policy knowing the workload's nameservers (from its
    /// resolv.conf); changes nothing unless it asked for them.
    pub fn with_nameservers(mut self, servers: impl IntoIterator<Item = IpAddr>) -> Self {
        if let Some(d) = self.dns.as_mut().filter(|d| d.servers == DnsServers::ResolvConf) {
            d.servers = DnsServers::Listed(servers.into_iter().map(canonical_ip).collect());
        }
        self
    }

    /// The workload's own addresses as the maps need them: only a loopback
    /// mode with the "-o lo" test looks them up.
    pub fn own_addresses(&self) -> &BTreeSet<IpAddr> {
        static NONE: BTreeSet<IpAddr> = BTreeSet::new();
        if self.loopback == LoopbackMode::Osm {
            &NONE
        } else {
            &self.local_addresses
        }
    }

    /// The same policy identifying the proxy by its cgroup.
    pub fn with_proxy_cgroup(mut self, cgroup_id: u64) -> Self {
        self.proxy_cgroup = Some(cgroup_id);
        self
    }

    /// The same policy with the proxy's UID and GID (IDs inside the
    /// workload's user namespace) as the initial user namespace sees them,
    /// which is what the data path compares (see [`crate::idmap`]). An ID
    /// the namespace does not map is an error naming the key, the value
    /// and the map.
    pub fn in_user_namespace(mut self, maps: &IdMaps) -> anyhow::Result<Self> {
        let uid = self.proxy_uid;
        self.proxy_uid = maps.uid.to_outside(uid).ok_or_else(|| {
            anyhow::anyhow!(
                "key `proxyUID`: value {uid} is not mapped in the workload's user namespace (uid_map: {}): its proxy \
                 cannot run as that UID",
                maps.uid
            )
        })?;
        if let Some(gid) = self.proxy_gid {
            self.proxy_gid = Some(maps.gid.to_outside(gid).ok_or_else(|| {
                anyhow::anyhow!(
                    "key `proxyGID`: value {gid} is not mapped in the workload's user namespace (gid_map: {})",
                    maps.gid
                )
            })?);
        }
        Ok(self)
    }

    /// The same policy knowing the workload's own addresses.
    pub fn with_local_addresses(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.local_addresses = addrs.into_iter().map(canonical_ip).collect();
        self
    }
}

#[cfg(test)]
mod user_namespace_tests {
    use super::*;
    use crate::{idmap::IdMap, Preset};

    fn maps(uid: &str, gid: &str) -> IdMaps {
        IdMaps { uid: IdMap::parse(uid).unwrap(), gid: IdMap::parse(gid).unwrap() }
    }

    #[test]
    fn proxy_ids_are_translated_to_the_initial_namespace() {
        let istio = MeshSettings::for_preset(Preset::Istio);
        let p = compile(&istio, &WorkloadAnnotations::default());
        assert_eq!((p.proxy_uid, p.proxy_gid), (1337, Some(1337)));
        let t = p.clone().in_user_namespace(&maps("0 524288 65536", "0 589824 65536")).unwrap();
        assert_eq!((t.proxy_uid, t.proxy_gid), (524288 + 1337, Some(589824 + 1337)));
        assert_eq!(t, Policy { proxy_uid: 525625, proxy_gid: Some(591161), ..p.clone() }, "nothing else changes");
        // The identity map changes nothing.
        let id = p.clone().in_user_namespace(&maps("0 0 4294967295", "0 0 4294967295")).unwrap();
        assert_eq!(id, p);
        // No GID to translate under OSM.
        let osm = compile(&MeshSettings::default(), &WorkloadAnnotations::default());
        let t = osm.in_user_namespace(&maps("0 524288 65536", "")).unwrap();
        assert_eq!((t.proxy_uid, t.proxy_gid), (525788, None));
    }

    #[test]
    fn unmapped_proxy_ids_are_errors_naming_the_key() {
        let p = compile(&MeshSettings::for_preset(Preset::Istio), &WorkloadAnnotations::default());
        let e = p.clone().in_user_namespace(&maps("0 524288 1000", "0 524288 65536")).unwrap_err().to_string();
        assert_eq!(
            e,
            "key `proxyUID`: value 1337 is not mapped in the workload's user namespace (uid_map: 0 524288 1000): its \
             proxy cannot run as that UID"
        );
        let e = p.in_user_namespace(&maps("0 524288 65536", "")).unwrap_err().to_string();
        assert!(e.starts_with("key `proxyGID`: value 1337 is not mapped") && e.contains("(gid_map: (empty))"), "{e}");
    }
}
