//! `redirector webhook`'s answer to one `admission.k8s.io/v1`
//! AdmissionReview, pure: the request body in, the response body out.
//!
//! For a Pod CREATE that [`decide`] programs from its mesh's iptables init
//! container, the answer is a JSONPatch that replaces that container by the
//! redirector gate (as `deploy/init-container.yaml`: `redirector wait-ready
//! --agent-socket=…`, no capabilities, non-root) and records the original
//! container and the policy read from it ([`gated`]); a pod an explicit
//! `--meshed-when` rule programs gets the gate added. Every other pod is
//! allowed unchanged, refused ones with a warning naming the settings. The
//! pod is never denied: `allowed` is always true, and a problem here is a
//! warning on an unchanged pod, whose mesh's init container then redirects
//! it as before.
//!
//! The response follows what kube-apiserver checks of it
//! (kubernetes/kubernetes
//! `staging/src/k8s.io/apiserver/pkg/admission/plugin/webhook/request/admissionreview.go`,
//! `VerifyAdmissionResponse`: the same apiVersion and kind, `response.uid`
//! equal to `request.uid`, `patch` only together with `patchType`) and how
//! it applies the patch (`.../webhook/mutating/dispatcher.go`: an RFC 6902
//! JSON Patch over the object as JSON, then decoded as the object's kind);
//! warnings are kept under the 256 characters past which the API server
//! may cut them (kubernetes/website,
//! `content/en/docs/reference/access-authn-authz/extensible-admission-controllers.md`).
use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use super::{
    injector::{
        decide,
        gated::{self, policy_json},
        is_gate, Decision, Problem,
    },
    pods::{MeshedWhen, PodInfo},
};
use crate::{compile, Preset};

/// The gate's container name.
pub const GATE_NAME: &str = "redirector-init";
/// The hostPath volume of the agent's socket directory.
pub const SOCKET_VOLUME: &str = "redirector-socket";
/// The socket's file name in `--agent-socket-dir` (the DaemonSet's
/// `--agent-socket`).
pub const SOCKET_FILE: &str = "agent.sock";
/// How long the gate waits for the agent (deploy/init-container.yaml's).
pub const GATE_TIMEOUT: &str = "60s";
/// The UID the gate runs as (distroless' `nonroot`).
pub const GATE_UID: i64 = 65532;
/// The API server may cut a warning longer than this.
pub const WARNING_LIMIT: usize = 256;

/// The CNI-mode containers that check the CNI plugin's rules: there is no
/// iptables init container to replace.
const VALIDATORS: [&str; 2] = ["istio-validation", "kuma-validation"];

/// What the webhook is told on its command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--preset`: switch only pods of this mesh's injector.
    pub preset: Option<Preset>,
    /// `--meshed-when`, as the agent's: pods they match (and no mesh's
    /// init container) get the gate.
    pub rules: Vec<MeshedWhen>,
    /// `--gate-image`.
    pub gate_image: String,
    /// `--agent-socket-dir`: the node directory of the agent's socket,
    /// mounted at the same path in the gate.
    pub socket_dir: String,
}

/// What was done with one request, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The mesh's init container `replaced` was replaced by the gate.
    Switched { pod: String, replaced: String, tool: &'static str },
    /// The gate was added (an explicit `--meshed-when` rule).
    GateAdded { pod: String, rule: String },
    /// Allowed unchanged; `warning` is what the response says, if anything.
    Unchanged { pod: String, why: String, warning: Option<String> },
    /// Allowed unchanged because of a problem here (a bug, or a pod this
    /// code cannot patch): logged at WARN.
    Failed { pod: String, error: String },
}

/// The answer to one request body: the response body, and what was done.
/// An error only for a body that is not an AdmissionReview request with a
/// `uid` (no response the API server accepts can be written; the caller
/// answers HTTP 400 and the API server applies the failure policy).
pub fn review(body: &[u8], s: &Settings) -> Result<(Value, Outcome)> {
    let review: Value = serde_json::from_slice(body).context("the body is not JSON")?;
    let (api_version, kind) = (review["apiVersion"].as_str(), review["kind"].as_str());
    if api_version != Some("admission.k8s.io/v1") || kind != Some("AdmissionReview") {
        bail!(
            "not an admission.k8s.io/v1 AdmissionReview (apiVersion {:?}, kind {:?}); the webhook configuration must \
             list admissionReviewVersions [v1]",
            api_version.unwrap_or(""),
            kind.unwrap_or("")
        );
    }
    let request = &review["request"];
    let uid = match request["uid"].as_str() {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => bail!("the AdmissionReview has no request.uid"),
    };
    let (mutation, outcome) = mutation(request, s);
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(ops) = mutation.patch {
        let patch = serde_json::to_vec(&ops).expect("a patch serializes");
        response["patchType"] = "JSONPatch".into();
        response["patch"] = base64::engine::general_purpose::STANDARD.encode(patch).into();
    }
    if !mutation.warnings.is_empty() {
        response["warnings"] = mutation.warnings.into();
    }
    Ok((json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}), outcome))
}

#[derive(Default)]
struct Mutation {
    patch: Option<Vec<Value>>,
    warnings: Vec<String>,
}

fn mutation(request: &Value, s: &Settings) -> (Mutation, Outcome) {
    let pod = pod_key(request);
    let unchanged = |why: String| (Mutation::default(), Outcome::Unchanged { pod: pod.clone(), why, warning: None });
    let is_pod = request["kind"]["group"].as_str().unwrap_or("").is_empty()
        && request["kind"]["kind"].as_str() == Some("Pod")
        && request["resource"]["resource"].as_str() == Some("pods");
    if !is_pod || request["subResource"].as_str().is_some_and(|r| !r.is_empty()) {
        return unchanged(format!(
            "not a pod: {}/{} {}",
            request["kind"]["group"].as_str().unwrap_or(""),
            request["kind"]["kind"].as_str().unwrap_or(""),
            request["subResource"].as_str().unwrap_or("")
        ));
    }
    if request["operation"].as_str() != Some("CREATE") {
        return unchanged(format!("operation {}: only pods being created are switched", request["operation"]));
    }
    match switch(request, s) {
        Ok((m, outcome)) => (m, outcome),
        Err(e) => {
            let error = format!("{e:#}");
            let warning = warning(&format!("redirector webhook left pod {pod} unchanged: {error}"));
            (Mutation { patch: None, warnings: vec![warning] }, Outcome::Failed { pod, error })
        }
    }
}

/// `namespace/name` as the request names it (a pod of a ReplicaSet has
/// only a `generateName` when it is admitted).
fn pod_key(request: &Value) -> String {
    let ns = request["namespace"].as_str().or(request["object"]["metadata"]["namespace"].as_str()).unwrap_or("");
    let meta = &request["object"]["metadata"];
    let name = match (request["name"].as_str().filter(|n| !n.is_empty()), meta["name"].as_str()) {
        (Some(n), _) | (None, Some(n)) => n.to_string(),
        (None, None) => format!("{}(generated)", meta["generateName"].as_str().unwrap_or("")),
    };
    format!("{ns}/{name}")
}

/// The pod as the agent will see it: the object with what the API server
/// fills in only after admission (UID, name of a generated pod, namespace)
/// given placeholders.
fn pod_info(object: &Value, request: &Value) -> Result<PodInfo> {
    let mut obj = object.clone();
    if !obj["metadata"].is_object() {
        bail!("the object has no metadata");
    }
    let meta = &mut obj["metadata"];
    if meta["uid"].as_str().is_none_or(str::is_empty) {
        meta["uid"] = format!("admission-{}", request["uid"].as_str().unwrap_or("")).into();
    }
    if meta["namespace"].as_str().is_none_or(str::is_empty) {
        meta["namespace"] = request["namespace"].as_str().unwrap_or("default").into();
    }
    if meta["name"].as_str().is_none_or(str::is_empty) {
        meta["name"] = format!("{}(generated)", meta["generateName"].as_str().unwrap_or("")).into();
    }
    let pod: Pod = serde_json::from_value(obj).context("the object does not parse as a Pod")?;
    PodInfo::from_pod(&pod).ok_or_else(|| anyhow!("the pod has no UID, name or namespace"))
}

fn switch(request: &Value, s: &Settings) -> Result<(Mutation, Outcome)> {
    let object = &request["object"];
    let pod = pod_info(object, request)?;
    let key = pod_key(request);
    let unchanged = |why: String, warning: Option<String>| {
        (
            Mutation { patch: None, warnings: warning.iter().cloned().collect() },
            Outcome::Unchanged { pod: key.clone(), why, warning },
        )
    };
    if pod.host_network {
        return Ok(unchanged(
            "hostNetwork: true: the agent does not program it (it would redirect the node)".into(),
            None,
        ));
    }
    match decide(&pod, &s.rules) {
        Decision::NotMeshed { why } => Ok(unchanged(why, None)),
        Decision::Injected { gate: Some(gate), .. } => Ok(unchanged(format!("already gated ({gate})"), None)),
        Decision::Refused { container, tool, problem } => {
            let then = match problem {
                Problem::Unverified(_) => "the agent will not program it and its gate will hold it",
                _ => "left to its iptables init container",
            };
            let why = format!("init container {container} ({tool}): {problem}; {then}");
            let short = match &problem {
                Problem::Settings(r) => {
                    format!("refused {}", r.iter().map(|r| r.setting.as_str()).collect::<Vec<_>>().join(", "))
                }
                other => other.to_string(),
            };
            let w = warning(&format!("redirector: pod {key} not switched, {then}: {container} ({tool}): {short}"));
            Ok(unchanged(why, Some(w)))
        }
        Decision::Settings { why } => {
            if pod.init_containers.iter().any(|c| is_gate(&c.argv())) {
                return Ok(unchanged(format!("already gated: {why}"), None));
            }
            match s.rules.iter().find(|r| r.matches(&pod)) {
                // Linkerd CNI's validator: decided before the rules.
                Some(rule) if !pod.init_containers.iter().any(|c| c.name == "linkerd-network-validator") => {
                    let ops = add_gate(object, s)?;
                    check(object, request, &ops, s, |d| match d {
                        Decision::Settings { .. } => Ok(()),
                        other => bail!("the gated pod decides as {other:?}"),
                    })?;
                    Ok((
                        Mutation { patch: Some(ops), warnings: Vec::new() },
                        Outcome::GateAdded { pod: key, rule: rule.to_string() },
                    ))
                }
                _ => Ok(unchanged(format!("{why}: no iptables init container to replace"), None)),
            }
        }
        Decision::Injected { container, tool, reading, gate: None } => {
            let index = object["spec"]["initContainers"]
                .as_array()
                .and_then(|cs| cs.iter().position(|c| c["name"].as_str() == Some(&container)));
            let Some(index) = index else {
                return Ok(unchanged(format!("{tool} (CNI mode): no init container to replace"), None));
            };
            let argv = pod.init_containers.iter().find(|c| c.name == container).map(|c| c.argv()).unwrap_or_default();
            if VALIDATORS.contains(&container.as_str()) || argv.iter().any(|a| a == "--run-validation") {
                return Ok(unchanged(
                    format!("{container} ({tool}) is a CNI plugin's validator: no iptables init container to replace"),
                    None,
                ));
            }
            if let Some(p) = s.preset.filter(|p| *p != reading.preset) {
                let why = format!(
                    "init container {container} ({tool}) is {}'s; this webhook switches only {}'s pods (--preset {})",
                    reading.preset.name(),
                    p.name(),
                    p.name()
                );
                let w = warning(&format!("redirector: pod {key}: {why}"));
                return Ok(unchanged(why, Some(w)));
            }
            let original = pod
                .init_containers
                .iter()
                .find(|c| c.name == container)
                .cloned()
                .ok_or_else(|| anyhow!("init container {container} is a native sidecar"))?;
            let policy = policy_json(&compile(&reading.mesh, &reading.annotations));
            let ops = replace(object, index, &original, &policy, s)?;
            check(object, request, &ops, s, |d| match d {
                Decision::Injected { container: c, gate: Some(_), reading: r, .. } if c == container => {
                    let got = policy_json(&compile(&r.mesh, &r.annotations));
                    if got != policy {
                        bail!("the gated pod's policy {got} is not the original's {policy}");
                    }
                    Ok(())
                }
                other => bail!("the gated pod decides as {other:?}"),
            })?;
            Ok((
                Mutation { patch: Some(ops), warnings: Vec::new() },
                Outcome::Switched { pod: key, replaced: container.clone(), tool },
            ))
        }
    }
}

/// The gate container, as deploy/init-container.yaml has it; `resources`
/// those of the container it replaces (a namespace quota on limits admits
/// it as it admitted that one).
fn gate_container(s: &Settings, resources: Option<&Value>) -> Value {
    let mut c = json!({
        "name": GATE_NAME,
        "image": s.gate_image,
        "command": [
            "redirector",
            "wait-ready",
            format!("--agent-socket={}/{SOCKET_FILE}", s.socket_dir.trim_end_matches('/')),
            format!("--timeout={GATE_TIMEOUT}"),
        ],
        "env": [{"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}],
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": GATE_UID,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": SOCKET_VOLUME, "mountPath": s.socket_dir}],
    });
    if let Some(r) = resources.filter(|r| r.is_object()) {
        c["resources"] = r.clone();
    }
    c
}

fn socket_volume(s: &Settings) -> Value {
    json!({"name": SOCKET_VOLUME, "hostPath": {"path": s.socket_dir, "type": "Directory"}})
}

/// A JSON Pointer token (RFC 6901: `~` → `~0`, `/` → `~1`).
fn token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// The socket volume (added once) and no other container of the gate's
/// name.
fn common_ops(object: &Value, s: &Settings, replacing: Option<usize>) -> Result<Vec<Value>> {
    let spec = &object["spec"];
    for (list, what) in [
        ("initContainers", "init container"),
        ("containers", "container"),
        ("ephemeralContainers", "ephemeral container"),
    ] {
        for (i, c) in spec[list].as_array().into_iter().flatten().enumerate() {
            if c["name"].as_str() == Some(GATE_NAME) && !(list == "initContainers" && Some(i) == replacing) {
                bail!("the pod already has a {what} named {GATE_NAME}");
            }
        }
    }
    let mut ops = Vec::new();
    match spec["volumes"].as_array() {
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [socket_volume(s)]})),
        Some(vols) => match vols.iter().find(|v| v["name"].as_str() == Some(SOCKET_VOLUME)) {
            None => ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": socket_volume(s)})),
            Some(v) if v["hostPath"]["path"].as_str() == Some(&s.socket_dir) => {}
            Some(v) => {
                bail!("the pod already has a volume named {SOCKET_VOLUME} that is not hostPath {}: {v}", s.socket_dir)
            }
        },
    }
    Ok(ops)
}

fn add_gate(object: &Value, s: &Settings) -> Result<Vec<Value>> {
    let mut ops = common_ops(object, s, None)?;
    let gate = gate_container(s, None);
    ops.insert(
        0,
        match object["spec"]["initContainers"].as_array() {
            None => json!({"op": "add", "path": "/spec/initContainers", "value": [gate]}),
            Some(_) => json!({"op": "add", "path": "/spec/initContainers/0", "value": gate}),
        },
    );
    Ok(ops)
}

fn replace(
    object: &Value,
    index: usize,
    original: &super::injector::InitContainer,
    policy: &Value,
    s: &Settings,
) -> Result<Vec<Value>> {
    let mut ops = vec![json!({
        "op": "replace",
        "path": format!("/spec/initContainers/{index}"),
        "value": gate_container(s, object["spec"]["initContainers"][index].get("resources")),
    })];
    ops.extend(common_ops(object, s, Some(index))?);
    let record = gated::record(original);
    let policy = policy.to_string();
    if object["metadata"]["annotations"].is_object() {
        for (k, v) in [(gated::POLICY, policy), (gated::INJECTED_INIT, record)] {
            ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", token(k)), "value": v}));
        }
    } else {
        ops.push(json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": {gated::POLICY: policy, gated::INJECTED_INIT: record},
        }));
    }
    Ok(ops)
}

/// The patch applied as the API server applies it, and the result decided
/// as the agent will decide it: `want` says what it must be.
fn check(
    object: &Value,
    request: &Value,
    ops: &[Value],
    s: &Settings,
    want: impl FnOnce(Decision) -> Result<()>,
) -> Result<()> {
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.to_vec())).context("the patch")?;
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).context("applying the patch")?;
    let pod = pod_info(&patched, request).context("the patched pod")?;
    want(decide(&pod, &s.rules)).context("the patched pod, decided as the agent will")
}

/// `text` cut to [`WARNING_LIMIT`] bytes on a character boundary.
pub fn warning(text: &str) -> String {
    if text.len() <= WARNING_LIMIT {
        return text.to_string();
    }
    let mut end = WARNING_LIMIT - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests;
