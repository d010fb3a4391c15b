//! Mesh-wide settings: the `mesh` mapping of a config file or of the
//! ConfigMap's `mesh.yaml` (OSM's MeshConfig `spec.traffic` vocabulary),
//! laid over the preset's defaults.
use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    dialect::{LoopbackMode, Preset},
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
        }
    }
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self::for_preset(Preset::Osm)
    }
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

/// Parses a mesh-wide settings document: the `mesh` mapping of the config
/// file, as a YAML text (in Kubernetes mode, the ConfigMap's `mesh.yaml`;
/// `None`: the preset defaults), with `overrides` laid over it key by key
/// (OSM's MeshConfig `spec.traffic` lists use the same key names).
pub fn parse_mesh_document(text: Option<&str>, overrides: &[(String, serde_yaml::Value)]) -> Result<MeshSettings> {
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
pub(crate) fn mesh_from_value(v: serde_yaml::Value) -> Result<MeshSettings> {
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

fn parse_mesh(raw: RawMesh) -> Result<MeshSettings> {
    let preset = match &raw.preset {
        None => Preset::Osm,
        Some(s) => Preset::parse(s).context("key `preset`")?,
    };
    let d = MeshSettings::for_preset(preset);
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
    Ok(MeshSettings {
        proxy_uid: id("proxyUID", raw.proxy_uid, d.proxy_uid)?,
        proxy_gid: match raw.proxy_gid {
            None => d.proxy_gid,
            Some(g) => Some(id("proxyGID", Some(g), 0)?),
        },
        outbound_port,
        inbound_port,
        inbound: raw.inbound.unwrap_or(true),
        // An empty inclusion list adds no rule, so it restricts nothing:
        // the same as `outboundIPRangeInclusionList: []` (osm-init writes
        // its catch-all rule then).
        outbound_port_inclusion: match &raw.outbound_port_inclusion_list {
            None => None,
            Some(v) => Some(ports("outboundPortInclusionList", v)?).filter(|v| !v.is_empty()),
        },
        inbound_port_inclusion: match &raw.inbound_port_inclusion_list {
            None => None,
            Some(v) => Some(ports("inboundPortInclusionList", v)?).filter(|v| !v.is_empty()),
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
