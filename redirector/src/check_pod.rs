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
            v["why"] = why.into();
            match preset {
                None => {
                    v["decision"] = "needs-preset".into();
                    v["error"] = "its policy comes from the agent's mesh settings and the pod's annotations: give \
                                  --preset (the agent's mesh.yaml preset)"
                        .into();
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

pub fn check_pod(file: &Path, preset: Option<Preset>, rules: &[MeshedWhen], json_out: bool) -> Result<()> {
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
    let answers: Vec<Value> = pods.iter().map(|(w, p)| pod_json(w, p, preset, rules)).collect();
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
