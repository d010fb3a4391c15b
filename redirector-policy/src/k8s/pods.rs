//! Parsing: the parts of a Kubernetes Pod the agent needs, and which pods
//! are meshed (carry the sidecar).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

use anyhow::{anyhow, bail, Result};
#[cfg(feature = "k8s")]
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::injector::InitContainer;

/// What the agent keeps of one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// `spec.containers`, then the native sidecars: `spec.initContainers`
    /// with `restartPolicy: Always`, which run beside the containers for
    /// the pod's life (how Istio, Linkerd and Kuma inject their proxy by
    /// default now).
    pub containers: Vec<String>,
    pub host_network: bool,
    /// `spec.runtimeClassName`, for messages (a sandboxed runtime's pods
    /// are never found in the node's /proc).
    pub runtime_class: Option<String>,
    /// `status.phase` (Pending, Running, Succeeded, Failed, Unknown).
    pub phase: String,
    /// Containers of [`PodInfo::containers`] in the running state → their
    /// container ID as the runtime names it
    /// (`status.containerStatuses[].containerID`, and
    /// `initContainerStatuses[]` for the native sidecars, without the
    /// `containerd://` scheme).
    pub running: BTreeMap<String, String>,
    /// The runtime's ID of every container the pod's status lists
    /// (`containerStatuses`, `initContainerStatuses`,
    /// `ephemeralContainerStatuses`), in any state: the pod's network
    /// namespace is only ever taken from a process in one of their
    /// cgroups.
    pub container_ids: BTreeSet<String>,
    /// The regular init containers (not the native sidecars), in order:
    /// where a mesh's injector writes its iptables command line.
    pub init_containers: Vec<InitContainer>,
    /// `status.podIPs`, in order (istio-iptables programs IPv6 only for an
    /// IPv6 pod or dual-stack).
    pub ips: Vec<std::net::IpAddr>,
}

impl PodInfo {
    /// None for an object without a UID, name or namespace (never sent by a
    /// real API server).
    #[cfg(feature = "k8s")]
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let m = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let all_statuses = status.into_iter().flat_map(|s| {
            [&s.container_statuses, &s.init_container_statuses, &s.ephemeral_container_statuses]
                .into_iter()
                .flatten()
                .flatten()
        });
        let native_sidecars: Vec<String> = spec
            .and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"))
            .map(|c| c.name.clone())
            .collect();
        Some(Self {
            uid: m.uid.clone()?,
            namespace: m.namespace.clone()?,
            name: m.name.clone()?,
            annotations: m.annotations.clone().unwrap_or_default(),
            labels: m.labels.clone().unwrap_or_default(),
            containers: spec
                .into_iter()
                .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
                .chain(native_sidecars.iter().cloned())
                .collect(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            runtime_class: spec.and_then(|s| s.runtime_class_name.clone()),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into()),
            running: running_of(status.and_then(|s| s.container_statuses.as_ref()), None)
                .chain(running_of(status.and_then(|s| s.init_container_statuses.as_ref()), Some(&native_sidecars)))
                .collect(),
            container_ids: all_statuses
                .filter_map(|c| Some(runtime_container_id(c.container_id.as_deref()?)?.to_string()))
                .collect(),
            init_containers: spec.map(init_containers_of).unwrap_or_default(),
            ips: status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|ip| ip.ip.parse().ok())
                .collect(),
        })
    }

    /// `namespace/name`, the name used in logs, errors and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether its containers may still run (and so need redirection).
    pub fn is_live(&self) -> bool {
        !matches!(self.phase.as_str(), "Succeeded" | "Failed")
    }
}

/// The regular init containers of a pod spec, with the downwardAPI files
/// each one mounts.
#[cfg(feature = "k8s")]
fn init_containers_of(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<InitContainer> {
    // Volume name → (file path in the volume, field it holds).
    let downward: BTreeMap<&str, Vec<(&str, &str)>> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            let items = v.downward_api.as_ref()?.items.as_ref()?;
            Some((
                v.name.as_str(),
                items
                    .iter()
                    .filter_map(|i| Some((i.path.as_str(), i.field_ref.as_ref()?.field_path.as_str())))
                    .collect(),
            ))
        })
        .collect();
    spec.init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() != Some("Always"))
        .map(|c| InitContainer {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            env: c
                .env
                .iter()
                .flatten()
                .map(|e| {
                    (
                        e.name.clone(),
                        if e.value_from.is_some() { None } else { Some(e.value.clone().unwrap_or_default()) },
                    )
                })
                .collect(),
            downward_files: c
                .volume_mounts
                .iter()
                .flatten()
                .flat_map(|m| {
                    downward.get(m.name.as_str()).into_iter().flatten().map(move |(path, field)| {
                        (format!("{}/{}", m.mount_path.trim_end_matches('/'), path), field.to_string())
                    })
                })
                .collect(),
        })
        .collect()
}

/// The running containers among `statuses` (only those named in `only`,
/// if given) → their runtime IDs.
#[cfg(feature = "k8s")]
fn running_of<'a>(
    statuses: Option<&'a Vec<ContainerStatus>>,
    only: Option<&'a [String]>,
) -> impl Iterator<Item = (String, String)> + 'a {
    statuses
        .into_iter()
        .flatten()
        .filter(move |c| only.is_none_or(|names| names.contains(&c.name)))
        .filter(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()))
        .filter_map(|c| Some((c.name.clone(), runtime_container_id(c.container_id.as_deref()?)?.to_string())))
}

/// The pods of a manifest file as `kubectl get pods -o yaml` (a `List`)
/// or `kubectl apply -f` takes it (YAML or JSON, one or many documents):
/// Pods, and the pod templates of Deployments, DaemonSets, StatefulSets,
/// ReplicaSets, Jobs and CronJobs. Each comes with where it was found
/// (`#DOC kind namespace/name`); an object that is not a pod or a
/// workload is skipped, a document that does not parse is an error naming
/// it. A template without a UID, name or namespace gets placeholders
/// (`default`, the workload's name).
#[cfg(feature = "k8s")]
pub fn pods_from_manifests(text: &str) -> Result<Vec<(String, PodInfo)>> {
    pod_objects_from_manifests(text)?
        .into_iter()
        .map(|(where_, obj)| {
            let pod: Pod = serde_json::from_value(obj).map_err(|e| anyhow!("{where_}: {e}"))?;
            let info = PodInfo::from_pod(&pod).ok_or_else(|| anyhow!("{where_}: no name"))?;
            Ok((where_, info))
        })
        .collect()
}

/// The pods of [`pods_from_manifests`] as Pod objects (JSON, `apiVersion`
/// and `kind` set), as the API server would send them to an admission
/// webhook.
#[cfg(feature = "k8s")]
pub fn pod_objects_from_manifests(text: &str) -> Result<Vec<(String, serde_json::Value)>> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_yaml::Value::deserialize(doc).map_err(|e| anyhow!("document {}: {e}", i + 1))?;
        let v: serde_json::Value = serde_json::to_value(v).map_err(|e| anyhow!("document {}: {e}", i + 1))?;
        let items = match v["kind"].as_str() {
            Some("List" | "PodList" | "DeploymentList" | "DaemonSetList" | "StatefulSetList") => {
                v["items"].as_array().cloned().unwrap_or_default()
            }
            _ => vec![v],
        };
        for item in items {
            let kind = item["kind"].as_str().unwrap_or_default().to_string();
            let (mut meta, spec) = match kind.as_str() {
                "Pod" => (item["metadata"].clone(), item["spec"].clone()),
                "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => {
                    (item["spec"]["template"]["metadata"].clone(), item["spec"]["template"]["spec"].clone())
                }
                "CronJob" => (
                    item["spec"]["jobTemplate"]["spec"]["template"]["metadata"].clone(),
                    item["spec"]["jobTemplate"]["spec"]["template"]["spec"].clone(),
                ),
                _ => continue,
            };
            if !meta.is_object() {
                meta = serde_json::json!({});
            }
            for key in ["name", "namespace"] {
                if meta[key].is_null() {
                    meta[key] = item["metadata"][key].clone();
                }
            }
            if meta["namespace"].is_null() {
                meta["namespace"] = "default".into();
            }
            if meta["uid"].is_null() {
                meta["uid"] = format!("manifest-{i}").into();
            }
            let name = meta["name"].as_str().unwrap_or("(no name)").to_string();
            let ns = meta["namespace"].as_str().unwrap_or_default().to_string();
            if meta["name"].is_null() {
                meta["name"] = name.clone().into();
            }
            let mut obj = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec});
            if kind == "Pod" && !item["status"].is_null() {
                obj["status"] = item["status"].clone();
            }
            out.push((format!("#{} {kind} {ns}/{name}", i + 1), obj));
        }
    }
    Ok(out)
}

/// The ID in a `containerID` of a container status (`containerd://ID`,
/// `cri-o://ID`, `docker://ID`): None if it is not `SCHEME://ID` with a
/// non-empty ID of letters and digits.
pub fn runtime_container_id(status_id: &str) -> Option<&str> {
    let (_, id) = status_id.split_once("://")?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(id)
}

/// One rule that marks a pod as meshed. A pod is meshed when any rule of
/// the agent's list matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshedWhen {
    /// `label:KEY` or `label:KEY=VALUE`.
    Label { key: String, value: Option<String> },
    /// `annotation:KEY` or `annotation:KEY=VALUE`.
    Annotation { key: String, value: Option<String> },
    /// `container:NAME`: the pod has a container of that name (the proxy).
    Container(String),
}

impl MeshedWhen {
    pub fn matches(&self, pod: &PodInfo) -> bool {
        let kv = |map: &BTreeMap<String, String>, key: &str, value: &Option<String>| {
            map.get(key).is_some_and(|v| value.as_ref().is_none_or(|want| want == v))
        };
        match self {
            MeshedWhen::Label { key, value } => kv(&pod.labels, key, value),
            MeshedWhen::Annotation { key, value } => kv(&pod.annotations, key, value),
            MeshedWhen::Container(name) => pod.containers.iter().any(|c| c == name),
        }
    }
}

impl FromStr for MeshedWhen {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            anyhow!("{s:?} is not a rule: use label:KEY[=VALUE], annotation:KEY[=VALUE] or container:NAME")
        })?;
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (rest.to_string(), None),
        };
        if key.is_empty() {
            bail!("{s:?}: the key (or container name) is empty");
        }
        match kind {
            "label" => Ok(MeshedWhen::Label { key, value }),
            "annotation" => Ok(MeshedWhen::Annotation { key, value }),
            "container" if value.is_none() => Ok(MeshedWhen::Container(key)),
            "container" => bail!("{s:?}: a container rule takes a name, not NAME=VALUE"),
            other => bail!("{s:?}: unknown rule kind {other:?} (use label, annotation or container)"),
        }
    }
}

impl fmt::Display for MeshedWhen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kv = |f: &mut fmt::Formatter<'_>, kind: &str, key: &str, value: &Option<String>| match value {
            Some(v) => write!(f, "{kind}:{key}={v}"),
            None => write!(f, "{kind}:{key}"),
        };
        match self {
            MeshedWhen::Label { key, value } => kv(f, "label", key, value),
            MeshedWhen::Annotation { key, value } => kv(f, "annotation", key, value),
            MeshedWhen::Container(name) => write!(f, "container:{name}"),
        }
    }
}

pub fn is_meshed(pod: &PodInfo, rules: &[MeshedWhen]) -> bool {
    rules.iter().any(|r| r.matches(pod))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Preset;

    #[test]
    fn rules_parse_and_print() {
        for text in
            ["label:osm-proxy-uuid", "annotation:kuma.io/sidecar-injected=true", "container:envoy", "label:a=b=c"]
        {
            let rule: MeshedWhen = text.parse().unwrap();
            assert_eq!(rule.to_string(), text);
        }
        assert_eq!(
            "label:a=b=c".parse::<MeshedWhen>().unwrap(),
            MeshedWhen::Label { key: "a".into(), value: Some("b=c".into()) }
        );
        for bad in ["envoy", "label:", "pod:x", "container:a=b"] {
            let e = bad.parse::<MeshedWhen>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    #[cfg(feature = "k8s")]
    fn from_pod_reads_the_fields() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1",
                          "annotations": {"x": "y"}, "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app"}, {"name": "envoy"}], "hostNetwork": true,
                     "runtimeClassName": "gvisor"},
            "status": {"phase": "Succeeded"}
        }))
        .unwrap();
        let info = PodInfo::from_pod(&p).unwrap();
        assert_eq!(info.key(), "shop/web");
        assert_eq!(info.containers, vec!["app", "envoy"]);
        assert!(info.host_network);
        assert_eq!(info.runtime_class.as_deref(), Some("gvisor"));
        assert!(!info.is_live());
        assert_eq!(info.annotations["x"], "y");
        assert!(info.running.is_empty());
        let no_uid: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(PodInfo::from_pod(&no_uid).is_none());
    }

    /// Only running containers with a well-formed runtime ID count: a
    /// waiting or terminated proxy has no cgroup to identify it by.
    #[test]
    #[cfg(feature = "k8s")]
    fn running_containers_and_their_ids() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
            "spec": {"containers": [{"name": "app"}, {"name": "envoy"}, {"name": "old"}, {"name": "odd"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "app", "image": "a", "imageID": "", "ready": true, "restartCount": 0,
                 "containerID": "containerd://5d7c0a9f", "state": {"running": {"startedAt": "2026-11-23T10:00:00Z"}}},
                {"name": "envoy", "image": "e", "imageID": "", "ready": true, "restartCount": 1,
                 "containerID": "cri-o://ab12", "state": {"running": {}}},
                {"name": "old", "image": "o", "imageID": "", "ready": false, "restartCount": 3,
                 "containerID": "containerd://ffff", "state": {"terminated": {"exitCode": 1}}},
                {"name": "odd", "image": "o", "imageID": "", "ready": false, "restartCount": 0,
                 "containerID": "containerd://../x", "state": {"running": {}}}
            ],
            "initContainerStatuses": [
                {"name": "redirector-init", "image": "r", "imageID": "", "ready": true, "restartCount": 0,
                 "containerID": "cri-o://1a2b", "state": {"terminated": {"exitCode": 0}}}
            ],
            "ephemeralContainerStatuses": [
                {"name": "debugger", "image": "d", "imageID": "", "ready": false, "restartCount": 0,
                 "containerID": "containerd://3c4d", "state": {"running": {}}},
                {"name": "waiting", "image": "d", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "ContainerCreating"}}}
            ]}
        }))
        .unwrap();
        let info = PodInfo::from_pod(&p).unwrap();
        assert_eq!(info.running, BTreeMap::from([("app".into(), "5d7c0a9f".into()), ("envoy".into(), "ab12".into())]));
        // Where the pod's namespace may be taken from: every container the
        // status names, in any state, with a well-formed ID.
        assert_eq!(
            info.container_ids,
            ["5d7c0a9f", "ab12", "ffff", "1a2b", "3c4d"].into_iter().map(String::from).collect::<BTreeSet<_>>()
        );
        assert_eq!(runtime_container_id("docker://0a"), Some("0a"));
        for bad in ["", "0a", "containerd://", "containerd://a/b", "containerd://a b"] {
            assert_eq!(runtime_container_id(bad), None, "{bad}");
        }
    }

    /// A Pod from an injector golden (a Pod, or a Deployment's pod
    /// template) with the status the kubelet would report once it runs:
    /// the iptables init container done, every other container running.
    #[cfg(feature = "k8s")]
    fn injected_pod(text: &str, iptables_init: &str) -> Pod {
        // The first document that is a Pod or a Deployment (goldens may
        // end with an empty document).
        let doc: serde_json::Value = serde_yaml::Deserializer::from_str(text)
            .map(|d| serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap()).unwrap())
            .find(|d| matches!(d["kind"].as_str(), Some("Pod" | "Deployment")))
            .unwrap();
        let (mut metadata, spec) = match doc["kind"].as_str() {
            Some("Deployment") => {
                (doc["spec"]["template"]["metadata"].clone(), doc["spec"]["template"]["spec"].clone())
            }
            _ => (doc["metadata"].clone(), doc["spec"].clone()),
        };
        metadata["name"] = serde_json::json!("injected");
        metadata["namespace"] = serde_json::json!("shop");
        metadata["uid"] = serde_json::json!("u1");
        let status = |c: &serde_json::Value, running: bool| {
            let name = c["name"].as_str().unwrap();
            let state = if running {
                serde_json::json!({"running": {}})
            } else {
                serde_json::json!({"terminated": {"exitCode": 0}})
            };
            serde_json::json!({"name": name, "image": "i", "imageID": "", "ready": running, "restartCount": 0,
                               "containerID": format!("cri-o://{}", name.replace('-', "")), "state": state})
        };
        let list = |key: &str| spec[key].as_array().cloned().unwrap_or_default();
        let pod = serde_json::json!({
            "metadata": metadata,
            "spec": spec,
            "status": {
                "phase": "Running",
                "containerStatuses": list("containers").iter().map(|c| status(c, true)).collect::<Vec<_>>(),
                "initContainerStatuses": list("initContainers").iter().map(|c| status(c, c["name"] != iptables_init)).collect::<Vec<_>>(),
            }
        });
        serde_json::from_value(pod).unwrap()
    }

    /// The meshes' own injector output (`tests/fixtures/injected`, see its
    /// README): the proxy counts for `container:` rules, and its running
    /// status for cgroup identity, whether it is a native sidecar (in
    /// `initContainers` with `restartPolicy: Always`, the default now) or
    /// a container (the classic layout); the iptables init container is
    /// neither. (No Istio golden of the snapshots has the classic layout:
    /// even 1.27.9's `hello.yaml.injected` has `istio-proxy` as a native
    /// sidecar.)
    #[test]
    #[cfg(feature = "k8s")]
    fn proxies_of_injected_pods_native_and_classic() {
        let fixtures = [
            (
                "istio-native",
                include_str!("../../tests/fixtures/injected/istio-native.yaml"),
                Preset::Istio,
                "istio-init",
                true,
            ),
            (
                "linkerd-native",
                include_str!("../../tests/fixtures/injected/linkerd-native.yaml"),
                Preset::Linkerd,
                "linkerd-init",
                true,
            ),
            (
                "linkerd-classic",
                include_str!("../../tests/fixtures/injected/linkerd-classic.yaml"),
                Preset::Linkerd,
                "linkerd-init",
                false,
            ),
            (
                "kuma-native",
                include_str!("../../tests/fixtures/injected/kuma-native.yaml"),
                Preset::Kuma,
                "kuma-init",
                true,
            ),
            (
                "kuma-classic",
                include_str!("../../tests/fixtures/injected/kuma-classic.yaml"),
                Preset::Kuma,
                "kuma-init",
                false,
            ),
        ];
        for (name, text, preset, iptables_init, native) in fixtures {
            let pod = injected_pod(text, iptables_init);
            let proxy = preset.proxy_container();
            let spec = pod.spec.as_ref().unwrap();
            // The fixture is the layout it is named for.
            let in_init = spec.init_containers.iter().flatten().find(|c| c.name == proxy);
            assert_eq!(in_init.is_some(), native, "{name}: {proxy} in initContainers");
            assert_eq!(in_init.and_then(|c| c.restart_policy.as_deref()), native.then_some("Always"), "{name}");
            assert_eq!(spec.containers.iter().any(|c| c.name == proxy), !native, "{name}: {proxy} in containers");

            let info = PodInfo::from_pod(&pod).unwrap();
            assert!(MeshedWhen::Container(proxy.into()).matches(&info), "{name}: container:{proxy} does not match");
            let d = crate::k8s::injector::decide(&info, &[]);
            assert!(matches!(d, crate::k8s::injector::Decision::Injected { .. }), "{name}: {d:?}");
            assert!(!info.containers.iter().any(|c| c == iptables_init), "{name}: {iptables_init} counted");
            assert_eq!(info.running.get(proxy), Some(&proxy.replace('-', "")), "{name}: running proxy not seen");
            assert!(!info.running.contains_key(iptables_init), "{name}");
            assert!(info.container_ids.contains(&iptables_init.replace('-', "")), "{name}: init container's ID");
        }
        // A regular init container that runs (the gate, say) is not a
        // container the pod carries.
        let pod = injected_pod(fixtures[0].1, "");
        let info = PodInfo::from_pod(&pod).unwrap();
        assert!(!info.containers.iter().any(|c| c == "istio-init"));
        assert!(!info.running.contains_key("istio-init"));
        assert!(!MeshedWhen::Container("istio-init".into()).matches(&info));
    }
}
