//! Parsing: the parts of a Kubernetes Pod the agent needs, and which pods
//! are meshed (carry the sidecar).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

use anyhow::{anyhow, bail, Result};
#[cfg(feature = "k8s")]
use k8s_openapi::api::core::v1::Pod;

use crate::{dialect::Injected, Preset};

/// What the agent keeps of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<String>,
    pub host_network: bool,
    /// `status.phase` (Pending, Running, Succeeded, Failed, Unknown).
    pub phase: String,
    /// Containers in the running state → their container ID as the
    /// runtime names it (`status.containerStatuses[].containerID` without
    /// its `containerd://` scheme).
    pub running: BTreeMap<String, String>,
    /// The runtime's ID of every container the pod's status lists
    /// (`containerStatuses`, `initContainerStatuses`,
    /// `ephemeralContainerStatuses`), in any state: the pod's network
    /// namespace is only ever taken from a process in one of their
    /// cgroups.
    pub container_ids: BTreeSet<String>,
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
        Some(Self {
            uid: m.uid.clone()?,
            namespace: m.namespace.clone()?,
            name: m.name.clone()?,
            annotations: m.annotations.clone().unwrap_or_default(),
            labels: m.labels.clone().unwrap_or_default(),
            containers: spec.map(|s| s.containers.iter().map(|c| c.name.clone()).collect()).unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into()),
            running: pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten()
                .filter(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()))
                .filter_map(|c| Some((c.name.clone(), runtime_container_id(c.container_id.as_deref()?)?.to_string())))
                .collect(),
            container_ids: all_statuses
                .filter_map(|c| Some(runtime_container_id(c.container_id.as_deref()?)?.to_string()))
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

    /// What the mesh's injector leaves on a pod it injected.
    pub fn defaults(preset: Preset) -> Vec<MeshedWhen> {
        // The mark the injector leaves on the pod (e.g. OSM's proxy UUID
        // label), or the sidecar container it adds.
        let mark = match preset.injected() {
            Injected::Label(k) => MeshedWhen::Label { key: k.into(), value: None },
            Injected::Annotation(k, v) => MeshedWhen::Annotation { key: k.into(), value: v.map(Into::into) },
        };
        vec![mark, MeshedWhen::Container(preset.proxy_container().into())]
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

    pub fn pod(name: &str) -> PodInfo {
        PodInfo {
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            name: name.into(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            containers: vec!["app".into()],
            host_network: false,
            phase: "Running".into(),
            running: BTreeMap::new(),
            container_ids: BTreeSet::new(),
        }
    }

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
    fn defaults_match_what_injectors_leave() {
        let mut osm = pod("a");
        assert!(!is_meshed(&osm, &MeshedWhen::defaults(Preset::Osm)));
        osm.labels.insert("osm-proxy-uuid".into(), "0f1e".into());
        assert!(is_meshed(&osm, &MeshedWhen::defaults(Preset::Osm)));
        let mut istio = pod("b");
        istio.containers.push("istio-proxy".into());
        assert!(is_meshed(&istio, &MeshedWhen::defaults(Preset::Istio)));
        assert!(!is_meshed(&istio, &MeshedWhen::defaults(Preset::Osm)));
        let mut kuma = pod("c");
        kuma.annotations.insert("kuma.io/sidecar-injected".into(), "false".into());
        assert!(!is_meshed(&kuma, &MeshedWhen::defaults(Preset::Kuma)));
        kuma.annotations.insert("kuma.io/sidecar-injected".into(), "true".into());
        assert!(is_meshed(&kuma, &MeshedWhen::defaults(Preset::Kuma)));
    }

    #[test]
    #[cfg(feature = "k8s")]
    fn from_pod_reads_the_fields() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1",
                          "annotations": {"x": "y"}, "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app"}, {"name": "envoy"}], "hostNetwork": true},
            "status": {"phase": "Succeeded"}
        }))
        .unwrap();
        let info = PodInfo::from_pod(&p).unwrap();
        assert_eq!(info.key(), "shop/web");
        assert_eq!(info.containers, vec!["app", "envoy"]);
        assert!(info.host_network);
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
        for preset in [Preset::Osm, Preset::Istio, Preset::Linkerd, Preset::Kuma] {
            let rules = MeshedWhen::defaults(preset);
            assert!(rules.contains(&MeshedWhen::Container(preset.proxy_container().into())), "{preset:?}");
        }
    }
}
