//! Kubernetes Events (events.k8s.io) about pods and the mesh settings'
//! sources, published in the background.
use std::sync::Arc;

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{api::PostParams, Api, Client};
use log::warn;

use redirector_policy::k8s::{
    mesh::Source,
    plan::{EventKind, PodEvent},
};

use super::{MESHCONFIG_GROUP, MESHCONFIG_KIND};
use crate::metrics::Metrics;

/// The log target of these records: the module path they had before the
/// agents moved under `agent/`, so `RUST_LOG` filters and log readers keep
/// working.
const LOG: &str = "redirector::k8s::agent";

/// Publishes Events as `redirector`, reporting instance the agent's pod.
pub(super) struct Events {
    pub(super) client: Client,
    pub(super) instance: String,
    pub(super) metrics: Arc<Metrics>,
}

impl Events {
    /// Creates an events.k8s.io Event (in the background: the API's latency
    /// never holds up a reconcile). Each distinct problem is published
    /// once, by the callers; a new message is a new Event, so it is always
    /// visible (a series patch would keep the first message).
    pub(super) fn publish(&self, kind: EventKind, reason: &str, message: String, regarding: ObjectReference) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let ns = regarding.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let ev = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", regarding.name.as_deref().unwrap_or("redirector"), now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(match kind {
                EventKind::Normal => "Normal".into(),
                EventKind::Warning => "Warning".into(),
            }),
            reason: Some(reason.to_string()),
            action: Some("Redirect".into()),
            // The API limits a note to 1 kB.
            note: Some(message.chars().take(1000).collect()),
            regarding: Some(regarding),
            reporting_controller: Some("redirector".into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &ns);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &ev).await {
                metrics.error("event_publish");
                warn!(target: LOG, "publishing Event {:?} in namespace {ns}: {e}", ev.reason);
            }
        });
    }
}

/// The object an Event about a pod is regarding.
pub(super) fn pod_ref(p: &PodEvent) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(p.name.clone()),
        namespace: Some(p.namespace.clone()),
        uid: Some(p.uid.clone()),
        ..Default::default()
    }
}

/// The object an `InvalidMeshConfig` Event is regarding: the ConfigMap or
/// the MeshConfig (`namespace/name`) whose settings are invalid.
pub(super) fn mesh_source_ref(source: &Source, meshconfig_version: &str) -> ObjectReference {
    let (api_version, kind, full) = match source {
        Source::ConfigMap(n) => ("v1".to_string(), "ConfigMap", n.clone()),
        Source::MeshConfig(n) => (format!("{MESHCONFIG_GROUP}/{meshconfig_version}"), MESHCONFIG_KIND, n.clone()),
    };
    let (ns, name) = full.split_once('/').unwrap_or(("", &full));
    ObjectReference {
        api_version: Some(api_version),
        kind: Some(kind.into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}
