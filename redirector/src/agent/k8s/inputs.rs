//! What wakes the Kubernetes agent: each is an [`Input`], taken from the
//! [`Streams`] one at a time and handled by the agent
//! (`Agent::handle`); and [`Watched`], a collection kept from watch events.
use std::{collections::BTreeMap, pin::Pin};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    api::{ApiResource, DynamicObject, ListParams},
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client,
};
use log::{debug, info, warn};
use tokio::sync::mpsc;

use super::{registry::Registration, KubeOptions, MESHCONFIG_GROUP, MESHCONFIG_KIND, MESHCONFIG_PLURAL};
use crate::{agent::runtime::Signal, agent::runtime::Signals, metrics::Metrics};

/// The log target of these records: the module path they had before the
/// agents moved under `agent/`, so `RUST_LOG` filters and log readers keep
/// working.
const LOG: &str = "redirector::k8s::agent";

/// One thing that wakes the agent's loop.
pub(super) enum Input {
    /// A watch event of the pods on this node (boxed: a Pod is large, the
    /// other inputs are small).
    Pods(Box<Result<Event<Pod>, watcher::Error>>),
    /// A watch event of the agent's ConfigMap.
    ConfigMap(Result<Event<ConfigMap>, watcher::Error>),
    /// A watch event of OSM's MeshConfig.
    MeshConfig(Result<Event<DynamicObject>, watcher::Error>),
    /// An init container registered its pod (it now waits for the answer).
    Registration(Registration),
    /// The resync tick (`--resync`).
    Resync,
    /// SIGHUP, SIGTERM or SIGINT.
    Signal(Signal),
}

type WatchStream<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

fn watch_one<K>(api: Api<K>, name: &str) -> WatchStream<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher::watcher(api, cfg).default_backoff().boxed()
}

/// Where the inputs come from.
pub(super) struct Streams {
    pods: WatchStream<Pod>,
    configmap: WatchStream<ConfigMap>,
    meshconfig: WatchStream<DynamicObject>,
    registrations: mpsc::Receiver<Registration>,
    tick: tokio::time::Interval,
    signals: Signals,
}

impl Streams {
    /// Starts the watches. The second value is whether the MeshConfig is
    /// to be waited for: not when none is configured, nor when its CRD is
    /// not served (then mesh settings come from the ConfigMap only).
    pub(super) async fn open(
        client: &Client,
        opts: &KubeOptions,
        registrations: mpsc::Receiver<Registration>,
        signals: Signals,
    ) -> (Self, bool) {
        let pods: WatchStream<Pod> = watcher::watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name)),
        )
        .default_backoff()
        .boxed();
        let configmap: WatchStream<ConfigMap> = match &opts.configmap {
            Some((ns, name)) => watch_one(Api::namespaced(client.clone(), ns), name),
            None => futures::stream::pending().boxed(),
        };
        let mut meshconfig: WatchStream<DynamicObject> = futures::stream::pending().boxed();
        let mut meshconfig_wanted = true;
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
                    info!(
                        target: LOG,
                        "{MESHCONFIG_KIND} {}/{} not served (CRD not installed): mesh settings from the ConfigMap only",
                        ar.api_version, MESHCONFIG_PLURAL
                    );
                    meshconfig_wanted = false;
                }
                _ => meshconfig = watch_one(api, name),
            }
        } else {
            meshconfig_wanted = false;
        }
        let mut tick = tokio::time::interval(opts.resync);
        // A pass longer than the resync period must not be followed by a burst
        // of catch-up ticks: each would be another pass, and the watch streams
        // would wait behind them.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (Self { pods, configmap, meshconfig, registrations, tick, signals }, meshconfig_wanted)
    }

    /// Waits for the next input (cancel-safe: nothing is lost when the
    /// future is dropped before it completes, as with `now_or_never`).
    pub(super) async fn next(&mut self) -> Input {
        tokio::select! {
            Some(ev) = self.pods.next() => Input::Pods(Box::new(ev)),
            Some(ev) = self.configmap.next() => Input::ConfigMap(ev),
            Some(ev) = self.meshconfig.next() => Input::MeshConfig(ev),
            Some(reg) = self.registrations.recv() => Input::Registration(reg),
            _ = self.tick.tick() => Input::Resync,
            sig = self.signals.next() => Input::Signal(sig),
        }
    }
}

/// A collection seen through a watcher: the objects, a buffer for a relist
/// in progress (the current objects stay until it completes), and whether
/// a complete list has been seen.
pub(super) struct Watched<T> {
    pub(super) items: BTreeMap<String, T>,
    pub(super) relist: Option<BTreeMap<String, T>>,
    pub(super) synced: bool,
    last_error: Option<String>,
}

impl<T> Watched<T> {
    pub(super) fn new() -> Self {
        Self { items: BTreeMap::new(), relist: None, synced: false, last_error: None }
    }

    /// Applies one watcher event; true if the collection changed.
    pub(super) fn apply<K>(
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
