//! Mesh-wide settings: the `mesh` mapping of a config file or of the
//! ConfigMap's `mesh.yaml` (OSM's MeshConfig `spec.traffic` vocabulary),
//! laid over the preset's defaults.
use anyhow::{anyhow, bail, Result};
use ipnet::IpNet;

use crate::{
    dialect::{LoopbackMode, Preset},
    located::{self, index_path, key_path, Reader},
    values::{parse_cidr, parse_port, port_from_i64},
};

/// `mesh.acceleration`: how bytes of established app ↔ proxy connections
/// travel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Acceleration {
    /// Through the loopback TCP stack, as with iptables (the default).
    #[default]
    None,
    /// Both ends in a sockhash, `sk_msg` moves each message from one socket
    /// to the other (Linux 5.15+; `redirector probe` shows it).
    Sockmap,
}

impl Acceleration {
    pub const ALL: [Acceleration; 2] = [Acceleration::None, Acceleration::Sockmap];

    pub fn name(self) -> &'static str {
        match self {
            Acceleration::None => "none",
            Acceleration::Sockmap => "sockmap",
        }
    }
}

impl std::str::FromStr for Acceleration {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| anyhow!("value {s:?} is not an acceleration mode (none, sockmap)"))
    }
}

/// OSM defaults (seed 004: UID 1500, outbound 15001, inbound 15003).
pub const DEFAULT_PROXY_UID: u32 = 1500;
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15003;

/// Mesh-wide settings (OSM's MeshConfig `spec.traffic` vocabulary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshSettings {
    pub preset: Preset,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Redirect inbound connections at all.
    pub inbound: bool,
    pub loopback: LoopbackMode,
    /// Off (`none`) unless configured.
    pub acceleration: Acceleration,
    pub reserved_inbound_ports: Vec<u16>,
    /// Empty: every destination (osm-init's behaviour).
    pub outbound_ip_range_exclusion: Vec<IpNet>,
    pub outbound_ip_range_inclusion: Vec<IpNet>,
    pub outbound_port_exclusion: Vec<u16>,
    /// None (or empty: an empty list adds no rule): every port.
    pub outbound_port_inclusion: Option<Vec<u16>>,
    pub inbound_port_exclusion: Vec<u16>,
    /// Inbound connections from these sources are not redirected.
    pub inbound_source_exclusion: Vec<IpNet>,
    /// None (or empty): every port (Istio's `-b *`).
    pub inbound_port_inclusion: Option<Vec<u16>>,
    /// DNS capture; None: off.
    pub dns: Option<DnsSettings>,
}

/// The mesh's DNS capture settings (`dnsCapture`, `dnsPort`,
/// `dnsCaptureAll`, `dnsServers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// The proxy's DNS listener.
    pub port: u16,
    /// Port 53 of every address, not only the nameservers.
    pub capture_all: bool,
    /// The nameservers; None: each workload's resolv.conf.
    pub servers: Option<Vec<std::net::IpAddr>>,
    /// IPv6 nameservers too (false: istio-iptables without ip6tables).
    pub ipv6: bool,
}

/// The DNS listener of Istio's agent and of kuma-dp (istio-iptables'
/// `DNSCapturePort`, Kuma's `DefaultConfig().Redirect.DNS.Port`).
pub const DEFAULT_DNS_PORT: u16 = 15053;

impl DnsSettings {
    /// Capture of the nameservers in resolv.conf, on `port`.
    pub fn resolv_conf(port: u16) -> Self {
        Self { port, capture_all: false, servers: None, ipv6: true }
    }

    /// The same, IPv4 nameservers only.
    pub fn v4_only(self) -> Self {
        Self { ipv6: false, ..self }
    }
}

impl MeshSettings {
    pub fn for_preset(preset: Preset) -> Self {
        let d = preset.defaults();
        Self {
            preset,
            proxy_uid: d.proxy_uid,
            proxy_gid: d.proxy_gid,
            outbound_port: d.outbound_port,
            inbound_port: d.inbound_port,
            inbound: true,
            loopback: d.loopback,
            acceleration: Acceleration::None,
            reserved_inbound_ports: d.reserved_inbound_ports.to_vec(),
            outbound_ip_range_exclusion: Vec::new(),
            outbound_ip_range_inclusion: Vec::new(),
            outbound_port_exclusion: d.port_exclusions.to_vec(),
            outbound_port_inclusion: None,
            inbound_port_exclusion: d.port_exclusions.to_vec(),
            inbound_source_exclusion: Vec::new(),
            inbound_port_inclusion: None,
            dns: None,
        }
    }
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self::for_preset(Preset::Osm)
    }
}

/// The keys of the `mesh` mapping (and of `mesh.yaml`).
pub const MESH_KEYS: [&str; 19] = [
    "preset",
    "loopback",
    "acceleration",
    "inbound",
    "proxyUID",
    "proxyGID",
    "outboundPort",
    "inboundPort",
    "outboundIPRangeExclusionList",
    "outboundIPRangeInclusionList",
    "outboundPortExclusionList",
    "inboundPortExclusionList",
    "inboundSourceIPRangeExclusionList",
    "outboundPortInclusionList",
    "inboundPortInclusionList",
    "dnsCapture",
    "dnsCaptureAll",
    "dnsPort",
    "dnsServers",
];

/// Parses a mesh-wide settings document: the `mesh` mapping of the config
/// file, as a YAML text (in Kubernetes mode, the ConfigMap's `mesh.yaml`;
/// `None`: the preset defaults), with `overrides` laid over it key by key
/// (OSM's MeshConfig `spec.traffic` lists use the same key names). Every
/// problem is reported (a [`Problems`] error), each at its line in the
/// text; an override's problems carry no line.
pub fn parse_mesh_document(text: Option<&str>, overrides: &[(String, serde_yaml::Value)]) -> Result<MeshSettings> {
    let mut r = Reader::new(text);
    let mut doc = match text {
        None => serde_yaml::Mapping::new(),
        Some(t) => match serde_yaml::from_str::<serde_yaml::Value>(t) {
            Err(e) => {
                r.yaml_error(&e);
                return Err(r.into_error().expect("one problem").into());
            }
            Ok(v) => match untagged(v) {
                serde_yaml::Value::Null => serde_yaml::Mapping::new(),
                serde_yaml::Value::Mapping(m) => m,
                other => bail!(
                    "value {} is {}, expected a mapping of mesh settings",
                    located::shown(&other),
                    located::kind(&other)
                ),
            },
        },
    };
    for (key, value) in overrides {
        r.forget(key);
        doc.insert(serde_yaml::Value::String(key.clone()), value.clone());
    }
    match mesh_from_value(serde_yaml::Value::Mapping(doc), &mut r, "") {
        Some(m) if r.problems.is_empty() => Ok(m),
        _ => Err(r.into_error().expect("problems").into()),
    }
}

/// The mesh settings of a config file's `mesh` section (at `base`) or of
/// `mesh.yaml` (`base` empty): one path for both, so that the same text
/// means the same in either (serde_yaml's text and Value readers differ on
/// nulls and tags). Tags (`!foo`) are ignored; `null` is the preset's
/// defaults, and so is a key whose value is null. Each problem goes to
/// `r`; None if there was any.
pub(crate) fn mesh_from_value(v: serde_yaml::Value, r: &mut Reader<'_>, base: &str) -> Option<MeshSettings> {
    use serde_yaml::Value;
    let before = r.problems.len();
    let doc = match untagged(v) {
        Value::Null => serde_yaml::Mapping::new(),
        Value::Mapping(m) => m,
        other => {
            r.at_value(
                base,
                format!(
                    "value {} is {}, expected a mapping of mesh settings",
                    located::shown(&other),
                    located::kind(&other)
                ),
            );
            return None;
        }
    };
    r.unknown_keys(base, &doc, &MESH_KEYS);
    let path = |key: &str| key_path(base, key);
    // A key given with no value (null) is as if it were not given.
    let get = |key: &str| doc.get(key).filter(|v| !v.is_null());
    let preset = match get("preset") {
        None => Preset::Osm,
        Some(v) => match string(v).and_then(|s| Preset::parse(s).map_err(|e| e.to_string())) {
            Ok(p) => p,
            Err(e) => {
                r.at_value(&path("preset"), e);
                Preset::Osm
            }
        },
    };
    let d = MeshSettings::for_preset(preset);
    let id = |r: &mut Reader<'_>, key: &str| -> Option<Option<u32>> {
        let v = get(key)?;
        match integer(v).and_then(|i| u32::try_from(i).map_err(|_| format!("value {i} is not a valid user/group id"))) {
            Ok(i) => Some(Some(i)),
            Err(e) => {
                r.at_value(&path(key), e);
                Some(None)
            }
        }
    };
    let proxy_uid = id(r, "proxyUID").map_or(Some(d.proxy_uid), |v| v);
    let proxy_gid = match id(r, "proxyGID") {
        None => Some(d.proxy_gid),
        Some(g) => g.map(Some),
    };
    let port = |r: &mut Reader<'_>, key: &str, default: u16| -> Option<u16> {
        let Some(v) = get(key) else { return Some(default) };
        integer(v).and_then(port_from_int).map_err(|e| r.at_value(&path(key), e)).ok()
    };
    let outbound_port = port(r, "outboundPort", d.outbound_port);
    let inbound_port = port(r, "inboundPort", d.inbound_port);
    if let (Some(o), Some(i)) = (outbound_port, inbound_port) {
        if o == i {
            r.at_value(
                &path(if get("inboundPort").is_some() { "inboundPort" } else { "outboundPort" }),
                format!(
                    "`outboundPort` and `inboundPort` are both {o}; the proxy needs two listeners (keys `outboundPort` and `inboundPort`)"
                ),
            );
        }
    }
    // A port list: null is the preset's default (None here).
    let ports = |r: &mut Reader<'_>, key: &str| -> Option<Option<Vec<u16>>> {
        let Some(v) = get(key) else { return Some(None) };
        let Value::Sequence(items) = v else {
            r.at_value(
                &path(key),
                format!("value {} is {}, expected a list of ports", located::shown(v), located::kind(v)),
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let port = match item {
                Value::Number(_) => integer(item).and_then(port_from_int),
                Value::String(s) => parse_port(s).map_err(|e| e.to_string()),
                other => {
                    Err(format!("value {} is {}, not a port (1-65535)", located::shown(other), located::kind(other)))
                }
            };
            match port {
                Ok(p) => out.push(p),
                Err(e) => {
                    ok = false;
                    r.at_value(&index_path(&path(key), i), e);
                }
            }
        }
        ok.then_some(Some(out))
    };
    // A CIDR list: null is the empty list.
    let cidrs = |r: &mut Reader<'_>, key: &str| -> Option<Vec<IpNet>> {
        let Some(v) = get(key) else { return Some(Vec::new()) };
        let Value::Sequence(items) = v else {
            r.at_value(
                &path(key),
                format!(
                    "value {} is {}, expected a list of CIDRs (e.g. [\"192.0.2.0/24\"])",
                    located::shown(v),
                    located::kind(v)
                ),
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let net = match item {
                Value::String(s) => parse_cidr(s).map_err(|e| e.to_string()),
                other => Err(format!(
                    "value {} is {}, expected a string (a CIDR such as \"192.0.2.0/24\")",
                    located::shown(other),
                    located::kind(other)
                )),
            };
            match net {
                Ok(n) => out.push(n),
                Err(e) => {
                    ok = false;
                    r.at_value(&index_path(&path(key), i), e);
                }
            }
        }
        ok.then_some(out)
    };
    let outbound_port_inclusion = ports(r, "outboundPortInclusionList");
    let inbound_port_inclusion = ports(r, "inboundPortInclusionList");
    let outbound_port_exclusion = ports(r, "outboundPortExclusionList");
    let inbound_port_exclusion = ports(r, "inboundPortExclusionList");
    let outbound_ip_range_exclusion = cidrs(r, "outboundIPRangeExclusionList");
    let outbound_ip_range_inclusion = cidrs(r, "outboundIPRangeInclusionList");
    let inbound_source_exclusion = cidrs(r, "inboundSourceIPRangeExclusionList");
    let inbound = match get("inbound") {
        None => Some(true),
        Some(Value::Bool(b)) => Some(*b),
        Some(v) => {
            r.at_value(
                &path("inbound"),
                format!("value {} is {}, expected true or false", located::shown(v), located::kind(v)),
            );
            None
        }
    };
    let loopback = match get("loopback") {
        None => Some(d.loopback),
        Some(v) => string(v)
            .and_then(|s| s.parse().map_err(|e: anyhow::Error| e.to_string()))
            .map_err(|e| r.at_value(&path("loopback"), e))
            .ok(),
    };
    let acceleration = match get("acceleration") {
        None => Some(Acceleration::None),
        Some(Value::String(s)) => {
            s.parse().map_err(|e: anyhow::Error| r.at_value(&path("acceleration"), e.to_string())).ok()
        }
        Some(other) => {
            r.at_value(
                &path("acceleration"),
                format!("value {} is {}, expected one of none, sockmap", located::shown(other), located::kind(other)),
            );
            None
        }
    };
    let dns = dns_settings(r, base, &doc, [outbound_port, inbound_port]);
    if r.problems.len() > before {
        return None;
    }
    // An empty inclusion list adds no rule, so it restricts nothing: the
    // same as `outboundIPRangeInclusionList: []` (osm-init writes its
    // catch-all rule then).
    let nonempty = |v: Option<Vec<u16>>| v.filter(|v| !v.is_empty());
    Some(MeshSettings {
        preset,
        proxy_uid: proxy_uid?,
        proxy_gid: proxy_gid?,
        outbound_port: outbound_port?,
        inbound_port: inbound_port?,
        inbound: inbound?,
        loopback: loopback?,
        acceleration: acceleration?,
        reserved_inbound_ports: d.reserved_inbound_ports,
        outbound_ip_range_exclusion: outbound_ip_range_exclusion?,
        outbound_ip_range_inclusion: outbound_ip_range_inclusion?,
        inbound_source_exclusion: inbound_source_exclusion?,
        outbound_port_exclusion: outbound_port_exclusion?.unwrap_or(d.outbound_port_exclusion),
        inbound_port_exclusion: inbound_port_exclusion?.unwrap_or(d.inbound_port_exclusion),
        outbound_port_inclusion: nonempty(outbound_port_inclusion?),
        inbound_port_inclusion: nonempty(inbound_port_inclusion?),
        dns: dns?,
    })
}

/// `dnsCapture` and the keys that shape it. Each of `dnsCaptureAll`,
/// `dnsPort` and `dnsServers` without `dnsCapture: true` is an error (it
/// would change nothing), and so is `dnsServers` with `dnsCaptureAll`.
fn dns_settings(
    r: &mut Reader<'_>,
    base: &str,
    doc: &serde_yaml::Mapping,
    listeners: [Option<u16>; 2],
) -> Option<Option<DnsSettings>> {
    use serde_yaml::Value;
    let path = |key: &str| key_path(base, key);
    let get = |key: &str| doc.get(key).filter(|v| !v.is_null());
    let boolean = |r: &mut Reader<'_>, key: &str| -> Option<bool> {
        match get(key) {
            None => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                r.at_value(
                    &path(key),
                    format!("value {} is {}, expected true or false", located::shown(v), located::kind(v)),
                );
                None
            }
        }
    };
    let on = boolean(r, "dnsCapture")?;
    let all = boolean(r, "dnsCaptureAll")?;
    let port = match get("dnsPort") {
        None => DEFAULT_DNS_PORT,
        Some(v) => integer(v).and_then(port_from_int).map_err(|e| r.at_value(&path("dnsPort"), e)).ok()?,
    };
    let servers = match get("dnsServers") {
        None => None,
        Some(Value::Sequence(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str().map(|s| s.trim().parse::<std::net::IpAddr>()) {
                    Some(Ok(a)) => out.push(a),
                    _ => {
                        r.at_value(
                            &index_path(&path("dnsServers"), i),
                            format!(
                                "value {} is {}, expected a nameserver's IP address (e.g. \"192.0.2.53\")",
                                located::shown(item),
                                located::kind(item)
                            ),
                        );
                        return None;
                    }
                }
            }
            Some(out)
        }
        Some(v) => {
            r.at_value(
                &path("dnsServers"),
                format!("value {} is {}, expected a list of IP addresses", located::shown(v), located::kind(v)),
            );
            return None;
        }
    };
    if !on {
        for (key, given) in [
            ("dnsCaptureAll", get("dnsCaptureAll").is_some()),
            ("dnsPort", get("dnsPort").is_some()),
            ("dnsServers", servers.is_some()),
        ] {
            if given {
                r.at_value(&path(key), format!("`{key}` has no effect unless `dnsCapture: true`"));
            }
        }
        return Some(None);
    }
    if all && servers.is_some() {
        r.at_value(
            &path("dnsServers"),
            "`dnsServers` has no effect with `dnsCaptureAll: true` (port 53 of every address is captured)".to_string(),
        );
        return None;
    }
    if servers.as_ref().is_some_and(Vec::is_empty) {
        r.at_value(
            &path("dnsServers"),
            "an empty list captures nothing; leave `dnsServers` out to use each workload's resolv.conf".to_string(),
        );
        return None;
    }
    if listeners.contains(&Some(port)) {
        r.at_value(
            &path("dnsPort"),
            format!("value {port} is also one of the proxy's TCP listeners (`outboundPort`, `inboundPort`)"),
        );
        return None;
    }
    Some(Some(DnsSettings { port, capture_all: all, servers, ipv6: true }))
}

/// An integer value (as i128, so that no number is too large to name).
pub(crate) fn integer(v: &serde_yaml::Value) -> std::result::Result<i128, String> {
    match v {
        serde_yaml::Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .ok_or_else(|| format!("value {n} is a fractional number, expected an integer")),
        other => Err(format!("value {} is {}, expected an integer", located::shown(other), located::kind(other))),
    }
}

/// A string value.
pub(crate) fn string(v: &serde_yaml::Value) -> std::result::Result<&str, String> {
    match v {
        serde_yaml::Value::String(s) => Ok(s),
        other => Err(format!("value {} is {}, expected a string", located::shown(other), located::kind(other))),
    }
}

fn port_from_int(v: i128) -> std::result::Result<u16, String> {
    i64::try_from(v)
        .ok()
        .and_then(|v| port_from_i64(v).ok())
        .ok_or_else(|| format!("value {v} is not a port (1-65535)"))
}

/// The value without YAML tags (`!foo`).
pub(crate) fn untagged(v: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match v {
        Value::Tagged(t) => untagged(t.value),
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(untagged).collect()),
        Value::Mapping(m) => Value::Mapping(m.into_iter().map(|(k, v)| (untagged(k), untagged(v))).collect()),
        v => v,
    }
}

#[cfg(test)]
mod dns_tests {
    use super::*;

    fn mesh(doc: &str) -> Result<MeshSettings> {
        parse_mesh_document(Some(doc), &[])
    }

    #[test]
    fn dns_keys_are_read_and_checked() {
        assert_eq!(mesh("preset: istio\n").unwrap().dns, None);
        let m = mesh("preset: istio\ndnsCapture: true\n").unwrap();
        assert_eq!(m.dns, Some(DnsSettings::resolv_conf(DEFAULT_DNS_PORT)));
        let m = mesh("dnsCapture: true\ndnsPort: 25053\ndnsServers: [\"192.0.2.53\", \"2001:db8::53\"]\n").unwrap();
        let d = m.dns.unwrap();
        assert_eq!((d.port, d.capture_all, d.servers.unwrap().len()), (25053, false, 2));
        assert!(mesh("dnsCapture: true\ndnsCaptureAll: true\n").unwrap().dns.unwrap().capture_all);
        for (doc, want) in [
            ("dnsPort: 25053\n", "`dnsPort` has no effect unless `dnsCapture: true`"),
            ("dnsCaptureAll: true\n", "`dnsCaptureAll` has no effect"),
            ("dnsCapture: yes please\n", "expected true or false"),
            ("dnsCapture: true\ndnsServers: [\"192.0.2.0/24\"]\n", "expected a nameserver's IP address"),
            ("dnsCapture: true\ndnsServers: []\n", "an empty list captures nothing"),
            ("dnsCapture: true\ndnsCaptureAll: true\ndnsServers: [\"192.0.2.53\"]\n", "no effect with `dnsCaptureAll"),
            ("dnsCapture: true\ndnsPort: 15001\n", "also one of the proxy's TCP listeners"),
            ("dnsCapture: true\ndnsPort: 0\n", "dnsPort"),
        ] {
            let e = format!("{:#}", mesh(doc).unwrap_err());
            assert!(e.contains(want), "{doc:?}: {e}");
        }
    }
}
