//! One reconcile pass of the Kubernetes agent: the mesh settings from
//! their sources, each pod's namespace and proxy cgroup, the plan, then
//! the shared reconcile core; Events and gauges from its report.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Instant,
};

use log::{debug, error, info, warn};

use redirector_policy::{
    k8s::{
        injector::{is_programmed, meshwide::MeshWide},
        mesh::{ConfigMapSource, MeshSources, Source},
        plan::{plan, EventKind, Inputs},
        pods::{MeshedWhen, PodInfo},
    },
    IdMaps, MeshSettings, Preset,
};

use super::{
    discover,
    events::{action, mesh_source_ref, pod_ref},
    node, Agent, ProxyIdentity,
};
use crate::agent::reconcile::{log_report, reconcile, Wanted};

/// The log target of these records: the module path they had before the
/// agents moved under `agent/`, so `RUST_LOG` filters and log readers keep
/// working.
const LOG: &str = "redirector::k8s::agent";

/// The Event key of the mesh settings' problem.
const MESH_KEY: &str = "mesh";
/// The Event key of the problem of the mesh's own settings.
const MESH_WIDE_KEY: &str = "mesh-wide";

/// The Event keys of a pod's problems: its annotations (or host network)
/// and its programming.
fn plan_key(uid: &str) -> String {
    format!("pod/{uid}/plan")
}
fn apply_key(uid: &str) -> String {
    format!("pod/{uid}/apply")
}

impl Agent {
    /// The mesh settings' sources as last seen.
    pub(super) fn mesh_sources(&self) -> MeshSources {
        MeshSources {
            configmap: match &self.opts.configmap {
                None => ConfigMapSource::NotUsed,
                Some((ns, name)) => match self.configmap.items.get(name) {
                    Some(c) => ConfigMapSource::Present(format!("{ns}/{name}"), c.data.clone()),
                    None => ConfigMapSource::Missing(format!("{ns}/{name}")),
                },
            },
            meshconfig: self.opts.meshconfig.as_ref().and_then(|(ns, name)| {
                self.meshconfig.items.get(name).map(|o| (format!("{ns}/{name}"), o.data.clone()))
            }),
        }
    }

    /// The current mesh settings, publishing an Event when the sources
    /// became invalid (a missing ConfigMap or `mesh.yaml` included); the
    /// last good settings stay in force.
    pub(super) fn resolve_mesh(&mut self) -> Option<MeshSettings> {
        let sources = self.mesh_sources();
        match sources.resolve() {
            Ok(m) => {
                if self.mesh_error.take().is_some() {
                    info!(target: LOG, "mesh settings valid again");
                }
                if self.mesh.as_ref() != Some(&m) {
                    info!(
                        target: LOG,
                        "mesh settings: preset {}, proxy UID {}, outbound {}, inbound {}",
                        m.preset.name(),
                        m.proxy_uid,
                        m.outbound_port,
                        m.inbound_port
                    );
                }
                self.mesh = Some(m);
            }
            Err((source, e)) => {
                let text = format!("{e:#}");
                if self.mesh_error.as_deref() != Some(text.as_str()) {
                    self.rt.metrics.error("invalid_mesh_config");
                    let outcome = match &self.mesh {
                        Some(m) => format!(
                            "keeping the last good mesh settings (preset {}, proxy UID {}, outbound {}, inbound {})",
                            m.preset.name(),
                            m.proxy_uid,
                            m.outbound_port,
                            m.inbound_port
                        ),
                        None => "no pod is (re)programmed until they are valid".to_string(),
                    };
                    error!(target: LOG, "{text}; {outcome}");
                    let uid = match &source {
                        Source::ConfigMap(_) => self.configmap_uid.clone(),
                        Source::MeshConfig(_) => self.meshconfig.items.values().find_map(|o| o.uid.clone()),
                    };
                    let reference = mesh_source_ref(&source, &self.opts.meshconfig_version, uid);
                    self.events.publish(
                        MESH_KEY,
                        EventKind::Warning,
                        "InvalidMeshConfig",
                        action::READ_MESH_SETTINGS,
                        &format!("{text}; {outcome}"),
                        reference,
                    );
                    self.mesh_error = Some(text);
                }
            }
        }
        self.mesh.clone()
    }

    /// The mesh's own settings (Istio's injector values, Linkerd's
    /// `linkerd-config`) for pods whose init container carries none; the
    /// last good ones while the current ones are invalid or their
    /// ConfigMap was deleted (an Event on it, a WARN); None while they were
    /// never found (such pods take the agent's settings, said once).
    pub(super) fn resolve_mesh_wide(&mut self) -> Option<MeshWide> {
        let (preset, ns) = self.mesh_wide_on.clone()?;
        let seen = |i: usize| {
            self.mesh_wide_cms
                .get(i)
                .and_then(|(name, key, w)| w.items.get(name).map(|c| (format!("{ns}/{name}"), *key, c.clone())))
        };
        let first = self.mesh_wide_cms.first().map(|(n, k, _)| (format!("{ns}/{n}"), *k)).unwrap_or_default();
        let Some((vname, vkey, values)) = seen(0) else {
            if !self.mesh_wide_absent_logged {
                match &self.mesh_wide {
                    Some(w) => warn!(
                        target: LOG,
                        "ConfigMap {}: deleted; keeping the mesh's last good settings ({})",
                        first.0,
                        w.named()
                    ),
                    None => info!(
                        target: LOG,
                        "ConfigMap {}: not found (preset {}): pods whose init container carries no settings take the agent's mesh settings and their annotations",
                        first.0,
                        preset.name()
                    ),
                }
                self.mesh_wide_absent_logged = true;
            }
            return self.mesh_wide.clone();
        };
        self.mesh_wide_absent_logged = false;
        let read = match (&values.data, preset) {
            (None, _) => Err(anyhow::anyhow!("ConfigMap {vname}: key `{vkey}` is missing")),
            (Some(text), Preset::Istio) => {
                let mesh = seen(1);
                let mesh_text = mesh.as_ref().and_then(|(n, _, m)| m.data.as_deref().map(|t| (n.as_str(), t)));
                MeshWide::istio((&vname, text), mesh_text)
            }
            (Some(text), _) => MeshWide::linkerd((&vname, text)),
        };
        match read {
            Ok(w) => {
                if self.mesh_wide_error.take().is_some() {
                    info!(target: LOG, "{}: valid again", w.named());
                }
                if self.mesh_wide.as_ref() != Some(&w) {
                    info!(target: LOG, "the mesh's own settings read from {}", w.named());
                }
                self.mesh_wide = Some(w);
            }
            Err(e) => {
                let text = format!("{e:#}");
                if self.mesh_wide_error.as_deref() != Some(text.as_str()) {
                    self.rt.metrics.error("invalid_mesh_config");
                    let outcome = match &self.mesh_wide {
                        Some(w) => format!("keeping the last good settings read from {}", w.named()),
                        None => "pods whose init container carries no settings are not (re)programmed until they are \
                                 valid"
                            .to_string(),
                    };
                    error!(target: LOG, "{text}; {outcome}");
                    let reference = mesh_source_ref(&Source::ConfigMap(vname.clone()), "", values.uid.clone());
                    self.events.publish(
                        MESH_WIDE_KEY,
                        EventKind::Warning,
                        "InvalidMeshConfig",
                        action::READ_MESH_SETTINGS,
                        &format!("{text}; {outcome}"),
                        reference,
                    );
                    self.mesh_wide_error = Some(text);
                }
                // Never read good: such pods are not programmed from the
                // agent's settings in the meantime.
                if self.mesh_wide.is_none() {
                    return Some(MeshWide::refusing(preset, self.mesh_wide_error.clone().unwrap_or_default()));
                }
            }
        }
        self.mesh_wide.clone()
    }

    /// One reconcile pass. False if it could not run (no valid mesh
    /// settings yet).
    pub(super) fn pass(&mut self) -> bool {
        let Some(mesh) = self.resolve_mesh() else {
            let why = format!("mesh settings invalid: {}", self.mesh_error.clone().unwrap_or_default());
            self.rt.metrics.set_ready(Some(why));
            self.answer_waiters();
            // No plan ran: the pods' problems stand as last seen.
            self.tend_events(None);
            return false;
        };
        let rules = self.rules();
        self.find_namespaces(&rules);
        let netns: BTreeMap<String, (PathBuf, u64)> =
            self.netns.iter().map(|(uid, h)| (uid.clone(), (h.path(), h.cookie))).collect();
        let id_maps: BTreeMap<String, IdMaps> =
            self.netns.iter().filter_map(|(uid, h)| Some((uid.clone(), h.id_maps.clone()?))).collect();
        let nameservers: BTreeMap<String, Vec<std::net::IpAddr>> =
            self.netns.iter().filter_map(|(uid, h)| Some((uid.clone(), h.nameservers.clone().ok()?))).collect();
        let pinned: BTreeSet<u64> = match self.dp.maps.workloads() {
            Ok(w) => w.keys().copied().collect(),
            Err(e) => {
                self.rt.metrics.error("maps");
                error!(target: LOG, "reading the workloads map: {e:#}");
                return false;
            }
        };
        let proxy_cgroups = self.find_proxy_cgroups(&mesh, &rules);
        let mesh_wide = self.resolve_mesh_wide();
        let p = plan(
            &Inputs {
                pods: &self.pods.items,
                mesh: &mesh,
                mesh_wide: mesh_wide.as_ref(),
                rules: &rules,
                netns: &netns,
                pinned: &pinned,
                proxy_cgroups: &proxy_cgroups,
                id_maps: &id_maps,
                nameservers: &nameservers,
                now: Instant::now(),
                unresolved_grace: self.opts.unresolved_grace,
            },
            &mut self.plan_state,
        );
        for ev in &p.events {
            if ev.reason == "InvalidAnnotation" {
                self.rt.metrics.error("invalid_annotation");
            }
            warn!(target: LOG, "pod {}/{}: {}: {}", ev.namespace, ev.name, ev.reason, ev.message);
            self.events.publish(
                &plan_key(&ev.uid),
                ev.kind,
                ev.reason,
                action::REDIRECT,
                &ev.message,
                pod_ref(&ev.uid, &ev.namespace, &ev.name),
            );
        }
        if p.unresolved.len() > p.not_found.len() {
            debug!(target: LOG, "network namespace not found yet for {:?}; sweeping deferred", p.unresolved);
        }
        let wanted = Wanted { mesh: &mesh, workloads: &p.workloads, rejected: &[], keep: &p.keep };
        let report = reconcile(&mut self.dp, &wanted, &mut self.agent_state).report;
        self.agent_state.publish_namespaces(&self.rt.metrics);
        log_report(&report);
        self.ready_pods.clear();
        self.failed_pods.clear();
        let mut errors: BTreeMap<String, String> = BTreeMap::new();
        for (name, e) in &report.errors {
            self.rt.metrics.error("apply");
            errors.entry(name.clone()).or_default().push_str(&format!("{e:#}; "));
        }
        for name in report.programmed.iter().chain(&report.unchanged) {
            if !errors.contains_key(name) {
                self.ready_pods.insert(name.clone(), String::new());
            }
        }
        // A failure on a pod is published once per distinct message.
        for (name, msg) in &errors {
            if let Some(uid) = p.uids.get(name) {
                self.failed_pods.insert(name.clone(), msg.clone());
                if self.pod_errors.get(uid) != Some(msg) {
                    if let Some(pod) = self.pods.items.get(uid) {
                        self.events.publish(
                            &apply_key(uid),
                            EventKind::Warning,
                            "RedirectionFailed",
                            action::REDIRECT,
                            msg,
                            pod_ref(uid, &pod.namespace, &pod.name),
                        );
                    }
                    self.pod_errors.insert(uid.clone(), msg.clone());
                }
            }
        }
        let live: BTreeSet<&String> = p.uids.values().collect();
        self.pod_errors
            .retain(|uid, _| live.contains(uid) && p.uids.iter().any(|(n, u)| u == uid && errors.contains_key(n)));
        let meshed = self.pods.items.values().filter(|x| x.is_live() && is_programmed(x, &rules)).count();
        self.rt.metrics.set_gauge("pods_meshed", "Live pods on this node that carry the sidecar.", meshed as u64);
        self.rt.metrics.set_gauge(
            "pods_programmed",
            "Meshed pods whose policy is in the maps.",
            self.ready_pods.len() as u64,
        );
        self.rt.metrics.set_gauge(
            "pods_unresolved",
            "Running meshed pods whose network namespace is not found yet.",
            p.unresolved.len() as u64,
        );
        self.rt.metrics.set_gauge(
            "pods_not_found",
            "Running meshed pods whose network namespace was not found for longer than --unresolved-grace: not \
             redirected, and no longer holding back the sweep.",
            p.not_found.len() as u64,
        );
        self.rt.metrics.set_gauge(
            "pods_skipped",
            "Meshed pods that cannot be redirected (host network).",
            p.skipped.len() as u64,
        );
        let plan_problems: BTreeSet<String> =
            self.pods.items.keys().filter(|uid| self.plan_state.has_problem(uid)).map(|u| plan_key(u)).collect();
        let apply_problems: BTreeSet<String> = self.pod_errors.keys().map(|u| apply_key(u)).collect();
        self.tend_events(Some((&plan_problems, &apply_problems)));
        self.set_ready_after_pass();
        self.answer_waiters();
        true
    }

    /// Forgets the Events of problems that are over and refreshes those
    /// that last; `pods`: the pods' problems after this pass (None: as
    /// they were).
    fn tend_events(&self, pods: Option<(&BTreeSet<String>, &BTreeSet<String>)>) {
        let mesh_problem = self.mesh_error.is_some();
        let mesh_wide_problem = self.mesh_wide_error.is_some();
        self.events.retain(|k| match pods {
            _ if k == MESH_KEY => mesh_problem,
            _ if k == MESH_WIDE_KEY => mesh_wide_problem,
            Some((plan, apply)) => plan.contains(k) || apply.contains(k),
            None => true,
        });
        self.events.tend();
    }

    /// Ready after a pass, unless the pod watch keeps failing; the first
    /// time, the node's start-up taint is removed.
    fn set_ready_after_pass(&mut self) {
        let failing = self
            .pod_watch
            .failing(Instant::now())
            .map(|why| format!("the watch of pods on node {} is failing: {why}", self.opts.node_name));
        let ready = failing.is_none();
        self.rt.metrics.set_ready(failing);
        if ready && !self.taint_started {
            self.taint_started = true;
            if let Some(key) = &self.opts.startup_taint {
                node::spawn_taint_removal(self.client.clone(), self.opts.node_name.clone(), key.clone());
            }
        }
    }

    /// With `ProxyIdentity::Cgroup`: pod UID → the cgroup directory of its
    /// running proxy container, found under the agent's cgroup (cached
    /// while the container ID stays and the directory exists). Pods whose
    /// proxy does not run, or whose cgroup is not found, are left out:
    /// their proxy is identified by UID.
    fn find_proxy_cgroups(&mut self, mesh: &MeshSettings, rules: &[MeshedWhen]) -> BTreeMap<String, PathBuf> {
        let ProxyIdentity::Cgroup { container } = &self.opts.proxy_identity else {
            return BTreeMap::new();
        };
        let name = container.clone().unwrap_or_else(|| mesh.preset.proxy_container().to_string());
        let mut cache = std::mem::take(&mut self.proxy_cgroups);
        let mut out = BTreeMap::new();
        let mut missing = BTreeSet::new();
        for p in self.pods.items.values().filter(|p| p.is_live() && !p.host_network && is_programmed(p, rules)) {
            let Some(id) = p.running.get(&name) else { continue };
            let cached = cache.remove(&p.uid).filter(|(cid, path)| cid == id && path.is_dir()).map(|(_, path)| path);
            let found = cached.or_else(|| {
                let found = discover::container_cgroup(&self.opts.cgroup, &p.uid, id);
                if let Some(path) = &found {
                    info!(
                        target: LOG,
                        "pod {}: proxy container `{name}` ({id}) identified by its cgroup {}",
                        p.key(),
                        path.display()
                    );
                }
                found
            });
            match found {
                Some(path) => {
                    self.proxy_cgroups.insert(p.uid.clone(), (id.clone(), path.clone()));
                    out.insert(p.uid.clone(), path);
                }
                None => {
                    let key = (p.uid.clone(), id.clone());
                    if !self.proxy_cgroups_missing.contains(&key) {
                        warn!(
                            target: LOG,
                            "pod {}: proxy container `{name}` runs ({id}) but no cgroup of it was found under {}; its proxy is identified by UID {} meanwhile",
                            p.key(),
                            self.opts.cgroup.display(),
                            mesh.proxy_uid
                        );
                    }
                    missing.insert(key);
                }
            }
        }
        self.proxy_cgroups_missing = missing;
        out
    }

    /// Looks in /proc for meshed pods whose namespace is not known (pods
    /// started before the agent), at most once per resync period: only a
    /// process in one of the pod's container cgroups counts, never one in
    /// the node's network namespace or the agent's.
    fn find_namespaces(&mut self, rules: &[MeshedWhen]) {
        if self.last_scan.is_some_and(|t| t.elapsed() < self.opts.resync) {
            return;
        }
        let missing: BTreeMap<String, BTreeSet<String>> = self
            .pods
            .items
            .values()
            .filter(|p| p.is_live() && !p.host_network && is_programmed(p, rules) && !self.netns.contains_key(&p.uid))
            .map(|p| (p.uid.clone(), p.container_ids.clone()))
            .collect();
        if missing.is_empty() {
            return;
        }
        self.last_scan = Some(Instant::now());
        let (found, errors) = discover::scan(&self.opts.proc_root, &missing, &self.never_cookies);
        for (uid, h) in found {
            let name = self.pods.items.get(&uid).map(PodInfo::key).unwrap_or_default();
            let userns = h
                .id_maps
                .as_ref()
                .map(|m| format!(", in a user namespace of its own (uid_map {}, gid_map {})", m.uid, m.gid))
                .unwrap_or_default();
            info!(
                target: LOG,
                "pod {name}: network namespace found through {} (cookie {}){userns}",
                h.source.display(),
                h.cookie
            );
            self.netns.insert(uid, h);
        }
        // Reported once per pod and reason, while it lasts.
        self.scan_errors.retain(|uid, _| errors.contains_key(uid));
        for (uid, e) in errors {
            if self.scan_errors.get(&uid) != Some(&e) {
                let name = self.pods.items.get(&uid).map(PodInfo::key).unwrap_or_default();
                warn!(target: LOG, "pod {name}: its container's process was found but not usable: {e}");
                self.scan_errors.insert(uid, e);
            }
        }
    }
}
