//! What kube-apiserver does with a mutating webhook's answer, as strict as
//! it is, for the webhook's tests: the AdmissionReview request it sends
//! (kubernetes/kubernetes
//! `staging/src/k8s.io/apiserver/pkg/admission/plugin/webhook/request/admissionreview.go`,
//! `CreateV1AdmissionReview`), the checks of the response
//! (`VerifyAdmissionResponse`: apiVersion and kind `admission.k8s.io/v1`
//! `AdmissionReview`, a `response`, `response.uid` equal to the request's,
//! `patch` and `patchType` together, a non-empty `patchType`), and how the
//! patch is applied (`.../webhook/mutating/dispatcher.go`,
//! `callAttrMutatingHook`: `JSONPatch` is the only patch type, the patch is
//! decoded as an RFC 6902 JSON Patch and applied to the object's JSON, and
//! the result is decoded as the object's kind; a response that is not
//! `allowed` rejects the request).
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use base64::Engine as _;
use serde_json::{json, Value};

/// The request kube-apiserver sends for creating `pod` in `namespace`.
pub fn pod_create_review(uid: &str, namespace: &str, pod: &Value) -> Value {
    let gvk = json!({"group": "", "version": "v1", "kind": "Pod"});
    let gvr = json!({"group": "", "version": "v1", "resource": "pods"});
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            // A pod of a ReplicaSet has only a generateName when admitted.
            "name": pod["metadata"]["name"].as_str().unwrap_or(""),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
}

/// What the API server made of a response.
#[derive(Debug)]
pub struct Applied {
    pub allowed: bool,
    /// The object after the patch (the object itself without one).
    pub object: Value,
    pub patched: bool,
    pub warnings: Vec<String>,
}

/// Checks `body` as the answer to a request of `uid` about `object`, and
/// applies its patch; an error where kube-apiserver would fail the call
/// (and apply the webhook's failurePolicy).
pub fn apply_response(uid: &str, object: &Value, body: &[u8]) -> Result<Applied> {
    let review: Value = serde_json::from_slice(body).context("the response is not JSON")?;
    ensure!(
        review["apiVersion"] == "admission.k8s.io/v1" && review["kind"] == "AdmissionReview",
        "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got {}, {}",
        review["apiVersion"],
        review["kind"]
    );
    let r = review.get("response").filter(|r| !r.is_null()).ok_or_else(|| anyhow!("webhook response was absent"))?;
    ensure!(r["uid"].as_str() == Some(uid), "expected response.uid={uid:?}, got {}", r["uid"]);
    let allowed = match r.get("allowed") {
        Some(Value::Bool(b)) => *b,
        None => false,
        Some(other) => bail!("response.allowed is {other}, not a boolean"),
    };
    let patch = match r.get("patch") {
        None | Some(Value::Null) => Vec::new(),
        // Go decodes a []byte from standard base64 with padding.
        Some(Value::String(s)) => {
            base64::engine::general_purpose::STANDARD.decode(s).context("response.patch: not base64")?
        }
        Some(other) => bail!("response.patch is {other}, not a base64 string"),
    };
    let patch_type = match r.get("patchType") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => bail!("response.patchType is {other}, not a string"),
    };
    match (patch.is_empty(), patch_type) {
        (false, None) => bail!("webhook returned response.patch but not response.patchType"),
        (true, Some(_)) => bail!("webhook returned response.patchType but not response.patch"),
        (_, Some("")) => bail!("webhook returned invalid response.patchType of \"\""),
        _ => {}
    }
    let warnings = match r.get("warnings") {
        None | Some(Value::Null) => Vec::new(),
        Some(w) => serde_json::from_value(w.clone()).context("response.warnings: not a list of strings")?,
    };
    if !allowed || patch.is_empty() {
        return Ok(Applied { allowed, object: object.clone(), patched: false, warnings });
    }
    let ops: json_patch::Patch =
        serde_json::from_slice(&patch).context("received undecodable patch in webhook response")?;
    ensure!(patch_type == Some("JSONPatch"), "unsupported patch type {patch_type:?}");
    if ops.0.is_empty() {
        return Ok(Applied { allowed, object: object.clone(), patched: false, warnings });
    }
    let mut out = object.clone();
    json_patch::patch(&mut out, &ops).context("applying the patch")?;
    let _: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(out.clone()).context("the patched object does not decode as a Pod")?;
    Ok(Applied { allowed, object: out, patched: true, warnings })
}
