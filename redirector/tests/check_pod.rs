//! `redirector check --pod`: the meshes' own injector output in, what the
//! Kubernetes agent would do out (JSON keys documented in
//! docs/configuration.md#check---pod).
use std::{path::PathBuf, process::Command};

use serde_json::Value;

fn upstream(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../redirector-policy/tests/fixtures/upstream").join(path)
}

fn check(args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_redirector")).arg("check").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.success(), v, format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn istio_injected_pods_as_the_agent_sees_them() {
    let hello = upstream("istio/pkg__kube__inject__testdata__inject__hello.yaml.injected");
    let (ok, v, out) = check(&["--pod", hello.to_str().unwrap(), "--json"]);
    assert!(ok, "{out}");
    let p = &v["pods"][0];
    assert_eq!(p["decision"], "programmed", "{p:#}");
    assert_eq!(p["source_of_policy"], "init-container");
    assert_eq!(p["tool"], "istio-iptables");
    assert_eq!(p["policy"]["proxy_uid"], 1337);
    assert_eq!(p["policy"]["inbound_port"], 15006);
    assert_eq!(p["policy"]["outbound_ip_range_inclusions"], Value::Null, "-i '*'");
    assert_eq!(p["policy"]["inbound_port_exclusions"], serde_json::json!([15008, 15020, 15021, 15090]));
    assert_eq!(p["policy"]["loopback"], "proxy-to-inbound");

    let tproxy = upstream("istio/pkg__kube__inject__testdata__inject__hello-tproxy.yaml.injected");
    let (ok, v, out) = check(&["--pod", tproxy.to_str().unwrap(), "--json"]);
    assert!(ok, "a refused pod is an answer: {out}");
    assert_eq!(v["pods"][0]["decision"], "refused");
    assert_eq!(v["pods"][0]["refused"][0]["setting"], "-m \"TPROXY\"", "{v:#}");

    // Text: the same, readable.
    let (ok, _, out) = check(&["--pod", hello.to_str().unwrap()]);
    assert!(ok && out.contains("programmed") && out.contains("proxy: uid 1337 gid 1337"), "{out}");
}

#[test]
fn a_gateway_is_not_meshed_and_the_gate_needs_a_preset() {
    let gw = upstream("istio/pkg__kube__inject__testdata__inject__gateway.yaml.injected");
    let (ok, v, out) = check(&["--pod", gw.to_str().unwrap(), "--json"]);
    assert!(ok, "{out}");
    assert_eq!(v["pods"][0]["decision"], "not-meshed", "{v:#}");

    let dir = std::env::temp_dir().join(format!("check-pod-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gated = dir.join("gated.yaml");
    std::fs::write(
        &gated,
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: web, namespace: shop, \
         annotations: {openservicemesh.io/outbound-port-exclusion-list: \"6379\"}}\n  spec:\n    initContainers:\n    \
         - {name: redirector-init, image: redirector, command: [redirector, wait-ready]}\n    containers: [{name: app, \
         image: app}]\n",
    )
    .unwrap();
    let (ok, v, _) = check(&["--pod", gated.to_str().unwrap(), "--json"]);
    assert!(!ok, "undecided without --preset");
    assert_eq!(v["pods"][0]["decision"], "needs-preset", "{v:#}");
    let (ok, v, out) = check(&["--pod", gated.to_str().unwrap(), "--json", "--preset", "osm"]);
    assert!(ok, "{out}");
    assert_eq!(v["pods"][0]["source_of_policy"], "mesh-settings");
    assert_eq!(v["pods"][0]["policy"]["outbound_port_exclusions"], serde_json::json!([6379]), "{v:#}");
    let _ = std::fs::remove_dir_all(&dir);

    // A file with no pod, or one that does not parse, is an error.
    let (ok, _, out) = check(&["--pod", env!("CARGO_MANIFEST_DIR")]);
    assert!(!ok && out.contains("reading"), "{out}");
}

/// A gated pod under preset istio with the mesh's own settings given:
/// its policy is what Istio's injector values and the pod's annotations
/// say, as the agent reads them.
#[test]
fn a_gated_pod_with_the_meshs_own_settings() {
    let dir = std::env::temp_dir().join(format!("check-pod-wide-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gated = dir.join("gated.yaml");
    std::fs::write(
        &gated,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, annotations: \
         {traffic.sidecar.istio.io/excludeInboundPorts: \"9090\"}}\nspec:\n  initContainers:\n  - {name: \
         redirector-init, image: redirector, command: [redirector, wait-ready]}\n  containers: [{name: app, image: \
         app}]\n",
    )
    .unwrap();
    let settings = dir.join("istio.yaml");
    let values = serde_json::json!({"global": {"proxy": {"excludeOutboundPorts": "7070", "statusPort": 15020}}});
    std::fs::write(
        &settings,
        format!(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {{name: \
             istio-sidecar-injector, namespace: istio-system}}\n  data:\n    values: '{values}'\n- apiVersion: v1\n  \
             kind: ConfigMap\n  metadata: {{name: istio, namespace: istio-system}}\n  data:\n    mesh: |\n      \
             proxyListenPort: 15101\n"
        ),
    )
    .unwrap();
    let (ok, v, out) = check(&[
        "--pod",
        gated.to_str().unwrap(),
        "--preset",
        "istio",
        "--mesh-settings",
        settings.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{out}");
    let p = &v["pods"][0];
    assert_eq!(p["source_of_policy"], "mesh-own-settings", "{p:#}");
    assert_eq!(p["policy"]["outbound_port"], 15101, "{p:#}");
    assert_eq!(p["policy"]["outbound_port_exclusions"], serde_json::json!([7070]), "{p:#}");
    assert_eq!(p["policy"]["inbound_port_exclusions"], serde_json::json!([9090, 15008, 15020, 15021, 15090]), "{p:#}");
    // Needs a preset, and names a file without the ConfigMap.
    let (ok, _, out) = check(&[
        "--pod",
        gated.to_str().unwrap(),
        "--preset",
        "linkerd",
        "--mesh-settings",
        settings.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("linkerd-config"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
