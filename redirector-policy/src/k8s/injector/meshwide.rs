//! The meshes' own mesh-wide settings, for sidecar workloads whose init
//! container carries none (the redirector gate added by hand or by a
//! `--meshed-when` rule): the init container the mesh's injector would
//! write into the pod today, built from the mesh's settings and the
//! pod's annotations exactly as its template does, then read with the
//! same reader as a real one. A change of the settings reaches such pods
//! at once (the meshes themselves need the pod created again).
//!
//! - Istio: `istio-sidecar-injector`'s `values` (JSON; `global.proxy.*`,
//!   `revision`) and the `istio` ConfigMap's `mesh` (`defaultConfig`:
//!   `interceptionMode`, `proxyMetadata`; `proxyListenPort`,
//!   `proxyInboundListenPort`), with the pod's `proxy.istio.io/config`
//!   over them, into `istio-init`'s args as istio/istio
//!   `manifests/charts/istio-control/istio-discovery/files/injection-template.yaml`
//!   writes them (`annotation` = the pod's annotation, else the value;
//!   `excludeInboundPort` adds the status port, `pkg/kube/inject/template.go`).
//! - Linkerd: `linkerd-config`'s `values` (YAML; `proxy.*`, `proxyInit.*`,
//!   `disableIPv6`), with the pod's `config.linkerd.io/*` overrides
//!   (`pkg/inject/inject.go`), into `linkerd-init`'s args as
//!   `charts/partials/templates/_proxy-init.tpl` writes them.
//!
//! A key missing from the values is the chart's default, as helm renders
//! it into the ConfigMap.
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context as _, Result};

use super::{istio, linkerd, InitContainer, Reading};
use crate::{dialect::Preset, k8s::pods::PodInfo};

/// A mesh's mesh-wide settings as last read, with where they come from.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshWide {
    /// `namespace/name` of each ConfigMap read, for messages.
    pub sources: Vec<String>,
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Istio {
        values: serde_json::Value,
        mesh: serde_json::Value,
    },
    Linkerd {
        values: serde_json::Value,
    },
    /// Settings that have never read good: every pod is refused with why.
    Invalid {
        preset: Preset,
        why: String,
    },
}

/// The ConfigMaps each mesh keeps its settings in: (name, key) in the
/// mesh's namespace (`istio-system`, `linkerd`); Istio's carry the
/// revision's suffix (`istio-sidecar-injector-canary`, `istio-canary`).
pub fn sources(preset: Preset, revision: &str) -> Vec<(String, &'static str)> {
    let rev = if revision.is_empty() { String::new() } else { format!("-{revision}") };
    match preset {
        Preset::Istio => {
            vec![(format!("istio-sidecar-injector{rev}"), "values"), (format!("istio{rev}"), "mesh")]
        }
        Preset::Linkerd => vec![("linkerd-config".to_string(), "values")],
        Preset::Osm | Preset::Kuma => Vec::new(),
    }
}

/// The default namespace of a mesh's ConfigMaps.
pub fn default_namespace(preset: Preset) -> Option<&'static str> {
    match preset {
        Preset::Istio => Some("istio-system"),
        Preset::Linkerd => Some("linkerd"),
        Preset::Osm | Preset::Kuma => None,
    }
}

/// A pod with nothing the templates read: the settings alone.
fn bare_pod() -> PodInfo {
    PodInfo { uid: "-".into(), namespace: "-".into(), name: "-".into(), ..Default::default() }
}

impl MeshWide {
    /// Istio's, from `values` (required) and `mesh` (None: the ConfigMap
    /// or its key is missing; Istio's defaults). Checked by building the
    /// init container of a pod with no annotation: settings that would
    /// fail every pod are refused here, and the last good ones kept.
    pub fn istio(values: (&str, &str), mesh: Option<(&str, &str)>) -> Result<Self> {
        let (vname, vtext) = values;
        let values: serde_json::Value = serde_json::from_str(vtext)
            .with_context(|| format!("ConfigMap {vname}: key `values`: not the injector's values (JSON)"))?;
        if !values.is_object() {
            bail!("ConfigMap {vname}: key `values`: {} is not a JSON object", shown(&values));
        }
        let mut sources = vec![vname.to_string()];
        let mesh = match mesh {
            None => serde_json::Value::Object(Default::default()),
            Some((mname, mtext)) => {
                sources.push(mname.to_string());
                let v: serde_yaml::Value = serde_yaml::from_str(mtext)
                    .with_context(|| format!("ConfigMap {mname}: key `mesh`: not Istio's MeshConfig (YAML)"))?;
                let v = serde_json::to_value(v).with_context(|| format!("ConfigMap {mname}: key `mesh`"))?;
                match v {
                    serde_json::Value::Null => serde_json::Value::Object(Default::default()),
                    v @ serde_json::Value::Object(_) => v,
                    other => bail!("ConfigMap {mname}: key `mesh`: {} is not a mapping", shown(&other)),
                }
            }
        };
        let wide = MeshWide { sources, kind: Kind::Istio { values, mesh } };
        wide.check()?;
        Ok(wide)
    }

    /// Linkerd's, from `linkerd-config`'s `values` (YAML).
    pub fn linkerd(values: (&str, &str)) -> Result<Self> {
        let (name, text) = values;
        let v: serde_yaml::Value = serde_yaml::from_str(text)
            .with_context(|| format!("ConfigMap {name}: key `values`: not Linkerd's values (YAML)"))?;
        let v = serde_json::to_value(v).with_context(|| format!("ConfigMap {name}: key `values`"))?;
        if !v.is_object() {
            bail!("ConfigMap {name}: key `values`: {} is not a mapping", shown(&v));
        }
        let wide = MeshWide { sources: vec![name.to_string()], kind: Kind::Linkerd { values: v } };
        wide.check()?;
        Ok(wide)
    }

    /// Settings found but never valid: no pod is programmed from the
    /// agent's own settings instead (they are not what the mesh says).
    pub fn refusing(preset: Preset, why: String) -> Self {
        MeshWide { sources: Vec::new(), kind: Kind::Invalid { preset, why } }
    }

    pub fn preset(&self) -> Preset {
        match &self.kind {
            Kind::Istio { .. } => Preset::Istio,
            Kind::Linkerd { .. } => Preset::Linkerd,
            Kind::Invalid { preset, .. } => *preset,
        }
    }

    /// Where the settings come from, as one phrase.
    pub fn named(&self) -> String {
        if self.sources.is_empty() {
            return "the mesh's settings".into();
        }
        self.sources.iter().map(|s| format!("ConfigMap {s}")).collect::<Vec<_>>().join(" and ")
    }

    fn check(&self) -> Result<()> {
        // Refusals (TPROXY for every pod) are each pod's answer, not an
        // error of the settings.
        self.read(&bare_pod()).map(drop).map_err(|e| anyhow!("{}: {e:#}", self.named()))
    }

    /// The init container the mesh's injector would write into `pod` now;
    /// Err if the pod was injected by another revision than the one read.
    pub fn init_container(&self, pod: &PodInfo) -> Result<InitContainer> {
        match &self.kind {
            Kind::Istio { values, mesh } => istio_init(values, mesh, pod, &self.sources[0]),
            Kind::Linkerd { values } => Ok(linkerd_init(values, pod)),
            Kind::Invalid { why, .. } => Err(anyhow!("the mesh's settings are invalid: {why}")),
        }
    }

    /// That init container, read as a real one is.
    pub fn read(&self, pod: &PodInfo) -> Result<Reading> {
        let c = self.init_container(pod)?;
        let argv = c.argv();
        match &self.kind {
            Kind::Istio { .. } => {
                let args = istio::tool_args(&argv).expect("built as istio-iptables");
                istio::read(&c, args, &pod.ips)
            }
            Kind::Linkerd { .. } => {
                let args = linkerd::tool_args(&c, &argv).expect("built as linkerd2-proxy-init");
                linkerd::read(args)
            }
            Kind::Invalid { .. } => unreachable!("init_container refuses"),
        }
    }
}

fn shown(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

/// A value as Go's `fmt.Sprint` prints it into a template (a missing
/// key: `default`, the chart's value).
fn text(v: Option<&serde_json::Value>, default: &str) -> String {
    match v {
        None | Some(serde_json::Value::Null) => default.to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::Bool(b)) => b.to_string(),
        Some(other) => other.to_string(),
    }
}

/// istio/istio `pkg/kube/inject/template.go` `excludeInboundPort`.
fn exclude_inbound_port(port: &str, excluded: &str) -> String {
    let port = port.trim();
    if port.is_empty() || port == "0" {
        return excluded.to_string();
    }
    let mut out = Vec::new();
    for p in excluded.split(',') {
        if p == port {
            return excluded.to_string();
        }
        let p = p.trim();
        if !p.is_empty() {
            out.push(p.to_string());
        }
    }
    out.push(port.to_string());
    out.join(",")
}

fn istio_init(
    values: &serde_json::Value,
    mesh: &serde_json::Value,
    pod: &PodInfo,
    values_source: &str,
) -> Result<InitContainer> {
    let revision = text(values.get("revision"), "");
    let injected_by = pod.labels.get("istio.io/rev").map(String::as_str);
    let ours = if revision.is_empty() { "default" } else { revision.as_str() };
    if let Some(rev) = injected_by.filter(|r| *r != ours) {
        bail!(
            "the pod was injected by Istio revision {rev:?} (label istio.io/rev); the settings read are revision \
             {ours:?}'s ({values_source}): run the agent with --istio-revision for that revision"
        );
    }
    let proxy = |key: &str, default: &str| text(values.pointer(&format!("/global/proxy/{key}")), default);
    let ann = |key: &str, default: String| pod.annotations.get(key).cloned().unwrap_or(default);
    // ProxyConfig: the mesh's defaultConfig, the pod's annotation over it.
    let mut interception = text(mesh.pointer("/defaultConfig/interceptionMode"), "REDIRECT");
    let mut metadata: BTreeMap<String, Option<String>> = mesh
        .pointer("/defaultConfig/proxyMetadata")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), Some(text(Some(v), "")))).collect())
        .unwrap_or_default();
    if let Some(cfg) = pod.annotations.get("proxy.istio.io/config") {
        let v: serde_yaml::Value = serde_yaml::from_str(cfg)
            .map_err(|e| anyhow!("annotation proxy.istio.io/config: not a ProxyConfig (YAML): {e}"))?;
        let v = serde_json::to_value(v).map_err(|e| anyhow!("annotation proxy.istio.io/config: {e}"))?;
        if let Some(m) = v.get("interceptionMode") {
            interception = text(Some(m), "REDIRECT");
        }
        if let Some(m) = v.get("proxyMetadata").and_then(|m| m.as_object()) {
            for (k, v) in m {
                metadata.insert(k.clone(), Some(text(Some(v), "")));
            }
        }
    }
    let mode = ann("sidecar.istio.io/interceptionMode", interception);
    let mut args: Vec<String> = vec!["istio-iptables".into()];
    let mut push = |flag: &str, v: String| {
        args.push(flag.into());
        args.push(v);
    };
    push("-p", text(mesh.get("proxyListenPort"), "15001"));
    push("-z", text(mesh.get("proxyInboundListenPort"), "15006"));
    // `.ProxyUID | default "1337"` (GetProxyIDs: 1337 unless an OpenShift
    // namespace range says otherwise, which the agent does not read).
    push("-u", "1337".into());
    push("-m", mode);
    push("-i", ann("traffic.sidecar.istio.io/includeOutboundIPRanges", proxy("includeIPRanges", "*")));
    push("-x", ann("traffic.sidecar.istio.io/excludeOutboundIPRanges", proxy("excludeIPRanges", "")));
    push("-b", ann("traffic.sidecar.istio.io/includeInboundPorts", proxy("includeInboundPorts", "*")));
    let excluded = exclude_inbound_port(
        &ann("status.sidecar.istio.io/port", proxy("statusPort", "15020")),
        &ann("traffic.sidecar.istio.io/excludeInboundPorts", proxy("excludeInboundPorts", "")),
    );
    push("-d", if excluded.is_empty() { "15090,15021".into() } else { format!("15090,15021,{excluded}") });
    for (key, value, flag) in [
        ("traffic.sidecar.istio.io/includeOutboundPorts", "includeOutboundPorts", "-q"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "excludeOutboundPorts", "-o"),
    ] {
        if pod.annotations.contains_key(key) || !proxy(value, "").is_empty() {
            push(flag, ann(key, proxy(value, "")));
        }
    }
    if let Some(k) = pod
        .annotations
        .get("istio.io/reroute-virtual-interfaces")
        .or_else(|| pod.annotations.get("traffic.sidecar.istio.io/kubevirtInterfaces"))
    {
        push("-k", k.clone());
    }
    if let Some(c) = pod.annotations.get("traffic.sidecar.istio.io/excludeInterfaces") {
        push("-c", c.clone());
    }
    Ok(InitContainer {
        name: "istio-init".into(),
        image: String::new(),
        command: Vec::new(),
        args,
        env: metadata,
        downward_files: BTreeMap::new(),
    })
}

fn linkerd_init(values: &serde_json::Value, pod: &PodInfo) -> InitContainer {
    let v = |path: &str, default: &str| text(values.pointer(path), default);
    let ann = |key: &str| pod.annotations.get(&format!("config.linkerd.io/{key}")).cloned();
    // inject.go: a port or ID annotation that does not parse is ignored.
    let number = |key: &str, default: String| ann(key).filter(|a| a.trim().parse::<i64>().is_ok()).unwrap_or(default);
    let mut args: Vec<String> = Vec::new();
    if v("/proxyInit/iptablesMode", "legacy") == "nft" {
        args.extend(
            ["--firewall-bin-path", "iptables-nft", "--firewall-save-bin-path", "iptables-nft-save"].map(String::from),
        );
    }
    if v("/disableIPv6", "true") == "true" {
        args.push("--ipv6=false".into());
    }
    let mut push = |flag: &str, value: String| {
        args.push(flag.into());
        args.push(value);
    };
    push("--incoming-proxy-port", number("inbound-port", v("/proxy/ports/inbound", "4143")));
    push("--outgoing-proxy-port", number("outbound-port", v("/proxy/ports/outbound", "4140")));
    push("--proxy-uid", number("proxy-uid", v("/proxy/uid", "2102")));
    let gid = number("proxy-gid", v("/proxy/gid", "-1"));
    if gid.trim().parse::<i64>().is_ok_and(|g| g >= 0) {
        push("--proxy-gid", gid);
    }
    let ignore_in = ann("skip-inbound-ports").unwrap_or_else(|| v("/proxyInit/ignoreInboundPorts", "4567,4568"));
    let control = number("control-port", v("/proxy/ports/control", "4190"));
    let admin = number("admin-port", v("/proxy/ports/admin", "4191"));
    push(
        "--inbound-ports-to-ignore",
        if ignore_in.is_empty() { format!("{control},{admin}") } else { format!("{control},{admin},{ignore_in}") },
    );
    let ignore_out = ann("skip-outbound-ports").unwrap_or_else(|| v("/proxyInit/ignoreOutboundPorts", "4567,4568"));
    if !ignore_out.is_empty() {
        push("--outbound-ports-to-ignore", ignore_out);
    }
    let skip = ann("skip-subnets").unwrap_or_else(|| v("/proxyInit/skipSubnets", ""));
    if !skip.is_empty() {
        push("--subnets-to-ignore", skip);
    }
    InitContainer {
        name: "linkerd-init".into(),
        image: String::new(),
        command: vec!["/usr/lib/linkerd/linkerd2-proxy-init".into()],
        args,
        env: BTreeMap::new(),
        downward_files: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "k8s")]
    use crate::k8s::injector::{decide, tests as corpus, Decision};

    const VALUES: &str = "istio-system/istio-sidecar-injector";
    const MESH: &str = "istio-system/istio";

    fn pod(annotations: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            uid: "u".into(),
            namespace: "shop".into(),
            name: "web".into(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    fn istio_values(proxy: serde_json::Value) -> String {
        serde_json::json!({"global": {"proxy": proxy}, "revision": ""}).to_string()
    }

    /// Every Istio pod of the upstream corpus whose istio-init was
    /// rendered from the chart's default values and mesh config (9; those
    /// with a custom proxyMetadata or logging are left out): the init
    /// container built here from the same values and the pod's annotations
    /// reads as the one istio-injector wrote.
    #[cfg(feature = "k8s")]
    #[test]
    fn istio_as_its_template_writes_it() {
        let defaults = istio_values(serde_json::json!({
            "includeIPRanges": "*", "excludeIPRanges": "", "includeInboundPorts": "*",
            "excludeInboundPorts": "", "includeOutboundPorts": "", "excludeOutboundPorts": "", "statusPort": 15020
        }));
        let wide = MeshWide::istio((VALUES, &defaults), None).unwrap();
        let mut compared = 0;
        for (file, pod) in corpus::corpus_pods("istio") {
            let Some(real) = pod.init_containers.iter().find(|c| c.name == "istio-init") else { continue };
            // Pods whose golden was rendered with other mesh settings
            // (a custom mesh config, a revision) are not comparable.
            if !real.env.is_empty() || real.args.iter().any(|a| a.starts_with("--log_as_json")) {
                continue;
            }
            let Decision::Injected { reading: want, .. } = decide(&pod, &[]) else { continue };
            let built = match wide.read(&pod) {
                Ok(r) => r,
                Err(e) => panic!("{file}: {e:#}"),
            };
            if built.mesh == want.mesh && built.annotations == want.annotations {
                compared += 1;
            } else {
                panic!(
                    "{file}: built {:?}\nwritten by istio-injector {:?}\n(built args {:?}, real {:?})",
                    built.mesh,
                    want.mesh,
                    wide.init_container(&pod).unwrap().args,
                    real.args
                );
            }
        }
        assert!(compared >= 9, "only {compared} Istio pods compared");
    }

    #[test]
    fn istio_values_and_annotations() {
        let values = istio_values(serde_json::json!({
            "includeIPRanges": "*", "excludeIPRanges": "203.0.113.0/24", "includeInboundPorts": "*",
            "excludeInboundPorts": "9090", "excludeOutboundPorts": "6379", "statusPort": 15020
        }));
        let wide = MeshWide::istio((VALUES, &values), None).unwrap();
        let r = wide.read(&pod(&[])).unwrap();
        assert!(r.mesh.outbound_ip_range_exclusion.contains(&"203.0.113.0/24".parse().unwrap()));
        assert_eq!(r.mesh.outbound_port_exclusion, vec![6379]);
        assert_eq!(r.mesh.inbound_port_exclusion, vec![15090, 15021, 9090, 15020]);
        // The pod's annotation replaces the value, as the template does.
        let r = wide
            .read(&pod(&[
                ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "198.51.100.0/24"),
                ("traffic.sidecar.istio.io/excludeInboundPorts", ""),
                ("status.sidecar.istio.io/port", "0"),
            ]))
            .unwrap();
        assert!(r.mesh.outbound_ip_range_exclusion.contains(&"198.51.100.0/24".parse().unwrap()));
        assert!(!r.mesh.outbound_ip_range_exclusion.contains(&"203.0.113.0/24".parse().unwrap()));
        assert_eq!(r.mesh.inbound_port_exclusion, vec![15090, 15021]);
        // TPROXY from the mesh's defaultConfig, KubeVirt from the pod:
        // refused, named; DNS capture from its proxyMetadata: honoured.
        let wide = MeshWide::istio(
            (VALUES, &values),
            Some((
                MESH,
                "defaultConfig:\n  interceptionMode: TPROXY\n  proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: \"true\"\n",
            )),
        )
        .unwrap();
        let r = wide.read(&pod(&[("traffic.sidecar.istio.io/kubevirtInterfaces", "net1")])).unwrap();
        let settings: Vec<&str> = r.refused.iter().map(|x| x.setting.as_str()).collect();
        assert!(settings.iter().any(|s| s.contains("TPROXY")), "{settings:?}");
        assert_eq!(r.mesh.dns, Some(crate::mesh::DnsSettings::resolv_conf(15053).v4_only()));
        assert!(settings.iter().any(|s| s.contains("net1")), "{settings:?}");
        // proxy.istio.io/config on the pod over the mesh's default.
        let r = wide
            .read(&pod(&[(
                "proxy.istio.io/config",
                "interceptionMode: REDIRECT\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n",
            )]))
            .unwrap();
        assert!(r.refused.is_empty(), "{:?}", r.refused);
        assert_eq!(r.mesh.dns, None, "the pod's proxyMetadata over the mesh's");
        // Another revision's pod is not read with these settings.
        let mut p = pod(&[]);
        p.labels.insert("istio.io/rev".into(), "canary".into());
        let e = format!("{:#}", wide.read(&p).unwrap_err());
        assert!(e.contains("canary") && e.contains("--istio-revision"), "{e}");
        p.labels.insert("istio.io/rev".into(), "default".into());
        assert!(wide.read(&p).is_ok());
    }

    #[test]
    fn bad_settings_are_refused_whole() {
        for (values, want) in [
            ("{", "not the injector's values"),
            ("[1]", "not a JSON object"),
            (r#"{"global": {"proxy": {"excludeOutboundPorts": "99999"}}}"#, "99999"),
            (r#"{"global": {"proxy": {"statusPort": "x"}}}"#, "x"),
        ] {
            let e = format!("{:#}", MeshWide::istio((VALUES, values), None).unwrap_err());
            assert!(e.contains(VALUES) && e.contains(want), "{values}: {e}");
        }
        let e = format!("{:#}", MeshWide::istio((VALUES, "{}"), Some((MESH, "- a\n"))).unwrap_err());
        assert!(e.contains(MESH) && e.contains("not a mapping"), "{e}");
        let e = format!("{:#}", MeshWide::linkerd(("linkerd/linkerd-config", "proxy: {uid: abc}\n")).unwrap_err());
        assert!(e.contains("linkerd-config") && e.contains("abc"), "{e}");
    }

    /// Every Linkerd golden pod of the upstream corpus (12, rendered from
    /// the chart's default values, some with `config.linkerd.io/*`
    /// overrides): built here from the same values and annotations, it
    /// reads as the linkerd-init Linkerd's injector wrote.
    #[cfg(feature = "k8s")]
    #[test]
    fn linkerd_as_its_template_writes_it() {
        let wide = MeshWide::linkerd(("linkerd/linkerd-config", "{}\n")).unwrap();
        let mut compared = 0;
        for (file, pod) in corpus::corpus_pods("linkerd") {
            let Decision::Injected { reading: want, tool: "linkerd2-proxy-init", .. } = decide(&pod, &[]) else {
                continue;
            };
            let built = wide.read(&pod).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            // `*.input.yml` are inputs that an older Linkerd injected with
            // other values; the goldens are the current injector's output
            // from the chart's defaults and the pod's annotations.
            if !file.contains(".golden.") {
                continue;
            }
            assert_eq!(built.mesh, want.mesh, "{file}: built args {:?}", wide.init_container(&pod).unwrap().args);
            compared += 1;
        }
        assert!(compared >= 12, "only {compared} Linkerd pods compared");
    }

    #[test]
    fn linkerd_values_and_annotations() {
        let wide = MeshWide::linkerd((
            "linkerd/linkerd-config",
            "proxy:\n  uid: 2103\n  ports: {inbound: 4243, outbound: 4240}\nproxyInit:\n  ignoreInboundPorts: \"25\"\n  \
             ignoreOutboundPorts: \"\"\n  skipSubnets: \"198.51.100.0/24\"\n",
        ))
        .unwrap();
        let r = wide.read(&pod(&[])).unwrap();
        assert_eq!((r.mesh.proxy_uid, r.mesh.inbound_port, r.mesh.outbound_port), (2103, 4243, 4240));
        assert!(r.mesh.inbound_port_exclusion.contains(&25) && r.mesh.inbound_port_exclusion.contains(&4190));
        assert!(r.mesh.outbound_port_exclusion.is_empty(), "{:?}", r.mesh.outbound_port_exclusion);
        // disableIPv6 (the chart's default): --ipv6=false, IPv6 left alone.
        assert_eq!(r.mesh.inbound_source_exclusion, vec!["198.51.100.0/24".parse().unwrap(), "::/0".parse().unwrap()]);
        let r = wide
            .read(&pod(&[
                ("config.linkerd.io/skip-outbound-ports", "3306"),
                ("config.linkerd.io/proxy-uid", "2200"),
                ("config.linkerd.io/inbound-port", "not-a-port"),
            ]))
            .unwrap();
        assert_eq!(r.mesh.outbound_port_exclusion, vec![3306]);
        assert_eq!(
            (r.mesh.proxy_uid, r.mesh.inbound_port),
            (2200, 4243),
            "an unparsable port is ignored, as inject.go does"
        );
    }
}
