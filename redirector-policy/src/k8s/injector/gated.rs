//! A pod whose mesh's init container `redirector webhook` replaced by the
//! redirector gate: what the webhook records on it, and how the agent
//! checks that record against the pod's own spec before trusting it.
//!
//! The webhook writes two annotations: [`INJECTED_INIT`], the init
//! container it removed (name, image, command, args, literal `env`, the
//! downwardAPI files it mounted: what the readers take), and [`POLICY`],
//! the policy those readers derived from it ([`policy_json`], the object
//! `redirector check --pod --json` prints). Annotations can be written by
//! whoever creates the pod, so neither is believed on its own: the agent
//! puts the recorded container back in the gate's place, reads it with the
//! same readers as an unswitched pod, and programs the pod only if that
//! gives the recorded policy. A record that does not check out is refused
//! (the gate then keeps the pod's containers from starting) with a Warning
//! Event naming both sides.
use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::{decide, Decision, InitContainer, Problem, Reading};
use crate::{
    compile,
    k8s::pods::{MeshedWhen, PodInfo},
    Policy,
};

/// The policy the webhook derived, as [`policy_json`] writes it.
pub const POLICY: &str = "redirector.dev/policy";
/// The init container the webhook replaced ([`InitContainer`] as JSON).
pub const INJECTED_INIT: &str = "redirector.dev/injected-init";

/// What the gate's reason names as its tool.
pub const GATE_TOOL: &str = "the redirector gate";

/// The policy as `redirector check --pod --json` shows it and as the
/// webhook records it in [`POLICY`] (documented in docs/configuration.md;
/// keys are stable). The agent's own settings (`acceleration`) and what
/// it learns at run time (the proxy's cgroup, the pod's addresses) are not
/// in it.
pub fn policy_json(p: &Policy) -> Value {
    let ports = |s: &BTreeSet<u16>| s.iter().copied().collect::<Vec<_>>();
    let nets = |s: &BTreeSet<ipnet::IpNet>| {
        crate::written_ranges(s.iter().copied()).iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    json!({
        "proxy_uid": p.proxy_uid,
        "proxy_gid": p.proxy_gid,
        "outbound_port": p.outbound_port,
        "inbound_port": p.inbound_port,
        "inbound": p.inbound,
        "loopback": p.loopback.name(),
        "outbound_port_exclusions": ports(&p.outbound_port_exclusion),
        "outbound_port_inclusions": p.outbound_port_inclusion.as_ref().map(ports),
        "outbound_ip_range_exclusions": nets(&p.outbound_ip_range_exclusion),
        "outbound_ip_range_inclusions": p.outbound_ip_range_inclusion.as_ref().map(nets),
        "inbound_port_exclusions": ports(&p.inbound_port_exclusion),
        "inbound_port_inclusions": p.inbound_port_inclusion.as_ref().map(ports),
        "inbound_source_exclusions": nets(&p.inbound_source_exclusion),
    })
}

/// The [`INJECTED_INIT`] value for `c`.
pub fn record(c: &InitContainer) -> String {
    serde_json::to_string(c).expect("an InitContainer serializes")
}

/// The pod as it was admitted, before the gate replaced its mesh's init
/// container: the recorded container back at `gate` (the gate's index in
/// [`PodInfo::init_containers`]), and no addresses (the API server
/// assigns none before a pod is created).
pub fn as_admitted(pod: &PodInfo, gate: usize, original: InitContainer) -> PodInfo {
    let mut p = pod.clone();
    p.init_containers[gate] = original;
    p.ips.clear();
    p
}

/// Decides a pod whose init container `gate` runs the redirector gate.
pub(super) fn decide_gated(pod: &PodInfo, gate: usize, rules: &[MeshedWhen]) -> Decision {
    let name = pod.init_containers[gate].name.clone();
    let refused =
        |why: String| Decision::Refused { container: name.clone(), tool: GATE_TOOL, problem: Problem::Unverified(why) };
    match (pod.annotations.get(POLICY), pod.annotations.get(INJECTED_INIT)) {
        (None, None) => Decision::Settings { why: format!("init container {name} is the redirector gate") },
        (Some(_), None) => refused(format!(
            "annotation {POLICY} without {INJECTED_INIT}: the policy cannot be checked against the init container it \
             was read from"
        )),
        (None, Some(_)) => refused(format!(
            "annotation {INJECTED_INIT} without {POLICY}: the webhook records both; one alone was not written by it"
        )),
        (Some(policy), Some(init)) => match verify(pod, gate, policy, init, rules) {
            Ok((container, tool, reading)) => {
                Decision::Injected { container, tool, reading: Box::new(reading), gate: Some(name) }
            }
            Err(why) => refused(why),
        },
    }
}

/// The recorded init container's name, tool and reading (with the pod's
/// own addresses, as the tool reads them when the pod starts), if the
/// recorded policy is what the readers derive from it as admitted.
fn verify(
    pod: &PodInfo,
    gate: usize,
    policy: &str,
    init: &str,
    rules: &[MeshedWhen],
) -> Result<(String, &'static str, Reading), String> {
    let original: InitContainer = serde_json::from_str(init)
        .map_err(|e| format!("annotation {INJECTED_INIT} is not a recorded init container: {e}"))?;
    if super::is_gate(&original.argv()) {
        return Err(format!(
            "annotation {INJECTED_INIT} records the redirector gate itself, not a mesh's init container"
        ));
    }
    let recorded: Value =
        serde_json::from_str(policy).map_err(|e| format!("annotation {POLICY} is not a JSON policy: {e}"))?;
    let read = |p: &PodInfo| match decide(p, rules) {
        Decision::Injected { container, tool, reading, gate: None } if container == original.name => {
            Ok((container, tool, *reading))
        }
        other => Err(format!(
            "annotation {INJECTED_INIT} records init container {:?}, which does not give a policy: {}",
            original.name,
            describe(&other)
        )),
    };
    let mut admitted = as_admitted(pod, gate, original.clone());
    let (container, tool, reading) = read(&admitted)?;
    let derived = policy_json(&compile(&reading.mesh, &reading.annotations));
    if derived != recorded {
        return Err(format!(
            "annotation {POLICY} is not what init container {container} ({tool}) recorded in {INJECTED_INIT} asks for: \
             {}",
            differences(&recorded, &derived)
        ));
    }
    // Checked as admitted; programmed as the tool would program the
    // running pod (istio-iptables looks at the pod's first address).
    admitted.ips.clone_from(&pod.ips);
    let (container, tool, reading) = read(&admitted)?;
    Ok((container, tool, reading))
}

/// `key: recorded X, derived Y` for each key that differs.
fn differences(recorded: &Value, derived: &Value) -> String {
    let (Some(r), Some(d)) = (recorded.as_object(), derived.as_object()) else {
        return format!("recorded {recorded}, derived {derived}");
    };
    let keys: BTreeSet<&String> = r.keys().chain(d.keys()).collect();
    keys.into_iter()
        .filter(|k| r.get(*k) != d.get(*k))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or_else(|| "(absent)".to_string(), ToString::to_string);
            format!("{k}: recorded {}, derived {}", show(r.get(k)), show(d.get(k)))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe(d: &Decision) -> String {
    match d {
        Decision::Injected { container, tool, .. } => format!("the pod reads as {container} ({tool}) instead"),
        Decision::Settings { why } | Decision::NotMeshed { why } => why.clone(),
        Decision::Refused { container, tool, problem } => format!("{container} ({tool}): {problem}"),
    }
}
