//! `redirector inspect`: the programmed state read back from the pinned
//! maps, with names put on netns cookies where /run/netns has them.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::Result;
use redirector_common::{cidr_kind, flags, port_kind, CIDR_KEY_PREFIX_BITS};
use serde::Serialize;

use crate::{
    dataplane::{links_pinned, Maps, CAPACITIES},
    sys::netns,
};

#[derive(Serialize)]
pub struct Snapshot {
    pub pin_dir: String,
    pub layout_version: u32,
    pub programs: BTreeMap<String, bool>,
    pub workloads: Vec<WorkloadView>,
    pub maps: Vec<MapFill>,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Serialize)]
pub struct WorkloadView {
    pub netns_cookie: u64,
    pub netns: Option<String>,
    pub policy_id: u32,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    /// The proxy is the process in this cgroup (its UID/GID then grant nothing).
    pub proxy_cgroup_id: Option<u64>,
    pub outbound_redirect: String,
    pub inbound_port: u16,
    pub outbound_enabled: bool,
    pub outbound_port_exclusions: Vec<u16>,
    pub inbound_port_exclusions: Vec<u16>,
    pub outbound_ip_range_exclusions: Vec<String>,
    pub outbound_ip_range_inclusions: Vec<String>,
    pub inbound_source_exclusions: Vec<String>,
    /// Only these outbound ports are redirected (None: every port).
    pub outbound_port_inclusions: Option<Vec<u16>>,
    /// Only these inbound ports are redirected (None: every port).
    pub inbound_port_inclusions: Option<Vec<u16>>,
    pub inbound_enabled: bool,
    /// `mesh.acceleration`: `none` or `sockmap`.
    pub acceleration: &'static str,
    /// The workload's sk_lookup link is pinned (inbound capture attached).
    pub sk_lookup_attached: bool,
    /// Address families of the proxy's registered inbound listeners.
    pub inbound_listeners: Vec<&'static str>,
}

#[derive(Serialize)]
pub struct MapFill {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
}

pub fn snapshot(pin_dir: &Path) -> Result<Snapshot> {
    let maps = Maps::open(pin_dir)?;
    let meta = maps.meta()?;
    let ports = maps.port_keys()?;
    let cidrs = maps.cidr_keys()?;
    let mut names = BTreeMap::new();
    for p in netns::named_namespaces() {
        if let Ok(c) = netns::netns_cookie(&p) {
            names.insert(c, p.display().to_string());
        }
    }
    let workloads_map = maps.workloads()?;
    let listeners = maps.listener_keys()?;
    let workloads = workloads_map
        .iter()
        .map(|(cookie, w)| {
            let port_list = |kind| {
                let mut v: Vec<u16> =
                    ports.iter().filter(|k| k.policy_id == w.policy_id && k.kind == kind).map(|k| k.port).collect();
                v.sort_unstable();
                v
            };
            let out_ports = port_list(port_kind::OUTBOUND_EXCLUDE);
            let in_ports = port_list(port_kind::INBOUND_EXCLUDE);
            let inclusion = |flag, kind| (w.flags & flag != 0).then(|| port_list(kind));
            let cidr_list = |kind| {
                let mut v: Vec<ipnet::IpNet> = cidrs
                    .iter()
                    .filter(|(_, d)| u32::from_be_bytes(d.policy_id_be) == w.policy_id && d.kind == kind)
                    .filter_map(|(bits, d)| {
                        let net = ipnet::IpNet::new(
                            std::net::Ipv6Addr::from(d.addr).into(),
                            (bits - CIDR_KEY_PREFIX_BITS) as u8,
                        )
                        .ok()?;
                        Some(redirector_policy::canonical_net(net))
                    })
                    .collect();
                v.sort();
                v.into_iter().map(|n| n.to_string()).collect::<Vec<_>>()
            };
            WorkloadView {
                netns_cookie: *cookie,
                netns: names.get(cookie).cloned(),
                policy_id: w.policy_id,
                proxy_uid: w.proxy_uid,
                proxy_gid: (w.flags & flags::MATCH_PROXY_GID != 0).then_some(w.proxy_gid),
                proxy_cgroup_id: (w.flags & flags::MATCH_PROXY_CGROUP != 0).then_some(w.proxy_cgroup_id),
                outbound_redirect: SocketAddrV4::new(Ipv4Addr::from(w.redirect_ip4.to_ne_bytes()), w.outbound_port)
                    .to_string(),
                inbound_port: w.inbound_port,
                outbound_enabled: w.flags & flags::OUT_ENABLED != 0,
                outbound_port_exclusions: out_ports,
                inbound_port_exclusions: in_ports,
                outbound_ip_range_exclusions: cidr_list(cidr_kind::OUTBOUND_EXCLUDE),
                outbound_ip_range_inclusions: cidr_list(cidr_kind::OUTBOUND_INCLUDE),
                inbound_source_exclusions: cidr_list(cidr_kind::INBOUND_SOURCE_EXCLUDE),
                outbound_port_inclusions: inclusion(flags::OUT_PORT_INCLUSION_SET, port_kind::OUTBOUND_INCLUDE),
                inbound_port_inclusions: inclusion(flags::IN_PORT_INCLUSION_SET, port_kind::INBOUND_INCLUDE),
                inbound_enabled: w.flags & flags::IN_ENABLED != 0,
                acceleration: if w.flags & flags::ACCEL_SOCKMAP != 0 { "sockmap" } else { "none" },
                sk_lookup_attached: crate::dataplane::netns_link_pin_path(pin_dir, *cookie).exists(),
                inbound_listeners: listeners
                    .iter()
                    .filter(|k| k.netns_cookie == *cookie)
                    .map(|k| if k.family == libc::AF_INET6 as u32 { "IPv6 (dual-stack)" } else { "IPv4" })
                    .collect(),
            }
        })
        .collect();
    let tracked = maps.tracked_connections()?.len();
    let accel_sockets = maps.accel_socket_keys()?.len();
    let fills = CAPACITIES
        .iter()
        .map(|(name, capacity)| MapFill {
            name: name.to_string(),
            entries: match *name {
                n if n == redirector_common::map_names::WORKLOADS => workloads_map.len(),
                n if n == redirector_common::map_names::PORTS => ports.len(),
                n if n == redirector_common::map_names::CIDRS => cidrs.len(),
                n if n == redirector_common::map_names::LISTENERS => listeners.len(),
                n if n == redirector_common::map_names::ACCEL_SOCKETS => accel_sockets,
                _ => tracked,
            },
            capacity: *capacity,
        })
        .collect();
    Ok(Snapshot {
        pin_dir: pin_dir.display().to_string(),
        layout_version: meta.layout_version,
        programs: links_pinned(pin_dir).into_iter().map(|(n, a)| (n.to_string(), a)).collect(),
        workloads,
        maps: fills,
        counters: maps.counters()?.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
    })
}

fn list<T: ToString>(v: &[T]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter().map(T::to_string).collect::<Vec<_>>().join(", ")
    }
}

pub fn render_text(s: &Snapshot) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "pin directory: {} (map layout v{})", s.pin_dir, s.layout_version);
    let _ = writeln!(o, "programs:");
    for (name, attached) in &s.programs {
        let _ = writeln!(o, "  {name:<18} {}", if *attached { "attached (link pinned)" } else { "NOT attached" });
    }
    let _ = writeln!(o, "workloads: {}", s.workloads.len());
    for w in &s.workloads {
        let _ = writeln!(
            o,
            "  netns cookie {} ({}): policy #{}{}",
            w.netns_cookie,
            w.netns.as_deref().unwrap_or("unnamed"),
            w.policy_id,
            if w.outbound_enabled { "" } else { " [outbound disabled]" }
        );
        let _ = writeln!(
            o,
            "    proxy {}, outbound -> {}, inbound port {}",
            match w.proxy_cgroup_id {
                Some(c) => format!("= the processes of cgroup id {c} (any UID)"),
                None => format!("uid {}{}", w.proxy_uid, w.proxy_gid.map(|g| format!(" gid {g}")).unwrap_or_default()),
            },
            w.outbound_redirect,
            w.inbound_port
        );
        let _ = writeln!(o, "    outbound port exclusions:     {}", list(&w.outbound_port_exclusions));
        let _ = writeln!(o, "    outbound IP range exclusions: {}", list(&w.outbound_ip_range_exclusions));
        let _ = writeln!(o, "    outbound IP range inclusions: {}", list(&w.outbound_ip_range_inclusions));
        let _ = writeln!(o, "    inbound port exclusions:      {}", list(&w.inbound_port_exclusions));
        let _ = writeln!(o, "    inbound source exclusions:    {}", list(&w.inbound_source_exclusions));
        let only = |v: &Option<Vec<u16>>| v.as_ref().map_or("every port".to_string(), |v| list(v));
        let _ = writeln!(o, "    outbound ports redirected:    {}", only(&w.outbound_port_inclusions));
        let _ = writeln!(o, "    inbound ports redirected:     {}", only(&w.inbound_port_inclusions));
        let _ = writeln!(o, "    acceleration:                 {}", w.acceleration);
        let _ = writeln!(
            o,
            "    inbound capture:              {}",
            match (w.inbound_enabled, w.sk_lookup_attached, w.inbound_listeners.is_empty()) {
                (false, _, _) => "off".to_string(),
                (true, false, _) => "NOT attached (sk_lookup link missing)".to_string(),
                (true, true, true) => "sk_lookup attached; no proxy listener yet (inbound SYNs dropped)".to_string(),
                (true, true, false) =>
                    format!("sk_lookup attached; proxy listening ({})", w.inbound_listeners.join(", ")),
            }
        );
    }
    let _ = writeln!(o, "maps:");
    for m in &s.maps {
        let _ = writeln!(o, "  {:<16} {:>7} / {:<7} entries", m.name, m.entries, m.capacity);
    }
    let _ = writeln!(o, "counters:");
    for (name, v) in &s.counters {
        let _ = writeln!(o, "  {name:<20} {v}");
    }
    o
}
