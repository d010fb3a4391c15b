//! Kubernetes Events (events.k8s.io/v1) about pods, the mesh settings'
//! sources and the node, published in the background.
//!
//! Each Event stands for a problem that lasts (a bad annotation, a pod the
//! agent cannot program, invalid mesh settings), under a key the agent
//! names. A new problem, or a new message under the same key, is a new
//! Event; while the problem lasts the Event is refreshed every
//! `--event-refresh` (default 30 min) by a `series` update (count and
//! lastObservedTime), so it outlives the API server's Event TTL
//! (`--event-ttl`, default 1 h: every write of an Event renews its lease,
//! `pkg/registry/core/event/storage/storage.go` `TTLFunc`). An Event that
//! could not be created, or that expired anyway, is created again.
//!
//! Every field follows the API server's validation of events.k8s.io/v1
//! (`pkg/apis/core/validation/events.go` `ValidateEventCreate` and
//! `legacyValidateEvent`): a DNS-subdomain name, `reportingController` a
//! qualified name (ours is domain-qualified, as the field's documentation
//! asks: `kubernetes.io/kubelet`), `reportingInstance`, `action` and
//! `reason` at most 128 bytes, `note` at most 1024 bytes (Go's `len`, so
//! bytes: a note is cut on a character boundary). `regarding` carries the
//! object's UID: `kubectl describe` selects Events by
//! `involvedObject.uid` (kubectl `describe.go` `searchEvents`).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event as K8sEvent, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use log::{info, warn};

use redirector_policy::k8s::{mesh::Source, plan::EventKind};

use super::{MESHCONFIG_GROUP, MESHCONFIG_KIND};
use crate::metrics::Metrics;

/// The log target of these records: the module path they had before the
/// agents moved under `agent/`, so `RUST_LOG` filters and log readers keep
/// working.
const LOG: &str = "redirector::k8s::agent";

/// `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "redirector.dev/agent";
/// The API server's limits (`pkg/apis/core/validation/events.go`).
pub const NOTE_LIMIT: usize = 1024;
pub const FIELD_LIMIT: usize = 128;
/// A DNS subdomain's length limit (an Event's name).
const NAME_LIMIT: usize = 253;
/// How long after a failed create an Event is tried again.
const RETRY: Duration = Duration::from_secs(15);

/// What an Event's `action` says was done.
pub mod action {
    pub const REDIRECT: &str = "Redirect";
    pub const READ_MESH_SETTINGS: &str = "ReadMeshSettings";
    pub const START: &str = "Start";
}

/// `note` cut to at most [`NOTE_LIMIT`] bytes, on a character boundary.
pub fn truncate_note(s: &str) -> &str {
    if s.len() <= NOTE_LIMIT {
        return s;
    }
    let mut end = NOTE_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The name of an Event about `regarding` at `nanos` (client-go's
/// `<name>.<hex time>`), kept a DNS subdomain of at most 253 characters.
pub fn event_name(regarding: &str, nanos: i128) -> String {
    let suffix = format!(".{:x}", nanos.max(0));
    let keep = NAME_LIMIT - suffix.len();
    let mut prefix: String = regarding
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .take(keep)
        .collect();
    // Each dot-separated label starts and ends alphanumeric.
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    let prefix = prefix.split('.').map(|l| l.trim_matches('-')).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(".");
    if prefix.is_empty() {
        format!("redirector{suffix}")
    } else {
        format!("{prefix}{suffix}")
    }
}

/// Refuses a reporting instance the API server would refuse in every
/// Event (`--pod-name`).
pub fn check_instance(instance: &str) -> Result<()> {
    if instance.is_empty() || instance.len() > FIELD_LIMIT {
        bail!(
            "option --pod-name (or POD_NAME): value {instance:?}: an Event's reportingInstance must be 1 to {FIELD_LIMIT} bytes"
        );
    }
    Ok(())
}

/// One Event object, ready to create (`pkg/apis/core/validation/events.go`).
pub fn build(
    name: String,
    kind: EventKind,
    reason: &str,
    action: &str,
    note: &str,
    regarding: ObjectReference,
    instance: &str,
) -> K8sEvent {
    // An Event about a cluster-scoped object (a Node) lives in `default`.
    let ns = regarding.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    K8sEvent {
        metadata: ObjectMeta { name: Some(name), namespace: Some(ns), ..Default::default() },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        type_: Some(match kind {
            EventKind::Normal => "Normal".into(),
            EventKind::Warning => "Warning".into(),
        }),
        reason: Some(reason.to_string()),
        action: Some(action.to_string()),
        note: Some(truncate_note(note).to_string()),
        regarding: Some(regarding),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(instance.to_string()),
        ..Default::default()
    }
}

/// One problem's Event as the agent last wrote it.
#[derive(Clone, Debug)]
struct Record {
    event: K8sEvent,
    /// 1, then the series count of the last refresh.
    count: i32,
    /// When the server last accepted it (None: not yet, or failed).
    written: Option<Instant>,
    attempted: Instant,
    in_flight: bool,
}

/// What a record needs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    Nothing,
    Create,
    Refresh,
}

fn due(r: &Record, now: Instant, refresh: Duration) -> Due {
    if r.in_flight {
        return Due::Nothing;
    }
    match r.written {
        None if now.duration_since(r.attempted) >= RETRY => Due::Create,
        None => Due::Nothing,
        Some(at) if now.duration_since(at) >= refresh => Due::Refresh,
        Some(_) => Due::Nothing,
    }
}

/// Publishes Events as [`REPORTING_CONTROLLER`], reporting instance the
/// agent's pod.
pub(super) struct Events {
    client: Client,
    instance: String,
    metrics: Arc<Metrics>,
    refresh: Duration,
    ongoing: Arc<Mutex<BTreeMap<String, Record>>>,
}

impl Events {
    pub(super) fn new(client: Client, instance: String, metrics: Arc<Metrics>, refresh: Duration) -> Self {
        Self { client, instance, metrics, refresh, ongoing: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.ongoing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A problem under `key` (new, or with a new message): creates its
    /// Event in the background (the API's latency never holds up a
    /// reconcile). The same message again changes nothing: the Event is
    /// refreshed while the key stays (see [`Events::retain`]).
    pub(super) fn publish(
        &self,
        key: &str,
        kind: EventKind,
        reason: &str,
        action: &str,
        message: &str,
        regarding: ObjectReference,
    ) {
        let note = truncate_note(message);
        if let Some(r) = self.lock().get(key) {
            if r.event.note.as_deref() == Some(note) && r.event.reason.as_deref() == Some(reason) {
                return;
            }
        }
        let nanos = k8s_openapi::jiff::Timestamp::now().as_nanosecond();
        let name = event_name(regarding.name.as_deref().unwrap_or("redirector"), nanos);
        let event = build(name, kind, reason, action, note, regarding, &self.instance);
        let now = Instant::now();
        let record = Record { event, count: 1, written: None, attempted: now, in_flight: true };
        self.lock().insert(key.to_string(), record.clone());
        self.spawn_create(key.to_string(), record.event);
    }

    /// Forgets the problems that are over (their Events are no longer
    /// refreshed; a recurrence is a new Event).
    pub(super) fn retain(&self, live: impl Fn(&str) -> bool) {
        self.lock().retain(|k, _| live(k));
    }

    /// Creates again what failed, and refreshes the Events of problems
    /// that last (called on every pass).
    pub(super) fn tend(&self) {
        let now = Instant::now();
        let mut work = Vec::new();
        for (key, r) in self.lock().iter_mut() {
            match due(r, now, self.refresh) {
                Due::Nothing => {}
                d => {
                    r.in_flight = true;
                    r.attempted = now;
                    work.push((d, key.clone(), r.event.clone(), r.count));
                }
            }
        }
        for (d, key, event, count) in work {
            match d {
                Due::Create => self.spawn_create(key, event),
                Due::Refresh => self.spawn_refresh(key, event, count + 1),
                Due::Nothing => {}
            }
        }
    }

    fn api(&self, event: &K8sEvent) -> Api<K8sEvent> {
        Api::namespaced(self.client.clone(), event.metadata.namespace.as_deref().unwrap_or("default"))
    }

    /// Marks the record of `key` (if it is still this Event) as written or
    /// not.
    fn settle(
        ongoing: &Mutex<BTreeMap<String, Record>>,
        key: &str,
        name: &Option<String>,
        f: impl FnOnce(&mut Record),
    ) {
        let mut map = ongoing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get_mut(key).filter(|r| &r.event.metadata.name == name) {
            r.in_flight = false;
            f(r);
        }
    }

    fn spawn_create(&self, key: String, event: K8sEvent) {
        let api = self.api(&event);
        let (metrics, ongoing) = (self.metrics.clone(), self.ongoing.clone());
        tokio::spawn(async move {
            let name = event.metadata.name.clone();
            let result = api.create(&PostParams::default(), &event).await;
            let ok = match &result {
                Ok(_) => true,
                // A create whose answer was lost, tried again.
                Err(kube::Error::Api(s)) if s.code == 409 => true,
                Err(e) => {
                    metrics.error("event_publish");
                    warn!(
                        target: LOG,
                        "publishing Event {} ({:?}) in namespace {}: {e}; trying again in {}s",
                        name.as_deref().unwrap_or(""),
                        event.reason.as_deref().unwrap_or(""),
                        event.metadata.namespace.as_deref().unwrap_or(""),
                        RETRY.as_secs()
                    );
                    false
                }
            };
            Self::settle(&ongoing, &key, &name, |r| r.written = ok.then(Instant::now));
        });
    }

    fn spawn_refresh(&self, key: String, event: K8sEvent, count: i32) {
        let api = self.api(&event);
        let (metrics, ongoing, instance) = (self.metrics.clone(), self.ongoing.clone(), self.instance.clone());
        tokio::spawn(async move {
            let name = event.metadata.name.clone().unwrap_or_default();
            let series = EventSeries { count, last_observed_time: MicroTime(k8s_openapi::jiff::Timestamp::now()) };
            let patch = serde_json::json!({ "series": series });
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => Self::settle(&ongoing, &key, &Some(name), |r| {
                    r.count = count;
                    r.written = Some(Instant::now());
                }),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    // Expired after all: a new Event for the same problem.
                    info!(target: LOG, "Event {name} expired while its problem lasts; publishing it again");
                    let nanos = k8s_openapi::jiff::Timestamp::now().as_nanosecond();
                    let regarding = event.regarding.clone().unwrap_or_default();
                    let renewed = build(
                        event_name(regarding.name.as_deref().unwrap_or("redirector"), nanos),
                        if event.type_.as_deref() == Some("Normal") { EventKind::Normal } else { EventKind::Warning },
                        event.reason.as_deref().unwrap_or_default(),
                        event.action.as_deref().unwrap_or_default(),
                        event.note.as_deref().unwrap_or_default(),
                        regarding,
                        &instance,
                    );
                    let mut map = ongoing.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(r) = map.get_mut(&key).filter(|r| r.event.metadata.name.as_deref() == Some(&name)) {
                        // Created at the next tend().
                        *r = Record {
                            event: renewed,
                            count: 1,
                            written: None,
                            attempted: Instant::now() - RETRY,
                            in_flight: false,
                        };
                    }
                }
                Err(e) => {
                    metrics.error("event_publish");
                    warn!(target: LOG, "refreshing Event {name}: {e}");
                    Self::settle(&ongoing, &key, &Some(name), |_| {});
                }
            }
        });
    }
}

/// The object an Event about a pod is regarding.
pub(super) fn pod_ref(uid: &str, namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: Some(uid.into()),
        ..Default::default()
    }
}

/// The object an `InvalidMeshConfig` Event is regarding: the ConfigMap or
/// the MeshConfig (`namespace/name`) whose settings are invalid, with its
/// UID when it is (or was) seen.
pub(super) fn mesh_source_ref(source: &Source, meshconfig_version: &str, uid: Option<String>) -> ObjectReference {
    let (api_version, kind, full) = match source {
        Source::ConfigMap(n) => ("v1".to_string(), "ConfigMap", n.clone()),
        Source::MeshConfig(n) => (format!("{MESHCONFIG_GROUP}/{meshconfig_version}"), MESHCONFIG_KIND, n.clone()),
    };
    let (ns, name) = full.split_once('/').unwrap_or(("", &full));
    ObjectReference {
        api_version: Some(api_version),
        kind: Some(kind.into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        uid,
        ..Default::default()
    }
}

/// The object an Event about the node is regarding.
pub(super) fn node_ref(name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_to_1024_bytes_on_a_character_boundary() {
        assert_eq!(truncate_note("short"), "short");
        let ascii = "a".repeat(2000);
        assert_eq!(truncate_note(&ascii).len(), NOTE_LIMIT);
        // 'é' is 2 bytes, '€' 3, '𝄞' 4: every cut lands on a boundary.
        for c in ['é', '€', '𝄞'] {
            for lead in 0..4 {
                let s = format!("{}{}", "x".repeat(lead), c.to_string().repeat(600));
                let t = truncate_note(&s);
                assert!(t.len() <= NOTE_LIMIT && t.len() > NOTE_LIMIT - c.len_utf8(), "{c} {lead}: {}", t.len());
                assert!(s.starts_with(t));
            }
        }
        let exact = "é".repeat(NOTE_LIMIT / 2);
        assert_eq!(truncate_note(&exact), exact, "exactly at the limit is kept whole");
    }

    fn is_dns_subdomain(s: &str) -> bool {
        s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    }

    #[test]
    fn names_are_dns_subdomains() {
        assert_eq!(event_name("web-1", 0x1234), "web-1.1234");
        let long = format!("{}.{}", "a".repeat(240), "b".repeat(12));
        for regarding in ["web-1", long.as_str(), &"x-".repeat(200), "Upper_Case", "a..b", "-", "", "node.example.com"]
        {
            let n = event_name(regarding, 1_700_000_000_123_456_789);
            assert!(is_dns_subdomain(&n), "{regarding:?} -> {n:?}");
            assert!(n.ends_with(".17979cfe3d85cd15"), "{n}");
        }
    }

    #[test]
    fn fields_within_the_api_limits() {
        assert_eq!(REPORTING_CONTROLLER.split_once('/').map(|(d, _)| d.contains('.')), Some(true));
        for a in [action::REDIRECT, action::READ_MESH_SETTINGS, action::START] {
            assert!(!a.is_empty() && a.len() <= FIELD_LIMIT);
        }
        assert!(check_instance("redirector-abcde").is_ok());
        assert!(check_instance("").is_err());
        let e = check_instance(&"p".repeat(129)).unwrap_err().to_string();
        assert!(e.contains("--pod-name") && e.contains("128"), "{e}");
        let ev = build(
            "x.1".into(),
            EventKind::Warning,
            "InvalidAnnotation",
            action::REDIRECT,
            &"ü".repeat(700),
            node_ref("n1", None),
            "agent",
        );
        assert_eq!(ev.metadata.namespace.as_deref(), Some("default"), "a cluster-scoped object's Events");
        assert!(ev.note.unwrap().len() <= NOTE_LIMIT);
    }

    #[test]
    fn failed_creates_are_retried_and_lasting_problems_refreshed() {
        let t0 = Instant::now();
        let refresh = Duration::from_secs(1800);
        let mut r = Record { event: K8sEvent::default(), count: 1, written: None, attempted: t0, in_flight: true };
        assert_eq!(due(&r, t0 + RETRY, refresh), Due::Nothing, "in flight");
        r.in_flight = false;
        assert_eq!(due(&r, t0, refresh), Due::Nothing, "just tried");
        assert_eq!(due(&r, t0 + RETRY, refresh), Due::Create);
        r.written = Some(t0);
        assert_eq!(due(&r, t0 + refresh - Duration::from_secs(1), refresh), Due::Nothing);
        assert_eq!(due(&r, t0 + refresh, refresh), Due::Refresh);
    }
}
