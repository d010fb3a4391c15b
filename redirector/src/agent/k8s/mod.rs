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
//!
//! Files: [`inputs`] (what wakes the loop, as [`inputs::Input`]s),
//! `pass` (one reconcile pass), [`events`] (Kubernetes Events),
//! `waiters` (the gate's waiting init containers), [`discover`],
//! [`registry`]. The signals, status endpoints, full-map reports and exit
//! notice are [`crate::agent::runtime`]'s.
pub mod discover;
mod events;
mod inputs;
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
use log::info;
use tokio::sync::mpsc;

use redirector_policy::{
    k8s::{
        mesh::CONFIGMAP_KEY,
        plan::PlanState,
        pods::{MeshedWhen, PodInfo},
    },
    MeshSettings,
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
use inputs::{Input, Streams, Watched};
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

/// The agent's state between inputs: what the watches have shown, the
/// namespaces and registrations it holds, and what its passes did.
struct Agent {
    opts: KubeOptions,
    dp: Dataplane,
    rt: Runtime,
    events: Events,
    pods: Watched<PodInfo>,
    configmap: Watched<Option<String>>,
    meshconfig: Watched<serde_json::Value>,
    netns: BTreeMap<String, NetnsHandle>,
    waiters: Waiters,
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
    crate::sys::features::require(&crate::sys::features::probe())?;
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;
    let rt = Runtime::start(LOG, opts.pin_dir.clone(), opts.metrics_addr).await?;
    let dp = Dataplane::load(&opts.pin_dir, &opts.cgroup)?;
    info!(
        target: LOG,
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
        ProxyIdentity::Cgroup { container } => info!(
            target: LOG,
            "proxy identity: the cgroup of container `{}` under {} (its UID until that container runs)",
            container.as_deref().unwrap_or("<the preset's sidecar>"),
            opts.cgroup.display()
        ),
    }
    tokio::spawn(registry::serve(listener, opts.proc_root.clone(), opts.cgroup.clone(), reg_tx));

    let (mut streams, meshconfig_wanted) = Streams::open(&client, &opts, reg_rx, signals).await;
    let mut meshconfig = Watched::new();
    meshconfig.synced = !meshconfig_wanted;
    let mut configmap = Watched::new();
    configmap.synced = opts.configmap.is_none();

    let host_cookie = crate::sys::netns::current_netns_cookie()?;
    let events = Events { client, instance: opts.instance.clone(), metrics: rt.metrics.clone() };
    let mut agent = Agent {
        dp,
        rt,
        events,
        pods: Watched::new(),
        configmap,
        meshconfig,
        netns: BTreeMap::new(),
        waiters: Waiters::default(),
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
                self.configmap.apply(
                    &what,
                    ev,
                    |c: &ConfigMap| c.name_any(),
                    |c: &ConfigMap| Some(c.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY).cloned())),
                    &self.rt.metrics,
                )
            }
            Input::MeshConfig(ev) => {
                let what = self
                    .opts
                    .meshconfig
                    .as_ref()
                    .map(|(n, m)| format!("{MESHCONFIG_KIND} {n}/{m}"))
                    .unwrap_or_default();
                self.meshconfig.apply(
                    &what,
                    ev,
                    |o: &DynamicObject| o.name_any(),
                    |o: &DynamicObject| Some(o.data.clone()),
                    &self.rt.metrics,
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
}
