//! Which pods are sidecar workloads, and the policy their mesh's injector
//! decided, read from what it wrote into the pod: the iptables init
//! container's command line (istio-iptables, linkerd2-proxy-init, kumactl,
//! osm-init's iptables-restore script;
//! their CNI-mode validators carry the same settings), or redirector's own
//! gate (with the init container `redirector webhook` replaced by it, as
//! recorded and checked: [`gated`]). Pure: a [`PodInfo`] in, a
//! [`Decision`] out.
//!
//! A pod is a sidecar workload only if it has its mesh's init container
//! (or validator), the redirector gate, or matches an explicit
//! `--meshed-when` rule; never for the name of a container (a gateway, a
//! proxyless pod, Contour's `envoy`), and never when Istio was told not to
//! intercept it (`sidecar.istio.io/inject: "false"`,
//! `sidecar.istio.io/interceptionMode: NONE`).
mod argv;
pub mod gated;
mod istio;
mod kuma;
mod linkerd;
pub mod meshwide;
mod osm;

use std::{collections::BTreeMap, fmt};

use anyhow::Result;

use super::pods::{MeshedWhen, PodInfo};
use crate::{dialect::Preset, mesh::MeshSettings, WorkloadAnnotations};

/// A regular (run-to-completion) init container, as much of it as the
/// readers need. As JSON (camelCase keys, unknown keys refused) it is the
/// record of [`gated::INJECTED_INIT`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitContainer {
    pub name: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// `env`: a literal value, or None for `valueFrom`.
    #[serde(default)]
    pub env: BTreeMap<String, Option<String>>,
    /// Files of downwardAPI volumes it mounts: absolute path → the field
    /// the file holds (`metadata.annotations['KEY']`).
    #[serde(default)]
    pub downward_files: BTreeMap<String, String>,
}

impl InitContainer {
    /// `command` then `args`, as the runtime runs them (an empty command
    /// runs the image's entrypoint with `args`).
    pub fn argv(&self) -> Vec<String> {
        self.command.iter().chain(&self.args).cloned().collect()
    }
}

/// A setting the pod's injector asked for that redirector cannot honour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// As written (`-m "TPROXY"`, `env ISTIO_META_DNS_CAPTURE=true`).
    pub setting: String,
    pub why: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.why)
    }
}

/// What one reader made of an init container.
#[derive(Clone, Debug)]
pub struct Reading {
    pub preset: Preset,
    /// Every setting the command line determines; the pod's annotations
    /// are not applied again (the injector merged them in already).
    pub mesh: MeshSettings,
    /// The include lists, as Istio's annotations carry them (an empty
    /// inclusion redirects nothing, which mesh settings cannot say).
    pub annotations: WorkloadAnnotations,
    pub refused: Vec<Refusal>,
    /// Things done as the tool does them that a user should hear of
    /// (istio-iptables skips a CIDR that does not parse).
    pub notes: Vec<String>,
}

/// Why a pod is, or is not, programmed.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Its mesh's init container asks for this policy; `gate` names the
    /// redirector gate that replaced it (the container as recorded by
    /// `redirector webhook`, checked: [`gated`]).
    Injected { container: String, tool: &'static str, reading: Box<Reading>, gate: Option<String> },
    /// A sidecar workload whose policy comes from the agent's mesh
    /// settings and the pod's annotations: the redirector gate, a mesh's
    /// CNI mode without readable flags (Linkerd's network validator), or
    /// an explicit `--meshed-when` rule.
    Settings { why: String },
    /// A sidecar workload asking for something redirector cannot do, or
    /// whose init container's command line redirector cannot read: left
    /// to its iptables init container.
    Refused { container: String, tool: &'static str, problem: Problem },
    /// Not a sidecar workload.
    NotMeshed { why: String },
}

/// Why a mesh's init container is not followed.
#[derive(Clone, Debug)]
pub enum Problem {
    Settings(Vec<Refusal>),
    /// The command line does not read as the tool reads it (the tool would
    /// fail too), or is not the tool's at all (a user's own `istio-init`).
    Unreadable(String),
    /// A gated pod whose recorded init container and policy do not check
    /// out ([`gated`]): it is not programmed, so its gate holds it.
    Unverified(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Settings(r) => {
                write!(f, "{}", r.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
            }
            Problem::Unreadable(e) | Problem::Unverified(e) => f.write_str(e),
        }
    }
}

/// The init container names the meshes' injectors use.
const MESH_INIT_NAMES: [&str; 6] =
    ["istio-init", "istio-validation", "linkerd-init", "kuma-init", "kuma-validation", "osm-init"];

/// The name a program is run under (`/usr/bin/kumactl` → `kumactl`).
pub fn program_name(argv0: &str) -> &str {
    argv0.rsplit('/').next().unwrap_or(argv0)
}

/// Whether one of the readers takes this init container.
fn reads(c: &InitContainer) -> bool {
    let argv = c.argv();
    istio::tool_args(&argv).is_some()
        || linkerd::tool_args(c, &argv).is_some()
        || kuma::tool_args(&argv).is_some()
        || osm::tool_args(&argv).is_some()
        || MESH_INIT_NAMES.contains(&c.name.as_str())
}

/// Whether `argv` runs redirector's gate (`redirector wait-ready …`).
pub fn is_gate(argv: &[String]) -> bool {
    matches!(argv, [first, sub, ..] if program_name(first) == "redirector" && sub == "wait-ready")
}

impl Decision {
    /// Whether the agent programs the pod (its namespace is looked for).
    pub fn programmed(&self) -> bool {
        matches!(self, Decision::Injected { .. } | Decision::Settings { .. })
    }
}

/// Whether the agent programs `pod` (see [`decide`]).
pub fn is_programmed(pod: &PodInfo, rules: &[MeshedWhen]) -> bool {
    decide(pod, rules).programmed()
}

pub fn decide(pod: &PodInfo, rules: &[MeshedWhen]) -> Decision {
    let istio_says = |key: &str| pod.annotations.get(key).or_else(|| pod.labels.get(key)).map(String::as_str);
    if istio_says("sidecar.istio.io/inject") == Some("false") {
        return Decision::NotMeshed { why: "sidecar.istio.io/inject is \"false\"".into() };
    }
    if pod.annotations.get("sidecar.istio.io/interceptionMode").map(String::as_str) == Some("NONE") {
        return Decision::NotMeshed { why: "sidecar.istio.io/interceptionMode is NONE (no interception)".into() };
    }
    // A pod the webhook switched: its recorded init container, checked.
    if let Some(gate) = pod.init_containers.iter().position(|c| is_gate(&c.argv())) {
        if pod.annotations.contains_key(gated::POLICY) || pod.annotations.contains_key(gated::INJECTED_INIT) {
            return gated::decide_gated(pod, gate, rules);
        }
    }
    // The mesh's own init container, or its validator after the gate,
    // says what the injector decided; the gate alone takes the settings.
    let gate = pod.init_containers.iter().find(|c| is_gate(&c.argv()));
    for c in &pod.init_containers {
        let argv = c.argv();
        let (tool, read): (&'static str, Option<Result<Reading>>) = if let Some(args) = istio::tool_args(&argv) {
            ("istio-iptables", Some(istio::read(c, args, &pod.ips)))
        } else if let Some(args) = linkerd::tool_args(c, &argv) {
            ("linkerd2-proxy-init", Some(linkerd::read(args)))
        } else if let Some((sub, args)) = kuma::tool_args(&argv) {
            ("kumactl", Some(kuma::read(c, sub, args, &pod.annotations)))
        } else if let Some(script) = osm::tool_args(&argv) {
            ("osm-init's iptables-restore", Some(osm::read(script)))
        } else if c.name == "linkerd-network-validator" || is_gate(&argv) {
            if is_gate(&argv) && pod.init_containers.iter().any(|o| o.name != c.name && !is_gate(&o.argv()) && reads(o))
            {
                // A mesh tool's container after the gate: read that one.
                continue;
            }
            let why = match gate {
                Some(g) => format!("init container {} is the redirector gate", g.name),
                None => "Linkerd CNI mode (linkerd-network-validator): the policy from the mesh settings and \
                         annotations"
                    .into(),
            };
            return Decision::Settings { why };
        } else if MESH_INIT_NAMES.contains(&c.name.as_str()) {
            ("?", None)
        } else {
            continue;
        };
        return match read {
            Some(Ok(reading)) if reading.refused.is_empty() => {
                Decision::Injected { container: c.name.clone(), tool, reading: Box::new(reading), gate: None }
            }
            Some(Ok(reading)) => {
                Decision::Refused { container: c.name.clone(), tool, problem: Problem::Settings(reading.refused) }
            }
            Some(Err(e)) => Decision::Refused {
                container: c.name.clone(),
                tool,
                problem: Problem::Unreadable(format!("its {tool} command line does not parse: {e:#}")),
            },
            None if argv.is_empty() => Decision::Refused {
                container: c.name.clone(),
                tool: "an unknown tool",
                problem: Problem::Unreadable(format!(
                    "it has neither command nor args: what its image ({}) runs is not in the pod spec",
                    c.image
                )),
            },
            None => Decision::Refused {
                container: c.name.clone(),
                tool: "an unknown tool",
                problem: Problem::Unreadable(format!(
                    "it runs {argv:?}, not a mesh tool's command line redirector reads (a user's own init container?)"
                )),
            },
        };
    }
    // Kuma's CNI mode: no init container; the CNI plugin programs the pod
    // from the transparent-proxy config annotation the injector wrote.
    if pod.annotations.get("kuma.io/sidecar-injected").map(String::as_str) == Some("true") {
        if let Some(cfg) = pod.annotations.get("traffic.kuma.io/transparent-proxy-config") {
            let container = "(Kuma CNI)".to_string();
            return match kuma::read_cni(cfg) {
                Ok(reading) if reading.refused.is_empty() => {
                    Decision::Injected { container, tool: "kuma-cni", reading: Box::new(reading), gate: None }
                }
                Ok(reading) => {
                    Decision::Refused { container, tool: "kuma-cni", problem: Problem::Settings(reading.refused) }
                }
                Err(e) => {
                    Decision::Refused { container, tool: "kuma-cni", problem: Problem::Unreadable(format!("{e:#}")) }
                }
            };
        }
    }
    if let Some(r) = rules.iter().find(|r| r.matches(pod)) {
        return Decision::Settings { why: format!("--meshed-when {r}") };
    }
    Decision::NotMeshed {
        why: "no mesh init container (istio-init, linkerd-init, kuma-init, osm-init or a validator), no redirector \
              gate and no --meshed-when rule: not a sidecar workload"
            .into(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
