//! The config file: a `mesh` mapping (see [`crate::mesh`]) and the
//! workloads, each with its network namespace and its annotations in the
//! preset's vocabulary. Nothing here touches the kernel; every error names
//! the input, the value and the reason.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    dialect::{annotation_key_warnings, parse_annotations_each, Preset, WorkloadAnnotations},
    idmap::IdMaps,
    located::{self, index_path, key_path, key_text, Problem, Problems, Reader},
    mesh::{integer, mesh_from_value, string, untagged, MeshSettings},
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
    /// The ID maps of the workload's user namespace, when its source knows
    /// them (Kubernetes: read from the process its namespace was taken
    /// from). None: the agent reads those of a `pid:` workload's process,
    /// and requires a `netns:` workload's namespace to belong to its own
    /// user namespace.
    pub id_maps: Option<IdMaps>,
    /// The workload's nameservers, when its source knows them (Kubernetes:
    /// read from the resolv.conf of the process its namespace was taken
    /// from). None: the agent reads the resolv.conf the workload sees,
    /// when DNS capture needs it.
    pub nameservers: Option<Vec<std::net::IpAddr>>,
    pub annotations: WorkloadAnnotations,
    /// This workload's own mesh settings, in place of the config's
    /// (Kubernetes: what its mesh's init container asks for, see
    /// [`crate::k8s::injector`]). None: the config's.
    pub mesh: Option<MeshSettings>,
}

impl WorkloadSpec {
    /// Its policy: its own mesh settings, or `mesh`, with its annotations.
    pub fn policy(&self, mesh: &MeshSettings) -> crate::Policy {
        crate::compile(self.mesh.as_ref().unwrap_or(mesh), &self.annotations)
    }
}

/// How many different mesh settings one set of annotations is compiled
/// with before [`policies`] stops keeping the results (a scan past that
/// would cost more than compiling).
const KEPT_MESHES_PER_ANNOTATIONS: usize = 8;

/// Each workload's [`WorkloadSpec::policy`], in order, compiling each
/// distinct pair of mesh settings and annotations once: on a node most
/// workloads have the same (an agent pass of 10,000 workloads otherwise
/// compiles the same policy 10,000 times).
pub fn policies(mesh: &MeshSettings, workloads: &[WorkloadSpec]) -> Vec<crate::Policy> {
    let mut kept: HashMap<&WorkloadAnnotations, Vec<(&MeshSettings, crate::Policy)>> = HashMap::new();
    workloads
        .iter()
        .map(|w| {
            let m = w.mesh.as_ref().unwrap_or(mesh);
            let same = kept.entry(&w.annotations).or_default();
            if let Some((_, p)) = same.iter().find(|(k, _)| std::ptr::eq(*k, m) || *k == m) {
                return p.clone();
            }
            let p = crate::compile(m, &w.annotations);
            if same.len() < KEPT_MESHES_PER_ANNOTATIONS {
                same.push((m, p.clone()));
            }
            p
        })
        .collect()
}

/// A parsed config file. Workloads whose own entry is bad are listed in
/// `rejected` (with the error) and do not stop the others.
#[derive(Debug)]
pub struct Config {
    pub mesh: MeshSettings,
    pub workloads: Vec<WorkloadSpec>,
    /// Each rejected workload's name and why: its error is built on
    /// [`Problems`] (every problem of that entry, at its line).
    pub rejected: Vec<(String, anyhow::Error)>,
    /// Things that change nothing but are likely mistakes (a misspelt
    /// annotation key), by workload name, at their line.
    pub warnings: Vec<(String, Problem)>,
}

/// The keys of the document, and of each workload.
const TOP_KEYS: [&str; 2] = ["mesh", "workloads"];
const WORKLOAD_KEYS: [&str; 5] = ["name", "netns", "pid", "proxyCgroup", "annotations"];

/// Reads and parses a config file.
pub fn load_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    parse_config(&text).with_context(|| format!("config file {}", path.display()))
}

/// Parses a config document. Errors in the document itself (YAML syntax,
/// `mesh`, no `workloads` key) fail the whole document, with every problem
/// found (a [`Problems`] error); errors in one workload only reject that
/// workload. Each problem names the key path, the value and the line.
///
/// An empty document, or one without `workloads`, is refused: applied, it
/// would remove every workload (and the redirection with it) after a
/// truncated write or a mistake. `workloads: []` says that on purpose.
pub fn parse_config(text: &str) -> Result<Config> {
    let mut r = Reader::new(Some(text));
    let doc = match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(v) => untagged(v),
        Err(e) => {
            r.yaml_error(&e);
            return Err(r.into_error().expect("one problem").into());
        }
    };
    let doc = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => {
            r.whole(
                "the config is empty: it has no `workloads` key; refusing to remove every workload \
                 (write `workloads: []` to unprogram them all on purpose)",
            );
            return Err(r.into_error().expect("one problem").into());
        }
        other => {
            r.at_value(
                "",
                format!(
                    "the config is {} ({}), expected a mapping with the keys `mesh` and `workloads`",
                    located::kind(&other),
                    located::shown(&other)
                ),
            );
            return Err(r.into_error().expect("one problem").into());
        }
    };
    r.unknown_keys("", &doc, &TOP_KEYS);
    let mesh = mesh_from_value(doc.get("mesh").cloned().unwrap_or(serde_yaml::Value::Null), &mut r, "mesh");
    let items = match doc.get("workloads") {
        None => {
            r.whole(
                "key `workloads` is missing: list the workloads to redirect; refusing to remove every workload \
                 (write `workloads: []` to unprogram them all on purpose)",
            );
            Vec::new()
        }
        Some(serde_yaml::Value::Null) => {
            r.at_value(
                "workloads",
                "key `workloads` has no value; refusing to remove every workload (write `workloads: []` to \
                 unprogram them all on purpose)",
            );
            Vec::new()
        }
        Some(serde_yaml::Value::Sequence(s)) => s.clone(),
        Some(other) => {
            r.at_value(
                "workloads",
                format!("value {} is {}, expected a list of workloads", located::shown(other), located::kind(other)),
            );
            Vec::new()
        }
    };
    let document_ok = r.problems.is_empty() && mesh.is_some();
    // The preset decides the annotation vocabulary; with a bad `mesh`, the
    // workloads are still read (under the preset it names, if it names
    // one) so that every problem is reported at once.
    let preset = mesh.as_ref().map_or_else(
        || {
            doc.get("mesh")
                .and_then(|m| m.get("preset"))
                .and_then(|p| p.as_str())
                .and_then(|p| Preset::parse(p).ok())
                .unwrap_or_default()
        },
        |m| m.preset,
    );
    let mut workloads: Vec<WorkloadSpec> = Vec::new();
    let mut rejected = Vec::new();
    let mut warnings = Vec::new();
    // Names and namespaces taken so far (a config lists thousands).
    let mut names: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut namespaces: HashMap<NetnsRef, usize> = HashMap::new();
    for (index, value) in items.into_iter().enumerate() {
        let base = index_path("workloads", index);
        let fallback_name = value
            .get("name")
            .and_then(|n| n.as_str())
            .filter(|n| !n.trim().is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| base.clone());
        let before = r.problems.len();
        let parsed = parse_workload(preset, &value, &mut r, &base, &mut warnings, &fallback_name);
        let mut found = r.problems.split_off(before);
        found.sort_by_key(|p| (p.line, p.column));
        let problems = (!found.is_empty()).then_some(Problems { list: found });
        match (parsed, problems) {
            (Some(spec), None) => {
                if names.contains(&spec.name) {
                    let e =
                        located_one(&mut r, &key_path(&base, "name"), format!("name {:?} is listed twice", spec.name));
                    rejected.push((spec.name.clone(), e.context(format!("workload `{}`", spec.name))));
                } else if let Some(o) = namespaces.get(&spec.netns).map(|&i| &workloads[i]) {
                    let key = match spec.netns {
                        NetnsRef::Path(_) => "netns",
                        NetnsRef::Pid(_) => "pid",
                    };
                    let e = located_one(
                        &mut r,
                        &key_path(&base, key),
                        format!("{} is already used by workload `{}`", spec.netns, o.name),
                    );
                    rejected.push((spec.name.clone(), e.context(format!("workload `{}`", spec.name))));
                } else {
                    names.insert(spec.name.clone());
                    namespaces.insert(spec.netns.clone(), workloads.len());
                    workloads.push(spec);
                }
            }
            (_, problems) => {
                let problems = problems.unwrap_or_else(|| Problems {
                    list: vec![Problem { path: base.clone(), line: None, column: None, message: "invalid".into() }],
                });
                if !document_ok {
                    r.problems.extend(problems.list.iter().cloned());
                }
                rejected.push((
                    fallback_name.clone(),
                    anyhow::Error::new(problems).context(format!("workload `{fallback_name}`")),
                ));
            }
        }
    }
    if !document_ok {
        return Err(r.into_error().expect("problems").into());
    }
    Ok(Config { mesh: mesh.expect("document_ok"), workloads, rejected, warnings })
}

/// One problem at `path`, as an error built on [`Problems`].
fn located_one(r: &mut Reader<'_>, path: &str, message: String) -> anyhow::Error {
    let n = r.problems.len();
    r.at_value(path, message);
    let p = r.problems.split_off(n);
    anyhow::Error::new(Problems { list: p })
}

/// One workload entry at `base`; its problems go to `r`, its warnings
/// to `warnings`. None if it has any problem.
fn parse_workload(
    preset: Preset,
    value: &serde_yaml::Value,
    r: &mut Reader<'_>,
    base: &str,
    warnings: &mut Vec<(String, Problem)>,
    name_for_warnings: &str,
) -> Option<WorkloadSpec> {
    use serde_yaml::Value;
    let before = r.problems.len();
    let Value::Mapping(m) = value else {
        r.at_value(
            base,
            format!(
                "value {} is {}, expected a mapping with `name` and `netns` or `pid`",
                located::shown(value),
                located::kind(value)
            ),
        );
        return None;
    };
    r.unknown_keys(base, m, &WORKLOAD_KEYS);
    let path = |key: &str| key_path(base, key);
    let get = |key: &str| m.get(key).filter(|v| !v.is_null());
    let name = match get("name") {
        None => {
            r.at_value(base, "key `name` is missing");
            None
        }
        Some(v) => match string(v) {
            Ok(s) if s.trim().is_empty() => {
                r.at_value(&path("name"), format!("value {s:?} is empty"));
                None
            }
            Ok(s) => Some(s.to_string()),
            Err(e) => {
                r.at_value(&path("name"), e);
                None
            }
        },
    };
    let absolute = |r: &mut Reader<'_>, key: &str| -> Option<Option<PathBuf>> {
        let Some(v) = get(key) else { return Some(None) };
        match string(v) {
            Ok(s) if Path::new(s).is_absolute() => Some(Some(PathBuf::from(s))),
            Ok(s) => {
                r.at_value(&path(key), format!("value {s:?} is not an absolute path"));
                None
            }
            Err(e) => {
                r.at_value(&path(key), e);
                None
            }
        }
    };
    let netns = absolute(r, "netns");
    let pid = match get("pid") {
        None => Some(None),
        Some(v) => match integer(v) {
            Ok(p) => match u32::try_from(p).ok().filter(|p| *p > 0) {
                Some(p) => Some(Some(p)),
                None => {
                    r.at_value(&path("pid"), format!("value {p} is not a process id"));
                    None
                }
            },
            Err(e) => {
                r.at_value(&path("pid"), format!("{e} (a process id)"));
                None
            }
        },
    };
    let netns = match (netns, pid) {
        (Some(Some(p)), Some(None)) => Some(NetnsRef::Path(p)),
        (Some(None), Some(Some(pid))) => Some(NetnsRef::Pid(pid)),
        (Some(Some(_)), Some(Some(_))) => {
            r.at_value(base, "keys `netns` and `pid`: give one of them, not both");
            None
        }
        (Some(None), Some(None)) => {
            r.at_value(base, "key `netns` is missing (give `netns: PATH` or `pid: N`)");
            None
        }
        _ => None,
    };
    let proxy_cgroup = absolute(r, "proxyCgroup");
    let ann_base = path("annotations");
    let mut given = BTreeMap::new();
    let mut annotations_ok = true;
    match get("annotations") {
        None => {}
        Some(Value::Mapping(a)) => {
            for (k, v) in a {
                let key = key_text(k);
                let at = key_path(&ann_base, &key);
                if !k.is_string() {
                    annotations_ok = false;
                    r.at_key(&at, format!("key {key} is {}; annotation keys are strings", located::kind(k)));
                    continue;
                }
                match v {
                    Value::String(s) => {
                        given.insert(key, s.clone());
                    }
                    Value::Null => {
                        annotations_ok = false;
                        r.at_value(&at, "has no value; annotation values are strings (write \"\" for an empty list)");
                    }
                    Value::Number(_) | Value::Bool(_) => {
                        annotations_ok = false;
                        let shown = located::shown(v);
                        r.at_value(
                            &at,
                            format!(
                                "value {shown} is {}; annotation values are strings: quote it (\"{shown}\")",
                                located::kind(v)
                            ),
                        );
                    }
                    other => {
                        annotations_ok = false;
                        r.at_value(
                            &at,
                            format!("value {} is {}, expected a string", located::shown(other), located::kind(other)),
                        );
                    }
                }
            }
        }
        Some(other) => {
            annotations_ok = false;
            r.at_value(
                &ann_base,
                format!(
                    "value {} is {}, expected a mapping of annotations",
                    located::shown(other),
                    located::kind(other)
                ),
            );
        }
    }
    let (annotations, errors) = parse_annotations_each(preset, &given);
    for (key, e) in errors {
        r.at_value(&key_path(&ann_base, &key), format!("{e:#}"));
    }
    for warning in annotation_key_warnings(preset, given.keys().map(String::as_str)) {
        r.at_key(&key_path(&ann_base, &warning.key), warning.message);
        let p = r.problems.pop().expect("just pushed");
        warnings.push((name.clone().unwrap_or_else(|| name_for_warnings.to_string()), p));
    }
    if !annotations_ok || r.problems.len() > before {
        return None;
    }
    Some(WorkloadSpec {
        name: name?,
        netns: netns?,
        proxy_cgroup: proxy_cgroup?,
        id_maps: None,
        nameservers: None,
        annotations,
        mesh: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{values::*, *};

    /// `policies` gives each workload what its own `policy` gives, with
    /// shared and distinct annotations, its own mesh settings equal to the
    /// config's or not, and more meshes per annotations than it keeps.
    #[test]
    fn policies_are_each_workloads_own() {
        let cfg = parse_config(EXAMPLE).unwrap();
        let base = cfg.workloads[0].clone();
        let mut list = Vec::new();
        for i in 0..40u16 {
            let mut w = base.clone();
            w.name = format!("w{i}");
            if i % 3 == 0 {
                w.annotations = WorkloadAnnotations::default();
            }
            if i % 5 == 0 {
                w.annotations.outbound_port_exclusion.push(1000 + i);
            }
            if i % 2 == 0 {
                let mut m = cfg.mesh.clone();
                if i % 4 == 0 {
                    m.outbound_port_exclusion.push(2000 + i);
                }
                w.mesh = Some(m);
            }
            list.push(w);
        }
        let got = policies(&cfg.mesh, &list);
        let want: Vec<_> = list.iter().map(|w| w.policy(&cfg.mesh)).collect();
        assert_eq!(got, want);
        assert!(policies(&cfg.mesh, &[]).is_empty());
    }

    /// A document with `workloads: []` added if it has none.
    pub(crate) fn with_workloads(doc: &str) -> String {
        if doc.contains("workloads") {
            doc.to_string()
        } else {
            format!("{doc}\nworkloads: []\n")
        }
    }

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
    fn no_mesh_means_defaults() {
        let c = parse_config("workloads: []\n").unwrap();
        assert_eq!(c.mesh, MeshSettings::default());
        assert!(c.workloads.is_empty());
    }

    fn err_text(e: &anyhow::Error) -> String {
        format!("{e:#}")
    }

    #[test]
    fn mesh_errors_name_key_value_and_reason() {
        let e = parse_config(&with_workloads("mesh:\n  outboundPort: 70000\n")).unwrap_err();
        let t = err_text(&e);
        assert!(t.contains("outboundPort") && t.contains("70000") && t.contains("1-65535"), "{t}");

        let e = parse_config(&with_workloads("mesh:\n  outboundPortExclusionList: [0]\n")).unwrap_err();
        let t = err_text(&e);
        assert!(t.contains("outboundPortExclusionList") && t.contains("value 0"), "{t}");

        let e =
            parse_config(&with_workloads("mesh:\n  outboundIPRangeExclusionList: [\"300.1.1.1/8\"]\n")).unwrap_err();
        let t = err_text(&e);
        assert!(t.contains("outboundIPRangeExclusionList") && t.contains("300.1.1.1/8"), "{t}");

        let e = parse_config(&with_workloads("mesh:\n  proxyUid: 1\n")).unwrap_err();
        assert!(err_text(&e).contains("proxyUid"), "{}", err_text(&e));

        let e = parse_config(&with_workloads("mesh:\n  outboundPort: 15003\n")).unwrap_err();
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
        let c = parse_config(&with_workloads(doc)).unwrap();
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
            let file = parse_config(&with_workloads(&format!("mesh:\n  {key}:\n"))).unwrap().mesh;
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
            let file = parse_config(&with_workloads(&format!("mesh:\n  {text}\n")))
                .map(|c| c.mesh)
                .map_err(|e| format!("{e:#}"));
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

#[cfg(test)]
mod refusals_and_lines {
    use crate::{parse_config, parse_mesh_document, problems_of, Problem};

    fn problems(doc: &str) -> Vec<Problem> {
        problems_of(&parse_config(doc).unwrap_err())
    }

    fn one(doc: &str) -> Problem {
        let p = problems(doc);
        assert_eq!(p.len(), 1, "{doc:?}: {p:?}");
        p[0].clone()
    }

    /// An empty document, a truncated one (only comments), one without
    /// `workloads` or with `workloads:` and no value would remove every
    /// workload: refused. `workloads: []` says so on purpose.
    #[test]
    fn empty_document_or_no_workloads_key_is_refused() {
        for doc in [
            "",
            "\n",
            "# truncated\n",
            "---\n",
            "~\n",
            "mesh:\n  preset: osm\n",
            "mesh:\nworkloads:\n",
            "workloads: ~\n",
        ] {
            let e = format!("{:#}", parse_config(doc).unwrap_err());
            assert!(e.contains("workloads") && e.contains("workloads: []") && e.contains("refusing"), "{doc:?}: {e}");
        }
        let c = parse_config("workloads: []\n").unwrap();
        assert!(c.workloads.is_empty() && c.rejected.is_empty());
        let e = one("workloads: 5\n");
        assert_eq!((e.path.as_str(), e.line), ("workloads", Some(1)));
        assert!(e.message.contains("value 5 is a number, expected a list of workloads"), "{e}");
    }

    fn rejected(doc: &str) -> Vec<String> {
        let c = parse_config(doc).unwrap();
        c.rejected.iter().map(|(_, e)| format!("{e:#}")).collect()
    }

    /// Type errors name the key path, the value and the line: in `mesh`
    /// (`proxyUID: abc` was `invalid type: string "abc", expected i64`),
    /// in a workload, and an unquoted annotation value.
    #[test]
    fn type_errors_name_key_path_value_and_line() {
        let e = one("mesh:\n  preset: osm\n  proxyUID: abc\nworkloads: []\n");
        assert_eq!(e.to_string(), "mesh.proxyUID at line 3 column 13: value \"abc\" is a string, expected an integer");
        assert_eq!((e.path.as_str(), e.line, e.column), ("mesh.proxyUID", Some(3), Some(13)));
        assert_eq!(
            rejected("workloads:\n  - name: a\n    pid: \"42\"\n"),
            ["workload `a`: workloads[0].pid at line 3 column 10: value \"42\" is a string, expected an integer (a process id)"]
        );
        assert_eq!(
            rejected("workloads:\n  - name: a\n    netns: /run/netns/a\n    annotations:\n      openservicemesh.io/outbound-port-exclusion-list: 7070\n"),
            ["workload `a`: workloads[0].annotations.openservicemesh.io/outbound-port-exclusion-list at line 5 column 56: \
              value 7070 is a number; annotation values are strings: quote it (\"7070\")"]
        );
        let t = rejected("workloads:\n  - name: a\n    netns: 5\n    proxyCgroup: [x]\n    annotations:\n      x:\n");
        assert_eq!(t.len(), 1);
        for part in [
            "workloads[0].netns at line 3 column 12: value 5 is a number, expected a string",
            "workloads[0].proxyCgroup at line 4 column 18: value (a list) is a list, expected a string",
            "workloads[0].annotations.x at line 6 column 9: has no value",
        ] {
            assert!(t[0].contains(part), "{part}: {}", t[0]);
        }
        let e = one("mesh:\n  proxyUID: 1.5\nworkloads: []\n");
        assert!(e.to_string().contains("value 1.5 is a fractional number, expected an integer"), "{e}");
    }

    /// serde_yaml names the line of the mapping for a duplicate key; the
    /// error is at the key given again, with the first one's line.
    #[test]
    fn duplicate_keys_at_the_line_of_the_repeat() {
        let e = one("mesh:\n  proxyUID: 1\n\n\n  proxyUID: 2\nworkloads: []\n");
        assert_eq!(e.to_string(), "mesh.proxyUID at line 5 column 3: key `proxyUID` is given twice (first at line 2)");
        let e = one("workloads:\n  - name: a\n    netns: /x\n    name: b\n");
        assert_eq!(e.to_string(), "workloads[0].name at line 4 column 5: key `name` is given twice (first at line 2)");
        let e = one("workloads:\n  - name: a\n    netns: /x\n    annotations:\n      k: \"1\"\n      'k': \"2\"\n");
        assert_eq!((e.path.as_str(), e.line), ("workloads[0].annotations.k", Some(6)));
        let e = one("a: [1,\n");
        assert_eq!((e.path.as_str(), e.line), ("", Some(2)));
        assert!(e.message.starts_with("invalid YAML: "), "{e}");
    }

    /// Every problem of the document is reported, in the order of the
    /// text, not only the first one of `mesh`.
    #[test]
    fn every_problem_is_reported_in_the_order_of_the_text() {
        let doc = "mesh:\n  proxyUID: -1\n  outboundPort: 0\n  outboundIPRangeExclusionList: [\"300.1.1.1/8\", 5]\n  loopbak: osm\nworkloads:\n  - name: a\n";
        let got: Vec<(String, Option<usize>)> = problems(doc).into_iter().map(|p| (p.path, p.line)).collect();
        let want = [
            ("mesh.proxyUID", 2),
            ("mesh.outboundPort", 3),
            ("mesh.outboundIPRangeExclusionList[0]", 4),
            ("mesh.outboundIPRangeExclusionList[1]", 4),
            ("mesh.loopbak", 5),
            ("workloads[0]", 7),
        ];
        assert_eq!(got, want.map(|(p, l)| (p.to_string(), Some(l))));
        let t = format!("{:#}", parse_config(doc).unwrap_err());
        assert!(t.contains("unknown key `loopbak` (did you mean `loopback`?)"), "{t}");
        // mesh.yaml (Kubernetes mode) too, with lines of its own text.
        let t = problems_of(&parse_mesh_document(Some("proxyUID: x\ninboundPort: 0\n"), &[]).unwrap_err());
        assert_eq!(
            t.iter().map(|p| (p.path.as_str(), p.line)).collect::<Vec<_>>(),
            [("proxyUID", Some(1)), ("inboundPort", Some(2))]
        );
        // A MeshConfig's list is not in the text: no line.
        let bad = serde_yaml::Value::Sequence(vec![0.into()]);
        let t = problems_of(
            &parse_mesh_document(
                Some("outboundPortExclusionList: [1]\n"),
                &[("outboundPortExclusionList".into(), bad)],
            )
            .unwrap_err(),
        );
        assert_eq!((t[0].path.as_str(), t[0].line), ("outboundPortExclusionList[0]", None));
    }

    /// A misspelt annotation key, one in the wrong case, or another mesh's
    /// key is a warning naming it and the closest valid key; the others
    /// (pods carry many) are not.
    #[test]
    fn misspelt_annotation_keys_are_warned_about_with_the_closest_valid_one() {
        let doc = "workloads:\n  - name: a\n    netns: /run/netns/a\n    annotations:\n      \
                   openservicemesh.io/outbound-port-exclusion-lists: \"7070\"\n      \
                   OpenServiceMesh.io/inbound-port-exclusion-list: \"1\"\n      \
                   traffic.sidecar.istio.io/excludeOutboundPorts: \"1\"\n      \
                   openservicemesh.io/sidecar-injection: enabled\n      \
                   openservicemesh.io/outbound-port-exclusion-list: \"80\"\n";
        let c = parse_config(doc).unwrap();
        assert_eq!(c.workloads.len(), 1, "{:?}", c.rejected);
        let w: Vec<(String, usize, String)> =
            c.warnings.iter().map(|(n, p)| (n.clone(), p.line.unwrap(), p.message.clone())).collect();
        assert_eq!(w.len(), 3, "{w:?}");
        let find = |line: usize| w.iter().find(|x| x.1 == line).unwrap_or_else(|| panic!("line {line}: {w:?}"));
        assert!(
            find(5).2.contains("`openservicemesh.io/outbound-port-exclusion-lists`")
                && find(5).2.contains("did you mean")
                && find(5).2.contains("`openservicemesh.io/outbound-port-exclusion-list`")
        );
        assert!(find(6).2.contains("differs only in case from `openservicemesh.io/inbound-port-exclusion-list`"));
        assert!(
            find(7).2.contains("istio's annotation")
                && find(7).2.contains("`openservicemesh.io/outbound-port-exclusion-list`")
        );
        assert!(w.iter().all(|x| x.0 == "a"));
        // The annotations that are right still apply.
        assert_eq!(c.workloads[0].annotations.outbound_port_exclusion, vec![80]);
    }
}
