//! `redirector run --kube`: the same agent as the standalone mode, with the
//! Kubernetes API as the source of desired state.
//!
//! - pods on this node (watcher with `spec.nodeName=<node>`), meshed by
//!   the rules of [`MeshedWhen`];
//! - mesh settings from the agent's ConfigMap and, when the CRD exists,
//!   OSM's MeshConfig (see [`redirector_policy::k8s::mesh`]);
//! - each pod's network namespace from its init container's registration
//!   ([`registry`]) or, for pods already running, from `/proc`
//!   ([`discover`]);
//! - nothing is swept before the first complete list of pods (and while a
//!   running meshed pod's namespace is unknown), so a restarted agent keeps
//!   every live pod redirected and removes only what is stale.
pub mod discover;
pub mod registry;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use futures::{FutureExt as _, Stream, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, ObjectReference, Pod},
        events::v1::Event as K8sEvent,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    api::{ApiResource, DynamicObject, ListParams, PostParams},
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, ResourceExt as _,
};
use log::{debug, error, info, warn};
use tokio::sync::mpsc;

use redirector_policy::{
    k8s::{
        mesh::{MeshSources, Source, CONFIGMAP_KEY},
        plan::{plan, EventKind, Inputs, PlanState, PodEvent},
        pods::{is_meshed, proxy_container, MeshedWhen, PodInfo},
    },
    MeshSettings,
};

use crate::{
    agent::{
        reconcile::{log_report, reconcile, AgentState, Wanted},
        runtime::{Runtime, Signal, Signals},
    },
    dataplane::Dataplane,
    metrics::Metrics,
};
use discover::NetnsHandle;
use registry::{Registration, Reply};

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
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// The unix socket the init containers talk to.
    pub socket: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    /// `namespace/name` of the agent's ConfigMap (None: preset defaults).
    pub configmap: Option<(String, String)>,
    /// `namespace/name` of OSM's MeshConfig (None: not read).
    pub meshconfig: Option<(String, String)>,
    pub meshconfig_version: String,
    /// Rules that mark a pod as meshed; empty: the preset's defaults.
    pub meshed_when: Vec<MeshedWhen>,
    pub proc_root: PathBuf,
    /// How often pods whose namespace is unknown are looked for in /proc.
    pub resync: Duration,
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

type WatchStream<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

fn watch_one<K>(api: Api<K>, name: &str) -> WatchStream<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher::watcher(api, cfg).default_backoff().boxed()
}

/// A collection seen through a watcher: the objects, a buffer for a relist
/// in progress (the current objects stay until it completes), and whether
/// a complete list has been seen.
struct Watched<T> {
    items: BTreeMap<String, T>,
    relist: Option<BTreeMap<String, T>>,
    synced: bool,
    last_error: Option<String>,
}

impl<T> Watched<T> {
    fn new() -> Self {
        Self { items: BTreeMap::new(), relist: None, synced: false, last_error: None }
    }

    /// Applies one watcher event; true if the collection changed.
    fn apply<K>(
        &mut self,
        what: &str,
        ev: Result<Event<K>, watcher::Error>,
        key: impl Fn(&K) -> String,
        conv: impl Fn(&K) -> Option<T>,
        metrics: &Metrics,
    ) -> bool {
        match ev {
            Ok(Event::Apply(k)) => {
                let Some(v) = conv(&k) else { return false };
                self.items.insert(key(&k), v);
                self.last_error = None;
                true
            }
            Ok(Event::Delete(k)) => self.items.remove(&key(&k)).is_some(),
            Ok(Event::Init) => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Ok(Event::InitApply(k)) => {
                if let (Some(buf), Some(v)) = (self.relist.as_mut(), conv(&k)) {
                    buf.insert(key(&k), v);
                }
                false
            }
            Ok(Event::InitDone) => {
                if let Some(buf) = self.relist.take() {
                    self.items = buf;
                }
                if !self.synced {
                    info!(target: LOG, "{what}: initial list complete ({} objects)", self.items.len());
                }
                self.synced = true;
                self.last_error = None;
                true
            }
            Err(e) => {
                metrics.error("watch");
                let text = e.to_string();
                if self.last_error.as_deref() != Some(text.as_str()) {
                    warn!(target: LOG, "{what}: {text}; retrying with backoff (objects seen so far are kept)");
                    self.last_error = Some(text);
                } else {
                    debug!(target: LOG, "{what}: {text}");
                }
                false
            }
        }
    }
}

/// A registered init container waiting for its pod to be programmed.
struct Waiter {
    uid: String,
    reply: mpsc::UnboundedSender<Reply>,
    last: Option<Reply>,
}

struct Loop {
    opts: KubeOptions,
    dp: Dataplane,
    metrics: Arc<Metrics>,
    rt: Runtime,
    client: Client,
    pods: Watched<PodInfo>,
    configmap: Watched<Option<String>>,
    meshconfig: Watched<serde_json::Value>,
    netns: BTreeMap<String, NetnsHandle>,
    waiters: Vec<Waiter>,
    plan_state: PlanState,
    agent_state: AgentState,
    mesh: Option<MeshSettings>,
    mesh_error: Option<String>,
    host_cookie: u64,
    last_scan: Option<Instant>,
    pod_errors: BTreeMap<String, String>,
    /// Results of the last pass, for answering waiters.
    ready_pods: BTreeMap<String, String>,
    failed_pods: BTreeMap<String, String>,
    /// Pod UID → (proxy container ID, its cgroup directory), for
    /// `ProxyIdentity::Cgroup`.
    proxy_cgroups: BTreeMap<String, (String, PathBuf)>,
    /// (pod UID, container ID) of running proxies whose cgroup was not
    /// found (reported once each).
    proxy_cgroups_missing: BTreeSet<(String, String)>,
}

pub async fn run(opts: KubeOptions) -> Result<()> {
    let signals = Signals::install()?;
    crate::sys::features::require(&crate::sys::features::probe())?;
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;
    let rt = Runtime::start(LOG, opts.pin_dir.clone(), opts.metrics_addr).await?;
    let metrics = rt.metrics.clone();
    let dp = Dataplane::load(&opts.pin_dir, &opts.cgroup)?;
    info!(target: LOG,
        "node {}: attached to cgroup {}, maps and links pinned in {}",
        opts.node_name,
        opts.cgroup.display(),
        opts.pin_dir.display()
    );
    let (reg_tx, reg_rx) = mpsc::channel::<Registration>(64);
    let listener = registry::bind(&opts.socket)?;
    info!(target: LOG, "init containers register on {}", opts.socket.display());
    match &opts.proxy_identity {
        ProxyIdentity::Uid => info!(target: LOG, "proxy identity: its UID (and GID)"),
        ProxyIdentity::Cgroup { container } => info!(target: LOG,
            "proxy identity: the cgroup of container `{}` under {} (its UID until that container runs)",
            container.as_deref().unwrap_or("<the preset's sidecar>"),
            opts.cgroup.display()
        ),
    }
    tokio::spawn(registry::serve(listener, opts.proc_root.clone(), reg_tx));

    let pods: WatchStream<Pod> = watcher::watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name)),
    )
    .default_backoff()
    .boxed();
    let cms: WatchStream<ConfigMap> = match &opts.configmap {
        Some((ns, name)) => watch_one(Api::namespaced(client.clone(), ns), name),
        None => futures::stream::pending().boxed(),
    };
    let mut mcs: WatchStream<DynamicObject> = futures::stream::pending().boxed();
    let mut meshconfig = Watched::new();
    if let Some((ns, name)) = &opts.meshconfig {
        let ar = ApiResource {
            group: MESHCONFIG_GROUP.into(),
            version: opts.meshconfig_version.clone(),
            api_version: format!("{MESHCONFIG_GROUP}/{}", opts.meshconfig_version),
            kind: MESHCONFIG_KIND.into(),
            plural: MESHCONFIG_PLURAL.into(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        match api.list(&ListParams::default().fields(&format!("metadata.name={name}"))).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                info!(target: LOG,
                    "{MESHCONFIG_KIND} {}/{} not served (CRD not installed): mesh settings from the ConfigMap only",
                    ar.api_version, MESHCONFIG_PLURAL
                );
                meshconfig.synced = true;
            }
            _ => mcs = watch_one(api, name),
        }
    } else {
        meshconfig.synced = true;
    }
    let mut configmap = Watched::new();
    configmap.synced = opts.configmap.is_none();

    let host_cookie = crate::sys::netns::current_netns_cookie()?;
    let mut lp = Loop {
        dp,
        metrics,
        rt,
        client,
        pods: Watched::new(),
        configmap,
        meshconfig,
        netns: BTreeMap::new(),
        waiters: Vec::new(),
        plan_state: PlanState::default(),
        agent_state: AgentState::default(),
        mesh: None,
        mesh_error: None,
        host_cookie,
        last_scan: None,
        pod_errors: BTreeMap::new(),
        ready_pods: BTreeMap::new(),
        failed_pods: BTreeMap::new(),
        proxy_cgroups: BTreeMap::new(),
        proxy_cgroups_missing: BTreeSet::new(),
        opts,
    };
    let mut tick = tokio::time::interval(lp.opts.resync);
    // A pass longer than the resync period must not be followed by a burst
    // of catch-up ticks: each would be another pass, and the watch streams
    // would wait behind them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inputs = Wakeups { pods, cms, mcs, reg_rx, tick, signals };
    let mut dirty_since: Option<Instant> = None;
    'run: loop {
        lp.metrics.heartbeat();
        if let Some(since) = dirty_since {
            if lp.synced() {
                // The pass is synchronous (map writes, netns threads); the
                // runtime's other tasks (watch connections, the registry,
                // the status endpoints) move to another worker meanwhile.
                if tokio::task::block_in_place(|| lp.pass()) {
                    lp.metrics.observe_sync(since.elapsed());
                }
                dirty_since = None;
            } else {
                lp.metrics.set_ready(Some(lp.waiting_for()));
                lp.answer_waiters();
            }
        }
        // Wait for one input, then take every input already there before
        // the next pass: a burst of watch events is one pass, not one each.
        let mut changed = match inputs.next(&mut lp).await {
            Some(c) => c,
            None => break 'run,
        };
        loop {
            match inputs.next(&mut lp).now_or_never() {
                Some(Some(c)) => changed |= c,
                Some(None) => break 'run,
                None => break,
            }
        }
        if changed && dirty_since.is_none() {
            dirty_since = Some(Instant::now());
        }
    }
    lp.rt.exit_notice();
    let _ = std::fs::remove_file(&lp.opts.socket);
    Ok(())
}

/// What the agent waits on.
struct Wakeups {
    pods: WatchStream<Pod>,
    cms: WatchStream<ConfigMap>,
    mcs: WatchStream<DynamicObject>,
    reg_rx: mpsc::Receiver<Registration>,
    tick: tokio::time::Interval,
    signals: Signals,
}

impl Wakeups {
    /// Waits for one input and applies it to the loop's state: Some(true)
    /// if the desired state may have changed, None on SIGTERM/SIGINT.
    async fn next(&mut self, lp: &mut Loop) -> Option<bool> {
        Some(tokio::select! {
            Some(ev) = self.pods.next() => {
                let node = lp.opts.node_name.clone();
                let changed = lp.pods.apply(&format!("pods on node {node}"), ev, |p: &Pod| p.uid().unwrap_or_default(), PodInfo::from_pod, &lp.metrics);
                // Namespaces of pods that are gone are released (not those
                // of registrations the watch has not caught up with).
                if lp.pods.relist.is_none() {
                    let live = &lp.pods.items;
                    let waiting: BTreeSet<&String> = lp.waiters.iter().map(|w| &w.uid).collect();
                    lp.netns.retain(|uid, _| live.contains_key(uid) || waiting.contains(uid));
                }
                changed
            }
            Some(ev) = self.cms.next() => {
                let what = lp.opts.configmap.as_ref().map(|(n, m)| format!("ConfigMap {n}/{m}")).unwrap_or_default();
                lp.configmap.apply(&what, ev, |c: &ConfigMap| c.name_any(), |c: &ConfigMap| Some(c.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY).cloned())), &lp.metrics)
            }
            Some(ev) = self.mcs.next() => {
                let what = lp.opts.meshconfig.as_ref().map(|(n, m)| format!("{MESHCONFIG_KIND} {n}/{m}")).unwrap_or_default();
                lp.meshconfig.apply(&what, ev, |o: &DynamicObject| o.name_any(), |o: &DynamicObject| Some(o.data.clone()), &lp.metrics)
            }
            Some(reg) = self.reg_rx.recv() => {
                lp.metrics.registration();
                lp.netns.insert(reg.uid.clone(), reg.netns);
                lp.waiters.push(Waiter { uid: reg.uid, reply: reg.reply, last: None });
                true
            }
            _ = self.tick.tick() => {
                lp.rt.check_full_maps(&lp.dp.maps);
                lp.last_scan = None;
                true
            }
            sig = self.signals.next() => match sig {
                Signal::Hangup => { info!(target: LOG, "SIGHUP: full resync"); lp.last_scan = None; lp.agent_state = AgentState::default(); true }
                Signal::Stop => return None,
            },
        })
    }
}

fn pod_ref(p: &PodEvent) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(p.name.clone()),
        namespace: Some(p.namespace.clone()),
        uid: Some(p.uid.clone()),
        ..Default::default()
    }
}

impl Loop {
    fn synced(&self) -> bool {
        self.pods.synced && self.configmap.synced && self.meshconfig.synced
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
        format!("waiting for {}", parts.join(", "))
    }

    fn rules(&self, mesh: &MeshSettings) -> Vec<MeshedWhen> {
        if self.opts.meshed_when.is_empty() {
            MeshedWhen::defaults(mesh.preset)
        } else {
            self.opts.meshed_when.clone()
        }
    }

    /// Creates an events.k8s.io Event (in the background: the API's latency
    /// never holds up a reconcile). Each distinct problem is published
    /// once, by the callers; a new message is a new Event, so it is always
    /// visible (a series patch would keep the first message).
    fn publish(&self, kind: EventKind, reason: &str, message: String, regarding: ObjectReference) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let ns = regarding.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let ev = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", regarding.name.as_deref().unwrap_or("redirector"), now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(match kind {
                EventKind::Normal => "Normal".into(),
                EventKind::Warning => "Warning".into(),
            }),
            reason: Some(reason.to_string()),
            action: Some("Redirect".into()),
            // The API limits a note to 1 kB.
            note: Some(message.chars().take(1000).collect()),
            regarding: Some(regarding),
            reporting_controller: Some("redirector".into()),
            reporting_instance: Some(self.opts.instance.clone()),
            ..Default::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &ns);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &ev).await {
                metrics.error("event_publish");
                warn!(target: LOG, "publishing Event {:?} in namespace {ns}: {e}", ev.reason);
            }
        });
    }

    /// The current mesh settings, publishing an Event when the sources
    /// became invalid; the last good settings stay in force.
    fn resolve_mesh(&mut self) -> Option<MeshSettings> {
        let sources =
            MeshSources {
                configmap: self.opts.configmap.as_ref().and_then(|(ns, name)| {
                    self.configmap.items.get(name).map(|text| (format!("{ns}/{name}"), text.clone()))
                }),
                meshconfig: self.opts.meshconfig.as_ref().and_then(|(ns, name)| {
                    self.meshconfig.items.get(name).map(|o| (format!("{ns}/{name}"), o.clone()))
                }),
            };
        match sources.resolve() {
            Ok(m) => {
                if self.mesh_error.take().is_some() {
                    info!(target: LOG, "mesh settings valid again");
                }
                if self.mesh.as_ref() != Some(&m) {
                    info!(target: LOG,
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
                    self.metrics.error("invalid_mesh_config");
                    error!(target: LOG,
                        "{text}; {}",
                        if self.mesh.is_some() {
                            "keeping the last good mesh settings"
                        } else {
                            "no pod is (re)programmed until they are valid"
                        }
                    );
                    let (api_version, kind, full) = match &source {
                        Source::ConfigMap(n) => ("v1".to_string(), "ConfigMap", n.clone()),
                        Source::MeshConfig(n) => {
                            (format!("{MESHCONFIG_GROUP}/{}", self.opts.meshconfig_version), MESHCONFIG_KIND, n.clone())
                        }
                    };
                    let (ns, name) = full.split_once('/').unwrap_or(("", &full));
                    let reference = ObjectReference {
                        api_version: Some(api_version),
                        kind: Some(kind.into()),
                        namespace: Some(ns.into()),
                        name: Some(name.into()),
                        ..Default::default()
                    };
                    self.publish(
                        EventKind::Warning,
                        "InvalidMeshConfig",
                        format!("{text}; keeping the last good mesh settings"),
                        reference,
                    );
                    self.mesh_error = Some(text);
                }
            }
        }
        self.mesh.clone()
    }

    /// One reconcile pass. False if it could not run (no valid mesh
    /// settings yet).
    fn pass(&mut self) -> bool {
        let Some(mesh) = self.resolve_mesh() else {
            let why = format!("mesh settings invalid: {}", self.mesh_error.clone().unwrap_or_default());
            self.metrics.set_ready(Some(why));
            self.answer_waiters();
            return false;
        };
        let rules = self.rules(&mesh);
        self.find_namespaces(&rules);
        let netns: BTreeMap<String, (PathBuf, u64)> =
            self.netns.iter().map(|(uid, h)| (uid.clone(), (h.path(), h.cookie))).collect();
        let pinned: BTreeSet<u64> = match self.dp.maps.workloads() {
            Ok(w) => w.keys().copied().collect(),
            Err(e) => {
                self.metrics.error("maps");
                error!(target: LOG, "reading the workloads map: {e:#}");
                return false;
            }
        };
        let proxy_cgroups = self.find_proxy_cgroups(&mesh, &rules);
        let p = plan(
            &Inputs {
                pods: &self.pods.items,
                mesh: &mesh,
                rules: &rules,
                netns: &netns,
                pinned: &pinned,
                proxy_cgroups: &proxy_cgroups,
            },
            &mut self.plan_state,
        );
        for ev in &p.events {
            if ev.reason == "InvalidAnnotation" {
                self.metrics.error("invalid_annotation");
            }
            warn!(target: LOG, "pod {}/{}: {}: {}", ev.namespace, ev.name, ev.reason, ev.message);
            self.publish(ev.kind, ev.reason, ev.message.clone(), pod_ref(ev));
        }
        if !p.unresolved.is_empty() {
            debug!(target: LOG, "network namespace not found yet for {:?}; sweeping deferred", p.unresolved);
        }
        let wanted = Wanted { mesh: &mesh, workloads: &p.workloads, rejected: &[], keep: &p.keep };
        let report = reconcile(&mut self.dp, &wanted, &mut self.agent_state);
        log_report(&report);
        self.ready_pods.clear();
        self.failed_pods.clear();
        let mut errors: BTreeMap<String, String> = BTreeMap::new();
        for (name, e) in &report.errors {
            self.metrics.error("apply");
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
                        let ev = PodEvent {
                            uid: uid.clone(),
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                            kind: EventKind::Warning,
                            reason: "RedirectionFailed",
                            message: msg.clone(),
                        };
                        self.publish(ev.kind, ev.reason, ev.message.clone(), pod_ref(&ev));
                    }
                    self.pod_errors.insert(uid.clone(), msg.clone());
                }
            }
        }
        let live: BTreeSet<&String> = p.uids.values().collect();
        self.pod_errors
            .retain(|uid, _| live.contains(uid) && p.uids.iter().any(|(n, u)| u == uid && errors.contains_key(n)));
        let meshed = self.pods.items.values().filter(|x| x.is_live() && is_meshed(x, &rules)).count();
        self.metrics.set_gauge("pods_meshed", "Live pods on this node that carry the sidecar.", meshed as u64);
        self.metrics.set_gauge(
            "pods_programmed",
            "Meshed pods whose policy is in the maps.",
            self.ready_pods.len() as u64,
        );
        self.metrics.set_gauge(
            "pods_unresolved",
            "Running meshed pods whose network namespace is not found yet.",
            p.unresolved.len() as u64,
        );
        self.metrics.set_gauge(
            "pods_skipped",
            "Meshed pods that cannot be redirected (host network).",
            p.skipped.len() as u64,
        );
        self.metrics.set_ready(None);
        self.answer_waiters();
        true
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
        let name = container.clone().unwrap_or_else(|| proxy_container(mesh.preset).to_string());
        let mut cache = std::mem::take(&mut self.proxy_cgroups);
        let mut out = BTreeMap::new();
        let mut missing = BTreeSet::new();
        for p in self.pods.items.values().filter(|p| p.is_live() && !p.host_network && is_meshed(p, rules)) {
            let Some(id) = p.running.get(&name) else { continue };
            let cached = cache.remove(&p.uid).filter(|(cid, path)| cid == id && path.is_dir()).map(|(_, path)| path);
            let found = cached.or_else(|| {
                let found = discover::container_cgroup(&self.opts.cgroup, &p.uid, id);
                if let Some(path) = &found {
                    info!(target: LOG,
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
                        warn!(target: LOG,
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
    /// started before the agent), at most once per resync period.
    fn find_namespaces(&mut self, rules: &[MeshedWhen]) {
        if self.last_scan.is_some_and(|t| t.elapsed() < self.opts.resync) {
            return;
        }
        let missing: Vec<&str> = self
            .pods
            .items
            .values()
            .filter(|p| p.is_live() && !p.host_network && is_meshed(p, rules) && !self.netns.contains_key(&p.uid))
            .map(|p| p.uid.as_str())
            .collect();
        if missing.is_empty() {
            return;
        }
        self.last_scan = Some(Instant::now());
        let found = discover::scan(&self.opts.proc_root, &missing, self.host_cookie);
        for (uid, h) in found {
            let name = self.pods.items.get(&uid).map(PodInfo::key).unwrap_or_default();
            info!(target: LOG, "pod {name}: network namespace found through {} (cookie {})", h.source.display(), h.cookie);
            self.netns.insert(uid, h);
        }
    }

    fn answer_waiters(&mut self) {
        let node = self.opts.node_name.clone();
        let rules = self.mesh.as_ref().map(|m| self.rules(m));
        let mut keep = Vec::new();
        for mut w in std::mem::take(&mut self.waiters) {
            let reply = match (self.pods.items.get(&w.uid), &rules) {
                _ if !self.synced() => Reply::waiting(self.waiting_for()),
                (_, None) => {
                    Reply::waiting(format!("mesh settings invalid: {}", self.mesh_error.clone().unwrap_or_default()))
                }
                (None, _) => Reply::waiting(format!("pod UID {} not seen on node {node} yet", w.uid)),
                (Some(p), Some(rules)) if !is_meshed(p, rules) => Reply::error(format!(
                    "pod {} is not meshed (rules: {}); remove the redirector init container or fix the rules",
                    p.key(),
                    rules.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
                )),
                (Some(p), _) if p.host_network => {
                    Reply::error(format!("pod {} uses the node's network namespace; it cannot be redirected", p.key()))
                }
                (Some(p), _) => match (self.ready_pods.get(&p.key()), self.failed_pods.get(&p.key())) {
                    (Some(_), _) => {
                        let cookie = self.netns.get(&w.uid).map(|h| h.cookie).unwrap_or_default();
                        Reply::ready(format!("pod {} is programmed (netns cookie {cookie})", p.key()))
                    }
                    (None, Some(e)) => Reply::waiting(format!("pod {}: {e}", p.key())),
                    (None, None) => Reply::waiting(format!("pod {}: not programmed yet", p.key())),
                },
            };
            if w.last.as_ref() != Some(&reply) {
                if w.reply.send(reply.clone()).is_err() {
                    continue; // the init container gave up
                }
                w.last = Some(reply.clone());
            }
            if !reply.is_final() {
                keep.push(w);
            }
        }
        self.waiters = keep;
    }
}
