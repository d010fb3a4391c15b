//! The agent and its node: the start-up taint it removes once it is ready,
//! and the Event it leaves on the node when the kernel is refused.
//!
//! The taint (`--startup-taint`, default [`DEFAULT_TAINT`], any effect)
//! is put on the node at registration by whoever registers it (kubelet
//! `--register-with-taints`, or the node provisioner), as with Cilium's
//! `node.cilium.io/agent-not-ready`: no meshed pod is scheduled onto a
//! node before its agent can answer the init containers' gate. The agent
//! removes it with a JSON patch that tests the current taints first, so a
//! concurrent change to them is never overwritten (as the Kubernetes CSI
//! node plugins remove their `<driver>/agent-not-ready` taint).
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use log::{info, warn};

use redirector_policy::k8s::plan::EventKind;

use super::events::{self, action};

/// The log target of these records (see `mod.rs`).
const LOG: &str = "redirector::k8s::agent";

/// The default start-up taint.
pub const DEFAULT_TAINT: &str = "redirector.dev/agent-not-ready";

/// The node's taints without those of `key` (every effect), or None if it
/// has none of them.
pub fn without_taint(taints: &[Taint], key: &str) -> Option<Vec<Taint>> {
    let kept: Vec<Taint> = taints.iter().filter(|t| t.key != key).cloned().collect();
    (kept.len() != taints.len()).then_some(kept)
}

/// The JSON patch (RFC 6902) that replaces `old` taints by `new` only if
/// they are still `old`.
fn taint_patch(old: &[Taint], new: &[Taint]) -> Result<json_patch::Patch> {
    let ops = serde_json::json!([
        {"op": "test", "path": "/spec/taints", "value": old},
        {"op": "replace", "path": "/spec/taints", "value": new},
    ]);
    serde_json::from_value(ops).context("building the taint patch")
}

/// Removes `key` from the node's taints: Ok(true) if it was there.
async fn remove_taint(api: &Api<Node>, node: &str, key: &str) -> Result<bool> {
    let current = api.get(node).await.with_context(|| format!("reading node {node}"))?;
    let taints = current.spec.and_then(|s| s.taints).unwrap_or_default();
    let Some(kept) = without_taint(&taints, key) else { return Ok(false) };
    let patch = taint_patch(&taints, &kept)?;
    api.patch(node, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .with_context(|| format!("removing taint {key} from node {node}"))?;
    Ok(true)
}

/// Removes the start-up taint in the background, retrying (1 s, doubling
/// to 60 s) until it is gone or was never there; the first failure and
/// every new error are logged as warnings.
pub(super) fn spawn_taint_removal(client: Client, node: String, key: String) {
    tokio::spawn(async move {
        let api: Api<Node> = Api::all(client);
        let mut delay = Duration::from_secs(1);
        let mut last_error = String::new();
        loop {
            match remove_taint(&api, &node, &key).await {
                Ok(true) => {
                    info!(target: LOG, "ready: removed the start-up taint {key} from node {node}");
                    return;
                }
                Ok(false) => {
                    info!(target: LOG, "ready: node {node} has no start-up taint {key}");
                    return;
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    if text != last_error {
                        warn!(
                            target: LOG,
                            "{text}; retrying (pods that do not tolerate {key} are not scheduled onto this node meanwhile; RBAC: nodes get, patch)"
                        );
                        last_error = text;
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    });
}

/// Publishes a `KernelNotSupported` Event on the node, waiting for it (at
/// most 10 s): the agent exits right after.
pub(super) async fn report_refused_kernel(client: &Client, node: &str, instance: &str, why: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let publish = async {
        let uid = nodes.get(node).await.ok().and_then(|n| n.metadata.uid);
        let nanos = k8s_openapi::jiff::Timestamp::now().as_nanosecond();
        let ev = events::build(
            events::event_name(node, nanos),
            EventKind::Warning,
            "KernelNotSupported",
            action::START,
            &format!("redirector cannot run on this node's kernel: {why}"),
            events::node_ref(node, uid),
            instance,
        );
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
        api.create(&PostParams::default(), &ev).await
    };
    match tokio::time::timeout(Duration::from_secs(10), publish).await {
        Ok(Ok(_)) => info!(target: LOG, "published Event KernelNotSupported on node {node}"),
        Ok(Err(e)) => warn!(target: LOG, "publishing Event KernelNotSupported on node {node}: {e}"),
        Err(_) => warn!(target: LOG, "publishing Event KernelNotSupported on node {node}: no answer in 10s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint { key: key.into(), effect: effect.into(), ..Default::default() }
    }

    #[test]
    fn only_the_startup_taint_goes() {
        let other = taint("node.kubernetes.io/not-ready", "NoSchedule");
        let ours = [taint(DEFAULT_TAINT, "NoSchedule"), taint(DEFAULT_TAINT, "NoExecute")];
        let all = vec![other.clone(), ours[0].clone(), ours[1].clone()];
        assert_eq!(without_taint(&all, DEFAULT_TAINT), Some(vec![other.clone()]));
        assert_eq!(without_taint(std::slice::from_ref(&other), DEFAULT_TAINT), None);
        assert_eq!(without_taint(&[], DEFAULT_TAINT), None);
        let p = serde_json::to_value(taint_patch(&all, &[other]).unwrap()).unwrap();
        assert_eq!(p[0]["op"], "test");
        assert_eq!(p[0]["value"].as_array().unwrap().len(), 3, "the patch applies only to the taints it read");
        assert_eq!(p[1]["op"], "replace");
        assert_eq!(p[1]["value"][0]["key"], "node.kubernetes.io/not-ready");
    }
}
