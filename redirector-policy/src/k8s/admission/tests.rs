use std::path::Path;

use super::*;
use crate::k8s::{
    injector::{gated::INJECTED_INIT, InitContainer},
    pods::pod_objects_from_manifests,
};

fn settings() -> Settings {
    Settings {
        preset: None,
        rules: Vec::new(),
        gate_image: "registry.example/redirector:1".into(),
        socket_dir: "/var/run/redirector".into(),
    }
}

fn upstream(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    pod_objects_from_manifests(&text).unwrap().remove(0).1
}

/// An AdmissionReview of a Pod CREATE, as kube-apiserver's
/// `CreateV1AdmissionReview` builds it.
fn request(object: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"].as_str().unwrap_or("shop"),
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    }))
    .unwrap()
}

/// The response, and the pod with its patch applied (the object itself
/// without one).
fn answer(object: &Value, s: &Settings) -> (Value, Value, Outcome) {
    let (review, outcome) = review(&request(object), s).unwrap();
    let r = review["response"].clone();
    assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(r["allowed"], true, "never denied");
    let mut patched = object.clone();
    if let Some(b64) = r["patch"].as_str() {
        assert_eq!(r["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut patched, &patch).unwrap();
    } else {
        assert!(r.get("patchType").is_none(), "patchType without a patch: {r}");
    }
    (r, patched, outcome)
}

fn init_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn istio_init_is_replaced_by_the_gate_in_its_place() {
    let pod = upstream("istio/pkg__kube__inject__testdata__inject__hello.yaml.injected");
    let (r, patched, outcome) = answer(&pod, &settings());
    assert!(
        matches!(&outcome, Outcome::Switched { replaced, tool: "istio-iptables", .. } if replaced == "istio-init"),
        "{outcome:?}"
    );
    assert!(r.get("warnings").is_none());
    assert_eq!(init_names(&pod), ["istio-init", "istio-proxy"]);
    assert_eq!(init_names(&patched), [GATE_NAME, "istio-proxy"], "in istio-init's place, before the proxy");
    let gate = &patched["spec"]["initContainers"][0];
    assert_eq!(gate["image"], "registry.example/redirector:1");
    assert_eq!(
        gate["command"],
        json!(["redirector", "wait-ready", "--agent-socket=/var/run/redirector/agent.sock", "--timeout=60s"])
    );
    assert_eq!(gate["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.uid");
    assert_eq!(gate["securityContext"]["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(gate["securityContext"]["runAsUser"], GATE_UID);
    assert_eq!(gate["resources"], pod["spec"]["initContainers"][0]["resources"], "the replaced one's resources");
    let vols: Vec<&Value> = patched["spec"]["volumes"].as_array().unwrap().iter().collect();
    assert_eq!(vols.iter().filter(|v| v["name"] == SOCKET_VOLUME).count(), 1);
    assert_eq!(vols.len(), pod["spec"]["volumes"].as_array().unwrap().len() + 1, "the others kept");
    assert!(!patched.to_string().contains("NET_ADMIN"));
    // The annotations are added to the existing ones.
    let ann = patched["metadata"]["annotations"].as_object().unwrap();
    assert!(ann.contains_key("sidecar.istio.io/status"));
    let recorded: InitContainer = serde_json::from_str(ann[INJECTED_INIT].as_str().unwrap()).unwrap();
    assert_eq!(recorded.name, "istio-init");
    assert_eq!(recorded.args[0], "istio-iptables");
    let policy: Value = serde_json::from_str(ann[gated::POLICY].as_str().unwrap()).unwrap();
    assert_eq!(policy["proxy_uid"], 1337);
    // The agent reads it as the gate standing for istio-init.
    let info = pod_info(&patched, &json!({})).unwrap();
    match decide(&info, &[]) {
        Decision::Injected { container, gate: Some(g), .. } => {
            assert_eq!((container.as_str(), g.as_str()), ("istio-init", GATE_NAME))
        }
        other => panic!("{other:?}"),
    }
    // Reinvoked (reinvocationPolicy: IfNeeded): nothing more to do.
    let (r, again, outcome) = answer(&patched, &settings());
    assert!(r.get("patch").is_none() && again == patched, "{outcome:?}");
}

#[test]
fn annotations_and_volumes_are_created_when_absent() {
    let mut pod = upstream("istio/pkg__kube__inject__testdata__inject__hello.yaml.injected");
    pod["metadata"].as_object_mut().unwrap().remove("annotations");
    pod["spec"].as_object_mut().unwrap().remove("volumes");
    let (_, patched, outcome) = answer(&pod, &settings());
    assert!(matches!(outcome, Outcome::Switched { .. }), "{outcome:?}");
    assert_eq!(patched["spec"]["volumes"], json!([socket_volume(&settings())]));
    assert_eq!(patched["metadata"]["annotations"].as_object().unwrap().len(), 2);
    // A volume of the socket's name that is something else: unchanged.
    pod["spec"]["volumes"] = json!([{"name": SOCKET_VOLUME, "emptyDir": {}}]);
    let (r, patched, outcome) = answer(&pod, &settings());
    assert_eq!(patched, pod);
    assert!(matches!(&outcome, Outcome::Failed { error, .. } if error.contains(SOCKET_VOLUME)), "{outcome:?}");
    assert!(r["warnings"][0].as_str().unwrap().contains("left pod"), "{r}");
    // The same hostPath already there: kept, not added twice.
    pod["spec"]["volumes"] = json!([socket_volume(&settings())]);
    let (_, patched, _) = answer(&pod, &settings());
    assert_eq!(patched["spec"]["volumes"].as_array().unwrap().len(), 1);
    // A container of the gate's name already there: unchanged.
    pod["spec"]["containers"][0]["name"] = GATE_NAME.into();
    let (_, patched, outcome) = answer(&pod, &settings());
    assert_eq!(patched, pod);
    assert!(matches!(&outcome, Outcome::Failed { error, .. } if error.contains(GATE_NAME)), "{outcome:?}");
}

#[test]
fn json_pointer_tokens_are_escaped() {
    assert_eq!(token("redirector.dev/policy"), "redirector.dev~1policy");
    assert_eq!(token("a~b/c"), "a~0b~1c");
}

#[test]
fn refused_and_other_meshes_pods_are_left_with_a_warning() {
    let tproxy = upstream("istio/pkg__kube__inject__testdata__inject__hello-tproxy.yaml.injected");
    let (r, patched, outcome) = answer(&tproxy, &settings());
    assert_eq!(patched, tproxy);
    assert!(matches!(outcome, Outcome::Unchanged { warning: Some(_), .. }), "{outcome:?}");
    let w = r["warnings"][0].as_str().unwrap();
    assert!(w.contains("-m \"TPROXY\"") && w.contains("istio-init") && w.len() <= WARNING_LIMIT, "{w}");

    let hello = upstream("istio/pkg__kube__inject__testdata__inject__hello.yaml.injected");
    let s = Settings { preset: Some(Preset::Linkerd), ..settings() };
    let (r, patched, _) = answer(&hello, &s);
    assert_eq!(patched, hello);
    let w = r["warnings"][0].as_str().unwrap();
    assert!(w.contains("--preset linkerd") && w.contains("istio"), "{w}");
    let s = Settings { preset: Some(Preset::Istio), ..settings() };
    assert!(matches!(answer(&hello, &s).2, Outcome::Switched { .. }));
}

#[test]
fn not_meshed_cni_and_host_network_pods_are_left_alone() {
    for file in [
        "istio/pkg__kube__inject__testdata__inject__gateway.yaml.injected",
        "istio/pkg__kube__inject__testdata__inject__hello.yaml.cni.injected",
        "istio/pkg__kube__inject__testdata__inject__hello-host-network.yaml.injected",
        "kuma/pkg__plugins__runtime__k8s__webhooks__injector__testdata__inject.41.golden.yaml",
        "linkerd/cli__cmd__testdata__inject_emojivoto_deployment_no_init_container.golden.yml",
    ] {
        let pod = upstream(file);
        let (r, patched, outcome) = answer(&pod, &settings());
        assert_eq!(patched, pod, "{file}");
        assert!(r.get("warnings").is_none(), "{file}: {r}");
        assert!(matches!(outcome, Outcome::Unchanged { warning: None, .. }), "{file}: {outcome:?}");
    }
    let mut host = upstream("istio/pkg__kube__inject__testdata__inject__hello.yaml.injected");
    host["spec"]["hostNetwork"] = true.into();
    assert!(matches!(answer(&host, &settings()).2, Outcome::Unchanged { .. }));
}

#[test]
fn an_opted_in_pod_gets_the_gate_first() {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "shop", "labels": {"redirector.dev/meshed": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app"}, {"name": "envoy", "image": "envoy"}]},
    });
    let (_, patched, outcome) = answer(&pod, &settings());
    assert_eq!(patched, pod, "no rule: not meshed");
    assert!(matches!(&outcome, Outcome::Unchanged { pod, .. } if pod == "shop/web-(generated)"), "{outcome:?}");
    let s = Settings { rules: vec!["label:redirector.dev/meshed=true".parse().unwrap()], ..settings() };
    let (_, patched, outcome) = answer(&pod, &s);
    assert!(matches!(&outcome, Outcome::GateAdded { rule, .. } if rule == "label:redirector.dev/meshed=true"));
    assert_eq!(init_names(&patched), [GATE_NAME]);
    assert!(patched["metadata"].get("annotations").is_none(), "its policy is the agent's settings, live");
    let mut with_init = pod.clone();
    with_init["spec"]["initContainers"] = json!([{"name": "migrate", "image": "app"}]);
    assert_eq!(init_names(&answer(&with_init, &s).1), [GATE_NAME, "migrate"]);
}

#[test]
fn only_pod_creates_are_looked_at_and_bad_reviews_are_errors() {
    let pod = upstream("istio/pkg__kube__inject__testdata__inject__hello.yaml.injected");
    let mut req: Value = serde_json::from_slice(&request(&pod)).unwrap();
    req["request"]["operation"] = "UPDATE".into();
    let (resp, outcome) = review(&serde_json::to_vec(&req).unwrap(), &settings()).unwrap();
    assert!(resp["response"].get("patch").is_none() && matches!(outcome, Outcome::Unchanged { .. }));
    req["request"]["operation"] = "CREATE".into();
    req["request"]["subResource"] = "ephemeralcontainers".into();
    assert!(review(&serde_json::to_vec(&req).unwrap(), &settings()).unwrap().0["response"].get("patch").is_none());
    req["request"]["subResource"] = "".into();
    req["request"]["object"]["spec"]["containers"] = "not a list".into();
    let (resp, outcome) = review(&serde_json::to_vec(&req).unwrap(), &settings()).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
    assert!(
        matches!(&outcome, Outcome::Failed { error, .. } if error.contains("does not parse as a Pod")),
        "{outcome:?}"
    );
    for (body, what) in [
        (b"{".to_vec(), "not JSON"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(),
            "v1beta1",
        ),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#.to_vec(), "request.uid"),
    ] {
        let e = review(&body, &settings()).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
}

#[test]
fn warnings_are_cut_on_a_character_boundary() {
    assert_eq!(warning("short"), "short");
    let long = "é".repeat(300);
    let w = warning(&long);
    assert!(w.len() <= WARNING_LIMIT && w.ends_with('…'), "{}", w.len());
}

/// osm-init (no upstream goldens exist: the script as osm-injector's
/// `generateIptablesCommands` writes it, see injector/tests.rs).
#[test]
fn osm_init_is_replaced_too() {
    let script = crate::k8s::injector::tests::osm_script("8080", &["192.0.2.0/24"], "5432", &[], &[]);
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bookstore", "namespace": "shop", "labels": {"osm-proxy-uuid": "x"}},
        "spec": {
            "initContainers": [{
                "name": "osm-init", "image": "openservicemesh/init:v1.2.0",
                "command": ["/bin/sh"], "args": ["-c", script],
                "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}, "privileged": false, "runAsUser": 0},
            }],
            "containers": [{"name": "bookstore", "image": "bookstore"}, {"name": "envoy", "image": "envoy"}],
        },
    });
    let (_, patched, outcome) = answer(&pod, &settings());
    assert!(matches!(outcome, Outcome::Switched { tool: "osm-init's iptables-restore", .. }), "{outcome:?}");
    assert_eq!(init_names(&patched), [GATE_NAME]);
    assert!(!patched.to_string().contains("NET_ADMIN"));
    let policy: Value =
        serde_json::from_str(patched["metadata"]["annotations"][gated::POLICY].as_str().unwrap()).unwrap();
    assert_eq!(policy["proxy_uid"], 1500);
    assert_eq!(policy["outbound_port_exclusions"], json!([5432]));
}
