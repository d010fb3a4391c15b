//! `redirector run --kube`: the same agent as the standalone mode, with the
//! Kubernetes API as the source of desired state.
//!
//! - pods on this node (watcher with `spec.nodeName=<node>`), meshed by
//!   the rules of [`MeshedWhen`];
//! - mesh settings from the agent's ConfigMap and, with preset `osm` and
//!   while the CRD is served, OSM's MeshConfig (see
//!   [`redirector_policy::k8s::mesh`]);
//! - each pod's network namespace from its init container's registration
//!   ([`registry`]) or, for pods already running, from `/proc`
//!   ([`discover`]);
//! - nothing is swept before the first complete list of pods (and while a
//!   running meshed pod's namespace is unknown), so a restarted agent keeps
//!   every live pod redirected and removes only what is stale.
//!
//! - ready (`/readyz`) once the first pass has run, and not while the pod
//!   watch keeps failing ([`inputs::WatchHealth`]); once ready, the node's
//!   start-up taint is removed ([`node`]).
//!
//! Files: [`inputs`] (what wakes the loop, as [`inputs::Input`]s),
//! `pass` (one reconcile pass), [`events`] (Kubernetes Events), [`node`]
//! (the start-up taint, the Event of a refused kernel), `waiters` (the
//! gate's waiting init containers), [`discover`], [`registry`]. The
//! signals, status endpoints, full-map reports and exit notice are
//! [`crate::agent::runtime`]'s.
pub mod discover;
pub mod events;
mod inputs;
pub mod node;
mod pass;
pub mod registry;
mod waiters;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use futures::FutureExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{api::DynamicObject, Client, ResourceExt as _};
use log::{info, warn};
use tokio::sync::mpsc;

use redirector_policy::{
    k8s::{
        mesh::CONFIGMAP_KEY,
        plan::PlanState,
        pods::{MeshedWhen, PodInfo},
    },
    MeshSettings, Preset,
};

use crate::{
    agent::{
        reconcile::AgentState,
        runtime::{Runtime, Signal, Signals},
    },
    dataplane::Dataplane,
};
use discover::NetnsHandle;
use events::Events;
use inputs::{Input, MeshConfigInput, Streams, WatchHealth, Watched};
use registry::Registration;
use waiters::Waiters;

/// The log target of these records: the module path they had before the
/// agents moved under `agent/`, so `RUST_LOG` filters and log readers keep
/// working.
const LOG: &str = "redirector::k8s::agent";

/// The API group/version/kind of OSM's MeshConfig.
pub const MESHCONFIG_GROUP: &str = "config.openservicemesh.io";
pub const MESHCONFIG_KIND: &str = "MeshConfig";
pub const MESHCONFIG_PLURAL: &str = "meshconfigs";

pub struct KubeOptions {
    pub node_name: String,
    /// The cgroup2 mount: pods' cgroups are found below it.
    pub cgroup: PathBuf,
    /// Where the programs attach (the kubelet's pods cgroup, or `cgroup`).
    pub attach_cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// The unix socket the init containers talk to.
    pub socket: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    /// `namespace/name` of the agent's ConfigMap (None: OSM's preset
    /// defaults). When given it must exist and name the preset.
    pub configmap: Option<(String, String)>,
    /// `namespace/name` of OSM's MeshConfig, read while the preset is
    /// `osm` and its CRD is served (None: never read).
    pub meshconfig: Option<(String, String)>,
    /// Whether `--meshconfig` was given (not its default): with another
    /// preset than `osm` it is then warned about.
    pub meshconfig_explicit: bool,
    pub meshconfig_version: String,
    /// How often a MeshConfig CRD that is not served is looked for again.
    pub meshconfig_recheck: Duration,
    /// Namespace of the mesh's own settings (Istio's injector values,
    /// Linkerd's `linkerd-config`), read for pods whose init container
    /// carries none: None, the preset's (`istio-system`, `linkerd`);
    /// `Some("")`: not read.
    pub mesh_namespace: Option<String>,
    /// The Istio revision whose settings are read ("" the default one).
    pub istio_revision: String,
    /// How often the Event of a lasting problem is refreshed.
    pub event_refresh: Duration,
    /// The start-up taint removed from the node once ready (None: none).
    pub startup_taint: Option<String>,
    /// Rules that mark a pod as meshed; empty: the preset's defaults.
    pub meshed_when: Vec<MeshedWhen>,
    pub proc_root: PathBuf,
    /// The node's own network namespace: never taken as a pod's, never
    /// programmed.
    pub node_netns: crate::dataplane::NodeNetns,
    /// How often pods whose namespace is unknown are looked for in /proc.
    pub resync: Duration,
    /// How long such a running pod holds back the sweep of stale entries.
    pub unresolved_grace: Duration,
    /// Reporting instance in Events (the agent's pod name).
    pub instance: String,
    pub proxy_identity: ProxyIdentity,
}

/// How a pod's proxy is told from its application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyIdentity {
    /// By its UID (and GID), as the meshes' iptables rules do.
    Uid,
    /// By the cgroup of the pod's proxy container (this name, or the
    /// preset's sidecar), so an application process running as the
    /// proxy's UID is still redirected. Until that container runs (the
    /// init gate runs before it) and while it restarts, by UID.
    Cgroup { container: Option<String> },
}

/// The agent's state between inputs: what the watches have shown, the
/// namespaces and registrations it holds, and what its passes did.
struct Agent {
    opts: KubeOptions,
    dp: Dataplane,
    rt: Runtime,
    events: Events,
    client: Client,
    pods: Watched<PodInfo>,
    /// Whether the pod watch keeps failing (readiness).
    pod_watch: WatchHealth,
    configmap: Watched<Seen<Option<String>>>,
    /// The ConfigMap's UID when last seen (kept after it is deleted, for
    /// the Event about it).
    configmap_uid: Option<String>,
    meshconfig: Watched<Seen<serde_json::Value>>,
    /// Whether the MeshConfig source runs (preset `osm`).
    meshconfig_on: bool,
    /// The preset last warned about with an explicit `--meshconfig`.
    meshconfig_warned: Option<Preset>,
    /// Whether the MeshConfig's API was last found not served (logged
    /// once per change).
    meshconfig_absent: bool,
    /// Whether the start-up taint's removal was started.
    taint_started: bool,
    /// The mesh's own ConfigMaps being watched: the preset, the
    /// namespace, and each (name, key, what was seen).
    mesh_wide_on: Option<(Preset, String)>,
    mesh_wide_cms: Vec<(String, &'static str, WatchedKey)>,
    /// The mesh's own settings as last read good, and the problem of the
    /// current ones (an Event on their ConfigMap while it lasts).
    mesh_wide: Option<redirector_policy::k8s::injector::meshwide::MeshWide>,
    mesh_wide_error: Option<String>,
    /// Whether their absence was logged (once per change).
    mesh_wide_absent_logged: bool,
    /// The preset last warned about with a `--mesh-namespace` it has no
    /// settings in.
    mesh_wide_warned: Option<Preset>,
    netns: BTreeMap<String, NetnsHandle>,
    waiters: Waiters,
    plan_state: PlanState,
    agent_state: AgentState,
    mesh: Option<MeshSettings>,
    mesh_error: Option<String>,
    /// Network namespaces never taken as a pod's: the node's (PID 1's)
    /// and the agent's own.
    never_cookies: BTreeSet<u64>,
    last_scan: Option<Instant>,
    pod_errors: BTreeMap<String, String>,
    /// Results of the last pass, for answering waiters.
    ready_pods: BTreeMap<String, String>,
    failed_pods: BTreeMap<String, String>,
    /// Pod UID → (proxy container ID, its cgroup directory), for
    /// `ProxyIdentity::Cgroup`.
    proxy_cgroups: BTreeMap<String, (String, PathBuf)>,
    /// Pods whose container's process could not be used, with why
    /// (reported once each).
    scan_errors: BTreeMap<String, String>,
    /// (pod UID, container ID) of running proxies whose cgroup was not
    /// found (reported once each).
    proxy_cgroups_missing: BTreeSet<(String, String)>,
}

/// A ConfigMap's one key, as seen through a watch.
type WatchedKey = Watched<Seen<Option<String>>>;

/// An object seen through a watch, with its UID (for the Events about it).
#[derive(Clone, Debug)]
pub(super) struct Seen<T> {
    uid: Option<String>,
    data: T,
}

/// Runs until SIGTERM/SIGINT; like the standalone agent, it leaves the
/// redirection in force.
///
/// Where it differs from the standalone agent (`docs/architecture.md`,
/// "Standalone and Kubernetes agents: what differs"): SIGHUP is a full
/// resync; `mesh.acceleration: sockmap` is not refused at the start (the
/// settings arrive later, by watch, and change live): on a kernel without
/// it each pod's apply fails instead, with an Event; every resync tick
/// runs a pass, so a failed pass is retried at that fixed period, without
/// backoff; the agent is ready only once the watches have listed and the
/// mesh settings are valid; `redirector_sync_duration_seconds` runs from
/// the first change to its pass.
pub async fn run(opts: KubeOptions) -> Result<()> {
    let signals = Signals::install()?;
    events::check_instance(&opts.instance)?;
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;
    if let Err(e) = crate::sys::features::require(&crate::sys::features::probe()) {
        node::report_refused_kernel(&client, &opts.node_name, &opts.instance, &format!("{e:#}")).await;
        return Err(e);
    }
    let rt = Runtime::start(LOG, opts.pin_dir.clone(), opts.metrics_addr).await?;
    let dp = Dataplane::load_on_node(&opts.pin_dir, &opts.attach_cgroup, &opts.node_netns)?;
    info!(
        target: LOG,
        "node {}: attached to cgroup {}, maps and links pinned in {}",
        opts.node_name,
        opts.attach_cgroup.display(),
        opts.pin_dir.display()
    );
    let (reg_tx, reg_rx) = mpsc::channel::<Registration>(64);
    let listener = registry::bind(&opts.socket)?;
    info!(target: LOG, "init containers register on {}", opts.socket.display());
    match &opts.proxy_identity {
        ProxyIdentity::Uid => info!(target: LOG, "proxy identity: its UID (and GID)"),
        ProxyIdentity::Cgroup { container } => info!(
            target: LOG,
            "proxy identity: the cgroup of container `{}` under {} (its UID until that container runs)",
            container.as_deref().unwrap_or("<the preset's sidecar>"),
            opts.cgroup.display()
        ),
    }
    let never_cookies = BTreeSet::from([dp.node_cookie, crate::sys::netns::current_netns_cookie()?]);
    tokio::spawn(registry::serve(listener, opts.proc_root.clone(), dp.node_cookie, opts.attach_cgroup.clone(), reg_tx));

    let mut streams = Streams::open(&client, &opts, reg_rx, signals);
    // Not read until the ConfigMap names preset `osm`.
    let mut meshconfig = Watched::new();
    meshconfig.absent();
    let mut configmap = Watched::new();
    configmap.synced = opts.configmap.is_none();

    let events = Events::new(client.clone(), opts.instance.clone(), rt.metrics.clone(), opts.event_refresh);
    let mut agent = Agent {
        dp,
        rt,
        events,
        client,
        pods: Watched::new(),
        pod_watch: WatchHealth::default(),
        configmap,
        configmap_uid: None,
        meshconfig,
        meshconfig_on: false,
        meshconfig_warned: None,
        meshconfig_absent: false,
        taint_started: false,
        mesh_wide_on: None,
        mesh_wide_cms: Vec::new(),
        mesh_wide: None,
        mesh_wide_error: None,
        mesh_wide_absent_logged: false,
        mesh_wide_warned: None,
        netns: BTreeMap::new(),
        waiters: Waiters::default(),
        plan_state: PlanState::default(),
        agent_state: AgentState::default(),
        mesh: None,
        mesh_error: None,
        never_cookies,
        last_scan: None,
        pod_errors: BTreeMap::new(),
        ready_pods: BTreeMap::new(),
        failed_pods: BTreeMap::new(),
        proxy_cgroups: BTreeMap::new(),
        proxy_cgroups_missing: BTreeSet::new(),
        scan_errors: BTreeMap::new(),
        opts,
    };
    let mut dirty_since: Option<Instant> = None;
    'run: loop {
        agent.rt.metrics.heartbeat();
        // At every input (a resync tick at least every --resync): pins
        // removed under the agent (`cleanup --force`) make it exit
        // non-zero instead of writing maps nothing uses.
        if let Err(e) = agent.dp.check_pins() {
            let _ = std::fs::remove_file(&agent.opts.socket);
            return Err(agent.rt.pins_gone(e));
        }
        // A pod's namespace deleted is let go of here, at the latest at the
        // next resync tick, not kept alive until its pod is gone.
        if agent.agent_state.release_gone_namespaces() > 0 {
            agent.agent_state.publish_namespaces(&agent.rt.metrics);
        }
        if let Some(since) = dirty_since {
            if agent.synced() {
                // The pass is synchronous (map writes, netns threads); the
                // runtime's other tasks (watch connections, the registry,
                // the status endpoints) move to another worker meanwhile.
                if tokio::task::block_in_place(|| agent.pass()) {
                    agent.rt.metrics.observe_sync(since.elapsed());
                }
                dirty_since = None;
            } else {
                agent.rt.metrics.set_ready(Some(agent.waiting_for()));
                agent.answer_waiters();
            }
        }
        // Wait for one input, then take every input already there before
        // the next pass: a burst of watch events is one pass, not one each.
        let mut changed = match agent.handle(streams.next().await) {
            Some(c) => c,
            None => break 'run,
        };
        loop {
            match streams.next().now_or_never().map(|input| agent.handle(input)) {
                Some(Some(c)) => changed |= c,
                Some(None) => break 'run,
                None => break,
            }
        }
        changed |= agent.gate_meshconfig(&mut streams);
        changed |= agent.gate_mesh_wide(&mut streams);
        if changed && dirty_since.is_none() {
            dirty_since = Some(Instant::now());
        }
    }
    agent.rt.exit_notice();
    let _ = std::fs::remove_file(&agent.opts.socket);
    Ok(())
}

impl Agent {
    /// Applies one input to the agent's state: Some(true) if the desired
    /// state may have changed, None on SIGTERM/SIGINT.
    fn handle(&mut self, input: Input) -> Option<bool> {
        Some(match input {
            Input::Pods(ev) => {
                let node = self.opts.node_name.clone();
                self.pod_watch.observe(&ev, Instant::now());
                if let Some(why) = self.pod_watch.failing(Instant::now()) {
                    self.rt.metrics.set_ready(Some(format!("the watch of pods on node {node} is failing: {why}")));
                }
                let changed = self.pods.apply(
                    &format!("pods on node {node}"),
                    *ev,
                    |p: &Pod| p.uid().unwrap_or_default(),
                    PodInfo::from_pod,
                    &self.rt.metrics,
                );
                // Namespaces of pods that are gone are released (not those
                // of registrations the watch has not caught up with).
                if self.pods.relist.is_none() {
                    let live = &self.pods.items;
                    let waiting = self.waiters.uids();
                    self.netns.retain(|uid, _| live.contains_key(uid) || waiting.contains(uid));
                }
                changed
            }
            Input::ConfigMap(ev) => {
                let what = self.opts.configmap.as_ref().map(|(n, m)| format!("ConfigMap {n}/{m}")).unwrap_or_default();
                let changed = self.configmap.apply(
                    &what,
                    *ev,
                    |c: &ConfigMap| c.name_any(),
                    |c: &ConfigMap| {
                        Some(Seen {
                            uid: c.metadata.uid.clone(),
                            data: c.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY).cloned()),
                        })
                    },
                    &self.rt.metrics,
                );
                if let Some(uid) = self.configmap.items.values().find_map(|c| c.uid.clone()) {
                    self.configmap_uid = Some(uid);
                }
                changed
            }
            Input::MeshConfig(MeshConfigInput::NotServed(why)) => {
                if !self.meshconfig_absent {
                    info!(
                        target: LOG,
                        "{MESHCONFIG_KIND} {MESHCONFIG_GROUP}/{}: not served (CRD not installed): mesh settings from the ConfigMap only; looking again every {}s ({why})",
                        self.opts.meshconfig_version,
                        self.opts.meshconfig_recheck.as_secs_f64()
                    );
                    self.meshconfig_absent = true;
                }
                self.meshconfig.absent()
            }
            Input::MeshConfig(MeshConfigInput::Watch(ev)) => {
                if self.meshconfig_absent && matches!(*ev, Ok(kube::runtime::watcher::Event::InitDone)) {
                    info!(target: LOG, "{MESHCONFIG_KIND} {MESHCONFIG_GROUP}/{}: served now", self.opts.meshconfig_version);
                    self.meshconfig_absent = false;
                }
                let what = self
                    .opts
                    .meshconfig
                    .as_ref()
                    .map(|(n, m)| format!("{MESHCONFIG_KIND} {n}/{m}"))
                    .unwrap_or_default();
                self.meshconfig.apply(
                    &what,
                    *ev,
                    |o: &DynamicObject| o.name_any(),
                    |o: &DynamicObject| Some(Seen { uid: o.metadata.uid.clone(), data: o.data.clone() }),
                    &self.rt.metrics,
                )
            }
            Input::MeshWide(i, ev) => {
                let ns = self.mesh_wide_on.as_ref().map(|(_, ns)| ns.clone()).unwrap_or_default();
                let metrics = self.rt.metrics.clone();
                let Some((name, key, watched)) = self.mesh_wide_cms.get_mut(i) else { return Some(false) };
                let key: &'static str = key;
                watched.apply(
                    &format!("ConfigMap {ns}/{name}"),
                    *ev,
                    |c: &ConfigMap| c.name_any(),
                    |c: &ConfigMap| {
                        Some(Seen {
                            uid: c.metadata.uid.clone(),
                            data: c.data.as_ref().and_then(|d| d.get(key).cloned()),
                        })
                    },
                    &metrics,
                )
            }
            Input::Registration(reg) => {
                self.rt.metrics.registration();
                self.netns.insert(reg.uid.clone(), reg.netns);
                self.waiters.add(reg.uid, reg.reply);
                true
            }
            Input::Resync => {
                self.rt.check_full_maps(&self.dp.maps);
                self.dp.drain_retired();
                self.last_scan = None;
                true
            }
            Input::Signal(sig) => match sig {
                Signal::Hangup => {
                    info!(target: LOG, "SIGHUP: full resync");
                    self.last_scan = None;
                    self.agent_state = AgentState::default();
                    true
                }
                Signal::Stop => return None,
            },
        })
    }

    fn synced(&self) -> bool {
        self.pods.synced
            && self.configmap.synced
            && self.meshconfig.synced
            && self.mesh_wide_cms.iter().all(|(_, _, w)| w.synced)
    }

    fn waiting_for(&self) -> String {
        let mut parts = Vec::new();
        if !self.pods.synced {
            parts.push(format!("the list of pods on node {}", self.opts.node_name));
        }
        if !self.configmap.synced {
            parts.push("the ConfigMap".to_string());
        }
        if !self.meshconfig.synced {
            parts.push(format!("the {MESHCONFIG_KIND}"));
        }
        let ns = self.mesh_wide_on.as_ref().map(|(_, ns)| ns.as_str()).unwrap_or_default();
        for (name, _, _) in self.mesh_wide_cms.iter().filter(|(_, _, w)| !w.synced) {
            parts.push(format!("ConfigMap {ns}/{name}"));
        }
        format!("waiting for {}", parts.join(", "))
    }

    /// Starts OSM's MeshConfig source while the ConfigMap names preset
    /// `osm` (or no ConfigMap is used) and stops it otherwise; a ConfigMap
    /// that is missing or invalid changes nothing (the last good settings
    /// stay, and with them this choice). True if the desired state may
    /// have changed.
    fn gate_meshconfig(&mut self, streams: &mut Streams) -> bool {
        if !self.configmap.synced || self.opts.meshconfig.is_none() {
            return false;
        }
        let Some(preset) = self.mesh_sources().configmap_preset() else { return false };
        let wanted = preset == Preset::Osm;
        if !wanted && self.opts.meshconfig_explicit && self.meshconfig_warned != Some(preset) {
            let (ns, name) = self.opts.meshconfig.clone().unwrap_or_default();
            warn!(
                target: LOG,
                "option --meshconfig: value \"{ns}/{name}\": not read: the preset is {} (OSM's MeshConfig applies only to preset osm)",
                preset.name()
            );
            self.meshconfig_warned = Some(preset);
        }
        if wanted {
            self.meshconfig_warned = None;
        }
        if wanted == self.meshconfig_on {
            return false;
        }
        streams.want_meshconfig(wanted);
        self.meshconfig_on = wanted;
        self.meshconfig_absent = false;
        if wanted {
            self.meshconfig.restart();
        } else {
            self.meshconfig.absent();
        }
        true
    }

    /// Watches the mesh's own ConfigMaps while the ConfigMap names preset
    /// istio or linkerd (unless `--mesh-namespace ""`), in the preset's
    /// namespace; stops otherwise. A missing or invalid agent ConfigMap
    /// changes nothing. True if the desired state may have changed.
    fn gate_mesh_wide(&mut self, streams: &mut Streams) -> bool {
        use redirector_policy::k8s::injector::meshwide;
        if !self.configmap.synced {
            return false;
        }
        let Some(preset) = self.mesh_sources().configmap_preset() else { return false };
        if let Some(ns) = self.opts.mesh_namespace.as_ref().filter(|ns| !ns.is_empty()) {
            if meshwide::default_namespace(preset).is_none() && self.mesh_wide_warned != Some(preset) {
                warn!(
                    target: LOG,
                    "option --mesh-namespace: value {ns:?}: not read: the preset is {} (the mesh's own settings are read for istio and linkerd)",
                    preset.name()
                );
                self.mesh_wide_warned = Some(preset);
            }
        }
        let ns = match &self.opts.mesh_namespace {
            Some(ns) if ns.is_empty() => None,
            Some(ns) => meshwide::default_namespace(preset).map(|_| ns.clone()),
            None => meshwide::default_namespace(preset).map(str::to_string),
        };
        let wanted = ns.map(|ns| (preset, ns));
        if wanted == self.mesh_wide_on {
            return false;
        }
        let names = match &wanted {
            Some((p, _)) => meshwide::sources(*p, &self.opts.istio_revision),
            None => Vec::new(),
        };
        let list: Vec<String> = names.iter().map(|(n, _)| n.clone()).collect();
        streams.want_mesh_wide(wanted.as_ref().map(|(_, ns)| (ns.as_str(), list.as_slice())));
        if let Some((p, ns)) = &wanted {
            info!(
                target: LOG,
                "preset {}: reading the mesh's own settings from ConfigMaps {} in namespace {ns}, for pods whose init container carries none",
                p.name(),
                list.join(", ")
            );
        }
        self.mesh_wide_cms = names.into_iter().map(|(n, k)| (n, k, Watched::new())).collect();
        self.mesh_wide = None;
        self.mesh_wide_error = None;
        self.mesh_wide_absent_logged = false;
        self.mesh_wide_on = wanted;
        true
    }

    /// The explicit opt-in rules (sidecar workloads are found without).
    fn rules(&self) -> Vec<MeshedWhen> {
        self.opts.meshed_when.clone()
    }
}
