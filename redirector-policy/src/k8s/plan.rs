//! Policy for Kubernetes mode, pure: from the pods on the node, the mesh
//! settings, the network namespaces found so far and the cookies pinned in
//! the maps, to the workloads to program, the cookies that must be kept,
//! and the Events to publish. No I/O; unit-tested without a kernel.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    annotation_key_warnings, parse_annotations, IdMaps, MeshSettings, NetnsRef, WorkloadAnnotations, WorkloadSpec,
};

use crate::k8s::{
    injector::{decide, is_gate, meshwide::MeshWide, Decision, Problem},
    pods::{MeshedWhen, PodInfo},
};

/// What the planner remembers between passes.
#[derive(Debug, Default)]
pub struct PlanState {
    /// Each pod's last settings that read (by UID): a pod whose new
    /// annotations are bad keeps them (the mesh settings too, where they
    /// come with the pod's: [`MeshWide`]).
    last_good: BTreeMap<String, (Option<MeshSettings>, WorkloadAnnotations)>,
    /// The error last reported for a pod, so an Event is published once
    /// per distinct problem, not on every pass.
    reported: BTreeMap<String, String>,
    /// Running meshed pods whose namespace is not known: since when.
    unresolved_since: BTreeMap<String, Instant>,
    /// Those of them reported as never found (once each).
    not_found_reported: BTreeSet<String>,
    /// The annotation-key warnings last published for a pod (likewise).
    warned: BTreeMap<String, String>,
    /// The injector-setting notes last published for a pod (likewise).
    noted: BTreeMap<String, String>,
}

impl PlanState {
    /// Whether the pod (by UID) has a problem the planner reported (a bad
    /// annotation, host network) that still lasts: its Event is kept
    /// fresh while this holds.
    pub fn has_problem(&self, uid: &str) -> bool {
        self.reported.contains_key(uid)
    }
}

/// Severity of an [`PodEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

/// An Event to publish on a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEvent {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub kind: EventKind,
    /// PascalCase, e.g. `InvalidAnnotation`.
    pub reason: &'static str,
    pub message: String,
}

/// The outcome of one planning pass.
#[derive(Debug, Default)]
pub struct Plan {
    /// Meshed pods with a known network namespace, with the annotations to
    /// apply (current, last good, or none).
    pub workloads: Vec<WorkloadSpec>,
    /// `namespace/name` → UID of every workload above.
    pub uids: BTreeMap<String, String>,
    /// Meshed, running pods whose namespace is not known yet.
    pub unresolved: Vec<String>,
    /// Those of them unresolved for longer than the grace period: they no
    /// longer hold the sweep back (and were reported).
    pub not_found: Vec<String>,
    /// Pinned cookies that must not be removed this pass. While a running
    /// meshed pod's namespace is unknown (e.g. right after an agent
    /// restart), its cookie cannot be told from a stale one, so nothing is
    /// swept until every such pod is found, or has been looked for longer
    /// than [`Inputs::unresolved_grace`] (a pod of a sandboxed runtime,
    /// Kata Containers or gVisor, is never found in the node's /proc).
    pub keep: BTreeSet<u64>,
    pub events: Vec<PodEvent>,
    /// Pods the agent will not program, with why (host network).
    pub skipped: Vec<(String, String)>,
}

/// Inputs of [`plan`].
pub struct Inputs<'a> {
    pub pods: &'a BTreeMap<String, PodInfo>,
    pub mesh: &'a MeshSettings,
    /// The mesh's own mesh-wide settings (Istio's injector values,
    /// Linkerd's `linkerd-config`), for sidecar workloads whose init
    /// container carries none; used when its preset is `mesh`'s.
    pub mesh_wide: Option<&'a MeshWide>,
    pub rules: &'a [MeshedWhen],
    /// Pod UID → its network namespace (as a path valid while the agent
    /// holds it) and cookie.
    pub netns: &'a BTreeMap<String, (PathBuf, u64)>,
    /// Cookies currently in the workloads map.
    pub pinned: &'a BTreeSet<u64>,
    /// Pod UID → the cgroup of its running proxy container, for pods whose
    /// proxy is identified by cgroup; the others are identified by UID.
    pub proxy_cgroups: &'a BTreeMap<String, PathBuf>,
    /// Pod UID → the ID maps of its user namespace, for pods not in the
    /// agent's (`hostUsers: false`).
    pub id_maps: &'a BTreeMap<String, IdMaps>,
    /// Pod UID → its nameservers (its resolv.conf's, read when its
    /// namespace was found).
    pub nameservers: &'a BTreeMap<String, Vec<std::net::IpAddr>>,
    pub now: Instant,
    /// How long a running meshed pod whose namespace is not found holds
    /// the sweep back (`--unresolved-grace`).
    pub unresolved_grace: Duration,
}

pub fn plan(inp: &Inputs<'_>, state: &mut PlanState) -> Plan {
    let mut out = Plan::default();
    let mut seen = BTreeSet::new();
    // A running meshed pod whose namespace is unknown, within its grace.
    let mut holding = false;
    // A mesh tool's settings with redirector's own, which no mesh tool has.
    let with_ours = |mut m: MeshSettings| {
        m.acceleration = inp.mesh.acceleration;
        m
    };
    for pod in inp.pods.values() {
        if !pod.is_live() {
            continue;
        }
        let decision = decide(pod, inp.rules);
        if let Decision::NotMeshed { .. } = decision {
            continue;
        }
        seen.insert(pod.uid.clone());
        let event = |kind, reason, message: String| PodEvent {
            uid: pod.uid.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            kind,
            reason,
            message,
        };
        if pod.host_network {
            let why = "the pod uses the node's network namespace (hostNetwork: true); \
                       redirecting it would redirect the node: not programmed"
                .to_string();
            if newly(&mut state.reported, &pod.uid, &why) {
                out.events.push(event(EventKind::Warning, "HostNetworkNotRedirected", why.clone()));
            }
            out.skipped.push((pod.key(), why));
            continue;
        }
        // Keys the preset ignores although they look meant for it (a
        // misspelling, another mesh's key): a Warning Event, once per
        // distinct set; they change nothing.
        let warnings = annotation_key_warnings(inp.mesh.preset, pod.annotations.keys().map(String::as_str));
        if warnings.is_empty() {
            state.warned.remove(&pod.uid);
        } else {
            let message = warnings.iter().map(|w| w.message.as_str()).collect::<Vec<_>>().join("; ");
            if newly(&mut state.warned, &pod.uid, &message) {
                out.events.push(event(EventKind::Warning, "MisspeltAnnotation", message.clone()));
            }
        }
        // What its mesh's init container asks for, or the mesh settings
        // and its annotations.
        let (mesh, parsed) = match decision {
            Decision::Refused { container, tool, problem } => {
                // A gate whose record does not check out holds the pod;
                // otherwise its mesh's own init container redirects it.
                let (reason, consequence) = match problem {
                    Problem::Unverified(_) => ("RecordedPolicyRefused", "its gate keeps its containers from starting"),
                    _ => ("InjectorSettingRefused", "its iptables init container keeps redirecting it"),
                };
                let why = format!(
                    "init container {container} ({tool}): {problem}; redirector does not program this pod: \
                     {consequence}"
                );
                if newly(&mut state.reported, &pod.uid, &why) {
                    out.events.push(event(EventKind::Warning, reason, why.clone()));
                }
                out.skipped.push((pod.key(), why));
                continue;
            }
            Decision::Injected { reading, container, tool, gate } => {
                let mesh = with_ours(reading.mesh);
                if !reading.notes.is_empty() {
                    let via = gate.map(|g| format!(", replaced by the gate {g}")).unwrap_or_default();
                    let message = format!("init container {container} ({tool}{via}): {}", reading.notes.join("; "));
                    if newly(&mut state.noted, &pod.uid, &message) {
                        out.events.push(event(EventKind::Warning, "InjectorSettingSkipped", message.clone()));
                    }
                }
                state.reported.remove(&pod.uid);
                (Some(mesh), Ok(reading.annotations))
            }
            Decision::Settings { .. } => match inp.mesh_wide.filter(|w| w.preset() == inp.mesh.preset) {
                None => (None, parse_annotations(inp.mesh.preset, &pod.annotations)),
                // The init container the mesh's injector would write now,
                // from its settings and the pod's annotations.
                Some(wide) => match wide.read(pod) {
                    Ok(reading) if reading.refused.is_empty() => {
                        let mesh = with_ours(reading.mesh);
                        if !reading.notes.is_empty() {
                            let message = format!("{}: {}", wide.named(), reading.notes.join("; "));
                            if newly(&mut state.noted, &pod.uid, &message) {
                                out.events.push(event(EventKind::Warning, "InjectorSettingSkipped", message.clone()));
                            }
                        }
                        (Some(mesh), Ok(reading.annotations))
                    }
                    Ok(reading) => {
                        let consequence = if pod.init_containers.iter().any(|c| is_gate(&c.argv())) {
                            "its gate keeps its containers from starting"
                        } else {
                            "it is not redirected"
                        };
                        let refused = reading.refused.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                        let why = format!(
                            "the mesh's settings ({}) with the pod's annotations ask for {refused}; redirector does \
                             not program this pod: {consequence}",
                            wide.named()
                        );
                        if newly(&mut state.reported, &pod.uid, &why) {
                            out.events.push(event(EventKind::Warning, "InjectorSettingRefused", why.clone()));
                        }
                        out.skipped.push((pod.key(), why));
                        continue;
                    }
                    Err(e) => {
                        // Read without the pod's annotations: if that reads,
                        // they are the problem (the last good policy stays);
                        // if not, the pod cannot be read with these settings.
                        let bare = PodInfo { annotations: BTreeMap::new(), ..pod.clone() };
                        match wide.read(&bare) {
                            Ok(r) if r.refused.is_empty() => {
                                (Some(with_ours(r.mesh)), Err(e.context(format!("read with {}", wide.named()))))
                            }
                            _ => {
                                let why = format!("{e:#}; redirector does not program this pod");
                                if newly(&mut state.reported, &pod.uid, &why) {
                                    out.events.push(event(EventKind::Warning, "InjectorSettingRefused", why.clone()));
                                }
                                out.skipped.push((pod.key(), why));
                                continue;
                            }
                        }
                    }
                },
            },
            Decision::NotMeshed { .. } => unreachable!("skipped above"),
        };
        let (mesh, annotations) = match parsed {
            Ok(a) => {
                state.last_good.insert(pod.uid.clone(), (mesh.clone(), a.clone()));
                state.reported.remove(&pod.uid);
                (mesh, a)
            }
            Err(e) => {
                let kept = state.last_good.get(&pod.uid).cloned();
                let message = format!(
                    "{e:#}; keeping {}",
                    if kept.is_some() { "the pod's last good policy" } else { "the mesh-wide policy" }
                );
                if newly(&mut state.reported, &pod.uid, &message) {
                    out.events.push(event(EventKind::Warning, "InvalidAnnotation", message.clone()));
                }
                kept.unwrap_or((mesh, WorkloadAnnotations::default()))
            }
        };
        match inp.netns.get(&pod.uid) {
            Some((path, _)) => {
                out.uids.insert(pod.key(), pod.uid.clone());
                out.workloads.push(WorkloadSpec {
                    name: pod.key(),
                    netns: NetnsRef::Path(path.clone()),
                    proxy_cgroup: inp.proxy_cgroups.get(&pod.uid).cloned(),
                    id_maps: inp.id_maps.get(&pod.uid).cloned(),
                    nameservers: inp.nameservers.get(&pod.uid).cloned(),
                    annotations,
                    mesh,
                })
            }
            None if pod.phase == "Running" => {
                out.unresolved.push(pod.key());
                let since = *state.unresolved_since.entry(pod.uid.clone()).or_insert(inp.now);
                if inp.now.saturating_duration_since(since) < inp.unresolved_grace {
                    holding = true;
                } else {
                    out.not_found.push(pod.key());
                    if state.not_found_reported.insert(pod.uid.clone()) {
                        out.events.push(event(EventKind::Warning, "NetworkNamespaceNotFound", not_found(pod, inp)));
                    }
                }
            }
            // Pending: its sandbox may not exist yet; its init container
            // registers it.
            None => {}
        }
    }
    state.last_good.retain(|uid, _| seen.contains(uid));
    state.reported.retain(|uid, _| seen.contains(uid));
    // Found (or gone, or no longer running): looked for afresh if lost again.
    let unresolved: BTreeSet<&String> =
        inp.pods.values().filter(|p| out.unresolved.contains(&p.key())).map(|p| &p.uid).collect();
    state.unresolved_since.retain(|uid, _| unresolved.contains(uid));
    state.not_found_reported.retain(|uid| unresolved.contains(uid));
    state.warned.retain(|uid, _| seen.contains(uid));
    state.noted.retain(|uid, _| seen.contains(uid));
    if holding {
        out.keep = inp.pinned.clone();
    }
    out
}

/// Records `message` as the one last said about pod `uid`; true when it
/// differs from that (its Event is published once per distinct message).
fn newly(said: &mut BTreeMap<String, String>, uid: &str, message: &str) -> bool {
    if said.get(uid).map(String::as_str) == Some(message) {
        return false;
    }
    said.insert(uid.to_string(), message.to_string());
    true
}

/// The message of a pod never found in /proc.
fn not_found(pod: &PodInfo, inp: &Inputs<'_>) -> String {
    let runtime = pod.runtime_class.as_ref().map(|c| format!(" (runtimeClassName {c})")).unwrap_or_default();
    format!(
        "no process of the pod's containers was found on this node for {:?}{runtime}: its network namespace is \
         unknown, so it is not redirected; it no longer holds back the removal of other pods' stale entries. A pod \
         of a sandboxed runtime (Kata Containers, gVisor) runs in a VM or a user-space kernel where the node's \
         programs cannot redirect it",
        inp.unresolved_grace
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compile, diff, Desired};

    fn pod(name: &str, annotations: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            uid: format!("uid-{name}"),
            namespace: "shop".into(),
            name: name.into(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            labels: [("osm-proxy-uuid".to_string(), "x".to_string())].into(),
            containers: vec!["app".into(), "envoy".into()],
            host_network: false,
            runtime_class: None,
            phase: "Running".into(),
            running: BTreeMap::new(),
            container_ids: BTreeSet::new(),
            ..Default::default()
        }
    }

    fn pods(list: Vec<PodInfo>) -> BTreeMap<String, PodInfo> {
        list.into_iter().map(|p| (p.uid.clone(), p)).collect()
    }

    fn netns(uids: &[(&str, u64)]) -> BTreeMap<String, (PathBuf, u64)> {
        uids.iter().map(|(u, c)| (u.to_string(), (PathBuf::from(format!("/proc/self/fd/{c}")), *c))).collect()
    }

    /// What the agent would program: the plan's workloads with the
    /// cookies of their namespaces, compiled against the mesh.
    fn desired(p: &Plan, mesh: &MeshSettings, ns: &BTreeMap<String, (PathBuf, u64)>) -> Vec<Desired> {
        p.workloads
            .iter()
            .map(|w| {
                let (path, cookie) = ns[&p.uids[&w.name]].clone();
                Desired { name: w.name.clone(), cookie, netns: path, policy: compile(mesh, &w.annotations) }
            })
            .collect()
    }

    const PORTS: &str = "openservicemesh.io/outbound-port-exclusion-list";
    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn meshed_pods_with_a_namespace_are_programmed() {
        let mesh = MeshSettings::default();
        let rules: Vec<MeshedWhen> = vec!["label:osm-proxy-uuid".parse().unwrap()];
        let mut plain = pod("plain", &[]);
        plain.labels.clear();
        plain.containers = vec!["app".into()];
        let mut done = pod("done", &[]);
        done.phase = "Succeeded".into();
        let mut pending = pod("pending", &[]);
        pending.phase = "Pending".into();
        let all = pods(vec![pod("web", &[(PORTS, "6379")]), plain, done, pending]);
        let ns = netns(&[("uid-web", 11), ("uid-plain", 12), ("uid-done", 13)]);
        let mut st = PlanState::default();
        let p = plan(
            &Inputs {
                pods: &all,
                mesh: &mesh,
                mesh_wide: None,
                rules: &rules,
                netns: &ns,
                pinned: &BTreeSet::new(),
                proxy_cgroups: &BTreeMap::new(),
                id_maps: &BTreeMap::new(),
                nameservers: &BTreeMap::new(),
                now: Instant::now(),
                unresolved_grace: GRACE,
            },
            &mut st,
        );
        assert_eq!(p.workloads.len(), 1);
        assert_eq!(p.workloads[0].name, "shop/web");
        assert_eq!(p.workloads[0].annotations.outbound_port_exclusion, vec![6379]);
        assert!(p.unresolved.is_empty(), "a pending pod is waited for, not blocking");
        assert!(p.events.is_empty());
    }

    /// A misspelt annotation key is a Warning Event naming it and the
    /// closest valid key, once per distinct set of such keys; the pod is
    /// programmed with its other annotations.
    #[test]
    fn misspelt_annotation_key_is_an_event_once() {
        let mesh = MeshSettings::default();
        let rules: Vec<MeshedWhen> = vec!["label:osm-proxy-uuid".parse().unwrap()];
        let ns = netns(&[("uid-web", 11)]);
        let pinned = BTreeSet::new();
        let mut st = PlanState::default();
        let run = |annotations: &[(&str, &str)], st: &mut PlanState| {
            let all = pods(vec![pod("web", annotations)]);
            plan(
                &Inputs {
                    pods: &all,
                    mesh: &mesh,
                    mesh_wide: None,
                    rules: &rules,
                    netns: &ns,
                    pinned: &pinned,
                    proxy_cgroups: &BTreeMap::new(),
                    id_maps: &BTreeMap::new(),
                    nameservers: &BTreeMap::new(),
                    now: Instant::now(),
                    unresolved_grace: GRACE,
                },
                st,
            )
        };
        let typo = "openservicemesh.io/outbound-port-exclusion-lists";
        let p = run(&[(typo, "6379"), (PORTS, "80")], &mut st);
        assert_eq!(p.workloads[0].annotations.outbound_port_exclusion, vec![80]);
        assert_eq!(p.events.len(), 1, "{:?}", p.events);
        let ev = &p.events[0];
        assert_eq!((ev.kind, ev.reason), (EventKind::Warning, "MisspeltAnnotation"));
        assert!(ev.message.contains(typo) && ev.message.contains(&format!("`{PORTS}`")), "{}", ev.message);
        assert!(run(&[(typo, "6379"), (PORTS, "80")], &mut st).events.is_empty(), "published once");
        assert!(run(&[(PORTS, "80")], &mut st).events.is_empty());
        assert_eq!(run(&[(typo, "1")], &mut st).events.len(), 1, "again after it was fixed and came back");
    }

    #[test]
    fn bad_annotation_keeps_last_good_and_reports_once() {
        let mesh = MeshSettings::default();
        let rules: Vec<MeshedWhen> = vec!["label:osm-proxy-uuid".parse().unwrap()];
        let ns = netns(&[("uid-web", 11)]);
        let pinned = BTreeSet::new();
        let mut st = PlanState::default();
        let run = |annotations: &[(&str, &str)], st: &mut PlanState| {
            let all = pods(vec![pod("web", annotations)]);
            plan(
                &Inputs {
                    pods: &all,
                    mesh: &mesh,
                    mesh_wide: None,
                    rules: &rules,
                    netns: &ns,
                    pinned: &pinned,
                    proxy_cgroups: &BTreeMap::new(),
                    id_maps: &BTreeMap::new(),
                    nameservers: &BTreeMap::new(),
                    now: Instant::now(),
                    unresolved_grace: GRACE,
                },
                st,
            )
        };
        let p = run(&[(PORTS, "6379")], &mut st);
        assert_eq!(p.workloads[0].annotations.outbound_port_exclusion, vec![6379]);
        let p = run(&[(PORTS, "6379,70000")], &mut st);
        assert_eq!(p.workloads[0].annotations.outbound_port_exclusion, vec![6379], "last good kept");
        assert_eq!(p.events.len(), 1);
        let e = &p.events[0];
        assert_eq!((e.kind, e.reason, e.name.as_str()), (EventKind::Warning, "InvalidAnnotation", "web"));
        assert!(e.message.contains(PORTS) && e.message.contains("70000"), "{}", e.message);
        assert!(e.message.contains("last good"), "{}", e.message);
        let p = run(&[(PORTS, "6379,70000")], &mut st);
        assert!(p.events.is_empty(), "the same problem is reported once");
        let p = run(&[(PORTS, "8080")], &mut st);
        assert_eq!(p.workloads[0].annotations.outbound_port_exclusion, vec![8080]);
        // A pod that never had good annotations gets the mesh policy.
        let mut fresh = PlanState::default();
        let p = run(&[(PORTS, "x")], &mut fresh);
        assert_eq!(p.workloads[0].annotations, WorkloadAnnotations::default());
        assert!(p.events[0].message.contains("mesh-wide policy"));
    }

    #[test]
    fn host_network_pods_are_skipped_with_an_event() {
        let mesh = MeshSettings::default();
        let rules: Vec<MeshedWhen> = vec!["label:osm-proxy-uuid".parse().unwrap()];
        let mut h = pod("node-agent", &[]);
        h.host_network = true;
        let all = pods(vec![h]);
        let ns = netns(&[("uid-node-agent", 1)]);
        let mut st = PlanState::default();
        let p = plan(
            &Inputs {
                pods: &all,
                mesh: &mesh,
                mesh_wide: None,
                rules: &rules,
                netns: &ns,
                pinned: &BTreeSet::new(),
                proxy_cgroups: &BTreeMap::new(),
                id_maps: &BTreeMap::new(),
                nameservers: &BTreeMap::new(),
                now: Instant::now(),
                unresolved_grace: GRACE,
            },
            &mut st,
        );
        assert!(p.workloads.is_empty());
        assert_eq!(p.events[0].reason, "HostNetworkNotRedirected");
        assert_eq!(p.skipped.len(), 1);
    }

    /// pods + mesh + pinned state → map operations, end to end through the
    /// data plane's pure diff.
    #[test]
    fn restart_reconcile_marks_and_sweeps() {
        let mesh = MeshSettings::default();
        let rules: Vec<MeshedWhen> = vec!["label:osm-proxy-uuid".parse().unwrap()];
        let all = pods(vec![pod("web", &[]), pod("api", &[(PORTS, "9000")])]);
        // After a restart: cookies 11 and 12 are live pods, 99 a pod deleted
        // while no agent ran.
        let pinned: BTreeSet<u64> = [11, 12, 99].into();
        let programmed = std::collections::HashMap::<u64, crate::Policy>::new();
        let mut st = PlanState::default();

        // Only one pod's namespace found so far: nothing may be swept.
        let ns = netns(&[("uid-web", 11)]);
        let p = plan(
            &Inputs {
                pods: &all,
                mesh: &mesh,
                mesh_wide: None,
                rules: &rules,
                netns: &ns,
                pinned: &pinned,
                proxy_cgroups: &BTreeMap::new(),
                id_maps: &BTreeMap::new(),
                nameservers: &BTreeMap::new(),
                now: Instant::now(),
                unresolved_grace: GRACE,
            },
            &mut st,
        );
        assert_eq!(p.unresolved, vec!["shop/api"]);
        let d = desired(&p, &mesh, &ns);
        let ops = diff(&pinned, &programmed, &BTreeSet::new(), &d, &p.keep);
        assert!(ops.remove.is_empty(), "{ops:?}");
        assert_eq!(ops.program, vec![0]);

        // Both found: the stale cookie goes, both pods are (re)written.
        let ns = netns(&[("uid-web", 11), ("uid-api", 12)]);
        let p = plan(
            &Inputs {
                pods: &all,
                mesh: &mesh,
                mesh_wide: None,
                rules: &rules,
                netns: &ns,
                pinned: &pinned,
                proxy_cgroups: &BTreeMap::new(),
                id_maps: &BTreeMap::new(),
                nameservers: &BTreeMap::new(),
                now: Instant::now(),
                unresolved_grace: GRACE,
            },
            &mut st,
        );
        let d = desired(&p, &mesh, &ns);
        let ops = diff(&pinned, &programmed, &BTreeSet::new(), &d, &p.keep);
        assert_eq!(ops.remove, vec![99]);
        assert_eq!(ops.program.len(), 2);

        // Unchanged policy already programmed: nothing to write.
        let programmed = d.iter().map(|x| (x.cookie, x.policy.clone())).collect();
        let pinned: BTreeSet<u64> = [11, 12].into();
        let linked: BTreeSet<u64> = [11, 12].into();
        let ops = diff(&pinned, &programmed, &linked, &d, &p.keep);
        assert!(ops.program.is_empty() && ops.remove.is_empty());
        assert_eq!(ops.unchanged.len(), 2);
        // Inbound capture missing for one: that one is rewritten (and its
        // sk_lookup link attached).
        let ops = diff(&pinned, &programmed, &[11].into(), &d, &p.keep);
        assert_eq!(ops.program.len(), 1);

        // A pod deleted: its cookie is removed.
        let all = pods(vec![pod("web", &[])]);
        let p = plan(
            &Inputs {
                pods: &all,
                mesh: &mesh,
                mesh_wide: None,
                rules: &rules,
                netns: &ns,
                pinned: &pinned,
                proxy_cgroups: &BTreeMap::new(),
                id_maps: &BTreeMap::new(),
                nameservers: &BTreeMap::new(),
                now: Instant::now(),
                unresolved_grace: GRACE,
            },
            &mut st,
        );
        let d = desired(&p, &mesh, &ns);
        let ops = diff(&pinned, &programmed, &linked, &d, &p.keep);
        assert_eq!(ops.remove, vec![12]);
    }

    /// A pod whose proxy cgroup is known is identified by it; the others
    /// keep the UID.
    #[test]
    fn proxy_cgroup_only_where_found() {
        let mesh = MeshSettings::default();
        let rules: Vec<MeshedWhen> = vec!["label:osm-proxy-uuid".parse().unwrap()];
        let all = pods(vec![pod("web", &[]), pod("db", &[])]);
        let ns = netns(&[("uid-web", 11), ("uid-db", 12)]);
        let cg: BTreeMap<String, PathBuf> =
            [("uid-web".to_string(), PathBuf::from("/sys/fs/cgroup/kubepods/podx/ab"))].into();
        let mut st = PlanState::default();
        let p = plan(
            &Inputs {
                pods: &all,
                mesh: &mesh,
                mesh_wide: None,
                rules: &rules,
                netns: &ns,
                pinned: &BTreeSet::new(),
                proxy_cgroups: &cg,
                id_maps: &BTreeMap::new(),
                nameservers: &BTreeMap::new(),
                now: Instant::now(),
                unresolved_grace: GRACE,
            },
            &mut st,
        );
        let by_name: BTreeMap<&str, Option<&PathBuf>> =
            p.workloads.iter().map(|w| (w.name.as_str(), w.proxy_cgroup.as_ref())).collect();
        assert_eq!(by_name["shop/web"], Some(&cg["uid-web"]));
        assert_eq!(by_name["shop/db"], None);
    }

    /// A running meshed pod whose namespace is never found (Kata, gVisor)
    /// holds the sweep back for the grace period only; then it is reported
    /// once and stale entries go. Another pod still within its grace keeps
    /// holding; a pod found and lost again gets a new grace period.
    #[test]
    fn unfound_pods_hold_the_sweep_for_the_grace_only() {
        let mesh = MeshSettings::default();
        let rules: Vec<MeshedWhen> = vec!["label:osm-proxy-uuid".parse().unwrap()];
        let mut kata = pod("kata", &[]);
        kata.runtime_class = Some("kata-qemu".into());
        let all = pods(vec![pod("web", &[]), kata]);
        let pinned: BTreeSet<u64> = [11, 99].into();
        let t0 = Instant::now();
        let mut st = PlanState::default();
        let mut run = |ns: &BTreeMap<String, (PathBuf, u64)>, all: &BTreeMap<String, PodInfo>, at: u64| {
            plan(
                &Inputs {
                    pods: all,
                    mesh: &mesh,
                    mesh_wide: None,
                    rules: &rules,
                    netns: ns,
                    pinned: &pinned,
                    proxy_cgroups: &BTreeMap::new(),
                    id_maps: &BTreeMap::new(),
                    nameservers: &BTreeMap::new(),
                    now: t0 + Duration::from_secs(at),
                    unresolved_grace: GRACE,
                },
                &mut st,
            )
        };
        let web_only = netns(&[("uid-web", 11)]);
        for at in [0, 59] {
            let p = run(&web_only, &all, at);
            assert_eq!((p.unresolved.clone(), p.not_found.clone()), (vec!["shop/kata".to_string()], vec![]), "{at}");
            assert_eq!(p.keep, pinned, "within the grace nothing is swept ({at} s)");
            assert!(p.events.is_empty());
        }
        let p = run(&web_only, &all, 60);
        assert_eq!(p.not_found, vec!["shop/kata"]);
        assert!(p.keep.is_empty(), "{:?}", p.keep);
        assert_eq!(p.events.len(), 1, "{:?}", p.events);
        let e = &p.events[0];
        assert_eq!((e.kind, e.reason, e.name.as_str()), (EventKind::Warning, "NetworkNamespaceNotFound", "kata"));
        assert!(e.message.contains("runtimeClassName kata-qemu") && e.message.contains("60s"), "{}", e.message);
        let d = desired(&p, &mesh, &web_only);
        let ops = diff(&pinned, &std::collections::HashMap::<u64, crate::Policy>::new(), &BTreeSet::new(), &d, &p.keep);
        assert_eq!(ops.remove, vec![99], "the stale entry is swept past the grace");
        let p = run(&web_only, &all, 61);
        assert!(p.events.is_empty(), "reported once");
        assert!(p.keep.is_empty());

        // A second pod, within its grace, holds the sweep again.
        let mut more = all.clone();
        let late = pod("late", &[]);
        more.insert(late.uid.clone(), late);
        let p = run(&web_only, &more, 70);
        assert_eq!(p.not_found, vec!["shop/kata"]);
        assert_eq!(p.keep, pinned);

        // Found, then lost again: a new grace period, reported anew.
        let both = netns(&[("uid-web", 11), ("uid-kata", 12)]);
        assert!(run(&both, &all, 80).unresolved.is_empty());
        let p = run(&web_only, &all, 81);
        assert!(p.not_found.is_empty() && p.keep == pinned, "{p:?}");
        let p = run(&web_only, &all, 141);
        assert_eq!(p.events.len(), 1);
    }

    /// A pod in a user namespace of its own carries its ID maps to the
    /// workload; the others carry none (their IDs are the node's).
    #[test]
    fn id_maps_only_for_pods_in_a_user_namespace() {
        let mesh = MeshSettings::default();
        let rules: Vec<MeshedWhen> = vec!["label:osm-proxy-uuid".parse().unwrap()];
        let all = pods(vec![pod("web", &[]), pod("db", &[])]);
        let ns = netns(&[("uid-web", 11), ("uid-db", 12)]);
        let map = crate::IdMap::parse("0 524288 65536").unwrap();
        let maps: BTreeMap<String, IdMaps> = [("uid-db".to_string(), IdMaps { uid: map.clone(), gid: map })].into();
        let servers: BTreeMap<String, Vec<std::net::IpAddr>> =
            [("uid-web".to_string(), vec!["192.0.2.53".parse().unwrap()])].into();
        let p = plan(
            &Inputs {
                pods: &all,
                mesh: &mesh,
                mesh_wide: None,
                rules: &rules,
                netns: &ns,
                pinned: &BTreeSet::new(),
                proxy_cgroups: &BTreeMap::new(),
                id_maps: &maps,
                nameservers: &servers,
                now: Instant::now(),
                unresolved_grace: GRACE,
            },
            &mut PlanState::default(),
        );
        let by_name: BTreeMap<&str, Option<&IdMaps>> =
            p.workloads.iter().map(|w| (w.name.as_str(), w.id_maps.as_ref())).collect();
        assert_eq!(by_name["shop/db"], maps.get("uid-db"));
        assert_eq!(by_name["shop/web"], None);
        // The nameservers found with a pod's namespace go with it.
        let ns_of: BTreeMap<&str, Option<&Vec<std::net::IpAddr>>> =
            p.workloads.iter().map(|w| (w.name.as_str(), w.nameservers.as_ref())).collect();
        assert_eq!(ns_of["shop/web"], servers.get("uid-web"));
        assert_eq!(ns_of["shop/db"], None);
    }

    /// A pod `redirector webhook` switched is programmed with the policy
    /// of the init container it recorded (not the agent's mesh settings),
    /// once that checks out; a record that does not is a Warning Event
    /// naming both sides, and the pod is not programmed.
    #[test]
    fn gated_pods_are_programmed_from_their_checked_record() {
        use crate::k8s::injector::{
            gated::{policy_json, record, INJECTED_INIT, POLICY},
            InitContainer,
        };
        let istio_init = InitContainer {
            name: "istio-init".into(),
            args: ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-b", "*", "-d", "15020"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        };
        let mut before = pod("web", &[]);
        before.init_containers = vec![istio_init.clone()];
        let reading = match decide(&before, &[]) {
            Decision::Injected { reading, .. } => reading,
            other => panic!("{other:?}"),
        };
        let policy = policy_json(&compile(&reading.mesh, &reading.annotations));
        let gated = |policy: &serde_json::Value| {
            let mut p = pod("web", &[(POLICY, &policy.to_string()), (INJECTED_INIT, &record(&istio_init))]);
            p.labels.clear();
            p.init_containers = vec![InitContainer {
                name: "redirector-init".into(),
                command: ["redirector", "wait-ready"].map(String::from).to_vec(),
                ..Default::default()
            }];
            p
        };
        let mesh = MeshSettings::default();
        let ns = netns(&[("uid-web", 11)]);
        let run = |p: PodInfo, st: &mut PlanState| {
            plan(
                &Inputs {
                    pods: &pods(vec![p]),
                    mesh: &mesh,
                    mesh_wide: None,
                    rules: &[],
                    netns: &ns,
                    pinned: &BTreeSet::new(),
                    proxy_cgroups: &BTreeMap::new(),
                    id_maps: &BTreeMap::new(),
                    nameservers: &BTreeMap::new(),
                    now: Instant::now(),
                    unresolved_grace: GRACE,
                },
                st,
            )
        };
        let mut st = PlanState::default();
        let p = run(gated(&policy), &mut st);
        assert!(p.events.is_empty(), "{:?}", p.events);
        let w = &p.workloads[0];
        let programmed = compile(w.mesh.as_ref().expect("the recorded container's settings"), &w.annotations);
        assert_eq!(policy_json(&programmed), policy);
        assert_eq!(programmed.proxy_uid, 1337, "istio-init's -u, not the agent's OSM default");

        let mut forged = policy.clone();
        forged["inbound"] = false.into();
        let p = run(gated(&forged), &mut st);
        assert!(p.workloads.is_empty());
        let ev = &p.events[0];
        assert_eq!((ev.kind, ev.reason), (EventKind::Warning, "RecordedPolicyRefused"));
        assert!(
            ev.message.contains("inbound: recorded false, derived true")
                && ev.message.contains(POLICY)
                && ev.message.contains("istio-init")
                && ev.message.contains("its gate keeps its containers from starting"),
            "{}",
            ev.message
        );
        assert!(run(gated(&forged), &mut st).events.is_empty(), "published once");
    }

    /// A gated pod whose init container carries no settings takes the
    /// mesh's own (Istio's injector values) with its annotations, as the
    /// injector would write them; a change of them reaches it at once; a
    /// bad annotation keeps the last good policy; a setting redirector
    /// lacks refuses the pod, saying its gate holds it.
    #[test]
    fn gated_pods_take_the_meshs_own_settings_live() {
        use crate::k8s::injector::{meshwide::MeshWide, InitContainer};
        let mesh = MeshSettings::for_preset(crate::Preset::Istio);
        let ns = netns(&[("uid-web", 11)]);
        let pinned = BTreeSet::new();
        let gated = |annotations: &[(&str, &str)]| {
            let mut p = pod("web", annotations);
            p.labels.clear();
            p.init_containers = vec![InitContainer {
                name: "redirector-init".into(),
                command: ["redirector", "wait-ready"].map(String::from).to_vec(),
                ..Default::default()
            }];
            pods(vec![p])
        };
        let values = |excluded: &str| {
            MeshWide::istio(
                (
                    "istio-system/istio-sidecar-injector",
                    &serde_json::json!({"global": {"proxy": {"excludeOutboundPorts": excluded}}}).to_string(),
                ),
                None,
            )
            .unwrap()
        };
        let run = |all: &BTreeMap<String, PodInfo>, wide: Option<&MeshWide>, st: &mut PlanState| {
            plan(
                &Inputs {
                    pods: all,
                    mesh: &mesh,
                    mesh_wide: wide,
                    rules: &[],
                    netns: &ns,
                    pinned: &pinned,
                    proxy_cgroups: &BTreeMap::new(),
                    id_maps: &BTreeMap::new(),
                    nameservers: &BTreeMap::new(),
                    now: Instant::now(),
                    unresolved_grace: GRACE,
                },
                st,
            )
        };
        let mut st = PlanState::default();
        let excluded = |p: &Plan| p.workloads[0].mesh.as_ref().map(|m| m.outbound_port_exclusion.clone());
        let p = run(&gated(&[]), Some(&values("6379")), &mut st);
        assert_eq!(excluded(&p), Some(vec![6379]), "{p:?}");
        // Without the mesh's settings: the agent's, as before.
        assert_eq!(excluded(&run(&gated(&[]), None, &mut st)), None);
        // Changed: in force at the next pass, no restart.
        assert_eq!(excluded(&run(&gated(&[]), Some(&values("6379,3306")), &mut st)), Some(vec![6379, 3306]));
        // The pod's annotation replaces the value, as Istio's template does.
        let all = gated(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "5432")]);
        assert_eq!(excluded(&run(&all, Some(&values("6379")), &mut st)), Some(vec![5432]));
        // A bad annotation: an Event, the last good policy stays.
        let bad = gated(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "99999")]);
        let p = run(&bad, Some(&values("6379")), &mut st);
        assert_eq!(excluded(&p), Some(vec![5432]), "last good kept");
        assert!(p.events.iter().any(|e| e.reason == "InvalidAnnotation" && e.message.contains("99999")), "{p:?}");
        // Never good: the mesh's settings without the bad annotation.
        let p = run(&bad, Some(&values("6379")), &mut PlanState::default());
        assert_eq!(excluded(&p), Some(vec![6379]));
        // TPROXY asked for: refused, the gate holds the pod.
        let tproxy = gated(&[("sidecar.istio.io/interceptionMode", "TPROXY")]);
        let p = run(&tproxy, Some(&values("")), &mut st);
        assert!(p.workloads.is_empty(), "{p:?}");
        let ev = p.events.iter().find(|e| e.reason == "InjectorSettingRefused").expect("an Event");
        assert!(ev.message.contains("TPROXY") && ev.message.contains("its gate keeps"), "{}", ev.message);
        // Another mesh's settings are not used.
        let linkerd = MeshWide::linkerd(("linkerd/linkerd-config", "{}")).unwrap();
        assert_eq!(excluded(&run(&gated(&[]), Some(&linkerd), &mut st)), None);
        // Settings that never read good refuse every such pod.
        let broken = MeshWide::refusing(crate::Preset::Istio, "values: bad".into());
        let p = run(&gated(&[]), Some(&broken), &mut PlanState::default());
        assert!(p.workloads.is_empty() && p.events.iter().any(|e| e.message.contains("values: bad")), "{p:?}");
    }
}
