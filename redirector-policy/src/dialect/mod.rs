//! The mesh dialects: for each mesh (one file each) its annotation keys
//! and their parser, its preset defaults (proxy identity, ports, reserved
//! ports, loopback mode), its sidecar container and what its injector
//! leaves on an injected pod.
use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use ipnet::IpNet;

use crate::values::Inclusion;

pub mod istio;
pub mod kuma;
pub mod linkerd;
pub mod osm;

pub use istio::annotations as istio_annotations;
pub use kuma::annotations as kuma_annotations;
pub use linkerd::annotations as linkerd_annotations;
pub use osm::annotations as osm_annotations;

/// What happens to a connection whose route is the loopback device
/// (127.0.0.0/8, ::1, or one of the workload's own addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoopbackMode {
    /// osm-init: only 127.0.0.1/32 returns; everything else is outbound.
    Osm,
    /// istio-iptables / Kuma: `-o lo -s 127.0.0.6 RETURN`, then
    /// `-o lo ! -d 127.0.0.1 → inbound listener` for every user.
    ToInbound,
    /// Kuma (and istio-iptables from 1.10): `-o lo -s 127.0.0.6 RETURN`,
    /// the proxy's `-o lo ! -d 127.0.0.1` to the inbound listener, every
    /// other user's `-o lo` returns; outbound IP exclusions come first.
    ProxyToInbound,
    /// Linkerd proxy-init: `-o lo -j RETURN`.
    Bypass,
}

impl LoopbackMode {
    pub const ALL: [LoopbackMode; 4] =
        [LoopbackMode::Osm, LoopbackMode::ToInbound, LoopbackMode::ProxyToInbound, LoopbackMode::Bypass];

    pub fn name(self) -> &'static str {
        match self {
            LoopbackMode::Osm => "osm",
            LoopbackMode::ToInbound => "to-inbound",
            LoopbackMode::ProxyToInbound => "proxy-to-inbound",
            LoopbackMode::Bypass => "bypass",
        }
    }
}

impl std::str::FromStr for LoopbackMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| anyhow!("value {s:?} is not a loopback mode (osm, to-inbound, proxy-to-inbound, bypass)"))
    }
}

/// The mesh dialect: proxy identity, ports, reserved ports and the pod
/// annotation vocabulary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Preset {
    #[default]
    Osm,
    Istio,
    Linkerd,
    Kuma,
}

pub struct PresetDefaults {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Inbound ports never redirected (the proxy's own admin/health ports).
    pub reserved_inbound_ports: &'static [u16],
    pub loopback: LoopbackMode,
    /// Mesh-wide port exclusions (both directions) of a default install,
    /// used when the config gives no `outbound/inboundPortExclusionList`.
    pub port_exclusions: &'static [u16],
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Osm, Preset::Istio, Preset::Linkerd, Preset::Kuma];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Osm => "osm",
            Preset::Istio => "istio",
            Preset::Linkerd => "linkerd",
            Preset::Kuma => "kuma",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| anyhow!("value {s:?} is not a mesh preset (osm, istio, linkerd, kuma)"))
    }

    pub fn defaults(self) -> PresetDefaults {
        match self {
            Preset::Osm => osm::DEFAULTS,
            Preset::Istio => istio::DEFAULTS,
            Preset::Linkerd => linkerd::DEFAULTS,
            Preset::Kuma => kuma::DEFAULTS,
        }
    }

    /// The name of the sidecar container the preset's injector adds.
    pub fn proxy_container(self) -> &'static str {
        match self {
            Preset::Osm => osm::PROXY_CONTAINER,
            Preset::Istio => istio::PROXY_CONTAINER,
            Preset::Linkerd => linkerd::PROXY_CONTAINER,
            Preset::Kuma => kuma::PROXY_CONTAINER,
        }
    }
}

/// Pod-scoped settings from annotations. Exclusion lists (and OSM's
/// inclusion list) are merged with the mesh's; Istio's `include*` settings
/// replace the mesh's, as istio-injector does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadAnnotations {
    pub outbound_port_exclusion: Vec<u16>,
    pub outbound_ip_range_exclusion: Vec<IpNet>,
    pub outbound_ip_range_inclusion: Vec<IpNet>,
    pub inbound_port_exclusion: Vec<u16>,
    /// Inbound connections from these sources are not redirected.
    pub inbound_source_exclusion: Vec<IpNet>,
    pub outbound_ip_range_inclusion_override: Option<Inclusion<IpNet>>,
    pub outbound_port_inclusion: Option<Inclusion<u16>>,
    pub inbound_port_inclusion: Option<Inclusion<u16>>,
}

impl Preset {
    /// The annotation keys the preset reads.
    pub fn annotation_keys(self) -> &'static [&'static str] {
        match self {
            Preset::Osm => &osm_annotations::ALL,
            Preset::Istio => &istio_annotations::ALL,
            Preset::Linkerd => &linkerd_annotations::ALL,
            Preset::Kuma => &kuma_annotations::ALL,
        }
    }
}

/// Parses the annotations of one workload in the vocabulary of `preset`.
/// Keys of other vocabularies are ignored (pods carry many); see
/// [`annotation_key_warnings`] for those that look like mistakes. The
/// error names every bad annotation, its value and why.
pub fn parse_annotations(preset: Preset, annotations: &BTreeMap<String, String>) -> Result<WorkloadAnnotations> {
    let (out, errors) = parse_annotations_each(preset, annotations);
    if errors.is_empty() {
        return Ok(out);
    }
    let text: Vec<String> = errors.iter().map(|(k, e)| format!("annotation `{k}`: {e:#}")).collect();
    Err(anyhow!("{}", text.join("; ")))
}

/// The annotations that parse, and each one that does not with why (the
/// error names the value), by key.
pub fn parse_annotations_each(
    preset: Preset,
    annotations: &BTreeMap<String, String>,
) -> (WorkloadAnnotations, Vec<(String, anyhow::Error)>) {
    let mut out = WorkloadAnnotations::default();
    let mut errors = Vec::new();
    for (key, value) in annotations {
        let k = key.as_str();
        let r = match preset {
            Preset::Osm => osm::parse_annotation(k, value, &mut out),
            Preset::Istio => istio::parse_annotation(k, value, &mut out),
            Preset::Linkerd => linkerd::parse_annotation(k, value, &mut out),
            Preset::Kuma => kuma::parse_annotation(k, value, &mut out),
        };
        if let Err(e) = r {
            errors.push((key.clone(), e));
        }
    }
    (out, errors)
}

/// An annotation key that is likely a mistake: the preset ignores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyWarning {
    pub key: String,
    /// The valid key it was probably meant to be.
    pub suggestion: Option<&'static str>,
    pub message: String,
}

/// What each dialect's keys set, to point from another mesh's key to the
/// preset's key of the same meaning.
fn meaning(key: &str) -> Option<&'static str> {
    use istio_annotations as i;
    use kuma_annotations as k;
    use linkerd_annotations as l;
    use osm_annotations as o;
    Some(match key {
        o::OUTBOUND_PORT_EXCLUSION | i::EXCLUDE_OUTBOUND_PORTS | l::SKIP_OUTBOUND_PORTS | k::EXCLUDE_OUTBOUND_PORTS => {
            "outbound port exclusion"
        }
        o::INBOUND_PORT_EXCLUSION | i::EXCLUDE_INBOUND_PORTS | l::SKIP_INBOUND_PORTS | k::EXCLUDE_INBOUND_PORTS => {
            "inbound port exclusion"
        }
        o::OUTBOUND_IP_RANGE_EXCLUSION | i::EXCLUDE_OUTBOUND_IP_RANGES | k::EXCLUDE_OUTBOUND_IPS => {
            "outbound IP range exclusion"
        }
        o::OUTBOUND_IP_RANGE_INCLUSION | i::INCLUDE_OUTBOUND_IP_RANGES => "outbound IP range inclusion",
        l::SKIP_SUBNETS | k::EXCLUDE_INBOUND_IPS => "inbound source exclusion",
        i::INCLUDE_INBOUND_PORTS => "inbound port inclusion",
        i::INCLUDE_OUTBOUND_PORTS => "outbound port inclusion",
        _ => return None,
    })
}

/// The annotation keys `preset` ignores although they look meant for it:
/// a key within three edits of one it reads (a misspelling, a wrong case:
/// `openservicemesh.io/outbound-port-exclusion-lists`), or a key another
/// mesh's preset reads (`traffic.sidecar.istio.io/excludeOutboundPorts`
/// under `osm`), each with the closest valid key. Other keys (pods carry
/// many annotations, the meshes' own among them) are not warned about.
pub fn annotation_key_warnings<'a>(preset: Preset, keys: impl IntoIterator<Item = &'a str>) -> Vec<KeyWarning> {
    let own = preset.annotation_keys();
    let mut out = Vec::new();
    for key in keys {
        if own.contains(&key) {
            continue;
        }
        let all = Preset::ALL.into_iter().flat_map(|p| p.annotation_keys().iter().map(move |k| (p, *k)));
        let Some((owner, near)) = all
            .map(|(p, k)| (crate::located::distance(key, k), p, k))
            .filter(|(d, _, _)| *d <= crate::located::MISSPELT)
            .min_by_key(|(d, p, _)| (*d, *p != preset))
            .map(|(_, p, k)| (p, k))
        else {
            continue;
        };
        let (suggestion, message) = if owner == preset {
            let how = if key.eq_ignore_ascii_case(near) { "differs only in case from" } else { "is close to" };
            (
                Some(near),
                format!("annotation `{key}` is not one the {} preset reads, so it is ignored; it {how} `{near}`: did you mean that?", preset.name()),
            )
        } else {
            let equivalent = meaning(near).and_then(|m| own.iter().copied().find(|k| meaning(k) == Some(m)));
            let named = if key == near {
                format!("is {}'s annotation", owner.name())
            } else {
                format!("looks like {}'s annotation `{near}`", owner.name())
            };
            match equivalent {
                Some(e) => (
                    Some(e),
                    format!(
                        "annotation `{key}` {named}, ignored under the {} preset; its {} annotation is `{e}`",
                        preset.name(),
                        preset.name()
                    ),
                ),
                None => (
                    None,
                    format!(
                        "annotation `{key}` {named}, ignored under the {} preset, which has no annotation for that (it reads {})",
                        preset.name(),
                        own.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                    ),
                ),
            }
        };
        out.push(KeyWarning { key: key.to_string(), suggestion, message });
    }
    out
}

#[cfg(test)]
mod dialects {
    use super::*;
    use crate::{config::tests::with_workloads, *};

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn presets_set_identity_ports_and_reserved_ports() {
        for (name, uid, out, inb) in [
            ("osm", 1500, 15001, 15003),
            ("istio", 1337, 15001, 15006),
            ("linkerd", 2102, 4140, 4143),
            ("kuma", 5678, 15001, 15006),
        ] {
            let c = parse_config(&with_workloads(&format!("mesh:\n  preset: {name}\n"))).unwrap();
            assert_eq!((c.mesh.proxy_uid, c.mesh.outbound_port, c.mesh.inbound_port), (uid, out, inb), "{name}");
        }
        let istio = parse_config(&with_workloads("mesh:\n  preset: istio\n")).unwrap().mesh;
        assert_eq!(istio.proxy_gid, Some(1337));
        assert_eq!(istio.reserved_inbound_ports, vec![22, 15020, 15021, 15090]);
        assert_eq!(istio.loopback, LoopbackMode::ToInbound);
        // Explicit fields override the preset.
        let c =
            parse_config(&with_workloads("mesh:\n  preset: istio\n  proxyUID: 1400\n  inboundPort: 15106\n")).unwrap();
        assert_eq!((c.mesh.proxy_uid, c.mesh.inbound_port, c.mesh.proxy_gid), (1400, 15106, Some(1337)));
        let e = parse_config(&with_workloads("mesh:\n  preset: consul\n")).unwrap_err();
        let t = format!("{e:#}");
        assert!(t.contains("preset") && t.contains("consul") && t.contains("osm, istio, linkerd, kuma"), "{t}");
    }

    #[test]
    fn istio_annotations() {
        use istio_annotations::*;
        let a = parse_annotations(
            Preset::Istio,
            &ann(&[
                (INCLUDE_OUTBOUND_IP_RANGES, "*"),
                (EXCLUDE_OUTBOUND_IP_RANGES, "192.0.2.0/24,2001:db8::/32"),
                (INCLUDE_INBOUND_PORTS, "8080,9090"),
                (EXCLUDE_OUTBOUND_PORTS, "6379"),
                // another dialect's key is ignored
                (osm_annotations::OUTBOUND_PORT_EXCLUSION, "not-a-port"),
            ]),
        )
        .unwrap();
        assert_eq!(a.outbound_ip_range_inclusion_override, Some(Inclusion::All));
        assert_eq!(a.outbound_ip_range_exclusion.len(), 2);
        assert_eq!(a.inbound_port_inclusion, Some(Inclusion::Only(vec![8080, 9090])));
        assert_eq!(a.outbound_port_exclusion, vec![6379]);
        let none = parse_annotations(Preset::Istio, &ann(&[(INCLUDE_OUTBOUND_IP_RANGES, "")])).unwrap();
        assert_eq!(none.outbound_ip_range_inclusion_override, Some(Inclusion::Only(vec![])));
        for (k, bad) in [
            (INCLUDE_INBOUND_PORTS, "80,x"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/40"),
            (INCLUDE_OUTBOUND_PORTS, "*,80"),
        ] {
            let t = format!("{:#}", parse_annotations(Preset::Istio, &ann(&[(k, bad)])).unwrap_err());
            assert!(t.contains(k) && t.contains(bad), "{t}");
        }
    }

    /// Ranges are merged before they are expanded: a value repeating the
    /// whole port range up to the annotation size limit is 65,535 ports
    /// (it was 2 billion, ~4 GiB, before); overlaps, adjacency and repeats
    /// give each port once, ascending.
    #[test]
    fn repeated_port_ranges_are_merged_before_expanding() {
        let huge = vec!["1-65535"; 256 * 1024 / 8].join(",");
        for (preset, key) in [
            (Preset::Linkerd, linkerd_annotations::SKIP_OUTBOUND_PORTS),
            (Preset::Kuma, kuma_annotations::EXCLUDE_INBOUND_PORTS),
        ] {
            let a = parse_annotations(preset, &ann(&[(key, &huge)])).unwrap();
            let ports = if preset == Preset::Linkerd { &a.outbound_port_exclusion } else { &a.inbound_port_exclusion };
            assert_eq!(ports.len(), 65535);
            assert!(ports.windows(2).all(|w| w[0] + 1 == w[1]));
        }
        let a = parse_annotations(
            Preset::Linkerd,
            &ann(&[(linkerd_annotations::SKIP_OUTBOUND_PORTS, "4002,4000-4001,10-20,15-25,26,25,65535,65534-65535")]),
        )
        .unwrap();
        let want: Vec<u16> = (10..=26).chain([4000, 4001, 4002, 65534, 65535]).collect();
        assert_eq!(a.outbound_port_exclusion, want);
    }

    #[test]
    fn linkerd_and_kuma_annotations() {
        let a = parse_annotations(
            Preset::Linkerd,
            &ann(&[
                (linkerd_annotations::SKIP_OUTBOUND_PORTS, "25,4000-4002"),
                (linkerd_annotations::SKIP_INBOUND_PORTS, "9999"),
                (linkerd_annotations::SKIP_SUBNETS, "198.51.100.0/24"),
            ]),
        )
        .unwrap();
        assert_eq!(a.outbound_port_exclusion, vec![25, 4000, 4001, 4002]);
        assert_eq!(a.inbound_port_exclusion, vec![9999]);
        // proxy-init's --subnets-to-ignore matches the *source* of inbound traffic.
        assert_eq!(a.inbound_source_exclusion, vec!["198.51.100.0/24".parse::<IpNet>().unwrap()]);
        assert!(a.outbound_ip_range_exclusion.is_empty());
        let t = format!(
            "{:#}",
            parse_annotations(Preset::Linkerd, &ann(&[(linkerd_annotations::SKIP_OUTBOUND_PORTS, "5-2")])).unwrap_err()
        );
        assert!(t.contains("skip-outbound-ports") && t.contains("5-2"), "{t}");
        let k = parse_annotations(
            Preset::Kuma,
            &ann(&[
                (kuma_annotations::EXCLUDE_OUTBOUND_PORTS, "5432"),
                (kuma_annotations::EXCLUDE_INBOUND_PORTS, "8081"),
                (kuma_annotations::EXCLUDE_INBOUND_IPS, "192.0.2.1,2001:db8::/64"),
                (kuma_annotations::EXCLUDE_OUTBOUND_IPS, "203.0.113.0/24"),
            ]),
        )
        .unwrap();
        assert_eq!((k.outbound_port_exclusion, k.inbound_port_exclusion), (vec![5432], vec![8081]));
        assert_eq!(
            k.inbound_source_exclusion,
            vec!["192.0.2.1/32".parse::<IpNet>().unwrap(), "2001:db8::/64".parse().unwrap()]
        );
        assert_eq!(k.outbound_ip_range_exclusion, vec!["203.0.113.0/24".parse::<IpNet>().unwrap()]);
        let t = format!(
            "{:#}",
            parse_annotations(Preset::Kuma, &ann(&[(kuma_annotations::EXCLUDE_INBOUND_IPS, "192.0.2.300")]))
                .unwrap_err()
        );
        assert!(t.contains("exclude-inbound-ips") && t.contains("192.0.2.300"), "{t}");
    }

    #[test]
    fn acceleration_is_off_by_default_and_parsed_strictly() {
        assert_eq!(parse_config(&with_workloads("")).unwrap().mesh.acceleration, Acceleration::None);
        assert_eq!(
            parse_config(&with_workloads("mesh:\n  preset: istio\n")).unwrap().mesh.acceleration,
            Acceleration::None
        );
        let m = parse_config(&with_workloads("mesh:\n  acceleration: sockmap\n")).unwrap().mesh;
        assert_eq!(m.acceleration, Acceleration::Sockmap);
        assert_eq!(
            parse_config(&with_workloads("mesh:\n  acceleration: none\n")).unwrap().mesh.acceleration,
            Acceleration::None
        );
        for (doc, value, reason) in [
            ("mesh:\n  acceleration: sockhash\n", "\"sockhash\"", "not an acceleration mode (none, sockmap)"),
            ("mesh:\n  acceleration: Sockmap\n", "\"Sockmap\"", "not an acceleration mode"),
            ("mesh:\n  acceleration: \"\"\n", "\"\"", "not an acceleration mode"),
            ("mesh:\n  acceleration: true\n", "true", "is a boolean, expected one of none, sockmap"),
            ("mesh:\n  acceleration: [sockmap]\n", "(a list)", "is a list"),
        ] {
            let t = format!("{:#}", parse_config(&with_workloads(doc)).unwrap_err());
            assert!(
                t.contains("mesh.acceleration at line 2 column 17: value ") && t.contains(value) && t.contains(reason),
                "{doc:?}: {t}"
            );
        }
        // The Kubernetes ConfigMap's mesh.yaml goes through the same parser.
        assert_eq!(
            parse_mesh_document(Some("acceleration: sockmap\n"), &[]).unwrap().acceleration,
            Acceleration::Sockmap
        );
        let t = format!("{:#}", parse_mesh_document(Some("acceleration: fast\n"), &[]).unwrap_err());
        assert!(t.starts_with("acceleration at line 1 column 15: value \"fast\""), "{t}");
    }

    #[test]
    fn loopback_mode_and_preset_port_defaults() {
        let m = parse_config(&with_workloads("mesh:\n  preset: linkerd\n")).unwrap().mesh;
        assert_eq!(
            (m.outbound_port_exclusion.clone(), m.inbound_port_exclusion.clone()),
            (vec![4567, 4568], vec![4567, 4568])
        );
        assert_eq!(m.loopback, LoopbackMode::Bypass);
        let m =
            parse_config(&with_workloads("mesh:\n  preset: linkerd\n  outboundPortExclusionList: []\n")).unwrap().mesh;
        assert!(m.outbound_port_exclusion.is_empty(), "an explicit list replaces the preset's");
        assert_eq!(
            parse_config(&with_workloads("mesh:\n  preset: kuma\n")).unwrap().mesh.loopback,
            LoopbackMode::ProxyToInbound
        );
        let m = parse_config(&with_workloads("mesh:\n  preset: istio\n  loopback: proxy-to-inbound\n")).unwrap().mesh;
        assert_eq!(m.loopback, LoopbackMode::ProxyToInbound);
        let t = format!("{:#}", parse_config(&with_workloads("mesh:\n  loopback: sometimes\n")).unwrap_err());
        assert!(t.contains("loopback") && t.contains("sometimes") && t.contains("proxy-to-inbound"), "{t}");
    }
}
