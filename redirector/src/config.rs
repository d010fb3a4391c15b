//! Parsing: the YAML config file and pod annotations become typed values.
//! Nothing here touches the kernel; every error names the input, the value
//! and the reason.
use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

/// OSM's annotation keys (pod scoped lists, merged with the mesh lists).
pub mod osm_annotations {
    pub const OUTBOUND_PORT_EXCLUSION: &str = "openservicemesh.io/outbound-port-exclusion-list";
    pub const OUTBOUND_IP_RANGE_EXCLUSION: &str =
        "openservicemesh.io/outbound-ip-range-exclusion-list";
    pub const OUTBOUND_IP_RANGE_INCLUSION: &str =
        "openservicemesh.io/outbound-ip-range-inclusion-list";
    pub const INBOUND_PORT_EXCLUSION: &str = "openservicemesh.io/inbound-port-exclusion-list";
    pub const ALL: [&str; 4] = [
        OUTBOUND_PORT_EXCLUSION,
        OUTBOUND_IP_RANGE_EXCLUSION,
        OUTBOUND_IP_RANGE_INCLUSION,
        INBOUND_PORT_EXCLUSION,
    ];
}

/// OSM defaults (seed 004: UID 1500, outbound 15001, inbound 15003).
pub const DEFAULT_PROXY_UID: u32 = 1500;
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15003;

/// Mesh-wide settings (OSM's MeshConfig `spec.traffic` vocabulary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub outbound_ip_range_exclusion: Vec<Ipv4Net>,
    pub outbound_ip_range_inclusion: Vec<Ipv4Net>,
    pub outbound_port_exclusion: Vec<u16>,
    pub inbound_port_exclusion: Vec<u16>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: None,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            outbound_ip_range_exclusion: Vec::new(),
            outbound_ip_range_inclusion: Vec::new(),
            outbound_port_exclusion: Vec::new(),
            inbound_port_exclusion: Vec::new(),
        }
    }
}

/// Pod-scoped lists from annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadAnnotations {
    pub outbound_port_exclusion: Vec<u16>,
    pub outbound_ip_range_exclusion: Vec<Ipv4Net>,
    pub outbound_ip_range_inclusion: Vec<Ipv4Net>,
    pub inbound_port_exclusion: Vec<u16>,
}

/// Where a workload's network namespace is.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    #[serde(default)]
    mesh: RawMesh,
    #[serde(default)]
    workloads: Vec<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMesh {
    #[serde(rename = "proxyUID")]
    proxy_uid: Option<i64>,
    #[serde(rename = "proxyGID")]
    proxy_gid: Option<i64>,
    outbound_port: Option<i64>,
    inbound_port: Option<i64>,
    #[serde(rename = "outboundIPRangeExclusionList", default)]
    outbound_ip_range_exclusion_list: Vec<String>,
    #[serde(rename = "outboundIPRangeInclusionList", default)]
    outbound_ip_range_inclusion_list: Vec<String>,
    #[serde(default)]
    outbound_port_exclusion_list: Vec<serde_yaml::Value>,
    #[serde(default)]
    inbound_port_exclusion_list: Vec<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    netns: Option<PathBuf>,
    pid: Option<i64>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Reads and parses a config file.
pub fn load_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    parse_config(&text).with_context(|| format!("config file {}", path.display()))
}

/// Parses a config document. Errors in `mesh` (or YAML syntax) fail the
/// whole document; errors in one workload only reject that workload.
pub fn parse_config(text: &str) -> Result<Config> {
    let raw: RawConfig = serde_yaml::from_str(text).context("invalid YAML")?;
    let mesh = parse_mesh(raw.mesh).context("in `mesh`")?;
    let mut workloads: Vec<WorkloadSpec> = Vec::new();
    let mut rejected = Vec::new();
    for (index, value) in raw.workloads.into_iter().enumerate() {
        let fallback_name = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("workloads[{index}]"));
        match parse_workload(value) {
            Ok(w) => {
                if workloads.iter().any(|o| o.name == w.name) {
                    rejected.push((
                        w.name.clone(),
                        anyhow!("workload `{}`: name is listed twice", w.name),
                    ));
                } else if let Some(o) = workloads.iter().find(|o| o.netns == w.netns) {
                    rejected.push((
                        w.name.clone(),
                        anyhow!(
                            "workload `{}`: {} is already used by workload `{}`",
                            w.name,
                            w.netns,
                            o.name
                        ),
                    ));
                } else {
                    workloads.push(w);
                }
            }
            Err(e) => rejected.push((
                fallback_name.clone(),
                e.context(format!("workload `{fallback_name}`")),
            )),
        }
    }
    Ok(Config { mesh, workloads, rejected })
}

fn parse_workload(value: serde_yaml::Value) -> Result<WorkloadSpec> {
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
    let annotations = parse_annotations(&raw.annotations)?;
    Ok(WorkloadSpec { name: raw.name, netns, annotations })
}

fn parse_mesh(raw: RawMesh) -> Result<MeshConfig> {
    let d = MeshConfig::default();
    let id = |key: &str, v: Option<i64>, default: u32| -> Result<u32> {
        match v {
            None => Ok(default),
            Some(v) => u32::try_from(v)
                .map_err(|_| anyhow!("key `{key}`: value {v} is not a valid user/group id")),
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
    let cidrs = |key: &str, v: &[String]| -> Result<Vec<Ipv4Net>> {
        v.iter()
            .map(|s| parse_cidr(s))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("key `{key}`"))
    };
    let outbound_port = port("outboundPort", raw.outbound_port, d.outbound_port)?;
    let inbound_port = port("inboundPort", raw.inbound_port, d.inbound_port)?;
    if outbound_port == inbound_port {
        bail!("keys `outboundPort` and `inboundPort`: both are {outbound_port}; the proxy needs two listeners");
    }
    Ok(MeshConfig {
        proxy_uid: id("proxyUID", raw.proxy_uid, d.proxy_uid)?,
        proxy_gid: match raw.proxy_gid {
            None => None,
            Some(g) => Some(id("proxyGID", Some(g), 0)?),
        },
        outbound_port,
        inbound_port,
        outbound_ip_range_exclusion: cidrs(
            "outboundIPRangeExclusionList",
            &raw.outbound_ip_range_exclusion_list,
        )?,
        outbound_ip_range_inclusion: cidrs(
            "outboundIPRangeInclusionList",
            &raw.outbound_ip_range_inclusion_list,
        )?,
        outbound_port_exclusion: ports("outboundPortExclusionList", &raw.outbound_port_exclusion_list)?,
        inbound_port_exclusion: ports("inboundPortExclusionList", &raw.inbound_port_exclusion_list)?,
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
    let v: i64 = t
        .parse()
        .map_err(|_| anyhow!("value {s:?} is not a port number (1-65535)"))?;
    port_from_i64(v).map_err(|_| anyhow!("value {s:?} is not a port (1-65535)"))
}

/// One IPv4 range: `a.b.c.d/len`, or a bare address meaning /32 (as
/// `iptables -d` takes it). Host bits are cleared, as iptables does.
pub fn parse_cidr(s: &str) -> Result<Ipv4Net> {
    let t = s.trim();
    if t.is_empty() {
        bail!("value {s:?} is empty, expected an IPv4 CIDR such as 192.0.2.0/24");
    }
    if let Ok(net) = t.parse::<IpNet>() {
        return match net {
            IpNet::V4(n) => Ok(n.trunc()),
            IpNet::V6(_) => Err(anyhow!(
                "value {s:?} is an IPv6 range; IPv6 redirection (connect6) is not supported yet"
            )),
        };
    }
    if let Ok(addr) = t.parse::<Ipv4Addr>() {
        return Ok(Ipv4Net::new(addr, 32).expect("/32 is valid"));
    }
    if t.parse::<std::net::Ipv6Addr>().is_ok() {
        bail!("value {s:?} is an IPv6 address; IPv6 redirection (connect6) is not supported yet");
    }
    if let Some((_, len)) = t.split_once('/') {
        if len.parse::<u8>().map_or(true, |l| l > 32) {
            bail!("value {s:?} has an invalid prefix length {len:?} (0-32)");
        }
    }
    bail!("value {s:?} is not an IPv4 CIDR (expected e.g. 192.0.2.0/24)")
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
        .map(|s| {
            if s.is_empty() {
                Err(anyhow!("empty item between commas"))
            } else {
                item(s)
            }
        })
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("annotation `{key}`: value {value:?}"))
}

/// Parses the OSM annotations of one workload. Keys outside the four list
/// annotations are ignored (pods carry many other annotations).
pub fn parse_annotations(annotations: &BTreeMap<String, String>) -> Result<WorkloadAnnotations> {
    use osm_annotations::*;
    let mut out = WorkloadAnnotations::default();
    for (key, value) in annotations {
        match key.as_str() {
            OUTBOUND_PORT_EXCLUSION => {
                out.outbound_port_exclusion = parse_list(key, value, parse_port)?
            }
            INBOUND_PORT_EXCLUSION => {
                out.inbound_port_exclusion = parse_list(key, value, parse_port)?
            }
            OUTBOUND_IP_RANGE_EXCLUSION => {
                out.outbound_ip_range_exclusion = parse_list(key, value, parse_cidr)?
            }
            OUTBOUND_IP_RANGE_INCLUSION => {
                out.outbound_ip_range_inclusion = parse_list(key, value, parse_cidr)?
            }
            _ => {}
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
        assert_eq!(
            app.annotations.outbound_ip_range_exclusion,
            vec!["203.0.113.0/25".parse().unwrap()]
        );
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

        let e = parse_config("mesh:\n  outboundIPRangeExclusionList: [\"300.1.1.1/8\"]\n")
            .unwrap_err();
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
        a.insert(
            osm_annotations::OUTBOUND_IP_RANGE_INCLUSION.into(),
            "192.0.2.0/24,198.51.100.7".into(),
        );
        a.insert("openservicemesh.io/sidecar-injection".into(), "enabled".into());
        let p = parse_annotations(&a).unwrap();
        assert_eq!(p.outbound_port_exclusion, vec![6379, 7070]);
        assert_eq!(
            p.outbound_ip_range_inclusion,
            vec!["192.0.2.0/24".parse().unwrap(), "198.51.100.7/32".parse().unwrap()]
        );
        for bad in ["7070,", ",", "65536", "-1", "1.5", "http"] {
            let mut a = BTreeMap::new();
            a.insert(osm_annotations::INBOUND_PORT_EXCLUSION.into(), bad.to_string());
            let e = parse_annotations(&a).unwrap_err();
            let t = err_text(&e);
            assert!(t.contains("inbound-port-exclusion-list"), "{bad}: {t}");
        }
    }

    #[test]
    fn cidr_forms() {
        assert_eq!(parse_cidr("192.0.2.77/24").unwrap(), "192.0.2.0/24".parse().unwrap());
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), "0.0.0.0/0".parse().unwrap());
        assert!(err_text(&parse_cidr("192.0.2.0/33").unwrap_err()).contains("prefix length"));
        assert!(err_text(&parse_cidr("2001:db8::/32").unwrap_err()).contains("IPv6"));
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
