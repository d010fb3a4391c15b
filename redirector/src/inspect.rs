//! `redirector inspect`: the programmed state read back from the pinned
//! maps: each workload under the name the agent knew it by, with the path
//! /run/netns has for its namespace, and what each direction redirects.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::Result;
use redirector_common::{cidr_kind, flags, port_kind, CIDR_KEY_PREFIX_BITS};
use serde::Serialize;

use redirector_policy::written_ranges;

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
    /// The name the agent programmed it under (the config's `name`, or
    /// `namespace/pod`); None if no name was recorded.
    pub name: Option<String>,
    pub netns_cookie: u64,
    pub netns: Option<String>,
    /// Id of its port and IP-range lists, shared by every workload whose
    /// lists are the same.
    pub policy_id: u32,
    /// Workloads naming `policy_id` (this one included).
    pub lists_shared_by: usize,
    /// Its own addresses as the maps hold them (looked up by the loopback
    /// rule of Istio, Kuma and Linkerd; none for OSM's).
    pub local_addresses: Vec<String>,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    /// The proxy is the process in this cgroup (its UID/GID then grant nothing).
    pub proxy_cgroup_id: Option<u64>,
    pub outbound_redirect: String,
    pub inbound_port: u16,
    pub outbound_enabled: bool,
    /// What outbound redirects, in one word, and in a sentence (below).
    pub outbound_redirects: Redirects,
    /// e.g. "redirect everything except ports 6379 and IP ranges
    /// 198.51.100.0/24", "redirect nothing (the IP range inclusion list is
    /// empty)".
    pub outbound: String,
    pub inbound_redirects: Redirects,
    /// e.g. "redirect every port to 15003 except ports 15010, 15901".
    pub inbound: String,
    pub outbound_port_exclusions: Vec<u16>,
    pub inbound_port_exclusions: Vec<u16>,
    /// IP ranges as written (see [`redirector_policy::written_ranges`]).
    pub outbound_ip_range_exclusions: Vec<String>,
    /// Only these destinations are redirected (None: every destination;
    /// empty: none).
    pub outbound_ip_range_inclusions: Option<Vec<String>>,
    pub inbound_source_exclusions: Vec<String>,
    /// Only these outbound ports are redirected (None: every port; empty:
    /// none).
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

/// What one direction of a workload redirects.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Redirects {
    /// The direction is not redirected at all (inbound capture off).
    Off,
    /// Enabled, but an inclusion list is empty: nothing matches it.
    Nothing,
    /// Everything but the exclusions.
    Everything,
    /// Only what the inclusion lists name, but the exclusions.
    Only,
}

/// The lists of one workload as `inspect` reads them (the input of the
/// decision sentences).
pub struct Lists<'a> {
    pub outbound_enabled: bool,
    pub outbound_port_exclusions: &'a [u16],
    pub outbound_ip_range_exclusions: &'a [String],
    pub outbound_ip_range_inclusions: Option<&'a [String]>,
    pub outbound_port_inclusions: Option<&'a [u16]>,
    pub inbound_enabled: bool,
    pub inbound_port: u16,
    pub inbound_port_exclusions: &'a [u16],
    pub inbound_port_inclusions: Option<&'a [u16]>,
    pub inbound_source_exclusions: &'a [String],
}

/// What outbound redirects (the proxy's own connections and the loopback
/// rules of the workload's mesh come before these lists).
pub fn outbound_decision(l: &Lists) -> (Redirects, String) {
    if !l.outbound_enabled {
        return (Redirects::Off, "off".into());
    }
    for (list, what) in [
        (l.outbound_ip_range_inclusions.map(<[String]>::len), "IP range"),
        (l.outbound_port_inclusions.map(<[u16]>::len), "port"),
    ] {
        if list == Some(0) {
            return (Redirects::Nothing, format!("redirect nothing (the {what} inclusion list is empty)"));
        }
    }
    let (redirects, mut out) = match (l.outbound_ip_range_inclusions, l.outbound_port_inclusions) {
        (None, None) => (Redirects::Everything, "redirect everything".to_string()),
        (Some(r), None) => (Redirects::Only, format!("redirect only IP ranges {}", list(r))),
        (None, Some(p)) => (Redirects::Only, format!("redirect only ports {}", list(p))),
        (Some(r), Some(p)) => (Redirects::Only, format!("redirect only IP ranges {} on ports {}", list(r), list(p))),
    };
    let mut except = Vec::new();
    if !l.outbound_port_exclusions.is_empty() {
        except.push(format!("ports {}", list(l.outbound_port_exclusions)));
    }
    if !l.outbound_ip_range_exclusions.is_empty() {
        except.push(format!("IP ranges {}", list(l.outbound_ip_range_exclusions)));
    }
    if !except.is_empty() {
        let _ = write!(out, " except {}", except.join(" and "));
    }
    (redirects, out)
}

/// What inbound redirects to the proxy's inbound port.
pub fn inbound_decision(l: &Lists) -> (Redirects, String) {
    if !l.inbound_enabled {
        return (Redirects::Off, "off".into());
    }
    let (redirects, mut out) = match l.inbound_port_inclusions {
        Some([]) => return (Redirects::Nothing, "redirect nothing (the port inclusion list is empty)".into()),
        None => (Redirects::Everything, format!("redirect every port to {}", l.inbound_port)),
        Some(p) => (Redirects::Only, format!("redirect only ports {} to {}", list(p), l.inbound_port)),
    };
    let mut except = Vec::new();
    if !l.inbound_port_exclusions.is_empty() {
        except.push(format!("ports {}", list(l.inbound_port_exclusions)));
    }
    if !l.inbound_source_exclusions.is_empty() {
        except.push(format!("connections from {}", list(l.inbound_source_exclusions)));
    }
    if !except.is_empty() {
        let _ = write!(out, " except {}", except.join(" and "));
    }
    (redirects, out)
}

#[derive(Serialize)]
pub struct MapFill {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
}

/// Reads of the maps `snapshot` makes before it gives up on a
/// consistent view.
const SNAPSHOT_ATTEMPTS: u32 = 50;

pub fn snapshot(pin_dir: &Path) -> Result<Snapshot> {
    let maps = Maps::open(pin_dir)?;
    let meta = maps.meta()?;
    // A running agent may switch a workload to a new policy while this
    // reads: its list entries are keyed by a policy id that only grows,
    // so the lists read between two equal reads of the workloads (and
    // names) are the ones in force for them.
    let mut attempt = 0;
    let (workloads_map, names, ports, cidrs, listeners) = loop {
        let before = (maps.workloads()?, maps.names()?);
        let ports = maps.port_keys()?;
        let cidrs = maps.cidr_keys()?;
        let listeners = maps.listener_keys()?;
        let after = (maps.workloads()?, maps.names()?);
        attempt += 1;
        if before == after || attempt == SNAPSHOT_ATTEMPTS {
            if before != after {
                anyhow::bail!(
                    "{}: the workloads changed during each of {SNAPSHOT_ATTEMPTS} reads (an agent applying \
                     changes without pause); try again",
                    pin_dir.display()
                );
            }
            break (after.0, after.1, ports, cidrs, listeners);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut paths = BTreeMap::new();
    for p in netns::named_namespaces() {
        if let Ok(c) = netns::netns_cookie(&p) {
            paths.insert(c, p.display().to_string());
        }
    }
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
                let id = if kind == cidr_kind::LOCAL_ADDRESS { w.local_id } else { w.policy_id };
                let stored = cidrs
                    .iter()
                    .filter(|(_, d)| id != 0 && u32::from_be_bytes(d.policy_id_be) == id && d.kind == kind)
                    .filter_map(|(bits, d)| {
                        ipnet::IpNet::new(std::net::Ipv6Addr::from(d.addr).into(), (bits - CIDR_KEY_PREFIX_BITS) as u8)
                            .ok()
                    });
                written_ranges(stored).into_iter().map(|n| n.to_string()).collect::<Vec<_>>()
            };
            let outbound_port_inclusions = inclusion(flags::OUT_PORT_INCLUSION_SET, port_kind::OUTBOUND_INCLUDE);
            let inbound_port_inclusions = inclusion(flags::IN_PORT_INCLUSION_SET, port_kind::INBOUND_INCLUDE);
            let outbound_ip_range_inclusions =
                (w.flags & flags::OUT_INCLUSION_SET != 0).then(|| cidr_list(cidr_kind::OUTBOUND_INCLUDE));
            let outbound_ip_range_exclusions = cidr_list(cidr_kind::OUTBOUND_EXCLUDE);
            let inbound_source_exclusions = cidr_list(cidr_kind::INBOUND_SOURCE_EXCLUDE);
            let lists = Lists {
                outbound_enabled: w.flags & flags::OUT_ENABLED != 0,
                outbound_port_exclusions: &out_ports,
                outbound_ip_range_exclusions: &outbound_ip_range_exclusions,
                outbound_ip_range_inclusions: outbound_ip_range_inclusions.as_deref(),
                outbound_port_inclusions: outbound_port_inclusions.as_deref(),
                inbound_enabled: w.flags & flags::IN_ENABLED != 0,
                inbound_port: w.inbound_port,
                inbound_port_exclusions: &in_ports,
                inbound_port_inclusions: inbound_port_inclusions.as_deref(),
                inbound_source_exclusions: &inbound_source_exclusions,
            };
            let (outbound_redirects, outbound) = outbound_decision(&lists);
            let (inbound_redirects, inbound) = inbound_decision(&lists);
            WorkloadView {
                name: names.get(cookie).cloned(),
                netns_cookie: *cookie,
                netns: paths.get(cookie).cloned(),
                policy_id: w.policy_id,
                lists_shared_by: workloads_map.values().filter(|o| o.policy_id == w.policy_id).count(),
                local_addresses: cidr_list(cidr_kind::LOCAL_ADDRESS),
                proxy_uid: w.proxy_uid,
                proxy_gid: (w.flags & flags::MATCH_PROXY_GID != 0).then_some(w.proxy_gid),
                proxy_cgroup_id: (w.flags & flags::MATCH_PROXY_CGROUP != 0).then_some(w.proxy_cgroup_id),
                outbound_redirect: SocketAddrV4::new(Ipv4Addr::from(w.redirect_ip4.to_ne_bytes()), w.outbound_port)
                    .to_string(),
                inbound_port: w.inbound_port,
                outbound_enabled: w.flags & flags::OUT_ENABLED != 0,
                outbound_redirects,
                outbound,
                inbound_redirects,
                inbound,
                outbound_port_exclusions: out_ports,
                inbound_port_exclusions: in_ports,
                outbound_ip_range_exclusions,
                outbound_ip_range_inclusions,
                inbound_source_exclusions,
                outbound_port_inclusions,
                inbound_port_inclusions,
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
                n if n == redirector_common::map_names::NAMES => names.len(),
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
            "  {}: netns cookie {} ({}), policy #{}{}",
            w.name.as_ref().map_or("workload (no name recorded)".to_string(), |n| format!("workload `{n}`")),
            w.netns_cookie,
            w.netns.as_deref().unwrap_or("no path in /run/netns"),
            w.policy_id,
            match w.lists_shared_by {
                0 | 1 => String::new(),
                n => format!(" (its lists shared by {n} workloads)"),
            },
        );
        if !w.local_addresses.is_empty() {
            let _ = writeln!(o, "    own addresses: {}", w.local_addresses.join(", "));
        }
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
        let _ = writeln!(o, "    outbound:        {}", w.outbound);
        let _ = writeln!(o, "    inbound:         {}", w.inbound);
        let _ = writeln!(o, "    acceleration:    {}", w.acceleration);
        let _ = writeln!(
            o,
            "    inbound capture: {}",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lists() -> Lists<'static> {
        Lists {
            outbound_enabled: true,
            outbound_port_exclusions: &[],
            outbound_ip_range_exclusions: &[],
            outbound_ip_range_inclusions: None,
            outbound_port_inclusions: None,
            inbound_enabled: true,
            inbound_port: 15006,
            inbound_port_exclusions: &[],
            inbound_port_inclusions: None,
            inbound_source_exclusions: &[],
        }
    }

    /// Istio's `includeOutboundIPRanges: ""` and `"*"` program different
    /// things and must not read the same.
    #[test]
    fn redirect_nothing_and_redirect_everything_differ() {
        let star = outbound_decision(&lists());
        assert_eq!(star, (Redirects::Everything, "redirect everything".to_string()));
        let empty = outbound_decision(&Lists { outbound_ip_range_inclusions: Some(&[]), ..lists() });
        assert_eq!(empty, (Redirects::Nothing, "redirect nothing (the IP range inclusion list is empty)".to_string()));
        let no_ports = outbound_decision(&Lists { outbound_port_inclusions: Some(&[]), ..lists() });
        assert_eq!(no_ports, (Redirects::Nothing, "redirect nothing (the port inclusion list is empty)".to_string()));
        let off = outbound_decision(&Lists { outbound_enabled: false, ..lists() });
        assert_eq!(off, (Redirects::Off, "off".to_string()));
    }

    #[test]
    fn outbound_names_inclusions_and_exclusions() {
        let ranges = ["192.0.2.0/24".to_string(), "::/0".to_string()];
        let excluded = ["203.0.113.0/25".to_string()];
        let l = Lists { outbound_port_exclusions: &[6379, 7070], outbound_ip_range_exclusions: &excluded, ..lists() };
        assert_eq!(outbound_decision(&l).1, "redirect everything except ports 6379, 7070 and IP ranges 203.0.113.0/25");
        let l = Lists { outbound_ip_range_inclusions: Some(&ranges), outbound_port_exclusions: &[6379], ..lists() };
        assert_eq!(
            outbound_decision(&l),
            (Redirects::Only, "redirect only IP ranges 192.0.2.0/24, ::/0 except ports 6379".to_string())
        );
        let l = Lists { outbound_port_inclusions: Some(&[80, 443]), ..lists() };
        assert_eq!(outbound_decision(&l).1, "redirect only ports 80, 443");
        let l = Lists {
            outbound_ip_range_inclusions: Some(&ranges[..1]),
            outbound_port_inclusions: Some(&[80]),
            ..lists()
        };
        assert_eq!(outbound_decision(&l).1, "redirect only IP ranges 192.0.2.0/24 on ports 80");
    }

    #[test]
    fn inbound_decisions() {
        assert_eq!(inbound_decision(&lists()), (Redirects::Everything, "redirect every port to 15006".to_string()));
        let sources = ["10.0.0.0/8".to_string()];
        let l = Lists { inbound_port_exclusions: &[15020, 15090], inbound_source_exclusions: &sources, ..lists() };
        assert_eq!(
            inbound_decision(&l).1,
            "redirect every port to 15006 except ports 15020, 15090 and connections from 10.0.0.0/8"
        );
        let l = Lists { inbound_port_inclusions: Some(&[8080]), ..lists() };
        assert_eq!(inbound_decision(&l), (Redirects::Only, "redirect only ports 8080 to 15006".to_string()));
        let l = Lists { inbound_port_inclusions: Some(&[]), ..lists() };
        assert_eq!(inbound_decision(&l).0, Redirects::Nothing);
        assert_eq!(inbound_decision(&Lists { inbound_enabled: false, ..lists() }), (Redirects::Off, "off".to_string()));
    }

    fn view(name: Option<&str>, inclusions: Option<Vec<String>>) -> WorkloadView {
        let l = Lists { outbound_ip_range_inclusions: inclusions.as_deref(), ..lists() };
        let (outbound_redirects, outbound) = outbound_decision(&l);
        let (inbound_redirects, inbound) = inbound_decision(&l);
        WorkloadView {
            name: name.map(str::to_string),
            netns_cookie: 4097,
            netns: Some("/run/netns/app".into()),
            policy_id: 3,
            lists_shared_by: 1,
            local_addresses: vec![],
            proxy_uid: 1337,
            proxy_gid: None,
            proxy_cgroup_id: None,
            outbound_redirect: "127.0.0.1:15001".into(),
            inbound_port: 15006,
            outbound_enabled: true,
            outbound_redirects,
            outbound,
            inbound_redirects,
            inbound,
            outbound_port_exclusions: vec![],
            inbound_port_exclusions: vec![],
            outbound_ip_range_exclusions: vec![],
            outbound_ip_range_inclusions: inclusions,
            inbound_source_exclusions: vec![],
            outbound_port_inclusions: None,
            inbound_port_inclusions: None,
            inbound_enabled: true,
            acceleration: "none",
            sk_lookup_attached: true,
            inbound_listeners: vec!["IPv4"],
        }
    }

    fn snapshot_of(workloads: Vec<WorkloadView>) -> Snapshot {
        Snapshot {
            pin_dir: "/sys/fs/bpf/redirector".into(),
            layout_version: 6,
            programs: BTreeMap::new(),
            workloads,
            maps: vec![],
            counters: BTreeMap::new(),
        }
    }

    #[test]
    fn text_shows_the_name_and_the_decisions() {
        let text = render_text(&snapshot_of(vec![view(Some("shop/web"), Some(vec![])), view(None, None)]));
        let expected = "\
workloads: 2
  workload `shop/web`: netns cookie 4097 (/run/netns/app), policy #3
    proxy uid 1337, outbound -> 127.0.0.1:15001, inbound port 15006
    outbound:        redirect nothing (the IP range inclusion list is empty)
    inbound:         redirect every port to 15006
    acceleration:    none
    inbound capture: sk_lookup attached; proxy listening (IPv4)
  workload (no name recorded): netns cookie 4097 (/run/netns/app), policy #3
    proxy uid 1337, outbound -> 127.0.0.1:15001, inbound port 15006
    outbound:        redirect everything
";
        assert!(text.contains(expected), "{text}");
    }

    #[test]
    fn json_tells_an_empty_inclusion_list_from_none() {
        let json = |v| serde_json::to_value(snapshot_of(vec![v])).unwrap()["workloads"][0].clone();
        let nothing = json(view(Some("app"), Some(vec![])));
        assert_eq!(nothing["name"], "app");
        assert_eq!(nothing["outbound_redirects"], "nothing");
        assert_eq!(nothing["outbound_ip_range_inclusions"], serde_json::json!([]));
        let everything = json(view(Some("app"), None));
        assert_eq!(everything["outbound_redirects"], "everything");
        assert_eq!(everything["outbound_ip_range_inclusions"], serde_json::Value::Null);
        assert_eq!(everything["outbound"], "redirect everything");
        assert_eq!(everything["inbound_redirects"], "everything");
    }
}
