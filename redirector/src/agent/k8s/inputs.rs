//! What wakes the Kubernetes agent: each is an [`Input`], taken from the
//! [`Streams`] one at a time and handled by the agent
//! (`Agent::handle`); [`Watched`], a collection kept from watch events;
//! and [`WatchHealth`], whether a watch keeps failing.
//!
//! Every list (the first and each relist after a 410 Gone) is served from
//! the API server's watch cache (kube-runtime's `ListSemantic::Any`:
//! `resourceVersion=0`, `resourceVersionMatch=NotOlderThan`), not a quorum
//! read of etcd: every node's agent lists at once after an API server
//! restart.
use std::{
    collections::BTreeMap,
    pin::Pin,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    api::{ApiResource, DynamicObject},
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
    ConfigMap(Box<Result<Event<ConfigMap>, watcher::Error>>),
    /// A watch event of OSM's MeshConfig, or that it is not served.
    MeshConfig(MeshConfigInput),
    /// A watch event of one of the mesh's own ConfigMaps (its index in
    /// [`Streams::want_mesh_wide`]'s names; boxed: an object is large).
    MeshWide(usize, Box<Result<Event<ConfigMap>, watcher::Error>>),
    /// An init container registered its pod (it now waits for the answer).
    Registration(Registration),
    /// The resync tick (`--resync`).
    Resync,
    /// SIGHUP, SIGTERM or SIGINT.
    Signal(Signal),
}

/// What the MeshConfig source says.
pub(super) enum MeshConfigInput {
    /// (boxed: an object is large, the other variant small)
    Watch(Box<Result<Event<DynamicObject>, watcher::Error>>),
    /// Its API is not served (404 on a list or a watch: the CRD is not
    /// installed, was deleted, or does not serve that version). It is
    /// looked for again every `--meshconfig-recheck`.
    NotServed(String),
}

type WatchStream<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

/// Lists from the watch cache (see the module's documentation), in one
/// page: kube-core drops `resourceVersion=0` from a list that also has a
/// `limit` (`ListParams::populate_qp`), which would make every list a
/// quorum read again, and the watch cache serves a `resourceVersion=0`
/// list whole anyway. The lists are small (one node's pods, one object).
fn config() -> watcher::Config {
    let mut cfg = watcher::Config::default().any_semantic();
    cfg.page_size = None;
    cfg
}

fn watch_one<K>(api: Api<K>, name: &str) -> WatchStream<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher::watcher(api, config().fields(&format!("metadata.name={name}"))).default_backoff().boxed()
}

/// Whether a watcher error is a 404: the resource is not served.
pub(super) fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// The MeshConfig source: a watcher while its API is served; on a 404, at
/// any time (the first list, a relist, a watch), `NotServed` and a new
/// watcher (its list is the probe) after `recheck`. kube-runtime's
/// watcher alone would retry a missing CRD forever without ever
/// completing a list.
fn meshconfig_stream(api: Api<DynamicObject>, name: String, recheck: Duration) -> MeshConfigStream {
    enum State {
        Start(Option<Duration>),
        Watching(WatchStream<DynamicObject>),
    }
    futures::stream::unfold(State::Start(None), move |state| {
        let (api, name) = (api.clone(), name.clone());
        async move {
            let mut stream = match state {
                State::Start(wait) => {
                    if let Some(w) = wait {
                        tokio::time::sleep(w).await;
                    }
                    watch_one(api, &name)
                }
                State::Watching(s) => s,
            };
            match stream.next().await {
                Some(Err(e)) if not_found(&e) => {
                    Some((MeshConfigInput::NotServed(e.to_string()), State::Start(Some(recheck))))
                }
                Some(ev) => Some((MeshConfigInput::Watch(Box::new(ev)), State::Watching(stream))),
                // A watcher does not end; if it did, start another.
                None => Some((MeshConfigInput::NotServed("watch ended".into()), State::Start(Some(recheck)))),
            }
        }
    })
    .boxed()
}

type MeshConfigStream = Pin<Box<dyn Stream<Item = MeshConfigInput> + Send>>;

type MeshWideStream =
    futures::stream::SelectAll<Pin<Box<dyn Stream<Item = (usize, Result<Event<ConfigMap>, watcher::Error>)> + Send>>>;

/// Where the inputs come from.
pub(super) struct Streams {
    pods: WatchStream<Pod>,
    configmap: WatchStream<ConfigMap>,
    /// Running only while the MeshConfig is wanted ([`Streams::want_meshconfig`]).
    meshconfig: Option<MeshConfigStream>,
    meshconfig_api: Option<(Api<DynamicObject>, String, Duration)>,
    /// The mesh's own ConfigMaps, while they are wanted.
    mesh_wide: Option<MeshWideStream>,
    client: Client,
    registrations: mpsc::Receiver<Registration>,
    tick: tokio::time::Interval,
    signals: Signals,
}

impl Streams {
    /// Starts the watches of the pods and the ConfigMap; the MeshConfig's
    /// starts when [`Streams::want_meshconfig`] asks for it.
    pub(super) fn open(
        client: &Client,
        opts: &KubeOptions,
        registrations: mpsc::Receiver<Registration>,
        signals: Signals,
    ) -> Self {
        let pods: WatchStream<Pod> = watcher::watcher(
            Api::<Pod>::all(client.clone()),
            config().fields(&format!("spec.nodeName={}", opts.node_name)),
        )
        .default_backoff()
        .boxed();
        let configmap: WatchStream<ConfigMap> = match &opts.configmap {
            Some((ns, name)) => watch_one(Api::namespaced(client.clone(), ns), name),
            None => futures::stream::pending().boxed(),
        };
        let meshconfig_api = opts.meshconfig.as_ref().map(|(ns, name)| {
            let ar = ApiResource {
                group: MESHCONFIG_GROUP.into(),
                version: opts.meshconfig_version.clone(),
                api_version: format!("{MESHCONFIG_GROUP}/{}", opts.meshconfig_version),
                kind: MESHCONFIG_KIND.into(),
                plural: MESHCONFIG_PLURAL.into(),
            };
            (Api::namespaced_with(client.clone(), ns, &ar), name.clone(), opts.meshconfig_recheck)
        });
        let mut tick = tokio::time::interval(opts.resync);
        // A pass longer than the resync period must not be followed by a burst
        // of catch-up ticks: each would be another pass, and the watch streams
        // would wait behind them.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            pods,
            configmap,
            meshconfig: None,
            meshconfig_api,
            mesh_wide: None,
            client: client.clone(),
            registrations,
            tick,
            signals,
        }
    }

    /// Watches these ConfigMaps of `namespace` (one watcher each, its
    /// events tagged with the name's index), or none.
    pub(super) fn want_mesh_wide(&mut self, wanted: Option<(&str, &[String])>) {
        self.mesh_wide = wanted.map(|(ns, names)| {
            futures::stream::select_all(names.iter().enumerate().map(|(i, name)| {
                watch_one(Api::<ConfigMap>::namespaced(self.client.clone(), ns), name).map(move |ev| (i, ev)).boxed()
            }))
        });
    }

    /// Starts or stops the MeshConfig source; true if that changed.
    pub(super) fn want_meshconfig(&mut self, wanted: bool) -> bool {
        match (&self.meshconfig, &self.meshconfig_api, wanted) {
            (None, Some((api, name, recheck)), true) => {
                self.meshconfig = Some(meshconfig_stream(api.clone(), name.clone(), *recheck));
                true
            }
            (Some(_), _, false) => {
                self.meshconfig = None;
                true
            }
            _ => false,
        }
    }

    /// Waits for the next input (cancel-safe: nothing is lost when the
    /// future is dropped before it completes, as with `now_or_never`; the
    /// streams keep what they were doing).
    pub(super) async fn next(&mut self) -> Input {
        let meshconfig = async {
            match self.meshconfig.as_mut() {
                Some(s) => s.next().await,
                None => futures::future::pending().await,
            }
        };
        let mesh_wide = async {
            match self.mesh_wide.as_mut() {
                Some(s) => s.next().await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            Some(ev) = self.pods.next() => Input::Pods(Box::new(ev)),
            Some((i, ev)) = mesh_wide => Input::MeshWide(i, Box::new(ev)),
            Some(ev) = self.configmap.next() => Input::ConfigMap(Box::new(ev)),
            Some(ev) = meshconfig => Input::MeshConfig(ev),
            Some(reg) = self.registrations.recv() => Input::Registration(reg),
            _ = self.tick.tick() => Input::Resync,
            sig = self.signals.next() => Input::Signal(sig),
        }
    }
}

/// Whether a watch keeps failing: [`FAILING_AFTER`] errors in a row, each
/// within [`QUIET`] of the one before, and no object or list delivered
/// since. kube-runtime retries with backoff (0.8 s doubling to 30 s), so a
/// watch that still fails reports an error at least every 30 s plus the
/// request's own timeout; a watch that reconnected says nothing (a quiet
/// node has no pod events), so [`QUIET`] without an error also ends it.
#[derive(Debug, Default)]
pub(super) struct WatchHealth {
    streak: u32,
    last_error: Option<(Instant, String)>,
}

pub(super) const FAILING_AFTER: u32 = 3;
pub(super) const QUIET: Duration = Duration::from_secs(90);

impl WatchHealth {
    /// Takes note of one watcher event (`Init` says nothing: the watcher
    /// sends it before each attempt to list).
    pub(super) fn observe<K>(&mut self, ev: &Result<Event<K>, watcher::Error>, now: Instant) {
        match ev {
            Ok(Event::Init) => {}
            Ok(_) => *self = Self::default(),
            Err(e) => {
                if self.last_error.as_ref().is_some_and(|(t, _)| now.duration_since(*t) > QUIET) {
                    self.streak = 0;
                }
                self.streak += 1;
                self.last_error = Some((now, e.to_string()));
            }
        }
    }

    /// Why the watch counts as failing, if it does.
    pub(super) fn failing(&self, now: Instant) -> Option<String> {
        let (at, text) = self.last_error.as_ref()?;
        let ago = now.duration_since(*at);
        (self.streak >= FAILING_AFTER && ago <= QUIET)
            .then(|| format!("{} errors in a row, the last {}s ago: {text}", self.streak, ago.as_secs()))
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

    /// The collection is known to be empty (its API is not served, or it
    /// is not read): synced, no objects. True if that changed anything.
    pub(super) fn absent(&mut self) -> bool {
        let changed = !self.synced || !self.items.is_empty();
        self.items.clear();
        self.relist = None;
        self.synced = true;
        self.last_error = None;
        changed
    }

    /// Back to not synced (a source that starts again).
    pub(super) fn restart(&mut self) {
        self.items.clear();
        self.relist = None;
        self.synced = false;
        self.last_error = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_ask_for_the_watch_cache() {
        let c = config();
        assert_eq!(c.list_semantic, watcher::ListSemantic::Any);
        assert_eq!(c.page_size, None, "with a limit, kube-core leaves out resourceVersion=0");
    }

    fn err() -> Result<Event<()>, watcher::Error> {
        Err(watcher::Error::NoResourceVersion)
    }

    #[test]
    fn a_watch_fails_after_three_errors_in_a_row() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut h = WatchHealth::default();
        h.observe(&err(), s(0));
        h.observe(&Ok(Event::<()>::Init), s(1));
        h.observe(&err(), s(1));
        assert_eq!(h.failing(s(1)), None, "two errors");
        h.observe(&Ok(Event::<()>::Init), s(2));
        h.observe(&err(), s(3));
        let why = h.failing(s(3)).expect("three errors in a row");
        assert!(why.contains("3 errors in a row") && why.contains("resourceVersion"), "{why}");
        // Still failing while errors keep coming at the backoff's pace.
        h.observe(&err(), s(33));
        assert!(h.failing(s(60)).is_some());
        // Quiet for longer than QUIET: the watch reconnected.
        assert_eq!(h.failing(s(33) + QUIET + Duration::from_secs(1)), None);
        // Any delivered object or list ends it at once.
        h.observe(&err(), s(40));
        h.observe(&Ok(Event::<()>::InitDone), s(41));
        assert_eq!(h.failing(s(41)), None);
        // Errors far apart are not a streak.
        let mut h = WatchHealth::default();
        for i in 0..5 {
            h.observe(&err(), s(i * 100));
        }
        assert_eq!(h.failing(s(400)), None);
    }

    #[test]
    fn a_404_is_not_served() {
        let status = |code| Box::new(kube::core::Status { code, ..Default::default() });
        assert!(not_found(&watcher::Error::InitialListFailed(kube::Error::Api(status(404)))));
        assert!(not_found(&watcher::Error::WatchStartFailed(kube::Error::Api(status(404)))));
        assert!(not_found(&watcher::Error::WatchError(status(404))));
        assert!(!not_found(&watcher::Error::InitialListFailed(kube::Error::Api(status(403)))));
        assert!(!not_found(&watcher::Error::WatchError(status(410))));
        assert!(!not_found(&watcher::Error::NoResourceVersion));
    }
}
