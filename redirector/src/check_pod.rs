//! `redirector check --pod FILE`: what the Kubernetes agent would do with
//! pods as their mesh's injector wrote them, before anything is switched:
//! per pod, whether it is a sidecar workload and why, the policy it would
//! program, and the settings it refuses. Reads manifests only.
use std::{io::Read as _, path::Path};

use anyhow::{bail, Context as _, Result};
use redirector_policy::{
    k8s::{
        injector::{
            decide,
            gated::{policy_json, INJECTED_INIT},
            meshwide::{self, MeshWide},
            Decision, Problem,
        },
        pods::{pods_from_manifests, MeshedWhen},
    },
    parse_annotations, MeshSettings, Preset,
};
use serde_json::{json, Value};

/// One pod's answer.
fn pod_json(
    where_: &str,
    pod: &redirector_policy::k8s::pods::PodInfo,
    preset: Option<Preset>,
    rules: &[MeshedWhen],
    wide: Option<&MeshWide>,
) -> Value {
    let mut v = json!({"source": where_, "namespace": pod.namespace, "name": pod.name, "refused": [], "notes": []});
    if pod.host_network {
        v["decision"] = "not-programmed".into();
        v["why"] = "hostNetwork: true (the node's network namespace)".into();
        return v;
    }
    match decide(pod, rules) {
        Decision::NotMeshed { why } => {
            v["decision"] = "not-meshed".into();
            v["why"] = why.into();
        }
        Decision::Refused { container, tool, problem } => {
            v["decision"] = "refused".into();
            v["container"] = container.clone().into();
            v["tool"] = tool.into();
            let then = match problem {
                Problem::Unverified(_) => "not programmed: its gate keeps its containers from starting",
                _ => "left to its iptables init container",
            };
            v["why"] = format!("init container {container} ({tool}): {problem}; {then}").into();
            if let Problem::Settings(r) = problem {
                v["refused"] = r.iter().map(|r| json!({"setting": r.setting, "why": r.why})).collect();
            }
        }
        Decision::Injected { container, tool, reading, gate } => {
            v["decision"] = "programmed".into();
            v["container"] = container.clone().into();
            v["tool"] = tool.into();
            v["preset"] = reading.preset.name().into();
            match gate {
                None => {
                    v["source_of_policy"] = "init-container".into();
                    v["why"] = format!("init container {container} runs {tool}: its command line is the policy").into();
                }
                Some(gate) => {
                    v["source_of_policy"] = "recorded-init-container".into();
                    v["gate"] = gate.clone().into();
                    v["why"] = format!(
                        "init container {gate} is the redirector gate; it replaced {container} ({tool}), recorded in \
                         {INJECTED_INIT}, whose command line is the policy (the recorded policy checked out)"
                    )
                    .into();
                }
            }
            v["notes"] = reading.notes.clone().into();
            v["policy"] = policy_json(&redirector_policy::compile(&reading.mesh, &reading.annotations));
        }
        Decision::Settings { why } => {
            v["why"] = why.clone().into();
            match preset {
                None => {
                    v["decision"] = "needs-preset".into();
                    v["error"] = "its policy comes from the agent's mesh settings and the pod's annotations: give \
                                  --preset (the agent's mesh.yaml preset)"
                        .into();
                }
                Some(preset) if wide.is_some_and(|w| w.preset() == preset) => {
                    let wide = wide.expect("checked");
                    match wide.read(pod) {
                        Ok(r) if r.refused.is_empty() => {
                            v["decision"] = "programmed".into();
                            v["source_of_policy"] = "mesh-own-settings".into();
                            v["preset"] = preset.name().into();
                            v["settings"] = wide.named().into();
                            v["notes"] = r.notes.clone().into();
                            v["policy"] = policy_json(&redirector_policy::compile(&r.mesh, &r.annotations));
                        }
                        Ok(r) => {
                            v["decision"] = "refused".into();
                            v["why"] = format!(
                                "{why}; the mesh's settings ({}) with its annotations ask for what redirector \
                                 cannot do: not programmed",
                                wide.named()
                            )
                            .into();
                            v["refused"] =
                                r.refused.iter().map(|r| json!({"setting": r.setting, "why": r.why})).collect();
                        }
                        Err(e) => {
                            v["decision"] = "invalid-annotations".into();
                            v["error"] = format!("{e:#}").into();
                        }
                    }
                }
                Some(preset) => match parse_annotations(preset, &pod.annotations) {
                    Ok(a) => {
                        v["decision"] = "programmed".into();
                        v["source_of_policy"] = "mesh-settings".into();
                        v["preset"] = preset.name().into();
                        v["policy"] = policy_json(&redirector_policy::compile(&MeshSettings::for_preset(preset), &a));
                    }
                    Err(e) => {
                        v["decision"] = "invalid-annotations".into();
                        v["error"] = format!("{e:#}").into();
                    }
                },
            }
        }
    }
    v
}

fn text(v: &Value) -> String {
    let mut out = format!(
        "pod {}/{} ({}): {}",
        v["namespace"].as_str().unwrap_or(""),
        v["name"].as_str().unwrap_or(""),
        v["source"].as_str().unwrap_or(""),
        v["decision"].as_str().unwrap_or("")
    );
    out += &format!("\n  why: {}", v["why"].as_str().unwrap_or(""));
    if let Some(e) = v["error"].as_str() {
        out += &format!("\n  error: {e}");
    }
    for r in v["refused"].as_array().into_iter().flatten() {
        out += &format!("\n  refused: {}: {}", r["setting"].as_str().unwrap_or(""), r["why"].as_str().unwrap_or(""));
    }
    for n in v["notes"].as_array().into_iter().flatten() {
        out += &format!("\n  note: {}", n.as_str().unwrap_or(""));
    }
    if let Some(p) = v["policy"].as_object() {
        let list = |k: &str| match &p[k] {
            Value::Null => "all".to_string(),
            Value::Array(a) if a.is_empty() => "-".to_string(),
            Value::Array(a) => {
                a.iter().map(|x| x.to_string().trim_matches('"').to_string()).collect::<Vec<_>>().join(",")
            }
            other => other.to_string(),
        };
        out += &format!(
            "\n  proxy: uid {} gid {}; outbound port {}, inbound port {} (inbound {}); loopback {}",
            p["proxy_uid"],
            p["proxy_gid"],
            p["outbound_port"],
            p["inbound_port"],
            if p["inbound"] == true { "on" } else { "off" },
            p["loopback"].as_str().unwrap_or("")
        );
        let incl = |k: &str| match &p[k] {
            Value::Null => "all".to_string(),
            Value::Array(a) if a.is_empty() => "none".to_string(),
            _ => list(k),
        };
        out += &format!(
            "\n  outbound: IP ranges included {}, excluded {}; ports included {}, excluded {}",
            incl("outbound_ip_range_inclusions"),
            list("outbound_ip_range_exclusions"),
            incl("outbound_port_inclusions"),
            list("outbound_port_exclusions")
        );
        out += &format!(
            "\n  inbound: ports included {}, excluded {}; sources excluded {}",
            incl("inbound_port_inclusions"),
            list("inbound_port_exclusions"),
            list("inbound_source_exclusions")
        );
    }
    out
}

/// The mesh's own settings from a file of ConfigMaps (`kubectl -n
/// istio-system get cm istio-sidecar-injector istio -o yaml`, or
/// `linkerd-config`), for `preset`.
pub fn mesh_settings_file(file: &Path, preset: Option<Preset>) -> Result<MeshWide> {
    use serde::Deserialize as _;
    let Some(preset) = preset else { bail!("option --mesh-settings: needs --preset (istio or linkerd)") };
    let wanted = meshwide::sources(preset, "");
    if wanted.is_empty() {
        bail!("option --mesh-settings: preset {} has no mesh-wide settings redirector reads", preset.name());
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut found: std::collections::BTreeMap<String, (String, serde_yaml::Mapping)> = Default::default();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).with_context(|| format!("{}: not YAML", file.display()))?;
        let items = match v.get("kind").and_then(|k| k.as_str()) {
            Some("List") | Some("ConfigMapList") => {
                v.get("items").and_then(|i| i.as_sequence()).cloned().unwrap_or_default()
            }
            _ => vec![v],
        };
        for item in items.into_iter().filter(|i| i.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap")) {
            let meta = &item["metadata"];
            let name = meta["name"].as_str().unwrap_or_default().to_string();
            let ns = meta["namespace"].as_str().unwrap_or("default");
            let data = item.get("data").and_then(|d| d.as_mapping()).cloned().unwrap_or_default();
            found.insert(name, (format!("{ns}/{}", meta["name"].as_str().unwrap_or_default()), data));
        }
    }
    let get = |i: usize| -> Option<(String, String)> {
        let (name, key) = wanted.get(i)?;
        let (full, data) = found.get(name)?;
        Some((full.clone(), data.get(*key)?.as_str()?.to_string()))
    };
    let Some((vname, values)) = get(0) else {
        bail!("{}: no ConfigMap {} with key `{}` (preset {})", file.display(), wanted[0].0, wanted[0].1, preset.name());
    };
    match preset {
        Preset::Istio => {
            let mesh = get(1);
            MeshWide::istio((&vname, &values), mesh.as_ref().map(|(n, t)| (n.as_str(), t.as_str())))
        }
        _ => MeshWide::linkerd((&vname, &values)),
    }
}

pub fn check_pod(
    file: &Path,
    preset: Option<Preset>,
    rules: &[MeshedWhen],
    wide: Option<&MeshWide>,
    json_out: bool,
) -> Result<()> {
    let content = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let pods = pods_from_manifests(&content).with_context(|| format!("{}", file.display()))?;
    if pods.is_empty() {
        bail!("{}: no Pod or workload with a pod template", file.display());
    }
    let answers: Vec<Value> = pods.iter().map(|(w, p)| pod_json(w, p, preset, rules, wide)).collect();
    let failed = answers
        .iter()
        .filter(|a| matches!(a["decision"].as_str(), Some("needs-preset" | "invalid-annotations")))
        .count();
    if json_out {
        println!("{}", json!({"file": file.display().to_string(), "pods": answers}));
    } else {
        for a in &answers {
            println!("{}", text(a));
        }
    }
    if failed > 0 {
        bail!("{}: {failed} pod(s) could not be decided (see above)", file.display());
    }
    Ok(())
}
