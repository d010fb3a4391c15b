//! The config file: a `mesh` mapping (see [`crate::mesh`]) and the
//! workloads, each with its network namespace and its annotations in the
//! preset's vocabulary. Nothing here touches the kernel; every error names
//! the input, the value and the reason.
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;

use crate::{
    dialect::{parse_annotations, Preset, WorkloadAnnotations},
    mesh::{mesh_from_value, MeshSettings},
};

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
    pub mesh: MeshSettings,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{values::*, *};

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
        assert_eq!(c.mesh, MeshSettings::default());
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
            assert_eq!(file, MeshSettings::default(), "{key}");
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
mod empty_lists {
    use crate::{compile, evaluate, istio_annotations, parse_annotations, parse_config, OutboundConn, Preset, Verdict};

    fn policy(doc: &str) -> crate::Policy {
        let c = parse_config(doc).unwrap();
        compile(&c.mesh, &c.workloads.first().map(|w| w.annotations.clone()).unwrap_or_default())
    }

    /// An empty list adds no rule (as in the seeds' rules): an empty
    /// inclusion list restricts nothing, for ports as for IP ranges.
    #[test]
    fn an_empty_inclusion_list_restricts_nothing() {
        let none = policy("mesh: {}\nworkloads: []\n");
        for key in ["outboundPortInclusionList", "inboundPortInclusionList", "outboundIPRangeInclusionList"] {
            let p = policy(&format!("mesh:\n  {key}: []\nworkloads: []\n"));
            assert_eq!(p, none, "{key}: []");
        }
        let p = policy("mesh:\n  outboundPortInclusionList: []\nworkloads: []\n");
        assert!(matches!(
            evaluate(&p, &OutboundConn::tcp(1000, "192.0.2.10:80".parse().unwrap())),
            Verdict::Redirect(_)
        ));
        // A non-empty list still restricts.
        let p = policy("mesh:\n  outboundPortInclusionList: [443]\nworkloads: []\n");
        assert!(matches!(evaluate(&p, &OutboundConn::tcp(1000, "192.0.2.10:80".parse().unwrap())), Verdict::Pass(_)));
    }

    /// Istio's include annotations keep istio-iptables' meaning: `-q ""`
    /// adds no rule (no restriction), `-b ""` and `-i ""` leave no capture
    /// rule at all (nothing redirected).
    #[test]
    fn istio_empty_include_annotations_mean_what_istio_iptables_does() {
        use istio_annotations::*;
        let ann = |k: &str| [(k.to_string(), String::new())].into_iter().collect();
        let a = parse_annotations(Preset::Istio, &ann(INCLUDE_OUTBOUND_PORTS)).unwrap();
        assert_eq!(a.outbound_port_inclusion, Some(crate::Inclusion::All));
        let a = parse_annotations(Preset::Istio, &ann(INCLUDE_INBOUND_PORTS)).unwrap();
        assert_eq!(a.inbound_port_inclusion, Some(crate::Inclusion::Only(vec![])));
        let a = parse_annotations(Preset::Istio, &ann(INCLUDE_OUTBOUND_IP_RANGES)).unwrap();
        assert_eq!(a.outbound_ip_range_inclusion_override, Some(crate::Inclusion::Only(vec![])));
    }
}
