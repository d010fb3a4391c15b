//! Parsing: the YAML config file and pod annotations become typed values.
//! Nothing here touches the kernel; every error names the input, the value
//! and the reason.
use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::{IpNet, Ipv4Net};

/// A pod-level include setting that replaces the mesh's (Istio `*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inclusion<T> {
    All,
    Only(Vec<T>),
}
use serde::Deserialize;

/// OSM's annotation keys (pod scoped lists, merged with the mesh lists).
pub mod osm_annotations {
    pub const OUTBOUND_PORT_EXCLUSION: &str = "openservicemesh.io/outbound-port-exclusion-list";
    pub const OUTBOUND_IP_RANGE_EXCLUSION: &str = "openservicemesh.io/outbound-ip-range-exclusion-list";
    pub const OUTBOUND_IP_RANGE_INCLUSION: &str = "openservicemesh.io/outbound-ip-range-inclusion-list";
    pub const INBOUND_PORT_EXCLUSION: &str = "openservicemesh.io/inbound-port-exclusion-list";
    pub const ALL: [&str; 4] =
        [OUTBOUND_PORT_EXCLUSION, OUTBOUND_IP_RANGE_EXCLUSION, OUTBOUND_IP_RANGE_INCLUSION, INBOUND_PORT_EXCLUSION];
}

/// Istio's pod annotations (traffic.sidecar.istio.io/*).
pub mod istio_annotations {
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
}

/// Linkerd's pod annotations (config.linkerd.io/*). Port lists accept
/// ranges (`4000-4100`) as Linkerd's do.
pub mod linkerd_annotations {
    pub const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
    pub const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
    pub const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
}

/// Kuma's pod annotations (traffic.kuma.io/*).
pub mod kuma_annotations {
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.kuma.io/exclude-outbound-ports";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.kuma.io/exclude-inbound-ports";
    pub const EXCLUDE_OUTBOUND_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
    pub const EXCLUDE_INBOUND_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
}

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
            // seed 004 (osm-init) and seed 000 (15904: osm-healthcheck).
            Preset::Osm => PresetDefaults {
                proxy_uid: 1500,
                proxy_gid: None,
                outbound_port: 15001,
                inbound_port: 15003,
                reserved_inbound_ports: &[15010, 15901, 15902, 15903, 15904],
                loopback: LoopbackMode::Osm,
                port_exclusions: &[],
            },
            // seed 001 (istio-iptables -u 1337, gid = uid, ssh 22) and the
            // injector's -d 15090,15021,15020.
            Preset::Istio => PresetDefaults {
                proxy_uid: 1337,
                proxy_gid: Some(1337),
                outbound_port: 15001,
                inbound_port: 15006,
                reserved_inbound_ports: &[22, 15020, 15021, 15090],
                loopback: LoopbackMode::ToInbound,
                port_exclusions: &[],
            },
            // linkerd2-proxy-init (docs "IPTables Reference"): proxy UID
            // 2102, outbound 4140, inbound 4143, `-o lo -j RETURN`; the
            // injector always skips the proxy's control (4190) and admin
            // (4191) ports inbound, and the chart's proxyInit
            // ignoreInboundPorts/ignoreOutboundPorts default to 4567,4568.
            Preset::Linkerd => PresetDefaults {
                proxy_uid: 2102,
                proxy_gid: None,
                outbound_port: 4140,
                inbound_port: 4143,
                reserved_inbound_ports: &[4190, 4191],
                loopback: LoopbackMode::Bypass,
                port_exclusions: &[4567, 4568],
            },
            // kuma-dp transparent proxy (kuma's iptables builder, nat
            // table): UID 5678, outbound 15001, inbound 15006, the
            // 127.0.0.6 passthrough, only kuma-dp's loopback connections to
            // the inbound listener; no inbound ports reserved on Kubernetes.
            Preset::Kuma => PresetDefaults {
                proxy_uid: 5678,
                proxy_gid: None,
                outbound_port: 15001,
                inbound_port: 15006,
                reserved_inbound_ports: &[],
                loopback: LoopbackMode::ProxyToInbound,
                port_exclusions: &[],
            },
        }
    }
}

/// OSM defaults (seed 004: UID 1500, outbound 15001, inbound 15003).
pub const DEFAULT_PROXY_UID: u32 = 1500;
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15003;

/// Mesh-wide settings (OSM's MeshConfig `spec.traffic` vocabulary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
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
    /// None: every port.
    pub outbound_port_inclusion: Option<Vec<u16>>,
    pub inbound_port_exclusion: Vec<u16>,
    /// Inbound connections from these sources are not redirected.
    pub inbound_source_exclusion: Vec<IpNet>,
    /// None: every port (Istio's `-b *`).
    pub inbound_port_inclusion: Option<Vec<u16>>,
}

impl MeshConfig {
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
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self::for_preset(Preset::Osm)
    }
}

/// Pod-scoped settings from annotations. Exclusion lists (and OSM's
/// inclusion list) are merged with the mesh's; Istio's `include*` settings
/// replace the mesh's, as istio-injector does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// Where a workload's network namespace is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NetnsRef {
    Path(PathBuf),
    Pid(u32),
}

impl NetnsRef {
    pub fn path(&self) -> PathBuf {
        match self {
            NetnsRef::Path(p) => p.clone(),
            NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetnsRef::Path(p) => write!(f, "netns {}", p.display()),
            NetnsRef::Pid(pid) => write!(f, "pid {pid}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub name: String,
    pub netns: NetnsRef,
    /// The proxy's cgroup-v2 directory: the proxy is the process in it,
    /// whatever its UID (no bypass by running as the proxy's UID).
    pub proxy_cgroup: Option<PathBuf>,
    pub annotations: WorkloadAnnotations,
}

/// A parsed config file. Workloads whose own entry is bad are listed in
/// `rejected` (with the error) and do not stop the others.
#[derive(Debug)]
pub struct Config {
    pub mesh: MeshConfig,
    pub workloads: Vec<WorkloadSpec>,
    pub rejected: Vec<(String, anyhow::Error)>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Read through [`mesh_from_value`], the same path as `mesh.yaml`.
    #[serde(default)]
    mesh: serde_yaml::Value,
    #[serde(default)]
    workloads: Vec<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMesh {
    preset: Option<String>,
    loopback: Option<String>,
    acceleration: Option<serde_yaml::Value>,
    inbound: Option<bool>,
    #[serde(rename = "proxyUID")]
    proxy_uid: Option<i64>,
    #[serde(rename = "proxyGID")]
    proxy_gid: Option<i64>,
    outbound_port: Option<i64>,
    inbound_port: Option<i64>,
    #[serde(rename = "outboundIPRangeExclusionList", default, deserialize_with = "null_as_empty")]
    outbound_ip_range_exclusion_list: Vec<String>,
    #[serde(rename = "outboundIPRangeInclusionList", default, deserialize_with = "null_as_empty")]
    outbound_ip_range_inclusion_list: Vec<String>,
    outbound_port_exclusion_list: Option<Vec<serde_yaml::Value>>,
    inbound_port_exclusion_list: Option<Vec<serde_yaml::Value>>,
    #[serde(rename = "inboundSourceIPRangeExclusionList", default, deserialize_with = "null_as_empty")]
    inbound_source_ip_range_exclusion_list: Vec<String>,
    outbound_port_inclusion_list: Option<Vec<serde_yaml::Value>>,
    inbound_port_inclusion_list: Option<Vec<serde_yaml::Value>>,
}

/// A list given as `null` (`key:` with no value) is the empty list, in a
/// config file as in `mesh.yaml` (serde_yaml's Value path took null as
/// empty, its text path refused it).
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    netns: Option<PathBuf>,
    pid: Option<i64>,
    #[serde(rename = "proxyCgroup")]
    proxy_cgroup: Option<PathBuf>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Reads and parses a config file.
pub fn load_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    parse_config(&text).with_context(|| format!("config file {}", path.display()))
}

/// Parses a config document. Errors in `mesh` (or YAML syntax) fail the
/// whole document; errors in one workload only reject that workload.
pub fn parse_config(text: &str) -> Result<Config> {
    let raw: RawConfig = serde_yaml::from_str(text).context("invalid YAML")?;
    let mesh = mesh_from_value(raw.mesh).context("in `mesh`")?;
    let mut workloads: Vec<WorkloadSpec> = Vec::new();
    let mut rejected = Vec::new();
    // Names and namespaces taken so far (a config lists thousands).
    let mut names: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut namespaces: std::collections::HashMap<NetnsRef, usize> = std::collections::HashMap::new();
    let preset = mesh.preset;
    for (index, value) in raw.workloads.into_iter().enumerate() {
        let fallback_name = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("workloads[{index}]"));
        match parse_workload(preset, value) {
            Ok(w) => {
                if names.contains(&w.name) {
                    rejected.push((w.name.clone(), anyhow!("workload `{}`: name is listed twice", w.name)));
                } else if let Some(o) = namespaces.get(&w.netns).map(|&i| &workloads[i]) {
                    rejected.push((
                        w.name.clone(),
                        anyhow!("workload `{}`: {} is already used by workload `{}`", w.name, w.netns, o.name),
                    ));
                } else {
                    names.insert(w.name.clone());
                    namespaces.insert(w.netns.clone(), workloads.len());
                    workloads.push(w);
                }
            }
            Err(e) => rejected.push((fallback_name.clone(), e.context(format!("workload `{fallback_name}`")))),
        }
    }
    Ok(Config { mesh, workloads, rejected })
}

fn parse_workload(preset: Preset, value: serde_yaml::Value) -> Result<WorkloadSpec> {
    let raw: RawWorkload = serde_yaml::from_value(value).map_err(|e| anyhow!("{e}"))?;
    if raw.name.trim().is_empty() {
        bail!("key `name`: value \"\" is empty");
    }
    let netns = match (raw.netns, raw.pid) {
        (Some(p), None) => {
            if !p.is_absolute() {
                bail!("key `netns`: value {:?} is not an absolute path", p.display().to_string());
            }
            NetnsRef::Path(p)
        }
        (None, Some(pid)) => {
            let pid = u32::try_from(pid)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| anyhow!("key `pid`: value {pid} is not a process id"))?;
            NetnsRef::Pid(pid)
        }
        (Some(_), Some(_)) => bail!("keys `netns` and `pid`: give one of them, not both"),
        (None, None) => bail!("key `netns`: missing (give `netns: PATH` or `pid: N`)"),
    };
    if let Some(p) = &raw.proxy_cgroup {
        if !p.is_absolute() {
            bail!("key `proxyCgroup`: value {:?} is not an absolute path", p.display().to_string());
        }
    }
    let annotations = parse_annotations(preset, &raw.annotations)?;
    Ok(WorkloadSpec { name: raw.name, netns, proxy_cgroup: raw.proxy_cgroup, annotations })
}

/// Parses a mesh-wide settings document: the `mesh` mapping of the config
/// file, as a YAML text (in Kubernetes mode, the ConfigMap's `mesh.yaml`;
/// `None`: the preset defaults), with `overrides` laid over it key by key
/// (OSM's MeshConfig `spec.traffic` lists use the same key names).
pub fn parse_mesh_document(text: Option<&str>, overrides: &[(String, serde_yaml::Value)]) -> Result<MeshConfig> {
    let mut doc = match text {
        None => serde_yaml::Mapping::new(),
        Some(t) => match untagged(serde_yaml::from_str::<serde_yaml::Value>(t).context("invalid YAML")?) {
            serde_yaml::Value::Null => serde_yaml::Mapping::new(),
            serde_yaml::Value::Mapping(m) => m,
            other => bail!("expected a mapping of mesh settings, found {}", yaml_kind(&other)),
        },
    };
    for (key, value) in overrides {
        doc.insert(serde_yaml::Value::String(key.clone()), value.clone());
    }
    mesh_from_value(serde_yaml::Value::Mapping(doc))
}

/// The mesh settings of a config file's `mesh` section or of `mesh.yaml`:
/// one path for both, so that the same text means the same in either
/// (serde_yaml's text and Value readers differ on nulls and tags). Tags
/// (`!foo`) are ignored; `null` is the preset's defaults.
fn mesh_from_value(v: serde_yaml::Value) -> Result<MeshConfig> {
    let doc = match untagged(v) {
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        serde_yaml::Value::Mapping(m) => m,
        other => bail!("expected a mapping of mesh settings, found {}", yaml_kind(&other)),
    };
    let raw: RawMesh = serde_yaml::from_value(serde_yaml::Value::Mapping(doc)).map_err(|e| anyhow!("{e}"))?;
    parse_mesh(raw)
}

/// The value without YAML tags (`!foo`).
fn untagged(v: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match v {
        Value::Tagged(t) => untagged(t.value),
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(untagged).collect()),
        Value::Mapping(m) => Value::Mapping(m.into_iter().map(|(k, v)| (untagged(k), untagged(v))).collect()),
        v => v,
    }
}

fn yaml_kind(v: &serde_yaml::Value) -> &'static str {
    match v {
        serde_yaml::Value::Null => "nothing",
        serde_yaml::Value::Bool(_) => "a boolean",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a mapping",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    }
}

fn parse_mesh(raw: RawMesh) -> Result<MeshConfig> {
    let preset = match &raw.preset {
        None => Preset::Osm,
        Some(s) => Preset::parse(s).context("key `preset`")?,
    };
    let d = MeshConfig::for_preset(preset);
    let id = |key: &str, v: Option<i64>, default: u32| -> Result<u32> {
        match v {
            None => Ok(default),
            Some(v) => u32::try_from(v).map_err(|_| anyhow!("key `{key}`: value {v} is not a valid user/group id")),
        }
    };
    let port = |key: &str, v: Option<i64>, default: u16| -> Result<u16> {
        match v {
            None => Ok(default),
            Some(v) => port_from_i64(v).with_context(|| format!("key `{key}`")),
        }
    };
    let ports = |key: &str, v: &[serde_yaml::Value]| -> Result<Vec<u16>> {
        v.iter()
            .map(|item| match item {
                serde_yaml::Value::Number(n) => match n.as_i64() {
                    Some(i) => port_from_i64(i),
                    None => Err(anyhow!("value {n} is not a port (1-65535)")),
                },
                serde_yaml::Value::String(s) => parse_port(s),
                other => Err(anyhow!("value {other:?} is not a port (1-65535)")),
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("key `{key}`"))
    };
    let cidrs = |key: &str, v: &[String]| -> Result<Vec<IpNet>> {
        v.iter().map(|s| parse_cidr(s)).collect::<Result<Vec<_>>>().with_context(|| format!("key `{key}`"))
    };
    let outbound_port = port("outboundPort", raw.outbound_port, d.outbound_port)?;
    let inbound_port = port("inboundPort", raw.inbound_port, d.inbound_port)?;
    if outbound_port == inbound_port {
        bail!("keys `outboundPort` and `inboundPort`: both are {outbound_port}; the proxy needs two listeners");
    }
    Ok(MeshConfig {
        proxy_uid: id("proxyUID", raw.proxy_uid, d.proxy_uid)?,
        proxy_gid: match raw.proxy_gid {
            None => d.proxy_gid,
            Some(g) => Some(id("proxyGID", Some(g), 0)?),
        },
        outbound_port,
        inbound_port,
        inbound: raw.inbound.unwrap_or(true),
        outbound_port_inclusion: match &raw.outbound_port_inclusion_list {
            None => None,
            Some(v) => Some(ports("outboundPortInclusionList", v)?),
        },
        inbound_port_inclusion: match &raw.inbound_port_inclusion_list {
            None => None,
            Some(v) => Some(ports("inboundPortInclusionList", v)?),
        },
        preset,
        loopback: match &raw.loopback {
            None => d.loopback,
            Some(s) => s.parse().context("key `loopback`")?,
        },
        acceleration: match &raw.acceleration {
            None => Acceleration::None,
            Some(serde_yaml::Value::String(s)) => s.parse().context("key `acceleration`")?,
            Some(other) => bail!(
                "key `acceleration`: value {} is {}, expected one of none, sockmap",
                serde_yaml::to_string(other).unwrap_or_default().trim(),
                yaml_kind(other)
            ),
        },
        reserved_inbound_ports: d.reserved_inbound_ports,
        outbound_ip_range_exclusion: cidrs("outboundIPRangeExclusionList", &raw.outbound_ip_range_exclusion_list)?,
        outbound_ip_range_inclusion: cidrs("outboundIPRangeInclusionList", &raw.outbound_ip_range_inclusion_list)?,
        inbound_source_exclusion: cidrs(
            "inboundSourceIPRangeExclusionList",
            &raw.inbound_source_ip_range_exclusion_list,
        )?,
        outbound_port_exclusion: match &raw.outbound_port_exclusion_list {
            None => d.outbound_port_exclusion,
            Some(v) => ports("outboundPortExclusionList", v)?,
        },
        inbound_port_exclusion: match &raw.inbound_port_exclusion_list {
            None => d.inbound_port_exclusion,
            Some(v) => ports("inboundPortExclusionList", v)?,
        },
    })
}

fn port_from_i64(v: i64) -> Result<u16> {
    match u16::try_from(v) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(anyhow!("value {v} is not a port (1-65535)")),
    }
}

/// One port number, as OSM accepts it in its lists.
pub fn parse_port(s: &str) -> Result<u16> {
    let t = s.trim();
    let v: i64 = t.parse().map_err(|_| anyhow!("value {s:?} is not a port number (1-65535)"))?;
    port_from_i64(v).map_err(|_| anyhow!("value {s:?} is not a port (1-65535)"))
}

/// One address range, IPv4 or IPv6: `a.b.c.d/len`, `2001:db8::/32`, or a
/// bare address meaning a host route (as `iptables -d` takes it). Host bits
/// are cleared, as iptables does. An IPv4-mapped IPv6 range
/// (`::ffff:192.0.2.0/120`) is the IPv4 range it denotes. The address is
/// read by the same (std) parser with or without a prefix: it refuses
/// octets with leading zeros (`010` is 8 to inet_aton, 10 to others), as
/// Go's `net.ParseCIDR` does for the meshes' own tools.
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    let t = s.trim();
    if t.is_empty() {
        bail!("value {s:?} is empty, expected a CIDR such as 192.0.2.0/24 or 2001:db8::/32");
    }
    let (addr, len) = match t.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (t, None),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        bail!("value {s:?} is not a CIDR (expected e.g. 192.0.2.0/24 or 2001:db8::/32)");
    };
    let net = match len {
        None => IpNet::from(addr),
        Some(len) => {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = Some(len)
                .filter(|l| !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|l| l.parse::<u8>().ok())
                .filter(|l| *l <= max);
            let Some(prefix) = prefix else {
                bail!("value {s:?} has an invalid prefix length {len:?} (0-{max})");
            };
            IpNet::new(addr, prefix).expect("prefix checked")
        }
    };
    Ok(canonical_net(net))
}

/// Host bits cleared; IPv4-mapped IPv6 ranges as IPv4.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net.trunc() {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).expect("<= 32")),
            None => IpNet::V6(n),
        },
        n => n,
    }
}

/// One port or, where the dialect allows it, a range `a-b` (Linkerd),
/// as first and last port.
fn parse_port_or_range(s: &str) -> Result<(u16, u16)> {
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (parse_port(a)?, parse_port(b)?);
            if a > b {
                bail!("value {s:?} is not a port range (first port above the last)");
            }
            Ok((a, b))
        }
        None => parse_port(s).map(|p| (p, p)),
    }
}

/// A comma-separated list, as in OSM's annotations. An empty or blank
/// value is an empty list; an empty item between commas is an error.
fn split_list(value: &str) -> Vec<&str> {
    if value.trim().is_empty() {
        return Vec::new();
    }
    value.split(',').map(str::trim).collect()
}

fn parse_list<T>(key: &str, value: &str, item: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    split_list(value)
        .into_iter()
        .map(|s| if s.is_empty() { Err(anyhow!("empty item between commas")) } else { item(s) })
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("annotation `{key}`: value {value:?}"))
}

/// An Istio include value: `*` for everything, else a list.
fn parse_inclusion<T>(key: &str, value: &str, item: impl Fn(&str) -> Result<T>) -> Result<Inclusion<T>> {
    if value.trim() == "*" {
        return Ok(Inclusion::All);
    }
    Ok(Inclusion::Only(parse_list(key, value, item)?))
}

/// The ports of a list of ports and ranges, ascending, each once. The
/// ranges are sorted and merged before anything is expanded, so the work
/// and memory are bounded by the 65,535 ports, not by how often a value
/// within the annotation size limit repeats `1-65535`.
fn flatten_ranges(key: &str, value: &str) -> Result<Vec<u16>> {
    let mut ranges = parse_list(key, value, parse_port_or_range)?;
    ranges.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    Ok(merged.into_iter().flat_map(|(a, b)| a..=b).collect())
}

/// Parses the annotations of one workload in the vocabulary of `preset`.
/// Keys of other vocabularies are ignored (pods carry many annotations).
pub fn parse_annotations(preset: Preset, annotations: &BTreeMap<String, String>) -> Result<WorkloadAnnotations> {
    let mut out = WorkloadAnnotations::default();
    for (key, value) in annotations {
        let k = key.as_str();
        match preset {
            Preset::Osm => {
                use osm_annotations::*;
                match k {
                    OUTBOUND_PORT_EXCLUSION => out.outbound_port_exclusion = parse_list(k, value, parse_port)?,
                    INBOUND_PORT_EXCLUSION => out.inbound_port_exclusion = parse_list(k, value, parse_port)?,
                    OUTBOUND_IP_RANGE_EXCLUSION => out.outbound_ip_range_exclusion = parse_list(k, value, parse_cidr)?,
                    OUTBOUND_IP_RANGE_INCLUSION => out.outbound_ip_range_inclusion = parse_list(k, value, parse_cidr)?,
                    _ => {}
                }
            }
            Preset::Istio => {
                use istio_annotations::*;
                match k {
                    INCLUDE_OUTBOUND_IP_RANGES => {
                        out.outbound_ip_range_inclusion_override = Some(parse_inclusion(k, value, parse_cidr)?)
                    }
                    EXCLUDE_OUTBOUND_IP_RANGES => out.outbound_ip_range_exclusion = parse_list(k, value, parse_cidr)?,
                    INCLUDE_INBOUND_PORTS => out.inbound_port_inclusion = Some(parse_inclusion(k, value, parse_port)?),
                    EXCLUDE_INBOUND_PORTS => out.inbound_port_exclusion = parse_list(k, value, parse_port)?,
                    INCLUDE_OUTBOUND_PORTS => {
                        out.outbound_port_inclusion = Some(parse_inclusion(k, value, parse_port)?)
                    }
                    EXCLUDE_OUTBOUND_PORTS => out.outbound_port_exclusion = parse_list(k, value, parse_port)?,
                    _ => {}
                }
            }
            Preset::Linkerd => {
                use linkerd_annotations::*;
                match k {
                    SKIP_OUTBOUND_PORTS => out.outbound_port_exclusion = flatten_ranges(k, value)?,
                    SKIP_INBOUND_PORTS => out.inbound_port_exclusion = flatten_ranges(k, value)?,
                    // proxy-init's --subnets-to-ignore: `-A PROXY_INIT_REDIRECT -s <subnet> -j RETURN`.
                    SKIP_SUBNETS => out.inbound_source_exclusion = parse_list(k, value, parse_cidr)?,
                    _ => {}
                }
            }
            Preset::Kuma => {
                use kuma_annotations::*;
                match k {
                    EXCLUDE_OUTBOUND_PORTS => out.outbound_port_exclusion = flatten_ranges(k, value)?,
                    EXCLUDE_INBOUND_PORTS => out.inbound_port_exclusion = flatten_ranges(k, value)?,
                    EXCLUDE_OUTBOUND_IPS => out.outbound_ip_range_exclusion = parse_list(k, value, parse_cidr)?,
                    // `-A KUMA_MESH_INBOUND -s <address> -j RETURN`.
                    EXCLUDE_INBOUND_IPS => out.inbound_source_exclusion = parse_list(k, value, parse_cidr)?,
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
mesh:
  proxyUID: 1500
  outboundPort: 15001
  inboundPort: 15003
  outboundIPRangeExclusionList: ["198.51.100.0/24"]
  outboundIPRangeInclusionList: []
  outboundPortExclusionList: [6379]
  inboundPortExclusionList: [9090]
workloads:
  - name: app
    netns: /run/netns/app
    annotations:
      openservicemesh.io/outbound-port-exclusion-list: "7070"
      openservicemesh.io/outbound-ip-range-exclusion-list: "203.0.113.0/25"
      openservicemesh.io/outbound-ip-range-inclusion-list: ""
      openservicemesh.io/inbound-port-exclusion-list: ""
  - name: by-pid
    pid: 4242
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = parse_config(EXAMPLE).unwrap();
        assert!(c.rejected.is_empty(), "{:?}", c.rejected);
        assert_eq!(c.mesh.proxy_uid, 1500);
        assert_eq!(c.mesh.outbound_ip_range_exclusion, vec!["198.51.100.0/24".parse().unwrap()]);
        assert_eq!(c.mesh.outbound_port_exclusion, vec![6379]);
        assert_eq!(c.mesh.inbound_port_exclusion, vec![9090]);
        assert_eq!(c.workloads.len(), 2);
        let app = &c.workloads[0];
        assert_eq!(app.netns, NetnsRef::Path("/run/netns/app".into()));
        assert_eq!(app.annotations.outbound_port_exclusion, vec![7070]);
        assert_eq!(app.annotations.outbound_ip_range_exclusion, vec!["203.0.113.0/25".parse().unwrap()]);
        assert!(app.annotations.outbound_ip_range_inclusion.is_empty());
        assert_eq!(c.workloads[1].netns, NetnsRef::Pid(4242));
    }

    #[test]
    fn empty_document_means_defaults() {
        let c = parse_config("{}").unwrap();
        assert_eq!(c.mesh, MeshConfig::default());
        assert!(c.workloads.is_empty());
    }

    fn err_text(e: &anyhow::Error) -> String {
        format!("{e:#}")
    }

    #[test]
    fn mesh_errors_name_key_value_and_reason() {
        let e = parse_config("mesh:\n  outboundPort: 70000\n").unwrap_err();
        let t = err_text(&e);
        assert!(t.contains("outboundPort") && t.contains("70000") && t.contains("1-65535"), "{t}");

        let e = parse_config("mesh:\n  outboundPortExclusionList: [0]\n").unwrap_err();
        let t = err_text(&e);
        assert!(t.contains("outboundPortExclusionList") && t.contains("value 0"), "{t}");

        let e = parse_config("mesh:\n  outboundIPRangeExclusionList: [\"300.1.1.1/8\"]\n").unwrap_err();
        let t = err_text(&e);
        assert!(t.contains("outboundIPRangeExclusionList") && t.contains("300.1.1.1/8"), "{t}");

        let e = parse_config("mesh:\n  proxyUid: 1\n").unwrap_err();
        assert!(err_text(&e).contains("proxyUid"), "{}", err_text(&e));

        let e = parse_config("mesh:\n  outboundPort: 15003\n").unwrap_err();
        assert!(err_text(&e).contains("inboundPort"), "{}", err_text(&e));
    }

    #[test]
    fn workload_errors_reject_only_that_workload() {
        let doc = r#"
workloads:
  - name: good
    netns: /run/netns/good
  - name: bad
    netns: /run/netns/bad
    annotations:
      openservicemesh.io/outbound-port-exclusion-list: "7070,abc"
  - name: nons
  - name: dup
    netns: /run/netns/good
"#;
        let c = parse_config(doc).unwrap();
        assert_eq!(c.workloads.len(), 1);
        assert_eq!(c.workloads[0].name, "good");
        let texts: Vec<String> = c.rejected.iter().map(|(_, e)| err_text(e)).collect();
        assert_eq!(texts.len(), 3, "{texts:?}");
        assert!(texts[0].contains("workload `bad`"), "{texts:?}");
        assert!(texts[0].contains("outbound-port-exclusion-list"), "{texts:?}");
        assert!(texts[0].contains("\"abc\""), "{texts:?}");
        assert!(texts[1].contains("workload `nons`") && texts[1].contains("netns"), "{texts:?}");
        assert!(texts[2].contains("already used"), "{texts:?}");
    }

    #[test]
    fn annotation_lists() {
        let mut a = BTreeMap::new();
        a.insert(osm_annotations::OUTBOUND_PORT_EXCLUSION.into(), " 6379, 7070 ".into());
        a.insert(osm_annotations::OUTBOUND_IP_RANGE_INCLUSION.into(), "192.0.2.0/24,198.51.100.7".into());
        a.insert("openservicemesh.io/sidecar-injection".into(), "enabled".into());
        let p = parse_annotations(Preset::Osm, &a).unwrap();
        assert_eq!(p.outbound_port_exclusion, vec![6379, 7070]);
        assert_eq!(
            p.outbound_ip_range_inclusion,
            vec!["192.0.2.0/24".parse().unwrap(), "198.51.100.7/32".parse().unwrap()]
        );
        for bad in ["7070,", ",", "65536", "-1", "1.5", "http"] {
            let mut a = BTreeMap::new();
            a.insert(osm_annotations::INBOUND_PORT_EXCLUSION.into(), bad.to_string());
            let e = parse_annotations(Preset::Osm, &a).unwrap_err();
            let t = err_text(&e);
            assert!(t.contains("inbound-port-exclusion-list"), "{bad}: {t}");
        }
    }

    /// Fuzz finding (port_cidr_lists, 2026-11-23): `2::ffff:03.0.113.0/25`
    /// was accepted (ipnet's own parser takes leading-zero octets) while the
    /// bare address `2::ffff:03.0.113.0` was refused: the same address read
    /// by two grammars, and `010` means 8 to inet_aton but 10 to ipnet.
    #[test]
    fn cidr_with_leading_zero_octet_is_refused_like_the_bare_address() {
        for bad in ["2::ffff:03.0.113.0/25", "192.0.2.010/32", "010.0.0.0/8", "::ffff:192.0.2.01/120"] {
            let bare = bad.split_once('/').unwrap().0;
            assert!(parse_cidr(bare).is_err(), "{bare}");
            let t = err_text(&parse_cidr(bad).unwrap_err());
            assert!(t.contains(bad) && t.contains("not a CIDR"), "{t}");
        }
        for bad_len in ["192.0.2.0/+8", "192.0.2.0/", "192.0.2.0/08x", "2001:db8::/0129"] {
            assert!(err_text(&parse_cidr(bad_len).unwrap_err()).contains("prefix length"), "{bad_len}");
        }
        assert_eq!(parse_cidr("192.0.2.10/08").unwrap(), "192.0.0.0/8".parse().unwrap());
        assert_eq!(parse_cidr(" 2001:db8::1/32 ").unwrap(), "2001:db8::/32".parse().unwrap());
    }

    /// Fuzz finding (mesh_config, 2026-11-23): `outboundIPRangeInclusionList:`
    /// with no value was accepted in Kubernetes mode's `mesh.yaml` (as the
    /// empty list) but refused in a config file's `mesh` section.
    #[test]
    fn null_list_means_the_same_in_a_config_file_and_in_mesh_yaml() {
        for key in ["outboundIPRangeExclusionList", "outboundIPRangeInclusionList", "inboundSourceIPRangeExclusionList"]
        {
            let file = parse_config(&format!("mesh:\n  {key}:\n")).unwrap().mesh;
            let doc = parse_mesh_document(Some(&format!("{key}: ~\n")), &[]).unwrap();
            assert_eq!(file, MeshConfig::default(), "{key}");
            assert_eq!(doc, file, "{key}");
        }
    }

    /// Fuzz findings (mesh_config, 2026-11-23): `outboundPortExclusionList:
    /// !tag` (a tagged null) was accepted in a config file but refused in
    /// `mesh.yaml`; once tags were stripped there, `proxyUID: !5` was the
    /// other way round (serde_yaml's text reader refuses a tagged null for
    /// a number). Both now go through `mesh_from_value`.
    #[test]
    fn yaml_tags_mean_the_same_in_a_config_file_and_in_mesh_yaml() {
        for text in
            ["outboundPortExclusionList: !pasoop", "outboundIPRangeExclusionList: !x", "proxyUID: !5", "proxyUID: !a 7"]
        {
            let doc = parse_mesh_document(Some(text), &[]).map_err(|e| format!("{e:#}"));
            let file = parse_config(&format!("mesh:\n  {text}\n")).map(|c| c.mesh).map_err(|e| format!("{e:#}"));
            assert_eq!(doc.as_ref().ok(), file.as_ref().ok(), "{text}: {doc:?} / {file:?}");
            assert!(doc.is_ok(), "{text}: {doc:?}");
        }
    }

    #[test]
    fn cidr_forms() {
        assert_eq!(parse_cidr("192.0.2.77/24").unwrap(), "192.0.2.0/24".parse().unwrap());
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), "0.0.0.0/0".parse().unwrap());
        assert!(err_text(&parse_cidr("192.0.2.0/33").unwrap_err()).contains("prefix length"));
        assert_eq!(parse_cidr("2001:db8::1/32").unwrap(), "2001:db8::/32".parse().unwrap());
        assert_eq!(parse_cidr("::ffff:192.0.2.0/120").unwrap(), "192.0.2.0/24".parse().unwrap());
        assert_eq!(parse_cidr("::ffff:192.0.2.9").unwrap(), "192.0.2.9/32".parse().unwrap());
        assert_eq!(parse_cidr("2001:db8::5").unwrap(), "2001:db8::5/128".parse().unwrap());
        assert!(err_text(&parse_cidr("2001:db8::/129").unwrap_err()).contains("0-128"));
        assert!(err_text(&parse_cidr("").unwrap_err()).contains("empty"));
        assert!(parse_cidr("192.0.2").is_err());
    }
}

#[cfg(test)]
mod example_file {
    #[test]
    fn deploy_example_parses() {
        let text = include_str!("../../deploy/config.example.yaml");
        let c = super::parse_config(text).unwrap();
        assert!(c.rejected.is_empty(), "{:?}", c.rejected);
        assert_eq!(c.workloads.len(), 1);
    }
}

#[cfg(test)]
mod dialects {
    use super::*;

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
            let c = parse_config(&format!("mesh:\n  preset: {name}\n")).unwrap();
            assert_eq!((c.mesh.proxy_uid, c.mesh.outbound_port, c.mesh.inbound_port), (uid, out, inb), "{name}");
        }
        let istio = parse_config("mesh:\n  preset: istio\n").unwrap().mesh;
        assert_eq!(istio.proxy_gid, Some(1337));
        assert_eq!(istio.reserved_inbound_ports, vec![22, 15020, 15021, 15090]);
        assert_eq!(istio.loopback, LoopbackMode::ToInbound);
        // Explicit fields override the preset.
        let c = parse_config("mesh:\n  preset: istio\n  proxyUID: 1400\n  inboundPort: 15106\n").unwrap();
        assert_eq!((c.mesh.proxy_uid, c.mesh.inbound_port, c.mesh.proxy_gid), (1400, 15106, Some(1337)));
        let e = parse_config("mesh:\n  preset: consul\n").unwrap_err();
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
        assert_eq!(parse_config("").unwrap().mesh.acceleration, Acceleration::None);
        assert_eq!(parse_config("mesh:\n  preset: istio\n").unwrap().mesh.acceleration, Acceleration::None);
        let m = parse_config("mesh:\n  acceleration: sockmap\n").unwrap().mesh;
        assert_eq!(m.acceleration, Acceleration::Sockmap);
        assert_eq!(parse_config("mesh:\n  acceleration: none\n").unwrap().mesh.acceleration, Acceleration::None);
        for (doc, value, reason) in [
            ("mesh:\n  acceleration: sockhash\n", "\"sockhash\"", "not an acceleration mode (none, sockmap)"),
            ("mesh:\n  acceleration: Sockmap\n", "\"Sockmap\"", "not an acceleration mode"),
            ("mesh:\n  acceleration: \"\"\n", "\"\"", "not an acceleration mode"),
            ("mesh:\n  acceleration: true\n", "true", "is a boolean, expected one of none, sockmap"),
            ("mesh:\n  acceleration: [sockmap]\n", "sockmap", "is a list"),
        ] {
            let t = format!("{:#}", parse_config(doc).unwrap_err());
            assert!(
                t.contains("`mesh`") && t.contains("key `acceleration`") && t.contains(value) && t.contains(reason),
                "{doc:?}: {t}"
            );
        }
        // The Kubernetes ConfigMap's mesh.yaml goes through the same parser.
        assert_eq!(
            parse_mesh_document(Some("acceleration: sockmap\n"), &[]).unwrap().acceleration,
            Acceleration::Sockmap
        );
        let t = format!("{:#}", parse_mesh_document(Some("acceleration: fast\n"), &[]).unwrap_err());
        assert!(t.contains("key `acceleration`") && t.contains("\"fast\""), "{t}");
    }

    #[test]
    fn loopback_mode_and_preset_port_defaults() {
        let m = parse_config("mesh:\n  preset: linkerd\n").unwrap().mesh;
        assert_eq!(
            (m.outbound_port_exclusion.clone(), m.inbound_port_exclusion.clone()),
            (vec![4567, 4568], vec![4567, 4568])
        );
        assert_eq!(m.loopback, LoopbackMode::Bypass);
        let m = parse_config("mesh:\n  preset: linkerd\n  outboundPortExclusionList: []\n").unwrap().mesh;
        assert!(m.outbound_port_exclusion.is_empty(), "an explicit list replaces the preset's");
        assert_eq!(parse_config("mesh:\n  preset: kuma\n").unwrap().mesh.loopback, LoopbackMode::ProxyToInbound);
        let m = parse_config("mesh:\n  preset: istio\n  loopback: proxy-to-inbound\n").unwrap().mesh;
        assert_eq!(m.loopback, LoopbackMode::ProxyToInbound);
        let t = format!("{:#}", parse_config("mesh:\n  loopback: sometimes\n").unwrap_err());
        assert!(t.contains("loopback") && t.contains("sometimes") && t.contains("proxy-to-inbound"), "{t}");
    }
}
